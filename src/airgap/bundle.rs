//! Bundles: a cache's images as one tar in the OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`), so that other tools (`skopeo copy oci-archive:FILE:REF`) read it too.
//!
//! `index.json` has one descriptor per tag answer (or per image exported by digest). Each
//! carries `org.opencontainers.image.ref.name` = `<upstream>/<repository>:<tag>` (only on one
//! descriptor per tag, as readers pick by that name) and dockside's own annotations, from which
//! import restores the tag answers. Import stages every object through the store's ingest,
//! which hashes while it writes, and commits nothing until every object has matched its digest
//! and every image in the index is complete.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::OpenCache;
use super::prefetch::human_bytes;
use crate::inventory::read_manifest;
use crate::oci::digest::DigestVerifier;
use crate::oci::manifest;
use crate::oci::manifest::MANIFEST_LIMIT;
use crate::oci::media::{self, AcceptSet};
use crate::oci::{Digest, ImageRef, Reference, RepoName, Tag};
use crate::store::{BlobStore, DiskStore, Ingest, StoreError};
use crate::tags::TagKey;

pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const UPSTREAM: &str = "io.dockside.upstream";
pub const REPOSITORY: &str = "io.dockside.repository";
pub const TAG: &str = "io.dockside.tag";
/// The Accept set a tag answer was given for (hex bits, as in the tag cache's file names).
pub const ACCEPT: &str = "io.dockside.accept";

