//! The poll-mode worker: one thread per core, one receive and one transmit
//! queue per port, one loop.
//!
//! Each iteration receives a burst on every port and processes it in three
//! passes, as l3fwd does: prefetch the mbufs and frames (for writing: the
//! rewrite changes both); parse them, hash them and prefetch their flow-table
//! buckets and, for SYNs, prepare their affinity lookups (which prefetch the
//! affinity buckets); then route and rewrite each packet and queue it for
//! transmission, hinting the affinity slots of the SYN a few packets ahead.
//! Everything the loop writes is its own (flow table, counters, round-robin
//! state); everything shared (dataplane snapshot, affinity table) is
//! read-mostly, and the shared auto-affinity table is written only on new
//! and ending connections of services that enable it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::affinity::table::{AffinityQuery, AffinityReader};

use crate::affinity::auto::{AutoAffinityTable, AutoSlot};
use crate::datapath::classify::{self, ParsedPacket};
use crate::datapath::counters::WorkerCounters;
use crate::datapath::flow::{
    FlowEntry, FlowTable, FlowTimeouts, Lookup, TcpState, Untracked, NO_AUTO_SLOT,
};
use crate::datapath::forward;
use crate::datapath::latency::{new_histogram, TscScale};
use crate::datapath::pktio::{PacketBuf, PacketIo, MAX_BURST};
use crate::datapath::snapshot::{Dataplane, DataplaneCell, ForwardMode, SchedulerKind, Service};
use crate::sched::wrr::SmoothWrr;
use crate::types::DropReason;
use crate::types::{tcp_flags, PROTO_TCP};
use crate::types::{BackendId, MAX_SERVICES};

/// The expiry sweep visits every flow-table bucket once per this period,
/// spread over the loop iterations in proportion to time: its cost is a
/// fixed number of buckets per second (a few per mille of a core for a
/// million flows), whatever the packet rate. Entries found idle on lookup
/// are reclaimed at once; the sweep releases the ones never seen again.
const SWEEP_PERIOD_NS: u64 = 1_000_000_000;
/// How many packets ahead of the one being routed pass 3 hints the affinity
/// slot lines of a SYN: far enough for the bucket headers prefetched in
/// pass 2 to have arrived.
const AFFINITY_SLOT_DISTANCE: usize = 8;
/// How often a worker publishes its latency histogram.
const LATENCY_FOLD_NS: u64 = 200_000_000;
/// Most buckets one iteration sweeps (after a stall).
const SWEEP_MAX_BUCKETS: u64 = 256;

/// How a port's forwarded packets leave and where they go next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortPlan {
    /// Port index (in the worker's [`PacketIo`]) forwarded packets leave on.
    pub forward_to: usize,
    /// Next-hop MAC for `ipip` backends that have no MAC of their own.
    pub gateway_mac: Option<[u8; 6]>,
    /// Port that receives, unchanged, what is not for a service (non-IP,
    /// fragments, other protocols, other destinations); None = drop.
    pub unmatched_to: Option<usize>,
}

/// What a worker is told at start.
#[derive(Clone, Debug)]
pub struct WorkerSetup {
    pub id: usize,
    pub ports: Vec<PortPlan>,
    /// IPv4 flows per worker.
    pub flow_capacity: usize,
    /// IPv6 flows per worker.
    pub flow_capacity_v6: usize,
    pub timeouts: FlowTimeouts,
}

/// Shared state every worker reads.
#[derive(Clone)]
pub struct Shared {
    pub dataplane: Arc<DataplaneCell>,
    pub affinity: AffinityReader,
    pub auto_affinity: Arc<AutoAffinityTable>,
    /// The clock origin every worker and the control thread share, so that
    /// times written to shared tables (auto-affinity lingers) agree.
    pub epoch: Instant,
}

/// One worker's state.
pub struct Worker<IO: PacketIo> {
    io: IO,
    setup: WorkerSetup,
    shared: Shared,
    dp: Arc<Dataplane>,
    /// An empty snapshot only this worker holds: it stands in `dp` while a
    /// burst borrows the real one, and waits here in between. Moved, never
    /// cloned, so a burst changes no reference count.
    idle_dp: Option<Arc<Dataplane>>,
    /// Per-service round-robin state, rebuilt with each snapshot.
    wrr: Vec<Option<SmoothWrr>>,
    flows: FlowTable,
    /// The prepared affinity lookups of the current burst's SYNs.
    queries: Vec<AffinityQuery>,
    /// Time up to which the sweep has done its share.
    swept_until: u64,
    counters: Arc<WorkerCounters>,
    /// Per-packet processing time, folded into `counters.latency` a few
    /// times a second.
    latency: hdrhistogram::Histogram<u64>,
    latency_folded: u64,
    tsc: TscScale,
    rx: Vec<IO::Buf>,
    tx: Vec<Vec<IO::Buf>>,
    epoch: Instant,
}

