//! `upstreams:` and `default_upstream`: each upstream's names, URLs, circuit, CA, tag TTL,
//! timeouts, retries and `offline`. Its credentials are in `password.rs` (static) and
//! `credentials.rs` (a source of short-lived ones).

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use url::Url;

use super::credentials::CredentialSource;
use super::error::{Check, ConfigError};
use super::password::Credentials;
use super::raw::{RawCircuit, RawTimeouts, RawUpstream};
use super::values::redact_userinfo;
use crate::oci::RegistryHost;

const DEFAULT_RETRIES: u32 = 2;
/// Each retry waits up to twice as long as the one before; more than this is hours of waiting.
const MAX_RETRIES: u32 = 10;
pub(super) const PEM_CERT_MARKER: &str = "-----BEGIN CERTIFICATE-----";

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

impl UpstreamConfig {
    /// Whether `name` is this upstream's name or one of its aliases.
    pub fn answers_to(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
            || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    }
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

impl Check<'_> {
    pub(super) fn upstreams(
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

    pub(super) fn upstream(
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

    pub(super) fn host_name(&self, key: &str, name: &str) -> Result<String, ConfigError> {
        let host = RegistryHost::parse(name).map_err(|_| {
            self.invalid(
                key,
                format!("{name:?} is not a registry host (e.g. docker.io or localhost:5000)"),
            )
        })?;
        Ok(host.into_string())
    }

    pub(super) fn upstream_urls(
        &self,
        key: &str,
        raw: &RawUpstream,
    ) -> Result<Vec<Url>, ConfigError> {
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

    pub(super) fn circuit(
        &self,
        key: &str,
        raw: Option<&RawCircuit>,
    ) -> Result<Circuit, ConfigError> {
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

    pub(super) fn upstream_url(&self, key: &str, text: &str) -> Result<Url, ConfigError> {
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

    pub(super) fn ca_file(
        &self,
        key: &str,
        path: Option<&str>,
    ) -> Result<Option<PathBuf>, ConfigError> {
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

    pub(super) fn timeouts(
        &self,
        key: &str,
        raw: Option<&RawTimeouts>,
    ) -> Result<Timeouts, ConfigError> {
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

    pub(super) fn retries(&self, key: &str, raw: Option<u32>) -> Result<u32, ConfigError> {
        match raw {
            None => Ok(DEFAULT_RETRIES),
            Some(n) if n <= MAX_RETRIES => Ok(n),
            Some(n) => Err(self.invalid(key, format!("{n} is more than {MAX_RETRIES}"))),
        }
    }

    /// Names and aliases must be unique (they are already lowercased), or a
    /// request's upstream would depend on list order.
    pub(super) fn unique_names(&self, upstreams: &[UpstreamConfig]) -> Result<(), ConfigError> {
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

    pub(super) fn default_upstream(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::*;

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
}
