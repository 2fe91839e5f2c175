//! The pingora service: turns each HTTP request into an [`ApiRequest`], lets the [`Mirror`]
//! answer it, and writes headers and body back with real backpressure from the client socket.
//! Nothing here knows the disk layout or the registry protocol.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::http::ResponseHeader;
use pingora::listeners::tls::TlsSettings;
use pingora::prelude::*;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::listening::Service;
use pingora::upstreams::peer::HttpPeer;
use tracing::{info, warn};

use crate::admin::AdminApp;
use crate::cluster::{PeerClaim, proof};
use crate::config::Config;
use crate::limits::{Connections, Deadlines};
use crate::listeners::Listeners;
use crate::metrics::Metrics;
use crate::mirror::{ApiRequest, ApiResponse, Body, Mirror, Outcome};
use crate::status::{RecentError, Recorder};
use crate::store::Storage;
use crate::tags::TagCache;
use crate::tls::{Reload, ReloadingCert};

mod prebound;

use prebound::Endpoints;

pub struct RegistryService {
    mirror: Arc<Mirror>,
}

#[async_trait]
impl ProxyHttp for RegistryService {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        // Every request is answered in request_filter; pingora's proxying is never used.
        Error::e_explain(ErrorType::InternalError, "dockside does not proxy raw HTTP")
    }

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        crate::limits::header_complete();
        let started = Instant::now();
        let request = api_request(session.req_header());
        let response = self.mirror.handle(&request).await;
        let status = response.status;
        let (upstream, kind, outcome, error) = (
            response.upstream.clone(),
            response.kind,
            response.outcome,
            response.error.clone(),
        );
        let failure = client_error(&request, &response);
        let repository = response.repository.clone();
        let recorder = self.mirror.status();
        let sent = write_response(session, response, self.mirror.metrics(), recorder).await;
        match (failure, &sent) {
            (Some(failure), _) => recorder.error(failure),
            (None, Err(e)) if e.etype == ErrorType::InternalError => {
                let (upstream, repository) = (upstream.as_deref(), repository.as_ref());
                recorder.error(aborted(
                    status.as_u16(),
                    upstream,
                    repository,
                    e.to_string(),
                ));
            }
            _ => {}
        }
        let upstream = upstream.as_deref().unwrap_or("-");
        // Whole microseconds, so the log shows `0.197`, not `0.19750500000000001`.
        let elapsed_ms = started.elapsed().as_micros() as f64 / 1000.0;
        let (method, path, status) = (&request.method, &request.path, status.as_u16());
        let outcome = outcome.as_str();
        if sent
            .as_ref()
            .is_err_and(|e| e.etype == ErrorType::WriteTimedout)
        {
            let timeouts = &self.mirror.metrics().client_timeouts;
            timeouts.with_label_values(&["send_timeout"]).inc();
        }
        match (&sent, error) {
            (Err(e), _) => warn!(%method, path, status, upstream, kind, outcome, error = %e,
                                 elapsed_ms, "response aborted"),
            (Ok(_), Some(error)) if status >= 500 => warn!(%method, path, status, upstream, kind,
                                 outcome, error, elapsed_ms, "request failed"),
            (Ok(bytes), error) => info!(%method, path, status, upstream, kind, outcome, bytes,
                                 error, elapsed_ms, "request"),
        }
        sent.map(|_| true)
    }
}

fn api_request(header: &pingora::http::RequestHeader) -> ApiRequest {
    let text = |name: &str| {
        header
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect::<Vec<_>>()
    };
    ApiRequest {
        method: header.method.clone(),
        path: header.uri.path().to_string(),
        query: header.uri.query().map(str::to_string),
        accept: text("accept"),
        range: text("range").into_iter().next(),
        authorization: text("authorization").into_iter().next(),
        peer: PeerClaim {
            from: text(proof::HEADER_FROM).into_iter().next(),
            mode: text(proof::HEADER_MODE).into_iter().next(),
            time: text(proof::HEADER_TIME).into_iter().next(),
            proof: text(proof::HEADER_PROOF).into_iter().next(),
        },
    }
}

/// The error a client got, for the status page: an error answer, except a 401 challenge to a
/// request that sent no credentials (the first step of every authenticated pull, not a
/// failure) and a member's probe for what this replica does not hold.
fn client_error(request: &ApiRequest, response: &ApiResponse) -> Option<RecentError> {
    let message = response.error.clone()?;
    let challenge =
        response.status == http::StatusCode::UNAUTHORIZED && request.authorization.is_none();
    if challenge || response.outcome == Outcome::NotHeld {
        return None;
    }
    Some(RecentError {
        at: std::time::SystemTime::now(),
        status: response.status.as_u16(),
        code: response.code.unwrap_or("UNKNOWN").to_string(),
        upstream: response.upstream.as_deref().map(str::to_string),
        repository: response.repository.as_ref().map(|r| r.to_string()),
        message,
    })
}

