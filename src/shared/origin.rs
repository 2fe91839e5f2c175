//! The shared tier as a fill's origin, and the decorator that writes an upstream's blobs
//! behind to it.

use std::sync::Arc;

use async_trait::async_trait;
use futures_util::StreamExt;
use object_store::{GetOptions, GetRange, ObjectStore};

use super::{S3Tier, Tier, TierError};
use crate::oci::Digest;
use crate::origin::{Origin, OriginBody, OriginError, OriginErrorKind, OriginName};

/// Blobs read from the tier. Absent, skipped or failing, it answers `NotHeld` or a broken
/// body, so a chain moves on to the next origin: the tier is never the final answer.
pub struct TierOrigin {
    tier: Arc<S3Tier>,
}

impl TierOrigin {
    pub fn new(tier: Arc<S3Tier>) -> TierOrigin {
        TierOrigin { tier }
    }
}

#[async_trait]
impl Origin for TierOrigin {
    fn name(&self) -> &OriginName {
        &self.tier.name
    }

    async fn fetch(&self, digest: &Digest, from: u64) -> Result<OriginBody, OriginError> {
        let tier = &self.tier;
        if tier.bad.contains_key(digest) {
            return Err(OriginError::new(&tier.name, OriginErrorKind::NotHeld));
        }
        let path = tier.blob_path(digest);
        let options = GetOptions {
            range: (from > 0).then_some(GetRange::Offset(from)),
            ..Default::default()
        };
        let answer = tier.call("get", tier.store.get_opts(&path, options)).await;
        let result = answer.map_err(|e| {
            let kind = match e {
                TierError::NotFound => OriginErrorKind::NotHeld,
                other => OriginErrorKind::Broken(other.to_string()),
            };
            OriginError::new(&tier.name, kind)
        })?;
        if result.range.start != from {
            return Err(OriginError::new(
                &tier.name,
                OriginErrorKind::NotTheRest { from },
            ));
        }
        tier.present.insert(digest.clone(), ());
        let len = result.meta.size;
        let (name, counting) = (tier.name.clone(), tier.clone());
        let chunks = result
            .into_stream()
            .map(move |chunk| match chunk {
                Ok(bytes) => {
                    counting.metrics.read(bytes.len() as u64);
                    Ok(bytes)
                }
                Err(e) => Err(OriginError::new(
                    &name,
                    OriginErrorKind::Broken(e.to_string()),
                )),
            })
            .boxed();
        Ok(OriginBody {
            len: Some(len),
            chunks,
        })
    }

    fn rejected(&self, digest: &Digest) {
        self.tier.reject(digest);
    }
}

/// An origin whose blobs, once the fill kept them, are written behind to the tier: the
/// upstream's. What came from the tier or a peer is not written again (the peer writes what
/// it fetched).
pub struct KeepBehind {
    inner: Arc<dyn Origin>,
    tier: Arc<dyn Tier>,
}

impl KeepBehind {
    pub fn new(inner: Arc<dyn Origin>, tier: Arc<dyn Tier>) -> KeepBehind {
        KeepBehind { inner, tier }
    }
}

#[async_trait]
impl Origin for KeepBehind {
    fn name(&self) -> &OriginName {
        self.inner.name()
    }

    async fn fetch(&self, digest: &Digest, from: u64) -> Result<OriginBody, OriginError> {
        self.inner.fetch(digest, from).await
    }

    fn kept(&self, digest: &Digest, len: u64) {
        self.inner.kept(digest, len);
        self.tier.keep(digest);
    }

    fn rejected(&self, digest: &Digest) {
        self.inner.rejected(digest);
    }
}
