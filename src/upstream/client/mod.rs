//! One upstream registry: an HTTP client with its own CA, timeouts and credentials, and the
//! request loop (offline, throttle, retries, fail-over across URLs). The pieces of a round trip
//! live beside it: `challenge.rs` (authentication and the token flow), `send.rs` (one exchange
//! and the mapping of statuses and errors to [`UpstreamErrorKind`]), `retry.rs` (what is retried,
//! backoff) and `throttle.rs` (a 429's hold).

mod challenge;
mod retry;
mod send;
mod throttle;

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method};
use tracing::{debug, info, warn};

use super::auth::TokenCache;
use super::credentials::Provider;
use super::endpoints::{Endpoint, Endpoints};
use super::{UpstreamError, UpstreamErrorKind};
use crate::config::{Timeouts, UpstreamConfig};
use crate::metrics::Metrics;
use crate::oci::{Digest, Reference, RepoName};
use crate::singleflight::SingleFlight;
use challenge::TokenSource;
use retry::{backoff, is_url_failure, worth_retrying};
use throttle::Throttle;

pub use send::{body_error, error_chain};

pub struct Upstream {
    pub name: Arc<str>,
    pub tag_ttl: Duration,
    /// Docker Hub: one-component names mean `library/<name>`.
    pub library_prefix: bool,
    /// `offline: true`: never contacted.
    pub offline: bool,
    retries: u32,
    throttle: Throttle,
    endpoints: Endpoints,
    http: reqwest::Client,
    credentials: Option<Provider>,
    timeouts: Timeouts,
    token_source: TokenSource,
    token_flights: SingleFlight<String, Result<HeaderValue, UpstreamError>>,
    metrics: Arc<Metrics>,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig, metrics: Arc<Metrics>) -> anyhow::Result<Upstream> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("dockside/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(cfg.timeouts.connect)
            .read_timeout(cfg.timeouts.idle)
            .pool_idle_timeout(Duration::from_secs(90));
        if let Some(path) = &cfg.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                anyhow::anyhow!("upstream {}: ca_file {}: {e}", cfg.name, path.display())
            })?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let hub_names = ["docker.io", "index.docker.io", "registry-1.docker.io"];
        let library_prefix = std::iter::once(&cfg.name)
            .chain(&cfg.aliases)
            .any(|n| hub_names.contains(&n.to_ascii_lowercase().as_str()));
        let name: Arc<str> = Arc::from(cfg.name.as_str());
        let http = builder.build()?;
        let credentials = Provider::new(cfg, metrics.clone())
            .map_err(|e| anyhow::anyhow!("upstream {}: credentials: {e}", cfg.name))?;
        let endpoints = Endpoints::new(&cfg.urls, &cfg.circuit);
        for endpoint in endpoints.all() {
            metrics
                .upstream_url_up
                .with_label_values(&[&name, endpoint.label()])
                .set(1);
        }
        let token_source = TokenSource {
            name: name.clone(),
            http: http.clone(),
            credentials: credentials.clone(),
            first_byte: cfg.timeouts.first_byte,
            tokens: TokenCache::new(),
            metrics: metrics.clone(),
        };
        Ok(Upstream {
            name,
            tag_ttl: cfg.tag_ttl,
            library_prefix,
            offline: cfg.offline,
            retries: cfg.retries,
            throttle: Throttle::default(),
            endpoints,
            http,
            credentials,
            timeouts: cfg.timeouts.clone(),
            token_source,
            token_flights: SingleFlight::new(),
            metrics,
        })
    }

    fn error(&self, kind: UpstreamErrorKind) -> UpstreamError {
        UpstreamError::new(&self.name, kind)
    }

    /// GET or HEAD a manifest by tag or digest.
    pub async fn manifest(
        &self,
        method: Method,
        name: &RepoName,
        reference: &Reference,
        accept: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        let path = format!("{name}/manifests/{reference}");
        self.request(method, name, &path, None, Some(accept)).await
    }

    /// GET or HEAD a blob.
    pub async fn blob(
        &self,
        method: Method,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<reqwest::Response, UpstreamError> {
        let path = format!("{name}/blobs/{digest}");
        self.request(method, name, &path, None, None).await
    }

    /// GET a blob from byte `from` on: the rest of a download that broke. The answer must be
    /// checked to be that range (see `fill`).
    pub async fn blob_from(
        &self,
        name: &RepoName,
        digest: &Digest,
        from: u64,
    ) -> Result<reqwest::Response, UpstreamError> {
        let path = format!("{name}/blobs/{digest}");
        let range = (from > 0).then(|| format!("bytes={from}-"));
        let call = Call {
            range: range.as_deref(),
            ..Call::get(name, &path)
        };
        self.request_with(&call).await
    }

    /// GET an API path under the repository (tags/list, referrers/…) with the client's query.
    pub async fn passthrough(
        &self,
        name: &RepoName,
        suffix: &str,
        query: Option<&str>,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let path = format!("{name}/{suffix}");
        self.request(Method::GET, name, &path, query, accept).await
    }

    async fn request(
        &self,
        method: Method,
        name: &RepoName,
        path: &str,
        query: Option<&str>,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let call = Call {
            method,
            query,
            accept,
            ..Call::get(name, path)
        };
        self.request_with(&call).await
    }

    /// Send a request under `/v2/`: not at all while offline or throttled. Each attempt walks
    /// the URLs in order, skipping those whose circuit is open, and moves on after a failure or
    /// a 404 (a regional mirror may lack what the origin has); after connect errors or 5xx
    /// everywhere it tries again, up to `retries` times, with exponential backoff and jitter.
    async fn request_with(&self, call: &Call<'_>) -> Result<reqwest::Response, UpstreamError> {
        if self.offline {
            return Err(self.error(UpstreamErrorKind::Offline));
        }
        if let Some(left) = self.throttled_for() {
            self.metrics
                .upstream_throttled
                .with_label_values(&[&self.name, "false"])
                .inc();
            return Err(self.error(UpstreamErrorKind::TooManyRequests {
                retry_after: Some(left.as_secs().max(1)),
            }));
        }
        let mut attempt = 0;
        loop {
            let err = match self.attempt(call).await {
                Ok(resp) => return Ok(resp),
                Err(err) => err,
            };
            // With every URL's circuit open, a retry would ask nobody: fail now, so that a
            // cached answer is served stale at once.
            if attempt < self.retries && worth_retrying(&err) && !self.endpoints.all_skipped() {
                attempt += 1;
                let wait = backoff(attempt);
                debug!(upstream = %self.name, path = call.path, error = %err, attempt, ?wait, "retrying");
                self.metrics
                    .upstream_retries
                    .with_label_values(&[&self.name])
                    .inc();
                tokio::time::sleep(wait).await;
                continue;
            }
            if let UpstreamErrorKind::TooManyRequests { retry_after } = err.kind {
                self.throttle(retry_after);
            }
            return Err(err);
        }
    }

    /// One pass over the URLs: the first answer that is neither a failure of its URL nor a 404
    /// wins; otherwise the last URL's error.
    async fn attempt(&self, call: &Call<'_>) -> Result<reqwest::Response, UpstreamError> {
        let mut last = None;
        let mut tried = false;
        for endpoint in self.endpoints.to_try() {
            tried = true;
            if last.is_some() {
                self.metrics
                    .upstream_failovers
                    .with_label_values(&[&self.name])
                    .inc();
            }
            let result = self.authenticated(call, endpoint).await;
            let failed = result.as_ref().err().filter(|e| is_url_failure(e));
            self.record_health(endpoint, failed.map(|e| e.kind.to_string()));
            let failed = failed.is_some();
            match result {
                Err(err) if failed || matches!(err.kind, UpstreamErrorKind::NotFound) => {
                    last = Some(err);
                }
                other => return other,
            }
        }
        if !tried {
            let why = self.endpoints.skipped_because();
            return Err(self.error(UpstreamErrorKind::CircuitOpen(why)));
        }
        Err(last.unwrap_or_else(|| self.error(UpstreamErrorKind::Connect("no URL".into()))))
    }

    fn record_health(&self, endpoint: &Endpoint, failure: Option<String>) {
        let Some(open) = endpoint.record(failure) else {
            return;
        };
        self.metrics
            .upstream_url_up
            .with_label_values(&[&self.name, endpoint.label()])
            .set(i64::from(!open));
        if open {
            warn!(upstream = %self.name, url = endpoint.label(), "URL keeps failing; skipping it for a while");
        } else {
            info!(upstream = %self.name, url = endpoint.label(), "URL answers again");
        }
    }
}

/// One request to send upstream, under `/v2/`.
struct Call<'a> {
    method: Method,
    name: &'a RepoName,
    /// After `/v2/`.
    path: &'a str,
    query: Option<&'a str>,
    accept: Option<&'a str>,
    range: Option<&'a str>,
}

impl<'a> Call<'a> {
    fn get(name: &'a RepoName, path: &'a str) -> Call<'a> {
        Call {
            method: Method::GET,
            name,
            path,
            query: None,
            accept: None,
            range: None,
        }
    }
}
