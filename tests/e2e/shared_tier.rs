//! The shared tier (`cache.shared.s3`) against a real S3-compatible server on loopback
//! (moto's), under the real dockside binary and a real docker-registry: a new replica with an
//! empty disk pulls from the tier alone, a corrupt object there is never served and is fetched
//! anew, and the tier down costs no pull while its writes resume when it is back.

use std::time::Duration;

use crate::cluster::{expected, pull, runtime, sha};
use crate::support::cluster::Cluster;
use crate::support::dockside::{Config, Dockside, Upstream};
use crate::support::fault_proxy::{FaultProxy, Mode};
use crate::support::http;
use crate::support::image::{Format, Index};
use crate::support::registry::{Auth, Registry, count};
use crate::support::s3::S3;
use crate::support::{serial, skopeo, wait_for};

const WRITE_BEHIND: Duration = Duration::from_secs(60);

fn tiered(reg: &Registry, endpoint: &str) -> Config {
    let mut cfg = Config::new(vec![Upstream::hub(reg)]);
    cfg.cache_yaml = S3::cache_yaml(endpoint);
    cfg.env = S3::env();
    cfg
}

/// The keys of every object one pull of the amd64 image reads: index, manifest, config, layers.
fn object_keys(index: &Index) -> Vec<String> {
    let img = index.image("amd64");
    let mut keys: Vec<String> = [&index.manifest, &img.manifest]
        .into_iter()
        .chain(img.blobs())
        .map(|b| S3::blob_key(&b.digest))
        .collect();
    keys.sort();
    keys
}

fn wait_for_keys(s3: &S3, keys: &[String]) {
    wait_for("objects written behind to the bucket", WRITE_BEHIND, || {
        let held = s3.keys("blobs/");
        keys.iter().all(|k| held.contains(k)).then_some(())
    });
}

