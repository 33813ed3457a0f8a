//! The service addresses a flow table's slots refer to.
//!
//! A slot names its flow's destination (address, port, protocol, family)
//! by a 16-bit index into this list instead of in full. That is what makes
//! an IPv4 slot 16 bytes rather than 32 (and an IPv6 slot 32 rather than
//! 64): half the pages for the same flows, and the page walks they cost are
//! most of an established packet's time.
//!
//! The list belongs to one table and changes only with it (service ids,
//! which belong to the configuration, never reach a slot): an index means
//! one address for as long as a slot holds it. Each index counts the slots
//! that hold it. A new address takes the next fresh index; once all
//! [`MAX_VIPS`] have been handed out, one that no slot holds any more is
//! reused. Only when every index is held by a live flow is an address
//! refused (the caller routes its packets without a flow entry).
//!
//! The list grows only when an address is first seen, which is rare: a
//! table serves the handful of addresses of its configuration. Lookups keep
//! the last answer, since a burst mostly goes to one service.

use hashbrown::HashMap;

use crate::types::{Family, FlowKey};

/// Indices a table can hand out (a slot keeps 16 bits).
pub const MAX_VIPS: usize = 1 << 16;

/// A flow's destination: what the table stores as an index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Vip {
    pub dst: u128,
    pub dport: u16,
    pub proto: u8,
    pub family: Family,
}

impl Vip {
    #[inline]
    pub fn of(k: &FlowKey) -> Vip {
        Vip {
            dst: k.dst,
            dport: k.dport,
            proto: k.proto,
            family: k.family,
        }
    }
}

pub(super) struct Vips {
    index: HashMap<Vip, u16>,
    addrs: Vec<Vip>,
    /// Slots holding each index.
    users: Vec<u32>,
    /// The last address looked up, and its index.
    last: Option<(Vip, u16)>,
    /// Indices that may be handed out: [`MAX_VIPS`], fewer in tests.
    limit: usize,
    /// Where the search for an index to reuse resumes.
    cursor: usize,
}

impl Vips {
    pub fn new(limit: usize) -> Vips {
        let limit = limit.clamp(1, MAX_VIPS);
        let expected = limit.min(256);
        Vips {
            index: HashMap::with_capacity(expected),
            addrs: Vec::with_capacity(expected),
            users: Vec::with_capacity(expected),
            last: None,
            limit,
            cursor: 0,
        }
    }

    /// The index of `k`'s destination, if it has one (a flow can be stored
    /// only under an address that has).
    #[inline(always)]
    pub fn find(&mut self, k: &FlowKey) -> Option<u16> {
        let vip = Vip::of(k);
        if let Some((last, i)) = self.last {
            if last == vip {
                return Some(i);
            }
        }
        let i = *self.index.get(&vip)?;
        self.last = Some((vip, i));
        Some(i)
    }

    /// The index of `k`'s destination, like [`Vips::find`] but reading
    /// only (no lookup cache): for the rare reader that must not disturb
    /// the hot one's inlining or cache.
    pub fn get(&self, k: &FlowKey) -> Option<u16> {
        self.index.get(&Vip::of(k)).copied()
    }

    /// The index of `k`'s destination, giving it one if it has none; `None`
    /// when every index is held by a live flow. Inlined as far as the last
    /// answer (a new flow's lookup has just asked for the same address).
    #[inline]
    pub fn intern(&mut self, k: &FlowKey) -> Option<u16> {
        if let Some((last, i)) = self.last {
            if last == Vip::of(k) {
                return Some(i);
            }
        }
        self.intern_slow(k)
    }

    /// [`Vips::intern`] past the last answer.
    #[inline(never)]
    fn intern_slow(&mut self, k: &FlowKey) -> Option<u16> {
        if let Some(i) = self.find(k) {
            return Some(i);
        }
        let vip = Vip::of(k);
        let i = if self.addrs.len() < self.limit {
            self.addrs.push(vip);
            self.users.push(0);
            self.addrs.len() - 1
        } else {
            let n = self.limit;
            let i = (0..n)
                .map(|d| (self.cursor + d) % n)
                .find(|&i| self.users[i] == 0)?;
            self.cursor = (i + 1) % n;
            self.index.remove(&self.addrs[i]);
            self.addrs[i] = vip;
            i
        };
        let i = i as u16;
        self.index.insert(vip, i);
        self.last = Some((vip, i));
        Some(i)
    }

