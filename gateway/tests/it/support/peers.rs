//! Real SMTP clients: swaks, `openssl s_client -starttls smtp` and Python smtplib. Each returns
//! a [`Transcript`] of (command, reply) pairs for assertions.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use super::smtp::{Reply, Transcript};
use super::{CertPair, require_tool};

/// Builder for one swaks run.
pub struct Swaks {
    server: SocketAddr,
    args: Vec<String>,
}

impl Swaks {
    pub fn new(server: SocketAddr) -> Swaks {
        Swaks {
            server,
            args: vec!["--helo".into(), "client.test".into()],
        }
    }

    fn arg(mut self, a: &str, v: impl Into<String>) -> Swaks {
        self.args.push(a.into());
        self.args.push(v.into());
        self
    }

    pub fn from(self, f: &str) -> Swaks {
        self.arg("--from", f)
    }

    /// Recipients, comma separated for several.
    pub fn to(self, t: &str) -> Swaks {
        self.arg("--to", t)
    }

    /// Source address (`--local-interface`), a 127.x address.
    pub fn local(self, ip: Ipv4Addr) -> Swaks {
        self.arg("--local-interface", ip.to_string())
    }

    /// STARTTLS required.
    pub fn tls(mut self) -> Swaks {
        self.args.push("--tls".into());
        self
    }

    pub fn cert(self, pair: &CertPair) -> Swaks {
        let key = pair.key.display().to_string();
        self.arg("--tls-cert", pair.cert.display().to_string())
            .arg("--tls-key", key)
    }

    /// Adds a header (`--add-header`), keeping swaks' own.
    pub fn header(self, h: &str) -> Swaks {
        self.arg("--add-header", h)
    }

    /// Sets a header, replacing swaks' own of that name (`--header`).
    pub fn set_header(self, h: &str) -> Swaks {
        self.arg("--header", h)
    }

    pub fn run(self) -> Transcript {
        let swaks = require_tool("swaks");
        let out = Command::new("sh")
            .arg("-c")
            .arg("exec \"$0\" \"$@\" 2>&1")
            .arg(swaks)
            .arg("--server")
            .arg(self.server.to_string())
            .arg("--timeout")
            .arg("20")
            .arg("--suppress-data")
            .args(&self.args)
            .stdin(Stdio::null())
            .output()
            .expect("run swaks");
        let raw = String::from_utf8_lossy(&out.stdout).into_owned();
        parse_swaks(&raw)
    }
}

/// Parses a swaks transcript: ` -> `/` ~> ` client lines, `<- `/`<~ `/`<**`/`<~*` server lines.
pub fn parse_swaks(raw: &str) -> Transcript {
    let mut steps = Vec::new();
    let mut cmd = String::new();
    let mut lines: Vec<String> = Vec::new();
    let flush = |cmd: &str, lines: &mut Vec<String>, steps: &mut Vec<(String, Reply)>| {
        if let Some(r) = Reply::parse(lines) {
            steps.push((cmd.to_string(), r));
        }
        lines.clear();
    };
    for l in raw.lines() {
        if l.starts_with(" -> ") || l.starts_with(" ~> ") {
            flush(&cmd, &mut lines, &mut steps);
            cmd = l[4..].to_string();
            // `--suppress-data` prints the message as " -> N lines sent".
            if cmd.ends_with(" lines sent") {
                cmd = ".".into();
            }
        } else if l.starts_with('<') && l.len() >= 4 {
            lines.push(l[4..].to_string());
            let s = &l[4..];
            if s.len() < 4 || s.as_bytes()[3] != b'-' {
                flush(&cmd, &mut lines, &mut steps);
            }
        }
    }
    flush(&cmd, &mut lines, &mut steps);
    Transcript {
        steps,
        raw: raw.to_string(),
    }
}

/// `openssl s_client -starttls smtp` driven step by step.
pub struct Openssl {
    server: SocketAddr,
    ca: PathBuf,
    cert: Option<CertPair>,
    version: Option<&'static str>,
    name: String,
}

