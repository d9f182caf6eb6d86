//! A private Postfix instance playing a partner's MTA: its own config directory, queue and
//! data directories in a tempdir, logging to a file there, listening only on a loopback port of
//! the test's own block (never port 25), relaying everything to the gateway.
//!
//! Running it as root with `postfix -c DIR start` needs: `maillog_file_prefixes` covering the
//! tempdir (else Postfix dies before it can log why), `inet_interfaces` naming an address that
//! exists on an interface (127.0.0.1; the smtpd listener and `smtp_bind_address` use the
//! test's own 127.x addresses), a `data_directory` owned by `mail_owner`, and directories the
//! `postfix` user can traverse. Mail is injected over SMTP into the instance's smtpd listener
//! (no sendmail/postdrop, which refuse unregistered config directories).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::net::free_port;
use super::smtp::inject;
use super::{CertPair, require_tool, wait_for};

#[derive(Debug, Clone)]
pub struct PostfixOptions {
    /// Address the smtpd listener binds (mail is injected there).
    pub listen_ip: Ipv4Addr,
    /// Source address of Postfix's SMTP client towards the gateway (`smtp_bind_address`).
    pub bind: Ipv4Addr,
    /// The gateway (`relayhost = [ip]:port`).
    pub relay: SocketAddr,
    /// `smtp_tls_security_level`: `may`, `encrypt`, `verify`, `none`.
    pub tls_level: String,
    /// With `verify`, the name the gateway certificate must match.
    pub verify_name: String,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<CertPair>,
    /// A milter every message passes through (e.g. OpenDKIM signing, support::opendkim).
    pub milter: Option<SocketAddr>,
}

impl PostfixOptions {
    pub fn new(listen_ip: Ipv4Addr, relay: SocketAddr) -> PostfixOptions {
        PostfixOptions {
            listen_ip,
            bind: listen_ip,
            relay,
            tls_level: "encrypt".into(),
            verify_name: "gateway.test".into(),
            ca_file: None,
            client_cert: None,
            milter: None,
        }
    }
}

/// A delivery attempt as Postfix logged it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// `sent`, `deferred` or `bounced`.
    pub status: String,
    /// The text in parentheses after the status (the remote reply, or Postfix's own reason).
    pub detail: String,
    pub line: String,
}

pub struct Postfix {
    dir: TempDir,
    conf: PathBuf,
    pub listen: SocketAddr,
    log: PathBuf,
}

fn postfix_ids() -> (u32, u32) {
    let id = |args: &[&str]| -> u32 {
        let out = Command::new("id").args(args).output().expect("run id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| {
                panic!(
                    "no `postfix` user: run `make deps` (installs postfix without configuring it)"
                )
            })
    };
    (id(&["-u", "postfix"]), id(&["-g", "postfix"]))
}

/// A private instance's directory (conf/, queue/, data/ owned by the postfix user, maillog),
/// readable by Postfix's unprivileged processes.
fn instance_dir(prefix: &str) -> TempDir {
    let (uid, gid) = postfix_ids();
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir");
    let d = dir.path();
    super::pki::set_mode(d, 0o755);
    for sub in ["conf", "queue", "data"] {
        let p = d.join(sub);
        std::fs::create_dir(&p).expect("mkdir");
        super::pki::set_mode(&p, 0o755);
    }
    std::os::unix::fs::chown(d.join("data"), Some(uid), Some(gid)).expect("chown data dir");
    dir
}

