//! The store's index: every committed object's size, in least-recently-served order, under a
//! byte budget.
//!
//! Hand-written rather than a moka cache because the budget is a promise to the operator: an
//! insert evicts, synchronously and exactly, until the bytes on disk (committed objects plus
//! space reserved by fills in flight) fit; pinned objects are never chosen; and the order itself
//! is read out to survive a restart. moka evicts in the background, approximately, and keeps its
//! order to itself.
//!
//! Laid out for a million objects: one 56-byte node per object in a slab, linked into two
//! recency lists (unpinned, pinned) by `u32` slots, and a table of slots keyed by digest, about
//! 70 bytes an object in all. A touch, an insert and an eviction are O(1) and allocate nothing
//! once the slab has grown; a `HashMap<Digest, _>` beside a `BTreeMap` of ticks took ~190.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::Mutex;

use hashbrown::{DefaultHashBuilder, HashTable};

use super::StoreError;
use crate::oci::Digest;

/// No slot: the end of a list.
const NIL: u32 = u32::MAX;
/// The stamp's top bit: the node is in the pinned list.
const PINNED: u64 = 1 << 63;
/// Ticks given while running start here, so that objects found on disk after the saved order
/// was loaded ([`LruIndex::insert_found`]) can be placed below everything served since.
const RUN_TICKS: u64 = 1 << 40;
/// Objects a reservation evicts under one hold of the lock (about half a millisecond at a
/// million objects). Every request that serves from the cache touches the index, so making
/// room for one large blob must not hold them all up while it pushes out 100,000 small ones.
pub const EVICT_BATCH: usize = 1024;

struct Node {
    digest: Digest,
    len: u64,
    /// When it was last served (larger is more recent), with [`PINNED`] or'ed in.
    stamp: u64,
    prev: u32,
    /// The next newer node; for a free slot, the next free one.
    next: u32,
}

impl Node {
    fn tick(&self) -> u64 {
        self.stamp & !PINNED
    }

    fn pinned(&self) -> bool {
        self.stamp & PINNED != 0
    }
}

/// A recency list through the slab, oldest at `head`.
#[derive(Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
}

const EMPTY: List = List {
    head: NIL,
    tail: NIL,
};

struct Inner {
    nodes: Vec<Node>,
    /// First free slot in `nodes`, chained through `next`.
    free: u32,
    /// Slots of live nodes, hashed by their digest.
    table: HashTable<u32>,
    hasher: DefaultHashBuilder,
    unpinned: List,
    pinned: List,
    count: u64,
    /// The last tick given out while running, and the last one given to a loaded or found
    /// object.
    tick: u64,
    loaded: u64,
    /// Sum of `len` over live nodes, and over the pinned ones.
    bytes: u64,
    pinned_bytes: u64,
    /// Bytes promised to fills in flight, not yet indexed.
    reserved: u64,
    pins: HashSet<Digest>,
    /// The order changed since it was last read out.
    dirty: bool,
}

