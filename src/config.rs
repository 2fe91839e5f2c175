//! The operator's YAML configuration.
//!
//! Loading happens in two steps. serde reads the file into `Raw*` structs
//! that mirror the YAML exactly and reject unknown keys (a misspelt key must
//! not be silently ignored). Validation then turns those into the public
//! types, checking everything that can be checked before the server starts
//! and resolving secrets, so a running server never discovers a config
//! mistake. Every error names the file, the key path and the bad value.

use std::fmt;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use url::Url;

use crate::oci::{ImageRef, RegistryHost};

mod credentials;
pub use credentials::{
    AadToken, AcrSource, CredentialSource, EcrSource, GcpSource, HelperSource, ServiceAccountKey,
    ecr_host_parts,
};

/// The configuration used when none is given; also a commented example.
pub const DEFAULT_YAML: &str = include_str!("../config/dockside.yaml");

const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(5);
const DEFAULT_RETRIES: u32 = 2;
/// Each retry waits up to twice as long as the one before; more than this is hours of waiting.
const MAX_RETRIES: u32 = 10;
const DEFAULT_TAG_TTL: Duration = Duration::from_secs(5 * 60);
/// A sanity bound: more worker threads than this is a typo, not a plan.
const MAX_THREADS: usize = 1024;
const PEM_CERT_MARKER: &str = "-----BEGIN CERTIFICATE-----";
const DEFAULT_TLS_RELOAD: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Socket addresses, each validated to parse as `SocketAddr`.
    pub listen: Vec<String>,
    pub admin_listen: Option<String>,
    pub grace_period: Duration,
    pub threads: usize,
    pub cache: CacheConfig,
    pub upstreams: Vec<UpstreamConfig>,
    /// The resolved canonical name of an entry in `upstreams`.
    pub default_upstream: String,
    /// The top-level `offline`; each upstream carries its resolved value.
    pub offline: bool,
    /// Who may pull through dockside; `None`: anyone who can reach it.
    pub client_auth: Option<ClientAuthConfig>,
    /// HTTPS on every `listen` address; `None`: plain HTTP (and h2c).
    pub tls: Option<TlsConfig>,
    pub limits: Limits,
}

/// `tls:`. That both files load and match is checked after parsing (`preflight`), by code this
/// module does not depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// How often both files are re-read for a rotated pair.
    pub reload_interval: Duration,
}

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

/// `client_auth:` with its files and secrets read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuthConfig {
    /// From the htpasswd file: user name and bcrypt hash.
    pub users: Vec<(String, String)>,
    /// Static bearer tokens: a client name and its token.
    pub tokens: Vec<(String, Secret)>,
    /// Client name → upstream names it may read (`*`: all). `None`: every client reads all.
    pub access: Option<Vec<(String, Vec<String>)>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// As written; a relative path resolves against the working directory.
    pub dir: PathBuf,
    /// Bytes, always > 0.
    pub max_size: u64,
    pub tag_ttl: Duration,
    /// Images whose manifests and blobs are never evicted; each host names a configured upstream.
    pub pin: Vec<ImageRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// The registry host clients use, lowercased.
    pub name: String,
    /// `url:` or `urls:`, in order of preference (a regional mirror, then the origin). Each is
    /// http or https, host and optional port, path `/`, nothing else. Never empty, no repeats.
    pub urls: Vec<Url>,
    /// When a URL that keeps failing is skipped.
    pub circuit: Circuit,
    /// Lowercased; unique across all names and aliases.
    pub aliases: Vec<String>,
    pub credentials: Option<Credentials>,
    /// `credentials:`: a source of short-lived credentials (never set together with `credentials`).
    pub credential_source: Option<CredentialSource>,
    /// Checked to be readable and to contain a PEM certificate.
    pub ca_file: Option<PathBuf>,
    /// This upstream's own tag_ttl, or `cache.tag_ttl`.
    pub tag_ttl: Duration,
    pub timeouts: Timeouts,
    /// Never contacted: answers come from the cache alone.
    pub offline: bool,
    /// Extra attempts after a connect error or a 5xx, with backoff.
    pub retries: u32,
}

/// A URL is skipped for `cooldown` after `failures` failures in a row (connect errors, timeouts,
/// 5xx); then one request tries it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Circuit {
    pub failures: u32,
    pub cooldown: Duration,
}

impl Default for Circuit {
    fn default() -> Circuit {
        Circuit {
            failures: 3,
            cooldown: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(10),
            first_byte: Duration::from_secs(60),
            idle: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

/// A password, kept out of logs: Debug and Display print `***`, so a
/// `{:?}` of the whole Config is safe to log.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

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

impl Config {
    /// Reads, parses and validates a config file, resolving secrets from the
    /// environment and from password files.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = fs::read_to_string(path).map_err(|error| ConfigError::Read {
            origin: origin.clone(),
            error,
        })?;
        Config::from_yaml(&text, &origin)
    }

    /// Like [`Config::load`] on text already read; `origin` names it in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        from_yaml_with_env(text, origin, &|name| std::env::var(name).ok())
    }

    /// The configuration compiled into the binary (`config/dockside.yaml`).
    pub fn embedded_default() -> Config {
        // Not input-derived: the text is a constant, and a unit test proves
        // it parses, so this cannot fail in a released binary.
        Config::from_yaml(DEFAULT_YAML, "embedded default config")
            .expect("embedded default config is valid")
    }

    /// The upstream with this name or alias, case-insensitively.
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.answers_to(name))
    }
}

impl UpstreamConfig {
    /// Whether `name` is this upstream's name or one of its aliases.
    pub fn answers_to(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
            || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    }
}

/// Environment lookup, injectable so tests need not mutate the process
/// environment (which is unsound while other test threads read it).
type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

fn from_yaml_with_env(text: &str, origin: &str, env: EnvLookup) -> Result<Config, ConfigError> {
    let raw: RawConfig = serde_norway::from_str(text).map_err(|e| ConfigError::Syntax {
        origin: origin.to_owned(),
        message: e.to_string(),
    })?;
    Check { origin, env }.config(raw)
}

