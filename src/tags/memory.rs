//! Tag answers in a map: a second [`TagStore`], so the cache's behaviour is checked over more
//! than the disk layout, and a store for tests that need no directory. Nothing outlives the
//! process; a "restart" is a new [`super::TagCache`] over the same `Arc<MemoryTagStore>`.

use std::collections::HashMap;
use std::io;
use std::sync::{Mutex, MutexGuard};

use super::{SavedTag, StoredAnswer, TagKey, TagStore};
use crate::oci::media::AcceptSet;
use crate::oci::{RepoName, Tag};

#[derive(Default)]
pub struct MemoryTagStore {
    answers: Mutex<HashMap<TagKey, StoredAnswer>>,
}

impl MemoryTagStore {
    fn lock(&self) -> MutexGuard<'_, HashMap<TagKey, StoredAnswer>> {
        self.answers.lock().expect("tag map lock")
    }

    /// Remove every answer `doomed` picks; the keys removed.
    fn remove_where(&self, doomed: impl Fn(&TagKey) -> bool) -> Vec<TagKey> {
        let mut answers = self.lock();
        let keys: Vec<TagKey> = answers.keys().filter(|k| doomed(k)).cloned().collect();
        for key in &keys {
            answers.remove(key);
        }
        keys
    }
}

fn same_repo(key: &TagKey, upstream: &str, name: &RepoName) -> bool {
    &*key.upstream == upstream && key.name == *name
}

impl TagStore for MemoryTagStore {
    fn load(&self, key: &TagKey) -> Option<StoredAnswer> {
        self.lock().get(key).cloned()
    }

    fn save(&self, key: &TagKey, answer: &StoredAnswer) -> io::Result<()> {
        self.lock().insert(key.clone(), answer.clone());
        Ok(())
    }

    fn remove(&self, key: &TagKey) {
        self.lock().remove(key);
    }

    fn answers(
        &self,
        upstream: &str,
        name: &RepoName,
        tag: &Tag,
    ) -> Vec<(AcceptSet, StoredAnswer)> {
        self.lock()
            .iter()
            .filter(|(k, _)| same_repo(k, upstream, name) && k.tag == *tag)
            .map(|(k, answer)| (k.accept, answer.clone()))
            .collect()
    }

    fn remove_tag(&self, upstream: &str, name: &RepoName, tag: &Tag) -> Vec<AcceptSet> {
        self.remove_where(|k| same_repo(k, upstream, name) && k.tag == *tag)
            .into_iter()
            .map(|k| k.accept)
            .collect()
    }

    fn remove_repository(&self, upstream: &str, name: &RepoName) -> Vec<(Tag, AcceptSet)> {
        self.remove_where(|k| same_repo(k, upstream, name))
            .into_iter()
            .map(|k| (k.tag, k.accept))
            .collect()
    }

    fn list(&self) -> Vec<SavedTag> {
        self.lock()
            .iter()
            .map(|(k, answer)| SavedTag {
                upstream: k.upstream.clone(),
                name: k.name.clone(),
                tag: k.tag.clone(),
                accept: k.accept,
                digest: answer.digest.clone(),
            })
            .collect()
    }
}
