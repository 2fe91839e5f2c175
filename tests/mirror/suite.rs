// The in-process suite, included twice by tests/mirror.rs: once over the disk store, once
// over the memory store (`STORES`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use dockside::config::Config;
use dockside::listeners::Listeners;
use dockside::server::{ChannelShutdown, Start, run};
use crate::fake::{Auth, FakeUpstream, Fault, OCI_MANIFEST, digest_of};
use dockside::store::{MemoryStore, Storage};
use dockside::tags::{MemoryTagStore, TagCache};
use reqwest::StatusCode;

struct Mirror {
    base: String,
    admin: String,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
    dir: Option<tempfile::TempDir>,
}

impl Drop for Mirror {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // A fast shutdown drops pingora's runtime, but a fill's last blocking write or rename
        // may still be running; removing the cache under it would fail, so retry briefly.
        if let Some(dir) = self.dir.take() {
            let path = dir.keep();
            for _ in 0..50 {
                match std::fs::remove_dir_all(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => break,
                }
            }
        }
    }
}

/// Start dockside with the given `upstreams:` YAML list and tag TTL.
async fn start_mirror(upstreams: &str, tag_ttl: &str) -> Mirror {
    start_mirror_sized(upstreams, tag_ttl, "1GiB").await
}

/// Binds the listeners first and hands them to `run`: requests made as soon as this returns
/// wait in the sockets' backlog until the server accepts them.
async fn start_mirror_sized(upstreams: &str, tag_ttl: &str, max_size: &str) -> Mirror {
    start_mirror_with(upstreams, tag_ttl, max_size, &|_| String::new()).await
}

/// Like [`start_mirror_sized`], with top-level YAML `extra(listen address)` appended.
async fn start_mirror_with(
    upstreams: &str,
    tag_ttl: &str,
    max_size: &str,
    extra: &dyn Fn(&str) -> String,
) -> Mirror {
    let dir = tempfile::tempdir().unwrap();
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (registry, admin) = (bind(), bind());
    let (addr, admin_addr) = (registry.local_addr().unwrap(), admin.local_addr().unwrap());
    let yaml = format!(
        "listen: \"{addr}\"\nadmin_listen: \"{admin_addr}\"\ngrace_period: 0s\nthreads: 2\n\
         cache:\n  dir: {}\n  max_size: {max_size}\n  tag_ttl: {tag_ttl}\nupstreams:\n{upstreams}{}",
        dir.path().display(),
        extra(&addr.to_string())
    );
    let config = Config::from_yaml(&yaml, "test.yaml").expect("test config is valid");
    let listeners = Listeners {
        registry: vec![registry],
        admin: Some(admin),
    };
    let (stop, rx) = tokio::sync::watch::channel(false);
    let start = match STORES {
        super::Stores::Disk => Start::Fresh(listeners),
        super::Stores::Memory => {
            let blobs = Storage::of(Arc::new(MemoryStore::new(config.cache.max_size)));
            let tags = TagCache::with_store(Arc::new(MemoryTagStore::default()), 100_000);
            Start::FreshOn(listeners, Box::new((blobs, tags)))
        }
    };
    let thread = std::thread::spawn(move || run(config, start, ChannelShutdown(rx)).unwrap());
    Mirror {
        base: format!("http://{addr}"),
        admin: format!("http://{admin_addr}"),
        stop,
        thread: Some(thread),
        dir: Some(dir),
    }
}

fn one_upstream(fake: &FakeUpstream, extra: &str) -> String {
    format!("  - name: docker.io\n    url: {}\n{extra}", fake.url())
}

fn blob_data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn image_manifest(layers: &[&str]) -> Vec<u8> {
    let layers: Vec<_> = layers
        .iter()
        .map(|d| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": 1}))
        .collect();
    serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(b"{}"), "size": 2},
        "layers": layers,
    })
    .to_string()
    .into_bytes()
}

async fn get(url: &str) -> reqwest::Response {
    reqwest::get(url).await.unwrap()
}

async fn error_code(resp: reqwest::Response) -> String {
    let v: serde_json::Value = resp.json().await.unwrap();
    v["errors"][0]["code"].as_str().unwrap().to_string()
}

/// The value of a series (name and labels, as printed) in `/metrics`.
async fn metrics_value(m: &Mirror, series: &str) -> Option<f64> {
    let text = metrics(m).await;
    let value = |l: &str| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok();
    text.lines().find_map(value)
}

