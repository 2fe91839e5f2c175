//! One process per cache directory. The store's index, the eviction order and the fills in
//! flight live in the memory of the process that opened the cache, so a second process writing
//! the same directory would evict files the first still counts, or wipe its `tmp/` on open.
//! `serve` and every tool that opens the cache hold an exclusive lock on `<cache.dir>/lock`.
//!
//! The lock is flock(2), taken without waiting. std's `File::try_lock` is the same call but
//! needs Rust 1.89, and the crate's `rust-version` is 1.85; swap it in when that moves.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Held for as long as the process uses the cache; the kernel releases it when the file is
/// closed, also when the process dies, so a crash never leaves a stale lock behind. The file
/// says who holds it (`<pid> <what>`), for the message the next process gets.
#[derive(Debug)]
pub struct CacheLock {
    _file: File,
    path: PathBuf,
}

/// What holds the lock: `serve` is [`SERVER`], a tool its subcommand's name.
pub const SERVER: &str = "server";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{} is using {}; {}", holder_text(.holder), .dir.display(), advice(.holder))]
    Busy {
        dir: PathBuf,
        /// `(pid, what)` as the holder wrote it, if readable.
        holder: Option<(u32, String)>,
    },
    #[error("--upgrade: no running dockside server holds {}/lock to take over from", .dir.display())]
    NoServer { dir: PathBuf },
    #[error("cannot lock {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn holder_text(holder: &Option<(u32, String)>) -> String {
    match holder {
        Some((pid, what)) if what != SERVER => format!("dockside {what} (pid {pid})"),
        Some((pid, _)) => format!("a dockside server (pid {pid})"),
        None => "a dockside server".to_string(),
    }
}

fn advice(holder: &Option<(u32, String)>) -> &'static str {
    match holder {
        Some((_, what)) if what != SERVER => "wait for it to finish",
        _ => "stop it or use the admin API",
    }
}

impl CacheLock {
    /// Take the lock of the cache in `dir` (created if needed) for `what` (see [`SERVER`]),
    /// without waiting.
    pub fn acquire(dir: &Path, what: &str) -> Result<CacheLock, LockError> {
        let path = dir.join("lock");
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match try_lock_exclusive(&file) {
            Ok(()) => {
                // Only the holder writes, so readers see the current holder or an empty file.
                file.set_len(0).map_err(io)?;
                write!(file, "{} {what}", std::process::id()).map_err(io)?;
                Ok(CacheLock { _file: file, path })
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(LockError::Busy {
                dir: dir.to_path_buf(),
                holder: read_holder(&mut file),
            }),
            Err(e) => Err(io(e)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// For `serve --upgrade`: the cache must be held by a running server (the one handing its
    /// listeners over), which this process then shares the cache with until it exits. A thread
    /// waits for its lock and holds it for the rest of this process's life, so tools stay
    /// locked out before, during and after the handover.
    pub fn take_over(dir: &Path) -> Result<(), LockError> {
        let tool_or_nobody = match CacheLock::acquire(dir, SERVER) {
            Ok(_free) => Err(LockError::NoServer {
                dir: dir.to_path_buf(),
            }),
            Err(LockError::Busy {
                holder: Some((_, what)),
                ..
            }) if what == SERVER => Ok(()),
            Err(e) => Err(e),
        };
        tool_or_nobody?;
        // The check above and the wait below are not atomic: a tool could take the lock when the
        // old server exits; the wait then simply lasts until the tool is done.
        let dir = dir.to_path_buf();
        std::thread::Builder::new()
            .name("cache-lock".into())
            .spawn(move || wait_and_hold(&dir))
            .map_err(|source| LockError::Io {
                path: PathBuf::from("lock thread"),
                source,
            })?;
        Ok(())
    }
}

fn wait_and_hold(dir: &Path) {
    let path = dir.join("lock");
    let locked = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .and_then(|mut file| {
            // SAFETY: flock on a descriptor that `file` owns and keeps open for the call.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(io::Error::last_os_error());
            }
            file.set_len(0)?;
            write!(file, "{} {SERVER}", std::process::id())?;
            Ok(file)
        });
    match locked {
        Ok(file) => {
            tracing::info!(lock = %path.display(), "the upgraded server has exited; cache lock taken");
            // The kernel releases the lock when the process exits.
            std::mem::forget(file);
        }
        Err(e) => tracing::error!(lock = %path.display(), error = %e, "cannot take the cache lock"),
    }
}

fn read_holder(file: &mut File) -> Option<(u32, String)> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    let (pid, what) = text.trim().split_once(' ')?;
    Some((pid.parse().ok()?, what.to_string()))
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
    fn a_second_holder_is_refused_and_told_who_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let server = CacheLock::acquire(&cache, SERVER).expect("first lock");
        let err = CacheLock::acquire(&cache, "import").expect_err("second lock while held");
        let pid = std::process::id();
        assert_eq!(
            err.to_string(),
            format!(
                "a dockside server (pid {pid}) is using {}; stop it or use the admin API",
                cache.display()
            )
        );
        drop(server);
        let tool = CacheLock::acquire(&cache, "import").expect("lock again after release");
        let err = CacheLock::acquire(&cache, SERVER).expect_err("a server beside a tool");
        assert!(
            err.to_string()
                .starts_with(&format!("dockside import (pid {pid}) is using")),
            "{err}"
        );
        assert!(err.to_string().ends_with("wait for it to finish"), "{err}");
        drop(tool);
    }

    #[test]
    fn an_upgrade_takes_over_only_from_a_server_and_then_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let err = CacheLock::take_over(&cache).expect_err("nothing to take over from");
        assert!(
            err.to_string().contains("no running dockside server"),
            "{err}"
        );
        let tool = CacheLock::acquire(&cache, "export").unwrap();
        let err = CacheLock::take_over(&cache).expect_err("a tool is no server");
        assert!(err.to_string().starts_with("dockside export"), "{err}");
        drop(tool);

        let server = CacheLock::acquire(&cache, SERVER).unwrap();
        CacheLock::take_over(&cache).expect("a running server");
        drop(server);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match CacheLock::acquire(&cache, "import") {
                Err(LockError::Busy { .. }) => break,
                Ok(_) | Err(_) if std::time::Instant::now() > deadline => {
                    panic!("the lock was not taken over")
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    }
}
