//! ICMP and path MTU end to end through the real `pktdist` binary under
//! DPDK: a pcap of crafted traffic goes in through `net_pcap`, and the pcap
//! `pktdist` writes is checked frame by frame by the project's own parser
//! and by an independent dissector (tshark, checksums verified), against
//! the run's JSON summary.
//!
//! IPv4 and IPv6, `ipip` and `l2`: a connection's SYN, then an ICMP error
//! quoting the backend's reply to that client, must reach the same backend
//! with the ICMP packet intact inside; an error about a connection pktdist
//! never saw must reach the backend that a mid-flow packet of that tuple
//! (sent later in the same run) reaches; malformed and foreign ICMP is
//! dropped with its reason; a 1500-byte DF packet for a port of MTU 1500
//! gets "fragmentation needed" with MTU 1480 back (IPv6: "packet too big",
//! 1460), within the per-source rate; a packet without DF is forwarded in
//! fragments; an echo request is answered where configured.
#![cfg(feature = "dpdk")]

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::Duration;

use common::{
    base_config, field, path_str, read_pcap, serial, write_pcap, Dissected, Pktdist, TempDir,
    GATEWAY,
};
use pktdist::types::tcp_flags;
use pktdist::wire::build::FrameSpec;
use pktdist::wire::icmp::{v4, v6};
use pktdist::wire::{checksum, ethernet, icmp, ipv4, ipv6};

const VIP: [u8; 4] = [192, 0, 2, 10];
const DNS_VIP: [u8; 4] = [192, 0, 2, 53];
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const ROUTER: [u8; 4] = [198, 51, 100, 254];
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0xfe);
/// Source MAC of every input frame (FrameSpec's default): where answers go.
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// How many "fragmentation needed" one client gets at once.
const TOO_BIG_RATE: u32 = 3;

fn services() -> String {
    let mut t = String::new();
    let svc = |name: &str, vip: &str, port: u16, proto: &str, mode: &str, extra: &str| {
        let fwd = if mode == "ipip" {
            let src = if vip.contains(':') {
                "2001:db8::1"
            } else {
                "198.51.100.1"
            };
            format!("forwarding = \"ipip\"\nipip_source = \"{src}\"\n")
        } else {
            "forwarding = \"l2\"\n".to_string()
        };
        format!(
            "\n[[services]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \"{proto}\"\n{fwd}{extra}"
        )
    };
    let backend = |name: &str, addr: &str, mac: Option<&str>| {
        let mac = mac.map(|m| format!("mac = \"{m}\"\n")).unwrap_or_default();
        format!("\n[[services.backends]]\nname = \"{name}\"\naddress = \"{addr}\"\n{mac}")
    };
    t.push_str(&svc("web4", "192.0.2.10", 80, "tcp", "ipip", ""));
    for i in 1..=3 {
        t.push_str(&backend(&format!("w{i}"), &format!("10.0.0.{i}"), None));
    }
    // Round robin: only the flow table knows where a connection went.
    t.push_str(&svc(
        "app4",
        "192.0.2.10",
        8080,
        "tcp",
        "l2",
        "scheduler = \"round_robin\"\n",
    ));
    for i in 1..=3 {
        t.push_str(&backend(
            &format!("a{i}"),
            &format!("10.0.1.{i}"),
            Some(&format!("02:00:00:00:01:0{i}")),
        ));
    }
    t.push_str(&svc("dns4", "192.0.2.53", 53, "udp", "ipip", ""));
    for i in 1..=2 {
        t.push_str(&backend(&format!("d{i}"), &format!("10.0.2.{i}"), None));
    }
    t.push_str(&svc("web6", "2001:db8::10", 443, "tcp", "ipip", ""));
    for i in 1..=3 {
        t.push_str(&backend(
            &format!("v{i}"),
            &format!("2001:db8:1::{i}"),
            None,
        ));
    }
    t.push_str(&svc("app6", "2001:db8::10", 8443, "tcp", "l2", ""));
    for i in 1..=3 {
        t.push_str(&backend(
            &format!("l{i}"),
            &format!("2001:db8:2::{i}"),
            Some(&format!("02:00:00:00:02:0{i}")),
        ));
    }
    t.push_str(&format!(
        "\n[icmp]\necho_vips = [\"192.0.2.53\"]\ntoo_big_rate = {TOO_BIG_RATE}\n"
    ));
    t
}

