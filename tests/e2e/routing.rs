//! Routing: `?ns=` by name and alias (with `OCI-Namespace`), a path prefix naming an upstream,
//! the default upstream, Docker Hub's `library/` rule, and unknown namespaces.

use crate::support::dockside::{Config, Dockside, Upstream};
use crate::support::image::{Format, Image};
use crate::support::registry::{Auth, Registry, count};
use crate::support::{http, skopeo};

#[test]
fn routing_by_ns_alias_prefix_and_default_across_two_upstreams() {
    let hub = Registry::start(Auth::None);
    let quay = Registry::start(Auth::None);
    let alpine = Image::generate(600, &[5_000], Format::Oci);
    let tool = Image::generate(601, &[5_000], Format::Docker);
    let app = Image::generate(602, &[9_000, 3_000], Format::Oci);
    let solo = Image::generate(603, &[4_000], Format::Oci);
    skopeo::push(&hub, "library/alpine", "3", &alpine);
    skopeo::push(&hub, "someorg/tool", "1", &tool);
    skopeo::push(&quay, "team/app", "1", &app);
    skopeo::push(&quay, "solo", "1", &solo);
    let d = Dockside::start(
        &Config::new(vec![
            Upstream::hub(&hub),
            Upstream::new("quay.io", &quay),
            // A registry host with a port, as containerd sends it in ?ns=.
            Upstream::new("localhost:5001", &quay),
        ])
        .default_upstream(Some("docker.io")),
    );

    let cases: &[(&str, &Image, Option<&str>)] = &[
        // Default upstream, with and without library/.
        ("/v2/alpine/manifests/3", &alpine, None),
        ("/v2/library/alpine/manifests/3", &alpine, None),
        ("/v2/someorg/tool/manifests/1", &tool, None),
        // ?ns= by name and by alias.
        (
            "/v2/alpine/manifests/3?ns=docker.io",
            &alpine,
            Some("docker.io"),
        ),
        (
            "/v2/library/alpine/manifests/3?ns=index.docker.io",
            &alpine,
            Some("index.docker.io"),
        ),
        (
            "/v2/library/alpine/manifests/3?ns=registry-1.docker.io",
            &alpine,
            Some("registry-1.docker.io"),
        ),
        ("/v2/team/app/manifests/1?ns=quay.io", &app, Some("quay.io")),
        ("/v2/solo/manifests/1?ns=quay.io", &solo, Some("quay.io")),
        (
            "/v2/team/app/manifests/1?ns=localhost:5001",
            &app,
            Some("localhost:5001"),
        ),
        // A first path component naming an upstream.
        ("/v2/quay.io/team/app/manifests/1", &app, None),
        ("/v2/quay.io/solo/manifests/1", &solo, None),
        ("/v2/docker.io/library/alpine/manifests/3", &alpine, None),
        ("/v2/docker.io/alpine/manifests/3", &alpine, None),
        // A prefix with a port can only be a registry host, never part of a repository name.
        ("/v2/localhost:5001/team/app/manifests/1", &app, None),
    ];
    for (path, img, ns) in cases {
        let r = http::get_manifest(&format!("{}{path}", d.url()));
        assert_eq!(r.status, 200, "GET {path}: {}", r.snippet());
        assert_eq!(
            r.header("docker-content-digest").as_deref(),
            Some(img.manifest.digest.as_str()),
            "GET {path} routed to the wrong image"
        );
        assert_eq!(r.body, img.manifest.data, "GET {path}");
        if let Some(ns) = ns {
            assert_eq!(
                r.header("oci-namespace").as_deref(),
                Some(*ns),
                "OCI-Namespace for {path}"
            );
        }
    }
    // Blobs route the same way.
    for path in [
        format!("/v2/quay.io/team/app/blobs/{}", app.layers[0].digest),
        format!("/v2/team/app/blobs/{}?ns=quay.io", app.layers[0].digest),
    ] {
        let r = http::get(&format!("{}{path}", d.url())).unwrap();
        assert_eq!(r.status, 200, "GET {path}");
        assert_eq!(r.body, app.layers[0].data, "GET {path}");
    }
    // A real client through the path prefix.
    let out = tempfile::tempdir().unwrap();
    skopeo::pull(
        &format!("{}/quay.io/team/app:1", d.host()),
        &format!("oci:{}:x", out.path().display()),
        &[],
    )
    .assert_ok();
    skopeo::assert_layout_has_image(out.path(), &skopeo::layout_top(out.path()), &app, true);

    // What each upstream was asked: library/ added for Docker Hub only, nothing crossed over.
    let hub_log = hub.access_log();
    let quay_log = quay.access_log();
    // Eight spellings of docker.io/library/alpine:3, one cache entry: one upstream request.
    assert_eq!(
        count(&hub_log, "GET", "/v2/library/alpine/manifests/3")
            + count(&hub_log, "HEAD", "/v2/library/alpine/manifests/3"),
        1,
        "every spelling of library/alpine:3 shares one cached tag: {hub_log:?}"
    );
    assert_eq!(
        count(&hub_log, "GET", "/v2/alpine/manifests/3"),
        0,
        "library/ not added"
    );
    assert!(
        count(&quay_log, "GET", "/v2/solo/manifests/1") >= 1,
        "quay.io asked for solo"
    );
    assert_eq!(
        count(&quay_log, "GET", "/v2/library/solo/manifests/1"),
        0,
        "library/ on quay.io"
    );
    let crossed_to_hub: Vec<_> = hub_log
        .iter()
        .filter(|l| {
            l.uri.contains("team/app") || l.uri.contains("solo") || l.uri.contains("quay.io")
        })
        .collect();
    assert!(
        crossed_to_hub.is_empty(),
        "quay.io requests reached docker.io: {crossed_to_hub:?}"
    );
    let crossed_to_quay: Vec<_> = quay_log
        .iter()
        .filter(|l| {
            l.uri.contains("alpine") || l.uri.contains("someorg") || l.uri.contains("library")
        })
        .collect();
    assert!(
        crossed_to_quay.is_empty(),
        "docker.io requests reached quay.io: {crossed_to_quay:?}"
    );
}

