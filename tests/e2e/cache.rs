//! Caching behaviour seen from the upstream's access log: warm pulls, the thundering herd,
//! Range, tag revalidation and serving while the upstream is down.

use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use crate::support::dockside::{Config, Dockside, Upstream};
use crate::support::image::{Format, Image, random_bytes};
use crate::support::registry::{AccessLine, Auth, Registry, count};
use crate::support::{digest_of, http, serial, skopeo};

pub(crate) fn pull_and_check(d: &Dockside, reference: &str, img: &Image) -> Duration {
    let out = tempfile::tempdir().unwrap();
    let r = skopeo::pull(
        &format!("{}/{reference}", d.host()),
        &format!("oci:{}:x", out.path().display()),
        &[],
    );
    r.assert_ok();
    let top = skopeo::layout_top(out.path());
    skopeo::assert_layout_has_image(out.path(), &top, img, true);
    r.elapsed
}

pub(crate) fn new_lines(before: &[AccessLine], after: &[AccessLine]) -> Vec<AccessLine> {
    after[before.len()..].to_vec()
}

#[test]
fn warm_pull_sends_nothing_upstream() {
    let reg = Registry::start(Auth::None);
    let img = Image::generate(100, &[300_000, 100_000, 10_000], Format::Oci);
    skopeo::push(&reg, "library/warm", "v1", &img);
    let d = Dockside::start(&Config::new(vec![Upstream::hub(&reg)]));

    pull_and_check(&d, "library/warm:v1", &img);
    let cold = reg.access_log();
    for b in img.blobs() {
        assert_eq!(
            count(
                &cold,
                "GET",
                &format!("/v2/library/warm/blobs/{}", b.digest)
            ),
            1,
            "cold pull fetched {} once",
            b.digest
        );
    }

    // Again, within tag_ttl: by tag, into an OCI layout and a dir, and the manifest by digest.
    pull_and_check(&d, "library/warm:v1", &img);
    let out = tempfile::tempdir().unwrap();
    skopeo::pull(
        &format!("{}/library/warm:v1", d.host()),
        &format!("dir:{}", out.path().display()),
        &[],
    )
    .assert_ok();
    skopeo::assert_dir_has(out.path(), &img);
    let r = http::get_manifest(&format!(
        "{}/v2/library/warm/manifests/{}",
        d.url(),
        img.manifest.digest
    ));
    assert_eq!(r.status, 200);
    let warm = reg.access_log();
    assert_eq!(
        new_lines(&cold, &warm),
        vec![],
        "a warm pull within tag_ttl must not ask the upstream anything"
    );
}

#[test]
fn herd_of_20_cold_gets_makes_one_upstream_get() {
    // CPU-heavy (20 x 128 MiB through one 2-core machine): not alongside the other heavy tests.
    let _heavy = serial::heavy();
    let reg = Registry::start(Auth::None);
    let size = 128 << 20;
    let data = random_bytes(200, size);
    let digest = reg.push_blob("library/herd", &data);
    let d = Dockside::start(&Config::new(vec![Upstream::hub(&reg)]));
    let before = reg.access_log();

    let url = format!("{}/v2/library/herd/blobs/{digest}", d.url());
    let start = Instant::now();
    let results: Vec<(u16, String, usize, Duration)> = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let client = http::client();
            let tasks: Vec<_> = (0..20)
                .map(|_| {
                    let client = client.clone();
                    let url = url.clone();
                    tokio::spawn(async move {
                        let t = Instant::now();
                        let mut resp = client.get(&url).send().await.expect("herd GET");
                        let status = resp.status().as_u16();
                        let mut h = Sha256::new();
                        let mut n = 0;
                        while let Some(chunk) = resp.chunk().await.expect("herd body") {
                            n += chunk.len();
                            h.update(&chunk);
                        }
                        (
                            status,
                            format!("sha256:{}", hex::encode(h.finalize())),
                            n,
                            t.elapsed(),
                        )
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("herd task"));
            }
            out
        });
    let wall = start.elapsed();
    for (i, (status, got, n, _)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "herd client {i}");
        assert_eq!(*n, size, "herd client {i} length");
        assert_eq!(got, &digest, "herd client {i} content");
    }
    let after = reg.access_log();
    let lines = new_lines(&before, &after);
    let path = format!("/v2/library/herd/blobs/{digest}");
    let gets = count(&lines, "GET", &path);
    let slowest = results.iter().map(|r| r.3).max().unwrap();
    eprintln!(
        "MEASURE herd: 20 concurrent cold GETs of a {} MiB blob -> {gets} upstream GET(s) of it \
         ({} upstream requests in all); wall {:.2}s, slowest client {:.2}s, {:.0} MiB/s delivered",
        size >> 20,
        lines.len(),
        wall.as_secs_f64(),
        slowest.as_secs_f64(),
        (20 * size) as f64 / (1 << 20) as f64 / wall.as_secs_f64()
    );
    assert_eq!(gets, 1, "exactly one upstream GET of the blob: {lines:?}");

    // Now warm: a Range of it comes from the cache.
    let r = http::request("GET", &url, &[("Range", "bytes=100000000-100000999")], None).unwrap();
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &data[100_000_000..100_001_000]);
    assert_eq!(
        reg.access_log().len(),
        after.len(),
        "warm Range asked the upstream"
    );
}

