//! Local-disk [`BlobStore`] and [`Budget`]: `<dir>/objects/sha256/<first two hex>/<hex>` for committed objects,
//! `<dir>/tmp/` for ingests in progress, `<dir>/lru` for the eviction order at the last save.
//! Objects and temp files live on one filesystem, so commit is a rename.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use tracing::{info, warn};

use super::lru::{Evicted, LruIndex};
use bytes::{Bytes, BytesMut};

use super::{
    BlobStore, Budget, Ingest, Object, ObjectReader, ObjectWriter, StoreError, Usage, Verified,
};
use crate::oci::Digest;

const ORDER_FILE: &str = "lru";
const ORDER_HEADER: &str = "dockside-lru 1";

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
    evicted_objects: AtomicU64,
    evicted_bytes: AtomicU64,
}

impl DiskStore {
    /// Open (creating if needed) a store under `root` holding at most `max_bytes`: removes
    /// leftover temp files, rebuilds the index from `objects/` in the order saved in `lru`, and
    /// evicts whatever no longer fits.
    pub fn open(root: &Path, max_bytes: u64) -> io::Result<DiskStore> {
        DiskStore::open_with(root, max_bytes, true)
    }

    /// Like [`DiskStore::open`] while the server being upgraded still fills into `tmp/`: its
    /// temp files are left alone (the next plain start removes whatever it left behind).
    pub fn open_beside_running(root: &Path, max_bytes: u64) -> io::Result<DiskStore> {
        DiskStore::open_with(root, max_bytes, false)
    }

    fn open_with(root: &Path, max_bytes: u64, clean_tmp: bool) -> io::Result<DiskStore> {
        let store = DiskStore {
            shared: Arc::new(Shared {
                root: root.to_path_buf(),
                index: LruIndex::new(max_bytes),
                namespace: Mutex::new(()),
                evicted_objects: AtomicU64::new(0),
                evicted_bytes: AtomicU64::new(0),
            }),
        };
        if clean_tmp {
            store.clean_tmp()?;
        } else {
            fs::create_dir_all(store.shared.tmp_dir())?;
        }
        fs::create_dir_all(store.shared.objects_dir())?;
        store.rebuild_index()?;
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

    /// Index every object on disk: those the saved order knows, in that order (their size is
    /// taken from it: a digest names its content, so it names its size), then the newer ones by
    /// modification time, which is when they were committed.
    fn rebuild_index(&self) -> io::Result<()> {
        let on_disk = self.list_object_names()?;
        let saved = self.read_order().unwrap_or_else(|e| {
            warn!(error = %e, "could not read the saved eviction order; using file times");
            Vec::new()
        });
        let mut remaining: HashSet<&Digest> = on_disk.iter().collect();
        let mut order: Vec<(Digest, u64)> = Vec::with_capacity(on_disk.len());
        for (digest, len) in saved {
            if remaining.remove(&digest) {
                order.push((digest, len));
            }
        }
        let mut newer = Vec::with_capacity(remaining.len());
        for digest in remaining {
            let meta = fs::metadata(self.shared.object_path(digest))?;
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            newer.push((mtime, digest.clone(), meta.len()));
        }
        newer.sort();
        order.extend(newer.into_iter().map(|(_, d, len)| (d, len)));
        let evicted = self.shared.index.load(order);
        self.shared.delete(evicted);
        let (bytes, objects) = self.shared.index.usage();
        info!(objects, bytes, "cache index rebuilt");
        Ok(())
    }

    /// Names of the object files, checked to be digests; nothing is opened or stat'ed.
    fn list_object_names(&self) -> io::Result<Vec<Digest>> {
        let mut found = Vec::new();
        for shard in fs::read_dir(self.shared.objects_dir())? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(shard.path())? {
                let entry = entry?;
                let name = entry.file_name();
                let parsed = name.to_str().and_then(|n| Digest::from_hex(n).ok());
                match parsed {
                    Some(digest) if entry.file_type()?.is_file() => found.push(digest),
                    _ => warn!(path = %entry.path().display(), "ignoring unexpected file in cache"),
                }
            }
        }
        Ok(found)
    }

    fn read_order(&self) -> io::Result<Vec<(Digest, u64)>> {
        let path = self.shared.root.join(ORDER_FILE);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut lines = io::BufReader::new(file).lines();
        if lines.next().transpose()?.as_deref() != Some(ORDER_HEADER) {
            return Err(io::Error::other(format!(
                "{}: unknown format",
                path.display()
            )));
        }
        let mut order = Vec::new();
        for line in lines {
            let line = line?;
            let parsed = line.split_once(' ').and_then(|(hex, len)| {
                Some((Digest::from_hex(hex).ok()?, len.parse::<u64>().ok()?))
            });
            match parsed {
                Some(entry) => order.push(entry),
                None => warn!(path = %path.display(), %line, "ignoring a bad line"),
            }
        }
        Ok(order)
    }

