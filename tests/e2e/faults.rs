//! Upstream faults the mirror rides out (5xx, resets, a body that breaks once, 429) and crashes
//! it survives, each through the real binary and Debian's docker-registry behind the fault proxy.

use std::time::Duration;

use crate::cache::pull_and_check;
use crate::support::dockside::{Config, Dockside, Upstream};
use crate::support::fault_proxy::{FaultProxy, Mode};
use crate::support::image::{Format, Image, random_bytes};
use crate::support::registry::{Auth, Registry};
use crate::support::{digest_of, http, skopeo};

fn through(proxy: &FaultProxy) -> Config {
    Config::new(vec![Upstream {
        name: "docker.io".into(),
        url: proxy.url(),
        timeouts: Some("{ connect: 2s, first_byte: 5s, idle: 5s }".into()),
        ..Default::default()
    }])
}

#[test]
fn flaky_5xx_and_resets_are_retried_and_the_pull_succeeds() {
    let reg = Registry::start(Auth::None);
    let img = Image::generate(3001, &[300_000, 50_000], Format::Oci);
    skopeo::push(&reg, "library/flaky", "v1", &img);
    let proxy = FaultProxy::start(&reg, Mode::Honest);
    let d = Dockside::start(&through(&proxy));

    proxy.set_mode(Mode::Fail {
        status: 503,
        times: 2,
        retry_after: None,
    });
    pull_and_check(&d, "library/flaky:v1", &img);
    let img2 = Image::generate(3002, &[200_000], Format::Oci);
    skopeo::push(&reg, "library/flaky", "v2", &img2);
    proxy.set_mode(Mode::Reset { times: 2 });
    pull_and_check(&d, "library/flaky:v2", &img2);

    let retries = d
        .metric("dockside_upstream_retries_total{upstream=\"docker.io\"}")
        .unwrap_or(0.0);
    assert!(
        retries >= 4.0,
        "two 503s and two resets were retried: {retries}"
    );
}

#[test]
fn a_failing_first_url_is_skipped_by_its_circuit_breaker_and_used_again_once_it_recovers() {
    let reg = Registry::start(Auth::None);
    let mirror = FaultProxy::start(&reg, Mode::Honest);
    let cfg = Config::new(vec![Upstream {
        more_urls: vec![reg.url()],
        extra_yaml: "    retries: 0\n    circuit: { failures: 1, cooldown: 6s }\n".into(),
        ..through(&mirror).upstreams[0].clone()
    }]);
    let d = Dockside::start(&cfg);
    let mirror_up = format!(
        "dockside_upstream_url_up{{upstream=\"docker.io\",url=\"{}\"}}",
        mirror.url().trim_end_matches('/')
    );
    assert_eq!(d.metric(&mirror_up), Some(1.0));

    // The regional mirror answers 503 to everything: the first request (the manifest, before
    // skopeo fetches blobs in parallel) moves on to the origin, and the mirror is left alone.
    mirror.set_mode(Mode::Fail {
        status: 503,
        times: usize::MAX,
        retry_after: None,
    });
    let img = Image::generate(3051, &[200_000, 30_000], Format::Oci);
    skopeo::push(&reg, "library/failover", "v1", &img);
    pull_and_check(&d, "library/failover:v1", &img);
    assert_eq!(d.metric(&mirror_up), Some(0.0), "{}", d.log());
    let failovers = d
        .metric("dockside_upstream_failovers_total{upstream=\"docker.io\"}")
        .unwrap_or(0.0);
    assert!(failovers >= 1.0, "failovers: {failovers}");
    assert_eq!(mirror.requests().len(), 1, "skipped after its failure");

    let img2 = Image::generate(3052, &[100_000], Format::Oci);
    skopeo::push(&reg, "library/failover", "v2", &img2);
    pull_and_check(&d, "library/failover:v2", &img2);
    assert_eq!(
        mirror.requests().len(),
        1,
        "still skipped during the cooldown"
    );

    // Recovered: after the cooldown one probe reaches it, succeeds, and traffic returns.
    mirror.set_mode(Mode::Honest);
    // The 6 s cooldown, slept out in full (it began at the failure, before the pull of v2).
    std::thread::sleep(Duration::from_millis(6500));
    let img3 = Image::generate(3053, &[100_000], Format::Oci);
    skopeo::push(&reg, "library/failover", "v3", &img3);
    pull_and_check(&d, "library/failover:v3", &img3);
    assert_eq!(d.metric(&mirror_up), Some(1.0));
    let honest = mirror
        .requests()
        .iter()
        .filter(|r| r.mode == Mode::Honest)
        .count();
    assert!(
        honest >= 3,
        "the manifest and blobs of v3 came through the mirror: {:?}",
        mirror.requests()
    );
}

