//! The configured upstream registries: which one a request goes to ([`Upstreams::resolve`]) and
//! how dockside talks to it ([`client::Upstream`]).

pub mod auth;
pub mod client;
pub mod credentials;
pub mod endpoints;

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName};

pub use client::Upstream;

/// Why an upstream request failed. Carries the upstream's name so every message names it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("upstream {upstream}: {kind}")]
pub struct UpstreamError {
    pub upstream: Arc<str>,
    pub kind: UpstreamErrorKind,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamErrorKind {
    #[error("not found")]
    NotFound,
    #[error("authentication failed: {0}")]
    Unauthorized(String),
    #[error("access denied: {0}")]
    Denied(String),
    #[error("too many requests")]
    TooManyRequests { retry_after: Option<u64> },
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("timed out {0}")]
    Timeout(String),
    #[error("unreachable: {0}")]
    Connect(String),
    /// Every URL's circuit is open (it kept failing), so none was asked; not retried either.
    #[error("not asked while it keeps failing ({0}); it is tried again after circuit.cooldown")]
    CircuitOpen(String),
    #[error("body failed: {0}")]
    Body(String),
    #[error("body larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("body ended after {got} of {expected} bytes")]
    Truncated { expected: u64, got: u64 },
    #[error("content hashes to {actual}, not {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("cache write failed: {0}")]
    Store(String),
    #[error("is offline (offline: true); only cached content is served")]
    Offline,
}

impl UpstreamError {
    pub fn new(upstream: &Arc<str>, kind: UpstreamErrorKind) -> UpstreamError {
        UpstreamError {
            upstream: upstream.clone(),
            kind,
        }
    }

    /// Failures where the upstream could not give a definite answer: a cached answer may be
    /// served instead (stale-if-error).
    pub fn is_transient(&self) -> bool {
        use UpstreamErrorKind::*;
        match &self.kind {
            Status(code) => *code >= 500,
            Timeout(_)
            | Connect(_)
            | CircuitOpen(_)
            | Body(_)
            | Truncated { .. }
            | TooManyRequests { .. } => true,
            _ => false,
        }
    }
}

/// Why a request names no configured upstream. `error.rs` turns it into `NAME_UNKNOWN`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// An `ns` (or host prefix) that is not the name or alias of any upstream.
    #[error("no upstream is configured for {0:?}")]
    NoUpstream(String),
    /// A name whose first component is a registry host (as in image references: it has a dot,
    /// or is `localhost`) that is not the name or alias of any upstream.
    #[error(
        "no upstream is configured for {host:?} (the first component of {name:?} names a registry host)"
    )]
    NoUpstreamForPrefix { host: String, name: String },
}

/// Every configured upstream, by name and alias.
pub struct Upstreams {
    by_name: HashMap<String, Arc<Upstream>>,
    default: Arc<Upstream>,
    all: Vec<Arc<Upstream>>,
}

