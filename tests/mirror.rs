//! In-process tests of the whole mirror: dockside runs on loopback ports in this process,
//! in front of the fake upstream of `fake/`, which injects the faults a real registry won't.
//! The end-to-end suite (tests/e2e/) does the same with the real binary, a real registry and
//! real clients.
//!
//! Every test runs twice, over the two implementations of the store traits: `on_disk` (the
//! disk store and tag files under a temp `cache.dir`) and `in_memory` (`MemoryStore` and
//! `MemoryTagStore`), so that nothing above the traits depends on which one it talks to.

mod fake;

/// Which stores the mirror of a suite runs on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stores {
    Disk,
    Memory,
}

mod on_disk {
    const STORES: super::Stores = super::Stores::Disk;
    include!("mirror/suite.rs");
}

mod in_memory {
    const STORES: super::Stores = super::Stores::Memory;
    include!("mirror/suite.rs");
}
