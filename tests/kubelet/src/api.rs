//! The kubelet API that the kube-apiserver calls for `kubectl logs`: HTTPS on
//! `127.0.0.1:--port` (the Node's InternalIP and `daemonEndpoints.kubeletEndpoint.Port`).
//!
//! - `GET /healthz` → `ok`.
//! - `GET /containerLogs/{ns}/{pod}/{container}` with `follow`, `previous`, `timestamps`,
//!   `tailLines`, `limitBytes`, `sinceSeconds`, `sinceTime`, `stream` (what the apiserver
//!   forwards from `kubectl logs`), read from the CRI-format file of logs.rs.
//! - `/exec`, `/attach`, `/portForward`, `/run`: 501 with the reason (see README.md).
//!
//! Invariants: the serving certificate is issued at start from the cluster CA (SANs: 127.0.0.1,
//! localhost, the node name), so the apiserver's `--kubelet-certificate-authority` verifies
//! it; every connection must present a client certificate issued by the same CA (TLS refuses
//! others), and a request is served only if that certificate's subject carries
//! `O=system:masters` (the apiserver's `--kubelet-client-certificate`); anything else gets 403,
//! as a real kubelet's authorizer answers identities without `nodes/log`/`nodes/proxy`. Path
//! segments are validated as Kubernetes names before they touch the filesystem.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::Ctx;
use crate::logs::{self, Assembler, Entry, Line, Query, Stream};

type Body = BoxBody<Bytes, std::io::Error>;

/// How often a `follow` request looks for new records.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// Time a client gets to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The group whose members may read logs (the apiserver's kubelet client certificate).
const ALLOWED_GROUP: &str = "system:masters";

