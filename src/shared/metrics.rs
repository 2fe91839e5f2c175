//! The shared tier's metrics, registered into the mirror's [`Metrics`].

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts};

use crate::metrics::Metrics;

pub struct TierMetrics {
    /// Requests to the tier, by operation (get, head, put, multipart, copy, delete, list) and
    /// outcome (ok, not_found, exists, error, timeout, skipped: the circuit was open).
    pub requests: IntCounterVec,
    /// Time to the tier's answer, by operation.
    pub latency: HistogramVec,
    /// Bytes read from and written to the tier, by direction (read, write).
    pub bytes: IntCounterVec,
    /// Write-behind, by outcome (uploaded, present, dropped: queue full, gone: evicted
    /// locally first, failed).
    pub uploads: IntCounterVec,
    /// Objects in the tier whose bytes did not match their digest (removed, never served as
    /// complete).
    pub corrupt: IntCounterVec,
    /// 1 while the circuit is open and the tier is skipped.
    pub circuit_open: IntGauge,
}

impl TierMetrics {
    pub fn new(metrics: &Metrics) -> TierMetrics {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            metrics.register(Box::new(c.clone()));
            c
        };
        let buckets = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let opts = |name: &str, help: &str| HistogramOpts::new(name, help).buckets(buckets.clone());
        let latency = HistogramVec::new(
            opts(
                "dockside_shared_request_seconds",
                "Time until the shared tier answered a request, by operation.",
            ),
            &["op"],
        )
        .expect("valid metric");
        metrics.register(Box::new(latency.clone()));
        let circuit_open = IntGauge::new(
            "dockside_shared_circuit_open",
            "1 while the shared tier's circuit is open and it is skipped.",
        )
        .expect("valid metric");
        metrics.register(Box::new(circuit_open.clone()));
        TierMetrics {
            requests: counter(
                "dockside_shared_requests_total",
                "Requests to the shared tier, by operation and outcome.",
                &["op", "outcome"],
            ),
            bytes: counter(
                "dockside_shared_bytes_total",
                "Bytes read from and written to the shared tier, by direction.",
                &["direction"],
            ),
            uploads: counter(
                "dockside_shared_uploads_total",
                "Objects written behind to the shared tier, by outcome.",
                &["outcome"],
            ),
            corrupt: counter(
                "dockside_shared_corrupt_objects_total",
                "Shared-tier objects whose bytes did not match their digest, by kind.",
                &["kind"],
            ),
            latency,
            circuit_open,
        }
    }

    pub fn request(&self, op: &str, outcome: &str, took: Option<Duration>) {
        self.requests.with_label_values(&[op, outcome]).inc();
        if let Some(took) = took {
            self.latency
                .with_label_values(&[op])
                .observe(took.as_secs_f64());
        }
    }

    pub fn upload(&self, outcome: &str) {
        self.uploads.with_label_values(&[outcome]).inc();
    }

    pub fn read(&self, bytes: u64) {
        self.bytes.with_label_values(&["read"]).inc_by(bytes);
    }

    pub fn written(&self, bytes: u64) {
        self.bytes.with_label_values(&["write"]).inc_by(bytes);
    }
}
