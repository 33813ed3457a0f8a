//! ICMP on the data path: what pktdist does with ICMP and ICMPv6 messages
//! addressed to a VIP, and the ICMP answers it writes itself.
//!
//! * **Errors follow their connection.** With direct server return, a
//!   backend's replies leave with the VIP as their source, so a router
//!   that cannot deliver one (too big for a link, TTL exhausted, no route)
//!   sends its error to the VIP, that is to pktdist. Destination
//!   unreachable (fragmentation needed among them) and time exceeded,
//!   ICMPv6 destination unreachable, packet too big and time exceeded, are
//!   forwarded to the backend that owns the connection: [`inspect`] reads
//!   the quoted packet (sent from VIP:port to a client) and turns its tuple
//!   around into the connection's own key, client to service, which the
//!   worker routes as it would route a packet of that connection (flow
//!   table, then affinity, then the consistent hash), changing no state.
//!   Without this, path-MTU discovery breaks for every client behind a
//!   link narrower than the backends' (a black hole: the connection stalls).
//! * **Echo requests** to a VIP are answered when configured ([`IcmpSettings`]),
//!   within a rate limit ([`RateLimiter`]); otherwise dropped, counted.
//! * **Too big for the tunnel**: a packet longer than the port's MTU once
//!   encapsulated gets "fragmentation needed" (IPv4, DF set) or "packet too
//!   big" (IPv6) back from pktdist, carrying the MTU less the encapsulation
//!   ([`too_big_reply`]), within a per-source rate limit ([`SourceLimiter`]).
//!
//! Everything else addressed to a VIP (other types, bad checksums, quotes
//! too short or not from a service, errors about ICMP messages) is dropped
//! and counted by its [`IcmpDrop`] reason. ICMP to an address that is not a
//! VIP is not pktdist's: it is dropped as `unsupported_l4` (or passed to
//! the port's `unmatched_to`), as any other protocol.
//!
//! Nothing here runs for a TCP or UDP packet that fits its link: the
//! classifier hands ICMP over only once a packet is neither TCP nor UDP.

use crate::datapath::classify::{IcmpAt, ParsedPacket};
use crate::datapath::pktio::PacketBuf;
use crate::types::{flow_hash, DropReason, Family, FlowKey, IcmpDrop};
use crate::types::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use crate::wire::icmp::{self, v4, v6};
use crate::wire::{be16, checksum, ipv4, ipv6};

/// Echo replies per second per worker when the configuration says nothing.
pub const DEFAULT_ECHO_RATE: u32 = 100;
/// "Fragmentation needed" / "packet too big" answers per second per client
/// address (per worker) when the configuration says nothing.
pub const DEFAULT_TOO_BIG_RATE: u32 = 10;
/// TTL / hop limit of the messages pktdist writes.
const REPLY_TTL: u8 = 64;
/// Slots of a [`SourceLimiter`]: sources are hashed to one of them.
const SOURCE_SLOTS: usize = 4096;

/// Which VIPs answer echo requests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum EchoPolicy {
    /// None: echo requests to a VIP are dropped (`echo_off`).
    #[default]
    Off,
    /// Every VIP.
    All,
    /// These VIPs (address family, address with IPv4 in the low 32 bits).
    Only(Vec<(Family, u128)>),
}

impl EchoPolicy {
    /// Whether an echo request to `addr` is answered.
    pub fn answers(&self, family: Family, addr: u128) -> bool {
        match self {
            EchoPolicy::Off => false,
            EchoPolicy::All => true,
            EchoPolicy::Only(vips) => vips.contains(&(family, addr)),
        }
    }
}

/// A worker's ICMP settings (the configuration's `[icmp]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpSettings {
    pub echo: EchoPolicy,
    /// Echo replies per second (bursts of as many), per worker.
    pub echo_rate: u32,
    /// "Fragmentation needed" / "packet too big" answers per second to one
    /// client address (bursts of as many), per worker; 0: none.
    pub too_big_rate: u32,
}

impl Default for IcmpSettings {
    fn default() -> IcmpSettings {
        IcmpSettings {
            echo: EchoPolicy::Off,
            echo_rate: DEFAULT_ECHO_RATE,
            too_big_rate: DEFAULT_TOO_BIG_RATE,
        }
    }
}

/// A rate as the generic cell rate algorithm keeps it: an event is allowed
/// when its bucket's theoretical arrival time is no further ahead of now
/// than the tolerance, and then moves that time one interval on. `rate`
/// per second on average, bursts of up to `rate`, one `u64` of state per
/// bucket, no division per event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Nanoseconds per event and the burst tolerance; None: no event is
    /// ever allowed (rate 0).
    params: Option<(u64, u64)>,
}

impl Rate {
    pub fn per_second(rate: u32) -> Rate {
        if rate == 0 {
            return Rate { params: None };
        }
        let interval = 1_000_000_000 / u64::from(rate);
        Rate {
            params: Some((interval, interval * u64::from(rate - 1))),
        }
    }

    /// Whether an event at `now` (ns) is allowed by the bucket whose state
    /// is `tat`; if so, the event is counted in it.
    #[inline]
    pub fn allow(&self, tat: &mut u64, now: u64) -> bool {
        let Some((interval, tolerance)) = self.params else {
            return false;
        };
        if *tat > now.saturating_add(tolerance) {
            return false;
        }
        *tat = (*tat).max(now) + interval;
        true
    }
}

/// One rate for everything (echo replies of a worker).
#[derive(Clone, Debug)]
pub struct RateLimiter {
    rate: Rate,
    tat: u64,
}

impl RateLimiter {
    pub fn new(per_second: u32) -> RateLimiter {
        RateLimiter {
            rate: Rate::per_second(per_second),
            tat: 0,
        }
    }

