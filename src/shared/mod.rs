//! The shared tier: S3-compatible object storage under every replica's local disk.
//!
//! Local disk is the fast tier, this the slow one. A local miss reads through it before the
//! cluster's owner goes upstream ([`origin::TierOrigin`] first in a fill's chain of origins),
//! and what a fill fetched from upstream is written behind to it once verified and kept
//! locally ([`origin::KeepBehind`], [`upload`]). Tag answers live here too, so a new cluster
//! resolves tags from the tier.
//!
//! Nothing read back is trusted: blobs are hashed by the fill like any origin's bytes, small
//! objects (manifests) here before they are handed out; a bad object is counted, logged and
//! removed. The tier down or slow never fails a pull the upstream can serve: every request has
//! a time-out, a circuit breaker skips the tier after failures in a row, and every failure is
//! an absence to the caller.
//!
//! Keys, under the configured prefix:
//! ```text
//! blobs/sha256/<64 hex>                               manifests and blobs, by digest
//! tags/<upstream>/<repository>/_tags/<tag>/<accept>   a tag answer: {"digest", "fresh_until"}
//! uploads/<64 hex>.<random>                           multipart uploads, copied into place
//! ```

pub mod credentials;
pub mod metrics;
pub mod origin;
mod sweep;
mod upload;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::breaker::Breaker;
use crate::config::SharedConfig;
use crate::metrics::Metrics;
use crate::oci::media::AcceptSet;
use crate::oci::{Digest, RepoName, Tag};
use crate::origin::{Origin, OriginKind, OriginName};
use crate::store::BlobStore;
use crate::tags::{StoredAnswer, TagKey};

pub use metrics::TierMetrics;

/// Work for the write-behind thread, done in order of arrival.
#[derive(Debug)]
enum Job {
    Upload(Digest),
    Remove(Digest),
}

/// What the mirror asks of a slow tier beside what a fill reads through [`Tier::origin`].
/// Every read answers `None` on any failure: the tier is never the reason a pull fails.
#[async_trait]
pub trait Tier: Send + Sync + 'static {
    fn name(&self) -> &OriginName;

    /// Blobs read from the tier, for the front of a fill's chain of origins.
    fn origin(&self) -> Arc<dyn Origin>;

    /// A blob's length, if the tier holds it.
    async fn len(&self, digest: &Digest) -> Option<u64>;

    /// A whole object of at most `limit` bytes (a manifest), verified against its digest.
    async fn small(&self, digest: &Digest, limit: u64) -> Option<Bytes>;

    /// Every saved answer for a tag, whatever the Accept set it was asked with.
    async fn tag_answers(
        &self,
        upstream: &str,
        name: &RepoName,
        tag: &Tag,
    ) -> Vec<(AcceptSet, StoredAnswer)>;

    /// Save a tag answer, in the background.
    fn keep_tag(&self, key: &TagKey, answer: &StoredAnswer);

    /// Write a locally committed, verified object behind, in the background.
    fn keep(&self, digest: &Digest);

    /// Remove an object whose bytes did not match its digest, in the background.
    fn reject(&self, digest: &Digest);
}

/// Why a request to the tier gave nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TierError {
    #[error("not in the shared tier")]
    NotFound,
    #[error("already in the shared tier")]
    Exists,
    #[error("shared tier skipped: its circuit is open after failures in a row")]
    Skipped,
    #[error("shared tier did not answer within {0:?}")]
    Timeout(Duration),
    #[error("shared tier failed: {0}")]
    Failed(String),
}

/// The tier on an [`ObjectStore`]: S3 in production, object_store's memory store in tests.
pub struct S3Tier {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    name: OriginName,
    timeout: Duration,
    breaker: Mutex<Breaker>,
    metrics: TierMetrics,
    jobs: mpsc::Sender<Job>,
    /// Taken by [`S3Tier::start`], which needs the local store to read uploads from.
    queue: Mutex<Option<mpsc::Receiver<Job>>>,
    /// Uploads that failed while the tier was down or failing, tried again once it answers.
    retry: Mutex<std::collections::VecDeque<Digest>>,
    retry_limit: usize,
    /// How often the write-behind thread probes a tier that failed.
    cooldown: Duration,
    /// `max_age`: the thread deletes what is older (see [`sweep`]).
    max_age: Option<Duration>,
    /// Digests whose tier copy did not match: never read from the tier again until written
    /// anew, even if its removal failed.
    bad: moka::sync::Cache<Digest, ()>,
    /// Digests known to be in the tier (read, found or written): write-behind skips them.
    present: moka::sync::Cache<Digest, ()>,
    me: Weak<S3Tier>,
}

/// Digests remembered as present, so write-behind of what was just read back asks nothing.
const PRESENT_MEMORY: u64 = 100_000;

