//! Content-addressed object storage: manifests and blobs are both kept by their sha256 digest.
//!
//! Three pieces, so that a store on local disk, in memory or in an object store fits the same
//! code above it:
//! - [`BlobStore`], the storage trait: look up, read (in chunks from any offset), write and
//!   remove objects. Every method is async, and reads go through an [`ObjectReader`], so an
//!   object store can implement it; the local disk's reader is a `pread` of an open file.
//! - [`Budget`], what a bounded store keeps within its size: uses for eviction order, pins and
//!   usage. Room for a new object is made by the store's own writer (see [`ObjectWriter`]), so
//!   the budget never reaches fill or mirror as anything but counters.
//! - [`Ingest`], an object being written, which hashes every byte on its way to the store's
//!   [`ObjectWriter`]. A store can only publish an object with the [`Verified`] proof that
//!   [`Ingest::verify`] hands out when the bytes matched, and only this module can make one: a
//!   mismatched object cannot be committed by any caller.

pub mod disk;
pub mod lock;
pub mod lru;
pub mod memory;

use std::collections::HashSet;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::oci::Digest;
use crate::oci::digest::DigestVerifier;

pub use disk::DiskStore;
pub use lock::CacheLock;
pub use memory::MemoryStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("content does not match {expected}: got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("{len} bytes cannot be kept in a cache of {max} bytes (less what is pinned)")]
    TooLarge { len: u64, max: u64 },
    /// Room for `len` more bytes cannot be made now: everything evictable is gone and the rest
    /// is pinned or promised to fills in flight.
    #[error(
        "no room for {len} more bytes: the cache of {max} bytes is held by pins and fills in flight"
    )]
    NoRoom { len: u64, max: u64 },
    #[error("cache I/O error: {0}")]
    Io(#[from] io::Error),
}

/// A committed object opened for reading.
pub struct Object {
    pub len: u64,
    pub reader: Arc<dyn ObjectReader>,
}

/// Reads of an object's bytes, from any offset. A reader of an object that is removed or
/// evicted meanwhile keeps reading what it opened (local disk: the file lives until its last
/// descriptor closes).
#[async_trait]
pub trait ObjectReader: Send + Sync {
    /// `len` bytes from `pos` (the caller knows they exist). `spare` is a buffer the reader may
    /// fill and hand back for the next read, so a steady stream does not allocate per chunk.
    async fn read(
        &self,
        pos: u64,
        len: usize,
        spare: BytesMut,
    ) -> Result<(Bytes, BytesMut), StoreError>;
}

/// The storage trait. Implementations: [`DiskStore`] (local disk) and [`MemoryStore`].
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The size of a committed object, if present. Not a use for eviction.
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError>;

    /// Open a committed object, counting as a use for eviction. `Ok(None)` when it is not in
    /// the store.
    async fn open(&self, digest: &Digest) -> Result<Option<Object>, StoreError>;

    /// Like [`BlobStore::open`], without counting as a use (tools, inventory walks).
    async fn peek(&self, digest: &Digest) -> Result<Option<Object>, StoreError>;

    /// Start writing an object that must hash to `digest`. Dropping the ingest without a
    /// commit discards everything written.
    async fn ingest(&self, digest: &Digest) -> Result<Ingest, StoreError>;

    /// Delete a committed object; its size if it was there.
    async fn remove(&self, digest: &Digest) -> Result<Option<u64>, StoreError>;

    /// Every committed object with its size; a bounded store lists the next to be evicted
    /// first.
    async fn list(&self) -> Result<Vec<(Digest, u64)>, StoreError>;

    /// Whether the store can take writes now (for `/readyz`).
    async fn ready(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// A whole object of at most `limit` bytes into memory (manifests); `Ok(None)` when it is
    /// not there or larger. Not a use for eviction.
    async fn read_small(&self, digest: &Digest, limit: u64) -> Result<Option<Bytes>, StoreError> {
        match self.peek(digest).await? {
            Some(obj) if obj.len <= limit => {
                let (bytes, _) = obj
                    .reader
                    .read(0, obj.len as usize, BytesMut::new())
                    .await?;
                Ok(Some(bytes))
            }
            _ => Ok(None),
        }
    }

    /// Store a complete in-memory object (manifests), verified like any ingest.
    async fn put(&self, digest: &Digest, bytes: Bytes) -> Result<(), StoreError> {
        let mut ingest = self.ingest(digest).await?;
        let (ingest, verified) = tokio::task::spawn_blocking(move || {
            ingest.write(&bytes)?;
            let verified = ingest.verify()?;
            Ok::<_, StoreError>((ingest, verified))
        })
        .await
        .map_err(io::Error::other)??;
        ingest.commit(verified).await.map(|_| ())
    }
}

