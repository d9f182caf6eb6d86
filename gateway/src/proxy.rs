//! PROXY protocol v2 (haproxy's spec, section 2.2), written by hand: we need only the fixed
//! header and the INET/INET6 source address, and a parser of ~40 lines is easier to audit than a
//! dependency. Only peers in `trustedProxies` may send it; [`Guard`] closes any other
//! connection whose first bytes are a PROXY v2 signature (a load balancer we do not trust, or a
//! second header), instead of feeding binary to the SMTP parser.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Fixed part: signature, version/command, family/protocol, length.
pub const HEADER_LEN: usize = 16;

#[derive(Debug, PartialEq, Eq)]
pub enum ProxyError {
    BadSignature,
    BadVersion,
    Truncated,
}

/// Validates the fixed 16 bytes; returns how many address bytes follow.
pub fn parse_fixed(h: &[u8; HEADER_LEN]) -> Result<usize, ProxyError> {
    if h[..12] != SIGNATURE {
        return Err(ProxyError::BadSignature);
    }
    if h[12] >> 4 != 2 || (h[12] & 0x0F) > 1 {
        return Err(ProxyError::BadVersion);
    }
    Ok(u16::from_be_bytes([h[14], h[15]]) as usize)
}

/// The client address the proxy reports; `None` for LOCAL (health checks) or families we do
/// not route on (UNIX, UNSPEC), in which case the proxy's own address is used.
pub fn source(h: &[u8; HEADER_LEN], rest: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    if h[12] & 0x0F == 0 {
        return Ok(None);
    }
    match h[13] >> 4 {
        1 => {
            if rest.len() < 12 {
                return Err(ProxyError::Truncated);
            }
            let ip = Ipv4Addr::new(rest[0], rest[1], rest[2], rest[3]);
            let port = u16::from_be_bytes([rest[8], rest[9]]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        2 => {
            if rest.len() < 36 {
                return Err(ProxyError::Truncated);
            }
            let mut b = [0u8; 16];
            b.copy_from_slice(&rest[..16]);
            let port = u16::from_be_bytes([rest[32], rest[33]]);
            Ok(Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), port)))
        }
        _ => Ok(None),
    }
}

/// The client stream once any trusted PROXY header has been consumed. Watches the first bytes
/// the session reads: if they are a PROXY v2 signature the read fails (the session closes
/// without a reply). Costs one comparison per byte of the first line, nothing after.
pub struct Guard<S> {
    inner: S,
    /// Signature bytes matched so far; `None` once the stream is known not to start with one.
    matched: Option<usize>,
    client: IpAddr,
}

impl<S> Guard<S> {
    pub fn new(inner: S, client: IpAddr) -> Guard<S> {
        Guard {
            inner,
            matched: Some(0),
            client,
        }
    }
}

/// Advances a signature match over `bytes`: `Some(n)` bytes matched so far (12 = a whole
/// signature, whatever follows it), `None` on a mismatch.
pub fn match_signature(matched: usize, bytes: &[u8]) -> Option<usize> {
    let mut m = matched;
    for b in bytes {
        if m == SIGNATURE.len() {
            break;
        }
        if *b != SIGNATURE[m] {
            return None;
        }
        m += 1;
    }
    Some(m)
}

impl<S: AsyncRead + Unpin> AsyncRead for Guard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(m)) = (&r, this.matched) {
            this.matched = match_signature(m, &buf.filled()[before..]);
            if this.matched == Some(SIGNATURE.len()) {
                tracing::info!(target: "decision", client_ip = %this.client, rule = "proxyProtocol", outcome = "closed",
                    "PROXY v2 header from a peer outside trustedProxies (or a second header)");
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "unexpected PROXY protocol header",
                )));
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn signature_matching_across_reads() {
        assert_eq!(match_signature(0, b"EHLO x\r\n"), None);
        assert_eq!(match_signature(0, b"\r\n"), Some(2));
        assert_eq!(match_signature(2, b"\r\n\0"), Some(5));
        assert_eq!(match_signature(5, b"\r\nQUIT\n"), Some(12));
        assert_eq!(match_signature(12, b"!"), Some(12));
        assert_eq!(
            match_signature(0, b"\r\n\r\n\0\r\nQUIT\n\x21\x11"),
            Some(12)
        );
        assert_eq!(match_signature(0, &SIGNATURE), Some(12));
        assert_eq!(match_signature(4, b"X"), None);
    }

    #[tokio::test]
    async fn guard_fails_a_read_that_completes_the_signature_and_passes_smtp() {
        let (mut peer, ours) = tokio::io::duplex(1024);
        let mut g = Guard::new(ours, "192.0.2.1".parse().unwrap());
        let mut header = SIGNATURE.to_vec();
        header.extend_from_slice(&[0x21, 0x11, 0, 12]);
        peer.write_all(&header).await.unwrap();
        let mut buf = [0u8; 64];
        assert!(g.read(&mut buf).await.is_err());

        let (mut peer, ours) = tokio::io::duplex(1024);
        let mut g = Guard::new(ours, "192.0.2.1".parse().unwrap());
        peer.write_all(b"EHLO a\r\n").await.unwrap();
        let n = g.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"EHLO a\r\n");
        // Later bytes are not inspected.
        peer.write_all(&SIGNATURE).await.unwrap();
        let n = g.read(&mut buf).await.unwrap();
        assert_eq!(n, SIGNATURE.len());
        g.write_all(b"250 OK\r\n").await.unwrap();
        let n = peer.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"250 OK\r\n");
    }

    fn header(cmd: u8, fam: u8, addr: &[u8]) -> ([u8; HEADER_LEN], Vec<u8>) {
        let mut h = [0u8; HEADER_LEN];
        h[..12].copy_from_slice(&SIGNATURE);
        h[12] = 0x20 | cmd;
        h[13] = fam;
        h[14..16].copy_from_slice(&(addr.len() as u16).to_be_bytes());
        (h, addr.to_vec())
    }

    #[test]
    fn inet_inet6_local() {
        let (h, rest) = header(1, 0x11, &[203, 0, 113, 7, 10, 0, 0, 1, 0x30, 0x39, 0, 25]);
        assert_eq!(parse_fixed(&h), Ok(12));
        assert_eq!(
            source(&h, &rest),
            Ok(Some("203.0.113.7:12345".parse().unwrap()))
        );
        let mut a = vec![0u8; 36];
        a[..16].copy_from_slice(&"2001:db8:1::9".parse::<Ipv6Addr>().unwrap().octets());
        a[32..34].copy_from_slice(&25u16.to_be_bytes());
        let (h, rest) = header(1, 0x21, &a);
        assert_eq!(
            source(&h, &rest),
            Ok(Some("[2001:db8:1::9]:25".parse().unwrap()))
        );
        let (h, rest) = header(0, 0, &[]);
        assert_eq!(source(&h, &rest), Ok(None));
        let (h, rest) = header(1, 0x11, &[1, 2, 3]);
        assert_eq!(source(&h, &rest), Err(ProxyError::Truncated));
        let mut bad = h;
        bad[0] = b'P';
        assert_eq!(parse_fixed(&bad), Err(ProxyError::BadSignature));
        let mut bad = h;
        bad[12] = 0x11;
        assert_eq!(parse_fixed(&bad), Err(ProxyError::BadVersion));
    }
}
