//! Real clients pulling through dockside: containerd (ctr, hosts.toml, `?ns=`), podman
//! (registries.conf mirror with a path prefix per upstream) and dockerd (daemon.json
//! `registry-mirrors`). Each is configured with what `dockside client-config` writes, or with a
//! shipped example from `deploy/clients/`, so a generator or example that stops working fails here.
//!
//! They fall back to Docker Hub when a mirror fails, so each runs with Docker Hub's names pinned
//! to 127.0.0.1 in /etc/hosts (restored afterwards) and one at a time. The upstream registry is
//! on a port only dockside knows, so every blob it serves came through dockside.

use std::time::Duration;

use crate::support::clients::{Containerd, Dockerd, Podman};
use crate::support::dockside::{Config, Dockside, Upstream};
use crate::support::image::{Format, Image, Index};
use crate::support::registry::{Auth, Registry, count};
use crate::support::serial::HostsPin;
use crate::support::{http, skopeo};

const PULL_TIMEOUT: Duration = Duration::from_secs(300);

/// This machine's architecture as the OCI names it, and another one.
fn arches() -> (&'static str, &'static str) {
    match std::env::consts::ARCH {
        "aarch64" => ("arm64", "amd64"),
        _ => ("amd64", "arm64"),
    }
}

/// No blob of `img` was fetched from `reg` (a platform the client did not ask for).
fn assert_blobs_not_fetched(reg: &Registry, repo: &str, img: &Image) {
    let log = reg.access_log();
    for b in &img.layers {
        let path = format!("/v2/{repo}/blobs/{}", b.digest);
        assert_eq!(
            count(&log, "GET", &path),
            0,
            "other platform's layer fetched: {path}"
        );
    }
}

/// Every blob of `img` was fetched from `reg` exactly once.
fn assert_blobs_came_through(reg: &Registry, repo: &str, img: &Image) {
    let log = reg.access_log();
    for b in img.blobs() {
        assert_eq!(
            count(&log, "GET", &format!("/v2/{repo}/blobs/{}", b.digest)),
            1,
            "blob {} fetched once from the upstream via dockside; upstream log: {log:?}",
            b.digest
        );
    }
}

#[test]
fn containerd_pulls_through_hosts_toml_mirror_with_ns() {
    let _pin = HostsPin::new();
    let hub = Registry::start(Auth::None);
    // The default upstream is a decoy: only `?ns=docker.io` leads to the image.
    let decoy = Registry::start(Auth::None);
    let img = Image::generate(800, &[400_000, 60_000, 3_000], Format::Docker);
    skopeo::push(&hub, "library/ctrimg", "1.0", &img);
    let (mine, other) = arches();
    let multi = Index::generate(801, &[90_000], Format::Oci, &[other, mine]);
    skopeo::push(&hub, "library/ctrmulti", "2.0", &multi);
    let d = Dockside::start(
        &Config::new(vec![Upstream::hub(&hub), Upstream::new("quay.io", &decoy)])
            .default_upstream(Some("quay.io")),
    );
    let c = Containerd::start();
    let hosts = c.generated_hosts_dir(&d);
    let hosts = hosts.to_str().unwrap();
    let decoy_before = decoy.access_log();

    ctr_pull(&c, hosts, &[], "docker.io/library/ctrimg:1.0");
    let ls = c.ctr(&["images", "ls"], Duration::from_secs(30));
    ls.assert_ok();
    assert!(
        ls.stdout.contains("docker.io/library/ctrimg:1.0")
            && ls.stdout.contains(&img.manifest.digest),
        "ctr images ls shows the image with the pushed digest:\n{}",
        ls.stdout
    );
    assert_blobs_came_through(&hub, "library/ctrimg", &img);

    // A multi-platform index: containerd picks this machine's platform.
    ctr_pull(&c, hosts, &[], "docker.io/library/ctrmulti:2.0");
    assert_blobs_came_through(&hub, "library/ctrmulti", multi.image(mine));
    assert_blobs_not_fetched(&hub, "library/ctrmulti", multi.image(other));
    let decoy_log = decoy.access_log()[decoy_before.len()..].to_vec();
    assert!(
        decoy_log.is_empty(),
        "default upstream asked despite ?ns=docker.io: {decoy_log:?}"
    );
}