    /// Whether an event at `now` (ns) is allowed; if so, it is counted.
    pub fn allow(&mut self, now: u64) -> bool {
        self.rate.allow(&mut self.tat, now)
    }
}

/// One rate per source address (ICMP answers to clients): sources are
/// hashed into a fixed table of buckets, so the memory is bounded whatever
/// the sources; two sources that share a bucket share its rate (never more
/// than the rate per bucket).
pub struct SourceLimiter {
    rate: Rate,
    tats: Box<[u64]>,
}

impl SourceLimiter {
    pub fn new(per_second: u32) -> SourceLimiter {
        SourceLimiter {
            rate: Rate::per_second(per_second),
            tats: vec![0; SOURCE_SLOTS].into_boxed_slice(),
        }
    }

    /// The bucket of a source.
    fn slot(family: Family, src: u128) -> usize {
        let h = flow_hash(&FlowKey {
            src,
            dst: 0,
            sport: 0,
            dport: 0,
            proto: 0,
            family,
        });
        (h >> 32) as usize % SOURCE_SLOTS
    }

    /// Whether an answer to `src` at `now` (ns) is allowed; if so, it is
    /// counted.
    pub fn allow(&mut self, family: Family, src: u128, now: u64) -> bool {
        let i = SourceLimiter::slot(family, src);
        self.rate.allow(&mut self.tats[i], now)
    }
}

/// What an ICMP message to a VIP asks of pktdist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    /// An error about a packet a VIP sent. `key` is the connection's key in
    /// the client-to-service direction (the quoted tuple turned around): a
    /// packet of that connection would carry it.
    Error { key: FlowKey },
    /// An echo request.
    EchoRequest,
}

/// Reads the ICMP message of `frame` at `at` (as the classifier found it):
/// checks its checksum and type and, for an error, the packet it quotes.
/// Whether the quoted source is a VIP with a service on that port and
/// protocol is the caller's to check, against its snapshot.
pub fn inspect(frame: &[u8], at: &IcmpAt) -> Result<Message, IcmpDrop> {
    let l4 = usize::from(at.l4_offset);
    let end = usize::from(at.l3_offset) + usize::from(at.l3_len);
    let msg = frame.get(l4..end).ok_or(IcmpDrop::Malformed)?;
    let m = icmp::Packet::new_checked(msg).map_err(|_| IcmpDrop::Malformed)?;
    let (src, dst) = at.addresses(frame).ok_or(IcmpDrop::Malformed)?;
    let sound = match at.family {
        Family::V4 => m.verify_checksum_v4(),
        Family::V6 => m.verify_checksum_v6(checksum::pseudo_v6(
            &src.to_be_bytes(),
            &dst.to_be_bytes(),
            PROTO_ICMPV6,
            msg.len() as u32,
        )),
    };
    if !sound {
        return Err(IcmpDrop::BadChecksum);
    }
    match (at.family, m.msg_type()) {
        (Family::V4, v4::ECHO_REQUEST) | (Family::V6, v6::ECHO_REQUEST) => Ok(Message::EchoRequest),
        (Family::V4, v4::DEST_UNREACHABLE | v4::TIME_EXCEEDED)
        | (Family::V6, v6::DEST_UNREACHABLE | v6::PACKET_TOO_BIG | v6::TIME_EXCEEDED) => {
            quoted_key(at.family, m.body()).map(|key| Message::Error { key })
        }
        _ => Err(IcmpDrop::UnsupportedType),
    }
}

/// The connection a quoted packet belongs to, in the client-to-service
/// direction: the quote's destination is the client, its source the
/// service. The quote must hold the quoted IP header (IPv6 extension
/// headers included) and the first four bytes after it: the ports.
pub fn quoted_key(family: Family, quote: &[u8]) -> Result<FlowKey, IcmpDrop> {
    let (src, dst, proto, l4) = match family {
        Family::V4 => {
            if quote.len() < ipv4::HEADER_LEN {
                return Err(IcmpDrop::ShortQuote);
            }
            if quote[0] >> 4 != 4 || quote[0] & 0x0f < 5 {
                return Err(IcmpDrop::BadQuote);
            }
            let ip = ipv4::Packet::new_unchecked(quote);
            if ip.protocol() == PROTO_ICMP {
                return Err(IcmpDrop::AboutIcmp);
            }
            // A later fragment has no ports; a first one names its
            // connection as a whole packet does.
            if ip.frag_offset() != 0 {
                return Err(IcmpDrop::BadQuote);
            }
            (
                u32::from_be_bytes(ip.src_addr()) as u128,
                u32::from_be_bytes(ip.dst_addr()) as u128,
                ip.protocol(),
                ip.header_len(),
            )
        }
        Family::V6 => {
            if quote.len() < ipv6::HEADER_LEN {
                return Err(IcmpDrop::ShortQuote);
            }
            if quote[0] >> 4 != 6 {
                return Err(IcmpDrop::BadQuote);
            }
            let ip = ipv6::Packet::new_unchecked(quote);
            let (proto, offset) = match ipv6::walk_quote(quote, ip.next_header()) {
                Err(_) => return Err(IcmpDrop::ShortQuote),
                Ok(ipv6::Upper::Proto { proto, offset }) => (proto, offset),
                Ok(ipv6::Upper::Fragment | ipv6::Upper::Unsupported) => {
                    return Err(IcmpDrop::BadQuote)
                }
            };
            if proto == PROTO_ICMPV6 {
                return Err(IcmpDrop::AboutIcmp);
            }
            (
                u128::from_be_bytes(ip.src_addr()),
                u128::from_be_bytes(ip.dst_addr()),
                proto,
                offset,
            )
        }
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(IcmpDrop::QuoteNoService);
    }
    if quote.len() < l4 + 4 {
        return Err(IcmpDrop::ShortQuote);
    }
    Ok(FlowKey {
        src: dst,
        dst: src,
        sport: be16(quote, l4 + 2),
        dport: be16(quote, l4),
        proto,
        family,
    })
}

