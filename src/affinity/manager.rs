//! The control thread's side of the affinity table.
//!
//! [`AffinityManager`] owns the table's only writer and the authoritative
//! records (owner, expiry, whom to notify). It applies create, extend and
//! cancel with their return codes, removes expired affinities through a timer
//! wheel (no full scans), and reports every ended affinity so the caller can
//! log it and notify the owner. Time is passed in as monotonic milliseconds.

use std::net::SocketAddr;

use hashbrown::HashMap;

use super::key::TableKey;
use super::overlap::OverlapIndex;
use super::table::{AffinityReader, AffinityWriter};
use super::wheel::Wheel;
use super::AffinityError;
use crate::types::{BackendId, EndReason};

/// The control thread's record of one affinity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub owner: BackendId,
    /// Monotonic ms at which it ends; `None` = static, never expires.
    pub expires: Option<u64>,
    /// Where the ended notification goes.
    pub notify: Option<SocketAddr>,
    pub created_ms: u64,
}

impl Record {
    /// Time left at `now_ms` (0 once due); `None` for a static affinity.
    pub fn remaining_ms(&self, now_ms: u64) -> Option<u64> {
        self.expires.map(|e| e.saturating_sub(now_ms))
    }
}

/// An affinity that ended, for the log and the owner's notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ended {
    pub key: TableKey,
    pub owner: BackendId,
    pub notify: Option<SocketAddr>,
    pub reason: EndReason,
    /// When it was created (ms), for lifetime statistics.
    pub created_ms: u64,
}

/// A granted create or extend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granted {
    /// The duration now in force; `None` for a static affinity.
    pub remaining_ms: Option<u64>,
}

struct Entry {
    rec: Record,
    /// Timer id, also the index into `AffinityManager::keys`.
    id: u32,
}

/// Owner of the affinity table's writer: records, rules and expiry.
pub struct AffinityManager {
    writer: AffinityWriter,
    index: HashMap<TableKey, Entry>,
    /// Key of each timer id, so a fired timer finds its record.
    keys: Vec<TableKey>,
    free_ids: Vec<u32>,
    wheel: Wheel,
    /// Scratch for timers fired by one `expire` call.
    due: Vec<u32>,
    /// Every record's network, for the overlap rule.
    overlap: OverlapIndex,
    /// Requested (timed) affinities per owner, for the per-backend quota.
    requested: HashMap<BackendId, usize>,
    /// Changes to the records so far (see [`AffinityManager::changes`]).
    changes: u64,
}

impl AffinityManager {
    pub fn new(writer: AffinityWriter) -> Self {
        AffinityManager {
            writer,
            index: HashMap::new(),
            keys: Vec::new(),
            free_ids: Vec::new(),
            wheel: Wheel::new(),
            due: Vec::new(),
            overlap: OverlapIndex::default(),
            requested: HashMap::new(),
            changes: 0,
        }
    }

    /// How many times the records have changed (created, refreshed,
    /// extended, ended): a writer of the records elsewhere compares it with
    /// the count it last wrote.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Installs an affinity read back from saved state: as
    /// [`create`](Self::create) with `duration_ms` left, then dated
    /// `created_ms` (monotonic, earlier than `now_ms`), so its lifetime
    /// counts from its first creation.
    pub fn restore(
        &mut self,
        key: TableKey,
        owner: BackendId,
        duration_ms: u64,
        notify: Option<SocketAddr>,
        created_ms: u64,
        now_ms: u64,
    ) -> Result<Granted, AffinityError> {
        let fresh = !self.index.contains_key(&key);
        let granted = self.create(key, owner, Some(duration_ms), notify, now_ms)?;
        if fresh {
            if let Some(e) = self.index.get_mut(&key) {
                e.rec.created_ms = created_ms.min(now_ms);
            }
        }
        Ok(granted)
    }

    /// Requested (timed) affinities `owner` holds; static ones do not count.
    pub fn requested_by(&self, owner: BackendId) -> usize {
        self.requested.get(&owner).copied().unwrap_or(0)
    }

    /// The owner, other than `owner`, of an affinity sharing a client with
    /// `key` (its network inside `key`'s or around it, ports overlapping).
    pub fn overlapping_owner(&self, key: &TableKey, owner: BackendId) -> Option<BackendId> {
        self.overlap.other_owner(key, owner)
    }

