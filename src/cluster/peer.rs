//! Asking another member: a signed GET or HEAD on its registry listener, for a blob (as an
//! [`Origin`], so the fill streams from it and resumes with `Range`), a manifest or a blob's
//! length. The request carries nothing of the client's: no credentials, no headers but
//! `Accept` and `Range`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{Method, StatusCode};

use super::members::Membership;
use super::proof::{Mode, Signer};
use crate::config::PeerAddr;
use crate::metrics::Metrics;
use crate::oci::manifest::MANIFEST_LIMIT;
use crate::oci::{Digest, Reference, RepoName};
use crate::origin::upstream::{content_length, rest_of};
use crate::origin::{Origin, OriginBody, OriginError, OriginErrorKind, OriginKind, OriginName};
use crate::upstream::UpstreamErrorKind;
use crate::upstream::client::error_chain;

/// How long a peer may take to connect; a member that is down refuses at once, one that is
/// gone (its address unrouted) must not hold a fill for long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest silence in a peer's answer: the owner may itself be waiting for its upstream.
const READ_TIMEOUT: Duration = Duration::from_secs(15);
/// The header an owner's answer to a tag carries: how many more seconds it is fresh.
pub const HEADER_FRESH_FOR: &str = "x-dockside-fresh-for";

/// One member to ask, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    pub peer: PeerAddr,
    pub mode: Mode,
}

/// What is asked about: one upstream's repository.
#[derive(Clone, Debug)]
pub struct Asked {
    pub upstream: Arc<str>,
    pub name: RepoName,
}

/// A manifest a peer sent, its digest checked against its bytes.
#[derive(Clone, Debug)]
pub struct PeerManifest {
    pub digest: Digest,
    pub media_type: Option<String>,
    pub body: Bytes,
    /// For a tag: how long the owner still holds its answer fresh.
    pub fresh_for: Option<Duration>,
}

/// Why a peer gave no answer to use.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// It answered 404: for [`Mode::Fill`] its upstream has no such object; for
    /// [`Mode::Held`] it does not hold it.
    #[error("{0}: not found")]
    NotFound(PeerAddr),
    /// Unreachable, failing, refusing our proof, or answering something unusable.
    #[error("{0}: {1}")]
    Failed(PeerAddr, String),
}

pub struct PeerClient {
    http: reqwest::Client,
    signer: Signer,
    me: PeerAddr,
    members: Arc<Membership>,
    metrics: Arc<Metrics>,
}

impl PeerClient {
    pub fn new(
        signer: Signer,
        me: PeerAddr,
        members: Arc<Membership>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<PeerClient> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(PeerClient {
            http,
            signer,
            me,
            members,
            metrics,
        })
    }