impl Default for Inner {
    fn default() -> Inner {
        Inner {
            nodes: Vec::new(),
            free: NIL,
            table: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            unpinned: EMPTY,
            pinned: EMPTY,
            count: 0,
            tick: RUN_TICKS,
            loaded: 0,
            bytes: 0,
            pinned_bytes: 0,
            reserved: 0,
            pins: HashSet::new(),
            dirty: false,
        }
    }
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
        let inner = self.lock();
        inner.find(digest).map(|slot| inner.node(slot).len)
    }

    /// Which of `digests` are indexed, under one hold of the lock.
    pub fn contains_each<'a>(&self, digests: impl Iterator<Item = &'a Digest>) -> Vec<bool> {
        let inner = self.lock();
        digests.map(|digest| inner.find(digest).is_some()).collect()
    }

    /// Mark an object as just served; returns its size.
    pub fn touch(&self, digest: &Digest) -> Option<u64> {
        let mut inner = self.lock();
        let slot = inner.find(digest)?;
        inner.unlink(slot);
        let tick = inner.bump();
        let node = inner.node_mut(slot);
        node.stamp = tick | (node.stamp & PINNED);
        let len = node.len;
        inner.push_newest(slot);
        inner.dirty = true;
        Some(len)
    }

    /// Whether an object of `len` bytes could ever be kept.
    pub fn fits(&self, len: u64) -> bool {
        let inner = self.lock();
        len <= self.max_bytes.saturating_sub(inner.pinned_bytes)
    }

    /// Set aside `more` bytes for an object that will then hold `total`, evicting to make
    /// room. Refused, with nothing evicted, when even an empty (unpinned) cache could not hold
    /// `total` ([`StoreError::TooLarge`]), or when the room is promised to other fills in flight
    /// ([`StoreError::NoRoom`]): committed plus reserved bytes never pass the budget.
    pub fn reserve(&self, more: u64, total: u64) -> Result<Evicted, StoreError> {
        let mut all = Vec::new();
        self.reserve_in_batches(more, total, |batch| all.extend(batch))?;
        Ok(all)
    }

    /// [`LruIndex::reserve`], evicting at most [`EVICT_BATCH`] objects per hold of the lock;
    /// `evicted` gets each batch with the lock released. The reservation is taken at once, so
    /// between batches committed plus reserved bytes may pass the budget: not on disk, as no
    /// byte of the reserving object lands before this returns.
    pub fn reserve_in_batches(
        &self,
        more: u64,
        total: u64,
        mut evicted: impl FnMut(Evicted),
    ) -> Result<(), StoreError> {
        let first = {
            let mut inner = self.lock();
            let max = self.max_bytes;
            if total > max.saturating_sub(inner.pinned_bytes) {
                return Err(StoreError::TooLarge { len: total, max });
            }
            // Everything unpinned can be evicted; what is pinned or reserved cannot.
            if inner.pinned_bytes + inner.reserved + more > max {
                return Err(StoreError::NoRoom { len: more, max });
            }
            inner.reserved += more;
            inner.evict_some(max, EVICT_BATCH)
        };
        let mut full = first.len() == EVICT_BATCH;
        evicted(first);
        while full {
            let batch = self.lock().evict_some(self.max_bytes, EVICT_BATCH);
            full = batch.len() == EVICT_BATCH;
            evicted(batch);
        }
        Ok(())
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
        inner.remove(&digest);
        let tick = inner.bump();
        let slot = inner.add(digest, len, tick);
        inner.push_newest(slot);
        inner.evict_to(self.max_bytes)
    }

    /// Fill an empty index from a saved order, oldest first, faster than one insert at a time:
    /// the slab and table are sized once. Everything loaded is older than anything served
    /// since. Evicts what does not fit.
    pub fn load(&self, order: Vec<(Digest, u64)>) -> Evicted {
        let mut inner = self.lock();
        debug_assert_eq!(inner.count, 0, "load fills an empty index");
        inner.nodes.reserve_exact(order.len());
        let Inner {
            table,
            nodes,
            hasher,
            ..
        } = &mut *inner;
        table.reserve(order.len(), |&slot| {
            hasher.hash_one(&nodes[slot as usize].digest)
        });
        for (tick, (digest, len)) in (1..).zip(order) {
            if inner.find(&digest).is_some() {
                continue;
            }
            let slot = inner.add(digest, len, tick);
            inner.push_newest(slot);
            inner.loaded = tick;
        }
        inner.evict_to(self.max_bytes)
    }

    /// Index objects found on disk that the saved order did not know, oldest first: they are
    /// placed after the loaded ones and before anything served or inserted since. Digests
    /// already indexed (committed meanwhile) are left as they are.
    pub fn insert_found(&self, found: Vec<(Digest, u64)>) -> Evicted {
        let mut inner = self.lock();
        let mut tick = inner.loaded;
        let mut slots = Vec::with_capacity(found.len());
        for (digest, len) in found {
            if inner.find(&digest).is_some() {
                continue;
            }
            tick += 1;
            slots.push(inner.add(digest, len, tick));
        }
        inner.loaded = tick;
        inner.merge(slots);
        inner.evict_to(self.max_bytes)
    }

    /// Forget an object (purged, or found missing on disk).
    pub fn remove(&self, digest: &Digest) -> Option<u64> {
        self.lock().remove(digest)
    }

    /// Objects that must never be evicted; replaces the previous set. An object keeps its
    /// place in recency order as it moves between the lists.
    pub fn set_pins(&self, pins: HashSet<Digest>) -> Evicted {
        let mut inner = self.lock();
        let mut changed = Vec::new();
        let mut slot = inner.pinned.head;
        while slot != NIL {
            let node = inner.node(slot);
            if !pins.contains(&node.digest) {
                changed.push(slot);
            }
            slot = node.next;
        }
        for digest in &pins {
            if let Some(slot) = inner.find(digest) {
                if !inner.node(slot).pinned() {
                    changed.push(slot);
                }
            }
        }
        for &slot in &changed {
            inner.unlink(slot);
            let node = inner.node_mut(slot);
            node.stamp ^= PINNED;
            let (len, pinned) = (node.len, node.pinned());
            if pinned {
                inner.pinned_bytes += len;
            } else {
                inner.pinned_bytes -= len;
            }
        }
        inner.merge(changed);
        inner.pins = pins;
        inner.evict_to(self.max_bytes)
    }

    /// Bytes and count of committed objects.
    pub fn usage(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.bytes, inner.count)
    }

    pub fn pinned_bytes(&self) -> u64 {
        self.lock().pinned_bytes
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
    fn node(&self, slot: u32) -> &Node {
        &self.nodes[slot as usize]
    }

    fn node_mut(&mut self, slot: u32) -> &mut Node {
        &mut self.nodes[slot as usize]
    }

    fn bump(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn find(&self, digest: &Digest) -> Option<u32> {
        let hash = self.hasher.hash_one(digest);
        let nodes = &self.nodes;
        self.table
            .find(hash, |&slot| nodes[slot as usize].digest == *digest)
            .copied()
    }

    /// Put a new node in the slab and the table, counted but not yet linked into a list.
    fn add(&mut self, digest: Digest, len: u64, tick: u64) -> u32 {
        let pinned = if self.pins.contains(&digest) {
            PINNED
        } else {
            0
        };
        let node = Node {
            digest,
            len,
            stamp: tick | pinned,
            prev: NIL,
            next: NIL,
        };
        let slot = if self.free == NIL {
            let slot = u32::try_from(self.nodes.len()).expect("fewer than 2^32 objects");
            self.nodes.push(node);
            slot
        } else {
            let slot = self.free;
            self.free = self.node(slot).next;
            *self.node_mut(slot) = node;
            slot
        };
        let Inner {
            table,
            nodes,
            hasher,
            ..
        } = self;
        let hash = hasher.hash_one(&nodes[slot as usize].digest);
        table.insert_unique(hash, slot, |&s| hasher.hash_one(&nodes[s as usize].digest));
        self.count += 1;
        self.bytes += len;
        if pinned != 0 {
            self.pinned_bytes += len;
        }
        self.dirty = true;
        slot
    }

    fn remove(&mut self, digest: &Digest) -> Option<u64> {
        let hash = self.hasher.hash_one(digest);
        let nodes = &self.nodes;
        let entry = self
            .table
            .find_entry(hash, |&slot| nodes[slot as usize].digest == *digest)
            .ok()?;
        let (slot, _) = entry.remove();
        self.unlink(slot);
        let (len, pinned) = (self.node(slot).len, self.node(slot).pinned());
        self.node_mut(slot).next = self.free;
        self.free = slot;
        self.count -= 1;
        self.bytes -= len;
        if pinned {
            self.pinned_bytes -= len;
        }
        self.dirty = true;
        Some(len)
    }

    fn list_mut(&mut self, pinned: bool) -> &mut List {
        if pinned {
            &mut self.pinned
        } else {
            &mut self.unpinned
        }
    }

    fn unlink(&mut self, slot: u32) {
        let Node {
            prev, next, stamp, ..
        } = *self.node(slot);
        match prev {
            NIL => self.list_mut(stamp & PINNED != 0).head = next,
            prev => self.node_mut(prev).next = next,
        }
        match next {
            NIL => self.list_mut(stamp & PINNED != 0).tail = prev,
            next => self.node_mut(next).prev = prev,
        }
        let node = self.node_mut(slot);
        node.prev = NIL;
        node.next = NIL;
    }

    /// Link an unlinked node after `after` in its list (at the head for [`NIL`]).
    fn link_after(&mut self, slot: u32, after: u32) {
        let pinned = self.node(slot).pinned();
        let next = match after {
            NIL => self.list_mut(pinned).head,
            after => self.node(after).next,
        };
        let node = self.node_mut(slot);
        node.prev = after;
        node.next = next;
        match after {
            NIL => self.list_mut(pinned).head = slot,
            after => self.node_mut(after).next = slot,
        }
        match next {
            NIL => self.list_mut(pinned).tail = slot,
            next => self.node_mut(next).prev = slot,
        }
    }

    fn push_newest(&mut self, slot: u32) {
        let tail = self.list_mut(self.node(slot).pinned()).tail;
        self.link_after(slot, tail);
    }

    /// Link unlinked nodes into their lists by tick: newest first, each walking back from
    /// where the one before it went, so one pass over each list places them all.
    fn merge(&mut self, mut slots: Vec<u32>) {
        slots.sort_unstable_by_key(|&slot| std::cmp::Reverse(self.node(slot).tick()));
        let mut cursor = [self.unpinned.tail, self.pinned.tail];
        for slot in slots {
            let (tick, pinned) = (self.node(slot).tick(), self.node(slot).pinned());
            let at = &mut cursor[usize::from(pinned)];
            while *at != NIL && self.nodes[*at as usize].tick() > tick {
                *at = self.nodes[*at as usize].prev;
            }
            let after = *at;
            self.link_after(slot, after);
        }
    }

    fn order(&self) -> Vec<(Digest, u64)> {
        let mut out = Vec::with_capacity(self.count as usize);
        for list in [self.unpinned, self.pinned] {
            let mut slot = list.head;
            while slot != NIL {
                let node = self.node(slot);
                out.push((node.digest.clone(), node.len));
                slot = node.next;
            }
        }
        out
    }

    /// Drop least recently used unpinned objects until committed plus reserved bytes fit.
    fn evict_to(&mut self, max_bytes: u64) -> Evicted {
        self.evict_some(max_bytes, usize::MAX)
    }

    /// Evict, least recently served first, until the budget holds or `limit` objects are out.
    fn evict_some(&mut self, max_bytes: u64, limit: usize) -> Evicted {
        let mut evicted = Vec::new();
        while self.bytes + self.reserved > max_bytes
            && self.unpinned.head != NIL
            && evicted.len() < limit
        {
            let digest = self.node(self.unpinned.head).digest.clone();
            let len = self.remove(&digest).expect("listed nodes are indexed");
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
    fn a_reservation_evicts_in_batches_releasing_the_index_between_them() {
        let n = EVICT_BATCH * 2 + 10;
        let index = LruIndex::new(n as u64);
        for i in 0..n {
            index.insert(Digest::of(&i.to_le_bytes()), 1, 0);
        }
        let mut batches = Vec::new();
        index
            .reserve_in_batches(n as u64, n as u64, |batch| {
                assert!(index.inner.try_lock().is_ok(), "the index is held");
                batches.push(batch.len());
            })
            .unwrap();
        assert_eq!(batches, vec![EVICT_BATCH, EVICT_BATCH, 10]);
        assert_eq!(index.usage(), (0, 0));
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

    #[test]
    fn loaded_objects_are_older_than_anything_served_since() {
        let index = LruIndex::new(30);
        assert!(index.load(vec![(d(1), 10), (d(2), 10)]).is_empty());
        index.touch(&d(1));
        assert_eq!(index.insert(d(3), 10, 0), vec![]);
        assert_eq!(index.insert(d(4), 10, 0), vec![(d(2), 10)]);
        assert_eq!(index.order(), vec![(d(1), 10), (d(3), 10), (d(4), 10)]);
    }

    #[test]
    fn loading_more_than_fits_evicts_the_oldest() {
        let index = LruIndex::new(20);
        let evicted = index.load(vec![(d(1), 10), (d(2), 10), (d(3), 10)]);
        assert_eq!(evicted, vec![(d(1), 10)]);
        assert_eq!(index.usage(), (20, 2));
    }

    #[test]
    fn found_objects_go_between_the_loaded_and_the_served() {
        let index = LruIndex::new(100);
        index.load(vec![(d(1), 1), (d(2), 1)]);
        index.touch(&d(1));
        index.insert(d(3), 1, 0);
        // d(3) was committed while the disk was still being listed: it stays where it is.
        index.insert_found(vec![(d(4), 1), (d(3), 1), (d(5), 1)]);
        index.insert_found(vec![(d(6), 1)]);
        let order: Vec<Digest> = index.order().into_iter().map(|(d, _)| d).collect();
        assert_eq!(order, vec![d(2), d(4), d(5), d(6), d(1), d(3)]);
        assert_eq!(index.usage(), (6, 6));
    }

    #[test]
    fn freed_slots_are_reused() {
        let index = LruIndex::new(2);
        for n in 0..50 {
            index.insert(d(n), 1, 0);
        }
        assert_eq!(index.lock().nodes.len(), 3);
        assert_eq!(index.order(), vec![(d(48), 1), (d(49), 1)]);
    }

    /// The slab's lists against the plainest model of the same rules: a list of (digest, len,
    /// pinned) kept oldest first.
    #[test]
    fn matches_a_plain_model_under_random_operations() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let index = LruIndex::new(60);
        let mut model: Vec<(Digest, u64, bool)> = Vec::new();
        let mut pins: HashSet<Digest> = HashSet::new();
        let model_evict = |model: &mut Vec<(Digest, u64, bool)>| {
            let mut out = Vec::new();
            while model.iter().map(|e| e.1).sum::<u64>() > 60 {
                let Some(at) = model.iter().position(|e| !e.2) else {
                    break;
                };
                let (digest, len, _) = model.remove(at);
                out.push((digest, len));
            }
            out
        };
        for _ in 0..5000 {
            let digest = d(rng.random_range(0..24));
            match rng.random_range(0..10) {
                0..=3 => {
                    let len = rng.random_range(1..12);
                    model.retain(|e| e.0 != digest);
                    model.push((digest.clone(), len, pins.contains(&digest)));
                    let want = model_evict(&mut model);
                    assert_eq!(index.insert(digest, len, 0), want);
                }
                4..=6 => {
                    let at = model.iter().position(|e| e.0 == digest);
                    let want = at.map(|at| {
                        let e = model.remove(at);
                        let len = e.1;
                        model.push(e);
                        len
                    });
                    assert_eq!(index.touch(&digest), want);
                }
                7 => {
                    let at = model.iter().position(|e| e.0 == digest);
                    let want = at.map(|at| model.remove(at).1);
                    assert_eq!(index.remove(&digest), want);
                }
                _ => {
                    pins = (0..24).filter(|_| rng.random_bool(0.2)).map(d).collect();
                    for e in &mut model {
                        e.2 = pins.contains(&e.0);
                    }
                    let want = model_evict(&mut model);
                    assert_eq!(index.set_pins(pins.clone()), want);
                }
            }
            let mut want: Vec<(Digest, u64)> = model
                .iter()
                .filter(|e| !e.2)
                .map(|e| (e.0.clone(), e.1))
                .collect();
            want.extend(model.iter().filter(|e| e.2).map(|e| (e.0.clone(), e.1)));
            assert_eq!(index.order(), want);
            let pinned: u64 = model.iter().filter(|e| e.2).map(|e| e.1).sum();
            assert_eq!(index.pinned_bytes(), pinned);
        }
    }
}
