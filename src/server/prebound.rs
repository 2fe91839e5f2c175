//! Serving on sockets bound before pingora starts. pingora's listeners look an address up in
//! the server's table of listening descriptors before binding it themselves; the table is also
//! where a graceful upgrade puts the old process's sockets, and what it hands to the next
//! process. A socket put there under the address a service listens on is served as if pingora
//! had bound it, and is handed over on upgrade like one.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{IntoRawFd, OwnedFd};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::{ListenFds, RuntimeOpts, ShutdownWatch};
use pingora::services::{ServiceReadyNotifier, ServiceWithDependents};

use crate::config::Config;
use crate::listeners::Listeners;

/// The addresses one service listens on, with the sockets already bound for them (none on
/// `serve --upgrade`: the old process's arrive in the table).
pub struct Endpoints {
    keys: Vec<String>,
    sockets: Vec<(String, OwnedFd)>,
}

/// The registry's endpoints and the admin API's, from `listeners` or, on upgrade (`None`), from
/// the config's addresses.
pub fn endpoints(
    config: &Config,
    listeners: Option<Listeners>,
) -> std::io::Result<(Endpoints, Option<Endpoints>)> {
    let admin_config = config.admin_listen.as_slice();
    let Some(listeners) = listeners else {
        let admin = config
            .admin_listen
            .is_some()
            .then(|| Endpoints::inherited(admin_config));
        return Ok((Endpoints::inherited(&config.listen), admin));
    };
    let registry = Endpoints::bound(&config.listen, listeners.registry)?;
    let admin = match listeners.admin {
        Some(admin) => Some(Endpoints::bound(admin_config, vec![admin])?),
        None => None,
    };
    Ok((registry, admin))
}

impl Endpoints {
    fn inherited(addresses: &[String]) -> Endpoints {
        Endpoints {
            keys: addresses.to_vec(),
            sockets: Vec::new(),
        }
    }

    fn bound(configured: &[String], listeners: Vec<TcpListener>) -> std::io::Result<Endpoints> {
        let mut sockets = Vec::new();
        for listener in listeners {
            // pingora's accept loop runs on tokio, which needs non-blocking sockets.
            listener.set_nonblocking(true)?;
            let key = table_key(configured, listener.local_addr()?);
            sockets.push((key, OwnedFd::from(listener)));
        }
        let keys = sockets.iter().map(|(key, _)| key.clone()).collect();
        Ok(Endpoints { keys, sockets })
    }

    /// The addresses to give the service's `add_tcp` / `add_tls_with_settings`.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// `service`, started on these endpoints' sockets.
    pub fn serve<S>(self, service: S) -> Prebound<S> {
        Prebound {
            inner: service,
            sockets: self.sockets,
        }
    }
}

/// The key of a socket bound to `local`: the config's spelling of that address when it lists it,
/// so that `serve --upgrade`, which looks the config's addresses up, finds the socket (and a
/// server of an older version, which keyed by the config too, can take it over).
fn table_key(configured: &[String], local: SocketAddr) -> String {
    configured
        .iter()
        .find(|addr| addr.parse::<SocketAddr>().ok() == Some(local))
        .cloned()
        .unwrap_or_else(|| local.to_string())
}

/// A pingora service that first puts its pre-bound sockets into the descriptor table.
pub struct Prebound<S> {
    inner: S,
    sockets: Vec<(String, OwnedFd)>,
}

#[async_trait]
impl<S: ServiceWithDependents> ServiceWithDependents for Prebound<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
        ready_notifier: ServiceReadyNotifier,
    ) {
        if let Some(table) = &fds {
            let mut table = table.lock();
            for (key, socket) in self.sockets.drain(..) {
                // The listener pingora builds from the table owns the descriptor from now on.
                table.add(key, socket.into_raw_fd());
            }
        }
        let inner = &mut self.inner;
        inner
            .start_service(fds, shutdown, listeners_per_fd, ready_notifier)
            .await
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn runtime_opts_override(&self, global: &RuntimeOpts) -> Option<RuntimeOpts> {
        self.inner.runtime_opts_override(global)
    }

    fn on_startup_delay(&self, time_waited: Duration) {
        self.inner.on_startup_delay(time_waited)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_by_the_configs_spelling_of_the_address() {
        let configured = ["0.0.0.0:5000".to_string(), "[::1]:05000".to_string()];
        let v6: SocketAddr = "[::1]:5000".parse().unwrap();
        assert_eq!(table_key(&configured, v6), "[::1]:05000");
        let elsewhere: SocketAddr = "127.0.0.1:41234".parse().unwrap();
        assert_eq!(table_key(&configured, elsewhere), "127.0.0.1:41234");
    }
}
