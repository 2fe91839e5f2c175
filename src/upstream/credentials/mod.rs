//! Where an upstream's Basic credentials come from: a static `username` + password, or a
//! source of short-lived ones (ECR, GCP, ACR, a Docker credential helper).
//!
//! [`Provider::current`] hands out the credentials to send now. A lease is kept until three
//! quarters of its life have passed; from then until it expires, requests still get it while
//! one refresh runs in the background, so a refresh never makes a pull wait. Refreshes are
//! single-flighted: a herd of requests costs the credential endpoint one call. When the
//! registry or its token endpoint refuses a lease, [`Provider::refused`] drops it (only if it
//! is still the cached one, so a herd of refusals causes one refetch, not one each).
//!
//! Secrets are only ever in [`Secret`] or in header values marked sensitive; errors and logs
//! name the source and the endpoint, never a value.

pub mod acr;
pub mod aws;
pub mod ecr;
pub mod gcp;
pub mod helper;
pub mod sigv4;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use http::HeaderValue;
use tracing::{info, warn};

use crate::config::{CredentialSource, Secret, UpstreamConfig};
use crate::metrics::Metrics;
use crate::singleflight::SingleFlight;

/// A user name and password for Basic auth, to the registry or to its token endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Basic {
    pub username: String,
    pub password: Secret,
}

impl Basic {
    /// `Authorization: Basic …`, marked sensitive so it is never logged.
    pub fn header(&self) -> Option<HeaderValue> {
        let raw = format!("{}:{}", self.username, self.password.expose());
        let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
        let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
        value.set_sensitive(true);
        Some(value)
    }
}

/// Credentials and when they stop working (`None`: the source does not say).
#[derive(Clone, Debug)]
pub struct Lease {
    pub basic: Basic,
    pub expires: Option<SystemTime>,
}

/// Why credentials could not be fetched. `transient`: the endpoint could not be reached or
/// failed (5xx); otherwise it refused or answered nonsense.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct CredentialError {
    pub message: String,
    pub transient: bool,
}

impl CredentialError {
    pub fn refused(message: impl Into<String>) -> CredentialError {
        CredentialError {
            message: message.into(),
            transient: false,
        }
    }

    pub fn transient(message: impl Into<String>) -> CredentialError {
        CredentialError {
            message: message.into(),
            transient: true,
        }
    }
}

/// A lease whose source gives no lifetime (a credential helper) is asked again after this.
const UNDATED_LEASE: Duration = Duration::from_secs(5 * 60);
/// A failed background refresh is tried again after this.
const RETRY_REFRESH: Duration = Duration::from_secs(30);
/// However short a lease claims to be, it is kept this long (its issuer's clock may be off; a
/// refusal still drops it at once).
const MIN_KEEP: Duration = Duration::from_secs(30);

/// What a source needs to make its own HTTP calls.
#[derive(Clone)]
pub struct Http {
    pub client: reqwest::Client,
    /// For each call to a credential endpoint.
    pub timeout: Duration,
}

enum Source {
    Static(Basic),
    Ecr(ecr::Ecr),
    Gcp(gcp::Gcp),
    Acr(acr::Acr),
    Helper(helper::Helper),
}

impl Source {
    async fn fetch(&self) -> Result<Lease, CredentialError> {
        match self {
            Source::Static(basic) => Ok(Lease {
                basic: basic.clone(),
                expires: None,
            }),
            Source::Ecr(s) => s.fetch().await,
            Source::Gcp(s) => s.fetch().await,
            Source::Acr(s) => s.fetch().await,
            Source::Helper(s) => s.fetch().await,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Source::Static(_) => "static",
            Source::Ecr(_) => "ecr",
            Source::Gcp(_) => "gcp",
            Source::Acr(_) => "acr",
            Source::Helper(_) => "helper",
        }
    }
}

struct Cached {
    lease: Lease,
    /// From here on, a background refresh is due.
    refresh_at: Instant,
    /// From here on, the lease is not handed out any more.
    expires_at: Option<Instant>,
}

