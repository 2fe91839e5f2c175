//! The mirror's request logic, independent of the HTTP server: a parsed request in, a response
//! (status, headers, body source) out. Manifests are small and kept in memory as well as on disk;
//! blobs stream from disk or from a fill in flight.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use http::{Method, StatusCode};
use moka::sync::Cache;
use tracing::{debug, warn};

use crate::client_auth::ClientAuth;
use crate::config::Config;
use crate::error::ApiError;
use crate::fill::{BlobBody, BlobSource, Fills, content_length, wait_started};
use crate::inventory;
use crate::metrics::Metrics;
use crate::oci::manifest::MANIFEST_LIMIT;
use crate::oci::media::{self, AcceptSet};
use crate::oci::range::{Span, parse_range};
use crate::oci::route::{self, Route, Target};
use crate::oci::{Digest, Reference, RepoName, Tag};
use crate::singleflight::SingleFlight;
use crate::store::{BlobStore, DiskStore};
use crate::tags::{SavedTag, TagCache, TagEntry, TagKey};
use crate::upstream::{Upstream, UpstreamError, UpstreamErrorKind, Upstreams};

/// Tag lists and referrer indexes passed through from upstream.
const PASSTHROUGH_LIMIT: u64 = 16 * 1024 * 1024;
/// Manifests kept in memory, by total size.
const MEMORY_MANIFESTS: u64 = 64 * 1024 * 1024;
/// How long a stale tag is served without asking a failing upstream again.
const STALE_RETRY: Duration = Duration::from_secs(30);

/// A request as the mirror needs it.
pub struct ApiRequest {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub accept: Vec<String>,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

pub enum Body {
    Empty,
    Full(Bytes),
    Blob(BlobBody),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered from the cache.
    Hit,
    /// Fetched from upstream for this request.
    Miss,
    /// Joined a fetch another request started.
    Coalesced,
    /// Served from cache because the upstream failed.
    Stale,
    /// Passed through from upstream without caching.
    Pass,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Coalesced => "coalesced",
            Outcome::Stale => "stale",
            Outcome::Pass => "pass",
            Outcome::Error => "error",
        }
    }

    /// Where the body bytes came from, for the bytes-served metric.
    pub fn source(self) -> &'static str {
        match self {
            Outcome::Miss | Outcome::Coalesced => "fill",
            Outcome::Pass => "upstream",
            _ => "cache",
        }
    }
}

pub struct ApiResponse {
    pub status: StatusCode,
    pub headers: Vec<(&'static str, String)>,
    pub body: Body,
    pub upstream: Option<Arc<str>>,
    pub kind: &'static str,
    pub outcome: Outcome,
    /// For error answers: why, for the request log.
    pub error: Option<String>,
}

impl ApiResponse {
    fn error(err: &ApiError) -> ApiResponse {
        let mut headers = err.headers();
        headers.push(("Content-Type", "application/json".into()));
        ApiResponse {
            status: err.status(),
            headers,
            body: Body::Full(err.body()),
            upstream: None,
            kind: "invalid",
            outcome: Outcome::Error,
            error: Some(err.to_string()),
        }
    }

    fn new(status: StatusCode, outcome: Outcome) -> ApiResponse {
        ApiResponse {
            status,
            headers: Vec::new(),
            body: Body::Empty,
            upstream: None,
            kind: "invalid",
            outcome,
            error: None,
        }
    }
}

#[derive(Debug)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub body: Bytes,
}

type ManifestResult = Result<(Arc<Manifest>, Outcome), ApiError>;

pub struct Mirror {
    upstreams: Upstreams,
    store: Arc<DiskStore>,
    fills: Fills,
    tags: TagCache,
    manifests: Cache<Digest, Arc<Manifest>>,
    manifest_flights: SingleFlight<Digest, Result<Arc<Manifest>, ApiError>>,
    tag_flights: SingleFlight<TagKey, ManifestResult>,
    /// `client_auth`; `None`: open to anyone who can connect.
    client_auth: Option<ClientAuth>,
    /// Set once shutdown has begun.
    stopping: std::sync::atomic::AtomicBool,
    /// `cache.pin`, resolved to upstream and repository.
    pins: Vec<(Arc<str>, RepoName, Reference)>,
    metrics: Arc<Metrics>,
}

