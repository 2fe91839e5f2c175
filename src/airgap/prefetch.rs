//! `dockside prefetch`: pull images into the cache ahead of time, exactly as a client pulling
//! them through the server would, by sending [`Mirror::handle`] the requests a client sends.
//! Tag answers, single flight, digest checks and eviction are therefore the server's own, and
//! the admin API can run the same function inside a running server.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{StreamExt, stream};
use http::{Method, StatusCode};
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::inventory;
use crate::mirror::{ApiRequest, ApiResponse, Body, Mirror, Outcome};
use crate::oci::manifest::{self, Platform};
use crate::oci::media::AcceptSet;
use crate::oci::{Digest, ImageRef};

/// Blob downloads at once, across all images: enough to hide one slow layer, few enough not to
/// look like a herd to the upstream.
pub const BLOBS_AT_ONCE: usize = 4;
/// Images worked on at once (their blobs share [`BLOBS_AT_ONCE`]).
const IMAGES_AT_ONCE: usize = 2;
/// How long a fetched blob may take to appear in the store after its last byte was read (the
/// fill verifies, then fsyncs and renames).
const COMMIT_WAIT: Duration = Duration::from_secs(120);

/// Which entries of a multi-platform index to fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlatformChoice {
    All,
    Only(Vec<Platform>),
}

impl Default for PlatformChoice {
    /// `linux/amd64`, whatever machine prefetches: the connected side is rarely the kind of
    /// machine the air-gapped side runs.
    fn default() -> PlatformChoice {
        PlatformChoice::Only(vec![
            Platform::parse("linux/amd64").expect("valid platform"),
        ])
    }
}

impl PlatformChoice {
    /// `os/arch[/variant]`, comma-separated.
    pub fn parse(list: &str) -> Result<PlatformChoice, String> {
        let platforms = list
            .split(',')
            .map(|p| Platform::parse(p.trim()).ok_or_else(|| format!("bad platform {p:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PlatformChoice::Only(platforms))
    }

    pub fn filter(&self) -> Option<&[Platform]> {
        match self {
            PlatformChoice::All => None,
            PlatformChoice::Only(p) => Some(p),
        }
    }
}

impl fmt::Display for PlatformChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlatformChoice::All => f.write_str("all platforms"),
            PlatformChoice::Only(p) => {
                let names: Vec<String> = p.iter().map(Platform::to_string).collect();
                f.write_str(&names.join(","))
            }
        }
    }
}

/// What a prefetch tells whoever shows its progress. `image` is the position in the list.
pub trait Progress: Send + Sync {
    /// The image's manifests are in; its blobs add up to `bytes`.
    fn sized(&self, image: usize, bytes: u64);
    /// `bytes` more of the image's blobs are in the cache (fetched, or found there).
    fn advanced(&self, image: usize, bytes: u64);
    fn finished(&self, image: usize, outcome: &ImageOutcome);
}

/// Shows nothing (the admin API, tests).
pub struct Quiet;

impl Progress for Quiet {
    fn sized(&self, _: usize, _: u64) {}
    fn advanced(&self, _: usize, _: u64) {}
    fn finished(&self, _: usize, _: &ImageOutcome) {}
}

