//! msmtp (Debian `msmtp`, GnuTLS) as a plain SMTP client of the gateway: one message per run,
//! everything given on the command line (an empty config file of the test's own, so no
//! ~/.msmtprc or /etc/msmtprc is read), from a source address of the test's block.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::{CertPair, require_tool};

pub struct Msmtp {
    server: SocketAddr,
    source: Option<Ipv4Addr>,
    /// STARTTLS, the gateway verified against this CA as `gateway.test`.
    ca: Option<PathBuf>,
    cert: Option<CertPair>,
}

/// What msmtp reported: its exit status and everything it printed (the server's refusal is
/// quoted there as `server message: …`).
#[derive(Debug)]
pub struct MsmtpRun {
    pub success: bool,
    pub output: String,
}

impl Msmtp {
    pub fn new(server: SocketAddr) -> Msmtp {
        Msmtp {
            server,
            source: None,
            ca: None,
            cert: None,
        }
    }

    pub fn source(mut self, ip: Ipv4Addr) -> Msmtp {
        self.source = Some(ip);
        self
    }

    pub fn starttls(mut self, ca: &std::path::Path) -> Msmtp {
        self.ca = Some(ca.to_path_buf());
        self
    }

    pub fn cert(mut self, pair: &CertPair) -> Msmtp {
        self.cert = Some(pair.clone());
        self
    }

    pub fn send(self, from: &str, to: &str, message: &str) -> MsmtpRun {
        let msmtp = require_tool("msmtp");
        let dir = tempfile::Builder::new()
            .prefix("pg-msmtp-")
            .tempdir()
            .expect("tempdir");
        let conf = dir.path().join("msmtprc");
        std::fs::write(&conf, "").expect("write msmtprc");
        super::pki::set_mode(&conf, 0o600);
        let mut cmd = Command::new(msmtp);
        cmd.arg(format!("--file={}", conf.display()))
            .arg(format!("--host={}", self.server.ip()))
            .arg(format!("--port={}", self.server.port()))
            .arg("--domain=mail.contoso.com")
            .arg("--auth=off")
            .arg(format!("--from={from}"));
        if let Some(ip) = self.source {
            cmd.arg(format!("--source-ip={ip}"));
        }
        match &self.ca {
            Some(ca) => {
                cmd.arg("--tls=on")
                    .arg("--tls-starttls=on")
                    .arg(format!("--tls-trust-file={}", ca.display()))
                    // Reached by IP; the certificate names gateway.test.
                    .arg("--tls-host-override=gateway.test");
            }
            None => {
                cmd.arg("--tls=off");
            }
        }
        if let Some(c) = &self.cert {
            cmd.arg(format!("--tls-cert-file={}", c.cert.display()))
                .arg(format!("--tls-key-file={}", c.key.display()));
        }
        cmd.arg("--").arg(to);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start msmtp");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(message.as_bytes())
            .expect("write message to msmtp");
        let out = child.wait_with_output().expect("msmtp output");
        MsmtpRun {
            success: out.status.success(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}