#[test]
fn unknown_namespace_is_rejected_without_proxying() {
    let hub = Registry::start(Auth::None);
    let alpine = Image::generate(610, &[5_000], Format::Oci);
    skopeo::push(&hub, "library/alpine", "3", &alpine);
    let d = Dockside::start(&Config::new(vec![Upstream::hub(&hub)]));
    let before = hub.access_log();

    for (method, path) in [
        (
            "GET",
            "/v2/library/alpine/manifests/3?ns=unknown.example.com".to_string(),
        ),
        (
            "HEAD",
            "/v2/library/alpine/manifests/3?ns=ghcr.io".to_string(),
        ),
        (
            "GET",
            format!(
                "/v2/library/alpine/blobs/{}?ns=quay.io",
                alpine.layers[0].digest
            ),
        ),
    ] {
        let r = http::request(
            method,
            &format!("{}{path}", d.url()),
            &[("Accept", http::MANIFEST_ACCEPT)],
            None,
        )
        .unwrap();
        assert!(
            (400..500).contains(&r.status),
            "{method} {path}: unknown ns must be a 4xx, got {} {}",
            r.status,
            r.snippet()
        );
        if method == "GET" {
            assert!(
                r.error_code().is_some(),
                "{method} {path}: OCI error JSON: {}",
                r.snippet()
            );
        }
    }
    let after = hub.access_log();
    assert_eq!(
        after[before.len()..].to_vec(),
        vec![],
        "an unknown ns was proxied upstream"
    );

    // A first component that looks like a registry host but is not configured.
    let r = http::get_manifest(&format!("{}/v2/ghcr.io/team/app/manifests/1", d.url()));
    assert!(
        (400..500).contains(&r.status),
        "unknown prefix: {} {}",
        r.status,
        r.snippet()
    );
}
