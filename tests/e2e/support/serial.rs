//! Serialization of the heavy tests, and the /etc/hosts pin that keeps Docker Hub names on
//! loopback while a real client runs.

use std::sync::{Mutex, MutexGuard};

static HEAVY: Mutex<()> = Mutex::new(());

/// Held by tests that start daemons or measure time: one of them at a time in this process.
pub fn heavy() -> MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

const HOSTS: &str = "/etc/hosts";
const MARK: &str = "# dockside-e2e pin";
/// Names containerd, podman and dockerd fall back to when a mirror fails: Docker Hub's, and
/// quay.io, which the client tests use as a second upstream.
pub const HUB_NAMES: &[&str] = &[
    "quay.io",
    "docker.io",
    "registry-1.docker.io",
    "index.docker.io",
    "auth.docker.io",
    "registry.docker.io",
    "production.cloudflare.docker.com",
];

/// Holds the heavy lock and pins Docker Hub's names (and quay.io) to 127.0.0.1; restores /etc/hosts on drop
/// (also while unwinding from a panic).
pub struct HostsPin {
    original: String,
    _lock: MutexGuard<'static, ()>,
}

impl HostsPin {
    pub fn new() -> HostsPin {
        super::tools::require_root("pinning Docker Hub's names to 127.0.0.1 in /etc/hosts");
        let lock = heavy();
        let current = std::fs::read_to_string(HOSTS).expect("read /etc/hosts");
        // A run that was killed may have left its pin behind: never treat it as original.
        let original: String = if current.contains(MARK) {
            current
                .lines()
                .filter(|l| !l.contains(MARK))
                .map(|l| format!("{l}\n"))
                .collect()
        } else {
            current
        };
        let sep = if original.is_empty() || original.ends_with('\n') {
            ""
        } else {
            "\n"
        };
        let pinned = format!("{original}{sep}127.0.0.1 {} {MARK}\n", HUB_NAMES.join(" "));
        std::fs::write(HOSTS, pinned).expect("write /etc/hosts (tests need root)");
        HostsPin {
            original,
            _lock: lock,
        }
    }
}

impl Drop for HostsPin {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(HOSTS, &self.original) {
            eprintln!("could not restore /etc/hosts: {e}");
        }
    }
}
