//! HTTPS serving: skopeo pulls and curl's HTTP/2 through a listener whose certificate only the
//! test CA vouches for, and certificate files replaced on disk reaching new connections while
//! the same process keeps running (a broken replacement keeps the old pair serving).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::certs::Ca;
use crate::support::clients::{Containerd, Podman};
use crate::support::dockside::{Config, Dockside, Upstream};
use crate::support::image::{Format, Image};
use crate::support::registry::{Auth, Registry};
use crate::support::serial::HostsPin;
use crate::support::skopeo::{self, CmdOut};
use crate::support::tools;
use crate::support::wait_for;

/// An upstream holding `image` as `library/<repo>:<tag>`, and dockside serving HTTPS in front of
/// it with a certificate from a fresh CA.
struct Mirror {
    _reg: Registry,
    ca: Ca,
    d: Dockside,
    /// Holds the CA and certificate files.
    dir: tempfile::TempDir,
}

fn https_mirror_of(image: &Image, repo: &str, tag: &str) -> Mirror {
    let reg = Registry::start(Auth::None);
    skopeo::push(&reg, &format!("library/{repo}"), tag, image);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let (cert, key) = ca.issue("dockside", "dockside-e2e");
    let d = https_dockside(&reg, cert, key);
    Mirror {
        _reg: reg,
        ca,
        d,
        dir,
    }
}

fn https_dockside(reg: &Registry, cert: PathBuf, key: PathBuf) -> Dockside {
    let d = Dockside::start(&Config {
        tls: Some((cert, key)),
        ..Config::new(vec![Upstream::hub(reg)])
    });
    assert!(d.url().starts_with("https://"), "{}", d.url());
    d
}

/// curl, verifying dockside's certificate against `ca` only.
fn curl(ca: &Path, args: &[&str]) -> CmdOut {
    let mut cmd = tools::command("curl");
    cmd.args(["--silent", "--show-error", "--noproxy", "*", "--cacert"])
        .arg(ca)
        .args(args);
    skopeo::run(cmd, Duration::from_secs(30))
}

/// The subject and serial of the certificate a new TLS connection to `d` is shown, verified
/// against `ca` (`openssl s_client`, then `openssl x509`).
fn served_certificate(d: &Dockside, ca: &Path) -> String {
    let script = format!(
        "openssl s_client -connect {} -CAfile {} -verify_return_error </dev/null 2>/dev/null \
         | openssl x509 -noout -subject -serial",
        d.host(),
        ca.display()
    );
    tools::require("openssl");
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script]);
    skopeo::run(cmd, Duration::from_secs(30)).stdout
}

/// Puts `from`'s bytes at `to` the way cert-manager and certbot do: a new file renamed over.
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[test]
fn skopeo_pulls_over_https_and_curl_negotiates_http2() {
    let img = Image::generate(61, &[150_000, 3_000], Format::Oci);
    // All bound: a field left out of the pattern would be dropped here (the upstream stopped).
    let Mirror { _reg, ca, d, dir } = https_mirror_of(&img, "tlsimg", "v1");
    let src = format!("docker://{}/tlsimg:v1", d.host());

    // skopeo verifies the server: with no CA to trust, it refuses.
    let empty = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let dest = format!("oci:{}:pulled", out.path().display());
    let untrusting = ["copy", "--src-no-creds", "--src-cert-dir"];
    let refused = skopeo::skopeo(
        &[
            &untrusting[..],
            &[&empty.path().display().to_string(), &src, &dest],
        ]
        .concat(),
        Duration::from_secs(120),
    );
    assert!(!refused.success(), "skopeo trusted an unknown CA");
    assert!(refused.stderr.contains("certificate"), "{}", refused.stderr);

    // With the CA in its cert dir (`*.crt` files are CAs to trust), the pull works.
    let trust = ca.cert_dir().display().to_string();
    skopeo::skopeo(
        &[&untrusting[..], &[&trust, &src, &dest]].concat(),
        Duration::from_secs(120),
    )
    .assert_ok();
    let top = skopeo::layout_top(out.path());
    skopeo::assert_layout_has_image(out.path(), &top, &img, true);

    // ALPN: h2 when the client offers it, HTTP/1.1 when it asks for that; both verified.
    let version = |flag: &str| {
        let url = format!("{}/v2/", d.url());
        let out = curl(
            &ca.pem,
            &[flag, "-o", "/dev/null", "-w", "%{http_version}", &url],
        );
        out.assert_ok();
        out.stdout
    };
    assert_eq!(version("--http2"), "2");
    assert_eq!(version("--http1.1"), "1.1");

    // A blob over HTTP/2 is the pushed bytes.
    let layer = &img.layers[0];
    let blob = dir.path().join("layer");
    let url = format!("{}/v2/tlsimg/blobs/{}", d.url(), layer.digest);
    let out = curl(
        &ca.pem,
        &[
            "--http2",
            "-o",
            &blob.display().to_string(),
            "-w",
            "%{http_version} %{http_code}",
            &url,
        ],
    );
    assert_eq!(out.assert_ok().stdout, "2 200");
    assert_eq!(std::fs::read(&blob).unwrap(), layer.data);
}

