//! Per connection attempt: runs the DANE and MTA-STS lookups an Outbound connector's modes ask
//! for, applies [`super::decide`], and builds the TLS client config of the chosen plan. Counts
//! every outcome in `partnergate_outbound_tls_policy_total{connector,policy,result}`. The
//! lookups are bounded by [`HopPolicy::deadline`]; past it the host is deferred (`451 4.7.5`).
//!
//! The counter family is process-wide ([`counters`]) because the next-hop code runs below the
//! session and has no handle on the session's metrics; [`crate::metrics::Metrics`] registers
//! the same family, so it is exported with the others.

use std::sync::{Arc, LazyLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::fetch::{StsFetcher, StsLookup};
use super::mta_sts::{StsMode, mx_matches};
use super::verifier::{Check, PolicyVerifier};
use super::{DaneState, Plan, StsState, decide};
use crate::certs::Anchors;
use crate::config::{PolicyMode, TlsLevel};
use crate::live_config::NextHopHost;
use crate::mx::{MxResolver, MxSecurity};
use crate::reply::Reply;
use crate::reply::next_hop::tls_policy_not_met;
use crate::tls::{NameRule, NextHopVerifier};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub connector: String,
    /// `dane`, `mta-sts` or `none`; `requiretls` for REQUIRETLS messages.
    pub policy: String,
    /// `success` (handshake passed the policy), `failure` (it did not: 451), `deferred`
    /// (decided before connecting: 451), `testing_failure` (MTA-STS testing: delivered anyway),
    /// `fallback` (Opportunistic mode, no policy published: the level applied); for
    /// `requiretls`: `relayed` or `refused` (550 5.7.30).
    pub result: String,
}

static COUNTERS: LazyLock<Family<PolicyLabels, Counter>> = LazyLock::new(Family::default);

/// The process-wide counter family.
pub fn counters() -> Family<PolicyLabels, Counter> {
    COUNTERS.clone()
}

pub fn count(connector: &str, policy: &str, result: &str) {
    COUNTERS
        .get_or_create(&PolicyLabels {
            connector: connector.into(),
            policy: policy.into(),
            result: result.into(),
        })
        .inc();
}

/// What an Outbound connector with a DANE or MTA-STS mode needs at connection time.
pub struct HopPolicy {
    pub dane: PolicyMode,
    pub mta_sts: PolicyMode,
    pub level: TlsLevel,
    pub anchors: Anchors,
    pub tls_domain: Option<String>,
    pub client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    pub resolver: Arc<MxResolver>,
    pub sts: Arc<StsFetcher>,
}

impl std::fmt::Debug for HopPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HopPolicy")
            .field("dane", &self.dane)
            .field("mta_sts", &self.mta_sts)
            .finish_non_exhaustive()
    }
}

/// The outcome of [`HopPolicy::prepare`] for one host.
pub struct Prepared {
    /// `dane`, `mta-sts` or `none`.
    pub policy: &'static str,
    /// Replaces the host's TLS config; `None` = the level's config.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub verifier: Option<Arc<PolicyVerifier>>,
    /// STARTTLS is required whatever the level.
    pub require_tls: bool,
    /// The certificate is authenticated (DANE, MTA-STS enforce, or a DomainValidation level)
    /// when the handshake passes.
    pub authenticated: bool,
    /// MTA-STS testing applies: a delivery the policy would have refused is counted as
    /// `testing_failure` (once per connection) instead of `success`.
    pub testing: bool,
    /// Why the testing policy would refuse this host already before connecting.
    pub testing_failure: Option<String>,
    /// What was found, for the log line and the probe.
    pub detail: String,
}

impl HopPolicy {
    fn name_rule(&self, target: &NextHopHost) -> NameRule {
        match (&self.tls_domain, &target.domain) {
            (Some(n), _) => NameRule::Pattern(n.clone()),
            (None, Some(d)) => NameRule::DomainOrSubdomain(d.clone()),
            (None, None) => NameRule::Pattern(target.host.clone()),
        }
    }

    async fn dane_state(&self, target: &NextHopHost) -> DaneState {
        if self.dane == PolicyMode::None {
            return DaneState::NotLooked;
        }
        if target.mx_security == MxSecurity::Insecure {
            // RFC 7672 2.2.1: TLSA records of an MX host named by an insecure MX RRset are
            // not used.
            return DaneState::Insecure;
        }
        match self.resolver.validating() {
            Ok(r) => super::dns::tlsa(&r, &target.host, target.port).await,
            Err(e) => DaneState::Failed(e),
        }
    }

    async fn sts_state(&self, target: &NextHopHost) -> StsState {
        let (PolicyMode::Opportunistic | PolicyMode::Mandatory, Some(domain)) =
            (self.mta_sts, &target.domain)
        else {
            return StsState::NotLooked;
        };
        match self.sts.policy(domain).await {
            StsLookup::NoPolicy => StsState::NoPolicy,
            StsLookup::Failed(e) => StsState::Failed(e),
            StsLookup::Policy(p) => {
                let mx_listed = mx_matches(&p.mx, &target.host);
                match p.mode {
                    StsMode::Enforce => StsState::Enforce { mx_listed },
                    StsMode::Testing => StsState::Testing { mx_listed },
                    StsMode::None => StsState::NoPolicy,
                }
            }
        }
    }

    /// How long the lookups of [`HopPolicy::prepare`] may take together: a TLSA lookup and an
    /// `_mta-sts` TXT lookup ([`MxResolver::deadline`] each) and one policy fetch
    /// (`tlsPolicy.mtaStsFetchTimeoutSecs`).
    pub fn deadline(&self) -> std::time::Duration {
        self.resolver.deadline() * 2 + self.sts.timeout
    }

