//! The background half of opening a store: the saved order checked against the files.

use std::fs;
use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use tracing::{info, warn};

use super::Shared;
use crate::oci::Digest;

impl Shared {
    /// Names of the object files, checked to be digests; nothing is opened or stat'ed.
    pub(super) fn list_object_names(&self) -> io::Result<Vec<Digest>> {
        let mut found = Vec::new();
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
                    Some(digest) if entry.file_type()?.is_file() => found.push(digest),
                    _ => warn!(path = %entry.path().display(), "ignoring unexpected file in cache"),
                }
            }
        }
        Ok(found)
    }
}

/// The background half of opening a store: the saved order against the files on disk.
pub(super) struct Reconcile;

impl Reconcile {
    pub(super) fn start(shared: Arc<Shared>) -> io::Result<()> {
        std::thread::Builder::new()
            .name("dockside-index".into())
            .spawn(move || {
                if let Err(e) = Reconcile::run(&shared) {
                    warn!(error = %e, "could not list the cache's files; the index holds what the saved order listed");
                }
                shared.complete.send_replace(true);
            })
            .map(drop)
    }

    /// Of the files found unindexed, the ones still to index now that they are checked under
    /// the namespace lock: a file may have been evicted (waiting for the deleter, or gone)
    /// or committed since it was listed.
    pub(super) fn still_unindexed(
        shared: &Shared,
        found: Vec<(SystemTime, Digest, u64)>,
    ) -> io::Result<Vec<(Digest, u64)>> {
        let _guard = shared.namespace();
        let mut keep = Vec::with_capacity(found.len());
        for (_, digest, _) in found {
            if shared.index.get(&digest).is_some() {
                continue;
            }
            if let Some(len) = shared.unindexed_len(&digest)? {
                keep.push((digest, len));
            }
        }
        Ok(keep)
    }

    /// Index the files the saved order did not list, oldest first by modification time
    /// (when they were committed), and forget the listed objects whose file is gone.
    pub(super) fn run(shared: &Shared) -> io::Result<()> {
        let started = std::time::Instant::now();
        let mut on_disk = shared.list_object_names()?;
        on_disk.sort_unstable();
        let mut found = Vec::new();
        for digest in &on_disk {
            if shared.index.get(digest).is_some() {
                continue;
            }
            match fs::metadata(shared.object_path(digest)) {
                Ok(meta) => {
                    let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    found.push((mtime, digest.clone(), meta.len()));
                }
                // Evicted meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        found.sort();
        let found = Reconcile::still_unindexed(shared, found)?;
        let new = found.len();
        shared.delete(shared.index.insert_found(found));
        let mut gone = 0;
        for (digest, _) in shared.index.order() {
            if on_disk.binary_search(&digest).is_ok() {
                continue;
            }
            // Committed after the listing, or gone: under the namespace lock, the file says.
            let _guard = shared.namespace();
            if !shared.object_path(&digest).exists() {
                shared.index.remove(&digest);
                gone += 1;
            }
        }
        let (bytes, objects) = shared.index.usage();
        let secs = started.elapsed().as_secs_f64();
        info!(
            objects,
            bytes, new, gone, secs, "cache index checked against the files on disk"
        );
        Ok(())
    }
}
