//! The control plane's side of cluster mode (`[cluster]`): an affinity
//! request checked as the lone instance checks it but not applied (the
//! change waits for the shared store), the store's affinities installed or
//! removed without notices, and ended affinities handed on with their store
//! key rather than notified at once (only the instance whose delete commits
//! sends the notice); and the backends' declared states, shared by name,
//! applied to the backends configured here. The store itself is
//! [`crate::control::store_sync`]'s.

use std::net::SocketAddr;

use hashbrown::HashMap;

use crate::affinity::key::TableKey;
use crate::affinity::manager::Ended;
use crate::affinity::overlap::OverlapIndex;
use crate::cluster::{DeclarationKey, StoreKey};
use crate::control::handler::Response;
use crate::control::registry::ServiceRegistry;
use crate::control::state_file::SavedAffinity;
use crate::net::ip_bits;
use crate::protocol::message::{AffinityOp, EndedNotice, Request, ReturnCode};
use crate::types::{BackendId, BackendState, Declared, EndReason};

use super::{secs, wire_key, AffinityAction, ControlPlane};

/// An affinity that ended on this instance, waiting for its store delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedEnd {
    pub key: StoreKey,
    pub notify: Option<SocketAddr>,
    pub notice: EndedNotice,
}

/// The new keys this instance asked the store for whose outcome it has not
/// had yet: a create's checks (the table's room, the owner's quota, the
/// overlap rule) count them as held, so that a burst of creates at one
/// instance cannot each pass a check that together they fail. Empty when
/// the instance runs alone, whose creates change the table at once.
#[derive(Default)]
pub struct PendingCreates {
    /// Creates in flight per (key, owner), and the duration (s) the last
    /// of them asked for.
    entries: HashMap<(TableKey, BackendId), (u32, u32)>,
    /// Distinct keys in flight per owner.
    by_owner: HashMap<BackendId, usize>,
    /// Their networks, for the overlap rule.
    overlap: OverlapIndex,
}

impl PendingCreates {
    fn add(&mut self, key: TableKey, owner: BackendId, secs: u32) {
        let (n, asked) = self.entries.entry((key, owner)).or_insert((0, 0));
        if *n == 0 {
            *self.by_owner.entry(owner).or_insert(0) += 1;
            self.overlap.insert(&key, owner);
        }
        *n += 1;
        *asked = secs;
    }

    fn settle(&mut self, key: TableKey, owner: BackendId) {
        let Some((n, _)) = self.entries.get_mut(&(key, owner)) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        self.entries.remove(&(key, owner));
        self.overlap.remove_owned(&key, owner);
        if let Some(k) = self.by_owner.get_mut(&owner) {
            *k -= 1;
            if *k == 0 {
                self.by_owner.remove(&owner);
            }
        }
    }

    /// Distinct keys in flight.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Distinct keys in flight for `owner`.
    pub fn held_by(&self, owner: BackendId) -> usize {
        self.by_owner.get(&owner).copied().unwrap_or(0)
    }

    /// A key in flight for another owner that shares a client with `key`.
    pub fn overlapping(&self, key: &TableKey, owner: BackendId) -> Option<(TableKey, BackendId)> {
        self.overlap.other(key, owner)
    }

    /// The duration (s) the create of `key` for `owner` in flight asked for.
    pub fn asked_secs(&self, key: &TableKey, owner: BackendId) -> Option<u32> {
        self.entries.get(&(*key, owner)).map(|&(_, secs)| secs)
    }
}

/// What a change request comes to once checked against the local table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Planned {
    /// Answered here: a refusal, or a change to a static affinity (those
    /// are each instance's own, from its configuration).
    Answer(Response),
    /// Write this affinity (a create, or an extend when `extend`).
    /// `fresh`: a create of a key the local table does not hold, counted
    /// in [`PendingCreates`] until [`ControlPlane::create_settled`].
    Put {
        value: SavedAffinity,
        extend: bool,
        fresh: Option<(TableKey, BackendId)>,
    },
    /// Delete the affinity of `key` (a cancel). `owner`: the backend that
    /// must own it (None: the operator cancels whoever does).
    Delete {
        key: StoreKey,
        owner: Option<String>,
    },
}

/// What [`ControlPlane::install_stored`] did with a store affinity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Installed {
    /// In the local table, with the time it has left.
    Installed,
    /// Its expiry has passed: not installed.
    Expired,
    /// Its service or backend is not configured here.
    Gone,
    /// A static affinity of another backend holds the key here.
    Static,
    /// The local table is full.
    Full,
}

impl ControlPlane {
    /// Cluster mode from now on: ended affinities go to
    /// [`take_shared_ends`](Self::take_shared_ends), not to the notices.
    pub fn set_shared(&mut self) {
        if self.shared_ends.is_none() {
            self.shared_ends = Some(Vec::new());
        }
    }

