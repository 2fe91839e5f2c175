//! `ConfigError`, and `Check`, the validation context every section's checks run in: where the
//! text came from (for messages) and how to read the environment.

use super::EnvLookup;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}: cannot read: {error}")]
    Read {
        origin: String,
        error: std::io::Error,
    },
    /// Malformed YAML, unknown keys, wrong types: serde_norway's message,
    /// which includes the key path, line and column.
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    /// Well-formed but invalid; `message` quotes the bad value.
    #[error("{origin}: {key}: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

/// Validation context: where the text came from, and how to read the
/// environment.
pub(super) struct Check<'a> {
    pub(super) origin: &'a str,
    pub(super) env: EnvLookup<'a>,
}

impl Check<'_> {
    pub(super) fn invalid(&self, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_owned(),
            key: key.to_owned(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::*;

    #[test]
    fn errors_are_reported_per_variant() {
        let e = parse(&MINIMAL.replace("1GiB", "x")).unwrap_err();
        assert!(matches!(
            &e,
            ConfigError::Invalid { origin, key, .. } if origin == ORIGIN && key == "cache.max_size"
        ));
        let e = parse("listen: [").unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }));
    }
}
