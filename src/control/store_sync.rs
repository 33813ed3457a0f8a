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
//!   ends wait for the next full load. A delete a reachable store refuses
//!   (out of space, permission) is sent again after [`END_RETRY_MS`],
//!   then after twice as long each time, up to about a minute.
//! * A BACKEND_STATE (and `pktdist backend drain|undrain|state`) is
//!   written to the store as one declaration per backend concerned, by
//!   name, and answered once all are committed. Every instance applies
//!   every declaration the watch brings (and a load replaces them all), in
//!   store order: the last one written wins everywhere. Health checks stay
//!   each instance's own.
//!
//! Time is the wall clock in Unix ms, passed in by the caller.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use crate::affinity::key::TableKey;
use crate::cluster::{
    Change, DeclarationKey, Outcome, Revision, StoreEvent, StoreGone, StoreHandle, StoreKey,
    StoreOp, StoredAffinity, StoredDeclaration, Ticket,
};
use crate::control::handler::{Call, Response};
use crate::control::plane::{secs, state_reply, ControlPlane, Installed, Planned, SharedEnd};
use crate::control::state_file::SavedAffinity;
use crate::datapath::latency::Percentiles;
use crate::protocol::message::{EndedNotice, Request, ReturnCode};
use crate::types::{BackendId, BackendState, Declared, EndReason};

/// How long an instance other than an affinity's writer waits before it
/// ends the affinity itself (ms).
pub const TAKEOVER_DELAY_MS: u64 = 500;
/// How long an end whose delete a reachable store refused (out of space,
/// permission denied, a value this build cannot read) first waits before
/// the delete is sent again (ms); each refusal doubles the wait, up to 64
/// times this.
pub const END_RETRY_MS: u64 = 1000;

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
        /// A create of a key the local table did not hold
        /// ([`Planned::Put`]), counted as pending until its outcome.
        fresh: Option<(TableKey, BackendId)>,
    },
    /// A request's cancel.
    Cancel {
        key: StoreKey,
        owner: Option<String>,
        retried: bool,
        /// The notice as of sending, for when the watch's delete arrives
        /// before the outcome.
        seen: Option<SharedEnd>,
    },
    /// The delete that ends the version `expect` of an affinity.
    End { key: StoreKey, expect: Revision },
    /// One declaration of a BACKEND_STATE whose reply is parked under
    /// `reply`.
    Declare {
        reply: Ticket,
        key: DeclarationKey,
        state: Declared,
    },
}

/// A BACKEND_STATE waiting for its declarations to commit.
#[derive(Debug, Default)]
struct Declaring {
    /// Declarations not answered yet.
    left: usize,
    /// Why one was not committed.
    failed: Option<String>,
    /// The backends concerned, with the state each is in once applied.
    done: Vec<(String, String, BackendState)>,
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
    /// Refusals of its delete so far (the wait before the next doubles).
    refused: u32,
}