/// A blocking [`std::io::Read`] over a stored object, for code that hands its bytes to a
/// synchronous writer (the export's tar). Use it only on a blocking thread of a runtime.
pub struct BlockingRead {
    obj: Object,
    pos: u64,
    runtime: tokio::runtime::Handle,
    current: Bytes,
    spare: BytesMut,
}

impl BlockingRead {
    /// How much one read from the store fetches.
    const CHUNK: u64 = 1024 * 1024;

    pub fn new(obj: Object, runtime: tokio::runtime::Handle) -> BlockingRead {
        BlockingRead {
            obj,
            pos: 0,
            runtime,
            current: Bytes::new(),
            spare: BytesMut::new(),
        }
    }
}

impl io::Read for BlockingRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.current.is_empty() && self.pos < self.obj.len {
            let len = (self.obj.len - self.pos).min(Self::CHUNK) as usize;
            let spare = std::mem::take(&mut self.spare);
            let read = self.obj.reader.read(self.pos, len, spare);
            let (bytes, spare) = self.runtime.block_on(read).map_err(io::Error::other)?;
            self.pos += bytes.len() as u64;
            (self.current, self.spare) = (bytes, spare);
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// A store and its budget, as the mirror holds them (one object for both, on disk or in
/// memory).
#[derive(Clone)]
pub struct Storage {
    pub blobs: Arc<dyn BlobStore>,
    pub budget: Arc<dyn Budget>,
}

impl Storage {
    pub fn of<S: BlobStore + Budget>(store: Arc<S>) -> Storage {
        Storage {
            blobs: store.clone(),
            budget: store,
        }
    }
}

/// What a size-bounded store keeps within its budget. The budget itself (making room before a
/// write, evicting least recently used objects) is enforced by the store's writers.
pub trait Budget: Send + Sync + 'static {
    /// Count a use of an object served without opening it (a manifest from memory).
    fn touch(&self, digest: &Digest);

    /// Objects that must never be evicted; replaces the previous set.
    fn set_pins(&self, pins: HashSet<Digest>);

    fn usage(&self) -> Usage;

    /// Persist the eviction order if it changed (blocking); whether it wrote anything.
    fn save(&self) -> io::Result<bool>;
}

/// What the store holds and has let go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub objects: u64,
    pub max_bytes: u64,
    pub pinned_bytes: u64,
    /// Since start.
    pub evicted_objects: u64,
    pub evicted_bytes: u64,
    /// Evicted objects whose files are still on disk, waiting to be deleted (out of `bytes`).
    pub unlinks_pending: u64,
    /// The index holds every object on disk. False for a while after a start, while the
    /// files are checked against the saved order; `bytes` and `objects` may then be short.
    pub index_checked: bool,
}

/// What a store has evicted since it opened: the counters behind [`Usage`].
#[derive(Debug, Default)]
pub struct Evictions {
    objects: AtomicU64,
    bytes: AtomicU64,
}

