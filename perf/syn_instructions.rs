//! Instructions the worker executes per SYN, with an empty affinity table
//! or with the benchmark's million affinities, and per packet of an
//! established flow (`--kind established`): run under callgrind by
//! `perf/instructions.sh`, which counts only [`measured`]. Instruction
//! counts do not move with this VM's modes or neighbours, so a change to the
//! lookup's CPU cost shows here when the throughput runs are too noisy to
//! tell; they say nothing of memory stalls, which the throughput runs
//! measure.
//!
//! No EAL: the worker runs over in-memory queues ([`MemIo`], shared with
//! the feeding loop), whose buffer handling adds the same instructions to
//! both tables. The buffers the worker transmits are kept until
//! [`measured`] returns, so their frees (heap buffers here, a mempool's
//! in DPDK) are not counted as the worker's.

// Shared with dataplane-bench; this program uses a part of each.
#[allow(dead_code)]
mod affinity_load;
#[allow(dead_code)]
mod control_rate;
#[allow(dead_code)]
mod feeder;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

use pktdist::affinity::table::{AffinityReader, AffinityTable};

use pktdist::affinity::auto::AutoAffinityTable;
use pktdist::control::registry::ServiceRegistry;
use pktdist::datapath::counters::WorkerCounters;
use pktdist::datapath::flow::FlowTimeouts;
use pktdist::datapath::pktio::{MemBuf, MemIo, MAX_BURST};
use pktdist::datapath::snapshot::DataplaneCell;
use pktdist::datapath::worker::{PortPlan, Shared, Worker, WorkerSetup};
use pktdist::types::tcp_flags;

/// The worker's queues, shared with the loop that feeds them.
type SharedIo = Rc<RefCell<MemIo>>;

use affinity_load::{CLIENT_BASE, CLIENT_MASK};
use feeder::{tcp_frame, Rng};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Table {
    /// No affinities.
    Empty,
    /// The dataplane benchmark's table: `--affinities` entries, 10,000 of
    /// them /24s, the rest /32s.
    Loaded,
}

/// What the measured packets are.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// SYNs from random clients, each a new connection in a full flow
    /// table (the SYN flood).
    Syn,
    /// ACKs of `--packets` flows opened by a SYN each before the count, in
    /// another order, in a flow table twice their number (the established
    /// scenario: half full).
    Established,
    /// SYNs of `--packets` clients whose flows, opened by a SYN each
    /// before the count, have passed their SYN timeout: each finds its
    /// expired flow and opens a new connection in its place, in a flow
    /// table twice their number (the path of `perf/vs_testpmd.py`'s SYN
    /// flood, which replays a file of SYNs with a short SYN timeout).
    SynAgain,
}

/// Runs SYNs from random clients (or ACKs of open flows) through one
/// worker.
#[derive(Parser)]
struct Args {
    #[arg(long, value_enum)]
    table: Table,
    #[arg(long, value_enum, default_value = "syn")]
    kind: Kind,
    /// Packets counted (SYNs after 8 x 65,536 that fill the flow table and
    /// bring it to its steady state; ACKs after each flow's SYN).
    #[arg(long, default_value_t = 100_000)]
    packets: usize,
    /// Affinities in the loaded table (10,000 of them /24s).
    #[arg(long, default_value_t = 1_000_000)]
    affinities: usize,
    /// The worker's `[flow] syn_flood_rate`. Default: pktdist's for the
    /// SYN flood (whose rate, `NS_PER_BURST`, engages the guard), 0 for
    /// the other kinds, which measure tracked flows.
    #[arg(long)]
    syn_flood_rate: Option<u32>,
}

/// Flow-table capacity: small, so that the warm-up fills it and every
/// measured SYN replaces a flow, as in the throughput benchmark.
const FLOW_CAPACITY: usize = 1 << 16;
/// Nanoseconds the clock advances per burst of [`MAX_BURST`] SYNs: 7 Mpps,
/// about the throughput benchmark's SYN rate, so that flows age roughly as
/// they do there (the table's eviction order depends on it).
const NS_PER_BURST: u64 = MAX_BURST as u64 * 1_000 / 7;

/// The measured part: callgrind counts this function alone. The
/// transmitted buffers stay in the output queue (room for all of them
/// reserved beforehand), freed after the count.
#[inline(never)]
fn measured(
    worker: &mut Worker<SharedIo>,
    io: &SharedIo,
    frames: Vec<MemBuf>,
    now: &mut u64,
) -> usize {
    feed(worker, io, frames, now, false)
}

/// Polls `frames` through the worker a burst at a time, the clock at `now`
/// advancing by [`NS_PER_BURST`] per burst; returns how many it
/// transmitted. With `free`, the transmitted buffers are dropped after
/// each poll, else left in the output queue.
fn feed(
    worker: &mut Worker<SharedIo>,
    io: &SharedIo,
    frames: Vec<MemBuf>,
    now: &mut u64,
    free: bool,
) -> usize {
    let start = io.borrow().tx[1].len();
    let mut frames = frames.into_iter();
    loop {
        {
            let mut io = io.borrow_mut();
            let before = io.rx[0].len();
            io.rx[0].extend(frames.by_ref().take(MAX_BURST));
            if io.rx[0].len() == before {
                return io.tx[1].len() - start;
            }
        }
        *now += NS_PER_BURST;
        poll(worker, *now);
        if free {
            io.borrow_mut().tx[1].clear();
        }
    }
}

