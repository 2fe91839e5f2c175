//! Maps a request (method, path, query) to the registry API operation it asks
//! for.
//!
//! This is pure syntax: it knows nothing about which upstreams are
//! configured. dockside is a read-only mirror, so only the pull side of the
//! distribution API is routed; pushes, deletes and uploads are refused by
//! method before the path is even looked at.

use http::Method;

use super::digest::Digest;
use super::host::RegistryHost;
use super::reference::{Reference, RepoName};
use super::shown;

/// A parsed registry API request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The registry host from containerd's `?ns=` mirror parameter,
    /// lowercased (host names are case-insensitive). None if absent.
    pub ns: Option<RegistryHost>,
    pub target: Target,
    /// True for HEAD: same lookup as GET, but no body is sent.
    pub head: bool,
    /// The query string minus `ns`, for passing through upstream
    /// (`n`/`last` on tags/list, `artifactType` on referrers). None if
    /// nothing is left.
    pub query: Option<String>,
    /// A first path component naming a registry host with a port
    /// (`/v2/registry.corp:5000/app/...`), lowercased. A `:` can never be part
    /// of a repository name, so such a component can only be an upstream
    /// prefix; the target's name is what follows it.
    pub host_prefix: Option<RegistryHost>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `/v2/` or `/v2`: the API version check.
    Ping,
    /// `/v2/<name>/manifests/<reference>`
    Manifest {
        name: RepoName,
        reference: Reference,
    },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: RepoName, digest: Digest },
    /// `/v2/<name>/tags/list`
    TagsList { name: RepoName },
    /// `/v2/<name>/referrers/<digest>`
    Referrers { name: RepoName, digest: Digest },
}

/// Why a request is not a valid pull request. Each variant carries the
/// rejected value (cut to a loggable length).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    #[error("invalid repository name {0:?}")]
    NameInvalid(String),
    #[error("invalid digest {0:?}: only sha256:<64 lowercase hex> digests are supported")]
    DigestInvalid(String),
    /// A manifest reference that is neither a tag nor a sha256 digest. No manifest can have
    /// it, so error.rs answers it as an unknown manifest (404), as distribution does.
    #[error(
        "no manifest has the reference {0:?}: a reference is a tag ([A-Za-z0-9_][A-Za-z0-9_.-], at most 128) or a sha256:<64 lowercase hex> digest"
    )]
    ReferenceInvalid(String),
    #[error(
        "invalid ns parameter {0:?}: expected a registry host such as docker.io or localhost:5000"
    )]
    NamespaceInvalid(String),
    #[error("no registry API route for {0:?}")]
    NotFound(String),
    #[error("method {0:?} is not supported: this mirror is read-only (GET and HEAD only)")]
    MethodNotAllowed(String),
}

/// Routes one request. `path` is the URI path without the query; `query` is
/// the raw query string without the `?`.
pub fn parse(method: &Method, path: &str, query: Option<&str>) -> Result<Route, RouteError> {
    // Method first: a push (`POST /v2/x/blobs/uploads/`) must be told it is
    // unsupported, not that the path doesn't exist.
    let head = match *method {
        Method::GET => false,
        Method::HEAD => true,
        _ => return Err(RouteError::MethodNotAllowed(shown(method.as_str()))),
    };
    let (host_prefix, target) = parse_path(path)?;
    let (ns, query) = split_query(query.unwrap_or(""))?;
    Ok(Route {
        ns,
        target,
        head,
        query,
        host_prefix,
    })
}

/// Parses the path by its last two components, since `<name>` may itself
/// contain components called `manifests`, `blobs` or `tags`, while a
/// reference or digest never contains `/`. The last match therefore wins.
fn parse_path(path: &str) -> Result<(Option<RegistryHost>, Target), RouteError> {
    if path == "/v2" || path == "/v2/" {
        return Ok((None, Target::Ping));
    }
    let not_found = || RouteError::NotFound(shown(path));
    let rest = path.strip_prefix("/v2/").ok_or_else(not_found)?;
    let (head, last) = rest.rsplit_once('/').ok_or_else(not_found)?;
    let (name, kind) = head.rsplit_once('/').ok_or_else(not_found)?;
    // An empty last component (`/v2/x/manifests/`) names no resource.
    if last.is_empty() {
        return Err(not_found());
    }
    let (host_prefix, name) = split_host_prefix(name)?;
    parse_target(name, kind, last, not_found).map(|target| (host_prefix, target))
}