    /// Like [`overlapping_owner`](Self::overlapping_owner), with the other
    /// backend's key.
    pub fn overlapping(&self, key: &TableKey, owner: BackendId) -> Option<(TableKey, BackendId)> {
        self.overlap.other(key, owner)
    }

    fn count(&mut self, owner: BackendId, timed: bool, up: bool) {
        if !timed {
            return;
        }
        let n = self.requested.entry(owner).or_insert(0);
        if up {
            *n += 1;
        } else {
            *n -= 1;
            if *n == 0 {
                self.requested.remove(&owner);
            }
        }
    }

    /// Creates an affinity, or refreshes it when `owner` already holds an
    /// equal key (new expiry, and new notify address if one is given).
    /// `duration_ms: None` makes a static affinity; a static one asked for
    /// again with a duration stays static. An equal key held by another
    /// backend is refused with its owner ([`AffinityError::Conflict`]), a
    /// zero duration as invalid, a new key without room as
    /// [`AffinityError::TableFull`].
    pub fn create(
        &mut self,
        key: TableKey,
        owner: BackendId,
        duration_ms: Option<u64>,
        notify: Option<SocketAddr>,
        now_ms: u64,
    ) -> Result<Granted, AffinityError> {
        if duration_ms == Some(0) {
            return Err(AffinityError::Invalid("zero duration"));
        }
        let expires = duration_ms.map(|d| now_ms.saturating_add(d));
        if let Some(e) = self.index.get_mut(&key) {
            if e.rec.owner != owner {
                return Err(AffinityError::Conflict { owner: e.rec.owner });
            }
            self.changes += 1;
            if e.rec.expires.is_none() {
                // A static affinity (from the configuration) stays static.
                if notify.is_some() {
                    e.rec.notify = notify;
                }
                return Ok(Granted { remaining_ms: None });
            }
            e.rec.expires = expires;
            if notify.is_some() {
                e.rec.notify = notify;
            }
            let id = e.id;
            if expires.is_none() {
                // A requested affinity the configuration now holds: static
                // from here on, in the table too (its slot is rewritten),
                // and no longer one of the owner's requested ones.
                self.writer.insert_static(key, owner)?;
                self.count(owner, true, false);
            }
            self.reschedule(id, expires, now_ms);
            return Ok(Granted {
                remaining_ms: duration_ms,
            });
        }
        if expires.is_none() {
            self.writer.insert_static(key, owner)?;
        } else {
            self.writer.insert(key, owner)?;
        }
        let id = match self.free_ids.pop() {
            Some(id) => {
                self.keys[id as usize] = key;
                id
            }
            None => {
                self.keys.push(key);
                (self.keys.len() - 1) as u32
            }
        };
        self.index.insert(
            key,
            Entry {
                rec: Record {
                    owner,
                    expires,
                    notify,
                    created_ms: now_ms,
                },
                id,
            },
        );
        if let Some(at) = expires {
            self.wheel.insert(id, at, now_ms);
        }
        self.overlap.insert(&key, owner);
        self.count(owner, expires.is_some(), true);
        self.changes += 1;
        Ok(Granted {
            remaining_ms: duration_ms,
        })
    }

    /// Gives an affinity of `owner` a new expiry `now_ms + duration_ms` (a
    /// static one stays static).
    pub fn extend(
        &mut self,
        key: &TableKey,
        owner: BackendId,
        duration_ms: u64,
        now_ms: u64,
    ) -> Result<Granted, AffinityError> {
        if duration_ms == 0 {
            return Err(AffinityError::Invalid("zero duration"));
        }
        let e = self.index.get_mut(key).ok_or(AffinityError::NotFound)?;
        if e.rec.owner != owner {
            return Err(AffinityError::Conflict { owner: e.rec.owner });
        }
        if e.rec.expires.is_none() {
            // Static: nothing to extend.
            return Ok(Granted { remaining_ms: None });
        }
        let expires = Some(now_ms.saturating_add(duration_ms));
        e.rec.expires = expires;
        let id = e.id;
        self.reschedule(id, expires, now_ms);
        self.changes += 1;
        Ok(Granted {
            remaining_ms: Some(duration_ms),
        })
    }

