//! A private authoritative DNS server for the tests that need DNS: Knot DNS (`knotd`, Debian's
//! package, never the system service) on `.53` of the test's own loopback block, serving zones
//! the test writes. Knot rather than BIND's `named` as the server because `named` only listens
//! on addresses configured on an interface (it scans them), and the test blocks of 127.0.0.0/8
//! are routed to `lo`, not configured on it; Knot binds exactly the address it is given. Shared by the DANE/MTA-STS tests (outbound) and the SPF/DKIM/DMARC tests
//! (inbound).
//!
//! Layout: the server is authoritative for a root zone `.` of its own and for every test zone;
//! the root delegates each test zone to the server itself. Signed zones are signed in the test
//! with BIND's own tools (`dnssec-keygen`, ECDSA P-256, one KSK and one ZSK per zone;
//! `dnssec-signzone`), the root carries their DS, and the root's KSK is the trust anchor a
//! validating resolver is given ([`DnsServer::trust_anchor`]) — so a validating stub resolver
//! pointed at this one server walks a real chain of trust: root DNSKEY → DS → zone DNSKEY →
//! RRSIG. Unsigned zones are delegated without DS (DNSSEC "insecure", provably unsigned).
//! [`Zone::corrupt_signature`] breaks one RRSIG after signing (DNSSEC "bogus");
//! [`Zone::servfail`] declares a zone whose file does not load, so every name in it answers
//! SERVFAIL (a temporary DNS error for SPF/DKIM/DMARC, "indeterminate" for DANE).
//!
//! Invariants: keys live as long as the server, so [`DnsServer::replace_zones`] changes content
//! without changing the trust anchor; nothing listens beyond 127.0.0.0/8; `knotd` is killed
//! when dropped and its log printed if the test failed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;

use super::require_tool;

/// How a zone is published.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Publish {
    Unsigned,
    Signed,
    /// Declared but its file does not load: every query in it answers SERVFAIL.
    Servfail,
}

/// One test zone: an origin (e.g. `dane.test`) and its records in zone-file syntax, one per
/// line, owner names relative to the origin (`@`, `mx`, `_25._tcp.mx`) or absolute (ending in
/// `.`). SOA, NS and the name server's address are added.
#[derive(Debug, Clone)]
pub struct Zone {
    origin: String,
    records: Vec<String>,
    publish: Publish,
    /// (owner, type) pairs whose RRSIG is corrupted after signing.
    corrupt: Vec<(String, String)>,
}

impl Zone {
    /// A DNSSEC-signed zone with a DS in the root: answers validate as "secure".
    pub fn signed(origin: &str, records: &[&str]) -> Zone {
        Zone::new(origin, records, Publish::Signed)
    }

    /// An unsigned zone delegated without DS: answers validate as "insecure".
    pub fn unsigned(origin: &str, records: &[&str]) -> Zone {
        Zone::new(origin, records, Publish::Unsigned)
    }

    /// A zone every query of which answers SERVFAIL.
    pub fn servfail(origin: &str) -> Zone {
        Zone::new(origin, &[], Publish::Servfail)
    }

    fn new(origin: &str, records: &[&str], publish: Publish) -> Zone {
        Zone {
            origin: fqdn(origin),
            records: records.iter().map(|r| r.to_string()).collect(),
            publish,
            corrupt: Vec::new(),
        }
    }

    /// Corrupts the signature over `owner`'s `rtype` RRset after signing (its RRSIG no longer
    /// verifies: "bogus"). `owner` as in the records: relative to the origin or absolute.
    pub fn corrupt_signature(mut self, owner: &str, rtype: &str) -> Zone {
        assert_eq!(
            self.publish,
            Publish::Signed,
            "only a signed zone has signatures"
        );
        let owner = absolute(owner, &self.origin);
        self.corrupt.push((owner, rtype.to_ascii_uppercase()));
        self
    }
}

/// A running `knotd` with its zones.
pub struct DnsServer {
    child: Option<Child>,
    dir: TempDir,
    /// Where resolvers send queries (UDP and TCP, port 53).
    pub addr: SocketAddr,
    /// The root zone's KSK as one DNSKEY record in presentation format (`. 300 IN DNSKEY 257 3
    /// 13 <base64 key>`): the trust anchor for a validating resolver pointed at this server.
    pub trust_anchor: String,
    /// The same key as a DS record (`. IN DS <tag> 13 2 <sha256>`).
    pub trust_anchor_ds: String,
    keys: BTreeMap<String, ZoneKeys>,
    logs: Arc<Mutex<Vec<String>>>,
}

#[derive(Debug, Clone)]
struct ZoneKeys {
    /// Basename of the KSK's files in the key dir (`K<origin>+013+<tag>`).
    ksk: String,
}

