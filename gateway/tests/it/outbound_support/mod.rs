//! Shared by the outbound_* tests: a partner PKI (its own CA and server certificates), a tiny
//! authoritative DNS server on a loopback address (hickory-proto for the wire format), and a
//! gateway set up for internal senders relaying to partners.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, MX};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;

pub mod tls_policy;

use crate::support::CertPair;
use crate::support::pki::set_mode;

/// The partner's certificates: a CA of its own and server certificates for its MX hosts.
pub struct PartnerPki {
    dir: TempDir,
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// "Partner CA" bundle (PEM file).
    pub ca: PathBuf,
}

fn validity(p: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(90);
}

fn server_params(names: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("leaf params");
    p.distinguished_name.push(DnType::CommonName, names[0]);
    p.distinguished_name
        .push(DnType::OrganizationName, "Partner Ltd");
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut p);
    p
}

impl PartnerPki {
    pub fn generate() -> PartnerPki {
        let dir = tempfile::Builder::new()
            .prefix("pg-partner-pki-")
            .tempdir()
            .expect("tempdir");
        set_mode(dir.path(), 0o755);
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "Partner CA");
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut p);
        let issuer =
            CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("CA");
        let ca = dir.path().join("partner-ca.crt");
        std::fs::write(&ca, issuer.pem()).expect("write CA");
        set_mode(&ca, 0o644);
        PartnerPki { dir, issuer, ca }
    }

    fn write(&self, stem: &str, cert: String, key: String) -> CertPair {
        let d = self.dir.path();
        let (c, k) = (d.join(format!("{stem}.crt")), d.join(format!("{stem}.key")));
        std::fs::write(&c, &cert).expect("write cert");
        std::fs::write(&k, &key).expect("write key");
        set_mode(&c, 0o644);
        set_mode(&k, 0o644);
        CertPair {
            cert: c,
            key: k,
            cert_pem: cert,
            key_pem: key,
        }
    }

    /// A server certificate for `names` (first = CN) issued by the partner CA.
    pub fn server(&self, stem: &str, names: &[&str]) -> CertPair {
        let key = KeyPair::generate().expect("key");
        let cert = server_params(names)
            .signed_by(&key, &self.issuer)
            .expect("sign");
        self.write(stem, cert.pem(), key.serialize_pem())
    }

    /// A self-signed server certificate for `names`.
    pub fn self_signed(&self, stem: &str, names: &[&str]) -> CertPair {
        let key = KeyPair::generate().expect("key");
        let cert = server_params(names).self_signed(&key).expect("self-sign");
        self.write(stem, cert.pem(), key.serialize_pem())
    }
}

/// Zone data: (lower-case name without trailing dot, type) → records.
type Zone = HashMap<(String, RecordType), Vec<RData>>;

/// An authoritative DNS server for test names on a loopback UDP port (and nothing else): an
/// unknown name is NXDOMAIN, a known name without records of the asked type is an empty
/// NOERROR answer.
pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    queries: Arc<Mutex<Vec<(String, RecordType)>>>,
    stop: Arc<AtomicBool>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn name(n: &str) -> Name {
    Name::from_ascii(format!("{}.", key(n))).expect("DNS name")
}

impl DnsServer {
    pub fn start(ip: Ipv4Addr) -> DnsServer {
        let sock = UdpSocket::bind((ip, 0)).expect("bind DNS socket on loopback");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let addr = sock.local_addr().expect("addr");
        let zone: Arc<Mutex<Zone>> = Arc::default();
        let queries: Arc<Mutex<Vec<(String, RecordType)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (z, q, s) = (zone.clone(), queries.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::SeqCst) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(req) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut resp = Message::response(req.metadata.id, OpCode::Query);
                resp.metadata.message_type = MessageType::Response;
                resp.metadata.authoritative = true;
                resp.metadata.recursion_desired = req.metadata.recursion_desired;
                resp.metadata.recursion_available = true;
                if let Some(query) = req.queries.first() {
                    let qn = key(&query.name().to_ascii());
                    let qt = query.query_type();
                    q.lock().expect("lock").push((qn.clone(), qt));
                    resp.add_query(query.clone());
                    let zone = z.lock().expect("lock");
                    match zone.get(&(qn.clone(), qt)) {
                        Some(records) => {
                            for rd in records {
                                resp.add_answer(Record::from_rdata(name(&qn), 5, rd.clone()));
                            }
                        }
                        None if zone.keys().any(|(n, _)| *n == qn) => {}
                        None => resp.metadata.response_code = ResponseCode::NXDomain,
                    }
                }
                if let Ok(bytes) = resp.to_vec() {
                    let _ = sock.send_to(&bytes, peer);
                }
            }
        });
        DnsServer {
            addr,
            zone,
            queries,
            stop,
        }
    }

    fn add(&self, n: &str, t: RecordType, rd: RData) {
        self.zone
            .lock()
            .expect("lock")
            .entry((key(n), t))
            .or_default()
            .push(rd);
    }

    pub fn mx(&self, domain: &str, preference: u16, host: &str) -> &DnsServer {
        let exchange = if host == "." {
            Name::root()
        } else {
            name(host)
        };
        self.add(
            domain,
            RecordType::MX,
            RData::MX(MX::new(preference, exchange)),
        );
        self
    }

    pub fn a(&self, host: &str, ip: Ipv4Addr) -> &DnsServer {
        self.add(host, RecordType::A, RData::A(A(ip)));
        self
    }

    /// Every (name, type) asked so far.
    pub fn queries(&self) -> Vec<(String, RecordType)> {
        self.queries.lock().expect("lock").clone()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One message from `from` to `to`, sent by an internal client (`net.client(0)`) over a fresh
/// connection: the transcript of MAIL, RCPT and DATA.
pub fn send(
    gw: &crate::support::Gateway,
    net: &crate::support::Net,
    from: &str,
    to: &str,
) -> crate::support::Transcript {
    let (mut c, _) = crate::support::SmtpConn::connect(gw.smtp, Some(net.client(0)));
    c.cmd("EHLO relay.example.org");
    let t = c.send_mail(
        from,
        &[to],
        &crate::support::message(from, to, "outbound", &[]),
    );
    c.quit();
    t
}
