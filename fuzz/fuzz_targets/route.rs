//! `oci::route::parse` on (method, path, query) as a client sends them.
//!
//! Input: the first byte picks the method, the rest is the request target, split at its first `?`.
//! Properties: only GET and HEAD route; every name, digest and host in a route is valid and
//! re-parses to itself; the route rebuilt as a canonical request routes to the same route; error
//! messages stay one short line whatever the input.
#![no_main]

use dockside::oci::route::{self, Route};
use dockside::oci::{Digest, Reference, RegistryHost, RepoName, Target};
use http::Method;
use libfuzzer_sys::fuzz_target;

const METHODS: [Method; 6] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
];

/// Longest error message: the message text plus a value cut to 200 bytes, each escaped to at
/// most 10 characters by `{:?}` (`\u{10ffff}`).
const ERROR_MAX: usize = 200 + 200 * 10;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let method = &METHODS[usize::from(selector) % METHODS.len()];
    let target = String::from_utf8_lossy(rest);
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (&*target, None),
    };
    match route::parse(method, path, query) {
        Ok(r) => check_route(method, &r),
        Err(e) => {
            let message = e.to_string();
            assert!(
                !message.contains(['\n', '\r']),
                "multi-line error: {message}"
            );
            assert!(
                message.len() <= ERROR_MAX,
                "error of {} bytes",
                message.len()
            );
        }
    }
});

fn check_route(method: &Method, r: &Route) {
    assert!(*method == Method::GET || *method == Method::HEAD);
    assert_eq!(r.head, *method == Method::HEAD);
    for host in r.ns.iter().chain(&r.host_prefix) {
        assert_eq!(RegistryHost::parse(host).as_ref(), Ok(host), "{host:?}");
        assert_eq!(**host, host.to_ascii_lowercase());
    }
    if let Some(q) = &r.query {
        assert!(!q.is_empty());
        assert!(
            q.split('&')
                .all(|pair| pair.split('=').next() != Some("ns")),
            "{q:?}"
        );
    }
    check_names(&r.target);
    let (path, query) = canonical(r);
    let again = route::parse(method, &path, query.as_deref());
    assert_eq!(
        again.as_ref(),
        Ok(r),
        "canonical request {path:?} {query:?}"
    );
}

/// Every validated value in the target re-parses from its display to an equal value.
fn check_names(target: &Target) {
    let name = match target {
        Target::Ping => return,
        Target::Manifest { name, reference } => {
            assert_eq!(
                Reference::parse(&reference.to_string()).as_ref(),
                Ok(reference)
            );
            name
        }
        Target::Blob { name, digest } | Target::Referrers { name, digest } => {
            assert_eq!(Digest::parse(&digest.to_string()).as_ref(), Ok(digest));
            name
        }
        Target::TagsList { name } => name,
    };
    assert_eq!(RepoName::parse(name.as_str()).as_ref(), Ok(name));
    assert!(
        name.components()
            .all(|c| !c.is_empty() && c != ".." && c != ".")
    );
}

/// The request a well-behaved client would send for this route: `ns` first, then the rest of
/// the query in its original order.
fn canonical(r: &Route) -> (String, Option<String>) {
    let prefix = r
        .host_prefix
        .as_ref()
        .map_or(String::new(), |h| format!("{h}/"));
    let path = match &r.target {
        Target::Ping => "/v2/".to_owned(),
        Target::Manifest { name, reference } => format!("/v2/{prefix}{name}/manifests/{reference}"),
        Target::Blob { name, digest } => format!("/v2/{prefix}{name}/blobs/{digest}"),
        Target::Referrers { name, digest } => format!("/v2/{prefix}{name}/referrers/{digest}"),
        Target::TagsList { name } => format!("/v2/{prefix}{name}/tags/list"),
    };
    let ns = r.ns.as_ref().map(|ns| format!("ns={ns}"));
    let query: Vec<&str> = ns.iter().chain(&r.query).map(String::as_str).collect();
    (path, (!query.is_empty()).then(|| query.join("&")))
}
