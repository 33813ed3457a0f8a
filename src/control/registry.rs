//! The control thread's model of services and backends.
//!
//! [`ServiceRegistry`] is mutable and owned by the control thread: it takes
//! runtime changes (weights, added and removed backends, reloaded
//! configurations) and turns them into immutable [`Dataplane`] snapshots for
//! the workers, rebuilding a service's Maglev table only when its backends
//! or their scheduling weights (weight, or 0 while not up) changed. Each
//! backend's state is the control plane's to decide
//! ([`set_state`](ServiceRegistry::set_state)); the registry carries it
//! into the snapshot.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::affinity::limits::AffinityLimits;
use crate::config::{
    AllUnhealthy, Config, Forwarding, HashInput, Protocol, Scheduler, ServiceConfig, ADMIN_RESERVED,
};
use crate::datapath::snapshot::{
    AutoAffinity, Backend, Dataplane, ForwardMode, HashKind, SchedulerKind, Service,
};
use crate::net::ip_bits;
use crate::protocol::message::ADMIN_NAME;
use crate::sched::maglev::{is_prime, MaglevTable};
use crate::types::{BackendId, BackendState, Family, ServiceId, MAX_BACKENDS, MAX_SERVICES};

/// Largest weight a backend may have.
pub const MAX_WEIGHT: u32 = 65535;

/// Why a change was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryError {
    NoSuchService(String),
    NoSuchBackend {
        service: String,
        backend: String,
    },
    DuplicateBackend {
        service: String,
        backend: String,
    },
    /// A value that cannot be applied (wrong family, weight out of range...).
    Invalid(String),
    /// No backend id left.
    Full,
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryError::NoSuchService(s) => write!(f, "no service named {s:?}"),
            RegistryError::NoSuchBackend { service, backend } => {
                write!(f, "service {service:?} has no backend {backend:?}")
            }
            RegistryError::DuplicateBackend { service, backend } => {
                write!(f, "service {service:?} already has a backend {backend:?}")
            }
            RegistryError::Invalid(m) => f.write_str(m),
            RegistryError::Full => write!(f, "no backend id left (at most {MAX_BACKENDS})"),
        }
    }
}

impl std::error::Error for RegistryError {}

/// A backend as an operator describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewBackend {
    pub name: String,
    pub addr: IpAddr,
    pub mac: Option<[u8; 6]>,
    pub weight: u32,
}

#[derive(Clone, Debug)]
struct ServiceEntry {
    id: ServiceId,
    name: String,
    vip: IpAddr,
    port: u16,
    proto: u8,
    mode: ForwardMode,
    scheduler: SchedulerKind,
    hash: HashKind,
    /// Configured Maglev size; None = the default for the backend count.
    maglev_size: Option<usize>,
    auto_affinity: Option<AutoAffinity>,
    max_affinity: Duration,
    limits: AffinityLimits,
    affinity_grace: Duration,
    all_unhealthy: AllUnhealthy,
    /// Its backends that would take new connections all fail their checks
    /// and take them anyway (`all_unhealthy = "spread"`): set by the
    /// control plane as it combines the states.
    spreading: bool,
    backends: Vec<(BackendId, NewBackend)>,
    /// The table for the current backends and weights, if built.
    maglev: Option<Arc<MaglevTable>>,
}

impl ServiceEntry {
    fn from_config(s: &ServiceConfig) -> Result<ServiceEntry, RegistryError> {
        let mode = match s.forwarding {
            Forwarding::L2 => ForwardMode::L2,
            Forwarding::Ipip => ForwardMode::IpIp {
                source: s.ipip_source.map(ip_bits).ok_or_else(|| {
                    RegistryError::Invalid(format!("service {}: ipip needs ipip_source", s.name))
                })?,
            },
        };
        Ok(ServiceEntry {
            // Given by the registry.
            id: 0,
            name: s.name.clone(),
            vip: s.vip,
            port: s.port,
            proto: match s.protocol {
                Protocol::Tcp => crate::types::PROTO_TCP,
                Protocol::Udp => crate::types::PROTO_UDP,
            },
            mode,
            scheduler: match s.scheduler {
                Scheduler::Maglev => SchedulerKind::Maglev,
                Scheduler::RoundRobin => SchedulerKind::RoundRobin,
            },
            hash: match s.hash {
                HashInput::Connection => HashKind::Connection,
                HashInput::Client => HashKind::Client,
            },
            maglev_size: s.maglev_table_size,
            auto_affinity: s
                .auto_affinity
                .as_ref()
                .map(|a| AutoAffinity { linger: a.linger.0 }),
            max_affinity: s.max_affinity_duration.0,
            limits: s.affinity_limits(),
            affinity_grace: s.affinity_grace.0,
            all_unhealthy: s.all_unhealthy,
            spreading: false,
            backends: Vec::new(),
            maglev: None,
        })
    }