#[test]
fn podman_pulls_through_the_https_mirror() {
    // Docker Hub's names point at 127.0.0.1 (where nothing serves 443): only the mirror works.
    let _pin = HostsPin::new();
    let img = Image::generate(63, &[200_000, 20_000], Format::Oci);
    let Mirror {
        _reg,
        ca,
        d,
        dir: _dir,
    } = https_mirror_of(&img, "tlspod", "1.0");
    // registries.conf from `dockside client-config` for an https:// mirror (not `insecure`);
    // the CA through `--cert-dir`.
    let p = Podman::new(&d);
    let trust = ca.cert_dir().display().to_string();
    let image = "docker.io/library/tlspod:1.0";
    let untrusting = p.podman(&["pull", image], Duration::from_secs(300));
    assert!(!untrusting.success(), "podman trusted an unknown CA");
    let refused = &untrusting.stderr;
    assert!(
        refused.contains("certificate signed by unknown authority"),
        "{refused}"
    );
    p.podman(
        &["pull", "--cert-dir", &trust, image],
        Duration::from_secs(300),
    )
    .assert_ok();
    let format = "{{.Repository}}:{{.Tag}} {{.Digest}}";
    let ls = p.podman(
        &["images", "--digests", "--format", format],
        Duration::from_secs(60),
    );
    let want = format!("{image} {}", img.manifest.digest);
    assert!(ls.assert_ok().stdout.contains(&want), "{}", ls.stdout);
}

#[test]
fn containerd_pulls_through_the_https_mirror_with_the_ca_in_hosts_toml() {
    let _pin = HostsPin::new();
    let img = Image::generate(66, &[150_000, 10_000], Format::Oci);
    let Mirror {
        _reg,
        ca,
        d,
        dir: _dir,
    } = https_mirror_of(&img, "tlsctr", "1.0");
    let c = Containerd::start();
    // hosts.toml from `dockside client-config` names `https://…`; its last table is that host.
    let hosts = c.generated_hosts_dir(&d);
    let hub = hosts.join("docker.io/hosts.toml");
    let generated = std::fs::read_to_string(&hub).unwrap();
    assert!(
        generated.contains(&format!("[host.\"{}\"]", d.url())),
        "{generated}"
    );
    let image = "docker.io/library/tlsctr:1.0";
    let pull = || {
        let hosts = hosts.display().to_string();
        let args = [
            "images",
            "pull",
            "--hosts-dir",
            &hosts,
            "--snapshotter",
            "native",
            image,
        ];
        c.ctr(&args, Duration::from_secs(300))
    };
    let untrusting = pull();
    assert!(!untrusting.success(), "containerd trusted an unknown CA");
    let refused = format!("{}{}", untrusting.stdout, untrusting.stderr);
    assert!(
        refused.contains("certificate signed by unknown authority"),
        "{refused}"
    );
    let ca_line = format!("  ca = {:?}\n", ca.pem.display().to_string());
    std::fs::write(&hub, generated + &ca_line).unwrap();
    pull().assert_ok();
    let ls = c.ctr(&["images", "ls"], Duration::from_secs(30));
    let want = img.manifest.digest.as_str();
    assert!(ls.assert_ok().stdout.contains(want), "{}", ls.stdout);
}

