//! The upstream side on its own: the registry variants, the token server and image pushes work
//! without dockside, so a failure elsewhere is dockside's.

use crate::support::image::{Format, Image, Index};
use crate::support::registry::{Auth, Registry};
use crate::support::skopeo;

#[test]
fn upstream_direct_pulls_work_for_every_auth_variant() {
    for auth in [Auth::None, Auth::Basic, Auth::Token] {
        let reg = Registry::start(auth);
        let img = Image::generate(1, &[3000, 70_000], Format::Oci);
        skopeo::push(&reg, "library/direct", "v1", &img);
        let out = tempfile::tempdir().unwrap();
        let dest = format!("oci:{}:x", out.path().display());
        let src = format!("{}/library/direct:v1", reg.host());
        skopeo::pull_as(&src, &dest, reg.creds().as_deref(), &[]).assert_ok();
        let top = skopeo::layout_top(out.path());
        skopeo::assert_layout_has_image(out.path(), &top, &img, true);
        if auth != Auth::None {
            // Anonymous pulls are refused.
            let out2 = tempfile::tempdir().unwrap();
            let dest2 = format!("oci:{}:x", out2.path().display());
            let r = skopeo::pull(&src, &dest2, &[]);
            assert!(!r.success(), "{auth:?}: anonymous pull must fail");
        }
        if let Some(ts) = &reg.token {
            let reqs = ts.requests();
            assert!(
                reqs.iter().any(|r| r.granted),
                "token server granted a token: {reqs:?}"
            );
        }
    }
}

#[test]
fn upstream_direct_pull_of_index_and_docker_list() {
    let reg = Registry::start(Auth::None);
    let oci = Index::generate(2, &[5000], Format::Oci, &["amd64", "arm64"]);
    let docker = Index::generate(3, &[5000], Format::Docker, &["amd64", "arm64"]);
    skopeo::push(&reg, "multi/oci", "v1", &oci);
    skopeo::push(&reg, "multi/docker", "v1", &docker);
    let out = tempfile::tempdir().unwrap();
    skopeo::pull(
        &format!("{}/multi/oci:v1", reg.host()),
        &format!("oci:{}:x", out.path().display()),
        &["--all"],
    )
    .assert_ok();
    skopeo::assert_layout_has_index(out.path(), &oci);
    let out = tempfile::tempdir().unwrap();
    skopeo::pull(
        &format!("{}/multi/docker:v1", reg.host()),
        &format!("dir:{}", out.path().display()),
        &["--all"],
    )
    .assert_ok();
    skopeo::assert_dir_has(out.path(), &docker);
}
