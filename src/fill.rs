//! Single flight with progressive fan-out for blobs.
//!
//! At most one upstream fetch per digest runs at a time. It is a task of its own: it writes into a
//! store ingest and publishes its progress on a watch channel. Every request for that digest reads
//! the growing temp file through one shared read handle, up to the published byte count, and sleeps
//! on the channel (no polling) when it has caught up. Verification or failure ends every reader: a reader
//! never sees bytes past what was written, and never sees a failed fill as complete.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::oci::Digest;
use crate::store::{BlobStore, Ingest, StoreError, StoredObject};
use crate::upstream::client::body_error;
use crate::upstream::{UpstreamError, UpstreamErrorKind};

/// How much one read from disk hands to the client at most.
const CHUNK: u64 = 256 * 1024;
/// The most upstream bytes gathered into one disk write.
const WRITE_BATCH: usize = 1024 * 1024;

#[derive(Clone, Debug)]
pub enum FillState {
    /// Waiting for the upstream's response headers.
    Starting,
    /// `written` bytes are on disk and readable; `len` is the upstream's Content-Length.
    Streaming {
        len: Option<u64>,
        written: u64,
    },
    /// All `len` bytes are written and match the digest: readers may finish. (Persisting to the
    /// store happens after this; a failure there loses the cache entry, never a client's bytes.)
    Verified {
        len: u64,
    },
    Failed(UpstreamError),
}

struct InFlight {
    file: Arc<File>,
    progress: watch::Receiver<FillState>,
}

