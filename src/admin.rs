//! The admin endpoints on `admin_listen`: `/metrics` (Prometheus text), `/healthz` (the process
//! answers), `/readyz` (not shutting down, and the cache directory is writable), and the JSON cache API under `/api/`
//! (list what is cached, purge it), and the status page at `/` (and `/status`, see
//! [`crate::status`]). The admin listener has no authentication of its own: bind it to
//! loopback or a private network. The status page alone asks for the registry's credentials
//! when `client_auth` is set, since it is the endpoint meant to be opened in a browser and it
//! names the repositories clients pull.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use std::sync::Mutex;

use crate::airgap::prefetch::{self, PlatformChoice};
use crate::error::AdminError;
use crate::inventory;
use crate::mirror::{Mirror, PurgeTarget};
use crate::oci::{Digest, ImageRef, RepoName, Tag};
use crate::status::{page, view};

pub struct AdminApp {
    mirror: Arc<Mirror>,
    /// Prefetches started through the API, by id: `None` while running.
    prefetches: Arc<Mutex<Vec<Option<serde_json::Value>>>>,
}

/// A request body larger than this is refused: image lists, not bundles.
const BODY_LIMIT: usize = 1 << 20;

impl AdminApp {
    pub fn new(mirror: Arc<Mirror>) -> AdminApp {
        AdminApp {
            mirror,
            prefetches: Arc::default(),
        }
    }

    async fn ready(&self) -> Result<(), String> {
        if self.mirror.is_stopping() {
            return Err("shutting down".into());
        }
        if let Some(cluster) = self.mirror.cluster() {
            if !cluster.is_ready() {
                return Err("cluster members not known yet (cluster.peers_dns)".into());
            }
        }
        let store = self.mirror.store();
        store
            .ready()
            .await
            .map_err(|e| format!("cache directory is not writable: {e}"))
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let header = session.req_header();
        let (method, path) = (header.method.clone(), header.uri.path().to_string());
        let query = header.uri.query().unwrap_or("").to_string();
        if path.starts_with("/api/") {
            let body = match read_body(session).await {
                Ok(body) => body,
                Err(e) => {
                    let (status, body) = api_error(AdminError::BadRequest(e));
                    return respond(status, "application/json", body);
                }
            };
            let (status, body) = self.api(&method, &path, &query, &body).await;
            return respond(status, "application/json", body);
        }
        if matches!(path.as_str(), "/" | "/status") {
            let authorization = header.headers.get("authorization");
            let authorization = authorization
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            return self.status_page(authorization.as_deref()).await;
        }
        let (status, content_type, body) = match path.as_str() {
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.metrics_text(),
            ),
            "/healthz" => (StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/readyz" => match self.ready().await {
                Ok(()) => (StatusCode::OK, "text/plain", b"ready\n".to_vec()),
                Err(e) => text_error(AdminError::NotReady(e)),
            },
            _ => text_error(AdminError::NotFound("not found".into())),
        };
        respond(status, content_type, body)
    }
}

impl AdminApp {
    /// The Prometheus text. The store's figures are read now: they change on their own (the
    /// deleter thread's unlinks) and an eviction's count must not wait for the next fill.
    fn metrics_text(&self) -> Vec<u8> {
        let metrics = self.mirror.metrics();
        metrics.record_usage(self.mirror.budget().usage());
        metrics.render()
    }

    /// The status page; with `client_auth`, only for a client whose credentials pass.
    async fn status_page(&self, authorization: Option<&str>) -> Response<Vec<u8>> {
        if let Some(auth) = self.mirror.client_auth() {
            if let Err(e) = auth.authenticate(authorization).await {
                let headers = e.headers();
                let (status, content_type, body) = text_error(AdminError::Api(e));
                let mut resp = respond(status, content_type, body);
                for (name, value) in headers {
                    resp.headers_mut()
                        .insert(name, value.parse().expect("a valid challenge"));
                }
                return resp;
            }
        }
        let m = &self.mirror;
        let sources = view::Sources {
            metrics: m.metrics(),
            budget: m.budget().as_ref(),
            fills: m.fills(),
            cluster: m.cluster().map(|c| c.as_ref()),
            recorder: m.status(),
        };
        let html = page::render(&view::View::gather(&sources));
        let mut resp = respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            html.into_bytes(),
        );
        // Figures of this moment: never from a cache.
        resp.headers_mut()
            .insert("Cache-Control", http::HeaderValue::from_static("no-store"));
        resp
    }
}

