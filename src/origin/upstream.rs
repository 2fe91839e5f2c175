//! The upstream registry as an [`Origin`]: a blob GET, and a `Range` GET to resume one, whose
//! answer must be a 206 for exactly the rest of the blob.

use std::sync::Arc;

use async_trait::async_trait;
use futures_util::StreamExt;

use super::{Origin, OriginBody, OriginError, OriginErrorKind, OriginKind, OriginName};
use crate::oci::{Digest, RepoName};
use crate::upstream::client::body_error;
use crate::upstream::{Upstream, UpstreamError};

/// A repository's blobs on its upstream.
pub struct UpstreamOrigin {
    origin: OriginName,
    upstream: Arc<Upstream>,
    repository: RepoName,
}

impl UpstreamOrigin {
    pub fn new(upstream: &Arc<Upstream>, repository: &RepoName) -> UpstreamOrigin {
        UpstreamOrigin {
            origin: OriginName::new(OriginKind::Upstream, &upstream.name),
            upstream: upstream.clone(),
            repository: repository.clone(),
        }
    }

    fn error(&self, err: UpstreamError) -> OriginError {
        OriginError::new(&self.origin, OriginErrorKind::Upstream(err.kind))
    }
}

#[async_trait]
impl Origin for UpstreamOrigin {
    fn name(&self) -> &OriginName {
        &self.origin
    }

    async fn fetch(&self, digest: &Digest, from: u64) -> Result<OriginBody, OriginError> {
        let resp = self
            .upstream
            .blob_from(&self.repository, digest, from)
            .await
            .map_err(|e| self.error(e))?;
        let len = if from == 0 {
            content_length(resp.headers())
        } else {
            Some(rest_of(&resp, from).ok_or_else(|| self.not_the_rest(from))?)
        };
        let (origin, upstream) = (self.origin.clone(), self.upstream.name.clone());
        let chunks = resp
            .bytes_stream()
            .map(move |chunk| {
                chunk.map_err(|e| {
                    let kind = OriginErrorKind::Upstream(body_error(&upstream, &e).kind);
                    OriginError::new(&origin, kind)
                })
            })
            .boxed();
        Ok(OriginBody { len, chunks })
    }
}

impl UpstreamOrigin {
    fn not_the_rest(&self, from: u64) -> OriginError {
        OriginError::new(&self.origin, OriginErrorKind::NotTheRest { from })
    }
}

/// The blob's total length when a response is a 206 whose Content-Range runs from `from` to
/// the blob's end.
pub fn rest_of(resp: &reqwest::Response, from: u64) -> Option<u64> {
    if resp.status() != http::StatusCode::PARTIAL_CONTENT {
        return None;
    }
    let range = resp
        .headers()
        .get(http::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    let (span, total) = range.strip_prefix("bytes ")?.split_once('/')?;
    let (start, end) = span.split_once('-')?;
    let (start, end): (u64, u64) = (start.parse().ok()?, end.parse().ok()?);
    let total = match total {
        "*" => end.checked_add(1)?,
        n => n.parse().ok()?,
    };
    (start == from && end.checked_add(1)? == total).then_some(total)
}

pub fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, range: Option<&str>) -> reqwest::Response {
        let mut b = http::Response::builder().status(status);
        if let Some(r) = range {
            b = b.header(http::header::CONTENT_RANGE, r);
        }
        reqwest::Response::from(b.body(reqwest::Body::from("")).unwrap())
    }

    #[test]
    fn only_a_206_for_exactly_the_rest_is_a_resume() {
        assert_eq!(rest_of(&resp(206, Some("bytes 10-99/100")), 10), Some(100));
        assert_eq!(rest_of(&resp(206, Some("bytes 10-99/*")), 10), Some(100));
        assert_eq!(rest_of(&resp(206, Some("bytes 0-99/100")), 10), None);
        assert_eq!(rest_of(&resp(206, Some("bytes 10-49/100")), 10), None);
        assert_eq!(rest_of(&resp(200, None), 10), None);
        assert_eq!(rest_of(&resp(206, None), 10), None);
        assert_eq!(rest_of(&resp(206, Some("items 10-99/100")), 10), None);
    }
}