impl Openssl {
    pub fn new(server: SocketAddr, ca: &Path) -> Openssl {
        Openssl {
            server,
            ca: ca.to_path_buf(),
            cert: None,
            version: None,
            name: "gateway.test".into(),
        }
    }

    /// The name the server certificate is verified against (default `gateway.test`).
    pub fn server_name(mut self, name: &str) -> Openssl {
        self.name = name.into();
        self
    }

    pub fn cert(mut self, pair: &CertPair) -> Openssl {
        self.cert = Some(pair.clone());
        self
    }

    /// `"1.2"` or `"1.3"`: offer only that TLS version.
    pub fn tls_version(mut self, v: &'static str) -> Openssl {
        self.version = Some(v);
        self
    }

    /// Runs the steps after STARTTLS. Each step is sent line by line (multi-line steps, such as
    /// a message body ending in `.`, get one reply). Stops at EOF.
    pub fn run(self, steps: &[&str]) -> Transcript {
        let openssl = require_tool("openssl");
        let mut cmd = Command::new(openssl);
        cmd.args(["s_client", "-starttls", "smtp", "-name", "client.test"])
            .arg("-connect")
            .arg(self.server.to_string())
            .args(["-servername", &self.name, "-verify_hostname", &self.name])
            .arg("-CAfile")
            .arg(&self.ca)
            .args(["-verify_return_error", "-quiet", "-crlf", "-nocommands"]);
        match self.version {
            Some("1.2") => {
                cmd.arg("-tls1_2");
            }
            Some("1.3") => {
                cmd.arg("-tls1_3");
            }
            _ => {}
        }
        if let Some(c) = &self.cert {
            cmd.arg("-cert").arg(&c.cert).arg("-key").arg(&c.key);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn openssl");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l.trim_end_matches('\r').to_string()).is_err() {
                    break;
                }
            }
        });
        let mut stdin = child.stdin.take().expect("stdin");
        let mut transcript = Transcript::default();
        'steps: for step in steps {
            for line in step.split('\n') {
                if writeln!(stdin, "{line}").is_err() {
                    break 'steps;
                }
            }
            let _ = stdin.flush();
            let mut lines = Vec::new();
            loop {
                match rx.recv_timeout(Duration::from_secs(20)) {
                    Ok(l) => {
                        transcript.raw.push_str(&format!("<- {l}\n"));
                        let last = l.len() >= 3
                            && l.as_bytes()[..3].iter().all(u8::is_ascii_digit)
                            && (l.len() == 3 || l.as_bytes()[3] == b' ');
                        let is_reply =
                            l.len() >= 4 && l.as_bytes()[..3].iter().all(u8::is_ascii_digit);
                        if is_reply {
                            lines.push(l);
                        }
                        if last {
                            break;
                        }
                    }
                    Err(_) => break 'steps,
                }
            }
            let name = if step.ends_with("\n.") || *step == "." {
                ".".to_string()
            } else {
                step.to_string()
            };
            transcript.raw.push_str(&format!("-> {name}\n"));
            if let Some(r) = Reply::parse(&lines) {
                transcript.steps.push((name, r));
            }
        }
        drop(stdin);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let out = child.wait_with_output().expect("openssl output");
        transcript.raw.push_str("---- openssl stderr ----\n");
        transcript
            .raw
            .push_str(&String::from_utf8_lossy(&out.stderr));
        transcript
    }
}

/// Python smtplib through `python3 -c`.
pub struct Python {
    server: SocketAddr,
    source: Option<Ipv4Addr>,
    starttls: bool,
    ca: Option<PathBuf>,
    cert: Option<CertPair>,
    tls12: bool,
}

const PY: &str = r#"
import json, smtplib, ssl, sys
a = json.loads(sys.argv[1])
steps = []
def rec(cmd, r):
    msg = r[1].decode('utf-8', 'replace') if isinstance(r[1], bytes) else str(r[1])
    steps.append([cmd, r[0], msg])