/// Where a blob's bytes come from.
pub enum BlobSource {
    Cached(StoredObject),
    Filling {
        file: Arc<File>,
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
                return Ok(BlobSource::Filling {
                    file: running.file.clone(),
                    progress: running.progress.clone(),
                    joined: true,
                });
            }
            let ingest = self.store.ingest(digest)?;
            let file = Arc::new(ingest.reader()?);
            let (tx, progress) = watch::channel(FillState::Starting);
            inflight.insert(
                digest.clone(),
                InFlight {
                    file: file.clone(),
                    progress: progress.clone(),
                },
            );
            drop(inflight);
            let fetch: FetchFrom = Box::new(fetch);
            tokio::spawn(self.run(digest.clone(), upstream.clone(), ingest, fetch, tx));
            return Ok(BlobSource::Filling {
                file,
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

    /// The fill task: stream upstream into the ingest, verify and commit, then tell every reader.
    fn run(
        &self,
        digest: Digest,
        upstream: Arc<str>,
        mut ingest: Box<dyn Ingest>,
        fetch: FetchFrom,
        tx: watch::Sender<FillState>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let inflight = self.inflight.clone();
        let metrics = self.metrics.clone();
        let store = self.store.clone();
        async move {
            metrics.fills_in_flight.inc();
            let started = std::time::Instant::now();
            let streamed = stream_into(ingest.as_mut(), &fetch, &tx, &upstream, &metrics).await;
            let verified = streamed.and_then(|keep| {
                let len = ingest.verify().map_err(|e| commit_error(&upstream, e))?;
                Ok((len, keep))
            });
            let outcome = if verified.is_ok() {
                "verified"
            } else {
                "failed"
            };
            metrics
                .fill_duration
                .with_label_values(&[&upstream, outcome])
                .observe(started.elapsed().as_secs_f64());
            match verified {
                Ok((len, keep)) => {
                    tx.send_replace(FillState::Verified { len });
                    let committed = match keep {
                        Keep::Yes => ingest.commit().await,
                        Keep::TooLarge(e) => Err(e),
                    };
                    match committed {
                        Ok(_) => info!(%digest, %upstream, bytes = len, "blob cached"),
                        Err(e @ StoreError::TooLarge { .. }) => {
                            metrics.oversize_blobs.with_label_values(&[&upstream]).inc();
                            info!(%digest, %upstream, bytes = len, reason = %e, "blob served pass-through, not kept");
                        }
                        Err(e) => warn!(%digest, error = %e, "blob served but not cached"),
                    }
                    metrics.record_usage(store.usage());
                }
                Err(err) => {
                    drop(ingest);
                    if matches!(err.kind, UpstreamErrorKind::DigestMismatch { .. }) {
                        metrics
                            .digest_mismatches
                            .with_label_values(&[&upstream])
                            .inc();
                    }
                    warn!(%digest, error = %err, "blob fill failed; nothing was cached");
                    tx.send_replace(FillState::Failed(err));
                }
            }
            // Only now, with the object in the store (or given up), may a new fill start.
            inflight.lock().expect("fill lock").remove(&digest);
            metrics.fills_in_flight.dec();
        }
    }
}

/// Whether a fill's blob can be kept once verified.
enum Keep {
    Yes,
    /// Larger than the cache can hold: streamed to its readers, then let go.
    TooLarge(StoreError),
}

async fn stream_into(
    ingest: &mut dyn Ingest,
    fetch: &FetchFrom,
    tx: &watch::Sender<FillState>,
    upstream: &Arc<str>,
    metrics: &Metrics,
) -> Result<Keep, UpstreamError> {
    let mut resp = fetch(0).await?;
    let len = content_length(resp.headers());
    let keep = match len {
        // Room is made before the first byte lands, so the disk never holds more than allowed.
        Some(len) => match ingest.reserve(len).await {
            Ok(()) => Keep::Yes,
            Err(e @ StoreError::TooLarge { .. }) => Keep::TooLarge(e),
            Err(e) => return Err(commit_error(upstream, e)),
        },
        None => Keep::Yes,
    };
    tx.send_replace(FillState::Streaming { len, written: 0 });
    let mut resumes = 0;
    loop {
        let copied = copy_body(ingest, resp, len, tx, upstream, metrics).await;
        let got = ingest.written();
        let err = match (copied, len) {
            (Ok(()), Some(expected)) if got < expected => {
                UpstreamError::new(upstream, UpstreamErrorKind::Truncated { expected, got })
            }
            (Ok(()), _) => return Ok(keep),
            (Err(e), _) => e,
        };
        // Only a body that broke or stalled past `timeouts.idle` can be resumed, and only when
        // we know where it ends.
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
        metrics
            .upstream_resumes
            .with_label_values(&[upstream])
            .inc();
        resp = fetch(got).await?;
        if !is_rest_of(&resp, got, total) {
            return Err(err);
        }
    }
}

/// Whether a response is bytes `from..total` of the blob: a 206 with that Content-Range, or
/// the whole blob when nothing was written yet.
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

/// Copy one response body into the ingest, in batches. A body that breaks is reported after
/// every byte that did arrive has been written, so a resume can start right after them.
async fn copy_body(
    ingest: &mut dyn Ingest,
    resp: reqwest::Response,
    len: Option<u64>,
    tx: &watch::Sender<FillState>,
    upstream: &Arc<str>,
    metrics: &Metrics,
) -> Result<(), UpstreamError> {
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
        // Take whatever else has already arrived: a fast upstream costs one disk write per
        // batch, while a slow one still reaches readers chunk by chunk.
        while !ended && broken.is_none() && batch.len() < WRITE_BATCH {
            match body.next().now_or_never() {
                Some(Some(Ok(chunk))) => batch.extend_from_slice(&chunk),
                Some(Some(Err(e))) => broken = Some(body_error(upstream, &e)),
                Some(None) => ended = true,
                None => break,
            }
        }
        if !batch.is_empty() {
            write_batch(ingest, batch.split().freeze(), len, tx, upstream, metrics).await?;
        }
    }
    broken.map_or(Ok(()), Err)
}

async fn write_batch(
    ingest: &mut dyn Ingest,
    bytes: Bytes,
    len: Option<u64>,
    tx: &watch::Sender<FillState>,
    upstream: &Arc<str>,
    metrics: &Metrics,
) -> Result<(), UpstreamError> {
    let written = ingest.written() + bytes.len() as u64;
    if len.is_some_and(|len| written > len) {
        return Err(UpstreamError::new(
            upstream,
            UpstreamErrorKind::Body(format!("sent more than its Content-Length {len:?}")),
        ));
    }
    metrics
        .upstream_bytes
        .with_label_values(&[upstream])
        .inc_by(bytes.len() as u64);
    ingest
        .write(bytes)
        .await
        .map_err(|e| UpstreamError::new(upstream, UpstreamErrorKind::Store(e.to_string())))?;
    tx.send_modify(|state| {
        if let FillState::Streaming { written: w, .. } = state {
            *w = written;
        }
    });
    Ok(())
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
    UpstreamError::new(
        &Arc::from("fill"),
        UpstreamErrorKind::Store("the fill task ended without a result".into()),
    )
}

/// A byte range of a blob being sent to a client, from the store or from a growing fill.
pub struct BlobBody {
    file: Arc<File>,
    pos: u64,
    /// Exclusive end; `None` until a fill of unknown length is done.
    end: Option<u64>,
    progress: Option<watch::Receiver<FillState>>,
}

impl BlobBody {
    pub fn cached(file: File, start: u64, end: u64) -> BlobBody {
        BlobBody {
            file: Arc::new(file),
            pos: start,
            end: Some(end),
            progress: None,
        }
    }

