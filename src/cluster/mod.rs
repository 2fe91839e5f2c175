//! Replicas acting as one cache. Every member maps each digest, and each tag, onto an order of
//! members by rendezvous hashing ([`ring`]); the first is the key's owner. A replica that misses
//! asks along that order ([`Cluster::hops`]): the members ranked above itself as [`Mode::Fill`]
//! (the owner's single flight makes the one upstream fetch and streams it on), then a couple of
//! members ranked below it as [`Mode::Held`] (a new owner finds what the previous one kept), then
//! its own upstream. Requests between members are signed ([`proof`]); one that arrives from a
//! peer is answered here and never forwarded again.
//!
//! The mirror uses this module through [`Cluster`]; `members` keeps the view current on a
//! thread of its own.

pub mod members;
pub mod peer;
pub mod proof;
pub mod ring;

use std::sync::{Arc, Weak};
use std::time::Duration;

use http::Method;
use tracing::{info, warn};

use crate::config::{ClusterConfig, Members, PeerAddr};
use crate::metrics::Metrics;
use crate::origin::Origin;

pub use members::Membership;
pub use peer::{Asked, Hop, PeerClient, PeerError, PeerManifest, PeerOrigin};
pub use proof::{Mode, PeerClaim, PeerRequest, ProofError};
pub use ring::RingKey;

/// How many members ranked below this replica are asked for what they hold.
const HELD_PROBES: usize = 2;
/// How long a health check may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// What a health check asks: the API version check, answered by any working member.
const HEALTH_PATH: &str = "/v2/";

/// Who is asking: a client of this replica, or another member (whose request is never
/// forwarded again).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    Client,
    Peer(PeerRequest),
}

pub struct Cluster {
    members: Arc<Membership>,
    client: Arc<PeerClient>,
    signer: proof::Signer,
    config: ClusterConfig,
    metrics: Arc<Metrics>,
}

impl Cluster {
    pub fn new(config: &ClusterConfig, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Cluster>> {
        let me = config.advertise.clone();
        let members = Arc::new(Membership::new(me.clone(), &config.members));
        let client = PeerClient::new(
            proof::Signer::new(&config.secret),
            me,
            members.clone(),
            metrics.clone(),
        )?;
        let cluster = Arc::new(Cluster {
            members,
            client: Arc::new(client),
            signer: proof::Signer::new(&config.secret),
            config: config.clone(),
            metrics,
        });
        cluster.record_members();
        Ok(cluster)
    }

    /// Keep the view current (DNS, health checks) on a thread of its own, until the cluster is
    /// dropped.
    pub fn start(self: &Arc<Self>) -> anyhow::Result<()> {
        let dns = match &self.config.members {
            Members::Dns { name, port, server } => Some(members::Dns::new(name, *port, *server)?),
            Members::Static(_) => None,
        };
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("dockside-cluster".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("cluster runtime");
                rt.block_on(keep_view(weak, dns));
            })?;
        Ok(())
    }

    pub fn me(&self) -> &PeerAddr {
        self.members.me()
    }

    pub fn members(&self) -> &Membership {
        &self.members
    }

    /// Whether the member list is known (`/readyz` waits for it).
    pub fn is_ready(&self) -> bool {
        self.members.is_known()
    }

    /// Check a request's peer proof.
    pub fn verify(
        &self,
        method: &str,
        path: &str,
        query: Option<&str>,
        claim: &PeerClaim,
    ) -> Result<PeerRequest, ProofError> {
        let verified = self.signer.verify(method, path, query, claim);
        let (mode, outcome) = match &verified {
            Ok(p) => (p.mode.as_str(), "ok"),
            Err(_) => ("unknown", "refused"),
        };
        // Health checks are not counted by their sender either.
        if path != HEALTH_PATH || verified.is_err() {
            self.metrics
                .peer_requests
                .with_label_values(&["received", mode, outcome])
                .inc();
        }
        verified
    }

