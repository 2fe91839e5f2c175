//! AWS credentials from the usual chain, in the SDKs' order: environment variables, the shared
//! profile files, web identity (STS AssumeRoleWithWebIdentity, as on EKS), then the instance
//! metadata service (IMDSv2). Read each time ECR credentials are fetched (every ~9 h), so
//! rotated files and role credentials are picked up.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use url::Url;

use super::sigv4::AwsCredentials;
use super::{CredentialError, Http, env, send_text};
use crate::config::Secret;

/// Where the chain looks, besides the process environment.
pub struct Chain {
    pub profile: Option<String>,
    pub sts_endpoint: Url,
    pub imds_endpoint: Option<Url>,
    pub http: Http,
}

/// IMDS answers quickly on EC2; elsewhere nothing answers, so do not wait long.
const IMDS_TIMEOUT: Duration = Duration::from_secs(2);

impl Chain {
    pub async fn credentials(&self) -> Result<AwsCredentials, CredentialError> {
        if let Some(creds) = env_credentials()? {
            return Ok(creds);
        }
        if let Some(creds) = self.profile_credentials()? {
            return Ok(creds);
        }
        if let (Some(token_file), Some(role)) =
            (env("AWS_WEB_IDENTITY_TOKEN_FILE"), env("AWS_ROLE_ARN"))
        {
            return self.web_identity(&token_file, &role).await;
        }
        if env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Err(CredentialError::refused(
                "no AWS credentials: none in the environment or profile files, no web identity, \
                 and AWS_EC2_METADATA_DISABLED is set",
            ));
        }
        self.imds_credentials().await
    }

    /// `[profile]` of `~/.aws/credentials`, then `[profile NAME]` (or `[default]`) of
    /// `~/.aws/config`. A profile named by config or AWS_PROFILE must exist; `default` may not.
    fn profile_credentials(&self) -> Result<Option<AwsCredentials>, CredentialError> {
        let named = self.profile.clone().or_else(|| env("AWS_PROFILE"));
        let profile = named.clone().unwrap_or_else(|| "default".into());
        let home = env("HOME").map(PathBuf::from).unwrap_or_default();
        let credentials_file = env("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".aws/credentials"));
        let config_file = env("AWS_CONFIG_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".aws/config"));
        let config_section = if profile == "default" {
            profile.clone()
        } else {
            format!("profile {profile}")
        };
        for (file, section) in [
            (&credentials_file, &profile),
            (&config_file, &config_section),
        ] {
            let Ok(text) = std::fs::read_to_string(file) else {
                continue;
            };
            let Some(keys) = parse_ini(&text).remove(section.as_str()) else {
                continue;
            };
            let key_id = keys.get("aws_access_key_id");
            let secret = keys.get("aws_secret_access_key");
            match (key_id, secret) {
                (Some(id), Some(secret)) => {
                    return Ok(Some(AwsCredentials {
                        access_key_id: id.clone(),
                        secret_access_key: Secret::new(secret.clone()),
                        session_token: keys.get("aws_session_token").cloned().map(Secret::new),
                    }));
                }
                _ => {
                    return Err(CredentialError::refused(format!(
                        "AWS profile {profile:?} in {} has no aws_access_key_id and \
                         aws_secret_access_key (role chaining and credential_process are not \
                         supported)",
                        file.display()
                    )));
                }
            }
        }
        match named {
            Some(name) => Err(CredentialError::refused(format!(
                "AWS profile {name:?} is in neither {} nor {}",
                credentials_file.display(),
                config_file.display()
            ))),
            None => Ok(None),
        }
    }

    /// STS AssumeRoleWithWebIdentity with the token file's contents (an unsigned call: the
    /// web identity token is the proof).
    async fn web_identity(
        &self,
        token_file: &str,
        role: &str,
    ) -> Result<AwsCredentials, CredentialError> {
        let token = std::fs::read_to_string(token_file).map_err(|e| {
            CredentialError::refused(format!("AWS_WEB_IDENTITY_TOKEN_FILE {token_file:?}: {e}"))
        })?;
        let session = env("AWS_ROLE_SESSION_NAME").unwrap_or_else(|| "dockside".into());
        let form = [
            ("Action", "AssumeRoleWithWebIdentity"),
            ("Version", "2011-06-15"),
            ("RoleArn", role),
            ("RoleSessionName", &session),
            ("WebIdentityToken", token.trim()),
        ];
        let req = self
            .http
            .client
            .post(self.sts_endpoint.clone())
            .timeout(self.http.timeout)
            .form(&form);
        let what = format!("STS AssumeRoleWithWebIdentity at {}", self.sts_endpoint);
        let xml = send_text(req, &what).await?;
        let field = |name: &str| {
            xml_element(&xml, name).ok_or_else(|| {
                CredentialError::refused(format!("{what}: no <{name}> in the answer"))
            })
        };
        Ok(AwsCredentials {
            access_key_id: field("AccessKeyId")?,
            secret_access_key: Secret::new(field("SecretAccessKey")?),
            session_token: Some(Secret::new(field("SessionToken")?)),
        })
    }

    /// IMDSv2: a session token (PUT), the role name, then the role's credentials.
    async fn imds_credentials(&self) -> Result<AwsCredentials, CredentialError> {
        let base = match &self.imds_endpoint {
            Some(url) => url.clone(),
            None => {
                let text = env("AWS_EC2_METADATA_SERVICE_ENDPOINT")
                    .unwrap_or_else(|| "http://169.254.169.254".into());
                Url::parse(&text).map_err(|e| {
                    CredentialError::refused(format!(
                        "AWS_EC2_METADATA_SERVICE_ENDPOINT {text:?}: {e}"
                    ))
                })?
            }
        };
        let url = |path: &str| base.join(path).expect("a path joins a base URL");
        let client = &self.http.client;
        let what = format!("instance metadata (IMDSv2) at {base}");
        let token = send_text(
            client
                .put(url("/latest/api/token"))
                .timeout(IMDS_TIMEOUT)
                .header("x-aws-ec2-metadata-token-ttl-seconds", "21600"),
            &what,
        )
        .await?;
        let get = |path: String| {
            client
                .get(url(&path))
                .timeout(IMDS_TIMEOUT)
                .header("x-aws-ec2-metadata-token", token.trim())
        };
        let roles = send_text(
            get("/latest/meta-data/iam/security-credentials/".into()),
            &what,
        )
        .await?;
        let role = roles
            .lines()
            .next()
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .ok_or_else(|| {
                CredentialError::refused(format!("{what}: the instance has no IAM role"))
            })?;
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct RoleCredentials {
            access_key_id: String,
            secret_access_key: String,
            token: String,
        }
        let creds: RoleCredentials = super::send_json(
            get(format!("/latest/meta-data/iam/security-credentials/{role}")),
            &what,
        )
        .await?;
        Ok(AwsCredentials {
            access_key_id: creds.access_key_id,
            secret_access_key: Secret::new(creds.secret_access_key),
            session_token: Some(Secret::new(creds.token)),
        })
    }
}

fn env_credentials() -> Result<Option<AwsCredentials>, CredentialError> {
    match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        (Some(id), Some(secret)) => Ok(Some(AwsCredentials {
            access_key_id: id,
            secret_access_key: Secret::new(secret),
            session_token: env("AWS_SESSION_TOKEN").map(Secret::new),
        })),
        (None, None) => Ok(None),
        _ => Err(CredentialError::refused(
            "only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY is set",
        )),
    }
}

