//! The status page: one HTML document, rendered on the server from a [`View`]. Inline CSS and
//! SVG, no script, nothing fetched from elsewhere, so it works offline and behind any proxy.
//! Every figure carries `data-figure` and `data-value` (the raw number, as `/metrics` has it)
//! so a test, or a script of the operator's, can read it.

use std::fmt::Write;
use std::time::SystemTime;

use super::figures::{Outcomes, UpstreamFigures};
use super::html::{cell, count_cell, escape, figure, percent};
use super::view::{Member, View};
use super::{RecentError, chart};
use crate::config::human_bytes as bytes;
use crate::fill::FillProgress;

/// How often the browser reloads the page, in seconds.
pub const REFRESH_SECS: u64 = 10;

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1000px;\
color:#222;padding:0 1em}h1{font-size:1.4em;margin:0}h2{font-size:1.1em;margin:1.6em 0 .4em;\
border-bottom:1px solid #ddd}table{border-collapse:collapse;width:100%}th,td{text-align:left;\
padding:3px 8px;border-bottom:1px solid #eee;vertical-align:top}td.num,th.num{text-align:right;\
font-variant-numeric:tabular-nums}.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px \
solid #ddd;border-radius:6px;padding:8px 12px;min-width:130px}.card .fig{display:block;\
font-size:1.3em;font-weight:600}.muted{color:#777}.down{color:#b00020;font-weight:600}\
.up{color:#2a7d46}code{font-size:.9em}.msg{word-break:break-word}";

/// The whole page.
pub fn render(view: &View) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let _ = write!(
        out,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_SECS}"><meta name="viewport" content="width=device-width"><title>dockside status</title><style>{STYLE}</style></head><body><h1>dockside status</h1><p class="muted">version {} · {} · refreshes every {REFRESH_SECS} s</p>"#,
        escape(env!("CARGO_PKG_VERSION")),
        escape(&humantime::format_rfc3339_seconds(view.now).to_string()),
    );
    cache(&mut out, view);
    traffic(&mut out, view);
    upstreams(&mut out, &view.figures.upstreams);
    fills(&mut out, view);
    top(&mut out, view);
    errors(&mut out, &view.errors, view.now);
    if let Some(members) = &view.cluster {
        cluster(&mut out, members);
    }
    out.push_str("</body></html>\n");
    out
}

fn card(out: &mut String, title: &str, name: &str, raw: &str, shown: &str) {
    let _ = write!(
        out,
        r#"<div class="card"><span class="muted">{}</span>"#,
        escape(title)
    );
    figure(out, name, raw, shown);
    out.push_str("</div>");
}

fn size_card(out: &mut String, title: &str, name: &str, n: u64) {
    card(out, title, name, &n.to_string(), &bytes(n));
}

