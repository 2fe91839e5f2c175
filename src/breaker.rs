//! A circuit breaker: after `failures` failures in a row, a place is skipped for `cooldown`,
//! then one request probes it. Upstream URLs (`upstream::endpoints`) and the shared tier use it.

use std::time::{Duration, Instant};

use crate::config::Circuit;

/// Consecutive failures and, once they reach the limit, until when the URL is skipped.
#[derive(Debug)]
pub struct Breaker {
    limit: u32,
    cooldown: Duration,
    failures: u32,
    open_until: Option<Instant>,
    /// Why the last request failed, for messages.
    pub last_failure: Option<String>,
}

impl Breaker {
    pub fn new(circuit: &Circuit) -> Breaker {
        Breaker {
            limit: circuit.failures,
            cooldown: circuit.cooldown,
            failures: 0,
            open_until: None,
            last_failure: None,
        }
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Until when requests are kept away, while open.
    pub fn open_until(&self) -> Option<Instant> {
        self.open_until
    }

    pub fn is_open(&self) -> bool {
        self.open_until.is_some()
    }

    /// Whether a request may go to this URL now. After the cooldown one request is let
    /// through as a probe, and the cooldown starts over so that its fellows keep away until
    /// the probe has answered.
    pub fn admit(&mut self, now: Instant) -> bool {
        match self.open_until {
            None => true,
            Some(until) if now >= until => {
                self.open_until = Some(now + self.cooldown);
                true
            }
            Some(_) => false,
        }
    }

    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.open_until = None;
    }

    pub fn failed(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        if self.failures >= self.limit {
            self.open_until = Some(now + self.cooldown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(limit: u32, cooldown_secs: u64) -> Breaker {
        Breaker::new(&Circuit {
            failures: limit,
            cooldown: Duration::from_secs(cooldown_secs),
        })
    }

    #[test]
    fn opens_after_the_limit_of_failures_in_a_row() {
        let now = Instant::now();
        let mut b = breaker(3, 30);
        b.failed(now);
        b.failed(now);
        assert!(b.admit(now), "two failures keep it closed");
        b.succeeded();
        b.failed(now);
        b.failed(now);
        assert!(b.admit(now), "a success in between starts the count over");
        b.failed(now);
        assert!(!b.admit(now), "the third failure in a row opens it");
        assert!(!b.admit(now + Duration::from_secs(29)));
    }

    #[test]
    fn lets_one_probe_through_after_the_cooldown() {
        let now = Instant::now();
        let mut b = breaker(1, 30);
        b.failed(now);
        let later = now + Duration::from_secs(30);
        assert!(b.admit(later), "the probe");
        assert!(!b.admit(later), "its fellows wait for it");
        b.failed(later);
        assert!(
            !b.admit(later + Duration::from_secs(29)),
            "a failed probe reopens it"
        );
        let after = later + Duration::from_secs(30);
        assert!(b.admit(after));
        b.succeeded();
        assert!(b.admit(after) && b.admit(after), "a good probe closes it");
    }
}
