//! Azure Container Registry with an Azure AD identity: the AAD access token (from a file, which
//! may rotate, an environment variable, or AKS workload identity's federated token exchanged at
//! Azure AD) is exchanged at the registry's `/oauth2/exchange`
//! for an ACR refresh token, the password of the fixed user
//! `00000000-0000-0000-0000-000000000000`. The registry's usual token flow then takes it.
//! (ACR admin credentials need none of this: they are a plain username and password.)

use url::Url;

use super::{Basic, CredentialError, Http, Lease, env, jwt_expiry, send_json};
use crate::config::{AadToken, AcrSource, Secret};

pub const USERNAME: &str = "00000000-0000-0000-0000-000000000000";
/// The audience `az acr login` asks Azure AD for; ACR's exchange accepts it.
const AAD_SCOPE: &str = "https://management.azure.com/.default";
const JWT_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

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

    async fn aad_token(&self) -> Result<Secret, CredentialError> {
        let token = match &self.aad_token {
            AadToken::WorkloadIdentity => return self.workload_identity().await,
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

    /// Client credentials with the federated token as assertion (what the Azure SDKs do with
    /// the variables the AKS workload identity webhook sets).
    async fn workload_identity(&self) -> Result<Secret, CredentialError> {
        let var = |name: &str| {
            env(name).ok_or_else(|| {
                CredentialError::refused(format!(
                    "workload identity: {name} is not set (is the pod labelled for workload identity?)"
                ))
            })
        };
        let file = var("AZURE_FEDERATED_TOKEN_FILE")?;
        let assertion = std::fs::read_to_string(&file).map_err(|e| {
            CredentialError::refused(format!("AZURE_FEDERATED_TOKEN_FILE {file:?}: {e}"))
        })?;
        let client_id = var("AZURE_CLIENT_ID")?;
        let tenant = match &self.tenant {
            Some(t) => t.clone(),
            None => var("AZURE_TENANT_ID")?,
        };
        let authority = env("AZURE_AUTHORITY_HOST")
            .unwrap_or_else(|| "https://login.microsoftonline.com/".into());
        let url = format!(
            "{}/{tenant}/oauth2/v2.0/token",
            authority.trim_end_matches('/')
        );
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", client_id.as_str()),
            ("scope", AAD_SCOPE),
            ("client_assertion_type", JWT_ASSERTION),
            ("client_assertion", assertion.trim()),
        ];
        let req = self
            .http
            .client
            .post(&url)
            .timeout(self.http.timeout)
            .form(&form);
        #[derive(serde::Deserialize)]
        struct Answer {
            access_token: String,
        }
        let answer: Answer = send_json(req, &format!("Azure AD token endpoint {url}")).await?;
        Ok(Secret::new(answer.access_token))
    }

    pub async fn fetch(&self) -> Result<Lease, CredentialError> {
        let aad = self.aad_token().await?;
        let tenant = self.tenant.clone().or_else(|| env("AZURE_TENANT_ID"));
        let mut form = vec![
            ("grant_type", "access_token"),
            ("service", self.service.as_str()),
            ("access_token", aad.expose()),
        ];
        if let Some(tenant) = &tenant {
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
