//! Manifest media types and `Accept` negotiation.
//!
//! A client's Accept header decides which manifest formats it understands; a
//! cached manifest is only served if its type is acceptable, and the upstream
//! request carries the same preferences so the upstream doesn't convert or
//! refuse on our behalf.

use serde::Deserialize;
use serde_json::Value;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST_V1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The four negotiated types; bit `i` of an [`AcceptSet`] stands for
/// `NEGOTIATED[i]`. Order is also the order of [`AcceptSet::header_value`].
const NEGOTIATED: [&str; 4] = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// The set of negotiated manifest types a client accepts.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct AcceptSet(u8);

impl AcceptSet {
    pub const ALL: AcceptSet = AcceptSet(0b1111);

    /// Reads every `Accept` header value (each may be a comma-separated
    /// list). Parameters such as `q=` are ignored: registries don't honour
    /// weights either, and a listed type is taken as accepted.
    ///
    /// Falls back to [`AcceptSet::ALL`] for a wildcard, for no header, and
    /// for headers naming none of the four types (old clients sending
    /// `application/json` still get a manifest rather than an error).
    pub fn from_headers<'a>(values: impl Iterator<Item = &'a str>) -> AcceptSet {
        let mut bits = 0;
        for item in values.flat_map(|v| v.split(',')) {
            let media_type = essence(item);
            if media_type == "*/*" || media_type.eq_ignore_ascii_case("application/*") {
                return AcceptSet::ALL;
            }
            bits |= bit_of(media_type);
        }
        if bits == 0 {
            AcceptSet::ALL
        } else {
            AcceptSet(bits)
        }
    }

    /// Whether a manifest of this type may be served. Types outside the four
    /// negotiated ones (artifact manifests, schema 1, unknown) are not
    /// subject to negotiation and are always accepted.
    pub fn accepts(&self, media_type: &str) -> bool {
        match bit_of(essence(media_type)) {
            0 => true,
            bit => self.0 & bit != 0,
        }
    }

    /// The set as a number from 1 to 15, for file names.
    pub fn bits(&self) -> u8 {
        self.0
    }

    pub fn from_bits(bits: u8) -> Option<AcceptSet> {
        (1..=AcceptSet::ALL.0)
            .contains(&bits)
            .then_some(AcceptSet(bits))
    }

    /// The accepted types, comma-separated, for the upstream `Accept` header.
    pub fn header_value(&self) -> String {
        NEGOTIATED
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, t)| *t)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The `type/subtype` part of a media type, without parameters or
/// surrounding whitespace.
fn essence(media_type: &str) -> &str {
    media_type
        .split_once(';')
        .map_or(media_type, |(essence, _)| essence)
        .trim()
}

/// The AcceptSet bit of a negotiated type (media types compare
/// case-insensitively), or 0 for any other type.
fn bit_of(media_type: &str) -> u8 {
    NEGOTIATED
        .iter()
        .position(|t| t.eq_ignore_ascii_case(media_type))
        .map_or(0, |i| 1 << i)
}

/// Whether a media type names a multi-platform index rather than a single
/// image manifest.
pub fn is_index(media_type: &str) -> bool {
    let essence = essence(media_type);
    essence.eq_ignore_ascii_case(OCI_INDEX) || essence.eq_ignore_ascii_case(DOCKER_LIST)
}

/// Whether `s` is a bare `type/subtype` media type per RFC 6838 (no
/// parameters, no whitespace). Anything that passes is safe to put in a
/// `Content-Type` header.
pub fn valid_media_type(s: &str) -> bool {
    s.split_once('/')
        .is_some_and(|(ty, sub)| restricted_name(ty) && restricted_name(sub))
}

fn restricted_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.len() <= 127
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&c))
}

/// The top-level fields that identify a manifest's kind. Everything else
/// (including large arrays like `fsLayers`) is skipped without being built.
#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "mediaType")]
    media_type: Option<Value>,
    #[serde(rename = "schemaVersion")]
    schema_version: Option<Value>,
    manifests: Option<Value>,
    config: Option<Value>,
    layers: Option<Value>,
}