/// `registry.corp:5000/app` → (`registry.corp:5000`, `app`); names without a port are left
/// whole (an upstream named without a port is recognised later, against the configuration).
fn split_host_prefix(name: &str) -> Result<(Option<RegistryHost>, &str), RouteError> {
    match name.split_once('/') {
        Some((first, rest)) if first.contains(':') => {
            let host =
                RegistryHost::parse(first).map_err(|_| RouteError::NameInvalid(shown(name)))?;
            Ok((Some(host), rest))
        }
        _ => Ok((None, name)),
    }
}

fn parse_target(
    name: &str,
    kind: &str,
    last: &str,
    not_found: impl Fn() -> RouteError,
) -> Result<Target, RouteError> {
    match (kind, last) {
        ("manifests", reference) => Ok(Target::Manifest {
            name: parse_name(name)?,
            reference: parse_reference(reference)?,
        }),
        ("blobs", digest) => Ok(Target::Blob {
            name: parse_name(name)?,
            digest: parse_digest(digest)?,
        }),
        ("referrers", digest) => Ok(Target::Referrers {
            name: parse_name(name)?,
            digest: parse_digest(digest)?,
        }),
        ("tags", "list") => Ok(Target::TagsList {
            name: parse_name(name)?,
        }),
        _ => Err(not_found()),
    }
}

fn parse_name(name: &str) -> Result<RepoName, RouteError> {
    RepoName::parse(name).map_err(|_| RouteError::NameInvalid(shown(name)))
}

fn parse_digest(digest: &str) -> Result<Digest, RouteError> {
    Digest::parse(digest).map_err(|_| RouteError::DigestInvalid(shown(digest)))
}

/// A manifest's reference. Whatever is wrong with it (a bad tag, a digest of another algorithm
/// or a malformed one), the answer is the same: no manifest has it.
fn parse_reference(reference: &str) -> Result<Reference, RouteError> {
    Reference::parse(reference).map_err(|_| RouteError::ReferenceInvalid(shown(reference)))
}

/// Splits the query into the validated `ns` value and everything else.
fn split_query(query: &str) -> Result<(Option<RegistryHost>, Option<String>), RouteError> {
    let mut ns = None;
    let mut rest: Vec<&str> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "ns" {
            rest.push(pair);
            continue;
        }
        // Two ns values would make the upstream ambiguous.
        if ns.is_some() {
            return Err(RouteError::NamespaceInvalid(shown(query)));
        }
        ns = Some(parse_ns(value)?);
    }
    let rest = (!rest.is_empty()).then(|| rest.join("&"));
    Ok((ns, rest))
}

/// Decodes and validates an `ns` value. containerd form-encodes it, so
/// `localhost:5000` arrives as `localhost%3A5000`.
fn parse_ns(raw: &str) -> Result<RegistryHost, RouteError> {
    let invalid = || RouteError::NamespaceInvalid(shown(raw));
    let decoded = percent_decode(raw).ok_or_else(invalid)?;
    RegistryHost::parse(&decoded).map_err(|_| invalid())
}