// ---------------------------------------------------------------------------
// Raw, serde-facing shapes. Field names are the operator-facing keys.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Listen,
    admin_listen: Option<String>,
    grace_period: Option<Scalar>,
    threads: Option<usize>,
    cache: RawCache,
    upstreams: Vec<RawUpstream>,
    default_upstream: Option<String>,
    #[serde(default)]
    offline: bool,
    client_auth: Option<RawClientAuth>,
    tls: Option<RawTls>,
    limits: Option<RawLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: String,
    key_file: String,
    reload_interval: Option<Scalar>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<usize>,
    header_timeout: Option<Scalar>,
    idle_timeout: Option<Scalar>,
    send_timeout: Option<Scalar>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientAuth {
    htpasswd: Option<String>,
    #[serde(default)]
    tokens: Vec<RawToken>,
    access: Option<std::collections::BTreeMap<String, Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    token_file: Option<String>,
    token_env: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    dir: String,
    max_size: Scalar,
    tag_ttl: Option<Scalar>,
    #[serde(default)]
    pin: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    url: Option<String>,
    urls: Option<Vec<String>>,
    circuit: Option<RawCircuit>,
    #[serde(default)]
    aliases: Vec<String>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<String>,
    password_env: Option<String>,
    credentials: Option<credentials::RawCredentials>,
    ca_file: Option<String>,
    tag_ttl: Option<Scalar>,
    timeouts: Option<RawTimeouts>,
    offline: Option<bool>,
    retries: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCircuit {
    failures: Option<u32>,
    cooldown: Option<Scalar>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect: Option<Scalar>,
    first_byte: Option<Scalar>,
    idle: Option<Scalar>,
}

/// `listen` is one address or a list of them.
enum Listen {
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
struct Scalar(String);

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

// ---------------------------------------------------------------------------
// Validation.

/// Validation context: where the text came from, and how to read the
/// environment.
struct Check<'a> {
    origin: &'a str,
    env: EnvLookup<'a>,
}

impl Check<'_> {
    fn invalid(&self, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_owned(),
            key: key.to_owned(),
            message,
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let listen = self.listen(&raw.listen)?;
        let admin_listen = self.admin_listen(raw.admin_listen, &listen)?;
        let grace_period = match &raw.grace_period {
            Some(s) => self.duration("grace_period", s)?,
            None => DEFAULT_GRACE_PERIOD,
        };
        let threads = self.threads(raw.threads)?;
        let mut cache = self.cache(&raw.cache)?;
        let upstreams = self.upstreams(&raw.upstreams, cache.tag_ttl, raw.offline)?;
        cache.pin = self.pins(&raw.cache.pin, &upstreams)?;
        let default_upstream = self.default_upstream(raw.default_upstream, &upstreams)?;
        let client_auth = match &raw.client_auth {
            Some(auth) => Some(self.client_auth(auth, &upstreams)?),
            None => None,
        };
        let tls = match &raw.tls {
            Some(tls) => Some(self.tls(tls)?),
            None => None,
        };
        let limits = self.limits(raw.limits.as_ref())?;
        Ok(Config {
            offline: raw.offline,
            client_auth,
            tls,
            limits,
            listen,
            admin_listen,
            grace_period,
            threads,
            cache,
            upstreams,
            default_upstream,
        })
    }

    fn listen(&self, raw: &Listen) -> Result<Vec<String>, ConfigError> {
        let addrs = match raw {
            Listen::One(addr) => {
                self.socket_addr("listen", addr)?;
                return Ok(vec![addr.clone()]);
            }
            Listen::Many(addrs) => addrs,
        };
        if addrs.is_empty() {
            return Err(self.invalid("listen", "the list is empty".into()));
        }
        let mut seen = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let key = format!("listen[{i}]");
            let parsed = self.socket_addr(&key, addr)?;
            if seen.contains(&parsed) {
                return Err(self.invalid(&key, format!("{addr:?} is listed twice")));
            }
            seen.push(parsed);
        }
        Ok(addrs.clone())
    }

    fn admin_listen(
        &self,
        raw: Option<String>,
        listen: &[String],
    ) -> Result<Option<String>, ConfigError> {
        let Some(addr) = raw else { return Ok(None) };
        let parsed = self.socket_addr("admin_listen", &addr)?;
        // Both were validated, so these parses succeed.
        if listen
            .iter()
            .any(|l| l.parse::<SocketAddr>().ok() == Some(parsed))
        {
            return Err(self.invalid("admin_listen", format!("{addr:?} is also a listen address")));
        }
        Ok(Some(addr))
    }

    fn socket_addr(&self, key: &str, addr: &str) -> Result<SocketAddr, ConfigError> {
        addr.parse().map_err(|_| {
            self.invalid(
                key,
                format!("{addr:?} is not a socket address (e.g. 0.0.0.0:5000 or [::]:5000)"),
            )
        })
    }

    fn threads(&self, raw: Option<usize>) -> Result<usize, ConfigError> {
        match raw {
            None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
            Some(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
            Some(n) => {
                Err(self.invalid("threads", format!("{n} is not between 1 and {MAX_THREADS}")))
            }
        }
    }

    fn cache(&self, raw: &RawCache) -> Result<CacheConfig, ConfigError> {
        if raw.dir.is_empty() {
            return Err(self.invalid("cache.dir", "\"\" is not a directory path".into()));
        }
        let max_size = self.size("cache.max_size", &raw.max_size)?;
        let tag_ttl = match &raw.tag_ttl {
            Some(s) => self.duration("cache.tag_ttl", s)?,
            None => DEFAULT_TAG_TTL,
        };
        Ok(CacheConfig {
            dir: PathBuf::from(&raw.dir),
            max_size,
            tag_ttl,
            pin: Vec::new(),
        })
    }

    fn pins(
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

    fn size(&self, key: &str, raw: &Scalar) -> Result<u64, ConfigError> {
        let text = &raw.0;
        match parse_size(text) {
            Ok(0) => Err(self.invalid(key, format!("{text:?} must be greater than 0"))),
            Ok(n) => Ok(n),
            Err(SizeError::TooLarge) => Err(self.invalid(key, format!("{text:?} is too large"))),
            Err(SizeError::Malformed) => Err(self.invalid(
                key,
                format!(
                    "{text:?} is not a size (e.g. 50GiB, 500MB; units B, KB, MB, GB, TB, \
                     KiB, MiB, GiB, TiB)"
                ),
            )),
        }
    }

    fn duration(&self, key: &str, raw: &Scalar) -> Result<Duration, ConfigError> {
        let text = &raw.0;
        humantime::parse_duration(text).map_err(|e| {
            self.invalid(
                key,
                format!("{text:?} is not a duration (e.g. 30s, 5m, 1h30m): {e}"),
            )
        })
    }

    /// A duration that must be non-zero: a zero timeout would fail every
    /// request.
    fn timeout(
        &self,
        key: &str,
        raw: Option<&Scalar>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(raw) = raw else { return Ok(default) };
        let d = self.duration(key, raw)?;
        if d.is_zero() {
            return Err(self.invalid(key, format!("{:?} must be greater than 0", raw.0)));
        }
        Ok(d)
    }

    fn upstreams(
        &self,
        raw: &[RawUpstream],
        default_ttl: Duration,
        default_offline: bool,
    ) -> Result<Vec<UpstreamConfig>, ConfigError> {
        if raw.is_empty() {
            return Err(self.invalid(
                "upstreams",
                "the list is empty; at least one upstream is required".into(),
            ));
        }
        let upstreams = raw
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let mut upstream = self.upstream(&format!("upstreams[{i}]"), u, default_ttl)?;
                upstream.offline = u.offline.unwrap_or(default_offline);
                Ok(upstream)
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.unique_names(&upstreams)?;
        Ok(upstreams)
    }

    fn upstream(
        &self,
        key: &str,
        raw: &RawUpstream,
        default_ttl: Duration,
    ) -> Result<UpstreamConfig, ConfigError> {
        let name = self.host_name(&format!("{key}.name"), &raw.name)?;
        let aliases = raw
            .aliases
            .iter()
            .enumerate()
            .map(|(j, a)| self.host_name(&format!("{key}.aliases[{j}]"), a))
            .collect::<Result<Vec<_>, _>>()?;
        let tag_ttl = match &raw.tag_ttl {
            Some(s) => self.duration(&format!("{key}.tag_ttl"), s)?,
            None => default_ttl,
        };
        let urls = self.upstream_urls(key, raw)?;
        Ok(UpstreamConfig {
            name,
            credential_source: self.credential_source(key, raw, &urls[0])?,
            urls,
            circuit: self.circuit(&format!("{key}.circuit"), raw.circuit.as_ref())?,
            aliases,
            credentials: self.credentials(key, raw)?,
            ca_file: self.ca_file(&format!("{key}.ca_file"), raw.ca_file.as_deref())?,
            tag_ttl,
            timeouts: self.timeouts(&format!("{key}.timeouts"), raw.timeouts.as_ref())?,
            offline: false,
            retries: self.retries(&format!("{key}.retries"), raw.retries)?,
        })
    }

    fn host_name(&self, key: &str, name: &str) -> Result<String, ConfigError> {
        let host = RegistryHost::parse(name).map_err(|_| {
            self.invalid(
                key,
                format!("{name:?} is not a registry host (e.g. docker.io or localhost:5000)"),
            )
        })?;
        Ok(host.into_string())
    }

    fn upstream_urls(&self, key: &str, raw: &RawUpstream) -> Result<Vec<Url>, ConfigError> {
        let (field, texts) = match (&raw.url, &raw.urls) {
            (Some(url), None) => ("url", std::slice::from_ref(url)),
            (None, Some(urls)) => ("urls", urls.as_slice()),
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    &format!("{key}.urls"),
                    "give url (one) or urls (a list), not both".into(),
                ));
            }
            (None, None) => {
                return Err(self.invalid(key, "needs url (or urls, a list)".into()));
            }
        };
        if texts.is_empty() {
            return Err(self.invalid(&format!("{key}.urls"), "is empty".into()));
        }
        let mut urls: Vec<Url> = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let item = match field {
                "url" => format!("{key}.url"),
                _ => format!("{key}.urls[{i}]"),
            };
            let url = self.upstream_url(&item, text)?;
            if urls.contains(&url) {
                return Err(self.invalid(&item, format!("{:?} is listed twice", url.as_str())));
            }
            urls.push(url);
        }
        Ok(urls)
    }

    fn circuit(&self, key: &str, raw: Option<&RawCircuit>) -> Result<Circuit, ConfigError> {
        let defaults = Circuit::default();
        let Some(raw) = raw else {
            return Ok(defaults);
        };
        let failures = match raw.failures {
            None => defaults.failures,
            Some(0) => {
                return Err(self.invalid(&format!("{key}.failures"), "0 must be at least 1".into()));
            }
            Some(n) => n,
        };
        let cooldown = self.timeout(
            &format!("{key}.cooldown"),
            raw.cooldown.as_ref(),
            defaults.cooldown,
        )?;
        Ok(Circuit { failures, cooldown })
    }

    fn upstream_url(&self, key: &str, text: &str) -> Result<Url, ConfigError> {
        // Error messages show the URL with any password masked.
        let shown = redact_userinfo(text);
        let bad = |why: &str| self.invalid(key, format!("{shown:?} {why}"));
        let url = Url::parse(text).map_err(|e| bad(&format!("is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("is not an http or https URL"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "must not contain credentials (use username and password_file or password_env)",
            ));
        }
        // Repository paths are appended to `/v2/`, so a base path would be
        // silently dropped or misapplied; refuse it instead.
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err(bad(
                "must be just scheme://host[:port], without a path or query",
            ));
        }
        Ok(url)
    }

    fn credentials(
        &self,
        key: &str,
        raw: &RawUpstream,
    ) -> Result<Option<Credentials>, ConfigError> {
        let sources = [
            raw.password.is_some(),
            raw.password_file.is_some(),
            raw.password_env.is_some(),
        ];
        let source_count = sources.iter().filter(|&&s| s).count();
        let Some(username) = &raw.username else {
            if source_count > 0 {
                return Err(self.invalid(key, "a password is set but username is missing".into()));
            }
            return Ok(None);
        };
        let user_key = format!("{key}.username");
        if username.is_empty() || username.contains(':') {
            return Err(self.invalid(
                &user_key,
                format!("{username:?} is not a username (non-empty, no ':')"),
            ));
        }
        if source_count != 1 {
            return Err(self.invalid(
                key,
                format!(
                    "username {username:?} needs exactly one of password, password_file, \
                     password_env ({source_count} given)"
                ),
            ));
        }
        Ok(Some(Credentials {
            username: username.clone(),
            password: Secret(self.password(key, raw)?),
        }))
    }

    /// Resolves the single password source (exactly one is set).
    fn password(&self, key: &str, raw: &RawUpstream) -> Result<String, ConfigError> {
        let (password, source_key) = if let Some(p) = &raw.password {
            (p.clone(), format!("{key}.password"))
        } else if let Some(path) = &raw.password_file {
            let source_key = format!("{key}.password_file");
            (self.password_file(&source_key, path)?, source_key)
        } else if let Some(var) = &raw.password_env {
            let source_key = format!("{key}.password_env");
            let value = (self.env)(var).ok_or_else(|| {
                self.invalid(
                    &source_key,
                    format!("environment variable {var:?} is not set (or not UTF-8)"),
                )
            })?;
            (value, source_key)
        } else {
            return Err(self.invalid(key, "no password source".into()));
        };
        if password.is_empty() {
            // Never quote the password itself, only where it came from.
            return Err(self.invalid(&source_key, "the password is empty".into()));
        }
        Ok(password)
    }

    fn client_auth(
        &self,
        raw: &RawClientAuth,
        upstreams: &[UpstreamConfig],
    ) -> Result<ClientAuthConfig, ConfigError> {
        let users = match &raw.htpasswd {
            Some(path) => self.htpasswd("client_auth.htpasswd", path)?,
            None => Vec::new(),
        };
        let mut tokens: Vec<(String, Secret)> = Vec::new();
        for (i, t) in raw.tokens.iter().enumerate() {
            let key = format!("client_auth.tokens[{i}]");
            let known = users
                .iter()
                .map(|(u, _)| u)
                .chain(tokens.iter().map(|(n, _)| n));
            if t.name.is_empty() || known.clone().any(|n| *n == t.name) {
                return Err(
                    self.invalid(&key, format!("name {:?} is empty or already used", t.name))
                );
            }
            let token = match (&t.token_file, &t.token_env) {
                (Some(path), None) => self.password_file(&format!("{key}.token_file"), path)?,
                (None, Some(var)) => (self.env)(var).ok_or_else(|| {
                    self.invalid(
                        &format!("{key}.token_env"),
                        format!("environment variable {var:?} is not set"),
                    )
                })?,
                _ => {
                    return Err(
                        self.invalid(&key, "needs exactly one of token_file, token_env".into())
                    );
                }
            };
            if token.len() < 16 {
                return Err(self.invalid(&key, "the token is shorter than 16 characters".into()));
            }
            tokens.push((t.name.clone(), Secret(token)));
        }
        if users.is_empty() && tokens.is_empty() {
            return Err(self.invalid(
                "client_auth",
                "neither htpasswd users nor tokens are configured".into(),
            ));
        }
        let access = match &raw.access {
            None => None,
            Some(map) => Some(self.access(map, &users, &tokens, upstreams)?),
        };
        Ok(ClientAuthConfig {
            users,
            tokens,
            access,
        })
    }

    /// `user:hash` lines; only bcrypt hashes (`htpasswd -B`), the one safe htpasswd scheme.
    fn htpasswd(&self, key: &str, path: &str) -> Result<Vec<(String, String)>, ConfigError> {
        let text = fs::read_to_string(path)
            .map_err(|e| self.invalid(key, format!("{path:?} cannot be read: {e}")))?;
        let mut users = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bcrypt = |h: &str| ["$2a$", "$2b$", "$2y$"].iter().any(|p| h.starts_with(p));
            match line.split_once(':') {
                Some((user, hash)) if !user.is_empty() && bcrypt(hash) => {
                    users.push((user.to_string(), hash.to_string()));
                }
                _ => {
                    return Err(self.invalid(
                        key,
                        format!("{path:?} line {}: not `user:<bcrypt hash>` (create it with htpasswd -B)", n + 1),
                    ));
                }
            }
        }
        Ok(users)
    }

    fn access(
        &self,
        map: &std::collections::BTreeMap<String, Vec<String>>,
        users: &[(String, String)],
        tokens: &[(String, Secret)],
        upstreams: &[UpstreamConfig],
    ) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
        let mut out = Vec::new();
        for (client, names) in map {
            let key = format!("client_auth.access.{client}");
            let known =
                users.iter().any(|(u, _)| u == client) || tokens.iter().any(|(t, _)| t == client);
            if !known {
                return Err(self.invalid(
                    &key,
                    format!("{client:?} is neither an htpasswd user nor a token name"),
                ));
            }
            let mut resolved = Vec::new();
            for name in names {
                let upstream = upstreams
                    .iter()
                    .find(|u| u.name == *name || u.aliases.contains(name));
                match upstream {
                    Some(u) => resolved.push(u.name.clone()),
                    None if name == "*" => resolved.push(name.clone()),
                    None => {
                        return Err(
                            self.invalid(&key, format!("{name:?} is not a configured upstream"))
                        );
                    }
                }
            }
            out.push((client.clone(), resolved));
        }
        Ok(out)
    }

    fn password_file(&self, key: &str, path: &str) -> Result<String, ConfigError> {
        let text = fs::read_to_string(path)
            .map_err(|e| self.invalid(key, format!("{path:?} cannot be read: {e}")))?;
        // Files written by `echo` or editors end in a newline that is not
        // part of the password; strip exactly one.
        let trimmed = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(&text);
        Ok(trimmed.to_owned())
    }

    fn ca_file(&self, key: &str, path: Option<&str>) -> Result<Option<PathBuf>, ConfigError> {
        let Some(path) = path else { return Ok(None) };
        let bytes = fs::read(path)
            .map_err(|e| self.invalid(key, format!("{path:?} cannot be read: {e}")))?;
        // A cheap check that catches pointing at the wrong file (a key, a
        // DER file) now rather than at the first upstream connection.
        let marker = PEM_CERT_MARKER.as_bytes();
        if !bytes.windows(marker.len()).any(|w| w == marker) {
            return Err(self.invalid(key, format!("{path:?} contains no PEM certificate")));
        }
        Ok(Some(PathBuf::from(path)))
    }

    fn tls(&self, raw: &RawTls) -> Result<TlsConfig, ConfigError> {
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

    fn limits(&self, raw: Option<&RawLimits>) -> Result<Limits, ConfigError> {
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

    fn timeouts(&self, key: &str, raw: Option<&RawTimeouts>) -> Result<Timeouts, ConfigError> {
        let empty = RawTimeouts::default();
        let raw = raw.unwrap_or(&empty);
        let defaults = Timeouts::default();
        Ok(Timeouts {
            connect: self.timeout(
                &format!("{key}.connect"),
                raw.connect.as_ref(),
                defaults.connect,
            )?,
            first_byte: self.timeout(
                &format!("{key}.first_byte"),
                raw.first_byte.as_ref(),
                defaults.first_byte,
            )?,
            idle: self.timeout(&format!("{key}.idle"), raw.idle.as_ref(), defaults.idle)?,
        })
    }

    fn retries(&self, key: &str, raw: Option<u32>) -> Result<u32, ConfigError> {
        match raw {
            None => Ok(DEFAULT_RETRIES),
            Some(n) if n <= MAX_RETRIES => Ok(n),
            Some(n) => Err(self.invalid(key, format!("{n} is more than {MAX_RETRIES}"))),
        }
    }

    /// Names and aliases must be unique (they are already lowercased), or a
    /// request's upstream would depend on list order.
    fn unique_names(&self, upstreams: &[UpstreamConfig]) -> Result<(), ConfigError> {
        let mut seen: Vec<(&str, String)> = Vec::new();
        for (i, u) in upstreams.iter().enumerate() {
            let keyed = std::iter::once((u.name.as_str(), format!("upstreams[{i}].name"))).chain(
                u.aliases
                    .iter()
                    .enumerate()
                    .map(move |(j, a)| (a.as_str(), format!("upstreams[{i}].aliases[{j}]"))),
            );
            for (name, key) in keyed {
                if let Some((_, first)) = seen.iter().find(|(n, _)| *n == name) {
                    return Err(self.invalid(&key, format!("{name:?} is already used by {first}")));
                }
                seen.push((name, key));
            }
        }
        Ok(())
    }

    fn default_upstream(
        &self,
        raw: Option<String>,
        upstreams: &[UpstreamConfig],
    ) -> Result<String, ConfigError> {
        let Some(wanted) = raw else {
            let docker = upstreams.iter().find(|u| u.name == "docker.io");
            // upstreams() guarantees at least one entry.
            return Ok(docker
                .or(upstreams.first())
                .map(|u| u.name.clone())
                .unwrap_or_default());
        };
        upstreams
            .iter()
            .find(|u| u.answers_to(&wanted))
            .map(|u| u.name.clone())
            .ok_or_else(|| {
                self.invalid(
                    "default_upstream",
                    format!("{wanted:?} is not the name or alias of any upstream"),
                )
            })
    }
}

#[derive(Debug, PartialEq)]
enum SizeError {
    Malformed,
    TooLarge,
}

/// Parses `<digits><unit>`: no sign, no fraction, no space. Units are
/// case-sensitive, as `mb` and `Mb` would be ambiguous (bits?).
fn parse_size(text: &str) -> Result<u64, SizeError> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(SizeError::Malformed);
    }
    let (number, unit) = text.split_at(digits);
    let multiplier = unit_multiplier(unit).ok_or(SizeError::Malformed)?;
    let number: u64 = number.parse().map_err(|_| SizeError::TooLarge)?;
    number.checked_mul(multiplier).ok_or(SizeError::TooLarge)
}