impl Evictions {
    pub fn count(&self, objects: u64, bytes: u64) {
        self.objects.fetch_add(objects, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A store's usage: what its `index` holds and these counts; `unlinks_pending` and
    /// `index_checked` as for a store that has neither a deleter nor files to check.
    pub fn usage(&self, index: &lru::LruIndex) -> Usage {
        let (bytes, objects) = index.usage();
        Usage {
            bytes,
            objects,
            max_bytes: index.max_bytes(),
            pinned_bytes: index.pinned_bytes(),
            evicted_objects: self.objects.load(Ordering::Relaxed),
            evicted_bytes: self.bytes.load(Ordering::Relaxed),
            unlinks_pending: 0,
            index_checked: true,
        }
    }
}

/// Proof that an ingest's bytes hashed to its digest. Only [`Ingest::verify`] and
/// [`Hasher::finish`] make one, and a store's [`ObjectWriter::commit`] takes it: nothing can
/// publish an object without it.
#[derive(Debug)]
pub struct Verified {
    /// The [`Ingest`] that made it: a proof is good for that ingest's bytes only.
    ingest: u64,
    digest: Digest,
    len: u64,
}

impl Verified {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A store's side of an object being written, behind [`Ingest`] (which hashes).
#[async_trait]
pub trait ObjectWriter: Send {
    /// Reads of the bytes written so far, valid after commit or discard; `None` when the store
    /// cannot read an object before it is committed (the fill then keeps what its readers need
    /// in memory).
    fn reader(&self) -> Option<Arc<dyn ObjectReader>>;

    /// Make room for an object of `len` bytes before writing it, evicting others as needed.
    /// [`StoreError::TooLarge`] when it can never be kept.
    async fn reserve(&mut self, len: u64) -> Result<(), StoreError>;

    /// Append bytes; they are readable through [`ObjectWriter::reader`] once this returns.
    /// Blocking: called from a blocking thread. Writing past a reservation makes room first.
    fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError>;

    /// Give up this object after a failed write: what was written goes and the room is given
    /// back (open readers keep what they have).
    fn discard(&mut self);

    /// Keep writing, but outside the budget: the object will not be committed (it can never
    /// fit, or the room is taken), and its bytes are only there for the readers following it.
    /// Gives back what was reserved.
    fn unbudgeted(&mut self);

    /// Bytes written so far.
    fn written(&self) -> u64;

    /// Make the object durable and visible under `proof.digest()`.
    async fn commit(self: Box<Self>, proof: Verified) -> Result<u64, StoreError>;
}

/// An object being written: every byte is hashed on its way to the store, and only bytes that
/// matched the digest can be committed.
pub struct Ingest {
    /// Unique in this process, so a proof cannot be passed to another ingest.
    id: u64,
    digest: Digest,
    /// `None` once verified, or once taken to hash on another thread ([`Ingest::take_hasher`]).
    hasher: Option<Hasher>,
    writer: Box<dyn ObjectWriter>,
    /// Given up after a failed write: later bytes are only hashed.
    discarded: bool,
    /// Why it is written outside the budget and will not be committed, if it is.
    spooled: Option<StoreError>,
}

/// The hashing half of an [`Ingest`]. Taken out, it lets a fill hash on one thread while it
/// writes on another; its proof then commits only if the ingest wrote exactly the bytes it
/// hashed, as many of them (the fill hands both the same immutable buffers, in order).
pub struct Hasher {
    ingest: u64,
    digest: Digest,
    verifier: DigestVerifier,
    hashed: u64,
}

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.verifier.update(bytes);
        self.hashed += bytes.len() as u64;
    }

    pub fn hashed(&self) -> u64 {
        self.hashed
    }

    /// Check everything hashed against the digest.
    pub fn finish(self) -> Result<Verified, StoreError> {
        let actual = self.verifier.finish();
        if actual != self.digest {
            return Err(StoreError::DigestMismatch {
                expected: self.digest,
                actual,
            });
        }
        Ok(Verified {
            ingest: self.ingest,
            digest: actual,
            len: self.hashed,
        })
    }
}

impl Ingest {
    /// For store implementations: wrap their writer.
    pub fn new(digest: &Digest, writer: Box<dyn ObjectWriter>) -> Ingest {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ingest {
            id,
            digest: digest.clone(),
            hasher: Some(Hasher {
                ingest: id,
                digest: digest.clone(),
                verifier: DigestVerifier::new(),
                hashed: 0,
            }),
            writer,
            discarded: false,
            spooled: None,
        }
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Put a decorator around the store's writer (tests inject write faults this way).
    #[cfg(test)]
    pub(crate) fn wrap_writer(
        self,
        wrap: impl FnOnce(Box<dyn ObjectWriter>) -> Box<dyn ObjectWriter>,
    ) -> Ingest {
        Ingest {
            writer: wrap(self.writer),
            ..self
        }
    }

    /// Reads of the bytes written so far (see [`ObjectWriter::reader`]).
    pub fn reader(&self) -> Option<Arc<dyn ObjectReader>> {
        self.writer.reader()
    }

    /// Set aside room for `len` bytes (see [`ObjectWriter::reserve`]).
    pub async fn reserve(&mut self, len: u64) -> Result<(), StoreError> {
        self.writer.reserve(len).await
    }

    /// Hash and append bytes (only append, once the hasher is taken). Blocking: call it from
    /// a blocking thread. After an error nothing more is written, but what was passed is still
    /// hashed, so [`Ingest::verify`] still tells whether the bytes were right.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        if let Some(hasher) = self.hasher.as_mut() {
            hasher.update(bytes);
        }
        if self.discarded {
            return Ok(());
        }
        let mut written = self.writer.write(bytes);
        if let Err(e @ (StoreError::TooLarge { .. } | StoreError::NoRoom { .. })) = written {
            // No room for it: readers may still be following it, so it is written on.
            self.spool(e);
            written = self.writer.write(bytes);
        }
        if written.is_err() {
            self.discard();
        }
        written
    }

