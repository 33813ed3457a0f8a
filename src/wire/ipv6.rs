//! IPv6 headers (RFC 8200) and the walk over their extension headers.

use super::{be16, be32, put16, put32, Error, Result};

/// Length of the fixed header.
pub const HEADER_LEN: usize = 40;

pub const EXT_HOP_BY_HOP: u8 = 0;
pub const EXT_ROUTING: u8 = 43;
pub const EXT_FRAGMENT: u8 = 44;
pub const EXT_AH: u8 = 51;
pub const EXT_NO_NEXT: u8 = 59;
pub const EXT_DEST_OPTS: u8 = 60;
/// Next header value of IPv6-in-IPv6 encapsulation (RFC 2473).
pub const PROTO_IPV6: u8 = 41;

/// Most extension headers the walk follows before giving up: real traffic
/// carries one or two, and the bound caps the work a crafted packet causes.
pub const MAX_EXT_HEADERS: usize = 8;

/// A view of an IPv6 packet.
#[derive(Clone, Copy, Debug)]
pub struct Packet<T: AsRef<[u8]>> {
    buf: T,
}

/// Where the extension-header walk ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Upper {
    /// The upper-layer protocol and its offset from the start of the IPv6
    /// header.
    Proto { proto: u8, offset: usize },
    /// A fragment header of a real fragment (not an atomic one, RFC 6946).
    Fragment,
    /// No next header (59), or more than [`MAX_EXT_HEADERS`] extensions.
    Unsupported,
}

impl<T: AsRef<[u8]>> Packet<T> {
    #[inline]
    pub fn new_unchecked(buf: T) -> Packet<T> {
        Packet { buf }
    }

    /// Wraps `buf` after checking the version and that the payload length
    /// fits in `buf` (which may be longer: Ethernet padding).
    #[inline]
    pub fn new_checked(buf: T) -> Result<Packet<T>> {
        let b = buf.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if b[0] >> 4 != 6 {
            return Err(Error::Malformed);
        }
        if HEADER_LEN + be16(b, 4) as usize > b.len() {
            return Err(Error::Truncated);
        }
        Ok(Packet { buf })
    }

    #[inline]
    pub fn into_inner(self) -> T {
        self.buf
    }

    #[inline]
    pub fn version(&self) -> u8 {
        self.buf.as_ref()[0] >> 4
    }

    #[inline]
    pub fn traffic_class(&self) -> u8 {
        (be16(self.buf.as_ref(), 0) >> 4) as u8
    }

    #[inline]
    pub fn flow_label(&self) -> u32 {
        be32(self.buf.as_ref(), 0) & 0x000f_ffff
    }

    #[inline]
    pub fn payload_len(&self) -> u16 {
        be16(self.buf.as_ref(), 4)
    }

    /// Length of the whole packet: fixed header plus payload.
    #[inline]
    pub fn total_len(&self) -> usize {
        HEADER_LEN + self.payload_len() as usize
    }

    #[inline]
    pub fn next_header(&self) -> u8 {
        self.buf.as_ref()[6]
    }

    #[inline]
    pub fn hop_limit(&self) -> u8 {
        self.buf.as_ref()[7]
    }

    #[inline]
    pub fn src_addr(&self) -> [u8; 16] {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buf.as_ref()[8..24]);
        a
    }

    #[inline]
    pub fn dst_addr(&self) -> [u8; 16] {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buf.as_ref()[24..40]);
        a
    }

    /// The payload (extension headers included) as the payload length
    /// bounds it.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[HEADER_LEN..self.total_len()]
    }

    /// Follows the extension headers (hop-by-hop, routing, destination
    /// options, fragment, authentication) to the upper-layer protocol. An
    /// extension header that runs past the payload is `Truncated`.
    #[inline]
    pub fn upper_layer(&self) -> Result<Upper> {
        walk_extensions(&self.buf.as_ref()[..self.total_len()], self.next_header())
    }
}

/// The extension-header walk of [`Packet::upper_layer`] over `b`, an IPv6
/// packet whose fixed header says `next`, as far as `b` goes: `b` may end
/// before the packet does, and a header that runs past `b` is `Truncated`.
#[inline]
pub fn walk_extensions(b: &[u8], next: u8) -> Result<Upper> {
    walk::<false>(b, next)
}

