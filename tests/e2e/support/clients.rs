//! Real registry clients with all their state in a temp dir: containerd + ctr, podman, dockerd.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::proc::Proc;
use super::skopeo::{CmdOut, run};
use super::wait_for;

fn tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap()
}

/// Empty directories a client creates at fixed paths outside our temp dirs (it has no option
/// for them): those that did not exist before are removed on drop (only if still empty).
struct Footprint(Vec<PathBuf>);

impl Footprint {
    /// `paths` deepest first.
    fn new(paths: &[&str]) -> Footprint {
        Footprint(
            paths
                .iter()
                .map(PathBuf::from)
                .filter(|p| !p.exists())
                .collect(),
        )
    }
}

impl Drop for Footprint {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_dir(p);
        }
    }
}

/// A containerd daemon of our own (no CRI), driven with `ctr`.
pub struct Containerd {
    pub sock: PathBuf,
    proc: Proc,
    dir: TempDir,
}

impl Containerd {
    pub fn start() -> Containerd {
        let dir = tempdir("e2e-containerd-");
        let d = dir.path();
        let sock = d.join("c.sock");
        let config = format!(
            "version = 2\n\
             root = \"{root}\"\n\
             state = \"{state}\"\n\
             temp = \"{tmp}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n\
             [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  address = \"\"\n  level = \"debug\"\n\
             [plugins]\n  [plugins.\"io.containerd.internal.v1.opt\"]\n    path = \"{opt}\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            tmp = d.join("tmp").display(),
            sock = sock.display(),
            opt = d.join("opt").display(),
        );
        std::fs::create_dir_all(d.join("tmp")).unwrap();
        let cfg = d.join("config.toml");
        std::fs::write(&cfg, config).unwrap();
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&cfg);
        let proc = Proc::spawn(
            "containerd",
            cmd,
            &d.join("containerd.log"),
            libc::SIGTERM,
            Duration::from_secs(15),
        );
        let mut c = Containerd { sock, proc, dir };
        wait_for(
            "containerd to answer `ctr version`",
            Duration::from_secs(60),
            || {
                c.proc.assert_running();
                c.ctr(&["version"], Duration::from_secs(10))
                    .success()
                    .then_some(())
            },
        );
        c
    }

    pub fn ctr(&self, args: &[&str], timeout: Duration) -> CmdOut {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.sock).args(args);
        run(cmd, timeout)
    }

    /// A hosts dir whose `docker.io/hosts.toml` sends pulls and resolves to `mirror` (host:port)
    /// over plain HTTP, with Docker Hub as the (pinned-to-loopback) server behind it.
    pub fn hosts_dir(&self, mirror: &str) -> PathBuf {
        let hd = self.dir.path().join("certs.d");
        std::fs::create_dir_all(hd.join("docker.io")).unwrap();
        std::fs::write(
            hd.join("docker.io/hosts.toml"),
            format!(
                "server = \"https://registry-1.docker.io\"\n\n\
                 [host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .unwrap();
        hd
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }
}

/// podman with its storage, configuration and registries.conf under a temp dir.
pub struct Podman {
    dir: TempDir,
    _footprint: Footprint,
}

impl Podman {
    /// `mirror` (host:port) is a plain-HTTP mirror of docker.io.
    pub fn new(mirror: &str) -> Podman {
        let dir = tempdir("e2e-podman-");
        let d = dir.path();
        std::fs::write(
            d.join("registries.conf"),
            format!(
                "unqualified-search-registries = [\"docker.io\"]\n\n\
                 [[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\n\
                 [[registry.mirror]]\nlocation = \"{mirror}\"\ninsecure = true\n"
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                d.join("graph").display(),
                d.join("run").display()
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("containers.conf"),
            format!(
                "[engine]\nevents_logger = \"file\"\nevents_logfile_path = \"{}\"\n\
                 cgroup_manager = \"cgroupfs\"\ntmp_dir = \"{}\"\nvolume_path = \"{}\"\n\
                 static_dir = \"{}\"\n\n[network]\nnetwork_config_dir = \"{}\"\n",
                d.join("events.log").display(),
                d.join("tmp").display(),
                d.join("volumes").display(),
                d.join("static").display(),
                d.join("netconf").display()
            ),
        )
        .unwrap();
        std::fs::write(d.join("auth.json"), "{}").unwrap();
        std::fs::create_dir_all(d.join("xdg")).unwrap();
        Podman {
            dir,
            _footprint: Footprint::new(&["/run/containers/networks", "/run/containers"]),
        }
    }

    pub fn podman(&self, args: &[&str], timeout: Duration) -> CmdOut {
        let d = self.dir.path();
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("REGISTRY_AUTH_FILE", d.join("auth.json"))
            .env("XDG_RUNTIME_DIR", d.join("xdg"))
            .arg("--root")
            .arg(d.join("graph"))
            .arg("--runroot")
            .arg(d.join("run"))
            .arg("--storage-driver")
            .arg("vfs")
            .args(args);
        run(cmd, timeout)
    }
}

/// dockerd with `--registry-mirror`, all state under a temp dir, driven with `docker -H`.
pub struct Dockerd {
    sock: PathBuf,
    proc: Proc,
    dir: TempDir,
    _footprint: Footprint,
}

impl Dockerd {
    pub fn start(mirror_url: &str) -> Dockerd {
        let dir = tempdir("e2e-dockerd-");
        let d = dir.path();
        let sock = d.join("docker.sock");
        let cfg = d.join("daemon.json");
        // The trust key would go to /etc/docker/key.json otherwise.
        std::fs::write(
            &cfg,
            serde_json::json!({"deprecated-key-path": d.join("key.json")}).to_string(),
        )
        .unwrap();
        let footprint = Footprint::new(&["/run/docker/plugins", "/run/docker"]);
        let mut cmd = Command::new("dockerd");
        cmd.arg(format!("--config-file={}", cfg.display()))
            .args([
                "--storage-driver=vfs",
                "--iptables=false",
                "--ip6tables=false",
            ])
            .args(["--bridge=none", "--ip-masq=false"])
            .arg(format!("--registry-mirror={mirror_url}"))
            .arg(format!("--data-root={}", d.join("data").display()))
            .arg(format!("--exec-root={}", d.join("exec").display()))
            .arg(format!("--pidfile={}", d.join("docker.pid").display()))
            .arg(format!("-H=unix://{}", sock.display()));
        let proc = Proc::spawn(
            "dockerd",
            cmd,
            &d.join("dockerd.log"),
            libc::SIGTERM,
            Duration::from_secs(30),
        );
        let mut dd = Dockerd {
            sock,
            proc,
            dir,
            _footprint: footprint,
        };
        wait_for(
            "dockerd to answer `docker version`",
            Duration::from_secs(90),
            || {
                dd.proc.assert_running();
                dd.docker(&["version"], Duration::from_secs(10))
                    .success()
                    .then_some(())
            },
        );
        dd
    }

    pub fn docker(&self, args: &[&str], timeout: Duration) -> CmdOut {
        let mut cmd = Command::new("docker");
        cmd.env("DOCKER_CONFIG", self.dir.path().join("client"))
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args(args);
        run(cmd, timeout)
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }
}
