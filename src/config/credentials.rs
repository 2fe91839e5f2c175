//! `credentials:` of an upstream: where its Basic credentials come from when they are not a
//! static `username` + password (cloud registries whose passwords are short-lived tokens).
//!
//! Everything that can be checked at start without the credential code is checked here: one
//! source per upstream, URLs, the ECR region, that a GCP key file is a service-account key, that
//! a credential helper exists. That its private key is a usable RSA key is checked after parsing
//! (`preflight`), by the code that signs with it. Values that change at run time (AWS environment and profile files,
//! Azure AD token files, the helper's answer) are read when credentials are fetched.

use std::path::PathBuf;

use serde::Deserialize;
use url::Url;

use super::{Check, ConfigError, RawUpstream, Secret};

/// A validated credential source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    Ecr(EcrSource),
    Gcp(GcpSource),
    Acr(AcrSource),
    /// A Docker credential helper program (`docker-credential-NAME`, or a path).
    Helper(HelperSource),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcrSource {
    pub region: String,
    /// The account whose registry this is (from the host name or `registry_id`).
    pub registry_id: Option<String>,
    /// The ECR API; default `https://api.ecr.<region>.amazonaws.com`.
    pub endpoint: Url,
    /// STS for web identity; default `https://sts.<region>.amazonaws.com`.
    pub sts_endpoint: Url,
    /// Instance metadata; `None`: AWS_EC2_METADATA_SERVICE_ENDPOINT or 169.254.169.254.
    pub imds_endpoint: Option<Url>,
    /// Shared-config profile; `None`: AWS_PROFILE or `default`.
    pub profile: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GcpSource {
    /// A service-account JSON key, read and checked at start; `path` is where it was read from.
    KeyFile {
        path: PathBuf,
        key: ServiceAccountKey,
    },
    /// The metadata server; `None`: GCE_METADATA_HOST or metadata.google.internal.
    Metadata { endpoint: Option<Url> },
}

/// The fields of a service-account key file that the token flow needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountKey {
    pub client_email: String,
    pub private_key_id: Option<String>,
    /// PEM text; whether it is a usable RSA key is `upstream::credentials::gcp`'s to say.
    pub private_key: Secret,
    pub token_uri: Url,
}

#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: String,
    client_email: String,
    private_key_id: Option<String>,
    private_key: String,
    token_uri: Option<String>,
}

