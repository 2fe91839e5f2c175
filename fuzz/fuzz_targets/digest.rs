//! `oci::Digest::parse`, the digest of every blob and by-digest manifest a client or an upstream
//! names.
//!
//! Properties: a digest has exactly one spelling, so a parsed digest displays as its input;
//! `hex`/`from_hex` and `Reference::parse` agree with it; the digest of the input bytes
//! themselves always parses back; errors are one line.
#![no_main]

use dockside::oci::{Digest, Reference};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let computed = Digest::of(data);
    assert_eq!(Digest::parse(&computed.to_string()), Ok(computed));

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Digest::parse(text) {
        Ok(d) => {
            assert_eq!(d.to_string(), text);
            assert_eq!(format!("sha256:{}", d.hex()), text);
            assert_eq!(Digest::from_hex(&d.hex()).as_ref(), Ok(&d));
            assert_eq!(Reference::parse(text), Ok(Reference::Digest(d)));
        }
        Err(e) => assert!(!e.to_string().contains(['\n', '\r'])),
    }
});