    pub fn filling(
        file: Arc<File>,
        progress: watch::Receiver<FillState>,
        start: u64,
        end: Option<u64>,
    ) -> BlobBody {
        BlobBody {
            file,
            pos: start,
            end,
            progress: Some(progress),
        }
    }

    /// The next chunk, `Ok(None)` at the end, or the fill's error: the response must then be
    /// aborted so the client does not take a short body for a whole one.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            let readable = self.readable()?;
            let limit = readable.min(self.end.unwrap_or(u64::MAX));
            if self.pos < limit {
                let len = (limit - self.pos).min(CHUNK);
                let bytes = self.read(len).await?;
                self.pos += bytes.len() as u64;
                return Ok(Some(bytes));
            }
            if self.end.is_some_and(|end| self.pos >= end) {
                return Ok(None);
            }
            let progress = self
                .progress
                .as_mut()
                .expect("a cached body always knows its end");
            if progress.changed().await.is_err() {
                return Err(fill_vanished());
            }
        }
    }

    /// How far the file can be read right now.
    ///
    /// While a fill is unverified, the last byte of its blob is held back: a client that has
    /// every byte takes the body as complete, so that byte waits until the digest has matched.
    fn readable(&mut self) -> Result<u64, UpstreamError> {
        let Some(progress) = self.progress.as_mut() else {
            return Ok(self.end.unwrap_or(0));
        };
        let state = progress.borrow_and_update().clone();
        match state {
            FillState::Starting => Ok(0),
            FillState::Streaming { written, len } => {
                let verified_part = len.map_or(written, |len| len.saturating_sub(1));
                Ok(written.min(verified_part))
            }
            FillState::Verified { len } => {
                self.end.get_or_insert(len);
                Ok(len)
            }
            FillState::Failed(err) => Err(err),
        }
    }

    async fn read(&self, len: u64) -> Result<Bytes, UpstreamError> {
        let (file, pos) = (self.file.clone(), self.pos);
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, pos).map(|()| Bytes::from(buf))
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        read.map_err(|e| {
            UpstreamError::new(&Arc::from("cache"), UpstreamErrorKind::Store(e.to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn body_over(data: &[u8]) -> (BlobBody, watch::Sender<FillState>) {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(data).unwrap();
        let (tx, rx) = watch::channel(FillState::Starting);
        let len = data.len() as u64;
        (BlobBody::filling(Arc::new(file), rx, 0, Some(len)), tx)
    }

    async fn pending(body: &mut BlobBody) -> bool {
        tokio::time::timeout(Duration::from_millis(50), body.next_chunk())
            .await
            .is_err()
    }

    #[tokio::test]
    async fn last_byte_waits_for_verification_and_failure_aborts() {
        let (mut body, tx) = body_over(b"0123456789");
        tx.send_replace(FillState::Streaming {
            len: Some(10),
            written: 10,
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
    async fn commit_releases_the_rest_and_ends_the_body() {
        let (mut body, tx) = body_over(b"0123456789");
        tx.send_replace(FillState::Streaming {
            len: Some(10),
            written: 4,
        });
        assert_eq!(&body.next_chunk().await.unwrap().unwrap()[..], b"0123");
        assert!(pending(&mut body).await, "read past what was written");
        tx.send_replace(FillState::Verified { len: 10 });
        assert_eq!(&body.next_chunk().await.unwrap().unwrap()[..], b"456789");
        assert!(body.next_chunk().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn unknown_length_ends_only_at_commit() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"abc").unwrap();
        let (tx, rx) = watch::channel(FillState::Streaming {
            len: None,
            written: 3,
        });
        let mut body = BlobBody::filling(Arc::new(file), rx, 0, None);
        assert_eq!(&body.next_chunk().await.unwrap().unwrap()[..], b"abc");
        assert!(pending(&mut body).await);
        tx.send_replace(FillState::Verified { len: 3 });
        assert!(body.next_chunk().await.unwrap().is_none());
    }
}