pub enum PurgeTarget {
    Digest(Digest),
    /// A whole repository, or one of its tags.
    Repository {
        upstream: Arc<str>,
        name: RepoName,
        tag: Option<Tag>,
    },
}

#[derive(Debug, Default, serde::Serialize)]
pub struct PurgeReport {
    /// Tags forgotten.
    pub tags: usize,
    /// Objects deleted, and their bytes.
    pub objects: usize,
    pub bytes: u64,
}

/// How often the eviction order is saved and pins are looked up again.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(30);

impl Mirror {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Mirror>> {
        Mirror::open(config, metrics, DiskStore::open)
    }

    /// For a server taking over from a running one (`serve --upgrade`): see
    /// [`DiskStore::open_beside_running`].
    pub fn new_beside_running(
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Mirror>> {
        Mirror::open(config, metrics, DiskStore::open_beside_running)
    }

    fn open(
        config: &Config,
        metrics: Arc<Metrics>,
        open_store: fn(&Path, u64) -> std::io::Result<DiskStore>,
    ) -> anyhow::Result<Arc<Mirror>> {
        let cache_error = |e| anyhow::anyhow!("cache.dir {}: {e}", config.cache.dir.display());
        let store =
            Arc::new(open_store(&config.cache.dir, config.cache.max_size).map_err(cache_error)?);
        let upstreams = Upstreams::new(config, metrics.clone())?;
        let mut pins = Vec::new();
        for image in &config.cache.pin {
            let (upstream, name) = upstreams
                .resolve(image.host.as_deref(), &image.name)
                .map_err(|e| anyhow::anyhow!("cache.pin {image}: {e}"))?;
            pins.push((upstream.name.clone(), name, image.reference.clone()));
        }
        let mirror = Mirror {
            upstreams,
            pins,
            stopping: Default::default(),
            client_auth: config.client_auth.as_ref().map(ClientAuth::new),
            fills: Fills::new(store.clone(), metrics.clone()),
            store,
            tags: TagCache::open(&config.cache.dir, 100_000).map_err(cache_error)?,
            manifests: Cache::builder()
                .max_capacity(MEMORY_MANIFESTS)
                .weigher(|_, m: &Arc<Manifest>| m.body.len().try_into().unwrap_or(u32::MAX))
                .build(),
            manifest_flights: SingleFlight::new(),
            tag_flights: SingleFlight::new(),
            metrics,
        };
        mirror.refresh_pins();
        mirror.metrics.record_usage(mirror.store.usage());
        Ok(Arc::new(mirror))
    }

    pub fn set_stopping(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn tags(&self) -> &TagCache {
        &self.tags
    }

    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// Delete cached content: one object, or a repository's (or one tag's) saved answers and
    /// every object no other saved tag still needs.
    pub async fn purge(self: &Arc<Self>, target: PurgeTarget) -> Result<PurgeReport, ApiError> {
        let (doomed, tags) = match target {
            PurgeTarget::Digest(digest) => (vec![digest], Vec::new()),
            PurgeTarget::Repository {
                upstream,
                name,
                tag,
            } => {
                let this = self.clone();
                let (up, n, t) = (upstream.clone(), name.clone(), tag.clone());
                let (doomed, tags) = tokio::task::spawn_blocking(move || {
                    let all = this.tags.list();
                    let matches = |s: &SavedTag| {
                        *s.upstream == *up && s.name == n && t.as_ref().is_none_or(|t| s.tag == *t)
                    };
                    let doomed = inventory::exclusive_objects(&this.store, &all, matches);
                    let mut tags: Vec<Tag> =
                        all.into_iter().filter(matches).map(|s| s.tag).collect();
                    tags.dedup();
                    (doomed, tags)
                })
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
                for tag in &tags {
                    self.tags.remove_tag(&upstream, &name, tag);
                }
                (doomed.into_iter().collect(), tags)
            }
        };
        let mut report = PurgeReport {
            tags: tags.len(),
            ..PurgeReport::default()
        };
        for digest in doomed {
            self.manifests.invalidate(&digest);
            let removed = self.store.remove(&digest).await;
            if let Some(len) = removed.map_err(|e| ApiError::Internal(e.to_string()))? {
                report.objects += 1;
                report.bytes += len;
            }
        }
        self.metrics.record_usage(self.store.usage());
        Ok(report)
    }

    /// Find every object of the pinned images in the cache and protect it from eviction.
    /// Blocking (reads manifests from disk).
    pub fn refresh_pins(&self) {
        if self.pins.is_empty() {
            return;
        }
        let mut pinned = HashSet::new();
        for (upstream, name, reference) in &self.pins {
            let roots = inventory::roots(&self.tags, upstream, name, reference);
            pinned.extend(inventory::closure(&self.store, roots, None).all().cloned());
        }
        self.store.set_pins(pinned);
        self.metrics.record_usage(self.store.usage());
    }

    /// A manifest of a pinned repository arrived: look the pins up again, so its blobs are
    /// pinned as they arrive (a pin covers digests not cached yet).
    fn watch_pins(self: &Arc<Self>, upstream: &Arc<str>, name: &RepoName) {
        if self.pins.iter().any(|(u, n, _)| u == upstream && n == name) {
            let this = self.clone();
            tokio::task::spawn_blocking(move || this.refresh_pins());
        }
    }

    /// Save what must outlive the process: the eviction order. Blocking.
    pub fn save_state(&self) {
        match self.store.save_order() {
            Ok(true) => debug!("eviction order saved"),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "could not save the eviction order"),
        }
    }

    /// A thread that saves state and refreshes pins every [`MAINTENANCE_EVERY`], for as long
    /// as the mirror lives.
    pub fn start_maintenance(self: &Arc<Self>) {
        let mirror = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("dockside-maintenance".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(MAINTENANCE_EVERY);
                    let Some(mirror) = mirror.upgrade() else {
                        return;
                    };
                    mirror.refresh_pins();
                    mirror.save_state();
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "could not start the maintenance thread; eviction order is saved at exit only");
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn store(&self) -> &Arc<DiskStore> {
        &self.store
    }

    /// Answer one registry request from a client (authenticated when `client_auth` is set).
    pub async fn handle(self: &Arc<Self>, req: &ApiRequest) -> ApiResponse {
        let client = match &self.client_auth {
            Some(auth) => match auth.authenticate(req.authorization.as_deref()).await {
                Ok(client) => Some(client),
                Err(e) => return with_api_version(ApiResponse::error(&e)),
            },
            None => None,
        };
        self.serve(req, client.as_deref()).await
    }

    /// Answer a request dockside makes of itself (prefetch, the admin API): no client, so no
    /// authentication and no access limits.
    pub async fn handle_internal(self: &Arc<Self>, req: &ApiRequest) -> ApiResponse {
        self.serve(req, None).await
    }

    async fn serve(self: &Arc<Self>, req: &ApiRequest, client: Option<&str>) -> ApiResponse {
        let route = match route::parse(&req.method, &req.path, req.query.as_deref()) {
            Ok(route) => route,
            Err(e) => return ApiResponse::error(&e.into()),
        };
        let mut resp = with_api_version(self.dispatch(&route, req, client).await);
        if let Some(ns) = &route.ns {
            resp.headers.push(("OCI-Namespace", ns.to_string()));
        }
        if route.head {
            resp.body = Body::Empty;
        }
        if let Some(upstream) = &resp.upstream {
            self.metrics
                .requests
                .with_label_values(&[upstream, resp.kind, resp.outcome.as_str()])
                .inc();
        }
        resp
    }

    async fn dispatch(
        self: &Arc<Self>,
        route: &Route,
        req: &ApiRequest,
        client: Option<&str>,
    ) -> ApiResponse {
        let (name, kind) = match &route.target {
            Target::Ping => {
                let mut resp = ApiResponse::new(StatusCode::OK, Outcome::Hit);
                resp.headers
                    .push(("Content-Type", "application/json".into()));
                resp.body = Body::Full(Bytes::from_static(b"{}"));
                resp.kind = "ping";
                return resp;
            }
            Target::Manifest { name, .. } => (name, "manifest"),
            Target::Blob { name, .. } => (name, "blob"),
            Target::TagsList { name } => (name, "tags_list"),
            Target::Referrers { name, .. } => (name, "referrers"),
        };
        // A host prefix with a port can only name an upstream, so it is resolved like `ns`.
        let named = route.ns.as_deref().or(route.host_prefix.as_deref());
        let (upstream, name) = match self.upstreams.resolve(named, name) {
            Ok(resolved) => resolved,
            Err(e) => return ApiResponse::error(&e.into()),
        };
        if let (Some(auth), Some(client)) = (&self.client_auth, client) {
            if !auth.may_read(client, &upstream.name) {
                let denied =
                    ApiError::ClientDenied(format!("{client} may not pull from {}", upstream.name));
                return ApiResponse::error(&denied);
            }
        }
        let result = match &route.target {
            Target::Manifest { reference, .. } => {
                let accept = AcceptSet::from_headers(req.accept.iter().map(String::as_str));
                self.manifest(&upstream, &name, reference, accept)
                    .await
                    .map(|(m, outcome)| manifest_response(&m, outcome))
            }
            Target::Blob { digest, .. } => {
                if route.head {
                    self.blob_head(&upstream, &name, digest).await
                } else {
                    self.blob(&upstream, &name, digest, req.range.as_deref())
                        .await
                }
            }
            Target::TagsList { name: asked } => {
                let call = Passthrough {
                    suffix: "tags/list".to_string(),
                    query: route.query.as_deref(),
                    accept: None,
                    asked,
                    not_found: ApiError::NameUnknown(format!(
                        "repository {name} is not known to {}",
                        upstream.name
                    )),
                };
                self.passthrough(&upstream, &name, call).await
            }
            Target::Referrers {
                name: asked,
                digest,
            } => {
                let call = Passthrough {
                    suffix: format!("referrers/{digest}"),
                    query: route.query.as_deref(),
                    accept: req.accept.first().map(String::as_str),
                    asked,
                    not_found: ApiError::ManifestUnknown {
                        name: name.to_string(),
                        reference: digest.to_string(),
                    },
                };
                self.passthrough(&upstream, &name, call).await
            }
            Target::Ping => unreachable!("answered above"),
        };
        let mut resp = result.unwrap_or_else(|e| ApiResponse::error(&e));
        resp.upstream = Some(upstream.name.clone());
        resp.kind = kind;
        resp
    }

    async fn manifest(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        name: &RepoName,
        reference: &Reference,
        accept: AcceptSet,
    ) -> ManifestResult {
        match reference {
            Reference::Digest(digest) => self.manifest_by_digest(upstream, name, digest).await,
            Reference::Tag(tag) => self.manifest_by_tag(upstream, name, tag, accept).await,
        }
    }

    /// A manifest from memory, else from disk.
    async fn cached_manifest(&self, digest: &Digest) -> Option<Arc<Manifest>> {
        if let Some(m) = self.manifests.get(digest) {
            self.store.touch(digest);
            return Some(m);
        }
        let obj = match self.store.open(digest).await {
            Ok(obj) => obj?,
            Err(e) => {
                warn!(%digest, error = %e, "could not read cached manifest");
                return None;
            }
        };
        let body = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut &obj.file, &mut buf).map(|_| buf)
        })
        .await
        .ok()?
        .ok()?;
        let media_type = media::sniff(&body).unwrap_or_else(|| media::OCI_MANIFEST.to_string());
        let manifest = Arc::new(Manifest {
            digest: digest.clone(),
            media_type,
            body: Bytes::from(body),
        });
        self.manifests.insert(digest.clone(), manifest.clone());
        Some(manifest)
    }

    async fn manifest_by_digest(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        name: &RepoName,
        digest: &Digest,
    ) -> ManifestResult {
        if let Some(m) = self.cached_manifest(digest).await {
            return Ok((m, Outcome::Hit));
        }
        let (this, up, name2, d) = (self.clone(), upstream.clone(), name.clone(), digest.clone());
        let (result, joined) = self
            .manifest_flights
            .run(digest.clone(), move || async move {
                this.fetch_manifest(&up, &name2, &Reference::Digest(d), AcceptSet::ALL)
                    .await
            })
            .await;
        let outcome = if joined {
            Outcome::Coalesced
        } else {
            Outcome::Miss
        };
        result.map(|m| (m, outcome))
    }

    /// GET a manifest upstream, verify it, keep it on disk and in memory.
    async fn fetch_manifest(
        self: &Arc<Self>,
        upstream: &Upstream,
        name: &RepoName,
        reference: &Reference,
        accept: AcceptSet,
    ) -> Result<Arc<Manifest>, ApiError> {
        let not_found = || ApiError::ManifestUnknown {
            name: name.to_string(),
            reference: reference.to_string(),
        };
        let resp = upstream
            .manifest(Method::GET, name, reference, &accept.header_value())
            .await
            .map_err(|e| ApiError::from_upstream(&e, not_found()))?;
        let claimed = header_digest(&resp);
        let content_type = header_str(&resp, "content-type");
        let body = read_limited(resp, MANIFEST_LIMIT, &upstream.name)
            .await
            .map_err(|e| ApiError::from_upstream(&e, not_found()))?;
        let digest = Digest::of(&body);
        let expected = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => claimed,
        };
        if let Some(expected) = expected.filter(|e| *e != digest) {
            self.metrics
                .digest_mismatches
                .with_label_values(&[&upstream.name])
                .inc();
            warn!(upstream = %upstream.name, %name, %reference, %expected, actual = %digest, "manifest digest mismatch; not cached");
            return Err(ApiError::DigestMismatch {
                upstream: upstream.name.to_string(),
                expected: expected.to_string(),
                actual: digest.to_string(),
            });
        }
        match self.store.put(&digest, body.clone()).await {
            Ok(()) => {
                self.metrics.record_usage(self.store.usage());
                self.watch_pins(&upstream.name, name);
            }
            Err(e) => {
                self.metrics.store_write_error("manifest", &e);
                warn!(%digest, error = %e, "could not write manifest to the cache; serving it anyway")
            }
        }
        // The body decides, as it will when this manifest is next read from disk.
        let media_type = media::sniff(&body)
            .or(content_type.filter(|t| media::valid_media_type(t)))
            .unwrap_or_else(|| media::OCI_MANIFEST.to_string());
        let manifest = Arc::new(Manifest {
            digest: digest.clone(),
            media_type,
            body,
        });
        self.manifests.insert(digest, manifest.clone());
        Ok(manifest)
    }

    async fn manifest_by_tag(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        name: &RepoName,
        tag: &Tag,
        accept: AcceptSet,
    ) -> ManifestResult {
        let key = TagKey {
            upstream: upstream.name.clone(),
            name: name.clone(),
            tag: tag.clone(),
            accept,
        };
        if upstream.offline {
            let cached = self.tag_from_cache(&key).await;
            return cached
                .map(|m| (m, Outcome::Hit))
                .ok_or_else(|| manifest_unknown(&key));
        }
        let known = self.tags.get(&key);
        if let Some(entry) = known.as_ref().filter(|e| e.is_fresh()) {
            if let Some(m) = self.cached_manifest(&entry.digest).await {
                return Ok((m, Outcome::Hit));
            }
        }
        let (this, up, k) = (self.clone(), upstream.clone(), key.clone());
        let (result, joined) = self
            .tag_flights
            .run(
                key,
                move || async move { this.refresh_tag(&up, k, known).await },
            )
            .await;
        result.map(|(m, outcome)| (m, if joined { Outcome::Coalesced } else { outcome }))
    }

    /// Ask upstream what a tag points at: a HEAD when we know an earlier answer (free under
    /// Docker Hub's pull limit), else a GET. A failing upstream gets the earlier answer served.
    async fn refresh_tag(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        key: TagKey,
        known: Option<TagEntry>,
    ) -> ManifestResult {
        let Some(known) = known else {
            let reference = Reference::Tag(key.tag.clone());
            let fetched = self
                .fetch_manifest(upstream, &key.name, &reference, key.accept)
                .await;
            return match fetched {
                Ok(m) => {
                    self.tags
                        .insert(key.clone(), m.digest.clone(), upstream.tag_ttl);
                    self.watch_pins(&key.upstream, &key.name);
                    Ok((m, Outcome::Miss))
                }
                Err(err) if err.is_upstream_failure() => {
                    // Never asked with this client's Accept set, but maybe with another one
                    // whose answer this client can take.
                    let cached = self.tag_from_cache(&key).await.ok_or(err)?;
                    self.count_stale(upstream);
                    Ok((cached, Outcome::Stale))
                }
                Err(err) => Err(err),
            };
        };
        let head = upstream
            .manifest(
                Method::HEAD,
                &key.name,
                &Reference::Tag(key.tag.clone()),
                &key.accept.header_value(),
            )
            .await;
        match head {
            Ok(resp) => {
                let (m, outcome) = match header_digest(&resp) {
                    Some(digest) => {
                        self.manifest_by_digest(upstream, &key.name, &digest)
                            .await?
                    }
                    None => {
                        let reference = Reference::Tag(key.tag.clone());
                        let m = self
                            .fetch_manifest(upstream, &key.name, &reference, key.accept)
                            .await?;
                        (m, Outcome::Miss)
                    }
                };
                self.tags
                    .insert(key.clone(), m.digest.clone(), upstream.tag_ttl);
                self.watch_pins(&key.upstream, &key.name);
                Ok((m, outcome))
            }
            Err(err) if err.is_transient() => self.serve_stale(upstream, key, known, &err).await,
            Err(err) => {
                if matches!(err.kind, UpstreamErrorKind::NotFound) {
                    self.tags.remove(&key);
                }
                Err(ApiError::from_upstream(&err, manifest_unknown(&key)))
            }
        }
    }

    async fn serve_stale(
        &self,
        upstream: &Upstream,
        key: TagKey,
        known: TagEntry,
        err: &UpstreamError,
    ) -> ManifestResult {
        let Some(m) = self.cached_manifest(&known.digest).await else {
            return Err(ApiError::from_upstream(err, manifest_unknown(&key)));
        };
        warn!(upstream = %upstream.name, name = %key.name, tag = %key.tag, error = %err,
              digest = %known.digest, "upstream failed; serving the cached tag");
        self.count_stale(upstream);
        // Don't ask a failing upstream on every request; try again after a short while.
        self.tags
            .insert(key, known.digest, upstream.tag_ttl.min(STALE_RETRY));
        Ok((m, Outcome::Stale))
    }

    fn count_stale(&self, upstream: &Upstream) {
        self.metrics
            .stale_served
            .with_label_values(&[&upstream.name])
            .inc();
    }

    /// A tag answered from the cache alone: the answer for this Accept set, else any cached
    /// answer of a type this client accepts.
    async fn tag_from_cache(&self, key: &TagKey) -> Option<Arc<Manifest>> {
        if let Some(entry) = self.tags.get(key) {
            if let Some(m) = self.cached_manifest(&entry.digest).await {
                return Some(m);
            }
        }
        for (_, entry) in self.tags.answers(&key.upstream, &key.name, &key.tag) {
            if let Some(m) = self.cached_manifest(&entry.digest).await {
                if key.accept.accepts(&m.media_type) {
                    return Some(m);
                }
            }
        }
        None
    }

    async fn blob(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        name: &RepoName,
        digest: &Digest,
        range: Option<&str>,
    ) -> Result<ApiResponse, ApiError> {
        let (up, n, d) = (upstream.clone(), name.clone(), digest.clone());
        let fetch = move |from: u64| {
            let (up, n, d) = (up.clone(), n.clone(), d.clone());
            async move { up.blob_from(&n, &d, from).await }.boxed()
        };
        let source = self
            .fills
            .get(digest, &upstream.name, fetch)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let blob_unknown = || ApiError::BlobUnknown {
            digest: digest.clone(),
        };
        match source {
            BlobSource::Cached(obj) => {
                let span = parse_range(range, Some(obj.len))?;
                let body = BlobBody::cached(obj.file, span.start, span.end.unwrap_or(obj.len));
                Ok(blob_response(
                    digest,
                    span,
                    Some(obj.len),
                    Some(body),
                    Outcome::Hit,
                ))
            }
            BlobSource::Filling {
                reader,
                mut progress,
                joined,
            } => {
                if joined {
                    self.metrics
                        .coalesced
                        .with_label_values(&[&upstream.name, "blob"])
                        .inc();
                }
                let len = wait_started(&mut progress)
                    .await
                    .map_err(|e| ApiError::from_upstream(&e, blob_unknown()))?;
                let span = parse_range(range, len)?;
                let body = BlobBody::filling(reader, progress, span.start, span.end);
                let outcome = if joined {
                    Outcome::Coalesced
                } else {
                    Outcome::Miss
                };
                Ok(blob_response(digest, span, len, Some(body), outcome))
            }
        }
    }

    /// HEAD of a blob: from the cache or a fill in flight when we can, else asked upstream
    /// without fetching.
    async fn blob_head(
        &self,
        upstream: &Upstream,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<ApiResponse, ApiError> {
        let known = self.store.size_of(digest).map(|len| (len, Outcome::Hit));
        let known = known.or_else(|| {
            let len = self.fills.len_in_flight(digest)?;
            Some((len, Outcome::Coalesced))
        });
        let (len, outcome) = match known {
            Some((len, outcome)) => (Some(len), outcome),
            None => {
                let resp = upstream
                    .blob(Method::HEAD, name, digest)
                    .await
                    .map_err(|e| {
                        ApiError::from_upstream(
                            &e,
                            ApiError::BlobUnknown {
                                digest: digest.clone(),
                            },
                        )
                    })?;
                (content_length(resp.headers()), Outcome::Pass)
            }
        };
        let span = Span {
            start: 0,
            end: len,
            partial: false,
        };
        Ok(blob_response(digest, span, len, None, outcome))
    }

    async fn passthrough(
        &self,
        upstream: &Upstream,
        name: &RepoName,
        call: Passthrough<'_>,
    ) -> Result<ApiResponse, ApiError> {
        let resp = upstream
            .passthrough(name, &call.suffix, call.query, call.accept)
            .await
            .map_err(|e| ApiError::from_upstream(&e, call.not_found.clone()))?;
        let mut out = ApiResponse::new(resp.status(), Outcome::Pass);
        for header in ["content-type", "link", "oci-filters-applied"] {
            if let Some(value) = header_str(&resp, header) {
                let value = match header {
                    "link" => rewrite_link(&value, name, call.asked),
                    _ => value,
                };
                out.headers.push((canonical(header), value));
            }
        }
        let body = read_limited(resp, PASSTHROUGH_LIMIT, &upstream.name)
            .await
            .map_err(|e| ApiError::from_upstream(&e, call.not_found))?;
        out.headers.push(("Content-Length", body.len().to_string()));
        out.body = Body::Full(body);
        Ok(out)
    }
}

