//! pktdist data-plane benchmark: bare DPDK forwarding and pktdist's full
//! pipeline side by side, in one process, on the same two `net_ring` ports
//! and the same cores. See perf/README.md for what each scenario measures.
//!
//! ```text
//! cargo run --release --example dataplane-bench -- --scenario all --json perf/out/bench.json
//! ```

mod affinity_load;
mod control_rate;
mod feeder;
mod pcap_run;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use pktdist::affinity::table::{AffinityReader, AffinityTable};

use pktdist::affinity::auto::AutoAffinityTable;
use pktdist::control::registry::ServiceRegistry;
use pktdist::datapath::counters::WorkerCounters;
use pktdist::datapath::flow::FlowTimeouts;
use pktdist::datapath::pktio::{PacketIo, MAX_BURST};
use pktdist::datapath::snapshot::DataplaneCell;
use pktdist::datapath::worker::{PortPlan, Shared, Worker, WorkerSetup};
use pktdist::dpdk::{
    spawn_worker, tsc, tsc_hz, Eal, Mbuf, Mempool, Port, PortQueues, PortSetup, QueueDir,
    DEFAULT_DATA_ROOM, SOCKET_ANY,
};
use pktdist::types::tcp_flags;
use pktdist::types::BackendId;
use pktdist::types::DropReason;

use affinity_load::{Installed, LookupStats, CLIENT_BASE, CLIENT_MASK};
use feeder::{
    FeederStats, Progress, Rng, Source, DRAIN, FRAME, MEASURE, STOP, STOP_FEEDER, WARMUP,
};

/// The service's VIP (port 80, TCP) in the benchmark configuration.
const VIP: [u8; 4] = [192, 0, 2, 10];

#[derive(Parser, Debug, Clone)]
#[command(about = "pktdist data-plane and control-plane benchmark")]
struct Args {
    /// Scenarios, comma-separated: all, baseline, established, syn,
    /// syn-affinity, syn-alternating, lookup, control. Data-plane scenarios
    /// always run the baseline too (their ratio is to it); syn-affinity
    /// also runs syn.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    scenario: Vec<String>,
    /// Measured seconds per scenario.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Warm-up seconds before measuring (baseline; SYN floods warm at least
    /// this long and until 4 SYNs per flow-table slot have been sent, so
    /// that the table is full and in its steady state; the established
    /// scenario warms until its flows are in the table).
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Distinct established flows.
    #[arg(long, default_value_t = 1_000_000)]
    flows: usize,
    /// IPv4 flow-table capacity of the worker (rounded up to a multiple of
    /// 4); its IPv6 capacity is a quarter of it.
    #[arg(long, default_value_t = 1 << 21)]
    flow_capacity: usize,
    /// The worker's `[flow] syn_flood_rate` (SYNs per second past which
    /// they go untracked; 0: every SYN tracked). The default is
    /// pktdist's: a SYN flood engages the guard.
    #[arg(long, default_value_t = pktdist::datapath::syn_guard::DEFAULT_RATE)]
    syn_flood_rate: u32,
    /// Affinities installed for syn-affinity and lookup.
    #[arg(long, default_value_t = 1_000_000)]
    affinities: usize,
    /// How many of them are /24s (the rest are /32s).
    #[arg(long, default_value_t = 10_000)]
    affinity_24s: usize,
    /// Affinity-table capacity.
    #[arg(long, default_value_t = 1 << 20)]
    affinity_capacity: usize,
    /// Runs of syn-alternating, each on a table built anew (a new hash seed,
    /// new pages): one run's median turn ratio moves from one run to the
    /// next with them, so the scenario reports the median of the runs.
    /// (pcap-syn-alternating runs once per process: perf/vs_testpmd.py
    /// takes the median of its rounds.)
    #[arg(long, default_value_t = 5)]
    alternating_runs: usize,
    /// Changes per second the control thread applies during syn-affinity
    /// and the loaded lookup run.
    #[arg(long, default_value_t = 100_000)]
    changes_per_sec: u64,
    /// Mbufs in the pool.
    #[arg(long, default_value_t = 16383)]
    mbufs: u32,
    /// MiB of DPDK memory (EAL -m; --no-huge memory unless --hugepages).
    #[arg(long, default_value_t = 512)]
    mem: u32,
    /// DPDK memory on hugepages (reserve them first: scripts/hugepages.sh;
    /// EAL --in-memory) instead of --no-huge memory, as on a real NIC
    /// server.
    #[arg(long)]
    hugepages: bool,
    /// Requests in flight in the control-rate run.
    #[arg(long, default_value_t = 64)]
    control_window: usize,
    /// Capture file replayed by the pcap scenarios (pcap-established,
    /// pcap-syn, pcap-syn-affinity, pcap-syn-alternating: one per run,
    /// not part of `all`), or
    /// written by --write-pcap.
    #[arg(long)]
    pcap: Option<std::path::PathBuf>,
    /// Write the capture file of this kind (established: one ACK per flow,
    /// shuffled; syn: one SYN per random client) with --flows frames to
    /// --pcap, and exit.
    #[arg(long)]
    write_pcap: Option<String>,
}

/// Everything the data-plane scenarios share.
struct Bench {
    args: Args,
    feeder_core: usize,
    worker_core: usize,
    hz: u64,
    pool: Arc<Mempool>,
    input: Arc<Port>,
    output: Arc<Port>,
    cell: Arc<DataplaneCell>,
    owners: Vec<BackendId>,
}

/// What the worker did while measuring.
struct LoopStats {
    packets: u64,
    polls: u64,
    busy_polls: u64,
    busy_cycles: u64,
    cycles: u64,
    /// Per-packet processing time of each non-empty burst, in picoseconds.
    hist: Histogram<u64>,
    /// Worker counters over the measurement (pipeline only).
    counters: Vec<(&'static str, u64)>,
    /// Share of the measurement the worker thread was on a CPU.
    on_cpu: f64,
    /// Packets per second of wall time in each 100 ms window.
    windows: Vec<f64>,
}

/// Length of the windows the rate is also sampled over: on a shared VM the
/// rate moves between a fast and a slow mode as the host schedules other
/// tenants, and the windows show both.
const WINDOW_SECONDS: f64 = 0.1;

/// One worker loop iteration, timed from outside.
trait Step {
    /// Work before the timed part (reading the clock).
    fn prepare(&mut self) {}
    /// The timed part; returns the packets received.
    fn step(&mut self) -> usize;
    /// Counter values to difference over the measurement.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// Gives the queues to `next`, whose turn it is (sides that share
    /// them without handing over do nothing).
    fn hand_over(&mut self, _next: &mut Self) {}
}

/// Bare forwarding: receive a burst on the input, transmit it on the
/// output, free what the output refuses.
struct Baseline {
    io: PortQueues,
    bufs: Vec<Mbuf>,
    tx_full: u64,
}

impl Step for Baseline {
    #[inline]
    fn step(&mut self) -> usize {
        self.io.rx_burst(0, &mut self.bufs);
        let n = self.bufs.len();
        if n > 0 {
            self.io.tx_burst(1, &mut self.bufs);
            self.tx_full += self.bufs.len() as u64;
            self.bufs.clear();
        }
        n
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("tx_full_drops", self.tx_full)]
    }
}

