//! `upstream::auth::parse_challenge` on the `WWW-Authenticate` header an upstream sends.
//!
//! Two halves: the raw input must parse or be refused without a panic; and a `Bearer` challenge
//! built from the input's three NUL-separated parts, quoted as RFC 7235 says (`\` before `"` and
//! `\`), must parse back to exactly those parts, whatever the scheme's case.
#![no_main]

use dockside::upstream::auth::{Challenge, parse_challenge};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Challenge::Bearer { realm, .. }) = parse_challenge(text) {
        // The realm is read out of the input, so it can never be longer.
        assert!(realm.len() <= text.len());
    }
    round_trip(text);
});

fn round_trip(text: &str) {
    let mut parts = text.splitn(3, '\0');
    let realm = parts.next().unwrap_or("");
    let service = parts.next().unwrap_or("");
    let scope = parts.next().unwrap_or("");
    let scheme = ["Bearer", "bearer", "BEARER"][text.len() % 3];
    let header = format!(
        "{scheme} realm=\"{}\",service=\"{}\", scope=\"{}\"",
        quote(realm),
        quote(service),
        quote(scope)
    );
    let expected = Challenge::Bearer {
        realm: realm.to_owned(),
        service: Some(service.to_owned()),
        scope: Some(scope.to_owned()),
    };
    assert_eq!(parse_challenge(&header), Ok(expected), "header {header:?}");
    let basic = format!("Basic realm=\"{}\"", quote(realm));
    assert_eq!(
        parse_challenge(&basic),
        Ok(Challenge::Basic),
        "header {basic:?}"
    );
}

fn quote(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"")
}