    /// Whom to ask for `key`, in order, before this replica's own upstream.
    pub fn hops(&self, key: &RingKey, via: &Via) -> Vec<Hop> {
        let list = self.members.list();
        let ranked = ring::rank(&list, key);
        let me = self.me();
        let mine = ranked.iter().position(|m| *m == me).unwrap_or(ranked.len());
        let up = |m: &&&PeerAddr| self.members.is_up(m);
        let mut hops = Vec::new();
        if *via == Via::Client {
            hops.extend(ranked[..mine].iter().filter(up).map(|m| Hop {
                peer: (*m).clone(),
                mode: Mode::Fill,
            }));
        }
        let sender = match via {
            Via::Peer(p) => Some(&p.from),
            Via::Client => None,
        };
        let below = ranked.iter().skip(mine + 1).filter(up);
        hops.extend(
            below
                .filter(|m| Some(**m) != sender)
                .take(HELD_PROBES)
                .map(|m| Hop {
                    peer: (*m).clone(),
                    mode: Mode::Held,
                }),
        );
        hops
    }

    /// The hops as origins of a blob fill, in their order.
    pub fn peer_origins(&self, hops: &[Hop], asked: &Asked) -> Vec<Arc<dyn Origin>> {
        hops.iter()
            .map(|hop| {
                Arc::new(PeerOrigin::new(&self.client, hop.clone(), asked.clone()))
                    as Arc<dyn Origin>
            })
            .collect()
    }

    /// Count a fill this replica started.
    pub fn count_fill(&self, hops: &[Hop]) {
        let forwarded = hops.first().is_some_and(|h| h.mode == Mode::Fill);
        let role = if forwarded { "forwarded" } else { "owned" };
        self.metrics.cluster_fills.with_label_values(&[role]).inc();
    }

    pub fn client(&self) -> &PeerClient {
        &self.client
    }

    fn record_members(&self) {
        let (up, down) = self.members.counts();
        let gauge = &self.metrics.cluster_members;
        gauge.with_label_values(&["up"]).set(up as i64);
        gauge.with_label_values(&["down"]).set(down as i64);
    }

    /// One round of health checks: a signed `GET /v2/` to every other member.
    async fn check_health(&self) {
        let list = self.members.list();
        let checks = list.iter().filter(|m| *m != self.me()).map(|m| async move {
            let hop = Hop {
                peer: m.clone(),
                mode: Mode::Held,
            };
            let sent = self
                .client
                .send_uncounted(Method::GET, &hop, HEALTH_PATH, &[]);
            let up = matches!(tokio::time::timeout(HEALTH_TIMEOUT, sent).await, Ok(Ok(_)));
            if self.members.set_up(m, up) {
                if up {
                    info!(member = %m, "cluster member is up again");
                } else {
                    warn!(member = %m, "cluster member does not answer; skipped until it does");
                }
            }
        });
        futures_util::future::join_all(checks).await;
        self.record_members();
    }

    async fn refresh(&self, dns: &members::Dns) {
        match dns.resolve().await {
            Ok(found) => {
                let change = self.members.set(found, true);
                if !change.joined.is_empty() || !change.left.is_empty() {
                    info!(joined = ?change.joined.iter().map(PeerAddr::as_str).collect::<Vec<_>>(),
                          left = ?change.left.iter().map(PeerAddr::as_str).collect::<Vec<_>>(),
                          members = self.members.list().len(), "cluster members changed");
                }
                self.record_members();
            }
            Err(e) => {
                warn!(error = %e, "cluster.peers_dns: cannot resolve; keeping the members known")
            }
        }
    }
}

/// The loop of the cluster thread: DNS every `refresh_interval`, health every
/// `health_interval`, until the cluster is gone.
async fn keep_view(cluster: Weak<Cluster>, dns: Option<members::Dns>) {
    let Some(c) = cluster.upgrade() else { return };
    let (refresh, health) = (c.config.refresh_interval, c.config.health_interval);
    drop(c);
    let mut refresh_tick = tokio::time::interval(refresh);
    let mut health_tick = tokio::time::interval(health);
    loop {
        tokio::select! {
            _ = refresh_tick.tick(), if dns.is_some() => {
                let Some(c) = cluster.upgrade() else { return };
                c.refresh(dns.as_ref().expect("checked")).await;
            }
            _ = health_tick.tick() => {
                let Some(c) = cluster.upgrade() else { return };
                c.check_health().await;
            }
        }
    }
}
