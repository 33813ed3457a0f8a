//! Classification of a received frame: what the worker needs to know about a
//! packet to route it, extracted in one pass over the headers.
//!
//! Addresses are kept as `u128` (IPv4 in the low 32 bits) so that one key type
//! and one hash serve both families without branching on the hot path.
//!
//! TCP and UDP packets come out as a [`ParsedPacket`]; ICMP and ICMPv6
//! messages, recognised only once a packet is found to be neither, as
//! [`NotFlow::Icmp`], for the worker's ICMP path ([`crate::datapath::icmp`]).

use crate::types::{
    tcp_flags, DropReason, Family, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};

/// A parsed frame: the flow key plus the offsets the forwarding step needs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ParsedPacket {
    pub key: FlowKey,
    /// Offset of the IP header (after Ethernet and up to two VLAN tags).
    pub l3_offset: u16,
    /// Offset of the TCP/UDP header.
    pub l4_offset: u16,
    /// Length of the IP packet (header included) as the IP header states it.
    pub l3_len: u16,
    /// TCP flags (byte 13 of the TCP header); 0 for UDP.
    pub tcp_flags: u8,
}

impl ParsedPacket {
    /// A placeholder (all zeros, IPv4) for storage parsed into later.
    pub const EMPTY: ParsedPacket = ParsedPacket {
        key: FlowKey::ZERO,
        l3_offset: 0,
        l4_offset: 0,
        l3_len: 0,
        tcp_flags: 0,
    };

    /// A TCP SYN without ACK: the first packet of a new connection.
    #[inline]
    pub fn is_syn(&self) -> bool {
        self.key.proto == PROTO_TCP
            && self.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
    }
}

/// Where an ICMP (in IPv4) or ICMPv6 (in IPv6) message lies in a frame
/// whose Ethernet and IP headers are well-formed and which is not a
/// fragment; the message may be shorter than the ICMP header
/// ([`crate::datapath::icmp::inspect`] judges it). Small on purpose: it
/// shares the burst's classification results with [`ParsedPacket`] and
/// must not make them larger.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct IcmpAt {
    pub family: Family,
    /// Offset of the IP header.
    pub l3_offset: u16,
    /// Offset of the ICMP header.
    pub l4_offset: u16,
    /// Length of the IP packet (header included) as the IP header states it.
    pub l3_len: u16,
}

impl IcmpAt {
    /// The IP source and destination in `frame` (IPv4 in the low 32
    /// bits), or None when `frame` is too short for the IP header.
    #[inline]
    pub fn addresses(&self, frame: &[u8]) -> Option<(u128, u128)> {
        let l3 = usize::from(self.l3_offset);
        match self.family {
            Family::V4 => {
                let h = frame.get(l3 + 12..l3 + 20)?;
                Some((
                    u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as u128,
                    u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as u128,
                ))
            }
            Family::V6 => {
                let h = frame.get(l3 + 8..l3 + 40)?;
                let mut a = [0u8; 16];
                a.copy_from_slice(&h[..16]);
                let mut b = [0u8; 16];
                b.copy_from_slice(&h[16..]);
                Some((u128::from_be_bytes(a), u128::from_be_bytes(b)))
            }
        }
    }
}

/// A frame that is not a TCP or UDP packet of a flow.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum NotFlow {
    /// Dropped (or passed to an `unmatched_to` port) for this reason.
    Drop(DropReason),
    /// An ICMP message: the worker's ICMP path decides.
    Icmp(IcmpAt),
}

impl From<DropReason> for NotFlow {
    fn from(r: DropReason) -> NotFlow {
        NotFlow::Drop(r)
    }
}

/// Parses an Ethernet frame down to its L4 header.
///
/// Returns why it is not a flow's packet when it is not an unfragmented
/// IPv4/IPv6 TCP or UDP packet with well-formed headers: an ICMP message
/// (ICMP in IPv4, ICMPv6 in IPv6, however short: the ICMP path counts a
/// malformed one to a VIP as an ICMP drop) as [`NotFlow::Icmp`], anything
/// else as the reason to drop it.
///
/// Checks every length the forwarding step relies on (headers inside the IP
/// packet, IP packet inside the frame; bytes after the IP packet are Ethernet
/// padding and ignored) but no checksums: the backend verifies those.
#[inline]
pub fn parse(frame: &[u8]) -> Result<ParsedPacket, NotFlow> {
    let mut p = ParsedPacket::EMPTY;
    parse_into(frame, &mut p).map(|()| p)
}

