//! An owned `rte_mbuf`: the packet buffer of the DPDK data path.

use std::ptr::NonNull;

use super::cpu::prefetch_write_ptr;
use super::sys;
use super::{DpdkError, Mempool};
use crate::datapath::pktio::PacketBuf;

/// One packet buffer, freed back to its pool on drop.
///
/// Only the first segment is visible: [`PacketBuf::data`] is that segment.
/// Mbufs allocated here are single-segment; ports are configured without
/// scatter and with mempools whose data room holds a full frame at the
/// default MTU, so received frames are single-segment too.
///
/// The layout is that of a non-null `*mut rte_mbuf`, so a `[Mbuf]` can be
/// handed to DPDK's burst functions as it is.
#[repr(transparent)]
pub struct Mbuf(NonNull<sys::rte_mbuf>);

// SAFETY: an Mbuf is the sole owner of its rte_mbuf; DPDK mbufs may be used
// and freed from any thread.
unsafe impl Send for Mbuf {}
// SAFETY: &Mbuf only reads the mbuf; nothing is mutated through it.
unsafe impl Sync for Mbuf {}

impl Mbuf {
    /// Takes ownership of a raw mbuf.
    ///
    /// # Safety
    /// `raw` must be a valid mbuf that nothing else references or frees.
    pub(crate) unsafe fn from_raw(raw: NonNull<sys::rte_mbuf>) -> Mbuf {
        Mbuf(raw)
    }

    /// An empty mbuf (standard headroom, no data) from `pool`, or `None`
    /// when the pool is exhausted.
    #[inline]
    pub fn alloc(pool: &Mempool) -> Option<Mbuf> {
        // SAFETY: the pool is alive (borrowed); alloc returns a fresh mbuf
        // with refcnt 1 that only we reference, or NULL.
        let raw = unsafe { sys::pktdist_pktmbuf_alloc(pool.as_ptr()) };
        // SAFETY: a non-null result is a fresh mbuf nobody else owns.
        NonNull::new(raw).map(|r| unsafe { Mbuf::from_raw(r) })
    }

    /// Appends `n` empty mbufs to `out`, all or none. Returns false (and
    /// changes nothing) when the pool cannot supply `n`. Allocates on the
    /// heap only if `out` lacks capacity.
    pub fn alloc_bulk(pool: &Mempool, out: &mut Vec<Mbuf>, n: usize) -> bool {
        let Ok(count) = u32::try_from(n) else {
            return false;
        };
        out.reserve(n);
        let len = out.len();
        // Mbuf is a transparent non-null pointer, so the spare capacity is
        // an array of `*mut rte_mbuf` for DPDK to fill.
        let dst = out
            .spare_capacity_mut()
            .as_mut_ptr()
            .cast::<*mut sys::rte_mbuf>();
        // SAFETY: dst has room for n pointers (reserved above); the pool is
        // alive.
        let ret = unsafe { sys::pktdist_pktmbuf_alloc_bulk(pool.as_ptr(), dst, count) };
        if ret != 0 {
            return false;
        }
        // SAFETY: on success DPDK wrote n valid, fresh, non-null mbuf
        // pointers, each owned by us alone, into the first n spare slots.
        unsafe { out.set_len(len + n) };
        true
    }

    /// An mbuf from `pool` holding a copy of `frame`.
    pub fn from_frame(pool: &Mempool, frame: &[u8]) -> Result<Mbuf, DpdkError> {
        let mut m = Mbuf::alloc(pool).ok_or(DpdkError::PoolEmpty)?;
        let room = m.tailroom();
        if !m.resize(frame.len()) {
            return Err(DpdkError::FrameTooLong {
                len: frame.len(),
                room,
            });
        }
        m.data_mut().copy_from_slice(frame);
        Ok(m)
    }

    #[inline(always)]
    fn raw(&self) -> &sys::rte_mbuf {
        // SAFETY: we own a valid mbuf; no one else writes it while we hold it.
        unsafe { self.0.as_ref() }
    }

    #[inline(always)]
    fn raw_mut(&mut self) -> &mut sys::rte_mbuf {
        // SAFETY: as in `raw`, and &mut self makes the access exclusive.
        unsafe { self.0.as_mut() }
    }

    /// Bytes free in front of the frame.
    #[inline]
    pub fn headroom(&self) -> usize {
        usize::from(self.raw().data_off)
    }

    /// Bytes free after the frame in the first segment.
    #[inline]
    pub fn tailroom(&self) -> usize {
        let m = self.raw();
        usize::from(m.buf_len).saturating_sub(usize::from(m.data_off) + usize::from(m.data_len))
    }

