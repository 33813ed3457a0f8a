//! pktdist on the frames and devices `dpdk-testpmd` forwards, for a side by
//! side with it (`perf/vs_testpmd.py`): the worker receives from a
//! `net_pcap` port replaying a capture file forever (`infinite_rx=1`) and
//! transmits to a `net_null` port that discards (`no-rx=1`), on the same
//! core testpmd forwards on. One scenario per process (EAL starts once per
//! process, with that scenario's file).
//!
//! The capture files come from this program too (`--write-pcap`):
//!
//! * `established`: one ACK for each of `--flows` flows, in a shuffled
//!   order. pktdist learns each flow from its first ACK (an unknown flow,
//!   routed by the consistent hash), so the measurement starts once every
//!   frame has been received twice; the unknown-flow share measured is the
//!   share of packets whose flow the table did not keep.
//! * `syn`: `--flows` SYNs from random clients. The file recurs, so to make
//!   every SYN a new connection the pcap scenarios give SYN-state flows an
//!   idle timeout of [`PCAP_SYN_TIMEOUT`] (the default is 10 s): by the
//!   time a SYN comes round again its flow has expired, and the SYN opens
//!   a new connection in its place. The flow table holds the last pass's
//!   flows, expired, rather than live ones to evict: the in-process `syn`
//!   scenario measures that path.
//!
//! `pcap-syn-affinity` is the SYN flood with the benchmark's affinities
//! installed and the control thread changing them. `pcap-syn-alternating`
//! runs both SYN floods in one process: a worker with an empty affinity
//! table and one with the loaded table (its control thread changing it
//! throughout) take turns of 100 ms on the worker core, polling the same
//! queues, each with a flow table of its own. The ratio of each loaded
//! turn to its neighbouring empty turns does not move with this VM's pace,
//! which changes within the seconds between two runs of their own.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pktdist::affinity::table::AffinityTable;
use pktdist::datapath::counters::WorkerCounters;
use pktdist::datapath::flow::FlowTimeouts;
use pktdist::datapath::worker::{PortPlan, Shared, Worker, WorkerSetup};
use pktdist::dpdk::{
    spawn_worker, tsc_hz, Eal, Mempool, Port, PortQueues, PortSetup, QueueDir, DEFAULT_DATA_ROOM,
    SOCKET_ANY,
};
use pktdist::types::tcp_flags;

use crate::affinity_load::{CLIENT_BASE, CLIENT_MASK};
use crate::feeder::{tcp_frame, FeederStats, Rng, FRAME, MEASURE, STOP, STOP_FEEDER, WARMUP};
use crate::{summarize, Args, Pipeline, Row, VIP};