    fn family(&self) -> Family {
        match self.vip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The Maglev table for the backends' scheduling weights (`states` by
    /// backend id: only backends that are up get theirs).
    fn maglev_table(&mut self, states: &[BackendState]) -> Result<Arc<MaglevTable>, RegistryError> {
        if let Some(t) = &self.maglev {
            return Ok(Arc::clone(t));
        }
        let size = self
            .maglev_size
            .unwrap_or_else(|| MaglevTable::default_size(self.backends.len()));
        let names: Vec<(&str, u32)> = self
            .backends
            .iter()
            .map(|(id, b)| {
                (
                    b.name.as_str(),
                    sched_weight(b.weight, states[*id as usize]),
                )
            })
            .collect();
        let table = Arc::new(
            MaglevTable::new(&names, size)
                .map_err(|e| RegistryError::Invalid(format!("service {}: {e}", self.name)))?,
        );
        self.maglev = Some(Arc::clone(&table));
        Ok(table)
    }

    fn check_backend(&self, b: &NewBackend) -> Result<(), RegistryError> {
        if b.name.is_empty() || b.name.len() > 64 {
            return Err(RegistryError::Invalid(
                "backend name must be 1 to 64 bytes".into(),
            ));
        }
        if b.name == ADMIN_NAME {
            return Err(RegistryError::Invalid(ADMIN_RESERVED.into()));
        }
        if b.addr.is_ipv4() != self.vip.is_ipv4() {
            return Err(RegistryError::Invalid(format!(
                "backend {} address {} is not of the family of the vip {}",
                b.name, b.addr, self.vip
            )));
        }
        if !crate::net::is_host_address(&b.addr) {
            return Err(RegistryError::Invalid(format!(
                "backend {} address {} is not the address of one host",
                b.name, b.addr
            )));
        }
        if b.mac.is_some_and(|m| !crate::net::is_unicast_mac(m)) {
            return Err(RegistryError::Invalid(format!(
                "backend {}: its mac is not a unicast address",
                b.name
            )));
        }
        if b.weight > MAX_WEIGHT {
            return Err(RegistryError::Invalid(format!(
                "weight {} is out of range (0..={MAX_WEIGHT})",
                b.weight
            )));
        }
        if self.mode == ForwardMode::L2 && b.mac.is_none() {
            return Err(RegistryError::Invalid(format!(
                "backend {}: l2 forwarding needs a mac",
                b.name
            )));
        }
        if let Some(size) = self.maglev_size {
            let n = self.backends.len() + 1;
            if size < 100 * n || !is_prime(size) {
                return Err(RegistryError::Invalid(format!(
                    "service {}: maglev_table_size {size} is too small for {n} backends (needs a prime >= {})",
                    self.name,
                    100 * n
                )));
            }
        }
        Ok(())
    }
}

/// Ids handed out in increasing order from where the last one left off, so
/// that an id given up is reused only once the others were: something
/// still holding an old id (a flow entry, a worker on the previous
/// snapshot) is unlikely to meet a newcomer under it.
#[derive(Clone, Debug)]
struct IdPool {
    next: usize,
    in_use: Vec<bool>,
}

impl IdPool {
    fn new(ids: usize) -> IdPool {
        IdPool {
            next: 0,
            in_use: vec![false; ids],
        }
    }