    /// Sets the frame length to `len`, growing into the tailroom (the new
    /// bytes hold whatever the buffer held) or cutting the end. Returns
    /// false, changing nothing, when `len` does not fit or the mbuf has more
    /// than one segment.
    #[inline]
    pub fn resize(&mut self, len: usize) -> bool {
        let m = self.raw_mut();
        if m.nb_segs != 1 {
            return false;
        }
        let max = usize::from(m.buf_len).saturating_sub(usize::from(m.data_off));
        if len > max {
            return false;
        }
        // len <= buf_len, a u16.
        m.data_len = len as u16;
        m.pkt_len = len as u32;
        true
    }

    /// Length of the whole packet, all segments.
    #[inline]
    pub fn pkt_len(&self) -> u32 {
        self.raw().pkt_len
    }

    /// Number of segments.
    #[inline]
    pub fn nb_segs(&self) -> u16 {
        self.raw().nb_segs
    }

    /// The port DPDK received the packet on.
    #[inline]
    pub fn port(&self) -> u16 {
        self.raw().port
    }

    #[inline(always)]
    fn data_ptr(&self) -> *mut u8 {
        let m = self.raw();
        // data_off < buf_len, so this stays inside the buffer.
        m.buf_addr
            .cast::<u8>()
            .wrapping_add(usize::from(m.data_off))
    }
}

impl PacketBuf for Mbuf {
    #[inline]
    fn len(&self) -> usize {
        usize::from(self.raw().data_len)
    }

    #[inline]
    fn data(&self) -> &[u8] {
        let len = usize::from(self.raw().data_len);
        // SAFETY: buf_addr + data_off .. + data_len lies inside the mbuf's
        // buffer (DPDK's invariant data_off + data_len <= buf_len, kept by
        // every method here); the buffer is initialised memory owned by this
        // mbuf and not written elsewhere while we hold it.
        unsafe { std::slice::from_raw_parts(self.data_ptr(), len) }
    }

    #[inline]
    fn data_mut(&mut self) -> &mut [u8] {
        let len = usize::from(self.raw().data_len);
        // SAFETY: as in `data`; &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.data_ptr(), len) }
    }

    #[inline]
    fn prepend(&mut self, n: usize) -> bool {
        let m = self.raw_mut();
        if n > usize::from(m.data_off) {
            return false;
        }
        // n <= data_off, and data_off + data_len <= buf_len fits in u16.
        m.data_off -= n as u16;
        m.data_len += n as u16;
        m.pkt_len += n as u32;
        true
    }

    #[inline]
    fn trim_front(&mut self, n: usize) -> bool {
        let m = self.raw_mut();
        if n > usize::from(m.data_len) {
            return false;
        }
        m.data_off += n as u16;
        m.data_len -= n as u16;
        m.pkt_len -= n as u32;
        true
    }

    #[inline]
    fn truncate(&mut self, len: usize) -> bool {
        let m = self.raw_mut();
        if m.nb_segs != 1 || len > usize::from(m.data_len) {
            return false;
        }
        // len <= data_len, a u16.
        m.data_len = len as u16;
        m.pkt_len = len as u32;
        true
    }

    #[inline]
    fn reframe(&mut self, front: usize, len: usize) -> bool {
        let m = self.raw_mut();
        let grown = usize::from(m.data_len) + front;
        if front > usize::from(m.data_off) || len > grown {
            return false;
        }
        if len == grown {
            m.pkt_len += front as u32;
        } else if m.nb_segs == 1 {
            m.pkt_len = len as u32;
        } else {
            return false;
        }
        // front <= data_off; len <= data_len + front, and data_off +
        // data_len <= buf_len fits in u16.
        m.data_off -= front as u16;
        m.data_len = len as u16;
        true
    }

    #[inline]
    fn prefetch_meta(&self) {
        // The first cache line of struct rte_mbuf holds buf_addr, data_off
        // and the lengths.
        prefetch_write_ptr(self.0.as_ptr().cast());
    }

    #[inline]
    fn prefetch(&self) {
        let data = self.data_ptr();
        prefetch_write_ptr(data);
        // The line the next-largest header (IPv6, 40 bytes) starts in when
        // prepended: the same line as `data` or the one before.
        prefetch_write_ptr(data.wrapping_sub(40));
    }
}

impl Drop for Mbuf {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: we own the mbuf (and its chain); it is not used after this.
        unsafe { sys::pktdist_pktmbuf_free(self.0.as_ptr()) }
    }
}

impl std::fmt::Debug for Mbuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mbuf")
            .field("len", &self.raw().data_len)
            .field("headroom", &self.headroom())
            .field("segs", &self.nb_segs())
            .finish()
    }
}
