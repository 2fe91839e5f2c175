//! Single flight with progressive fan-out for blobs.
//!
//! At most one caching fetch per digest runs at a time. It is a task of its own, a pipeline of
//! two stages: the fill task receives an [`Origin`]'s bytes into a window in memory
//! ([`window`]) and hands them to a writer on a blocking thread, which hashes them and writes
//! them into a store [`Ingest`]. Readers ([`BlobBody`]) take bytes from the window as soon as
//! they arrive, and from the store once the window has moved past them, so neither the origin
//! nor the readers wait for the disk. The window is bounded: the fill waits for the writer
//! when it falls behind. Progress is published on a watch channel that readers sleep on (no
//! polling). Verification or failure ends every reader: a reader never sees bytes that were
//! not received, and never sees a failed fill as complete.
//!
//! A write error (a full disk) does not fail the fill: the file is given up and the fill goes on
//! as a pass-through to the readers already attached, still verified. The window then keeps
//! what the slowest of them still needs, which holds the origin back to their pace. Later
//! requests start a new fill, which tries to cache again.
//!
//! The fill knows neither what kind of origin it reads nor what kind of store it writes.

mod body;
mod snapshot;
mod window;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub use body::BlobBody;
pub use snapshot::FillProgress;
pub use window::FillReader;
use window::{FillData, WINDOW};

use crate::metrics::Metrics;
use crate::oci::Digest;
use crate::origin::{Origin, OriginBody, OriginError, OriginErrorKind, OriginName};
use crate::store::{BlobStore, Budget, Hasher, Ingest, Object, StoreError, Verified};

/// Small origin chunks are gathered into batches of up to this many bytes (one window entry,
/// one store write), so a slow origin's trickle costs few writes and wake-ups.
const BATCH: usize = 256 * 1024;
/// A chunk at least this large is a batch as it is: gathering it would cost a copy of every
/// byte for no fewer writes (a fast origin's chunks are a few hundred KiB).
const WHOLE_CHUNK: usize = 64 * 1024;
/// How many times one fill resumes a broken body before giving up.
const MAX_RESUMES: u32 = 3;

#[derive(Clone, Debug)]
pub enum FillState {
    /// Waiting for the origin's first answer.
    Starting,
    /// `received` bytes have arrived and can be read; `len` is the origin's stated length.
    Streaming {
        len: Option<u64>,
        received: u64,
    },
    /// All `len` bytes arrived and match the digest: readers may finish. (Persisting to the
    /// store happens after this; a failure there loses the cache entry, never a client's bytes.)
    Verified {
        len: u64,
    },
    Failed(FillError),
}

/// Why a fill ended without a verified blob.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FillError {
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("{origin}: content hashes to {actual}, not {expected}")]
    DigestMismatch {
        origin: OriginName,
        expected: Digest,
        actual: Digest,
    },
    /// The cache side failed (a reader fell behind, the writer thread died): no origin's fault.
    #[error("cache: {0}")]
    Cache(String),
}

impl FillError {
    fn cache(what: &str) -> FillError {
        FillError::Cache(what.to_string())
    }

    fn vanished() -> FillError {
        FillError::cache("the fill task ended without a result")
    }
}

struct InFlight {
    data: Arc<FillData>,
    progress: watch::Receiver<FillState>,
    /// For [`Fills::in_flight`].
    origin: OriginName,
}

/// Where a blob's bytes come from.
pub enum BlobSource {
    Cached(Object),
    Filling {
        reader: FillReader,
        progress: watch::Receiver<FillState>,
        /// This request joined a fill another request started.
        joined: bool,
    },
}

pub struct Fills {
    store: Arc<dyn BlobStore>,
    budget: Arc<dyn Budget>,
    inflight: Arc<Mutex<HashMap<Digest, InFlight>>>,
    /// Fills that have left the map, ever. A lookup that missed the store and then finds no
    /// fill in the map looks again when this moved meanwhile: the fill it missed has
    /// committed. A watch, so [`Fills::settled`] can wait for it.
    finished: Arc<watch::Sender<u64>>,
    metrics: Arc<Metrics>,
}

impl Fills {
    pub fn new(store: Arc<dyn BlobStore>, budget: Arc<dyn Budget>, metrics: Arc<Metrics>) -> Fills {
        Fills {
            store,
            budget,
            inflight: Arc::new(Mutex::new(HashMap::new())),
            finished: Arc::new(watch::Sender::new(0)),
            metrics,
        }
    }

