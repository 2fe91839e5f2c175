//! Content-addressed object storage: manifests and blobs are both kept by their sha256 digest.
//!
//! [`BlobStore`] is the one storage trait; [`disk::DiskStore`] is its local-disk implementation.
//! An object only becomes visible through [`Ingest::commit`], which checks the bytes written
//! against the digest the ingest was opened for, so the store never holds a mismatched object.

pub mod disk;
pub mod lock;
pub mod lru;

use std::collections::HashSet;
use std::fs::File;
use std::io;

use async_trait::async_trait;
use bytes::Bytes;

use crate::oci::Digest;

pub use disk::DiskStore;
pub use lock::CacheLock;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("content does not match {expected}: got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("{len} bytes cannot be kept in a cache of {max} bytes (less what is pinned)")]
    TooLarge { len: u64, max: u64 },
    #[error("cache I/O error: {0}")]
    Io(#[from] io::Error),
}

/// A committed object opened for reading.
pub struct StoredObject {
    pub file: File,
    pub len: u64,
}

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The size of a committed object, if present.
    fn size_of(&self, digest: &Digest) -> Option<u64>;

    /// Open a committed object, counting as a use for eviction. `Ok(None)` when it is not in
    /// the store.
    async fn open(&self, digest: &Digest) -> Result<Option<StoredObject>, StoreError>;

    /// Start writing an object that must hash to `digest`. Dropping the ingest without a
    /// successful commit discards everything written. Synchronous (it only creates a file) so a
    /// caller can check for an object and start writing it under one lock.
    fn ingest(&self, digest: &Digest) -> Result<Box<dyn Ingest>, StoreError>;

    /// Store a complete in-memory object (manifests), verified like any ingest.
    async fn put(&self, digest: &Digest, bytes: Bytes) -> Result<(), StoreError> {
        let mut ingest = self.ingest(digest)?;
        let ingest = tokio::task::spawn_blocking(move || {
            ingest.write(&bytes)?;
            ingest.verify()?;
            Ok::<_, StoreError>(ingest)
        })
        .await
        .map_err(io::Error::other)??;
        ingest.commit().await.map(|_| ())
    }

    /// Count a use of an object served without opening it (a manifest from memory).
    fn touch(&self, digest: &Digest);

    /// Delete a committed object; its size if it was there.
    async fn remove(&self, digest: &Digest) -> Result<Option<u64>, StoreError>;

    /// Objects that must never be evicted; replaces the previous set.
    fn set_pins(&self, pins: HashSet<Digest>);

    /// Every committed object with its size, the next to be evicted first.
    fn list(&self) -> Vec<(Digest, u64)>;

    fn usage(&self) -> Usage;
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
}

/// An object being written. Readers may follow its growth through [`Ingest::reader`].
#[async_trait]
pub trait Ingest: Send {
    /// A new read handle on the bytes written so far (and later): valid even after commit
    /// renames the file or an abort unlinks it.
    fn reader(&self) -> io::Result<File>;

    /// Set aside room for an object of `len` bytes before writing it, evicting others as
    /// needed. [`StoreError::TooLarge`] when it can never be kept: it may still be written and
    /// verified (readers may be following it), but it will not commit.
    async fn reserve(&mut self, len: u64) -> Result<(), StoreError>;

    /// Hash and append bytes. They are readable through [`Ingest::reader`] handles once this
    /// returns. Blocking (it writes to disk): call it from a blocking thread. After an error,
    /// nothing more is written, but what was passed is still hashed.
    fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError>;

    /// Give up keeping this object, after a failed write: the temp file is deleted (open read
    /// handles keep what they have) and the reservation is given back. Later writes only hash,
    /// so [`Ingest::verify`] still tells whether the bytes were right; commit is refused.
    fn discard(&mut self);

    /// Bytes in the file so far (and readable through [`Ingest::reader`] handles).
    fn written(&self) -> u64;

    /// Check everything passed to [`Ingest::write`] against the digest and return its length;
    /// no more writes after this. Separate from
    /// [`Ingest::commit`] so readers can be told the bytes are right before they are durable.
    fn verify(&mut self) -> Result<u64, StoreError>;

    /// Flush to stable storage and make the verified object visible.
    async fn commit(self: Box<Self>) -> Result<u64, StoreError>;
}
