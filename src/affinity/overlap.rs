//! Which affinities overlap a key: the control thread's index for the rule
//! that a backend may not pin clients another backend has pinned (a key
//! inside another's prefix, or a prefix around another's key), unless the
//! service allows overlaps.
//!
//! Keys are ordered by (service, family, masked address, prefix length), so
//! the keys *inside* a network are one range scan; the keys *around* it are
//! one exact look-up per shorter prefix length in use, of which a service
//! has a handful. Off the data path: only creates consult it.

use std::collections::BTreeMap;

use super::key::TableKey;
use crate::net::{max_prefix, prefix_mask};
use crate::types::{BackendId, Family, PortMatch, ServiceId};

/// (service, family, masked address, prefix length).
type Net = (ServiceId, bool, u128, u8);

/// Every affinity's network, ports and owner.
#[derive(Default)]
pub struct OverlapIndex {
    nets: BTreeMap<Net, Vec<(PortMatch, BackendId)>>,
    /// Keys per prefix length, per (service, family).
    lengths: hashbrown::HashMap<(ServiceId, bool), [u32; 129]>,
}

fn net(key: &TableKey) -> Net {
    (
        key.service(),
        key.family() == Family::V6,
        key.addr(),
        key.prefix_len(),
    )
}

/// Whether two port selectors share a port.
fn ports_overlap(a: PortMatch, b: PortMatch) -> bool {
    let span = |p: PortMatch| match p {
        PortMatch::Any => (0, u16::MAX),
        PortMatch::One(x) => (x, x),
        PortMatch::Range(lo, hi) => (lo, hi),
    };
    let ((alo, ahi), (blo, bhi)) = (span(a), span(b));
    alo <= bhi && blo <= ahi
}

impl OverlapIndex {
    pub fn insert(&mut self, key: &TableKey, owner: BackendId) {
        self.nets
            .entry(net(key))
            .or_default()
            .push((key.ports(), owner));
        let lengths = self
            .lengths
            .entry((key.service(), key.family() == Family::V6))
            .or_insert([0; 129]);
        lengths[usize::from(key.prefix_len())] += 1;
    }

    pub fn remove(&mut self, key: &TableKey) {
        self.remove_where(key, |_| true);
    }

    /// Removes `key` as `owner`'s, where several owners may hold equal
    /// keys (creates in flight to the shared store).
    pub fn remove_owned(&mut self, key: &TableKey, owner: BackendId) {
        self.remove_where(key, |o| o == owner);
    }

    fn remove_where(&mut self, key: &TableKey, owned: impl Fn(BackendId) -> bool) {
        let n = net(key);
        if let Some(v) = self.nets.get_mut(&n) {
            if let Some(i) = v.iter().position(|&(p, o)| p == key.ports() && owned(o)) {
                v.swap_remove(i);
                if let Some(lengths) = self.lengths.get_mut(&(n.0, n.1)) {
                    lengths[usize::from(n.3)] -= 1;
                }
            }
            if v.is_empty() {
                self.nets.remove(&n);
            }
        }
    }

    /// An owner other than `owner` of an affinity that shares a client
    /// (address and port) with `key`: one whose network contains `key`'s,
    /// or lies inside it, with overlapping ports.
    pub fn other_owner(&self, key: &TableKey, owner: BackendId) -> Option<BackendId> {
        self.other(key, owner).map(|(_, o)| o)
    }