/// The shipped `_default/hosts.toml`: a configured registry comes through dockside, and one
/// dockside does not know falls through to the registry itself after dockside's 404.
#[test]
fn containerd_default_hosts_toml_mirrors_known_and_passes_unknown_registries() {
    let _pin = HostsPin::new();
    let img = Image::generate(805, &[150_000, 20_000], Format::Oci);
    let hub = registry_with("library/ctrdef", "1.0", &img);
    let other = Image::generate(806, &[50_000], Format::Oci);
    let elsewhere = registry_with("team/direct", "1.0", &other);
    let d = Dockside::start(&Config::new(vec![Upstream::hub(&hub)]));
    let c = Containerd::start();
    let hosts = c.shipped_default_hosts_dir(&d.url());
    let hosts = hosts.to_str().unwrap();

    ctr_pull(&c, hosts, &[], "docker.io/library/ctrdef:1.0");
    assert_blobs_came_through(&hub, "library/ctrdef", &img);

    // `--plain-http`: the registry's own address is plain HTTP on loopback.
    let direct = format!("{}/team/direct:1.0", elsewhere.host());
    ctr_pull(&c, hosts, &["--plain-http"], &direct);
    let asked = d.log();
    assert!(
        asked.contains("team/direct"),
        "containerd asked dockside first; dockside log:\n{asked}"
    );
    assert_blobs_came_through(&elsewhere, "team/direct", &other);
}

#[test]
fn podman_pulls_through_registries_conf_mirror() {
    let _pin = HostsPin::new();
    let hub = Registry::start(Auth::None);
    let img = Image::generate(810, &[350_000, 40_000], Format::Oci);
    skopeo::push(&hub, "library/podimg", "1.0", &img);
    // A second upstream, not the default: podman reaches it only through its path prefix.
    let qimg = Image::generate(811, &[120_000], Format::Oci);
    let quay = registry_with("team/podq", "3.0", &qimg);
    let d = Dockside::start(&Config::new(vec![
        Upstream::hub(&hub),
        Upstream::new("quay.io", &quay),
    ]));
    let p = Podman::new(&d);

    let out = p.podman(&["pull", "docker.io/library/podimg:1.0"], PULL_TIMEOUT);
    out.assert_ok();
    p.podman(&["pull", "quay.io/team/podq:3.0"], PULL_TIMEOUT)
        .assert_ok();
    assert_blobs_came_through(&quay, "team/podq", &qimg);
    let ls = p.podman(
        &[
            "images",
            "--digests",
            "--format",
            "{{.Repository}}:{{.Tag}} {{.Digest}}",
        ],
        Duration::from_secs(60),
    );
    ls.assert_ok();
    assert!(
        ls.stdout.contains("docker.io/library/podimg:1.0")
            && ls.stdout.contains(&img.manifest.digest),
        "podman images shows the image with the pushed digest:\n{}",
        ls.stdout
    );
    assert_blobs_came_through(&hub, "library/podimg", &img);
}

#[test]
fn dockerd_pulls_through_registry_mirror() {
    let _pin = HostsPin::new();
    let hub = Registry::start(Auth::None);
    let img = Image::generate(820, &[300_000, 70_000], Format::Docker);
    skopeo::push(&hub, "library/dockimg", "1.0", &img);
    let (mine, other) = arches();
    let multi = Index::generate(821, &[80_000], Format::Docker, &[other, mine]);
    skopeo::push(&hub, "library/dockmulti", "2.0", &multi);
    let d = Dockside::start(&Config::new(vec![Upstream::hub(&hub)]));
    let dd = Dockerd::start(&d);

    let out = dd.docker(&["pull", "dockimg:1.0"], PULL_TIMEOUT);
    if !out.success() {
        eprintln!(
            "--- dockerd log tail ---\n{}",
            crate::support::tail(&dd.log(), 40)
        );
    }
    out.assert_ok();
    let inspect = dd.docker(
        &[
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            "dockimg:1.0",
        ],
        Duration::from_secs(30),
    );
    inspect.assert_ok();
    assert!(
        inspect.stdout.contains(&img.manifest.digest),
        "docker image inspect shows the pushed digest: {}",
        inspect.stdout
    );
    assert_blobs_came_through(&hub, "library/dockimg", &img);

    // A manifest list, by digest: dockerd resolves its platform's manifest through the mirror.
    let reference = format!("dockmulti@{}", multi.manifest.digest);
    dd.docker(&["pull", &reference], PULL_TIMEOUT).assert_ok();
    assert_blobs_came_through(&hub, "library/dockmulti", multi.image(mine));
    assert_blobs_not_fetched(&hub, "library/dockmulti", multi.image(other));
}

