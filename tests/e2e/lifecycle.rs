//! The cache's life across restarts, size pressure, pins, offline mode and the admin API.

use crate::cache::{new_lines, pull_and_check};
use crate::support::dockside::{Config, Dockside, Upstream};
use crate::support::image::{Format, Image};
use crate::support::registry::{Auth, Registry, count};
use crate::support::{http, skopeo};
use std::time::Duration;

fn blob_gets(lines: &[crate::support::registry::AccessLine], repo: &str, img: &Image) -> usize {
    img.blobs()
        .iter()
        .map(|b| count(lines, "GET", &format!("/v2/{repo}/blobs/{}", b.digest)))
        .sum()
}

#[test]
fn restart_then_warm_pull_by_tag_sends_nothing_upstream() {
    let reg = Registry::start(Auth::None);
    let img = Image::generate(2001, &[250_000, 40_000], Format::Oci);
    skopeo::push(&reg, "library/again", "v1", &img);
    let cfg = Config::new(vec![Upstream::hub(&reg)]);
    let d = Dockside::start(&cfg);
    pull_and_check(&d, "library/again:v1", &img);
    let dir = d.into_dir();
    assert!(
        dir.path().join("cache/lru").is_file(),
        "the eviction order is saved at exit"
    );

    let d = Dockside::start_in(&cfg, dir);
    let before = reg.access_log();
    pull_and_check(&d, "library/again:v1", &img);
    assert_eq!(
        new_lines(&before, &reg.access_log()),
        vec![],
        "after a restart, a warm pull within tag_ttl must not ask the upstream anything"
    );
}

#[test]
fn pinned_image_survives_eviction_while_other_pulls_stay_correct() {
    let reg = Registry::start(Auth::None);
    let pinned = Image::generate(2101, &[700_000, 300_000], Format::Oci);
    let others: Vec<Image> = (0..3)
        .map(|i| Image::generate(2110 + i, &[900_000], Format::Oci))
        .collect();
    skopeo::push(&reg, "library/keep", "v1", &pinned);
    for (i, img) in others.iter().enumerate() {
        skopeo::push(&reg, &format!("library/churn{i}"), "v1", img);
    }
    let mut cfg = Config::new(vec![Upstream::hub(&reg)]);
    cfg.max_size = "2500KiB".into();
    cfg.pin = vec!["docker.io/library/keep:v1".into()];
    let d = Dockside::start(&cfg);

    pull_and_check(&d, "library/keep:v1", &pinned);
    for (i, img) in others.iter().enumerate() {
        pull_and_check(&d, &format!("library/churn{i}:v1"), img);
        let used = crate::robustness::object_bytes(&d);
        assert!(
            used <= 2500 * 1024,
            "cache holds {used} bytes after churn{i}"
        );
    }
    // The churn overflowed the cache (3 x 900 kB next to 1 MB pinned in 2.5 MB): the
    // unpinned first image was evicted, the pinned one was not.
    let before = reg.access_log();
    pull_and_check(&d, "library/keep:v1", &pinned);
    assert_eq!(
        blob_gets(
            &new_lines(&before, &reg.access_log()),
            "library/keep",
            &pinned
        ),
        0,
        "the pinned image's blobs were evicted"
    );
    let before = reg.access_log();
    pull_and_check(&d, "library/churn0:v1", &others[0]);
    assert!(
        blob_gets(
            &new_lines(&before, &reg.access_log()),
            "library/churn0",
            &others[0]
        ) > 0,
        "the least recently used unpinned image should have been evicted"
    );
    let metrics = http::get(&format!("{}/metrics", d.admin_url()))
        .unwrap()
        .text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("dockside_evictions_total ") && !l.ends_with(" 0")),
        "evictions are counted:\n{metrics}"
    );
}

#[test]
fn offline_mode_serves_the_cache_and_refuses_misses_without_asking_upstream() {
    let reg = Registry::start(Auth::None);
    let cached = Image::generate(2201, &[200_000], Format::Oci);
    let uncached = Image::generate(2202, &[10_000], Format::Oci);
    skopeo::push(&reg, "library/there", "v1", &cached);
    skopeo::push(&reg, "library/elsewhere", "v1", &uncached);
    let mut cfg = Config::new(vec![Upstream::hub(&reg)]);
    let d = Dockside::start(&cfg);
    pull_and_check(&d, "library/there:v1", &cached);
    let dir = d.into_dir();

    cfg.offline = true;
    let d = Dockside::start_in(&cfg, dir);
    let before = reg.access_log();
    pull_and_check(&d, "library/there:v1", &cached);
    // Misses are answered from what the cache knows, never by asking the upstream (below).
    let r = http::get_manifest(&format!("{}/v2/library/elsewhere/manifests/v1", d.url()));
    assert_eq!(r.status, 404, "{}", r.snippet());
    assert_eq!(r.error_code().as_deref(), Some("MANIFEST_UNKNOWN"));
    let digest = &uncached.layers[0].digest;
    let r = http::get(&format!("{}/v2/library/elsewhere/blobs/{digest}", d.url())).unwrap();
    assert_eq!(r.error_code().as_deref(), Some("BLOB_UNKNOWN"));
    assert_eq!(
        new_lines(&before, &reg.access_log()),
        vec![],
        "an offline upstream is never contacted"
    );
}

