//! skopeo pulls through dockside for each kind of upstream auth, and multi-arch images.

use crate::support::dockside::{Config, Dockside, Upstream};
use crate::support::http;
use crate::support::image::{Format, Image, Index};
use crate::support::registry::{Auth, Registry, USER};
use crate::support::{skopeo, token};

/// Pulls `reference` (`repo:tag`) through `d` into a fresh OCI layout and checks it against
/// `img` (the manifest itself only when skopeo needs no conversion, i.e. for OCI images).
pub(crate) fn pull_oci_and_check(d: &Dockside, reference: &str, img: &Image) {
    let out = tempfile::tempdir().unwrap();
    skopeo::pull(
        &format!("{}/{reference}", d.host()),
        &format!("oci:{}:pulled", out.path().display()),
        &[],
    )
    .assert_ok();
    let top = skopeo::layout_top(out.path());
    let same = img.manifest.media_type.contains("oci");
    skopeo::assert_layout_has_image(out.path(), &top, img, same);
}

/// Pulls `reference` through `d` with the `dir:` transport (no conversion: byte-exact).
fn pull_dir_and_check(d: &Dockside, reference: &str, art: &dyn crate::support::image::Artifact) {
    let out = tempfile::tempdir().unwrap();
    let extra: &[&str] = if art.is_index() { &["--all"] } else { &[] };
    skopeo::pull(
        &format!("{}/{reference}", d.host()),
        &format!("dir:{}", out.path().display()),
        extra,
    )
    .assert_ok();
    skopeo::assert_dir_has(out.path(), art);
}

#[test]
fn pull_through_plain_upstream_oci_and_docker_images() {
    let reg = Registry::start(Auth::None);
    let oci = Image::generate(10, &[200_000, 30_000, 1_000], Format::Oci);
    let docker = Image::generate(11, &[150_000, 2_000], Format::Docker);
    skopeo::push(&reg, "library/app", "v1", &oci);
    skopeo::push(&reg, "team/dockerimg", "v2", &docker);
    let d = Dockside::start(&Config::new(vec![Upstream::hub(&reg)]));

    pull_oci_and_check(&d, "library/app:v1", &oci);
    pull_dir_and_check(&d, "library/app:v1", &oci);
    pull_oci_and_check(&d, "team/dockerimg:v2", &docker);
    pull_dir_and_check(&d, "team/dockerimg:v2", &docker);

    // The manifest answer itself: digest, media type and length of what was pushed.
    let r = http::get_manifest(&format!("{}/v2/team/dockerimg/manifests/v2", d.url()));
    assert_eq!(r.status, 200, "{}", r.snippet());
    assert_eq!(r.body, docker.manifest.data, "manifest bytes");
    assert_eq!(
        r.header("docker-content-digest").as_deref(),
        Some(docker.manifest.digest.as_str())
    );
    assert_eq!(
        r.header("content-type").as_deref(),
        Some(docker.manifest.media_type.as_str())
    );
    assert_eq!(
        r.header("content-length"),
        Some(docker.manifest.data.len().to_string()),
        "Content-Length"
    );
    // HEAD answers the same headers without a body.
    let h = http::request(
        "HEAD",
        &format!("{}/v2/library/app/manifests/v1", d.url()),
        &[("Accept", http::MANIFEST_ACCEPT)],
        None,
    )
    .unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(
        h.header("docker-content-digest").as_deref(),
        Some(oci.manifest.digest.as_str())
    );
    assert_eq!(
        h.header("content-type").as_deref(),
        Some(oci.manifest.media_type.as_str())
    );
    assert!(h.body.is_empty(), "HEAD has no body");
    // By digest too.
    let r = http::get_manifest(&format!(
        "{}/v2/library/app/manifests/{}",
        d.url(),
        oci.manifest.digest
    ));
    assert_eq!(r.status, 200);
    assert_eq!(r.body, oci.manifest.data);
    // A blob: bytes, digest header and length.
    let layer = &oci.layers[0];
    let r = http::get(&format!(
        "{}/v2/library/app/blobs/{}",
        d.url(),
        layer.digest
    ))
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, layer.data, "blob bytes");
    assert_eq!(
        r.header("content-length"),
        Some(layer.data.len().to_string())
    );
}

/// Pulls through dockside from an upstream that needs credentials, which only dockside has.
fn pull_through_auth_upstream(auth: Auth) -> (Registry, Dockside) {
    let reg = Registry::start(auth);
    let img = Image::generate(20, &[120_000, 40_000, 5_000], Format::Oci);
    let img2 = Image::generate(21, &[60_000], Format::Docker);
    skopeo::push(&reg, "library/secret", "v1", &img);
    skopeo::push(&reg, "library/secret", "v2", &img2);
    if let Some(ts) = &reg.token {
        ts.clear();
    }
    let d = Dockside::start(&Config::new(vec![Upstream::hub(&reg)]));
    pull_oci_and_check(&d, "library/secret:v1", &img);
    pull_dir_and_check(&d, "library/secret:v2", &img2);
    // Nothing reached the upstream without credentials being accepted in the end.
    let log = reg.access_log();
    let blob_gets = log
        .iter()
        .filter(|l| l.method == "GET" && l.uri.contains("/blobs/sha256:") && l.status == 200)
        .count();
    assert!(
        blob_gets >= 5,
        "dockside fetched the blobs from the upstream: {log:?}"
    );
    (reg, d)
}

#[test]
fn pull_through_htpasswd_upstream() {
    pull_through_auth_upstream(Auth::Basic);
}

