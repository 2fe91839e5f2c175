//! Helpers for the config tests of every section.

use std::io::Write;

use super::{Config, ConfigError, from_yaml_with_env};

pub(crate) const ORIGIN: &str = "test.yaml";

/// A minimal valid config, for tests to extend.
pub(crate) const MINIMAL: &str = "
listen: 0.0.0.0:5000
cache:
  dir: /tmp/cache
  max_size: 1GiB
upstreams:
  - name: docker.io
    url: https://registry-1.docker.io
";

pub(crate) fn no_env(_: &str) -> Option<String> {
    None
}

pub(crate) fn parse(text: &str) -> Result<Config, ConfigError> {
    from_yaml_with_env(text, ORIGIN, &no_env)
}

pub(crate) fn parse_env(text: &str, var: &str, value: &str) -> Result<Config, ConfigError> {
    let env = |name: &str| (name == var).then(|| value.to_owned());
    from_yaml_with_env(text, ORIGIN, &env)
}

/// The error message, after checking it names the file.
pub(crate) fn err(text: &str) -> String {
    let msg = parse(text).unwrap_err().to_string();
    assert!(msg.starts_with("test.yaml: "), "{msg}");
    msg
}

/// MINIMAL with its single upstream's extra keys appended (6-space indent).
pub(crate) fn with_upstream_keys(extra: &str) -> String {
    format!("{MINIMAL}{extra}")
}

pub(crate) fn assert_contains(msg: &str, parts: &[&str]) {
    for part in parts {
        assert!(msg.contains(part), "{msg:?} should contain {part:?}");
    }
}

pub(crate) fn temp_file(contents: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(contents.as_bytes()).unwrap();
    f
}
