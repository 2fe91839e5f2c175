//! The checks of a parsed configuration that need the code it configures: the `tls:` pair loads
//! and matches (`tls::load`), and a GCP service-account key is one ring can sign with
//! (`gcp::check_key`). `config` stays a leaf that knows no TLS or credential code; every command
//! loads its config through here, so `check-config` refuses what `serve` would.
//!
//! Errors are `ConfigError::Invalid` naming the file, the key path and the bad file, as config
//! validation's own are.

use std::path::Path;

use crate::config::{Config, ConfigError, CredentialSource, GcpSource};
use crate::tls;
use crate::upstream::credentials::gcp;

/// [`Config::load`], then [`check`].
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let config = Config::load(path)?;
    check(&config, &path.display().to_string())?;
    Ok(config)
}

/// [`Config::from_yaml`], then [`check`].
pub fn from_yaml(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let config = Config::from_yaml(text, origin)?;
    check(&config, origin)?;
    Ok(config)
}

/// The first problem found, in the order validation meets the keys: upstreams, then `tls:`.
pub fn check(config: &Config, origin: &str) -> Result<(), ConfigError> {
    let invalid = |key: String, message: String| ConfigError::Invalid {
        origin: origin.to_owned(),
        key,
        message,
    };
    for (i, upstream) in config.upstreams.iter().enumerate() {
        if let Some(CredentialSource::Gcp(GcpSource::KeyFile { path, key })) =
            &upstream.credential_source
        {
            gcp::check_key(key).map_err(|e| {
                let field = format!("upstreams[{i}].credentials.gcp.key_file");
                invalid(field, format!("{:?}: {e}", path.to_string_lossy()))
            })?;
        }
    }
    if let Some(t) = &config.tls {
        tls::load(&t.cert_file, &t.key_file).map_err(|e| {
            invalid(
                format!("tls.{}", e.field),
                format!("{:?} {}", e.path, e.problem),
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
listen: 0.0.0.0:5000
cache:
  dir: /tmp/cache
  max_size: 1GiB
upstreams:
  - name: docker.io
    url: https://registry-1.docker.io
";

    fn err(text: &str) -> String {
        let msg = from_yaml(text, "test.yaml").unwrap_err().to_string();
        assert!(msg.starts_with("test.yaml: "), "{msg}");
        msg
    }

    fn assert_contains(msg: &str, parts: &[&str]) {
        for part in parts {
            assert!(msg.contains(part), "{msg:?} should contain {part:?}");
        }
    }

    fn tls_data(name: &str) -> String {
        format!("{}/tests/data/tls/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn with_tls(cert: &str, key: &str) -> String {
        format!("{MINIMAL}tls:\n  cert_file: {cert}\n  key_file: {key}\n")
    }

    #[test]
    fn a_matching_pair_passes() {
        let (cert, key) = (tls_data("a.pem"), tls_data("a.key"));
        let config = from_yaml(&with_tls(&cert, &key), "test.yaml").unwrap();
        assert!(config.tls.is_some());
        assert!(from_yaml(MINIMAL, "test.yaml").unwrap().tls.is_none());
    }

    #[test]
    fn tls_errors_name_the_field_and_the_file() {
        let (a_pem, a_key, b_key) = (tls_data("a.pem"), tls_data("a.key"), tls_data("b.key"));
        let msg = err(&with_tls("/nonexistent/c.pem", &a_key));
        assert_contains(
            &msg,
            &["tls.cert_file: \"/nonexistent/c.pem\" cannot be read: "],
        );
        let msg = err(&with_tls(&a_pem, &b_key));
        let mismatch =
            format!("tls.key_file: \"{b_key}\" does not match the certificate in \"{a_pem}\"");
        assert_contains(&msg, &[&mismatch]);
        let msg = err(&with_tls(&a_key, &a_key));
        assert_contains(
            &msg,
            &[&format!(
                "tls.cert_file: \"{a_key}\" contains no PEM certificate"
            )],
        );
    }

    #[test]
    fn a_gcp_key_that_is_no_rsa_key_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sa.json");
        let key = serde_json::json!({
            "type": "service_account",
            "client_email": "mirror@proj.iam.gserviceaccount.com",
            "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        });
        std::fs::write(&file, key.to_string()).unwrap();
        let text = format!(
            "{MINIMAL}    credentials: {{gcp: {{key_file: {}}}}}\n",
            file.display()
        );
        assert!(
            Config::from_yaml(&text, "test.yaml").is_ok(),
            "config alone"
        );
        let msg = err(&text);
        let want = format!(
            "test.yaml: upstreams[0].credentials.gcp.key_file: \"{}\": private_key is not",
            file.display()
        );
        assert!(msg.starts_with(&want), "{msg}");
    }

    #[test]
    fn load_checks_the_file_it_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dockside.yaml");
        std::fs::write(&path, with_tls(&tls_data("a.pem"), &tls_data("b.key"))).unwrap();
        let msg = load(&path).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("{}: tls.key_file: ", path.display())),
            "{msg}"
        );
    }
}