    /// Like [`other_owner`](Self::other_owner), with the other backend's key.
    pub fn other(&self, key: &TableKey, owner: BackendId) -> Option<(TableKey, BackendId)> {
        let (service, v6, addr, plen) = net(key);
        let family = key.family();
        let found = |n: &Net, entries: &Vec<(PortMatch, BackendId)>| {
            entries
                .iter()
                .find(|(p, o)| *o != owner && ports_overlap(*p, key.ports()))
                .and_then(|&(p, o)| {
                    let k = TableKey::new(n.0, family, n.2, n.3, p).ok()?;
                    Some((k, o))
                })
        };
        // Around it (and equal): one exact look-up per shorter length in use.
        if let Some(lengths) = self.lengths.get(&(service, v6)) {
            for len in 0..=plen {
                if lengths[usize::from(len)] == 0 {
                    continue;
                }
                let outer = (service, v6, addr & prefix_mask(family, len), len);
                if let Some(o) = self.nets.get(&outer).and_then(|e| found(&outer, e)) {
                    return Some(o);
                }
            }
        }
        // Inside it: every network whose address falls in `key`'s.
        let last = addr | !prefix_mask(family, plen) & prefix_mask(family, max_prefix(family));
        self.nets
            .range((service, v6, addr, plen)..=(service, v6, last, u8::MAX))
            .filter(|((_, _, _, len), _)| *len > plen)
            .find_map(|(n, entries)| found(n, entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k4(addr: [u8; 4], plen: u8, ports: PortMatch) -> TableKey {
        TableKey::new(1, Family::V4, u32::from_be_bytes(addr).into(), plen, ports).unwrap()
    }

    #[test]
    fn finds_overlaps_both_ways_and_ignores_the_owner() {
        let mut ix = OverlapIndex::default();
        let wide = k4([10, 1, 0, 0], 16, PortMatch::Any);
        ix.insert(&wide, 1);
        // Inside backend 1's /16: refused for 2, fine for 1.
        let inner = k4([10, 1, 2, 3], 32, PortMatch::Any);
        assert_eq!(ix.other_owner(&inner, 2), Some(1));
        assert_eq!(ix.other_owner(&inner, 1), None);
        // Around it: a /8 holding the /16.
        let outer = k4([10, 0, 0, 0], 8, PortMatch::Any);
        assert_eq!(ix.other_owner(&outer, 2), Some(1));
        // Beside it: no overlap.
        assert_eq!(
            ix.other_owner(&k4([10, 2, 0, 0], 16, PortMatch::Any), 2),
            None
        );
        assert_eq!(
            ix.other_owner(&k4([10, 0, 255, 255], 32, PortMatch::Any), 2),
            None
        );
        // Another service or family never overlaps.
        let other_svc = TableKey::new(2, Family::V4, 0x0a01_0203, 32, PortMatch::Any).unwrap();
        assert_eq!(ix.other_owner(&other_svc, 2), None);
        let v6 = TableKey::new(1, Family::V6, 0x0a01_0203, 128, PortMatch::Any).unwrap();
        assert_eq!(ix.other_owner(&v6, 2), None);
        assert_eq!(ix.other(&inner, 2), Some((wide, 1)), "the key comes back");
        ix.remove(&wide);
        assert_eq!(ix.other_owner(&inner, 2), None);
        assert_eq!(ix.other_owner(&outer, 2), None);
    }

    #[test]
    fn ports_must_overlap_too() {
        let mut ix = OverlapIndex::default();
        ix.insert(&k4([192, 0, 2, 1], 32, PortMatch::Range(1000, 1999)), 1);
        let at = |p| k4([192, 0, 2, 0], 24, p);
        assert_eq!(ix.other_owner(&at(PortMatch::One(999)), 2), None);
        assert_eq!(ix.other_owner(&at(PortMatch::One(1000)), 2), Some(1));
        assert_eq!(
            ix.other_owner(&at(PortMatch::Range(1999, 3000)), 2),
            Some(1)
        );
        assert_eq!(ix.other_owner(&at(PortMatch::Range(2000, 3000)), 2), None);
        assert_eq!(ix.other_owner(&at(PortMatch::Any), 2), Some(1));
    }

    #[test]
    fn ipv6_and_whole_space() {
        let mut ix = OverlapIndex::default();
        let k = TableKey::new(1, Family::V6, 0x2001_0db8 << 96 | 7, 128, PortMatch::Any).unwrap();
        ix.insert(&k, 1);
        let p48 = TableKey::new(1, Family::V6, 0x2001_0db8 << 96, 48, PortMatch::Any).unwrap();
        assert_eq!(ix.other_owner(&p48, 2), Some(1));
        let all = TableKey::new(1, Family::V6, 0, 0, PortMatch::Any).unwrap();
        assert_eq!(ix.other_owner(&all, 2), Some(1));
        let all4 = k4([0, 0, 0, 0], 0, PortMatch::Any);
        ix.insert(&all4, 3);
        assert_eq!(
            ix.other_owner(&k4([1, 2, 3, 4], 32, PortMatch::Any), 2),
            Some(3)
        );
        // Two owners in one network entry: the other one is found.
        ix.insert(&k4([1, 2, 3, 4], 32, PortMatch::One(80)), 2);
        assert_eq!(
            ix.other_owner(&k4([1, 2, 3, 4], 32, PortMatch::One(80)), 3),
            Some(2)
        );
    }
}
