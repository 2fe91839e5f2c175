//! The deleter: evicted files are unlinked on a thread of their own, behind the index.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::sync::{Condvar, Mutex};

use tracing::{debug, error, info, warn};

use super::{Shared, UNLINK_BATCH};
use crate::oci::Digest;
use crate::store::StoreError;
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
    /// Count evicted objects and hand them to the deleter thread, with one log line.
    pub(super) fn delete(&self, evicted: Evicted) {
        if evicted.is_empty() {
            return;
        }
        let (objects, bytes) = self.queue_unlinks(evicted);
        info!(objects, bytes, "evicted to make room");
    }

    /// Make room for `more` bytes of an object that will hold `total`, handing what is
    /// evicted to the deleter batch by batch
    /// ([`reserve_in_batches`](crate::store::lru::LruIndex::reserve_in_batches)). Blocking.
    pub(super) fn reserve_room(&self, more: u64, total: u64) -> Result<(), StoreError> {
        // Until the files are checked a lookup may stat a file the index lacks; under the
        // namespace lock it cannot look between a batch leaving the index and its digests
        // reaching the deleter's list.
        let _names = (!*self.complete.borrow()).then(|| self.namespace());
        let (mut objects, mut bytes) = (0, 0);
        self.index.reserve_in_batches(more, total, |evicted| {
            if !evicted.is_empty() {
                let (o, b) = self.queue_unlinks(evicted);
                (objects, bytes) = (objects + o, bytes + b);
            }
        })?;
        if objects > 0 {
            info!(objects, bytes, "evicted to make room");
        }
        Ok(())
    }

    /// Count evicted objects and queue them for the deleter: (objects, bytes).
    fn queue_unlinks(&self, evicted: Evicted) -> (u64, u64) {
        let objects = evicted.len() as u64;
        let bytes: u64 = evicted.iter().map(|(_, len)| len).sum();
        self.evictions.count(objects, bytes);
        self.deleter
            .pending
            .lock()
            .expect("deleter lock")
            .add(&evicted);
        let queue = self.deleter.queue.lock().expect("deleter lock");
        if let Err(returned) = queue.send(evicted) {
            // The thread died (it never ends while the store lives). The caller may hold the
            // namespace lock, so nothing is unlinked here: the files stay until the next
            // start's check finds them and the budget evicts them again.
            drop(queue);
            error!(
                objects,
                "the deleter thread is gone; evicted files stay on disk"
            );
            let mut pending = self.deleter.pending.lock().expect("deleter lock");
            for (digest, _) in &returned.0 {
                pending.done(digest);
            }
            self.deleter.drained.notify_all();
        }
        (objects, bytes)
    }

    /// Unlink evicted files, a batch per namespace lock so commits are never held back for
    /// long. A reader that has one open keeps reading it: the file lives on until its last
    /// descriptor closes.
    pub(super) fn unlink(&self, evicted: Evicted) {
        // The index is asked once per batch: this thread runs at the lowest priority, and one
        // preempted while holding the index's lock would hold up every request that serves
        // from the cache.
        for batch in evicted.chunks(UNLINK_BATCH) {
            {
                let _names = self.namespace();
                // Evicted from the index, but committed again since: the file is the new copy.
                let indexed = self.index.contains_each(batch.iter().map(|(d, _)| d));
                for ((digest, len), indexed) in batch.iter().zip(indexed) {
                    if !indexed {
                        self.unlink_one(digest, *len);
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

    fn unlink_one(&self, digest: &Digest, len: u64) {
        match fs::remove_file(self.object_path(digest)) {
            Ok(()) => debug!(%digest, bytes = len, "evicted"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(%digest, error = %e, "could not delete an evicted object"),
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
