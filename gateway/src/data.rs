//! The DATA phase as a pure line filter: finds the end of data, enforces the smuggling, line and
//! size rules, and strips `X-Partnergate-Connector:` headers and Authentication-Results headers
//! claiming our authserv-id (RFC 8601 5). The session feeds it lines in the
//! dot-stuffed wire form and forwards what it says to forward unchanged (the next hop
//! un-stuffs), so the message is streamed and never un-stuffed or buffered whole here.

/// Why a message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataError {
    /// A bare LF or bare CR (SMTP smuggling, CVE-2023-51764).
    BareLineEnding,
    LineTooLong,
    TooBig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Forward,
    Drop,
    /// The `<CRLF>.<CRLF>` terminator; forward it only if no error occurred.
    End,
}

pub const OUR_HEADER: &[u8] = b"x-partnergate-connector";

#[derive(Debug)]
pub struct DataFilter {
    max_size: u64,
    max_line: usize,
    size: u64,
    /// The previous line ended with CRLF, so a `.` line now is the terminator.
    prev_crlf: bool,
    in_long_line: bool,
    in_headers: bool,
    /// Dropping a stripped header's continuation lines. Starts true: a continuation line at the
    /// very top would otherwise fold into the headers we prepend.
    dropping: bool,
    /// Our authserv-id (the fleet hostname): a client's Authentication-Results claiming it is
    /// stripped.
    authserv_id: Option<String>,
    pub error: Option<DataError>,
}

fn is_our_header(logical: &[u8]) -> bool {
    let n = OUR_HEADER.len();
    if logical.len() < n || !logical[..n].eq_ignore_ascii_case(OUR_HEADER) {
        return false;
    }
    // RFC 5322 obsolete syntax allows white space before the colon.
    logical[n..]
        .iter()
        .find(|b| **b != b' ' && **b != b'\t')
        .is_some_and(|b| *b == b':')
}

impl DataFilter {
    pub fn new(max_size: u64, max_line: usize) -> DataFilter {
        DataFilter {
            max_size,
            max_line,
            size: 0,
            prev_crlf: true,
            in_long_line: false,
            in_headers: true,
            dropping: true,
            authserv_id: None,
            error: None,
        }
    }

    /// Also strip Authentication-Results headers whose authserv-id is `id`.
    pub fn with_authserv_id(mut self, id: &str) -> DataFilter {
        self.authserv_id = Some(id.to_string());
        self
    }

    /// Still in the header section: the empty line that ends it has not been seen.
    pub fn in_headers(&self) -> bool {
        self.in_headers
    }

    fn fail(&mut self, e: DataError) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    /// Part of a line with no LF yet that already exceeds the line limit.
    pub fn push_fragment(&mut self, bytes: &[u8]) {
        self.size = self.size.saturating_add(bytes.len() as u64);
        self.fail(DataError::LineTooLong);
        self.in_long_line = true;
        self.prev_crlf = false;
    }

    /// One line including its LF.
    pub fn push_line(&mut self, line: &[u8]) -> Action {
        if line == b".\r\n" && self.prev_crlf && !self.in_long_line {
            return Action::End;
        }
        let ends_crlf = line.ends_with(b"\r\n");
        let body = if ends_crlf {
            &line[..line.len() - 2]
        } else {
            line.strip_suffix(b"\n").unwrap_or(line)
        };
        if !ends_crlf || body.iter().any(|b| *b == b'\r' || *b == b'\n') {
            self.fail(DataError::BareLineEnding);
        }
        // Only the bytes `<CRLF>.<CRLF>` end DATA: a bare CR inside a line does not change
        // whether that line ended in CRLF.
        self.prev_crlf = ends_crlf;
        self.size = self.size.saturating_add(line.len() as u64);
        if self.size > self.max_size {
            self.fail(DataError::TooBig);
        }
        let was_long = std::mem::take(&mut self.in_long_line);
        if was_long || line.len() > self.max_line {
            self.fail(DataError::LineTooLong);
        }
        if self.error.is_some() {
            return Action::Drop;
        }
        if !self.in_headers {
            return Action::Forward;
        }
        // The next hop deletes one leading dot (RFC 5321 4.5.2), so judge the line as it will
        // be read there: `.X-Partnergate-Connector:` must be caught too.
        let logical = body.strip_prefix(b".").unwrap_or(body);
        if logical.is_empty() {
            self.in_headers = false;
            self.dropping = false;
            return Action::Forward;
        }
        if logical[0] == b' ' || logical[0] == b'\t' {
            return if self.dropping {
                Action::Drop
            } else {
                Action::Forward
            };
        }
        self.dropping = is_our_header(logical)
            || self
                .authserv_id
                .as_deref()
                .is_some_and(|id| crate::auth::headers::claims_authserv_id(logical, id));
        if self.dropping {
            Action::Drop
        } else {
            Action::Forward
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8], max_size: u64, max_line: usize) -> (Vec<u8>, Option<DataError>, bool) {
        let mut f = DataFilter::new(max_size, max_line);
        let mut out = Vec::new();
        let mut ended = false;
        let mut rest = input;
        while !rest.is_empty() {
            let n = rest
                .iter()
                .position(|b| *b == b'\n')
                .map_or(rest.len(), |i| i + 1);
            let (line, tail) = rest.split_at(n);
            rest = tail;
            match f.push_line(line) {
                Action::Forward => out.extend_from_slice(line),
                Action::Drop => {}
                Action::End => {
                    ended = true;
                    break;
                }
            }
        }
        (out, f.error, ended)
    }

