//! An upstream's URLs (`urls:`), in order of preference, each behind a circuit breaker: a URL
//! that fails `circuit.failures` times in a row is skipped for `circuit.cooldown`, then one
//! request probes it; a success closes the circuit again. While every URL is skipped, the
//! upstream is not asked at all: a request fails at once, so the mirror serves stale answers
//! without waiting on retries of an upstream that is known to be down.

use std::sync::{Mutex, RwLock};
use std::time::Instant;

use url::Url;

use crate::breaker::Breaker;
use crate::config::Circuit;

/// What the upstream behind one URL asked us to authenticate with, learned from its first
/// challenge. Kept per URL: a regional mirror may send clients to a token service of its own.
#[derive(Clone)]
pub enum AuthMode {
    Bearer {
        realm: String,
        service: Option<String>,
    },
    Basic,
}

pub struct Endpoint {
    pub url: Url,
    pub mode: RwLock<Option<AuthMode>>,
    breaker: Mutex<Breaker>,
}

impl Endpoint {
    /// The URL as shown in logs and metric labels.
    pub fn label(&self) -> &str {
        self.url.as_str().trim_end_matches('/')
    }

    /// Records how a request went (`failure`: why it failed); returns whether the circuit
    /// changed between closed and open.
    pub fn record(&self, failure: Option<String>) -> Option<bool> {
        let mut breaker = self.breaker.lock().expect("breaker lock");
        let was_open = breaker.is_open();
        match failure {
            None => breaker.succeeded(),
            Some(why) => {
                breaker.failed(Instant::now());
                breaker.last_failure = Some(why);
            }
        }
        let open = breaker.is_open();
        (open != was_open).then_some(open)
    }

    /// While the circuit is open: how many failures in a row opened it and the last one.
    fn skipped_because(&self) -> Option<String> {
        let breaker = self.breaker.lock().expect("breaker lock");
        breaker.is_open().then(|| {
            let last = breaker.last_failure.as_deref().unwrap_or("unknown");
            let (label, n) = (self.label(), breaker.failures());
            let plural = if n == 1 { "" } else { "s" };
            format!("{label}: {n} failure{plural} in a row, the last: {last}")
        })
    }
}

pub struct Endpoints {
    list: Vec<Endpoint>,
}

impl Endpoints {
    pub fn new(urls: &[Url], circuit: &Circuit) -> Endpoints {
        let list = urls
            .iter()
            .map(|url| Endpoint {
                url: url.clone(),
                mode: RwLock::new(None),
                breaker: Mutex::new(Breaker::new(circuit)),
            })
            .collect();
        Endpoints { list }
    }

    pub fn all(&self) -> &[Endpoint] {
        &self.list
    }

    /// Whether every URL's circuit is open and in its cooldown, so that no request would be
    /// let through now (a retry would only wait for nothing).
    pub fn all_skipped(&self) -> bool {
        let now = Instant::now();
        self.list.iter().all(|e| {
            let breaker = e.breaker.lock().expect("breaker lock");
            breaker.open_until().is_some_and(|until| now < until)
        })
    }

    /// Why no URL was tried: each skipped URL's failures (for the error a request gets while
    /// every circuit is open).
    pub fn skipped_because(&self) -> String {
        let why: Vec<String> = self
            .list
            .iter()
            .filter_map(Endpoint::skipped_because)
            .collect();
        why.join("; ")
    }

    /// The URLs one attempt should try, in order: each whose circuit lets a request through,
    /// asked lazily so that a probe is spent only on a URL actually tried. None while every
    /// circuit is open: the cooldown's probe finds out when a URL is back.
    pub fn to_try(&self) -> ToTry<'_> {
        ToTry {
            list: &self.list,
            next: 0,
        }
    }
}

pub struct ToTry<'a> {
    list: &'a [Endpoint],
    next: usize,
}

impl<'a> Iterator for ToTry<'a> {
    type Item = &'a Endpoint;

    fn next(&mut self) -> Option<&'a Endpoint> {
        let now = Instant::now();
        while let Some(endpoint) = self.list.get(self.next) {
            self.next += 1;
            if endpoint.breaker.lock().expect("breaker lock").admit(now) {
                return Some(endpoint);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn endpoints(n: usize, limit: u32) -> Endpoints {
        let urls: Vec<Url> = (0..n)
            .map(|i| Url::parse(&format!("http://127.0.0.1:{}/", 5000 + i)).unwrap())
            .collect();
        Endpoints::new(
            &urls,
            &Circuit {
                failures: limit,
                cooldown: Duration::from_secs(60),
            },
        )
    }

    fn ports(e: &Endpoints) -> Vec<u16> {
        e.to_try().map(|e| e.url.port().unwrap()).collect()
    }

    #[test]
    fn skips_open_urls_and_keeps_the_order_of_the_rest() {
        let e = endpoints(3, 1);
        assert!(!e.all_skipped());
        assert_eq!(ports(&e), [5000, 5001, 5002]);
        let failed = || Some("answered HTTP 503".to_string());
        assert_eq!(
            e.all()[0].record(failed()),
            Some(true),
            "reports the change"
        );
        assert_eq!(ports(&e), [5001, 5002]);
        assert_eq!(e.all()[2].record(failed()), Some(true));
        assert_eq!(ports(&e), [5001]);
        assert_eq!(e.all()[1].record(None), None, "no change");
        assert_eq!(
            e.skipped_because(),
            "http://127.0.0.1:5000: 1 failure in a row, the last: answered HTTP 503; \
             http://127.0.0.1:5002: 1 failure in a row, the last: answered HTTP 503"
        );
    }

    #[test]
    fn with_every_url_open_none_is_tried_until_a_cooldown_ends() {
        let e = endpoints(2, 1);
        let now = Instant::now();
        let fail = |i: usize, at: Instant| e.all()[i].breaker.lock().unwrap().failed(at);
        fail(1, now);
        fail(0, now);
        assert_eq!(ports(&e), Vec::<u16>::new());
        assert!(e.all_skipped());
        // The cooldown (60 s) over: the probe goes out, one at a time.
        let later = now + Duration::from_secs(60);
        assert!(e.all()[1].breaker.lock().unwrap().admit(later));
        assert!(!e.all()[1].breaker.lock().unwrap().admit(later));
    }
}
