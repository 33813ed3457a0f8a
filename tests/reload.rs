//! Hot reload (SIGHUP through `ControlThread::reload`, `pktdist reload`
//! through the control protocol; both apply `ConfigFile::reload`): added,
//! removed and re-weighted backends and services take effect while a worker
//! keeps running, established connections stay where they are, nothing is
//! dropped, and a bad file is refused with the same error `pktdist check`
//! prints, changing nothing.

mod common;

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use common::{ipip_service, port_toml, web_service};
use pktdist::config::Config;
use pktdist::control::thread::{ControlSetup, ControlThread};
use pktdist::datapath::counters::WorkerCounters;
use pktdist::datapath::pktio::{MemIo, PacketBuf};
use pktdist::datapath::worker::{PortPlan, Worker, WorkerSetup};
use pktdist::types::tcp_flags;
use pktdist::wire::build::FrameSpec;
use pktdist::wire::{ethernet, ipv4};

/// Everything but the ports and services.
const HEADER: &str = r#"
[eal]
args = ["--no-huge"]
[cores]
control = 0
workers = [1]
[affinity]
capacity = 1024
auto_capacity = 1024
[control]
listen = "127.0.0.1:0"
allowed_networks = ["127.0.0.0/8"]
[control.keys]
admin = "00112233445566778899aabbccddeeff"
"#;

fn base() -> String {
    [
        HEADER.into(),
        port_toml("net_ring0"),
        web_service(
            "",
            &[
                ("a", "10.0.0.1", Some(100)),
                ("b", "10.0.0.2", Some(100)),
                ("c", "10.0.0.3", Some(100)),
            ],
        ),
    ]
    .concat()
}

/// a re-weighted to 0 (drained), b kept, c removed, d added; a new service.
fn next() -> String {
    [
        HEADER.into(),
        port_toml("net_ring0"),
        web_service(
            "",
            &[
                ("a", "10.0.0.1", Some(0)),
                ("b", "10.0.0.2", Some(100)),
                ("d", "10.0.0.4", Some(100)),
            ],
        ),
        ipip_service(
            "dns",
            "192.0.2.53",
            53,
            "udp",
            "",
            &[("r1", "10.0.5.1", None)],
        ),
    ]
    .concat()
}

struct Bed {
    control: ControlThread,
    worker: Worker<Rc<RefCell<MemIo>>>,
    io: Rc<RefCell<MemIo>>,
    path: PathBuf,
}

