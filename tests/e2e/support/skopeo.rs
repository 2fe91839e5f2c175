//! skopeo as the push tool and as a pulling client, plus checks of what it wrote.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::digest_of;
use super::image::{Artifact, Image, Index, write_dir_layout, write_oci_layout};
use super::registry::Registry;
use super::tools;

/// Output of a command run with a deadline.
#[derive(Debug)]
pub struct CmdOut {
    pub what: String,
    /// `None`: it had not finished by the deadline and was killed.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CmdOut {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    pub fn timed_out(&self) -> bool {
        self.status.is_none()
    }

    /// Panics with the command's output unless it succeeded.
    pub fn assert_ok(&self) -> &CmdOut {
        assert!(
            self.success(),
            "{} failed ({}) after {:?}\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "timed out".into()),
            self.elapsed,
            super::tail(&self.stdout, 30),
            super::tail(&self.stderr, 30)
        );
        self
    }
}

/// Runs `cmd` to completion or until `timeout` (then SIGKILLs it).
pub fn run(mut cmd: Command, timeout: Duration) -> CmdOut {
    let what = format!("{cmd:?}");
    let start = Instant::now();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = so.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = se.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let deadline = start + timeout;
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(st) => break Some(st),
            None if Instant::now() >= deadline => {
                // SAFETY: the process group (same id) and PID of our unreaped child.
                unsafe {
                    libc::kill(-(child.id() as i32), libc::SIGKILL);
                }
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    CmdOut {
        what,
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

pub fn skopeo(args: &[&str], timeout: Duration) -> CmdOut {
    let mut cmd = tools::command("skopeo");
    cmd.arg("--insecure-policy").args(args);
    // Never pick up credentials of the machine's user.
    cmd.env("REGISTRY_AUTH_FILE", "/nonexistent/e2e-auth.json");
    run(cmd, timeout)
}

/// Pushes `art` to `reg` as `repo:tag` with `skopeo copy`, digests preserved.
pub fn push(reg: &Registry, repo: &str, tag: &str, art: &dyn Artifact) {
    let dir = tempfile::Builder::new()
        .prefix("e2e-layout-")
        .tempdir()
        .unwrap();
    // skopeo's OCI layout reader only takes OCI media types: Docker ones go through `dir:`.
    let src = if art.top().media_type.contains("docker") {
        write_dir_layout(dir.path(), art);
        format!("dir:{}", dir.path().display())
    } else {
        write_oci_layout(dir.path(), tag, art);
        format!("oci:{}:{tag}", dir.path().display())
    };
    let dst = format!("docker://{}/{repo}:{tag}", reg.host());
    let creds = reg.creds();
    let mut args = vec![
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        "--retry-times=2",
    ];
    if art.is_index() {
        args.push("--all");
    }
    if let Some(c) = creds.as_deref() {
        args.extend(["--dest-creds", c]);
    }
    args.extend([src.as_str(), dst.as_str()]);
    skopeo(&args, Duration::from_secs(300)).assert_ok();
}

/// `skopeo copy docker://<src> <dest>` from a plain-HTTP registry (or dockside), anonymously.
pub fn pull(src: &str, dest: &str, extra: &[&str]) -> CmdOut {
    pull_as(src, dest, None, extra)
}

/// `skopeo copy` from a plain-HTTP registry with `creds` (`user:password`) or anonymously.
pub fn pull_as(src: &str, dest: &str, creds: Option<&str>, extra: &[&str]) -> CmdOut {
    let src = format!("docker://{src}");
    let mut args = vec!["copy", "--src-tls-verify=false"];
    match creds {
        Some(c) => args.extend(["--src-creds", c]),
        None => args.push("--src-no-creds"),
    }
    args.extend(extra);
    args.extend([src.as_str(), dest]);
    skopeo(&args, Duration::from_secs(300))
}

/// Reads a blob of an OCI layout and checks that it hashes to its name.
pub fn layout_blob(dir: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.trim_start_matches("sha256:");
    let path = dir.join("blobs/sha256").join(hex);
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(
        digest_of(&data),
        digest,
        "{} does not hash to its name",
        path.display()
    );
    data
}

/// The top manifest's digest in an OCI layout written by `skopeo copy ... oci:DIR`.
pub fn layout_top(dir: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).expect("index.json"))
            .expect("index.json is JSON");
    let m = index["manifests"].as_array().expect("index.json manifests");
    assert_eq!(m.len(), 1, "one image in the layout: {index}");
    m[0]["digest"].as_str().unwrap().to_string()
}

/// Checks that the OCI layout in `dir` holds `img`: the same config and layers (bytes hash to
/// the pushed digests); with `same_manifest`, also the very manifest that was pushed.
pub fn assert_layout_has_image(dir: &Path, top: &str, img: &Image, same_manifest: bool) {
    if same_manifest {
        assert_eq!(
            top, img.manifest.digest,
            "manifest digest in the pulled layout"
        );
    }
    let manifest: serde_json::Value = serde_json::from_slice(&layout_blob(dir, top)).unwrap();
    let config = manifest["config"]["digest"]
        .as_str()
        .expect("config digest");
    if same_manifest {
        assert_eq!(config, img.config.digest, "config digest");
    } else {
        // skopeo converted a Docker image to OCI: the config was rewritten, layers were not.
        layout_blob(dir, config);
    }
    let layers: Vec<&str> = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = img.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(layers, want, "layer digests");
    let blobs = if same_manifest {
        img.blobs()
    } else {
        img.layers.iter().collect()
    };
    for b in blobs {
        assert_eq!(
            layout_blob(dir, &b.digest).len(),
            b.data.len(),
            "size of {}",
            b.digest
        );
    }
}

/// Checks that the OCI layout in `dir` holds the whole index `idx`, byte for byte.
pub fn assert_layout_has_index(dir: &Path, idx: &Index) {
    let top = layout_top(dir);
    assert_eq!(
        top, idx.manifest.digest,
        "index digest in the pulled layout"
    );
    assert_eq!(layout_blob(dir, &top), idx.manifest.data);
    for img in &idx.images {
        assert_layout_has_image(dir, &img.manifest.digest, img, true);
    }
}

/// Checks a `dir:` transport directory: `manifest.json` is the pushed top manifest byte for
/// byte, every child manifest is `<hex>.manifest.json`, every blob is `<hex>` and hashes right.
pub fn assert_dir_has(dir: &Path, art: &dyn Artifact) {
    let manifest = std::fs::read(dir.join("manifest.json")).expect("manifest.json");
    assert_eq!(
        digest_of(&manifest),
        art.top().digest,
        "manifest.json is the pushed manifest"
    );
    for b in art.contents() {
        let is_manifest = b.media_type.contains("manifest");
        let name = if is_manifest && art.is_index() {
            format!("{}.manifest.json", b.hex())
        } else {
            b.hex().to_string()
        };
        let data = std::fs::read(dir.join(&name))
            .unwrap_or_else(|e| panic!("{name} missing in dir: output: {e}"));
        assert_eq!(digest_of(&data), b.digest, "{name} hashes to its digest");
    }
}
