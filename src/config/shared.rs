//! `cache.shared`: the S3-compatible tier under the local disk, shared by every replica.

use std::time::Duration;

use url::Url;

use super::error::{Check, ConfigError};
use super::raw::{RawS3, RawShared};
use super::upstreams::Circuit;
use super::values::redact_userinfo;

/// How long one request to the tier may take to answer before dockside goes on without it.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Verified objects waiting to be written behind; beyond this, new ones are dropped (counted).
const DEFAULT_UPLOAD_QUEUE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedConfig {
    pub s3: S3Config,
    /// Each request's wait for an answer (headers, or a small object whole).
    pub timeout: Duration,
    pub circuit: Circuit,
    pub upload_queue: usize,
    /// Objects written longer ago than this are deleted from the tier by dockside itself;
    /// `None`: the bucket's lifecycle rules bound it.
    pub max_age: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// `None`: AWS S3 itself, for `region`.
    pub endpoint: Option<Url>,
    pub bucket: String,
    pub region: String,
    /// Every key starts with it; empty, or ending in `/`.
    pub prefix: String,
    /// An AWS profile of the shared files, for credentials; `None`: `AWS_PROFILE` or `default`.
    pub profile: Option<String>,
}

impl Check<'_> {
    pub(super) fn shared(&self, raw: &RawShared) -> Result<SharedConfig, ConfigError> {
        let key = "cache.shared";
        let upload_queue = match raw.upload_queue {
            Some(0) => {
                return Err(self.invalid(
                    &format!("{key}.upload_queue"),
                    "0 must be at least 1".into(),
                ));
            }
            Some(n) => n,
            None => DEFAULT_UPLOAD_QUEUE,
        };
        Ok(SharedConfig {
            s3: self.s3(&raw.s3)?,
            timeout: self.timeout(
                &format!("{key}.timeout"),
                raw.timeout.as_ref(),
                DEFAULT_TIMEOUT,
            )?,
            circuit: self.circuit(&format!("{key}.circuit"), raw.circuit.as_ref())?,
            upload_queue,
            max_age: match &raw.max_age {
                Some(age) => {
                    Some(self.timeout(&format!("{key}.max_age"), Some(age), DEFAULT_TIMEOUT)?)
                }
                None => None,
            },
        })
    }

    fn s3(&self, raw: &RawS3) -> Result<S3Config, ConfigError> {
        let key = "cache.shared.s3";
        let endpoint = match &raw.endpoint {
            Some(text) => Some(self.s3_endpoint(&format!("{key}.endpoint"), text)?),
            None => None,
        };
        if !is_bucket_name(&raw.bucket) {
            return Err(self.invalid(
                &format!("{key}.bucket"),
                format!(
                    "{:?} is not a bucket name (3 to 63 lowercase letters, digits, '.' and '-', \
                     starting and ending with a letter or digit)",
                    raw.bucket
                ),
            ));
        }
        let region_ok = !raw.region.is_empty()
            && raw
                .region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !region_ok {
            return Err(self.invalid(
                &format!("{key}.region"),
                format!("{:?} is not a region (e.g. us-east-1)", raw.region),
            ));
        }
        let prefix = self.prefix(&format!("{key}.prefix"), raw.prefix.as_deref())?;
        Ok(S3Config {
            endpoint,
            bucket: raw.bucket.clone(),
            region: raw.region.clone(),
            prefix,
            profile: raw.profile.clone(),
        })
    }

    fn s3_endpoint(&self, key: &str, text: &str) -> Result<Url, ConfigError> {
        let bad = |why: &str| self.invalid(key, format!("{:?} {why}", redact_userinfo(text)));
        let url = Url::parse(text).map_err(|e| bad(&format!("is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("is not an http or https URL"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "must not contain credentials (they come from AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY, the AWS profile files or web identity)",
            ));
        }
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err(bad(
                "must be just scheme://host[:port]; the bucket is `bucket`, a key prefix `prefix`",
            ));
        }
        Ok(url)
    }

    /// A key prefix made of plain path segments, given back ending in `/`.
    fn prefix(&self, key: &str, text: Option<&str>) -> Result<String, ConfigError> {
        let Some(text) = text.filter(|t| !t.is_empty()) else {
            return Ok(String::new());
        };
        let trimmed = text.strip_suffix('/').unwrap_or(text);
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        if !trimmed.split('/').all(segment_ok) {
            return Err(self.invalid(
                key,
                format!(
                    "{text:?} is not a key prefix (path segments of letters, digits, '.', '_' \
                     and '-', separated by '/', e.g. cache/)"
                ),
            ));
        }
        Ok(format!("{trimmed}/"))
    }
}