fn cache(out: &mut String, view: &View) {
    let u = &view.usage;
    out.push_str(r#"<h2>Cache</h2><div class="cards">"#);
    size_card(out, "used", "cache_bytes", u.bytes);
    size_card(out, "of max_size", "cache_limit_bytes", u.max_bytes);
    size_card(out, "pinned", "cache_pinned_bytes", u.pinned_bytes);
    let objects = u.objects.to_string();
    card(out, "objects", "cache_objects", &objects, &objects);
    size_card(out, "evicted since start", "evicted_bytes", u.evicted_bytes);
    out.push_str("</div>");
    usage_bar(out, u.bytes, u.pinned_bytes, u.max_bytes);
    let full = if u.max_bytes == 0 {
        0.0
    } else {
        u.bytes as f64 / u.max_bytes as f64
    };
    let _ = write!(
        out,
        r#"<p class="muted">{} of max_size in use (dark: pinned)</p>"#,
        escape(&percent(full))
    );
}

/// A bar of the cache's size: pinned, the rest in use, free.
fn usage_bar(out: &mut String, used: u64, pinned: u64, max: u64) {
    let share = |n: u64| {
        if max == 0 {
            0.0
        } else {
            (n as f64 / max as f64).min(1.0) * 100.0
        }
    };
    let (used_pc, pinned_pc) = (share(used), share(pinned.min(used)));
    let _ = write!(
        out,
        r##"<svg width="100%" height="18" role="img" aria-label="cache use"><title>{} of {} used ({} pinned)</title><rect width="100%" height="18" rx="3" fill="#e8e8e8"/><rect width="{used_pc:.2}%" height="18" rx="3" fill="#4a7fd6"/><rect width="{pinned_pc:.2}%" height="18" rx="3" fill="#23427a"/></svg>"##,
        escape(&bytes(used)),
        escape(&bytes(max)),
        escape(&bytes(pinned))
    );
}

fn traffic(out: &mut String, view: &View) {
    let f = &view.figures;
    out.push_str(r#"<h2>Traffic since start</h2><div class="cards">"#);
    let (raw, shown) = match f.requests.hit_ratio() {
        Some(r) => (format!("{r:.6}"), percent(r)),
        None => ("".to_string(), "–".to_string()),
    };
    card(out, "hit ratio", "hit_ratio", &raw, &shown);
    size_card(
        out,
        "served from cache",
        "served_cache_bytes",
        f.served_cache,
    );
    size_card(out, "served from fills", "served_fill_bytes", f.served_fill);
    size_card(
        out,
        "fetched upstream",
        "fetched_upstream_bytes",
        f.fetched_upstream,
    );
    let manifests = f.manifests_from_cache.to_string();
    card(
        out,
        "manifest pulls saved",
        "manifests_from_cache",
        &manifests,
        &manifests,
    );
    out.push_str("</div>");
    out.push_str(
        r#"<p class="muted">Hit ratio: requests answered from the cache (hit, stale) of those answered with content. Bytes served from the cache cost the upstream nothing; each manifest answered from the cache is a pull Docker Hub's rate limit does not count.</p>"#,
    );
    out.push_str(&chart::traffic(&view.samples, view.now));
    out.push_str(r#"<p class="muted"><span style="color:#2a9d5c">━</span> served from cache · <span style="color:#e07a1f">━</span> fetched upstream (bytes per second)</p>"#);
}

fn upstreams(out: &mut String, rows: &[UpstreamFigures]) {
    out.push_str(r#"<h2>Upstreams</h2>"#);
    if rows.is_empty() {
        out.push_str(r#"<p class="muted">no requests yet</p>"#);
        return;
    }
    out.push_str(r#"<table><tr><th>upstream</th><th class="num">requests</th><th class="num">hits</th><th class="num">misses</th><th class="num">errors</th><th class="num">429s</th><th class="num">RateLimit-Remaining</th></tr>"#);
    for row in rows {
        upstream_row(out, row);
    }
    out.push_str("</table>");
}

fn upstream_row(out: &mut String, row: &UpstreamFigures) {
    let Outcomes {
        total,
        hit,
        miss,
        error,
        ..
    } = row.requests;
    let _ = write!(out, r#"<tr data-upstream="{}">"#, escape(&row.name));
    cell(out, &row.name);
    for (name, n) in [
        ("requests", total),
        ("hits", hit),
        ("misses", miss),
        ("errors", error),
        ("throttled", row.throttled),
    ] {
        count_cell(out, name, n);
    }
    let remaining = row.ratelimit_remaining.map(|n| n.to_string());
    let _ = write!(
        out,
        r#"<td class="num" data-figure="ratelimit_remaining" data-value="{0}">{1}</td></tr>"#,
        escape(remaining.as_deref().unwrap_or("")),
        escape(remaining.as_deref().unwrap_or("–"))
    );
}

fn fills(out: &mut String, view: &View) {
    out.push_str("<h2>Fills in flight ");
    let n = view.fills_in_flight.to_string();
    figure(out, "fills_in_flight", &n, &format!("({n})"));
    out.push_str("</h2>");
    if view.fills.is_empty() {
        out.push_str(r#"<p class="muted">none</p>"#);
        return;
    }
    out.push_str(r#"<table><tr><th>blob</th><th>from</th><th>progress</th><th class="num">readers</th></tr>"#);
    for fill in &view.fills {
        fill_row(out, fill);
    }
    out.push_str("</table>");
}

fn fill_row(out: &mut String, fill: &FillProgress) {
    let _ = write!(
        out,
        r#"<tr data-fill="{0}"><td><code title="{0}">{1}…</code></td>"#,
        escape(&fill.digest.to_string()),
        escape(&fill.digest.hex()[..12])
    );
    cell(out, &fill.origin.to_string());
    let progress = match fill.len {
        Some(len) if len > 0 => format!(
            r#"<progress max="{len}" value="{}"></progress> {} of {}"#,
            fill.received.min(len),
            escape(&bytes(fill.received)),
            escape(&bytes(len))
        ),
        _ => format!("{} of unknown length", escape(&bytes(fill.received))),
    };
    let _ = write!(out, "<td>{progress}</td>");
    count_cell(out, "readers", fill.readers as u64);
    out.push_str("</tr>");
}

fn top(out: &mut String, view: &View) {
    out.push_str(r#"<h2>Top repositories by bytes served</h2>"#);
    if view.top.is_empty() {
        out.push_str(r#"<p class="muted">nothing served yet</p>"#);
        return;
    }
    out.push_str(
        r#"<table><tr><th>upstream</th><th>repository</th><th class="num">served</th></tr>"#,
    );
    for repo in &view.top {
        let _ = write!(
            out,
            r#"<tr data-repository="{}">"#,
            escape(&repo.repository)
        );
        cell(out, &repo.upstream);
        cell(out, &repo.repository);
        let approx = if repo.over > 0 { "≤ " } else { "" };
        let _ = write!(
            out,
            r#"<td class="num" data-figure="served_bytes" data-value="{}">{approx}{}</td></tr>"#,
            repo.bytes,
            escape(&bytes(repo.bytes))
        );
    }
    out.push_str("</table>");
}

fn errors(out: &mut String, errors: &[RecentError], now: SystemTime) {
    out.push_str(r#"<h2>Recent errors</h2>"#);
    if errors.is_empty() {
        out.push_str(r#"<p class="muted">none</p>"#);
        return;
    }
    out.push_str(r#"<table><tr><th>when</th><th class="num">status</th><th>code</th><th>repository</th><th>message</th></tr>"#);
    for e in errors {
        let ago = now.duration_since(e.at).unwrap_or_default().as_secs();
        let when = humantime::format_rfc3339_seconds(e.at).to_string();
        let _ = write!(
            out,
            r#"<tr data-error="{}"><td title="{}">{ago} s ago</td>"#,
            e.status,
            escape(&when)
        );
        count_cell(out, "status", e.status.into());
        cell(out, &e.code);
        let repo = match (&e.upstream, &e.repository) {
            (Some(u), Some(r)) => format!("{u} {r}"),
            (_, Some(r)) => r.clone(),
            (Some(u), None) => u.clone(),
            (None, None) => "–".into(),
        };
        cell(out, &repo);
        let _ = write!(out, r#"<td class="msg">{}</td></tr>"#, escape(&e.message));
    }
    out.push_str("</table>");
}

fn cluster(out: &mut String, members: &[Member]) {
    out.push_str(r#"<h2>Cluster members</h2><table><tr><th>member</th><th>health</th></tr>"#);
    for m in members {
        let (class, state) = if m.up { ("up", "up") } else { ("down", "down") };
        let me = if m.me { " (this replica)" } else { "" };
        let _ = write!(
            out,
            r#"<tr data-member="{0}"><td>{0}{me}</td><td class="{class}" data-figure="member_state" data-value="{state}">{state}</td></tr>"#,
            escape(&m.addr)
        );
    }
    out.push_str("</table>");
}

#[cfg(test)]
mod tests;
