//! Which failures are retried or count against a URL's circuit, and the backoff between
//! attempts.

use std::time::Duration;

use crate::upstream::{UpstreamError, UpstreamErrorKind};

/// Failures that count against a URL's circuit: it did not answer, or answered with a
/// server-side error.
pub(super) fn is_url_failure(err: &UpstreamError) -> bool {
    worth_retrying(err) || matches!(err.kind, UpstreamErrorKind::Timeout(_))
}

/// Failures a second attempt may fix: no connection, or a server-side error.
pub(super) fn worth_retrying(err: &UpstreamError) -> bool {
    match err.kind {
        UpstreamErrorKind::Connect(_) => true,
        UpstreamErrorKind::Status(code) => matches!(code, 500 | 502 | 503 | 504),
        _ => false,
    }
}

/// Exponential backoff with jitter: a random wait between half and all of 100 ms × 2^attempt
/// (capped at 5 s), so a herd of retries spreads out instead of arriving together.
pub(super) fn backoff(attempt: u32) -> Duration {
    let cap_ms = (100u64 << attempt.min(6)).min(5_000);
    Duration::from_millis(rand::random_range(cap_ms / 2..=cap_ms))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn err(kind: UpstreamErrorKind) -> UpstreamError {
        UpstreamError::new(&Arc::from("docker.io"), kind)
    }

    #[test]
    fn connect_errors_and_gateway_statuses_are_retried() {
        assert!(worth_retrying(&err(UpstreamErrorKind::Connect(
            "refused".into()
        ))));
        for code in [500, 502, 503, 504] {
            assert!(
                worth_retrying(&err(UpstreamErrorKind::Status(code))),
                "{code}"
            );
        }
        for code in [400, 404, 501, 505, 599] {
            assert!(
                !worth_retrying(&err(UpstreamErrorKind::Status(code))),
                "{code}"
            );
        }
        assert!(!worth_retrying(&err(UpstreamErrorKind::NotFound)));
        assert!(!worth_retrying(&err(UpstreamErrorKind::Timeout(
            "x".into()
        ))));
        let throttled = UpstreamErrorKind::TooManyRequests { retry_after: None };
        assert!(!worth_retrying(&err(throttled)));
        // Nothing was sent: retrying would only wait on circuits that are still open.
        let skipped = err(UpstreamErrorKind::CircuitOpen("x".into()));
        assert!(!worth_retrying(&skipped) && !is_url_failure(&skipped));
    }

    #[test]
    fn timeouts_count_against_a_url_but_are_not_retried() {
        assert!(is_url_failure(&err(UpstreamErrorKind::Timeout("x".into()))));
        assert!(is_url_failure(&err(UpstreamErrorKind::Status(503))));
        assert!(!is_url_failure(&err(UpstreamErrorKind::NotFound)));
        assert!(!is_url_failure(&err(UpstreamErrorKind::Unauthorized(
            "x".into()
        ))));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        for attempt in 1..=20 {
            let cap = Duration::from_millis((100u64 << attempt.min(6)).min(5_000));
            for _ in 0..50 {
                let wait = backoff(attempt);
                assert!(
                    wait >= cap / 2 && wait <= cap,
                    "attempt {attempt}: {wait:?}"
                );
            }
        }
        assert!(backoff(20) <= Duration::from_secs(5));
    }
}
