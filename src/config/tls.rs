//! `tls:`: the certificate and key files and how often they are re-read. Only the shape is
//! checked here; that the pair loads and matches is `preflight`'s check (it needs rustls).

use std::path::PathBuf;
use std::time::Duration;

use super::error::{Check, ConfigError};
use super::raw::RawTls;

pub(super) const DEFAULT_TLS_RELOAD: Duration = Duration::from_secs(5);

/// `tls:`. That both files load and match is checked after parsing (`preflight`), by code this
/// module does not depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// How often both files are re-read for a rotated pair.
    pub reload_interval: Duration,
}

impl Check<'_> {
    pub(super) fn tls(&self, raw: &RawTls) -> Result<TlsConfig, ConfigError> {
        let tls = TlsConfig {
            cert_file: PathBuf::from(&raw.cert_file),
            key_file: PathBuf::from(&raw.key_file),
            reload_interval: self.timeout(
                "tls.reload_interval",
                raw.reload_interval.as_ref(),
                DEFAULT_TLS_RELOAD,
            )?,
        };
        Ok(tls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::*;

    fn tls_data(name: &str) -> String {
        format!("{}/tests/data/tls/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn with_tls(cert: &str, key: &str, extra: &str) -> String {
        format!("{MINIMAL}tls:\n  cert_file: {cert}\n  key_file: {key}\n{extra}")
    }

    #[test]
    fn tls_loads_a_matching_pair() {
        let (cert, key) = (tls_data("a.pem"), tls_data("a.key"));
        let c = parse(&with_tls(&cert, &key, "")).unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.cert_file, PathBuf::from(&cert));
        assert_eq!(tls.reload_interval, DEFAULT_TLS_RELOAD);
        let c = parse(&with_tls(&cert, &key, "  reload_interval: 1m\n")).unwrap();
        assert_eq!(c.tls.unwrap().reload_interval, Duration::from_secs(60));
        assert_eq!(parse(MINIMAL).unwrap().tls, None);
    }

    #[test]
    fn tls_errors_name_the_field() {
        let (a_pem, a_key) = (tls_data("a.pem"), tls_data("a.key"));
        let msg = err(&with_tls(&a_pem, &a_key, "  reload_interval: 0s\n"));
        assert_contains(
            &msg,
            &["tls.reload_interval: \"0s\" must be greater than 0"],
        );
        let msg = err(&format!("{MINIMAL}tls:\n  cert_file: {a_pem}\n"));
        assert_contains(&msg, &["missing field `key_file`"]);
    }
}