/// [`parse`] into `out`: the worker parses a burst into storage of its
/// own, where the packets stay for the burst, so the common frame's fields
/// are stored once, not built and then copied. `out` holds the packet only
/// when `Ok`.
#[inline(always)]
pub fn parse_into(frame: &[u8], out: &mut ParsedPacket) -> Result<(), NotFlow> {
    if parse_plain_tcp_v4(frame, out) {
        return Ok(());
    }
    *out = parse_any(frame)?;
    Ok(())
}

/// Length of the headers [`parse_plain_tcp_v4`] reads: Ethernet without a
/// tag, IPv4 without options, TCP without options.
const PLAIN_TCP_V4_LEN: usize = 14 + 20 + 20;

/// The common frame in one bounds check: untagged Ethernet, IPv4 without
/// options and not a fragment, TCP (options allowed). Writes into `out`
/// exactly what [`parse_any`] would return for such a frame and returns
/// true; returns false, writing nothing, for every other frame, which
/// [`parse_any`] then classifies (a unit test and a property test hold the
/// two to the same answers).
#[inline(always)]
fn parse_plain_tcp_v4(frame: &[u8], out: &mut ParsedPacket) -> bool {
    let Some(h) = frame.first_chunk::<PLAIN_TCP_V4_LEN>() else {
        return false;
    };
    let be16 = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
    let be32 = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    // EtherType IPv4, version 4 with IHL 5, TCP, neither MF nor an offset.
    if be16(12) != crate::wire::ethernet::ETHERTYPE_IPV4
        || h[14] != 0x45
        || h[23] != PROTO_TCP
        || be16(20) & 0x3fff != 0
    {
        return false;
    }
    // The IP packet holds the TCP header and lies inside the frame.
    let l3_len = be16(16);
    let tcp_len = usize::from(h[46] >> 4) * 4;
    let Some(l4_room) = usize::from(l3_len).checked_sub(20) else {
        return false;
    };
    if usize::from(l3_len) > frame.len() - 14 || tcp_len < 20 || tcp_len > l4_room {
        return false;
    }
    out.key = FlowKey {
        src: u128::from(be32(26)),
        dst: u128::from(be32(30)),
        sport: be16(34),
        dport: be16(36),
        proto: PROTO_TCP,
        family: Family::V4,
    };
    out.l3_offset = 14;
    out.l4_offset = 34;
    out.l3_len = l3_len;
    out.tcp_flags = h[47];
    true
}

