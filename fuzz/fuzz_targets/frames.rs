//! Frames on a worker's ports: every frame, however malformed, is
//! forwarded, answered, passed on or counted as a drop, none panics the
//! worker, and every header the worker writes (an IP-in-IP outer header,
//! an ICMP message of its own, a fragment) is well formed: its length
//! within the frame, its checksums right.
//!
//! The input is a list of frames, each `[mode, advance, len lo, len hi,
//! bytes...]`: mode's low bit set takes the bytes as the whole frame;
//! clear, it lays them (XOR) over one of the templates below (a frame of
//! every kind the worker knows, so that the fuzzer starts past the
//! headers' checks) and cuts the result to `len`. `advance` moves the
//! clock (2^advance ns, up to about 9 minutes), so that flows expire and
//! rate limits refill. The bed has the kinds of service a configuration
//! can hold: IPv4 TCP over IP-in-IP with automatic affinity and affinities
//! of a /24 and a /32, UDP over L2, round robin, IPv6, ICMP echo, an MTU
//! the largest templates exceed, and a port that takes what is not for a
//! service.

#![no_main]

use std::sync::Arc;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;

use pktdist::affinity::auto::AutoAffinityTable;
use pktdist::affinity::key::TableKey;
use pktdist::affinity::table::AffinityTable;
use pktdist::datapath::counters::WorkerCounters;
use pktdist::datapath::pktio::{MemBuf, MemIo, PacketBuf};
use pktdist::datapath::snapshot::DataplaneCell;
use pktdist::datapath::worker::{PortPlan, Shared, Worker, WorkerSetup};
use pktdist::types::{tcp_flags, Family, PortMatch};
use pktdist::wire::build::FrameSpec;

const CONFIG: &str = r#"
[[ports]]
name = "in"
device = "net_ring0"
forward_to = "out"
[[ports]]
name = "out"
device = "net_ring1"
gateway_mac = "02:00:00:00:00:fe"
[flow]
capacity = 64
capacity_v6 = 16
syn_flood_rate = 50
[icmp]
echo = true
echo_rate = 5
too_big_rate = 2

[[services]]
name = "web"
maglev_table_size = 307
vip = "192.0.2.10"
port = 80
protocol = "tcp"
forwarding = "ipip"
ipip_source = "198.51.100.1"
hash = "client"
auto_affinity = { linger = "1s" }
[[services.backends]]
name = "a"
address = "10.0.0.1"
mac = "02:00:00:00:00:01"
[[services.backends]]
name = "b"
address = "10.0.0.2"
weight = 0
[[services.backends]]
name = "c"
address = "10.0.0.3"
weight = 300

[[services]]
name = "dns"
maglev_table_size = 211
vip = "192.0.2.10"
port = 53
protocol = "udp"
forwarding = "l2"
[[services.backends]]
name = "d1"
address = "10.0.1.1"
mac = "02:00:00:00:01:01"
[[services.backends]]
name = "d2"
address = "10.0.1.2"
mac = "02:00:00:00:01:02"

[[services]]
name = "rr"
maglev_table_size = 101
vip = "192.0.2.20"
port = 443
protocol = "tcp"
scheduler = "round_robin"
forwarding = "l2"
[[services.backends]]
name = "r1"
address = "10.0.2.1"
mac = "02:00:00:00:02:01"

[[services]]
name = "web6"
maglev_table_size = 211
vip = "2001:db8::10"
port = 80
protocol = "tcp"
forwarding = "ipip"
ipip_source = "2001:db8:ffff::1"
[[services.backends]]
name = "s1"
address = "2001:db8:1::1"
[[services.backends]]
name = "s2"
address = "2001:db8:1::2"
"#;

const CLIENT: [u8; 4] = [198, 18, 0, 7];
const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0xc, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
const VIP: [u8; 4] = [192, 0, 2, 10];
const VIP6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

