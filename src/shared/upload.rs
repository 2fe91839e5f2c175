//! Write-behind: verified objects the local store committed, copied to the tier.
//!
//! Small objects go in one PUT with `If-None-Match: *`. Large ones are streamed from the local
//! store as a multipart upload to a staging key, then copied into place with a multipart copy
//! that completes with `If-None-Match: *` (object_store sends no condition on a plain multipart
//! completion), and the staging key is deleted: two writers never clobber each other's object.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use object_store::path::Path;
use object_store::{CopyMode, CopyOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions};
use object_store::{PutPayload, WriteMultipart};
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info, warn};

use super::{Job, S3Tier, TierError, sweep};
use crate::oci::Digest;
use crate::store::{BlobStore, Object};

/// Objects up to this size go in one PUT, read into memory whole.
const SINGLE_PUT: u64 = 16 * 1024 * 1024;
/// Part size of a multipart upload (S3's minimum is 5 MiB).
const PART: usize = 8 * 1024 * 1024;
/// Parts in flight per upload, and uploads at once.
const PARTS_IN_FLIGHT: usize = 2;
const UPLOADS_AT_ONCE: usize = 2;
/// The slowest server-side copy allowed for, in bytes per second (a copy's time-out grows with
/// the object at this rate).
const COPY_RATE: u64 = 10 * 1024 * 1024;

pub(super) async fn run(
    tier: Arc<S3Tier>,
    local: Arc<dyn BlobStore>,
    mut queue: mpsc::Receiver<Job>,
) {
    let slots = Arc::new(Semaphore::new(UPLOADS_AT_ONCE));
    let mut probe = tokio::time::interval(tier.cooldown);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let max_age = tier.max_age.unwrap_or(Duration::MAX);
    let mut sweeps = tokio::time::interval(sweep::interval(max_age));
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = sweeps.tick(), if tier.max_age.is_some() => {
                sweep::sweep(&tier, max_age, SystemTime::now()).await;
            }
            job = queue.recv() => match job {
                None => return,
                // Done before the next job is taken: an upload queued after it finds it gone.
                Some(Job::Remove(digest)) => tier.remove(&digest).await,
                Some(Job::Upload(digest)) => {
                    let slot = slots.clone().acquire_owned().await.expect("never closed");
                    let (tier, local) = (tier.clone(), local.clone());
                    tokio::spawn(async move {
                        upload_counted(&tier, local.as_ref(), digest).await;
                        drop(slot);
                    });
                }
            },
            _ = probe.tick() => retry_failed(&tier, local.as_ref()).await,
        }
    }
}

async fn upload_counted(tier: &S3Tier, local: &dyn BlobStore, digest: Digest) {
    let outcome = upload(tier, local, &digest).await;
    tier.metrics.upload(outcome);
    if outcome == "failed" {
        let mut retry = tier.retry.lock().expect("tier lock");
        if retry.len() < tier.retry_limit && !retry.contains(&digest) {
            retry.push_back(digest);
        }
    }
}

/// The uploads that failed, tried again once the tier answers: the first is the probe (the
/// breaker lets one request through after its cooldown); when it goes through, the rest are
/// queued.
async fn retry_failed(tier: &S3Tier, local: &dyn BlobStore) {
    let first = tier.retry.lock().expect("tier lock").front().cloned();
    let Some(first) = first else { return };
    let outcome = upload(tier, local, &first).await;
    if outcome == "failed" {
        return;
    }
    tier.metrics.upload(outcome);
    let rest: Vec<Digest> = tier.retry.lock().expect("tier lock").drain(..).collect();
    info!(tier = %tier.name, queued = rest.len(), "shared tier is back; writing behind what failed");
    for digest in rest.into_iter().filter(|d| *d != first) {
        if tier.jobs.try_send(Job::Upload(digest)).is_err() {
            tier.metrics.upload("dropped");
        }
    }
}

