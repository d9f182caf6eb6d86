//! PROXY protocol v2 (haproxy's spec, section 2.2), written by hand: we need only the fixed
//! header and the INET/INET6 source address, and a parser of ~40 lines is easier to audit than a
//! dependency. Only peers in `trustedProxies` may send it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

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

#[cfg(test)]
mod tests {
    use super::*;

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
