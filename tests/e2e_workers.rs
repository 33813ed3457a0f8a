//! Several workers under real DPDK: the demo configuration
//! (config/demo.toml, two `net_ring` ports and the built-in traffic source)
//! with two and with three workers sharing this machine's two CPUs
//! (`[cores] share_cpus`, idle workers sleeping). The traffic source puts
//! each flow on the queue a NIC's RSS would, so every worker forwards its
//! share, no flow ever reaches a second worker (no packet of an unknown
//! flow), every packet in goes out, the connection shares follow the
//! weights, and the per-worker counters add up to the totals, in the
//! summary and in `/metrics`.
//!
//! And a `net_memif` port with two queues, one per worker, whose peer (this
//! test process, with its own EAL) spreads its flows over them by the RSS
//! hash: both workers take their share and no flow reaches both.
#![cfg(feature = "dpdk")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{
    base_config, http_get, path_str, poll_until, serial, test_eal_args, web_service, Pktdist,
    TempDir,
};
use pktdist::datapath::pktio::{PacketIo, MAX_BURST};
use pktdist::dpdk::{
    Eal, Mbuf, Mempool, Port, PortQueues, PortSetup, DEFAULT_DATA_ROOM, SOCKET_ANY,
};
use pktdist::run::rss;
use pktdist::types::{tcp_flags, FlowKey};
use pktdist::wire::build::FrameSpec;
use serde_json::Value;

/// The demo configuration with `workers` (sharing CPUs), the control
/// protocol and the metrics on free ports, and a modest rate: workers
/// taking turns on shared CPUs, and the traffic source's sink beside the
/// control thread, must keep up without a queue filling.
fn demo_with(workers: &str) -> String {
    let demo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml"))
        .expect("config/demo.toml");
    let mut text = demo;
    for (from, to) in [
        (
            "workers = [1]\n".to_string(),
            format!("workers = {workers}\nshare_cpus = true\nidle_sleep = \"50us\"\n"),
        ),
        (
            "listen = \"127.0.0.1:7400\"".into(),
            "listen = \"127.0.0.1:0\"".into(),
        ),
        (
            "metrics_listen = \"127.0.0.1:9400\"".into(),
            "metrics_listen = \"127.0.0.2:0\"".into(),
        ),
        ("rate_pps = 1000000".into(), "rate_pps = 150000".into()),
    ] {
        assert_eq!(text.matches(&from).count(), 1, "{from:?} in demo.toml");
        text = text.replace(&from, &to);
    }
    text
}

/// The text of `/metrics`.
fn scrape(addr: SocketAddr) -> Option<String> {
    http_get(addr, "/metrics")
}

