//! Authentication on the round trip: what earlier challenges taught an endpoint (Basic or a
//! bearer token per realm and scope), answering a `WWW-Authenticate` challenge, and the token
//! flow, single-flighted per scope.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, StatusCode};
use reqwest::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use tracing::debug;
use url::Url;

use super::send::classify;
use super::{Call, Upstream};
use crate::metrics::Metrics;
use crate::upstream::auth::{Challenge, TokenCache, TokenResponse, parse_challenge, pull_scope};
use crate::upstream::credentials::{Basic, CredentialError, Provider};
use crate::upstream::endpoints::{AuthMode, Endpoint};
use crate::upstream::{UpstreamError, UpstreamErrorKind};

impl Upstream {
    /// One request, answering one authentication challenge if there is one (two for a source of
    /// short-lived credentials, whose fresh ones may be refused too).
    pub(super) async fn authenticated(
        &self,
        call: &Call<'_>,
        endpoint: &Endpoint,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut url = endpoint
            .url
            .join(&format!("/v2/{}", call.path))
            .map_err(|e| self.error(UpstreamErrorKind::Connect(e.to_string())))?;
        url.set_query(call.query);
        let scope = pull_scope(call.name.as_str());
        let mut authorization = self.known_authorization(endpoint, &scope).await?;
        // Short-lived credentials may be refused when they were just fetched (revoked, rotated
        // early): such an upstream gets a second challenge answered with fresh ones.
        let mut challenges_left = match &self.credentials {
            Some(provider) if provider.refreshable() => 2,
            _ => 1,
        };
        loop {
            let resp = self.send(call, &url, authorization.as_ref()).await?;
            if resp.status() == StatusCode::UNAUTHORIZED && challenges_left > 0 {
                challenges_left -= 1;
                let rejected = authorization.take();
                authorization = Some(
                    self.answer_challenge(endpoint, &resp, &scope, rejected)
                        .await?,
                );
                continue;
            }
            return self.check_status(resp);
        }
    }

    /// An Authorization header for `scope` from what earlier challenges taught us, so most
    /// requests need one round trip.
    async fn known_authorization(
        &self,
        endpoint: &Endpoint,
        scope: &str,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        let mode = endpoint.mode.read().expect("auth mode lock").clone();
        match mode {
            None => Ok(None),
            Some(AuthMode::Basic) => self.basic_header().await,
            Some(AuthMode::Bearer { realm, service }) => {
                match self.token_source.tokens.get(&token_key(&realm, scope)) {
                    Some(token) => Ok(bearer_header(&token)),
                    None => self
                        .fetch_token(&realm, service.as_deref(), scope)
                        .await
                        .map(Some),
                }
            }
        }
    }

    /// `rejected` is what this request sent and was refused with, if anything.
    async fn answer_challenge(
        &self,
        endpoint: &Endpoint,
        resp: &reqwest::Response,
        scope: &str,
        rejected: Option<HeaderValue>,
    ) -> Result<HeaderValue, UpstreamError> {
        let header = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                self.error(UpstreamErrorKind::Unauthorized(
                    "401 without a challenge".into(),
                ))
            })?;
        let challenge = parse_challenge(header)
            .map_err(|e| self.error(UpstreamErrorKind::Unauthorized(e.to_string())))?;
        match challenge {
            Challenge::Basic => {
                // Credentials we sent and were refused may have expired or been revoked: a
                // source of short-lived ones is asked for new ones.
                if let (Some(refused), Some(provider)) = (&rejected, &self.credentials) {
                    provider.refused_header(refused);
                }
                let value = self.basic_header().await?.ok_or_else(|| {
                    self.error(UpstreamErrorKind::Unauthorized(
                        "the upstream asks for credentials and none are configured".into(),
                    ))
                })?;
                *endpoint.mode.write().expect("auth mode lock") = Some(AuthMode::Basic);
                Ok(value)
            }
            Challenge::Bearer { realm, service, .. } => {
                *endpoint.mode.write().expect("auth mode lock") = Some(AuthMode::Bearer {
                    realm: realm.clone(),
                    service: service.clone(),
                });
                // Another request may have fetched a token for this scope since we sent ours.
                // Use it, unless it is the very token the upstream just refused.
                let key = token_key(&realm, scope);
                let cached = self
                    .token_source
                    .tokens
                    .get(&key)
                    .and_then(|t| bearer_header(&t));
                match cached {
                    Some(header) if Some(&header) != rejected.as_ref() => return Ok(header),
                    Some(_) => self.token_source.tokens.remove(&key),
                    None => {}
                }
                self.fetch_token(&realm, service.as_deref(), scope).await
            }
        }
    }

    /// A bearer token for `scope`. Concurrent requests for one scope share one token fetch, so
    /// a herd of cold pulls costs the token endpoint one request, not one per client.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<HeaderValue, UpstreamError> {
        let source = self.token_source.clone();
        let key = token_key(realm, scope);
        let (realm, service, owned_scope) = (
            realm.to_string(),
            service.map(str::to_string),
            scope.to_string(),
        );
        let fetch =
            move || async move { source.fetch(&realm, service.as_deref(), &owned_scope).await };
        self.token_flights.run(key, fetch).await.0
    }

    /// `Basic …` with the current credentials; `None` when none are configured.
    async fn basic_header(&self) -> Result<Option<HeaderValue>, UpstreamError> {
        let Some(provider) = &self.credentials else {
            return Ok(None);
        };
        let basic = provider
            .current()
            .await
            .map_err(|e| credential_error(&self.name, e))?;
        Ok(basic.header())
    }
}

