//! UDP headers (RFC 768).

use super::{be16, checksum, put16, Error, Result};

pub const HEADER_LEN: usize = 8;

/// A view of a UDP datagram. The buffer is the IP payload; the datagram is
/// its first `len()` bytes.
#[derive(Clone, Copy, Debug)]
pub struct Packet<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    #[inline]
    pub fn new_unchecked(buf: T) -> Packet<T> {
        Packet { buf }
    }

    /// Wraps `buf` after checking that the length field covers the header
    /// and does not run past `buf`.
    #[inline]
    pub fn new_checked(buf: T) -> Result<Packet<T>> {
        let b = buf.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let len = be16(b, 4) as usize;
        if len < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if len > b.len() {
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

    /// The length field: header plus payload.
    #[inline]
    pub fn len(&self) -> u16 {
        be16(self.buf.as_ref(), 4)
    }

    /// True when the length field covers only the header.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() as usize == HEADER_LEN
    }

    #[inline]
    pub fn checksum(&self) -> u16 {
        be16(self.buf.as_ref(), 6)
    }

    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[HEADER_LEN..self.len() as usize]
    }

    /// True when the checksum is correct for the pseudo header sum given, or
    /// absent (zero, which only IPv4 allows; the caller decides).
    #[inline]
    pub fn verify_checksum(&self, pseudo: u64) -> bool {
        self.checksum() == 0
            || checksum::fold(checksum::sum(
                pseudo,
                &self.buf.as_ref()[..self.len() as usize],
            )) == 0xffff
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
    pub fn set_len(&mut self, len: u16) {
        put16(self.buf.as_mut(), 4, len);
    }

    #[inline]
    pub fn set_checksum(&mut self, c: u16) {
        put16(self.buf.as_mut(), 6, c);
    }

    /// Computes and stores the checksum over the datagram (its length field
    /// already set) and the pseudo header sum. A computed zero is sent as
    /// 0xffff, since zero means "no checksum".
    #[inline]
    pub fn fill_checksum(&mut self, pseudo: u64) {
        self.set_checksum(0);
        let len = self.len() as usize;
        let c = !checksum::fold(checksum::sum(pseudo, &self.buf.as_ref()[..len]));
        self.set_checksum(if c == 0 { 0xffff } else { c });
    }

    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let len = self.len() as usize;
        &mut self.buf.as_mut()[HEADER_LEN..len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_checksum() {
        let mut b = [0u8; 14];
        let mut u = Packet::new_unchecked(&mut b[..]);
        u.set_src_port(53);
        u.set_dst_port(5353);
        u.set_len(12);
        u.payload_mut().copy_from_slice(b"ping");
        let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let pseudo = checksum::pseudo_v6(&src, &dst, 17, 12);
        u.fill_checksum(pseudo);
        let u = Packet::new_checked(&b[..]).unwrap();
        assert_eq!((u.src_port(), u.dst_port(), u.len()), (53, 5353, 12));
        assert_eq!(u.payload(), b"ping");
        assert_ne!(u.checksum(), 0);
        assert!(u.verify_checksum(pseudo));
        assert!(!u.verify_checksum(checksum::pseudo_v6(&dst, &dst, 17, 12)));
    }

    #[test]
    fn rejects_bad_length() {
        let mut b = [0u8; 12];
        b[4..6].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), Error::Malformed);
        b[4..6].copy_from_slice(&13u16.to_be_bytes());
        assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), Error::Truncated);
        b[4..6].copy_from_slice(&12u16.to_be_bytes());
        assert!(Packet::new_checked(&b[..]).is_ok());
        assert_eq!(Packet::new_checked(&b[..7]).unwrap_err(), Error::Truncated);
    }
}