/// The value of the sample `name` (with its labels) in an exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// Runs the demo with `workers` for a few seconds and checks the run.
fn run_demo(workers: &str, n: usize) {
    let _g = serial();
    let dir = TempDir::new("workers");
    let config = dir.path("demo.toml");
    std::fs::write(&config, demo_with(workers)).expect("write config");
    let summary_path = dir.path("summary.json");
    let p = Pktdist::spawn(&[
        "run",
        "--config",
        path_str(&config),
        "--duration",
        "8",
        "--quiet",
        "--summary-json",
        path_str(&summary_path),
    ]);
    p.control_addr(Duration::from_secs(30));
    let warning = p
        .wait_stderr("WARN  [cores] share_cpus", Duration::from_secs(1))
        .expect("a warning about shared CPUs");
    assert!(warning.contains("never for production"), "{warning}");
    let metrics = p.metrics_addr(Duration::from_secs(5));

    // While it runs, /metrics shows every worker receiving and sending.
    let text = poll_until(Duration::from_secs(20), || {
        let t = scrape(metrics)?;
        (0..n)
            .all(|w| {
                sample(
                    &t,
                    &format!("pktdist_worker_transmitted_packets_total{{worker=\"{w}\"}}"),
                )
                .is_some_and(|v| v > 0.0)
            })
            .then_some(t)
    })
    .unwrap_or_else(|| {
        panic!(
            "not every one of {n} workers forwarded:\n{}",
            p.stderr_text()
        )
    });
    assert!(sample(
        &text,
        &format!("pktdist_worker_received_packets_total{{worker=\"{n}\"}}")
    )
    .is_none());

    let done = p.wait(Duration::from_secs(60));
    assert!(done.status.success(), "pktdist failed:\n{}", done.stderr);
    assert!(
        done.stderr.contains("flows spread by the traffic source"),
        "{}",
        done.stderr
    );
    let s: Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).expect("summary JSON"))
            .expect("summary parses");

    // Packets in = out, nothing dropped, no flow on two workers.
    let (rx, tx) = (u(&s["rx_packets"]), u(&s["tx_packets"]));
    assert!(rx > 100_000, "too little traffic for the test: {rx}");
    assert_eq!(rx, tx, "packets in and out");
    let drops: u64 = s["drops"].as_object().expect("drops").values().map(u).sum();
    assert_eq!(drops, 0, "drops: {}", s["drops"]);
    assert_eq!(u(&s["unknown_flows"]), 0, "a flow reached a second worker");
    assert_eq!(u(&s["untracked_flows"]), 0);

    // Every worker forwards its share; the per-worker counters add up.
    assert_eq!(u(&s["workers"]), n as u64);
    let detail = s["workers_detail"].as_array().expect("workers_detail");
    assert_eq!(detail.len(), n);
    let (mut wrx, mut wtx) = (0, 0);
    for (w, d) in detail.iter().enumerate() {
        let (r, t) = (u(&d["rx_packets"]), u(&d["tx_packets"]));
        assert!(
            r * 2 * n as u64 >= rx,
            "worker {w} received {r} of {rx}: less than half its share"
        );
        assert_eq!(r, t, "worker {w}: in and out");
        wrx += r;
        wtx += t;
    }
    assert_eq!(
        (wrx, wtx),
        (rx, tx),
        "per-worker counters sum to the totals"
    );

    // The source sent what the workers received, and got it all back.
    let src = &s["extra"]["traffic source"];
    assert_eq!(u(&src["sent"]), rx);
    let delivered = src["delivered_to_backends"].as_object().expect("delivered");
    assert!(!delivered.contains_key("other"), "{delivered:?}");
    assert_eq!(delivered.values().map(u).sum::<u64>(), tx);
    assert_eq!(u(&s["ports"][0]["ipackets"]), rx);

    // Connection shares follow the weights, within 2 points.
    for svc in s["services"].as_array().expect("services") {
        for b in svc["backends"].as_array().expect("backends") {
            let (w, c) = (
                b["weight_share"].as_f64().expect("weight_share"),
                b["connection_share"].as_f64().expect("connection_share"),
            );
            assert!(
                (w - c).abs() < 0.02,
                "{}/{}: connection share {c:.3}, weight share {w:.3}",
                svc["name"],
                b["name"]
            );
        }
    }
    assert!(u(&s["services"][1]["auto_affinity_hits"]) > 0);
    // The demo's two static affinities pin 128 of the source's 4096 clients.
    assert!(u(&s["services"][1]["affinity_hits"]) > 0);
    println!(
        "{n} workers {workers}: {rx} packets in and out, per worker {:?}",
        detail
            .iter()
            .map(|d| u(&d["rx_packets"]))
            .collect::<Vec<_>>()
    );
}

#[test]
fn demo_with_two_workers_on_one_cpu() {
    run_demo("[1, 1]", 2);
}

#[test]
fn demo_with_three_workers_on_two_cpus() {
    run_demo("[1, 1, 0]", 3);
}

/// Flows the memif peer opens: a SYN, then data, then a FIN each.
const MEMIF_FLOWS: u32 = 512;

/// Frame `k` (0: SYN, 1: data, 2: FIN) of memif flow `i`, and its flow.
fn memif_frame(i: u32, k: u32) -> (Vec<u8>, FlowKey) {
    let src = [198, 18, 1 + (i / 200) as u8, (i % 200) as u8 + 1];
    let sport = 20_000 + i as u16;
    let flags = match k {
        0 => tcp_flags::SYN,
        1 => tcp_flags::ACK | tcp_flags::PSH,
        _ => tcp_flags::FIN | tcp_flags::ACK,
    };
    let mut spec = FrameSpec::tcp_v4(src, sport, [192, 0, 2, 10], 80, flags);
    spec.dst_mac = [0x02, 0, 0, 0, 0, 0x01];
    spec.src_mac = [0x02, 0, 0, 0, 0, 0x02];
    let frame = spec.build().expect("a frame");
    let parsed = pktdist::datapath::classify::parse(&frame).expect("parses");
    (frame, parsed.key)
}

