//! The status page's memory: what the counters alone cannot tell. [`Recorder`] keeps a ring of
//! traffic samples for the last hour's chart (taken on a thread of its own, never by a page
//! view), the repositories that served the most bytes ([`top`]) and the last client-facing
//! errors. Each is bounded, so memory does not grow with the cache or the uptime.
//!
//! `view` gathers a page's worth of state from the mirror's parts and the recorder; `page`
//! renders it as HTML (with `chart` for the SVG and `html` for escaping). A page view reads only
//! counters, the store's running totals and these bounded structures: it never lists the store.

pub mod chart;
pub mod figures;
pub mod html;
pub mod page;
mod ring;
pub mod top;
pub mod view;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tracing::warn;

use crate::metrics::Metrics;
use figures::Figures;
use ring::Ring;
use top::{RepoBytes, TopCounter};

/// How often the traffic counters are sampled for the chart.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(15);
/// Samples kept: one hour's worth.
pub const SAMPLES: usize = 240;
/// Repository counters kept (see [`top`]); the page shows [`TOP_SHOWN`] of them.
const TOP_KEPT: usize = 1000;
pub const TOP_SHOWN: usize = 10;
/// Client-facing errors kept.
pub const ERRORS_KEPT: usize = 50;
/// An error message is cut to this many characters: a ring of 50 stays small.
const MESSAGE_LIMIT: usize = 300;

/// The traffic counters at one moment (cumulative since start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub at: SystemTime,
    /// Body bytes sent to clients from the cache.
    pub from_cache: u64,
    /// Blob bytes received from upstreams.
    pub from_upstream: u64,
}

impl Sample {
    pub fn of(figures: &Figures, at: SystemTime) -> Sample {
        Sample {
            at,
            from_cache: figures.served_cache,
            from_upstream: figures.fetched_upstream,
        }
    }
}

/// One error answer a client got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecentError {
    pub at: SystemTime,
    pub status: u16,
    /// The OCI error code (`MANIFEST_UNKNOWN`, …); `ABORTED` for a body cut short.
    pub code: String,
    pub upstream: Option<String>,
    pub repository: Option<String>,
    pub message: String,
}

pub struct Recorder {
    samples: Mutex<Ring<Sample>>,
    repos: Mutex<TopCounter>,
    errors: Mutex<Ring<RecentError>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            samples: Mutex::new(Ring::new(SAMPLES)),
            repos: Mutex::new(TopCounter::new(TOP_KEPT)),
            errors: Mutex::new(Ring::new(ERRORS_KEPT)),
        }
    }

    /// Count body bytes sent to a client for a repository.
    pub fn served(&self, upstream: &str, repository: &str, bytes: u64) {
        if bytes > 0 {
            lock(&self.repos).add(upstream, repository, bytes);
        }
    }

    pub fn error(&self, mut error: RecentError) {
        if let Some((cut, _)) = error.message.char_indices().nth(MESSAGE_LIMIT) {
            error.message.truncate(cut);
            error.message.push('…');
        }
        lock(&self.errors).push(error);
    }

    pub fn sample(&self, sample: Sample) {
        lock(&self.samples).push(sample);
    }

    /// Oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        lock(&self.samples).to_vec()
    }

    pub fn top_repositories(&self) -> Vec<RepoBytes> {
        lock(&self.repos).top(TOP_SHOWN)
    }

    /// Newest first.
    pub fn recent_errors(&self) -> Vec<RecentError> {
        let mut errors = lock(&self.errors).to_vec();
        errors.reverse();
        errors
    }

    /// Sample `metrics` now and every [`SAMPLE_EVERY`] on a thread of its own, for as long as
    /// the recorder lives.
    pub fn start_sampling(self: &Arc<Self>, metrics: Arc<Metrics>) {
        let recorder = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("dockside-status".into())
            .spawn(move || {
                loop {
                    let Some(recorder) = recorder.upgrade() else {
                        return;
                    };
                    let figures = Figures::read(&metrics);
                    recorder.sample(Sample::of(&figures, SystemTime::now()));
                    drop(recorder);
                    std::thread::sleep(SAMPLE_EVERY);
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "could not start the status sampler; the status page has no chart");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these leaves plain counters behind: still worth showing.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(n: usize, message: String) -> RecentError {
        RecentError {
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(n as u64),
            status: 404,
            code: "MANIFEST_UNKNOWN".into(),
            upstream: Some("docker.io".into()),
            repository: Some(format!("library/r{n}")),
            message,
        }
    }

    #[test]
    fn keeps_the_last_errors_newest_first_with_short_messages() {
        let r = Recorder::new();
        for n in 0..ERRORS_KEPT + 5 {
            r.error(error(n, "m".repeat(n * 10)));
        }
        let errors = r.recent_errors();
        assert_eq!(errors.len(), ERRORS_KEPT);
        assert_eq!(errors[0].repository.as_deref(), Some("library/r54"));
        assert_eq!(
            errors.last().unwrap().repository.as_deref(),
            Some("library/r5")
        );
        assert_eq!(
            errors[0].message.chars().count(),
            MESSAGE_LIMIT + 1,
            "cut, with …"
        );
        assert!(errors[0].message.ends_with('…'));
        assert_eq!(
            errors.last().unwrap().message.len(),
            50,
            "short ones stay whole"
        );
    }

    #[test]
    fn samples_and_repositories_are_bounded() {
        let r = Recorder::new();
        for i in 0..SAMPLES + 10 {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(i as u64);
            r.sample(Sample {
                at,
                from_cache: i as u64,
                from_upstream: 0,
            });
        }
        let samples = r.samples();
        assert_eq!(samples.len(), SAMPLES);
        assert_eq!(samples[0].from_cache, 10, "oldest dropped first");
        r.served("docker.io", "library/a", 10);
        r.served("docker.io", "library/b", 0);
        r.served("docker.io", "library/c", 30);
        let top = r.top_repositories();
        let names: Vec<&str> = top.iter().map(|t| t.repository.as_str()).collect();
        assert_eq!(
            names,
            ["library/c", "library/a"],
            "nothing served, not listed"
        );
    }

    #[test]
    fn the_sampler_takes_a_sample_at_once() {
        let r = Arc::new(Recorder::new());
        let metrics = Arc::new(Metrics::new());
        metrics
            .served_bytes
            .with_label_values(&["docker.io", "blob", "cache"])
            .inc_by(42);
        r.start_sampling(metrics);
        let first = crate::status::tests::wait(|| r.samples().first().copied());
        assert_eq!(first.from_cache, 42);
    }

    /// Polls until `f` has something (the sampler runs on its own thread).
    pub(super) fn wait<T>(mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
