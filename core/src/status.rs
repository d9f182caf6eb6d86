//! The gateway's `/status` document (docs/interfaces.md): which config is live, which
//! connector generations it holds, certificate expiries and validation probe results. The
//! operator's `Programmed` condition is computed from it.
//!
//! `configHash` and `connectors` are required, so a document without them is an error, not an
//! empty status. Fields added later must carry `#[serde(default)]` (or be an `Option`) so an
//! operator reading an older gateway during a rolling upgrade still parses it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    /// Hex sha256 of the live connectors file.
    pub config_hash: String,
    /// RFC 3339 time of the last successful load.
    pub loaded_at: Option<String>,
    /// The last reload's error, while the previous config is kept.
    pub last_reload_error: Option<String>,
    pub connectors: Vec<StatusConnector>,
    #[serde(default)]
    pub certificates: Vec<StatusCertificate>,
    #[serde(default)]
    pub validation: Vec<StatusValidation>,
}

/// A connector in the live config, with the generation it was rendered from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusConnector {
    /// `namespace/name`.
    pub name: String,
    /// `Inbound` or `Outbound`.
    pub direction: String,
    pub generation: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusCertificate {
    /// `server`, `upstream`, or the file name as written in the config.
    pub file: String,
    pub subject: String,
    /// RFC 3339.
    pub not_after: String,
}

/// The latest validation probe of one next-hop host of an Outbound connector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusValidation {
    pub connector: String,
    pub host: String,
    /// RFC 3339 time of the probe.
    pub time: Option<String>,
    /// `Success` or `Failure`.
    pub result: String,
    pub tls_version: Option<String>,
    pub peer_subject: Option<String>,
    pub peer_not_after: Option<String>,
    pub error: Option<String>,
    /// Which outbound TLS policy authenticated the host (`dane`, `mta-sts`, `none`) and what
    /// was found (TLSA records, MTA-STS mode), for connectors with a DANE/MTA-STS mode.
    #[serde(default)]
    pub policy: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_required_fields() {
        let s = GatewayStatus {
            config_hash: "ab12".into(),
            loaded_at: Some("2026-12-01T10:00:00Z".into()),
            last_reload_error: None,
            connectors: vec![StatusConnector {
                name: "mail/contoso".into(),
                direction: "Inbound".into(),
                generation: 3,
            }],
            certificates: vec![StatusCertificate {
                file: "server".into(),
                subject: "CN=gw".into(),
                not_after: "2027-01-01T00:00:00Z".into(),
            }],
            validation: vec![StatusValidation {
                connector: "mail/fabrikam".into(),
                host: "smtp.fabrikam.test:25".into(),
                result: "Success".into(),
                ..StatusValidation::default()
            }],
        };
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"configHash\":\"ab12\""), "{text}");
        assert!(text.contains("\"peerNotAfter\":null"), "{text}");
        let back: GatewayStatus = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
        // A document without the hash is an error, not an empty status.
        assert!(serde_json::from_str::<GatewayStatus>(r#"{"connectors":[]}"#).is_err());
        // An older gateway without certificates/validation still parses.
        let old: GatewayStatus = serde_json::from_str(
            r#"{"configHash":"x","loadedAt":null,"lastReloadError":null,"connectors":[]}"#,
        )
        .unwrap();
        assert!(old.validation.is_empty());
    }
}
