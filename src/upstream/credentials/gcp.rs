//! Google Container Registry / Artifact Registry: an OAuth2 access token, used as the password
//! of user `oauth2accesstoken`. From a service-account JSON key (a JWT signed RS256 with the
//! key, exchanged at the key's `token_uri`), or from the metadata server of a GCE / GKE node.
//!
//! The JWT is built here on ring (already rustls' crypto provider) rather than with a JWT
//! crate: signing one fixed-shape assertion is a few lines, and this way there is one RSA
//! implementation in the binary.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use url::Url;

use super::{Basic, CredentialError, Http, Lease, env, send_json};
use crate::config::{GcpSource, Secret, ServiceAccountKey};

pub const USERNAME: &str = "oauth2accesstoken";
const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Google accepts assertions valid for at most one hour.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);

/// Whether a parsed key file's private key is an RSA PKCS#8 PEM key ring can sign with: run
/// after config parsing (`preflight`), so `check-config` refuses a key `serve` could not use.
pub fn check_key(key: &ServiceAccountKey) -> Result<(), String> {
    key_pair(key.private_key.expose()).map(drop)
}

fn key_pair(pem: &str) -> Result<RsaKeyPair, String> {
    let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| "private_key is not a PKCS#8 PEM key".to_string())?;
    RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
        .map_err(|e| format!("private_key is not a usable RSA key: {e}"))
}

pub enum Gcp {
    Key {
        key: ServiceAccountKey,
        pair: Arc<RsaKeyPair>,
        http: Http,
    },
    Metadata {
        endpoint: Option<Url>,
        http: Http,
    },
}

#[derive(serde::Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: Option<u64>,
}

impl Gcp {
    pub fn new(cfg: &GcpSource, http: Http) -> anyhow::Result<Gcp> {
        Ok(match cfg {
            GcpSource::KeyFile { key, .. } => Gcp::Key {
                pair: Arc::new(key_pair(key.private_key.expose()).map_err(anyhow::Error::msg)?),
                key: key.clone(),
                http,
            },
            GcpSource::Metadata { endpoint } => Gcp::Metadata {
                endpoint: endpoint.clone(),
                http,
            },
        })
    }

    pub async fn fetch(&self) -> Result<Lease, CredentialError> {
        let (answer, fetched) = match self {
            Gcp::Key { key, pair, http } => {
                let now = SystemTime::now();
                let assertion = assertion(key, pair, now)?;
                let form = [("grant_type", JWT_BEARER), ("assertion", &assertion)];
                let req = http
                    .client
                    .post(key.token_uri.clone())
                    .timeout(http.timeout)
                    .form(&form);
                let what = format!(
                    "OAuth2 token endpoint {} for {}",
                    key.token_uri, key.client_email
                );
                (send_json::<TokenAnswer>(req, &what).await?, now)
            }
            Gcp::Metadata { endpoint, http } => {
                let base = metadata_base(endpoint.as_ref())?;
                let url = base
                    .join("/computeMetadata/v1/instance/service-accounts/default/token")
                    .expect("a path joins a base URL");
                let req = http
                    .client
                    .get(url)
                    .timeout(http.timeout)
                    .header("Metadata-Flavor", "Google");
                let what = format!("GCP metadata server at {base}");
                let now = SystemTime::now();
                (send_json::<TokenAnswer>(req, &what).await?, now)
            }
        };
        Ok(Lease {
            basic: Basic {
                username: USERNAME.into(),
                password: Secret::new(answer.access_token),
            },
            expires: answer.expires_in.map(|s| fetched + Duration::from_secs(s)),
        })
    }
}

/// The configured endpoint, or `http://$GCE_METADATA_HOST`, or the well-known name.
fn metadata_base(endpoint: Option<&Url>) -> Result<Url, CredentialError> {
    if let Some(url) = endpoint {
        return Ok(url.clone());
    }
    let host = env("GCE_METADATA_HOST").unwrap_or_else(|| "metadata.google.internal".into());
    Url::parse(&format!("http://{host}"))
        .map_err(|e| CredentialError::refused(format!("GCE_METADATA_HOST {host:?}: {e}")))
}

