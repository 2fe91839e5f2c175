//! The air-gap tools: fill a cache ahead of time ([`prefetch`]), carry it as one OCI image
//! layout tar ([`bundle`]: export and import), check it ([`check`]: verify and du). Each tool
//! opens the cache the way `serve` does, under the cache lock ([`crate::store::lock`]), so it
//! never runs beside a server on the same directory.

pub mod bundle;
pub mod check;
pub mod commands;
pub mod prefetch;
pub mod progress;

use std::sync::Arc;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::oci::{ImageRef, RepoName};
use crate::store::CacheLock;
use crate::upstream::Upstreams;

/// A cache opened by a tool: the lock first (opening the store wipes `tmp/`, which would break
/// a server's fills), then the mirror over it.
pub struct OpenCache {
    pub mirror: Arc<Mirror>,
    /// `cache.dir`.
    pub dir: std::path::PathBuf,
    upstreams: Upstreams,
    _lock: CacheLock,
}

impl OpenCache {
    /// Open the cache of `config` for the tool named `what` (it names the lock's holder).
    pub fn open(config: &Config, what: &str) -> anyhow::Result<OpenCache> {
        let lock = CacheLock::acquire(&config.cache.dir, what)?;
        let metrics = Arc::new(Metrics::new());
        Ok(OpenCache {
            mirror: Mirror::new(config, metrics.clone())?,
            dir: config.cache.dir.clone(),
            upstreams: Upstreams::new(config, metrics)?,
            _lock: lock,
        })
    }

    /// The upstream (by its configured name) and repository an image reference means, with
    /// the same rules as a request's (host or alias, default upstream, `library/`).
    pub fn resolve(&self, image: &ImageRef) -> anyhow::Result<(Arc<str>, RepoName)> {
        let (upstream, name) = self
            .upstreams
            .resolve(image.host.as_deref(), &image.name)
            .map_err(|e| anyhow::anyhow!("{image}: {e}"))?;
        Ok((upstream.name.clone(), name))
    }

    /// Whether the config names an upstream (tag answers are kept by upstream name).
    pub fn has_upstream(&self, name: &str) -> bool {
        self.upstreams.all().iter().any(|u| &*u.name == name)
    }
}
