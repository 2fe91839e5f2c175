//! `cluster:`: the replicas that act as one cache, how this one is reached, how the others are
//! found, and the secret that signs requests between them.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::error::{Check, ConfigError};
use super::raw::RawCluster;
use super::values::Secret;
use crate::oci::RegistryHost;

pub(super) const DEFAULT_REFRESH: Duration = Duration::from_secs(5);
pub(super) const DEFAULT_HEALTH: Duration = Duration::from_secs(2);
/// Shortest secret accepted: 32 bytes, as an HMAC-SHA256 key should be.
const SECRET_MIN: usize = 32;

/// How one member is reached: `ip:port`, `[ipv6]:port` or `host:port`. Members are compared
/// by this text, so every replica must spell a member the same way (DNS gives addresses).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerAddr(Arc<str>);

impl PeerAddr {
    pub fn parse(text: &str) -> Result<PeerAddr, String> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(PeerAddr::from(addr));
        }
        let bad = || format!("{text:?} is not host:port (e.g. 10.0.0.5:5000)");
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.contains(':') || port == 0 {
            return Err(bad());
        }
        let host = RegistryHost::parse(host).map_err(|_| bad())?;
        Ok(PeerAddr(format!("{host}:{port}").into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the host is an IP address (not a name to resolve).
    pub fn is_ip(&self) -> bool {
        self.0.parse::<SocketAddr>().is_ok()
    }
}

impl From<SocketAddr> for PeerAddr {
    fn from(addr: SocketAddr) -> PeerAddr {
        PeerAddr(addr.to_string().into())
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where the members come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Members {
    /// `peers:`, this replica among them.
    Static(Vec<PeerAddr>),
    /// `peers_dns:`: every A/AAAA record of `name`, at `port`, re-resolved every
    /// `refresh_interval`.
    Dns {
        name: RegistryHost,
        port: u16,
        /// `dns_server:`: ask this server instead of the system's (`/etc/resolv.conf`).
        server: Option<SocketAddr>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub advertise: PeerAddr,
    pub members: Members,
    /// The shared secret peer requests are signed with (HMAC-SHA256 key).
    pub secret: Secret,
    pub refresh_interval: Duration,
    pub health_interval: Duration,
}

impl Check<'_> {
    pub(super) fn cluster(&self, raw: &RawCluster) -> Result<ClusterConfig, ConfigError> {
        let advertise = self.advertise(&raw.advertise)?;
        let members = match (&raw.peers, &raw.peers_dns) {
            (Some(peers), None) => self.static_peers(peers, &advertise)?,
            (None, Some(dns)) => self.peers_dns(dns, raw.dns_server.as_deref(), &advertise)?,
            _ => {
                return Err(self.invalid(
                    "cluster",
                    "needs exactly one of peers (a list of host:port) and peers_dns \
                     (a headless Service's name:port)"
                        .into(),
                ));
            }
        };
        if raw.dns_server.is_some() && raw.peers_dns.is_none() {
            return Err(self.invalid("cluster.dns_server", "is only used with peers_dns".into()));
        }
        Ok(ClusterConfig {
            advertise,
            members,
            secret: self.cluster_secret(&raw.secret_file)?,
            refresh_interval: self.timeout(
                "cluster.refresh_interval",
                raw.refresh_interval.as_ref(),
                DEFAULT_REFRESH,
            )?,
            health_interval: self.timeout(
                "cluster.health_interval",
                raw.health_interval.as_ref(),
                DEFAULT_HEALTH,
            )?,
        })
    }

    /// `advertise`, with `${NAME}` taken from the environment (a pod's IP comes that way).
    fn advertise(&self, raw: &str) -> Result<PeerAddr, ConfigError> {
        let key = "cluster.advertise";
        let mut text = String::new();
        let mut rest = raw;
        while let Some(start) = rest.find("${") {
            let end = rest[start..].find('}').ok_or_else(|| {
                self.invalid(key, format!("{raw:?}: `${{` without a closing `}}`"))
            })?;
            let var = &rest[start + 2..start + end];
            let value = (self.env)(var).ok_or_else(|| {
                self.invalid(
                    key,
                    format!("{raw:?}: environment variable {var} is not set"),
                )
            })?;
            text.push_str(&rest[..start]);
            // An IPv6 pod address needs brackets before its `:port`.
            if value.parse::<std::net::Ipv6Addr>().is_ok() {
                text.push_str(&format!("[{value}]"));
            } else {
                text.push_str(&value);
            }
            rest = &rest[start + end + 1..];
        }
        text.push_str(rest);
        PeerAddr::parse(&text).map_err(|e| self.invalid(key, e))
    }

    fn static_peers(&self, raw: &[String], me: &PeerAddr) -> Result<Members, ConfigError> {
        let mut peers = Vec::new();
        for (i, text) in raw.iter().enumerate() {
            let peer = PeerAddr::parse(text)
                .map_err(|e| self.invalid(&format!("cluster.peers[{i}]"), e))?;
            if peers.contains(&peer) {
                return Err(self.invalid(
                    &format!("cluster.peers[{i}]"),
                    format!("{text:?} is listed twice"),
                ));
            }
            peers.push(peer);
        }
        if !peers.contains(me) {
            return Err(self.invalid(
                "cluster.peers",
                format!(
                    "does not list this replica's advertise address {me}: every replica must \
                     use the same list, itself included"
                ),
            ));
        }
        Ok(Members::Static(peers))
    }

    fn peers_dns(
        &self,
        raw: &str,
        server: Option<&str>,
        me: &PeerAddr,
    ) -> Result<Members, ConfigError> {
        let key = "cluster.peers_dns";
        let bad = || {
            self.invalid(
                key,
                format!(
                    "{raw:?} is not name:port (e.g. dockside-peers.cache.svc.cluster.local:5000)"
                ),
            )
        };
        let (name, port) = raw.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let name = RegistryHost::parse(name).map_err(|_| bad())?;
        if !me.is_ip() {
            return Err(self.invalid(
                "cluster.advertise",
                format!(
                    "{me} must be an IP address with peers_dns, since members are known by \
                     their addresses (e.g. \"${{POD_IP}}:5000\")"
                ),
            ));
        }
        let server = match server {
            Some(s) => Some(s.parse::<SocketAddr>().map_err(|_| {
                self.invalid(
                    "cluster.dns_server",
                    format!("{s:?} is not ip:port (e.g. 127.0.0.1:53)"),
                )
            })?),
            None => None,
        };
        Ok(Members::Dns { name, port, server })
    }

    fn cluster_secret(&self, path: &str) -> Result<Secret, ConfigError> {
        let key = "cluster.secret_file";
        let secret = self.password_file(key, path)?;
        if secret.len() < SECRET_MIN {
            return Err(self.invalid(
                key,
                format!(
                    "{path:?} holds {} bytes; the cluster secret needs at least {SECRET_MIN} \
                     (e.g. `head -c 32 /dev/urandom | base64 > {path}`)",
                    secret.len()
                ),
            ));
        }
        Ok(Secret::new(secret))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn with_cluster(body: &str) -> String {
        format!("{MINIMAL}cluster:\n{body}")
    }

    fn secret_file(text: &str) -> tempfile::NamedTempFile {
        temp_file(text)
    }

    #[test]
    fn static_members_parse() {
        let secret = secret_file(&format!("{SECRET}\n"));
        let yaml = with_cluster(&format!(
            "  advertise: 127.0.0.1:5001\n  peers: ['127.0.0.1:5001', '127.0.0.1:5011', \
             'dockside-1.peers:5000', '[::1]:5021']\n  secret_file: {}\n",
            secret.path().display()
        ));
        let c = parse(&yaml).unwrap().cluster.unwrap();
        assert_eq!(c.advertise.as_str(), "127.0.0.1:5001");
        let Members::Static(peers) = &c.members else {
            panic!("{:?}", c.members)
        };
        let peers: Vec<&str> = peers.iter().map(PeerAddr::as_str).collect();
        assert_eq!(
            peers,
            [
                "127.0.0.1:5001",
                "127.0.0.1:5011",
                "dockside-1.peers:5000",
                "[::1]:5021"
            ]
        );
        assert_eq!(c.secret.expose(), SECRET);
        assert_eq!(c.refresh_interval, DEFAULT_REFRESH);
        assert_eq!(c.health_interval, DEFAULT_HEALTH);
        assert_eq!(parse(MINIMAL).unwrap().cluster, None);
    }

    #[test]
    fn dns_members_and_advertise_from_the_environment() {
        let secret = secret_file(SECRET);
        let yaml = with_cluster(&format!(
            "  advertise: '${{POD_IP}}:5000'\n  peers_dns: dockside-peers.cache.svc:5000\n  \
             dns_server: 127.0.0.1:5353\n  refresh_interval: 1s\n  secret_file: {}\n",
            secret.path().display()
        ));
        let c = parse_env(&yaml, "POD_IP", "10.1.2.3")
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.advertise.as_str(), "10.1.2.3:5000");
        let v6 = parse_env(&yaml, "POD_IP", "fd00::7")
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(v6.advertise.as_str(), "[fd00::7]:5000");
        assert_eq!(c.refresh_interval, Duration::from_secs(1));
        assert_eq!(
            c.members,
            Members::Dns {
                name: RegistryHost::parse("dockside-peers.cache.svc").unwrap(),
                port: 5000,
                server: Some("127.0.0.1:5353".parse().unwrap()),
            }
        );
    }

    #[test]
    fn errors_name_the_key_and_value() {
        let secret = secret_file(SECRET);
        let s = secret.path().display().to_string();
        let cases = [
            (
                format!("  advertise: 127.0.0.1:5001\n  peers: ['127.0.0.1:5011']\n  secret_file: {s}\n"),
                "cluster.peers: does not list this replica's advertise address 127.0.0.1:5001",
            ),
            (
                format!("  advertise: 127.0.0.1\n  peers: ['127.0.0.1:5011']\n  secret_file: {s}\n"),
                "cluster.advertise: \"127.0.0.1\" is not host:port",
            ),
            (
                format!("  advertise: 127.0.0.1:1\n  peers: ['127.0.0.1:1', 'x y:2']\n  secret_file: {s}\n"),
                "cluster.peers[1]: \"x y:2\" is not host:port",
            ),
            (
                format!("  advertise: 127.0.0.1:1\n  peers: ['127.0.0.1:1', '127.0.0.1:1']\n  secret_file: {s}\n"),
                "cluster.peers[1]: \"127.0.0.1:1\" is listed twice",
            ),
            (
                format!("  advertise: 127.0.0.1:1\n  secret_file: {s}\n"),
                "cluster: needs exactly one of peers",
            ),
            (
                format!("  advertise: '${{POD_IP}}:1'\n  peers: ['127.0.0.1:1']\n  secret_file: {s}\n"),
                "cluster.advertise: \"${POD_IP}:1\": environment variable POD_IP is not set",
            ),
            (
                format!("  advertise: 'dockside-0:1'\n  peers_dns: peers:1\n  secret_file: {s}\n"),
                "cluster.advertise: dockside-0:1 must be an IP address with peers_dns",
            ),
            (
                format!("  advertise: 127.0.0.1:1\n  peers_dns: peers\n  secret_file: {s}\n"),
                "cluster.peers_dns: \"peers\" is not name:port",
            ),
            (
                "  advertise: 127.0.0.1:1\n  peers: ['127.0.0.1:1']\n  secret_file: /nonexistent/s\n".into(),
                "cluster.secret_file: \"/nonexistent/s\" cannot be read",
            ),
        ];
        for (body, expected) in cases {
            assert_contains(&err(&with_cluster(&body)), &[expected]);
        }
        let short = secret_file("short");
        let body = format!(
            "  advertise: 127.0.0.1:1\n  peers: ['127.0.0.1:1']\n  secret_file: {}\n",
            short.path().display()
        );
        assert_contains(
            &err(&with_cluster(&body)),
            &[
                "cluster.secret_file:",
                "holds 5 bytes; the cluster secret needs at least 32",
            ],
        );
    }
}
