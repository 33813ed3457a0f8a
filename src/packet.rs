//! Classification of a received frame: what the worker needs to know about a
//! packet to route it, extracted in one pass over the headers.
//!
//! Addresses are kept as `u128` (IPv4 in the low 32 bits) so that one key type
//! and one hash serve both families without branching on the hot path.

use crate::stats::DropReason;

/// IP protocol numbers the distributor routes.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// TCP flag bits as they appear in byte 13 of the TCP header.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// Address family of a flow.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Family {
    V4,
    V6,
}

/// The 5-tuple of a flow in the client-to-service direction.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct FlowKey {
    pub src: u128,
    pub dst: u128,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: Family,
}

/// A parsed frame: the flow key plus the offsets the forwarding step needs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ParsedPacket {
    pub key: FlowKey,
    /// Offset of the IP header (after Ethernet and an optional 802.1Q tag).
    pub l3_offset: u16,
    /// Offset of the TCP/UDP header.
    pub l4_offset: u16,
    /// Length of the IP packet (header included) as the IP header states it.
    pub l3_len: u16,
    /// VLAN id of the 802.1Q tag, if any.
    pub vlan: Option<u16>,
    /// TCP flags (byte 13 of the TCP header); 0 for UDP.
    pub tcp_flags: u8,
}

impl ParsedPacket {
    /// A TCP SYN without ACK: the first packet of a new connection.
    #[inline]
    pub fn is_syn(&self) -> bool {
        self.key.proto == PROTO_TCP
            && self.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
    }
}

/// Mixes one 64-bit word into a running hash (a multiply-xorshift round, as in
/// wyhash/murmur finalisers): cheap, and stable across processes and machines,
/// which Maglev needs so that several instances pick the same backend.
#[inline]
fn mix(h: u64, v: u64) -> u64 {
    let m = (h ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    m ^ (m >> 29)
}

#[inline]
fn finish(h: u64) -> u64 {
    let h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    let h = (h ^ (h >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Hash of a flow's 5-tuple, used by the flow table and the consistent hash.
#[inline]
pub fn flow_hash(key: &FlowKey) -> u64 {
    let mut h = 0x243f_6a88_85a3_08d3u64;
    h = mix(h, key.src as u64);
    h = mix(h, (key.src >> 64) as u64);
    h = mix(h, key.dst as u64);
    h = mix(h, (key.dst >> 64) as u64);
    h = mix(
        h,
        (key.sport as u64) << 32 | (key.dport as u64) << 16 | key.proto as u64,
    );
    finish(h)
}

/// Hash of a client address alone, used where all of a client's connections
/// must agree (automatic affinity) and by the affinity table.
#[inline]
pub fn addr_hash(addr: u128, salt: u64) -> u64 {
    let h = mix(0x1319_8a2e_0370_7344 ^ salt, addr as u64);
    finish(mix(h, (addr >> 64) as u64))
}

/// Parses an Ethernet frame down to its L4 header.
///
/// Returns the reason to drop it when it is not an unfragmented IPv4/IPv6
/// TCP or UDP packet with well-formed headers.
pub fn parse(frame: &[u8]) -> Result<ParsedPacket, DropReason> {
    let _ = frame;
    unimplemented!("skeleton: parser lands with the wire module")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_hash_is_stable_and_spreads() {
        let k = FlowKey {
            src: 0x0a00_0001,
            dst: 0x0a00_0002,
            sport: 1234,
            dport: 80,
            proto: PROTO_TCP,
            family: Family::V4,
        };
        assert_eq!(flow_hash(&k), flow_hash(&k.clone()));
        let k2 = FlowKey { sport: 1235, ..k };
        assert_ne!(flow_hash(&k), flow_hash(&k2));
    }
}
