//! The proof a peer request carries that it comes from a member: an HMAC-SHA256, keyed with
//! the cluster's shared secret, over the request's method, path and query, the sender, the
//! mode and the time. A replica serves a request with a valid proof without client
//! authentication (the asking replica checked its client) and never forwards it again; a proof
//! that does not verify, or is more than [`MAX_SKEW`] old or early, is refused.
//!
//! The time bounds replay: a captured request can be replayed for that long, and only for the
//! same object. Peers that cross untrusted networks should also use TLS between them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;

use crate::config::{PeerAddr, Secret};

pub const HEADER_FROM: &str = "x-dockside-peer";
pub const HEADER_MODE: &str = "x-dockside-peer-mode";
pub const HEADER_TIME: &str = "x-dockside-peer-time";
pub const HEADER_PROOF: &str = "x-dockside-peer-proof";

/// How far a proof's time may be from the receiver's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(60);

/// What the asking replica wants of the one it asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Answer as the owner would: from the store, a fill in flight, or one fetch upstream.
    Fill,
    /// Answer only from what is stored (and fresh, for a tag); ask nobody. A new owner asks the
    /// previous holders this way. A fill in flight does not count: two replicas each waiting
    /// for the other's fill would wait for ever.
    Held,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Fill => "fill",
            Mode::Held => "held",
        }
    }

    fn parse(text: &str) -> Option<Mode> {
        match text {
            "fill" => Some(Mode::Fill),
            "held" => Some(Mode::Held),
            _ => None,
        }
    }
}

/// The peer headers of a request as received, not yet checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerClaim {
    pub from: Option<String>,
    pub mode: Option<String>,
    pub time: Option<String>,
    pub proof: Option<String>,
}

impl PeerClaim {
    /// Whether the request claims to come from a peer at all.
    pub fn is_claimed(&self) -> bool {
        self.from.is_some() || self.mode.is_some() || self.time.is_some() || self.proof.is_some()
    }
}

