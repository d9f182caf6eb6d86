//! A private Exim 4 (Debian `exim4-daemon-light`) playing a partner's MTA, as a sender relaying
//! everything to the gateway or as a receiving server: its own config file (`-C`), spool and
//! log directories in a tempdir, listening only on a loopback address of the test's own block,
//! run in the foreground (`-bdf`) and stopped when dropped. Never the system MTA.
//!
//! The Debian package conflicts with Postfix (both are `mail-transport-agent`), so
//! tests/scripts/install-deps.sh unpacks it under [`EXIM`]; `exim_path` points Exim's re-execs
//! there. Running with `-C` as root, Exim keeps root for the daemon and drops it for deliveries
//! (it notes "exim user lost privilege for using -C option" in its paniclog; harmless here: the
//! smtp transport runs as `Debian-exim` anyway, which owns the spool and log directories).
//! Mail is injected over SMTP into the instance's listener.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::net::free_port;
use super::postfix::{Delivery, ReceiverOptions};
use super::smtp::inject;
use super::{CertPair, wait_for};

/// The unpacked `exim4-daemon-light` binary (see tests/scripts/install-deps.sh).
pub const EXIM: &str = "/opt/partnergate-peers/exim4/usr/sbin/exim4";

/// Whether an SMTP server at `addr` answers a new session with `220` (the session is then
/// closed with QUIT).
pub fn greets(addr: SocketAddr) -> bool {
    use std::io::{BufRead, BufReader, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    if s.set_read_timeout(Some(Duration::from_secs(2))).is_err() {
        return false;
    }
    let mut line = String::new();
    let Ok(reader) = s.try_clone() else {
        return false;
    };
    // A multi-line 220 ends with "220 "; the first line is enough to know the server answers.
    if BufReader::new(reader).read_line(&mut line).is_err() || !line.starts_with("220") {
        return false;
    }
    let _ = s.write_all(b"QUIT\r\n");
    true
}

/// How the sending Exim talks to the gateway.
#[derive(Debug, Clone)]
pub struct EximSender {
    /// Listener (injection) and source address of deliveries (`interface`).
    pub ip: Ipv4Addr,
    /// The gateway.
    pub relay: SocketAddr,
    /// `hosts_require_tls = *` with the gateway's chain verified against `ca`; `None` =
    /// `hosts_avoid_tls = *` (plaintext).
    pub ca: Option<PathBuf>,
    pub client_cert: Option<CertPair>,
}

pub struct Exim {
    dir: TempDir,
    child: Child,
    pub listen: SocketAddr,
}

fn exim_ids() -> (u32, u32) {
    let id = |args: &[&str]| -> u32 {
        let out = Command::new("id").args(args).output().expect("run id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| {
                panic!("no `Debian-exim` user: run `make deps` (tests/scripts/install-deps.sh)")
            })
    };
    (id(&["-u", "Debian-exim"]), id(&["-g", "Debian-exim"]))
}

/// The main-section lines every instance shares.
fn common(d: &Path, host: &str, listen: SocketAddr) -> String {
    format!(
        "exim_path = {EXIM}
primary_hostname = {host}
spool_directory = {d}/spool
log_file_path = {d}/log/%slog
pid_file_path = {d}/exim.pid
exim_user = Debian-exim
exim_group = Debian-exim
local_interfaces = {ip}
daemon_smtp_ports = {port}
host_lookup =
rfc1413_hosts =
keep_environment =
log_selector = +tls_peerdn +tls_certificate_verified +smtp_confirmation +received_recipients \
  +smtp_connection +lost_incoming_connection +smtp_protocol_error +smtp_syntax_error
acl_smtp_rcpt = acl_rcpt
",
        d = d.display(),
        ip = listen.ip(),
        port = listen.port(),
    )
}