/// Fetches a 4 MiB blob through a proxy in `mode` (a fault on the first blob GET only) and
/// checks that dockside resumed it with one Range GET from where the body stopped, served it
/// whole and kept it. Returns the line dockside logged when it resumed.
fn resumed_once(seed: u64, mode: Mode, timeouts: &str) -> String {
    let reg = Registry::start(Auth::None);
    let data = random_bytes(seed, 4 << 20);
    let digest = reg.push_blob("library/cut", &data);
    let proxy = FaultProxy::start(&reg, mode);
    let mut cfg = through(&proxy);
    cfg.upstreams[0].timeouts = Some(timeouts.into());
    let d = Dockside::start(&cfg);

    let r = http::get(&format!("{}/v2/library/cut/blobs/{digest}", d.url())).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        digest_of(&r.body),
        digest,
        "the client got the whole, right blob"
    );
    let gets = proxy.blob_gets(&digest);
    assert_eq!(gets.len(), 2, "{gets:?}");
    let range = gets[1]
        .range
        .as_deref()
        .expect("the second GET asks for a range");
    let from: u64 = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .expect("bytes=N-");
    assert!(from > 0 && from <= 1 << 20, "resumed from {from}");
    // Kept, verified whole: served again without asking upstream.
    let r = http::get(&format!("{}/v2/library/cut/blobs/{digest}", d.url())).unwrap();
    assert_eq!(digest_of(&r.body), digest);
    assert_eq!(proxy.blob_gets(&digest).len(), 2);
    let log = d.log();
    let resumed = log.lines().filter(|l| l.contains("resuming with Range"));
    let resumed: Vec<&str> = resumed.collect();
    assert_eq!(resumed.len(), 1, "{log}");
    resumed[0].to_string()
}

#[test]
fn a_blob_whose_connection_breaks_once_is_resumed_with_range() {
    resumed_once(
        3101,
        Mode::CutOnce(1 << 20),
        "{ connect: 2s, first_byte: 5s, idle: 5s }",
    );
}

#[test]
fn a_blob_that_stalls_mid_body_is_resumed_once_the_idle_timeout_passes() {
    let resumed = resumed_once(
        3102,
        Mode::StallOnce(1 << 20),
        "{ connect: 2s, first_byte: 5s, idle: 2s }",
    );
    // The stalled connection is given up by `idle`, not by the proxy's patience (120 s, which
    // is also the test client's): dockside's own timeout ended it.
    assert!(resumed.contains("timed out"), "{resumed}");
}

#[test]
fn rate_limited_upstream_serves_the_cache_and_is_left_alone_while_retry_after_runs() {
    let reg = Registry::start(Auth::None);
    let img = Image::generate(3201, &[100_000], Format::Oci);
    skopeo::push(&reg, "library/busy", "v1", &img);
    let data = random_bytes(3202, 50_000);
    let uncached = reg.push_blob("library/busy", &data);
    let proxy = FaultProxy::start(&reg, Mode::Honest);
    let d = Dockside::start(&through(&proxy).tag_ttl("1s"));
    pull_and_check(&d, "library/busy:v1", &img);
    std::thread::sleep(Duration::from_millis(1100)); // the tag is stale now

    proxy.set_mode(Mode::Fail {
        status: 429,
        times: 1000,
        retry_after: Some(60),
    });
    // The tag is revalidated, meets the 429 and is served stale; the pull works.
    pull_and_check(&d, "library/busy:v1", &img);
    let seen = proxy.requests().len();
    // Not cached: a clear 429 passed on, and dockside holds back instead of asking again.
    for _ in 0..3 {
        let r = http::get(&format!("{}/v2/library/busy/blobs/{uncached}", d.url())).unwrap();
        assert_eq!(r.status, 429, "{}", r.snippet());
        assert_eq!(r.error_code().as_deref(), Some("TOOMANYREQUESTS"));
        let wait: u64 = r
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!((1..=60).contains(&wait), "Retry-After {wait}");
    }
    assert_eq!(
        proxy.requests().len(),
        seen,
        "requests sent upstream while its Retry-After runs"
    );
    let metrics = http::get(&format!("{}/metrics", d.admin_url()))
        .unwrap()
        .text();
    assert!(
        metrics
            .contains("dockside_upstream_throttled_total{sent=\"false\",upstream=\"docker.io\"} 3"),
        "{metrics}"
    );
}

