//! One process per cache directory. The store's index, the eviction order and the fills in
//! flight live in the memory of the process that opened the cache, so a second process writing
//! the same directory would evict files the first still counts, or wipe its `tmp/` on open.
//! `serve` and every tool that opens the cache hold an exclusive lock on `<cache.dir>/lock`.
//!
//! The lock is flock(2), taken without waiting. std's `File::try_lock` is the same call but
//! needs Rust 1.89, and the crate's `rust-version` is 1.85; swap it in when that moves.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Held for as long as the process uses the cache; the kernel releases it when the file is
/// closed, also when the process dies, so a crash never leaves a stale lock behind.
#[derive(Debug)]
pub struct CacheLock {
    _file: File,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("a dockside server is using {0}; stop it or use the admin API")]
    Busy(PathBuf),
    #[error("cannot lock {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl CacheLock {
    /// Take the lock of the cache in `dir` (created if needed), without waiting.
    pub fn acquire(dir: &Path) -> Result<CacheLock, LockError> {
        let path = dir.join("lock");
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match try_lock_exclusive(&file) {
            Ok(()) => Ok(CacheLock { _file: file, path }),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Err(LockError::Busy(dir.to_path_buf()))
            }
            Err(e) => Err(io(e)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn try_lock_exclusive(file: &File) -> io::Result<()> {
    // SAFETY: flock on a descriptor that `file` owns and keeps open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let first = CacheLock::acquire(&cache).expect("first lock");
        let err = CacheLock::acquire(&cache).expect_err("second lock while held");
        assert!(
            err.to_string().contains("a dockside server is using")
                && err.to_string().contains("cache"),
            "{err}"
        );
        drop(first);
        CacheLock::acquire(&cache).expect("lock again after release");
    }
}