#[test]
fn range_requests_on_cold_and_warm_blobs() {
    let reg = Registry::start(Auth::None);
    let size = 8 << 20;
    let data = random_bytes(300, size);
    let digest = reg.push_blob("library/ranged", &data);
    let d = Dockside::start(&Config::new(vec![Upstream::hub(&reg)]));
    let url = format!("{}/v2/library/ranged/blobs/{digest}", d.url());

    // Cold.
    let r = http::request("GET", &url, &[("Range", "bytes=1000-2999")], None).unwrap();
    assert_eq!(r.status, 206, "cold Range: {}", r.snippet());
    assert_eq!(r.body, &data[1000..3000], "cold Range bytes");
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 1000-2999/{size}"))
    );
    assert_eq!(r.header("content-length").as_deref(), Some("2000"));

    // Whole blob, then warm ranges; none of these may ask the upstream once it is cached.
    let full = http::get(&url).unwrap();
    assert_eq!(full.status, 200);
    assert_eq!(digest_of(&full.body), digest);
    let before = reg.access_log();
    for (range, want, cr) in [
        (
            "bytes=5000000-",
            &data[5_000_000..],
            format!("bytes 5000000-{}/{size}", size - 1),
        ),
        ("bytes=0-0", &data[..1], format!("bytes 0-0/{size}")),
        (
            "bytes=-100",
            &data[size - 100..],
            format!("bytes {}-{}/{size}", size - 100, size - 1),
        ),
    ] {
        let r = http::request("GET", &url, &[("Range", range)], None).unwrap();
        assert_eq!(r.status, 206, "warm {range}");
        assert_eq!(
            r.header("content-range"),
            Some(cr),
            "warm {range} Content-Range"
        );
        assert!(
            r.body == want,
            "warm {range}: wrong bytes ({} bytes)",
            r.body.len()
        );
    }
    // Unsatisfiable.
    let r = http::request("GET", &url, &[("Range", &format!("bytes={size}-"))], None).unwrap();
    assert_eq!(r.status, 416, "Range past the end");
    assert_eq!(
        reg.access_log().len(),
        before.len(),
        "warm Range requests asked the upstream"
    );
}

