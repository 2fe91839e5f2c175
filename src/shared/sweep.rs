//! `cache.shared.max_age`: the tier's own age bound, for stores without lifecycle rules.
//! Objects are listed page by page (no full listing in memory) and those written before the
//! cut-off are deleted; the next miss of one fetches and writes it anew.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use tracing::{info, warn};

use super::S3Tier;
use crate::oci::Digest;

/// How often the sweep runs: a quarter of the age bound, between a minute and an hour.
pub(super) fn interval(max_age: Duration) -> Duration {
    (max_age / 4).clamp(Duration::from_secs(60), Duration::from_secs(3600))
}

/// Delete what was written before `now - max_age`; how many objects went.
pub(super) async fn sweep(tier: &S3Tier, max_age: Duration, now: SystemTime) -> u64 {
    let cutoff = now
        .checked_sub(max_age)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64);
    let mut removed = 0;
    for part in ["blobs/", "tags/", "uploads/"] {
        let prefix = Path::from(format!("{}{part}", tier.prefix));
        let mut listing = tier.store.list(Some(&prefix));
        loop {
            let next = match tokio::time::timeout(tier.timeout, listing.next()).await {
                Ok(Some(Ok(meta))) => meta,
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    warn!(tier = %tier.name, error = %e, "shared-tier sweep could not list; trying later");
                    return removed;
                }
                Err(_) => {
                    warn!(tier = %tier.name, "shared-tier sweep: listing timed out; trying later");
                    return removed;
                }
            };
            if next.last_modified.timestamp() >= cutoff {
                continue;
            }
            if tier
                .call("delete", tier.store.delete(&next.location))
                .await
                .is_ok()
            {
                removed += 1;
                if let Some(digest) = next
                    .location
                    .filename()
                    .and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok())
                {
                    tier.present.invalidate(&digest);
                }
            }
        }
    }
    if removed > 0 {
        info!(tier = %tier.name, removed, "shared-tier sweep removed objects past max_age");
    }
    removed
}
