//! Bad days: a corrupt or truncated upstream answer, a client that hangs up mid-download, a
//! restart, and the cache's size cap.

use crate::support::dockside::{Config, Dockside, Upstream};
use crate::support::fault_proxy::{FaultProxy, Mode};
use crate::support::image::{Format, Image, random_bytes};
use crate::support::registry::{Auth, Registry, count};
use crate::support::{digest_of, http, skopeo};

/// A plain registry holding `data` as a blob of `library/x`, and a fault proxy in front of it in
/// `mode`, checked to really inject that fault. Returns the blob's digest too.
fn faulty_upstream(data: &[u8], mode: Mode) -> (Registry, FaultProxy, String) {
    let reg = Registry::start(Auth::None);
    let digest = reg.push_blob("library/x", data);
    let proxy = FaultProxy::start(&reg, mode);
    // The fault is real: straight through the proxy, the blob comes back wrong.
    let direct = http::get_outcome(&format!("{}/v2/library/x/blobs/{digest}", proxy.url()));
    match (mode, &direct) {
        (Mode::Corrupt, (200, Ok(body))) => {
            assert_eq!(body.len(), data.len(), "corrupt proxy: length");
            assert_ne!(digest_of(body), digest, "corrupt proxy: bytes not altered");
        }
        (Mode::CutAfter(_), (200, Err(_))) => {}
        _ => panic!(
            "fault proxy in {mode:?}: unexpected direct answer {} {:?}",
            direct.0,
            direct.1.as_ref().map(Vec::len)
        ),
    }
    (reg, proxy, digest)
}

fn proxied_hub(proxy: &FaultProxy) -> Upstream {
    Upstream {
        name: "docker.io".into(),
        url: proxy.url(),
        ..Default::default()
    }
}

/// Upstream GETs of blob `digest` that were answered in `mode`.
fn gets_in(proxy: &FaultProxy, digest: &str, mode: Mode) -> usize {
    proxy
        .blob_gets(digest)
        .iter()
        .filter(|r| r.mode == mode)
        .count()
}

/// The one outcome a client must never get: a clean, complete 200 whose bytes are not the blob.
fn assert_not_silently_wrong(what: &str, outcome: &(u16, Result<Vec<u8>, String>), digest: &str) {
    if let (200, Ok(body)) = outcome {
        assert_eq!(
            digest_of(body),
            digest,
            "{what}: a complete 200 with the wrong bytes ({} bytes)",
            body.len()
        );
    }
}

#[test]
fn corrupt_upstream_blob_is_never_served_or_cached() {
    let data = random_bytes(1000, 4 << 20);
    let (_reg, proxy, digest) = faulty_upstream(&data, Mode::Corrupt);
    let probes = gets_in(&proxy, &digest, Mode::Corrupt);
    let d = Dockside::start(&Config::new(vec![proxied_hub(&proxy)]));
    let url = format!("{}/v2/library/x/blobs/{digest}", d.url());

    for i in 0..2 {
        let got = http::get_outcome(&url);
        assert_not_silently_wrong(&format!("corrupt upstream, GET {i}"), &got, &digest);
        assert!(
            got.0 != 200 || got.1.is_err(),
            "corrupt upstream, GET {i}: want an error status or a cut body, got a full 200"
        );
    }
    let corrupt_gets = gets_in(&proxy, &digest, Mode::Corrupt) - probes;
    assert!(
        corrupt_gets >= 1,
        "dockside never fetched the blob from the corrupting upstream"
    );
    // Nothing bad was kept: once the upstream is honest the blob comes through right.
    assert_recovers(&proxy, &url, &digest);
    eprintln!(
        "corrupt upstream: {corrupt_gets} corrupt upstream GETs for 2 client GETs, then {} honest",
        gets_in(&proxy, &digest, Mode::Honest)
    );
}

#[test]
fn truncated_upstream_blob_is_an_error_or_resumed_never_short() {
    let data = random_bytes(1001, 4 << 20);
    let (_reg, proxy, digest) = faulty_upstream(&data, Mode::CutAfter(1 << 20));
    let probes = gets_in(&proxy, &digest, Mode::CutAfter(1 << 20));
    let d = Dockside::start(&Config::new(vec![proxied_hub(&proxy)]));
    let url = format!("{}/v2/library/x/blobs/{digest}", d.url());

    let got = http::get_outcome(&url);
    assert_not_silently_wrong("upstream cut at 1 MiB", &got, &digest);
    assert!(
        got.0 != 200 || got.1.is_err(),
        "upstream always cuts: the client must see the failure"
    );
    assert!(
        gets_in(&proxy, &digest, Mode::CutAfter(1 << 20)) > probes,
        "dockside never fetched the blob from the cutting upstream"
    );

    assert_recovers(&proxy, &url, &digest);
    let gets: Vec<(Mode, Option<String>)> = proxy
        .blob_gets(&digest)
        .into_iter()
        .skip(probes)
        .map(|r| (r.mode, r.range))
        .collect();
    eprintln!(
        "truncated upstream: first client got {} / {}; upstream GETs (mode, Range): {gets:?}",
        got.0,
        got.1
            .as_ref()
            .map(|b| format!("{} bytes", b.len()))
            .unwrap_or_else(|e| e.clone()),
    );
}

