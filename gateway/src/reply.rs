//! SMTP replies as values, so the policy and the session can return them without I/O and the
//! tests can compare codes exactly.

use std::borrow::Cow;
use std::fmt;

/// One SMTP reply: basic code, enhanced status code (RFC 3463) and text. Multi-line text is
/// written as a multi-line reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub esc: [u16; 3],
    pub text: Cow<'static, str>,
}

impl Reply {
    pub const fn new(code: u16, esc: [u16; 3], text: &'static str) -> Reply {
        Reply {
            code,
            esc,
            text: Cow::Borrowed(text),
        }
    }

    pub fn owned(code: u16, esc: [u16; 3], text: String) -> Reply {
        Reply {
            code,
            esc,
            text: Cow::Owned(text),
        }
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// `4.7.5`-style string.
    pub fn esc_string(&self) -> String {
        format!("{}.{}.{}", self.esc[0], self.esc[1], self.esc[2])
    }

    pub fn write_to(&self, out: &mut Vec<u8>) {
        let esc = self.esc_string();
        let lines: Vec<&str> = self.text.lines().collect();
        let lines = if lines.is_empty() { vec![""] } else { lines };
        let last = lines.len() - 1;
        for (i, line) in lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            // Text can come from a next hop; never let it carry control characters into our
            // reply stream.
            let clean: String = line
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(400)
                .collect();
            // RFC 2034 puts enhanced codes on 2xx/4xx/5xx only; esc 0.0.0 marks the others.
            let line = if self.esc[0] == 0 {
                format!("{}{}{}\r\n", self.code, sep, clean)
            } else {
                format!("{}{}{} {}\r\n", self.code, sep, esc, clean)
            };
            out.extend_from_slice(line.as_bytes());
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.code, self.esc_string(), self.text)
    }
}

/// Fixed replies, named so every code the gateway sends is listed in one place (docs/gateway.md
/// mirrors this list).
pub mod fixed {
    use super::Reply;