/// Objects one image needed, split by whether they had to come from upstream: fetched for this
/// image, already cached before this prefetch, or shared with another image of the same
/// prefetch that fetched them (a base layer two images of a list have in common).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub manifests_fetched: u64,
    pub manifests_cached: u64,
    pub blobs_fetched: u64,
    pub blobs_cached: u64,
    pub blobs_shared: u64,
    pub bytes_fetched: u64,
    pub bytes_cached: u64,
    pub bytes_shared: u64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.manifests_fetched += other.manifests_fetched;
        self.manifests_cached += other.manifests_cached;
        self.blobs_fetched += other.blobs_fetched;
        self.blobs_cached += other.blobs_cached;
        self.blobs_shared += other.blobs_shared;
        self.bytes_fetched += other.bytes_fetched;
        self.bytes_cached += other.bytes_cached;
        self.bytes_shared += other.bytes_shared;
    }

    fn count(&mut self, source: Source, bytes: u64) {
        let (blobs, total) = match source {
            Source::Fetched => (&mut self.blobs_fetched, &mut self.bytes_fetched),
            Source::Cached => (&mut self.blobs_cached, &mut self.bytes_cached),
            Source::Shared => (&mut self.blobs_shared, &mut self.bytes_shared),
        };
        *blobs += 1;
        *total += bytes;
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} blobs fetched ({}), {} already cached ({})",
            self.blobs_fetched,
            human_bytes(self.bytes_fetched),
            self.blobs_cached,
            human_bytes(self.bytes_cached),
        )?;
        if self.blobs_shared > 0 {
            write!(
                f,
                ", {} shared with another image of this prefetch ({})",
                self.blobs_shared,
                human_bytes(self.bytes_shared)
            )?;
        }
        write!(
            f,
            "; {} manifests fetched, {} cached",
            self.manifests_fetched, self.manifests_cached
        )
    }
}

/// Where one image's blob came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Fetched,
    Cached,
    Shared,
}

#[derive(Debug)]
pub struct ImageOutcome {
    pub image: ImageRef,
    pub result: Result<Counts, String>,
}

#[derive(Debug)]
pub struct PrefetchReport {
    pub images: Vec<ImageOutcome>,
    pub elapsed: Duration,
}

impl PrefetchReport {
    /// Counts over the images that succeeded. A blob two images share counts once: fetched (or
    /// already cached) for one, shared for the other, and shared blobs are left out here.
    pub fn totals(&self) -> Counts {
        let mut total = Counts::default();
        for counts in self.images.iter().filter_map(|i| i.result.as_ref().ok()) {
            total.add(counts);
        }
        total.blobs_shared = 0;
        total.bytes_shared = 0;
        total
    }

    pub fn failed(&self) -> impl Iterator<Item = (&ImageRef, &str)> {
        self.images
            .iter()
            .filter_map(|i| Some((&i.image, i.result.as_ref().err()?.as_str())))
    }

    /// The closing lines for an operator.
    pub fn summary(&self) -> String {
        let failed = self.failed().count();
        let mut out = format!(
            "prefetched {} of {} images in {:.1}s: {}\n",
            self.images.len() - failed,
            self.images.len(),
            self.elapsed.as_secs_f64(),
            self.totals()
        );
        for (image, error) in self.failed() {
            out += &format!("FAILED {image}: {error}\n");
        }
        out
    }
}

/// Fetch every image (its index, the chosen platforms' manifests, their configs and layers)
/// into the cache, and save the eviction order at the end. Never fails as a whole: each image
/// has its own outcome.
pub async fn prefetch(
    mirror: &Arc<Mirror>,
    images: &[ImageRef],
    platforms: &PlatformChoice,
    progress: &dyn Progress,
) -> PrefetchReport {
    let started = Instant::now();
    let blobs = Semaphore::new(BLOBS_AT_ONCE);
    let asked = Mutex::new(HashSet::new());
    let job = Job {
        mirror,
        platforms,
        progress,
        blobs: &blobs,
        asked: &asked,
    };
    let mut outcomes: Vec<(usize, ImageOutcome)> = stream::iter(images.iter().enumerate())
        .map(|(i, image)| {
            let job = &job;
            async move {
                let outcome = ImageOutcome {
                    image: image.clone(),
                    result: job.image(i, image).await,
                };
                progress.finished(i, &outcome);
                (i, outcome)
            }
        })
        .buffer_unordered(IMAGES_AT_ONCE)
        .collect()
        .await;
    outcomes.sort_by_key(|(i, _)| *i);
    let saver = mirror.clone();
    let _ = tokio::task::spawn_blocking(move || saver.save_state()).await;
    PrefetchReport {
        images: outcomes.into_iter().map(|(_, o)| o).collect(),
        elapsed: started.elapsed(),
    }
}

