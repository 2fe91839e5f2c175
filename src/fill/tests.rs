//! The fill against a second origin ([`FixedOrigin`], with faults) and two stores (disk and
//! memory), and the window and body on their own.

use super::window::Located;
use super::*;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::origin::fixed::{Fault, FixedOrigin};
use crate::store::{DiskStore, MemoryStore, ObjectReader, ObjectWriter, Storage};

/// Reads of fixed bytes, as a store's reader.
struct Held(Bytes);

#[async_trait]
impl ObjectReader for Held {
    async fn read(
        &self,
        pos: u64,
        len: usize,
        spare: BytesMut,
    ) -> Result<(Bytes, BytesMut), StoreError> {
        Ok((self.0.slice(pos as usize..pos as usize + len), spare))
    }
}

/// A fill's data over a store already holding `data`, all of it written.
fn written(data: &'static [u8]) -> Arc<FillData> {
    let fill = Arc::new(FillData::new());
    let _ = fill.file.set(Arc::new(Held(Bytes::from_static(data))));
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

/// Whether the body has nothing to hand out: with the clock paused, the timeout fires only
/// once every task is idle, so this is not a race against time.
async fn pending(body: &mut BlobBody) -> bool {
    tokio::time::timeout(Duration::from_secs(60), body.next_chunk())
        .await
        .is_err()
}

fn failed(what: &str) -> FillState {
    FillState::Failed(FillError::cache(what))
}

#[tokio::test(start_paused = true)]
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
    tx.send_replace(failed("mismatch"));
    assert!(body.next_chunk().await.is_err());
}

