//! Registry authentication: `WWW-Authenticate` challenges (RFC 7235) and bearer tokens cached per
//! scope until shortly before they expire.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::sync::Cache;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChallengeError {
    #[error("unsupported auth scheme {0:?}")]
    UnsupportedScheme(String),
    #[error("bearer challenge without a realm")]
    MissingRealm,
    #[error("malformed challenge parameters at byte {0}")]
    Malformed(usize),
}

/// Parse one challenge: `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`.
pub fn parse_challenge(header: &str) -> Result<Challenge, ChallengeError> {
    let header = header.trim();
    let (scheme, rest) = header
        .split_once(|c: char| c.is_ascii_whitespace())
        .unwrap_or((header, ""));
    let is_basic = scheme.eq_ignore_ascii_case("basic");
    if !is_basic && !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ChallengeError::UnsupportedScheme(scheme.to_string()));
    }
    let mut params = parse_params(rest.trim_start()).map_err(ChallengeError::Malformed)?;
    if is_basic {
        return Ok(Challenge::Basic);
    }
    Ok(Challenge::Bearer {
        realm: params.remove("realm").ok_or(ChallengeError::MissingRealm)?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

/// `key=value` pairs separated by commas; values are tokens or quoted strings with `\` escapes.
/// Keys are lower-cased. Returns the byte offset of the first malformed spot on error.
fn parse_params(input: &str) -> Result<BTreeMap<String, String>, usize> {
    let bytes = input.as_bytes();
    let mut params = BTreeMap::new();
    let mut i = 0;
    loop {
        i = skip(bytes, i, |b| b.is_ascii_whitespace() || b == b',');
        if i >= bytes.len() {
            return Ok(params);
        }
        let key_start = i;
        i = skip(bytes, i, |b| {
            b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
        });
        if i == key_start {
            return Err(i);
        }
        let key = input[key_start..i].to_ascii_lowercase();
        i = skip(bytes, i, |b| b == b' ');
        if bytes.get(i) != Some(&b'=') {
            return Err(i);
        }
        i = skip(bytes, i + 1, |b| b == b' ');
        let (value, next) = if bytes.get(i) == Some(&b'"') {
            parse_quoted(input, i + 1)?
        } else {
            let end = skip(bytes, i, |b| b != b',' && !b.is_ascii_whitespace());
            (input[i..end].to_string(), end)
        };
        params.insert(key, value);
        i = next;
    }
}

fn parse_quoted(input: &str, start: usize) -> Result<(String, usize), usize> {
    let mut value = String::new();
    let mut chars = input[start..].char_indices();
    while let Some((offset, c)) = chars.next() {
        match c {
            '"' => return Ok((value, start + offset + 1)),
            '\\' => match chars.next() {
                Some((_, escaped)) => value.push(escaped),
                None => return Err(input.len()),
            },
            c => value.push(c),
        }
    }
    Err(input.len())
}

fn skip(bytes: &[u8], mut i: usize, pred: impl Fn(u8) -> bool) -> usize {
    while i < bytes.len() && pred(bytes[i]) {
        i += 1;
    }
    i
}

/// The scope dockside asks for when it pulls `repo`.
pub fn pull_scope(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

/// Bearer tokens by scope, each expiring on its own lifetime.
#[derive(Clone)]
pub struct TokenCache {
    tokens: Cache<String, (String, Duration)>,
}

struct TokenLifetime;

impl Expiry<String, (String, Duration)> for TokenLifetime {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &(String, Duration),
        _now: Instant,
    ) -> Option<Duration> {
        Some(value.1)
    }
}

impl TokenCache {
    pub fn new() -> TokenCache {
        TokenCache {
            tokens: Cache::builder()
                .max_capacity(10_000)
                .expire_after(TokenLifetime)
                .build(),
        }
    }

    pub fn get(&self, scope: &str) -> Option<String> {
        self.tokens.get(scope).map(|(token, _)| token)
    }

    /// Forget a token the upstream refused.
    pub fn remove(&self, scope: &str) {
        self.tokens.invalidate(scope);
    }

    /// Keep `token` for `expires_in` less a safety margin, so it is never sent just as it expires.
    pub fn insert(&self, scope: &str, token: String, expires_in: Duration) {
        let margin = (expires_in / 10).clamp(Duration::from_secs(1), Duration::from_secs(30));
        let lifetime = expires_in.saturating_sub(margin);
        if !lifetime.is_zero() {
            self.tokens.insert(scope.to_string(), (token, lifetime));
        }
    }
}

impl Default for TokenCache {
    fn default() -> Self {
        TokenCache::new()
    }
}

/// The token endpoint's answer (Docker's `token` or OAuth2's `access_token`).
#[derive(serde::Deserialize)]
pub struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token and how long it lives (60 s when the server does not say, as the spec defines).
    pub fn into_parts(self) -> Option<(String, Duration)> {
        let token = self.token.or(self.access_token)?;
        Some((
            token,
            Duration::from_secs(self.expires_in.unwrap_or(60).max(1)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_bearer_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/nginx:pull".into()),
            }
        );
    }

    #[test]
    fn parses_basic_and_unquoted_and_escaped_values() {
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Ok(Challenge::Basic)
        );
        let c = parse_challenge(r#"bearer Realm=http://t/token, service="a\"b""#).unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "http://t/token".into(),
                service: Some("a\"b".into()),
                scope: None
            }
        );
    }

    #[test]
    fn rejects_malformed_challenges() {
        assert_eq!(
            parse_challenge(r#"Bearer service="x""#),
            Err(ChallengeError::MissingRealm)
        );
        assert!(matches!(
            parse_challenge(r#"Bearer realm="unterminated"#),
            Err(ChallengeError::Malformed(_))
        ));
        assert!(matches!(
            parse_challenge("Bearer =x"),
            Err(ChallengeError::Malformed(_))
        ));
        assert!(matches!(
            parse_challenge("Negotiate abc"),
            Err(ChallengeError::UnsupportedScheme(_))
        ));
        assert!(matches!(
            parse_challenge("Digest realm=x"),
            Err(ChallengeError::UnsupportedScheme(_))
        ));
    }

    #[test]
    fn tokens_expire_before_their_lifetime() {
        let cache = TokenCache::new();
        cache.insert("s", "t".into(), Duration::from_secs(300));
        assert_eq!(cache.get("s").as_deref(), Some("t"));
        cache.insert("short", "t".into(), Duration::from_secs(1));
        assert_eq!(cache.get("short"), None, "a 1 s token is not worth keeping");
    }

    #[test]
    fn token_response_defaults_to_60s() {
        let r: TokenResponse = serde_json::from_str(r#"{"access_token":"abc"}"#).unwrap();
        assert_eq!(
            r.into_parts(),
            Some(("abc".into(), Duration::from_secs(60)))
        );
    }
}
