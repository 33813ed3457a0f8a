//! End to end through the real `pktdist` binary under DPDK: a pcap file of
//! crafted traffic goes in through `net_pcap`, the workers distribute it,
//! and the pcap `pktdist` writes is checked by an independent dissector
//! (tshark) and by the project's own parser, against the run's JSON summary.
#![cfg(feature = "dpdk")]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::Duration;

use common::{
    base_config, field, ipip_service, path_str, port_toml, read_pcap, serial, web_service,
    write_pcap, Dissected, Pktdist, TempDir, GATEWAY,
};
use pktdist::datapath::classify;
use pktdist::types::{tcp_flags, Family, FlowKey, PROTO_TCP, PROTO_UDP};
use pktdist::wire::build::{FrameSpec, L4};
use pktdist::wire::{ethernet, ipv4, ipv6};

const VIP: [u8; 4] = [192, 0, 2, 10];
const DNS_VIP: [u8; 4] = [192, 0, 2, 53];
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const IPIP_SRC: [u8; 4] = [198, 51, 100, 1];
const IPIP_SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The web service's backends: (address, weight).
const WEB: [([u8; 4], u32); 3] = [
    ([10, 0, 0, 1], 100),
    ([10, 0, 0, 2], 200),
    ([10, 0, 0, 3], 300),
];
const DNS: [[u8; 4]; 2] = [[10, 0, 2, 1], [10, 0, 2, 2]];
const WEB6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2),
];

const WEB_CLIENTS: usize = 900;
const DNS_CLIENTS: usize = 60;
const WEB6_CLIENTS: usize = 4;

fn services() -> String {
    [
        web_service(
            "",
            &[
                ("be1", "10.0.0.1", Some(WEB[0].1)),
                ("be2", "10.0.0.2", Some(WEB[1].1)),
                ("be3", "10.0.0.3", Some(WEB[2].1)),
            ],
        ),
        ipip_service(
            "dns",
            "192.0.2.53",
            53,
            "udp",
            "",
            &[("ns1", "10.0.2.1", None), ("ns2", "10.0.2.2", None)],
        ),
        ipip_service(
            "web6",
            "2001:db8::10",
            443,
            "tcp",
            "",
            &[
                ("v6a", "2001:db8:1::1", None),
                ("v6b", "2001:db8:1::2", None),
            ],
        ),
    ]
    .concat()
}

/// One input frame and what pktdist must do with it.
struct Input {
    frame: Vec<u8>,
    /// The drop reason expected, or None: forwarded.
    drop: Option<&'static str>,
}

fn fwd(frame: Vec<u8>) -> Input {
    Input { frame, drop: None }
}

fn dropped(frame: Vec<u8>, reason: &'static str) -> Input {
    Input {
        frame,
        drop: Some(reason),
    }
}

fn tcp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    FrameSpec {
        l4: L4::Tcp {
            flags,
            seq: 1000 + u32::from(flags),
            ack: if flags & tcp_flags::ACK != 0 { 7 } else { 0 },
            window: 29200,
        },
        payload,
        ..FrameSpec::tcp_v4(src, sport, dst, dport, flags)
    }
    .build()
    .expect("tcp4 frame")
}

fn web_client(i: usize) -> [u8; 4] {
    [
        10,
        1 + (i / 250) as u8,
        (i % 250) as u8,
        1 + (i * 7 % 200) as u8,
    ]
}

