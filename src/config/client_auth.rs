//! `client_auth:`: htpasswd users, static bearer tokens (read from files or the environment) and
//! the `access` lists, checked against the configured upstreams.

use std::fs;

use super::error::{Check, ConfigError};
use super::raw::RawClientAuth;
use super::upstreams::UpstreamConfig;
use super::values::Secret;

/// `client_auth:` with its files and secrets read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuthConfig {
    /// From the htpasswd file: user name and bcrypt hash.
    pub users: Vec<(String, String)>,
    /// Static bearer tokens: a client name and its token.
    pub tokens: Vec<(String, Secret)>,
    /// Client name → upstream names it may read (`*`: all). `None`: every client reads all.
    pub access: Option<Vec<(String, Vec<String>)>>,
}

impl Check<'_> {
    pub(super) fn client_auth(
        &self,
        raw: &RawClientAuth,
        upstreams: &[UpstreamConfig],
    ) -> Result<ClientAuthConfig, ConfigError> {
        let users = match &raw.htpasswd {
            Some(path) => self.htpasswd("client_auth.htpasswd", path)?,
            None => Vec::new(),
        };
        let mut tokens: Vec<(String, Secret)> = Vec::new();
        for (i, t) in raw.tokens.iter().enumerate() {
            let key = format!("client_auth.tokens[{i}]");
            let known = users
                .iter()
                .map(|(u, _)| u)
                .chain(tokens.iter().map(|(n, _)| n));
            if t.name.is_empty() || known.clone().any(|n| *n == t.name) {
                return Err(
                    self.invalid(&key, format!("name {:?} is empty or already used", t.name))
                );
            }
            let token = match (&t.token_file, &t.token_env) {
                (Some(path), None) => self.password_file(&format!("{key}.token_file"), path)?,
                (None, Some(var)) => (self.env)(var).ok_or_else(|| {
                    self.invalid(
                        &format!("{key}.token_env"),
                        format!("environment variable {var:?} is not set"),
                    )
                })?,
                _ => {
                    return Err(
                        self.invalid(&key, "needs exactly one of token_file, token_env".into())
                    );
                }
            };
            if token.len() < 16 {
                return Err(self.invalid(&key, "the token is shorter than 16 characters".into()));
            }
            tokens.push((t.name.clone(), Secret::new(token)));
        }
        if users.is_empty() && tokens.is_empty() {
            return Err(self.invalid(
                "client_auth",
                "neither htpasswd users nor tokens are configured".into(),
            ));
        }
        let access = match &raw.access {
            None => None,
            Some(map) => Some(self.access(map, &users, &tokens, upstreams)?),
        };
        Ok(ClientAuthConfig {
            users,
            tokens,
            access,
        })
    }

    /// `user:hash` lines; only bcrypt hashes (`htpasswd -B`), the one safe htpasswd scheme.
    pub(super) fn htpasswd(
        &self,
        key: &str,
        path: &str,
    ) -> Result<Vec<(String, String)>, ConfigError> {
        let text = fs::read_to_string(path)
            .map_err(|e| self.invalid(key, format!("{path:?} cannot be read: {e}")))?;
        let mut users = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bcrypt = |h: &str| ["$2a$", "$2b$", "$2y$"].iter().any(|p| h.starts_with(p));
            match line.split_once(':') {
                Some((user, hash)) if !user.is_empty() && bcrypt(hash) => {
                    users.push((user.to_string(), hash.to_string()));
                }
                _ => {
                    return Err(self.invalid(
                        key,
                        format!("{path:?} line {}: not `user:<bcrypt hash>` (create it with htpasswd -B)", n + 1),
                    ));
                }
            }
        }
        Ok(users)
    }

    pub(super) fn access(
        &self,
        map: &std::collections::BTreeMap<String, Vec<String>>,
        users: &[(String, String)],
        tokens: &[(String, Secret)],
        upstreams: &[UpstreamConfig],
    ) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
        let mut out = Vec::new();
        for (client, names) in map {
            let key = format!("client_auth.access.{client}");
            let known =
                users.iter().any(|(u, _)| u == client) || tokens.iter().any(|(t, _)| t == client);
            if !known {
                return Err(self.invalid(
                    &key,
                    format!("{client:?} is neither an htpasswd user nor a token name"),
                ));
            }
            let mut resolved = Vec::new();
            for name in names {
                let upstream = upstreams
                    .iter()
                    .find(|u| u.name == *name || u.aliases.contains(name));
                match upstream {
                    Some(u) => resolved.push(u.name.clone()),
                    None if name == "*" => resolved.push(name.clone()),
                    None => {
                        return Err(
                            self.invalid(&key, format!("{name:?} is not a configured upstream"))
                        );
                    }
                }
            }
            out.push((client.clone(), resolved));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::*;

    #[test]
    fn client_auth_reads_htpasswd_tokens_and_access() {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        fs::write(
            &htpasswd,
            "# users\nalice:$2y$05$abcdefghijklmnopqrstuu5Vw4bDp0jG9S0ZBBGQhYfV8kZNnYd9u\n",
        )
        .unwrap();
        let with_auth = |auth: &str| format!("{MINIMAL}client_auth:\n{auth}");
        let yaml = with_auth(&format!(
            "  htpasswd: {:?}\n  tokens: [{{ name: ci, token_env: CI_TOKEN }}]\n  access: {{ alice: [docker.io], ci: ['*'] }}\n",
            htpasswd
        ));
        let config = parse_env(&yaml, "CI_TOKEN", "0123456789abcdef0123").unwrap();
        let auth = config.client_auth.unwrap();
        assert_eq!(auth.users[0].0, "alice");
        assert_eq!(auth.tokens[0].0, "ci");
        assert_eq!(
            auth.access.unwrap()[1],
            ("ci".to_string(), vec!["*".to_string()])
        );

        fs::write(&htpasswd, "bob:{SHA}abc\n").unwrap();
        let msg = err(&with_auth(&format!("  htpasswd: {:?}\n", htpasswd)));
        assert_contains(&msg, &["client_auth.htpasswd", "line 1", "htpasswd -B"]);
        let msg = err(&with_auth("  tokens: []\n"));
        assert_contains(&msg, &["client_auth: neither htpasswd users nor tokens"]);
        let yaml = with_auth(
            "  tokens: [{ name: ci, token_env: CI_TOKEN }]\n  access: { ci: [quay.io] }\n",
        );
        let msg = parse_env(&yaml, "CI_TOKEN", "0123456789abcdef0123")
            .unwrap_err()
            .to_string();
        assert_contains(
            &msg,
            &[
                "client_auth.access.ci",
                "\"quay.io\" is not a configured upstream",
            ],
        );
        let msg = parse_env(
            &with_auth("  tokens: [{ name: ci, token_env: CI_TOKEN }]\n"),
            "CI_TOKEN",
            "short",
        )
        .unwrap_err()
        .to_string();
        assert_contains(&msg, &["client_auth.tokens[0]", "shorter than 16"]);
    }
}
