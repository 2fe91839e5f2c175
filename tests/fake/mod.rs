//! An in-process fake upstream registry for the in-process tests: serves manifests and blobs it
//! is given, can require Basic or Bearer auth, and injects faults (corrupt or truncated bodies,
//! held-back bodies, being down). It records every request so tests can count upstream traffic.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;

pub type Body = BoxBody<Bytes, std::io::Error>;

pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Serve the right length with one byte flipped.
    Corrupt,
    /// Announce the full length, send this many bytes, then break the connection.
    Truncate(usize),
    /// `Truncate` for the next response only.
    TruncateOnce(usize),
}

#[derive(Clone, Debug, Default)]
pub enum Auth {
    #[default]
    None,
    Basic(String, String),
    /// Bearer tokens from this server's own /token endpoint, which wants these Basic credentials.
    Bearer(String, String),
}

#[derive(Default)]
struct State {
    manifests: HashMap<String, (String, Bytes)>,
    blobs: HashMap<String, Bytes>,
    faults: HashMap<String, Fault>,
    log: Vec<String>,
    auth: Auth,
    /// Answer blob GETs with a 307 to `<base>/cdn/<digest>`, as Docker Hub does.
    redirect_blobs_to: Option<String>,
    down: bool,
    /// Answer this many more requests with a 503 (then as usual).
    fail_next: usize,
    /// Bumped to revoke every token handed out so far.
    token_generation: u32,
    /// Blob bodies stop after this many bytes until the gate opens (see [`FakeUpstream::hold`]).
    gate: Option<Gate>,
    /// Send blobs chunked, with no Content-Length.
    chunked: bool,
}

