//! Blobs: from the store, or from the one fill in flight per digest; `Range` on either.

use std::sync::Arc;

use http::{Method, StatusCode};

use super::Mirror;
use super::peers::{asked, is_held_only};
use super::response::{ApiResponse, Body, Outcome};
use crate::cluster::{RingKey, Via};
use crate::error::ApiError;
use crate::fill::{BlobBody, BlobSource, wait_started};
use crate::oci::range::{Span, parse_range};
use crate::oci::{Digest, RepoName};
use crate::origin::upstream::content_length;
use crate::origin::{ChainOrigin, Origin, UpstreamOrigin};
use crate::shared::origin::KeepBehind;
use crate::upstream::Upstream;

impl Mirror {
    pub(super) async fn blob(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        name: &RepoName,
        digest: &Digest,
        range: Option<&str>,
        via: &Via,
    ) -> Result<ApiResponse, ApiError> {
        let blob_unknown = || ApiError::BlobUnknown {
            digest: digest.clone(),
        };
        let source = match self.blob_source(upstream, name, digest, via).await? {
            Some(source) => source,
            None => return Err(blob_unknown()),
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

    /// Where a blob's bytes come from: the store, the fill in flight, or a new fill from the
    /// shared tier, the cluster's hops and then the upstream. `None`: a member asked for what
    /// this replica holds, and it holds nothing.
    async fn blob_source(
        &self,
        upstream: &Arc<Upstream>,
        name: &RepoName,
        digest: &Digest,
        via: &Via,
    ) -> Result<Option<BlobSource>, ApiError> {
        if is_held_only(via) {
            return Ok(self.store.open(digest).await?.map(BlobSource::Cached));
        }
        // Made only when a fill starts: a hit or a join ranks nothing and builds no chain.
        let origin = || {
            let mut origins = Vec::new();
            let mut last: Arc<dyn Origin> = Arc::new(UpstreamOrigin::new(upstream, name));
            if let Some(tier) = &self.shared {
                origins.push(tier.origin());
                last = Arc::new(KeepBehind::new(last, tier.clone()));
            }
            if let Some(cluster) = &self.cluster {
                let hops = cluster.hops(&RingKey::digest(digest), via);
                origins.extend(cluster.peer_origins(&hops, &asked(upstream, name)));
                cluster.count_fill(&hops);
            }
            origins.push(last);
            match origins.len() {
                1 => origins.pop().expect("one origin"),
                _ => Arc::new(ChainOrigin::new(origins)) as Arc<dyn Origin>,
            }
        };
        Ok(Some(self.fills.get_with(digest, origin).await?))
    }

    /// HEAD of a blob: from the cache or a fill in flight when we can, else asked of the
    /// cluster's hops and then upstream, without fetching.
    pub(super) async fn blob_head(
        &self,
        upstream: &Upstream,
        name: &RepoName,
        digest: &Digest,
        via: &Via,
    ) -> Result<ApiResponse, ApiError> {
        let stat = self.store.stat(digest).await;
        let known = stat?.map(|len| (len, Outcome::Hit));
        let known = known.or_else(|| {
            let len = self.fills.len_in_flight(digest)?;
            Some((len, Outcome::Coalesced))
        });
        let blob_unknown = || ApiError::BlobUnknown {
            digest: digest.clone(),
        };
        if known.is_none() && is_held_only(via) {
            return Err(blob_unknown());
        }
        let known = match known {
            Some(known) => Some(known),
            None => self.blob_len_elsewhere(upstream, name, digest, via).await?,
        };
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

impl Mirror {
    /// A blob's length from the shared tier, else the cluster's hops.
    async fn blob_len_elsewhere(
        &self,
        upstream: &Upstream,
        name: &RepoName,
        digest: &Digest,
        via: &Via,
    ) -> Result<Option<(u64, Outcome)>, ApiError> {
        if let Some(tier) = &self.shared {
            if let Some(len) = tier.len(digest).await {
                return Ok(Some((len, Outcome::Pass)));
            }
        }
        let len = self
            .blob_len_from_peers(upstream, name, digest, via)
            .await?;
        Ok(len.map(|len| (len, Outcome::Pass)))
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
