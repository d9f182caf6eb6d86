//! Launches the real `partnergate-gateway` binary with its two JSON files in a tempdir.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;

use super::net::free_port;
use super::pki::{Pki, material_name};

pub const BIN: &str = env!("CARGO_BIN_EXE_partnergate-gateway");

/// What to start the gateway with.
#[derive(Debug, Clone)]
pub struct GatewaySpec {
    /// Merge patch applied to the default fleet settings (see [`Gateway::default_fleet`]).
    pub fleet: Value,
    /// The connectors file, verbatim.
    pub connectors: Value,
    /// Lay out the connectors directory as the kubelet does (`..data` symlink to a
    /// timestamped directory) instead of a plain file.
    pub kubelet_layout: bool,
    /// The upstream (organisation mail server) address.
    pub upstream: SocketAddr,
    /// Seconds between the periodic config checks (`PARTNERGATE_RELOAD_POLL_SECS`); `None`
    /// keeps the gateway's default.
    pub reload_poll_secs: Option<u64>,
    /// Lines the log queue holds (`PARTNERGATE_LOG_BUFFER_LINES`); `None` keeps the default.
    pub log_buffer_lines: Option<usize>,
}

impl GatewaySpec {
    pub fn new(upstream: SocketAddr, connectors: Value) -> GatewaySpec {
        GatewaySpec {
            fleet: json!({}),
            connectors,
            kubelet_layout: false,
            upstream,
            reload_poll_secs: None,
            log_buffer_lines: None,
        }
    }

    /// Makes the periodic config check so rare that only filesystem events can trigger a reload.
    pub fn reload_by_events_only(mut self) -> GatewaySpec {
        self.reload_poll_secs = Some(3600);
        self
    }

    pub fn fleet(mut self, patch: Value) -> GatewaySpec {
        super::merge_json(&mut self.fleet, &patch);
        self
    }

    pub fn log_buffer_lines(mut self, lines: usize) -> GatewaySpec {
        self.log_buffer_lines = Some(lines);
        self
    }

    pub fn kubelet(mut self) -> GatewaySpec {
        self.kubelet_layout = true;
        self
    }
}

/// A running gateway; killed when dropped (its logs are printed if the test failed).
pub struct Gateway {
    pub smtp: SocketAddr,
    pub admin: SocketAddr,
    dir: TempDir,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    /// While true the test stops reading the gateway's output, as a stalled log collector.
    logs_paused: Arc<(Mutex<bool>, Condvar)>,
    pub fleet_path: PathBuf,
    pub connectors_path: PathBuf,
    connectors_bytes: Vec<u8>,
    kubelet: bool,
    swaps: AtomicU64,
    env: Vec<(&'static str, String)>,
}

/// The bytes written for a connectors file (pretty JSON), whose sha256 is the configHash.
pub fn connectors_bytes(v: &Value) -> Vec<u8> {
    let mut b = serde_json::to_vec_pretty(v).expect("serialise connectors");
    b.push(b'\n');
    b
}

impl Gateway {
    /// Default fleet settings: listener on `ip`, upstream plaintext (`tls: None`), accepted
    /// domains `example.org` and `*.example.org`, defaultInbound Accept, probes off.
    pub fn default_fleet(
        ip: Ipv4Addr,
        port: u16,
        admin_port: u16,
        pki: &Pki,
        upstream: SocketAddr,
        material: &Path,
    ) -> Value {
        json!({
            "listen": format!("{ip}:{port}"),
            "adminListen": format!("{ip}:{admin_port}"),
            "hostname": "gateway.test",
            "serverCertificate": {
                "certFile": pki.server.cert,
                "keyFile": pki.server.key,
            },
            "acceptedDomains": ["example.org", "*.example.org"],
            "upstream": {
                "host": upstream.ip().to_string(),
                "port": upstream.port(),
                "tls": "None",
            },
            "defaultInbound": "Accept",
            "materialDir": material,
            "timeouts": {
                "commandSecs": 30,
                "dataSecs": 30,
                "tlsHandshakeSecs": 10,
                "nextHopSecs": 10,
                "nextHopDataEndSecs": 30,
                "shutdownGraceSecs": 2,
            },
            "validationIntervalSecs": 0,
        })
    }