/// Idle timeout of SYN-state flows in the pcap SYN scenarios: far shorter
/// than one pass over the file (a million frames take 40 ms even at 25
/// Mpps), so every SYN finds its flow of the last pass expired.
pub const PCAP_SYN_TIMEOUT: Duration = Duration::from_millis(20);
/// Bytes of a pcap file's header, and of each record's header.
const PCAP_HEADER: usize = 24;
const PCAP_RECORD: usize = 16;
/// Mbufs beyond the file's frames: the working set of the queues.
const WORKING_MBUFS: u32 = 32_768;
/// Destination MAC of the frames written (the ports are promiscuous).
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// Writes the capture file of `kind` (`established` or `syn`) with
/// `flows` frames.
pub fn write(kind: &str, path: &std::path::Path, flows: usize) -> Result<(), String> {
    let n = flows.min(CLIENT_MASK as usize + 1);
    let frames: Vec<Vec<u8>> = match kind {
        "established" => {
            let mut order: Vec<u32> = (0..n as u32).collect();
            Rng::new(0xe57ab).shuffle(&mut order);
            order
                .iter()
                .map(|&i| {
                    let sport = 1024 + (i.wrapping_mul(2_654_435_761) >> 16) as u16 % 60000;
                    tcp_frame(CLIENT_BASE | i, sport, VIP, tcp_flags::ACK, DST_MAC)
                })
                .collect()
        }
        "syn" => {
            let mut rng = Rng::new(0x5171);
            (0..n)
                .map(|_| {
                    let r = rng.next_u64();
                    let src = CLIENT_BASE | (r as u32 & CLIENT_MASK);
                    tcp_frame(src, (r >> 32) as u16 | 1024, VIP, tcp_flags::SYN, DST_MAC)
                })
                .collect()
        }
        other => return Err(format!("--write-pcap {other:?}: established or syn")),
    };
    // The classic pcap header: magic, version 2.4, no time zone, no
    // accuracy, snap length, Ethernet.
    let mut out = Vec::with_capacity(PCAP_HEADER + frames.len() * (PCAP_RECORD + FRAME));
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    for v in [0u32, 0, 65_535, 1] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for (i, f) in frames.iter().enumerate() {
        for v in [
            (i / 1_000_000) as u32,
            (i % 1_000_000) as u32,
            f.len() as u32,
            f.len() as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(f);
    }
    std::fs::File::create(path)
        .and_then(|mut w| w.write_all(&out))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Frames in a capture file this program wrote (all of [`FRAME`] bytes).
fn frames_in(path: &std::path::Path) -> Result<u64, String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len() as usize;
    if len < PCAP_HEADER || (len - PCAP_HEADER) % (PCAP_RECORD + FRAME) != 0 {
        return Err(format!(
            "{}: not a capture of {FRAME}-byte frames written by --write-pcap",
            path.display()
        ));
    }
    Ok(((len - PCAP_HEADER) / (PCAP_RECORD + FRAME)) as u64)
}

/// Runs one pcap scenario (`pcap-established`, `pcap-syn`,
/// `pcap-syn-affinity`, `pcap-syn-alternating`) on `--pcap`: one row (with
/// two sides, the loaded one's), and the EAL arguments and device strings
/// used (for the report, and for testpmd to use the same).
pub fn run(args: &Args, name: &str) -> Result<(Row, serde_json::Value), String> {
    let path = args
        .pcap
        .as_ref()
        .ok_or("the pcap scenarios need --pcap FILE (see --write-pcap)")?;
    let frames = frames_in(path)?;
    let cores: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let (main_core, worker_core) = match cores.as_slice() {
        [a, b, ..] => (*a, *b),
        _ => return Err(format!("needs two cores, this process may use {cores:?}")),
    };
    let mbufs = u32::try_from(frames).map_err(|_| "too many frames")? + WORKING_MBUFS;
    // 4 KB per mbuf of the default size (what testpmd's pool needs on
    // --no-huge memory; perf/vs_testpmd.py gives both the same), and room
    // for the rest.
    let mem = args
        .mem
        .max(((u64::from(mbufs) * 4_000) >> 20) as u32 + 512);
    let eal_args = crate::eal_args(args.hugepages, mem, main_core);
    Eal::init(&eal_args).map_err(|e| format!("EAL {eal_args:?}: {e}"))?;
    let pool = Mempool::new("pcap", mbufs, 256, DEFAULT_DATA_ROOM, SOCKET_ANY)
        .map_err(|e| format!("mempool of {mbufs} mbufs: {e}"))?;
    let conf = PortSetup::default();
    let input_dev = format!("net_pcap0,rx_pcap={},infinite_rx=1", path.display());
    let output_dev = "net_null0,no-rx=1".to_string();
    let loading = Instant::now();
    let input = Arc::new(
        Port::open(&input_dev, &conf, Arc::clone(&pool))
            .map_err(|e| format!("{input_dev}: {e}"))?,
    );
    let load_secs = loading.elapsed().as_secs_f64();
    let output = Arc::new(
        Port::open(&output_dev, &conf, Arc::clone(&pool))
            .map_err(|e| format!("{output_dev}: {e}"))?,
    );
    let cfg = crate::control_rate::config()?;
    let mut registry = pktdist::control::registry::ServiceRegistry::from_config(&cfg)
        .map_err(|e| e.to_string())?;
    let dp = registry.snapshot().map_err(|e| e.to_string())?;
    let owners = dp.services[0].backends.clone();
    let cell = Arc::new(pktdist::datapath::snapshot::DataplaneCell::new(dp));

    let syn = name != "pcap-established";
    let timeouts = if syn {
        FlowTimeouts {
            syn: PCAP_SYN_TIMEOUT,
            ..FlowTimeouts::default()
        }
    } else {
        FlowTimeouts::default()
    };
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let alternating = name == "pcap-syn-alternating";
    let (affinity, churn, inst_info) = if name == "pcap-syn-affinity" || alternating {
        let inst = crate::install(args, &owners)?;
        let info = serde_json::json!({
            "affinities": inst.manager.len(),
            "affinity_24s": inst.n24,
            "client_space_covered": inst.coverage,
        });
        let reader = inst.reader.clone();
        let control = crate::affinity_load::churn(
            inst,
            args.changes_per_sec,
            owners.clone(),
            0,
            Arc::clone(&phase),
            main_core,
        )?;
        (reader, Some(control), info)
    } else {
        (
            AffinityTable::new(args.affinity_capacity).1,
            None,
            serde_json::json!({}),
        )
    };
    let epoch = Instant::now();
    let shared = |affinity| Shared {
        dataplane: Arc::clone(&cell),
        affinity,
        auto_affinity: Arc::new(pktdist::affinity::auto::AutoAffinityTable::new(1 << 16)),
        epoch,
    };
    // The side with an empty table, taking turns with the loaded one.
    let empty_side = alternating.then(|| {
        (
            shared(AffinityTable::new(args.affinity_capacity).1),
            Arc::new(WorkerCounters::default()),
        )
    });
    let empty_counters = empty_side.as_ref().map(|(_, c)| Arc::clone(c));
    let shared = shared(affinity);
    let plan = PortPlan {
        forward_to: 1,
        gateway_mac: Some([0x02, 0, 0, 0, 0, 0xfe]),
        unmatched_to: None,
        mtu: 1500,
    };
    let setup = WorkerSetup {
        id: 0,
        ports: vec![plan, plan],
        flow_capacity: args.flow_capacity,
        flow_capacity_v6: args.flow_capacity / 4,
        timeouts,
        syn_flood_rate: args.syn_flood_rate,
        icmp: Default::default(),
    };
    let io = PortQueues::new(vec![
        input
            .queue_dir(0, QueueDir::Rx)
            .map_err(|e| e.to_string())?,
        output
            .queue_dir(0, QueueDir::Tx)
            .map_err(|e| e.to_string())?,
    ]);
    let counters = Arc::new(WorkerCounters::default());
    let (p2, c2, hz) = (Arc::clone(&phase), Arc::clone(&counters), tsc_hz());
    let ready = Arc::new(AtomicBool::new(false));
    let r2 = Arc::clone(&ready);
    let worker = spawn_worker(worker_core, "bench-worker", move || match empty_side {
        None => {
            let mut s = Pipeline {
                worker: Worker::new(io, setup, shared, c2),
                now: 0,
            };
            r2.store(true, Ordering::SeqCst);
            crate::measure_loop(&p2, std::slice::from_mut(&mut s), hz)
        }
        Some((empty, empty_counters)) => {
            // The empty table's side first.
            let mut sides =
                crate::alternating_sides(io, &setup, [empty, shared], [empty_counters, c2]);
            r2.store(true, Ordering::SeqCst);
            crate::measure_loop(&p2, &mut sides, hz)
        }
    })
    .map_err(|e| format!("worker: {e}"))?;
    while !ready.load(Ordering::SeqCst) {
        if worker.is_finished() {
            return Err("worker ended during set-up".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // Warm: the whole file twice (established: every flow learned, then
    // seen once more; SYN floods: every flow of the first pass expired and
    // replaced), and at least --warmup seconds. Two sides taking turns
    // each receive as many frames as the file has twice (parts of several
    // passes, as the turns split them).
    let warm_started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.warmup));
    let received = || {
        let empty = empty_counters.as_ref().map(|c| c.rx_packets.get());
        counters.rx_packets.get().min(empty.unwrap_or(u64::MAX))
    };
    while received() < 2 * frames
        && warm_started.elapsed() < Duration::from_secs(crate::WARM_LIMIT_SECS)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let warm_secs = warm_started.elapsed().as_secs_f64();
    phase.store(MEASURE, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs_f64(args.seconds));
    phase.store(STOP, Ordering::SeqCst);
    let mut stats = worker.join().map_err(|_| "worker panicked".to_string())?;
    phase.store(STOP_FEEDER, Ordering::SeqCst);
    let churn = match churn {
        Some(c) => Some(
            c.join()
                .map_err(|_| "control thread panicked".to_string())?
                .1,
        ),
        None => None,
    };
    // The loaded (or only) side's stats last.
    let st = stats.pop().ok_or("no stats")?;
    let empty = stats.pop();
    let summary = summarize(&st, hz);
    let mut row = Row {
        name: name.to_string(),
        mpps: summary.packets as f64 / summary.seconds.max(1e-9) / 1e6,
        ratio_to_baseline: None,
        loop_stats: summary,
        feeder: FeederStats {
            on_cpu: 1.0,
            ..FeederStats::default()
        },
        hz,
        counters: st.counters,
        extra: serde_json::json!({
            "warmup_seconds": warm_secs,
            "pcap": path.display().to_string(),
            "pcap_frames": frames,
            "pcap_load_seconds": load_secs,
            "syn_timeout_ms": timeouts.syn.as_millis() as u64,
            // Warm-up included, both sides when two take turns:
            // perf/pcap_instructions.sh divides the whole run's
            // instructions by it.
            "rx_packets_all": counters.rx_packets.get()
                + empty_counters.as_ref().map_or(0, |c| c.rx_packets.get()),
        }),
    };
    let rx = crate::counter(&row.counters, "rx_packets").max(1);
    row.extra["unknown_flow_share"] =
        serde_json::json!(crate::counter(&row.counters, "unknown_flows") as f64 / rx as f64);
    row.extra["new_connection_share"] =
        serde_json::json!(crate::counter(&row.counters, "new_connections") as f64 / rx as f64);
    if let Some(c) = churn {
        row.extra["control_changes_per_sec"] = serde_json::json!(c.rate());
        row.extra["control_changes_refused"] = serde_json::json!(c.refused);
        let hits = crate::counter(&row.counters, "affinity_hits");
        let misses = crate::counter(&row.counters, "affinity_misses");
        row.extra["affinity_hit_share"] =
            serde_json::json!(hits as f64 / (hits + misses).max(1) as f64);
        for (k, v) in inst_info.as_object().into_iter().flatten() {
            row.extra[k] = v.clone();
        }
    }
    if let Some(empty) = empty {
        let e = summarize(&empty, hz);
        let empty_mpps = e.packets as f64 / e.seconds.max(1e-9) / 1e6;
        let new_connections = crate::counter(&empty.counters, "new_connections");
        let rx = crate::counter(&empty.counters, "rx_packets").max(1);
        row.extra["empty_table"] = serde_json::json!({
            "mpps": empty_mpps,
            "p99_ns": e.lat[2],
            "new_connection_share": new_connections as f64 / rx as f64,
        });
        row.extra["ratio_to_empty"] = serde_json::json!(row.mpps / empty_mpps.max(1e-9));
        row.extra["turn_ratios"] = crate::turn_ratios_json(&e.windows, &row.loop_stats.windows);
    }
    let setup = serde_json::json!({
        "eal": eal_args,
        "input": input_dev,
        "output": output_dev,
        "mbufs": mbufs,
        "data_room": DEFAULT_DATA_ROOM,
        "worker_core": worker_core,
        "main_core": main_core,
    });
    Ok((row, setup))
}
