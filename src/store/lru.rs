//! The store's index: every committed object's size, in least-recently-served order, under a
//! byte budget.
//!
//! Hand-written rather than a moka cache because the budget is a promise to the operator: an
//! insert evicts, synchronously and exactly, until the bytes on disk (committed objects plus
//! space reserved by fills in flight) fit; pinned objects are never chosen; and the order itself
//! is read out to survive a restart. moka evicts in the background, approximately, and keeps its
//! order to itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use super::StoreError;
use crate::oci::Digest;

#[derive(Clone, Copy, Debug)]
struct Entry {
    len: u64,
    /// Position in `Inner::order`; larger is more recent.
    tick: u64,
    pinned: bool,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Digest, Entry>,
    /// Unpinned entries only, oldest first.
    order: BTreeMap<u64, Digest>,
    next_tick: u64,
    /// Sum of `len` over `entries`, and over the pinned ones.
    bytes: u64,
    pinned_bytes: u64,
    /// Bytes promised to fills in flight, not yet in `entries`.
    reserved: u64,
    pins: HashSet<Digest>,
    /// The order changed since it was last read out.
    dirty: bool,
}

pub struct LruIndex {
    max_bytes: u64,
    inner: Mutex<Inner>,
}

/// What an insert or a reservation pushed out: the caller deletes these files.
pub type Evicted = Vec<(Digest, u64)>;

impl LruIndex {
    pub fn new(max_bytes: u64) -> LruIndex {
        LruIndex {
            max_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("index lock")
    }

    /// The size of an object, without counting as a use.
    pub fn get(&self, digest: &Digest) -> Option<u64> {
        self.lock().entries.get(digest).map(|e| e.len)
    }

    /// Mark an object as just served; returns its size.
    pub fn touch(&self, digest: &Digest) -> Option<u64> {
        let mut inner = self.lock();
        let tick = inner.bump();
        let entry = inner.entries.get_mut(digest)?;
        let (old, len, pinned) = (entry.tick, entry.len, entry.pinned);
        entry.tick = tick;
        if !pinned {
            inner.order.remove(&old);
            inner.order.insert(tick, digest.clone());
        }
        inner.dirty = true;
        Some(len)
    }

    /// Whether an object of `len` bytes could ever be kept.
    pub fn fits(&self, len: u64) -> bool {
        let inner = self.lock();
        len <= self.max_bytes.saturating_sub(inner.pinned_bytes())
    }

    /// Set aside `more` bytes for an object that will then hold `total`, evicting to make
    /// room. Refused, with nothing evicted, when even an empty (unpinned) cache could not hold
    /// `total` ([`StoreError::TooLarge`]), or when the room is promised to other fills in flight
    /// ([`StoreError::NoRoom`]): committed plus reserved bytes never pass the budget.
    pub fn reserve(&self, more: u64, total: u64) -> Result<Evicted, StoreError> {
        let mut inner = self.lock();
        let max = self.max_bytes;
        if total > max.saturating_sub(inner.pinned_bytes()) {
            return Err(StoreError::TooLarge { len: total, max });
        }
        // Everything unpinned can be evicted; what is pinned or reserved cannot.
        if inner.pinned_bytes() + inner.reserved + more > max {
            return Err(StoreError::NoRoom { len: more, max });
        }
        inner.reserved += more;
        Ok(inner.evict_to(max))
    }

    /// Give back a reservation whose fill ended without an insert.
    pub fn release(&self, len: u64) {
        let mut inner = self.lock();
        inner.reserved = inner.reserved.saturating_sub(len);
    }

    /// Record a committed object as the most recently used, turning `reserved` bytes of an
    /// earlier reservation into it, and evict what no longer fits.
    pub fn insert(&self, digest: Digest, len: u64, reserved: u64) -> Evicted {
        let mut inner = self.lock();
        inner.reserved = inner.reserved.saturating_sub(reserved);
        inner.add(digest, len);
        inner.evict_to(self.max_bytes)
    }

    /// Forget an object (purged, or found missing on disk).
    pub fn remove(&self, digest: &Digest) -> Option<u64> {
        self.lock().remove(digest)
    }

    /// Objects that must never be evicted; replaces the previous set.
    pub fn set_pins(&self, pins: HashSet<Digest>) -> Evicted {
        let mut inner = self.lock();
        let digests: Vec<Digest> = inner.entries.keys().cloned().collect();
        inner.pins = pins;
        for digest in digests {
            let pinned = inner.pins.contains(&digest);
            inner.set_pinned(&digest, pinned);
        }
        inner.evict_to(self.max_bytes)
    }

    /// Bytes and count of committed objects.
    pub fn usage(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.bytes, inner.entries.len() as u64)
    }

