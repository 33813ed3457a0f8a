//! The worker's tests' bed: one worker over in-memory ports ([`MemIo`]),
//! its dataplane, and the writer of its affinity table; and the services
//! and backends the tests build it with.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{FlowTimeouts, PortPlan, Shared, Worker, WorkerSetup};
use crate::affinity::auto::AutoAffinityTable;
use crate::affinity::table::{AffinityTable, AffinityWriter};
use crate::datapath::counters::WorkerCounters;
use crate::datapath::icmp::IcmpSettings;
use crate::datapath::pktio::MemIo;
use crate::datapath::snapshot::{
    Backend, Dataplane, DataplaneCell, ForwardMode, HashKind, SchedulerKind, Service,
};
use crate::sched::maglev::MaglevTable;
use crate::types::{BackendState, Family, ServiceId};

pub const VIP: [u8; 4] = [10, 0, 0, 1];
pub const VIP6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const SEC: u64 = 1_000_000_000;
pub const IPIP: ForwardMode = ForwardMode::IpIp {
    source: 0x0a00_00fe,
};
pub const IPIP6: ForwardMode = ForwardMode::IpIp {
    source: 0x2001_0db8_0000_0000_0000_0000_0000_00fe,
};

/// IPv4 backend `id` (10.1.0.`id + 1`) of `service`; draining at weight 0.
pub fn backend(id: u32, service: ServiceId, weight: u32) -> Backend {
    let addr = std::net::Ipv4Addr::new(10, 1, 0, id as u8 + 1);
    Backend {
        id,
        service,
        name: format!("be{id}"),
        addr: addr.into(),
        addr_bits: u32::from(addr) as u128,
        mac: Some([2, 0, 0, 0, 1, id as u8]),
        weight,
        state: if weight == 0 {
            BackendState::Draining
        } else {
            BackendState::Up
        },
    }
}

/// IPv6 backend `id` (2001:db8:1::`id + 1`) of `service`, weight 100.
pub fn backend6(id: u32, service: ServiceId) -> Backend {
    let addr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, id as u16 + 1);
    Backend {
        addr: addr.into(),
        addr_bits: u128::from(addr),
        ..backend(id, service, 100)
    }
}

/// Service `id` on [`VIP`] (or [`VIP6`], when its first backend is IPv6)
/// and `port`, a Maglev table of 65,537 entries over `backends`.
pub fn service(
    id: ServiceId,
    port: u16,
    proto: u8,
    backends: &[Backend],
    scheduler: SchedulerKind,
    mode: ForwardMode,
) -> Service {
    let names: Vec<(&str, u32)> = backends
        .iter()
        .map(|b| (b.name.as_str(), b.sched_weight()))
        .collect();
    let v6 = backends.first().is_some_and(|b| b.addr.is_ipv6());
    let (vip, vip_bits, family): (std::net::IpAddr, u128, Family) = if v6 {
        (
            std::net::Ipv6Addr::from(VIP6).into(),
            u128::from_be_bytes(VIP6),
            Family::V6,
        )
    } else {
        (
            std::net::Ipv4Addr::from(VIP).into(),
            u32::from_be_bytes(VIP) as u128,
            Family::V4,
        )
    };
    Service {
        id,
        name: format!("svc{id}"),
        vip,
        vip_bits,
        family,
        port,
        proto,
        mode,
        scheduler,
        hash: HashKind::Connection,
        backends: backends.iter().map(|b| b.id).collect(),
        maglev: Arc::new(MaglevTable::new(&names, 65537).unwrap()),
        auto_affinity: None,
        max_affinity: Duration::from_secs(3600),
        limits: Default::default(),
        affinity_grace: Duration::from_secs(30),
        all_down: !backends.is_empty() && backends.iter().all(|b| b.state == BackendState::Down),
        all_unhealthy: false,
    }
}

/// What a bed's worker is set up with beside its services.
pub struct Settings {
    /// Flows per address family.
    pub flow_capacity: usize,
    pub timeouts: FlowTimeouts,
    /// 0: the SYN flood guard never engages.
    pub syn_flood_rate: u32,
    pub icmp: IcmpSettings,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            flow_capacity: 1 << 12,
            timeouts: FlowTimeouts::default(),
            syn_flood_rate: 0,
            icmp: IcmpSettings::default(),
        }
    }
}

pub struct Bed {
    pub worker: Worker<MemIo>,
    /// The dataplane the worker follows: a test publishes changes here.
    pub cell: Arc<DataplaneCell>,
    pub affinity: AffinityWriter,
}

/// A worker on one in-memory port (port 0, forwarding to itself, MTU 1500)
/// with `services` over `backends`, an affinity table of 1,024.
pub fn bed(services: Vec<Service>, backends: Vec<Backend>, settings: Settings) -> Bed {
    let cell = Arc::new(DataplaneCell::new(Dataplane::new(1, services, backends)));
    let (affinity, reader) = AffinityTable::new(1024);
    let shared = Shared {
        dataplane: cell.clone(),
        affinity: reader,
        auto_affinity: Arc::new(AutoAffinityTable::new(1024)),
        epoch: Instant::now(),
    };
    let setup = WorkerSetup {
        id: 0,
        ports: vec![PortPlan {
            forward_to: 0,
            gateway_mac: None,
            unmatched_to: None,
            mtu: 1500,
        }],
        flow_capacity: settings.flow_capacity,
        flow_capacity_v6: settings.flow_capacity,
        timeouts: settings.timeouts,
        syn_flood_rate: settings.syn_flood_rate,
        icmp: settings.icmp,
    };
    let worker = Worker::new(
        MemIo::new(1),
        setup,
        shared,
        Arc::new(WorkerCounters::default()),
    );
    Bed {
        worker,
        cell,
        affinity,
    }
}
