//! The poll-mode worker: one thread per core, one receive and one transmit
//! queue per port, one loop.
//!
//! Each iteration receives a burst on every port and processes it in three
//! passes, as l3fwd does: prefetch the frames; parse them, hash them and
//! prefetch their flow-table buckets; then route and rewrite each packet and
//! queue it for transmission. Everything the loop writes is its own (flow
//! table, counters, round-robin state); everything shared (dataplane snapshot,
//! affinity table) is read-mostly, and the shared auto-affinity table is
//! written only on new and ending connections of services that enable it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::affinity::{AffinityReader, AutoAffinityTable, AutoSlot};
use crate::dataplane::{BackendId, Dataplane, DataplaneCell, ForwardMode, SchedulerKind, Service};
use crate::flow::{FlowEntry, FlowTable, FlowTimeouts, Lookup, TcpState};
use crate::forward;
use crate::io::{PacketBuf, PacketIo, MAX_BURST};
use crate::packet::{self, tcp_flags, ParsedPacket, PROTO_TCP};
use crate::sched::SmoothWrr;
use crate::stats::{DropReason, WorkerCounters};

/// No auto-affinity slot in a flow entry.
const NO_AUTO_SLOT: u32 = u32::MAX;

/// Flow-table buckets examined for expiry per loop iteration.
const SWEEP_BUCKETS: usize = 16;

/// How a port's forwarded packets leave and where they go next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortPlan {
    /// Port index (in the worker's [`PacketIo`]) forwarded packets leave on.
    pub forward_to: usize,
    /// Next-hop MAC for `ipip` backends that have no MAC of their own.
    pub gateway_mac: Option<[u8; 6]>,
}

/// What a worker is told at start.
#[derive(Clone, Debug)]
pub struct WorkerSetup {
    pub id: usize,
    pub ports: Vec<PortPlan>,
    pub flow_capacity: usize,
    pub timeouts: FlowTimeouts,
}

/// Shared state every worker reads.
#[derive(Clone)]
pub struct Shared {
    pub dataplane: Arc<DataplaneCell>,
    pub affinity: AffinityReader,
    pub auto_affinity: Arc<AutoAffinityTable>,
}

/// One worker's state.
pub struct Worker<IO: PacketIo> {
    io: IO,
    setup: WorkerSetup,
    shared: Shared,
    dp: Arc<Dataplane>,
    /// Per-service round-robin state, rebuilt with each snapshot.
    wrr: Vec<Option<SmoothWrr>>,
    flows: FlowTable,
    counters: Arc<WorkerCounters>,
    rx: Vec<IO::Buf>,
    tx: Vec<Vec<IO::Buf>>,
    epoch: Instant,
}

/// The outcome of routing one packet.
struct Route {
    backend: BackendId,
}

impl<IO: PacketIo> Worker<IO> {
    pub fn new(io: IO, setup: WorkerSetup, shared: Shared, counters: Arc<WorkerCounters>) -> Self {
        let dp = shared.dataplane.load();
        let nports = io.num_ports();
        let flows = FlowTable::new(setup.flow_capacity, setup.timeouts);
        let mut w = Worker {
            io,
            setup,
            shared,
            dp,
            wrr: Vec::new(),
            flows,
            counters,
            rx: Vec::with_capacity(MAX_BURST),
            tx: (0..nports).map(|_| Vec::with_capacity(MAX_BURST)).collect(),
            epoch: Instant::now(),
        };
        w.rebuild_wrr();
        w
    }

    /// This worker's counters.
    pub fn counters(&self) -> &Arc<WorkerCounters> {
        &self.counters
    }

    /// The worker's packet I/O (tests read what was transmitted).
    pub fn io_mut(&mut self) -> &mut IO {
        &mut self.io
    }

