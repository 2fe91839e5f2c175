//! The last hour's traffic as an inline SVG: bytes per second served from the cache and
//! fetched from upstreams, one point per interval between two samples.

use std::fmt::Write;
use std::time::{Duration, SystemTime};

use super::Sample;
use super::html::escape;
use crate::config::human_bytes as bytes;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 170.0;
/// Room for the axis labels.
const PAD: f64 = 24.0;
const SPAN: Duration = Duration::from_secs(3600);

/// One interval's rates, in bytes per second, placed at the interval's end.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Point {
    at: SystemTime,
    cache: f64,
    upstream: f64,
}

fn rates(samples: &[Sample]) -> Vec<Point> {
    samples
        .windows(2)
        .filter_map(|w| {
            let secs = w[1].at.duration_since(w[0].at).ok()?.as_secs_f64();
            (secs > 0.0).then(|| Point {
                at: w[1].at,
                cache: w[1].from_cache.saturating_sub(w[0].from_cache) as f64 / secs,
                upstream: w[1].from_upstream.saturating_sub(w[0].from_upstream) as f64 / secs,
            })
        })
        .collect()
}

/// The chart for the hour up to `now`.
pub fn traffic(samples: &[Sample], now: SystemTime) -> String {
    let points = rates(samples);
    let mut svg = format!(
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" aria-label="traffic over the last hour"><title>Bytes per second served from the cache and fetched upstream, last hour</title>"#
    );
    let (left, bottom) = (PAD * 2.5, HEIGHT - PAD);
    let _ = write!(
        svg,
        r##"<line x1="{left}" y1="{bottom}" x2="{WIDTH}" y2="{bottom}" stroke="#999"/><text x="{left}" y="{HEIGHT}" font-size="11">−60 min</text><text x="{}" y="{HEIGHT}" font-size="11" text-anchor="end">now</text>"##,
        WIDTH
    );
    if points.is_empty() {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" font-size="13" text-anchor="middle" data-chart="empty">collecting samples: one every {} s</text></svg>"#,
            WIDTH / 2.0,
            HEIGHT / 2.0,
            super::SAMPLE_EVERY.as_secs()
        );
        return svg;
    }
    let top = points
        .iter()
        .map(|p| p.cache.max(p.upstream))
        .fold(1.0, f64::max);
    let label = escape(&format!("{}/s", bytes(top as u64)));
    let _ = write!(svg, r#"<text x="0" y="12" font-size="11">{label}</text>"#);
    let place = |p: &Point, rate: f64| {
        let age = now.duration_since(p.at).unwrap_or_default().as_secs_f64();
        let x = left + (WIDTH - left) * (1.0 - (age / SPAN.as_secs_f64()).min(1.0));
        let y = bottom - (bottom - PAD / 2.0) * rate / top;
        format!("{x:.1},{y:.1}")
    };
    for (series, colour, rate) in [
        (
            "cache",
            "#2a9d5c",
            (|p: &Point| p.cache) as fn(&Point) -> f64,
        ),
        ("upstream", "#e07a1f", |p: &Point| p.upstream),
    ] {
        let line: Vec<String> = points.iter().map(|p| place(p, rate(p))).collect();
        let _ = write!(
            svg,
            r#"<polyline data-series="{series}" fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            line.join(" ")
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn sample(secs: u64, from_cache: u64, from_upstream: u64) -> Sample {
        Sample {
            at: at(secs),
            from_cache,
            from_upstream,
        }
    }

    #[test]
    fn rates_are_per_second_between_samples() {
        let points = rates(&[
            sample(0, 0, 0),
            sample(10, 1000, 100),
            sample(20, 1000, 300),
        ]);
        assert_eq!(points.len(), 2);
        assert_eq!((points[0].cache, points[0].upstream), (100.0, 10.0));
        assert_eq!((points[1].cache, points[1].upstream), (0.0, 20.0));
        // A clock that stepped back makes no point rather than a huge one.
        assert!(rates(&[sample(10, 0, 0), sample(5, 10, 0)]).is_empty());
    }

    #[test]
    fn draws_one_line_per_source_scaled_to_the_peak() {
        let now = at(4000);
        let svg = traffic(
            &[
                sample(3400, 0, 0),
                sample(3700, 0, 0),
                sample(4000, 30_000, 0),
            ],
            now,
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("100 B/s"), "the peak is labelled: {svg}");
        // The last point is `now`, at the right edge; at the peak, at the top.
        let cache = svg.split(r#"data-series="cache""#).nth(1).unwrap();
        assert!(cache.contains("960.0,12.0\""), "{cache}");
        assert!(!svg.contains("data-chart=\"empty\""));
    }

    #[test]
    fn says_so_until_there_are_two_samples() {
        let svg = traffic(&[sample(0, 5, 5)], at(1));
        assert!(svg.contains(r#"data-chart="empty""#));
        assert!(!svg.contains("<polyline"));
    }
}