/// One object; the outcome's metric label. A digest whose tier copy was bad is written over it.
pub(super) async fn upload(tier: &S3Tier, local: &dyn BlobStore, digest: &Digest) -> &'static str {
    let replace = tier.bad.contains_key(digest);
    if !replace {
        if tier.present.contains_key(digest) {
            return "present";
        }
        let path = tier.blob_path(digest);
        match tier.call("head", tier.store.head(&path)).await {
            Ok(_) => {
                tier.present.insert(digest.clone(), ());
                return "present";
            }
            Err(TierError::NotFound) => {}
            // Skipped or failing: tried again when the tier answers.
            Err(_) => return "failed",
        }
    }
    let path = tier.blob_path(digest);
    let obj = match local.peek(digest).await {
        Ok(Some(obj)) => obj,
        Ok(None) => return "gone",
        Err(e) => {
            warn!(%digest, error = %e, "cannot read a cached object to write it behind");
            return "gone";
        }
    };
    let len = obj.len;
    let written = if len <= SINGLE_PUT {
        put_whole(tier, &path, obj, replace).await
    } else {
        put_parts(tier, digest, &path, obj, replace).await
    };
    match written {
        Ok(()) => {
            tier.metrics.written(len);
            tier.present.insert(digest.clone(), ());
            tier.bad.invalidate(digest);
            debug!(%digest, bytes = len, tier = %tier.name, "written behind to the shared tier");
            "uploaded"
        }
        Err(TierError::Exists) => {
            tier.present.insert(digest.clone(), ());
            "present"
        }
        Err(e) => {
            warn!(%digest, error = %e, "could not write a blob behind to the shared tier");
            "failed"
        }
    }
}

pub(super) async fn put_whole(
    tier: &S3Tier,
    path: &Path,
    obj: Object,
    replace: bool,
) -> Result<(), TierError> {
    let (bytes, _) = obj
        .reader
        .read(0, obj.len as usize, BytesMut::new())
        .await
        .map_err(|e| TierError::Failed(format!("local read: {e}")))?;
    let options = PutOptions {
        mode: if replace {
            PutMode::Overwrite
        } else {
            PutMode::Create
        },
        ..Default::default()
    };
    let put = tier.store.put_opts(path, PutPayload::from(bytes), options);
    tier.call("put", put).await.map(|_| ())
}

async fn put_parts(
    tier: &S3Tier,
    digest: &Digest,
    path: &Path,
    obj: Object,
    replace: bool,
) -> Result<(), TierError> {
    let staging = Path::from(format!(
        "{}uploads/{}.{:016x}",
        tier.prefix,
        digest.hex(),
        rand::random::<u64>()
    ));
    let started = tier.call("multipart", tier.store.put_multipart(&staging));
    let mut upload = WriteMultipart::new_with_chunk_size(started.await?, PART);
    let mut pos = 0;
    let mut spare = BytesMut::new();
    while pos < obj.len {
        let n = (obj.len - pos).min(PART as u64) as usize;
        let read = obj.reader.read(pos, n, spare).await;
        let (bytes, back) = match read {
            Ok(read) => read,
            Err(e) => {
                let _ = upload.abort().await;
                return Err(TierError::Failed(format!("local read: {e}")));
            }
        };
        pos += bytes.len() as u64;
        upload.put(bytes);
        spare = back;
        let room = tier.call("multipart", upload.wait_for_capacity(PARTS_IN_FLIGHT));
        room.await?;
    }
    tier.call("multipart", upload.finish()).await?;
    let options = CopyOptions {
        mode: if replace {
            CopyMode::Overwrite
        } else {
            CopyMode::Create
        },
        ..Default::default()
    };
    // The store copies at its own pace: allow the request time for the bytes as well.
    let copy_time = tier.timeout + Duration::from_secs(obj.len / COPY_RATE);
    let copy = tier.store.copy_opts(&staging, path, options);
    let copied = tier.call_within("copy", copy_time, copy).await;
    let _ = tier.call("delete", tier.store.delete(&staging)).await;
    copied
}