/// What pktdist must do with one input frame.
#[derive(Clone, Debug, PartialEq)]
enum Want {
    /// Forwarded to a backend, the packet intact: to the same backend as
    /// input `same_as` when given.
    Forward { same_as: Option<usize> },
    /// An echo reply to the sender.
    EchoReply,
    /// "Fragmentation needed" / "packet too big" to the sender, this MTU.
    TooBig(u32),
    /// Forwarded in two fragments of the outer packet.
    Fragments,
    /// Dropped: the summary's reason and, for `icmp`, the ICMP reason.
    Drop(&'static str, Option<&'static str>),
}

struct Input {
    what: String,
    frame: Vec<u8>,
    want: Want,
}

/// The IP packet of a frame without VLAN tags (padding cut).
fn ip_of(frame: &[u8]) -> &[u8] {
    let l3 = &frame[14..];
    let len = match u16::from_be_bytes([frame[12], frame[13]]) {
        ethernet::ETHERTYPE_IPV4 => usize::from(ipv4::Packet::new_unchecked(l3).total_len()),
        _ => ipv6::Packet::new_unchecked(l3).total_len(),
    };
    &l3[..len]
}

fn tcp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8, data: usize) -> Vec<u8> {
    let payload = vec![0x61; data];
    FrameSpec {
        payload: &payload,
        ..FrameSpec::tcp_v4(src, sport, dst, dport, flags)
    }
    .build()
    .expect("tcp4")
}

fn tcp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8, data: usize) -> Vec<u8> {
    let payload = vec![0x62; data];
    FrameSpec {
        payload: &payload,
        ..FrameSpec::tcp_v6(src.octets(), sport, dst.octets(), dport, flags)
    }
    .build()
    .expect("tcp6")
}

/// An ICMPv4 error from the router to `to` quoting `quote`.
fn error4(to: [u8; 4], t: u8, code: u8, rest: u32, quote: &[u8]) -> Vec<u8> {
    FrameSpec {
        payload: quote,
        ..FrameSpec::icmp_v4(ROUTER, to, t, code, rest)
    }
    .build()
    .expect("icmp4")
}

fn error6(to: Ipv6Addr, t: u8, rest: u32, quote: &[u8]) -> Vec<u8> {
    FrameSpec {
        payload: quote,
        ..FrameSpec::icmp_v6(ROUTER6.octets(), to.octets(), t, 0, rest)
    }
    .build()
    .expect("icmp6")
}

/// As a router quotes: at most 576 (IPv4) or 1280 (IPv6) bytes in all.
fn quote_of(reply: &[u8]) -> Vec<u8> {
    let ip = ip_of(reply);
    let max = if ip[0] >> 4 == 4 { 576 - 28 } else { 1280 - 48 };
    ip[..ip.len().min(max)].to_vec()
}

