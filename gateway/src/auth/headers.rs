//! The header section held back while DKIM and DMARC are decided (they need the From: header
//! and the DKIM-Signature headers before anything of ours can be stamped above them), and the
//! rule that removes a client's Authentication-Results claiming our authserv-id. Pure.
//!
//! Bounded: at most `limits.maxHeaderSize` octets are held, once (un-stuffed); past that the
//! caller flushes and streams, and DKIM/DMARC evaluate to `permerror`.

/// Header lines as the next hop will store them (one leading dot removed per line, RFC 5321
/// 4.5.2): the one copy held. [`HeaderBlock::logical`] appends the empty line that ends the
/// section (what DKIM signed) in place, and [`HeaderBlock::wire_pieces`] re-stuffs the lines
/// for forwarding, so the section is never held twice.
#[derive(Debug)]
pub struct HeaderBlock {
    buf: Vec<u8>,
    /// Length of the header lines, without the empty line [`HeaderBlock::logical`] appends.
    fields: usize,
    limit: usize,
}

impl HeaderBlock {
    pub fn new(limit: usize) -> HeaderBlock {
        HeaderBlock {
            buf: Vec::with_capacity(4096.min(limit)),
            fields: 0,
            limit,
        }
    }

    /// Holds one header line in the wire form (with its CRLF). `false`: holding it would pass
    /// the limit; it is not held.
    pub fn push(&mut self, wire_line: &[u8]) -> bool {
        let line = wire_line.strip_prefix(b".").unwrap_or(wire_line);
        self.buf.truncate(self.fields);
        if self.buf.len() + line.len() > self.limit {
            return false;
        }
        self.buf.extend_from_slice(line);
        self.fields = self.buf.len();
        true
    }

    /// The header section and the empty line that ends it: what DKIM signed.
    pub fn logical(&mut self) -> &[u8] {
        self.buf.truncate(self.fields);
        self.buf.extend_from_slice(b"\r\n");
        &self.buf
    }

    /// The held lines in the dot-stuffed wire form, as pieces to write in order.
    pub fn wire_pieces(&self) -> impl Iterator<Item = &[u8]> {
        self.buf[..self.fields]
            .split_inclusive(|b| *b == b'\n')
            .flat_map(|l| {
                [
                    if l.starts_with(b".") {
                        &b"."[..]
                    } else {
                        &b""[..]
                    },
                    l,
                ]
            })
    }
}

const AUTH_RESULTS: &[u8] = b"authentication-results";

/// `logical`: the first line of a header field without its CRLF (un-stuffed). True when it is
/// an Authentication-Results field whose authserv-id is `id` (RFC 8601 5: a receiver removes
/// those it did not add), or whose authserv-id cannot be read on this line (a comment or
/// quoted string left open, folded onto a continuation line, which a line-at-a-time filter
/// cannot read; RFC 8601 5 lets a receiver remove any field it cannot trust).
///
/// The comments before the authserv-id are parsed as RFC 5322 3.2.2 defines them (nested,
/// with quoted-pairs), so `(a (b) c) <id>` and `(a \) b) <id>` are recognised: a downstream
/// parser reads the id there, so must we.
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
            match comment_end(value) {
                Some(end) => value = &value[end..],
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
    let token: Vec<u8> = if value[0] == b'"' {
        // A quoted-string: quoted-pairs stand for the character they escape.
        let mut out = Vec::new();
        let mut it = value[1..].iter();
        loop {
            match it.next() {
                Some(b'"') => break,
                Some(b'\\') => match it.next() {
                    Some(c) => out.push(*c),
                    None => return true,
                },
                Some(c) => out.push(*c),
                // Left open: folded onto the next line.
                None => return true,
            }
        }
        out
    } else {
        let end = value
            .iter()
            .position(|b| matches!(b, b';' | b' ' | b'\t' | b'('))
            .unwrap_or(value.len());
        value[..end].to_vec()
    };
    token.eq_ignore_ascii_case(id.as_bytes())
}

/// `b` starts with `(`: the length of the comment (nested comments and quoted-pairs, RFC 5322
/// 3.2.2), or `None` when it does not close on this line.
fn comment_end(b: &[u8]) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn trim_start(b: &[u8]) -> &[u8] {
    let i = b
        .iter()
        .position(|c| *c != b' ' && *c != b'\t')
        .unwrap_or(b.len());
    &b[i..]
}

/// Why a header section is not authenticated as it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderProblem {
    /// Over `limits.maxHeaderSize`: not held, not evaluated.
    OverLimit,
    /// A line that is neither a header field nor a continuation before the empty line (or no
    /// field at all). Parsers disagree on where such a section ends (`mail-auth` ends it at
    /// that line, Postfix and most MUAs read the rest as body or as headers), so a signature
    /// verified on one reading would be stamped on a message read another way.
    Malformed,
    /// More than one From: field, or From: addresses of more than one domain (RFC 5322 3.6
    /// allows one field; RFC 7489 6.6.1: DMARC cannot judge such a message, and a reader may
    /// show the author it was not applied to).
    MultipleFrom,
    /// A From: field without an address DMARC can read (RFC 7489 6.6.1: no single properly
    /// formed From:), though a reader may still show one.
    FromNotParsable,
}

