//! Single flight with progressive fan-out for blobs.
//!
//! At most one caching fetch per digest runs at a time. It is a task of its own, a pipeline of
//! two stages: the fill task receives upstream bytes into a window in memory and hands them to a
//! writer on a blocking thread, which hashes them and writes them into a store ingest. Readers
//! take bytes from the window as soon as they arrive, and from the temp file once the window has
//! moved past them, so neither the upstream nor the readers wait for the disk. The window is
//! bounded: the fill waits for the writer when it falls behind. Progress is published on a watch
//! channel that readers sleep on (no polling). Verification or failure ends every reader: a
//! reader never sees bytes that were not received, and never sees a failed fill as complete.
//!
//! A write error (a full disk) does not fail the fill: the file is given up and the fill goes on
//! as a pass-through to the readers already attached, still verified. The window then keeps
//! what the slowest of them still needs, which holds the upstream back to their pace. Later
//! requests start a new fill, which tries to cache again.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{Notify, mpsc, watch};
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::oci::Digest;
use crate::store::{BlobStore, Ingest, StoreError, StoredObject};
use crate::upstream::client::body_error;
use crate::upstream::{UpstreamError, UpstreamErrorKind};

/// How much one read from disk hands to the client at most.
const CHUNK: usize = 256 * 1024;
/// The most upstream bytes gathered into one batch (one window entry, one disk write). Small
/// enough that the batches readers hold on to while their sockets drain stay few MiB in all.
const BATCH: usize = 256 * 1024;
/// The most bytes the writer hashes and writes in one go.
const WRITE_GATHER: usize = 1024 * 1024;
/// The most bytes a fill holds in memory: received and not yet written, or (in pass-through)
/// not yet sent to every reader.
const WINDOW: u64 = 8 * 1024 * 1024;

#[derive(Clone, Debug)]
pub enum FillState {
    /// Waiting for the upstream's response headers.
    Starting,
    /// `received` bytes have arrived and can be read; `len` is the upstream's Content-Length.
    Streaming {
        len: Option<u64>,
        received: u64,
    },
    /// All `len` bytes arrived and match the digest: readers may finish. (Persisting to the
    /// store happens after this; a failure there loses the cache entry, never a client's bytes.)
    Verified {
        len: u64,
    },
    Failed(UpstreamError),
}

/// A fill's bytes, shared by the fill task, its writer and its readers.
pub struct FillData {
    /// A read handle on the temp file: it stays valid after a commit renames the file or a
    /// discard unlinks it.
    file: Arc<File>,
    tail: Mutex<Tail>,
    /// Wakes the fill when its window may shrink: the writer moved on, or a reader moved on or
    /// left.
    room: Notify,
}

/// The bytes a fill holds in memory, and what they are waiting for.
struct Tail {
    /// The offset of the first byte in `chunks`.
    start: u64,
    /// Batches from `start` to `received`, each with its offset.
    chunks: VecDeque<(u64, Bytes)>,
    received: u64,
    /// Bytes in the temp file, a prefix of those received.
    written: u64,
    /// Bytes the writer has hashed (and written, unless the file was given up).
    hashed: u64,
    /// The file was given up after a write error: `written` no longer grows.
    passthrough: bool,
    /// The position of every reader, for pass-through.
    readers: Vec<Weak<AtomicU64>>,
}

impl FillData {
    fn new(file: File) -> FillData {
        FillData {
            file: Arc::new(file),
            tail: Mutex::new(Tail {
                start: 0,
                chunks: VecDeque::new(),
                received: 0,
                written: 0,
                hashed: 0,
                passthrough: false,
                readers: Vec::new(),
            }),
            room: Notify::new(),
        }
    }

    fn tail(&self) -> MutexGuard<'_, Tail> {
        self.tail.lock().expect("fill tail lock")
    }

    /// A new reader at offset 0, or `None` once the fill has given up its file: a reader from
    /// 0 could then need bytes that are neither in the file nor still in memory.
    fn join(self: &Arc<Self>) -> Option<FillReader> {
        let mut tail = self.tail();
        if tail.passthrough {
            return None;
        }
        let pos = Arc::new(AtomicU64::new(0));
        tail.readers.push(Arc::downgrade(&pos));
        Some(FillReader {
            data: self.clone(),
            pos,
        })
    }
}

impl Tail {
    /// Bytes held in memory.
    fn held(&self) -> u64 {
        self.received - self.start.min(self.hashed)
    }

    /// Drop the batches no reader can need from memory any more: those in the file, and in
    /// pass-through also those every reader has passed.
    fn trim(&mut self) {
        let mut keep_from = self.written;
        if self.passthrough {
            self.readers.retain(|r| r.strong_count() > 0);
            let slowest = self.readers.iter().filter_map(Weak::upgrade);
            let slowest = slowest.map(|p| p.load(Ordering::Acquire)).min();
            keep_from = keep_from.max(slowest.unwrap_or(self.received));
        }
        while let Some((off, bytes)) = self.chunks.front() {
            let end = off + bytes.len() as u64;
            if end > keep_from {
                break;
            }
            self.start = end;
            self.chunks.pop_front();
        }
    }

