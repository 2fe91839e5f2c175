//! Debian's docker-registry (CNCF distribution 2.8) as the upstream, on a port it picks, with
//! its access log.

use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;

use super::certs::Ca;
use super::proc::Proc;
use super::token::{self, TokenServer};
use super::tools;
use super::wait_for;

pub const USER: &str = "e2e-user";
pub const PASSWORD: &str = "e2e-secret-pw";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    None,
    /// `auth: htpasswd` with a bcrypt file (`htpasswd -Bbn`).
    Basic,
    /// `auth: token` with our own token server.
    Token,
}

/// One line of the registry's access log (combined log format).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLine {
    pub method: String,
    pub uri: String,
    pub status: u16,
}

pub struct Registry {
    pub port: u16,
    /// For a registry serving TLS: the CA certificate (PEM) that signed its certificate.
    pub ca_pem: Option<PathBuf>,
    pub auth: Auth,
    pub token: Option<TokenServer>,
    /// The one user the registry (or its token server) accepts, and its password.
    pub user: String,
    pub password: String,
    proc: Proc,
    frozen: bool,
    _dir: TempDir,
}

impl Registry {
    pub fn start(auth: Auth) -> Registry {
        Registry::launch(auth, false, USER, PASSWORD)
    }

    /// A registry that accepts `user` / `password` (htpasswd, or at its token server).
    pub fn start_as(auth: Auth, user: &str, password: &str) -> Registry {
        Registry::launch(auth, false, user, password)
    }

    /// A registry serving HTTPS with a certificate for 127.0.0.1 from a CA of its own.
    pub fn start_tls(auth: Auth) -> Registry {
        Registry::launch(auth, true, USER, PASSWORD)
    }

