//! Import: stage every object of a bundle through the store's ingest, check every image it
//! names is complete, then commit and restore the tag answers its annotations place.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;

use super::{ACCEPT, CHUNK, LayoutIndex, REF_NAME, REPOSITORY, TAG, UPSTREAM, closure_with};
use crate::airgap::OpenCache;
use crate::airgap::prefetch::human_bytes;
use crate::inventory::read_manifest;
use crate::oci::manifest;
use crate::oci::manifest::MANIFEST_LIMIT;
use crate::oci::media::AcceptSet;
use crate::oci::{Digest, ImageRef, Reference, RepoName, Tag};
use crate::store::{BlobStore, Ingest, StoreError, Verified};
use crate::tags::TagKey;

/// `index.json` and `oci-layout` are small; a bigger one is not a bundle of ours.
const INDEX_LIMIT: u64 = 64 * 1024 * 1024;

#[derive(Debug, Default)]
pub struct ImportReport {
    pub objects_added: usize,
    pub bytes_added: u64,
    /// Objects of the bundle the cache already held (not read again).
    pub objects_present: usize,
    pub images: usize,
    pub tags: usize,
    pub warnings: Vec<String>,
}

/// Objects written and verified, not yet visible in the store.
#[derive(Default)]
struct Staged {
    ingests: Vec<(Ingest, Verified)>,
    digests: BTreeSet<Digest>,
    /// Staged manifests' bodies, so the bundle's images can be checked before anything is
    /// committed.
    manifests: HashMap<Digest, Bytes>,
    bytes: u64,
}

/// Load a bundle into the cache. Every object goes through an ingest, which hashes what it
/// writes; all are committed only when every one matched and every image in `index.json` is
/// complete. On any error before that, nothing is committed and the staged temp files are
/// deleted (the ingests are dropped).
pub async fn import(cache: &OpenCache, bundle: &Path) -> anyhow::Result<ImportReport> {
    let store = cache.mirror.store().as_ref();
    let (index, staged, objects_present) = stage_bundle(store, bundle)
        .await
        .context("refused, nothing imported")?;
    let mut report = ImportReport {
        objects_added: staged.ingests.len(),
        bytes_added: staged.bytes,
        objects_present,
        images: index.manifests.len(),
        ..ImportReport::default()
    };
    for (ingest, proof) in staged.ingests {
        // Each object committed so far is verified; only the bundle's tags are not restored.
        ingest
            .commit(proof)
            .await
            .context("commit an imported object")?;
    }
    restore_tags(cache, &index, &mut report);
    cache.mirror.refresh_pins().await;
    let mirror = cache.mirror.clone();
    tokio::task::spawn_blocking(move || mirror.save_state()).await?;
    Ok(report)
}

/// Read the whole tar: stage each object the cache lacks, keep `index.json`, then check that
/// every image it names is complete. Returns the index, the staged objects and how many of the
/// bundle's objects the cache already had.
async fn stage_bundle(
    store: &dyn BlobStore,
    bundle: &Path,
) -> anyhow::Result<(LayoutIndex, Staged, usize)> {
    let file = File::open(bundle).with_context(|| format!("open {}", bundle.display()))?;
    let mut staged = Staged::default();
    let mut present = 0;
    let mut index = None;
    let mut archive = tar::Archive::new(io::BufReader::with_capacity(CHUNK, file));
    for entry in archive.entries().context("read the bundle")? {
        let mut entry = entry.context("read the bundle")?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let path = path.trim_start_matches("./");
        if path == "index.json" {
            index = Some(read_index(&mut entry)?);
            continue;
        }
        // Anything else (directories, `oci-layout`, other files) is not content.
        let Some(hex) = path.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) else {
            continue;
        };
        let digest = Digest::from_hex(hex).map_err(|e| anyhow!("bundle entry {path}: {e}"))?;
        if store.stat(&digest).await?.is_some() {
            present += 1;
        } else if !staged.digests.contains(&digest) {
            stage(store, &digest, &mut entry, &mut staged).await?;
        }
    }
    let index = index.ok_or_else(|| anyhow!("no index.json: not an OCI image layout"))?;
    check_images(store, &index, &staged).await?;
    Ok((index, staged, present))
}

