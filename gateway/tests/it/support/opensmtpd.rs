//! A private OpenSMTPD (Debian `opensmtpd` 6.8.0p2) playing a partner's sending MTA: relays
//! everything injected to the gateway, listening only on a loopback address of the test's own
//! block, run in the foreground (`-d`), its log read from its stderr, stopped when dropped.
//! Never the system MTA.
//!
//! The package conflicts with Postfix (both are `mail-transport-agent`), so
//! tests/scripts/install-deps.sh unpacks it under [`SMTPD`] and creates its privilege-separation
//! users and root-owned chroot (/var/lib/opensmtpd/empty). Its spool (/var/spool/smtpd), control
//! socket (/var/run/smtpd.sock) and CA bundle are compiled-in paths, so the instance runs in a
//! mount namespace of its own (`unshare -m`, tests run as root) where /var/spool and /run are
//! the tempdir's, /etc/hosts names the gateway `gateway.test` (the name in its certificate, so
//! OpenSMTPD's default verification of `smtp+tls://` relays checks it) and the CA bundle is the
//! test PKI's CA. Nothing outside the namespace is changed.
//!
//! Not covered: client certificates (`relay … pki`) and a TLS listener. With Debian 12's
//! OpenSSL 3 the privilege-separated key operations of 6.8.0p2 fail (`SSL routines::EVP lib`,
//! `missing private key`; upstream OpenSMTPD issues #1171 and #1239), so OpenSMTPD can neither
//! present a client certificate nor serve STARTTLS; see docs/interop.md.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::exim::greets;
use super::net::free_port;
use super::postfix::Delivery;
use super::smtp::inject;
use super::{require_tool, wait_for};

/// The unpacked `opensmtpd` daemon (see tests/scripts/install-deps.sh).
pub const SMTPD: &str = "/opt/partnergate-peers/opensmtpd/usr/sbin/smtpd";

#[derive(Debug, Clone)]
pub struct SmtpdSender {
    /// Listener (injection) and source address of relayed sessions (`src`).
    pub ip: Ipv4Addr,
    /// The gateway, reached as `gateway.test`.
    pub relay: SocketAddr,
    /// `smtp+tls://` (mandatory STARTTLS, certificate verified against `ca` for gateway.test);
    /// `None` = `smtp+notls://`.
    pub ca: Option<PathBuf>,
    /// Recipient domain relayed to the gateway (bounces to the sender's domain match no rule
    /// and are not relayed).
    pub relay_domain: String,
}

pub struct OpenSmtpd {
    dir: TempDir,
    child: Child,
    pub listen: SocketAddr,
}

impl OpenSmtpd {
    pub fn start_sender(opts: SmtpdSender) -> OpenSmtpd {
        assert!(
            Path::new(SMTPD).is_file(),
            "{SMTPD} is missing: run `make deps` (tests/scripts/install-deps.sh unpacks opensmtpd \
             there)"
        );
        let unshare = require_tool("unshare");
        let listen = SocketAddr::from((opts.ip, free_port(opts.ip)));
        let dir = tempfile::Builder::new()
            .prefix("pg-opensmtpd-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        super::pki::set_mode(d, 0o755);
        // /var/spool inside the namespace: smtpd creates and owns smtpd/ below it.
        for sub in ["var-spool", "var-spool/smtpd", "run"] {
            std::fs::create_dir(d.join(sub)).expect("mkdir");
            super::pki::set_mode(&d.join(sub), 0o755);
        }
        super::pki::set_mode(&d.join("var-spool/smtpd"), 0o711);
        std::fs::write(
            d.join("hosts"),
            format!("127.0.0.1 localhost\n{} gateway.test\n", opts.relay.ip()),
        )
        .expect("write hosts");
        let ca = d.join("ca.crt");
        match &opts.ca {
            Some(path) => std::fs::copy(path, &ca).map(|_| ()),
            None => std::fs::write(&ca, ""),
        }
        .expect("write CA bundle");
        let (proto, tls) = match opts.ca {
            Some(_) => ("smtp+tls", "STARTTLS"),
            None => ("smtp+notls", "plaintext"),
        };
        let conf = d.join("smtpd.conf");
        std::fs::write(
            &conf,
            format!(
                "# partner sender, {tls} to the gateway
listen on {ip} port {port}
action \"gateway\" relay host {proto}://gateway.test:{gport} helo mail.contoso.com src {ip}
match from src 127.0.0.0/8 for domain \"{domain}\" action \"gateway\"
",
                ip = opts.ip,
                port = listen.port(),
                gport = opts.relay.port(),
                domain = opts.relay_domain,
            ),
        )
        .expect("write smtpd.conf");
        let script = format!(
            "set -e
mount --bind {d}/var-spool /var/spool
mount --bind {d}/run /run
mount --bind {d}/hosts /etc/hosts
mount --bind {d}/ca.crt /etc/ssl/certs/ca-certificates.crt
exec {SMTPD} -d -f {conf}",
            d = d.display(),
            conf = conf.display(),
        );
        let log = std::fs::File::create(d.join("log")).expect("log file");
        let child = Command::new(unshare)
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start opensmtpd");
        let mut s = OpenSmtpd { dir, child, listen };
        wait_for(Duration::from_secs(20), "opensmtpd greeting", || {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("opensmtpd exited ({status}):\n{}", s.log());
            }
            greets(listen).then_some(())
        });
        s
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Injects a message over SMTP; returns OpenSMTPD's message id (8 hex digits, the first
    /// half of its envelope ids).
    pub fn submit(&self, from: &str, to: &str, body: &str) -> String {
        let end = inject(self.listen, "opensmtpd", || self.log(), from, to, body);
        // "250 2.0.0 2ac54a45 Message accepted for delivery"
        end.text()
            .split_whitespace()
            .find(|w| w.len() == 8 && w.chars().all(|c| c.is_ascii_hexdigit()))
            .unwrap_or_else(|| panic!("no message id in {end}"))
            .to_string()
    }

    /// Waits (guard: 60 s) for the first relay attempt of message `id` to `rcpt`:
    /// `mta delivery evpid=<id>… to=<rcpt> … result="Ok"|"PermFail"|"TempFail" stat="…"`,
    /// reported as `sent`, `bounced` or `deferred` with the `stat` as detail.
    pub fn wait_delivery(&self, id: &str, rcpt: &str) -> Delivery {
        wait_for(
            Duration::from_secs(60),
            &format!("opensmtpd delivery attempt of {id} to {rcpt}"),
            || {
                self.log().lines().find_map(|line| {
                    if !(line.contains(" mta delivery evpid=")
                        && line.contains(&format!("evpid={id}"))
                        && line.contains(&format!("to=<{rcpt}>")))
                    {
                        return None;
                    }
                    let result = line.split("result=\"").nth(1)?.split('"').next()?;
                    let status = match result {
                        "Ok" => "sent",
                        "PermFail" => "bounced",
                        "TempFail" => "deferred",
                        other => other,
                    };
                    let detail = line.split("stat=\"").nth(1).unwrap_or("");
                    Some(Delivery {
                        status: status.to_string(),
                        detail: detail.trim_end_matches('"').to_string(),
                        line: line.to_string(),
                    })
                })
            },
        )
    }
}

impl Drop for OpenSmtpd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- opensmtpd log ({}) ----\n{}\n---- end ----",
                self.listen,
                self.log()
            );
        }
        // The child is smtpd itself (unshare and sh exec it); SIGTERM makes it stop its
        // privilege-separated processes; the namespace and its mounts go with the last of them.
        // SAFETY: kill(2) on the pid of a child this struct spawned and has not reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