    /// The blob from the store, or from the fill in flight, or from a new fill from `origin`.
    pub async fn get(
        &self,
        digest: &Digest,
        origin: Arc<dyn Origin>,
    ) -> Result<BlobSource, StoreError> {
        self.get_with(digest, || origin).await
    }

    /// [`Fills::get`] with the origin made only when a new fill starts: a hit or a join costs
    /// nothing of what an origin needs (a cluster's ranking, a chain).
    pub async fn get_with(
        &self,
        digest: &Digest,
        origin: impl FnOnce() -> Arc<dyn Origin>,
    ) -> Result<BlobSource, StoreError> {
        let mut origin = Some(origin);
        loop {
            // Read before the store is asked: a fill commits to the store before it leaves the
            // map and counts itself out, so a miss in both with this unchanged means no fill
            // finished in between and none is running.
            let finished = *self.finished.borrow();
            if let Some(obj) = self.store.open(digest).await? {
                return Ok(BlobSource::Cached(obj));
            }
            let mut inflight = self.inflight.lock().expect("fill lock");
            if let Some(running) = inflight.get(digest) {
                // A fill that gave up its file is not joined: this request starts a new one,
                // which tries to cache again.
                if let Some(reader) = running.data.join() {
                    return Ok(BlobSource::Filling {
                        reader,
                        progress: running.progress.clone(),
                        joined: true,
                    });
                }
            } else if *self.finished.borrow() != finished {
                continue;
            }
            let data = Arc::new(FillData::new());
            let reader = data.join().expect("a new fill takes readers");
            let (tx, progress) = watch::channel(FillState::Starting);
            // Made under the lock, so no second fill can start meanwhile; it is a few
            // allocations (a chain of origins, a ranking of members).
            let origin = origin.take().expect("a fill starts once")();
            let entry = InFlight {
                data: data.clone(),
                progress: progress.clone(),
                origin: origin.name().clone(),
            };
            inflight.insert(digest.clone(), entry);
            drop(inflight);
            let fill = Arc::new(Fill {
                digest: digest.clone(),
                origin,
                data,
                tx,
                metrics: self.metrics.clone(),
            });
            let store = (self.store.clone(), self.budget.clone());
            tokio::spawn(fill.run(store, self.inflight.clone(), self.finished.clone()));
            return Ok(BlobSource::Filling {
                reader,
                progress,
                joined: false,
            });
        }
    }

    /// Wait until no fill of `digest` is in flight: the last one has committed its blob (or
    /// given up), so the store answers for it.
    pub async fn settled(&self, digest: &Digest) {
        let mut finished = self.finished.subscribe();
        while self
            .inflight
            .lock()
            .expect("fill lock")
            .contains_key(digest)
        {
            if finished.changed().await.is_err() {
                return;
            }
        }
    }

    /// The length of a blob being filled, once the origin has said it.
    pub fn len_in_flight(&self, digest: &Digest) -> Option<u64> {
        let inflight = self.inflight.lock().expect("fill lock");
        match &*inflight.get(digest)?.progress.borrow() {
            FillState::Streaming { len, .. } => *len,
            FillState::Verified { len } => Some(*len),
            FillState::Starting | FillState::Failed(_) => None,
        }
    }
}

/// One fill: what its task needs.
struct Fill {
    digest: Digest,
    origin: Arc<dyn Origin>,
    data: Arc<FillData>,
    tx: watch::Sender<FillState>,
    metrics: Arc<Metrics>,
}

impl Fill {
    fn origin(&self) -> &OriginName {
        self.origin.name()
    }