fn read_index(entry: &mut impl Read) -> anyhow::Result<LayoutIndex> {
    let mut body = Vec::new();
    entry.take(INDEX_LIMIT).read_to_end(&mut body)?;
    serde_json::from_slice(&body).context("index.json is not an OCI image index")
}

/// Write one bundle entry into an ingest and check its digest; keep manifests' bodies.
async fn stage(
    store: &dyn BlobStore,
    digest: &Digest,
    entry: &mut tar::Entry<'_, impl Read>,
    staged: &mut Staged,
) -> anyhow::Result<()> {
    let mut ingest = store.ingest(digest).await?;
    // Reserving first evicts others to make room, and fails early when the bundle's objects
    // together cannot fit in cache.max_size.
    let size = entry.header().size()?;
    ingest.reserve(size).await.with_context(|| {
        format!(
            "object {digest} ({}) does not fit in the cache",
            human_bytes(size)
        )
    })?;
    let mut small = Vec::new();
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = read_full(entry, &mut buf)?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        if ingest.written() + (n as u64) <= MANIFEST_LIMIT {
            small.extend_from_slice(&buf);
        }
        ingest.write(&buf)?;
    }
    let proof = match ingest.verify() {
        Err(StoreError::DigestMismatch { actual, .. }) => {
            bail!("the bundle's blob {digest} is corrupt: its content hashes to {actual}")
        }
        verified => verified?,
    };
    let len = proof.len();
    if len <= MANIFEST_LIMIT
        && manifest::children(&small)
            .is_some_and(|c| !c.manifests.is_empty() || !c.blobs.is_empty())
    {
        staged.manifests.insert(digest.clone(), Bytes::from(small));
    }
    staged.bytes += len;
    staged.digests.insert(digest.clone());
    staged.ingests.push((ingest, proof));
    Ok(())
}