/// pktdist's worker.
struct Pipeline<IO: PacketIo> {
    worker: Worker<IO>,
    now: u64,
}

impl<IO: PacketIo> Step for Pipeline<IO> {
    #[inline]
    fn prepare(&mut self) {
        self.now = self.worker.now_ns();
    }

    #[inline]
    fn step(&mut self) -> usize {
        self.worker.poll(self.now)
    }

    fn hand_over(&mut self, next: &mut Self) {
        std::mem::swap(self.worker.io_mut(), next.worker.io_mut());
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.worker.counters();
        let svc = &c.services[0];
        let t = self.worker.flows().stats();
        vec![
            ("rx_packets", c.rx_packets.get()),
            ("tx_packets", c.tx_packets.get()),
            ("drops", c.total_drops()),
            ("tx_full_drops", c.drops[DropReason::TxFull as usize].get()),
            ("syns", c.syns.get()),
            ("unknown_flows", c.unknown_flows.get()),
            ("flows_evicted", c.flows_evicted.get()),
            ("flows_expired", c.flows_expired.get()),
            ("new_connections", svc.new_connections.get()),
            ("affinity_hits", svc.affinity_hits.get()),
            ("affinity_misses", svc.affinity_misses.get()),
            ("table_evicted", t.evicted),
            ("table_spilled", t.spilled),
            ("table_moved", t.moved),
        ]
    }
}

