//! PROXY protocol v2 (haproxy's spec, section 2.2), parsed by the `ppp` crate: the binary
//! header only (no v1 text), PROXY and LOCAL commands, INET/INET6 source addresses, TLVs
//! skipped. Only peers in `trustedProxies` may send it; [`Guard`] closes any other connection
//! whose first bytes are a PROXY v2 signature (a load balancer we do not trust, or a second
//! header), instead of feeding binary to the SMTP parser.
//!
//! Invariants: the read is bounded (the fixed 16 bytes are validated before the length they
//! announce, at most `u16::MAX`, is read); a header `ppp` rejects closes the connection. `ppp`
//! is stricter than the hand-written parser it replaced in one respect, as the spec asks:
//! address family or transport values the spec does not define are rejected instead of
//! falling back to the proxy's own address, and a LOCAL header must carry as many address bytes
//! as its family needs (no known proxy sends either).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use ppp::v2;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The 12-byte PROXY v2 signature.
pub const SIGNATURE: &[u8] = v2::PROTOCOL_PREFIX;
/// Fixed part: signature, version/command, family/protocol, length.
pub const HEADER_LEN: usize = 16;

/// Why a trusted proxy's header was refused (the connection is closed either way; the kinds
/// keep `ppp`'s errors apart, for tests).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY v2 signature")]
    BadSignature,
    /// A version other than 2, or a command other than LOCAL and PROXY.
    #[error("unsupported PROXY version or command")]
    BadVersion,
    /// An address family or transport protocol the spec does not define.
    #[error("undefined PROXY address family or transport")]
    BadFamily,
    /// Fewer address bytes than the family needs.
    #[error("PROXY header shorter than its address family needs")]
    Truncated,
}

impl From<v2::ParseError> for ProxyError {
    fn from(e: v2::ParseError) -> ProxyError {
        use v2::ParseError as E;
        match e {
            E::Prefix => ProxyError::BadSignature,
            E::Version(_) | E::Command(_) => ProxyError::BadVersion,
            E::AddressFamily(_) | E::Protocol(_) => ProxyError::BadFamily,
            E::Incomplete(_)
            | E::Partial(..)
            | E::InvalidAddresses(..)
            | E::InvalidTLV(..)
            | E::Leftovers(_) => ProxyError::Truncated,
        }
    }
}

/// Validates the fixed 16 bytes; returns how many address and TLV bytes follow.
pub fn parse_fixed(h: &[u8; HEADER_LEN]) -> Result<usize, ProxyError> {
    match v2::Header::try_from(&h[..]) {
        Ok(_) => Ok(0),
        // The fixed part is valid and announces this many more bytes.
        Err(v2::ParseError::Partial(_, len)) => Ok(len),
        Err(e) => Err(e.into()),
    }
}

/// The client address the proxy reports; `None` for LOCAL (health checks) or families we do
/// not route on (UNIX, UNSPEC), in which case the proxy's own address is used.
pub fn source(h: &[u8; HEADER_LEN], rest: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    let mut whole = Vec::with_capacity(HEADER_LEN + rest.len());
    whole.extend_from_slice(h);
    whole.extend_from_slice(rest);
    let header = v2::Header::try_from(whole.as_slice())?;
    if header.command == v2::Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        v2::Addresses::IPv6(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        v2::Addresses::Unix(_) | v2::Addresses::Unspecified => None,
    })
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
    use std::net::Ipv6Addr;
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
        assert_eq!(match_signature(0, SIGNATURE), Some(12));
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
        peer.write_all(SIGNATURE).await.unwrap();
        let n = g.read(&mut buf).await.unwrap();
        assert_eq!(n, SIGNATURE.len());
        g.write_all(b"250 OK\r\n").await.unwrap();
        let n = peer.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"250 OK\r\n");
    }

    fn header(cmd: u8, fam: u8, addr: &[u8]) -> ([u8; HEADER_LEN], Vec<u8>) {
        let mut h = [0u8; HEADER_LEN];
        h[..12].copy_from_slice(SIGNATURE);
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

    #[test]
    fn tlvs_are_skipped_and_undefined_families_rejected() {
        // INET with a NOOP TLV (type 4, length 2) after the addresses, as HAProxy sends.
        let mut a = vec![198, 51, 100, 2, 10, 0, 0, 1, 0x01, 0xBB, 0, 25];
        a.extend_from_slice(&[0x04, 0, 2, 0, 0]);
        let (h, rest) = header(1, 0x11, &a);
        assert_eq!(parse_fixed(&h), Ok(17));
        assert_eq!(
            source(&h, &rest),
            Ok(Some("198.51.100.2:443".parse().unwrap()))
        );
        // UNIX addresses (216 bytes) leave the proxy's own address in place.
        let (h, rest) = header(1, 0x31, &[0u8; 216]);
        assert_eq!(source(&h, &rest), Ok(None));
        let (h, _) = header(1, 0x41, &[0u8; 12]);
        assert_eq!(parse_fixed(&h), Err(ProxyError::BadFamily));
        let (h, _) = header(1, 0x13, &[0u8; 12]);
        assert_eq!(parse_fixed(&h), Err(ProxyError::BadFamily));
        let (h, _) = header(2, 0x11, &[0u8; 12]);
        assert_eq!(parse_fixed(&h), Err(ProxyError::BadVersion));
    }
}
