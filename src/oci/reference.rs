//! Repository names, tags and references, following the grammar of the OCI
//! distribution spec.
//!
//! The grammar is enforced strictly because these values end up in upstream
//! URLs and cache keys: a name that passes cannot contain `..`, `%`, empty
//! components or any character outside `[a-z0-9._/-]`, so it needs no further
//! escaping anywhere.

use std::fmt;
use std::str::FromStr;

use super::digest::{Digest, DigestError};
use super::host::RegistryHost;
use super::shown;

/// Longest repository name we accept. The spec only says many clients limit
/// the whole `host/name` to 255; limiting the name alone is the looser,
/// interoperable choice.
pub const NAME_MAX: usize = 255;

/// Longest tag: one leading character plus up to 127 more.
pub const TAG_MAX: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReferenceError {
    #[error(
        "invalid repository name {0:?}: expected lowercase components \
         [a-z0-9]+((.|_|__|-+)[a-z0-9]+)* joined by '/', at most 255 characters"
    )]
    NameInvalid(String),
    #[error("invalid tag {0:?}: expected [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
    TagInvalid(String),
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error("invalid registry host {0:?} in an image reference")]
    HostInvalid(String),
}

/// A repository name such as `library/alpine`, valid by construction.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct RepoName(String);

impl RepoName {
    pub fn parse(s: &str) -> Result<RepoName, ReferenceError> {
        if s.is_empty() || s.len() > NAME_MAX || !s.split('/').all(valid_component) {
            return Err(ReferenceError::NameInvalid(shown(s)));
        }
        Ok(RepoName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `/`-separated components, in order. Never empty.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    pub fn first_component(&self) -> &str {
        self.0
            .split_once('/')
            .map_or(self.0.as_str(), |(first, _)| first)
    }

    /// The name without its first component (`ghcr.io/a/b` → `a/b`), or None
    /// if there is only one component. Used when clients put the upstream
    /// host in the path instead of in `?ns=`.
    pub fn strip_first_component(&self) -> Option<RepoName> {
        let (_, rest) = self.0.split_once('/')?;
        // Every component of `rest` was already validated as part of `self`.
        Some(RepoName(rest.to_owned()))
    }

    /// Docker Hub's spelling of official images: `alpine` → `library/alpine`.
    /// Names with more than one component are returned unchanged.
    ///
    /// The result may exceed [`NAME_MAX`] by the 8 bytes of `library/`; it is
    /// only ever sent upstream, which judges it by its own limits.
    pub fn with_library_prefix(&self) -> RepoName {
        if self.0.contains('/') {
            self.clone()
        } else {
            RepoName(format!("library/{}", self.0))
        }
    }
}

/// One path component: runs of `[a-z0-9]` separated by `.`, `_`, `__` or
/// one or more `-`, starting and ending with a run.
fn valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let mut i = 0;
    loop {
        let run = bytes[i..]
            .iter()
            .take_while(|&&c| is_lower_alnum(c))
            .count();
        if run == 0 {
            return false;
        }
        i += run;
        if i == bytes.len() {
            return true;
        }
        let sep = separator_len(&bytes[i..]);
        if sep == 0 {
            return false;
        }
        i += sep;
    }
}

fn is_lower_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// Length of the separator at the start of `rest`, or 0 if there is none.
fn separator_len(rest: &[u8]) -> usize {
    match rest {
        [b'_', b'_', ..] => 2,
        [b'_' | b'.', ..] => 1,
        [b'-', ..] => rest.iter().take_while(|&&c| c == b'-').count(),
        _ => 0,
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for RepoName {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<RepoName, ReferenceError> {
        RepoName::parse(s)
    }
}

/// A tag such as `latest` or `v1.2.3_linux-amd64`, valid by construction.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Result<Tag, ReferenceError> {
        let bytes = s.as_bytes();
        let valid = match bytes.split_first() {
            Some((&first, rest)) => {
                bytes.len() <= TAG_MAX
                    && (first.is_ascii_alphanumeric() || first == b'_')
                    && rest.iter().all(|&c| is_tag_char(c))
            }
            None => false,
        };
        if !valid {
            return Err(ReferenceError::TagInvalid(shown(s)));
        }
        Ok(Tag(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_tag_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-')
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Tag {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Tag, ReferenceError> {
        Tag::parse(s)
    }
}

/// The `<reference>` of a manifest URL: a tag or a digest.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    /// A string containing `:` is a digest and must be a valid sha256 digest;
    /// tags cannot contain `:`, so there is no ambiguity.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.contains(':') {
            Ok(Reference::Digest(Digest::parse(s)?))
        } else {
            Ok(Reference::Tag(Tag::parse(s)?))
        }
    }

    pub fn as_digest(&self) -> Option<&Digest> {
        match self {
            Reference::Digest(d) => Some(d),
            Reference::Tag(_) => None,
        }
    }

    pub fn as_tag(&self) -> Option<&Tag> {
        match self {
            Reference::Tag(t) => Some(t),
            Reference::Digest(_) => None,
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Reference, ReferenceError> {
        Reference::parse(s)
    }
}

/// An image as operators and `docker pull` write it: `[host/]name[:tag|@digest]`. The host, when
/// present, names an upstream; without one the default upstream is meant. A missing tag is
/// `latest`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct ImageRef {
    pub host: Option<RegistryHost>,
    pub name: RepoName,
    pub reference: Reference,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, ReferenceError> {
        let (rest, reference) = match s.split_once('@') {
            // `name:tag@digest` pins the digest; the tag is only a label then.
            Some((rest, digest)) => {
                let rest = strip_tag(rest).0;
                (rest, Reference::Digest(Digest::parse(digest)?))
            }
            None => match strip_tag(s) {
                (rest, Some(tag)) => (rest, Reference::Tag(Tag::parse(tag)?)),
                (rest, None) => (rest, Reference::Tag(Tag::parse("latest")?)),
            },
        };
        let (host, name) = match rest.split_once('/') {
            Some((first, name)) if looks_like_host(first) => {
                let host = RegistryHost::parse(first)
                    .map_err(|_| ReferenceError::HostInvalid(shown(first)))?;
                (Some(host), name)
            }
            _ => (None, rest),
        };
        Ok(ImageRef {
            host,
            name: RepoName::parse(name)?,
            reference,
        })
    }
}

/// Split `name:tag` at a `:` after the last `/` (a `:` before it is a host's port).
fn strip_tag(s: &str) -> (&str, Option<&str>) {
    let after_slash = s.rfind('/').map_or(0, |i| i + 1);
    match s[after_slash..].rfind(':') {
        Some(i) => (&s[..after_slash + i], Some(&s[after_slash + i + 1..])),
        None => (s, None),
    }
}

/// Docker's rule: a first component with a `.` or `:`, or `localhost`, is a registry host.
fn looks_like_host(component: &str) -> bool {
    component.contains(['.', ':']) || component == "localhost"
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(host) = &self.host {
            write!(f, "{host}/")?;
        }
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}:{t}", self.name),
            Reference::Digest(d) => write!(f, "{}@{d}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn name_ok(s: &str) -> bool {
        RepoName::parse(s).is_ok()
    }

    #[test]
    fn accepts_typical_names() {
        for s in [
            "alpine",
            "library/alpine",
            "a/b/c/d",
            "my-org/my.repo",
            "a_b/c__d",
            "a--b",
            "a---------b",
            "0",
            "9a/b9",
            "manifests/blobs/tags",
            "ghcr.io/owner/repo",
        ] {
            assert!(name_ok(s), "{s} should be valid");
            assert_eq!(RepoName::parse(s).unwrap().as_str(), s);
        }
    }

    #[test]
    fn rejects_bad_separators() {
        for s in [
            "a___b", "a..b", "a._b", "a-_b", "-a", "a-", "_a", "a_", ".a", "a.", "a-.b",
        ] {
            assert!(!name_ok(s), "{s} should be invalid");
        }
    }

    #[test]
    fn rejects_bad_characters() {
        for s in [
            "Alpine", "a/B", "a b", "a:b", "a@b", "a%2fb", "a\\b", "a\0b", "é", "a+b",
        ] {
            assert!(!name_ok(s), "{s:?} should be invalid");
        }
    }

    #[test]
    fn rejects_empty_components_and_traversal() {
        for s in [
            "", "/", "/a", "a/", "a//b", "..", "../x", "a/../b", "a/./b", ".", "./a", "a/..",
        ] {
            assert!(!name_ok(s), "{s:?} should be invalid");
        }
    }

    #[test]
    fn name_length_limit_is_255() {
        let max = "a".repeat(NAME_MAX);
        assert!(name_ok(&max));
        assert!(!name_ok(&format!("{max}a")));
        // The limit counts separators too.
        let multi = format!("{}/{}", "a".repeat(127), "b".repeat(127));
        assert_eq!(multi.len(), 255);
        assert!(name_ok(&multi));
        assert!(!name_ok(&format!("{multi}b")));
    }

    #[test]
    fn name_error_quotes_value() {
        let err = RepoName::parse("Bad/Name").unwrap_err();
        assert_eq!(err, ReferenceError::NameInvalid("Bad/Name".into()));
        assert!(err.to_string().contains("\"Bad/Name\""), "{err}");
    }

    #[test]
    fn components_and_first() {
        let n = RepoName::parse("ghcr.io/owner/repo").unwrap();
        assert_eq!(
            n.components().collect::<Vec<_>>(),
            ["ghcr.io", "owner", "repo"]
        );
        assert_eq!(n.first_component(), "ghcr.io");
        let single = RepoName::parse("alpine").unwrap();
        assert_eq!(single.first_component(), "alpine");
        assert_eq!(single.components().count(), 1);
    }

    #[test]
    fn strip_first_component() {
        let n = RepoName::parse("ghcr.io/owner/repo").unwrap();
        let rest = n.strip_first_component().unwrap();
        assert_eq!(rest.as_str(), "owner/repo");
        assert_eq!(rest.strip_first_component().unwrap().as_str(), "repo");
        assert_eq!(
            RepoName::parse("repo").unwrap().strip_first_component(),
            None
        );
    }

    #[test]
    fn library_prefix_only_for_single_component() {
        let single = RepoName::parse("alpine").unwrap();
        assert_eq!(single.with_library_prefix().as_str(), "library/alpine");
        let multi = RepoName::parse("bitnami/redis").unwrap();
        assert_eq!(multi.with_library_prefix(), multi);
        let already = RepoName::parse("library/alpine").unwrap();
        assert_eq!(already.with_library_prefix(), already);
    }

    #[test]
    fn display_and_from_str() {
        let n: RepoName = "a/b".parse().unwrap();
        assert_eq!(n.to_string(), "a/b");
        let t: Tag = "v1".parse().unwrap();
        assert_eq!(t.to_string(), "v1");
    }

    #[test]
    fn accepts_typical_tags() {
        for s in [
            "latest",
            "v1.2.3",
            "_x",
            "A",
            "1.0-rc.1_build-7",
            "UPPER",
            "a..b",
            "x--",
        ] {
            assert_eq!(Tag::parse(s).unwrap().as_str(), s);
        }
    }

    #[test]
    fn rejects_bad_tags() {
        for s in [
            "", ".x", "-x", "a:b", "a/b", "a b", "a@b", "a%20", "é", "a\n", "../x",
        ] {
            assert_eq!(
                Tag::parse(s),
                Err(ReferenceError::TagInvalid(s.into())),
                "{s:?}"
            );
        }
    }

    #[test]
    fn tag_length_limit_is_128() {
        let max = "t".repeat(TAG_MAX);
        assert!(Tag::parse(&max).is_ok());
        assert!(Tag::parse(&format!("{max}t")).is_err());
    }

    #[test]
    fn reference_with_colon_is_digest() {
        let r = Reference::parse(DIGEST).unwrap();
        assert_eq!(r.as_digest().unwrap().to_string(), DIGEST);
        assert_eq!(r.as_tag(), None);
        assert_eq!(r.to_string(), DIGEST);
    }

    #[test]
    fn reference_without_colon_is_tag() {
        let r = Reference::parse("latest").unwrap();
        assert_eq!(r.as_tag().unwrap().as_str(), "latest");
        assert_eq!(r.as_digest(), None);
        assert_eq!(r.to_string(), "latest");
    }

    #[test]
    fn reference_errors_keep_their_kind() {
        assert!(matches!(
            Reference::parse("sha512:abc"),
            Err(ReferenceError::Digest(DigestError::UnsupportedAlgorithm(_)))
        ));
        assert!(matches!(
            Reference::parse("latest:"),
            Err(ReferenceError::Digest(_))
        ));
        assert!(matches!(
            Reference::parse(".bad"),
            Err(ReferenceError::TagInvalid(_))
        ));
        // A tag-shaped string that is too long is still a tag error.
        assert!(matches!(
            Reference::parse(&"x".repeat(200)),
            Err(ReferenceError::TagInvalid(_))
        ));
    }

    #[test]
    fn digest_error_message_is_passed_through() {
        let err = Reference::parse("md5:abc").unwrap_err();
        assert!(err.to_string().contains("\"md5:abc\""), "{err}");
    }

    #[test]
    fn image_references() {
        let r = ImageRef::parse("alpine").unwrap();
        assert_eq!((r.host, r.name.as_str()), (None, "alpine"));
        assert_eq!(r.reference, Reference::parse("latest").unwrap());
        let r = ImageRef::parse("127.0.0.1:5000/team/app:v1.2").unwrap();
        assert_eq!(r.host.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(r.name.as_str(), "team/app");
        assert_eq!(r.to_string(), "127.0.0.1:5000/team/app:v1.2");
        let r = ImageRef::parse(&format!("localhost/app:1@{DIGEST}")).unwrap();
        assert_eq!(r.host.as_deref(), Some("localhost"));
        assert_eq!(r.reference, Reference::parse(DIGEST).unwrap());
        let r = ImageRef::parse("library/alpine:3").unwrap();
        assert_eq!((r.host, r.name.as_str()), (None, "library/alpine"));
        assert!(ImageRef::parse("Alpine").is_err());
        assert!(ImageRef::parse("alpine:").is_err());
        assert!(ImageRef::parse("alpine@sha256:abc").is_err());
        assert!(ImageRef::parse("bad_host.:1/x").is_err());
    }
}
