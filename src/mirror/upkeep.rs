//! Purges, pins and the state saved for a restart.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use super::Mirror;
use crate::error::ApiError;
use crate::inventory;
use crate::oci::{Digest, RepoName, Tag};
use crate::tags::SavedTag;

pub enum PurgeTarget {
    Digest(Digest),
    /// A whole repository, or one of its tags.
    Repository {
        upstream: Arc<str>,
        name: RepoName,
        tag: Option<Tag>,
    },
}

#[derive(Debug, Default, serde::Serialize)]
pub struct PurgeReport {
    /// Tags forgotten.
    pub tags: usize,
    /// Objects deleted, and their bytes.
    pub objects: usize,
    pub bytes: u64,
}

/// Run `work` to its end on a runtime of its own, on a thread of its own: for callers outside
/// any runtime (start, the maintenance thread) and inside one alike.
pub(super) fn on_own_runtime<F: std::future::Future<Output = ()> + Send>(work: F) {
    std::thread::scope(|scope| {
        let ran = scope.spawn(|| {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(work),
                Err(e) => warn!(error = %e, "could not start a runtime for cache maintenance"),
            }
        });
        let _ = ran.join();
    });
}

/// How often the eviction order is saved and pins are looked up again.
pub(super) const MAINTENANCE_EVERY: Duration = Duration::from_secs(30);

impl Mirror {
    /// Delete cached content: one object, or a repository's (or one tag's) saved answers and
    /// every object no other saved tag still needs.
    pub async fn purge(self: &Arc<Self>, target: PurgeTarget) -> Result<PurgeReport, ApiError> {
        let (doomed, tags) = match target {
            PurgeTarget::Digest(digest) => (vec![digest], Vec::new()),
            PurgeTarget::Repository {
                upstream,
                name,
                tag,
            } => {
                let this = self.clone();
                let all = tokio::task::spawn_blocking(move || this.tags.list())
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
                let matches = |s: &SavedTag| {
                    s.upstream == upstream
                        && s.name == name
                        && tag.as_ref().is_none_or(|t| s.tag == *t)
                };
                let doomed = inventory::exclusive_objects(self.store.as_ref(), &all, matches).await;
                let mut tags: Vec<Tag> = all.into_iter().filter(matches).map(|s| s.tag).collect();
                tags.dedup();
                for tag in &tags {
                    self.tags.remove_tag(&upstream, &name, tag);
                }
                (doomed.into_iter().collect(), tags)
            }
        };
        let mut report = PurgeReport {
            tags: tags.len(),
            ..PurgeReport::default()
        };
        for digest in doomed {
            self.manifests.invalidate(&digest);
            let removed = self.store.remove(&digest).await;
            if let Some(len) = removed? {
                report.objects += 1;
                report.bytes += len;
            }
        }
        self.metrics.record_usage(self.budget.usage());
        Ok(report)
    }

    /// Find every object of the pinned images in the cache and protect it from eviction.
    pub async fn refresh_pins(&self) {
        if self.pins.is_empty() {
            return;
        }
        let mut pinned = HashSet::new();
        for (upstream, name, reference) in &self.pins {
            let roots = inventory::roots(&self.tags, upstream, name, reference);
            let closure = inventory::closure(self.store.as_ref(), roots, None).await;
            pinned.extend(closure.all().cloned());
        }
        self.budget.set_pins(pinned);
        self.metrics.record_usage(self.budget.usage());
    }

    /// A manifest of a pinned repository arrived: look the pins up again, so its blobs are
    /// pinned as they arrive (a pin covers digests not cached yet).
    pub(super) fn watch_pins(self: &Arc<Self>, upstream: &Arc<str>, name: &RepoName) {
        if self.pins.iter().any(|(u, n, _)| u == upstream && n == name) {
            let this = self.clone();
            tokio::spawn(async move { this.refresh_pins().await });
        }
    }

    /// Save what must outlive the process: the eviction order. Blocking.
    pub fn save_state(&self) {
        match self.budget.save() {
            Ok(true) => debug!("eviction order saved"),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "could not save the eviction order"),
        }
    }

    /// A thread that saves state and refreshes pins every [`MAINTENANCE_EVERY`], for as long
    /// as the mirror lives.
    pub fn start_maintenance(self: &Arc<Self>) {
        let mirror = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("dockside-maintenance".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(MAINTENANCE_EVERY);
                    let Some(mirror) = mirror.upgrade() else {
                        return;
                    };
                    on_own_runtime(mirror.refresh_pins());
                    mirror.save_state();
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "could not start the maintenance thread; eviction order is saved at exit only");
        }
    }
}
