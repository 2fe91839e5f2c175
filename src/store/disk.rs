//! Local-disk [`BlobStore`]: `<dir>/objects/sha256/<first two hex>/<hex>` for committed objects,
//! `<dir>/tmp/` for ingests in progress. Both live on one filesystem, so commit is a rename.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use moka::sync::Cache;
use tracing::{info, warn};

use super::{BlobStore, Ingest, StoreError, StoredObject};
use crate::oci::Digest;
use crate::oci::digest::DigestVerifier;

pub struct DiskStore {
    root: PathBuf,
    /// digest → size of every committed object. Rebuilt from the directory on start.
    index: Cache<Digest, u64>,
    bytes: Arc<AtomicU64>,
}

impl DiskStore {
    /// Open (creating if needed) a store under `root`: removes leftover temp files and rebuilds
    /// the index from `objects/`.
    pub fn open(root: &Path) -> io::Result<DiskStore> {
        let store = DiskStore {
            root: root.to_path_buf(),
            index: Cache::builder().build(),
            bytes: Arc::new(AtomicU64::new(0)),
        };
        store.clean_tmp()?;
        fs::create_dir_all(store.objects_dir())?;
        store.rebuild_index()?;
        Ok(store)
    }

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

    fn clean_tmp(&self) -> io::Result<()> {
        let tmp = self.tmp_dir();
        if tmp.exists() {
            let removed = fs::read_dir(&tmp)?.filter_map(Result::ok).count();
            fs::remove_dir_all(&tmp)?;
            if removed > 0 {
                info!(removed, "removed leftover temp files from an earlier run");
            }
        }
        fs::create_dir_all(&tmp)
    }

    fn rebuild_index(&self) -> io::Result<()> {
        for shard in fs::read_dir(self.objects_dir())? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(shard.path())? {
                let entry = entry?;
                let name = entry.file_name();
                let parsed = name.to_str().and_then(|n| Digest::from_hex(n).ok());
                match parsed {
                    Some(digest) if entry.file_type()?.is_file() => {
                        self.record(digest, entry.metadata()?.len());
                    }
                    _ => warn!(path = %entry.path().display(), "ignoring unexpected file in cache"),
                }
            }
        }
        info!(
            objects = self.index.entry_count(),
            bytes = self.bytes.load(Ordering::Relaxed),
            "cache index rebuilt"
        );
        Ok(())
    }

    fn record(&self, digest: Digest, len: u64) {
        if self.index.get(&digest).is_none() {
            self.bytes.fetch_add(len, Ordering::Relaxed);
        }
        self.index.insert(digest, len);
    }

    /// A scratch path on the cache's filesystem, for readiness checks.
    pub fn tmp_probe_path(&self) -> PathBuf {
        self.tmp_dir()
            .join(format!("ready.{:016x}", rand::random::<u64>()))
    }

    /// The file of a committed object (for tools and tests; requests go through [`BlobStore`]).
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        self.object_path(digest)
    }
}

#[async_trait]
impl BlobStore for DiskStore {
    fn size_of(&self, digest: &Digest) -> Option<u64> {
        self.index.get(digest)
    }

