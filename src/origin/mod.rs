//! Where the bytes of a digest come from when the store does not have them.
//!
//! An [`Origin`] answers "the blob `digest` from byte `from` on" with its length, if known, and
//! a stream of chunks; a resume (`from > 0`) is answered with exactly the rest of the blob or
//! an error. The fill single-flights, verifies and keeps what an origin
//! sends without knowing what kind of origin it is. The upstream registry
//! ([`upstream::UpstreamOrigin`]) is the first implementation; a peer replica
//! (`cluster::peer`) is another, and [`chain::ChainOrigin`] tries several in order, moving on
//! when one fails. Every error names the origin's kind and name.

pub mod chain;
pub mod upstream;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;

use crate::oci::Digest;
use crate::upstream::{UpstreamError, UpstreamErrorKind};

pub use chain::ChainOrigin;
pub use upstream::UpstreamOrigin;

/// What kind of place an origin is, for metrics and messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OriginKind {
    /// The registry a request was routed to.
    Upstream,
    /// Another replica of the cluster.
    Peer,
    /// The object-storage tier under the local disks, shared by every replica.
    Shared,
    /// Bytes a test or a tool holds already.
    Fixed,
}

impl OriginKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OriginKind::Upstream => "upstream",
            OriginKind::Peer => "peer",
            OriginKind::Shared => "shared",
            OriginKind::Fixed => "fixed",
        }
    }
}

/// An origin's kind and name: `upstream docker.io`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OriginName {
    pub kind: OriginKind,
    pub name: Arc<str>,
}

impl OriginName {
    pub fn new(kind: OriginKind, name: &Arc<str>) -> OriginName {
        OriginName {
            kind,
            name: name.clone(),
        }
    }
}

impl fmt::Display for OriginName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.as_str(), self.name)
    }
}

/// A blob's bytes as an origin sends them.
pub struct OriginBody {
    /// The whole blob's length, when the origin says it.
    pub len: Option<u64>,
    pub chunks: BoxStream<'static, Result<Bytes, OriginError>>,
}

#[async_trait]
pub trait Origin: Send + Sync + 'static {
    fn name(&self) -> &OriginName;

    /// The blob's bytes from `from` on. With `from > 0` (a resume after a broken body) the
    /// answer is exactly bytes `from..` of a blob of the same length, or an error.
    async fn fetch(&self, digest: &Digest, from: u64) -> Result<OriginBody, OriginError>;

    /// The fill verified and kept the bytes this origin sent for `digest` (the shared tier's
    /// write-behind hooks in here). Called once per fill, after the local commit.
    fn kept(&self, _digest: &Digest, _len: u64) {}

    /// The bytes this origin sent for `digest` did not hash to it: nothing was kept. An origin
    /// that stores objects removes its bad copy here.
    fn rejected(&self, _digest: &Digest) {}
}

/// Why an origin could not give a blob's bytes.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{origin}: {kind}")]
pub struct OriginError {
    pub origin: OriginName,
    pub kind: OriginErrorKind,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum OriginErrorKind {
    /// An upstream registry's answer or failure, as its client classified it.
    #[error("{0}")]
    Upstream(UpstreamErrorKind),
    /// The body ended before the stated length.
    #[error("body ended after {got} of {expected} bytes")]
    Truncated { expected: u64, got: u64 },
    /// More bytes than the stated length.
    #[error("sent more than its length {len}")]
    Overlong { len: u64 },
    /// A resume was answered with something other than the rest of the blob.
    #[error("did not answer the rest of the blob from byte {from}")]
    NotTheRest { from: u64 },
    /// The body broke or stalled: a resume may get the rest.
    #[error("body failed: {0}")]
    Broken(String),
    /// A peer asked only for what it holds does not hold it.
    #[error("does not hold it")]
    NotHeld,
}

impl OriginError {
    pub fn new(origin: &OriginName, kind: OriginErrorKind) -> OriginError {
        OriginError {
            origin: origin.clone(),
            kind,
        }
    }

