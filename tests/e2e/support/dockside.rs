//! The real `dockside` binary: a generated config, `serve` on listeners this test bound (socket
//! activation), readiness, SIGINT on drop.

use std::ffi::CString;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use tempfile::TempDir;

use super::proc::Proc;
use super::registry::Registry;

pub const BIN: &str = env!("CARGO_BIN_EXE_dockside");

/// One `upstreams:` entry.
#[derive(Clone, Debug, Default)]
pub struct Upstream {
    pub name: String,
    pub url: String,
    pub aliases: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tag_ttl: Option<String>,
    /// `timeouts: { ... }` as flow YAML, e.g. `{ connect: 1s, first_byte: 2s, idle: 2s }`.
    pub timeouts: Option<String>,
    /// An extra CA (PEM file) to trust for this upstream.
    pub ca_file: Option<String>,
    /// More URLs after `url`: written as `urls: [url, ...]`.
    pub more_urls: Vec<String>,
    /// Appended to the entry as is, e.g. `    retries: 0\n`.
    pub extra_yaml: String,
}

impl Upstream {
    /// An upstream named `name` for `reg`, with its credentials if it needs any.
    pub fn new(name: &str, reg: &Registry) -> Upstream {
        let auth = reg.creds().is_some();
        Upstream {
            name: name.to_string(),
            url: reg.url(),
            username: auth.then(|| reg.user.clone()),
            password: auth.then(|| reg.password.clone()),
            ..Default::default()
        }
    }

    /// Docker Hub's usual aliases.
    pub fn hub(reg: &Registry) -> Upstream {
        Upstream {
            aliases: vec!["index.docker.io".into(), "registry-1.docker.io".into()],
            ..Upstream::new("docker.io", reg)
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub upstreams: Vec<Upstream>,
    pub default_upstream: Option<String>,
    pub tag_ttl: String,
    pub max_size: String,
    /// Top-level `offline:`.
    pub offline: bool,
    /// `cache.pin` entries.
    pub pin: Vec<String>,
    /// Appended as is: top-level keys the fields above do not cover (e.g. `client_auth:`).
    pub extra_yaml: String,
    /// `tls:` with these (cert, key) files: the listener serves HTTPS. The files are re-read
    /// every second, so reload tests need not wait long.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Environment variables for the dockside process.
    pub env: Vec<(String, String)>,
    /// Run `serve` without `--config`, in the temp dir: the built-in default config, with the
    /// listeners passed as always (the fields above are then unused).
    pub builtin: bool,
    /// More keys under `cache:` (2-space indent), e.g. `shared:`.
    pub cache_yaml: String,
}

impl Config {
    pub fn new(upstreams: Vec<Upstream>) -> Config {
        let default_upstream = upstreams.first().map(|u| u.name.clone());
        Config {
            upstreams,
            default_upstream,
            tag_ttl: "5m".into(),
            max_size: "10GiB".into(),
            offline: false,
            pin: Vec::new(),
            extra_yaml: String::new(),
            tls: None,
            env: Vec::new(),
            builtin: false,
            cache_yaml: String::new(),
        }
    }

    /// The built-in default config (`serve` without `--config`).
    pub fn builtin() -> Config {
        Config {
            builtin: true,
            ..Config::new(Vec::new())
        }
    }

    pub fn tag_ttl(mut self, ttl: &str) -> Config {
        self.tag_ttl = ttl.into();
        self
    }

    pub fn default_upstream(mut self, name: Option<&str>) -> Config {
        self.default_upstream = name.map(str::to_string);
        self
    }

    /// The YAML text for the given ports and cache directory.
    pub fn yaml(&self, port: u16, admin_port: u16, cache: &Path) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap();
        let mut y = format!(
            "listen: \"127.0.0.1:{port}\"\n\
             admin_listen: \"127.0.0.1:{admin_port}\"\n\
             grace_period: 1s\n\
             cache:\n  dir: {}\n  max_size: {}\n  tag_ttl: {}\n\
             upstreams:\n",
            q(&cache.display().to_string()),
            self.max_size,
            self.tag_ttl
        );
        y = y.replace("upstreams:\n", &format!("{}upstreams:\n", self.cache_yaml));
        if !self.pin.is_empty() {
            y = y.replace(
                "upstreams:\n",
                &format!(
                    "  pin: {}\nupstreams:\n",
                    serde_json::to_string(&self.pin).unwrap()
                ),
            );
        }
        if self.offline {
            y.insert_str(0, "offline: true\n");
        }
        for u in &self.upstreams {
            y += &format!("  - name: {}\n", q(&u.name));
            if u.more_urls.is_empty() {
                y += &format!("    url: {}\n", q(&u.url));
            } else {
                let urls: Vec<String> = std::iter::once(&u.url)
                    .chain(&u.more_urls)
                    .map(|url| q(url))
                    .collect();
                y += &format!("    urls: [{}]\n", urls.join(", "));
            }
            y += &u.extra_yaml;
            if !u.aliases.is_empty() {
                let a: Vec<String> = u.aliases.iter().map(|a| q(a)).collect();
                y += &format!("    aliases: [{}]\n", a.join(", "));
            }
            if let Some(v) = &u.username {
                y += &format!("    username: {}\n", q(v));
            }
            if let Some(v) = &u.password {
                y += &format!("    password: {}\n", q(v));
            }
            if let Some(v) = &u.tag_ttl {
                y += &format!("    tag_ttl: {v}\n");
            }
            if let Some(v) = &u.timeouts {
                y += &format!("    timeouts: {v}\n");
            }
            if let Some(v) = &u.ca_file {
                y += &format!("    ca_file: {}\n", q(v));
            }
        }
        if let Some(d) = &self.default_upstream {
            y += &format!("default_upstream: {}\n", q(d));
        }
        if let Some((cert, key)) = &self.tls {
            let (cert, key) = (cert.display().to_string(), key.display().to_string());
            y += &format!(
                "tls:\n  cert_file: {}\n  key_file: {}\n  reload_interval: 1s\n",
                q(&cert),
                q(&key)
            );
        }
        y + &self.extra_yaml
    }
}

/// A registry and an admin listener, bound to port 0 on loopback by this test process.
pub struct Listeners {
    pub registry: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub fn bind() -> Listeners {
        let bind = || TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        Listeners {
            registry: bind(),
            admin: bind(),
        }
    }