    /// Write the eviction order to `<dir>/lru` if it changed since the last save, atomically
    /// (a crash leaves the previous save). Blocking; call it from a blocking thread.
    pub fn save_order(&self) -> io::Result<bool> {
        if !self.shared.index.changed() {
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

    fn namespace(&self) -> std::sync::MutexGuard<'_, ()> {
        self.namespace.lock().expect("namespace lock")
    }

    /// Unlink evicted objects. Blocking. A reader that has one open keeps reading it: the
    /// file lives on until its last descriptor closes.
    fn delete(&self, evicted: Evicted) {
        if evicted.is_empty() {
            return;
        }
        let _guard = self.namespace();
        for (digest, len) in evicted {
            // Evicted from the index, but re-committed since: the file is the new copy.
            if self.index.get(&digest).is_some() {
                continue;
            }
            match fs::remove_file(self.object_path(&digest)) {
                Ok(()) => info!(%digest, bytes = len, "evicted"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => warn!(%digest, error = %e, "could not delete an evicted object"),
            }
            self.evicted_objects.fetch_add(1, Ordering::Relaxed);
            self.evicted_bytes.fetch_add(len, Ordering::Relaxed);
        }
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
        Ok(self.shared.index.get(digest))
    }

    async fn open(&self, digest: &Digest) -> Result<Option<Object>, StoreError> {
        if self.shared.index.touch(digest).is_none() {
            return Ok(None);
        }
        self.read_file(digest)
    }

    async fn peek(&self, digest: &Digest) -> Result<Option<Object>, StoreError> {
        if self.shared.index.get(digest).is_none() {
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
        let (bytes, objects) = self.shared.index.usage();
        Usage {
            bytes,
            objects,
            max_bytes: self.shared.index.max_bytes(),
            pinned_bytes: self.shared.index.pinned_bytes(),
            evicted_objects: self.shared.evicted_objects.load(Ordering::Relaxed),
            evicted_bytes: self.shared.evicted_bytes.load(Ordering::Relaxed),
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
        let evicted = self.shared.index.reserve(len, total)?;
        self.reserved += len;
        self.shared.delete(evicted);
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
        let evicted = self.shared.index.reserve(more, len)?;
        self.reserved += more;
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.delete(evicted))
            .await
            .map_err(io::Error::other)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    async fn read_all(obj: Object) -> Vec<u8> {
        let len = obj.len as usize;
        let (bytes, _) = obj.reader.read(0, len, BytesMut::new()).await.unwrap();
        bytes.to_vec()
    }

    #[tokio::test]
    async fn commit_makes_verified_object_visible() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), u64::MAX).unwrap();
        let data = b"hello layer".to_vec();
        let digest = Digest::of(&data);
        assert!(store.open(&digest).await.unwrap().is_none());
        store.put(&digest, data.clone().into()).await.unwrap();
        let obj = store.open(&digest).await.unwrap().unwrap();
        assert_eq!(obj.len, data.len() as u64);
        assert_eq!(read_all(obj).await, data);
        assert_eq!(
            (store.usage().bytes, store.usage().objects),
            (data.len() as u64, 1)
        );
    }

    #[tokio::test]
    async fn mismatch_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), u64::MAX).unwrap();
        let digest = Digest::of(b"expected");
        let err = store
            .put(&digest, Bytes::from_static(b"something else"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }));
        assert!(store.open(&digest).await.unwrap().is_none());
        assert!(!store.path_of(&digest).exists());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn readers_follow_growth_and_survive_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), u64::MAX).unwrap();
        let digest = Digest::of(b"abcdef");
        let mut ingest = store.ingest(&digest).await.unwrap();
        let reader = ingest.reader().unwrap();
        ingest.write(b"abc").unwrap();
        let (bytes, _) = reader.read(0, 3, BytesMut::new()).await.unwrap();
        assert_eq!(&bytes[..], b"abc");
        ingest.write(b"def").unwrap();
        let proof = ingest.verify().unwrap();
        ingest.commit(proof).await.unwrap();
        let (bytes, _) = reader.read(3, 3, BytesMut::new()).await.unwrap();
        assert_eq!(&bytes[..], b"def");
    }

    #[tokio::test]
    async fn a_discarded_ingest_still_verifies_but_never_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 10).unwrap();
        let kept = put_all(&store, &[&[1; 4]]).await;
        let digest = Digest::of(b"abcdef");
        let mut ingest = store.ingest(&digest).await.unwrap();
        ingest.reserve(6).await.unwrap();
        ingest.write(b"abc").unwrap();
        ingest.discard();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        // Had the discard kept its reservation, this one would evict the kept object.
        store
            .ingest(&digest)
            .await
            .unwrap()
            .reserve(6)
            .await
            .unwrap();
        assert!(
            store.path_of(&kept[0]).exists(),
            "the reservation was not given back"
        );
        ingest.write(b"def").unwrap();
        assert_eq!(ingest.written(), 3, "a discarded ingest wrote on");
        let proof = ingest.verify().unwrap();
        assert_eq!(proof.len(), 6, "verified what was passed, not written");
        assert!(ingest.commit(proof).await.is_err());
        assert!(store.open(&digest).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn restart_rebuilds_index_and_wipes_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let digest = Digest::of(b"kept");
        {
            let store = DiskStore::open(dir.path(), u64::MAX).unwrap();
            store
                .put(&digest, Bytes::from_static(b"kept"))
                .await
                .unwrap();
            let abandoned = store.ingest(&Digest::of(b"lost")).await.unwrap();
            std::mem::forget(abandoned); // as if the process died mid-fill
        }
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1);
        fs::write(dir.path().join("objects/sha256/zz-not-a-digest"), b"x").unwrap();
        let store = DiskStore::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(store.stat(&digest).await.unwrap(), Some(4));
        assert_eq!((store.usage().bytes, store.usage().objects), (4, 1));
    }

    async fn put_all(store: &DiskStore, blobs: &[&[u8]]) -> Vec<Digest> {
        let mut digests = Vec::new();
        for blob in blobs {
            let digest = Digest::of(blob);
            store
                .put(&digest, Bytes::copy_from_slice(blob))
                .await
                .unwrap();
            digests.push(digest);
        }
        digests
    }

    #[tokio::test]
    async fn eviction_deletes_the_least_recently_served_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 30).unwrap();
        let d = put_all(&store, &[&[1; 10], &[2; 10], &[3; 10]]).await;
        store.open(&d[0]).await.unwrap().unwrap();
        let reader = store.open(&d[1]).await.unwrap().unwrap();
        put_all(&store, &[&[4; 10]]).await;
        assert!(!store.path_of(&d[2]).exists());
        assert!(store.path_of(&d[0]).exists());
        assert_eq!(store.usage().bytes, 30);
        // A reader of an object evicted under it still gets all its bytes.
        put_all(&store, &[&[5; 10], &[6; 10]]).await;
        assert!(!store.path_of(&d[1]).exists());
        assert_eq!(read_all(reader).await, vec![2; 10]);
        assert_eq!(store.usage().evicted_objects, 3);
    }

    #[tokio::test]
    async fn eviction_order_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let d = {
            let store = DiskStore::open(dir.path(), 100).unwrap();
            let d = put_all(&store, &[&[1; 10], &[2; 10], &[3; 10]]).await;
            store.open(&d[0]).await.unwrap();
            assert!(store.save_order().unwrap());
            assert!(!store.save_order().unwrap(), "nothing changed since");
            d
        };
        // Committed after the last save: newer than everything the save knows.
        {
            let store = DiskStore::open(dir.path(), 100).unwrap();
            put_all(&store, &[&[4; 10]]).await;
        }
        let store = DiskStore::open(dir.path(), 100).unwrap();
        let order: Vec<Digest> = store
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        assert_eq!(order[..3], [d[1].clone(), d[2].clone(), d[0].clone()]);
        assert_eq!(order[3], Digest::of(&[4; 10]));
    }

    #[tokio::test]
    async fn a_smaller_limit_evicts_at_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = DiskStore::open(dir.path(), 100).unwrap();
            put_all(&store, &[&[1; 10], &[2; 10], &[3; 10]]).await;
            // Without a saved order the next start goes by mtime, and commits this close
            // together can share a clock tick (then the tie is broken by digest).
            store.save_order().unwrap();
        }
        let store = DiskStore::open(dir.path(), 20).unwrap();
        assert_eq!((store.usage().bytes, store.usage().objects), (20, 2));
        assert!(!store.path_of(&Digest::of(&[1; 10])).exists());
    }

    #[tokio::test]
    async fn an_object_larger_than_the_cache_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 10).unwrap();
        let kept = put_all(&store, &[&[1; 5]]).await;
        let big = vec![7u8; 11];
        let digest = Digest::of(&big);
        let mut ingest = store.ingest(&digest).await.unwrap();
        assert!(matches!(
            ingest.reserve(11).await,
            Err(StoreError::TooLarge { len: 11, max: 10 })
        ));
        let err = store.put(&digest, big.into()).await.unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { .. }));
        assert!(!store.path_of(&digest).exists());
        assert!(store.path_of(&kept[0]).exists(), "nothing evicted for it");
    }

    #[tokio::test]
    async fn pinned_objects_are_never_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 20).unwrap();
        let d = put_all(&store, &[&[1; 10], &[2; 10]]).await;
        store.set_pins([d[0].clone()].into());
        put_all(&store, &[&[3; 10]]).await;
        assert!(store.path_of(&d[0]).exists());
        assert!(!store.path_of(&d[1]).exists());
        assert_eq!(store.usage().pinned_bytes, 10);
    }

    #[tokio::test]
    async fn remove_deletes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 100).unwrap();
        let d = put_all(&store, &[&[1; 10]]).await;
        assert_eq!(store.remove(&d[0]).await.unwrap(), Some(10));
        assert_eq!(store.remove(&d[0]).await.unwrap(), None);
        assert!(!store.path_of(&d[0]).exists());
        assert_eq!(store.usage().bytes, 0);
    }
}
