//! Tag → digest answers, each fresh until its upstream's `tag_ttl` runs out, kept in memory and
//! in a [`TagStore`] so they outlive a restart (a warm pull after a restart asks upstream
//! nothing, and an offline site resolves tags at all). Stale entries are kept so they can be
//! revalidated with a HEAD, or served when the upstream fails.
//!
//! [`TagCache`] is the front callers use: a bounded memory cache that reads through to its
//! store on a miss and writes through on every answer. The store is only persistence: the local
//! disk ([`disk`], the default) or memory ([`memory`], for tests).

pub mod disk;
pub mod memory;

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::sync::Cache;
use tracing::warn;

use crate::oci::media::AcceptSet;
use crate::oci::{Digest, RepoName, Tag};

pub use disk::DiskTagStore;
pub use memory::MemoryTagStore;

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

/// One saved answer, as [`TagCache::list`] finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedTag {
    pub upstream: Arc<str>,
    pub name: RepoName,
    pub tag: Tag,
    pub accept: AcceptSet,
    pub digest: Digest,
}

/// An answer as a store keeps it. Freshness is wall-clock time, not an `Instant`, because it
/// has to mean the same after a restart (or on another host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredAnswer {
    pub digest: Digest,
    pub fresh_until: SystemTime,
}

/// Where tag answers are kept between restarts. Synchronous, as its callers are: answers are
/// a few dozen bytes each, and the mirror asks for one on the request path without a
/// `spawn_blocking` (see ARCHITECTURE.md on what an object-store implementation needs).
///
/// A store may lose answers (a crash, an unreadable file): a lost answer is a miss, asked
/// upstream again, never an error. So reads return what they could read and removals are best
/// effort; only `save` reports a failure, which the cache logs.
pub trait TagStore: Send + Sync {
    /// The saved answer for one key, if there is one that can be read.
    fn load(&self, key: &TagKey) -> Option<StoredAnswer>;

    /// Save (or replace) the answer for one key.
    fn save(&self, key: &TagKey, answer: &StoredAnswer) -> io::Result<()>;

    /// Forget the answer for one key.
    fn remove(&self, key: &TagKey);

    /// Every saved answer for a tag, whatever the Accept set it was asked with.
    fn answers(&self, upstream: &str, name: &RepoName, tag: &Tag)
    -> Vec<(AcceptSet, StoredAnswer)>;

    /// Forget every answer for a tag; the Accept sets that had one.
    fn remove_tag(&self, upstream: &str, name: &RepoName, tag: &Tag) -> Vec<AcceptSet>;

    /// Forget every answer for a repository's tags (not those of repositories nested under
    /// its name); the tags and Accept sets that had one.
    fn remove_repository(&self, upstream: &str, name: &RepoName) -> Vec<(Tag, AcceptSet)>;

    /// Every saved answer, in no particular order. For reports and purges, not requests.
    fn list(&self) -> Vec<SavedTag>;
}

pub struct TagCache {
    entries: Cache<TagKey, TagEntry>,
    store: Arc<dyn TagStore>,
}

impl TagCache {
    /// Tags on disk under `<cache_dir>/tags`, with at most `max_entries` held in memory.
    pub fn open(cache_dir: &Path, max_entries: u64) -> io::Result<TagCache> {
        let store = DiskTagStore::open(cache_dir)?;
        Ok(TagCache::with_store(Arc::new(store), max_entries))
    }

    /// Tags kept in `store`, with at most `max_entries` held in memory.
    pub fn with_store(store: Arc<dyn TagStore>, max_entries: u64) -> TagCache {
        TagCache {
            entries: Cache::builder().max_capacity(max_entries).build(),
            store,
        }
    }

    pub fn get(&self, key: &TagKey) -> Option<TagEntry> {
        if let Some(entry) = self.entries.get(key) {
            return Some(entry);
        }
        let entry = entry_of(self.store.load(key)?);
        self.entries.insert(key.clone(), entry.clone());
        Some(entry)
    }

    /// Every answer known for a tag, whatever the accept set it was asked with: for serving a
    /// tag from the cache alone, to a client whose accept set was never asked upstream.
    pub fn answers(
        &self,
        upstream: &str,
        name: &RepoName,
        tag: &Tag,
    ) -> Vec<(AcceptSet, TagEntry)> {
        self.store
            .answers(upstream, name, tag)
            .into_iter()
            .map(|(accept, answer)| (accept, entry_of(answer)))
            .collect()
    }