/// True for the address of one host, which an ICMP answer may go to: not
/// unspecified, loopback, multicast, nor (IPv4) in 240.0.0.0/4, which holds
/// the limited broadcast (RFC 1122 3.2.2, RFC 4443 2.4 e).
pub fn one_host(family: Family, addr: u128) -> bool {
    match family {
        Family::V4 => !matches!(addr as u32 >> 24, 0 | 127 | 224..),
        Family::V6 => addr > 1 && addr >> 120 != 0xff,
    }
}

/// Turns the echo request at `at` into its echo reply, in place: back to
/// the sender's MAC from `src_mac`, addresses swapped, TTL / hop limit 64,
/// the type changed and the checksums updated; identifier, sequence number
/// and data unchanged. A request with IPv4 options or IPv6 extension
/// headers is refused (`echo_options`): answering it would mean processing
/// them; so is one from no one host's address (`echo_bad_source`), and an
/// IPv4 one whose header checksum fails (`bad_checksum`: its source may be
/// another's). A request that passes these checks is answered if
/// `allow()` (the rate limit, charged for answers only), else refused
/// (`echo_rate_limited`).
pub fn echo_reply<B: PacketBuf>(
    buf: &mut B,
    at: &IcmpAt,
    src_mac: [u8; 6],
    allow: impl FnOnce() -> bool,
) -> Result<(), IcmpDrop> {
    let l3 = usize::from(at.l3_offset);
    let l4 = usize::from(at.l4_offset);
    let plain = match at.family {
        Family::V4 => ipv4::HEADER_LEN,
        Family::V6 => ipv6::HEADER_LEN,
    };
    if l4 - l3 != plain {
        return Err(IcmpDrop::EchoOptions);
    }
    let end = l3 + usize::from(at.l3_len);
    let d = buf.data_mut();
    if end > d.len() || end < l4 + icmp::HEADER_LEN {
        return Err(IcmpDrop::Malformed);
    }
    let source = match at.family {
        Family::V4 => {
            let ip = ipv4::Packet::new_unchecked(&d[l3..l4]);
            if !ip.verify_checksum() {
                return Err(IcmpDrop::BadChecksum);
            }
            u32::from_be_bytes(ip.src_addr()) as u128
        }
        Family::V6 => u128::from_be_bytes(ipv6::Packet::new_unchecked(&d[l3..l4]).src_addr()),
    };
    if !one_host(at.family, source) {
        return Err(IcmpDrop::EchoBadSource);
    }
    if !allow() {
        return Err(IcmpDrop::EchoRateLimited);
    }
    reply_macs(d, src_mac);
    let (request, reply) = match at.family {
        Family::V4 => {
            let ip = &mut d[l3..l4];
            swap_addresses(ip, 12, 4);
            let mut ip = ipv4::Packet::new_unchecked(ip);
            ip.set_ttl(REPLY_TTL);
            ip.fill_checksum();
            (v4::ECHO_REQUEST, v4::ECHO_REPLY)
        }
        Family::V6 => {
            let ip = &mut d[l3..l4];
            swap_addresses(ip, 8, 16);
            ipv6::Packet::new_unchecked(ip).set_hop_limit(REPLY_TTL);
            (v6::ECHO_REQUEST, v6::ECHO_REPLY)
        }
    };
    // Only the type changes: the ICMPv6 pseudo header sums the same with
    // its addresses swapped.
    let mut m = icmp::Packet::new_unchecked(&mut d[l4..end]);
    let code = u16::from(m.code());
    let sum = checksum::update16(
        m.checksum(),
        u16::from(request) << 8 | code,
        u16::from(reply) << 8 | code,
    );
    m.set_msg_type(reply);
    m.set_checksum(sum);
    Ok(())
}

