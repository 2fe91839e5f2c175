//! Amazon ECR: AWS credentials from the chain, then `GetAuthorizationToken` (a SigV4-signed
//! JSON 1.1 POST), whose token is base64 of `AWS:<password>` and lives 12 hours.

use std::time::{Duration, SystemTime};

use base64::Engine;
use url::Url;

use super::aws::Chain;
use super::sigv4::{self, Scope};
use super::{Basic, CredentialError, Http, Lease, send_json};
use crate::config::{EcrSource, Secret};

const TARGET: &str = "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken";
const CONTENT_TYPE: &str = "application/x-amz-json-1.1";

pub struct Ecr {
    chain: Chain,
    region: String,
    registry_id: Option<String>,
    endpoint: Url,
    http: Http,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    authorization_data: Vec<AuthorizationData>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthorizationData {
    authorization_token: String,
    /// Seconds since the epoch (a JSON number, possibly fractional).
    expires_at: Option<f64>,
}

impl Ecr {
    pub fn new(cfg: &EcrSource, http: Http) -> Ecr {
        Ecr {
            chain: Chain {
                profile: cfg.profile.clone(),
                sts_endpoint: cfg.sts_endpoint.clone(),
                imds_endpoint: cfg.imds_endpoint.clone(),
                http: http.clone(),
            },
            region: cfg.region.clone(),
            registry_id: cfg.registry_id.clone(),
            endpoint: cfg.endpoint.clone(),
            http,
        }
    }

    pub async fn fetch(&self) -> Result<Lease, CredentialError> {
        let creds = self.chain.credentials().await?;
        let body = match &self.registry_id {
            Some(id) => serde_json::json!({ "registryIds": [id] }),
            None => serde_json::json!({}),
        }
        .to_string();
        let headers = [("content-type", CONTENT_TYPE), ("x-amz-target", TARGET)];
        let scope = Scope {
            region: &self.region,
            service: "ecr",
            time: SystemTime::now(),
        };
        let signed = sigv4::sign(
            &creds,
            &scope,
            "POST",
            &self.endpoint,
            &headers,
            body.as_bytes(),
        );
        let mut req = self
            .http
            .client
            .post(self.endpoint.clone())
            .timeout(self.http.timeout)
            .body(body);
        for (k, v) in headers.iter().map(|(k, v)| (*k, *v)) {
            req = req.header(k, v);
        }
        for (k, v) in &signed {
            req = req.header(k, v);
        }
        let what = format!("ECR GetAuthorizationToken at {}", self.endpoint);
        let answer: Answer = send_json(req, &what).await?;
        let data = answer
            .authorization_data
            .into_iter()
            .next()
            .ok_or_else(|| CredentialError::refused(format!("{what}: no authorizationData")))?;
        let basic = decode_token(&data.authorization_token).ok_or_else(|| {
            CredentialError::refused(format!("{what}: the token is not base64 of user:password"))
        })?;
        Ok(Lease {
            basic,
            expires: data
                .expires_at
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(s)),
        })
    }
}

/// base64(`user:password`) → Basic credentials.
fn decode_token(token: &str) -> Option<Basic> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (user, password) = text.split_once(':')?;
    (!user.is_empty() && !password.is_empty()).then(|| Basic {
        username: user.to_string(),
        password: Secret::new(password.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_decode_to_basic() {
        let b = decode_token("QVdTOnNlY3JldDpwYXJ0").unwrap(); // AWS:secret:part
        assert_eq!(b.username, "AWS");
        assert_eq!(b.password.expose(), "secret:part");
        assert!(decode_token("bm9jb2xvbg==").is_none(), "no colon");
        assert!(decode_token("!!").is_none());
    }
}