#[test]
fn pull_through_token_upstream_reuses_tokens() {
    let (reg, _d) = pull_through_auth_upstream(Auth::Token);
    let ts = reg.token.as_ref().unwrap();
    let reqs = ts.requests();
    assert!(!reqs.is_empty(), "dockside asked the token server");
    for r in &reqs {
        assert!(r.granted, "dockside sent the configured credentials: {r:?}");
        assert_eq!(r.account.as_deref(), Some(USER));
        assert_eq!(
            r.service.as_deref(),
            Some(token::SERVICE),
            "service from the challenge"
        );
        assert!(
            r.scopes
                .iter()
                .any(|s| s.starts_with("repository:library/secret:") && s.contains("pull")),
            "pull scope for the repository requested: {r:?}"
        );
    }
    // Two images, 8 manifests and blobs: a token per upstream request would be ~10; a cached
    // token is one (allow one more for a refresh race).
    assert!(
        reqs.len() <= 2,
        "tokens are reused, not fetched per request: {reqs:?}"
    );
}

/// A wrong upstream password is an error the client sees quickly, not a hang or a 200.
fn wrong_password_is_a_clear_error(auth: Auth) {
    let reg = Registry::start(auth);
    let img = Image::generate(30, &[10_000], Format::Oci);
    skopeo::push(&reg, "library/locked", "v1", &img);
    let mut up = Upstream::hub(&reg);
    up.password = Some("wrong-password".into());
    let d = Dockside::start(&Config::new(vec![up]));

    let r = http::get_manifest(&format!("{}/v2/library/locked/manifests/v1", d.url()));
    assert!(
        r.status >= 400,
        "{auth:?}: wrong upstream password must be an error, got {} {}",
        r.status,
        r.snippet()
    );
    assert!(
        r.error_code().is_some(),
        "{auth:?}: OCI error JSON expected, got {} {}",
        r.status,
        r.snippet()
    );

    let out = tempfile::tempdir().unwrap();
    let p = skopeo::pull(
        &format!("{}/library/locked:v1", d.host()),
        &format!("oci:{}:x", out.path().display()),
        &[],
    );
    assert!(!p.success(), "{auth:?}: the pull must fail");
    assert!(!p.timed_out(), "{auth:?}: the pull must fail, not hang");
    eprintln!(
        "{auth:?} wrong password: dockside answered {} {}; skopeo: {}",
        r.status,
        r.snippet().trim(),
        p.stderr.trim()
    );
}

#[test]
fn wrong_upstream_password_htpasswd_is_a_clear_error() {
    wrong_password_is_a_clear_error(Auth::Basic);
}

#[test]
fn wrong_upstream_password_token_is_a_clear_error() {
    wrong_password_is_a_clear_error(Auth::Token);
}

#[test]
fn multi_arch_index_all_and_single_arch() {
    let reg = Registry::start(Auth::None);
    let oci = Index::generate(40, &[50_000, 7_000], Format::Oci, &["amd64", "arm64"]);
    let docker = Index::generate(41, &[30_000], Format::Docker, &["amd64", "arm64"]);
    skopeo::push(&reg, "library/multi", "v1", &oci);
    skopeo::push(&reg, "library/multi-docker", "v1", &docker);
    let d = Dockside::start(&Config::new(vec![Upstream::hub(&reg)]));

    // --all: the index and every platform's manifest and blobs, byte for byte.
    let out = tempfile::tempdir().unwrap();
    skopeo::pull(
        &format!("{}/library/multi:v1", d.host()),
        &format!("oci:{}:all", out.path().display()),
        &["--all"],
    )
    .assert_ok();
    skopeo::assert_layout_has_index(out.path(), &oci);

    // One platform picked from the index.
    let out = tempfile::tempdir().unwrap();
    skopeo::pull(
        &format!("{}/library/multi:v1", d.host()),
        &format!("oci:{}:arm", out.path().display()),
        &["--override-arch", "arm64", "--override-os", "linux"],
    )
    .assert_ok();
    let top = skopeo::layout_top(out.path());
    skopeo::assert_layout_has_image(out.path(), &top, oci.image("arm64"), true);
    assert!(
        !out.path()
            .join("blobs/sha256")
            .join(oci.image("amd64").layers[0].hex())
            .exists(),
        "only the arm64 image was copied"
    );

    // A Docker manifest list, --all, into dir: (no conversion).
    pull_dir_and_check(&d, "library/multi-docker:v1", &docker);
    // And one platform of it.
    let out = tempfile::tempdir().unwrap();
    skopeo::pull(
        &format!("{}/library/multi-docker:v1", d.host()),
        &format!("dir:{}", out.path().display()),
        &["--override-arch", "amd64", "--override-os", "linux"],
    )
    .assert_ok();
    skopeo::assert_dir_has(out.path(), docker.image("amd64"));
}

#[test]
fn pull_from_an_https_upstream_trusted_through_ca_file() {
    let reg = Registry::start_tls(Auth::Basic);
    let img = Image::generate(40, &[120_000, 4_000], Format::Oci);
    skopeo::push(&reg, "library/secure", "v1", &img);
    let ca = reg.ca_pem.as_ref().unwrap().display().to_string();

    // Without the CA, dockside does not trust the upstream: a gateway error naming it.
    let untrusting = Dockside::start(&Config::new(vec![Upstream::hub(&reg)]));
    let r = http::get_manifest(&format!("{}/v2/secure/manifests/v1", untrusting.url()));
    assert_eq!(r.status, 502, "{}", r.snippet());
    assert!(r.snippet().contains("docker.io"), "{}", r.snippet());

    let trusting = Upstream {
        ca_file: Some(ca),
        ..Upstream::hub(&reg)
    };
    let d = Dockside::start(&Config::new(vec![trusting]));
    pull_oci_and_check(&d, "secure:v1", &img);
}