/// Rewrites the too-big packet `p` of `buf` into the ICMP answer to its
/// sender, in place: ICMPv4 "fragmentation needed" (type 3 code 4) with
/// next-hop MTU `mtu`, or ICMPv6 "packet too big" with MTU `mtu`, from the
/// packet's destination (the VIP) to its source, back to the sender's MAC
/// from `src_mac`, quoting as much of the packet as fits in 576 (IPv4) or
/// 1280 (IPv6) bytes, all checksums computed. The Ethernet header, VLAN
/// tags included, moves into the headroom by the length of the new
/// headers, so the quote stays where it is.
///
/// Fails with `NoRoom` (the buffer unchanged) when the headroom or the
/// buffer's shape does not allow it, and with `Malformed` when `p` does
/// not describe `buf`.
pub fn too_big_reply<B: PacketBuf>(
    buf: &mut B,
    p: &ParsedPacket,
    mtu: u32,
    src_mac: [u8; 6],
) -> Result<(), DropReason> {
    let l3 = usize::from(p.l3_offset);
    let len = usize::from(p.l3_len);
    if l3 + len > buf.data().len() {
        return Err(DropReason::Malformed);
    }
    let (ip_len, limit) = match p.key.family {
        Family::V4 => (ipv4::HEADER_LEN, v4::MAX_ERROR_LEN),
        Family::V6 => (ipv6::HEADER_LEN, v6::MAX_ERROR_LEN),
    };
    let hdr = ip_len + icmp::HEADER_LEN;
    let quote = len.min(limit - hdr);
    if !buf.prepend(hdr) {
        return Err(DropReason::NoRoom);
    }
    if !buf.truncate(l3 + hdr + quote) {
        buf.trim_front(hdr);
        return Err(DropReason::NoRoom);
    }
    let d = buf.data_mut();
    d.copy_within(hdr..hdr + l3, 0);
    reply_macs(d, src_mac);
    let (ip, msg) = d[l3..].split_at_mut(ip_len);
    let msg_len = icmp::HEADER_LEN + quote;
    match p.key.family {
        Family::V4 => {
            let (vip, client) = (
                (p.key.dst as u32).to_be_bytes(),
                (p.key.src as u32).to_be_bytes(),
            );
            let mut h = ipv4::Packet::new_unchecked(ip);
            h.set_version_and_header_len(ipv4::HEADER_LEN);
            h.set_tos(0);
            h.set_total_len((ip_len + msg_len) as u16);
            h.set_ident(0);
            // DF: an atomic datagram, whose identification may be 0 (RFC
            // 6864 section 4.1).
            h.set_frag(true, false, 0);
            h.set_ttl(REPLY_TTL);
            h.set_protocol(PROTO_ICMP);
            h.set_src_addr(vip);
            h.set_dst_addr(client);
            h.fill_checksum();
            let mut m = icmp::Packet::new_unchecked(msg);
            m.set_msg_type(v4::DEST_UNREACHABLE);
            m.set_code(v4::CODE_FRAG_NEEDED);
            m.set_rest(mtu.min(u32::from(u16::MAX)));
            m.fill_checksum_v4();
        }
        Family::V6 => {
            let (vip, client) = (p.key.dst.to_be_bytes(), p.key.src.to_be_bytes());
            let mut h = ipv6::Packet::new_unchecked(ip);
            h.set_version_tc_flow(0, 0);
            h.set_payload_len(msg_len as u16);
            h.set_next_header(PROTO_ICMPV6);
            h.set_hop_limit(REPLY_TTL);
            h.set_src_addr(vip);
            h.set_dst_addr(client);
            let mut m = icmp::Packet::new_unchecked(msg);
            m.set_msg_type(v6::PACKET_TOO_BIG);
            m.set_code(0);
            m.set_rest(mtu);
            m.fill_checksum_v6(checksum::pseudo_v6(
                &vip,
                &client,
                PROTO_ICMPV6,
                msg_len as u32,
            ));
        }
    }
    Ok(())
}

/// Addresses a frame back to its sender: destination MAC the old source,
/// source MAC `src_mac`.
fn reply_macs(d: &mut [u8], src_mac: [u8; 6]) {
    let mut sender = [0u8; 6];
    sender.copy_from_slice(&d[6..12]);
    d[0..6].copy_from_slice(&sender);
    d[6..12].copy_from_slice(&src_mac);
}

