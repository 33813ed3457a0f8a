//! ICMP (RFC 792) and ICMPv6 (RFC 4443) messages: the 8-byte header both
//! share (type, code, checksum, four type-specific bytes) and the body
//! after it. The buffer is the whole message, as the IP length bounds it.

use super::{be16, be32, checksum, put16, put32, Error, Result};

/// Length of the header: type, code, checksum and four more bytes.
pub const HEADER_LEN: usize = 8;

/// ICMPv4 types and codes pktdist handles.
pub mod v4 {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACHABLE: u8 = 3;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
    /// Destination unreachable, code 4: fragmentation needed and DF set
    /// (RFC 1191 puts the next-hop MTU in bytes 6-7).
    pub const CODE_FRAG_NEEDED: u8 = 4;
    /// Longest error message to send, IP header included (RFC 1812
    /// 4.3.2.3: as much of the offending packet as fits in 576 bytes).
    pub const MAX_ERROR_LEN: usize = 576;
}

/// ICMPv6 types pktdist handles.
pub mod v6 {
    pub const DEST_UNREACHABLE: u8 = 1;
    pub const PACKET_TOO_BIG: u8 = 2;
    pub const TIME_EXCEEDED: u8 = 3;
    pub const ECHO_REQUEST: u8 = 128;
    pub const ECHO_REPLY: u8 = 129;
    /// Longest error message to send, IPv6 header included (RFC 4443
    /// 2.4(c): as much of the offending packet as fits the minimum MTU).
    pub const MAX_ERROR_LEN: usize = 1280;
}

/// A view of an ICMP or ICMPv6 message.
#[derive(Clone, Copy, Debug)]
pub struct Packet<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    #[inline]
    pub fn new_unchecked(buf: T) -> Packet<T> {
        Packet { buf }
    }

    /// Wraps `buf` after checking that it holds the header.
    #[inline]
    pub fn new_checked(buf: T) -> Result<Packet<T>> {
        if buf.as_ref().len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        Ok(Packet { buf })
    }

    #[inline]
    pub fn into_inner(self) -> T {
        self.buf
    }

    #[inline]
    pub fn msg_type(&self) -> u8 {
        self.buf.as_ref()[0]
    }

    #[inline]
    pub fn code(&self) -> u8 {
        self.buf.as_ref()[1]
    }

    #[inline]
    pub fn checksum(&self) -> u16 {
        be16(self.buf.as_ref(), 2)
    }

    /// Bytes 4-7: the identifier and sequence number of an echo message,
    /// the MTU of an ICMPv6 packet too big, unused (or the next-hop MTU in
    /// the low half) for other errors.
    #[inline]
    pub fn rest(&self) -> u32 {
        be32(self.buf.as_ref(), 4)
    }

    /// The next-hop MTU of an ICMPv4 "fragmentation needed" (bytes 6-7).
    #[inline]
    pub fn next_hop_mtu(&self) -> u16 {
        be16(self.buf.as_ref(), 6)
    }

    /// Everything after the header: for an error, the quoted packet.
    #[inline]
    pub fn body(&self) -> &[u8] {
        &self.buf.as_ref()[HEADER_LEN..]
    }

    /// True when the ICMPv4 checksum (over the message alone) is correct.
    #[inline]
    pub fn verify_checksum_v4(&self) -> bool {
        checksum::checksum(self.buf.as_ref()) == 0
    }

    /// True when the ICMPv6 checksum is correct for the pseudo header sum
    /// given ([`checksum::pseudo_v6`] with next header 58 and the message
    /// length).
    #[inline]
    pub fn verify_checksum_v6(&self, pseudo: u64) -> bool {
        checksum::fold(checksum::sum(pseudo, self.buf.as_ref())) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    #[inline]
    pub fn set_msg_type(&mut self, t: u8) {
        self.buf.as_mut()[0] = t;
    }

    #[inline]
    pub fn set_code(&mut self, c: u8) {
        self.buf.as_mut()[1] = c;
    }

    #[inline]
    pub fn set_checksum(&mut self, c: u16) {
        put16(self.buf.as_mut(), 2, c);
    }

    #[inline]
    pub fn set_rest(&mut self, v: u32) {
        put32(self.buf.as_mut(), 4, v);
    }

    /// Computes and stores the ICMPv4 checksum over the whole message.
    #[inline]
    pub fn fill_checksum_v4(&mut self) {
        self.set_checksum(0);
        let c = checksum::checksum(self.buf.as_ref());
        self.set_checksum(c);
    }

    /// Computes and stores the ICMPv6 checksum for the pseudo header sum.
    #[inline]
    pub fn fill_checksum_v6(&mut self, pseudo: u64) {
        self.set_checksum(0);
        let c = !checksum::fold(checksum::sum(pseudo, self.buf.as_ref()));
        self.set_checksum(c);
    }

    /// The body, writable.
    #[inline]
    pub fn body_mut(&mut self) -> &mut [u8] {
        &mut self.buf.as_mut()[HEADER_LEN..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_v4_checksum() {
        // An echo request as ping sends it: id 0x1234, seq 1, "abcd".
        let mut b = vec![0u8; 12];
        let mut m = Packet::new_checked(&mut b[..]).unwrap();
        m.set_msg_type(v4::ECHO_REQUEST);
        m.set_code(0);
        m.set_rest(0x1234_0001);
        m.body_mut().copy_from_slice(b"abcd");
        m.fill_checksum_v4();
        let m = Packet::new_checked(&b[..]).unwrap();
        assert_eq!((m.msg_type(), m.code()), (8, 0));
        assert_eq!(m.rest(), 0x1234_0001);
        assert_eq!(m.body(), b"abcd");
        assert!(m.verify_checksum_v4());
        // The textbook sum: 0x0800 + 0x1234 + 0x0001 + "ab" + "cd".
        let sum: u32 = 0x0800 + 0x1234 + 0x0001 + 0x6162 + 0x6364;
        let folded = (sum & 0xffff) + (sum >> 16);
        assert_eq!(m.checksum(), !(folded as u16));
        let mut bad = b.clone();
        bad[11] ^= 1;
        assert!(!Packet::new_checked(&bad[..]).unwrap().verify_checksum_v4());
    }

    #[test]
    fn v6_checksum_covers_the_pseudo_header() {
        let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let mut b = [0u8; 16];
        let pseudo = checksum::pseudo_v6(&src, &dst, 58, 16);
        let mut m = Packet::new_unchecked(&mut b[..]);
        m.set_msg_type(v6::PACKET_TOO_BIG);
        m.set_rest(1280);
        m.body_mut().copy_from_slice(&[0x60, 0, 0, 0, 0, 0, 6, 64]);
        m.fill_checksum_v6(pseudo);
        let m = Packet::new_checked(&b[..]).unwrap();
        assert!(m.verify_checksum_v6(pseudo));
        assert_eq!(m.rest(), 1280);
        assert!(!m.verify_checksum_v6(checksum::pseudo_v6(&dst, &dst, 58, 16)));
    }

    #[test]
    fn truncated_and_frag_needed_mtu() {
        assert_eq!(
            Packet::new_checked(&[3u8, 4, 0, 0, 0, 0, 5][..]).unwrap_err(),
            Error::Truncated
        );
        let m = Packet::new_checked(&[3u8, 4, 0, 0, 0, 0, 0x05, 0xc8][..]).unwrap();
        assert_eq!(m.next_hop_mtu(), 1480);
        assert!(m.body().is_empty());
    }
}
