//! `dockside verify` (re-hash every object, quarantine the ones that no longer match) and
//! `dockside du` (what each upstream and repository holds).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::OpenCache;
use super::prefetch::human_bytes;
use crate::inventory;
use crate::oci::Digest;
use crate::oci::digest::DigestVerifier;
use crate::store::{BlobStore, StoreError};

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub checked: u64,
    pub bytes: u64,
    /// Objects moved to `quarantine/` (or forgotten, when their file was gone), with why.
    pub quarantined: Vec<(Digest, String)>,
    pub elapsed: Duration,
}

impl VerifyReport {
    pub fn summary(&self, quarantine: &Path) -> String {
        let secs = self.elapsed.as_secs_f64();
        let mut out = format!(
            "verified {} objects ({}) in {secs:.1}s ({}/s): {} bad\n",
            self.checked,
            human_bytes(self.bytes),
            human_bytes((self.bytes as f64 / secs.max(1e-3)) as u64),
            self.quarantined.len()
        );
        for (digest, why) in &self.quarantined {
            let _ = writeln!(out, "QUARANTINED {digest}: {why}");
        }
        if !self.quarantined.is_empty() {
            let _ = writeln!(out, "moved to {}", quarantine.display());
        }
        out
    }
}

/// Where bad objects go: inside the cache directory (same filesystem, so a rename), outside
/// `objects/`, so the index never sees them again and an operator can inspect them.
pub fn quarantine_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("quarantine")
}

/// Hash every object in the store against its name. A mismatch (or an unreadable file) is
/// moved to [`quarantine_dir`] and dropped from the index, so the next request fetches it
/// again from upstream.
pub async fn verify(cache: &OpenCache) -> anyhow::Result<VerifyReport> {
    let store = cache.mirror.store().as_ref();
    let dir = quarantine_dir(&cache.dir);
    let started = Instant::now();
    let mut report = VerifyReport::default();
    for (digest, _) in store.list().await? {
        let hashed = hash_object(store, &digest, None).await;
        let why = match hashed {
            Ok((actual, len)) => {
                report.bytes += len;
                if actual == digest {
                    report.checked += 1;
                    continue;
                }
                format!("content hashes to {actual}")
            }
            Err(e) => format!("cannot read it: {e}"),
        };
        report.checked += 1;
        quarantine(store, &digest, &dir).await?;
        report.quarantined.push((digest, why));
    }
    let mirror = cache.mirror.clone();
    tokio::task::spawn_blocking(move || mirror.save_state()).await?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Read an object through the store in 1 MiB chunks, hashing it (and copying it to `copy`).
/// Reading it is not a use for eviction.
async fn hash_object(
    store: &dyn BlobStore,
    digest: &Digest,
    mut copy: Option<&mut fs::File>,
) -> Result<(Digest, u64), StoreError> {
    const CHUNK: u64 = 1024 * 1024;
    let obj = store
        .peek(digest)
        .await?
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
    let mut verifier = DigestVerifier::new();
    let (mut pos, mut spare) = (0, bytes::BytesMut::new());
    while pos < obj.len {
        let n = (obj.len - pos).min(CHUNK) as usize;
        let (chunk, back) = obj.reader.read(pos, n, spare).await?;
        verifier.update(&chunk);
        if let Some(file) = copy.as_mut() {
            file.write_all(&chunk)?;
        }
        pos += n as u64;
        spare = back;
    }
    Ok((verifier.finish(), obj.len))
}

/// Copy a bad object into `dir` for the operator to inspect (what can still be read of it),
/// then remove it from the store.
async fn quarantine(store: &dyn BlobStore, digest: &Digest, dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    let mut copy = fs::File::create(dir.join(digest.hex()))?;
    // An unreadable object is still removed: the next request fetches it again.
    let _ = hash_object(store, digest, Some(&mut copy)).await;
    store.remove(digest).await?;
    Ok(())
}

/// Objects and their bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Size {
    pub objects: u64,
    pub bytes: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub struct RepoUsage {
    pub upstream: String,
    pub repository: String,
    pub tags: usize,
    pub size: Size,
}

#[derive(Debug, Default)]
pub struct DuReport {
    /// Each repository counts every object its tags reach, shared or not.
    pub repositories: Vec<RepoUsage>,
    /// Per upstream, each object once.
    pub upstreams: Vec<(String, Size)>,
    /// Objects no tag reaches (pulled by digest only, or left by a retag).
    pub unreferenced: Size,
    /// Everything in the store, each object once.
    pub total: Size,
}

/// Usage by upstream and repository, from the saved tag answers down through the cached
/// manifests.
pub async fn du(cache: &OpenCache) -> anyhow::Result<DuReport> {
    let store = cache.mirror.store().as_ref();
    let sizes: BTreeMap<Digest, u64> = store.list().await?.into_iter().collect();
    let mut by_repo: BTreeMap<(String, String), (BTreeSet<String>, Vec<Digest>)> = BTreeMap::new();
    for saved in cache.mirror.tags().list() {
        let key = (saved.upstream.to_string(), saved.name.to_string());
        let entry = by_repo.entry(key).or_default();
        entry.0.insert(saved.tag.to_string());
        entry.1.push(saved.digest);
    }
    let mut report = DuReport::default();
    let mut by_upstream: BTreeMap<String, HashSet<Digest>> = BTreeMap::new();
    let mut referenced = HashSet::new();
    for ((upstream, repository), (tags, roots)) in by_repo {
        let reached: HashSet<Digest> = inventory::closure(store, roots, None)
            .await
            .all()
            .filter(|d| sizes.contains_key(d))
            .cloned()
            .collect();
        report.repositories.push(RepoUsage {
            upstream: upstream.clone(),
            repository,
            tags: tags.len(),
            size: size_of(&sizes, reached.iter()),
        });
        by_upstream
            .entry(upstream)
            .or_default()
            .extend(reached.iter().cloned());
        referenced.extend(reached);
    }
    report.upstreams = by_upstream
        .into_iter()
        .map(|(u, set)| (u, size_of(&sizes, set.iter())))
        .collect();
    report.unreferenced = size_of(&sizes, sizes.keys().filter(|d| !referenced.contains(*d)));
    report.total = size_of(&sizes, sizes.keys());
    Ok(report)
}

fn size_of<'a>(sizes: &BTreeMap<Digest, u64>, digests: impl Iterator<Item = &'a Digest>) -> Size {
    let mut size = Size::default();
    for d in digests {
        size.objects += 1;
        size.bytes += sizes.get(d).copied().unwrap_or(0);
    }
    size
}

impl DuReport {
    /// A table: repositories under their upstream, then the unreferenced line and the total.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{:<48} {:>5} {:>8} {:>12}\n",
            "UPSTREAM / REPOSITORY", "TAGS", "OBJECTS", "SIZE"
        );
        let row = |out: &mut String, label: &str, tags: String, size: &Size| {
            let _ = writeln!(
                out,
                "{label:<48} {tags:>5} {:>8} {:>12}",
                size.objects,
                human_bytes(size.bytes)
            );
        };
        for (upstream, size) in &self.upstreams {
            row(&mut out, upstream, String::new(), size);
            for repo in self.repositories.iter().filter(|r| &r.upstream == upstream) {
                row(
                    &mut out,
                    &format!("  {}", repo.repository),
                    repo.tags.to_string(),
                    &repo.size,
                );
            }
        }
        row(
            &mut out,
            "unreferenced (no tag reaches it)",
            String::new(),
            &self.unreferenced,
        );
        row(
            &mut out,
            "total (shared objects once)",
            String::new(),
            &self.total,
        );
        out
    }
}