/// Images to prefetch from a list file: one reference per line; blank lines and `#` comments
/// are skipped. An error names the line.
pub fn read_list(path: &Path) -> anyhow::Result<Vec<ImageRef>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    parse_list(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn parse_list(text: &str) -> Result<Vec<ImageRef>, String> {
    let mut images = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let image = ImageRef::parse(line).map_err(|e| format!("line {}: {line}: {e}", n + 1))?;
        images.push(image);
    }
    Ok(images)
}

struct Job<'a> {
    mirror: &'a Arc<Mirror>,
    platforms: &'a PlatformChoice,
    progress: &'a dyn Progress,
    blobs: &'a Semaphore,
    /// Blobs this prefetch found missing and asked the mirror for, by any of its images.
    asked: &'a Mutex<HashSet<Digest>>,
}

/// A manifest as the mirror answered it.
struct Fetched {
    body: Bytes,
    outcome: Outcome,
}

impl Job<'_> {
    async fn image(&self, i: usize, image: &ImageRef) -> Result<Counts, String> {
        let mut counts = Counts::default();
        let manifests = self.manifests(image, &mut counts).await?;
        let mut blobs = BTreeMap::new();
        for body in &manifests {
            blobs.extend(blob_sizes(body));
        }
        self.progress.sized(i, blobs.values().sum());
        let results: Vec<Result<(Source, u64), String>> = stream::iter(blobs)
            .map(|(digest, size)| self.blob(i, image, digest, size))
            .buffer_unordered(BLOBS_AT_ONCE)
            .collect()
            .await;
        for result in results {
            let (source, bytes) = result?;
            counts.count(source, bytes);
        }
        Ok(counts)
    }

    /// The image's top manifest by its reference, then, through any index, the manifests of
    /// the chosen platforms by digest. Returns the image manifests' bodies.
    async fn manifests(&self, image: &ImageRef, counts: &mut Counts) -> Result<Vec<Bytes>, String> {
        let mut queue = vec![image.reference.to_string()];
        let mut seen = HashSet::new();
        let mut images = Vec::new();
        while let Some(reference) = queue.pop() {
            if !seen.insert(reference.clone()) {
                continue;
            }
            let fetched = self.manifest(image, &reference).await?;
            match fetched.outcome {
                Outcome::Miss | Outcome::Coalesced => counts.manifests_fetched += 1,
                _ => counts.manifests_cached += 1,
            }
            let children = manifest::children(&fetched.body)
                .ok_or_else(|| format!("{reference} is not a manifest or index"))?;
            if children.manifests.is_empty() {
                images.push(fetched.body);
                continue;
            }
            let filter = self.platforms.filter();
            let wanted: Vec<String> = children
                .manifests
                .iter()
                .filter(|(_, p)| inventory::wanted(filter, p.as_ref()))
                .map(|(d, _)| d.to_string())
                .collect();
            if wanted.is_empty() {
                return Err(format!("the index has no manifest for {}", self.platforms));
            }
            queue.extend(wanted);
        }
        Ok(images)
    }

    async fn manifest(&self, image: &ImageRef, reference: &str) -> Result<Fetched, String> {
        let path = format!("/v2/{}/manifests/{reference}", image.name);
        let resp = self.mirror.handle_internal(&request(image, path)).await;
        if resp.status != StatusCode::OK {
            return Err(failure(&resp));
        }
        match resp.body {
            Body::Full(body) => Ok(Fetched {
                body,
                outcome: resp.outcome,
            }),
            _ => Err(format!("{reference}: the mirror answered without a body")),
        }
    }

    /// One blob into the store: found there, or fetched through the mirror and read to the end
    /// (which completes the fill), then waited for until the fill has committed it. A blob
    /// another image of this prefetch asked for first is `Shared`, whether it is still being
    /// fetched or already in the store.
    async fn blob(
        &self,
        i: usize,
        image: &ImageRef,
        digest: Digest,
        size: u64,
    ) -> Result<(Source, u64), String> {
        let store = self.mirror.store();
        let asked_before = |digest: &Digest| self.asked.lock().expect("lock").contains(digest);
        if let Some(len) = store.stat(&digest).await.map_err(|e| e.to_string())? {
            self.progress.advanced(i, len);
            let source = match asked_before(&digest) {
                true => Source::Shared,
                false => Source::Cached,
            };
            return Ok((source, len));
        }
        let first = self.asked.lock().expect("lock").insert(digest.clone());
        let usage = self.mirror.budget().usage();
        if size > usage.max_bytes.saturating_sub(usage.pinned_bytes) {
            return Err(format!(
                "blob {digest} ({}) cannot be kept in a cache of {} (cache.max_size, less what is pinned)",
                human_bytes(size),
                human_bytes(usage.max_bytes)
            ));
        }
        let _permit = self.blobs.acquire().await.map_err(|e| e.to_string())?;
        let path = format!("/v2/{}/blobs/{digest}", image.name);
        let resp = self.mirror.handle_internal(&request(image, path)).await;
        if resp.status != StatusCode::OK {
            return Err(failure(&resp));
        }
        let Body::Blob(mut body) = resp.body else {
            return Err(format!("{digest}: the mirror answered without a body"));
        };
        let mut read = 0;
        while let Some(chunk) = body
            .next_chunk()
            .await
            .map_err(|e| format!("blob {digest}: {e}"))?
        {
            read += chunk.len() as u64;
            self.progress.advanced(i, chunk.len() as u64);
        }
        wait_committed(self.mirror, &digest).await?;
        let source = match (resp.outcome, first) {
            (Outcome::Miss, _) => Source::Fetched,
            (_, false) => Source::Shared,
            // Joined a fill someone else started (a client of the server), or found it
            // committed meanwhile.
            (_, true) => Source::Cached,
        };
        Ok((source, read))
    }
}

