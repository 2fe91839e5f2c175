//! `oci::manifest::children` and `oci::media::sniff` on manifest JSON from an upstream.
//!
//! Properties: `sniff` only ever returns a well-formed media type (it may become a
//! `Content-Type`); and an index built from the input's bytes (32 per digest) yields exactly those
//! digests, in order, and is sniffed as an OCI index.
#![no_main]

use dockside::oci::Digest;
use dockside::oci::manifest::children;
use dockside::oci::media::{OCI_INDEX, sniff, valid_media_type};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(media_type) = sniff(data) {
        assert!(valid_media_type(&media_type), "{media_type:?}");
    }
    if let Some(found) = children(data) {
        let all = found.manifests.iter().map(|(d, _)| d).chain(&found.blobs);
        for digest in all {
            assert_eq!(Digest::parse(&digest.to_string()).as_ref(), Ok(digest));
        }
    }
    built_index(data);
});

fn built_index(data: &[u8]) {
    let digests: Vec<Digest> = data
        .chunks_exact(32)
        .map(|c| Digest::from_sha256_bytes(c.try_into().expect("32 bytes")))
        .collect();
    let entries: Vec<String> = digests
        .iter()
        .map(|d| format!(r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":1}}"#))
        .collect();
    let body = format!(
        r#"{{"schemaVersion":2,"manifests":[{}]}}"#,
        entries.join(",")
    );
    let found = children(body.as_bytes()).expect("a valid index");
    let listed: Vec<Digest> = found.manifests.into_iter().map(|(d, _)| d).collect();
    assert_eq!(listed, digests);
    assert!(found.blobs.is_empty());
    assert_eq!(sniff(body.as_bytes()).as_deref(), Some(OCI_INDEX));
}
