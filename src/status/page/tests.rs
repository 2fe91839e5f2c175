use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::*;
use crate::oci::Digest;
use crate::origin::{OriginKind, OriginName};
use crate::status::figures::Figures;
use crate::status::top::RepoBytes;
use crate::status::{RecentError, Sample};
use crate::store::Usage;

const HOSTILE: &str = r#"evil"/><script>alert(1)</script><img src=x onerror=alert(2)>"#;

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
}

fn view() -> View {
    let requests = Outcomes {
        hit: 3,
        miss: 1,
        total: 4,
        ..Outcomes::default()
    };
    let mut figures = Figures {
        served_cache: 5 << 20,
        fetched_upstream: 1 << 20,
        requests: requests.clone(),
        ..Figures::default()
    };
    figures.upstreams.push(UpstreamFigures {
        name: "docker.io".into(),
        requests,
        throttled: 2,
        ratelimit_remaining: Some(97),
    });
    View {
        now: at(100),
        usage: Usage {
            bytes: 600,
            objects: 7,
            max_bytes: 1000,
            pinned_bytes: 100,
            ..Usage::default()
        },
        figures,
        samples: vec![
            Sample {
                at: at(70),
                from_cache: 0,
                from_upstream: 0,
            },
            Sample {
                at: at(85),
                from_cache: 3000,
                from_upstream: 1500,
            },
            Sample {
                at: at(100),
                from_cache: 6000,
                from_upstream: 1500,
            },
        ],
        fills_in_flight: 1,
        fills: vec![FillProgress {
            digest: Digest::of(b"layer"),
            origin: OriginName::new(OriginKind::Upstream, &Arc::from("docker.io")),
            received: 250,
            len: Some(1000),
            readers: 3,
        }],
        top: vec![RepoBytes {
            upstream: "docker.io".into(),
            repository: HOSTILE.into(),
            bytes: 4096,
            over: 0,
        }],
        errors: vec![RecentError {
            at: at(40),
            status: 404,
            code: "MANIFEST_UNKNOWN".into(),
            upstream: Some("docker.io".into()),
            repository: Some("library/nope".into()),
            message: format!("manifest unknown: {HOSTILE}"),
        }],
        cluster: None,
    }
}

/// `data-value` of the first element with `data-figure="name"` after `from`.
fn figure_value<'a>(html: &'a str, from: &str, name: &str) -> &'a str {
    let start = html.find(from).unwrap_or_else(|| panic!("no {from}"));
    let rest = &html[start..];
    let at = rest
        .find(&format!(r#"data-figure="{name}" data-value=""#))
        .unwrap();
    rest[at..].split('"').nth(3).unwrap()
}

#[test]
fn hostile_names_and_messages_are_shown_as_text() {
    let html = render(&view());
    assert!(!html.contains("<script"), "a script got in");
    assert!(!html.contains("<img"), "an element got in");
    assert!(!html.contains(r#"evil"/>"#), "an attribute was closed");
    assert!(html.contains("evil&quot;/&gt;&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert_eq!(
        html.matches("&lt;script&gt;").count(),
        3,
        "repository (cell and attribute) and message"
    );
}

#[test]
fn shows_every_figure_with_its_raw_value() {
    let html = render(&view());
    for (name, value) in [
        ("cache_bytes", "600"),
        ("cache_limit_bytes", "1000"),
        ("cache_pinned_bytes", "100"),
        ("cache_objects", "7"),
        ("hit_ratio", "0.750000"),
        ("served_cache_bytes", "5242880"),
        ("fetched_upstream_bytes", "1048576"),
        ("fills_in_flight", "1"),
    ] {
        assert_eq!(figure_value(&html, "<body>", name), value, "{name}");
    }
    let row = r#"<tr data-upstream="docker.io">"#;
    assert_eq!(figure_value(&html, row, "requests"), "4");
    assert_eq!(figure_value(&html, row, "hits"), "3");
    assert_eq!(figure_value(&html, row, "throttled"), "2");
    assert_eq!(figure_value(&html, row, "ratelimit_remaining"), "97");
    assert!(html.contains(r#"<progress max="1000" value="250"></progress>"#));
    assert_eq!(figure_value(&html, "<tr data-fill=", "readers"), "3");
    assert!(html.contains("60 s ago"));
    assert!(html.contains("<polyline"), "the chart has lines");
}

#[test]
fn is_one_self_contained_document_that_refreshes() {
    let mut v = view();
    v.top[0].repository = "library/app".into();
    v.errors[0].message = "manifest unknown".into();
    let html = render(&v);
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains(r#"<meta http-equiv="refresh" content="10">"#));
    // Nothing to fetch: no scripts, stylesheets, images or fonts from anywhere.
    for outside in [
        "http:", "https:", "src=", "<link", "<script", "@import", "url(",
    ] {
        assert!(!html.contains(outside), "{outside} in the page");
    }
}

#[test]
fn the_cluster_section_only_with_a_cluster() {
    let mut v = view();
    assert!(!render(&v).contains("Cluster members"));
    v.cluster = Some(vec![
        Member {
            addr: "10.0.0.1:5000".into(),
            me: true,
            up: true,
        },
        Member {
            addr: "10.0.0.2:5000".into(),
            me: false,
            up: false,
        },
    ]);
    let html = render(&v);
    assert!(html.contains("10.0.0.1:5000 (this replica)"));
    let down = r#"<tr data-member="10.0.0.2:5000">"#;
    assert_eq!(figure_value(&html, down, "member_state"), "down");
}

#[test]
fn an_empty_mirror_renders_placeholders() {
    let mut v = view();
    v.figures = Figures::default();
    (v.samples, v.fills, v.top, v.errors) = (vec![], vec![], vec![], vec![]);
    let html = render(&v);
    assert_eq!(figure_value(&html, "<body>", "hit_ratio"), "");
    assert!(html.contains("no requests yet") && html.contains("nothing served yet"));
    assert!(html.contains(r#"data-chart="empty""#));
}
