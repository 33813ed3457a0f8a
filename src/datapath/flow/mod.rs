//! The per-worker connection table.
//!
//! Each worker owns one `FlowTable` and is its only user, so it needs no
//! locks. The table is set-associative with two choices: the low half of a
//! flow's hash picks its *home* bucket of [`WAYS`] slots, the high half its
//! *alternate*, another bucket that takes the flow when home is full. A
//! lookup reads the home bucket, and the alternate only when some flow of
//! that home lives in its alternate (a count in the home bucket), which
//! in a half-full table few buckets have (perf/README.md has the shares).
//! [`FlowTable::prefetch`] hints the home bucket;
//! [`FlowTable::prefetch_alternate`], called a few packets later when the
//! home's line holding that count has arrived, reads the count and hints the
//! alternate where the lookup will read it, or where a SYN's insert will
//! write it, so the second bucket is in cache when it is needed, and the
//! first stage reads nothing but the packet's hash.
//!
//! Bytes per flow are what matter. A worker's table (a million flows or
//! more) is far beyond the TLB's reach, so on 4 KiB pages a packet of an
//! established flow pays a page walk for its bucket, and under a hypervisor
//! that nested walk costs more than the rest of the packet, the more so the
//! larger the table. So slots are as small as the key allows, no bucket
//! straddles a page, and each address family has its own sub-table. A slot
//! does not keep its flow's destination (address, port, protocol): it
//! keeps a 16-bit index into the table's own list of the service addresses
//! it has seen (module `vips`), so the key is the client's address and
//! port plus that index:
//!
//! * IPv4 (the common case): key packed in a `u64`, then last-seen stamp,
//!   backend and state in 8 bytes: 16 bytes a slot, four to a 64-byte
//!   bucket aligned to 64, its four keys and then the rest of its flows on
//!   one cache line, so a packet of an established flow reads one line of
//!   the table. 2^21 flows take 32 MiB.
//! * IPv6: the same with the 128-bit client address: 24-byte keys, four
//!   to a 128-byte bucket aligned to 128. 2^19 flows take 16 MiB.
//!
//! Each slot also has 4 bytes in a side array for its auto-affinity handle
//! (8 MiB for 2^21 IPv4 flows), read only for slots marked as having one,
//! so packets of other flows never touch its pages.
//!
//! A lookup compares the packed key with the bucket's four keys directly,
//! all at once and without a branch (for IPv4, two SSE2 compares): no
//! tags, and no second dependent read. The whole table is written once
//! at construction, so its pages are faulted in before the first packet,
//! on transparent huge pages where the kernel gives them (advised before
//! that first write: a TLB entry then covers 2 MiB of buckets, not 4 KiB).
//!
//! Capacity is fixed at construction, per family (each rounded up to a
//! multiple of [`WAYS`]); after that only the address list can grow, when a
//! new service address is first seen. A new flow goes, in this order, to a
//! free slot of its home; over an entry of its home whose idle timeout has
//! passed; to a free slot of its alternate (whether the alternate has one
//! is a bit in a small bitmap, so a full table does not read a second, cold
//! bucket per new flow); to the slot of one of the home's own flows moved
//! to that flow's alternate, or to the slot of one of the alternate's own
//! flows moved to theirs, either flow moved in turn, when its own
//! alternate is full, into room made there by one more such move (a
//! cuckoo search two moves deep, tried while the family is under 15/16
//! full); and last over the home bucket's least recently seen entry,
//! evicted. So up to three quarters of capacity practically no flow is
//! evicted (the tests bound it), and when the table
//! is full eviction is oldest-first *per home bucket*, as in production
//! load-balancer flow tables (Maglev, Katran): a global LRU would cost a
//! list update per packet. An evicted flow is not lost: its next packet
//! is routed again by affinity and the consistent hash, which normally
//! picks the same backend. A flow in its alternate goes back home at its
//! next packet once home has room. The hash passed with a key must be its
//! [`flow_hash`]: the rare paths that need a stored flow's buckets (a
//! guest leaving, a move) compute it again.
//!
//! Last-seen times are kept in units of 2^20 ns (about 1.05 ms), so idle
//! timeouts are honoured to within about two milliseconds (an entry is
//! judged expired only once it certainly is). Entries whose idle timeout
//! passed are treated as gone by `lookup` and `insert` and are removed by the
//! incremental [`FlowTable::sweep`], which hands each one back so the caller
//! can release what it holds.

use std::time::Duration;

mod vips;

use crate::dpdk::{equal_words, prefetch_ptr, HugeSlice};
use crate::types::{flow_hash, tcp_flags, Family, FlowKey};
use crate::types::{BackendId, MAX_BACKENDS};
use vips::{Vip, Vips};

pub use vips::MAX_VIPS;

/// Slots per bucket, in both families: 64-byte IPv4 buckets (one cache
/// line) and 128-byte IPv6 buckets, sixty-four or thirty-two to a 4 KiB
/// page.
pub const WAYS: usize = 4;
/// Bits of a slot index (the eviction scan packs one beside an age).
const WAY_BITS: u32 = WAYS.trailing_zeros();
const _: () = assert!(WAYS.is_power_of_two());
/// Largest capacity of each family's sub-table (2^28 flows).
pub const MAX_CAPACITY: usize = 1 << 28;

/// Stamps count time in units of 2^20 ns (about 1.05 ms); a `u32` of them
/// wraps after about 52 days, far beyond any idle timeout.
const STAMP_SHIFT: u32 = 20;
/// Bit of a slot's state byte marking it in use (the low two bits are the
/// [`TcpState`]), so that any key, all-zero included, can be stored.
const OCCUPIED: u8 = 0x80;
/// Bit of a slot's state byte marking that the side array holds its
/// auto-affinity handle.
const HAS_AUTO: u8 = 0x40;
/// Bit of a slot's state byte marking a guest: a flow stored in its
/// alternate bucket, not its home.
const GUEST: u8 = 0x20;
/// Bit of a slot's state byte marking a [`TcpState::Closing`] flow that a
/// reset closed (not a FIN): a later packet of its middle shows the reset
/// was not the connection's (a forgery outside the backend's window, which
/// its TCP ignored) and opens it again.
const RESET: u8 = 0x10;
/// Moves of a bucket's own flows to their alternates are tried while fewer
/// than `capacity - capacity / MOVE_LIMIT` flows of the family are stored.
const MOVE_LIMIT: usize = 16;
/// Moves that may be made, beyond the first, to give a moved flow room in
/// its alternate (1: a search two moves deep).
const MOVE_DEPTH: u32 = 1;
/// [`FlowEntry::auto_slot`] of a flow without an auto-affinity handle.
pub const NO_AUTO_SLOT: u32 = u32::MAX;
const CACHE_LINE: usize = 64;

/// Connection state, as far as a one-directional (DSR) observer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TcpState {
    /// SYN seen, no ACK from the client yet; or a flow learned from one
    /// packet of its middle (the flow table did not know it), until a
    /// second confirms it: a spoofed packet takes an entry for the
    /// `syn_timeout` only.
    SynSeen = 0,
    /// The client has acknowledged: the connection is open.
    Established = 1,
    /// The client sent FIN or RST: the connection is closing.
    Closing = 2,
    /// A UDP flow.
    Udp = 3,
}

impl TcpState {
    #[inline]
    fn from_u8(v: u8) -> TcpState {
        match v & 3 {
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
/// stores it in a compact slot (the key packed, the time coarsely). It
/// keeps no service id: the key's destination names the service, for as
/// long as the flow lives, whatever ids later snapshots give out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEntry {
    pub key: FlowKey,
    /// Below [`MAX_BACKENDS`] (a slot keeps 16 bits of it).
    pub backend: BackendId,
    /// Owned by the table: changed by the TCP flags passed to `lookup`.
    pub state: TcpState,
    /// Time of the last packet, in ns; owned by the table, which keeps it
    /// to about a millisecond (entries it hands back carry that time).
    pub last_seen: u64,
    /// Opaque handle for automatic affinity; [`NO_AUTO_SLOT`] = none.
    pub auto_slot: u32,
}

/// A flow the table let go of, to make room ([`FlowTable::insert_absent`])
/// or because it had ended ([`Lookup::Stale`]): what the caller releases of
/// it, not the whole [`FlowEntry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Displaced {
    pub backend: BackendId,
    /// Opaque handle for automatic affinity; [`NO_AUTO_SLOT`] = none.
    pub auto_slot: u32,
    /// Its service address's index ([`FlowTable::destination`]).
    vip: u16,
    /// Its idle timeout had passed. Otherwise it was evicted alive, or
    /// (`Stale`) ended by a new SYN on the tuple of a closing flow.
    pub expired: bool,
}

/// [`FlowTable::insert`] refused a flow: all [`MAX_VIPS`] service-address
/// indices are held by live flows, and this flow's address has none. The
/// caller routes the flow's packets without an entry, as it does an
/// unknown flow's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Untracked;

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
    /// Flows ended by a new SYN reusing the tuple of a flow a FIN closed.
    pub closed: u64,
    /// Flows removed by `remove`.
    pub removed: u64,
    /// Lookups that found a live flow.
    pub hits: u64,
    /// Lookups that found none (stale flows included).
    pub misses: u64,
    /// Inserts refused with [`Untracked`].
    pub untracked: u64,
    /// New flows stored in their alternate bucket (their home was full).
    pub spilled: u64,
    /// Flows moved to their other bucket to make room for a new flow (out
    /// of its full home, or out of its alternate, a move or two deep).
    pub moved: u64,
}

/// A live flow as [`FlowTable::lookup`] found it: what its packet needs
/// (its key is the lookup's, its last-seen time the lookup's `now`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub backend: BackendId,
    /// After the packet's flags.
    pub state: TcpState,
}

/// The outcome of [`FlowTable::lookup`].
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A live flow, refreshed and with the packet's flags applied (a copy:
    /// change its backend with [`FlowTable::set_backend`]).
    Hit(Hit),
    /// The flow had already ended before this packet (its idle timeout
    /// passed, or this is a new SYN on the tuple of a closing flow). It is
    /// removed and what the caller releases of it handed back (its key is
    /// the packet's); the packet is handled as a new flow.
    Stale(Displaced),
    /// No flow with this key.
    Miss,
}

/// The key as one family's slots store it: the client's address and port
/// and the index of the flow's service address in the table's [`Vips`].
/// One implementation of the table ([`Part`]) serves both families through
/// this trait.
trait SlotKey: Copy + Eq + std::fmt::Debug {
    /// A zero-sized type aligned to the bucket's size, so that a bucket
    /// never straddles a page.
    type Align: Copy + std::fmt::Debug;
    /// The key of an empty slot (any key will do: the state byte says
    /// whether a slot is in use).
    const ZERO: Self;
    /// Index of the family's flow count in [`Books::len`].
    const FAMILY: usize;
    fn pack(key: &FlowKey, vip: u16) -> Self;
    /// The service-address index the key holds.
    fn vip(self) -> u16;
    /// The whole 5-tuple, given the address of [`SlotKey::vip`].
    fn unpack(self, vip: Vip) -> FlowKey;
    /// The first slot holding `key` among a bucket's `keys` that is in use
    /// (`used(slot)`). The keys are all compared, into a mask, without a
    /// branch: a search that stopped at the first match would leave its
    /// loop at a data-dependent slot, a branch that the predictor misses
    /// about once per lookup in a half-full table. An emptied slot keeps
    /// its old key, so a match counts only in a slot in use (almost always
    /// the first match).
    #[inline(always)]
    fn find_in(keys: &[Self; WAYS], key: Self, used: impl Fn(usize) -> bool) -> Option<usize> {
        let mut m = 0u32;
        for (s, &k) in keys.iter().enumerate() {
            m |= u32::from(k == key) << s;
        }
        first_in_use(m, 0, used)
    }
}

/// The first slot of `matches` (bit `slot << shift` set for each slot that
/// matched) that is in use.
#[inline(always)]
fn first_in_use(mut matches: u32, shift: u32, used: impl Fn(usize) -> bool) -> Option<usize> {
    while matches != 0 {
        let s = (matches.trailing_zeros() >> shift) as usize % WAYS;
        if used(s) {
            return Some(s);
        }
        matches &= matches - 1;
    }
    None
}

#[derive(Clone, Copy, Debug)]
#[repr(align(64))]
struct Align64;

#[derive(Clone, Copy, Debug)]
#[repr(align(128))]
struct Align128;

/// An IPv4 key in one `u64`: src 32 | sport 16 | service-address index 16,
/// so a slot compare is one word compare. IPv4 addresses are the low 32
/// bits of [`FlowKey`]'s (as `classify::parse` produces them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct V4Key(u64);

impl SlotKey for V4Key {
    type Align = Align64;
    const ZERO: V4Key = V4Key(0);
    const FAMILY: usize = 0;

    #[inline]
    fn pack(k: &FlowKey, vip: u16) -> V4Key {
        debug_assert!(k.src >> 32 == 0, "IPv4 key with bits above 32: {k:?}");
        V4Key(u64::from(k.src as u32) << 32 | u64::from(k.sport) << 16 | u64::from(vip))
    }

    #[inline]
    fn vip(self) -> u16 {
        self.0 as u16
    }

    #[inline]
    fn unpack(self, vip: Vip) -> FlowKey {
        FlowKey {
            src: u128::from((self.0 >> 32) as u32),
            dst: vip.dst,
            sport: (self.0 >> 16) as u16,
            dport: vip.dport,
            proto: vip.proto,
            family: Family::V4,
        }
    }

    /// The four keys, half a cache line, compared at once
    /// ([`equal_words`]).
    #[inline(always)]
    fn find_in(keys: &[V4Key; WAYS], key: V4Key, used: impl Fn(usize) -> bool) -> Option<usize> {
        let words = keys.map(|k| k.0);
        // One bit per match kept (bit 2s of slot s).
        first_in_use(equal_words(&words, key.0) & 0x55, 1, used)
    }
}

/// An IPv6 key: the client address in two words (so the key is aligned to
/// 8, not 16, and the slot stays 32 bytes), its port, the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
struct V6Key {
    src_hi: u64,
    src_lo: u64,
    sport: u16,
    vip: u16,
}

impl SlotKey for V6Key {
    type Align = Align128;
    const FAMILY: usize = 1;
    const ZERO: V6Key = V6Key {
        src_hi: 0,
        src_lo: 0,
        sport: 0,
        vip: 0,
    };

    #[inline]
    fn pack(k: &FlowKey, vip: u16) -> V6Key {
        V6Key {
            src_hi: (k.src >> 64) as u64,
            src_lo: k.src as u64,
            sport: k.sport,
            vip,
        }
    }

    #[inline]
    fn vip(self) -> u16 {
        self.vip
    }

    #[inline]
    fn unpack(self, vip: Vip) -> FlowKey {
        FlowKey {
            src: u128::from(self.src_hi) << 64 | u128::from(self.src_lo),
            dst: vip.dst,
            sport: self.sport,
            dport: vip.dport,
            proto: vip.proto,
            family: Family::V6,
        }
    }
}