try:
    src = (a['source'], 0) if a.get('source') else None
    s = smtplib.SMTP(local_hostname='client.test', timeout=20, source_address=src)
    rec('', s.connect(a['host'], a['port']))
    rec('EHLO', s.ehlo())
    if a['starttls']:
        ctx = ssl.create_default_context(cafile=a['ca'])
        if a.get('tls12'):
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if a.get('cert'):
            ctx.load_cert_chain(a['cert'], a['key'])
        s._host = 'gateway.test'
        rec('STARTTLS', s.starttls(context=ctx))
        rec('EHLO', s.ehlo())
    utf8 = not all(x.isascii() for x in [a['from']] + a['to'])
    r = s.mail(a['from'], ['SMTPUTF8'] if utf8 else [])
    rec('MAIL FROM', r)
    if r[0] == 250:
        ok = 0
        for t in a['to']:
            r = s.rcpt(t)
            rec('RCPT TO', r)
            ok += r[0] in (250, 251)
        if ok:
            try:
                rec('.', s.data(a['data'].encode()))
            except smtplib.SMTPDataError as e:
                rec('DATA', (e.smtp_code, e.smtp_error))
    try:
        rec('QUIT', s.quit())
    except Exception:
        pass
except Exception as e:
    steps.append(['ERROR', 0, type(e).__name__ + ': ' + str(e)])
print(json.dumps(steps))
"#;

impl Python {
    pub fn new(server: SocketAddr) -> Python {
        Python {
            server,
            source: None,
            starttls: false,
            ca: None,
            cert: None,
            tls12: false,
        }
    }

    pub fn local(mut self, ip: Ipv4Addr) -> Python {
        self.source = Some(ip);
        self
    }

    /// STARTTLS, verifying the gateway's certificate against `ca` as `gateway.test`.
    pub fn starttls(mut self, ca: &Path) -> Python {
        self.starttls = true;
        self.ca = Some(ca.to_path_buf());
        self
    }

    pub fn cert(mut self, pair: &CertPair) -> Python {
        self.cert = Some(pair.clone());
        self
    }

    /// TLS 1.2 at most (to meet a connector's `minTlsVersion`).
    pub fn tls12(mut self) -> Python {
        self.tls12 = true;
        self
    }

    pub fn send(self, from: &str, to: &[&str], data: &str) -> Transcript {
        let args = json!({
            "host": self.server.ip().to_string(),
            "port": self.server.port(),
            "source": self.source.map(|s| s.to_string()),
            "starttls": self.starttls,
            "ca": self.ca,
            "cert": self.cert.as_ref().map(|c| &c.cert),
            "key": self.cert.as_ref().map(|c| &c.key),
            "tls12": self.tls12,
            "from": from,
            "to": to,
            "data": data,
        });
        run_python_smtp(PY, &args)
    }
}

/// Runs a Python smtplib `script` with `args` as JSON in argv[1]; the script prints a JSON list
/// of `[command, code, message]` (a `cmd` of `ERROR` is a client-side error, kept in `raw`).
fn run_python_smtp(script: &str, args: &serde_json::Value) -> Transcript {
    let out = Command::new(require_tool("python3"))
        .arg("-c")
        .arg(script)
        .arg(args.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let raw = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let steps: Vec<(String, u16, String)> = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("python smtplib output is not JSON ({e}): {raw}"));
    let mut t = Transcript {
        steps: Vec::new(),
        raw,
    };
    for (cmd, code, msg) in steps {
        if cmd == "ERROR" {
            t.raw.push_str(&format!("\nclient error: {msg}"));
            continue;
        }
        let mut lines: Vec<String> = msg.lines().map(str::to_string).collect();
        if lines.is_empty() {
            lines.push(String::new());
        }
        t.steps.push((cmd, Reply { code, lines }));
    }
    t
}
