//! The client-facing error type. This is the only place that knows the OCI error wire format and
//! which HTTP status goes with which error.

use bytes::Bytes;
use http::StatusCode;

use crate::fill::FillError;
use crate::oci::range::RangeError;
use crate::oci::{Digest, RouteError};
use crate::store::StoreError;
use crate::upstream::{ResolveError, UpstreamError, UpstreamErrorKind};

/// Everything a registry request can fail with, as the client will see it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("manifest unknown: {name}:{reference}")]
    ManifestUnknown { name: String, reference: String },
    #[error("blob unknown: {digest}")]
    BlobUnknown { digest: Digest },
    #[error("{0}")]
    NameInvalid(String),
    #[error("{0}")]
    NameUnknown(String),
    #[error("{0}")]
    DigestInvalid(String),
    /// A manifest reference no manifest can have (not a tag, not a sha256 digest).
    #[error("{0}")]
    ReferenceInvalid(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    RangeNotSatisfiable(String, u64),
    #[error("upstream {upstream} refused our credentials: {message}")]
    Unauthorized { upstream: String, message: String },
    #[error("upstream {upstream} denied access: {message}")]
    Denied { upstream: String, message: String },
    #[error("upstream {upstream} is rate limiting us")]
    TooManyRequests {
        upstream: String,
        retry_after: Option<u64>,
    },
    #[error("upstream {upstream} sent a manifest larger than {limit} bytes")]
    ManifestTooLarge { upstream: String, limit: u64 },
    /// `origin` names its kind: `upstream docker.io`, `peer 10.0.0.2:5000`, `shared s3://…`.
    #[error("{origin} sent content that does not match {expected} (got {actual})")]
    DigestMismatch {
        origin: String,
        expected: String,
        actual: String,
    },
    #[error("upstream {upstream} is unavailable: {reason}")]
    UpstreamUnavailable { upstream: String, reason: String },
    #[error("upstream {upstream} timed out: {reason}")]
    UpstreamTimeout { upstream: String, reason: String },
    /// The client did not authenticate to dockside (`client_auth`).
    #[error("{0}")]
    ClientUnauthorized(String),
    /// The client may not pull from this upstream.
    #[error("{0}")]
    ClientDenied(String),
    /// A request claiming to come from a cluster member whose proof does not verify.
    #[error("{0}")]
    PeerRefused(String),
    /// Not in the cache, and its upstream is `offline`, so it was not asked: the status, code
    /// and detail are those of `unknown`, the answer a miss gets (404 `MANIFEST_UNKNOWN`, ...).
    #[error("{what} is not cached, and upstream {upstream} is offline (offline: true)")]
    Offline {
        what: String,
        upstream: String,
        unknown: Box<ApiError>,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            Offline { unknown, .. } => unknown.status(),
            ManifestUnknown { .. }
            | ReferenceInvalid(_)
            | BlobUnknown { .. }
            | NameUnknown(_)
            | NotFound(_) => StatusCode::NOT_FOUND,
            NameInvalid(_) | DigestInvalid(_) => StatusCode::BAD_REQUEST,
            Unsupported(_) => StatusCode::METHOD_NOT_ALLOWED,
            RangeNotSatisfiable(..) => StatusCode::RANGE_NOT_SATISFIABLE,
            // The upstream refused *our* credentials: nothing the client can fix, and a 401
            // would need a challenge for credentials dockside does not take.
            Unauthorized { .. } => StatusCode::BAD_GATEWAY,
            Denied { .. } | ClientDenied(_) => StatusCode::FORBIDDEN,
            ClientUnauthorized(_) | PeerRefused(_) => StatusCode::UNAUTHORIZED,
            TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ManifestTooLarge { .. } | DigestMismatch { .. } | UpstreamUnavailable { .. } => {
                StatusCode::BAD_GATEWAY
            }
            UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OCI distribution error code (plus the two docker/distribution codes clients know).
    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            Offline { unknown, .. } => unknown.code(),
            // The distribution spec lists 404 MANIFEST_UNKNOWN as a manifest GET's failure, and
            // its conformance suite asks for it for a reference that is not even valid.
            ManifestUnknown { .. } | ReferenceInvalid(_) => "MANIFEST_UNKNOWN",
            BlobUnknown { .. } => "BLOB_UNKNOWN",
            NameInvalid(_) => "NAME_INVALID",
            NameUnknown(_) => "NAME_UNKNOWN",
            DigestInvalid(_) | DigestMismatch { .. } => "DIGEST_INVALID",
            Unsupported(_) | NotFound(_) => "UNSUPPORTED",
            RangeNotSatisfiable(..) => "BLOB_UNKNOWN",
            Unauthorized { .. } | ClientUnauthorized(_) | PeerRefused(_) => "UNAUTHORIZED",
            Denied { .. } | ClientDenied(_) => "DENIED",
            TooManyRequests { .. } => "TOOMANYREQUESTS",
            ManifestTooLarge { .. } => "MANIFEST_INVALID",
            UpstreamUnavailable { .. } | UpstreamTimeout { .. } => "UNAVAILABLE",
            Internal(_) => "UNKNOWN",
        }
    }

    /// Extra response headers that belong to this error.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            ApiError::TooManyRequests {
                retry_after: Some(secs),
                ..
            } => vec![("Retry-After", secs.to_string())],
            ApiError::RangeNotSatisfiable(_, len) => {
                vec![("Content-Range", format!("bytes */{len}"))]
            }
            ApiError::ClientUnauthorized(_) => {
                vec![("WWW-Authenticate", r#"Basic realm="dockside""#.to_string())]
            }
            _ => Vec::new(),
        }
    }

    /// `{"errors":[{"code","message","detail"}]}`.
    pub fn body(&self) -> Bytes {
        let unknown = match self {
            ApiError::Offline { unknown, .. } => unknown,
            other => other,
        };
        let detail = match unknown {
            ApiError::ManifestUnknown { name, reference } => {
                serde_json::json!({ "name": name, "reference": reference })
            }
            ApiError::BlobUnknown { digest } => serde_json::json!({ "digest": digest.to_string() }),
            _ => serde_json::Value::Null,
        };
        let doc = serde_json::json!({
            "errors": [{ "code": self.code(), "message": self.to_string(), "detail": detail }]
        });
        Bytes::from(doc.to_string())
    }

    /// `unknown` (what a miss is answered) from an `offline` upstream, saying why it was not
    /// asked.
    pub fn offline(upstream: &str, unknown: ApiError) -> ApiError {
        let what = match &unknown {
            ApiError::ManifestUnknown { name, reference } if reference.contains(':') => {
                format!("manifest {name}@{reference}")
            }
            ApiError::ManifestUnknown { name, reference } => format!("manifest {name}:{reference}"),
            ApiError::BlobUnknown { digest } => format!("blob {digest}"),
            other => other.to_string(),
        };
        ApiError::Offline {
            what,
            upstream: upstream.to_string(),
            unknown: Box::new(unknown),
        }
    }

    /// An upstream failure seen while fetching `what`; `not_found` is what a 404 means here.
    /// The upstream could not answer (down, slow, throttling): a cached answer may stand in.
    pub fn is_upstream_failure(&self) -> bool {
        matches!(
            self,
            ApiError::UpstreamUnavailable { .. }
                | ApiError::UpstreamTimeout { .. }
                | ApiError::TooManyRequests { .. }
        )
    }

    /// A fill that failed, for its readers: an origin's failure as an upstream's, a mismatch
    /// as `DIGEST_INVALID`, the cache's own failure as an internal error.
    pub fn from_fill(err: &FillError, not_found: ApiError) -> ApiError {
        match err {
            FillError::Origin(e) => ApiError::from_upstream(&e.as_upstream(), not_found),
            FillError::DigestMismatch {
                origin,
                expected,
                actual,
            } => ApiError::DigestMismatch {
                origin: origin.to_string(),
                expected: expected.to_string(),
                actual: actual.to_string(),
            },
            FillError::Cache(_) => ApiError::Internal(err.to_string()),
        }
    }

    pub fn from_upstream(err: &UpstreamError, not_found: ApiError) -> ApiError {
        let upstream = err.upstream.to_string();
        let message = err.kind.to_string();
        match &err.kind {
            // Any other 4xx is the upstream's definite answer about this object (e.g. no
            // manifest of a type the client accepts), not an outage.
            UpstreamErrorKind::NotFound => not_found,
            UpstreamErrorKind::Offline => ApiError::offline(&upstream, not_found),
            UpstreamErrorKind::Status(code) if (400..500).contains(code) => not_found,
            UpstreamErrorKind::Unauthorized(_) => ApiError::Unauthorized { upstream, message },
            UpstreamErrorKind::Denied(_) => ApiError::Denied { upstream, message },
            UpstreamErrorKind::TooManyRequests { retry_after } => ApiError::TooManyRequests {
                upstream,
                retry_after: *retry_after,
            },
            UpstreamErrorKind::TooLarge { limit } => ApiError::ManifestTooLarge {
                upstream,
                limit: *limit,
            },
            UpstreamErrorKind::DigestMismatch { expected, actual } => ApiError::DigestMismatch {
                origin: format!("upstream {upstream}"),
                expected: expected.to_string(),
                actual: actual.to_string(),
            },
            UpstreamErrorKind::Timeout(_) => ApiError::UpstreamTimeout {
                upstream,
                reason: message,
            },
            _ => ApiError::UpstreamUnavailable {
                upstream,
                reason: message,
            },
        }
    }
}