fn inputs() -> Vec<Input> {
    let mut v: Vec<Input> = Vec::new();
    let mut push = |what: String, frame: Vec<u8>, want: Want| {
        v.push(Input { what, frame, want });
        v.len() - 1
    };

    // IPv4, both forwarding modes: connections, then errors about them.
    for (svc, port) in [("web4", 80u16), ("app4", 8080)] {
        let client = |i: u8| [203, 0, 113, 10 + i];
        let mut syns = Vec::new();
        for i in 0..6u8 {
            let f = tcp4(
                client(i),
                41000 + u16::from(i),
                VIP,
                port,
                tcp_flags::SYN,
                0,
            );
            syns.push(push(
                format!("{svc} SYN {i}"),
                f,
                Want::Forward { same_as: None },
            ));
        }
        for i in 0..6u8 {
            // The backend's reply, a full-size segment, as the router quotes it.
            let reply = tcp4(
                VIP,
                port,
                client(i),
                41000 + u16::from(i),
                tcp_flags::ACK,
                1460,
            );
            let f = error4(
                VIP,
                v4::DEST_UNREACHABLE,
                v4::CODE_FRAG_NEEDED,
                1400,
                &quote_of(&reply),
            );
            push(
                format!("{svc} frag-needed about connection {i}"),
                f,
                Want::Forward {
                    same_as: Some(syns[usize::from(i)]),
                },
            );
        }
        // Errors about connections pktdist never saw; their mid-flow
        // packets come later in the run.
        for i in 0..8u8 {
            let reply = tcp4(
                VIP,
                port,
                [198, 18, 7, i],
                52000 + u16::from(i),
                tcp_flags::ACK,
                0,
            );
            let f = error4(VIP, v4::TIME_EXCEEDED, 0, 0, &ip_of(&reply)[..28]);
            push(
                format!("{svc} time exceeded about unseen {i}"),
                f,
                Want::Forward { same_as: None },
            );
        }
    }
    // IPv6, both modes.
    for (svc, port) in [("web6", 443u16), ("app6", 8443)] {
        let client = |i: u16| Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 10 + i);
        let mut syns = Vec::new();
        for i in 0..4u16 {
            let f = tcp6(client(i), 43000 + i, VIP6, port, tcp_flags::SYN, 0);
            syns.push(push(
                format!("{svc} SYN {i}"),
                f,
                Want::Forward { same_as: None },
            ));
        }
        for i in 0..4u16 {
            let reply = tcp6(VIP6, port, client(i), 43000 + i, tcp_flags::ACK, 1440);
            let f = error6(VIP6, v6::PACKET_TOO_BIG, 1280, &quote_of(&reply));
            push(
                format!("{svc} packet too big about connection {i}"),
                f,
                Want::Forward {
                    same_as: Some(syns[usize::from(i)]),
                },
            );
        }
        for i in 0..8u16 {
            let reply = tcp6(
                VIP6,
                port,
                Ipv6Addr::new(0x2001, 0xdb8, 0xd, 0, 0, 0, 0, i),
                53000 + i,
                tcp_flags::ACK,
                0,
            );
            let f = error6(VIP6, v6::DEST_UNREACHABLE, 0, &ip_of(&reply)[..44]);
            push(
                format!("{svc} unreachable about unseen {i}"),
                f,
                Want::Forward { same_as: None },
            );
        }
    }

    // Malformed and foreign ICMP, each with its reason.
    let reply = tcp4(VIP, 80, [203, 0, 113, 99], 1234, tcp_flags::ACK, 0);
    let q = ip_of(&reply).to_vec();
    let mut bad = error4(VIP, 3, 4, 1400, &q);
    let n = bad.len();
    bad[n - 1] ^= 0x10;
    push(
        "bad checksum".into(),
        bad,
        Want::Drop("icmp", Some("bad_checksum")),
    );
    push(
        "quote too short for the ports".into(),
        error4(VIP, 3, 4, 1400, &q[..22]),
        Want::Drop("icmp", Some("short_quote")),
    );
    let other_src = tcp4(
        [10, 9, 9, 9],
        80,
        [203, 0, 113, 99],
        1234,
        tcp_flags::ACK,
        0,
    );
    push(
        "quoted source not a VIP".into(),
        error4(VIP, 3, 4, 1400, ip_of(&other_src)),
        Want::Drop("icmp", Some("quote_not_vip")),
    );
    let other_port = tcp4(VIP, 81, [203, 0, 113, 99], 1234, tcp_flags::ACK, 0);
    push(
        "quoted port not a service's".into(),
        error4(VIP, 3, 4, 1400, ip_of(&other_port)),
        Want::Drop("icmp", Some("quote_no_service")),
    );
    let udp80 = FrameSpec::udp_v4(VIP, 80, [203, 0, 113, 99], 1234)
        .build()
        .expect("udp");
    push(
        "quoted protocol not the service's".into(),
        error4(VIP, 3, 3, 0, ip_of(&udp80)),
        Want::Drop("icmp", Some("quote_no_service")),
    );
    let echo_reply = FrameSpec::icmp_v4(VIP, [203, 0, 113, 99], v4::ECHO_REPLY, 0, 1)
        .build()
        .expect("icmp");
    push(
        "error about an ICMP message".into(),
        error4(VIP, 3, 1, 0, ip_of(&echo_reply)),
        Want::Drop("icmp", Some("about_icmp")),
    );
    let reply6 = tcp6(VIP6, 443, Ipv6Addr::LOCALHOST, 1, tcp_flags::ACK, 0);
    push(
        "IPv6 quote in ICMPv4".into(),
        error4(VIP, 3, 4, 1400, ip_of(&reply6)),
        Want::Drop("icmp", Some("bad_quote")),
    );
    push(
        "redirect".into(),
        error4(VIP, 5, 1, 0, &q),
        Want::Drop("icmp", Some("unsupported_type")),
    );
    push(
        "ICMPv6 echo reply to a VIP".into(),
        error6(VIP6, v6::ECHO_REPLY, 7, b"pong"),
        Want::Drop("icmp", Some("unsupported_type")),
    );
    let mut bad6 = error6(VIP6, v6::PACKET_TOO_BIG, 1280, ip_of(&reply6));
    bad6[14 + 40 + 7] ^= 1;
    push(
        "ICMPv6 bad checksum".into(),
        bad6,
        Want::Drop("icmp", Some("bad_checksum")),
    );
    push(
        "ICMPv6 quote too short".into(),
        error6(VIP6, v6::PACKET_TOO_BIG, 1280, &ip_of(&reply6)[..42]),
        Want::Drop("icmp", Some("short_quote")),
    );
    let ping = |to: [u8; 4], seq: u32| {
        FrameSpec {
            payload: b"pktdist echo test",
            ..FrameSpec::icmp_v4(
                [203, 0, 113, 50],
                to,
                v4::ECHO_REQUEST,
                0,
                0x4242_0000 | seq,
            )
        }
        .build()
        .expect("ping")
    };
    push(
        "echo request to a VIP that does not answer".into(),
        ping(VIP, 1),
        Want::Drop("icmp", Some("echo_off")),
    );
    let ping6 = FrameSpec::icmp_v6(
        Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 50).octets(),
        VIP6.octets(),
        v6::ECHO_REQUEST,
        0,
        9,
    )
    .build()
    .expect("ping6");
    push(
        "ICMPv6 echo request to a VIP that does not answer".into(),
        ping6,
        Want::Drop("icmp", Some("echo_off")),
    );
    push(
        "ICMP to an address that is not a VIP".into(),
        ping([10, 20, 30, 40], 2),
        Want::Drop("unsupported_l4", None),
    );
    push(
        "echo request answered".into(),
        ping(DNS_VIP, 3),
        Want::EchoReply,
    );

    // Too big for the tunnel: 1500-byte DF packets for a port of MTU 1500.
    for i in 0..5u32 {
        let f = tcp4([203, 0, 113, 77], 44000, VIP, 80, tcp_flags::ACK, 1460);
        let want = if i < TOO_BIG_RATE {
            Want::TooBig(1480)
        } else {
            Want::Drop("too_big", None)
        };
        push(format!("1500-byte DF packet {i} from one client"), f, want);
    }
    push(
        "1500-byte DF packet from another client".into(),
        tcp4([203, 0, 113, 78], 44000, VIP, 80, tcp_flags::ACK, 1460),
        Want::TooBig(1480),
    );
    push(
        "1480-byte packet: fits once encapsulated".into(),
        tcp4([203, 0, 113, 79], 44000, VIP, 80, tcp_flags::ACK, 1440),
        Want::Forward { same_as: None },
    );
    push(
        "1500-byte packet in l2 mode: no overhead, fits".into(),
        tcp4([203, 0, 113, 80], 44000, VIP, 8080, tcp_flags::ACK, 1460),
        Want::Forward { same_as: None },
    );
    push(
        "1500-byte IPv6 packet through IPv6-in-IPv6".into(),
        tcp6(
            Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 77),
            45000,
            VIP6,
            443,
            tcp_flags::ACK,
            1440,
        ),
        Want::TooBig(1460),
    );
    push(
        "1500-byte IPv6 packet in l2 mode".into(),
        tcp6(
            Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 78),
            45000,
            VIP6,
            8443,
            tcp_flags::ACK,
            1440,
        ),
        Want::Forward { same_as: None },
    );
    let big_udp = FrameSpec {
        payload: &[0x44; 1472],
        dont_frag: false,
        ..FrameSpec::udp_v4([203, 0, 113, 90], 40053, DNS_VIP, 53)
    }
    .build()
    .expect("udp");
    push(
        "1500-byte UDP datagram without DF".into(),
        big_udp,
        Want::Fragments,
    );

    // The mid-flow packets of the connections the errors above were about.
    for (svc, port) in [("web4", 80u16), ("app4", 8080)] {
        for i in 0..8u8 {
            let error = v
                .iter()
                .position(|x| x.what == format!("{svc} time exceeded about unseen {i}"))
                .expect("error input");
            let f = tcp4(
                [198, 18, 7, i],
                52000 + u16::from(i),
                VIP,
                port,
                tcp_flags::ACK,
                10,
            );
            v.push(Input {
                what: format!("{svc} ACK of unseen {i}"),
                frame: f,
                want: Want::Forward {
                    same_as: Some(error),
                },
            });
        }
    }
    for (svc, port) in [("web6", 443u16), ("app6", 8443)] {
        for i in 0..8u16 {
            let error = v
                .iter()
                .position(|x| x.what == format!("{svc} unreachable about unseen {i}"))
                .expect("error input");
            let f = tcp6(
                Ipv6Addr::new(0x2001, 0xdb8, 0xd, 0, 0, 0, 0, i),
                53000 + i,
                VIP6,
                port,
                tcp_flags::ACK,
                10,
            );
            v.push(Input {
                what: format!("{svc} ACK of unseen {i}"),
                frame: f,
                want: Want::Forward {
                    same_as: Some(error),
                },
            });
        }
    }
    v
}

