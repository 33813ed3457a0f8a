//! The poll-mode worker: one thread per core, one receive and one transmit
//! queue per port, one loop.
//!
//! Each iteration receives a burst on every port and processes it in three
//! passes, as l3fwd does: prefetch the mbufs and frames (for writing: the
//! rewrite changes both); parse them, hash them and prefetch their
//! flow-table buckets and, for SYNs, start their affinity lookups (which
//! hint the host-filter words the next stage reads), then prepare the
//! SYNs' lookups (which prefetch the affinity buckets); then route and
//! rewrite each packet and queue it for transmission, issuing the later
//! prefetch stages a few packets ahead (a flow's alternate bucket where it
//! will be needed, a SYN's affinity slots).
//!
//! While a port's bursts come full, one iteration takes up to
//! [`PIPELINED_BURSTS`] of them and receives each before routing the one
//! ahead of it: once the device has handed over the next burst (its
//! receive, a copy on some devices, is when the lines the burst ahead's
//! parse and `prepare` hinted arrive: its flow buckets, its affinity
//! bucket headers), the burst ahead's later stages are all hinted, and
//! their lines (an affinity slot at a random place in tens of MiB, a
//! flow's alternate bucket) arrive while the next burst is parsed and its
//! lookups prepared; a burst not full is routed at once, as above.
//! Packets still leave in the order they came: a later burst's first
//! passes only read and hint.
//!
//! Everything the loop writes is its own (flow table, counters, round-robin
//! state); everything shared (dataplane snapshot, affinity table) is
//! read-mostly, and the shared auto-affinity table is written only on new
//! and ending connections of services that enable it.
//!
//! ICMP messages, and packets too long for their port's MTU once
//! forwarded, leave the main line in pass 3 as errors (an ICMP message as
//! `Icmp`, a too-long packet as the encapsulation's `TooBig`, after its
//! connection was routed) for one out-of-line path (`Worker::not_forwarded`,
//! and [`crate::datapath::icmp`]): an ICMP error goes where its connection's
//! packets go, without touching the connection's state; an echo request and
//! a too-big packet with DF are answered on the port they came in on; a
//! too-big packet without DF is forwarded in fragments. The main line
//! itself holds no call for any of it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::affinity::table::{AffinityMatch, AffinityQuery, AffinityReader};

use crate::affinity::auto::{AutoAffinityTable, AutoSlot};
use crate::datapath::classify::{self, IcmpAt, NotFlow, ParsedPacket};
use crate::datapath::counters::WorkerCounters;
use crate::datapath::flow::{
    FlowEntry, FlowTable, FlowTimeouts, Lookup, TcpState, Untracked, NO_AUTO_SLOT,
};
use crate::datapath::forward::{self, Egress};
use crate::datapath::icmp::{self, IcmpSettings, Message, RateLimiter, SourceLimiter};
use crate::datapath::latency::{new_histogram, TscScale};
use crate::datapath::pktio::{PacketBuf, PacketIo, MAX_BURST};
use crate::datapath::snapshot::{Dataplane, DataplaneCell, ForwardMode, SchedulerKind, Service};
use crate::datapath::syn_guard::SynGuard;
use crate::sched::wrr::SmoothWrr;
use crate::types::{tcp_flags, PROTO_TCP};
use crate::types::{BackendId, ServiceId, MAX_SERVICES};
use crate::types::{DropReason, Family, FlowKey, IcmpDrop};

/// The expiry sweep visits every flow-table bucket once per this period,
/// spread over the loop iterations in proportion to time: its cost is a
/// fixed number of buckets per second, whatever the packet rate. Entries
/// found idle on lookup are reclaimed at once; the sweep releases the ones
/// never seen again.
const SWEEP_PERIOD_NS: u64 = 1_000_000_000;
/// How many packets ahead of the one being routed pass 3 hints the affinity
/// slot lines of a SYN: far enough for the bucket headers prefetched in
/// pass 2 to have arrived.
const AFFINITY_SLOT_DISTANCE: usize = 8;
/// How often a worker publishes its latency histogram.
const LATENCY_FOLD_NS: u64 = 200_000_000;
/// Most buckets one iteration that received packets sweeps (after a
/// stall), and one that received none: an idle worker (which may sleep
/// `idle_sleep` between polls, at least 100 polls a second) catches up on a
/// large table's sweep while no packet waits for it.
const SWEEP_MAX_BUCKETS: u64 = 256;
const SWEEP_MAX_BUCKETS_IDLE: u64 = 4096;
/// A burst's storage before its packets are parsed into it.
const NO_PACKETS: [ParsedPacket; MAX_BURST] = [ParsedPacket::EMPTY; MAX_BURST];
const NO_QUERIES: [AffinityQuery; MAX_BURST] = [AffinityQuery::NONE; MAX_BURST];
/// What a burst's packet is to pass 3: no flow's (malformed, or not TCP or
/// UDP), a flow's in the flow table, or a SYN the SYN flood guard leaves
/// out of it.
const NOT_FLOW: u8 = 0;
const TRACKED: u8 = 1;
const UNTRACKED: u8 = 2;

/// Most bursts one poll takes from a port while they come full: enough
/// that the burst routed without a receive behind it (the last) is the
/// exception, few enough that the other ports, the snapshot check and the
/// expiry sweep wait at most 128 packets.
const PIPELINED_BURSTS: usize = 4;

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
    /// Longest IP packet `forward_to`'s link carries (its `mtu`): longer
    /// ones, encapsulation included, are answered with ICMP or fragmented.
    pub mtu: usize,
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
    /// SYNs per second past which the worker's SYN flood guard engages
    /// (0: never; module `syn_guard`).
    pub syn_flood_rate: u32,
    pub icmp: IcmpSettings,
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
    /// The backends as packets received on each port reach them (by
    /// backend id), rebuilt with each snapshot.
    exits: Vec<Box<[Exit]>>,
    flows: FlowTable,
    /// The storage of the bursts a poll holds at once (moved out for the
    /// poll and back after: fixed lengths, so the loops index them without
    /// bounds checks; kept from poll to poll, so not written anew).
    bursts: Option<Box<BurstStores<IO::Buf>>>,
    /// Time up to which the sweep has done its share.
    swept_until: u64,
    /// Says whether this worker's SYNs get flow entries.
    syn_guard: SynGuard,
    counters: Arc<WorkerCounters>,
    /// Per-packet processing time, folded into `counters.latency` a few
    /// times a second.
    latency: hdrhistogram::Histogram<u64>,
    latency_folded: u64,
    tsc: TscScale,
    tx: Vec<Vec<IO::Buf>>,
    epoch: Instant,
    /// Echo replies of this worker.
    echo_limit: RateLimiter,
    /// "Fragmentation needed" / "packet too big" answers, per client.
    too_big_limit: SourceLimiter,
    /// Identification of the next outer IPv4 header this worker writes
    /// (`ipip`); fragments keep their packet's.
    ip_ident: u16,
}

impl<IO: PacketIo> Worker<IO> {
    pub fn new(io: IO, setup: WorkerSetup, shared: Shared, counters: Arc<WorkerCounters>) -> Self {
        let dp = shared.dataplane.load();
        let nports = io.num_ports();
        let flows = FlowTable::new(setup.flow_capacity, setup.flow_capacity_v6, setup.timeouts);
        let epoch = shared.epoch;
        let echo_limit = RateLimiter::new(setup.icmp.echo_rate);
        let too_big_limit = SourceLimiter::new(setup.icmp.too_big_rate);
        let syn_guard = SynGuard::new(setup.syn_flood_rate);
        // Workers start their identifications far apart, so two workers'
        // packets to one backend rarely share one at the same time.
        let ip_ident = (setup.id as u16).wrapping_mul(0x9e37);
        let mut w = Worker {
            io,
            setup,
            shared,
            dp,
            idle_dp: Some(Arc::new(Dataplane::default())),
            wrr: Vec::new(),
            exits: Vec::new(),
            flows,
            bursts: Some(Box::new(BurstStores::new())),
            swept_until: 0,
            syn_guard,
            counters,
            latency: new_histogram(),
            latency_folded: 0,
            tsc: TscScale::new(crate::dpdk::tsc_hz()),
            tx: (0..nports).map(|_| Vec::with_capacity(MAX_BURST)).collect(),
            epoch,
            echo_limit,
            too_big_limit,
            ip_ident,
        };
        w.adopt_snapshot();
        w
    }

    /// This worker's counters.
    pub fn counters(&self) -> &Arc<WorkerCounters> {
        &self.counters
    }

    /// The worker's packet I/O: tests read what was transmitted, and a
    /// benchmark hands the queues between two workers taking turns on
    /// them (swapped between polls, for I/O with as many ports as the
    /// worker was made with: its per-port state is sized at `new`).
    pub fn io_mut(&mut self) -> &mut IO {
        &mut self.io
    }

    /// Connections in this worker's flow table.
    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    /// Polls until `stop` is set. With `idle_sleep`, a poll that found
    /// every receive queue empty is followed by a sleep that long, which
    /// leaves the CPU to whatever shares it (`[cores] share_cpus`); without
    /// it the loop never pauses, as on a core of its own.
    pub fn run(&mut self, stop: &AtomicBool, idle_sleep: Option<Duration>) {
        while !stop.load(Ordering::Relaxed) {
            let now = self.now_ns();
            if self.poll(now) == 0 {
                if let Some(d) = idle_sleep {
                    std::thread::sleep(d);
                }
            }
        }
    }