/// Files under `objects/` that do not hash to their name, and files left in `tmp/`.
fn damage(cache: &std::path::Path) -> (Vec<String>, usize) {
    let mut wrong = Vec::new();
    if let Ok(shards) = std::fs::read_dir(cache.join("objects/sha256")) {
        for shard in shards.flatten() {
            for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let data = std::fs::read(f.path()).unwrap();
                if digest_of(&data) != format!("sha256:{name}") {
                    wrong.push(name);
                }
            }
        }
    }
    let tmp = std::fs::read_dir(cache.join("tmp")).map_or(0, |d| d.count());
    (wrong, tmp)
}

#[test]
fn kill_9_during_fills_never_leaves_a_corrupt_object_or_temp_file() {
    let reg = Registry::start(Auth::None);
    let blobs: Vec<Vec<u8>> = (0..6).map(|i| random_bytes(3300 + i, 8 << 20)).collect();
    let digests: Vec<String> = blobs
        .iter()
        .map(|b| reg.push_blob("library/crash", b))
        .collect();
    let cfg = Config::new(vec![Upstream::hub(&reg)]);
    let mut dir = tempfile::Builder::new()
        .prefix("e2e-crash-")
        .tempdir()
        .unwrap();
    for round in 0..8u64 {
        let d = Dockside::start_in(&cfg, dir);
        // After a crash, start-up found no temp file and only whole objects.
        let (wrong, tmp) = damage(&d.cache_dir());
        assert!(
            wrong.is_empty(),
            "round {round}: objects not matching their names: {wrong:?}"
        );
        assert_eq!(tmp, 0, "round {round}: temp files survived the restart");
        let cache = d.cache_dir();
        let (cached_before, _) = bytes_in(&cache);
        let clients: Vec<_> = digests
            .iter()
            .map(|dg| {
                let url = format!("{}/v2/library/crash/blobs/{dg}", d.url());
                std::thread::spawn(move || http::get_outcome(&url))
            })
            .collect();
        // Somewhere in the middle of the fills, a further point each round: once this round's
        // fills have written (2 round + 1) / 16 of what they have to write.
        let to_fill = (blobs.len() as u64 * (8 << 20)).saturating_sub(cached_before);
        let point = to_fill * (2 * round + 1) / 16;
        crate::support::wait_for(
            "the fills to reach the crash point",
            Duration::from_secs(60),
            || {
                let (cached, filling) = bytes_in(&cache);
                (cached.saturating_sub(cached_before) + filling >= point).then_some(())
            },
        );
        dir = d.crash();
        for c in clients {
            let _ = c.join();
        }
        let (wrong, _) = damage(&dir.path().join("cache"));
        assert!(
            wrong.is_empty(),
            "round {round}: a killed fill left a wrong object: {wrong:?}"
        );
    }
    // Finally everything is served right, from the cache or fetched again.
    let d = Dockside::start_in(&cfg, dir);
    for (b, dg) in blobs.iter().zip(&digests) {
        let r = http::get(&format!("{}/v2/library/crash/blobs/{dg}", d.url())).unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body == *b, "blob {dg} after the crashes");
    }
}

/// Bytes of the files under `objects/` and under `tmp/` (a fill in flight writes there).
fn bytes_in(cache: &std::path::Path) -> (u64, u64) {
    let size = |dir: std::path::PathBuf| -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let files = entries.flatten().filter_map(|e| e.metadata().ok());
        files.filter(|m| m.is_file()).map(|m| m.len()).sum()
    };
    let shards = std::fs::read_dir(cache.join("objects/sha256"))
        .into_iter()
        .flatten();
    let cached = shards.flatten().map(|s| size(s.path())).sum();
    (cached, size(cache.join("tmp")))
}