/// Clients (address, port) drawn at random from the benchmark's client
/// space.
fn clients(rng: &mut Rng, n: usize) -> Vec<(u32, u16)> {
    (0..n)
        .map(|_| {
            let r = rng.next_u64();
            (
                CLIENT_BASE | (r as u32 & CLIENT_MASK),
                (r >> 32) as u16 | 1024,
            )
        })
        .collect()
}

/// A frame to the service from each client, with TCP `flags`.
fn frames(clients: &[(u32, u16)], flags: u8) -> Vec<MemBuf> {
    clients
        .iter()
        .map(|&(src, port)| {
            let f = tcp_frame(src, port, [192, 0, 2, 10], flags, [2, 0, 0, 0, 0, 0]);
            MemBuf::from_frame(&f)
        })
        .collect()
}

/// One poll, never inlined here, so that callgrind counts the worker's
/// instructions apart from the loop that feeds it.
#[inline(never)]
fn poll(worker: &mut Worker<SharedIo>, now: u64) -> usize {
    worker.poll(now)
}

fn syns(rng: &mut Rng, n: usize) -> Vec<MemBuf> {
    frames(&clients(rng, n), tcp_flags::SYN)
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    let cfg = control_rate::config()?;
    let mut registry = ServiceRegistry::from_config(&cfg).map_err(|e| e.to_string())?;
    let dp = registry.snapshot().map_err(|e| e.to_string())?;
    let owners = dp.services[0].backends.clone();
    let capacity = args.affinities.next_power_of_two();
    // The manager (the writer) stays alive for the run, as in a server.
    let (_manager, reader): (Option<_>, AffinityReader) = match args.table {
        Table::Empty => (None, AffinityTable::new(capacity).1),
        Table::Loaded => {
            let inst = affinity_load::install(capacity, args.affinities, 10_000, 0, &owners, 7)?;
            (Some(inst.manager), inst.reader)
        }
    };
    let shared = Shared {
        dataplane: Arc::new(DataplaneCell::new(dp)),
        affinity: reader,
        auto_affinity: Arc::new(AutoAffinityTable::new(1 << 16)),
        epoch: Instant::now(),
    };
    let plan = PortPlan {
        forward_to: 1,
        gateway_mac: Some([0x02, 0, 0, 0, 0, 0xfe]),
        unmatched_to: None,
        mtu: 1500,
    };
    let flow_capacity = match args.kind {
        Kind::Syn => FLOW_CAPACITY,
        Kind::Established | Kind::SynAgain => (2 * args.packets).next_power_of_two(),
    };
    let timeouts = match args.kind {
        // As the pcap scenarios: far shorter than a pass over the clients.
        Kind::SynAgain => FlowTimeouts {
            syn: Duration::from_millis(20),
            ..FlowTimeouts::default()
        },
        _ => FlowTimeouts::default(),
    };
    let setup = WorkerSetup {
        id: 0,
        ports: vec![plan, plan],
        flow_capacity,
        flow_capacity_v6: FLOW_CAPACITY / 4,
        timeouts,
        syn_flood_rate: args.syn_flood_rate.unwrap_or(match args.kind {
            Kind::Syn => pktdist::datapath::syn_guard::DEFAULT_RATE,
            Kind::Established | Kind::SynAgain => 0,
        }),
        icmp: Default::default(),
    };
    let io: SharedIo = Rc::new(RefCell::new(MemIo::new(2)));
    let mut worker = Worker::new(
        Rc::clone(&io),
        setup,
        shared,
        Arc::new(WorkerCounters::default()),
    );
    let mut rng = Rng::new(0x5171);
    let mut now = 1_000_000_000;
    let (name, measured_frames) = match args.kind {
        Kind::Syn => {
            let warm = syns(&mut rng, 8 * FLOW_CAPACITY);
            feed(&mut worker, &io, warm, &mut now, true);
            ("syns", syns(&mut rng, args.packets))
        }
        Kind::Established => {
            let mut flows = clients(&mut rng, args.packets);
            flows.sort_unstable();
            flows.dedup();
            let warm = frames(&flows, tcp_flags::SYN);
            feed(&mut worker, &io, warm, &mut now, true);
            // The ACKs in another order, as the benchmark sends them.
            for i in (1..flows.len()).rev() {
                flows.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            ("acks", frames(&flows, tcp_flags::ACK))
        }
        Kind::SynAgain => {
            let clients = clients(&mut rng, args.packets);
            feed(
                &mut worker,
                &io,
                frames(&clients, tcp_flags::SYN),
                &mut now,
                true,
            );
            // Past the SYN timeout of every flow opened.
            now += 1_000_000_000;
            ("syns", frames(&clients, tcp_flags::SYN))
        }
    };
    let n = measured_frames.len();
    io.borrow_mut().tx[1].reserve(n);
    let before = worker.counters().services[0].new_connections.get();
    let sent = measured(&mut worker, &io, measured_frames, &mut now);
    if sent != n {
        return Err(format!("{sent} of {n} packets forwarded"));
    }
    let new = worker.counters().services[0].new_connections.get() - before;
    if args.kind != Kind::Established && new != n as u64 {
        return Err(format!("{new} of {n} SYNs opened a connection"));
    }
    let unknown = worker.counters().unknown_flows.get();
    if args.kind == Kind::Established && unknown != 0 {
        return Err(format!("{unknown} ACKs of unknown flows"));
    }
    println!("{name} {n}");
    Ok(())
}