    pub fn port(&self) -> u16 {
        self.registry.local_addr().expect("local_addr").port()
    }

    pub fn admin_port(&self) -> u16 {
        self.admin.local_addr().expect("local_addr").port()
    }
}

pub struct Dockside {
    /// `http` or `https` (with `tls`).
    scheme: &'static str,
    pub port: u16,
    pub admin_port: u16,
    proc: Proc,
    /// Config, log and cache; `None` only once handed on by [`Dockside::into_dir`].
    dir: Option<TempDir>,
}

impl Dockside {
    /// Starts `dockside serve` with `cfg` and waits until `/healthz` on the admin port and `/v2/`
    /// on the listener answer.
    pub fn start(cfg: &Config) -> Dockside {
        let dir = tempfile::Builder::new()
            .prefix("e2e-dockside-")
            .tempdir()
            .expect("tempdir");
        Dockside::start_in(cfg, dir)
    }

    /// Like [`Dockside::start`], in `dir` (its `cache/` may hold an earlier run's cache).
    ///
    /// This test binds both listeners on port 0 and passes them to dockside by socket
    /// activation (as systemd does), so the ports are known before dockside starts and nothing
    /// else can take them.
    pub fn start_in(cfg: &Config, dir: TempDir) -> Dockside {
        Dockside::start_on(cfg, dir, Listeners::bind())
    }

