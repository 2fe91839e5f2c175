//! Who the members are and which of them answer: the list (static, or a headless Service's
//! A/AAAA records resolved again every `refresh_interval`) and each member's health, from a
//! signed `GET /v2/` every `health_interval` and from failed peer requests in between.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

use crate::config::{Members, PeerAddr};
use crate::oci::RegistryHost;

/// The members as this replica sees them now.
pub struct Membership {
    me: PeerAddr,
    state: RwLock<State>,
}

struct State {
    /// Sorted, this replica included.
    list: Arc<Vec<PeerAddr>>,
    down: HashSet<PeerAddr>,
    /// Whether a list was ever known (a static one is known at once).
    known: bool,
}

impl Membership {
    pub fn new(me: PeerAddr, members: &Members) -> Membership {
        let (list, known) = match members {
            Members::Static(peers) => (peers.clone(), true),
            Members::Dns { .. } => (Vec::new(), false),
        };
        let membership = Membership {
            me,
            state: RwLock::new(State {
                list: Arc::new(Vec::new()),
                down: HashSet::new(),
                known,
            }),
        };
        membership.set(list, known);
        membership
    }

    pub fn me(&self) -> &PeerAddr {
        &self.me
    }

    /// Every member, this replica included, sorted.
    pub fn list(&self) -> Arc<Vec<PeerAddr>> {
        self.state.read().expect("members lock").list.clone()
    }

    pub fn is_known(&self) -> bool {
        self.state.read().expect("members lock").known
    }

    pub fn is_up(&self, member: &PeerAddr) -> bool {
        !self
            .state
            .read()
            .expect("members lock")
            .down
            .contains(member)
    }

    /// Replace the list (a DNS answer). This replica is always a member of its own view: a pod
    /// is only published once ready, and it must still know its own share.
    pub fn set(&self, mut list: Vec<PeerAddr>, known: bool) -> Change {
        if !list.contains(&self.me) {
            list.push(self.me.clone());
        }
        list.sort();
        list.dedup();
        let mut state = self.state.write().expect("members lock");
        let before: HashSet<&PeerAddr> = state.list.iter().collect();
        let after: HashSet<&PeerAddr> = list.iter().collect();
        let change = Change {
            joined: after.difference(&before).map(|m| (*m).clone()).collect(),
            left: before.difference(&after).map(|m| (*m).clone()).collect(),
        };
        state.down.retain(|m| after.contains(m));
        state.list = Arc::new(list);
        state.known |= known;
        change
    }

    /// Record a health answer; whether it changed the member's state.
    pub fn set_up(&self, member: &PeerAddr, up: bool) -> bool {
        let mut state = self.state.write().expect("members lock");
        if up {
            state.down.remove(member)
        } else {
            state.list.contains(member) && state.down.insert(member.clone())
        }
    }

    /// (members up, members down), this replica counted up.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.state.read().expect("members lock");
        let down = state.down.len();
        (state.list.len() - down, down)
    }
}

/// What a new list changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub joined: Vec<PeerAddr>,
    pub left: Vec<PeerAddr>,
}

/// Resolves a headless Service's name to its members.
pub struct Dns {
    resolver: TokioResolver,
    name: RegistryHost,
    port: u16,
}