#[test]
fn client_hanging_up_mid_cold_blob_leaves_the_cache_right() {
    let reg = Registry::start(Auth::None);
    let size = 48 << 20;
    let data = random_bytes(1002, size);
    let digest = reg.push_blob("library/abort", &data);
    let d = Dockside::start(&Config::new(vec![Upstream::hub(&reg)]));
    let url = format!("{}/v2/library/abort/blobs/{digest}", d.url());

    // Read 1 MiB of the cold blob, then drop the connection.
    http::block_on(async {
        let mut resp = http::client().get(&url).send().await.expect("GET");
        assert_eq!(resp.status().as_u16(), 200);
        let mut n = 0;
        while n < 1 << 20 {
            n += resp.chunk().await.expect("chunk").expect("more body").len();
        }
    });
    let (status, body) = http::get_outcome(&url);
    assert_eq!(status, 200, "GET after another client hung up");
    let body = body.expect("body");
    assert_eq!(body.len(), size);
    assert_eq!(
        digest_of(&body),
        digest,
        "bytes after another client hung up"
    );
    // And once more from the cache.
    let (status, body) = http::get_outcome(&url);
    assert_eq!(status, 200);
    assert_eq!(digest_of(&body.expect("body")), digest);
    let gets = count(
        &reg.access_log(),
        "GET",
        &format!("/v2/library/abort/blobs/{digest}"),
    );
    assert!((1..=2).contains(&gets), "upstream GETs of the blob: {gets}");
}

#[test]
fn restart_serves_cached_content_with_the_upstream_gone() {
    let mut reg = Registry::start(Auth::None);
    let img = Image::generate(1003, &[200_000, 30_000], Format::Oci);
    skopeo::push(&reg, "library/persist", "v1", &img);
    let cfg = Config::new(vec![Upstream::hub(&reg)]);
    let d = Dockside::start(&cfg);
    let out = tempfile::tempdir().unwrap();
    skopeo::pull(
        &format!("{}/library/persist:v1", d.host()),
        &format!("oci:{}:x", out.path().display()),
        &[],
    )
    .assert_ok();
    let dir = d.into_dir();
    reg.kill();

    let d = Dockside::start_in(&cfg, dir);
    let r = http::get_manifest(&format!(
        "{}/v2/library/persist/manifests/{}",
        d.url(),
        img.manifest.digest
    ));
    assert_eq!(
        r.status,
        200,
        "manifest by digest after restart: {}",
        r.snippet()
    );
    assert_eq!(r.body, img.manifest.data);
    for b in img.blobs() {
        let r = http::get(&format!(
            "{}/v2/library/persist/blobs/{}",
            d.url(),
            b.digest
        ))
        .unwrap();
        assert_eq!(r.status, 200, "blob {} after restart", b.digest);
        assert_eq!(r.body, b.data, "blob {} after restart", b.digest);
    }
    // By digest, and by tag: tag answers are kept on disk too.
    let by_digest = format!("{}/library/persist@{}", d.host(), img.manifest.digest);
    let by_tag = format!("{}/library/persist:v1", d.host());
    for reference in [by_digest, by_tag] {
        crate::cache::pull_and_check(&d, reference.split_once('/').unwrap().1, &img);
    }
}

/// Bytes of cached objects and fills in flight in `d`'s cache directory, the small state files
/// (tag answers, saved order) aside, once the files of what it evicted are deleted: a thread
/// of its own unlinks them after the fill that made room has moved on.
pub(crate) fn object_bytes(d: &Dockside) -> u64 {
    crate::support::wait_for(
        "the evicted files to be deleted",
        std::time::Duration::from_secs(30),
        || (d.metric("dockside_cache_unlinks_pending")? == 0.0).then_some(()),
    );
    let cache = d.cache_dir();
    disk_usage(&cache.join("objects")) + disk_usage(&cache.join("tmp"))
}

/// Bytes of regular files under `dir`.
fn disk_usage(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                total += disk_usage(&e.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

#[test]
fn cache_stays_within_max_size_evicting_least_recently_used() {
    let reg = Registry::start(Auth::None);
    let blob = 1 << 20;
    let blobs: Vec<Vec<u8>> = (0..6).map(|i| random_bytes(1100 + i, blob)).collect();
    let digests: Vec<String> = blobs
        .iter()
        .map(|b| reg.push_blob("library/lru", b))
        .collect();
    let mut cfg = Config::new(vec![Upstream::hub(&reg)]);
    cfg.max_size = "4MiB".into();
    let d = Dockside::start(&cfg);
    let url = |dg: &str| format!("{}/v2/library/lru/blobs/{dg}", d.url());

    for (b, dg) in blobs.iter().zip(&digests) {
        let r = http::get(&url(dg)).unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body == *b, "blob {dg} bytes");
    }
    let cap = 4u64 << 20;
    let used = object_bytes(&d);
    assert!(
        used <= cap,
        "after 6 x 1 MiB blobs the cache holds {used} bytes on disk; max_size is {cap}"
    );

    // The newest blob is still cached, the oldest was evicted.
    let before = reg.access_log();
    let r = http::get(&url(&digests[5])).unwrap();
    assert_eq!(r.status, 200);
    let after = reg.access_log();
    assert_eq!(
        after.len(),
        before.len(),
        "most recently used blob was evicted"
    );
    let r = http::get(&url(&digests[0])).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body == blobs[0], "evicted blob refetched right");
    let lines = reg.access_log()[after.len()..].to_vec();
    assert_eq!(
        count(
            &lines,
            "GET",
            &format!("/v2/library/lru/blobs/{}", digests[0])
        ),
        1,
        "least recently used blob should have been evicted and refetched: {lines:?}"
    );
}

/// Switch the upstream to honest and check the blob now comes through whole and right: proof
/// that nothing from the faulty fetches was kept.
fn assert_recovers(proxy: &FaultProxy, url: &str, digest: &str) {
    proxy.set_mode(Mode::Honest);
    let (status, body) = http::get_outcome(url);
    assert_eq!(status, 200);
    assert_eq!(
        digest_of(&body.expect("body")),
        digest,
        "blob after the upstream recovered"
    );
}
