//! The control plane: the state behind the affinity and backend requests.
//!
//! [`ControlPlane`] holds the service registry, the affinity manager (the
//! only writer of the lock-free affinity table) and the dataplane cell the
//! workers read. It answers affinity and backend requests, enforcing who may
//! do what, keeps each backend's state (health, what the application and
//! the operator declared: [`BackendStates`]) and puts it in the snapshot,
//! publishes a new snapshot after each change, expires affinities, ends
//! the requested affinities of backends down past their service's
//! `affinity_grace`, and turns every affinity that ends into a notice for
//! its owner.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::affinity::key::TableKey;
use crate::affinity::limits::OverlapPolicy;
use crate::affinity::manager::{AffinityManager, Ended, Record};
use crate::affinity::table::SLOTS;
use crate::affinity::AffinityError;
use crate::cluster::DeclarationKey;
use crate::config::{AllUnhealthy, Config};
use crate::control::backend_state::{BackendStates, BackendStatus, StateChange};
use crate::control::counters::{LimitCounters, PlaneCounters};
use crate::control::handler::Response;
use crate::control::registry::{NewBackend, RegistryError, ServiceRegistry};
use crate::control::state_file::{SavedAffinity, SavedState};
use crate::datapath::counters::WorkerCounters;
use crate::datapath::latency::{new_histogram, Percentiles};
use crate::datapath::snapshot::{Dataplane, DataplaneCell, Service};
use crate::net::ip_bits;
use crate::protocol::message::{
    AffinityEntry, AffinityKey, AffinityOp, BackendEntry, EndedNotice, Request, ReturnCode,
    ServiceAddr,
};
use crate::report::summary::{CounterBase, Summary};
use crate::types::{BackendId, BackendState, Declared, EndReason, Family, PortMatch, ServiceId};

mod shared;
pub use shared::{Installed, PendingCreates, Planned, SharedEnd};

/// What [`ControlPlane::restore`] did with a state file's affinities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Installed with the time they had left.
    pub installed: usize,
    /// Expired while the instance was stopped.
    pub expired: usize,
    /// Their service or backend is no longer configured.
    pub gone: usize,
    /// Not installable: a static affinity of another backend holds the key,
    /// or the table is full.
    pub refused: usize,
}

/// One health verdict for [`ControlPlane::set_backends_health`]: backend
/// `backend` of `service` passes its checks (`up`), fails them (`error`
/// says why), or is up unchecked (`up` with an `error`: its checks
/// stopped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthVerdict<'a> {
    pub service: &'a str,
    pub backend: &'a str,
    pub up: bool,
    pub error: Option<String>,
}

/// What an affinity request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AffinityAction {
    Create,
    Extend,
    Cancel,
}

/// An affinity request that passed every check that does not change the
/// table.
#[derive(Clone, Copy, Debug)]
struct Checked {
    key: TableKey,
    /// None: the operator cancels whoever owns it.
    owner: Option<BackendId>,
    /// The duration asked for (create and extend).
    duration_ms: u64,
    /// The plane's clock when checked.
    now: u64,
}

/// Which of a service's limits refused a backend's create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Limit {
    MinPrefix,
    Quota,
    Overlap,
}

impl Limit {
    fn counter(self, c: &mut LimitCounters) -> &mut u64 {
        match self {
            Limit::MinPrefix => &mut c.min_prefix,
            Limit::Quota => &mut c.quota,
            Limit::Overlap => &mut c.overlap,
        }
    }
}

/// The state of the control thread behind the affinity and backend
/// requests.
pub struct ControlPlane {
    registry: ServiceRegistry,
    cell: Arc<DataplaneCell>,
    dp: Arc<Dataplane>,
    affinities: AffinityManager,
    workers: Vec<Arc<WorkerCounters>>,
    /// Where the figures of reused service and backend ids start.
    counter_base: CounterBase,
    epoch: Instant,
    /// Ended affinities, resolved to notices while their owner's name is
    /// still known: (where to send, notice).
    notices: Vec<(Option<SocketAddr>, EndedNotice)>,
    counters: PlaneCounters,
    /// How long ended affinities lived (ms).
    lifetimes: hdrhistogram::Histogram<u64>,
    /// Each backend's state and what it is combined from.
    states: BackendStates,
    /// Cluster mode: ended affinities wait here with their store key
    /// instead of in `notices` (only the instance whose delete commits
    /// notifies). None when the instance runs alone.
    shared_ends: Option<Vec<SharedEnd>>,
    /// Cluster mode: the declarations other than UP the store holds, by
    /// name, so that a backend configured later (a reload, BACKEND_ADD)
    /// starts with them.
    shared_declarations: HashMap<DeclarationKey, Declared>,
    /// Cluster mode: creates of new keys waiting for the store, which the
    /// checks of the next ones count.
    pending: PendingCreates,
}

impl ControlPlane {
    /// `epoch` is the clock origin shared with the workers.
    pub fn new(
        registry: ServiceRegistry,
        cell: Arc<DataplaneCell>,
        affinities: AffinityManager,
        workers: Vec<Arc<WorkerCounters>>,
        epoch: Instant,
    ) -> ControlPlane {
        let dp = cell.load();
        let mut plane = ControlPlane {
            registry,
            cell,
            dp,
            affinities,
            workers,
            counter_base: CounterBase::default(),
            epoch,
            notices: Vec::new(),
            counters: PlaneCounters::default(),
            lifetimes: new_histogram(),
            states: BackendStates::new(),
            shared_ends: None,
            shared_declarations: HashMap::new(),
            pending: PendingCreates::default(),
        };
        // Backends configured with weight 0 start draining.
        let mut next = plane.registry.clone();
        if plane.settle_into(&mut next) {
            if let Ok(dp) = next.snapshot() {
                plane.commit(next, dp);
            }
        }
        plane.record_states();
        plane
    }

