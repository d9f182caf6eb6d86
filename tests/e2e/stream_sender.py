#!/usr/bin/env python3
"""Streams STARTTLS mail at the gateway while something disruptive happens (tests/e2e/rolling_upgrade.sh).

  stream_sender.py send --target IP:PORT | --targets-file FILE  --source IP --cert C --key K
                        --cafile CA --from A --to B --stop-file F --ledger L --summary S.json
  stream_sender.py check --ledger L --sink DIR

`send`: WORKERS threads each send one message at a time, one SMTP session per attempt (no
pipelining, so every reply belongs to one stage), until the stop file exists. An attempt may
fail only before the message was handed over: a connection failure (refused, reset, timeout)
or a 4xx reply at any stage up to and including the reply to the end of DATA; then the same
message (same X-E2E-Id) is retried after RETRY_PAUSE. A 5xx anywhere, or a connection lost
after the final "." was sent (the sender cannot know whether the gateway accepted it), is a
failure: it is counted, printed and makes the run fail. Every 250 after DATA goes to the ledger.
`--targets-file` is re-read before every attempt (one ip:port per line), for a target list that
changes under the sender.

`check`: every id in the ledger must be at the sink (Postfix smtp-sink's dump files, one per
message, searched for `X-E2E-Id:` headers); prints acked, found, missing and duplicates, exits
1 if any is missing.

Invariants: a message id is in the ledger only after its 250; the summary is written once, at
the end; nothing here relaxes a timeout: SESSION_TIMEOUT bounds a stalled read as a client's
would.
"""

import argparse
import collections
import json
import os
import random
import smtplib
import socket
import ssl
import sys
import threading
import time

SESSION_TIMEOUT = 30.0
RETRY_PAUSE = 0.2
MAX_ATTEMPTS = 100


class Outcome(Exception):
    """How one attempt ended: kind is 'ok', 'retry' or 'fail'; label names the reply or error."""

    def __init__(self, kind, label, stage):
        super().__init__(f"{kind} {label} at {stage}")
        self.kind, self.label, self.stage = kind, label, stage


def classify(code, stage):
    if 200 <= code < 400:
        return None
    if 400 <= code < 500:
        raise Outcome("retry", str(code), stage)
    raise Outcome("fail", str(code), stage)


def targets(args):
    if args.targets_file:
        try:
            with open(args.targets_file) as f:
                found = [l.strip() for l in f if l.strip()]
        except OSError:
            found = []
    else:
        found = list(args.target)
    out = []
    for t in found:
        host, _, port = t.rpartition(":")
        out.append((host, int(port)))
    return out


def attempt(args, ctx, target, msg_id):
    host, port = target
    stage = "connect"
    s = smtplib.SMTP(timeout=SESSION_TIMEOUT, source_address=(args.source, 0))
    # starttls() sends this as SNI; connect() alone leaves it empty.
    s._host = args.tls_name
    try:
        code, _ = s.connect(host, port)
        classify(code, "greeting")
        stage = "ehlo"
        code, _ = s.ehlo("sender.contoso.test")
        classify(code, stage)
        stage = "starttls"
        code, _ = s.starttls(context=ctx)
        classify(code, stage)
        stage = "ehlo-tls"
        code, _ = s.ehlo("sender.contoso.test")
        classify(code, stage)
        stage = "mail"
        code, _ = s.mail(args.mail_from)
        classify(code, stage)
        stage = "rcpt"
        code, _ = s.rcpt(args.rcpt_to)
        classify(code, stage)
        stage = "data"
        s.putcmd("data")
        code, _ = s.getreply()
        if code != 354:
            classify(code if code >= 400 else 554, stage)
        stage = "body"
        body = (
            f"From: <{args.mail_from}>\r\nTo: <{args.rcpt_to}>\r\n"
            f"Subject: rolling upgrade {msg_id}\r\nX-E2E-Id: {msg_id}\r\n"
            f"Message-ID: <{msg_id}@contoso.test>\r\n\r\nmessage {msg_id}\r\n"
        )
        s.send(smtplib.quotedata(body).encode() + b"\r\n.\r\n")
        # From here on the gateway may have accepted the message: a lost connection is
        # ambiguous, which a sender that wants exactly-once delivery cannot resolve.
        stage = "end-of-data"
        code, _ = s.getreply()
        classify(code, stage)
        if code != 250:
            raise Outcome("fail", str(code), stage)
        try:
            s.quit()
        except (smtplib.SMTPException, OSError):
            pass
        return Outcome("ok", "250", stage)
    except Outcome:
        raise
    except (smtplib.SMTPException, OSError) as e:
        label = type(e).__name__
        if stage == "end-of-data":
            raise Outcome("fail", label, stage)
        raise Outcome("retry", label, stage)
    except Exception as e:  # a bug here must fail the run, not end a worker silently
        raise Outcome("fail", f"{type(e).__name__}: {e}", stage)
    finally:
        try:
            s.close()
        except OSError:
            pass