impl ServiceAccountKey {
    /// Parses and checks a key file's text as a service-account key. Errors name the field,
    /// never the key.
    pub fn parse(text: &str) -> Result<ServiceAccountKey, String> {
        let file: KeyFile =
            serde_json::from_str(text).map_err(|e| format!("not a service-account key: {e}"))?;
        if file.kind != "service_account" {
            return Err(format!("type is {:?}, not \"service_account\"", file.kind));
        }
        let token_uri = file
            .token_uri
            .as_deref()
            .unwrap_or("https://oauth2.googleapis.com/token");
        let token_uri = Url::parse(token_uri)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| format!("token_uri {token_uri:?} is not an http(s) URL"))?;
        Ok(ServiceAccountKey {
            client_email: file.client_email,
            private_key_id: file.private_key_id,
            private_key: Secret::new(file.private_key),
            token_uri,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcrSource {
    pub tenant: Option<String>,
    pub aad_token: AadToken,
    /// Default: `<upstream url>/oauth2/exchange`.
    pub exchange_url: Url,
}

/// Where the Azure AD access token comes from, each time credentials are fetched (files rotate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AadToken {
    File(PathBuf),
    Env(String),
    /// AKS workload identity: the federated token in AZURE_FEDERATED_TOKEN_FILE, exchanged at
    /// Azure AD (AZURE_AUTHORITY_HOST, AZURE_TENANT_ID, AZURE_CLIENT_ID) for an access token.
    WorkloadIdentity,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperSource {
    /// `docker-credential-NAME` (looked up on PATH) or an absolute path.
    pub program: PathBuf,
    /// What the helper is asked for on stdin: the registry host.
    pub server: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredentials {
    ecr: Option<RawEcr>,
    gcp: Option<RawGcp>,
    acr: Option<RawAcr>,
    helper: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEcr {
    region: Option<String>,
    registry_id: Option<String>,
    endpoint: Option<String>,
    sts_endpoint: Option<String>,
    imds_endpoint: Option<String>,
    profile: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGcp {
    key_file: Option<String>,
    #[serde(default)]
    metadata: bool,
    metadata_endpoint: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAcr {
    tenant: Option<String>,
    aad_token_file: Option<String>,
    aad_token_env: Option<String>,
    #[serde(default)]
    workload_identity: bool,
    exchange_url: Option<String>,
}

/// `<account>.dkr.ecr.<region>.amazonaws.com[.cn]` → (account, region).
pub fn ecr_host_parts(host: &str) -> Option<(&str, &str)> {
    let (account, rest) = host.split_once(".dkr.ecr.")?;
    let region = rest
        .strip_suffix(".amazonaws.com")
        .or_else(|| rest.strip_suffix(".amazonaws.com.cn"))?;
    let valid = account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit());
    (valid && valid_region(region)).then_some((account, region))
}

fn valid_region(region: &str) -> bool {
    !region.is_empty()
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Check<'_> {
    /// The upstream's credential source, if it has one. `url` is its first validated URL: the
    /// host that ECR's region, a helper's question and ACR's exchange are derived from.
    pub(super) fn credential_source(
        &self,
        key: &str,
        raw: &RawUpstream,
        url: &Url,
    ) -> Result<Option<CredentialSource>, ConfigError> {
        let Some(creds) = &raw.credentials else {
            return Ok(None);
        };
        let key = format!("{key}.credentials");
        if raw.username.is_some() {
            return Err(self.invalid(
                &key,
                "cannot be combined with username (a source gives both user and password)".into(),
            ));
        }
        let given = [
            creds.ecr.is_some(),
            creds.gcp.is_some(),
            creds.acr.is_some(),
            creds.helper.is_some(),
        ];
        let count = given.iter().filter(|&&g| g).count();
        if count != 1 {
            return Err(self.invalid(
                &key,
                format!("needs exactly one of ecr, gcp, acr, helper ({count} given)"),
            ));
        }
        let host = url_host(url);
        let source = if let Some(ecr) = &creds.ecr {
            CredentialSource::Ecr(self.ecr(&format!("{key}.ecr"), ecr, &host)?)
        } else if let Some(gcp) = &creds.gcp {
            CredentialSource::Gcp(self.gcp(&format!("{key}.gcp"), gcp)?)
        } else if let Some(acr) = &creds.acr {
            CredentialSource::Acr(self.acr(&format!("{key}.acr"), acr, url)?)
        } else if let Some(helper) = &creds.helper {
            CredentialSource::Helper(self.helper(&format!("{key}.helper"), helper, &host)?)
        } else {
            unreachable!("exactly one source is set")
        };
        Ok(Some(source))
    }

    fn ecr(&self, key: &str, raw: &RawEcr, host: &str) -> Result<EcrSource, ConfigError> {
        let from_host = ecr_host_parts(host);
        let region = raw
            .region
            .clone()
            .or_else(|| from_host.map(|(_, r)| r.to_string()))
            .or_else(|| (self.env)("AWS_REGION"))
            .or_else(|| (self.env)("AWS_DEFAULT_REGION"))
            .ok_or_else(|| {
                self.invalid(
                    &format!("{key}.region"),
                    format!(
                        "is not set, and neither the host {host:?} nor AWS_REGION / \
                         AWS_DEFAULT_REGION name a region"
                    ),
                )
            })?;
        if !valid_region(&region) {
            return Err(self.invalid(
                &format!("{key}.region"),
                format!("{region:?} is not an AWS region (e.g. eu-west-1)"),
            ));
        }
        let registry_id = raw
            .registry_id
            .clone()
            .or_else(|| from_host.map(|(a, _)| a.to_string()));
        if let Some(id) = &registry_id
            && (id.len() != 12 || !id.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(self.invalid(
                &format!("{key}.registry_id"),
                format!("{id:?} is not a 12-digit AWS account id"),
            ));
        }
        let endpoint = |field: &str, raw: &Option<String>, default: String| {
            let text = raw.clone().unwrap_or(default);
            self.endpoint_url(&format!("{key}.{field}"), &text)
        };
        Ok(EcrSource {
            endpoint: endpoint(
                "endpoint",
                &raw.endpoint,
                format!("https://api.ecr.{region}.amazonaws.com"),
            )?,
            sts_endpoint: endpoint(
                "sts_endpoint",
                &raw.sts_endpoint,
                format!("https://sts.{region}.amazonaws.com"),
            )?,
            imds_endpoint: match &raw.imds_endpoint {
                Some(text) => Some(self.endpoint_url(&format!("{key}.imds_endpoint"), text)?),
                None => None,
            },
            profile: raw.profile.clone(),
            region,
            registry_id,
        })
    }

    fn gcp(&self, key: &str, raw: &RawGcp) -> Result<GcpSource, ConfigError> {
        match (&raw.key_file, raw.metadata) {
            (Some(path), false) => {
                if raw.metadata_endpoint.is_some() {
                    return Err(self.invalid(
                        &format!("{key}.metadata_endpoint"),
                        "only applies with metadata: true".into(),
                    ));
                }
                let field = format!("{key}.key_file");
                let text = std::fs::read_to_string(path)
                    .map_err(|e| self.invalid(&field, format!("{path:?} cannot be read: {e}")))?;
                let key = ServiceAccountKey::parse(&text)
                    .map_err(|e| self.invalid(&field, format!("{path:?}: {e}")))?;
                Ok(GcpSource::KeyFile {
                    path: PathBuf::from(path),
                    key,
                })
            }
            (None, true) => Ok(GcpSource::Metadata {
                endpoint: match &raw.metadata_endpoint {
                    Some(text) => {
                        Some(self.endpoint_url(&format!("{key}.metadata_endpoint"), text)?)
                    }
                    None => None,
                },
            }),
            _ => Err(self.invalid(
                key,
                "needs exactly one of key_file or metadata: true".into(),
            )),
        }
    }

    fn acr(&self, key: &str, raw: &RawAcr, url: &Url) -> Result<AcrSource, ConfigError> {
        let aad_token = match (
            &raw.aad_token_file,
            &raw.aad_token_env,
            raw.workload_identity,
        ) {
            (Some(path), None, false) => AadToken::File(PathBuf::from(path)),
            (None, Some(var), false) => AadToken::Env(var.clone()),
            (None, None, true) => AadToken::WorkloadIdentity,
            _ => {
                return Err(self.invalid(
                    key,
                    "needs exactly one of aad_token_file, aad_token_env, workload_identity: true \
                     (for ACR admin credentials use username and password instead)"
                        .into(),
                ));
            }
        };
        let exchange_url = match &raw.exchange_url {
            Some(text) => self.endpoint_url(&format!("{key}.exchange_url"), text)?,
            None => url
                .join("/oauth2/exchange")
                .expect("a path joins a base URL"),
        };
        Ok(AcrSource {
            tenant: raw.tenant.clone(),
            aad_token,
            exchange_url,
        })
    }

    fn helper(&self, key: &str, raw: &str, host: &str) -> Result<HelperSource, ConfigError> {
        let program = if raw.starts_with('/') {
            let path = PathBuf::from(raw);
            if !path.is_file() {
                return Err(self.invalid(key, format!("{raw:?} is not a file")));
            }
            path
        } else {
            let name = raw.strip_prefix("docker-credential-").unwrap_or(raw);
            let plain = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !plain {
                return Err(self.invalid(
                    key,
                    format!(
                        "{raw:?} is neither a helper name (ecr-login for \
                         docker-credential-ecr-login) nor an absolute path"
                    ),
                ));
            }
            PathBuf::from(format!("docker-credential-{name}"))
        };
        Ok(HelperSource {
            program,
            server: host.to_string(),
        })
    }

    /// An http(s) URL of a credential endpoint, without credentials in it.
    fn endpoint_url(&self, key: &str, text: &str) -> Result<Url, ConfigError> {
        let url = Url::parse(text)
            .map_err(|e| self.invalid(key, format!("{text:?} is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(self.invalid(key, format!("{text:?} is not an http or https URL")));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(self.invalid(key, "must not contain credentials".into()));
        }
        Ok(url)
    }
}

/// `host[:port]` of an upstream URL, as a credential helper or token service knows it.
fn url_host(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigError, from_yaml_with_env};
    use super::*;

    fn parse_with(url: &str, creds: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let indented: String = creds.lines().map(|l| format!("      {l}\n")).collect();
        let text = format!(
            "listen: \"127.0.0.1:5000\"\ncache:\n  dir: /tmp/x\n  max_size: 1GiB\nupstreams:\n  - name: registry.example\n    \
             url: {url}\n    credentials:\n{indented}"
        );
        let lookup = |name: &str| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        };
        from_yaml_with_env(&text, "test.yaml", &lookup)
    }

    fn source(url: &str, creds: &str) -> CredentialSource {
        parse_with(url, creds, &[]).unwrap().upstreams[0]
            .credential_source
            .clone()
            .unwrap()
    }

    fn err(url: &str, creds: &str) -> String {
        parse_with(url, creds, &[]).unwrap_err().to_string()
    }

    const URL: &str = "https://registry.example";

    #[test]
    fn ecr_takes_account_and_region_from_an_ecr_host() {
        let CredentialSource::Ecr(ecr) = source(
            "https://123456789012.dkr.ecr.eu-west-1.amazonaws.com",
            "ecr: {}",
        ) else {
            panic!("not ecr")
        };
        assert_eq!(ecr.region, "eu-west-1");
        assert_eq!(ecr.registry_id.as_deref(), Some("123456789012"));
        assert_eq!(
            ecr.endpoint.as_str(),
            "https://api.ecr.eu-west-1.amazonaws.com/"
        );
        assert_eq!(
            ecr.sts_endpoint.as_str(),
            "https://sts.eu-west-1.amazonaws.com/"
        );
        assert_eq!(ecr.imds_endpoint, None);
    }

    #[test]
    fn ecr_region_from_config_or_environment_or_an_error() {
        let from_env = parse_with(URL, "ecr: {}", &[("AWS_DEFAULT_REGION", "us-east-2")]).unwrap();
        let Some(CredentialSource::Ecr(ecr)) = &from_env.upstreams[0].credential_source else {
            panic!()
        };
        assert_eq!(ecr.region, "us-east-2");
        assert_eq!(ecr.registry_id, None);
        let msg = err(URL, "ecr: {}");
        assert!(
            msg.starts_with("test.yaml: upstreams[0].credentials.ecr.region: is not set"),
            "{msg}"
        );
        let msg = err(URL, "ecr: {region: EU_West}");
        assert!(msg.contains("\"EU_West\" is not an AWS region"), "{msg}");
        let msg = err(URL, "ecr: {region: eu-west-1, registry_id: '123'}");
        assert!(
            msg.contains("credentials.ecr.registry_id: \"123\" is not a 12-digit"),
            "{msg}"
        );
        let msg = err(URL, "ecr: {region: eu-west-1, endpoint: 'ftp://x'}");
        assert!(
            msg.contains("credentials.ecr.endpoint: \"ftp://x\" is not an http or https URL"),
            "{msg}"
        );
        let msg = err(URL, "ecr: {region: eu-west-1, regoin: x}");
        assert!(msg.contains("unknown field `regoin`"), "{msg}");
    }

    #[test]
    fn exactly_one_source_and_no_username_beside_it() {
        let msg = err(URL, "helper: a\nacr: {aad_token_env: X}");
        assert!(
            msg.contains(
                "upstreams[0].credentials: needs exactly one of ecr, gcp, acr, helper (2 given)"
            ),
            "{msg}"
        );
        let text = "listen: \"127.0.0.1:5000\"\ncache:\n  dir: /x\n  max_size: 1GiB\nupstreams:\n  - name: r.example\n    \
                    url: https://r.example\n    username: u\n    password: p\n    \
                    credentials: {helper: x}\n";
        let msg = from_yaml_with_env(text, "test.yaml", &|_| None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("cannot be combined with username"), "{msg}");
    }

    #[test]
    fn gcp_needs_a_readable_service_account_key_or_the_metadata_server() {
        let msg = err(URL, "gcp: {key_file: /nonexistent/sa.json}");
        assert!(
            msg.contains("credentials.gcp.key_file: \"/nonexistent/sa.json\" cannot be read"),
            "{msg}"
        );
        let bad = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(bad.path(), r#"{"type":"service_account"}"#).unwrap();
        let msg = err(URL, &format!("gcp: {{key_file: {}}}", bad.path().display()));
        assert!(msg.contains("not a service-account key"), "{msg}");
        let msg = err(URL, "gcp: {}");
        assert!(
            msg.contains("needs exactly one of key_file or metadata: true"),
            "{msg}"
        );
        assert_eq!(
            source(
                URL,
                "gcp: {metadata: true, metadata_endpoint: 'http://127.0.0.1:1'}"
            ),
            CredentialSource::Gcp(GcpSource::Metadata {
                endpoint: Some(Url::parse("http://127.0.0.1:1").unwrap())
            })
        );
    }

    #[test]
    fn acr_exchanges_at_the_registry_by_default() {
        let CredentialSource::Acr(acr) = source(URL, "acr: {tenant: t, aad_token_env: AAD}") else {
            panic!()
        };
        assert_eq!(
            acr.exchange_url.as_str(),
            "https://registry.example/oauth2/exchange"
        );
        assert_eq!(acr.aad_token, AadToken::Env("AAD".into()));
        let msg = err(URL, "acr: {tenant: t}");
        assert!(
            msg.contains("needs exactly one of aad_token_file, aad_token_env, workload_identity"),
            "{msg}"
        );
    }

    #[test]
    fn helpers_by_name_or_absolute_path() {
        let CredentialSource::Helper(h) = source("http://127.0.0.1:5000", "helper: ecr-login")
        else {
            panic!()
        };
        assert_eq!(h.program, PathBuf::from("docker-credential-ecr-login"));
        assert_eq!(h.server, "127.0.0.1:5000");
        let CredentialSource::Helper(h) = source(URL, "helper: docker-credential-gcr") else {
            panic!()
        };
        assert_eq!(h.program, PathBuf::from("docker-credential-gcr"));
        assert_eq!(h.server, "registry.example");
        let msg = err(URL, "helper: '../evil'");
        assert!(
            msg.contains("credentials.helper: \"../evil\" is neither a helper name"),
            "{msg}"
        );
        let msg = err(URL, "helper: /nonexistent/docker-credential-x");
        assert!(msg.contains("is not a file"), "{msg}");
    }

    #[test]
    fn ecr_host_parts_only_match_ecr_hosts() {
        assert_eq!(
            ecr_host_parts("123456789012.dkr.ecr.us-east-1.amazonaws.com"),
            Some(("123456789012", "us-east-1"))
        );
        assert_eq!(
            ecr_host_parts("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn"),
            Some(("123456789012", "cn-north-1"))
        );
        assert_eq!(
            ecr_host_parts("12345.dkr.ecr.us-east-1.amazonaws.com"),
            None
        );
        assert_eq!(ecr_host_parts("ghcr.io"), None);
    }
}
