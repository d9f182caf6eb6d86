//! Outbound TLS policies published by the partner in DNS: DANE (RFC 7672) and MTA-STS
//! (RFC 8461), composed with an Outbound connector's `tls` level.
//!
//! - [`decide`]: the decision table (pure) — which policy authenticates a next hop host, or why
//!   it is deferred. docs/gateway.md "Outbound TLS policies" is this function in words.
//! - [`dane`], [`mta_sts`]: the pure cores (TLSA matching; MTA-STS record/policy parsing and MX
//!   patterns).
//! - [`dns`]: DNSSEC-validated MX and TLSA lookups; [`fetch`]: the MTA-STS policy fetch over
//!   HTTPS and the policy cache shared by all sessions of the process.
//! - [`verifier`]: the rustls certificate verifier of a host under a policy.
//! - [`engine`]: per connection attempt, runs the lookups, [`decide`], and builds the TLS
//!   client config.
//!
//! Invariants: a policy never weakens the connector's level (DANE replaces the certificate
//! checks of the level by the TLSA match but always requires STARTTLS; MTA-STS enforce adds its
//! checks to the level's, whose name check is then made against the policy-listed MX host); a
//! bogus DNSSEC answer defers whatever the mode, an indeterminate one is a failed lookup; a
//! secure TLSA RRset, usable or not, makes STARTTLS mandatory; nothing here ever turns a
//! failure into plaintext.

pub mod dane;
pub mod dns;
pub mod engine;
pub mod fetch;
pub mod mta_sts;
pub mod verifier;

use crate::config::PolicyMode;
use dane::Tlsa;

/// What the DANE lookup for one host found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaneState {
    /// DANE is off for the connector.
    NotLooked,
    /// DNSSEC-secure TLSA records, at least one usable for SMTP.
    Secure(Vec<Tlsa>),
    /// A DNSSEC-secure TLSA RRset none of whose records is usable for SMTP (RFC 7672 2.2:
    /// STARTTLS is still mandatory, the certificate is not authenticated by DANE).
    Unusable,
    /// No TLSA records (none published, or a secure denial).
    NoRecords,
    /// The MX or TLSA answer is not signed (no chain of trust): DANE cannot apply.
    Insecure,
    /// DNSSEC validation failed: signatures wrong or missing where they must be.
    Bogus(String),
    /// The lookup failed (timeout, SERVFAIL): the answer is unknown.
    Failed(String),
}

/// What the MTA-STS lookup for the recipient domain found, and how this MX host fares in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StsState {
    NotLooked,
    Enforce {
        mx_listed: bool,
    },
    Testing {
        mx_listed: bool,
    },
    /// No policy: no `_mta-sts` record, or a policy with `mode: none`.
    NoPolicy,
    /// A record exists but the policy could not be fetched and none is cached.
    Failed(String),
}

/// How one next hop host is to be authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The TLSA records authenticate the certificate (STARTTLS required); the level's
    /// certificate checks are replaced.
    Dane(Vec<Tlsa>),
    /// Secure TLSA records, none usable (RFC 7672 2.2): STARTTLS required, the level's
    /// certificate checks decide; no fallback to plaintext and no MTA-STS (RFC 8461 2).
    DaneUnusable,
    /// MTA-STS enforce: STARTTLS required, the chain must verify against the MTA-STS roots and
    /// name the MX host, on top of the level's checks.
    MtaStsEnforce,
    /// MTA-STS testing: the level's checks decide; the policy's are evaluated and a failure is
    /// counted and logged (`mx_listed` false is such a failure already).
    MtaStsTesting { mx_listed: bool },
    /// No policy applies: the connector's `tls` level alone.
    Level,
    /// Not delivered to this host: `451 4.7.5` with this reason; `policy` names the policy
    /// that deferred (`dane` or `mta-sts`).
    Defer { policy: &'static str, why: String },
}

impl Plan {
    /// The policy label for logs and metrics.
    pub fn policy(&self) -> &'static str {
        match self {
            Plan::Dane(_) | Plan::DaneUnusable => "dane",
            Plan::MtaStsEnforce | Plan::MtaStsTesting { .. } => "mta-sts",
            Plan::Defer { policy, .. } => policy,
            Plan::Level => "none",
        }
    }
}