    #[test]
    fn strips_our_header_with_continuations_case_insensitive() {
        let msg = b" orphan\r\nX-Partnergate-Connector: forged\r\n\tcontinued\r\nSubject: hi\r\nx-partnergate-connector : again\r\n.X-PARTNERGATE-CONNECTOR: dotted\r\n folded\r\nX-Partnergate-Connectors: other\r\n\r\nX-Partnergate-Connector: in body\r\n..dot\r\n.\r\n";
        let (out, err, ended) = run(msg, 1 << 20, 1000);
        assert!(ended);
        assert_eq!(err, None);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "Subject: hi\r\nX-Partnergate-Connectors: other\r\n\r\nX-Partnergate-Connector: in body\r\n..dot\r\n"
        );
    }

    #[test]
    fn strips_authentication_results_claiming_our_authserv_id() {
        let msg = b"Authentication-Results: gw.example; dkim=pass\r\n\tdmarc=pass\r\nAuthentication-Results: mx.partner.example; spf=pass\r\n.authentication-results:GW.EXAMPLE;spf=pass\r\nSubject: x\r\n\r\nAuthentication-Results: gw.example; in body\r\n.\r\n";
        let mut f = DataFilter::new(1 << 20, 1000).with_authserv_id("gw.example");
        let mut out = Vec::new();
        for line in msg.split_inclusive(|b| *b == b'\n') {
            match f.push_line(line) {
                Action::Forward => out.extend_from_slice(line),
                Action::Drop => {}
                Action::End => break,
            }
        }
        assert_eq!(
            String::from_utf8_lossy(&out),
            "Authentication-Results: mx.partner.example; spf=pass\r\nSubject: x\r\n\r\nAuthentication-Results: gw.example; in body\r\n"
        );
        // Without an authserv-id (as before) nothing but our connector header is stripped.
        let (out, _, _) = run(msg, 1 << 20, 1000);
        assert!(
            String::from_utf8_lossy(&out)
                .starts_with("Authentication-Results: gw.example; dkim=pass")
        );
    }

    #[test]
    fn bare_lf_and_cr_are_refused_and_do_not_end_data() {
        let (_, err, ended) = run(b"a\r\nb\n.\nMAIL FROM:<x>\r\n.\r\n", 1 << 20, 1000);
        assert_eq!(err, Some(DataError::BareLineEnding));
        // `.\r\n` right after a bare-LF line is not `<CRLF>.<CRLF>`... but the next one is.
        assert!(ended);
        let (_, err, _) = run(b"a\rb\r\n.\r\n", 1 << 20, 1000);
        assert_eq!(err, Some(DataError::BareLineEnding));
        let mut f = DataFilter::new(1 << 20, 1000);
        assert_eq!(f.push_line(b"x\n"), Action::Drop);
        assert_eq!(f.push_line(b".\r\n"), Action::Drop, "not preceded by CRLF");
        assert_eq!(f.push_line(b".\r\n"), Action::End);
        let mut f = DataFilter::new(1 << 20, 1000);
        assert_eq!(f.push_line(b"x\r.\r\n"), Action::Drop);
        assert_eq!(
            f.push_line(b".\r\n"),
            Action::End,
            "a literal <CRLF>.<CRLF>"
        );
        assert_eq!(f.error, Some(DataError::BareLineEnding));
    }

    #[test]
    fn size_and_line_limits() {
        let (_, err, ended) = run(b"Subject: x\r\n\r\n0123456789\r\n.\r\n", 20, 1000);
        assert_eq!(err, Some(DataError::TooBig));
        assert!(ended);
        let long = [b"a".repeat(1000).as_slice(), b"\r\n.\r\n"].concat();
        let (_, err, ended) = run(&long, 1 << 20, 1000);
        assert_eq!(err, Some(DataError::LineTooLong));
        assert!(ended);
        let ok = [b"a".repeat(998).as_slice(), b"\r\n.\r\n"].concat();
        assert_eq!(run(&ok, 1 << 20, 1000).1, None);
        let mut f = DataFilter::new(1 << 20, 1000);
        f.push_fragment(&[b'a'; 2000]);
        assert_eq!(f.push_line(b".\r\n"), Action::Drop, "tail of a long line");
        assert_eq!(f.push_line(b".\r\n"), Action::End);
        assert_eq!(f.error, Some(DataError::LineTooLong));
    }
}