#[test]
fn memif_with_two_queues_spread_by_the_peer() {
    let _g = serial();
    let dir = TempDir::new("memif-queues");
    let socket = dir.path("memif.sock");
    let mut c = base_config(&["be1", "be2"]).replace(
        "workers = [1]\n",
        "workers = [1, 1]\nshare_cpus = true\nidle_sleep = \"50us\"\n",
    );
    c.push_str(&format!(
        "\n[[ports]]\nname = \"memif\"\n\
         device = \"net_memif0,role=server,socket={},socket-abstract=no,mac=02:00:00:00:00:01\"\n\
         gateway_mac = \"02:00:00:00:00:02\"\n",
        socket.display()
    ));
    c.push_str(&web_service(
        "",
        &[("be1", "10.0.0.1", None), ("be2", "10.0.0.2", None)],
    ));
    let cfg = dir.path("pktdist.toml");
    std::fs::write(&cfg, c).expect("write config");
    let json = dir.path("summary.json");
    let pd = Pktdist::spawn(&[
        "run",
        "--config",
        path_str(&cfg),
        "--quiet",
        "--summary-json",
        path_str(&json),
    ]);
    pd.control_addr(Duration::from_secs(30));
    assert!(
        pd.stderr_text()
            .contains("2 queue(s), flows spread by the memif peer"),
        "{}",
        pd.stderr_text()
    );
    // The port's pool is made on a socket: its own, or, for a device whose
    // socket is unknown (memif), the control core's.
    let line = pd
        .stderr_text()
        .lines()
        .find(|l| l.contains("flows spread by the memif peer"))
        .map(str::to_string)
        .unwrap_or_default();
    let (numa, pool) = line
        .rsplit_once("; NUMA socket ")
        .and_then(|(_, rest)| rest.split_once(", mbufs from pool "))
        .unwrap_or_else(|| panic!("no NUMA socket and pool in {line:?}"));
    let on = pool
        .strip_prefix("pktdist-s")
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("pool {pool:?} is not a socket's"));
    assert!(numa == "unknown" || numa == on.to_string(), "{line}");

    // The peer: a memif client with two queue pairs.
    let _eal = Eal::init(&test_eal_args("pktdist-memif-queues", "error")).expect("the peer's EAL");
    let pool = Mempool::new("memif_q_peer", 8191, 0, DEFAULT_DATA_ROOM, SOCKET_ANY).expect("pool");
    let device = format!(
        "net_memif1,role=client,socket={},socket-abstract=no,mac=02:00:00:00:00:02",
        socket.display()
    );
    let setup = PortSetup {
        queues: 2,
        ..PortSetup::default()
    };
    let port = Arc::new(Port::open(&device, &setup, pool.clone()).expect("open the peer"));
    let up = poll_until(Duration::from_secs(20), || {
        port.link().ok().filter(|l| l.up)
    });
    assert!(up.is_some(), "memif did not come up");
    let mut io = PortQueues::new(vec![
        port.queue(0).expect("queue 0"),
        port.queue(1).expect("queue 1"),
    ]);

    // Each flow's frames on the queue its RSS hash gives, SYNs first, then
    // data, then FINs: each queue keeps its flows' frames in order.
    let mut per_queue = [0u64; 2];
    let mut sent = 0u64;
    let mut back = 0u64;
    let mut bufs = Vec::with_capacity(MAX_BURST);
    let drain = |io: &mut PortQueues, bufs: &mut Vec<Mbuf>, back: &mut u64| {
        for q in 0..2 {
            io.rx_burst(q, bufs);
            *back += bufs.len() as u64;
            bufs.clear();
        }
    };
    for k in 0..3 {
        for i in 0..MEMIF_FLOWS {
            let (frame, key) = memif_frame(i, k);
            let q = rss::queue_of(&key, 2);
            let mut one = vec![Mbuf::from_frame(&pool, &frame).expect("mbuf")];
            let give_up = std::time::Instant::now() + Duration::from_secs(20);
            while !one.is_empty() {
                assert!(std::time::Instant::now() < give_up, "queue {q} stays full");
                io.tx_burst(q, &mut one);
                drain(&mut io, &mut bufs, &mut back);
            }
            per_queue[q] += 1;
            sent += 1;
        }
    }
    let all = poll_until(Duration::from_secs(20), || {
        drain(&mut io, &mut bufs, &mut back);
        (back == sent).then_some(())
    });
    assert!(all.is_some(), "{back} of {sent} frames came back");
    drop(io);
    drop(port);

    let fin = pd.stop(Duration::from_secs(20));
    assert!(fin.status.success(), "{}", fin.stderr);
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("summary"))
        .expect("summary JSON");
    assert_eq!(u(&s["rx_packets"]), sent);
    assert_eq!(u(&s["tx_packets"]), sent);
    assert_eq!(u(&s["new_connections"]), u64::from(MEMIF_FLOWS));
    assert_eq!(u(&s["unknown_flows"]), 0, "a flow reached both workers");
    let detail = s["workers_detail"].as_array().expect("workers_detail");
    let got: Vec<u64> = detail.iter().map(|d| u(&d["rx_packets"])).collect();
    assert_eq!(
        got, per_queue,
        "worker w received what the peer sent on queue w"
    );
    for n in &per_queue {
        assert!(
            n * 4 >= sent,
            "a queue took less than a quarter: {per_queue:?}"
        );
    }
    println!("memif, two queues: {sent} frames of {MEMIF_FLOWS} flows, per worker {got:?}");
}

