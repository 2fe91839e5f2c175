//! The status page on the admin listener, loaded by a real browser (headless Chromium, which
//! only ever talks to loopback): its figures are those of `/metrics` at the same moment, the
//! names it shows are text and never markup, and with `client_auth` it asks for credentials.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::pull::pull_oci_and_check;
use crate::support::dockside::{Config, Dockside, Upstream};
use crate::support::image::{Format, Image};
use crate::support::registry::{Auth, Registry};
use crate::support::{http, skopeo, tools, wait_for};

/// A repository name written as entities, which the page must show as they are: it fails as
/// NAME_INVALID and the page lists the error with its message. (`<` and `>` themselves never
/// reach dockside: clients and pingora percent-encode them; the escaping of every character is
/// unit-tested in `status::html`.)
const HOSTILE: &str = "x&lt;b&gt;it's";

#[test]
fn the_status_page_in_a_browser_shows_the_figures_of_metrics() {
    let reg = Registry::start(Auth::None);
    let img = Image::generate(7001, &[300_000, 40_000], Format::Oci);
    skopeo::push(&reg, "library/app", "v1", &img);
    let d = Dockside::start(&Config::new(vec![Upstream::hub(&reg)]));
    // Cold, then warm: misses, hits, bytes from upstream and from the cache.
    pull_oci_and_check(&d, "library/app:v1", &img);
    pull_oci_and_check(&d, "library/app:v1", &img);
    let missing = http::get_manifest(&format!("{}/v2/library/missing/manifests/v1", d.url()));
    assert_eq!(missing.status, 404);
    let hostile = http::get(&format!("{}/v2/{HOSTILE}/manifests/v1", d.url())).unwrap();
    assert_eq!(hostile.status, 400, "{}", hostile.snippet());
    // Every fill has committed, so nothing moves between the page and /metrics.
    wait_for("fills to end", Duration::from_secs(30), || {
        (d.metric("dockside_fills_in_flight") == Some(0.0)).then_some(())
    });

    let page = format!("{}/", d.admin_url());
    let dom = chromium(&["--dump-dom", &page]);
    let metrics = Metrics::parse(
        &http::get(&format!("{}/metrics", d.admin_url()))
            .unwrap()
            .text(),
    );
    assert_figures_match(&dom, &metrics);

    // What the counters do not have: the repositories and the errors.
    let top = section(&dom, "Top repositories");
    let app = row(top, r#"data-repository="library/app""#);
    let served = figure(app, "served_bytes");
    assert!(served >= img.layer_bytes() as f64 * 2.0, "served {served}");
    let listed: f64 = figures(top, "served_bytes").iter().sum();
    assert_eq!(
        listed,
        metrics.sum("dockside_served_bytes_total", &[]),
        "every byte served is a repository's"
    );
    let errors = section(&dom, "Recent errors");
    assert!(
        errors.contains("MANIFEST_UNKNOWN") && errors.contains("library/missing"),
        "{errors}"
    );
    assert!(errors.contains("NAME_INVALID"), "{errors}");
    // The browser shows the name as it was sent: its text is `x&lt;b&gt;it's` (serialized
    // with each `&` escaped), not `x<b>it's`.
    assert!(errors.contains("x&amp;lt;b&amp;gt;it's"), "{errors}");
    assert!(dom.contains("<svg class=\"chart\""), "no chart");

    let shot = target_dir().join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let screenshot = format!("--screenshot={}", shot.display());
    chromium(&[
        &screenshot,
        "--window-size=1100,1300",
        "--hide-scrollbars",
        &page,
    ]);
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "not a screenshot"
    );
}

#[test]
fn with_client_auth_the_status_page_asks_for_the_registry_credentials() {
    let reg = Registry::start(Auth::None);
    let files = tempfile::tempdir().unwrap();
    let token_file = files.path().join("ci.token");
    std::fs::write(&token_file, "status-token-0123456789\n").unwrap();
    let mut cfg = Config::new(vec![Upstream::hub(&reg)]);
    cfg.extra_yaml =
        format!("client_auth:\n  tokens: [{{ name: ci, token_file: {token_file:?} }}]\n");
    let d = Dockside::start(&cfg);
    for path in ["/", "/status"] {
        let url = format!("{}{path}", d.admin_url());
        let anonymous = http::get(&url).unwrap();
        assert_eq!(anonymous.status, 401, "{path}");
        assert_eq!(
            anonymous.header("www-authenticate").as_deref(),
            Some(r#"Basic realm="dockside""#)
        );
        assert!(!anonymous.text().contains("<html"));
        let wrong = [("Authorization", "Bearer not-the-token-0123456789")];
        assert_eq!(
            http::request("GET", &url, &wrong, None).unwrap().status,
            401
        );
        let right = [("Authorization", "Bearer status-token-0123456789")];
        let page = http::request("GET", &url, &right, None).unwrap();
        assert_eq!(page.status, 200, "{path}");
        assert!(page.text().contains("dockside status"));
    }
    // The scrape endpoints stay as they were: Prometheus has no registry credentials.
    assert_eq!(
        http::get(&format!("{}/metrics", d.admin_url()))
            .unwrap()
            .status,
        200
    );
}

/// Runs headless Chromium on `args` and returns its stdout. It gets a throwaway profile, is
/// told to reach for nothing (no updates, sync, safe browsing or metrics upload), and is a
/// child of this test waited for by PID.
fn chromium(args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tools::command("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--disable-breakpad",
        "--metrics-recording-only",
        "--no-first-run",
        "--no-default-browser-check",
        "--no-proxy-server",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args)
    .env("HOME", profile.path());
    let out = skopeo::run(cmd, Duration::from_secs(120));
    out.assert_ok();
    out.stdout
}

/// Where cargo puts its output (`target/`): the screenshot stays there for CI to keep.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target/tmp has a parent")
        .to_path_buf()
}