impl Exim {
    fn launch(config: impl FnOnce(&Path) -> String, listen: SocketAddr) -> Exim {
        assert!(
            Path::new(EXIM).is_file(),
            "{EXIM} is missing: run `make deps` (tests/scripts/install-deps.sh unpacks \
             exim4-daemon-light there)"
        );
        let (uid, gid) = exim_ids();
        let dir = tempfile::Builder::new()
            .prefix("pg-exim-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        super::pki::set_mode(d, 0o755);
        for sub in ["spool", "log"] {
            std::fs::create_dir(d.join(sub)).expect("mkdir");
            std::os::unix::fs::chown(d.join(sub), Some(uid), Some(gid)).expect("chown");
        }
        let conf = d.join("exim.conf");
        std::fs::write(&conf, config(d)).expect("write exim.conf");
        let out = std::fs::File::create(d.join("stderr")).expect("stderr file");
        let child = Command::new(EXIM)
            .arg("-C")
            .arg(&conf)
            .arg("-bdf")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("start exim");
        let mut exim = Exim { dir, child, listen };
        // Ready = the daemon logged its start and a session gets a 220: a connection taken
        // while the daemon is still setting up can be dropped without a greeting.
        wait_for(Duration::from_secs(20), "exim daemon greeting", || {
            if let Ok(Some(status)) = exim.child.try_wait() {
                panic!(
                    "exim exited ({status}): {}\n{}",
                    exim.file("stderr"),
                    exim.file("log/paniclog")
                );
            }
            (exim.mainlog().contains("daemon started") && greets(listen)).then_some(())
        });
        exim
    }

    /// A partner's sending MTA: everything injected goes to the gateway (`manualroute`), bounces
    /// are dropped (the refusal is read from the log, as the partner's admin would).
    pub fn start_sender(opts: EximSender) -> Exim {
        let listen = SocketAddr::from((opts.ip, free_port(opts.ip)));
        Exim::launch(
            |d| {
                let mut c = common(d, "mail.contoso.com", listen);
                c.push_str(
                    "qualify_domain = contoso.com
tls_advertise_hosts =
begin acl
acl_rcpt:
  accept hosts = 127.0.0.0/8
  deny
begin routers
drop_bounces:
  driver = redirect
  senders = :
  data = :blackhole:
gateway:
  driver = manualroute
",
                );
                c.push_str(&format!(
                    "  route_list = * {gw}
  self = send
  transport = to_gateway
begin transports
to_gateway:
  driver = smtp
  port = {port}
  interface = {ip}
",
                    gw = opts.relay.ip(),
                    port = opts.relay.port(),
                    ip = opts.ip,
                ));
                match &opts.ca {
                    // No name check: Exim matches the certificate against the routed host
                    // name, and the gateway is reached by IP (its certificate names
                    // gateway.test); the chain is verified.
                    Some(ca) => c.push_str(&format!(
                        "  hosts_require_tls = *
  tls_verify_certificates = {}
  tls_verify_hosts = *
  tls_verify_cert_hostnames =
",
                        ca.display()
                    )),
                    None => c.push_str("  hosts_avoid_tls = *\n"),
                }
                if let Some(cert) = &opts.client_cert {
                    c.push_str(&format!(
                        "  tls_certificate = {}\n  tls_privatekey = {}\n",
                        cert.cert.display(),
                        cert.key.display()
                    ));
                }
                c.push_str("begin retry\n* * F,1h,10m\n");
                c
            },
            listen,
        )
    }

    /// A partner's receiving server: mail for `relay_domains` is accepted and dropped
    /// (`:blackhole:`), everything else refused; STARTTLS offered with `server_cert` (none = no
    /// STARTTLS); a client certificate is asked for and checked against `client_ca`.
    pub fn start_receiver(opts: ReceiverOptions) -> Exim {
        let listen = opts.listen;
        Exim::launch(
            |d| {
                let mut c = common(d, &opts.hostname, listen);
                match &opts.server_cert {
                    Some(cert) => c.push_str(&format!(
                        "tls_advertise_hosts = *\ntls_certificate = {}\ntls_privatekey = {}\n",
                        cert.cert.display(),
                        cert.key.display()
                    )),
                    None => c.push_str("tls_advertise_hosts =\n"),
                }
                if let Some(ca) = &opts.client_ca {
                    c.push_str(&format!(
                        "tls_verify_certificates = {}\ntls_try_verify_hosts = *\n",
                        ca.display()
                    ));
                }
                let domains = opts.relay_domains.join(" : ");
                c.push_str(&format!(
                    "begin acl
acl_rcpt:
  accept domains = {domains}
  deny message = relay not permitted
begin routers
discard:
  driver = redirect
  domains = {domains}
  data = :blackhole:
"
                ));
                c
            },
            listen,
        )
    }

    fn file(&self, rel: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(rel)).unwrap_or_default()
    }

    pub fn mainlog(&self) -> String {
        self.file("log/mainlog")
    }

    /// Injects a message over SMTP; returns Exim's message id.
    pub fn submit(&self, from: &str, to: &str, body: &str) -> String {
        let end = inject(self.listen, "exim", || self.mainlog(), from, to, body);
        // "250 OK id=1xYPiG-00045e-1R"
        end.text()
            .rsplit("id=")
            .next()
            .expect("message id")
            .trim()
            .to_string()
    }

    /// Waits (guard: 60 s) for the first delivery attempt of `id` to `rcpt`: `=>` delivered
    /// (`sent`), `**` failed (`bounced`), `==` deferred.
    pub fn wait_delivery(&self, id: &str, rcpt: &str) -> Delivery {
        wait_for(
            Duration::from_secs(60),
            &format!("exim delivery attempt of {id} to {rcpt}"),
            || {
                self.mainlog().lines().find_map(|line| {
                    let rest = line.split_once(&format!("{id} "))?.1;
                    let status = [("=> ", "sent"), ("** ", "bounced"), ("== ", "deferred")]
                        .iter()
                        .find(|(mark, _)| rest.starts_with(&format!("{mark}{rcpt} ")))?
                        .1;
                    Some(Delivery {
                        status: status.to_string(),
                        detail: rest.to_string(),
                        line: line.to_string(),
                    })
                })
            },
        )
    }

    /// Waits (guard: 30 s) until a message from `from` was received and dropped; returns its
    /// `<=` log line (with `P=esmtps X=<TLS>` when the session had TLS).
    pub fn wait_received(&self, from: &str) -> String {
        wait_for(
            Duration::from_secs(30),
            &format!("partner exim delivered mail from <{from}>"),
            || {
                let log = self.mainlog();
                let arrival = log.lines().find(|l| l.contains(&format!(" <= {from} ")))?;
                let id = arrival.split_whitespace().nth(2)?;
                log.lines()
                    .any(|l| l.contains(&format!("{id} => :blackhole:")))
                    .then(|| arrival.to_string())
            },
        )
    }
}

impl Drop for Exim {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- exim mainlog ({}) ----\n{}\n---- paniclog ----\n{}\n---- stderr ----\n{}\n\
                 ---- end ----",
                self.listen,
                self.mainlog(),
                self.file("log/paniclog"),
                self.file("stderr")
            );
        }
        // SIGTERM lets the daemon remove its pid file; the child handle reaps it.
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
