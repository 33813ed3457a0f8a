//! The two direct-server-return output paths: IP-in-IP encapsulation to the
//! backend's address, and rewriting the MAC addresses for a backend on the
//! same segment that holds the VIP on its loopback.
//!
//! Both work in place on the received buffer: encapsulation grows the frame
//! into the buffer's headroom, so no packet is copied in the common case.
//! What a packet to a given backend gets (the next hop, the outer header's
//! fixed fields) is worked out once per snapshot, as an [`Egress`] the
//! worker keeps per backend and port; the worker's main line hands each
//! packet to its backend's.
//! An IPv4 packet without DF that is too long for the link once forwarded
//! is split into fragments ([`fragment_ipv4`]): the outer packet of `ipip`
//! (RFC 2003 5.1), the packet itself in `l2` mode.

use crate::datapath::classify::ParsedPacket;
use crate::datapath::pktio::PacketBuf;
use crate::types::DropReason;
use crate::types::{flow_hash, Family};
use crate::wire::{ethernet, ipv4, ipv6};

/// TTL / hop limit of the outer header.
const OUTER_TTL: u8 = 64;
/// Most fragments [`fragment_ipv4`] cuts a packet into. Received frames are
/// single-segment (2 KiB of data room) and MTUs at least 1280, so two are
/// the most a packet ever needs; the bound caps the work a bad setting
/// could cause.
pub const MAX_FRAGMENTS: usize = 8;

/// Encapsulates the IP packet of a parsed frame in an outer IP header of the
/// same family, from `outer_src` to `backend` (RFC 2003 IPv4-in-IPv4, or RFC
/// 2473 IPv6-in-IPv6), and rewrites the Ethernet header for the next hop.
///
/// The link-layer header keeps its VLAN tag(s); Ethernet padding after the
/// inner packet is removed so the frame ends where the outer packet does.
/// The outer IPv4 header copies the inner TOS and DF bit (RFC 2003 3.1, so
/// path-MTU discovery keeps working through the tunnel), has identification
/// `ident` (the caller's counter: a router further on may fragment an
/// outer packet without DF, and fragments of different packets between
/// the same two addresses must not share one, RFC 6864) and TTL 64;
/// the outer IPv6 header copies the traffic class and takes its flow label
/// from the flow hash, so routers spread tunnelled flows (RFC 6438).
///
/// Fails with `TooBig` when the outer packet would be longer than
/// `max_len` (the MTU of the link it leaves on; at most 65,535, the limit
/// of IPv4's length field), with `NoRoom` when the headroom cannot take the
/// outer header, and with `Malformed` when `pkt` does not describe `buf`
/// (its IP packet runs past the frame). On failure the buffer is unchanged.
///
/// The general path, out of line: the worker's main line takes
/// [`Egress::forward`], which writes the common frame (untagged IPv4, room
/// in front) itself and calls this for the others.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
pub fn encap_ipip<B: PacketBuf>(
    buf: &mut B,
    pkt: &ParsedPacket,
    outer_src: u128,
    backend: u128,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    max_len: usize,
    ident: u16,
) -> Result<(), DropReason> {
    let l2 = pkt.l3_offset as usize;
    let inner = pkt.l3_len as usize;
    let frame_len = buf.len();
    let end = l2 + inner;
    if l2 < 14 || end > frame_len {
        return Err(DropReason::Malformed);
    }
    let outer = match pkt.key.family {
        Family::V4 => ipv4::HEADER_LEN,
        Family::V6 => ipv6::HEADER_LEN,
    };
    if inner + outer > max_len {
        return Err(DropReason::TooBig);
    }
    // Every inner packet has at least the header the outer one copies from.
    if inner < outer {
        return Err(DropReason::Malformed);
    }

    // Make the frame exactly l2 + outer + inner long. Usually the headroom
    // takes the whole outer header and any padding is cut from the tail, so
    // the inner packet stays where it is. Otherwise (a short headroom, or a
    // buffer that cannot be cut) the frame ends where the old one ended:
    // grow the front by what the padding does not provide, or (padding
    // longer than the outer header) shrink it, moving the inner packet.
    let pad = frame_len - end;
    let in_place = buf.prepend(outer) && {
        if pad == 0 || buf.truncate(end + outer) {
            true
        } else {
            buf.trim_front(outer);
            false
        }
    };
    let (old_front, new_front) = if in_place {
        (outer, 0)
    } else if pad < outer {
        if !buf.prepend(outer - pad) {
            return Err(DropReason::NoRoom);
        }
        (outer - pad, 0)
    } else {
        (0, pad - outer)
    };
    let data = buf.data_mut();
    // Inner packet first (it moves towards the end, over the padding), then
    // the tag and EtherType bytes of the link header; the MACs are rewritten
    // anyway. Neither destination overlaps the other's source.
    let inner_from = old_front + l2;
    let inner_to = new_front + l2 + outer;
    if inner_from != inner_to {
        data.copy_within(inner_from..inner_from + inner, inner_to);
    }
    if l2 == 14 {
        // Untagged: the EtherType alone, by value (a two-byte move by
        // `copy_within` is a call to memmove).
        let et = [data[old_front + 12], data[old_front + 13]];
        data[new_front + 12..new_front + 14].copy_from_slice(&et);
    } else {
        data.copy_within(old_front + 12..old_front + l2, new_front + 12);
    }
    let data = &mut data[new_front..];
    data[0..6].copy_from_slice(&dst_mac);
    data[6..12].copy_from_slice(&src_mac);

    let (hdr, inner_ip) = data[l2..].split_at_mut(outer);
    match pkt.key.family {
        Family::V4 => {
            let (Some(hdr), Some(&tos), Some(&flags)) = (
                hdr.first_chunk_mut::<{ ipv4::HEADER_LEN }>(),
                inner_ip.get(1),
                inner_ip.get(6),
            ) else {
                // Cannot happen: the outer header is `outer` long, and the
                // inner packet at least as long (checked above).
                return Err(DropReason::Malformed);
            };
            let (src, dst) = (outer_src as u32, backend as u32);
            ipv4_outer(hdr, tos, flags, ident, inner, src, dst);
        }
        Family::V6 => {
            let tc = (u16::from_be_bytes([inner_ip[0], inner_ip[1]]) >> 4) as u8;
            let flow = (flow_hash(&pkt.key) as u32) & 0x000f_ffff;
            let mut h = [0u8; ipv6::HEADER_LEN];
            h[0..4].copy_from_slice(&(6u32 << 28 | (tc as u32) << 20 | flow).to_be_bytes());
            h[4..6].copy_from_slice(&(inner as u16).to_be_bytes());
            h[6] = ipv6::PROTO_IPV6;
            h[7] = OUTER_TTL;
            h[8..24].copy_from_slice(&outer_src.to_be_bytes());
            h[24..40].copy_from_slice(&backend.to_be_bytes());
            hdr.copy_from_slice(&h);
        }
    }
    if new_front > 0 {
        // Cannot fail: new_front is at most the padding, inside the frame.
        buf.trim_front(new_front);
    }
    Ok(())
}