// A slot keeps a backend id in 16 bits.
const _: () = assert!(MAX_BACKENDS <= 1 << 16);

/// A slot's flow but for its key: last-seen time, backend and state, 8
/// bytes.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
struct Meta {
    /// Last-seen time in 2^20 ns units.
    stamp: u32,
    backend: u16,
    /// [`OCCUPIED`] | [`HAS_AUTO`] | [`GUEST`] | [`TcpState`]; 0 = empty.
    state: u8,
    /// In slot 0, the bucket's spill count: how many flows whose home it
    /// is live in their alternate. Unused in the other slots.
    spill: u8,
}

impl Meta {
    const EMPTY: Meta = Meta {
        stamp: 0,
        backend: 0,
        state: 0,
        spill: 0,
    };

    #[inline]
    fn used(&self) -> bool {
        self.state & OCCUPIED != 0
    }
}

/// [`WAYS`] slots, aligned to their total size: the keys together, then
/// the rest of each flow (so a lookup compares all four keys at once,
/// and for IPv4 reads one line), slot `s` being `keys[s]` and `metas[s]`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
struct Bucket<K: SlotKey> {
    _align: [K::Align; 0],
    keys: [K; WAYS],
    metas: [Meta; WAYS],
}

impl<K: SlotKey> Bucket<K> {
    const EMPTY: Bucket<K> = Bucket {
        _align: [],
        keys: [K::ZERO; WAYS],
        metas: [Meta::EMPTY; WAYS],
    };

    /// Whether every slot is in use.
    #[inline]
    fn is_full(&self) -> bool {
        self.metas.iter().all(Meta::used)
    }

    /// Writes a flow into slot `s` (the bucket's spill count, in slot 0,
    /// stays).
    #[inline(always)]
    fn set(&mut self, s: usize, key: K, stamp: u32, backend: u16, state: u8) {
        self.keys[s] = key;
        let m = &mut self.metas[s];
        (m.stamp, m.backend, m.state) = (stamp, backend, state);
    }
}

/// What both sub-tables share: the flow count, the service addresses, the
/// timeouts and the counters.
struct Books {
    /// Flows in use per family (IPv4, IPv6).
    len: [usize; 2],
    vips: Vips,
    /// Idle timeout in ns, indexed by `TcpState as usize`.
    timeout_ns: [u64; 4],
    /// The age in stamp units past which a slot in each state has
    /// certainly expired: its timeout in whole units, plus one for the
    /// coarseness of stamps (see [`Books::expired`]).
    expiry_age: [u64; 4],
    /// The least of them: no entry idle for this many stamp units or
    /// fewer has expired, whatever its state.
    soonest_expiry: u64,
    stats: FlowStats,
    /// What a lookup last learned of a flow it missed (or found stale, or
    /// a remove took), for the new flow's insert that follows
    /// ([`FlowTable::insert_absent`]).
    vacant: Option<Vacancy>,
}

/// A flow's place as its lookup left it: the new flow's insert that
/// follows takes its service-address index without comparing the address
/// again and, where the lookup emptied a slot of the flow's home bucket,
/// that slot without searching the bucket.
#[derive(Clone, Copy)]
struct Vacancy {
    /// The flow's hash: an insert of another flow ignores the vacancy.
    hash: u64,
    vip: u16,
    /// The home bucket's slot the lookup emptied (a stale flow's);
    /// [`NO_SLOT`] if none.
    slot: u8,
}

/// [`Vacancy::slot`] when the lookup emptied no slot of the home bucket.
const NO_SLOT: u8 = u8::MAX;

impl Books {
    /// True when `slot` has certainly been idle longer than its state's
    /// timeout (stamps are coarse: up to two stamp units late).
    #[inline]
    fn expired(&self, slot: &Meta, now: u64) -> bool {
        // (age - 1) units of 2^STAMP_SHIFT ns surely passed, and
        // (age - 1) << STAMP_SHIFT > timeout exactly when
        // age > (timeout >> STAMP_SHIFT) + 1.
        let age = u64::from(stamp_of(now).wrapping_sub(slot.stamp));
        age > self.expiry_age[usize::from(slot.state & 3)]
    }

    /// Whether some entry idle for `age` stamp units may have expired.
    #[inline]
    fn may_have_expired(&self, age: u32) -> bool {
        u64::from(age) > self.soonest_expiry
    }
}

/// Where [`Part::room`] puts a new flow.
enum Room {
    /// A free slot: of the home bucket, or of the alternate (`guest`).
    Free { b: usize, s: usize, guest: bool },
    /// Over the flow in slot `s` of the home bucket, which is handed
    /// back: its idle timeout had passed (`expired`), or it is evicted.
    Over { s: usize, expired: bool },
}

#[inline]
fn stamp_of(ns: u64) -> u32 {
    (ns >> STAMP_SHIFT) as u32
}

/// One family's sub-table.
struct Part<K: SlotKey> {
    buckets: HugeSlice<Bucket<K>>,
    /// The auto-affinity handle of each slot (bucket * [`WAYS`] + way),
    /// valid where the slot's state has [`HAS_AUTO`].
    autos: HugeSlice<u32>,
    /// One bit per bucket, set while all its slots are in use: an insert
    /// into a full home asks here whether its alternate has room without
    /// reading it (64 KiB for 2^21 flows).
    full: Box<[u64]>,
}

#[inline]
fn bit(bits: &[u64], b: usize) -> bool {
    bits[b / 64] >> (b % 64) & 1 != 0
}

#[inline]
fn set_bit(bits: &mut [u64], b: usize, on: bool) {
    let m = 1u64 << (b % 64);
    if on {
        bits[b / 64] |= m;
    } else {
        bits[b / 64] &= !m;
    }
}

impl<K: SlotKey> Part<K> {
    /// Buckets of a part for `capacity` flows.
    fn buckets_for(capacity: usize) -> usize {
        capacity.clamp(WAYS, MAX_CAPACITY).div_ceil(WAYS)
    }

    /// Bytes [`Part::new`] maps and allocates for `capacity` flows.
    fn memory(capacity: usize) -> usize {
        let n = Self::buckets_for(capacity);
        HugeSlice::<Bucket<K>>::footprint(n)
            + HugeSlice::<u32>::footprint(n * WAYS)
            + n.div_ceil(64) * 8
    }

    fn new(capacity: usize) -> Part<K> {
        let n = Self::buckets_for(capacity);
        Part {
            buckets: HugeSlice::filled(n, Bucket::EMPTY),
            autos: HugeSlice::filled(n * WAYS, NO_AUTO_SLOT),
            full: vec![0; n.div_ceil(64)].into_boxed_slice(),
        }
    }

    /// The home bucket of `hash`: its low 32 bits scaled to the bucket
    /// count (no division, any count).
    #[inline]
    fn bucket(&self, hash: u64) -> usize {
        (((hash & 0xffff_ffff) * self.buckets.len() as u64) >> 32) as usize
    }

    /// The alternate bucket of `hash`, whose home is `home`: its high 32
    /// bits scaled the same way, the next bucket where that is the home
    /// (none in a table of one bucket).
    #[inline]
    fn alternate(&self, home: usize, hash: u64) -> Option<usize> {
        let n = self.buckets.len();
        if n < 2 {
            return None;
        }
        let a = (((hash >> 32) * n as u64) >> 32) as usize;
        Some(if a != home {
            a
        } else if a + 1 < n {
            a + 1
        } else {
            0
        })
    }

    /// The home of a stored flow, from its hash computed again (the rare
    /// paths that need it: a guest leaving, a move).
    fn home_and_alternate(&self, books: &Books, key: K) -> (usize, Option<usize>) {
        let h = flow_hash(&key.unpack(books.vips.addr(key.vip())));
        let home = self.bucket(h);
        (home, self.alternate(home, h))
    }

    /// Flows of home `b` living in their alternate.
    #[inline]
    fn spill(&self, b: usize) -> u8 {
        self.buckets[b].metas[0].spill
    }

    /// Counts a flow of home `b` into (`up`) or out of its alternate.
    #[inline]
    fn count_spill(&mut self, b: usize, up: bool) {
        let c = &mut self.buckets[b].metas[0].spill;
        *c = if up { *c + 1 } else { *c - 1 };
    }

    #[inline]
    fn prefetch_bucket(&self, b: usize) {
        // Every line of the bucket (aligned to its size): one for IPv4, two
        // for IPv6.
        let bk = (&self.buckets[b] as *const Bucket<K>).cast::<u8>();
        for line in 0..std::mem::size_of::<Bucket<K>>().div_ceil(CACHE_LINE) {
            prefetch_ptr(bk.wrapping_add(line * CACHE_LINE));
        }
    }

    /// Hints the home bucket of `hash`.
    #[inline]
    fn prefetch(&self, hash: u64) {
        self.prefetch_bucket(self.bucket(hash));
    }

    /// Hints the alternate of `hash` where the lookup will read it (some
    /// flow of the home lives in its alternate) or, for a flow about to be
    /// inserted into a sub-table not full (`insert`), where the insert will
    /// write it (home full, alternate not). Reads the home bucket's spill
    /// count: call it once that line has arrived.
    #[inline(always)]
    fn prefetch_alternate(&self, hash: u64, insert: bool) {
        let b = self.bucket(hash);
        let spilled = self.spill(b) != 0;
        if spilled || insert && bit(&self.full, b) {
            if let Some(a) = self.alternate(b, hash) {
                if spilled || !bit(&self.full, a) {
                    self.prefetch_bucket(a);
                }
            }
        }
    }

    /// The slot of bucket `b` holding `key`.
    #[inline(always)]
    fn find(&self, b: usize, key: K) -> Option<usize> {
        let bk = &self.buckets[b];
        K::find_in(&bk.keys, key, |s| bk.metas[s].used())
    }

    /// Where `key`, whose hash is `hash` and home `b`, is stored: in `b`,
    /// or in its alternate, which is read only when some flow of `b` lives
    /// in its own. (A flow is in one bucket at most: its home, or as a
    /// guest in its alternate.)
    #[inline(always)]
    fn find_from(&self, b: usize, hash: u64, key: K) -> Option<(usize, usize)> {
        if let Some(s) = self.find(b, key) {
            return Some((b, s));
        }
        if self.spill(b) == 0 {
            return None;
        }
        self.find_guest(b, hash, key)
    }

    /// [`Part::find_from`] in the alternate: the rare case, kept out of line.
    #[inline(never)]
    fn find_guest(&self, b: usize, hash: u64, key: K) -> Option<(usize, usize)> {
        let a = self.alternate(b, hash)?;
        self.find(a, key).map(|s| (a, s))
    }

    /// Where `flow` (hash `hash`, home `b`) is stored (it cannot be when
    /// its destination has no index).
    #[inline]
    fn locate(
        &self,
        books: &mut Books,
        b: usize,
        hash: u64,
        flow: &FlowKey,
    ) -> Option<(usize, usize)> {
        let vip = books.vips.find(flow)?;
        self.find_from(b, hash, K::pack(flow, vip))
    }

    /// A slot of bucket `b` not in use.
    #[inline]
    fn free(&self, b: usize) -> Option<usize> {
        self.buckets[b].metas.iter().position(|x| !x.used())
    }

    /// The auto-affinity handle of slot `s` of bucket `b`.
    #[inline]
    fn auto_slot(&self, b: usize, s: usize) -> u32 {
        if self.buckets[b].metas[s].state & HAS_AUTO != 0 {
            self.autos[b * WAYS + s]
        } else {
            NO_AUTO_SLOT
        }
    }

    /// The entry in slot `s` of bucket `b`, as the caller sees it.
    #[inline]
    fn entry(&self, books: &Books, b: usize, s: usize) -> FlowEntry {
        let key = self.buckets[b].keys[s];
        self.entry_of(b, s, key.unpack(books.vips.addr(key.vip())))
    }

    /// [`Part::entry`] of a flow whose key the caller has (`key`), not
    /// unpacked again.
    #[inline]
    fn entry_of(&self, b: usize, s: usize, key: FlowKey) -> FlowEntry {
        let slot = &self.buckets[b].metas[s];
        FlowEntry {
            key,
            backend: BackendId::from(slot.backend),
            state: TcpState::from_u8(slot.state),
            last_seen: u64::from(slot.stamp) << STAMP_SHIFT,
            auto_slot: self.auto_slot(b, s),
        }
    }

