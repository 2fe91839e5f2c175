//! `cache:`: the directory, its size bound, the default tag TTL and the pinned images.

use std::path::PathBuf;
use std::time::Duration;

use super::error::{Check, ConfigError};
use super::raw::RawCache;
use super::shared::SharedConfig;
use super::upstreams::UpstreamConfig;
use crate::oci::ImageRef;

const DEFAULT_TAG_TTL: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// As written; a relative path resolves against the working directory.
    pub dir: PathBuf,
    /// Bytes, always > 0.
    pub max_size: u64,
    pub tag_ttl: Duration,
    /// Images whose manifests and blobs are never evicted; each host names a configured upstream.
    pub pin: Vec<ImageRef>,
    /// The shared tier under the local disk; `None`: local disk alone.
    pub shared: Option<SharedConfig>,
}

impl Check<'_> {
    pub(super) fn cache(&self, raw: &RawCache) -> Result<CacheConfig, ConfigError> {
        if raw.dir.is_empty() {
            return Err(self.invalid("cache.dir", "\"\" is not a directory path".into()));
        }
        let max_size = self.size("cache.max_size", &raw.max_size)?;
        let tag_ttl = match &raw.tag_ttl {
            Some(s) => self.duration("cache.tag_ttl", s)?,
            None => DEFAULT_TAG_TTL,
        };
        let shared = match &raw.shared {
            Some(shared) => Some(self.shared(shared)?),
            None => None,
        };
        Ok(CacheConfig {
            dir: PathBuf::from(&raw.dir),
            max_size,
            tag_ttl,
            pin: Vec::new(),
            shared,
        })
    }

    pub(super) fn pins(
        &self,
        raw: &[String],
        upstreams: &[UpstreamConfig],
    ) -> Result<Vec<ImageRef>, ConfigError> {
        raw.iter()
            .enumerate()
            .map(|(i, text)| {
                let key = format!("cache.pin[{i}]");
                let image = ImageRef::parse(text).map_err(|e| self.invalid(&key, e.to_string()))?;
                let host = image.host.as_deref();
                let known = |u: &UpstreamConfig| {
                    Some(u.name.as_str()) == host
                        || u.aliases.iter().any(|a| Some(a.as_str()) == host)
                };
                if host.is_some() && !upstreams.iter().any(known) {
                    return Err(
                        self.invalid(&key, format!("{text:?} names no configured upstream"))
                    );
                }
                Ok(image)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::*;

    #[test]
    fn max_size_errors() {
        let msg = err(&MINIMAL.replace("1GiB", "'50 GB!'"));
        assert_contains(
            &msg,
            &["cache.max_size: \"50 GB!\" is not a size (e.g. 50GiB, 500MB"],
        );
        let msg = err(&MINIMAL.replace("1GiB", "0GiB"));
        assert_contains(&msg, &["cache.max_size: \"0GiB\" must be greater than 0"]);
        let msg = err(&MINIMAL.replace("1GiB", "99999999999TiB"));
        assert_contains(&msg, &["cache.max_size: \"99999999999TiB\" is too large"]);
        let msg = err(&MINIMAL.replace("1GiB", "1.5"));
        assert_contains(&msg, &["cache.max_size: \"1.5\" is not a size"]);
        // A YAML integer is a byte count.
        let c = parse(&MINIMAL.replace("1GiB", "4096")).unwrap();
        assert_eq!(c.cache.max_size, 4096);
    }

    #[test]
    fn cache_dir_must_not_be_empty() {
        let msg = err(&MINIMAL.replace("dir: /tmp/cache", "dir: ''"));
        assert_contains(&msg, &["cache.dir: \"\" is not a directory path"]);
    }

    #[test]
    fn pins_are_image_references_on_configured_upstreams() {
        let with_pins = |pins: &str| {
            MINIMAL.replace("max_size: 1GiB", &format!("max_size: 1GiB\n  pin: {pins}"))
        };
        let config = parse(&with_pins("[alpine, 'docker.io/library/busybox@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855']")).unwrap();
        assert_eq!(config.cache.pin.len(), 2);
        assert_eq!(config.cache.pin[0].to_string(), "alpine:latest");
        let msg = err(&with_pins("[quay.io/x/y]"));
        assert_contains(
            &msg,
            &[
                "cache.pin[0]",
                "\"quay.io/x/y\" names no configured upstream",
            ],
        );
        let msg = err(&with_pins("['alpine:']"));
        assert_contains(&msg, &["cache.pin[0]", "invalid tag"]);
    }
}
