//! Bundles: a cache's images as one tar in the OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`), so that other tools (`skopeo copy oci-archive:FILE:REF`) read it too.
//!
//! `index.json` has one descriptor per tag answer (or per image exported by digest). Each
//! carries `org.opencontainers.image.ref.name` = `<upstream>/<repository>:<tag>` (only on one
//! descriptor per tag, as readers pick by that name) and dockside's own annotations, from which
//! import restores the tag answers. Import stages every object through the store's ingest,
//! which hashes while it writes, and commits nothing until every object has matched its digest
//! and every image in the index is complete.
//!
//! [`export`] writes a bundle and [`import`] reads one; this module holds what both agree on:
//! the layout index, the annotation names and the walk that decides whether an image is whole.

mod export;
mod import;

pub use export::{ExportReport, Selection, export};
pub use import::{ImportReport, import};

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::oci::Digest;
use crate::oci::manifest;

pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const UPSTREAM: &str = "io.dockside.upstream";
pub const REPOSITORY: &str = "io.dockside.repository";
pub const TAG: &str = "io.dockside.tag";
/// The Accept set a tag answer was given for (hex bits, as in the tag cache's file names).
pub const ACCEPT: &str = "io.dockside.accept";

/// How much of a blob is read or written at a time.
const CHUNK: usize = 1024 * 1024;

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

/// The walk behind [`complete`], over any source of manifests and blobs (the cache, or a
/// bundle being imported plus the cache).
async fn closure_with(
    root: &Digest,
    manifest_of: impl AsyncFn(&Digest) -> Option<Bytes>,
    has_blob: impl AsyncFn(&Digest) -> bool,
) -> Result<BTreeSet<Digest>, String> {
    let mut out = BTreeSet::new();
    let mut queue = vec![root.clone()];
    while let Some(digest) = queue.pop() {
        if out.contains(&digest) {
            continue;
        }
        let body = manifest_of(&digest)
            .await
            .ok_or_else(|| format!("manifest {digest} is missing"))?;
        let children = manifest::children(&body)
            .ok_or_else(|| format!("{digest} is not a manifest or index"))?;
        out.insert(digest);
        if !children.manifests.is_empty() {
            let mut present: Vec<Digest> = Vec::new();
            for (child, _) in children.manifests {
                if manifest_of(&child).await.is_some() {
                    present.push(child);
                }
            }
            if present.is_empty() {
                return Err("none of the index's platform manifests is there".into());
            }
            queue.extend(present);
        }
        for blob in children.blobs {
            if !has_blob(&blob).await {
                return Err(format!("blob {blob} is missing"));
            }
            out.insert(blob);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod testing;

#[cfg(test)]
mod tests {
    use super::testing::{app, exported, open, rewrite_bundle};
    use super::{export, import};
    use crate::oci::{RepoName, Tag};

    #[tokio::test(flavor = "multi_thread")]
    async fn a_bundle_round_trips_objects_and_tags() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_source, manifest, layer, file) = exported(a.path()).await;

        let target = open(b.path());
        let report = import(&target, &file).await.unwrap();
        assert_eq!((report.objects_added, report.tags), (3, 1));
        assert_eq!(target.mirror.store().stat(&layer).await.unwrap(), Some(11));
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
        assert_eq!(target.mirror.budget().usage().objects, 0);

        source.mirror.store().remove(&layer).await.unwrap();
        let err = export(&source, &app(), &a.path().join("again.tar"))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("docker.io/library/app:v1"),
            "{err}"
        );
    }
}
