//! The per-worker connection table.
//!
//! Each worker owns one `FlowTable` and is its only user, so it needs no
//! locks. The table is set-associative: a flow's hash picks exactly one
//! bucket of [`WAYS`] slots. A bucket is 512 bytes, aligned to 512: one
//! header cache line with a 16-bit tag, a coarse last-seen stamp and the TCP
//! state of each slot, then one 64-byte cache line per slot holding the key,
//! backend, service and auto-affinity handle. A lookup reads the header and,
//! on a tag match, one slot line: two cache lines in the same 4 KiB page, so
//! one TLB miss at most, whatever the table's fill (the tables are far larger
//! than the TLB's reach, and page walks were half the cost of a packet).
//!
//! Capacity is fixed at construction (rounded up to a multiple of [`WAYS`])
//! and nothing is allocated afterwards. When a new flow's bucket is full, an
//! entry whose idle timeout has passed is replaced first; otherwise the
//! bucket's least recently seen entry is evicted. Eviction is therefore
//! oldest-first *per bucket*, as in production load-balancer flow tables
//! (Maglev, Katran): a global LRU would cost a list update per packet. An
//! evicted flow is not lost: its next packet is routed again by affinity and
//! the consistent hash, which normally picks the same backend.
//!
//! Last-seen times are kept in units of 2^20 ns (about 1.05 ms), so idle
//! timeouts are honoured to within about two milliseconds (an entry is
//! judged expired only once it certainly is). Entries whose idle timeout
//! passed are treated as gone by `lookup` and `insert` and are removed by the
//! incremental [`FlowTable::sweep`], which hands each one back so the caller
//! can release what it holds.

use std::time::Duration;

use crate::dataplane::{BackendId, ServiceId};
use crate::dpdk::prefetch;
use crate::packet::{tcp_flags, Family, FlowKey};

/// Slots per bucket: a header line and seven slot lines make 512 bytes,
/// eight buckets to a 4 KiB page.
pub const WAYS: usize = 7;
/// Largest capacity a table is built with (2^28 flows).
pub const MAX_CAPACITY: usize = 1 << 28;

/// Header stamps count time in units of 2^20 ns (about 1.05 ms); a `u32` of
/// them wraps after about 52 days, far beyond any idle timeout.
const STAMP_SHIFT: u32 = 20;
/// Tag of an empty slot.
const EMPTY: u16 = 0;

/// Connection state, as far as a one-directional (DSR) observer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TcpState {
    /// SYN seen, no ACK from the client yet.
    SynSeen = 0,
    /// The client has acknowledged: the connection is open.
    Established = 1,
    /// The client sent FIN: the connection is closing.
    Closing = 2,
    /// A UDP flow.
    Udp = 3,
}

impl TcpState {
    #[inline]
    fn from_u8(v: u8) -> TcpState {
        match v {
            0 => TcpState::SynSeen,
            1 => TcpState::Established,
            2 => TcpState::Closing,
            _ => TcpState::Udp,
        }
    }
}

/// Idle timeouts per state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowTimeouts {
    pub syn: Duration,
    pub established: Duration,
    pub fin: Duration,
    pub udp: Duration,
}

impl Default for FlowTimeouts {
    fn default() -> FlowTimeouts {
        FlowTimeouts {
            syn: Duration::from_secs(10),
            established: Duration::from_secs(300),
            fin: Duration::from_secs(10),
            udp: Duration::from_secs(60),
        }
    }
}

/// One tracked connection, as handed to and from the table. The table
/// stores the state and last-seen time in the bucket header (the time
/// coarsely) and the rest in a 64-byte slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEntry {
    pub key: FlowKey,
    pub backend: BackendId,
    pub service: ServiceId,
    /// Owned by the table: changed by the TCP flags passed to `lookup`.
    pub state: TcpState,
    /// Time of the last packet, in ns; owned by the table, which keeps it
    /// to about a millisecond (entries it hands back carry that time).
    pub last_seen: u64,
    /// Opaque handle for automatic affinity; `u32::MAX` = none.
    pub auto_slot: u32,
}

