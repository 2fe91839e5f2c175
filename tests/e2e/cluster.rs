//! Several real dockside processes as one cache (`cluster:`), in front of a real
//! docker-registry: one upstream fetch per blob and per tag for the whole cluster, fail-over
//! when the owner dies mid-fill, a new member served by the old ones, and refused proofs.

use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::cache::new_lines;
use crate::support::cluster::{Cluster, SECRET};
use crate::support::dockside::{Config, Dockside, Upstream};
use crate::support::fault_proxy::{FaultProxy, Mode};
use crate::support::http::{self, MANIFEST_ACCEPT};
use crate::support::image::{Format, Index, random_bytes};
use crate::support::registry::{Auth, Registry, count};
use crate::support::{serial, skopeo, wait_for};

/// What one client got: per object, (status, sha256 of the body).
pub(crate) type Pulled = Vec<(String, u16, String)>;

pub(crate) fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The pull workflow of one client: the index by tag, the amd64 manifest by digest, then its
/// config and layers. Returns what each request answered.
pub(crate) async fn pull(
    client: reqwest::Client,
    base: String,
    repo: &str,
    index: &Index,
) -> Pulled {
    let img = index.image("amd64");
    let mut paths = vec![
        format!("/v2/{repo}/manifests/v1"),
        format!("/v2/{repo}/manifests/{}", img.manifest.digest),
    ];
    paths.extend(
        img.blobs()
            .iter()
            .map(|b| format!("/v2/{repo}/blobs/{}", b.digest)),
    );
    let mut out = Vec::new();
    for path in paths {
        let resp = client
            .get(format!("{base}{path}"))
            .header("accept", MANIFEST_ACCEPT)
            .send()
            .await
            .expect("GET");
        let status = resp.status().as_u16();
        let body = resp.bytes().await.expect("body");
        out.push((path, status, sha(&body)));
    }
    out
}