/// Checks every figure the page shows against the series of `/metrics` it stands for.
fn assert_figures_match(dom: &str, m: &Metrics) {
    let requests = "dockside_requests_total";
    let outcomes = |labels: &[(&str, &str)], names: &[&str]| -> f64 {
        names
            .iter()
            .map(|o| {
                let mut l = labels.to_vec();
                l.push(("outcome", o));
                m.sum(requests, &l)
            })
            .sum()
    };
    let single = [
        ("cache_bytes", m.sum("dockside_cache_bytes", &[])),
        (
            "cache_limit_bytes",
            m.sum("dockside_cache_limit_bytes", &[]),
        ),
        (
            "cache_pinned_bytes",
            m.sum("dockside_cache_pinned_bytes", &[]),
        ),
        ("cache_objects", m.sum("dockside_cache_objects", &[])),
        ("evicted_bytes", m.sum("dockside_evicted_bytes_total", &[])),
        (
            "served_cache_bytes",
            m.sum("dockside_served_bytes_total", &[("source", "cache")]),
        ),
        (
            "served_fill_bytes",
            m.sum("dockside_served_bytes_total", &[("source", "fill")]),
        ),
        (
            "fetched_upstream_bytes",
            m.sum("dockside_upstream_received_bytes_total", &[]),
        ),
        (
            "manifests_from_cache",
            outcomes(&[("kind", "manifest")], &["hit", "stale"]),
        ),
        ("fills_in_flight", m.sum("dockside_fills_in_flight", &[])),
    ];
    for (name, want) in single {
        assert_eq!(figure(dom, name), want, "{name}");
    }
    for name in [
        "cache_bytes",
        "served_cache_bytes",
        "fetched_upstream_bytes",
        "manifests_from_cache",
    ] {
        assert!(
            figure(dom, name) > 0.0,
            "{name} is 0: the pulls did not count"
        );
    }
    let cached = outcomes(&[], &["hit", "stale"]);
    let answered = cached + outcomes(&[], &["coalesced", "miss", "pass"]);
    let ratio = figure(dom, "hit_ratio");
    assert!(
        (ratio - cached / answered).abs() < 1e-6,
        "hit ratio {ratio}, metrics {cached}/{answered}"
    );

    let hub = row(section(dom, "Upstreams"), r#"data-upstream="docker.io""#);
    let up = [("upstream", "docker.io")];
    assert_eq!(figure(hub, "requests"), m.sum(requests, &up));
    assert_eq!(figure(hub, "hits"), outcomes(&up, &["hit"]));
    assert_eq!(figure(hub, "misses"), outcomes(&up, &["miss"]));
    assert_eq!(figure(hub, "errors"), outcomes(&up, &["error"]));
    assert_eq!(
        figure(hub, "throttled"),
        m.sum("dockside_upstream_throttled_total", &up)
    );
    assert!(
        figure(hub, "hits") > 0.0 && figure(hub, "misses") > 0.0 && figure(hub, "errors") > 0.0
    );
}

/// The text from a `<h2>` starting with `title` to the next `<h2>` (or the end).
fn section<'a>(dom: &'a str, title: &str) -> &'a str {
    let start = dom
        .find(&format!("<h2>{title}"))
        .unwrap_or_else(|| panic!("no section {title} in\n{dom}"));
    let rest = &dom[start + 4..];
    &rest[..rest.find("<h2>").unwrap_or(rest.len())]
}

/// The `<tr …>` element whose attributes include `attr`.
fn row<'a>(html: &'a str, attr: &str) -> &'a str {
    let start = html
        .find(&format!("<tr {attr}"))
        .unwrap_or_else(|| panic!("no row {attr} in\n{html}"));
    let rest = &html[start..];
    &rest[..rest.find("</tr>").expect("a closed row")]
}

/// Every `data-value` of the elements with `data-figure="name"` in `html`, in order.
fn figures(html: &str, name: &str) -> Vec<f64> {
    let marker = format!(r#"data-figure="{name}" data-value=""#);
    html.match_indices(&marker)
        .map(|(i, _)| {
            let value = html[i + marker.len()..].split('"').next().unwrap();
            value
                .parse()
                .unwrap_or_else(|_| panic!("{name}: {value:?} is not a number"))
        })
        .collect()
}

/// The one figure `name` in `html`.
fn figure(html: &str, name: &str) -> f64 {
    match figures(html, name)[..] {
        [value] => value,
        ref other => panic!("{name}: {} figures in\n{html}", other.len()),
    }
}

type Labels = Vec<(String, String)>;

/// `/metrics` as series: name → (labels, value).
struct Metrics(BTreeMap<String, Vec<(Labels, f64)>>);

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut series: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (key, value) = line.rsplit_once(' ').expect("series value");
            let (name, labels) = match key.split_once('{') {
                Some((name, rest)) => (name, labels_of(rest.trim_end_matches('}'))),
                None => (key, Vec::new()),
            };
            let value = value.parse().expect("a number");
            series
                .entry(name.to_string())
                .or_default()
                .push((labels, value));
        }
        Metrics(series)
    }

    /// The sum of `name`'s series that have all of `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let all = self.0.get(name).map(Vec::as_slice).unwrap_or_default();
        all.iter()
            .filter(|(have, _)| {
                labels
                    .iter()
                    .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
            })
            .map(|(_, value)| value)
            .sum()
    }
}

fn labels_of(text: &str) -> Labels {
    text.split("\",")
        .filter_map(|pair| {
            let (k, v) = pair.split_once("=\"")?;
            Some((k.to_string(), v.trim_end_matches('"').to_string()))
        })
        .collect()
}