#[test]
fn tag_revalidation_after_ttl_uses_head_and_picks_up_retag() {
    let ttl = Duration::from_secs(2);
    let reg = Registry::start(Auth::None);
    let a = Image::generate(400, &[20_000], Format::Oci);
    let b = Image::generate(401, &[21_000], Format::Oci);
    skopeo::push(&reg, "library/moving", "latest", &a);
    // The same registry a second time, as `steady.example` with a tag TTL no run can outlast,
    // for the check that a tag within its TTL asks nothing upstream.
    let steady = Upstream {
        tag_ttl: Some("1h".into()),
        ..Upstream::new("steady.example", &reg)
    };
    let d = Dockside::start(&Config::new(vec![Upstream::hub(&reg), steady]).tag_ttl("2s"));
    let url = format!("{}/v2/library/moving/manifests/latest", d.url());
    let tag_path = "/v2/library/moving/manifests/latest";

    let r = http::get_manifest(&url);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("docker-content-digest"),
        Some(a.manifest.digest.clone())
    );
    let steady_url = format!(
        "{}/v2/steady.example/library/moving/manifests/latest",
        d.url()
    );
    assert_eq!(http::get_manifest(&steady_url).body, a.manifest.data);
    let l0 = reg.access_log();

    // Within the TTL: nothing upstream.
    let r = http::get_manifest(&steady_url);
    assert_eq!(r.body, a.manifest.data);
    let l1 = reg.access_log();
    assert_eq!(
        new_lines(&l0, &l1),
        vec![],
        "tag answered within tag_ttl asked upstream"
    );

    // Past the TTL (slept out in full): revalidated with HEAD, not re-downloaded.
    std::thread::sleep(ttl + Duration::from_millis(500));
    let r = http::get_manifest(&url);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, a.manifest.data);
    // (Polled, in case the revalidation runs after the answer.)
    let lines = crate::support::wait_for(
        "the revalidation HEAD in the access log",
        Duration::from_secs(10),
        || {
            let lines = new_lines(&l1, &reg.access_log());
            (count(&lines, "HEAD", tag_path) >= 1).then_some(lines)
        },
    );
    assert_eq!(
        count(&lines, "GET", tag_path),
        0,
        "unchanged tag re-downloaded: {lines:?}"
    );
    assert_eq!(
        count(
            &lines,
            "GET",
            &format!("/v2/library/moving/manifests/{}", a.manifest.digest)
        ),
        0,
        "unchanged manifest re-downloaded by digest: {lines:?}"
    );

    // Retag upstream: after the TTL the new manifest is served.
    skopeo::push(&reg, "library/moving", "latest", &b);
    let l3 = reg.access_log();
    std::thread::sleep(ttl + Duration::from_millis(500));
    let r = http::get_manifest(&url);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("docker-content-digest"),
        Some(b.manifest.digest.clone())
    );
    assert_eq!(
        r.body, b.manifest.data,
        "retagged manifest served after ttl"
    );
    let lines = new_lines(&l3, &reg.access_log());
    assert!(
        count(&lines, "GET", tag_path)
            + count(
                &lines,
                "GET",
                &format!("/v2/library/moving/manifests/{}", b.manifest.digest)
            )
            >= 1,
        "new manifest fetched from upstream: {lines:?}"
    );
    // And a whole pull of the new image works.
    pull_and_check(&d, "library/moving:latest", &b);
}

#[test]
fn upstream_down_serves_cached_and_fails_fast_for_uncached() {
    let mut reg = Registry::start(Auth::None);
    let img = Image::generate(500, &[80_000, 20_000], Format::Oci);
    let never = Image::generate(501, &[10_000], Format::Oci);
    skopeo::push(&reg, "library/sturdy", "v1", &img);
    skopeo::push(&reg, "library/never", "v1", &never);
    let d = Dockside::start(&Config::new(vec![Upstream::hub(&reg)]).tag_ttl("1s"));
    pull_and_check(&d, "library/sturdy:v1", &img);

    reg.kill();
    // Let the tag's TTL run out so the next answer needs a revalidation that cannot happen.
    std::thread::sleep(Duration::from_millis(1500));

    pull_and_check(&d, "library/sturdy:v1", &img);
    let h = http::request(
        "HEAD",
        &format!("{}/v2/library/sturdy/manifests/v1", d.url()),
        &[("Accept", http::MANIFEST_ACCEPT)],
        None,
    )
    .unwrap();
    assert_eq!(
        h.status, 200,
        "HEAD of a cached tag while the upstream is down"
    );
    assert_eq!(
        h.header("docker-content-digest"),
        Some(img.manifest.digest.clone())
    );

    // Never pulled: a clear error (the upstream is gone: refused connections, not a wait).
    let r = http::get_manifest(&format!("{}/v2/library/never/manifests/v1", d.url()));
    match r.status {
        502..=504 => {}
        404 => assert_eq!(
            r.error_code().as_deref(),
            Some("MANIFEST_UNKNOWN"),
            "{}",
            r.snippet()
        ),
        s => panic!(
            "uncached manifest, upstream down: want 502/503/504 or 404, got {s} {}",
            r.snippet()
        ),
    }
    let r = http::get(&format!(
        "{}/v2/library/never/blobs/{}",
        d.url(),
        never.layers[0].digest
    ))
    .unwrap();
    assert!(
        matches!(r.status, 404 | 502..=504),
        "uncached blob: {} {}",
        r.status,
        r.snippet()
    );

    let out = tempfile::tempdir().unwrap();
    let p = skopeo::pull(
        &format!("{}/library/never:v1", d.host()),
        &format!("oci:{}:x", out.path().display()),
        &[],
    );
    assert!(
        !p.success() && !p.timed_out(),
        "never-pulled image: must fail, not hang: {p:?}"
    );
}