/// One upstream's credentials, cached and refreshed.
#[derive(Clone)]
pub struct Provider {
    inner: Arc<Inner>,
}

struct Inner {
    upstream: Arc<str>,
    source: Source,
    cached: Mutex<Option<Cached>>,
    flight: SingleFlight<(), Result<Lease, CredentialError>>,
    metrics: Option<Arc<Metrics>>,
}

impl Provider {
    /// The provider for an upstream's configuration; `None` when it has no credentials.
    pub fn new(cfg: &UpstreamConfig, metrics: Arc<Metrics>) -> anyhow::Result<Option<Provider>> {
        let http = Http {
            client: endpoint_client(cfg)?,
            timeout: cfg.timeouts.first_byte,
        };
        let source = match (&cfg.credentials, &cfg.credential_source) {
            (Some(c), _) => Source::Static(Basic {
                username: c.username.clone(),
                password: c.password.clone(),
            }),
            (None, Some(CredentialSource::Ecr(c))) => Source::Ecr(ecr::Ecr::new(c, http)),
            (None, Some(CredentialSource::Gcp(c))) => Source::Gcp(gcp::Gcp::new(c, http)?),
            (None, Some(CredentialSource::Acr(c))) => {
                Source::Acr(acr::Acr::new(c, &cfg.urls[0], http))
            }
            (None, Some(CredentialSource::Helper(c))) => {
                Source::Helper(helper::Helper::new(c, http.timeout))
            }
            (None, None) => return Ok(None),
        };
        Ok(Some(Provider::from_source(
            &cfg.name,
            source,
            Some(metrics),
        )))
    }

    fn from_source(upstream: &str, source: Source, metrics: Option<Arc<Metrics>>) -> Provider {
        Provider {
            inner: Arc::new(Inner {
                upstream: Arc::from(upstream),
                source,
                cached: Mutex::new(None),
                flight: SingleFlight::new(),
                metrics,
            }),
        }
    }

    /// The credentials to send now: cached, or fetched (once for all concurrent callers).
    pub async fn current(&self) -> Result<Basic, CredentialError> {
        if let Source::Static(basic) = &self.inner.source {
            return Ok(basic.clone());
        }
        let now = Instant::now();
        let (usable, due) = {
            let cached = self.inner.cached.lock().expect("credentials lock");
            match cached.as_ref() {
                Some(c) if c.expires_at.is_none_or(|e| now < e) => {
                    (Some(c.lease.basic.clone()), now >= c.refresh_at)
                }
                _ => (None, true),
            }
        };
        match usable {
            Some(basic) => {
                if due {
                    let this = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = this.refresh().await {
                            this.postpone_refresh();
                            warn!(upstream = %this.inner.upstream, error = %e,
                                  "refreshing credentials failed; the current ones are kept until they expire");
                        }
                    });
                }
                Ok(basic)
            }
            None => self.refresh().await.map(|lease| lease.basic),
        }
    }

    /// After a failed background refresh, wait before the next one, so that a credential
    /// endpoint that is down is not asked again by every request.
    fn postpone_refresh(&self) {
        if let Some(c) = self.inner.cached.lock().expect("credentials lock").as_mut() {
            c.refresh_at = Instant::now() + RETRY_REFRESH;
        }
    }

    /// Whether a refused lease can be replaced by a fresh one (not for static credentials).
    pub fn refreshable(&self) -> bool {
        !matches!(self.inner.source, Source::Static(_))
    }

    /// The registry refused `basic`. Returns whether asking again may give other credentials
    /// (false for static ones); the next [`Provider::current`] then fetches.
    pub fn refused(&self, basic: &Basic) -> bool {
        if !self.refreshable() {
            return false;
        }
        let mut cached = self.inner.cached.lock().expect("credentials lock");
        if cached.as_ref().is_some_and(|c| c.lease.basic == *basic) {
            *cached = None;
            info!(upstream = %self.inner.upstream, source = self.inner.source.kind(),
                  "the upstream refused the cached credentials; fetching new ones");
        }
        true
    }

    /// [`Provider::refused`] for the `Authorization` header the upstream refused.
    pub fn refused_header(&self, header: &HeaderValue) {
        let cached = self.inner.cached.lock().expect("credentials lock");
        let basic = cached.as_ref().map(|c| c.lease.basic.clone());
        drop(cached);
        if let Some(basic) = basic
            && basic.header().as_ref() == Some(header)
        {
            self.refused(&basic);
        }
    }

    /// Fetch a lease (single-flighted) and cache it.
    async fn refresh(&self) -> Result<Lease, CredentialError> {
        let inner = self.inner.clone();
        let fetch = move || async move {
            let fetched = inner.source.fetch().await;
            inner.count(&fetched);
            let lease = fetched?;
            let fetched = Instant::now();
            let (refresh_in, expires_in) = lifetimes(lease.expires, SystemTime::now());
            info!(upstream = %inner.upstream, source = inner.source.kind(),
                  refresh_in = ?refresh_in, "fetched upstream credentials");
            *inner.cached.lock().expect("credentials lock") = Some(Cached {
                lease: lease.clone(),
                refresh_at: fetched + refresh_in,
                expires_at: expires_in.map(|d| fetched + d),
            });
            Ok(lease)
        };
        self.inner.flight.run((), fetch).await.0
    }
}

