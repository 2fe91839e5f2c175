//! The page's figures, read from the [`Metrics`] counters (so they are the numbers `/metrics`
//! shows): sums over label values, never a walk of the store.

use std::collections::BTreeMap;

use prometheus::core::Collector;
use prometheus::proto::{Metric, MetricFamily};
use prometheus::{IntCounterVec, IntGaugeVec};

use crate::metrics::Metrics;

/// Request counts by outcome (`dockside_requests_total`'s `outcome` label).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcomes {
    pub hit: u64,
    pub stale: u64,
    pub coalesced: u64,
    pub miss: u64,
    pub pass: u64,
    pub error: u64,
    /// Every request counted, whatever its outcome.
    pub total: u64,
}

impl Outcomes {
    fn add(&mut self, outcome: &str, n: u64) {
        match outcome {
            "hit" => self.hit += n,
            "stale" => self.stale += n,
            "coalesced" => self.coalesced += n,
            "miss" => self.miss += n,
            "pass" => self.pass += n,
            "error" => self.error += n,
            _ => {}
        }
        self.total += n;
    }

    /// Requests answered from the cache (hit, stale) out of those answered with content (hit,
    /// stale, coalesced, miss, pass); `None` before the first.
    pub fn hit_ratio(&self) -> Option<f64> {
        let cached = self.hit + self.stale;
        let answered = cached + self.coalesced + self.miss + self.pass;
        (answered > 0).then(|| cached as f64 / answered as f64)
    }
}

/// One upstream's row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamFigures {
    pub name: String,
    pub requests: Outcomes,
    /// 429s received plus requests held back while a Retry-After ran.
    pub throttled: u64,
    /// Docker Hub's last `RateLimit-Remaining`, when it sent one.
    pub ratelimit_remaining: Option<i64>,
}

/// Everything the page shows that comes from the counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    pub requests: Outcomes,
    /// Body bytes sent to clients, by source: the cache, a fill in flight, pass-through.
    pub served_cache: u64,
    pub served_fill: u64,
    pub served_pass: u64,
    /// Blob bytes received from upstreams.
    pub fetched_upstream: u64,
    /// Manifest requests answered from the cache: each would be a pull on Docker Hub's limit.
    pub manifests_from_cache: u64,
    pub upstreams: Vec<UpstreamFigures>,
}

impl Figures {
    pub fn read(metrics: &Metrics) -> Figures {
        let mut figures = Figures::default();
        let mut upstreams: BTreeMap<String, UpstreamFigures> = BTreeMap::new();
        for (labels, n) in counters(&metrics.requests) {
            let outcome = label(&labels, "outcome");
            figures.requests.add(outcome, n);
            if label(&labels, "kind") == "manifest" && matches!(outcome, "hit" | "stale") {
                figures.manifests_from_cache += n;
            }
            row(&mut upstreams, &labels).requests.add(outcome, n);
        }
        for (labels, n) in counters(&metrics.served_bytes) {
            match label(&labels, "source") {
                "cache" => figures.served_cache += n,
                "fill" => figures.served_fill += n,
                _ => figures.served_pass += n,
            }
        }
        figures.fetched_upstream = counters(&metrics.upstream_bytes).map(|(_, n)| n).sum();
        for (labels, n) in counters(&metrics.upstream_throttled) {
            row(&mut upstreams, &labels).throttled += n;
        }
        for (labels, n) in gauges(&metrics.upstream_ratelimit_remaining) {
            row(&mut upstreams, &labels).ratelimit_remaining = Some(n);
        }
        figures.upstreams = upstreams.into_values().collect();
        figures
    }
}

type Labels = Vec<(String, String)>;

fn row<'a>(
    rows: &'a mut BTreeMap<String, UpstreamFigures>,
    labels: &Labels,
) -> &'a mut UpstreamFigures {
    let name = label(labels, "upstream").to_string();
    rows.entry(name.clone()).or_insert_with(|| UpstreamFigures {
        name,
        ..UpstreamFigures::default()
    })
}

fn label<'a>(labels: &'a Labels, name: &str) -> &'a str {
    labels
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

fn series(metric: &Metric) -> Labels {
    metric
        .get_label()
        .iter()
        .map(|l| (l.name().to_string(), l.value().to_string()))
        .collect()
}

fn counters(vec: &IntCounterVec) -> impl Iterator<Item = (Labels, u64)> {
    values(vec.collect(), |m| m.get_counter().get_value() as u64)
}

fn gauges(vec: &IntGaugeVec) -> impl Iterator<Item = (Labels, i64)> {
    values(vec.collect(), |m| m.get_gauge().get_value() as i64)
}

/// Every series of `families` with its labels and value.
fn values<T>(
    families: Vec<MetricFamily>,
    value: impl Fn(&Metric) -> T,
) -> impl Iterator<Item = (Labels, T)> {
    let all: Vec<(Labels, T)> = families
        .iter()
        .flat_map(|f| f.get_metric())
        .map(|m| (series(m), value(m)))
        .collect();
    all.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_counters_by_upstream_outcome_and_source() {
        let m = Metrics::new();
        let requests = |up: &str, kind: &str, outcome: &str, n: u64| {
            m.requests.with_label_values(&[up, kind, outcome]).inc_by(n)
        };
        requests("docker.io", "manifest", "hit", 3);
        requests("docker.io", "blob", "hit", 5);
        requests("docker.io", "blob", "miss", 2);
        requests("docker.io", "manifest", "stale", 1);
        requests("quay.io", "blob", "error", 4);
        requests("quay.io", "blob", "coalesced", 1);
        m.served_bytes
            .with_label_values(&["docker.io", "blob", "cache"])
            .inc_by(1000);
        m.served_bytes
            .with_label_values(&["quay.io", "blob", "fill"])
            .inc_by(70);
        m.upstream_bytes.with_label_values(&["quay.io"]).inc_by(70);
        m.upstream_throttled
            .with_label_values(&["docker.io", "true"])
            .inc_by(2);
        m.upstream_ratelimit_remaining
            .with_label_values(&["docker.io"])
            .set(98);
        let f = Figures::read(&m);
        assert_eq!((f.requests.hit, f.requests.total), (8, 16));
        assert_eq!(f.manifests_from_cache, 4);
        assert_eq!(
            (f.served_cache, f.served_fill, f.fetched_upstream),
            (1000, 70, 70)
        );
        let hub = &f.upstreams[0];
        assert_eq!(hub.name, "docker.io");
        assert_eq!(
            (hub.requests.hit, hub.requests.miss, hub.throttled),
            (8, 2, 2)
        );
        assert_eq!(hub.ratelimit_remaining, Some(98));
        let quay = &f.upstreams[1];
        assert_eq!((quay.requests.error, quay.requests.total), (4, 5));
        assert_eq!(quay.ratelimit_remaining, None);
        // (hit 8 + stale 1) of (9 + coalesced 1 + miss 2); errors are not answers.
        assert_eq!(f.requests.hit_ratio(), Some(9.0 / 12.0));
        assert_eq!(Outcomes::default().hit_ratio(), None);
    }
}
