//! Content-addressed object storage: manifests and blobs are both kept by their sha256 digest.
//!
//! [`BlobStore`] is the one storage trait; [`disk::DiskStore`] is its local-disk implementation.
//! An object only becomes visible through [`Ingest::commit`], which checks the bytes written
//! against the digest the ingest was opened for, so the store never holds a mismatched object.

pub mod disk;

use std::fs::File;
use std::io;

use async_trait::async_trait;
use bytes::Bytes;

use crate::oci::Digest;

pub use disk::DiskStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("content does not match {expected}: got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
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

    /// Open a committed object. `Ok(None)` when it is not in the store.
    async fn open(&self, digest: &Digest) -> Result<Option<StoredObject>, StoreError>;

    /// Start writing an object that must hash to `digest`. Dropping the ingest without a
    /// successful commit discards everything written. Synchronous (it only creates a file) so a
    /// caller can check for an object and start writing it under one lock.
    fn ingest(&self, digest: &Digest) -> Result<Box<dyn Ingest>, StoreError>;

    /// Store a complete in-memory object (manifests), verified like any ingest.
    async fn put(&self, digest: &Digest, bytes: Bytes) -> Result<(), StoreError> {
        let mut ingest = self.ingest(digest)?;
        ingest.write(bytes).await?;
        ingest.verify()?;
        ingest.commit().await.map(|_| ())
    }

    /// Total bytes and count of committed objects.
    fn usage(&self) -> (u64, u64);
}

/// An object being written. Readers may follow its growth through [`Ingest::reader`].
#[async_trait]
pub trait Ingest: Send {
    /// A new read handle on the bytes written so far (and later): valid even after commit
    /// renames the file or an abort unlinks it.
    fn reader(&self) -> io::Result<File>;

    /// Append bytes. They are readable through [`Ingest::reader`] handles once this returns.
    async fn write(&mut self, bytes: Bytes) -> Result<(), StoreError>;

    /// Bytes written so far.
    fn written(&self) -> u64;

    /// Check everything written against the digest; no more writes after this. Separate from
    /// [`Ingest::commit`] so readers can be told the bytes are right before they are durable.
    fn verify(&mut self) -> Result<u64, StoreError>;

    /// Flush to stable storage and make the verified object visible.
    async fn commit(self: Box<Self>) -> Result<u64, StoreError>;
}
