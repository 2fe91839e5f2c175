//! The listening sockets `serve` accepts on, bound before the server starts: from the config's
//! `listen` / `admin_listen`, or handed over by a service manager (systemd's socket activation:
//! `LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`), or by a test that bound port 0.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::config::Config;

/// The first descriptor a service manager passes (after stdin, stdout and stderr).
const FIRST_PASSED_FD: RawFd = 3;

/// Already-bound listening sockets; the server serves exactly these.
#[derive(Debug)]
pub struct Listeners {
    /// The registry API (HTTPS when the config has `tls:`): at least one.
    pub registry: Vec<TcpListener>,
    /// The admin API (`/metrics`, `/healthz`, `/api/...`), when served.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// The sockets a service manager passed to this process, if it passed any, else the config's
    /// `listen` and `admin_listen` bound now.
    pub fn for_serve(config: &Config) -> anyhow::Result<Listeners> {
        match Listeners::from_service_manager()? {
            Some(passed) => Ok(passed),
            None => Listeners::bind(config),
        }
    }

    /// Binds `listen` and `admin_listen`. The error names the key and address, e.g.
    /// `listen: cannot listen on 0.0.0.0:5000: Address in use`, and for an address in use
    /// what commonly holds that port and how to choose another.
    pub fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let bind = |key: &str, addr: &str| {
            TcpListener::bind(addr)
                .and_then(with_full_backlog)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::AddrInUse => {
                        anyhow::anyhow!(
                            "{key}: cannot listen on {addr}: {e}; {}",
                            in_use(key, addr)
                        )
                    }
                    _ => anyhow::anyhow!("{key}: cannot listen on {addr}: {e}"),
                })
        };
        let registry = config
            .listen
            .iter()
            .map(|addr| bind("listen", addr))
            .collect::<anyhow::Result<_>>()?;
        let admin = match &config.admin_listen {
            Some(addr) => Some(bind("admin_listen", addr)?),
            None => None,
        };
        Ok(Listeners { registry, admin })
    }

    /// The sockets passed by socket activation: `LISTEN_PID` is this process, `LISTEN_FDS`
    /// counts descriptors from 3, and `LISTEN_FDNAMES` names each `registry` or `admin`.
    /// `None` when nothing was passed to this process.
    pub fn from_service_manager() -> anyhow::Result<Option<Listeners>> {
        let var = |name: &str| std::env::var(name).ok();
        let passed = activation(
            var("LISTEN_PID").as_deref(),
            var("LISTEN_FDS").as_deref(),
            var("LISTEN_FDNAMES").as_deref(),
        )?;
        let Some(names) = passed else { return Ok(None) };
        let mut listeners = Listeners {
            registry: Vec::new(),
            admin: None,
        };
        for (i, name) in names.iter().enumerate() {
            let fd = FIRST_PASSED_FD + i as RawFd;
            let listener = passed_listener(fd, name)?;
            match name.as_str() {
                "registry" => listeners.registry.push(listener),
                "admin" if listeners.admin.is_none() => listeners.admin = Some(listener),
                _ => anyhow::bail!("LISTEN_FDNAMES: a second socket named admin (fd {fd})"),
            }
        }
        if listeners.registry.is_empty() {
            anyhow::bail!("LISTEN_FDNAMES: no socket named registry among {names:?}");
        }
        Ok(Some(listeners))
    }

    /// The addresses the sockets are bound to, for the log.
    pub fn addresses(&self) -> (Vec<SocketAddr>, Option<SocketAddr>) {
        let addr = |l: &TcpListener| l.local_addr().ok();
        let registry = self.registry.iter().filter_map(addr).collect();
        (registry, self.admin.as_ref().and_then(addr))
    }
}

/// The names of the passed descriptors, checked; `None` when they are not for this process
/// (no `LISTEN_PID`, or another process's, as when a parent's variables were inherited).
fn activation(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
) -> anyhow::Result<Option<Vec<String>>> {
    if pid.and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        return Ok(None);
    }
    let count: usize = fds
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("LISTEN_FDS: {fds:?} is not a number of descriptors"))?;
    let names: Vec<String> = names
        .unwrap_or_default()
        .split(':')
        .map(str::to_string)
        .collect();
    if names.len() != count {
        anyhow::bail!("LISTEN_FDNAMES: {count} descriptors passed but names {names:?}");
    }
    if let Some(bad) = names
        .iter()
        .find(|n| !["registry", "admin"].contains(&n.as_str()))
    {
        anyhow::bail!("LISTEN_FDNAMES: {bad:?} is neither registry nor admin");
    }
    Ok(Some(names))
}