    /// Writes a flow into the free slot `s` of bucket `b`; a guest (`state`
    /// has [`GUEST`]) is counted in its home's spill count.
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &mut self,
        (b, s): (usize, usize),
        home: usize,
        key: K,
        stamp: u32,
        backend: u16,
        state: u8,
    ) {
        let bk = &mut self.buckets[b];
        debug_assert!(!bk.metas[s].used());
        bk.set(s, key, stamp, backend, state);
        if bk.is_full() {
            set_bit(&mut self.full, b, true);
        }
        if state & GUEST != 0 {
            self.count_spill(home, true);
        }
    }

    /// Moves the flow in slot `s` of bucket `b`, whose home is `home`, to
    /// the free slot `t` of bucket `to`, a guest there or not.
    fn relocate(
        &mut self,
        (b, s): (usize, usize),
        home: usize,
        (to, t): (usize, usize),
        guest: bool,
    ) {
        let (key, slot) = (self.buckets[b].keys[s], self.buckets[b].metas[s]);
        if slot.state & HAS_AUTO != 0 {
            self.autos[to * WAYS + t] = self.autos[b * WAYS + s];
        }
        self.buckets[b].metas[s].state = 0;
        set_bit(&mut self.full, b, false);
        if slot.state & GUEST != 0 {
            self.count_spill(home, false);
        }
        let state = slot.state & !GUEST | if guest { GUEST } else { 0 };
        self.fill((to, t), home, key, slot.stamp, slot.backend, state);
    }

    /// Empties slot `s` of bucket `b`, which holds the flow `key`, handing
    /// its entry back.
    fn take(&mut self, books: &mut Books, b: usize, s: usize, key: FlowKey) -> FlowEntry {
        let e = self.entry_of(b, s, key);
        self.forget(books, b, s, &e);
        self.buckets[b].metas[s].state = 0;
        set_bit(&mut self.full, b, false);
        e
    }

    /// Empties slot `s` of bucket `b`, which holds a flow whose home is
    /// `home`, handing back what the caller releases of it: [`Part::take`]
    /// for the lookup's stale flow, whose key the caller has.
    #[inline(always)]
    fn vacate(
        &mut self,
        books: &mut Books,
        (b, s): (usize, usize),
        home: usize,
        expired: bool,
    ) -> Displaced {
        let auto_slot = self.auto_slot(b, s);
        let bk = &mut self.buckets[b];
        let displaced = Displaced {
            backend: BackendId::from(bk.metas[s].backend),
            auto_slot,
            vip: bk.keys[s].vip(),
            expired,
        };
        bk.metas[s].state = 0;
        books.vips.release(displaced.vip);
        books.len[K::FAMILY] -= 1;
        set_bit(&mut self.full, b, false);
        if b != home {
            self.count_spill(home, false);
        }
        displaced
    }

    /// The books of a flow leaving slot `s` of bucket `b` (its entry `e`):
    /// the family's count, its service-address index, its home's spill
    /// count if it is a guest.
    #[inline]
    fn forget(&mut self, books: &mut Books, b: usize, s: usize, e: &FlowEntry) {
        books.vips.release(self.buckets[b].keys[s].vip());
        books.len[K::FAMILY] -= 1;
        if self.buckets[b].metas[s].state & GUEST != 0 {
            let home = self.bucket(flow_hash(&e.key));
            self.count_spill(home, false);
        }
    }

    #[inline(always)]
    fn lookup(
        &mut self,
        books: &mut Books,
        flow: &FlowKey,
        hash: u64,
        now: u64,
        tcp_flags: u8,
    ) -> Lookup {
        let home = self.bucket(hash);
        let Some(vip) = books.vips.find(flow) else {
            books.stats.misses += 1;
            return Lookup::Miss;
        };
        let Some((mut b, mut s)) = self.find_from(home, hash, K::pack(flow, vip)) else {
            books.vacant = Some(Vacancy {
                hash,
                vip,
                slot: NO_SLOT,
            });
            books.stats.misses += 1;
            return Lookup::Miss;
        };
        // A stale flow's slot, emptied for the new flow of its key.
        let vacancy = Vacancy {
            hash,
            vip,
            slot: if b == home { s as u8 } else { NO_SLOT },
        };
        let slot = &self.buckets[b].metas[s];
        if books.expired(slot, now) {
            books.stats.expired += 1;
            books.stats.misses += 1;
            books.vacant = Some(vacancy);
            return Lookup::Stale(self.vacate(books, (b, s), home, true));
        }
        let old_state = TcpState::from_u8(slot.state);
        let mut state = old_state;
        let mut reset = slot.state & RESET;
        if old_state == TcpState::Closing {
            let syn_only =
                tcp_flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST) == tcp_flags::SYN;
            if syn_only && reset == 0 {
                // A SYN after a FIN reuses the tuple for a new connection;
                // one after a reset keeps the flow's backend until the fin
                // timeout (the reset may have been forged, and the SYN
                // with it).
                books.stats.closed += 1;
                books.stats.misses += 1;
                books.vacant = Some(vacancy);
                return Lookup::Stale(self.vacate(books, (b, s), home, false));
            }
            if tcp_flags & tcp_flags::FIN != 0 {
                reset = 0;
            } else if reset != 0 && !syn_only && tcp_flags & tcp_flags::RST == 0 {
                // The client goes on after the reset: it was not its own.
                (state, reset) = (TcpState::Established, 0);
            }
        } else if old_state != TcpState::Udp {
            if tcp_flags & (tcp_flags::FIN | tcp_flags::RST) != 0 {
                state = TcpState::Closing;
                if tcp_flags & tcp_flags::FIN == 0 {
                    reset = RESET;
                }
            } else if old_state == TcpState::SynSeen && tcp_flags & tcp_flags::ACK != 0 {
                state = TcpState::Established;
            }
        }
        if b != home {
            // A guest goes back home as soon as its home has room (the home
            // bucket is in cache): its later packets read one bucket again.
            if let Some(t) = self.free(home) {
                self.relocate((b, s), home, (home, t), false);
                (b, s) = (home, t);
            }
        }
        let slot = &mut self.buckets[b].metas[s];
        slot.state = slot.state & !(3 | RESET) | state as u8 | reset;
        slot.stamp = stamp_of(now);
        books.stats.hits += 1;
        Lookup::Hit(Hit {
            backend: BackendId::from(slot.backend),
            state,
        })
    }

    /// The backend of a live flow (in its home bucket or, a guest, in its
    /// alternate), changing nothing in the table.
    fn peek(&self, books: &Books, flow: &FlowKey, hash: u64, now: u64) -> Option<BackendId> {
        let home = self.bucket(hash);
        let (b, s) = self.find_from(home, hash, K::pack(flow, books.vips.get(flow)?))?;
        let slot = &self.buckets[b].metas[s];
        (!books.expired(slot, now)).then_some(BackendId::from(slot.backend))
    }

    /// The auto-affinity handle of a stored flow, live or not, changing
    /// nothing (tests: a hit does not hand it out).
    #[cfg(test)]
    fn auto_slot_of(&self, books: &Books, flow: &FlowKey, hash: u64) -> Option<u32> {
        let home = self.bucket(hash);
        let (b, s) = self.find_from(home, hash, K::pack(flow, books.vips.get(flow)?))?;
        Some(self.auto_slot(b, s))
    }

    fn set_backend(
        &mut self,
        books: &mut Books,
        key: &FlowKey,
        hash: u64,
        backend: BackendId,
    ) -> bool {
        let home = self.bucket(hash);
        match self.locate(books, home, hash, key) {
            Some((b, s)) => {
                self.buckets[b].metas[s].backend = backend as u16;
                true
            }
            None => false,
        }
    }

    /// Where a new flow of home bucket `b` (hash `hash`) goes, counted in
    /// the stats here: a free slot of `b`; over a flow of `b` whose idle
    /// timeout has passed; a free slot of the alternate (as a guest there);
    /// a slot of `b`, or of the alternate as a guest, freed by moving one
    /// of that bucket's own flows to its alternate (two moves deep at
    /// most); last, over `b`'s least recently seen flow, evicted.
    #[inline]
    fn room(&mut self, books: &mut Books, b: usize, hash: u64, now: u64) -> Room {
        let now_stamp = stamp_of(now);
        let metas = &self.buckets[b].metas;
        // A full bucket (its bit in cache, set in a full table) is not
        // searched for a free slot.
        if !bit(&self.full, b) {
            if let Some(s) = metas.iter().position(|x| !x.used()) {
                return Room::Free { b, s, guest: false };
            }
        }
        // The least recently seen: the largest age, and of equal ages the
        // first slot, found as the largest of (age, WAYS - 1 - slot) packed
        // in one word (a compare and a move per slot, no branch).
        let mut most = 0u64;
        for (s, x) in metas.iter().enumerate() {
            let age = u64::from(now_stamp.wrapping_sub(x.stamp));
            most = most.max(age << WAY_BITS | (WAYS - 1 - s) as u64);
        }
        let oldest = WAYS - 1 - (most & (WAYS as u64 - 1)) as usize;
        let oldest_age = (most >> WAY_BITS) as u32;
        // The timeouts are read only if the oldest flow may have expired.
        if books.may_have_expired(oldest_age) {
            if let Some(s) = metas.iter().position(|x| books.expired(x, now)) {
                books.stats.expired += 1;
                return Room::Over { s, expired: true };
            }
        }
        // A full sub-table has no room elsewhere either; a spill count
        // saturates no further (a bucket with that many guests out evicts).
        let (len, cap) = (books.len[K::FAMILY], self.capacity());
        if len < cap && self.spill(b) < u8::MAX {
            let moves = len < cap - cap / MOVE_LIMIT;
            if let Some(room) = self.room_elsewhere(books, b, hash, moves) {
                return room;
            }
        }
        books.stats.evicted += 1;
        Room::Over {
            s: oldest,
            expired: false,
        }
    }

    /// The alternate's free slot for a new flow of the full home `b`, or,
    /// when `moves`, a slot of `b`, else of the alternate, freed by
    /// [`Part::move_one_out`]. Without `moves` it reads no bucket whose
    /// full bit is set (a full table's every insert comes here).
    #[inline(never)]
    fn room_elsewhere(
        &mut self,
        books: &mut Books,
        b: usize,
        hash: u64,
        moves: bool,
    ) -> Option<Room> {
        let alternate = self.alternate(b, hash);
        if let Some(a) = alternate.filter(|&a| !bit(&self.full, a)) {
            if let Some(t) = self.free(a) {
                books.stats.spilled += 1;
                return Some(Room::Free {
                    b: a,
                    s: t,
                    guest: true,
                });
            }
        }
        if !moves {
            return None;
        }
        if let Some(s) = self.move_one_out(books, b, MOVE_DEPTH) {
            return Some(Room::Free { b, s, guest: false });
        }
        let a = alternate?;
        let s = self.move_one_out(books, a, MOVE_DEPTH)?;
        books.stats.spilled += 1;
        Some(Room::Free {
            b: a,
            s,
            guest: true,
        })
    }

    /// Frees a slot of the full bucket `b` by moving one of its own flows
    /// (not a guest) to that flow's alternate, where it has room or, up to
    /// `depth` steps further, can be given room the same way: the slot
    /// freed, if any flow could move. A bucket whose spill count is at its
    /// limit moves none out (a move adds one to it).
    fn move_one_out(&mut self, books: &mut Books, b: usize, depth: u32) -> Option<usize> {
        if self.spill(b) == u8::MAX {
            return None;
        }
        // The alternates, all full, of the flows that could not move.
        let mut full = [None; WAYS];
        for (s, alt_full) in full.iter_mut().enumerate() {
            if self.buckets[b].metas[s].state & GUEST != 0 {
                continue;
            }
            let (home, alt) = self.home_and_alternate(books, self.buckets[b].keys[s]);
            debug_assert_eq!(home, b, "a flow at home is in its home bucket");
            let Some(a) = alt else { continue };
            if !bit(&self.full, a) {
                if let Some(t) = self.free(a) {
                    self.relocate((b, s), b, (a, t), true);
                    books.stats.moved += 1;
                    return Some(s);
                }
            }
            *alt_full = Some(a);
        }
        if depth == 0 {
            return None;
        }
        for (s, &a) in full.iter().enumerate() {
            // An alternate two of the flows share is searched once.
            let Some(a) = a.filter(|a| !full[..s].contains(&Some(*a))) else {
                continue;
            };
            if let Some(t) = self.move_one_out(books, a, depth - 1) {
                self.relocate((b, s), b, (a, t), true);
                books.stats.moved += 1;
                return Some(s);
            }
        }
        None
    }

    /// Hands back the flow in slot `s` of bucket `b` and writes another in
    /// its place: the same flow (`same`, which keeps the slot's guest bit)
    /// or a new flow of home `b`. The bucket's occupancy, and so its full
    /// bit, do not change.
    #[allow(clippy::too_many_arguments)]
    fn replace(
        &mut self,
        books: &mut Books,
        (b, s): (usize, usize),
        same: bool,
        key: K,
        stamp: u32,
        backend: u16,
        state: u8,
    ) -> FlowEntry {
        let e = self.entry(books, b, s);
        let guest = self.buckets[b].metas[s].state & GUEST;
        if same {
            books.vips.release(key.vip());
            books.len[K::FAMILY] -= 1;
        } else {
            self.forget(books, b, s, &e);
        }
        let state = state | if same { guest } else { 0 };
        self.buckets[b].set(s, key, stamp, backend, state);
        e
    }

    /// Stores `entry`, over the flow of its key if one is stored.
    fn insert(
        &mut self,
        books: &mut Books,
        entry: FlowEntry,
        hash: u64,
        now: u64,
    ) -> Result<Option<FlowEntry>, Untracked> {
        let Some(vip) = books.vips.intern(&entry.key) else {
            books.stats.untracked += 1;
            return Err(Untracked);
        };
        let key = K::pack(&entry.key, vip);
        let home = self.bucket(hash);
        let auto = entry.auto_slot != NO_AUTO_SLOT;
        debug_assert!((entry.backend as usize) < MAX_BACKENDS);
        let (stamp, backend) = (stamp_of(now), entry.backend as u16);
        let state = OCCUPIED | if auto { HAS_AUTO } else { 0 } | entry.state as u8;
        let (b, s, displaced) = if let Some((b, s)) = self.find_from(home, hash, key) {
            books.stats.updated += 1;
            let old = self.replace(books, (b, s), true, key, stamp, backend, state);
            (b, s, Some(old))
        } else {
            books.stats.inserted += 1;
            match self.room(books, home, hash, now) {
                Room::Free { b, s, guest } => {
                    let state = state | if guest { GUEST } else { 0 };
                    self.fill((b, s), home, key, stamp, backend, state);
                    (b, s, None)
                }
                Room::Over { s, .. } => {
                    let old = self.replace(books, (home, s), false, key, stamp, backend, state);
                    (home, s, Some(old))
                }
            }
        };
        if auto {
            self.autos[b * WAYS + s] = entry.auto_slot;
        }
        books.vips.hold(vip);
        books.len[K::FAMILY] += 1;
        Ok(displaced)
    }

    /// [`Part::insert`] of a flow known to be absent, for the worker's new
    /// connections: the flow's fields come apart (no [`FlowEntry`] built),
    /// and a displaced flow comes back as the little its release needs.
    /// Over a flow of the same service address (the common case) the
    /// address's count and the family's length do not change.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn insert_new(
        &mut self,
        books: &mut Books,
        flow: &FlowKey,
        backend: BackendId,
        state: TcpState,
        auto_slot: u32,
        hash: u64,
        now: u64,
    ) -> Result<Option<Displaced>, Untracked> {
        // The lookup that missed (or the remove) has just found this
        // address's index, unless the address has none yet.
        let vacancy = books.vacant.take().filter(|v| v.hash == hash);
        let vip = match vacancy {
            Some(v) => {
                debug_assert_eq!(books.vips.get(flow), Some(v.vip), "{flow:?}");
                Some(v.vip)
            }
            None => books.vips.intern(flow),
        };
        let Some(vip) = vip else {
            books.stats.untracked += 1;
            return Err(Untracked);
        };
        let key = K::pack(flow, vip);
        let home = self.bucket(hash);
        let auto = auto_slot != NO_AUTO_SLOT;
        debug_assert!((backend as usize) < MAX_BACKENDS);
        debug_assert!(
            self.find_from(home, hash, key).is_none(),
            "{flow:?} is stored"
        );
        let (stamp, backend) = (stamp_of(now), backend as u16);
        let state = OCCUPIED | if auto { HAS_AUTO } else { 0 } | state as u8;
        books.stats.inserted += 1;
        // The slot the lookup emptied, if still empty; the bucket's full
        // bit from what it holds now.
        if let Some(v) = vacancy.filter(|v| v.slot != NO_SLOT) {
            let s = usize::from(v.slot) % WAYS;
            let bk = &mut self.buckets[home];
            if !bk.metas[s].used() {
                bk.set(s, key, stamp, backend, state);
                let full = bk.is_full();
                set_bit(&mut self.full, home, full);
                books.vips.hold(vip);
                books.len[K::FAMILY] += 1;
                if auto {
                    self.autos[home * WAYS + s] = auto_slot;
                }
                return Ok(None);
            }
        }
        let (b, s, displaced) = match self.room(books, home, hash, now) {
            Room::Free { b, s, guest } => {
                let state = state | if guest { GUEST } else { 0 };
                self.fill((b, s), home, key, stamp, backend, state);
                books.vips.hold(vip);
                books.len[K::FAMILY] += 1;
                (b, s, None)
            }
            Room::Over { s, expired } => {
                let (old_key, old) = (self.buckets[home].keys[s], self.buckets[home].metas[s]);
                if old.state & GUEST != 0 {
                    self.guest_leaves(books, old_key);
                }
                let old_vip = old_key.vip();
                if old_vip != vip {
                    books.vips.release(old_vip);
                    books.vips.hold(vip);
                }
                self.buckets[home].set(s, key, stamp, backend, state);
                let displaced = Displaced {
                    backend: BackendId::from(old.backend),
                    vip: old_vip,
                    expired,
                    auto_slot: if old.state & HAS_AUTO != 0 {
                        self.autos[home * WAYS + s]
                    } else {
                        NO_AUTO_SLOT
                    },
                };
                (home, s, Some(displaced))
            }
        };
        if auto {
            self.autos[b * WAYS + s] = auto_slot;
        }
        Ok(displaced)
    }

    /// A guest (a flow living in its alternate) leaves: its home's spill
    /// count goes down. Out of line: the home is found from the flow's
    /// hash, computed again.
    #[inline(never)]
    fn guest_leaves(&mut self, books: &Books, key: K) {
        let (home, _) = self.home_and_alternate(books, key);
        self.count_spill(home, false);
    }

    fn remove(&mut self, books: &mut Books, key: &FlowKey, hash: u64) -> Option<FlowEntry> {
        let home = self.bucket(hash);
        let (b, s) = self.locate(books, home, hash, key)?;
        books.vacant = Some(Vacancy {
            hash,
            vip: self.buckets[b].keys[s].vip(),
            slot: NO_SLOT,
        });
        books.stats.removed += 1;
        Some(self.take(books, b, s, *key))
    }

    /// Removes the timed-out entries of bucket `b`, handing each to `ended`.
    fn sweep_bucket(
        &mut self,
        books: &mut Books,
        b: usize,
        now: u64,
        ended: &mut impl FnMut(FlowEntry),
    ) {
        for s in 0..WAYS {
            let slot = &self.buckets[b].metas[s];
            if slot.used() && books.expired(slot, now) {
                books.stats.expired += 1;
                let key = self.buckets[b].keys[s];
                let key = key.unpack(books.vips.addr(key.vip()));
                ended(self.take(books, b, s, key));
            }
        }
    }

    fn capacity(&self) -> usize {
        self.buckets.len() * WAYS
    }

    #[cfg(test)]
    fn used(&self) -> usize {
        self.buckets
            .iter()
            .map(|bk| bk.metas.iter().filter(|s| s.used()).count())
            .sum()
    }

    /// The bits and counts agree with the slots: each full bit with its
    /// bucket; each flow at home in its home bucket and each guest in its
    /// alternate; each spill count and bit with the guests of its home
    /// (test helper; the table's keys were inserted with their flow hash).
    #[cfg(test)]
    fn consistent(&self, books: &Books) -> bool {
        let n = self.buckets.len();
        let mut spills = vec![0usize; n];
        for b in 0..n {
            let bk = &self.buckets[b];
            if bit(&self.full, b) != bk.is_full() {
                return false;
            }
            for (&key, x) in bk.keys.iter().zip(&bk.metas).filter(|(_, x)| x.used()) {
                let (home, alt) = self.home_and_alternate(books, key);
                if x.state & GUEST == 0 {
                    if home != b {
                        return false;
                    }
                } else {
                    if alt != Some(b) {
                        return false;
                    }
                    spills[home] += 1;
                }
            }
        }
        (0..n).all(|b| usize::from(self.spill(b)) == spills[b])
    }
}

