//! The dataplane snapshot: services and backends as the workers see them.
//!
//! A [`Dataplane`] is immutable. The control thread builds a new one for every
//! change (weight, add, remove, reload) — Maglev tables included, off the hot
//! path — and publishes it through a [`DataplaneCell`]. Workers check the
//! cell's generation once per loop iteration and pick up the new snapshot
//! when it changed, so they wait on the control thread at most for a
//! publish's store of the new snapshot.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hashbrown::{HashMap, HashSet};

use crate::affinity::limits::AffinityLimits;
use crate::net::ip_bits;
use crate::sched::maglev::MaglevTable;
use crate::types::{BackendId, BackendState, Family, FlowKey, ServiceId};

/// How packets reach a backend. Both are direct server return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardMode {
    /// IPv4-in-IPv4 or IPv6-in-IPv6 to the backend address; `source` is the
    /// outer source address (same family as the VIP).
    IpIp { source: u128 },
    /// Destination MAC rewritten to the backend's; the backend holds the VIP.
    L2,
}

impl ForwardMode {
    /// Bytes the mode adds to a packet of `family`: the outer header of
    /// `ipip`, nothing for `l2`.
    #[inline]
    pub fn overhead(self, family: Family) -> usize {
        match (self, family) {
            (ForwardMode::IpIp { .. }, Family::V4) => crate::wire::ipv4::HEADER_LEN,
            (ForwardMode::IpIp { .. }, Family::V6) => crate::wire::ipv6::HEADER_LEN,
            (ForwardMode::L2, _) => 0,
        }
    }
}

/// Which scheduler picks backends for new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    Maglev,
    RoundRobin,
}

/// What a service's consistent hash reads to pick a backend: the whole
/// connection (the 5-tuple: one client's connections spread over the
/// backends) or the client's address alone (all of them on one backend,
/// whichever worker or instance receives them, with no shared state).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HashKind {
    #[default]
    Connection,
    Client,
}

impl HashKind {
    /// The scheduler's hash for the connection `key` whose 5-tuple hash
    /// (the flow table's) is `flow_hash`: that one, or the client's.
    #[inline(always)]
    pub fn of(self, key: &FlowKey, flow_hash: u64) -> u64 {
        match self {
            HashKind::Connection => flow_hash,
            HashKind::Client => crate::types::client_hash(key),
        }
    }
}

/// A backend of one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub id: BackendId,
    pub service: ServiceId,
    pub name: String,
    pub addr: IpAddr,
    /// `addr` as bits (IPv4 in the low 32).
    pub addr_bits: u128,
    /// Next-hop MAC: required for `l2`, optional for `ipip`.
    pub mac: Option<[u8; 6]>,
    /// Configured weight (0 = draining). Schedulers use
    /// [`sched_weight`](Backend::sched_weight).
    pub weight: u32,
    /// Up, draining or down, as the control plane combined it.
    pub state: BackendState,
}

impl Backend {
    /// A backend of `service` its affinities and flows may still reach:
    /// not down (a draining backend keeps its affinities).
    #[inline]
    pub fn reachable_for(&self, service: ServiceId) -> bool {
        self.service == service && self.state != BackendState::Down
    }

    /// A backend of `service` that takes new connections: an automatic
    /// pin to it holds.
    #[inline]
    pub fn takes_new_for(&self, service: ServiceId) -> bool {
        self.service == service && self.state == BackendState::Up
    }

    /// The weight the schedulers give it: its own while it is up, 0 while
    /// it drains or is down.
    #[inline]
    pub fn sched_weight(&self) -> u32 {
        if self.state == BackendState::Up {
            self.weight
        } else {
            0
        }
    }
}

/// Automatic affinity for parallel connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutoAffinity {
    /// How long the pin outlives the client's last connection.
    pub linger: Duration,
}