/// A frame of every kind the worker tells apart.
fn templates() -> Vec<Vec<u8>> {
    let big = vec![0x5a; 1600];
    let specs = [
        FrameSpec::tcp_v4(CLIENT, 1000, VIP, 80, tcp_flags::SYN),
        FrameSpec::tcp_v4(CLIENT, 1000, VIP, 80, tcp_flags::ACK),
        FrameSpec::tcp_v4(CLIENT, 1000, VIP, 80, tcp_flags::FIN | tcp_flags::ACK),
        FrameSpec::tcp_v4(CLIENT, 1000, VIP, 80, tcp_flags::RST),
        FrameSpec::udp_v4(CLIENT, 1001, VIP, 53),
        FrameSpec::tcp_v4(CLIENT, 1002, [192, 0, 2, 20], 443, tcp_flags::SYN),
        FrameSpec::tcp_v6(CLIENT6, 1003, VIP6, 80, tcp_flags::SYN),
        FrameSpec::tcp_v6(CLIENT6, 1003, VIP6, 80, tcp_flags::ACK),
        FrameSpec::udp_v6(CLIENT6, 1004, VIP6, 80),
        // Echo requests, and a "fragmentation needed" from a router on
        // the client's path (its quote a packet of the VIP's).
        FrameSpec::icmp_v4(CLIENT, VIP, 8, 0, 1),
        FrameSpec::icmp_v6(CLIENT6, VIP6, 128, 0, 1),
        FrameSpec::icmp_v4([203, 0, 113, 1], VIP, 3, 4, 1400),
        FrameSpec::icmp_v6(
            [0x20, 0x01, 0x0d, 0xb8, 0xf, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            VIP6,
            2,
            0,
            1280,
        ),
        // Larger than the MTU, with and without DF.
        FrameSpec {
            payload: &big,
            ..FrameSpec::udp_v4(CLIENT, 1005, VIP, 53)
        },
        FrameSpec {
            payload: &big,
            dont_frag: true,
            ..FrameSpec::tcp_v4(CLIENT, 1000, VIP, 80, tcp_flags::ACK)
        },
        FrameSpec {
            payload: &big,
            ..FrameSpec::tcp_v6(CLIENT6, 1003, VIP6, 80, tcp_flags::ACK)
        },
        // Tagged; with IPv4 options; with IPv6 extension headers (hop by
        // hop and destination options, and a fragment header).
        FrameSpec {
            vlan: Some(7),
            ..FrameSpec::tcp_v4(CLIENT, 1006, VIP, 80, tcp_flags::SYN)
        },
        FrameSpec {
            ipv4_options: &[1, 1, 1, 0],
            ..FrameSpec::tcp_v4(CLIENT, 1007, VIP, 80, tcp_flags::SYN)
        },
        FrameSpec {
            ipv6_ext: &[(0, &[0; 8]), (60, &[0; 8])],
            ..FrameSpec::tcp_v6(CLIENT6, 1008, VIP6, 80, tcp_flags::SYN)
        },
        FrameSpec {
            ipv6_ext: &[(44, &[0; 8])],
            ..FrameSpec::udp_v6(CLIENT6, 1009, VIP6, 80)
        },
    ];
    specs.iter().map(|s| s.build().expect("template")).collect()
}

/// Ones'-complement sum of `data` (RFC 1071), folded; independent of
/// pktdist's own.
fn ones_sum(data: &[u8], mut acc: u32) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

const IPIP_SOURCE: [u8; 4] = [198, 51, 100, 1];
const IPIP_SOURCE6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
];