    /// Record `digest` as the tag's answer, fresh for `ttl`.
    pub fn insert(&self, key: TagKey, digest: Digest, ttl: Duration) {
        let answer = StoredAnswer {
            digest: digest.clone(),
            fresh_until: SystemTime::now() + ttl,
        };
        if let Err(e) = self.store.save(&key, &answer) {
            // Still answered from memory; only a restart forgets it.
            warn!(upstream = %key.upstream, name = %key.name, tag = %key.tag, error = %e,
                  "could not save a tag answer");
        }
        let entry = TagEntry {
            digest,
            fresh_until: Instant::now() + ttl,
        };
        self.entries.insert(key, entry);
    }

    /// Record an answer saved elsewhere (the shared tier), with the freshness it was saved with.
    pub fn insert_saved(&self, key: TagKey, answer: StoredAnswer) {
        if let Err(e) = self.store.save(&key, &answer) {
            warn!(upstream = %key.upstream, name = %key.name, tag = %key.tag, error = %e,
                  "could not save a tag answer");
        }
        self.entries.insert(key, entry_of(answer));
    }

    pub fn remove(&self, key: &TagKey) {
        self.entries.invalidate(key);
        self.store.remove(key);
    }

    /// Forget every answer for a tag (all Accept sets); how many there were.
    pub fn remove_tag(&self, upstream: &Arc<str>, name: &RepoName, tag: &Tag) -> usize {
        let removed = self.store.remove_tag(upstream, name, tag);
        for accept in &removed {
            self.entries.invalidate(&TagKey {
                upstream: upstream.clone(),
                name: name.clone(),
                tag: tag.clone(),
                accept: *accept,
            });
        }
        removed.len()
    }

    /// Forget every answer for a repository's tags (all tags, all Accept sets; repositories
    /// nested under its name keep theirs); how many there were.
    pub fn remove_repository(&self, upstream: &Arc<str>, name: &RepoName) -> usize {
        let removed = self.store.remove_repository(upstream, name);
        for (tag, accept) in &removed {
            self.entries.invalidate(&TagKey {
                upstream: upstream.clone(),
                name: name.clone(),
                tag: tag.clone(),
                accept: *accept,
            });
        }
        removed.len()
    }

    /// Every saved answer, sorted by upstream, repository and tag (so a repository's tags, and
    /// a tag's answers, are adjacent). For reports and purges, not requests.
    pub fn list(&self) -> Vec<SavedTag> {
        let mut out = self.store.list();
        out.sort_by(|a, b| (&a.upstream, &a.name, &a.tag).cmp(&(&b.upstream, &b.name, &b.tag)));
        out
    }
}

/// A stored answer on this process's clock: freshness left now, counted from now.
fn entry_of(answer: StoredAnswer) -> TagEntry {
    let left = answer
        .fresh_until
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    TagEntry {
        digest: answer.digest,
        fresh_until: Instant::now() + left,
    }
}