impl Upstreams {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Upstreams> {
        let mut by_name = HashMap::new();
        let mut all = Vec::new();
        for cfg in &config.upstreams {
            let upstream = Arc::new(Upstream::new(cfg, metrics.clone())?);
            for name in std::iter::once(&cfg.name).chain(&cfg.aliases) {
                by_name.insert(name.to_ascii_lowercase(), upstream.clone());
            }
            all.push(upstream);
        }
        let default = by_name
            .get(&config.default_upstream.to_ascii_lowercase())
            .cloned()
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "default upstream {} is not configured",
                    config.default_upstream
                )
            })?;
        Ok(Upstreams {
            by_name,
            default,
            all,
        })
    }

    pub fn all(&self) -> &[Arc<Upstream>] {
        &self.all
    }

    /// Pick the upstream for a request and the repository name to ask it for.
    ///
    /// `ns` (containerd's mirror parameter) wins; then a first path component naming an upstream;
    /// then the default. An `ns`, or a first component that is a registry host, naming no
    /// upstream is refused: dockside is not an open proxy, and the default upstream is never
    /// asked for another registry's repository (`ghcr.io/owner/app`).
    pub fn resolve(
        &self,
        ns: Option<&str>,
        name: &RepoName,
    ) -> Result<(Arc<Upstream>, RepoName), ResolveError> {
        let (upstream, name) = match ns {
            Some(ns) => {
                let upstream = self
                    .by_name
                    .get(&ns.to_ascii_lowercase())
                    .ok_or_else(|| ResolveError::NoUpstream(ns.to_string()))?;
                (upstream.clone(), name.clone())
            }
            None => self.by_prefix(name)?,
        };
        let name = if upstream.library_prefix {
            name.with_library_prefix()
        } else {
            name
        };
        Ok((upstream, name))
    }

    fn by_prefix(&self, name: &RepoName) -> Result<(Arc<Upstream>, RepoName), ResolveError> {
        let first = name.first_component();
        let Some(rest) = name.strip_first_component() else {
            return Ok((self.default.clone(), name.clone()));
        };
        match self.by_name.get(first) {
            Some(upstream) => Ok((upstream.clone(), rest)),
            None if names_a_registry(first) => Err(ResolveError::NoUpstreamForPrefix {
                host: first.to_string(),
                name: name.to_string(),
            }),
            None => Ok((self.default.clone(), name.clone())),
        }
    }
}

/// Whether the first component of a repository name is a registry host, by the rule image
/// references follow (docker's `splitDockerDomain`): it contains a `.` or a `:`, or is
/// `localhost`. Docker Hub's namespaces never do.
fn names_a_registry(first: &str) -> bool {
    first.contains(['.', ':']) || first == "localhost"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstreams() -> Upstreams {
        let yaml = "listen: 127.0.0.1:5000\ncache: {dir: /nonexistent, max_size: 1GiB}\n\
                    upstreams:\n  - {name: docker.io, url: 'http://127.0.0.1:1'}\n  \
                    - {name: registry.corp:5000, url: 'http://127.0.0.1:2'}\n";
        let config = Config::from_yaml(yaml, "test.yaml").unwrap();
        Upstreams::new(&config, Arc::new(Metrics::new())).unwrap()
    }

    fn resolve(ns: Option<&str>, name: &str) -> Result<(String, String), ResolveError> {
        let name = RepoName::parse(name).unwrap();
        let (upstream, name) = upstreams().resolve(ns, &name)?;
        Ok((upstream.name.to_string(), name.to_string()))
    }

    fn pair(upstream: &str, name: &str) -> Result<(String, String), ResolveError> {
        Ok((upstream.to_string(), name.to_string()))
    }

    #[test]
    fn a_first_component_naming_a_configured_upstream_is_its_prefix() {
        assert_eq!(
            resolve(None, "docker.io/library/alpine"),
            pair("docker.io", "library/alpine")
        );
        assert_eq!(
            resolve(None, "docker.io/alpine"),
            pair("docker.io", "library/alpine")
        );
        assert_eq!(resolve(None, "alpine"), pair("docker.io", "library/alpine"));
        assert_eq!(resolve(None, "team/app"), pair("docker.io", "team/app"));
    }

    #[test]
    fn a_first_component_naming_another_registry_is_refused_not_sent_to_the_default() {
        for (name, host) in [
            ("ghcr.io/x/y", "ghcr.io"),
            ("localhost/app", "localhost"),
            ("my.team/app", "my.team"),
        ] {
            let err = resolve(None, name).unwrap_err();
            assert_eq!(
                err,
                ResolveError::NoUpstreamForPrefix {
                    host: host.into(),
                    name: name.into()
                }
            );
            assert!(err.to_string().contains(&format!("{host:?}")), "{err}");
        }
        // A one-component name is a repository, dots and all; `ns` names the upstream itself.
        assert_eq!(resolve(None, "my.app"), pair("docker.io", "library/my.app"));
        assert_eq!(
            resolve(Some("docker.io"), "my.team/app"),
            pair("docker.io", "my.team/app")
        );
        assert_eq!(
            resolve(Some("ghcr.io"), "x/y"),
            Err(ResolveError::NoUpstream("ghcr.io".into()))
        );
    }
}
