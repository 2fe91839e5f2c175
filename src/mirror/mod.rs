//! The mirror's request logic, independent of the HTTP server: a parsed request in, a response
//! (status, headers, body source) out. Manifests are small and kept in memory as well as in the
//! store; blobs stream from the store or from a fill in flight.
//!
//! `mod.rs` holds the [`Mirror`] and the dispatch of a route; [`manifests`] the manifest and tag
//! paths, [`blobs`] the blob paths, [`passthrough`] the calls passed on as they are, [`upkeep`]
//! purges, pins and saved state, and [`response`] what a handler answers.

mod blobs;
mod manifests;
mod passthrough;
mod peers;
mod response;
mod upkeep;

pub use response::{ApiRequest, ApiResponse, Body, Manifest, Outcome};
pub use upkeep::{PurgeReport, PurgeTarget};

use manifests::manifest_response;
use passthrough::Passthrough;
use response::{ManifestResult, with_api_version};
use upkeep::on_own_runtime;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use moka::sync::Cache;

use crate::client_auth::ClientAuth;
use crate::cluster::{Cluster, Via};
use crate::config::Config;
use crate::error::ApiError;
use crate::fill::Fills;
use crate::metrics::Metrics;
use crate::oci::media::AcceptSet;
use crate::oci::route::{self, Route, Target};
use crate::oci::{Digest, Reference, RepoName};
use crate::shared::{S3Tier, Tier};
use crate::singleflight::SingleFlight;
use crate::status::Recorder;
use crate::store::{BlobStore, Budget, DiskStore, Storage};
use crate::tags::{TagCache, TagKey};
use crate::upstream::Upstreams;

/// Tag lists and referrer indexes passed through from upstream.
const PASSTHROUGH_LIMIT: u64 = 16 * 1024 * 1024;
/// Tag answers kept in memory (the rest are read back from the tag store).
pub const TAGS_IN_MEMORY: u64 = 100_000;
/// Manifests kept in memory, by total size.
const MEMORY_MANIFESTS: u64 = 64 * 1024 * 1024;
/// How long a stale tag is served without asking a failing upstream again.
const STALE_RETRY: Duration = Duration::from_secs(30);