    /// Connections in this worker's flow table.
    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    /// Runs until `stop` is set.
    pub fn run(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let now = self.now_ns();
            self.poll(now);
        }
    }

    /// Monotonic nanoseconds since the worker started.
    #[inline]
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// One loop iteration at time `now` (ns): every port polled once.
    /// Returns the number of packets received.
    pub fn poll(&mut self, now: u64) -> usize {
        if self.shared.dataplane.generation() != self.dp.generation {
            self.dp = self.shared.dataplane.load();
            self.rebuild_wrr();
        }
        self.counters.polls.inc();
        let mut received = 0;
        for port in 0..self.io.num_ports() {
            received += self.poll_port(port, now);
        }
        if received > 0 {
            self.counters.busy_polls.inc();
            self.counters.busy_ns.add(self.now_ns().saturating_sub(now));
        }
        self.sweep(now);
        received
    }

    fn rebuild_wrr(&mut self) {
        let dp = &self.dp;
        self.wrr = dp
            .services
            .iter()
            .map(|s| match s.scheduler {
                SchedulerKind::RoundRobin => {
                    let weights: Vec<u32> = s
                        .backends
                        .iter()
                        .map(|&id| dp.backend(id).map_or(0, |b| b.weight))
                        .collect();
                    Some(SmoothWrr::new(&weights))
                }
                SchedulerKind::Maglev => None,
            })
            .collect();
    }

    fn poll_port(&mut self, port: usize, now: u64) -> usize {
        let mut rx = std::mem::take(&mut self.rx);
        rx.clear();
        self.io.rx_burst(port, &mut rx);
        let n = rx.len();
        if n == 0 {
            self.rx = rx;
            return 0;
        }
        let c = &self.counters;
        c.rx_packets.add(n as u64);

        // Pass 1: bring the frames' first cache line in.
        for b in rx.iter() {
            b.prefetch();
        }
        // Pass 2: parse, hash, prefetch flow buckets.
        let mut parsed: [Option<Result<ParsedPacket, DropReason>>; MAX_BURST] = [None; MAX_BURST];
        let mut hashes = [0u64; MAX_BURST];
        let mut bytes = 0u64;
        for (i, b) in rx.iter().enumerate() {
            bytes += b.data().len() as u64;
            let p = packet::parse(b.data());
            if let Ok(p) = &p {
                let h = packet::flow_hash(&p.key);
                self.flows.prefetch(h);
                hashes[i] = h;
            }
            parsed[i] = Some(p);
        }
        c.rx_bytes.add(bytes);

        // Pass 3: route, rewrite, queue.
        let plan = self.setup.ports[port];
        let src_mac = self.io.port_mac(plan.forward_to);
        // One reference-count increment per burst, not per packet.
        let dp = Arc::clone(&self.dp);
        for (i, mut buf) in rx.drain(..).enumerate() {
            let p = match parsed[i] {
                Some(Ok(p)) => p,
                Some(Err(reason)) => {
                    self.counters.count_drop(reason);
                    continue;
                }
                None => {
                    self.counters.count_drop(DropReason::Malformed);
                    continue;
                }
            };
            match self.route_and_rewrite(&dp, &mut buf, &p, hashes[i], now, plan, src_mac) {
                Ok(()) => self.tx[plan.forward_to].push(buf),
                Err(reason) => self.counters.count_drop(reason),
            }
            if self.tx[plan.forward_to].len() == MAX_BURST {
                self.flush(plan.forward_to);
            }
        }
        self.rx = rx;
        for out in 0..self.tx.len() {
            if !self.tx[out].is_empty() {
                self.flush(out);
            }
        }
        n
    }

    fn flush(&mut self, port: usize) {
        let q = &mut self.tx[port];
        let before = q.len();
        let bytes: u64 = q.iter().map(|b| b.data().len() as u64).sum();
        self.io.tx_burst(port, q);
        let unsent = q.len();
        let unsent_bytes: u64 = q.iter().map(|b| b.data().len() as u64).sum();
        self.counters.tx_packets.add((before - unsent) as u64);
        self.counters.tx_bytes.add(bytes - unsent_bytes);
        if unsent > 0 {
            self.counters.drops[DropReason::TxFull as usize].add(unsent as u64);
            q.clear();
        }
    }

    /// Picks the backend for a packet and rewrites the frame for it.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn route_and_rewrite(
        &mut self,
        dp: &Dataplane,
        buf: &mut IO::Buf,
        p: &ParsedPacket,
        hash: u64,
        now: u64,
        plan: PortPlan,
        src_mac: [u8; 6],
    ) -> Result<(), DropReason> {
        let svc = dp.service_for(&p.key).ok_or(DropReason::NoService)?;
        let route = self.route(dp, svc, p, hash, now)?;
        let backend = dp.backend(route.backend).ok_or(DropReason::NoBackend)?;
        let len = buf.data().len() as u64;
        match svc.mode {
            ForwardMode::IpIp { source } => {
                let dst_mac = backend.mac.or(plan.gateway_mac).ok_or(DropReason::NoRoute)?;
                forward::encap_ipip(buf, p, source, backend.addr_bits, src_mac, dst_mac)?;
            }
            ForwardMode::L2 => {
                let dst_mac = backend.mac.ok_or(DropReason::NoRoute)?;
                forward::rewrite_l2(buf, src_mac, dst_mac);
            }
        }
        let sc = &self.counters.services[svc.id as usize];
        sc.packets.inc();
        let bc = &self.counters.backends[backend.id as usize];
        bc.packets.inc();
        bc.bytes.add(len);
        Ok(())
    }

    /// Finds the connection's backend, creating its flow entry if needed.
    fn route(
        &mut self,
        dp: &Dataplane,
        svc: &Service,
        p: &ParsedPacket,
        hash: u64,
        now: u64,
    ) -> Result<Route, DropReason> {
        let is_tcp = p.key.proto == PROTO_TCP;
        let flags = if is_tcp { p.tcp_flags } else { 0 };
        // A known flow keeps its backend while that backend is configured
        // (a draining backend keeps its connections).
        match self.flows.lookup(&p.key, hash, now, flags) {
            Lookup::Hit(e) => {
                let backend = e.backend;
                if dp.backend(backend).is_some() {
                    return Ok(Route { backend });
                }
                // Its backend was removed: forget the flow and route anew.
                self.counters.rerouted.inc();
                if let Some(old) = self.flows.remove(&p.key, hash) {
                    self.counters.flows_closed.inc();
                    self.release(&old, now);
                }
            }
            Lookup::Ended(e) => {
                self.counters.flows_closed.inc();
                self.release(&e, now);
                if flags & tcp_flags::RST != 0 {
                    // The reset that ended the flow still reaches its backend.
                    let backend = match dp.backend(e.backend) {
                        Some(b) => b.id,
                        None => self.pick_stateless(dp, svc, p, hash)?,
                    };
                    return Ok(Route { backend });
                }
                // Found idle past its timeout: this packet starts over.
            }
            Lookup::Miss => {}
        }

        let syn = p.is_syn();
        if is_tcp {
            if syn {
                self.counters.syns.inc();
            } else {
                self.counters.unknown_flows.inc();
                if flags & tcp_flags::RST != 0 {
                    // A reset for a flow we do not know: route it statelessly
                    // and remember nothing.
                    let backend = self.pick_stateless(dp, svc, p, hash)?;
                    return Ok(Route { backend });
                }
            }
        }

        let now_ms = now / 1_000_000;
        let (backend, auto_slot) = self.pick_new(dp, svc, p, hash, now_ms, syn || !is_tcp)?;
        let state = if !is_tcp {
            TcpState::Udp
        } else if syn {
            TcpState::SynSeen
        } else if flags & tcp_flags::FIN != 0 {
            TcpState::Closing
        } else {
            TcpState::Established
        };
        let entry = FlowEntry {
            key: p.key,
            backend,
            service: svc.id,
            state,
            last_seen: now,
            auto_slot: auto_slot.map_or(NO_AUTO_SLOT, |s| s.0),
        };
        if let Some(old) = self.flows.insert(entry, hash, now) {
            self.counters.flows_evicted.inc();
            self.release(&old, now);
        }
        self.counters.flows_active.set(self.flows.len() as u64);
        let sc = &self.counters.services[svc.id as usize];
        sc.new_connections.inc();
        let bc = &self.counters.backends[backend as usize];
        bc.connections.inc();
        bc.active.inc();
        Ok(Route { backend })
    }

    /// Backend for a connection the flow table does not know: affinity,
    /// then automatic affinity, then the scheduler (for a new connection) or
    /// the consistent hash (for the middle of an unknown one).
    fn pick_new(
        &mut self,
        dp: &Dataplane,
        svc: &Service,
        p: &ParsedPacket,
        hash: u64,
        now_ms: u64,
        new_connection: bool,
    ) -> Result<(BackendId, Option<AutoSlot>), DropReason> {
        let sc = &self.counters.services[svc.id as usize];
        if let Some(owner) =
            self.shared
                .affinity
                .lookup(svc.id, p.key.family, p.key.src, p.key.sport)
        {
            if dp.backend(owner).is_some() {
                sc.affinity_hits.inc();
                return Ok((owner, None));
            }
        }
        sc.affinity_misses.inc();

        if svc.auto_affinity.is_some() {
            let wrr = &mut self.wrr;
            let mut scheduled = false;
            let pinned = self.shared.auto_affinity.acquire(
                svc.id,
                p.key.family,
                p.key.src,
                now_ms,
                |id| dp.backend(id).is_some(),
                || {
                    scheduled = true;
                    if new_connection {
                        schedule(dp, svc, wrr, hash)
                    } else {
                        maglev_pick(dp, svc, hash)
                    }
                },
            );
            if let Some((backend, slot)) = pinned {
                if !scheduled {
                    sc.auto_affinity_hits.inc();
                }
                return Ok((backend, Some(slot)));
            }
            // No pin: the shared table had no room for this client (it
            // counts that), or there is no backend; distribute unpinned.
        }

        let backend = if new_connection {
            schedule(dp, svc, &mut self.wrr, hash)
        } else {
            maglev_pick(dp, svc, hash)
        };
        backend.map(|b| (b, None)).ok_or(DropReason::NoBackend)
    }

    /// Backend for a packet that creates no state (a stray reset).
    fn pick_stateless(
        &self,
        dp: &Dataplane,
        svc: &Service,
        p: &ParsedPacket,
        hash: u64,
    ) -> Result<BackendId, DropReason> {
        if let Some(owner) =
            self.shared
                .affinity
                .lookup(svc.id, p.key.family, p.key.src, p.key.sport)
        {
            if dp.backend(owner).is_some() {
                return Ok(owner);
            }
        }
        maglev_pick(dp, svc, hash).ok_or(DropReason::NoBackend)
    }

    /// A flow left the table (closed, reset, expired or evicted): its
    /// backend has one connection less and its auto-affinity pin one user less.
    fn release(&self, e: &FlowEntry, now: u64) {
        release_flow(&self.counters, &self.shared.auto_affinity, &self.dp, e, now);
    }

    fn sweep(&mut self, now: u64) {
        let mut expired = 0u64;
        let (counters, auto, dp) = (&self.counters, &self.shared.auto_affinity, &self.dp);
        self.flows.sweep(now, SWEEP_BUCKETS, |e| {
            expired += 1;
            release_flow(counters, auto, dp, &e, now);
        });
        if expired > 0 {
            self.counters.flows_expired.add(expired);
            self.counters.flows_active.set(self.flows.len() as u64);
        }
    }
}