impl S3Tier {
    /// The tier of `config`, on S3 with credentials from the AWS chain.
    pub fn open(config: &SharedConfig, metrics: &Metrics) -> anyhow::Result<Arc<S3Tier>> {
        let store = credentials::s3_store(config)?;
        let s3 = &config.s3;
        let label = format!("s3://{}/{}", s3.bucket, s3.prefix);
        Ok(S3Tier::with_store(store, config, &label, metrics))
    }

    /// The tier on any object store (tests use object_store's memory store).
    pub fn with_store(
        store: Arc<dyn ObjectStore>,
        config: &SharedConfig,
        label: &str,
        metrics: &Metrics,
    ) -> Arc<S3Tier> {
        let (jobs, queue) = mpsc::channel(config.upload_queue);
        Arc::new_cyclic(|me| S3Tier {
            me: me.clone(),
            store,
            prefix: config.s3.prefix.clone(),
            name: OriginName::new(OriginKind::Shared, &Arc::from(label)),
            timeout: config.timeout,
            breaker: Mutex::new(Breaker::new(&config.circuit)),
            metrics: TierMetrics::new(metrics),
            jobs,
            queue: Mutex::new(Some(queue)),
            retry: Mutex::default(),
            retry_limit: config.upload_queue,
            cooldown: config.circuit.cooldown,
            max_age: config.max_age,
            bad: moka::sync::Cache::new(PRESENT_MEMORY),
            present: moka::sync::Cache::new(PRESENT_MEMORY),
        })
    }

    /// Start writing behind, reading committed objects from `local`. Uploads run on a thread
    /// of their own, so a slow tier never takes a request's runtime.
    pub fn start(self: &Arc<Self>, local: Arc<dyn BlobStore>) {
        let Some(queue) = self.queue.lock().expect("tier lock").take() else {
            return;
        };
        let tier = self.clone();
        std::thread::Builder::new()
            .name("dockside-shared".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the shared tier");
                runtime.block_on(upload::run(tier, local, queue));
            })
            .expect("a thread for the shared tier");
    }

    pub fn metrics(&self) -> &TierMetrics {
        &self.metrics
    }

    fn blob_path(&self, digest: &Digest) -> Path {
        Path::from(format!("{}blobs/sha256/{}", self.prefix, digest.hex()))
    }

    fn tag_dir(&self, upstream: &str, name: &RepoName, tag: &Tag) -> Path {
        Path::from(format!("{}tags/{upstream}/{name}/_tags/{tag}", self.prefix))
    }

    fn tag_path(&self, key: &TagKey) -> Path {
        let dir = self.tag_dir(&key.upstream, &key.name, &key.tag);
        dir.clone().join(format!("{:x}", key.accept.bits()))
    }

    /// One request, behind the breaker and the time-out; every outcome counted. An answer
    /// (found or not) closes the circuit, a failure or time-out counts toward opening it.
    async fn call<T>(
        &self,
        op: &'static str,
        request: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, TierError> {
        self.call_within(op, self.timeout, request).await
    }

    /// [`S3Tier::call`] with a time-out of its own, for requests whose work grows with the
    /// object (a server-side copy).
    async fn call_within<T>(
        &self,
        op: &'static str,
        timeout: Duration,
        request: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, TierError> {
        if !self.admit() {
            self.metrics.request(op, "skipped", None);
            return Err(TierError::Skipped);
        }
        let started = Instant::now();
        let result = match tokio::time::timeout(timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(object_store::Error::NotFound { .. })) => Err(TierError::NotFound),
            Ok(Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            )) => Err(TierError::Exists),
            Ok(Err(e)) => Err(TierError::Failed(e.to_string())),
            Err(_) => Err(TierError::Timeout(timeout)),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(TierError::NotFound) => "not_found",
            Err(TierError::Exists) => "exists",
            Err(TierError::Timeout(_)) => "timeout",
            Err(_) => "error",
        };
        self.metrics.request(op, outcome, Some(started.elapsed()));
        match &result {
            Err(e @ (TierError::Timeout(_) | TierError::Failed(_))) => self.failed(op, e),
            _ => self.answered(),
        }
        result
    }

    fn admit(&self) -> bool {
        self.breaker
            .lock()
            .expect("tier lock")
            .admit(Instant::now())
    }

    fn answered(&self) {
        let mut breaker = self.breaker.lock().expect("tier lock");
        if breaker.is_open() {
            info!(tier = %self.name, "shared tier answers again; using it");
            self.metrics.circuit_open.set(0);
        }
        breaker.succeeded();
    }

    fn failed(&self, op: &str, error: &TierError) {
        let mut breaker = self.breaker.lock().expect("tier lock");
        let was_open = breaker.is_open();
        breaker.failed(Instant::now());
        if breaker.is_open() && !was_open {
            warn!(tier = %self.name, op, %error, "shared tier failing; skipping it for a while");
            self.metrics.circuit_open.set(1);
        } else {
            warn!(tier = %self.name, op, %error, "shared tier request failed");
        }
    }

    async fn remove(&self, digest: &Digest) {
        self.present.invalidate(digest);
        let path = self.blob_path(digest);
        match self.call("delete", self.store.delete(&path)).await {
            Ok(()) | Err(TierError::NotFound) => {
                info!(tier = %self.name, %digest, "removed the shared-tier object that did not match")
            }
            Err(e) => {
                warn!(tier = %self.name, %digest, error = %e, "could not remove a bad shared-tier object")
            }
        }
    }

    async fn load_answer(&self, path: &Path) -> Option<StoredAnswer> {
        let got = self.call("get", async { self.store.get(path).await?.bytes().await });
        let body = got.await.ok()?;
        self.metrics.read(body.len() as u64);
        parse_answer(&body)
    }
}

