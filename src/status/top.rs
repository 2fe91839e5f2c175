//! The repositories that served the most bytes, counted in bounded memory with the Space-Saving
//! algorithm (Metwally et al.): at most `cap` counters are kept; a repository not counted yet,
//! arriving when all are taken, takes over the smallest counter and inherits its count as a
//! possible overcount. Any repository that served more than total/cap bytes is always among
//! those kept, and its count is exact up to that overcount.

use std::collections::HashMap;

/// One repository's bytes served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoBytes {
    pub upstream: String,
    pub repository: String,
    /// Bytes counted (an upper bound: at most `over` more than it really served).
    pub bytes: u64,
    /// How much of `bytes` may belong to the repositories this counter replaced.
    pub over: u64,
}

pub struct TopCounter {
    counts: HashMap<(String, String), (u64, u64)>,
    cap: usize,
}

impl TopCounter {
    pub fn new(cap: usize) -> TopCounter {
        TopCounter {
            counts: HashMap::with_capacity(cap),
            cap,
        }
    }

    /// Count `bytes` served for `repository` of `upstream`. O(1), or O(cap) when a new
    /// repository replaces the smallest counter.
    pub fn add(&mut self, upstream: &str, repository: &str, bytes: u64) {
        let key = (upstream.to_string(), repository.to_string());
        if let Some((count, _)) = self.counts.get_mut(&key) {
            *count += bytes;
            return;
        }
        let mut over = 0;
        if self.counts.len() >= self.cap {
            let smallest = self.counts.iter().min_by_key(|(_, (count, _))| *count);
            let Some((evicted, (count, _))) = smallest.map(|(k, v)| (k.clone(), *v)) else {
                return;
            };
            self.counts.remove(&evicted);
            over = count;
        }
        self.counts.insert(key, (over + bytes, over));
    }

    /// The `n` largest counts, largest first (ties by name, so the page is stable).
    pub fn top(&self, n: usize) -> Vec<RepoBytes> {
        let mut all: Vec<RepoBytes> = self
            .counts
            .iter()
            .map(|((upstream, repository), (bytes, over))| RepoBytes {
                upstream: upstream.clone(),
                repository: repository.clone(),
                bytes: *bytes,
                over: *over,
            })
            .collect();
        all.sort_by(|a, b| {
            (b.bytes, &a.upstream, &a.repository).cmp(&(a.bytes, &b.upstream, &b.repository))
        });
        all.truncate(n);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(top: &[RepoBytes]) -> Vec<(&str, u64)> {
        top.iter()
            .map(|r| (r.repository.as_str(), r.bytes))
            .collect()
    }

    #[test]
    fn counts_exactly_while_there_is_room() {
        let mut top = TopCounter::new(10);
        top.add("docker.io", "library/alpine", 100);
        top.add("docker.io", "library/nginx", 300);
        top.add("docker.io", "library/alpine", 50);
        top.add("quay.io", "library/alpine", 10);
        let got = top.top(10);
        assert_eq!(
            names(&got),
            [
                ("library/nginx", 300),
                ("library/alpine", 150),
                ("library/alpine", 10)
            ]
        );
        assert_eq!(got[2].upstream, "quay.io");
        assert!(got.iter().all(|r| r.over == 0));
        assert_eq!(top.top(1).len(), 1);
    }

    #[test]
    fn memory_stays_bounded_and_heavy_repositories_stay_on_top() {
        let mut top = TopCounter::new(8);
        for i in 0..10_000 {
            top.add("docker.io", &format!("noise/{i}"), 1);
            if i % 10 == 0 {
                top.add("docker.io", "library/heavy", 100);
            }
        }
        assert_eq!(top.counts.len(), 8, "never more counters than the cap");
        let first = &top.top(1)[0];
        assert_eq!(first.repository, "library/heavy");
        // Served 1000 × 100 bytes; the overcount is bounded by what it inherited.
        assert!(first.bytes >= 100_000 && first.bytes - first.over <= 100_000);
    }
}