/// Counters of one table, totals since construction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// New flows inserted.
    pub inserted: u64,
    /// Inserts that replaced the entry of the same key.
    pub updated: u64,
    /// Live flows evicted from a full bucket to make room.
    pub evicted: u64,
    /// Flows ended by their idle timeout (found by lookup, insert or sweep).
    pub expired: u64,
    /// Flows ended by RST, or by a new SYN reusing a closing flow's tuple.
    pub closed: u64,
    /// Flows removed by `remove`.
    pub removed: u64,
    /// Lookups that found a live flow.
    pub hits: u64,
    /// Lookups that found none (stale flows included).
    pub misses: u64,
}

/// The outcome of [`FlowTable::lookup`].
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A live flow, refreshed and with the packet's flags applied (a copy:
    /// change its backend with [`FlowTable::set_backend`]).
    Hit(FlowEntry),
    /// The packet carried RST: the flow is removed and handed back. The
    /// packet itself still belongs to `backend`; the caller releases the
    /// entry's auto-affinity slot and counts the connection as ended.
    Reset(FlowEntry),
    /// The flow had already ended before this packet (its idle timeout
    /// passed, or this is a new SYN on the tuple of a closing flow). It is
    /// removed and handed back for the caller to release; the packet is
    /// handled as a new flow.
    Stale(FlowEntry),
    /// No flow with this key.
    Miss,
}

/// One bucket's header: the per-slot stamps, tags and states, so that
/// finding a key, a free slot, an expired slot or the oldest slot reads no
/// slot line.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
struct Header {
    stamps: [u32; WAYS],
    tags: [u16; WAYS],
    states: [u8; WAYS],
}

/// What a slot stores: everything of a [`FlowEntry`] but the state and
/// last-seen time, which live in the header.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Slot {
    key: FlowKey,
    backend: BackendId,
    auto_slot: u32,
    service: ServiceId,
}

/// A header line and its slots: 512 bytes, so a bucket never straddles a
/// 4 KiB page.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(512))]
struct Bucket {
    header: Header,
    slots: [Slot; WAYS],
}

impl Bucket {
    const EMPTY: Bucket = Bucket {
        header: Header {
            stamps: [0; WAYS],
            tags: [EMPTY; WAYS],
            states: [0; WAYS],
        },
        slots: [Slot {
            key: FlowKey {
                src: 0,
                dst: 0,
                sport: 0,
                dport: 0,
                proto: 0,
                family: Family::V4,
            },
            backend: 0,
            auto_slot: u32::MAX,
            service: 0,
        }; WAYS],
    };
}

/// The per-worker connection table.
pub struct FlowTable {
    buckets: Box<[Bucket]>,
    len: usize,
    /// Idle timeout in ns, indexed by `TcpState as usize`.
    timeout_ns: [u64; 4],
    cursor: usize,
    stats: FlowStats,
}

#[inline]
fn tag_of(hash: u64) -> u16 {
    // Top 16 bits (the bucket index uses the low 32); never EMPTY.
    ((hash >> 48) as u16).max(1)
}

#[inline]
fn stamp_of(ns: u64) -> u32 {
    (ns >> STAMP_SHIFT) as u32
}

impl FlowTable {
    /// A table for `capacity` flows, rounded up to a multiple of [`WAYS`]
    /// (at least [`WAYS`], at most about [`MAX_CAPACITY`]). All memory is
    /// allocated here.
    pub fn new(capacity: usize, timeouts: FlowTimeouts) -> FlowTable {
        let buckets = capacity.clamp(WAYS, MAX_CAPACITY).div_ceil(WAYS);
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        FlowTable {
            buckets: vec![Bucket::EMPTY; buckets].into_boxed_slice(),
            len: 0,
            timeout_ns: [
                ns(timeouts.syn),
                ns(timeouts.established),
                ns(timeouts.fin),
                ns(timeouts.udp),
            ],
            cursor: 0,
            stats: FlowStats::default(),
        }
    }