impl Postfix {
    /// Writes `main` and the master.cf every instance shares (smtpd on `listen`), starts the
    /// instance and waits (guard: 20 s) until smtpd accepts connections.
    fn launch(
        dir: TempDir,
        conf: PathBuf,
        listen: SocketAddr,
        log: PathBuf,
        main: &str,
    ) -> Postfix {
        let postfix = require_tool("postfix");
        std::fs::write(conf.join("main.cf"), main).expect("write main.cf");
        let master = format!(
            "{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"
        );
        std::fs::write(conf.join("master.cf"), master).expect("write master.cf");

        let out = Command::new(&postfix)
            .arg("-c")
            .arg(&conf)
            .arg("start")
            .output()
            .expect("run postfix start");
        let pf = Postfix {
            dir,
            conf,
            listen,
            log,
        };
        if !out.status.success() {
            panic!(
                "postfix -c {} start failed ({}): {}{}\nmaillog:\n{}",
                pf.conf.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                pf.maillog()
            );
        }
        wait_for(Duration::from_secs(20), "postfix smtpd listener", || {
            std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200))
                .ok()
                .map(|_| ())
        });
        pf
    }
}

impl Postfix {
    pub fn start(opts: PostfixOptions) -> Postfix {
        let dir = instance_dir("pg-postfix-");
        let d = dir.path();
        let (conf, queue, data, log) = (
            d.join("conf"),
            d.join("queue"),
            d.join("data"),
            d.join("maillog"),
        );
        let port = free_port(opts.listen_ip);
        let listen = SocketAddr::from((opts.listen_ip, port));
        let relay = opts.relay;

        let mut main = format!(
            "compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {log}
maillog_file_prefixes = {d}
myhostname = mail.contoso.com
mydomain = contoso.com
myorigin = contoso.com
mydestination =
local_recipient_maps =
local_transport = error:local delivery disabled
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
relayhost = [{rip}]:{rport}
smtp_bind_address = {bind}
smtp_dns_support_level = disabled
smtp_tls_security_level = {level}
smtp_tls_loglevel = 1
smtp_tls_session_cache_database =
smtp_connect_timeout = 10s
smtp_helo_timeout = 20s
biff = no
",
            queue = queue.display(),
            data = data.display(),
            log = log.display(),
            d = d.display(),
            rip = relay.ip(),
            rport = relay.port(),
            bind = opts.bind,
            level = opts.tls_level,
        );
        if opts.tls_level == "verify" {
            let policy = conf.join("tls_policy");
            std::fs::write(
                &policy,
                format!(
                    "[{}]:{} verify match={}\n",
                    relay.ip(),
                    relay.port(),
                    opts.verify_name
                ),
            )
            .expect("write tls_policy");
            main.push_str(&format!(
                "smtp_tls_policy_maps = texthash:{}\n",
                policy.display()
            ));
        }
        if let Some(ca) = &opts.ca_file {
            main.push_str(&format!("smtp_tls_CAfile = {}\n", ca.display()));
        }
        if let Some(c) = &opts.client_cert {
            main.push_str(&format!(
                "smtp_tls_cert_file = {}\nsmtp_tls_key_file = {}\n",
                c.cert.display(),
                c.key.display()
            ));
        }
        if let Some(m) = opts.milter {
            // A milter that cannot be reached defers the mail instead of passing it unsigned.
            main.push_str(&format!(
                "smtpd_milters = inet:{}:{}\nnon_smtpd_milters = $smtpd_milters\nmilter_default_action = tempfail\n",
                m.ip(),
                m.port()
            ));
        }
        Postfix::launch(dir, conf, listen, log, &main)
    }