    /// Take the hashing half out, to hash on another thread; [`Ingest::write`] then only
    /// appends, and the proof comes from [`Hasher::finish`]. Taken before the first write.
    pub fn take_hasher(&mut self) -> Option<Hasher> {
        if self.hasher.as_ref()?.hashed != 0 {
            return None;
        }
        self.hasher.take()
    }

    /// Write on outside the budget, never to be committed, because of `reason` (see
    /// [`ObjectWriter::unbudgeted`]).
    pub fn spool(&mut self, reason: StoreError) {
        if self.spooled.is_none() {
            self.writer.unbudgeted();
            self.spooled = Some(reason);
        }
    }

    /// Why the ingest will not be committed although it is being written, if it is spooled.
    pub fn spooled(&self) -> Option<&StoreError> {
        self.spooled.as_ref()
    }

    /// Give up keeping this object (see [`ObjectWriter::discard`]); later writes only hash.
    pub fn discard(&mut self) {
        if !std::mem::replace(&mut self.discarded, true) {
            self.writer.discard();
        }
    }

    pub fn is_discarded(&self) -> bool {
        self.discarded
    }

    /// Bytes in the store so far.
    pub fn written(&self) -> u64 {
        self.writer.written()
    }

    /// Check everything passed to [`Ingest::write`] against the digest; no more writes after
    /// this. Separate from [`Ingest::commit`] so readers can be told the bytes are right before
    /// they are durable.
    pub fn verify(&mut self) -> Result<Verified, StoreError> {
        self.hasher
            .take()
            .ok_or_else(|| io::Error::other("verified twice, or hashed elsewhere"))?
            .finish()
    }

