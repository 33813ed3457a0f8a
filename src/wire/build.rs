//! Writes whole frames: Ethernet (optionally 802.1Q-tagged), IPv4 (with
//! options) or IPv6 (with extension headers), TCP, UDP or ICMP (ICMPv6 over
//! IPv6), all checksums correct, padded to the Ethernet minimum.
//!
//! [`write_frame`] writes into a caller's buffer without allocating (the
//! traffic generator's per-packet path); [`FrameSpec::build`] returns a
//! `Vec<u8>` for tests.

use super::{checksum, ethernet, icmp, ipv4, ipv6, tcp, udp, Error, Result};
use crate::types::{Family, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// The transport header to write.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum L4 {
    Tcp {
        flags: u8,
        seq: u32,
        ack: u32,
        window: u16,
    },
    Udp,
    /// An ICMP message (ICMPv6 over IPv6): type, code and header bytes 4-7;
    /// the frame's payload is its body. `sport` and `dport` are unused.
    Icmp {
        msg_type: u8,
        code: u8,
        rest: u32,
    },
}

/// Everything that varies between generated frames.
///
/// Addresses follow [`crate::types::FlowKey`]: IPv4 in the low 32 bits of a
/// `u128`, both as big-endian numbers.
#[derive(Clone, Copy, Debug)]
pub struct FrameSpec<'a> {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// VLAN id of a single 802.1Q tag (priority 0).
    pub vlan: Option<u16>,
    pub family: Family,
    pub src: u128,
    pub dst: u128,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// The IPv4 DF bit (set by default, as TCP stacks do).
    pub dont_frag: bool,
    /// IPv4 options, written as given: a multiple of 4 bytes, at most 40.
    pub ipv4_options: &'a [u8],
    /// IPv6 extension headers in order, as (type, whole header bytes). The
    /// builder fills each header's next-header byte and its length byte
    /// (the reserved byte for a fragment header). Types: hop-by-hop,
    /// routing, destination options (8n bytes), fragment (8 bytes), AH (4n
    /// bytes, at least 8).
    pub ipv6_ext: &'a [(u8, &'a [u8])],
    pub payload: &'a [u8],
}

impl Default for FrameSpec<'_> {
    fn default() -> Self {
        FrameSpec {
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlan: None,
            family: Family::V4,
            src: 0,
            dst: 0,
            sport: 0,
            dport: 0,
            l4: L4::Udp,
            ttl: 64,
            dont_frag: true,
            ipv4_options: &[],
            ipv6_ext: &[],
            payload: &[],
        }
    }
}

impl FrameSpec<'static> {
    /// A TCP segment over IPv4 with the given flags and no payload.
    pub fn tcp_v4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Self {
        FrameSpec {
            src: u32::from_be_bytes(src) as u128,
            dst: u32::from_be_bytes(dst) as u128,
            sport,
            dport,
            l4: L4::Tcp {
                flags,
                seq: 1,
                ack: 0,
                window: 65535,
            },
            ..FrameSpec::default()
        }
    }

    /// A TCP segment over IPv6 with the given flags and no payload.
    pub fn tcp_v6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16, flags: u8) -> Self {
        FrameSpec {
            family: Family::V6,
            src: u128::from_be_bytes(src),
            dst: u128::from_be_bytes(dst),
            ..FrameSpec::tcp_v4([0; 4], sport, [0; 4], dport, flags)
        }
    }

    /// An empty UDP datagram over IPv4.
    pub fn udp_v4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Self {
        FrameSpec {
            l4: L4::Udp,
            ..FrameSpec::tcp_v4(src, sport, dst, dport, 0)
        }
    }

    /// An ICMP message over IPv4 (ICMPv6 over IPv6 with `family` V6, from
    /// [`FrameSpec::icmp_v6`]) with the given type, code and header bytes
    /// 4-7; set `payload` for its body.
    pub fn icmp_v4(src: [u8; 4], dst: [u8; 4], msg_type: u8, code: u8, rest: u32) -> Self {
        FrameSpec {
            l4: L4::Icmp {
                msg_type,
                code,
                rest,
            },
            dont_frag: false,
            ..FrameSpec::tcp_v4(src, 0, dst, 0, 0)
        }
    }

    /// An ICMPv6 message over IPv6.
    pub fn icmp_v6(src: [u8; 16], dst: [u8; 16], msg_type: u8, code: u8, rest: u32) -> Self {
        FrameSpec {
            l4: L4::Icmp {
                msg_type,
                code,
                rest,
            },
            ..FrameSpec::tcp_v6(src, 0, dst, 0, 0)
        }
    }

    /// An empty UDP datagram over IPv6.
    pub fn udp_v6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16) -> Self {
        FrameSpec {
            l4: L4::Udp,
            ..FrameSpec::tcp_v6(src, sport, dst, dport, 0)
        }
    }
}