/// Tokens are kept per token service and scope: URLs of one upstream may use different services.
fn token_key(realm: &str, scope: &str) -> String {
    format!("{realm} {scope}")
}

fn bearer_header(token: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// Credentials that could not be had: transient (the endpoint is down) like a connect error, so
/// stale content may be served; otherwise an authentication failure.
fn credential_error(upstream: &Arc<str>, err: CredentialError) -> UpstreamError {
    let kind = if err.transient {
        UpstreamErrorKind::Connect(format!("fetching credentials: {err}"))
    } else {
        UpstreamErrorKind::Unauthorized(format!("fetching credentials: {err}"))
    };
    UpstreamError::new(upstream, kind)
}

/// What the token flow needs, owned, so a token fetch can run as a task of its own.
#[derive(Clone)]
pub(super) struct TokenSource {
    pub(super) name: Arc<str>,
    pub(super) http: reqwest::Client,
    pub(super) credentials: Option<Provider>,
    pub(super) first_byte: Duration,
    pub(super) tokens: TokenCache,
    pub(super) metrics: Arc<Metrics>,
}

impl TokenSource {
    /// The token flow: GET realm?service=…&scope=…, with Basic credentials when configured.
    async fn fetch(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<HeaderValue, UpstreamError> {
        let unauthorized =
            |msg: String| UpstreamError::new(&self.name, UpstreamErrorKind::Unauthorized(msg));
        let mut url =
            Url::parse(realm).map_err(|e| unauthorized(format!("token realm {realm:?}: {e}")))?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            query.append_pair("scope", scope);
        }
        let basic = self.basic().await?;
        let mut resp = self.ask(&url, realm, basic.as_ref()).await?;
        // Refused credentials from a source of short-lived ones: one more try with fresh ones.
        if resp.status() == StatusCode::UNAUTHORIZED
            && let (Some(provider), Some(refused)) = (&self.credentials, &basic)
            && provider.refused(refused)
        {
            let fresh = self.basic().await?;
            resp = self.ask(&url, realm, fresh.as_ref()).await?;
        }
        if !resp.status().is_success() {
            return Err(unauthorized(format!(
                "token endpoint {realm} answered {}",
                resp.status()
            )));
        }
        let parsed: TokenResponse = resp
            .json()
            .await
            .map_err(|e| unauthorized(format!("token endpoint {realm}: {e}")))?;
        let (token, expires_in) = parsed
            .into_parts()
            .ok_or_else(|| unauthorized(format!("token endpoint {realm} sent no token")))?;
        debug!(upstream = %self.name, scope, ?expires_in, "fetched bearer token");
        let header = bearer_header(&token)
            .ok_or_else(|| unauthorized("token is not a valid header value".into()))?;
        self.tokens
            .insert(&token_key(realm, scope), token, expires_in);
        Ok(header)
    }

    async fn basic(&self) -> Result<Option<Basic>, UpstreamError> {
        match &self.credentials {
            None => Ok(None),
            Some(provider) => provider
                .current()
                .await
                .map(Some)
                .map_err(|e| credential_error(&self.name, e)),
        }
    }

    /// One GET of the token endpoint, with Basic credentials when there are any.
    async fn ask(
        &self,
        url: &Url,
        realm: &str,
        basic: Option<&Basic>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut req = self.http.get(url.clone());
        if let Some(value) = basic.and_then(Basic::header) {
            req = req.header(AUTHORIZATION, value);
        }
        let resp = tokio::time::timeout(self.first_byte, req.send())
            .await
            .map_err(|_| {
                UpstreamError::new(
                    &self.name,
                    UpstreamErrorKind::Timeout(format!("fetching a token from {realm}")),
                )
            })?
            .map_err(|e| UpstreamError::new(&self.name, classify(&e)))?;
        self.metrics
            .upstream_requests
            .with_label_values(&[&self.name, "TOKEN", resp.status().as_str()])
            .inc();
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_keyed_by_realm_and_scope() {
        let scope = "repository:library/alpine:pull";
        assert_ne!(
            token_key("https://auth.a/token", scope),
            token_key("https://auth.b/token", scope)
        );
        assert_ne!(
            token_key("https://auth.a/token", scope),
            token_key("https://auth.a/token", "repository:other:pull")
        );
    }

    #[test]
    fn bearer_headers_are_sensitive_and_refuse_bad_tokens() {
        let value = bearer_header("abc.def").unwrap();
        assert_eq!(value, "Bearer abc.def");
        assert!(value.is_sensitive());
        assert!(bearer_header("line\nbreak").is_none());
    }

    #[test]
    fn transient_credential_failures_allow_stale_answers() {
        let name: Arc<str> = Arc::from("ecr");
        let down = credential_error(&name, CredentialError::transient("endpoint down"));
        assert!(down.is_transient());
        let refused = credential_error(&name, CredentialError::refused("bad key"));
        assert!(matches!(refused.kind, UpstreamErrorKind::Unauthorized(_)));
        assert!(!refused.is_transient());
    }
}