    /// Monotonic nanoseconds since the shared epoch (every worker's and the
    /// control thread's).
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
            self.adopt_snapshot();
        }
        self.counters.polls.inc();
        self.syn_guard.tick(now);
        let mut received = 0;
        for port in 0..self.io.num_ports() {
            received += self.poll_port(port, now);
        }
        self.counters
            .syn_guard_engaged
            .set(u64::from(self.syn_guard.engaged()));
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
        self.sweep(now, received == 0);
        received
    }

    /// What the worker derives from a new snapshot: the round-robin state
    /// of each service that uses it, by service id, and the ways out to
    /// each backend.
    fn adopt_snapshot(&mut self) {
        let dp = &self.dp;
        let mut wrr: Vec<Option<SmoothWrr>> = (0..MAX_SERVICES).map(|_| None).collect();
        for s in dp.services.iter() {
            if s.scheduler == SchedulerKind::RoundRobin {
                let weights: Vec<u32> = s
                    .backends
                    .iter()
                    .map(|&id| dp.backend(id).map_or(0, |b| b.sched_weight()))
                    .collect();
                wrr[s.id as usize] = Some(SmoothWrr::new(&weights));
            }
        }
        self.wrr = wrr;
        self.exits = self
            .setup
            .ports
            .iter()
            .map(|plan| {
                let port_mac = self.io.port_mac(plan.forward_to);
                dp.backends
                    .iter()
                    .map(|b| {
                        let Some(b) = b else {
                            return Exit::NONE;
                        };
                        let ipip = match dp.service(b.service).map(|s| s.mode) {
                            Some(ForwardMode::IpIp { source }) => Some(source),
                            Some(ForwardMode::L2) => None,
                            None => return Exit::NONE,
                        };
                        Exit {
                            backend: b.id,
                            service: b.service,
                            egress: Egress::new(
                                ipip,
                                b.addr_bits,
                                b.mac,
                                plan.gateway_mac,
                                port_mac,
                            ),
                        }
                    })
                    .collect()
            })
            .collect();
    }

    /// Receives and forwards what waits on `port`: a burst, or while
    /// bursts come full, up to [`PIPELINED_BURSTS`] of them, each received
    /// while the one before waits for its last lines (see [`Burst`]).
    #[inline(always)]
    fn poll_port(&mut self, port: usize, now: u64) -> usize {
        // Borrow the snapshot for the bursts without touching its reference
        // count (a line every worker would write, with a locked instruction
        // that would wait for the burst's pending stores): move a
        // worker-private placeholder into its place and back after.
        let placeholder = self
            .idle_dp
            .take()
            .unwrap_or_else(|| Arc::new(Dataplane::default()));
        let dp = std::mem::replace(&mut self.dp, placeholder);
        let mut stores = self
            .bursts
            .take()
            .unwrap_or_else(|| Box::new(BurstStores::new()));
        let [s0, s1] = &mut stores.0;
        let (mut a, mut b) = (Burst::new(s0), Burst::new(s1));
        let plan = self.setup.ports[port];
        let exits = std::mem::take(&mut self.exits[port]);
        let mut received = 0;
        let mut bursts = 0;
        loop {
            // `a` holds the burst received last, parsed and prepared (none
            // at first); receive the next first while bursts come full.
            let n = a.n;
            let receive_next = bursts == 0 || (n == MAX_BURST && bursts < PIPELINED_BURSTS);
            let hinted = if receive_next {
                received += self.receive(port, &dp, &mut b, &mut a);
                bursts += 1;
                n
            } else {
                let hinted = n.min(AFFINITY_SLOT_DISTANCE);
                self.hint_ahead(&mut a, hinted);
                hinted
            };
            if n > 0 {
                self.route_burst(&dp, &mut a, now, port, plan, &exits, hinted);
            }
            if !receive_next || b.n == 0 {
                break;
            }
            std::mem::swap(&mut a, &mut b);
        }
        self.bursts = Some(stores);
        self.exits[port] = exits;
        self.idle_dp = Some(std::mem::replace(&mut self.dp, dp));
        if received > 0 {
            // The occupancy gauge, once per poll rather than per new flow
            // (and so also after resets and removals).
            self.counters.flows_active.set(self.flows.len() as u64);
        }
        for out in 0..self.tx.len() {
            if !self.tx[out].is_empty() {
                self.flush(out);
            }
        }
        received
    }

    /// Receives a burst on `port` into `burst` and takes it through passes
    /// 1 and 2 and the affinity lookups' `prepare`. Returns its size. The
    /// burst `ahead` (received before, to be routed next) has all its later
    /// stages hinted as soon as the device has handed over the new burst,
    /// so that its affinity bucket headers, hinted by its `prepare`, had
    /// the device's receive to arrive, and its slot lines have this burst's
    /// passes.
    #[inline(always)]
    fn receive<'d>(
        &mut self,
        port: usize,
        dp: &'d Dataplane,
        burst: &mut Burst<'_, 'd, IO::Buf>,
        ahead: &mut Burst<'_, 'd, IO::Buf>,
    ) -> usize {
        let rx = &mut burst.store.bufs;
        rx.clear();
        self.io.rx_burst(port, rx);
        self.hint_ahead(ahead, ahead.n);
        // At most MAX_BURST (the trait's promise), which also tells the
        // compiler that every index below is inside the burst's arrays.
        debug_assert!(rx.len() <= MAX_BURST);
        let n = rx.len().min(MAX_BURST);
        burst.n = n;
        if n == 0 {
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
        // Pass 2: parse, hash, prefetch flow buckets and, for SYNs, start
        // the affinity lookups; then prepare the SYNs' probes.
        let BurstStore {
            bufs: rx,
            parsed,
            hashes,
            queries,
        } = &mut *burst.store;
        let flow = &mut burst.flow;
        let services = &mut burst.services;
        let queried = &mut burst.queried;
        let mut to_prepare = [false; MAX_BURST];
        let mut any_to_prepare = false;
        // A burst mostly goes to one service, so the last answer is kept.
        let mut last: Option<(u128, u16, u8, Family, Option<&Service>)> = None;
        let mut bytes = 0u64;
        for (i, (b, p)) in rx.iter().zip(parsed.iter_mut()).enumerate() {
            bytes += b.len() as u64;
            flow[i] = NOT_FLOW;
            services[i] = None;
            queried[i] = false;
            if classify::parse_into(b.data(), p).is_ok() {
                flow[i] = TRACKED;
                let h = crate::types::flow_hash(&p.key);
                hashes[i] = h;
                let k = &p.key;
                let syn = p.is_syn();
                let svc = match last {
                    Some((dst, port, proto, family, svc))
                        if dst == k.dst
                            && port == k.dport
                            && proto == k.proto
                            && family == k.family =>
                    {
                        svc
                    }
                    _ => {
                        let svc = dp.service_for(k);
                        last = Some((k.dst, k.dport, k.proto, k.family, svc));
                        svc
                    }
                };
                services[i] = svc;
                if let Some(svc) = svc.filter(|_| syn) {
                    let q = &mut queries[i];
                    to_prepare[i] = self
                        .shared
                        .affinity
                        .start(q, svc.id, k.family, k.src, k.sport);
                    any_to_prepare |= to_prepare[i];
                    queried[i] = true;
                    if self.syn_guard.count_syn() && svc.stateless_syns() {
                        flow[i] = UNTRACKED;
                    }
                }
                // The bucket is hinted once the SYN flood guard has
                // answered: an untracked SYN's line would be fetched and
                // never read.
                if flow[i] == TRACKED {
                    self.flows.prefetch(k, h);
                }
            }
        }
        c.rx_bytes.add(bytes);
        // The SYNs' probes, once the host-filter words their starts hinted
        // have arrived: hashed, their bucket headers prefetched.
        if any_to_prepare {
            for i in 0..n {
                if to_prepare[i] {
                    self.shared.affinity.prepare(&mut queries[i]);
                }
            }
        }
        n
    }

    /// The next stages for the first `count` packets of a burst: their
    /// flow buckets' first lines have arrived, and for SYNs the affinity
    /// bucket headers `prepare` hinted are on their way; hint the flow's
    /// alternate bucket where it will be read or written, and the affinity
    /// slots whose tags match.
    #[inline(always)]
    fn hint_ahead(&self, burst: &mut Burst<'_, '_, IO::Buf>, count: usize) {
        for i in 0..count.min(MAX_BURST) {
            self.hint_next_stages(burst, i);
        }
    }

    /// [`Worker::hint_ahead`] for packet `i` of a burst.
    #[inline(always)]
    fn hint_next_stages(&self, burst: &mut Burst<'_, '_, IO::Buf>, i: usize) {
        if burst.flow[i] == TRACKED {
            let p = &burst.store.parsed[i];
            self.flows
                .prefetch_alternate(&p.key, burst.store.hashes[i], burst.queried[i]);
        }
        if burst.queried[i] {
            self.shared
                .affinity
                .prefetch_slots(&mut burst.store.queries[i]);
        }
    }

    /// Pass 3 of a burst: route, rewrite, queue. The first `hinted`
    /// packets' next stages were hinted; pass 3 hints the others'
    /// [`AFFINITY_SLOT_DISTANCE`] packets ahead.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn route_burst(
        &mut self,
        dp: &Dataplane,
        burst: &mut Burst<'_, '_, IO::Buf>,
        now: u64,
        port: usize,
        plan: PortPlan,
        exits: &[Exit],
        hinted: usize,
    ) {
        let n = std::mem::take(&mut burst.n).min(MAX_BURST);
        let mut bufs = std::mem::take(&mut burst.store.bufs);
        let mut drain = bufs.drain(..);
        for i in 0..n {
            let Some(mut buf) = drain.next() else { break };
            let ahead = i + AFFINITY_SLOT_DISTANCE;
            if ahead >= hinted && ahead < n {
                self.hint_next_stages(burst, ahead);
            }
            let flow = burst.flow[i];
            let parsed = &burst.store.parsed[i];
            let hash = burst.store.hashes[i];
            let service = burst.services[i];
            let query = burst.queried[i].then_some(&burst.store.queries[i]);
            let verdict = if flow != NOT_FLOW {
                self.route_and_rewrite(
                    dp,
                    service,
                    query,
                    flow == UNTRACKED,
                    &mut buf,
                    parsed,
                    hash,
                    now,
                    exits,
                    plan.mtu,
                )
                .map(|()| plan.forward_to)
            } else {
                // Classified again by the path off the main line below.
                Err(DropReason::Malformed)
            };
            let out = match verdict {
                Ok(out) => out,
                Err(reason) => {
                    let off = OffLine {
                        parsed: (flow != NOT_FLOW).then_some(parsed),
                        service,
                        hash,
                        reason,
                        exits,
                    };
                    match self.not_forwarded(dp, &mut buf, off, now, port, plan) {
                        Some(out) => out,
                        None => continue,
                    }
                }
            };
            let q = &mut self.tx[out];
            q.push(buf);
            // At least: fragments of a packet join the queue with it.
            if q.len() >= MAX_BURST {
                self.flush(out);
            }
        }
        drop(drain);
        burst.store.bufs = bufs;
    }

    fn flush(&mut self, port: usize) {
        let q = &mut self.tx[port];
        let before = q.len();
        let bytes: u64 = q.iter().map(|b| b.len() as u64).sum();
        self.io.tx_burst(port, q);
        let unsent = q.len();
        let unsent_bytes: u64 = q.iter().map(|b| b.len() as u64).sum();
        self.counters.tx_packets.add((before - unsent) as u64);
        self.counters.tx_bytes.add(bytes - unsent_bytes);
        if unsent > 0 {
            self.counters.drops[DropReason::TxFull as usize].add(unsent as u64);
            q.clear();
        }
    }

    /// Picks the backend for a packet and rewrites the frame for it (its
    /// way out to that backend in `exits`). A packet too long for the
    /// port's `mtu` once forwarded is refused with `TooBig` (the rewrite's
    /// length check is the main line's only cost of path MTU), for
    /// [`Worker::not_forwarded`]. Always inlined: it is the main line.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn route_and_rewrite(
        &mut self,
        dp: &Dataplane,
        service: Option<&Service>,
        query: Option<&AffinityQuery>,
        untracked: bool,
        buf: &mut IO::Buf,
        p: &ParsedPacket,
        hash: u64,
        now: u64,
        exits: &[Exit],
        mtu: usize,
    ) -> Result<(), DropReason> {
        let svc = service.ok_or(DropReason::NoService)?;
        let exit = if untracked {
            self.route_untracked(dp, svc, query, p, hash, now, exits)?
        } else {
            self.route(dp, svc, query, p, hash, now, exits)?
        };
        let len = buf.len() as u64;
        exit.egress.forward(buf, p, mtu, self.next_ident())?;
        let sc = self.counters.service(svc.id);
        sc.packets.inc();
        let bc = self.counters.backend(exit.backend);
        bc.packets.inc();
        bc.bytes.add(len);
        Ok(())
    }

    /// The identification of the next outer IPv4 header (one per packet
    /// forwarded: an add, cheaper than asking whether it is needed).
    #[inline(always)]
    fn next_ident(&mut self) -> u16 {
        let id = self.ip_ident;
        self.ip_ident = id.wrapping_add(1);
        id
    }

    /// A TCP or UDP packet of a service too long for the port's MTU once
    /// forwarded (its flow already routed by the main line): answered on
    /// `rx_port` when it must not be fragmented (DF set, or IPv6), else
    /// forwarded in fragments to its connection's backend.
    #[allow(clippy::too_many_arguments)]
    fn too_big(
        &mut self,
        dp: &Dataplane,
        buf: &mut IO::Buf,
        p: &ParsedPacket,
        svc: &Service,
        hash: u64,
        now: u64,
        rx_port: usize,
        plan: PortPlan,
        exits: &[Exit],
    ) -> Result<usize, DropReason> {
        if must_not_fragment(buf, p) {
            return self.answer_too_big(buf, p, svc, now, rx_port, plan);
        }
        let backend = self.connection_backend(dp, svc, &p.key, hash, now)?;
        let exit = exit_of(exits, backend, svc.id).ok_or(DropReason::NoBackend)?;
        let len = buf.len() as u64;
        rewrite(exit, buf, p, self.next_ident())?;
        self.fragment(buf, p, plan)?;
        let sc = self.counters.service(svc.id);
        sc.packets.inc();
        let bc = self.counters.backend(exit.backend);
        bc.packets.inc();
        bc.bytes.add(len);
        Ok(plan.forward_to)
    }

    /// Answers a packet too long for the port's MTU once forwarded, that
    /// may not be fragmented, with ICMP "fragmentation needed" / "packet
    /// too big" carrying the MTU less the encapsulation; the packet itself
    /// goes no further. Within the per-source limit, to the address of one
    /// host whose IPv4 header checksum holds; else dropped unanswered.
    #[cold]
    #[inline(never)]
    fn answer_too_big(
        &mut self,
        buf: &mut IO::Buf,
        p: &ParsedPacket,
        svc: &Service,
        now: u64,
        rx_port: usize,
        plan: PortPlan,
    ) -> Result<usize, DropReason> {
        if !icmp::one_host(p.key.family, p.key.src)
            || (p.key.family == Family::V4 && !ipv4_header_sound(buf, p))
            || !self.too_big_limit.allow(p.key.family, p.key.src, now)
        {
            return Err(DropReason::TooBig);
        }
        let mtu = plan.mtu.saturating_sub(svc.mode.overhead(p.key.family));
        let rx_mac = self.io.port_mac(rx_port);
        icmp::too_big_reply(buf, p, mtu as u32, rx_mac)?;
        self.counters.icmp_too_big_sent.inc();
        Ok(rx_port)
    }

    /// Cuts the forwarded IPv4 packet in `buf` (the outer one of `ipip`,
    /// the packet itself in `l2` mode) into fragments for the port's MTU;
    /// all but the first join the transmit queue of `plan.forward_to` at
    /// once, the first (left in `buf`) after them.
    #[cold]
    #[inline(never)]
    fn fragment(
        &mut self,
        buf: &mut IO::Buf,
        p: &ParsedPacket,
        plan: PortPlan,
    ) -> Result<(), DropReason> {
        let before = self.tx[plan.forward_to].len();
        let io = &mut self.io;
        forward::fragment_ipv4(
            buf,
            usize::from(p.l3_offset),
            plan.mtu,
            |len| io.alloc(plan.forward_to, len),
            &mut self.tx[plan.forward_to],
        )?;
        let extra = (self.tx[plan.forward_to].len() - before) as u64;
        self.counters.fragmented.inc();
        self.counters.fragments.add(extra + 1);
        Ok(())
    }

    /// A packet the main line did not forward: an ICMP message goes to
    /// [`Worker::icmp`], a packet too long for the port to
    /// [`Worker::too_big`]; what is not for a service goes to the port's
    /// `unmatched_to`, if any; the rest is dropped, counted by its reason.
    /// Returns the port the packet leaves on, if it leaves. Out of line:
    /// the main line keeps no call of its own for all this.
    #[cold]
    #[inline(never)]
    fn not_forwarded(
        &mut self,
        dp: &Dataplane,
        buf: &mut IO::Buf,
        off: OffLine<'_>,
        now: u64,
        rx_port: usize,
        plan: PortPlan,
    ) -> Option<usize> {
        let verdict = match (off.parsed, off.reason, off.service) {
            (None, _, _) => match classify::parse(buf.data()) {
                Err(NotFlow::Icmp(at)) => self.icmp(dp, buf, &at, now, rx_port, plan, off.exits),
                Err(NotFlow::Drop(reason)) => Err(reason),
                // The main line said otherwise: cannot happen.
                Ok(_) => Err(DropReason::Malformed),
            },
            (Some(p), DropReason::TooBig, Some(svc)) => {
                self.too_big(dp, buf, p, svc, off.hash, now, rx_port, plan, off.exits)
            }
            _ => Err(off.reason),
        };
        match verdict {
            Ok(out) => Some(out),
            Err(reason) => match plan.unmatched_to {
                Some(out) if reason.is_unmatched() => {
                    self.counters.passed.inc();
                    Some(out)
                }
                _ => {
                    self.counters.count_drop(reason);
                    None
                }
            },
        }
    }

    /// An ICMP message: addressed to a VIP, an error goes to its
    /// connection's backend and an echo request may be answered; to any
    /// other address it is not pktdist's (`unsupported_l4`, as any
    /// protocol it does not route). Returns the port it leaves on.
    #[cold]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn icmp(
        &mut self,
        dp: &Dataplane,
        buf: &mut IO::Buf,
        at: &IcmpAt,
        now: u64,
        rx_port: usize,
        plan: PortPlan,
        exits: &[Exit],
    ) -> Result<usize, DropReason> {
        let Some((_, dst)) = at.addresses(buf.data()) else {
            return Err(DropReason::Malformed);
        };
        if !dp.is_vip(at.family, dst) {
            return Err(DropReason::UnsupportedL4);
        }
        let done = match icmp::inspect(buf.data(), at) {
            Ok(Message::Error { key }) => {
                self.forward_icmp_error(dp, buf, at, key, now, plan, exits)
            }
            Ok(Message::EchoRequest) => self.answer_echo(buf, at, dst, now, rx_port),
            Err(r) => Err(IcmpVerdict::Icmp(r)),
        };
        done.map_err(|v| match v {
            IcmpVerdict::Icmp(r) => {
                self.counters.icmp_drops[r as usize].inc();
                DropReason::Icmp
            }
            IcmpVerdict::Drop(r) => r,
        })
    }

    /// Answers an echo request to a VIP that answers them, within the
    /// worker's echo rate.
    fn answer_echo(
        &mut self,
        buf: &mut IO::Buf,
        at: &IcmpAt,
        vip: u128,
        now: u64,
        rx_port: usize,
    ) -> Result<usize, IcmpVerdict> {
        if !self.setup.icmp.echo.answers(at.family, vip) {
            return Err(IcmpVerdict::Icmp(IcmpDrop::EchoOff));
        }
        let rx_mac = self.io.port_mac(rx_port);
        let limit = &mut self.echo_limit;
        icmp::echo_reply(buf, at, rx_mac, || limit.allow(now)).map_err(IcmpVerdict::Icmp)?;
        self.counters.icmp_echo_answered.inc();
        Ok(rx_port)
    }

    /// Forwards an ICMP error about the connection `key` (client to
    /// service) to the backend a packet of that connection reaches, in the
    /// service's forwarding mode, the ICMP packet whole inside.
    #[allow(clippy::too_many_arguments)]
    fn forward_icmp_error(
        &mut self,
        dp: &Dataplane,
        buf: &mut IO::Buf,
        at: &IcmpAt,
        key: FlowKey,
        now: u64,
        plan: PortPlan,
        exits: &[Exit],
    ) -> Result<usize, IcmpVerdict> {
        if !dp.is_vip(key.family, key.dst) {
            return Err(IcmpVerdict::Icmp(IcmpDrop::QuoteNotVip));
        }
        let svc = dp
            .service_for(&key)
            .ok_or(IcmpVerdict::Icmp(IcmpDrop::QuoteNoService))?;
        let hash = crate::types::flow_hash(&key);
        let backend = self.connection_backend(dp, svc, &key, hash, now)?;
        let exit = exit_of(exits, backend, svc.id).ok_or(DropReason::NoBackend)?;
        // The ICMP packet, described as its connection's: encapsulation
        // takes the family and the IPv6 flow label from the key, so the
        // error travels as the connection's packets do.
        let p = ParsedPacket {
            key,
            l3_offset: at.l3_offset,
            l4_offset: at.l4_offset,
            l3_len: at.l3_len,
            tcp_flags: 0,
        };
        let fits = fits(&p, svc, plan);
        if !fits && must_not_fragment(buf, &p) {
            // Never an ICMP answer to an ICMP message.
            return Err(IcmpVerdict::Drop(DropReason::TooBig));
        }
        let len = buf.len() as u64;
        rewrite(exit, buf, &p, self.next_ident())?;
        if !fits {
            self.fragment(buf, &p, plan)?;
        }
        self.counters.icmp_forwarded.inc();
        self.counters.service(svc.id).packets.inc();
        let bc = self.counters.backend(exit.backend);
        bc.packets.inc();
        bc.bytes.add(len);
        Ok(plan.forward_to)
    }

    /// The backend a packet of the connection `key` would reach, found as
    /// its packet would find it, reading and changing nothing: a live flow
    /// entry (whose backend still serves the service), else as
    /// [`Worker::pick_stateless`].
    fn connection_backend(
        &mut self,
        dp: &Dataplane,
        svc: &Service,
        key: &FlowKey,
        hash: u64,
        now: u64,
    ) -> Result<BackendId, DropReason> {
        if let Some(b) = self
            .flows
            .peek(key, hash, now)
            .filter(|&b| dp.backend_of(b, svc.id).is_some())
        {
            return Ok(b);
        }
        self.pick_stateless(dp, svc, key, hash, now)
    }

    /// Finds the connection's backend, creating its flow entry if needed.
    /// `query` is the packet's affinity lookup: there is one for
    /// every SYN to a service and for nothing else, so it also says
    /// whether the packet is a SYN. Always inlined: it is the main line
    /// (the compiler otherwise calls it out of line in some builds).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn route<'e>(
        &mut self,
        dp: &Dataplane,
        svc: &Service,
        query: Option<&AffinityQuery>,
        p: &ParsedPacket,
        hash: u64,
        now: u64,
        exits: &'e [Exit],
    ) -> Result<&'e Exit, DropReason> {
        let is_tcp = p.key.proto == PROTO_TCP;
        // 0 for UDP (the parser's).
        let flags = p.tcp_flags;
        debug_assert!(is_tcp || flags == 0);
        // The burst started an affinity query for exactly its SYNs to a
        // service.
        let syn = query.is_some();
        debug_assert_eq!(syn, p.is_syn());
        if syn {
            // Every SYN, also one repeated on a flow already open (a
            // retransmission, or a load generator's repeating flows).
            self.counters.syns.inc();
        }
        // A known flow keeps its backend while that backend is configured
        // (a draining or down backend keeps its connections), but a SYN
        // on a down backend's flow is a new connection (the client reused
        // the tuple, or retries one the backend never answered), which a
        // down backend gets none of. A SYN on a reset flow (closing: a
        // FIN's comes back stale) keeps its backend, draining too: the
        // reset may have been forged with it, and a client that does reuse
        // its tuple is served there all the same.
        let mut known = false;
        match self.flows.lookup(&p.key, hash, now, flags) {
            Lookup::Hit(e) => {
                if let Some(x) = exit_of(exits, e.backend, svc.id) {
                    if !syn
                        || dp
                            .backend(e.backend)
                            .is_some_and(|b| b.reachable_for(svc.id))
                    {
                        return Ok(x);
                    }
                }
                // Its backend was removed, or is down and this is a SYN:
                // forget the flow and route anew.
                known = true;
                self.counters.rerouted.inc();
                if let Some(old) = self.flows.remove(&p.key, hash) {
                    self.counters.flows_closed.inc();
                    self.release(dp, &old, now);
                }
            }
            Lookup::Stale(old) => {
                // Idle past its timeout, or a new SYN on the tuple of a flow
                // a FIN closed: the old flow is over and this packet starts
                // anew.
                if old.expired {
                    self.counters.flows_expired.inc();
                } else {
                    self.counters.flows_closed.inc();
                }
                self.counters.backend(old.backend).active.sub(1);
                if old.auto_slot != NO_AUTO_SLOT {
                    release_pin(&self.shared.auto_affinity, dp, &p.key, old.auto_slot, now);
                }
            }
            Lookup::Miss => {}
        }

        if is_tcp && !syn {
            if !known {
                self.counters.unknown_flows.inc();
            }
            if flags & tcp_flags::RST != 0 {
                // A reset for a flow we do not know: route it statelessly
                // and remember nothing.
                let b = self.pick_stateless(dp, svc, &p.key, hash, now)?;
                return exit_of(exits, b, svc.id).ok_or(DropReason::NoBackend);
            }
        }

        let now_ms = now / 1_000_000;
        let (backend, auto_slot) =
            self.pick_new(dp, svc, query, p, hash, now_ms, syn || !is_tcp)?;
        // A flow learned from a packet of its middle is half-open until
        // its next packet: a flood of spoofed ACKs holds entries (and
        // automatic-affinity pins) for the `syn_timeout`, as a SYN flood's.
        let state = if !is_tcp {
            TcpState::Udp
        } else if flags & tcp_flags::FIN != 0 && !syn {
            TcpState::Closing
        } else {
            TcpState::SynSeen
        };
        let auto_slot = auto_slot.map_or(NO_AUTO_SLOT, |s| s.0);
        let bc = self.counters.backend(backend);
        bc.active.inc();
        // The lookup above missed, or removed the flow it found.
        match self
            .flows
            .insert_absent(&p.key, backend, state, auto_slot, hash, now)
        {
            Ok(None) => {}
            Ok(Some(old)) => {
                if old.expired {
                    self.counters.flows_expired.inc();
                } else {
                    self.counters.flows_evicted.inc();
                }
                self.counters.backend(old.backend).active.sub(1);
                if old.auto_slot != NO_AUTO_SLOT {
                    let key = self.flows.destination(&old);
                    release_pin(&self.shared.auto_affinity, dp, &key, old.auto_slot, now);
                }
            }
            Err(Untracked) => {
                // Routed, but not remembered: its later packets are routed
                // as an unknown flow's (affinity, then the consistent hash).
                self.counters.flows_untracked.inc();
                bc.active.sub(1);
                if auto_slot != NO_AUTO_SLOT {
                    release_pin(&self.shared.auto_affinity, dp, &p.key, auto_slot, now);
                }
            }
        }
        if syn || !is_tcp {
            // A new connection, not one re-learned mid-stream.
            self.counters.service(svc.id).new_connections.inc();
            bc.connections.inc();
        }
        // The schedulers pick only the service's configured backends.
        exit_of(exits, backend, svc.id).ok_or(DropReason::NoBackend)
    }

    /// [`Worker::route`] for a SYN the SYN flood guard leaves untracked:
    /// routed as its connection's next packet will be, as an unknown
    /// flow's (module `syn_guard`), reading and writing nothing in the
    /// flow table. Out of line: the main line stays the tracked SYN's and
    /// the established packet's.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn route_untracked<'e>(
        &mut self,
        dp: &Dataplane,
        svc: &Service,
        query: Option<&AffinityQuery>,
        p: &ParsedPacket,
        hash: u64,
        now: u64,
        exits: &'e [Exit],
    ) -> Result<&'e Exit, DropReason> {
        self.counters.syns.inc();
        // No automatic affinity (`Service::stateless_syns`): no pin taken.
        let (backend, _) = self.pick_new(dp, svc, query, p, hash, now / 1_000_000, true)?;
        self.counters.syns_untracked.inc();
        // Nothing tells a repeated SYN from a new connection's here.
        self.counters.service(svc.id).new_connections.inc();
        self.counters.backend(backend).connections.inc();
        exit_of(exits, backend, svc.id).ok_or(DropReason::NoBackend)
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
        // From here on `hash` is the scheduler's: the flow's, or the
        // client's for a service that hashes clients.
        let hash = svc.hash.of(&p.key, hash);
        let sc = self.counters.service(svc.id);
        let affinity = &self.shared.affinity;
        let found = match query {
            Some(q) => affinity.lookup_prepared(q),
            None => affinity.lookup_match(svc.id, p.key.family, p.key.src, p.key.sport),
        };
        if let Some(found) = found.filter(|&m| honoured(dp, svc, m)) {
            if new_connection {
                sc.affinity_hits.inc();
            }
            return Ok((found.owner, None));
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
                // draining, down or removed one loses its pins.
                |id| dp.backend(id).is_some_and(|b| b.takes_new_for(svc.id)),
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
                if !scheduled && new_connection {
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
        backend.map(|b| (b, None)).ok_or_else(|| no_backend(svc))
    }

    /// The backend a packet of a connection the flow table does not know
    /// reaches when it creates no state (a stray reset, an ICMP error
    /// about the connection): an affinity [`honoured`] for it, then the
    /// client's automatic-affinity pin (to a backend that takes
    /// connections), then the consistent hash, as the connection's next
    /// packet would find them ([`Worker::pick_new`]). Kept out of line:
    /// the packets that come here are rare, and the main line holds no code
    /// for them.
    #[cold]
    #[inline(never)]
    fn pick_stateless(
        &self,
        dp: &Dataplane,
        svc: &Service,
        key: &FlowKey,
        hash: u64,
        now: u64,
    ) -> Result<BackendId, DropReason> {
        let found = self
            .shared
            .affinity
            .lookup_match(svc.id, key.family, key.src, key.sport);
        if let Some(found) = found.filter(|&m| honoured(dp, svc, m)) {
            return Ok(found.owner);
        }
        if svc.auto_affinity.is_some() {
            let pin = self
                .shared
                .auto_affinity
                .peek(svc.id, key.family, key.src, now / 1_000_000);
            if let Some((b, _)) = pin {
                if dp.backend(b).is_some_and(|x| x.takes_new_for(svc.id)) {
                    return Ok(b);
                }
            }
        }
        maglev_pick(dp, svc, svc.hash.of(key, hash)).ok_or_else(|| no_backend(svc))
    }

    /// A flow left the table (closed, expired or evicted): its
    /// backend has one connection less and its auto-affinity pin one user less.
    #[inline]
    fn release(&self, dp: &Dataplane, e: &FlowEntry, now: u64) {
        release_flow(&self.counters, &self.shared.auto_affinity, dp, e, now);
    }

    /// Sweeps the buckets due by `now`, at most [`SWEEP_MAX_BUCKETS`] (or
    /// [`SWEEP_MAX_BUCKETS_IDLE`] when the poll was `idle`); what a stall
    /// left beyond that waits for the next period.
    fn sweep(&mut self, now: u64, idle: bool) {
        let buckets = self.flows.buckets() as u64;
        let ns_per_bucket = (SWEEP_PERIOD_NS / buckets.max(1)).max(1);
        let due = now.saturating_sub(self.swept_until) / ns_per_bucket;
        if due == 0 {
            return;
        }
        let most = if idle {
            SWEEP_MAX_BUCKETS_IDLE
        } else {
            SWEEP_MAX_BUCKETS
        };
        let n = due.min(most);
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

/// Where a burst's packets and what passes 1 and 2 learn of them are kept
/// between polls (a worker has two: see [`Burst`]).
struct BurstStore<B> {
    /// The packets' buffers, as received.
    bufs: Vec<B>,
    /// The packets, parsed.
    parsed: Box<[ParsedPacket; MAX_BURST]>,
    /// Their flow hashes.
    hashes: Box<[u64; MAX_BURST]>,
    /// The affinity lookups of the SYNs among them (started, and prepared
    /// where the service has keys).
    queries: Box<[AffinityQuery; MAX_BURST]>,
}

/// A worker's two [`BurstStore`]s.
struct BurstStores<B>([BurstStore<B>; 2]);

impl<B> BurstStores<B> {
    fn new() -> Self {
        BurstStores(core::array::from_fn(|_| BurstStore {
            bufs: Vec::with_capacity(MAX_BURST),
            parsed: Box::new(NO_PACKETS),
            hashes: Box::new([0; MAX_BURST]),
            queries: Box::new(NO_QUERIES),
        }))
    }
}

/// A burst between its passes. While bursts come full, a poll holds two:
/// one received and parsed, its lookups prepared, while it receives the
/// next; the receive (on a device that copies frames, its slowest part)
/// hides the latency of the lines the first one's passes hinted, and the
/// next one's passes that of the lines its routing reads, hinted between
/// the two.
struct Burst<'s, 'd, B> {
    store: &'s mut BurstStore<B>,
    /// Packets received (0 once routed).
    n: usize,
    /// Whether each packet is a flow's ([`NOT_FLOW`]: the path off the
    /// main line classifies it again), and if so whether the flow table is
    /// its ([`TRACKED`]) or it is a SYN the SYN flood guard leaves out
    /// ([`UNTRACKED`]: it touches no flow bucket, not even a hint's).
    flow: [u8; MAX_BURST],
    /// Each packet's service, looked up once in pass 2.
    services: [Option<&'d Service>; MAX_BURST],
    /// Which packets are SYNs with an affinity query.
    queried: [bool; MAX_BURST],
}

impl<'s, 'd, B> Burst<'s, 'd, B> {
    fn new(store: &'s mut BurstStore<B>) -> Self {
        Burst {
            store,
            n: 0,
            flow: [NOT_FLOW; MAX_BURST],
            services: [None; MAX_BURST],
            queried: [false; MAX_BURST],
        }
    }
}

/// What the main line knew of a packet it did not forward.
struct OffLine<'a> {
    /// The packet, when it is a flow's (else it is classified again).
    parsed: Option<&'a ParsedPacket>,
    service: Option<&'a Service>,
    hash: u64,
    /// Why the main line did not forward it.
    reason: DropReason,
    /// The backends as packets received on its port reach them.
    exits: &'a [Exit],
}

/// Why the ICMP path did not forward or answer a message: an ICMP reason
/// (counted as such, and as one [`DropReason::Icmp`]) or a general one.
enum IcmpVerdict {
    Icmp(IcmpDrop),
    Drop(DropReason),
}

impl From<DropReason> for IcmpVerdict {
    fn from(r: DropReason) -> IcmpVerdict {
        IcmpVerdict::Drop(r)
    }
}

/// A backend as the main line reaches it, for packets received on one
/// port: its id, the service it serves, its way out. Rebuilt with each
/// snapshot, at the backend's id; where no backend is, [`Exit::NONE`].
#[derive(Clone, Copy, Debug)]
struct Exit {
    backend: BackendId,
    service: ServiceId,
    egress: Egress,
}

impl Exit {
    /// No backend: of no service (no service has this id), no way out.
    const NONE: Exit = Exit {
        backend: BackendId::MAX,
        service: ServiceId::MAX,
        egress: Egress::NO_ROUTE,
    };
}

const _: () = assert!(MAX_SERVICES <= ServiceId::MAX as usize);

/// Backend `id`'s exit while it is one of `service`'s (an id may since have
/// gone to another service's backend, or to none).
#[inline(always)]
fn exit_of(exits: &[Exit], id: BackendId, service: ServiceId) -> Option<&Exit> {
    exits.get(id as usize).filter(|x| x.service == service)
}

/// Rewrites the frame for its backend's `exit`, whatever its length (up to
/// IPv4's limit): for the paths off the main line, which check the MTU
/// themselves.
fn rewrite<B: PacketBuf>(
    exit: &Exit,
    buf: &mut B,
    p: &ParsedPacket,
    ident: u16,
) -> Result<(), DropReason> {
    exit.egress
        .forward(buf, p, u16::MAX.into(), ident)
        // Longer than IPv4's length field allows.
        .map_err(|e| match e {
            DropReason::TooBig => DropReason::NoRoom,
            e => e,
        })
}

/// True when the packet fits the port's MTU once forwarded. Every packet
/// shorter than the MTU by the largest encapsulation fits whatever the
/// service's mode: one comparison, and the exact one only for the rest.
#[inline(always)]
fn fits(p: &ParsedPacket, svc: &Service, plan: PortPlan) -> bool {
    let len = usize::from(p.l3_len);
    len + crate::wire::ipv6::HEADER_LEN <= plan.mtu
        || len + svc.mode.overhead(p.key.family) <= plan.mtu
}

/// True when a too-long packet must not be fragmented on the way: IPv6
/// (only its source fragments) or IPv4 with DF set.
#[inline]
fn must_not_fragment<B: PacketBuf>(buf: &B, p: &ParsedPacket) -> bool {
    p.key.family == Family::V6
        || buf
            .data()
            .get(usize::from(p.l3_offset) + 6)
            .is_none_or(|&flags| flags & 0x40 != 0)
}

/// True when the IPv4 header of `p` checks (its checksum holds): an answer
/// goes to its source, which a corrupted header may have changed.
fn ipv4_header_sound<B: PacketBuf>(buf: &B, p: &ParsedPacket) -> bool {
    buf.data()
        .get(usize::from(p.l3_offset)..usize::from(p.l4_offset))
        .is_some_and(|h| crate::wire::ipv4::Packet::new_unchecked(h).verify_checksum())
}

/// Accounts for a flow that left a worker's table: its backend has one
/// active connection less, and its auto-affinity pin one user less (the pin
/// lingers as the service says once its last connection is gone).
/// Inlined as far as the pin: a flow without one (every flow of a service
/// without automatic affinity) costs a counter.
#[inline]
fn release_flow(
    counters: &WorkerCounters,
    auto: &AutoAffinityTable,
    dp: &Dataplane,
    e: &FlowEntry,
    now: u64,
) {
    counters.backend(e.backend).active.sub(1);
    if e.auto_slot != NO_AUTO_SLOT {
        release_pin(auto, dp, &e.key, e.auto_slot, now);
    }
}

/// The auto-affinity part of [`release_flow`]: the pin `slot` of a flow
/// to `key`'s destination has one user less.
#[inline(never)]
fn release_pin(auto: &AutoAffinityTable, dp: &Dataplane, key: &FlowKey, slot: u32, now: u64) {
    // The service by the flow's destination: the flow table keeps no
    // service ids (a removed service's id may be given to another).
    let linger_ms = dp
        .service_for(key)
        .and_then(|s| s.auto_affinity)
        .map_or(0, |a| a.linger.as_millis() as u64);
    auto.release(AutoSlot(slot), now / 1_000_000, linger_ms);
}

/// The service's scheduler: Maglev on the service's hash (of the flow or
/// of the client, `[[services]] hash`), or round robin.
#[inline(always)]
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

/// Why a service found no backend: all of them down, or none that takes
/// the packet (no backends, all draining).
#[cold]
fn no_backend(svc: &Service) -> DropReason {
    if svc.all_down {
        DropReason::AllBackendsDown
    } else {
        DropReason::NoBackend
    }
}

/// Whether an affinity to `m.owner` routes the client's connections: a
/// down owner's affinities are skipped (its clients go to the scheduler);
/// a draining owner keeps its requested affinities, which end, but not its
/// static ones, which never would: its drain must finish.
#[inline]
fn honoured(dp: &Dataplane, svc: &Service, m: AffinityMatch) -> bool {
    dp.backend(m.owner)
        .is_some_and(|b| b.takes_new_for(svc.id) || b.reachable_for(svc.id) && !m.is_static)
}

/// The consistent-hash choice, which every instance agrees on. `hash` is
/// the scheduler's ([`HashKind::of`](crate::datapath::snapshot::HashKind::of)),
/// not necessarily the flow table's.
#[inline]
fn maglev_pick(dp: &Dataplane, svc: &Service, hash: u64) -> Option<BackendId> {
    let idx = svc.maglev.lookup(hash)?;
    let id = *svc.backends.get(idx)?;
    dp.backend(id).map(|_| id)
}

#[cfg(test)]
mod fixture;

#[cfg(test)]
mod tests {
    use super::fixture::{backend, service, Bed, Settings, IPIP, SEC, VIP};
    use super::*;
    use crate::affinity::key::TableKey;
    use crate::datapath::snapshot::{AutoAffinity, Backend};
    use crate::sched::maglev::MaglevTable;
    use crate::types::PortMatch;
    use crate::types::ServiceId;
    use crate::types::{BackendState, Family, PROTO_UDP};
    use crate::wire::build::FrameSpec;
    use crate::wire::{ethernet, ipv4};
    use std::collections::BTreeSet;
    use std::time::Duration;

    fn bed(services: Vec<Service>, backends: Vec<Backend>, flow_capacity: usize) -> Bed {
        guarded_bed(services, backends, flow_capacity, 0)
    }

    /// A bed whose worker's SYN flood guard engages above `syn_flood_rate`
    /// (0: never, as in [`bed`]: tests that send thousands of SYNs at one
    /// instant are floods by any rate).
    fn guarded_bed(
        services: Vec<Service>,
        backends: Vec<Backend>,
        flow_capacity: usize,
        syn_flood_rate: u32,
    ) -> Bed {
        let timeouts = FlowTimeouts {
            syn: Duration::from_secs(5),
            established: Duration::from_secs(60),
            fin: Duration::from_secs(5),
            udp: Duration::from_secs(30),
        };
        let settings = Settings {
            flow_capacity,
            timeouts,
            syn_flood_rate,
            ..Settings::default()
        };
        fixture::bed(services, backends, settings)
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

    /// While full bursts wait, one poll takes up to [`PIPELINED_BURSTS`] of
    /// them, each received before the one ahead of it is routed: packets
    /// leave in the order they came, a SYN's flow is in the table for its
    /// ACK two bursts later, and the lookups prepared a burst ahead find
    /// the affinities.
    #[test]
    fn a_poll_takes_full_bursts_in_turn_and_in_order() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 100), backend(2, 0, 100)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = bed(vec![svc], bes, 1 << 14);
        // Clients 198.18.0.32-63 are pinned to backend 2.
        let key = TableKey::new(0, Family::V4, 0xc612_0020, 27, PortMatch::Any).unwrap();
        b.affinity.insert(key, 2).unwrap();
        let clients = (PIPELINED_BURSTS * MAX_BURST / 2) as u8;
        let frames: Vec<(u8, u8)> = [tcp_flags::SYN, tcp_flags::ACK]
            .into_iter()
            .flat_map(|flags| (0..clients).map(move |c| (c, flags)))
            .collect();
        // Half a burst more than one poll takes.
        let extra = MAX_BURST as u8 / 2;
        let rest = (0..extra).map(|c| (c, tcp_flags::ACK));
        for (c, flags) in frames.iter().copied().chain(rest) {
            b.worker
                .io_mut()
                .push_rx(0, &tcp([198, 18, 0, c], 4000, flags));
        }
        assert_eq!(b.worker.poll(SEC), PIPELINED_BURSTS * MAX_BURST);
        let sent: Vec<(u8, [u8; 4])> = b.worker.io_mut().tx[0]
            .drain(..)
            .map(|buf| {
                let d = buf.data();
                let info = ethernet::Frame::new_checked(d).unwrap().l2_info().unwrap();
                let outer = ipv4::Packet::new_checked(&d[info.header_len..]).unwrap();
                let inner = ipv4::Packet::new_checked(&d[info.header_len + 20..]).unwrap();
                (inner.src_addr()[3], outer.dst_addr())
            })
            .collect();
        let order: Vec<u8> = sent.iter().map(|&(c, _)| c).collect();
        let expected: Vec<u8> = frames.iter().map(|&(c, _)| c).collect();
        assert_eq!(order, expected, "in the order received");
        let (syns, acks) = sent.split_at(usize::from(clients));
        assert_eq!(syns, acks, "each ACK goes where its SYN went");
        for &(c, to) in syns {
            if (32..64).contains(&c) {
                assert_eq!(backend_index(to), 2, "client {c} is pinned");
            }
        }
        assert!((0..3).all(|k| syns.iter().any(|&(_, to)| backend_index(to) == k)));
        let c = b.worker.counters();
        assert_eq!(c.services[0].new_connections.get(), u64::from(clients));
        assert_eq!(c.services[0].affinity_hits.get(), 32);
        assert_eq!(c.unknown_flows.get(), 0);
        assert_eq!(b.worker.flows().len(), usize::from(clients));
        // The rest: the next poll.
        assert_eq!(b.worker.poll(SEC), usize::from(extra));
        assert_eq!(b.worker.io_mut().tx[0].len(), usize::from(extra));
        assert_eq!(b.worker.counters().unknown_flows.get(), 0);
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

    /// After a stall, a poll that received packets sweeps a few hundred
    /// buckets and leaves the rest for the next period; one that received
    /// none (an idle worker, which may sleep between polls) sweeps more:
    /// here the whole table, whose idle flows end at once.
    #[test]
    fn an_idle_poll_catches_up_on_the_sweep() {
        let bes = vec![backend(0, 0, 100)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = bed(vec![svc.clone()], bes.clone(), 1 << 13);
        let buckets = b.worker.flows().buckets() as u64;
        assert!(SWEEP_MAX_BUCKETS < buckets && buckets <= SWEEP_MAX_BUCKETS_IDLE);
        let syns: Vec<Vec<u8>> = (0..200u8)
            .map(|i| tcp([198, 18, 14, i], 1, tcp_flags::SYN))
            .collect();
        send(&mut b, &syns, SEC);
        assert_eq!(b.worker.flows().len(), 200);
        // Long past the SYN timeout (5 s): a busy poll sweeps part.
        let mut busy = bed(vec![svc], bes, 1 << 13);
        send(&mut busy, &syns, SEC);
        send(
            &mut busy,
            &[tcp([198, 18, 15, 1], 1, tcp_flags::SYN)],
            60 * SEC,
        );
        let left = busy.worker.flows().len();
        assert!(left > 1, "a busy poll swept the whole table");
        // An idle poll sweeps it all.
        assert_eq!(b.worker.poll(60 * SEC), 0);
        assert_eq!(b.worker.flows().len(), 0);
        assert_eq!(b.worker.counters().flows_expired.get(), 200);
        assert_eq!(b.worker.counters().flows_active.get(), 0);
    }

    /// The occupancy gauge follows new flows, and resets, which end them
    /// at the `fin` timeout.
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
        assert_eq!(b.worker.counters().flows_active.get(), 20);
        // The others go on; the reset ones end at the fin timeout (5 s).
        let acks: Vec<Vec<u8>> = (5..20u8)
            .map(|i| tcp([198, 18, 13, i], 1, tcp_flags::ACK))
            .collect();
        send(&mut b, &acks, 4 * SEC);
        for t in 7..10 {
            send(&mut b, &acks, t * SEC);
        }
        assert_eq!(b.worker.counters().flows_expired.get(), 5);
        assert_eq!(b.worker.counters().flows_active.get(), 15);
        assert_eq!(b.worker.flows().len(), 15);
    }

    /// A reset forged for a live connection (its backend's TCP ignores it)
    /// does not send the connection's next packets elsewhere: its flow
    /// stays, closing, and a round-robin service's connection (whose
    /// backend no hash finds again) keeps its backend.
    #[test]
    fn a_forged_reset_leaves_the_connection_on_its_backend() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 100), backend(2, 0, 100)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::RoundRobin, IPIP);
        let mut b = bed(vec![svc], bes, 1024);
        let clients: Vec<[u8; 4]> = (0..6u8).map(|i| [198, 18, 15, i]).collect();
        // Each client's packet with `flags` at `now`: the backends reached.
        let each = |b: &mut Bed, flags: u8, now: u64| -> Vec<usize> {
            let frames: Vec<Vec<u8>> = clients.iter().map(|&c| tcp(c, 7, flags)).collect();
            send(b, &frames, now)
                .iter()
                .map(|&f| backend_index(f))
                .collect()
        };
        let first = each(&mut b, tcp_flags::SYN, SEC);
        let reset = each(&mut b, tcp_flags::RST, 2 * SEC);
        assert_eq!(reset, first, "each reset reaches its connection's backend");
        assert_eq!(each(&mut b, tcp_flags::ACK, 3 * SEC), first);
        // Past the fin timeout (5 s) and within the established one (60
        // s): the connection went on after the reset, so it is open again.
        assert_eq!(
            each(&mut b, tcp_flags::ACK, 20 * SEC),
            first,
            "a forged reset does not shorten the connection"
        );
        // A reset forged with a SYN behind it does not move it either.
        each(&mut b, tcp_flags::RST, 21 * SEC);
        assert_eq!(
            each(&mut b, tcp_flags::SYN, 21 * SEC),
            first,
            "the SYN after a reset keeps the backend"
        );
        assert_eq!(each(&mut b, tcp_flags::ACK, 22 * SEC), first);
        let c = b.worker.counters();
        assert_eq!(c.unknown_flows.get(), 0);
        assert_eq!(c.flows_closed.get(), 0);
        assert_eq!(c.flows_expired.get(), 0);
        assert_eq!(b.worker.flows().len(), clients.len());
    }

    /// A flow learned from a packet of its middle (a spoofed ACK, or a
    /// connection the table lost) holds its entry for the SYN timeout
    /// until its next packet confirms it: a flood of spoofed ACKs ends in
    /// seconds, not at the established timeout.
    #[test]
    fn a_flow_learned_mid_connection_is_half_open_until_its_next_packet() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 100)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = bed(vec![svc], bes, 1024);
        let spoofed: Vec<Vec<u8>> = (0..50u8)
            .map(|i| tcp([198, 18, 16, i], 9, tcp_flags::ACK))
            .collect();
        let live = tcp([198, 18, 17, 1], 9, tcp_flags::ACK);
        assert_eq!(send(&mut b, &spoofed, SEC).len(), 50);
        let to = send(&mut b, std::slice::from_ref(&live), SEC);
        assert_eq!(b.worker.counters().unknown_flows.get(), 51);
        // The live connection's next packet confirms its flow.
        assert_eq!(send(&mut b, std::slice::from_ref(&live), 2 * SEC), to);
        // Past the SYN timeout (5 s), within the established one (60 s):
        // the spoofed entries are gone, the live one stays.
        b.worker.sweep(10 * SEC, true);
        assert_eq!(b.worker.flows().len(), 1);
        assert_eq!(b.worker.counters().flows_expired.get(), 50);
        assert_eq!(send(&mut b, std::slice::from_ref(&live), 11 * SEC), to);
        assert_eq!(b.worker.counters().unknown_flows.get(), 51);
    }

    /// A packet of a known flow whose backend was removed is rerouted, not
    /// counted as an unknown flow's.
    #[test]
    fn a_removed_backends_flow_is_rerouted_not_unknown() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 100)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = bed(vec![svc], bes.clone(), 1024);
        let clients: Vec<[u8; 4]> = (0..40u8).map(|i| [198, 18, 18, i]).collect();
        let each =
            |flags: u8| -> Vec<Vec<u8>> { clients.iter().map(|&c| tcp(c, 7, flags)).collect() };
        let first = send(&mut b, &each(tcp_flags::SYN), SEC);
        send(&mut b, &each(tcp_flags::ACK), SEC);
        let on_0 = first.iter().filter(|&&a| backend_index(a) == 0).count();
        assert!(on_0 > 0 && on_0 < clients.len());
        let kept = vec![bes[1].clone()];
        let svc = service(0, 80, PROTO_TCP, &kept, SchedulerKind::Maglev, IPIP);
        b.cell.publish(Dataplane::new(2, vec![svc], kept));
        let after = send(&mut b, &each(tcp_flags::ACK), 2 * SEC);
        assert!(after.iter().all(|&a| backend_index(a) == 1));
        let c = b.worker.counters();
        assert_eq!(c.rerouted.get(), on_0 as u64);
        assert_eq!(c.unknown_flows.get(), 0);
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

    /// A backend's way out (next-hop MAC, outer destination, forwarding
    /// mode) is worked out with each snapshot: a packet leaves as the
    /// snapshot in force says, and a backend without a next hop drops it.
    #[test]
    fn ways_out_follow_the_snapshot() {
        let mut be = backend(0, 0, 100);
        be.mac = None;
        let snapshot = |generation, be: &Backend, mode| {
            let svc = service(
                0,
                80,
                PROTO_TCP,
                std::slice::from_ref(be),
                SchedulerKind::Maglev,
                mode,
            );
            Dataplane::new(generation, vec![svc], vec![be.clone()])
        };
        let mut b = bed(Vec::new(), Vec::new(), 1 << 10);
        b.cell.publish(snapshot(2, &be, IPIP));
        let frame = |flags| tcp([198, 18, 9, 1], 4444, flags);
        // No MAC of its own and no gateway on the port: no next hop.
        assert!(send(&mut b, &[frame(tcp_flags::SYN)], SEC).is_empty());
        let c = b.worker.counters().clone();
        assert_eq!(c.drops[DropReason::NoRoute as usize].get(), 1);

        let out = |b: &mut Bed, now| {
            b.worker.io_mut().push_rx(0, &frame(tcp_flags::ACK));
            b.worker.poll(now);
            b.worker.io_mut().tx[0].pop().map(|f| f.data().to_vec())
        };
        be.mac = Some([2, 0, 0, 0, 0xaa, 1]);
        b.cell.publish(snapshot(3, &be, IPIP));
        let f = out(&mut b, 2 * SEC).unwrap();
        let port_mac = b.worker.io_mut().port_mac(0);
        assert_eq!(
            (&f[0..6], &f[6..12]),
            (&[2, 0, 0, 0, 0xaa, 1][..], &port_mac[..])
        );
        let outer = ipv4::Packet::new_checked(&f[14..]).unwrap();
        assert_eq!(outer.dst_addr(), [10, 1, 0, 1]);
        assert!(outer.verify_checksum());

        // The same backend at another address, then another MAC in `l2`.
        be.addr_bits = 0x0a01_004d;
        b.cell.publish(snapshot(4, &be, IPIP));
        let f = out(&mut b, 3 * SEC).unwrap();
        let outer = ipv4::Packet::new_checked(&f[14..]).unwrap();
        assert_eq!(outer.dst_addr(), [10, 1, 0, 77]);
        assert!(outer.verify_checksum());
        be.mac = Some([2, 0, 0, 0, 0xbb, 2]);
        b.cell.publish(snapshot(5, &be, ForwardMode::L2));
        let f = out(&mut b, 4 * SEC).unwrap();
        assert_eq!(&f[0..6], &[2, 0, 0, 0, 0xbb, 2]);
        assert_eq!(
            &f[12..],
            &frame(tcp_flags::ACK)[12..],
            "the packet as it came"
        );
        assert_eq!(c.drops[DropReason::NoRoute as usize].get(), 1);
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

    /// `hash = "client"`: every connection of one client reaches one
    /// backend, whichever of two instances (two workers that share nothing)
    /// receives its SYN or, mid-flow, its later packets; over many clients
    /// the weights still hold.
    #[test]
    fn client_hash_keeps_a_clients_connections_on_one_backend() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 200), backend(2, 0, 300)];
        let mut svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        svc.hash = crate::datapath::snapshot::HashKind::Client;
        let mut a = bed(vec![svc.clone()], bes.clone(), 1 << 16);
        let mut b = bed(vec![svc], bes, 1 << 16);
        const CLIENTS: u32 = 3000;
        const PORTS: u16 = 8;
        let client = |i: u32| [198, 18, (i >> 8) as u8, i as u8];
        let frames = |flags: u8, ports: std::ops::Range<u16>| -> Vec<Vec<u8>> {
            (0..CLIENTS)
                .flat_map(|i| ports.clone().map(move |p| (i, p)))
                .map(|(i, p)| tcp(client(i), 20_000 + p, flags))
                .collect()
        };
        // Half of each client's connections open at A, half at B.
        let at_a = send(&mut a, &frames(tcp_flags::SYN, 0..PORTS / 2), SEC);
        let at_b = send(&mut b, &frames(tcp_flags::SYN, PORTS / 2..PORTS), SEC);
        let half = usize::from(PORTS / 2);
        let mut per = [0usize; 3];
        for i in 0..CLIENTS as usize {
            let mine: BTreeSet<[u8; 4]> = at_a[i * half..(i + 1) * half]
                .iter()
                .chain(&at_b[i * half..(i + 1) * half])
                .copied()
                .collect();
            assert_eq!(mine.len(), 1, "client {i}: {mine:?}");
            per[backend_index(*mine.first().unwrap())] += 1;
        }
        for (i, w) in [1.0, 2.0, 3.0].iter().enumerate() {
            let share = per[i] as f64 / f64::from(CLIENTS);
            assert!(
                (share - w / 6.0).abs() < 0.03,
                "backend {i}: {share} ({per:?})"
            );
        }
        // A's connections continue through B (ECMP moved them): B never saw
        // their SYNs and sends them where A did.
        let acks = send(&mut b, &frames(tcp_flags::ACK, 0..PORTS / 2), 2 * SEC);
        assert_eq!(acks, at_a);
        assert_eq!(
            b.worker.counters().unknown_flows.get(),
            u64::from(CLIENTS) * 4
        );
        // The flow table still tells the connections apart.
        assert_eq!(a.worker.flows().len(), CLIENTS as usize * half);
    }

    /// The default, `hash = "connection"`: one client's connections from
    /// several source ports spread over the backends.
    #[test]
    fn connection_hash_spreads_one_clients_connections() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 100), backend(2, 0, 100)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = bed(vec![svc], bes, 1 << 14);
        let syns: Vec<Vec<u8>> = (0..300u16)
            .map(|p| tcp([198, 18, 9, 9], 30_000 + p, tcp_flags::SYN))
            .collect();
        let used: BTreeSet<[u8; 4]> = send(&mut b, &syns, SEC).into_iter().collect();
        assert_eq!(used.len(), 3, "{used:?}");
    }

    /// A draining backend keeps its requested affinities (they end, and
    /// cannot be extended) but not its static ones, which never end: new
    /// connections of clients only a static affinity pins go to the
    /// scheduler, so that its drain finishes.
    #[test]
    fn a_draining_backend_keeps_requested_affinities_not_static_ones() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 100), backend(2, 0, 100)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = bed(vec![svc], bes.clone(), 1 << 14);
        let requested = TableKey::new(0, Family::V4, 0xc612_0500, 24, PortMatch::Any).unwrap();
        let fixed = TableKey::new(0, Family::V4, 0xc612_0700, 24, PortMatch::Any).unwrap();
        b.affinity.insert(requested, 2).unwrap();
        b.affinity.insert_static(fixed, 2).unwrap();
        let syns = |net: u8, sport: u16| -> Vec<Vec<u8>> {
            (0..64u32)
                .map(|i| tcp([198, 18, net, i as u8], sport, tcp_flags::SYN))
                .collect()
        };
        // Up: both pin to be2.
        for net in [5, 7] {
            let out = send(&mut b, &syns(net, 5000), SEC);
            assert!(out.iter().all(|a| backend_index(*a) == 2), "{net}: {out:?}");
        }
        let mut draining = bes.clone();
        draining[2].state = BackendState::Draining;
        let svc2 = service(0, 80, PROTO_TCP, &draining, SchedulerKind::Maglev, IPIP);
        b.cell.publish(Dataplane::new(2, vec![svc2], draining));
        let out = send(&mut b, &syns(5, 5001), 2 * SEC);
        assert!(
            out.iter().all(|a| backend_index(*a) == 2),
            "requested: {out:?}"
        );
        let out = send(&mut b, &syns(7, 5001), 2 * SEC);
        assert_eq!(out.len(), 64, "every new connection is routed");
        assert!(
            out.iter().all(|a| backend_index(*a) != 2),
            "static: {out:?}"
        );
        let sc = &b.worker.counters().services[0];
        assert_eq!(sc.affinity_hits.get(), 64 * 3);
    }

    /// Automatic-affinity hits count new connections: the mid-flow packets
    /// of connections the table does not know (after a restart or an
    /// eviction) follow the client's pin, and are no hits.
    #[test]
    fn auto_affinity_hits_are_new_connections_only() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 100), backend(2, 0, 100)];
        let mut svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        svc.auto_affinity = Some(AutoAffinity {
            linger: Duration::from_secs(60),
        });
        let mut b = bed(vec![svc], bes, 1 << 14);
        let client = [198, 18, 1, 1];
        let pinned = send(&mut b, &[tcp(client, 1000, tcp_flags::SYN)], SEC);
        let unknown: Vec<Vec<u8>> = (0..10u16)
            .map(|i| tcp(client, 2000 + i, tcp_flags::ACK))
            .collect();
        assert_eq!(send(&mut b, &unknown, SEC), vec![pinned[0]; 10]);
        let syns: Vec<Vec<u8>> = (0..3u16)
            .map(|i| tcp(client, 3000 + i, tcp_flags::SYN))
            .collect();
        assert_eq!(send(&mut b, &syns, SEC), vec![pinned[0]; 3]);
        let sc = &b.worker.counters().services[0];
        assert_eq!(sc.new_connections.get(), 4);
        assert_eq!(
            sc.auto_affinity_hits.get(),
            3,
            "the three SYNs after the first"
        );
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

    /// A down backend: its flows keep it, its affinities (requested or
    /// static, the table cannot tell) and automatic pins are skipped, the
    /// scheduler leaves it out; with every backend down, new connections
    /// are dropped and counted as such.
    #[test]
    fn down_backends_keep_their_flows_and_lose_new_connections() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 100), backend(2, 0, 100)];
        let mut svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        svc.auto_affinity = Some(AutoAffinity {
            linger: Duration::from_secs(60),
        });
        let mut b = bed(vec![svc], bes.clone(), 1 << 14);
        let key = TableKey::new(0, Family::V4, 0xc612_0500, 24, PortMatch::Any).unwrap();
        b.affinity.insert(key, 2).unwrap();
        // Open connections: the pinned /24 on be2, other clients spread.
        let first: Vec<Vec<u8>> = (0..64u32)
            .flat_map(|i| {
                [
                    tcp([198, 18, 5, i as u8], 5000, tcp_flags::SYN),
                    tcp([198, 18, 6, i as u8], 5000, tcp_flags::SYN),
                ]
            })
            .collect();
        let before = send(&mut b, &first, SEC);
        // be2 goes down.
        let mut down = bes.clone();
        down[2].state = BackendState::Down;
        let svc2 = service(0, 80, PROTO_TCP, &down, SchedulerKind::Maglev, IPIP);
        let mut svc2 = svc2;
        svc2.auto_affinity = Some(AutoAffinity {
            linger: Duration::from_secs(60),
        });
        b.cell.publish(Dataplane::new(2, vec![svc2], down.clone()));
        // Its flows keep it.
        let acks: Vec<Vec<u8>> = (0..64u32)
            .flat_map(|i| {
                [
                    tcp([198, 18, 5, i as u8], 5000, tcp_flags::ACK),
                    tcp([198, 18, 6, i as u8], 5000, tcp_flags::ACK),
                ]
            })
            .collect();
        assert_eq!(send(&mut b, &acks, 2 * SEC), before);
        // A SYN on the tuple of one of its flows is a new connection: it
        // goes elsewhere, and the flow with it; the others keep be2.
        let on_be2 = before.iter().position(|a| backend_index(*a) == 2).unwrap();
        let reused = tcp([198, 18, 5, on_be2 as u8 / 2], 5000, tcp_flags::SYN);
        assert_eq!(on_be2 % 2, 0, "the pinned /24's");
        let out = send(&mut b, &[reused], 2 * SEC);
        assert_eq!(out.len(), 1);
        assert_ne!(backend_index(out[0]), 2);
        assert_eq!(b.worker.counters().rerouted.get(), 1);
        let mut moved = before.clone();
        moved[on_be2] = out[0];
        assert_eq!(send(&mut b, &acks, 2 * SEC), moved);
        // New connections: the pinned clients and those auto-pinned to be2
        // go to the others, and none reaches be2.
        let again: Vec<Vec<u8>> = (0..64u32)
            .flat_map(|i| {
                [
                    tcp([198, 18, 5, i as u8], 5001, tcp_flags::SYN),
                    tcp([198, 18, 6, i as u8], 5001, tcp_flags::SYN),
                ]
            })
            .collect();
        let out = send(&mut b, &again, 2 * SEC);
        assert_eq!(out.len(), again.len(), "every new connection is routed");
        assert!(out.iter().all(|a| backend_index(*a) != 2), "{out:?}");
        let sc = &b.worker.counters().services[0];
        assert_eq!(sc.affinity_hits.get(), 64, "only before it went down");
        // Every backend down: new connections are dropped, counted.
        let mut all = bes.clone();
        for be in &mut all {
            be.state = BackendState::Down;
        }
        let svc3 = service(0, 80, PROTO_TCP, &all, SchedulerKind::Maglev, IPIP);
        assert!(svc3.all_down);
        b.cell.publish(Dataplane::new(3, vec![svc3], all));
        let fresh: Vec<Vec<u8>> = (0..8u32)
            .map(|i| tcp([198, 18, 7, i as u8], 5000, tcp_flags::SYN))
            .collect();
        assert!(send(&mut b, &fresh, 3 * SEC).is_empty());
        let c = b.worker.counters();
        assert_eq!(c.drops[DropReason::AllBackendsDown as usize].get(), 8);
        assert_eq!(c.drops[DropReason::NoBackend as usize].get(), 0);
        // Open flows still reach their backends.
        assert_eq!(send(&mut b, &acks, 3 * SEC), moved);
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
        drained[pinned].state = BackendState::Draining;
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

    /// 100 SYNs per second: 10 per window of the guard.
    const FLOOD_RATE: u32 = 100;

    /// SYNs from `n` clients of network 198.18.`net`.0/16, port `sport`.
    fn flood(net: u8, n: u32, sport: u16, flags: u8) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| tcp([198, net, (i >> 8) as u8, i as u8], sport, flags))
            .collect()
    }

    /// Past its rate the guard leaves SYNs out of the flow table; each
    /// connection's ACK, an unknown flow's packet, goes where its SYN went
    /// and is tracked from then on. Connections count once each.
    #[test]
    fn a_syn_flood_goes_untracked_and_the_acks_follow_their_syns() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 200), backend(2, 0, 300)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = guarded_bed(vec![svc], bes, 1 << 12, FLOOD_RATE);
        let syns = send(&mut b, &flood(20, 500, 1000, tcp_flags::SYN), SEC);
        let c = b.worker.counters().clone();
        // The window's first 10 were tracked.
        assert_eq!(c.syns.get(), 500);
        assert_eq!(c.syns_untracked.get(), 490);
        assert_eq!(b.worker.flows().len(), 10);
        assert_eq!(c.syn_guard_engaged.get(), 1);
        // Spread by weight all the same.
        assert!((0..3).all(|k| syns.iter().any(|a| backend_index(*a) == k)));
        let acks = send(&mut b, &flood(20, 500, 1000, tcp_flags::ACK), SEC + 1);
        assert_eq!(acks, syns);
        assert_eq!(c.unknown_flows.get(), 490);
        assert_eq!(b.worker.flows().len(), 500);
        assert_eq!(c.services[0].new_connections.get(), 500);
        let active: u64 = (0..3).map(|k| c.backends[k].active.get()).sum();
        assert_eq!(active, 500);
        let opened: u64 = (0..3).map(|k| c.backends[k].connections.get()).sum();
        assert_eq!(opened, 500);
        // The flood over, a quiet window later SYNs are tracked again.
        send(&mut b, &flood(21, 5, 1000, tcp_flags::SYN), 3 * SEC);
        assert_eq!(c.syn_guard_engaged.get(), 0);
        assert_eq!(c.syns_untracked.get(), 490);
        assert_eq!(b.worker.flows().len(), 505);
    }

    /// A flood of SYNs into a full table evicts at most the window's
    /// first few of its established flows while the guard is engaged
    /// (without it, thousands).
    #[test]
    fn a_syn_flood_evicts_few_established_flows() {
        for rate in [FLOOD_RATE, 0] {
            let bes = vec![backend(0, 0, 100), backend(1, 0, 100)];
            let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
            let mut b = guarded_bed(vec![svc], bes, 64, rate);
            // 64 established flows (their ACKs tracked), the table full
            // enough that new flows must evict.
            send(&mut b, &flood(22, 64, 80, tcp_flags::ACK), SEC);
            let held = b.worker.flows().len();
            assert!(held > 48, "{held}");
            send(&mut b, &flood(23, 5000, 2000, tcp_flags::SYN), 2 * SEC);
            let evicted = b.worker.counters().flows_evicted.get();
            if rate == 0 {
                assert!(evicted > 4000, "{evicted}");
            } else {
                // The window's first 10 SYNs were tracked.
                assert!(evicted <= 10, "{evicted}");
            }
        }
    }

    /// Under the guard an affinity still routes its clients' SYNs, and
    /// their ACKs follow.
    #[test]
    fn untracked_syns_follow_affinities() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 100), backend(2, 0, 100)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = guarded_bed(vec![svc], bes.clone(), 1 << 12, FLOOD_RATE);
        let key = TableKey::new(0, Family::V4, 0xc618_0000, 16, PortMatch::Any).unwrap();
        b.affinity.insert(key, 2).unwrap();
        let out = send(&mut b, &flood(24, 300, 3000, tcp_flags::SYN), SEC);
        assert!(out.iter().all(|a| backend_index(*a) == 2));
        assert_eq!(b.worker.counters().syns_untracked.get(), 290);
        let acks = send(&mut b, &flood(24, 300, 3000, tcp_flags::ACK), SEC + 1);
        assert!(acks.iter().all(|a| backend_index(*a) == 2));
        assert_eq!(b.worker.counters().services[0].affinity_hits.get(), 300);
    }

    /// Round robin's choice cannot be found again from a later packet, nor
    /// can an automatic-affinity pin be relied on to outlive the handshake
    /// unless the connection holds it: the SYNs of services with either are
    /// tracked whatever the guard says.
    #[test]
    fn round_robin_and_auto_affinity_syns_are_always_tracked() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 100)];
        let rr = service(0, 80, PROTO_TCP, &bes, SchedulerKind::RoundRobin, IPIP);
        let mut auto = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        auto.auto_affinity = Some(AutoAffinity {
            linger: Duration::from_secs(0),
        });
        for svc in [rr, auto] {
            let pinned = svc.auto_affinity.is_some();
            let mut b = guarded_bed(vec![svc], bes.clone(), 1 << 12, FLOOD_RATE);
            let syns = send(&mut b, &flood(26, 200, 1, tcp_flags::SYN), SEC);
            let c = b.worker.counters();
            assert_eq!(c.syn_guard_engaged.get(), 1);
            assert_eq!(c.syns_untracked.get(), 0);
            assert_eq!(b.worker.flows().len(), 200);
            if pinned {
                assert_eq!(b.worker.shared.auto_affinity.len_active(1000), 200);
            }
            assert_eq!(send(&mut b, &flood(26, 200, 1, tcp_flags::ACK), SEC), syns);
            assert_eq!(b.worker.counters().unknown_flows.get(), 0);
        }
    }

    /// A new SYN on the tuple of a closing flow ends that flow: counted
    /// closed, not expired, and its backend counts one connection, the new.
    #[test]
    fn a_syn_on_a_closing_flows_tuple_closes_it() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 100)];
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = bed(vec![svc], bes, 1 << 12);
        let client = [198, 18, 13, 3];
        send(&mut b, &[tcp(client, 100, tcp_flags::SYN)], SEC);
        send(
            &mut b,
            &[tcp(client, 100, tcp_flags::FIN | tcp_flags::ACK)],
            SEC,
        );
        send(&mut b, &[tcp(client, 100, tcp_flags::SYN)], SEC);
        let c = b.worker.counters();
        assert_eq!((c.flows_closed.get(), c.flows_expired.get()), (1, 0));
        let active = (0..2)
            .map(|id| c.backend(id).active.get() as i64)
            .sum::<i64>();
        assert_eq!(active, 1);
    }

    /// A pinned flow that a new SYN of its tuple finds past its timeout
    /// gives its pin back before the new connection takes it again: once
    /// that connection ends, the pin lingers and goes, and no backend
    /// still counts a connection.
    #[test]
    fn a_stale_pinned_flow_gives_its_pin_back() {
        let bes = vec![backend(0, 0, 100), backend(1, 0, 100)];
        let mut svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        svc.auto_affinity = Some(AutoAffinity {
            linger: Duration::from_secs(60),
        });
        let mut b = bed(vec![svc], bes, 1 << 12);
        let client = [198, 18, 13, 2];
        send(&mut b, &[tcp(client, 100, tcp_flags::SYN)], SEC);
        // Past the bed's 5 s SYN timeout.
        send(&mut b, &[tcp(client, 100, tcp_flags::SYN)], 7 * SEC);
        assert_eq!(b.worker.counters().flows_expired.get(), 1);
        send(&mut b, &[tcp(client, 100, tcp_flags::RST)], 8 * SEC);
        // The reset flow ends at the bed's 5 s fin timeout, by the sweep.
        for t in 14..=16 {
            b.worker.poll(t * SEC);
        }
        let c = b.worker.counters();
        assert_eq!(c.flows_expired.get(), 2);
        let active = (0..2)
            .map(|id| c.backend(id).active.get() as i64)
            .sum::<i64>();
        assert_eq!(active, 0);
        let auto = &b.worker.shared.auto_affinity;
        assert_eq!(auto.len_active(17_000), 1);
        assert_eq!(auto.len_active(77_000), 0);
    }

    /// A snapshot that gives services other ids (the registry keeps ids,
    /// but one given up is eventually reused): a flow that ends afterwards
    /// releases its auto-affinity pin with the linger of its own service
    /// (found by the flow's destination), not of the service that now has
    /// its old id.
    /// A reset reaches its flow's backend only while that backend serves
    /// the flow's service: once the backend's id names a backend of another
    /// service, the reset goes where a stray reset would.
    #[test]
    fn a_reset_follows_its_flow_only_to_a_backend_of_its_service() {
        let web = |bes: &[Backend]| service(0, 80, PROTO_TCP, bes, SchedulerKind::Maglev, IPIP);
        let mail = |bes: &[Backend]| service(1, 81, PROTO_TCP, bes, SchedulerKind::Maglev, IPIP);
        let before = vec![backend(0, 0, 100), backend(1, 0, 100), backend(2, 1, 100)];
        let mut b = bed(vec![web(&before[..2]), mail(&before[2..])], before, 1 << 12);
        let client = [198, 18, 13, 1];
        let first = send(&mut b, &[tcp(client, 100, tcp_flags::SYN)], SEC);
        let owner = backend_index(first[0]) as u32;
        let other = 1 - owner;
        // The flow's backend id now belongs to mail; web keeps the other.
        let after = vec![backend(other, 0, 100), backend(owner, 1, 100)];
        b.cell.publish(Dataplane::new(
            2,
            vec![web(&after[..1]), mail(&after[1..])],
            after,
        ));
        let out = send(&mut b, &[tcp(client, 100, tcp_flags::RST)], 2 * SEC);
        assert_eq!(out.len(), 1);
        assert_eq!(backend_index(out[0]) as u32, other);
        // The flow's backend is gone from its service: the flow with it.
        assert_eq!(b.worker.counters().rerouted.get(), 1);
        assert_eq!(b.worker.counters().flows_closed.get(), 1);
    }

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
        // The reset flow ends at the fin timeout (5 s), found by the sweep
        // (which visits some of the table's buckets each poll).
        for t in 8..=10 {
            b.worker.poll(t * SEC);
        }
        assert_eq!(b.worker.counters().flows_expired.get(), 1);
        // Its last connection is gone; the pin lingers for its 60 s.
        let auto = &b.worker.shared.auto_affinity;
        assert_eq!(auto.len_active(now_ms(11)), 1);
        assert_eq!(auto.len_active(now_ms(71)), 0);
    }
}

