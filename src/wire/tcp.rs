//! TCP headers (RFC 9293).

use super::{be16, be32, checksum, put16, put32, Error, Result};

/// Length of a header without options.
pub const HEADER_LEN: usize = 20;

/// A view of a TCP segment. The buffer is the segment itself (the IP
/// payload), so the payload runs to its end.
#[derive(Clone, Copy, Debug)]
pub struct Packet<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    #[inline]
    pub fn new_unchecked(buf: T) -> Packet<T> {
        Packet { buf }
    }

    /// Wraps `buf` after checking that the data offset is at least 5 and the
    /// header (options included) fits.
    #[inline]
    pub fn new_checked(buf: T) -> Result<Packet<T>> {
        let b = buf.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let hlen = ((b[12] >> 4) as usize) * 4;
        if hlen < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if hlen > b.len() {
            return Err(Error::Truncated);
        }
        Ok(Packet { buf })
    }

    #[inline]
    pub fn into_inner(self) -> T {
        self.buf
    }

    #[inline]
    pub fn src_port(&self) -> u16 {
        be16(self.buf.as_ref(), 0)
    }

    #[inline]
    pub fn dst_port(&self) -> u16 {
        be16(self.buf.as_ref(), 2)
    }

    #[inline]
    pub fn seq_number(&self) -> u32 {
        be32(self.buf.as_ref(), 4)
    }

    #[inline]
    pub fn ack_number(&self) -> u32 {
        be32(self.buf.as_ref(), 8)
    }

    /// Header length in bytes (data offset × 4).
    #[inline]
    pub fn header_len(&self) -> usize {
        ((self.buf.as_ref()[12] >> 4) as usize) * 4
    }

    /// The flag byte (CWR ECE URG ACK PSH RST SYN FIN); see
    /// [`crate::types::tcp_flags`].
    #[inline]
    pub fn flags(&self) -> u8 {
        self.buf.as_ref()[13]
    }

    #[inline]
    pub fn window(&self) -> u16 {
        be16(self.buf.as_ref(), 14)
    }

    #[inline]
    pub fn checksum(&self) -> u16 {
        be16(self.buf.as_ref(), 16)
    }

    #[inline]
    pub fn urgent(&self) -> u16 {
        be16(self.buf.as_ref(), 18)
    }

    #[inline]
    pub fn options(&self) -> &[u8] {
        &self.buf.as_ref()[HEADER_LEN..self.header_len()]
    }

    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[self.header_len()..]
    }

    /// True when the checksum over the segment and the pseudo header (an
    /// unfolded sum from [`checksum::pseudo_v4`] or [`checksum::pseudo_v6`])
    /// is correct.
    #[inline]
    pub fn verify_checksum(&self, pseudo: u64) -> bool {
        checksum::fold(checksum::sum(pseudo, self.buf.as_ref())) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    #[inline]
    pub fn set_src_port(&mut self, p: u16) {
        put16(self.buf.as_mut(), 0, p);
    }

    #[inline]
    pub fn set_dst_port(&mut self, p: u16) {
        put16(self.buf.as_mut(), 2, p);
    }

    #[inline]
    pub fn set_seq_number(&mut self, v: u32) {
        put32(self.buf.as_mut(), 4, v);
    }

    #[inline]
    pub fn set_ack_number(&mut self, v: u32) {
        put32(self.buf.as_mut(), 8, v);
    }

    /// Sets the data offset from a header length in bytes (a multiple of 4),
    /// clearing the reserved bits.
    #[inline]
    pub fn set_header_len(&mut self, len: usize) {
        self.buf.as_mut()[12] = (((len / 4) as u8) & 0x0f) << 4;
    }

    #[inline]
    pub fn set_flags(&mut self, flags: u8) {
        self.buf.as_mut()[13] = flags;
    }

    #[inline]
    pub fn set_window(&mut self, w: u16) {
        put16(self.buf.as_mut(), 14, w);
    }

    #[inline]
    pub fn set_checksum(&mut self, c: u16) {
        put16(self.buf.as_mut(), 16, c);
    }

    #[inline]
    pub fn set_urgent(&mut self, u: u16) {
        put16(self.buf.as_mut(), 18, u);
    }

    /// Computes and stores the checksum over the whole segment, which must
    /// be complete, and the pseudo header sum.
    #[inline]
    pub fn fill_checksum(&mut self, pseudo: u64) {
        self.set_checksum(0);
        let c = !checksum::fold(checksum::sum(pseudo, self.buf.as_ref()));
        self.set_checksum(c);
    }

    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let h = self.header_len();
        &mut self.buf.as_mut()[h..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_checksum() {
        let mut b = [0u8; 24];
        let mut t = Packet::new_unchecked(&mut b[..]);
        t.set_src_port(40000);
        t.set_dst_port(80);
        t.set_seq_number(0x01020304);
        t.set_ack_number(7);
        t.set_header_len(20);
        t.set_flags(0x12);
        t.set_window(1000);
        t.payload_mut().copy_from_slice(b"abcd");
        let pseudo = checksum::pseudo_v4([10, 0, 0, 1], [10, 0, 0, 2], 6, 24);
        t.fill_checksum(pseudo);
        let t = Packet::new_checked(&b[..]).unwrap();
        assert_eq!((t.src_port(), t.dst_port()), (40000, 80));
        assert_eq!((t.seq_number(), t.ack_number()), (0x01020304, 7));
        assert_eq!((t.flags(), t.window(), t.header_len()), (0x12, 1000, 20));
        assert_eq!(t.payload(), b"abcd");
        assert!(t.verify_checksum(pseudo));
        let other = checksum::pseudo_v4([10, 0, 0, 1], [10, 0, 0, 3], 6, 24);
        assert!(!t.verify_checksum(other));
    }

    #[test]
    fn rejects_bad_data_offset() {
        let mut b = [0u8; 24];
        b[12] = 4 << 4;
        assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), Error::Malformed);
        b[12] = 7 << 4;
        assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), Error::Truncated);
        assert!(Packet::new_checked(&[&b[..], &[0u8; 4]].concat()).is_ok());
        assert_eq!(Packet::new_checked(&b[..19]).unwrap_err(), Error::Truncated);
    }
}