/// Why an admin endpoint (`admin_listen`) refused or failed a call. Its status is picked here,
/// like every client error's; the admin API writes the message as `{"error": …}`, the plain
/// endpoints as text.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    /// `/readyz` while the mirror cannot serve (shutting down, cache not writable).
    #[error("{0}")]
    NotReady(String),
    #[error("{0}")]
    Internal(String),
    /// A registry-level failure behind an admin call (a purge).
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl AdminError {
    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AdminError::Api(e) => e.status(),
        }
    }
}

impl From<StoreError> for ApiError {
    /// The cache failed a request (not an upstream): 500, with the cause for the log.
    fn from(err: StoreError) -> Self {
        ApiError::Internal(format!("cache: {err}"))
    }
}

impl From<RouteError> for ApiError {
    fn from(err: RouteError) -> Self {
        let message = err.to_string();
        match err {
            RouteError::NameInvalid(_) | RouteError::NamespaceInvalid(_) => {
                ApiError::NameInvalid(message)
            }
            RouteError::DigestInvalid(_) => ApiError::DigestInvalid(message),
            RouteError::ReferenceInvalid(_) => ApiError::ReferenceInvalid(message),
            RouteError::NotFound(_) => ApiError::NotFound(message),
            RouteError::MethodNotAllowed(_) => ApiError::Unsupported(message),
        }
    }
}