    /// Writes the files and starts the binary, waiting (guard: 30 s) for `GET /readyz` = 200.
    pub fn start(ip: Ipv4Addr, pki: &Pki, spec: GatewaySpec) -> Gateway {
        let dir = tempfile::Builder::new()
            .prefix("pg-gw-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        for sub in ["fleet", "connectors", "material"] {
            std::fs::create_dir_all(d.join(sub)).expect("mkdir");
        }
        // Connector PEM material named by content, as the operator writes it.
        for pem in [&pki.ca_pem, &pki.contoso_ca_pem] {
            std::fs::write(d.join("material").join(material_name(pem)), pem).expect("material");
        }
        let port = free_port(ip);
        let admin_port = free_port(ip);
        let mut fleet = Gateway::default_fleet(
            ip,
            port,
            admin_port,
            pki,
            spec.upstream,
            &d.join("material"),
        );
        super::merge_json(&mut fleet, &spec.fleet);
        let fleet_path = d.join("fleet").join("fleet.json");
        std::fs::write(
            &fleet_path,
            serde_json::to_vec_pretty(&fleet).expect("fleet json"),
        )
        .expect("write fleet");

        let connectors_path = d.join("connectors").join("connectors.json");
        let bytes = connectors_bytes(&spec.connectors);
        if spec.kubelet_layout {
            let ts = d.join("connectors").join("..2026_01_01_00_00_00.000000000");
            std::fs::create_dir(&ts).expect("mkdir ts");
            std::fs::write(ts.join("connectors.json"), &bytes).expect("write connectors");
            std::os::unix::fs::symlink(
                "..2026_01_01_00_00_00.000000000",
                d.join("connectors").join("..data"),
            )
            .expect("..data symlink");
            std::os::unix::fs::symlink("..data/connectors.json", &connectors_path)
                .expect("connectors symlink");
        } else {
            std::fs::write(&connectors_path, &bytes).expect("write connectors");
        }

        let logs = Arc::new(Mutex::new(Vec::new()));
        let logs_paused = Arc::new((Mutex::new(false), Condvar::new()));
        let env: Vec<(&'static str, String)> = spec
            .reload_poll_secs
            .map(|s| ("PARTNERGATE_RELOAD_POLL_SECS", s.to_string()))
            .into_iter()
            .chain(
                spec.log_buffer_lines
                    .map(|n| ("PARTNERGATE_LOG_BUFFER_LINES", n.to_string())),
            )
            .collect();
        let child = spawn_gateway(&fleet_path, &connectors_path, &logs, &logs_paused, &env);
        let mut gw = Gateway {
            smtp: SocketAddr::from((ip, port)),
            admin: SocketAddr::from((ip, admin_port)),
            dir,
            child,
            logs,
            logs_paused,
            fleet_path,
            connectors_path,
            connectors_bytes: bytes,
            kubelet: spec.kubelet_layout,
            swaps: AtomicU64::new(0),
            env,
        };
        gw.wait_ready();
        gw
    }

    /// Sends SIGTERM, waits (guard: 60 s) for a clean exit, starts the binary again with the
    /// same files (same ports) and waits until it is ready. Returns the exit status.
    pub fn restart(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let status = super::wait_for(
            Duration::from_secs(60),
            "the gateway to exit after SIGTERM",
            || self.child.try_wait().ok().flatten(),
        );
        self.child = spawn_gateway(
            &self.fleet_path,
            &self.connectors_path,
            &self.logs,
            &self.logs_paused,
            &self.env,
        );
        self.wait_ready();
        status
    }

    fn wait_ready(&mut self) {
        let start = std::time::Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "partnergate-gateway exited ({status}) before becoming ready; its output:\n{}",
                    self.logs().join("\n")
                );
            }
            if let Ok((200, _)) = http_get(self.admin, "/readyz") {
                return;
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!(
                    "partnergate-gateway not ready after 30 s (GET http://{}/readyz); its output:\n{}",
                    self.admin,
                    self.logs().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn material_dir(&self) -> PathBuf {
        self.dir.path().join("material")
    }

    /// Everything the gateway printed so far (JSON log lines).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("lock").clone()
    }

    /// Stops reading the gateway's stdout and stderr (a stalled log collector): once the pipes
    /// are full, its writes to them block.
    pub fn pause_logs(&self) {
        *self.logs_paused.0.lock().expect("lock") = true;
    }

    pub fn resume_logs(&self) {
        *self.logs_paused.0.lock().expect("lock") = false;
        self.logs_paused.1.notify_all();
    }

    /// Waits (guard: 60 s) for the process to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        super::wait_for(Duration::from_secs(60), "the gateway to exit", || {
            self.child.try_wait().ok().flatten()
        })
    }

    /// Log lines containing every one of `needles`.
    pub fn log_lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.logs()
            .into_iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .collect()
    }

    /// Waits (guard: 10 s) for a log line containing every one of `needles`.
    pub fn wait_log(&self, needles: &[&str]) -> String {
        super::wait_for(
            Duration::from_secs(10),
            &format!("a gateway log line with {needles:?}"),
            || self.log_lines_with(needles).into_iter().next(),
        )
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub fn status(&self) -> Value {
        let (code, body) = self.get("/status");
        assert_eq!(code, 200, "GET /status: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
    }

    /// sha256 of the connectors file last written by the test.
    pub fn expected_hash(&self) -> String {
        super::sha256_hex(&self.connectors_bytes)
    }

    /// Rewrites the connectors file in place (as an editor or `cat >` would).
    pub fn rewrite_connectors(&mut self, v: &Value) {
        let bytes = connectors_bytes(v);
        let path = if self.kubelet {
            std::fs::canonicalize(&self.connectors_path).expect("resolve connectors")
        } else {
            self.connectors_path.clone()
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .expect("open connectors");
        f.write_all(&bytes).expect("write connectors");
        f.sync_all().expect("sync");
        self.connectors_bytes = bytes;
    }

    /// Swaps the connectors file the way the kubelet updates a ConfigMap volume: a new
    /// timestamped directory, a `..data_tmp` symlink to it renamed over `..data`, the old
    /// directory removed.
    pub fn kubelet_swap_connectors(&mut self, v: &Value) {
        assert!(
            self.kubelet,
            "kubelet_swap_connectors needs GatewaySpec::kubelet()"
        );
        let dir = self.dir.path().join("connectors");
        let old = std::fs::read_link(dir.join("..data")).expect("read ..data");
        let n = self.swaps.fetch_add(1, Ordering::SeqCst) + 1;
        let name = format!("..2026_01_01_00_00_{n:02}.000000000");
        std::fs::create_dir(dir.join(&name)).expect("mkdir ts");
        let bytes = connectors_bytes(v);
        std::fs::write(dir.join(&name).join("connectors.json"), &bytes).expect("write");
        let _ = std::fs::remove_file(dir.join("..data_tmp"));
        std::os::unix::fs::symlink(&name, dir.join("..data_tmp")).expect("..data_tmp");
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap ..data");
        std::fs::remove_dir_all(dir.join(old)).expect("remove old ts dir");
        self.connectors_bytes = bytes;
    }

    /// Waits (guard: 15 s) until `/status` reports `hash` as the live configHash.
    pub fn wait_config_hash(&self, hash: &str) -> Value {
        super::wait_for(
            Duration::from_secs(15),
            &format!("configHash {hash} in /status"),
            || {
                let s = self.status();
                (s["configHash"].as_str() == Some(hash)).then_some(s)
            },
        )
    }

    /// Has the process exited?
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The gateway process's id (for /proc figures such as peak RSS).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the gateway process.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- partnergate-gateway output ({}) ----\n{}\n---- end ----",
                self.smtp,
                self.logs().join("\n")
            );
        }
    }
}