    /// Where a reader at `pos` finds bytes up to `limit` (at most `limit`, which is at most
    /// `received`). Bytes in memory are a slice of one batch, without a copy.
    fn locate(&self, pos: u64, limit: u64) -> Located {
        if pos >= self.start {
            let i = self.chunks.partition_point(|(off, _)| *off <= pos) - 1;
            let (off, bytes) = &self.chunks[i];
            let end = (off + bytes.len() as u64).min(limit);
            return Located::Memory(bytes.slice((pos - off) as usize..(end - off) as usize));
        }
        if pos < self.written {
            return Located::File(self.written.min(limit));
        }
        Located::Gone
    }
}

enum Located {
    Memory(Bytes),
    /// In the file, up to this offset.
    File(u64),
    /// Neither: the reader fell behind what the fill kept (it should not happen).
    Gone,
}

/// One reader's place in a fill. The fill keeps what the slowest reader needs once it can no
/// longer count on its file; dropping the reader lets the fill move on.
pub struct FillReader {
    data: Arc<FillData>,
    pos: Arc<AtomicU64>,
}

impl FillReader {
    fn set(&self, pos: u64) {
        self.pos.store(pos, Ordering::Release);
        self.data.room.notify_one();
    }
}

impl Drop for FillReader {
    fn drop(&mut self) {
        self.data.room.notify_one();
    }
}

struct InFlight {
    data: Arc<FillData>,
    progress: watch::Receiver<FillState>,
}

/// Where a blob's bytes come from.
pub enum BlobSource {
    Cached(StoredObject),
    Filling {
        reader: FillReader,
        progress: watch::Receiver<FillState>,
        /// This request joined a fill another request started.
        joined: bool,
    },
}

/// An upstream request for a blob; it resolves to a successful response.
pub type Fetch = BoxFuture<'static, Result<reqwest::Response, UpstreamError>>;

/// Makes the upstream request for a blob from a byte offset on: 0 to start a fill, more to
/// resume one whose body broke.
pub type FetchFrom = Box<dyn Fn(u64) -> Fetch + Send + Sync>;

/// How many times one fill resumes a broken body before giving up.
const MAX_RESUMES: u32 = 3;

pub struct Fills {
    store: Arc<dyn BlobStore>,
    inflight: Arc<Mutex<HashMap<Digest, InFlight>>>,
    metrics: Arc<Metrics>,
}

impl Fills {
    pub fn new(store: Arc<dyn BlobStore>, metrics: Arc<Metrics>) -> Fills {
        Fills {
            store,
            inflight: Arc::new(Mutex::new(HashMap::new())),
            metrics,
        }
    }

    /// The blob from the store, or from the fill in flight, or from a new fill made by `fetch`.
    pub async fn get(
        &self,
        digest: &Digest,
        upstream: &Arc<str>,
        fetch: impl Fn(u64) -> Fetch + Send + Sync + 'static,
    ) -> Result<BlobSource, StoreError> {
        loop {
            if self.store.size_of(digest).is_some() {
                if let Some(obj) = self.store.open(digest).await? {
                    return Ok(BlobSource::Cached(obj));
                }
            }
            let mut inflight = self.inflight.lock().expect("fill lock");
            // Checked again under the lock: a fill commits to the store before it leaves the map,
            // so a digest is always either in the store or in the map while it is being finished.
            if self.store.size_of(digest).is_some() {
                continue;
            }
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
            }
            let ingest = self.store.ingest(digest)?;
            let data = Arc::new(FillData::new(ingest.reader()?));
            let reader = data.join().expect("a new fill has its file");
            let (tx, progress) = watch::channel(FillState::Starting);
            let entry = InFlight {
                data: data.clone(),
                progress: progress.clone(),
            };
            inflight.insert(digest.clone(), entry);
            drop(inflight);
            let fill = Arc::new(Fill {
                digest: digest.clone(),
                upstream: upstream.clone(),
                data,
                tx,
                metrics: self.metrics.clone(),
            });
            let fetch: FetchFrom = Box::new(fetch);
            tokio::spawn(fill.run(ingest, fetch, self.store.clone(), self.inflight.clone()));
            return Ok(BlobSource::Filling {
                reader,
                progress,
                joined: false,
            });
        }
    }

    /// The length of a blob being filled, once the upstream has said it.
    pub fn len_in_flight(&self, digest: &Digest) -> Option<u64> {
        let inflight = self.inflight.lock().expect("fill lock");
        match &*inflight.get(digest)?.progress.borrow() {
            FillState::Streaming { len, .. } => *len,
            FillState::Verified { len } => Some(*len),
            FillState::Starting | FillState::Failed(_) => None,
        }
    }
}

/// Whether a fill's blob can be kept once verified.
enum Keep {
    Yes,
    /// Larger than the cache can hold: streamed to its readers, then let go.
    TooLarge(StoreError),
}