    pub const OK: Reply = Reply::new(250, [2, 0, 0], "OK");
    pub const SENDER_OK: Reply = Reply::new(250, [2, 1, 0], "Sender OK");
    pub const BYE: Reply = Reply::new(221, [2, 0, 0], "Bye");
    pub const HELP: Reply = Reply::new(
        214,
        [2, 0, 0],
        "Commands: EHLO HELO STARTTLS MAIL RCPT DATA RSET NOOP QUIT",
    );
    pub const READY_TLS: Reply = Reply::new(220, [2, 0, 0], "Ready to start TLS");
    pub const START_DATA: Reply =
        Reply::new(354, [0, 0, 0], "Start mail input; end with <CRLF>.<CRLF>");
    pub const UNRECOGNISED: Reply = Reply::new(500, [5, 5, 1], "Command unrecognized");
    pub const LINE_TOO_LONG: Reply = Reply::new(500, [5, 5, 2], "Line too long");
    pub const NOT_IMPLEMENTED: Reply = Reply::new(502, [5, 5, 1], "Command not implemented");
    pub const VRFY_DISABLED: Reply = Reply::new(502, [5, 5, 1], "VRFY/EXPN are disabled");
    pub const BDAT_NOT_OFFERED: Reply = Reply::new(
        502,
        [5, 5, 1],
        "BDAT not supported (CHUNKING is not offered)",
    );
    pub const HELO_FIRST: Reply = Reply::new(503, [5, 5, 1], "Send EHLO/HELO first");
    pub const NESTED_MAIL: Reply = Reply::new(503, [5, 5, 1], "Nested MAIL command");
    pub const NEED_MAIL: Reply = Reply::new(503, [5, 5, 1], "Need MAIL command");
    pub const NEED_RCPT: Reply = Reply::new(503, [5, 5, 1], "Need RCPT command");
    pub const ALREADY_TLS: Reply = Reply::new(503, [5, 5, 1], "TLS already active");
    pub const NO_VALID_RCPT: Reply = Reply::new(554, [5, 5, 1], "No valid recipients");
    pub const BAD_SENDER: Reply = Reply::new(501, [5, 1, 7], "Bad sender address syntax");
    pub const BAD_RCPT: Reply = Reply::new(501, [5, 1, 3], "Bad recipient address syntax");
    /// The sender's domain has no UTS-46 A-label form, so no connector rule can be applied
    /// to it (RFC 3463 X.1.7: bad sender's mailbox address syntax).
    pub const BAD_SENDER_DOMAIN: Reply = Reply::new(
        553,
        [5, 1, 7],
        "Sender address domain is not a valid (IDNA) domain name",
    );
    /// The recipient's domain has no UTS-46 A-label form (RFC 3463 X.1.3: bad destination
    /// mailbox address syntax).
    pub const BAD_RCPT_DOMAIN: Reply = Reply::new(
        553,
        [5, 1, 3],
        "Recipient address domain is not a valid (IDNA) domain name",
    );
    pub const NEED_SMTPUTF8: Reply =
        Reply::new(553, [5, 6, 7], "Non-ASCII address requires SMTPUTF8");
    pub const UNSUPPORTED_PARAM: Reply = Reply::new(
        555,
        [5, 5, 4],
        "MAIL/RCPT parameter not recognized or not implemented",
    );
    pub const MESSAGE_TOO_BIG: Reply = Reply::new(
        552,
        [5, 3, 4],
        "Message size exceeds fixed maximum message size",
    );
    pub const TEXT_LINE_TOO_LONG: Reply = Reply::new(
        552,
        [5, 3, 4],
        "Message refused: a text line is longer than the limit",
    );
    pub const BARE_LF_CR: Reply = Reply::new(
        550,
        [5, 6, 11],
        "Message refused: bare LF or bare CR in message data (SMTP smuggling protection)",
    );
    pub const TOO_MANY_RECIPIENTS: Reply = Reply::new(452, [4, 5, 3], "Too many recipients");
    pub const ROUTE_SPLIT: Reply = Reply::new(
        452,
        [4, 5, 3],
        "Recipient needs a different next hop; send it in a new transaction",
    );
    pub const TOO_MANY_CONNECTIONS: Reply =
        Reply::new(421, [4, 7, 0], "Too many connections, try again later");
    pub const TOO_MANY_ERRORS: Reply =
        Reply::new(421, [4, 7, 0], "Too many errors, closing connection");
    pub const TIMEOUT: Reply = Reply::new(421, [4, 4, 2], "Timeout, closing connection");
    pub const SHUTTING_DOWN: Reply =
        Reply::new(421, [4, 3, 2], "Service shutting down, try again later");
    pub const TLS_UNAVAILABLE: Reply =
        Reply::new(454, [4, 7, 0], "TLS not available due to temporary reason");
    pub const LOCAL_ERROR: Reply =
        Reply::new(451, [4, 3, 0], "Local error in processing, try again later");
}

/// Replies about the next hop; the route's label and the reason are in the text.
pub mod next_hop {
    use super::Reply;

    /// The next hop cannot be reached or the connection to it was lost (`451 4.4.1`).
    pub fn unreachable(label: &str, why: &str) -> Reply {
        Reply::owned(
            451,
            [4, 4, 1],
            format!("Next hop {label} unreachable: {why}; try again later"),
        )
    }

    /// A required TLS level was not met; never downgraded (`451 4.7.5`).
    pub fn tls_failure(label: &str, why: &str) -> Reply {
        Reply::owned(
            451,
            [4, 7, 5],
            format!("TLS to next hop {label} failed: {why}"),
        )
    }