#[test]
fn replaced_certificate_files_reach_new_connections_without_a_restart() {
    let reg = Registry::start(Auth::None);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let (first_cert, first_key) = ca.issue("first", "dockside-first");
    let (live_cert, live_key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    replace(&first_cert, &live_cert);
    replace(&first_key, &live_key);
    let mut d = https_dockside(&reg, live_cert.clone(), live_key.clone());
    let pid = d.pid();
    let first = served_certificate(&d, &ca.pem);
    assert!(first.contains("CN = dockside-first"), "{first:?}");
    // The certificates are made valid for two days: the gauge says so.
    let expiry = d.metric(&format!(
        "dockside_tls_certificate_expiry_timestamp_seconds{{cert_file={:?}}}",
        live_cert.display().to_string()
    ));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let in_two_days = expiry.map(|t| t - now - 2.0 * 86400.0);
    assert!(in_two_days.is_some_and(|d| d.abs() < 3600.0), "{expiry:?}");
    assert!(
        d.log().contains("serving TLS"),
        "the start-up log names the certificate"
    );

    // A rotation: the key first, then the certificate (a moment with a mismatched pair).
    let (second_cert, second_key) = ca.issue("second", "dockside-second");
    replace(&second_key, &live_key);
    replace(&second_cert, &live_cert);
    let second = wait_for(
        "the new certificate to be served",
        Duration::from_secs(15),
        || {
            let served = served_certificate(&d, &ca.pem);
            served.contains("CN = dockside-second").then_some(served)
        },
    );
    assert_ne!(serial(&first), serial(&second), "{first:?} {second:?}");
    d.assert_running();
    assert_eq!(d.pid(), pid);
    let v2 = format!("{}/v2/", d.url());
    let out = curl(
        &ca.pem,
        &["--http2", "-o", "/dev/null", "-w", "%{http_code}", &v2],
    );
    assert_eq!(out.assert_ok().stdout, "200");

    // Broken replacements are logged and the second pair keeps serving: a certificate whose
    // key is not there, then a file that is no certificate at all. (The rotation above may
    // have been seen half-done and rejected once already: count from here.)
    let rejected = "dockside_tls_reloads_total{result=\"rejected\"}";
    let before = d.metric(rejected).unwrap_or(0.0);
    let (third_cert, _) = ca.issue("third", "dockside-third");
    let (mismatch, no_cert) = (
        "does not match the certificate",
        "contains no PEM certificate",
    );
    let seen = d.log().matches(mismatch).count();
    replace(&third_cert, &live_cert);
    wait_for_log(&d, mismatch, seen + 1);
    std::fs::write(&live_cert, "not a certificate\n").unwrap();
    wait_for_log(&d, no_cert, 1);
    assert_eq!(served_certificate(&d, &ca.pem), second);
    // Two more reload polls (reload_interval is 1 s) see the same broken files: they must not
    // count again. Nothing is raced here; the count is the same whenever it is read.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        d.metric(rejected),
        Some(before + 2.0),
        "one rejection per broken pair, however many polls saw it"
    );
    assert!(d.metric("dockside_tls_reloads_total{result=\"reloaded\"}") >= Some(1.0));
    assert_eq!(d.pid(), pid);
    d.assert_running();
}

fn serial(openssl_out: &str) -> &str {
    openssl_out
        .lines()
        .find_map(|l| l.strip_prefix("serial="))
        .unwrap_or_else(|| panic!("no serial in {openssl_out:?}"))
}

/// Waits until dockside's log holds `needle` at least `n` times.
fn wait_for_log(d: &Dockside, needle: &str, n: usize) {
    wait_for(
        &format!("{needle:?} in the log"),
        Duration::from_secs(15),
        || (d.log().matches(needle).count() >= n).then_some(()),
    );
}