/// The ICMP paths of the worker: errors routed as their connection's
/// packets, echo answers, too-big answers and fragments.
#[cfg(test)]
mod icmp_tests {
    use super::fixture::{backend, backend6, service, Bed, Settings, IPIP, IPIP6, SEC, VIP, VIP6};
    use super::*;
    use crate::affinity::key::TableKey;
    use crate::datapath::classify::parse;
    use crate::datapath::icmp::EchoPolicy;
    use crate::datapath::pktio::MemBuf;
    use crate::datapath::snapshot::Backend;
    use crate::types::{BackendState, PortMatch, PROTO_UDP};
    use crate::wire::build::FrameSpec;
    use crate::wire::icmp::{v4, v6};
    use crate::wire::{icmp, ipv4, ipv6};

    const ROUTER: [u8; 4] = [198, 51, 100, 254];
    const ROUTER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0xf, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    /// The rx port's MAC in the bed (MemIo port 0).
    const PORT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0];
    /// The MAC frames come from (FrameSpec's default source).
    const SENDER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

    fn icmp_bed(services: Vec<Service>, backends: Vec<Backend>, icmp: IcmpSettings) -> Bed {
        let settings = Settings {
            icmp,
            ..Settings::default()
        };
        fixture::bed(services, backends, settings)
    }

    /// Three IPv4 backends of one TCP service on port 80.
    fn web(scheduler: SchedulerKind, mode: ForwardMode, icmp: IcmpSettings) -> Bed {
        let bes: Vec<Backend> = (0..3).map(|i| backend(i, 0, 100)).collect();
        let svc = service(0, 80, PROTO_TCP, &bes, scheduler, mode);
        icmp_bed(vec![svc], bes, icmp)
    }

    /// Runs frames through the worker; returns every frame it transmitted.
    fn run(b: &mut Bed, frames: &[Vec<u8>], now: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for chunk in frames.chunks(MAX_BURST) {
            for f in chunk {
                b.worker.io_mut().push_rx(0, f);
            }
            b.worker.poll(now);
            out.extend(
                b.worker.io_mut().tx[0]
                    .drain(..)
                    .map(|m: MemBuf| m.data().to_vec()),
            );
        }
        out
    }

    /// The IP packet of a frame, without padding.
    fn ip_of(frame: &[u8]) -> &[u8] {
        let l3 = &frame[14..];
        let len = if l3[0] >> 4 == 4 {
            usize::from(u16::from_be_bytes([l3[2], l3[3]]))
        } else {
            40 + usize::from(u16::from_be_bytes([l3[4], l3[5]]))
        };
        &l3[..len]
    }

    /// Where an encapsulated frame goes: (backend address, inner packet).
    fn tunnelled(frame: &[u8]) -> (u128, &[u8]) {
        let l3 = &frame[14..];
        if l3[0] >> 4 == 4 {
            let ip = ipv4::Packet::new_checked(l3).unwrap();
            assert_eq!(ip.protocol(), ipv4::PROTO_IPIP);
            assert!(ip.verify_checksum());
            let at = ip.total_len() as usize;
            (u32::from_be_bytes(ip.dst_addr()) as u128, &l3[20..at])
        } else {
            let ip = ipv6::Packet::new_checked(l3).unwrap();
            assert_eq!(ip.next_header(), ipv6::PROTO_IPV6);
            let at = ip.total_len();
            (u128::from_be_bytes(ip.dst_addr()), &l3[40..at])
        }
    }

    fn tcp4(src: [u8; 4], sport: u16, flags: u8) -> Vec<u8> {
        FrameSpec::tcp_v4(src, sport, VIP, 80, flags)
            .build()
            .unwrap()
    }

    /// "Fragmentation needed" (MTU 1400) from the router to the VIP about
    /// the backend's reply from VIP:`vport` to `client`:`cport` (`proto`),
    /// quoting 28 bytes of it (the header and the ports' 8 bytes).
    fn frag_needed(client: [u8; 4], cport: u16, vip: [u8; 4], vport: u16, proto: u8) -> Vec<u8> {
        let reply = match proto {
            PROTO_UDP => FrameSpec::udp_v4(vip, vport, client, cport),
            _ => FrameSpec::tcp_v4(vip, vport, client, cport, tcp_flags::ACK),
        }
        .build()
        .unwrap();
        FrameSpec {
            payload: &ip_of(&reply)[..28],
            ..FrameSpec::icmp_v4(
                ROUTER,
                VIP,
                v4::DEST_UNREACHABLE,
                v4::CODE_FRAG_NEEDED,
                1400,
            )
        }
        .build()
        .unwrap()
    }

    /// An error quoting a SYN-ACK of connection `i` (round robin spreads
    /// 300 connections over three backends).
    #[test]
    fn errors_reach_the_backend_that_has_the_connection() {
        for mode in [IPIP, ForwardMode::L2] {
            let mut b = web(SchedulerKind::RoundRobin, mode, IcmpSettings::default());
            let client = |i: u16| [203, 0, 113, (i % 250) as u8];
            let syns: Vec<Vec<u8>> = (0..300u16)
                .map(|i| tcp4(client(i), 10_000 + i, tcp_flags::SYN))
                .collect();
            let first = run(&mut b, &syns, SEC);
            let errors: Vec<Vec<u8>> = (0..300u16)
                .map(|i| frag_needed(client(i), 10_000 + i, VIP, 80, PROTO_TCP))
                .collect();
            let out = run(&mut b, &errors, SEC);
            assert_eq!(out.len(), 300);
            for (i, (o, e)) in out.iter().zip(&errors).enumerate() {
                match mode {
                    ForwardMode::IpIp { .. } => {
                        let (to, inner) = tunnelled(o);
                        assert_eq!(to, tunnelled(&first[i]).0, "connection {i}");
                        assert_eq!(inner, ip_of(e), "the ICMP packet intact inside");
                    }
                    ForwardMode::L2 => {
                        assert_eq!(&o[..6], &first[i][..6], "connection {i}: same backend MAC");
                        assert_eq!(&o[12..], &e[12..], "the frame unchanged but its MACs");
                    }
                }
            }
            // Round robin did spread them, so the flow table decided.
            let spread: std::collections::HashSet<&[u8]> = first.iter().map(|f| &f[..6]).collect();
            assert_eq!(spread.len(), 3);
            let c = b.worker.counters();
            assert_eq!(c.icmp_forwarded.get(), 300);
            assert_eq!(c.syns.get(), 300, "errors are not connections");
            assert_eq!(c.unknown_flows.get(), 0);
            assert_eq!(c.total_drops(), 0);
            assert_eq!(b.worker.flows().len(), 300);
        }
    }

    /// An error about a connection the worker never saw goes where the
    /// connection's next packet goes (the consistent hash), and leaves no
    /// state: that packet is still an unknown flow's.
    #[test]
    fn errors_about_unknown_connections_follow_the_hash() {
        let mut b = web(SchedulerKind::Maglev, IPIP, IcmpSettings::default());
        let client = |i: u16| [198, 18, (i >> 8) as u8, i as u8];
        let errors: Vec<Vec<u8>> = (0..500u16)
            .map(|i| frag_needed(client(i), 2000 + i, VIP, 80, PROTO_TCP))
            .collect();
        let via_error: Vec<u128> = run(&mut b, &errors, SEC)
            .iter()
            .map(|o| tunnelled(o).0)
            .collect();
        assert_eq!(b.worker.flows().len(), 0, "no state from errors");
        let acks: Vec<Vec<u8>> = (0..500u16)
            .map(|i| tcp4(client(i), 2000 + i, tcp_flags::ACK))
            .collect();
        let via_ack: Vec<u128> = run(&mut b, &acks, SEC)
            .iter()
            .map(|o| tunnelled(o).0)
            .collect();
        assert_eq!(via_error, via_ack);
        assert_eq!(b.worker.counters().unknown_flows.get(), 500);
        let distinct: std::collections::HashSet<u128> = via_ack.iter().copied().collect();
        assert_eq!(distinct.len(), 3);
    }

    /// A draining backend's static affinity routes none of its clients'
    /// connections (its drain must finish): the errors about them and their
    /// stray resets go where the connections go, not to it.
    #[test]
    fn a_draining_owners_static_affinity_routes_no_error_or_reset() {
        let mut bes: Vec<Backend> = (0..3).map(|i| backend(i, 0, 100)).collect();
        bes[2].state = BackendState::Draining;
        let svc = service(0, 80, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = icmp_bed(vec![svc], bes, IcmpSettings::default());
        let key = TableKey::new(0, Family::V4, 0xc612_0500, 24, PortMatch::Any).unwrap();
        b.affinity.insert_static(key, 2).unwrap();
        let to = |b: &mut Bed, frames: Vec<Vec<u8>>| -> Vec<u128> {
            run(b, &frames, SEC)
                .iter()
                .map(|o| tunnelled(o).0)
                .collect()
        };
        let clients = || (0..50u8).map(|i| [198, 18, 5, i]);
        let errors = to(
            &mut b,
            clients()
                .map(|c| frag_needed(c, 3000, VIP, 80, PROTO_TCP))
                .collect(),
        );
        let resets = to(
            &mut b,
            clients().map(|c| tcp4(c, 3000, tcp_flags::RST)).collect(),
        );
        let syns = to(
            &mut b,
            clients().map(|c| tcp4(c, 3000, tcp_flags::SYN)).collect(),
        );
        assert_eq!(syns.len(), 50);
        assert!(!syns.contains(&0x0a01_0003), "no new connection to be2");
        assert_eq!(errors, syns, "errors go to the connections' backends");
        assert_eq!(resets, syns, "resets go to the connections' backends");
    }

    /// An ICMP message to a VIP shorter than the ICMP header is an ICMP
    /// drop, `malformed`.
    #[test]
    fn a_short_icmp_message_is_a_malformed_icmp_drop() {
        let mut b = web(SchedulerKind::Maglev, IPIP, IcmpSettings::default());
        let mut f = FrameSpec::icmp_v4([203, 0, 113, 9], VIP, v4::ECHO_REQUEST, 0, 1)
            .build()
            .unwrap();
        let mut ip = ipv4::Packet::new_unchecked(&mut f[14..]);
        ip.set_total_len(20 + 4);
        ip.fill_checksum();
        assert!(run(&mut b, &[f], SEC).is_empty());
        let c = b.worker.counters();
        assert_eq!(c.icmp_drops[IcmpDrop::Malformed as usize].get(), 1);
        assert_eq!(c.drops[DropReason::Icmp as usize].get(), 1);
        assert_eq!(c.drops[DropReason::Malformed as usize].get(), 0);
    }

    /// An affinity owns the client's unknown connections: their errors go
    /// to the owner too.
    #[test]
    fn errors_follow_affinities() {
        let mut b = web(SchedulerKind::Maglev, IPIP, IcmpSettings::default());
        let key = TableKey::new(0, Family::V4, 0xc612_0500, 24, PortMatch::Any).unwrap();
        b.affinity.insert(key, 2).unwrap();
        let errors: Vec<Vec<u8>> = (0..50u8)
            .map(|i| frag_needed([198, 18, 5, i], 3000, VIP, 80, PROTO_TCP))
            .collect();
        let out = run(&mut b, &errors, SEC);
        assert_eq!(out.len(), 50);
        assert!(out.iter().all(|o| tunnelled(o).0 == 0x0a01_0003));
    }

    #[test]
    fn foreign_and_malformed_icmp_is_dropped_by_reason() {
        let mut b = web(SchedulerKind::Maglev, IPIP, IcmpSettings::default());
        let c = [203, 0, 113, 9];
        let mut bad_sum = frag_needed(c, 1, VIP, 80, PROTO_TCP);
        let n = bad_sum.len();
        bad_sum[n - 1] ^= 1;
        let about_icmp = {
            let echo = FrameSpec::icmp_v4(VIP, c, v4::ECHO_REPLY, 0, 1)
                .build()
                .unwrap();
            FrameSpec {
                payload: ip_of(&echo),
                ..FrameSpec::icmp_v4(ROUTER, VIP, v4::DEST_UNREACHABLE, 1, 0)
            }
            .build()
            .unwrap()
        };
        let short = {
            let f = frag_needed(c, 1, VIP, 80, PROTO_TCP);
            let q = &ip_of(&f)[28..28 + 21];
            FrameSpec {
                payload: q,
                ..FrameSpec::icmp_v4(ROUTER, VIP, v4::DEST_UNREACHABLE, 4, 1400)
            }
            .build()
            .unwrap()
        };
        let cases: Vec<(Vec<u8>, IcmpDrop)> = vec![
            (bad_sum, IcmpDrop::BadChecksum),
            (short, IcmpDrop::ShortQuote),
            (about_icmp, IcmpDrop::AboutIcmp),
            // Quoted from another address than a VIP's.
            (
                frag_needed(c, 1, [10, 0, 0, 9], 80, PROTO_TCP),
                IcmpDrop::QuoteNotVip,
            ),
            // From the VIP, but a port no service has.
            (
                frag_needed(c, 1, VIP, 81, PROTO_TCP),
                IcmpDrop::QuoteNoService,
            ),
            // The service's port, another protocol.
            (
                frag_needed(c, 1, VIP, 80, PROTO_UDP),
                IcmpDrop::QuoteNoService,
            ),
            (
                FrameSpec::icmp_v4(ROUTER, VIP, 5, 1, 0).build().unwrap(),
                IcmpDrop::UnsupportedType,
            ),
            (
                FrameSpec::icmp_v4(c, VIP, v4::ECHO_REQUEST, 0, 1)
                    .build()
                    .unwrap(),
                IcmpDrop::EchoOff,
            ),
        ];
        let frames: Vec<Vec<u8>> = cases.iter().map(|(f, _)| f.clone()).collect();
        assert!(run(&mut b, &frames, SEC).is_empty());
        let ct = b.worker.counters();
        for (_, r) in &cases {
            let want = cases.iter().filter(|(_, x)| x == r).count() as u64;
            assert_eq!(ct.icmp_drops[*r as usize].get(), want, "{r:?}");
        }
        assert_eq!(
            ct.drops[DropReason::Icmp as usize].get(),
            cases.len() as u64
        );
        assert_eq!(ct.total_drops(), cases.len() as u64);
        assert_eq!(ct.icmp_forwarded.get(), 0);
    }

    /// ICMP to an address that is not a VIP is not pktdist's: dropped as
    /// any protocol it does not route, or passed to `unmatched_to`.
    #[test]
    fn icmp_to_other_addresses_is_unmatched() {
        let mut b = web(SchedulerKind::Maglev, IPIP, IcmpSettings::default());
        let f = FrameSpec::icmp_v4([203, 0, 113, 1], [10, 9, 9, 9], v4::ECHO_REQUEST, 0, 1)
            .build()
            .unwrap();
        assert!(run(&mut b, std::slice::from_ref(&f), SEC).is_empty());
        let c = b.worker.counters();
        assert_eq!(c.drops[DropReason::UnsupportedL4 as usize].get(), 1);
        assert_eq!(c.drops[DropReason::Icmp as usize].get(), 0);
        b.worker.setup.ports[0].unmatched_to = Some(0);
        assert_eq!(run(&mut b, std::slice::from_ref(&f), SEC), vec![f]);
    }

    #[test]
    fn echo_requests_are_answered_when_configured_within_the_rate() {
        let settings = IcmpSettings {
            echo: EchoPolicy::Only(vec![(Family::V4, u32::from_be_bytes(VIP) as u128)]),
            echo_rate: 5,
            ..IcmpSettings::default()
        };
        let mut b = web(SchedulerKind::Maglev, IPIP, settings);
        let ping = |i: u16| {
            FrameSpec {
                payload: b"abcdefgh",
                ..FrameSpec::icmp_v4([203, 0, 113, 1], VIP, v4::ECHO_REQUEST, 0, u32::from(i))
            }
            .build()
            .unwrap()
        };
        let pings: Vec<Vec<u8>> = (0..8).map(ping).collect();
        let out = run(&mut b, &pings, SEC);
        assert_eq!(out.len(), 5, "a burst of the rate");
        for (i, o) in out.iter().enumerate() {
            assert_eq!(&o[..6], &SENDER_MAC);
            assert_eq!(&o[6..12], &PORT_MAC);
            let ip = ipv4::Packet::new_checked(&o[14..]).unwrap();
            assert!(ip.verify_checksum());
            assert_eq!((ip.src_addr(), ip.dst_addr()), (VIP, [203, 0, 113, 1]));
            let m = icmp::Packet::new_checked(ip.payload()).unwrap();
            assert!(m.verify_checksum_v4());
            assert_eq!((m.msg_type(), m.rest()), (v4::ECHO_REPLY, i as u32));
        }
        let c = b.worker.counters();
        assert_eq!(c.icmp_echo_answered.get(), 5);
        assert_eq!(c.icmp_drops[IcmpDrop::EchoRateLimited as usize].get(), 3);
        // A second later, more.
        assert_eq!(run(&mut b, &pings[..1], 2 * SEC).len(), 1);
        // Requests refused for themselves (IPv4 options, no one host's
        // source) spend none of the rate: it counts answers.
        let refused: Vec<Vec<u8>> = (0..8u32)
            .map(|i| {
                let options = [1, 1, 1, 0];
                let mut spec =
                    FrameSpec::icmp_v4([203, 0, 113, 1], VIP, v4::ECHO_REQUEST, 0, 100 + i);
                if i % 2 == 0 {
                    spec.ipv4_options = &options;
                } else {
                    spec = FrameSpec::icmp_v4([0, 0, 0, 0], VIP, v4::ECHO_REQUEST, 0, 100 + i);
                }
                spec.build().unwrap()
            })
            .collect();
        assert!(run(&mut b, &refused, 10 * SEC).is_empty());
        assert_eq!(run(&mut b, &pings, 10 * SEC).len(), 5);
        let c = b.worker.counters();
        assert_eq!(c.icmp_drops[IcmpDrop::EchoOptions as usize].get(), 4);
        assert_eq!(c.icmp_drops[IcmpDrop::EchoBadSource as usize].get(), 4);
        assert_eq!(c.icmp_drops[IcmpDrop::EchoRateLimited as usize].get(), 6);
    }

    /// A 1500-byte DF packet from `src` to the web service: 20 bytes too
    /// long for a 1500-byte link once in IP-in-IP.
    fn too_big_for_ipip(src: [u8; 4]) -> Vec<u8> {
        FrameSpec {
            payload: &[0x33; 1460],
            ..FrameSpec::tcp_v4(src, 5555, VIP, 80, tcp_flags::ACK)
        }
        .build()
        .unwrap()
    }

    /// A too-big DF packet from no one host's address (multicast,
    /// broadcast), or whose IPv4 header checksum fails, gets no answer: it
    /// is dropped as too big.
    #[test]
    fn too_big_packets_from_no_one_host_are_not_answered() {
        let mut b = web(SchedulerKind::Maglev, IPIP, IcmpSettings::default());
        let mut corrupted = too_big_for_ipip([203, 0, 113, 7]);
        corrupted[14 + 12] ^= 1;
        let frames = [
            too_big_for_ipip([224, 0, 0, 1]),
            too_big_for_ipip([255, 255, 255, 255]),
            corrupted,
        ];
        assert!(run(&mut b, &frames, SEC).is_empty());
        let c = b.worker.counters();
        assert_eq!(c.icmp_too_big_sent.get(), 0);
        assert_eq!(c.drops[DropReason::TooBig as usize].get(), 3);
        // The same from one host is answered.
        assert_eq!(
            run(&mut b, &[too_big_for_ipip([203, 0, 113, 7])], SEC).len(),
            1
        );
        assert_eq!(b.worker.counters().icmp_too_big_sent.get(), 1);
    }

    /// A 1500-byte DF packet for a 1500-byte link through IP-in-IP:
    /// "fragmentation needed" with MTU 1480 back to the client on the port
    /// it came in on, within the per-client rate; the packet itself reaches
    /// no backend (its connection is routed as usual: its next, smaller
    /// packets go where it would have gone).
    #[test]
    fn too_big_df_packets_are_answered_per_client_within_the_rate() {
        let settings = IcmpSettings {
            too_big_rate: 4,
            ..IcmpSettings::default()
        };
        let mut b = web(SchedulerKind::Maglev, IPIP, settings);
        let mut frames: Vec<Vec<u8>> = (0..10)
            .map(|_| too_big_for_ipip([203, 0, 113, 7]))
            .collect();
        frames.push(too_big_for_ipip([203, 0, 113, 8]));
        // A 1480-byte packet fits exactly.
        let fits = FrameSpec {
            payload: &[0x33; 1440],
            ..FrameSpec::tcp_v4([203, 0, 113, 9], 5555, VIP, 80, tcp_flags::ACK)
        }
        .build()
        .unwrap();
        frames.push(fits);
        let out = run(&mut b, &frames, SEC);
        assert_eq!(out.len(), 4 + 1 + 1);
        for o in &out[..5] {
            assert_eq!(&o[..6], &SENDER_MAC, "back to the sender");
            let ip = ipv4::Packet::new_checked(&o[14..]).unwrap();
            assert!(ip.verify_checksum());
            assert_eq!(ip.src_addr(), VIP);
            let m = icmp::Packet::new_checked(ip.payload()).unwrap();
            assert!(m.verify_checksum_v4());
            assert_eq!((m.msg_type(), m.code(), m.next_hop_mtu()), (3, 4, 1480));
        }
        assert_eq!(
            tunnelled(&out[5]).1.len(),
            1480,
            "the fitting one forwarded"
        );
        let c = b.worker.counters();
        assert_eq!(c.icmp_too_big_sent.get(), 5);
        assert_eq!(c.drops[DropReason::TooBig as usize].get(), 6);
        // Every one belongs to its connection (routed: three connections
        // learned), but only the fitting one reached a backend.
        assert_eq!(c.unknown_flows.get(), 3);
        assert_eq!(c.services[0].packets.get(), 1);
        assert_eq!(b.worker.flows().len(), 3);
    }

    /// `::10.0.0.1` (an IPv4-compatible IPv6 address) has the IPv4 VIP's
    /// bits: its packets are not the IPv4 service's, not even right after
    /// one of that service's packets in the same burst; with a service of
    /// its own on that address, each family reaches its own.
    #[test]
    fn services_are_told_apart_by_family() {
        let compat: [u8; 16] = std::array::from_fn(|i| if i < 12 { 0 } else { VIP[i - 12] });
        let client6 = [0x20, 0x01, 0x0d, 0xb8, 0xc, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        let syn6 = FrameSpec::tcp_v6(client6, 40000, compat, 80, tcp_flags::SYN)
            .build()
            .unwrap();
        let burst = [
            tcp4([192, 0, 2, 1], 1000, tcp_flags::SYN),
            syn6,
            tcp4([192, 0, 2, 2], 1000, tcp_flags::SYN),
        ];
        let be4 = backend(0, 0, 100);
        let be6 = backend6(1, 1);
        let s4 = service(
            0,
            80,
            PROTO_TCP,
            std::slice::from_ref(&be4),
            SchedulerKind::Maglev,
            IPIP,
        );
        let mut s6 = service(
            1,
            80,
            PROTO_TCP,
            std::slice::from_ref(&be6),
            SchedulerKind::Maglev,
            IPIP6,
        );
        s6.vip = std::net::Ipv6Addr::from(compat).into();
        s6.vip_bits = u128::from_be_bytes(compat);

        // The IPv4 service alone: the IPv6 SYN is for no service.
        let mut b = icmp_bed(vec![s4.clone()], vec![be4.clone()], IcmpSettings::default());
        let out = run(&mut b, &burst, SEC);
        let to: Vec<u128> = out.iter().map(|f| tunnelled(f).0).collect();
        assert_eq!(to, [be4.addr_bits, be4.addr_bits]);
        let c = b.worker.counters();
        assert_eq!(c.drops[DropReason::NoService as usize].get(), 1);
        let dp = Dataplane::new(1, vec![s4.clone()], vec![be4.clone()]);
        assert_eq!(
            dp.find_service(s4.vip, 80, PROTO_TCP).map(|s| s.id),
            Some(0)
        );
        assert!(dp.find_service(s6.vip, 80, PROTO_TCP).is_none());

        // Both: each packet to its family's service and backend.
        let mut b = icmp_bed(
            vec![s4.clone(), s6.clone()],
            vec![be4.clone(), be6.clone()],
            IcmpSettings::default(),
        );
        let out = run(&mut b, &burst, SEC);
        let to: Vec<u128> = out.iter().map(|f| tunnelled(f).0).collect();
        assert_eq!(to, [be4.addr_bits, be6.addr_bits, be4.addr_bits]);
        let dp = Dataplane::new(1, vec![s4.clone(), s6.clone()], vec![be4, be6]);
        assert_eq!(
            dp.find_service(s4.vip, 80, PROTO_TCP).map(|s| s.id),
            Some(0)
        );
        assert_eq!(
            dp.find_service(s6.vip, 80, PROTO_TCP).map(|s| s.id),
            Some(1)
        );
        // Nor is a service of the same name on the other family's address
        // the same service (its counters do not carry over on reload).
        let renamed = Service {
            name: s4.name.clone(),
            ..s6
        };
        assert!(!s4.same_as(&renamed));
        assert!(s4.same_as(&s4.clone()));
    }

    /// IPv6: always "packet too big" (MTU 1460 through IP-in-IP), never
    /// fragments; an ICMPv6 error is routed like IPv4's.
    #[test]
    fn ipv6_too_big_and_errors() {
        let bes: Vec<Backend> = (0..2).map(|i| backend6(i, 0)).collect();
        let svc = service(0, 443, PROTO_TCP, &bes, SchedulerKind::Maglev, IPIP6);
        let mut b = icmp_bed(vec![svc], bes, IcmpSettings::default());
        let client = [0x20, 0x01, 0x0d, 0xb8, 0xc, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        let big = FrameSpec {
            payload: &[1; 1440],
            ..FrameSpec::tcp_v6(client, 40000, VIP6, 443, tcp_flags::ACK)
        }
        .build()
        .unwrap();
        let out = run(&mut b, &[big], SEC);
        let ip = ipv6::Packet::new_checked(&out[0][14..]).unwrap();
        assert_eq!(ip.dst_addr(), client);
        let m = icmp::Packet::new_checked(ip.payload()).unwrap();
        assert_eq!((m.msg_type(), m.rest()), (v6::PACKET_TOO_BIG, 1460));

        let syn = FrameSpec::tcp_v6(client, 40001, VIP6, 443, tcp_flags::SYN)
            .build()
            .unwrap();
        let first = run(&mut b, &[syn], SEC);
        let reply = FrameSpec::tcp_v6(VIP6, 443, client, 40001, tcp_flags::ACK)
            .build()
            .unwrap();
        let err = FrameSpec {
            payload: ip_of(&reply),
            ..FrameSpec::icmp_v6(ROUTER6, VIP6, v6::PACKET_TOO_BIG, 0, 1280)
        }
        .build()
        .unwrap();
        let out = run(&mut b, std::slice::from_ref(&err), SEC);
        let (to, inner) = tunnelled(&out[0]);
        assert_eq!(to, tunnelled(&first[0]).0);
        assert_eq!(inner, ip_of(&err));
        // The outer flow label is the connection's.
        let outer = ipv6::Packet::new_checked(&out[0][14..]).unwrap();
        let first_outer = ipv6::Packet::new_checked(&first[0][14..]).unwrap();
        assert_eq!(outer.flow_label(), first_outer.flow_label());
    }

    /// Each outer IPv4 header has an identification of its own (a router
    /// further on may fragment those without DF), the fast and the general
    /// path alike; fragments keep their packet's.
    #[test]
    fn outer_headers_are_identified_one_by_one() {
        let bes: Vec<Backend> = (0..3).map(|i| backend(i, 0, 100)).collect();
        let svc = service(0, 53, PROTO_UDP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = icmp_bed(vec![svc], bes, IcmpSettings::default());
        let frame = |sport, vlan| {
            FrameSpec {
                payload: &[7; 100],
                dont_frag: false,
                vlan,
                ..FrameSpec::udp_v4([203, 0, 113, 3], sport, VIP, 53)
            }
            .build()
            .unwrap()
        };
        // Untagged frames take the fast path, tagged ones the general one.
        let frames = [frame(1000, None), frame(1001, None), frame(1002, Some(5))];
        let out = run(&mut b, &frames, SEC);
        assert_eq!(out.len(), 3);
        let ids: Vec<u16> = out
            .iter()
            .map(|o| {
                let l3 = if o[12..14] == [0x81, 0x00] { 18 } else { 14 };
                let ip = ipv4::Packet::new_checked(&o[l3..]).unwrap();
                assert!(ip.verify_checksum());
                ip.ident()
            })
            .collect();
        assert!(
            ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
            "{ids:?}"
        );
    }

    /// Without DF, a too-long packet is forwarded in fragments of the outer
    /// packet; counted as such.
    #[test]
    fn too_big_packets_without_df_are_fragmented() {
        let bes: Vec<Backend> = (0..3).map(|i| backend(i, 0, 100)).collect();
        let svc = service(0, 53, PROTO_UDP, &bes, SchedulerKind::Maglev, IPIP);
        let mut b = icmp_bed(vec![svc], bes, IcmpSettings::default());
        let f = FrameSpec {
            payload: &[9; 1472],
            dont_frag: false,
            ..FrameSpec::udp_v4([203, 0, 113, 3], 999, VIP, 53)
        }
        .build()
        .unwrap();
        let out = run(&mut b, std::slice::from_ref(&f), SEC);
        assert_eq!(out.len(), 2);
        let ips: Vec<ipv4::Packet<&[u8]>> = out
            .iter()
            .map(|o| ipv4::Packet::new_checked(&o[14..]).unwrap())
            .collect();
        assert!(ips
            .iter()
            .all(|ip| ip.total_len() <= 1500 && ip.verify_checksum()));
        // The first fragment (in `buf`) leaves after the rest.
        assert_eq!((ips[0].frag_offset(), ips[0].more_frags()), (1480, false));
        assert_eq!((ips[1].frag_offset(), ips[1].more_frags()), (0, true));
        assert_eq!(ips[0].ident(), ips[1].ident());
        assert_eq!(ips[0].dst_addr(), ips[1].dst_addr());
        let mut inner = ips[1].payload().to_vec();
        inner.extend_from_slice(ips[0].payload());
        assert_eq!(&inner[..], ip_of(&f));
        let c = b.worker.counters();
        assert_eq!((c.fragmented.get(), c.fragments.get()), (1, 2));
        assert_eq!(c.tx_packets.get(), 2);
        assert_eq!(c.services[0].packets.get(), 1);
        // With no buffer to spare, it is dropped whole.
        b.worker.io_mut().spare_bufs = 0;
        assert!(run(&mut b, &[f], SEC).is_empty());
        assert_eq!(
            b.worker.counters().drops[DropReason::NoRoom as usize].get(),
            1
        );
    }

    /// An ICMP error too long for the link once encapsulated is never
    /// answered with ICMP: with DF, dropped as too big.
    #[test]
    fn too_long_icmp_errors_are_not_answered() {
        let mut b = web(SchedulerKind::Maglev, IPIP, IcmpSettings::default());
        let reply = FrameSpec {
            payload: &[0; 1460],
            ..FrameSpec::tcp_v4(VIP, 80, [203, 0, 113, 1], 1000, tcp_flags::ACK)
        }
        .build()
        .unwrap();
        let mut err = FrameSpec {
            payload: &ip_of(&reply)[..1472],
            ..FrameSpec::icmp_v4(ROUTER, VIP, v4::TIME_EXCEEDED, 0, 0)
        }
        .build()
        .unwrap();
        let mut ip = ipv4::Packet::new_checked(&mut err[14..]).unwrap();
        ip.set_frag(true, false, 0);
        ip.fill_checksum();
        assert!(matches!(
            parse(&err),
            Err(crate::datapath::classify::NotFlow::Icmp(at)) if at.l3_len == 1500
        ));
        assert!(run(&mut b, &[err], SEC).is_empty());
        let c = b.worker.counters();
        assert_eq!(c.drops[DropReason::TooBig as usize].get(), 1);
        assert_eq!(c.icmp_too_big_sent.get(), 0);
    }

    /// Frames of every kind the worker handles, valid, for the fuzz test
    /// below to break: TCP to the IPv4 and IPv6 services (a SYN, an ACK of
    /// an unknown flow, a reset), UDP, echo requests, an ICMP error
    /// quoting a connection, and UDP too big for the MTU once
    /// encapsulated (allowed to fragment, and not).
    fn fuzz_templates() -> Vec<Vec<u8>> {
        let c = [198, 18, 0, 7];
        let c6 = [0x20, 0x01, 0x0d, 0xb8, 0xc, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
        let big = vec![0x5a; 1460];
        let mut t = vec![
            FrameSpec::tcp_v4(c, 1000, VIP, 80, tcp_flags::SYN),
            FrameSpec::tcp_v4(c, 1001, VIP, 80, tcp_flags::ACK),
            FrameSpec::tcp_v4(c, 1002, VIP, 80, tcp_flags::RST),
            FrameSpec::udp_v4(c, 1003, VIP, 53),
            FrameSpec::tcp_v6(c6, 1004, VIP6, 80, tcp_flags::SYN),
            FrameSpec::icmp_v4(c, VIP, v4::ECHO_REQUEST, 0, 1),
            FrameSpec::icmp_v6(c6, VIP6, v6::ECHO_REQUEST, 0, 1),
        ]
        .into_iter()
        .map(|f| f.build().unwrap())
        .collect::<Vec<_>>();
        t.push(frag_needed(c, 1000, VIP, 80, PROTO_TCP));
        for dont_frag in [false, true] {
            let f = FrameSpec {
                payload: &big,
                dont_frag,
                ..FrameSpec::udp_v4(c, 1005, VIP, 53)
            };
            t.push(f.build().unwrap());
        }
        t
    }

    /// A bed with an IPv4 TCP service and its affinity, an IPv4 UDP
    /// service, an IPv6 TCP service, and echo answered.
    fn fuzz_bed() -> Bed {
        let mut bes: Vec<Backend> = (0..2).map(|i| backend(i, 0, 100)).collect();
        bes.extend((2..4).map(|i| backend(i, 1, 100)));
        bes.extend((4..6).map(|i| backend6(i, 2)));
        let svcs = vec![
            service(0, 80, PROTO_TCP, &bes[0..2], SchedulerKind::Maglev, IPIP),
            service(1, 53, PROTO_UDP, &bes[2..4], SchedulerKind::Maglev, IPIP),
            service(
                2,
                80,
                PROTO_TCP,
                &bes[4..6],
                SchedulerKind::RoundRobin,
                IPIP6,
            ),
        ];
        let icmp = IcmpSettings {
            echo: EchoPolicy::All,
            ..IcmpSettings::default()
        };
        let mut b = icmp_bed(svcs, bes, icmp);
        let k = TableKey::new(0, Family::V4, 0xc612_0000, 16, PortMatch::Any).unwrap();
        b.affinity.insert(k, 1).unwrap();
        b
    }

    /// What the worker has counted of the frames it did not forward to a
    /// backend: its drops, ICMP drops, and frames passed to another port
    /// (none in this bed).
    fn counted(c: &WorkerCounters) -> u64 {
        c.drops
            .iter()
            .chain(c.icmp_drops.iter())
            .map(|x| x.get())
            .sum::<u64>()
            + c.passed.get()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any frame (one of every kind with bytes changed and its end
        /// cut, or arbitrary bytes) is forwarded, answered, or counted as
        /// a drop: none panics the worker, and none goes uncounted.
        #[test]
        fn every_frame_is_forwarded_answered_or_counted(
            kind in 0usize..10,
            flips in proptest::collection::vec((0usize..1600, proptest::prelude::any::<u8>()), 0..4),
            keep in 0usize..1600,
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120),
            use_raw in proptest::prelude::any::<bool>(),
        ) {
            let templates = fuzz_templates();
            let frame = if use_raw {
                raw
            } else {
                let mut f = templates[kind % templates.len()].clone();
                for (at, x) in flips {
                    let n = f.len();
                    f[at % n] ^= x;
                }
                f.truncate(keep.max(1));
                f
            };
            let mut b = fuzz_bed();
            // Twice: the second time finds what the first left (a flow,
            // a rate spent).
            for round in 0..2u64 {
                let before = counted(b.worker.counters());
                let out = run(&mut b, std::slice::from_ref(&frame), SEC * (round + 1));
                let after = counted(b.worker.counters());
                proptest::prop_assert!(
                    !out.is_empty() || after > before,
                    "frame {:02x?}: neither sent nor counted",
                    frame
                );
            }
            proptest::prop_assert_eq!(b.worker.counters().rx_packets.get(), 2);
        }
    }
}