    /// Monotonic milliseconds since the shared epoch.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn dataplane(&self) -> &Arc<Dataplane> {
        &self.dp
    }

    pub fn affinities(&self) -> &AffinityManager {
        &self.affinities
    }

    pub fn registry(&self) -> &ServiceRegistry {
        &self.registry
    }

    pub fn counters(&self) -> PlaneCounters {
        self.counters
    }

    pub fn workers(&self) -> &[Arc<WorkerCounters>] {
        &self.workers
    }

    /// The plane's part of the statistics: the workers' counters against the
    /// current snapshot, the affinities installed, the table's capacity and
    /// how long ended affinities lived.
    pub fn summary(&self) -> Summary {
        let secs = self.epoch.elapsed().as_secs_f64();
        let mut s = Summary::collect(
            &self.workers,
            &self.dp,
            secs,
            self.affinities.len(),
            &self.counter_base,
        );
        s.affinity_lifetime_ms = Percentiles::of(&self.lifetimes);
        s.affinity_capacity = self.affinities.capacity();
        // The summary lists the snapshot's services in its order; each
        // backend is found by name once (thousands of backends: no search
        // per backend).
        let now = self.now_ms();
        for (summary, svc) in s.services.iter_mut().zip(&self.dp.services) {
            let quota = svc
                .limits
                .quota(self.affinities.capacity(), svc.backends.len());
            let ids: HashMap<&str, BackendId> = svc
                .backends
                .iter()
                .filter_map(|&id| self.dp.backend(id))
                .map(|b| (b.name.as_str(), b.id))
                .collect();
            for b in summary.backends.iter_mut() {
                let Some(&id) = ids.get(b.name.as_str()) else {
                    continue;
                };
                b.affinities = self.affinities.requested_by(id) as u64;
                b.affinity_quota = quota as u64;
                if let Some(st) = self.states.get(id) {
                    b.state_for_secs = now.saturating_sub(st.since_ms) / 1000;
                    b.check_error = st.check_error.clone();
                }
            }
        }
        s
    }

    /// The state of backend `id` and what it was combined from.
    pub fn backend_status(&self, id: BackendId) -> Option<&BackendStatus> {
        self.states.get(id)
    }

    /// One verdict of [`set_backends_health`](Self::set_backends_health),
    /// refused for a backend the plane does not have (the tests' form).
    #[cfg(test)]
    pub fn set_backend_health(
        &mut self,
        service: &str,
        backend: &str,
        up: bool,
        error: Option<String>,
    ) -> Result<(), RegistryError> {
        if self.registry.backend_id(service, backend).is_none() {
            return Err(RegistryError::NoSuchBackend {
                service: service.to_string(),
                backend: backend.to_string(),
            });
        }
        self.set_backends_health([HealthVerdict {
            service,
            backend,
            up,
            error,
        }])
    }

    /// Applies the health checker's verdicts ([`HealthVerdict`]: a backend
    /// whose checks fail is down, its error says why) and publishes one
    /// snapshot for them all, if they change a state: a tick's worth of
    /// changes (a rack of backends failing together) costs one Maglev
    /// build per service, not one per backend. A verdict on a backend
    /// removed since is dropped.
    pub fn set_backends_health<'a>(
        &mut self,
        verdicts: impl IntoIterator<Item = HealthVerdict<'a>>,
    ) -> Result<(), RegistryError> {
        let now = self.now_ms();
        for v in verdicts {
            if let Some(id) = self.registry.backend_id(v.service, v.backend) {
                self.states.set_health(id, v.up, v.error, now);
            }
        }
        self.apply_states()
    }

    /// Keeps a down backend's reason current: the error of its last failed
    /// check, which changes while it stays down (refused, then timing out)
    /// with no new verdict. Publishes nothing.
    pub fn note_check_error(&mut self, service: &str, backend: &str, error: Option<&str>) {
        let Some(id) = self.registry.backend_id(service, backend) else {
            return;
        };
        self.states.note_check_error(id, error);
    }

    /// True when `service` has a backend named `backend`.
    pub fn has_backend(&self, service: &str, backend: &str) -> bool {
        self.registry.backend_id(service, backend).is_some()
    }

    /// The backends a BACKEND_STATE from `sender` concerns: backend
    /// `backend` of `service`, or of every service that has a backend of
    /// that name (`service` None); or the answer that refuses it.
    pub fn declaration_targets(
        &self,
        sender: &str,
        is_admin: bool,
        service: Option<&str>,
        backend: Option<&str>,
    ) -> Result<Vec<BackendId>, Response> {
        if !is_admin && backend.is_some_and(|b| b != sender) {
            return Err(Response::new(ReturnCode::NotAuthorized)
                .with_message("a backend may declare only its own state"));
        }
        let Some(backend) = (if is_admin { backend } else { Some(sender) }) else {
            return Err(Response::new(ReturnCode::Invalid)
                .with_message("name the backend whose state this is"));
        };
        if let Some(name) = service {
            if self.dp.service_named(name).is_none() {
                return Err(registry_error(RegistryError::NoSuchService(
                    name.to_string(),
                )));
            }
        }
        let ids: Vec<BackendId> = self
            .registry
            .backends()
            .filter(|(_, s, b)| b.name == backend && service.is_none_or(|n| n == *s))
            .map(|(id, _, _)| id)
            .collect();
        if ids.is_empty() {
            return Err(registry_error(RegistryError::NoSuchBackend {
                service: service.unwrap_or("any service").to_string(),
                backend: backend.to_string(),
            }));
        }
        Ok(ids)
    }

    /// Records what the application (`by_admin` false) or the operator
    /// declares for each backend of `ids` and publishes the states that
    /// makes. Returns the (service, backend, state) of each.
    pub fn declare_states(
        &mut self,
        ids: &[BackendId],
        by_admin: bool,
        state: Declared,
    ) -> Result<Vec<(String, String, BackendState)>, RegistryError> {
        let now = self.now_ms();
        for &id in ids {
            self.states.declare(id, by_admin, state, now);
        }
        self.apply_states()?;
        Ok(self.states_of(ids))
    }

    /// The (service, backend, state) of each backend of `ids`.
    pub(crate) fn states_of(&self, ids: &[BackendId]) -> Vec<(String, String, BackendState)> {
        ids.iter()
            .filter_map(|&id| {
                let b = self.dp.backend(id)?;
                let s = self.dp.service(b.service)?;
                Some((s.name.clone(), b.name.clone(), b.state))
            })
            .collect()
    }

    /// Gives every backend of `next` the state its inputs and weight make
    /// (a backend new here with what the cluster declared for its name);
    /// true when one changed.
    fn settle_into(&mut self, next: &mut ServiceRegistry) -> bool {
        self.adopt_declarations(next);
        let mut targets: Vec<(BackendId, BackendState)> = Vec::new();
        let mut spreading: Vec<(ServiceId, bool)> = Vec::new();
        for (service, policy, backends) in next.services() {
            let from = targets.len();
            targets.extend(
                backends
                    .iter()
                    .map(|(id, b)| (*id, self.states.combined(*id, b.weight))),
            );
            // No backend takes new connections, and some would but for
            // their checks: with `all_unhealthy = "spread"` those do.
            let unchecked = |(id, b): &(BackendId, NewBackend)| {
                self.states.combined_unchecked(*id, b.weight) == BackendState::Up
            };
            let spread = policy == AllUnhealthy::Spread
                && !targets[from..].iter().any(|(_, s)| *s == BackendState::Up)
                && backends.iter().any(unchecked);
            if spread {
                for (t, b) in targets[from..].iter_mut().zip(backends) {
                    if unchecked(b) {
                        t.1 = BackendState::Up;
                    }
                }
            }
            spreading.push((service, spread));
        }
        let mut changed = false;
        for (service, on) in spreading {
            changed |= next.set_spreading(service, on);
        }
        for (id, state) in targets {
            changed |= next.state(id) != state;
            next.set_state(id, state);
        }
        changed
    }

    /// Publishes a snapshot with the states the backends' inputs make now,
    /// if that changes any.
    pub(crate) fn apply_states(&mut self) -> Result<(), RegistryError> {
        let mut next = self.registry.clone();
        if self.settle_into(&mut next) {
            let dp = next.snapshot()?;
            self.commit(next, dp);
        }
        self.record_states();
        Ok(())
    }

    /// Takes the published states as the backends' own, logging each
    /// change (call after every commit).
    fn record_states(&mut self) {
        let now = self.now_ms();
        let current: Vec<(BackendId, BackendState)> = self
            .registry
            .backends()
            .map(|(id, _, _)| (id, self.registry.state(id)))
            .collect();
        for (id, state) in current {
            if let Some(change) = self.states.settle(id, state, now) {
                self.log_change(&change);
            }
        }
    }

    /// One log line per state change: which backend, from what to what,
    /// and why.
    fn log_change(&self, c: &StateChange) {
        let Some(b) = self.dp.backend(c.backend) else {
            return;
        };
        let service = self.dp.service(b.service).map_or("?", |s| s.name.as_str());
        let why = match self.states.get(c.backend) {
            Some(st) if c.to == BackendState::Up && st.healthy == Some(false) => {
                "its health checks fail, as every backend's of the service: all take new connections"
                    .to_string()
            }
            Some(st) => state_reasons(st, b.weight),
            None => String::new(),
        };
        let level = if c.to == BackendState::Up {
            log::Level::Info
        } else {
            log::Level::Warn
        };
        log::log!(
            level,
            "backend {service}/{}: {} -> {}{}",
            b.name,
            c.from.name(),
            c.to.name(),
            if why.is_empty() {
                String::new()
            } else {
                format!(" ({why})")
            }
        );
    }

    /// Answers an affinity or backend request from `sender`. Reload and
    /// statistics are the control thread's: UNSUPPORTED here.
    pub fn handle(&mut self, sender: &str, is_admin: bool, request: &Request<'_>) -> Response {
        match request {
            Request::AffinityCreate(op) => self.affinity_op(AffinityAction::Create, is_admin, op),
            Request::AffinityExtend(op) => self.affinity_op(AffinityAction::Extend, is_admin, op),
            Request::AffinityCancel(op) => self.affinity_op(AffinityAction::Cancel, is_admin, op),
            Request::AffinityList {
                service,
                owner,
                offset,
                limit,
            } => {
                // A backend sees only its own affinities.
                let owner = if is_admin { *owner } else { Some(sender) };
                self.affinity_list(service.as_ref(), owner, *offset, *limit)
            }
            Request::BackendList {
                service,
                offset,
                limit,
            } => self.backend_list(*service, *offset, *limit),
            Request::BackendSetWeight { .. }
            | Request::BackendAdd(_)
            | Request::BackendRemove { .. } => {
                if is_admin {
                    self.backend_change(request)
                } else {
                    Response::new(ReturnCode::NotAuthorized)
                        .with_message("backend changes need the admin key")
                }
            }
            Request::BackendState {
                service,
                backend,
                state,
            } => match self.declaration_targets(sender, is_admin, *service, *backend) {
                Ok(ids) => match self.declare_states(&ids, is_admin, *state) {
                    Ok(done) => state_reply(&done),
                    Err(e) => registry_error(e),
                },
                Err(refused) => refused,
            },
            Request::Reload | Request::Stats { .. } => Response::new(ReturnCode::Unsupported),
        }
    }

    /// Removes expired affinities; their notices wait in
    /// [`take_notices`](Self::take_notices).
    pub fn expire(&mut self) {
        self.expire_at(self.now_ms());
    }

    /// [`expire`](Self::expire) at `now` (ms on the plane's clock): also
    /// ends the requested affinities of backends down for longer than
    /// their service's `affinity_grace` (static ones stay, skipped while
    /// their owner is down).
    pub fn expire_at(&mut self, now: u64) {
        let mut ended = Vec::new();
        self.affinities.expire(now, &mut ended);
        self.counters.ended_expired += ended.len() as u64;
        self.queue_notices(ended);
        let dp = &self.dp;
        let due = self.states.grace_over(now, |id| {
            let b = dp.backend(id)?;
            let s = dp.service(b.service)?;
            Some(s.affinity_grace.as_millis() as u64)
        });
        for id in due {
            let mut ended = Vec::new();
            self.affinities
                .end_requested(id, EndReason::BackendDown, &mut ended);
            self.counters.ended_backend_down += ended.len() as u64;
            self.queue_notices(ended);
        }
    }

    /// Frees the snapshots the workers have all let go of (each tick), so
    /// that no worker frees one: see [`DataplaneCell::collect`].
    pub fn collect_snapshots(&self) {
        self.cell.collect();
    }

    /// The affinities that ended since the last call: (where to send the
    /// notice, if the owner gave an address; the notice).
    pub fn take_notices(&mut self) -> Vec<(Option<SocketAddr>, EndedNotice)> {
        std::mem::take(&mut self.notices)
    }

    /// Installs an affinity that never expires and notifies nobody.
    pub fn create_static(&mut self, key: TableKey, owner: BackendId) -> Result<(), AffinityError> {
        let now = self.now_ms();
        self.affinities
            .create(key, owner, None, None, now)
            .map(|_| ())
    }

    /// Cancels the affinity of `key` (only if `owner` owns it, when given);
    /// its owner is notified.
    pub fn cancel(
        &mut self,
        key: &TableKey,
        owner: Option<BackendId>,
    ) -> Result<(), AffinityError> {
        let ended = self.affinities.cancel(key, owner, self.now_ms())?;
        self.counters.ended_cancelled += 1;
        self.queue_notices(vec![ended]);
        Ok(())
    }

    /// The requested (timed) affinities as the state file keeps them, with
    /// `wall_ms` (Unix ms) the wall clock now. Static ones come from the
    /// configuration and are not saved.
    pub fn saved_state(&self, wall_ms: u64) -> SavedState {
        let now = self.now_ms();
        let affinities = self
            .affinities
            .list()
            .filter_map(|(k, r)| {
                let expires = r.expires?;
                let svc = self.dp.service(k.service())?;
                let owner = self.backend_name(r.owner)?;
                Some(SavedAffinity {
                    service: svc.name.clone(),
                    service_addr: wire_key(svc, k).service,
                    owner: owner.to_string(),
                    client: crate::net::bits_ip(k.family(), k.addr()),
                    prefix_len: k.prefix_len(),
                    ports: k.ports(),
                    expires_unix_ms: wall_ms.saturating_add(expires.saturating_sub(now)),
                    created_unix_ms: wall_ms.saturating_sub(now.saturating_sub(r.created_ms)),
                    notify: r.notify,
                })
            })
            .collect();
        SavedState {
            saved_unix_ms: wall_ms,
            affinities,
        }
    }

    /// Installs the affinities of a state file, `wall_ms` (Unix ms) being
    /// the wall clock now. One that expired meanwhile ends EXPIRED, one
    /// whose service or backend is gone ends BACKEND_REMOVED, and one that
    /// cannot be installed (a static affinity of another backend holds its
    /// key, or the table is full) ends CANCELLED: each with its notice.
    pub fn restore(&mut self, saved: &[SavedAffinity], wall_ms: u64) -> Restored {
        let now = self.now_ms();
        let mut done = Restored::default();
        for a in saved {
            let left = a.expires_unix_ms.saturating_sub(wall_ms);
            let reason = if left == 0 {
                done.expired += 1;
                self.counters.ended_expired += 1;
                EndReason::Expired
            } else {
                match self.restore_one(a, left, wall_ms, now) {
                    Ok(()) => {
                        done.installed += 1;
                        continue;
                    }
                    Err(EndReason::BackendRemoved) => {
                        done.gone += 1;
                        self.counters.ended_backend_removed += 1;
                        EndReason::BackendRemoved
                    }
                    Err(r) => {
                        done.refused += 1;
                        self.counters.ended_cancelled += 1;
                        r
                    }
                }
            };
            self.record_lifetime(a, wall_ms);
            self.notices.push((a.notify, a.notice(reason)));
        }
        done
    }

    /// Counts the lifetime of a saved or stored affinity that ends at
    /// `wall_ms` (Unix ms).
    pub(super) fn record_lifetime(&mut self, a: &SavedAffinity, wall_ms: u64) {
        let lived = wall_ms.saturating_sub(a.created_unix_ms).max(1);
        let _ = self.lifetimes.record(lived);
    }

    /// Installs one saved affinity with `left_ms` to go, or says how it ends.
    fn restore_one(
        &mut self,
        a: &SavedAffinity,
        left_ms: u64,
        wall_ms: u64,
        now: u64,
    ) -> Result<(), EndReason> {
        let svc = self
            .dp
            .service_named(&a.service)
            .ok_or(EndReason::BackendRemoved)?;
        // The service it was saved on: one of the same name on another VIP,
        // port or protocol is another service, as a reload takes it (whose
        // affinities end).
        let here = ServiceAddr {
            addr: svc.vip,
            port: svc.port,
            proto: svc.proto,
        };
        if a.service_addr != here {
            return Err(EndReason::BackendRemoved);
        }
        let owner = self
            .dp
            .find_backend(svc.id, &a.owner)
            .ok_or(EndReason::BackendRemoved)?
            .id;
        let family = crate::net::family(a.client);
        if family != svc.family {
            return Err(EndReason::BackendRemoved);
        }
        let key = TableKey::new(svc.id, family, ip_bits(a.client), a.prefix_len, a.ports)
            .map_err(|_| EndReason::BackendRemoved)?;
        let age = wall_ms.saturating_sub(a.created_unix_ms);
        // Never longer than this configuration grants, whatever the file
        // says (it may come from another configuration, or be forged).
        let left_ms = left_ms.min(max_affinity_ms(svc));
        self.affinities
            .restore(key, owner, left_ms, a.notify, now.saturating_sub(age), now)
            .map(|_| ())
            .map_err(|_| EndReason::Cancelled)
    }

    /// Makes the configuration's services and backends the registry's, in
    /// one snapshot; affinities owned by removed backends end. Returns the
    /// removed backends.
    pub fn replace_services(&mut self, cfg: &Config) -> Result<Vec<BackendId>, RegistryError> {
        let mut next = self.registry.clone();
        let removed = next.reload(cfg)?;
        // The checks know backends by name: one they hold down under an
        // address the reload changed (a new id) is down from the first
        // snapshot, not up until they are asked again.
        let held_down: Vec<(BackendId, Option<String>)> = removed
            .iter()
            .filter_map(|&id| {
                let status = self.states.get(id).filter(|s| s.healthy == Some(false))?;
                let b = self.dp.backend(id)?;
                let svc = self.dp.service(b.service)?;
                let renewed = next.backend_id(&svc.name, &b.name)?;
                Some((renewed, status.check_error.clone()))
            })
            .collect();
        // A removed backend's inputs (its checks, what was declared for
        // it) go with it before the new backends' states are combined: the
        // registry may hand its id to one of them.
        for id in &removed {
            self.states.remove(*id);
        }
        let now = self.now_ms();
        for (id, error) in held_down {
            self.states.set_health(id, false, error, now);
        }
        self.settle_into(&mut next);
        let dp = next.snapshot()?;
        // A kept service keeps its id (the registry matches services by
        // name, VIP, port and protocol), so its affinities stay where they
        // are. Every affinity is owned by a backend of its service, so a
        // removed service's affinities end with its backends.
        for id in &removed {
            self.end_backend(*id);
        }
        self.commit(next, dp);
        self.record_states();
        Ok(removed)
    }

    fn queue_notices(&mut self, ended: Vec<Ended>) {
        let now = self.now_ms();
        for e in ended {
            let _ = self
                .lifetimes
                .record(now.saturating_sub(e.created_ms).max(1));
            if let Some(n) = self.notice(&e) {
                if self.shared_ends.is_some() {
                    self.queue_shared_end(&e, n);
                } else {
                    self.notices.push((e.notify, n));
                }
            }
        }
    }

    fn notice(&self, e: &Ended) -> Option<EndedNotice> {
        let svc = self.dp.service(e.key.service())?;
        let owner = self.backend_name(e.owner).unwrap_or("?").to_string();
        Some(EndedNotice {
            key: wire_key(svc, &e.key),
            owner,
            reason: e.reason,
        })
    }

    /// Name of a backend in the current snapshot (callers resolve the names
    /// of backends being removed before publishing the snapshot without
    /// them).
    fn backend_name(&self, id: BackendId) -> Option<&str> {
        self.dp.backend(id).map(|b| b.name.as_str())
    }

    /// Makes `next` the registry and publishes its snapshot `dp` (built
    /// first, so that a change that cannot be built changes nothing).
    fn commit(&mut self, next: ServiceRegistry, dp: Dataplane) {
        log_spreading(&self.dp, &dp);
        self.counter_base.update(&self.dp, &dp, &self.workers);
        self.registry = next;
        self.cell.publish(dp);
        self.dp = self.cell.load();
        self.counters.snapshots += 1;
    }

    /// Ends every affinity a removed backend owned. Call before publishing
    /// the snapshot without it, so the notices can still name it (its
    /// state inputs go before the next states are combined: its id may
    /// already be a new backend's).
    fn end_backend(&mut self, id: BackendId) {
        let mut ended = Vec::new();
        self.affinities.remove_backend(id, &mut ended);
        self.counters.ended_backend_removed += ended.len() as u64;
        self.queue_notices(ended);
    }

    /// The service a wire key names, and the key in table form.
    fn table_key(&self, key: &AffinityKey) -> Result<(&Service, TableKey), Response> {
        let svc = self
            .dp
            .find_service(key.service.addr, key.service.port, key.service.proto)
            .ok_or_else(|| {
                Response::new(ReturnCode::NotFound)
                    .with_message(format!("no service {}", key.service))
            })?;
        let family = crate::net::family(key.client);
        if family != svc.family {
            return Err(Response::new(ReturnCode::Invalid)
                .with_message("client address family differs from the service's"));
        }
        let k = TableKey::new(
            svc.id,
            family,
            ip_bits(key.client),
            key.prefix_len,
            key.ports,
        )
        .map_err(|e| Response::new(ReturnCode::Invalid).with_message(e.to_string()))?;
        Ok((svc, k))
    }

    /// The owner named in a request, as a backend of `svc` (the server has
    /// already made a backend's requests name itself).
    fn owner_of(&self, svc: &Service, op: &AffinityOp<'_>) -> Result<BackendId, Response> {
        let Some(name) = op.owner else {
            return Err(Response::new(ReturnCode::Invalid)
                .with_message("name the backend that owns the affinity (--owner)"));
        };
        self.dp
            .find_backend(svc.id, name)
            .map(|b| b.id)
            .ok_or_else(|| {
                Response::new(ReturnCode::NotAuthorized)
                    .with_message(format!("{name} is not a backend of service {}", svc.name))
            })
    }

    fn affinity_error(&self, e: AffinityError, now: u64, key: &TableKey) -> Response {
        match e {
            AffinityError::Conflict { owner } => {
                let remaining = self
                    .affinities
                    .get(key)
                    .and_then(|r| r.remaining_ms(now))
                    .map_or(u32::MAX, secs);
                Response::conflict(self.backend_name(owner).unwrap_or("?"), remaining)
            }
            AffinityError::NotFound => {
                Response::new(ReturnCode::NotFound).with_message("no such affinity")
            }
            AffinityError::TableFull if self.affinities.len() < self.affinities.capacity() => {
                // Below capacity: the key's two buckets are full, which
                // port ranges of one prefix reach first (they share them).
                Response::new(ReturnCode::TableFull).with_message(format!(
                    "no room for this key in its two buckets of {SLOTS} slots ({} of {} \
                     entries in use): a client prefix holds at most {} port ranges per \
                     service, fewer beside other keys there",
                    self.affinities.len(),
                    self.affinities.capacity(),
                    2 * SLOTS,
                ))
            }
            AffinityError::TableFull => Response::new(ReturnCode::TableFull).with_message(format!(
                "affinity table full ({} entries)",
                self.affinities.capacity()
            )),
            AffinityError::Invalid(m) => Response::new(ReturnCode::Invalid).with_message(m),
        }
    }

    /// Whether a backend may create the new affinity `key` for itself
    /// (`owner`) on `svc`: the service's shortest prefix, its quota per
    /// backend and its overlap rule. A refusal names the limit.
    fn within_limits(
        &self,
        svc: &Service,
        key: &TableKey,
        owner: BackendId,
        now: u64,
    ) -> Result<(), (Limit, Response)> {
        let limits = svc.limits;
        let family = key.family();
        let min = limits.min_prefix.of(family);
        if key.prefix_len() < min {
            let fam = match family {
                Family::V4 => "ipv4",
                Family::V6 => "ipv6",
            };
            let why = format!(
                "prefix /{} is shorter than /{min}, the shortest a backend may pin on service {} \
                 (min_prefix.{fam} = {min})",
                key.prefix_len(),
                svc.name
            );
            return Err((
                Limit::MinPrefix,
                Response::new(ReturnCode::Invalid).with_message(why),
            ));
        }
        let quota = limits.quota(self.affinities.capacity(), svc.backends.len());
        // With its creates still waiting for the shared store (cluster).
        let held = self.affinities.requested_by(owner) + self.pending.held_by(owner);
        if held >= quota {
            let name = self.backend_name(owner).unwrap_or("?");
            let source = match limits.max_per_backend {
                Some(_) => "max_affinities_per_backend",
                None => "the default max_affinities_per_backend: twice an even share of the table",
            };
            return Err((
                Limit::Quota,
                Response::new(ReturnCode::QuotaExceeded).with_message(format!(
                    "backend {name} holds {held} affinities on service {}, its quota is {quota} \
                     ({source}); cancel one or let one end first",
                    svc.name
                )),
            ));
        }
        if limits.overlap == OverlapPolicy::Refuse {
            let other = self.affinities.overlapping(key, owner);
            if let Some((other, other_owner)) =
                other.or_else(|| self.pending.overlapping(key, owner))
            {
                let remaining = match self.affinities.get(&other) {
                    Some(r) => r.remaining_ms(now).map_or(u32::MAX, secs),
                    // A create in flight to the shared store (cluster).
                    None => self.pending.asked_secs(&other, other_owner).unwrap_or(0),
                };
                let owner_name = self.backend_name(other_owner).unwrap_or("?");
                let client = crate::net::bits_ip(other.family(), other.addr());
                return Err((
                    Limit::Overlap,
                    Response::conflict(owner_name, remaining).with_message(format!(
                        "overlaps {client}/{} ports {} of backend {owner_name}; service {} \
                         refuses overlapping affinities (affinity_overlap = \"refuse\")",
                        other.prefix_len(),
                        other.ports(),
                        svc.name
                    )),
                ));
            }
        }
        Ok(())
    }

    fn affinity_op(
        &mut self,
        action: AffinityAction,
        is_admin: bool,
        op: &AffinityOp<'_>,
    ) -> Response {
        let c = match self.check_affinity_op(action, is_admin, op) {
            Ok(c) => c,
            Err(r) => return r,
        };
        let (key, now) = (c.key, c.now);
        let result = match (action, c.owner) {
            (AffinityAction::Cancel, Some(owner))
                if self
                    .affinities
                    .get(&key)
                    .is_some_and(|r| r.expires.is_none() && r.owner == owner) =>
            {
                // The configuration's, which never ends: its owner may not
                // take it away (the operator may: admin without an owner).
                // Another backend's is CONFLICT, below, as in cluster mode.
                return Response::new(ReturnCode::NotAuthorized).with_message(
                    "a static affinity, from the configuration: only the configuration removes it",
                );
            }
            (AffinityAction::Cancel, owner) => {
                return match self.cancel(&key, owner) {
                    Ok(()) => Response::ok(),
                    Err(e) => self.affinity_error(e, now, &key),
                }
            }
            (AffinityAction::Create, Some(owner)) => {
                self.affinities
                    .create(key, owner, Some(c.duration_ms), op.notify, now)
            }
            (AffinityAction::Extend, Some(owner)) => {
                self.affinities.extend(&key, owner, c.duration_ms, now)
            }
            (_, None) => return Response::new(ReturnCode::Invalid).with_message("no owner"),
        };
        match result {
            Ok(g) => Response::ok().with_remaining(g.remaining_ms.map_or(u32::MAX, secs)),
            Err(e) => self.affinity_error(e, now, &key),
        }
    }

    /// Every check of an affinity request that does not change the table:
    /// service, owner, duration, the owner's state and, for a backend's new
    /// affinity, its service's limits.
    fn check_affinity_op(
        &mut self,
        action: AffinityAction,
        is_admin: bool,
        op: &AffinityOp<'_>,
    ) -> Result<Checked, Response> {
        let (svc, key) = self.table_key(&op.key)?;
        let now = self.now_ms();
        if action == AffinityAction::Cancel && is_admin && op.owner.is_none() {
            // The operator cancels whoever owns it.
            return Ok(Checked {
                key,
                owner: None,
                duration_ms: 0,
                now,
            });
        }
        let owner = self.owner_of(svc, op)?;
        let max = max_affinity_ms(svc);
        let duration = u64::from(op.duration_secs) * 1000;
        if action != AffinityAction::Cancel && (duration == 0 || duration > max) {
            return Err(Response::new(ReturnCode::Invalid).with_message(format!(
                "duration must be 1 to {} seconds on service {}",
                max / 1000,
                svc.name
            )));
        }
        if action != AffinityAction::Cancel {
            // A draining or down backend's affinities only end: a drain
            // finishes within max_affinity_duration.
            let state = self.dp.backend(owner).map_or(BackendState::Up, |b| b.state);
            if state != BackendState::Up {
                return Err(Response::new(ReturnCode::Draining).with_message(format!(
                    "backend is {}: no new or extended affinities",
                    state.name()
                )));
            }
        }
        // A backend's new affinity is held to its service's limits; the
        // operator's is not, and renewing one it holds (or has asked the
        // shared store for) adds nothing.
        if action == AffinityAction::Create
            && !is_admin
            && self.affinities.get(&key).is_none()
            && self.pending.asked_secs(&key, owner).is_none()
        {
            if let Err((limit, r)) = self.within_limits(svc, &key, owner, now) {
                *limit.counter(&mut self.counters.limited) += 1;
                return Err(r);
            }
        }
        Ok(Checked {
            key,
            owner: Some(owner),
            duration_ms: duration,
            now,
        })
    }

    fn affinity_list(
        &self,
        service: Option<&ServiceAddr>,
        owner: Option<&str>,
        offset: u32,
        limit: u16,
    ) -> Response {
        let svc_id = match service {
            None => None,
            Some(s) => match self.dp.find_service(s.addr, s.port, s.proto) {
                Some(svc) => Some(svc.id),
                None => {
                    return Response::new(ReturnCode::NotFound)
                        .with_message(format!("no service {s}"))
                }
            },
        };
        let now = self.now_ms();
        let mut entries: Vec<(&TableKey, &Record)> = self
            .affinities
            .list()
            .filter(|(k, _)| svc_id.is_none_or(|s| k.service() == s))
            .filter(|(_, r)| owner.is_none_or(|o| self.backend_name(r.owner) == Some(o)))
            .collect();
        // A total order (a service's keys share its family), so that pages
        // do not overlap. Only the page is sorted: the entries before it
        // and after it are only partitioned off (linear, where sorting a
        // large table for each page would not be).
        let port_order = |p: PortMatch| match p {
            PortMatch::Any => (0, 0, 0),
            PortMatch::One(x) => (1, x, x),
            PortMatch::Range(a, b) => (2, a, b),
        };
        let order = |(k, _): &(&TableKey, &Record)| {
            (k.service(), k.prefix_len(), k.addr(), port_order(k.ports()))
        };
        let total = entries.len();
        let start = (offset as usize).min(total);
        let end = match limit {
            0 => total,
            n => start.saturating_add(usize::from(n)).min(total),
        };
        if start > 0 && start < total {
            entries.select_nth_unstable_by_key(start, order);
        }
        let rest = &mut entries[start..];
        if end - start > 0 && end - start < rest.len() {
            rest.select_nth_unstable_by_key(end - start, order);
        }
        rest[..end - start].sort_unstable_by_key(order);
        let page: Vec<AffinityEntry> = entries[start..end]
            .iter()
            .filter_map(|(k, r)| {
                let svc = self.dp.service(k.service())?;
                Some(AffinityEntry {
                    key: wire_key(svc, k),
                    owner: self.backend_name(r.owner).unwrap_or("?").to_string(),
                    remaining_secs: r.remaining_ms(now).map_or(u32::MAX, secs),
                    notify: r.notify,
                })
            })
            .collect();
        let more = total > start.saturating_add(page.len());
        Response::affinities(page, more)
    }

    fn backend_list(&self, service: Option<&str>, offset: u32, limit: u16) -> Response {
        let now = self.now_ms();
        if let Some(name) = service {
            if self.dp.service_named(name).is_none() {
                return Response::new(ReturnCode::NotFound)
                    .with_message(format!("no service {name}"));
            }
        }
        let all: Vec<BackendEntry> = self
            .dp
            .services
            .iter()
            .filter(|s| service.is_none_or(|n| s.name == n))
            .flat_map(|s| {
                s.backends
                    .iter()
                    .filter_map(|&id| self.dp.backend(id))
                    .map(|b| {
                        let st = self.states.get(b.id);
                        BackendEntry {
                            service: s.name.clone(),
                            backend: b.name.clone(),
                            addr: b.addr,
                            mac: b.mac,
                            weight: b.weight,
                            state: b.state,
                            state_secs: st
                                .map_or(0, |st| secs_down(now.saturating_sub(st.since_ms))),
                            app: st.map_or(Declared::Up, |st| st.app),
                            admin: st.map_or(Declared::Up, |st| st.admin),
                            healthy: st.and_then(|st| st.healthy),
                            check_error: st.and_then(|st| st.check_error.clone()),
                        }
                    })
            })
            .collect();
        let offset = offset as usize;
        let limit = if limit == 0 {
            usize::MAX
        } else {
            limit as usize
        };
        let page: Vec<BackendEntry> = all.iter().skip(offset).take(limit).cloned().collect();
        let more = all.len() > offset.saturating_add(page.len());
        Response::backends(page, more)
    }

    fn backend_change(&mut self, request: &Request<'_>) -> Response {
        let mut next = self.registry.clone();
        let result = match request {
            Request::BackendSetWeight {
                service,
                backend,
                weight,
            } => next.set_weight(service, backend, *weight).map(|_| None),
            Request::BackendAdd(spec) => next
                .add_backend(
                    spec.service,
                    NewBackend {
                        name: spec.backend.to_string(),
                        addr: spec.addr,
                        mac: spec.mac,
                        weight: spec.weight,
                    },
                )
                .map(|_| None),
            Request::BackendRemove { service, backend } => {
                next.remove_backend(service, backend).map(Some)
            }
            _ => return Response::new(ReturnCode::Unsupported),
        };
        let removed = match result {
            Ok(r) => r,
            Err(e) => return registry_error(e),
        };
        if let Some(id) = removed {
            self.states.remove(id);
        }
        self.settle_into(&mut next);
        let dp = match next.snapshot() {
            Ok(dp) => dp,
            Err(e) => return registry_error(e),
        };
        if let Some(id) = removed {
            self.end_backend(id);
        }
        self.commit(next, dp);
        self.record_states();
        Response::ok()
    }
}

