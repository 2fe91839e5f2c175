//! Real clients pulling `docker.io/library/...` through dockside: containerd (ctr, hosts.toml,
//! `?ns=`), podman (registries.conf mirror) and dockerd (`--registry-mirror`).
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
use crate::support::skopeo;

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

/// Every blob of `img` was fetched from `reg` (through dockside) exactly once.
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
    let hosts = c.hosts_dir(&d.host());
    let hosts = hosts.to_str().unwrap();
    let decoy_before = decoy.access_log();

    ctr_pull(&c, hosts, "docker.io/library/ctrimg:1.0");
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
    ctr_pull(&c, hosts, "docker.io/library/ctrmulti:2.0");
    assert_blobs_came_through(&hub, "library/ctrmulti", multi.image(mine));
    assert_blobs_not_fetched(&hub, "library/ctrmulti", multi.image(other));
    let decoy_log = decoy.access_log()[decoy_before.len()..].to_vec();
    assert!(
        decoy_log.is_empty(),
        "default upstream asked despite ?ns=docker.io: {decoy_log:?}"
    );
}

#[test]
fn podman_pulls_through_registries_conf_mirror() {
    let _pin = HostsPin::new();
    let hub = Registry::start(Auth::None);
    let img = Image::generate(810, &[350_000, 40_000], Format::Oci);
    skopeo::push(&hub, "library/podimg", "1.0", &img);
    let d = Dockside::start(&Config::new(vec![Upstream::hub(&hub)]));
    let p = Podman::new(&d.host());

    let out = p.podman(&["pull", "docker.io/library/podimg:1.0"], PULL_TIMEOUT);
    out.assert_ok();
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
    let dd = Dockerd::start(&d.url());

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

/// `ctr images pull` through the hosts.toml mirror config in `hosts`; shows containerd's log on
/// failure.
fn ctr_pull(c: &Containerd, hosts: &str, reference: &str) {
    let args = [
        "images",
        "pull",
        "--hosts-dir",
        hosts,
        "--snapshotter",
        "native",
        reference,
    ];
    let out = c.ctr(&args, PULL_TIMEOUT);
    if !out.success() {
        eprintln!(
            "--- containerd log tail ---\n{}",
            crate::support::tail(&c.log(), 40)
        );
    }
    out.assert_ok();
}