    /// Like [`Dockside::start_in`], on listeners bound beforehand (so that a cluster's members
    /// know each other's ports before any starts).
    pub fn start_on(cfg: &Config, dir: TempDir, listeners: Listeners) -> Dockside {
        let runs = std::fs::read_dir(dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let (port, admin_port) = (listeners.port(), listeners.admin_port());
        let Listeners { registry, admin } = listeners;
        let mut cmd = Command::new(BIN);
        cmd.arg("serve");
        if cfg.builtin {
            // Its cache is ./dockside-cache.
            cmd.current_dir(dir.path());
        } else {
            let cfg_path = dir.path().join("dockside.yaml");
            // The config names the same addresses: `serve --upgrade` and `client-config` read
            // them.
            std::fs::write(
                &cfg_path,
                cfg.yaml(port, admin_port, &dir.path().join("cache")),
            )
            .unwrap();
            cmd.arg("--config").arg(&cfg_path);
        }
        let log_level = std::env::var("E2E_DOCKSIDE_LOG").unwrap_or_else(|_| "info".into());
        let mut env = cfg.env.clone();
        env.push(("NO_COLOR".into(), "1".into()));
        env.push(("RUST_LOG".into(), log_level));
        pass_listeners(&mut cmd, &registry, &admin, &env);
        let mut proc = Proc::spawn(
            "dockside",
            cmd,
            &dir.path().join(format!("dockside-{runs}.log")),
            libc::SIGINT,
            Duration::from_secs(20),
        );
        // The child has its own copies; the ports stay dockside's until it exits.
        drop((registry, admin));
        let health = format!("http://127.0.0.1:{admin_port}/healthz");
        let scheme = if cfg.tls.is_some() { "https" } else { "http" };
        let v2 = format!("{scheme}://127.0.0.1:{port}/v2/");
        let ok = |u: &str| super::http::get(u).is_ok_and(|r| r.status == 200);
        // 401 too: with client_auth, /v2/ asks for credentials.
        let answers = |u: &str| super::http::get(u).is_ok_and(|r| [200, 401].contains(&r.status));
        if let Err(log) =
            proc.wait_ready("dockside /healthz and /v2/", || ok(&health) && answers(&v2))
        {
            panic!("dockside exited early; log:\n{}", super::tail(&log, 40));
        }
        Dockside {
            scheme,
            port,
            admin_port,
            proc,
            dir: Some(dir),
        }
    }

    /// `127.0.0.1:PORT` of the registry listener.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.host())
    }

    /// Panics (with the log tail) if the process has exited.
    pub fn assert_running(&mut self) {
        self.proc.assert_running();
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// The value of one series from `/metrics`, given as printed: name and labels.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let text = super::http::get(&format!("{}/metrics", self.admin_url()))
            .expect("GET /metrics")
            .text();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// The config file `serve` runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.as_ref().expect("dir").path().join("dockside.yaml")
    }

    /// `dockside client-config --for <client>` for this instance's config and URL, writing the
    /// files under `out` the way an operator would (`--out /etc/containerd`).
    pub fn client_config(&self, client: &str, out: &Path) {
        let result = Command::new(BIN)
            .args(["client-config", "--for", client, "--mirror", &self.url()])
            .arg("--config")
            .arg(self.config_path())
            .arg("--out")
            .arg(out)
            .output()
            .expect("run dockside client-config");
        assert!(
            result.status.success(),
            "dockside client-config --for {client}: {}",
            String::from_utf8_lossy(&result.stderr)
        );
    }

    /// The directory `serve` runs with: its config, logs and cache.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir").path()
    }