/// The per-worker connection table: an IPv4 and an IPv6 sub-table.
pub struct FlowTable {
    v4: Part<V4Key>,
    v6: Part<V6Key>,
    books: Books,
    /// Next bucket [`FlowTable::sweep`] visits: the IPv4 buckets, then the
    /// IPv6 ones.
    cursor: usize,
}

impl FlowTable {
    /// A table for `capacity` IPv4 flows and `capacity_v6` IPv6 flows, each
    /// rounded up to a multiple of [`WAYS`] (at least [`WAYS`], at most
    /// about [`MAX_CAPACITY`]). All memory is allocated (and written) here.
    pub fn new(capacity: usize, capacity_v6: usize, timeouts: FlowTimeouts) -> FlowTable {
        FlowTable::with_vip_limit(capacity, capacity_v6, timeouts, MAX_VIPS)
    }

    /// A table that hands out at most `vips` service-address indices (tests
    /// reach the limit with it).
    fn with_vip_limit(
        capacity: usize,
        capacity_v6: usize,
        timeouts: FlowTimeouts,
        vips: usize,
    ) -> FlowTable {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let timeout_ns = [
            ns(timeouts.syn),
            ns(timeouts.established),
            ns(timeouts.fin),
            ns(timeouts.udp),
        ];
        let expiry_age = timeout_ns.map(|t| (t >> STAMP_SHIFT) + 1);
        let soonest_expiry = expiry_age.into_iter().min().unwrap_or(1);
        FlowTable {
            v4: Part::new(capacity),
            v6: Part::new(capacity_v6),
            books: Books {
                len: [0, 0],
                vips: Vips::new(vips),
                timeout_ns,
                expiry_age,
                soonest_expiry,
                stats: FlowStats::default(),
                vacant: None,
            },
            cursor: 0,
        }
    }

    /// Bytes [`FlowTable::new`] maps and allocates for these capacities
    /// (its buckets, in whole huge pages once they span one; the rest is a
    /// few KiB).
    pub fn memory(capacity: usize, capacity_v6: usize) -> usize {
        Part::<V4Key>::memory(capacity) + Part::<V6Key>::memory(capacity_v6)
    }

    /// Hints that the home bucket of `key` (whose hash is `hash`) will be
    /// read soon: all its cache lines, so that both a hit and an insert
    /// find them in cache. Called for a whole burst before its lookups.
    #[inline]
    pub fn prefetch(&self, key: &FlowKey, hash: u64) {
        match key.family {
            Family::V4 => self.v4.prefetch(hash),
            Family::V6 => self.v6.prefetch(hash),
        }
    }

    /// The second stage of [`FlowTable::prefetch`], once the home bucket's
    /// lines have arrived (a few packets ahead of the lookup): hints
    /// the flow's alternate bucket where the lookup will read it (some flow
    /// of that home lives in its alternate, which in a half-full table few
    /// homes have: perf/README.md has the shares) or, for a packet likely
    /// to start a flow (`new_flow`: a SYN), where its insert will write it
    /// (home full, alternate not, in a sub-table not full). Otherwise it
    /// costs one read of a line the lookup reads anyway. In a full sub-table a SYN skips it: no
    /// alternate has room, and the flows placed in alternates while the
    /// table filled are soon evicted, so a SYN's lookup rarely reads one.
    /// Always inlined: called for every packet, mostly to return at once.
    #[inline(always)]
    pub fn prefetch_alternate(&self, key: &FlowKey, hash: u64, new_flow: bool) {
        let (f, cap) = match key.family {
            Family::V4 => (0, self.v4.capacity()),
            Family::V6 => (1, self.v6.capacity()),
        };
        let full = self.books.len[f] >= cap;
        if new_flow && full {
            return;
        }
        match key.family {
            Family::V4 => self.v4.prefetch_alternate(hash, new_flow),
            Family::V6 => self.v6.prefetch_alternate(hash, new_flow),
        }
    }

    /// Finds a live flow, refreshes its last-seen time to `now` and applies
    /// the packet's TCP flags: ACK moves SynSeen to Established, FIN or RST
    /// moves to Closing (the shorter `fin` timeout). After a FIN a SYN on
    /// the tuple starts a new connection (Stale). A reset ends nothing at
    /// once: a reset forged by someone who guessed the tuple, which the
    /// backend's TCP ignores (it is outside the window), would otherwise
    /// leave the live connection to be routed anew, and a lost reset's
    /// retransmission still finds its backend. So a SYN on a reset flow's
    /// tuple finds it (Closing, and its backend kept unless the caller
    /// finds that down), and a packet of the connection's middle after the reset
    /// moves it back to Established. UDP flows ignore flags. See [`Lookup`]
    /// for what comes back.
    #[inline]
    pub fn lookup(&mut self, key: &FlowKey, hash: u64, now: u64, tcp_flags: u8) -> Lookup {
        match key.family {
            Family::V4 => self.v4.lookup(&mut self.books, key, hash, now, tcp_flags),
            Family::V6 => self.v6.lookup(&mut self.books, key, hash, now, tcp_flags),
        }
    }

    /// The backend of a live flow (one whose idle timeout has not passed),
    /// without refreshing it, changing its state or counting a lookup: for
    /// packets that belong to a connection but are not its own, such as
    /// ICMP errors about it.
    #[inline(never)]
    pub fn peek(&self, key: &FlowKey, hash: u64, now: u64) -> Option<BackendId> {
        match key.family {
            Family::V4 => self.v4.peek(&self.books, key, hash, now),
            Family::V6 => self.v6.peek(&self.books, key, hash, now),
        }
    }

    /// The auto-affinity handle of a stored flow ([`NO_AUTO_SLOT`] for
    /// none), changing nothing.
    #[cfg(test)]
    pub(crate) fn auto_slot_of(&self, key: &FlowKey, hash: u64) -> Option<u32> {
        match key.family {
            Family::V4 => self.v4.auto_slot_of(&self.books, key, hash),
            Family::V6 => self.v6.auto_slot_of(&self.books, key, hash),
        }
    }

    /// Changes the backend of a live flow; false if the flow is not there.
    pub fn set_backend(&mut self, key: &FlowKey, hash: u64, backend: BackendId) -> bool {
        match key.family {
            Family::V4 => self.v4.set_backend(&mut self.books, key, hash, backend),
            Family::V6 => self.v6.set_backend(&mut self.books, key, hash, backend),
        }
    }

    /// Inserts `entry` (its `last_seen` is set to `now`). An entry with the
    /// same key is replaced. Returns the entry displaced, if any: the old
    /// entry of the same key, an entry of its home bucket whose timeout had
    /// passed, or, when neither its home, its alternate nor a move had room,
    /// the home bucket's least recently seen entry, evicted. The caller
    /// releases what the displaced entry holds. Refused (nothing stored or
    /// displaced) only in the case [`Untracked`] describes.
    pub fn insert(
        &mut self,
        entry: FlowEntry,
        hash: u64,
        now: u64,
    ) -> Result<Option<FlowEntry>, Untracked> {
        // It may give the address index a vacancy holds to another
        // address: no `insert_absent` takes that vacancy after it.
        self.books.vacant = None;
        match entry.key.family {
            Family::V4 => self.v4.insert(&mut self.books, entry, hash, now),
            Family::V6 => self.v6.insert(&mut self.books, entry, hash, now),
        }
    }

    /// [`FlowTable::insert`] for a flow the table does not hold: the
    /// caller's [`FlowTable::lookup`] of its key just answered `Miss` or
    /// `Stale` (or a [`FlowTable::remove`] took it), and nothing changed
    /// the table since. Skips the search for an entry of the same key (a
    /// bucket scan per new flow), so it never returns that entry. Out of
    /// line, as the worker's main line must stay small enough to inline.
    ///
    /// Takes the new flow's fields apart (with `now` as its last-seen
    /// time) and hands back only what the caller releases of the flow it
    /// displaced, if any: an entry of the home bucket whose timeout had
    /// passed or, when neither its home, its alternate nor a move had room,
    /// the home's least recently seen entry, evicted.
    #[allow(clippy::too_many_arguments)]
    #[inline(never)]
    pub fn insert_absent(
        &mut self,
        key: &FlowKey,
        backend: BackendId,
        state: TcpState,
        auto_slot: u32,
        hash: u64,
        now: u64,
    ) -> Result<Option<Displaced>, Untracked> {
        match key.family {
            Family::V4 => {
                self.v4
                    .insert_new(&mut self.books, key, backend, state, auto_slot, hash, now)
            }
            Family::V6 => {
                self.v6
                    .insert_new(&mut self.books, key, backend, state, auto_slot, hash, now)
            }
        }
    }

    /// The destination (address, port, protocol; the client's address
    /// and port zero) of a flow the last insert displaced: valid until the
    /// table's next insert, which may give its address's index to another.
    pub fn destination(&self, d: &Displaced) -> FlowKey {
        let vip = self.books.vips.addr(d.vip);
        FlowKey {
            src: 0,
            dst: vip.dst,
            sport: 0,
            dport: vip.dport,
            proto: vip.proto,
            family: vip.family,
        }
    }

    /// Removes a flow, returning it.
    pub fn remove(&mut self, key: &FlowKey, hash: u64) -> Option<FlowEntry> {
        match key.family {
            Family::V4 => self.v4.remove(&mut self.books, key, hash),
            Family::V6 => self.v6.remove(&mut self.books, key, hash),
        }
    }

    /// Incremental sweep: examines up to `buckets` buckets from an internal
    /// cursor and calls `ended` for each timed-out entry, removing it. A
    /// full cycle ([`FlowTable::buckets`] buckets, both families) visits
    /// every entry once.
    pub fn sweep(&mut self, now: u64, buckets: usize, mut ended: impl FnMut(FlowEntry)) {
        let n4 = self.v4.buckets.len();
        let n = self.buckets();
        for _ in 0..buckets.min(n) {
            let b = self.cursor;
            self.cursor = if b + 1 == n { 0 } else { b + 1 };
            // A family with no flows costs its share of the cycle but no
            // memory traffic (an IPv4-only site never reads its IPv6 table).
            if b < n4 {
                if self.books.len[0] > 0 {
                    self.v4.sweep_bucket(&mut self.books, b, now, &mut ended);
                }
            } else if self.books.len[1] > 0 {
                self.v6
                    .sweep_bucket(&mut self.books, b - n4, now, &mut ended);
            }
        }
    }

