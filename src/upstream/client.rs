//! One upstream registry: an HTTP client with its own CA, timeouts and credentials, the bearer
//! token flow, and the mapping of upstream statuses to [`UpstreamErrorKind`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, StatusCode};
use reqwest::header::{ACCEPT, AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use tracing::{debug, info, warn};
use url::Url;

use super::auth::{Challenge, TokenCache, TokenResponse, parse_challenge, pull_scope};
use super::credentials::{Basic, CredentialError, Provider};
use super::endpoints::{AuthMode, Endpoint, Endpoints};
use super::{UpstreamError, UpstreamErrorKind};
use crate::config::{Timeouts, UpstreamConfig};
use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName};
use crate::singleflight::SingleFlight;

pub struct Upstream {
    pub name: Arc<str>,
    pub tag_ttl: Duration,
    /// Docker Hub: one-component names mean `library/<name>`.
    pub library_prefix: bool,
    /// `offline: true`: never contacted.
    pub offline: bool,
    retries: u32,
    /// Until when a 429's Retry-After asks us to leave this upstream alone.
    throttled_until: Mutex<Option<Instant>>,
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
            throttled_until: Mutex::new(None),
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

    /// GET or HEAD a manifest by tag or digest (`reference` is already validated).
    pub async fn manifest(
        &self,
        method: Method,
        name: &RepoName,
        reference: &str,
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
            if attempt < self.retries && worth_retrying(&err) {
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
        for endpoint in self.endpoints.to_try() {
            if last.is_some() {
                self.metrics
                    .upstream_failovers
                    .with_label_values(&[&self.name])
                    .inc();
            }
            let result = self.authenticated(call, endpoint).await;
            let failed = result.as_ref().err().is_some_and(is_url_failure);
            self.record_health(endpoint, !failed);
            match result {
                Err(err) if failed || matches!(err.kind, UpstreamErrorKind::NotFound) => {
                    last = Some(err);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| self.error(UpstreamErrorKind::Connect("no URL".into()))))
    }

    fn record_health(&self, endpoint: &Endpoint, ok: bool) {
        let Some(open) = endpoint.record(ok) else {
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

    /// How long a 429's Retry-After still holds requests back, if it does.
    fn throttled_for(&self) -> Option<Duration> {
        let until = (*self.throttled_until.lock().expect("throttle lock"))?;
        until.checked_duration_since(Instant::now())
    }

    fn throttle(&self, retry_after: Option<u64>) {
        self.metrics
            .upstream_throttled
            .with_label_values(&[&self.name, "true"])
            .inc();
        // Without Retry-After, one second: enough to stop a herd from hammering it.
        let wait = Duration::from_secs(retry_after.unwrap_or(1).min(MAX_THROTTLE_SECS));
        *self.throttled_until.lock().expect("throttle lock") = Some(Instant::now() + wait);
        warn!(upstream = %self.name, ?wait, "upstream is rate limiting us; holding requests back");
    }

    /// One request, answering one authentication challenge if there is one (two for a source of
    /// short-lived credentials, whose fresh ones may be refused too).
    async fn authenticated(
        &self,
        call: &Call<'_>,
        endpoint: &Endpoint,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut url = endpoint
            .url
            .join(&format!("/v2/{}", call.path))
            .map_err(|e| self.error(UpstreamErrorKind::Connect(e.to_string())))?;
        url.set_query(call.query);
        let scope = pull_scope(call.name.as_str());
        let mut authorization = self.known_authorization(endpoint, &scope).await?;
        // Short-lived credentials may be refused when they were just fetched (revoked, rotated
        // early): such an upstream gets a second challenge answered with fresh ones.
        let mut challenges_left = match &self.credentials {
            Some(provider) if provider.refreshable() => 2,
            _ => 1,
        };
        loop {
            let resp = self.send(call, &url, authorization.as_ref()).await?;
            if resp.status() == StatusCode::UNAUTHORIZED && challenges_left > 0 {
                challenges_left -= 1;
                let rejected = authorization.take();
                authorization = Some(
                    self.answer_challenge(endpoint, &resp, &scope, rejected)
                        .await?,
                );
                continue;
            }
            return self.check_status(resp);
        }
    }

    async fn send(
        &self,
        call: &Call<'_>,
        url: &Url,
        authorization: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let method = &call.method;
        let mut req = self.http.request(method.clone(), url.clone());
        if let Some(accept) = call.accept {
            req = req.header(ACCEPT, accept);
        }
        if let Some(range) = call.range {
            req = req.header(http::header::RANGE, range);
        }
        if let Some(value) = authorization {
            req = req.header(AUTHORIZATION, value.clone());
        }
        let started = Instant::now();
        let sent = tokio::time::timeout(self.timeouts.first_byte, req.send()).await;
        if let Ok(Ok(_)) = &sent {
            self.metrics
                .upstream_first_byte
                .with_label_values(&[&self.name, method.as_str()])
                .observe(started.elapsed().as_secs_f64());
        }
        let status_label = match &sent {
            Ok(Ok(resp)) => resp.status().as_u16().to_string(),
            _ => "error".to_string(),
        };
        self.metrics
            .upstream_requests
            .with_label_values(&[&self.name, method.as_str(), &status_label])
            .inc();
        match sent {
            Err(_) => Err(self.error(UpstreamErrorKind::Timeout(format!(
                "waiting {:?} for the first byte of {url}",
                self.timeouts.first_byte
            )))),
            Ok(Err(e)) => Err(self.error(classify(&e))),
            Ok(Ok(resp)) => {
                self.record_rate_limit(resp.headers());
                Ok(resp)
            }
        }
    }

    /// Docker Hub's `RateLimit-Remaining: 76;w=21600`: pulls left in the window.
    fn record_rate_limit(&self, headers: &http::HeaderMap) {
        let remaining = headers
            .get("ratelimit-remaining")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .and_then(|n| n.trim().parse::<i64>().ok());
        if let Some(n) = remaining {
            self.metrics
                .upstream_ratelimit_remaining
                .with_label_values(&[&self.name])
                .set(n);
        }
    }

    /// An Authorization header for `scope` from what earlier challenges taught us, so most
    /// requests need one round trip.
    async fn known_authorization(
        &self,
        endpoint: &Endpoint,
        scope: &str,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        let mode = endpoint.mode.read().expect("auth mode lock").clone();
        match mode {
            None => Ok(None),
            Some(AuthMode::Basic) => self.basic_header().await,
            Some(AuthMode::Bearer { realm, service }) => {
                match self.token_source.tokens.get(&token_key(&realm, scope)) {
                    Some(token) => Ok(bearer_header(&token)),
                    None => self
                        .fetch_token(&realm, service.as_deref(), scope)
                        .await
                        .map(Some),
                }
            }
        }
    }

    /// `rejected` is what this request sent and was refused with, if anything.
    async fn answer_challenge(
        &self,
        endpoint: &Endpoint,
        resp: &reqwest::Response,
        scope: &str,
        rejected: Option<HeaderValue>,
    ) -> Result<HeaderValue, UpstreamError> {
        let header = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                self.error(UpstreamErrorKind::Unauthorized(
                    "401 without a challenge".into(),
                ))
            })?;
        let challenge = parse_challenge(header)
            .map_err(|e| self.error(UpstreamErrorKind::Unauthorized(e.to_string())))?;
        match challenge {
            Challenge::Basic => {
                // Credentials we sent and were refused may have expired or been revoked: a
                // source of short-lived ones is asked for new ones.
                if let (Some(refused), Some(provider)) = (&rejected, &self.credentials) {
                    provider.refused_header(refused);
                }
                let value = self.basic_header().await?.ok_or_else(|| {
                    self.error(UpstreamErrorKind::Unauthorized(
                        "the upstream asks for credentials and none are configured".into(),
                    ))
                })?;
                *endpoint.mode.write().expect("auth mode lock") = Some(AuthMode::Basic);
                Ok(value)
            }
            Challenge::Bearer { realm, service, .. } => {
                *endpoint.mode.write().expect("auth mode lock") = Some(AuthMode::Bearer {
                    realm: realm.clone(),
                    service: service.clone(),
                });
                // Another request may have fetched a token for this scope since we sent ours.
                // Use it, unless it is the very token the upstream just refused.
                let key = token_key(&realm, scope);
                let cached = self
                    .token_source
                    .tokens
                    .get(&key)
                    .and_then(|t| bearer_header(&t));
                match cached {
                    Some(header) if Some(&header) != rejected.as_ref() => return Ok(header),
                    Some(_) => self.token_source.tokens.remove(&key),
                    None => {}
                }
                self.fetch_token(&realm, service.as_deref(), scope).await
            }
        }
    }

    /// A bearer token for `scope`. Concurrent requests for one scope share one token fetch, so
    /// a herd of cold pulls costs the token endpoint one request, not one per client.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<HeaderValue, UpstreamError> {
        let source = self.token_source.clone();
        let key = token_key(realm, scope);
        let (realm, service, owned_scope) = (
            realm.to_string(),
            service.map(str::to_string),
            scope.to_string(),
        );
        let fetch =
            move || async move { source.fetch(&realm, service.as_deref(), &owned_scope).await };
        self.token_flights.run(key, fetch).await.0
    }

    /// `Basic …` with the current credentials; `None` when none are configured.
    async fn basic_header(&self) -> Result<Option<HeaderValue>, UpstreamError> {
        let Some(provider) = &self.credentials else {
            return Ok(None);
        };
        let basic = provider
            .current()
            .await
            .map_err(|e| credential_error(&self.name, e))?;
        Ok(basic.header())
    }

    fn check_status(&self, resp: reqwest::Response) -> Result<reqwest::Response, UpstreamError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let kind = match status {
            StatusCode::NOT_FOUND => UpstreamErrorKind::NotFound,
            StatusCode::UNAUTHORIZED => UpstreamErrorKind::Unauthorized(format!(
                "still {status} after authenticating{}",
                if self.credentials.is_some() {
                    ""
                } else {
                    " (no credentials configured)"
                }
            )),
            StatusCode::FORBIDDEN => UpstreamErrorKind::Denied(status.to_string()),
            StatusCode::TOO_MANY_REQUESTS => UpstreamErrorKind::TooManyRequests {
                retry_after: resp
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok()),
            },
            other => UpstreamErrorKind::Status(other.as_u16()),
        };
        Err(self.error(kind))
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

/// Retry-After is honoured up to this long; beyond it, the upstream is asked again anyway.
const MAX_THROTTLE_SECS: u64 = 3600;

/// Failures that count against a URL's circuit: it did not answer, or answered with a
/// server-side error.
fn is_url_failure(err: &UpstreamError) -> bool {
    worth_retrying(err) || matches!(err.kind, UpstreamErrorKind::Timeout(_))
}

/// Failures a second attempt may fix: no connection, or a server-side error.
fn worth_retrying(err: &UpstreamError) -> bool {
    match err.kind {
        UpstreamErrorKind::Connect(_) => true,
        UpstreamErrorKind::Status(code) => matches!(code, 500 | 502 | 503 | 504),
        _ => false,
    }
}

/// Exponential backoff with jitter: a random wait between half and all of 100 ms × 2^attempt
/// (capped at 5 s), so a herd of retries spreads out instead of arriving together.
fn backoff(attempt: u32) -> Duration {
    let cap_ms = (100u64 << attempt.min(6)).min(5_000);
    Duration::from_millis(rand::random_range(cap_ms / 2..=cap_ms))
}

/// Tokens are kept per token service and scope: URLs of one upstream may use different services.
fn token_key(realm: &str, scope: &str) -> String {
    format!("{realm} {scope}")
}

fn bearer_header(token: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

fn classify(err: &reqwest::Error) -> UpstreamErrorKind {
    // The full error chain says why (refused, DNS, TLS); the top level only says "error sending".
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    if err.is_timeout() {
        UpstreamErrorKind::Timeout(message)
    } else if err.is_body() || err.is_decode() {
        UpstreamErrorKind::Body(message)
    } else {
        UpstreamErrorKind::Connect(message)
    }
}

/// Map a body-stream error the same way as a send error.
pub fn body_error(upstream: &Arc<str>, err: &reqwest::Error) -> UpstreamError {
    let kind = match classify(err) {
        UpstreamErrorKind::Connect(m) => UpstreamErrorKind::Body(m),
        other => other,
    };
    UpstreamError::new(upstream, kind)
}

/// Credentials that could not be had: transient (the endpoint is down) like a connect error, so
/// stale content may be served; otherwise an authentication failure.
fn credential_error(upstream: &Arc<str>, err: CredentialError) -> UpstreamError {
    let kind = if err.transient {
        UpstreamErrorKind::Connect(format!("fetching credentials: {err}"))
    } else {
        UpstreamErrorKind::Unauthorized(format!("fetching credentials: {err}"))
    };
    UpstreamError::new(upstream, kind)
}

/// What the token flow needs, owned, so a token fetch can run as a task of its own.
#[derive(Clone)]
struct TokenSource {
    name: Arc<str>,
    http: reqwest::Client,
    credentials: Option<Provider>,
    first_byte: Duration,
    tokens: TokenCache,
    metrics: Arc<Metrics>,
}

impl TokenSource {
    /// The token flow: GET realm?service=…&scope=…, with Basic credentials when configured.
    async fn fetch(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<HeaderValue, UpstreamError> {
        let unauthorized =
            |msg: String| UpstreamError::new(&self.name, UpstreamErrorKind::Unauthorized(msg));
        let mut url =
            Url::parse(realm).map_err(|e| unauthorized(format!("token realm {realm:?}: {e}")))?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            query.append_pair("scope", scope);
        }
        let basic = self.basic().await?;
        let mut resp = self.ask(&url, realm, basic.as_ref()).await?;
        // Refused credentials from a source of short-lived ones: one more try with fresh ones.
        if resp.status() == StatusCode::UNAUTHORIZED
            && let (Some(provider), Some(refused)) = (&self.credentials, &basic)
            && provider.refused(refused)
        {
            let fresh = self.basic().await?;
            resp = self.ask(&url, realm, fresh.as_ref()).await?;
        }
        if !resp.status().is_success() {
            return Err(unauthorized(format!(
                "token endpoint {realm} answered {}",
                resp.status()
            )));
        }
        let parsed: TokenResponse = resp
            .json()
            .await
            .map_err(|e| unauthorized(format!("token endpoint {realm}: {e}")))?;
        let (token, expires_in) = parsed
            .into_parts()
            .ok_or_else(|| unauthorized(format!("token endpoint {realm} sent no token")))?;
        debug!(upstream = %self.name, scope, ?expires_in, "fetched bearer token");
        let header = bearer_header(&token)
            .ok_or_else(|| unauthorized("token is not a valid header value".into()))?;
        self.tokens
            .insert(&token_key(realm, scope), token, expires_in);
        Ok(header)
    }

    async fn basic(&self) -> Result<Option<Basic>, UpstreamError> {
        match &self.credentials {
            None => Ok(None),
            Some(provider) => provider
                .current()
                .await
                .map(Some)
                .map_err(|e| credential_error(&self.name, e)),
        }
    }

    /// One GET of the token endpoint, with Basic credentials when there are any.
    async fn ask(
        &self,
        url: &Url,
        realm: &str,
        basic: Option<&Basic>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut req = self.http.get(url.clone());
        if let Some(value) = basic.and_then(Basic::header) {
            req = req.header(AUTHORIZATION, value);
        }
        let resp = tokio::time::timeout(self.first_byte, req.send())
            .await
            .map_err(|_| {
                UpstreamError::new(
                    &self.name,
                    UpstreamErrorKind::Timeout(format!("fetching a token from {realm}")),
                )
            })?
            .map_err(|e| UpstreamError::new(&self.name, classify(&e)))?;
        self.metrics
            .upstream_requests
            .with_label_values(&[&self.name, "TOKEN", resp.status().as_str()])
            .inc();
        Ok(resp)
    }
}
