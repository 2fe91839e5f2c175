//! Who may pull through dockside (`client_auth:`): htpasswd users (bcrypt) with Basic auth, and
//! static bearer tokens, each optionally limited to some upstreams. An unauthenticated request
//! gets a 401 with a Basic challenge, which docker, containerd and podman answer with the
//! credentials configured for the mirror's host.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use moka::sync::Cache;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use crate::config::{ClientAuthConfig, Secret};
use crate::error::ApiError;

/// Checked Authorization values are remembered this long: bcrypt is slow on purpose, and a
/// pull sends the same header dozens of times.
const VERIFIED_FOR: Duration = Duration::from_secs(300);
/// bcrypt checks running at once; more wait. Bounds the CPU a password-guessing client can take.
const CONCURRENT_CHECKS: usize = 2;

pub struct ClientAuth {
    users: HashMap<String, String>,
    tokens: Vec<(Arc<str>, Secret)>,
    access: Option<HashMap<String, Vec<String>>>,
    /// sha256 of an Authorization value that passed → the client it names.
    verified: Cache<[u8; 32], Arc<str>>,
    checks: Arc<Semaphore>,
}

impl ClientAuth {
    pub fn new(config: &ClientAuthConfig) -> ClientAuth {
        ClientAuth {
            users: config.users.iter().cloned().collect(),
            tokens: config
                .tokens
                .iter()
                .map(|(name, token)| (Arc::from(name.as_str()), token.clone()))
                .collect(),
            access: config.access.as_ref().map(|a| a.iter().cloned().collect()),
            verified: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(VERIFIED_FOR)
                .build(),
            checks: Arc::new(Semaphore::new(CONCURRENT_CHECKS)),
        }
    }

    /// The client an `Authorization` header names, if its credentials are right.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<str>, ApiError> {
        let Some(value) = authorization else {
            return Err(ApiError::ClientUnauthorized(
                "authentication required".into(),
            ));
        };
        let key: [u8; 32] = Sha256::digest(value.as_bytes()).into();
        if let Some(client) = self.verified.get(&key) {
            return Ok(client);
        }
        let client = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => self.token(token),
            Some((scheme, creds)) if scheme.eq_ignore_ascii_case("basic") => {
                self.basic(creds.trim()).await
            }
            _ => None,
        };
        let client = client.ok_or_else(|| {
            ApiError::ClientUnauthorized("wrong user name, password or token".into())
        })?;
        self.verified.insert(key, client.clone());
        Ok(client)
    }

    /// Whether `client` may pull from the upstream named `upstream` (its canonical name).
    pub fn may_read(&self, client: &str, upstream: &str) -> bool {
        let Some(access) = &self.access else {
            return true;
        };
        access
            .get(client)
            .is_some_and(|names| names.iter().any(|n| n == "*" || n == upstream))
    }

    fn token(&self, offered: &str) -> Option<Arc<str>> {
        let offered = offered.trim().as_bytes();
        self.tokens
            .iter()
            .find(|(_, token)| constant_time_eq(token.expose().as_bytes(), offered))
            .map(|(name, _)| name.clone())
    }

    async fn basic(&self, encoded: &str) -> Option<Arc<str>> {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':')?;
        let hash = self.users.get(user)?.clone();
        let password = password.to_string();
        let _permit = self.checks.clone().acquire_owned().await.ok()?;
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .ok()?
            .unwrap_or(false);
        ok.then(|| Arc::from(user))
    }
}

/// Compares without stopping at the first difference (`subtle`, which also keeps the compiler
/// from turning the comparison into an early exit), so timing does not reveal a token's prefix.
/// A length mismatch returns at once: lengths are not secret.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_equal_only_when_identical() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcdeF"));
        assert!(!constant_time_eq(b"x123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!constant_time_eq(b"", b"0"));
        assert!(constant_time_eq(b"", b""));
    }

    fn auth(access: Option<Vec<(String, Vec<String>)>>) -> ClientAuth {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        ClientAuth::new(&ClientAuthConfig {
            users: vec![("alice".into(), hash)],
            tokens: vec![("ci".into(), Secret::new("0123456789abcdef".into()))],
            access,
        })
    }

    fn basic(user: &str, pass: &str) -> String {
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        format!("Basic {encoded}")
    }

    #[tokio::test]
    async fn basic_and_bearer_clients_are_named_and_wrong_ones_refused() {
        let auth = auth(None);
        let alice = auth.authenticate(Some(&basic("alice", "s3cret"))).await;
        assert_eq!(alice.unwrap().as_ref(), "alice");
        // Second time from the cache of checked headers.
        assert!(
            auth.authenticate(Some(&basic("alice", "s3cret")))
                .await
                .is_ok()
        );
        let ci = auth.authenticate(Some("Bearer 0123456789abcdef")).await;
        assert_eq!(ci.unwrap().as_ref(), "ci");
        for wrong in [
            Some(basic("alice", "guess")),
            Some(basic("mallory", "s3cret")),
            Some("Bearer 0123456789abcdeX".to_string()),
            Some("Digest x".to_string()),
            None,
        ] {
            let err = auth.authenticate(wrong.as_deref()).await.unwrap_err();
            assert!(matches!(err, ApiError::ClientUnauthorized(_)), "{wrong:?}");
        }
    }

    #[test]
    fn access_lists_limit_upstreams() {
        let open = auth(None);
        assert!(open.may_read("alice", "ghcr.io"));
        let limited = auth(Some(vec![
            ("alice".into(), vec!["docker.io".into()]),
            ("ci".into(), vec!["*".into()]),
        ]));
        assert!(limited.may_read("alice", "docker.io"));
        assert!(!limited.may_read("alice", "ghcr.io"));
        assert!(limited.may_read("ci", "ghcr.io"));
    }
}
