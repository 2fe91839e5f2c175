//! A 429's hold on an upstream: until its `Retry-After` has passed, every request to it fails at
//! once with `TooManyRequests`, so the mirror serves stale content instead of piling on.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::warn;

use super::Upstream;

/// Retry-After is honoured up to this long; beyond it, the upstream is asked again anyway.
const MAX_THROTTLE_SECS: u64 = 3600;

/// Until when a 429's Retry-After asks us to leave an upstream alone.
#[derive(Default)]
pub(super) struct Throttle {
    until: Mutex<Option<Instant>>,
}

impl Throttle {
    /// How long requests are still held back at `now`, if they are.
    fn held_for(&self, now: Instant) -> Option<Duration> {
        let until = (*self.until.lock().expect("throttle lock"))?;
        until.checked_duration_since(now)
    }

    /// Holds requests back from `now` for `retry_after` seconds (capped), or one second without
    /// it: enough to stop a herd from hammering the upstream. Returns the wait.
    fn hold(&self, now: Instant, retry_after: Option<u64>) -> Duration {
        let wait = Duration::from_secs(retry_after.unwrap_or(1).min(MAX_THROTTLE_SECS));
        *self.until.lock().expect("throttle lock") = Some(now + wait);
        wait
    }
}

impl Upstream {
    /// How long a 429's Retry-After still holds requests back, if it does.
    pub(super) fn throttled_for(&self) -> Option<Duration> {
        self.throttle.held_for(Instant::now())
    }

    pub(super) fn throttle(&self, retry_after: Option<u64>) {
        self.metrics
            .upstream_throttled
            .with_label_values(&[&self.name, "true"])
            .inc();
        let wait = self.throttle.hold(Instant::now(), retry_after);
        warn!(upstream = %self.name, ?wait, "upstream is rate limiting us; holding requests back");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_held_until_a_429() {
        assert_eq!(Throttle::default().held_for(Instant::now()), None);
    }

    #[test]
    fn holds_for_retry_after_then_lets_requests_through() {
        let throttle = Throttle::default();
        let now = Instant::now();
        assert_eq!(throttle.hold(now, Some(30)), Duration::from_secs(30));
        assert_eq!(throttle.held_for(now), Some(Duration::from_secs(30)));
        let later = now + Duration::from_secs(10);
        assert_eq!(throttle.held_for(later), Some(Duration::from_secs(20)));
        assert_eq!(throttle.held_for(now + Duration::from_secs(31)), None);
    }

    #[test]
    fn one_second_without_retry_after_and_at_most_an_hour() {
        let throttle = Throttle::default();
        let now = Instant::now();
        assert_eq!(throttle.hold(now, None), Duration::from_secs(1));
        assert_eq!(throttle.hold(now, Some(86_400)), Duration::from_secs(3600));
        assert_eq!(throttle.held_for(now), Some(Duration::from_secs(3600)));
    }
}