impl Inner {
    fn count(&self, fetched: &Result<Lease, CredentialError>) {
        let result = match fetched {
            Ok(_) => "ok",
            Err(e) if e.transient => "unreachable",
            Err(_) => "refused",
        };
        if let (Some(m), Source::Ecr(_) | Source::Gcp(_) | Source::Acr(_) | Source::Helper(_)) =
            (&self.metrics, &self.source)
        {
            m.upstream_credential_fetches
                .with_label_values(&[&self.upstream, self.source.kind(), result])
                .inc();
        }
    }
}

/// When to refresh a lease that expires at `expires` (fetched `now`), and how long it may be
/// handed out. Refresh after three quarters of its life: an ECR token (12 h) is renewed after
/// 9 h, a GCP access token (1 h) after 45 min. A lease is never dropped sooner than [`MIN_KEEP`].
fn lifetimes(expires: Option<SystemTime>, now: SystemTime) -> (Duration, Option<Duration>) {
    match expires {
        None => (UNDATED_LEASE, None),
        Some(at) => {
            let life = at.duration_since(now).unwrap_or_default().max(MIN_KEEP);
            (life / 4 * 3, Some(life))
        }
    }
}

/// The HTTP client for credential endpoints. It follows no redirects: these calls carry secrets
/// (form fields, SigV4's `x-amz-security-token`) that reqwest would forward to another host,
/// and no credential endpoint redirects. The upstream's `ca_file` is trusted here too, for
/// endpoints on the same private network.
fn endpoint_client(cfg: &UpstreamConfig) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("dockside/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(cfg.timeouts.connect)
        .redirect(reqwest::redirect::Policy::none());
    if let Some(path) = &cfg.ca_file {
        let pem =
            std::fs::read(path).map_err(|e| anyhow::anyhow!("ca_file {}: {e}", path.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)? {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder.build()?)
}

/// Sends a request to a credential endpoint and reads a JSON answer; `what` names the call.
pub(crate) async fn send_json<T: serde::de::DeserializeOwned>(
    req: reqwest::RequestBuilder,
    what: &str,
) -> Result<T, CredentialError> {
    let text = send_text(req, what).await?;
    serde_json::from_str(&text)
        .map_err(|e| CredentialError::refused(format!("{what}: unexpected answer: {e}")))
}

/// Sends a request to a credential endpoint and reads its body as text. A non-2xx answer is
/// an error that quotes the start of the body (error bodies carry no secrets, and they say
/// what is wrong, e.g. AWS's "UnrecognizedClientException").
pub(crate) async fn send_text(
    req: reqwest::RequestBuilder,
    what: &str,
) -> Result<String, CredentialError> {
    let resp = req
        .send()
        .await
        .map_err(|e| CredentialError::transient(format!("{what}: {}", error_chain(&e))))?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .map_err(|e| CredentialError::transient(format!("{what}: {}", error_chain(&e))))?;
    if !status.is_success() {
        let snippet: String = text.chars().take(300).collect();
        let message = format!("{what}: answered {status}: {}", snippet.trim());
        return Err(if status.is_server_error() {
            CredentialError::transient(message)
        } else {
            CredentialError::refused(message)
        });
    }
    Ok(text)
}

/// A set, non-empty environment variable (read when credentials are fetched, not at start).
pub(crate) fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The `exp` claim of a JWT, read without checking its signature (only to know when to
/// refresh; the registry checks the token).
pub(crate) fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(password: &str) -> Basic {
        Basic {
            username: "u".into(),
            password: Secret::new(password.into()),
        }
    }

    /// A helper-script source that counts its calls: a fresh password per call.
    fn counting_provider(dir: &std::path::Path) -> Provider {
        let script = dir.join("docker-credential-count");
        let counter = dir.join("count");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nread host\nn=$(($(cat {c} 2>/dev/null || echo 0) + 1))\n\
                 echo $n > {c}\nprintf '{{\"Username\":\"u\",\"Secret\":\"pw-%s\"}}' $n\n",
                c = counter.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let source = helper::Helper::new(
            &crate::config::HelperSource {
                program: script,
                server: "registry.example".into(),
            },
            Duration::from_secs(10),
        );
        Provider::from_source("test", Source::Helper(source), None)
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch_and_the_lease_is_cached() {
        let dir = tempfile::tempdir().unwrap();
        let p = counting_provider(dir.path());
        // join_all's first poll starts all eight before this (single-threaded) runtime can run
        // the fetch, so they are all waiting for it at once.
        let calls = (0..8).map(|_| p.current());
        let got = futures_util::future::join_all(calls).await;
        for b in got {
            assert_eq!(b.unwrap(), basic("pw-1"), "all share the first fetch");
        }
        assert_eq!(p.current().await.unwrap(), basic("pw-1"), "cached");
    }

    #[tokio::test]
    async fn a_refused_lease_is_fetched_again_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = counting_provider(dir.path());
        let first = p.current().await.unwrap();
        assert!(p.refused(&first));
        assert!(p.refused(&first), "a second refusal of the same lease");
        assert_eq!(p.current().await.unwrap(), basic("pw-2"), "one refetch");
        assert!(
            p.refused(&first),
            "a stale refusal does not drop the new lease"
        );
        assert_eq!(p.current().await.unwrap(), basic("pw-2"));
    }

    #[tokio::test]
    async fn static_credentials_are_never_refetched() {
        let p = Provider::from_source("test", Source::Static(basic("s")), None);
        let b = p.current().await.unwrap();
        assert!(!p.refused(&b), "nothing else to try");
        assert_eq!(p.current().await.unwrap(), basic("s"));
    }

    #[tokio::test]
    async fn a_due_lease_is_served_while_one_refresh_runs() {
        let dir = tempfile::tempdir().unwrap();
        let p = counting_provider(dir.path());
        assert_eq!(p.current().await.unwrap(), basic("pw-1"));
        // Make it due but not expired.
        p.inner.cached.lock().unwrap().as_mut().unwrap().refresh_at = Instant::now();
        assert_eq!(p.current().await.unwrap(), basic("pw-1"), "no waiting");
        for _ in 0..100 {
            if p.current().await.unwrap() == basic("pw-2") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the background refresh never landed");
    }

    #[tokio::test]
    async fn a_failed_background_refresh_is_not_retried_by_every_request() {
        let dir = tempfile::tempdir().unwrap();
        let p = counting_provider(dir.path());
        assert_eq!(p.current().await.unwrap(), basic("pw-1"));
        // From now on the helper fails, as an endpoint that is down would.
        let script = dir.path().join("docker-credential-count");
        let calls = dir.path().join("failed");
        std::fs::write(
            &script,
            format!("#!/bin/sh\necho x >> {}\nexit 1\n", calls.display()),
        )
        .unwrap();
        let due = Instant::now();
        p.inner.cached.lock().unwrap().as_mut().unwrap().refresh_at = due;
        // This call starts the background refresh; wait until it has failed and postponed the
        // next one, then ask many more times.
        assert_eq!(p.current().await.unwrap(), basic("pw-1"));
        let refresh_at = || p.inner.cached.lock().unwrap().as_ref().unwrap().refresh_at;
        let deadline = Instant::now() + Duration::from_secs(10);
        while refresh_at() == due {
            assert!(
                Instant::now() < deadline,
                "the failed refresh was never postponed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..20 {
            assert_eq!(
                p.current().await.unwrap(),
                basic("pw-1"),
                "still valid: kept"
            );
        }
        let failed = std::fs::read_to_string(&calls).unwrap_or_default();
        assert_eq!(
            failed.lines().count(),
            1,
            "one failed refresh, then a pause"
        );
        let next = p.inner.cached.lock().unwrap().as_ref().unwrap().refresh_at;
        assert!(next > Instant::now() + RETRY_REFRESH / 2);
    }

    #[tokio::test]
    async fn an_expired_lease_is_not_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = counting_provider(dir.path());
        p.current().await.unwrap();
        {
            let mut c = p.inner.cached.lock().unwrap();
            let c = c.as_mut().unwrap();
            c.expires_at = Some(Instant::now());
        }
        assert_eq!(p.current().await.unwrap(), basic("pw-2"));
    }

    #[test]
    fn refresh_after_three_quarters_of_the_life() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let twelve_hours = Duration::from_secs(12 * 3600);
        assert_eq!(
            lifetimes(Some(now + twelve_hours), now),
            (Duration::from_secs(9 * 3600), Some(twelve_hours))
        );
        assert_eq!(lifetimes(None, now), (UNDATED_LEASE, None));
        // Already expired by our clock: kept briefly, refreshed soon.
        assert_eq!(
            lifetimes(Some(now - Duration::from_secs(5)), now),
            (MIN_KEEP / 4 * 3, Some(MIN_KEEP))
        );
    }

    #[test]
    fn jwt_expiry_reads_exp() {
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":1700000000}"#);
        assert_eq!(
            jwt_expiry(&format!("e30.{payload}.sig")),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(jwt_expiry("not-a-jwt"), None);
    }

    /// A credential endpoint that redirects elsewhere is an error; the other host hears nothing.
    #[tokio::test]
    async fn credential_endpoints_do_not_follow_redirects() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = elsewhere.local_addr().unwrap().port();
        let redirecting = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = redirecting.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut conn, _) = redirecting.accept().await.unwrap();
            let mut buf = [0; 4096];
            let _ = conn.read(&mut buf).await;
            let answer = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://localhost:{target}/\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            );
            conn.write_all(answer.as_bytes()).await.unwrap();
        });
        let cfg = crate::config::Config::embedded_default().upstreams[0].clone();
        let client = endpoint_client(&cfg).unwrap();
        let req = client
            .post(format!("http://127.0.0.1:{port}/token"))
            .timeout(Duration::from_secs(2))
            .form(&[("assertion", "secret")]);
        let err = send_text(req, "test endpoint").await.unwrap_err();
        assert!(err.message.contains("307"), "{err}");
        // Had the redirect been followed, its connection would be queued on `elsewhere` by now.
        let elsewhere = elsewhere.into_std().unwrap();
        elsewhere.set_nonblocking(true).unwrap();
        let heard = elsewhere.accept();
        assert!(
            heard
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
            "the redirect target was contacted: {heard:?}"
        );
    }

    #[test]
    fn basic_header_is_sensitive() {
        let h = basic("pw").header().unwrap();
        assert!(h.is_sensitive());
        assert_eq!(h, "Basic dTpwdw==");
    }
}
