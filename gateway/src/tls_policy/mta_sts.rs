//! MTA-STS (RFC 8461), the pure part: the `_mta-sts` TXT record, the policy file, and matching
//! an MX host name against the policy's `mx` patterns. No I/O here ([`super::fetch`] does the
//! DNS and HTTPS).
//!
//! Invariants: a policy that does not parse is no policy (RFC 8461 3.2: the sender treats it as
//! absent, never as a weaker policy); `max_age` is capped at one year (RFC 8461 3.2); MX
//! patterns match the way RFC 8461 4.1 says: `*.example.com` covers exactly one label.

/// The `_mta-sts.<domain>` TXT record: `v=STSv1; id=<1-32 alphanumerics>;`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsRecord {
    pub id: String,
}

/// Parses one TXT record's text. `None` when it is not an STSv1 record (other TXT records may
/// share the name; RFC 8461 3.1 says to ignore them).
pub fn parse_record(txt: &str) -> Option<StsRecord> {
    let mut fields = txt.split(';').map(str::trim).filter(|f| !f.is_empty());
    let first = fields.next()?;
    if first != "v=STSv1" {
        return None;
    }
    let mut id = None;
    for f in fields {
        let (k, v) = f.split_once('=')?;
        if k.trim() == "id" {
            let v = v.trim();
            if v.is_empty() || v.len() > 32 || !v.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return None;
            }
            id = Some(v.to_string());
        }
    }
    id.map(|id| StsRecord { id })
}

/// Whether a TXT string is an STSv1 record at all (RFC 8461 3.1: records not beginning with
/// `v=STSv1;` are discarded), valid or not.
fn is_sts_record(txt: &str) -> bool {
    txt.split(';').next().map(str::trim) == Some("v=STSv1")
}

/// The record among a name's TXT strings: exactly one STSv1 record, and it valid, else none
/// (RFC 8461 3.1: several records, or one that does not parse, mean no policy; an invalid
/// record is not skipped in favour of a valid one).
pub fn pick_record<'a>(txts: impl IntoIterator<Item = &'a str>) -> Option<StsRecord> {
    let found: Vec<&str> = txts.into_iter().filter(|t| is_sts_record(t)).collect();
    match found[..] {
        [one] => parse_record(one),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StsMode {
    Enforce,
    Testing,
    None,
}

impl StsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StsMode::Enforce => "enforce",
            StsMode::Testing => "testing",
            StsMode::None => "none",
        }
    }
}

/// One parsed policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsPolicy {
    pub mode: StsMode,
    /// Lower-case MX patterns (`mx.example.com` or `*.example.com`).
    pub mx: Vec<String>,
    pub max_age: u64,
}

/// RFC 8461 3.2: max_age is at most 31557600 seconds.
pub const MAX_AGE_CAP: u64 = 31_557_600;

/// Parses a policy body (`key: value` lines, CRLF or LF). Errors say what is wrong.
pub fn parse_policy(body: &str) -> Result<StsPolicy, String> {
    let mut version = None;
    let mut mode = None;
    let mut max_age = None;
    let mut mx = Vec::new();
    for line in body.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((k, v)) = line.split_once(':') else {
            return Err(format!("line without a colon: {line:?}"));
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "version" => version = Some(v.to_string()),
            "mode" => {
                mode = Some(match v {
                    "enforce" => StsMode::Enforce,
                    "testing" => StsMode::Testing,
                    "none" => StsMode::None,
                    other => return Err(format!("unknown mode {other:?}")),
                })
            }
            "max_age" => {
                let n: u64 = v
                    .parse()
                    .map_err(|_| format!("max_age {v:?} is not a number"))?;
                max_age = Some(n.min(MAX_AGE_CAP));
            }
            "mx" => {
                let p = v.to_ascii_lowercase();
                let base = p.strip_prefix("*.").unwrap_or(&p);
                if base.is_empty() || base.contains('*') {
                    return Err(format!("bad mx pattern {v:?}"));
                }
                mx.push(p);
            }
            // RFC 8461 3.2: unknown keys are ignored (extensions).
            _ => {}
        }
    }
    if version.as_deref() != Some("STSv1") {
        return Err("version is not STSv1".into());
    }
    let mode = mode.ok_or("no mode")?;
    let max_age = max_age.ok_or("no max_age")?;
    if mode != StsMode::None && mx.is_empty() {
        return Err("no mx patterns".into());
    }
    Ok(StsPolicy { mode, mx, max_age })
}

/// Whether MX host `host` is listed by one of `patterns` (RFC 8461 4.1: a `*.` pattern matches
/// exactly one left-most label).
pub fn mx_matches(patterns: &[String], host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    patterns.iter().any(|p| match p.strip_prefix("*.") {
        Some(base) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == base),
        None => *p == host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_records() {
        assert_eq!(
            parse_record("v=STSv1; id=20160831085700Z;"),
            Some(StsRecord {
                id: "20160831085700Z".into()
            })
        );
        assert_eq!(
            parse_record("v=STSv1;id=abc"),
            Some(StsRecord { id: "abc".into() })
        );
        for bad in [
            "v=spf1 -all",
            "v=STSv1;",
            "v=STSv1; id=;",
            "v=STSv1; id=has-dash;",
            "id=abc; v=STSv1",
        ] {
            assert_eq!(parse_record(bad), None, "{bad}");
        }
        assert_eq!(
            pick_record(["v=spf1 -all", "v=STSv1; id=1;"]),
            Some(StsRecord { id: "1".into() })
        );
        assert_eq!(pick_record(["v=STSv1; id=1;", "v=STSv1; id=2;"]), None);
        // An STSv1 record that does not parse still counts: two records, no policy.
        assert_eq!(
            pick_record(["v=STSv1; id=1;", "v=STSv1; id=has-dash;"]),
            None
        );
        assert_eq!(pick_record(["v=STSv1; id=;"]), None);
    }

    #[test]
    fn policies() {
        let p = parse_policy(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.Example.net\r\nmax_age: 604800\r\n",
        )
        .unwrap();
        assert_eq!(p.mode, StsMode::Enforce);
        assert_eq!(p.mx, ["mail.example.com", "*.example.net"]);
        assert_eq!(p.max_age, 604_800);
        let capped = parse_policy(
            "version: STSv1\nmode: testing\nmx: a.test\nmax_age: 99999999999\nfoo: bar\n",
        )
        .unwrap();
        assert_eq!(capped.max_age, MAX_AGE_CAP);
        assert_eq!(capped.mode, StsMode::Testing);
        assert!(parse_policy("version: STSv1\nmode: none\nmax_age: 86400\n").is_ok());
        for bad in [
            "mode: enforce\nmx: a.test\nmax_age: 1\n",
            "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
            "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a.test\n",
            "version: STSv1\nmode: enforce\nmx: a.*.test\nmax_age: 1\n",
            "<html>not a policy</html>",
        ] {
            assert!(parse_policy(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mx_patterns() {
        let p = vec!["mail.example.com".to_string(), "*.example.net".to_string()];
        assert!(mx_matches(&p, "mail.example.com"));
        assert!(mx_matches(&p, "MAIL.example.com."));
        assert!(mx_matches(&p, "mx1.example.net"));
        assert!(!mx_matches(&p, "example.net"));
        assert!(!mx_matches(&p, "a.b.example.net"));
        assert!(!mx_matches(&p, "mail.example.com.evil.test"));
        assert!(!mx_matches(&p, "other.example.com"));
    }
}
