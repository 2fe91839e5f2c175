//! The admin endpoints on `admin_listen`: `/metrics` (Prometheus text), `/healthz` (the process
//! answers), `/readyz` (the cache directory is writable).

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::mirror::Mirror;

pub struct AdminApp {
    mirror: Arc<Mirror>,
}

impl AdminApp {
    pub fn new(mirror: Arc<Mirror>) -> AdminApp {
        AdminApp { mirror }
    }

    fn ready(&self) -> Result<(), String> {
        let probe = self.mirror.store().tmp_probe_path();
        std::fs::write(&probe, b"ready")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| format!("cache directory is not writable: {e}"))
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
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
        Response::builder()
            .status(status)
            .header("Content-Type", content_type)
            .header("Content-Length", body.len())
            .body(body)
            .expect("static response parts are valid")
    }
}