/// Polls `/metrics` until it has `line` (e.g. `dockside_cache_objects 1`), failing after 30 s.
async fn until_metric(m: &Mirror, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !metrics(m).await.lines().any(|l| l == line) {
        assert!(Instant::now() < deadline, "/metrics never had {line}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metrics(m: &Mirror) -> String {
    get(&format!("{}/metrics", m.admin))
        .await
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn herd_on_a_cold_blob_makes_one_upstream_fetch() {
    let fake = FakeUpstream::start().await;
    let data = Arc::new(blob_data(4 << 20, 1));
    let digest = fake.add_blob(&data);
    let gate = fake.hold(64 << 10);
    let m = start_mirror(&one_upstream(&fake, ""), "5m").await;

    let url = format!("{}/v2/library/herd/blobs/{digest}", m.base);
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let (url, data) = (url.clone(), data.clone());
            tokio::spawn(async move {
                let body = get(&url).await.bytes().await.unwrap();
                assert_eq!(body.len(), data.len());
                assert!(body[..] == data[..], "a client got the wrong bytes");
            })
        })
        .collect();
    // The upstream holds the body until all 20 are in: one started the fill, 19 joined it.
    until_metric(
        &m,
        "dockside_coalesced_requests_total{kind=\"blob\",upstream=\"docker.io\"} 19",
    )
    .await;
    gate.open();
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        fake.count(&format!("GET /v2/library/herd/blobs/{digest}")),
        1
    );
    let text = metrics(&m).await;
    assert!(
        text.contains("dockside_coalesced_requests_total{kind=\"blob\",upstream=\"docker.io\"}")
    );
    // A warm request sends nothing upstream.
    let before = fake.log().len();
    assert_eq!(get(&url).await.bytes().await.unwrap().len(), data.len());
    assert_eq!(fake.log().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_byte_arrives_before_the_fill_ends() {
    let fake = FakeUpstream::start().await;
    let data = blob_data(2 << 20, 2);
    let digest = fake.add_blob(&data);
    // The upstream sends the first 64 KiB, then holds the rest until the gate opens.
    let gate = fake.hold(64 << 10);
    let m = start_mirror(&one_upstream(&fake, ""), "5m").await;
    let url = format!("{}/v2/library/x/blobs/{digest}", m.base);
    // The deadline only turns "nothing until the fill ends" (a hang here) into a failure.
    let (mut resp, first) = tokio::time::timeout(Duration::from_secs(30), async {
        let mut resp = get(&url).await;
        let first = resp.chunk().await.unwrap().unwrap();
        (resp, first)
    })
    .await
    .expect("no byte reached the client while the upstream held the rest of the body");
    assert!(!first.is_empty());
    assert!(first[..] == data[..first.len()]);
    assert_eq!(metrics_value(&m, "dockside_cache_objects").await, Some(0.0));
    gate.open();
    let mut total = first.len();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        total += chunk.len();
    }
    assert_eq!(total, data.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_blob_is_never_completed_or_cached() {
    let fake = FakeUpstream::start().await;
    let data = blob_data(1 << 20, 3);
    let digest = fake.add_blob(&data);
    fake.set_fault(&digest, Some(Fault::Corrupt));
    // The upstream holds the body after 64 KiB, so the client has its 200 and the start of the
    // body when the digest check fails. (The held-back last byte is unit-tested in fill.rs.)
    let gate = fake.hold(64 << 10);
    let m = start_mirror(&one_upstream(&fake, ""), "5m").await;
    let url = format!("{}/v2/library/x/blobs/{digest}", m.base);

    let resp = get(&url).await;
    assert_eq!(resp.status(), StatusCode::OK);
    gate.open();
    assert!(
        resp.bytes().await.is_err(),
        "a corrupt body must be aborted, not completed"
    );
    assert!(
        metrics(&m)
            .await
            .contains("dockside_digest_mismatches_total{upstream=\"docker.io\"} 1")
    );

    // Nothing was kept: once upstream is healthy, the next request fetches again and succeeds.
    fake.set_fault(&digest, None);
    let body = get(&url).await.bytes().await.unwrap();
    assert!(body[..] == data[..]);
    assert_eq!(fake.count(&format!("GET /v2/library/x/blobs/{digest}")), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn truncated_upstream_body_aborts_the_client_and_is_refetched() {
    let fake = FakeUpstream::start().await;
    let data = blob_data(1 << 20, 4);
    let digest = fake.add_blob(&data);
    // Each response breaks after 100 kB: the resumes cannot finish 1 MiB.
    fake.set_fault(&digest, Some(Fault::Truncate(100_000)));
    let m = start_mirror(&one_upstream(&fake, ""), "5m").await;
    let url = format!("{}/v2/library/x/blobs/{digest}", m.base);

    // Either the break comes before the answer (a 5xx naming the upstream) or during the body
    // (an aborted body); never a complete 200.
    let resp = get(&url).await;
    if resp.status() == StatusCode::OK {
        assert!(
            resp.bytes().await.is_err(),
            "a truncated body was completed"
        );
    } else {
        assert!(resp.status().is_server_error());
    }
    fake.set_fault(&digest, None);
    let gets = || fake.count(&format!("GET /v2/library/x/blobs/{digest}"));
    // The fill resumed a few times, each resume broken again, then gave up.
    assert_eq!(gets(), 4, "{:?}", fake.log());
    assert!(get(&url).await.bytes().await.unwrap()[..] == data[..]);
    assert_eq!(gets(), 5, "one fresh fetch once the upstream is healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_larger_than_the_cache_is_served_once_to_all_and_not_kept() {
    let fake = FakeUpstream::start().await;
    let data = blob_data(300_000, 16);
    let digest = fake.add_blob(&data);
    let gate = fake.hold(64 << 10);
    let m = start_mirror_sized(&one_upstream(&fake, ""), "5m", "100KiB").await;
    let url = format!("{}/v2/library/x/blobs/{digest}", m.base);

    let clients: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url).await.bytes().await.unwrap() })
        })
        .collect();
    // Held upstream until the other two joined the first one's fill.
    until_metric(
        &m,
        "dockside_coalesced_requests_total{kind=\"blob\",upstream=\"docker.io\"} 2",
    )
    .await;
    gate.open();
    for c in clients {
        assert!(
            c.await.unwrap()[..] == data[..],
            "every client gets the whole blob"
        );
    }
    let gets = || fake.count(&format!("GET /v2/library/x/blobs/{digest}"));
    assert_eq!(gets(), 1, "still one upstream fetch for the herd");
    assert!(get(&url).await.bytes().await.unwrap()[..] == data[..]);
    assert_eq!(gets(), 2, "not kept, so fetched again");
    let metrics = get(&format!("{}/metrics", m.admin))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("dockside_oversize_blobs_total{upstream=\"docker.io\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_brief_upstream_outage_is_ridden_out_with_retries() {
    let fake = FakeUpstream::start().await;
    let data = blob_data(10_000, 15);
    let digest = fake.add_blob(&data);
    let m = start_mirror(&one_upstream(&fake, ""), "5m").await;
    let url = format!("{}/v2/library/x/blobs/{digest}", m.base);
    // Two 503s, then healthy: within the two retries an upstream gets by default.
    fake.fail_next(2);
    let resp = get(&url).await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "503s within the retry budget are not the client's problem"
    );
    assert!(resp.bytes().await.unwrap()[..] == data[..]);
    let gets = fake.count(&format!("GET /v2/library/x/blobs/{digest}"));
    assert!(gets >= 2, "the first attempt met the outage: {gets}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_breaks_once_is_resumed_with_range_and_verified_whole() {
    let fake = FakeUpstream::start().await;
    let data = blob_data(1 << 20, 14);
    let digest = fake.add_blob(&data);
    fake.set_fault(&digest, Some(Fault::TruncateOnce(300_000)));
    let m = start_mirror(&one_upstream(&fake, ""), "5m").await;
    let url = format!("{}/v2/library/x/blobs/{digest}", m.base);

    let resp = get(&url).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.bytes().await.unwrap()[..] == data[..],
        "the client got the whole blob"
    );
    let path = format!("GET /v2/library/x/blobs/{digest}");
    assert_eq!(fake.count(&path), 2);
    // The resume asks for the rest from the byte reached.
    let resumed = fake
        .log()
        .into_iter()
        .find(|l| l.contains("[range bytes="))
        .expect("a Range request");
    assert!(
        resumed.starts_with(&path) && resumed.ends_with("-]"),
        "{resumed}"
    );
    // Cached whole: a second request asks upstream nothing.
    assert!(get(&url).await.bytes().await.unwrap()[..] == data[..]);
    assert_eq!(fake.count(&path), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_leaves_does_not_cancel_the_fill() {
    let fake = FakeUpstream::start().await;
    let data = blob_data(2 << 20, 5);
    let digest = fake.add_blob(&data);
    let gate = fake.hold(64 << 10);
    let m = start_mirror(&one_upstream(&fake, ""), "5m").await;
    let url = format!("{}/v2/library/x/blobs/{digest}", m.base);

    // The client leaves while the upstream still holds most of the body.
    let mut resp = get(&url).await;
    resp.chunk().await.unwrap();
    drop(resp);
    gate.open();
    until_metric(&m, "dockside_cache_objects 1").await;
    assert!(get(&url).await.bytes().await.unwrap()[..] == data[..]);
    assert_eq!(fake.count(&format!("GET /v2/library/x/blobs/{digest}")), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ranges_on_cached_and_filling_blobs() {
    let fake = FakeUpstream::start().await;
    let data = blob_data(1 << 20, 6);
    let digest = fake.add_blob(&data);
    let gate = fake.hold(64 << 10);
    let m = start_mirror(&one_upstream(&fake, ""), "5m").await;
    let url = format!("{}/v2/library/x/blobs/{digest}", m.base);
    let client = reqwest::Client::new();
    let range = |r: &'static str| client.get(&url).header("range", r).send();

    // Cold: the fill starts with this request, and answers it while the upstream holds the rest.
    let resp = range("bytes=1000-1999").await.unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 1000-1999/{}", data.len())
    );
    assert!(resp.bytes().await.unwrap()[..] == data[1000..2000]);
    gate.open();
    until_metric(&m, "dockside_cache_objects 1").await;
    // Warm, suffix and open-ended.
    let resp = range("bytes=-10").await.unwrap();
    assert!(resp.bytes().await.unwrap()[..] == data[data.len() - 10..]);
    let resp = range("bytes=1048000-").await.unwrap();
    assert!(resp.bytes().await.unwrap()[..] == data[1048000..]);
    let resp = range("bytes=99999999-").await.unwrap();
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(fake.count(&format!("GET /v2/library/x/blobs/{digest}")), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tags_are_cached_then_revalidated_with_head_then_served_stale() {
    let fake = FakeUpstream::start().await;
    let v1 = image_manifest(&[&digest_of(b"one")]);
    let d1 = fake.add_manifest("library/app", Some("1"), OCI_MANIFEST, &v1);
    let m = start_mirror(&one_upstream(&fake, ""), "1s").await;
    let url = format!("{}/v2/app/manifests/1", m.base);

    let resp = get(&url).await;
    assert_eq!(resp.headers()["docker-content-digest"], d1.as_str());
    assert_eq!(resp.headers()["content-type"], OCI_MANIFEST);
    assert!(resp.bytes().await.unwrap()[..] == v1[..]);
    // Inside the TTL: no upstream request at all.
    let before = fake.log().len();
    get(&url).await.bytes().await.unwrap();
    assert_eq!(fake.log().len(), before);

    // After it: a HEAD revalidates; the tag moved, so the new manifest is fetched by digest.
    let v2 = image_manifest(&[&digest_of(b"two")]);
    let d2 = fake.add_manifest("library/app", Some("1"), OCI_MANIFEST, &v2);
    // The 1 s TTL, slept out in full (nothing is raced against it).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let resp = get(&url).await;
    assert_eq!(resp.headers()["docker-content-digest"], d2.as_str());
    assert_eq!(fake.count("HEAD /v2/library/app/manifests/1"), 1);
    assert_eq!(fake.count("GET /v2/library/app/manifests/1"), 1);
    assert_eq!(
        fake.count(&format!("GET /v2/library/app/manifests/{d2}")),
        1
    );

    // Upstream down: the cached answer is served, with a metric saying so.
    fake.set_down(true);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let resp = get(&url).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["docker-content-digest"], d2.as_str());
    assert!(
        metrics(&m)
            .await
            .contains("dockside_stale_served_total{upstream=\"docker.io\"} 1")
    );
    // A tag never seen cannot be served stale: a clear upstream error, naming it.
    let resp = get(&format!("{}/v2/app/manifests/never", m.base)).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("docker.io")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifest_with_a_wrong_digest_is_refused_and_not_cached() {
    let fake = FakeUpstream::start().await;
    let claimed = digest_of(b"what the client asked for");
    fake.add_lying_manifest("library/app", &claimed, &image_manifest(&[]));
    let m = start_mirror(&one_upstream(&fake, ""), "5m").await;
    let url = format!("{}/v2/app/manifests/{claimed}", m.base);
    for _ in 0..2 {
        let resp = get(&url).await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(error_code(resp).await, "DIGEST_INVALID");
    }
    assert_eq!(
        fake.count(&format!("GET /v2/library/app/manifests/{claimed}")),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bearer_token_is_fetched_once_per_scope_with_credentials() {
    let fake = FakeUpstream::start().await;
    fake.set_auth(Auth::Bearer("alice".into(), "s3cret".into()));
    let d = fake.add_manifest("library/app", Some("1"), OCI_MANIFEST, &image_manifest(&[]));
    let blob = fake.add_blob(b"layer");
    let creds = "    username: alice\n    password: s3cret\n";
    let m = start_mirror(&one_upstream(&fake, creds), "5m").await;

    let resp = get(&format!("{}/v2/app/manifests/1", m.base)).await;
    assert_eq!(resp.headers()["docker-content-digest"], d.as_str());
    let resp = get(&format!("{}/v2/app/blobs/{blob}", m.base)).await;
    assert_eq!(&resp.bytes().await.unwrap()[..], b"layer");
    assert_eq!(fake.count("GET /token"), 1, "{:?}", fake.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn basic_auth_upstream_and_wrong_password() {
    let fake = FakeUpstream::start().await;
    fake.set_auth(Auth::Basic("bob".into(), "right".into()));
    let blob = fake.add_blob(b"basic layer");
    let good = start_mirror(
        &one_upstream(&fake, "    username: bob\n    password: right\n"),
        "5m",
    )
    .await;
    let resp = get(&format!("{}/v2/app/blobs/{blob}", good.base)).await;
    assert_eq!(&resp.bytes().await.unwrap()[..], b"basic layer");

    let bad = start_mirror(
        &one_upstream(&fake, "    username: bob\n    password: wrong\n"),
        "5m",
    )
    .await;
    let other = fake.add_blob(b"other layer");
    let resp = get(&format!("{}/v2/app/blobs/{other}", bad.base)).await;
    // Our credentials, not the client's: a gateway error, with no challenge to answer.
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(!resp.headers().contains_key("www-authenticate"));
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "UNAUTHORIZED");
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("docker.io")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routing_by_ns_prefix_and_default() {
    let hub = FakeUpstream::start().await;
    let ghcr = FakeUpstream::start().await;
    let hub_blob = hub.add_blob(b"from hub");
    let ghcr_blob = ghcr.add_blob(b"from ghcr");
    let upstreams = format!(
        "  - name: docker.io\n    url: {}\n    aliases: [index.docker.io]\n  - name: ghcr.io\n    url: {}\n",
        hub.url(),
        ghcr.url()
    );
    let m = start_mirror(&upstreams, "5m").await;

    // ?ns= by alias, echoed back; one-component names get library/ on Docker Hub.
    let resp = get(&format!(
        "{}/v2/alpine/blobs/{hub_blob}?ns=index.docker.io",
        m.base
    ))
    .await;
    assert_eq!(resp.headers()["oci-namespace"], "index.docker.io");
    assert_eq!(&resp.bytes().await.unwrap()[..], b"from hub");
    assert_eq!(
        hub.count(&format!("GET /v2/library/alpine/blobs/{hub_blob}")),
        1
    );
    // Path prefix.
    let resp = get(&format!(
        "{}/v2/ghcr.io/owner/app/blobs/{ghcr_blob}",
        m.base
    ))
    .await;
    assert_eq!(&resp.bytes().await.unwrap()[..], b"from ghcr");
    assert_eq!(
        ghcr.count(&format!("GET /v2/owner/app/blobs/{ghcr_blob}")),
        1
    );
    // ns naming ghcr.io, no library/ rule there.
    let resp = get(&format!("{}/v2/app/blobs/{ghcr_blob}?ns=ghcr.io", m.base)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    // Unknown ns: refused, never proxied.
    let resp = get(&format!(
        "{}/v2/app/blobs/{hub_blob}?ns=evil.example.com",
        m.base
    ))
    .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(resp).await, "NAME_UNKNOWN");
    // A path prefix naming a registry that is not configured: refused like that ns, not asked
    // of the default upstream as repository `quay.io/owner/app`.
    let before = (hub.log().len(), ghcr.log().len());
    for path in ["manifests/1", "tags/list", &format!("blobs/{hub_blob}")] {
        let resp = get(&format!("{}/v2/quay.io/owner/app/{path}", m.base)).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], "NAME_UNKNOWN", "{path}");
        let message = v["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains("\"quay.io\""), "{message}");
    }
    assert_eq!((hub.log().len(), ghcr.log().len()), before);
    // Tag lists pass through.
    let resp = get(&format!("{}/v2/ghcr.io/owner/app/tags/list", m.base)).await;
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["name"], "owner/app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_errors_are_oci_json_with_the_right_code() {
    let fake = FakeUpstream::start().await;
    let m = start_mirror(&one_upstream(&fake, ""), "5m").await;
    let client = reqwest::Client::new();
    let cases = [
        (
            "PUT",
            "/v2/app/manifests/1",
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            "POST",
            "/v2/app/blobs/uploads/",
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            "DELETE",
            "/v2/app/manifests/1",
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            "GET",
            "/v2/app/blobs/sha256:ABC",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            "/v2/App/manifests/1",
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/app/manifests/nope",
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        // A reference no manifest can have: 404 as distribution answers (the conformance
        // suite's pull workflow asks for it), and nothing is asked upstream.
        (
            "GET",
            "/v2/app/manifests/.INVALID_MANIFEST_NAME",
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
    ];
    for (method, path, status, code) in cases {
        let resp = client
            .request(method.parse().unwrap(), format!("{}{path}", m.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{method} {path}");
        assert_eq!(error_code(resp).await, code, "{method} {path}");
    }
    let resp = client
        .head(format!("{}/v2/app/manifests/.INVALID_MANIFEST_NAME", m.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let missing = digest_of(b"missing");
    let resp = get(&format!("{}/v2/app/blobs/{missing}", m.base)).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(resp).await, "BLOB_UNKNOWN");
    // Nothing was sent upstream for requests refused at the edge.
    assert!(
        fake.log()
            .iter()
            .all(|l| !l.contains("ABC") && !l.starts_with("PUT") && !l.contains("INVALID"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn head_of_a_cold_blob_does_not_fetch_it() {
    let fake = FakeUpstream::start().await;
    let digest = fake.add_blob(&blob_data(100_000, 7));
    let m = start_mirror(&one_upstream(&fake, ""), "5m").await;
    let resp = reqwest::Client::new()
        .head(format!("{}/v2/app/blobs/{digest}", m.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-length"], "100000");
    assert_eq!(resp.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(fake.count("GET "), 0);
    assert_eq!(fake.count("HEAD "), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blob_redirects_are_followed_without_sending_credentials_to_the_cdn() {
    let registry = FakeUpstream::start().await;
    let cdn = FakeUpstream::start().await;
    registry.set_auth(Auth::Bearer("alice".into(), "s3cret".into()));
    let data = blob_data(300_000, 8);
    let digest = cdn.add_blob(&data);
    registry.redirect_blobs_to(Some(cdn.url()));
    let creds = "    username: alice\n    password: s3cret\n";
    let m = start_mirror(&one_upstream(&registry, creds), "5m").await;

    let body = get(&format!("{}/v2/app/blobs/{digest}", m.base))
        .await
        .bytes()
        .await
        .unwrap();
    assert!(body[..] == data[..]);
    assert_eq!(
        registry.count(&format!(
            "GET /v2/library/app/blobs/{digest} [authorization]"
        )),
        1
    );
    assert_eq!(
        cdn.log(),
        vec![format!("GET /cdn/{digest}")],
        "credentials leaked to the CDN host"
    );
    // The bytes landed in the cache: the next pull touches neither host.
    get(&format!("{}/v2/app/blobs/{digest}", m.base))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(cdn.log().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_may_speak_http2_in_cleartext() {
    let fake = FakeUpstream::start().await;
    let d = fake.add_manifest("library/app", Some("1"), OCI_MANIFEST, &image_manifest(&[]));
    let m = start_mirror(&one_upstream(&fake, ""), "5m").await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = h2
        .get(format!("{}/v2/app/manifests/1", m.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.headers()["docker-content-digest"], d.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blobs_without_content_length_are_streamed_then_served_with_one() {
    let fake = FakeUpstream::start().await;
    fake.set_chunked(true);
    let data = blob_data(700_000, 9);
    let digest = fake.add_blob(&data);
    let m = start_mirror(&one_upstream(&fake, ""), "5m").await;
    let url = format!("{}/v2/app/blobs/{digest}", m.base);

    let cold = get(&url).await;
    assert_eq!(cold.status(), StatusCode::OK);
    assert!(cold.bytes().await.unwrap()[..] == data[..]);
    let warm = get(&url).await;
    assert_eq!(
        warm.headers()["content-length"],
        data.len().to_string().as_str()
    );
    assert!(warm.bytes().await.unwrap()[..] == data[..]);
    assert_eq!(
        fake.count(&format!("GET /v2/library/app/blobs/{digest}")),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_path_prefix_may_name_an_upstream_with_a_port() {
    let fake = FakeUpstream::start().await;
    let digest = fake.add_blob(b"from the corp registry");
    let upstreams = format!("  - name: registry.corp:5000\n    url: {}\n", fake.url());
    let m = start_mirror(&upstreams, "5m").await;

    let resp = get(&format!(
        "{}/v2/registry.corp:5000/team/app/blobs/{digest}",
        m.base
    ))
    .await;
    assert_eq!(&resp.bytes().await.unwrap()[..], b"from the corp registry");
    assert_eq!(fake.count(&format!("GET /v2/team/app/blobs/{digest}")), 1);
    let resp = get(&format!(
        "{}/v2/other.corp:5000/team/app/blobs/{digest}",
        m.base
    ))
    .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(resp).await, "NAME_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cold_herd_shares_one_token_fetch() {
    let fake = FakeUpstream::start().await;
    fake.set_auth(Auth::Bearer("alice".into(), "s3cret".into()));
    let blobs: Vec<String> = (0..10u8)
        .map(|i| fake.add_blob(&blob_data(50_000, i)))
        .collect();
    let creds = "    username: alice\n    password: s3cret\n";
    let m = start_mirror(&one_upstream(&fake, creds), "5m").await;

    let clients: Vec<_> = blobs
        .iter()
        .map(|d| tokio::spawn(reqwest::get(format!("{}/v2/app/blobs/{d}", m.base))))
        .collect();
    for c in clients {
        assert_eq!(c.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(fake.count("GET /token"), 1, "{:?}", fake.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_token_is_replaced_not_retried() {
    let fake = FakeUpstream::start().await;
    fake.set_auth(Auth::Bearer("alice".into(), "s3cret".into()));
    let first = fake.add_blob(b"first");
    let second = fake.add_blob(b"second");
    let creds = "    username: alice\n    password: s3cret\n";
    let m = start_mirror(&one_upstream(&fake, creds), "5m").await;

    let resp = get(&format!("{}/v2/app/blobs/{first}", m.base)).await;
    assert_eq!(&resp.bytes().await.unwrap()[..], b"first");
    fake.rotate_tokens();
    let resp = get(&format!("{}/v2/app/blobs/{second}", m.base)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(&resp.bytes().await.unwrap()[..], b"second");
    assert_eq!(fake.count("GET /token"), 2, "{:?}", fake.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn head_during_a_fill_is_answered_by_the_fill() {
    let fake = FakeUpstream::start().await;
    let data = blob_data(2 << 20, 10);
    let digest = fake.add_blob(&data);
    // The fill stays in flight until the gate opens (when this test ends).
    let _gate = fake.hold(64 << 10);
    let m = start_mirror(&one_upstream(&fake, ""), "5m").await;
    let url = format!("{}/v2/app/blobs/{digest}", m.base);

    let mut filling = get(&url).await;
    filling.chunk().await.unwrap();
    let head = reqwest::Client::new().head(&url).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()["content-length"],
        data.len().to_string().as_str()
    );
    assert_eq!(fake.count("HEAD "), 0, "{:?}", fake.log());
}

/// A cluster of this mirror and a fake member (the fake upstream standing in for a replica):
/// a blob the fake member owns is asked of it, with none of the client's credentials, and
/// content from it that does not match its digest is neither served as complete nor kept.
#[tokio::test(flavor = "multi_thread")]
async fn a_miss_asks_the_owning_member_without_the_clients_credentials() {
    use dockside::cluster::RingKey;
    use dockside::cluster::ring::rank;
    use dockside::config::PeerAddr;
    use dockside::oci::Digest;
    let upstream = FakeUpstream::start().await;
    let member = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "client-token-0123456789\n").unwrap();
    let other = member.addr.to_string();
    let (secret_path, token_path) = (secret.display().to_string(), token.display().to_string());
    let extra = move |me: &str| {
        format!(
            "client_auth:\n  tokens: [{{ name: ci, token_file: \"{token_path}\" }}]\n\
             cluster:\n  advertise: \"{me}\"\n  peers: [\"{me}\", \"{other}\"]\n  \
             secret_file: \"{secret_path}\"\n"
        )
    };
    let m = start_mirror_with(&one_upstream(&upstream, ""), "5m", "1GiB", &extra).await;
    let me = PeerAddr::parse(m.base.trim_start_matches("http://")).unwrap();
    let members = [me, PeerAddr::parse(&member.addr.to_string()).unwrap()];
    // Blobs the fake member owns.
    let owned: Vec<Vec<u8>> = (0u8..40)
        .map(|seed| blob_data(10_000, seed))
        .filter(|data| {
            let d = Digest::parse(&digest_of(data)).unwrap();
            rank(&members, &RingKey::digest(&d))[0] == &members[1]
        })
        .take(2)
        .collect();
    let (good, bad) = (&owned[0], &owned[1]);
    let (good_d, bad_d) = (member.add_blob(good), member.add_blob(bad));
    member.set_fault(&bad_d, Some(Fault::Corrupt));
    let client = reqwest::Client::new();
    let fetch = |d: &str| {
        client
            .get(format!("{}/v2/library/x/blobs/{d}", m.base))
            .bearer_auth("client-token-0123456789")
            .send()
    };
    let r = fetch(&good_d).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().as_ref(), good.as_slice());
    let asked = format!("GET /v2/library/x/blobs/{good_d}");
    assert_eq!(member.count(&asked), 1, "{:?}", member.log());
    assert!(
        member.log().iter().all(|l| !l.contains("[authorization]")),
        "a client's credentials crossed the hop: {:?}",
        member.log()
    );
    assert_eq!(upstream.count("GET /v2/library/x/blobs"), 0, "{:?}", upstream.log());
    // Bytes from a member that do not hash to the digest: the body breaks before its end,
    // nothing is kept, and the next request asks again.
    for round in 1..=2 {
        // Either the 200's body breaks before its end, or the fill failed before the answer
        // started (the blob is small) and the client gets the error itself.
        let r = fetch(&bad_d).await.unwrap();
        let status = r.status();
        match r.bytes().await {
            Err(_) => assert_eq!(status, StatusCode::OK, "round {round}"),
            Ok(body) => {
                let text = String::from_utf8_lossy(&body);
                assert_eq!(status, StatusCode::BAD_GATEWAY, "round {round}: {text}");
                let peer = format!("peer {}", member.addr);
                assert!(
                    text.contains("DIGEST_INVALID") && text.contains(&peer),
                    "round {round}: {text}"
                );
            }
        }
        until_metric(&m, "dockside_fills_in_flight 0").await;
        let asked = format!("GET /v2/library/x/blobs/{bad_d}");
        assert_eq!(member.count(&asked), round, "round {round}: {:?}", member.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_miss_from_an_offline_upstream_says_it_is_offline_and_not_cached() {
    let fake = FakeUpstream::start().await;
    let m = start_mirror(&one_upstream(&fake, "    offline: true\n"), "5m").await;
    let missing = digest_of(b"never cached");
    let cases = [
        (
            "/v2/other/manifests/1.0".to_string(),
            "MANIFEST_UNKNOWN",
            "manifest library/other:1.0 is not cached",
        ),
        (
            format!("/v2/other/manifests/{missing}"),
            "MANIFEST_UNKNOWN",
            "is not cached",
        ),
        (
            format!("/v2/other/blobs/{missing}"),
            "BLOB_UNKNOWN",
            "is not cached",
        ),
        (
            "/v2/other/tags/list".to_string(),
            "NAME_UNKNOWN",
            "library/other/tags/list, which dockside passes to the upstream, is not cached",
        ),
    ];
    for (path, code, says) in cases {
        let resp = get(&format!("{}{path}", m.base)).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], code, "{path}");
        let message = v["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(says), "{path}: {message}");
        assert!(
            message.ends_with("upstream docker.io is offline (offline: true)"),
            "{path}: {message}"
        );
    }
    assert!(fake.log().is_empty(), "{:?}", fake.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn once_the_circuit_is_open_stale_tags_are_served_without_asking_upstream() {
    let fake = FakeUpstream::start().await;
    let v1 = image_manifest(&[&digest_of(b"one")]);
    let d1 = fake.add_manifest("library/app", Some("1"), OCI_MANIFEST, &v1);
    let circuit = "    retries: 2\n    circuit: { failures: 1, cooldown: 1h }\n";
    let m = start_mirror(&one_upstream(&fake, circuit), "1s").await;
    let url = format!("{}/v2/app/manifests/1", m.base);
    assert_eq!(get(&url).await.headers()["docker-content-digest"], d1.as_str());

    // The 1 s TTL, slept out in full; then the upstream fails once and the circuit opens.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    fake.set_down(true);
    let before = fake.log().len();
    let stale = || async {
        let resp = get(&url).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["docker-content-digest"], d1.as_str());
    };
    stale().await;
    let up = format!(
        "dockside_upstream_url_up{{upstream=\"docker.io\",url=\"{}\"}}",
        fake.url().trim_end_matches('/')
    );
    assert_eq!(metrics_value(&m, &up).await, Some(0.0));
    let asked = fake.log();
    assert_eq!(
        asked[before..],
        ["HEAD /v2/library/app/manifests/1"],
        "the failure that opened the circuit is not retried against it"
    );

    // While it is open: stale answers at once, with no request and no retry.
    for _ in 0..3 {
        stale().await;
    }
    assert_eq!(fake.log(), asked);
    let retries = "dockside_upstream_retries_total{upstream=\"docker.io\"}";
    assert_eq!(metrics_value(&m, retries).await.unwrap_or(0.0), 0.0);
    // A tag never seen: an error at once, naming the upstream and why it was not asked.
    let resp = get(&format!("{}/v2/app/manifests/never", m.base)).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let v: serde_json::Value = resp.json().await.unwrap();
    let message = v["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.starts_with("upstream docker.io is unavailable: not asked while it keeps failing")
            && message.contains("answered HTTP 503"),
        "{message}"
    );
    assert_eq!(fake.log(), asked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_prefetch_counts_blobs_its_images_share_as_shared_not_already_cached() {
    let fake = FakeUpstream::start().await;
    fake.add_blob(b"{}");
    let shared = fake.add_blob(b"a base layer both images have");
    let (own_a, own_b) = (fake.add_blob(b"a's own layer"), fake.add_blob(b"b's own"));
    for (repo, own) in [("library/a", &own_a), ("library/b", &own_b)] {
        fake.add_manifest(repo, Some("1"), OCI_MANIFEST, &image_manifest(&[&shared, own]));
    }
    let m = start_mirror(&one_upstream(&fake, ""), "5m").await;
    let client = reqwest::Client::new();
    let started: serde_json::Value = client
        .post(format!("{}/api/prefetch", m.admin))
        .body(r#"{"images": ["a:1", "b:1"]}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let report_url = format!("{}{}", m.admin, started["status"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let report: serde_json::Value = get(&report_url).await.json().await.unwrap();
        if report["state"] == "done" {
            break report;
        }
        assert!(Instant::now() < deadline, "the prefetch never ended: {report}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let images = report["images"].as_array().unwrap();
    let sum = |key: &str| images.iter().map(|i| i[key].as_u64().unwrap()).sum::<u64>();
    assert!(images.iter().all(|i| i["ok"] == true), "{report}");
    // The cache was empty: the config and the base layer were fetched once, for one image,
    // and shared with the other, never "already cached".
    assert_eq!(sum("blobs_cached"), 0, "{report}");
    assert_eq!(sum("blobs_fetched"), 4, "{report}");
    assert_eq!(sum("blobs_shared"), 2, "{report}");
    assert_eq!(fake.count(&format!("GET /v2/library/a/blobs/{shared}"))
        + fake.count(&format!("GET /v2/library/b/blobs/{shared}")), 1);
}
