//! An in-memory [`BlobStore`] and [`Budget`]: objects are `Bytes` in a map, bounded by the same
//! [`LruIndex`] as the disk store. It keeps nothing across a restart; it exists so that the
//! code above the store is exercised against a second implementation (the in-process mirror
//! suite runs on it), and as the model of what a store must do.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use super::lru::{Evicted, LruIndex};
use super::{
    BlobStore, Budget, Evictions, Ingest, Object, ObjectReader, ObjectWriter, StoreError, Usage,
    Verified,
};
use crate::oci::Digest;

pub struct MemoryStore {
    shared: Arc<Shared>,
}

struct Shared {
    index: LruIndex,
    objects: Mutex<HashMap<Digest, Bytes>>,
    evictions: Evictions,
}

impl Shared {
    fn objects(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Bytes>> {
        self.objects.lock().expect("memory store lock")
    }

    fn delete(&self, evicted: Evicted) {
        let mut objects = self.objects();
        for (digest, len) in evicted {
            // Evicted, then committed again meanwhile: the entry is the new copy.
            if self.index.get(&digest).is_none() && objects.remove(&digest).is_some() {
                self.evictions.count(1, len);
            }
        }
    }
}

impl MemoryStore {
    pub fn new(max_bytes: u64) -> MemoryStore {
        MemoryStore {
            shared: Arc::new(Shared {
                index: LruIndex::new(max_bytes),
                objects: Mutex::new(HashMap::new()),
                evictions: Evictions::default(),
            }),
        }
    }
}

#[async_trait]
impl BlobStore for MemoryStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        Ok(self.shared.index.get(digest))
    }

    async fn open(&self, digest: &Digest) -> Result<Option<Object>, StoreError> {
        self.shared.index.touch(digest);
        self.peek(digest).await
    }

    async fn peek(&self, digest: &Digest) -> Result<Option<Object>, StoreError> {
        let Some(bytes) = self.shared.objects().get(digest).cloned() else {
            return Ok(None);
        };
        let len = bytes.len() as u64;
        Ok(Some(Object {
            len,
            reader: Arc::new(Committed(bytes)),
        }))
    }

    async fn ingest(&self, digest: &Digest) -> Result<Ingest, StoreError> {
        let writer = MemoryWriter {
            digest: digest.clone(),
            data: Arc::new(Mutex::new(Vec::new())),
            reserved: 0,
            shared: self.shared.clone(),
            done: false,
            unbudgeted: false,
        };
        Ok(Ingest::new(digest, Box::new(writer)))
    }

    async fn remove(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let mut objects = self.shared.objects();
        let len = self.shared.index.remove(digest);
        objects.remove(digest);
        Ok(len)
    }

    async fn list(&self) -> Result<Vec<(Digest, u64)>, StoreError> {
        Ok(self.shared.index.order())
    }
}

impl Budget for MemoryStore {
    fn touch(&self, digest: &Digest) {
        self.shared.index.touch(digest);
    }

    fn set_pins(&self, pins: HashSet<Digest>) {
        let evicted = self.shared.index.set_pins(pins);
        self.shared.delete(evicted);
    }

    fn usage(&self) -> Usage {
        self.shared.evictions.usage(&self.shared.index)
    }

    fn save(&self) -> io::Result<bool> {
        Ok(false)
    }
}

/// A committed object: reads are slices, without a copy.
struct Committed(Bytes);

#[async_trait]
impl ObjectReader for Committed {
    async fn read(
        &self,
        pos: u64,
        len: usize,
        spare: BytesMut,
    ) -> Result<(Bytes, BytesMut), StoreError> {
        let start = pos as usize;
        let end = start
            .checked_add(len)
            .filter(|end| *end <= self.0.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        Ok((self.0.slice(start..end), spare))
    }
}

/// An object being written: readers copy from the growing buffer.
struct Growing(Arc<Mutex<Vec<u8>>>);

#[async_trait]
impl ObjectReader for Growing {
    async fn read(
        &self,
        pos: u64,
        len: usize,
        mut spare: BytesMut,
    ) -> Result<(Bytes, BytesMut), StoreError> {
        let data = self.0.lock().expect("ingest buffer lock");
        let start = pos as usize;
        let bytes = start
            .checked_add(len)
            .and_then(|end| data.get(start..end))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        spare.clear();
        spare.extend_from_slice(bytes);
        Ok((spare.split().freeze(), spare))
    }
}

struct MemoryWriter {
    digest: Digest,
    data: Arc<Mutex<Vec<u8>>>,
    reserved: u64,
    shared: Arc<Shared>,
    /// Committed or discarded: the reservation is settled.
    done: bool,
    /// Written outside the budget: never committed.
    unbudgeted: bool,
}

impl MemoryWriter {
    fn len(&self) -> u64 {
        self.data.lock().expect("ingest buffer lock").len() as u64
    }
}

#[async_trait]
impl ObjectWriter for MemoryWriter {
    fn reader(&self) -> Option<Arc<dyn ObjectReader>> {
        Some(Arc::new(Growing(self.data.clone())))
    }

    async fn reserve(&mut self, len: u64) -> Result<(), StoreError> {
        let more = len.saturating_sub(self.reserved);
        let evicted = self.shared.index.reserve(more, len)?;
        self.reserved += more;
        self.shared.delete(evicted);
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let end = self.len() + bytes.len() as u64;
        if end > self.reserved && !self.unbudgeted {
            let evicted = self.shared.index.reserve(end - self.reserved, end)?;
            self.reserved = end;
            self.shared.delete(evicted);
        }
        self.data
            .lock()
            .expect("ingest buffer lock")
            .extend_from_slice(bytes);
        Ok(())
    }

    fn discard(&mut self) {
        if !std::mem::replace(&mut self.done, true) {
            self.shared
                .index
                .release(std::mem::take(&mut self.reserved));
        }
    }

    fn unbudgeted(&mut self) {
        self.unbudgeted = true;
        self.shared
            .index
            .release(std::mem::take(&mut self.reserved));
    }

    fn written(&self) -> u64 {
        self.len()
    }

    async fn commit(mut self: Box<Self>, proof: Verified) -> Result<u64, StoreError> {
        if self.done || self.unbudgeted || proof.digest() != &self.digest {
            return Err(io::Error::other("commit of a discarded or another object").into());
        }
        self.done = true;
        // A copy: readers of the ingest keep the buffer they were following.
        let bytes = Bytes::copy_from_slice(&self.data.lock().expect("ingest buffer lock"));
        let len = bytes.len() as u64;
        let evicted = {
            let mut objects = self.shared.objects();
            objects.insert(self.digest.clone(), bytes);
            let reserved = std::mem::take(&mut self.reserved);
            self.shared.index.insert(self.digest.clone(), len, reserved)
        };
        self.shared.delete(evicted);
        Ok(len)
    }
}

impl Drop for MemoryWriter {
    fn drop(&mut self) {
        self.discard();
    }
}