/// Issues the serving certificate from the CA and builds the TLS configuration.
pub fn tls_config(ca_cert_pem: &str, ca_key_pem: &str, node: &str) -> anyhow::Result<ServerConfig> {
    use rcgen::{
        CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::from_pem(ca_key_pem).context("parse the CA key")?;
    let issuer =
        Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).context("parse the CA certificate")?;
    let key = KeyPair::generate().context("generate the serving key")?;
    let mut params = CertificateParams::new(vec![
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        node.to_string(),
    ])
    .context("serving certificate names")?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("system:node:{node}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "system:nodes");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365);
    let cert = params
        .signed_by(&key, &issuer)
        .context("sign the serving certificate")?;

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_cert_pem.as_bytes()) {
        roots
            .add(c.context("parse the CA certificate")?)
            .context("add the CA to the client roots")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("client certificate verifier")?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .context("serving certificate")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Binds the API and serves it in the background. Binding errors are returned (the port is
/// part of the Node's status, so a kubelet without it would advertise a dead endpoint).
pub async fn serve(ctx: Arc<Ctx>, addr: SocketAddr, tls: ServerConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind the kubelet API on {addr}"))?;
    info!(%addr, "kubelet API listening (HTTPS, client certificates of the cluster CA)");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "kubelet API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "kubelet API handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let who = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| Identity::from_der(c))
                    .unwrap_or_default();
                let svc = hyper::service::service_fn(move |req| {
                    let (ctx, who) = (ctx.clone(), who.clone());
                    async move { Ok::<_, Infallible>(handle(&ctx, &who, req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await
                {
                    debug!(%peer, error = %e, "kubelet API connection ended");
                }
            });
        }
    });
    Ok(())
}

/// The user a client certificate names: CN = user, O = groups (as the apiserver reads it).
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub user: String,
    pub groups: Vec<String>,
}

impl Identity {
    fn from_der(der: &CertificateDer<'_>) -> Self {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return Self::default();
        };
        let s = cert.subject();
        let text = |a: &x509_parser::x509::AttributeTypeAndValue<'_>| {
            a.as_str().map(str::to_string).unwrap_or_default()
        };
        Self {
            user: s.iter_common_name().next().map(text).unwrap_or_default(),
            groups: s.iter_organization().map(text).collect(),
        }
    }

    fn allowed(&self) -> bool {
        self.groups.iter().any(|g| g == ALLOWED_GROUP)
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut body: String = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(ctx: &Ctx, who: &Identity, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let subresource = match segs.first().copied() {
        Some("healthz") => "healthz",
        Some("containerLogs") => "log",
        _ => "proxy",
    };
    if !who.allowed() {
        return text(
            StatusCode::FORBIDDEN,
            format!(
                "Forbidden (user={}, verb=get, resource=nodes, subresource={subresource})",
                who.user
            ),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        if matches!(segs[0], "exec" | "attach" | "portForward" | "run") {
            return unsupported(segs[0]);
        }
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    match segs.as_slice() {
        ["healthz"] => text(StatusCode::OK, "ok"),
        ["containerLogs", ns, pod, container] => {
            let query = match parse_query(req.uri().query().unwrap_or("")) {
                Ok(q) => q,
                Err(e) => return text(StatusCode::BAD_REQUEST, e),
            };
            container_logs(ctx, ns, pod, container, query).await
        }
        [op, ..] if matches!(*op, "exec" | "attach" | "portForward" | "run") => unsupported(op),
        _ => text(StatusCode::NOT_FOUND, format!("{path}: not found")),
    }
}

fn unsupported(op: &str) -> Response<Body> {
    text(
        StatusCode::NOT_IMPLEMENTED,
        format!(
            "{op} is not supported by the process kubelet: its pods are host processes, with \
             no container to enter or attach to and no network namespace to forward into \
             (see tests/kubelet/README.md)"
        ),
    )
}

/// A Kubernetes object name (DNS subdomain): the only segments that may become a path.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with('.')
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_bool(k: &str, v: &str) -> Result<bool, String> {
    match v {
        "" | "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("{k}: invalid boolean {v:?}")),
    }
}

/// Parses the query the apiserver forwards; unknown parameters are ignored (the apiserver also
/// passes e.g. `insecureSkipTLSVerifyBackend`, which concerns it, not the kubelet).
pub fn parse_query(q: &str) -> Result<Query, String> {
    let mut m: HashMap<String, String> = HashMap::new();
    for kv in q.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        m.insert(percent_decode(k), percent_decode(v));
    }
    let num = |k: &str| -> Result<Option<i64>, String> {
        m.get(k)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| format!("{k}: invalid number {v:?}"))
            })
            .transpose()
    };
    let mut q = Query::default();
    for (k, v) in &m {
        match k.as_str() {
            "follow" => q.follow = parse_bool(k, v)?,
            "previous" => q.previous = parse_bool(k, v)?,
            "timestamps" => q.timestamps = parse_bool(k, v)?,
            _ => {}
        }
    }
    // Negative tailLines means "all", as kubectl's --tail=-1.
    q.tail_lines = num("tailLines")?.and_then(|n| u64::try_from(n).ok());
    q.limit_bytes = match num("limitBytes")? {
        Some(n) if n < 1 => return Err("limitBytes: must be greater than 0".into()),
        n => n.map(|n| n as u64),
    };
    if let Some(s) = num("sinceSeconds")? {
        if s < 1 {
            return Err("sinceSeconds: must be greater than 0".into());
        }
        let back = jiff::SignedDuration::from_secs(s);
        q.since = Timestamp::now().checked_sub(back).ok();
    }
    if let Some(t) = m.get("sinceTime") {
        if q.since.is_some() {
            return Err("at most one of sinceTime or sinceSeconds may be specified".into());
        }
        q.since = Some(
            t.parse::<Timestamp>()
                .map_err(|e| format!("sinceTime: {e}"))?,
        );
    }
    q.stream = match m.get("stream").map(String::as_str) {
        None | Some("All") => None,
        Some("Stdout") => Some(Stream::Stdout),
        Some("Stderr") => Some(Stream::Stderr),
        Some(o) => return Err(format!("stream: invalid value {o:?}")),
    };
    Ok(q)
}

fn pod_dir(ctx: &Ctx, ns: &str, pod: &str) -> PathBuf {
    ctx.args.state_dir.join("pods").join(format!("{ns}_{pod}"))
}