    /// The affinities that ended since the last call (cluster mode).
    pub fn take_shared_ends(&mut self) -> Vec<SharedEnd> {
        self.shared_ends
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    pub(super) fn queue_shared_end(&mut self, e: &Ended, notice: EndedNotice) {
        let Some(key) = self.store_key(&e.key) else {
            return;
        };
        if let Some(v) = &mut self.shared_ends {
            v.push(SharedEnd {
                key,
                notify: e.notify,
                notice,
            });
        }
    }

    /// The store keys of the declarations a BACKEND_STATE would make for
    /// `ids` (by the operator when `by_admin`).
    pub fn declaration_keys(&self, ids: &[BackendId], by_admin: bool) -> Vec<DeclarationKey> {
        self.states_of(ids)
            .into_iter()
            .map(|(service, backend, _)| DeclarationKey {
                service,
                backend,
                by_admin,
            })
            .collect()
    }

    /// Applies declarations from the store to the backends configured here
    /// under those names and publishes the states that makes, once; keeps
    /// them for backends of those names configured later. Returns the
    /// (service, backend, state) of each backend concerned.
    pub fn apply_declarations(
        &mut self,
        declarations: &[(DeclarationKey, Declared)],
    ) -> Vec<(String, String, BackendState)> {
        let now = self.now_ms();
        let mut touched = Vec::new();
        for (key, state) in declarations {
            if *state == Declared::Up {
                self.shared_declarations.remove(key);
            } else {
                self.shared_declarations.insert(key.clone(), *state);
            }
            if let Some(id) = self.backend_named(key) {
                self.states.declare(id, key.by_admin, *state, now);
                touched.push(id);
            }
        }
        if touched.is_empty() {
            return Vec::new();
        }
        // The declarations are recorded either way; a snapshot that cannot
        // be built leaves the published states as they were.
        if let Err(e) = self.apply_states() {
            log::error!("declared states not published: {e}");
        }
        self.states_of(&touched)
    }

    /// The keys of the declarations other than UP the cluster holds.
    pub fn shared_declarations(&self) -> impl Iterator<Item = &DeclarationKey> {
        self.shared_declarations.keys()
    }

    /// Gives each backend of `next` that is new here (no state yet) what
    /// the cluster declared for its name, before its first snapshot.
    pub(super) fn adopt_declarations(&mut self, next: &ServiceRegistry) {
        if self.shared_declarations.is_empty() {
            return;
        }
        let now = self.now_ms();
        for (id, service, b) in next.backends() {
            if self.states.get(id).is_some() {
                continue;
            }
            for by_admin in [false, true] {
                let key = DeclarationKey {
                    service: service.to_string(),
                    backend: b.name.clone(),
                    by_admin,
                };
                if let Some(&state) = self.shared_declarations.get(&key) {
                    self.states.declare(id, by_admin, state, now);
                }
            }
        }
    }

    /// The backend configured here that `key` names.
    fn backend_named(&self, key: &DeclarationKey) -> Option<BackendId> {
        self.registry
            .backends()
            .find(|(_, s, b)| *s == key.service && b.name == key.backend)
            .map(|(id, _, _)| id)
    }

    /// The (service, backend, state) of the backend `key` names, if it is
    /// configured here.
    pub fn declared_state(&self, key: &DeclarationKey) -> Option<(String, String, BackendState)> {
        self.states_of(&[self.backend_named(key)?]).pop()
    }

    /// The store key of a table key (None if its service is gone).
    pub fn store_key(&self, k: &TableKey) -> Option<StoreKey> {
        let svc = self.dp.service(k.service())?;
        Some(StoreKey {
            service: svc.name.clone(),
            client: crate::net::bits_ip(k.family(), k.addr()),
            prefix_len: k.prefix_len(),
            ports: k.ports(),
        })
    }

    /// The table key of a store key (None if its service is not configured
    /// here or the key does not fit it).
    pub fn table_key_of(&self, k: &StoreKey) -> Option<TableKey> {
        let svc = self.dp.service_named(&k.service)?;
        let family = crate::net::family(k.client);
        if family != svc.family {
            return None;
        }
        TableKey::new(svc.id, family, ip_bits(k.client), k.prefix_len, k.ports).ok()
    }

    /// The keys of every requested (timed) affinity in the local table.
    pub fn stored_keys(&self) -> Vec<StoreKey> {
        self.affinities
            .list()
            .filter(|(_, r)| r.expires.is_some())
            .filter_map(|(k, _)| self.store_key(k))
            .collect()
    }

    /// Checks an affinity request as [`handle`](Self::handle) would, without
    /// changing the table, and says what to ask the store for; `wall_ms`
    /// (Unix ms) dates the value. None: not an affinity change.
    pub fn plan_change(
        &mut self,
        sender: &str,
        is_admin: bool,
        request: &Request<'_>,
        wall_ms: u64,
    ) -> Option<Planned> {
        let (action, op) = match request {
            Request::AffinityCreate(op) => (AffinityAction::Create, op),
            Request::AffinityExtend(op) => (AffinityAction::Extend, op),
            Request::AffinityCancel(op) => (AffinityAction::Cancel, op),
            _ => return None,
        };
        Some(self.plan(action, sender, is_admin, op, wall_ms))
    }

    fn plan(
        &mut self,
        action: AffinityAction,
        sender: &str,
        is_admin: bool,
        op: &AffinityOp<'_>,
        wall_ms: u64,
    ) -> Planned {
        let c = match self.check_affinity_op(action, is_admin, op) {
            Ok(c) => c,
            Err(r) => return Planned::Answer(r),
        };
        let now = c.now;
        let record = self.affinities.get(&c.key).copied();
        if let (Some(r), Some(owner)) = (record, c.owner) {
            if r.owner != owner {
                // The local copy mirrors the store: its owner holds it.
                let err = crate::affinity::AffinityError::Conflict { owner: r.owner };
                return Planned::Answer(self.affinity_error(err, now, &c.key));
            }
        }
        match record {
            // A static affinity never goes to the store.
            Some(r) if r.expires.is_none() => {
                let request = match action {
                    AffinityAction::Create => Request::AffinityCreate(*op),
                    AffinityAction::Extend => Request::AffinityExtend(*op),
                    AffinityAction::Cancel => Request::AffinityCancel(*op),
                };
                return Planned::Answer(self.handle(sender, is_admin, &request));
            }
            None if action != AffinityAction::Create => {
                return Planned::Answer(
                    Response::new(ReturnCode::NotFound).with_message("no such affinity"),
                )
            }
            _ => {}
        }
        let full = self.affinities.len() + self.pending.len() >= self.affinities.capacity();
        if record.is_none() && (full || !self.affinities.has_room(&c.key)) {
            // Every instance installs what the store holds, and none could
            // honour a key this table has no room for: refused before it
            // reaches the store, as a lone instance refuses it.
            let err = crate::affinity::AffinityError::TableFull;
            return Planned::Answer(self.affinity_error(err, now, &c.key));
        }
        let Some(key) = self.store_key(&c.key) else {
            return Planned::Answer(Response::new(ReturnCode::NotFound));
        };
        if action == AffinityAction::Cancel {
            return Planned::Delete {
                key,
                owner: op.owner.map(str::to_string),
            };
        }
        let Some(svc) = self.dp.service(c.key.service()) else {
            return Planned::Answer(Response::new(ReturnCode::NotFound));
        };
        let owner = c.owner.and_then(|o| self.backend_name(o)).unwrap_or("?");
        let created_unix_ms = match record {
            Some(r) => wall_ms.saturating_sub(now.saturating_sub(r.created_ms)),
            None => wall_ms,
        };
        // An extend keeps the address notified; a create names one.
        let notify = match action {
            AffinityAction::Extend => record.and_then(|r| r.notify),
            _ => op.notify.or(record.and_then(|r| r.notify)),
        };
        let value = SavedAffinity {
            service: key.service,
            service_addr: wire_key(svc, &c.key).service,
            owner: owner.to_string(),
            client: key.client,
            prefix_len: key.prefix_len,
            ports: key.ports,
            expires_unix_ms: wall_ms.saturating_add(c.duration_ms),
            created_unix_ms,
            notify,
        };
        let fresh = match (record, c.owner) {
            (None, Some(owner)) => {
                self.pending.add(c.key, owner, secs(c.duration_ms));
                Some((c.key, owner))
            }
            _ => None,
        };
        Planned::Put {
            value,
            extend: action == AffinityAction::Extend,
            fresh,
        }
    }

    /// The store's answer to a create [`Planned::Put`] marked `fresh` came
    /// (whatever it was): the key is no longer counted as in flight.
    pub fn create_settled(&mut self, key: TableKey, owner: BackendId) {
        self.pending.settle(key, owner);
    }

    /// A settled create sent to the store again, for `secs` more: in
    /// flight once more.
    pub fn create_resent(&mut self, key: TableKey, owner: BackendId, secs: u32) {
        self.pending.add(key, owner, secs);
    }

    /// Ends a store affinity this instance wrote whose service or backend
    /// left the configuration while the write waited for the store (a
    /// reload): BACKEND_REMOVED, as the reload would have ended it had the
    /// write committed first; counted here, deleted from the store and
    /// notified by the caller.
    pub fn end_gone_stored(&mut self, a: &SavedAffinity, key: StoreKey, wall_ms: u64) -> SharedEnd {
        self.counters.ended_backend_removed += 1;
        self.record_lifetime(a, wall_ms);
        SharedEnd {
            key,
            notify: a.notify,
            notice: a.notice(EndReason::BackendRemoved),
        }
    }

    /// Installs (or replaces) a store affinity in the local table, with the
    /// time it has left at `wall_ms` (Unix ms). No notice: an affinity of
    /// another owner it replaces was not ended, the store moved on.
    pub fn install_stored(&mut self, a: &SavedAffinity, wall_ms: u64) -> Installed {
        let left = a.expires_unix_ms.saturating_sub(wall_ms);
        if left == 0 {
            return Installed::Expired;
        }
        let Some(key) = self.table_key_of(&StoreKey::of(a)) else {
            return Installed::Gone;
        };
        let Some(svc) = self.dp.service(key.service()) else {
            return Installed::Gone;
        };
        let Some(owner) = self.dp.find_backend(svc.id, &a.owner).map(|b| b.id) else {
            return Installed::Gone;
        };
        let now = self.now_ms();
        if let Some(r) = self.affinities.get(&key).copied() {
            if r.expires.is_none() {
                return if r.owner == owner {
                    Installed::Installed
                } else {
                    Installed::Static
                };
            }
            if r.owner != owner {
                let _ = self.affinities.cancel(&key, None, now);
            }
        }
        let age = wall_ms.saturating_sub(a.created_unix_ms);
        // Never longer than this instance's configuration grants, whatever
        // the store says (another instance's configuration, or a value
        // written by hand): it ends here then, and with it in the store.
        let left = left.min(super::max_affinity_ms(svc));
        match self
            .affinities
            .restore(key, owner, left, a.notify, now.saturating_sub(age), now)
        {
            Ok(_) => Installed::Installed,
            Err(_) => Installed::Full,
        }
    }

    /// Removes a requested affinity from the local table without a notice
    /// (the store no longer holds it); false if it was not there.
    pub fn remove_stored(&mut self, key: &StoreKey) -> bool {
        let Some(k) = self.table_key_of(key) else {
            return false;
        };
        match self.affinities.get(&k) {
            Some(r) if r.expires.is_some() => {
                let now = self.now_ms();
                self.affinities.cancel(&k, None, now).is_ok()
            }
            _ => false,
        }
    }

    /// Ends a requested affinity of the local table for `reason` (its
    /// delete committed here) and returns its notice; None if it is not
    /// there.
    pub fn end_stored(&mut self, key: &StoreKey, reason: EndReason) -> Option<SharedEnd> {
        let k = self.table_key_of(key)?;
        // Static affinities are each instance's own, never the store's.
        self.affinities.get(&k)?.expires?;
        let now = self.now_ms();
        let mut e = self.affinities.cancel(&k, None, now).ok()?;
        e.reason = reason;
        if reason == EndReason::Cancelled {
            self.counters.ended_cancelled += 1;
        }
        let _ = self
            .lifetimes
            .record(now.saturating_sub(e.created_ms).max(1));
        let notice = self.notice(&e)?;
        Some(SharedEnd {
            key: key.clone(),
            notify: e.notify,
            notice,
        })
    }

    /// The notice [`end_stored`](Self::end_stored) would give for `key`
    /// now, without ending anything: a cancel keeps it while its delete is
    /// in flight, since the watch may remove the local copy before the
    /// delete's outcome arrives.
    pub fn stored_end(&self, key: &StoreKey, reason: EndReason) -> Option<SharedEnd> {
        let k = self.table_key_of(key)?;
        let r = self.affinities.get(&k)?;
        r.expires?;
        let notice = self.notice(&Ended {
            key: k,
            owner: r.owner,
            notify: r.notify,
            reason,
            created_ms: r.created_ms,
        })?;
        Some(SharedEnd {
            key: key.clone(),
            notify: r.notify,
            notice,
        })
    }

    /// [`end_stored`](Self::end_stored) for a delete committed here, or,
    /// when the watch already took the local copy away, the notice `seen`
    /// when the delete was sent.
    pub fn end_stored_or(
        &mut self,
        key: &StoreKey,
        reason: EndReason,
        seen: Option<SharedEnd>,
    ) -> Option<SharedEnd> {
        if let Some(e) = self.end_stored(key, reason) {
            return Some(e);
        }
        let e = seen?;
        if reason == EndReason::Cancelled {
            self.counters.ended_cancelled += 1;
        }
        Some(e)
    }

    /// CONFLICT naming the owner of a store affinity and its time left at
    /// `wall_ms`.
    pub fn conflict_with(a: &SavedAffinity, wall_ms: u64) -> Response {
        Response::conflict(&a.owner, secs(a.expires_unix_ms.saturating_sub(wall_ms)))
    }
}