impl FrameSpec<'_> {
    /// The frame in a new vector.
    pub fn build(&self) -> Result<Vec<u8>> {
        let mut v = vec![0u8; frame_len(self)?];
        let n = write_frame(&mut v, self)?;
        v.truncate(n);
        Ok(v)
    }
}

/// Lengths of the parts of a frame, validated.
struct Layout {
    l2: usize,
    l3_hdr: usize,
    l4_len: usize,
    /// IP packet length (header, extensions, L4).
    l3_len: usize,
    /// Frame length, padding included.
    frame: usize,
}

fn layout(spec: &FrameSpec) -> Result<Layout> {
    let l2 = ethernet::HEADER_LEN + spec.vlan.map_or(0, |_| ethernet::VLAN_TAG_LEN);
    let l4_hdr = match spec.l4 {
        L4::Tcp { .. } => tcp::HEADER_LEN,
        L4::Udp => udp::HEADER_LEN,
        L4::Icmp { .. } => icmp::HEADER_LEN,
    };
    let l4_len = l4_hdr + spec.payload.len();
    let l3_hdr = match spec.family {
        Family::V4 => {
            let o = spec.ipv4_options.len();
            if o % 4 != 0 || o > 40 {
                return Err(Error::Malformed);
            }
            ipv4::HEADER_LEN + o
        }
        Family::V6 => {
            let mut ext = 0;
            for &(ty, h) in spec.ipv6_ext {
                let ok = match ty {
                    ipv6::EXT_HOP_BY_HOP | ipv6::EXT_ROUTING | ipv6::EXT_DEST_OPTS => {
                        h.len() >= 8 && h.len() % 8 == 0 && h.len() <= 2048
                    }
                    ipv6::EXT_FRAGMENT => h.len() == 8,
                    ipv6::EXT_AH => h.len() >= 8 && h.len() % 4 == 0 && h.len() <= 1028,
                    _ => false,
                };
                if !ok {
                    return Err(Error::Malformed);
                }
                ext += h.len();
            }
            ipv6::HEADER_LEN + ext
        }
    };
    let l3_len = l3_hdr + l4_len;
    let limit = match spec.family {
        Family::V4 => 65535,
        Family::V6 => 65535 + ipv6::HEADER_LEN,
    };
    if l3_len > limit || l4_len > 65535 {
        return Err(Error::Malformed);
    }
    Ok(Layout {
        l2,
        l3_hdr,
        l4_len,
        l3_len,
        frame: (l2 + l3_len).max(ethernet::MIN_FRAME_LEN),
    })
}

/// The length `write_frame` will write for `spec`, padding included.
pub fn frame_len(spec: &FrameSpec) -> Result<usize> {
    layout(spec).map(|l| l.frame)
}