/// Which backend an output frame went to: the outer destination of an
/// encapsulated frame, the destination MAC of an `l2` one.
fn backend_of(out: &[u8]) -> String {
    match u16::from_be_bytes([out[12], out[13]]) {
        ethernet::ETHERTYPE_IPV4 if out[14 + 9] == ipv4::PROTO_IPIP => {
            Ipv4Addr::from(ipv4::Packet::new_unchecked(&out[14..]).dst_addr()).to_string()
        }
        ethernet::ETHERTYPE_IPV6 if out[14 + 6] == ipv6::PROTO_IPV6 => {
            Ipv6Addr::from(ipv6::Packet::new_unchecked(&out[14..]).dst_addr()).to_string()
        }
        _ => out[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    }
}

/// Checks a forwarded frame against its input; returns its backend.
fn check_forward(what: &str, input: &[u8], out: &[u8]) -> String {
    let inner = ip_of(input);
    let l3 = &out[14..];
    match u16::from_be_bytes([out[12], out[13]]) {
        ethernet::ETHERTYPE_IPV4 if l3[9] == ipv4::PROTO_IPIP => {
            assert_eq!(&out[..6], &mac(GATEWAY), "{what}: next hop");
            let ip = ipv4::Packet::new_checked(l3).expect("outer IPv4");
            assert!(ip.verify_checksum(), "{what}: outer checksum");
            assert_eq!(ip.src_addr(), [198, 51, 100, 1], "{what}");
            assert_eq!(ip.payload(), inner, "{what}: packet changed inside");
        }
        ethernet::ETHERTYPE_IPV6 if l3[6] == ipv6::PROTO_IPV6 => {
            assert_eq!(&out[..6], &mac(GATEWAY), "{what}: next hop");
            let ip = ipv6::Packet::new_checked(l3).expect("outer IPv6");
            assert_eq!(
                ip.src_addr(),
                "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets()
            );
            assert_eq!(ip.payload(), inner, "{what}: packet changed inside");
        }
        _ => {
            // l2: only the MACs change.
            assert_eq!(&out[12..], &input[12..], "{what}: frame changed");
            assert_eq!(&out[..2], &[0x02, 0], "{what}: a backend's MAC");
        }
    }
    backend_of(out)
}

fn mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).expect("hex"))
        .collect();
    v.try_into().expect("six bytes")
}