/// A GET as a client would send it; a host in the reference names the upstream, as `ns` does
/// for containerd.
fn request(image: &ImageRef, path: String) -> ApiRequest {
    ApiRequest {
        method: Method::GET,
        path,
        query: image.host.as_ref().map(|h| format!("ns={h}")),
        accept: vec![AcceptSet::ALL.header_value()],
        range: None,
        authorization: None,
        peer: Default::default(),
    }
}

/// The mirror's reason (it names the manifest or blob), with the status it answered.
fn failure(resp: &ApiResponse) -> String {
    let why = resp.error.as_deref().unwrap_or("no reason given");
    format!("{why} ({})", resp.status.as_u16())
}

/// The fill that served a blob commits it to the store after its last byte is verified; a
/// prefetch is only done once it is there (else a second run, or an export, would miss it).
async fn wait_committed(mirror: &Mirror, digest: &Digest) -> Result<(), String> {
    let settled = tokio::time::timeout(COMMIT_WAIT, mirror.fills().settled(digest)).await;
    let kept = match settled {
        Ok(()) => mirror
            .store()
            .stat(digest)
            .await
            .map_err(|e| e.to_string())?,
        Err(_) => None,
    };
    match kept {
        Some(_) => Ok(()),
        None => Err(format!(
            "blob {digest} was fetched but not kept in the cache (see the log)"
        )),
    }
}

#[derive(Deserialize)]
struct SizedDescriptor {
    digest: String,
    #[serde(default)]
    size: u64,
}

#[derive(Deserialize)]
struct ImageShape {
    #[serde(default)]
    config: Option<SizedDescriptor>,
    #[serde(default)]
    layers: Vec<SizedDescriptor>,
}