fn bed(name: &str) -> Bed {
    let path =
        std::env::temp_dir().join(format!("pktdist-reload-{name}-{}.toml", std::process::id()));
    std::fs::write(&path, base()).unwrap();
    let cfg = Config::load(&path).unwrap();
    let counters = Arc::new(WorkerCounters::default());
    let control = ControlThread::new(
        &cfg,
        ControlSetup {
            config_path: Some(path.clone()),
            workers: vec![Arc::clone(&counters)],
            port_stats: None,
            port_upkeep: None,
            status: None,
            discard_bad_state: false,
            store: None,
        },
    )
    .unwrap();
    let setup = WorkerSetup {
        id: 0,
        ports: vec![PortPlan {
            forward_to: 0,
            gateway_mac: Some([2, 0, 0, 0, 0, 0xfe]),
            unmatched_to: None,
            mtu: 1500,
        }],
        flow_capacity: 1 << 14,
        flow_capacity_v6: 1 << 12,
        timeouts: cfg.flow_timeouts(),
        // The drain below keeps connections whose SYNs it must have seen.
        syn_flood_rate: 0,
        icmp: cfg.icmp_settings(),
    };
    let io = Rc::new(RefCell::new(MemIo::new(1)));
    let worker = Worker::new(Rc::clone(&io), setup, control.shared(), counters);
    Bed {
        control,
        worker,
        io,
        path,
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn tcp(i: u32, flags: u8) -> Vec<u8> {
    FrameSpec::tcp_v4(
        [198, 18, (i >> 8) as u8, i as u8],
        1000 + (i % 50) as u16,
        [192, 0, 2, 10],
        80,
        flags,
    )
    .build()
    .unwrap()
}

/// Sends frames through the worker; returns each output's outer destination
/// (last octet), in order.
fn send(b: &mut Bed, frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in frames.chunks(32) {
        for f in chunk {
            b.io.borrow_mut().push_rx(0, f);
        }
        let now = b.worker.now_ns();
        b.worker.poll(now);
        for m in b.io.borrow_mut().tx[0].drain(..) {
            let eth = ethernet::Frame::new_checked(m.data()).unwrap();
            let ip =
                ipv4::Packet::new_checked(&m.data()[eth.l2_info().unwrap().header_len..]).unwrap();
            out.push(ip.dst_addr()[3]);
        }
    }
    out
}

#[test]
fn reload_applies_backend_and_service_changes_without_moving_connections() {
    let mut b = bed("apply");
    let syns: Vec<Vec<u8>> = (0..3000).map(|i| tcp(i, tcp_flags::SYN)).collect();
    let before = send(&mut b, &syns);
    assert_eq!(before.len(), 3000);

    std::fs::write(&b.path, next()).unwrap();
    let msg = b.control.reload().expect("reload");
    assert!(msg.contains("1 backend(s) removed"), "{msg}");

    // Established connections: on a and b they stay (a drains, it is not
    // removed); those on the removed c move, to b or d.
    let acks: Vec<Vec<u8>> = (0..3000).map(|i| tcp(i, tcp_flags::ACK)).collect();
    let after = send(&mut b, &acks);
    assert_eq!(after.len(), 3000, "nothing dropped across the reload");
    for (x, y) in before.iter().zip(&after) {
        match x {
            1 | 2 => assert_eq!(x, y, "an established connection moved"),
            3 => assert!(*y == 2 || *y == 4, "c's connection went to {y}"),
            _ => unreachable!(),
        }
    }
    // New connections: never to the drained a or the removed c; d gets some.
    let fresh: Vec<Vec<u8>> = (5000..8000).map(|i| tcp(i, tcp_flags::SYN)).collect();
    let new = send(&mut b, &fresh);
    assert!(new.iter().all(|d| *d == 2 || *d == 4), "{new:?}");
    assert!(new.iter().filter(|d| **d == 4).count() > 1000);
    // The added service works.
    let dns = FrameSpec::udp_v4([198, 18, 0, 1], 5353, [192, 0, 2, 53], 53)
        .build()
        .unwrap();
    assert_eq!(send(&mut b, &[dns]), vec![1], "to r1 at 10.0.5.1");
    let c = b.worker.counters();
    assert_eq!(c.total_drops(), 0);
    assert_eq!(c.rx_packets.get(), c.tx_packets.get());
}

#[test]
fn a_bad_file_is_refused_with_the_check_error_and_nothing_changes() {
    let mut b = bed("bad");
    let syns: Vec<Vec<u8>> = (0..500).map(|i| tcp(i, tcp_flags::SYN)).collect();
    let before = send(&mut b, &syns);
    let generation = b.control.plane().dataplane().generation;

    let bad = base().replace(
        "address = \"10.0.0.2\"\nweight = 100",
        "address = \"10.0.0.2\"\nweight = 70000",
    );
    assert_ne!(bad, base(), "b's weight replaced");
    std::fs::write(&b.path, &bad).unwrap();
    let err = b.control.reload().unwrap_err();
    let check = Config::load(&b.path).unwrap_err().to_string();
    assert_eq!(err, check, "the same error as `pktdist check`");
    assert!(err.contains("weight"), "{err}");
    assert_eq!(
        b.control.plane().dataplane().generation,
        generation,
        "no new snapshot"
    );

    // Unknown keys are refused the same way.
    std::fs::write(&b.path, format!("{}\nbogus = 1\n", base())).unwrap();
    assert!(b.control.reload().unwrap_err().contains("bogus"));

    // Traffic keeps flowing on the running configuration.
    let acks: Vec<Vec<u8>> = (0..500).map(|i| tcp(i, tcp_flags::ACK)).collect();
    assert_eq!(send(&mut b, &acks), before);
    let fresh: Vec<Vec<u8>> = (900..1500).map(|i| tcp(i, tcp_flags::SYN)).collect();
    let new = send(&mut b, &fresh);
    assert!(
        (1..=3).all(|k| new.contains(&k)),
        "all three backends still in use"
    );
}

#[test]
fn reload_names_settings_that_need_a_restart() {
    let mut b = bed("restart");
    std::fs::write(&b.path, base().replace("workers = [1]", "workers = [1, 2]")).unwrap();
    let msg = b.control.reload().unwrap();
    assert!(msg.contains("[cores]"), "{msg}");
}
