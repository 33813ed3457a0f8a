//! `pktdist run` with a shared-memory `net_memif` port whose peer leaves in
//! the middle of the traffic, again and again, as a load generator does when
//! it quits: pktdist must keep running, its port counters must keep what
//! they counted before each disconnect, and every SYN must be counted.
//!
//! The peer is this test process: its own EAL with a memif client port that
//! sends SYNs (over a fixed set of flows, so most SYNs repeat a flow already
//! open) and drains what pktdist forwards back, then stops its port while
//! the traffic is still flowing (pktdist's side sees the control socket
//! close and tears the connection down), starts it again, and so on.
#![cfg(feature = "dpdk")]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    base_config, path_str, poll_until, serial, test_eal_args, web_service, Pktdist, TempDir,
};

use pktdist::datapath::pktio::{PacketIo, MAX_BURST};
use pktdist::dpdk::{
    Eal, Mbuf, Mempool, Port, PortQueues, PortSetup, DEFAULT_DATA_ROOM, SOCKET_ANY,
};
use pktdist::report::summary::Summary;
use pktdist::types::tcp_flags;
use pktdist::wire::build::FrameSpec;

/// Connections the peer makes and leaves.
const CYCLES: usize = 200;
/// Distinct client flows (source address and port) the SYNs come from.
const FLOWS: u32 = 64;
/// SYNs the peer offers per connection before it leaves.
const SYNS_PER_CYCLE: u64 = 2_000;

const PKTDIST_MAC: &str = "02:00:00:00:00:01";
const PEER_MAC: &str = "02:00:00:00:00:02";

fn peer_eal() -> Eal {
    Eal::init(&test_eal_args("pktdist-memif-peer", "error")).expect("the peer's EAL")
}

/// SYN `i` of the peer: flow `i % FLOWS` to the web service.
fn syn(i: u32) -> Vec<u8> {
    let flow = i % FLOWS;
    let mut spec = FrameSpec::tcp_v4(
        [198, 18, 0, 1 + (flow / 8) as u8],
        40_000 + (flow % 8) as u16,
        [192, 0, 2, 10],
        80,
        tcp_flags::SYN,
    );
    spec.dst_mac = [0x02, 0, 0, 0, 0, 0x01];
    spec.src_mac = [0x02, 0, 0, 0, 0, 0x02];
    spec.build().expect("a SYN frame")
}

/// The samples of pktdist's /metrics: `name{labels} value`.
fn scrape(addr: SocketAddr) -> Option<Vec<(String, f64)>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: pktdist\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let body = text.split("\r\n\r\n").nth(1)?;
    Some(
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (name, v) = l.rsplit_once(' ')?;
                Some((name.to_string(), v.parse().ok()?))
            })
            .collect(),
    )
}

fn sample(samples: &[(String, f64)], name: &str) -> Option<u64> {
    samples
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v as u64)
}

fn alive(pd: &mut Pktdist, what: &str) {
    if let Some(status) = pd.exit_status() {
        panic!(
            "pktdist ended ({status}) {what}\n--- stderr\n{}",
            pd.stderr_text()
        );
    }
}

fn config(socket: &Path) -> String {
    let mut c = base_config(&["be1", "be2"]);
    // The peer repeats the SYNs of a few flows as fast as memif goes, which
    // would engage the SYN flood guard, and an untracked SYN is not looked
    // up: each would count as a new connection. This test counts the
    // connections the repeats do not open, so none of the flows may expire
    // while the peer reconnects, however long that takes.
    c = c.replace(
        "[flow]\n",
        "[flow]\nsyn_flood_rate = 0\nsyn_timeout = \"1h\"\n",
    );
    c = c.replace(
        "[control]\n",
        "[control]\nmetrics_listen = \"127.0.0.2:0\"\n",
    );
    c.push_str(&format!(
        "\n[[ports]]\nname = \"memif\"\n\
         device = \"net_memif0,role=server,socket={},socket-abstract=no,mac={PKTDIST_MAC}\"\n\
         gateway_mac = \"{PEER_MAC}\"\n",
        socket.display()
    ));
    c.push_str(&web_service(
        "",
        &[("be1", "10.0.0.1", None), ("be2", "10.0.0.2", None)],
    ));
    c
}

