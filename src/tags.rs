//! Tag → digest answers, each fresh until its upstream's `tag_ttl` runs out, kept in memory and
//! on disk so they outlive a restart (a warm pull after a restart asks upstream nothing, and an
//! offline site resolves tags at all). Stale entries are kept so they can be revalidated with a
//! HEAD, or served when the upstream fails.
//!
//! On disk: `<cache.dir>/tags/<upstream>/<repository>/_tags/<tag>/<accept set>`, one small file
//! per answer holding `<digest> <fresh until, unix seconds>`. `_tags` cannot be a repository
//! path component (those start with a letter or digit), so a repository nested inside another
//! never collides with its tags.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moka::sync::Cache;
use tracing::warn;

use crate::oci::media::AcceptSet;
use crate::oci::{Digest, RepoName, Tag};

const TAGS_DIR: &str = "_tags";

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

pub struct TagCache {
    entries: Cache<TagKey, TagEntry>,
    dir: PathBuf,
}

impl TagCache {
    /// Tags under `<cache_dir>/tags`, with at most `max_entries` held in memory.
    pub fn open(cache_dir: &Path, max_entries: u64) -> io::Result<TagCache> {
        let dir = cache_dir.join("tags");
        fs::create_dir_all(&dir)?;
        Ok(TagCache {
            entries: Cache::builder().max_capacity(max_entries).build(),
            dir,
        })
    }

    pub fn get(&self, key: &TagKey) -> Option<TagEntry> {
        if let Some(entry) = self.entries.get(key) {
            return Some(entry);
        }
        let entry = read_entry(&self.answer_path(key))?;
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
        let dir = self.tag_dir(upstream, name, tag);
        let Ok(files) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        files
            .filter_map(Result::ok)
            .filter_map(|f| {
                let accept = accept_of(&f.file_name().to_string_lossy())?;
                Some((accept, read_entry(&f.path())?))
            })
            .collect()
    }

    /// Record `digest` as the tag's answer, fresh for `ttl`.
    pub fn insert(&self, key: TagKey, digest: Digest, ttl: Duration) {
        let entry = TagEntry {
            digest,
            fresh_until: Instant::now() + ttl,
        };
        if let Err(e) = write_entry(&self.answer_path(&key), &entry, ttl) {
            // Still answered from memory; only a restart forgets it.
            warn!(upstream = %key.upstream, name = %key.name, tag = %key.tag, error = %e,
                  "could not save a tag answer to disk");
        }
        self.entries.insert(key, entry);
    }

    pub fn remove(&self, key: &TagKey) {
        self.entries.invalidate(key);
        let _ = fs::remove_file(self.answer_path(key));
    }

    /// Forget every answer for a tag (all Accept sets); how many there were.
    pub fn remove_tag(&self, upstream: &Arc<str>, name: &RepoName, tag: &Tag) -> usize {
        let answers = self.answers(upstream, name, tag);
        for (accept, _) in &answers {
            self.entries.invalidate(&TagKey {
                upstream: upstream.clone(),
                name: name.clone(),
                tag: tag.clone(),
                accept: *accept,
            });
        }
        let _ = fs::remove_dir_all(self.tag_dir(upstream, name, tag));
        answers.len()
    }

    /// Every saved answer, walking the directory. For reports and purges, not requests.
    pub fn list(&self) -> Vec<SavedTag> {
        let mut out = Vec::new();
        let Ok(upstreams) = fs::read_dir(&self.dir) else {
            return out;
        };
        for upstream in upstreams.filter_map(Result::ok) {
            let name = upstream.file_name().to_string_lossy().into_owned();
            let upstream_name: Arc<str> = Arc::from(name.as_str());
            self.walk_repos(&upstream.path(), &upstream_name, "", &mut out);
        }
        out.sort_by(|a, b| (&a.upstream, &a.name, &a.tag).cmp(&(&b.upstream, &b.name, &b.tag)));
        out
    }

    /// Descend through repository path components until a `_tags` directory.
    fn walk_repos(&self, dir: &Path, upstream: &Arc<str>, prefix: &str, out: &mut Vec<SavedTag>) {
        let Ok(children) = fs::read_dir(dir) else {
            return;
        };
        for child in children.filter_map(Result::ok) {
            let component = child.file_name().to_string_lossy().into_owned();
            if !child.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if component == TAGS_DIR {
                let Ok(name) = RepoName::parse(prefix) else {
                    continue;
                };
                self.collect_tags(&child.path(), upstream, &name, out);
            } else {
                let path = if prefix.is_empty() {
                    component
                } else {
                    format!("{prefix}/{component}")
                };
                self.walk_repos(&child.path(), upstream, &path, out);
            }
        }
    }

    fn collect_tags(
        &self,
        dir: &Path,
        upstream: &Arc<str>,
        name: &RepoName,
        out: &mut Vec<SavedTag>,
    ) {
        let Ok(tags) = fs::read_dir(dir) else {
            return;
        };
        for tag in tags.filter_map(Result::ok) {
            let Ok(tag) = Tag::parse(&tag.file_name().to_string_lossy()) else {
                continue;
            };
            for (accept, entry) in self.answers(upstream, name, &tag) {
                out.push(SavedTag {
                    upstream: upstream.clone(),
                    name: name.clone(),
                    tag: tag.clone(),
                    accept,
                    digest: entry.digest,
                });
            }
        }
    }

