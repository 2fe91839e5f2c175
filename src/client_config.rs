//! `dockside client-config`: the files that point a registry client at dockside, derived from
//! the configured upstreams so they route the way [`crate::upstream::Upstreams::resolve`] does.
//!
//! Each client reaches dockside differently:
//! - dockerd mirrors Docker Hub only and sends no registry name, so its pulls land on the
//!   default upstream, which therefore has to be docker.io.
//! - containerd (and k3s, which writes containerd's config) adds `?ns=<registry>` to every
//!   request, so one `hosts.toml` per upstream, all naming the same dockside, is enough.
//! - podman and CRI-O send nothing that names the registry, so each upstream's mirror location
//!   carries the upstream's name as a path prefix (`mirror:5000/ghcr.io`).
//!
//! The files under `deploy/clients/` are this module's output for `config/dockside.yaml`; a
//! test keeps them equal, and the end-to-end tests configure real clients with it.

use std::path::PathBuf;

use url::Url;

use crate::config::{Config, UpstreamConfig};

/// The name Docker Hub has in image references and in dockside's config.
const DOCKER_HUB: &str = "docker.io";
/// Where containerd and podman actually send Docker Hub requests.
const DOCKER_HUB_SERVER: &str = "https://registry-1.docker.io";

/// The clients `client-config` writes files for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Client {
    Docker,
    Containerd,
    Podman,
    K3s,
}

/// One file to write: `path` is relative to `base`, the directory the client reads it from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFile {
    pub base: &'static str,
    pub path: PathBuf,
    pub contents: String,
}

