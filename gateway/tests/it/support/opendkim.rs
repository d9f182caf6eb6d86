//! A private OpenDKIM (Debian `opendkim`, never the system service) signing for one domain as
//! a milter on a loopback port of the test's own block: the partner's Postfix
//! (`PostfixOptions::milter`) passes its mail through it, so the gateway sees a DKIM signature
//! made by a real MTA's signer. Killed when dropped; its output printed if the test failed.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;

use super::net::free_port;
use super::{require_tool, wait_for};

pub struct OpenDkim {
    child: Child,
    _dir: TempDir,
    pub addr: SocketAddr,
    output: Arc<Mutex<String>>,
}

impl OpenDkim {
    /// Signs mail whose From: domain is `domain` with `key_pem` as selector `selector`
    /// (relaxed/relaxed), for clients in 127.0.0.0/8. Waits (guard 20 s) for the milter port.
    pub fn start(ip: Ipv4Addr, domain: &str, selector: &str, key_pem: &Path) -> OpenDkim {
        let bin = require_tool("opendkim");
        let dir = tempfile::Builder::new()
            .prefix("pg-opendkim-")
            .tempdir()
            .expect("tempdir");
        let addr = SocketAddr::from((ip, free_port(ip)));
        let conf = dir.path().join("opendkim.conf");
        std::fs::write(
            &conf,
            format!(
                "Syslog no\nLogWhy yes\nMode s\nDomain {domain}\nSelector {selector}\nKeyFile {key}\n\
                 Socket inet:{port}@{ip}\nCanonicalization relaxed/relaxed\nInternalHosts 127.0.0.0/8\n\
                 RequireSafeKeys false\nPidFile {pid}\n",
                key = key_pem.display(),
                port = addr.port(),
                pid = dir.path().join("opendkim.pid").display(),
            ),
        )
        .expect("write opendkim.conf");
        let mut child = Command::new(bin)
            .arg("-f")
            .arg("-x")
            .arg(&conf)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start opendkim");
        let output = Arc::new(Mutex::new(String::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let out = output.clone();
            std::thread::spawn(move || {
                let mut pipe = pipe;
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    out.lock()
                        .expect("lock")
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let mut d = OpenDkim {
            child,
            _dir: dir,
            addr,
            output,
        };
        wait_for(Duration::from_secs(20), "opendkim milter port", || {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("opendkim exited ({status}): {}", d.output());
            }
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .ok()
                .map(|_| ())
        });
        d
    }

    pub fn output(&self) -> String {
        self.output.lock().expect("lock").clone()
    }
}

impl Drop for OpenDkim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- opendkim output ----\n{}\n---- end ----",
                self.output()
            );
        }
    }
}