/// The input: web connections (SYN and two data segments each, flows
/// interleaved), UDP requests, IPv6 connections, and frames that must be
/// dropped, each for its reason, scattered between them.
fn inputs() -> Vec<Input> {
    let get = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n";
    let mut v = Vec::new();
    for round in 0..3u8 {
        for i in 0..WEB_CLIENTS {
            let (flags, payload): (u8, &[u8]) = match round {
                0 => (tcp_flags::SYN, b""),
                1 => (tcp_flags::ACK | tcp_flags::PSH, get),
                _ => (tcp_flags::ACK, b""),
            };
            v.push(fwd(tcp4(
                web_client(i),
                40000 + i as u16,
                VIP,
                80,
                flags,
                payload,
            )));
            if i % 97 == 0 && round == 1 {
                v.push(dropped(
                    tcp4(
                        web_client(i),
                        40000,
                        [192, 0, 2, 99],
                        80,
                        tcp_flags::SYN,
                        b"",
                    ),
                    "no_service",
                ));
            }
        }
    }
    for i in 0..DNS_CLIENTS {
        // A DNS query for example.com/A (tshark dissects it: keep it valid).
        let mut q = vec![0x12, i as u8, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x07example\x03com\x00\x00\x01\x00\x01");
        let f = FrameSpec {
            payload: &q,
            ..FrameSpec::udp_v4([172, 16, 0, 1 + i as u8], 5353 + i as u16, DNS_VIP, 53)
        }
        .build()
        .expect("udp frame");
        v.push(fwd(f));
    }
    for round in 0..3u8 {
        for i in 0..WEB6_CLIENTS {
            let src = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 5 + i as u16).octets();
            let flags = match round {
                0 => tcp_flags::SYN,
                1 => tcp_flags::ACK | tcp_flags::PSH,
                _ => tcp_flags::ACK | tcp_flags::FIN,
            };
            let f = FrameSpec {
                payload: if round == 1 { b"hello over v6" } else { b"" },
                ..FrameSpec::tcp_v6(src, 50000 + i as u16, VIP6.octets(), 443, flags)
            }
            .build()
            .expect("tcp6 frame");
            v.push(fwd(f));
        }
    }

    // Not for a service: wrong port of the VIP, and an unknown address.
    for i in 0..5u16 {
        v.insert(
            100 + 300 * i as usize,
            dropped(
                tcp4([10, 9, 9, 9], 1000 + i, VIP, 81, tcp_flags::SYN, b""),
                "no_service",
            ),
        );
    }
    // ARP requests.
    for i in 0..4u8 {
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&[0x02, 0, 0, 0, 0x0a, i]);
        arp.extend_from_slice(&ethernet::ETHERTYPE_ARP.to_be_bytes());
        arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1, 0x02, 0, 0, 0, 0x0a, i]);
        arp.extend_from_slice(&[10, 1, 0, i, 0, 0, 0, 0, 0, 0, 192, 0, 2, 10]);
        arp.resize(60, 0);
        v.insert(50 + 400 * i as usize, dropped(arp, "not_ip"));
    }
    // ICMP (protocol 1) to the VIP that is no ICMP message pktdist
    // handles (tests/e2e_icmp.rs has the ones it does), and GRE.
    for i in 0..3u8 {
        let mut f = FrameSpec::udp_v4([10, 8, 0, i], 7, VIP, 80)
            .build()
            .expect("frame");
        let mut ip = ipv4::Packet::new_unchecked(&mut f[14..]);
        ip.set_protocol(1);
        ip.fill_checksum();
        v.insert(70 + 500 * i as usize, dropped(f, "icmp"));
        let mut g = FrameSpec::udp_v4([10, 8, 1, i], 7, VIP, 80)
            .build()
            .expect("frame");
        let mut ip = ipv4::Packet::new_unchecked(&mut g[14..]);
        ip.set_protocol(47);
        ip.fill_checksum();
        v.insert(75 + 500 * i as usize, dropped(g, "unsupported_l4"));
    }
    // Fragments of a packet to the service.
    for i in 0..2u16 {
        let mut f = tcp4([10, 7, 0, 1], 3000 + i, VIP, 80, tcp_flags::SYN, b"");
        let mut ip = ipv4::Packet::new_unchecked(&mut f[14..]);
        ip.set_frag(false, i == 0, if i == 0 { 0 } else { 185 });
        ip.fill_checksum();
        v.insert(900 + 700 * i as usize, dropped(f, "fragment"));
    }
    // Malformed: the IP length leaves no room for the TCP header it claims.
    let mut f = tcp4([10, 6, 0, 1], 4000, VIP, 80, tcp_flags::SYN, b"");
    let mut ip = ipv4::Packet::new_unchecked(&mut f[14..]);
    ip.set_total_len(24);
    ip.fill_checksum();
    v.insert(1234, dropped(f, "malformed"));
    v
}

/// The IP packet inside an Ethernet frame (without padding).
fn l3_packet(frame: &[u8]) -> &[u8] {
    let l3 = &frame[14..];
    match u16::from_be_bytes([frame[12], frame[13]]) {
        ethernet::ETHERTYPE_IPV4 => &l3[..usize::from(ipv4::Packet::new_unchecked(l3).total_len())],
        ethernet::ETHERTYPE_IPV6 => &l3[..ipv6::Packet::new_unchecked(l3).total_len()],
        t => panic!("not IP: {t:#x}"),
    }
}

