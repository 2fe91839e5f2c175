//! Tag answers on the local disk: `<cache.dir>/tags/<upstream>/<repository>/_tags/<tag>/<accept
//! set>`, one small file per answer holding `<digest> <fresh until, unix seconds>`. `_tags`
//! cannot be a repository path component (those start with a letter or digit), so a repository
//! nested inside another never collides with its tags.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tracing::warn;

use super::{SavedTag, StoredAnswer, TagKey, TagStore};
use crate::oci::media::AcceptSet;
use crate::oci::{Digest, RepoName, Tag};

const TAGS_DIR: &str = "_tags";

pub struct DiskTagStore {
    dir: PathBuf,
}

impl DiskTagStore {
    /// The answers under `<cache_dir>/tags` (created if missing).
    pub fn open(cache_dir: &Path) -> io::Result<DiskTagStore> {
        let dir = cache_dir.join("tags");
        fs::create_dir_all(&dir)?;
        Ok(DiskTagStore { dir })
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
                for (tag, accept, answer) in self.repo_answers(upstream, &name) {
                    out.push(SavedTag {
                        upstream: upstream.clone(),
                        name: name.clone(),
                        tag,
                        accept,
                        digest: answer.digest,
                    });
                }
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

    /// Every readable answer of a repository's tags.
    fn repo_answers(&self, upstream: &str, name: &RepoName) -> Vec<(Tag, AcceptSet, StoredAnswer)> {
        let Ok(tags) = fs::read_dir(self.repo_dir(upstream, name).join(TAGS_DIR)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for tag in tags.filter_map(Result::ok) {
            let Ok(tag) = Tag::parse(&tag.file_name().to_string_lossy()) else {
                continue;
            };
            for (accept, answer) in self.answers(upstream, name, &tag) {
                out.push((tag.clone(), accept, answer));
            }
        }
        out
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

impl TagStore for DiskTagStore {
    fn load(&self, key: &TagKey) -> Option<StoredAnswer> {
        read_answer(&self.answer_path(key))
    }

    fn save(&self, key: &TagKey, answer: &StoredAnswer) -> io::Result<()> {
        write_answer(&self.answer_path(key), answer)
    }

    fn remove(&self, key: &TagKey) {
        let _ = fs::remove_file(self.answer_path(key));
    }

    fn answers(
        &self,
        upstream: &str,
        name: &RepoName,
        tag: &Tag,
    ) -> Vec<(AcceptSet, StoredAnswer)> {
        let Ok(files) = fs::read_dir(self.tag_dir(upstream, name, tag)) else {
            return Vec::new();
        };
        files
            .filter_map(Result::ok)
            .filter_map(|f| {
                let accept = accept_of(&f.file_name().to_string_lossy())?;
                Some((accept, read_answer(&f.path())?))
            })
            .collect()
    }

    fn remove_tag(&self, upstream: &str, name: &RepoName, tag: &Tag) -> Vec<AcceptSet> {
        let removed = self.answers(upstream, name, tag);
        let _ = fs::remove_dir_all(self.tag_dir(upstream, name, tag));
        removed.into_iter().map(|(accept, _)| accept).collect()
    }

    fn remove_repository(&self, upstream: &str, name: &RepoName) -> Vec<(Tag, AcceptSet)> {
        let removed = self.repo_answers(upstream, name);
        // Only `_tags`: the repository's directory also holds the repositories nested in it.
        let _ = fs::remove_dir_all(self.repo_dir(upstream, name).join(TAGS_DIR));
        removed
            .into_iter()
            .map(|(tag, accept, _)| (tag, accept))
            .collect()
    }

    fn list(&self) -> Vec<SavedTag> {
        let mut out = Vec::new();
        let Ok(upstreams) = fs::read_dir(&self.dir) else {
            return out;
        };
        for upstream in upstreams.filter_map(Result::ok) {
            let name = upstream.file_name().to_string_lossy().into_owned();
            let upstream_name: Arc<str> = Arc::from(name.as_str());
            self.walk_repos(&upstream.path(), &upstream_name, "", &mut out);
        }
        out
    }
}

fn accept_of(file_name: &str) -> Option<AcceptSet> {
    AcceptSet::from_bits(u8::from_str_radix(file_name, 16).ok()?)
}

fn read_answer(path: &Path) -> Option<StoredAnswer> {
    let text = fs::read_to_string(path).ok()?;
    let parsed = text.trim_end().split_once(' ').and_then(|(digest, until)| {
        Some((Digest::parse(digest).ok()?, until.parse::<u64>().ok()?))
    });
    let Some((digest, until)) = parsed else {
        warn!(path = %path.display(), "ignoring a malformed tag file");
        return None;
    };
    Some(StoredAnswer {
        digest,
        fresh_until: UNIX_EPOCH + Duration::from_secs(until),
    })
}

/// Written to a temp name and renamed, so a reader never sees half a file. Not fsync'ed: a tag
/// answer lost in a crash is asked upstream again.
fn write_answer(path: &Path, answer: &StoredAnswer) -> io::Result<()> {
    let dir = path.parent().expect("answer paths have a directory");
    fs::create_dir_all(dir)?;
    let secs = answer
        .fresh_until
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let tmp = dir.join(format!(".tmp.{:016x}", rand::random::<u64>()));
    fs::write(&tmp, format!("{} {secs}\n", answer.digest))?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tags::TagCache;
    use crate::tags::tests::key;

    #[test]
    fn an_answer_is_one_file_at_its_documented_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskTagStore::open(dir.path()).unwrap();
        let until = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let answer = StoredAnswer {
            digest: Digest::of(b"m"),
            fresh_until: until,
        };
        store
            .save(&key(AcceptSet::from_bits(0b0010).unwrap()), &answer)
            .unwrap();
        let path = dir.path().join("tags/docker.io/library/alpine/_tags/3/2");
        assert_eq!(
            fs::read_to_string(path).unwrap(),
            format!("{} 1700000000\n", Digest::of(b"m"))
        );
        let reopened = DiskTagStore::open(dir.path()).unwrap();
        let loaded = reopened.load(&key(AcceptSet::from_bits(0b0010).unwrap()));
        assert_eq!(loaded, Some(answer));
    }

    #[test]
    fn a_corrupt_file_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DiskTagStore::open(dir.path()).unwrap());
        let key = key(AcceptSet::ALL);
        let path = store.answer_path(&key);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "not a digest\n").unwrap();
        let cache = TagCache::with_store(store, 10);
        assert!(cache.get(&key).is_none());
    }
}
