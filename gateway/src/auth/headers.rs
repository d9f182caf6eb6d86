//! The header section held back while DKIM and DMARC are decided (they need the From: header
//! and the DKIM-Signature headers before anything of ours can be stamped above them), and the
//! rule that removes a client's Authentication-Results claiming our authserv-id. Pure.
//!
//! Bounded: at most `limits.maxHeaderSize` octets are held; past that the caller flushes and
//! streams, and DKIM/DMARC evaluate to `permerror`.

/// Header lines in the dot-stuffed wire form, forwarded unchanged once decided.
#[derive(Debug)]
pub struct HeaderBlock {
    wire: Vec<u8>,
    limit: usize,
}

impl HeaderBlock {
    pub fn new(limit: usize) -> HeaderBlock {
        HeaderBlock {
            wire: Vec::with_capacity(4096.min(limit)),
            limit,
        }
    }

    /// Holds one header line (with its CRLF). `false`: holding it would pass the limit; it is
    /// not held.
    pub fn push(&mut self, line: &[u8]) -> bool {
        if self.wire.len() + line.len() > self.limit {
            return false;
        }
        self.wire.extend_from_slice(line);
        true
    }

    pub fn wire(&self) -> &[u8] {
        &self.wire
    }

    /// The header section as the next hop will store it (one leading dot removed per line,
    /// RFC 5321 4.5.2) and the empty line that ends it: what DKIM signed.
    pub fn logical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.wire.len() + 2);
        for line in self.wire.split_inclusive(|b| *b == b'\n') {
            out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

const AUTH_RESULTS: &[u8] = b"authentication-results";

/// `logical`: the first line of a header field without its CRLF (un-stuffed). True when it is
/// an Authentication-Results field whose authserv-id is `id` (RFC 8601 5: a receiver removes
/// those it did not add), or whose authserv-id is folded onto a continuation line, which a
/// line-at-a-time filter cannot read; such a folded field is removed too (RFC 8601 5 lets a
/// receiver remove any field it cannot trust).
pub fn claims_authserv_id(logical: &[u8], id: &str) -> bool {
    let n = AUTH_RESULTS.len();
    if logical.len() < n || !logical[..n].eq_ignore_ascii_case(AUTH_RESULTS) {
        return false;
    }
    let rest = &logical[n..];
    let Some(colon) = rest.iter().position(|b| *b != b' ' && *b != b'\t') else {
        return false;
    };
    if rest[colon] != b':' {
        return false;
    }
    let mut value = &rest[colon + 1..];
    // Leading white space and comments (RFC 5322 CFWS) before the authserv-id.
    loop {
        value = trim_start(value);
        if value.first() == Some(&b'(') {
            match value.iter().position(|b| *b == b')') {
                Some(end) => value = &value[end + 1..],
                // A comment folded onto the next line: the id cannot be read here.
                None => return true,
            }
        } else {
            break;
        }
    }
    if value.is_empty() {
        return true;
    }
    let token: &[u8] = if value[0] == b'"' {
        let inner = &value[1..];
        &inner[..inner.iter().position(|b| *b == b'"').unwrap_or(inner.len())]
    } else {
        let end = value
            .iter()
            .position(|b| matches!(b, b';' | b' ' | b'\t' | b'('))
            .unwrap_or(value.len());
        &value[..end]
    };
    token.eq_ignore_ascii_case(id.as_bytes())
}

fn trim_start(b: &[u8]) -> &[u8] {
    let i = b
        .iter()
        .position(|c| *c != b' ' && *c != b'\t')
        .unwrap_or(b.len());
    &b[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authserv_id_match() {
        let id = "gw.example.org";
        for forged in [
            "Authentication-Results: gw.example.org; dkim=pass",
            "authentication-results:GW.EXAMPLE.ORG;spf=pass",
            "Authentication-Results : (comment) gw.example.org 1; none",
            "Authentication-Results: \"gw.example.org\"; dmarc=pass",
            "Authentication-Results:",
            "Authentication-Results:   ",
            "Authentication-Results: (folded comment",
        ] {
            assert!(claims_authserv_id(forged.as_bytes(), id), "{forged}");
        }
        for kept in [
            "Authentication-Results: mx.partner.example; dkim=pass",
            "Authentication-Results: gw.example.org.evil; spf=pass",
            "Authentication-Results-Original: gw.example.org; spf=pass",
            "X-Authentication-Results: gw.example.org; spf=pass",
            "Subject: Authentication-Results: gw.example.org",
        ] {
            assert!(!claims_authserv_id(kept.as_bytes(), id), "{kept}");
        }
    }

    #[test]
    fn block_is_bounded_and_unstuffs_for_parsing() {
        let mut b = HeaderBlock::new(40);
        assert!(b.push(b"From: a@b.example\r\n"));
        assert!(b.push(b"..x: y\r\n"));
        assert!(!b.push(b"Subject: this line does not fit\r\n"));
        assert_eq!(b.wire(), b"From: a@b.example\r\n..x: y\r\n");
        assert_eq!(b.logical(), b"From: a@b.example\r\n.x: y\r\n\r\n");
    }
}