/// Writes the frame `spec` describes at the start of `buf` and returns its
/// length (at least 60: short frames are zero-padded). Fails with
/// `Truncated` if `buf` is too small and `Malformed` for an invalid spec
/// (bad option or extension lengths, a packet over 64 KiB).
pub fn write_frame(buf: &mut [u8], spec: &FrameSpec) -> Result<usize> {
    let lay = layout(spec)?;
    if buf.len() < lay.frame {
        return Err(Error::Truncated);
    }
    let buf = &mut buf[..lay.frame];

    // Ethernet and the optional tag.
    let ethertype = match spec.family {
        Family::V4 => ethernet::ETHERTYPE_IPV4,
        Family::V6 => ethernet::ETHERTYPE_IPV6,
    };
    buf[0..6].copy_from_slice(&spec.dst_mac);
    buf[6..12].copy_from_slice(&spec.src_mac);
    if let Some(vid) = spec.vlan {
        buf[12..14].copy_from_slice(&ethernet::ETHERTYPE_VLAN.to_be_bytes());
        buf[14..16].copy_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    buf[lay.l2 - 2..lay.l2].copy_from_slice(&ethertype.to_be_bytes());

    let proto = match (spec.l4, spec.family) {
        (L4::Tcp { .. }, _) => PROTO_TCP,
        (L4::Udp, _) => PROTO_UDP,
        (L4::Icmp { .. }, Family::V4) => PROTO_ICMP,
        (L4::Icmp { .. }, Family::V6) => PROTO_ICMPV6,
    };
    let (l3, rest) = buf[lay.l2..].split_at_mut(lay.l3_hdr);
    let l4 = &mut rest[..lay.l4_len];

    // IP header and the pseudo header sum for the transport checksum.
    let pseudo = match spec.family {
        Family::V4 => {
            let src = (spec.src as u32).to_be_bytes();
            let dst = (spec.dst as u32).to_be_bytes();
            let mut ip = ipv4::Packet::new_unchecked(&mut *l3);
            ip.set_version_and_header_len(lay.l3_hdr);
            ip.set_tos(0);
            ip.set_total_len(lay.l3_len as u16);
            ip.set_ident(0);
            ip.set_frag(spec.dont_frag, false, 0);
            ip.set_ttl(spec.ttl);
            ip.set_protocol(proto);
            ip.set_src_addr(src);
            ip.set_dst_addr(dst);
            ip.options_mut().copy_from_slice(spec.ipv4_options);
            ip.fill_checksum();
            checksum::pseudo_v4(src, dst, proto, lay.l4_len as u16)
        }
        Family::V6 => {
            let src = spec.src.to_be_bytes();
            let dst = spec.dst.to_be_bytes();
            let (fixed, mut ext) = l3.split_at_mut(ipv6::HEADER_LEN);
            let first = spec.ipv6_ext.first().map_or(proto, |&(ty, _)| ty);
            let mut ip = ipv6::Packet::new_unchecked(fixed);
            ip.set_version_tc_flow(0, 0);
            ip.set_payload_len((lay.l3_len - ipv6::HEADER_LEN) as u16);
            ip.set_next_header(first);
            ip.set_hop_limit(spec.ttl);
            ip.set_src_addr(src);
            ip.set_dst_addr(dst);
            for (i, &(ty, h)) in spec.ipv6_ext.iter().enumerate() {
                let next = spec.ipv6_ext.get(i + 1).map_or(proto, |&(t, _)| t);
                let (out, tail) = ext.split_at_mut(h.len());
                out.copy_from_slice(h);
                out[0] = next;
                out[1] = match ty {
                    ipv6::EXT_FRAGMENT => 0,
                    ipv6::EXT_AH => (h.len() / 4 - 2) as u8,
                    _ => (h.len() / 8 - 1) as u8,
                };
                ext = tail;
            }
            checksum::pseudo_v6(&src, &dst, proto, lay.l4_len as u32)
        }
    };

    // Transport header, payload, checksum.
    match spec.l4 {
        L4::Tcp {
            flags,
            seq,
            ack,
            window,
        } => {
            let mut t = tcp::Packet::new_unchecked(l4);
            t.set_src_port(spec.sport);
            t.set_dst_port(spec.dport);
            t.set_seq_number(seq);
            t.set_ack_number(ack);
            t.set_header_len(tcp::HEADER_LEN);
            t.set_flags(flags);
            t.set_window(window);
            t.set_urgent(0);
            t.payload_mut().copy_from_slice(spec.payload);
            t.fill_checksum(pseudo);
        }
        L4::Udp => {
            let mut u = udp::Packet::new_unchecked(l4);
            u.set_src_port(spec.sport);
            u.set_dst_port(spec.dport);
            u.set_len(lay.l4_len as u16);
            u.payload_mut().copy_from_slice(spec.payload);
            u.fill_checksum(pseudo);
        }
        L4::Icmp {
            msg_type,
            code,
            rest,
        } => {
            let mut m = icmp::Packet::new_unchecked(l4);
            m.set_msg_type(msg_type);
            m.set_code(code);
            m.set_rest(rest);
            m.body_mut().copy_from_slice(spec.payload);
            match spec.family {
                Family::V4 => m.fill_checksum_v4(),
                Family::V6 => m.fill_checksum_v6(pseudo),
            }
        }
    }

    buf[lay.l2 + lay.l3_len..].fill(0);
    Ok(lay.frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::tcp_flags;

    #[test]
    fn tcp_v4_frame_decodes() {
        let spec = FrameSpec {
            payload: b"hello",
            vlan: Some(42),
            ..FrameSpec::tcp_v4([10, 0, 0, 1], 1234, [192, 0, 2, 1], 80, tcp_flags::SYN)
        };
        let f = spec.build().unwrap();
        assert_eq!(f.len(), 18 + 20 + 20 + 5);
        let e = ethernet::Frame::new_checked(&f[..]).unwrap();
        let info = e.l2_info().unwrap();
        assert_eq!(info.vlan, Some(42));
        assert_eq!(info.ethertype, ethernet::ETHERTYPE_IPV4);
        let ip = ipv4::Packet::new_checked(&f[18..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.src_addr(), [10, 0, 0, 1]);
        assert_eq!(ip.dst_addr(), [192, 0, 2, 1]);
        assert_eq!(ip.ttl(), 64);
        assert!(!ip.is_fragment());
        let t = tcp::Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(
            (t.src_port(), t.dst_port(), t.flags()),
            (1234, 80, tcp_flags::SYN)
        );
        assert_eq!(t.payload(), b"hello");
        let pseudo = checksum::pseudo_v4(ip.src_addr(), ip.dst_addr(), 6, 25);
        assert!(t.verify_checksum(pseudo));
    }

    #[test]
    fn icmp_frames_decode() {
        let f = FrameSpec {
            payload: b"quote",
            ..FrameSpec::icmp_v4([10, 0, 0, 1], [192, 0, 2, 1], 3, 4, 1480)
        }
        .build()
        .unwrap();
        let ip = ipv4::Packet::new_checked(&f[14..]).unwrap();
        assert_eq!(ip.protocol(), PROTO_ICMP);
        assert!(!ip.dont_frag(), "ICMP errors go without DF");
        assert!(ip.verify_checksum());
        let m = icmp::Packet::new_checked(ip.payload()).unwrap();
        assert!(m.verify_checksum_v4());
        assert_eq!((m.msg_type(), m.code(), m.next_hop_mtu()), (3, 4, 1480));
        assert_eq!(m.body(), b"quote");

        let (src, dst) = ([0x20; 16], [0x30; 16]);
        let f = FrameSpec {
            payload: b"ping",
            ..FrameSpec::icmp_v6(src, dst, 128, 0, 7)
        }
        .build()
        .unwrap();
        let ip = ipv6::Packet::new_checked(&f[14..]).unwrap();
        assert_eq!(ip.next_header(), PROTO_ICMPV6);
        let m = icmp::Packet::new_checked(ip.payload()).unwrap();
        assert!(m.verify_checksum_v6(checksum::pseudo_v6(&src, &dst, 58, 12)));
        assert_eq!((m.msg_type(), m.rest(), m.body()), (128, 7, &b"ping"[..]));
    }

    #[test]
    fn short_frames_are_padded() {
        let mut buf = [0xeeu8; 128];
        let n = write_frame(
            &mut buf,
            &FrameSpec::udp_v4([1, 2, 3, 4], 5, [6, 7, 8, 9], 10),
        )
        .unwrap();
        assert_eq!(n, ethernet::MIN_FRAME_LEN);
        assert!(buf[42..60].iter().all(|&b| b == 0));
        assert_eq!(buf[60], 0xee);
        let ip = ipv4::Packet::new_checked(&buf[14..n]).unwrap();
        assert_eq!(ip.total_len(), 28);
        let u = udp::Packet::new_checked(ip.payload()).unwrap();
        assert!(u.verify_checksum(checksum::pseudo_v4([1, 2, 3, 4], [6, 7, 8, 9], 17, 8)));
        assert_ne!(u.checksum(), 0);
    }

    #[test]
    fn v6_with_extensions_decodes() {
        let hbh = [0u8; 8];
        let dst_opts = [0u8; 16];
        let ext: &[(u8, &[u8])] = &[
            (ipv6::EXT_HOP_BY_HOP, &hbh),
            (ipv6::EXT_DEST_OPTS, &dst_opts),
        ];
        let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst = [
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80,
        ];
        let spec = FrameSpec {
            ipv6_ext: ext,
            payload: b"data",
            ..FrameSpec::udp_v6(src, 5000, dst, 53)
        };
        let f = spec.build().unwrap();
        let ip = ipv6::Packet::new_checked(&f[14..]).unwrap();
        assert_eq!(ip.next_header(), ipv6::EXT_HOP_BY_HOP);
        assert_eq!(ip.payload_len(), 8 + 16 + 8 + 4);
        assert_eq!(
            ip.upper_layer(),
            Ok(ipv6::Upper::Proto {
                proto: 17,
                offset: 64
            })
        );
        assert_eq!(f[14 + 40], ipv6::EXT_DEST_OPTS);
        assert_eq!(f[14 + 48 + 1], 1);
        let u = udp::Packet::new_checked(&f[14 + 64..]).unwrap();
        assert_eq!(
            (u.src_port(), u.dst_port(), u.payload()),
            (5000, 53, &b"data"[..])
        );
        assert!(u.verify_checksum(checksum::pseudo_v6(&src, &dst, 17, 12)));
    }

    #[test]
    fn rejects_bad_specs_and_small_buffers() {
        let spec = FrameSpec {
            ipv4_options: &[1, 1, 1],
            ..FrameSpec::default()
        };
        assert_eq!(spec.build().unwrap_err(), Error::Malformed);
        let spec = FrameSpec {
            family: Family::V6,
            ipv6_ext: &[(6, &[0u8; 8])],
            ..FrameSpec::default()
        };
        assert_eq!(spec.build().unwrap_err(), Error::Malformed);
        let big = vec![0u8; 65536];
        let spec = FrameSpec {
            payload: &big,
            ..FrameSpec::default()
        };
        assert_eq!(spec.build().unwrap_err(), Error::Malformed);
        let mut small = [0u8; 59];
        assert_eq!(
            write_frame(&mut small, &FrameSpec::default()).unwrap_err(),
            Error::Truncated
        );
    }
}