pub(crate) fn expected(repo: &str, index: &Index) -> Pulled {
    let img = index.image("amd64");
    let mut out = vec![
        (
            format!("/v2/{repo}/manifests/v1"),
            200,
            index.manifest.digest.clone(),
        ),
        (
            format!("/v2/{repo}/manifests/{}", img.manifest.digest),
            200,
            img.manifest.digest.clone(),
        ),
    ];
    out.extend(img.blobs().iter().map(|b| {
        (
            format!("/v2/{repo}/blobs/{}", b.digest),
            200,
            b.digest.clone(),
        )
    }));
    out
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn thirty_clients_on_three_members_cost_one_upstream_fetch_per_object_and_a_new_member_none() {
    let _heavy = serial::heavy();
    let reg = Registry::start(Auth::None);
    let index = Index::generate(
        700,
        &[3 << 20, 1 << 20, 20_000],
        Format::Oci,
        &["amd64", "arm64"],
    );
    skopeo::push(&reg, "library/shared", "v1", &index);
    let cfg = Config::new(vec![Upstream::hub(&reg)]);
    let cluster = Cluster::start(&cfg, 3);
    let before = reg.access_log();

    let bases: Vec<String> = cluster.members.iter().map(Dockside::url).collect();
    let results: Vec<Pulled> = runtime().block_on(async {
        let client = http::client();
        let tasks: Vec<_> = (0..30)
            .map(|i| {
                let (client, base, index) = (client.clone(), bases[i % 3].clone(), index.clone());
                tokio::spawn(async move { pull(client, base, "library/shared", &index).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("client task"));
        }
        out
    });
    let want = expected("library/shared", &index);
    for (i, got) in results.iter().enumerate() {
        assert_eq!(got, &want, "client {i} (through member {})", i % 3);
    }

    let lines = new_lines(&before, &reg.access_log());
    let img = index.image("amd64");
    assert_eq!(
        count(&lines, "GET", "/v2/library/shared/manifests/v1"),
        1,
        "one manifest fetch for the tag: {lines:?}"
    );
    let by_digest = format!("/v2/library/shared/manifests/{}", img.manifest.digest);
    assert_eq!(count(&lines, "GET", &by_digest), 1, "{lines:?}");
    for b in img.blobs() {
        let path = format!("/v2/library/shared/blobs/{}", b.digest);
        assert_eq!(
            count(&lines, "GET", &path),
            1,
            "one upstream GET of {}: {lines:?}",
            b.digest
        );
    }
    assert_eq!(
        lines.len(),
        2 + img.blobs().len(),
        "nothing else upstream: {lines:?}"
    );
    // Each member fetched some objects and streamed the others from their owners.
    let owned = cluster.metric_sum("dockside_cluster_fills_total{role=\"owned\"}");
    let forwarded = cluster.metric_sum("dockside_cluster_fills_total{role=\"forwarded\"}");
    assert_eq!(owned as usize, img.blobs().len(), "one owned fill per blob");
    assert_eq!(
        forwarded as usize,
        2 * img.blobs().len(),
        "the other two members forwarded"
    );
    for d in &cluster.members {
        assert_eq!(
            d.metric("dockside_cluster_members{state=\"up\"}"),
            Some(3.0)
        );
    }

    // A real client through each member: warm, nothing more upstream.
    for d in &cluster.members {
        crate::cache::pull_and_check(d, "library/shared:v1", img);
    }
    // A fourth, empty member: every object comes from the members that hold it.
    let before = reg.access_log();
    let fourth = cluster.join(&cfg);
    crate::cache::pull_and_check(&fourth, "library/shared:v1", img);
    let lines = new_lines(&before, &reg.access_log());
    assert_eq!(
        lines,
        [],
        "a new member pulls a warm image without upstream requests"
    );
    let from_peers = fourth
        .metric("dockside_peer_requests_total{direction=\"sent\",mode=\"fill\",outcome=\"ok\"}")
        .unwrap_or(0.0)
        + fourth
            .metric("dockside_peer_requests_total{direction=\"sent\",mode=\"held\",outcome=\"ok\"}")
            .unwrap_or(0.0);
    assert!(
        from_peers >= 5.0,
        "tag, 2 manifests, config and layers from peers: {from_peers}"
    );
}

#[test]
fn the_owner_killed_mid_fill_costs_one_resume_not_a_restart() {
    let _heavy = serial::heavy();
    let reg = Registry::start(Auth::None);
    let size = 500 << 20;
    let data = random_bytes(701, size);
    let digest = reg.push_blob("library/big", &data);
    drop(data);
    // The owner's upstream GET stops halfway, so the test can kill it there.
    let proxy = FaultProxy::start(&reg, Mode::StallOnce(size / 2));
    let cfg = Config::new(vec![Upstream::new("docker.io", &reg)]);
    let mut cfg = cfg;
    cfg.upstreams[0].url = proxy.url();
    let mut cluster = Cluster::start(&cfg, 3);
    let url = |m: usize| format!("{}/v2/library/big/blobs/{digest}", cluster.members[m].url());
    let urls: Vec<String> = (0..3).map(url).collect();
    let upstream_series =
        "dockside_origin_received_bytes_total{kind=\"upstream\",origin=\"docker.io\"}";

    let rt = runtime();
    let client = http::client();
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let (client, url) = (client.clone(), urls[i % 3].clone());
            rt.spawn(async move { fetch(&client, &url).await })
        })
        .collect();
    // Wait for the owner to stall halfway, then kill it.
    let owner = wait_for(
        "the owner to reach the stall",
        Duration::from_secs(60),
        || {
            (0..3).find(|&m| {
                cluster.members[m]
                    .metric(upstream_series)
                    .is_some_and(|b| b >= (size / 2) as f64)
            })
        },
    );
    let killed = cluster.members.remove(owner);
    let _dir = killed.crash();
    let results: Vec<Result<(u16, String), String>> = rt.block_on(async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("client task"));
        }
        out
    });
    let survivors: Vec<String> = cluster
        .members
        .iter()
        .map(|d| format!("{}/v2/library/big/blobs/{digest}", d.url()))
        .collect();
    let mut retried = 0;
    for (i, result) in results.into_iter().enumerate() {
        let through_killed = i % 3 == owner;
        let result = match result {
            Ok(done) => done,
            Err(e) => {
                assert!(
                    through_killed,
                    "client {i} of a surviving member failed: {e}"
                );
                retried += 1;
                rt.block_on(fetch(&client, &survivors[i % 2]))
                    .expect("retry through a survivor")
            }
        };
        assert_eq!(result, (200, digest.clone()), "client {i}");
    }
    assert!(retried <= 10, "only the killed member's clients retry");
    let gets = proxy.blob_gets(&digest);
    let bytes = proxy.body_bytes();
    eprintln!(
        "MEASURE cluster fail-over: owner killed at {} MiB of {} MiB; upstream GETs {}, {} MiB upstream ({:.2}x), {retried} clients retried",
        (size / 2) >> 20,
        size >> 20,
        gets.len(),
        bytes >> 20,
        bytes as f64 / size as f64
    );
    assert!(
        gets.len() <= 2,
        "at most the owner's GET and one resume: {gets:?}"
    );
    assert!(
        gets.iter().skip(1).all(|g| g.range.is_some()),
        "the second GET resumes: {gets:?}"
    );
    assert!(
        bytes as f64 <= 1.5 * size as f64,
        "{bytes} bytes upstream for a {size}-byte blob"
    );
}

/// GET a blob to the end; its status and digest, or why it broke.
async fn fetch(client: &reqwest::Client, url: &str) -> Result<(u16, String), String> {
    let mut resp = client.get(url).send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let mut h = Sha256::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        h.update(&chunk);
    }
    Ok((status, format!("sha256:{}", hex::encode(h.finalize()))))
}

