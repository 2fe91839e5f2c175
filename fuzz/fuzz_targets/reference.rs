//! `oci::reference`: `RepoName`, `Tag`, `Reference` and `ImageRef` parse the same input.
//!
//! Properties: a `RepoName` is safe in upstream URLs and cache paths (no empty, `.` or `..`
//! component, lowercase, bounded) and its parts re-parse; a `Tag` or `Reference` displays as its
//! input; an `ImageRef` displays in a canonical form that parses back to the same image.
#![no_main]

use dockside::oci::reference::{NAME_MAX, TAG_MAX};
use dockside::oci::{ImageRef, Reference, RepoName, Tag};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(name) = RepoName::parse(text) {
        check_name(&name);
        assert_eq!(name.as_str(), text);
    }
    if let Ok(tag) = Tag::parse(text) {
        assert!(!tag.as_str().is_empty() && tag.as_str().len() <= TAG_MAX);
        assert!(!tag.as_str().contains([':', '/', '@']));
        assert_eq!(tag.to_string(), text);
    }
    if let Ok(reference) = Reference::parse(text) {
        assert_eq!(reference.to_string(), text);
    }
    if let Ok(image) = ImageRef::parse(text) {
        check_name(&image.name);
        let shown = image.to_string();
        assert_eq!(
            ImageRef::parse(&shown).as_ref(),
            Ok(&image),
            "{text:?} shown as {shown:?}"
        );
    }
});

fn check_name(name: &RepoName) {
    let s = name.as_str();
    assert!(!s.is_empty() && s.len() <= NAME_MAX);
    assert!(
        !s.bytes()
            .any(|c| c.is_ascii_uppercase() || c == b'\\' || c == b':')
    );
    assert!(
        name.components()
            .all(|c| !c.is_empty() && c != "." && c != ".."),
        "unsafe name {s:?}"
    );
    assert_eq!(RepoName::parse(s).as_ref(), Ok(name));
    if let Some(rest) = name.strip_first_component() {
        assert_eq!(RepoName::parse(rest.as_str()), Ok(rest));
    }
    let library = name.with_library_prefix();
    assert!(library.components().all(|c| !c.is_empty() && c != ".."));
}