async fn container_logs(
    ctx: &Ctx,
    ns: &str,
    pod: &str,
    container: &str,
    q: Query,
) -> Response<Body> {
    if ![ns, pod, container].iter().all(|s| valid_name(s)) {
        return text(
            StatusCode::BAD_REQUEST,
            "invalid namespace, pod or container name",
        );
    }
    let dir = pod_dir(ctx, ns, pod);
    if !dir.is_dir() {
        return text(
            StatusCode::NOT_FOUND,
            format!(
                "pod \"{pod}\" in namespace \"{ns}\" is not running on node \"{}\"",
                ctx.args.node_name
            ),
        );
    }
    let path = dir.join(format!("{container}.log"));
    // The handle stays open while following: the kubelet removes the pod dir right after the
    // process exits, and the last lines (the shutdown) must still be read from it.
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "container \"{container}\" in pod \"{pod}\" is waiting to start (or is not run by the process kubelet, which runs only the first container)"
                ),
            );
        }
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{}: {e}", path.display()),
            );
        }
    };
    let (asm, rest) = match logs::read_to_end(&mut file) {
        Ok(x) => x,
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{}: {e}", path.display()),
            );
        }
    };
    let mut limit = Limit(q.limit_bytes);
    if q.previous {
        if asm.starts < 2 {
            return text(
                StatusCode::BAD_REQUEST,
                format!("previous terminated container \"{container}\" in pod \"{pod}\" not found"),
            );
        }
        let out = render(&logs::select(&asm.previous, &q, true), &q, &mut limit);
        return stream_response(futures::stream::iter([Ok(Frame::data(Bytes::from(out)))]));
    }
    if !q.follow {
        let out = render(&logs::select(&asm.current, &q, true), &q, &mut limit);
        return stream_response(futures::stream::iter([Ok(Frame::data(Bytes::from(out)))]));
    }
    // Follow: lines are sent in file order, each once complete; a line still open at the end
    // waits, and so do the lines after it (a real runtime also emits in record order).
    let upto = asm
        .current
        .iter()
        .position(|l| !l.complete)
        .unwrap_or(asm.current.len());
    let first = render(
        &logs::select(&asm.current[..upto], &q, true),
        &q,
        &mut limit,
    );
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let file = tokio::fs::File::from_std(file);
    tokio::spawn(follow(path, file, asm, rest, upto, q, limit, first, tx));
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::io::Error>(Frame::data(b)), rx))
    });
    stream_response(body)
}

fn stream_response<S>(s: S) -> Response<Body>
where
    S: futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send + Sync + 'static,
{
    let mut r = Response::new(StreamBody::new(s).boxed());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    r
}

/// The bytes still allowed by `limitBytes`; `None` = unlimited.
struct Limit(Option<u64>);

impl Limit {
    fn exhausted(&self) -> bool {
        self.0 == Some(0)
    }
    fn take(&mut self, mut b: Vec<u8>) -> Vec<u8> {
        if let Some(left) = self.0.as_mut() {
            let n = b.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
            b.truncate(n);
            *left -= n as u64;
        }
        b
    }
}

fn render(lines: &[&Line], q: &Query, limit: &mut Limit) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend(logs::format_line(l, q.timestamps));
    }
    limit.take(out)
}

fn wanted(l: &Line, q: &Query) -> bool {
    q.since.is_none_or(|s| l.time >= s) && q.stream.is_none_or(|s| l.stream == s)
}

/// Streams the lines appended after `offset` until the container instance ends (a new start
/// header, or the pod dir is removed), `limitBytes` is used up, or the client goes away.
#[allow(clippy::too_many_arguments)]
async fn follow(
    path: PathBuf,
    mut file: tokio::fs::File,
    mut asm: Assembler,
    mut pending: Vec<u8>,
    mut next: usize,
    q: Query,
    mut limit: Limit,
    first: Vec<u8>,
    tx: mpsc::Sender<Bytes>,
) {
    if !first.is_empty() && tx.send(Bytes::from(first)).await.is_err() {
        return;
    }
    loop {
        if limit.exhausted() {
            return;
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
        }
        // Checked before the read, so whatever was written before the removal is still read.
        let mut ended = !path.exists();
        if file.read_to_end(&mut pending).await.is_err() {
            ended = true;
        }
        let mut out = Vec::new();
        if let Some(end) = pending.iter().rposition(|&b| b == b'\n') {
            for line in pending[..end].split(|&b| b == b'\n') {
                match logs::parse_line(line) {
                    Some(Entry::Start) => {
                        ended = true;
                        break;
                    }
                    Some(e) => asm.push(e),
                    None => {}
                }
            }
            pending.drain(..=end);
        }
        // Complete lines in order; at the end of the instance the open ones too.
        while let Some(l) = asm.current.get(next) {
            if !l.complete && !ended {
                break;
            }
            if wanted(l, &q) {
                out.extend(logs::format_line(l, q.timestamps));
            }
            next += 1;
        }
        let out = limit.take(out);
        if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
            return;
        }
        if ended {
            return;
        }
    }
}