#[test]
fn a_peer_request_without_a_valid_proof_is_refused_and_client_auth_holds() {
    let reg = Registry::start(Auth::None);
    let data = random_bytes(702, 50_000);
    let digest = reg.push_blob("library/guarded", &data);
    let htpasswd = tempfile::NamedTempFile::new().unwrap();
    let line = std::process::Command::new("htpasswd")
        .args(["-Bbn", "alice", "wonderland"])
        .output()
        .expect("htpasswd");
    std::fs::write(htpasswd.path(), &line.stdout).unwrap();
    let mut cfg = Config::new(vec![Upstream::hub(&reg)]);
    cfg.extra_yaml = format!(
        "client_auth:\n  htpasswd: \"{}\"\n",
        htpasswd.path().display()
    );
    let cluster = Cluster::start(&cfg, 2);
    let before = reg.access_log();
    let path = format!("/v2/library/guarded/blobs/{digest}");
    let (a, b) = (&cluster.members[0], &cluster.members[1]);

    // Claims of membership that do not hold, each refused before anything is fetched.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let claims: Vec<Vec<(&str, String)>> = vec![
        vec![("x-dockside-peer", a.host())],
        vec![
            ("x-dockside-peer", a.host()),
            ("x-dockside-peer-mode", "fill".into()),
            ("x-dockside-peer-time", now.clone()),
            ("x-dockside-peer-proof", "00".repeat(32)),
        ],
        // Signed with another secret.
        signed("another secret, not the cluster's one", &a.host(), &path),
    ];
    for claim in &claims {
        let headers: Vec<(&str, &str)> = claim.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = http::request("GET", &format!("{}{path}", b.url()), &headers, None).unwrap();
        assert_eq!(r.status, 401, "{claim:?}: {}", r.snippet());
        assert_eq!(r.error_code().as_deref(), Some("UNAUTHORIZED"));
        assert!(r.text().contains("peer request refused"), "{}", r.text());
    }
    assert_eq!(
        new_lines(&before, &reg.access_log()),
        [],
        "nothing fetched for a refused peer"
    );
    // The right proof is taken in place of client credentials...
    let good = signed(SECRET, &a.host(), &path);
    let headers: Vec<(&str, &str)> = good.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = http::request("GET", &format!("{}{path}", b.url()), &headers, None).unwrap();
    assert_eq!((r.status, sha(&r.body)), (200, digest.clone()));
    // ...while a client still needs its own, on every member, and gets through with them.
    for d in &cluster.members {
        let r = http::get(&format!("{}{path}", d.url())).unwrap();
        assert_eq!(r.status, 401, "no credentials");
        let auth = format!("Basic {}", base64_of("alice:wonderland"));
        let r = http::request(
            "GET",
            &format!("{}{path}", d.url()),
            &[("Authorization", &auth)],
            None,
        )
        .unwrap();
        assert_eq!((r.status, sha(&r.body)), (200, digest.clone()));
    }
}

/// The four peer headers for a GET of `path`, signed with `secret` by dockside's own signer.
fn signed(secret: &str, from: &str, path: &str) -> Vec<(&'static str, String)> {
    use dockside::cluster::proof::{Mode as PeerMode, Signer};
    use dockside::config::{PeerAddr, Secret};
    let signer = Signer::new(&Secret::new(secret.into()));
    signer
        .sign("GET", path, &PeerAddr::parse(from).unwrap(), PeerMode::Fill)
        .into_iter()
        .collect()
}

fn base64_of(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[test]
fn a_tag_is_revalidated_once_for_the_cluster_and_served_stale_across_the_hop() {
    let mut reg = Registry::start(Auth::None);
    let img = crate::support::image::Image::generate(703, &[40_000], Format::Oci);
    skopeo::push(&reg, "library/steady", "v1", &img);
    let cfg = Config::new(vec![Upstream::hub(&reg)]).tag_ttl("2s");
    let cluster = Cluster::start(&cfg, 3);
    let tag_url = |d: &Dockside| format!("{}/v2/library/steady/manifests/v1", d.url());
    let tag_path = "/v2/library/steady/manifests/v1";
    for d in &cluster.members {
        crate::cache::pull_and_check(d, "library/steady:v1", &img);
    }
    // Past tag_ttl, every member asked once: the tag's owner revalidates it, once.
    std::thread::sleep(Duration::from_millis(2500));
    let before = reg.access_log();
    for d in &cluster.members {
        let r = http::get_manifest(&tag_url(d));
        assert_eq!((r.status, sha(&r.body)), (200, img.manifest.digest.clone()));
    }
    let lines = new_lines(&before, &reg.access_log());
    assert_eq!(
        count(&lines, "HEAD", tag_path),
        1,
        "one revalidation for the cluster: {lines:?}"
    );
    assert_eq!(lines.len(), 1, "{lines:?}");

    // The upstream gone and the tag stale again: every member still answers, from the owner's
    // stale answer or its own.
    reg.kill();
    std::thread::sleep(Duration::from_millis(2500));
    for d in &cluster.members {
        crate::cache::pull_and_check(d, "library/steady:v1", &img);
    }
}