/// Takes the passed descriptor `fd` as a listening TCP socket (closed on exec, so helpers this
/// process runs do not inherit it).
fn passed_listener(fd: RawFd, name: &str) -> anyhow::Result<TcpListener> {
    let listening = sockopt(fd, libc::SO_ACCEPTCONN).map_err(|e| {
        anyhow::anyhow!("socket {name} (fd {fd}) was passed but is not usable: {e}")
    })?;
    if listening != 1 || sockopt(fd, libc::SO_TYPE).ok() != Some(libc::SOCK_STREAM) {
        anyhow::bail!("socket {name} (fd {fd}) is not a listening TCP socket");
    }
    // SAFETY: the service manager passed this descriptor to this process to own, and it is
    // taken once (each index of LISTEN_FDS maps to one name).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listener = TcpListener::from(owned);
    match listener.local_addr() {
        Ok(SocketAddr::V4(_) | SocketAddr::V6(_)) => {}
        Err(e) => anyhow::bail!("socket {name} (fd {fd}) is not a TCP socket: {e}"),
    }
    // SAFETY: fcntl on a descriptor this process owns.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        anyhow::bail!(
            "socket {name} (fd {fd}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(listener)
}

fn sockopt(fd: RawFd, option: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which has that size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    match rc {
        0 => Ok(value),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// What to do about `addr` (of the config key `key`) being in use: who commonly holds its port,
/// how to find out, and how to move dockside elsewhere.
fn in_use(key: &str, addr: &str) -> String {
    let port = addr.rsplit(':').next().unwrap_or(addr);
    let usual = match port {
        "5000" => {
            " (often Debian's docker-registry, which listens on :5000 by default: \
             `systemctl stop docker-registry`, or move one of the two)"
        }
        "9090" => " (often Prometheus, which listens on :9090 by default)",
        _ => "",
    };
    let other = match key {
        "admin_listen" => "127.0.0.1:9091",
        _ => "0.0.0.0:5001",
    };
    format!(
        "another process listens on port {port}{usual}; `ss -ltnp 'sport = :{port}'` names it. \
         To use another port, set `{key}` (e.g. {other:?}) in a config file and pass it with \
         --config (config/dockside.yaml is the default to start from)"
    )
}

/// std listens with a backlog of 128; pingora, binding itself, asks for 65535 (the kernel caps
/// it at `net.core.somaxconn`). A burst of connecting clients must not be refused because the
/// socket was bound here, so listen again with pingora's backlog (Linux updates it in place).
fn with_full_backlog(listener: TcpListener) -> std::io::Result<TcpListener> {
    use std::os::fd::AsRawFd;
    const BACKLOG: libc::c_int = 65535;
    // SAFETY: the descriptor is a bound, listening TCP socket owned by `listener`.
    if unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> String {
        std::process::id().to_string()
    }

    #[test]
    fn nothing_passed_to_this_process() {
        assert!(
            activation(None, Some("2"), Some("registry:admin"))
                .unwrap()
                .is_none()
        );
        let other = (std::process::id() + 1).to_string();
        assert!(
            activation(Some(&other), Some("1"), Some("registry"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn names_each_descriptor() {
        let names = activation(Some(&me()), Some("2"), Some("admin:registry")).unwrap();
        assert_eq!(names.unwrap(), ["admin", "registry"]);
    }

    #[test]
    fn refuses_what_it_cannot_place() {
        let err = |fds, names| activation(Some(&me()), fds, names).unwrap_err().to_string();
        assert!(err(Some("x"), Some("registry")).contains("LISTEN_FDS"));
        assert!(err(Some("2"), Some("registry")).contains("2 descriptors passed"));
        assert!(err(Some("1"), None).contains("\"\" is neither registry nor admin"));
        assert!(err(Some("1"), Some("web")).contains("\"web\" is neither"));
    }

    #[test]
    fn an_address_in_use_says_who_may_hold_it_and_how_to_move() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let yaml = format!(
            "listen: \"{addr}\"\ncache: {{dir: /nonexistent, max_size: 1GiB}}\n\
             upstreams: [{{name: docker.io, url: 'http://127.0.0.1:1'}}]\n"
        );
        let config = Config::from_yaml(&yaml, "test.yaml").unwrap();
        let err = Listeners::bind(&config).unwrap_err().to_string();
        let port = addr.port();
        for part in [
            format!("listen: cannot listen on {addr}: "),
            format!("another process listens on port {port}"),
            format!("ss -ltnp 'sport = :{port}'"),
            "set `listen`".to_string(),
            "--config".to_string(),
        ] {
            assert!(err.contains(&part), "{err:?} should contain {part:?}");
        }
        let hint = in_use("listen", "0.0.0.0:5000");
        assert!(hint.contains("Debian's docker-registry"), "{hint}");
        assert!(in_use("admin_listen", "127.0.0.1:9090").contains("Prometheus"));
        assert!(in_use("admin_listen", "127.0.0.1:9090").contains("set `admin_listen`"));
    }

    #[test]
    fn a_passed_descriptor_must_be_a_listening_tcp_socket() {
        use std::os::fd::{AsRawFd, IntoRawFd};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let taken = passed_listener(listener.into_raw_fd(), "registry").unwrap();
        assert_eq!(taken.local_addr().unwrap(), addr);
        // SAFETY: fcntl F_GETFD on a descriptor `taken` owns.
        let flags = unsafe { libc::fcntl(taken.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);

        let connected = std::net::TcpStream::connect(addr).unwrap();
        let err = passed_listener(connected.as_raw_fd(), "admin").unwrap_err();
        assert!(
            err.to_string().contains("is not a listening TCP socket"),
            "{err}"
        );
    }
}