/// How packets to one backend leave by one port, worked out when the
/// worker takes a new snapshot rather than for each packet: the next hop's
/// MAC (the backend's own, else, for `ipip`, the port's gateway) and, for
/// `ipip`, the outer addresses and the outer IPv4 header's fixed fields
/// with their share of its checksum. The worker keeps one per backend and
/// port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Egress {
    /// The new link header (destination MAC, source MAC, EtherType IPv4)
    /// and, for IP-in-IP to an IPv4 backend, the outer IPv4 header as
    /// every packet has it: TOS, length, DF and checksum zero.
    head: [u8; PLAIN_HEAD],
    way: Way,
    /// Ones'-complement sum of the outer IPv4 header's fixed 16-bit words
    /// (TTL and protocol, the addresses).
    sum: u32,
    /// Outer source and destination addresses (`ipip`).
    source: u128,
    target: u128,
}

/// Link header and outer IPv4 header of the common frame.
const PLAIN_HEAD: usize = 14 + ipv4::HEADER_LEN;

/// What [`Egress::forward`] does to a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    /// Nothing: there is no next hop (an `l2` backend without a MAC, an
    /// `ipip` one without a MAC and no gateway); the packet is dropped as
    /// `NoRoute`.
    NoRoute,
    /// The MAC addresses rewritten, the rest of the frame kept (the
    /// backend holds the VIP on its loopback).
    L2,
    /// Encapsulated ([`encap_ipip`]).
    IpIp,
}

impl Egress {
    /// Where no backend is: every packet dropped as `NoRoute`.
    pub const NO_ROUTE: Egress = Egress {
        head: [0; PLAIN_HEAD],
        way: Way::NoRoute,
        sum: 0,
        source: 0,
        target: 0,
    };

    /// Packets to a backend at `target` (bits, IPv4 in the low 32) whose
    /// next-hop MAC is `mac`, leaving by a port whose MAC is `port_mac`:
    /// IP-in-IP from `source` (`ipip`, with the port's `gateway` as next
    /// hop where the backend has no MAC of its own), or rewritten MAC
    /// addresses (`ipip` = None, for `l2`).
    pub fn new(
        ipip: Option<u128>,
        target: u128,
        mac: Option<[u8; 6]>,
        gateway: Option<[u8; 6]>,
        port_mac: [u8; 6],
    ) -> Egress {
        let next_hop = match ipip {
            Some(_) => mac.or(gateway),
            None => mac,
        };
        let Some(dst_mac) = next_hop else {
            return Egress::NO_ROUTE;
        };
        let mut head = [0; PLAIN_HEAD];
        head[0..6].copy_from_slice(&dst_mac);
        head[6..12].copy_from_slice(&port_mac);
        head[12..14].copy_from_slice(&ethernet::ETHERTYPE_IPV4.to_be_bytes());
        let Some(source) = ipip else {
            return Egress {
                head,
                way: Way::L2,
                ..Egress::NO_ROUTE
            };
        };
        // The fixed part of the outer IPv4 header (used only for IPv4
        // packets to an IPv4 backend: the low 32 bits).
        let (src, dst) = (source as u32, target as u32);
        let w4 = u32::from(OUTER_TTL) << 8 | u32::from(ipv4::PROTO_IPIP);
        let hdr = &mut head[14..];
        hdr[0] = 0x45;
        hdr[8..10].copy_from_slice(&(w4 as u16).to_be_bytes());
        hdr[12..16].copy_from_slice(&src.to_be_bytes());
        hdr[16..20].copy_from_slice(&dst.to_be_bytes());
        Egress {
            head,
            way: Way::IpIp,
            sum: w4 + (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff),
            source,
            target,
        }
    }

    /// Rewrites the frame of `pkt` for this way out: encapsulated
    /// ([`encap_ipip`], an outer IPv4 header identified by `ident`) or with
    /// new MAC addresses (`l2`), failing as those do, and with `NoRoute`
    /// where there is no next hop. Refuses with `TooBig` a packet longer
    /// than `max_len` once forwarded (the link's MTU; the encapsulation
    /// included).
    ///
    /// Always inlined: the worker's main line calls it for every packet,
    /// and the length check against the link's MTU is the one comparison
    /// the main line spends on path MTU.
    #[inline(always)]
    pub fn forward<B: PacketBuf>(
        &self,
        buf: &mut B,
        pkt: &ParsedPacket,
        max_len: usize,
        ident: u16,
    ) -> Result<(), DropReason> {
        match self.way {
            Way::IpIp => {
                let inner = usize::from(pkt.l3_len);
                if pkt.l3_offset == 14
                    && pkt.key.family == Family::V4
                    && inner >= ipv4::HEADER_LEN
                    && inner + ipv4::HEADER_LEN <= max_len
                    && self.encap_plain_ipv4(buf, inner, ident)
                {
                    return Ok(());
                }
                let (dst_mac, src_mac) = self.macs();
                encap_ipip(
                    buf,
                    pkt,
                    self.source,
                    self.target,
                    src_mac,
                    dst_mac,
                    max_len,
                    ident,
                )
            }
            Way::L2 => {
                if usize::from(pkt.l3_len) > max_len {
                    return Err(DropReason::TooBig);
                }
                if let Some(h) = buf.data_mut().first_chunk_mut::<12>() {
                    h.copy_from_slice(&self.head[..12]);
                }
                Ok(())
            }
            Way::NoRoute => Err(DropReason::NoRoute),
        }
    }

    /// The next hop's MAC and the port's.
    fn macs(&self) -> ([u8; 6], [u8; 6]) {
        let mut dst = [0; 6];
        let mut src = [0; 6];
        dst.copy_from_slice(&self.head[0..6]);
        src.copy_from_slice(&self.head[6..12]);
        (dst, src)
    }