/// BACKEND_STATE's answer: each backend concerned with the state it is in
/// now.
pub(crate) fn state_reply(done: &[(String, String, BackendState)]) -> Response {
    let text: Vec<String> = done
        .iter()
        .map(|(s, b, st)| format!("{s}/{b} {}", st.name()))
        .collect();
    Response::ok().with_message(text.join(", "))
}

/// One log line per service that starts or stops spreading its new
/// connections over backends that all fail their checks.
fn log_spreading(old: &Dataplane, new: &Dataplane) {
    for s in &new.services {
        let was = old.service_named(&s.name).is_some_and(|o| o.all_unhealthy);
        if s.all_unhealthy && !was {
            log::warn!(
                "service {}: every backend fails its health checks: they take new connections all the same (all_unhealthy = \"spread\")",
                s.name
            );
        } else if was && !s.all_unhealthy {
            log::info!(
                "service {}: no longer spreading over backends that fail their health checks",
                s.name
            );
        }
    }
}

/// Why a backend is in its state: the inputs that make it so, for the log.
fn state_reasons(st: &BackendStatus, weight: u32) -> String {
    let mut why = Vec::new();
    if st.healthy == Some(false) {
        why.push(match &st.check_error {
            Some(e) => format!("health checks fail: {e}"),
            None => "health checks fail".to_string(),
        });
    }
    for (who, d) in [("application", st.app), ("operator", st.admin)] {
        if d != Declared::Up {
            why.push(format!("{who} declared {}", d.name()));
        }
    }
    if weight == 0 {
        why.push("weight 0".to_string());
    }
    why.join(", ")
}

