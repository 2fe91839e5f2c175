//! What a handler answers: the request as the mirror sees it, the response and its body.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::cluster::PeerClaim;
use crate::error::ApiError;
use crate::fill::BlobBody;
use crate::oci::{Digest, RepoName};

/// A request as the mirror needs it.
pub struct ApiRequest {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub accept: Vec<String>,
    pub range: Option<String>,
    pub authorization: Option<String>,
    /// The `x-dockside-peer*` headers: set when another cluster member sends it.
    pub peer: PeerClaim,
}

pub enum Body {
    Empty,
    Full(Bytes),
    Blob(BlobBody),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered from the cache.
    Hit,
    /// Fetched from upstream for this request.
    Miss,
    /// Joined a fetch another request started.
    Coalesced,
    /// Served from cache because the upstream failed.
    Stale,
    /// Passed through from upstream without caching.
    Pass,
    /// A member asked for what this replica holds, and it holds nothing (an expected miss
    /// of the cluster's probe, not a failure).
    NotHeld,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Coalesced => "coalesced",
            Outcome::Stale => "stale",
            Outcome::Pass => "pass",
            Outcome::NotHeld => "not_held",
            Outcome::Error => "error",
        }
    }

    /// Where the body bytes came from, for the bytes-served metric.
    pub fn source(self) -> &'static str {
        match self {
            Outcome::Miss | Outcome::Coalesced => "fill",
            Outcome::Pass => "upstream",
            _ => "cache",
        }
    }
}

pub struct ApiResponse {
    pub status: StatusCode,
    pub headers: Vec<(&'static str, String)>,
    pub body: Body,
    pub upstream: Option<Arc<str>>,
    /// The repository as the upstream names it, once resolved.
    pub repository: Option<RepoName>,
    pub kind: &'static str,
    pub outcome: Outcome,
    /// For error answers: why, for the request log.
    pub error: Option<String>,
    /// For error answers: the OCI error code.
    pub code: Option<&'static str>,
}

impl ApiResponse {
    pub(super) fn error(err: &ApiError) -> ApiResponse {
        let mut headers = err.headers();
        headers.push(("Content-Type", "application/json".into()));
        ApiResponse {
            status: err.status(),
            headers,
            body: Body::Full(err.body()),
            upstream: None,
            repository: None,
            kind: "invalid",
            outcome: Outcome::Error,
            error: Some(err.to_string()),
            code: Some(err.code()),
        }
    }

    pub(super) fn new(status: StatusCode, outcome: Outcome) -> ApiResponse {
        ApiResponse {
            status,
            headers: Vec::new(),
            body: Body::Empty,
            upstream: None,
            repository: None,
            kind: "invalid",
            outcome,
            error: None,
            code: None,
        }
    }
}

#[derive(Debug)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub body: Bytes,
}

pub(super) type ManifestResult = Result<(Arc<Manifest>, Outcome), ApiError>;

/// Clients check this header to know they are talking to a v2 registry (docker does on its
/// first `/v2/`, also when that answers 401).
pub(super) fn with_api_version(mut resp: ApiResponse) -> ApiResponse {
    resp.headers.push((
        "Docker-Distribution-API-Version",
        "registry/2.0".to_string(),
    ));
    resp
}

pub(super) fn header_str(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

pub(super) fn header_digest(resp: &reqwest::Response) -> Option<Digest> {
    Digest::parse(&header_str(resp, "docker-content-digest")?).ok()
}