    fn launch(auth: Auth, tls: bool, user: &str, password: &str) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("e2e-upstream-")
            .tempdir()
            .expect("tempdir");
        let store = dir.path().join("storage");
        let (auth_yaml, token) = match auth {
            Auth::None => (String::new(), None),
            Auth::Basic => {
                let out = tools::command("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .expect("run htpasswd (package apache2-utils)");
                assert!(out.status.success(), "htpasswd failed");
                let file = dir.path().join("htpasswd");
                std::fs::write(&file, &out.stdout).unwrap();
                (
                    format!(
                        "auth:\n  htpasswd:\n    realm: dockside-e2e\n    path: {}\n",
                        file.display()
                    ),
                    None,
                )
            }
            Auth::Token => {
                let ts = TokenServer::start(dir.path(), user, password);
                (
                    format!(
                        "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                        ts.realm(),
                        token::SERVICE,
                        token::ISSUER,
                        ts.cert_pem.display()
                    ),
                    Some(ts),
                )
            }
        };
        let (tls_yaml, ca_pem) = if tls {
            let ca = Ca::new(dir.path());
            let (cert, key) = ca.issue("server", "127.0.0.1");
            (
                format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    cert.display(),
                    key.display()
                ),
                Some(ca.pem),
            )
        } else {
            (String::new(), None)
        };
        // Port 0: the registry binds a free port itself and logs it (at level info), so nothing
        // can take the port between choosing and binding it.
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:0\n  secret: dockside-e2e-secret\n{tls_yaml}\
             {auth_yaml}",
            store.display()
        );
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, config).unwrap();
        let mut cmd = tools::command("docker-registry");
        cmd.arg("serve").arg(&cfg_path);
        let log = dir.path().join("registry.log");
        let mut proc = Proc::spawn(
            "docker-registry",
            cmd,
            &log,
            libc::SIGTERM,
            Duration::from_secs(5),
        );
        let mut port = None;
        let listening = || {
            port = listening_port(&super::read_lossy(&log));
            port.is_some()
        };
        if let Err(log) = proc.wait_ready("docker-registry to log its address", listening) {
            panic!(
                "docker-registry exited early; log:\n{}",
                super::tail(&log, 30)
            );
        }
        let port = port.expect("logged port");
        let scheme = if tls { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{port}/v2/");
        // 200 without auth, 401 with it: either way it is serving.
        let ready = || super::http::get(&url).is_ok_and(|r| r.status == 200 || r.status == 401);
        if let Err(log) = proc.wait_ready("docker-registry to answer /v2/", ready) {
            panic!(
                "docker-registry exited early; log:\n{}",
                super::tail(&log, 30)
            );
        }
        Registry {
            port,
            ca_pem,
            auth,
            token,
            user: user.to_string(),
            password: password.to_string(),
            proc,
            frozen: false,
            _dir: dir,
        }
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.host())
    }

    /// `user:password` for skopeo's `--*-creds`, if this registry needs auth.
    pub fn creds(&self) -> Option<String> {
        (self.auth != Auth::None).then(|| format!("{}:{}", self.user, self.password))
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// The access log so far. First makes a marker request straight to the registry and waits
    /// until it is logged, so every request answered before this call is in the result.
    /// The marker requests themselves are left out.
    pub fn access_log(&self) -> Vec<AccessLine> {
        let marker = format!("/v2/?e2e-marker={}", super::nonce());
        super::http::get(&format!("{}{marker}", self.url())).expect("marker request to upstream");
        let needle = format!(" {marker} ");
        wait_for(
            "the upstream access log to catch up",
            Duration::from_secs(10),
            || self.log().contains(&needle).then_some(()),
        );
        parse_access_log(&self.log())
            .into_iter()
            .filter(|l| !l.uri.contains("e2e-marker="))
            .collect()
    }

    /// Uploads `data` as a blob of `repo` with the registry API (monolithic POST + PUT; plain
    /// registries only) and returns its digest. Faster than skopeo for big blobs.
    pub fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        assert_eq!(self.auth, Auth::None, "push_blob is for plain registries");
        let digest = super::digest_of(data);
        let r = super::http::request(
            "POST",
            &format!("{}/v2/{repo}/blobs/uploads/", self.url()),
            &[],
            None,
        )
        .expect("start upload");
        assert_eq!(r.status, 202, "upload start: {}", r.text());
        let loc = r.header("location").expect("upload Location");
        let loc = if loc.starts_with('/') {
            format!("{}{loc}", self.url())
        } else {
            loc
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = super::http::request(
            "PUT",
            &format!("{loc}{sep}digest={digest}"),
            &[("Content-Type", "application/octet-stream")],
            Some(data.to_vec()),
        )
        .expect("finish upload");
        assert_eq!(r.status, 201, "upload finish: {}", r.text());
        digest
    }

    /// Freezes the registry (SIGSTOP): connections are accepted by the kernel but never
    /// answered, like a hung upstream. [`Registry::thaw`] undoes it; so does drop.
    pub fn freeze(&mut self) {
        self.proc.signal(libc::SIGSTOP);
        self.frozen = true;
    }

    pub fn thaw(&mut self) {
        self.proc.signal(libc::SIGCONT);
        self.frozen = false;
    }

    /// Kills the registry (SIGKILL): the upstream is gone from now on.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

/// The port in distribution's `msg="listening on 127.0.0.1:PORT"` (`, tls` follows with TLS).
fn listening_port(log: &str) -> Option<u16> {
    let rest = log.split("msg=\"listening on 127.0.0.1:").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Parses the combined-log-format lines (`... "GET /v2/x HTTP/1.1" 200 2 "" "ua"`).
pub fn parse_access_log(log: &str) -> Vec<AccessLine> {
    log.lines()
        .filter_map(|line| {
            let start = line.find("] \"")? + 3;
            let rest = &line[start..];
            let end = rest.find('"')?;
            let mut req = rest[..end].split(' ');
            let method = req.next()?.to_string();
            let uri = req.next()?.to_string();
            let proto = req.next()?;
            if !proto.starts_with("HTTP/") {
                return None;
            }
            let status = rest[end + 1..].split_whitespace().next()?.parse().ok()?;
            Some(AccessLine {
                method,
                uri,
                status,
            })
        })
        .collect()
}

/// Counts access-log lines with `method` whose path (query ignored) is `path`.
pub fn count(lines: &[AccessLine], method: &str, path: &str) -> usize {
    lines
        .iter()
        .filter(|l| l.method == method && l.uri.split('?').next() == Some(path))
        .count()
}

impl Drop for Registry {
    fn drop(&mut self) {
        if self.frozen {
            self.thaw();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- upstream registry {} log tail ---\n{}",
                self.host(),
                super::tail(&self.log(), 25)
            );
        }
    }
}
