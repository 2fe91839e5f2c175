//! Who owns a key: rendezvous (highest random weight) hashing over the members.
//!
//! Every member gets a score per key, `sha256(member, key)`; the members sorted by falling
//! score are the key's order of preference, and the first is its owner. A member's score for a
//! key does not depend on who else is a member, so two replicas with different member lists
//! still agree on the order of the members they both know, and a member joining or leaving moves
//! only the keys it wins or held. That property is also what keeps forwarding from looping:
//! a replica only forwards a fill to members that score higher than itself, and "higher" means
//! the same thing everywhere.

use sha2::{Digest as _, Sha256};

use crate::config::PeerAddr;
use crate::oci::{Digest, RepoName, Tag};

/// What is placed on the ring: a blob or manifest digest, or a tag of one upstream's repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingKey(Vec<u8>);

impl RingKey {
    pub fn digest(digest: &Digest) -> RingKey {
        let mut key = b"d\0".to_vec();
        key.extend_from_slice(digest.to_string().as_bytes());
        RingKey(key)
    }

    /// A tag, whatever the Accept set it is asked with: one owner asks upstream for all of them.
    pub fn tag(upstream: &str, name: &RepoName, tag: &Tag) -> RingKey {
        let text = format!("t\0{upstream}\0{name}\0{tag}");
        RingKey(text.into_bytes())
    }
}

/// A member's score for a key; the highest owns it. Ties (a 64-bit collision) go to the
/// lower address, so the order is total.
pub fn score(member: &PeerAddr, key: &RingKey) -> u64 {
    let mut h = Sha256::new();
    h.update((member.as_str().len() as u32).to_be_bytes());
    h.update(member.as_str().as_bytes());
    h.update(&key.0);
    let out = h.finalize();
    u64::from_be_bytes(out[..8].try_into().expect("8 bytes"))
}

/// `members` in order of preference for `key`: owner first.
pub fn rank<'a>(members: &'a [PeerAddr], key: &RingKey) -> Vec<&'a PeerAddr> {
    let mut scored: Vec<(u64, &PeerAddr)> = members.iter().map(|m| (score(m, key), m)).collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.into_iter().map(|(_, m)| m).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn members(n: usize) -> Vec<PeerAddr> {
        (0..n)
            .map(|i| PeerAddr::parse(&format!("10.0.0.{}:5000", i + 1)).unwrap())
            .collect()
    }

    fn key(i: usize) -> RingKey {
        RingKey::digest(&Digest::of(format!("blob {i}").as_bytes()))
    }

    #[test]
    fn keys_spread_evenly_over_members() {
        let m = members(3);
        let mut owned: HashMap<&PeerAddr, usize> = HashMap::new();
        for i in 0..3000 {
            *owned.entry(rank(&m, &key(i))[0]).or_default() += 1;
        }
        assert_eq!(owned.len(), 3);
        for (member, n) in owned {
            assert!((800..1200).contains(&n), "{member} owns {n} of 3000");
        }
    }

    #[test]
    fn a_new_member_takes_keys_only_for_itself() {
        let (three, four) = (members(3), members(4));
        let mut moved = 0;
        for i in 0..2000 {
            let before = rank(&three, &key(i))[0];
            let after = rank(&four, &key(i))[0];
            if before != after {
                assert_eq!(after, &four[3], "key {i} moved between old members");
                moved += 1;
                // The old owner is the new owner's first successor: the one to ask first.
                assert_eq!(rank(&four, &key(i))[1], before);
            }
        }
        assert!((350..650).contains(&moved), "{moved} of 2000 keys moved");
    }

    #[test]
    fn every_view_agrees_on_the_order_of_the_members_it_has() {
        let all = members(5);
        let some = vec![all[4].clone(), all[1].clone(), all[2].clone()];
        for i in 0..200 {
            let k = key(i);
            let full: Vec<&PeerAddr> = rank(&all, &k)
                .into_iter()
                .filter(|m| some.contains(m))
                .collect();
            assert_eq!(full, rank(&some, &k));
        }
    }

    #[test]
    fn tags_and_digests_are_different_keys() {
        let name = RepoName::parse("library/alpine").unwrap();
        let tag = Tag::parse("3.20").unwrap();
        assert_ne!(
            RingKey::tag("docker.io", &name, &tag),
            RingKey::tag("quay.io", &name, &tag)
        );
        assert_eq!(
            RingKey::tag("docker.io", &name, &tag),
            RingKey::tag("docker.io", &name, &tag)
        );
    }
}