    /// The bucket of `hash`: its low 32 bits scaled to the bucket count (no
    /// division, any count).
    #[inline]
    fn bucket(&self, hash: u64) -> usize {
        (((hash & 0xffff_ffff) * self.buckets.len() as u64) >> 32) as usize
    }

    /// Hints that the bucket of `hash` will be read soon (called for a whole
    /// burst before its lookups).
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        prefetch(&self.buckets[self.bucket(hash)].header);
    }

    /// Second prefetch stage: once the bucket header is in cache (after
    /// [`FlowTable::prefetch`] for the whole burst), hints the slot whose
    /// tag matches `hash`, so that the burst's slot reads overlap too. With
    /// no match (a new flow) it hints the slot `insert` will most likely
    /// write: the first empty one, else the least recently seen.
    #[inline]
    pub fn prefetch_entry(&self, hash: u64) {
        let bk = &self.buckets[self.bucket(hash)];
        let h = &bk.header;
        let tag = tag_of(hash);
        let slot = match h.tags.iter().position(|&t| t == tag) {
            Some(s) => s,
            None => match h.tags.iter().position(|&t| t == EMPTY) {
                Some(s) => s,
                None => (0..WAYS).min_by_key(|&s| h.stamps[s]).unwrap_or(0),
            },
        };
        prefetch(&bk.slots[slot]);
    }

    #[inline]
    fn find(&self, b: usize, tag: u16, key: &FlowKey) -> Option<usize> {
        let bk = &self.buckets[b];
        (0..WAYS).find(|&s| bk.header.tags[s] == tag && bk.slots[s].key == *key)
    }

    /// True when slot `s` of bucket `b` has certainly been idle longer than
    /// its state's timeout (stamps are coarse: up to two stamp units late).
    #[inline]
    fn expired(&self, b: usize, s: usize, now: u64) -> bool {
        let h = &self.buckets[b].header;
        let age = u64::from(stamp_of(now).wrapping_sub(h.stamps[s]));
        age.saturating_sub(1) << STAMP_SHIFT > self.timeout_ns[h.states[s] as usize & 3]
    }

    /// The entry in slot `s` of bucket `b`, as the caller sees it.
    #[inline]
    fn entry(&self, b: usize, s: usize) -> FlowEntry {
        let bk = &self.buckets[b];
        let slot = &bk.slots[s];
        FlowEntry {
            key: slot.key,
            backend: slot.backend,
            service: slot.service,
            state: TcpState::from_u8(bk.header.states[s]),
            last_seen: u64::from(bk.header.stamps[s]) << STAMP_SHIFT,
            auto_slot: slot.auto_slot,
        }
    }

    fn take(&mut self, b: usize, s: usize) -> FlowEntry {
        let e = self.entry(b, s);
        self.buckets[b].header.tags[s] = EMPTY;
        self.len -= 1;
        e
    }

    /// Finds a live flow, refreshes its last-seen time to `now` and applies
    /// the packet's TCP flags: ACK moves SynSeen to Established, FIN moves to
    /// Closing (the shorter `fin` timeout), RST ends the flow. UDP flows
    /// ignore flags. See [`Lookup`] for what comes back.
    #[inline]
    pub fn lookup(&mut self, key: &FlowKey, hash: u64, now: u64, tcp_flags: u8) -> Lookup {
        let b = self.bucket(hash);
        let Some(s) = self.find(b, tag_of(hash), key) else {
            self.stats.misses += 1;
            return Lookup::Miss;
        };
        if self.expired(b, s, now) {
            self.stats.expired += 1;
            self.stats.misses += 1;
            return Lookup::Stale(self.take(b, s));
        }
        let old_state = TcpState::from_u8(self.buckets[b].header.states[s]);
        let mut state = old_state;
        if old_state != TcpState::Udp {
            if tcp_flags & tcp_flags::RST != 0 {
                self.stats.closed += 1;
                self.stats.hits += 1;
                return Lookup::Reset(self.take(b, s));
            }
            let syn_only = tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
            if old_state == TcpState::Closing && syn_only {
                self.stats.closed += 1;
                self.stats.misses += 1;
                return Lookup::Stale(self.take(b, s));
            }
            if tcp_flags & tcp_flags::FIN != 0 {
                state = TcpState::Closing;
            } else if old_state == TcpState::SynSeen && tcp_flags & tcp_flags::ACK != 0 {
                state = TcpState::Established;
            }
        }
        let h = &mut self.buckets[b].header;
        h.states[s] = state as u8;
        h.stamps[s] = stamp_of(now);
        self.stats.hits += 1;
        let slot = &self.buckets[b].slots[s];
        Lookup::Hit(FlowEntry {
            key: *key,
            backend: slot.backend,
            service: slot.service,
            state,
            last_seen: now,
            auto_slot: slot.auto_slot,
        })
    }

    /// Changes the backend of a live flow; false if the flow is not there.
    pub fn set_backend(&mut self, key: &FlowKey, hash: u64, backend: BackendId) -> bool {
        let b = self.bucket(hash);
        match self.find(b, tag_of(hash), key) {
            Some(s) => {
                self.buckets[b].slots[s].backend = backend;
                true
            }
            None => false,
        }
    }

    /// Inserts `entry` (its `last_seen` is set to `now`). An entry with the
    /// same key is replaced. Returns the entry displaced, if any: the old
    /// entry of the same key, an entry whose timeout had passed, or the
    /// bucket's least recently seen entry evicted to make room. The caller
    /// releases what the displaced entry holds.
    pub fn insert(&mut self, entry: FlowEntry, hash: u64, now: u64) -> Option<FlowEntry> {
        let b = self.bucket(hash);
        let tag = tag_of(hash);
        let (slot, displaced) = if let Some(s) = self.find(b, tag, &entry.key) {
            self.stats.updated += 1;
            (s, Some(self.entry(b, s)))
        } else {
            self.stats.inserted += 1;
            let h = &self.buckets[b].header;
            if let Some(s) = (0..WAYS).find(|&s| h.tags[s] == EMPTY) {
                self.len += 1;
                (s, None)
            } else if let Some(s) = (0..WAYS).find(|&s| self.expired(b, s, now)) {
                self.stats.expired += 1;
                (s, Some(self.entry(b, s)))
            } else {
                let now_stamp = stamp_of(now);
                let s = (0..WAYS)
                    .max_by_key(|&s| now_stamp.wrapping_sub(h.stamps[s]))
                    .unwrap_or(0);
                self.stats.evicted += 1;
                (s, Some(self.entry(b, s)))
            }
        };
        let bk = &mut self.buckets[b];
        bk.slots[slot] = Slot {
            key: entry.key,
            backend: entry.backend,
            auto_slot: entry.auto_slot,
            service: entry.service,
        };
        bk.header.tags[slot] = tag;
        bk.header.stamps[slot] = stamp_of(now);
        bk.header.states[slot] = entry.state as u8;
        displaced
    }

    /// Removes a flow, returning it.
    pub fn remove(&mut self, key: &FlowKey, hash: u64) -> Option<FlowEntry> {
        let b = self.bucket(hash);
        let s = self.find(b, tag_of(hash), key)?;
        self.stats.removed += 1;
        Some(self.take(b, s))
    }

    /// Incremental sweep: examines up to `buckets` buckets from an internal
    /// cursor and calls `ended` for each timed-out entry, removing it. A
    /// full cycle ([`FlowTable::buckets`] buckets) visits every entry once.
    pub fn sweep(&mut self, now: u64, buckets: usize, mut ended: impl FnMut(FlowEntry)) {
        let n = self.buckets.len();
        for _ in 0..buckets.min(n) {
            let b = self.cursor;
            self.cursor = if b + 1 == n { 0 } else { b + 1 };
            for s in 0..WAYS {
                if self.buckets[b].header.tags[s] != EMPTY && self.expired(b, s, now) {
                    self.stats.expired += 1;
                    ended(self.take(b, s));
                }
            }
        }
    }

    /// Slots in use (timed-out entries not yet swept included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maximum number of flows.
    pub fn capacity(&self) -> usize {
        self.buckets.len() * WAYS
    }

    /// Number of buckets (a full sweep cycle).
    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }

    pub fn stats(&self) -> FlowStats {
        self.stats
    }

    /// The idle timeout of a state.
    pub fn timeout(&self, state: TcpState) -> Duration {
        Duration::from_nanos(self.timeout_ns[state as usize])
    }

    /// The occupied slots match `len` (test helper).
    #[cfg(test)]
    fn consistent(&self) -> bool {
        let n: usize = self
            .buckets
            .iter()
            .map(|bk| bk.header.tags.iter().filter(|&&t| t != EMPTY).count())
            .sum();
        n == self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{flow_hash, PROTO_TCP, PROTO_UDP};
    use tcp_flags::{ACK, FIN, RST, SYN};

    const SEC: u64 = 1_000_000_000;

    fn key(i: u32, proto: u8) -> FlowKey {
        FlowKey {
            src: 0x0a00_0000 | i as u128,
            dst: 0xc000_0201,
            sport: 1024 + (i % 50_000) as u16,
            dport: 80,
            proto,
            family: Family::V4,
        }
    }

    fn entry(k: FlowKey, state: TcpState) -> FlowEntry {
        FlowEntry {
            key: k,
            backend: 7,
            service: 1,
            state,
            last_seen: 0,
            auto_slot: u32::MAX,
        }
    }

    fn table(cap: usize) -> FlowTable {
        FlowTable::new(
            cap,
            FlowTimeouts {
                syn: Duration::from_secs(10),
                established: Duration::from_secs(300),
                fin: Duration::from_secs(5),
                udp: Duration::from_secs(60),
            },
        )
    }

    fn is_hit(l: &Lookup) -> bool {
        matches!(l, Lookup::Hit(_))
    }

    #[test]
    fn capacity_rounds_up_and_bounds_hold() {
        assert_eq!(table(1000).capacity(), 1001);
        assert_eq!(table(0).capacity(), WAYS);
        let mut t = table(1000);
        let mut displaced = 0u64;
        for i in 0..10_240 {
            let k = key(i, PROTO_TCP);
            if t.insert(
                entry(k, TcpState::Established),
                flow_hash(&k),
                SEC + i as u64,
            )
            .is_some()
            {
                displaced += 1;
            }
            assert!(t.len() <= t.capacity());
        }
        let st = t.stats();
        assert_eq!(st.inserted, 10_240);
        assert_eq!(st.evicted, displaced);
        assert_eq!(t.len() as u64, st.inserted - st.evicted);
        assert!(t.len() > 900, "table should be nearly full: {}", t.len());
        assert!(t.consistent());
    }

    #[test]
    fn timeouts_per_state() {
        let mut t = table(64);
        let cases = [
            (TcpState::SynSeen, PROTO_TCP, 10),
            (TcpState::Established, PROTO_TCP, 300),
            (TcpState::Closing, PROTO_TCP, 5),
            (TcpState::Udp, PROTO_UDP, 60),
        ];
        for (n, &(state, proto, secs)) in cases.iter().enumerate() {
            let k = key(n as u32, proto);
            let h = flow_hash(&k);
            let t0 = 100 * SEC;
            t.insert(entry(k, state), h, t0);
            // Just inside the timeout: still there (flags 0 keep the state).
            assert!(is_hit(&t.lookup(&k, h, t0 + secs * SEC, 0)), "{state:?}");
            // Past the timeout from the refreshed time (by more than the
            // stamps' two-unit slack): handed back as stale.
            let t1 = t0 + 2 * secs * SEC + (3 << STAMP_SHIFT);
            match t.lookup(&k, h, t1, 0) {
                Lookup::Stale(e) => assert_eq!(e.state, state),
                other => panic!("{state:?}: expected Stale, got {other:?}"),
            }
            assert_eq!(t.lookup(&k, h, t1, 0), Lookup::Miss);
        }
        assert_eq!(t.stats().expired, 4);
        assert!(t.is_empty());
    }

    #[test]
    fn ack_establishes_and_fin_shortens_timeout() {
        let mut t = table(64);
        let k = key(1, PROTO_TCP);
        let h = flow_hash(&k);
        t.insert(entry(k, TcpState::SynSeen), h, 0);
        match t.lookup(&k, h, SEC, ACK) {
            Lookup::Hit(e) => assert_eq!(e.state, TcpState::Established),
            other => panic!("{other:?}"),
        }
        // Established survives 200 s of idleness.
        assert!(is_hit(&t.lookup(&k, h, 201 * SEC, ACK)));
        match t.lookup(&k, h, 202 * SEC, FIN | ACK) {
            Lookup::Hit(e) => assert_eq!(e.state, TcpState::Closing),
            other => panic!("{other:?}"),
        }
        // Now the 5 s fin timeout applies.
        assert!(matches!(
            t.lookup(&k, h, 208 * SEC, ACK),
            Lookup::Stale(FlowEntry {
                state: TcpState::Closing,
                ..
            })
        ));
        assert!(t.consistent());
    }

    #[test]
    fn rst_ends_the_flow_and_hands_it_back() {
        let mut t = table(64);
        let k = key(3, PROTO_TCP);
        let h = flow_hash(&k);
        let mut e = entry(k, TcpState::Established);
        e.auto_slot = 42;
        t.insert(e, h, SEC);
        match t.lookup(&k, h, 2 * SEC, RST | ACK) {
            Lookup::Reset(e) => {
                assert_eq!(e.auto_slot, 42);
                assert_eq!(e.backend, 7);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(t.lookup(&k, h, 2 * SEC, ACK), Lookup::Miss);
        assert_eq!(t.stats().closed, 1);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn syn_on_closing_flow_is_a_new_connection() {
        let mut t = table(64);
        let k = key(4, PROTO_TCP);
        let h = flow_hash(&k);
        t.insert(entry(k, TcpState::Closing), h, SEC);
        assert!(matches!(t.lookup(&k, h, 2 * SEC, SYN), Lookup::Stale(_)));
        // A SYN on an established flow is just a retransmission.
        t.insert(entry(k, TcpState::Established), h, SEC);
        assert!(is_hit(&t.lookup(&k, h, 2 * SEC, SYN)));
    }

    #[test]
    fn udp_ignores_flags() {
        let mut t = table(64);
        let k = key(5, PROTO_UDP);
        let h = flow_hash(&k);
        t.insert(entry(k, TcpState::Udp), h, 0);
        match t.lookup(&k, h, SEC, RST | FIN) {
            Lookup::Hit(e) => assert_eq!(e.state, TcpState::Udp),
            other => panic!("{other:?}"),
        }
    }

    /// Keys that all land in bucket 0 of a one-bucket table.
    #[test]
    fn eviction_picks_the_least_recently_seen() {
        let mut t = table(WAYS);
        assert_eq!(t.buckets(), 1);
        let keys: Vec<FlowKey> = (0..WAYS as u32 + 1).map(|i| key(i, PROTO_TCP)).collect();
        for (i, k) in keys[..WAYS].iter().enumerate() {
            t.insert(
                entry(*k, TcpState::Established),
                flow_hash(k),
                (i as u64 + 1) * SEC,
            );
        }
        // Refresh all but key 3, so key 3 is the oldest.
        for (i, k) in keys[..WAYS].iter().enumerate() {
            if i != 3 {
                assert!(is_hit(&t.lookup(k, flow_hash(k), 20 * SEC, ACK)));
            }
        }
        let k = keys[WAYS];
        let ev = t.insert(entry(k, TcpState::Established), flow_hash(&k), 21 * SEC);
        assert_eq!(ev.map(|e| e.key), Some(keys[3]));
        assert_eq!(t.stats().evicted, 1);
        assert_eq!(t.len(), WAYS);
        assert_eq!(
            t.lookup(&keys[3], flow_hash(&keys[3]), 21 * SEC, 0),
            Lookup::Miss
        );
        assert!(is_hit(&t.lookup(&k, flow_hash(&k), 21 * SEC, 0)));
    }

    #[test]
    fn expired_entries_are_replaced_before_live_ones() {
        let mut t = table(WAYS);
        let keys: Vec<FlowKey> = (0..WAYS as u32 + 1).map(|i| key(i, PROTO_TCP)).collect();
        // Key 5 is a SYN (10 s timeout) seen last of all; the others are
        // established and older but live.
        for (i, k) in keys[..WAYS].iter().enumerate() {
            let st = if i == 5 {
                TcpState::SynSeen
            } else {
                TcpState::Established
            };
            t.insert(
                entry(*k, st),
                flow_hash(k),
                if i == 5 { 50 } else { 1 } * SEC,
            );
        }
        let k = keys[WAYS];
        let out = t.insert(entry(k, TcpState::SynSeen), flow_hash(&k), 100 * SEC);
        assert_eq!(out.map(|e| e.key), Some(keys[5]));
        assert_eq!(t.stats().expired, 1);
        assert_eq!(t.stats().evicted, 0);
    }

    #[test]
    fn sweep_finds_all_expired_over_a_cycle() {
        let mut t = table(4096);
        let n = 3000u32;
        for i in 0..n {
            let k = key(i, if i % 2 == 0 { PROTO_TCP } else { PROTO_UDP });
            let st = if i % 2 == 0 {
                TcpState::SynSeen
            } else {
                TcpState::Udp
            };
            t.insert(entry(k, st), flow_hash(&k), SEC);
        }
        let live = t.len();
        // At 30 s the SYNs (10 s) are expired, the UDP flows (60 s) are not.
        let mut ended = Vec::new();
        let cycle = t.buckets();
        let mut done = 0;
        while done < cycle {
            t.sweep(31 * SEC, 7, |e| ended.push(e));
            done += 7;
        }
        assert!(ended.iter().all(|e| e.state == TcpState::SynSeen));
        let syns_left = (0..n)
            .step_by(2)
            .filter(|&i| {
                let k = key(i, PROTO_TCP);
                t.remove(&k, flow_hash(&k)).is_some()
            })
            .count();
        assert_eq!(syns_left, 0);
        assert_eq!(ended.len() + t.len(), live);
        assert_eq!(t.stats().expired as usize, ended.len());
        // Another cycle well past the UDP timeout empties the table.
        t.sweep(1000 * SEC, cycle, |e| ended.push(e));
        assert!(t.is_empty());
        assert!(t.consistent());
    }

    #[test]
    fn reinsert_updates_without_duplicates() {
        let mut t = table(64);
        let k = key(9, PROTO_TCP);
        let h = flow_hash(&k);
        assert_eq!(t.insert(entry(k, TcpState::SynSeen), h, SEC), None);
        let mut e2 = entry(k, TcpState::Established);
        e2.backend = 99;
        let old = t.insert(e2, h, 2 * SEC).expect("old entry handed back");
        assert_eq!(old.backend, 7);
        assert_eq!(t.len(), 1);
        match t.lookup(&k, h, 3 * SEC, ACK) {
            Lookup::Hit(e) => assert_eq!(e.backend, 99),
            other => panic!("{other:?}"),
        }
        assert_eq!(t.remove(&k, h).map(|e| e.backend), Some(99));
        assert_eq!(t.remove(&k, h), None);
        assert_eq!(t.stats().updated, 1);
        assert_eq!(t.stats().inserted, 1);
    }

    #[test]
    fn hit_allows_backend_change() {
        let mut t = table(64);
        let k = key(11, PROTO_TCP);
        let h = flow_hash(&k);
        t.insert(entry(k, TcpState::Established), h, SEC);
        assert!(is_hit(&t.lookup(&k, h, SEC, ACK)));
        assert!(t.set_backend(&k, h, 3));
        let other = key(12, PROTO_TCP);
        assert!(!t.set_backend(&other, flow_hash(&other), 3));
        assert!(matches!(
            t.lookup(&k, h, SEC, ACK),
            Lookup::Hit(FlowEntry { backend: 3, .. })
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Random inserts, lookups and removes on a small table: the header
        /// stays consistent, the bound holds, a key is never duplicated and
        /// a found flow carries the backend it was last inserted with.
        #[test]
        fn random_operations_keep_invariants(
            ops in proptest::collection::vec((0u8..3, 0u32..200, 0u8..0x20, 0u32..5), 1..400)
        ) {
            let mut t = table(64);
            let mut last_backend = std::collections::HashMap::new();
            let mut now = SEC;
            for (op, k, flags, be) in ops {
                now += SEC / 10;
                let key = key(k, PROTO_TCP);
                let h = flow_hash(&key);
                match op {
                    0 => {
                        let mut e = entry(key, TcpState::Established);
                        e.backend = be;
                        t.insert(e, h, now);
                        last_backend.insert(k, be);
                    }
                    1 => {
                        if let Lookup::Hit(e) = t.lookup(&key, h, now, flags & !tcp_flags::SYN) {
                            proptest::prop_assert_eq!(Some(&e.backend), last_backend.get(&k));
                        }
                    }
                    _ => {
                        t.remove(&key, h);
                    }
                }
                proptest::prop_assert!(t.len() <= t.capacity());
                proptest::prop_assert!(t.consistent());
            }
            for k in 0..200 {
                let key = key(k, PROTO_TCP);
                let h = flow_hash(&key);
                let bk = &t.buckets[t.bucket(h)];
                let n = (0..WAYS)
                    .filter(|&s| bk.header.tags[s] != EMPTY && bk.slots[s].key == key)
                    .count();
                proptest::prop_assert!(n <= 1);
            }
        }
    }

    #[test]
    fn bucket_is_a_header_line_and_one_line_per_slot() {
        assert!(std::mem::size_of::<Header>() <= 64);
        assert_eq!(std::mem::size_of::<Slot>(), 64);
        assert_eq!(std::mem::size_of::<Bucket>(), 512);
        assert_eq!(std::mem::align_of::<Bucket>(), 512);
        assert_eq!(std::mem::offset_of!(Bucket, slots), 64);
        let t = table(1 << 12);
        assert_eq!(t.buckets.as_ptr() as usize % 4096 % 512, 0);
    }

    #[test]
    fn entries_keep_the_fields_the_caller_gave() {
        let mut t = table(64);
        let k = key(21, PROTO_TCP);
        let h = flow_hash(&k);
        let mut e = entry(k, TcpState::SynSeen);
        e.backend = 5;
        e.service = 9;
        e.auto_slot = 77;
        t.insert(e, h, 3 * SEC);
        match t.lookup(&k, h, 4 * SEC, 0) {
            Lookup::Hit(got) => {
                assert_eq!((got.key, got.backend, got.service), (k, 5, 9));
                assert_eq!(
                    (got.auto_slot, got.state, got.last_seen),
                    (77, TcpState::SynSeen, 4 * SEC)
                );
            }
            other => panic!("{other:?}"),
        }
        let out = t.remove(&k, h).expect("present");
        assert_eq!((out.backend, out.service, out.auto_slot), (5, 9, 77));
        // The stored time is coarse: within one stamp unit of the last packet.
        assert!(4 * SEC - out.last_seen < 1 << STAMP_SHIFT);
    }
}