/// How much of a blob is read or written at a time.
const CHUNK: usize = 1024 * 1024;
/// `index.json` and `oci-layout` are small; a bigger one is not a bundle of ours.
const INDEX_LIMIT: u64 = 64 * 1024 * 1024;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutIndex {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    manifests: Vec<Descriptor>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: Digest,
    size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

/// What to export.
pub enum Selection {
    /// Every tag with a saved answer.
    All,
    Images(Vec<ImageRef>),
}

/// One image to export: a tag answer, or a manifest named by digest.
#[derive(Clone, Debug)]
struct Root {
    upstream: Arc<str>,
    name: RepoName,
    tag: Option<(Tag, AcceptSet)>,
    digest: Digest,
}

impl Root {
    fn shown(&self) -> String {
        match &self.tag {
            Some((tag, _)) => format!("{}/{}:{tag}", self.upstream, self.name),
            None => format!("{}/{}@{}", self.upstream, self.name, self.digest),
        }
    }
}

#[derive(Debug, Default)]
pub struct ExportReport {
    pub images: usize,
    pub objects: usize,
    pub bytes: u64,
    /// With `--all`: images left out because the cache no longer holds all of them.
    pub skipped: Vec<String>,
}

/// Write the selected images, as far as they are cached, to `output` (through a temp file
/// beside it, renamed at the end, so a failed export leaves no file that looks whole).
/// Blocking. An image requested by name that is not complete in the cache is an error naming
/// it; with [`Selection::All`] it is skipped and listed in the report.
pub fn export(
    cache: &OpenCache,
    selection: &Selection,
    output: &Path,
) -> anyhow::Result<ExportReport> {
    let store = cache.mirror.store();
    let mut report = ExportReport::default();
    let mut roots = Vec::new();
    let mut objects = BTreeSet::new();
    for root in select(cache, selection)? {
        match complete(store, &root.digest) {
            Ok(closure) => {
                objects.extend(closure);
                roots.push(root);
            }
            Err(why) if matches!(selection, Selection::All) => {
                report.skipped.push(format!("{}: {why}", root.shown()))
            }
            Err(why) => bail!("{}: {why}", root.shown()),
        }
    }
    if roots.is_empty() {
        bail!("nothing to export");
    }
    let index = layout_index(store, &roots)?;
    let tmp = temp_beside(output);
    let written = write_tar(store, &index, &objects, &tmp);
    let bytes = match written {
        Ok(bytes) => bytes,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, output).with_context(|| format!("rename to {}", output.display()))?;
    report.images = roots.len();
    report.objects = objects.len();
    report.bytes = bytes;
    Ok(report)
}

/// The roots the selection names: every saved answer of a tag, or the digest itself.
fn select(cache: &OpenCache, selection: &Selection) -> anyhow::Result<Vec<Root>> {
    let mut roots = Vec::new();
    match selection {
        Selection::All => roots.extend(cache.mirror.tags().list().into_iter().map(|t| Root {
            upstream: t.upstream,
            name: t.name,
            tag: Some((t.tag, t.accept)),
            digest: t.digest,
        })),
        Selection::Images(images) => {
            for image in images {
                roots.extend(named_roots(cache, image)?);
            }
        }
    }
    // An image named twice (or by two spellings) is exported once.
    let mut seen = HashSet::new();
    roots.retain(|r| seen.insert((r.shown(), r.tag.as_ref().map(|(_, a)| a.bits()))));
    Ok(roots)
}

fn named_roots(cache: &OpenCache, image: &ImageRef) -> anyhow::Result<Vec<Root>> {
    let (upstream, name) = cache.resolve(image)?;
    let root = |tag, digest| Root {
        upstream: upstream.clone(),
        name: name.clone(),
        tag,
        digest,
    };
    let roots: Vec<Root> = match &image.reference {
        Reference::Digest(digest) => vec![root(None, digest.clone())],
        Reference::Tag(tag) => cache
            .mirror
            .tags()
            .answers(&upstream, &name, tag)
            .into_iter()
            .map(|(accept, entry)| root(Some((tag.clone(), accept)), entry.digest))
            .collect(),
    };
    if roots.is_empty() {
        bail!(
            "{upstream}/{name}:{}: not in the cache (no saved tag answer)",
            image.reference
        );
    }
    Ok(roots)
}

/// Every object of an image the cache holds, or why it is not complete. An index counts as
/// complete with the platforms that are cached (a prefetch takes only some); an image manifest
/// needs its config and every layer.
fn complete(store: &DiskStore, root: &Digest) -> Result<BTreeSet<Digest>, String> {
    let lookup = |d: &Digest| read_manifest(store, d).map(Bytes::from);
    let have = |d: &Digest| store.size_of(d).is_some();
    closure_with(root, lookup, have)
}

/// The walk behind [`complete`], over any source of manifests and blobs (the cache, or a
/// bundle being imported plus the cache).
fn closure_with(
    root: &Digest,
    manifest_of: impl Fn(&Digest) -> Option<Bytes>,
    has_blob: impl Fn(&Digest) -> bool,
) -> Result<BTreeSet<Digest>, String> {
    let mut out = BTreeSet::new();
    let mut queue = vec![root.clone()];
    while let Some(digest) = queue.pop() {
        if out.contains(&digest) {
            continue;
        }
        let body = manifest_of(&digest).ok_or_else(|| format!("manifest {digest} is missing"))?;
        let children = manifest::children(&body)
            .ok_or_else(|| format!("{digest} is not a manifest or index"))?;
        out.insert(digest);
        if !children.manifests.is_empty() {
            let present: Vec<Digest> = children
                .manifests
                .into_iter()
                .map(|(d, _)| d)
                .filter(|d| manifest_of(d).is_some())
                .collect();
            if present.is_empty() {
                return Err("none of the index's platform manifests is there".into());
            }
            queue.extend(present);
        }
        for blob in children.blobs {
            if !has_blob(&blob) {
                return Err(format!("blob {blob} is missing"));
            }
            out.insert(blob);
        }
    }
    Ok(out)
}

fn layout_index(store: &DiskStore, roots: &[Root]) -> anyhow::Result<LayoutIndex> {
    // Readers pick an image by its ref name, so each tag names one descriptor: the answer for
    // the widest Accept set (every client type), which is what an index-aware reader wants.
    let mut named: HashMap<String, (u8, usize)> = HashMap::new();
    for (i, root) in roots.iter().enumerate() {
        let bits = root.tag.as_ref().map_or(u8::MAX, |(_, a)| a.bits());
        let best = named.entry(root.shown()).or_insert((bits, i));
        if bits > best.0 {
            *best = (bits, i);
        }
    }
    let mut manifests = Vec::new();
    for (i, root) in roots.iter().enumerate() {
        let body = read_manifest(store, &root.digest)
            .ok_or_else(|| anyhow!("{}: manifest vanished from the cache", root.shown()))?;
        let mut annotations = BTreeMap::from([
            (UPSTREAM.to_string(), root.upstream.to_string()),
            (REPOSITORY.to_string(), root.name.to_string()),
        ]);
        if let Some((tag, accept)) = &root.tag {
            annotations.insert(TAG.to_string(), tag.to_string());
            annotations.insert(ACCEPT.to_string(), format!("{:x}", accept.bits()));
        }
        if named.get(&root.shown()).is_some_and(|(_, at)| *at == i) {
            annotations.insert(REF_NAME.to_string(), root.shown());
        }
        manifests.push(Descriptor {
            media_type: media::sniff(&body).unwrap_or_else(|| media::OCI_MANIFEST.to_string()),
            digest: root.digest.clone(),
            size: body.len() as u64,
            annotations,
        });
    }
    Ok(LayoutIndex {
        schema_version: 2,
        media_type: Some(media::OCI_INDEX.to_string()),
        manifests,
    })
}

fn temp_beside(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .map_or_else(|| "bundle".into(), |n| n.to_string_lossy().into_owned());
    output.with_file_name(format!(".{name}.{:016x}.partial", rand::random::<u64>()))
}

/// The tar: `oci-layout`, `index.json`, then each object streamed from its file and hashed on
/// the way, so a cache object that rotted on disk fails the export instead of the import.
fn write_tar(
    store: &DiskStore,
    index: &LayoutIndex,
    objects: &BTreeSet<Digest>,
    path: &Path,
) -> anyhow::Result<u64> {
    let file = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut tar = tar::Builder::new(BufWriter::with_capacity(CHUNK, file));
    append_bytes(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    append_bytes(&mut tar, "index.json", &serde_json::to_vec(index)?)?;
    let mut bytes = 0;
    for digest in objects {
        let file = File::open(store.path_of(digest))
            .with_context(|| format!("object {digest} vanished from the cache"))?;
        let len = file.metadata()?.len();
        let mut reader = Hashing::new(file);
        let mut header = entry_header(len);
        tar.append_data(
            &mut header,
            format!("blobs/sha256/{}", digest.hex()),
            &mut reader,
        )
        .with_context(|| format!("write {}", path.display()))?;
        let actual = reader.finish();
        if actual != *digest {
            bail!(
                "object {digest} in the cache is corrupt (hashes to {actual}); run `dockside verify`"
            );
        }
        bytes += len;
    }
    let mut out = tar.into_inner()?;
    out.flush()?;
    out.get_ref().sync_all()?;
    Ok(bytes)
}

fn entry_header(len: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_size(len);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header
}

fn append_bytes(tar: &mut tar::Builder<impl Write>, path: &str, data: &[u8]) -> io::Result<()> {
    tar.append_data(&mut entry_header(data.len() as u64), path, data)
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    verifier: DigestVerifier,
}

impl<R: Read> Hashing<R> {
    fn new(inner: R) -> Hashing<R> {
        Hashing {
            inner,
            verifier: DigestVerifier::new(),
        }
    }

    fn finish(self) -> Digest {
        self.verifier.finish()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.verifier.update(&buf[..n]);
        Ok(n)
    }
}

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
    ingests: Vec<Box<dyn Ingest>>,
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
    let store = cache.mirror.store();
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
    for ingest in staged.ingests {
        // Each object committed so far is verified; only the bundle's tags are not restored.
        ingest.commit().await.context("commit an imported object")?;
    }
    restore_tags(cache, &index, &mut report);
    let mirror = cache.mirror.clone();
    tokio::task::spawn_blocking(move || {
        mirror.refresh_pins();
        mirror.save_state();
    })
    .await?;
    Ok(report)
}

/// Read the whole tar: stage each object the cache lacks, keep `index.json`, then check that
/// every image it names is complete. Returns the index, the staged objects and how many of the
/// bundle's objects the cache already had.
async fn stage_bundle(
    store: &DiskStore,
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
        if store.size_of(&digest).is_some() {
            present += 1;
        } else if !staged.digests.contains(&digest) {
            stage(store, &digest, &mut entry, &mut staged).await?;
        }
    }
    let index = index.ok_or_else(|| anyhow!("no index.json: not an OCI image layout"))?;
    check_images(store, &index, &staged)?;
    Ok((index, staged, present))
}