/// A service: VIP, port and protocol, with its backends and scheduler.
#[derive(Clone, Debug)]
pub struct Service {
    pub id: ServiceId,
    pub name: String,
    pub vip: IpAddr,
    pub vip_bits: u128,
    pub family: Family,
    pub port: u16,
    pub proto: u8,
    pub mode: ForwardMode,
    pub scheduler: SchedulerKind,
    /// What the consistent hash reads (Maglev; round robin reads nothing).
    pub hash: HashKind,
    /// Backend ids in configuration order; Maglev indices refer to this list.
    pub backends: Vec<BackendId>,
    pub maglev: Arc<MaglevTable>,
    pub auto_affinity: Option<AutoAffinity>,
    /// Longest affinity a backend may request on this service.
    pub max_affinity: Duration,
    /// What one backend may pin on this service (control thread only).
    pub limits: AffinityLimits,
    /// How long a backend may stay down before its requested affinities
    /// end (BACKEND_DOWN).
    pub affinity_grace: Duration,
    /// It has backends and every one of them is down: its new connections
    /// are dropped as [`DropReason::AllBackendsDown`](crate::types::DropReason).
    pub all_down: bool,
    /// Its backends that would take new connections all fail their health
    /// checks, and take them anyway (`all_unhealthy = "spread"`): they are
    /// up in this snapshot (control thread and statistics only).
    pub all_unhealthy: bool,
}

impl Service {
    /// The same service: same name, VIP (of the same family), port and
    /// protocol, whatever else (backends, weights, scheduler) changed.
    pub fn same_as(&self, other: &Service) -> bool {
        (self.name.as_str(), self.vip, self.port, self.proto)
            == (other.name.as_str(), other.vip, other.port, other.proto)
    }

    /// A later packet of a new connection finds its SYN's backend again
    /// without a flow entry: the consistent hash schedules the service
    /// (round robin's turn is gone), and no automatic-affinity pin, which
    /// only a tracked connection holds, can end between the two. The SYN
    /// flood guard leaves only such SYNs untracked.
    #[inline(always)]
    pub fn stateless_syns(&self) -> bool {
        self.scheduler == SchedulerKind::Maglev && self.auto_affinity.is_none()
    }
}

/// One immutable snapshot of the whole service configuration.
#[derive(Debug, Default)]
pub struct Dataplane {
    pub generation: u64,
    /// In configuration order; find one by id with [`Dataplane::service`].
    pub services: Vec<Service>,
    /// Indexed by [`BackendId`]; `None` for ids not in use.
    pub backends: Vec<Option<Backend>>,
    /// Position in `services` of each [`ServiceId`] in use.
    positions: Vec<Option<u16>>,
    /// Position in `services` of each (family, VIP, port, protocol). The
    /// family belongs to the key: an IPv4 VIP's bits (in the low 32) are
    /// also those of an IPv6 address (`::a.b.c.d`).
    vip_index: HashMap<(Family, u128, u16, u8), u16>,
    /// Every VIP, whatever its ports.
    vips: HashSet<(Family, u128)>,
}

impl Dataplane {
    /// Builds a snapshot. Service ids must be distinct and below
    /// [`MAX_SERVICES`]; backend ids below [`MAX_BACKENDS`].
    pub fn new(generation: u64, services: Vec<Service>, backends: Vec<Backend>) -> Dataplane {
        let mut vip_index = HashMap::with_capacity(services.len());
        let vips = services.iter().map(|s| (s.family, s.vip_bits)).collect();
        let mut positions = vec![
            None;
            services
                .iter()
                .map(|s| s.id as usize + 1)
                .max()
                .unwrap_or(0)
        ];
        for (i, s) in services.iter().enumerate() {
            debug_assert!(
                positions[s.id as usize].is_none(),
                "service id {} twice",
                s.id
            );
            positions[s.id as usize] = Some(i as u16);
            vip_index.insert((s.family, s.vip_bits, s.port, s.proto), i as u16);
        }
        let max_id = backends
            .iter()
            .map(|b| b.id as usize + 1)
            .max()
            .unwrap_or(0);
        let mut by_id: Vec<Option<Backend>> = vec![None; max_id];
        for b in backends {
            let id = b.id as usize;
            by_id[id] = Some(b);
        }
        Dataplane {
            generation,
            services,
            backends: by_id,
            positions,
            vip_index,
            vips,
        }
    }

    /// True when `addr` (IPv4 in the low 32 bits) is the VIP of a service.
    #[inline]
    pub fn is_vip(&self, family: Family, addr: u128) -> bool {
        self.vips.contains(&(family, addr))
    }

    /// A service by id, if it is configured.
    #[inline]
    pub fn service(&self, id: ServiceId) -> Option<&Service> {
        let i = (*self.positions.get(id as usize)?)?;
        self.services.get(usize::from(i))
    }

    /// The service a packet is addressed to.
    #[inline]
    pub fn service_for(&self, key: &FlowKey) -> Option<&Service> {
        self.service_at(key.family, key.dst, key.dport, key.proto)
    }