    /// A failure part-way through a body, which asking again from the byte reached may mend.
    pub fn is_resumable(&self) -> bool {
        use UpstreamErrorKind as U;
        match &self.kind {
            OriginErrorKind::Upstream(kind) => {
                matches!(kind, U::Body(_) | U::Truncated { .. } | U::Timeout(_))
            }
            OriginErrorKind::Truncated { .. } | OriginErrorKind::Broken(_) => true,
            OriginErrorKind::Overlong { .. }
            | OriginErrorKind::NotTheRest { .. }
            | OriginErrorKind::NotHeld => false,
        }
    }

    /// The origin's definite answer that the object does not exist: asking another origin
    /// would only ask the same upstream again.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.kind,
            OriginErrorKind::Upstream(UpstreamErrorKind::NotFound)
        )
    }

    /// The same failure in an upstream's terms, for an origin that is an upstream (the client
    /// gets the answer it got before origins existed).
    pub fn as_upstream(&self) -> UpstreamError {
        let kind = match &self.kind {
            OriginErrorKind::Upstream(kind) => kind.clone(),
            OriginErrorKind::Truncated { expected, got } => UpstreamErrorKind::Truncated {
                expected: *expected,
                got: *got,
            },
            other => UpstreamErrorKind::Body(other.to_string()),
        };
        UpstreamError::new(&self.origin.name, kind)
    }
}

/// An origin that serves one fixed blob, with a fault if asked: for tests of the fill and
/// for tools that already hold the bytes.
pub mod fixed {
    use super::*;
    use futures_util::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Fault {
        None,
        /// Every fetch from 0 breaks after this many bytes (a resume is answered in full).
        BreakAfter(u64),
        /// Answer a resume with the whole blob instead of the rest.
        IgnoreRange(u64),
        /// Do not state the length.
        NoLength,
    }

    pub struct FixedOrigin {
        name: OriginName,
        data: Bytes,
        chunk: usize,
        fault: Fault,
        fetches: AtomicUsize,
    }

    impl FixedOrigin {
        pub fn new(name: &str, data: Bytes, chunk: usize, fault: Fault) -> FixedOrigin {
            FixedOrigin {
                name: OriginName::new(OriginKind::Fixed, &Arc::from(name)),
                data,
                chunk,
                fault,
                fetches: AtomicUsize::new(0),
            }
        }

        /// Fetches so far, resumes included.
        pub fn fetches(&self) -> usize {
            self.fetches.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl Origin for FixedOrigin {
        fn name(&self) -> &OriginName {
            &self.name
        }

        async fn fetch(&self, _digest: &Digest, from: u64) -> Result<OriginBody, OriginError> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let total = self.data.len() as u64;
            let start = match self.fault {
                Fault::IgnoreRange(_) if from > 0 => 0,
                _ => from.min(total),
            };
            let (end, broken) = match self.fault {
                Fault::BreakAfter(n) | Fault::IgnoreRange(n) if from == 0 => (n.min(total), true),
                _ => (total, false),
            };
            if start != from {
                return Err(OriginError::new(
                    &self.name,
                    OriginErrorKind::NotTheRest { from },
                ));
            }
            let rest = self.data.slice(start as usize..end as usize);
            let chunks: Vec<Result<Bytes, OriginError>> = rest
                .chunks(self.chunk)
                .map(|c| Ok(rest.slice_ref(c)))
                .chain(broken.then(|| {
                    let kind = OriginErrorKind::Broken("cut by the test".into());
                    Err(OriginError::new(&self.name, kind))
                }))
                .collect();
            let len = (self.fault != Fault::NoLength).then_some(total);
            Ok(OriginBody {
                len,
                chunks: futures_util::stream::iter(chunks).boxed(),
            })
        }
    }
}