    /// Decides how `target` is authenticated; the error is the recipient's `451 4.7.5`, also
    /// when the lookups do not finish within [`HopPolicy::deadline`].
    pub async fn prepare(&self, label: &str, target: &NextHopHost) -> Result<Prepared, Reply> {
        let deadline = self.deadline();
        match tokio::time::timeout(deadline, self.lookups(target)).await {
            Ok((d, s)) => self.plan(label, target, d, s),
            Err(_) => {
                let why = format!(
                    "{}: TLS policy lookups did not finish within {} s",
                    target.host,
                    deadline.as_secs()
                );
                count(label, "none", "deferred");
                tracing::warn!(next_hop = label, host = %target.host, reason = %why, "TLS policy: deferred");
                Err(tls_policy_not_met(label, &why))
            }
        }
    }

    async fn lookups(&self, target: &NextHopHost) -> (DaneState, StsState) {
        let d = self.dane_state(target).await;
        let s = self.sts_state(target).await;
        (d, s)
    }

    fn plan(
        &self,
        label: &str,
        target: &NextHopHost,
        d: DaneState,
        s: StsState,
    ) -> Result<Prepared, Reply> {
        let detail = format!("DANE: {}; MTA-STS: {}", describe_dane(&d), describe_sts(&s));
        let plan = decide(self.dane, self.mta_sts, d, s);
        // RFC 8689 4.2.1: a chain check alone (CertificateValidation) does not authenticate
        // the next hop; its name must be checked too.
        let level_authenticates = self.level == TlsLevel::DomainValidation;
        let cert = || {
            self.client_cert
                .as_ref()
                .map(|(c, k)| (c.clone(), k.clone_key()))
        };
        let build =
            |check: Check| -> Result<(Arc<PolicyVerifier>, Arc<rustls::ClientConfig>), Reply> {
                let v = PolicyVerifier::new(check);
                let tls = crate::tls::client_config_with(v.clone(), cert())
                    .map_err(|e| tls_policy_not_met(label, &e))?;
                Ok((v, tls))
            };
        let policy = plan.policy();
        match plan {
            Plan::Defer { why, .. } => {
                count(label, policy, "deferred");
                tracing::warn!(next_hop = label, host = %target.host, policy, reason = %why, detail, "TLS policy: deferred");
                Err(tls_policy_not_met(
                    label,
                    &format!("{}: {why}", target.host),
                ))
            }
            Plan::Level => {
                if self.dane != PolicyMode::None || self.mta_sts != PolicyMode::None {
                    count(label, policy, "fallback");
                }
                Ok(Prepared {
                    policy,
                    tls: None,
                    verifier: None,
                    require_tls: false,
                    authenticated: level_authenticates,
                    testing: false,
                    testing_failure: None,
                    detail,
                })
            }
            Plan::DaneUnusable => {
                tracing::info!(next_hop = label, host = %target.host, detail, "DANE: secure TLSA records, none usable; STARTTLS required, the level's checks apply");
                Ok(Prepared {
                    policy,
                    tls: None,
                    verifier: None,
                    require_tls: true,
                    authenticated: level_authenticates,
                    testing: false,
                    testing_failure: None,
                    detail,
                })
            }
            Plan::Dane(records) => {
                let (v, tls) = build(Check::Dane {
                    records,
                    names: vec![target.host.clone()],
                })?;
                Ok(Prepared {
                    policy,
                    tls: Some(tls),
                    verifier: Some(v),
                    require_tls: true,
                    authenticated: true,
                    testing: false,
                    testing_failure: None,
                    detail,
                })
            }
            Plan::MtaStsEnforce | Plan::MtaStsTesting { .. } => {
                let enforce = plan == Plan::MtaStsEnforce;
                let testing_failure = matches!(plan, Plan::MtaStsTesting { mx_listed: false })
                    .then(|| "MX host not listed in the policy".to_string());
                // Under enforce the policy names the hosts that may receive the domain's mail
                // (RFC 8461 4.1), so the level's name check is made against the MX host, not
                // the recipient domain or tlsDomain: a hosted MX in another domain passes.
                // The level's chain check stays.
                let rule = if enforce {
                    NameRule::Pattern(target.host.clone())
                } else {
                    self.name_rule(target)
                };
                let (v, tls) = build(Check::MtaSts {
                    level: NextHopVerifier::new(self.level, self.anchors.clone(), rule),
                    roots: self.sts.roots.clone(),
                    mx_host: target.host.clone(),
                    enforce,
                })?;
                Ok(Prepared {
                    policy,
                    tls: Some(tls),
                    verifier: Some(v),
                    require_tls: enforce,
                    authenticated: enforce || level_authenticates,
                    testing: !enforce,
                    testing_failure,
                    detail,
                })
            }
        }
    }
}

fn describe_dane(d: &DaneState) -> String {
    match d {
        DaneState::NotLooked => "off".into(),
        DaneState::Secure(r) => format!(
            "secure TLSA {}",
            r.iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        DaneState::Unusable => "secure TLSA records, none usable".into(),
        DaneState::NoRecords => "no TLSA records".into(),
        DaneState::Insecure => "insecure (unsigned)".into(),
        DaneState::Bogus(e) => format!("bogus ({e})"),
        DaneState::Failed(e) => format!("lookup failed ({e})"),
    }
}

fn describe_sts(s: &StsState) -> String {
    match s {
        StsState::NotLooked => "off".into(),
        StsState::Enforce { mx_listed } => format!("enforce, MX listed: {mx_listed}"),
        StsState::Testing { mx_listed } => format!("testing, MX listed: {mx_listed}"),
        StsState::NoPolicy => "no policy".into(),
        StsState::Failed(e) => format!("fetch failed ({e})"),
    }
}
