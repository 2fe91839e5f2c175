//! Manifests: from memory, the store, the tag cache (revalidated with HEAD, stale on
//! failure) or one upstream fetch per digest and per tag.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{Method, StatusCode};
use tracing::warn;

use super::peers::is_held_only;
use super::response::{
    ApiResponse, Body, Manifest, ManifestResult, Outcome, header_digest, header_str,
};
use super::{Mirror, STALE_RETRY};
use crate::cluster::Via;
use crate::error::ApiError;
use crate::oci::manifest::MANIFEST_LIMIT;
use crate::oci::media::{self, AcceptSet};
use crate::oci::{Digest, Reference, RepoName, Tag};
use crate::origin::upstream::content_length;
use crate::tags::{StoredAnswer, TagEntry, TagKey};
use crate::upstream::{Upstream, UpstreamError, UpstreamErrorKind};

impl Mirror {
    pub(super) async fn manifest(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        name: &RepoName,
        reference: &Reference,
        accept: AcceptSet,
        via: &Via,
    ) -> ManifestResult {
        match reference {
            Reference::Digest(digest) => self.manifest_by_digest(upstream, name, digest, via).await,
            Reference::Tag(tag) => self.manifest_by_tag(upstream, name, tag, accept, via).await,
        }
    }

    /// A manifest from memory, else from disk.
    pub(super) async fn cached_manifest(&self, digest: &Digest) -> Option<Arc<Manifest>> {
        if let Some(m) = self.manifests.get(digest) {
            self.budget.touch(digest);
            return Some(m);
        }
        // Nothing larger than a manifest may be is read into memory (a blob asked for as one).
        let body = match self.store.read_small(digest, MANIFEST_LIMIT).await {
            Ok(Some(body)) => {
                self.budget.touch(digest);
                body
            }
            Ok(None) => self.manifest_from_tier(digest).await?,
            Err(e) => {
                warn!(%digest, error = %e, "could not read cached manifest");
                return None;
            }
        };
        let media_type = media::sniff(&body).unwrap_or_else(|| media::OCI_MANIFEST.to_string());
        let manifest = Arc::new(Manifest {
            digest: digest.clone(),
            media_type,
            body,
        });
        self.manifests.insert(digest.clone(), manifest.clone());
        Some(manifest)
    }

    /// A manifest the shared tier holds (verified there), kept in the local store too.
    async fn manifest_from_tier(&self, digest: &Digest) -> Option<Bytes> {
        let body = self.shared.as_ref()?.small(digest, MANIFEST_LIMIT).await?;
        match self.store.put(digest, body.clone()).await {
            Ok(()) => self.metrics.record_usage(self.budget.usage()),
            Err(e) => self.metrics.store_write_error("manifest", &e),
        }
        Some(body)
    }

    pub(super) async fn manifest_by_digest(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        name: &RepoName,
        digest: &Digest,
        via: &Via,
    ) -> ManifestResult {
        if let Some(m) = self.cached_manifest(digest).await {
            return Ok((m, Outcome::Hit));
        }
        if is_held_only(via) {
            return Err(ApiError::ManifestUnknown {
                name: name.to_string(),
                reference: digest.to_string(),
            });
        }
        let (this, up, name2, d) = (self.clone(), upstream.clone(), name.clone(), digest.clone());
        let via = via.clone();
        let (result, joined) = self
            .manifest_flights
            .run(digest.clone(), move || async move {
                let reference = Reference::Digest(d);
                let from_peers =
                    this.manifest_from_peers(&up, &name2, &reference, AcceptSet::ALL, &via);
                if let Some(found) = from_peers.await {
                    return found;
                }
                this.fetch_manifest(&up, &name2, &reference, AcceptSet::ALL)
                    .await
            })
            .await;
        let outcome = if joined {
            Outcome::Coalesced
        } else {
            Outcome::Miss
        };
        result.map(|m| (m, outcome))
    }