    /// The fill task: stream the origin through the writer, verify and commit, then tell
    /// every reader.
    async fn run(
        self: Arc<Self>,
        (store, budget): (Arc<dyn BlobStore>, Arc<dyn Budget>),
        inflight: Arc<Mutex<HashMap<Digest, InFlight>>>,
        finished: Arc<watch::Sender<u64>>,
    ) {
        let metrics = &self.metrics;
        metrics.fills_in_flight.inc();
        let started = std::time::Instant::now();
        let verified = match store.ingest(&self.digest).await {
            Ok(ingest) => self.stream(ingest).await,
            Err(e) => Err(FillError::Cache(format!("cannot start writing: {e}"))),
        };
        let outcome = if verified.is_ok() {
            "verified"
        } else {
            "failed"
        };
        let o = self.origin();
        metrics.fill_finished(o.kind.as_str(), &o.name, outcome, started.elapsed());
        match verified {
            Ok((ingest, proof)) => {
                self.finish(ingest, proof).await;
                metrics.record_usage(budget.usage());
            }
            Err(err) => {
                if matches!(err, FillError::DigestMismatch { .. }) {
                    let o = self.origin();
                    metrics.upstream_event(&metrics.digest_mismatches, o.kind.as_str(), &o.name);
                    self.origin.rejected(&self.digest);
                }
                warn!(digest = %self.digest, error = %err, "blob fill failed; nothing was cached");
                self.tx.send_replace(FillState::Failed(err));
            }
        }
        // Only now, with the object in the store (or given up), may a new fill start, unless
        // one already has (after this one gave up its file): that one stays.
        let mut inflight = inflight.lock().expect("fill lock");
        if inflight
            .get(&self.digest)
            .is_some_and(|f| Arc::ptr_eq(&f.data, &self.data))
        {
            inflight.remove(&self.digest);
        }
        finished.send_modify(|n| *n += 1);
        drop(inflight);
        metrics.fills_in_flight.dec();
    }

    fn verify(&self, hasher: Hasher) -> Result<Verified, FillError> {
        match hasher.finish() {
            Ok(proof) => Ok(proof),
            Err(StoreError::DigestMismatch { expected, actual }) => {
                Err(FillError::DigestMismatch {
                    origin: self.origin().clone(),
                    expected,
                    actual,
                })
            }
            Err(other) => Err(FillError::Cache(other.to_string())),
        }
    }

    /// Commit a verified blob, unless it cannot or should not be kept.
    async fn finish(&self, ingest: Ingest, proof: Verified) {
        let (digest, origin, len) = (&self.digest, self.origin(), proof.len());
        if ingest.is_discarded() {
            info!(%digest, %origin, bytes = len, "blob served pass-through after a cache write error, not kept");
            return;
        }
        if let Some(reason) = ingest.spooled() {
            self.not_kept(len, reason);
            return;
        }
        match ingest.commit(proof).await {
            Ok(_) => {
                info!(%digest, %origin, bytes = len, "blob cached");
                self.origin.kept(digest, len);
            }
            // Pins grew while it was written: it no longer fits.
            Err(e @ (StoreError::TooLarge { .. } | StoreError::NoRoom { .. })) => {
                self.not_kept(len, &e)
            }
            Err(e) => {
                self.metrics.store_write_error("blob", &e);
                warn!(%digest, error = %e, "blob served but not cached");
            }
        }
    }

    /// A verified blob the cache has no room for: served to its readers, then let go.
    fn not_kept(&self, len: u64, reason: &StoreError) {
        let (digest, origin, m) = (&self.digest, self.origin(), &self.metrics);
        m.upstream_event(&m.oversize_blobs, origin.kind.as_str(), &origin.name);
        info!(%digest, %origin, bytes = len, %reason, "blob served pass-through, not kept");
    }

    /// Fetch the body (resuming it when it breaks) through the hasher and the writer, two
    /// threads, so that hashing and writing each take a core rather than one thread doing
    /// both in turn. Readers are told the bytes are right as soon as the last one is hashed:
    /// the bytes the writer has yet to write are still in memory, so no client waits for the
    /// disk. Returns the ingest, with everything written, and its proof.
    async fn stream(self: &Arc<Self>, mut ingest: Ingest) -> Result<(Ingest, Verified), FillError> {
        match ingest.reader() {
            Some(reader) => {
                let _ = self.data.file.set(reader);
            }
            // The store cannot be read before commit: keep what readers need in memory.
            None => self.data.tail().passthrough = true,
        }
        let hasher = ingest
            .take_hasher()
            .ok_or_else(|| FillError::cache("a new ingest has already hashed"))?;
        let body = self.origin.fetch(&self.digest, 0).await?;
        let len = body.len;
        // Room is made before the first byte lands, so the store never holds more than its
        // budget. A blob that gets none is spooled: written outside the budget, so that readers
        // who join can still read it back, and deleted when the fill ends.
        if let Some(len) = len {
            match ingest.reserve(len).await {
                Ok(()) => {}
                Err(e @ (StoreError::TooLarge { .. } | StoreError::NoRoom { .. })) => {
                    ingest.spool(e)
                }
                Err(e) => self.give_up_file(&mut ingest, &e),
            }
        }
        let (sinks, to_hasher, to_writer) = Sinks::new();
        let hasher = self.hasher(hasher, to_hasher);
        let writer = self.writer(ingest, to_writer);
        self.tx
            .send_replace(FillState::Streaming { len, received: 0 });
        let streamed = self.receive(body, &sinks).await;
        drop(sinks);
        let hashed = hasher
            .await
            .map_err(|e| FillError::Cache(format!("cache hasher: {e}")));
        let proof = streamed.and(hashed).and_then(|h| self.verify(h));
        if let Ok(proof) = &proof {
            self.tx
                .send_replace(FillState::Verified { len: proof.len() });
        }
        let ingest = writer
            .await
            .map_err(|e| FillError::Cache(format!("cache writer: {e}")))?;
        proof.map(|proof| (ingest, proof))
    }