/// One fill: what its task needs.
struct Fill {
    digest: Digest,
    upstream: Arc<str>,
    data: Arc<FillData>,
    tx: watch::Sender<FillState>,
    metrics: Arc<Metrics>,
}

impl Fill {
    /// The fill task: stream upstream through the writer, verify and commit, then tell every
    /// reader.
    async fn run(
        self: Arc<Self>,
        ingest: Box<dyn Ingest>,
        fetch: FetchFrom,
        store: Arc<dyn BlobStore>,
        inflight: Arc<Mutex<HashMap<Digest, InFlight>>>,
    ) {
        let metrics = &self.metrics;
        let upstream = &self.upstream;
        metrics.fills_in_flight.inc();
        let started = std::time::Instant::now();
        let streamed = self.stream(ingest, &fetch).await;
        let verified = streamed.and_then(|(mut ingest, keep)| {
            let len = ingest.verify().map_err(|e| commit_error(upstream, e))?;
            Ok((ingest, len, keep))
        });
        let outcome = if verified.is_ok() {
            "verified"
        } else {
            "failed"
        };
        metrics
            .fill_duration
            .with_label_values(&[upstream, outcome])
            .observe(started.elapsed().as_secs_f64());
        match verified {
            Ok((ingest, len, keep)) => {
                self.tx.send_replace(FillState::Verified { len });
                self.finish(ingest, len, keep).await;
                metrics.record_usage(store.usage());
            }
            Err(err) => {
                if matches!(err.kind, UpstreamErrorKind::DigestMismatch { .. }) {
                    metrics
                        .digest_mismatches
                        .with_label_values(&[upstream])
                        .inc();
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
        metrics.fills_in_flight.dec();
    }

    /// Commit a verified blob, unless it cannot or should not be kept.
    async fn finish(&self, ingest: Box<dyn Ingest>, len: u64, keep: Keep) {
        let (digest, upstream) = (&self.digest, &self.upstream);
        if self.data.tail().passthrough {
            info!(%digest, %upstream, bytes = len, "blob served pass-through after a cache write error, not kept");
            return;
        }
        let committed = match keep {
            Keep::Yes => ingest.commit().await,
            Keep::TooLarge(e) => Err(e),
        };
        match committed {
            Ok(_) => info!(%digest, %upstream, bytes = len, "blob cached"),
            Err(e @ StoreError::TooLarge { .. }) => {
                let oversize = self.metrics.oversize_blobs.with_label_values(&[upstream]);
                oversize.inc();
                info!(%digest, %upstream, bytes = len, reason = %e, "blob served pass-through, not kept");
            }
            Err(e) => {
                self.metrics.store_write_error("blob", &e);
                warn!(%digest, error = %e, "blob served but not cached");
            }
        }
    }

    /// Fetch the body (resuming it when it breaks) through the writer; returns the ingest with
    /// everything hashed.
    async fn stream(
        self: &Arc<Self>,
        mut ingest: Box<dyn Ingest>,
        fetch: &FetchFrom,
    ) -> Result<(Box<dyn Ingest>, Keep), UpstreamError> {
        let upstream = &self.upstream;
        let resp = fetch(0).await?;
        let len = content_length(resp.headers());
        let keep = match len {
            // Room is made before the first byte lands, so the disk never holds more than allowed.
            Some(len) => match ingest.reserve(len).await {
                Ok(()) => Keep::Yes,
                Err(e @ StoreError::TooLarge { .. }) => Keep::TooLarge(e),
                Err(e) => {
                    self.give_up_file(ingest.as_mut(), &e);
                    Keep::Yes
                }
            },
            None => Keep::Yes,
        };
        let (to_writer, batches) = mpsc::unbounded_channel();
        let writer = self.writer(ingest, batches);
        self.tx
            .send_replace(FillState::Streaming { len, received: 0 });
        let streamed = self.receive(resp, len, &to_writer, fetch).await;
        drop(to_writer);
        let ingest = writer.await.map_err(|e| {
            let kind = UpstreamErrorKind::Store(format!("cache writer: {e}"));
            UpstreamError::new(upstream, kind)
        })?;
        streamed.map(|()| (ingest, keep))
    }

    /// Receive the body into the window, resuming it with `Range` when it breaks.
    async fn receive(
        &self,
        mut resp: reqwest::Response,
        len: Option<u64>,
        to_writer: &mpsc::UnboundedSender<Bytes>,
        fetch: &FetchFrom,
    ) -> Result<(), UpstreamError> {
        let upstream = &self.upstream;
        let mut resumes = 0;
        loop {
            let copied = self.copy_body(resp, len, to_writer).await;
            let got = self.data.tail().received;
            let err = match (copied, len) {
                (Ok(()), Some(expected)) if got < expected => {
                    UpstreamError::new(upstream, UpstreamErrorKind::Truncated { expected, got })
                }
                (Ok(()), _) => return Ok(()),
                (Err(e), _) => e,
            };
            // Only a body that broke or stalled past `timeouts.idle` can be resumed, and only
            // when we know where it ends.
            let resumable = matches!(
                err.kind,
                UpstreamErrorKind::Body(_)
                    | UpstreamErrorKind::Truncated { .. }
                    | UpstreamErrorKind::Timeout(_)
            );
            let Some(total) = len.filter(|_| resumable && resumes < MAX_RESUMES) else {
                return Err(err);
            };
            resumes += 1;
            warn!(%upstream, error = %err, from = got, total, resumes, "blob download broke; resuming with Range");
            self.metrics
                .upstream_resumes
                .with_label_values(&[upstream])
                .inc();
            resp = fetch(got).await?;
            if !is_rest_of(&resp, got, total) {
                return Err(err);
            }
        }
    }

    /// Copy one response body into the window, in batches. A body that breaks is reported
    /// after every byte that did arrive was passed on, so a resume can start right after them.
    async fn copy_body(
        &self,
        resp: reqwest::Response,
        len: Option<u64>,
        to_writer: &mpsc::UnboundedSender<Bytes>,
    ) -> Result<(), UpstreamError> {
        let upstream = &self.upstream;
        let mut body = resp.bytes_stream();
        let mut batch = BytesMut::new();
        let mut broken = None;
        let mut ended = false;
        while !ended && broken.is_none() {
            match body.next().await {
                Some(Ok(chunk)) => batch.extend_from_slice(&chunk),
                Some(Err(e)) => broken = Some(body_error(upstream, &e)),
                None => ended = true,
            }
            // Take whatever else has already arrived: a fast upstream makes few large batches,
            // while a slow one still reaches readers chunk by chunk.
            while !ended && broken.is_none() && batch.len() < BATCH {
                match body.next().now_or_never() {
                    Some(Some(Ok(chunk))) => batch.extend_from_slice(&chunk),
                    Some(Some(Err(e))) => broken = Some(body_error(upstream, &e)),
                    Some(None) => ended = true,
                    None => break,
                }
            }
            if !batch.is_empty() {
                self.push(batch.split().freeze(), len, to_writer).await?;
            }
        }
        broken.map_or(Ok(()), Err)
    }

    /// Hand a batch to the readers and the writer, once the window has room for it.
    async fn push(
        &self,
        bytes: Bytes,
        len: Option<u64>,
        to_writer: &mpsc::UnboundedSender<Bytes>,
    ) -> Result<(), UpstreamError> {
        let upstream = &self.upstream;
        let n = bytes.len() as u64;
        self.wait_for_room(n).await;
        let received = {
            let mut tail = self.data.tail();
            if len.is_some_and(|len| tail.received + n > len) {
                let kind = format!("sent more than its Content-Length {len:?}");
                return Err(UpstreamError::new(upstream, UpstreamErrorKind::Body(kind)));
            }
            let at = tail.received;
            tail.chunks.push_back((at, bytes.clone()));
            tail.received += n;
            tail.received
        };
        self.metrics
            .upstream_bytes
            .with_label_values(&[upstream])
            .inc_by(n);
        // The writer only ends once this sender is dropped.
        let _ = to_writer.send(bytes);
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
                if tail.held() == 0 || tail.held() + n <= WINDOW {
                    return;
                }
            }
            room.await;
        }
    }

    /// The writer: on a blocking thread, hash and write every batch in order. Batches that
    /// queued up while it was busy are gathered into one write of up to [`WRITE_GATHER`] bytes,
    /// so a fast upstream costs few writes and wake-ups. A write error turns the fill into a
    /// pass-through; the writer then only hashes.
    fn writer(
        self: &Arc<Self>,
        mut ingest: Box<dyn Ingest>,
        mut batches: mpsc::UnboundedReceiver<Bytes>,
    ) -> tokio::task::JoinHandle<Box<dyn Ingest>> {
        let fill = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut gave_up = false;
            let mut gathered = Vec::new();
            while let Some(first) = batches.blocking_recv() {
                let bytes = gather(&first, &mut batches, &mut gathered);
                if let Err(e) = ingest.write(bytes) {
                    if !std::mem::replace(&mut gave_up, true) {
                        fill.give_up_file(ingest.as_mut(), &e);
                    }
                }
                let mut tail = fill.data.tail();
                tail.hashed += bytes.len() as u64;
                tail.written = ingest.written();
                drop(tail);
                fill.data.room.notify_one();
            }
            ingest
        })
    }

    /// After a write error: delete the temp file, count and log it (once per fill), and go on
    /// as a pass-through.
    fn give_up_file(&self, ingest: &mut dyn Ingest, err: &StoreError) {
        ingest.discard();
        self.data.tail().passthrough = true;
        self.data.room.notify_one();
        self.metrics.store_write_error("blob", err);
        warn!(digest = %self.digest, upstream = %self.upstream, error = %err,
            "cache write failed; serving this blob pass-through without keeping it");
    }
}

