//! `limits:`: what one client connection may hold (see src/limits.rs for how they apply).

use std::time::Duration;

use super::error::{Check, ConfigError};
use super::raw::RawLimits;

/// `limits:`: what one client connection may hold. See src/limits.rs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Client connections open at once on the registry listeners; more are closed at once.
    pub max_connections: usize,
    /// From the start of waiting for a request until its whole header is in.
    pub header_timeout: Duration,
    /// Whole seconds (pingora's keep-alive unit), at least one: an idle connection's wait.
    pub idle_timeout: Duration,
    /// Each write to the client must finish within this.
    pub send_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 4096,
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
        }
    }
}

impl Check<'_> {
    pub(super) fn limits(&self, raw: Option<&RawLimits>) -> Result<Limits, ConfigError> {
        let empty = RawLimits::default();
        let raw = raw.unwrap_or(&empty);
        let defaults = Limits::default();
        let max_connections = match raw.max_connections {
            None => defaults.max_connections,
            Some(0) => {
                return Err(
                    self.invalid("limits.max_connections", "0 must be greater than 0".into())
                );
            }
            Some(n) => n,
        };
        let idle_timeout = self.timeout(
            "limits.idle_timeout",
            raw.idle_timeout.as_ref(),
            defaults.idle_timeout,
        )?;
        if idle_timeout.subsec_nanos() != 0 {
            let text = raw.idle_timeout.as_ref().map_or("", |s| &s.0);
            return Err(self.invalid(
                "limits.idle_timeout",
                format!("{text:?} must be a whole number of seconds"),
            ));
        }
        Ok(Limits {
            max_connections,
            header_timeout: self.timeout(
                "limits.header_timeout",
                raw.header_timeout.as_ref(),
                defaults.header_timeout,
            )?,
            idle_timeout,
            send_timeout: self.timeout(
                "limits.send_timeout",
                raw.send_timeout.as_ref(),
                defaults.send_timeout,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::*;

    #[test]
    fn limits_default_and_bounds() {
        assert_eq!(parse(MINIMAL).unwrap().limits, Limits::default());
        let c = parse(&format!(
            "{MINIMAL}limits: {{max_connections: 10, header_timeout: 500ms, idle_timeout: 2s, send_timeout: 3s}}\n"
        ))
        .unwrap();
        let want = Limits {
            max_connections: 10,
            header_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(2),
            send_timeout: Duration::from_secs(3),
        };
        assert_eq!(c.limits, want);
        let msg = err(&format!("{MINIMAL}limits: {{max_connections: 0}}\n"));
        assert_contains(&msg, &["limits.max_connections: 0 must be greater than 0"]);
        let msg = err(&format!("{MINIMAL}limits: {{idle_timeout: 1500ms}}\n"));
        assert_contains(
            &msg,
            &["limits.idle_timeout: \"1500ms\" must be a whole number of seconds"],
        );
        let msg = err(&format!("{MINIMAL}limits: {{send_timeout: 0s}}\n"));
        assert_contains(
            &msg,
            &["limits.send_timeout: \"0s\" must be greater than 0"],
        );
        let msg = err(&format!("{MINIMAL}limits: {{header_size: 1}}\n"));
        assert_contains(&msg, &["unknown field `header_size`"]);
    }
}