fn is_bucket_name(name: &str) -> bool {
    let edge_ok = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    (3..=63).contains(&name.len())
        && edge_ok(name.bytes().next())
        && edge_ok(name.bytes().last())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::test_support::*;

    fn with_shared(s3: &str, extra: &str) -> String {
        MINIMAL.replace(
            "  max_size: 1GiB\n",
            &format!("  max_size: 1GiB\n  shared:\n    s3:\n{s3}{extra}"),
        )
    }

    const S3: &str = "      endpoint: \"http://127.0.0.1:9000\"\n      bucket: dockside\n      region: us-east-1\n";

    #[test]
    fn the_contract_keys_parse_with_defaults() {
        let c = parse(&with_shared(&format!("{S3}      prefix: cache/\n"), "")).unwrap();
        let shared = c.cache.shared.unwrap();
        assert_eq!(
            shared.s3.endpoint.unwrap().as_str(),
            "http://127.0.0.1:9000/"
        );
        assert_eq!(shared.s3.bucket, "dockside");
        assert_eq!(shared.s3.region, "us-east-1");
        assert_eq!(shared.s3.prefix, "cache/");
        assert_eq!(shared.timeout, Duration::from_secs(5));
        assert_eq!(shared.upload_queue, 1024);
        assert_eq!(shared.max_age, None);
        assert!(parse(MINIMAL).unwrap().cache.shared.is_none());
        let c = parse(&with_shared(S3, "    max_age: 30d\n")).unwrap();
        let day = Duration::from_secs(86_400);
        assert_eq!(c.cache.shared.unwrap().max_age, Some(30 * day));
    }

    #[test]
    fn a_prefix_gets_its_slash_and_none_is_empty() {
        let c = parse(&with_shared(&format!("{S3}      prefix: a/b\n"), "")).unwrap();
        assert_eq!(c.cache.shared.unwrap().s3.prefix, "a/b/");
        let c = parse(&with_shared(S3, "    timeout: 2s\n")).unwrap();
        let shared = c.cache.shared.unwrap();
        assert_eq!(shared.s3.prefix, "");
        assert_eq!(shared.timeout, Duration::from_secs(2));
    }

    #[test]
    fn bad_values_name_key_and_value() {
        let cases = [
            (
                S3.replace("dockside", "Dock_Side"),
                "cache.shared.s3.bucket: \"Dock_Side\" is not a bucket name",
            ),
            (
                S3.replace("us-east-1", "US East"),
                "cache.shared.s3.region: \"US East\" is not a region",
            ),
            (
                S3.replace("127.0.0.1:9000", "127.0.0.1:9000/dockside"),
                "cache.shared.s3.endpoint: \"http://127.0.0.1:9000/dockside\" must be just scheme://host[:port]",
            ),
            (
                S3.replace("http://127", "http://key:secret@127"),
                "cache.shared.s3.endpoint: \"http://***@127.0.0.1:9000\" must not contain credentials",
            ),
            (
                format!("{S3}      prefix: ../up\n"),
                "cache.shared.s3.prefix: \"../up\" is not a key prefix",
            ),
        ];
        for (s3, expected) in cases {
            assert_contains(&err(&with_shared(&s3, "")), &[expected]);
        }
        assert_contains(
            &err(&with_shared(S3, "    upload_queue: 0\n")),
            &["cache.shared.upload_queue: 0 must be at least 1"],
        );
        assert_contains(
            &err(&with_shared(S3, "    timeout: 0s\n")),
            &["cache.shared.timeout: \"0s\" must be greater than 0"],
        );
        assert_contains(
            &err(&with_shared(&S3.replace("bucket", "buckets"), "")),
            &["unknown field `buckets`"],
        );
    }
}
