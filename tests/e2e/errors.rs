//! Errors a client sees (OCI error JSON), `check-config`, `client-config`, the admin listener and
//! shutdown.

use std::process::Command;
use std::time::Duration;

use crate::support::dockside::{BIN, Config, Dockside, Upstream};
use crate::support::image::{Format, Image};
use crate::support::registry::{Auth, Registry};
use crate::support::skopeo::run;
use crate::support::tools;
use crate::support::{digest_of, http, skopeo, wait_for};

fn assert_oci_error(r: &http::Resp, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: status (body {})", r.snippet());
    assert_eq!(
        r.error_code().as_deref(),
        Some(code),
        "{what}: error code in {}",
        r.snippet()
    );
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.contains("json"), "{what}: Content-Type {ct:?}");
}

#[test]
fn write_methods_are_405_unsupported() {
    let reg = Registry::start(Auth::None);
    let d = Dockside::start(&Config::new(vec![Upstream::hub(&reg)]));
    let zero = format!("sha256:{}", "0".repeat(64));
    let before = reg.access_log();
    for (method, path) in [
        ("PUT", "/v2/library/x/manifests/v1".to_string()),
        ("POST", "/v2/library/x/blobs/uploads/".to_string()),
        (
            "PATCH",
            "/v2/library/x/blobs/uploads/some-upload".to_string(),
        ),
        (
            "PUT",
            format!("/v2/library/x/blobs/uploads/some-upload?digest={zero}"),
        ),
        ("DELETE", format!("/v2/library/x/manifests/{zero}")),
        ("DELETE", format!("/v2/library/x/blobs/{zero}")),
        ("POST", "/v2/x/blobs/uploads/?ns=docker.io".to_string()),
        ("OPTIONS", "/v2/library/x/manifests/v1".to_string()),
    ] {
        let r = http::request(
            method,
            &format!("{}{path}", d.url()),
            &[],
            Some(b"{}".to_vec()),
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_oci_error(&r, 405, "UNSUPPORTED", &format!("{method} {path}"));
    }
    assert_eq!(
        reg.access_log()[before.len()..].to_vec(),
        vec![],
        "write requests reached the upstream"
    );
}

#[test]
fn malformed_and_unknown_references_get_oci_errors() {
    let reg = Registry::start(Auth::None);
    let img = Image::generate(700, &[5_000], Format::Oci);
    skopeo::push(&reg, "library/x", "v1", &img);
    let d = Dockside::start(&Config::new(vec![Upstream::hub(&reg)]));
    let get = |path: &str| http::get_manifest(&format!("{}{path}", d.url()));

    // Malformed: answered by dockside itself, never proxied.
    let before = reg.access_log();
    let upper = format!("sha256:{}", "A".repeat(64));
    for path in [
        "/v2/library/x/blobs/sha256:zzzz".to_string(),
        "/v2/library/x/blobs/sha256:abc".to_string(),
        "/v2/library/x/blobs/md5:d41d8cd98f00b204e9800998ecf8427e".to_string(),
    ] {
        assert_oci_error(&get(&path), 400, "DIGEST_INVALID", &path);
    }
    // A manifest reference no manifest can have: 404 MANIFEST_UNKNOWN on GET and HEAD, as the
    // distribution spec's conformance suite (pull workflow) asks for `.INVALID_MANIFEST_NAME`.
    for path in [
        "/v2/library/x/manifests/.INVALID_MANIFEST_NAME".to_string(),
        format!("/v2/library/x/manifests/{upper}"),
    ] {
        assert_oci_error(&get(&path), 404, "MANIFEST_UNKNOWN", &path);
        let head = http::request("HEAD", &format!("{}{path}", d.url()), &[], None).unwrap();
        assert_eq!(head.status, 404, "HEAD {path}");
    }
    for path in [
        "/v2/Library/Upper/manifests/v1",
        "/v2/library/a..b/manifests/v1",
        "/v2/library/-bad/manifests/v1",
        "/v2/library//x/manifests/v1",
    ] {
        assert_oci_error(&get(path), 400, "NAME_INVALID", path);
    }
    // Dot segments and encoded slashes, sent verbatim (clients normalise them away): refused
    // with an OCI error, never proxied, never a local file.
    for path in [
        "/v2/library/../x/manifests/v1",
        "/v2/library/%2e%2e/x/manifests/v1",
        "/v2/library%2fx/manifests/v1",
        "/v2/library/x/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd",
        "/v2/library/x/blobs/../../../../etc/passwd",
    ] {
        let (status, body) = http::raw_get(&d.host(), path);
        assert!(
            (400..500).contains(&status),
            "{path}: want a 4xx, got {status} {body}"
        );
        assert!(
            body.contains("\"errors\""),
            "{path}: OCI error JSON: {body}"
        );
        assert!(!body.contains("root:"), "{path}: served a local file");
    }
    assert_eq!(
        reg.access_log()[before.len()..].to_vec(),
        vec![],
        "malformed requests reached the upstream"
    );

    // Well-formed but unknown upstream: the upstream's answer as an OCI error.
    assert_oci_error(
        &get("/v2/library/nope/manifests/v1"),
        404,
        "MANIFEST_UNKNOWN",
        "unknown repo",
    );
    assert_oci_error(
        &get("/v2/library/x/manifests/nosuchtag"),
        404,
        "MANIFEST_UNKNOWN",
        "unknown tag",
    );
    let absent = digest_of(b"no such manifest");
    assert_oci_error(
        &get(&format!("/v2/library/x/manifests/{absent}")),
        404,
        "MANIFEST_UNKNOWN",
        "unknown manifest digest",
    );
    let absent = digest_of(b"no such blob");
    let r = http::get(&format!("{}/v2/library/x/blobs/{absent}", d.url())).unwrap();
    assert_oci_error(&r, 404, "BLOB_UNKNOWN", "unknown blob");
    // HEAD of an unknown blob: 404 without a body.
    let r = http::request(
        "HEAD",
        &format!("{}/v2/library/x/blobs/{absent}", d.url()),
        &[],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 404, "HEAD unknown blob");
    // And the known ones still work after all that.
    let r = get("/v2/library/x/manifests/v1");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, img.manifest.data);
}