/// Starts the binary on these files; its output lines go to `logs`.
fn spawn_gateway(
    fleet: &Path,
    connectors: &Path,
    logs: &Arc<Mutex<Vec<String>>>,
    paused: &Arc<(Mutex<bool>, Condvar)>,
    env: &[(&'static str, String)],
) -> Child {
    let mut child = Command::new(BIN)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .arg("--fleet")
        .arg(fleet)
        .arg("--connectors")
        .arg(connectors)
        .env("RUST_LOG", "info")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn partnergate-gateway");
    for pipe in [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("stderr")),
    ] {
        let logs = logs.clone();
        let paused = paused.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                logs.lock().expect("lock").push(line);
                let (flag, resumed) = &*paused;
                let mut p = flag.lock().expect("lock");
                while *p {
                    p = resumed.wait(p).expect("lock");
                }
            }
        });
    }
    child
}

/// Minimal HTTP/1.1 GET (Connection: close); returns status and body (chunked decoded).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP response: {head:?}")))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.split(';').next().unwrap_or("0").trim(), 16)
                .unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_string()
    };
    Ok((code, body))
}

/// Runs the binary with arguments (e.g. `check`), returning exit code and stdout+stderr.
pub fn run_cli(args: &[&std::ffi::OsStr]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run partnergate-gateway");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), s)
}