/// The walk of [`walk_extensions`] over the packet an ICMPv6 error quotes:
/// a first fragment (offset 0) is followed to its upper-layer header, whose
/// ports name the connection; a later fragment is [`Upper::Fragment`].
#[inline]
pub fn walk_quote(b: &[u8], next: u8) -> Result<Upper> {
    walk::<true>(b, next)
}

/// The walk; `FIRST_FRAGMENT`: a first fragment is followed through.
#[inline(always)]
fn walk<const FIRST_FRAGMENT: bool>(b: &[u8], mut next: u8) -> Result<Upper> {
    let mut off = HEADER_LEN;
    for _ in 0..=MAX_EXT_HEADERS {
        let len = match next {
            EXT_HOP_BY_HOP | EXT_ROUTING | EXT_DEST_OPTS => {
                if off + 2 > b.len() {
                    return Err(Error::Truncated);
                }
                (b[off + 1] as usize + 1) * 8
            }
            EXT_FRAGMENT => {
                if off + 8 > b.len() {
                    return Err(Error::Truncated);
                }
                // Offset and M flag both zero: an atomic fragment, which
                // is the whole packet (RFC 6946).
                let mask = if FIRST_FRAGMENT { 0xfff8 } else { 0xfff9 };
                if be16(b, off + 2) & mask != 0 {
                    return Ok(Upper::Fragment);
                }
                8
            }
            EXT_AH => {
                if off + 2 > b.len() {
                    return Err(Error::Truncated);
                }
                (b[off + 1] as usize + 2) * 4
            }
            EXT_NO_NEXT => return Ok(Upper::Unsupported),
            proto => return Ok(Upper::Proto { proto, offset: off }),
        };
        if off + len > b.len() {
            return Err(Error::Truncated);
        }
        next = b[off];
        off += len;
    }
    Ok(Upper::Unsupported)
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets version 6, the traffic class and the flow label in one write.
    #[inline]
    pub fn set_version_tc_flow(&mut self, traffic_class: u8, flow_label: u32) {
        let v = 6u32 << 28 | (traffic_class as u32) << 20 | (flow_label & 0x000f_ffff);
        put32(self.buf.as_mut(), 0, v);
    }

    #[inline]
    pub fn set_payload_len(&mut self, len: u16) {
        put16(self.buf.as_mut(), 4, len);
    }

    #[inline]
    pub fn set_next_header(&mut self, nh: u8) {
        self.buf.as_mut()[6] = nh;
    }

    #[inline]
    pub fn set_hop_limit(&mut self, hl: u8) {
        self.buf.as_mut()[7] = hl;
    }

    #[inline]
    pub fn set_src_addr(&mut self, a: [u8; 16]) {
        self.buf.as_mut()[8..24].copy_from_slice(&a);
    }

    #[inline]
    pub fn set_dst_addr(&mut self, a: [u8; 16]) {
        self.buf.as_mut()[24..40].copy_from_slice(&a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet whose payload is `ext` followed by 20 bytes of "upper layer".
    fn packet(first: u8, ext: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        let mut p = Packet::new_unchecked(&mut b[..]);
        p.set_version_tc_flow(0x28, 0xabcde);
        p.set_payload_len((ext.len() + 20) as u16);
        p.set_next_header(first);
        p.set_hop_limit(64);
        b.extend_from_slice(ext);
        b.extend_from_slice(&[0u8; 20]);
        b
    }

    #[test]
    fn fixed_fields() {
        let b = packet(6, &[]);
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.version(), 6);
        assert_eq!(p.traffic_class(), 0x28);
        assert_eq!(p.flow_label(), 0xabcde);
        assert_eq!(p.payload_len(), 20);
        assert_eq!(p.hop_limit(), 64);
        assert_eq!(
            p.upper_layer(),
            Ok(Upper::Proto {
                proto: 6,
                offset: 40
            })
        );
    }

    #[test]
    fn walks_extensions() {
        // Hop-by-hop (8 bytes) -> routing (16 bytes) -> AH (12 bytes) ->
        // destination options (8 bytes) -> atomic fragment (8) -> UDP.
        let mut ext = vec![EXT_ROUTING, 0, 1, 4, 0, 0, 0, 0];
        ext.extend_from_slice(&[EXT_AH, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        ext.extend_from_slice(&[EXT_DEST_OPTS, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        ext.extend_from_slice(&[EXT_FRAGMENT, 0, 1, 4, 0, 0, 0, 0]);
        ext.extend_from_slice(&[17, 0, 0, 0, 0, 0, 0, 0]);
        let b = packet(EXT_HOP_BY_HOP, &ext);
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(
            p.upper_layer(),
            Ok(Upper::Proto {
                proto: 17,
                offset: 40 + ext.len()
            })
        );
    }

    #[test]
    fn fragment_and_unsupported() {
        // Offset 185 × 8, no M flag: a last fragment.
        let b = packet(EXT_FRAGMENT, &[6, 0, 0x05, 0xc8, 0, 0, 0, 1]);
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.upper_layer(), Ok(Upper::Fragment));
        // Offset 0 with the M flag: a first fragment.
        let b = packet(EXT_FRAGMENT, &[6, 0, 0, 1, 0, 0, 0, 1]);
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.upper_layer(), Ok(Upper::Fragment));

        let b = packet(EXT_NO_NEXT, &[]);
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.upper_layer(), Ok(Upper::Unsupported));

        let ext: Vec<u8> = (0..=MAX_EXT_HEADERS)
            .flat_map(|_| [EXT_DEST_OPTS, 0, 0, 0, 0, 0, 0, 0])
            .collect();
        let b = packet(EXT_DEST_OPTS, &ext);
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.upper_layer(), Ok(Upper::Unsupported));
    }

    /// The walk over a buffer that ends before the packet does (an ICMPv6
    /// error's quote): headers inside it are followed, one cut is
    /// `Truncated`.
    #[test]
    fn walk_over_a_cut_packet() {
        let b = packet(
            EXT_DEST_OPTS,
            &[6, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(
            walk_extensions(&b[..56], EXT_DEST_OPTS),
            Ok(Upper::Proto {
                proto: 6,
                offset: 56
            })
        );
        assert_eq!(
            walk_extensions(&b[..55], EXT_DEST_OPTS),
            Err(Error::Truncated)
        );
        assert_eq!(
            walk_extensions(&b[..41], EXT_DEST_OPTS),
            Err(Error::Truncated)
        );
        assert_eq!(
            walk_extensions(&b[..40], 17),
            Ok(Upper::Proto {
                proto: 17,
                offset: 40
            })
        );
    }

    /// A first fragment (offset 0, M set) is a fragment to the packet's
    /// walk and, in a quote, followed to its upper layer; a later fragment
    /// is a fragment to both.
    #[test]
    fn a_quote_walks_through_a_first_fragment() {
        let first = packet(EXT_FRAGMENT, &[17, 0, 0, 1, 0, 0, 0, 7]);
        assert_eq!(walk_extensions(&first, EXT_FRAGMENT), Ok(Upper::Fragment));
        assert_eq!(
            walk_quote(&first, EXT_FRAGMENT),
            Ok(Upper::Proto {
                proto: 17,
                offset: 48
            })
        );
        let later = packet(EXT_FRAGMENT, &[17, 0, 0x05, 0x01, 0, 0, 0, 7]);
        assert_eq!(walk_extensions(&later, EXT_FRAGMENT), Ok(Upper::Fragment));
        assert_eq!(walk_quote(&later, EXT_FRAGMENT), Ok(Upper::Fragment));
    }

    #[test]
    fn truncated() {
        let b = packet(6, &[]);
        assert_eq!(Packet::new_checked(&b[..59]).unwrap_err(), Error::Truncated);
        assert_eq!(Packet::new_checked(&b[..39]).unwrap_err(), Error::Truncated);
        let mut b2 = b.clone();
        b2[0] = 0x45;
        assert_eq!(Packet::new_checked(&b2[..]).unwrap_err(), Error::Malformed);
        // An extension header longer than the payload.
        let b = packet(EXT_HOP_BY_HOP, &[6, 200, 0, 0, 0, 0, 0, 0]);
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.upper_layer(), Err(Error::Truncated));
    }
}