fn new_hist() -> Histogram<u64> {
    // 1 ps to 100 ms, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

/// Runs the worker loop until the phase says stop, measuring while it says
/// so. With one side, the windows are the rate every [`WINDOW_SECONDS`].
/// With two, the sides take turns of one window each (warm-up included),
/// the side whose turn it is holding the queues, and each side's stats
/// cover its own turns: a turn of one and the neighbouring turns of the
/// other see the machine in the same mode.
fn measure_loop<S: Step>(phase: &AtomicU8, sides: &mut [S], hz: u64) -> Vec<LoopStats> {
    assert!(matches!(sides.len(), 1 | 2), "one or two sides");
    let ps_per_cycle = 1e12 / hz as f64;
    let mut stats: Vec<LoopStats> = sides
        .iter()
        .map(|_| LoopStats {
            packets: 0,
            polls: 0,
            busy_polls: 0,
            busy_cycles: 0,
            cycles: 0,
            hist: new_hist(),
            counters: Vec::new(),
            on_cpu: f64::NAN,
            windows: Vec::new(),
        })
        .collect();
    let window_cycles = (hz as f64 * WINDOW_SECONDS) as u64;
    let (mut window_start, mut window_packets) = (tsc(), 0u64);
    let mut on_cpu = feeder::OnCpu::default();
    let mut measuring = false;
    let mut before = Vec::new();
    let mut turn = 0;
    loop {
        let ph = phase.load(Ordering::Relaxed);
        if ph == MEASURE {
            if !measuring {
                measuring = true;
                before = sides.iter().map(Step::counters).collect();
                // The measured turns start with the first side.
                if turn != 0 {
                    turn = pass_turn(sides, turn);
                }
                on_cpu.start();
                (window_start, window_packets) = (tsc(), 0);
            }
            let (s, st) = (&mut sides[turn], &mut stats[turn]);
            s.prepare();
            let t0 = tsc();
            let n = s.step();
            let t1 = tsc();
            st.polls += 1;
            if n > 0 {
                let c = t1.wrapping_sub(t0);
                st.packets += n as u64;
                st.busy_polls += 1;
                st.busy_cycles += c;
                // Each of the poll's packets took the poll's time over
                // their number (as the worker's own histogram counts them).
                st.hist
                    .saturating_record_n((c as f64 * ps_per_cycle / n as f64) as u64, n as u64);
                window_packets += n as u64;
            }
            let elapsed = t1.wrapping_sub(window_start);
            if elapsed >= window_cycles {
                st.windows
                    .push(window_packets as f64 * hz as f64 / elapsed as f64);
                st.cycles += elapsed;
                (window_start, window_packets) = (t1, 0);
                turn = pass_turn(sides, turn);
            }
        } else {
            if measuring {
                measuring = false;
                stats[turn].cycles += tsc().wrapping_sub(window_start);
                let on_cpu = on_cpu.stop();
                for ((st, s), b) in stats.iter_mut().zip(sides.iter()).zip(&before) {
                    st.on_cpu = on_cpu;
                    st.counters = s
                        .counters()
                        .into_iter()
                        .zip(b)
                        .map(|((k, v), (_, b))| (k, v.wrapping_sub(*b)))
                        .collect();
                }
            }
            if ph >= STOP {
                break;
            }
            let s = &mut sides[turn];
            s.prepare();
            s.step();
            let t = tsc();
            if t.wrapping_sub(window_start) >= window_cycles {
                window_start = t;
                turn = pass_turn(sides, turn);
            }
        }
    }
    stats
}

/// The side whose turn is next, the queues handed to it. A poll leaves
/// nothing queued, so a turn can end between any two polls.
fn pass_turn<S: Step>(sides: &mut [S], turn: usize) -> usize {
    let next = (turn + 1) % sides.len();
    if let [a, b] = sides {
        if turn == 0 {
            a.hand_over(b);
        } else {
            b.hand_over(a);
        }
    }
    next
}

/// Longest warm-up of a SYN flood waiting for its frames (on a busy machine).
const WARM_LIMIT_SECS: u64 = 120;

/// SYNs a SYN flood sends before measuring, per flow-table slot of each
/// worker: a two-choice table fills to its capacity and then loses the
/// flows it placed in alternates while filling, as the least recently
/// seen of their buckets, within about four times its capacity.
const SYN_WARM_PER_SLOT: u64 = 4;

/// How a scenario warms up before measuring.
enum Warm {
    /// This long.
    Time(f64),
    /// At least this long and until this many frames are sent (SYN
    /// floods: until the flow table is full and in its steady state).
    TimeAndFrames(f64, u64),
    /// Until the warm-up frames (one SYN per flow) are sent and then
    /// `cycle` more frames (one ACK per flow), plus a little.
    Flows { cycle: u64 },
}

enum Mode {
    Baseline,
    Pipeline(Shared),
    /// Two pipelines (one per `Shared`) taking turns on the worker core.
    Alternating(Box<[Shared; 2]>),
}

/// One measured row of the table.
#[derive(Clone, Debug)]
struct Row {
    name: String,
    mpps: f64,
    ratio_to_baseline: Option<f64>,
    loop_stats: LoopSummary,
    feeder: FeederStats,
    hz: u64,
    counters: Vec<(&'static str, u64)>,
    extra: Value,
}

#[derive(Clone, Debug)]
struct LoopSummary {
    packets: u64,
    seconds: f64,
    polls: u64,
    busy_polls: u64,
    busy_share: f64,
    on_cpu: f64,
    busy_ns_per_packet: f64,
    /// p50, p90, p99, p99.9, max in ns.
    lat: [f64; 5],
    /// Mean per-packet time of the bursts up to the 99th percentile, in
    /// ns: the cost of a packet without the bursts the OS interrupted.
    trimmed_ns: f64,
    /// Mpps of the 100 ms windows: min, median, 90th percentile, max.
    windows_mpps: [f64; 4],
    /// Mpps of each 100 ms window, in order.
    windows: Vec<f64>,
}

impl Row {
    /// Who limited the rate: the worker (it never found its input empty:
    /// the figure is its capacity), the feeder (both threads had their
    /// cores, yet the worker waited for input), or CPU contention (other
    /// threads took the cores in turns, so the input ring ran empty while
    /// the feeder was descheduled: Mpps/core understates the worker; see
    /// `cap Mpps`). In the affinity scenarios one of those is the
    /// benchmark's own control thread, which shares the feeder's core.
    fn bottleneck(&self) -> &'static str {
        let l = &self.loop_stats;
        if l.busy_share >= 0.9 {
            "worker"
        } else if l.on_cpu >= 0.9 && self.feeder.on_cpu >= 0.9 {
            "feeder"
        } else {
            "cpu-contention"
        }
    }

    /// What the worker core would forward if it were never descheduled and
    /// never waited for input: 1 / trimmed mean per-packet time.
    fn capacity_mpps(&self) -> f64 {
        1e3 / self.loop_stats.trimmed_ns.max(1e-9)
    }

    fn to_json(&self) -> Value {
        let l = &self.loop_stats;
        let f = &self.feeder;
        let fsecs = f.cycles as f64 / self.hz as f64;
        json!({
            "scenario": self.name,
            "mpps_per_core": self.mpps,
            "ratio_to_baseline": self.ratio_to_baseline,
            "ns_per_packet": 1e3 / self.mpps.max(1e-9),
            "capacity_mpps": self.capacity_mpps(),
            "trimmed_mean_ns_per_packet": l.trimmed_ns,
            "busy_ns_per_packet": l.busy_ns_per_packet,
            "latency_ns": {
                "p50": l.lat[0], "p90": l.lat[1], "p99": l.lat[2], "p99_9": l.lat[3], "max": l.lat[4],
            },
            "bottleneck": self.bottleneck(),
            "window_mpps": {
                "seconds": WINDOW_SECONDS,
                "min": l.windows_mpps[0], "median": l.windows_mpps[1], "p90": l.windows_mpps[2], "max": l.windows_mpps[3],
                "values": l.windows,
            },
            "worker": {
                "packets": l.packets,
                "seconds": l.seconds,
                "polls": l.polls,
                "busy_polls": l.busy_polls,
                "busy_share": l.busy_share,
                "on_cpu_share": l.on_cpu,
                "packets_per_busy_poll": l.packets as f64 / l.busy_polls.max(1) as f64,
                "counters": self.counters.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            },
            "feeder": {
                "offered_mpps": f.sent as f64 / fsecs.max(1e-9) / 1e6,
                "bursts": f.bursts,
                "bursts_refused_by_full_ring": f.bursts_full,
                "full_ring_share": f.full_share(),
                "no_mbuf": f.no_mbuf,
                "on_cpu_share": f.on_cpu,
                "drained": f.drained,
            },
            "extra": self.extra,
        })
    }
}

fn summarize(st: &LoopStats, hz: u64) -> LoopSummary {
    let seconds = st.cycles as f64 / hz as f64;
    let q = |p: f64| st.hist.value_at_quantile(p) as f64 / 1000.0;
    let p99 = st.hist.value_at_quantile(0.99);
    let (mut sum, mut count) = (0f64, 0u64);
    for v in st.hist.iter_recorded() {
        if v.value_iterated_to() <= p99 {
            sum += v.value_iterated_to() as f64 * v.count_at_value() as f64;
            count += v.count_at_value();
        }
    }
    let trimmed_ns = sum / count.max(1) as f64 / 1000.0;
    let mut w: Vec<f64> = st.windows.iter().map(|r| r / 1e6).collect();
    w.sort_by(f64::total_cmp);
    let wq = |p: f64| quantile(&w, p);
    LoopSummary {
        packets: st.packets,
        seconds,
        polls: st.polls,
        busy_polls: st.busy_polls,
        busy_share: st.busy_cycles as f64 / st.cycles.max(1) as f64,
        on_cpu: st.on_cpu,
        busy_ns_per_packet: st.busy_cycles as f64 * 1e9 / hz as f64 / st.packets.max(1) as f64,
        lat: [
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            st.hist.max() as f64 / 1000.0,
        ],
        trimmed_ns,
        windows_mpps: [wq(0.0), wq(0.5), wq(0.9), wq(1.0)],
        windows: st.windows.iter().map(|r| r / 1e6).collect(),
    }
}

/// The EAL's arguments: `mem` MiB on hugepages or `--no-huge` memory,
/// no PCI, no files shared with other processes, the main lcore on `core`.
fn eal_args(hugepages: bool, mem: u32, core: usize) -> Vec<String> {
    let memory: &[&str] = if hugepages {
        // No hugepage files left behind, nothing shared.
        &["--in-memory"]
    } else {
        &["--no-huge", "--no-shconf"]
    };
    let mem = mem.to_string();
    let core = core.to_string();
    let rest = [
        "-m",
        &mem,
        "--no-pci",
        "--no-telemetry",
        "-l",
        &core,
        "--log-level",
        "lib.eal:error",
    ];
    memory.iter().chain(&rest).map(|s| s.to_string()).collect()
}

impl Bench {
    fn setup(args: Args) -> Result<Bench, String> {
        let cores: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect();
        if cores.len() < 2 {
            return Err(format!(
                "needs two cores (feeder and worker), this process may use {cores:?}"
            ));
        }
        let (feeder_core, worker_core) = (cores[0], cores[1]);
        let eal_args = eal_args(args.hugepages, args.mem, feeder_core);
        Eal::init(&eal_args).map_err(|e| format!("EAL {eal_args:?}: {e}"))?;
        let pool = Mempool::new("bench", args.mbufs, 256, DEFAULT_DATA_ROOM, SOCKET_ANY)
            .map_err(|e| format!("mempool: {e}"))?;
        let conf = PortSetup::default();
        let input = Arc::new(
            Port::open("net_ring0", &conf, Arc::clone(&pool))
                .map_err(|e| format!("net_ring0: {e}"))?,
        );
        let output = Arc::new(
            Port::open("net_ring1", &conf, Arc::clone(&pool))
                .map_err(|e| format!("net_ring1: {e}"))?,
        );
        let cfg = control_rate::config()?;
        let mut registry = ServiceRegistry::from_config(&cfg).map_err(|e| e.to_string())?;
        let dp = registry.snapshot().map_err(|e| e.to_string())?;
        let owners = dp.services[0].backends.clone();
        let cell = Arc::new(DataplaneCell::new(dp));
        Ok(Bench {
            args,
            feeder_core,
            worker_core,
            hz: tsc_hz(),
            pool,
            input,
            output,
            cell,
            owners,
        })
    }

    fn shared(&self, affinity: AffinityReader) -> Shared {
        Shared {
            dataplane: Arc::clone(&self.cell),
            affinity,
            auto_affinity: Arc::new(AutoAffinityTable::new(1 << 16)),
            epoch: Instant::now(),
        }
    }

    /// Runs one data-plane scenario: one row.
    fn run(
        &self,
        name: &str,
        mode: Mode,
        source: Source,
        warm: Warm,
        phase: Arc<AtomicU8>,
    ) -> Result<Row, String> {
        let mut rows = self.run_sides(&[name], mode, source, warm, phase)?;
        rows.pop().ok_or_else(|| "no row measured".to_string())
    }

    /// Runs one data-plane scenario, a row per side (`names`: one, or two
    /// for [`Mode::Alternating`]). `phase` is shared with whatever else
    /// runs during the scenario (the control thread's churn).
    fn run_sides(
        &self,
        names: &[&str],
        mode: Mode,
        source: Source,
        warm: Warm,
        phase: Arc<AtomicU8>,
    ) -> Result<Vec<Row>, String> {
        phase.store(WARMUP, Ordering::SeqCst);
        let worker_io = PortQueues::new(vec![
            self.input
                .queue_dir(0, QueueDir::Rx)
                .map_err(|e| e.to_string())?,
            self.output
                .queue_dir(0, QueueDir::Tx)
                .map_err(|e| e.to_string())?,
        ]);
        // The established scenario opens its flows with a flood of SYNs
        // in the warm-up: tracked, as the flows it then measures.
        let syn_flood_rate = match warm {
            Warm::Flows { .. } => 0,
            _ => self.args.syn_flood_rate,
        };
        let ready = Arc::new(AtomicBool::new(false));
        let (r2, p2, hz) = (Arc::clone(&ready), Arc::clone(&phase), self.hz);
        let setup = WorkerSetup {
            id: 0,
            ports: vec![
                PortPlan {
                    forward_to: 1,
                    gateway_mac: Some([0x02, 0, 0, 0, 0, 0xfe]),
                    unmatched_to: None,
                    mtu: 1500,
                },
                PortPlan {
                    forward_to: 1,
                    gateway_mac: Some([0x02, 0, 0, 0, 0, 0xfe]),
                    unmatched_to: None,
                    mtu: 1500,
                },
            ],
            flow_capacity: self.args.flow_capacity,
            flow_capacity_v6: self.args.flow_capacity / 4,
            syn_flood_rate,
            timeouts: FlowTimeouts::default(),
            icmp: Default::default(),
        };
        let worker = spawn_worker(self.worker_core, "bench-worker", move || match mode {
            Mode::Baseline => {
                let mut s = Baseline {
                    io: worker_io,
                    bufs: Vec::with_capacity(MAX_BURST),
                    tx_full: 0,
                };
                r2.store(true, Ordering::SeqCst);
                measure_loop(&p2, std::slice::from_mut(&mut s), hz)
            }
            Mode::Pipeline(shared) => {
                let counters = Arc::new(WorkerCounters::default());
                let mut s = Pipeline {
                    worker: Worker::new(worker_io, setup, shared, counters),
                    now: 0,
                };
                r2.store(true, Ordering::SeqCst);
                measure_loop(&p2, std::slice::from_mut(&mut s), hz)
            }
            Mode::Alternating(shared) => {
                let counters = [(); 2].map(|()| Arc::new(WorkerCounters::default()));
                let mut sides = alternating_sides(worker_io, &setup, *shared, counters);
                r2.store(true, Ordering::SeqCst);
                measure_loop(&p2, &mut sides, hz)
            }
        })
        .map_err(|e| format!("worker: {e}"))?;
        while !ready.load(Ordering::SeqCst) {
            if worker.is_finished() {
                return Err("worker ended during set-up".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }

        let feeder_io = PortQueues::new(vec![
            self.input
                .queue_dir(0, QueueDir::Tx)
                .map_err(|e| e.to_string())?,
            self.output
                .queue_dir(0, QueueDir::Rx)
                .map_err(|e| e.to_string())?,
        ]);
        let progress = Arc::new(Progress::default());
        let (pool, p3, pr) = (
            Arc::clone(&self.pool),
            Arc::clone(&phase),
            Arc::clone(&progress),
        );
        let feeder = spawn_worker(self.feeder_core, "bench-feeder", move || {
            feeder::run(feeder_io, pool, source, &p3, &pr)
        })
        .map_err(|e| format!("feeder: {e}"))?;

        let warm_started = Instant::now();
        match warm {
            Warm::Time(s) => std::thread::sleep(Duration::from_secs_f64(s)),
            Warm::TimeAndFrames(s, frames) => {
                std::thread::sleep(Duration::from_secs_f64(s));
                while progress.sent.load(Ordering::Relaxed) < frames
                    && warm_started.elapsed() < Duration::from_secs(WARM_LIMIT_SECS)
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Warm::Flows { cycle } => {
                while !progress.warm_sent.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                    if warm_started.elapsed() > Duration::from_secs(120) {
                        break;
                    }
                }
                let base = progress.sent.load(Ordering::Relaxed);
                while progress.sent.load(Ordering::Relaxed) < base + cycle {
                    std::thread::sleep(Duration::from_millis(10));
                    if warm_started.elapsed() > Duration::from_secs(240) {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let warm_secs = warm_started.elapsed().as_secs_f64();
        phase.store(MEASURE, Ordering::SeqCst);
        std::thread::sleep(Duration::from_secs_f64(self.args.seconds));
        phase.store(DRAIN, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        phase.store(STOP, Ordering::SeqCst);
        let stats = worker.join().map_err(|_| "worker panicked".to_string())?;
        phase.store(STOP_FEEDER, Ordering::SeqCst);
        let fst = feeder.join().map_err(|_| "feeder panicked".to_string())?;
        Ok(names
            .iter()
            .zip(stats)
            .map(|(name, st)| {
                let summary = summarize(&st, self.hz);
                Row {
                    name: name.to_string(),
                    mpps: summary.packets as f64 / summary.seconds.max(1e-9) / 1e6,
                    ratio_to_baseline: None,
                    loop_stats: summary,
                    feeder: fst,
                    hz: self.hz,
                    counters: st.counters,
                    extra: json!({ "warmup_seconds": warm_secs }),
                }
            })
            .collect())
    }

    fn baseline(&self) -> Result<Row, String> {
        let src = Source::random_syn(VIP, self.input.mac(), CLIENT_BASE, CLIENT_MASK, 1);
        self.run(
            "baseline",
            Mode::Baseline,
            src,
            Warm::Time(self.args.warmup),
            Arc::new(AtomicU8::new(WARMUP)),
        )
    }

    fn established(&self) -> Result<Row, String> {
        let n = self.args.flows.min(CLIENT_MASK as usize + 1);
        let built = Instant::now();
        let mut rng = Rng::new(0xe57ab);
        let mut order: Vec<u32> = (0..n as u32).collect();
        let mac = self.input.mac();
        let frames = |order: &[u32], flags: u8| -> Arc<Vec<u8>> {
            let mut v = Vec::with_capacity(order.len() * FRAME);
            for &i in order {
                let sport = 1024 + (i.wrapping_mul(2_654_435_761) >> 16) as u16 % 60000;
                v.extend_from_slice(&feeder::tcp_frame(CLIENT_BASE | i, sport, VIP, flags, mac));
            }
            Arc::new(v)
        };
        rng.shuffle(&mut order);
        let syns = frames(&order, tcp_flags::SYN);
        rng.shuffle(&mut order);
        let acks = frames(&order, tcp_flags::ACK);
        drop(order);
        let build_secs = built.elapsed().as_secs_f64();
        let empty = AffinityTable::new(self.args.affinity_capacity).1;
        let mut row = self.run(
            "established",
            Mode::Pipeline(self.shared(empty)),
            Source::templates(syns, acks),
            Warm::Flows { cycle: n as u64 },
            Arc::new(AtomicU8::new(WARMUP)),
        )?;
        row.extra["flows"] = json!(n);
        row.extra["frames_build_seconds"] = json!(build_secs);
        Ok(row)
    }

    /// The warm-up of a SYN flood through `tables` flow tables (taking
    /// turns): `--warmup` seconds and [`SYN_WARM_PER_SLOT`] SYNs per slot.
    fn syn_warm(&self, tables: u64) -> Warm {
        let slots = self.args.flow_capacity as u64;
        Warm::TimeAndFrames(self.args.warmup, tables * SYN_WARM_PER_SLOT * slots)
    }

    /// Every frame a SYN from a new random client.
    fn syn_source(&self) -> Source {
        Source::random_syn(VIP, self.input.mac(), CLIENT_BASE, CLIENT_MASK, 0x5171)
    }

    fn syn(
        &self,
        name: &str,
        affinity: AffinityReader,
        phase: Arc<AtomicU8>,
    ) -> Result<Row, String> {
        self.run(
            name,
            Mode::Pipeline(self.shared(affinity)),
            self.syn_source(),
            self.syn_warm(1),
            phase,
        )
    }

    /// Runs `measure` while a control thread on the feeder's core applies
    /// the configured changes per second to the installed table, and
    /// describes the table in the last row (the one measured with it).
    /// Hands the table back for the next scenario.
    fn under_churn(
        &self,
        inst: Installed,
        measure: impl FnOnce(AffinityReader, Arc<AtomicU8>) -> Result<Vec<Row>, String>,
    ) -> Result<(Vec<Row>, Installed), String> {
        let phase = Arc::new(AtomicU8::new(WARMUP));
        let reader = inst.reader.clone();
        let (coverage, n24, build) = (inst.coverage, inst.n24, inst.build_secs);
        let control = affinity_load::churn(
            inst,
            self.args.changes_per_sec,
            self.owners.clone(),
            0,
            Arc::clone(&phase),
            self.feeder_core,
        )?;
        let rows = measure(reader, Arc::clone(&phase));
        phase.store(STOP_FEEDER, Ordering::SeqCst);
        let (inst, churn) = control
            .join()
            .map_err(|_| "control thread panicked".to_string())?;
        let mut rows = rows?;
        let row = rows.last_mut().ok_or("no row measured")?;
        let hits = counter(&row.counters, "affinity_hits");
        let misses = counter(&row.counters, "affinity_misses");
        row.extra["affinities"] = json!(inst.manager.len());
        row.extra["affinity_24s"] = json!(n24);
        row.extra["client_space_covered"] = json!(coverage);
        row.extra["affinity_hit_share"] = json!(hits as f64 / (hits + misses).max(1) as f64);
        row.extra["install_seconds"] = json!(build);
        row.extra["control_changes_per_sec"] = json!(churn.rate());
        row.extra["control_changes_refused"] = json!(churn.refused);
        Ok((rows, inst))
    }

    /// SYN flood with the affinity table loaded and the control thread
    /// changing it (after `syn`, its reference).
    fn syn_affinity(&self, inst: Installed) -> Result<(Row, Installed), String> {
        let (mut rows, inst) = self.under_churn(inst, |reader, phase| {
            Ok(vec![self.syn("syn-1m-affinities", reader, phase)?])
        })?;
        let row = rows.pop().ok_or("no row measured")?;
        Ok((row, inst))
    }

    /// The same SYN flood by an empty-table worker and a loaded-table
    /// worker taking turns of 100 ms on the worker core, the control
    /// thread changing the loaded table throughout: the ratio of
    /// neighbouring turns does not depend on the machine's mode switches,
    /// which a ratio of two runs seconds apart does.
    fn syn_alternating(&self, inst: Installed) -> Result<(Vec<Row>, Installed), String> {
        let empty = AffinityTable::new(self.args.affinity_capacity).1;
        let (mut rows, inst) = self.under_churn(inst, |loaded, phase| {
            self.run_sides(
                &["syn-alt-empty", "syn-alt-1m-affinities"],
                Mode::Alternating(Box::new([self.shared(empty), self.shared(loaded)])),
                self.syn_source(),
                self.syn_warm(2),
                phase,
            )
        })?;
        let turns = turn_ratios_json(&rows[0].loop_stats.windows, &rows[1].loop_stats.windows);
        let overall = rows[1].mpps / rows[0].mpps.max(1e-9);
        rows[1].extra["ratio_to_empty"] = json!(overall);
        rows[1].extra["turn_ratios"] = turns;
        Ok((rows, inst))
    }
}

/// Two workers on the same queues, taking turns ([`measure_loop`] with two
/// sides): one per `shared`, in that order, each with a flow table of its
/// own and the counters given. Each is the loop `pktdist run` runs, a
/// worker over [`PortQueues`]: the side whose turn it is holds the
/// queues, and hands them to the other at the end of its turn (the other
/// holds queues of no port meanwhile, and is not polled).
fn alternating_sides(
    io: PortQueues,
    setup: &WorkerSetup,
    shared: [Shared; 2],
    counters: [Arc<WorkerCounters>; 2],
) -> [Pipeline<PortQueues>; 2] {
    let mut pairs = shared.into_iter().zip(counters);
    let mut io = Some(io);
    let mut sides = [(); 2].map(|()| {
        let (shared, counters) = pairs.next().expect("two sides");
        // Each worker is made over the queues themselves (it sizes its
        // per-port state by them), then gives them back.
        let mut worker = Worker::new(io.take().expect("queues"), setup.clone(), shared, counters);
        io = Some(std::mem::replace(
            worker.io_mut(),
            PortQueues::new(Vec::new()),
        ));
        Pipeline { worker, now: 0 }
    });
    // The first side's turn comes first.
    *sides[0].worker.io_mut() = io.take().expect("queues");
    sides
}

/// The `turn_ratios` of alternating turns (rates per window, empty side
/// first): count, p10, median and p90 of [`neighbour_ratios`].
fn turn_ratios_json(empty: &[f64], loaded: &[f64]) -> Value {
    let ratios = neighbour_ratios(empty, loaded);
    let q = |p: f64| quantile(&ratios, p);
    json!({
        "count": ratios.len(),
        "p10": q(0.1),
        "median": q(0.5),
        "p90": q(0.9),
    })
}

/// Each loaded turn's rate over the mean of its neighbouring empty turns
/// (turns go empty, loaded, empty, loaded, ...), sorted.
fn neighbour_ratios(empty: &[f64], loaded: &[f64]) -> Vec<f64> {
    let mut r: Vec<f64> = loaded
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let before = *empty.get(i)?;
            let reference = empty
                .get(i + 1)
                .map_or(before, |after| (before + after) / 2.0);
            (reference > 0.0).then(|| l / reference)
        })
        .collect();
    r.sort_by(f64::total_cmp);
    r
}

/// The `p` quantile of sorted values (NaN if none).
fn quantile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

fn counter(c: &[(&'static str, u64)], name: &str) -> u64 {
    c.iter().find(|(k, _)| *k == name).map_or(0, |(_, v)| *v)
}

fn install(args: &Args, owners: &[BackendId]) -> Result<Installed, String> {
    eprintln!(
        "bench: installing {} affinities ({} /24s) ...",
        args.affinities, args.affinity_24s
    );
    let inst = affinity_load::install(
        args.affinity_capacity,
        args.affinities,
        args.affinity_24s,
        0,
        owners,
        0xaff1,
    )?;
    eprintln!(
        "bench: {} affinities in {:.1} s, covering {:.1}% of the client space",
        inst.manager.len(),
        inst.build_secs,
        inst.coverage * 100.0
    );
    Ok(inst)
}

/// The lookup benchmark: empty table; loaded; loaded with the control
/// thread changing it.
fn lookup_bench(
    args: &Args,
    inst: Installed,
    owners: &[BackendId],
    cores: (usize, usize),
) -> Result<(Value, Installed), String> {
    let secs = args.seconds.min(2.0);
    let (ctl_core, look_core) = cores;
    let empty = AffinityTable::new(args.affinity_capacity).1;
    let e = lookup_stats_json(affinity_load::lookup_loop(empty, 0, secs, look_core)?);
    let l = lookup_stats_json(affinity_load::lookup_loop(
        inst.reader.clone(),
        0,
        secs,
        look_core,
    )?);
    let phase = Arc::new(AtomicU8::new(MEASURE));
    let reader = inst.reader.clone();
    let control = affinity_load::churn(
        inst,
        args.changes_per_sec,
        owners.to_vec(),
        0,
        Arc::clone(&phase),
        ctl_core,
    )?;
    let loaded = affinity_load::lookup_loop(reader, 0, secs, look_core);
    phase.store(STOP, Ordering::SeqCst);
    let (inst, churn) = control
        .join()
        .map_err(|_| "control thread panicked".to_string())?;
    let mut w = lookup_stats_json(loaded?);
    w["control_changes_per_sec"] = json!(churn.rate());
    Ok((
        json!({
            "affinities": inst.manager.len(),
            "empty": e,
            "loaded": l,
            "loaded_with_writer": w,
        }),
        inst,
    ))
}

fn lookup_stats_json(s: LookupStats) -> Value {
    json!({
        "lookups": s.lookups,
        "hit_share": s.hits as f64 / s.lookups.max(1) as f64,
        "ns_per_lookup": s.ns_per_lookup,
    })
}

/// `YYYY-MM-DD HH:MM:SS UTC` from the system clock.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cores = core_affinity::get_core_ids().map_or(0, |c| c.len());
    json!({ "cpu": cpu, "cores": cores, "kernel": kernel, "tsc_hz": tsc_hz() })
}

// The column titles are literals on purpose: they line up with the rows.
#[allow(clippy::print_literal)]
fn print_rows(rows: &[Row]) {
    let base_cap = rows
        .iter()
        .find(|r| r.name == "baseline")
        .map(Row::capacity_mpps);
    println!();
    println!(
        "{:<21} {:>9} {:>7} {:>7} {:>8} {:>7} {:>7} {:>7} {:>7} {:>8} {:>6} {:>8}  {}",
        "scenario",
        "Mpps/core",
        "x base",
        "ns/pkt",
        "cap Mpps",
        "x base",
        "p50 ns",
        "p99 ns",
        "p99.9",
        "max ns",
        "busy%",
        "cpu w/f%",
        "bottleneck"
    );
    for r in rows {
        let l = &r.loop_stats;
        println!(
            "{:<21} {:>9.2} {:>7} {:>7.1} {:>8.2} {:>7} {:>7.1} {:>7.1} {:>7.1} {:>8.0} {:>6.1} {:>8}  {}",
            r.name,
            r.mpps,
            r.ratio_to_baseline
                .map_or("-".to_string(), |x| format!("{x:.2}")),
            1e3 / r.mpps.max(1e-9),
            r.capacity_mpps(),
            base_cap.map_or("-".to_string(), |b| format!("{:.2}", r.capacity_mpps() / b.max(1e-9))),
            l.lat[0],
            l.lat[2],
            l.lat[3],
            l.lat[4],
            l.busy_share * 100.0,
            format!("{:.0}/{:.0}", l.on_cpu * 100.0, r.feeder.on_cpu * 100.0),
            r.bottleneck()
        );
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = real_main(args) {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}

fn real_main(args: Args) -> Result<(), String> {
    if let Some(kind) = &args.write_pcap {
        let path = args.pcap.as_ref().ok_or("--write-pcap needs --pcap FILE")?;
        pcap_run::write(kind, path, args.flows)?;
        eprintln!(
            "bench: wrote {} ({kind}, {} frames)",
            path.display(),
            args.flows
        );
        return Ok(());
    }
    const PCAP: [&str; 4] = [
        "pcap-established",
        "pcap-syn",
        "pcap-syn-affinity",
        "pcap-syn-alternating",
    ];
    if let Some(name) = args.scenario.iter().find(|s| PCAP.contains(&s.as_str())) {
        if args.scenario.len() != 1 {
            return Err(format!("{name} runs alone (one pcap scenario per run)"));
        }
        let command: Vec<String> = std::env::args().collect();
        let date = utc_now();
        eprintln!("bench: {date}, {}", command.join(" "));
        let (row, setup) = pcap_run::run(&args, name)?;
        print_rows(std::slice::from_ref(&row));
        let out = json!({
            "date": date,
            "command": command.join(" "),
            "machine": machine(),
            "seconds_per_scenario": args.seconds,
            "pcap_setup": setup,
            "scenarios": [row.to_json()],
        });
        if let Some(path) = &args.json {
            let text = serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?;
            std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
        }
        return Ok(());
    }
    const ALL: [&str; 7] = [
        "baseline",
        "established",
        "syn",
        "syn-affinity",
        "syn-alternating",
        "lookup",
        "control",
    ];
    let mut want: Vec<&str> = Vec::new();
    for s in &args.scenario {
        match s.as_str() {
            "all" => want.extend(ALL),
            s if ALL.contains(&s) => want.push(ALL[ALL.iter().position(|a| *a == s).unwrap_or(0)]),
            other => {
                return Err(format!(
                    "unknown scenario {other:?} (one of all, {})",
                    ALL.join(", ")
                ))
            }
        }
    }
    let has = |s: &str| want.contains(&s);
    let dataplane = has("baseline")
        || has("established")
        || has("syn")
        || has("syn-affinity")
        || has("syn-alternating");
    let command: Vec<String> = std::env::args().collect();
    let date = utc_now();
    eprintln!("bench: {date}, {}", command.join(" "));

    let mut out = json!({
        "date": date,
        "command": command.join(" "),
        "machine": machine(),
        "seconds_per_scenario": args.seconds,
        "scenarios": [],
    });
    let mut rows: Vec<Row> = Vec::new();
    let mut installed: Option<Installed> = None;
    let cores: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let (core_a, core_b) = match cores.as_slice() {
        [a, b, ..] => (*a, *b),
        _ => return Err(format!("needs two cores, this process may use {cores:?}")),
    };
    let owners_from_cfg = || -> Result<Vec<BackendId>, String> {
        let cfg = control_rate::config()?;
        let mut r = ServiceRegistry::from_config(&cfg).map_err(|e| e.to_string())?;
        Ok(r.snapshot().map_err(|e| e.to_string())?.services[0]
            .backends
            .clone())
    };

    if dataplane {
        let bench = Bench::setup(args.clone())?;
        eprintln!(
            "bench: feeder on core {}, worker on core {}, TSC {:.3} GHz",
            bench.feeder_core,
            bench.worker_core,
            bench.hz as f64 / 1e9
        );
        eprintln!("bench: baseline (rx burst -> tx burst, no work) ...");
        let base = bench.baseline()?;
        let base_mpps = base.mpps;
        rows.push(base);
        if has("established") {
            eprintln!("bench: established ({} flows) ...", args.flows);
            rows.push(bench.established()?);
        }
        let mut syn_mpps = None;
        if has("syn") || has("syn-affinity") {
            eprintln!("bench: syn (empty affinity table) ...");
            let empty = AffinityTable::new(args.affinity_capacity).1;
            let row = bench.syn("syn", empty, Arc::new(AtomicU8::new(WARMUP)))?;
            syn_mpps = Some((row.mpps, row.capacity_mpps()));
            rows.push(row);
        }
        if has("syn-affinity") {
            let inst = install(&args, &bench.owners)?;
            eprintln!(
                "bench: syn-1m-affinities (control thread: {} changes/s) ...",
                args.changes_per_sec
            );
            let (mut row, inst) = bench.syn_affinity(inst)?;
            if let Some((s, cap)) = syn_mpps {
                row.extra["ratio_to_syn"] = json!(row.mpps / s.max(1e-9));
                row.extra["capacity_ratio_to_syn"] = json!(row.capacity_mpps() / cap.max(1e-9));
            }
            rows.push(row);
            installed = Some(inst);
        }
        if has("syn-alternating") {
            let mut inst = match installed.take() {
                Some(i) => i,
                None => install(&args, &bench.owners)?,
            };
            // Each run's rows and median turn ratio; the table is built anew
            // for every run after the first.
            let mut runs: Vec<(Vec<Row>, f64)> = Vec::new();
            for run in 0..args.alternating_runs.max(1) {
                if run > 0 {
                    drop(inst);
                    inst = install(&args, &bench.owners)?;
                }
                eprintln!(
                    "bench: syn-alternating, run {} of {} (empty and loaded tables in turns of {} ms; control thread: {} changes/s) ...",
                    run + 1,
                    args.alternating_runs.max(1),
                    WINDOW_SECONDS * 1e3,
                    args.changes_per_sec
                );
                let (alt, back) = bench.syn_alternating(inst)?;
                inst = back;
                let median = alt
                    .iter()
                    .find_map(|r| r.extra["turn_ratios"]["median"].as_f64())
                    .unwrap_or(f64::NAN);
                runs.push((alt, median));
            }
            let medians: Vec<f64> = runs.iter().map(|(_, m)| *m).collect();
            let mut sorted = medians.clone();
            sorted.sort_by(f64::total_cmp);
            let median_of_runs = sorted[sorted.len() / 2];
            // The rows shown are the median run's.
            let (mut alt, _) = runs.swap_remove(
                medians
                    .iter()
                    .position(|m| m.total_cmp(&median_of_runs).is_eq())
                    .unwrap_or(0),
            );
            if let Some(loaded) = alt.iter_mut().find(|r| r.name == "syn-alt-1m-affinities") {
                loaded.extra["turn_ratio_runs"] = json!(medians);
                loaded.extra["turn_ratios"]["median_of_runs"] = json!(median_of_runs);
            }
            rows.extend(alt);
            installed = Some(inst);
        }
        for r in rows.iter_mut() {
            r.ratio_to_baseline = Some(r.mpps / base_mpps.max(1e-9));
        }
        out["scenarios"] = Value::Array(rows.iter().map(Row::to_json).collect());
        print_rows(&rows);
        if let (Some(s), Some(a)) = (
            rows.iter().find(|r| r.name == "syn"),
            rows.iter().find(|r| r.name == "syn-1m-affinities"),
        ) {
            println!(
                "\nsyn with {} affinities / syn with an empty table: {:.2} in Mpps/core, {:.2} in cap Mpps; control thread applied {:.0} changes/s; {:.1}% of SYNs matched an affinity",
                a.extra["affinities"],
                a.mpps / s.mpps.max(1e-9),
                a.capacity_mpps() / s.capacity_mpps().max(1e-9),
                a.extra["control_changes_per_sec"].as_f64().unwrap_or(0.0),
                a.extra["affinity_hit_share"].as_f64().unwrap_or(0.0) * 100.0
            );
        }
        if let Some(a) = rows.iter().find(|r| r.name == "syn-alt-1m-affinities") {
            let t = &a.extra["turn_ratios"];
            let g = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
            let runs: Vec<String> = (a.extra["turn_ratio_runs"].as_array())
                .map(|v| v.iter().map(|m| format!("{:.2}", g(m))).collect())
                .unwrap_or_default();
            println!(
                "\nsyn with {} affinities / syn with an empty table, in alternating 100 ms turns: {:.2}, the median of {} runs' median turn ratios ({}; the 0.85 target is judged on the testpmd runs' devices, perf/vs_testpmd.py --scenario syn-alternating). The median run: {:.2} median of {} neighbouring-turn ratios (p10 {:.2}, p90 {:.2}), {:.2} over all turns; {:.1}% of SYNs matched an affinity",
                a.extra["affinities"],
                g(&t["median_of_runs"]),
                runs.len(),
                runs.join(", "),
                g(&t["median"]),
                t["count"],
                g(&t["p10"]),
                g(&t["p90"]),
                g(&a.extra["ratio_to_empty"]),
                g(&a.extra["affinity_hit_share"]) * 100.0
            );
        }
        for r in &rows {
            match r.bottleneck() {
                "feeder" => println!(
                    "note: {}: the feeder, not the worker, was the bottleneck (worker busy {:.0}% with both threads on their cores): its Mpps is a lower bound of the worker's capacity",
                    r.name,
                    r.loop_stats.busy_share * 100.0
                ),
                "cpu-contention" => println!(
                    "note: {}: other processes took the cores (worker on a CPU {:.0}% of the time, feeder {:.0}%); the worker was busy {:.0}% and waited for input the rest: Mpps/core understates it, cap Mpps is its rate with a full input ring",
                    r.name,
                    r.loop_stats.on_cpu * 100.0,
                    r.feeder.on_cpu * 100.0,
                    r.loop_stats.busy_share * 100.0
                ),
                _ => {}
            }
        }
    }

    if has("lookup") {
        let owners = owners_from_cfg()?;
        let inst = match installed.take() {
            Some(i) => i,
            None => install(&args, &owners)?,
        };
        eprintln!("bench: affinity lookups ...");
        let (v, inst) = lookup_bench(&args, inst, &owners, (core_a, core_b))?;
        println!(
            "\naffinity lookup, ns each: empty table {:.1}; {} entries {:.1} (hits {:.1}%); {} entries with the control thread at {:.0} changes/s {:.1}",
            v["empty"]["ns_per_lookup"].as_f64().unwrap_or(0.0),
            v["affinities"],
            v["loaded"]["ns_per_lookup"].as_f64().unwrap_or(0.0),
            v["loaded"]["hit_share"].as_f64().unwrap_or(0.0) * 100.0,
            v["affinities"],
            v["loaded_with_writer"]["control_changes_per_sec"].as_f64().unwrap_or(0.0),
            v["loaded_with_writer"]["ns_per_lookup"].as_f64().unwrap_or(0.0),
        );
        out["lookup"] = v;
        drop(inst);
    }

    if has("control") {
        eprintln!("bench: control-plane rate ...");
        let c = control_rate::run(args.seconds, args.control_window, core_b, core_a)?;
        println!(
            "\ncontrol plane: {:.0} requests/s answered (target >= 100000): {} replies in {:.2} s, {} OK, {} other codes, {} lost; {} creates, {} extends; window {}",
            c.rate(),
            c.replies,
            c.seconds,
            c.ok,
            c.other_codes,
            c.lost,
            c.creates,
            c.extends,
            c.window
        );
        out["control"] = json!({
            "requests_per_sec": c.rate(),
            "replies": c.replies,
            "ok": c.ok,
            "other_codes": c.other_codes,
            "lost": c.lost,
            "seconds": c.seconds,
            "creates": c.creates,
            "extends": c.extends,
            "window": c.window,
            "affinities_at_end": c.affinities_at_end,
        });
    }

    if let Some(path) = &args.json {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
        }
        let text = serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}
