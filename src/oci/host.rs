//! `RegistryHost`: a registry host as clients and operators name it (`docker.io`,
//! `localhost:5000`), validated and lowercased once, so that routing, image references and the
//! configuration share one grammar and nothing downstream re-checks a raw string.

use std::fmt;
use std::ops::Deref;

use super::shown;

/// Longest registry host (with port) accepted.
const HOST_MAX: usize = 255;

/// DNS labels or an IPv4 address, optionally followed by `:port`, at most 255 characters, kept
/// lowercased (host names are case-insensitive). Labels are `[A-Za-z0-9-]`, non-empty, at most
/// 63 characters, and neither start nor end with `-`. Bracketed IPv6 hosts are not accepted.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegistryHost(String);

/// A value that is not a registry host (cut to a loggable length).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid registry host {0:?}")]
pub struct HostError(pub String);

impl RegistryHost {
    pub fn parse(s: &str) -> Result<RegistryHost, HostError> {
        if !valid(s) {
            return Err(HostError(shown(s)));
        }
        Ok(RegistryHost(s.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// A host reads as the text it is (`route.ns.as_deref()` is an `Option<&str>`).
impl Deref for RegistryHost {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for RegistryHost {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn valid(s: &str) -> bool {
    if s.is_empty() || s.len() > HOST_MAX {
        return false;
    }
    let (host, port) = match s.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (s, None),
    };
    host.split('.').all(valid_label) && port.is_none_or(valid_port)
}

fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-')
}

fn valid_port(port: &str) -> bool {
    !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|c| c.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_registry_host(s: &str) -> bool {
        RegistryHost::parse(s).is_ok()
    }

    #[test]
    fn registry_host_grammar() {
        for ok in [
            "docker.io",
            "localhost",
            "localhost:5000",
            "127.0.0.1:65535",
            "a-b.example.com",
            "x1",
        ] {
            assert!(valid_registry_host(ok), "{ok}");
        }
        let label63 = "a".repeat(63);
        assert!(valid_registry_host(&label63));
        assert!(!valid_registry_host(&"a".repeat(64)));
        let host255 = format!("{label63}.{label63}.{label63}.{}", "b".repeat(63));
        assert_eq!(host255.len(), 255);
        assert!(valid_registry_host(&host255));
        assert!(!valid_registry_host(&format!("{host255}:1")));
    }

    #[test]
    fn bad_hosts_are_refused() {
        for bad in [
            "",
            "-a.io",
            "a-.io",
            "a..io",
            "a.io:",
            "a.io:0",
            "a.io:65536",
            "a.io:123456",
            "a_b.io",
            "[::1]:5000",
            "a.io/x",
            "a.io:1:2",
        ] {
            assert!(!valid_registry_host(bad), "{bad:?}");
        }
    }

    #[test]
    fn hosts_are_lowercased_and_read_as_text() {
        let host = RegistryHost::parse("Registry.Corp:5000").unwrap();
        assert_eq!(host.as_str(), "registry.corp:5000");
        assert_eq!(host.to_string(), "registry.corp:5000");
        assert_eq!(Some(host.clone()).as_deref(), Some("registry.corp:5000"));
        assert_eq!(host.into_string(), "registry.corp:5000");
    }

    #[test]
    fn errors_quote_a_cut_value() {
        let err = RegistryHost::parse(&format!("bad host{}", "x".repeat(1000))).unwrap_err();
        assert!(err.0.len() < 300, "{}", err.0.len());
        assert!(
            err.to_string()
                .starts_with("invalid registry host \"bad host")
        );
    }
}
