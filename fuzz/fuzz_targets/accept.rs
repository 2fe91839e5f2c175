//! `oci::media::AcceptSet::from_headers` on a client's `Accept` header values.
//!
//! Input: header values separated by newlines. Properties: it never panics; the set is never
//! empty and survives `bits`/`from_bits`; the upstream `Accept` value it produces parses back to
//! the same set; several header values mean what their comma-joined list means; a type the set
//! accepts was named by the client, unless the set is every type (the fallback).
#![no_main]

use dockside::oci::media::{
    AcceptSet, DOCKER_LIST, DOCKER_MANIFEST, DOCKER_MANIFEST_V1_SIGNED, OCI_INDEX, OCI_MANIFEST,
};
use libfuzzer_sys::fuzz_target;

const NEGOTIATED: [&str; 4] = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let values: Vec<&str> = text.split('\n').collect();
    let set = AcceptSet::from_headers(values.iter().copied());
    assert_eq!(AcceptSet::from_bits(set.bits()), Some(set));
    let upstream = set.header_value();
    assert!(!upstream.is_empty());
    assert_eq!(
        AcceptSet::from_headers(std::iter::once(upstream.as_str())),
        set
    );
    let joined = values.join(",");
    assert_eq!(
        AcceptSet::from_headers(std::iter::once(joined.as_str())),
        set
    );
    // Types outside negotiation are always accepted.
    assert!(set.accepts(DOCKER_MANIFEST_V1_SIGNED));
    if set != AcceptSet::ALL {
        let lower = text.to_ascii_lowercase();
        for t in NEGOTIATED {
            if set.accepts(t) {
                assert!(lower.contains(t), "{t} accepted but not named in {text:?}");
            }
        }
    }
});