    /// The next free id; `None` when all are in use.
    fn take(&mut self) -> Option<usize> {
        let n = self.in_use.len();
        let id = (0..n)
            .map(|step| (self.next + step) % n)
            .find(|&id| !self.in_use[id])?;
        self.in_use[id] = true;
        self.next = (id + 1) % n;
        Some(id)
    }

    fn give_back(&mut self, id: usize) {
        self.in_use[id] = false;
    }
}

/// The weight a backend in `state` is scheduled with.
fn sched_weight(weight: u32, state: BackendState) -> u32 {
    if state == BackendState::Up {
        weight
    } else {
        0
    }
}

/// Services and backends as the control thread knows them.
#[derive(Clone, Debug)]
pub struct ServiceRegistry {
    generation: u64,
    services: Vec<ServiceEntry>,
    backend_ids: IdPool,
    service_ids: IdPool,
    /// Each backend's state, by id (up until the control plane says
    /// otherwise).
    states: Vec<BackendState>,
    /// Every port packets leave by has a `gateway_mac`, so an `ipip`
    /// backend needs no MAC of its own.
    gateways: bool,
}

impl ServiceRegistry {
    /// The registry for a validated configuration.
    pub fn from_config(cfg: &Config) -> Result<ServiceRegistry, RegistryError> {
        if cfg.services.len() > MAX_SERVICES {
            return Err(RegistryError::Invalid(format!(
                "{} services configured, at most {MAX_SERVICES}",
                cfg.services.len()
            )));
        }
        let mut reg = ServiceRegistry {
            generation: 0,
            services: Vec::with_capacity(cfg.services.len()),
            backend_ids: IdPool::new(MAX_BACKENDS),
            service_ids: IdPool::new(MAX_SERVICES),
            states: vec![BackendState::Up; MAX_BACKENDS],
            gateways: cfg.gateways_everywhere(),
        };
        for s in &cfg.services {
            let mut entry = ServiceEntry::from_config(s)?;
            entry.id = reg.allocate_service_id()?;
            for b in &s.backends {
                let spec = NewBackend {
                    name: b.name.clone(),
                    addr: b.address,
                    mac: b.mac.map(|m| m.0),
                    weight: b.weight,
                };
                let id = reg.allocate_id()?;
                entry.backends.push((id, spec));
            }
            reg.services.push(entry);
        }
        Ok(reg)
    }

    fn allocate_id(&mut self) -> Result<BackendId, RegistryError> {
        let id = self.backend_ids.take().ok_or(RegistryError::Full)?;
        self.states[id] = BackendState::Up;
        Ok(id as BackendId)
    }

    fn allocate_service_id(&mut self) -> Result<ServiceId, RegistryError> {
        let id = self
            .service_ids
            .take()
            .ok_or_else(|| RegistryError::Invalid(format!("more than {MAX_SERVICES} services")))?;
        Ok(id as ServiceId)
    }

    fn service_mut(&mut self, name: &str) -> Result<(ServiceId, &mut ServiceEntry), RegistryError> {
        self.services
            .iter_mut()
            .find(|s| s.name == name)
            .map(|s| (s.id, s))
            .ok_or_else(|| RegistryError::NoSuchService(name.to_string()))
    }

    /// The id of a backend of a service.
    pub fn backend_id(&self, service: &str, backend: &str) -> Option<BackendId> {
        let s = self.services.iter().find(|s| s.name == service)?;
        s.backends
            .iter()
            .find(|(_, b)| b.name == backend)
            .map(|(id, _)| *id)
    }

    /// Every backend: its id, its service's name and its description.
    pub fn backends(&self) -> impl Iterator<Item = (BackendId, &str, &NewBackend)> + '_ {
        self.services
            .iter()
            .flat_map(|s| s.backends.iter().map(|(id, b)| (*id, s.name.as_str(), b)))
    }