/// The cache's behaviour, checked over each store: every case takes `reopen`, which builds a
/// new cache (empty memory) over the same persisted answers, as a restart does.
#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn key(accept: AcceptSet) -> TagKey {
        TagKey {
            upstream: Arc::from("docker.io"),
            name: RepoName::parse("library/alpine").unwrap(),
            tag: Tag::parse("3").unwrap(),
            accept,
        }
    }

    /// Run `case` over a disk store in a temp dir and over a memory store.
    fn on_each_store(case: fn(&dyn Fn() -> TagCache)) {
        let dir = tempfile::tempdir().unwrap();
        case(&|| TagCache::open(dir.path(), 10).unwrap());
        let memory = Arc::new(MemoryTagStore::default());
        case(&|| TagCache::with_store(memory.clone(), 10));
    }

    /// One `#[test]` per case, each running it over every store.
    macro_rules! on_each_store {
        ($($case:ident),* $(,)?) => {
            mod each_store {
                $(
                    #[test]
                    fn $case() {
                        super::on_each_store(super::$case);
                    }
                )*
            }
        };
    }

    on_each_store!(
        entries_go_stale_but_stay,
        answers_survive_a_restart_with_their_freshness,
        a_nested_repository_does_not_collide_with_tags,
        list_finds_nested_repositories_and_remove_tag_forgets_all_answers,
        remove_repository_forgets_its_tags_but_not_nested_ones,
    );

    fn entries_go_stale_but_stay(reopen: &dyn Fn() -> TagCache) {
        let cache = reopen();
        let key = key(AcceptSet::ALL);
        cache.insert(key.clone(), Digest::of(b"m"), Duration::ZERO);
        let entry = cache.get(&key).expect("stale entries are kept");
        assert!(!entry.is_fresh());
        cache.insert(key.clone(), Digest::of(b"m"), Duration::from_secs(60));
        assert!(cache.get(&key).unwrap().is_fresh());
        cache.remove(&key);
        assert!(cache.get(&key).is_none());
    }

    fn answers_survive_a_restart_with_their_freshness(reopen: &dyn Fn() -> TagCache) {
        let fresh = key(AcceptSet::ALL);
        let narrow = key(AcceptSet::from_bits(0b0010).unwrap());
        {
            let cache = reopen();
            cache.insert(fresh.clone(), Digest::of(b"a"), Duration::from_secs(600));
            cache.insert(narrow.clone(), Digest::of(b"b"), Duration::ZERO);
        }
        let cache = reopen();
        let entry = cache.get(&fresh).unwrap();
        assert_eq!(entry.digest, Digest::of(b"a"));
        assert!(entry.is_fresh());
        assert!(!cache.get(&narrow).unwrap().is_fresh());
        let mut all = cache.answers("docker.io", &fresh.name, &fresh.tag);
        all.sort_by_key(|(accept, _)| accept.bits());
        let digests: Vec<Digest> = all.into_iter().map(|(_, e)| e.digest).collect();
        assert_eq!(digests, vec![Digest::of(b"b"), Digest::of(b"a")]);
    }

    fn a_nested_repository_does_not_collide_with_tags(reopen: &dyn Fn() -> TagCache) {
        let cache = reopen();
        let outer = key(AcceptSet::ALL);
        let inner = TagKey {
            name: RepoName::parse("library/alpine/3").unwrap(),
            ..outer.clone()
        };
        cache.insert(outer.clone(), Digest::of(b"outer"), Duration::from_secs(60));
        cache.insert(inner.clone(), Digest::of(b"inner"), Duration::from_secs(60));
        let reopened = reopen();
        assert_eq!(reopened.get(&outer).unwrap().digest, Digest::of(b"outer"));
        assert_eq!(reopened.get(&inner).unwrap().digest, Digest::of(b"inner"));
    }

    fn list_finds_nested_repositories_and_remove_tag_forgets_all_answers(
        reopen: &dyn Fn() -> TagCache,
    ) {
        let cache = reopen();
        let outer = key(AcceptSet::ALL);
        let narrow = key(AcceptSet::from_bits(1).unwrap());
        let inner = TagKey {
            name: RepoName::parse("library/alpine/sub").unwrap(),
            ..outer.clone()
        };
        for k in [&outer, &narrow, &inner] {
            cache.insert(
                k.clone(),
                Digest::of(k.name.as_str().as_bytes()),
                Duration::from_secs(60),
            );
        }
        let listed: Vec<(String, String, u8)> = cache
            .list()
            .into_iter()
            .map(|t| (t.name.to_string(), t.tag.to_string(), t.accept.bits()))
            .collect();
        assert_eq!(listed.len(), 3);
        assert!(listed.contains(&("library/alpine/sub".into(), "3".into(), 15)));
        assert!(listed.contains(&("library/alpine".into(), "3".into(), 1)));
        assert_eq!(
            cache.remove_tag(&outer.upstream, &outer.name, &outer.tag),
            2
        );
        assert!(cache.get(&outer).is_none() && cache.get(&narrow).is_none());
        assert!(cache.get(&inner).is_some());
        assert_eq!(cache.list().len(), 1);
    }

    fn remove_repository_forgets_its_tags_but_not_nested_ones(reopen: &dyn Fn() -> TagCache) {
        let cache = reopen();
        let v3 = key(AcceptSet::ALL);
        let narrow = key(AcceptSet::from_bits(1).unwrap());
        let edge = TagKey {
            tag: Tag::parse("edge").unwrap(),
            ..v3.clone()
        };
        let nested = TagKey {
            name: RepoName::parse("library/alpine/sub").unwrap(),
            ..v3.clone()
        };
        for k in [&v3, &narrow, &edge, &nested] {
            cache.insert(k.clone(), Digest::of(b"m"), Duration::from_secs(60));
        }
        // Every answer is in memory now: a removal must reach it, not only the store.
        assert_eq!(cache.remove_repository(&v3.upstream, &v3.name), 3);
        for gone in [&v3, &narrow, &edge] {
            assert!(cache.get(gone).is_none(), "{}", gone.tag);
        }
        assert!(cache.get(&nested).is_some());
        assert!(reopen().get(&nested).is_some());
        assert!(reopen().get(&edge).is_none());
    }
}