    /// [`encap_ipip`] of the common frame, in one piece: untagged Ethernet,
    /// IPv4 (`inner` bytes long, at least its header, then any Ethernet
    /// padding, cut), headroom for the outer header. Returns false, the
    /// buffer unchanged, when the headroom is too small, the frame shorter
    /// than the packet, or the buffer cannot be cut (for the general path).
    #[inline(always)]
    fn encap_plain_ipv4<B: PacketBuf>(&self, buf: &mut B, inner: usize, ident: u16) -> bool {
        const OUTER: usize = ipv4::HEADER_LEN;
        if !buf.reframe(OUTER, PLAIN_HEAD + inner) {
            return false;
        }
        // The new link and outer headers, the inner IP header.
        let Some(f) = buf.data_mut().first_chunk_mut::<{ PLAIN_HEAD + OUTER }>() else {
            // Cannot happen (the frame holds the inner header): undone.
            buf.trim_front(OUTER);
            return false;
        };
        let (tos, flags) = (f[PLAIN_HEAD + 1], f[PLAIN_HEAD + 6]);
        f[..PLAIN_HEAD].copy_from_slice(&self.head);
        // The words each packet sets, summed as values (not read back from
        // bytes just stored, which defeats store forwarding): version/IHL
        // and TOS, total length, identification, flags (the inner DF) and
        // fragment offset.
        let w0 = 0x4500 | u32::from(tos);
        let total = (inner + OUTER) as u32;
        let w3 = u32::from(flags & 0x40) << 8;
        let sum = self.sum + w0 + total + u32::from(ident) + w3;
        let sum = (sum & 0xffff) + (sum >> 16);
        let c = !((sum & 0xffff) + (sum >> 16)) as u16;
        f[14..18].copy_from_slice(&(w0 << 16 | total).to_be_bytes());
        f[18..22].copy_from_slice(&(u32::from(ident) << 16 | w3).to_be_bytes());
        f[24..26].copy_from_slice(&c.to_be_bytes());
        true
    }
}

/// Writes the outer IPv4 header of an `inner`-byte packet whose TOS and
/// flags byte are `tos` and `flags`: its TOS, identification `ident`, its
/// DF bit, TTL 64, protocol IP-in-IP, the checksum.
#[inline(always)]
fn ipv4_outer(
    hdr: &mut [u8; ipv4::HEADER_LEN],
    tos: u8,
    flags: u8,
    ident: u16,
    inner: usize,
    src: u32,
    dst: u32,
) {
    // The header's 16-bit words are summed as values (not read back from
    // bytes just stored, which defeats store forwarding): version/IHL and
    // TOS, total length, identification, flags (the inner DF) and fragment
    // offset 0, TTL and protocol, addresses.
    let w0 = 0x4500 | u32::from(tos);
    let total = (inner + ipv4::HEADER_LEN) as u32;
    let id = u32::from(ident);
    let w3 = u32::from(flags & 0x40) << 8;
    let w4 = u32::from(OUTER_TTL) << 8 | u32::from(ipv4::PROTO_IPIP);
    let sum =
        w0 + total + id + w3 + w4 + (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff);
    let sum = (sum & 0xffff) + (sum >> 16);
    let c = !((sum & 0xffff) + (sum >> 16)) as u16;
    hdr[0..4].copy_from_slice(&(w0 << 16 | total).to_be_bytes());
    hdr[4..8].copy_from_slice(&(id << 16 | w3).to_be_bytes());
    hdr[8..12].copy_from_slice(&(w4 << 16 | u32::from(c)).to_be_bytes());
    hdr[12..16].copy_from_slice(&src.to_be_bytes());
    hdr[16..20].copy_from_slice(&dst.to_be_bytes());
}

