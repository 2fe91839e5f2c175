//! The admin endpoints on `admin_listen`: `/metrics` (Prometheus text), `/healthz` (the process
//! answers), `/readyz` (not shutting down, and the cache directory is writable), and the JSON cache API under `/api/`
//! (list what is cached, purge it). The admin listener has no authentication: bind it to
//! loopback or a private network.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::inventory;
use crate::mirror::{Mirror, PurgeTarget};
use crate::oci::{Digest, RepoName, Tag};

pub struct AdminApp {
    mirror: Arc<Mirror>,
}

impl AdminApp {
    pub fn new(mirror: Arc<Mirror>) -> AdminApp {
        AdminApp { mirror }
    }

    fn ready(&self) -> Result<(), String> {
        if self.mirror.is_stopping() {
            return Err("shutting down".into());
        }
        let probe = self.mirror.store().tmp_probe_path();
        std::fs::write(&probe, b"ready")
            .and_then(|()| std::fs::remove_file(&probe))
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
            let (status, body) = self.api(&method, &path, &query).await;
            return respond(status, "application/json", body);
        }
        let (status, content_type, body) = match path.as_str() {
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.mirror.metrics().render(),
            ),
            "/healthz" => (StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/readyz" => match self.ready() {
                Ok(()) => (StatusCode::OK, "text/plain", b"ready\n".to_vec()),
                Err(e) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("{e}\n").into_bytes(),
                ),
            },
            _ => (StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
        };
        respond(status, content_type, body)
    }
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

fn api_error(status: StatusCode, message: impl std::fmt::Display) -> ApiAnswer {
    json(status, &serde_json::json!({ "error": message.to_string() }))
}

impl AdminApp {
    async fn api(&self, method: &Method, path: &str, query: &str) -> ApiAnswer {
        match (method, path) {
            (&Method::GET, "/api/repositories") => self.repositories().await,
            (&Method::DELETE, "/api/cache") => match self.purge_target(query) {
                Ok(target) => match self.mirror.purge(target).await {
                    Ok(report) => json(StatusCode::OK, &report),
                    Err(e) => api_error(e.status(), e),
                },
                Err(e) => api_error(StatusCode::BAD_REQUEST, e),
            },
            (_, "/api/repositories" | "/api/cache") => api_error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}"),
            ),
            _ => api_error(StatusCode::NOT_FOUND, format!("no admin API at {path}")),
        }
    }

    async fn repositories(&self) -> ApiAnswer {
        let mirror = self.mirror.clone();
        let listed = tokio::task::spawn_blocking(move || {
            inventory::repositories(mirror.store(), mirror.tags())
        })
        .await;
        match listed {
            Ok(repos) => json(StatusCode::OK, &repos),
            Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
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

    #[test]
    fn not_ready_once_shutdown_has_begun() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "listen: 127.0.0.1:0\ncache: {{ dir: {:?}, max_size: 1MiB }}\n\
             upstreams: [{{ name: docker.io, url: 'http://127.0.0.1:1' }}]\n",
            dir.path()
        );
        let config = Config::from_yaml(&yaml, "test").unwrap();
        let app = AdminApp::new(Mirror::new(&config, Arc::new(Metrics::new())).unwrap());
        assert_eq!(app.ready(), Ok(()));
        app.mirror.set_stopping();
        assert_eq!(app.ready(), Err("shutting down".to_string()));
    }
}