    /// The service with this VIP, port and protocol.
    pub fn find_service(&self, vip: IpAddr, port: u16, proto: u8) -> Option<&Service> {
        self.service_at(crate::net::family(vip), ip_bits(vip), port, proto)
    }

    #[inline]
    fn service_at(&self, family: Family, vip: u128, port: u16, proto: u8) -> Option<&Service> {
        let i = *self.vip_index.get(&(family, vip, port, proto))?;
        self.services.get(usize::from(i))
    }

    /// True when `id` names the same service here as in `prev`.
    pub fn keeps_service(&self, prev: &Dataplane, id: ServiceId) -> bool {
        match (prev.service(id), self.service(id)) {
            (Some(a), Some(b)) => a.same_as(b),
            _ => false,
        }
    }

    /// A service by name.
    pub fn service_named(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// A backend by id, if it is still configured.
    #[inline]
    pub fn backend(&self, id: BackendId) -> Option<&Backend> {
        self.backends.get(id as usize)?.as_ref()
    }

    /// Backend `id` while it is one of `service`'s (an id may since have
    /// gone to another service's backend).
    #[inline]
    pub fn backend_of(&self, id: BackendId, service: ServiceId) -> Option<&Backend> {
        self.backend(id).filter(|b| b.service == service)
    }

    /// The backend of a service with this name.
    pub fn find_backend(&self, service: ServiceId, name: &str) -> Option<&Backend> {
        let s = self.service(service)?;
        s.backends
            .iter()
            .filter_map(|&id| self.backend(id))
            .find(|b| b.name == name)
    }
}

/// Where the control thread publishes snapshots and workers pick them up.
pub struct DataplaneCell {
    generation: AtomicU64,
    current: Mutex<Arc<Dataplane>>,
    /// Snapshots a publish replaced, kept until no worker holds them and
    /// then freed by the control thread ([`DataplaneCell::collect`]), so
    /// that a worker never frees one: a snapshot's tables were allocated on
    /// the control thread, and freeing them takes that allocator arena's
    /// lock and may unmap pages, which interrupts every core of the process.
    retired: Mutex<Vec<Arc<Dataplane>>>,
}

impl DataplaneCell {
    pub fn new(dp: Dataplane) -> DataplaneCell {
        DataplaneCell {
            generation: AtomicU64::new(dp.generation),
            current: Mutex::new(Arc::new(dp)),
            retired: Mutex::new(Vec::new()),
        }
    }

    /// The generation of the current snapshot: one load (acquire, so that
    /// the snapshot it announces is visible), read by workers once per loop
    /// iteration.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current snapshot. Takes the lock a publish holds only to store
    /// its snapshot, here held for an `Arc` clone; workers call it only when
    /// the generation changed.
    pub fn load(&self) -> Arc<Dataplane> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Publishes a new snapshot (control thread only). The one it replaces
    /// is kept for [`DataplaneCell::collect`].
    pub fn publish(&self, dp: Dataplane) {
        self.collect();
        let gen = dp.generation;
        let old = std::mem::replace(
            &mut *self.current.lock().unwrap_or_else(|e| e.into_inner()),
            Arc::new(dp),
        );
        self.generation.store(gen, Ordering::Release);
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(old);
    }

    /// Frees the replaced snapshots nothing else holds any longer (control
    /// thread only: each tick, and before each publish). A snapshot held
    /// only here cannot be taken again (`load` gives the current one).
    pub fn collect(&self) {
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|dp| Arc::strong_count(dp) > 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot a publish replaced is not freed by the worker that
    /// drops it last, but by the control thread's next collect.
    #[test]
    fn replaced_snapshots_are_freed_by_the_publisher() {
        let cell = DataplaneCell::new(Dataplane::default());
        let held = cell.load();
        let first = Arc::downgrade(&held);
        cell.publish(Dataplane::default());
        cell.collect();
        assert!(first.upgrade().is_some(), "freed while a worker held it");
        drop(held);
        assert!(
            first.upgrade().is_some(),
            "freed by the worker that dropped it"
        );
        cell.collect();
        assert!(first.upgrade().is_none(), "kept after no worker held it");
        // One never loaded goes at the next collect too.
        let second = Arc::downgrade(&cell.load());
        cell.publish(Dataplane::default());
        assert!(second.upgrade().is_some());
        cell.collect();
        assert!(second.upgrade().is_none());
    }
}