impl Dns {
    /// `server`: ask it rather than the system's resolvers.
    pub fn new(name: &RegistryHost, port: u16, server: Option<SocketAddr>) -> anyhow::Result<Dns> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = match server {
            Some(addr) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
                let config = ResolverConfig::from_parts(None, Vec::new(), vec![ns]);
                TokioResolver::builder_with_config(config, provider)
            }
            None => TokioResolver::builder(provider).map_err(|e| {
                anyhow::anyhow!(
                    "cluster.peers_dns: cannot read the system's DNS configuration: {e}"
                )
            })?,
        };
        let options = builder.options_mut();
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        // Every refresh asks the server: membership changes must show within one interval.
        options.cache_size = 0;
        let resolver = builder
            .build()
            .map_err(|e| anyhow::anyhow!("cluster.peers_dns: cannot build a resolver: {e}"))?;
        Ok(Dns {
            resolver,
            name: name.clone(),
            port,
        })
    }

    /// The members the name resolves to now.
    pub async fn resolve(&self) -> Result<Vec<PeerAddr>, String> {
        // A trailing dot: the name is complete, the search list is not tried.
        let fqdn = format!("{}.", self.name);
        let answer = match self.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(answer) => answer,
            // A headless Service publishes only ready pods: before the first is ready the name
            // has no records, and this replica is alone (it must become ready to be listed).
            Err(e) if e.is_no_records_found() => return Ok(Vec::new()),
            Err(e) => return Err(format!("{}: {e}", self.name)),
        };
        Ok(answer
            .iter()
            .map(|ip| PeerAddr::from(SocketAddr::new(ip, self.port)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> PeerAddr {
        PeerAddr::parse(s).unwrap()
    }

    #[test]
    fn a_view_always_holds_this_replica_and_reports_changes() {
        let me = addr("10.0.0.1:5000");
        let m = Membership::new(
            me.clone(),
            &Members::Dns {
                name: RegistryHost::parse("peers").unwrap(),
                port: 5000,
                server: None,
            },
        );
        assert!(!m.is_known());
        assert_eq!(*m.list(), std::slice::from_ref(&me));
        let change = m.set(vec![addr("10.0.0.2:5000"), addr("10.0.0.3:5000")], true);
        assert!(m.is_known());
        assert_eq!(change.joined.len(), 2);
        assert_eq!(
            *m.list(),
            [me.clone(), addr("10.0.0.2:5000"), addr("10.0.0.3:5000")]
        );
        assert!(m.set_up(&addr("10.0.0.3:5000"), false));
        assert!(!m.set_up(&addr("10.0.0.3:5000"), false), "already down");
        assert!(!m.set_up(&addr("10.0.0.9:5000"), false), "not a member");
        assert_eq!(m.counts(), (2, 1));
        assert!(!m.is_up(&addr("10.0.0.3:5000")));
        let change = m.set(vec![me.clone(), addr("10.0.0.2:5000")], true);
        assert_eq!(
            change,
            Change {
                joined: vec![],
                left: vec![addr("10.0.0.3:5000")]
            }
        );
        assert_eq!(m.counts(), (2, 0));
        assert!(m.set(vec![], true).left.contains(&addr("10.0.0.2:5000")));
        assert_eq!(*m.list(), [me]);
    }

    /// A DNS server on loopback answering one name with two A records and one AAAA record.
    #[tokio::test]
    async fn members_come_from_a_names_records() {
        use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
        use hickory_resolver::proto::rr::{RData, Record, RecordType, rdata};
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = socket.local_addr().unwrap();
        let serve = tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            loop {
                let (n, from) = socket.recv_from(&mut buf).await.unwrap();
                let query = Message::from_vec(&buf[..n]).unwrap();
                let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
                reply.metadata.message_type = MessageType::Response;
                reply.metadata.recursion_available = true;
                for q in &query.queries {
                    reply.add_query(q.clone());
                    let name = q.name().clone();
                    if name.to_string().starts_with("none.") {
                        // A headless Service with no ready pod yet.
                        reply.metadata.response_code = ResponseCode::NXDomain;
                        continue;
                    }
                    match q.query_type() {
                        RecordType::A => {
                            for ip in [[127, 0, 0, 11], [127, 0, 0, 12]] {
                                let data = RData::A(rdata::A::from(std::net::Ipv4Addr::from(ip)));
                                reply.add_answer(Record::from_rdata(name.clone(), 5, data));
                            }
                        }
                        RecordType::AAAA => {
                            let data =
                                RData::AAAA(rdata::AAAA::from(std::net::Ipv6Addr::LOCALHOST));
                            reply.add_answer(Record::from_rdata(name.clone(), 5, data));
                        }
                        _ => {}
                    }
                }
                socket
                    .send_to(&reply.to_vec().unwrap(), from)
                    .await
                    .unwrap();
            }
        });
        let dns = Dns::new(
            &RegistryHost::parse("dockside-peers.test").unwrap(),
            5000,
            Some(server),
        )
        .unwrap();
        let mut got = dns.resolve().await.unwrap();
        got.sort();
        assert_eq!(
            got,
            [
                addr("127.0.0.11:5000"),
                addr("127.0.0.12:5000"),
                addr("[::1]:5000")
            ]
        );
        // No records is an answer (alone for now), not a failure that keeps the list unknown.
        let none = RegistryHost::parse("none.dockside-peers.test").unwrap();
        let dns = Dns::new(&none, 5000, Some(server)).unwrap();
        assert_eq!(dns.resolve().await, Ok(Vec::new()));
        serve.abort();
    }
}
