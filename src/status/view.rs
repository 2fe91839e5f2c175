//! One page's worth of state, gathered from the mirror's parts: plain data, so the page can be
//! rendered (and tested) without a mirror.

use std::time::SystemTime;

use super::figures::Figures;
use super::top::RepoBytes;
use super::{RecentError, Recorder, Sample};
use crate::cluster::Cluster;
use crate::fill::{FillProgress, Fills};
use crate::metrics::Metrics;
use crate::store::{Budget, Usage};

/// Fills in flight listed on the page (the count covers them all).
pub const FILLS_SHOWN: usize = 50;

/// A cluster member as this replica sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub addr: String,
    pub me: bool,
    pub up: bool,
}

pub struct View {
    pub now: SystemTime,
    pub usage: Usage,
    pub figures: Figures,
    pub samples: Vec<Sample>,
    /// Every fill in flight, by the gauge; `fills` lists the first [`FILLS_SHOWN`].
    pub fills_in_flight: u64,
    pub fills: Vec<FillProgress>,
    pub top: Vec<RepoBytes>,
    pub errors: Vec<RecentError>,
    /// `None` without `cluster:`.
    pub cluster: Option<Vec<Member>>,
}

/// What the page needs to read, borrowed from the mirror.
pub struct Sources<'a> {
    pub metrics: &'a Metrics,
    pub budget: &'a dyn Budget,
    pub fills: &'a Fills,
    pub cluster: Option<&'a Cluster>,
    pub recorder: &'a Recorder,
}

impl View {
    /// Every figure from the counters and running totals: nothing here walks the store.
    pub fn gather(from: &Sources) -> View {
        let usage = from.budget.usage();
        // The gauges `/metrics` shows catch up to the same totals.
        from.metrics.record_usage(usage);
        View {
            now: SystemTime::now(),
            usage,
            figures: Figures::read(from.metrics),
            samples: from.recorder.samples(),
            fills_in_flight: from.metrics.fills_in_flight.get().max(0) as u64,
            fills: from.fills.in_flight(FILLS_SHOWN),
            top: from.recorder.top_repositories(),
            errors: from.recorder.recent_errors(),
            cluster: from.cluster.map(members),
        }
    }
}

fn members(cluster: &Cluster) -> Vec<Member> {
    let membership = cluster.members();
    membership
        .list()
        .iter()
        .map(|m| Member {
            addr: m.to_string(),
            me: m == membership.me(),
            up: membership.is_up(m),
        })
        .collect()
}