#[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
async fn received_bytes_are_read_from_memory_before_they_are_written() {
    let fill = Arc::new(FillData::new());
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

/// A fill with `n` batches of `size` bytes received, hashed and written.
fn written_batches(n: u64, size: usize) -> Arc<FillData> {
    let fill = Arc::new(FillData::new());
    {
        let mut tail = fill.tail();
        for i in 0..n {
            tail.chunks
                .push_back((i * size as u64, Bytes::from(vec![i as u8; size])));
        }
        let total = n * size as u64;
        (tail.received, tail.written, tail.hashed) = (total, total, total);
    }
    fill
}

#[test]
fn written_batches_stay_in_memory_for_a_reader_that_keeps_up() {
    let fill = written_batches(4, 1024);
    let reader = fill.join().unwrap();
    reader.set(1024);
    let mut tail = fill.tail();
    tail.trim();
    assert_eq!(
        tail.start, 1024,
        "kept only what the reader has yet to read"
    );
    assert!(matches!(tail.locate(1024, 4096), Located::Memory(b) if b[0] == 1));
    assert_eq!(tail.pending(), 0, "written bytes held the fill back");
    // What is not written stays, reader or not.
    (tail.written, tail.hashed) = (3072, 3072);
    drop(tail);
    drop(reader);
    let mut tail = fill.tail();
    tail.trim();
    assert_eq!((tail.start, tail.pending()), (3072, 1024));
}

#[test]
fn a_reader_far_behind_reads_the_store_rather_than_hold_the_window() {
    let size = 1024 * 1024;
    let n = WINDOW / size as u64 + 4;
    let fill = written_batches(n, size);
    let _behind = fill.join().unwrap();
    let mut tail = fill.tail();
    tail.trim();
    assert!(tail.received - tail.start <= WINDOW, "held {}", tail.start);
    assert!(tail.start > 0);
    assert!(matches!(tail.locate(0, tail.received), Located::Store(_)));
    assert_eq!(tail.pending(), 0);
}

#[test]
fn without_its_file_a_fill_keeps_what_the_slowest_reader_needs() {
    let fill = Arc::new(FillData::new());
    let (slow, fast) = (fill.join().unwrap(), fill.join().unwrap());
    {
        let mut tail = fill.tail();
        for i in 0..4u64 {
            tail.chunks.push_back((i * 2, Bytes::from_static(b"xx")));
        }
        (tail.received, tail.hashed, tail.passthrough) = (8, 8, true);
        tail.joinable = false;
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
    assert_eq!((tail.start, tail.pending()), (8, 0));
}

/// A store whose writes fail with ENOSPC once an object passes `room` bytes, and wait while
/// `held` is closed: a decorator over the disk store's writer.
struct FullDisk {
    inner: DiskStore,
    room: Arc<AtomicU64>,
    held: Arc<Gate>,
}

struct FullWriter {
    inner: Box<dyn ObjectWriter>,
    room: u64,
    held: Arc<Gate>,
}

/// A gate for blocking threads: `wait` returns once it is open.
#[derive(Default)]
struct Gate {
    closed: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gate {
    fn closed() -> Arc<Gate> {
        let gate = Gate::default();
        *gate.closed.lock().unwrap() = true;
        Arc::new(gate)
    }

    fn open(&self) {
        *self.closed.lock().unwrap() = false;
        self.opened.notify_all();
    }

    fn wait(&self) {
        let closed = self.closed.lock().unwrap();
        drop(self.opened.wait_while(closed, |closed| *closed).unwrap());
    }
}

impl FullDisk {
    fn over(dir: &Path, room: u64) -> FullDisk {
        FullDisk {
            inner: DiskStore::open(dir, u64::MAX).unwrap(),
            room: Arc::new(AtomicU64::new(room)),
            held: Arc::new(Gate::default()),
        }
    }
}

#[async_trait]
impl BlobStore for FullDisk {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        self.inner.stat(digest).await
    }
    async fn open(&self, digest: &Digest) -> Result<Option<Object>, StoreError> {
        self.inner.open(digest).await
    }
    async fn peek(&self, digest: &Digest) -> Result<Option<Object>, StoreError> {
        self.inner.peek(digest).await
    }
    async fn ingest(&self, digest: &Digest) -> Result<Ingest, StoreError> {
        let room = self.room.load(Ordering::SeqCst);
        let ingest = self.inner.ingest(digest).await?;
        let held = self.held.clone();
        Ok(ingest.wrap_writer(|inner| Box::new(FullWriter { inner, room, held })))
    }
    async fn remove(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        self.inner.remove(digest).await
    }
    async fn list(&self) -> Result<Vec<(Digest, u64)>, StoreError> {
        self.inner.list().await
    }
}

impl Budget for FullDisk {
    fn touch(&self, digest: &Digest) {
        self.inner.touch(digest)
    }
    fn set_pins(&self, pins: std::collections::HashSet<Digest>) {
        self.inner.set_pins(pins)
    }
    fn usage(&self) -> crate::store::Usage {
        self.inner.usage()
    }
    fn save(&self) -> std::io::Result<bool> {
        self.inner.save()
    }
}

#[async_trait]
impl ObjectWriter for FullWriter {
    fn reader(&self) -> Option<Arc<dyn ObjectReader>> {
        self.inner.reader()
    }
    async fn reserve(&mut self, len: u64) -> Result<(), StoreError> {
        self.inner.reserve(len).await
    }
    fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.held.wait();
        if self.inner.written() + bytes.len() as u64 > self.room {
            return Err(std::io::Error::from(std::io::ErrorKind::StorageFull).into());
        }
        self.inner.write(bytes)
    }
    fn discard(&mut self) {
        self.inner.discard()
    }
    fn unbudgeted(&mut self) {
        self.inner.unbudgeted()
    }
    fn written(&self) -> u64 {
        self.inner.written()
    }
    async fn commit(self: Box<Self>, proof: Verified) -> Result<u64, StoreError> {
        self.inner.commit(proof).await
    }
}

/// An origin that holds every fetch until `go` is notified, so requests can pile up on one
/// fill first.
struct Gated {
    inner: FixedOrigin,
    go: Arc<Notify>,
}

impl Gated {
    /// An origin of `data` held until the returned gate is notified.
    fn over(data: &Bytes) -> (Arc<Gated>, Arc<Notify>) {
        let go = Arc::new(Notify::new());
        let inner = FixedOrigin::new("fixed", data.clone(), 64 * 1024, Fault::None);
        let gated = Gated {
            inner,
            go: go.clone(),
        };
        (Arc::new(gated), go)
    }
}

#[async_trait]
impl Origin for Gated {
    fn name(&self) -> &OriginName {
        self.inner.name()
    }
    async fn fetch(&self, digest: &Digest, from: u64) -> Result<OriginBody, OriginError> {
        self.go.notified().await;
        self.inner.fetch(digest, from).await
    }
}

fn pattern(len: u32, modulo: u32) -> Bytes {
    (0..len)
        .map(|i| (i % modulo) as u8)
        .collect::<Vec<u8>>()
        .into()
}

async fn read_all(source: BlobSource) -> Result<Vec<u8>, FillError> {
    let mut progress;
    let mut body = match source {
        BlobSource::Cached(obj) => BlobBody::cached(obj.reader, 0, obj.len),
        BlobSource::Filling {
            reader,
            progress: p,
            ..
        } => {
            progress = p;
            let len = wait_started(&mut progress).await?;
            BlobBody::filling(reader, progress, 0, len)
        }
    };
    let mut out = Vec::new();
    while let Some(chunk) = body.next_chunk().await? {
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn tmp_files(root: &Path) -> usize {
    std::fs::read_dir(root.join("tmp")).unwrap().count()
}

fn fills_over(storage: &Storage, metrics: &Arc<Metrics>) -> Fills {
    Fills::new(
        storage.blobs.clone(),
        storage.budget.clone(),
        metrics.clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_finish_once_the_bytes_are_hashed_without_waiting_for_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = FullDisk::over(dir.path(), u64::MAX);
    store.held = Gate::closed();
    let store = Arc::new(store);
    let fills = fills_over(&Storage::of(store.clone()), &Arc::new(Metrics::new()));
    // Less than the window: all of it fits in memory while the disk is held.
    let data = pattern(3 << 20, 247);
    let digest = Digest::of(&data);
    let origin = Arc::new(FixedOrigin::new(
        "fixed",
        data.clone(),
        64 * 1024,
        Fault::None,
    ));
    let source = fills.get(&digest, origin).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(20), read_all(source)).await;
    let kept_early = store.stat(&digest).await.unwrap();
    // Opened before anything is asserted, so a failure does not leave the writer blocked.
    store.held.open();
    let read = read.expect("the reader waited for the held disk");
    assert!(read.unwrap() == data);
    assert_eq!(kept_early, None, "kept before it was written");
    fills.settled(&digest).await;
    assert_eq!(store.stat(&digest).await.unwrap(), Some(data.len() as u64));
    let kept = store.open(&digest).await.unwrap().unwrap();
    assert!(read_all(BlobSource::Cached(kept)).await.unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_error_turns_the_fill_into_a_verified_pass_through() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FullDisk::over(dir.path(), 1 << 20));
    let room = store.room.clone();
    let metrics = Arc::new(Metrics::new());
    let fills = fills_over(&Storage::of(store.clone()), &metrics);
    let data = pattern(12 << 20, 251);
    let digest = Digest::of(&data);
    let (origin, go) = Gated::over(&data);

    // Two clients on one fill; the disk fills up 1 MiB in, and more than WINDOW remains.
    let first = fills.get(&digest, origin.clone()).await.unwrap();
    let second = fills.get(&digest, origin.clone()).await.unwrap();
    assert!(matches!(second, BlobSource::Filling { joined: true, .. }));
    go.notify_one();
    let (a, b) = tokio::join!(read_all(first), read_all(second));
    assert!(
        a.unwrap() == data && b.unwrap() == data,
        "pass-through bytes differ"
    );
    assert_eq!(origin.inner.fetches(), 1, "one origin fetch for both");
    let errors = metrics
        .store_write_errors
        .with_label_values(&["blob", "no_space"]);
    assert_eq!(errors.get(), 1);
    fills.settled(&digest).await;
    assert_eq!(
        store.stat(&digest).await.unwrap(),
        None,
        "a pass-through blob was kept"
    );
    assert_eq!(tmp_files(dir.path()), 0, "the temp file was left behind");

    // With room again, the next request caches it.
    room.store(u64::MAX, Ordering::SeqCst);
    let third = fills.get(&digest, origin.clone()).await.unwrap();
    go.notify_one();
    assert!(read_all(third).await.unwrap() == data);
    fills.settled(&digest).await;
    assert_eq!(store.stat(&digest).await.unwrap(), Some(data.len() as u64));
    assert_eq!(errors.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_through_is_still_verified_and_not_joined_by_later_requests() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FullDisk::over(dir.path(), 0));
    let metrics = Arc::new(Metrics::new());
    let fills = fills_over(&Storage::of(store.clone()), &metrics);
    // Larger than the window, so the fill waits for this reader.
    let right = pattern(24 << 20, 249);
    let digest = Digest::of(&right);
    let mut data = right.to_vec();
    data[20 << 20] ^= 1;
    let go = Arc::new(Notify::new());
    let origin = Arc::new(Gated {
        inner: FixedOrigin::new("fixed", data.into(), 64 * 1024, Fault::None),
        go: go.clone(),
    });

    let first = fills.get(&digest, origin.clone()).await.unwrap();
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
    // The first write fails; it gives the file up before the window moves past byte 0, and
    // the window cannot move on before this reader does.
    let later = loop {
        let later = fills.get(&digest, origin.clone()).await.unwrap();
        if matches!(later, BlobSource::Filling { joined: false, .. }) {
            break later;
        }
        // Joined before the first write failed: let the writer go on.
        drop(later);
        tokio::task::yield_now().await;
    };
    let ended = loop {
        match body.next_chunk().await {
            Ok(Some(_)) => {}
            end => break end,
        }
    };
    assert!(ended.is_err(), "a corrupt pass-through body was completed");
    drop(later);
    assert_eq!(store.stat(&digest).await.unwrap(), None);
}

/// Both stores: the fill caches what a second origin sends, resumed where it broke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_body_is_resumed_from_the_byte_reached_on_either_store() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Storage::of(Arc::new(DiskStore::open(dir.path(), 1 << 30).unwrap()));
    let memory = Storage::of(Arc::new(MemoryStore::new(1 << 30)));
    for storage in [disk, memory] {
        let metrics = Arc::new(Metrics::new());
        let fills = fills_over(&storage, &metrics);
        let data = pattern(3 << 20, 241);
        let digest = Digest::of(&data);
        let origin = Arc::new(FixedOrigin::new(
            "fixed",
            data.clone(),
            100_000,
            Fault::BreakAfter(1 << 20),
        ));
        let got = read_all(fills.get(&digest, origin.clone()).await.unwrap()).await;
        assert!(got.unwrap() == data, "resumed bytes differ");
        assert_eq!(origin.fetches(), 2, "one fetch and one resume");
        fills.settled(&digest).await;
        let cached = fills.get(&digest, origin.clone()).await.unwrap();
        assert!(matches!(cached, BlobSource::Cached(_)));
        assert!(read_all(cached).await.unwrap() == data);
        assert_eq!(origin.fetches(), 2, "a cached blob was fetched again");
        let fetched = metrics.origin_bytes.with_label_values(&["fixed", "fixed"]);
        assert_eq!(fetched.get(), data.len() as u64, "bytes from the origin");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_that_is_not_the_rest_fails_every_reader_and_keeps_nothing() {
    let storage = Storage::of(Arc::new(MemoryStore::new(1 << 30)));
    let fills = fills_over(&storage, &Arc::new(Metrics::new()));
    let data = pattern(1 << 20, 239);
    let digest = Digest::of(&data);
    let origin = Arc::new(FixedOrigin::new(
        "fixed",
        data,
        64 * 1024,
        Fault::IgnoreRange(300_000),
    ));
    let got = read_all(fills.get(&digest, origin.clone()).await.unwrap()).await;
    let err = got.expect_err("a body without its rest was completed");
    assert!(err.to_string().contains("fixed fixed"), "{err}");
    fills.settled(&digest).await;
    assert_eq!(storage.blobs.stat(&digest).await.unwrap(), None);
    assert_eq!(storage.budget.usage().bytes, 0, "a reservation was kept");
}

/// The budget holds even for a blob whose length nobody stated: it is made room for as it
/// grows, and served but not kept once it outgrows the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_of_unknown_length_never_takes_the_cache_past_its_budget() {
    let memory = Arc::new(MemoryStore::new(1 << 20));
    let storage = Storage::of(memory.clone());
    let metrics = Arc::new(Metrics::new());
    let fills = fills_over(&storage, &metrics);
    let kept = pattern(1 << 19, 233);
    let small = Arc::new(FixedOrigin::new(
        "fixed",
        kept.clone(),
        65536,
        Fault::NoLength,
    ));
    let big_data = pattern(3 << 20, 229);
    let big = Arc::new(FixedOrigin::new(
        "fixed",
        big_data.clone(),
        65536,
        Fault::NoLength,
    ));
    let (kept_digest, big_digest) = (Digest::of(&kept), Digest::of(&big_data));

    assert!(
        read_all(fills.get(&kept_digest, small).await.unwrap())
            .await
            .unwrap()
            == kept
    );
    fills.settled(&kept_digest).await;
    assert_eq!(storage.budget.usage().bytes, kept.len() as u64);
    assert!(
        read_all(fills.get(&big_digest, big).await.unwrap())
            .await
            .unwrap()
            == big_data
    );
    fills.settled(&big_digest).await;
    assert_eq!(storage.blobs.stat(&big_digest).await.unwrap(), None);
    let usage = storage.budget.usage();
    assert!(usage.bytes <= usage.max_bytes, "{usage:?}");
    let errors = metrics
        .store_write_errors
        .with_label_values(&["blob", "io"]);
    assert_eq!(
        errors.get(),
        0,
        "outgrowing the budget is not a write error"
    );
}

/// The status page's view: a fill in flight with its readers, gone once it has committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_lists_each_fill_with_its_progress_and_readers() {
    let storage = Storage::of(Arc::new(MemoryStore::new(1 << 30)));
    let metrics = Arc::new(Metrics::new());
    let fills = fills_over(&storage, &metrics);
    let data = pattern(300_000, 253);
    let digest = Digest::of(&data);
    let (origin, go) = Gated::over(&data);
    let first = fills.get(&digest, origin.clone()).await.unwrap();
    let second = fills.get(&digest, origin.clone()).await.unwrap();
    let third = fills.get(&digest, origin.clone()).await.unwrap();
    drop(third);
    let listed = fills.in_flight(10);
    assert_eq!(listed.len(), 1);
    let fill = &listed[0];
    assert_eq!((&fill.digest, &*fill.origin.name), (&digest, "fixed"));
    assert_eq!(
        (fill.received, fill.len, fill.readers),
        (0, None, 2),
        "before the first byte"
    );
    assert!(fills.in_flight(0).is_empty(), "limited");
    go.notify_one();
    let (a, b) = tokio::join!(read_all(first), read_all(second));
    assert!(a.unwrap() == data && b.unwrap() == data);
    fills.settled(&digest).await;
    assert!(
        fills.in_flight(10).is_empty(),
        "a committed fill is still listed"
    );
}
