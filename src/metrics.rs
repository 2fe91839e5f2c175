//! Every Prometheus metric dockside exports, registered once per [`Metrics`] instance (not in the
//! global registry, so several mirrors can run in one test process).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::store::{StoreError, Usage};

/// The origin kind whose metrics also go to the `upstream`-labelled series.
const UPSTREAM: &str = "upstream";

pub struct Metrics {
    registry: Registry,
    /// Requests answered, by upstream, kind (manifest, blob, tag, tags_list, referrers) and
    /// outcome (hit, miss, coalesced, stale, pass, error).
    pub requests: IntCounterVec,
    /// Body bytes sent to clients, by upstream, kind and source (cache, fill).
    pub served_bytes: IntCounterVec,
    /// Requests dockside sent upstream, by upstream, method and status (or "error").
    pub upstream_requests: IntCounterVec,
    /// Bytes received from upstreams into fills, by upstream.
    pub upstream_bytes: IntCounterVec,
    /// Bytes received into fills, by origin kind (upstream, …) and origin name.
    pub origin_bytes: IntCounterVec,
    /// Fills that ended, by origin kind, origin name and outcome (verified, failed).
    pub origin_fills: IntCounterVec,
    /// Fills currently running.
    pub fills_in_flight: IntGauge,
    /// Requests that joined a fill another request started.
    pub coalesced: IntCounterVec,
    /// Upstream content that did not hash to its digest (never cached).
    pub digest_mismatches: IntCounterVec,
    /// Tag answers served from cache because the upstream failed.
    pub stale_served: IntCounterVec,
    /// Bytes of committed objects on disk.
    pub cache_bytes: IntGauge,
    /// Committed objects on disk.
    pub cache_objects: IntGauge,
    /// The configured cache size limit.
    pub cache_limit_bytes: IntGauge,
    pub cache_pinned_bytes: IntGauge,
    pub cache_unlinks_pending: IntGauge,
    pub cache_index_checked: IntGauge,
    pub evictions: IntCounter,
    pub evicted_bytes: IntCounter,
    /// Blobs served pass-through because they can never fit the cache.
    pub oversize_blobs: IntCounterVec,
    /// Writes to the cache that failed (the object was served but not kept), by object
    /// (blob, manifest) and kind (no_space, io).
    pub store_write_errors: IntCounterVec,
    pub upstream_retries: IntCounterVec,
    pub upstream_resumes: IntCounterVec,
    /// 429s received, and requests not sent while an upstream's Retry-After runs.
    pub upstream_throttled: IntCounterVec,
    pub upstream_ratelimit_remaining: IntGaugeVec,
    /// Fetches of short-lived upstream credentials (ECR, GCP, ACR, helpers), by result.
    pub upstream_credential_fetches: IntCounterVec,
    /// 1 while a URL's circuit is closed, 0 while it is skipped.
    pub upstream_url_up: IntGaugeVec,
    /// Requests that moved on to an upstream's next URL.
    pub upstream_failovers: IntCounterVec,
    /// From sending a request upstream to its response headers.
    pub upstream_first_byte: HistogramVec,
    /// A whole blob download, first request to verified last byte.
    pub fill_duration: HistogramVec,
    /// Constant 1, labelled with the version.
    pub build_info: IntGaugeVec,
    /// Client connections open on the registry listeners (`limits.max_connections`).
    pub client_connections: IntGauge,
    /// Client connections closed at once because `limits.max_connections` were open.
    pub client_connections_refused: IntCounter,
    /// Client connections closed by a limit, by reason (header_timeout).
    pub client_timeouts: IntCounterVec,
    /// Looks at changed TLS files, by result (reloaded, rejected).
    pub tls_reloads: IntCounterVec,
    /// notAfter of the certificate served, in Unix seconds, by `cert_file`; no series without
    /// `tls:`. Alert on it: a rotation that keeps failing leaves the old certificate serving.
    pub tls_certificate_expiry: IntGaugeVec,
    /// Requests between cluster members, by direction (sent, received), mode (fill, held) and
    /// outcome (ok, not_found, failed; refused for a received one whose proof failed).
    pub peer_requests: IntCounterVec,
    /// Cluster members this replica knows, by state (up, down); itself counted up.
    pub cluster_members: IntGaugeVec,
    /// Blob fills started, by role: owned (this replica fetches from upstream) or forwarded
    /// (it streams from the owner).
    pub cluster_fills: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let plain_counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let opts = HistogramOpts::new(name, help).buckets(buckets);
            let h = HistogramVec::new(opts, labels).expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let metrics = Metrics {
            peer_requests: counter(
                "dockside_peer_requests_total",
                "Requests between cluster members, by direction, mode and outcome.",
                &["direction", "mode", "outcome"],
            ),
            cluster_members: gauge_vec(
                "dockside_cluster_members",
                "Cluster members this replica knows, by state (up, down).",
                &["state"],
            ),
            cluster_fills: counter(
                "dockside_cluster_fills_total",
                "Blob fills started, by role: owned (fetched upstream here) or forwarded (streamed from the owner).",
                &["role"],
            ),
            upstream_first_byte: histogram(
                "dockside_upstream_first_byte_seconds",
                "Time from sending a request to an upstream to its response headers.",
                &["upstream", "method"],
                prometheus::exponential_buckets(0.005, 2.0, 14).expect("valid buckets"),
            ),
            fill_duration: histogram(
                "dockside_fill_duration_seconds",
                "Time to download and verify a blob from upstream, by outcome.",
                &["upstream", "outcome"],
                prometheus::exponential_buckets(0.01, 2.0, 16).expect("valid buckets"),
            ),
            requests: counter(
                "dockside_requests_total",
                "Registry requests answered, by upstream, kind and outcome.",
                &["upstream", "kind", "outcome"],
            ),
            served_bytes: counter(
                "dockside_served_bytes_total",
                "Body bytes sent to clients, by upstream, kind and source.",
                &["upstream", "kind", "source"],
            ),
            upstream_requests: counter(
                "dockside_upstream_requests_total",
                "Requests sent to upstream registries, by upstream, method and status.",
                &["upstream", "method", "status"],
            ),
            upstream_bytes: counter(
                "dockside_upstream_received_bytes_total",
                "Blob bytes received from upstream registries.",
                &["upstream"],
            ),
            origin_bytes: counter(
                "dockside_origin_received_bytes_total",
                "Blob bytes received into fills, by origin kind and name.",
                &["kind", "origin"],
            ),
            origin_fills: counter(
                "dockside_origin_fills_total",
                "Blob fills that ended, by origin kind and name and outcome.",
                &["kind", "origin", "outcome"],
            ),
            fills_in_flight: gauge(
                "dockside_fills_in_flight",
                "Upstream blob fetches currently running.",
            ),
            coalesced: counter(
                "dockside_coalesced_requests_total",
                "Requests that were served from a fill started by another request.",
                &["upstream", "kind"],
            ),
            digest_mismatches: counter(
                "dockside_digest_mismatches_total",
                "Upstream content that did not match its digest and was discarded.",
                &["upstream"],
            ),
            stale_served: counter(
                "dockside_stale_served_total",
                "Tag answers served from cache because the upstream failed.",
                &["upstream"],
            ),
            cache_bytes: gauge("dockside_cache_bytes", "Bytes of cached objects on disk."),
            cache_objects: gauge("dockside_cache_objects", "Cached objects on disk."),
            cache_limit_bytes: gauge("dockside_cache_limit_bytes", "Configured cache size limit."),
            cache_pinned_bytes: gauge(
                "dockside_cache_pinned_bytes",
                "Bytes of cached objects pinned by cache.pin, never evicted.",
            ),
            cache_unlinks_pending: gauge(
                "dockside_cache_unlinks_pending",
                "Evicted objects whose files are not yet deleted (they no longer count as cached).",
            ),
            cache_index_checked: gauge(
                "dockside_cache_index_checked",
                "1 once the cache index has been checked against the files on disk after a start; \
                 until then the cache's bytes and objects may be short.",
            ),
            evictions: plain_counter(
                "dockside_evictions_total",
                "Cached objects deleted to stay within cache.max_size.",
            ),
            evicted_bytes: plain_counter(
                "dockside_evicted_bytes_total",
                "Bytes of cached objects deleted to stay within cache.max_size.",
            ),
            upstream_retries: counter(
                "dockside_upstream_retries_total",
                "Upstream requests sent again after a connect error or a 5xx.",
                &["upstream"],
            ),
            upstream_resumes: counter(
                "dockside_upstream_resumes_total",
                "Blob downloads that broke mid-stream and were resumed with Range.",
                &["upstream"],
            ),
            upstream_throttled: counter(
                "dockside_upstream_throttled_total",
                "429 answers from upstream, by whether dockside sent the request or held it back \
                 while Retry-After ran.",
                &["upstream", "sent"],
            ),
            upstream_ratelimit_remaining: gauge_vec(
                "dockside_upstream_ratelimit_remaining",
                "The upstream's last RateLimit-Remaining (Docker Hub: pulls left in the window).",
                &["upstream"],
            ),
            upstream_credential_fetches: counter(
                "dockside_upstream_credential_fetches_total",
                "Fetches of upstream credentials from a credentials: source, by source and result \
                 (ok, refused, unreachable).",
                &["upstream", "source", "result"],
            ),
            upstream_url_up: gauge_vec(
                "dockside_upstream_url_up",
                "1 while requests go to this upstream URL, 0 while its circuit breaker skips it.",
                &["upstream", "url"],
            ),
            upstream_failovers: counter(
                "dockside_upstream_failovers_total",
                "Requests that moved on to the upstream's next URL after a failure or a 404.",
                &["upstream"],
            ),
            oversize_blobs: counter(
                "dockside_oversize_blobs_total",
                "Blobs served without being kept because they exceed cache.max_size.",
                &["upstream"],
            ),
            store_write_errors: counter(
                "dockside_store_write_errors_total",
                "Objects served but not kept because writing them to the cache failed, by object and kind (no_space, io).",
                &["object", "kind"],
            ),
            client_connections: gauge(
                "dockside_client_connections",
                "Client connections open on the registry listeners.",
            ),
            client_connections_refused: plain_counter(
                "dockside_client_connections_refused_total",
                "Client connections closed at once because limits.max_connections were open.",
            ),
            client_timeouts: counter(
                "dockside_client_timeouts_total",
                "Client connections closed because a limits timeout passed, by reason.",
                &["reason"],
            ),
            tls_reloads: counter(
                "dockside_tls_reloads_total",
                "Changed TLS certificate files, by result (reloaded, rejected).",
                &["result"],
            ),
            tls_certificate_expiry: gauge_vec(
                "dockside_tls_certificate_expiry_timestamp_seconds",
                "When the TLS certificate served expires (notAfter), in Unix seconds.",
                &["cert_file"],
            ),
            build_info: gauge_vec(
                "dockside_build_info",
                "Build information; always 1.",
                &["version"],
            ),
            registry,
        };
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        metrics
    }

    /// Count a failed write of a blob or manifest to the cache.
    pub fn store_write_error(&self, object: &str, err: &StoreError) {
        let kind = match err {
            StoreError::Io(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                ) =>
            {
                "no_space"
            }
            StoreError::NoRoom { .. } | StoreError::TooLarge { .. } => "no_room",
            _ => "io",
        };
        self.store_write_errors
            .with_label_values(&[object, kind])
            .inc();
    }

    /// A fill from an origin (`kind`, `name`) ended. The upstream-labelled series go on for
    /// upstream origins, as before origins had kinds.
    pub fn fill_finished(&self, kind: &str, name: &str, outcome: &str, took: std::time::Duration) {
        self.origin_fills
            .with_label_values(&[kind, name, outcome])
            .inc();
        if kind == UPSTREAM {
            self.fill_duration
                .with_label_values(&[name, outcome])
                .observe(took.as_secs_f64());
        }
    }

    pub fn origin_received(&self, kind: &str, name: &str, bytes: u64) {
        self.origin_bytes
            .with_label_values(&[kind, name])
            .inc_by(bytes);
        if kind == UPSTREAM {
            self.upstream_bytes.with_label_values(&[name]).inc_by(bytes);
        }
    }

    /// Per-origin events that have an upstream-labelled counter: only upstream origins count.
    pub fn upstream_event(&self, counter: &IntCounterVec, kind: &str, name: &str) {
        if kind == UPSTREAM {
            counter.with_label_values(&[name]).inc();
        }
    }

    /// Record the store's usage: (bytes, objects).
    pub fn record_usage(&self, usage: Usage) {
        self.cache_bytes.set(usage.bytes as i64);
        self.cache_objects.set(usage.objects as i64);
        self.cache_limit_bytes.set(usage.max_bytes as i64);
        self.cache_pinned_bytes.set(usage.pinned_bytes as i64);
        self.cache_unlinks_pending.set(usage.unlinks_pending as i64);
        self.cache_index_checked.set(usage.index_checked.into());
        // The store counts since start; these counters catch up to it.
        catch_up(&self.evictions, usage.evicted_objects);
        catch_up(&self.evicted_bytes, usage.evicted_bytes);
    }

    /// Register metrics a component keeps itself (the shared tier's), so they render here.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        self.registry.register(collector).expect("unique metric");
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }
}

fn catch_up(counter: &IntCounter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_metrics_with_prefix() {
        let m = Metrics::new();
        m.requests
            .with_label_values(&["docker.io", "blob", "hit"])
            .inc();
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(
            "dockside_requests_total{kind=\"blob\",outcome=\"hit\",upstream=\"docker.io\"} 1"
        ));
        assert!(text.contains("dockside_build_info{version="));
    }
}