/// The sum of every series of a metric on one dockside.
fn metric_total(d: &Dockside, name: &str) -> f64 {
    let text = http::get(&format!("{}/metrics", d.admin_url()))
        .expect("GET /metrics")
        .text();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_new_replica_with_an_empty_disk_pulls_from_the_tier_with_the_upstream_gone() {
    let _heavy = serial::heavy();
    let s3 = S3::start();
    let reg = Registry::start(Auth::None);
    // One layer above the single-PUT size, so it goes up as a multipart upload.
    let index = Index::generate(810, &[20 << 20, 1 << 20, 20_000], Format::Oci, &["amd64"]);
    skopeo::push(&reg, "library/tiered", "v1", &index);
    let cfg = tiered(&reg, &s3.url());
    let want = expected("library/tiered", &index);

    let a = Dockside::start(&cfg);
    let got = runtime().block_on(pull(http::client(), a.url(), "library/tiered", &index));
    assert_eq!(got, want, "through replica A");
    wait_for_keys(&s3, &object_keys(&index));
    wait_for("the tag written behind", WRITE_BEHIND, || {
        (!s3.keys("tags/docker.io/library/tiered/_tags/v1/")
            .is_empty())
        .then_some(())
    });
    assert!(
        s3.keys("uploads/").is_empty(),
        "staging keys of multipart uploads are removed"
    );
    // Every replica gone with its disk, and the upstream too.
    drop(a);
    drop(reg);

    let b = Dockside::start(&cfg);
    let got = runtime().block_on(pull(http::client(), b.url(), "library/tiered", &index));
    assert_eq!(
        got, want,
        "through a new replica B, every body hashing to its digest"
    );
    assert_eq!(
        metric_total(&b, "dockside_upstream_requests_total"),
        0.0,
        "B asked the upstream for nothing"
    );
    let blob_bytes: usize = index
        .image("amd64")
        .blobs()
        .iter()
        .map(|b| b.data.len())
        .sum();
    let read = b
        .metric("dockside_shared_bytes_total{direction=\"read\"}")
        .unwrap_or(0.0);
    assert!(
        read >= blob_bytes as f64,
        "B read {read} bytes from the tier, the blobs are {blob_bytes}"
    );
}

#[test]
fn a_corrupt_object_in_the_tier_is_not_served_and_is_fetched_anew() {
    let _heavy = serial::heavy();
    let s3 = S3::start();
    let reg = Registry::start(Auth::None);
    let index = Index::generate(811, &[2 << 20, 30_000], Format::Oci, &["amd64"]);
    skopeo::push(&reg, "library/tampered", "v1", &index);
    let cfg = tiered(&reg, &s3.url());
    let a = Dockside::start(&cfg);
    let got = runtime().block_on(pull(http::client(), a.url(), "library/tampered", &index));
    assert_eq!(got, expected("library/tampered", &index));
    wait_for_keys(&s3, &object_keys(&index));
    drop(a);

    // One byte flipped in the bucket's copy of a layer: same key, same length.
    let layer = &index.image("amd64").layers[0];
    let key = S3::blob_key(&layer.digest);
    let mut tampered = s3.get(&key).expect("layer in the bucket");
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0xff;
    s3.put(&key, tampered.clone());

    let b = Dockside::start(&cfg);
    let before = reg.access_log();
    let url = format!("{}/v2/library/tampered/blobs/{}", b.url(), layer.digest);
    let (_, body) = http::get_outcome(&url);
    match body {
        Err(_) => {}
        Ok(body) => panic!(
            "the tier's bad copy was served as complete: {} bytes, {}",
            body.len(),
            sha(&body)
        ),
    }
    wait_for("the corrupt object counted", WRITE_BEHIND, || {
        let n = b.metric("dockside_shared_corrupt_objects_total{kind=\"blob\"}");
        (n == Some(1.0)).then_some(())
    });
    // The client's retry: the right bytes, from the upstream.
    let (status, body) = http::get_outcome(&url);
    let body = body.expect("the retry's body");
    assert_eq!((status, sha(&body)), (200, layer.digest.clone()));
    let path = format!("/v2/library/tampered/blobs/{}", layer.digest);
    let lines = crate::cache::new_lines(&before, &reg.access_log());
    assert_eq!(
        count(&lines, "GET", &path),
        1,
        "fetched anew from upstream once"
    );
    assert!(
        b.log().contains("did not match its digest"),
        "reported in the log"
    );
    // And the tier holds the right bytes again, written behind over the bad ones.
    wait_for("the right bytes back in the bucket", WRITE_BEHIND, || {
        let held = s3.get(&key)?;
        (sha(&held) == layer.digest).then_some(())
    });
}

#[test]
fn with_the_tier_down_pulls_come_from_upstream_and_its_writes_resume_when_it_is_back() {
    let _heavy = serial::heavy();
    let s3 = S3::start();
    // The tier's endpoint is a proxy that closes every connection until told otherwise.
    let proxy = FaultProxy::to_host(s3.host(), Mode::Reset { times: usize::MAX });
    let reg = Registry::start(Auth::None);
    let first = Index::generate(812, &[1 << 20, 10_000], Format::Oci, &["amd64"]);
    let second = Index::generate(813, &[1 << 20, 10_000], Format::Oci, &["amd64"]);
    skopeo::push(&reg, "library/first", "v1", &first);
    skopeo::push(&reg, "library/second", "v1", &second);
    let d = Dockside::start(&tiered(&reg, &proxy.url()));

    let got = runtime().block_on(pull(http::client(), d.url(), "library/first", &first));
    assert_eq!(
        got,
        expected("library/first", &first),
        "pulled with the tier down"
    );
    assert_eq!(d.metric("dockside_shared_circuit_open"), Some(1.0));
    assert!(s3.keys("blobs/").is_empty());

    proxy.set_mode(Mode::Honest);
    // Nothing pulled meanwhile: what failed is written once the tier answers the probe.
    wait_for_keys(&s3, &object_keys(&first));
    assert_eq!(d.metric("dockside_shared_circuit_open"), Some(0.0));
    let got = runtime().block_on(pull(http::client(), d.url(), "library/second", &second));
    assert_eq!(got, expected("library/second", &second));
    wait_for_keys(&s3, &object_keys(&second));
}

#[test]
fn a_cluster_on_the_tier_writes_each_object_once_and_a_new_cluster_fills_from_it_alone() {
    let _heavy = serial::heavy();
    let s3 = S3::start();
    let reg = Registry::start(Auth::None);
    let index = Index::generate(814, &[2 << 20, 1 << 20, 10_000], Format::Oci, &["amd64"]);
    skopeo::push(&reg, "library/clustered", "v1", &index);
    let cfg = tiered(&reg, &s3.url());
    let want = expected("library/clustered", &index);
    let keys = object_keys(&index);

    let first = Cluster::start(&cfg, 2);
    for member in &first.members {
        let got = runtime().block_on(pull(
            http::client(),
            member.url(),
            "library/clustered",
            &index,
        ));
        assert_eq!(got, want, "through {}", member.host());
    }
    // Written behind once for the cluster: by whichever member fetched it from upstream, not
    // by the one that streamed it from its owner.
    let uploaded =
        |c: &Cluster| c.metric_sum("dockside_shared_uploads_total{outcome=\"uploaded\"}");
    wait_for("every object written behind", WRITE_BEHIND, || {
        (uploaded(&first) >= keys.len() as f64).then_some(())
    });
    wait_for_keys(&s3, &keys);
    // Every outcome counted: a member that tried to write what another wrote would count a
    // `present` (or more) on top.
    let tried: f64 = first
        .members
        .iter()
        .map(|m| metric_total(m, "dockside_shared_uploads_total"))
        .sum();
    assert_eq!(
        (uploaded(&first), tried),
        (keys.len() as f64, keys.len() as f64),
        "each object written once, and no other write tried"
    );
    drop(first);
    drop(reg);

    // A new cluster, every disk empty and the upstream gone.
    let second = Cluster::start(&cfg, 2);
    let member = &second.members[1];
    let got = runtime().block_on(pull(
        http::client(),
        member.url(),
        "library/clustered",
        &index,
    ));
    assert_eq!(got, want, "through a member of the new cluster");
    let asked: f64 = second
        .members
        .iter()
        .map(|m| metric_total(m, "dockside_upstream_requests_total"))
        .sum();
    assert_eq!(asked, 0.0, "the new cluster asked the upstream for nothing");
}