/// Milliseconds to whole seconds, rounded down, saturating.
fn secs_down(ms: u64) -> u32 {
    u32::try_from(ms / 1000).unwrap_or(u32::MAX)
}

/// Milliseconds to whole seconds, rounded up, saturating.
pub(crate) fn secs(ms: u64) -> u32 {
    u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX)
}

fn registry_error(e: RegistryError) -> Response {
    let code = match e {
        RegistryError::NoSuchService(_) | RegistryError::NoSuchBackend { .. } => {
            ReturnCode::NotFound
        }
        RegistryError::DuplicateBackend { .. } => ReturnCode::Conflict,
        RegistryError::Invalid(_) => ReturnCode::Invalid,
        RegistryError::Full => ReturnCode::TableFull,
    };
    Response::new(code).with_message(e.to_string())
}

/// A table key in wire form.
fn wire_key(svc: &Service, k: &TableKey) -> AffinityKey {
    let client = crate::net::bits_ip(k.family(), k.addr());
    AffinityKey {
        service: ServiceAddr {
            addr: svc.vip,
            port: svc.port,
            proto: svc.proto,
        },
        client,
        prefix_len: k.prefix_len(),
        ports: k.ports(),
    }
}

/// The longest affinity `svc` grants, in ms (its configuration bounds it
/// well within a `u64`).
fn max_affinity_ms(svc: &Service) -> u64 {
    u64::try_from(svc.max_affinity.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::handler::Payload;
    use crate::control::testing::{call, config_text, first_time_left, op, plane, src, WEB};
    use crate::protocol::message::BackendSpec;
    use crate::types::Family;

    #[test]
    fn backends_pin_only_themselves_on_their_services() {
        let (mut p, r) = plane(&config_text());
        let ok = call(
            &mut p,
            "a",
            Request::AffinityCreate(op("198.18.0.0", 24, Some("a"), 60)),
        );
        assert_eq!(ok.code, ReturnCode::Ok);
        assert_eq!(ok.remaining_secs, 60);
        assert_eq!(
            r.lookup(WEB, Family::V4, 0xc612_0007, 1),
            Some(1),
            "a is backend id 1"
        );
        // m1 is no backend of web.
        let no = call(
            &mut p,
            "m1",
            Request::AffinityCreate(op("198.18.1.0", 24, Some("m1"), 60)),
        );
        assert_eq!(no.code, ReturnCode::NotAuthorized);
        // b asks for a's key: conflict naming a.
        let c = call(
            &mut p,
            "b",
            Request::AffinityCreate(op("198.18.0.0", 24, Some("b"), 60)),
        );
        assert_eq!(
            (c.code, c.owner.as_deref()),
            (ReturnCode::Conflict, Some("a"))
        );
        // Too long for the service's 10 minutes.
        let long = call(
            &mut p,
            "a",
            Request::AffinityCreate(op("198.18.2.0", 24, Some("a"), 601)),
        );
        assert_eq!(long.code, ReturnCode::Invalid);
        assert!(long.message.contains("600"), "{}", long.message);
        // Unknown service.
        let mut o = op("198.18.3.0", 24, Some("a"), 60);
        o.key.service.port = 81;
        assert_eq!(
            call(&mut p, "a", Request::AffinityCreate(o)).code,
            ReturnCode::NotFound
        );
        assert_eq!(p.affinities().len(), 1);
    }

    /// Pages of any size, one after the other, give the whole list once,
    /// in order; an owner's pages only its own.
    #[test]
    fn list_pages_partition_the_sorted_table() {
        let (mut p, _r) = plane(&config_text());
        // Addresses in a scrambled order, /32s and /24s, two owners.
        for i in 0..300u32 {
            let n = i.wrapping_mul(2_654_435_761) % 65_536;
            let (addr, plen) = if i % 5 == 0 {
                (format!("10.{}.{}.0", 100 + n % 100, n / 256 % 256), 24)
            } else {
                (format!("198.18.{}.{}", n / 256, n % 256), 32)
            };
            let owner = if i % 3 == 0 { "a" } else { "b" };
            let r = call(
                &mut p,
                "admin",
                Request::AffinityCreate(op(&addr, plen, Some(owner), 60)),
            );
            assert_eq!(r.code, ReturnCode::Ok, "{addr}/{plen}: {}", r.message);
        }
        let list = |p: &mut ControlPlane, owner, offset, limit| {
            let r = call(
                p,
                "admin",
                Request::AffinityList {
                    service: None,
                    owner,
                    offset,
                    limit,
                },
            );
            // Keys and owners (the seconds left may tick on meanwhile).
            match r.payload {
                Payload::Affinities { entries, more } => (
                    entries
                        .into_iter()
                        .map(|e| (e.key, e.owner))
                        .collect::<Vec<_>>(),
                    more,
                ),
                other => panic!("{other:?}"),
            }
        };
        let (all, more) = list(&mut p, None, 0, 0);
        assert!(!more);
        assert_eq!(all.len(), p.affinities().len());
        let order: Vec<_> = all.iter().map(|(k, _)| (k.prefix_len, k.client)).collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted, "by prefix length, then address");
        for limit in [1u16, 7, 64, 299, 300, 1000] {
            let mut got = Vec::new();
            loop {
                let (page, more) = list(&mut p, None, got.len() as u32, limit);
                assert!(page.len() <= usize::from(limit));
                got.extend(page);
                if !more {
                    break;
                }
            }
            assert_eq!(got, all, "pages of {limit}");
        }
        let (past, more) = list(&mut p, None, 5000, 10);
        assert!(past.is_empty() && !more);
        let (mine, _) = list(&mut p, Some("a"), 0, 0);
        let (first, more) = list(&mut p, Some("a"), 0, 33);
        let (second, _) = list(&mut p, Some("a"), 33, 0);
        assert!(more && mine.len() == 100);
        assert!(mine.iter().all(|(_, o)| o == "a"));
        assert_eq!([first, second].concat(), mine);
    }

    /// Port ranges of one prefix share their buckets: the seventeenth is
    /// refused, with a message that says why, in a table nearly empty.
    #[test]
    fn a_prefix_holds_sixteen_port_ranges() {
        let (mut p, _r) = plane(&config_text());
        let range = |owner, lo: u16| {
            let mut o = op("198.18.5.7", 32, Some(owner), 60);
            o.key = o.key.with_ports(PortMatch::Range(lo, lo + 1));
            Request::AffinityCreate(o)
        };
        for i in 0..2 * SLOTS as u16 {
            let r = call(&mut p, "a", range("a", 1000 + 10 * i));
            assert_eq!(r.code, ReturnCode::Ok, "{i}: {}", r.message);
        }
        let r = call(&mut p, "b", range("b", 2000));
        assert_eq!(r.code, ReturnCode::TableFull);
        assert!(
            r.message.contains("at most 16 port ranges"),
            "{}",
            r.message
        );
        assert_eq!(p.affinities().len(), 2 * SLOTS);
    }

    #[test]
    fn admin_acts_for_a_named_owner_and_cancels_any() {
        let (mut p, r) = plane(&config_text());
        let none = call(
            &mut p,
            "admin",
            Request::AffinityCreate(op("198.18.0.0", 24, None, 60)),
        );
        assert_eq!(
            none.code,
            ReturnCode::Invalid,
            "the admin must name the owner"
        );
        let ok = call(
            &mut p,
            "admin",
            Request::AffinityCreate(op("198.18.0.0", 24, Some("b"), 60)),
        );
        assert_eq!(ok.code, ReturnCode::Ok);
        assert_eq!(r.lookup(WEB, Family::V4, 0xc612_0001, 1), Some(2));
        // Cancel without naming the owner.
        let c = call(
            &mut p,
            "admin",
            Request::AffinityCancel(op("198.18.0.0", 24, None, 0)),
        );
        assert_eq!(c.code, ReturnCode::Ok);
        assert_eq!(r.lookup(WEB, Family::V4, 0xc612_0001, 1), None);
        let notices = p.take_notices();
        assert_eq!(notices.len(), 1);
        assert_eq!(notices[0].1.owner, "b");
        assert_eq!(notices[0].1.reason, EndReason::Cancelled);
        assert_eq!(notices[0].0, Some(src()));
    }

    #[test]
    fn draining_backends_get_no_new_affinities_and_removal_ends_them() {
        let (mut p, r) = plane(&config_text());
        assert_eq!(
            create(&mut p, "a", "198.18.0.0", 24, "a").code,
            ReturnCode::Ok
        );
        // Only the admin changes backends.
        let w = Request::BackendSetWeight {
            service: "web",
            backend: "a",
            weight: 0,
        };
        assert_eq!(call(&mut p, "a", w).code, ReturnCode::NotAuthorized);
        assert_eq!(call(&mut p, "admin", w).code, ReturnCode::Ok);
        let d = call(
            &mut p,
            "a",
            Request::AffinityCreate(op("198.18.5.0", 24, Some("a"), 60)),
        );
        assert_eq!(d.code, ReturnCode::Draining);
        // The draining backend keeps its affinity, still honoured, but may
        // not extend it: the drain ends within max_affinity_duration.
        assert_eq!(
            call(
                &mut p,
                "a",
                Request::AffinityExtend(op("198.18.0.0", 24, Some("a"), 120))
            )
            .code,
            ReturnCode::Draining
        );
        assert_eq!(r.lookup(WEB, Family::V4, 0xc612_0001, 1), Some(1));
        assert_eq!(
            p.dataplane().find_backend(WEB, "a").unwrap().state,
            BackendState::Draining
        );
        let gen = p.dataplane().generation;
        let bad = Request::BackendAdd(BackendSpec {
            service: "web",
            backend: "c",
            addr: "2001:db8::1".parse().unwrap(),
            mac: None,
            weight: 1,
        });
        assert_eq!(call(&mut p, "admin", bad).code, ReturnCode::Invalid);
        assert_eq!(
            p.dataplane().generation,
            gen,
            "a refused change publishes nothing"
        );
        let rm = Request::BackendRemove {
            service: "web",
            backend: "a",
        };
        assert_eq!(call(&mut p, "admin", rm).code, ReturnCode::Ok);
        assert_eq!(r.lookup(WEB, Family::V4, 0xc612_0001, 1), None);
        let n = p.take_notices();
        assert_eq!((n.len(), n[0].1.reason), (1, EndReason::BackendRemoved));
        assert_eq!(n[0].1.owner, "a");
    }

    /// The test configuration with `keys` added to the web service, and an
    /// IPv6 service web6 (backends c and d) with `keys6`.
    fn limited(keys: &str, keys6: &str) -> String {
        let web6 = format!(
            r#"
[[services]]
name = "web6"
vip = "2001:db8::10"
port = 443
protocol = "tcp"
forwarding = "ipip"
ipip_source = "2001:db8::1"
{keys6}
[[services.backends]]
name = "c"
address = "2001:db8:1::1"
[[services.backends]]
name = "d"
address = "2001:db8:1::2"
"#
        );
        config_text().replace(
            "max_affinity_duration = \"10m\"",
            &format!("max_affinity_duration = \"10m\"\n{keys}"),
        ) + &web6
    }

    fn create(p: &mut ControlPlane, sender: &str, client: &str, plen: u8, owner: &str) -> Response {
        call(
            p,
            sender,
            Request::AffinityCreate(op(client, plen, Some(owner), 60)),
        )
    }

    fn create6(p: &mut ControlPlane, sender: &str, client: &str, plen: u8) -> Response {
        let mut o = op("198.18.0.0", 24, Some(sender), 60);
        o.key = AffinityKey::new(
            ServiceAddr::tcp("[2001:db8::10]:443".parse().unwrap()),
            client.parse().unwrap(),
            plen,
        )
        .unwrap();
        call(p, sender, Request::AffinityCreate(o))
    }

    #[test]
    fn min_prefix_at_its_edge_for_both_families() {
        let (mut p, _) = plane(&limited("", "min_prefix = { ipv6 = 56 }"));
        // Defaults on web: /16 is the shortest.
        assert_eq!(
            create(&mut p, "a", "198.18.0.0", 16, "a").code,
            ReturnCode::Ok
        );
        let short = create(&mut p, "a", "198.0.0.0", 15, "a");
        assert_eq!(short.code, ReturnCode::Invalid);
        assert!(
            short.message.contains("/16") && short.message.contains("min_prefix.ipv4"),
            "{}",
            short.message
        );
        // web6 sets its own IPv6 limit: /56 passes, /55 does not.
        assert_eq!(
            create6(&mut p, "c", "2001:db8:7:100::", 56).code,
            ReturnCode::Ok
        );
        let short6 = create6(&mut p, "c", "2001:db8:7::", 55);
        assert_eq!(short6.code, ReturnCode::Invalid);
        assert!(
            short6.message.contains("min_prefix.ipv6 = 56"),
            "{}",
            short6.message
        );
        // The operator is not held to it.
        assert_eq!(
            create(&mut p, "admin", "10.0.0.0", 8, "b").code,
            ReturnCode::Ok
        );
        assert_eq!(p.counters().limited.min_prefix, 2);
        // The default IPv6 limit is /48.
        let (mut p, _) = plane(&limited("", ""));
        assert_eq!(
            create6(&mut p, "c", "2001:db8:7::", 48).code,
            ReturnCode::Ok
        );
        assert_eq!(
            create6(&mut p, "c", "2001:db8::", 47).code,
            ReturnCode::Invalid
        );
    }

    #[test]
    fn quota_at_its_edge_and_after_a_cancel() {
        let (mut p, r) = plane(&limited("max_affinities_per_backend = 3", ""));
        for i in 0..3 {
            let c = create(&mut p, "a", &format!("198.18.{i}.0"), 24, "a");
            assert_eq!(c.code, ReturnCode::Ok, "affinity {i}: {}", c.message);
        }
        let over = create(&mut p, "a", "198.18.3.0", 24, "a");
        assert_eq!(over.code, ReturnCode::QuotaExceeded);
        assert!(
            over.message.contains("quota is 3")
                && over.message.contains("max_affinities_per_backend"),
            "{}",
            over.message
        );
        assert_eq!(r.lookup(WEB, Family::V4, 0xc612_0301, 1), None);
        // Renewing one it holds is not a new one.
        assert_eq!(
            create(&mut p, "a", "198.18.0.0", 24, "a").code,
            ReturnCode::Ok
        );
        // A neighbour at its quota leaves b alone.
        for i in 0..3 {
            let c = create(&mut p, "b", &format!("198.19.{i}.0"), 24, "b");
            assert_eq!(c.code, ReturnCode::Ok, "b's affinity {i}");
        }
        // The operator may go beyond it for a.
        assert_eq!(
            create(&mut p, "admin", "198.18.9.0", 24, "a").code,
            ReturnCode::Ok
        );
        assert_eq!(p.affinities().requested_by(1), 4);
        // After cancelling two, a (at 2 of 3) has room for one.
        for net in ["198.18.1.0", "198.18.9.0"] {
            let c = call(
                &mut p,
                "a",
                Request::AffinityCancel(op(net, 24, Some("a"), 0)),
            );
            assert_eq!(c.code, ReturnCode::Ok);
        }
        assert_eq!(
            create(&mut p, "a", "198.18.3.0", 24, "a").code,
            ReturnCode::Ok
        );
        assert_eq!(
            create(&mut p, "a", "198.18.4.0", 24, "a").code,
            ReturnCode::QuotaExceeded
        );
        assert_eq!(p.counters().limited.quota, 2);
    }

    #[test]
    fn default_quota_follows_the_backend_count() {
        // A 1024-entry table, 2 backends: 2 x 512 each; 3 backends: 2 x 342.
        let (mut p, _) = plane(&limited("", ""));
        for i in 0..1024u32 {
            let net = format!("10.{}.{}.0", i / 256, i % 256);
            let c = create(&mut p, "admin", &net, 24, "a");
            assert_eq!(c.code, ReturnCode::Ok, "{}", c.message);
        }
        let over = create(&mut p, "a", "11.0.0.0", 24, "a");
        assert_eq!(over.code, ReturnCode::QuotaExceeded);
        assert!(over.message.contains("quota is 1024"), "{}", over.message);
        assert!(over.message.contains("even share"), "{}", over.message);
        let add = Request::BackendAdd(crate::protocol::message::BackendSpec {
            service: "web",
            backend: "e",
            addr: "10.0.0.5".parse().unwrap(),
            mac: None,
            weight: 100,
        });
        assert_eq!(call(&mut p, "admin", add).code, ReturnCode::Ok);
        let named_admin = Request::BackendAdd(crate::protocol::message::BackendSpec {
            service: "web",
            backend: "admin",
            addr: "10.0.0.6".parse().unwrap(),
            mac: None,
            weight: 100,
        });
        let refused = call(&mut p, "admin", named_admin);
        assert_eq!(refused.code, ReturnCode::Invalid);
        assert!(
            refused.message.contains("operator's name"),
            "{}",
            refused.message
        );
        let over = create(&mut p, "a", "11.0.0.0", 24, "a");
        assert!(over.message.contains("quota is 684"), "{}", over.message);
        // What a holds beyond the smaller quota stays.
        assert_eq!(p.affinities().requested_by(1), 1024);
    }

    #[test]
    fn overlaps_are_refused_both_ways_unless_allowed() {
        let (mut p, _) = plane(&limited("", ""));
        assert_eq!(
            create(&mut p, "a", "198.18.0.0", 16, "a").code,
            ReturnCode::Ok
        );
        // More specific, inside a's /16.
        let inner = create(&mut p, "b", "198.18.7.0", 24, "b");
        assert_eq!(
            (inner.code, inner.owner.as_deref()),
            (ReturnCode::Conflict, Some("a"))
        );
        assert_eq!(inner.remaining_secs, 60);
        assert!(
            inner.message.contains("198.18.0.0/16") && inner.message.contains("affinity_overlap"),
            "{}",
            inner.message
        );
        // Less specific, around b's /32 (b holds it by the operator's hand).
        assert_eq!(
            create(&mut p, "admin", "198.20.1.1", 32, "b").code,
            ReturnCode::Ok
        );
        let outer = create(&mut p, "a", "198.20.0.0", 16, "a");
        assert_eq!(
            (outer.code, outer.owner.as_deref()),
            (ReturnCode::Conflict, Some("b"))
        );
        // a's own overlaps are its business, and beside the others is fine.
        assert_eq!(
            create(&mut p, "a", "198.18.1.0", 24, "a").code,
            ReturnCode::Ok
        );
        assert_eq!(
            create(&mut p, "b", "198.19.0.0", 16, "b").code,
            ReturnCode::Ok
        );
        assert_eq!(p.counters().limited.overlap, 2);

        // With affinity_overlap = "allow" both are created.
        let (mut p, r) = plane(&limited("affinity_overlap = \"allow\"", ""));
        assert_eq!(
            create(&mut p, "a", "198.18.0.0", 16, "a").code,
            ReturnCode::Ok
        );
        assert_eq!(
            create(&mut p, "b", "198.18.7.0", 24, "b").code,
            ReturnCode::Ok
        );
        assert_eq!(
            create(&mut p, "b", "198.20.1.1", 32, "b").code,
            ReturnCode::Ok
        );
        assert_eq!(
            create(&mut p, "a", "198.20.0.0", 16, "a").code,
            ReturnCode::Ok
        );
        // The most specific wins on a SYN.
        assert_eq!(r.lookup(WEB, Family::V4, 0xc612_0707, 1), Some(2));
        assert_eq!(r.lookup(WEB, Family::V4, 0xc612_0807, 1), Some(1));
        // An equal key stays a conflict whatever the policy.
        let eq = create(&mut p, "b", "198.18.0.0", 16, "b");
        assert_eq!(
            (eq.code, eq.owner.as_deref()),
            (ReturnCode::Conflict, Some("a"))
        );
        assert_eq!(p.counters().limited.overlap, 0);
    }

    fn state_of(p: &ControlPlane, name: &str) -> BackendState {
        p.dataplane().find_backend(WEB, name).unwrap().state
    }

    /// Backend a's id in the test configuration.
    const A: BackendId = 1;

    #[test]
    fn down_backends_leave_the_scheduler_and_their_requested_affinities_end_after_the_grace() {
        let (mut p, r) = plane(&config_text());
        assert_eq!(
            create(&mut p, "a", "198.18.0.0", 24, "a").code,
            ReturnCode::Ok
        );
        let fixed = TableKey::new(WEB, Family::V4, 0xc612_0100, 24, PortMatch::Any).unwrap();
        p.create_static(fixed, A).unwrap();
        p.set_backend_health("web", "a", false, Some("connect: refused".into()))
            .unwrap();
        assert_eq!(state_of(&p, "a"), BackendState::Down);
        let svc = p.dataplane().service(WEB).unwrap();
        assert_eq!(svc.maglev.shares()[0], 0, "a left the Maglev table");
        assert!(!svc.all_down);
        let st = p.backend_status(A).unwrap().clone();
        assert_eq!(st.check_error.as_deref(), Some("connect: refused"));
        let summary = p.summary();
        let web = summary.services.iter().find(|s| s.name == "web").unwrap();
        let a = web.backends.iter().find(|b| b.name == "a").unwrap();
        assert_eq!(
            (a.state.as_str(), a.check_error.as_deref()),
            ("down", Some("connect: refused"))
        );
        assert_eq!(web.backends[1].state, "up");
        // Its affinities stay in the table during the grace (the workers
        // skip them), but it gets no new ones.
        assert_eq!(r.lookup(WEB, Family::V4, 0xc612_0001, 1), Some(A));
        assert_eq!(
            create(&mut p, "a", "198.18.2.0", 24, "a").code,
            ReturnCode::Draining
        );
        p.expire_at(st.since_ms + 29_999);
        assert!(p.take_notices().is_empty(), "the grace (30 s) is not over");
        p.expire_at(st.since_ms + 30_000);
        let n = p.take_notices();
        assert_eq!(n.len(), 1, "{n:?}");
        assert_eq!(
            (n[0].1.reason, n[0].1.owner.as_str()),
            (EndReason::BackendDown, "a")
        );
        assert_eq!(n[0].0, Some(src()));
        assert_eq!(p.counters().ended_backend_down, 1);
        assert_eq!(r.lookup(WEB, Family::V4, 0xc612_0001, 1), None);
        // The static one stays (skipped while a is down).
        assert_eq!(r.lookup(WEB, Family::V4, 0xc612_0101, 1), Some(A));
        p.expire_at(st.since_ms + 60_000);
        assert!(p.take_notices().is_empty(), "once per spell down");
        // Checks pass again: up, in the table, and it may pin clients.
        p.set_backend_health("web", "a", true, None).unwrap();
        assert_eq!(state_of(&p, "a"), BackendState::Up);
        assert!(p.dataplane().service(WEB).unwrap().maglev.shares()[0] > 0);
        assert_eq!(p.backend_status(A).unwrap().check_error, None);
        assert_eq!(
            create(&mut p, "a", "198.18.0.0", 24, "a").code,
            ReturnCode::Ok
        );
        assert!(p.set_backend_health("web", "zz", false, None).is_err());
    }

    #[test]
    fn every_backend_down_marks_the_service() {
        let (mut p, _r) = plane(&dropping_config());
        p.set_backend_health("web", "a", false, None).unwrap();
        assert!(!p.dataplane().service(WEB).unwrap().all_down);
        p.set_backend_health("web", "b", false, None).unwrap();
        assert!(p.dataplane().service(WEB).unwrap().all_down);
        assert!(!p.dataplane().service(WEB).unwrap().all_unhealthy);
        assert!(p.dataplane().service(WEB).unwrap().maglev.is_empty());
        p.set_backend_health("web", "b", true, None).unwrap();
        assert!(!p.dataplane().service(WEB).unwrap().all_down);
    }

    /// The test configuration with web's `all_unhealthy = "drop"`.
    fn dropping_config() -> String {
        config_text().replacen(
            "max_affinity_duration = \"10m\"",
            "max_affinity_duration = \"10m\"\nall_unhealthy = \"drop\"",
            1,
        )
    }

    /// While the checks hold every backend of a service down (and nothing
    /// else would), they take new connections all the same: up in every
    /// respect, until one passes again.
    #[test]
    fn backends_that_all_fail_their_checks_take_connections_all_the_same() {
        let (mut p, r) = plane(&config_text());
        let web = |p: &ControlPlane| p.dataplane().service(WEB).unwrap().clone();
        assert_eq!(
            create(&mut p, "a", "198.18.0.0", 24, "a").code,
            ReturnCode::Ok
        );
        p.set_backend_health("web", "a", false, Some("connect: refused".into()))
            .unwrap();
        assert_eq!(state_of(&p, "a"), BackendState::Down);
        assert!(!web(&p).all_unhealthy);
        p.set_backend_health("web", "b", false, Some("connect: timed out".into()))
            .unwrap();
        // Both up, both in the Maglev table, the service marked.
        assert_eq!(state_of(&p, "a"), BackendState::Up);
        assert_eq!(state_of(&p, "b"), BackendState::Up);
        let svc = web(&p);
        assert!(svc.all_unhealthy && !svc.all_down);
        assert!(svc.maglev.shares().iter().all(|&s| s > 0));
        // Their checks still say why, and the summary says so.
        let st = p.backend_status(A).unwrap();
        assert_eq!(
            (st.healthy, st.check_error.as_deref()),
            (Some(false), Some("connect: refused"))
        );
        let summary = p.summary();
        let ws = summary.services.iter().find(|s| s.name == "web").unwrap();
        assert!(ws.all_unhealthy);
        assert!(ws.backends.iter().all(|b| b.state == "up"));
        let text = summary.render();
        assert!(
            text.contains(
                "affinity hits (every backend fails its health checks: all take new connections)"
            ),
            "{text}"
        );
        let metrics = crate::report::metrics::render(&summary);
        assert!(metrics.contains("pktdist_service_all_unhealthy{service=\"web\"} 1\n"));
        assert!(metrics.contains("pktdist_service_all_unhealthy{service=\"mail\"} 0\n"));
        assert!(
            !summary
                .services
                .iter()
                .find(|s| s.name == "mail")
                .unwrap()
                .all_unhealthy
        );
        // Up in every respect: the affinity stays, past the grace.
        p.expire_at(p.now_ms() + 45_000);
        assert!(p.take_notices().is_empty());
        assert_eq!(r.lookup(WEB, Family::V4, 0xc612_0001, 1), Some(A));
        // The first that passes ends it: the other is down at once.
        p.set_backend_health("web", "b", true, None).unwrap();
        assert_eq!(state_of(&p, "a"), BackendState::Down);
        assert_eq!(state_of(&p, "b"), BackendState::Up);
        assert!(!web(&p).all_unhealthy);
        // A backend declared down is not spread over: the operator takes
        // b down while a's checks fail: a alone takes new connections.
        assert_eq!(
            call(
                &mut p,
                "admin",
                Request::BackendState {
                    service: Some("web"),
                    backend: Some("b"),
                    state: Declared::Down,
                }
            )
            .code,
            ReturnCode::Ok
        );
        assert_eq!(
            state_of(&p, "a"),
            BackendState::Up,
            "a alone would take them"
        );
        assert_eq!(state_of(&p, "b"), BackendState::Down, "declared down");
        assert!(web(&p).all_unhealthy);
        // A reload to `drop` ends the spreading.
        let cfg = Config::parse(&dropping_config(), "t.toml").unwrap();
        p.replace_services(&cfg).unwrap();
        assert_eq!(state_of(&p, "a"), BackendState::Down);
        assert!(web(&p).all_down && !web(&p).all_unhealthy);
    }

    #[test]
    fn a_batch_of_health_verdicts_is_one_snapshot() {
        let (mut p, _r) = plane(&dropping_config());
        let before = p.counters().snapshots;
        let down = |backend| HealthVerdict {
            service: "web",
            backend,
            up: false,
            error: Some(format!("{backend}: refused")),
        };
        // A verdict on a backend removed since is dropped, not an error.
        p.set_backends_health([down("a"), down("gone"), down("b")])
            .unwrap();
        assert_eq!(p.counters().snapshots, before + 1, "one snapshot for all");
        assert_eq!(state_of(&p, "a"), BackendState::Down);
        assert_eq!(state_of(&p, "b"), BackendState::Down);
        assert!(p.dataplane().service(WEB).unwrap().all_down);
        // The same verdicts again change nothing: no snapshot.
        p.set_backends_health([down("a"), down("b")]).unwrap();
        assert_eq!(p.counters().snapshots, before + 1);
        // A down backend's reason follows its last failed check.
        p.note_check_error("web", "a", Some("connect: timed out"));
        assert_eq!(
            p.backend_status(A).unwrap().check_error.as_deref(),
            Some("connect: timed out")
        );
        assert_eq!(p.counters().snapshots, before + 1);
        // An up backend has none.
        p.set_backend_health("web", "a", true, None).unwrap();
        p.note_check_error("web", "a", Some("connect: timed out"));
        assert_eq!(p.backend_status(A).unwrap().check_error, None);
    }

    #[test]
    fn backends_drain_themselves_and_the_operator_drains_any() {
        let (mut p, r) = plane(&config_text());
        let st = |service, backend, state| Request::BackendState {
            service,
            backend,
            state,
        };
        assert_eq!(
            create(&mut p, "a", "198.18.0.0", 24, "a").code,
            ReturnCode::Ok
        );
        // a drains itself (the server fills in its name; the plane takes
        // the sender's when none is named).
        let d = call(&mut p, "a", st(None, None, Declared::Drain));
        assert_eq!(
            (d.code, d.message.as_ref()),
            (ReturnCode::Ok, "web/a draining")
        );
        assert_eq!(state_of(&p, "a"), BackendState::Draining);
        assert_eq!(p.dataplane().service(WEB).unwrap().maglev.shares()[0], 0);
        // Its affinity is honoured, but neither created nor extended; it
        // may cancel.
        assert_eq!(r.lookup(WEB, Family::V4, 0xc612_0001, 1), Some(A));
        for req in [
            Request::AffinityCreate(op("198.18.9.0", 24, Some("a"), 60)),
            Request::AffinityExtend(op("198.18.0.0", 24, Some("a"), 60)),
        ] {
            let refused = call(&mut p, "a", req);
            assert_eq!(refused.code, ReturnCode::Draining, "{}", refused.message);
        }
        assert_eq!(
            call(
                &mut p,
                "a",
                Request::AffinityCancel(op("198.18.0.0", 24, Some("a"), 0))
            )
            .code,
            ReturnCode::Ok
        );
        // A backend declares only its own state.
        let other = call(&mut p, "a", st(Some("web"), Some("b"), Declared::Down));
        assert_eq!(other.code, ReturnCode::NotAuthorized);
        // The operator drains b; b's own UP does not undo it.
        assert_eq!(
            call(&mut p, "admin", st(Some("web"), Some("b"), Declared::Drain)).code,
            ReturnCode::Ok
        );
        assert_eq!(
            call(&mut p, "b", st(None, None, Declared::Up)).code,
            ReturnCode::Ok
        );
        assert_eq!(state_of(&p, "b"), BackendState::Draining);
        assert_eq!(
            call(&mut p, "admin", st(Some("web"), Some("b"), Declared::Up)).code,
            ReturnCode::Ok
        );
        assert_eq!(state_of(&p, "b"), BackendState::Up);
        // a undrains itself; DOWN takes it out at once.
        call(&mut p, "a", st(None, None, Declared::Up));
        assert_eq!(state_of(&p, "a"), BackendState::Up);
        call(&mut p, "a", st(Some("web"), None, Declared::Down));
        assert_eq!(state_of(&p, "a"), BackendState::Down);
        // The listing shows who said what.
        let Payload::Backends { entries, .. } = call(
            &mut p,
            "admin",
            Request::BackendList {
                service: Some("web"),
                offset: 0,
                limit: 0,
            },
        )
        .payload
        else {
            panic!("no backends");
        };
        let a = entries.iter().find(|e| e.backend == "a").unwrap();
        assert_eq!(
            (a.state, a.app, a.admin, a.healthy),
            (BackendState::Down, Declared::Down, Declared::Up, None)
        );
        // Weight 0 drains as well, and a weight brings it back.
        call(&mut p, "a", st(None, None, Declared::Up));
        let w = |weight| Request::BackendSetWeight {
            service: "web",
            backend: "b",
            weight,
        };
        call(&mut p, "admin", w(0));
        assert_eq!(state_of(&p, "b"), BackendState::Draining);
        call(&mut p, "admin", w(5));
        assert_eq!(state_of(&p, "b"), BackendState::Up);
        // Names that do not exist.
        let nf = call(
            &mut p,
            "admin",
            st(Some("web"), Some("zz"), Declared::Drain),
        );
        assert_eq!(nf.code, ReturnCode::NotFound);
        let nf = call(
            &mut p,
            "admin",
            st(Some("nope"), Some("a"), Declared::Drain),
        );
        assert_eq!(nf.code, ReturnCode::NotFound);
        let no_name = call(&mut p, "admin", st(None, None, Declared::Drain));
        assert_eq!(no_name.code, ReturnCode::Invalid);
    }

    #[test]
    fn weight_zero_in_the_configuration_starts_draining() {
        let text = config_text().replace(
            "name = \"b\"\naddress = \"10.0.0.2\"",
            "name = \"b\"\naddress = \"10.0.0.2\"\nweight = 0",
        );
        let (p, _r) = plane(&text);
        assert_eq!(state_of(&p, "b"), BackendState::Draining);
        assert_eq!(state_of(&p, "a"), BackendState::Up);
    }

    /// A reload takes the backends and their weights from the file: a
    /// weight set at run time goes back to the file's and a backend added
    /// at run time goes (its affinities end), while what the operator and
    /// the applications declared for the backends kept stays.
    #[test]
    fn a_reload_takes_backends_and_weights_from_the_file_and_keeps_declarations() {
        let text = config_text();
        let (mut p, r) = plane(&text);
        let weight_of =
            |p: &ControlPlane, name| p.dataplane().find_backend(WEB, name).unwrap().weight;
        let file_weight = weight_of(&p, "a");
        let st = |backend, state| Request::BackendState {
            service: Some("web"),
            backend: Some(backend),
            state,
        };
        assert_eq!(
            call(&mut p, "admin", st("b", Declared::Drain)).code,
            ReturnCode::Ok
        );
        let w = Request::BackendSetWeight {
            service: "web",
            backend: "a",
            weight: file_weight + 7,
        };
        assert_eq!(call(&mut p, "admin", w).code, ReturnCode::Ok);
        let add = Request::BackendAdd(BackendSpec {
            service: "web",
            backend: "c",
            addr: "10.0.0.3".parse().unwrap(),
            mac: None,
            weight: 1,
        });
        assert_eq!(call(&mut p, "admin", add).code, ReturnCode::Ok);
        assert_eq!(
            call(
                &mut p,
                "c",
                Request::AffinityCreate(op("198.18.0.0", 24, Some("c"), 60))
            )
            .code,
            ReturnCode::Ok
        );
        assert_eq!(weight_of(&p, "a"), file_weight + 7);
        assert!(r.lookup(WEB, Family::V4, 0xc612_0001, 1).is_some());

        let cfg = Config::parse(&text, "t.toml").unwrap();
        let removed = p.replace_services(&cfg).unwrap();
        assert_eq!(removed.len(), 1, "the backend added at run time goes");
        assert!(p.dataplane().find_backend(WEB, "c").is_none());
        assert_eq!(
            r.lookup(WEB, Family::V4, 0xc612_0001, 1),
            None,
            "its affinity ended"
        );
        assert_eq!(weight_of(&p, "a"), file_weight, "the file's weight again");
        assert_eq!(state_of(&p, "b"), BackendState::Draining, "the drain stays");
        assert_eq!(state_of(&p, "a"), BackendState::Up);
    }

    /// A backend the checks hold down keeps that state under a new address
    /// (a new id) from the reload's own snapshot on.
    #[test]
    fn a_held_down_backend_moved_to_another_address_is_published_down() {
        let (mut p, _) = plane(&config_text());
        let old = p.dataplane().find_backend(WEB, "b").unwrap().id;
        p.set_backend_health("web", "b", false, Some("connect: refused".into()))
            .unwrap();
        assert_eq!(state_of(&p, "b"), BackendState::Down);
        let moved = config_text().replace("address = \"10.0.0.2\"", "address = \"10.0.0.9\"");
        let snapshots = p.counters().snapshots;
        p.replace_services(&Config::parse(&moved, "t.toml").unwrap())
            .unwrap();
        assert_eq!(p.counters().snapshots, snapshots + 1, "one snapshot");
        assert_ne!(p.dataplane().find_backend(WEB, "b").unwrap().id, old);
        assert_eq!(state_of(&p, "b"), BackendState::Down);
        let id = p.dataplane().find_backend(WEB, "b").unwrap().id;
        let why = p.states.get(id).and_then(|s| s.check_error.clone());
        assert_eq!(why.as_deref(), Some("connect: refused"));
    }

    /// A reload that removes a down backend and adds another that takes
    /// its id (ids are handed out from where the last left off; with every
    /// other id in use, the newcomer gets the one just given up): the
    /// newcomer starts up, not with what made the removed one down.
    #[test]
    fn a_new_backend_on_a_removed_one_s_id_starts_afresh() {
        // m1, a, b and 4,093 more: every id of the 4,096 in use.
        let more: String = (0..4093)
            .map(|i| {
                let a = format!("10.1.{}.{}", i / 256, i % 256);
                format!("[[services.backends]]\nname = \"x{i}\"\naddress = \"{a}\"\n")
            })
            .collect();
        let text = config_text().replace(
            "max_affinity_duration = \"10m\"",
            "max_affinity_duration = \"10m\"\nmaglev_table_size = 409517",
        ) + &more;
        let (mut p, _) = plane(&text);
        let b = p.dataplane().find_backend(WEB, "b").unwrap().id;
        let down = Request::BackendState {
            service: Some("web"),
            backend: Some("b"),
            state: Declared::Down,
        };
        assert_eq!(call(&mut p, "admin", down).code, ReturnCode::Ok);
        assert_eq!(state_of(&p, "b"), BackendState::Down);
        let text = text.replace("name = \"b\"", "name = \"c\"");
        p.replace_services(&Config::parse(&text, "t.toml").unwrap())
            .unwrap();
        assert_eq!(
            p.dataplane().find_backend(WEB, "c").unwrap().id,
            b,
            "b's id"
        );
        assert_eq!(state_of(&p, "c"), BackendState::Up);
    }

    #[test]
    fn saved_state_comes_back_in_a_new_plane_with_its_time_left() {
        let (mut p, _) = plane(&config_text());
        for (client, owner, secs) in [("198.18.0.0", "a", 60), ("198.18.1.0", "b", 300)] {
            let r = call(
                &mut p,
                owner,
                Request::AffinityCreate(op(client, 24, Some(owner), secs)),
            );
            assert_eq!(r.code, ReturnCode::Ok);
        }
        // A static one is the configuration's: not saved.
        let k = TableKey::new(WEB, Family::V4, 0x0a0a_0a00, 24, PortMatch::Any).unwrap();
        p.create_static(k, 1).unwrap();
        let wall = 1_800_000_000_000;
        let saved = p.saved_state(wall);
        assert_eq!(saved.saved_unix_ms, wall);
        assert_eq!(saved.affinities.len(), 2);
        let a = saved.affinities.iter().find(|a| a.owner == "a").unwrap();
        assert_eq!((a.service.as_str(), a.prefix_len), ("web", 24));
        assert!((wall + 59_000..=wall + 60_000).contains(&a.expires_unix_ms));
        assert_eq!(a.notify, Some(src()));

        // Restored 100 s later: a's expired, b's has about 200 s left.
        let (mut q, r) = plane(&config_text());
        let done = q.restore(&saved.affinities, wall + 100_000);
        assert_eq!((done.installed, done.expired, done.gone), (1, 1, 0));
        assert_eq!(r.lookup(WEB, Family::V4, 0xc612_0101, 1), Some(2));
        assert_eq!(r.lookup(WEB, Family::V4, 0xc612_0001, 1), None);
        let left = first_time_left(&q);
        assert!(
            left.is_some_and(|l| (190_000..=200_000).contains(&l)),
            "{left:?}"
        );
        let n = q.take_notices();
        assert_eq!(n.len(), 1);
        assert_eq!(
            (n[0].1.owner.as_str(), n[0].1.reason),
            ("a", EndReason::Expired)
        );
        assert_eq!(n[0].0, Some(src()));
        assert_eq!(q.counters().ended_expired, 1);

        // Without backend b, its affinity ends BACKEND_REMOVED; a static
        // affinity of another backend on the same key refuses it.
        let no_b = config_text().replace(
            "name = \"b\"\naddress = \"10.0.0.2\"",
            "name = \"c\"\naddress = \"10.0.0.2\"",
        );
        let (mut q, _) = plane(&no_b);
        assert_eq!(q.restore(&saved.affinities, wall).gone, 1);
        let n = q.take_notices();
        assert!(n
            .iter()
            .any(|(_, x)| x.owner == "b" && x.reason == EndReason::BackendRemoved));
        // Web on another port is another service: both end, b's notice
        // naming the service it was on.
        let moved = config_text().replace("port = 80\n", "port = 8080\n");
        assert_ne!(moved, config_text());
        let (mut q, _) = plane(&moved);
        assert_eq!(q.restore(&saved.affinities, wall).gone, 2);
        let n = q.take_notices();
        let b = n.iter().find(|(_, x)| x.owner == "b").unwrap();
        assert_eq!(b.1.reason, EndReason::BackendRemoved);
        assert_eq!(b.1.key.service.port, 80);
        let (mut q, _) = plane(&config_text());
        let kb = TableKey::new(WEB, Family::V4, 0xc612_0100, 24, PortMatch::Any).unwrap();
        q.create_static(kb, 1).unwrap();
        let done = q.restore(&saved.affinities, wall);
        assert_eq!((done.installed, done.refused), (1, 1));
        assert_eq!(q.take_notices()[0].1.reason, EndReason::Cancelled);

        // An expiry beyond what the service grants (a file from another
        // configuration, or forged) is cut to the service's longest.
        let mut far = saved.affinities.clone();
        far.retain(|a| a.owner == "b");
        far[0].expires_unix_ms = u64::MAX;
        let (mut q, r) = plane(&config_text());
        assert_eq!(q.restore(&far, wall).installed, 1);
        assert_eq!(r.lookup(WEB, Family::V4, 0xc612_0101, 1), Some(2));
        let max = q.dp.service(WEB).unwrap().max_affinity;
        let left = first_time_left(&q);
        assert!(
            left.is_some_and(|l| l > 0 && u128::from(l) <= max.as_millis()),
            "{left:?} left, the service grants {max:?}"
        );
    }
}