    pub fn pinned_bytes(&self) -> u64 {
        self.lock().pinned_bytes()
    }

    /// Every object, least recently served first, with its size; pinned objects come last.
    pub fn order(&self) -> Vec<(Digest, u64)> {
        self.lock().order()
    }

    /// [`LruIndex::order`], clearing the changed flag (see [`LruIndex::changed`]).
    pub fn snapshot(&self) -> Vec<(Digest, u64)> {
        let mut inner = self.lock();
        inner.dirty = false;
        inner.order()
    }

    /// Whether anything was inserted, touched or removed since the last snapshot.
    pub fn changed(&self) -> bool {
        self.lock().dirty
    }
}

impl Inner {
    fn order(&self) -> Vec<(Digest, u64)> {
        let inner = self;
        let mut out: Vec<(Digest, u64)> = inner
            .order
            .values()
            .map(|d| (d.clone(), inner.entries[d].len))
            .collect();
        let mut pinned: Vec<(u64, Digest, u64)> = inner
            .entries
            .iter()
            .filter(|(_, e)| e.pinned)
            .map(|(d, e)| (e.tick, d.clone(), e.len))
            .collect();
        pinned.sort();
        out.extend(pinned.into_iter().map(|(_, d, len)| (d, len)));
        out
    }

    fn bump(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }

    fn pinned_bytes(&self) -> u64 {
        self.pinned_bytes
    }

    fn add(&mut self, digest: Digest, len: u64) {
        self.remove(&digest);
        let tick = self.bump();
        let pinned = self.pins.contains(&digest);
        if !pinned {
            self.order.insert(tick, digest.clone());
        }
        self.entries.insert(digest, Entry { len, tick, pinned });
        self.bytes += len;
        if pinned {
            self.pinned_bytes += len;
        }
        self.dirty = true;
    }

    fn remove(&mut self, digest: &Digest) -> Option<u64> {
        let entry = self.entries.remove(digest)?;
        self.order.remove(&entry.tick);
        self.bytes -= entry.len;
        if entry.pinned {
            self.pinned_bytes -= entry.len;
        }
        self.dirty = true;
        Some(entry.len)
    }

    fn set_pinned(&mut self, digest: &Digest, pinned: bool) {
        let Some(entry) = self.entries.get_mut(digest) else {
            return;
        };
        if entry.pinned == pinned {
            return;
        }
        entry.pinned = pinned;
        let (tick, len) = (entry.tick, entry.len);
        if pinned {
            self.order.remove(&tick);
            self.pinned_bytes += len;
        } else {
            self.order.insert(tick, digest.clone());
            self.pinned_bytes -= len;
        }
    }

