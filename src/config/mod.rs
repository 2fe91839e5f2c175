//! The operator's YAML configuration.
//!
//! Loading happens in two steps. serde reads the file into `Raw*` structs
//! that mirror the YAML exactly and reject unknown keys (a misspelt key must
//! not be silently ignored). Validation then turns those into the public
//! types, checking everything that can be checked before the server starts
//! and resolving secrets, so a running server never discovers a config
//! mistake. Every error names the file, the key path and the bad value.
//!
//! One file per reason to change: `raw.rs` the serde shapes, `error.rs` the error and the
//! validation context, `values.rs` sizes, durations and secrets, and one file per section
//! (`listen.rs`, `cache.rs`, `upstreams.rs`, `password.rs`, `credentials.rs`,
//! `client_auth.rs`, `tls.rs`, `limits.rs`), each with its tests. This module imports no TLS,
//! credential or upstream code; checks that need such code run after parsing (`preflight`).

mod cache;
mod client_auth;
mod cluster;
mod credentials;
mod error;
mod limits;
mod listen;
mod password;
mod raw;
mod shared;
#[cfg(test)]
mod test_support;
mod tls;
mod upstreams;
mod values;

use std::fs;
use std::path::Path;
use std::time::Duration;

pub use cache::CacheConfig;
pub use client_auth::ClientAuthConfig;
pub use cluster::{ClusterConfig, Members, PeerAddr};
pub use credentials::{
    AadToken, AcrSource, CredentialSource, EcrSource, GcpSource, HelperSource, ServiceAccountKey,
    ecr_host_parts,
};
pub use error::ConfigError;
pub use limits::Limits;
pub use password::Credentials;
pub use shared::{S3Config, SharedConfig};
pub use tls::TlsConfig;
pub use upstreams::{Circuit, Timeouts, UpstreamConfig};
pub use values::{Secret, human_bytes};

use error::Check;
use raw::{RawConfig, RawUpstream};

/// The configuration used when none is given; also a commented example.
pub const DEFAULT_YAML: &str = include_str!("../../config/dockside.yaml");

const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(5);

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
    /// Replicas acting as one cache; `None`: this instance alone.
    pub cluster: Option<ClusterConfig>,
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

impl Check<'_> {
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
        let cluster = match &raw.cluster {
            // Members reach each other over plain HTTP on the registry listener.
            Some(_) if tls.is_some() => {
                return Err(self.invalid(
                    "cluster",
                    "cannot be used with tls: yet (members talk plain HTTP to each other's \
                     registry listener); terminate TLS in front of dockside instead"
                        .into(),
                ));
            }
            Some(cluster) => Some(self.cluster(cluster)?),
            None => None,
        };
        Ok(Config {
            cluster,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::*;
    use crate::config::upstreams::PEM_CERT_MARKER;
    use std::path::PathBuf;

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
}