impl<IO: PacketIo> Worker<IO> {
    pub fn new(io: IO, setup: WorkerSetup, shared: Shared, counters: Arc<WorkerCounters>) -> Self {
        let dp = shared.dataplane.load();
        let nports = io.num_ports();
        let flows = FlowTable::new(setup.flow_capacity, setup.flow_capacity_v6, setup.timeouts);
        let epoch = shared.epoch;
        let mut w = Worker {
            io,
            setup,
            shared,
            dp,
            idle_dp: Some(Arc::new(Dataplane::default())),
            wrr: Vec::new(),
            flows,
            queries: vec![AffinityQuery::NONE; MAX_BURST],
            swept_until: 0,
            counters,
            latency: new_histogram(),
            latency_folded: 0,
            tsc: TscScale::new(crate::dpdk::tsc_hz()),
            rx: Vec::with_capacity(MAX_BURST),
            tx: (0..nports).map(|_| Vec::with_capacity(MAX_BURST)).collect(),
            epoch,
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
        let start = crate::dpdk::tsc();
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
            let ns = self.tsc.ns(crate::dpdk::tsc().wrapping_sub(start));
            self.counters.busy_polls.inc();
            self.counters.busy_ns.add(ns);
            let per_packet = (ns / received as u64).max(1);
            let _ = self.latency.record_n(per_packet, received as u64);
        }
        if now.saturating_sub(self.latency_folded) >= LATENCY_FOLD_NS
            && self.counters.latency.try_fold(&mut self.latency)
        {
            self.latency_folded = now;
        }
        self.sweep(now);
        received
    }

    /// The round-robin state of each service that uses it, by service id.
    fn rebuild_wrr(&mut self) {
        let dp = &self.dp;
        let mut wrr: Vec<Option<SmoothWrr>> = (0..MAX_SERVICES).map(|_| None).collect();
        for s in dp.services.iter() {
            if s.scheduler == SchedulerKind::RoundRobin {
                let weights: Vec<u32> = s
                    .backends
                    .iter()
                    .map(|&id| dp.backend(id).map_or(0, |b| b.weight))
                    .collect();
                wrr[s.id as usize] = Some(SmoothWrr::new(&weights));
            }
        }
        self.wrr = wrr;
    }

    #[inline(always)]
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

        // Pass 1: bring the descriptors in, then the frames' first cache
        // lines, both for writing: the rewrite changes them.
        for b in rx.iter() {
            b.prefetch_meta();
        }
        for b in rx.iter() {
            b.prefetch();
        }
        // Borrow the snapshot for the burst without touching its reference
        // count (a line every worker would write, with a locked instruction
        // that would wait for the burst's pending stores): move a
        // worker-private placeholder into its place and back after.
        let placeholder = self
            .idle_dp
            .take()
            .unwrap_or_else(|| Arc::new(Dataplane::default()));
        let dp = std::mem::replace(&mut self.dp, placeholder);
        // Pass 2: parse, hash, prefetch flow buckets and, for SYNs, the
        // affinity buckets their lookup will probe.
        let mut parsed: [Option<Result<ParsedPacket, DropReason>>; MAX_BURST] = [None; MAX_BURST];
        let mut hashes = [0u64; MAX_BURST];
        // The service of each packet, looked up once here for pass 3; a
        // burst mostly goes to one service, so the last answer is kept.
        let mut services: [Option<&Service>; MAX_BURST] = [None; MAX_BURST];
        let mut last: Option<(u128, u16, u8, Option<&Service>)> = None;
        // Which packets are SYNs with a prepared affinity query (in
        // `queries`, moved out of the worker for the burst).
        let mut queried = [false; MAX_BURST];
        let mut queries = std::mem::take(&mut self.queries);
        let mut bytes = 0u64;
        for (i, b) in rx.iter().enumerate() {
            bytes += b.data().len() as u64;
            let p = classify::parse(b.data());
            if let Ok(p) = &p {
                let h = crate::types::flow_hash(&p.key);
                self.flows.prefetch(&p.key, h);
                hashes[i] = h;
                let k = &p.key;
                let svc = match last {
                    Some((dst, port, proto, svc))
                        if dst == k.dst && port == k.dport && proto == k.proto =>
                    {
                        svc
                    }
                    _ => {
                        let svc = dp.service_for(k);
                        last = Some((k.dst, k.dport, k.proto, svc));
                        svc
                    }
                };
                services[i] = svc;
                if let Some(svc) = svc.filter(|_| p.is_syn()) {
                    let q = &mut queries[i];
                    self.shared
                        .affinity
                        .prepare(q, svc.id, k.family, k.src, k.sport);
                    queried[i] = true;
                }
            }
            parsed[i] = Some(p);
        }
        c.rx_bytes.add(bytes);
        // Second affinity stage for the first SYNs (pass 3 issues it for the
        // others, AFFINITY_SLOT_DISTANCE packets ahead): their bucket headers
        // have arrived; hint the slots whose tags match. (A flow bucket's
        // slots are self-contained: its one prefetch above covers them.)
        for i in 0..n.min(AFFINITY_SLOT_DISTANCE) {
            if queried[i] {
                self.shared.affinity.prefetch_slots(&mut queries[i]);
            }
        }