impl ClientFile {
    /// Where the client expects the file on a stock installation.
    pub fn default_location(&self) -> PathBuf {
        PathBuf::from(self.base).join(&self.path)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientConfigError {
    #[error("--mirror {0:?}: {1}")]
    Mirror(String, &'static str),
    #[error("{0}")]
    Unroutable(String),
}

/// dockside's address as clients see it: a scheme, a host and an optional port, nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    scheme: String,
    /// `host` or `host:port`, as written (IPv6 in brackets).
    authority: String,
}

impl Mirror {
    pub fn parse(text: &str) -> Result<Mirror, ClientConfigError> {
        let bad = |why| ClientConfigError::Mirror(text.to_owned(), why);
        let url = Url::parse(text).map_err(|_| bad("not a URL like http://mirror.example:5000"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("the scheme must be http or https"));
        }
        // dockerd refuses a mirror URL with a path, and dockside serves /v2/ at its root.
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err(bad("must not have a path, query or fragment"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("must not carry credentials"));
        }
        let host = url.host_str().ok_or_else(|| bad("has no host"))?;
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        Ok(Mirror {
            scheme: url.scheme().to_owned(),
            authority,
        })
    }

    /// `scheme://host[:port]`, without a trailing slash.
    pub fn origin(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }

    /// Plain HTTP: clients must be told to accept it.
    fn insecure(&self) -> bool {
        self.scheme == "http"
    }
}

/// The files that point `client` at `mirror` for every upstream in `config`.
pub fn render(
    client: Client,
    mirror: &Mirror,
    config: &Config,
) -> Result<Vec<ClientFile>, ClientConfigError> {
    match client {
        Client::Docker => docker(mirror, config).map(|f| vec![f]),
        Client::Containerd => Ok(config
            .upstreams
            .iter()
            .map(|u| containerd_hosts(mirror, u))
            .collect()),
        Client::Podman => Ok(vec![podman(mirror, config)]),
        Client::K3s => Ok(vec![k3s(mirror, config)]),
    }
}

/// `/etc/docker/daemon.json`. dockerd sends Docker Hub pulls to a mirror without naming the
/// registry, so they reach the default upstream; any other default would serve wrong images.
fn docker(mirror: &Mirror, config: &Config) -> Result<ClientFile, ClientConfigError> {
    let default = config.upstream(&config.default_upstream);
    if !default.is_some_and(|u| u.answers_to(DOCKER_HUB)) {
        return Err(ClientConfigError::Unroutable(format!(
            "docker uses a mirror for Docker Hub images only and does not tell the mirror which \
             registry it means, so dockside's default_upstream must be {DOCKER_HUB} (it is {:?})",
            config.default_upstream
        )));
    }
    let mut json = serde_json::json!({ "registry-mirrors": [mirror.origin()] });
    if mirror.insecure() {
        // dockerd only trusts plain HTTP on loopback unless the host is listed here.
        json["insecure-registries"] = serde_json::json!([mirror.authority]);
    }
    let mut contents = serde_json::to_string_pretty(&json).expect("JSON of strings");
    contents.push('\n');
    Ok(ClientFile {
        base: "/etc/docker",
        path: PathBuf::from("daemon.json"),
        contents,
    })
}

/// Where a client goes for `name` when no mirror answers: Docker Hub's API host, or the name.
fn origin_server(name: &str) -> String {
    if name == DOCKER_HUB {
        DOCKER_HUB_SERVER.to_owned()
    } else {
        format!("https://{name}")
    }
}

/// `/etc/containerd/certs.d/<name>/hosts.toml`: dockside first, then the registry itself.
fn containerd_hosts(mirror: &Mirror, upstream: &UpstreamConfig) -> ClientFile {
    let name = &upstream.name;
    let contents = format!(
        "# {name} through dockside; containerd adds ?ns={name}, which picks the upstream.\n\
         server = {server}\n\n\
         [host.{host}]\n  capabilities = [\"pull\", \"resolve\"]\n",
        server = toml_string(&origin_server(name)),
        host = toml_string(&mirror.origin()),
    );
    ClientFile {
        base: "/etc/containerd",
        path: PathBuf::from("certs.d").join(name).join("hosts.toml"),
        contents,
    }
}

/// A drop-in for `/etc/containers/registries.conf.d/` (podman, CRI-O, skopeo, buildah): one
/// `[[registry]]` per upstream whose mirror location carries the upstream's name as a prefix.
fn podman(mirror: &Mirror, config: &Config) -> ClientFile {
    let mut contents = String::from(
        "# Pulls of these registries go through dockside first, then to the registry itself.\n\
         # The path after dockside's address names the upstream (dockside's path-prefix routing).\n",
    );
    for upstream in &config.upstreams {
        contents += &podman_registry(mirror, &upstream.name);
    }
    ClientFile {
        base: "/etc/containers",
        path: PathBuf::from("registries.conf.d/50-dockside.conf"),
        contents,
    }
}

/// One `[[registry]]` table. A name with a port cannot be a path component of an image
/// reference, so such an upstream cannot be reached through a prefix: it is left out, with a note.
fn podman_registry(mirror: &Mirror, name: &str) -> String {
    if name.contains(':') {
        return format!(
            "\n# {name}: left out; a registry name with a port cannot be a mirror path prefix.\n"
        );
    }
    let mut table = format!(
        "\n[[registry]]\nprefix = {quoted}\nlocation = {quoted}\n\n\
         [[registry.mirror]]\nlocation = {location}\n",
        quoted = toml_string(name),
        location = toml_string(&format!("{}/{name}", mirror.authority)),
    );
    if mirror.insecure() {
        table += "insecure = true\n";
    }
    table
}

/// `/etc/rancher/k3s/registries.yaml`: k3s turns it into containerd hosts files, so routing is
/// by `?ns=` as for containerd.
fn k3s(mirror: &Mirror, config: &Config) -> ClientFile {
    let mut contents = String::from(
        "# k3s writes containerd's hosts.toml from this; containerd's ?ns= picks the upstream.\n\
         mirrors:\n",
    );
    for upstream in &config.upstreams {
        contents += &format!(
            "  {}:\n    endpoint:\n      - {}\n",
            json_string(&upstream.name),
            json_string(&mirror.origin())
        );
    }
    ClientFile {
        base: "/etc/rancher/k3s",
        path: PathBuf::from("registries.yaml"),
        contents,
    }
}

/// A TOML basic string. Registry names and URLs hold no characters TOML escapes differently
/// from JSON, so JSON's quoting is TOML's here.
fn toml_string(s: &str) -> String {
    json_string(s)
}

/// A double-quoted string, valid as JSON, as a YAML flow scalar and as a TOML basic string.
fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("JSON of a string")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(upstreams: &str, default: &str) -> Config {
        let yaml = format!(
            "listen: \"127.0.0.1:5000\"\ncache:\n  dir: /tmp/c\n  max_size: 1GiB\n\
             upstreams:\n{upstreams}default_upstream: {default}\n"
        );
        Config::from_yaml(&yaml, "test.yaml").unwrap()
    }

    fn hub_and_ghcr() -> Config {
        config(
            "  - name: docker.io\n    url: https://registry-1.docker.io\n    \
             aliases: [index.docker.io]\n  - name: ghcr.io\n    url: https://ghcr.io\n",
            "docker.io",
        )
    }

    fn mirror(s: &str) -> Mirror {
        Mirror::parse(s).unwrap()
    }

    fn one(files: Vec<ClientFile>) -> ClientFile {
        assert_eq!(files.len(), 1, "{files:?}");
        files.into_iter().next().unwrap()
    }

    #[test]
    fn mirror_accepts_scheme_host_and_port_only() {
        assert_eq!(
            mirror("http://mirror.example:5000").origin(),
            "http://mirror.example:5000"
        );
        assert_eq!(
            mirror("https://Mirror.Example/").origin(),
            "https://mirror.example"
        );
        assert_eq!(mirror("http://[::1]:5000").authority, "[::1]:5000");
        for bad in [
            "mirror.example:5000",
            "ftp://mirror.example",
            "http://mirror.example:5000/v2",
            "http://mirror.example/?x=1",
            "http://user:pw@mirror.example",
            "not a url",
        ] {
            assert!(Mirror::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn docker_mirrors_hub_and_trusts_plain_http() {
        let file = one(render(Client::Docker, &mirror("http://m:5000"), &hub_and_ghcr()).unwrap());
        assert_eq!(
            file.default_location(),
            PathBuf::from("/etc/docker/daemon.json")
        );
        let json: serde_json::Value = serde_json::from_str(&file.contents).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "registry-mirrors": ["http://m:5000"],
                "insecure-registries": ["m:5000"],
            })
        );
        let tls = one(render(Client::Docker, &mirror("https://m"), &hub_and_ghcr()).unwrap());
        assert!(!tls.contents.contains("insecure"), "{}", tls.contents);
    }

    #[test]
    fn docker_refuses_a_default_upstream_other_than_hub() {
        let cfg = config(
            "  - name: docker.io\n    url: https://registry-1.docker.io\n  \
             - name: quay.io\n    url: https://quay.io\n",
            "quay.io",
        );
        let err = render(Client::Docker, &mirror("http://m:5000"), &cfg).unwrap_err();
        assert!(err.to_string().contains("\"quay.io\""), "{err}");
    }

    #[test]
    fn docker_accepts_hub_named_by_an_alias() {
        let cfg = config(
            "  - name: hub\n    url: https://registry-1.docker.io\n    aliases: [docker.io]\n",
            "hub",
        );
        assert!(render(Client::Docker, &mirror("http://m:5000"), &cfg).is_ok());
    }

    #[test]
    fn containerd_writes_one_hosts_file_per_upstream() {
        let files = render(
            Client::Containerd,
            &mirror("http://m:5000"),
            &hub_and_ghcr(),
        )
        .unwrap();
        let paths: Vec<_> = files.iter().map(ClientFile::default_location).collect();
        assert_eq!(
            paths,
            [
                PathBuf::from("/etc/containerd/certs.d/docker.io/hosts.toml"),
                PathBuf::from("/etc/containerd/certs.d/ghcr.io/hosts.toml"),
            ]
        );
        assert!(
            files[0]
                .contents
                .contains("server = \"https://registry-1.docker.io\"\n")
        );
        assert!(files[1].contents.contains("server = \"https://ghcr.io\"\n"));
        for f in &files {
            assert!(
                f.contents.contains(
                    "[host.\"http://m:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
                ),
                "{}",
                f.contents
            );
        }
    }

    #[test]
    fn podman_prefixes_each_mirror_location_with_its_upstream() {
        let file = one(render(Client::Podman, &mirror("http://m:5000"), &hub_and_ghcr()).unwrap());
        assert_eq!(
            file.default_location(),
            PathBuf::from("/etc/containers/registries.conf.d/50-dockside.conf")
        );
        assert!(file.contents.contains(
            "[[registry]]\nprefix = \"ghcr.io\"\nlocation = \"ghcr.io\"\n\n\
             [[registry.mirror]]\nlocation = \"m:5000/ghcr.io\"\ninsecure = true\n"
        ));
        assert!(file.contents.contains("location = \"m:5000/docker.io\"\n"));
        let tls = one(render(Client::Podman, &mirror("https://m"), &hub_and_ghcr()).unwrap());
        assert!(!tls.contents.contains("insecure"), "{}", tls.contents);
    }

    #[test]
    fn k3s_lists_every_upstream_with_the_mirror_endpoint() {
        let file = one(render(Client::K3s, &mirror("https://m:443"), &hub_and_ghcr()).unwrap());
        assert_eq!(
            file.contents,
            "# k3s writes containerd's hosts.toml from this; containerd's ?ns= picks the \
             upstream.\nmirrors:\n  \"docker.io\":\n    endpoint:\n      - \"https://m\"\n  \
             \"ghcr.io\":\n    endpoint:\n      - \"https://m\"\n"
        );
    }

    /// `deploy/clients/` holds this module's output for `config/dockside.yaml`; the command that
    /// regenerates it is in deploy/README.md.
    #[test]
    fn shipped_examples_are_the_generators_output() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/clients");
        let m = mirror("http://mirror.example:5000");
        let config = Config::embedded_default();
        let clients = [
            (Client::Docker, "docker"),
            (Client::Containerd, "containerd"),
            (Client::Podman, "podman"),
            (Client::K3s, "k3s"),
        ];
        for (client, dir) in clients {
            for file in render(client, &m, &config).unwrap() {
                let path = root.join(dir).join(&file.path);
                let shipped = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(shipped, file.contents, "{} is stale", path.display());
            }
        }
        for entry in std::fs::read_dir(root.join("containerd/certs.d")).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(
                name == "_default" || config.upstream(&name).is_some(),
                "certs.d/{name} names no configured upstream"
            );
        }
    }

    /// The README's dockerd, podman and containerd snippets say what `client-config` writes for
    /// the default config (podman's and containerd's: the entries the README shows).
    #[test]
    fn readme_snippets_are_the_generators_output() {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
                .unwrap();
        let section = |heading: &str, fence: &str| -> String {
            let from = readme
                .find(heading)
                .unwrap_or_else(|| panic!("README: {heading}"));
            let rest = &readme[from..];
            let start = rest.find(fence).expect("a fenced block") + fence.len() + 1;
            let end = rest[start..].find("```").expect("its end");
            rest[start..start + end].to_string()
        };
        let m = mirror("http://mirror.example:5000");
        let config = Config::embedded_default();
        let rendered = |client| one(render(client, &m, &config).unwrap()).contents;

        let docker: serde_json::Value =
            serde_json::from_str(&section("**dockerd** (", "```json")).unwrap();
        let generated: serde_json::Value = serde_json::from_str(&rendered(Client::Docker)).unwrap();
        assert_eq!(docker, generated, "README's dockerd snippet");

        let podman = section("**podman / CRI-O** (", "```toml");
        let generated = rendered(Client::Podman);
        for entry in podman.split("\n\n") {
            assert!(
                generated.contains(entry),
                "README's podman entry {entry:?} is not generated"
            );
        }

        let containerd = section("**containerd** (", "```toml");
        let generated = render(Client::Containerd, &m, &config).unwrap();
        let hub = generated
            .iter()
            .find(|f| f.path.ends_with("docker.io/hosts.toml"))
            .unwrap();
        for line in containerd.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                hub.contents.contains(line),
                "README's containerd line {line:?}"
            );
        }
    }

    /// The hand-written EKS examples list every configured upstream.
    #[test]
    fn eks_examples_cover_every_upstream() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/clients/eks");
        let read = |f: &str| std::fs::read_to_string(root.join(f)).unwrap();
        let (bottlerocket, al2023) = (read("bottlerocket.toml"), read("al2023-user-data.txt"));
        let loop_line = al2023
            .lines()
            .find(|l| l.starts_with("for registry in"))
            .expect("the loop over registries");
        let listed: Vec<&str> = loop_line
            .trim_start_matches("for registry in")
            .trim_end_matches("; do")
            .split_whitespace()
            .collect();
        let config = Config::embedded_default();
        let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(listed, names, "al2023-user-data.txt");
        for name in names {
            assert!(
                bottlerocket.contains(&format!("registry = \"{name}\"\n")),
                "bottlerocket.toml lacks {name}"
            );
        }
    }

    #[test]
    fn a_registry_with_a_port_is_a_containerd_dir_but_no_podman_prefix() {
        let cfg = config(
            "  - name: registry.corp:5000\n    url: https://registry.corp:5000\n",
            "registry.corp:5000",
        );
        let m = mirror("http://m:5000");
        let hosts = one(render(Client::Containerd, &m, &cfg).unwrap());
        assert_eq!(
            hosts.path,
            PathBuf::from("certs.d/registry.corp:5000/hosts.toml")
        );
        assert!(
            hosts
                .contents
                .contains("server = \"https://registry.corp:5000\"")
        );
        let podman = one(render(Client::Podman, &m, &cfg).unwrap());
        assert!(
            !podman.contents.contains("[[registry]]")
                && podman.contents.contains("# registry.corp:5000: left out"),
            "{}",
            podman.contents
        );
    }
}