/// The decision table. `dane`/`sts`: the connector's modes; the states: what the lookups found
/// for this host (`NotLooked` when the mode is None).
pub fn decide(dane: PolicyMode, sts: PolicyMode, d: DaneState, s: StsState) -> Plan {
    let dane_defer = |why: String| Plan::Defer {
        policy: "dane",
        why,
    };
    let sts_defer = |why: String| Plan::Defer {
        policy: "mta-sts",
        why,
    };
    if dane != PolicyMode::None {
        match d {
            DaneState::Bogus(why) => {
                return dane_defer(format!("DNSSEC validation failed (bogus): {why}"));
            }
            DaneState::Failed(why) => {
                return dane_defer(format!("TLSA lookup failed: {why}"));
            }
            DaneState::Secure(records) => return Plan::Dane(records),
            DaneState::Unusable if dane == PolicyMode::Mandatory => {
                return dane_defer(
                    "DANE is Mandatory and no TLSA record is usable for SMTP".into(),
                );
            }
            DaneState::Unusable => return Plan::DaneUnusable,
            DaneState::NoRecords | DaneState::Insecure | DaneState::NotLooked
                if dane == PolicyMode::Mandatory =>
            {
                let why = if d == DaneState::Insecure {
                    "DNS answer is not DNSSEC-signed (insecure)"
                } else {
                    "no usable TLSA records"
                };
                return dane_defer(format!("DANE is Mandatory and {why}"));
            }
            DaneState::NoRecords | DaneState::Insecure | DaneState::NotLooked => {}
        }
    }
    if sts != PolicyMode::None {
        let mandatory = sts == PolicyMode::Mandatory;
        match s {
            StsState::Enforce { mx_listed: true } => return Plan::MtaStsEnforce,
            StsState::Enforce { mx_listed: false } => {
                return sts_defer("MX host is not listed in the MTA-STS policy".into());
            }
            StsState::Testing { .. } if mandatory => {
                return sts_defer(
                    "MTA-STS is Mandatory and the domain's policy is only in testing mode".into(),
                );
            }
            StsState::Testing { mx_listed } => return Plan::MtaStsTesting { mx_listed },
            StsState::NoPolicy | StsState::NotLooked if mandatory => {
                return sts_defer("MTA-STS is Mandatory and the domain publishes no policy".into());
            }
            StsState::Failed(why) if mandatory => {
                return sts_defer(format!(
                    "MTA-STS is Mandatory and the policy could not be fetched: {why}"
                ));
            }
            StsState::NoPolicy | StsState::NotLooked | StsState::Failed(_) => {}
        }
    }
    Plan::Level
}

#[cfg(test)]
mod tests {
    use super::*;
    use PolicyMode::{Mandatory as M, None as N, Opportunistic as O};

    fn tlsa() -> Vec<Tlsa> {
        vec![Tlsa {
            usage: 3,
            selector: 1,
            matching: 1,
            data: vec![1; 32],
        }]
    }

    /// docs/gateway.md "Outbound TLS policies", decision table, row by row.
    #[test]
    fn decision_table_contract() {
        use DaneState as D;
        use StsState as S;
        let rows: Vec<(PolicyMode, PolicyMode, DaneState, StsState, &str)> = vec![
            // Defaults: nothing looked up, the level decides.
            (N, N, D::NotLooked, S::NotLooked, "level"),
            // Bogus always defers, whatever the mode.
            (O, N, D::Bogus("sig".into()), S::NotLooked, "defer"),
            (M, N, D::Bogus("sig".into()), S::NotLooked, "defer"),
            (
                O,
                O,
                D::Bogus("sig".into()),
                S::Enforce { mx_listed: true },
                "defer",
            ),
            // A failed lookup defers (the records may exist).
            (O, N, D::Failed("timeout".into()), S::NotLooked, "defer"),
            // Secure TLSA: DANE, and it wins over MTA-STS.
            (O, N, D::Secure(tlsa()), S::NotLooked, "dane"),
            (
                M,
                M,
                D::Secure(tlsa()),
                S::Enforce { mx_listed: false },
                "dane",
            ),
            // Secure but unusable TLSA records: TLS required (Opportunistic), Mandatory defers;
            // MTA-STS is not consulted (RFC 8461 2).
            (
                O,
                O,
                D::Unusable,
                S::Enforce { mx_listed: true },
                "dane-unusable",
            ),
            (M, N, D::Unusable, S::NotLooked, "defer"),
            // Insecure / none: Opportunistic falls back, Mandatory defers.
            (O, N, D::Insecure, S::NotLooked, "level"),
            (O, N, D::NoRecords, S::NotLooked, "level"),
            (M, N, D::Insecure, S::NotLooked, "defer"),
            (M, N, D::NoRecords, S::NotLooked, "defer"),
            (M, O, D::NoRecords, S::Enforce { mx_listed: true }, "defer"),
            // DANE falls back to MTA-STS.
            (
                O,
                O,
                D::Insecure,
                S::Enforce { mx_listed: true },
                "sts-enforce",
            ),
            // MTA-STS.
            (
                N,
                O,
                D::NotLooked,
                S::Enforce { mx_listed: true },
                "sts-enforce",
            ),
            (N, O, D::NotLooked, S::Enforce { mx_listed: false }, "defer"),
            (N, M, D::NotLooked, S::Enforce { mx_listed: false }, "defer"),
            (
                N,
                O,
                D::NotLooked,
                S::Testing { mx_listed: false },
                "sts-testing",
            ),
            (N, M, D::NotLooked, S::Testing { mx_listed: true }, "defer"),
            (N, O, D::NotLooked, S::NoPolicy, "level"),
            (N, M, D::NotLooked, S::NoPolicy, "defer"),
            (N, O, D::NotLooked, S::Failed("404".into()), "level"),
            (N, M, D::NotLooked, S::Failed("404".into()), "defer"),
        ];
        for (dm, sm, d, s, want) in rows {
            let row = format!("{dm:?} {sm:?} {d:?} {s:?}");
            let p = decide(dm, sm, d, s);
            let got = match &p {
                Plan::Dane(_) => "dane",
                Plan::DaneUnusable => "dane-unusable",
                Plan::MtaStsEnforce => "sts-enforce",
                Plan::MtaStsTesting { .. } => "sts-testing",
                Plan::Level => "level",
                Plan::Defer { .. } => "defer",
            };
            assert_eq!(got, want, "{row}");
        }
    }
}
