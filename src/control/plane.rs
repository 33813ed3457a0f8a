//! The control plane: the state behind the affinity and backend requests.
//!
//! [`ControlPlane`] holds the service registry, the affinity manager (the
//! only writer of the lock-free affinity table) and the dataplane cell the
//! workers read. It answers affinity and backend requests, enforcing who may
//! do what, publishes a new snapshot after each registry change, expires
//! affinities, and turns every affinity that ends into a notice for its
//! owner.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::affinity::key::TableKey;
use crate::affinity::manager::{AffinityManager, Ended, Record};
use crate::affinity::AffinityError;
use crate::config::Config;
use crate::control::counters::PlaneCounters;
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
use crate::types::{BackendId, EndReason, PortMatch};

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

/// What an affinity request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AffinityAction {
    Create,
    Extend,
    Cancel,
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
        ControlPlane {
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
        }
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
    /// current snapshot, the affinities installed and how long ended ones
    /// lived.
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
        s
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
            Request::Reload | Request::Stats { .. } => Response::new(ReturnCode::Unsupported),
        }
    }

    /// Removes expired affinities; their notices wait in
    /// [`take_notices`](Self::take_notices).
    pub fn expire(&mut self) {
        let now = self.now_ms();
        let mut ended = Vec::new();
        self.affinities.expire(now, &mut ended);
        self.counters.ended_expired += ended.len() as u64;
        self.queue_notices(ended);
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
            let lived = wall_ms.saturating_sub(a.created_unix_ms).max(1);
            let _ = self.lifetimes.record(lived);
            self.notices.push((
                a.notify,
                EndedNotice {
                    key: AffinityKey {
                        service: a.service_addr,
                        client: a.client,
                        prefix_len: a.prefix_len,
                        ports: a.ports,
                    },
                    owner: a.owner.clone(),
                    reason,
                },
            ));
        }
        done
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
        let dp = next.snapshot()?;
        // A kept service keeps its id (the registry matches services by
        // name, VIP, port and protocol), so its affinities stay where they
        // are. Every affinity is owned by a backend of its service, so a
        // removed service's affinities end with its backends.
        for id in &removed {
            self.end_backend(*id);
        }
        self.commit(next, dp);
        Ok(removed)
    }

    fn queue_notices(&mut self, ended: Vec<Ended>) {
        let now = self.now_ms();
        for e in ended {
            let _ = self
                .lifetimes
                .record(now.saturating_sub(e.created_ms).max(1));
            if let Some(n) = self.notice(&e) {
                self.notices.push((e.notify, n));
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
        self.counter_base.update(&self.dp, &dp, &self.workers);
        self.registry = next;
        self.cell.publish(dp);
        self.dp = self.cell.load();
        self.counters.snapshots += 1;
    }

    /// Ends every affinity a removed backend owned. Call before publishing
    /// the snapshot without it, so the notices can still name it.
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
            .find_service(
                ip_bits(key.service.addr),
                key.service.port,
                key.service.proto,
            )
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
            AffinityError::TableFull => Response::new(ReturnCode::TableFull).with_message(format!(
                "affinity table full ({} entries)",
                self.affinities.capacity()
            )),
            AffinityError::Invalid(m) => Response::new(ReturnCode::Invalid).with_message(m),
        }
    }

    fn affinity_op(
        &mut self,
        action: AffinityAction,
        is_admin: bool,
        op: &AffinityOp<'_>,
    ) -> Response {
        let (svc, key) = match self.table_key(&op.key) {
            Ok(v) => v,
            Err(r) => return r,
        };
        let now = self.now_ms();
        if action == AffinityAction::Cancel && is_admin && op.owner.is_none() {
            // The operator cancels whoever owns it.
            return match self.cancel(&key, None) {
                Ok(()) => Response::ok(),
                Err(e) => self.affinity_error(e, now, &key),
            };
        }
        let owner = match self.owner_of(svc, op) {
            Ok(o) => o,
            Err(r) => return r,
        };
        let max = svc.max_affinity.as_millis() as u64;
        let duration = u64::from(op.duration_secs) * 1000;
        if action != AffinityAction::Cancel && (duration == 0 || duration > max) {
            return Response::new(ReturnCode::Invalid).with_message(format!(
                "duration must be 1 to {} seconds on service {}",
                max / 1000,
                svc.name
            ));
        }
        if action == AffinityAction::Create && self.dp.backend(owner).is_some_and(|b| b.weight == 0)
        {
            return Response::new(ReturnCode::Invalid)
                .with_message("backend is draining (weight 0): no new affinities");
        }
        let result = match action {
            AffinityAction::Create => {
                self.affinities
                    .create(key, owner, Some(duration), op.notify, now)
            }
            AffinityAction::Extend => self.affinities.extend(&key, owner, duration, now),
            AffinityAction::Cancel => {
                return match self.cancel(&key, Some(owner)) {
                    Ok(()) => Response::ok(),
                    Err(e) => self.affinity_error(e, now, &key),
                }
            }
        };
        match result {
            Ok(g) => Response::ok().with_remaining(g.remaining_ms.map_or(u32::MAX, secs)),
            Err(e) => self.affinity_error(e, now, &key),
        }
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
            Some(s) => match self.dp.find_service(ip_bits(s.addr), s.port, s.proto) {
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
        // A stable order so that pages do not overlap.
        let port_order = |p: PortMatch| match p {
            PortMatch::Any => (0, 0, 0),
            PortMatch::One(x) => (1, x, x),
            PortMatch::Range(a, b) => (2, a, b),
        };
        entries.sort_unstable_by_key(|(k, _)| {
            (k.service(), k.prefix_len(), k.addr(), port_order(k.ports()))
        });
        let offset = offset as usize;
        let limit = if limit == 0 {
            usize::MAX
        } else {
            limit as usize
        };
        let page: Vec<AffinityEntry> = entries
            .iter()
            .skip(offset)
            .take(limit)
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
        let more = entries.len() > offset.saturating_add(page.len());
        Response::affinities(page, more)
    }

    fn backend_list(&self, service: Option<&str>, offset: u32, limit: u16) -> Response {
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
                    .map(|b| BackendEntry {
                        service: s.name.clone(),
                        backend: b.name.clone(),
                        addr: b.addr,
                        mac: b.mac,
                        weight: b.weight,
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
        let dp = match next.snapshot() {
            Ok(dp) => dp,
            Err(e) => return registry_error(e),
        };
        if let Some(id) = removed {
            self.end_backend(id);
        }
        self.commit(next, dp);
        Response::ok()
    }
}

/// Milliseconds to whole seconds, rounded up, saturating.
fn secs(ms: u64) -> u32 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::testing::{call, config_text, op, plane, src, WEB};
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
            call(
                &mut p,
                "a",
                Request::AffinityCreate(op("198.18.0.0", 24, Some("a"), 60))
            )
            .code,
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
        assert_eq!(d.code, ReturnCode::Invalid);
        // The draining backend keeps its affinity and may extend it.
        assert_eq!(
            call(
                &mut p,
                "a",
                Request::AffinityExtend(op("198.18.0.0", 24, Some("a"), 120))
            )
            .code,
            ReturnCode::Ok
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
        let left = q
            .affinities()
            .list()
            .next()
            .unwrap()
            .1
            .remaining_ms(q.now_ms());
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
        let (mut q, _) = plane(&config_text());
        let kb = TableKey::new(WEB, Family::V4, 0xc612_0100, 24, PortMatch::Any).unwrap();
        q.create_static(kb, 1).unwrap();
        let done = q.restore(&saved.affinities, wall);
        assert_eq!((done.installed, done.refused), (1, 1));
        assert_eq!(q.take_notices()[0].1.reason, EndReason::Cancelled);
    }
}