/// `first` and whatever other batches are already queued, up to [`WRITE_GATHER`] bytes: as is
/// when it is alone, else copied together into `buf`.
fn gather<'a>(
    first: &'a Bytes,
    queue: &mut mpsc::UnboundedReceiver<Bytes>,
    buf: &'a mut Vec<u8>,
) -> &'a [u8] {
    let Ok(second) = queue.try_recv() else {
        return first;
    };
    buf.clear();
    buf.extend_from_slice(first);
    buf.extend_from_slice(&second);
    while buf.len() < WRITE_GATHER {
        match queue.try_recv() {
            Ok(next) => buf.extend_from_slice(&next),
            Err(_) => break,
        }
    }
    buf
}

/// Whether a response is bytes `from..total` of the blob: a 206 with that Content-Range, or
/// the whole blob when nothing was received yet.
fn is_rest_of(resp: &reqwest::Response, from: u64, total: u64) -> bool {
    if from == 0 {
        return resp.status() == http::StatusCode::OK;
    }
    let range = resp
        .headers()
        .get(http::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok());
    let expected = format!("bytes {from}-{}/", total - 1);
    resp.status() == http::StatusCode::PARTIAL_CONTENT
        && range.is_some_and(|r| {
            r.strip_prefix(&expected)
                .is_some_and(|size| size == "*" || size == total.to_string())
        })
}