/// The AWS shared config format: `[section]` lines and `key = value` lines; `#` and `;` start
/// comments. Keys are lower-cased, as the SDKs treat them.
fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut sections: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            sections.entry(name.clone()).or_default();
            current = Some(name);
        } else if let (Some(section), Some((k, v))) = (&current, line.split_once('=')) {
            sections
                .entry(section.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    sections
}

/// The text of the first `<name>…</name>` element. STS answers carry key ids, base64 keys and
/// tokens and ISO dates, none of which contains markup; entities are decoded all the same.
fn xml_element(doc: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = doc.find(&open)? + open.len();
    let end = start + doc[start..].find(&format!("</{name}>"))?;
    let text = doc[start..end]
        .trim()
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&");
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ini_sections_and_comments() {
        let ini = parse_ini(
            "# top\n[default]\naws_access_key_id = AKID\nAWS_Secret_Access_Key=s3cr=t\n\
             ; c\n[profile  ci]\naws_session_token = tok\n",
        );
        assert_eq!(ini["default"]["aws_access_key_id"], "AKID");
        assert_eq!(ini["default"]["aws_secret_access_key"], "s3cr=t");
        assert_eq!(ini["profile ci"]["aws_session_token"], "tok");
    }

    #[test]
    fn xml_elements_from_an_sts_answer() {
        let xml = "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult>\
            <Credentials><SessionToken>a&amp;b</SessionToken><AccessKeyId>ASIA1</AccessKeyId>\
            </Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>";
        assert_eq!(xml_element(xml, "AccessKeyId").as_deref(), Some("ASIA1"));
        assert_eq!(xml_element(xml, "SessionToken").as_deref(), Some("a&b"));
        assert_eq!(xml_element(xml, "SecretAccessKey"), None);
    }
}