/// An API call passed through to the upstream as it is (tag lists, referrers).
struct Passthrough<'a> {
    suffix: String,
    query: Option<&'a str>,
    accept: Option<&'a str>,
    /// The repository name as the client wrote it (with any upstream prefix).
    asked: &'a RepoName,
    not_found: ApiError,
}

/// A pagination `Link` names the upstream's repository path; point it at the name the client
/// used, so a client that came through a path prefix stays on the same upstream.
fn rewrite_link(link: &str, upstream_name: &RepoName, asked: &RepoName) -> String {
    let theirs = format!("</v2/{upstream_name}/");
    match link.strip_prefix(&theirs) {
        Some(rest) => format!("</v2/{asked}/{rest}"),
        None => link.to_string(),
    }
}

fn canonical(header: &str) -> &'static str {
    match header {
        "content-type" => "Content-Type",
        "link" => "Link",
        _ => "OCI-Filters-Applied",
    }
}

/// Clients check this header to know they are talking to a v2 registry (docker does on its
/// first `/v2/`, also when that answers 401).
fn with_api_version(mut resp: ApiResponse) -> ApiResponse {
    resp.headers.push((
        "Docker-Distribution-API-Version",
        "registry/2.0".to_string(),
    ));
    resp
}

fn manifest_unknown(key: &TagKey) -> ApiError {
    ApiError::ManifestUnknown {
        name: key.name.to_string(),
        reference: key.tag.to_string(),
    }
}

