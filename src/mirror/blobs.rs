//! Blobs: from the store, or from the one fill in flight per digest; `Range` on either.

use std::sync::Arc;

use http::{Method, StatusCode};

use super::Mirror;
use super::response::{ApiResponse, Body, Outcome};
use crate::error::ApiError;
use crate::fill::{BlobBody, BlobSource, wait_started};
use crate::oci::range::{Span, parse_range};
use crate::oci::{Digest, RepoName};
use crate::origin::UpstreamOrigin;
use crate::origin::upstream::content_length;
use crate::upstream::Upstream;

impl Mirror {
    pub(super) async fn blob(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        name: &RepoName,
        digest: &Digest,
        range: Option<&str>,
    ) -> Result<ApiResponse, ApiError> {
        let origin = Arc::new(UpstreamOrigin::new(upstream, name));
        let source = self.fills.get(digest, origin).await?;
        let blob_unknown = || ApiError::BlobUnknown {
            digest: digest.clone(),
        };
        match source {
            BlobSource::Cached(obj) => {
                let span = parse_range(range, Some(obj.len))?;
                let body = BlobBody::cached(obj.reader, span.start, span.end.unwrap_or(obj.len));
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
                    .map_err(|e| ApiError::from_fill(&e, blob_unknown()))?;
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
    pub(super) async fn blob_head(
        &self,
        upstream: &Upstream,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<ApiResponse, ApiError> {
        let stat = self.store.stat(digest).await;
        let known = stat?.map(|len| (len, Outcome::Hit));
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
}

pub(super) fn blob_response(
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