    /// The cache directory (`cache.dir`).
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.as_ref().expect("dir").path().join("cache")
    }

    /// Stops dockside (SIGINT) and hands over its directory, cache included, for a restart.
    pub fn into_dir(mut self) -> TempDir {
        let (status, in_time) = self.stop();
        assert!(in_time, "dockside did not stop on SIGINT");
        assert!(status.success(), "dockside exit status {status}");
        self.dir.take().expect("dir")
    }

    /// SIGKILL, as a crash or the OOM killer would, and hand over the directory.
    pub fn crash(mut self) -> TempDir {
        self.proc.kill();
        self.dir.take().expect("dir")
    }

    /// `serve --upgrade` on this instance's config: the new process waits for the listeners,
    /// then this one is sent SIGQUIT to hand them over. Returns the new process once it has
    /// logged that it waits; the caller sends the SIGQUIT (see [`Dockside::signal`]).
    pub fn start_upgrade(&self) -> Dockside {
        let dir = self.dir.as_ref().expect("dir").path();
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--upgrade", "--config"])
            .arg(self.config_path())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info");
        let mut proc = Proc::spawn(
            "dockside --upgrade",
            cmd,
            &dir.join("dockside-upgrade.log"),
            libc::SIGINT,
            Duration::from_secs(20),
        );
        let waiting = dir.join("dockside-upgrade.log");
        if let Err(log) = proc.wait_ready("dockside --upgrade waiting for listeners", || {
            super::read_lossy(&waiting).contains("waiting up to 5 s")
        }) {
            panic!(
                "dockside --upgrade exited early; log:\n{}",
                super::tail(&log, 40)
            );
        }
        Dockside {
            scheme: self.scheme,
            port: self.port,
            admin_port: self.admin_port,
            proc,
            dir: None,
        }
    }

    pub fn signal(&self, sig: i32) {
        self.proc.signal(sig);
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.wait_timeout(timeout)
    }

    /// SIGINT, then wait (up to 20 s). Returns the status and whether it exited in time.
    pub fn stop(&mut self) -> (ExitStatus, bool) {
        self.proc.stop()
    }
}

impl Drop for Dockside {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- dockside {} log tail ---\n{}",
                self.host(),
                super::tail(&self.log(), 40)
            );
        }
    }
}

/// Hands `registry` and `admin` to the child as systemd's socket activation does: descriptors 3
/// and 4 (inherited, not closed on exec), `LISTEN_FDS=2`, `LISTEN_FDNAMES=registry:admin`, and
/// `LISTEN_PID` set to the child's own PID, which only the child knows. The child's environment
/// is `env` on top of this process's.
///
/// Every variable is set in the child with setenv: `Command::env` would make std replace the
/// environment after `pre_exec`, dropping `LISTEN_PID`.
fn pass_listeners(
    cmd: &mut Command,
    registry: &TcpListener,
    admin: &TcpListener,
    env: &[(String, String)],
) {
    assert!(
        cmd.get_envs().next().is_none(),
        "set variables through `env`"
    );
    let c = |s: &str| CString::new(s).expect("no NUL in a variable");
    let mut vars: Vec<(CString, CString)> = env.iter().map(|(k, v)| (c(k), c(v))).collect();
    vars.push((c("LISTEN_FDS"), c("2")));
    vars.push((c("LISTEN_FDNAMES"), c("registry:admin")));
    let (registry, admin) = (registry.as_raw_fd(), admin.as_raw_fd());
    // SAFETY: the closure runs in the forked child before exec, using dup/fcntl/getpid and
    // glibc's setenv (glibc's fork leaves its allocator usable in the child), on descriptors the
    // parent keeps open until spawn returns and strings allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // Copies above 10 first, so that placing one on 3 cannot close the other.
            let high = [dup_above(registry, 10)?, dup_above(admin, 10)?];
            for (target, fd) in [(3, high[0]), (4, high[1])] {
                check(libc::dup2(fd, target))?;
                check(libc::fcntl(target, libc::F_SETFD, 0))?;
            }
            for (key, value) in &vars {
                check(libc::setenv(key.as_ptr(), value.as_ptr(), 1))?;
            }
            let mut pid = [0u8; 16];
            let pid = decimal(libc::getpid() as u32, &mut pid);
            check(libc::setenv(c"LISTEN_PID".as_ptr(), pid.as_ptr(), 1))?;
            Ok(())
        });
    }
}

/// A duplicate of `fd` numbered at least `min`, closed on exec.
fn dup_above(fd: RawFd, min: RawFd) -> std::io::Result<RawFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an open descriptor.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
    check(dup).map(|_| dup)
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    match rc {
        -1 => Err(std::io::Error::last_os_error()),
        _ => Ok(()),
    }
}

/// `n` in decimal as a NUL-terminated string in `buf`, without allocating (for `pre_exec`).
fn decimal(mut n: u32, buf: &mut [u8; 16]) -> &std::ffi::CStr {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[i] = digits[len - 1 - i];
    }
    buf[len] = 0;
    std::ffi::CStr::from_bytes_with_nul(&buf[..=len]).expect("one NUL, at the end")
}
