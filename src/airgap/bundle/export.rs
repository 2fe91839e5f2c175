//! Export: the images a selection names, checked complete in the cache, written as one tar
//! in the OCI image layout with dockside's annotations on each descriptor.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};

use super::{
    ACCEPT, CHUNK, Descriptor, LayoutIndex, REF_NAME, REPOSITORY, TAG, UPSTREAM, closure_with,
};
use crate::airgap::OpenCache;
use crate::inventory::read_manifest;
use crate::oci::digest::DigestVerifier;
use crate::oci::media::{self, AcceptSet};
use crate::oci::{Digest, ImageRef, Reference, RepoName, Tag};
use crate::store::{BlobStore, BlockingRead, Object};

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
/// An image requested by name that is not complete in the cache is an error naming it; with
/// [`Selection::All`] it is skipped and listed in the report.
pub async fn export(
    cache: &OpenCache,
    selection: &Selection,
    output: &Path,
) -> anyhow::Result<ExportReport> {
    let store = cache.mirror.store().as_ref();
    let mut report = ExportReport::default();
    let mut roots = Vec::new();
    let mut objects = BTreeSet::new();
    for root in select(cache, selection)? {
        match complete(store, &root.digest).await {
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
    let index = layout_index(store, &roots).await?;
    let mut opened = Vec::with_capacity(objects.len());
    for digest in &objects {
        let obj = store.peek(digest).await?;
        let obj = obj.ok_or_else(|| anyhow!("object {digest} vanished from the cache"))?;
        opened.push((digest.clone(), obj));
    }
    let tmp = temp_beside(output);
    let runtime = tokio::runtime::Handle::current();
    let (tar_path, written) = (tmp.clone(), index);
    let written =
        tokio::task::spawn_blocking(move || write_tar(&written, opened, &tar_path, runtime))
            .await
            .map_err(|e| anyhow!("export: {e}"))
            .and_then(|written| written);
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
async fn complete(store: &dyn BlobStore, root: &Digest) -> Result<BTreeSet<Digest>, String> {
    let lookup = async |d: &Digest| read_manifest(store, d).await;
    let have = async |d: &Digest| store.stat(d).await.ok().flatten().is_some();
    closure_with(root, lookup, have).await
}

async fn layout_index(store: &dyn BlobStore, roots: &[Root]) -> anyhow::Result<LayoutIndex> {
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
            .await
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

/// The tar: `oci-layout`, `index.json`, then each object streamed from the store and hashed on
/// the way, so a cache object that rotted on disk fails the export instead of the import.
/// Blocking: it reads the objects through `runtime`.
fn write_tar(
    index: &LayoutIndex,
    objects: Vec<(Digest, Object)>,
    path: &Path,
    runtime: tokio::runtime::Handle,
) -> anyhow::Result<u64> {
    let file = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut tar = tar::Builder::new(BufWriter::with_capacity(CHUNK, file));
    append_bytes(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    append_bytes(&mut tar, "index.json", &serde_json::to_vec(index)?)?;
    let mut bytes = 0;
    for (digest, obj) in objects {
        let len = obj.len;
        let mut reader = Hashing::new(BlockingRead::new(obj, runtime.clone()));
        let mut header = entry_header(len);
        tar.append_data(
            &mut header,
            format!("blobs/sha256/{}", digest.hex()),
            &mut reader,
        )
        .with_context(|| format!("write {}", path.display()))?;
        let actual = reader.finish();
        if actual != digest {
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

pub(super) fn entry_header(len: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_size(len);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header
}

pub(super) fn append_bytes(
    tar: &mut tar::Builder<impl Write>,
    path: &str,
    data: &[u8],
) -> io::Result<()> {
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
