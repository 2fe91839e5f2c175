//! Content digests (`sha256:<hex>`), the identity of every blob and of
//! manifests fetched by digest.
//!
//! Only sha256 is accepted. The distribution spec allows other algorithms, but
//! every registry in practice uses sha256, and accepting one algorithm means a
//! digest has exactly one spelling: the cache can use the hex as a file name
//! and compare digests by value without canonicalising.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use sha2::Digest as _;

use super::shown;

const PREFIX: &str = "sha256:";
const HEX_LEN: usize = 64;

/// A sha256 content digest, stored as its 32 raw bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// Why a string is not a digest. Each variant carries the rejected value
/// (cut to a loggable length).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DigestError {
    #[error("digest {0:?} has no algorithm prefix (expected sha256:<64 lowercase hex>)")]
    MissingAlgorithm(String),
    #[error("digest {0:?} uses an unsupported algorithm (only sha256 is supported)")]
    UnsupportedAlgorithm(String),
    #[error("digest {0:?} does not have exactly 64 hex characters after \"sha256:\"")]
    BadLength(String),
    #[error("digest {0:?} contains a character that is not lowercase hex")]
    BadHex(String),
}

impl Digest {
    /// Parses `sha256:` followed by exactly 64 lowercase hex characters.
    ///
    /// Uppercase hex is rejected rather than folded: the spec's canonical form
    /// is lowercase, and accepting both would give one blob two names.
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let Some((algorithm, hex)) = s.split_once(':') else {
            return Err(DigestError::MissingAlgorithm(shown(s)));
        };
        if algorithm != "sha256" {
            return Err(DigestError::UnsupportedAlgorithm(shown(s)));
        }
        Self::decode_hex(hex).map_err(|e| e.with_value(s))
    }

    /// Parses the bare 64-character hex form, as returned by [`Digest::hex`]
    /// (useful when reading cache file names back).
    pub fn from_hex(hex: &str) -> Result<Digest, DigestError> {
        Self::decode_hex(hex).map_err(|e| e.with_value(hex))
    }

    pub fn from_sha256_bytes(bytes: [u8; 32]) -> Digest {
        Digest(bytes)
    }

    /// The digest of a whole buffer.
    pub fn of(data: &[u8]) -> Digest {
        let mut verifier = DigestVerifier::new();
        verifier.update(data);
        verifier.finish()
    }

    /// The 64 lowercase hex characters, without the algorithm prefix.
    /// Contains only `[0-9a-f]`, so it is safe as a file name.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Decodes the hex part. Errors carry an empty value; callers attach the
    /// string the user actually wrote.
    fn decode_hex(hex: &str) -> Result<Digest, DigestError> {
        let bytes = hex.as_bytes();
        if bytes.len() != HEX_LEN {
            return Err(DigestError::BadLength(String::new()));
        }
        let mut out = [0u8; 32];
        for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let (Some(hi), Some(lo)) = (nibble(pair[0]), nibble(pair[1])) else {
                return Err(DigestError::BadHex(String::new()));
            };
            *slot = (hi << 4) | lo;
        }
        Ok(Digest(out))
    }
}

impl DigestError {
    fn with_value(self, value: &str) -> DigestError {
        let value = shown(value);
        match self {
            DigestError::MissingAlgorithm(_) => DigestError::MissingAlgorithm(value),
            DigestError::UnsupportedAlgorithm(_) => DigestError::UnsupportedAlgorithm(value),
            DigestError::BadLength(_) => DigestError::BadLength(value),
            DigestError::BadHex(_) => DigestError::BadHex(value),
        }
    }
}

/// Value of one lowercase hex digit. The `hex` crate also accepts uppercase,
/// which is why this is hand-written.
fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Into a stack buffer in one go: digests are formatted on every manifest answer, and a
        // `write!` per byte showed up in profiles.
        let mut hex = [0u8; 64];
        hex::encode_to_slice(self.0, &mut hex).expect("64 hex digits for 32 bytes");
        f.write_str(PREFIX)?;
        f.write_str(std::str::from_utf8(&hex).expect("hex is ASCII"))
    }
}

/// Same as Display: the string form is what everyone recognises in logs and
/// test failures, the byte array is not.
impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Digest, DigestError> {
        Digest::parse(s)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Digest, D::Error> {
        deserializer.deserialize_str(DigestVisitor)
    }
}

struct DigestVisitor;

impl de::Visitor<'_> for DigestVisitor {
    type Value = Digest;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a digest string \"sha256:<64 lowercase hex>\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Digest, E> {
        Digest::parse(v).map_err(E::custom)
    }
}

/// Incremental sha256, for verifying content while it streams.
#[derive(Clone, Default)]
pub struct DigestVerifier(sha2::Sha256);