    /// Removes an affinity at once. `owner: None` is an operator, who may
    /// cancel any; a backend may cancel only its own.
    pub fn cancel(
        &mut self,
        key: &TableKey,
        owner: Option<BackendId>,
        _now_ms: u64,
    ) -> Result<Ended, AffinityError> {
        let e = self.index.get(key).ok_or(AffinityError::NotFound)?;
        if let Some(o) = owner {
            if o != e.rec.owner {
                return Err(AffinityError::Conflict { owner: e.rec.owner });
            }
        }
        let rec = self.remove_entry(key).ok_or(AffinityError::NotFound)?;
        Ok(Ended {
            key: *key,
            owner: rec.owner,
            notify: rec.notify,
            reason: EndReason::Cancelled,
            created_ms: rec.created_ms,
        })
    }

    pub fn get(&self, key: &TableKey) -> Option<&Record> {
        self.index.get(key).map(|e| &e.rec)
    }

    /// Every affinity, in no particular order.
    pub fn list(&self) -> impl Iterator<Item = (&TableKey, &Record)> {
        self.index.iter().map(|(k, e)| (k, &e.rec))
    }

    /// Removes every affinity with `expires <= now_ms`, appending them to
    /// `out`. Costs the affinities due plus the wheel slots passed; call it
    /// at least once a second (and before serving requests at `now_ms`).
    pub fn expire(&mut self, now_ms: u64, out: &mut Vec<Ended>) {
        let mut due = std::mem::take(&mut self.due);
        due.clear();
        self.wheel.advance(now_ms, &mut due);
        for &id in &due {
            let key = self.keys[id as usize];
            if let Some(e) = self.index.remove(&key) {
                self.changes += 1;
                self.writer.remove(&key);
                self.free_ids.push(id);
                self.overlap.remove(&key);
                self.count(e.rec.owner, e.rec.expires.is_some(), false);
                out.push(Ended {
                    key,
                    owner: e.rec.owner,
                    notify: e.rec.notify,
                    reason: EndReason::Expired,
                    created_ms: e.rec.created_ms,
                });
            }
        }
        self.due = due;
    }

    /// Ends every affinity owned by `backend` (it left the configuration).
    /// Scans the records: backend removal is rare and off the data path.
    pub fn remove_backend(&mut self, backend: BackendId, out: &mut Vec<Ended>) {
        self.end_owned(backend, true, EndReason::BackendRemoved, out);
    }

    /// Removes the requested (timed) affinities `backend` owns, appending
    /// them to `out` with `reason`; its static ones stay.
    pub fn end_requested(&mut self, backend: BackendId, reason: EndReason, out: &mut Vec<Ended>) {
        self.end_owned(backend, false, reason, out);
    }

