//! `client_auth`: htpasswd users and bearer tokens in front of the mirror, with per-upstream
//! access, as skopeo and plain HTTP clients meet them.

use crate::support::dockside::{Config, Dockside, Upstream};
use crate::support::image::{Format, Image};
use crate::support::registry::{Auth, Registry};
use crate::support::tools;
use crate::support::{http, skopeo};

const TOKEN: &str = "ci-token-0123456789abcdef";

fn htpasswd(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("htpasswd");
    let out = tools::command("htpasswd")
        .args(["-B", "-b", "-c", "-C", "5"])
        .arg(&path)
        .args(["alice", "wonderland"])
        .output()
        .expect("htpasswd (apache2-utils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

#[test]
fn clients_must_authenticate_and_stay_within_their_upstreams() {
    let hub = Registry::start(Auth::None);
    let other = Registry::start(Auth::None);
    let img = Image::generate(4001, &[60_000], Format::Oci);
    skopeo::push(&hub, "library/guarded", "v1", &img);
    skopeo::push(&other, "team/app", "v1", &img);
    let files = tempfile::tempdir().unwrap();
    let token_file = files.path().join("ci.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut cfg = Config::new(vec![
        Upstream::hub(&hub),
        Upstream::new("other.example", &other),
    ]);
    cfg.extra_yaml = format!(
        "client_auth:\n  htpasswd: {:?}\n  tokens: [{{ name: ci, token_file: {:?} }}]\n  \
         access: {{ alice: [docker.io], ci: ['*'] }}\n",
        htpasswd(files.path()),
        token_file
    );
    let d = Dockside::start(&cfg);

    // Anonymous: a 401 with a Basic challenge, on /v2/ as on everything else.
    let r = http::get(&format!("{}/v2/", d.url())).unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some(r#"Basic realm="dockside""#)
    );
    assert_eq!(r.error_code().as_deref(), Some("UNAUTHORIZED"));
    let out = tempfile::tempdir().unwrap();
    let dest = format!("oci:{}:x", out.path().display());
    let anonymous = skopeo::pull(&format!("{}/library/guarded:v1", d.host()), &dest, &[]);
    assert!(!anonymous.success(), "an anonymous pull went through");
    let wrong = skopeo::pull_as(
        &format!("{}/library/guarded:v1", d.host()),
        &dest,
        Some("alice:guess"),
        &[],
    );
    assert!(!wrong.success(), "a wrong password went through");

    // alice with her password: docker.io yes, the other upstream no.
    let pulled = skopeo::pull_as(
        &format!("{}/library/guarded:v1", d.host()),
        &dest,
        Some("alice:wonderland"),
        &[],
    );
    pulled.assert_ok();
    let url = format!("{}/v2/other.example/team/app/manifests/v1", d.url());
    let basic = format!("Basic {}", base64_encode("alice:wonderland"));
    let r = http::request(
        "GET",
        &url,
        &[("authorization", &basic), ("accept", "*/*")],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 403, "{}", r.snippet());
    assert_eq!(r.error_code().as_deref(), Some("DENIED"));

    // The ci token reads everything.
    let bearer = format!("Bearer {TOKEN}");
    let r = http::request(
        "GET",
        &url,
        &[("authorization", &bearer), ("accept", "*/*")],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.snippet());
    assert_eq!(r.body, img.manifest.data);
}

fn base64_encode(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}
