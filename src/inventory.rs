//! What the cache holds, seen as images rather than objects: from a manifest (found by digest, or
//! by a tag's saved answers) down through index children to configs and layers. Used to pin
//! images, and by the tools that export and report on the cache.

use std::collections::{BTreeSet, HashSet};

use crate::oci::manifest::{self, MANIFEST_LIMIT, Platform};
use crate::oci::{Digest, Reference, RepoName};
use crate::store::BlobStore;
use crate::tags::{SavedTag, TagCache};

/// A manifest's bytes from the store, if it is there and no bigger than a manifest may be.
/// Reading it does not count as a use for eviction.
pub async fn read_manifest(store: &dyn BlobStore, digest: &Digest) -> Option<bytes::Bytes> {
    // Looked up first: only objects small enough to be manifests are opened.
    let len = store.stat(digest).await.ok()??;
    if len > MANIFEST_LIMIT {
        return None;
    }
    store.read_small(digest, MANIFEST_LIMIT).await.ok()?
}

/// Every object an image needs, as far as the cache can tell.
#[derive(Debug, Default)]
pub struct Closure {
    pub manifests: BTreeSet<Digest>,
    pub blobs: BTreeSet<Digest>,
    /// Manifests referred to but not in the cache (so their blobs are unknown too).
    pub missing: BTreeSet<Digest>,
}

impl Closure {
    pub fn all(&self) -> impl Iterator<Item = &Digest> {
        self.manifests.iter().chain(&self.blobs)
    }
}

/// Walk from `roots` (manifests or indexes) through the cache. With `platforms`, an index
/// contributes only the children for those platforms (and children without a platform).
pub async fn closure(
    store: &dyn BlobStore,
    roots: impl IntoIterator<Item = Digest>,
    platforms: Option<&[Platform]>,
) -> Closure {
    let mut out = Closure::default();
    let mut queue: Vec<Digest> = roots.into_iter().collect();
    let mut seen = HashSet::new();
    while let Some(digest) = queue.pop() {
        if !seen.insert(digest.clone()) {
            continue;
        }
        let Some(body) = read_manifest(store, &digest).await else {
            out.missing.insert(digest);
            continue;
        };
        out.manifests.insert(digest);
        let Some(children) = manifest::children(&body) else {
            continue;
        };
        for (child, platform) in children.manifests {
            if wanted(platforms, platform.as_ref()) {
                queue.push(child);
            }
        }
        out.blobs.extend(children.blobs);
    }
    out
}

pub fn wanted(platforms: Option<&[Platform]>, platform: Option<&Platform>) -> bool {
    match (platforms, platform) {
        (Some(wanted), Some(p)) => wanted.iter().any(|w| w.matches(p)),
        _ => true,
    }
}

/// The manifests a reference points at in the cache: a digest itself, or every saved answer
/// for a tag (one per Accept set it was asked with).
pub fn roots(
    tags: &TagCache,
    upstream: &str,
    name: &RepoName,
    reference: &Reference,
) -> Vec<Digest> {
    match reference {
        Reference::Digest(d) => vec![d.clone()],
        Reference::Tag(tag) => tags
            .answers(upstream, name, tag)
            .into_iter()
            .map(|(_, entry)| entry.digest)
            .collect(),
    }
}

/// One repository as the saved tag answers describe it.
#[derive(Debug, serde::Serialize)]
pub struct RepositoryReport {
    pub upstream: String,
    pub repository: String,
    pub tags: Vec<TagReport>,
    /// Bytes of every cached object its tags lead to (objects shared with other repositories
    /// are counted in each).
    pub bytes: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct TagReport {
    pub tag: String,
    /// One per Accept set the tag was asked with; usually one.
    pub digests: Vec<String>,
}

/// Every repository with a saved tag answer (`saved`, from the tag cache's list), with its tags
/// and cached size.
pub async fn repositories(store: &dyn BlobStore, saved: Vec<SavedTag>) -> Vec<RepositoryReport> {
    let mut reports: Vec<RepositoryReport> = Vec::new();
    for group in saved.chunk_by(|a, b| (&a.upstream, &a.name) == (&b.upstream, &b.name)) {
        let mut tag_reports: Vec<TagReport> = Vec::new();
        for same_tag in group.chunk_by(|a, b| a.tag == b.tag) {
            let mut digests: Vec<String> = same_tag.iter().map(|t| t.digest.to_string()).collect();
            digests.sort();
            digests.dedup();
            tag_reports.push(TagReport {
                tag: same_tag[0].tag.to_string(),
                digests,
            });
        }
        let roots = group.iter().map(|t| t.digest.clone());
        let mut bytes = 0;
        for digest in closure(store, roots, None).await.all() {
            bytes += store.stat(digest).await.ok().flatten().unwrap_or(0);
        }
        reports.push(RepositoryReport {
            upstream: group[0].upstream.to_string(),
            repository: group[0].name.to_string(),
            tags: tag_reports,
            bytes,
        });
    }
    reports
}

/// The objects only `selected` tag answers lead to: their closure less everything any other
/// saved answer still needs.
pub async fn exclusive_objects(
    store: &dyn BlobStore,
    all: &[SavedTag],
    selected: impl Fn(&SavedTag) -> bool,
) -> BTreeSet<Digest> {
    let (chosen, rest): (Vec<&SavedTag>, Vec<&SavedTag>) = all.iter().partition(|t| selected(t));
    let doomed = closure(store, chosen.iter().map(|t| t.digest.clone()), None).await;
    let kept = closure(store, rest.iter().map(|t| t.digest.clone()), None).await;
    let kept: HashSet<&Digest> = kept.all().collect();
    doomed
        .all()
        .filter(|d| !kept.contains(d))
        .cloned()
        .collect()
}
