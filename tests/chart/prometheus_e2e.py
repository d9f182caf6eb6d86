#!/usr/bin/env python3
"""Every metric the chart's alerts and dashboard query exists, checked against the binaries.

    prometheus_e2e.py RULES_YAML DASHBOARD_JSON GATEWAY_BIN

RULES_YAML is the rendered PrometheusRule's spec (`groups:`), DASHBOARD_JSON the chart's
dashboard. Run by tests/chart/test.sh. Invariants checked:

1. Static: every `partnergate_*` name in an alert expression, a panel query or a dashboard
   variable is registered in gateway/src/metrics.rs or operator/src/metrics.rs (with the
   sample suffixes prometheus-client adds: `_total` for counters, `_bucket`/`_sum`/`_count`
   for histograms).
2. Live, gateway: a standalone gateway (private loopback block, its own temp dir) in front of a
   small SMTP sink, scraped every second by a private Prometheus (Debian `prometheus`, its own
   config and data dir, loopback port below 32768). The registrations parsed in 1 must equal the
   `# TYPE` families of the gateway's real /metrics, so the parser cannot drift. Traffic covers
   each outcome the alerts select on (relayed, refused by rule, next-hop 4xx, failed handshake,
   succeeding and failing validation probes, a failed and a good reload). Then, through the
   Prometheus HTTP API: every alert expression and every panel query evaluates without error;
   every panel query on gateway metrics returns data; every gateway selector in an alert
   (name plus label matchers) matches scraped series, so a typo'd label value fails too.
   Metrics registered but not yet recorded by the SMTP session code (PENDING) are exempt from
   the data requirement, and the test fails once they do carry data, so the list stays honest.
3. Operator metrics are checked by name here (1) and, against the operator's real exposition,
   by the unit test chart_queries_name_exported_metrics in operator/src/metrics.rs (a live
   operator needs an API server).

Prints one line per check group; exits 1 on the first failure.
"""

import json
import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
# Registered in gateway/src/metrics.rs, recorded only once the session code calls them
# (gateway/src/session/starttls.rs: Metrics::connector_tls; session/rcpt.rs:
# Metrics::next_hop_recipient). Remove a name here when its wiring lands.
PENDING: set[str] = set()
NAME = re.compile(r"\bpartnergate_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(partnergate_[a-z0-9_]+)(\{[^}]*\})?")


class Fail(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


# --- 1. registrations ------------------------------------------------------------------------

def registrations(src, prefix=""):
    """{family: type} from `registry.register("name", "help", field.clone())` and field types,
    and from collectors' `encode_descriptor("name", …)` of a ConstCounter/ConstGauge."""
    text = src.read_text()
    types = {}
    for field, ty in re.findall(r"pub (\w+): (?:Family<\w+, )?(Counter|Gauge|Histogram)\b", text):
        types[field] = ty.lower()
    fams = {}
    for name, field in re.findall(r'register\(\s*"([a-z0-9_]+)",\s*"[^"]*",\s*(\w+)\.clone\(\)', text, re.S):
        check(field in types, f"{src}: cannot tell the type of {field} (registered as {name})")
        fams[prefix + name] = types[field]
    # Collectors registered with `register_collector` encode their own descriptor (e.g. the
    # log writer's dropped-lines count, read at scrape time).
    for ty, name in re.findall(r'Const(Counter|Gauge)::new\(.*?encode_descriptor\(\s*"([a-z0-9_]+)"', text, re.S):
        fams[name] = ty.lower()
    check(fams, f"{src}: no registrations found")
    return fams


def sample_names(fams):
    out = {}
    for fam, ty in fams.items():
        for suffix in {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}[ty]:
            out[fam + suffix] = fam
    return out


def family_of(name, samples):
    return samples.get(name)


# --- the sink and the traffic ----------------------------------------------------------------

class Sink(threading.Thread):
    """A minimal SMTP server: 250 for everything, 451 at the final dot when the message says
    TEMPFAIL and 451 to a RCPT of a `tempfail@` recipient (a next hop's temporary failures)."""

    def __init__(self, addr):
        super().__init__(daemon=True)
        self.sock = socket.create_server(addr)
        self.received = 0

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.session, args=(conn,), daemon=True).start()

    def session(self, conn):
        f = conn.makefile("rb")
        out = conn.makefile("wb")

        def say(line):
            out.write(line.encode() + b"\r\n")
            out.flush()

        try:
            say("220 sink ESMTP")
            while True:
                line = f.readline()
                if not line:
                    return
                cmd = line.strip().upper()
                if cmd.startswith(b"EHLO"):
                    out.write(b"250-sink\r\n250 PIPELINING\r\n")
                    out.flush()
                elif cmd == b"DATA":
                    say("354 go ahead")
                    body = b""
                    while True:
                        chunk = f.readline()
                        if not chunk or chunk == b".\r\n":
                            break
                        body += chunk
                    self.received += 1
                    say("451 4.3.0 try later" if b"TEMPFAIL" in body else "250 2.0.0 queued")
                elif cmd.startswith(b"RCPT") and b"TEMPFAIL@" in cmd:
                    say("451 4.2.1 mailbox busy")
                elif cmd == b"QUIT":
                    say("221 bye")
                    return
                else:
                    say("250 ok")
        except OSError:
            return
        finally:
            conn.close()