    /// Slots in use (timed-out entries not yet swept included).
    pub fn len(&self) -> usize {
        self.books.len[0] + self.books.len[1]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Maximum number of flows (both families).
    pub fn capacity(&self) -> usize {
        self.v4.capacity() + self.v6.capacity()
    }

    /// Number of buckets, both families (a full sweep cycle).
    pub fn buckets(&self) -> usize {
        self.v4.buckets.len() + self.v6.buckets.len()
    }

    pub fn stats(&self) -> FlowStats {
        self.books.stats
    }

    /// The idle timeout of a state.
    pub fn timeout(&self, state: TcpState) -> Duration {
        Duration::from_nanos(self.books.timeout_ns[state as usize])
    }

    /// The occupied slots match `len`, and each sub-table's bits and spill
    /// counts match its slots (test helper).
    #[cfg(test)]
    fn consistent(&self) -> bool {
        self.v4.used() == self.books.len[0]
            && self.v6.used() == self.books.len[1]
            && self.v4.consistent(&self.books)
            && self.v6.consistent(&self.books)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{flow_hash, PROTO_TCP, PROTO_UDP};
    use std::collections::{HashMap, HashSet};
    use tcp_flags::{ACK, FIN, RST, SYN};

    const SEC: u64 = 1_000_000_000;
    const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

    fn key(i: u32, proto: u8) -> FlowKey {
        key_of(Family::V4, i, proto)
    }

    /// Flow `i` of a family towards destination `dest` (0: the one of
    /// [`key_of`]; others differ in address or port).
    fn key_to(family: Family, i: u32, proto: u8, dest: u8) -> FlowKey {
        let k = key_of(family, i, proto);
        FlowKey {
            dst: k.dst + u128::from(dest / 2),
            dport: k.dport + u16::from(dest % 2),
            ..k
        }
    }

    /// Flow `i` of a family: distinct clients towards one service.
    fn key_of(family: Family, i: u32, proto: u8) -> FlowKey {
        let (src, dst) = match family {
            Family::V4 => (0x0a00_0000 | i as u128, 0xc000_0201),
            Family::V6 => (
                0x2001_0db8_0000_0000_0000_0000_0000_0000 | i as u128,
                0x2001_0db8_ffff_0000_0000_0000_0000_0001,
            ),
        };
        FlowKey {
            src,
            dst,
            sport: 1024 + (i % 50_000) as u16,
            dport: 80,
            proto,
            family,
        }
    }

    fn entry(k: FlowKey, state: TcpState) -> FlowEntry {
        FlowEntry {
            key: k,
            backend: 7,
            state,
            last_seen: 0,
            auto_slot: u32::MAX,
        }
    }

    const TIMEOUTS: FlowTimeouts = FlowTimeouts {
        syn: Duration::from_secs(10),
        established: Duration::from_secs(300),
        fin: Duration::from_secs(5),
        udp: Duration::from_secs(60),
    };

    /// A table of `cap` flows per family.
    fn table(cap: usize) -> FlowTable {
        FlowTable::new(cap, cap, TIMEOUTS)
    }

    impl FlowTable {
        /// `insert` of a flow the table must track.
        fn put(&mut self, e: FlowEntry, hash: u64, now: u64) -> Option<FlowEntry> {
            self.insert(e, hash, now).expect("tracked")
        }
    }

    fn is_hit(l: &Lookup) -> bool {
        matches!(l, Lookup::Hit(_))
    }

    /// The estimate the start checks against free memory is what a table
    /// allocates.
    #[test]
    fn memory_is_what_new_allocates() {
        for (c, c6) in [
            (0, 0),
            (1, 1),
            (1001, 100),
            (1 << 16, 1 << 14),
            (100_003, 7),
        ] {
            let t = FlowTable::new(c, c6, TIMEOUTS);
            assert_eq!(
                FlowTable::memory(c, c6),
                t.v4.allocated() + t.v6.allocated()
            );
        }
        // 2^21 IPv4 and 2^19 IPv6 flows, the benchmark's table.
        let mib = FlowTable::memory(1 << 21, 1 << 19) >> 20;
        assert!((32..200).contains(&mib), "{mib} MiB");
    }

    #[test]
    fn capacity_rounds_up_and_bounds_hold() {
        let t = FlowTable::new(1001, 100, TIMEOUTS);
        assert_eq!((t.v4.capacity(), t.v6.capacity()), (1004, 100));
        assert_eq!(t.capacity(), 1104);
        assert_eq!(t.buckets(), 251 + 25);
        assert_eq!(table(0).capacity(), 2 * WAYS);
        for fam in FAMILIES {
            let mut t = table(1000);
            let mut displaced = 0u64;
            for i in 0..10_240 {
                let k = key_of(fam, i, PROTO_TCP);
                if t.put(
                    entry(k, TcpState::Established),
                    flow_hash(&k),
                    SEC + i as u64,
                )
                .is_some()
                {
                    displaced += 1;
                }
                assert!(t.len() <= 1000, "{fam:?}: one family's bound");
            }
            let st = t.stats();
            assert_eq!(st.inserted, 10_240);
            assert_eq!(st.evicted, displaced);
            assert_eq!(t.len() as u64, st.inserted - st.evicted);
            assert!(t.len() > 900, "{fam:?} should be nearly full: {}", t.len());
            assert!(t.consistent());
        }
    }

    /// `peek` finds a live flow's backend and changes nothing: not its
    /// last-seen time (the flow still times out as if never peeked), not
    /// its state, not the lookup counters.
    #[test]
    fn peek_reads_without_refreshing() {
        for fam in FAMILIES {
            let mut t = table(64);
            let k = key_of(fam, 1, PROTO_TCP);
            let h = flow_hash(&k);
            assert_eq!(t.peek(&k, h, SEC), None);
            t.put(entry(k, TcpState::SynSeen), h, SEC);
            let before = t.stats();
            // Peeked just before the SYN timeout, many times.
            for i in 0..5 {
                assert_eq!(t.peek(&k, h, SEC + 9 * SEC + i), Some(7), "{fam:?}");
            }
            assert_eq!(t.stats(), before, "{fam:?}: peek counts nothing");
            // Unrefreshed, the flow is gone once its timeout passed.
            assert_eq!(t.peek(&k, h, SEC + 12 * SEC), None);
            assert!(matches!(
                t.lookup(&k, h, SEC + 12 * SEC, ACK),
                Lookup::Stale(_)
            ));
            // A flow of another destination is not found.
            let other = key_to(fam, 1, PROTO_TCP, 1);
            assert_eq!(t.peek(&other, flow_hash(&other), SEC), None);
        }
    }

    #[test]
    fn keys_round_trip_through_their_packing() {
        let k4 = FlowKey {
            src: 0xffff_fffe,
            dst: 0x8000_0001,
            sport: 0xfedc,
            dport: 0x0102,
            proto: PROTO_UDP,
            family: Family::V4,
        };
        let mut vips = Vips::new(MAX_VIPS);
        let mut round_trip = |k: &FlowKey| match k.family {
            Family::V4 => {
                let i = vips.intern(k).unwrap();
                let p = V4Key::pack(k, i);
                (p.vip() == i).then(|| p.unpack(vips.addr(i)))
            }
            Family::V6 => {
                let i = vips.intern(k).unwrap();
                let p = V6Key::pack(k, i);
                (p.vip() == i).then(|| p.unpack(vips.addr(i)))
            }
        };
        let zero = FlowKey::ZERO;
        let k6 = FlowKey {
            src: u128::MAX - 5,
            dst: 1 << 127,
            family: Family::V6,
            ..k4
        };
        for k in [
            k4,
            zero,
            k6,
            FlowKey {
                src: 1 << 64 | 1,
                ..k6
            },
        ] {
            assert_eq!(round_trip(&k), Some(k));
        }
        // Each field of the client's side and the index land in their own
        // bits.
        let (a, b) = (
            V4Key::pack(&zero, 0),
            V4Key::pack(&FlowKey { src: 1, ..zero }, 0),
        );
        let (c, d) = (
            V4Key::pack(&FlowKey { sport: 1, ..zero }, 0),
            V4Key::pack(&zero, 1),
        );
        for (i, x) in [a, b, c, d].iter().enumerate() {
            for y in &[a, b, c, d][i + 1..] {
                assert_ne!(x, y);
            }
        }
        assert_eq!(V4Key::pack(&k4, 0xabcd).vip(), 0xabcd);
        let hi = FlowKey {
            src: 1 << 64,
            family: Family::V6,
            ..zero
        };
        let lo = FlowKey {
            src: 1,
            family: Family::V6,
            ..zero
        };
        assert_ne!(V6Key::pack(&hi, 0), V6Key::pack(&lo, 0));
    }

    /// The all-zero key is a key like any other, not an empty slot.
    #[test]
    fn all_zero_key_is_stored() {
        let mut t = table(64);
        for fam in FAMILIES {
            let k = FlowKey {
                src: 0,
                dst: 0,
                sport: 0,
                dport: 0,
                proto: 0,
                family: fam,
            };
            let h = flow_hash(&k);
            assert_eq!(t.lookup(&k, h, SEC, 0), Lookup::Miss);
            assert_eq!(t.put(entry(k, TcpState::Udp), h, SEC), None);
            assert!(is_hit(&t.lookup(&k, h, SEC, 0)), "{fam:?}");
        }
        assert_eq!(t.len(), 2);
        assert!(t.consistent());
    }

    #[test]
    fn timeouts_per_state() {
        for fam in FAMILIES {
            let mut t = table(64);
            let cases = [
                (TcpState::SynSeen, PROTO_TCP, 10),
                (TcpState::Established, PROTO_TCP, 300),
                (TcpState::Closing, PROTO_TCP, 5),
                (TcpState::Udp, PROTO_UDP, 60),
            ];
            for (n, &(state, proto, secs)) in cases.iter().enumerate() {
                let k = key_of(fam, n as u32, proto);
                let h = flow_hash(&k);
                let t0 = 100 * SEC;
                t.put(entry(k, state), h, t0);
                // Just inside the timeout: still there (flags 0 keep the state).
                assert!(
                    is_hit(&t.lookup(&k, h, t0 + secs * SEC, 0)),
                    "{fam:?} {state:?}"
                );
                // Past the timeout from the refreshed time (by more than the
                // stamps' two-unit slack): handed back as stale.
                let t1 = t0 + 2 * secs * SEC + (3 << STAMP_SHIFT);
                match t.lookup(&k, h, t1, 0) {
                    Lookup::Stale(d) => assert_eq!((d.backend, d.expired), (7, true)),
                    other => panic!("{fam:?} {state:?}: expected Stale, got {other:?}"),
                }
                assert_eq!(t.lookup(&k, h, t1, 0), Lookup::Miss);
            }
            assert_eq!(t.stats().expired, 4);
            assert!(t.is_empty());
        }
    }

    #[test]
    fn ack_establishes_and_fin_shortens_timeout() {
        for fam in FAMILIES {
            let mut t = table(64);
            let k = key_of(fam, 1, PROTO_TCP);
            let h = flow_hash(&k);
            t.put(entry(k, TcpState::SynSeen), h, 0);
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
                Lookup::Stale(Displaced { expired: true, .. })
            ));
            assert!(t.consistent());
        }
    }

    /// A reset closes the flow as a FIN does, but for a while only: its
    /// later packets find it until the `fin` timeout, and a packet of the
    /// connection's middle after it (the reset was forged, and the backend
    /// ignored it) opens it again, with the established timeout; a SYN on
    /// its tuple keeps its backend.
    #[test]
    fn rst_closes_the_flow_until_the_connection_goes_on() {
        for fam in FAMILIES {
            let mut t = table(64);
            let k = key_of(fam, 3, PROTO_TCP);
            let h = flow_hash(&k);
            let mut e = entry(k, TcpState::Established);
            e.auto_slot = 42;
            t.put(e, h, SEC);
            let hit = |l: Lookup, state| match l {
                Lookup::Hit(e) => e.backend == 7 && e.state == state,
                _ => false,
            };
            let fin = TIMEOUTS.fin.as_nanos() as u64;
            let established = TIMEOUTS.established.as_nanos() as u64;
            assert!(fin < established / 2);
            assert!(hit(t.lookup(&k, h, 2 * SEC, RST | ACK), TcpState::Closing));
            // A SYN (forged with the reset, or the client reusing its
            // tuple): the flow keeps its backend, still closing.
            assert!(hit(t.lookup(&k, h, 2 * SEC, SYN), TcpState::Closing));
            assert!(hit(t.lookup(&k, h, 2 * SEC, RST), TcpState::Closing));
            // The connection goes on: open again, and it outlives the fin
            // timeout.
            assert!(hit(t.lookup(&k, h, 3 * SEC, ACK), TcpState::Established));
            assert!(hit(
                t.lookup(&k, h, 3 * SEC + 2 * fin, ACK),
                TcpState::Established
            ));
            assert_eq!(t.auto_slot_of(&k, h), Some(42));
            assert_eq!(t.stats().closed, 0);
            // A reset after a FIN changes nothing: the ACKs of a closing
            // connection do not open it again.
            let now = 4 * SEC + 2 * fin;
            assert!(hit(t.lookup(&k, h, now, FIN | ACK), TcpState::Closing));
            assert!(hit(t.lookup(&k, h, now, RST), TcpState::Closing));
            assert!(hit(t.lookup(&k, h, now, ACK), TcpState::Closing));
            // Idle past the fin timeout, it is gone, its slot handed back.
            let mut ended = Vec::new();
            t.sweep(now + 2 * fin, t.buckets(), |e| ended.push(e));
            assert_eq!(ended.len(), 1);
            assert_eq!((ended[0].key, ended[0].auto_slot), (k, 42));
            assert_eq!(t.len(), 0);
            // A reset flow that stays quiet ends at the fin timeout.
            t.put(entry(k, TcpState::Established), h, 100 * SEC);
            assert!(hit(t.lookup(&k, h, 100 * SEC, RST), TcpState::Closing));
            assert!(matches!(
                t.lookup(&k, h, 100 * SEC + 2 * fin, ACK),
                Lookup::Stale(Displaced { expired: true, .. })
            ));
            assert!(t.consistent());
        }
    }

    #[test]
    fn syn_on_closing_flow_is_a_new_connection() {
        for fam in FAMILIES {
            let mut t = table(64);
            let k = key_of(fam, 4, PROTO_TCP);
            let h = flow_hash(&k);
            t.put(entry(k, TcpState::Closing), h, SEC);
            assert!(matches!(t.lookup(&k, h, 2 * SEC, SYN), Lookup::Stale(_)));
            // A SYN on an established flow is just a retransmission.
            t.put(entry(k, TcpState::Established), h, SEC);
            assert!(is_hit(&t.lookup(&k, h, 2 * SEC, SYN)));
        }
    }

    #[test]
    fn udp_ignores_flags() {
        for fam in FAMILIES {
            let mut t = table(64);
            let k = key_of(fam, 5, PROTO_UDP);
            let h = flow_hash(&k);
            t.put(entry(k, TcpState::Udp), h, 0);
            match t.lookup(&k, h, SEC, RST | FIN) {
                Lookup::Hit(e) => assert_eq!(e.state, TcpState::Udp),
                other => panic!("{other:?}"),
            }
        }
    }

