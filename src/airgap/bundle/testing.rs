//! Fixtures shared by the export and import tests: a cache holding one small image, a bundle
//! of it, and a way to rewrite a bundle's entries.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::Selection;
use super::export::{append_bytes, export};
use crate::airgap::OpenCache;
use crate::config::Config;
use crate::oci::media::{self, AcceptSet};
use crate::oci::{Digest, ImageRef, RepoName, Tag};
use crate::tags::TagKey;

pub(super) fn open(dir: &Path) -> OpenCache {
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

pub(super) fn app() -> Selection {
    Selection::Images(vec![ImageRef::parse("app:v1").unwrap()])
}

/// A cache in `dir` holding the test image (manifest and layer digests), exported whole to
/// `dir/bundle.tar`.
pub(super) async fn exported(dir: &Path) -> (OpenCache, Digest, Digest, PathBuf) {
    let source = open(dir);
    let (manifest, layer) = cache_image(&source, b"layer bytes").await;
    let file = dir.join("bundle.tar");
    let report = export(&source, &app(), &file).await.unwrap();
    assert_eq!((report.images, report.objects), (1, 3));
    (source, manifest, layer, file)
}

/// Copy a bundle entry by entry. `change` returns `None` to keep an entry, `Some(None)` to
/// drop it, `Some(Some(bytes))` to replace its content.
pub(super) fn rewrite_bundle(
    from: &Path,
    to: &Path,
    change: impl Fn(&str) -> Option<Option<Vec<u8>>>,
) {
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