    /// The address of index `i`.
    #[inline]
    pub fn addr(&self, i: u16) -> Vip {
        self.addrs[usize::from(i)]
    }

    /// A slot now holds index `i`.
    #[inline]
    pub fn hold(&mut self, i: u16) {
        self.users[usize::from(i)] += 1;
    }

    /// A slot no longer holds index `i`.
    #[inline]
    pub fn release(&mut self, i: u16) {
        let u = &mut self.users[usize::from(i)];
        debug_assert!(*u > 0, "index {i} released more often than held");
        *u = u.saturating_sub(1);
    }

    /// Indices handed out so far (test helper).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// Slots holding index `i` (test helper).
    #[cfg(test)]
    pub fn users(&self, i: u16) -> u32 {
        self.users[usize::from(i)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{PROTO_TCP, PROTO_UDP};

    fn key(dst: u128, dport: u16, proto: u8, family: Family) -> FlowKey {
        FlowKey {
            src: 7,
            dst,
            sport: 1234,
            dport,
            proto,
            family,
        }
    }

    #[test]
    fn each_destination_field_makes_a_different_address() {
        let mut v = Vips::new(MAX_VIPS);
        let base = key(0xc000_0201, 80, PROTO_TCP, Family::V4);
        let keys = [
            base,
            FlowKey {
                dst: 0xc000_0202,
                ..base
            },
            FlowKey { dport: 443, ..base },
            FlowKey {
                proto: PROTO_UDP,
                ..base
            },
            FlowKey {
                family: Family::V6,
                ..base
            },
        ];
        let idx: Vec<u16> = keys.iter().map(|k| v.intern(k).unwrap()).collect();
        assert_eq!(idx, [0, 1, 2, 3, 4]);
        // The source does not matter, and the answers are stable.
        for (k, &i) in keys.iter().zip(&idx) {
            assert_eq!(
                v.find(&FlowKey {
                    src: 99,
                    sport: 1,
                    ..*k
                }),
                Some(i)
            );
            assert_eq!(v.intern(k), Some(i));
            assert_eq!(v.addr(i), Vip::of(k));
        }
        assert_eq!(v.len(), 5);
        assert_eq!(
            v.find(&FlowKey {
                dport: 8080,
                ..base
            }),
            None
        );
    }

    #[test]
    fn indices_are_reused_only_when_no_slot_holds_them() {
        let mut v = Vips::new(3);
        let k = |port| key(1, port, PROTO_TCP, Family::V4);
        for port in 0..3 {
            let i = v.intern(&k(port)).unwrap();
            v.hold(i);
        }
        // All three held: a fourth address is refused, and nothing changes.
        assert_eq!(v.intern(&k(3)), None);
        assert_eq!(v.find(&k(3)), None);
        assert_eq!(v.find(&k(1)), Some(1));
        // Index 1 is let go: the new address takes it, the old one is gone.
        v.release(1);
        assert_eq!(v.users(1), 0);
        assert_eq!(v.intern(&k(3)), Some(1));
        assert_eq!(v.addr(1), Vip::of(&k(3)));
        assert_eq!(v.find(&k(1)), None);
        assert_eq!((v.find(&k(0)), v.find(&k(2))), (Some(0), Some(2)));
        // An index handed out but not yet held may be taken again.
        assert_eq!(v.intern(&k(4)), Some(1));
        assert_eq!(v.find(&k(3)), None);
        assert_eq!(v.len(), 3);
    }

    #[test]
    fn the_remembered_answer_follows_reuse() {
        let mut v = Vips::new(1);
        let a = key(1, 80, PROTO_TCP, Family::V4);
        let b = key(2, 80, PROTO_TCP, Family::V4);
        assert_eq!(v.intern(&a), Some(0));
        assert_eq!(v.find(&a), Some(0));
        assert_eq!(v.intern(&b), Some(0));
        // `a` was the last answer; its index now means `b`.
        assert_eq!(v.find(&a), None);
        assert_eq!(v.find(&b), Some(0));
    }
}
