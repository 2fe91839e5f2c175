//! A read-only view of the fills in flight, for the status page.

use std::sync::Weak;

use super::{FillState, Fills};
use crate::oci::Digest;
use crate::origin::OriginName;

/// One fill in flight as the status page shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FillProgress {
    pub digest: Digest,
    pub origin: OriginName,
    /// Bytes received from the origin so far.
    pub received: u64,
    /// The blob's length, once the origin has said it.
    pub len: Option<u64>,
    /// Clients reading it now.
    pub readers: usize,
}

impl Fills {
    /// The fills in flight, at most `limit` of them (the furthest along first). Cost: one look
    /// at each fill in flight, under the lock `get` takes.
    pub fn in_flight(&self, limit: usize) -> Vec<FillProgress> {
        let inflight = self.inflight.lock().expect("fill lock");
        let mut fills: Vec<FillProgress> = inflight
            .iter()
            .map(|(digest, fill)| {
                let (received, readers) = {
                    let tail = fill.data.tail();
                    let live = tail.readers.iter().filter(|r| Weak::strong_count(r) > 0);
                    (tail.received, live.count())
                };
                let len = match &*fill.progress.borrow() {
                    FillState::Streaming { len, .. } => *len,
                    FillState::Verified { len } => Some(*len),
                    FillState::Starting | FillState::Failed(_) => None,
                };
                FillProgress {
                    digest: digest.clone(),
                    origin: fill.origin.clone(),
                    received,
                    len,
                    readers,
                }
            })
            .collect();
        drop(inflight);
        fills.sort_by(|a, b| (b.received, &a.digest).cmp(&(a.received, &b.digest)));
        fills.truncate(limit);
        fills
    }
}