/// Swaps the two `n`-byte addresses that start at `at` and `at + n`.
fn swap_addresses(ip: &mut [u8], at: usize, n: usize) {
    let (a, b) = ip[at..at + 2 * n].split_at_mut(n);
    a.swap_with_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::classify::{parse, NotFlow};
    use crate::datapath::pktio::MemBuf;
    use crate::types::tcp_flags;
    use crate::wire::build::FrameSpec;
    use crate::wire::ethernet;
    use proptest::prelude::*;

    const VIP: [u8; 4] = [192, 0, 2, 10];
    const CLIENT: [u8; 4] = [203, 0, 113, 5];
    const ROUTER: [u8; 4] = [198, 51, 100, 1];
    const VIP6: [u8; 16] = [
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0xc, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
    const ROUTER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0xf, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 9];

    /// The IP packet of a frame (without Ethernet padding).
    fn ip_of(frame: &[u8]) -> Vec<u8> {
        let l3 = &frame[14..];
        let len = if l3[0] >> 4 == 4 {
            usize::from(u16::from_be_bytes([l3[2], l3[3]]))
        } else {
            40 + usize::from(u16::from_be_bytes([l3[4], l3[5]]))
        };
        l3[..len].to_vec()
    }

    /// The backend's reply to the client, as the client's router would
    /// quote it: a SYN-ACK with 100 bytes of data from VIP:80.
    fn reply_v4(cport: u16) -> Vec<u8> {
        ip_of(
            &FrameSpec {
                payload: &[0x77; 100],
                ..FrameSpec::tcp_v4(VIP, 80, CLIENT, cport, tcp_flags::SYN | tcp_flags::ACK)
            }
            .build()
            .unwrap(),
        )
    }

    fn reply_v6(cport: u16) -> Vec<u8> {
        ip_of(&FrameSpec::udp_v6(VIP6, 53, CLIENT6, cport).build().unwrap())
    }

    /// An ICMPv4 error from the router to the VIP quoting `quote`.
    fn error_v4(t: u8, code: u8, quote: &[u8]) -> Vec<u8> {
        FrameSpec {
            payload: quote,
            ..FrameSpec::icmp_v4(ROUTER, VIP, t, code, 1400)
        }
        .build()
        .unwrap()
    }

    fn error_v6(t: u8, quote: &[u8]) -> Vec<u8> {
        FrameSpec {
            payload: quote,
            ..FrameSpec::icmp_v6(ROUTER6, VIP6, t, 0, 1400)
        }
        .build()
        .unwrap()
    }

    fn at_of(frame: &[u8]) -> IcmpAt {
        match parse(frame) {
            Err(NotFlow::Icmp(at)) => at,
            other => panic!("not ICMP: {other:?}"),
        }
    }

    fn inspect_frame(frame: &[u8]) -> Result<Message, IcmpDrop> {
        inspect(frame, &at_of(frame))
    }

    #[test]
    fn errors_name_their_connection_turned_around() {
        let want = FlowKey {
            src: u32::from_be_bytes(CLIENT) as u128,
            dst: u32::from_be_bytes(VIP) as u128,
            sport: 40001,
            dport: 80,
            proto: PROTO_TCP,
            family: Family::V4,
        };
        for (t, code) in [
            (v4::DEST_UNREACHABLE, v4::CODE_FRAG_NEEDED),
            (v4::DEST_UNREACHABLE, 1),
            (v4::TIME_EXCEEDED, 0),
        ] {
            let f = error_v4(t, code, &reply_v4(40001));
            assert_eq!(
                inspect_frame(&f),
                Ok(Message::Error { key: want }),
                "type {t} code {code}"
            );
        }
        // A quote of the header and the ports alone (RFC 792's minimum:
        // the header and 64 bits) is enough.
        let f = error_v4(v4::DEST_UNREACHABLE, 4, &reply_v4(40001)[..28]);
        assert_eq!(inspect_frame(&f), Ok(Message::Error { key: want }));

        let want6 = FlowKey {
            src: u128::from_be_bytes(CLIENT6),
            dst: u128::from_be_bytes(VIP6),
            sport: 5353,
            dport: 53,
            proto: PROTO_UDP,
            family: Family::V6,
        };
        for t in [v6::DEST_UNREACHABLE, v6::PACKET_TOO_BIG, v6::TIME_EXCEEDED] {
            let f = error_v6(t, &reply_v6(5353));
            assert_eq!(
                inspect_frame(&f),
                Ok(Message::Error { key: want6 }),
                "type {t}"
            );
        }

        // About a first fragment (a large reply cut by its backend, offset
        // 0 and more to come): its ports name the connection.
        let mut first = reply_v4(40001);
        ipv4::Packet::new_unchecked(&mut first[..]).set_frag(false, true, 0);
        let f = error_v4(v4::DEST_UNREACHABLE, v4::CODE_FRAG_NEEDED, &first);
        assert_eq!(inspect_frame(&f), Ok(Message::Error { key: want }));
        let first6 = ip_of(
            &FrameSpec {
                ipv6_ext: &[(ipv6::EXT_FRAGMENT, &[0, 0, 0, 1, 0, 0, 0, 7])],
                payload: &[0; 1000],
                ..FrameSpec::udp_v6(VIP6, 53, CLIENT6, 5353)
            }
            .build()
            .unwrap(),
        );
        let f = error_v6(v6::PACKET_TOO_BIG, &first6[..200]);
        assert_eq!(inspect_frame(&f), Ok(Message::Error { key: want6 }));
    }

    #[test]
    fn quotes_with_options_and_extension_headers() {
        let r = ip_of(
            &FrameSpec {
                ipv4_options: &[0x94, 0x04, 0, 0],
                ..FrameSpec::tcp_v4(VIP, 443, CLIENT, 1234, tcp_flags::ACK)
            }
            .build()
            .unwrap(),
        );
        let key = quoted_key(Family::V4, &r[..28]).unwrap();
        assert_eq!((key.sport, key.dport), (1234, 443));
        assert_eq!(quoted_key(Family::V4, &r[..27]), Err(IcmpDrop::ShortQuote));

        let dst_opts = [0u8; 16];
        let r6 = ip_of(
            &FrameSpec {
                ipv6_ext: &[(ipv6::EXT_DEST_OPTS, &dst_opts)],
                ..FrameSpec::tcp_v6(VIP6, 443, CLIENT6, 999, tcp_flags::ACK)
            }
            .build()
            .unwrap(),
        );
        let key = quoted_key(Family::V6, &r6[..60]).unwrap();
        assert_eq!((key.sport, key.dport, key.proto), (999, 443, PROTO_TCP));
        // Cut inside the ports, or inside the extension header.
        assert_eq!(quoted_key(Family::V6, &r6[..59]), Err(IcmpDrop::ShortQuote));
        assert_eq!(quoted_key(Family::V6, &r6[..50]), Err(IcmpDrop::ShortQuote));
    }

    #[test]
    fn what_is_not_forwarded_has_its_reason() {
        use IcmpDrop::*;
        let q = reply_v4(40001);
        let mut bad_sum = error_v4(3, 4, &q);
        let last = bad_sum.len() - 1;
        bad_sum[last] ^= 0x40;
        let about_icmp = {
            let echo_reply = ip_of(&FrameSpec::icmp_v4(VIP, CLIENT, 0, 0, 7).build().unwrap());
            error_v4(3, 1, &echo_reply)
        };
        let fragment = {
            let mut r = q.clone();
            let mut ip = ipv4::Packet::new_unchecked(&mut r[..]);
            ip.set_frag(false, false, 1480);
            error_v4(3, 4, &r)
        };
        let gre = {
            let mut r = q.clone();
            r[9] = 47;
            error_v4(3, 4, &r)
        };
        let v6_in_v4 = error_v4(3, 4, &reply_v6(1));
        let short_header = {
            let mut f = error_v4(3, 4, &[]);
            // Cut the message to 7 bytes (the frame keeps its padding).
            let mut ip = ipv4::Packet::new_unchecked(&mut f[14..]);
            ip.set_total_len(27);
            ip.fill_checksum();
            f
        };
        let cases: Vec<(&str, Vec<u8>, IcmpDrop)> = vec![
            ("bad checksum", bad_sum, BadChecksum),
            ("redirect", error_v4(5, 1, &q), UnsupportedType),
            ("echo reply", error_v4(0, 0, b"ping"), UnsupportedType),
            ("parameter problem", error_v4(12, 0, &q), UnsupportedType),
            ("quote of 19 bytes", error_v4(3, 4, &q[..19]), ShortQuote),
            ("quote without ports", error_v4(3, 4, &q[..22]), ShortQuote),
            ("no quote", error_v4(11, 0, &[]), ShortQuote),
            ("about an ICMP message", about_icmp, AboutIcmp),
            ("about a fragment", fragment, BadQuote),
            ("an IPv6 quote in ICMPv4", v6_in_v4, BadQuote),
            ("quoted GRE", gre, QuoteNoService),
            ("a message of 7 bytes", short_header, Malformed),
        ];
        for (name, f, want) in cases {
            assert_eq!(inspect_frame(&f), Err(want), "{name}");
        }

        let q6 = reply_v6(7);
        let about6 = error_v6(
            v6::PACKET_TOO_BIG,
            &ip_of(
                &FrameSpec::icmp_v6(VIP6, CLIENT6, 129, 0, 1)
                    .build()
                    .unwrap(),
            ),
        );
        let frag6 = {
            let frag = [0u8, 0, 0x05, 0xa8, 0, 0, 0, 1];
            error_v6(
                v6::PACKET_TOO_BIG,
                &ip_of(
                    &FrameSpec {
                        ipv6_ext: &[(ipv6::EXT_FRAGMENT, &frag)],
                        ..FrameSpec::udp_v6(VIP6, 53, CLIENT6, 7)
                    }
                    .build()
                    .unwrap(),
                ),
            )
        };
        let mut bad6 = error_v6(v6::PACKET_TOO_BIG, &q6);
        bad6[14 + 40 + 4] ^= 1; // the MTU, under the checksum
        let cases6: Vec<(&str, Vec<u8>, IcmpDrop)> = vec![
            ("bad checksum", bad6, BadChecksum),
            (
                "echo reply",
                error_v6(v6::ECHO_REPLY, b"x"),
                UnsupportedType,
            ),
            ("parameter problem", error_v6(4, &q6), UnsupportedType),
            (
                "neighbour solicitation",
                error_v6(135, &[0; 20]),
                UnsupportedType,
            ),
            ("quote of 39 bytes", error_v6(1, &q6[..39]), ShortQuote),
            ("quote without ports", error_v6(1, &q6[..43]), ShortQuote),
            ("about an ICMPv6 message", about6, AboutIcmp),
            ("about a fragment", frag6, BadQuote),
            (
                "an IPv4 quote in ICMPv6",
                error_v6(1, &reply_v4(9)),
                BadQuote,
            ),
        ];
        for (name, f, want) in cases6 {
            assert_eq!(inspect_frame(&f), Err(want), "v6 {name}");
        }
    }

    #[test]
    fn echo_requests_are_recognised() {
        let f = FrameSpec {
            payload: b"abcdefgh",
            ..FrameSpec::icmp_v4(CLIENT, VIP, v4::ECHO_REQUEST, 0, 0x0102_0003)
        }
        .build()
        .unwrap();
        assert_eq!(inspect_frame(&f), Ok(Message::EchoRequest));
        let f6 = FrameSpec::icmp_v6(CLIENT6, VIP6, v6::ECHO_REQUEST, 0, 5)
            .build()
            .unwrap();
        assert_eq!(inspect_frame(&f6), Ok(Message::EchoRequest));
        // Type 8 is not an ICMPv6 echo request, type 128 not an ICMPv4 one.
        let f6 = FrameSpec::icmp_v6(CLIENT6, VIP6, v4::ECHO_REQUEST, 0, 5)
            .build()
            .unwrap();
        assert_eq!(inspect_frame(&f6), Err(IcmpDrop::UnsupportedType));
    }

    #[test]
    fn echo_replies_have_valid_checksums() {
        for vlan in [None, Some(7)] {
            let f = FrameSpec {
                vlan,
                payload: b"0123456789abcdef",
                ..FrameSpec::icmp_v4(CLIENT, VIP, v4::ECHO_REQUEST, 0, 0xbeef_0001)
            }
            .build()
            .unwrap();
            let at = at_of(&f);
            let mut b = MemBuf::from_frame(&f);
            echo_reply(&mut b, &at, MAC, || true).unwrap();
            let out = b.data();
            let l3 = at.l3_offset as usize;
            assert_eq!(&out[0..6], &f[6..12], "back to the sender");
            assert_eq!(&out[6..12], &MAC);
            assert_eq!(&out[12..l3], &f[12..l3], "tags kept");
            let ip = ipv4::Packet::new_checked(&out[l3..]).unwrap();
            assert!(ip.verify_checksum());
            assert_eq!((ip.src_addr(), ip.dst_addr()), (VIP, CLIENT));
            assert_eq!(ip.ttl(), 64);
            let m = icmp::Packet::new_checked(ip.payload()).unwrap();
            assert!(m.verify_checksum_v4());
            assert_eq!((m.msg_type(), m.code(), m.rest()), (0, 0, 0xbeef_0001));
            assert_eq!(m.body(), b"0123456789abcdef");
        }

        let f6 = FrameSpec {
            payload: b"ping6",
            ..FrameSpec::icmp_v6(CLIENT6, VIP6, v6::ECHO_REQUEST, 0, 0x0042_0007)
        }
        .build()
        .unwrap();
        let at = at_of(&f6);
        let mut b = MemBuf::from_frame(&f6);
        echo_reply(&mut b, &at, MAC, || true).unwrap();
        let ip = ipv6::Packet::new_checked(&b.data()[14..]).unwrap();
        assert_eq!((ip.src_addr(), ip.dst_addr()), (VIP6, CLIENT6));
        assert_eq!(ip.hop_limit(), 64);
        let m = icmp::Packet::new_checked(ip.payload()).unwrap();
        let pseudo = checksum::pseudo_v6(&VIP6, &CLIENT6, 58, ip.payload().len() as u32);
        assert!(m.verify_checksum_v6(pseudo));
        assert_eq!((m.msg_type(), m.rest()), (v6::ECHO_REPLY, 0x0042_0007));
        assert_eq!(m.body(), b"ping6");
    }

    #[test]
    fn echo_requests_with_options_are_not_answered() {
        let f = FrameSpec {
            ipv4_options: &[1, 1, 1, 0],
            ..FrameSpec::icmp_v4(CLIENT, VIP, v4::ECHO_REQUEST, 0, 1)
        }
        .build()
        .unwrap();
        let mut b = MemBuf::from_frame(&f);
        assert_eq!(
            echo_reply(&mut b, &at_of(&f), MAC, || true),
            Err(IcmpDrop::EchoOptions)
        );
        assert_eq!(b.data(), &f[..], "unchanged");
        let hbh = [0u8; 8];
        let f6 = FrameSpec {
            ipv6_ext: &[(ipv6::EXT_HOP_BY_HOP, &hbh)],
            ..FrameSpec::icmp_v6(CLIENT6, VIP6, v6::ECHO_REQUEST, 0, 1)
        }
        .build()
        .unwrap();
        let mut b = MemBuf::from_frame(&f6);
        assert_eq!(
            echo_reply(&mut b, &at_of(&f6), MAC, || true),
            Err(IcmpDrop::EchoOptions)
        );
    }

    /// No echo reply goes to an address that is no one host's, nor to the
    /// source of an IPv4 header whose checksum fails (a corrupted source
    /// may be another host's).
    #[test]
    fn echo_requests_from_no_one_host_are_not_answered() {
        let mut frames: Vec<Vec<u8>> = [
            [224, 0, 0, 1],
            [255, 255, 255, 255],
            [0, 0, 0, 0],
            [127, 0, 0, 1],
            [240, 1, 2, 3],
        ]
        .into_iter()
        .map(|src| {
            FrameSpec::icmp_v4(src, VIP, v4::ECHO_REQUEST, 0, 1)
                .build()
                .unwrap()
        })
        .collect();
        let mut multicast6 = [0u8; 16];
        multicast6[0] = 0xff;
        multicast6[1] = 0x02;
        multicast6[15] = 1;
        let mut loopback6 = [0u8; 16];
        loopback6[15] = 1;
        for src in [multicast6, loopback6, [0; 16]] {
            frames.push(
                FrameSpec::icmp_v6(src, VIP6, v6::ECHO_REQUEST, 0, 1)
                    .build()
                    .unwrap(),
            );
        }
        for f in &frames {
            let mut b = MemBuf::from_frame(f);
            assert_eq!(
                echo_reply(&mut b, &at_of(f), MAC, || true),
                Err(IcmpDrop::EchoBadSource),
                "{f:02x?}"
            );
            assert_eq!(b.data(), &f[..], "unchanged");
        }
        let mut f = FrameSpec::icmp_v4(CLIENT, VIP, v4::ECHO_REQUEST, 0, 1)
            .build()
            .unwrap();
        f[14 + 12] ^= 1; // the source, under the header checksum
        let mut b = MemBuf::from_frame(&f);
        assert_eq!(
            echo_reply(&mut b, &at_of(&f), MAC, || true),
            Err(IcmpDrop::BadChecksum)
        );
        assert!(one_host(Family::V4, u32::from_be_bytes(CLIENT) as u128));
        assert!(one_host(Family::V6, u128::from_be_bytes(CLIENT6)));
    }

    /// A 1500-byte DF packet and a port MTU of 1500 less the 20 bytes of
    /// IP-in-IP: "fragmentation needed" with MTU 1480 from the VIP to the
    /// client, quoting the first 548 bytes, every checksum valid.
    #[test]
    fn frag_needed_quotes_the_packet_with_valid_checksums() {
        let data = vec![0x5a; 1460];
        for vlan in [None, Some(300)] {
            let f = FrameSpec {
                vlan,
                payload: &data,
                ..FrameSpec::tcp_v4(CLIENT, 40000, VIP, 80, tcp_flags::ACK)
            }
            .build()
            .unwrap();
            let p = parse(&f).unwrap();
            assert_eq!(p.l3_len, 1500);
            let mut b = MemBuf::from_frame(&f);
            too_big_reply(&mut b, &p, 1480, MAC).unwrap();
            let out = b.data();
            let l3 = p.l3_offset as usize;
            assert_eq!(out.len(), l3 + 576);
            assert_eq!(&out[0..6], &f[6..12]);
            assert_eq!(&out[6..12], &MAC);
            assert_eq!(&out[12..l3], &f[12..l3]);
            let ip = ipv4::Packet::new_checked(&out[l3..]).unwrap();
            assert!(ip.verify_checksum());
            assert_eq!(ip.total_len(), 576);
            assert_eq!((ip.src_addr(), ip.dst_addr()), (VIP, CLIENT));
            assert_eq!(ip.protocol(), 1);
            assert!(ip.dont_frag() && ip.ident() == 0, "an atomic datagram");
            let m = icmp::Packet::new_checked(ip.payload()).unwrap();
            assert!(m.verify_checksum_v4());
            assert_eq!((m.msg_type(), m.code(), m.next_hop_mtu()), (3, 4, 1480));
            assert_eq!(m.body(), &f[l3..l3 + 548], "the packet's first bytes");
            // pktdist's own ICMP path reads it as an error about the
            // client's packet... sent from the client: not a VIP's.
            let back = quoted_key(Family::V4, m.body()).unwrap();
            assert_eq!(back.dst, p.key.src);
        }
    }

    #[test]
    fn packet_too_big_quotes_up_to_1280_bytes() {
        let data = vec![0x6b; 1440];
        let f = FrameSpec {
            payload: &data,
            ..FrameSpec::tcp_v6(CLIENT6, 50000, VIP6, 443, tcp_flags::ACK)
        }
        .build()
        .unwrap();
        let p = parse(&f).unwrap();
        assert_eq!(p.l3_len, 1500);
        let mut b = MemBuf::from_frame(&f);
        too_big_reply(&mut b, &p, 1460, MAC).unwrap();
        let out = b.data();
        assert_eq!(out.len(), 14 + 1280);
        assert_eq!(
            u16::from_be_bytes([out[12], out[13]]),
            ethernet::ETHERTYPE_IPV6
        );
        let ip = ipv6::Packet::new_checked(&out[14..]).unwrap();
        assert_eq!((ip.src_addr(), ip.dst_addr()), (VIP6, CLIENT6));
        assert_eq!((ip.next_header(), ip.payload_len()), (58, 1240));
        let m = icmp::Packet::new_checked(ip.payload()).unwrap();
        let pseudo = checksum::pseudo_v6(&VIP6, &CLIENT6, 58, 1240);
        assert!(m.verify_checksum_v6(pseudo));
        assert_eq!((m.msg_type(), m.code(), m.rest()), (2, 0, 1460));
        assert_eq!(m.body(), &f[14..14 + 1232]);

        // A short packet is quoted whole.
        let f = FrameSpec::tcp_v6(CLIENT6, 1, VIP6, 443, tcp_flags::ACK)
            .build()
            .unwrap();
        let p = parse(&f).unwrap();
        let mut b = MemBuf::from_frame(&f);
        too_big_reply(&mut b, &p, 1280, MAC).unwrap();
        assert_eq!(b.data().len(), 14 + 48 + 60);
        assert_eq!(&b.data()[14 + 48..], &f[14..74]);
    }

    #[test]
    fn too_big_reply_needs_headroom() {
        let f = FrameSpec {
            payload: &[1; 1460],
            ..FrameSpec::tcp_v4(CLIENT, 1, VIP, 80, tcp_flags::ACK)
        }
        .build()
        .unwrap();
        let p = parse(&f).unwrap();
        let mut b = MemBuf::with_headroom(27, &f);
        assert_eq!(
            too_big_reply(&mut b, &p, 1480, MAC),
            Err(DropReason::NoRoom)
        );
        assert_eq!(b.data(), &f[..], "unchanged");
        let mut b = MemBuf::with_headroom(28, &f);
        assert!(too_big_reply(&mut b, &p, 1480, MAC).is_ok());
    }

    #[test]
    fn rates_allow_bursts_then_the_rate() {
        const SEC: u64 = 1_000_000_000;
        let mut r = RateLimiter::new(5);
        let now = 10 * SEC;
        let burst = (0..100).filter(|i| r.allow(now + i)).count();
        assert_eq!(burst, 5, "a burst of the rate");
        // Then one every 200 ms.
        assert!(!r.allow(now + SEC / 10));
        assert!(r.allow(now + SEC / 5));
        assert!(!r.allow(now + SEC / 5 + 1));
        // After a quiet spell, the burst again, no more.
        let later = now + 100 * SEC;
        assert_eq!((0..100).filter(|i| r.allow(later + i)).count(), 5);
        // Over a long steady flood, the rate.
        let mut r = RateLimiter::new(100);
        let allowed = (0..1_000_000u64)
            .filter(|i| r.allow(SEC + i * 10_000))
            .count();
        assert!(
            (1000..=1100).contains(&allowed),
            "{allowed} in 10 s at 100/s"
        );
        let mut never = RateLimiter::new(0);
        assert!(!never.allow(SEC));
        let mut one = RateLimiter::new(1);
        assert!(one.allow(0));
        assert!(!one.allow(SEC - 1));
        assert!(one.allow(SEC));
    }

    #[test]
    fn sources_have_their_own_rates() {
        const SEC: u64 = 1_000_000_000;
        let mut l = SourceLimiter::new(3);
        let a = u32::from_be_bytes(CLIENT) as u128;
        let b = a + 1;
        assert_ne!(
            SourceLimiter::slot(Family::V4, a),
            SourceLimiter::slot(Family::V4, b)
        );
        let got_a = (0..10).filter(|_| l.allow(Family::V4, a, SEC)).count();
        assert_eq!(got_a, 3);
        // Another source is not held back by the first one's flood.
        assert_eq!((0..10).filter(|_| l.allow(Family::V4, b, SEC)).count(), 3);
        assert!(!l.allow(Family::V4, a, SEC + 1));
        assert!(l.allow(Family::V4, a, 2 * SEC));
        // The same bits in another family are another source.
        assert!(l.allow(Family::V6, a, SEC));
        let mut off = SourceLimiter::new(0);
        assert!(!off.allow(Family::V4, a, SEC));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever bytes an ICMP message holds, inspecting it never
        /// panics, and an error it forwards names a TCP or UDP connection
        /// of the message's family.
        #[test]
        fn inspect_never_panics(
            v6 in any::<bool>(),
            t in prop_oneof![Just(3u8), Just(11u8), Just(1u8), Just(2u8), any::<u8>()],
            quote in proptest::collection::vec(any::<u8>(), 0..120),
            real_quote in any::<bool>(),
            cut in 0usize..120,
            flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..3),
        ) {
            let q = if real_quote {
                let mut r = if v6 { reply_v6(9) } else { reply_v4(9) };
                r.truncate(cut.max(1));
                for (i, b) in &flips {
                    let at = i.index(r.len());
                    r[at] = *b;
                }
                r
            } else {
                quote
            };
            let f = if v6 { error_v6(t, &q) } else { error_v4(t, 0, &q) };
            let at = at_of(&f);
            if let Ok(Message::Error { key }) = inspect(&f, &at) {
                prop_assert!(key.proto == PROTO_TCP || key.proto == PROTO_UDP);
                prop_assert_eq!(key.family, at.family);
            }
        }
    }
}