        // Pass 3: route, rewrite, queue.
        let plan = self.setup.ports[port];
        let src_mac = self.io.port_mac(plan.forward_to);
        for (i, mut buf) in rx.drain(..).enumerate() {
            let ahead = i + AFFINITY_SLOT_DISTANCE;
            if ahead < n && queried[ahead] {
                self.shared.affinity.prefetch_slots(&mut queries[ahead]);
            }
            let query = queried[i].then_some(&queries[i]);
            let verdict = match parsed[i] {
                Some(Ok(p)) => self
                    .route_and_rewrite(
                        &dp,
                        services[i],
                        query,
                        &mut buf,
                        &p,
                        hashes[i],
                        now,
                        plan,
                        src_mac,
                    )
                    .map(|()| plan.forward_to),
                Some(Err(reason)) => Err(reason),
                None => Err(DropReason::Malformed),
            };
            let out = match verdict {
                Ok(out) => out,
                Err(reason) => match plan.unmatched_to {
                    Some(out) if reason.is_unmatched() => {
                        self.counters.passed.inc();
                        out
                    }
                    _ => {
                        self.counters.count_drop(reason);
                        continue;
                    }
                },
            };
            self.tx[out].push(buf);
            if self.tx[out].len() == MAX_BURST {
                self.flush(out);
            }
        }
        self.idle_dp = Some(std::mem::replace(&mut self.dp, dp));
        self.queries = queries;
        self.rx = rx;
        // The occupancy gauge, once per burst rather than per new flow (and
        // so also after resets and removals).
        self.counters.flows_active.set(self.flows.len() as u64);
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
        service: Option<&Service>,
        query: Option<&AffinityQuery>,
        buf: &mut IO::Buf,
        p: &ParsedPacket,
        hash: u64,
        now: u64,
        plan: PortPlan,
        src_mac: [u8; 6],
    ) -> Result<(), DropReason> {
        let svc = service.ok_or(DropReason::NoService)?;
        let backend = self.route(dp, svc, query, p, hash, now)?;
        let backend = dp.backend(backend).ok_or(DropReason::NoBackend)?;
        let len = buf.data().len() as u64;
        match svc.mode {
            ForwardMode::IpIp { source } => {
                let dst_mac = backend
                    .mac
                    .or(plan.gateway_mac)
                    .ok_or(DropReason::NoRoute)?;
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
    /// `query` is the packet's prepared affinity lookup (SYNs).
    fn route(
        &mut self,
        dp: &Dataplane,
        svc: &Service,
        query: Option<&AffinityQuery>,
        p: &ParsedPacket,
        hash: u64,
        now: u64,
    ) -> Result<BackendId, DropReason> {
        let is_tcp = p.key.proto == PROTO_TCP;
        let flags = if is_tcp { p.tcp_flags } else { 0 };
        let syn = p.is_syn();
        if syn {
            // Every SYN, also one repeated on a flow already open (a
            // retransmission, or a load generator's repeating flows).
            self.counters.syns.inc();
        }
        // A known flow keeps its backend while that backend is configured
        // (a draining backend keeps its connections).
        match self.flows.lookup(&p.key, hash, now, flags) {
            Lookup::Hit(e) => {
                let backend = e.backend;
                if dp.backend(backend).is_some_and(|b| b.service == svc.id) {
                    return Ok(backend);
                }
                // Its backend was removed: forget the flow and route anew.
                self.counters.rerouted.inc();
                if let Some(old) = self.flows.remove(&p.key, hash) {
                    self.counters.flows_closed.inc();
                    self.release(dp, &old, now);
                }
            }
            Lookup::Reset(e) => {
                self.counters.flows_closed.inc();
                self.release(dp, &e, now);
                // The reset that ended the flow still reaches its backend.
                let backend = match dp.backend(e.backend) {
                    Some(b) => b.id,
                    None => self.pick_stateless(dp, svc, p, hash)?,
                };
                return Ok(backend);
            }
            Lookup::Stale(e) => {
                // Idle past its timeout, or a new SYN on a closing flow's
                // tuple: the old flow is over and this packet starts anew.
                self.counters.flows_expired.inc();
                self.release(dp, &e, now);
            }
            Lookup::Miss => {}
        }

        if is_tcp && !syn {
            self.counters.unknown_flows.inc();
            if flags & tcp_flags::RST != 0 {
                // A reset for a flow we do not know: route it statelessly
                // and remember nothing.
                let backend = self.pick_stateless(dp, svc, p, hash)?;
                return Ok(backend);
            }
        }

        let now_ms = now / 1_000_000;
        let (backend, auto_slot) =
            self.pick_new(dp, svc, query, p, hash, now_ms, syn || !is_tcp)?;
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
            state,
            last_seen: now,
            auto_slot: auto_slot.map_or(NO_AUTO_SLOT, |s| s.0),
        };
        let bc = &self.counters.backends[backend as usize];
        bc.active.inc();
        match self.flows.insert(entry, hash, now) {
            Ok(None) => {}
            Ok(Some(old)) => {
                let idle = now.saturating_sub(old.last_seen);
                if idle >= self.flows.timeout(old.state).as_nanos() as u64 {
                    self.counters.flows_expired.inc();
                } else {
                    self.counters.flows_evicted.inc();
                }
                self.release(dp, &old, now);
            }
            Err(Untracked) => {
                // Routed, but not remembered: its later packets are routed
                // as an unknown flow's (affinity, then the consistent hash).
                self.counters.flows_untracked.inc();
                self.release(dp, &entry, now);
            }
        }
        if syn || !is_tcp {
            // A new connection, not one re-learned mid-stream.
            self.counters.services[svc.id as usize]
                .new_connections
                .inc();
            bc.connections.inc();
        }
        Ok(backend)
    }

    /// Backend for a connection the flow table does not know: affinity,
    /// then automatic affinity, then the scheduler (for a new connection) or
    /// the consistent hash (for the middle of an unknown one).
    #[allow(clippy::too_many_arguments)]
    fn pick_new(
        &mut self,
        dp: &Dataplane,
        svc: &Service,
        query: Option<&AffinityQuery>,
        p: &ParsedPacket,
        hash: u64,
        now_ms: u64,
        new_connection: bool,
    ) -> Result<(BackendId, Option<AutoSlot>), DropReason> {
        let sc = &self.counters.services[svc.id as usize];
        let affinity = &self.shared.affinity;
        let owner = match query {
            Some(q) => affinity.lookup_prepared(q),
            None => affinity.lookup(svc.id, p.key.family, p.key.src, p.key.sport),
        };
        if let Some(owner) = owner {
            if dp.backend(owner).is_some_and(|b| b.service == svc.id) {
                if new_connection {
                    sc.affinity_hits.inc();
                }
                return Ok((owner, None));
            }
        }
        if new_connection {
            sc.affinity_misses.inc();
        }

        if svc.auto_affinity.is_some() {
            let wrr = &mut self.wrr;
            let mut scheduled = false;
            let pinned = self.shared.auto_affinity.acquire(
                svc.id,
                p.key.family,
                p.key.src,
                now_ms,
                // A pin holds while its backend takes new connections: a
                // draining (weight 0) or removed one loses its pins.
                |id| {
                    dp.backend(id)
                        .is_some_and(|b| b.service == svc.id && b.weight > 0)
                },
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
            // counts that in its stats), or there is no backend; distribute
            // unpinned.
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
            if dp.backend(owner).is_some_and(|b| b.service == svc.id) {
                return Ok(owner);
            }
        }
        maglev_pick(dp, svc, hash).ok_or(DropReason::NoBackend)
    }

    /// A flow left the table (closed, reset, expired or evicted): its
    /// backend has one connection less and its auto-affinity pin one user less.
    fn release(&self, dp: &Dataplane, e: &FlowEntry, now: u64) {
        release_flow(&self.counters, &self.shared.auto_affinity, dp, e, now);
    }

    fn sweep(&mut self, now: u64) {
        let buckets = self.flows.buckets() as u64;
        let ns_per_bucket = (SWEEP_PERIOD_NS / buckets.max(1)).max(1);
        let due = now.saturating_sub(self.swept_until) / ns_per_bucket;
        if due == 0 {
            return;
        }
        let n = due.min(SWEEP_MAX_BUCKETS);
        self.swept_until = if due > n {
            now
        } else {
            self.swept_until + n * ns_per_bucket
        };
        let mut expired = 0u64;
        let (counters, auto, dp) = (&self.counters, &self.shared.auto_affinity, &self.dp);
        self.flows.sweep(now, n as usize, |e| {
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
        // The service by the flow's destination: the flow table keeps no
        // service ids (a removed service's id may be given to another).
        let linger_ms = dp
            .service_for(&e.key)
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
            let idx = wrr.get_mut(svc.id as usize)?.as_mut()?.pick()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::affinity::key::TableKey;
    use crate::affinity::table::{AffinityTable, AffinityWriter};
    use crate::datapath::pktio::MemIo;
    use crate::datapath::snapshot::{AutoAffinity, Backend};
    use crate::sched::maglev::MaglevTable;
    use crate::types::PortMatch;
    use crate::types::ServiceId;
    use crate::types::{Family, PROTO_UDP};
    use crate::wire::build::FrameSpec;
    use crate::wire::{ethernet, ipv4};
    use std::time::Duration;

    const VIP: [u8; 4] = [10, 0, 0, 1];
    const SEC: u64 = 1_000_000_000;

    fn backend(id: u32, service: ServiceId, weight: u32) -> Backend {
        let addr = std::net::Ipv4Addr::new(10, 1, 0, id as u8 + 1);
        Backend {
            id,
            service,
            name: format!("be{id}"),
            addr: addr.into(),
            addr_bits: u32::from(addr) as u128,
            mac: Some([2, 0, 0, 0, 1, id as u8]),
            weight,
        }
    }

    fn service(
        id: ServiceId,
        port: u16,
        proto: u8,
        backends: &[Backend],
        scheduler: SchedulerKind,
        mode: ForwardMode,
    ) -> Service {
        let names: Vec<(&str, u32)> = backends
            .iter()
            .map(|b| (b.name.as_str(), b.weight))
            .collect();
        Service {
            id,
            name: format!("svc{id}"),
            vip: std::net::Ipv4Addr::from(VIP).into(),
            vip_bits: u32::from_be_bytes(VIP) as u128,
            family: Family::V4,
            port,
            proto,
            mode,
            scheduler,
            backends: backends.iter().map(|b| b.id).collect(),
            maglev: Arc::new(MaglevTable::new(&names, 65537).unwrap()),
            auto_affinity: None,
            max_affinity: Duration::from_secs(3600),
        }
    }

    const IPIP: ForwardMode = ForwardMode::IpIp {
        source: 0x0a00_00fe,
    };

    struct Bed {
        worker: Worker<MemIo>,
        cell: Arc<DataplaneCell>,
        affinity: AffinityWriter,
    }

    fn bed(services: Vec<Service>, backends: Vec<Backend>, flow_capacity: usize) -> Bed {
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
            }],
            flow_capacity,
            flow_capacity_v6: flow_capacity,
            timeouts: FlowTimeouts {
                syn: Duration::from_secs(5),
                established: Duration::from_secs(60),
                fin: Duration::from_secs(5),
                udp: Duration::from_secs(30),
            },
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

    fn tcp(src: [u8; 4], sport: u16, flags: u8) -> Vec<u8> {
        FrameSpec::tcp_v4(src, sport, VIP, 80, flags)
            .build()
            .unwrap()
    }

    /// Runs the frames through the worker and returns, per frame sent, the
    /// backend address the output was encapsulated to.
    fn send(b: &mut Bed, frames: &[Vec<u8>], now: u64) -> Vec<[u8; 4]> {
        let mut out = Vec::new();
        for chunk in frames.chunks(MAX_BURST) {
            for f in chunk {
                b.worker.io_mut().push_rx(0, f);
            }
            b.worker.poll(now);
            for buf in b.worker.io_mut().tx[0].drain(..) {
                let eth = ethernet::Frame::new_checked(buf.data()).unwrap();
                let info = eth.l2_info().unwrap();
                let outer = ipv4::Packet::new_checked(&buf.data()[info.header_len..]).unwrap();
                assert_eq!(outer.protocol(), ipv4::PROTO_IPIP);
                assert!(outer.verify_checksum());
                out.push(outer.dst_addr());
            }
        }
        out
    }

    fn backend_index(addr: [u8; 4]) -> usize {
        addr[3] as usize - 1
    }

    #[test]
    fn syns_spread_by_weight_and_flows_stick() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 200), backend(2, 0, 300)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = bed(vec![svc], bes, 1 << 16);
        let syns: Vec<Vec<u8>> = (0..6000u32)
            .map(|i| {
                tcp(
                    [198, 18, (i >> 8) as u8, i as u8],
                    1000 + (i % 7) as u16,
                    tcp_flags::SYN,
                )
            })
            .collect();
        let first = send(&mut b, &syns, SEC);
        assert_eq!(first.len(), 6000);
        let mut per = [0usize; 3];
        for a in &first {
            per[backend_index(*a)] += 1;
        }
        for (i, w) in [1.0, 2.0, 3.0].iter().enumerate() {
            let share = per[i] as f64 / 6000.0;
            assert!((share - w / 6.0).abs() < 0.03, "backend {i}: {share}");
        }
        // The same connections' next packets go where their SYN went.
        let acks: Vec<Vec<u8>> = (0..6000u32)
            .map(|i| {
                tcp(
                    [198, 18, (i >> 8) as u8, i as u8],
                    1000 + (i % 7) as u16,
                    tcp_flags::ACK,
                )
            })
            .collect();
        assert_eq!(send(&mut b, &acks, 2 * SEC), first);
        let c = b.worker.counters();
        assert_eq!(c.syns.get(), 6000);
        assert_eq!(c.rx_packets.get(), 12000);
        assert_eq!(c.tx_packets.get(), 12000);
        assert_eq!(c.total_drops(), 0);
        assert_eq!(b.worker.flows().len(), 6000);
    }

    #[test]
    fn drops_are_counted_by_reason() {
        let bes = vec![backend(0, 0, 100)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = bed(vec![svc], bes, 1024);
        let other_port = FrameSpec::tcp_v4([1, 2, 3, 4], 5, VIP, 81, tcp_flags::SYN)
            .build()
            .unwrap();
        let arp = {
            let mut f = vec![0u8; 60];
            f[12] = 0x08;
            f[13] = 0x06;
            f
        };
        let out = send(&mut b, &[other_port, arp, vec![1, 2, 3]], SEC);
        assert!(out.is_empty());
        let c = b.worker.counters();
        assert_eq!(c.drops[DropReason::NoService as usize].get(), 1);
        assert_eq!(c.drops[DropReason::NotIp as usize].get(), 1);
        assert_eq!(c.drops[DropReason::Malformed as usize].get(), 1);
        assert_eq!(c.rx_packets.get(), c.tx_packets.get() + c.total_drops());
    }

    /// The occupancy gauge follows new flows, and resets that end them.
    #[test]
    fn flows_active_follows_syns_and_resets() {
        let bes = vec![backend(0, 0, 100)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = bed(vec![svc], bes, 1024);
        let syns: Vec<Vec<u8>> = (0..20u8)
            .map(|i| tcp([198, 18, 13, i], 1, tcp_flags::SYN))
            .collect();
        send(&mut b, &syns, SEC);
        assert_eq!(b.worker.counters().flows_active.get(), 20);
        let rsts: Vec<Vec<u8>> = (0..5u8)
            .map(|i| tcp([198, 18, 13, i], 1, tcp_flags::RST | tcp_flags::ACK))
            .collect();
        send(&mut b, &rsts, SEC);
        assert_eq!(b.worker.counters().flows_active.get(), 15);
        assert_eq!(b.worker.flows().len(), 15);
    }

    /// Every SYN counts as one, also a SYN repeated on a flow already open;
    /// only the first of each flow opens a connection. SYN+ACK and packets
    /// not for a service are no SYNs.
    #[test]
    fn every_syn_counts_and_repeats_open_no_connection() {
        let bes = vec![backend(0, 0, 100)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = bed(vec![svc], bes, 1024);
        let syns: Vec<Vec<u8>> = (0..300u32)
            .map(|i| tcp([198, 18, 14, (i % 10) as u8], 1, tcp_flags::SYN))
            .collect();
        assert_eq!(send(&mut b, &syns, SEC).len(), 300);
        send(
            &mut b,
            &[tcp([198, 18, 14, 0], 1, tcp_flags::SYN | tcp_flags::ACK)],
            SEC,
        );
        let c = b.worker.counters();
        assert_eq!(c.syns.get(), 300);
        assert_eq!(c.services[0].new_connections.get(), 10);
        assert_eq!(c.backends[0].connections.get(), 10);
        assert_eq!(b.worker.flows().len(), 10);
    }

    #[test]
    fn draining_keeps_connections_and_removal_reroutes() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 100)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = bed(vec![svc.clone()], bes.clone(), 1 << 14);
        let syns: Vec<Vec<u8>> = (0..400u32)
            .map(|i| tcp([198, 18, 1, i as u8], 2000 + i as u16, tcp_flags::SYN))
            .collect();
        let first = send(&mut b, &syns, SEC);
        let on_be0: Vec<usize> = (0..400).filter(|&i| backend_index(first[i]) == 0).collect();
        assert!(!on_be0.is_empty());

        // Drain be0: its connections stay, new ones avoid it.
        let drained = vec![backend(0, 0, 0), backend(1, 0, 100)];
        let svc2 = service(0, 80, PROTO_TCP, &drained, SchedulerKind::Maglev, IPIP);
        b.cell.publish(Dataplane::new(2, vec![svc2], drained));
        let acks: Vec<Vec<u8>> = (0..400u32)
            .map(|i| tcp([198, 18, 1, i as u8], 2000 + i as u16, tcp_flags::ACK))
            .collect();
        assert_eq!(send(&mut b, &acks, 2 * SEC), first);
        let fresh: Vec<Vec<u8>> = (0..400u32)
            .map(|i| tcp([198, 18, 2, i as u8], 3000 + i as u16, tcp_flags::SYN))
            .collect();
        assert!(send(&mut b, &fresh, 2 * SEC)
            .iter()
            .all(|a| backend_index(*a) == 1));

        // Remove be0: its connections move to be1.
        let removed = vec![backend(1, 0, 100)];
        let svc3 = service(0, 80, PROTO_TCP, &removed, SchedulerKind::Maglev, IPIP);
        b.cell.publish(Dataplane::new(3, vec![svc3], removed));
        let moved = send(&mut b, &acks, 3 * SEC);
        assert!(moved.iter().all(|a| backend_index(*a) == 1));
        assert_eq!(b.worker.counters().rerouted.get(), on_be0.len() as u64);
    }

    #[test]
    fn unknown_established_flows_follow_the_consistent_hash() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 100), backend(2, 0, 100)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut a = bed(vec![svc.clone()], bes.clone(), 1 << 14);
        let mut restarted = bed(vec![svc], bes, 1 << 14);
        let syns: Vec<Vec<u8>> = (0..500u32)
            .map(|i| tcp([198, 18, 3, i as u8], 4000 + i as u16, tcp_flags::SYN))
            .collect();
        let acks: Vec<Vec<u8>> = (0..500u32)
            .map(|i| tcp([198, 18, 3, i as u8], 4000 + i as u16, tcp_flags::ACK))
            .collect();
        let chosen = send(&mut a, &syns, SEC);
        // A second instance that never saw the SYNs agrees on every flow.
        assert_eq!(send(&mut restarted, &acks, SEC), chosen);
        assert_eq!(restarted.worker.counters().unknown_flows.get(), 500);
    }

    #[test]
    fn affinity_beats_the_scheduler_for_new_connections() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 100), backend(2, 0, 100)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = bed(vec![svc], bes, 1 << 14);
        let key = TableKey::new(0, Family::V4, 0xc612_0500, 24, PortMatch::Any).unwrap();
        b.affinity.insert(key, 2).unwrap();
        let pinned: Vec<Vec<u8>> = (0..256u32)
            .map(|i| tcp([198, 18, 5, i as u8], 5000, tcp_flags::SYN))
            .collect();
        assert!(send(&mut b, &pinned, SEC)
            .iter()
            .all(|a| backend_index(*a) == 2));
        let free: Vec<Vec<u8>> = (0..256u32)
            .map(|i| tcp([198, 18, 6, i as u8], 5000, tcp_flags::SYN))
            .collect();
        let out = send(&mut b, &free, SEC);
        assert!((0..3).all(|k| out.iter().any(|a| backend_index(*a) == k)));
        let sc = &b.worker.counters().services[0];
        assert_eq!(sc.affinity_hits.get(), 256);
        assert_eq!(sc.affinity_misses.get(), 256);
    }

    #[test]
    fn auto_affinity_pins_parallel_connections() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 100), backend(2, 0, 100)];
        let mut svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::RoundRobin, IPIP);
        svc.auto_affinity = Some(AutoAffinity {
            linger: Duration::from_secs(0),
        });
        let mut b = bed(vec![svc], bes, 1 << 14);
        // Round robin would spread these; auto-affinity keeps each client on one backend.
        for client in 0..20u8 {
            let conns: Vec<Vec<u8>> = (0..6u16)
                .map(|p| tcp([198, 18, 7, client], 6000 + p, tcp_flags::SYN))
                .collect();
            let out = send(&mut b, &conns, SEC);
            assert!(out.iter().all(|a| *a == out[0]), "client {client}: {out:?}");
        }
        // Once every connection closed (RST) and no linger, the client is free again.
        let rst: Vec<Vec<u8>> = (0..6u16)
            .map(|p| tcp([198, 18, 7, 0], 6000 + p, tcp_flags::RST))
            .collect();
        send(&mut b, &rst, 2 * SEC);
        let again: Vec<Vec<u8>> = (0..6u16)
            .map(|p| tcp([198, 18, 7, 0], 7000 + p, tcp_flags::SYN))
            .collect();
        let out = send(&mut b, &again, 3 * SEC);
        assert!(out.iter().all(|a| *a == out[0]));
    }

    #[test]
    fn udp_flows_and_round_robin() {
        let bes = vec![backend(0, 0, 1), backend(1, 0, 1)];
        let svc = service(0, 53, PROTO_UDP, &bes, SchedulerKind::RoundRobin, IPIP);
        let mut b = bed(vec![svc], bes, 1024);
        let frames: Vec<Vec<u8>> = (0..10u8)
            .map(|i| {
                FrameSpec::udp_v4([198, 18, 9, i], 999, VIP, 53)
                    .build()
                    .unwrap()
            })
            .collect();
        let out = send(&mut b, &frames, SEC);
        let ones = out.iter().filter(|a| backend_index(**a) == 1).count();
        assert_eq!(ones, 5, "round robin alternates: {out:?}");
        // The same flows again stick to their backends.
        assert_eq!(send(&mut b, &frames, 2 * SEC), out);
    }

    #[test]
    fn full_tx_queue_is_counted() {
        let bes = vec![backend(0, 0, 100)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = bed(vec![svc], bes, 1024);
        b.worker.io_mut().tx_capacity = 3;
        let syns: Vec<Vec<u8>> = (0..10u8)
            .map(|i| tcp([198, 18, 10, i], 1, tcp_flags::SYN))
            .collect();
        for f in &syns {
            b.worker.io_mut().push_rx(0, f);
        }
        b.worker.poll(SEC);
        let c = b.worker.counters();
        assert_eq!(c.tx_packets.get(), 3);
        assert_eq!(c.drops[DropReason::TxFull as usize].get(), 7);
    }

    #[test]
    fn l2_mode_rewrites_macs_only() {
        let bes = vec![backend(0, 0, 100)];
        let svc = service(
            0,
            80,
            PROTO_TCP,
            &bes,
            SchedulerKind::Maglev,
            ForwardMode::L2,
        );
        let mut b = bed(vec![svc], bes, 1024);
        let f = tcp([198, 18, 11, 1], 1, tcp_flags::SYN);
        b.worker.io_mut().push_rx(0, &f);
        b.worker.poll(SEC);
        let out = b.worker.io_mut().tx[0].pop().unwrap();
        assert_eq!(&out.data()[..6], &[2, 0, 0, 0, 1, 0]);
        assert_eq!(&out.data()[6..12], &b.worker.io_mut().port_mac(0));
        assert_eq!(&out.data()[12..], &f[12..]);
    }

    #[test]
    fn unmatched_traffic_can_be_passed_to_a_port() {
        let bes = vec![backend(0, 0, 100)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = bed(vec![svc], bes, 1024);
        b.worker.setup.ports[0].unmatched_to = Some(0);
        let other = FrameSpec::tcp_v4([1, 2, 3, 4], 5, [10, 9, 9, 9], 22, tcp_flags::SYN)
            .build()
            .unwrap();
        let mut arp = vec![0u8; 60];
        arp[12] = 0x08;
        arp[13] = 0x06;
        for f in [&other, &arp, &vec![0u8; 3]] {
            b.worker.io_mut().push_rx(0, f);
        }
        b.worker.poll(SEC);
        let out: Vec<Vec<u8>> = b.worker.io_mut().tx[0]
            .drain(..)
            .map(|m| m.data().to_vec())
            .collect();
        assert_eq!(out, vec![other, arp], "passed unchanged, in order");
        let c = b.worker.counters();
        assert_eq!(c.passed.get(), 2);
        // Malformed frames are never passed on.
        assert_eq!(c.drops[DropReason::Malformed as usize].get(), 1);
    }

    #[test]
    fn draining_a_backend_moves_its_auto_affinity_pins() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 100)];
        let mut svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        svc.auto_affinity = Some(AutoAffinity {
            linger: Duration::from_secs(60),
        });
        let mut b = bed(vec![svc.clone()], bes, 1 << 12);
        let first = send(&mut b, &[tcp([198, 18, 12, 1], 100, tcp_flags::SYN)], SEC)[0];
        let pinned = backend_index(first);
        // Drain the pinned backend while the client's connection is open.
        let mut drained = vec![backend(0, 0, 100), backend(1, 0, 100)];
        drained[pinned].weight = 0;
        let mut svc2 = svc;
        svc2.maglev = Arc::new(
            MaglevTable::new(
                &[("be0", drained[0].weight), ("be1", drained[1].weight)],
                65537,
            )
            .unwrap(),
        );
        b.cell.publish(Dataplane::new(2, vec![svc2], drained));
        // The open connection stays; a new one goes to the other backend.
        assert_eq!(
            send(
                &mut b,
                &[tcp([198, 18, 12, 1], 100, tcp_flags::ACK)],
                2 * SEC
            ),
            vec![first]
        );
        let next = send(
            &mut b,
            &[tcp([198, 18, 12, 1], 101, tcp_flags::SYN)],
            2 * SEC,
        )[0];
        assert_ne!(backend_index(next), pinned);
    }

    /// A snapshot that gives services other ids (the registry keeps ids,
    /// but one given up is eventually reused): a flow that ends afterwards
    /// releases its auto-affinity pin with the linger of its own service
    /// (found by the flow's destination), not of the service that now has
    /// its old id.
    #[test]
    fn a_flow_ending_after_its_service_changed_id_lingers_as_its_service_says() {
        let pinned_svc = |id: ServiceId, bes: &[Backend]| {
            let mut s = service(id, 80, PROTO_TCP, bes, SchedulerKind::Maglev, IPIP);
            s.auto_affinity = Some(AutoAffinity {
                linger: Duration::from_secs(60),
            });
            s
        };
        let plain_svc = |id: ServiceId, bes: &[Backend]| {
            service(id, 81, PROTO_TCP, bes, SchedulerKind::Maglev, IPIP)
        };
        let before = vec![backend(0, 0, 100), backend(1, 0, 100), backend(2, 1, 100)];
        let mut b = bed(
            vec![pinned_svc(0, &before[..2]), plain_svc(1, &before[2..])],
            before,
            1 << 12,
        );
        send(&mut b, &[tcp([198, 18, 13, 1], 100, tcp_flags::SYN)], SEC);
        let now_ms = |s: u64| s * 1000;
        assert_eq!(b.worker.shared.auto_affinity.len_active(now_ms(1)), 1);
        // The same services, listed the other way round.
        let after = vec![backend(0, 1, 100), backend(1, 1, 100), backend(2, 0, 100)];
        b.cell.publish(Dataplane::new(
            2,
            vec![plain_svc(0, &after[2..]), pinned_svc(1, &after[..2])],
            after,
        ));
        send(
            &mut b,
            &[tcp([198, 18, 13, 1], 100, tcp_flags::RST)],
            2 * SEC,
        );
        assert_eq!(b.worker.counters().flows_closed.get(), 1);
        // Its last connection is gone; the pin lingers for its 60 s.
        let auto = &b.worker.shared.auto_affinity;
        assert_eq!(auto.len_active(now_ms(3)), 1);
        assert_eq!(auto.len_active(now_ms(63)), 0);
    }
}