    /// Flush to stable storage and make the verified object visible. Refused for a discarded
    /// ingest, whose bytes are not all in the store.
    pub async fn commit(self, proof: Verified) -> Result<u64, StoreError> {
        let holds = proof.ingest == self.id && self.writer.written() == proof.len;
        if let Some(reason) = self.spooled {
            return Err(reason);
        }
        if self.discarded || !holds {
            return Err(io::Error::other(
                "commit of an ingest that does not hold the verified bytes",
            )
            .into());
        }
        self.writer.commit(proof).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn each_store(test: impl AsyncFn(&dyn BlobStore)) {
        let dir = tempfile::tempdir().unwrap();
        test(&DiskStore::open(dir.path(), 1 << 20).unwrap()).await;
        test(&MemoryStore::new(1 << 20)).await;
    }

    #[tokio::test]
    async fn a_verified_object_reads_back_from_any_offset() {
        each_store(async |store: &dyn BlobStore| {
            let data = Bytes::from_static(b"0123456789");
            let digest = Digest::of(&data);
            assert!(store.open(&digest).await.unwrap().is_none());
            store.put(&digest, data.clone()).await.unwrap();
            assert_eq!(store.stat(&digest).await.unwrap(), Some(10));
            let obj = store.open(&digest).await.unwrap().unwrap();
            let (bytes, _) = obj.reader.read(3, 4, BytesMut::new()).await.unwrap();
            assert_eq!(&bytes[..], b"3456");
            assert_eq!(store.list().await.unwrap(), vec![(digest.clone(), 10)]);
            assert_eq!(store.remove(&digest).await.unwrap(), Some(10));
            assert_eq!(store.stat(&digest).await.unwrap(), None);
        })
        .await;
    }

    #[tokio::test]
    async fn mismatched_bytes_get_no_proof_and_are_never_visible() {
        each_store(async |store: &dyn BlobStore| {
            let digest = Digest::of(b"right");
            let mut ingest = store.ingest(&digest).await.unwrap();
            ingest.write(b"wrong").unwrap();
            assert!(matches!(
                ingest.verify(),
                Err(StoreError::DigestMismatch { .. })
            ));
            drop(ingest);
            assert_eq!(store.stat(&digest).await.unwrap(), None);
            let err = store.put(&digest, Bytes::from_static(b"wrong")).await;
            assert!(matches!(err, Err(StoreError::DigestMismatch { .. })));
            assert!(store.list().await.unwrap().is_empty());
        })
        .await;
    }

    #[tokio::test]
    async fn a_discarded_ingest_still_verifies_but_never_commits() {
        each_store(async |store: &dyn BlobStore| {
            let data = b"all of it";
            let digest = Digest::of(data);
            let mut ingest = store.ingest(&digest).await.unwrap();
            ingest.write(&data[..3]).unwrap();
            ingest.discard();
            ingest.write(&data[3..]).unwrap();
            let proof = ingest.verify().expect("the bytes were right");
            assert!(ingest.commit(proof).await.is_err());
            assert_eq!(store.stat(&digest).await.unwrap(), None);
        })
        .await;
    }

    #[tokio::test]
    async fn an_object_with_no_room_is_written_for_its_readers_but_never_kept() {
        each_store(async |store: &dyn BlobStore| {
            // Written in parts, as a blob without a Content-Length is: the second part no
            // longer fits the 1 MiB budget.
            let part = vec![5u8; 600 * 1024];
            let whole = [part.clone(), part.clone()].concat();
            let digest = Digest::of(&whole);
            let mut ingest = store.ingest(&digest).await.unwrap();
            let reader = ingest.reader().unwrap();
            ingest.write(&part).unwrap();
            assert!(ingest.spooled().is_none());
            ingest.write(&part).unwrap();
            assert!(matches!(
                ingest.spooled(),
                Some(StoreError::TooLarge { .. })
            ));
            let (tail, _) = reader
                .read(whole.len() as u64 - 4, 4, BytesMut::new())
                .await
                .unwrap();
            assert_eq!(
                &tail[..],
                &whole[whole.len() - 4..],
                "a reader lost the spooled bytes"
            );
            let proof = ingest.verify().unwrap();
            let err = ingest.commit(proof).await.unwrap_err();
            assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
            assert_eq!(store.stat(&digest).await.unwrap(), None);
            assert!(store.list().await.unwrap().is_empty());
        })
        .await;
    }
}
