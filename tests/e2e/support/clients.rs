//! Real registry clients with all their state in a temp dir: containerd + ctr, podman, dockerd,
//! each configured by `dockside client-config` or a shipped example from `deploy/clients/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use super::dockside::Dockside;
use super::proc::Proc;
use super::skopeo::{CmdOut, run};
use super::tools;
use super::wait_for;

/// The shipped example `deploy/clients/<rel>`, with its placeholder address replaced by
/// `mirror_url` (`http://host:port`), as an operator would edit it.
pub fn shipped(rel: &str, mirror_url: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/clients")
        .join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        text.contains(PLACEHOLDER),
        "{} does not name {PLACEHOLDER}",
        path.display()
    );
    let host = mirror_url.trim_start_matches("http://");
    text.replace(PLACEHOLDER, host)
}

/// The mirror address the shipped client examples are written for.
const PLACEHOLDER: &str = "mirror.example:5000";

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
        tools::require_root("running containerd");
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
        let mut cmd = tools::command("containerd");
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
        let mut cmd = tools::command("ctr");
        cmd.arg("--address").arg(&self.sock).args(args);
        run(cmd, timeout)
    }

    /// A hosts dir (containerd's `certs.d`) written by `dockside client-config --for containerd`
    /// for `dockside`: one `<registry>/hosts.toml` per upstream.
    pub fn generated_hosts_dir(&self, dockside: &Dockside) -> PathBuf {
        let etc = self.dir.path().join("generated");
        dockside.client_config("containerd", &etc);
        etc.join("certs.d")
    }

    /// A hosts dir holding only the shipped `deploy/clients/containerd/certs.d/_default`, aimed at
    /// `mirror_url`.
    pub fn shipped_default_hosts_dir(&self, mirror_url: &str) -> PathBuf {
        let hd = self.dir.path().join("shipped-certs.d");
        let rel = "containerd/certs.d/_default/hosts.toml";
        std::fs::create_dir_all(hd.join("_default")).unwrap();
        std::fs::write(hd.join("_default/hosts.toml"), shipped(rel, mirror_url)).unwrap();
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
    /// podman whose registries.conf is what `dockside client-config --for podman` writes for
    /// `dockside` (a mirror with a path prefix per upstream).
    pub fn new(dockside: &Dockside) -> Podman {
        tools::require_root("running podman with its state under /run/containers");
        let dir = tempdir("e2e-podman-");
        let d = dir.path();
        dockside.client_config("podman", &d.join("generated"));
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
        let mut cmd = tools::command("podman");
        let registries = d.join("generated/registries.conf.d/50-dockside.conf");
        cmd.env("CONTAINERS_REGISTRIES_CONF", registries)
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

/// dockerd with a generated daemon.json, all state under a temp dir, driven with `docker -H`.
pub struct Dockerd {
    sock: PathBuf,
    proc: Proc,
    dir: TempDir,
    _footprint: Footprint,
}

impl Dockerd {
    /// dockerd configured by the daemon.json that `dockside client-config --for docker` writes
    /// for `dockside`.
    pub fn start(dockside: &Dockside) -> Dockerd {
        tools::require_root("running dockerd");
        let dir = tempdir("e2e-dockerd-");
        let d = dir.path();
        let sock = d.join("docker.sock");
        dockside.client_config("docker", d);
        let cfg = d.join("daemon.json");
        let mut daemon: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        // The trust key would go to /etc/docker/key.json otherwise.
        daemon["deprecated-key-path"] = serde_json::json!(d.join("key.json"));
        std::fs::write(&cfg, daemon.to_string()).unwrap();
        let footprint = Footprint::new(&["/run/docker/plugins", "/run/docker"]);
        let mut cmd = tools::command("dockerd");
        cmd.arg(format!("--config-file={}", cfg.display()))
            .args([
                "--storage-driver=vfs",
                "--iptables=false",
                "--ip6tables=false",
            ])
            .args(["--bridge=none", "--ip-masq=false"])
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

    /// The docker CLI's configuration directory (`DOCKER_CONFIG`: its `config.json`).
    pub fn client_dir(&self) -> PathBuf {
        self.dir.path().join("client")
    }

    pub fn docker(&self, args: &[&str], timeout: Duration) -> CmdOut {
        let mut cmd = tools::command("docker");
        cmd.env("DOCKER_CONFIG", self.client_dir())
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args(args);
        run(cmd, timeout)
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }
}