/// Strict percent-decoding: every `%` must start a two-digit hex escape, and the result must be
/// UTF-8. The `percent-encoding` crate decodes, but passes a stray `%` through as itself, so
/// escapes are checked first. `+` is left alone (it is not a host character, so validation
/// rejects it either way).
fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let escapes_ok = bytes
        .iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'%')
        .all(|(i, _)| {
            bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
        });
    if !escapes_ok {
        return None;
    }
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()?;
    Some(decoded.into_owned())
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_first_component_with_a_port_is_a_host_prefix() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let path = format!("/v2/Registry.Corp:5000/team/app/blobs/{digest}");
        let route = parse(&Method::GET, &path, None).unwrap();
        assert_eq!(route.host_prefix.as_deref(), Some("registry.corp:5000"));
        assert!(
            matches!(route.target, Target::Blob { ref name, .. } if name.as_str() == "team/app")
        );
        let plain = parse(&Method::GET, "/v2/ghcr.io/app/manifests/1", None).unwrap();
        assert_eq!(
            plain.host_prefix, None,
            "a host without a port stays part of the name"
        );
        for bad in [
            "/v2/bad_host:5000/app/manifests/1",
            "/v2/host:99999/app/manifests/1",
            "/v2/a:1/manifests/1",
        ] {
            assert!(parse(&Method::GET, bad, None).is_err(), "{bad}");
        }
    }

    use super::*;
    use crate::oci::Tag;

    const DIGEST: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn get(path: &str) -> Result<Route, RouteError> {
        parse(&Method::GET, path, None)
    }

    fn target(path: &str) -> Target {
        get(path).unwrap().target
    }

    fn name(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    fn digest() -> Digest {
        Digest::parse(DIGEST).unwrap()
    }

    #[test]
    fn ping_with_and_without_slash() {
        assert_eq!(target("/v2/"), Target::Ping);
        assert_eq!(target("/v2"), Target::Ping);
    }

    #[test]
    fn manifest_by_tag() {
        assert_eq!(
            target("/v2/library/alpine/manifests/3.20"),
            Target::Manifest {
                name: name("library/alpine"),
                reference: Reference::Tag(Tag::parse("3.20").unwrap()),
            }
        );
    }

    #[test]
    fn manifest_by_digest() {
        assert_eq!(
            target(&format!("/v2/alpine/manifests/{DIGEST}")),
            Target::Manifest {
                name: name("alpine"),
                reference: Reference::Digest(digest()),
            }
        );
    }

    #[test]
    fn blob() {
        assert_eq!(
            target(&format!("/v2/a/b/c/blobs/{DIGEST}")),
            Target::Blob {
                name: name("a/b/c"),
                digest: digest(),
            }
        );
    }

    #[test]
    fn tags_list() {
        assert_eq!(
            target("/v2/org/repo/tags/list"),
            Target::TagsList {
                name: name("org/repo")
            }
        );
    }

    #[test]
    fn referrers() {
        assert_eq!(
            target(&format!("/v2/org/repo/referrers/{DIGEST}")),
            Target::Referrers {
                name: name("org/repo"),
                digest: digest(),
            }
        );
    }

    #[test]
    fn name_may_contain_route_keywords() {
        assert_eq!(
            target("/v2/a/manifests/b/manifests/latest"),
            Target::Manifest {
                name: name("a/manifests/b"),
                reference: Reference::Tag(Tag::parse("latest").unwrap()),
            }
        );
        assert_eq!(
            target(&format!("/v2/blobs/tags/manifests/blobs/{DIGEST}")),
            Target::Blob {
                name: name("blobs/tags/manifests"),
                digest: digest(),
            }
        );
        assert_eq!(
            target("/v2/tags/tags/list"),
            Target::TagsList { name: name("tags") }
        );
        // A tag may be called "list".
        assert_eq!(
            target("/v2/tags/manifests/list"),
            Target::Manifest {
                name: name("tags"),
                reference: Reference::Tag(Tag::parse("list").unwrap()),
            }
        );
    }

    #[test]
    fn head_sets_flag() {
        let r = parse(&Method::HEAD, "/v2/x/manifests/latest", None).unwrap();
        assert!(r.head);
        assert!(!get("/v2/x/manifests/latest").unwrap().head);
    }

    #[test]
    fn write_methods_are_405_before_path_checks() {
        let cases = [
            (Method::PUT, "/v2/x/manifests/latest"),
            (Method::POST, "/v2/x/blobs/uploads/"),
            (Method::PATCH, "/v2/x/blobs/uploads/some-uuid"),
            (Method::DELETE, &format!("/v2/x/blobs/{DIGEST}")),
            (Method::OPTIONS, "/v2/"),
            (Method::POST, "/not/a/registry/path"),
        ];
        for (method, path) in cases {
            assert_eq!(
                parse(&method, path, None),
                Err(RouteError::MethodNotAllowed(method.to_string())),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn extension_methods_are_405() {
        let m = Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(
            parse(&m, "/v2/", None),
            Err(RouteError::MethodNotAllowed("PURGE".into()))
        );
    }

    #[test]
    fn non_api_paths_are_not_found() {
        for path in [
            "/",
            "",
            "/v1/",
            "/v2x",
            "/v3/x/manifests/latest",
            "/v2/x",
            "/v2/x/manifests",
            "/v2/manifests/latest",
            "/v2/x/manifests/",
            "/v2/x/blobs/",
            "/v2/x/tags/list/",
            "/v2/x/tags/other",
            "/v2/x/blobs/uploads/",
            "/v2/x/blobs/uploads/uuid",
            "/v2/_catalog",
            "//v2/x/manifests/latest",
            "/v2/x/unknown/latest",
        ] {
            assert_eq!(
                get(path),
                Err(RouteError::NotFound(path.into())),
                "{path:?}"
            );
        }
    }

    #[test]
    fn invalid_names_are_name_invalid() {
        for (path, bad) in [
            ("/v2/Upper/manifests/latest", "Upper"),
            ("/v2/../x/manifests/latest", "../x"),
            ("/v2/a/../b/manifests/latest", "a/../b"),
            ("/v2/a//b/tags/list", "a//b"),
            ("/v2//manifests/latest", ""),
            ("/v2/a%2fb/manifests/latest", "a%2fb"),
            ("/v2/a/./b/tags/list", "a/./b"),
        ] {
            assert_eq!(
                get(path),
                Err(RouteError::NameInvalid(bad.into())),
                "{path:?}"
            );
        }
    }

    #[test]
    fn invalid_digests_are_digest_invalid() {
        let upper = DIGEST.to_uppercase().replace("SHA256", "sha256");
        for (path, bad) in [
            ("/v2/x/blobs/sha256:abc".to_owned(), "sha256:abc"),
            ("/v2/x/blobs/latest".to_owned(), "latest"),
            (format!("/v2/x/blobs/{upper}"), upper.as_str()),
            ("/v2/x/referrers/sha512:00".to_owned(), "sha512:00"),
        ] {
            assert_eq!(
                get(&path),
                Err(RouteError::DigestInvalid(bad.into())),
                "{path:?}"
            );
        }
    }

    #[test]
    fn an_invalid_manifest_reference_is_one_no_manifest_has() {
        let long = "t".repeat(129);
        // The conformance suite's `.INVALID_MANIFEST_NAME`, bad tags, and digests that are
        // malformed or of another algorithm.
        for bad in [
            ".INVALID_MANIFEST_NAME",
            ".hidden",
            "-x",
            "a%20b",
            long.as_str(),
            "..",
            "sha256:zz",
            "md5:00",
        ] {
            for method in [Method::GET, Method::HEAD] {
                let path = format!("/v2/x/manifests/{bad}");
                assert_eq!(
                    parse(&method, &path, None),
                    Err(RouteError::ReferenceInvalid(bad.into())),
                    "{method} {path:?}"
                );
            }
        }
        let message = get("/v2/x/manifests/.INVALID_MANIFEST_NAME")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("\".INVALID_MANIFEST_NAME\"") && message.contains("tag"),
            "{message}"
        );
    }

    #[test]
    fn ns_is_extracted_and_lowercased() {
        let r = parse(&Method::GET, "/v2/x/manifests/latest", Some("ns=Docker.IO")).unwrap();
        assert_eq!(r.ns.as_deref(), Some("docker.io"));
        assert_eq!(r.query, None);
    }

    #[test]
    fn ns_is_percent_decoded() {
        let r = parse(&Method::GET, "/v2/", Some("ns=localhost%3A5000")).unwrap();
        assert_eq!(r.ns.as_deref(), Some("localhost:5000"));
        let r = parse(&Method::GET, "/v2/", Some("ns=localhost%3a5000")).unwrap();
        assert_eq!(r.ns.as_deref(), Some("localhost:5000"));
        let r = parse(&Method::GET, "/v2/", Some("ns=127.0.0.1:5001")).unwrap();
        assert_eq!(r.ns.as_deref(), Some("127.0.0.1:5001"));
    }

    #[test]
    fn other_query_parameters_pass_through() {
        let r = parse(
            &Method::GET,
            "/v2/x/tags/list",
            Some("n=10&ns=ghcr.io&last=v1"),
        )
        .unwrap();
        assert_eq!(r.ns.as_deref(), Some("ghcr.io"));
        assert_eq!(r.query.as_deref(), Some("n=10&last=v1"));
        let r = parse(&Method::GET, "/v2/x/tags/list", Some("&n=5&&")).unwrap();
        assert_eq!(r.ns, None);
        assert_eq!(r.query.as_deref(), Some("n=5"));
        let r = parse(&Method::GET, "/v2/x/tags/list", Some("")).unwrap();
        assert_eq!(r.query, None);
        // Only the exact key "ns" is ours.
        let r = parse(&Method::GET, "/v2/", Some("nsx=1&NS=2")).unwrap();
        assert_eq!(r.ns, None);
        assert_eq!(r.query.as_deref(), Some("nsx=1&NS=2"));
    }

    #[test]
    fn bad_ns_values_are_rejected() {
        for bad in [
            "",
            "ns-with-%zz",
            "%3",
            "a%2Fb",
            "a/b",
            "host:",
            "host:0",
            "host:65536",
            "host:123456",
            "host:12a",
            "host:80:80",
            "a..b",
            ".a",
            "a.",
            "-a.io",
            "a-.io",
            "a_b.io",
            "a b",
            "a+b",
            "%5B%3A%3A1%5D",
            "%C3%A9.io",
            "%FF",
        ] {
            let query = format!("ns={bad}");
            assert_eq!(
                parse(&Method::GET, "/v2/", Some(&query)),
                Err(RouteError::NamespaceInvalid(bad.into())),
                "{query:?}"
            );
        }
        // Over 255 characters, though every label is fine.
        let long = format!("ns={}", [&*"a".repeat(63); 5].join("."));
        assert!(matches!(
            parse(&Method::GET, "/v2/", Some(&long)),
            Err(RouteError::NamespaceInvalid(_))
        ));
        // A bare key with no value is an empty ns.
        assert_eq!(
            parse(&Method::GET, "/v2/", Some("ns")),
            Err(RouteError::NamespaceInvalid(String::new()))
        );
    }

    #[test]
    fn percent_decoding_is_strict() {
        assert_eq!(
            percent_decode("localhost%3A5000").as_deref(),
            Some("localhost:5000")
        );
        assert_eq!(percent_decode("a%3ab").as_deref(), Some("a:b"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(percent_decode("plain+text").as_deref(), Some("plain+text"));
        assert_eq!(percent_decode("").as_deref(), Some(""));
        for bad in ["%", "%3", "a%zz", "%%41", "%4%41", "%41%", "%FF", "%C3"] {
            assert_eq!(percent_decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn duplicate_ns_is_rejected() {
        assert_eq!(
            parse(&Method::GET, "/v2/", Some("ns=a.io&ns=b.io")),
            Err(RouteError::NamespaceInvalid("ns=a.io&ns=b.io".into()))
        );
    }

    #[test]
    fn error_messages_quote_values() {
        let err = get("/v2/x/manifests/.bad\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(r#"".bad\n""#), "{msg}");
        let msg = parse(&Method::DELETE, "/v2/", None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("\"DELETE\""), "{msg}");
    }

    #[test]
    fn long_bad_values_are_cut() {
        let path = format!("/v3/{}", "x".repeat(10_000));
        let Err(RouteError::NotFound(value)) = get(&path) else {
            panic!("expected NotFound");
        };
        assert!(value.len() < 300, "{}", value.len());
    }
}
