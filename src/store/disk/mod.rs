//! Local-disk [`BlobStore`] and [`Budget`]: `<dir>/objects/sha256/<first two hex>/<hex>` for committed objects,
//! `<dir>/tmp/` for ingests in progress, `<dir>/lru` for the eviction order at the last save.
//! Objects and temp files live on one filesystem, so commit is a rename.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use async_trait::async_trait;
use tokio::sync::watch;
use tracing::{info, warn};

use super::lru::LruIndex;
use bytes::{Bytes, BytesMut};

use super::{
    BlobStore, Budget, Evictions, Ingest, Object, ObjectReader, ObjectWriter, StoreError, Usage,
    Verified,
};
use crate::oci::Digest;
use deleter::{Deleter, Pending};
use reconcile::Reconcile;

mod deleter;
mod reconcile;
#[cfg(test)]
mod tests;

const ORDER_FILE: &str = "lru";
const ORDER_HEADER: &str = "dockside-lru 1";
/// Evicted objects unlinked under one namespace lock (about a millisecond of unlinks).
const UNLINK_BATCH: usize = 64;

pub struct DiskStore {
    shared: Arc<Shared>,
}

/// What the store and its ingests share.
struct Shared {
    root: PathBuf,
    index: LruIndex,
    /// Held while a name under `objects/` appears or disappears, so an eviction cannot unlink
    /// a file that a concurrent commit of the same digest has just renamed into place.
    namespace: Mutex<()>,
    evictions: Evictions,
    deleter: Deleter,
    /// The index holds every object on disk: false from open until the background check of
    /// the saved order against the files is done ([`DiskStore::open`]).
    complete: watch::Sender<bool>,
}

impl DiskStore {
    /// Open (creating if needed) a store under `root` holding at most `max_bytes`: removes
    /// leftover temp files, indexes the objects in the order saved in `lru`, and evicts
    /// whatever no longer fits. A thread then checks the index against `objects/` (files the
    /// order did not list are added as the oldest of the newer ones, by modification time;
    /// listed ones that are gone are forgotten). Until it is done, a lookup the index misses
    /// looks at the file, and [`BlobStore::list`] waits ([`DiskStore::reconciled`]).
    pub fn open(root: &Path, max_bytes: u64) -> io::Result<DiskStore> {
        DiskStore::open_with(root, max_bytes, true)
    }

    /// Like [`DiskStore::open`] while the server being upgraded still fills into `tmp/`: its
    /// temp files are left alone (the next plain start removes whatever it left behind).
    pub fn open_beside_running(root: &Path, max_bytes: u64) -> io::Result<DiskStore> {
        DiskStore::open_with(root, max_bytes, false)
    }

    fn open_with(root: &Path, max_bytes: u64, clean_tmp: bool) -> io::Result<DiskStore> {
        let store = DiskStore::open_unchecked(root, max_bytes, clean_tmp)?;
        Reconcile::start(store.shared.clone())?;
        Ok(store)
    }