impl From<RangeError> for ApiError {
    fn from(err: RangeError) -> Self {
        let message = err.to_string();
        match err {
            RangeError::Unsatisfiable { len, .. } => ApiError::RangeNotSatisfiable(message, len),
        }
    }
}

impl From<ResolveError> for ApiError {
    fn from(err: ResolveError) -> Self {
        match err {
            // dockside is not an open proxy: a host that names no upstream is an unknown name.
            ResolveError::NoUpstream(_) | ResolveError::NoUpstreamForPrefix { .. } => {
                ApiError::NameUnknown(err.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_oci_error_json_with_code_and_detail() {
        let digest = Digest::of(b"x");
        let err = ApiError::BlobUnknown {
            digest: digest.clone(),
        };
        let v: serde_json::Value = serde_json::from_slice(&err.body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
        assert_eq!(v["errors"][0]["detail"]["digest"], digest.to_string());
        assert_eq!(err.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn push_methods_map_to_405_unsupported() {
        let err = ApiError::from(RouteError::MethodNotAllowed("PUT".into()));
        assert_eq!(err.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(err.code(), "UNSUPPORTED");
    }

    #[test]
    fn an_invalid_manifest_reference_is_an_unknown_manifest() {
        let err = ApiError::from(RouteError::ReferenceInvalid(
            ".INVALID_MANIFEST_NAME".into(),
        ));
        assert_eq!(err.status(), StatusCode::NOT_FOUND);
        assert_eq!(err.code(), "MANIFEST_UNKNOWN");
        assert!(err.to_string().contains(".INVALID_MANIFEST_NAME"), "{err}");
    }

    #[test]
    fn an_unknown_upstream_is_name_unknown() {
        let err = ApiError::from(ResolveError::NoUpstream("quay.io".into()));
        assert_eq!(err.status(), StatusCode::NOT_FOUND);
        assert_eq!(err.code(), "NAME_UNKNOWN");
        assert_eq!(err.to_string(), "no upstream is configured for \"quay.io\"");
    }

    fn upstream(kind: UpstreamErrorKind) -> UpstreamError {
        UpstreamError::new(&std::sync::Arc::from("docker.io"), kind)
    }

    #[test]
    fn upstream_4xx_is_a_definite_answer_and_5xx_an_outage() {
        let unknown = || ApiError::NotFound("x".into());
        let err = ApiError::from_upstream(&upstream(UpstreamErrorKind::Status(400)), unknown());
        assert_eq!(err.status(), StatusCode::NOT_FOUND);
        let err = ApiError::from_upstream(&upstream(UpstreamErrorKind::Status(503)), unknown());
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(err.code(), "UNAVAILABLE");
        assert!(err.to_string().contains("docker.io"));
    }

    #[test]
    fn a_miss_from_an_offline_upstream_says_so_and_stays_a_404() {
        let digest = Digest::of(b"x");
        let blob = ApiError::from_upstream(
            &upstream(UpstreamErrorKind::Offline),
            ApiError::BlobUnknown {
                digest: digest.clone(),
            },
        );
        assert_eq!(blob.status(), StatusCode::NOT_FOUND);
        assert_eq!(blob.code(), "BLOB_UNKNOWN");
        assert_eq!(
            blob.to_string(),
            format!(
                "blob {digest} is not cached, and upstream docker.io is offline (offline: true)"
            )
        );
        let v: serde_json::Value = serde_json::from_slice(&blob.body()).unwrap();
        assert_eq!(v["errors"][0]["detail"]["digest"], digest.to_string());
        let tag = ApiError::offline(
            "docker.io",
            ApiError::ManifestUnknown {
                name: "library/other".into(),
                reference: "1.0".into(),
            },
        );
        assert_eq!(tag.code(), "MANIFEST_UNKNOWN");
        assert_eq!(
            tag.to_string(),
            "manifest library/other:1.0 is not cached, and upstream docker.io is offline (offline: true)"
        );
    }

    #[test]
    fn refused_upstream_credentials_are_a_gateway_error_not_a_challenge() {
        let kind = UpstreamErrorKind::Unauthorized("bad password".into());
        let err = ApiError::from_upstream(&upstream(kind), ApiError::NotFound("x".into()));
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(err.code(), "UNAUTHORIZED");
    }

    #[test]
    fn rate_limit_carries_retry_after() {
        let err = ApiError::TooManyRequests {
            upstream: "docker.io".into(),
            retry_after: Some(30),
        };
        assert_eq!(err.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(err.headers(), vec![("Retry-After", "30".to_string())]);
        assert!(err.to_string().contains("docker.io"));
    }
}