/// Fill `buf` as far as the entry goes (tar entries may return short reads).
fn read_full(entry: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match entry.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Every image the bundle's index names must be complete in the bundle plus the cache.
async fn check_images(
    store: &dyn BlobStore,
    index: &LayoutIndex,
    staged: &Staged,
) -> anyhow::Result<()> {
    let manifest_of = async |d: &Digest| match staged.manifests.get(d) {
        Some(body) => Some(body.clone()),
        None => read_manifest(store, d).await,
    };
    let has_blob = async |d: &Digest| {
        staged.digests.contains(d) || store.stat(d).await.ok().flatten().is_some()
    };
    for desc in &index.manifests {
        if let Err(why) = closure_with(&desc.digest, &manifest_of, &has_blob).await {
            let name = desc
                .annotations
                .get(REF_NAME)
                .cloned()
                .unwrap_or_else(|| desc.digest.to_string());
            bail!("the bundle's image {name} is incomplete: {why}");
        }
    }
    Ok(())
}

/// Tag answers from dockside's annotations. They are restored stale: an offline server serves
/// them as they are, an online one asks its upstream once before trusting them.
fn restore_tags(cache: &OpenCache, index: &LayoutIndex, report: &mut ImportReport) {
    for desc in &index.manifests {
        let key = tag_key(&desc.annotations).or_else(|| ref_name_key(cache, &desc.annotations));
        let Some(key) = key else {
            report.warnings.push(format!(
                "{}: no tag dockside can place (no dockside annotations, and no ref name of the form host/repository:tag naming a configured upstream); its content was imported, reachable by digest only",
                desc.annotations.get(REF_NAME).unwrap_or(&desc.digest.to_string())
            ));
            continue;
        };
        if !cache.has_upstream(&key.upstream) {
            report.warnings.push(format!(
                "{}/{}:{}: this config has no upstream named {:?}; the tag will resolve once one is configured",
                key.upstream, key.name, key.tag, key.upstream
            ));
        }
        cache
            .mirror
            .tags()
            .insert(key, desc.digest.clone(), Duration::ZERO);
        report.tags += 1;
    }
}

/// A layout written by another tool: a ref name that is a full reference with a tag, whose
/// host is a configured upstream, is taken as that tag (for every Accept set). A bare ref name
/// (`v1`) says nothing about the repository, so it is not guessed at.
fn ref_name_key(cache: &OpenCache, annotations: &BTreeMap<String, String>) -> Option<TagKey> {
    let image = ImageRef::parse(annotations.get(REF_NAME)?).ok()?;
    let (Some(_), Reference::Tag(tag)) = (&image.host, &image.reference) else {
        return None;
    };
    // Resolving refuses a host that names no upstream (or alias) of this config.
    let (upstream, name) = cache.resolve(&image).ok()?;
    Some(TagKey {
        upstream,
        name,
        tag: tag.clone(),
        accept: AcceptSet::ALL,
    })
}

fn tag_key(annotations: &BTreeMap<String, String>) -> Option<TagKey> {
    let upstream = annotations.get(UPSTREAM)?;
    // An upstream name becomes a directory name in the tag cache: nothing that could climb out.
    if upstream.is_empty() || upstream.contains(['/', '\\']) || upstream.starts_with('.') {
        return None;
    }
    let accept = match annotations.get(ACCEPT) {
        Some(bits) => AcceptSet::from_bits(u8::from_str_radix(bits, 16).ok()?)?,
        None => AcceptSet::ALL,
    };
    Some(TagKey {
        upstream: Arc::from(upstream.as_str()),
        name: RepoName::parse(annotations.get(REPOSITORY)?).ok()?,
        tag: Tag::parse(annotations.get(TAG)?).ok()?,
        accept,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::airgap::bundle::testing::{exported, open, rewrite_bundle};
    use crate::oci::media;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_layout_from_another_tool_keeps_tags_its_ref_names_place() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_source, manifest, _, file) = exported(a.path()).await;
        // Rewrite index.json as another tool would: three descriptors, ref names only.
        let descriptor = |name: &str| {
            format!(
                r#"{{"mediaType":"{}","digest":"{manifest}","size":1,"annotations":{{"{REF_NAME}":"{name}"}}}}"#,
                media::OCI_MANIFEST
            )
        };
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{},{},{}]}}"#,
            descriptor("docker.io/team/app:2.0"),
            descriptor("v1"),
            descriptor("quay.io/x/y:1")
        );
        let foreign = a.path().join("foreign.tar");
        rewrite_bundle(&file, &foreign, |path| {
            (path == "index.json").then(|| Some(index.clone().into_bytes()))
        });

        let target = open(b.path());
        let report = import(&target, &foreign).await.unwrap();
        assert_eq!(report.tags, 1);
        assert_eq!(report.warnings.len(), 2, "{:?}", report.warnings);
        let saved: Vec<String> = target
            .mirror
            .tags()
            .list()
            .iter()
            .map(|t| format!("{}/{}:{} {}", t.upstream, t.name, t.tag, t.digest))
            .collect();
        assert_eq!(saved, vec![format!("docker.io/team/app:2.0 {manifest}")]);
    }

    #[test]
    fn tag_annotations_cannot_name_a_path_outside_the_tag_cache() {
        let annotations = |upstream: &str| {
            BTreeMap::from([
                (UPSTREAM.to_string(), upstream.to_string()),
                (REPOSITORY.to_string(), "library/app".to_string()),
                (TAG.to_string(), "v1".to_string()),
            ])
        };
        assert!(tag_key(&annotations("docker.io")).is_some());
        for bad in ["..", "../x", "a/b", ""] {
            assert!(tag_key(&annotations(bad)).is_none(), "{bad:?}");
        }
        let mut bad_repo = annotations("docker.io");
        bad_repo.insert(REPOSITORY.to_string(), "../../etc".to_string());
        assert!(tag_key(&bad_repo).is_none());
    }
}