#[test]
fn admin_api_lists_and_purges_by_tag_and_digest() {
    let reg = Registry::start(Auth::None);
    let img = Image::generate(2301, &[100_000, 20_000], Format::Oci);
    skopeo::push(&reg, "library/admin", "v1", &img);
    let d = Dockside::start(&Config::new(vec![Upstream::hub(&reg)]));
    pull_and_check(&d, "library/admin:v1", &img);

    let listed = http::get(&format!("{}/api/repositories", d.admin_url())).unwrap();
    assert_eq!(listed.status, 200);
    let repos: serde_json::Value = serde_json::from_slice(&listed.body).unwrap();
    let repo = &repos[0];
    assert_eq!(repo["upstream"], "docker.io");
    assert_eq!(repo["repository"], "library/admin");
    assert_eq!(repo["tags"][0]["tag"], "v1");
    assert_eq!(repo["tags"][0]["digests"][0], img.manifest.digest.as_str());
    let expected: usize =
        img.blobs().iter().map(|b| b.data.len()).sum::<usize>() + img.manifest.data.len();
    assert_eq!(repo["bytes"], expected as u64);

    let api = format!("{}/api/cache", d.admin_url());
    let bad = http::request("DELETE", &format!("{api}?repository=x"), &[], None).unwrap();
    assert_eq!(bad.status, 400, "{}", bad.text());
    let gone = http::request(
        "DELETE",
        &format!("{api}?upstream=docker.io&repository=admin&tag=v1"),
        &[],
        None,
    )
    .unwrap();
    assert_eq!(gone.status, 200, "{}", gone.text());
    let report: serde_json::Value = serde_json::from_slice(&gone.body).unwrap();
    assert_eq!(report["tags"], 1);
    assert_eq!(report["objects"], img.blobs().len() as u64 + 1);
    assert!(
        !std::fs::read_dir(d.cache_dir().join("objects/sha256"))
            .unwrap()
            .any(|shard| {
                std::fs::read_dir(shard.unwrap().path())
                    .unwrap()
                    .next()
                    .is_some()
            }),
        "every object of the purged tag is deleted"
    );

    // Pulled again from upstream, then one blob purged by digest.
    let before = reg.access_log();
    pull_and_check(&d, "library/admin:v1", &img);
    assert_eq!(
        blob_gets(
            &new_lines(&before, &reg.access_log()),
            "library/admin",
            &img
        ),
        img.blobs().len()
    );
    let layer = &img.layers[0].digest;
    let one = http::request("DELETE", &format!("{api}?digest={layer}"), &[], None).unwrap();
    let report: serde_json::Value = serde_json::from_slice(&one.body).unwrap();
    assert_eq!(report["objects"], 1);
    let before = reg.access_log();
    pull_and_check(&d, "library/admin:v1", &img);
    let lines = new_lines(&before, &reg.access_log());
    assert_eq!(
        count(&lines, "GET", &format!("/v2/library/admin/blobs/{layer}")),
        1
    );
    assert_eq!(blob_gets(&lines, "library/admin", &img), 1);
}

/// The zero-downtime upgrade: a second `serve --upgrade` takes the listening sockets over on
/// SIGQUIT while a client keeps pulling over fresh connections; no request fails, the old
/// process drains and exits, and the new one serves the same cache and then holds its lock.
#[test]
fn upgrade_hands_the_listeners_over_without_a_failed_request() {
    let reg = Registry::start(Auth::None);
    let img = Image::generate(2051, &[400_000, 30_000], Format::Oci);
    skopeo::push(&reg, "library/upgrade", "v1", &img);
    let mut old = Dockside::start(&Config::new(vec![Upstream::hub(&reg)]));
    pull_and_check(&old, "library/upgrade:v1", &img);
    let blob = &img.blobs()[0];
    let url = format!("{}/v2/library/upgrade/blobs/{}", old.url(), blob.digest);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pulled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let puller = {
        let (stop, pulled) = (stop.clone(), pulled.clone());
        let (url, digest) = (url.clone(), blob.digest.clone());
        std::thread::spawn(move || {
            let mut failed = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match http::get_outcome(&url) {
                    (200, Ok(body)) if crate::support::digest_of(&body) == digest => {
                        pulled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    (status, outcome) => failed.push(format!("{status}: {:?}", outcome.err())),
                }
            }
            (pulled.load(std::sync::atomic::Ordering::Relaxed), failed)
        })
    };
    let mut new = old.start_upgrade();
    old.signal(libc::SIGQUIT);
    let status = old
        .wait_exit(Duration::from_secs(30))
        .expect("the old process exits after draining");
    assert!(status.success(), "old process: {status}");
    // Only the new process is left: the client goes on pulling from it.
    let at_exit = pulled.load(std::sync::atomic::Ordering::Relaxed);
    crate::support::wait_for(
        "pulls from the new process alone",
        Duration::from_secs(30),
        || (pulled.load(std::sync::atomic::Ordering::Relaxed) >= at_exit + 10).then_some(()),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = puller.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} requests failed: {failed:?}",
        failed.len()
    );
    assert!(ok > 20, "the client kept pulling throughout: {ok} pulls");

    let before = reg.access_log();
    pull_and_check(&new, "library/upgrade:v1", &img);
    assert_eq!(
        blob_gets(
            &new_lines(&before, &reg.access_log()),
            "library/upgrade",
            &img
        ),
        0,
        "the new process serves the cache the old one filled"
    );
    let lock = old.cache_dir().join("lock");
    let holder = format!("{} server", new.pid());
    crate::support::wait_for(
        "the new process to hold the cache lock",
        Duration::from_secs(10),
        || (std::fs::read_to_string(&lock).ok()? == holder).then_some(()),
    );
    let (status, in_time) = new.stop();
    assert!(in_time && status.success(), "new process: {status}");
}
