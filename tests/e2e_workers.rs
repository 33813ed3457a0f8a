//! Several workers under real DPDK: the demo configuration
//! (config/demo.toml, two `net_ring` ports and the built-in traffic source)
//! with two and with three workers sharing this machine's two CPUs
//! (`[cores] share_cpus`, idle workers sleeping). The traffic source puts
//! each flow on the queue a NIC's RSS would, so every worker forwards its
//! share, no flow ever reaches a second worker (no packet of an unknown
//! flow), every packet in goes out, the connection shares follow the
//! weights, and the per-worker counters add up to the totals, in the
//! summary and in `/metrics`.
#![cfg(feature = "dpdk")]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{path_str, poll_until, serial, Pktdist, TempDir};
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

fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: pktdist\r\n\r\n").ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    let (head, body) = r.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
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
        .wait_stderr("warning: [cores] share_cpus", Duration::from_secs(1))
        .expect("a warning about shared CPUs");
    assert!(warning.contains("never for production"), "{warning}");
    let line = p
        .wait_stderr("metrics on http://", Duration::from_secs(5))
        .expect("metrics address");
    let metrics: SocketAddr = line
        .rsplit("http://")
        .next()
        .and_then(|s| s.strip_suffix("/metrics"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("metrics address in {line:?}"));

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
