//! Certificates generated for each test with rcgen, written to a tempdir as PEM.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use tempfile::TempDir;

/// A certificate and its key, as PEM files (and their contents).
#[derive(Debug, Clone)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
}

/// All the certificates a test may need.
pub struct Pki {
    dir: TempDir,
    /// The organisation's private CA: signs the gateway's and the sink's server certificates.
    pub ca: PathBuf,
    pub ca_pem: String,
    /// Gateway server certificate: SAN dNSName `gateway.test` and IP 127.0.0.1.
    pub server: CertPair,
    /// Sink (organisation mail server) certificate: SAN `sink.test`.
    pub sink: CertPair,
    /// The partner's CA ("Contoso CA").
    pub contoso_ca_pem: String,
    /// Partner client certificate `mail.contoso.com`, signed by the Contoso CA.
    pub contoso_client: CertPair,
    /// Signed by the Contoso CA but for another name (`mail.fabrikam.example`).
    pub wrong_name_client: CertPair,
    /// Self-signed `mail.contoso.com`: the right name, not trusted by any bundle.
    pub self_signed_client: CertPair,
    /// Internal sender certificate `relay.example.org`, signed by the private CA.
    pub internal_client: CertPair,
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(365);
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationName, "partnergate tests");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p);
    p
}

fn leaf_params(name: &str, ips: &[IpAddr], server: bool) -> CertificateParams {
    let mut p = CertificateParams::new(vec![name.to_string()]).expect("leaf params");
    for ip in ips {
        p.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = if server {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    validity(&mut p);
    p
}

fn write_pair(dir: &Path, stem: &str, cert_pem: String, key_pem: String) -> CertPair {
    let cert = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    std::fs::write(&cert, &cert_pem).expect("write cert");
    std::fs::write(&key, &key_pem).expect("write key");
    CertPair {
        cert,
        key,
        cert_pem,
        key_pem,
    }
}

impl Pki {
    pub fn generate() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("pg-pki-")
            .tempdir()
            .expect("tempdir");
        // Postfix reads its client certificate as an unprivileged user in some set-ups.
        set_mode(dir.path(), 0o755);
        let d = dir.path();

        let ca = CertifiedIssuer::self_signed(
            ca_params("partnergate test CA"),
            KeyPair::generate().expect("key"),
        )
        .expect("private CA");
        let contoso = CertifiedIssuer::self_signed(
            ca_params("Contoso CA"),
            KeyPair::generate().expect("key"),
        )
        .expect("contoso CA");

        let leaf = |name: &str, ips: &[IpAddr], server: bool, issuer: &CertifiedIssuer<KeyPair>| {
            let key = KeyPair::generate().expect("key");
            let cert = leaf_params(name, ips, server)
                .signed_by(&key, issuer)
                .expect("sign leaf");
            (cert.pem(), key.serialize_pem())
        };

        let ca_path = d.join("ca.crt");
        std::fs::write(&ca_path, ca.pem()).expect("write ca");
        let contoso_ca_path = d.join("contoso-ca.crt");
        std::fs::write(&contoso_ca_path, contoso.pem()).expect("write contoso ca");

        let localhost = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
        let (c, k) = leaf("gateway.test", &localhost, true, &ca);
        let server = write_pair(d, "gateway", c, k);
        let (c, k) = leaf("sink.test", &localhost, true, &ca);
        let sink = write_pair(d, "sink", c, k);
        let (c, k) = leaf("mail.contoso.com", &[], false, &contoso);
        let contoso_client = write_pair(d, "contoso-client", c, k);
        let (c, k) = leaf("mail.fabrikam.example", &[], false, &contoso);
        let wrong_name_client = write_pair(d, "wrong-name-client", c, k);
        let (c, k) = leaf("relay.example.org", &[], false, &ca);
        let internal_client = write_pair(d, "internal-client", c, k);

        let self_key = KeyPair::generate().expect("key");
        let self_cert = leaf_params("mail.contoso.com", &[], false)
            .self_signed(&self_key)
            .expect("self-signed");
        let self_signed_client = write_pair(
            d,
            "self-signed-client",
            self_cert.pem(),
            self_key.serialize_pem(),
        );

        for f in std::fs::read_dir(d).expect("read pki dir") {
            set_mode(&f.expect("entry").path(), 0o644);
        }

        Pki {
            ca_pem: ca.pem(),
            contoso_ca_pem: contoso.pem(),
            dir,
            ca: ca_path,
            server,
            sink,
            contoso_client,
            wrong_name_client,
            self_signed_client,
            internal_client,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// The content-addressed file name the operator gives a PEM in the material directory:
/// `<first 16 hex of sha256>.pem`.
pub fn material_name(pem: &str) -> String {
    format!("{}.pem", &super::sha256_hex(pem.as_bytes())[..16])
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