    /// GET a manifest upstream, verify it, keep it on disk and in memory.
    pub(super) async fn fetch_manifest(
        self: &Arc<Self>,
        upstream: &Upstream,
        name: &RepoName,
        reference: &Reference,
        accept: AcceptSet,
    ) -> Result<Arc<Manifest>, ApiError> {
        let not_found = || ApiError::ManifestUnknown {
            name: name.to_string(),
            reference: reference.to_string(),
        };
        let resp = upstream
            .manifest(Method::GET, name, reference, &accept.header_value())
            .await
            .map_err(|e| ApiError::from_upstream(&e, not_found()))?;
        let claimed = header_digest(&resp);
        let content_type = header_str(&resp, "content-type");
        let body = read_limited(resp, MANIFEST_LIMIT, &upstream.name)
            .await
            .map_err(|e| ApiError::from_upstream(&e, not_found()))?;
        let digest = Digest::of(&body);
        let expected = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => claimed,
        };
        if let Some(expected) = expected.filter(|e| *e != digest) {
            self.metrics
                .digest_mismatches
                .with_label_values(&[&upstream.name])
                .inc();
            warn!(upstream = %upstream.name, %name, %reference, %expected, actual = %digest, "manifest digest mismatch; not cached");
            return Err(ApiError::DigestMismatch {
                origin: format!("upstream {}", upstream.name),
                expected: expected.to_string(),
                actual: digest.to_string(),
            });
        }
        let manifest = self
            .keep_manifest(&upstream.name, name, digest, body, content_type)
            .await;
        if let Some(tier) = &self.shared {
            tier.keep(&manifest.digest);
        }
        Ok(manifest)
    }

    /// A verified manifest: into the store and memory.
    pub(super) async fn keep_manifest(
        self: &Arc<Self>,
        upstream: &Arc<str>,
        name: &RepoName,
        digest: Digest,
        body: Bytes,
        content_type: Option<String>,
    ) -> Arc<Manifest> {
        match self.store.put(&digest, body.clone()).await {
            Ok(()) => {
                self.metrics.record_usage(self.budget.usage());
                self.watch_pins(upstream, name);
            }
            Err(e) => {
                self.metrics.store_write_error("manifest", &e);
                warn!(%digest, error = %e, "could not write manifest to the cache; serving it anyway")
            }
        }
        // The body decides, as it will when this manifest is next read from disk.
        let media_type = media::sniff(&body)
            .or(content_type.filter(|t| media::valid_media_type(t)))
            .unwrap_or_else(|| media::OCI_MANIFEST.to_string());
        let manifest = Arc::new(Manifest {
            digest: digest.clone(),
            media_type,
            body,
        });
        self.manifests.insert(digest, manifest.clone());
        manifest
    }

    pub(super) async fn manifest_by_tag(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        name: &RepoName,
        tag: &Tag,
        accept: AcceptSet,
        via: &Via,
    ) -> ManifestResult {
        let key = TagKey {
            upstream: upstream.name.clone(),
            name: name.clone(),
            tag: tag.clone(),
            accept,
        };
        if upstream.offline {
            let cached = self.tag_from_cache(&key).await;
            return cached
                .map(|m| (m, Outcome::Hit))
                .ok_or_else(|| ApiError::offline(&upstream.name, manifest_unknown(&key)));
        }
        let known = self.tags.get(&key);
        if let Some(entry) = known.as_ref().filter(|e| e.is_fresh()) {
            if let Some(m) = self.cached_manifest(&entry.digest).await {
                return Ok((m, Outcome::Hit));
            }
        }
        if is_held_only(via) {
            return Err(manifest_unknown(&key));
        }
        let (this, up, k, via) = (self.clone(), upstream.clone(), key.clone(), via.clone());
        let (result, joined) = self
            .tag_flights
            .run(key, move || async move {
                // A tag this replica never answered: the shared tier's answer, if fresh, is
                // as good as the owner's (it saved it with the freshness it had).
                let known = match known {
                    None => this.tags_from_tier(&k).await,
                    known => known,
                };
                if let Some(entry) = known.as_ref().filter(|e| e.is_fresh()) {
                    if let Some(m) = this.cached_manifest(&entry.digest).await {
                        return Ok((m, Outcome::Hit));
                    }
                }
                if let Some(found) = this.tag_from_peers(&up, &k, &via).await {
                    return found;
                }
                this.refresh_tag(&up, k, known, &via).await
            })
            .await;
        result.map(|(m, outcome)| (m, if joined { Outcome::Coalesced } else { outcome }))
    }

    /// Ask upstream what a tag points at: a HEAD when we know an earlier answer (free under
    /// Docker Hub's pull limit), else a GET. A failing upstream gets the earlier answer served.
    pub(super) async fn refresh_tag(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        key: TagKey,
        known: Option<TagEntry>,
        via: &Via,
    ) -> ManifestResult {
        let Some(known) = known else {
            let reference = Reference::Tag(key.tag.clone());
            let fetched = self
                .fetch_manifest(upstream, &key.name, &reference, key.accept)
                .await;
            return match fetched {
                Ok(m) => {
                    self.tag_answered(&key, &m.digest, upstream.tag_ttl);
                    self.watch_pins(&key.upstream, &key.name);
                    Ok((m, Outcome::Miss))
                }
                Err(err) if err.is_upstream_failure() => {
                    // Never asked with this client's Accept set, but maybe with another one
                    // whose answer this client can take.
                    let cached = self.tag_from_cache(&key).await.ok_or(err)?;
                    self.count_stale(upstream);
                    Ok((cached, Outcome::Stale))
                }
                Err(err) => Err(err),
            };
        };
        let head = upstream
            .manifest(
                Method::HEAD,
                &key.name,
                &Reference::Tag(key.tag.clone()),
                &key.accept.header_value(),
            )
            .await;
        match head {
            Ok(resp) => {
                let (m, outcome) = match header_digest(&resp) {
                    Some(digest) => {
                        self.manifest_by_digest(upstream, &key.name, &digest, via)
                            .await?
                    }
                    None => {
                        let reference = Reference::Tag(key.tag.clone());
                        let m = self
                            .fetch_manifest(upstream, &key.name, &reference, key.accept)
                            .await?;
                        (m, Outcome::Miss)
                    }
                };
                self.tag_answered(&key, &m.digest, upstream.tag_ttl);
                self.watch_pins(&key.upstream, &key.name);
                Ok((m, outcome))
            }
            Err(err) if err.is_transient() => self.serve_stale(upstream, key, known, &err).await,
            Err(err) => {
                if matches!(err.kind, UpstreamErrorKind::NotFound) {
                    self.tags.remove(&key);
                }
                Err(ApiError::from_upstream(&err, manifest_unknown(&key)))
            }
        }
    }

    /// An answer the upstream gave: into the tag cache, and the shared tier for other
    /// replicas and later clusters.
    fn tag_answered(&self, key: &TagKey, digest: &Digest, ttl: std::time::Duration) {
        self.tags.insert(key.clone(), digest.clone(), ttl);
        if let Some(tier) = &self.shared {
            let answer = StoredAnswer {
                digest: digest.clone(),
                fresh_until: SystemTime::now() + ttl,
            };
            tier.keep_tag(key, &answer);
        }
    }

    /// The shared tier's answers for a tag this replica has none for, into the tag cache
    /// (with the freshness they were saved with); the one for this key's Accept set.
    async fn tags_from_tier(&self, key: &TagKey) -> Option<TagEntry> {
        let tier = self.shared.as_ref()?;
        let answers = tier.tag_answers(&key.upstream, &key.name, &key.tag).await;
        for (accept, answer) in answers {
            let key = TagKey {
                accept,
                ..key.clone()
            };
            self.tags.insert_saved(key, answer);
        }
        self.tags.get(key)
    }

    pub(super) async fn serve_stale(
        &self,
        upstream: &Upstream,
        key: TagKey,
        known: TagEntry,
        err: &UpstreamError,
    ) -> ManifestResult {
        let Some(m) = self.cached_manifest(&known.digest).await else {
            return Err(ApiError::from_upstream(err, manifest_unknown(&key)));
        };
        warn!(upstream = %upstream.name, name = %key.name, tag = %key.tag, error = %err,
              digest = %known.digest, "upstream failed; serving the cached tag");
        self.count_stale(upstream);
        // Don't ask a failing upstream on every request; try again after a short while.
        self.tags
            .insert(key, known.digest, upstream.tag_ttl.min(STALE_RETRY));
        Ok((m, Outcome::Stale))
    }

    pub(super) fn count_stale(&self, upstream: &Upstream) {
        self.metrics
            .stale_served
            .with_label_values(&[&upstream.name])
            .inc();
    }

    /// A tag answered from the cache alone: the answer for this Accept set, else any cached
    /// answer of a type this client accepts.
    pub(super) async fn tag_from_cache(&self, key: &TagKey) -> Option<Arc<Manifest>> {
        if let Some(entry) = self.tags.get(key) {
            if let Some(m) = self.cached_manifest(&entry.digest).await {
                return Some(m);
            }
        }
        for (_, entry) in self.tags.answers(&key.upstream, &key.name, &key.tag) {
            if let Some(m) = self.cached_manifest(&entry.digest).await {
                if key.accept.accepts(&m.media_type) {
                    return Some(m);
                }
            }
        }
        None
    }
}

pub(super) fn manifest_unknown(key: &TagKey) -> ApiError {
    ApiError::ManifestUnknown {
        name: key.name.to_string(),
        reference: key.tag.to_string(),
    }
}

pub(super) fn manifest_response(m: &Manifest, outcome: Outcome) -> ApiResponse {
    let mut resp = ApiResponse::new(StatusCode::OK, outcome);
    resp.headers = vec![
        ("Content-Type", m.media_type.clone()),
        ("Content-Length", m.body.len().to_string()),
        ("Docker-Content-Digest", m.digest.to_string()),
        ("ETag", format!("\"{}\"", m.digest)),
    ];
    resp.body = Body::Full(m.body.clone());
    resp
}

/// The whole body, refusing more than `limit` bytes.
pub(super) async fn read_limited(
    resp: reqwest::Response,
    limit: u64,
    upstream: &Arc<str>,
) -> Result<Bytes, UpstreamError> {
    let too_large = || UpstreamError::new(upstream, UpstreamErrorKind::TooLarge { limit });
    if content_length(resp.headers()).is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let mut body = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| crate::upstream::client::body_error(upstream, &e))?;
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}
