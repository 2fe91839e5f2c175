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
            Timeout(_) | Connect(_) | Body(_) | Truncated { .. } | TooManyRequests { .. } => true,
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
    /// then the default. An `ns` naming no upstream is refused: dockside is not an open proxy.
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
            None => self.by_prefix(name),
        };
        let name = if upstream.library_prefix {
            name.with_library_prefix()
        } else {
            name
        };
        Ok((upstream, name))
    }

    fn by_prefix(&self, name: &RepoName) -> (Arc<Upstream>, RepoName) {
        let prefixed = self
            .by_name
            .get(name.first_component())
            .zip(name.strip_first_component());
        match prefixed {
            Some((upstream, rest)) => (upstream.clone(), rest),
            None => (self.default.clone(), name.clone()),
        }
    }
}
