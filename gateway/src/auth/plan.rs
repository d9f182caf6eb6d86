//! Which checks a transaction runs and which it must pass. Pure: decided at MAIL FROM from the
//! claiming connector's `senderAuthentication` (or the fleet's `unclaimedSenderAuthentication`)
//! so the session knows before DATA whether it must hold the header section back.

use crate::config::{SenderAuthentication, UnclaimedSenderAuthentication};

/// What must pass for the mail to be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforce {
    /// Evaluate and stamp only.
    Nothing,
    Spf,
    Dkim,
    Dmarc,
    /// Unclaimed mail: refuse only a DMARC fail of a domain publishing `p=reject`.
    DmarcReject,
}

impl Enforce {
    pub fn as_str(self) -> &'static str {
        match self {
            Enforce::Nothing => "none",
            Enforce::Spf => "spf",
            Enforce::Dkim => "dkim",
            Enforce::Dmarc => "dmarc",
            Enforce::DmarcReject => "dmarcReject",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub spf: bool,
    pub dkim: bool,
    pub dmarc: bool,
    pub enforce: Enforce,
}

impl Plan {
    pub const OFF: Plan = Plan {
        spf: false,
        dkim: false,
        dmarc: false,
        enforce: Enforce::Nothing,
    };

    const ALL: Plan = Plan {
        spf: true,
        dkim: true,
        dmarc: true,
        enforce: Enforce::Nothing,
    };

    /// `claimed`: the setting of the connector that claimed the transaction, `None` when no
    /// connector claims it. Internal senders relaying outbound are never checked: their mail
    /// is ours.
    pub fn for_transaction(
        claimed: Option<SenderAuthentication>,
        internal: bool,
        unclaimed: UnclaimedSenderAuthentication,
    ) -> Plan {
        if internal && claimed.is_none() {
            return Plan::OFF;
        }
        match claimed {
            Some(SenderAuthentication::None) => Plan::OFF,
            Some(SenderAuthentication::Spf) => Plan {
                spf: true,
                enforce: Enforce::Spf,
                ..Plan::OFF
            },
            Some(SenderAuthentication::Dkim) => Plan {
                dkim: true,
                enforce: Enforce::Dkim,
                ..Plan::OFF
            },
            Some(SenderAuthentication::Dmarc) => Plan {
                enforce: Enforce::Dmarc,
                ..Plan::ALL
            },
            None => match unclaimed {
                UnclaimedSenderAuthentication::None => Plan::OFF,
                UnclaimedSenderAuthentication::Stamp => Plan::ALL,
                UnclaimedSenderAuthentication::EnforceDmarcReject => Plan {
                    enforce: Enforce::DmarcReject,
                    ..Plan::ALL
                },
            },
        }
    }

    pub fn is_off(&self) -> bool {
        !(self.spf || self.dkim || self.dmarc)
    }

    /// DKIM or DMARC: the header section is held back until they are decided.
    pub fn needs_message(&self) -> bool {
        self.dkim || self.dmarc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SenderAuthentication as S;
    use UnclaimedSenderAuthentication as U;

    #[test]
    fn connector_setting_wins_and_unclaimed_default_applies_only_to_unclaimed() {
        assert_eq!(
            Plan::for_transaction(Some(S::None), false, U::Stamp),
            Plan::OFF
        );
        let spf = Plan::for_transaction(Some(S::Spf), false, U::None);
        assert!(spf.spf && !spf.needs_message() && spf.enforce == Enforce::Spf);
        let dkim = Plan::for_transaction(Some(S::Dkim), false, U::None);
        assert!(!dkim.spf && dkim.dkim && !dkim.dmarc && dkim.enforce == Enforce::Dkim);
        let dmarc = Plan::for_transaction(Some(S::Dmarc), false, U::None);
        assert!(dmarc.spf && dmarc.dkim && dmarc.dmarc && dmarc.enforce == Enforce::Dmarc);
        assert_eq!(Plan::for_transaction(None, false, U::None), Plan::OFF);
        let stamp = Plan::for_transaction(None, false, U::Stamp);
        assert!(stamp.dmarc && stamp.enforce == Enforce::Nothing);
        let reject = Plan::for_transaction(None, false, U::EnforceDmarcReject);
        assert_eq!(reject.enforce, Enforce::DmarcReject);
        // Internal senders' own mail is not checked; a connector's setting still applies.
        assert_eq!(
            Plan::for_transaction(None, true, U::EnforceDmarcReject),
            Plan::OFF
        );
        assert_eq!(
            Plan::for_transaction(Some(S::Spf), true, U::None).enforce,
            Enforce::Spf
        );
    }
}