    /// Send one signed request for `path` (built from validated names only), and count it.
    pub async fn send(
        &self,
        method: Method,
        hop: &Hop,
        path: &str,
        headers: &[(&'static str, String)],
    ) -> Result<reqwest::Response, PeerError> {
        let outcome = self.send_uncounted(method, hop, path, headers).await;
        let label = match &outcome {
            Ok(_) => "ok",
            Err(PeerError::NotFound(_)) => "not_found",
            Err(PeerError::Failed(..)) => "failed",
        };
        self.metrics
            .peer_requests
            .with_label_values(&["sent", hop.mode.as_str(), label])
            .inc();
        outcome
    }

    /// [`PeerClient::send`] without counting it (health checks). A member that cannot be
    /// connected to is marked down at once, so other fills skip it before the next check.
    pub async fn send_uncounted(
        &self,
        method: Method,
        hop: &Hop,
        path: &str,
        headers: &[(&'static str, String)],
    ) -> Result<reqwest::Response, PeerError> {
        let url = format!("http://{}{path}", hop.peer);
        let mut req = self.http.request(method.clone(), &url);
        for (name, value) in self.signer.sign(method.as_str(), path, &self.me, hop.mode) {
            req = req.header(name, value);
        }
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        match req.send().await {
            Ok(resp) if resp.status().is_success() => Ok(resp),
            Ok(resp) if resp.status() == StatusCode::NOT_FOUND => {
                Err(PeerError::NotFound(hop.peer.clone()))
            }
            Ok(resp) => Err(PeerError::Failed(hop.peer.clone(), refusal(resp).await)),
            Err(e) => {
                if e.is_connect() && self.members.set_up(&hop.peer, false) {
                    tracing::warn!(member = %hop.peer, error = %error_chain(&e), "cluster member unreachable; skipped until it answers a health check");
                }
                Err(PeerError::Failed(hop.peer.clone(), error_chain(&e)))
            }
        }
    }

    /// A manifest by tag or digest. The digest is checked here: against the reference when it
    /// is one, else against the digest the peer states.
    pub async fn manifest(
        &self,
        hop: &Hop,
        asked: &Asked,
        reference: &Reference,
        accept: &str,
    ) -> Result<PeerManifest, PeerError> {
        let path = format!(
            "/v2/{}/manifests/{reference}?ns={}",
            asked.name, asked.upstream
        );
        let resp = self
            .send(Method::GET, hop, &path, &[("accept", accept.to_string())])
            .await?;
        let failed = |why: String| PeerError::Failed(hop.peer.clone(), why);
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let claimed = header("docker-content-digest").and_then(|d| Digest::parse(&d).ok());
        let media_type = header("content-type");
        let fresh_for = header(HEADER_FRESH_FOR)
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs);
        let body = read_limited(resp, MANIFEST_LIMIT).await.map_err(failed)?;
        let digest = Digest::of(&body);
        let expected = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => claimed,
        };
        match expected {
            Some(e) if e == digest => Ok(PeerManifest {
                digest,
                media_type,
                body,
                fresh_for,
            }),
            Some(e) => Err(failed(format!("manifest hashes to {digest}, not {e}"))),
            None => Err(failed("manifest without Docker-Content-Digest".into())),
        }
    }

    /// A blob's length, from a HEAD.
    pub async fn blob_len(
        &self,
        hop: &Hop,
        asked: &Asked,
        digest: &Digest,
    ) -> Result<Option<u64>, PeerError> {
        let path = blob_path(asked, digest);
        let resp = self.send(Method::HEAD, hop, &path, &[]).await?;
        Ok(content_length(resp.headers()))
    }
}

fn blob_path(asked: &Asked, digest: &Digest) -> String {
    format!("/v2/{}/blobs/{digest}?ns={}", asked.name, asked.upstream)
}

/// A member's blobs as an origin.
pub struct PeerOrigin {
    name: OriginName,
    client: Arc<PeerClient>,
    hop: Hop,
    asked: Asked,
}

impl PeerOrigin {
    pub fn new(client: &Arc<PeerClient>, hop: Hop, asked: Asked) -> PeerOrigin {
        let name: Arc<str> = Arc::from(hop.peer.as_str());
        PeerOrigin {
            name: OriginName::new(OriginKind::Peer, &name),
            client: client.clone(),
            hop,
            asked,
        }
    }

    fn error(&self, kind: OriginErrorKind) -> OriginError {
        OriginError::new(&self.name, kind)
    }
}

#[async_trait]
impl Origin for PeerOrigin {
    fn name(&self) -> &OriginName {
        &self.name
    }

    async fn fetch(&self, digest: &Digest, from: u64) -> Result<OriginBody, OriginError> {
        let path = blob_path(&self.asked, digest);
        let range = [("range", format!("bytes={from}-"))];
        let headers: &[(&'static str, String)] = if from > 0 { &range } else { &[] };
        let resp = match self
            .client
            .send(Method::GET, &self.hop, &path, headers)
            .await
        {
            Ok(resp) => resp,
            Err(PeerError::NotFound(_)) if self.hop.mode == Mode::Held => {
                return Err(self.error(OriginErrorKind::NotHeld));
            }
            Err(PeerError::NotFound(_)) => {
                return Err(self.error(OriginErrorKind::Upstream(UpstreamErrorKind::NotFound)));
            }
            Err(PeerError::Failed(_, why)) => {
                return Err(self.error(OriginErrorKind::Upstream(UpstreamErrorKind::Connect(why))));
            }
        };
        let len = if from == 0 {
            content_length(resp.headers())
        } else {
            let rest = rest_of(&resp, from);
            Some(rest.ok_or_else(|| self.error(OriginErrorKind::NotTheRest { from }))?)
        };
        let origin = self.name.clone();
        let chunks = resp
            .bytes_stream()
            .map(move |chunk| {
                chunk.map_err(|e| {
                    OriginError::new(&origin, OriginErrorKind::Broken(error_chain(&e)))
                })
            })
            .boxed();
        Ok(OriginBody { len, chunks })
    }
}

/// What a refusing peer said: its status and the OCI error message, if any.
async fn refusal(resp: reqwest::Response) -> String {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let message: Option<String> = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_string));
    match message {
        Some(m) => format!("answered HTTP {}: {m}", status.as_u16()),
        None => format!("answered HTTP {}", status.as_u16()),
    }
}

async fn read_limited(resp: reqwest::Response, limit: u64) -> Result<Bytes, String> {
    if content_length(resp.headers()).is_some_and(|len| len > limit) {
        return Err(format!("manifest larger than {limit} bytes"));
    }
    let mut body = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| error_chain(&e))?;
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(format!("manifest larger than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}