fn report_json(report: &prefetch::PrefetchReport) -> serde_json::Value {
    let images: Vec<serde_json::Value> = report
        .images
        .iter()
        .map(|i| match &i.result {
            Ok(c) => serde_json::json!({
                "image": i.image.to_string(), "ok": true,
                "blobs_fetched": c.blobs_fetched, "blobs_cached": c.blobs_cached,
                "bytes_fetched": c.bytes_fetched, "bytes_cached": c.bytes_cached,
                "blobs_shared": c.blobs_shared, "bytes_shared": c.bytes_shared,
            }),
            Err(e) => serde_json::json!({ "image": i.image.to_string(), "ok": false, "error": e }),
        })
        .collect();
    serde_json::json!({
        "state": "done",
        "elapsed_seconds": report.elapsed.as_secs_f64(),
        "images": images,
    })
}

async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = session
        .read_request_body()
        .await
        .map_err(|e| format!("reading the request body: {e}"))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > BODY_LIMIT {
            return Err(format!("request body larger than {BODY_LIMIT} bytes"));
        }
    }
    Ok(body)
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .header("Content-Length", body.len())
        .body(body)
        .expect("static response parts are valid")
}

type ApiAnswer = (StatusCode, Vec<u8>);

fn json(status: StatusCode, value: &impl serde::Serialize) -> ApiAnswer {
    let mut body = serde_json::to_vec_pretty(value).expect("reports serialize");
    body.push(b'\n');
    (status, body)
}

fn api_error(err: AdminError) -> ApiAnswer {
    json(
        err.status(),
        &serde_json::json!({ "error": err.to_string() }),
    )
}

fn text_error(err: AdminError) -> (StatusCode, &'static str, Vec<u8>) {
    (err.status(), "text/plain", format!("{err}\n").into_bytes())
}

impl AdminApp {
    async fn api(&self, method: &Method, path: &str, query: &str, body: &[u8]) -> ApiAnswer {
        if let Some(id) = path.strip_prefix("/api/prefetch/") {
            return self.prefetch_status(id);
        }
        match (method, path) {
            (&Method::POST, "/api/prefetch") => self.start_prefetch(body),
            (&Method::GET, "/api/repositories") => self.repositories().await,
            (&Method::DELETE, "/api/cache") => match self.purge_target(query) {
                Ok(target) => match self.mirror.purge(target).await {
                    Ok(report) => json(StatusCode::OK, &report),
                    Err(e) => api_error(e.into()),
                },
                Err(e) => api_error(AdminError::BadRequest(e)),
            },
            (_, "/api/repositories" | "/api/cache") => api_error(AdminError::MethodNotAllowed(
                format!("{method} is not allowed on {path}"),
            )),
            _ => api_error(AdminError::NotFound(format!("no admin API at {path}"))),
        }
    }