/// Checks the headers the worker wrote into a frame it sent: an outer
/// IPv4 or IPv6 header of IP-in-IP (from the services' `ipip_source`), or
/// an IPv4 packet of its own from a VIP (an echo reply, a "fragmentation
/// needed", a fragment). Frames it forwarded as they came (L2 services,
/// the port for what is not a service's) carry the sender's headers, which
/// are not its to mend.
fn check_written(frame: &[u8]) {
    if frame.len() < 18 {
        return;
    }
    let mut l3 = 14;
    let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype == 0x8100 {
        ethertype = u16::from_be_bytes([frame[16], frame[17]]);
        l3 = 18;
    }
    let ip = &frame[l3..];
    match ethertype {
        0x0800 => {
            if ip.len() < 20 {
                return;
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let src: [u8; 4] = ip[12..16].try_into().unwrap();
            let ours = src == IPIP_SOURCE || (src == VIP && ip[9] == 1);
            if !ours {
                return;
            }
            assert_eq!(ip[0] >> 4, 4, "{frame:02x?}: version");
            assert!(ihl >= 20 && ip.len() >= ihl, "{frame:02x?}: header length");
            assert_eq!(
                ones_sum(&ip[..ihl], 0),
                0xffff,
                "{frame:02x?}: header checksum"
            );
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            assert!(
                total >= ihl && total <= ip.len(),
                "{frame:02x?}: total length {total}"
            );
            let frag = u16::from_be_bytes([ip[6], ip[7]]);
            if ip[9] == 1 && frag & 0x3fff == 0 {
                assert_eq!(
                    ones_sum(&ip[ihl..total], 0),
                    0xffff,
                    "{frame:02x?}: ICMP checksum"
                );
            }
        }
        0x86dd => {
            if ip.len() < 40 || ip[8..24] != IPIP_SOURCE6 {
                return;
            }
            assert_eq!(ip[0] >> 4, 6, "{frame:02x?}: version");
            let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            assert!(
                40 + payload <= ip.len(),
                "{frame:02x?}: payload length {payload}"
            );
        }
        _ => {}
    }
}

struct Bed {
    worker: Worker<MemIo>,
    counters: Arc<WorkerCounters>,
    templates: Vec<Vec<u8>>,
    now: u64,
}

fn bed() -> Bed {
    let cfg = pktdist_fuzz::config(CONFIG);
    let (_, dp) = pktdist_fuzz::dataplane(&cfg);
    let (mut writer, reader) = AffinityTable::new(64);
    // A /24 of backend a's, and a static /32 (some ports) of b's, which
    // drains.
    let a24 = TableKey::new(0, Family::V4, 0xc612_0000, 24, PortMatch::Any).unwrap();
    let a32 = TableKey::new(0, Family::V4, 0xc612_0007, 32, PortMatch::Range(1000, 2000)).unwrap();
    writer.insert(a24, dp.services[0].backends[0]).unwrap();
    writer
        .insert_static(a32, dp.services[0].backends[1])
        .unwrap();
    let shared = Shared {
        dataplane: Arc::new(DataplaneCell::new(dp)),
        affinity: reader,
        auto_affinity: Arc::new(AutoAffinityTable::new(16)),
        epoch: Instant::now(),
    };
    let gateway = Some([0x02, 0, 0, 0, 0, 0xfe]);
    let plan = |out| PortPlan {
        forward_to: out,
        gateway_mac: gateway,
        unmatched_to: (out == 1).then_some(1),
        mtu: 1500,
    };
    let setup = WorkerSetup {
        id: 0,
        ports: vec![plan(1), plan(0)],
        flow_capacity: cfg.flow.capacity,
        flow_capacity_v6: cfg.flow.v6_capacity(),
        timeouts: cfg.flow_timeouts(),
        syn_flood_rate: cfg.flow.syn_flood_rate,
        icmp: cfg.icmp_settings(),
    };
    let counters = Arc::new(WorkerCounters::default());
    let worker = Worker::new(MemIo::new(2), setup, shared, Arc::clone(&counters));
    // The writer may go: the table stays, read-only.
    drop(writer);
    Bed {
        worker,
        counters,
        templates: templates(),
        now: 1_000_000_000,
    }
}

/// What the worker counted of the frames it did not send: its drops and
/// ICMP drops (a frame passed on to the other port is sent).
fn counted(c: &WorkerCounters) -> u64 {
    c.drops
        .iter()
        .chain(c.icmp_drops.iter())
        .map(|x| x.get())
        .sum::<u64>()
}

fn sent(io: &MemIo) -> usize {
    io.tx.iter().map(Vec::len).sum()
}

fuzz_target!(|data: &[u8]| {
    let mut b = bed();
    let mut rest = data;
    let mut received = 0;
    while rest.len() >= 4 {
        let (mode, advance) = (rest[0], rest[1]);
        let len = usize::from(u16::from_le_bytes([rest[2], rest[3]])) % 2048;
        let take = len.min(rest.len() - 4);
        let bytes = &rest[4..4 + take];
        rest = &rest[4 + take..];
        let frame = if mode & 1 == 1 {
            bytes.to_vec()
        } else {
            let mut f = b.templates[usize::from(mode >> 1) % b.templates.len()].clone();
            let n = f.len();
            for (i, x) in bytes.iter().enumerate() {
                f[i % n] ^= x;
            }
            f.truncate(len.max(1));
            f
        };
        b.now += 1u64 << (advance % 40);
        let before = (counted(&b.counters), sent(b.worker.io_mut()));
        b.worker.io_mut().rx[0].push_back(MemBuf::from_frame(&frame));
        b.worker.poll(b.now);
        received += 1;
        let after = (counted(&b.counters), sent(b.worker.io_mut()));
        for tx in &b.worker.io_mut().tx {
            for f in tx {
                check_written(f.data());
            }
        }
        assert!(
            after.0 > before.0 || after.1 > before.1,
            "frame {frame:02x?}: neither sent nor counted"
        );
        assert_eq!(b.counters.rx_packets.get(), received);
        for tx in &mut b.worker.io_mut().tx {
            tx.clear();
        }
    }
});
