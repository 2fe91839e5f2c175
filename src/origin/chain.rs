//! Several origins tried in order: the cluster's owner of a digest, then the next members,
//! then the upstream. An origin that cannot be reached, or whose body breaks, is left for the
//! next, and a resume (`fetch` from a later byte) goes on from there: the fill's bytes so far
//! stay, and the next origin is asked for exactly the rest.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use futures_util::StreamExt;
use tracing::{debug, warn};

use super::{Origin, OriginBody, OriginError, OriginErrorKind, OriginName};
use crate::oci::Digest;

pub struct ChainOrigin {
    origins: Vec<Arc<dyn Origin>>,
    /// The origin in use; only ever moves forward.
    current: Arc<AtomicUsize>,
}

impl ChainOrigin {
    /// `origins` in order of preference; at least one.
    pub fn new(origins: Vec<Arc<dyn Origin>>) -> ChainOrigin {
        assert!(!origins.is_empty(), "a chain of no origins");
        ChainOrigin {
            origins,
            current: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn at(&self, i: usize) -> &Arc<dyn Origin> {
        &self.origins[i.min(self.origins.len() - 1)]
    }
}

#[async_trait]
impl Origin for ChainOrigin {
    /// The origin in use now, so that the fill's counts and messages name the one that sent
    /// the bytes.
    fn name(&self) -> &OriginName {
        self.at(self.current.load(Ordering::Acquire)).name()
    }

    /// Told to the origin that sent the last bytes: the one the fill's verdict is about.
    fn kept(&self, digest: &Digest, len: u64) {
        self.at(self.current.load(Ordering::Acquire))
            .kept(digest, len);
    }

    fn rejected(&self, digest: &Digest) {
        self.at(self.current.load(Ordering::Acquire))
            .rejected(digest);
    }

    async fn fetch(&self, digest: &Digest, from: u64) -> Result<OriginBody, OriginError> {
        let last = self.origins.len() - 1;
        let mut i = self.current.load(Ordering::Acquire).min(last);
        loop {
            let origin = self.at(i);
            match origin.fetch(digest, from).await {
                Ok(body) => {
                    self.current.store(i, Ordering::Release);
                    return Ok(self.watched(i, body));
                }
                // The one answer another origin would only repeat.
                Err(e) if e.is_not_found() || i == last => {
                    self.current.store(i, Ordering::Release);
                    return Err(e);
                }
                // A member that does not hold it: the expected answer of a probe.
                Err(e) if matches!(e.kind, OriginErrorKind::NotHeld) => {
                    debug!(%digest, origin = %e.origin, "not held there; trying the next");
                    i += 1;
                }
                Err(e) => {
                    let next = self.at(i + 1).name();
                    warn!(%digest, from, error = %e, next = %next, "origin failed; trying the next");
                    i += 1;
                }
            }
        }
    }
}

impl ChainOrigin {
    /// A body that breaks moves the chain on, so the fill's resume asks the next origin.
    fn watched(&self, i: usize, body: OriginBody) -> OriginBody {
        let current = self.current.clone();
        let last = self.origins.len() - 1;
        let chunks = body
            .chunks
            .inspect(move |chunk| {
                if chunk.is_err() && i < last {
                    let _ = current.compare_exchange(i, i + 1, Ordering::AcqRel, Ordering::Acquire);
                }
            })
            .boxed();
        OriginBody {
            len: body.len,
            chunks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::OriginKind;
    use super::super::fixed::{Fault, FixedOrigin};
    use super::*;
    use bytes::Bytes;

    /// An origin that is down.
    struct Down(OriginName);

    #[async_trait]
    impl Origin for Down {
        fn name(&self) -> &OriginName {
            &self.0
        }
        async fn fetch(&self, _: &Digest, _: u64) -> Result<OriginBody, OriginError> {
            Err(OriginError::new(
                &self.0,
                OriginErrorKind::Broken("refused".into()),
            ))
        }
    }

    fn down(name: &str) -> Arc<dyn Origin> {
        Arc::new(Down(OriginName::new(OriginKind::Peer, &Arc::from(name))))
    }

    async fn read_all(body: OriginBody) -> (Vec<u8>, Option<OriginError>) {
        let mut out = Vec::new();
        let mut chunks = body.chunks;
        while let Some(c) = chunks.next().await {
            match c {
                Ok(b) => out.extend_from_slice(&b),
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }

    #[tokio::test]
    async fn a_failing_origin_is_skipped_and_a_broken_one_left_for_the_next() {
        let data = Bytes::from((0..100u8).collect::<Vec<_>>());
        let digest = Digest::of(&data);
        let cut = Arc::new(FixedOrigin::new(
            "cut",
            data.clone(),
            10,
            Fault::BreakAfter(40),
        ));
        let good = Arc::new(FixedOrigin::new("good", data.clone(), 10, Fault::None));
        let chain = ChainOrigin::new(vec![down("a"), cut.clone(), good.clone()]);
        let (got, err) = read_all(chain.fetch(&digest, 0).await.unwrap()).await;
        assert_eq!(got, data[..40]);
        assert!(err.is_some());
        assert_eq!(
            chain.name().name.as_ref(),
            "good",
            "moved on after the break"
        );
        // The resume goes to the next origin, for exactly the rest.
        let (rest, err) = read_all(chain.fetch(&digest, 40).await.unwrap()).await;
        assert!(err.is_none());
        assert_eq!(rest, data[40..]);
        assert_eq!((cut.fetches(), good.fetches()), (1, 1));
    }

    #[tokio::test]
    async fn not_found_is_the_answer_and_the_last_error_is_returned() {
        struct Missing(OriginName);
        #[async_trait]
        impl Origin for Missing {
            fn name(&self) -> &OriginName {
                &self.0
            }
            async fn fetch(&self, _: &Digest, _: u64) -> Result<OriginBody, OriginError> {
                let kind = OriginErrorKind::Upstream(crate::upstream::UpstreamErrorKind::NotFound);
                Err(OriginError::new(&self.0, kind))
            }
        }
        let data = Bytes::from_static(b"x");
        let good = Arc::new(FixedOrigin::new("good", data.clone(), 10, Fault::None));
        let missing = Arc::new(Missing(OriginName::new(
            OriginKind::Peer,
            &Arc::from("owner"),
        )));
        let chain = ChainOrigin::new(vec![missing, good.clone()]);
        let err = chain.fetch(&Digest::of(&data), 0).await.err().unwrap();
        assert!(err.is_not_found());
        assert_eq!(
            good.fetches(),
            0,
            "a 404 from the owner is not asked again elsewhere"
        );
        let chain = ChainOrigin::new(vec![down("a"), down("b")]);
        let err = chain.fetch(&Digest::of(&data), 0).await.err().unwrap();
        assert_eq!(err.origin.name.as_ref(), "b");
    }
}