    /// [`DiskStore::open`] up to the check of the index against the files.
    fn open_unchecked(root: &Path, max_bytes: u64, clean_tmp: bool) -> io::Result<DiskStore> {
        let (queue, evicted) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            index: LruIndex::new(max_bytes),
            namespace: Mutex::new(()),
            evictions: Evictions::default(),
            deleter: Deleter {
                queue: Mutex::new(queue),
                pending: Mutex::new(Pending::default()),
                drained: Condvar::new(),
            },
            complete: watch::Sender::new(false),
        });
        Deleter::start(Arc::downgrade(&shared), evicted)?;
        let store = DiskStore { shared };
        if clean_tmp {
            store.clean_tmp()?;
        } else {
            fs::create_dir_all(store.shared.tmp_dir())?;
        }
        fs::create_dir_all(store.shared.objects_dir())?;
        store.load_saved_order();
        Ok(store)
    }

    fn clean_tmp(&self) -> io::Result<()> {
        let tmp = self.shared.tmp_dir();
        if tmp.exists() {
            let removed = fs::read_dir(&tmp)?.filter_map(Result::ok).count();
            fs::remove_dir_all(&tmp)?;
            if removed > 0 {
                info!(removed, "removed leftover temp files from an earlier run");
            }
        }
        fs::create_dir_all(&tmp)
    }

    /// Index the objects the saved order lists, in that order (their size is taken from it:
    /// a digest names its content, so it names its size), and evict what no longer fits. The
    /// files themselves are checked afterwards, in the background ([`Reconcile`]): listing a
    /// million names takes seconds, and requests are served meanwhile.
    fn load_saved_order(&self) {
        let saved = self.read_order().unwrap_or_else(|e| {
            warn!(error = %e, "could not read the saved eviction order; using file times");
            Vec::new()
        });
        let evicted = self.shared.index.load(saved);
        self.shared.delete(evicted);
        let (bytes, objects) = self.shared.index.usage();
        info!(objects, bytes, "cache index loaded from the saved order");
    }

    /// Wait until the index holds every object on disk (see [`DiskStore::open`]).
    pub async fn reconciled(&self) {
        let mut complete = self.shared.complete.subscribe();
        let _ = complete.wait_for(|done| *done).await;
    }

    /// The saved order, read at once: a million lines are ~80 MB, parsed in a pass.
    fn read_order(&self) -> io::Result<Vec<(Digest, u64)>> {
        let path = self.shared.root.join(ORDER_FILE);
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut lines = text.split(|&b| b == b'\n').filter(|line| !line.is_empty());
        if lines.next() != Some(ORDER_HEADER.as_bytes()) {
            return Err(io::Error::other(format!(
                "{}: unknown format",
                path.display()
            )));
        }
        let mut order = Vec::with_capacity(text.len() / 80);
        for line in lines {
            let parsed = std::str::from_utf8(line).ok().and_then(|line| {
                let (hex, len) = line.split_once(' ')?;
                Some((Digest::from_hex(hex).ok()?, len.parse::<u64>().ok()?))
            });
            match parsed {
                Some(entry) => order.push(entry),
                None => {
                    let line = String::from_utf8_lossy(line);
                    warn!(path = %path.display(), %line, "ignoring a bad line");
                }
            }
        }
        Ok(order)
    }

    /// Write the eviction order to `<dir>/lru` if it changed since the last save, atomically
    /// (a crash leaves the previous save). Blocking; call it from a blocking thread.
    pub fn save_order(&self) -> io::Result<bool> {
        // A file left behind by an eviction would come back, as new, on the next start.
        self.shared.wait_for_unlinks();
        // Until the files are checked the index may lack objects: saved now, the next start
        // would take them for newer than everything saved. The last save stays.
        if !self.shared.index.changed() || !*self.shared.complete.borrow() {
            return Ok(false);
        }
        let order = self.shared.index.snapshot();
        let tmp = self.tmp_probe_path();
        let mut out = BufWriter::new(File::create(&tmp)?);
        writeln!(out, "{ORDER_HEADER}")?;
        for (digest, len) in &order {
            writeln!(out, "{} {len}", digest.hex())?;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&tmp, self.shared.root.join(ORDER_FILE))?;
        Ok(true)
    }

    /// A scratch path on the cache's filesystem, for readiness checks and atomic writes.
    pub fn tmp_probe_path(&self) -> PathBuf {
        self.shared
            .tmp_dir()
            .join(format!("scratch.{:016x}", rand::random::<u64>()))
    }

    /// The cache's root directory.
    pub fn root(&self) -> &Path {
        &self.shared.root
    }

    /// The committed file of an indexed object (a miss if it vanished from disk).
    fn read_file(&self, digest: &Digest) -> Result<Option<Object>, StoreError> {
        match File::open(self.shared.object_path(digest)) {
            Ok(file) => {
                let len = file.metadata()?.len();
                let reader = Arc::new(FileReader(Arc::new(file)));
                Ok(Some(Object { len, reader }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                warn!(%digest, "indexed object missing on disk; forgetting it");
                self.shared.index.remove(digest);
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The file of a committed object (for tools and tests; requests go through [`BlobStore`]).
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        self.shared.object_path(digest)
    }

    /// Block until the files of every object evicted so far are unlinked (they go on a
    /// thread of their own). Blocking.
    pub fn wait_for_unlinks(&self) {
        self.shared.wait_for_unlinks()
    }
}

impl Shared {
    fn objects_dir(&self) -> PathBuf {
        self.root.join("objects").join("sha256")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn object_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.objects_dir().join(&hex[..2]).join(hex)
    }

    /// The size of an indexed object. Until the index is complete, an object it lacks may
    /// still be on disk: its file is looked at, and indexed if found.
    fn indexed(&self, digest: &Digest) -> io::Result<Option<u64>> {
        if let Some(len) = self.index.get(digest) {
            return Ok(Some(len));
        }
        if *self.complete.borrow() {
            return Ok(None);
        }
        // Under the namespace lock no file is unlinked, so a file found is one to keep
        // unless it waits to be unlinked.
        let _guard = self.namespace();
        let Some(len) = self.unindexed_len(digest)? else {
            return Ok(None);
        };
        self.delete(self.index.insert_found(vec![(digest.clone(), len)]));
        Ok(Some(len))
    }

    /// The size of an object file the index lacks, if it is one to index: on disk, and not
    /// evicted (waiting for the deleter). Call it under the namespace lock.
    fn unindexed_len(&self, digest: &Digest) -> io::Result<Option<u64>> {
        if self.is_unlink_pending(digest) {
            return Ok(None);
        }
        match fs::metadata(self.object_path(digest)) {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn is_unlink_pending(&self, digest: &Digest) -> bool {
        let pending = self.deleter.pending.lock().expect("deleter lock");
        pending.digests.contains_key(digest)
    }

    fn namespace(&self) -> std::sync::MutexGuard<'_, ()> {
        self.namespace.lock().expect("namespace lock")
    }

    /// fsync the data, rename it into place and index it, fsync the directory so the rename
    /// survives a crash, then delete what the new object pushed out.
    fn publish(&self, ingest: &mut DiskWriter, file: &File) -> Result<(), StoreError> {
        (&*file).flush()?;
        file.sync_all()?;
        let dest = self.object_path(&ingest.digest);
        let dir = dest.parent().expect("object paths have a shard directory");
        let evicted = {
            let _guard = self.namespace();
            if !self.index.fits(ingest.written) {
                return Err(StoreError::TooLarge {
                    len: ingest.written,
                    max: self.index.max_bytes(),
                });
            }
            // Only the shard: if the cache root itself is gone, fail rather than recreate it.
            match fs::create_dir(dir) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e.into()),
                _ => {}
            }
            fs::rename(&ingest.tmp_path, &dest)?;
            ingest.committed = true;
            let reserved = std::mem::take(&mut ingest.reserved);
            self.index
                .insert(ingest.digest.clone(), ingest.written, reserved)
        };
        self.delete(evicted);
        File::open(dir)?.sync_all()?;
        Ok(())
    }
}

#[async_trait]
impl BlobStore for DiskStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        Ok(self.shared.indexed(digest)?)
    }

    async fn open(&self, digest: &Digest) -> Result<Option<Object>, StoreError> {
        if self.shared.index.touch(digest).is_none() {
            if self.shared.indexed(digest)?.is_none() {
                return Ok(None);
            }
            self.shared.index.touch(digest);
        }
        self.read_file(digest)
    }

    async fn peek(&self, digest: &Digest) -> Result<Option<Object>, StoreError> {
        if self.shared.indexed(digest)?.is_none() {
            return Ok(None);
        }
        self.read_file(digest)
    }

    async fn ingest(&self, digest: &Digest) -> Result<Ingest, StoreError> {
        let tmp_path =
            self.shared
                .tmp_dir()
                .join(format!("{}.{:016x}", digest.hex(), rand::random::<u64>()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp_path)?;
        let writer = DiskWriter {
            digest: digest.clone(),
            tmp_path,
            file: Some(Arc::new(file)),
            written: 0,
            reserved: 0,
            committed: false,
            discarded: false,
            unbudgeted: false,
            shared: self.shared.clone(),
        };
        Ok(Ingest::new(digest, Box::new(writer)))
    }

    async fn remove(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let shared = self.shared.clone();
        let digest = digest.clone();
        let removed = tokio::task::spawn_blocking(move || {
            shared.indexed(&digest)?;
            let _guard = shared.namespace();
            let Some(len) = shared.index.remove(&digest) else {
                return Ok(None);
            };
            match fs::remove_file(shared.object_path(&digest)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(Some(len)),
            }
        })
        .await
        .map_err(io::Error::other)??;
        Ok(removed)
    }

    async fn list(&self) -> Result<Vec<(Digest, u64)>, StoreError> {
        self.reconciled().await;
        Ok(self.shared.index.order())
    }

    async fn ready(&self) -> Result<(), StoreError> {
        let probe = self.tmp_probe_path();
        tokio::task::spawn_blocking(move || {
            fs::write(&probe, b"ready").and_then(|()| fs::remove_file(&probe))
        })
        .await
        .map_err(io::Error::other)??;
        Ok(())
    }
}

impl Budget for DiskStore {
    fn touch(&self, digest: &Digest) {
        self.shared.index.touch(digest);
    }

    fn set_pins(&self, pins: HashSet<Digest>) {
        let evicted = self.shared.index.set_pins(pins);
        self.shared.delete(evicted);
    }

    fn usage(&self) -> Usage {
        // Read first: the deleter's lock is never held while the index's is taken.
        let pending = self
            .shared
            .deleter
            .pending
            .lock()
            .expect("deleter lock")
            .objects;
        Usage {
            unlinks_pending: pending,
            index_checked: *self.shared.complete.borrow(),
            ..self.shared.evictions.usage(&self.shared.index)
        }
    }

    fn save(&self) -> io::Result<bool> {
        self.save_order()
    }
}

/// Reads of a local file with `pread` on a blocking thread. The descriptor stays valid after
/// the file is renamed or unlinked.
pub struct FileReader(pub Arc<File>);

#[async_trait]
impl ObjectReader for FileReader {
    async fn read(
        &self,
        pos: u64,
        len: usize,
        mut spare: BytesMut,
    ) -> Result<(Bytes, BytesMut), StoreError> {
        let file = self.0.clone();
        let (mut buf, read) = tokio::task::spawn_blocking(move || {
            // Takes the old allocation back if the last chunk is gone, else makes a new one.
            spare.reserve(len);
            spare.resize(len, 0);
            let read = file.read_exact_at(&mut spare, pos);
            (spare, read)
        })
        .await
        .map_err(io::Error::other)?;
        read?;
        Ok((buf.split().freeze(), buf))
    }
}

struct DiskWriter {
    digest: Digest,
    tmp_path: PathBuf,
    file: Option<Arc<File>>,
    written: u64,
    /// Bytes set aside in the index for this object.
    reserved: u64,
    committed: bool,
    discarded: bool,
    /// Written outside the budget: never committed.
    unbudgeted: bool,
    shared: Arc<Shared>,
}

impl DiskWriter {
    fn file(&self) -> io::Result<Arc<File>> {
        self.file
            .clone()
            .ok_or_else(|| io::Error::other("ingest already finished"))
    }

    /// Set aside `len` more bytes in the index, evicting to make room (blocking: it unlinks).
    fn reserve_more(&mut self, len: u64, total: u64) -> Result<(), StoreError> {
        self.shared.reserve_room(len, total)?;
        self.reserved += len;
        Ok(())
    }
}

#[async_trait]
impl ObjectWriter for DiskWriter {
    fn reader(&self) -> Option<Arc<dyn ObjectReader>> {
        let file = self.file.clone()?;
        Some(Arc::new(FileReader(file)))
    }

    async fn reserve(&mut self, len: u64) -> Result<(), StoreError> {
        let more = len.saturating_sub(self.reserved);
        // On a blocking thread: it may wait for the namespace lock, and evicting a hundred
        // thousand small objects takes tens of milliseconds.
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.reserve_room(more, len))
            .await
            .map_err(io::Error::other)??;
        self.reserved += more;
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let end = self.written + bytes.len() as u64;
        // A blob without a Content-Length, or one longer than announced, makes room as it
        // grows: the disk never holds more than the budget.
        if end > self.reserved && !self.unbudgeted {
            self.reserve_more(end - self.reserved, end)?;
        }
        self.file()?.write_all_at(bytes, self.written)?;
        self.written = end;
        Ok(())
    }

    fn discard(&mut self) {
        if !self.discarded {
            self.discarded = true;
            self.file = None;
            let _ = fs::remove_file(&self.tmp_path);
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
        self.written
    }

    async fn commit(mut self: Box<Self>, proof: Verified) -> Result<u64, StoreError> {
        if self.discarded || self.unbudgeted || proof.digest() != &self.digest {
            return Err(io::Error::other("commit of a discarded or another object").into());
        }
        let file = self.file.take().expect("commit runs once");
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            shared.publish(&mut self, &file)?;
            Ok(self.written)
        })
        .await
        .map_err(io::Error::other)?
    }
}

impl Drop for DiskWriter {
    fn drop(&mut self) {
        if !self.committed {
            self.discard();
        }
    }
}
