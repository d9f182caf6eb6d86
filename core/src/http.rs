//! The admin-port HTTP server behind both binaries (the gateway's /healthz, /readyz, /metrics,
//! /status and the operator's /healthz, /readyz, /metrics), on hyper's HTTP/1.1 server.
//!
//! Routes are a plain function of the path so they are tested without sockets. Only GET and
//! HEAD are served (405 otherwise); a request head must arrive within 5 s and fit in 16 KiB,
//! and a connection lives at most 30 s, so a slow or idle client cannot pile up connections.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// (status, content type, body).
pub type Response = (u16, &'static str, String);

/// Read buffer, so the longest request head accepted (hyper refuses a longer one with 431).
const MAX_HEAD: usize = 16 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// The reply to one request: `route(path)` (query string removed) for GET and HEAD, 405 for
/// anything else.
fn respond<F>(route: &F, method: &Method, path: &str) -> hyper::Response<Full<Bytes>>
where
    F: Fn(&str) -> Response,
{
    let (code, ctype, body) = if method == Method::GET || method == Method::HEAD {
        route(path)
    } else {
        (405, "text/plain", "method not allowed\n".into())
    };
    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}

/// Serves `route` on `listener` until the task is dropped.
pub async fn serve<F>(listener: TcpListener, route: F)
where
    F: Fn(&str) -> Response + Send + Sync + 'static,
{
    let route = Arc::new(route);
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "accept on the admin listener failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let route = route.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let resp = respond(&*route, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .keep_alive(false)
                .serve_connection(TokioIo::new(tcp), service);
            // Errors are the client's (bad request, reset); nothing to do but close.
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn route(path: &str) -> Response {
        match path {
            "/healthz" => (200, "text/plain", "ok\n".into()),
            "/readyz" => (503, "text/plain", "not ready\n".into()),
            _ => (404, "text/plain", "not found\n".into()),
        }
    }

    async fn exchange(addr: std::net::SocketAddr, request: &str) -> String {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn routes_methods_and_query_strings() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, route));
        let ok = exchange(addr, "GET /healthz?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains("content-type: text/plain"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nok\n"), "{ok}");
        let head = exchange(addr, "HEAD /healthz HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(
            head.starts_with("HTTP/1.1 200 OK") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        let busy = exchange(addr, "GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
        let post = exchange(
            addr,
            "POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let missing = exchange(addr, "GET /nope HTTP/1.0\r\n\r\n").await;
        assert!(
            missing.starts_with("HTTP/1.0 404") || missing.starts_with("HTTP/1.1 404"),
            "{missing}"
        );
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, route));
        let big = format!(
            "GET /healthz HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = tcp.write_all(big.as_bytes()).await;
        let mut out = Vec::new();
        let _ = tcp.read_to_end(&mut out).await;
        let out = String::from_utf8_lossy(&out);
        assert!(!out.contains("200 OK"), "{out}");
    }
}
