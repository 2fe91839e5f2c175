//! The air-gap tools on the real binary: `prefetch` against a real registry, then `serve` with
//! the upstream gone; `export` → `import` into a cache with no upstream; what skopeo reads of an
//! exported bundle; a tampered bundle; `verify` and `du`; the cache lock.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::support::dockside::{BIN, Config, Dockside, Upstream};
use crate::support::image::{Format, Image, Index};
use crate::support::registry::{AccessLine, Auth, Registry};
use crate::support::skopeo::{self, CmdOut};
use crate::support::{http, serial};

/// A cache directory and a config for it, used by the tools and then by `dockside serve`.
struct Site {
    dir: TempDir,
    cfg: Config,
}

impl Site {
    fn new(cfg: Config) -> Site {
        let dir = tempfile::Builder::new()
            .prefix("e2e-airgap-")
            .tempdir()
            .unwrap();
        Site { dir, cfg }
    }

    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// Runs `dockside <args> --config <this site's config>`.
    fn tool(&self, args: &[&str]) -> CmdOut {
        let path = self.dir.path().join("tool.yaml");
        // The tools never listen; the ports only make the config valid.
        std::fs::write(&path, self.cfg.yaml(1, 2, &self.cache())).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .arg("--config")
            .arg(&path)
            .env("NO_COLOR", "1");
        skopeo::run(cmd, Duration::from_secs(300))
    }

    fn serve(self, cfg: &Config) -> Dockside {
        Dockside::start_in(cfg, self.dir)
    }
}

/// An upstream named docker.io that nothing listens on (port 1, tcpmux, which no test and no
/// service here serves): a site with no upstream at all.
fn nowhere() -> Upstream {
    Upstream {
        name: "docker.io".into(),
        url: "http://127.0.0.1:1".into(),
        ..Default::default()
    }
}

fn blob_gets(lines: &[AccessLine]) -> Vec<&AccessLine> {
    lines
        .iter()
        .filter(|l| l.method == "GET" && l.uri.contains("/blobs/sha256:"))
        .collect()
}

/// skopeo pulls `reference` through `d` and the layout holds `img` byte for byte.
fn assert_pulls(d: &Dockside, reference: &str, img: &Image) {
    let out = tempfile::tempdir().unwrap();
    skopeo::pull(
        &format!("{}/{reference}", d.host()),
        &format!("oci:{}:x", out.path().display()),
        &["--override-arch", "amd64", "--override-os", "linux"],
    )
    .assert_ok();
    let top = skopeo::layout_top(out.path());
    skopeo::assert_layout_has_image(out.path(), &top, img, true);
}

/// Files under `dir`, recursively (none if it does not exist).
pub(crate) fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

struct Images {
    alpha: Image,
    multi: Index,
    delta: Image,
}

/// alpha (OCI), multi (OCI index, amd64 + arm64) and delta (Docker schema 2) on `reg`.
fn push_images(reg: &Registry) -> Images {
    let images = Images {
        alpha: Image::generate(700, &[200_000, 30_000], Format::Oci),
        multi: Index::generate(701, &[50_000], Format::Oci, &["amd64", "arm64"]),
        delta: Image::generate(702, &[80_000], Format::Docker),
    };
    skopeo::push(reg, "library/alpha", "v1", &images.alpha);
    skopeo::push(reg, "library/multi", "v1", &images.multi);
    skopeo::push(reg, "library/delta", "v2", &images.delta);
    images
}

