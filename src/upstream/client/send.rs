//! One HTTP exchange with an upstream URL: sending with the first-byte timeout and its metrics,
//! and mapping what came back (a status, or a reqwest error) to an [`UpstreamErrorKind`].

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, StatusCode};
use reqwest::header::{ACCEPT, AUTHORIZATION, RETRY_AFTER};
use url::Url;

use super::{Call, Upstream};
use crate::upstream::{UpstreamError, UpstreamErrorKind};

impl Upstream {
    pub(super) async fn send(
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

    pub(super) fn check_status(
        &self,
        resp: reqwest::Response,
    ) -> Result<reqwest::Response, UpstreamError> {
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

/// An error with its causes: the full chain says why (refused, DNS, TLS); the top level only
/// says "error sending request".
pub fn error_chain(err: &reqwest::Error) -> String {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

pub(super) fn classify(err: &reqwest::Error) -> UpstreamErrorKind {
    let message = error_chain(err);
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