/// A worker that cannot start after another has (EAL has one lcore left
/// for the two: `--lcores` gives the other 127 of its 128 to threads of
/// its own): `pktdist run` fails with the reason, and the worker already
/// polling is stopped and joined before its ports are closed (an exit
/// code, not a crash on a closed queue).
#[test]
fn a_worker_that_cannot_start_stops_those_started() {
    let _g = serial();
    let dir = TempDir::new("workers");
    let config = dir.path("demo.toml");
    let text =
        demo_with("[1, 1]").replace("args = [\n", "args = [\n  \"--lcores\", \"(0-126)@0\",\n");
    std::fs::write(&config, text).expect("write config");
    let p = Pktdist::spawn(&["run", "--config", path_str(&config), "--duration", "30"]);
    let done = p.wait(Duration::from_secs(60));
    assert_eq!(done.status.code(), Some(1), "{}", done.stderr);
    assert!(
        done.stderr
            .contains("worker 1 on core 1: invalid argument: no DPDK lcore id left"),
        "{}",
        done.stderr
    );
    assert!(
        !done.stderr.contains("ended while forwarding"),
        "{}",
        done.stderr
    );
    assert!(
        done.stderr.contains("stopping the 1 worker(s) started"),
        "{}",
        done.stderr
    );
}

/// A core list in [eal] args that puts EAL's main thread (pktdist's
/// control thread) on another CPU than `[cores] control`, here worker 0's,
/// is refused at start with the reason, before any port is opened.
#[test]
fn a_core_list_that_moves_the_control_thread_is_refused() {
    let _g = serial();
    let dir = TempDir::new("workers");
    let config = dir.path("demo.toml");
    // Mapped with --lcores, which only EAL itself applies (a plain -l is
    // refused by the configuration check already).
    let text = demo_with("[1]").replace("args = [\n", "args = [\n  \"--lcores\", \"1@1\",\n");
    std::fs::write(&config, text).expect("write config");
    let p = Pktdist::spawn(&["run", "--config", path_str(&config), "--duration", "30"]);
    let done = p.wait(Duration::from_secs(60));
    assert_eq!(done.status.code(), Some(1), "{}", done.stderr);
    assert!(
        done.stderr.contains(
            "[eal] args put EAL's main thread, pktdist's control thread, on CPU(s) [1], not on [cores] control = 0"
        ),
        "{}",
        done.stderr
    );
    // Refused before any port was opened (each logs a line).
    assert!(!done.stderr.contains("port p0 ="), "{}", done.stderr);
}

/// Workers go on the cores the configuration names, also those outside
/// the CPU mask pktdist started with (a server's `isolcpus` takes the
/// worker cores out of every process's mask); a core no thread can be
/// pinned to is refused before anything starts.
#[test]
fn workers_pin_to_cores_outside_the_mask_pktdist_started_with() {
    let _g = serial();
    let dir = TempDir::new("workers");
    let config = dir.path("demo.toml");
    std::fs::write(&config, demo_with("[1]")).expect("write config");
    let args = ["run", "--config", path_str(&config), "--duration", "2"];
    let done = Pktdist::spawn_on_cpus("0", &args).wait(Duration::from_secs(60));
    assert!(done.status.success(), "{}", done.stderr);
    assert!(
        done.stderr
            .contains("1 worker(s) on core(s) [1], control on core 0"),
        "{}",
        done.stderr
    );

    std::fs::write(&config, demo_with("[1, 4000]")).expect("write config");
    let done = Pktdist::spawn(&args).wait(Duration::from_secs(60));
    assert_eq!(done.status.code(), Some(1), "{}", done.stderr);
    assert!(
        done.stderr
            .contains("core 4000 cannot take a pinned thread"),
        "{}",
        done.stderr
    );
    // `check` says so too, and passes (the file itself is good).
    let checked =
        Pktdist::spawn(&["check", "--config", path_str(&config)]).wait(Duration::from_secs(60));
    assert!(checked.status.success(), "{}", checked.stderr);
    assert!(
        checked.stdout.contains(
            "on this machine, run would refuse to start: core 4000 cannot take a pinned thread"
        ),
        "{}",
        checked.stdout
    );
}