/// A plain upstream registry holding `img` as `repo:tag`.
fn registry_with(repo: &str, tag: &str, img: &Image) -> Registry {
    let reg = Registry::start(Auth::None);
    skopeo::push(&reg, repo, tag, img);
    reg
}

/// `ctr images pull` through the hosts.toml mirror config in `hosts`; shows containerd's log on
/// failure.
fn ctr_pull(c: &Containerd, hosts: &str, flags: &[&str], reference: &str) {
    let mut args = vec!["images", "pull", "--hosts-dir", hosts];
    args.extend_from_slice(&["--snapshotter", "native"]);
    args.extend_from_slice(flags);
    args.push(reference);
    let out = c.ctr(&args, PULL_TIMEOUT);
    if !out.success() {
        eprintln!(
            "--- containerd log tail ---\n{}",
            crate::support::tail(&c.log(), 40)
        );
    }
    out.assert_ok();
}

/// Issue #3's air-gap promise for every client: images prefetched through the admin API are
/// pulled by tag by containerd and podman once the upstream is gone and dockside is offline.
#[test]
fn containerd_and_podman_pull_prefetched_images_with_the_upstream_gone() {
    let _pin = HostsPin::new();
    let mut hub = Registry::start(Auth::None);
    let (mine, _) = arches();
    let img = Image::generate_for(820, &[300_000, 20_000], Format::Oci, mine);
    skopeo::push(&hub, "library/sealed", "1.0", &img);
    let cfg = Config::new(vec![Upstream::hub(&hub)]);
    let d = Dockside::start(&cfg);

    let api = format!("{}/api/prefetch", d.admin_url());
    let body =
        serde_json::json!({ "images": ["docker.io/library/sealed:1.0"], "platforms": "all" });
    let started = http::request("POST", &api, &[], Some(body.to_string().into_bytes())).unwrap();
    assert_eq!(started.status, 202, "{}", started.text());
    let status: serde_json::Value = serde_json::from_slice(&started.body).unwrap();
    let status_url = format!("{}{}", d.admin_url(), status["status"].as_str().unwrap());
    let report = crate::support::wait_for("the prefetch to finish", PULL_TIMEOUT, || {
        let r = http::get(&status_url).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
        (v["state"] == "done").then_some(v)
    });
    assert_eq!(report["images"][0]["ok"], true, "{report}");
    assert_eq!(
        report["images"][0]["blobs_fetched"],
        img.blobs().len() as u64,
        "{report}"
    );

    hub.kill();
    let dir = d.into_dir();
    let offline = Config {
        offline: true,
        ..cfg
    };
    let d = Dockside::start_in(&offline, dir);
    let c = Containerd::start();
    let hosts = c.generated_hosts_dir(&d);
    ctr_pull(
        &c,
        hosts.to_str().unwrap(),
        &[],
        "docker.io/library/sealed:1.0",
    );
    let ls = c.ctr(&["images", "ls"], Duration::from_secs(30));
    assert!(ls.stdout.contains(&img.manifest.digest), "{}", ls.stdout);
    let p = Podman::new(&d);
    p.podman(&["pull", "docker.io/library/sealed:1.0"], PULL_TIMEOUT)
        .assert_ok();
}
