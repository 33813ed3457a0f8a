//! Automatic affinity for parallel connections.
//!
//! For a service so configured, while a client has a connection open on a
//! backend its new connections go to the same backend, and the pin may linger
//! after the last one closes. Every worker reads and writes this table (on
//! SYNs and when connections end), and two SYNs of one client may arrive on
//! two workers at once, so it must decide one pin for both without blocking.
//!
//! Layout: buckets of [`SLOTS`] entries, two candidate buckets per client,
//! `2 × capacity` entries in all, allocated once. Each bucket's `SeqLock`
//! version is also its writer lock: a worker takes the (one or two) buckets of
//! a client in index order, so workers contend only on the same buckets and
//! only for a few stores, and read-only callers wait only while a writer is
//! inside the bucket they read. Entries never move, so a connection keeps
//! an [`AutoSlot`] index to release later.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use super::seqlock::SeqLock;
use super::{hash3, random_seed};
use crate::net::{max_prefix, prefix_mask};
use crate::types::Family;
use crate::types::{BackendId, ServiceId};

/// Entries per bucket.
pub const SLOTS: usize = 8;
/// Largest capacity accepted; larger requests are clamped.
pub const MAX_CAPACITY: usize = 1 << 30;

const OCCUPIED: u64 = 1 << 17;

/// A connection's handle on its pin, kept in the worker's flow entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct AutoSlot(pub u32);

impl AutoSlot {
    /// No pin (the connection is not under automatic affinity).
    pub const NONE: AutoSlot = AutoSlot(u32::MAX);

    pub fn is_none(self) -> bool {
        self == AutoSlot::NONE
    }
}

/// Counters of refused operations.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct AutoStats {
    pub capacity: usize,
    /// New clients not pinned because both of their buckets were full.
    pub table_full: u64,
    /// Releases of a slot with no open connection, or of an invalid handle.
    pub bad_release: u64,
}

/// One client's pin. `state` = backend | open connections << 32.
#[derive(Default)]
struct Entry {
    /// service | family << 16 | OCCUPIED; 0 = never used.
    meta: AtomicU64,
    lo: AtomicU64,
    hi: AtomicU64,
    state: AtomicU64,
    /// Monotonic ms until which a pin with no open connection holds.
    linger_until: AtomicU64,
}

impl Entry {
    #[inline]
    fn live(&self, now_ms: u64) -> bool {
        self.meta.load(Ordering::Relaxed) & OCCUPIED != 0
            && (self.state.load(Ordering::Relaxed) >> 32 > 0
                || now_ms < self.linger_until.load(Ordering::Relaxed))
    }

    #[inline]
    fn set(&self, backend: BackendId, open: u32) {
        self.state.store(
            u64::from(backend) | u64::from(open) << 32,
            Ordering::Relaxed,
        );
    }
}

#[repr(C, align(64))]
#[derive(Default)]
struct Bucket {
    seq: SeqLock,
    slots: [Entry; SLOTS],
}

#[repr(align(64))]
#[derive(Default)]
struct Counters {
    table_full: AtomicU64,
    bad_release: AtomicU64,
}

/// The shared table of automatic pins. `Sync`: share one by `Arc`.
pub struct AutoAffinityTable {
    buckets: Box<[Bucket]>,
    mask: u64,
    seed: u64,
    capacity: usize,
    counters: Counters,
}

impl AutoAffinityTable {
    /// Buckets of a table for `capacity` pinned clients (clamped to
    /// [`MAX_CAPACITY`]).
    fn buckets_for(capacity: usize) -> usize {
        (capacity.min(MAX_CAPACITY) * 2)
            .next_power_of_two()
            .max(2 * SLOTS)
            / SLOTS
    }

    /// Bytes [`AutoAffinityTable::new`] allocates for `capacity`.
    pub fn memory(capacity: usize) -> usize {
        Self::buckets_for(capacity) * size_of::<Bucket>()
    }

