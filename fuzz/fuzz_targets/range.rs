//! `oci::range::parse_range` on a client's `Range` header against a blob of some length.
//!
//! Input: the first byte says whether the length is known, the next 8 bytes are the length
//! (little-endian), the rest is the header value. Properties: it never panics; a partial span
//! lies within the blob and is never empty; anything else is the whole blob; only a known length can make a range
//! unsatisfiable, and the error carries that length; a canonical `bytes=<first>-<last>` inside
//! the blob parses to exactly those bytes.
#![no_main]

use dockside::oci::range::{RangeError, Span, parse_range};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&known, rest)) = data.split_first() else {
        return;
    };
    let Some((len, header)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let len = u64::from_le_bytes(*len);
    let len = (known & 1 == 1).then_some(len);
    let header = String::from_utf8_lossy(header);
    check(&header, len);
    // The same bytes as a canonical range of this blob.
    if let Some(len) = len.filter(|&l| l > 0) {
        let first = header.len() as u64 % len;
        let last = first + (header.len() as u64 * 7919) % (len - first);
        let span = parse_range(Some(&format!("bytes={first}-{last}")), Some(len));
        assert_eq!(
            span,
            Ok(Span {
                start: first,
                end: Some(last + 1),
                partial: true
            })
        );
    }
});

fn check(header: &str, len: Option<u64>) {
    let whole = Span {
        start: 0,
        end: len,
        partial: false,
    };
    match parse_range(Some(header), len) {
        Ok(span) if span.partial => {
            let len = len.expect("a partial span needs a known length");
            let end = span.end.expect("a partial span has an end");
            assert!(span.start < end, "{header:?}: empty span {span:?}");
            assert!(end <= len, "{header:?}: {span:?} past {len}");
        }
        Ok(span) => assert_eq!(span, whole, "{header:?}"),
        Err(RangeError::Unsatisfiable { len: at, .. }) => {
            assert_eq!(Some(at), len, "{header:?}");
        }
    }
    assert_eq!(parse_range(None, len), Ok(whole));
}