    async fn open(&self, digest: &Digest) -> Result<Option<StoredObject>, StoreError> {
        if self.index.get(digest).is_none() {
            return Ok(None);
        }
        match File::open(self.object_path(digest)) {
            Ok(file) => {
                let len = file.metadata()?.len();
                Ok(Some(StoredObject { file, len }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                warn!(%digest, "indexed object missing on disk; forgetting it");
                self.index.invalidate(digest);
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn ingest(&self, digest: &Digest) -> Result<Box<dyn Ingest>, StoreError> {
        let tmp_path =
            self.tmp_dir()
                .join(format!("{}.{:016x}", digest.hex(), rand::random::<u64>()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)?;
        Ok(Box::new(DiskIngest {
            digest: digest.clone(),
            tmp_path,
            final_path: self.object_path(digest),
            file: Some(Arc::new(file)),
            verifier: Some(DigestVerifier::new()),
            written: 0,
            committed: false,
            index: self.index.clone(),
            bytes: self.bytes.clone(),
        }))
    }

    fn usage(&self) -> (u64, u64) {
        self.index.run_pending_tasks();
        (self.bytes.load(Ordering::Relaxed), self.index.entry_count())
    }
}

struct DiskIngest {
    digest: Digest,
    tmp_path: PathBuf,
    final_path: PathBuf,
    file: Option<Arc<File>>,
    /// `None` once verified.
    verifier: Option<DigestVerifier>,
    written: u64,
    committed: bool,
    index: Cache<Digest, u64>,
    bytes: Arc<AtomicU64>,
}

impl DiskIngest {
    fn file(&self) -> io::Result<Arc<File>> {
        self.file
            .clone()
            .ok_or_else(|| io::Error::other("ingest already finished"))
    }
}

#[async_trait]
impl Ingest for DiskIngest {
    fn reader(&self) -> io::Result<File> {
        File::open(&self.tmp_path)
    }

    async fn write(&mut self, bytes: Bytes) -> Result<(), StoreError> {
        let verifier = self
            .verifier
            .as_mut()
            .ok_or_else(|| io::Error::other("write after verify"))?;
        verifier.update(&bytes);
        let file = self.file()?;
        let offset = self.written;
        let len = bytes.len() as u64;
        // Positioned writes on a blocking thread: a slow disk must not stall the runtime.
        tokio::task::spawn_blocking(move || file.write_all_at(&bytes, offset))
            .await
            .map_err(io::Error::other)??;
        self.written += len;
        Ok(())
    }

    fn written(&self) -> u64 {
        self.written
    }

    fn verify(&mut self) -> Result<u64, StoreError> {
        if let Some(verifier) = self.verifier.take() {
            let actual = verifier.finish();
            if actual != self.digest {
                return Err(StoreError::DigestMismatch {
                    expected: self.digest.clone(),
                    actual,
                });
            }
        }
        Ok(self.written)
    }

    async fn commit(mut self: Box<Self>) -> Result<u64, StoreError> {
        if self.verifier.is_some() {
            return Err(io::Error::other("commit before verify").into());
        }
        let file = self.file.take().expect("commit runs once");
        let (tmp, dest) = (self.tmp_path.clone(), self.final_path.clone());
        tokio::task::spawn_blocking(move || publish(&file, &tmp, &dest))
            .await
            .map_err(io::Error::other)??;
        self.committed = true;
        if self.index.get(&self.digest).is_none() {
            self.bytes.fetch_add(self.written, Ordering::Relaxed);
        }
        self.index.insert(self.digest.clone(), self.written);
        Ok(self.written)
    }
}

/// fsync the data, rename it into place, fsync the directory so the rename survives a crash.
fn publish(file: &File, tmp: &Path, dest: &Path) -> io::Result<()> {
    (&*file).flush()?;
    file.sync_all()?;
    let dir = dest.parent().expect("object paths have a shard directory");
    // Only the shard: if the cache root itself is gone, fail rather than recreate it.
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    fs::rename(tmp, dest)?;
    File::open(dir)?.sync_all()
}

impl Drop for DiskIngest {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn read_all(mut file: File) -> Vec<u8> {
        let mut out = Vec::new();
        file.read_to_end(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn commit_makes_verified_object_visible() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        let data = b"hello layer".to_vec();
        let digest = Digest::of(&data);
        assert!(store.open(&digest).await.unwrap().is_none());
        store.put(&digest, data.clone().into()).await.unwrap();
        let obj = store.open(&digest).await.unwrap().unwrap();
        assert_eq!(obj.len, data.len() as u64);
        assert_eq!(read_all(obj.file), data);
        assert_eq!(store.usage(), (data.len() as u64, 1));
    }

    #[tokio::test]
    async fn mismatch_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
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
        let store = DiskStore::open(dir.path()).unwrap();
        let digest = Digest::of(b"abcdef");
        let mut ingest = store.ingest(&digest).unwrap();
        let reader = ingest.reader().unwrap();
        ingest.write(Bytes::from_static(b"abc")).await.unwrap();
        let mut buf = [0u8; 3];
        reader.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"abc");
        ingest.write(Bytes::from_static(b"def")).await.unwrap();
        ingest.verify().unwrap();
        ingest.commit().await.unwrap();
        reader.read_exact_at(&mut buf, 3).unwrap();
        assert_eq!(&buf, b"def");
    }

    #[tokio::test]
    async fn restart_rebuilds_index_and_wipes_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let digest = Digest::of(b"kept");
        {
            let store = DiskStore::open(dir.path()).unwrap();
            store
                .put(&digest, Bytes::from_static(b"kept"))
                .await
                .unwrap();
            let abandoned = store.ingest(&Digest::of(b"lost")).unwrap();
            std::mem::forget(abandoned); // as if the process died mid-fill
        }
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1);
        fs::write(dir.path().join("objects/sha256/zz-not-a-digest"), b"x").unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(store.size_of(&digest), Some(4));
        assert_eq!(store.usage(), (4, 1));
    }
}