/// A claim that verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRequest {
    pub from: PeerAddr,
    pub mode: Mode,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("peer request without {0}")]
    Missing(&'static str),
    #[error("peer request with a malformed {0}")]
    Malformed(&'static str),
    #[error("peer proof is {0} s away from this replica's clock (at most {max} s accepted)", max = MAX_SKEW.as_secs())]
    Skewed(u64),
    #[error("peer proof does not verify: not signed with this cluster's secret")]
    Wrong,
}

pub struct Signer {
    key: hmac::Key,
}

impl Signer {
    pub fn new(secret: &Secret) -> Signer {
        Signer {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes()),
        }
    }

    /// The four headers of a request to `path_and_query`, signed now.
    pub fn sign(
        &self,
        method: &str,
        path_and_query: &str,
        from: &PeerAddr,
        mode: Mode,
    ) -> [(&'static str, String); 4] {
        let time = unix_now().to_string();
        let text = message(method, path_and_query, from.as_str(), mode.as_str(), &time);
        let tag = hmac::sign(&self.key, text.as_bytes());
        [
            (HEADER_FROM, from.to_string()),
            (HEADER_MODE, mode.as_str().to_string()),
            (HEADER_TIME, time),
            (HEADER_PROOF, hex::encode(tag.as_ref())),
        ]
    }

    /// Check a claim against the request it came with (`query` without the `?`).
    pub fn verify(
        &self,
        method: &str,
        path: &str,
        query: Option<&str>,
        claim: &PeerClaim,
    ) -> Result<PeerRequest, ProofError> {
        let from = claim
            .from
            .as_deref()
            .ok_or(ProofError::Missing(HEADER_FROM))?;
        let mode_text = claim
            .mode
            .as_deref()
            .ok_or(ProofError::Missing(HEADER_MODE))?;
        let time = claim
            .time
            .as_deref()
            .ok_or(ProofError::Missing(HEADER_TIME))?;
        let proof = claim
            .proof
            .as_deref()
            .ok_or(ProofError::Missing(HEADER_PROOF))?;
        let mode = Mode::parse(mode_text).ok_or(ProofError::Malformed(HEADER_MODE))?;
        let from = PeerAddr::parse(from).map_err(|_| ProofError::Malformed(HEADER_FROM))?;
        let at: u64 = time
            .parse()
            .map_err(|_| ProofError::Malformed(HEADER_TIME))?;
        let tag = hex::decode(proof).map_err(|_| ProofError::Malformed(HEADER_PROOF))?;
        let path_and_query = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let text = message(method, &path_and_query, from.as_str(), mode_text, time);
        // Constant-time, in ring.
        hmac::verify(&self.key, text.as_bytes(), &tag).map_err(|_| ProofError::Wrong)?;
        let skew = unix_now().abs_diff(at);
        if skew > MAX_SKEW.as_secs() {
            return Err(ProofError::Skewed(skew));
        }
        Ok(PeerRequest { from, mode })
    }
}

fn message(method: &str, path_and_query: &str, from: &str, mode: &str, time: &str) -> String {
    format!("dockside-peer-v1\n{method}\n{path_and_query}\n{from}\n{mode}\n{time}")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(secret: &str) -> Signer {
        Signer::new(&Secret::new(secret.into()))
    }

    fn claim_of(headers: &[(&'static str, String); 4]) -> PeerClaim {
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        };
        PeerClaim {
            from: get(HEADER_FROM),
            mode: get(HEADER_MODE),
            time: get(HEADER_TIME),
            proof: get(HEADER_PROOF),
        }
    }

    const PATH: &str = "/v2/library/alpine/blobs/sha256:aa";
    const QUERY: &str = "ns=docker.io";

    #[test]
    fn a_signed_request_verifies_and_nothing_else_does() {
        let (s, me) = (
            signer("a secret a secret a secret a secret"),
            PeerAddr::parse("10.0.0.1:5000").unwrap(),
        );
        let headers = s.sign("GET", &format!("{PATH}?{QUERY}"), &me, Mode::Held);
        let claim = claim_of(&headers);
        assert_eq!(
            s.verify("GET", PATH, Some(QUERY), &claim),
            Ok(PeerRequest {
                from: me.clone(),
                mode: Mode::Held
            })
        );
        // Any part changed: another secret, method, path, query, sender or mode.
        let other = signer("another secret another secret another");
        assert_eq!(
            other.verify("GET", PATH, Some(QUERY), &claim),
            Err(ProofError::Wrong)
        );
        assert_eq!(
            s.verify("HEAD", PATH, Some(QUERY), &claim),
            Err(ProofError::Wrong)
        );
        assert_eq!(
            s.verify("GET", "/v2/x/blobs/sha256:aa", Some(QUERY), &claim),
            Err(ProofError::Wrong)
        );
        assert_eq!(
            s.verify("GET", PATH, Some("ns=quay.io"), &claim),
            Err(ProofError::Wrong)
        );
        assert_eq!(s.verify("GET", PATH, None, &claim), Err(ProofError::Wrong));
        let mut c = claim.clone();
        c.from = Some("10.0.0.2:5000".into());
        assert_eq!(
            s.verify("GET", PATH, Some(QUERY), &c),
            Err(ProofError::Wrong)
        );
        let mut c = claim.clone();
        c.mode = Some("fill".into());
        assert_eq!(
            s.verify("GET", PATH, Some(QUERY), &c),
            Err(ProofError::Wrong)
        );
    }

    #[test]
    fn missing_malformed_and_old_proofs_are_refused() {
        let (s, me) = (
            signer("a secret a secret a secret a secret"),
            PeerAddr::parse("10.0.0.1:5000").unwrap(),
        );
        let claim = claim_of(&s.sign("GET", PATH, &me, Mode::Fill));
        let mut c = claim.clone();
        c.proof = None;
        assert_eq!(
            s.verify("GET", PATH, None, &c),
            Err(ProofError::Missing(HEADER_PROOF))
        );
        let mut c = claim.clone();
        c.proof = Some("zz".into());
        assert_eq!(
            s.verify("GET", PATH, None, &c),
            Err(ProofError::Malformed(HEADER_PROOF))
        );
        let mut c = claim.clone();
        c.mode = Some("all".into());
        assert_eq!(
            s.verify("GET", PATH, None, &c),
            Err(ProofError::Malformed(HEADER_MODE))
        );
        // A proof signed two minutes ago, correctly.
        let old = (unix_now() - 120).to_string();
        let text = message("GET", PATH, me.as_str(), "fill", &old);
        let tag = hmac::sign(&s.key, text.as_bytes());
        let c = PeerClaim {
            time: Some(old),
            proof: Some(hex::encode(tag.as_ref())),
            ..claim.clone()
        };
        assert!(matches!(
            s.verify("GET", PATH, None, &c),
            Err(ProofError::Skewed(120..=122))
        ));
        assert!(!PeerClaim::default().is_claimed());
        assert!(claim.is_claimed());
    }
}
