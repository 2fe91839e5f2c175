//! Several real dockside processes acting as one cache: every member's listeners are bound
//! first, so each config can list all of them, then each process is started on its own.

use std::io::Write;

use tempfile::TempDir;

use super::dockside::{Config, Dockside, Listeners};

/// The shared secret every member of a test cluster signs with.
pub const SECRET: &str = "e2e-cluster-secret-0123456789abcdef";

pub struct Cluster {
    pub members: Vec<Dockside>,
    secret: TempDir,
}

impl Cluster {
    /// `n` members, each with `cfg` plus a `cluster:` section listing all of them.
    pub fn start(cfg: &Config, n: usize) -> Cluster {
        let secret = secret_dir(SECRET);
        let listeners: Vec<Listeners> = (0..n).map(|_| Listeners::bind()).collect();
        let peers: Vec<String> = listeners
            .iter()
            .map(|l| format!("127.0.0.1:{}", l.port()))
            .collect();
        let members = listeners
            .into_iter()
            .map(|l| {
                let me = format!("127.0.0.1:{}", l.port());
                start_member(cfg, &me, &peers, &secret, l)
            })
            .collect();
        Cluster { members, secret }
    }

    /// A new member that lists the others and itself; the others keep their lists (as members
    /// whose DNS answer has not changed yet).
    pub fn join(&self, cfg: &Config) -> Dockside {
        let l = Listeners::bind();
        let me = format!("127.0.0.1:{}", l.port());
        let mut peers: Vec<String> = self.members.iter().map(Dockside::host).collect();
        peers.push(me.clone());
        start_member(cfg, &me, &peers, &self.secret, l)
    }

    /// The sum of one series over the members.
    pub fn metric_sum(&self, series: &str) -> f64 {
        self.members
            .iter()
            .map(|d| d.metric(series).unwrap_or(0.0))
            .sum()
    }
}

/// A directory holding `cluster-secret` with `text`.
pub fn secret_dir(text: &str) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("e2e-cluster-")
        .tempdir()
        .expect("tempdir");
    let mut f = std::fs::File::create(dir.path().join("cluster-secret")).expect("secret file");
    writeln!(f, "{text}").expect("write secret");
    dir
}

/// The `cluster:` section for one member.
pub fn cluster_yaml(me: &str, peers: &[String], secret: &TempDir) -> String {
    let list: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "cluster:\n  advertise: \"{me}\"\n  peers: [{}]\n  secret_file: \"{}\"\n  health_interval: 1s\n",
        list.join(", "),
        secret.path().join("cluster-secret").display()
    )
}

fn start_member(
    cfg: &Config,
    me: &str,
    peers: &[String],
    secret: &TempDir,
    listeners: Listeners,
) -> Dockside {
    let mut cfg = cfg.clone();
    cfg.extra_yaml += &cluster_yaml(me, peers, secret);
    let dir = tempfile::Builder::new()
        .prefix("e2e-member-")
        .tempdir()
        .expect("tempdir");
    Dockside::start_on(&cfg, dir, listeners)
}
