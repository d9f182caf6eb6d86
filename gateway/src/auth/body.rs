//! DKIM body hashes computed while DATA streams, one per distinct (body canonicalization,
//! hash algorithm, `l=`) among the message's signatures. Pure.
//!
//! Why this exists: `mail-auth`'s `verify_dkim` takes an `AuthenticatedMessage` that borrows
//! the whole raw message and hashes its body in one go, so used as documented it needs the
//! message buffered whole (25 MiB per session at the default size limit). Instead the session
//! parses only the held header section, verifies each signature's header hash and key with
//! `verify_dkim` as if the body hash it claims (`bh=`) were right, stamps that result, and
//! then feeds the body to `mail-auth`'s own incremental canonicalizer (`BodyHasher`) here.
//! The hash of a slot does not depend on any claim, so one hasher serves every signature of
//! the slot, each judged against its own `bh=` ([`super::verdict::body_verdict`]). A claim
//! that does not match breaks that signature: if it was stamped `pass` (the decision rested
//! on it), the session aborts the next hop's transaction without its final dot (as for a bare
//! LF) and refuses the message, so a stamp the body contradicts is never delivered; any other
//! pre-body pass was stamped `neutral` and just becomes `fail` in the logs and metrics.
//! Memory: a few hash states, whatever the message size.

use mail_auth::common::crypto::{HashAlgorithm, HashContext, HashImpl, Sha1, Sha256};
use mail_auth::dkim::Canonicalization;
use mail_auth::dkim::canonicalize::BodyHasher;

/// What one body hash is computed for: `(c= body part, a= hash, l=)`.
pub type Slot = (Canonicalization, HashAlgorithm, u64);

/// More slots than canonicalizations × hashes cannot occur without `l=`, which strict
/// parsing refuses; the cap keeps a hostile header section from multiplying the work.
const MAX_SLOTS: usize = 8;

enum Hasher {
    Sha256(BodyHasher<<Sha256 as HashImpl>::Context>),
    Sha1(BodyHasher<<Sha1 as HashImpl>::Context>),
}

pub struct BodyHashes {
    hashers: Vec<(Slot, Hasher)>,
}

impl BodyHashes {
    pub fn new(slots: impl IntoIterator<Item = Slot>) -> BodyHashes {
        let mut hashers: Vec<(Slot, Hasher)> = Vec::new();
        for slot in slots {
            if hashers.len() == MAX_SLOTS || hashers.iter().any(|(s, _)| *s == slot) {
                continue;
            }
            let (c, h, l) = slot;
            let hasher = match h {
                HashAlgorithm::Sha256 => Hasher::Sha256(BodyHasher::new(Sha256::hasher(), c, l)),
                HashAlgorithm::Sha1 => Hasher::Sha1(BodyHasher::new(Sha1::hasher(), c, l)),
            };
            hashers.push((slot, hasher));
        }
        BodyHashes { hashers }
    }

    pub fn is_empty(&self) -> bool {
        self.hashers.is_empty()
    }

    /// Body bytes as the next hop stores them (un-stuffed), in order, split anywhere.
    pub fn write(&mut self, chunk: &[u8]) {
        for (_, h) in &mut self.hashers {
            match h {
                Hasher::Sha256(b) => b.write(chunk),
                Hasher::Sha1(b) => b.write(chunk),
            }
        }
    }

    pub fn finish(self) -> Vec<(Slot, Vec<u8>)> {
        self.hashers
            .into_iter()
            .map(|(slot, h)| {
                let digest = match h {
                    Hasher::Sha256(b) => b.finish().0.complete().as_ref().to_vec(),
                    Hasher::Sha1(b) => b.finish().0.complete().as_ref().to_vec(),
                };
                (slot, digest)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(slot: Slot, chunks: &[&[u8]]) -> Vec<u8> {
        let mut b = BodyHashes::new([slot]);
        for c in chunks {
            b.write(c);
        }
        b.finish().remove(0).1
    }

    /// The incremental hash equals the one mail-auth computes over a whole parsed message
    /// (which is what `verify_dkim` would compare), however the body is split.
    #[test]
    fn matches_whole_message_hash_for_any_split() {
        let body: &[u8] = b"Hello  there \r\n\r\nline\twith  tabs \r\n\r\n\r\n";
        let mut raw = b"From: a@example.org\r\nDKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org; s=s; h=from; bh=AAAA; b=AAAA\r\nDKIM-Signature: v=1; a=rsa-sha256; c=simple/simple; d=example.org; s=s; h=from; bh=AAAA; b=AAAA\r\n\r\n".to_vec();
        raw.extend_from_slice(body);
        let msg = mail_auth::AuthenticatedMessage::parse(&raw).unwrap();
        assert_eq!(msg.body_hashes.len(), 2);
        for (c, h, l, whole) in &msg.body_hashes {
            for split in [1, 3, 7, body.len()] {
                let chunks: Vec<&[u8]> = body.chunks(split).collect();
                assert_eq!(&hash((*c, *h, *l), &chunks), whole, "{c:?} split {split}");
            }
        }
        // A changed body gives another hash.
        let slot = (Canonicalization::Relaxed, HashAlgorithm::Sha256, 0);
        assert_ne!(hash(slot, &[body]), hash(slot, &[b"Hello there\r\nX\r\n"]));
    }

    #[test]
    fn slots_are_deduplicated_and_capped() {
        let slot = (Canonicalization::Simple, HashAlgorithm::Sha256, 0);
        assert_eq!(BodyHashes::new([slot, slot]).finish().len(), 1);
        let many = (1..100).map(|l| (Canonicalization::Simple, HashAlgorithm::Sha1, l));
        assert_eq!(BodyHashes::new(many).finish().len(), MAX_SLOTS);
    }
}
