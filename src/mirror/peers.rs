//! The mirror's side of the cluster: checking a member's request, and asking the members
//! along a key's order for manifests, tags and blob lengths before this replica's upstream.
//! (Blob bodies go through the fill, with the cluster's chain as their origin: `blobs.rs`.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::Mirror;
use super::manifests::manifest_unknown;
use super::response::{ApiRequest, ApiResponse, ManifestResult, Outcome};
use crate::cluster::{Asked, Mode, PeerError, PeerRequest, RingKey, Via, peer::HEADER_FRESH_FOR};
use crate::error::ApiError;
use crate::oci::media::AcceptSet;
use crate::oci::{Digest, Reference, RepoName};
use crate::tags::TagKey;
use crate::upstream::Upstream;

/// A member asked only for what this replica holds: nothing is fetched for it.
pub(super) fn is_held_only(via: &Via) -> bool {
    matches!(
        via,
        Via::Peer(PeerRequest {
            mode: Mode::Held,
            ..
        })
    )
}

pub(super) fn asked(upstream: &Upstream, name: &RepoName) -> Asked {
    Asked {
        upstream: upstream.name.clone(),
        name: name.clone(),
    }
}

impl Mirror {
    /// A request that claims to come from a member: its proof must verify.
    pub(super) fn verify_peer(&self, req: &ApiRequest) -> Result<PeerRequest, ApiError> {
        let Some(cluster) = &self.cluster else {
            return Err(ApiError::PeerRefused(
                "peer request refused: this dockside is not part of a cluster".into(),
            ));
        };
        let method = req.method.as_str();
        cluster
            .verify(method, &req.path, req.query.as_deref(), &req.peer)
            .map_err(|e| {
                let from = req.peer.from.as_deref().unwrap_or("?");
                warn!(claimed_from = %from, path = %req.path, error = %e, "peer request refused");
                ApiError::PeerRefused(format!("peer request refused: {e}"))
            })
    }

    /// A manifest from the members along its digest's order. `None`: none of them had it,
    /// ask upstream.
    pub(super) async fn manifest_from_peers(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        name: &RepoName,
        reference: &Reference,
        accept: AcceptSet,
        via: &Via,
    ) -> Option<Result<Arc<crate::mirror::Manifest>, ApiError>> {
        let cluster = self.cluster.as_ref()?;
        let Reference::Digest(digest) = reference else {
            return None;
        };
        let asked = asked(upstream, name);
        for hop in cluster.hops(&RingKey::digest(digest), via) {
            let accept = accept.header_value();
            match cluster
                .client()
                .manifest(&hop, &asked, reference, &accept)
                .await
            {
                Ok(m) => {
                    let kept =
                        self.keep_manifest(&upstream.name, name, m.digest, m.body, m.media_type);
                    return Some(Ok(kept.await));
                }
                Err(PeerError::NotFound(_)) if hop.mode == Mode::Fill => {
                    return Some(Err(ApiError::ManifestUnknown {
                        name: name.to_string(),
                        reference: digest.to_string(),
                    }));
                }
                Err(e) => debug!(error = %e, %digest, "manifest not from this member"),
            }
        }
        None
    }

    /// A tag from the members along its key's order: the owner asks upstream once per
    /// `tag_ttl` for the whole cluster, and says how long its answer stays fresh. `None`: no
    /// member answered, resolve it here.
    pub(super) async fn tag_from_peers(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        key: &TagKey,
        via: &Via,
    ) -> Option<ManifestResult> {
        let cluster = self.cluster.as_ref()?;
        let asked = asked(upstream, &key.name);
        let reference = Reference::Tag(key.tag.clone());
        let ring_key = RingKey::tag(&key.upstream, &key.name, &key.tag);
        for hop in cluster.hops(&ring_key, via) {
            let accept = key.accept.header_value();
            match cluster
                .client()
                .manifest(&hop, &asked, &reference, &accept)
                .await
            {
                Ok(m) => {
                    let ttl = m
                        .fresh_for
                        .map_or(upstream.tag_ttl, |f| f.min(upstream.tag_ttl));
                    let digest = m.digest.clone();
                    let kept = self
                        .keep_manifest(&upstream.name, &key.name, m.digest, m.body, m.media_type)
                        .await;
                    self.tags.insert(key.clone(), digest, ttl);
                    return Some(Ok((kept, Outcome::Miss)));
                }
                Err(PeerError::NotFound(_)) if hop.mode == Mode::Fill => {
                    self.tags.remove(key);
                    return Some(Err(manifest_unknown(key)));
                }
                Err(e) => debug!(error = %e, tag = %key.tag, "tag not from this member"),
            }
        }
        None
    }

    /// A blob's length from the members along its digest's order. `Ok(None)`: ask upstream.
    pub(super) async fn blob_len_from_peers(
        &self,
        upstream: &Upstream,
        name: &RepoName,
        digest: &Digest,
        via: &Via,
    ) -> Result<Option<u64>, ApiError> {
        let Some(cluster) = &self.cluster else {
            return Ok(None);
        };
        let asked = asked(upstream, name);
        for hop in cluster.hops(&RingKey::digest(digest), via) {
            match cluster.client().blob_len(&hop, &asked, digest).await {
                Ok(Some(len)) => return Ok(Some(len)),
                Ok(None) => {}
                Err(PeerError::NotFound(_)) if hop.mode == Mode::Fill => {
                    return Err(ApiError::BlobUnknown {
                        digest: digest.clone(),
                    });
                }
                Err(e) => debug!(error = %e, %digest, "blob length not from this member"),
            }
        }
        Ok(None)
    }

    /// On a tag answered to a member: how long this replica holds the answer fresh, so the
    /// member keeps it no longer.
    pub(super) fn tell_freshness(
        &self,
        resp: &mut ApiResponse,
        upstream: &Upstream,
        name: &RepoName,
        reference: &Reference,
        accept: AcceptSet,
        via: &Via,
    ) {
        let (Via::Peer(_), Reference::Tag(tag)) = (via, reference) else {
            return;
        };
        let key = TagKey {
            upstream: upstream.name.clone(),
            name: name.clone(),
            tag: tag.clone(),
            accept,
        };
        let left = self.tags.get(&key).map_or(Duration::ZERO, |e| {
            e.fresh_until.saturating_duration_since(Instant::now())
        });
        resp.headers
            .push((HEADER_FRESH_FOR, left.as_secs().to_string()));
    }
}