#[test]
fn serve_and_check_config_without_a_config_use_the_built_in_default() {
    let mut cmd = Command::new(BIN);
    cmd.arg("check-config");
    let out = run(cmd, Duration::from_secs(30));
    assert!(out.success(), "{}", out.stderr);
    assert!(
        out.stdout
            .contains("the built-in default config (config/dockside.yaml): ok (5 upstreams, default docker.io)"),
        "{}",
        out.stdout
    );

    // The README's first pull without internet runs this example.
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/examples/local-registry.yaml"
    );
    let mut cmd = Command::new(BIN);
    cmd.args(["check-config", "--config", example]);
    let out = run(cmd, Duration::from_secs(30));
    assert!(out.success(), "{example}: {}", out.stderr);

    // `serve` alone: the default config, its cache under the working directory. Only /v2/ and
    // the admin endpoints are asked, which reach no upstream.
    let d = Dockside::start(&Config::builtin());
    assert!(
        d.log()
            .contains("the built-in default config (config/dockside.yaml)"),
        "{}",
        d.log()
    );
    assert!(d.dir().join("dockside-cache/objects").is_dir());
    for _ in 0..5 {
        let r = http::get(&format!("{}/v2/", d.url())).unwrap();
        assert_eq!(r.status, 200);
    }
    // Each request's log line gives its time in milliseconds to the microsecond, without float
    // noise (`elapsed_ms=0.19750500000000001`).
    let times: Vec<String> = wait_for("5 request log lines", Duration::from_secs(30), || {
        let times: Vec<String> = d
            .log()
            .lines()
            .filter(|l| l.contains("path=\"/v2/\""))
            .filter_map(|l| {
                l.split("elapsed_ms=")
                    .nth(1)?
                    .split(' ')
                    .next()
                    .map(String::from)
            })
            .collect();
        (times.len() >= 5).then_some(times)
    });
    for t in &times {
        let decimals = t.split_once('.').map_or(0, |(_, d)| d.len());
        assert!(t.parse::<f64>().is_ok() && decimals <= 3, "elapsed_ms={t}");
    }
}

#[test]
fn check_config_accepts_valid_and_names_bad_keys_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream {
        name: "docker.io".into(),
        url: "http://127.0.0.1:9".into(),
        ..Default::default()
    };
    let good = Config::new(vec![up]).yaml(5000, 5001, &dir.path().join("cache"));
    let check = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("check-config").arg("--config").arg(&path);
        (run(cmd, Duration::from_secs(30)), path)
    };

    let (out, _) = check("good.yaml", &good);
    assert!(out.success(), "valid config rejected: {}", out.stderr);

    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unknown-key.yaml",
            format!("{good}bogus_key: 1\n"),
            vec!["bogus_key"],
        ),
        (
            "bad-ttl.yaml",
            good.replace("tag_ttl: 5m", "tag_ttl: banana"),
            vec!["tag_ttl", "banana"],
        ),
        (
            "bad-size.yaml",
            good.replace("max_size: 10GiB", "max_size: lots"),
            vec!["max_size", "lots"],
        ),
        (
            "upstream-key.yaml",
            good.replace("    url:", "    colour: blue\n    url:"),
            vec!["colour"],
        ),
        (
            "bad-default.yaml",
            good.replace(
                "default_upstream: \"docker.io\"",
                "default_upstream: \"nowhere.example\"",
            ),
            vec!["default_upstream", "nowhere.example"],
        ),
    ];
    for (name, text, needles) in cases {
        assert_ne!(text, good, "{name}: the test edit did not apply");
        let (out, path) = check(name, &text);
        assert!(
            !out.success() && !out.timed_out(),
            "{name}: accepted a bad config"
        );
        let msg = &out.stderr;
        for n in &needles {
            assert!(msg.contains(n), "{name}: message should name {n:?}: {msg}");
        }
        assert!(
            msg.contains(&*path.to_string_lossy()) || msg.contains(name),
            "{name}: names the file: {msg}"
        );
    }

    // `serve` refuses a bad config too, at once.
    let path = dir.path().join("bad-ttl.yaml");
    let mut cmd = Command::new(BIN);
    cmd.arg("serve").arg("--config").arg(&path);
    let out = run(cmd, Duration::from_secs(30));
    assert!(
        !out.success() && !out.timed_out(),
        "serve accepted a bad config"
    );
    assert!(
        out.stderr.contains("tag_ttl"),
        "serve names the key: {}",
        out.stderr
    );
}