    /// `{"images": ["alpine:3.20", …], "platforms": "linux/amd64,linux/arm64" | "all"}`: starts
    /// a prefetch in the background and answers 202 with where to follow it.
    fn start_prefetch(&self, body: &[u8]) -> ApiAnswer {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Wanted {
            images: Vec<String>,
            platforms: Option<String>,
        }
        let wanted: Wanted = match serde_json::from_slice(body) {
            Ok(w) => w,
            Err(e) => return api_error(AdminError::BadRequest(format!("request body: {e}"))),
        };
        let images: Result<Vec<ImageRef>, String> = wanted
            .images
            .iter()
            .map(|i| ImageRef::parse(i).map_err(|e| format!("{i:?}: {e}")))
            .collect();
        let platforms = match wanted.platforms.as_deref() {
            None => Ok(PlatformChoice::default()),
            Some("all") => Ok(PlatformChoice::All),
            Some(list) => PlatformChoice::parse(list),
        };
        let (images, platforms) = match (images, platforms) {
            (Ok(i), Ok(p)) if !i.is_empty() => (i, p),
            (Ok(_), Ok(_)) => return api_error(AdminError::BadRequest("no images given".into())),
            (Err(e), _) | (_, Err(e)) => return api_error(AdminError::BadRequest(e.to_string())),
        };
        let id = {
            let mut jobs = self.prefetches.lock().expect("prefetch jobs");
            jobs.push(None);
            jobs.len() - 1
        };
        let (mirror, jobs) = (self.mirror.clone(), self.prefetches.clone());
        // The prefetch future borrows across its stream combinators in a way `tokio::spawn`'s
        // `Send` check cannot see through; a blocking thread driving it avoids that check.
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let report = runtime.block_on(prefetch::prefetch(
                &mirror,
                &images,
                &platforms,
                &prefetch::Quiet,
            ));
            jobs.lock().expect("prefetch jobs")[id] = Some(report_json(&report));
        });
        json(
            StatusCode::ACCEPTED,
            &serde_json::json!({ "id": id, "status": format!("/api/prefetch/{id}") }),
        )
    }

    fn prefetch_status(&self, id: &str) -> ApiAnswer {
        let jobs = self.prefetches.lock().expect("prefetch jobs");
        match id.parse::<usize>().ok().and_then(|i| jobs.get(i)) {
            Some(None) => json(StatusCode::OK, &serde_json::json!({ "state": "running" })),
            Some(Some(report)) => json(StatusCode::OK, report),
            None => api_error(AdminError::NotFound(format!("no prefetch {id:?}"))),
        }
    }

    async fn repositories(&self) -> ApiAnswer {
        let mirror = self.mirror.clone();
        let listed = tokio::task::spawn_blocking(move || mirror.tags().list()).await;
        match listed {
            Ok(saved) => {
                let repos = inventory::repositories(self.mirror.store().as_ref(), saved).await;
                json(StatusCode::OK, &repos)
            }
            Err(e) => api_error(AdminError::Internal(e.to_string())),
        }
    }

    /// `?digest=sha256:…`, or `?upstream=…&repository=…[&tag=…]`.
    fn purge_target(&self, query: &str) -> Result<PurgeTarget, String> {
        let mut params = std::collections::HashMap::new();
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            params.insert(k.into_owned(), v.into_owned());
        }
        if let Some(digest) = params.get("digest") {
            return Digest::parse(digest)
                .map(PurgeTarget::Digest)
                .map_err(|e| e.to_string());
        }
        let (Some(upstream), Some(repository)) = (params.get("upstream"), params.get("repository"))
        else {
            return Err(
                "give digest=…, or upstream=… and repository=… (and optionally tag=…)".into(),
            );
        };
        let name = RepoName::parse(repository).map_err(|e| e.to_string())?;
        let (upstream, name) = self
            .mirror
            .upstreams()
            .resolve(Some(upstream), &name)
            .map_err(|e| e.to_string())?;
        let tag = match params.get("tag") {
            Some(tag) => Some(Tag::parse(tag).map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(PurgeTarget::Repository {
            upstream: upstream.name.clone(),
            name,
            tag,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;

    #[tokio::test]
    async fn not_ready_once_shutdown_has_begun() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "listen: 127.0.0.1:0\ncache: {{ dir: {:?}, max_size: 1MiB }}\n\
             upstreams: [{{ name: docker.io, url: 'http://127.0.0.1:1' }}]\n",
            dir.path()
        );
        let config = Config::from_yaml(&yaml, "test").unwrap();
        let app = AdminApp::new(Mirror::new(&config, Arc::new(Metrics::new())).unwrap());
        assert_eq!(app.ready().await, Ok(()));
        app.mirror.set_stopping();
        assert_eq!(app.ready().await, Err("shutting down".to_string()));
    }

    fn app_with(dir: &std::path::Path, extra: &str) -> AdminApp {
        let yaml = format!(
            "listen: 127.0.0.1:0\ncache: {{ dir: {:?}, max_size: 1MiB }}\n\
             upstreams: [{{ name: docker.io, url: 'http://127.0.0.1:1' }}]\n{extra}",
            dir.join("cache")
        );
        let config = Config::from_yaml(&yaml, "test").unwrap();
        AdminApp::new(Mirror::new(&config, Arc::new(Metrics::new())).unwrap())
    }

    #[tokio::test]
    async fn the_status_page_asks_for_client_auth_credentials_when_it_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret-token-0123456789\n").unwrap();
        let auth = format!("client_auth: {{ tokens: [{{ name: ci, token_file: {token:?} }}] }}\n");
        let app = app_with(dir.path(), &auth);
        for wrong in [None, Some("Bearer wrong-token-0123456789")] {
            let resp = app.status_page(wrong).await;
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{wrong:?}");
            let challenge = resp.headers().get("www-authenticate").unwrap();
            assert_eq!(challenge, r#"Basic realm="dockside""#);
            assert!(!String::from_utf8_lossy(resp.body()).contains("<html"));
        }
        let resp = app
            .status_page(Some("Bearer s3cret-token-0123456789"))
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(String::from_utf8_lossy(resp.body()).contains("dockside status"));
    }

    #[tokio::test]
    async fn metrics_show_the_stores_evictions_without_waiting_for_a_fill_to_record_them() {
        let dir = tempfile::tempdir().unwrap();
        let app = app_with(dir.path(), "");
        let store = app.mirror.store();
        for byte in [1u8, 2] {
            let blob = bytes::Bytes::from(vec![byte; 600 << 10]);
            store.put(&Digest::of(&blob), blob).await.unwrap();
        }
        let text = String::from_utf8(app.metrics_text()).unwrap();
        assert!(text.contains("\ndockside_evictions_total 1\n"), "{text}");
        assert!(text.contains("\ndockside_cache_objects 1\n"), "{text}");
    }

    #[tokio::test]
    async fn without_client_auth_the_status_page_is_open_like_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let resp = app_with(dir.path(), "").status_page(None).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let content_type = resp.headers().get("content-type").unwrap();
        assert_eq!(content_type, "text/html; charset=utf-8");
        assert_eq!(resp.headers().get("cache-control").unwrap(), "no-store");
    }
}