    /// Keys that all land in the one bucket of their family.
    #[test]
    fn eviction_picks_the_least_recently_seen() {
        for fam in FAMILIES {
            let mut t = table(WAYS);
            assert_eq!(t.buckets(), 2);
            let keys: Vec<FlowKey> = (0..WAYS as u32 + 1)
                .map(|i| key_of(fam, i, PROTO_TCP))
                .collect();
            for (i, k) in keys[..WAYS].iter().enumerate() {
                t.put(
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
            let ev = t.put(entry(k, TcpState::Established), flow_hash(&k), 21 * SEC);
            assert_eq!(ev.map(|e| e.key), Some(keys[3]), "{fam:?}");
            assert_eq!(t.stats().evicted, 1);
            assert_eq!(t.len(), WAYS);
            assert_eq!(
                t.lookup(&keys[3], flow_hash(&keys[3]), 21 * SEC, 0),
                Lookup::Miss
            );
            assert!(is_hit(&t.lookup(&k, flow_hash(&k), 21 * SEC, 0)));
        }
    }

    /// `insert_absent` hands back what a displaced flow's release needs:
    /// its backend, its auto-affinity handle, whether it had expired, and
    /// its destination; the service-address counts stay right whether the
    /// new flow's address is the displaced one's or another.
    #[test]
    fn insert_absent_hands_back_the_displaced_flows_books() {
        for fam in FAMILIES {
            let mut t = table(WAYS);
            let keys: Vec<FlowKey> = (0..WAYS as u32 + 2)
                .map(|i| key_of(fam, i, PROTO_TCP))
                .collect();
            for (i, k) in keys[..WAYS].iter().enumerate() {
                let auto = if i == 3 { 77 } else { NO_AUTO_SLOT };
                let state = if i == 5 {
                    TcpState::SynSeen
                } else {
                    TcpState::Established
                };
                let got = t.insert_absent(k, i as u32, state, auto, flow_hash(k), SEC);
                assert_eq!(got, Ok(None), "{fam:?} {i}");
            }
            // Key 3 (pinned, backend 3) is the oldest; key 5 a SYN whose
            // 10 s timeout passes before the others' 300 s.
            for (i, k) in keys[..WAYS].iter().enumerate() {
                if i != 3 {
                    let flags = if i == 5 { 0 } else { ACK };
                    assert!(is_hit(&t.lookup(k, flow_hash(k), 2 * SEC, flags)));
                }
            }
            let k = keys[WAYS];
            let d = t
                .insert_absent(
                    &k,
                    9,
                    TcpState::SynSeen,
                    NO_AUTO_SLOT,
                    flow_hash(&k),
                    3 * SEC,
                )
                .expect("tracked")
                .expect("displaced");
            assert_eq!(
                (d.backend, d.auto_slot, d.expired),
                (3, 77, false),
                "{fam:?}"
            );
            let dest = t.destination(&d);
            assert_eq!(
                (dest.dst, dest.dport, dest.proto, dest.family),
                (keys[3].dst, keys[3].dport, keys[3].proto, fam)
            );
            assert_eq!(t.stats().evicted, 1);
            // By 20 s the SYN-only flows (key 5, seen last at 2 s, and the
            // new one) are past their 10 s: a flow to another service
            // address takes the place of one of them.
            let other = key_to(fam, WAYS as u32 + 1, PROTO_TCP, 3);
            let d = t
                .insert_absent(
                    &other,
                    4,
                    TcpState::SynSeen,
                    NO_AUTO_SLOT,
                    flow_hash(&other),
                    20 * SEC,
                )
                .expect("tracked")
                .expect("displaced");
            assert!(d.expired, "{fam:?}");
            assert_eq!(t.len(), WAYS);
            assert!(t.consistent(), "{fam:?}");
            let vips = &t.books.vips;
            let held = |k: &FlowKey| vips.users(vips.get(k).expect("indexed"));
            assert_eq!(held(&other), 1);
            assert_eq!(held(&keys[0]), WAYS as u32 - 1);
        }
    }

    /// A one-bucket table whose bucket holds the SYNs of the first `WAYS`
    /// of `WAYS + 1` keys of `fam`, seen at 1 s; and the keys.
    fn full_bucket(fam: Family) -> (FlowTable, Vec<FlowKey>) {
        let mut t = table(WAYS);
        let keys: Vec<FlowKey> = (0..WAYS as u32 + 1)
            .map(|i| key_of(fam, i, PROTO_TCP))
            .collect();
        for k in &keys[..WAYS] {
            let got = t.insert_absent(k, 1, TcpState::SynSeen, NO_AUTO_SLOT, flow_hash(k), SEC);
            assert_eq!(got, Ok(None));
        }
        (t, keys)
    }

    /// A SYN on a flow past its timeout: the new flow of that key takes
    /// the slot the lookup emptied, and the bucket's books (full bit,
    /// length, address counts) are as before; an insert of another key
    /// after such a lookup goes through the bucket search.
    #[test]
    fn a_stale_flows_slot_is_taken_by_its_keys_new_flow() {
        for fam in FAMILIES {
            let (mut t, keys) = full_bucket(fam);
            assert!(t.consistent(), "{fam:?}");
            // Key 2 again at 20 s, past its 10 s SYN timeout: stale, its
            // slot emptied, then filled by its new flow.
            let k = keys[2];
            let h = flow_hash(&k);
            assert!(matches!(t.lookup(&k, h, 20 * SEC, SYN), Lookup::Stale(_)));
            assert_eq!(t.len(), WAYS - 1);
            let got = t.insert_absent(&k, 7, TcpState::SynSeen, 5, h, 20 * SEC);
            assert_eq!(got, Ok(None), "{fam:?}");
            assert_eq!(t.len(), WAYS);
            assert!(t.consistent(), "{fam:?}: the full bit set again");
            match t.lookup(&k, h, 21 * SEC, ACK) {
                Lookup::Hit(e) => {
                    assert_eq!((e.backend, t.auto_slot_of(&k, h)), (7, Some(5)))
                }
                other => panic!("{fam:?}: {other:?}"),
            }
            // Key 3 stale, then a flow of another key inserted: no
            // vacancy of key 3's is used; the bucket gives its emptied slot.
            let k3 = keys[3];
            assert!(matches!(
                t.lookup(&k3, flow_hash(&k3), 40 * SEC, SYN),
                Lookup::Stale(_)
            ));
            let other = keys[WAYS];
            let h = flow_hash(&other);
            assert_eq!(t.lookup(&other, h, 40 * SEC, SYN), Lookup::Miss);
            let got = t.insert_absent(&other, 4, TcpState::SynSeen, NO_AUTO_SLOT, h, 40 * SEC);
            assert!(got.is_ok(), "{fam:?}");
            assert!(t.consistent(), "{fam:?}");
            let vips = &t.books.vips;
            let idx = vips.get(&other).expect("indexed");
            assert_eq!(
                vips.users(idx),
                t.len() as u32,
                "{fam:?}: one address, every flow"
            );
        }
    }

    /// A stale flow's vacancy, then a reset that empties another slot of
    /// the same bucket before the stale key's new flow is inserted: the
    /// bucket is no longer full, and its full bit says so (a stale bit
    /// would let the next insert take the empty slot as an occupied one).
    #[test]
    fn a_vacancy_taken_after_another_slot_emptied_leaves_the_bucket_not_full() {
        for fam in FAMILIES {
            let (mut t, keys) = full_bucket(fam);
            // Key 0 is established at 5 s; key 2 is stale at 20 s.
            let k0 = keys[0];
            assert!(matches!(
                t.lookup(&k0, flow_hash(&k0), 5 * SEC, ACK),
                Lookup::Hit(_)
            ));
            let k = keys[2];
            let h = flow_hash(&k);
            assert!(matches!(t.lookup(&k, h, 20 * SEC, SYN), Lookup::Stale(_)));
            assert!(t.remove(&k0, flow_hash(&k0)).is_some());
            let got = t.insert_absent(&k, 7, TcpState::SynSeen, NO_AUTO_SLOT, h, 20 * SEC);
            assert_eq!(got, Ok(None), "{fam:?}");
            assert_eq!(t.len(), WAYS - 1, "{fam:?}");
            assert!(t.consistent(), "{fam:?}: the bucket is not full");
            // The next flow takes the empty slot: nothing is displaced.
            let other = keys[WAYS];
            let h = flow_hash(&other);
            assert_eq!(t.lookup(&other, h, 21 * SEC, SYN), Lookup::Miss);
            let got = t.insert_absent(&other, 4, TcpState::SynSeen, NO_AUTO_SLOT, h, 21 * SEC);
            assert_eq!(got, Ok(None), "{fam:?}: nothing displaced");
            assert_eq!(t.len(), WAYS, "{fam:?}");
            assert!(t.consistent(), "{fam:?}");
        }
    }

    #[test]
    fn expired_entries_are_replaced_before_live_ones() {
        for fam in FAMILIES {
            let mut t = table(WAYS);
            let keys: Vec<FlowKey> = (0..WAYS as u32 + 1)
                .map(|i| key_of(fam, i, PROTO_TCP))
                .collect();
            // Key 2 is a SYN (10 s timeout) seen last of all; the others are
            // established and older but live.
            for (i, k) in keys[..WAYS].iter().enumerate() {
                let st = if i == 2 {
                    TcpState::SynSeen
                } else {
                    TcpState::Established
                };
                t.put(
                    entry(*k, st),
                    flow_hash(k),
                    if i == 2 { 50 } else { 1 } * SEC,
                );
            }
            let k = keys[WAYS];
            let out = t.put(entry(k, TcpState::SynSeen), flow_hash(&k), 100 * SEC);
            assert_eq!(out.map(|e| e.key), Some(keys[2]), "{fam:?}");
            assert_eq!(t.stats().expired, 1);
            assert_eq!(t.stats().evicted, 0);
        }
    }

    /// A full IPv4 bucket does not evict IPv6 flows and the other way round:
    /// each family has its own capacity.
    #[test]
    fn families_do_not_share_slots() {
        let mut t = table(WAYS);
        let n = WAYS as u32 * 3;
        for i in 0..n {
            let k = key(i, PROTO_TCP);
            t.put(entry(k, TcpState::Established), flow_hash(&k), SEC);
        }
        assert_eq!(t.len(), WAYS);
        for i in 0..WAYS as u32 {
            let k = key_of(Family::V6, i, PROTO_TCP);
            assert_eq!(
                t.put(entry(k, TcpState::Established), flow_hash(&k), SEC),
                None
            );
        }
        assert_eq!(t.len(), 2 * WAYS);
        assert_eq!(t.stats().evicted as u32, n - WAYS as u32);
        assert!(t.consistent());
    }

    #[test]
    fn both_families_mixed() {
        let mut t = FlowTable::new(4096, 4096, TIMEOUTS);
        let n = 600u32;
        // The same numbers in both families: distinct flows.
        for i in 0..n {
            for fam in FAMILIES {
                let k = key_of(fam, i, PROTO_TCP);
                let mut e = entry(k, TcpState::SynSeen);
                e.backend = i * 2 + (fam == Family::V6) as u32;
                e.auto_slot = i;
                assert_eq!(t.put(e, flow_hash(&k), SEC), None);
            }
        }
        assert_eq!(t.len(), 2 * n as usize);
        // A v4 key and a v6 key with the same numbers do not collide even
        // when given the same hash.
        let k4 = key(0, PROTO_UDP);
        let k6 = FlowKey {
            family: Family::V6,
            ..k4
        };
        let h4 = flow_hash(&k4);
        t.put(entry(k4, TcpState::Udp), h4, SEC);
        assert_eq!(t.lookup(&k6, h4, SEC, 0), Lookup::Miss);
        assert_eq!(t.remove(&k4, h4).map(|e| e.key), Some(k4));
        for i in 0..n {
            for fam in FAMILIES {
                let k = key_of(fam, i, PROTO_TCP);
                let h = flow_hash(&k);
                t.prefetch(&k, h);
                t.prefetch_alternate(&k, h, false);
                match t.lookup(&k, h, 2 * SEC, ACK) {
                    Lookup::Hit(e) => {
                        assert_eq!(e.backend, i * 2 + (fam == Family::V6) as u32);
                        assert_eq!(e.state, TcpState::Established);
                        assert_eq!(t.auto_slot_of(&k, h), Some(i));
                    }
                    other => panic!("{fam:?} {i}: {other:?}"),
                }
            }
        }
        // Removing the v4 flows leaves the v6 ones.
        for i in 0..n {
            let k = key(i, PROTO_TCP);
            assert!(t.remove(&k, flow_hash(&k)).is_some());
        }
        assert_eq!(t.len(), n as usize);
        assert_eq!(t.v6.used(), n as usize);
        // A sweep cycle past the timeouts hands back exactly the v6 flows.
        let mut ended = Vec::new();
        t.sweep(1000 * SEC, t.buckets(), |e| ended.push(e));
        assert_eq!(ended.len(), n as usize);
        assert!(ended.iter().all(|e| e.key.family == Family::V6));
        assert!(t.is_empty());
        assert!(t.consistent());
    }

    #[test]
    fn sweep_finds_all_expired_over_a_cycle() {
        let mut t = FlowTable::new(4096, 1024, TIMEOUTS);
        let n = 3000u32;
        for i in 0..n {
            // Every fourth flow is IPv6.
            let fam = if i % 4 == 3 { Family::V6 } else { Family::V4 };
            let k = key_of(fam, i, if i % 2 == 0 { PROTO_TCP } else { PROTO_UDP });
            let st = if i % 2 == 0 {
                TcpState::SynSeen
            } else {
                TcpState::Udp
            };
            t.put(entry(k, st), flow_hash(&k), SEC);
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
        // Another cycle well past the UDP timeout empties the table, both
        // families.
        let udp6 = t.v6.used();
        assert!(udp6 > 600, "{udp6}");
        let before = ended.len();
        t.sweep(1000 * SEC, cycle, |e| ended.push(e));
        let v6 = ended[before..]
            .iter()
            .filter(|e| e.key.family == Family::V6)
            .count();
        assert_eq!(v6, udp6);
        assert!(t.is_empty());
        assert!(t.consistent());
    }

    #[test]
    fn reinsert_updates_without_duplicates() {
        for fam in FAMILIES {
            let mut t = table(64);
            let k = key_of(fam, 9, PROTO_TCP);
            let h = flow_hash(&k);
            assert_eq!(t.put(entry(k, TcpState::SynSeen), h, SEC), None);
            let mut e2 = entry(k, TcpState::Established);
            e2.backend = 99;
            let old = t.put(e2, h, 2 * SEC).expect("old entry handed back");
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
    }

    #[test]
    fn hit_allows_backend_change() {
        for fam in FAMILIES {
            let mut t = table(64);
            let k = key_of(fam, 11, PROTO_TCP);
            let h = flow_hash(&k);
            t.put(entry(k, TcpState::Established), h, SEC);
            assert!(is_hit(&t.lookup(&k, h, SEC, ACK)));
            assert!(t.set_backend(&k, h, 3));
            let other = key_of(fam, 12, PROTO_TCP);
            assert!(!t.set_backend(&other, flow_hash(&other), 3));
            assert!(matches!(
                t.lookup(&k, h, SEC, ACK),
                Lookup::Hit(Hit { backend: 3, .. })
            ));
        }
    }

    /// What the model knows of a flow.
    #[derive(Clone, Copy, Debug)]
    struct Known {
        backend: BackendId,
        auto: u32,
        state: TcpState,
        /// Closing by a reset (not a FIN).
        reset: bool,
        last_seen: u64,
    }

    /// Service-address indices of the model's table: fewer than the
    /// destinations the operations use, so that indices are reused and
    /// inserts refused.
    const VIP_LIMIT: usize = 5;

    /// Stamp units of slack: the table may judge an entry expired up to
    /// this much after its timeout passed, never before.
    const SLACK: u64 = 2 << STAMP_SHIFT;

    fn timeout_ns(state: TcpState) -> u64 {
        let d = match state {
            TcpState::SynSeen => TIMEOUTS.syn,
            TcpState::Established => TIMEOUTS.established,
            TcpState::Closing => TIMEOUTS.fin,
            TcpState::Udp => TIMEOUTS.udp,
        };
        d.as_nanos() as u64
    }

    impl<K: SlotKey> Part<K> {
        /// Bytes this part holds, from its arrays as allocated.
        fn allocated(&self) -> usize {
            HugeSlice::<Bucket<K>>::footprint(self.buckets.len())
                + HugeSlice::<u32>::footprint(self.autos.len())
                + self.full.len() * 8
        }

        /// The flows stored in bucket `b`.
        fn residents(&self, books: &Books, b: usize) -> Vec<FlowKey> {
            (0..WAYS)
                .filter(|&s| self.buckets[b].metas[s].used())
                .map(|s| self.entry(books, b, s).key)
                .collect()
        }

        /// True when a new flow `key` (hash `hash`) could not have gone
        /// anywhere but over a flow of its home: its alternate is full (or
        /// the home's spill count is at its limit) and, when moves were
        /// allowed, neither the home nor the alternate could have had a
        /// slot freed by moves ([`Part::could_free`]).
        fn nowhere_else(&self, books: &Books, hash: u64, key: K, moves_allowed: bool) -> bool {
            let b = self.bucket(hash);
            let alt = self.alternate(b, hash);
            self.spill(b) == u8::MAX
                || alt.is_none_or(|a| bit(&self.full, a))
                    && (!moves_allowed
                        || !self.could_free(books, b, MOVE_DEPTH, key)
                            && alt.is_none_or(|a| !self.could_free(books, a, MOVE_DEPTH, key)))
        }

        /// Whether a slot of the full bucket `b` could be freed by moving
        /// one of its own flows (other than `key`) to that flow's
        /// alternate, which has room or could be given room the same way
        /// within `depth` more moves: the policy of
        /// [`Part::move_one_out`], written plainly.
        fn could_free(&self, books: &Books, b: usize, depth: u32, key: K) -> bool {
            if self.spill(b) == u8::MAX {
                return false;
            }
            let bk = &self.buckets[b];
            bk.keys.iter().zip(&bk.metas).any(|(&k, x)| {
                if !x.used() || x.state & GUEST != 0 || k == key {
                    return false;
                }
                match self.home_and_alternate(books, k).1 {
                    None => false,
                    Some(a) if !bit(&self.full, a) => true,
                    Some(a) => depth > 0 && self.could_free(books, a, depth - 1, key),
                }
            })
        }
    }

    impl FlowTable {
        /// The flows stored in the home bucket of a key whose hash is `h`.
        fn home_residents(&self, k: &FlowKey, h: u64) -> Vec<FlowKey> {
            match k.family {
                Family::V4 => self.v4.residents(&self.books, self.v4.bucket(h)),
                Family::V6 => self.v6.residents(&self.books, self.v6.bucket(h)),
            }
        }

        /// Whether moves are tried for a new flow of `k`'s family now.
        fn moves_allowed(&self, k: &FlowKey) -> bool {
            let (len, cap) = match k.family {
                Family::V4 => (self.books.len[0], self.v4.capacity()),
                Family::V6 => (self.books.len[1], self.v6.capacity()),
            };
            len < cap - cap / MOVE_LIMIT
        }

        /// [`Part::nowhere_else`] for a stored flow `k` whose hash is `h`.
        fn nowhere_else(&mut self, k: &FlowKey, h: u64, moves_allowed: bool) -> bool {
            let vip = self.books.vips.find(k).expect("stored");
            match k.family {
                Family::V4 => {
                    self.v4
                        .nowhere_else(&self.books, h, V4Key::pack(k, vip), moves_allowed)
                }
                Family::V6 => {
                    self.v6
                        .nowhere_else(&self.books, h, V6Key::pack(k, vip), moves_allowed)
                }
            }
        }

        /// The home and alternate buckets of a key.
        fn buckets_of(&self, k: &FlowKey) -> (usize, Option<usize>) {
            let h = flow_hash(k);
            match k.family {
                Family::V4 => (self.v4.bucket(h), self.v4.alternate(self.v4.bucket(h), h)),
                Family::V6 => (self.v6.bucket(h), self.v6.alternate(self.v6.bucket(h), h)),
            }
        }

        /// Flows of `family` numbered from `from` on whose home is `home`
        /// (and, if given, whose alternate is `alt`): `n` of them.
        fn homed(
            &self,
            family: Family,
            from: u32,
            n: usize,
            home: usize,
            alt: Option<usize>,
        ) -> Vec<FlowKey> {
            (from..)
                .map(|i| key_of(family, i, PROTO_TCP))
                .filter(|k| {
                    let (h, a) = self.buckets_of(k);
                    h == home && alt.is_none_or(|x| a == Some(x))
                })
                .take(n)
                .collect()
        }
    }

    /// Time steps: within a stamp unit, around the timeouts (5, 10, 60 and
    /// 300 s) and beyond all of them.
    const STEPS: [u64; 8] = [
        0,
        1 << 19,
        SEC / 10,
        4 * SEC,
        6 * SEC,
        11 * SEC,
        61 * SEC,
        301 * SEC,
    ];

    /// One operation of the model test: (kind, flow number, IPv6, state,
    /// TCP flags, backend, destination).
    type Op = (u8, u32, bool, u8, u8, u32, u8);

    /// Runs `ops` on a two-family table of `capacity` flows per family that
    /// hands out `vip_limit` service-address indices, against a map of what
    /// should be there: a flow present in the model is found with its
    /// backend and state until it is handed back (displaced, stale, reset,
    /// removed or swept), an eviction happens only from the new flow's full
    /// home bucket, when neither its alternate nor a move had room, and
    /// takes the bucket's least recently seen flow, an expiry only once the
    /// timeout certainly passed, and the count, the bound, the full bits and
    /// the spill counts always hold. Kinds 0-3 insert, 4-6 look up, 7
    /// removes, 8 steps the time and sweeps.
    fn run_model(
        ops: Vec<Op>,
        capacity: usize,
        vip_limit: usize,
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        use proptest::{prop_assert, prop_assert_eq};
        let mut t = FlowTable::with_vip_limit(capacity, capacity, TIMEOUTS, vip_limit);
        let mut model: HashMap<FlowKey, Known> = HashMap::new();
        let mut now = SEC;
        for (op, i, v6, st, flags, be, dest) in ops {
            let fam = if v6 { Family::V6 } else { Family::V4 };
            let state = TcpState::from_u8(st);
            let proto = if state == TcpState::Udp {
                PROTO_UDP
            } else {
                PROTO_TCP
            };
            let k = key_to(fam, i, proto, dest);
            let h = flow_hash(&k);
            match op {
                0..=3 => {
                    let mut e = entry(k, state);
                    e.backend = be;
                    e.auto_slot = if be % 2 == 0 { NO_AUTO_SLOT } else { be * 10 };
                    let before = t.stats();
                    // Refused exactly when every index is held by a
                    // live flow and none by a flow to this destination.
                    let held: HashSet<Vip> = model.keys().map(Vip::of).collect();
                    let refuse = !held.contains(&Vip::of(&k)) && held.len() >= vip_limit;
                    let residents = t.home_residents(&k, h);
                    let moves_allowed = t.moves_allowed(&k);
                    let out = match t.insert(e, h, now) {
                        Err(Untracked) => {
                            prop_assert!(refuse, "refused with {} addresses held", held.len());
                            prop_assert_eq!(t.stats().untracked, before.untracked + 1);
                            prop_assert_eq!(t.len(), model.len());
                            continue;
                        }
                        Ok(out) => out,
                    };
                    prop_assert!(
                        !refuse,
                        "stored with all {} indices held elsewhere",
                        vip_limit
                    );
                    if let Some(old) = model.get(&k) {
                        let d = out.expect("same key handed back");
                        prop_assert_eq!(
                            (d.key, d.backend, d.auto_slot),
                            (k, old.backend, old.auto)
                        );
                    } else if let Some(d) = out {
                        let known = model.get(&d.key).copied();
                        prop_assert!(known.is_some(), "displaced unknown {:?}", d.key);
                        let known = known.unwrap();
                        prop_assert_eq!((d.backend, d.auto_slot), (known.backend, known.auto));
                        // Displaced from the new flow's full home bucket
                        // (its own flows and guests alike).
                        prop_assert!(residents.contains(&d.key));
                        prop_assert_eq!(residents.len(), WAYS, "displaced from a full bucket");
                        let same_bucket: Vec<&Known> =
                            residents.iter().map(|x| &model[x]).collect();
                        let idle = now - known.last_seen;
                        if t.stats().evicted > before.evicted {
                            // Nothing in the bucket had certainly expired,
                            // the flow had no room elsewhere, and the
                            // victim was the least recently seen.
                            prop_assert!(t.nowhere_else(&k, h, moves_allowed));
                            prop_assert!(idle <= timeout_ns(known.state) + SLACK);
                            let oldest = same_bucket
                                .iter()
                                .map(|v| stamp_of(v.last_seen))
                                .min()
                                .unwrap();
                            prop_assert_eq!(stamp_of(known.last_seen), oldest);
                        } else {
                            prop_assert_eq!(t.stats().expired, before.expired + 1);
                            prop_assert!(idle > timeout_ns(known.state));
                        }
                        model.remove(&d.key);
                    }
                    model.insert(
                        k,
                        Known {
                            backend: be,
                            auto: e.auto_slot,
                            state,
                            reset: false,
                            last_seen: now,
                        },
                    );
                }
                4..=6 => {
                    let got = t.lookup(&k, h, now, flags);
                    match model.get(&k).copied() {
                        None => prop_assert_eq!(got, Lookup::Miss),
                        Some(known) => {
                            let idle = now - known.last_seen;
                            let timeout = timeout_ns(known.state);
                            if let Lookup::Stale(d) = got {
                                prop_assert_eq!(d.backend, known.backend);
                                let syn_on_closing = known.state == TcpState::Closing
                                    && !known.reset
                                    && flags & (SYN | ACK | RST) == SYN;
                                prop_assert!(idle > timeout || syn_on_closing);
                                prop_assert!(d.expired || syn_on_closing);
                                model.remove(&k);
                            } else {
                                prop_assert!(idle <= timeout + SLACK, "{got:?} after {idle} ns");
                                let (mut next, mut reset) = (known.state, known.reset);
                                let syn_only = flags & (SYN | ACK | RST) == SYN;
                                if known.state != TcpState::Udp {
                                    if flags & FIN != 0 {
                                        (next, reset) = (TcpState::Closing, false);
                                    } else if flags & RST != 0 {
                                        if known.state != TcpState::Closing {
                                            (next, reset) = (TcpState::Closing, true);
                                        }
                                    } else if known.reset && !syn_only {
                                        (next, reset) = (TcpState::Established, false);
                                    } else if known.state == TcpState::SynSeen && flags & ACK != 0 {
                                        next = TcpState::Established;
                                    }
                                }
                                match got {
                                    Lookup::Hit(e) => {
                                        prop_assert_eq!(
                                            (e.backend, e.state),
                                            (known.backend, next)
                                        );
                                        prop_assert_eq!(t.auto_slot_of(&k, h), Some(known.auto));
                                        model.insert(
                                            k,
                                            Known {
                                                state: next,
                                                reset,
                                                last_seen: now,
                                                ..known
                                            },
                                        );
                                    }
                                    other => prop_assert!(false, "present flow: {other:?}"),
                                }
                            }
                        }
                    }
                }
                7 => {
                    let got = t.remove(&k, h);
                    prop_assert_eq!(
                        got.map(|e| (e.key, e.backend)),
                        model.remove(&k).map(|m| (k, m.backend))
                    );
                }
                _ => {
                    now += STEPS[(be as usize + usize::from(flags)) % STEPS.len()];
                    let mut ended = Vec::new();
                    t.sweep(now, usize::from(flags % 4), |e| ended.push(e));
                    for e in ended {
                        let known = model.remove(&e.key);
                        prop_assert!(known.is_some(), "swept unknown {:?}", e.key);
                        let known = known.unwrap();
                        prop_assert_eq!((e.backend, e.auto_slot), (known.backend, known.auto));
                        prop_assert!(now - known.last_seen > timeout_ns(known.state));
                    }
                }
            }
            prop_assert_eq!(t.len(), model.len());
            prop_assert!(t.len() <= t.capacity());
            prop_assert!(t.v4.used() <= t.v4.capacity() && t.v6.used() <= t.v6.capacity());
            prop_assert!(t.consistent());
        }
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// The model test with time steps, and fewer service-address indices
        /// than the operations' destinations, so that indices are reused and
        /// inserts refused.
        #[test]
        fn random_operations_match_a_model(
            ops in proptest::collection::vec(
                (0u8..9, 0u32..48, proptest::bool::ANY, 0u8..4, 0u8..0x20, 0u32..5, 0u8..4),
                1..400,
            )
        ) {
            run_model(ops, 16, VIP_LIMIT)?;
        }

        /// The model test on a crowded table: four buckets per family, no
        /// time steps and every destination indexed, so that buckets fill,
        /// flows spill to their alternates, move and are evicted.
        #[test]
        fn a_crowded_table_matches_the_model(
            ops in proptest::collection::vec(
                (0u8..8, 0u32..48, proptest::bool::ANY, 0u8..4, 0u8..0x20, 0u32..5, 0u8..4),
                1..400,
            )
        ) {
            run_model(ops, 32, MAX_VIPS)?;
        }
    }

    /// Random flows (splitmix64 from a fixed seed): client address and port
    /// random, one of four services.
    fn random_flows(family: Family, n: usize, seed: u64) -> Vec<FlowKey> {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let z = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        (0..n)
            .map(|_| {
                let r = next();
                let src = match family {
                    Family::V4 => u128::from(r as u32),
                    Family::V6 => u128::from(next()) << 64 | u128::from(r),
                };
                FlowKey {
                    src,
                    dst: 0xc000_0201 + u128::from((r >> 48) % 4),
                    sport: (r >> 32) as u16,
                    dport: 443,
                    proto: PROTO_TCP,
                    family,
                }
            })
            .collect()
    }

    /// Fills a sub-table to `fill` of its capacity with random flows and
    /// returns how many were not kept (evicted, or not found afterwards).
    fn lost_at(family: Family, capacity: usize, n: usize, seed: u64) -> (u64, FlowTable) {
        let mut t = match family {
            Family::V4 => FlowTable::new(capacity, WAYS, TIMEOUTS),
            Family::V6 => FlowTable::new(WAYS, capacity, TIMEOUTS),
        };
        let flows = random_flows(family, n, seed);
        for k in &flows {
            t.put(entry(*k, TcpState::Established), flow_hash(k), SEC);
        }
        let missing = flows
            .iter()
            .filter(|k| !is_hit(&t.lookup(k, flow_hash(k), 2 * SEC, ACK)))
            .count() as u64;
        (missing.max(t.stats().evicted), t)
    }

    /// At half of its capacity a table keeps all but fewer than 1 in
    /// 100,000 of its flows: a million random flows in a 2^21-flow table,
    /// and the IPv6 sub-table at the same load.
    #[test]
    fn a_half_full_table_keeps_its_flows() {
        for (family, capacity) in [(Family::V4, 1 << 21), (Family::V6, 1 << 19)] {
            let n = capacity / 2;
            let (lost, t) = lost_at(family, capacity, n, 19);
            assert!(lost * 100_000 < n as u64, "{family:?}: {lost} of {n} lost");
            let st = t.stats();
            assert_eq!(st.inserted, t.len() as u64 + st.evicted);
            // Some flows had to go to their alternate, fewer had to be moved.
            assert!(st.spilled > n as u64 / 1000, "{st:?}");
            assert!(st.moved < st.spilled, "{st:?}");
            assert!(t.consistent());
        }
    }

    /// At three quarters of capacity, too, fewer than 1 flow in 100,000 is
    /// lost: moves two deep, from the home or the alternate, find room
    /// where a shallower search would not.
    #[test]
    fn a_three_quarters_full_table_keeps_nearly_all() {
        let capacity = 1 << 18;
        let n = capacity * 3 / 4;
        let (lost, t) = lost_at(Family::V4, capacity, n, 7);
        assert!(lost * 100_000 < n as u64, "{lost} of {n} lost");
        assert!(t.consistent());
    }

    /// Flows of one home bucket beyond its four live in their alternates,
    /// are found there, go home when room appears, and leave the spill
    /// count right whichever way they end.
    #[test]
    fn guests_are_found_and_go_home() {
        for fam in FAMILIES {
            let mut t = table(1 << 10);
            // Nineteen flows with one home.
            let keys = t.homed(fam, 0, 19, 5, None);
            for (i, k) in keys.iter().enumerate() {
                let out = t.put(
                    entry(*k, TcpState::Established),
                    flow_hash(k),
                    SEC + i as u64,
                );
                assert_eq!(out, None, "{fam:?} {i}");
            }
            assert_eq!(t.len(), 19);
            assert_eq!(t.stats().evicted, 0);
            assert_eq!(
                t.stats().spilled + t.stats().moved,
                19 - WAYS as u64,
                "{:?}",
                t.stats()
            );
            assert!(t.consistent());
            let h0 = flow_hash(&keys[0]);
            let at_home = t.home_residents(&keys[0], h0);
            assert_eq!(at_home.len(), WAYS);
            let spill = match fam {
                Family::V4 => t.v4.spill(5),
                Family::V6 => t.v6.spill(5),
            };
            assert_eq!(usize::from(spill), 19 - WAYS);
            // peek finds guests as well as flows at home.
            for k in &keys {
                assert_eq!(t.peek(k, flow_hash(k), 2 * SEC), Some(7), "{fam:?} {k:?}");
            }
            for k in &keys {
                t.prefetch(k, flow_hash(k));
                t.prefetch_alternate(k, flow_hash(k), true);
                assert!(
                    is_hit(&t.lookup(k, flow_hash(k), 2 * SEC, ACK)),
                    "{fam:?} {k:?}"
                );
            }
            // A flow at home ends: the next lookup of a guest brings it home.
            let gone = at_home[0];
            assert!(t.remove(&gone, flow_hash(&gone)).is_some());
            let guest = *keys.iter().find(|k| !at_home.contains(k)).unwrap();
            assert!(is_hit(&t.lookup(&guest, flow_hash(&guest), 3 * SEC, ACK)));
            assert!(t.home_residents(&guest, flow_hash(&guest)).contains(&guest));
            assert!(t.consistent());
            // Guests ending by a new SYN on a closed flow, removal and
            // expiry keep the books.
            let guests: Vec<FlowKey> = keys
                .iter()
                .filter(|k| **k != gone && !t.home_residents(k, h0).contains(k))
                .copied()
                .collect();
            assert_eq!(guests.len(), 19 - WAYS - 1);
            let g0 = flow_hash(&guests[0]);
            assert!(is_hit(&t.lookup(&guests[0], g0, 3 * SEC, FIN | ACK)));
            assert!(matches!(
                t.lookup(&guests[0], g0, 3 * SEC, SYN),
                Lookup::Stale(_)
            ));
            assert!(t.remove(&guests[1], flow_hash(&guests[1])).is_some());
            assert!(t.consistent());
            let mut ended = 0;
            t.sweep(1000 * SEC, t.buckets(), |_| ended += 1);
            assert_eq!(ended, 19 - 3);
            assert!(t.is_empty());
            assert!(t.consistent());
        }
    }

    /// With the home and the alternate full, a new flow moves one of its
    /// home's own flows to that flow's alternate rather than evict.
    #[test]
    fn a_full_home_makes_room_by_moving() {
        for fam in FAMILIES {
            let mut t = table(1 << 10);
            // Four flows at home; the new flow's alternate, which is none
            // of theirs, filled by its own flows.
            let home = 7;
            let own = t.homed(fam, 0, WAYS, home, None);
            let alts: Vec<Option<usize>> = own.iter().map(|k| t.buckets_of(k).1).collect();
            let alt = (0..)
                .find(|b| *b != home && !alts.contains(&Some(*b)))
                .unwrap();
            for k in &own {
                t.put(entry(*k, TcpState::Established), flow_hash(k), SEC);
            }
            for k in t.homed(fam, 0, WAYS, alt, None) {
                t.put(entry(k, TcpState::Established), flow_hash(&k), SEC);
            }
            let new = t.homed(fam, 0, 1, home, Some(alt));
            let before = t.stats();
            assert_eq!(
                t.put(
                    entry(new[0], TcpState::Established),
                    flow_hash(&new[0]),
                    2 * SEC
                ),
                None
            );
            let st = t.stats();
            assert_eq!(
                (st.moved, st.evicted),
                (before.moved + 1, before.evicted),
                "{fam:?}"
            );
            assert!(t
                .home_residents(&new[0], flow_hash(&new[0]))
                .contains(&new[0]));
            for k in own.iter().chain(&new[..1]) {
                assert!(
                    is_hit(&t.lookup(k, flow_hash(k), 3 * SEC, ACK)),
                    "{fam:?} {k:?}"
                );
            }
            assert!(t.consistent());
        }
    }

    /// Flows of `family` numbered from `from` on whose home is `home` and
    /// whose alternate is none of `not`: `n` of them.
    fn homed_away(
        t: &FlowTable,
        family: Family,
        from: u32,
        n: usize,
        home: usize,
        not: &[usize],
    ) -> Vec<FlowKey> {
        (from..)
            .map(|i| key_of(family, i, PROTO_TCP))
            .filter(|k| {
                let (h, a) = t.buckets_of(k);
                h == home && a.is_some_and(|a| !not.contains(&a))
            })
            .take(n)
            .collect()
    }

    /// With the home full of guests (which never move) and the alternate
    /// full, a new flow moves one of the alternate's own flows to that
    /// flow's alternate and takes its slot, a guest there.
    #[test]
    fn a_full_alternate_makes_room_by_moving() {
        for fam in FAMILIES {
            let mut t = table(1 << 10);
            let (home, other) = (7, 11);
            // `other`'s own flows, then four more of `other` whose
            // alternate is `home`: guests there.
            let mut stored = homed_away(&t, fam, 0, WAYS, other, &[home]);
            stored.extend(t.homed(fam, 0, WAYS, other, Some(home)));
            // The new flow, and its alternate's own flows, whose alternates
            // are none of the buckets above.
            let new = homed_away(&t, fam, 0, 1, home, &[other])[0];
            let alt = t.buckets_of(&new).1.unwrap();
            stored.extend(homed_away(&t, fam, 0, WAYS, alt, &[home, other]));
            for k in &stored {
                assert_eq!(
                    t.put(entry(*k, TcpState::Established), flow_hash(k), SEC),
                    None
                );
            }
            let before = t.stats();
            assert_eq!(before.spilled, WAYS as u64, "{fam:?}: the guests");
            assert_eq!(
                t.put(entry(new, TcpState::Established), flow_hash(&new), 2 * SEC),
                None
            );
            let st = t.stats();
            assert_eq!(
                (st.moved, st.spilled, st.evicted),
                (before.moved + 1, before.spilled + 1, 0),
                "{fam:?}"
            );
            assert!(!t.home_residents(&new, flow_hash(&new)).contains(&new));
            for k in stored.iter().chain([&new]) {
                assert!(
                    is_hit(&t.lookup(k, flow_hash(k), 3 * SEC, ACK)),
                    "{fam:?} {k:?}"
                );
            }
            assert!(t.consistent());
        }
    }

    /// A table whose bucket 7 is full of its own flows, with their
    /// alternates and the alternate of a new flow of bucket 7 full of their
    /// own flows, whose alternates are none of those buckets (so they have
    /// room): the flows stored, the new flow, and the full alternates.
    fn crowded_home(fam: Family) -> (FlowTable, Vec<FlowKey>, FlowKey, Vec<usize>) {
        let mut t = table(1 << 10);
        let home = 7;
        let own = t.homed(fam, 0, WAYS, home, None);
        let mut full: Vec<usize> = own.iter().map(|k| t.buckets_of(k).1.unwrap()).collect();
        let new = homed_away(&t, fam, 0, 1, home, &full)[0];
        full.push(t.buckets_of(&new).1.unwrap());
        full.sort_unstable();
        full.dedup();
        let mut stored = own;
        let mut avoid = full.clone();
        avoid.push(home);
        for &a in &full {
            stored.extend(homed_away(&t, fam, 0, WAYS, a, &avoid));
        }
        for k in &stored {
            assert_eq!(
                t.put(entry(*k, TcpState::Established), flow_hash(k), SEC),
                None
            );
        }
        (t, stored, new, full)
    }

    /// With the home full, its flows' alternates full and the new flow's
    /// alternate full, a flow of one of those alternates moves to its own
    /// alternate, a flow of the home into the slot it left, and the new
    /// flow into the home: two moves, no eviction.
    #[test]
    fn a_full_home_makes_room_two_moves_deep() {
        for fam in FAMILIES {
            let (mut t, stored, new, _) = crowded_home(fam);
            let before = t.stats();
            assert_eq!((before.spilled, before.moved), (0, 0), "{fam:?}");
            assert_eq!(
                t.put(entry(new, TcpState::Established), flow_hash(&new), 2 * SEC),
                None
            );
            let st = t.stats();
            assert_eq!((st.moved, st.evicted), (2, 0), "{fam:?}");
            assert!(t.home_residents(&new, flow_hash(&new)).contains(&new));
            for k in stored.iter().chain([&new]) {
                assert!(
                    is_hit(&t.lookup(k, flow_hash(k), 3 * SEC, ACK)),
                    "{fam:?} {k:?}"
                );
            }
            assert!(t.consistent());
        }
    }

    /// A bucket whose spill count is at its limit moves none of its flows
    /// out (each move would add one to the count): the new flow is
    /// evicting instead of overflowing the count.
    #[test]
    fn a_bucket_with_its_spill_count_at_the_limit_moves_no_flow_out() {
        for fam in FAMILIES {
            let (mut t, _, new, full) = crowded_home(fam);
            // As if each of those alternates had 255 flows out already.
            for &a in &full {
                match fam {
                    Family::V4 => t.v4.buckets[a].metas[0].spill = u8::MAX,
                    Family::V6 => t.v6.buckets[a].metas[0].spill = u8::MAX,
                }
            }
            t.put(entry(new, TcpState::Established), flow_hash(&new), 2 * SEC);
            let st = t.stats();
            assert_eq!((st.moved, st.evicted), (0, 1), "{fam:?}");
        }
    }

    #[test]
    fn a_key_is_found_only_in_a_slot_in_use() {
        let mut t = table(1 << 12);
        let k4 = V4Key(0x0a00_0001_1234_0007);
        let bk = &mut t.v4.buckets[5];
        // An emptied slot keeps its old key; a later one holds the flow.
        bk.keys[0] = k4;
        bk.keys[1] = k4;
        bk.set(3, k4, 0, 1, OCCUPIED);
        assert_eq!(t.v4.find(5, k4), Some(3));
        assert_eq!(t.v4.find(5, V4Key(k4.0 ^ 1 << 40)), None);
        t.v4.buckets[5].metas[3].state = 0;
        assert_eq!(t.v4.find(5, k4), None);
        let k6 = V6Key {
            src_hi: 0x2001_0db8 << 32,
            src_lo: 7,
            sport: 443,
            vip: 2,
        };
        let bk = &mut t.v6.buckets[9];
        bk.keys[1] = k6;
        bk.set(3, k6, 0, 1, OCCUPIED);
        assert_eq!(t.v6.find(9, k6), Some(3));
        assert_eq!(t.v6.find(9, V6Key { sport: 444, ..k6 }), None);
    }

    #[test]
    fn slots_and_buckets_have_the_intended_sizes() {
        use std::mem::{align_of, size_of};
        assert_eq!(size_of::<Meta>(), 8);
        assert_eq!(size_of::<V4Key>(), 8);
        assert_eq!(size_of::<Bucket<V4Key>>(), 64);
        assert_eq!(align_of::<Bucket<V4Key>>(), 64);
        assert_eq!(size_of::<V6Key>(), 24);
        assert_eq!(size_of::<Bucket<V6Key>>(), 128);
        assert_eq!(align_of::<Bucket<V6Key>>(), 128);
        let t = table(1 << 12);
        assert_eq!(t.v4.buckets.as_ptr() as usize % 64, 0);
        assert_eq!(t.v6.buckets.as_ptr() as usize % 128, 0);
    }

    #[test]
    fn entries_keep_the_fields_the_caller_gave() {
        for fam in FAMILIES {
            let mut t = table(64);
            let k = key_of(fam, 21, PROTO_TCP);
            let h = flow_hash(&k);
            let mut e = entry(k, TcpState::SynSeen);
            e.backend = 5;
            e.auto_slot = 77;
            t.put(e, h, 3 * SEC);
            match t.lookup(&k, h, 4 * SEC, 0) {
                Lookup::Hit(got) => {
                    assert_eq!((got.backend, got.state), (5, TcpState::SynSeen));
                    assert_eq!(t.auto_slot_of(&k, h), Some(77));
                }
                other => panic!("{other:?}"),
            }
            let out = t.remove(&k, h).expect("present");
            assert_eq!((out.key, out.backend), (k, 5));
            assert_eq!(out.auto_slot, 77);
            // The stored time is coarse: within one stamp unit of the last packet.
            assert!(4 * SEC - out.last_seen < 1 << STAMP_SHIFT);
        }
    }
}