    fn repo_dir(&self, upstream: &str, name: &RepoName) -> PathBuf {
        self.dir.join(upstream).join(name.as_str())
    }

    fn tag_dir(&self, upstream: &str, name: &RepoName, tag: &Tag) -> PathBuf {
        self.repo_dir(upstream, name)
            .join(TAGS_DIR)
            .join(tag.as_str())
    }

    fn answer_path(&self, key: &TagKey) -> PathBuf {
        self.tag_dir(&key.upstream, &key.name, &key.tag)
            .join(format!("{:x}", key.accept.bits()))
    }
}

fn accept_of(file_name: &str) -> Option<AcceptSet> {
    AcceptSet::from_bits(u8::from_str_radix(file_name, 16).ok()?)
}

fn read_entry(path: &Path) -> Option<TagEntry> {
    let text = fs::read_to_string(path).ok()?;
    let parsed = text.trim_end().split_once(' ').and_then(|(digest, until)| {
        Some((Digest::parse(digest).ok()?, until.parse::<u64>().ok()?))
    });
    let Some((digest, until)) = parsed else {
        warn!(path = %path.display(), "ignoring a malformed tag file");
        return None;
    };
    let until = UNIX_EPOCH + Duration::from_secs(until);
    let left = until.duration_since(SystemTime::now()).unwrap_or_default();
    Some(TagEntry {
        digest,
        fresh_until: Instant::now() + left,
    })
}

/// Written to a temp name and renamed, so a reader never sees half a file. Not fsync'ed: a tag
/// answer lost in a crash is asked upstream again.
fn write_entry(path: &Path, entry: &TagEntry, ttl: Duration) -> io::Result<()> {
    let dir = path.parent().expect("answer paths have a directory");
    fs::create_dir_all(dir)?;
    let until = SystemTime::now() + ttl;
    let secs = until
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let tmp = dir.join(format!(".tmp.{:016x}", rand::random::<u64>()));
    fs::write(&tmp, format!("{} {secs}\n", entry.digest))?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(accept: AcceptSet) -> TagKey {
        TagKey {
            upstream: Arc::from("docker.io"),
            name: RepoName::parse("library/alpine").unwrap(),
            tag: Tag::parse("3").unwrap(),
            accept,
        }
    }

    #[test]
    fn entries_go_stale_but_stay() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TagCache::open(dir.path(), 10).unwrap();
        let key = key(AcceptSet::ALL);
        cache.insert(key.clone(), Digest::of(b"m"), Duration::ZERO);
        let entry = cache.get(&key).expect("stale entries are kept");
        assert!(!entry.is_fresh());
        cache.insert(key.clone(), Digest::of(b"m"), Duration::from_secs(60));
        assert!(cache.get(&key).unwrap().is_fresh());
        cache.remove(&key);
        assert!(cache.get(&key).is_none());
    }

    #[test]
    fn answers_survive_a_restart_with_their_freshness() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = key(AcceptSet::ALL);
        let narrow = key(AcceptSet::from_bits(0b0010).unwrap());
        {
            let cache = TagCache::open(dir.path(), 10).unwrap();
            cache.insert(fresh.clone(), Digest::of(b"a"), Duration::from_secs(600));
            cache.insert(narrow.clone(), Digest::of(b"b"), Duration::ZERO);
        }
        let cache = TagCache::open(dir.path(), 10).unwrap();
        let entry = cache.get(&fresh).unwrap();
        assert_eq!(entry.digest, Digest::of(b"a"));
        assert!(entry.is_fresh());
        assert!(!cache.get(&narrow).unwrap().is_fresh());
        let mut all = cache.answers("docker.io", &fresh.name, &fresh.tag);
        all.sort_by_key(|(accept, _)| accept.bits());
        let digests: Vec<Digest> = all.into_iter().map(|(_, e)| e.digest).collect();
        assert_eq!(digests, vec![Digest::of(b"b"), Digest::of(b"a")]);
    }

    #[test]
    fn a_nested_repository_does_not_collide_with_tags() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TagCache::open(dir.path(), 10).unwrap();
        let outer = key(AcceptSet::ALL);
        let inner = TagKey {
            name: RepoName::parse("library/alpine/3").unwrap(),
            ..outer.clone()
        };
        cache.insert(outer.clone(), Digest::of(b"outer"), Duration::from_secs(60));
        cache.insert(inner.clone(), Digest::of(b"inner"), Duration::from_secs(60));
        let reopened = TagCache::open(dir.path(), 10).unwrap();
        assert_eq!(reopened.get(&outer).unwrap().digest, Digest::of(b"outer"));
        assert_eq!(reopened.get(&inner).unwrap().digest, Digest::of(b"inner"));
    }

    #[test]
    fn list_finds_nested_repositories_and_remove_tag_forgets_all_answers() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TagCache::open(dir.path(), 10).unwrap();
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

    #[test]
    fn a_corrupt_file_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TagCache::open(dir.path(), 10).unwrap();
        let key = key(AcceptSet::ALL);
        let path = cache.answer_path(&key);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "not a digest\n").unwrap();
        assert!(cache.get(&key).is_none());
    }
}