    pub fn maillog(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Injects a message into the instance over SMTP; returns Postfix's queue id.
    pub fn submit(&self, from: &str, to: &str, body: &str) -> String {
        let end = inject(self.listen, "postfix", || self.maillog(), from, to, body);
        end.text()
            .rsplit(' ')
            .next()
            .expect("queue id")
            .trim()
            .to_string()
    }

    /// Waits (guard: 60 s) for the first delivery attempt of `queue_id` to `rcpt`.
    pub fn wait_delivery(&self, queue_id: &str, rcpt: &str) -> Delivery {
        let needle = format!("{queue_id}: to=<{rcpt}>");
        wait_for(
            Duration::from_secs(60),
            &format!("postfix delivery attempt {needle}"),
            || {
                self.maillog()
                    .lines()
                    .find(|l| l.contains(&needle) && l.contains("status="))
                    .map(|line| {
                        let after = line.split("status=").nth(1).unwrap_or("");
                        let status = after.split([' ', ',']).next().unwrap_or("").to_string();
                        let detail = after
                            .find('(')
                            .map(|i| after[i + 1..].trim_end_matches(')').to_string())
                            .unwrap_or_default();
                        Delivery {
                            status,
                            detail,
                            line: line.to_string(),
                        }
                    })
            },
        )
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- postfix maillog ({}) ----\n{}\n---- end ----",
                self.listen,
                self.maillog()
            );
        }
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(&self.conf)
            .arg("stop")
            .output();
        // `stop` signals the master; make sure it is gone before the tempdir is removed.
        let pid_file = self.dir.path().join("queue/pid/master.pid");
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if let Some(pid) = pid {
            // A zombie (state Z) is gone for our purposes.
            let gone = || {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true)
            };
            let start = std::time::Instant::now();
            while !gone() && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if !gone() {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status();
            }
        }
    }
}

/// A private Postfix playing a partner's *receiving* server (the gateway's Outbound next hop):
/// smtpd on `listen`, mail for `relay_domains` accepted and handed to the `discard` transport
/// (logged `status=sent`), everything else refused. STARTTLS is offered with `server_cert`
/// (none = no STARTTLS at all); a client certificate is asked for (`smtpd_tls_ask_ccert`) and
/// verified against `client_ca`, so the log says `Trusted TLS connection established` when the
/// gateway presents one from that CA; `smtpd_tls_loglevel = 2` also logs its `subject_CN=…`.
#[derive(Debug, Clone)]
pub struct ReceiverOptions {
    pub listen: SocketAddr,
    pub relay_domains: Vec<String>,
    pub server_cert: Option<CertPair>,
    pub client_ca: Option<PathBuf>,
    pub hostname: String,
}

impl ReceiverOptions {
    pub fn new(listen: SocketAddr, relay_domains: &[&str]) -> ReceiverOptions {
        ReceiverOptions {
            listen,
            relay_domains: relay_domains.iter().map(|d| d.to_string()).collect(),
            server_cert: None,
            client_ca: None,
            hostname: "mx.partner.test".into(),
        }
    }
}

/// One message the receiving Postfix accepted, as its log tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub queue_id: String,
    pub from: String,
    /// The smtpd session that received it had completed STARTTLS.
    pub tls: bool,
    /// `Anonymous`, `Untrusted` or `Trusted` (the client certificate), when `tls`.
    pub tls_trust: Option<String>,
    /// `discard` delivery logged `status=sent`.
    pub delivered: bool,
    /// The recipients `discard` logged `status=sent` for, in log order.
    pub recipients: Vec<String>,
}

impl Postfix {
    /// Starts a receiving-server instance (see [`ReceiverOptions`]).
    pub fn start_receiver(opts: ReceiverOptions) -> Postfix {
        let dir = instance_dir("pg-postfix-rx-");
        let d = dir.path();
        let (conf, queue, data, log) = (
            d.join("conf"),
            d.join("queue"),
            d.join("data"),
            d.join("maillog"),
        );
        let listen = opts.listen;
        let mut main = format!(
            "compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {log}
maillog_file_prefixes = {d}
myhostname = {host}
mydestination =
local_recipient_maps =
local_transport = error:local delivery disabled
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.255.255.255/32
relay_domains = {domains}
relay_recipient_maps =
relay_transport = discard
default_transport = discard
smtpd_relay_restrictions = permit_auth_destination, reject
smtpd_peername_lookup = no
smtpd_tls_loglevel = 2
smtpd_tls_ask_ccert = yes
smtpd_tls_session_cache_database =
smtp_dns_support_level = disabled
biff = no
",
            queue = queue.display(),
            data = data.display(),
            log = log.display(),
            d = d.display(),
            host = opts.hostname,
            domains = opts.relay_domains.join(", "),
        );
        match &opts.server_cert {
            Some(c) => main.push_str(&format!(
                "smtpd_tls_security_level = may\nsmtpd_tls_cert_file = {}\nsmtpd_tls_key_file = {}\n",
                c.cert.display(),
                c.key.display()
            )),
            None => main.push_str("smtpd_tls_security_level = none\n"),
        }
        if let Some(ca) = &opts.client_ca {
            main.push_str(&format!("smtpd_tls_CAfile = {}\n", ca.display()));
        }
        Postfix::launch(dir, conf, listen, log, &main)
    }

