//! `client_auth`: htpasswd users and bearer tokens in front of the mirror, with per-upstream
//! access, as skopeo and plain HTTP clients meet them, and how podman, containerd and dockerd
//! answer its challenge when they pull through it as a mirror.

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

/// How each real client answers dockside's Basic challenge when it pulls through dockside as a
/// mirror, as the README documents it. Each client falls back to Docker Hub when the mirror
/// refuses it, so Docker Hub's names are pinned to 127.0.0.1 (nothing answers there): a pull
/// that works came through dockside, as the upstream's access log confirms.
mod real_clients {
    use std::time::Duration;

    use super::*;
    use crate::support::clients::{Containerd, Dockerd, Podman};
    use crate::support::registry::count;
    use crate::support::serial::HostsPin;

    const PULL_TIMEOUT: Duration = Duration::from_secs(300);
    const IMAGE: &str = "docker.io/library/guarded:v1";

    /// A Docker Hub stand-in holding `library/guarded:v1`, and dockside in front of it with
    /// client_auth (alice / wonderland).
    fn guarded(seed: u64) -> (Registry, Image, Dockside, tempfile::TempDir) {
        let hub = Registry::start(Auth::None);
        let img = Image::generate(seed, &[60_000], Format::Oci);
        skopeo::push(&hub, "library/guarded", "v1", &img);
        let files = tempfile::tempdir().unwrap();
        let mut cfg = Config::new(vec![Upstream::hub(&hub)]);
        cfg.extra_yaml = format!("client_auth:\n  htpasswd: {:?}\n", htpasswd(files.path()));
        let d = Dockside::start(&cfg);
        (hub, img, d, files)
    }

    /// The image's layer came from the upstream, through dockside.
    fn assert_came_through(hub: &Registry, img: &Image) {
        let path = format!("/v2/library/guarded/blobs/{}", img.layers[0].digest);
        assert_eq!(count(&hub.access_log(), "GET", &path), 1, "{path}");
    }

    /// dockside refused a request for want of credentials (and so the client fell back).
    fn refused(d: &Dockside) -> usize {
        d.log().matches("status=401").count()
    }

    #[test]
    fn podman_answers_with_podman_login_to_the_mirror_not_creds() {
        let _pin = HostsPin::new();
        let (hub, img, d, _files) = guarded(4101);
        let p = Podman::new(&d);
        // --creds is for the registry named in the image (docker.io), not for its mirror.
        let out = p.podman(
            &["pull", "--creds", "alice:wonderland", IMAGE],
            PULL_TIMEOUT,
        );
        assert!(
            !out.success(),
            "podman --creds reached the mirror: {}",
            out.stderr
        );
        assert!(refused(&d) > 0, "{}", d.log());
        // `podman login <mirror>` keeps them in its auth file, where podman looks them up for
        // the mirror.
        let login = [
            "login",
            "--tls-verify=false",
            "-u",
            "alice",
            "-p",
            "wonderland",
        ];
        let mut args = login.to_vec();
        let host = d.host();
        args.push(&host);
        p.podman(&args, PULL_TIMEOUT).assert_ok();
        p.podman(&["pull", IMAGE], PULL_TIMEOUT).assert_ok();
        assert_came_through(&hub, &img);
    }

    #[test]
    fn containerd_answers_with_a_hosts_toml_header_or_ctr_user() {
        let _pin = HostsPin::new();
        let (hub, img, d, _files) = guarded(4102);
        let c = Containerd::start();
        let hosts = c.generated_hosts_dir(&d);
        let pull = |extra: &[&str]| {
            let dir = hosts.to_str().unwrap();
            let mut args = vec![
                "images",
                "pull",
                "--hosts-dir",
                dir,
                "--snapshotter",
                "native",
            ];
            args.extend_from_slice(extra);
            args.push(IMAGE);
            c.ctr(&args, PULL_TIMEOUT)
        };
        let out = pull(&[]);
        assert!(!out.success(), "an anonymous ctr pull went through");
        assert!(out.stderr.contains("401"), "{}", out.stderr);

        // ctr's --user answers the challenge of whichever host asks, the mirror included.
        pull(&["--user", "alice:wonderland"]).assert_ok();
        assert_came_through(&hub, &img);
        c.ctr(&["images", "rm", IMAGE], PULL_TIMEOUT).assert_ok();

        // For every pull of that registry (CRI too): a header on the mirror's hosts.toml entry.
        let toml = hosts.join("docker.io/hosts.toml");
        let text = std::fs::read_to_string(&toml).unwrap();
        let header = format!(
            "\n  [host.\"{}\".header]\n    authorization = \"Basic {}\"\n",
            d.url(),
            base64_encode("alice:wonderland")
        );
        std::fs::write(&toml, text + &header).unwrap();
        pull(&[]).assert_ok();
    }

    #[test]
    fn dockerd_answers_with_its_clients_docker_hub_credentials() {
        let _pin = HostsPin::new();
        let (hub, img, d, _files) = guarded(4103);
        let dd = Dockerd::start(&d);
        // `docker login <mirror>` succeeds, but dockerd does not use it for pulls through the
        // mirror: they carry the credentials the client holds for the image's registry.
        let host = d.host();
        let login = ["login", "-u", "alice", "-p", "wonderland", host.as_str()];
        dd.docker(&login, PULL_TIMEOUT).assert_ok();
        let out = dd.docker(&["pull", "guarded:v1"], PULL_TIMEOUT);
        assert!(
            !out.success(),
            "docker login <mirror> was used: {}",
            out.stdout
        );
        // Docker Hub's entry in the client's config.json (`docker login` without a server would
        // check them against Docker Hub first, so it is written as an operator would).
        let path = dd.client_dir().join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config["auths"]["https://index.docker.io/v1/"] =
            serde_json::json!({ "auth": base64_encode("alice:wonderland") });
        std::fs::write(&path, config.to_string()).unwrap();
        dd.docker(&["pull", "guarded:v1"], PULL_TIMEOUT).assert_ok();
        assert_came_through(&hub, &img);
    }
}

fn base64_encode(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}
