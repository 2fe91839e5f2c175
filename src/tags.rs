//! Tag → digest answers, each fresh until its upstream's `tag_ttl` runs out. Stale entries are
//! kept (bounded by count) so they can be revalidated with a HEAD, or served when the upstream
//! fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::sync::Cache;

use crate::oci::media::AcceptSet;
use crate::oci::{Digest, RepoName, Tag};

/// A tag as one client population sees it: the answer depends on which manifest types the
/// client accepts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TagKey {
    pub upstream: Arc<str>,
    pub name: RepoName,
    pub tag: Tag,
    pub accept: AcceptSet,
}

#[derive(Clone, Debug)]
pub struct TagEntry {
    pub digest: Digest,
    pub fresh_until: Instant,
}

impl TagEntry {
    pub fn is_fresh(&self) -> bool {
        Instant::now() < self.fresh_until
    }
}

pub struct TagCache {
    entries: Cache<TagKey, TagEntry>,
}

impl TagCache {
    pub fn new(max_entries: u64) -> TagCache {
        TagCache {
            entries: Cache::builder().max_capacity(max_entries).build(),
        }
    }

    pub fn get(&self, key: &TagKey) -> Option<TagEntry> {
        self.entries.get(key)
    }

    /// Record `digest` as the tag's answer, fresh for `ttl`.
    pub fn insert(&self, key: TagKey, digest: Digest, ttl: Duration) {
        let fresh_until = Instant::now() + ttl;
        self.entries.insert(
            key,
            TagEntry {
                digest,
                fresh_until,
            },
        );
    }

    pub fn remove(&self, key: &TagKey) {
        self.entries.invalidate(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_go_stale_but_stay() {
        let cache = TagCache::new(10);
        let key = TagKey {
            upstream: Arc::from("docker.io"),
            name: RepoName::parse("library/alpine").unwrap(),
            tag: Tag::parse("3").unwrap(),
            accept: AcceptSet::ALL,
        };
        cache.insert(key.clone(), Digest::of(b"m"), Duration::ZERO);
        let entry = cache.get(&key).expect("stale entries are kept");
        assert!(!entry.is_fresh());
        cache.insert(key.clone(), Digest::of(b"m"), Duration::from_secs(60));
        assert!(cache.get(&key).unwrap().is_fresh());
        cache.remove(&key);
        assert!(cache.get(&key).is_none());
    }
}