impl DigestVerifier {
    pub fn new() -> DigestVerifier {
        DigestVerifier(sha2::Sha256::new())
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

impl fmt::Debug for DigestVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DigestVerifier")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sha256 of the empty string.
    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_displays_round_trip() {
        let d = Digest::parse(EMPTY).unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(format!("{d:?}"), EMPTY);
        assert_eq!(d.hex(), &EMPTY[7..]);
        assert_eq!(d.as_bytes()[0], 0xe3);
        assert_eq!(d.as_bytes()[31], 0x55);
    }

    #[test]
    fn from_str_matches_parse() {
        assert_eq!(EMPTY.parse::<Digest>(), Digest::parse(EMPTY));
    }

    #[test]
    fn of_hashes_the_buffer() {
        assert_eq!(Digest::of(b"").to_string(), EMPTY);
        assert_eq!(
            Digest::of(b"abc").to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn verifier_matches_one_shot_hash_across_chunks() {
        let data = b"hello, streaming world";
        let mut v = DigestVerifier::new();
        for chunk in data.chunks(5) {
            v.update(chunk);
        }
        assert_eq!(v.finish(), Digest::of(data));
    }

    #[test]
    fn from_sha256_bytes_keeps_bytes() {
        let d = Digest::from_sha256_bytes([0xab; 32]);
        assert_eq!(d.hex(), "ab".repeat(32));
    }

    #[test]
    fn from_hex_accepts_bare_hex_only() {
        let d = Digest::parse(EMPTY).unwrap();
        assert_eq!(Digest::from_hex(&d.hex()), Ok(d));
        assert_eq!(
            Digest::from_hex(EMPTY),
            Err(DigestError::BadLength(EMPTY.to_owned()))
        );
    }

    #[test]
    fn rejects_uppercase_hex() {
        let upper = format!("sha256:{}", EMPTY[7..].to_uppercase());
        assert_eq!(
            Digest::parse(&upper),
            Err(DigestError::BadHex(upper.clone()))
        );
        let one_upper = EMPTY.replacen('e', "E", 1);
        assert!(matches!(
            Digest::parse(&one_upper),
            Err(DigestError::BadHex(_))
        ));
    }

    #[test]
    fn rejects_other_algorithms() {
        for s in [
            "sha512:abcd",
            "SHA256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            ":e3b0",
            "sha256+b64:abc",
        ] {
            assert_eq!(
                Digest::parse(s),
                Err(DigestError::UnsupportedAlgorithm(s.to_owned())),
                "{s}"
            );
        }
    }

    #[test]
    fn rejects_missing_prefix() {
        let bare = &EMPTY[7..];
        assert_eq!(
            Digest::parse(bare),
            Err(DigestError::MissingAlgorithm(bare.to_owned()))
        );
        assert_eq!(
            Digest::parse(""),
            Err(DigestError::MissingAlgorithm(String::new()))
        );
    }

    #[test]
    fn rejects_wrong_length() {
        let short = &EMPTY[..EMPTY.len() - 1];
        let long = format!("{EMPTY}0");
        for s in [short, &long, "sha256:", "sha256:ab"] {
            assert_eq!(
                Digest::parse(s),
                Err(DigestError::BadLength(s.to_owned())),
                "{s}"
            );
        }
    }

    #[test]
    fn rejects_anything_extra() {
        for s in [
            format!("{EMPTY}\n"),
            format!(" {EMPTY}"),
            format!("{}:{}", EMPTY, "00"),
            EMPTY.replacen('e', "g", 1),
            EMPTY.replacen('e', "/", 1),
        ] {
            assert!(Digest::parse(&s).is_err(), "{s:?} should be rejected");
        }
    }

    #[test]
    fn rejects_multibyte_chars_without_panicking() {
        // 32 two-byte chars: 64 bytes, so the length check passes and the hex
        // check must catch it.
        let s = format!("sha256:{}", "é".repeat(32));
        assert!(matches!(Digest::parse(&s), Err(DigestError::BadHex(_))));
        let s = format!("sha256:{}", "é".repeat(31));
        assert!(matches!(Digest::parse(&s), Err(DigestError::BadLength(_))));
    }

    #[test]
    fn error_messages_quote_the_value_escaped() {
        let err = Digest::parse("md5:\nforged log line").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(r#""md5:\nforged log line""#), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn ordering_and_hashing_follow_bytes() {
        let a = Digest::from_sha256_bytes([0; 32]);
        let b = Digest::from_sha256_bytes([1; 32]);
        assert!(a < b);
        let set: std::collections::HashSet<_> = [a.clone(), a.clone(), b].into();
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn serde_uses_the_string_form() {
        let d = Digest::parse(EMPTY).unwrap();
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{EMPTY}\""));
        let back: Digest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn serde_rejects_invalid_strings_and_other_types() {
        let err = serde_json::from_str::<Digest>("\"sha1:abc\"").unwrap_err();
        assert!(err.to_string().contains("unsupported algorithm"), "{err}");
        assert!(serde_json::from_str::<Digest>("42").is_err());
    }
}