#[test]
fn prefetched_images_are_served_by_tag_with_the_upstream_gone() {
    let mut reg = Registry::start(Auth::None);
    let imgs = push_images(&reg);
    let site = Site::new(Config::new(vec![Upstream::hub(&reg)]));
    let list = site.dir.path().join("images.txt");
    std::fs::write(
        &list,
        "# what the site needs\nalpha:v1\ndocker.io/library/multi:v1\nlibrary/delta:v2\n",
    )
    .unwrap();
    let list = list.display().to_string();

    let first = site.tool(&["prefetch", "--file", &list]);
    first.assert_ok();
    assert!(
        first.stdout.contains("prefetched 3 of 3 images"),
        "{}",
        first.stdout
    );
    let after_first = reg.access_log();
    let amd64 = imgs.multi.image("amd64");
    let fetched: Vec<&Image> = vec![&imgs.alpha, amd64, &imgs.delta];
    for img in &fetched {
        for b in img.blobs() {
            let n = after_first
                .iter()
                .filter(|l| l.method == "GET" && l.uri.ends_with(&b.digest))
                .count();
            assert_eq!(n, 1, "prefetch fetched {} once", b.digest);
        }
    }
    for b in imgs.multi.image("arm64").blobs() {
        assert!(
            !after_first
                .iter()
                .any(|l| l.method == "GET" && l.uri.ends_with(&b.digest)),
            "linux/arm64 is not prefetched by default, yet {} was asked",
            b.digest
        );
    }

    // Again: everything is cached, so no blob is asked for.
    let second = site.tool(&["prefetch", "--file", &list]);
    second.assert_ok();
    let after_second = reg.access_log();
    assert_eq!(
        blob_gets(&after_second[after_first.len()..]),
        Vec::<&AccessLine>::new(),
        "a second prefetch must fetch no blob"
    );
    let blobs: usize = fetched.iter().map(|i| i.blobs().len()).sum();
    assert!(
        second
            .stdout
            .contains(&format!("0 blobs fetched (0 B), {blobs} already cached")),
        "{}",
        second.stdout
    );

    reg.kill();
    let offline = Config {
        offline: true,
        ..Config::new(vec![Upstream::hub(&reg)])
    };
    let d = site.serve(&offline);
    assert_pulls(&d, "library/alpha:v1", &imgs.alpha);
    assert_pulls(&d, "library/multi:v1", amd64);
    let out = tempfile::tempdir().unwrap();
    skopeo::pull(
        &format!("{}/library/delta:v2", d.host()),
        &format!("dir:{}", out.path().display()),
        &[],
    )
    .assert_ok();
    skopeo::assert_dir_has(out.path(), &imgs.delta);

    // Not prefetched: a quick, clear MANIFEST_UNKNOWN, from skopeo's side too.
    let r = http::get_manifest(&format!("{}/v2/library/never/manifests/v1", d.url()));
    assert_eq!(
        (r.status, r.error_code().as_deref()),
        (404, Some("MANIFEST_UNKNOWN"))
    );
    let miss = skopeo::pull(
        &format!("{}/library/never:v1", d.host()),
        &format!("oci:{}:y", out.path().display()),
        &[],
    );
    assert!(!miss.success(), "pulling a non-prefetched image succeeded");
    assert!(!miss.timed_out(), "the miss must fail, not hang");
    assert!(miss.stderr.contains("manifest unknown"), "{}", miss.stderr);
}

