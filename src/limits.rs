//! What one client may hold, enforced around pingora's HTTP app (`limits:` in the config).
//!
//! pingora 0.9 has no connection limit, and it reads a request header with a timeout per read
//! that every byte restarts (60 s), so a client that sends its header a byte at a time
//! (slowloris) could hold a connection forever. Two layers wrap the registry's app:
//!
//! - [`Connections`], per connection: takes one of `max_connections` slots, or closes the
//!   connection at once (it was accepted, so the client sees it closed, not a timeout).
//! - [`Deadlines`], per request: sets pingora's keep-alive (`idle_timeout`), read and write
//!   (`send_timeout`) timeouts on the session, and drops the request, closing the connection,
//!   when its header is not in within `header_timeout` of the request starting; for a later
//!   request on a kept-alive connection, that wait starts with the idle time, so the bound is
//!   `idle_timeout + header_timeout`.
//!
//! `server.rs` calls [`header_complete`] first thing for every request; after it, the deadline
//! no longer applies (a cold pull may take much longer than a header).

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use pingora::protocols::http::v2::server::H2Options;
use pingora::server::ShutdownWatch;
use prometheus::IntGauge;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::config::Limits;
use crate::metrics::Metrics;

tokio::task_local! {
    /// HTTP/1 requests started on this connection so far. h2 streams run in tasks of their own
    /// and never see it; h2 hands over a request only once its header is complete.
    static REQUESTS: Cell<u32>;
    /// Whether the current request's header has been read.
    static HEADER_IN: Cell<bool>;
}

/// Marks the current request's header as read: its header deadline no longer applies.
pub fn header_complete() {
    let _ = HEADER_IN.try_with(|h| h.set(true));
}

/// Warns when `max_connections` cannot be reached: every connection needs a file descriptor,
/// and past the process's limit accept fails (pingora then pauses accepting for a second).
pub fn warn_if_above_fd_limit(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let soft = limit.rlim_cur;
    if soft != libc::RLIM_INFINITY && max_connections as u64 >= soft {
        warn!(
            max_connections,
            open_file_limit = soft,
            "limits.max_connections is not below the open file limit (ulimit -n); raise \
               the limit (LimitNOFILE= in systemd) or lower max_connections"
        );
    }
}

/// The per-connection layer: at most `max_connections` at once.
pub struct Connections<A> {
    app: Arc<A>,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl<A> Connections<A> {
    pub fn new(app: A, max_connections: usize, metrics: Arc<Metrics>) -> Connections<A> {
        Connections {
            app: Arc::new(app),
            slots: Arc::new(Semaphore::new(max_connections)),
            metrics,
        }
    }
}

/// Counts an open connection in the gauge until dropped.
struct Open(IntGauge);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Connections<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Ok(_slot) = self.slots.clone().try_acquire_owned() else {
            // Refusing costs nothing but the accept; waiting would hold the socket for a client
            // that is better off retrying (every registry client retries a failed connection).
            self.metrics.client_connections_refused.inc();
            debug!("limits.max_connections reached; closing a new connection");
            return None;
        };
        self.metrics.client_connections.inc();
        let _open = Open(self.metrics.client_connections.clone());
        REQUESTS
            .scope(Cell::new(0), self.app.process_new(stream, shutdown))
            .await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await
    }
}

/// The per-request layer: timeouts on the session and the header deadline.
pub struct Deadlines<A> {
    app: Arc<A>,
    limits: Limits,
    metrics: Arc<Metrics>,
}

impl<A> Deadlines<A> {
    pub fn new(app: A, limits: Limits, metrics: Arc<Metrics>) -> Deadlines<A> {
        Deadlines {
            app: Arc::new(app),
            limits,
            metrics,
        }
    }

    /// How long this request's header may take; `None` for h2, whose streams arrive whole.
    fn header_deadline(&self, session: &ServerSession) -> Option<Duration> {
        if session.is_http2() {
            return None;
        }
        let earlier = REQUESTS.try_with(|n| n.replace(n.get() + 1)).unwrap_or(0);
        Some(match earlier {
            0 => self.limits.header_timeout,
            _ => self.limits.idle_timeout + self.limits.header_timeout,
        })
    }

    /// Ends (so the request is dropped) once `after` has passed without the header complete.
    async fn expire(&self, after: Option<Duration>) {
        let Some(after) = after else {
            return std::future::pending().await;
        };
        tokio::time::sleep(after).await;
        if HEADER_IN.with(Cell::get) {
            return std::future::pending().await;
        }
        self.metrics
            .client_timeouts
            .with_label_values(&["header_timeout"])
            .inc();
        debug!(
            ?after,
            "request header not complete in time; closing the connection"
        );
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> HttpServerApp for Deadlines<A> {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        // pingora turns keep-alive off once shutdown starts; leave that as it is.
        if !*shutdown.borrow() {
            session.set_keepalive(Some(self.limits.idle_timeout.as_secs()));
        }
        session.set_read_timeout(Some(self.limits.header_timeout));
        session.set_write_timeout(Some(self.limits.send_timeout));
        let deadline = self.header_deadline(&session);
        HEADER_IN
            .scope(Cell::new(false), async {
                tokio::select! {
                    biased;
                    reused = self.app.process_new_http(session, shutdown) => reused,
                    () = self.expire(deadline) => None,
                }
            })
            .await
    }

    fn h2_options(&self) -> Option<H2Options> {
        self.app.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.app.server_options()
    }

    async fn http_cleanup(&self) {
        self.app.http_cleanup().await
    }
}