const TSHARK_FIELDS: [&str; 16] = [
    "frame.number",
    "eth.dst",
    "ip.src",
    "ip.dst",
    "ip.proto",
    "ip.checksum.status",
    "ipv6.src",
    "ipv6.dst",
    "ipv6.nxt",
    "tcp.srcport",
    "tcp.dstport",
    "tcp.flags",
    "tcp.checksum.status",
    "udp.dstport",
    "udp.checksum.status",
    "_ws.malformed",
];

/// Runs tshark over `pcap` with checksum validation on.
fn tshark(pcap: &std::path::Path) -> Vec<Dissected> {
    common::tshark(pcap, &TSHARK_FIELDS, &["-o", "tcp.check_checksum:TRUE"])
}

#[test]
fn pcap_in_tshark_out_weights_checksums_and_summary_agree() {
    pcap_run(None);
}

/// The same file with the SYN flood guard engaged by its first few SYNs
/// (100 per second: 10 per window): the SYNs after those go untracked,
/// and every connection's later packets still reach its SYN's backend,
/// IPv4 and IPv6 alike, with the same counts.
#[test]
fn pcap_through_an_engaged_syn_flood_guard_keeps_each_connection_on_its_backend() {
    pcap_run(Some(100));
}

/// Replays the crafted file through pktdist (with `[flow] syn_flood_rate`
/// when given) and checks its output and summary.
fn pcap_run(syn_flood_rate: Option<u32>) {
    let _serial = serial();
    let dir = TempDir::new("e2e-pcap");
    let input = dir.path("in.pcap");
    let output = dir.path("out.pcap");
    let summary_path = dir.path("summary.json");
    let config = dir.path("pktdist.toml");

    let inputs = inputs();
    let frames: Vec<Vec<u8>> = inputs.iter().map(|i| i.frame.clone()).collect();
    write_pcap(&input, &frames);
    let forwarded: Vec<&Input> = inputs.iter().filter(|i| i.drop.is_none()).collect();
    let mut want_drops: BTreeMap<&str, u64> = BTreeMap::new();
    for i in &inputs {
        if let Some(r) = i.drop {
            *want_drops.entry(r).or_insert(0) += 1;
        }
    }

    let mut base = base_config(&["be1", "be2", "be3"]);
    if let Some(rate) = syn_flood_rate {
        base = base.replace("[flow]\n", &format!("[flow]\nsyn_flood_rate = {rate}\n"));
    }
    let toml = [
        base,
        port_toml(&format!(
            "net_pcap0,rx_pcap={},tx_pcap={}",
            input.display(),
            output.display()
        )),
        services(),
    ]
    .concat();
    std::fs::write(&config, toml).expect("write config");

    let check = Command::new(common::PKTDIST)
        .args(["check", "--config", path_str(&config)])
        .output()
        .expect("pktdist check");
    assert!(
        check.status.success(),
        "pktdist check refused the test configuration: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    let run = Pktdist::spawn(&[
        "run",
        "--config",
        path_str(&config),
        // The file is read once, in milliseconds; the rest is margin for
        // a loaded machine (the clock starts with the workers).
        "--duration",
        "3",
        "--quiet",
        "--summary-json",
        path_str(&summary_path),
    ]);
    let done = run.wait(Duration::from_secs(90));
    assert!(
        done.status.success(),
        "pktdist run failed: {}\n--- stderr\n{}\n--- stdout\n{}",
        done.status,
        done.stderr,
        done.stdout
    );

    // The summary adds up.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).expect("summary written"))
            .expect("summary is JSON");
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"));
    let rx = n(&summary["rx_packets"]);
    let tx = n(&summary["tx_packets"]);
    let drops: BTreeMap<String, u64> = summary["drops"]
        .as_object()
        .expect("drops")
        .iter()
        .map(|(k, v)| (k.clone(), n(v)))
        .collect();
    // Every frame of the file was received: nothing flushed at start-up.
    assert_eq!(rx, frames.len() as u64, "frames received");
    assert_eq!(tx, forwarded.len() as u64, "frames forwarded");
    assert_eq!(rx, tx + drops.values().sum::<u64>(), "rx = tx + drops");
    for (reason, count) in &drops {
        let want = want_drops.get(reason.as_str()).copied().unwrap_or(0);
        assert_eq!(*count, want, "drops for {reason}: {drops:?}");
    }
    for reason in want_drops.keys() {
        assert!(drops.contains_key(*reason), "no drop counter {reason}");
    }
    let port = summary["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == "p0"))
        .expect("port p0 in the summary");
    assert_eq!(n(&port["ipackets"]), rx);
    assert_eq!(n(&port["opackets"]), tx);
    let syns = (WEB_CLIENTS + WEB6_CLIENTS) as u64;
    assert_eq!(n(&summary["syns"]), syns, "SYNs of service connections");
    let untracked = n(&summary["syns_untracked"]);
    match syn_flood_rate {
        // The default rate: a file read in milliseconds stays below it.
        None => assert_eq!(untracked, 0, "SYNs untracked"),
        // Past the window's first 10 (and a few more for each window that
        // a slow read leaves below the rate), untracked.
        Some(_) => assert!(
            untracked >= syns / 2 && untracked <= syns - 10,
            "{untracked} of {syns} SYNs untracked"
        ),
    }
    assert_eq!(
        n(&summary["new_connections"]),
        (WEB_CLIENTS + DNS_CLIENTS + WEB6_CLIENTS) as u64
    );
    let service = |name: &str| {
        summary["services"]
            .as_array()
            .expect("services")
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("service {name} in summary"))
            .clone()
    };
    let web = service("web");
    assert_eq!(n(&web["new_connections"]), WEB_CLIENTS as u64);
    assert_eq!(n(&web["packets"]), 3 * WEB_CLIENTS as u64);
    assert_eq!(n(&service("dns")["packets"]), DNS_CLIENTS as u64);
    assert_eq!(n(&service("web6")["packets"]), 3 * WEB6_CLIENTS as u64);

    // The project's own parser: each output frame, in order, is the next
    // forwarded input, encapsulated whole, to a backend of its service.
    let out = read_pcap(&output);
    assert_eq!(out.len(), forwarded.len(), "frames in the output pcap");
    let mut web_conns: BTreeMap<[u8; 4], u64> = BTreeMap::new();
    let mut backend_of_flow: HashMap<FlowKey, IpAddr> = HashMap::new();
    for (k, (o, i)) in out.iter().zip(&forwarded).enumerate() {
        let eth = ethernet::Frame::new_checked(&o[..]).expect("ethernet");
        assert_eq!(
            eth.dst_addr(),
            [0x02, 0, 0, 0, 0, 0xfe],
            "frame {k}: next hop"
        );
        let inner = l3_packet(&i.frame);
        let p = classify::parse(&i.frame).expect("forwarded input parses");
        let outer_dst: IpAddr = match p.key.family {
            Family::V4 => {
                assert_eq!(eth.ethertype(), ethernet::ETHERTYPE_IPV4, "frame {k}");
                let ip = ipv4::Packet::new_checked(&o[14..]).expect("outer IPv4");
                assert!(ip.verify_checksum(), "frame {k}: outer IPv4 checksum");
                assert_eq!(ip.protocol(), ipv4::PROTO_IPIP, "frame {k}");
                assert_eq!(ip.src_addr(), IPIP_SRC, "frame {k}");
                assert_eq!(ip.payload(), inner, "frame {k}: inner packet changed");
                IpAddr::V4(Ipv4Addr::from(ip.dst_addr()))
            }
            Family::V6 => {
                assert_eq!(eth.ethertype(), ethernet::ETHERTYPE_IPV6, "frame {k}");
                let ip = ipv6::Packet::new_checked(&o[14..]).expect("outer IPv6");
                assert_eq!(ip.next_header(), ipv6::PROTO_IPV6, "frame {k}");
                assert_eq!(ip.src_addr(), IPIP_SRC6.octets(), "frame {k}");
                assert_eq!(ip.payload(), inner, "frame {k}: inner packet changed");
                IpAddr::V6(Ipv6Addr::from(ip.dst_addr()))
            }
        };
        let allowed: Vec<IpAddr> = if p.key.family == Family::V6 {
            WEB6.iter().map(|&a| IpAddr::V6(a)).collect()
        } else if p.key.proto == PROTO_UDP {
            DNS.iter().map(|&a| IpAddr::from(a)).collect()
        } else {
            WEB.iter().map(|&(a, _)| IpAddr::from(a)).collect()
        };
        assert!(
            allowed.contains(&outer_dst),
            "frame {k}: {outer_dst} is not a backend of its service"
        );
        // Every packet of a connection reaches the same backend.
        let first = *backend_of_flow.entry(p.key).or_insert(outer_dst);
        assert_eq!(first, outer_dst, "frame {k}: flow changed backend");
        if p.key.family == Family::V4 && p.key.proto == PROTO_TCP && p.is_syn() {
            if let IpAddr::V4(a) = outer_dst {
                *web_conns.entry(a.octets()).or_insert(0) += 1;
            }
        }
    }

    // Connections spread in proportion to the weights, and the summary's
    // per-backend counts are what reached the wire.
    let total_weight: u32 = WEB.iter().map(|w| w.1).sum();
    for (addr, weight) in WEB {
        let got = web_conns.get(&addr).copied().unwrap_or(0);
        let share = got as f64 / WEB_CLIENTS as f64;
        let want = f64::from(weight) / f64::from(total_weight);
        assert!(
            (share - want).abs() < 0.05,
            "backend {addr:?}: {got} of {WEB_CLIENTS} connections ({share:.3}), weight share {want:.3}"
        );
        let be = web["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .find(|b| b["address"] == IpAddr::from(addr).to_string())
            .expect("backend in summary");
        assert_eq!(
            n(&be["connections"]),
            got,
            "summary connections of {addr:?}"
        );
        assert_eq!(n(&be["packets"]), 3 * got, "summary packets of {addr:?}");
    }

    // The independent dissector agrees frame by frame.
    let dissected = tshark(&output);
    assert_eq!(dissected.len(), forwarded.len(), "frames tshark read");
    let mut tshark_conns: BTreeMap<String, u64> = BTreeMap::new();
    for (k, (d, i)) in dissected.iter().zip(&forwarded).enumerate() {
        let p = classify::parse(&i.frame).expect("parses");
        assert!(field(d, "_ws.malformed").is_empty(), "frame {k}: malformed");
        assert_eq!(field(d, "eth.dst"), [GATEWAY], "frame {k}");
        let (outer_dst, inner_dst) = match p.key.family {
            Family::V4 => {
                assert_eq!(field(d, "ip.proto")[0], "4", "frame {k}: outer protocol");
                assert_eq!(field(d, "ip.src")[0], "198.51.100.1", "frame {k}");
                let status = field(d, "ip.checksum.status");
                assert_eq!(status.len(), 2, "frame {k}: two IPv4 headers");
                assert!(
                    status.iter().all(|s| s == "1"),
                    "frame {k}: IPv4 checksums {status:?}"
                );
                let dst = field(d, "ip.dst");
                assert_eq!(dst.len(), 2, "frame {k}: {dst:?}");
                (dst[0].clone(), dst[1].clone())
            }
            Family::V6 => {
                assert_eq!(
                    field(d, "ipv6.nxt")[0],
                    "41",
                    "frame {k}: outer next header"
                );
                assert_eq!(field(d, "ipv6.src")[0], "2001:db8::1", "frame {k}");
                let dst = field(d, "ipv6.dst");
                assert_eq!(dst.len(), 2, "frame {k}: {dst:?}");
                (dst[0].clone(), dst[1].clone())
            }
        };
        let vip: IpAddr = match p.key.family {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(p.key.dst as u32)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(p.key.dst)),
        };
        assert_eq!(inner_dst, vip.to_string(), "frame {k}: inner destination");
        if p.key.proto == PROTO_TCP {
            assert_eq!(
                field(d, "tcp.checksum.status"),
                ["1"],
                "frame {k}: TCP checksum"
            );
            assert_eq!(field(d, "tcp.srcport"), [p.key.sport.to_string()]);
            assert_eq!(field(d, "tcp.dstport"), [p.key.dport.to_string()]);
            if p.key.family == Family::V4 && p.is_syn() {
                assert_eq!(field(d, "tcp.flags"), ["0x0002"], "frame {k}");
                *tshark_conns.entry(outer_dst).or_insert(0) += 1;
            }
        } else {
            assert_eq!(
                field(d, "udp.checksum.status"),
                ["1"],
                "frame {k}: UDP checksum"
            );
            assert_eq!(field(d, "udp.dstport"), ["53"]);
        }
    }
    let ours: BTreeMap<String, u64> = web_conns
        .iter()
        .map(|(a, c)| (Ipv4Addr::from(*a).to_string(), *c))
        .collect();
    assert_eq!(
        tshark_conns, ours,
        "connections per backend, tshark vs ours"
    );
}