/// Checks an ICMP answer to the input's sender: from the input's
/// destination to its source, checksums valid; returns the message.
fn check_answer(what: &str, input: &[u8], out: &[u8]) -> (u8, u8, u32, Vec<u8>) {
    assert_eq!(&out[..6], &CLIENT_MAC, "{what}: back to the sender");
    let i = ip_of(input);
    let l3 = &out[14..];
    let (src, dst, msg) = if l3[0] >> 4 == 4 {
        let ip = ipv4::Packet::new_checked(l3).expect("IPv4");
        assert!(ip.verify_checksum(), "{what}: IP checksum");
        assert_eq!(ip.protocol(), 1);
        let m = icmp::Packet::new_checked(ip.payload()).expect("ICMP");
        assert!(m.verify_checksum_v4(), "{what}: ICMP checksum");
        (
            ip.src_addr().to_vec(),
            ip.dst_addr().to_vec(),
            ip.payload().to_vec(),
        )
    } else {
        let ip = ipv6::Packet::new_checked(l3).expect("IPv6");
        assert_eq!(ip.next_header(), 58);
        let m = icmp::Packet::new_checked(ip.payload()).expect("ICMPv6");
        let pseudo = checksum::pseudo_v6(
            &ip.src_addr(),
            &ip.dst_addr(),
            58,
            ip.payload().len() as u32,
        );
        assert!(m.verify_checksum_v6(pseudo), "{what}: ICMPv6 checksum");
        (
            ip.src_addr().to_vec(),
            ip.dst_addr().to_vec(),
            ip.payload().to_vec(),
        )
    };
    let n = if i[0] >> 4 == 4 { 4 } else { 16 };
    let (isrc, idst) = if n == 4 {
        (&i[12..16], &i[16..20])
    } else {
        (&i[8..24], &i[24..40])
    };
    assert_eq!((&src[..], &dst[..]), (idst, isrc), "{what}: addresses");
    let m = icmp::Packet::new_checked(&msg[..]).expect("ICMP");
    (m.msg_type(), m.code(), m.rest(), m.body().to_vec())
}