#[test]
fn admin_endpoints_and_prompt_sigint_shutdown() {
    let reg = Registry::start(Auth::None);
    let img = Image::generate(710, &[5_000], Format::Oci);
    skopeo::push(&reg, "library/adm", "v1", &img);
    let mut d = Dockside::start(&Config::new(vec![Upstream::hub(&reg)]));
    let r = http::get_manifest(&format!("{}/v2/library/adm/manifests/v1", d.url()));
    assert_eq!(r.status, 200);

    for path in ["/healthz", "/readyz"] {
        let r = http::get(&format!("{}{path}", d.admin_url())).unwrap();
        assert_eq!(r.status, 200, "{path}");
    }
    // A blob (cold, then warm) and a missing tag, so that /metrics has series of several labels.
    let blob = format!("{}/v2/library/adm/blobs/{}", d.url(), img.layers[0].digest);
    for _ in 0..2 {
        assert_eq!(http::get(&blob).unwrap().status, 200);
    }
    let missing = http::get_manifest(&format!("{}/v2/library/adm/manifests/nope", d.url()));
    assert_eq!(missing.status, 404);
    let m = http::get(&format!("{}/metrics", d.admin_url())).unwrap();
    assert_eq!(m.status, 200, "/metrics");
    assert!(
        m.text().contains("dockside_"),
        "metrics carry dockside_ names:\n{}",
        m.snippet()
    );
    promtool_check_metrics(&m.text());
    // The registry API is not on the admin port.
    let r = http::get(&format!("{}/v2/library/adm/manifests/v1", d.admin_url())).unwrap();
    assert_ne!(r.status, 200, "registry API served on the admin listener");

    // SIGINT: a fast shutdown (no graceful drain), a clean exit, and the port closes.
    let (status, in_time) = d.stop();
    assert!(in_time, "dockside did not exit within 20s of SIGINT");
    assert!(status.success(), "exit status after SIGINT: {status}");
    let log = d.log();
    assert!(
        log.contains("signal=FastShutdown") && !log.contains("gracefully exiting"),
        "SIGINT must shut down fast:\n{}",
        crate::support::tail(&log, 10)
    );
    wait_for("the listener to close", Duration::from_secs(5), || {
        std::net::TcpStream::connect(("127.0.0.1", d.port))
            .is_err()
            .then_some(())
    });
}

/// `client-config` prints several files under `==> path <==` headers, writes them with `--out`,
/// and does not replace a file with other contents unless `--force` (a daemon.json usually has
/// settings of its own).
#[test]
fn client_config_prints_writes_and_keeps_other_files_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let client_config = |extra: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.args(["client-config", "--mirror", "http://10.0.0.1:5000"])
            .args(extra);
        run(cmd, Duration::from_secs(30))
    };
    let printed = client_config(&["--for", "containerd"]);
    assert!(printed.success(), "{}", printed.stderr);
    assert!(
        printed
            .stdout
            .contains("==> /etc/containerd/certs.d/ghcr.io/hosts.toml <==\n"),
        "{}",
        printed.stdout
    );

    let out = dir.path().to_str().unwrap();
    let daemon = dir.path().join("daemon.json");
    std::fs::write(&daemon, "{\"debug\": true}\n").unwrap();
    let kept = client_config(&["--for", "docker", "--out", out]);
    assert!(!kept.success(), "replaced an existing daemon.json");
    assert!(kept.stderr.contains("--force"), "{}", kept.stderr);
    assert_eq!(
        std::fs::read_to_string(&daemon).unwrap(),
        "{\"debug\": true}\n"
    );

    let forced = client_config(&["--for", "docker", "--out", out, "--force"]);
    assert!(forced.success(), "{}", forced.stderr);
    assert!(
        std::fs::read_to_string(&daemon)
            .unwrap()
            .contains("http://10.0.0.1:5000")
    );
    // Writing the same contents again needs no --force.
    let again = client_config(&["--for", "docker", "--out", out]);
    assert!(again.success(), "{}", again.stderr);
}

/// Prometheus's own linter (`promtool check metrics`, Debian's `prometheus` package) on an
/// exposition: it rejects what Prometheus could not scrape and names that break its conventions
/// (a counter without `_total`, a missing HELP, a unit out of place).
fn promtool_check_metrics(exposition: &str) {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = tools::command("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed");
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(exposition.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}\n{}{}\non:\n{exposition}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