def free(ip, port):
    with socket.socket() as s:
        try:
            s.bind((ip, port))
            return True
        except OSError:
            return False


def pick_block():
    """127.a.b.0/24 with b in 251..254: tests' Net blocks use b <= 250, so none collides."""
    a = 16 + os.getpid() % 200
    for b in range(251, 255):
        ip = f"127.{a}.{b}"
        if all(free(f"{ip}.{h}", p) for h, p in ((1, 2525), (1, 8080), (2, 2526), (3, 9090))):
            return ip
    raise Fail("no free loopback block 127.{a}.251-254 for the gateway, sink and Prometheus")


def openssl(*args):
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_for(what, fn, secs=30):
    deadline = time.monotonic() + secs
    last = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except (OSError, ValueError) as e:
            last = e
        time.sleep(0.2)
    raise Fail(f"{what} did not happen within {secs} s ({last})")


def traffic(net, tmp, connectors_file, good_connectors):
    gw = (f"{net}.1", 2525)
    ctx = ssl.create_default_context(cafile=str(tmp / "ca.crt"))
    ctx.check_hostname = False
    msg = "Subject: hi\r\n\r\nhello\r\n"
    # partner without STARTTLS: refused by requireTls
    with smtplib.SMTP(*gw, source_address=(f"{net}.21", 0), timeout=10) as s:
        s.ehlo("mail.contoso.test")
        code, _ = s.mail("a@contoso.test")
        check(code == 530, f"plaintext partner MAIL FROM got {code}, want 530 (requireTls)")
    # partner with STARTTLS: relayed inbound; one message the upstream answers 451
    for body, want in ((msg, None), ("Subject: t\r\n\r\nTEMPFAIL\r\n", 451)):
        with smtplib.SMTP(*gw, source_address=(f"{net}.21", 0), timeout=10) as s:
            s.starttls(context=ctx)
            try:
                s.sendmail("a@contoso.test", ["user@example.test"], body)
                check(want is None, "the upstream's 451 was not mirrored")
            except smtplib.SMTPDataError as e:
                check(e.smtp_code == want, f"DATA got {e.smtp_code}, want {want}")
    # a recipient the upstream answers 451 (partnergate_next_hop_recipients_total tempfail)
    with smtplib.SMTP(*gw, source_address=(f"{net}.21", 0), timeout=10) as s:
        s.starttls(context=ctx)
        s.ehlo("mail.contoso.test")
        s.mail("a@contoso.test")
        code, _ = s.rcpt("tempfail@example.test")
        check(code == 451, f"RCPT the upstream answers 451 got {code}")
    # a partner whose SPF cannot be looked up (nothing answers on dnsResolver): 451 4.7.24,
    # partnergate_sender_auth_total{mechanism="spf",result="temperror"}
    with smtplib.SMTP(*gw, source_address=(f"{net}.21", 0), timeout=60) as s:
        s.ehlo("mail.tailspin.test")
        code, _ = s.mail("a@tailspin.test")
        check(code == 451, f"MAIL FROM with SPF required and no DNS got {code}, want 451")
    # internal sender to the Outbound connector's partner
    with smtplib.SMTP(*gw, source_address=(f"{net}.20", 0), timeout=10) as s:
        s.sendmail("me@example.test", ["you@fabrikam.test"], msg)
    # a client that breaks the handshake: a failed STARTTLS
    with socket.create_connection(gw, timeout=10, source_address=(f"{net}.22", 0)) as c:
        f = c.makefile("rb")
        f.readline()
        c.sendall(b"EHLO x\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        c.sendall(b"STARTTLS\r\n")
        f.readline()
        c.sendall(b"\x16\x03\x01\x00\x05garbage-not-tls\r\n")
        c.settimeout(10)
        try:
            c.recv(100)
        except OSError:
            pass
    # a broken connectors file (reload failure), then the good one again (success)
    connectors_file.write_text("{ not json")
    wait_for("the gateway to refuse the broken connectors file", lambda: 'partnergate_config_reloads_total{result="failure"}'
             in http_get(f"http://{net}.1:8080/metrics"))
    good = dict(good_connectors)
    good["inbound"] = [dict(good["inbound"][0], generation=2)]
    connectors_file.write_text(json.dumps(good))


# --- 2. live ---------------------------------------------------------------------------------

def live(tmp, gateway_bin, queries, alert_exprs, gw_samples, gw_fams):
    net = pick_block()
    # PKI: a CA and the gateway's server certificate
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "30",
            "-subj", "/CN=Test CA", "-keyout", tmp / "ca.key", "-out", tmp / "ca.crt")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=gw.example.test",
            "-keyout", tmp / "gw.key", "-out", tmp / "gw.csr")
    (tmp / "gw.ext").write_text("subjectAltName=DNS:gw.example.test\n")
    openssl("x509", "-req", "-in", tmp / "gw.csr", "-CA", tmp / "ca.crt", "-CAkey", tmp / "ca.key",
            "-CAcreateserial", "-days", "20", "-extfile", tmp / "gw.ext", "-out", tmp / "gw.crt")
    fleet = {
        "listen": f"{net}.1:2525", "adminListen": f"{net}.1:8080", "hostname": "gw.example.test",
        "serverCertificate": {"certFile": str(tmp / "gw.crt"), "keyFile": str(tmp / "gw.key")},
        "acceptedDomains": ["example.test"],
        "internalSenders": {"ipRanges": [f"{net}.20/32"]},
        "upstream": {"host": f"{net}.2", "port": 2526, "tls": "None"},
        "defaultInbound": "Reject",
        "limits": {"maxConnections": 900},
        "validationIntervalSecs": 3600,
        "dnsResolver": f"{net}.3:53",
    }
    connectors = {
        "inbound": [{"name": "mail/contoso", "generation": 1, "domains": ["contoso.test"], "requireTls": True},
                    {"name": "mail/tailspin", "generation": 1, "domains": ["tailspin.test"], "requireTls": False,
                     "senderAuthentication": "SPF"}],
        "outbound": [
            {"name": "mail/fabrikam", "generation": 1, "domains": ["fabrikam.test"],
             "smartHosts": [f"[{net}.2]:2526"], "tls": "None"},
            # nothing listens there: its validation probe fails
            {"name": "mail/northwind", "generation": 1, "domains": ["northwind.test"],
             "smartHosts": [f"[{net}.2]:2999"], "tls": "None"},
        ],
    }
    (tmp / "fleet.json").write_text(json.dumps(fleet))
    cfile = tmp / "connectors.json"
    cfile.write_text(json.dumps(connectors))
    sink = Sink((f"{net}.2", 2526))
    sink.start()
    prom_dir = tmp / "prometheus"
    prom_dir.mkdir()
    (prom_dir / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "gateway", "static_configs": [{"targets": [f"{net}.1:8080"]}]}],
    }))
    procs = []
    try:
        gw = subprocess.Popen([gateway_bin, "--fleet", tmp / "fleet.json", "--connectors", cfile],
                              stdout=subprocess.DEVNULL, stderr=open(tmp / "gateway.log", "wb"))
        procs.append(gw)
        prom = subprocess.Popen([shutil.which("prometheus") or "/usr/bin/prometheus",
                                 f"--config.file={prom_dir / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={prom_dir / 'data'}",
                                 f"--web.listen-address={net}.3:9090", "--log.level=warn"],
                                stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "wb"))
        procs.append(prom)
        admin = f"http://{net}.1:8080"
        api = f"http://{net}.3:9090/api/v1"
        wait_for("gateway /readyz", lambda: http_get(f"{admin}/readyz").strip() == "ok")
        wait_for("Prometheus ready", lambda: "Ready" in http_get(f"http://{net}.3:9090/-/ready"))

        traffic(net, tmp, cfile, connectors)

        def query(q):
            body = json.loads(http_get(f"{api}/query?" + urllib.parse.urlencode({"query": q})))
            check(body.get("status") == "success", f"Prometheus refused {q!r}: {body}")
            return body["data"]["result"]

        # wait until the traffic's last effects (the reload back to success, the failed
        # validation probe) have been scraped, and every series has two points for rate()
        wait_for("the reloads and probes in Prometheus", lambda: query(
            'partnergate_config_reloads_total{result="failure"}') and query(
            'partnergate_config_last_reload_successful == 1') and query(
            'partnergate_connector_validation_total{result="failure"}') and query(
            'partnergate_connector_validation_total{result="success"}') and query(
            'partnergate_messages_total{outcome="tempfail"}'))
        seen = time.time()
        wait_for("a scrape after the traffic was seen", lambda: (r := query("timestamp(up)"))
                 and float(r[0]["value"][1]) > seen + 0.1)

        # the parser's view equals the binary's (a labelled family appears in /metrics once it
        # has a sample, so after the traffic every family but the PENDING ones is there)
        exposition = http_get(f"{admin}/metrics")
        live_fams = dict(re.findall(r"^# TYPE (partnergate_\S+) (\w+)$", exposition, re.M))
        want = {k: v for k, v in gw_fams.items() if k not in PENDING}
        check(live_fams == want, "gateway/src/metrics.rs registrations as parsed (without PENDING) differ from "
              f"/metrics after the traffic:\nparsed {sorted(want.items())}\nlive   {sorted(live_fams.items())}")
        print(f"ok   {len(gw_fams)} gateway metric families parsed from gateway/src/metrics.rs; all but "
              f"{len(PENDING)} pending ones are in the live /metrics with the same types")

        # the limit the connection alert divides by is the configured one, not a default 0
        limit = query("partnergate_max_connections")
        check(limit and all(float(r["value"][1]) == 900 for r in limit),
              f"partnergate_max_connections is {limit}, want limits.maxConnections 900")

        scraped = set(json.loads(http_get(f"{api}/label/__name__/values"))["data"])
        for p in PENDING:
            check(not any(family_of(n, gw_samples) == p for n in scraped),
                  f"{p} has samples now: remove it from PENDING in {Path(__file__).name}")

        def gateway_metric(n):
            return n in gw_samples

        def needs_data(names):
            return all(gateway_metric(n) for n in names) and not any(gw_samples[n] in PENDING for n in names)

        # alerts: evaluate; each gateway selector must match scraped series
        selectors = 0
        for alert, expr in alert_exprs:
            query(expr)
            for name, matchers in SELECTOR.findall(expr):
                if not gateway_metric(name) or gw_samples[name] in PENDING:
                    continue
                sel = name + (matchers or "")
                check(query(f"count({sel})"), f"alert {alert}: {sel} matches no scraped series")
                selectors += 1
        print(f"ok   {len(alert_exprs)} alert expressions evaluate on Prometheus; their {selectors} gateway selectors match scraped series")

        # panels: evaluate with the variables set to "all"; gateway-only queries return data
        with_data = exempt = 0
        for where, q in queries:
            names = set(NAME.findall(q))
            result = query(substitute(q))
            if needs_data(names):
                check(result, f"dashboard {where}: no data for {q}")
                with_data += 1
            else:
                exempt += 1
        print(f"ok   {len(queries)} dashboard queries evaluate; {with_data} on gateway metrics return data "
              f"({exempt} on operator or pending metrics checked by name only)")
    except Fail:
        for log in ("gateway.log", "prometheus.log"):
            if (tmp / log).exists():
                sys.stderr.write(f"--- {log} (last lines)\n" + "\n".join((tmp / log).read_text(errors="replace").splitlines()[-20:]) + "\n")
        raise
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        sink.sock.close()