/// An image manifest's config and layers with the sizes it declares (for progress only; the
/// bytes themselves are checked against the digest).
fn blob_sizes(body: &[u8]) -> Vec<(Digest, u64)> {
    let Ok(shape) = serde_json::from_slice::<ImageShape>(body) else {
        return Vec::new();
    };
    shape
        .config
        .iter()
        .chain(&shape.layers)
        .filter_map(|d| Some((Digest::parse(&d.digest).ok()?, d.size)))
        .collect()
}

/// Sizes for operators, as the status page writes them too.
pub use crate::config::human_bytes;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_skips_comments_and_names_the_bad_line() {
        let images = parse_list("# base images\nalpine:3.19\n\n  registry.corp:5000/app@sha256:0000000000000000000000000000000000000000000000000000000000000000 # pinned\n").unwrap();
        let shown: Vec<String> = images.iter().map(ImageRef::to_string).collect();
        assert_eq!(
            shown,
            vec![
                "alpine:3.19".to_string(),
                format!("registry.corp:5000/app@sha256:{}", "0".repeat(64))
            ]
        );
        let err = parse_list("alpine\nBad Name\n").unwrap_err();
        assert!(err.starts_with("line 2: Bad Name"), "{err}");
    }

    #[test]
    fn platforms_default_to_linux_amd64_and_parse_lists() {
        assert_eq!(PlatformChoice::default().to_string(), "linux/amd64");
        let two = PlatformChoice::parse("linux/amd64, linux/arm64/v8").unwrap();
        assert_eq!(two.to_string(), "linux/amd64,linux/arm64/v8");
        assert!(PlatformChoice::parse("linux").is_err());
        assert_eq!(PlatformChoice::All.filter(), None);
    }

    #[test]
    fn blob_sizes_reads_config_and_layers() {
        let config = Digest::of(b"c");
        let layer = Digest::of(b"l");
        let body = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{config}","size":1}},
                "layers":[{{"digest":"{layer}","size":42}},{{"digest":"md5:x","size":3}}]}}"#
        );
        assert_eq!(blob_sizes(body.as_bytes()), vec![(config, 1), (layer, 42)]);
        assert!(blob_sizes(b"not json").is_empty());
    }

    #[test]
    fn totals_add_up_successes_and_the_summary_names_failures() {
        let ok = Counts {
            blobs_fetched: 2,
            bytes_fetched: 2048,
            blobs_cached: 1,
            bytes_cached: 10,
            manifests_fetched: 1,
            manifests_cached: 0,
            ..Counts::default()
        };
        let report = PrefetchReport {
            images: vec![
                ImageOutcome {
                    image: ImageRef::parse("a:1").unwrap(),
                    result: Ok(ok),
                },
                ImageOutcome {
                    image: ImageRef::parse("b:1").unwrap(),
                    result: Err("manifest unknown: library/b:1 (404)".into()),
                },
                ImageOutcome {
                    image: ImageRef::parse("c:1").unwrap(),
                    result: Ok(ok),
                },
            ],
            elapsed: Duration::from_secs(1),
        };
        assert_eq!(report.totals().blobs_fetched, 4);
        assert_eq!(report.totals().bytes_fetched, 4096);
        assert_eq!(report.totals().blobs_shared, 0, "counted where fetched");
        let shared = Counts {
            blobs_shared: 1,
            bytes_shared: 3,
            ..ok
        };
        assert!(
            shared.to_string().contains(
                "1 already cached (10 B), 1 shared with another image of this prefetch (3 B);"
            ),
            "{shared}"
        );
        assert!(!ok.to_string().contains("shared"), "{ok}");
        let summary = report.summary();
        assert!(summary.starts_with("prefetched 2 of 3 images"), "{summary}");
        assert!(summary.contains("4 blobs fetched (4.0 KiB)"), "{summary}");
        assert!(
            summary.contains("FAILED b:1: manifest unknown"),
            "{summary}"
        );
    }

    #[test]
    fn human_bytes_picks_a_unit() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
