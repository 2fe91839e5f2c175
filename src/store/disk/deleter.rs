//! The deleter: evicted files are unlinked on a thread of their own, behind the index.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::sync::{Condvar, Mutex};

use tracing::{debug, info, warn};

use super::{Shared, UNLINK_BATCH};
use crate::oci::Digest;
use crate::store::lru::Evicted;

/// Evicted files are unlinked on a thread of their own, at the lowest priority: making room
/// for one large blob can push out a hundred thousand small objects, whose unlinks would
/// otherwise hold up the fill that asked for the room (seconds), and on a busy machine take
/// CPU from requests. The index forgets them at once, so the budget never counts them.
pub(super) struct Deleter {
    pub(super) queue: Mutex<std::sync::mpsc::Sender<Evicted>>,
    pub(super) pending: Mutex<Pending>,
    pub(super) drained: Condvar,
}

/// Objects queued for unlinking and not yet unlinked. Their files are still on disk but must
/// not be taken for cached objects the index does not know yet (see [`Reconcile`]).
#[derive(Default)]
pub(super) struct Pending {
    pub(super) objects: u64,
    /// How many times each is queued: one evicted, committed again and evicted again is twice.
    pub(super) digests: HashMap<Digest, u32>,
}

impl Pending {
    pub(super) fn add(&mut self, evicted: &Evicted) {
        for (digest, _) in evicted {
            *self.digests.entry(digest.clone()).or_default() += 1;
        }
        self.objects += evicted.len() as u64;
    }

    pub(super) fn done(&mut self, digest: &Digest) {
        if let Some(n) = self.digests.get_mut(digest) {
            *n -= 1;
            if *n == 0 {
                self.digests.remove(digest);
            }
        }
        self.objects -= 1;
    }
}

impl Shared {
    /// Count evicted objects and hand them to the deleter thread.
    pub(super) fn delete(&self, evicted: Evicted) {
        if evicted.is_empty() {
            return;
        }
        let objects = evicted.len() as u64;
        let bytes: u64 = evicted.iter().map(|(_, len)| len).sum();
        self.evictions.count(objects, bytes);
        // One line per eviction, not per object.
        info!(objects, bytes, "evicted to make room");
        self.deleter
            .pending
            .lock()
            .expect("deleter lock")
            .add(&evicted);
        let queue = self.deleter.queue.lock().expect("deleter lock");
        if let Err(returned) = queue.send(evicted) {
            // The thread is gone (it never ends while the store lives): unlink here.
            drop(queue);
            self.unlink(returned.0);
        }
    }

    /// Unlink evicted files, one namespace lock each so commits are never held back for long.
    /// A reader that has one open keeps reading it: the file lives on until its last
    /// descriptor closes.
    pub(super) fn unlink(&self, evicted: Evicted) {
        // The shared locks are taken once per batch: this thread runs at the lowest priority,
        // and one preempted while holding a lock would hold up the requests that wait for it.
        for batch in evicted.chunks(UNLINK_BATCH) {
            for (digest, len) in batch {
                let _guard = self.namespace();
                // Evicted from the index, but re-committed since: the file is the new copy.
                if self.index.get(digest).is_none() {
                    match fs::remove_file(self.object_path(digest)) {
                        Ok(()) => debug!(%digest, bytes = len, "evicted"),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => warn!(%digest, error = %e, "could not delete an evicted object"),
                    }
                }
            }
            let mut pending = self.deleter.pending.lock().expect("deleter lock");
            for (digest, _) in batch {
                pending.done(digest);
            }
            if pending.objects == 0 {
                self.deleter.drained.notify_all();
            }
        }
    }

    /// Block until every evicted file handed to the deleter is unlinked.
    pub(super) fn wait_for_unlinks(&self) {
        let pending = self.deleter.pending.lock().expect("deleter lock");
        drop(
            self.deleter
                .drained
                .wait_while(pending, |p| p.objects > 0)
                .expect("deleter lock"),
        );
    }
}

impl Deleter {
    /// The thread ends with the store: it holds it only while unlinking a batch.
    pub(super) fn start(
        shared: std::sync::Weak<Shared>,
        evicted: std::sync::mpsc::Receiver<Evicted>,
    ) -> io::Result<()> {
        std::thread::Builder::new()
            .name("dockside-evict".into())
            .spawn(move || {
                lower_priority();
                while let Ok(batch) = evicted.recv() {
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    shared.unlink(batch);
                }
            })
            .map(drop)
    }
}

/// The calling thread at nice 19: it runs when requests leave a core idle, and still gets a
/// share when they do not, so the disk frees up behind the index.
fn lower_priority() {
    // SAFETY: setpriority on this thread's own id; it reads no memory of ours.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    if rc != 0 {
        debug!(error = %io::Error::last_os_error(), "could not lower the evicting thread's priority");
    }
}
