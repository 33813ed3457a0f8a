//! The control thread's side of cluster mode: [`StoreSync`] sends the
//! affinity changes this instance accepts to the store thread
//! ([`StoreHandle`]), answers their deferred replies from the outcomes,
//! applies the store's watch to the local table, and settles which
//! instance ends an affinity (and notifies its owner).
//!
//! * A change is checked against the local table first (it mirrors the
//!   store), then written with a compare-and-set on the key's revision as
//!   this instance last saw it; the reply waits for the outcome.
//! * Every end is a delete at the revision the instance saw. The instance
//!   that wrote that revision deletes at once, the others after
//!   [`TAKEOVER_DELAY_MS`] if the key is still at it (the writer may be
//!   gone). The one whose delete commits sends the notice; the others
//!   stay silent.
//! * While the store is unreachable, changes are refused (UNAVAILABLE) and
//!   ends wait for the next full load.
//!
//! Time is the wall clock in Unix ms, passed in by the caller.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use crate::cluster::{
    Change, Outcome, Revision, StoreEvent, StoreHandle, StoreKey, StoreOp, StoredAffinity, Ticket,
};
use crate::control::handler::{Call, Response};
use crate::control::plane::{secs, ControlPlane, Installed, Planned, SharedEnd};
use crate::control::state_file::SavedAffinity;
use crate::datapath::latency::Percentiles;
use crate::protocol::message::{AffinityKey, EndedNotice, Request, ReturnCode};
use crate::types::EndReason;

/// How long an instance other than an affinity's writer waits before it
/// ends the affinity itself (ms).
pub const TAKEOVER_DELAY_MS: u64 = 500;

/// The store revision and writer of a key, as this instance last saw them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    revision: Revision,
    writer: String,
}

/// A change sent to the store whose outcome is awaited.
#[derive(Clone, Debug)]
enum InFlight {
    /// A request's write; its reply is parked under the same ticket.
    Put {
        value: SavedAffinity,
        extend: bool,
        retried: bool,
    },
    /// A request's cancel.
    Cancel {
        key: StoreKey,
        owner: Option<String>,
        retried: bool,
    },
    /// The delete that ends an affinity.
    End(StoreKey),
}

/// An affinity that ended here and whose delete is not committed yet.
#[derive(Clone, Debug)]
struct PendingEnd {
    revision: Revision,
    notify: Option<SocketAddr>,
    notice: EndedNotice,
    /// When to send the delete (Unix ms).
    due_unix_ms: u64,
    /// The delete is in flight.
    sent: bool,
    /// The store was unreachable: wait for the next full load.
    after_load: bool,
}

/// What the store counted, for the summary and the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncCounters {
    /// Changes (creates, extends, cancels) by outcome.
    pub committed: u64,
    /// Another owner held the key: answered CONFLICT.
    pub conflict: u64,
    /// The local copy was stale: sent again at the current revision.
    pub retried: u64,
    /// The key was gone (extend or cancel): answered NOT_FOUND.
    pub not_found: u64,
    /// The store did not answer, was unreachable, or too many replies were
    /// parked: answered UNAVAILABLE.
    pub unavailable: u64,
    /// Ends whose delete committed here (this instance notified).
    pub ends_won: u64,
    /// Ends another instance settled (ended or extended it first).
    pub ends_lost: u64,
    /// Full loads of the table installed.
    pub loads: u64,
    /// Store affinities not installed because a static affinity of another
    /// backend holds the key here.
    pub static_refused: u64,
    /// Store affinities whose service or backend is not configured here.
    pub gone: u64,
    /// Values under the prefix this build cannot read.
    pub unreadable: u64,
}

/// What a turn produced for the protocol server.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Deferred replies to send, by ticket.
    pub replies: Vec<(Ticket, Response)>,
    /// AFFINITY_ENDED notices this instance sends.
    pub notices: Vec<(Option<SocketAddr>, EndedNotice)>,
}

