//! The serde-facing shapes of the YAML: they mirror the file exactly (field names are the
//! operator-facing keys) and reject unknown keys, so a misspelt key is an error rather than
//! silently ignored. Validation turns them into the public types.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

use super::credentials::RawCredentials;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) listen: Listen,
    pub(super) admin_listen: Option<String>,
    pub(super) grace_period: Option<Scalar>,
    pub(super) threads: Option<usize>,
    pub(super) cache: RawCache,
    pub(super) upstreams: Vec<RawUpstream>,
    pub(super) default_upstream: Option<String>,
    #[serde(default)]
    pub(super) offline: bool,
    pub(super) client_auth: Option<RawClientAuth>,
    pub(super) tls: Option<RawTls>,
    pub(super) limits: Option<RawLimits>,
    pub(super) cluster: Option<RawCluster>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) advertise: String,
    pub(super) peers: Option<Vec<String>>,
    pub(super) peers_dns: Option<String>,
    pub(super) dns_server: Option<String>,
    pub(super) secret_file: String,
    pub(super) refresh_interval: Option<Scalar>,
    pub(super) health_interval: Option<Scalar>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert_file: String,
    pub(super) key_file: String,
    pub(super) reload_interval: Option<Scalar>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_connections: Option<usize>,
    pub(super) header_timeout: Option<Scalar>,
    pub(super) idle_timeout: Option<Scalar>,
    pub(super) send_timeout: Option<Scalar>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClientAuth {
    pub(super) htpasswd: Option<String>,
    #[serde(default)]
    pub(super) tokens: Vec<RawToken>,
    pub(super) access: Option<std::collections::BTreeMap<String, Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawToken {
    pub(super) name: String,
    pub(super) token_file: Option<String>,
    pub(super) token_env: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    pub(super) dir: String,
    pub(super) max_size: Scalar,
    pub(super) tag_ttl: Option<Scalar>,
    #[serde(default)]
    pub(super) pin: Vec<String>,
    pub(super) shared: Option<RawShared>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShared {
    pub(super) s3: RawS3,
    pub(super) timeout: Option<Scalar>,
    pub(super) circuit: Option<RawCircuit>,
    pub(super) upload_queue: Option<usize>,
    pub(super) max_age: Option<Scalar>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawS3 {
    pub(super) endpoint: Option<String>,
    pub(super) bucket: String,
    pub(super) region: String,
    pub(super) prefix: Option<String>,
    pub(super) profile: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) name: String,
    pub(super) url: Option<String>,
    pub(super) urls: Option<Vec<String>>,
    pub(super) circuit: Option<RawCircuit>,
    #[serde(default)]
    pub(super) aliases: Vec<String>,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) password_file: Option<String>,
    pub(super) password_env: Option<String>,
    pub(super) credentials: Option<RawCredentials>,
    pub(super) ca_file: Option<String>,
    pub(super) tag_ttl: Option<Scalar>,
    pub(super) timeouts: Option<RawTimeouts>,
    pub(super) offline: Option<bool>,
    pub(super) retries: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCircuit {
    pub(super) failures: Option<u32>,
    pub(super) cooldown: Option<Scalar>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimeouts {
    pub(super) connect: Option<Scalar>,
    pub(super) first_byte: Option<Scalar>,
    pub(super) idle: Option<Scalar>,
}

/// `listen` is one address or a list of them.
pub(super) enum Listen {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Listen, D::Error> {
        d.deserialize_any(ListenVisitor)
    }
}

struct ListenVisitor;

impl<'de> Visitor<'de> for ListenVisitor {
    type Value = Listen;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a socket address string or a list of them")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Listen, E> {
        Ok(Listen::One(v.to_owned()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Listen, A::Error> {
        let mut all = Vec::new();
        while let Some(addr) = seq.next_element::<String>()? {
            all.push(addr);
        }
        Ok(Listen::Many(all))
    }
}

/// A YAML scalar kept as text, so that `max_size: 1000` and
/// `max_size: 1KB`, or `grace_period: 5` and `grace_period: 5s`, all reach
/// our own parser and its error message naming the key.
pub(super) struct Scalar(pub(super) String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl Visitor<'_> for ScalarVisitor {
    type Value = Scalar;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or a number")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
        Ok(Scalar(v.to_owned()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::*;

    #[test]
    fn unknown_keys_are_rejected_with_location() {
        let msg = err(&MINIMAL.replace("max_size", "max_sise"));
        assert_contains(&msg, &["unknown field `max_sise`", "line 5"]);
        let msg = err(&with_upstream_keys("    pasword: x\n"));
        assert_contains(&msg, &["unknown field `pasword`", "upstreams[0]"]);
        let msg = err(&format!("{MINIMAL}extra: 1\n"));
        assert_contains(&msg, &["unknown field `extra`"]);
        let msg = err(&with_upstream_keys("    timeouts: { read: 5s }\n"));
        assert_contains(&msg, &["unknown field `read`"]);
    }

    #[test]
    fn wrong_types_and_missing_keys_are_syntax_errors() {
        let msg = err(&MINIMAL.replace("dir: /tmp/cache", "dir: [a, b]"));
        assert_contains(&msg, &["cache.dir", "line"]);
        let msg = err(&format!("{MINIMAL}threads: many\n"));
        assert_contains(&msg, &["threads", "\"many\""]);
        let msg = err(&MINIMAL.replace("listen: 0.0.0.0:5000\n", ""));
        assert_contains(&msg, &["missing field `listen`"]);
        let msg = err(&MINIMAL.replace("max_size: 1GiB", "max_size: {a: 1}"));
        assert_contains(&msg, &["cache.max_size", "a string or a number"]);
        let msg = err("");
        assert!(msg.len() > "test.yaml: ".len(), "{msg}");
        let msg = err("listen: [unclosed");
        assert_contains(&msg, &["line 1"]);
    }
}