#[test]
fn prefetch_names_each_image_that_failed_and_keeps_the_rest() {
    let reg = Registry::start(Auth::None);
    let alpha = Image::generate(710, &[40_000], Format::Oci);
    skopeo::push(&reg, "library/alpha", "v1", &alpha);
    let site = Site::new(Config::new(vec![Upstream::hub(&reg)]));
    let r = site.tool(&["prefetch", "alpha:v1", "missing:v1", "ghcr.io/x/y:1"]);
    assert!(!r.success(), "prefetch with missing images exited 0");
    assert!(
        r.stderr
            .contains("2 of 3 images failed: missing:v1, ghcr.io/x/y:1"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.contains("FAILED missing:v1"), "{}", r.stdout);
    assert!(
        r.stdout.contains("prefetched 1 of 3 images"),
        "{}",
        r.stdout
    );
    for b in alpha.blobs() {
        let path = site
            .cache()
            .join("objects/sha256")
            .join(&b.hex()[..2])
            .join(b.hex());
        assert!(path.exists(), "{} not in the cache", b.digest);
    }
}

/// GETs upstream of each of `img`'s blobs in `lines`.
fn blob_fetches(lines: &[AccessLine], img: &Image) -> Vec<usize> {
    img.blobs()
        .iter()
        .map(|b| {
            lines
                .iter()
                .filter(|l| l.method == "GET" && l.uri.ends_with(&b.digest))
                .count()
        })
        .collect()
}

#[test]
fn platform_choice_picks_the_index_entries() {
    let reg = Registry::start(Auth::None);
    let multi = Index::generate(711, &[30_000], Format::Oci, &["amd64", "arm64"]);
    skopeo::push(&reg, "library/multi", "v1", &multi);
    let (amd64, arm64) = (multi.image("amd64"), multi.image("arm64"));
    let site = Site::new(Config::new(vec![Upstream::hub(&reg)]));

    let r = site.tool(&["prefetch", "--platform", "linux/s390x", "multi:v1"]);
    assert!(!r.success(), "a platform the index lacks was prefetched");
    assert!(
        r.stdout
            .contains("the index has no manifest for linux/s390x"),
        "{}",
        r.stdout
    );

    site.tool(&["prefetch", "--platform", "linux/arm64", "multi:v1"])
        .assert_ok();
    let log = reg.access_log();
    assert_eq!(blob_fetches(&log, arm64), vec![1, 1]);
    assert_eq!(blob_fetches(&log, amd64), vec![0, 0]);

    site.tool(&["prefetch", "--all-platforms", "multi:v1"])
        .assert_ok();
    let log = reg.access_log();
    assert_eq!(blob_fetches(&log, arm64), vec![1, 1], "arm64 fetched again");
    assert_eq!(blob_fetches(&log, amd64), vec![1, 1]);
}

#[test]
fn export_then_import_serves_pulls_where_there_is_no_upstream() {
    let mut reg = Registry::start(Auth::None);
    let imgs = push_images(&reg);
    let connected = Site::new(Config::new(vec![Upstream::hub(&reg)]));
    connected
        .tool(&["prefetch", "alpha:v1", "multi:v1"])
        .assert_ok();
    let bundle = connected.dir.path().join("bundle.tar");
    let bundle_s = bundle.display().to_string();

    let r = connected.tool(&["export", "--output", &bundle_s, "delta:v2"]);
    assert!(
        !r.success(),
        "exporting an image that is not cached succeeded"
    );
    assert!(
        r.stderr.contains("docker.io/library/delta:v2"),
        "{}",
        r.stderr
    );
    assert!(!bundle.exists(), "a failed export left a file");

    connected
        .tool(&[
            "export",
            "--output",
            &bundle_s,
            "alpha:v1",
            "docker.io/library/multi:v1",
        ])
        .assert_ok();
    reg.kill();

    // Other tools read the bundle: skopeo picks an image by its ref name.
    let out = tempfile::tempdir().unwrap();
    skopeo::skopeo(
        &[
            "copy",
            &format!("oci-archive:{bundle_s}:docker.io/library/alpha:v1"),
            &format!("oci:{}:x", out.path().display()),
        ],
        Duration::from_secs(120),
    )
    .assert_ok();
    let top = skopeo::layout_top(out.path());
    skopeo::assert_layout_has_image(out.path(), &top, &imgs.alpha, true);

    let offline = Config {
        offline: true,
        ..Config::new(vec![nowhere()])
    };
    let island = Site::new(offline.clone());
    let r = island.tool(&["import", &bundle_s]);
    r.assert_ok();
    assert!(
        r.stdout.contains("imported 2 images, 2 tags"),
        "{}",
        r.stdout
    );
    let again = island.tool(&["import", &bundle_s]);
    again.assert_ok();
    assert!(again.stdout.contains("0 objects added"), "{}", again.stdout);

    let d = island.serve(&offline);
    assert_pulls(&d, "library/alpha:v1", &imgs.alpha);
    assert_pulls(&d, "library/multi:v1", imgs.multi.image("amd64"));
}

/// Flips one byte in the middle of `needle`'s occurrence in the file (found by 64 bytes from
/// its middle: the starts of two gzip'd layers can be alike).
fn flip_byte_of(file: &Path, needle: &[u8]) {
    let mut data = std::fs::read(file).unwrap();
    let mid = needle.len() / 2;
    let window = &needle[mid..(mid + 64).min(needle.len())];
    let at = data
        .windows(window.len())
        .position(|w| w == window)
        .expect("the blob is in the file");
    data[at] ^= 0xff;
    std::fs::write(file, data).unwrap();
}

#[test]
fn a_tampered_bundle_is_refused_and_leaves_nothing_behind() {
    let reg = Registry::start(Auth::None);
    let alpha = Image::generate(720, &[150_000, 20_000], Format::Oci);
    skopeo::push(&reg, "library/alpha", "v1", &alpha);
    let connected = Site::new(Config::new(vec![Upstream::hub(&reg)]));
    connected.tool(&["prefetch", "alpha:v1"]).assert_ok();
    let bundle = connected.dir.path().join("bundle.tar");
    let bundle_s = bundle.display().to_string();
    connected
        .tool(&["export", "--output", &bundle_s, "alpha:v1"])
        .assert_ok();
    // The bundle holds objects in digest order: with the later layer spoiled, the other one
    // is staged (and must still not be committed) before the bad one is met.
    let bad = alpha
        .layers
        .iter()
        .max_by_key(|l| &l.digest)
        .unwrap()
        .clone();
    flip_byte_of(&bundle, &bad.data);

    let island = Site::new(Config {
        offline: true,
        ..Config::new(vec![nowhere()])
    });
    let r = island.tool(&["import", &bundle_s]);
    assert!(!r.success(), "a tampered bundle was imported");
    assert!(
        r.stderr
            .contains(&format!("the bundle's blob {} is corrupt", bad.digest))
            && r.stderr.contains("nothing imported"),
        "{}",
        r.stderr
    );
    let cache = island.cache();
    assert_eq!(files_under(&cache.join("objects")), Vec::<PathBuf>::new());
    assert_eq!(files_under(&cache.join("tmp")), Vec::<PathBuf>::new());
    assert_eq!(files_under(&cache.join("tags")), Vec::<PathBuf>::new());
}

#[test]
fn verify_quarantines_a_corrupted_object_and_du_counts_shared_blobs_once() {
    let reg = Registry::start(Auth::None);
    let img = Image::generate(730, &[100_000, 10_000], Format::Oci);
    // One image under two names: every object is shared.
    skopeo::push(&reg, "library/one", "v1", &img);
    skopeo::push(&reg, "library/two", "v1", &img);
    let site = Site::new(Config::new(vec![Upstream::hub(&reg)]));
    site.tool(&["prefetch", "one:v1", "two:v1"]).assert_ok();

    let objects = img.blobs().len() + 1;
    let bytes: usize =
        img.blobs().iter().map(|b| b.data.len()).sum::<usize>() + img.manifest.data.len();
    let du = site.tool(&["du"]);
    du.assert_ok();
    let row = |label: &str| -> Vec<String> {
        let line = du
            .stdout
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label} line in:\n{}", du.stdout));
        line[48..].split_whitespace().map(str::to_string).collect()
    };
    // Columns after the label: [tags] objects size.
    assert_eq!(
        row("library/one")[..2],
        ["1".to_string(), objects.to_string()]
    );
    assert_eq!(
        row("library/two")[..2],
        ["1".to_string(), objects.to_string()]
    );
    assert_eq!(row("docker.io")[0], objects.to_string(), "{}", du.stdout);
    assert_eq!(row("unreferenced")[0], "0", "{}", du.stdout);
    assert_eq!(row("total")[0], objects.to_string(), "{}", du.stdout);
    let kib = format!("{:.1} KiB", bytes as f64 / 1024.0);
    assert!(
        row("total").join(" ").ends_with(&kib),
        "{} vs {kib}",
        du.stdout
    );

    site.tool(&["verify"]).assert_ok();
    let victim = &img.layers[0];
    let path = site
        .cache()
        .join("objects/sha256")
        .join(&victim.hex()[..2])
        .join(victim.hex());
    flip_byte_of(&path, &victim.data);
    let r = site.tool(&["verify"]);
    assert!(!r.success(), "verify found nothing wrong");
    assert!(
        r.stdout.contains(&format!("QUARANTINED {}", victim.digest)),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(&format!("verified {objects} objects")),
        "{}",
        r.stdout
    );
    assert!(!path.exists(), "the bad object is still in objects/");
    assert!(site.cache().join("quarantine").join(victim.hex()).exists());
    let clean = site.tool(&["verify"]);
    clean.assert_ok();
    assert!(clean.stdout.contains(": 0 bad"), "{}", clean.stdout);

    // The server refetches what was quarantined, and a tool cannot open its cache meanwhile.
    let cfg = site.cfg.clone();
    let d = site.serve(&cfg);
    let r = Command::new(BIN)
        .args(["du", "--config"])
        .arg(d.cache_dir().parent().unwrap().join("tool.yaml"))
        .output()
        .unwrap();
    assert!(!r.status.success(), "du ran beside a server");
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        stderr.contains("a dockside server (pid ")
            && stderr.contains("stop it or use the admin API"),
        "{stderr}"
    );
    assert_pulls(&d, "library/one:v1", &img);
    let gets = reg
        .access_log()
        .iter()
        .filter(|l| l.method == "GET" && l.uri.ends_with(&victim.digest))
        .count();
    assert_eq!(gets, 2, "the quarantined layer was fetched again, once");
}