/// A body that failed after its headers went out (a fill that failed mid-stream).
fn aborted(
    status: u16,
    upstream: Option<&str>,
    repository: Option<&crate::oci::RepoName>,
    message: String,
) -> RecentError {
    RecentError {
        at: std::time::SystemTime::now(),
        status,
        code: "ABORTED".into(),
        upstream: upstream.map(str::to_string),
        repository: repository.map(|r| r.to_string()),
        message,
    }
}

/// Write the response; returns the body bytes sent. An error mid-body (a failed fill) is
/// returned so pingora drops the connection: the client must not take a short body as whole.
async fn write_response(
    session: &mut Session,
    response: ApiResponse,
    metrics: &Metrics,
    recorder: &Recorder,
) -> Result<u64> {
    let mut header = ResponseHeader::build(response.status, Some(response.headers.len()))?;
    for (name, value) in &response.headers {
        header.insert_header(*name, value.as_str())?;
    }
    let served = |n: u64| {
        if let Some(upstream) = &response.upstream {
            metrics
                .served_bytes
                .with_label_values(&[upstream, response.kind, response.outcome.source()])
                .inc_by(n);
            if let Some(repository) = &response.repository {
                recorder.served(upstream, repository.as_str(), n);
            }
        }
    };
    match response.body {
        Body::Empty => {
            session
                .write_response_header(Box::new(header), true)
                .await?;
            Ok(0)
        }
        Body::Full(bytes) => {
            let len = bytes.len() as u64;
            header.set_content_length(bytes.len())?;
            session
                .write_response_header(Box::new(header), false)
                .await?;
            session.write_response_body(Some(bytes), true).await?;
            served(len);
            Ok(len)
        }
        Body::Blob(mut blob) => {
            session
                .write_response_header(Box::new(header), false)
                .await?;
            let mut sent = 0;
            loop {
                let chunk = blob.next_chunk().await.map_err(|e| {
                    Error::explain(ErrorType::InternalError, format!("blob body failed: {e}"))
                });
                match chunk {
                    Ok(Some(bytes)) => {
                        sent += bytes.len() as u64;
                        session.write_response_body(Some(bytes), false).await?;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        served(sent);
                        return Err(e);
                    }
                }
            }
            session.write_response_body(None, true).await?;
            served(sent);
            Ok(sent)
        }
    }
}

/// A shutdown trigger for running dockside in-process (tests): sending `true` stops it fast.
pub struct ChannelShutdown(pub tokio::sync::watch::Receiver<bool>);

#[async_trait]
impl ShutdownSignalWatch for ChannelShutdown {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|stop| *stop).await;
        ShutdownSignal::FastShutdown
    }
}

/// Passes on the shutdown signal, first marking the mirror as stopping so `/readyz` turns
/// away new traffic while requests in flight drain.
struct MarkStopping<W> {
    inner: W,
    mirror: Arc<Mirror>,
}

#[async_trait]
impl<W: ShutdownSignalWatch + Send + Sync> ShutdownSignalWatch for MarkStopping<W> {
    async fn recv(&self) -> ShutdownSignal {
        let signal = self.inner.recv().await;
        if matches!(signal, ShutdownSignal::GracefulUpgrade) {
            // The listeners live on in the new process: this one must not look unready to
            // probes that reach it while both accept.
            info!("handing the listeners over to the new process (SIGQUIT), then draining");
        } else {
            self.mirror.set_stopping();
            info!(?signal, "shutting down; /readyz now answers 503");
        }
        signal
    }
}

/// How `serve` starts.
pub enum Start {
    /// Serve on these sockets and take the cache.
    Fresh(Listeners),
    /// Serve on these sockets over the given stores instead of the disk under `cache.dir`
    /// (the in-process suite runs the mirror on memory this way). The cache lock is still
    /// taken.
    FreshOn(Listeners, Box<(Storage, TagCache)>),
    /// `serve --upgrade`: take the listening sockets over from the server running on this
    /// config (it hands them over on SIGQUIT) and share the cache with it until it exits.
    Upgrade,
}