/// Accounts for a flow that left a worker's table: its backend has one
/// active connection less, and its auto-affinity pin one user less (the pin
/// lingers as the service says once its last connection is gone).
fn release_flow(
    counters: &WorkerCounters,
    auto: &AutoAffinityTable,
    dp: &Dataplane,
    e: &FlowEntry,
    now: u64,
) {
    counters.backends[e.backend as usize].active.sub(1);
    if e.auto_slot != NO_AUTO_SLOT {
        let linger_ms = dp
            .services
            .get(e.service as usize)
            .and_then(|s| s.auto_affinity)
            .map_or(0, |a| a.linger.as_millis() as u64);
        auto.release(AutoSlot(e.auto_slot), now / 1_000_000, linger_ms);
    }
}

/// The service's scheduler: Maglev on the flow hash, or round robin.
#[inline]
fn schedule(
    dp: &Dataplane,
    svc: &Service,
    wrr: &mut [Option<SmoothWrr>],
    hash: u64,
) -> Option<BackendId> {
    match svc.scheduler {
        SchedulerKind::Maglev => maglev_pick(dp, svc, hash),
        SchedulerKind::RoundRobin => {
            let idx = wrr.get_mut(svc.id as usize)?.as_mut()?.next()?;
            let id = *svc.backends.get(idx)?;
            dp.backend(id).map(|b| b.id)
        }
    }
}

/// The consistent-hash choice, which every instance agrees on.
#[inline]
fn maglev_pick(dp: &Dataplane, svc: &Service, hash: u64) -> Option<BackendId> {
    let idx = svc.maglev.lookup(hash)?;
    let id = *svc.backends.get(idx)?;
    dp.backend(id).map(|b| b.id)
}