fn commit_error(upstream: &Arc<str>, err: StoreError) -> UpstreamError {
    let kind = match err {
        StoreError::DigestMismatch { expected, actual } => {
            UpstreamErrorKind::DigestMismatch { expected, actual }
        }
        other => UpstreamErrorKind::Store(other.to_string()),
    };
    UpstreamError::new(upstream, kind)
}

pub fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Wait until a fill has its upstream response (or failed); returns the blob's length if known.
pub async fn wait_started(
    progress: &mut watch::Receiver<FillState>,
) -> Result<Option<u64>, UpstreamError> {
    loop {
        let state = progress.borrow_and_update().clone();
        match state {
            FillState::Starting => {}
            FillState::Streaming { len, .. } => return Ok(len),
            FillState::Verified { len } => return Ok(Some(len)),
            FillState::Failed(err) => return Err(err),
        }
        if progress.changed().await.is_err() {
            return Err(fill_vanished());
        }
    }
}

fn fill_vanished() -> UpstreamError {
    fill_error("the fill task ended without a result")
}

fn fill_error(what: &str) -> UpstreamError {
    UpstreamError::new(&Arc::from("fill"), UpstreamErrorKind::Store(what.into()))
}

/// A byte range of a blob being sent to a client, from the store or from a fill.
pub struct BlobBody {
    pos: u64,
    /// Exclusive end; `None` until a fill of unknown length is done.
    end: Option<u64>,
    source: Source,
    /// The last buffer read from disk: its memory is used again once the client's socket has
    /// taken its bytes, instead of a fresh allocation per chunk.
    buf: BytesMut,
}

enum Source {
    Cached(Arc<File>),
    Filling {
        reader: FillReader,
        progress: watch::Receiver<FillState>,
    },
}

impl BlobBody {
    pub fn cached(file: File, start: u64, end: u64) -> BlobBody {
        BlobBody {
            pos: start,
            end: Some(end),
            source: Source::Cached(Arc::new(file)),
            buf: BytesMut::new(),
        }
    }

    pub fn filling(
        reader: FillReader,
        progress: watch::Receiver<FillState>,
        start: u64,
        end: Option<u64>,
    ) -> BlobBody {
        reader.set(start);
        BlobBody {
            pos: start,
            end,
            source: Source::Filling { reader, progress },
            buf: BytesMut::new(),
        }
    }

    /// The next chunk, `Ok(None)` at the end, or the fill's error: the response must then be
    /// aborted so the client does not take a short body for a whole one.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            if self.end.is_some_and(|end| self.pos >= end) {
                return Ok(None);
            }
            let (file, upto) = match &mut self.source {
                Source::Cached(file) => (file.clone(), self.end.unwrap_or(0)),
                Source::Filling { reader, progress } => {
                    let limit = readable(progress, &mut self.end)?;
                    let limit = limit.min(self.end.unwrap_or(u64::MAX));
                    if self.pos >= limit {
                        if self.end.is_some_and(|end| self.pos >= end) {
                            return Ok(None);
                        }
                        if progress.changed().await.is_err() {
                            return Err(fill_vanished());
                        }
                        continue;
                    }
                    let located = reader.data.tail().locate(self.pos, limit);
                    match located {
                        Located::Memory(bytes) => {
                            self.advance(bytes.len());
                            return Ok(Some(bytes));
                        }
                        Located::File(upto) => (reader.data.file.clone(), upto),
                        Located::Gone => return Err(fill_error("fell behind the fill")),
                    }
                }
            };
            let bytes = self.read(file, upto).await?;
            self.advance(bytes.len());
            return Ok(Some(bytes));
        }
    }

    fn advance(&mut self, n: usize) {
        self.pos += n as u64;
        if let Source::Filling { reader, .. } = &self.source {
            reader.set(self.pos);
        }
    }

    /// Read from `self.pos` up to `upto` (at most [`CHUNK`]) on a blocking thread.
    async fn read(&mut self, file: Arc<File>, upto: u64) -> Result<Bytes, UpstreamError> {
        let len = (upto - self.pos).min(CHUNK as u64) as usize;
        let (pos, mut buf) = (self.pos, std::mem::take(&mut self.buf));
        let read = tokio::task::spawn_blocking(move || {
            // Takes the old allocation back if the last chunk is gone, else makes a new one.
            buf.reserve(len);
            buf.resize(len, 0);
            let read = file.read_exact_at(&mut buf, pos);
            (buf, read)
        })
        .await;
        let (mut buf, read) = read.map_err(|e| fill_error(&e.to_string()))?;
        read.map_err(|e| {
            UpstreamError::new(&Arc::from("cache"), UpstreamErrorKind::Store(e.to_string()))
        })?;
        let bytes = buf.split().freeze();
        self.buf = buf;
        Ok(bytes)
    }
}