/// What the store counted, for the summary and the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncCounters {
    /// Changes by outcome: creates, extends, cancels, and each backend's
    /// declaration of a BACKEND_STATE (UNAVAILABLE counts the request).
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
    /// Store affinities not installed because the local table is full.
    pub table_full: u64,
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
    /// Keys whose delete this instance committed, with the delete's
    /// revision, until the watch's echo of the delete: the watch's echoes
    /// of older puts of them, which may come after the delete's outcome,
    /// are stale.
    deleted: HashMap<StoreKey, Revision>,
    /// A load is installed and the store has not been unreachable since.
    up: bool,
    /// The store thread ended: nothing from the store will come again.
    gone: bool,
    /// A load has been installed (the instance may report itself ready).
    loaded: bool,
    /// When `up` last changed (Unix ms; 0: never).
    since_unix_ms: u64,
    /// Why the store is unreachable, while it is.
    last_error: Option<String>,
    /// The newest store revision seen.
    revision: Revision,
    counters: SyncCounters,
    /// Commit-to-install delay of other instances' changes (ms).
    propagation: hdrhistogram::Histogram<u64>,
    /// Keys refused for a static affinity, logged once each.
    static_logged: HashSet<StoreKey>,
    /// The revision of the last declaration seen for each key (UP's
    /// deletions too); the states themselves are the plane's.
    declared_at: HashMap<DeclarationKey, Revision>,
    /// The revision of the last load: outcomes older than it are in it.
    loaded_revision: Revision,
    /// BACKEND_STATE replies waiting, by their ticket.
    declaring: HashMap<Ticket, Declaring>,
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
            deleted: HashMap::new(),
            up: false,
            gone: false,
            loaded: false,
            since_unix_ms: 0,
            last_error: None,
            revision: 0,
            counters: SyncCounters::default(),
            propagation: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000, 3)
                .expect("static histogram bounds are valid"),
            static_logged: HashSet::new(),
            declared_at: HashMap::new(),
            loaded_revision: 0,
            declaring: HashMap::new(),
        }
    }

    /// A full load of the table has been installed: the instance may say
    /// it is ready (and stays so while the store is unreachable, not once
    /// the store thread is gone).
    pub fn ready(&self) -> bool {
        self.loaded && !self.gone
    }

    /// The store thread ended (it panicked): this instance no longer
    /// applies the other instances' changes nor sends its own, and must
    /// stop for its supervisor to start it anew (a new start loads the
    /// table again).
    pub fn gone(&self) -> bool {
        self.gone
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
            last_error: self.last_error.clone(),
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
            table_full: c.table_full,
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
        match request {
            Request::AffinityCreate(_)
            | Request::AffinityExtend(_)
            | Request::AffinityCancel(_) => {}
            Request::BackendState {
                service,
                backend,
                state,
            } => return self.declare(plane, call, *service, *backend, *state, wall_ms),
            _ => return plane.handle(call.sender, call.is_admin, request),
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
            Planned::Put {
                value,
                extend,
                fresh,
            } => (
                self.put_op(
                    ticket,
                    value.clone(),
                    self.revision_of(&StoreKey::of(&value)),
                    wall_ms,
                ),
                InFlight::Put {
                    value,
                    extend,
                    retried: false,
                    fresh,
                },
            ),
            Planned::Delete { key, owner } => (
                StoreOp::Delete {
                    ticket,
                    key: key.clone(),
                    expect: self.revision_of(&key),
                },
                InFlight::Cancel {
                    seen: plane.stored_end(&key, EndReason::Cancelled),
                    key,
                    owner,
                    retried: false,
                },
            ),
        };
        if !self.store.submit(op) {
            if let InFlight::Put {
                fresh: Some((key, owner)),
                ..
            } = flight
            {
                plane.create_settled(key, owner);
            }
            return self.unavailable("the store thread has stopped: nothing was done".into());
        }
        self.in_flight.insert(ticket, flight);
        Response::deferred(ticket)
    }

    /// A BACKEND_STATE: refused at once as a lone instance would, or one
    /// declaration per backend concerned sent to the store with a deferred
    /// reply.
    fn declare(
        &mut self,
        plane: &mut ControlPlane,
        call: &Call<'_>,
        service: Option<&str>,
        backend: Option<&str>,
        state: Declared,
        wall_ms: u64,
    ) -> Response {
        let ids = match plane.declaration_targets(call.sender, call.is_admin, service, backend) {
            Ok(ids) => ids,
            Err(refused) => return refused,
        };
        if !self.up {
            return self.unavailable(
                "the shared store (etcd) cannot be reached: nothing was declared".into(),
            );
        }
        if !call.may_defer {
            return self.unavailable(
                "too many changes wait for the shared store: nothing was declared".into(),
            );
        }
        let keys = plane.declaration_keys(&ids, call.is_admin);
        if keys.is_empty() {
            return state_reply(&[]);
        }
        let reply = self.ticket();
        let mut waiting = Declaring::default();
        for key in keys {
            let ticket = self.ticket();
            let op = StoreOp::Declare {
                ticket,
                value: StoredDeclaration {
                    key: key.clone(),
                    state,
                    writer: self.instance.clone(),
                    written_unix_ms: wall_ms,
                },
            };
            if !self.store.submit(op) {
                self.in_flight
                    .retain(|_, f| !matches!(f, InFlight::Declare { reply: r, .. } if *r == reply));
                return self.unavailable("the store thread has stopped: nothing was done".into());
            }
            self.in_flight
                .insert(ticket, InFlight::Declare { reply, key, state });
            waiting.left += 1;
        }
        self.declaring.insert(reply, waiting);
        Response::deferred(reply)
    }

    /// Applies a declaration committed at `revision` unless a newer one
    /// of its key was seen; returns what it did to the backends here.
    fn declared(
        &mut self,
        plane: &mut ControlPlane,
        key: DeclarationKey,
        state: Declared,
        revision: Revision,
    ) -> Vec<(String, String, BackendState)> {
        let newer = self
            .declared_at
            .get(&key)
            .is_some_and(|&seen| seen > revision);
        if newer || revision <= self.loaded_revision {
            return Vec::new();
        }
        self.declared_at.insert(key.clone(), revision);
        plane.apply_declarations(&[(key, state)])
    }

    /// A declaration's outcome; the BACKEND_STATE is answered with its
    /// last.
    fn declare_done(
        &mut self,
        plane: &mut ControlPlane,
        reply: Ticket,
        key: DeclarationKey,
        state: Declared,
        outcome: Outcome,
        out: &mut Outbox,
    ) {
        let applied = match outcome {
            Outcome::Committed { revision } => {
                self.counters.committed += 1;
                let done = self.declared(plane, key.clone(), state, revision);
                Ok(done)
            }
            Outcome::Unavailable { error } => Err(error),
            // A declaration has no compare: the store never answers Moved.
            Outcome::Moved { .. } => Err("the store answered it as a compare-and-set".into()),
        };
        let Some(w) = self.declaring.get_mut(&reply) else {
            return;
        };
        match applied {
            Ok(done) if done.is_empty() => {
                // Applied already (the watch was first), or superseded.
                w.done.extend(plane.declared_state(&key));
            }
            Ok(done) => w.done.extend(done),
            Err(e) => w.failed = Some(e),
        }
        w.left -= 1;
        if w.left > 0 {
            return;
        }
        let Some(w) = self.declaring.remove(&reply) else {
            return;
        };
        let response = match w.failed {
            None => state_reply(&w.done),
            Some(e) => {
                self.counters.unavailable += 1;
                Response::unavailable(format!(
                    "the shared store did not confirm every declaration ({e}); some \
                     instances may have it: send it again"
                ))
            }
        };
        out.replies.push((reply, response));
    }

    fn revision_of(&self, key: &StoreKey) -> Revision {
        self.seen.get(key).map_or(0, |s| s.revision)
    }

    fn put_op(
        &self,
        ticket: Ticket,
        value: SavedAffinity,
        expect: Revision,
        wall_ms: u64,
    ) -> StoreOp {
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
        loop {
            match self.store.try_event() {
                Ok(Some(ev)) => self.apply(plane, ev, wall_ms, &mut out),
                Ok(None) => break,
                Err(StoreGone) => {
                    if !self.gone {
                        log::error!(
                            "cluster: the store thread ended: the shared table is no longer                              followed here"
                        );
                        if self.up {
                            self.since_unix_ms = wall_ms;
                        }
                        self.gone = true;
                        self.up = false;
                        self.last_error = Some("the store thread ended".into());
                    }
                    break;
                }
            }
        }
        // Events may have ended more (a load of an affinity already due).
        self.take_ends(plane, wall_ms, &mut out);
        self.send_due_ends(wall_ms);
        out
    }

    /// Some delete of an ended affinity awaits its outcome.
    pub fn ends_in_flight(&self) -> bool {
        self.in_flight
            .values()
            .any(|f| matches!(f, InFlight::End { .. }))
    }

    /// At shutdown: every reply still waiting is answered UNAVAILABLE. The
    /// affinities stay in the store; an end whose delete has not committed
    /// (the caller waits for those in flight first) is left to the other
    /// instances, which take it over as its writer's.
    pub fn shutdown(&mut self) -> Vec<(Ticket, Response)> {
        let mut replies = Vec::new();
        for reply in std::mem::take(&mut self.declaring).into_keys() {
            self.counters.unavailable += 1;
            replies.push((
                reply,
                Response::unavailable(
                    "pktdist is stopping: the outcome of this declaration is unknown (list \
                     the backends)",
                ),
            ));
        }
        for (ticket, f) in self.in_flight.drain() {
            if !matches!(f, InFlight::End { .. } | InFlight::Declare { .. }) {
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
                refused: 0,
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
            let op = StoreOp::End {
                ticket,
                key: key.clone(),
                expect: revision,
            };
            if self.store.submit(op) {
                self.in_flight.insert(
                    ticket,
                    InFlight::End {
                        key: key.clone(),
                        expect: revision,
                    },
                );
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
                declarations,
                ended,
            } => {
                self.load(plane, revision, affinities, ended, wall_ms, out);
                self.load_declarations(plane, revision, declarations);
            }
            StoreEvent::Changed { revision, change } => {
                self.revision = self.revision.max(revision);
                match change {
                    Change::Put(v) => {
                        if v.writer != self.instance {
                            let delay = wall_ms.saturating_sub(v.written_unix_ms).max(1);
                            let _ = self.propagation.record(delay);
                        }
                        let key = v.key();
                        let stale = self.deleted.get(&key).is_some_and(|&at| revision < at);
                        if revision > self.revision_of(&key) && !stale {
                            self.install(plane, v, revision, wall_ms, out);
                        }
                    }
                    // One older than the version held (installed from a
                    // commit's answer ahead of the watch) is past.
                    Change::Deleted(key) => {
                        if revision > self.revision_of(&key) {
                            self.deleted(plane, &key);
                        }
                    }
                    Change::Ended { key, expect } => self.end_committed(key, expect, out),
                    Change::Declared { key, state } => {
                        self.declared(plane, key, state, revision);
                    }
                }
            }
            StoreEvent::Unreachable { error } => {
                // The store thread reports each outage once.
                if self.up {
                    log::warn!(
                        "cluster: the store is unreachable ({error}); forwarding goes on with \
                         the local table, changes are answered UNAVAILABLE"
                    );
                    self.since_unix_ms = wall_ms;
                } else if !self.loaded {
                    log::warn!(
                        "cluster: cannot reach the store ({error}); not ready until it answers \
                         and its table is loaded"
                    );
                }
                self.last_error = Some(error);
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

    /// This instance's end of `key`, which found it at `expect`, committed
    /// (its mark, from the watch): the notice goes now, whether the
    /// delete's answer came first, comes later or never comes. The key's
    /// deletion follows.
    fn end_committed(&mut self, key: StoreKey, expect: Revision, out: &mut Outbox) {
        if self.ends.get(&key).is_some_and(|e| e.revision == expect) {
            self.won(&key, out);
        }
    }

    /// This instance's delete ended `key`'s pending end: it notifies.
    fn won(&mut self, key: &StoreKey, out: &mut Outbox) {
        if let Some(e) = self.ends.remove(key) {
            self.counters.ends_won += 1;
            out.notices.push((e.notify, e.notice));
        }
    }

    /// The key is gone from the store: gone here too, without a notice.
    fn deleted(&mut self, plane: &mut ControlPlane, key: &StoreKey) {
        self.deleted.remove(key);
        self.seen.remove(key);
        plane.remove_stored(key);
        self.ended_elsewhere(key);
    }

    /// The key was deleted by another instance's end or cancel, which
    /// notified: an end still waiting here for its delete is lost.
    fn ended_elsewhere(&mut self, key: &StoreKey) {
        if self.ends.get(key).is_some_and(|e| !e.sent) {
            self.ends.remove(key);
            self.counters.ends_lost += 1;
        }
    }

    /// Installs a store affinity at `revision`; one already expired ends
    /// (its delete settles who notifies). One of this instance's own writes
    /// whose backend is not configured here ends BACKEND_REMOVED: a create
    /// or extend that committed as a reload removed its backend (whether
    /// the commit or the watch's echo of it comes first), which would
    /// otherwise stay in the store with no instance to end it. Another
    /// instance's is that instance's to end. An end still waiting for its
    /// delete is settled by the write: dropped if the write extends the
    /// affinity, moved to the write if that deletes it too (its backend
    /// gone), or notified at once if this instance gave the key to
    /// another owner.
    fn install(
        &mut self,
        plane: &mut ControlPlane,
        v: StoredAffinity,
        revision: Revision,
        wall_ms: u64,
        out: &mut Outbox,
    ) {
        let key = v.key();
        let own = v.writer == self.instance;
        self.seen.insert(
            key.clone(),
            Seen {
                revision,
                writer: v.writer.clone(),
            },
        );
        let installed = plane.install_stored(&v.affinity, wall_ms);
        // An end still waiting for its delete, which this later write
        // settles; true when the write is another owner's.
        let settled = self
            .ends
            .get(&key)
            .filter(|e| e.revision < revision && !e.sent)
            .map(|e| e.notice.owner != v.affinity.owner);
        match settled {
            Some(true) if own => {
                // Replaced by another owner's affinity this instance wrote
                // (its key was free here once the first ended): no delete
                // will settle the one that ended, so its notice goes now,
                // from here (the others see another instance's write and
                // drop their ends).
                if let Some(e) = self.ends.remove(&key) {
                    self.counters.ends_won += 1;
                    out.notices.push((e.notify, e.notice));
                }
            }
            Some(_) if own && installed == Installed::Gone => {
                // Written again here, for a backend gone since: the end
                // deletes that write.
                if let Some(e) = self.ends.get_mut(&key) {
                    e.revision = revision;
                }
            }
            Some(_) => {
                // Written again since it ended here (extended): it lives
                // on.
                self.ends.remove(&key);
                self.counters.ends_lost += 1;
            }
            None => {}
        }
        match installed {
            Installed::Installed => {}
            Installed::Expired => {
                plane.remove_stored(&key);
                if !self.ends.contains_key(&key) {
                    let end = SharedEnd {
                        key,
                        notify: v.affinity.notify,
                        notice: v.affinity.notice(EndReason::Expired),
                    };
                    self.queue_end(end, wall_ms, out);
                }
            }
            Installed::Gone => {
                self.counters.gone += 1;
                if own && !self.ends.contains_key(&key) {
                    let end = plane.end_gone_stored(&v.affinity, key, wall_ms);
                    self.queue_end(end, wall_ms, out);
                }
            }
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
            Installed::Full => {
                self.counters.table_full += 1;
                // The first, then at each power of two: a full table
                // refuses every new affinity, which must not flood the log.
                if self.counters.table_full.is_power_of_two() {
                    log::warn!(
                        "cluster: the local affinity table is full: {}/{} of {} not \
                         installed ({} so far)",
                        v.affinity.client,
                        v.affinity.prefix_len,
                        v.affinity.owner,
                        self.counters.table_full
                    );
                }
            }
        }
    }

    /// A full load: it replaces every requested affinity here, silently.
    /// `ended`: this instance's committed ends still marked in the store.
    fn load(
        &mut self,
        plane: &mut ControlPlane,
        revision: Revision,
        affinities: Vec<(StoredAffinity, Revision)>,
        ended: Vec<(StoreKey, Revision)>,
        wall_ms: u64,
        out: &mut Outbox,
    ) {
        let loaded: HashMap<StoreKey, Revision> =
            affinities.iter().map(|(v, r)| (v.key(), *r)).collect();
        let ended: HashSet<(StoreKey, Revision)> = ended.into_iter().collect();
        // An end is settled by its delete: not installed again while the
        // store holds the key at the revision that ended. One waiting for
        // the store is sent again; one whose key moved was settled by its
        // delete from here if this instance's mark says so (its answer was
        // lost: the notice goes now), else by another instance. One in
        // flight waits for its outcome.
        let mut ended_here = HashSet::new();
        let mut settled = Vec::new();
        for (key, e) in self.ends.iter_mut() {
            let same = loaded.get(key) == Some(&e.revision);
            if same {
                ended_here.insert(key.clone());
            }
            if e.sent {
                continue;
            }
            if same {
                e.after_load = false;
            } else {
                settled.push((key.clone(), e.revision));
            }
        }
        for (key, revision) in settled {
            if ended.contains(&(key.clone(), revision)) {
                self.won(&key, out);
            } else {
                self.ends.remove(&key);
                self.counters.ends_lost += 1;
            }
        }
        for key in plane.stored_keys() {
            if !loaded.contains_key(&key) {
                plane.remove_stored(&key);
            }
        }
        self.seen.clear();
        self.deleted.clear();
        if !self.up {
            self.since_unix_ms = wall_ms;
        }
        // Up before installing: an affinity loaded already due ends now.
        self.up = true;
        self.last_error = None;
        for (v, rev) in affinities {
            let key = v.key();
            if ended_here.contains(&key) {
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
            self.install(plane, v, rev, wall_ms, out);
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

    /// A full load's declarations replace those the instance had: what is
    /// no longer declared is up again.
    fn load_declarations(
        &mut self,
        plane: &mut ControlPlane,
        revision: Revision,
        declarations: Vec<(StoredDeclaration, Revision)>,
    ) {
        self.declared_at = declarations
            .iter()
            .map(|(d, r)| (d.key.clone(), *r))
            .collect();
        let mut apply: Vec<(DeclarationKey, Declared)> = plane
            .shared_declarations()
            .filter(|k| !self.declared_at.contains_key(*k))
            .map(|k| (k.clone(), Declared::Up))
            .collect();
        apply.extend(declarations.into_iter().map(|(d, _)| (d.key, d.state)));
        self.loaded_revision = self.loaded_revision.max(revision);
        plane.apply_declarations(&apply);
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
                fresh,
            } => {
                if let Some((key, owner)) = fresh {
                    plane.create_settled(key, owner);
                }
                self.put_done(
                    plane, ticket, value, extend, retried, fresh, outcome, wall_ms, out,
                )
            }
            InFlight::Cancel {
                key,
                owner,
                retried,
                seen,
            } => self.cancel_done(
                plane, ticket, key, owner, retried, seen, outcome, wall_ms, out,
            ),
            InFlight::End { key, expect } => {
                self.end_done(plane, key, expect, outcome, wall_ms, out)
            }
            InFlight::Declare { reply, key, state } => {
                self.declare_done(plane, reply, key, state, outcome, out)
            }
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
        fresh: Option<(TableKey, BackendId)>,
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
                    self.install(plane, v, revision, wall_ms, out);
                }
                Response::ok().with_remaining(secs(duration))
            }
            Outcome::Moved { current } => {
                let stale_same_owner = match &current {
                    Some((v, _)) => v.affinity.owner == value.owner,
                    None => !extend,
                };
                // The revision to expect when sending it again.
                let expect = current.as_ref().map_or(0, |(_, rev)| *rev);
                match current {
                    Some((v, rev)) => {
                        if rev > self.revision_of(&key) {
                            self.install(plane, v.clone(), rev, wall_ms, out);
                        }
                        if !stale_same_owner {
                            self.counters.conflict += 1;
                            out.replies
                                .push((ticket, ControlPlane::conflict_with(&v.affinity, wall_ms)));
                            return;
                        }
                    }
                    None => {
                        // Deleted since the revision this write expected
                        // (before the watch says so): whoever deleted it
                        // notified its end, if it had ended here too.
                        self.seen.remove(&key);
                        plane.remove_stored(&key);
                        self.ended_elsewhere(&key);
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
                    let op = self.put_op(ticket, value.clone(), expect, wall_ms);
                    if self.store.submit(op) {
                        if let Some((k, owner)) = fresh {
                            let left = value.expires_unix_ms.saturating_sub(wall_ms);
                            plane.create_resent(k, owner, secs(left));
                        }
                        self.in_flight.insert(
                            ticket,
                            InFlight::Put {
                                value,
                                extend,
                                retried: true,
                                fresh,
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
        seen: Option<SharedEnd>,
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
                if let Some(end) = plane.end_stored_or(&key, EndReason::Cancelled, seen) {
                    out.notices.push((end.notify, end.notice));
                }
                Response::ok()
            }
            Outcome::Moved {
                current: Some((v, rev)),
            } => {
                if rev > self.revision_of(&key) {
                    self.install(plane, v.clone(), rev, wall_ms, out);
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
                                seen: plane.stored_end(&key, EndReason::Cancelled),
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

    /// The outcome of the delete that ends the version `expect` of `key`.
    /// It settles that end only: the watch may have settled it first (its
    /// mark), and the key may hold a newer affinity by now, with an end of
    /// its own.
    fn end_done(
        &mut self,
        plane: &mut ControlPlane,
        key: StoreKey,
        expect: Revision,
        outcome: Outcome,
        wall_ms: u64,
        out: &mut Outbox,
    ) {
        let this_end = self.ends.get(&key).is_some_and(|e| e.revision == expect);
        match outcome {
            Outcome::Committed { revision } => {
                if self.revision_of(&key) == expect {
                    self.seen.remove(&key);
                }
                if this_end {
                    self.won(&key, out);
                }
                // Until the watch echoes the delete: one it echoed already
                // (it often comes before the answer) has nothing left to
                // hold back, and an entry for it would stay until a load.
                if revision > self.revision {
                    self.deleted.insert(key, revision);
                }
            }
            Outcome::Moved { current } => match current {
                Some((v, rev))
                    if v.writer == self.instance && rev >= self.revision_of(&key) && this_end =>
                {
                    // This instance's own later write beat the delete (an
                    // extend that committed as the affinity ended): the
                    // end counts as not sent, and that write decides
                    // (install): it lives on if its backend is configured
                    // here, else the end deletes it.
                    if let Some(e) = self.ends.get_mut(&key) {
                        e.sent = false;
                    }
                    self.install(plane, v, rev, wall_ms, out);
                }
                current => {
                    // Someone else ended or extended it: no notice from
                    // here (nor a count, if this end was settled already).
                    if this_end {
                        self.ends.remove(&key);
                        self.counters.ends_lost += 1;
                    }
                    match current {
                        Some((v, rev)) if rev > self.revision_of(&key) => {
                            self.install(plane, v, rev, wall_ms, out);
                        }
                        Some(_) => {}
                        None => {
                            self.seen.remove(&key);
                        }
                    }
                }
            },
            Outcome::Unavailable { .. } => {
                // Not committed, or not known to be. Sent again in a while:
                // a store that still answers (one out of space, or refusing
                // this write) may take it then; a lost connection reports
                // itself next (`Unreachable`), which parks the end until
                // the next load, where the key's revision decides.
                if let Some(e) = self.ends.get_mut(&key).filter(|_| this_end) {
                    e.sent = false;
                    e.due_unix_ms = wall_ms.saturating_add(END_RETRY_MS << e.refused.min(6));
                    e.refused += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::affinity::table::AffinityReader;
    use crate::cluster::StorePeer;
    use crate::control::counters::ServerCounters;
    use crate::control::handler::Payload;
    use crate::control::testing::{config_text, first_time_left, op, plane, src, WEB};
    use crate::protocol::message::{AffinityOp, ServiceAddr, ADMIN_NAME};
    use crate::protocol::rate_limit::{RateLimiter, RateLimits};
    use crate::types::{Family, PortMatch};

    /// The tests' wall clock (Unix ms).
    const WALL: u64 = 1_800_000_000_000;
    /// 198.18.0.7, inside the tests' 198.18.0.0/24.
    const CLIENT: u128 = 0xc612_0007;

    /// A plane in cluster mode as instance `me`, with the store thread
    /// played by the test through `peer`.
    struct Bed {
        plane: ControlPlane,
        reader: AffinityReader,
        sync: StoreSync,
        peer: StorePeer,
        server: ServerCounters,
        latency: hdrhistogram::Histogram<u64>,
        rates: RateLimiter,
    }

    fn bed(me: &str) -> Bed {
        bed_of(me, &config_text())
    }

    /// [`bed`] for the configuration `text`.
    fn bed_of(me: &str, text: &str) -> Bed {
        let (mut plane, reader) = plane(text);
        let (handle, peer) = StoreHandle::pair();
        let sync = StoreSync::new(handle, me, &mut plane);
        Bed {
            plane,
            reader,
            sync,
            peer,
            server: ServerCounters::default(),
            latency: crate::datapath::latency::new_histogram(),
            rates: RateLimiter::new(RateLimits::default(), ADMIN_NAME),
        }
    }

    /// A bed whose store has loaded `affinities` at revision 10.
    fn loaded(me: &str, affinities: Vec<(StoredAffinity, Revision)>) -> Bed {
        loaded_of(me, &config_text(), affinities)
    }

    /// [`loaded`] for the configuration `text`.
    fn loaded_of(me: &str, text: &str, affinities: Vec<(StoredAffinity, Revision)>) -> Bed {
        let mut b = bed_of(me, text);
        b.event(StoreEvent::Loaded {
            revision: 10,
            affinities,
            declarations: Vec::new(),
            ended: Vec::new(),
        });
        b.turn(WALL);
        assert!(b.sync.ready() && b.sync.up());
        b
    }

    impl Bed {
        fn ask(&mut self, sender: &str, req: Request<'_>, may_defer: bool) -> Response {
            let call = Call {
                sender,
                is_admin: sender == ADMIN_NAME,
                source: src(),
                now_ms: WALL,
                server: &self.server,
                server_latency: &self.latency,
                server_rates: &self.rates,
                may_defer,
            };
            self.sync.request(&mut self.plane, &call, &req, WALL)
        }

        fn event(&self, ev: StoreEvent) {
            self.peer.events.send(ev).unwrap();
        }

        /// The watch's report of this instance's end of `key` at `expect`,
        /// committed at `revision`: its mark, then the deletion.
        fn marked_and_deleted(&self, key: &StoreKey, expect: Revision, revision: Revision) {
            let change = Change::Ended {
                key: key.clone(),
                expect,
            };
            self.event(StoreEvent::Changed { revision, change });
            let change = Change::Deleted(key.clone());
            self.event(StoreEvent::Changed { revision, change });
        }

        fn turn(&mut self, wall: u64) -> Outbox {
            self.sync.turn(&mut self.plane, wall)
        }

        /// The next op the store thread got.
        fn op(&mut self) -> Option<StoreOp> {
            self.peer.ops.try_recv().ok()
        }

        fn done(&mut self, ticket: Ticket, outcome: Outcome, wall: u64) -> Outbox {
            self.event(StoreEvent::Done { ticket, outcome });
            self.turn(wall)
        }

        /// Backend id in the local table for the tests' client, if any.
        fn lookup(&self) -> Option<u32> {
            self.reader.lookup(WEB, Family::V4, CLIENT, 1)
        }
    }

    /// The tests' affinity on web, 198.18.0.0/24, owned by `owner`,
    /// written by `writer`, with `left_ms` to go at [`WALL`].
    fn stored(owner: &str, writer: &str, left_ms: u64) -> StoredAffinity {
        StoredAffinity {
            affinity: SavedAffinity {
                service: "web".into(),
                service_addr: ServiceAddr::tcp("192.0.2.10:80".parse().unwrap()),
                owner: owner.into(),
                client: "198.18.0.0".parse().unwrap(),
                prefix_len: 24,
                ports: PortMatch::Any,
                expires_unix_ms: WALL + left_ms,
                created_unix_ms: WALL - 1000,
                notify: Some(src()),
            },
            writer: writer.into(),
            written_unix_ms: WALL - 20,
        }
    }

    fn create(owner: &str, secs: u32) -> Request<'_> {
        Request::AffinityCreate(op("198.18.0.0", 24, Some(owner), secs))
    }

    fn deferred(r: &Response) -> Ticket {
        match r.payload {
            Payload::Deferred(t) => t,
            _ => panic!("not deferred: {r:?}"),
        }
    }

    #[test]
    fn changes_are_refused_until_the_table_is_loaded() {
        let mut b = bed("i1");
        assert!(!b.sync.ready());
        let r = b.ask("a", create("a", 60), true);
        assert_eq!(r.code, ReturnCode::Unavailable);
        assert!(b.op().is_none(), "nothing sent to the store");
        b.event(StoreEvent::Loaded {
            revision: 1,
            affinities: vec![],
            declarations: Vec::new(),
            ended: Vec::new(),
        });
        b.turn(WALL);
        assert!(b.sync.ready());
        assert_eq!(b.sync.summary().loads, 1);
    }

    #[test]
    fn a_create_waits_for_its_commit_then_is_answered_and_installed() {
        let mut b = loaded("i1", vec![]);
        let r = b.ask("a", create("a", 60), true);
        let t = deferred(&r);
        let Some(StoreOp::Put {
            ticket,
            value,
            expect,
        }) = b.op()
        else {
            panic!("no put")
        };
        assert_eq!((ticket, expect), (t, 0));
        assert_eq!((value.writer.as_str(), value.written_unix_ms), ("i1", WALL));
        assert_eq!(value.affinity.owner, "a");
        assert_eq!(value.affinity.expires_unix_ms, WALL + 60_000);
        assert_eq!(b.lookup(), None, "not installed before the commit");

        let out = b.done(t, Outcome::Committed { revision: 11 }, WALL);
        assert_eq!(out.replies.len(), 1);
        let (rt, resp) = &out.replies[0];
        assert_eq!(
            (*rt, resp.code, resp.remaining_secs),
            (t, ReturnCode::Ok, 60)
        );
        assert_eq!(b.lookup(), Some(1), "a is backend 1");
        assert_eq!(b.sync.counters().committed, 1);

        // The watch's echo of the own commit changes nothing; an extend
        // then expects the revision committed.
        b.event(StoreEvent::Changed {
            revision: 11,
            change: Change::Put(value.clone()),
        });
        b.turn(WALL);
        let r = b.ask(
            "a",
            Request::AffinityExtend(op("198.18.0.0", 24, Some("a"), 120)),
            true,
        );
        deferred(&r);
        match b.op() {
            Some(StoreOp::Put { expect, value, .. }) => {
                assert_eq!(expect, 11);
                assert_eq!(value.affinity.expires_unix_ms, WALL + 120_000);
            }
            other => panic!("no put: {other:?}"),
        }
    }

    /// A reload that takes backend a away.
    fn remove_a(b: &mut Bed) {
        let text = config_text().replace(
            "[[services.backends]]\nname = \"a\"\naddress = \"10.0.0.1\"\n",
            "",
        );
        assert_ne!(text, config_text());
        let cfg = crate::config::Config::parse(&text, "t.toml").unwrap();
        b.plane.replace_services(&cfg).unwrap();
        assert!(b.plane.dataplane().find_backend(WEB, "a").is_none());
    }

    /// The next op is a delete of `key` at `expect`; commits it and
    /// checks that a's client is told BACKEND_REMOVED, once.
    fn deleted_and_notified(b: &mut Bed, value: &StoredAffinity, expect: Revision) {
        let Some(StoreOp::End {
            ticket,
            key,
            expect: at,
        }) = b.op()
        else {
            panic!("no delete")
        };
        assert_eq!((key, at), (value.key(), expect));
        let out = b.done(
            ticket,
            Outcome::Committed {
                revision: expect + 1,
            },
            WALL,
        );
        assert_eq!(out.notices.len(), 1);
        let (to, notice) = &out.notices[0];
        assert_eq!(*to, value.affinity.notify);
        assert_eq!(notice.reason, EndReason::BackendRemoved);
        assert_eq!(notice.owner, "a");
        assert_eq!(b.sync.pending_ends(), 0);
        assert!(b.op().is_none());
        assert_eq!(b.plane.counters().ended_backend_removed, 1);
    }

    #[test]
    fn a_create_whose_backend_a_reload_removed_meanwhile_is_ended_in_the_store() {
        // The commit's outcome before the watch's echo, or after it; or
        // the echo only after the delete has committed.
        for (echo_first, echo_late) in [(false, false), (true, false), (false, true)] {
            let mut b = loaded("i1", vec![]);
            let t = deferred(&b.ask("a", create("a", 60), true));
            let Some(StoreOp::Put { value, .. }) = b.op() else {
                panic!("no put")
            };
            remove_a(&mut b);
            if echo_first {
                b.event(StoreEvent::Changed {
                    revision: 11,
                    change: Change::Put(value.clone()),
                });
            }
            // It committed: answered OK, not installed, deleted from the
            // store at the revision it committed at, and once that commits
            // its owner is told it ended BACKEND_REMOVED.
            let out = b.done(t, Outcome::Committed { revision: 11 }, WALL);
            assert_eq!(out.replies.len(), 1);
            assert_eq!(out.replies[0].1.code, ReturnCode::Ok);
            assert!(out.notices.is_empty(), "the notice waits for the delete");
            assert_eq!(b.lookup(), None);
            assert_eq!(b.sync.pending_ends(), 1);
            deleted_and_notified(&mut b, &value, 11);
            assert_eq!(b.sync.summary().ends_won, 1);
            if echo_late {
                // The put's echo, stale now, then the delete's: nothing
                // more is ended, deleted or counted.
                b.event(StoreEvent::Changed {
                    revision: 11,
                    change: Change::Put(value.clone()),
                });
                b.event(StoreEvent::Changed {
                    revision: 12,
                    change: Change::Deleted(value.key()),
                });
                let out = b.turn(WALL);
                assert!(out.notices.is_empty());
                assert!(b.op().is_none());
                assert_eq!(b.sync.pending_ends(), 0);
                assert_eq!(b.plane.counters().ended_backend_removed, 1);
                assert_eq!(b.lookup(), None);
            }
        }
    }

    #[test]
    fn an_extend_that_commits_after_the_reload_s_delete_was_sent_is_deleted_too() {
        let mut b = loaded("i1", vec![]);
        let t = deferred(&b.ask("a", create("a", 60), true));
        b.op();
        b.done(t, Outcome::Committed { revision: 11 }, WALL);
        assert_eq!(b.lookup(), Some(1));
        let t = deferred(&b.ask(
            "a",
            Request::AffinityExtend(op("198.18.0.0", 24, Some("a"), 120)),
            true,
        ));
        let Some(StoreOp::Put { value, expect, .. }) = b.op() else {
            panic!("no put")
        };
        assert_eq!(expect, 11);
        // The reload ends the affinity at 11: its delete goes out.
        remove_a(&mut b);
        b.turn(WALL);
        let Some(StoreOp::End {
            ticket: del,
            expect: at,
            ..
        }) = b.op()
        else {
            panic!("no delete")
        };
        assert_eq!(at, 11);
        // The extend commits at 12 first, so the delete finds it moved.
        let out = b.done(t, Outcome::Committed { revision: 12 }, WALL);
        assert_eq!(out.replies[0].1.code, ReturnCode::Ok);
        let moved = Outcome::Moved {
            current: Some((value.clone(), 12)),
        };
        let out = b.done(del, moved, WALL);
        assert!(out.notices.is_empty());
        assert_eq!(b.sync.pending_ends(), 1, "the end waits on, for 12");
        deleted_and_notified(&mut b, &value, 12);
    }

    #[test]
    fn a_key_another_owner_won_is_answered_conflict_naming_it() {
        let mut b = loaded("i1", vec![]);
        let t = deferred(&b.ask("a", create("a", 60), true));
        b.op();
        let out = b.done(
            t,
            Outcome::Moved {
                current: Some((stored("b", "i2", 30_000), 12)),
            },
            WALL,
        );
        let (_, r) = &out.replies[0];
        assert_eq!(
            (r.code, r.owner.as_deref(), r.remaining_secs),
            (ReturnCode::Conflict, Some("b"), 30)
        );
        assert_eq!(b.lookup(), Some(2), "the local copy now has b's");
        // The local copy answers the next conflict at once.
        let r = b.ask("a", create("a", 60), true);
        assert_eq!(
            (r.code, r.owner.as_deref()),
            (ReturnCode::Conflict, Some("b"))
        );
        assert!(b.op().is_none());
    }

    #[test]
    fn a_stale_local_copy_is_retried_once_at_the_current_revision() {
        let mut b = loaded("i1", vec![]);
        let t = deferred(&b.ask("a", create("a", 60), true));
        b.op();
        // a already holds it (created through another instance).
        b.done(
            t,
            Outcome::Moved {
                current: Some((stored("a", "i2", 30_000), 12)),
            },
            WALL,
        );
        match b.op() {
            Some(StoreOp::Put { ticket, expect, .. }) => assert_eq!((ticket, expect), (t, 12)),
            other => panic!("no retry: {other:?}"),
        }
        let out = b.done(t, Outcome::Committed { revision: 13 }, WALL);
        assert_eq!(out.replies[0].1.code, ReturnCode::Ok);
        assert_eq!(b.sync.counters().retried, 1);

        // An extend of a key that is gone: NOT_FOUND, and gone here too.
        let t = deferred(&b.ask(
            "a",
            Request::AffinityExtend(op("198.18.0.0", 24, Some("a"), 60)),
            true,
        ));
        b.op();
        let out = b.done(t, Outcome::Moved { current: None }, WALL);
        assert_eq!(out.replies[0].1.code, ReturnCode::NotFound);
        assert_eq!(b.lookup(), None);
    }

    #[test]
    fn the_store_not_answering_is_unavailable() {
        let mut b = loaded("i1", vec![]);
        let t = deferred(&b.ask("a", create("a", 60), true));
        b.op();
        let out = b.done(
            t,
            Outcome::Unavailable {
                error: "timeout".into(),
            },
            WALL,
        );
        assert_eq!(out.replies[0].1.code, ReturnCode::Unavailable);
        assert_eq!(b.lookup(), None);

        // Unreachable: refused at once, nothing sent; still ready.
        b.event(StoreEvent::Unreachable {
            error: "connection refused".into(),
        });
        b.turn(WALL);
        assert!(!b.sync.up() && b.sync.ready());
        let r = b.ask("a", create("a", 60), true);
        assert_eq!(r.code, ReturnCode::Unavailable);
        assert!(b.op().is_none());
        let s = b.sync.summary();
        assert!(!s.store_up);
        assert_eq!(s.last_error.as_deref(), Some("connection refused"));
        assert_eq!(s.changes["unavailable"], 2);
    }

    /// A store unreachable from the start: the summary says why, until a
    /// load.
    #[test]
    fn why_the_store_is_unreachable_is_kept_from_the_start() {
        let mut b = bed("i1");
        assert_eq!(b.sync.summary().last_error, None);
        b.event(StoreEvent::Unreachable {
            error: "connecting to http://127.0.0.1:1: connection refused".into(),
        });
        b.turn(WALL);
        let s = b.sync.summary();
        assert!(!s.store_up && !s.loaded && !b.sync.ready());
        assert_eq!(
            s.last_error.as_deref(),
            Some("connecting to http://127.0.0.1:1: connection refused")
        );
        b.event(StoreEvent::Loaded {
            revision: 10,
            affinities: vec![],
            declarations: Vec::new(),
            ended: Vec::new(),
        });
        b.turn(WALL);
        let s = b.sync.summary();
        assert!(s.store_up && b.sync.ready());
        assert_eq!(s.last_error, None);
    }

    #[test]
    fn no_room_to_park_a_reply_is_unavailable_at_once() {
        let mut b = loaded("i1", vec![]);
        let r = b.ask("a", create("a", 60), false);
        assert_eq!(r.code, ReturnCode::Unavailable);
        assert!(r.message.contains("too many"), "{}", r.message);
        assert!(b.op().is_none());
    }

    #[test]
    fn the_watch_installs_and_removes_without_notices() {
        let mut b = loaded("i1", vec![]);
        b.event(StoreEvent::Changed {
            revision: 11,
            change: Change::Put(stored("b", "i2", 60_000)),
        });
        let out = b.turn(WALL);
        assert_eq!(b.lookup(), Some(2));
        assert!(out.notices.is_empty());
        assert_eq!(b.sync.summary().propagation_ms.count, 1);
        assert_eq!(b.sync.summary().propagation_ms.max, 20);
        // An older revision changes nothing.
        b.event(StoreEvent::Changed {
            revision: 9,
            change: Change::Put(stored("a", "i2", 60_000)),
        });
        b.turn(WALL);
        assert_eq!(b.lookup(), Some(2));
        // So does an older deletion (of the version before 11).
        b.event(StoreEvent::Changed {
            revision: 10,
            change: Change::Deleted(stored("b", "i2", 0).key()),
        });
        b.turn(WALL);
        assert_eq!(b.lookup(), Some(2));
        b.event(StoreEvent::Changed {
            revision: 12,
            change: Change::Deleted(stored("b", "i2", 0).key()),
        });
        let out = b.turn(WALL);
        assert_eq!(b.lookup(), None);
        assert!(out.notices.is_empty());
        assert!(b.plane.take_notices().is_empty());
        assert!(b.op().is_none(), "nothing for the store");
    }

    /// A stored expiry beyond what the service grants here (another
    /// instance's configuration, or a value written by hand) is cut to the
    /// service's longest.
    #[test]
    fn a_stored_expiry_is_cut_to_what_the_service_grants() {
        let mut b = loaded("i1", vec![]);
        let mut far = stored("b", "i2", 60_000);
        far.affinity.expires_unix_ms = u64::MAX;
        b.event(StoreEvent::Changed {
            revision: 11,
            change: Change::Put(far),
        });
        b.turn(WALL);
        assert_eq!(b.lookup(), Some(2));
        let max = b.plane.dataplane().service(WEB).unwrap().max_affinity;
        let left = first_time_left(&b.plane);
        assert!(
            left.is_some_and(|l| l > 0 && u128::from(l) <= max.as_millis()),
            "{left:?} left, the service grants {max:?}"
        );
    }

    #[test]
    fn a_load_replaces_the_table_silently_and_ends_what_is_due() {
        let mut b = loaded("i1", vec![(stored("a", "i1", 60_000), 5)]);
        assert_eq!(b.lookup(), Some(1));
        // Reconnected: the store holds b's instead, and another already due.
        let mut due = stored("b", "i1", 0);
        due.affinity.client = "198.18.9.0".parse().unwrap();
        b.event(StoreEvent::Unreachable {
            error: "gone".into(),
        });
        b.event(StoreEvent::Loaded {
            revision: 20,
            affinities: vec![(stored("b", "i2", 60_000), 15), (due.clone(), 16)],
            declarations: Vec::new(),
            ended: Vec::new(),
        });
        let out = b.turn(WALL);
        assert_eq!(b.lookup(), Some(2));
        assert!(out.notices.is_empty(), "a's was not ended, only resynced");
        assert_eq!(b.plane.affinities().len(), 1, "the due one not installed");
        // The due one, written here, is deleted at once.
        match b.op() {
            Some(StoreOp::End { key, expect, .. }) => {
                assert_eq!((key, expect), (due.key(), 16))
            }
            other => panic!("no delete: {other:?}"),
        }
        let s = b.sync.summary();
        assert_eq!((s.loads, s.store_up, s.revision), (2, true, 20));
    }

    /// A bed holding a's affinity written by `writer`, expired by the
    /// plane's clock 2 s on.
    fn expired(writer: &str) -> Bed {
        let mut b = loaded("i1", vec![(stored("a", writer, 1000), 5)]);
        let later = b.plane.now_ms() + 2000;
        b.plane.expire_at(later);
        assert_eq!(b.lookup(), None, "gone from the local table at once");
        b
    }

    /// [`expired`] by this instance's hand, 2 s on: its end's delete sent.
    fn expired_and_sent(writer: &str) -> (Bed, Ticket) {
        let mut b = expired(writer);
        b.turn(WALL + 2000);
        let Some(StoreOp::End { ticket, .. }) = b.op() else {
            panic!("no delete")
        };
        (b, ticket)
    }

    #[test]
    fn the_writer_ends_an_affinity_at_once_and_notifies_once() {
        let mut b = expired("i1");
        let out = b.turn(WALL + 2000);
        assert!(out.notices.is_empty(), "not before the delete commits");
        let Some(StoreOp::End { ticket, expect, .. }) = b.op() else {
            panic!("no delete")
        };
        assert_eq!(expect, 5);
        assert_eq!(b.sync.pending_ends(), 1);
        let out = b.done(ticket, Outcome::Committed { revision: 21 }, WALL + 2010);
        assert_eq!(out.notices.len(), 1);
        let (to, n) = &out.notices[0];
        assert_eq!(
            (*to, n.owner.as_str(), n.reason),
            (Some(src()), "a", EndReason::Expired)
        );
        assert_eq!(b.sync.pending_ends(), 0);
        // The watch's echo: nothing more.
        b.event(StoreEvent::Changed {
            revision: 21,
            change: Change::Deleted(stored("a", "i1", 0).key()),
        });
        assert!(b.turn(WALL + 2020).notices.is_empty());
        assert_eq!(b.sync.counters().ends_won, 1);
    }

    #[test]
    fn a_delete_that_lost_sends_no_notice() {
        let (mut b, ticket) = expired_and_sent("i1");
        // Extended through another instance meanwhile: it lives on.
        let out = b.done(
            ticket,
            Outcome::Moved {
                current: Some((stored("a", "i2", 60_000), 7)),
            },
            WALL + 2000,
        );
        assert!(out.notices.is_empty());
        assert_eq!(b.lookup(), Some(1), "reinstalled");
        assert_eq!(b.sync.counters().ends_lost, 1);
        assert_eq!(b.sync.pending_ends(), 0);
    }

    #[test]
    fn another_instance_takes_over_only_after_the_delay_and_if_unchanged() {
        // Written by i2: i1 waits.
        let mut b = expired("i2");
        b.turn(WALL + 2000);
        assert!(b.op().is_none(), "the writer goes first");
        b.turn(WALL + 2000 + TAKEOVER_DELAY_MS - 1);
        assert!(b.op().is_none());
        b.turn(WALL + 2000 + TAKEOVER_DELAY_MS);
        match b.op() {
            Some(StoreOp::End { expect, .. }) => assert_eq!(expect, 5),
            other => panic!("no takeover: {other:?}"),
        }

        // The writer ends it in time: no delete from here, no notice.
        let mut b = expired("i2");
        b.turn(WALL + 2000);
        b.event(StoreEvent::Changed {
            revision: 6,
            change: Change::Deleted(stored("a", "i2", 0).key()),
        });
        let out = b.turn(WALL + 2100);
        b.turn(WALL + 3000);
        assert!(b.op().is_none() && out.notices.is_empty());
        assert_eq!(b.sync.pending_ends(), 0);

        // Extended by its writer before the delay: it lives on.
        let mut b = expired("i2");
        b.turn(WALL + 2000);
        b.event(StoreEvent::Changed {
            revision: 6,
            change: Change::Put(stored("a", "i2", 60_000)),
        });
        b.turn(WALL + 2100);
        b.turn(WALL + 3000);
        assert!(b.op().is_none());
        assert_eq!(b.lookup(), Some(1));
    }

    #[test]
    fn an_ended_affinity_this_instance_replaces_with_another_owner_s_is_notified_here() {
        // Written by i2, ended here; its delete waits for the takeover
        // delay when a create for b takes the key, here.
        let mut b = expired("i2");
        b.turn(WALL + 2000);
        let t = deferred(&b.ask("b", create("b", 60), true));
        let Some(StoreOp::Put { expect, .. }) = b.op() else {
            panic!("no put")
        };
        assert_eq!(expect, 5, "the key as it was when it ended");
        let out = b.done(t, Outcome::Committed { revision: 6 }, WALL + 2100);
        assert_eq!(out.replies[0].1.code, ReturnCode::Ok);
        // No delete will settle a's affinity (i2's would find the key
        // moved): its notice goes now, once, from here.
        assert_eq!(out.notices.len(), 1, "{:?}", out.notices);
        let (to, notice) = &out.notices[0];
        assert_eq!(*to, Some(src()));
        assert_eq!(
            (notice.owner.as_str(), notice.reason),
            ("a", EndReason::Expired)
        );
        assert_eq!(b.sync.pending_ends(), 0);
        assert_eq!(b.sync.summary().ends_won, 1);
        assert_eq!(b.lookup(), Some(2), "b's affinity stands");
        b.turn(WALL + 3000);
        assert!(b.op().is_none(), "no delete of b's affinity");
    }

    /// An ended affinity whose writer deleted it before this instance's
    /// watch told of it, when a create for another owner takes the key
    /// here: the create finds the key gone and is sent again against no
    /// key. The writer notified the end: no notice from here.
    #[test]
    fn an_ended_affinity_deleted_elsewhere_before_this_instance_s_create_is_not_notified_here() {
        let mut b = expired("i2");
        b.turn(WALL + 2000);
        let t = deferred(&b.ask("b", create("b", 60), true));
        let Some(StoreOp::Put { expect, .. }) = b.op() else {
            panic!("no put")
        };
        assert_eq!(expect, 5);
        let out = b.done(t, Outcome::Moved { current: None }, WALL + 2100);
        assert!(out.notices.is_empty() && out.replies.is_empty());
        let Some(StoreOp::Put { ticket, expect, .. }) = b.op() else {
            panic!("not sent again")
        };
        assert_eq!(expect, 0, "against no key");
        let out = b.done(ticket, Outcome::Committed { revision: 7 }, WALL + 2110);
        assert_eq!(out.replies[0].1.code, ReturnCode::Ok);
        assert!(out.notices.is_empty(), "i2 notified: {:?}", out.notices);
        assert_eq!(b.sync.pending_ends(), 0);
        assert_eq!(b.sync.counters().ends_lost, 1);
        assert_eq!(b.lookup(), Some(2), "b's affinity stands");
        b.turn(WALL + 3000);
        assert!(b.op().is_none(), "no delete of b's affinity");
    }

    #[test]
    fn ends_wait_while_the_store_is_unreachable() {
        let mut b = loaded("i1", vec![(stored("a", "i1", 1000), 5)]);
        b.event(StoreEvent::Unreachable {
            error: "down".into(),
        });
        b.turn(WALL);
        let later = b.plane.now_ms() + 2000;
        b.plane.expire_at(later);
        assert_eq!(b.lookup(), None, "expiry goes on");
        b.turn(WALL + 2000);
        assert!(b.op().is_none(), "no delete while unreachable");
        assert_eq!(b.sync.pending_ends(), 1);
        // Back: the load still has it at revision 5, so it is deleted now.
        b.event(StoreEvent::Loaded {
            revision: 8,
            affinities: vec![(stored("a", "i1", 1000), 5)],
            declarations: Vec::new(),
            ended: Vec::new(),
        });
        b.turn(WALL + 3000);
        assert_eq!(b.lookup(), None, "not installed again");
        match b.op() {
            Some(StoreOp::End { expect, .. }) => assert_eq!(expect, 5),
            other => panic!("no delete: {other:?}"),
        }
    }

    /// A store that answers but refuses the delete (etcd's NOSPACE alarm):
    /// the end is tried again while the connection stays up, and notified
    /// once the delete commits.
    #[test]
    fn a_delete_a_reachable_store_refuses_is_sent_again() {
        let (mut b, ticket) = expired_and_sent("i1");
        let full = Outcome::Unavailable {
            error: "etcdserver: mvcc: database space exceeded".into(),
        };
        assert!(b.done(ticket, full, WALL + 2010).notices.is_empty());
        b.turn(WALL + 2500);
        assert!(b.op().is_none(), "not at once");
        assert_eq!(b.sync.pending_ends(), 1);
        b.turn(WALL + 2010 + END_RETRY_MS);
        let Some(StoreOp::End { ticket, expect, .. }) = b.op() else {
            panic!("not sent again")
        };
        assert_eq!(expect, 5);
        // Refused again: twice the wait.
        let full = Outcome::Unavailable {
            error: "etcdserver: mvcc: database space exceeded".into(),
        };
        let at = WALL + 3020;
        assert!(b.done(ticket, full, at).notices.is_empty());
        b.turn(at + END_RETRY_MS);
        assert!(b.op().is_none(), "not after one wait");
        b.turn(at + 2 * END_RETRY_MS);
        let Some(StoreOp::End { ticket, .. }) = b.op() else {
            panic!("not sent a third time")
        };
        let out = b.done(ticket, Outcome::Committed { revision: 30 }, WALL + 5100);
        assert_eq!(out.notices.len(), 1);
        assert_eq!(b.sync.pending_ends(), 0);
        assert_eq!(b.sync.counters().ends_won, 1);
    }

    /// The connection lost with the delete in flight: its outcome, then the
    /// outage, park the end until the next load.
    #[test]
    fn a_delete_lost_with_the_connection_waits_for_the_load() {
        let (mut b, ticket) = expired_and_sent("i1");
        let lost = Outcome::Unavailable {
            error: "connection reset".into(),
        };
        b.done(ticket, lost, WALL + 2010);
        b.event(StoreEvent::Unreachable {
            error: "connection reset".into(),
        });
        b.turn(WALL + 2010 + 5 * END_RETRY_MS);
        assert!(b.op().is_none(), "nothing while unreachable");
        b.event(StoreEvent::Loaded {
            revision: 9,
            affinities: vec![(stored("a", "i1", 1000), 5)],
            declarations: Vec::new(),
            ended: Vec::new(),
        });
        b.turn(WALL + 9000);
        match b.op() {
            Some(StoreOp::End { expect, .. }) => assert_eq!(expect, 5),
            other => panic!("no delete after the load: {other:?}"),
        }
    }

    /// The delete committed but its answer was lost with the connection:
    /// the load finds this instance's mark and the notice goes then, once;
    /// without the mark (or with one for another version of the key) the
    /// end was another instance's.
    #[test]
    fn a_delete_committed_with_its_answer_lost_is_notified_from_its_mark() {
        let key = stored("a", "i1", 0).key();
        for (marks, won) in [
            (vec![(key.clone(), 5)], true),
            (vec![], false),
            (vec![(key.clone(), 4)], false),
        ] {
            let (mut b, ticket) = expired_and_sent("i1");
            let lost = Outcome::Unavailable {
                error: "connection reset".into(),
            };
            assert!(b.done(ticket, lost, WALL + 2010).notices.is_empty());
            b.event(StoreEvent::Unreachable {
                error: "connection reset".into(),
            });
            b.turn(WALL + 2020);
            b.event(StoreEvent::Loaded {
                revision: 9,
                affinities: vec![],
                declarations: Vec::new(),
                ended: marks.clone(),
            });
            let out = b.turn(WALL + 3000);
            assert_eq!(out.notices.len(), usize::from(won), "{marks:?}");
            if won {
                let (to, n) = &out.notices[0];
                assert_eq!((*to, n.reason), (Some(src()), EndReason::Expired));
            }
            let c = b.sync.counters();
            assert_eq!((c.ends_won, c.ends_lost), (u64::from(won), u64::from(!won)));
            assert_eq!(b.sync.pending_ends(), 0);
            assert!(b.op().is_none());
            // A later load with the mark still there sends nothing more.
            b.event(StoreEvent::Loaded {
                revision: 10,
                affinities: vec![],
                declarations: Vec::new(),
                ended: marks,
            });
            assert!(b.turn(WALL + 4000).notices.is_empty());
        }
    }

    /// The watch shows this instance's mark, then the deletion: the notice
    /// goes once, whether the delete's answer came before as an error (a
    /// store that answered but could not say) or comes after as Committed.
    #[test]
    fn an_end_the_watch_shows_committed_is_notified_once_whatever_its_answer() {
        let key = stored("a", "i1", 0).key();
        for answer in [
            Outcome::Unavailable {
                error: "timed out".into(),
            },
            Outcome::Committed { revision: 21 },
        ] {
            let (mut b, ticket) = expired_and_sent("i1");
            let timed_out = matches!(answer, Outcome::Unavailable { .. });
            if timed_out {
                assert!(b
                    .done(ticket, answer.clone(), WALL + 2010)
                    .notices
                    .is_empty());
            }
            // Another version's end (a mark that is not this one's) is
            // not this end.
            b.event(StoreEvent::Changed {
                revision: 20,
                change: Change::Ended {
                    key: key.clone(),
                    expect: 4,
                },
            });
            assert!(b.turn(WALL + 2015).notices.is_empty());
            b.marked_and_deleted(&key, 5, 21);
            let out = b.turn(WALL + 2020);
            assert_eq!(out.notices.len(), 1, "{answer:?}");
            if !timed_out {
                assert!(b
                    .done(ticket, answer.clone(), WALL + 2030)
                    .notices
                    .is_empty());
            }
            // Nothing is sent again, nor kept.
            assert!(b.turn(WALL + 60_000).notices.is_empty());
            assert!(b.op().is_none());
            let c = b.sync.counters();
            assert_eq!((c.ends_won, c.ends_lost), (1, 0));
            assert!(b.sync.deleted.is_empty(), "{:?}", b.sync.deleted);
        }
    }

    /// The watch settles an end (its mark), the key is created again, and
    /// only then does the old delete's answer come: it settles nothing of
    /// the new affinity, which ends through the store in its turn.
    #[test]
    fn a_late_answer_leaves_the_key_s_next_affinity_alone() {
        let key = stored("a", "i1", 0).key();
        for late in [
            Outcome::Committed { revision: 21 },
            Outcome::Moved {
                current: Some((stored("a", "i2", 60_000), 22)),
            },
            Outcome::Unavailable {
                error: "timed out".into(),
            },
        ] {
            let (mut b, ticket) = expired_and_sent("i1");
            b.marked_and_deleted(&key, 5, 21);
            b.event(StoreEvent::Changed {
                revision: 22,
                change: Change::Put(stored("a", "i2", 60_000)),
            });
            assert_eq!(b.turn(WALL + 2010).notices.len(), 1);
            assert_eq!(b.lookup(), Some(1), "the new affinity");
            let out = b.done(ticket, late.clone(), WALL + 2020);
            assert!(out.notices.is_empty(), "{late:?}");
            assert_eq!(b.lookup(), Some(1), "{late:?}");
            assert!(b.sync.deleted.is_empty(), "{late:?}: the watch echoed it");
            let c = b.sync.counters();
            assert_eq!((c.ends_won, c.ends_lost), (1, 0), "{late:?}");
            // The new affinity's end: through the store (its writer's
            // delay first), not "never stored" and notified at once.
            let later = b.plane.now_ms() + 61_000;
            b.plane.expire_at(later);
            assert!(b.turn(WALL + 63_000).notices.is_empty(), "{late:?}");
            assert!(b.op().is_none(), "{late:?}: the writer's turn first");
            b.turn(WALL + 63_000 + TAKEOVER_DELAY_MS);
            match b.op() {
                Some(StoreOp::End { expect, .. }) => assert_eq!(expect, 22, "{late:?}"),
                other => panic!("{late:?}: no delete of the new one: {other:?}"),
            }
        }
    }

    #[test]
    fn a_delete_in_flight_over_a_reconnection_is_not_undone_by_the_load() {
        let (mut b, ticket) = expired_and_sent("i1");
        b.event(StoreEvent::Unreachable {
            error: "blip".into(),
        });
        b.event(StoreEvent::Loaded {
            revision: 9,
            affinities: vec![(stored("a", "i1", 1000), 5)],
            declarations: Vec::new(),
            ended: Vec::new(),
        });
        b.turn(WALL + 2100);
        assert_eq!(b.lookup(), None, "ended here: not installed again");
        let out = b.done(ticket, Outcome::Committed { revision: 10 }, WALL + 2200);
        assert_eq!(out.notices.len(), 1);
        assert_eq!(b.lookup(), None);
        assert_eq!(b.sync.pending_ends(), 0);
    }

    #[test]
    fn a_cancel_commits_with_the_request_and_the_canceller_notifies() {
        let mut b = loaded("i1", vec![(stored("a", "i2", 60_000), 5)]);
        let cancel = Request::AffinityCancel(op("198.18.0.0", 24, Some("a"), 0));
        let t = deferred(&b.ask("a", cancel, true));
        match b.op() {
            Some(StoreOp::Delete { ticket, expect, .. }) => assert_eq!((ticket, expect), (t, 5)),
            other => panic!("no delete: {other:?}"),
        }
        assert_eq!(b.lookup(), Some(1), "until committed");
        let out = b.done(t, Outcome::Committed { revision: 6 }, WALL);
        assert_eq!(out.replies[0].1.code, ReturnCode::Ok);
        assert_eq!(out.notices.len(), 1);
        assert_eq!(out.notices[0].1.reason, EndReason::Cancelled);
        assert_eq!(b.lookup(), None);

        // b may not cancel a's; a cancel of a key gone is NOT_FOUND.
        let mut b = loaded("i1", vec![(stored("a", "i2", 60_000), 5)]);
        let r = b.ask(
            "b",
            Request::AffinityCancel(op("198.18.0.0", 24, Some("b"), 0)),
            true,
        );
        assert_eq!(
            (r.code, r.owner.as_deref()),
            (ReturnCode::Conflict, Some("a"))
        );
        let t = deferred(&b.ask(
            "a",
            Request::AffinityCancel(op("198.18.0.0", 24, Some("a"), 0)),
            true,
        ));
        b.op();
        let out = b.done(t, Outcome::Moved { current: None }, WALL);
        assert_eq!(out.replies[0].1.code, ReturnCode::NotFound);
        assert!(out.notices.is_empty(), "whoever ended it notified");
    }

    #[test]
    fn replies_in_flight_at_shutdown_are_unavailable() {
        let mut b = loaded("i1", vec![]);
        let t = deferred(&b.ask("a", create("a", 60), true));
        let replies = b.sync.shutdown();
        assert_eq!(replies.len(), 1);
        assert_eq!(
            (replies[0].0, replies[0].1.code),
            (t, ReturnCode::Unavailable)
        );
    }

    #[test]
    fn a_static_affinity_of_another_backend_keeps_a_store_one_out() {
        let text = format!(
            "{}\n[[affinities]]\nservice = \"web\"\nclient = \"198.18.0.0/24\"\nbackend = \"b\"\n",
            config_text()
        );
        let (mut plane, reader) = plane(&text);
        crate::control::statics::install(&mut plane, &Config::parse(&text, "t").unwrap()).unwrap();
        let (handle, peer) = StoreHandle::pair();
        let mut sync = StoreSync::new(handle, "i1", &mut plane);
        for rev in [5, 6] {
            peer.events
                .send(StoreEvent::Changed {
                    revision: rev,
                    change: Change::Put(stored("a", "i2", 60_000)),
                })
                .unwrap();
        }
        sync.turn(&mut plane, WALL);
        assert_eq!(
            reader.lookup(WEB, Family::V4, CLIENT, 1),
            Some(2),
            "b's static"
        );
        assert_eq!(sync.summary().static_refused, 2);
    }

    /// A store affinity the local table has no room for is counted (and
    /// logged), not lost silently: the other instances may hold it.
    #[test]
    fn a_full_local_table_counts_what_it_cannot_install() {
        let (mut plane, _reader) = plane(&config_text());
        let (handle, peer) = StoreHandle::pair();
        let mut sync = StoreSync::new(handle, "i1", &mut plane);
        let n = 1100u32;
        for i in 0..n {
            let mut s = stored("a", "i2", 60_000);
            s.affinity.client = [198, 18, (i >> 8) as u8, i as u8].into();
            s.affinity.prefix_len = 32;
            peer.events
                .send(StoreEvent::Changed {
                    revision: 5 + i64::from(i),
                    change: Change::Put(s),
                })
                .unwrap();
        }
        sync.turn(&mut plane, WALL);
        let c = sync.summary();
        let installed = plane.affinities().len() as u64;
        assert!(installed <= 1024, "{installed}");
        assert!(c.table_full >= 76, "{}", c.table_full);
        assert_eq!(installed + c.table_full, u64::from(n));
    }

    /// A create that no table could hold (this one, and every other
    /// instance's, installs what the store holds) is refused with
    /// TABLE_FULL before it reaches the store; what is already there can
    /// still be extended.
    #[test]
    fn a_create_the_local_table_has_no_room_for_is_refused() {
        let mut b = loaded("i1", a_s_hosts(0));
        let table = b.plane.affinities();
        assert_eq!(table.len(), table.capacity());
        // b holds none yet; the admin is held to no quota.
        for who in ["b", ADMIN_NAME] {
            let req = Request::AffinityCreate(op("198.18.100.0", 24, Some("b"), 60));
            let r = b.ask(who, req, true);
            assert_eq!(r.code, ReturnCode::TableFull, "{who}: {r:?}");
            assert!(b.op().is_none(), "nothing sent to the store");
        }
        let r = b.ask(
            "a",
            Request::AffinityExtend(op("198.18.0.5", 32, Some("a"), 60)),
            true,
        );
        deferred(&r);
        assert!(matches!(b.op(), Some(StoreOp::Put { expect: 5, .. })));
    }

    /// The 1,024 /32s 198.18.0.0 to 198.18.3.255 of a, less the first
    /// `spared`, as the store holds them.
    fn a_s_hosts(spared: u32) -> Vec<(StoredAffinity, Revision)> {
        (spared..1024u32)
            .map(|i| {
                let mut s = stored("a", "i2", 60_000);
                s.affinity.client = [198, 18, (i >> 8) as u8, i as u8].into();
                s.affinity.prefix_len = 32;
                (s, 5)
            })
            .collect()
    }

    /// The next op's ticket, a put.
    fn put_ticket(b: &mut Bed) -> Ticket {
        match b.op() {
            Some(StoreOp::Put { ticket, .. }) => ticket,
            other => panic!("no put: {other:?}"),
        }
    }

    /// Creates waiting for the store count as held: a burst of them at one
    /// instance cannot pass, together, the owner's quota, the overlap rule
    /// or the table's room, each of which one alone would pass.
    #[test]
    fn creates_in_flight_count_against_quota_overlap_and_room() {
        let text = config_text().replace(
            "max_affinity_duration = \"10m\"",
            "max_affinity_duration = \"10m\"\nmax_affinities_per_backend = 2",
        );
        let mut b = loaded_of("i1", &text, vec![]);
        let host = |n: u8| Request::AffinityCreate(op_of(&format!("198.18.9.{n}"), 32, "a"));
        let first = deferred(&b.ask("a", host(1), true));
        let t1 = put_ticket(&mut b);
        deferred(&b.ask("a", host(2), true));
        let t2 = put_ticket(&mut b);
        let r = b.ask("a", host(3), true);
        assert_eq!(r.code, ReturnCode::QuotaExceeded, "{r:?}");
        assert!(b.op().is_none());
        // The same key again is a renewal, not one more.
        deferred(&b.ask("a", host(1), true));
        let t1b = put_ticket(&mut b);
        // b may not pin a client inside a's /32 in flight.
        let r = b.ask(
            "b",
            Request::AffinityCreate(op_of("198.18.9.0", 24, "b")),
            true,
        );
        assert_eq!(
            (r.code, r.owner.as_deref()),
            (ReturnCode::Conflict, Some("a")),
            "{r:?}"
        );
        assert_eq!(r.remaining_secs, 60);
        // One commits (installed: still two held), the other fails.
        assert_eq!(first, t1);
        b.done(t1, Outcome::Committed { revision: 11 }, WALL);
        b.done(t1b, Outcome::Committed { revision: 12 }, WALL);
        let r = b.ask("a", host(3), true);
        assert_eq!(r.code, ReturnCode::QuotaExceeded, "{r:?}");
        let unavailable = Outcome::Unavailable {
            error: "timed out".into(),
        };
        b.done(t2, unavailable, WALL);
        deferred(&b.ask("a", host(3), true));
        put_ticket(&mut b);

        // Room: a table one key short of full takes one create in flight.
        let mut b = loaded("i1", a_s_hosts(1));
        assert_eq!(b.plane.affinities().len(), 1023);
        deferred(&b.ask(
            ADMIN_NAME,
            Request::AffinityCreate(op_of("198.18.9.1", 32, "b")),
            true,
        ));
        let t = put_ticket(&mut b);
        let r = b.ask(
            ADMIN_NAME,
            Request::AffinityCreate(op_of("198.18.9.2", 32, "b")),
            true,
        );
        assert_eq!(r.code, ReturnCode::TableFull, "{r:?}");
        b.done(
            t,
            Outcome::Unavailable {
                error: "down".into(),
            },
            WALL,
        );
        deferred(&b.ask(
            ADMIN_NAME,
            Request::AffinityCreate(op_of("198.18.9.2", 32, "b")),
            true,
        ));
    }

    /// A create of `client/plen` on web for `owner`, 60 s.
    fn op_of<'a>(client: &str, plen: u8, owner: &'a str) -> AffinityOp<'a> {
        op(client, plen, Some(owner), 60)
    }

    use crate::config::Config;

    /// The state backend `name` of web is in.
    fn state_of(b: &Bed, name: &str) -> BackendState {
        let (id, _, _) = b
            .plane
            .registry()
            .backends()
            .find(|(_, s, x)| *s == "web" && x.name == name)
            .expect("backend");
        b.plane
            .dataplane()
            .backend(id)
            .expect("in the snapshot")
            .state
    }

    fn state_req(backend: Option<&str>, state: Declared) -> Request<'_> {
        Request::BackendState {
            service: backend.map(|_| "web"),
            backend,
            state,
        }
    }

    fn decl(backend: &str, by_admin: bool) -> DeclarationKey {
        DeclarationKey {
            service: "web".into(),
            backend: backend.into(),
            by_admin,
        }
    }

    /// The declaration op the store got: its ticket and what it writes.
    fn declare_op(b: &mut Bed) -> (Ticket, StoredDeclaration) {
        match b.op() {
            Some(StoreOp::Declare { ticket, value }) => (ticket, value),
            o => panic!("not a declaration: {o:?}"),
        }
    }

    #[test]
    fn a_backend_state_is_declared_through_the_store_and_answered_once_committed() {
        // Before the first load: nothing is declared, and nothing sent.
        let mut b = bed("i1");
        let r = b.ask("a", state_req(None, Declared::Drain), true);
        assert_eq!(r.code, ReturnCode::Unavailable, "{r:?}");
        assert!(b.op().is_none());

        let mut b = loaded("i1", vec![]);
        let r = b.ask("a", state_req(None, Declared::Drain), true);
        let reply = deferred(&r);
        let (ticket, value) = declare_op(&mut b);
        assert_eq!(
            (value.key, value.state, value.writer.as_str()),
            (decl("a", false), Declared::Drain, "i1")
        );
        // Not applied before the store commits it.
        assert_eq!(state_of(&b, "a"), BackendState::Up);
        let out = b.done(ticket, Outcome::Committed { revision: 11 }, WALL);
        assert_eq!(out.replies.len(), 1);
        let (t, r) = &out.replies[0];
        assert_eq!((*t, r.code), (reply, ReturnCode::Ok), "{r:?}");
        assert_eq!(r.message, "web/a draining");
        assert_eq!(state_of(&b, "a"), BackendState::Draining);

        // The operator's declaration is a key of its own; an outcome the
        // store could not confirm is UNAVAILABLE, and nothing changes.
        let r = b.ask(ADMIN_NAME, state_req(Some("b"), Declared::Down), true);
        let reply = deferred(&r);
        let (ticket, value) = declare_op(&mut b);
        assert_eq!(value.key, decl("b", true));
        let out = b.done(
            ticket,
            Outcome::Unavailable {
                error: "timed out".into(),
            },
            WALL,
        );
        assert_eq!(out.replies[0].0, reply);
        assert_eq!(out.replies[0].1.code, ReturnCode::Unavailable);
        assert_eq!(state_of(&b, "b"), BackendState::Up);

        // Refused here as a lone instance refuses them, without the store.
        for (sender, req, code) in [
            (
                "a",
                state_req(Some("b"), Declared::Down),
                ReturnCode::NotAuthorized,
            ),
            (
                ADMIN_NAME,
                state_req(Some("zz"), Declared::Down),
                ReturnCode::NotFound,
            ),
            (
                ADMIN_NAME,
                state_req(None, Declared::Down),
                ReturnCode::Invalid,
            ),
        ] {
            let r = b.ask(sender, req, true);
            assert_eq!(r.code, code, "{r:?}");
        }
        assert!(b.op().is_none());
        // No room to park the reply: UNAVAILABLE at once.
        let r = b.ask("b", state_req(None, Declared::Drain), false);
        assert_eq!(r.code, ReturnCode::Unavailable);
        assert!(b.op().is_none());
    }

    #[test]
    fn declarations_apply_in_store_order_and_a_load_replaces_them() {
        let mut b = loaded("i1", vec![]);
        // Another instance's declaration, from the watch.
        b.event(StoreEvent::Changed {
            revision: 12,
            change: Change::Declared {
                key: decl("b", true),
                state: Declared::Drain,
            },
        });
        b.turn(WALL);
        assert_eq!(state_of(&b, "b"), BackendState::Draining);

        // This instance's DRAIN commits at 13, but the watch brought a's
        // UP of 14 first: the older outcome does not undo the newer one.
        let reply = deferred(&b.ask("a", state_req(None, Declared::Drain), true));
        let (ticket, _) = declare_op(&mut b);
        b.event(StoreEvent::Changed {
            revision: 14,
            change: Change::Declared {
                key: decl("a", false),
                state: Declared::Up,
            },
        });
        let out = b.done(ticket, Outcome::Committed { revision: 13 }, WALL);
        assert_eq!(out.replies[0].0, reply);
        assert_eq!(out.replies[0].1.message, "web/a up");
        assert_eq!(state_of(&b, "a"), BackendState::Up);

        // A load replaces them all: b's drain is gone (up again), a is
        // down; a backend not configured here is kept for a reload.
        let stored = |key: DeclarationKey, state| StoredDeclaration {
            key,
            state,
            writer: "i2".into(),
            written_unix_ms: WALL,
        };
        b.event(StoreEvent::Loaded {
            revision: 20,
            affinities: vec![],
            declarations: vec![
                (stored(decl("a", false), Declared::Down), 18),
                (stored(decl("zz", true), Declared::Drain), 19),
            ],
            ended: Vec::new(),
        });
        b.turn(WALL);
        assert_eq!(state_of(&b, "a"), BackendState::Down);
        assert_eq!(state_of(&b, "b"), BackendState::Up);
        // Outcomes older than the load are in it already.
        b.event(StoreEvent::Changed {
            revision: 17,
            change: Change::Declared {
                key: decl("b", false),
                state: Declared::Down,
            },
        });
        b.turn(WALL);
        assert_eq!(state_of(&b, "b"), BackendState::Up);
        // A backend of that name added at run time takes the cluster's
        // declaration.
        let add = Request::BackendAdd(crate::protocol::message::BackendSpec {
            service: "web",
            backend: "zz",
            addr: "10.0.0.9".parse().unwrap(),
            mac: None,
            weight: 100,
        });
        assert_eq!(b.ask(ADMIN_NAME, add, true).code, ReturnCode::Ok);
        assert_eq!(state_of(&b, "zz"), BackendState::Draining);
    }

    #[test]
    fn one_request_for_several_services_is_answered_once_for_all() {
        let mut b = loaded("i1", vec![]);
        // Backend a in a second service too.
        let add = Request::BackendAdd(crate::protocol::message::BackendSpec {
            service: "mail",
            backend: "a",
            addr: "10.0.2.9".parse().unwrap(),
            weight: 100,
            mac: None,
        });
        assert_eq!(b.ask(ADMIN_NAME, add, true).code, ReturnCode::Ok);
        // All of them committed: one OK listing both.
        let reply = deferred(&b.ask("a", state_req(None, Declared::Drain), true));
        let (t1, d1) = declare_op(&mut b);
        let (t2, d2) = declare_op(&mut b);
        let mut services = [d1.key.service.as_str(), d2.key.service.as_str()];
        services.sort();
        assert_eq!(services, ["mail", "web"]);
        assert!(b
            .done(t1, Outcome::Committed { revision: 11 }, WALL)
            .replies
            .is_empty());
        let out = b.done(t2, Outcome::Committed { revision: 12 }, WALL);
        assert_eq!(out.replies.len(), 1);
        let (t, r) = &out.replies[0];
        assert_eq!((*t, r.code), (reply, ReturnCode::Ok));
        assert!(
            r.message.contains("web/a draining") && r.message.contains("mail/a draining"),
            "{}",
            r.message
        );
        // One of them not confirmed: UNAVAILABLE, once, after both.
        let reply = deferred(&b.ask("a", state_req(None, Declared::Up), true));
        let (t1, _) = declare_op(&mut b);
        let (t2, _) = declare_op(&mut b);
        let lost = Outcome::Unavailable {
            error: "timed out".into(),
        };
        assert!(b.done(t1, lost, WALL).replies.is_empty());
        let out = b.done(t2, Outcome::Committed { revision: 13 }, WALL);
        assert_eq!(out.replies.len(), 1);
        assert_eq!(out.replies[0].0, reply);
        assert_eq!(out.replies[0].1.code, ReturnCode::Unavailable);
        // A declaration in flight at shutdown: UNAVAILABLE, and only once.
        let reply = deferred(&b.ask("b", state_req(None, Declared::Drain), true));
        let (ticket, _) = declare_op(&mut b);
        let replies = b.sync.shutdown();
        assert_eq!(replies.len(), 1);
        assert_eq!(
            (replies[0].0, replies[0].1.code),
            (reply, ReturnCode::Unavailable)
        );
        let out = b.done(ticket, Outcome::Committed { revision: 14 }, WALL);
        assert!(out.replies.is_empty(), "{:?}", out.replies);
    }
}