def label_values_query(q):
    """Grafana's label_values(SELECTOR, LABEL) as the PromQL query that yields those values."""
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q.strip())
    check(m, f"dashboard variable query {q!r} is not label_values(selector, label)")
    return f"count by ({m.group(2)}) ({m.group(1)})"


def substitute(q):
    return (q.replace("$namespace", ".*").replace("$connector", ".*")
             .replace("$__rate_interval", "30s").replace("$__range", "5m"))


def main():
    sys.stdout.reconfigure(line_buffering=True)
    rules_path, dash_path, gateway_bin = sys.argv[1:4]
    rules = yaml.safe_load(Path(rules_path).read_text())
    alert_exprs = [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"] if "alert" in r]
    check(alert_exprs, f"{rules_path}: no alerts")
    dash = json.loads(Path(dash_path).read_text())
    queries = []

    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dash["panels"]):
        for t in p.get("targets", []):
            queries.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
    variables = []
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            variables.append((f"variable {v['name']}", q))
    check(queries, f"{dash_path}: no panel queries")

    gw_fams = registrations(ROOT / "gateway/src/metrics.rs")
    op_fams = registrations(ROOT / "operator/src/metrics.rs", prefix="partnergate_operator_")
    gw_samples, op_samples = sample_names(gw_fams), sample_names(op_fams)
    known = set(gw_samples) | set(op_samples)
    for where, text in [(f"alert {a}", e) for a, e in alert_exprs] + queries + variables:
        for n in NAME.findall(text):
            check(n in known, f"{where} names {n}, which neither gateway/src/metrics.rs nor "
                  "operator/src/metrics.rs registers")
    print(f"ok   {len(alert_exprs)} alerts, {len(queries)} panel queries and {len(variables)} variables "
          "name only metrics the binaries register")

    with tempfile.TemporaryDirectory(prefix="partnergate-prom-") as tmp:
        live(Path(tmp), gateway_bin, queries + [(w, label_values_query(q)) for w, q in variables],
             alert_exprs, gw_samples, gw_fams)


if __name__ == "__main__":
    try:
        main()
    except Fail as e:
        print(f"FAIL {e}", file=sys.stderr)
        sys.exit(1)