#[async_trait]
impl Tier for S3Tier {
    fn name(&self) -> &OriginName {
        &self.name
    }

    fn origin(&self) -> Arc<dyn Origin> {
        let me = self.arc().expect("a tier is used through its Arc");
        Arc::new(origin::TierOrigin::new(me))
    }

    async fn len(&self, digest: &Digest) -> Option<u64> {
        let path = self.blob_path(digest);
        let size = self.call("head", self.store.head(&path)).await.ok()?.size;
        self.present.insert(digest.clone(), ());
        Some(size)
    }

    async fn small(&self, digest: &Digest, limit: u64) -> Option<Bytes> {
        let path = self.blob_path(digest);
        let read = async {
            let result = self.store.get(&path).await?;
            if result.meta.size > limit {
                return Ok(None);
            }
            result.bytes().await.map(Some)
        };
        let body = self.call("get", read).await.ok()??;
        self.metrics.read(body.len() as u64);
        if Digest::of(&body) != *digest {
            self.metrics.corrupt.with_label_values(&["manifest"]).inc();
            warn!(tier = %self.name, %digest, "shared-tier manifest did not match its digest; removing it");
            self.remove(digest).await;
            return None;
        }
        self.present.insert(digest.clone(), ());
        Some(body)
    }

    async fn tag_answers(
        &self,
        upstream: &str,
        name: &RepoName,
        tag: &Tag,
    ) -> Vec<(AcceptSet, StoredAnswer)> {
        let dir = self.tag_dir(upstream, name, tag);
        let listed = self.call("list", self.store.list_with_delimiter(Some(&dir)));
        let Ok(listed) = listed.await else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for object in listed.objects {
            let bits = object
                .location
                .filename()
                .and_then(|f| u8::from_str_radix(f, 16).ok());
            let Some(accept) = bits.and_then(AcceptSet::from_bits) else {
                continue;
            };
            if let Some(answer) = self.load_answer(&object.location).await {
                out.push((accept, answer));
            }
        }
        out
    }

    fn keep_tag(&self, key: &TagKey, answer: &StoredAnswer) {
        let Some(tier) = self.arc() else { return };
        let (path, body) = (self.tag_path(key), answer_body(answer));
        tokio::spawn(async move {
            let len = body.len() as u64;
            let put = tier.store.put(&path, body.into());
            if tier.call("put", put).await.is_ok() {
                tier.metrics.written(len);
            }
        });
    }

    fn keep(&self, digest: &Digest) {
        if self.present.contains_key(digest) {
            self.metrics.upload("present");
            return;
        }
        if self.jobs.try_send(Job::Upload(digest.clone())).is_err() {
            // Full (or stopped): the object stays local only; a later fill of it tries again.
            self.metrics.upload("dropped");
        }
    }

    fn reject(&self, digest: &Digest) {
        self.metrics.corrupt.with_label_values(&["blob"]).inc();
        warn!(tier = %self.name, %digest, "shared-tier object did not match its digest; removing it");
        self.present.invalidate(digest);
        self.bad.insert(digest.clone(), ());
        // On the write-behind queue, so the removal is done before an upload of the right
        // bytes queued after it starts.
        if self.jobs.try_send(Job::Remove(digest.clone())).is_err() {
            let Some(tier) = self.arc() else { return };
            let digest = digest.clone();
            tokio::spawn(async move { tier.remove(&digest).await });
        }
    }
}

impl S3Tier {
    /// An owned handle for background work: the trait's methods take `&self`.
    fn arc(&self) -> Option<Arc<S3Tier>> {
        self.me.upgrade()
    }
}

fn answer_body(answer: &StoredAnswer) -> Bytes {
    let secs = answer
        .fresh_until
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let json = serde_json::json!({ "digest": answer.digest.to_string(), "fresh_until": secs });
    Bytes::from(json.to_string())
}

fn parse_answer(body: &[u8]) -> Option<StoredAnswer> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let digest = Digest::parse(value.get("digest")?.as_str()?).ok()?;
    let secs = value.get("fresh_until")?.as_u64()?;
    Some(StoredAnswer {
        digest,
        fresh_until: UNIX_EPOCH + Duration::from_secs(secs),
    })
}