fn read_index(entry: &mut impl Read) -> anyhow::Result<LayoutIndex> {
    let mut body = Vec::new();
    entry.take(INDEX_LIMIT).read_to_end(&mut body)?;
    serde_json::from_slice(&body).context("index.json is not an OCI image index")
}

/// Write one bundle entry into an ingest and check its digest; keep manifests' bodies.
async fn stage(
    store: &DiskStore,
    digest: &Digest,
    entry: &mut tar::Entry<'_, impl Read>,
    staged: &mut Staged,
) -> anyhow::Result<()> {
    let mut ingest = store.ingest(digest)?;
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
    let len = match ingest.verify() {
        Err(StoreError::DigestMismatch { actual, .. }) => {
            bail!("the bundle's blob {digest} is corrupt: its content hashes to {actual}")
        }
        verified => verified?,
    };
    if len <= MANIFEST_LIMIT
        && manifest::children(&small)
            .is_some_and(|c| !c.manifests.is_empty() || !c.blobs.is_empty())
    {
        staged.manifests.insert(digest.clone(), Bytes::from(small));
    }
    staged.bytes += len;
    staged.digests.insert(digest.clone());
    staged.ingests.push(ingest);
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
fn check_images(store: &DiskStore, index: &LayoutIndex, staged: &Staged) -> anyhow::Result<()> {
    let manifest_of = |d: &Digest| {
        staged
            .manifests
            .get(d)
            .cloned()
            .or_else(|| read_manifest(store, d).map(Bytes::from))
    };
    let has_blob = |d: &Digest| staged.digests.contains(d) || store.size_of(d).is_some();
    for desc in &index.manifests {
        if let Err(why) = closure_with(&desc.digest, manifest_of, has_blob) {
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
    use crate::config::Config;
    use crate::store::BlobStore;

    fn open(dir: &Path) -> OpenCache {
        let yaml = format!(
            "listen: \"127.0.0.1:1\"\noffline: true\ncache: {{ dir: {:?}, max_size: 1GiB, tag_ttl: 5m }}\n\
             upstreams:\n  - name: docker.io\n    url: http://127.0.0.1:1\n",
            dir.display().to_string()
        );
        OpenCache::open(&Config::from_yaml(&yaml, "test").unwrap(), "test").unwrap()
    }

    /// An OCI image (config and one layer) in the cache, tagged `library/app:v1`.
    async fn cache_image(cache: &OpenCache, layer: &[u8]) -> (Digest, Digest) {
        let store = cache.mirror.store();
        let config = Bytes::from_static(b"{\"os\":\"linux\"}");
        let layer = Bytes::copy_from_slice(layer);
        let (c, l) = (Digest::of(&config), Digest::of(&layer));
        store.put(&c, config).await.unwrap();
        store.put(&l, layer.clone()).await.unwrap();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"digest":"{c}","size":14}},"layers":[{{"digest":"{l}","size":{}}}]}}"#,
            media::OCI_MANIFEST,
            layer.len()
        );
        let m = Digest::of(manifest.as_bytes());
        store.put(&m, Bytes::from(manifest)).await.unwrap();
        let key = TagKey {
            upstream: Arc::from("docker.io"),
            name: RepoName::parse("library/app").unwrap(),
            tag: Tag::parse("v1").unwrap(),
            accept: AcceptSet::ALL,
        };
        cache
            .mirror
            .tags()
            .insert(key, m.clone(), Duration::from_secs(60));
        (m, l)
    }

    fn app() -> Selection {
        Selection::Images(vec![ImageRef::parse("app:v1").unwrap()])
    }

    /// A cache in `dir` holding the test image (manifest and layer digests), exported whole to
    /// `dir/bundle.tar`.
    async fn exported(dir: &Path) -> (OpenCache, Digest, Digest, PathBuf) {
        let source = open(dir);
        let (manifest, layer) = cache_image(&source, b"layer bytes").await;
        let file = dir.join("bundle.tar");
        let report = export(&source, &app(), &file).unwrap();
        assert_eq!((report.images, report.objects), (1, 3));
        (source, manifest, layer, file)
    }

    /// Copy a bundle entry by entry. `change` returns `None` to keep an entry, `Some(None)` to
    /// drop it, `Some(Some(bytes))` to replace its content.
    fn rewrite_bundle(from: &Path, to: &Path, change: impl Fn(&str) -> Option<Option<Vec<u8>>>) {
        let mut out = tar::Builder::new(File::create(to).unwrap());
        let mut archive = tar::Archive::new(File::open(from).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            match change(&path) {
                None => {
                    let mut header = entry.header().clone();
                    out.append_data(&mut header, &path, &mut entry).unwrap();
                }
                Some(Some(bytes)) => append_bytes(&mut out, &path, &bytes).unwrap(),
                Some(None) => {}
            }
        }
        out.into_inner().unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_bundle_round_trips_objects_and_tags() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_source, manifest, layer, file) = exported(a.path()).await;

        let target = open(b.path());
        let report = import(&target, &file).await.unwrap();
        assert_eq!((report.objects_added, report.tags), (3, 1));
        assert_eq!(target.mirror.store().size_of(&layer), Some(11));
        let name = RepoName::parse("library/app").unwrap();
        let answers = target
            .mirror
            .tags()
            .answers("docker.io", &name, &Tag::parse("v1").unwrap());
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].1.digest, manifest);
        assert!(
            !answers[0].1.is_fresh(),
            "imported tags are stale until checked"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_incomplete_image_is_neither_exported_nor_imported() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (source, _, layer, file) = exported(a.path()).await;

        // A bundle without the layer's entry: every object in it is right, the image is not whole.
        let cut = a.path().join("cut.tar");
        rewrite_bundle(&file, &cut, |path| {
            path.ends_with(&layer.hex()).then_some(None)
        });
        let target = open(b.path());
        let err = import(&target, &cut).await.unwrap_err();
        assert!(
            format!("{err:#}").contains(&format!("blob {layer} is missing")),
            "{err:#}"
        );
        assert_eq!(target.mirror.store().usage().objects, 0);

        source.mirror.store().remove(&layer).await.unwrap();
        let err = export(&source, &app(), &a.path().join("again.tar")).unwrap_err();
        assert!(
            err.to_string().contains("docker.io/library/app:v1"),
            "{err}"
        );
    }

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
