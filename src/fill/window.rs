//! A fill's bytes in memory and in the store, shared by the fill task, its writer and its
//! readers: the window of received batches, how much of them is written, and every reader's
//! place.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::store::ObjectReader;

/// The most bytes a fill holds back: received and not yet written, or (in pass-through) not
/// yet passed by every reader. Also the most written bytes kept in memory for readers.
pub(super) const WINDOW: u64 = 8 * 1024 * 1024;

pub struct FillData {
    /// Reads of what the store has written, set once the ingest exists (before any byte is
    /// written). It stays valid after a commit or a discard.
    pub(super) file: OnceLock<Arc<dyn ObjectReader>>,
    tail: Mutex<Tail>,
    /// Wakes the fill when its window may shrink: the writer moved on, or a reader moved on or
    /// left.
    pub(super) room: Notify,
}

/// The bytes a fill holds in memory, and what they are waiting for.
pub(super) struct Tail {
    /// The offset of the first byte in `chunks`.
    pub start: u64,
    /// Batches from `start` to `received`, each with its offset.
    pub chunks: VecDeque<(u64, Bytes)>,
    pub received: u64,
    /// Bytes in the store, a prefix of those received.
    pub written: u64,
    /// Bytes the hasher has hashed (ahead of `written` or behind it: they run apart).
    pub hashed: u64,
    /// The store no longer grows (the file was given up, or the store cannot be read before
    /// commit): the window keeps what readers still need.
    pub passthrough: bool,
    /// A reader from byte 0 may still join: false once the file was given up after an error,
    /// so later requests start a fill that tries to cache again.
    pub joinable: bool,
    /// The position of every reader, for pass-through.
    pub readers: Vec<Weak<AtomicU64>>,
}

impl FillData {
    pub(super) fn new() -> FillData {
        FillData {
            file: OnceLock::new(),
            tail: Mutex::new(Tail {
                start: 0,
                chunks: VecDeque::new(),
                received: 0,
                written: 0,
                hashed: 0,
                passthrough: false,
                joinable: true,
                readers: Vec::new(),
            }),
            room: Notify::new(),
        }
    }

    pub(super) fn tail(&self) -> MutexGuard<'_, Tail> {
        self.tail.lock().expect("fill tail lock")
    }

    /// A new reader at offset 0, or `None` when it could need bytes that are neither in the
    /// store nor still in memory.
    pub(super) fn join(self: &Arc<Self>) -> Option<FillReader> {
        let mut tail = self.tail();
        if !tail.joinable || (tail.passthrough && tail.start > 0) {
            return None;
        }
        let pos = Arc::new(AtomicU64::new(0));
        tail.readers.push(Arc::downgrade(&pos));
        Some(FillReader {
            data: self.clone(),
            pos,
        })
    }
}

impl Tail {
    /// Bytes that hold the fill back: those not yet hashed or not yet written, and in
    /// pass-through (where nothing more is written) those not yet hashed or still needed by a
    /// reader from memory. Written bytes kept only so that readers that keep up read them from
    /// memory do not count: [`Tail::trim`] lets them go.
    pub fn pending(&self) -> u64 {
        let behind = if self.passthrough {
            self.start.min(self.hashed)
        } else {
            self.hashed.min(self.written)
        };
        self.received - behind
    }

    /// Drop the batches no reader needs from memory any more. Written batches stay while a
    /// reader has yet to pass them, so a reader that keeps up with the origin is served from
    /// memory rather than by reads of what was just written; they go once more than
    /// [`WINDOW`] is held, and a reader that far behind reads the store. In pass-through a
    /// batch stays until every reader has passed it.
    pub fn trim(&mut self) {
        self.readers.retain(|r| r.strong_count() > 0);
        let positions = self.readers.iter().filter_map(Weak::upgrade);
        let needed_from = positions.map(|p| p.load(Ordering::Acquire)).min();
        let needed_from = needed_from.unwrap_or(self.received);
        while let Some((off, bytes)) = self.chunks.front() {
            let end = off + bytes.len() as u64;
            let passed = end <= needed_from;
            let droppable = if self.passthrough {
                passed
            } else {
                end <= self.written && (passed || self.received - self.start > WINDOW)
            };
            if !droppable {
                break;
            }
            self.start = end;
            self.chunks.pop_front();
        }
    }

    /// Where a reader at `pos` finds bytes up to `limit` (at most `limit`, which is at most
    /// `received`). Bytes in memory are a slice of one batch, without a copy.
    pub fn locate(&self, pos: u64, limit: u64) -> Located {
        if pos >= self.start {
            let i = self.chunks.partition_point(|(off, _)| *off <= pos) - 1;
            let (off, bytes) = &self.chunks[i];
            let end = (off + bytes.len() as u64).min(limit);
            return Located::Memory(bytes.slice((pos - off) as usize..(end - off) as usize));
        }
        if pos < self.written {
            return Located::Store(self.written.min(limit));
        }
        Located::Gone
    }
}

pub(super) enum Located {
    Memory(Bytes),
    /// In the store, up to this offset.
    Store(u64),
    /// Neither: the reader fell behind what the fill kept (it should not happen).
    Gone,
}

/// One reader's place in a fill. The fill keeps what the slowest reader needs once it can no
/// longer count on its store; dropping the reader lets the fill move on.
pub struct FillReader {
    pub(super) data: Arc<FillData>,
    pos: Arc<AtomicU64>,
}

impl FillReader {
    pub(super) fn set(&self, pos: u64) {
        self.pos.store(pos, Ordering::Release);
        self.data.room.notify_one();
    }
}

impl Drop for FillReader {
    fn drop(&mut self) {
        self.data.room.notify_one();
    }
}
