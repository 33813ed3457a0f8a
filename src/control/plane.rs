//! The control plane behind the protocol: what the control thread owns.
//!
//! [`ControlPlane`] holds the service registry, the affinity manager (the
//! only writer of the lock-free affinity table) and the dataplane cell the
//! workers read. It answers authenticated requests ([`ControlHandler`]),
//! enforces who may do what, expires affinities and collects the ended
//! notifications to send.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::affinity::{self, AffinityError};

use crate::affinity::manager::{AffinityManager, Ended};

use crate::affinity::auto::AutoAffinityTable;
use std::path::PathBuf;

use crate::config::Config;
use crate::control::registry::{NewBackend, RegistryError, ServiceRegistry};
use crate::control::server::{ControlHandler, Response, ServerCounters};
use crate::datapath::counters::WorkerCounters;
use crate::datapath::latency::{new_histogram, Percentiles};
use crate::datapath::snapshot::{Dataplane, DataplaneCell, Service};
use crate::net::ip_bits;
use crate::protocol::auth::{Allowlist, Key, Keyring};
use crate::protocol::message::{
    AffinityEntry, AffinityOp, BackendEntry, EndedNotice, Request, ReturnCode, ServiceAddr,
};
use crate::report::summary::{CounterBase, PortSummary, Summary};
use crate::types::{BackendId, PortMatch};

/// Counts of what the control plane did, by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlaneCounters {
    pub requests: u64,
    pub by_code: [u64; ReturnCode::ALL.len()],
    pub ended_expired: u64,
    pub ended_cancelled: u64,
    pub ended_backend_removed: u64,
    pub snapshots: u64,
}

/// The state of the control thread.
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
    /// The server's counters and latency, as of the control loop's last
    /// look (the server calls us, so we cannot look at it then).
    server: (ServerCounters, Percentiles),
    /// How long ended affinities lived (ms).
    lifetimes: hdrhistogram::Histogram<u64>,
    /// Reads the ports' device counters (set by the runtime).
    port_stats: Option<PortStatsSource>,
    /// The shared automatic-affinity table, for its statistics.
    auto: Option<Arc<AutoAffinityTable>>,
    /// The configuration file and what was last applied from it, for reload.
    config: Option<(PathBuf, Config)>,
    /// Keys and allowed networks of a reloaded configuration, for the
    /// control loop to hand to the server.
    pending_auth: Option<(Allowlist, Keyring)>,
}

