//! IPv4 headers (RFC 791), options included.

use super::{be16, checksum, put16, Error, Result};

/// Length of a header without options.
pub const HEADER_LEN: usize = 20;
/// IP protocol number of IPv4-in-IPv4 encapsulation (RFC 2003).
pub const PROTO_IPIP: u8 = 4;

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1fff;

/// A view of an IPv4 packet.
#[derive(Clone, Copy, Debug)]
pub struct Packet<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    #[inline]
    pub fn new_unchecked(buf: T) -> Packet<T> {
        Packet { buf }
    }

    /// Wraps `buf` after checking the version, that the header length is at
    /// least 20 and fits, and that the total length covers the header and
    /// fits in `buf` (which may be longer: Ethernet padding).
    #[inline]
    pub fn new_checked(buf: T) -> Result<Packet<T>> {
        let b = buf.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if b[0] >> 4 != 4 || b[0] & 0x0f < 5 {
            return Err(Error::Malformed);
        }
        let hlen = ((b[0] & 0x0f) as usize) * 4;
        let total = be16(b, 2) as usize;
        if total < hlen {
            return Err(Error::Malformed);
        }
        if total > b.len() {
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

    /// Header length in bytes (IHL × 4).
    #[inline]
    pub fn header_len(&self) -> usize {
        ((self.buf.as_ref()[0] & 0x0f) as usize) * 4
    }

    /// The DSCP and ECN byte (formerly TOS).
    #[inline]
    pub fn tos(&self) -> u8 {
        self.buf.as_ref()[1]
    }

    #[inline]
    pub fn total_len(&self) -> u16 {
        be16(self.buf.as_ref(), 2)
    }

    #[inline]
    pub fn ident(&self) -> u16 {
        be16(self.buf.as_ref(), 4)
    }

    #[inline]
    pub fn dont_frag(&self) -> bool {
        be16(self.buf.as_ref(), 6) & FLAG_DF != 0
    }

    #[inline]
    pub fn more_frags(&self) -> bool {
        be16(self.buf.as_ref(), 6) & FLAG_MF != 0
    }

    /// Fragment offset in bytes.
    #[inline]
    pub fn frag_offset(&self) -> u16 {
        (be16(self.buf.as_ref(), 6) & OFFSET_MASK) << 3
    }

    /// True for any fragment (first, middle or last) of a larger packet.
    #[inline]
    pub fn is_fragment(&self) -> bool {
        be16(self.buf.as_ref(), 6) & (FLAG_MF | OFFSET_MASK) != 0
    }

    #[inline]
    pub fn ttl(&self) -> u8 {
        self.buf.as_ref()[8]
    }

    #[inline]
    pub fn protocol(&self) -> u8 {
        self.buf.as_ref()[9]
    }

    #[inline]
    pub fn checksum(&self) -> u16 {
        be16(self.buf.as_ref(), 10)
    }

    #[inline]
    pub fn src_addr(&self) -> [u8; 4] {
        let b = self.buf.as_ref();
        [b[12], b[13], b[14], b[15]]
    }

    #[inline]
    pub fn dst_addr(&self) -> [u8; 4] {
        let b = self.buf.as_ref();
        [b[16], b[17], b[18], b[19]]
    }

    /// True when the header checksum (options included) is correct.
    #[inline]
    pub fn verify_checksum(&self) -> bool {
        checksum::checksum(&self.buf.as_ref()[..self.header_len()]) == 0
    }

    /// The options between the fixed header and the payload.
    #[inline]
    pub fn options(&self) -> &[u8] {
        &self.buf.as_ref()[HEADER_LEN..self.header_len()]
    }

    /// The payload as the total length bounds it (padding excluded).
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[self.header_len()..self.total_len() as usize]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets version 4 and the header length in bytes (a multiple of 4).
    #[inline]
    pub fn set_version_and_header_len(&mut self, header_len: usize) {
        self.buf.as_mut()[0] = 0x40 | ((header_len / 4) as u8 & 0x0f);
    }

    #[inline]
    pub fn set_tos(&mut self, tos: u8) {
        self.buf.as_mut()[1] = tos;
    }

    #[inline]
    pub fn set_total_len(&mut self, len: u16) {
        put16(self.buf.as_mut(), 2, len);
    }

    #[inline]
    pub fn set_ident(&mut self, id: u16) {
        put16(self.buf.as_mut(), 4, id);
    }

    /// Sets the flags and fragment offset (in bytes, a multiple of 8).
    #[inline]
    pub fn set_frag(&mut self, dont_frag: bool, more_frags: bool, offset: u16) {
        let mut v = (offset >> 3) & OFFSET_MASK;
        if dont_frag {
            v |= FLAG_DF;
        }
        if more_frags {
            v |= FLAG_MF;
        }
        put16(self.buf.as_mut(), 6, v);
    }

    #[inline]
    pub fn set_ttl(&mut self, ttl: u8) {
        self.buf.as_mut()[8] = ttl;
    }

    #[inline]
    pub fn set_protocol(&mut self, proto: u8) {
        self.buf.as_mut()[9] = proto;
    }

    #[inline]
    pub fn set_checksum(&mut self, csum: u16) {
        put16(self.buf.as_mut(), 10, csum);
    }

    #[inline]
    pub fn set_src_addr(&mut self, a: [u8; 4]) {
        self.buf.as_mut()[12..16].copy_from_slice(&a);
    }

    #[inline]
    pub fn set_dst_addr(&mut self, a: [u8; 4]) {
        self.buf.as_mut()[16..20].copy_from_slice(&a);
    }

    /// Computes and stores the header checksum over the header (options
    /// included), which must already be complete.
    #[inline]
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let hlen = self.header_len();
        let c = checksum::checksum(&self.buf.as_ref()[..hlen]);
        self.set_checksum(c);
    }

    /// The options, writable.
    #[inline]
    pub fn options_mut(&mut self) -> &mut [u8] {
        let hlen = self.header_len();
        &mut self.buf.as_mut()[HEADER_LEN..hlen]
    }

    /// The payload, writable.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (h, t) = (self.header_len(), self.total_len() as usize);
        &mut self.buf.as_mut()[h..t]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(ihl: u8, total: u16) -> Vec<u8> {
        let mut b = vec![0u8; total.max(20) as usize + 6];
        b[0] = 0x40 | ihl;
        b[2..4].copy_from_slice(&total.to_be_bytes());
        b
    }

    #[test]
    fn accepts_options_and_padding() {
        let mut b = header(7, 40);
        b[9] = 6;
        b[20..28].copy_from_slice(&[1, 1, 1, 1, 1, 1, 1, 0]);
        let mut p = Packet::new_checked(&mut b[..]).unwrap();
        p.fill_checksum();
        assert_eq!(p.header_len(), 28);
        assert_eq!(p.options(), &[1, 1, 1, 1, 1, 1, 1, 0]);
        assert_eq!(p.payload().len(), 12);
        assert!(p.verify_checksum());
        assert_eq!(p.protocol(), 6);
    }

    #[test]
    fn rejects_bad_lengths() {
        assert_eq!(
            Packet::new_checked(&[0x45u8; 19][..]).unwrap_err(),
            Error::Truncated
        );
        assert_eq!(
            Packet::new_checked(&header(4, 40)[..]).unwrap_err(),
            Error::Malformed
        );
        // Total length below the header length.
        assert_eq!(
            Packet::new_checked(&header(6, 20)[..]).unwrap_err(),
            Error::Malformed
        );
        // Total length beyond the buffer.
        let b = header(5, 40);
        assert_eq!(Packet::new_checked(&b[..39]).unwrap_err(), Error::Truncated);
        // Header length beyond the buffer (and the total length).
        let mut b = header(15, 40);
        b[2..4].copy_from_slice(&60u16.to_be_bytes());
        assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), Error::Truncated);
        // Wrong version.
        let mut b = header(5, 40);
        b[0] = 0x65;
        assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), Error::Malformed);
    }

    #[test]
    fn fragment_flags() {
        let mut b = header(5, 40);
        let mut p = Packet::new_checked(&mut b[..]).unwrap();
        p.set_frag(true, false, 0);
        assert!(p.dont_frag() && !p.is_fragment());
        p.set_frag(false, true, 0);
        assert!(p.more_frags() && p.is_fragment());
        p.set_frag(false, false, 1480);
        assert_eq!(p.frag_offset(), 1480);
        assert!(p.is_fragment());
    }
}