    /// Each service's id, its `all_unhealthy` and its backends.
    pub fn services(
        &self,
    ) -> impl Iterator<Item = (ServiceId, AllUnhealthy, &[(BackendId, NewBackend)])> + '_ {
        self.services
            .iter()
            .map(|s| (s.id, s.all_unhealthy, s.backends.as_slice()))
    }

    /// Marks `service` as spreading its new connections over backends that
    /// all fail their checks (or not); true when that changed.
    pub fn set_spreading(&mut self, service: ServiceId, on: bool) -> bool {
        match self.services.iter_mut().find(|s| s.id == service) {
            Some(s) if s.spreading != on => {
                s.spreading = on;
                true
            }
            _ => false,
        }
    }

    /// The state backend `id` has in the snapshots.
    pub fn state(&self, id: BackendId) -> BackendState {
        self.states
            .get(id as usize)
            .copied()
            .unwrap_or(BackendState::Up)
    }

    /// Gives backend `id` a state (its service's Maglev table is rebuilt
    /// when that changes its scheduling weight).
    pub fn set_state(&mut self, id: BackendId, state: BackendState) {
        let Some(old) = self.states.get(id as usize).copied() else {
            return;
        };
        if old == state {
            return;
        }
        self.states[id as usize] = state;
        if let Some(s) = self
            .services
            .iter_mut()
            .find(|s| s.backends.iter().any(|(b, _)| *b == id))
        {
            let weight = s
                .backends
                .iter()
                .find(|(b, _)| *b == id)
                .map_or(0, |(_, b)| b.weight);
            if sched_weight(weight, old) != sched_weight(weight, state) {
                s.maglev = None;
            }
        }
    }

    /// Builds the next snapshot (Maglev tables rebuilt only where needed).
    pub fn snapshot(&mut self) -> Result<Dataplane, RegistryError> {
        self.generation += 1;
        let mut services = Vec::with_capacity(self.services.len());
        let mut backends = Vec::new();
        let states = &self.states;
        for s in self.services.iter_mut() {
            let maglev = s.maglev_table(states)?;
            let all_down = !s.backends.is_empty()
                && s.backends
                    .iter()
                    .all(|(id, _)| states[*id as usize] == BackendState::Down);
            services.push(Service {
                id: s.id,
                name: s.name.clone(),
                vip: s.vip,
                vip_bits: ip_bits(s.vip),
                family: s.family(),
                port: s.port,
                proto: s.proto,
                mode: s.mode,
                scheduler: s.scheduler,
                hash: s.hash,
                backends: s.backends.iter().map(|(id, _)| *id).collect(),
                maglev,
                auto_affinity: s.auto_affinity,
                max_affinity: s.max_affinity,
                limits: s.limits,
                affinity_grace: s.affinity_grace,
                all_down,
                all_unhealthy: s.spreading,
            });
            for (id, b) in &s.backends {
                backends.push(Backend {
                    id: *id,
                    service: s.id,
                    name: b.name.clone(),
                    addr: b.addr,
                    addr_bits: ip_bits(b.addr),
                    mac: b.mac,
                    weight: b.weight,
                    state: states[*id as usize],
                });
            }
        }
        Ok(Dataplane::new(self.generation, services, backends))
    }

    /// Changes a backend's weight (0 drains it).
    pub fn set_weight(
        &mut self,
        service: &str,
        backend: &str,
        weight: u32,
    ) -> Result<(), RegistryError> {
        if weight > MAX_WEIGHT {
            return Err(RegistryError::Invalid(format!(
                "weight {weight} is out of range (0..={MAX_WEIGHT})"
            )));
        }
        let (_, s) = self.service_mut(service)?;
        let sname = s.name.clone();
        let b = s
            .backends
            .iter_mut()
            .find(|(_, b)| b.name == backend)
            .ok_or(RegistryError::NoSuchBackend {
                service: sname,
                backend: backend.to_string(),
            })?;
        if b.1.weight != weight {
            b.1.weight = weight;
            s.maglev = None;
        }
        Ok(())
    }

    /// Adds a backend to a service.
    pub fn add_backend(
        &mut self,
        service: &str,
        spec: NewBackend,
    ) -> Result<BackendId, RegistryError> {
        {
            let (_, s) = self.service_mut(service)?;
            if s.backends.iter().any(|(_, b)| b.name == spec.name) {
                return Err(RegistryError::DuplicateBackend {
                    service: service.to_string(),
                    backend: spec.name,
                });
            }
            s.check_backend(&spec)?;
            if s.mode != ForwardMode::L2 && spec.mac.is_none() && !self.gateways {
                return Err(RegistryError::Invalid(format!(
                    "backend {}: some port packets leave by has no gateway_mac, so an ipip \
                     backend needs its own mac",
                    spec.name
                )));
            }
        }
        let id = self.allocate_id()?;
        let (_, s) = self.service_mut(service)?;
        s.backends.push((id, spec));
        s.maglev = None;
        Ok(id)
    }

    /// Removes a backend; returns its id so its affinities can be ended.
    pub fn remove_backend(
        &mut self,
        service: &str,
        backend: &str,
    ) -> Result<BackendId, RegistryError> {
        let (_, s) = self.service_mut(service)?;
        let pos = s
            .backends
            .iter()
            .position(|(_, b)| b.name == backend)
            .ok_or_else(|| RegistryError::NoSuchBackend {
                service: service.to_string(),
                backend: backend.to_string(),
            })?;
        let (id, _) = s.backends.remove(pos);
        s.maglev = None;
        self.backend_ids.give_back(id as usize);
        Ok(id)
    }

    /// Applies a new configuration's services and backends (hot reload).
    /// Services are matched by (name, VIP, port, protocol), backends by
    /// (service, name, address): those kept keep their ids, so established
    /// connections stay where they are and per-service counters and
    /// affinities stay with their service. New ones get ids not used
    /// before (until every id was). Returns the ids of backends that are
    /// gone. On error nothing changes.
    pub fn reload(&mut self, cfg: &Config) -> Result<Vec<BackendId>, RegistryError> {
        let mut next = self.clone();
        let mut services = Vec::with_capacity(cfg.services.len());
        let mut kept = vec![false; MAX_BACKENDS];
        let mut kept_services = vec![false; MAX_SERVICES];
        // Positions in `services` of services that need an id, and of
        // backends (service, backend) that need one.
        let mut new_services = Vec::new();
        let mut new_backends = Vec::new();
        for s in &cfg.services {
            let mut entry = ServiceEntry::from_config(s)?;
            let old = self.services.iter().find(|o| {
                o.name == s.name && o.vip == s.vip && o.port == s.port && o.proto == entry.proto
            });
            match old {
                Some(o) => {
                    entry.id = o.id;
                    kept_services[o.id as usize] = true;
                }
                None => new_services.push(services.len()),
            }
            let mut reused = Vec::with_capacity(s.backends.len());
            for b in &s.backends {
                let spec = NewBackend {
                    name: b.name.clone(),
                    addr: b.address,
                    mac: b.mac.map(|m| m.0),
                    weight: b.weight,
                };
                let reuse = old.and_then(|o| {
                    o.backends
                        .iter()
                        .find(|(_, ob)| ob.name == b.name && ob.addr == b.address)
                        .map(|(id, _)| *id)
                });
                match reuse {
                    Some(id) => kept[id as usize] = true,
                    None => new_backends.push((services.len(), entry.backends.len())),
                }
                reused.push(reuse);
                entry.backends.push((reuse.unwrap_or_default(), spec));
            }
            // Keep the Maglev table if nothing it depends on changed: the
            // same backends (so the same ids, whose states it was built
            // with) in the same order with the same weights.
            if let Some(o) = old {
                let same = o.maglev_size == entry.maglev_size
                    && o.backends.len() == entry.backends.len()
                    && o.backends
                        .iter()
                        .zip(&entry.backends)
                        .zip(&reused)
                        .all(|(((id, a), (_, b)), r)| *r == Some(*id) && a.weight == b.weight);
                if same {
                    entry.maglev = o.maglev.clone();
                }
            }
            services.push(entry);
        }
        let removed: Vec<BackendId> = self
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|(id, _)| *id))
            .filter(|id| !kept[*id as usize])
            .collect();
        for id in &removed {
            next.backend_ids.give_back(*id as usize);
        }
        for o in &self.services {
            if !kept_services[o.id as usize] {
                next.service_ids.give_back(o.id as usize);
            }
        }
        // After the removed ones were given up, so that a full set of new
        // services and backends fits; ids are handed out from where the
        // last one left off, so one just given up is normally not taken
        // again.
        for i in new_services {
            services[i].id = next.allocate_service_id()?;
        }
        for (i, j) in new_backends {
            services[i].backends[j].0 = next.allocate_id()?;
        }
        next.services = services;
        next.gateways = cfg.gateways_everywhere();
        // Build the tables now so that a bad table size is refused here.
        for s in next.services.iter_mut() {
            s.maglev_table(&next.states)?;
        }
        *self = next;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backends of the test configuration's web service.
    const WEB_BACKENDS: &str = r#"