/// Wall times of the tools on a ~160 MiB image, printed as `MEASURE` lines (run with
/// `--nocapture`); only correctness is asserted.
#[test]
fn measure_prefetch_export_import_verify() {
    let _heavy = serial::heavy();
    let reg = Registry::start(Auth::None);
    let img = Image::generate(740, &[96 << 20, 48 << 20, 16 << 20], Format::Oci);
    skopeo::push(&reg, "library/big", "v1", &img);
    let mb = img.layer_bytes() as f64 / (1 << 20) as f64;
    let connected = Site::new(Config::new(vec![Upstream::hub(&reg)]));
    let timed = |site: &Site, args: &[&str]| {
        let r = site.tool(args);
        r.assert_ok();
        r.elapsed.as_secs_f64()
    };
    let cold = timed(&connected, &["prefetch", "big:v1"]);
    let warm = timed(&connected, &["prefetch", "big:v1"]);
    let bundle = connected.dir.path().join("big.tar").display().to_string();
    let export = timed(&connected, &["export", "--output", &bundle, "big:v1"]);
    let island = Site::new(Config {
        offline: true,
        ..Config::new(vec![nowhere()])
    });
    let import = timed(&island, &["import", &bundle]);
    let verify = timed(&island, &["verify"]);
    let rate = |s: f64| format!("{s:.2}s ({:.0} MiB/s)", mb / s);
    eprintln!(
        "MEASURE airgap {mb:.0} MiB image: prefetch cold {}, again {warm:.2}s; export {}; \
         import {}; verify {}",
        rate(cold),
        rate(export),
        rate(import),
        rate(verify)
    );
    let d = island.serve(&Config {
        offline: true,
        ..Config::new(vec![nowhere()])
    });
    assert_pulls(&d, "library/big:v1", &img);
}