/// The media type of a manifest, from its JSON.
///
/// The `mediaType` field wins when present. It is returned only if it is a
/// well-formed media type: it may end up in a `Content-Type` header, and a
/// manifest carrying garbage there can't be trusted to be identified by its
/// shape either. Without it, the shape decides: `manifests` → OCI index,
/// `config` + `layers` → OCI manifest, `schemaVersion: 1` → signed schema 1.
/// Returns None for anything else, including invalid JSON.
pub fn sniff(body: &[u8]) -> Option<String> {
    let probe: Probe = serde_json::from_slice(body).ok()?;
    // An explicit `null` deserializes to None, i.e. counts as absent.
    match probe.media_type {
        Some(Value::String(t)) => return valid_media_type(&t).then_some(t),
        None => {}
        Some(_) => return None,
    }
    let kind = if probe.manifests.as_ref().is_some_and(Value::is_array) {
        OCI_INDEX
    } else if probe.config.as_ref().is_some_and(Value::is_object)
        && probe.layers.as_ref().is_some_and(Value::is_array)
    {
        OCI_MANIFEST
    } else if probe.schema_version.as_ref().and_then(Value::as_u64) == Some(1) {
        DOCKER_MANIFEST_V1_SIGNED
    } else {
        return None;
    };
    Some(kind.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(headers: &[&str]) -> AcceptSet {
        AcceptSet::from_headers(headers.iter().copied())
    }

    #[test]
    fn no_header_accepts_all() {
        assert_eq!(set(&[]), AcceptSet::ALL);
        assert_eq!(set(&[""]), AcceptSet::ALL);
    }

    #[test]
    fn wildcards_accept_all() {
        assert_eq!(set(&[OCI_MANIFEST, "*/*"]), AcceptSet::ALL);
        assert_eq!(set(&["*/*; q=0.1"]), AcceptSet::ALL);
        assert_eq!(set(&["Application/*"]), AcceptSet::ALL);
    }

    #[test]
    fn unrecognised_types_only_accept_all() {
        assert_eq!(set(&["application/json"]), AcceptSet::ALL);
        assert_eq!(set(&[DOCKER_MANIFEST_V1_SIGNED]), AcceptSet::ALL);
    }

    #[test]
    fn single_type() {
        let s = set(&[DOCKER_MANIFEST]);
        assert!(s.accepts(DOCKER_MANIFEST));
        assert!(!s.accepts(DOCKER_LIST));
        assert!(!s.accepts(OCI_MANIFEST));
        assert!(!s.accepts(OCI_INDEX));
        assert_eq!(s.header_value(), DOCKER_MANIFEST);
    }

    #[test]
    fn comma_lists_params_and_multiple_headers() {
        // The shape containerd sends, split across two header lines.
        let s = set(&[
            &format!("{DOCKER_MANIFEST}, {DOCKER_LIST};q=0.9"),
            &format!(" {OCI_MANIFEST} ; q=0.5 ,"),
        ]);
        assert!(s.accepts(DOCKER_MANIFEST));
        assert!(s.accepts(DOCKER_LIST));
        assert!(s.accepts(OCI_MANIFEST));
        assert!(!s.accepts(OCI_INDEX));
        assert_eq!(
            s.header_value(),
            format!("{OCI_MANIFEST}, {DOCKER_LIST}, {DOCKER_MANIFEST}")
        );
    }

    #[test]
    fn matching_is_case_insensitive() {
        let s = set(&[&OCI_INDEX.to_uppercase()]);
        assert!(s.accepts(OCI_INDEX));
        assert!(s.accepts(&OCI_INDEX.to_uppercase()));
        assert!(!s.accepts(OCI_MANIFEST));
    }

    #[test]
    fn accepts_ignores_params_on_the_served_type() {
        let s = set(&[OCI_MANIFEST]);
        assert!(s.accepts(&format!("{OCI_MANIFEST}; charset=utf-8")));
        assert!(!s.accepts(&format!("{OCI_INDEX}; charset=utf-8")));
    }

    #[test]
    fn other_types_are_always_accepted() {
        let s = set(&[OCI_MANIFEST]);
        assert!(s.accepts("application/vnd.oci.artifact.manifest.v1+json"));
        assert!(s.accepts(DOCKER_MANIFEST_V1_SIGNED));
        assert!(s.accepts("text/plain"));
    }

    #[test]
    fn all_header_value_lists_all_four() {
        assert_eq!(
            AcceptSet::ALL.header_value(),
            format!("{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_LIST}, {DOCKER_MANIFEST}")
        );
        for t in NEGOTIATED {
            assert!(AcceptSet::ALL.accepts(t));
        }
    }

    #[test]
    fn header_value_round_trips() {
        let s = set(&[&format!("{OCI_INDEX},{DOCKER_MANIFEST}")]);
        assert_eq!(set(&[&s.header_value()]), s);
    }

    #[test]
    fn is_index_detects_lists() {
        assert!(is_index(OCI_INDEX));
        assert!(is_index(&format!("{DOCKER_LIST}; q=1")));
        assert!(!is_index(OCI_MANIFEST));
        assert!(!is_index(DOCKER_MANIFEST));
    }

    #[test]
    fn media_type_grammar() {
        assert!(valid_media_type(OCI_MANIFEST));
        assert!(valid_media_type(DOCKER_MANIFEST_V1_SIGNED));
        assert!(valid_media_type("text/plain"));
        for bad in [
            "",
            "text",
            "text/",
            "/plain",
            "text/plain; charset=utf-8",
            "text/pl ain",
            "text/plain\r\nX-Evil: 1",
            "a/b/c",
            ".a/b",
            "é/b",
        ] {
            assert!(!valid_media_type(bad), "{bad:?}");
        }
        assert!(valid_media_type(&format!("a/{}", "b".repeat(127))));
        assert!(!valid_media_type(&format!("a/{}", "b".repeat(128))));
    }

    fn sniffed(json: &str) -> Option<String> {
        sniff(json.as_bytes())
    }

    #[test]
    fn sniff_prefers_media_type_field() {
        let body = format!(r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[]}}"#);
        assert_eq!(sniffed(&body).as_deref(), Some(DOCKER_LIST));
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{}},"layers":[]}}"#
        );
        assert_eq!(sniffed(&body).as_deref(), Some(DOCKER_MANIFEST));
        // Artifact types are reported as they are.
        let body = r#"{"mediaType":"application/vnd.example.thing+json","blobs":[]}"#;
        assert_eq!(
            sniffed(body).as_deref(),
            Some("application/vnd.example.thing+json")
        );
    }

    #[test]
    fn sniff_index_by_shape() {
        let body = r#"{"schemaVersion":2,"manifests":[{"digest":"x"}]}"#;
        assert_eq!(sniffed(body).as_deref(), Some(OCI_INDEX));
    }

    #[test]
    fn sniff_manifest_by_shape() {
        let body = r#"{"schemaVersion":2,"config":{"digest":"x"},"layers":[],"annotations":{}}"#;
        assert_eq!(sniffed(body).as_deref(), Some(OCI_MANIFEST));
        // Both halves are needed.
        assert_eq!(sniffed(r#"{"config":{}}"#), None);
        assert_eq!(sniffed(r#"{"layers":[]}"#), None);
        assert_eq!(sniffed(r#"{"config":[],"layers":[]}"#), None);
    }

    #[test]
    fn sniff_schema1() {
        let body = r#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[{"blobSum":"a"}],"signatures":[]}"#;
        assert_eq!(sniffed(body).as_deref(), Some(DOCKER_MANIFEST_V1_SIGNED));
    }

    #[test]
    fn sniff_unknown_shapes_are_none() {
        for body in [
            "",
            "not json",
            "[]",
            "\"string\"",
            "{}",
            r#"{"schemaVersion":2}"#,
            r#"{"schemaVersion":"1"}"#,
            r#"{"manifests":{}}"#,
        ] {
            assert_eq!(sniffed(body), None, "{body:?}");
        }
    }

    #[test]
    fn sniff_rejects_malformed_media_type_field() {
        for body in [
            r#"{"mediaType":"text/plain\r\nX-Evil: 1","manifests":[]}"#,
            r#"{"mediaType":"","manifests":[]}"#,
            r#"{"mediaType":42,"manifests":[]}"#,
        ] {
            assert_eq!(sniffed(body), None, "{body:?}");
        }
        // An explicit null is the same as absent.
        assert_eq!(
            sniffed(r#"{"mediaType":null,"manifests":[]}"#).as_deref(),
            Some(OCI_INDEX)
        );
    }
}