    /// Receive the body into the window, resuming it from the origin when it breaks.
    async fn receive(&self, mut body: OriginBody, to: &Sinks) -> Result<(), FillError> {
        let (origin, len) = (self.origin(), body.len);
        let mut resumes = 0;
        loop {
            let copied = self.copy_body(body.chunks, len, to).await;
            let got = self.data.tail().received;
            let err = match (copied, len) {
                (Ok(()), Some(expected)) if got < expected => {
                    OriginError::new(origin, OriginErrorKind::Truncated { expected, got })
                }
                (Ok(()), _) => return Ok(()),
                (Err(e), _) => e,
            };
            // Only a body that broke or stalled can be resumed, and only when we know where it
            // ends.
            let Some(total) = len.filter(|_| err.is_resumable() && resumes < MAX_RESUMES) else {
                return Err(err.into());
            };
            resumes += 1;
            warn!(%origin, error = %err, from = got, total, resumes, "blob download broke; resuming with Range");
            let m = &self.metrics;
            m.upstream_event(&m.upstream_resumes, origin.kind.as_str(), &origin.name);
            body = self.origin.fetch(&self.digest, got).await?;
            if body.len != Some(total) {
                return Err(err.into());
            }
        }
    }

    /// Copy one body into the window, in batches. A body that breaks is reported after every
    /// byte that did arrive was passed on, so a resume can start right after them.
    async fn copy_body(
        &self,
        mut body: futures_util::stream::BoxStream<'static, Result<Bytes, OriginError>>,
        len: Option<u64>,
        to: &Sinks,
    ) -> Result<(), OriginError> {
        let mut batch = BytesMut::new();
        loop {
            // With small chunks gathered, take only what has already arrived: a slow origin
            // still reaches readers chunk by chunk.
            let next = if batch.is_empty() {
                body.next().await
            } else {
                match body.next().now_or_never() {
                    Some(next) => next,
                    None => {
                        self.flush(&mut batch, len, to).await?;
                        continue;
                    }
                }
            };
            match next {
                Some(Ok(chunk)) if chunk.len() >= WHOLE_CHUNK => {
                    self.flush(&mut batch, len, to).await?;
                    self.push(chunk, len, to).await?;
                }
                Some(Ok(chunk)) => {
                    batch.extend_from_slice(&chunk);
                    if batch.len() >= BATCH {
                        self.flush(&mut batch, len, to).await?;
                    }
                }
                Some(Err(e)) => {
                    self.flush(&mut batch, len, to).await?;
                    return Err(e);
                }
                None => return self.flush(&mut batch, len, to).await,
            }
        }
    }