const FIELDS: [&str; 13] = [
    "frame.number",
    "ip.proto",
    "ip.checksum.status",
    "ipv6.nxt",
    "icmp.type",
    "icmp.mtu",
    "icmp.checksum.status",
    "icmpv6.type",
    "icmpv6.mtu",
    "icmpv6.checksum.status",
    "udp.checksum.status",
    "ip.reassembled.length",
    "_ws.malformed",
];

/// The output frames dissected; the datagram to port 53 carries filler,
/// not DNS.
fn tshark(pcap: &std::path::Path) -> Vec<Dissected> {
    common::tshark(pcap, &FIELDS, &["--disable-protocol", "dns"])
}

#[test]
fn icmp_errors_follow_connections_and_too_big_packets_get_answers() {
    let _serial = serial();
    let dir = TempDir::new("e2e-icmp");
    let input = dir.path("in.pcap");
    let output = dir.path("out.pcap");
    let summary_path = dir.path("summary.json");
    let config = dir.path("pktdist.toml");

    let inputs = inputs();
    let frames: Vec<Vec<u8>> = inputs.iter().map(|i| i.frame.clone()).collect();
    write_pcap(&input, &frames);
    let names: Vec<&str> = ["w1", "w2", "w3", "a1", "a2", "a3", "d1", "d2"]
        .into_iter()
        .chain(["v1", "v2", "v3", "l1", "l2", "l3"])
        .collect();
    let toml = [
        base_config(&names),
        format!(
            "\n[[ports]]\nname = \"p0\"\ndevice = \"net_pcap0,rx_pcap={},tx_pcap={}\"\ngateway_mac = \"{GATEWAY}\"\nmtu = 1500\n",
            input.display(),
            output.display()
        ),
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
    let plan = String::from_utf8_lossy(&check.stdout);
    assert!(plan.contains("mtu 1500"), "{plan}");
    assert!(plan.contains("echo answered for 192.0.2.53"), "{plan}");

    let run = Pktdist::spawn(&[
        "run",
        "--config",
        path_str(&config),
        "--duration",
        "3",
        "--quiet",
        "--summary-json",
        path_str(&summary_path),
    ]);
    let done = run.wait(Duration::from_secs(90));
    assert!(
        done.status.success(),
        "pktdist run failed: {}\n--- stderr\n{}",
        done.status,
        done.stderr
    );

    // The output, frame by frame, in input order.
    let out = read_pcap(&output);
    let mut at = 0;
    let mut backend: Vec<Option<String>> = vec![None; inputs.len()];
    let mut fragment_frames = Vec::new();
    for (k, i) in inputs.iter().enumerate() {
        let what = format!("input {k} ({})", i.what);
        let take = match i.want {
            Want::Drop(..) => 0,
            Want::Fragments => 2,
            _ => 1,
        };
        assert!(at + take <= out.len(), "{what}: output ends early");
        let o = &out[at..at + take];
        at += take;
        match &i.want {
            Want::Forward { same_as } => {
                let b = check_forward(&what, &i.frame, &o[0]);
                if let Some(j) = same_as {
                    assert_eq!(
                        Some(&b),
                        backend[*j].as_ref(),
                        "{what}: not where input {j} ({}) went",
                        inputs[*j].what
                    );
                }
                backend[k] = Some(b);
            }
            Want::EchoReply => {
                let (t, code, rest, body) = check_answer(&what, &i.frame, &o[0]);
                assert_eq!((t, code, rest), (v4::ECHO_REPLY, 0, 0x4242_0003), "{what}");
                assert_eq!(body, b"pktdist echo test");
            }
            Want::TooBig(mtu) => {
                let (t, code, rest, body) = check_answer(&what, &i.frame, &o[0]);
                let ip = ip_of(&i.frame);
                if ip[0] >> 4 == 4 {
                    assert_eq!((t, code, rest & 0xffff), (3, 4, *mtu), "{what}");
                    assert_eq!(body, &ip[..548], "{what}: the quote");
                } else {
                    assert_eq!((t, code, rest), (2, 0, *mtu), "{what}");
                    assert_eq!(body, &ip[..1232], "{what}: the quote");
                }
            }
            Want::Fragments => {
                fragment_frames.push(at - 2);
                let ips: Vec<ipv4::Packet<&[u8]>> = o
                    .iter()
                    .map(|f| ipv4::Packet::new_checked(&f[14..]).expect("fragment"))
                    .collect();
                for ip in &ips {
                    assert!(ip.verify_checksum(), "{what}: fragment checksum");
                    assert!(ip.total_len() <= 1500, "{what}: fragment within the MTU");
                    assert_eq!(ip.protocol(), ipv4::PROTO_IPIP);
                    assert_eq!(ip.ident(), ips[0].ident());
                }
                // The last fragment first, then the first.
                assert_eq!((ips[1].frag_offset(), ips[1].more_frags()), (0, true));
                assert_eq!((ips[0].frag_offset(), ips[0].more_frags()), (1480, false));
                let mut inner = ips[1].payload().to_vec();
                inner.extend_from_slice(ips[0].payload());
                assert_eq!(&inner[..], ip_of(&i.frame), "{what}: reassembled");
            }
            Want::Drop(..) => {}
        }
    }
    assert_eq!(at, out.len(), "frames beyond what the inputs explain");
    // The errors about unseen connections did not all go to one backend.
    let spread: std::collections::HashSet<&String> = inputs
        .iter()
        .zip(&backend)
        .filter(|(i, _)| i.what.starts_with("web4 time exceeded"))
        .filter_map(|(_, b)| b.as_ref())
        .collect();
    assert!(spread.len() >= 2, "{spread:?}");

    // The summary adds up.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).expect("summary"))
            .expect("summary is JSON");
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"));
    let mut want_drops: BTreeMap<&str, u64> = BTreeMap::new();
    let mut want_icmp: BTreeMap<&str, u64> = BTreeMap::new();
    for i in &inputs {
        if let Want::Drop(r, icmp) = i.want {
            *want_drops.entry(r).or_default() += 1;
            if let Some(x) = icmp {
                *want_icmp.entry(x).or_default() += 1;
            }
        }
    }
    for (reason, v) in summary["drops"].as_object().expect("drops") {
        let want = want_drops.get(reason.as_str()).copied().unwrap_or(0);
        assert_eq!(n(v), want, "drops for {reason}");
    }
    for (reason, v) in summary["icmp"]["dropped"].as_object().expect("icmp drops") {
        let want = want_icmp.get(reason.as_str()).copied().unwrap_or(0);
        assert_eq!(n(v), want, "icmp drops for {reason}");
    }
    let count = |f: fn(&Want) -> bool| inputs.iter().filter(|i| f(&i.want)).count() as u64;
    let icmp = &summary["icmp"];
    let errors = inputs
        .iter()
        .filter(|i| {
            matches!(i.want, Want::Forward { .. })
                && (i.what.contains("about") && !i.what.contains("ACK"))
        })
        .count() as u64;
    assert_eq!(n(&icmp["forwarded"]), errors);
    assert_eq!(n(&icmp["echo_answered"]), 1);
    assert_eq!(
        n(&icmp["too_big_sent"]),
        count(|w| matches!(w, Want::TooBig(_)))
    );
    assert_eq!((n(&icmp["fragmented"]), n(&icmp["fragments"])), (1, 2));
    assert_eq!(n(&summary["rx_packets"]), frames.len() as u64);
    assert_eq!(n(&summary["tx_packets"]), out.len() as u64);

    // tshark agrees: every checksum it can check is good, nothing is
    // malformed, the ICMP it finds is what was meant.
    let d = tshark(&output);
    assert_eq!(d.len(), out.len(), "frames tshark read");
    for (k, f) in d.iter().enumerate() {
        assert!(
            field(f, "_ws.malformed").is_empty(),
            "frame {k}: malformed: {f:?}"
        );
        for s in field(f, "ip.checksum.status") {
            assert_eq!(s, "1", "frame {k}: an IPv4 checksum: {f:?}");
        }
        for s in field(f, "icmp.checksum.status") {
            assert_eq!(s, "1", "frame {k}: ICMP checksum: {f:?}");
        }
        for s in field(f, "icmpv6.checksum.status") {
            assert_eq!(s, "1", "frame {k}: ICMPv6 checksum: {f:?}");
        }
    }
    let mut at = 0;
    let mut seen_errors = 0;
    for i in &inputs {
        let what = &i.what;
        match &i.want {
            Want::Drop(..) => continue,
            Want::Fragments => {
                // tshark reassembles at the fragment that completes the
                // packet (the outer payload: the 1500-byte inner packet),
                // and checks the UDP checksum of the whole.
                let whole = &d[at + 1];
                assert_eq!(field(whole, "ip.reassembled.length"), ["1500"], "{what}");
                assert_eq!(field(whole, "udp.checksum.status"), ["1"], "{what}");
                at += 2;
                continue;
            }
            Want::TooBig(mtu) => {
                let f = &d[at];
                if field(f, "icmp.type").is_empty() {
                    assert_eq!(field(f, "icmpv6.type"), ["2"], "{what}");
                    assert_eq!(field(f, "icmpv6.mtu"), [mtu.to_string()], "{what}");
                } else {
                    assert_eq!(field(f, "icmp.type"), ["3"], "{what}");
                    assert_eq!(field(f, "icmp.mtu"), [mtu.to_string()], "{what}");
                }
            }
            Want::EchoReply => assert_eq!(field(&d[at], "icmp.type"), ["0"], "{what}"),
            Want::Forward { .. } if what.contains("about") && !what.contains("ACK") => {
                // An ICMP error inside the tunnel (or as it came, in l2).
                let f = &d[at];
                let t = [field(f, "icmp.type"), field(f, "icmpv6.type")].concat();
                assert!(
                    ["3", "11", "1", "2"].contains(&t.first().map_or("", |s| s.as_str())),
                    "{what}: {f:?}"
                );
                seen_errors += 1;
            }
            Want::Forward { .. } => {}
        }
        at += 1;
    }
    assert_eq!(seen_errors, errors);
    assert_eq!(
        fragment_frames.len(),
        1,
        "the one datagram without DF was fragmented"
    );
}