fn unit_multiplier(unit: &str) -> Option<u64> {
    const K: u64 = 1000;
    const KI: u64 = 1024;
    Some(match unit {
        "" | "B" => 1,
        "KB" => K,
        "MB" => K.pow(2),
        "GB" => K.pow(3),
        "TB" => K.pow(4),
        "KiB" => KI,
        "MiB" => KI.pow(2),
        "GiB" => KI.pow(3),
        "TiB" => KI.pow(4),
        _ => return None,
    })
}

/// Masks the password in `scheme://user:password@host...` for messages. The
/// text may not even be a valid URL, so this works on the raw string.
fn redact_userinfo(text: &str) -> String {
    let Some(scheme_end) = text.find("://") else {
        return text.to_owned();
    };
    let authority_start = scheme_end + 3;
    let authority_len = text[authority_start..]
        .find(['/', '?', '#'])
        .unwrap_or(text.len() - authority_start);
    let authority = &text[authority_start..authority_start + authority_len];
    match authority.rfind('@') {
        Some(at) => format!(
            "{}***{}",
            &text[..authority_start],
            &text[authority_start + at..]
        ),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const ORIGIN: &str = "test.yaml";

    /// A minimal valid config, for tests to extend.
    const MINIMAL: &str = "
listen: 0.0.0.0:5000
cache:
  dir: /tmp/cache
  max_size: 1GiB
upstreams:
  - name: docker.io
    url: https://registry-1.docker.io
";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        from_yaml_with_env(text, ORIGIN, &no_env)
    }

    fn parse_env(text: &str, var: &str, value: &str) -> Result<Config, ConfigError> {
        let env = |name: &str| (name == var).then(|| value.to_owned());
        from_yaml_with_env(text, ORIGIN, &env)
    }

    /// The error message, after checking it names the file.
    fn err(text: &str) -> String {
        let msg = parse(text).unwrap_err().to_string();
        assert!(msg.starts_with("test.yaml: "), "{msg}");
        msg
    }

    /// MINIMAL with its single upstream's extra keys appended (6-space indent).
    fn with_upstream_keys(extra: &str) -> String {
        format!("{MINIMAL}{extra}")
    }

    fn assert_contains(msg: &str, parts: &[&str]) {
        for part in parts {
            assert!(msg.contains(part), "{msg:?} should contain {part:?}");
        }
    }

    fn temp_file(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        f
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listen, ["0.0.0.0:5000"]);
        assert_eq!(c.admin_listen, None);
        assert_eq!(c.grace_period, Duration::from_secs(5));
        assert!(c.threads >= 1);
        assert_eq!(c.cache.dir, PathBuf::from("/tmp/cache"));
        assert_eq!(c.cache.max_size, 1 << 30);
        assert_eq!(c.cache.tag_ttl, Duration::from_secs(300));
        assert_eq!(c.default_upstream, "docker.io");
        let u = &c.upstreams[0];
        assert_eq!(u.urls[0].as_str(), "https://registry-1.docker.io/");
        assert_eq!(u.tag_ttl, Duration::from_secs(300));
        assert_eq!(u.timeouts, Timeouts::default());
        assert_eq!(u.credentials, None);
        assert_eq!(u.ca_file, None);
        assert!(u.aliases.is_empty());
    }

    #[test]
    fn full_config_parses() {
        let ca = temp_file(&format!(
            "{PEM_CERT_MARKER}\nMIIB\n-----END CERTIFICATE-----\n"
        ));
        let text = format!(
            "
listen: ['0.0.0.0:5000', '[::]:5000']
admin_listen: 127.0.0.1:9090
grace_period: 30s
threads: 3
cache:
  dir: rel/cache
  max_size: 500MB
  tag_ttl: 10m
upstreams:
  - name: Docker.IO
    url: https://registry-1.docker.io/
    aliases: [index.docker.io]
    username: bob
    password_env: HUB_TOKEN
    tag_ttl: 1m
    timeouts: {{ connect: 2s, idle: 90s }}
  - name: private.example:8443
    url: http://10.0.0.1:8080
    ca_file: {}
default_upstream: index.docker.io
",
            ca.path().display()
        );
        let c = parse_env(&text, "HUB_TOKEN", "s3cret").unwrap();
        assert_eq!(c.listen, ["0.0.0.0:5000", "[::]:5000"]);
        assert_eq!(c.admin_listen.as_deref(), Some("127.0.0.1:9090"));
        assert_eq!(c.grace_period, Duration::from_secs(30));
        assert_eq!(c.threads, 3);
        assert_eq!(c.cache.dir, PathBuf::from("rel/cache"));
        assert_eq!(c.cache.max_size, 500_000_000);
        assert_eq!(c.cache.tag_ttl, Duration::from_secs(600));
        // Resolved from an alias to the canonical, lowercased name.
        assert_eq!(c.default_upstream, "docker.io");

        let hub = &c.upstreams[0];
        assert_eq!(hub.name, "docker.io");
        assert_eq!(hub.aliases, ["index.docker.io"]);
        let creds = hub.credentials.as_ref().unwrap();
        assert_eq!(creds.username, "bob");
        assert_eq!(creds.password.expose(), "s3cret");
        assert_eq!(hub.tag_ttl, Duration::from_secs(60));
        assert_eq!(
            hub.timeouts,
            Timeouts {
                connect: Duration::from_secs(2),
                first_byte: Duration::from_secs(60),
                idle: Duration::from_secs(90),
            }
        );

        let private = &c.upstreams[1];
        assert_eq!(private.urls[0].as_str(), "http://10.0.0.1:8080/");
        assert_eq!(private.tag_ttl, Duration::from_secs(600));
        assert_eq!(private.ca_file.as_deref(), Some(ca.path()));
    }

    #[test]
    fn upstream_lookup_is_case_insensitive_and_covers_aliases() {
        let c = parse(&with_upstream_keys("    aliases: [index.docker.io]\n")).unwrap();
        assert_eq!(c.upstream("docker.io").unwrap().name, "docker.io");
        assert_eq!(c.upstream("DOCKER.io").unwrap().name, "docker.io");
        assert_eq!(c.upstream("Index.Docker.IO").unwrap().name, "docker.io");
        assert!(c.upstream("ghcr.io").is_none());
    }

    #[test]
    fn embedded_default_is_valid_and_as_documented() {
        let c = Config::embedded_default();
        assert_eq!(c.listen, ["0.0.0.0:5000"]);
        assert_eq!(c.admin_listen.as_deref(), Some("127.0.0.1:9090"));
        assert_eq!(c.cache.dir, PathBuf::from("dockside-cache"));
        assert!(c.cache.dir.is_relative());
        assert_eq!(c.cache.max_size, 20 << 30);
        assert_eq!(c.cache.tag_ttl, Duration::from_secs(300));
        let names: Vec<_> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "docker.io",
                "ghcr.io",
                "quay.io",
                "registry.k8s.io",
                "gcr.io"
            ]
        );
        assert_eq!(c.default_upstream, "docker.io");
        let hub = c.upstream("index.docker.io").unwrap();
        assert_eq!(hub.urls[0].as_str(), "https://registry-1.docker.io/");
        assert!(c.upstream("registry-1.docker.io").is_some());
        assert!(c.upstreams.iter().all(|u| u.credentials.is_none()));
    }

    #[test]
    fn example_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
        let local = Config::load(&dir.join("local-registry.yaml")).unwrap();
        assert_eq!(local.upstreams.len(), 1);
        assert_eq!(local.upstreams[0].name, "localhost:5001");
        assert_eq!(
            local.upstreams[0].urls[0].as_str(),
            "http://127.0.0.1:5001/"
        );
        assert_eq!(local.default_upstream, "localhost:5001");

        // basic-auth.yaml points at a password file that exists only on a
        // deployed machine; substitute a real one and the rest must be valid.
        let pw = temp_file("from-file\n");
        let text = fs::read_to_string(dir.join("basic-auth.yaml")).unwrap();
        let placeholder = "password_file: /etc/dockside/registry-password\n";
        assert!(text.contains(placeholder));
        let text = text.replace(
            placeholder,
            &format!("password_file: {}\n", pw.path().display()),
        );
        let auth = parse(&text).unwrap();
        let private = auth.upstream("registry.example.com").unwrap();
        let creds = private.credentials.as_ref().unwrap();
        assert_eq!(creds.username, "mirror-bot");
        assert_eq!(creds.password.expose(), "from-file");
        assert_eq!(auth.default_upstream, "registry.example.com");
    }

    #[test]
    fn load_reports_unreadable_file() {
        let msg = Config::load(Path::new("/nonexistent/dockside.yaml"))
            .unwrap_err()
            .to_string();
        assert_contains(&msg, &["/nonexistent/dockside.yaml: cannot read: "]);
    }

    #[test]
    fn load_reads_a_file() {
        let f = temp_file(MINIMAL);
        assert_eq!(Config::load(f.path()).unwrap(), parse(MINIMAL).unwrap());
    }

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

    #[test]
    fn listen_errors() {
        let msg = err(&MINIMAL.replace("0.0.0.0:5000", "localhost:5000"));
        assert_contains(
            &msg,
            &["listen: \"localhost:5000\" is not a socket address"],
        );
        let msg = err(&MINIMAL.replace("0.0.0.0:5000", "['[::]:1', ':::1']"));
        assert_contains(&msg, &["listen[1]: \":::1\" is not a socket address"]);
        let msg = err(&MINIMAL.replace("0.0.0.0:5000", "[]"));
        assert_contains(&msg, &["listen: the list is empty"]);
        let msg = err(&MINIMAL.replace("0.0.0.0:5000", "['0.0.0.0:1', '0.0.0.0:01']"));
        assert_contains(&msg, &["listen[1]: \"0.0.0.0:01\" is listed twice"]);
    }

    #[test]
    fn admin_listen_errors() {
        let msg = err(&format!("{MINIMAL}admin_listen: ':9090'\n"));
        assert_contains(&msg, &["admin_listen: \":9090\" is not a socket address"]);
        let msg = err(&format!("{MINIMAL}admin_listen: 0.0.0.0:5000\n"));
        assert_contains(
            &msg,
            &["admin_listen: \"0.0.0.0:5000\" is also a listen address"],
        );
    }

    #[test]
    fn threads_bounds() {
        let msg = err(&format!("{MINIMAL}threads: 0\n"));
        assert_contains(&msg, &["threads: 0 is not between 1 and 1024"]);
        let msg = err(&format!("{MINIMAL}threads: 5000\n"));
        assert_contains(&msg, &["threads: 5000"]);
        let msg = err(&format!("{MINIMAL}threads: -1\n"));
        assert_contains(&msg, &["threads", "-1"]);
        assert_eq!(
            parse(&format!("{MINIMAL}threads: 1024\n")).unwrap().threads,
            1024
        );
    }

    #[test]
    fn size_parsing() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1"), Ok(1));
        assert_eq!(parse_size("12B"), Ok(12));
        assert_eq!(parse_size("2KB"), Ok(2_000));
        assert_eq!(parse_size("3MB"), Ok(3_000_000));
        assert_eq!(parse_size("4GB"), Ok(4_000_000_000));
        assert_eq!(parse_size("5TB"), Ok(5_000_000_000_000));
        assert_eq!(parse_size("2KiB"), Ok(2048));
        assert_eq!(parse_size("3MiB"), Ok(3 << 20));
        assert_eq!(parse_size("50GiB"), Ok(50 << 30));
        assert_eq!(parse_size("5TiB"), Ok(5 << 40));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_size("18446744073709551616"), Err(SizeError::TooLarge));
        assert_eq!(parse_size("16777216TiB"), Err(SizeError::TooLarge));
        assert_eq!(parse_size("16777215TiB"), Ok(16_777_215 << 40));
        for bad in [
            "", "GiB", "50 GiB", "50 GB!", "50gib", "50G", "50Gi", "50gb", "1.5GiB", "-1", "+1",
            " 1", "1 ", "0x10", "1KiBB", "1iB",
        ] {
            assert_eq!(parse_size(bad), Err(SizeError::Malformed), "{bad:?}");
        }
    }

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
    fn duration_parsing_and_errors() {
        let c = parse(&format!("{MINIMAL}grace_period: 1m30s\n")).unwrap();
        assert_eq!(c.grace_period, Duration::from_secs(90));
        let c = parse(&format!("{MINIMAL}grace_period: 250ms\n")).unwrap();
        assert_eq!(c.grace_period, Duration::from_millis(250));
        // Zero is meaningful for grace (exit at once) and tag_ttl (always revalidate).
        let c = parse(&format!("{MINIMAL}grace_period: 0s\n")).unwrap();
        assert_eq!(c.grace_period, Duration::ZERO);
        let c = parse(&MINIMAL.replace("max_size: 1GiB", "max_size: 1GiB\n  tag_ttl: 0s")).unwrap();
        assert_eq!(c.cache.tag_ttl, Duration::ZERO);

        let msg = err(&format!("{MINIMAL}grace_period: 5\n"));
        assert_contains(&msg, &["grace_period: \"5\" is not a duration"]);
        let msg = err(&format!("{MINIMAL}grace_period: 5 parsecs\n"));
        assert_contains(&msg, &["grace_period: \"5 parsecs\" is not a duration"]);
        let msg = err(&format!("{MINIMAL}grace_period: -5s\n"));
        assert_contains(&msg, &["grace_period: \"-5s\""]);
        let msg = err(&MINIMAL.replace("max_size: 1GiB", "max_size: 1GiB\n  tag_ttl: soon"));
        assert_contains(&msg, &["cache.tag_ttl: \"soon\" is not a duration"]);
        let msg = err(&with_upstream_keys("    tag_ttl: 1x\n"));
        assert_contains(&msg, &["upstreams[0].tag_ttl: \"1x\" is not a duration"]);
    }

    #[test]
    fn urls_list_fail_over_targets_in_order_with_a_circuit() {
        let one_url = MINIMAL.replace("    url: https://registry-1.docker.io\n", "");
        let c = parse(&format!(
            "{one_url}    urls: [https://mirror.gcr.io, https://registry-1.docker.io]\n    circuit: {{failures: 5, cooldown: 1m}}\n"
        ))
        .unwrap();
        let urls: Vec<&str> = c.upstreams[0].urls.iter().map(|u| u.as_str()).collect();
        assert_eq!(
            urls,
            ["https://mirror.gcr.io/", "https://registry-1.docker.io/"]
        );
        assert_eq!(
            c.upstreams[0].circuit,
            Circuit {
                failures: 5,
                cooldown: Duration::from_secs(60)
            }
        );
        assert_eq!(
            parse(MINIMAL).unwrap().upstreams[0].circuit,
            Circuit::default()
        );

        let both = err(&with_upstream_keys("    urls: [https://mirror.gcr.io]\n"));
        assert_contains(
            &both,
            &["upstreams[0].urls: give url (one) or urls (a list), not both"],
        );
        assert_contains(&err(&one_url), &["upstreams[0]: needs url"]);
        assert_contains(
            &err(&format!("{one_url}    urls: []\n")),
            &["upstreams[0].urls: is empty"],
        );
        assert_contains(
            &err(&format!("{one_url}    urls: [http://a:1, 'ftp://b']\n")),
            &["upstreams[0].urls[1]: \"ftp://b\" is not an http or https URL"],
        );
        assert_contains(
            &err(&format!("{one_url}    urls: [http://a:1, 'http://a:1/']\n")),
            &["upstreams[0].urls[1]: \"http://a:1/\" is listed twice"],
        );
        assert_contains(
            &err(&with_upstream_keys("    circuit: {failures: 0}\n")),
            &["upstreams[0].circuit.failures: 0 must be at least 1"],
        );
        assert_contains(
            &err(&with_upstream_keys("    circuit: {cooldown: soon}\n")),
            &["upstreams[0].circuit.cooldown: \"soon\" is not a duration"],
        );
    }

    #[test]
    fn timeouts_must_be_positive_durations() {
        let msg = err(&with_upstream_keys("    timeouts: { first_byte: 0s }\n"));
        assert_contains(
            &msg,
            &["upstreams[0].timeouts.first_byte: \"0s\" must be greater than 0"],
        );
        let msg = err(&with_upstream_keys("    timeouts: { connect: fast }\n"));
        assert_contains(
            &msg,
            &["upstreams[0].timeouts.connect: \"fast\" is not a duration"],
        );
        let c = parse(&with_upstream_keys("    timeouts: {}\n")).unwrap();
        assert_eq!(c.upstreams[0].timeouts, Timeouts::default());
    }

    #[test]
    fn cache_dir_must_not_be_empty() {
        let msg = err(&MINIMAL.replace("dir: /tmp/cache", "dir: ''"));
        assert_contains(&msg, &["cache.dir: \"\" is not a directory path"]);
    }

    #[test]
    fn url_errors() {
        let cases = [
            ("ftp://x", "is not an http or https URL"),
            ("registry-1.docker.io", "is not a URL"),
            ("https://x/v2", "without a path"),
            ("https://x/?a=b", "without a path or query"),
            ("https://x/#frag", "without a path or query"),
        ];
        for (url, why) in cases {
            let msg = err(&MINIMAL.replace("https://registry-1.docker.io", url));
            assert_contains(&msg, &[&format!("upstreams[0].url: \"{url}\" "), why]);
        }
    }

    #[test]
    fn url_errors_never_show_passwords() {
        let msg = err(&MINIMAL.replace("https://registry-1.docker.io", "https://bob:hunter2@x"));
        assert_contains(&msg, &["\"https://***@x\" must not contain credentials"]);
        assert!(!msg.contains("hunter2"), "{msg}");
        // The whole userinfo is masked, a bare username included.
        let msg = err(&MINIMAL.replace("https://registry-1.docker.io", "https://bob@x"));
        assert_contains(&msg, &["\"https://***@x\" must not contain credentials"]);
        let msg =
            err(&MINIMAL.replace("https://registry-1.docker.io", "'https://bob:hunter2@x y'"));
        assert!(!msg.contains("hunter2"), "{msg}");
    }

    #[test]
    fn redaction() {
        assert_eq!(redact_userinfo("https://a:b@h/p@q"), "https://***@h/p@q");
        assert_eq!(redact_userinfo("https://h/p@q"), "https://h/p@q");
        assert_eq!(redact_userinfo("no scheme@x"), "no scheme@x");
        assert_eq!(redact_userinfo("http://a@b@c"), "http://***@c");
    }

    #[test]
    fn client_auth_reads_htpasswd_tokens_and_access() {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        fs::write(
            &htpasswd,
            "# users\nalice:$2y$05$abcdefghijklmnopqrstuu5Vw4bDp0jG9S0ZBBGQhYfV8kZNnYd9u\n",
        )
        .unwrap();
        let with_auth = |auth: &str| format!("{MINIMAL}client_auth:\n{auth}");
        let yaml = with_auth(&format!(
            "  htpasswd: {:?}\n  tokens: [{{ name: ci, token_env: CI_TOKEN }}]\n  access: {{ alice: [docker.io], ci: ['*'] }}\n",
            htpasswd
        ));
        let config = parse_env(&yaml, "CI_TOKEN", "0123456789abcdef0123").unwrap();
        let auth = config.client_auth.unwrap();
        assert_eq!(auth.users[0].0, "alice");
        assert_eq!(auth.tokens[0].0, "ci");
        assert_eq!(
            auth.access.unwrap()[1],
            ("ci".to_string(), vec!["*".to_string()])
        );

        fs::write(&htpasswd, "bob:{SHA}abc\n").unwrap();
        let msg = err(&with_auth(&format!("  htpasswd: {:?}\n", htpasswd)));
        assert_contains(&msg, &["client_auth.htpasswd", "line 1", "htpasswd -B"]);
        let msg = err(&with_auth("  tokens: []\n"));
        assert_contains(&msg, &["client_auth: neither htpasswd users nor tokens"]);
        let yaml = with_auth(
            "  tokens: [{ name: ci, token_env: CI_TOKEN }]\n  access: { ci: [quay.io] }\n",
        );
        let msg = parse_env(&yaml, "CI_TOKEN", "0123456789abcdef0123")
            .unwrap_err()
            .to_string();
        assert_contains(
            &msg,
            &[
                "client_auth.access.ci",
                "\"quay.io\" is not a configured upstream",
            ],
        );
        let msg = parse_env(
            &with_auth("  tokens: [{ name: ci, token_env: CI_TOKEN }]\n"),
            "CI_TOKEN",
            "short",
        )
        .unwrap_err()
        .to_string();
        assert_contains(&msg, &["client_auth.tokens[0]", "shorter than 16"]);
    }

    #[test]
    fn retries_default_to_two_and_are_bounded() {
        assert_eq!(parse(MINIMAL).unwrap().upstreams[0].retries, 2);
        let none = parse(&with_upstream_keys("    retries: 0\n")).unwrap();
        assert_eq!(none.upstreams[0].retries, 0);
        let msg = err(&with_upstream_keys("    retries: 11\n"));
        assert_contains(&msg, &["upstreams[0].retries: 11 is more than 10"]);
    }

    #[test]
    fn offline_is_inherited_unless_an_upstream_says_otherwise() {
        let two = format!(
            "offline: true\n{MINIMAL}  - name: ghcr.io\n    url: https://ghcr.io\n    offline: false\n"
        );
        let config = parse(&two).unwrap();
        assert!(config.offline);
        assert!(config.upstreams[0].offline);
        assert!(!config.upstreams[1].offline);
        assert!(!parse(MINIMAL).unwrap().upstreams[0].offline);
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

    #[test]
    fn upstream_names_are_hosts() {
        let msg = err(&MINIMAL.replace("name: docker.io", "name: 'docker.io/library'"));
        assert_contains(
            &msg,
            &["upstreams[0].name: \"docker.io/library\" is not a registry host"],
        );
        let msg = err(&with_upstream_keys("    aliases: [ok.io, 'bad host']\n"));
        assert_contains(
            &msg,
            &["upstreams[0].aliases[1]: \"bad host\" is not a registry host"],
        );
        assert!(parse(&MINIMAL.replace("name: docker.io", "name: localhost:5001")).is_ok());
    }

    #[test]
    fn duplicate_names_and_aliases_are_rejected_case_insensitively() {
        let two = format!("{MINIMAL}  - name: ghcr.io\n    url: https://ghcr.io\n");
        let msg = err(&two.replace("name: ghcr.io", "name: Docker.IO"));
        assert_contains(
            &msg,
            &["upstreams[1].name: \"docker.io\" is already used by upstreams[0].name"],
        );
        let msg = err(&format!("{two}    aliases: [INDEX.docker.io]\n").replace(
            "    url: https://registry-1.docker.io\n",
            "    url: https://registry-1.docker.io\n    aliases: [index.docker.io]\n",
        ));
        assert_contains(
            &msg,
            &[
                "upstreams[1].aliases[0]: \"index.docker.io\" is already used by upstreams[0].aliases[0]",
            ],
        );
        let msg = err(&with_upstream_keys("    aliases: [docker.io]\n"));
        assert_contains(
            &msg,
            &["upstreams[0].aliases[0]: \"docker.io\" is already used by upstreams[0].name"],
        );
    }

    #[test]
    fn upstreams_must_not_be_empty() {
        let text = "listen: 0.0.0.0:5000\ncache: {dir: d, max_size: 1}\nupstreams: []\n";
        let msg = err(text);
        assert_contains(&msg, &["upstreams: the list is empty"]);
    }

    #[test]
    fn default_upstream_resolution() {
        let ghcr_first = "
listen: 0.0.0.0:5000
cache: {dir: d, max_size: 1}
upstreams:
  - {name: ghcr.io, url: 'https://ghcr.io'}
  - {name: quay.io, url: 'https://quay.io'}
";
        assert_eq!(parse(ghcr_first).unwrap().default_upstream, "ghcr.io");
        let with_hub =
            format!("{ghcr_first}  - {{name: docker.io, url: 'https://registry-1.docker.io'}}\n");
        assert_eq!(parse(&with_hub).unwrap().default_upstream, "docker.io");
        let explicit = format!("{ghcr_first}default_upstream: QUAY.io\n");
        assert_eq!(parse(&explicit).unwrap().default_upstream, "quay.io");
        let msg = err(&format!("{ghcr_first}default_upstream: gcr.io\n"));
        assert_contains(
            &msg,
            &["default_upstream: \"gcr.io\" is not the name or alias of any upstream"],
        );
    }

    #[test]
    fn inline_password() {
        let c = parse(&with_upstream_keys("    username: u\n    password: pw\n")).unwrap();
        let creds = c.upstreams[0].credentials.as_ref().unwrap();
        assert_eq!(creds.password.expose(), "pw");
    }

    #[test]
    fn password_without_username() {
        let msg = err(&with_upstream_keys("    password_env: X\n"));
        assert_contains(
            &msg,
            &["upstreams[0]: a password is set but username is missing"],
        );
    }

    #[test]
    fn username_needs_exactly_one_source() {
        let msg = err(&with_upstream_keys("    username: u\n"));
        assert_contains(
            &msg,
            &[
                "upstreams[0]: username \"u\" needs exactly one of password, password_file, password_env (0 given)",
            ],
        );
        let msg = err(&with_upstream_keys(
            "    username: u\n    password: p\n    password_env: X\n",
        ));
        assert_contains(&msg, &["(2 given)"]);
        assert!(!msg.contains("\"p\""), "{msg}");
    }

    #[test]
    fn bad_usernames() {
        let msg = err(&with_upstream_keys(
            "    username: 'a:b'\n    password: p\n",
        ));
        assert_contains(&msg, &["upstreams[0].username: \"a:b\" is not a username"]);
        let msg = err(&with_upstream_keys("    username: ''\n    password: p\n"));
        assert_contains(&msg, &["upstreams[0].username: \"\" is not a username"]);
    }

    #[test]
    fn password_env_resolution() {
        let text = with_upstream_keys("    username: u\n    password_env: HUB_TOKEN\n");
        let c = parse_env(&text, "HUB_TOKEN", "tok").unwrap();
        assert_eq!(
            c.upstreams[0]
                .credentials
                .as_ref()
                .unwrap()
                .password
                .expose(),
            "tok"
        );
        let msg = err(&text);
        assert_contains(
            &msg,
            &["upstreams[0].password_env: environment variable \"HUB_TOKEN\" is not set"],
        );
        let msg = parse_env(&text, "HUB_TOKEN", "").unwrap_err().to_string();
        assert_contains(
            &msg,
            &["test.yaml: upstreams[0].password_env: the password is empty"],
        );
    }

    #[test]
    fn from_yaml_reads_the_real_environment() {
        // PATH is set in any test environment; reading it proves the public
        // entry point consults the process environment.
        let text = with_upstream_keys("    username: u\n    password_env: PATH\n");
        let c = Config::from_yaml(&text, ORIGIN).unwrap();
        let path = std::env::var("PATH").unwrap();
        assert_eq!(
            c.upstreams[0]
                .credentials
                .as_ref()
                .unwrap()
                .password
                .expose(),
            path
        );
    }

    #[test]
    fn password_file_is_read_and_one_newline_trimmed() {
        for (contents, expected) in [
            ("pw\n", "pw"),
            ("pw\r\n", "pw"),
            ("pw", "pw"),
            ("pw\n\n", "pw\n"),
            (" pw \n", " pw "),
        ] {
            let f = temp_file(contents);
            let text = with_upstream_keys(&format!(
                "    username: u\n    password_file: {}\n",
                f.path().display()
            ));
            let c = parse(&text).unwrap();
            let creds = c.upstreams[0].credentials.as_ref().unwrap();
            assert_eq!(creds.password.expose(), expected, "{contents:?}");
        }
    }

    #[test]
    fn password_file_errors() {
        let text = with_upstream_keys("    username: u\n    password_file: /nonexistent/pw\n");
        let msg = err(&text);
        assert_contains(
            &msg,
            &["upstreams[0].password_file: \"/nonexistent/pw\" cannot be read: "],
        );
        let f = temp_file("\n");
        let text = with_upstream_keys(&format!(
            "    username: u\n    password_file: {}\n",
            f.path().display()
        ));
        assert_contains(
            &err(&text),
            &["upstreams[0].password_file: the password is empty"],
        );
    }

    #[test]
    fn ca_file_errors() {
        let msg = err(&with_upstream_keys("    ca_file: /nonexistent/ca.pem\n"));
        assert_contains(
            &msg,
            &["upstreams[0].ca_file: \"/nonexistent/ca.pem\" cannot be read: "],
        );
        let f = temp_file("not a certificate\n");
        let path = f.path().display().to_string();
        let msg = err(&with_upstream_keys(&format!("    ca_file: {path}\n")));
        assert_contains(
            &msg,
            &[&format!(
                "upstreams[0].ca_file: \"{path}\" contains no PEM certificate"
            )],
        );
    }

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

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2".into());
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(s.expose(), "hunter2");
        let c = parse(&with_upstream_keys(
            "    username: u\n    password: hunter2\n",
        ))
        .unwrap();
        let dump = format!("{c:?} {c:#?}");
        assert!(!dump.contains("hunter2"), "{dump}");
        assert!(dump.contains("***"));
    }

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