/// The signed JWT a service account presents for an access token (RFC 7523).
fn assertion(
    key: &ServiceAccountKey,
    pair: &RsaKeyPair,
    now: SystemTime,
) -> Result<String, CredentialError> {
    let iat = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut header = serde_json::json!({ "alg": "RS256", "typ": "JWT" });
    if let Some(kid) = &key.private_key_id {
        header["kid"] = kid.clone().into();
    }
    let claims = serde_json::json!({
        "iss": key.client_email,
        "scope": SCOPE,
        "aud": key.token_uri.as_str(),
        "iat": iat,
        "exp": iat + ASSERTION_LIFETIME.as_secs(),
    });
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut signature = vec![0; pair.public().modulus_len()];
    pair.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        input.as_bytes(),
        &mut signature,
    )
    .map_err(|_| CredentialError::refused("signing the service-account JWT failed"))?;
    Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
    use std::process::Command;

    /// A fresh RSA key from the openssl CLI (PKCS#8 PEM, as in Google's key files).
    fn key_json(dir: &std::path::Path) -> String {
        let pem = dir.join("k.pem");
        let out = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&pem)
            .output()
            .expect("openssl");
        assert!(out.status.success());
        serde_json::json!({
            "type": "service_account",
            "client_email": "mirror@proj.iam.gserviceaccount.com",
            "private_key_id": "kid-1",
            "private_key": std::fs::read_to_string(&pem).unwrap(),
            "token_uri": "http://127.0.0.1:1/token",
        })
        .to_string()
    }

    #[test]
    fn the_assertion_is_a_verifiable_rs256_jwt_with_the_claims_google_wants() {
        let dir = tempfile::tempdir().unwrap();
        let key = ServiceAccountKey::parse(&key_json(dir.path())).unwrap();
        let pair = key_pair(key.private_key.expose()).unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let jwt = assertion(&key, &pair, now).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let json = |s: &str| -> serde_json::Value {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap()
        };
        assert_eq!(
            json(parts[0]),
            serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": "kid-1"})
        );
        let claims = json(parts[1]);
        assert_eq!(claims["iss"], "mirror@proj.iam.gserviceaccount.com");
        assert_eq!(claims["aud"], "http://127.0.0.1:1/token");
        assert_eq!(claims["scope"], SCOPE);
        assert_eq!(claims["iat"], 1_800_000_000u64);
        assert_eq!(claims["exp"], 1_800_003_600u64);
        let public = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, pair.public().as_ref());
        let signed = format!("{}.{}", parts[0], parts[1]);
        public
            .verify(
                signed.as_bytes(),
                &URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
            )
            .expect("the signature verifies with the key's public half");
    }

    /// A key file as `check-config` takes it: parsed by config, its key checked here.
    fn parse_checked(text: &str) -> Result<ServiceAccountKey, String> {
        let key = ServiceAccountKey::parse(text)?;
        check_key(&key).map(|()| key)
    }

    #[test]
    fn key_file_errors_name_the_field_not_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&key_json(dir.path())).unwrap();
        v["type"] = "authorized_user".into();
        assert!(
            parse_checked(&v.to_string())
                .unwrap_err()
                .contains("authorized_user")
        );
        v["type"] = "service_account".into();
        v["private_key"] = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into();
        let err = parse_checked(&v.to_string()).unwrap_err();
        assert!(err.starts_with("private_key is not"), "{err}");
        assert!(parse_checked("{}").is_err());
        let key = parse_checked(&key_json(dir.path())).unwrap();
        assert_eq!(
            format!("{key:?}").matches("PRIVATE").count(),
            0,
            "Debug hides the key"
        );
    }
}
