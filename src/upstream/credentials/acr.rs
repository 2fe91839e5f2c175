//! Azure Container Registry with an Azure AD identity: the AAD access token (from a file, which
//! may rotate, or an environment variable) is exchanged at the registry's `/oauth2/exchange`
//! for an ACR refresh token, the password of the fixed user
//! `00000000-0000-0000-0000-000000000000`. The registry's usual token flow then takes it.
//! (ACR admin credentials need none of this: they are a plain username and password.)

use url::Url;

use super::{Basic, CredentialError, Http, Lease, jwt_expiry, send_json};
use crate::config::{AadToken, AcrSource, Secret};

pub const USERNAME: &str = "00000000-0000-0000-0000-000000000000";

pub struct Acr {
    tenant: Option<String>,
    aad_token: AadToken,
    exchange_url: Url,
    /// The registry host: the `service` of the exchange.
    service: String,
    http: Http,
}

#[derive(serde::Deserialize)]
struct Answer {
    refresh_token: String,
}

impl Acr {
    pub fn new(cfg: &AcrSource, upstream_url: &Url, http: Http) -> Acr {
        Acr {
            tenant: cfg.tenant.clone(),
            aad_token: cfg.aad_token.clone(),
            exchange_url: cfg.exchange_url.clone(),
            service: upstream_url.host_str().unwrap_or_default().to_string(),
            http,
        }
    }

    fn aad_token(&self) -> Result<Secret, CredentialError> {
        let token = match &self.aad_token {
            AadToken::File(path) => std::fs::read_to_string(path).map_err(|e| {
                CredentialError::refused(format!("aad_token_file {}: {e}", path.display()))
            })?,
            AadToken::Env(var) => std::env::var(var).map_err(|_| {
                CredentialError::refused(format!("aad_token_env: {var} is not set"))
            })?,
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(CredentialError::refused("the Azure AD token is empty"));
        }
        Ok(Secret::new(token.to_string()))
    }

    pub async fn fetch(&self) -> Result<Lease, CredentialError> {
        let aad = self.aad_token()?;
        let mut form = vec![
            ("grant_type", "access_token"),
            ("service", self.service.as_str()),
            ("access_token", aad.expose()),
        ];
        if let Some(tenant) = &self.tenant {
            form.push(("tenant", tenant));
        }
        let req = self
            .http
            .client
            .post(self.exchange_url.clone())
            .timeout(self.http.timeout)
            .form(&form);
        let what = format!("ACR token exchange at {}", self.exchange_url);
        let answer: Answer = send_json(req, &what).await?;
        // ACR refresh tokens are JWTs that live about three hours; their `exp` says when.
        let expires = jwt_expiry(&answer.refresh_token);
        Ok(Lease {
            basic: Basic {
                username: USERNAME.into(),
                password: Secret::new(answer.refresh_token),
            },
            expires,
        })
    }
}