[[services.backends]]
name = "a"
address = "10.0.0.1"
weight = 100
[[services.backends]]
name = "b"
address = "10.0.0.2"
weight = 300
"#;

    fn config_text() -> String {
        use crate::config::testing::{with_services, WEB};
        with_services(&format!("{WEB}{WEB_BACKENDS}"))
    }

    fn registry() -> ServiceRegistry {
        ServiceRegistry::from_config(&Config::parse(&config_text(), "t.toml").unwrap()).unwrap()
    }

    #[test]
    fn snapshot_has_services_backends_and_tables() {
        let mut r = registry();
        let dp = r.snapshot().unwrap();
        assert_eq!(dp.generation, 1);
        let s = &dp.services[0];
        assert_eq!(s.port, 80);
        assert_eq!(
            s.mode,
            ForwardMode::IpIp {
                source: 0xc633_6401
            }
        );
        let shares = s.maglev.shares();
        assert!(shares[1] > 2 * shares[0]);
        assert_eq!(dp.find_backend(0, "b").unwrap().addr_bits, 0x0a00_0002);
    }

    #[test]
    fn weight_changes_rebuild_only_that_table() {
        let mut r = registry();
        let t1 = Arc::clone(&r.snapshot().unwrap().services[0].maglev);
        let t2 = Arc::clone(&r.snapshot().unwrap().services[0].maglev);
        assert!(Arc::ptr_eq(&t1, &t2), "unchanged service keeps its table");
        r.set_weight("web", "a", 0).unwrap();
        let dp = r.snapshot().unwrap();
        assert_eq!(dp.services[0].maglev.shares()[0], 0);
        assert_eq!(
            r.set_weight("web", "zz", 1),
            Err(RegistryError::NoSuchBackend {
                service: "web".into(),
                backend: "zz".into()
            })
        );
        assert!(matches!(
            r.set_weight("web", "a", 70000),
            Err(RegistryError::Invalid(_))
        ));
    }

    #[test]
    fn add_and_remove_backends() {
        let mut r = registry();
        let spec = NewBackend {
            name: "c".into(),
            addr: "10.0.0.3".parse().unwrap(),
            mac: None,
            weight: 100,
        };
        let id = r.add_backend("web", spec.clone()).unwrap();
        assert_eq!(id, 2);
        assert!(matches!(
            r.add_backend("web", spec.clone()),
            Err(RegistryError::DuplicateBackend { .. })
        ));
        let v6 = NewBackend {
            name: "d".into(),
            addr: "2001:db8::1".parse().unwrap(),
            ..spec
        };
        assert!(matches!(
            r.add_backend("web", v6),
            Err(RegistryError::Invalid(_))
        ));
        let dp = r.snapshot().unwrap();
        assert_eq!(dp.services[0].backends, vec![0, 1, 2]);
        assert_eq!(r.remove_backend("web", "a").unwrap(), 0);
        let dp = r.snapshot().unwrap();
        assert!(dp.backend(0).is_none());
        assert_eq!(dp.services[0].backends, vec![1, 2]);
        assert!(r.remove_backend("nope", "a").is_err());
    }

    /// A backend added at run time is held to the configuration's rules:
    /// one host's address, a unicast MAC, and for `ipip` a next hop (its
    /// own MAC where some port lacks a gateway).
    #[test]
    fn added_backends_are_checked_as_configured_ones() {
        let spec = |name: &str, addr: &str, mac: Option<[u8; 6]>| NewBackend {
            name: name.into(),
            addr: addr.parse().unwrap(),
            mac,
            weight: 100,
        };
        let mut r = registry();
        for bad in [
            spec("c", "0.0.0.0", None),
            spec("c", "224.0.0.1", None),
            spec("c", "255.255.255.255", None),
            spec("c", "10.0.0.3", Some([0xff; 6])),
            spec("c", "10.0.0.3", Some([0; 6])),
        ] {
            let e = r.add_backend("web", bad.clone()).unwrap_err();
            assert!(matches!(e, RegistryError::Invalid(_)), "{bad:?}: {e:?}");
        }
        r.add_backend("web", spec("c", "10.0.0.3", None)).unwrap();

        // Without a gateway (every configured backend has a MAC), an ipip
        // backend without one would have no next hop.
        let text = crate::config::testing::with_backend_macs(
            &config_text().replace("gateway_mac = \"02:00:00:00:00:fe\"\n", ""),
        );
        let cfg = Config::parse(&text, "t.toml").unwrap();
        let mut r = ServiceRegistry::from_config(&cfg).unwrap();
        let e = r
            .add_backend("web", spec("c", "10.0.0.3", None))
            .unwrap_err();
        assert!(
            matches!(&e, RegistryError::Invalid(m) if m.contains("gateway_mac")),
            "{e:?}"
        );
        r.add_backend("web", spec("c", "10.0.0.3", Some([2, 0, 0, 0, 0, 3])))
            .unwrap();
    }

    #[test]
    fn reload_keeps_ids_of_kept_backends() {
        let mut r = registry();
        r.snapshot().unwrap();
        let text = config_text().replace(
            "name = \"a\"\naddress = \"10.0.0.1\"\nweight = 100",
            "name = \"c\"\naddress = \"10.0.0.3\"\nweight = 100",
        );
        let removed = r.reload(&Config::parse(&text, "t.toml").unwrap()).unwrap();
        assert_eq!(removed, vec![0]);
        let dp = r.snapshot().unwrap();
        assert_eq!(r.backend_id("web", "b"), Some(1));
        assert_eq!(dp.find_backend(0, "c").unwrap().id, 2);
    }

    /// A drained backend given a new address by a reload is a new backend
    /// (a new id, up): the reloaded table gives it its share, where the old
    /// one, built while the old id was draining, gave it none.
    #[test]
    fn a_reload_that_re_addresses_a_drained_backend_gives_it_its_share() {
        let mut r = registry();
        r.snapshot().unwrap();
        r.set_state(1, BackendState::Draining);
        assert_eq!(r.snapshot().unwrap().services[0].maglev.shares()[1], 0);
        let text = config_text().replace("address = \"10.0.0.2\"", "address = \"10.0.0.9\"");
        r.reload(&Config::parse(&text, "t.toml").unwrap()).unwrap();
        let dp = r.snapshot().unwrap();
        let b = dp.find_backend(0, "b").unwrap();
        assert_ne!(b.id, 1);
        assert_eq!(r.state(b.id), BackendState::Up);
        let shares = dp.services[0].maglev.shares();
        assert!(
            shares[1] > 2 * shares[0],
            "b weighs three times a: {shares:?}"
        );
    }

    /// Backends that need new ids get them after those of removed backends
    /// were given up: a service of more than half the ids moved to another
    /// port (every backend anew) fits.
    #[test]
    fn a_reload_renewing_more_than_half_the_backend_ids_fits() {
        let on_port = |port: u16| {
            let backends: String = (0..MAX_BACKENDS / 2 + 1)
                .map(|i| {
                    format!(
                        "[[services.backends]]\nname = \"b{i}\"\naddress = \"10.1.{}.{}\"\n",
                        i / 256,
                        i % 256
                    )
                })
                .collect();
            let text = format!(
                "[[services]]\nname = \"big\"\nvip = \"192.0.2.10\"\nport = {port}\n\
                 protocol = \"tcp\"\nforwarding = \"ipip\"\nipip_source = \"198.51.100.1\"\n{backends}"
            );
            Config::parse(&crate::config::testing::with_services(&text), "t.toml").unwrap()
        };
        let mut r = ServiceRegistry::from_config(&on_port(80)).unwrap();
        r.snapshot().unwrap();
        let removed = r.reload(&on_port(8080)).unwrap();
        assert_eq!(removed.len(), MAX_BACKENDS / 2 + 1);
        let dp = r.snapshot().unwrap();
        assert_eq!(dp.services[0].backends.len(), MAX_BACKENDS / 2 + 1);
    }

    /// The service's `hash` reaches the snapshot, at start and on a reload
    /// (which keeps the Maglev table: the hash is not part of it).
    #[test]
    fn hash_input_reaches_the_snapshot_and_follows_a_reload() {
        let mut r = registry();
        let dp = r.snapshot().unwrap();
        assert_eq!(dp.services[0].hash, HashKind::Connection);
        let table = Arc::clone(&dp.services[0].maglev);
        let text = config_text().replace(
            "forwarding = \"ipip\"",
            "forwarding = \"ipip\"\nhash = \"client\"",
        );
        assert_ne!(text, config_text());
        r.reload(&Config::parse(&text, "t.toml").unwrap()).unwrap();
        let dp = r.snapshot().unwrap();
        assert_eq!(dp.services[0].hash, HashKind::Client);
        assert!(Arc::ptr_eq(&table, &dp.services[0].maglev));
    }

    /// A configuration of TCP services on one VIP, each named and on its
    /// own port, with one backend.
    fn services_on_ports(services: &[(&str, u16)]) -> Config {
        let text: String = services
            .iter()
            .map(|(name, port)| {
                format!(
                    "[[services]]\nname = \"{name}\"\nvip = \"192.0.2.10\"\nport = {port}\n\
                     protocol = \"tcp\"\nforwarding = \"ipip\"\nipip_source = \"198.51.100.1\"\n\
                     [[services.backends]]\nname = \"x\"\naddress = \"10.0.0.9\"\nweight = 1\n"
                )
            })
            .collect();
        Config::parse(&crate::config::testing::with_services(&text), "t.toml").unwrap()
    }

    /// (name, id) of each service of the next snapshot, and a check that
    /// every backend names its service's id.
    fn ids(r: &mut ServiceRegistry) -> Vec<(String, ServiceId)> {
        let dp = r.snapshot().unwrap();
        for s in &dp.services {
            assert_eq!(dp.service(s.id).unwrap().name, s.name);
            for &b in &s.backends {
                assert_eq!(dp.backend(b).unwrap().service, s.id);
            }
        }
        dp.services.iter().map(|s| (s.name.clone(), s.id)).collect()
    }

    #[test]
    fn reload_keeps_service_ids_and_gives_new_services_fresh_ones() {
        let named = |v: &[(&str, ServiceId)]| -> Vec<(String, ServiceId)> {
            v.iter().map(|(n, i)| (n.to_string(), *i)).collect()
        };
        let mut r =
            ServiceRegistry::from_config(&services_on_ports(&[("a", 1), ("b", 2), ("c", 3)]))
                .unwrap();
        assert_eq!(ids(&mut r), named(&[("a", 0), ("b", 1), ("c", 2)]));
        // `a` removed, `b` and `c` swapped, `d` added: the kept ones keep
        // their ids, and `d` gets one never used, not `a`'s.
        r.reload(&services_on_ports(&[("c", 3), ("b", 2), ("d", 4)]))
            .unwrap();
        assert_eq!(ids(&mut r), named(&[("c", 2), ("b", 1), ("d", 3)]));
        // A service on another port is another service.
        r.reload(&services_on_ports(&[("c", 5), ("b", 2)])).unwrap();
        assert_eq!(ids(&mut r), named(&[("c", 4), ("b", 1)]));
    }

    #[test]
    fn a_full_set_of_new_services_fits_once_the_old_are_gone() {
        let names: Vec<String> = (0..MAX_SERVICES).map(|i| format!("s{i}")).collect();
        let on = |base: u16| -> Vec<(&str, u16)> {
            names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.as_str(), base + i as u16))
                .collect()
        };
        let mut r = ServiceRegistry::from_config(&services_on_ports(&on(1000))).unwrap();
        r.reload(&services_on_ports(&on(2000))).unwrap();
        let mut got: Vec<ServiceId> = ids(&mut r).into_iter().map(|(_, id)| id).collect();
        got.sort_unstable();
        assert_eq!(got, (0..MAX_SERVICES as ServiceId).collect::<Vec<_>>());
    }
}