    /// Push what `batch` has gathered, if anything.
    async fn flush(
        &self,
        batch: &mut BytesMut,
        len: Option<u64>,
        to: &Sinks,
    ) -> Result<(), OriginError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.push(batch.split().freeze(), len, to).await
    }

    /// Hand a batch to the readers and the writer, once the window has room for it.
    async fn push(&self, bytes: Bytes, len: Option<u64>, to: &Sinks) -> Result<(), OriginError> {
        let n = bytes.len() as u64;
        self.wait_for_room(n).await;
        let received = {
            let mut tail = self.data.tail();
            if let Some(len) = len.filter(|len| tail.received + n > *len) {
                return Err(OriginError::new(
                    self.origin(),
                    OriginErrorKind::Overlong { len },
                ));
            }
            let at = tail.received;
            tail.chunks.push_back((at, bytes.clone()));
            tail.received += n;
            tail.received
        };
        let o = self.origin();
        self.metrics.origin_received(o.kind.as_str(), &o.name, n);
        // The hasher and the writer only end once these senders are dropped.
        to.send(bytes);
        self.tx.send_modify(|state| {
            if let FillState::Streaming { received: r, .. } = state {
                *r = received;
            }
        });
        Ok(())
    }

    /// Wait until `n` more bytes fit in the window (an empty window always takes a batch).
    async fn wait_for_room(&self, n: u64) {
        loop {
            // Created before the check; `notify_one` keeps a permit, so no wake-up is lost.
            let room = self.data.room.notified();
            {
                let mut tail = self.data.tail();
                tail.trim();
                let pending = tail.pending();
                if pending == 0 || pending + n <= WINDOW {
                    return;
                }
            }
            room.await;
        }
    }

    /// The hasher: on a blocking thread, hash every batch in order.
    fn hasher(
        self: &Arc<Self>,
        hasher: Hasher,
        batches: mpsc::UnboundedReceiver<Bytes>,
    ) -> tokio::task::JoinHandle<Hasher> {
        self.each_batch(batches, hasher, |fill, hasher, bytes| {
            hasher.update(bytes);
            fill.data.tail().hashed = hasher.hashed();
        })
    }

    /// The writer: on a blocking thread, write every batch in order, as it came (no copy). A
    /// write error turns the fill into a pass-through; the writer then writes no more.
    fn writer(
        self: &Arc<Self>,
        ingest: Ingest,
        batches: mpsc::UnboundedReceiver<Bytes>,
    ) -> tokio::task::JoinHandle<Ingest> {
        self.each_batch(batches, ingest, |fill, ingest, bytes| {
            if ingest.is_discarded() {
                return;
            }
            if let Err(e) = ingest.write(bytes) {
                fill.give_up_file(ingest, &e);
            }
            fill.data.tail().written = ingest.written();
        })
    }

    /// On a blocking thread, apply `step` to every batch in order, waking the fill after each:
    /// it may have room again.
    fn each_batch<T: Send + 'static>(
        self: &Arc<Self>,
        mut batches: mpsc::UnboundedReceiver<Bytes>,
        mut state: T,
        step: impl Fn(&Fill, &mut T, &[u8]) + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        let fill = self.clone();
        tokio::task::spawn_blocking(move || {
            while let Some(bytes) = batches.blocking_recv() {
                step(&fill, &mut state, &bytes);
                fill.data.room.notify_one();
            }
            state
        })
    }

    /// After a write error: delete the temp file, count and log it (once per fill), and go on
    /// as a pass-through.
    fn give_up_file(&self, ingest: &mut Ingest, err: &StoreError) {
        ingest.discard();
        {
            let mut tail = self.data.tail();
            tail.passthrough = true;
            tail.joinable = false;
        }
        self.data.room.notify_one();
        let (digest, origin) = (&self.digest, self.origin());
        self.metrics.store_write_error("blob", err);
        warn!(%digest, %origin, error = %err,
            "cache write failed; serving this blob pass-through without keeping it");
    }
}

/// Where the fill task hands each batch: the hasher and the writer, the same buffer to both.
struct Sinks {
    hasher: mpsc::UnboundedSender<Bytes>,
    writer: mpsc::UnboundedSender<Bytes>,
}

impl Sinks {
    fn new() -> (
        Sinks,
        mpsc::UnboundedReceiver<Bytes>,
        mpsc::UnboundedReceiver<Bytes>,
    ) {
        let (hasher, to_hasher) = mpsc::unbounded_channel();
        let (writer, to_writer) = mpsc::unbounded_channel();
        (Sinks { hasher, writer }, to_hasher, to_writer)
    }

    /// A closed sink has ended with its thread, which the fill learns when it joins it.
    fn send(&self, bytes: Bytes) {
        let _ = self.hasher.send(bytes.clone());
        let _ = self.writer.send(bytes);
    }
}

/// Wait until a fill has its origin's first answer (or failed); returns the blob's length if
/// known.
pub async fn wait_started(
    progress: &mut watch::Receiver<FillState>,
) -> Result<Option<u64>, FillError> {
    loop {
        let state = progress.borrow_and_update().clone();
        match state {
            FillState::Starting => {}
            FillState::Streaming { len, .. } => return Ok(len),
            FillState::Verified { len } => return Ok(Some(len)),
            FillState::Failed(err) => return Err(err),
        }
        if progress.changed().await.is_err() {
            return Err(FillError::vanished());
        }
    }
}

#[cfg(test)]
mod tests;