/// Start the mirror and block until shutdown. `shutdown` is usually pingora's Unix signal
/// watcher (SIGINT fast, SIGTERM graceful within `grace_period`, SIGQUIT hands over listeners).
pub fn run(
    config: Config,
    start: Start,
    shutdown: impl ShutdownSignalWatch + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let upgrade = matches!(start, Start::Upgrade);
    let (_lock, mirror, listeners) = match start {
        Start::Fresh(listeners) => {
            let lock =
                crate::store::CacheLock::acquire(&config.cache.dir, crate::store::lock::SERVER)?;
            (Some(lock), Mirror::new(&config, metrics)?, Some(listeners))
        }
        Start::FreshOn(listeners, stores) => {
            let lock =
                crate::store::CacheLock::acquire(&config.cache.dir, crate::store::lock::SERVER)?;
            let (storage, tags) = *stores;
            let mirror = Mirror::with_storage(&config, metrics, storage, tags)?;
            (Some(lock), mirror, Some(listeners))
        }
        Start::Upgrade => {
            crate::store::CacheLock::take_over(&config.cache.dir)?;
            (None, Mirror::new_beside_running(&config, metrics)?, None)
        }
    };
    mirror.start_maintenance();
    mirror.status().start_sampling(mirror.metrics().clone());
    mirror.start_cluster()?;
    // Before bootstrap: an upgrade must fail while the old server still holds the listeners.
    let tls = match &config.tls {
        Some(files) => Some(ReloadingCert::load(files)?),
        None => None,
    };

    let grace = config.grace_period.as_secs().max(1);
    let mut conf = ServerConf {
        threads: config.threads,
        grace_period_seconds: Some(grace),
        graceful_shutdown_timeout_seconds: Some(grace),
        ..ServerConf::default()
    };
    conf.upgrade_sock = config
        .cache
        .dir
        .join("dockside-upgrade.sock")
        .to_string_lossy()
        .into_owned();
    let opt = pingora::server::configuration::Opt {
        upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    if upgrade {
        info!(socket = %server.configuration.upgrade_sock,
              "waiting up to 5 s for the running server's listeners: send it SIGQUIT");
    }
    server.bootstrap();

    let (registry, admin) = prebound::endpoints(&config, listeners)?;
    info!(listen = ?registry.keys(), tls = config.tls.is_some(), admin = ?admin.as_ref().map(Endpoints::keys),
          cache = %config.cache.dir.display(), upstreams = config.upstreams.len(), "dockside starting");
    let service = registry_service(&server, &config, &mirror, tls.as_ref(), registry.keys())?;
    server.add_service(registry.serve(service));
    if let Some(admin) = admin {
        let mut service = Service::new("dockside admin".to_string(), AdminApp::new(mirror.clone()));
        for key in admin.keys() {
            service.add_tcp(key);
        }
        server.add_service(admin.serve(service));
    }
    server.run(RunArgs {
        shutdown_signal: Box::new(MarkStopping {
            inner: shutdown,
            mirror: mirror.clone(),
        }),
    });
    mirror.save_state();
    info!("dockside stopped");
    Ok(())
}

/// The registry listeners: pingora's proxy app (answering everything in `request_filter`)
/// inside the `limits:` layers, on plain TCP (with h2c) or TLS (with h2 by ALPN).
fn registry_service(
    server: &Server,
    config: &Config,
    mirror: &Arc<Mirror>,
    tls: Option<&Arc<ReloadingCert>>,
    addresses: &[String],
) -> anyhow::Result<Service<Connections<Deadlines<HttpProxy<RegistryService>>>>> {
    let service = RegistryService {
        mirror: mirror.clone(),
    };
    let mut proxy = pingora::proxy::http_proxy(&server.configuration, service);
    let mut options = HttpServerOptions::default();
    options.h2c = tls.is_none();
    options.h2_idle_timeout = Some(config.limits.idle_timeout);
    proxy.server_options = Some(options);
    let metrics = mirror.metrics().clone();
    crate::limits::warn_if_above_fd_limit(config.limits.max_connections);
    let app = Deadlines::new(proxy, config.limits.clone(), metrics.clone());
    let app = Connections::new(app, config.limits.max_connections, metrics.clone());
    let mut registry = Service::new("dockside registry".to_string(), app);
    for addr in addresses {
        match tls {
            Some(cert) => registry.add_tls_with_settings(addr, None, tls_settings(cert)?),
            None => registry.add_tcp(addr),
        }
    }
    if let Some(cert) = tls {
        watch_certificate(cert, metrics);
    }
    Ok(registry)
}

/// Logs and exports the certificate in use, now and after every reload.
fn watch_certificate(cert: &Arc<ReloadingCert>, metrics: Arc<Metrics>) {
    let expiry = |cert: &ReloadingCert, metrics: &Metrics| {
        if let Some(info) = cert.info() {
            let file = cert.cert_file().display().to_string();
            let gauge = metrics.tls_certificate_expiry.with_label_values(&[&file]);
            gauge.set(info.not_after);
        }
    };
    if let Some(info) = cert.info() {
        info.log("serving TLS");
    }
    expiry(cert, &metrics);
    let watched = cert.clone();
    cert.watch(move |outcome| {
        let result = match outcome {
            Reload::Unchanged => return,
            Reload::Reloaded => "reloaded",
            Reload::Rejected(_) => "rejected",
        };
        metrics.tls_reloads.with_label_values(&[result]).inc();
        if let Some(info) = watched.info() {
            info.log("serving TLS");
        }
        expiry(&watched, &metrics);
    });
}

/// rustls asks `cert` for the certificate on every handshake, so a reload reaches new
/// connections; ALPN offers h2 first, then http/1.1.
fn tls_settings(cert: &Arc<ReloadingCert>) -> anyhow::Result<TlsSettings> {
    // No paths: with a resolver set, pingora ignores them.
    let mut settings = TlsSettings::intermediate("", "")?;
    settings.set_cert_resolver(cert.clone());
    settings.enable_h2();
    Ok(settings)
}
