//! The S3 client of the shared tier: object_store's, with credentials from dockside's own AWS
//! chain (environment, profile files, web identity, IMDSv2; `upstream::credentials::aws`), the
//! one ECR uses, so both read the same places the same way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use object_store::aws::{AmazonS3Builder, AwsCredential, S3CopyIfNotExists};
use object_store::{ClientOptions, CredentialProvider, ObjectStore, RetryConfig};
use tokio::sync::Mutex;
use url::Url;

use crate::config::SharedConfig;
use crate::upstream::credentials::Http;
use crate::upstream::credentials::aws::Chain;

/// How long credentials from the chain are used before it is read again. Role credentials
/// last at least 15 minutes; static ones are re-read so a rotated file is picked up.
const CREDENTIALS_FOR: Duration = Duration::from_secs(5 * 60);

/// An S3 store for `config`, over plain HTTP when its endpoint is `http://`.
pub fn s3_store(config: &SharedConfig) -> anyhow::Result<Arc<dyn ObjectStore>> {
    // reqwest 0.13's rustls has no provider of its own here: ring, as for everything else.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let s3 = &config.s3;
    let credentials = Arc::new(ChainCredentials::new(config)?);
    let options = ClientOptions::new()
        .with_connect_timeout(config.timeout)
        // A blob's body may stream for minutes; waits are bounded per request by the tier
        // (headers) and by the fill's idle time-out (bodies).
        .with_timeout_disabled()
        .with_allow_http(
            s3.endpoint
                .as_ref()
                .is_some_and(|url| url.scheme() == "http"),
        );
    let retry = RetryConfig {
        max_retries: 1,
        retry_timeout: config.timeout,
        ..Default::default()
    };
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(&s3.bucket)
        .with_region(&s3.region)
        .with_credentials(credentials)
        .with_client_options(options)
        .with_retry(retry)
        .with_copy_if_not_exists(S3CopyIfNotExists::Multipart);
    if let Some(endpoint) = &s3.endpoint {
        builder = builder.with_endpoint(endpoint.as_str().trim_end_matches('/'));
    }
    Ok(Arc::new(builder.build()?))
}

/// object_store's credential provider over dockside's AWS chain, cached for a while.
#[derive(Debug)]
struct ChainCredentials {
    chain: ChainDebug,
    cached: Mutex<Option<(Instant, Arc<AwsCredential>)>>,
}

/// The chain, which holds an HTTP client and prints nothing of it.
struct ChainDebug(Chain);

impl std::fmt::Debug for ChainDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AWS credential chain")
    }
}

impl ChainCredentials {
    fn new(config: &SharedConfig) -> anyhow::Result<ChainCredentials> {
        let region = &config.s3.region;
        let client = reqwest::Client::builder()
            .user_agent(concat!("dockside/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let chain = Chain {
            profile: config.s3.profile.clone(),
            sts_endpoint: Url::parse(&format!("https://sts.{region}.amazonaws.com"))?,
            imds_endpoint: None,
            http: Http {
                client,
                timeout: config.timeout,
            },
        };
        Ok(ChainCredentials {
            chain: ChainDebug(chain),
            cached: Mutex::new(None),
        })
    }
}

#[async_trait]
impl CredentialProvider for ChainCredentials {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        // Held across the fetch: concurrent requests wait for one read of the chain.
        let mut cached = self.cached.lock().await;
        if let Some((at, credential)) = cached.as_ref() {
            if at.elapsed() < CREDENTIALS_FOR {
                return Ok(credential.clone());
            }
        }
        let found = self
            .chain
            .0
            .credentials()
            .await
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: e.message.into(),
            })?;
        let credential = Arc::new(AwsCredential {
            key_id: found.access_key_id,
            secret_key: found.secret_access_key.expose().to_string(),
            token: found.session_token.map(|t| t.expose().to_string()),
        });
        *cached = Some((Instant::now(), credential.clone()));
        Ok(credential)
    }
}