/// How far a fill's bytes can be read right now; sets `end` once a fill of unknown length is
/// verified.
///
/// While a fill is unverified, the last byte of its blob is held back: a client that has
/// every byte takes the body as complete, so that byte waits until the digest has matched.
fn readable(
    progress: &mut watch::Receiver<FillState>,
    end: &mut Option<u64>,
) -> Result<u64, UpstreamError> {
    let state = progress.borrow_and_update().clone();
    match state {
        FillState::Starting => Ok(0),
        FillState::Streaming { received, len } => {
            let verified_part = len.map_or(received, |len| len.saturating_sub(1));
            Ok(received.min(verified_part))
        }
        FillState::Verified { len } => {
            end.get_or_insert(len);
            Ok(len)
        }
        FillState::Failed(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::Path;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use async_trait::async_trait;

    use crate::store::{DiskStore, Usage};

    /// A fill's data over a file already holding `data`, all of it written.
    fn written(data: &[u8]) -> Arc<FillData> {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(data).unwrap();
        let fill = Arc::new(FillData::new(file));
        {
            let mut tail = fill.tail();
            let n = data.len() as u64;
            (tail.start, tail.received, tail.written, tail.hashed) = (n, n, n, n);
        }
        fill
    }

    fn body_over(fill: &Arc<FillData>, len: Option<u64>) -> (BlobBody, watch::Sender<FillState>) {
        let (tx, rx) = watch::channel(FillState::Starting);
        (BlobBody::filling(fill.join().unwrap(), rx, 0, len), tx)
    }

    async fn pending(body: &mut BlobBody) -> bool {
        tokio::time::timeout(Duration::from_millis(50), body.next_chunk())
            .await
            .is_err()
    }

    #[tokio::test]
    async fn last_byte_waits_for_verification_and_failure_aborts() {
        let (mut body, tx) = body_over(&written(b"0123456789"), Some(10));
        tx.send_replace(FillState::Streaming {
            len: Some(10),
            received: 10,
        });
        let first = body.next_chunk().await.unwrap().unwrap();
        assert_eq!(&first[..], b"012345678");
        assert!(
            pending(&mut body).await,
            "the unverified last byte was handed out"
        );
        let upstream: Arc<str> = Arc::from("up");
        let mismatch = UpstreamErrorKind::Store("mismatch".into());
        tx.send_replace(FillState::Failed(UpstreamError::new(&upstream, mismatch)));
        assert!(body.next_chunk().await.is_err());
    }

    #[tokio::test]
    async fn verification_releases_the_rest_and_ends_the_body() {
        let (mut body, tx) = body_over(&written(b"0123456789"), Some(10));
        tx.send_replace(FillState::Streaming {
            len: Some(10),
            received: 4,
        });
        assert_eq!(&body.next_chunk().await.unwrap().unwrap()[..], b"0123");
        assert!(pending(&mut body).await, "read past what was received");
        tx.send_replace(FillState::Verified { len: 10 });
        assert_eq!(&body.next_chunk().await.unwrap().unwrap()[..], b"456789");
        assert!(body.next_chunk().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn unknown_length_ends_only_at_verification() {
        let (mut body, tx) = body_over(&written(b"abc"), None);
        tx.send_replace(FillState::Streaming {
            len: None,
            received: 3,
        });
        assert_eq!(&body.next_chunk().await.unwrap().unwrap()[..], b"abc");
        assert!(pending(&mut body).await);
        tx.send_replace(FillState::Verified { len: 3 });
        assert!(body.next_chunk().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn received_bytes_are_read_from_memory_before_they_are_written() {
        let fill = Arc::new(FillData::new(tempfile::tempfile().unwrap()));
        let (mut body, tx) = body_over(&fill, Some(6));
        {
            let mut tail = fill.tail();
            tail.chunks.push_back((0, Bytes::from_static(b"abc")));
            tail.chunks.push_back((3, Bytes::from_static(b"de")));
            tail.received = 5;
        }
        tx.send_replace(FillState::Streaming {
            len: Some(6),
            received: 5,
        });
        assert_eq!(&body.next_chunk().await.unwrap().unwrap()[..], b"abc");
        assert_eq!(&body.next_chunk().await.unwrap().unwrap()[..], b"de");
        assert!(pending(&mut body).await);
    }

    #[test]
    fn the_writer_gathers_queued_batches_and_takes_a_lone_one_as_is() {
        let (tx, mut queue) = mpsc::unbounded_channel();
        let mut buf = Vec::new();
        let lone = Bytes::from_static(b"lone");
        assert_eq!(gather(&lone, &mut queue, &mut buf).as_ptr(), lone.as_ptr());
        let big = Bytes::from(vec![7u8; WRITE_GATHER]);
        for batch in [&b"b"[..], &big, b"left for the next write"] {
            tx.send(Bytes::copy_from_slice(batch)).unwrap();
        }
        let first = Bytes::from_static(b"a");
        let gathered = gather(&first, &mut queue, &mut buf);
        assert_eq!(gathered.len(), 2 + WRITE_GATHER);
        assert_eq!(&gathered[..3], b"ab\x07");
        assert_eq!(&queue.try_recv().unwrap()[..], b"left for the next write");
    }

    #[test]
    fn without_its_file_a_fill_keeps_what_the_slowest_reader_needs() {
        let fill = Arc::new(FillData::new(tempfile::tempfile().unwrap()));
        let (slow, fast) = (fill.join().unwrap(), fill.join().unwrap());
        {
            let mut tail = fill.tail();
            for i in 0..4u64 {
                tail.chunks.push_back((i * 2, Bytes::from_static(b"xx")));
            }
            (tail.received, tail.hashed, tail.passthrough) = (8, 8, true);
        }
        slow.set(2);
        fast.set(6);
        fill.tail().trim();
        assert_eq!(
            fill.tail().start,
            2,
            "dropped what the slow reader still needs"
        );
        assert!(
            fill.join().is_none(),
            "a reader from 0 joined a fill without its file"
        );
        drop(slow);
        fill.tail().trim();
        assert_eq!(fill.tail().start, 6);
        drop(fast);
        fill.tail().trim();
        let tail = fill.tail();
        assert_eq!((tail.start, tail.held()), (8, 0));
    }

    /// A store whose writes fail with ENOSPC once an object passes `room` bytes.
    struct FullDisk {
        inner: DiskStore,
        room: AtomicU64,
    }

    struct FullIngest {
        inner: Box<dyn Ingest>,
        room: u64,
    }

    #[async_trait]
    impl BlobStore for FullDisk {
        fn size_of(&self, digest: &Digest) -> Option<u64> {
            self.inner.size_of(digest)
        }
        async fn open(&self, digest: &Digest) -> Result<Option<StoredObject>, StoreError> {
            self.inner.open(digest).await
        }
        fn ingest(&self, digest: &Digest) -> Result<Box<dyn Ingest>, StoreError> {
            Ok(Box::new(FullIngest {
                inner: self.inner.ingest(digest)?,
                room: self.room.load(Ordering::SeqCst),
            }))
        }
        fn touch(&self, digest: &Digest) {
            self.inner.touch(digest)
        }
        async fn remove(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
            self.inner.remove(digest).await
        }
        fn set_pins(&self, pins: std::collections::HashSet<Digest>) {
            self.inner.set_pins(pins)
        }
        fn list(&self) -> Vec<(Digest, u64)> {
            self.inner.list()
        }
        fn usage(&self) -> Usage {
            self.inner.usage()
        }
    }

    #[async_trait]
    impl Ingest for FullIngest {
        fn reader(&self) -> std::io::Result<File> {
            self.inner.reader()
        }
        async fn reserve(&mut self, len: u64) -> Result<(), StoreError> {
            self.inner.reserve(len).await
        }
        fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
            if self.inner.written() + bytes.len() as u64 > self.room {
                // As the disk store does: what was passed is hashed, nothing more is written.
                self.inner.discard();
                self.inner.write(bytes)?;
                return Err(std::io::Error::from(std::io::ErrorKind::StorageFull).into());
            }
            self.inner.write(bytes)
        }
        fn discard(&mut self) {
            self.inner.discard()
        }
        fn written(&self) -> u64 {
            self.inner.written()
        }
        fn verify(&mut self) -> Result<u64, StoreError> {
            self.inner.verify()
        }
        async fn commit(self: Box<Self>) -> Result<u64, StoreError> {
            self.inner.commit().await
        }
    }

    /// Fetches of `body` in 64 KiB chunks, each fetch held until `go` is notified, counted.
    fn upstream_of(
        body: Vec<u8>,
        go: Arc<Notify>,
        count: Arc<AtomicUsize>,
    ) -> impl Fn(u64) -> Fetch {
        move |_from| {
            let (body, go, count) = (body.clone(), go.clone(), count.clone());
            async move {
                count.fetch_add(1, Ordering::SeqCst);
                go.notified().await;
                let chunks: Vec<Result<Bytes, std::io::Error>> = body
                    .chunks(64 * 1024)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                let resp = http::Response::builder()
                    .header(http::header::CONTENT_LENGTH, body.len())
                    .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                        chunks,
                    )))
                    .unwrap();
                Ok(reqwest::Response::from(resp))
            }
            .boxed()
        }
    }

    async fn read_all(source: BlobSource) -> Result<Vec<u8>, UpstreamError> {
        let BlobSource::Filling {
            reader,
            mut progress,
            ..
        } = source
        else {
            panic!("expected a fill");
        };
        let len = wait_started(&mut progress).await?;
        let mut body = BlobBody::filling(reader, progress, 0, len);
        let mut out = Vec::new();
        while let Some(chunk) = body.next_chunk().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    fn tmp_files(root: &Path) -> usize {
        std::fs::read_dir(root.join("tmp")).unwrap().count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_error_turns_the_fill_into_a_verified_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FullDisk {
            inner: DiskStore::open(dir.path(), u64::MAX).unwrap(),
            room: AtomicU64::new(1 << 20),
        });
        let metrics = Arc::new(Metrics::new());
        let fills = Fills::new(store.clone(), metrics.clone());
        let data: Vec<u8> = (0..12u32 << 20).map(|i| (i % 251) as u8).collect();
        let digest = Digest::of(&data);
        let (go, fetches) = (Arc::new(Notify::new()), Arc::new(AtomicUsize::new(0)));
        let up: Arc<str> = Arc::from("up");
        let fetch = || upstream_of(data.clone(), go.clone(), fetches.clone());

        // Two clients on one fill; the disk fills up 1 MiB in, and more than WINDOW remains.
        let first = fills.get(&digest, &up, fetch()).await.unwrap();
        let second = fills.get(&digest, &up, fetch()).await.unwrap();
        assert!(matches!(second, BlobSource::Filling { joined: true, .. }));
        go.notify_one();
        let (a, b) = tokio::join!(read_all(first), read_all(second));
        assert!(
            a.unwrap() == data && b.unwrap() == data,
            "pass-through bytes differ"
        );
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            1,
            "one upstream fetch for both"
        );
        let errors = metrics
            .store_write_errors
            .with_label_values(&["blob", "no_space"]);
        assert_eq!(errors.get(), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.size_of(&digest), None, "a pass-through blob was kept");
        assert_eq!(tmp_files(dir.path()), 0, "the temp file was left behind");
        assert_eq!(store.usage().bytes, 0);

        // With room again, the next request caches it.
        store.room.store(u64::MAX, Ordering::SeqCst);
        let third = fills.get(&digest, &up, fetch()).await.unwrap();
        go.notify_one();
        assert!(read_all(third).await.unwrap() == data);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.size_of(&digest), Some(data.len() as u64));
        assert_eq!(errors.get(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pass_through_is_still_verified_and_not_joined_by_later_requests() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FullDisk {
            inner: DiskStore::open(dir.path(), u64::MAX).unwrap(),
            room: AtomicU64::new(0),
        });
        let metrics = Arc::new(Metrics::new());
        let fills = Fills::new(store.clone(), metrics.clone());
        // Larger than the window, so the fill waits for this reader.
        let mut data: Vec<u8> = (0..24u32 << 20).map(|i| (i % 249) as u8).collect();
        let digest = Digest::of(&data);
        data[20 << 20] ^= 1;
        let (go, fetches) = (Arc::new(Notify::new()), Arc::new(AtomicUsize::new(0)));
        let up: Arc<str> = Arc::from("up");
        let fetch = || upstream_of(data.clone(), go.clone(), fetches.clone());

        let first = fills.get(&digest, &up, fetch()).await.unwrap();
        let BlobSource::Filling {
            reader,
            mut progress,
            ..
        } = first
        else {
            panic!("expected a fill");
        };
        go.notify_one();
        let len = wait_started(&mut progress).await.unwrap();
        let mut body = BlobBody::filling(reader, progress, 0, len);
        body.next_chunk().await.unwrap().unwrap();
        // The first write has failed by now (it came before the first byte could be read).
        while metrics
            .store_write_errors
            .with_label_values(&["blob", "no_space"])
            .get()
            == 0
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let later = fills.get(&digest, &up, fetch()).await.unwrap();
        assert!(
            matches!(later, BlobSource::Filling { joined: false, .. }),
            "a request joined a fill that can no longer cache"
        );
        let ended = loop {
            match body.next_chunk().await {
                Ok(Some(_)) => {}
                end => break end,
            }
        };
        assert!(ended.is_err(), "a corrupt pass-through body was completed");
        drop(later);
        assert_eq!(store.size_of(&digest), None);
    }
}