#[derive(Clone)]
pub struct FakeUpstream {
    state: Arc<Mutex<State>>,
    pub addr: SocketAddr,
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeUpstream {
            state: Arc::default(),
            addr: listener.local_addr().unwrap(),
        };
        let server = fake.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let fake = server.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let fake = fake.clone();
                        async move { Ok::<_, Infallible>(fake.handle(req)) }
                    });
                    // The smallest write buffer hyper allows: it writes each frame out before it
                    // asks the body for the next, so the bytes before an injected break reach
                    // the client before the connection is dropped.
                    let _ = http1::Builder::new()
                        .max_buf_size(8192)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        fake
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    pub fn add_blob(&self, data: &[u8]) -> String {
        let digest = digest_of(data);
        self.with(|s| s.blobs.insert(digest.clone(), Bytes::copy_from_slice(data)));
        digest
    }

    /// Store a manifest under `repo` by digest and, if given, by tag. Returns its digest.
    pub fn add_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        body: &[u8],
    ) -> String {
        let digest = digest_of(body);
        let entry = (media_type.to_string(), Bytes::copy_from_slice(body));
        self.with(|s| {
            s.manifests
                .insert(format!("{repo}/{digest}"), entry.clone());
            if let Some(tag) = tag {
                s.manifests.insert(format!("{repo}/{tag}"), entry);
            }
        });
        digest
    }

    /// Serve `body` for `repo@digest` even though it does not hash to `digest`.
    pub fn add_lying_manifest(&self, repo: &str, digest: &str, body: &[u8]) {
        let entry = (OCI_MANIFEST.to_string(), Bytes::copy_from_slice(body));
        self.with(|s| s.manifests.insert(format!("{repo}/{digest}"), entry));
    }

    pub fn set_fault(&self, digest: &str, fault: Option<Fault>) {
        self.with(|s| match fault {
            Some(f) => s.faults.insert(digest.to_string(), f),
            None => s.faults.remove(digest),
        });
    }

    pub fn set_auth(&self, auth: Auth) {
        self.with(|s| s.auth = auth);
    }

    pub fn redirect_blobs_to(&self, base: Option<String>) {
        self.with(|s| s.redirect_blobs_to = base);
    }

    /// Revoke every token issued so far: the next ones differ.
    pub fn rotate_tokens(&self) {
        self.with(|s| s.token_generation += 1);
    }

    pub fn set_down(&self, down: bool) {
        self.with(|s| s.down = down);
    }

    pub fn set_chunked(&self, chunked: bool) {
        self.with(|s| s.chunked = chunked);
    }

    /// Stream blobs in 64 KiB chunks with this pause between them.
    /// From now on, blob bodies (streamed in 64 KiB frames) stop at byte `at` of the blob (a
    /// ranged answer from beyond it does not) until the returned gate is opened: a fill held in
    /// the middle, for as long as a test needs.
    pub fn hold(&self, at: usize) -> GateOpener {
        let (open, rx) = tokio::sync::watch::channel(false);
        self.with(|s| s.gate = Some(Gate { at, open: rx }));
        GateOpener {
            fake: self.clone(),
            open,
        }
    }

    /// Answer the next `n` requests with a 503.
    pub fn fail_next(&self, n: usize) {
        self.with(|s| s.fail_next = n);
    }

    /// Requests seen so far, as "METHOD /path".
    pub fn log(&self) -> Vec<String> {
        self.with(|s| s.log.clone())
    }

    pub fn count(&self, prefix: &str) -> usize {
        self.log().iter().filter(|l| l.starts_with(prefix)).count()
    }

    fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let authorized = if req.headers().contains_key("authorization") {
            " [authorization]"
        } else {
            ""
        };
        let range = header(&req, "range");
        let ranged = range
            .as_deref()
            .map_or(String::new(), |r| format!(" [range {r}]"));
        let (auth, down, gate, redirect) = self.with(|s| {
            s.log.push(format!("{method} {path}{authorized}{ranged}"));
            let failing = s.fail_next > 0;
            s.fail_next = s.fail_next.saturating_sub(1);
            (
                s.auth.clone(),
                s.down || failing,
                s.gate.clone(),
                s.redirect_blobs_to.clone(),
            )
        });
        if down {
            return text(StatusCode::SERVICE_UNAVAILABLE, "down");
        }
        if path == "/token" {
            return self.token(&req, &auth);
        }
        if let Some(digest) = path.strip_prefix("/cdn/") {
            return self.blob(
                digest,
                method == hyper::Method::HEAD,
                gate,
                range.as_deref(),
            );
        }
        if let Some(challenge) = self.challenge(&req, &auth, &path) {
            return challenge;
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            return text(StatusCode::NOT_FOUND, "no route");
        };
        let head = method == hyper::Method::HEAD;
        if rest.is_empty() {
            // The version check (and a cluster member's health check, when this fake stands in
            // for a member).
            return bytes_response(StatusCode::OK, "application/json", Bytes::from("{}"), false);
        }
        if let Some((repo, reference)) = rest.rsplit_once("/manifests/") {
            return self.manifest(repo, reference, head);
        }
        if let Some((_, digest)) = rest.rsplit_once("/blobs/") {
            if let Some(base) = redirect.filter(|_| !head) {
                let mut resp = text(StatusCode::TEMPORARY_REDIRECT, "see CDN");
                let location = format!("{base}/cdn/{digest}").parse().unwrap();
                resp.headers_mut().insert("location", location);
                return resp;
            }
            return self.blob(digest, head, gate, range.as_deref());
        }
        if let Some(repo) = rest.strip_suffix("/tags/list") {
            let body = serde_json::json!({ "name": repo, "tags": ["fake"] }).to_string();
            return bytes_response(StatusCode::OK, "application/json", Bytes::from(body), false);
        }
        text(StatusCode::NOT_FOUND, "no route")
    }

    fn token(&self, req: &Request<Incoming>, auth: &Auth) -> Response<Body> {
        let Auth::Bearer(user, pass) = auth else {
            return text(StatusCode::NOT_FOUND, "no token service");
        };
        if header(req, "authorization") != Some(basic(user, pass)) {
            return text(StatusCode::UNAUTHORIZED, "bad credentials");
        }
        let token = self.with(|s| format!("fake-token-{}", s.token_generation));
        let body = format!(r#"{{"token":"{token}","expires_in":300}}"#);
        bytes_response(StatusCode::OK, "application/json", Bytes::from(body), false)
    }

    fn challenge(
        &self,
        req: &Request<Incoming>,
        auth: &Auth,
        path: &str,
    ) -> Option<Response<Body>> {
        let (expected, challenge) = match auth {
            Auth::None => return None,
            Auth::Basic(user, pass) => (basic(user, pass), r#"Basic realm="fake""#.to_string()),
            Auth::Bearer(..) => {
                let repo = path
                    .strip_prefix("/v2/")
                    .and_then(|r| {
                        r.split_once("/manifests/")
                            .or_else(|| r.split_once("/blobs/"))
                    })
                    .map_or("", |(repo, _)| repo);
                let challenge = format!(
                    r#"Bearer realm="{}/token",service="fake",scope="repository:{repo}:pull""#,
                    self.url()
                );
                let token = self.with(|s| format!("fake-token-{}", s.token_generation));
                (format!("Bearer {token}"), challenge)
            }
        };
        if header(req, "authorization") == Some(expected) {
            return None;
        }
        let mut resp = text(StatusCode::UNAUTHORIZED, "authenticate");
        resp.headers_mut()
            .insert("www-authenticate", challenge.parse().unwrap());
        Some(resp)
    }

    fn manifest(&self, repo: &str, reference: &str, head: bool) -> Response<Body> {
        let Some((media_type, body)) =
            self.with(|s| s.manifests.get(&format!("{repo}/{reference}")).cloned())
        else {
            return text(StatusCode::NOT_FOUND, "manifest unknown");
        };
        let mut resp = bytes_response(StatusCode::OK, &media_type, body.clone(), head);
        resp.headers_mut()
            .insert("docker-content-digest", digest_of(&body).parse().unwrap());
        resp
    }

    fn blob(
        &self,
        digest: &str,
        head: bool,
        gate: Option<Gate>,
        range: Option<&str>,
    ) -> Response<Body> {
        let Some((data, fault, no_length)) = self.with(|s| {
            let data = s.blobs.get(digest).cloned()?;
            let fault = s.faults.get(digest).copied();
            if let Some(Fault::TruncateOnce(_)) = fault {
                s.faults.remove(digest);
            }
            Some((data, fault, s.chunked))
        }) else {
            return text(StatusCode::NOT_FOUND, "blob unknown");
        };
        // `bytes=N-` only, the form a resuming client sends.
        let from = range
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n < data.len());
        let total = data.len();
        let data = match from {
            Some(n) => data.slice(n..),
            None => data,
        };
        let len = data.len();
        let (data, cut) = match fault {
            Some(Fault::Corrupt) => {
                let mut corrupt = data.to_vec();
                corrupt[len / 2] ^= 0xff;
                (Bytes::from(corrupt), None)
            }
            Some(Fault::Truncate(n) | Fault::TruncateOnce(n)) => (data, Some(n)),
            None => (data, None),
        };
        let status = if from.is_some() {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        };
        let mut resp = if head || (gate.is_none() && cut.is_none() && !no_length) {
            bytes_response(status, "application/octet-stream", data, head)
        } else {
            // The gate is at a byte of the blob; this body starts at `from`.
            let start = from.unwrap_or(0);
            let gate = gate.and_then(|g| {
                Some(Gate {
                    at: g.at.checked_sub(start)?,
                    ..g
                })
            });
            let stream = chunked(data, cut, gate);
            let mut resp = Response::builder()
                .status(status)
                .header("content-type", "application/octet-stream");
            if !no_length {
                resp = resp.header("content-length", len);
            }
            resp.body(StreamBody::new(stream).boxed()).unwrap()
        };
        if let Some(n) = from {
            let value = format!("bytes {n}-{}/{total}", total - 1);
            resp.headers_mut()
                .insert("content-range", value.parse().unwrap());
        }
        resp
    }
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Where blob bodies stop, and the signal that lets them go on.
#[derive(Clone)]
struct Gate {
    at: usize,
    open: tokio::sync::watch::Receiver<bool>,
}

/// Opens the gate of [`FakeUpstream::hold`]: held bodies go on and new ones are not held.
pub struct GateOpener {
    fake: FakeUpstream,
    open: tokio::sync::watch::Sender<bool>,
}

impl GateOpener {
    pub fn open(&self) {
        self.fake.with(|s| s.gate = None);
        let _ = self.open.send(true);
    }
}

impl Drop for GateOpener {
    fn drop(&mut self) {
        self.open();
    }
}

/// A body stream of 64 KiB frames that waits at the `gate` (if any) and fails after `cut` bytes.
fn chunked(
    data: Bytes,
    cut: Option<usize>,
    gate: Option<Gate>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send + Sync + 'static
{
    let end = cut.unwrap_or(data.len());
    futures_util::stream::unfold(0usize, move |pos| {
        let (data, gate) = (data.clone(), gate.clone());
        async move {
            if pos >= end {
                return if cut.is_some() && pos < data.len() {
                    Some((Err(std::io::Error::other("injected break")), usize::MAX))
                } else {
                    None
                };
            }
            let mut next = (pos + 64 * 1024).min(end);
            if let Some(mut gate) = gate {
                if pos == gate.at {
                    let _ = gate.open.wait_for(|open| *open).await;
                } else if pos < gate.at {
                    next = next.min(gate.at);
                }
            }
            Some((Ok(Frame::data(data.slice(pos..next))), next))
        }
    })
}

fn header(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers().get(name)?.to_str().ok().map(str::to_string)
}

fn basic(user: &str, pass: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    format!("Basic {encoded}")
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
    bytes_response(
        status,
        "text/plain",
        Bytes::from(message.to_string()),
        false,
    )
}

fn bytes_response(
    status: StatusCode,
    content_type: &str,
    body: Bytes,
    head: bool,
) -> Response<Body> {
    let len = body.len();
    let body = if head { Bytes::new() } else { body };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", len)
        .body(Full::new(body).map_err(|never| match never {}).boxed())
        .unwrap()
}