const TTL: u32 = 300;

impl DnsServer {
    /// Starts `knotd` on `ip`:53 serving a signed root and `zones`. Waits (guard 30 s) until
    /// it answers the root SOA over UDP.
    pub fn start(ip: Ipv4Addr, zones: Vec<Zone>) -> DnsServer {
        require_tool("knotd");
        let dir = tempfile::Builder::new()
            .prefix("pg-dns-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir(dir.path().join("keys")).expect("mkdir keys");
        let mut server = DnsServer {
            child: None,
            dir,
            addr: SocketAddr::from((ip, 53)),
            trust_anchor: String::new(),
            trust_anchor_ds: String::new(),
            keys: BTreeMap::new(),
            logs: Arc::new(Mutex::new(Vec::new())),
        };
        let root = server.keys_for(".");
        let key_file = server.key_dir().join(format!("{}.key", root.ksk));
        let key = std::fs::read_to_string(&key_file).expect("read root KSK");
        let line = key
            .lines()
            .find(|l| !l.starts_with(';') && l.contains("DNSKEY"))
            .expect("DNSKEY line in the root KSK file");
        let fields: Vec<&str> = line.split_whitespace().collect();
        let at = fields
            .iter()
            .position(|f| *f == "DNSKEY")
            .expect("DNSKEY field");
        // One normal form: `. TTL IN DNSKEY flags protocol algorithm key` (key unbroken).
        server.trust_anchor = format!(
            ". {TTL} IN DNSKEY {} {} {} {}",
            fields[at + 1],
            fields[at + 2],
            fields[at + 3],
            fields[at + 4..].concat()
        );
        server.trust_anchor_ds = ds_of(&key_file);
        server.write_zones(&zones);
        server.spawn();
        server
    }

    /// Replaces the served zones (same address, same keys, so the same trust anchor) and
    /// restarts `knotd`; waits until it answers again.
    pub fn replace_zones(&mut self, zones: Vec<Zone>) {
        self.stop();
        self.write_zones(&zones);
        self.spawn();
    }

    /// `dig` against this server (for diagnostics and for tests of the helper itself).
    pub fn dig(&self, name: &str, rtype: &str) -> String {
        let out = Command::new(require_tool("dig"))
            .args([
                &format!("@{}", self.addr.ip()),
                "-p",
                &self.addr.port().to_string(),
                "+dnssec",
                "+norecurse",
                "+tries=1",
                "+time=5",
                name,
                rtype,
            ])
            .output()
            .expect("run dig");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Validates `name`/`rtype` with BIND's `delv` from this server's trust anchor, as an
    /// independent validator: returns its output (`; fully validated`, `; unsigned answer`,
    /// `;; resolution failed: …`).
    pub fn delv(&self, name: &str, rtype: &str) -> String {
        let anchors = self.dir.path().join("delv-anchors.conf");
        let fields: Vec<&str> = self.trust_anchor.split_whitespace().collect();
        let key = fields[7];
        std::fs::write(
            &anchors,
            format!(
                "trust-anchors {{ \".\" static-key {} {} {} \"{key}\"; }};\n",
                fields[4], fields[5], fields[6]
            ),
        )
        .expect("write delv anchors");
        let out = Command::new(require_tool("delv"))
            .args([
                &format!("@{}", self.addr.ip()),
                "-p",
                &self.addr.port().to_string(),
                "-a",
                anchors.to_str().expect("utf-8 path"),
                "+root=.",
                name,
                rtype,
            ])
            .output()
            .expect("run delv");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("lock").clone()
    }

    fn key_dir(&self) -> PathBuf {
        self.dir.path().join("keys")
    }

    /// The zone's keys, generated on first use (KSK + ZSK, ECDSA P-256).
    fn keys_for(&mut self, origin: &str) -> ZoneKeys {
        if let Some(k) = self.keys.get(origin) {
            return k.clone();
        }
        let keygen = require_tool("dnssec-keygen");
        let mut ksk = String::new();
        for ksk_flag in [true, false] {
            let mut cmd = Command::new(&keygen);
            cmd.arg("-q").arg("-K").arg(self.key_dir()).args([
                "-a",
                "ECDSAP256SHA256",
                "-n",
                "ZONE",
            ]);
            if ksk_flag {
                cmd.args(["-f", "KSK"]);
            }
            let out = cmd.arg(origin).output().expect("run dnssec-keygen");
            assert!(
                out.status.success(),
                "dnssec-keygen {origin}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            if ksk_flag {
                ksk = String::from_utf8_lossy(&out.stdout).trim().to_string();
            }
        }
        let keys = ZoneKeys { ksk };
        self.keys.insert(origin.to_string(), keys.clone());
        keys
    }

    /// Writes (and signs) every zone file and knot.conf.
    fn write_zones(&mut self, zones: &[Zone]) {
        let ip = match self.addr.ip() {
            std::net::IpAddr::V4(v4) => v4,
            std::net::IpAddr::V6(_) => unreachable!("the server listens on IPv4 loopback"),
        };
        let mut conf_zones = String::new();
        let mut root_records = vec![];
        for zone in zones {
            let file = self.dir.path().join(format!("{}zone", zone.origin));
            root_records.push(format!("{} {TTL} IN NS ns.{}", zone.origin, zone.origin));
            root_records.push(format!("ns.{} {TTL} IN A {ip}", zone.origin));
            match zone.publish {
                Publish::Servfail => {
                    std::fs::write(&file, "this is not a zone file\n").expect("write zone");
                }
                Publish::Unsigned => {
                    std::fs::write(&file, zone_text(&zone.origin, &zone.records, ip))
                        .expect("write zone");
                }
                Publish::Signed => {
                    let keys = self.keys_for(&zone.origin);
                    let unsigned = self.dir.path().join(format!("{}unsigned", zone.origin));
                    std::fs::write(&unsigned, zone_text(&zone.origin, &zone.records, ip))
                        .expect("write zone");
                    self.sign(&zone.origin, &unsigned, &file);
                    if !zone.corrupt.is_empty() {
                        corrupt(&file, &zone.corrupt);
                    }
                    let ds = ds_of(&self.key_dir().join(format!("{}.key", keys.ksk)));
                    root_records.push(ds);
                }
            }
            conf_zones.push_str(&format!(
                "  - domain: {}\n    file: \"{}\"\n",
                zone.origin,
                file.display()
            ));
        }
        self.keys_for(".");
        let root_unsigned = self.dir.path().join("root.unsigned");
        let root_file = self.dir.path().join("root.zone");
        std::fs::write(&root_unsigned, zone_text(".", &root_records, ip)).expect("write root");
        self.sign(".", &root_unsigned, &root_file);
        let dir = self.dir.path().display();
        // Knot serves the zone files as they are (pre-signed: `dnssec-signing` stays off, so
        // it never re-signs or repairs a corrupted signature), never writes them back
        // (`zonefile-sync: -1`) and keeps no journal.
        std::fs::write(
            self.dir.path().join("knot.conf"),
            format!(
                "server:\n    rundir: \"{dir}\"\n    listen: {ip}@{port}\n\
                 database:\n    storage: \"{dir}/db\"\n\
                 log:\n  - target: stderr\n    any: info\n\
                 template:\n  - id: default\n    storage: \"{dir}\"\n    semantic-checks: off\n\
                 \x20   zonefile-sync: -1\n    zonefile-load: whole\n    journal-content: none\n\
                 zone:\n  - domain: .\n    file: \"{root}\"\n{conf_zones}",
                port = self.addr.port(),
                root = root_file.display(),
            ),
        )
        .expect("write knot.conf");
    }

    fn sign(&self, origin: &str, unsigned: &Path, signed: &Path) {
        let out = Command::new(require_tool("dnssec-signzone"))
            .arg("-S")
            .arg("-K")
            .arg(self.key_dir())
            .args(["-o", origin, "-O", "full", "-q"])
            .arg("-f")
            .arg(signed)
            .arg(unsigned)
            .current_dir(self.dir.path())
            .output()
            .expect("run dnssec-signzone");
        assert!(
            out.status.success(),
            "dnssec-signzone {origin}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn spawn(&mut self) {
        let mut child = Command::new(require_tool("knotd"))
            .arg("-c")
            .arg(self.dir.path().join("knot.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn knotd");
        for pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let logs = self.logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    logs.lock().expect("lock").push(line);
                }
            });
        }
        self.child = Some(child);
        let mut last = String::new();
        let started = std::time::Instant::now();
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("knotd exited ({status}): {}", self.logs().join("\n"));
            }
            if self.logs().iter().any(|l| l.contains("server started")) {
                last = self.dig(".", "SOA");
                if last.contains("status: NOERROR") {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "knotd did not answer within 30 s; last dig:\n{last}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.logs.lock().expect("lock").clear();
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop_keep_logs();
        if std::thread::panicking() {
            eprintln!(
                "---- knotd output ({}) ----\n{}\n---- end ----",
                self.addr,
                self.logs().join("\n")
            );
        }
    }
}

impl DnsServer {
    fn stop_keep_logs(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

fn absolute(owner: &str, origin: &str) -> String {
    if owner == "@" {
        origin.to_string()
    } else if owner.ends_with('.') {
        owner.to_string()
    } else if origin == "." {
        format!("{owner}.")
    } else {
        format!("{owner}.{origin}")
    }
}

/// A zone file: SOA, NS at `ns.<origin>` (or `ns.` for the root) with its address, then the
/// records.
fn zone_text(origin: &str, records: &[String], ip: Ipv4Addr) -> String {
    let ns = absolute("ns", origin);
    let mut text = format!(
        "$ORIGIN {origin}\n$TTL {TTL}\n\
         @ IN SOA {ns} hostmaster.{ns} 1 3600 600 86400 {TTL}\n\
         @ IN NS {ns}\n\
         {ns} IN A {ip}\n"
    );
    for r in records {
        text.push_str(r);
        text.push('\n');
    }
    text
}

/// The DS record (SHA-256) of a KSK file.
fn ds_of(key_file: &Path) -> String {
    let out = Command::new(require_tool("dnssec-dsfromkey"))
        .arg("-2")
        .arg(key_file)
        .output()
        .expect("run dnssec-dsfromkey");
    assert!(
        out.status.success(),
        "dnssec-dsfromkey: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Flips one base64 character of the signature of each listed RRSIG in a signed zone file
/// written with `-O full` (one record per line: `owner ttl class RRSIG covered …  signature`).
fn corrupt(file: &Path, targets: &[(String, String)]) {
    let text = std::fs::read_to_string(file).expect("read signed zone");
    let mut hit = vec![false; targets.len()];
    let out: Vec<String> = text
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 5 && f[3] == "RRSIG" {
                for (i, (owner, rtype)) in targets.iter().enumerate() {
                    if f[0].eq_ignore_ascii_case(owner) && f[4].eq_ignore_ascii_case(rtype) {
                        hit[i] = true;
                        let sig = f[f.len() - 1];
                        // Replace the first signature character by a different base64 one.
                        let first = if sig.starts_with('A') { "B" } else { "A" };
                        let broken = format!("{first}{}", &sig[1..]);
                        let mut g: Vec<String> = f.iter().map(|s| s.to_string()).collect();
                        let last = g.len() - 1;
                        g[last] = broken;
                        return g.join(" ");
                    }
                }
            }
            line.to_string()
        })
        .collect();
    for (i, done) in hit.iter().enumerate() {
        assert!(
            done,
            "no RRSIG over {} {} in {}",
            targets[i].0,
            targets[i].1,
            file.display()
        );
    }
    std::fs::write(file, out.join("\n") + "\n").expect("write corrupted zone");
}

#[cfg(test)]
mod tests {
    //! The helper itself, checked with BIND's own validator (`delv`) so the DANE and sender
    //! authentication tests can rely on what "secure", "insecure", "bogus" and SERVFAIL mean.
    use super::*;
    use crate::support::Net;

    #[test]
    fn signed_unsigned_bogus_and_servfail_zones_validate_as_such() {
        let net = Net::new();
        let dns = DnsServer::start(
            net.ip(53),
            vec![
                Zone::signed(
                    "secure.test",
                    &["mx IN A 127.0.0.9", "@ IN TXT \"v=spf1 -all\""],
                ),
                Zone::unsigned("plain.test", &["mx IN A 127.0.0.9"]),
                Zone::signed("broken.test", &["mx IN A 127.0.0.9"]).corrupt_signature("mx", "A"),
                Zone::servfail("down.test"),
            ],
        );
        let secure = dns.delv("mx.secure.test", "A");
        assert!(secure.contains("; fully validated"), "{secure}");
        assert!(secure.contains("127.0.0.9"), "{secure}");
        let txt = dns.delv("secure.test", "TXT");
        assert!(
            txt.contains("; fully validated") && txt.contains("v=spf1"),
            "{txt}"
        );
        let plain = dns.delv("mx.plain.test", "A");
        assert!(plain.contains("; unsigned answer"), "{plain}");
        let bogus = dns.delv("mx.broken.test", "A");
        assert!(
            bogus.contains("resolution failed") && !bogus.contains("fully validated"),
            "{bogus}"
        );
        let down = dns.dig("mx.down.test", "A");
        assert!(down.contains("status: SERVFAIL"), "{down}");
        assert!(
            dns.trust_anchor.contains("DNSKEY 257 3 13"),
            "{}",
            dns.trust_anchor
        );
    }

    #[test]
    fn replacing_zones_keeps_the_trust_anchor() {
        let net = Net::new();
        let mut dns = DnsServer::start(
            net.ip(53),
            vec![Zone::signed("change.test", &["@ IN TXT \"one\""])],
        );
        let anchor = dns.trust_anchor.clone();
        dns.replace_zones(vec![Zone::signed("change.test", &["@ IN TXT \"two\""])]);
        assert_eq!(dns.trust_anchor, anchor);
        let txt = dns.delv("change.test", "TXT");
        assert!(
            txt.contains("; fully validated") && txt.contains("\"two\""),
            "{txt}"
        );
    }
}