    /// A DANE or MTA-STS policy of an Outbound connector is not met (bogus DNSSEC, no
    /// TLSA match, MX host not in the MTA-STS policy, Mandatory mode without a policy):
    /// `451 4.7.5`, the same class as a TLS level not met, never a downgrade.
    pub fn tls_policy_not_met(label: &str, why: &str) -> Reply {
        Reply::owned(
            451,
            [4, 7, 5],
            format!("TLS policy for next hop {label} not met: {why}"),
        )
    }

    /// RFC 8689 5: a `REQUIRETLS` message cannot be relayed over a validated TLS connection to
    /// a next hop that offers REQUIRETLS (`550 5.7.30`, permanent: a retry through the same
    /// route would meet the same next hop).
    pub fn requiretls_not_met(label: &str, why: &str) -> Reply {
        Reply::owned(
            550,
            [5, 7, 30],
            format!("REQUIRETLS support required; next hop {label}: {why}"),
        )
    }

    /// The next hop answered outside the protocol, e.g. `354` to RCPT (`451 4.5.0`): never
    /// taken as acceptance.
    pub fn protocol_error(label: &str, why: &str) -> Reply {
        Reply::owned(
            451,
            [4, 5, 0],
            format!("Next hop {label} protocol error: {why}; try again later"),
        )
    }

    /// The connection carrying accepted recipients was lost and they could not all be
    /// accepted again on a new one: nothing of this transaction may be answered `250`.
    pub fn recipients_lost(label: &str) -> Reply {
        Reply::owned(
            451,
            [4, 4, 1],
            format!(
                "Next hop {label} lost the connection holding accepted recipients; send RSET and try the transaction again"
            ),
        )
    }
}

/// Replies about sender authentication (SPF, DKIM, DMARC; docs/gateway.md, "Sender
/// authentication"). Enhanced codes per RFC 7372 where it has one; the issue's `5.7.1` for DKIM.
/// A DNS error deciding a required check is always a `451`: never a pass, never a `5xx`.
pub mod auth {
    use super::Reply;

    /// Required SPF did not pass (`fail`, `softfail`, `neutral`, `none`).
    pub fn spf_failed(result: &str, domain: &str) -> Reply {
        Reply::owned(
            550,
            [5, 7, 23],
            format!("SPF check did not pass for {domain} ({result}): sender not authorized"),
        )
    }

    /// Required SPF: the domain's SPF record is broken (`permerror`).
    pub fn spf_permerror(domain: &str) -> Reply {
        Reply::owned(
            550,
            [5, 7, 24],
            format!("SPF record of {domain} is invalid (permerror)"),
        )
    }

    /// Required SPF could not be decided: DNS error (`temperror`).
    pub fn spf_temperror(domain: &str) -> Reply {
        Reply::owned(
            451,
            [4, 7, 24],
            format!("SPF check for {domain} failed with a DNS error (temperror); try again later"),
        )
    }

    /// Required DKIM: no valid signature of the sender's domain.
    pub fn dkim_failed(why: &str) -> Reply {
        Reply::owned(550, [5, 7, 1], format!("DKIM check did not pass: {why}"))
    }

    /// Required DKIM or DMARC (or a domain's `p=reject`) could not be decided: DNS error.
    pub fn temperror(mechanism: &str) -> Reply {
        Reply::owned(
            451,
            [4, 7, 5],
            format!("{mechanism} check failed with a DNS error (temperror); try again later"),
        )
    }

    /// Unclaimed mail under `EnforceDmarcReject` whose header section is over
    /// `limits.maxHeaderSize`: DMARC cannot be decided, and a `p=reject` From: could hide in it.
    pub fn header_too_large() -> Reply {
        Reply::owned(
            552,
            [5, 3, 4],
            "Header section too large to authenticate (limits.maxHeaderSize)".to_string(),
        )
    }

    /// Required DMARC did not pass, or the From: domain's `p=reject` was enforced.
    pub fn dmarc_failed(domain: &str, why: &str) -> Reply {
        Reply::owned(
            550,
            [5, 7, 26],
            format!("DMARC check for {domain} did not pass: {why}"),
        )
    }
}