/// Prints (`MEASURE`, with `--nocapture`) curl's speed for a warm 128 MiB blob from dockside over
/// plain HTTP/1.1, HTTPS HTTP/1.1 and HTTPS HTTP/2; asserts only that each copy is whole.
#[test]
fn measure_warm_blob_over_plain_and_https() {
    let _heavy = crate::support::serial::heavy();
    let img = Image::generate(64, &[128 << 20], Format::Oci);
    let m = https_mirror_of(&img, "tlsbig", "v1");
    let plain = Dockside::start(&Config::new(vec![Upstream::hub(&m._reg)]));
    let layer = &img.layers[0];
    let path = format!("/v2/tlsbig/blobs/{}", layer.digest);
    let file = m.dir.path().join("blob");
    let get = |url: &str, flag: &str| {
        let w = "%{http_version} %{speed_download}";
        let out = curl(
            &m.ca.pem,
            &[flag, "-o", &file.display().to_string(), "-w", w, url],
        );
        assert_eq!(
            std::fs::metadata(&file).unwrap().len(),
            layer.data.len() as u64
        );
        let stdout = out.assert_ok().stdout.clone();
        let (version, speed) = stdout.split_once(' ').unwrap();
        (
            version.to_string(),
            speed.parse::<f64>().unwrap() / (1 << 20) as f64,
        )
    };
    for (name, base, flag) in [
        ("plain", plain.url(), "--http1.1"),
        ("https", m.d.url(), "--http1.1"),
        ("https", m.d.url(), "--http2"),
    ] {
        let url = format!("{base}{path}");
        get(&url, flag); // cold: fills the cache
        let runs: Vec<(String, f64)> = (0..3).map(|_| get(&url, flag)).collect();
        let speeds: Vec<String> = runs.iter().map(|(_, s)| format!("{s:.0}")).collect();
        println!(
            "MEASURE warm 128 MiB blob, {name} HTTP/{}: {} MiB/s",
            runs[0].0,
            speeds.join(" / ")
        );
    }
}

#[test]
fn serve_upgrade_hands_over_the_tls_listener() {
    let img = Image::generate(65, &[100_000], Format::Oci);
    let Mirror {
        _reg,
        ca,
        d: mut old,
        dir: _dir,
    } = https_mirror_of(&img, "tlsup", "v1");
    let v2 = format!("{}/v2/", old.url());
    let status = |d: &Dockside| {
        let out = curl(
            &ca.pem,
            &["--http2", "-o", "/dev/null", "-w", "%{http_code}", &v2],
        );
        assert_eq!(out.assert_ok().stdout, "200", "via {}", d.pid());
    };
    status(&old);
    let mut new = old.start_upgrade();
    old.signal(libc::SIGQUIT);
    let exited = old.wait_exit(Duration::from_secs(30));
    assert!(
        exited.is_some_and(|s| s.success()),
        "old process: {exited:?}"
    );
    // Only the new process is left to answer, over TLS with the same certificate.
    status(&new);
    let served = served_certificate(&new, &ca.pem);
    assert!(served.contains("CN = dockside-e2e"), "{served:?}");
    new.assert_running();
}

#[test]
fn check_config_names_the_tls_field_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let (cert, _) = ca.issue("one", "one");
    let (_, other_key) = ca.issue("two", "two");
    let config = dir.path().join("dockside.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:5000\ncache: {{dir: {0}/cache, max_size: 1GiB}}\n\
             upstreams: [{{name: docker.io, url: \"http://127.0.0.1:1\"}}]\n\
             tls: {{cert_file: {1}, key_file: {2}}}\n",
            dir.path().display(),
            cert.display(),
            other_key.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(crate::support::dockside::BIN);
    cmd.args(["check-config", "--config"]).arg(&config);
    let out = skopeo::run(cmd, Duration::from_secs(30));
    assert!(!out.success(), "{}", out.stdout);
    let want = format!(
        "tls.key_file: {:?} does not match the certificate in {:?}",
        other_key.display().to_string(),
        cert.display().to_string()
    );
    assert!(out.stderr.contains(&want), "{}", out.stderr);
    assert!(
        out.stderr.contains(&config.display().to_string()),
        "{}",
        out.stderr
    );
}