/// The control thread's end of the shared table.
pub struct StoreSync {
    store: StoreHandle,
    instance: String,
    next_ticket: Ticket,
    in_flight: HashMap<Ticket, InFlight>,
    seen: HashMap<StoreKey, Seen>,
    ends: HashMap<StoreKey, PendingEnd>,
    /// A load is installed and the store has not been unreachable since.
    up: bool,
    /// A load has been installed (the instance may report itself ready).
    loaded: bool,
    /// When `up` last changed (Unix ms; 0: never).
    since_unix_ms: u64,
    /// The newest store revision seen.
    revision: Revision,
    counters: SyncCounters,
    /// Commit-to-install delay of other instances' changes (ms).
    propagation: hdrhistogram::Histogram<u64>,
    /// Keys refused for a static affinity, logged once each.
    static_logged: HashSet<StoreKey>,
}

impl StoreSync {
    /// The control thread's side of the store thread behind `store`;
    /// `instance` is `[cluster] instance`. Puts `plane` in cluster mode.
    pub fn new(store: StoreHandle, instance: &str, plane: &mut ControlPlane) -> StoreSync {
        plane.set_shared();
        StoreSync {
            store,
            instance: instance.to_string(),
            next_ticket: 1,
            in_flight: HashMap::new(),
            seen: HashMap::new(),
            ends: HashMap::new(),
            up: false,
            loaded: false,
            since_unix_ms: 0,
            revision: 0,
            counters: SyncCounters::default(),
            propagation: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000, 3)
                .expect("static histogram bounds are valid"),
            static_logged: HashSet::new(),
        }
    }

    /// A full load of the table has been installed: the instance may say
    /// it is ready (and stays so while the store is unreachable).
    pub fn ready(&self) -> bool {
        self.loaded
    }

    /// The store answers (a load installed, not unreachable since).
    pub fn up(&self) -> bool {
        self.up
    }

    pub fn counters(&self) -> SyncCounters {
        self.counters
    }

    /// Ends waiting for their delete to commit.
    pub fn pending_ends(&self) -> usize {
        self.ends.len()
    }

    /// The summary's `cluster` object.
    pub fn summary(&self) -> crate::report::summary::ClusterSummary {
        let c = self.counters;
        crate::report::summary::ClusterSummary {
            instance: self.instance.clone(),
            store_up: self.up,
            since_unix_ms: self.since_unix_ms,
            revision: self.revision,
            loaded: self.loaded,
            loads: c.loads,
            changes: [
                ("committed", c.committed),
                ("conflict", c.conflict),
                ("retried", c.retried),
                ("not_found", c.not_found),
                ("unavailable", c.unavailable),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            ends_won: c.ends_won,
            ends_lost: c.ends_lost,
            pending_ends: self.ends.len() as u64,
            static_refused: c.static_refused,
            unreadable: c.unreadable,
            propagation_ms: Percentiles::of(&self.propagation),
        }
    }

    fn ticket(&mut self) -> Ticket {
        let t = self.next_ticket;
        self.next_ticket += 1;
        t
    }

    fn unavailable(&mut self, why: String) -> Response {
        self.counters.unavailable += 1;
        Response::unavailable(why)
    }

    /// Answers an affinity change (CREATE, EXTEND, CANCEL): refused at
    /// once after the local checks, or sent to the store with a deferred
    /// reply. Any other request goes to the plane as in a lone instance.
    pub fn request(
        &mut self,
        plane: &mut ControlPlane,
        call: &Call<'_>,
        request: &Request<'_>,
        wall_ms: u64,
    ) -> Response {
        if !matches!(
            request,
            Request::AffinityCreate(_) | Request::AffinityExtend(_) | Request::AffinityCancel(_)
        ) {
            return plane.handle(call.sender, call.is_admin, request);
        }
        if !self.up {
            return self.unavailable(
                "the shared affinity table (etcd) cannot be reached: nothing was done".into(),
            );
        }
        if !call.may_defer {
            return self.unavailable(
                "too many changes wait for the shared affinity table: nothing was done".into(),
            );
        }
        let Some(planned) = plane.plan_change(call.sender, call.is_admin, request, wall_ms) else {
            return plane.handle(call.sender, call.is_admin, request);
        };
        let ticket = self.ticket();
        let (op, flight) = match planned {
            Planned::Answer(r) => return r,
            Planned::Put { value, extend } => (
                self.put_op(ticket, value.clone(), wall_ms),
                InFlight::Put {
                    value,
                    extend,
                    retried: false,
                },
            ),
            Planned::Delete { key, owner } => (
                StoreOp::Delete {
                    ticket,
                    key: key.clone(),
                    expect: self.revision_of(&key),
                },
                InFlight::Cancel {
                    key,
                    owner,
                    retried: false,
                },
            ),
        };
        if !self.store.submit(op) {
            return self.unavailable("the store thread has stopped: nothing was done".into());
        }
        self.in_flight.insert(ticket, flight);
        Response::deferred(ticket)
    }

    fn revision_of(&self, key: &StoreKey) -> Revision {
        self.seen.get(key).map_or(0, |s| s.revision)
    }

    fn put_op(&self, ticket: Ticket, value: SavedAffinity, wall_ms: u64) -> StoreOp {
        let expect = self.revision_of(&StoreKey::of(&value));
        StoreOp::Put {
            ticket,
            value: StoredAffinity {
                affinity: value,
                writer: self.instance.clone(),
                written_unix_ms: wall_ms,
            },
            expect,
        }
    }

    /// One turn at `wall_ms`: hands the plane's new ends to the store,
    /// applies every event waiting, and sends the deletes that are due.
    pub fn turn(&mut self, plane: &mut ControlPlane, wall_ms: u64) -> Outbox {
        let mut out = Outbox::default();
        self.take_ends(plane, wall_ms, &mut out);
        while let Some(ev) = self.store.try_event() {
            self.apply(plane, ev, wall_ms, &mut out);
        }
        // Events may have ended more (a load of an affinity already due).
        self.take_ends(plane, wall_ms, &mut out);
        self.send_due_ends(wall_ms);
        out
    }

    /// At shutdown: every reply still waiting is answered UNAVAILABLE. The
    /// affinities stay in the store (a stopping instance ends none).
    pub fn shutdown(&mut self) -> Vec<(Ticket, Response)> {
        let mut replies = Vec::new();
        for (ticket, f) in self.in_flight.drain() {
            if !matches!(f, InFlight::End(_)) {
                self.counters.unavailable += 1;
                replies.push((
                    ticket,
                    Response::unavailable(
                        "pktdist is stopping: the outcome of this change is unknown (list it)",
                    ),
                ));
            }
        }
        replies
    }

    /// Turns the plane's ended affinities into pending deletes (or, for an
    /// affinity the store never held, a notice at once).
    fn take_ends(&mut self, plane: &mut ControlPlane, wall_ms: u64, out: &mut Outbox) {
        for end in plane.take_shared_ends() {
            self.queue_end(end, wall_ms, out);
        }
    }

    fn queue_end(&mut self, end: SharedEnd, wall_ms: u64, out: &mut Outbox) {
        let Some(seen) = self.seen.get(&end.key) else {
            // A static affinity (each instance's own) or one never stored.
            out.notices.push((end.notify, end.notice));
            return;
        };
        if self.ends.contains_key(&end.key) {
            return;
        }
        let due = if seen.writer == self.instance {
            wall_ms
        } else {
            wall_ms.saturating_add(TAKEOVER_DELAY_MS)
        };
        self.ends.insert(
            end.key,
            PendingEnd {
                revision: seen.revision,
                notify: end.notify,
                notice: end.notice,
                due_unix_ms: due,
                sent: false,
                after_load: !self.up,
            },
        );
    }

    /// Sends the deletes of the ends that are due, if their key is still
    /// at the revision that ended.
    fn send_due_ends(&mut self, wall_ms: u64) {
        if !self.up {
            return;
        }
        let due: Vec<StoreKey> = self
            .ends
            .iter()
            .filter(|(_, e)| !e.sent && !e.after_load && e.due_unix_ms <= wall_ms)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let revision = self.ends[&key].revision;
            if self.revision_of(&key) != revision {
                // Deleted or rewritten meanwhile: someone else settled it.
                self.ends.remove(&key);
                self.counters.ends_lost += 1;
                continue;
            }
            let ticket = self.ticket();
            let op = StoreOp::Delete {
                ticket,
                key: key.clone(),
                expect: revision,
            };
            if self.store.submit(op) {
                self.in_flight.insert(ticket, InFlight::End(key.clone()));
                if let Some(e) = self.ends.get_mut(&key) {
                    e.sent = true;
                }
            }
        }
    }

    fn apply(&mut self, plane: &mut ControlPlane, ev: StoreEvent, wall_ms: u64, out: &mut Outbox) {
        match ev {
            StoreEvent::Done { ticket, outcome } => self.done(plane, ticket, outcome, wall_ms, out),
            StoreEvent::Loaded {
                revision,
                affinities,
            } => self.load(plane, revision, affinities, wall_ms),
            StoreEvent::Changed { revision, change } => {
                self.revision = self.revision.max(revision);
                match change {
                    Change::Put(v) => {
                        if v.writer != self.instance {
                            let delay = wall_ms.saturating_sub(v.written_unix_ms).max(1);
                            let _ = self.propagation.record(delay);
                        }
                        if revision > self.revision_of(&v.key()) {
                            self.install(plane, v, revision, wall_ms);
                        }
                    }
                    Change::Deleted(key) => self.deleted(plane, &key),
                }
            }
            StoreEvent::Unreachable { error } => {
                if self.up {
                    log::warn!(
                        "cluster: the store is unreachable ({error}); forwarding goes on with \
                         the local table, changes are answered UNAVAILABLE"
                    );
                    self.since_unix_ms = wall_ms;
                }
                self.up = false;
                for e in self.ends.values_mut() {
                    if !e.sent {
                        e.after_load = true;
                    }
                }
            }
            StoreEvent::Unreadable { key, error } => {
                self.counters.unreadable += 1;
                log::warn!("cluster: store key {key} skipped: {error}");
            }
        }
    }

    /// The key is gone from the store: gone here too, without a notice.
    fn deleted(&mut self, plane: &mut ControlPlane, key: &StoreKey) {
        self.seen.remove(key);
        plane.remove_stored(key);
        if self.ends.get(key).is_some_and(|e| !e.sent) {
            // Another instance ended it first.
            self.ends.remove(key);
            self.counters.ends_lost += 1;
        }
    }

    /// Installs a store affinity at `revision`; one already expired ends
    /// (its delete settles who notifies).
    fn install(
        &mut self,
        plane: &mut ControlPlane,
        v: StoredAffinity,
        revision: Revision,
        wall_ms: u64,
    ) {
        let key = v.key();
        if self.ends.get(&key).is_some_and(|e| e.revision < revision) && !self.ends[&key].sent {
            // Written again since it ended here (extended): it lives on.
            self.ends.remove(&key);
            self.counters.ends_lost += 1;
        }
        self.seen.insert(
            key.clone(),
            Seen {
                revision,
                writer: v.writer.clone(),
            },
        );
        match plane.install_stored(&v.affinity, wall_ms) {
            Installed::Installed => {}
            Installed::Expired => {
                plane.remove_stored(&key);
                if !self.ends.contains_key(&key) {
                    let end = SharedEnd {
                        key,
                        notify: v.affinity.notify,
                        notice: notice_of(&v.affinity, EndReason::Expired),
                    };
                    let mut out = Outbox::default();
                    self.queue_end(end, wall_ms, &mut out);
                }
            }
            Installed::Gone => self.counters.gone += 1,
            Installed::Static => {
                self.counters.static_refused += 1;
                if self.static_logged.insert(key) {
                    log::warn!(
                        "cluster: {}/{} of {} not installed: a static affinity of another \
                         backend holds the key here",
                        v.affinity.client,
                        v.affinity.prefix_len,
                        v.affinity.owner
                    );
                }
            }
            Installed::Full => log::warn!(
                "cluster: the local affinity table is full: {}/{} of {} not installed",
                v.affinity.client,
                v.affinity.prefix_len,
                v.affinity.owner
            ),
        }
    }

    /// A full load: it replaces every requested affinity here, silently.
    fn load(
        &mut self,
        plane: &mut ControlPlane,
        revision: Revision,
        affinities: Vec<(StoredAffinity, Revision)>,
        wall_ms: u64,
    ) {
        let loaded: HashMap<StoreKey, Revision> =
            affinities.iter().map(|(v, r)| (v.key(), *r)).collect();
        // An end waiting for the store is sent again if its key is still
        // at the revision that ended; otherwise another instance settled it.
        let mut waiting = Vec::new();
        self.ends.retain(|key, e| {
            if e.sent {
                return true;
            }
            if loaded.get(key) == Some(&e.revision) {
                e.after_load = false;
                waiting.push(key.clone());
                true
            } else {
                false
            }
        });
        for key in plane.stored_keys() {
            if !loaded.contains_key(&key) {
                plane.remove_stored(&key);
            }
        }
        self.seen.clear();
        if !self.up {
            self.since_unix_ms = wall_ms;
        }
        // Up before installing: an affinity loaded already due ends now.
        self.up = true;
        for (v, rev) in affinities {
            let key = v.key();
            if waiting.contains(&key) {
                // Ended here already: not installed again.
                self.seen.insert(
                    key,
                    Seen {
                        revision: rev,
                        writer: v.writer,
                    },
                );
                continue;
            }
            self.install(plane, v, rev, wall_ms);
        }
        self.revision = self.revision.max(revision);
        self.counters.loads += 1;
        if !self.loaded {
            log::info!(
                "cluster: {} affinities loaded from the store (revision {revision}); ready",
                loaded.len()
            );
        }
        self.loaded = true;
    }

    fn done(
        &mut self,
        plane: &mut ControlPlane,
        ticket: Ticket,
        outcome: Outcome,
        wall_ms: u64,
        out: &mut Outbox,
    ) {
        let Some(flight) = self.in_flight.remove(&ticket) else {
            return;
        };
        match flight {
            InFlight::Put {
                value,
                extend,
                retried,
            } => self.put_done(plane, ticket, value, extend, retried, outcome, wall_ms, out),
            InFlight::Cancel {
                key,
                owner,
                retried,
            } => self.cancel_done(plane, ticket, key, owner, retried, outcome, wall_ms, out),
            InFlight::End(key) => self.end_done(plane, key, outcome, wall_ms, out),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn put_done(
        &mut self,
        plane: &mut ControlPlane,
        ticket: Ticket,
        value: SavedAffinity,
        extend: bool,
        retried: bool,
        outcome: Outcome,
        wall_ms: u64,
        out: &mut Outbox,
    ) {
        let key = StoreKey::of(&value);
        let reply = match outcome {
            Outcome::Committed { revision } => {
                self.counters.committed += 1;
                let duration = value.expires_unix_ms.saturating_sub(wall_ms);
                if revision > self.revision_of(&key) {
                    let v = StoredAffinity {
                        affinity: value,
                        writer: self.instance.clone(),
                        written_unix_ms: wall_ms,
                    };
                    self.install(plane, v, revision, wall_ms);
                }
                Response::ok().with_remaining(secs(duration))
            }
            Outcome::Moved { current } => {
                let stale_same_owner = match &current {
                    Some((v, _)) => v.affinity.owner == value.owner,
                    None => !extend,
                };
                match current {
                    Some((v, rev)) => {
                        if rev > self.revision_of(&key) {
                            self.install(plane, v.clone(), rev, wall_ms);
                        }
                        if !stale_same_owner {
                            self.counters.conflict += 1;
                            out.replies
                                .push((ticket, ControlPlane::conflict_with(&v.affinity, wall_ms)));
                            return;
                        }
                    }
                    None => {
                        self.seen.remove(&key);
                        plane.remove_stored(&key);
                        if !stale_same_owner {
                            self.counters.not_found += 1;
                            out.replies.push((
                                ticket,
                                Response::new(ReturnCode::NotFound)
                                    .with_message("no such affinity"),
                            ));
                            return;
                        }
                    }
                }
                if retried {
                    self.unavailable(
                        "the affinity kept changing in the shared table; list it and retry".into(),
                    )
                } else {
                    // The local copy was stale: once more at the current
                    // revision.
                    self.counters.retried += 1;
                    let op = self.put_op(ticket, value.clone(), wall_ms);
                    if self.store.submit(op) {
                        self.in_flight.insert(
                            ticket,
                            InFlight::Put {
                                value,
                                extend,
                                retried: true,
                            },
                        );
                        return;
                    }
                    self.unavailable("the store thread has stopped: nothing was done".into())
                }
            }
            Outcome::Unavailable { error } => self.unavailable(format!(
                "the shared affinity table did not answer ({error}): the change may or may not \
                 have been made; list the affinity to find out"
            )),
        };
        out.replies.push((ticket, reply));
    }

    #[allow(clippy::too_many_arguments)]
    fn cancel_done(
        &mut self,
        plane: &mut ControlPlane,
        ticket: Ticket,
        key: StoreKey,
        owner: Option<String>,
        retried: bool,
        outcome: Outcome,
        wall_ms: u64,
        out: &mut Outbox,
    ) {
        let reply = match outcome {
            Outcome::Committed { .. } => {
                self.counters.committed += 1;
                self.seen.remove(&key);
                self.ends.remove(&key);
                // The canceller notifies.
                if let Some(end) = plane.end_stored(&key, EndReason::Cancelled) {
                    out.notices.push((end.notify, end.notice));
                }
                Response::ok()
            }
            Outcome::Moved {
                current: Some((v, rev)),
            } => {
                if rev > self.revision_of(&key) {
                    self.install(plane, v.clone(), rev, wall_ms);
                }
                if owner.as_ref().is_some_and(|o| *o != v.affinity.owner) {
                    self.counters.conflict += 1;
                    ControlPlane::conflict_with(&v.affinity, wall_ms)
                } else if retried {
                    self.unavailable(
                        "the affinity kept changing in the shared table; list it and retry".into(),
                    )
                } else {
                    self.counters.retried += 1;
                    let op = StoreOp::Delete {
                        ticket,
                        key: key.clone(),
                        expect: rev,
                    };
                    if self.store.submit(op) {
                        self.in_flight.insert(
                            ticket,
                            InFlight::Cancel {
                                key,
                                owner,
                                retried: true,
                            },
                        );
                        return;
                    }
                    self.unavailable("the store thread has stopped: nothing was done".into())
                }
            }
            Outcome::Moved { current: None } => {
                // Another instance ended it first (and notified).
                self.seen.remove(&key);
                plane.remove_stored(&key);
                self.counters.not_found += 1;
                Response::new(ReturnCode::NotFound).with_message("no such affinity")
            }
            Outcome::Unavailable { error } => self.unavailable(format!(
                "the shared affinity table did not answer ({error}): the cancel may or may not \
                 have been made; list the affinity to find out"
            )),
        };
        out.replies.push((ticket, reply));
    }

    fn end_done(
        &mut self,
        plane: &mut ControlPlane,
        key: StoreKey,
        outcome: Outcome,
        wall_ms: u64,
        out: &mut Outbox,
    ) {
        match outcome {
            Outcome::Committed { .. } => {
                self.seen.remove(&key);
                if let Some(e) = self.ends.remove(&key) {
                    self.counters.ends_won += 1;
                    out.notices.push((e.notify, e.notice));
                }
            }
            Outcome::Moved { current } => {
                // Someone else ended or extended it: no notice from here.
                self.ends.remove(&key);
                self.counters.ends_lost += 1;
                match current {
                    Some((v, rev)) if rev > self.revision_of(&key) => {
                        self.install(plane, v, rev, wall_ms)
                    }
                    Some(_) => {}
                    None => {
                        self.seen.remove(&key);
                    }
                }
            }
            Outcome::Unavailable { .. } => {
                // Unknown: sent again after the next load if still there.
                if let Some(e) = self.ends.get_mut(&key) {
                    e.sent = false;
                    e.after_load = true;
                }
            }
        }
    }
}

/// The AFFINITY_ENDED notice of a store affinity.
fn notice_of(a: &SavedAffinity, reason: EndReason) -> EndedNotice {
    EndedNotice {
        key: AffinityKey {
            service: a.service_addr,
            client: a.client,
            prefix_len: a.prefix_len,
            ports: a.ports,
        },
        owner: a.owner.clone(),
        reason,
    }
}