#[test]
fn cold_blob_shared_by_full_and_range_clients_and_tag_herd() {
    let reg = Registry::start(Auth::None);
    let size = 32 << 20;
    let data = random_bytes(210, size);
    let digest = reg.push_blob("library/mixed", &data);
    let img = Image::generate(211, &[10_000], Format::Oci);
    skopeo::push(&reg, "library/mixed", "v1", &img);
    let d = Dockside::start(&Config::new(vec![Upstream::hub(&reg)]));
    let before = reg.access_log();

    // 10 whole-blob clients and 10 Range clients at once on the cold blob, and 20 clients of the
    // cold tag.
    let url = format!("{}/v2/library/mixed/blobs/{digest}", d.url());
    let tag_url = format!("{}/v2/library/mixed/manifests/v1", d.url());
    std::thread::scope(|s| {
        for i in 0..20usize {
            let (url, tag_url, data, img) = (&url, &tag_url, &data, &img);
            s.spawn(move || {
                if i % 2 == 0 {
                    let r = http::get(url).expect("GET");
                    assert_eq!(r.status, 200, "client {i}");
                    assert!(r.body == *data, "client {i}: whole blob bytes");
                } else {
                    let start = i * 1_500_000;
                    let end = start + 999_999;
                    let range = format!("bytes={start}-{end}");
                    let r = http::request("GET", url, &[("Range", &range)], None).expect("GET");
                    assert_eq!(r.status, 206, "client {i} {range}");
                    assert!(r.body == data[start..=end], "client {i}: {range} bytes");
                }
            });
            s.spawn(move || {
                let r = http::get_manifest(tag_url);
                assert_eq!(r.status, 200, "tag client {i}");
                assert_eq!(r.body, img.manifest.data, "tag client {i}");
            });
        }
    });
    let lines = new_lines(&before, &reg.access_log());
    let blob_gets = count(&lines, "GET", &format!("/v2/library/mixed/blobs/{digest}"));
    let tag_gets = count(&lines, "GET", "/v2/library/mixed/manifests/v1")
        + count(&lines, "HEAD", "/v2/library/mixed/manifests/v1");
    assert_eq!(
        blob_gets, 1,
        "one upstream GET for 20 cold blob clients (10 with Range): {lines:?}"
    );
    assert_eq!(
        tag_gets, 1,
        "one upstream request for 20 cold tag clients: {lines:?}"
    );
}

#[test]
fn hung_upstream_times_out_and_cached_tags_are_served_stale() {
    let mut reg = Registry::start(Auth::None);
    let img = Image::generate(510, &[60_000, 9_000], Format::Oci);
    let never = Image::generate(511, &[8_000], Format::Oci);
    skopeo::push(&reg, "library/hung", "v1", &img);
    skopeo::push(&reg, "library/hung-never", "v1", &never);
    let mut up = Upstream::hub(&reg);
    up.timeouts = Some("{ connect: 1s, first_byte: 2s, idle: 2s }".into());
    let d = Dockside::start(&Config::new(vec![up]).tag_ttl("1s"));
    pull_and_check(&d, "library/hung:v1", &img);

    // The upstream accepts connections and never answers.
    reg.freeze();
    std::thread::sleep(Duration::from_millis(1500)); // past tag_ttl

    // The revalidation meets the hung upstream, gives up on it and serves the cached tag.
    pull_and_check(&d, "library/hung:v1", &img);
    let stale = d.metric("dockside_stale_served_total{upstream=\"docker.io\"}");
    assert!(stale >= Some(1.0), "served stale: {stale:?}");

    // Uncached: the `first_byte` timeout ends the wait, with an error that says so.
    let r = http::get_manifest(&format!("{}/v2/library/hung-never/manifests/v1", d.url()));
    assert!(
        matches!(r.status, 502..=504),
        "uncached manifest, hung upstream: want 502/503/504, got {} {}",
        r.status,
        r.snippet()
    );
    assert!(r.text().contains("timed out"), "{}", r.snippet());
    reg.thaw();
}