    /// Messages a receiving instance accepted, from its log: sender, whether the smtpd session
    /// had TLS (and how the client certificate was judged), and whether `discard` logged
    /// `status=sent`.
    pub fn received(&self) -> Vec<Received> {
        let log = self.maillog();
        // Per smtpd process: the TLS state of its current connection.
        let mut tls_by_pid: std::collections::HashMap<String, Option<String>> =
            std::collections::HashMap::new();
        let mut tls_by_qid: std::collections::HashMap<String, Option<String>> =
            std::collections::HashMap::new();
        let mut out: Vec<Received> = Vec::new();
        for line in log.lines() {
            let Some((prog, rest)) = line.split_once("]: ") else {
                continue;
            };
            let pid = prog.rsplit('[').next().unwrap_or("").to_string();
            if prog.contains("/smtpd[") {
                if rest.starts_with("connect from ") {
                    tls_by_pid.insert(pid.clone(), None);
                } else if let Some((kind, _)) = rest.split_once(" TLS connection established from ")
                {
                    let kind = kind.to_string();
                    tls_by_pid.insert(pid.clone(), Some(kind));
                } else if let Some((qid, _)) = rest.split_once(": client=") {
                    tls_by_qid.insert(
                        qid.to_string(),
                        tls_by_pid.get(&pid).cloned().unwrap_or(None),
                    );
                }
            } else if prog.contains("/qmgr[") {
                if let Some((qid, after)) = rest.split_once(": from=<") {
                    let from = after.split('>').next().unwrap_or("").to_string();
                    let trust = tls_by_qid.get(qid).cloned().unwrap_or(None);
                    if !out.iter().any(|r| r.queue_id == qid) {
                        out.push(Received {
                            queue_id: qid.to_string(),
                            from,
                            tls: trust.is_some(),
                            tls_trust: trust,
                            delivered: false,
                            recipients: Vec::new(),
                        });
                    }
                }
            } else if prog.contains("/discard[")
                && rest.contains("status=sent")
                && let Some((qid, after)) = rest.split_once(": to=<")
                && let Some(r) = out.iter_mut().find(|r| r.queue_id == qid)
            {
                r.delivered = true;
                r.recipients
                    .push(after.split('>').next().unwrap_or("").to_string());
            }
        }
        out
    }

    /// Waits (guard: 30 s) until the message from `from` was delivered to `n` recipients and
    /// returns them, sorted.
    pub fn wait_recipients(&self, from: &str, n: usize) -> Vec<String> {
        wait_for(
            Duration::from_secs(30),
            &format!("partner postfix delivered mail from <{from}> to {n} recipient(s)"),
            || {
                self.received()
                    .into_iter()
                    .filter(|r| r.from == from)
                    .find(|r| r.recipients.len() >= n)
                    .map(|r| {
                        let mut v = r.recipients;
                        v.sort();
                        v
                    })
            },
        )
    }

    /// Waits (guard: 30 s) until the message from `from` was accepted and discarded (`sent`).
    pub fn wait_received(&self, from: &str) -> Received {
        wait_for(
            Duration::from_secs(30),
            &format!("partner postfix delivered mail from <{from}>"),
            || {
                self.received()
                    .into_iter()
                    .find(|r| r.from == from && r.delivered)
            },
        )
    }
}
