//! Helpers of the DANE/MTA-STS suites (issue 15): TLSA record data from certificate files,
//! the metric of the outbound TLS policies, a partner Postfix on port 25 of a test address, and
//! an HTTPS server (Python's `http.server` with `ssl`) serving MTA-STS policy files with a
//! certificate from the partner's CA.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::support::postfix::ReceiverOptions;
use crate::support::{CertPair, Gateway, Postfix, require_tool, wait_for};

/// Whether the partner's Postfix logged a message from `from`.
pub fn received_from(pf: &Postfix, from: &str) -> bool {
    pf.maillog().contains(&format!("from=<{from}>"))
}

fn first_der(pem_file: &Path) -> CertificateDer<'static> {
    CertificateDer::pem_file_iter(pem_file)
        .expect("read PEM")
        .next()
        .expect("a certificate")
        .expect("parse PEM")
}

/// `3 1 1 <sha256 of the leaf's SubjectPublicKeyInfo>` for the first certificate of the file.
pub fn tlsa_ee_spki(cert_file: &Path) -> String {
    let der = first_der(cert_file);
    let (_, c) = X509Certificate::from_der(&der).expect("parse certificate");
    format!(
        "3 1 1 {}",
        hex::encode(Sha256::digest(c.tbs_certificate.subject_pki.raw))
    )
}

/// `2 0 1 <sha256 of the whole CA certificate>`.
pub fn tlsa_ta_cert(ca_file: &Path) -> String {
    format!("2 0 1 {}", hex::encode(Sha256::digest(first_der(ca_file))))
}

/// The value of `partnergate_outbound_tls_policy_total{connector,policy,result}` (0 when the
/// series does not exist).
pub fn policy_count(gw: &Gateway, connector: &str, policy: &str, result: &str) -> u64 {
    let (_, body) = gw.get("/metrics");
    let series = format!(
        "partnergate_outbound_tls_policy_total{{connector=\"{connector}\",policy=\"{policy}\",result=\"{result}\"}} "
    );
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().expect("counter value"))
}

/// Fleet settings of a gateway whose internal senders are the test's block, resolving with
/// the test's DNS server (its root key as trust anchor) and allowed to connect to the block;
/// no validation probes.
pub fn fleet(
    net_cidr: &str,
    dns: &crate::support::dns::DnsServer,
    dir: &Path,
    sts_roots: Option<&Path>,
) -> serde_json::Value {
    let anchor = dir.join("root-anchor.key");
    std::fs::write(&anchor, format!("{}\n", dns.trust_anchor)).expect("write trust anchor");
    let mut tp = serde_json::json!({"dnssecTrustAnchorFile": anchor});
    if let Some(r) = sts_roots {
        tp["mtaStsRootsFile"] = serde_json::json!(r);
    }
    serde_json::json!({
        "internalSenders": {"ipRanges": [net_cidr]},
        "dnsResolver": dns.addr.to_string(),
        "allowPrivateMxAddresses": [net_cidr],
        "tlsPolicy": tp,
        // Probes would add to the policy metric the tests count exactly.
        "validationIntervalSecs": 0,
    })
}

/// A partner MX: Postfix on `ip`:25 presenting `cert` (its file may hold a chain).
pub fn partner_mx(ip: Ipv4Addr, hostname: &str, domains: &[&str], cert: CertPair) -> Postfix {
    let mut opts = ReceiverOptions::new(SocketAddr::from((ip, 25)), domains);
    opts.hostname = hostname.into();
    opts.server_cert = Some(cert);
    Postfix::start_receiver(opts)
}

/// `pair` with the CA certificate appended to its certificate file (so the server presents
/// the chain, as DANE-TA needs: RFC 7671 5.2.2).
pub fn with_chain(pair: &CertPair, ca: &Path, dir: &Path) -> CertPair {
    let chain = format!(
        "{}{}",
        pair.cert_pem,
        std::fs::read_to_string(ca).expect("read CA")
    );
    let path = dir.join(format!(
        "{}-chain.crt",
        pair.cert
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("leaf")
    ));
    std::fs::write(&path, &chain).expect("write chain");
    crate::support::pki::set_mode(&path, 0o644);
    CertPair {
        cert: path,
        key: pair.key.clone(),
        cert_pem: chain,
        key_pem: pair.key_pem.clone(),
    }
}

/// Python's `http.server` over TLS on `ip`:443 (or another port) serving one policy per `Host` (from
/// `root/<host>/.well-known/mta-sts.txt`); each request is logged to stderr, which is kept.
pub struct PolicyServer {
    child: Child,
    pub root: TempDir,
    log: PathBuf,
}

const SERVER: &str = r#"
import http.server, ssl, sys, functools, os
ip, port, cert, key, root = sys.argv[1:6]
class H(http.server.SimpleHTTPRequestHandler):
    def translate_path(self, path):
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        return os.path.join(root, host, path.split("?")[0].lstrip("/"))
    def log_message(self, fmt, *args):
        sys.stderr.write("REQUEST %s %s\n" % (self.headers.get("Host"), fmt % args))
        sys.stderr.flush()
handler = functools.partial(H, directory=root)
httpd = http.server.ThreadingHTTPServer((ip, int(port)), handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
sys.stderr.write("READY\n")
sys.stderr.flush()
httpd.serve_forever()
"#;

impl PolicyServer {
    pub fn start(ip: Ipv4Addr, cert: &CertPair) -> PolicyServer {
        PolicyServer::start_on(ip, 443, cert)
    }

    /// On `port` (the fleet's `tlsPolicy.mtaStsPort`).
    pub fn start_on(ip: Ipv4Addr, port: u16, cert: &CertPair) -> PolicyServer {
        let root = tempfile::Builder::new()
            .prefix("pg-mta-sts-")
            .tempdir()
            .expect("tempdir");
        let log = root.path().join("server.log");
        let child = Command::new(require_tool("python3"))
            .args(["-c", SERVER, &ip.to_string(), &port.to_string()])
            .arg(&cert.cert)
            .arg(&cert.key)
            .arg(root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start python https server");
        let s = PolicyServer { child, root, log };
        wait_for(Duration::from_secs(30), "the MTA-STS HTTPS server", || {
            s.log_text().contains("READY").then_some(())
        });
        s
    }

    /// Serves `body` as the policy of `domain` (at `mta-sts.<domain>`).
    pub fn set_policy(&self, domain: &str, body: &str) {
        let dir = self
            .root
            .path()
            .join(format!("mta-sts.{domain}/.well-known"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("mta-sts.txt"), body).expect("write policy");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Policy requests for `domain` served so far.
    pub fn requests(&self, domain: &str) -> usize {
        let host = format!("REQUEST mta-sts.{domain} ");
        self.log_text()
            .lines()
            .filter(|l| l.starts_with(&host) && l.contains("/.well-known/mta-sts.txt"))
            .count()
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