/// Splits the IPv4 packet at `l3` in `buf` into fragments of at most `mtu`
/// bytes (RFC 791): `buf` keeps the first, cut to length; each further one
/// is written into a buffer from `alloc` (asked for a frame of the length
/// given) with a copy of the link-layer header, and pushed onto `out`.
/// Every fragment keeps the packet's identification (RFC 791: it is what
/// the receiver joins them by); the first keeps the header's options,
/// the others only the options marked to be copied. Fragments shorter
/// than the Ethernet minimum are zero-padded. The packet must not have DF
/// set (the caller decides what a DF packet gets instead); an existing
/// offset and MF flag (a fragment fragmented again) are kept.
///
/// Fails with `NoRoom` when `alloc` runs dry, when the MTU leaves no room
/// for data, or when more than [`MAX_FRAGMENTS`] would be needed; with
/// `Malformed` when `l3` does not start an IPv4 packet inside `buf` or
/// when a fragment's data would run past the largest offset. On failure
/// `buf` and `out` are unchanged.
pub fn fragment_ipv4<B: PacketBuf>(
    buf: &mut B,
    l3: usize,
    mtu: usize,
    mut alloc: impl FnMut(usize) -> Option<B>,
    out: &mut Vec<B>,
) -> Result<(), DropReason> {
    let data = buf.data();
    let ip = ipv4::Packet::new_checked(data.get(l3..).ok_or(DropReason::Malformed)?)
        .map_err(|_| DropReason::Malformed)?;
    let hlen = ip.header_len();
    let total = usize::from(ip.total_len());
    if total <= mtu {
        return Ok(());
    }
    // The options of every fragment but the first: those with the copy
    // flag, in order, padded with end-of-options to a multiple of 4.
    let mut copied = [0u8; 40];
    let mut clen = 0;
    let opts = ip.options();
    let mut i = 0;
    while i < opts.len() {
        let kind = opts[i];
        match kind {
            0 => break,
            1 => i += 1,
            _ => {
                let Some(&n) = opts.get(i + 1) else { break };
                let n = usize::from(n);
                if n < 2 || i + n > opts.len() {
                    break;
                }
                if kind & 0x80 != 0 {
                    copied[clen..clen + n].copy_from_slice(&opts[i..i + n]);
                    clen += n;
                }
                i += n;
            }
        }
    }
    let tail_hlen = ipv4::HEADER_LEN + clen.next_multiple_of(4);
    let first = mtu.saturating_sub(hlen) & !7;
    let step = mtu.saturating_sub(tail_hlen) & !7;
    if first == 0 || step == 0 {
        return Err(DropReason::NoRoom);
    }
    let payload = total - hlen;
    let tails = (payload - first).div_ceil(step);
    if tails + 1 > MAX_FRAGMENTS {
        return Err(DropReason::NoRoom);
    }
    let base = ip.frag_offset();
    // The fragment offset field holds at most 65,528: a fragment whose data
    // would start beyond it has no header to say so.
    if usize::from(base) + payload > usize::from(u16::MAX) {
        return Err(DropReason::Malformed);
    }
    let last_mf = ip.more_frags();
    let mut made: [Option<B>; MAX_FRAGMENTS] = std::array::from_fn(|_| None);
    for (k, slot) in made.iter_mut().enumerate().take(tails) {
        let at = first + k * step;
        let n = step.min(payload - at);
        let len = l3 + tail_hlen + n;
        let mut f =
            alloc(len.max(crate::wire::ethernet::MIN_FRAME_LEN)).ok_or(DropReason::NoRoom)?;
        let d = f.data_mut();
        d[..l3].copy_from_slice(&data[..l3]);
        let h = &mut d[l3..l3 + tail_hlen];
        h[..ipv4::HEADER_LEN].copy_from_slice(&data[l3..l3 + ipv4::HEADER_LEN]);
        h[ipv4::HEADER_LEN..].fill(0);
        h[ipv4::HEADER_LEN..ipv4::HEADER_LEN + clen].copy_from_slice(&copied[..clen]);
        let mut fh = ipv4::Packet::new_unchecked(h);
        fh.set_version_and_header_len(tail_hlen);
        fh.set_total_len((tail_hlen + n) as u16);
        fh.set_frag(false, k + 1 < tails || last_mf, base + at as u16);
        fh.fill_checksum();
        let from = l3 + hlen + at;
        d[l3 + tail_hlen..len].copy_from_slice(&data[from..from + n]);
        d[len..].fill(0);
        *slot = Some(f);
    }
    if !buf.truncate(l3 + hlen + first) {
        return Err(DropReason::NoRoom);
    }
    let mut h = ipv4::Packet::new_unchecked(&mut buf.data_mut()[l3..l3 + hlen]);
    h.set_total_len((hlen + first) as u16);
    h.set_frag(false, true, base);
    h.fill_checksum();
    out.extend(made.into_iter().flatten());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::classify::parse;
    use crate::datapath::pktio::{MemBuf, PacketBuf};
    use crate::types::tcp_flags;
    use crate::wire::build::FrameSpec;
    use crate::wire::{checksum, ethernet, ipv4, ipv6};
    use proptest::prelude::*;

    const SRC_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
    const DST_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 2];
    const LB4: u128 = 0xc633_6401; // 198.51.100.1
    const BE4: u128 = 0x0a00_0063; // 10.0.0.99
    const LB6: u128 = 0x2001_0db8_0000_0000_0000_0000_0000_0001;
    const BE6: u128 = 0x2001_0db8_0000_0000_0000_0000_0000_0063;
    /// No link limit but IPv4's length field.
    const ANY: usize = u16::MAX as usize;
    /// The outer IPv4 header's identification the tests ask for.
    const ID: u16 = 0x5ac3;

    /// Encapsulates `frame` and checks the output against the input.
    fn encap_and_check(frame: &[u8]) -> Vec<u8> {
        check_encap(frame, MemBuf::from_frame(frame))
    }

    /// A buffer that cannot be cut at the tail, as a multi-segment mbuf:
    /// encapsulation must then move the inner packet over the padding.
    struct Uncuttable(MemBuf);

    impl PacketBuf for Uncuttable {
        fn data(&self) -> &[u8] {
            self.0.data()
        }
        fn data_mut(&mut self) -> &mut [u8] {
            self.0.data_mut()
        }
        fn prepend(&mut self, n: usize) -> bool {
            self.0.prepend(n)
        }
        fn trim_front(&mut self, n: usize) -> bool {
            self.0.trim_front(n)
        }
        fn truncate(&mut self, _: usize) -> bool {
            false
        }
    }

    #[test]
    fn padding_removed_by_moving_when_the_tail_cannot_be_cut() {
        for spec in [
            FrameSpec::udp_v4([1, 2, 3, 4], 1, [5, 6, 7, 8], 2),
            FrameSpec::udp_v6(LB6.to_be_bytes(), 1, BE6.to_be_bytes(), 2),
        ] {
            for trailer in [0usize, 1, 20, 41, 100] {
                let mut f = spec.build().unwrap();
                f.extend(std::iter::repeat_n(0xee, trailer));
                let moved = check_encap(&f, Uncuttable(MemBuf::from_frame(&f)));
                assert_eq!(moved, encap_and_check(&f), "trailer {trailer}");
            }
        }
    }

    fn check_encap<B: PacketBuf>(frame: &[u8], mut buf: B) -> Vec<u8> {
        let pkt = parse(frame).unwrap();
        let (l3, l3_len) = (pkt.l3_offset as usize, pkt.l3_len as usize);
        let original_ip = &frame[l3..l3 + l3_len];
        let (outer_src, backend) = match pkt.key.family {
            Family::V4 => (LB4, BE4),
            Family::V6 => (LB6, BE6),
        };
        encap_ipip(
            &mut buf, &pkt, outer_src, backend, SRC_MAC, DST_MAC, ANY, ID,
        )
        .unwrap();
        let out = buf.data().to_vec();

        let eth = ethernet::Frame::new_checked(&out[..]).unwrap();
        assert_eq!(eth.dst_addr(), DST_MAC);
        assert_eq!(eth.src_addr(), SRC_MAC);
        let l2 = eth.l2_info().unwrap();
        let l2_in = ethernet::Frame::new_checked(frame)
            .unwrap()
            .l2_info()
            .unwrap();
        assert_eq!(l2.vlan, l2_in.vlan);
        assert_eq!(l2.header_len, l3);
        assert_eq!(&out[12..l3 - 2], &frame[12..l3 - 2], "tags preserved");
        let o = &out[l3..];
        match pkt.key.family {
            Family::V4 => {
                assert_eq!(l2.ethertype, ethernet::ETHERTYPE_IPV4);
                let ip = ipv4::Packet::new_checked(o).unwrap();
                assert_eq!(ip.header_len(), 20);
                assert_eq!(ip.total_len() as usize, l3_len + 20);
                assert_eq!(o.len(), l3_len + 20, "padding removed");
                assert_eq!(ip.protocol(), ipv4::PROTO_IPIP);
                assert_eq!(ip.ttl(), 64);
                assert_eq!(ip.tos(), original_ip[1]);
                assert!(!ip.is_fragment());
                let inner_df = original_ip[6] & 0x40 != 0;
                assert_eq!(ip.dont_frag(), inner_df, "DF copied from the inner header");
                assert_eq!(ip.ident(), ID);
                assert_eq!(u32::from_be_bytes(ip.src_addr()) as u128, LB4);
                assert_eq!(u32::from_be_bytes(ip.dst_addr()) as u128, BE4);
                assert!(ip.verify_checksum());
                assert_eq!(checksum::checksum(&o[..20]), 0);
                assert_eq!(ip.payload(), original_ip);
            }
            Family::V6 => {
                assert_eq!(l2.ethertype, ethernet::ETHERTYPE_IPV6);
                let ip = ipv6::Packet::new_checked(o).unwrap();
                assert_eq!(ip.payload_len() as usize, l3_len);
                assert_eq!(o.len(), l3_len + 40, "padding removed");
                assert_eq!(ip.next_header(), ipv6::PROTO_IPV6);
                assert_eq!(ip.hop_limit(), 64);
                assert_eq!(u128::from_be_bytes(ip.src_addr()), LB6);
                assert_eq!(u128::from_be_bytes(ip.dst_addr()), BE6);
                assert_eq!(ip.flow_label(), flow_hash(&pkt.key) as u32 & 0xfffff);
                assert_eq!(ip.payload(), original_ip);
            }
        }
        // The outer packet is IP-in-IP, which the distributor itself does
        // not route.
        assert_eq!(parse(&out), Err(DropReason::UnsupportedL4.into()));
        out
    }

    #[test]
    fn ipip_v4_syn() {
        let f = FrameSpec::tcp_v4([10, 1, 1, 1], 5555, [192, 0, 2, 1], 80, tcp_flags::SYN)
            .build()
            .unwrap();
        let out = encap_and_check(&f);
        assert_eq!(out.len(), 14 + 20 + 40);
    }

    #[test]
    fn ipip_v4_keeps_tos_and_vlan() {
        let mut f = FrameSpec {
            vlan: Some(300),
            payload: &[7; 100],
            ..FrameSpec::tcp_v4([10, 1, 1, 1], 5555, [192, 0, 2, 1], 80, tcp_flags::ACK)
        }
        .build()
        .unwrap();
        let mut ip = ipv4::Packet::new_checked(&mut f[18..]).unwrap();
        ip.set_tos(0xb8);
        ip.fill_checksum();
        let out = encap_and_check(&f);
        assert_eq!(out[18 + 1], 0xb8);
        assert_eq!(&out[12..16], &[0x81, 0x00, 0x01, 0x2c]);
    }

    #[test]
    fn ipip_v6_with_vlan_and_extensions() {
        let hbh = [0u8; 8];
        let f = FrameSpec {
            vlan: Some(9),
            ipv6_ext: &[(ipv6::EXT_HOP_BY_HOP, &hbh)],
            payload: b"GET / HTTP/1.1\r\n",
            ..FrameSpec::tcp_v6(
                LB6.to_be_bytes(),
                40000,
                BE6.to_be_bytes(),
                443,
                tcp_flags::SYN,
            )
        }
        .build()
        .unwrap();
        encap_and_check(&f);
    }

    #[test]
    fn short_padding_is_removed() {
        // 14 + 28 = 42 bytes padded to 60: 18 bytes of padding, fewer than
        // the 20-byte outer header.
        let f = FrameSpec::udp_v4([1, 2, 3, 4], 1, [5, 6, 7, 8], 2)
            .build()
            .unwrap();
        assert_eq!(f.len(), 60);
        let out = encap_and_check(&f);
        assert_eq!(out.len(), 14 + 20 + 28);
    }

    #[test]
    fn long_trailer_is_removed() {
        // Trailing bytes longer than the outer header: the frame shrinks at
        // the front instead of growing.
        for spec in [
            FrameSpec::udp_v4([1, 2, 3, 4], 1, [5, 6, 7, 8], 2),
            FrameSpec::udp_v6(LB6.to_be_bytes(), 1, BE6.to_be_bytes(), 2),
        ] {
            for trailer in [1usize, 20, 39, 40, 41, 100] {
                let mut f = FrameSpec {
                    vlan: Some(1),
                    ..spec
                }
                .build()
                .unwrap();
                f.extend(std::iter::repeat_n(0xee, trailer));
                encap_and_check(&f);
            }
        }
    }

    #[test]
    fn no_headroom() {
        // 64 bytes, no padding: needs all 20 bytes of the outer header.
        let f = FrameSpec {
            payload: &[1; 10],
            ..FrameSpec::tcp_v4([10, 1, 1, 1], 1, [10, 2, 2, 2], 2, tcp_flags::SYN)
        }
        .build()
        .unwrap();
        assert_eq!(f.len(), 64);
        let pkt = parse(&f).unwrap();
        let mut b = MemBuf::with_headroom(19, &f);
        assert_eq!(
            encap_ipip(&mut b, &pkt, LB4, BE4, SRC_MAC, DST_MAC, ANY, ID),
            Err(DropReason::NoRoom)
        );
        assert_eq!(b.data(), &f[..], "unchanged on failure");
        let mut b = MemBuf::with_headroom(20, &f);
        assert!(encap_ipip(&mut b, &pkt, LB4, BE4, SRC_MAC, DST_MAC, ANY, ID).is_ok());
        assert_eq!(b.data().len(), f.len() + 20);

        let f6 = FrameSpec::tcp_v6(LB6.to_be_bytes(), 1, BE6.to_be_bytes(), 2, 0)
            .build()
            .unwrap();
        let pkt = parse(&f6).unwrap();
        let mut b = MemBuf::with_headroom(39, &f6);
        assert_eq!(
            encap_ipip(&mut b, &pkt, LB6, BE6, SRC_MAC, DST_MAC, ANY, ID),
            Err(DropReason::NoRoom)
        );
        // A padded frame needs only what the padding does not provide.
        let small = FrameSpec::udp_v4([1, 2, 3, 4], 1, [5, 6, 7, 8], 2)
            .build()
            .unwrap();
        let pkt = parse(&small).unwrap();
        let mut b = MemBuf::with_headroom(1, &small);
        assert_eq!(
            encap_ipip(&mut b, &pkt, LB4, BE4, SRC_MAC, DST_MAC, ANY, ID),
            Err(DropReason::NoRoom)
        );
        let mut b = MemBuf::with_headroom(2, &small);
        assert!(encap_ipip(&mut b, &pkt, LB4, BE4, SRC_MAC, DST_MAC, ANY, ID).is_ok());
        assert_eq!(b.data().len(), 14 + 20 + 28);
    }

    #[test]
    fn too_big_for_outer_v4() {
        let payload = vec![0u8; 65535 - 40];
        let f = FrameSpec {
            payload: &payload,
            ..FrameSpec::tcp_v4([10, 1, 1, 1], 1, [10, 2, 2, 2], 2, tcp_flags::ACK)
        }
        .build()
        .unwrap();
        let pkt = parse(&f).unwrap();
        assert_eq!(pkt.l3_len, 65535);
        let mut b = MemBuf::with_headroom(64, &f);
        assert_eq!(
            encap_ipip(&mut b, &pkt, LB4, BE4, SRC_MAC, DST_MAC, ANY, ID),
            Err(DropReason::TooBig)
        );
        // 20 bytes less fits exactly.
        let f = FrameSpec {
            payload: &payload[20..],
            ..FrameSpec::tcp_v4([10, 1, 1, 1], 1, [10, 2, 2, 2], 2, tcp_flags::ACK)
        }
        .build()
        .unwrap();
        let pkt = parse(&f).unwrap();
        let mut b = MemBuf::with_headroom(64, &f);
        assert!(encap_ipip(&mut b, &pkt, LB4, BE4, SRC_MAC, DST_MAC, ANY, ID).is_ok());
        assert_eq!(u16::from_be_bytes([b.data()[16], b.data()[17]]), 65535);
    }

    /// The link's MTU bounds the outer packet: a 1500-byte packet does not
    /// fit a 1500-byte link through IPv4-in-IPv4 (1520) and the buffer is
    /// left as it was; a 1480-byte one does. IPv6 needs 40 bytes.
    #[test]
    fn the_links_mtu_bounds_the_outer_packet() {
        for (spec, over) in [
            (
                FrameSpec::tcp_v4([10, 1, 1, 1], 1, [10, 2, 2, 2], 2, tcp_flags::ACK),
                20,
            ),
            (
                FrameSpec::tcp_v6(LB6.to_be_bytes(), 1, BE6.to_be_bytes(), 2, tcp_flags::ACK),
                40,
            ),
        ] {
            let hdr = if over == 20 { 40 } else { 60 };
            let (src, dst) = if over == 20 { (LB4, BE4) } else { (LB6, BE6) };
            let big = vec![1u8; 1500 - hdr];
            let f = FrameSpec {
                payload: &big,
                ..spec
            }
            .build()
            .unwrap();
            let pkt = parse(&f).unwrap();
            assert_eq!(pkt.l3_len, 1500);
            let mut b = MemBuf::from_frame(&f);
            assert_eq!(
                encap_ipip(&mut b, &pkt, src, dst, SRC_MAC, DST_MAC, 1500, ID),
                Err(DropReason::TooBig)
            );
            assert_eq!(b.data(), &f[..], "unchanged");
            assert!(encap_ipip(&mut b, &pkt, src, dst, SRC_MAC, DST_MAC, 1500 + over, ID).is_ok());
            let fits = vec![1u8; 1500 - hdr - over];
            let f = FrameSpec {
                payload: &fits,
                ..spec
            }
            .build()
            .unwrap();
            let pkt = parse(&f).unwrap();
            let mut b = MemBuf::from_frame(&f);
            assert!(encap_ipip(&mut b, &pkt, src, dst, SRC_MAC, DST_MAC, 1500, ID).is_ok());
            assert_eq!(b.data().len(), 14 + 1500);
        }
    }

    #[test]
    fn mismatched_parse_result_is_refused() {
        let f = FrameSpec::tcp_v4([10, 1, 1, 1], 1, [10, 2, 2, 2], 2, tcp_flags::SYN)
            .build()
            .unwrap();
        let pkt = parse(&f).unwrap();
        let mut b = MemBuf::from_frame(&f[..50]);
        assert_eq!(
            encap_ipip(&mut b, &pkt, LB4, BE4, SRC_MAC, DST_MAC, ANY, ID),
            Err(DropReason::Malformed)
        );
        assert_eq!(b.data(), &f[..50]);
    }

    #[test]
    fn l2_rewrite() {
        let f = FrameSpec {
            vlan: Some(5),
            ..FrameSpec::tcp_v4([10, 1, 1, 1], 1, [10, 2, 2, 2], 2, tcp_flags::SYN)
        }
        .build()
        .unwrap();
        let pkt = parse(&f).unwrap();
        let l2 = Egress::new(None, BE4, Some(DST_MAC), None, SRC_MAC);
        let mut b = MemBuf::from_frame(&f);
        l2.forward(&mut b, &pkt, ANY, ID).unwrap();
        let out = b.data();
        assert_eq!(&out[0..6], &DST_MAC);
        assert_eq!(&out[6..12], &SRC_MAC);
        assert_eq!(&out[12..], &f[12..], "tags and packet kept");
        // A frame shorter than the two addresses (which the parser never
        // describes) is left as it is.
        let mut tiny = MemBuf::from_frame(&[1, 2, 3]);
        l2.forward(&mut tiny, &pkt, ANY, ID).unwrap();
        assert_eq!(tiny.data(), &[1, 2, 3]);
    }

    /// The next hop of a way out: an `ipip` backend's own MAC, else the
    /// port's gateway, else none; an `l2` backend's own MAC or none.
    #[test]
    fn egress_chooses_the_next_hop() {
        const GATEWAY: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 3];
        let f = FrameSpec::tcp_v4([10, 1, 1, 1], 1, [10, 2, 2, 2], 2, tcp_flags::SYN)
            .build()
            .unwrap();
        let pkt = parse(&f).unwrap();
        let out = |e: Egress| {
            let mut b = MemBuf::from_frame(&f);
            e.forward(&mut b, &pkt, ANY, ID).map(|()| b.data().to_vec())
        };
        let own = out(Egress::new(
            Some(LB4),
            BE4,
            Some(DST_MAC),
            Some(GATEWAY),
            SRC_MAC,
        ))
        .unwrap();
        assert_eq!((&own[0..6], &own[6..12]), (&DST_MAC[..], &SRC_MAC[..]));
        assert_eq!(own.len(), 14 + 20 + usize::from(pkt.l3_len));
        let gw = out(Egress::new(Some(LB4), BE4, None, Some(GATEWAY), SRC_MAC)).unwrap();
        assert_eq!(&gw[0..6], &GATEWAY);
        assert_eq!(&gw[6..], &own[6..]);
        assert_eq!(
            out(Egress::new(Some(LB4), BE4, None, None, SRC_MAC)),
            Err(DropReason::NoRoute)
        );
        let l2 = out(Egress::new(
            None,
            BE4,
            Some(DST_MAC),
            Some(GATEWAY),
            SRC_MAC,
        ))
        .unwrap();
        assert_eq!((&l2[0..6], &l2[6..12]), (&DST_MAC[..], &SRC_MAC[..]));
        assert_eq!(&l2[12..], &f[12..]);
        assert_eq!(
            out(Egress::new(None, BE4, None, Some(GATEWAY), SRC_MAC)),
            Err(DropReason::NoRoute)
        );
        assert_eq!(out(Egress::NO_ROUTE), Err(DropReason::NoRoute));
        // `l2` adds nothing: a packet as long as the link's MTU fits, one
        // byte longer is refused, the frame unchanged.
        let mtu = usize::from(pkt.l3_len);
        let l2 = Egress::new(None, BE4, Some(DST_MAC), None, SRC_MAC);
        let mut b = MemBuf::from_frame(&f);
        assert_eq!(
            l2.forward(&mut b, &pkt, mtu - 1, ID),
            Err(DropReason::TooBig)
        );
        assert_eq!(b.data(), &f[..]);
        assert!(l2.forward(&mut b, &pkt, mtu, ID).is_ok());
    }

    /// Reassembles IPv4 fragments (the first's header, then every
    /// fragment's data at its offset) into the original packet.
    fn reassemble(l3: usize, frags: &[Vec<u8>]) -> Vec<u8> {
        let first = frags
            .iter()
            .find(|f| ipv4::Packet::new_checked(&f[l3..]).unwrap().frag_offset() == 0)
            .unwrap();
        let h = ipv4::Packet::new_checked(&first[l3..]).unwrap();
        let mut out = first[l3..l3 + h.header_len()].to_vec();
        let mut data = Vec::new();
        for f in frags {
            let ip = ipv4::Packet::new_checked(&f[l3..]).unwrap();
            let at = ip.frag_offset() as usize;
            if data.len() < at + ip.payload().len() {
                data.resize(at + ip.payload().len(), 0);
            }
            data[at..at + ip.payload().len()].copy_from_slice(ip.payload());
        }
        let total = (out.len() + data.len()) as u16;
        out[2..4].copy_from_slice(&total.to_be_bytes());
        out[6] = 0;
        out[7] = 0;
        out.extend(data);
        out
    }

    /// A 1500-byte UDP datagram without DF, encapsulated (1520 bytes) for a
    /// 1500-byte link: two fragments of the outer packet, each within the
    /// MTU, same identification, valid checksums, MF on the first only,
    /// the second at offset 1480; reassembled, the outer packet whole.
    #[test]
    fn outer_packet_fragments_for_the_mtu() {
        let payload = vec![0x42u8; 1472];
        for vlan in [None, Some(9)] {
            let f = FrameSpec {
                vlan,
                payload: &payload,
                dont_frag: false,
                ..FrameSpec::udp_v4([10, 1, 1, 1], 5000, [192, 0, 2, 1], 53)
            }
            .build()
            .unwrap();
            let pkt = parse(&f).unwrap();
            let l3 = pkt.l3_offset as usize;
            let mut b = MemBuf::from_frame(&f);
            encap_ipip(&mut b, &pkt, LB4, BE4, SRC_MAC, DST_MAC, ANY, ID).unwrap();
            let whole = b.data()[l3..].to_vec();
            assert_eq!(whole.len(), 1520);
            let mut out = Vec::new();
            fragment_ipv4(&mut b, l3, 1500, MemBuf::zeroed, &mut out).unwrap();
            assert_eq!(out.len(), 1);
            let frags = [b.data().to_vec(), out[0].data().to_vec()];
            for (k, fr) in frags.iter().enumerate() {
                assert_eq!(&fr[..l3], &b.data()[..l3], "link header copied");
                let ip = ipv4::Packet::new_checked(&fr[l3..]).unwrap();
                assert!(ip.total_len() <= 1500);
                assert!(ip.verify_checksum(), "fragment {k}");
                assert_eq!(ip.ident(), ID, "the outer packet's");
                assert_eq!(ip.protocol(), ipv4::PROTO_IPIP);
                assert!(!ip.dont_frag());
                assert_eq!(ip.more_frags(), k == 0);
                assert_eq!(ip.frag_offset(), if k == 0 { 0 } else { 1480 });
            }
            assert_eq!(frags[0].len(), l3 + 1500);
            // 20 + 20 bytes: padded to the Ethernet minimum.
            assert_eq!(frags[1].len(), 60.max(l3 + 40));
            let mut back = reassemble(l3, &frags);
            back[10..12].copy_from_slice(&[0, 0]);
            let mut want = whole.clone();
            want[10..12].copy_from_slice(&[0, 0]);
            assert_eq!(back, want);
            // The inner packet is untouched inside.
            assert_eq!(&back[20..], &f[l3..l3 + 1500]);
        }
    }

    /// Options: the first fragment keeps them all, the others only those
    /// marked to be copied (here the 4-byte option 0x94, router alert, is
    /// copied and record route, 0x07, is not), padded to 4 bytes.
    #[test]
    fn later_fragments_carry_only_copied_options() {
        let opts = [0x07, 0x07, 0x04, 0, 0, 0, 0, 0x94, 0x04, 0, 0, 0x01];
        let payload = vec![7u8; 1800];
        let f = FrameSpec {
            ipv4_options: &opts,
            payload: &payload,
            dont_frag: false,
            ..FrameSpec::udp_v4([10, 1, 1, 1], 5000, [192, 0, 2, 1], 53)
        }
        .build()
        .unwrap();
        let mut b = MemBuf::zeroed(f.len()).unwrap();
        b.data_mut().copy_from_slice(&f);
        let mut out = Vec::new();
        let own = 0xbeef;
        let mut ip = ipv4::Packet::new_checked(&mut b.data_mut()[14..]).unwrap();
        ip.set_ident(own);
        ip.fill_checksum();
        fragment_ipv4(&mut b, 14, 800, MemBuf::zeroed, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        let first = ipv4::Packet::new_checked(&b.data()[14..]).unwrap();
        assert_eq!(first.options(), &opts);
        assert_eq!(first.ident(), own, "the packet's own identification");
        assert_eq!(first.payload().len() % 8, 0);
        for o in &out {
            let ip = ipv4::Packet::new_checked(&o.data()[14..]).unwrap();
            assert_eq!(ip.options(), &[0x94, 0x04, 0, 0]);
            assert_eq!(ip.ident(), own);
            assert!(ip.verify_checksum());
            assert!(ip.total_len() <= 800);
        }
        let mut frags = vec![b.data().to_vec()];
        frags.extend(out.iter().map(|o| o.data().to_vec()));
        let back = reassemble(14, &frags);
        assert_eq!(&back[32..], &f[14 + 32..14 + 32 + 1808]);
    }

    #[test]
    fn fragmenting_fails_cleanly() {
        let f = FrameSpec {
            payload: &[1; 1600],
            dont_frag: false,
            ..FrameSpec::udp_v4([10, 1, 1, 1], 1, [10, 2, 2, 2], 2)
        }
        .build()
        .unwrap();
        // The pool is dry.
        let mut b = MemBuf::from_frame(&f);
        let mut out = Vec::new();
        assert_eq!(
            fragment_ipv4(&mut b, 14, 1500, |_| None, &mut out),
            Err(DropReason::NoRoom)
        );
        assert_eq!(b.data(), &f[..]);
        assert!(out.is_empty());
        // More than MAX_FRAGMENTS would be needed.
        assert_eq!(
            fragment_ipv4(&mut b, 14, 200, MemBuf::zeroed, &mut out),
            Err(DropReason::NoRoom)
        );
        assert_eq!(b.data(), &f[..]);
        // An MTU that leaves no data.
        assert_eq!(
            fragment_ipv4(&mut b, 14, 27, MemBuf::zeroed, &mut out),
            Err(DropReason::NoRoom)
        );
        // Not an IPv4 packet there.
        assert_eq!(
            fragment_ipv4(&mut b, 13, 1500, MemBuf::zeroed, &mut out),
            Err(DropReason::Malformed)
        );
        // A fragment whose data would run past the largest offset.
        let mut late = f.clone();
        ipv4::Packet::new_unchecked(&mut late[14..]).set_frag(false, true, 64000);
        let mut l = MemBuf::from_frame(&late);
        assert_eq!(
            fragment_ipv4(&mut l, 14, 1500, MemBuf::zeroed, &mut out),
            Err(DropReason::Malformed)
        );
        assert!(out.is_empty());
        // A packet that fits is left alone.
        fragment_ipv4(&mut b, 14, 1628, MemBuf::zeroed, &mut out).unwrap();
        assert_eq!(b.data(), &f[..]);
        assert!(out.is_empty());
    }

    /// A frame of the property tests: UDP over IPv6 or a TCP SYN over
    /// IPv4, with a VLAN tag or not, `plen` bytes of payload, `tos` as the
    /// TOS (IPv4) or the traffic class's high bits (IPv6), which the outer
    /// header copies, DF as given (IPv4), `trailer` bytes after the packet,
    /// then some bytes overwritten.
    fn mutated_frame(
        v6: bool,
        vlan: Option<u16>,
        plen: usize,
        tos: u8,
        dont_frag: bool,
        trailer: usize,
        flips: &[(proptest::sample::Index, u8)],
    ) -> Vec<u8> {
        let payload = vec![0xa5; plen];
        let spec = if v6 {
            FrameSpec::udp_v6(LB6.to_be_bytes(), 1, BE6.to_be_bytes(), 2)
        } else {
            FrameSpec::tcp_v4([1, 2, 3, 4], 1, [5, 6, 7, 8], 2, tcp_flags::SYN)
        };
        let mut f = FrameSpec {
            vlan,
            payload: &payload,
            dont_frag,
            ..spec
        }
        .build()
        .unwrap();
        f[14 + 4 * usize::from(vlan.is_some()) + 1] = tos;
        f.extend(std::iter::repeat_n(0x33, trailer));
        for (i, b) in flips {
            let at = i.index(f.len());
            f[at] = *b;
        }
        f
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// A way out to an `ipip` backend writes what the general path
        /// writes, and fails where it fails, leaving the buffer as it does,
        /// for any frame the parser accepts, any headroom, a buffer that
        /// can or cannot be cut, and any link MTU: its own path for the
        /// common frame is the general one's result.
        #[test]
        fn egress_writes_what_the_general_path_writes(
            v6 in any::<bool>(),
            vlan in proptest::option::of(0u16..4096),
            plen in 0usize..64,
            trailer in 0usize..64,
            headroom in 0usize..48,
            cuttable in any::<bool>(),
            max_len in 0usize..160,
            tos in any::<u8>(),
            dont_frag in any::<bool>(),
            flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..3),
        ) {
            let f = mutated_frame(v6, vlan, plen, tos, dont_frag, trailer, &flips);
            if let Ok(pkt) = parse(&f) {
                let (s, d) = if pkt.key.family == Family::V4 { (LB4, BE4) } else { (LB6, BE6) };
                let egress = Egress::new(Some(s), d, Some(DST_MAC), None, SRC_MAC);
                let run = |general: bool| {
                    let mut b = MemBuf::with_headroom(headroom, &f);
                    let done = match (cuttable, general) {
                        (true, false) => egress.forward(&mut b, &pkt, max_len, ID),
                        (true, true) => encap_ipip(&mut b, &pkt, s, d, SRC_MAC, DST_MAC, max_len, ID),
                        (false, general) => {
                            let mut u = Uncuttable(b);
                            let done = if general {
                                encap_ipip(&mut u, &pkt, s, d, SRC_MAC, DST_MAC, max_len, ID)
                            } else {
                                egress.forward(&mut u, &pkt, max_len, ID)
                            };
                            b = u.0;
                            done
                        }
                    };
                    (done, b.data().to_vec())
                };
                prop_assert_eq!(run(false), run(true));
            }
        }

        /// Any frame the parser accepts, however mutated, encapsulates
        /// without panicking and with its IP packet intact.
        #[test]
        fn encap_of_any_parsed_frame(
            v6 in any::<bool>(),
            vlan in proptest::option::of(0u16..4096),
            plen in 0usize..64,
            trailer in 0usize..64,
            flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..3),
        ) {
            let f = mutated_frame(v6, vlan, plen, 0, true, trailer, &flips);
            if let Ok(pkt) = parse(&f) {
                let mut b = MemBuf::from_frame(&f);
                let (s, d) = if pkt.key.family == Family::V4 { (LB4, BE4) } else { (LB6, BE6) };
                encap_ipip(&mut b, &pkt, s, d, SRC_MAC, DST_MAC, ANY, ID).unwrap();
                let out = b.data();
                let l3 = pkt.l3_offset as usize;
                let n = pkt.l3_len as usize;
                let outer = if pkt.key.family == Family::V4 { 20 } else { 40 };
                prop_assert_eq!(out.len(), l3 + outer + n);
                prop_assert_eq!(&out[l3 + outer..], &f[l3..l3 + n]);
                prop_assert_eq!(&out[12..l3], &f[12..l3]);
                if pkt.key.family == Family::V4 {
                    prop_assert_eq!(checksum::checksum(&out[l3..l3 + 20]), 0);
                }
            }
        }
    }
}
