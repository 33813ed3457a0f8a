//! Ethernet II frames with up to two VLAN tags (802.1Q, and 802.1ad QinQ).

use super::{be16, put16, Error, Result};

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const ETHERTYPE_QINQ: u16 = 0x88a8;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

/// Length of the untagged header: two addresses and the EtherType.
pub const HEADER_LEN: usize = 14;
/// Length of one VLAN tag (TPID + TCI).
pub const VLAN_TAG_LEN: usize = 4;
/// Smallest frame on the wire without the FCS; shorter payloads are padded.
pub const MIN_FRAME_LEN: usize = 60;

/// What lies after the link-layer header: the payload's EtherType, the VLAN
/// id of the outermost tag, and where the payload starts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct L2Info {
    pub ethertype: u16,
    pub vlan: Option<u16>,
    pub header_len: usize,
}

/// A view of an Ethernet frame.
#[derive(Clone, Copy, Debug)]
pub struct Frame<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wraps `buf` without checking it; accessors may panic if it is short.
    #[inline]
    pub fn new_unchecked(buf: T) -> Frame<T> {
        Frame { buf }
    }

    /// Wraps `buf` after checking that it holds the untagged header.
    #[inline]
    pub fn new_checked(buf: T) -> Result<Frame<T>> {
        if buf.as_ref().len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        Ok(Frame { buf })
    }

    #[inline]
    pub fn into_inner(self) -> T {
        self.buf
    }

    #[inline]
    pub fn dst_addr(&self) -> [u8; 6] {
        let b = self.buf.as_ref();
        [b[0], b[1], b[2], b[3], b[4], b[5]]
    }

    #[inline]
    pub fn src_addr(&self) -> [u8; 6] {
        let b = self.buf.as_ref();
        [b[6], b[7], b[8], b[9], b[10], b[11]]
    }

    /// The first EtherType (a TPID when the frame is tagged).
    #[inline]
    pub fn ethertype(&self) -> u16 {
        be16(self.buf.as_ref(), 12)
    }

    /// Walks the VLAN tags: a single 802.1Q tag (TPID 0x8100), or an outer
    /// 802.1ad (0x88a8) or 0x8100 tag followed by an inner 0x8100 tag.
    /// The reported VLAN id is the outermost tag's 12-bit VID.
    #[inline]
    pub fn l2_info(&self) -> Result<L2Info> {
        let b = self.buf.as_ref();
        let ethertype = be16(b, 12);
        if ethertype != ETHERTYPE_VLAN && ethertype != ETHERTYPE_QINQ {
            return Ok(L2Info {
                ethertype,
                vlan: None,
                header_len: HEADER_LEN,
            });
        }
        if b.len() < HEADER_LEN + VLAN_TAG_LEN {
            return Err(Error::Truncated);
        }
        let vlan = Some(be16(b, 14) & 0x0fff);
        let inner = be16(b, 16);
        if inner != ETHERTYPE_VLAN {
            return Ok(L2Info {
                ethertype: inner,
                vlan,
                header_len: HEADER_LEN + VLAN_TAG_LEN,
            });
        }
        if b.len() < HEADER_LEN + 2 * VLAN_TAG_LEN {
            return Err(Error::Truncated);
        }
        Ok(L2Info {
            ethertype: be16(b, 20),
            vlan,
            header_len: HEADER_LEN + 2 * VLAN_TAG_LEN,
        })
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    #[inline]
    pub fn set_dst_addr(&mut self, mac: [u8; 6]) {
        self.buf.as_mut()[0..6].copy_from_slice(&mac);
    }

    #[inline]
    pub fn set_src_addr(&mut self, mac: [u8; 6]) {
        self.buf.as_mut()[6..12].copy_from_slice(&mac);
    }

    #[inline]
    pub fn set_ethertype(&mut self, ethertype: u16) {
        put16(self.buf.as_mut(), 12, ethertype);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(types: &[u16]) -> Vec<u8> {
        let mut f = vec![0xaa; 12];
        for (i, t) in types.iter().enumerate() {
            f.extend_from_slice(&t.to_be_bytes());
            if i + 1 < types.len() {
                f.extend_from_slice(&(0x2000u16 | (100 + i as u16)).to_be_bytes());
            }
        }
        f.extend_from_slice(&[0; 20]);
        f
    }

    #[test]
    fn untagged() {
        let f = frame(&[ETHERTYPE_IPV4]);
        let e = Frame::new_checked(&f[..]).unwrap();
        assert_eq!(e.dst_addr(), [0xaa; 6]);
        assert_eq!(
            e.l2_info().unwrap(),
            L2Info {
                ethertype: ETHERTYPE_IPV4,
                vlan: None,
                header_len: 14
            }
        );
    }

    #[test]
    fn single_and_double_tags() {
        let f = frame(&[ETHERTYPE_VLAN, ETHERTYPE_IPV6]);
        let i = Frame::new_checked(&f[..]).unwrap().l2_info().unwrap();
        assert_eq!(
            (i.ethertype, i.vlan, i.header_len),
            (ETHERTYPE_IPV6, Some(100), 18)
        );

        let f = frame(&[ETHERTYPE_QINQ, ETHERTYPE_VLAN, ETHERTYPE_IPV4]);
        let i = Frame::new_checked(&f[..]).unwrap().l2_info().unwrap();
        assert_eq!(
            (i.ethertype, i.vlan, i.header_len),
            (ETHERTYPE_IPV4, Some(100), 22)
        );

        let f = frame(&[ETHERTYPE_VLAN, ETHERTYPE_VLAN, ETHERTYPE_IPV4]);
        let i = Frame::new_checked(&f[..]).unwrap().l2_info().unwrap();
        assert_eq!((i.ethertype, i.header_len), (ETHERTYPE_IPV4, 22));
    }

    #[test]
    fn truncated() {
        assert_eq!(
            Frame::new_checked(&[0u8; 13][..]).unwrap_err(),
            Error::Truncated
        );
        let f = frame(&[ETHERTYPE_VLAN, ETHERTYPE_IPV4]);
        let e = Frame::new_checked(&f[..17]).unwrap();
        assert_eq!(e.l2_info(), Err(Error::Truncated));
        let f = frame(&[ETHERTYPE_QINQ, ETHERTYPE_VLAN, ETHERTYPE_IPV4]);
        let e = Frame::new_checked(&f[..21]).unwrap();
        assert_eq!(e.l2_info(), Err(Error::Truncated));
    }

    #[test]
    fn setters() {
        let mut f = frame(&[ETHERTYPE_IPV4]);
        let mut e = Frame::new_checked(&mut f[..]).unwrap();
        e.set_dst_addr([1, 2, 3, 4, 5, 6]);
        e.set_src_addr([7, 8, 9, 10, 11, 12]);
        e.set_ethertype(ETHERTYPE_ARP);
        assert_eq!(e.dst_addr(), [1, 2, 3, 4, 5, 6]);
        assert_eq!(e.src_addr(), [7, 8, 9, 10, 11, 12]);
        assert_eq!(e.ethertype(), ETHERTYPE_ARP);
    }
}