/// [`parse`] for any frame: VLAN tags, IPv4 options, IPv6 and its
/// extension headers, UDP, and the reasons a frame is not a flow's.
#[inline(never)]
fn parse_any(frame: &[u8]) -> Result<ParsedPacket, NotFlow> {
    use crate::wire::{ethernet, ipv4, ipv6, tcp, udp};

    let malformed = |_| DropReason::Malformed;
    let l2 = ethernet::Frame::new_checked(frame)
        .and_then(|e| e.l2_info())
        .map_err(malformed)?;
    let l3 = &frame[l2.header_len..];

    // (family, src, dst, proto, L4 offset in the IP packet, IP packet length)
    let (family, src, dst, proto, l4_rel, l3_len) = match l2.ethertype {
        ethernet::ETHERTYPE_IPV4 => {
            let ip = ipv4::Packet::new_checked(l3).map_err(malformed)?;
            if ip.is_fragment() {
                return Err(DropReason::Fragment.into());
            }
            (
                Family::V4,
                u32::from_be_bytes(ip.src_addr()) as u128,
                u32::from_be_bytes(ip.dst_addr()) as u128,
                ip.protocol(),
                ip.header_len(),
                ip.total_len() as usize,
            )
        }
        ethernet::ETHERTYPE_IPV6 => {
            let ip = ipv6::Packet::new_checked(l3).map_err(malformed)?;
            let (proto, offset) = match ip.upper_layer().map_err(malformed)? {
                ipv6::Upper::Proto { proto, offset } => (proto, offset),
                ipv6::Upper::Fragment => return Err(DropReason::Fragment.into()),
                ipv6::Upper::Unsupported => return Err(DropReason::UnsupportedL4.into()),
            };
            (
                Family::V6,
                u128::from_be_bytes(ip.src_addr()),
                u128::from_be_bytes(ip.dst_addr()),
                proto,
                offset,
                ip.total_len(),
            )
        }
        _ => return Err(DropReason::NotIp.into()),
    };

    let l4 = &l3[l4_rel..l3_len];
    let (sport, dport, tcp_flags) = match proto {
        PROTO_TCP => {
            let t = tcp::Packet::new_checked(l4).map_err(malformed)?;
            (t.src_port(), t.dst_port(), t.flags())
        }
        PROTO_UDP => {
            let u = udp::Packet::new_checked(l4).map_err(malformed)?;
            (u.src_port(), u.dst_port(), 0)
        }
        _ => return Err(other_protocol(family, proto, l2.header_len, l4_rel, l4)),
    };

    // An IPv6 packet of 64 KiB plus its header does not fit the u16 fields;
    // no frame that large reaches a worker, but the slice could say so.
    let l3_len = u16::try_from(l3_len).map_err(|_| DropReason::Malformed)?;
    let l4_offset = u16::try_from(l2.header_len + l4_rel).map_err(|_| DropReason::Malformed)?;
    Ok(ParsedPacket {
        key: FlowKey {
            src,
            dst,
            sport,
            dport,
            proto,
            family,
        },
        l3_offset: l2.header_len as u16,
        l4_offset,
        l3_len,
        tcp_flags,
    })
}