impl HeaderProblem {
    pub fn reason(self) -> &'static str {
        match self {
            HeaderProblem::OverLimit => "header section over limits.maxHeaderSize",
            HeaderProblem::Malformed => "malformed header section",
            HeaderProblem::MultipleFrom => "more than one From: field or domain",
            HeaderProblem::FromNotParsable => "no address in the From: field",
        }
    }
}

/// Our own reading of the held header section (`logical`: un-stuffed, ending with the empty
/// line), independent of `mail-auth`'s parser: every line is a field (`name:` with RFC 5322
/// ftext, white space before the colon allowed as obsolete syntax) or a continuation of one;
/// and exactly one From: field at most.
pub fn check_section(logical: &[u8]) -> Option<HeaderProblem> {
    let Some(section) = logical.strip_suffix(b"\r\n") else {
        return Some(HeaderProblem::Malformed);
    };
    let mut from_fields = 0usize;
    let mut fields = 0usize;
    for line in section.split_inclusive(|b| *b == b'\n') {
        let Some(line) = line.strip_suffix(b"\r\n") else {
            return Some(HeaderProblem::Malformed);
        };
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            if fields == 0 {
                return Some(HeaderProblem::Malformed);
            }
            continue;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            return Some(HeaderProblem::Malformed);
        };
        let name = line[..colon].trim_ascii_end();
        if name.is_empty() || !name.iter().all(|b| (33..=126).contains(b)) {
            return Some(HeaderProblem::Malformed);
        }
        fields += 1;
        if name.eq_ignore_ascii_case(b"from") {
            from_fields += 1;
        }
    }
    if fields == 0 {
        return Some(HeaderProblem::Malformed);
    }
    (from_fields > 1).then_some(HeaderProblem::MultipleFrom)
}

/// How many From: fields the section has as readers count them (obsolete white space before
/// the colon included). `mail-auth` does not count `From :`, so the caller compares: a From:
/// the DMARC library does not see must not pass unjudged.
pub fn from_fields(logical: &[u8]) -> usize {
    logical
        .split_inclusive(|b| *b == b'\n')
        .filter_map(|l| l.iter().position(|b| *b == b':').map(|c| &l[..c]))
        .filter(|name| name.trim_ascii_end().eq_ignore_ascii_case(b"from"))
        .count()
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
            // Nested comments and quoted-pairs (RFC 5322 3.2.2) before the id.
            "Authentication-Results: (a (b) c) gw.example.org; dkim=pass",
            "Authentication-Results: (a \\) b) gw.example.org; dkim=pass",
            "Authentication-Results: (a (b (c)) d) (e) gw.example.org; dkim=pass",
            "Authentication-Results: (a \\( b) gw.example.org; dkim=pass",
            "Authentication-Results: \"gw.example\\.org\"; dkim=pass",
            "Authentication-Results: \"gw.example.org",
            "Authentication-Results: (a (b) folded",
        ] {
            assert!(claims_authserv_id(forged.as_bytes(), id), "{forged}");
        }
        for kept in [
            "Authentication-Results: mx.partner.example; dkim=pass",
            "Authentication-Results: gw.example.org.evil; spf=pass",
            "Authentication-Results-Original: gw.example.org; spf=pass",
            "X-Authentication-Results: gw.example.org; spf=pass",
            "Subject: Authentication-Results: gw.example.org",
            "Authentication-Results: (gw.example.org) mx.partner.example; dkim=pass",
            "Authentication-Results: (a (gw.example.org) b) mx.partner.example; dkim=pass",
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
        let wire: Vec<u8> = b.wire_pieces().flatten().copied().collect();
        assert_eq!(wire, b"From: a@b.example\r\n..x: y\r\n");
        assert_eq!(b.logical(), b"From: a@b.example\r\n.x: y\r\n\r\n");
        assert_eq!(
            b.logical(),
            b"From: a@b.example\r\n.x: y\r\n\r\n",
            "idempotent"
        );
        let wire: Vec<u8> = b.wire_pieces().flatten().copied().collect();
        assert_eq!(wire, b"From: a@b.example\r\n..x: y\r\n");
    }

    #[test]
    fn section_check_finds_non_fields_and_several_from_fields() {
        let ok = b"From: <a@b.example>\r\nSubject: x\r\n\tfolded\r\nX-Obs : y\r\n\r\n";
        assert_eq!(check_section(ok), None);
        for (bad, why) in [
            (
                &b"From: <a@b.example>\r\ninjected line\r\n\r\n"[..],
                HeaderProblem::Malformed,
            ),
            (
                b"From: <a@b.example>\r\n: no name\r\n\r\n",
                HeaderProblem::Malformed,
            ),
            (
                b"\tcontinuation first\r\nFrom: <a@b.example>\r\n\r\n",
                HeaderProblem::Malformed,
            ),
            (b"Bad Name: x\r\n\r\n", HeaderProblem::Malformed),
            (b"\r\n", HeaderProblem::Malformed),
            (
                b"From: <a@b.example>\r\nfrom : <c@d.example>\r\n\r\n",
                HeaderProblem::MultipleFrom,
            ),
        ] {
            assert_eq!(
                check_section(bad),
                Some(why),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