#[test]
fn memif_peer_leaving_mid_traffic_neither_crashes_pktdist_nor_loses_its_counts() {
    let _serial = serial();
    let dir = TempDir::new("memif");
    let socket = dir.path("memif.sock");
    let cfg = dir.path("pktdist.toml");
    std::fs::write(&cfg, config(&socket)).expect("write config");
    let json = dir.path("summary.json");
    let mut pd = Pktdist::spawn(&[
        "run",
        "--config",
        path_str(&cfg),
        "--quiet",
        "--summary-json",
        path_str(&json),
    ]);
    pd.control_addr(Duration::from_secs(30));
    let metrics = pd.metrics_addr(Duration::from_secs(5));
    assert!(socket.exists(), "pktdist created {}", socket.display());

    let _eal = peer_eal();
    let pool = Mempool::new("memif_peer", 8191, 0, DEFAULT_DATA_ROOM, SOCKET_ANY).expect("pool");
    let device = format!(
        "net_memif1,role=client,socket={},socket-abstract=no,mac={PEER_MAC}",
        socket.display()
    );
    let mut port =
        Arc::new(Port::open(&device, &PortSetup::default(), pool.clone()).expect("open"));
    let frames: Vec<Vec<u8>> = (0..FLOWS).map(syn).collect();

    let mut offered = 0u64;
    let mut forwarded_back = 0u64;
    for cycle in 0..CYCLES {
        let up = poll_until(Duration::from_secs(20), || {
            alive(&mut pd, &format!("before connection {cycle}"));
            port.link().ok().filter(|l| l.up)
        });
        assert!(up.is_some(), "memif connection {cycle} did not come up");

        let mut io = PortQueues::claim(std::slice::from_ref(&port), 0).expect("claim");
        let mut sent = 0u64;
        let mut burst = Vec::with_capacity(MAX_BURST);
        let mut back = Vec::with_capacity(MAX_BURST);
        let give_up = Instant::now() + Duration::from_secs(20);
        while sent < SYNS_PER_CYCLE && Instant::now() < give_up {
            for k in 0..MAX_BURST as u64 {
                let f = &frames[((offered + sent + k) % u64::from(FLOWS)) as usize];
                burst.push(Mbuf::from_frame(&pool, f).expect("mbuf"));
            }
            io.tx_burst(0, &mut burst);
            sent += (MAX_BURST - burst.len()) as u64;
            burst.clear();
            io.rx_burst(0, &mut back);
            forwarded_back += back.len() as u64;
            back.clear();
        }
        offered += sent;
        drop(io);
        // Leave: pktdist's worker is still receiving and forwarding.
        Arc::get_mut(&mut port)
            .expect("the peer's port is not shared")
            .stop()
            .expect("stop the peer's port");
        if cycle + 1 < CYCLES {
            // Connecting fails while pktdist's side is still tearing the
            // last connection down; try again.
            let p = Arc::get_mut(&mut port).expect("the peer's port is not shared");
            let started = poll_until(Duration::from_secs(20), || {
                alive(&mut pd, &format!("after disconnect {cycle}"));
                p.start().ok()
            });
            assert!(started.is_some(), "the peer could not connect again");
        }
    }
    assert!(forwarded_back > 0, "pktdist forwarded nothing back");
    // pktdist's side notices the last disconnect; it must still be running.
    let down = poll_until(Duration::from_secs(10), || {
        alive(&mut pd, "after the last disconnect");
        let s = scrape(metrics)?;
        (sample(&s, "pktdist_port_link_up{port=\"memif\"}")? == 0).then_some(())
    });
    assert!(down.is_some(), "pktdist never saw the last disconnect");
    drop(port);

    let fin = pd.stop(Duration::from_secs(20));
    assert!(
        fin.status.success(),
        "pktdist did not stop cleanly ({})\n--- stderr\n{}",
        fin.status,
        fin.stderr
    );
    let summary: Summary =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("summary.json"))
            .expect("summary JSON");
    assert!(summary.rx_packets > 0 && summary.rx_packets <= offered);
    // Every packet was a SYN for the service: each one counts as a SYN, and
    // only the first of each flow opens a connection.
    assert_eq!(summary.syns, summary.rx_packets, "every SYN counted");
    assert_eq!(summary.new_connections, u64::from(FLOWS));
    let p = summary
        .ports
        .iter()
        .find(|p| p.name == "memif")
        .expect("the memif port in the summary");
    // Every connection ended mid-traffic, the last one too: the port's
    // counters, which memif zeroes when its peer leaves, are those read just
    // before pktdist handled each disconnect.
    assert_eq!(
        p.ipackets, summary.rx_packets,
        "port counters kept across the disconnects"
    );
    assert_eq!(p.opackets, summary.tx_packets);
    assert!(
        fin.stderr.contains("port memif: link down"),
        "pktdist logs the disconnect\n{}",
        fin.stderr
    );
}