/// Reads the CA files named on the command line.
pub fn load_ca(cert: &Path, key: &Path) -> anyhow::Result<(String, String)> {
    let c = std::fs::read_to_string(cert).with_context(|| format!("read {}", cert.display()))?;
    let k = std::fs::read_to_string(key).with_context(|| format!("read {}", key.display()))?;
    if c.trim().is_empty() || k.trim().is_empty() {
        return Err(anyhow!("empty CA certificate or key"));
    }
    Ok((c, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_as_kubectl_sends_it() {
        let q =
            parse_query("follow=true&tailLines=10&timestamps=true&limitBytes=500&stream=Stderr")
                .unwrap();
        assert!(q.follow && q.timestamps && !q.previous);
        assert_eq!(q.tail_lines, Some(10));
        assert_eq!(q.limit_bytes, Some(500));
        assert_eq!(q.stream, Some(Stream::Stderr));
        let q = parse_query("sinceTime=2026-12-01T10%3A00%3A00Z&tailLines=-1").unwrap();
        assert_eq!(q.since, Some("2026-12-01T10:00:00Z".parse().unwrap()));
        assert_eq!(q.tail_lines, None);
        let q = parse_query("sinceSeconds=60").unwrap();
        let since = q.since.unwrap();
        assert!(
            since < Timestamp::now()
                && since > Timestamp::now() - jiff::SignedDuration::from_secs(120)
        );
        assert!(parse_query("limitBytes=0").is_err());
        assert!(parse_query("follow=maybe").is_err());
        assert!(parse_query("sinceSeconds=5&sinceTime=2026-12-01T10:00:00Z").is_err());
        assert!(parse_query("stream=Both").is_err());
    }

    #[test]
    fn names_that_may_become_paths() {
        assert!(valid_name("partnergate-gateway-5d9c7b6f4-x2k8q"));
        assert!(valid_name("a.b"));
        for bad in ["", "..", ".hidden", "a/b", "A", "a%2F", "a b"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn limit_truncates() {
        let mut l = Limit(Some(5));
        assert_eq!(l.take(b"abc".to_vec()), b"abc");
        assert_eq!(l.take(b"defg".to_vec()), b"de");
        assert!(l.exhausted());
        let mut l = Limit(None);
        assert_eq!(l.take(b"abc".to_vec()), b"abc");
    }

    /// The kubelet removes the pod dir right after the process exits: what the process wrote
    /// last (its shutdown lines) must still reach a follower, which then ends.
    #[tokio::test]
    async fn follow_delivers_what_was_written_just_before_the_pod_dir_went() {
        use std::io::Write as _;
        let dir = std::env::temp_dir().join(format!("pg-kubelet-follow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.log");
        std::fs::write(
            &path,
            "=== process-kubelet 2026-12-01T10:00:00Z start #0: x\n\
             2026-12-01T10:00:01Z stdout F first\n",
        )
        .unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        let (asm, rest) = logs::read_to_end(&mut f).unwrap();
        assert_eq!(asm.current.len(), 1);
        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(follow(
            path.clone(),
            tokio::fs::File::from_std(f),
            asm,
            rest,
            1,
            Query {
                follow: true,
                ..Default::default()
            },
            Limit(None),
            Vec::new(),
            tx,
        ));
        // Written and removed within one poll interval, as when a process exits on SIGTERM.
        let mut w = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        w.write_all(b"2026-12-01T10:00:02Z stdout F got SIGTERM\n")
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let mut got = Vec::new();
        while let Some(b) = rx.recv().await {
            got.extend_from_slice(&b);
        }
        task.await.unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), "got SIGTERM\n");
    }

    #[test]
    fn only_masters_are_allowed() {
        let masters = Identity {
            user: "kube-apiserver-kubelet-client".into(),
            groups: vec!["system:masters".into()],
        };
        let node = Identity {
            user: "system:node:x".into(),
            groups: vec!["system:nodes".into()],
        };
        assert!(masters.allowed());
        assert!(!node.allowed());
        assert!(!Identity::default().allowed());
    }
}