/// A source of the ports' device counters.
pub type PortStatsSource = Box<dyn Fn() -> Vec<PortSummary> + Send>;

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
            server: (ServerCounters::default(), Percentiles::default()),
            lifetimes: new_histogram(),
            port_stats: None,
            auto: None,
            config: None,
            pending_auth: None,
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

    /// The file `reload` re-reads, and the configuration running now.
    pub fn set_config(&mut self, path: PathBuf, running: Config) {
        self.config = Some((path, running));
    }

    /// New keys and allowed networks after a reload, once.
    pub fn take_pending_auth(&mut self) -> Option<(Allowlist, Keyring)> {
        self.pending_auth.take()
    }

    /// Re-reads the configuration file and applies it: services and
    /// backends (one new snapshot: workers pick it up without stopping;
    /// kept backends keep their ids, so established connections stay),
    /// static affinities, keys and allowed networks. A bad file changes
    /// nothing. Returns what was done, naming settings that need a restart.
    pub fn reload_from_file(&mut self) -> Result<String, String> {
        let (path, running) = self
            .config
            .as_ref()
            .ok_or("no configuration file is known to reload")?;
        let path = path.clone();
        let next = Config::load(&path).map_err(|e| e.to_string())?;
        let auth = auth_from_config(&next)?;
        let restart: Vec<&str> = [
            (
                "eal",
                format!("{:?}", running.eal) != format!("{:?}", next.eal),
            ),
            (
                "cores",
                format!("{:?}", running.cores) != format!("{:?}", next.cores),
            ),
            (
                "ports",
                format!("{:?}", running.ports) != format!("{:?}", next.ports),
            ),
            (
                "mempool",
                format!("{:?}", running.mempool) != format!("{:?}", next.mempool),
            ),
            (
                "flow",
                format!("{:?}", running.flow) != format!("{:?}", next.flow),
            ),
            (
                "affinity",
                format!("{:?}", running.affinity) != format!("{:?}", next.affinity),
            ),
            (
                "control.listen",
                running.control.listen != next.control.listen,
            ),
            ("icmp", running.icmp != next.icmp),
        ]
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| *name)
        .collect();
        let running = running.clone();
        let removed = self.reload(&next).map_err(|e| e.to_string())?;
        let dropped = self.drop_static_affinities(&running, &next);
        let mut statics = self.add_static_affinities(&next);
        if dropped > 0 {
            statics.push_str(&format!("; {dropped} static affinit(ies) removed"));
        }
        self.pending_auth = Some(auth);
        let mut msg = format!(
            "reloaded {}: {} service(s), {} backend(s) removed{}",
            path.display(),
            next.services.len(),
            removed.len(),
            statics
        );
        if !restart.is_empty() {
            msg.push_str(&format!(
                "; changes to [{}] take effect at the next restart",
                restart.join("], [")
            ));
        }
        if let Some((_, running)) = self.config.as_mut() {
            *running = next;
        }
        Ok(msg)
    }

    /// Installs the configuration's static affinities that are not there
    /// yet; returns a note on those that could not be.
    pub fn add_static_affinities(&mut self, cfg: &Config) -> String {
        let mut failed = Vec::new();
        let now = self.now_ms();
        for (i, resolved) in self.static_keys(cfg).into_iter().enumerate() {
            let result = resolved.and_then(|(key, owner)| {
                if self.affinities.get(&key).is_some_and(|r| r.owner == owner) {
                    return Ok(());
                }
                self.affinities
                    .create(key, owner, None, None, now)
                    .map(|_| ())
                    .map_err(|_| "refused (conflict or table full)")
            });
            if let Err(e) = result {
                failed.push(format!("affinities[{i}]: {e}"));
            }
        }
        if failed.is_empty() {
            String::new()
        } else {
            format!("; static affinities not installed: {}", failed.join(", "))
        }
    }

    /// A configuration's static affinities as table keys and owners, against
    /// the current snapshot.
    fn static_keys(
        &self,
        cfg: &Config,
    ) -> Vec<Result<(affinity::key::TableKey, BackendId), &'static str>> {
        cfg.affinities
            .iter()
            .map(|a| {
                let svc = self.dp.service_named(&a.service).ok_or("no such service")?;
                let owner = self
                    .dp
                    .find_backend(svc.id, &a.backend)
                    .ok_or("no such backend")?
                    .id;
                let key = affinity::key::TableKey::new(
                    svc.id,
                    crate::net::family(a.client.addr),
                    ip_bits(a.client.addr),
                    a.client.prefix,
                    a.client_port,
                )
                .map_err(|_| "bad key")?;
                Ok((key, owner))
            })
            .collect()
    }

    /// Removes the static affinities `old` declared that `new` does not.
    fn drop_static_affinities(&mut self, old: &Config, new: &Config) -> usize {
        let keep: Vec<affinity::key::TableKey> = self
            .static_keys(new)
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
            .collect();
        let gone: Vec<(affinity::key::TableKey, BackendId)> = self
            .static_keys(old)
            .into_iter()
            .flatten()
            .filter(|(k, owner)| {
                !keep.contains(k)
                    && self
                        .affinities
                        .get(k)
                        .is_some_and(|r| r.owner == *owner && r.expires.is_none())
            })
            .collect();
        let now = self.now_ms();
        let mut ended = Vec::new();
        for (k, _) in &gone {
            if let Ok(e) = self.affinities.cancel(k, None, now) {
                ended.push(e);
            }
        }
        self.counters.ended_cancelled += ended.len() as u64;
        let n = ended.len();
        self.queue_notices(ended);
        n
    }

    /// The automatic-affinity table, for statistics.
    pub fn set_auto_affinity(&mut self, table: Arc<AutoAffinityTable>) {
        self.auto = Some(table);
    }

    /// Where the ports' device counters come from.
    pub fn set_port_stats(&mut self, source: PortStatsSource) {
        self.port_stats = Some(source);
    }

    /// Records the server's counters and latency for statistics.
    pub fn observe_server(
        &mut self,
        counters: &ServerCounters,
        latency: &hdrhistogram::Histogram<u64>,
    ) {
        self.server = (*counters, Percentiles::of(latency));
    }

    /// The statistics snapshot: the run so far, with ports, control
    /// latency and affinity lifetimes.
    pub fn summary(&self) -> Summary {
        let secs = self.epoch.elapsed().as_secs_f64();
        let mut s = Summary::collect(
            &self.workers,
            &self.dp,
            secs,
            self.affinities.len(),
            &self.counter_base,
        );
        if let Some(ports) = &self.port_stats {
            s.ports = ports();
        }
        s.control_latency_ns = self.server.1;
        if let Some(auto) = &self.auto {
            s.auto_affinity_pins = auto.len_active(self.now_ms());
            s.auto_affinity_table_full = auto.stats().table_full;
        }
        s.affinity_lifetime_ms = Percentiles::of(&self.lifetimes);
        let (c, p) = (&self.server.0, &self.counters);
        let refused: serde_json::Map<String, serde_json::Value> = c
            .refused
            .as_array()
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        s.extra.insert(
            "control".into(),
            serde_json::json!({
                "received": c.received, "answered": c.replies_sent, "notifications": c.notices_sent,
                "send_errors": c.send_errors, "refused": refused, "handled": p.requests,
                "by_code": ReturnCode::ALL.iter().map(|rc| (rc.name(), p.by_code[*rc as usize])).collect::<std::collections::BTreeMap<_, _>>(),
                "ended": {"expired": p.ended_expired, "cancelled": p.ended_cancelled, "backend_removed": p.ended_backend_removed},
                "snapshots": p.snapshots,
            }),
        );
        s
    }

    /// Removes expired affinities; their notifications wait in
    /// [`take_notices`](Self::take_notices).
    pub fn tick(&mut self) {
        let now = self.now_ms();
        let mut ended = Vec::new();
        self.affinities.expire(now, &mut ended);
        self.counters.ended_expired += ended.len() as u64;
        self.queue_notices(ended);
    }

    /// The affinities that ended since the last call: (where to send the
    /// notification, if the owner gave an address; the notice).
    pub fn take_notices(&mut self) -> Vec<(Option<SocketAddr>, EndedNotice)> {
        std::mem::take(&mut self.notices)
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

    /// Builds and publishes a new snapshot after a registry change.
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

    /// Applies a new configuration (hot reload): services and backends
    /// change in one snapshot; removed backends' affinities end.
    pub fn reload(&mut self, cfg: &crate::config::Config) -> Result<Vec<BackendId>, RegistryError> {
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

    /// The service a wire key names, and the key in table form.
    fn table_key(
        &self,
        key: &crate::protocol::message::AffinityKey,
    ) -> Result<(&Service, affinity::key::TableKey), Response> {
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
        let k = affinity::key::TableKey::new(
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

    fn affinity_error(
        &self,
        e: AffinityError,
        now: u64,
        key: &affinity::key::TableKey,
    ) -> Response {
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

    fn affinity_op(&mut self, is_admin: bool, request: &Request<'_>) -> Response {
        let (op, kind) = match request {
            Request::AffinityCreate(op) => (op, 0),
            Request::AffinityExtend(op) => (op, 1),
            Request::AffinityCancel(op) => (op, 2),
            _ => return Response::new(ReturnCode::Unsupported),
        };
        let (svc, key) = match self.table_key(&op.key) {
            Ok(v) => v,
            Err(r) => return r,
        };
        let now = self.now_ms();
        if kind == 2 && is_admin && op.owner.is_none() {
            // The operator cancels whoever owns it.
            return match self.affinities.cancel(&key, None, now) {
                Ok(ended) => {
                    self.counters.ended_cancelled += 1;
                    self.queue_notices(vec![ended]);
                    Response::ok()
                }
                Err(e) => self.affinity_error(e, now, &key),
            };
        }
        let owner = match self.owner_of(svc, op) {
            Ok(o) => o,
            Err(r) => return r,
        };
        let max = svc.max_affinity.as_millis() as u64;
        let duration = u64::from(op.duration_secs) * 1000;
        if kind != 2 && (duration == 0 || duration > max) {
            return Response::new(ReturnCode::Invalid).with_message(format!(
                "duration must be 1 to {} seconds on service {}",
                max / 1000,
                svc.name
            ));
        }
        if kind == 0 && self.dp.backend(owner).is_some_and(|b| b.weight == 0) {
            return Response::new(ReturnCode::Invalid)
                .with_message("backend is draining (weight 0): no new affinities");
        }
        let result = match kind {
            0 => self
                .affinities
                .create(key, owner, Some(duration), op.notify, now),
            1 => self.affinities.extend(&key, owner, duration, now),
            _ => {
                let who = if is_admin && op.owner.is_none() {
                    None
                } else {
                    Some(owner)
                };
                match self.affinities.cancel(&key, who, now) {
                    Ok(ended) => {
                        self.counters.ended_cancelled += 1;
                        self.queue_notices(vec![ended]);
                        return Response::ok();
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match result {
            Ok(g) => Response::ok().with_remaining(g.remaining_ms.map_or(u32::MAX, secs)),
            Err(e) => self.affinity_error(e, now, &key),
        }
    }

    fn affinity_list(&self, sender: &str, is_admin: bool, request: &Request<'_>) -> Response {
        let Request::AffinityList {
            service,
            owner,
            offset,
            limit,
        } = request
        else {
            return Response::new(ReturnCode::Unsupported);
        };
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
        // A backend sees only its own affinities.
        let owner = if is_admin { *owner } else { Some(sender) };
        let now = self.now_ms();
        let mut entries: Vec<(&affinity::key::TableKey, &affinity::manager::Record)> = self
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
        let offset = *offset as usize;
        let limit = if *limit == 0 {
            usize::MAX
        } else {
            *limit as usize
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

impl ControlHandler for ControlPlane {
    fn handle(
        &mut self,
        sender: &str,
        is_admin: bool,
        _source: SocketAddr,
        request: &Request<'_>,
        _now_ms: u64,
    ) -> Response {
        self.counters.requests += 1;
        let resp = match request {
            Request::AffinityCreate(_)
            | Request::AffinityExtend(_)
            | Request::AffinityCancel(_) => self.affinity_op(is_admin, request),
            Request::AffinityList { .. } => self.affinity_list(sender, is_admin, request),
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
            Request::Reload if !is_admin => {
                Response::new(ReturnCode::NotAuthorized).with_message("reload needs the admin key")
            }
            Request::Reload => match self.reload_from_file() {
                Ok(msg) => Response::ok().with_message(msg),
                Err(e) => Response::new(ReturnCode::Invalid)
                    .with_message(format!("reload refused, running configuration kept: {e}")),
            },
            Request::Stats { .. } => Response::stats(
                serde_json::to_string(&self.summary())
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
            ),
        };
        if let Some(n) = self.counters.by_code.get_mut(resp.code as usize) {
            *n += 1;
        }
        resp
    }
}

/// The control server's allowed networks and keyring from a configuration.
pub fn auth_from_config(cfg: &Config) -> Result<(Allowlist, Keyring), String> {
    let mut keyring = Keyring::new();
    for (name, key) in &cfg.control.keys {
        let key = Key::new(&key.0).map_err(|e| format!("[control.keys] {name}: {e}"))?;
        keyring
            .insert(name, key)
            .map_err(|e| format!("[control.keys] {name}: {e}"))?;
    }
    Ok((
        Allowlist::new(cfg.control.allowed_networks.clone()),
        keyring,
    ))
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
fn wire_key(svc: &Service, k: &affinity::key::TableKey) -> crate::protocol::message::AffinityKey {
    let client = crate::net::bits_ip(k.family(), k.addr());
    crate::protocol::message::AffinityKey {
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
    use crate::affinity::table::{AffinityReader, AffinityTable};
    use crate::control::server::Payload;
    use crate::protocol::message::{AffinityKey, BackendSpec};
    use crate::types::EndReason;
    use crate::types::Family;
    use crate::types::ServiceId;

    /// The first service of the test configuration, before web.
    const MAIL: &str = r#"
[[services]]
name = "mail"
vip = "192.0.2.25"
port = 25
protocol = "tcp"
forwarding = "ipip"
ipip_source = "198.51.100.1"
[[services.backends]]
name = "m1"
address = "10.0.2.1"
"#;

    /// The rest of the test configuration's web service.
    const WEB_REST: &str = r#"
max_affinity_duration = "10m"
[[services.backends]]
name = "a"
address = "10.0.0.1"
[[services.backends]]
name = "b"
address = "10.0.0.2"
"#;

    fn config_text() -> String {
        use crate::config::testing::{with_services, WEB};
        with_services(&format!("{MAIL}{WEB}{WEB_REST}"))
    }

    fn plane(text: &str) -> (ControlPlane, AffinityReader) {
        let cfg = Config::parse(text, "t.toml").unwrap();
        let mut registry = ServiceRegistry::from_config(&cfg).unwrap();
        let cell = Arc::new(DataplaneCell::new(registry.snapshot().unwrap()));
        let (writer, reader) = AffinityTable::new(1024);
        let p = ControlPlane::new(
            registry,
            cell,
            AffinityManager::new(writer),
            Vec::new(),
            Instant::now(),
        );
        (p, reader)
    }

    fn src() -> SocketAddr {
        "127.0.0.1:5000".parse().unwrap()
    }

    fn op<'a>(client: &str, plen: u8, owner: Option<&'a str>, secs: u32) -> AffinityOp<'a> {
        AffinityOp {
            key: AffinityKey::new(
                ServiceAddr::tcp("192.0.2.10:80".parse().unwrap()),
                client.parse().unwrap(),
                plen,
            )
            .unwrap()
            .with_ports(PortMatch::Any),
            duration_secs: secs,
            owner,
            notify: Some(src()),
        }
    }

    fn call(p: &mut ControlPlane, sender: &str, req: Request<'_>) -> Response {
        p.handle(sender, sender == "admin", src(), &req, 0)
    }

    const WEB: ServiceId = 1;

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
    fn reload_that_removes_a_service_keeps_the_others_ids_and_affinities() {
        let (mut p, r) = plane(&config_text());
        let text = config_text();
        let path = std::env::temp_dir().join(format!("pktdist-plane-{}.toml", std::process::id()));
        std::fs::write(&path, &text).unwrap();
        p.set_config(path.clone(), Config::parse(&text, "t.toml").unwrap());
        assert_eq!(
            call(
                &mut p,
                "b",
                Request::AffinityCreate(op("198.18.0.0", 24, Some("b"), 60))
            )
            .code,
            ReturnCode::Ok
        );
        // An affinity on the service the reload removes.
        let mut on_mail = op("198.18.1.0", 24, Some("m1"), 60);
        on_mail.key = AffinityKey::new(
            ServiceAddr::tcp("192.0.2.25:25".parse().unwrap()),
            "198.18.1.0".parse().unwrap(),
            24,
        )
        .unwrap()
        .with_ports(PortMatch::Any);
        assert_eq!(
            call(&mut p, "m1", Request::AffinityCreate(on_mail)).code,
            ReturnCode::Ok
        );
        assert_eq!(r.lookup(0, Family::V4, 0xc612_0101, 1), Some(0));
        p.take_notices();
        assert_eq!(p.dataplane().service_named("web").unwrap().id, 1);
        // Remove the first service: web moves to the front but keeps its id.
        let start = text.find("[[services]]").unwrap();
        let second = start + 1 + text[start + 1..].find("[[services]]").unwrap();
        let next = format!("{}{}", &text[..start], &text[second..]);
        std::fs::write(&path, &next).unwrap();
        let msg = p.reload_from_file().unwrap();
        assert!(msg.contains("1 backend(s) removed"), "{msg}");
        assert_eq!(p.dataplane().services[0].name, "web");
        assert_eq!(p.dataplane().service(1).unwrap().name, "web");
        assert!(p.dataplane().service(0).is_none());
        // The removed service's affinity ended with its backend.
        assert_eq!(r.lookup(0, Family::V4, 0xc612_0101, 1), None);
        let notices = p.take_notices();
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert_eq!(notices[0].1.reason, EndReason::BackendRemoved);
        assert_eq!(
            r.lookup(1, Family::V4, 0xc612_0001, 1),
            Some(2),
            "stayed with web"
        );
        assert_eq!(r.lookup(0, Family::V4, 0xc612_0001, 1), None);
        let list = call(
            &mut p,
            "admin",
            Request::AffinityList {
                service: None,
                owner: None,
                offset: 0,
                limit: 0,
            },
        );
        let Payload::Affinities { entries, .. } = list.payload else {
            panic!("no list")
        };
        assert_eq!(entries[0].key.service.port, 80);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn reload_adds_and_removes_static_affinities() {
        let with = format!(
            "{}\n[[affinities]]\nservice = \"web\"\nclient = \"203.0.113.0/24\"\nbackend = \"b\"\n",
            config_text()
        );
        let (mut p, r) = plane(&with);
        let path =
            std::env::temp_dir().join(format!("pktdist-statics-{}.toml", std::process::id()));
        let cfg = Config::parse(&with, "t.toml").unwrap();
        assert_eq!(p.add_static_affinities(&cfg), "");
        p.set_config(path.clone(), cfg);
        assert_eq!(r.lookup(WEB, Family::V4, 0xcb00_7105, 9), Some(2));
        std::fs::write(&path, config_text()).unwrap();
        let msg = p.reload_from_file().unwrap();
        assert!(msg.contains("1 static affinit(ies) removed"), "{msg}");
        assert_eq!(r.lookup(WEB, Family::V4, 0xcb00_7105, 9), None);
        std::fs::write(&path, &with).unwrap();
        p.reload_from_file().unwrap();
        assert_eq!(
            r.lookup(WEB, Family::V4, 0xcb00_7105, 9),
            Some(2),
            "added back"
        );
        std::fs::remove_file(&path).unwrap();
    }
}