    /// A table for at least `capacity` pinned clients, allocated here.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.min(MAX_CAPACITY);
        let buckets = Self::buckets_for(capacity);
        AutoAffinityTable {
            buckets: (0..buckets).map(|_| Bucket::default()).collect(),
            mask: buckets as u64 - 1,
            seed: random_seed(),
            capacity,
            counters: Counters::default(),
        }
    }

    #[inline]
    fn position(
        &self,
        service: ServiceId,
        family: Family,
        client: u128,
    ) -> (u64, u64, u64, usize, usize) {
        let client = client & prefix_mask(family, max_prefix(family));
        let fam = match family {
            Family::V4 => 0,
            Family::V6 => 1,
        };
        let meta = u64::from(service) | fam << 16 | OCCUPIED;
        let (lo, hi) = (client as u64, (client >> 64) as u64);
        let h = hash3(self.seed, lo, hi, meta);
        (
            meta,
            lo,
            hi,
            (h & self.mask) as usize,
            ((h >> 32) & self.mask) as usize,
        )
    }

    /// A new connection of `client` on `service`. If the client is pinned
    /// (connections open, or lingering) to a backend that is `alive`, counts
    /// the connection there; if pinned to a dead backend, moves the pin to
    /// `choose()`'s backend keeping the count. Otherwise pins it to `choose()`'s
    /// backend with one connection. `None` (nothing pinned) when `choose()`
    /// gives none or the client's buckets are full.
    ///
    /// `alive` and `choose` run while the client's buckets are held: keep them
    /// short, and never call back into this table from them.
    pub fn acquire(
        &self,
        service: ServiceId,
        family: Family,
        client: u128,
        now_ms: u64,
        alive: impl Fn(BackendId) -> bool,
        choose: impl FnOnce() -> Option<BackendId>,
    ) -> Option<(BackendId, AutoSlot)> {
        let (meta, lo, hi, b1, b2) = self.position(service, family, client);
        // Lock order: lower index first, so two buckets never deadlock.
        let _first = self.buckets[b1.min(b2)].seq.lock();
        let _second = (b1 != b2).then(|| self.buckets[b1.max(b2)].seq.lock());
        let mut free = None;
        for b in [b1, b2] {
            for (i, e) in self.buckets[b].slots.iter().enumerate() {
                if e.meta.load(Ordering::Relaxed) == meta
                    && e.lo.load(Ordering::Relaxed) == lo
                    && e.hi.load(Ordering::Relaxed) == hi
                {
                    let slot = AutoSlot((b * SLOTS + i) as u32);
                    let state = e.state.load(Ordering::Relaxed);
                    let (backend, open) = (state as BackendId, (state >> 32) as u32);
                    if e.live(now_ms) {
                        if alive(backend) {
                            e.set(backend, open.saturating_add(1));
                            return Some((backend, slot));
                        }
                        // The backend went away: the client's other
                        // connections still count toward the new pin.
                        let nb = choose()?;
                        e.set(nb, open.saturating_add(1));
                        return Some((nb, slot));
                    }
                    let nb = choose()?;
                    e.set(nb, 1);
                    e.linger_until.store(0, Ordering::Relaxed);
                    return Some((nb, slot));
                }
                if free.is_none() && !e.live(now_ms) {
                    free = Some((b, i));
                }
            }
            if b1 == b2 {
                break;
            }
        }
        let Some((b, i)) = free else {
            self.counters.table_full.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let nb = choose()?;
        let e = &self.buckets[b].slots[i];
        e.meta.store(meta, Ordering::Relaxed);
        e.lo.store(lo, Ordering::Relaxed);
        e.hi.store(hi, Ordering::Relaxed);
        e.set(nb, 1);
        e.linger_until.store(0, Ordering::Relaxed);
        Some((nb, AutoSlot((b * SLOTS + i) as u32)))
    }

    /// A connection acquired with `slot` ended. At zero open connections the
    /// pin lingers until `now_ms + linger_ms`; after that its entry is free.
    pub fn release(&self, slot: AutoSlot, now_ms: u64, linger_ms: u64) {
        let idx = slot.0 as usize;
        let Some(bucket) = self.buckets.get(idx / SLOTS) else {
            self.counters.bad_release.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let _g = bucket.seq.lock();
        let e = &bucket.slots[idx % SLOTS];
        let state = e.state.load(Ordering::Relaxed);
        let open = (state >> 32) as u32;
        if e.meta.load(Ordering::Relaxed) & OCCUPIED == 0 || open == 0 {
            self.counters.bad_release.fetch_add(1, Ordering::Relaxed);
            return;
        }
        e.set(state as BackendId, open - 1);
        if open == 1 {
            e.linger_until
                .store(now_ms.saturating_add(linger_ms), Ordering::Relaxed);
        }
    }

    /// The client's current pin as (backend, open connections), without
    /// taking any lock.
    pub fn peek(
        &self,
        service: ServiceId,
        family: Family,
        client: u128,
        now_ms: u64,
    ) -> Option<(BackendId, u32)> {
        let (meta, lo, hi, b1, b2) = self.position(service, family, client);
        for b in [b1, b2] {
            let bucket = &self.buckets[b];
            loop {
                let v = bucket.seq.read_begin();
                let found = bucket.slots.iter().find_map(|e| {
                    (e.meta.load(Ordering::Relaxed) == meta
                        && e.lo.load(Ordering::Relaxed) == lo
                        && e.hi.load(Ordering::Relaxed) == hi
                        && e.live(now_ms))
                    .then(|| e.state.load(Ordering::Relaxed))
                });
                if bucket.seq.read_valid(v) {
                    if let Some(state) = found {
                        return Some((state as BackendId, (state >> 32) as u32));
                    }
                    break;
                }
            }
        }
        None
    }

    /// Clients pinned at `now_ms`. Scans the whole table: for statistics,
    /// not the data path.
    pub fn len_active(&self, now_ms: u64) -> usize {
        self.buckets
            .iter()
            .map(|bucket| loop {
                let v = bucket.seq.read_begin();
                let n = bucket.slots.iter().filter(|e| e.live(now_ms)).count();
                if bucket.seq.read_valid(v) {
                    break n;
                }
            })
            .sum()
    }

    pub fn stats(&self) -> AutoStats {
        AutoStats {
            capacity: self.capacity,
            table_full: self.counters.table_full.load(Ordering::Relaxed),
            bad_release: self.counters.bad_release.load(Ordering::Relaxed),
        }
    }
}

impl fmt::Debug for AutoAffinityTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AutoAffinityTable")
            .field("stats", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    const S: ServiceId = 4;

    #[test]
    fn memory_is_what_new_allocates() {
        for c in [0, 1, 100, 65_536, 100_003] {
            let t = AutoAffinityTable::new(c);
            assert_eq!(
                AutoAffinityTable::memory(c),
                t.buckets.len() * size_of::<Bucket>()
            );
        }
    }

    #[test]
    fn pin_count_and_linger() {
        let t = AutoAffinityTable::new(64);
        let c = 0x0a00_0001;
        let (b, s1) = t
            .acquire(S, Family::V4, c, 0, |_| true, || Some(7))
            .unwrap();
        assert_eq!(b, 7);
        // Pinned: choose() is not consulted.
        let (b2, s2) = t
            .acquire(
                S,
                Family::V4,
                c,
                10,
                |_| true,
                || panic!("chose while pinned"),
            )
            .unwrap();
        assert_eq!((b2, s2), (7, s1));
        assert_eq!(t.peek(S, Family::V4, c, 10), Some((7, 2)));
        // Another service or family is another client.
        assert_eq!(t.peek(S + 1, Family::V4, c, 10), None);
        assert_eq!(t.peek(S, Family::V6, c, 10), None);
        t.release(s1, 20, 1_000);
        t.release(s2, 30, 1_000);
        assert_eq!(t.peek(S, Family::V4, c, 30), Some((7, 0)));
        assert_eq!(t.len_active(1_029), 1);
        let (b3, s3) = t
            .acquire(S, Family::V4, c, 1_029, |_| true, || Some(9))
            .unwrap();
        assert_eq!(b3, 7, "lingering pin kept");
        t.release(s3, 1_100, 1_000);
        assert_eq!(t.len_active(2_100), 0);
        assert_eq!(t.peek(S, Family::V4, c, 2_100), None);
        let (b4, s4) = t
            .acquire(S, Family::V4, c, 2_100, |_| true, || Some(9))
            .unwrap();
        assert_eq!((b4, s4), (9, s3), "expired pin re-chosen in place");
        assert_eq!(t.stats().bad_release, 0);
    }

    #[test]
    fn dead_backend_moves_pin() {
        let t = AutoAffinityTable::new(64);
        let c = 1u128 << 100 | 5;
        let (_, s1) = t
            .acquire(S, Family::V6, c, 0, |_| true, || Some(1))
            .unwrap();
        assert_eq!(t.acquire(S, Family::V6, c, 0, |b| b != 1, || None), None);
        let (b, s2) = t
            .acquire(S, Family::V6, c, 0, |b| b != 1, || Some(2))
            .unwrap();
        assert_eq!((b, s2), (2, s1));
        assert_eq!(t.peek(S, Family::V6, c, 0), Some((2, 2)));
        t.release(s1, 0, 0);
        t.release(s2, 0, 0);
        assert_eq!(t.len_active(0), 0);
    }

    #[test]
    fn choose_none_pins_nothing() {
        let t = AutoAffinityTable::new(64);
        assert_eq!(t.acquire(S, Family::V4, 1, 0, |_| true, || None), None);
        assert_eq!(t.len_active(0), 0);
    }

    #[test]
    fn full_and_bad_release_counted() {
        let t = AutoAffinityTable::new(1); // the minimum: 2 buckets
        let mut pinned = 0;
        let mut refused = 0;
        for c in 0..100u128 {
            match t.acquire(S, Family::V4, c, 0, |_| true, || Some(1)) {
                Some(_) => pinned += 1,
                None => refused += 1,
            }
        }
        assert_eq!(pinned, 2 * SLOTS);
        assert_eq!(t.stats().table_full, refused);
        assert_eq!(t.len_active(0), 2 * SLOTS);
        t.release(AutoSlot::NONE, 0, 0);
        t.release(AutoSlot(3), 0, 0);
        t.release(AutoSlot(3), 0, 0);
        assert_eq!(t.stats().bad_release, 2);
        assert_eq!(t.len_active(0), 2 * SLOTS - 1);
    }

    /// Four workers open three connections each for the same clients at the
    /// same time, each proposing its own backend: every client ends up with
    /// one backend and the right count, and releases bring it back to zero.
    #[test]
    fn racing_workers_agree_on_one_pin() {
        const CLIENTS: u32 = 3_000;
        const THREADS: u32 = 4;
        const CONNS: u32 = 3;
        // Room for every client: the test is about races, not a full table
        // (the seed is random per table, so a tight fit would be flaky).
        let t = Arc::new(AutoAffinityTable::new(4 * CLIENTS as usize));
        let barrier = Arc::new(Barrier::new(THREADS as usize));
        let workers: Vec<_> = (0..THREADS)
            .map(|w| {
                let t = t.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut got = Vec::new();
                    for c in 0..CLIENTS {
                        for _ in 0..CONNS {
                            let r = t.acquire(
                                S,
                                Family::V4,
                                u128::from(c),
                                0,
                                |_| true,
                                || Some(100 + w),
                            );
                            got.push((c, r.expect("table has room")));
                        }
                    }
                    got
                })
            })
            .collect();
        let results: Vec<Vec<(u32, (BackendId, AutoSlot))>> =
            workers.into_iter().map(|h| h.join().unwrap()).collect();
        let mut pin = vec![None; CLIENTS as usize];
        for &(c, (b, s)) in results.iter().flatten() {
            let p = pin[c as usize].get_or_insert((b, s));
            assert_eq!(*p, (b, s), "client {c} got two pins");
        }
        for c in 0..CLIENTS {
            let (b, _) = pin[c as usize].unwrap();
            assert_eq!(
                t.peek(S, Family::V4, u128::from(c), 0),
                Some((b, THREADS * CONNS))
            );
        }
        assert_eq!(t.len_active(0), CLIENTS as usize);
        let releasers: Vec<_> = results
            .into_iter()
            .map(|got| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for (_, (_, s)) in got {
                        t.release(s, 5, 0);
                    }
                })
            })
            .collect();
        for h in releasers {
            h.join().unwrap();
        }
        assert_eq!(t.len_active(5), 0);
        let st = t.stats();
        assert_eq!((st.table_full, st.bad_release), (0, 0));
    }
}