    /// Drop least recently used unpinned objects until committed plus reserved bytes fit.
    fn evict_to(&mut self, max_bytes: u64) -> Evicted {
        let mut evicted = Vec::new();
        while self.bytes + self.reserved > max_bytes {
            let Some((_, digest)) = self.order.pop_first() else {
                break;
            };
            let len = self.remove(&digest).expect("ordered entries are indexed");
            evicted.push((digest, len));
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[test]
    fn evicts_least_recently_served_first() {
        let index = LruIndex::new(30);
        assert!(index.insert(d(1), 10, 0).is_empty());
        assert!(index.insert(d(2), 10, 0).is_empty());
        assert!(index.insert(d(3), 10, 0).is_empty());
        index.touch(&d(1));
        let evicted = index.insert(d(4), 15, 0);
        assert_eq!(evicted, vec![(d(2), 10), (d(3), 10)]);
        assert_eq!(index.usage(), (25, 2));
        assert_eq!(index.get(&d(1)), Some(10));
    }

    #[test]
    fn get_does_not_count_as_a_use() {
        let index = LruIndex::new(20);
        index.insert(d(1), 10, 0);
        index.insert(d(2), 10, 0);
        index.get(&d(1));
        assert_eq!(index.insert(d(3), 10, 0), vec![(d(1), 10)]);
    }

    #[test]
    fn reservations_make_room_before_the_bytes_arrive() {
        let index = LruIndex::new(30);
        index.insert(d(1), 10, 0);
        index.insert(d(2), 10, 0);
        assert_eq!(index.reserve(15, 15).unwrap(), vec![(d(1), 10)]);
        // The reserved space is not given away to another insert.
        assert_eq!(index.insert(d(3), 10, 0), vec![(d(2), 10)]);
        assert!(index.insert(d(4), 15, 15).is_empty());
        assert_eq!(index.usage(), (25, 2));
    }

    #[test]
    fn too_big_is_refused_without_evicting() {
        let index = LruIndex::new(30);
        index.insert(d(1), 10, 0);
        assert!(matches!(
            index.reserve(31, 31),
            Err(StoreError::TooLarge { len: 31, max: 30 })
        ));
        assert!(!index.fits(31));
        assert_eq!(index.usage(), (10, 1));
    }

    #[test]
    fn reservations_together_never_pass_the_budget() {
        let index = LruIndex::new(30);
        index.insert(d(1), 10, 0);
        assert!(index.set_pins([d(1)].into()).is_empty());
        // Two fills in flight: the first takes what is left, the second finds nothing to evict.
        assert!(index.reserve(15, 15).unwrap().is_empty());
        assert!(matches!(
            index.reserve(15, 15),
            Err(StoreError::NoRoom { len: 15, .. })
        ));
        // Growing by parts counts the parts already held.
        assert!(index.reserve(5, 20).unwrap().is_empty());
        assert!(index.reserve(1, 21).is_err());
        index.release(20);
        assert!(index.reserve(20, 20).is_ok());
    }

    #[test]
    fn pinned_objects_stay_and_shrink_the_budget() {
        let index = LruIndex::new(30);
        index.insert(d(1), 10, 0);
        index.insert(d(2), 10, 0);
        assert!(index.set_pins([d(1)].into()).is_empty());
        assert!(!index.fits(25));
        let evicted = index.insert(d(3), 20, 0);
        assert_eq!(evicted, vec![(d(2), 10)]);
        assert_eq!(index.get(&d(1)), Some(10));
        // Pinned last in the snapshot, the rest oldest first.
        let order: Vec<Digest> = index.snapshot().into_iter().map(|(d, _)| d).collect();
        assert_eq!(order, vec![d(3), d(1)]);
        // Unpinning makes it evictable again, in its old place.
        index.set_pins(HashSet::new());
        assert_eq!(index.insert(d(4), 10, 0), vec![(d(1), 10)]);
    }

    #[test]
    fn snapshot_lists_oldest_first_and_clears_the_changed_flag() {
        let index = LruIndex::new(100);
        index.insert(d(1), 1, 0);
        index.insert(d(2), 2, 0);
        index.touch(&d(1));
        assert!(index.changed());
        assert_eq!(index.snapshot(), vec![(d(2), 2), (d(1), 1)]);
        assert!(!index.changed());
        index.remove(&d(2));
        assert!(index.changed());
        assert_eq!(index.usage(), (1, 1));
    }

    #[test]
    fn reinserting_replaces_without_double_counting() {
        let index = LruIndex::new(100);
        index.insert(d(1), 10, 0);
        index.insert(d(1), 10, 0);
        assert_eq!(index.usage(), (10, 1));
    }
}