pub struct Mirror {
    upstreams: Upstreams,
    store: Arc<dyn BlobStore>,
    budget: Arc<dyn Budget>,
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
    /// `cluster`: the other replicas this one asks before its upstream.
    cluster: Option<Arc<Cluster>>,
    /// `cache.shared`: the slow tier under the store, read before any origin, written behind.
    shared: Option<Arc<dyn Tier>>,
    metrics: Arc<Metrics>,
    /// What the status page shows beyond the counters.
    status: Arc<Recorder>,
}

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
        let store = open_store(&config.cache.dir, config.cache.max_size).map_err(cache_error)?;
        let tags = TagCache::open(&config.cache.dir, TAGS_IN_MEMORY).map_err(cache_error)?;
        Mirror::with_storage(config, metrics, Storage::of(Arc::new(store)), tags)
    }

    /// A mirror over any blob store and tag cache (the in-process suite also runs on memory),
    /// with `cache.shared` on S3 when the config has it.
    pub fn with_storage(
        config: &Config,
        metrics: Arc<Metrics>,
        storage: Storage,
        tags: TagCache,
    ) -> anyhow::Result<Arc<Mirror>> {
        let shared = match &config.cache.shared {
            Some(shared) => {
                let tier = S3Tier::open(shared, &metrics)
                    .map_err(|e| anyhow::anyhow!("cache.shared: {e}"))?;
                tier.start(storage.blobs.clone());
                Some(tier as Arc<dyn Tier>)
            }
            None => None,
        };
        Mirror::with_tier(config, metrics, storage, tags, shared)
    }

    /// A mirror over any store, tag cache and shared tier (tests pass one on memory).
    pub fn with_tier(
        config: &Config,
        metrics: Arc<Metrics>,
        storage: Storage,
        tags: TagCache,
        shared: Option<Arc<dyn Tier>>,
    ) -> anyhow::Result<Arc<Mirror>> {
        let Storage {
            blobs: store,
            budget,
        } = storage;
        let upstreams = Upstreams::new(config, metrics.clone())?;
        let mut pins = Vec::new();
        for image in &config.cache.pin {
            let (upstream, name) = upstreams
                .resolve(image.host.as_deref(), &image.name)
                .map_err(|e| anyhow::anyhow!("cache.pin {image}: {e}"))?;
            pins.push((upstream.name.clone(), name, image.reference.clone()));
        }
        let cluster = match &config.cluster {
            Some(c) => Some(Cluster::new(c, metrics.clone())?),
            None => None,
        };
        let mirror = Mirror {
            cluster,
            shared,
            upstreams,
            pins,
            stopping: Default::default(),
            client_auth: config.client_auth.as_ref().map(ClientAuth::new),
            fills: Fills::new(store.clone(), budget.clone(), metrics.clone()),
            store,
            budget,
            tags,
            manifests: Cache::builder()
                .max_capacity(MEMORY_MANIFESTS)
                .weigher(|_, m: &Arc<Manifest>| m.body.len().try_into().unwrap_or(u32::MAX))
                .build(),
            manifest_flights: SingleFlight::new(),
            tag_flights: SingleFlight::new(),
            metrics,
            status: Arc::new(Recorder::new()),
        };
        let mirror = Arc::new(mirror);
        on_own_runtime(mirror.refresh_pins());
        mirror.metrics.record_usage(mirror.budget.usage());
        Ok(mirror)
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

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.store
    }

    pub fn fills(&self) -> &Fills {
        &self.fills
    }

    pub fn budget(&self) -> &Arc<dyn Budget> {
        &self.budget
    }

    pub fn status(&self) -> &Arc<Recorder> {
        &self.status
    }

    /// `client_auth`, for the admin status page.
    pub fn client_auth(&self) -> Option<&ClientAuth> {
        self.client_auth.as_ref()
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Start keeping the cluster's view current (members, health): the server does; the
    /// air-gap tools use the static list as it is.
    pub fn start_cluster(&self) -> anyhow::Result<()> {
        match &self.cluster {
            Some(cluster) => cluster.start(),
            None => Ok(()),
        }
    }

    /// Answer one registry request from a client (authenticated when `client_auth` is set).
    pub async fn handle(self: &Arc<Self>, req: &ApiRequest) -> ApiResponse {
        // A member's request carries a proof instead of a client's credentials.
        if req.peer.is_claimed() {
            return match self.verify_peer(req) {
                Ok(peer) => self.serve(req, None, &Via::Peer(peer)).await,
                Err(e) => with_api_version(ApiResponse::error(&e)),
            };
        }
        let client = match &self.client_auth {
            Some(auth) => match auth.authenticate(req.authorization.as_deref()).await {
                Ok(client) => Some(client),
                Err(e) => return with_api_version(ApiResponse::error(&e)),
            },
            None => None,
        };
        self.serve(req, client.as_deref(), &Via::Client).await
    }

    /// Answer a request dockside makes of itself (prefetch, the admin API): no client, so no
    /// authentication and no access limits.
    pub async fn handle_internal(self: &Arc<Self>, req: &ApiRequest) -> ApiResponse {
        self.serve(req, None, &Via::Client).await
    }

    async fn serve(
        self: &Arc<Self>,
        req: &ApiRequest,
        client: Option<&str>,
        via: &Via,
    ) -> ApiResponse {
        let route = match route::parse(&req.method, &req.path, req.query.as_deref()) {
            Ok(route) => route,
            Err(e) => return ApiResponse::error(&e.into()),
        };
        let mut resp = with_api_version(self.dispatch(&route, req, client, via).await);
        if let Some(ns) = &route.ns {
            resp.headers.push(("OCI-Namespace", ns.to_string()));
        }
        if route.head {
            resp.body = Body::Empty;
        }
        if peers::is_held_only(via) && resp.status == StatusCode::NOT_FOUND {
            resp.outcome = Outcome::NotHeld;
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
        via: &Via,
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
                let answer = self
                    .manifest(&upstream, &name, reference, accept, via)
                    .await;
                answer.map(|(m, outcome)| {
                    let mut resp = manifest_response(&m, outcome);
                    self.tell_freshness(&mut resp, &upstream, &name, reference, accept, via);
                    resp
                })
            }
            Target::Blob { digest, .. } => {
                if route.head {
                    self.blob_head(&upstream, &name, digest, via).await
                } else {
                    self.blob(&upstream, &name, digest, req.range.as_deref(), via)
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
        resp.repository = Some(name);
        resp.kind = kind;
        resp
    }
}