    fn end_owned(
        &mut self,
        backend: BackendId,
        with_static: bool,
        reason: EndReason,
        out: &mut Vec<Ended>,
    ) {
        let keys: Vec<TableKey> = self
            .index
            .iter()
            .filter(|(_, e)| e.rec.owner == backend && (with_static || e.rec.expires.is_some()))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            if let Some(rec) = self.remove_entry(&key) {
                out.push(Ended {
                    key,
                    owner: rec.owner,
                    notify: rec.notify,
                    reason,
                    created_ms: rec.created_ms,
                });
            }
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Most affinities the table holds.
    pub fn capacity(&self) -> usize {
        self.writer.capacity()
    }

    /// Whether a create of `key` would find room in the table now (see
    /// [`AffinityWriter::has_room`]); an existing key always has.
    pub fn has_room(&self, key: &TableKey) -> bool {
        self.writer.has_room(key)
    }

    /// A reader handle for a worker.
    pub fn reader(&self) -> AffinityReader {
        self.writer.reader()
    }

    /// Records looked at by expiry so far (wheel visits): a debug counter
    /// showing expiry does not scan the table.
    pub fn expiry_visits(&self) -> u64 {
        self.wheel.visited()
    }

    fn reschedule(&mut self, id: u32, expires: Option<u64>, now_ms: u64) {
        self.wheel.remove(id);
        if let Some(at) = expires {
            self.wheel.insert(id, at, now_ms);
        }
    }

    fn remove_entry(&mut self, key: &TableKey) -> Option<Record> {
        let e = self.index.remove(key)?;
        self.changes += 1;
        self.wheel.remove(e.id);
        self.writer.remove(key);
        self.free_ids.push(e.id);
        self.overlap.remove(key);
        self.count(e.rec.owner, e.rec.expires.is_some(), false);
        Some(e.rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::affinity::table::AffinityTable;
    use crate::types::Family;
    use crate::types::PortMatch;

    fn key(addr: u128, plen: u8) -> TableKey {
        TableKey::new(1, Family::V4, addr, plen, PortMatch::Any).unwrap()
    }

    fn mgr(cap: usize) -> (AffinityManager, AffinityReader) {
        let (w, r) = AffinityTable::new(cap);
        (AffinityManager::new(w), r)
    }

    fn notify() -> Option<SocketAddr> {
        Some("192.0.2.1:4000".parse().unwrap())
    }

    #[test]
    fn create_conflict_refresh() {
        let (mut m, r) = mgr(16);
        let k = key(0x0a00_0000, 8);
        assert_eq!(
            m.create(k, 5, Some(10_000), notify(), 1_000),
            Ok(Granted {
                remaining_ms: Some(10_000)
            })
        );
        assert_eq!(r.lookup(1, Family::V4, 0x0a01_0203, 80), Some(5));
        assert_eq!(
            m.create(k, 6, Some(10_000), None, 2_000),
            Err(AffinityError::Conflict { owner: 5 })
        );
        // Same owner refreshes: new expiry, notify kept when none given.
        assert!(m.create(k, 5, Some(20_000), None, 3_000).is_ok());
        let rec = *m.get(&k).unwrap();
        assert_eq!(rec.expires, Some(23_000));
        assert_eq!(rec.notify, notify());
        assert_eq!(rec.created_ms, 1_000);
        assert_eq!(rec.remaining_ms(13_000), Some(10_000));
        assert_eq!(m.len(), 1);
        assert_eq!(
            m.create(k, 5, Some(0), None, 3_000),
            Err(AffinityError::Invalid("zero duration"))
        );
        let mut out = Vec::new();
        m.expire(22_999, &mut out);
        assert!(out.is_empty());
        m.expire(23_000, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].reason, EndReason::Expired);
        assert_eq!(r.lookup(1, Family::V4, 0x0a01_0203, 80), None);
    }

    #[test]
    fn extend_rules() {
        let (mut m, _r) = mgr(16);
        let k = key(0x0a00_0001, 32);
        assert_eq!(m.extend(&k, 1, 1000, 0), Err(AffinityError::NotFound));
        m.create(k, 1, Some(1_000), None, 0).unwrap();
        assert_eq!(
            m.extend(&k, 2, 1000, 0),
            Err(AffinityError::Conflict { owner: 1 })
        );
        assert_eq!(
            m.extend(&k, 1, 5_000, 500),
            Ok(Granted {
                remaining_ms: Some(5_000)
            })
        );
        assert_eq!(
            m.extend(&k, 1, 0, 500),
            Err(AffinityError::Invalid("zero duration"))
        );
        let mut out = Vec::new();
        m.expire(1_000, &mut out);
        assert!(out.is_empty(), "extended affinity expired at its old time");
        m.expire(5_499, &mut out);
        assert!(out.is_empty());
        m.expire(5_500, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(m.len(), 0);
        // A static affinity (from the configuration) stays static.
        m.create(k, 1, None, None, 6_000).unwrap();
        assert_eq!(
            m.extend(&k, 1, 100, 6_000),
            Ok(Granted { remaining_ms: None })
        );
        m.expire(6_100, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn cancel_rules() {
        let (mut m, r) = mgr(16);
        let k = key(0x0a00_0001, 32);
        assert_eq!(m.cancel(&k, None, 0), Err(AffinityError::NotFound));
        m.create(k, 3, Some(60_000), notify(), 0).unwrap();
        assert_eq!(
            m.cancel(&k, Some(4), 0),
            Err(AffinityError::Conflict { owner: 3 })
        );
        let ended = m.cancel(&k, Some(3), 10).unwrap();
        assert_eq!(
            ended,
            Ended {
                key: k,
                owner: 3,
                notify: notify(),
                reason: EndReason::Cancelled,
                created_ms: 0
            }
        );
        assert_eq!(r.lookup(1, Family::V4, 0x0a00_0001, 1), None);
        assert!(m.get(&k).is_none());
        // Operator cancel, and the cancelled timer never fires.
        m.create(k, 3, Some(60_000), None, 0).unwrap();
        assert_eq!(m.cancel(&k, None, 0).unwrap().owner, 3);
        let mut out = Vec::new();
        m.expire(120_000, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn static_never_expires() {
        let (mut m, r) = mgr(16);
        let k = key(0x0a00_0001, 32);
        assert_eq!(
            m.create(k, 3, None, None, 0),
            Ok(Granted { remaining_ms: None })
        );
        let mut out = Vec::new();
        m.expire(u64::MAX / 2, &mut out);
        assert!(out.is_empty());
        assert_eq!(r.lookup(1, Family::V4, 0x0a00_0001, 1), Some(3));
        assert_eq!(m.get(&k).unwrap().remaining_ms(5), None);
    }

    #[test]
    fn remove_backend_ends_its_affinities() {
        let (mut m, r) = mgr(64);
        for i in 0..20u128 {
            m.create(key(i, 32), (i % 2) as u32, Some(1_000), None, 0)
                .unwrap();
        }
        let mut out = Vec::new();
        m.remove_backend(1, &mut out);
        assert_eq!(out.len(), 10);
        assert!(out
            .iter()
            .all(|e| e.owner == 1 && e.reason == EndReason::BackendRemoved));
        assert_eq!(m.len(), 10);
        assert!(m.list().all(|(_, rec)| rec.owner == 0));
        assert_eq!(r.lookup(1, Family::V4, 1, 1), None);
        assert_eq!(r.lookup(1, Family::V4, 2, 1), Some(0));
        out.clear();
        m.expire(1_000, &mut out);
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn static_affinities_stay_static_when_requested_again() {
        let (mut m, r) = mgr(8);
        m.create(key(1, 32), 3, None, None, 0).unwrap();
        let g = m.create(key(1, 32), 3, Some(1_000), None, 10).unwrap();
        assert_eq!(g.remaining_ms, None);
        let mut out = Vec::new();
        m.expire(10_000, &mut out);
        assert!(out.is_empty());
        assert!(
            r.lookup_match(1, Family::V4, 1, 1)
                .is_some_and(|m| m.is_static),
            "static in the table"
        );
        // The other way: a requested affinity the configuration takes over
        // becomes static, in the table too.
        m.create(key(2, 32), 3, Some(1_000), None, 0).unwrap();
        assert!(!r
            .lookup_match(1, Family::V4, 2, 1)
            .is_some_and(|m| m.is_static));
        m.create(key(2, 32), 3, None, None, 0).unwrap();
        assert!(r
            .lookup_match(1, Family::V4, 2, 1)
            .is_some_and(|m| m.is_static));
    }

    #[test]
    fn table_full_leaves_index_unchanged() {
        let (mut m, r) = mgr(2);
        m.create(key(1, 32), 1, Some(1_000), None, 0).unwrap();
        m.create(key(2, 32), 1, Some(1_000), None, 0).unwrap();
        assert_eq!(
            m.create(key(3, 32), 1, Some(1_000), None, 0),
            Err(AffinityError::TableFull)
        );
        assert_eq!(m.len(), 2);
        assert!(m.get(&key(3, 32)).is_none());
        assert_eq!(r.lookup(1, Family::V4, 3, 1), None);
        // Refresh of an existing key is not a new entry.
        assert!(m.create(key(2, 32), 1, Some(5_000), None, 0).is_ok());
        let mut out = Vec::new();
        m.expire(1_000, &mut out);
        assert_eq!(out.len(), 1);
        assert!(m.create(key(3, 32), 1, Some(1_000), None, 1_000).is_ok());
    }

    /// A million affinities: expiry at times with nothing due looks at no
    /// record, and each affinity ends at the first tick at or after its time.
    #[test]
    fn million_entries_expire_without_scanning() {
        let n = 1_000_000u32;
        let (mut m, r) = mgr(n as usize);
        let t0 = 10_000u64;
        // Durations from 600 s to ~700 s, spread over many wheel slots.
        let dur = |i: u32| 600_000 + u64::from(i % 100_000);
        for i in 0..n {
            m.create(key(u128::from(i), 32), i % 7, Some(dur(i)), None, t0)
                .unwrap();
        }
        let mut out = Vec::new();
        let mut now = t0;
        let mut busy_calls = 0;
        while now < t0 + 590_000 {
            now += 1_000;
            let before = m.expiry_visits();
            m.expire(now, &mut out);
            if m.expiry_visits() != before {
                busy_calls += 1;
            }
        }
        assert!(out.is_empty());
        // Nothing due: the only work is moving the timers of the coming
        // block down a level once, in one call; all other calls touch nothing.
        assert!(busy_calls <= 1, "{busy_calls}");
        assert!(m.expiry_visits() <= u64::from(n));
        // Expire up to 650 s: exactly those due, each visited about once
        // (moved down a level, then fired).
        m.expire(t0 + 650_000, &mut out);
        let due = (0..n).filter(|&i| dur(i) <= 650_000).count();
        assert_eq!(out.len(), due);
        assert!(out
            .iter()
            .all(|e| e.reason == EndReason::Expired && m.get(&e.key).is_none()));
        assert!(m.expiry_visits() <= 3 * n as u64, "{}", m.expiry_visits());
        assert_eq!(r.lookup(1, Family::V4, 0, 1), None);
        assert_eq!(r.lookup(1, Family::V4, 50_001, 1), Some(50_001 % 7));
        // Again at the same time: only the current 100 ms slot (990 timers
        // due within it) is looked at.
        let before = m.expiry_visits();
        m.expire(t0 + 650_000, &mut out);
        assert!(m.expiry_visits() - before <= 1_000);
        assert_eq!(out.len(), due);
        m.expire(t0 + 700_000, &mut out);
        assert_eq!(out.len(), n as usize);
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn requested_counts_and_overlaps_follow_the_records() {
        let (mut m, _r) = mgr(64);
        let wide = key(0x0a01_0000, 16);
        let inner = key(0x0a01_0203, 32);
        m.create(wide, 1, Some(5_000), None, 0).unwrap();
        m.create(key(0x0b00_0000, 8), 1, None, None, 0).unwrap();
        assert_eq!(m.requested_by(1), 1, "the static one does not count");
        assert_eq!(m.overlapping_owner(&inner, 2), Some(1));
        assert_eq!(m.overlapping_owner(&inner, 1), None);
        // A refresh is not a new affinity.
        m.create(wide, 1, Some(9_000), None, 10).unwrap();
        assert_eq!(m.requested_by(1), 1);
        m.create(inner, 1, Some(1_000), None, 10).unwrap();
        assert_eq!(m.requested_by(1), 2);
        // Expiry and cancel both give the quota back and clear the index.
        let mut out = Vec::new();
        m.expire(2_000, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(m.requested_by(1), 1);
        m.cancel(&wide, Some(1), 3_000).unwrap();
        assert_eq!(m.requested_by(1), 0);
        assert_eq!(m.overlapping_owner(&inner, 2), None);
        m.remove_backend(1, &mut out);
        assert_eq!(m.overlapping_owner(&key(0x0b01_0101, 32), 2), None);
    }

    #[test]
    fn changes_count_every_change_and_restore_keeps_the_age() {
        let (mut m, _r) = mgr(16);
        let k = key(0x0a00_0001, 32);
        assert_eq!(m.changes(), 0);
        m.create(k, 1, Some(1_000), None, 0).unwrap();
        assert_eq!(m.changes(), 1);
        assert!(m.create(k, 2, Some(1_000), None, 0).is_err());
        assert_eq!(m.changes(), 1, "a refusal changes nothing");
        m.extend(&k, 1, 2_000, 10).unwrap();
        m.cancel(&k, None, 20).unwrap();
        assert_eq!(m.changes(), 3);
        m.restore(k, 1, 5_000, notify(), 100, 1_000).unwrap();
        let rec = *m.get(&k).unwrap();
        assert_eq!((rec.created_ms, rec.expires), (100, Some(6_000)));
        let mut out = Vec::new();
        m.expire(6_000, &mut out);
        assert_eq!((out.len(), m.changes()), (1, 5));
    }
}