/// The verdict on a packet that is neither TCP nor UDP: an ICMP message
/// of its family (of any length), or a protocol pktdist does not route.
/// Kept out of line: TCP and UDP never come here.
#[cold]
#[inline(never)]
fn other_protocol(family: Family, proto: u8, l2_len: usize, l4_rel: usize, l4: &[u8]) -> NotFlow {
    let icmp = match family {
        Family::V4 => PROTO_ICMP,
        Family::V6 => PROTO_ICMPV6,
    };
    if proto != icmp {
        return DropReason::UnsupportedL4.into();
    }
    // The IP packet fits the frame, so its length and the offsets fit u16
    // but for an IPv6 jumbo payload, which no frame carries.
    let (Ok(l3_len), Ok(l4_offset)) = (
        u16::try_from(l4_rel + l4.len()),
        u16::try_from(l2_len + l4_rel),
    ) else {
        return DropReason::Malformed.into();
    };
    NotFlow::Icmp(IcmpAt {
        family,
        l3_offset: l2_len as u16,
        l4_offset,
        l3_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::build::{FrameSpec, L4};
    use crate::wire::{ethernet, ipv4, ipv6};
    use proptest::prelude::*;

    const C6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const V6: [u8; 16] = [
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0,
    ];

    fn syn_v4() -> Vec<u8> {
        FrameSpec::tcp_v4([10, 1, 2, 3], 40000, [192, 0, 2, 10], 80, tcp_flags::SYN)
            .build()
            .unwrap()
    }

    /// A burst's classification results take no more room than the
    /// parsed packets themselves: the ICMP variant fits beside them.
    #[test]
    fn results_are_no_larger_than_a_parsed_packet() {
        let packet = std::mem::size_of::<ParsedPacket>();
        assert_eq!(std::mem::size_of::<Result<ParsedPacket, NotFlow>>(), packet);
        assert_eq!(
            std::mem::size_of::<Option<Result<ParsedPacket, NotFlow>>>(),
            packet
        );
    }

    #[test]
    fn tcp_v4_syn() {
        let f = syn_v4();
        let p = parse(&f).unwrap();
        assert_eq!(
            p,
            ParsedPacket {
                key: FlowKey {
                    src: 0x0a01_0203,
                    dst: 0xc000_020a,
                    sport: 40000,
                    dport: 80,
                    proto: PROTO_TCP,
                    family: Family::V4,
                },
                l3_offset: 14,
                l4_offset: 34,
                l3_len: 40,
                tcp_flags: tcp_flags::SYN,
            }
        );
        assert!(p.is_syn());
    }

    #[test]
    fn syn_ack_and_ack_are_not_syn() {
        for flags in [
            tcp_flags::SYN | tcp_flags::ACK,
            tcp_flags::ACK,
            tcp_flags::FIN,
        ] {
            let f = FrameSpec::tcp_v4([1, 1, 1, 1], 1, [2, 2, 2, 2], 2, flags)
                .build()
                .unwrap();
            let p = parse(&f).unwrap();
            assert_eq!(p.tcp_flags, flags);
            assert!(!p.is_syn());
        }
    }

    #[test]
    fn ipv4_options_udp_and_padding() {
        let f = FrameSpec {
            ipv4_options: &[1, 1, 1, 0, 0x94, 0x04, 0, 0],
            ..FrameSpec::udp_v4([10, 0, 0, 1], 53, [10, 0, 0, 2], 5353)
        }
        .build()
        .unwrap();
        // 14 + 28 + 8 = 50 bytes of packet, padded to 60.
        assert_eq!(f.len(), 60);
        let p = parse(&f).unwrap();
        assert_eq!((p.l3_offset, p.l4_offset, p.l3_len), (14, 42, 36));
        assert_eq!(
            (p.key.sport, p.key.dport, p.key.proto),
            (53, 5353, PROTO_UDP)
        );
        assert_eq!(p.tcp_flags, 0);
        assert!(!p.is_syn());
    }

    #[test]
    fn ipv6_tcp_and_extensions() {
        let f = FrameSpec::tcp_v6(C6, 1234, V6, 443, tcp_flags::SYN)
            .build()
            .unwrap();
        let p = parse(&f).unwrap();
        assert_eq!(p.key.family, Family::V6);
        assert_eq!(p.key.src, u128::from_be_bytes(C6));
        assert_eq!(p.key.dst, u128::from_be_bytes(V6));
        assert_eq!((p.l3_offset, p.l4_offset, p.l3_len), (14, 54, 60));
        assert!(p.is_syn());

        let hbh = [0u8; 8];
        let rt = [0u8; 24];
        let ah = [0u8; 16];
        let frag = [0u8; 8]; // atomic: offset 0, no M flag
        let ext: &[(u8, &[u8])] = &[
            (ipv6::EXT_HOP_BY_HOP, &hbh),
            (ipv6::EXT_ROUTING, &rt),
            (ipv6::EXT_AH, &ah),
            (ipv6::EXT_FRAGMENT, &frag),
            (ipv6::EXT_DEST_OPTS, &hbh),
        ];
        let f = FrameSpec {
            ipv6_ext: ext,
            vlan: Some(7),
            ..FrameSpec::udp_v6(C6, 1000, V6, 2000)
        }
        .build()
        .unwrap();
        let p = parse(&f).unwrap();
        assert_eq!((p.l3_offset, p.l4_offset), (18, 18 + 40 + 64));
        assert_eq!(p.l3_len, 40 + 64 + 8);
        assert_eq!(
            (p.key.sport, p.key.dport, p.key.proto),
            (1000, 2000, PROTO_UDP)
        );
    }

    #[test]
    fn vlan_and_qinq() {
        let f = FrameSpec {
            vlan: Some(0x123),
            ..FrameSpec::tcp_v4([1, 2, 3, 4], 5, [6, 7, 8, 9], 10, tcp_flags::ACK)
        }
        .build()
        .unwrap();
        let p = parse(&f).unwrap();
        assert_eq!((p.l3_offset, p.l4_offset), (18, 38));

        // Insert an 802.1ad outer tag in front of the 802.1Q one.
        let mut q = f[..12].to_vec();
        q.extend_from_slice(&[0x88, 0xa8, 0x00, 0x64]);
        q.extend_from_slice(&f[12..]);
        let p = parse(&q).unwrap();
        assert_eq!((p.l3_offset, p.l4_offset), (22, 42));
        assert_eq!(p.key.sport, 5);
    }

    /// Applies `edit` to a copy of `f`, fixing nothing else.
    fn edited(f: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut v = f.to_vec();
        edit(&mut v);
        v
    }

    #[test]
    fn malformed_cases() {
        use DropReason::Malformed;
        let f = syn_v4();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("short ethernet", f[..13].to_vec()),
            ("ip header cut", f[..14 + 19].to_vec()),
            ("ihl 4", edited(&f, |v| v[14] = 0x44)),
            ("ip version 6 in v4 ethertype", edited(&f, |v| v[14] = 0x65)),
            (
                "total length beyond frame",
                edited(&f, |v| v[16..18].copy_from_slice(&100u16.to_be_bytes())),
            ),
            (
                "total length below header",
                edited(&f, |v| v[16..18].copy_from_slice(&19u16.to_be_bytes())),
            ),
            ("ihl beyond total length", edited(&f, |v| v[14] = 0x4f)),
            (
                "tcp cut by total length",
                edited(&f, |v| v[16..18].copy_from_slice(&39u16.to_be_bytes())),
            ),
            ("tcp data offset 4", edited(&f, |v| v[14 + 20 + 12] = 0x40)),
            (
                "tcp data offset beyond packet",
                edited(&f, |v| v[14 + 20 + 12] = 0x60),
            ),
            ("vlan tag cut", {
                let mut v = f[..12].to_vec();
                v.extend_from_slice(&[0x81, 0x00, 0x00]);
                v
            }),
        ];
        for (name, frame) in cases {
            assert_eq!(parse(&frame), Err(NotFlow::Drop(Malformed)), "{name}");
        }

        let u = FrameSpec::udp_v4([1, 1, 1, 1], 1, [2, 2, 2, 2], 2)
            .build()
            .unwrap();
        assert!(parse(&u).is_ok());
        let bad = edited(&u, |v| {
            v[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&7u16.to_be_bytes())
        });
        assert_eq!(parse(&bad), Err(NotFlow::Drop(Malformed)), "udp length 7");
        let bad = edited(&u, |v| {
            v[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&9u16.to_be_bytes())
        });
        assert_eq!(
            parse(&bad),
            Err(NotFlow::Drop(Malformed)),
            "udp length beyond ip payload"
        );

        let s6 = FrameSpec::tcp_v6(C6, 1, V6, 2, tcp_flags::SYN)
            .build()
            .unwrap();
        let bad = edited(&s6, |v| v[18..20].copy_from_slice(&21u16.to_be_bytes()));
        assert_eq!(
            parse(&bad),
            Err(NotFlow::Drop(Malformed)),
            "v6 payload beyond frame"
        );
        assert_eq!(
            parse(&s6[..14 + 39]),
            Err(NotFlow::Drop(Malformed)),
            "v6 header cut"
        );
        let bad = edited(&s6, |v| v[14] = 0x45);
        assert_eq!(
            parse(&bad),
            Err(NotFlow::Drop(Malformed)),
            "v4 version in v6 ethertype"
        );
        let hbh = [0u8; 8];
        let e6 = FrameSpec {
            ipv6_ext: &[(ipv6::EXT_HOP_BY_HOP, &hbh)],
            ..FrameSpec::tcp_v6(C6, 1, V6, 2, tcp_flags::SYN)
        }
        .build()
        .unwrap();
        assert!(parse(&e6).is_ok());
        let bad = edited(&e6, |v| v[14 + 41] = 10);
        assert_eq!(
            parse(&bad),
            Err(NotFlow::Drop(Malformed)),
            "extension header beyond payload"
        );
    }

    #[test]
    fn not_ip_fragment_unsupported() {
        let f = syn_v4();
        let arp = edited(&f, |v| {
            v[12..14].copy_from_slice(&ethernet::ETHERTYPE_ARP.to_be_bytes())
        });
        assert_eq!(parse(&arp), Err(NotFlow::Drop(DropReason::NotIp)));

        let frag = |df: bool, mf: bool, off: u16| {
            edited(&f, |v| {
                let mut ip = ipv4::Packet::new_unchecked(&mut v[14..]);
                ip.set_frag(df, mf, off);
                ip.fill_checksum();
            })
        };
        assert!(parse(&frag(true, false, 0)).is_ok());
        assert_eq!(
            parse(&frag(false, true, 0)),
            Err(NotFlow::Drop(DropReason::Fragment))
        );
        assert_eq!(
            parse(&frag(false, false, 8)),
            Err(NotFlow::Drop(DropReason::Fragment))
        );

        // GRE (47) and ICMPv6 inside IPv4 are protocols pktdist does not
        // route.
        for proto in [47, 58] {
            let other = edited(&f, |v| v[14 + 9] = proto);
            assert_eq!(parse(&other), Err(NotFlow::Drop(DropReason::UnsupportedL4)));
        }

        let frag6 = [0u8, 0, 0, 1, 0, 0, 0, 9]; // M flag set
        let f6 = FrameSpec {
            ipv6_ext: &[(ipv6::EXT_FRAGMENT, &frag6)],
            ..FrameSpec::udp_v6(C6, 1, V6, 2)
        }
        .build()
        .unwrap();
        assert_eq!(parse(&f6), Err(NotFlow::Drop(DropReason::Fragment)));

        let s6 = FrameSpec::tcp_v6(C6, 1, V6, 2, tcp_flags::SYN)
            .build()
            .unwrap();
        let none = edited(&s6, |v| v[14 + 6] = ipv6::EXT_NO_NEXT);
        assert_eq!(parse(&none), Err(NotFlow::Drop(DropReason::UnsupportedL4)));
        // ICMP for IPv4 inside IPv6.
        let icmp4 = edited(&s6, |v| v[14 + 6] = 1);
        assert_eq!(parse(&icmp4), Err(NotFlow::Drop(DropReason::UnsupportedL4)));
    }

    /// ICMP in IPv4 and ICMPv6 in IPv6 (after extension headers, behind a
    /// VLAN tag) come out as `Icmp` with their offsets, a message shorter
    /// than its header too (the ICMP path judges it); a fragment is a
    /// fragment.
    #[test]
    fn icmp_messages_are_located() {
        let f = FrameSpec {
            payload: &[0xab; 12],
            ..FrameSpec::icmp_v4([198, 51, 100, 7], [192, 0, 2, 10], 3, 4, 1480)
        }
        .build()
        .unwrap();
        assert_eq!(
            parse(&f),
            Err(NotFlow::Icmp(IcmpAt {
                family: Family::V4,
                l3_offset: 14,
                l4_offset: 34,
                l3_len: 20 + 8 + 12,
            }))
        );
        let Err(NotFlow::Icmp(at)) = parse(&f) else {
            unreachable!()
        };
        assert_eq!(at.addresses(&f), Some((0xc633_6407, 0xc000_020a)));
        assert_eq!(at.addresses(&f[..33]), None);

        let hbh = [0u8; 8];
        let f6 = FrameSpec {
            vlan: Some(12),
            ipv6_ext: &[(ipv6::EXT_HOP_BY_HOP, &hbh)],
            payload: &[0xcd; 40],
            ..FrameSpec::icmp_v6(C6, V6, 2, 0, 1400)
        }
        .build()
        .unwrap();
        assert_eq!(
            parse(&f6),
            Err(NotFlow::Icmp(IcmpAt {
                family: Family::V6,
                l3_offset: 18,
                l4_offset: 18 + 40 + 8,
                l3_len: 40 + 8 + 8 + 40,
            }))
        );
        let Err(NotFlow::Icmp(at)) = parse(&f6) else {
            unreachable!()
        };
        assert_eq!(
            at.addresses(&f6),
            Some((u128::from_be_bytes(C6), u128::from_be_bytes(V6)))
        );

        let frag = edited(&f, |v| {
            let mut ip = ipv4::Packet::new_unchecked(&mut v[14..]);
            ip.set_frag(false, true, 0);
            ip.fill_checksum();
        });
        assert_eq!(parse(&frag), Err(NotFlow::Drop(DropReason::Fragment)));

        // The IP length leaves 7 bytes for the ICMP header.
        let short = edited(&f, |v| {
            let mut ip = ipv4::Packet::new_unchecked(&mut v[14..]);
            ip.set_total_len(27);
            ip.fill_checksum();
        });
        let at = IcmpAt {
            family: Family::V4,
            l3_offset: 14,
            l4_offset: 34,
            l3_len: 27,
        };
        assert_eq!(parse(&short), Err(NotFlow::Icmp(at)));
        // Seven bytes after the hop-by-hop header.
        let short6 = edited(&f6, |v| {
            v[18 + 4..18 + 6].copy_from_slice(&15u16.to_be_bytes())
        });
        let at6 = IcmpAt {
            family: Family::V6,
            l3_offset: 18,
            l4_offset: 18 + 40 + 8,
            l3_len: 40 + 15,
        };
        assert_eq!(parse(&short6), Err(NotFlow::Icmp(at6)));
    }

    /// Checks the invariants the worker and forwarding rely on.
    fn check_bounds(frame: &[u8], p: &ParsedPacket) {
        let l3 = p.l3_offset as usize;
        let l4 = p.l4_offset as usize;
        let end = l3 + p.l3_len as usize;
        assert!(l3 >= 14 && l3 < l4 && end <= frame.len());
        let l4_min = if p.key.proto == PROTO_TCP { 20 } else { 8 };
        assert!(l4 + l4_min <= end);
        assert!(p.key.proto == PROTO_TCP || p.key.proto == PROTO_UDP);
        if p.key.family == Family::V4 {
            assert!(p.key.src >> 32 == 0 && p.key.dst >> 32 == 0);
        }
    }

    /// Checks the invariants the ICMP path relies on.
    fn check_icmp_bounds(frame: &[u8], at: &IcmpAt) {
        let (l3, l4) = (at.l3_offset as usize, at.l4_offset as usize);
        let end = l3 + at.l3_len as usize;
        assert!(l3 >= 14 && l3 < l4 && l4 <= end && end <= frame.len());
        let ip_min = if at.family == Family::V4 { 20 } else { 40 };
        assert!(l4 - l3 >= ip_min);
    }

    /// Checks whatever `parse` says about `frame`.
    fn check_result(frame: &[u8], r: &Result<ParsedPacket, NotFlow>) {
        match r {
            Ok(p) => check_bounds(frame, p),
            Err(NotFlow::Icmp(at)) => check_icmp_bounds(frame, at),
            Err(NotFlow::Drop(_)) => {}
        }
    }

    fn arb_spec_frame() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(0u16..4096),
            any::<(u128, u128, u16, u16, u8)>(),
            0usize..3,
            0usize..40,
        )
            .prop_map(
                |(v6, tcp, vlan, (src, dst, sport, dport, flags), ext, plen)| {
                    let payload = vec![0x5a; plen];
                    let hdrs = [0u8; 16];
                    let opts = [1u8; 8];
                    let ext6: Vec<(u8, &[u8])> =
                        (0..ext).map(|_| (ipv6::EXT_DEST_OPTS, &hdrs[..])).collect();
                    FrameSpec {
                        vlan,
                        family: if v6 { Family::V6 } else { Family::V4 },
                        src: if v6 { src } else { src as u32 as u128 },
                        dst: if v6 { dst } else { dst as u32 as u128 },
                        sport,
                        dport,
                        l4: match (tcp, flags % 4) {
                            (true, _) => L4::Tcp {
                                flags,
                                seq: 1,
                                ack: 2,
                                window: 3,
                            },
                            (false, 0) => L4::Icmp {
                                msg_type: flags,
                                code: 0,
                                rest: 0,
                            },
                            (false, _) => L4::Udp,
                        },
                        ipv4_options: &opts[..ext * 4],
                        ipv6_ext: &ext6,
                        payload: &payload,
                        ..FrameSpec::default()
                    }
                    .build()
                    .unwrap()
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..160), et in 0usize..4) {
            // Steer a share of the inputs past the EtherType check.
            let mut bytes = bytes;
            if bytes.len() >= 14 {
                let t: [u16; 4] = [0x0800, 0x86dd, 0x8100, bytes[12] as u16];
                bytes[12..14].copy_from_slice(&t[et].to_be_bytes());
            }
            check_result(&bytes, &parse(&bytes));
        }

        #[test]
        fn built_frames_parse_back(f in arb_spec_frame()) {
            let p = match parse(&f) {
                Ok(p) => p,
                Err(NotFlow::Icmp(at)) => {
                    // An ICMP frame: its message is where it was written.
                    check_icmp_bounds(&f, &at);
                    let l3 = at.l3_offset as usize;
                    let proto = if at.family == Family::V4 { f[l3 + 9] } else { 58 };
                    prop_assert!(proto == 1 || proto == 58);
                    return Ok(());
                }
                Err(e) => panic!("built frame refused: {e:?}"),
            };
            check_bounds(&f, &p);
            // The key matches the bytes at the offsets.
            let l3 = p.l3_offset as usize;
            let l4 = p.l4_offset as usize;
            prop_assert_eq!(u16::from_be_bytes([f[l4], f[l4 + 1]]), p.key.sport);
            prop_assert_eq!(u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]), p.key.dport);
            match p.key.family {
                Family::V4 => prop_assert_eq!(
                    u32::from_be_bytes([f[l3 + 12], f[l3 + 13], f[l3 + 14], f[l3 + 15]]) as u128,
                    p.key.src
                ),
                Family::V6 => {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(&f[l3 + 8..l3 + 24]);
                    prop_assert_eq!(u128::from_be_bytes(a), p.key.src);
                }
            }
        }

        #[test]
        fn mutated_frames_never_panic(
            f in arb_spec_frame(),
            cut in any::<proptest::sample::Index>(),
            do_cut in any::<bool>(),
            flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..4),
        ) {
            let mut f = f;
            for (i, b) in flips {
                let at = i.index(f.len());
                f[at] = b;
            }
            if do_cut {
                f.truncate(cut.index(f.len() + 1));
            }
            check_result(&f, &parse(&f));
        }

        /// The one-check path for plain IPv4 TCP frames answers as the
        /// general parser does, or leaves the frame to it: on plain TCP
        /// SYNs with bytes changed (among them the EtherType, version and
        /// header length, protocol, fragment field, both lengths, TCP data
        /// offset, which with a payload makes room for options) and the
        /// frame cut anywhere.
        #[test]
        fn plain_tcp_v4_path_agrees_with_parse_any(
            flips in proptest::collection::vec((14usize..54, any::<u8>()), 0..3),
            et in any::<bool>(),
            cut in 0usize..70,
            do_cut in any::<bool>(),
            payload in 0usize..3,
        ) {
            let bytes = [1u8; 8];
            let mut f = FrameSpec {
                payload: &bytes[..payload * 4],
                ..FrameSpec::tcp_v4([10, 1, 2, 3], 40000, [192, 0, 2, 10], 80, tcp_flags::SYN)
            }
            .build()
            .unwrap();
            if et {
                f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
            }
            for (at, b) in flips {
                f[at] = b;
            }
            if do_cut {
                f.truncate(cut.min(f.len()));
            }
            let general = parse_any(&f);
            match plain(&f) {
                Some(p) => prop_assert_eq!(Ok(p), general),
                None => prop_assert!(
                    !matches!(general, Ok(p) if p.l3_offset == 14 && p.l4_offset == 34
                        && p.key.proto == PROTO_TCP && p.key.family == Family::V4),
                    "left out a plain TCP frame: {:?}", general
                ),
            }
        }
    }

    /// The plain path's answer for `f`, if it takes it.
    fn plain(f: &[u8]) -> Option<ParsedPacket> {
        let mut p = ParsedPacket::EMPTY;
        parse_plain_tcp_v4(f, &mut p).then_some(p)
    }

    #[test]
    fn plain_tcp_v4_path_takes_the_common_frame() {
        let f = syn_v4();
        assert_eq!(plain(&f), Some(parse_any(&f).unwrap()));
        // Tagged, IPv6 and UDP frames go to the general parser.
        let tagged = FrameSpec {
            vlan: Some(7),
            ..FrameSpec::tcp_v4([10, 1, 2, 3], 40000, [192, 0, 2, 10], 80, tcp_flags::SYN)
        }
        .build()
        .unwrap();
        assert_eq!(plain(&tagged), None);
        assert!(parse(&tagged).is_ok());
        let udp = FrameSpec::udp_v4([10, 0, 0, 1], 53, [10, 0, 0, 2], 5353)
            .build()
            .unwrap();
        assert_eq!(plain(&udp), None);
    }
}