fn manifest_response(m: &Manifest, outcome: Outcome) -> ApiResponse {
    let mut resp = ApiResponse::new(StatusCode::OK, outcome);
    resp.headers = vec![
        ("Content-Type", m.media_type.clone()),
        ("Content-Length", m.body.len().to_string()),
        ("Docker-Content-Digest", m.digest.to_string()),
        ("ETag", format!("\"{}\"", m.digest)),
    ];
    resp.body = Body::Full(m.body.clone());
    resp
}

fn blob_response(
    digest: &Digest,
    span: Span,
    len: Option<u64>,
    body: Option<BlobBody>,
    outcome: Outcome,
) -> ApiResponse {
    let status = if span.partial {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let mut resp = ApiResponse::new(status, outcome);
    resp.headers = vec![
        ("Content-Type", "application/octet-stream".into()),
        ("Docker-Content-Digest", digest.to_string()),
        ("ETag", format!("\"{digest}\"")),
        ("Accept-Ranges", "bytes".into()),
        ("Cache-Control", "max-age=31536000, immutable".into()),
    ];
    if let Some(end) = span.end {
        resp.headers
            .push(("Content-Length", (end - span.start).to_string()));
    }
    if let (true, Some(end), Some(len)) = (span.partial, span.end, len) {
        resp.headers.push((
            "Content-Range",
            format!("bytes {}-{}/{len}", span.start, end - 1),
        ));
    }
    resp.body = body.map_or(Body::Empty, Body::Blob);
    resp
}

fn header_str(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn header_digest(resp: &reqwest::Response) -> Option<Digest> {
    Digest::parse(&header_str(resp, "docker-content-digest")?).ok()
}

/// The whole body, refusing more than `limit` bytes.
async fn read_limited(
    resp: reqwest::Response,
    limit: u64,
    upstream: &Arc<str>,
) -> Result<Bytes, UpstreamError> {
    let too_large = || UpstreamError::new(upstream, UpstreamErrorKind::TooLarge { limit });
    if content_length(resp.headers()).is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let mut body = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| crate::upstream::client::body_error(upstream, &e))?;
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagination_links_keep_the_clients_prefix() {
        let upstream = RepoName::parse("owner/app").unwrap();
        let asked = RepoName::parse("ghcr.io/owner/app").unwrap();
        let link = r#"</v2/owner/app/tags/list?last=v9&n=10>; rel="next""#;
        assert_eq!(
            rewrite_link(link, &upstream, &asked),
            r#"</v2/ghcr.io/owner/app/tags/list?last=v9&n=10>; rel="next""#
        );
        let elsewhere = r#"<https://other/x>; rel="next""#;
        assert_eq!(rewrite_link(elsewhere, &upstream, &asked), elsewhere);
    }
}