def send(args):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(args.cafile)
    # The chain is verified against the org CA; the name is not, because targets are IPs.
    ctx.check_hostname = False
    ctx.load_cert_chain(args.cert, args.key)

    lock = threading.Lock()
    replies = collections.Counter()  # every attempt's outcome: "250", "421@greeting", ...
    stats = collections.Counter()
    failures = []
    ledger = open(args.ledger, "a")
    started = time.monotonic()

    def worker(w):
        n = 0
        while not os.path.exists(args.stop_file):
            n += 1
            msg_id = f"{args.id_prefix}-{w}-{n}"
            for tries in range(1, MAX_ATTEMPTS + 1):
                ts = targets(args)
                if not ts:
                    with lock:
                        replies["no-target"] += 1
                    time.sleep(RETRY_PAUSE)
                    continue
                target = random.choice(ts)
                try:
                    r = attempt(args, ctx, target, msg_id)
                except Outcome as e:
                    r = e
                with lock:
                    replies[r.label if r.kind == "ok" else f"{r.label}@{r.stage}"] += 1
                    if r.kind == "ok":
                        stats["acked"] += 1
                        stats["retried"] += tries > 1
                        ledger.write(f"{msg_id} {target[0]}:{target[1]} {tries}\n")
                        ledger.flush()
                    elif r.kind == "fail":
                        stats["failed"] += 1
                        failures.append(f"{msg_id} {target[0]}:{target[1]} {r}")
                if r.kind != "retry":
                    break
                time.sleep(RETRY_PAUSE)
            else:
                with lock:
                    stats["gave_up"] += 1
                    failures.append(f"{msg_id}: no 250 after {MAX_ATTEMPTS} attempts")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ledger.close()
    secs = time.monotonic() - started
    summary = {
        "messages": stats["acked"] + stats["failed"] + stats["gave_up"],
        "acked": stats["acked"],
        "retried": stats["retried"],
        "failed": stats["failed"],
        "gave_up": stats["gave_up"],
        "attempts": sum(replies.values()),
        "replies": dict(sorted(replies.items())),
        "seconds": round(secs, 1),
        "per_second": round(stats["acked"] / secs, 1) if secs > 0 else 0,
        "failures": failures[:20],
    }
    with open(args.summary, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    return 0 if not failures else 1


def check(args):
    acked = []
    with open(args.ledger) as f:
        for line in f:
            if line.strip():
                acked.append(line.split()[0])
    seen = collections.Counter()
    for root, _, files in os.walk(args.sink):
        for name in files:
            try:
                with open(os.path.join(root, name), "rb") as f:
                    for line in f:
                        if line.startswith(b"X-E2E-Id: "):
                            seen[line[10:].strip().decode(errors="replace")] += 1
            except OSError:
                continue
    missing = [i for i in acked if seen[i] == 0]
    dups = sum(1 for i in set(acked) if seen[i] > 1)
    print(json.dumps({"acked": len(acked), "found": len(acked) - len(missing),
                      "missing": len(missing), "duplicates": dups, "missing_ids": missing[:10]}))
    return 1 if missing else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send")
    s.add_argument("--target", action="append", default=[])
    s.add_argument("--targets-file")
    s.add_argument("--source", required=True)
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--cafile", required=True)
    s.add_argument("--from", dest="mail_from", required=True)
    s.add_argument("--to", dest="rcpt_to", required=True)
    s.add_argument("--tls-name", default="mx.org.test", help="SNI sent with STARTTLS")
    s.add_argument("--workers", type=int, default=4)
    s.add_argument("--stop-file", required=True)
    s.add_argument("--ledger", required=True)
    s.add_argument("--summary", required=True)
    s.add_argument("--id-prefix", default="roll")
    c = sub.add_parser("check")
    c.add_argument("--ledger", required=True)
    c.add_argument("--sink", required=True)
    args = p.parse_args()
    if args.cmd == "send":
        if not args.target and not args.targets_file:
            p.error("send needs --target or --targets-file")
        return send(args)
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
