//! The packet-I/O boundary between the distribution logic and whatever moves
//! packets: DPDK ports in production, in-memory queues in tests.
//!
//! The worker loop is generic over [`PacketIo`]; it never sees an mbuf.

use std::collections::VecDeque;

/// Packets per receive burst (DPDK's customary 32).
pub const MAX_BURST: usize = 32;

/// One packet buffer: a contiguous frame with headroom in front of it.
pub trait PacketBuf {
    /// The frame, starting at the Ethernet header.
    fn data(&self) -> &[u8];
    /// The frame, writable.
    fn data_mut(&mut self) -> &mut [u8];
    /// The frame's length: `data().len()` without making the slice.
    #[inline]
    fn len(&self) -> usize {
        self.data().len()
    }
    /// True for a frame of no bytes.
    #[inline]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Grows the frame at the front by `n` bytes taken from the headroom.
    /// Returns false, changing nothing, when the headroom is too small.
    fn prepend(&mut self, n: usize) -> bool;
    /// Removes `n` bytes from the front of the frame. Returns false, changing
    /// nothing, when the frame is shorter than `n`.
    fn trim_front(&mut self, n: usize) -> bool;
    /// Shortens the frame to its first `len` bytes. Returns false, changing
    /// nothing, when the frame is shorter than `len` or the buffer cannot
    /// (a multi-segment mbuf).
    fn truncate(&mut self, len: usize) -> bool;
    /// Grows the frame at the front by `front` bytes of headroom and makes
    /// it `len` bytes long, at most the grown length: [`PacketBuf::prepend`]
    /// then [`PacketBuf::truncate`] in one step (an encapsulation that also
    /// cuts the Ethernet padding). Returns false, changing nothing, when
    /// either would fail.
    #[inline]
    fn reframe(&mut self, front: usize, len: usize) -> bool {
        if !self.prepend(front) {
            return false;
        }
        if len != self.len() && !self.truncate(len) {
            self.trim_front(front);
            return false;
        }
        true
    }
    /// Hints that the buffer's descriptor (the mbuf header: data offset and
    /// lengths) will be read and written soon. Needs no read of the buffer.
    #[inline]
    fn prefetch_meta(&self) {}
    /// Hints that the frame's first cache line, and the headroom line before
    /// it where an encapsulation header goes, will be read and written soon.
    #[inline]
    fn prefetch(&self) {}
}

/// A worker's view of its ports: one receive and one transmit queue on each.
pub trait PacketIo {
    type Buf: PacketBuf;

    /// Number of ports this worker polls.
    fn num_ports(&self) -> usize;
    /// The MAC address of a port (source of forwarded frames).
    fn port_mac(&self, port: usize) -> [u8; 6];
    /// Appends up to `MAX_BURST - bufs.len()` received packets to `bufs`.
    fn rx_burst(&mut self, port: usize, bufs: &mut Vec<Self::Buf>);
    /// Transmits packets from the front of `bufs` and removes those sent.
    /// Packets the queue did not take stay in `bufs`; the caller counts and
    /// drops them.
    fn tx_burst(&mut self, port: usize, bufs: &mut Vec<Self::Buf>);
    /// A new buffer holding a frame of `len` bytes (their contents
    /// unspecified) after the standard headroom, to leave on `port` (whose
    /// NUMA socket's memory it comes from), or None when no buffer is free
    /// or `len` does not fit one. For the rare packet that leaves as
    /// several (IPv4 fragments).
    fn alloc(&mut self, port: usize, len: usize) -> Option<Self::Buf>;
}

/// Headroom of a [`MemBuf`], as DPDK's default `RTE_PKTMBUF_HEADROOM`.
pub const MEM_HEADROOM: usize = 128;
/// Total size of a [`MemBuf`].
pub const MEM_BUF_SIZE: usize = 2048;

/// A heap-backed packet buffer with DPDK-like headroom, for tests and for
/// running the pipeline without EAL.
#[derive(Clone)]
pub struct MemBuf {
    buf: Box<[u8]>,
    start: usize,
    len: usize,
}

impl MemBuf {
    /// A buffer holding a copy of `frame` after the standard headroom.
    /// Frames longer than the buffer are truncated to fit.
    pub fn from_frame(frame: &[u8]) -> MemBuf {
        let len = frame.len().min(MEM_BUF_SIZE - MEM_HEADROOM);
        let mut buf = vec![0u8; MEM_BUF_SIZE].into_boxed_slice();
        buf[MEM_HEADROOM..MEM_HEADROOM + len].copy_from_slice(&frame[..len]);
        MemBuf {
            buf,
            start: MEM_HEADROOM,
            len,
        }
    }

    /// A buffer of `len` zero bytes after the standard headroom, or None
    /// when `len` does not fit.
    pub fn zeroed(len: usize) -> Option<MemBuf> {
        (len <= MEM_BUF_SIZE - MEM_HEADROOM).then(|| MemBuf {
            buf: vec![0u8; MEM_BUF_SIZE].into_boxed_slice(),
            start: MEM_HEADROOM,
            len,
        })
    }

    /// A buffer holding `frame` after exactly `headroom` bytes (tests of
    /// what a short headroom does).
    pub fn with_headroom(headroom: usize, frame: &[u8]) -> MemBuf {
        let mut buf = vec![0u8; headroom + frame.len()];
        buf[headroom..].copy_from_slice(frame);
        MemBuf {
            buf: buf.into_boxed_slice(),
            start: headroom,
            len: frame.len(),
        }
    }

    pub fn headroom(&self) -> usize {
        self.start
    }
}

impl PacketBuf for MemBuf {
    #[inline]
    fn len(&self) -> usize {
        self.len
    }
    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
    fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
    fn prepend(&mut self, n: usize) -> bool {
        if n > self.start {
            return false;
        }
        self.start -= n;
        self.len += n;
        true
    }
    fn trim_front(&mut self, n: usize) -> bool {
        if n > self.len {
            return false;
        }
        self.start += n;
        self.len -= n;
        true
    }

    fn truncate(&mut self, len: usize) -> bool {
        if len > self.len {
            return false;
        }
        self.len = len;
        true
    }
}

/// In-memory ports: tests push frames into `rx[port]` and read what the worker
/// transmitted from `tx[port]`. `tx_capacity` bounds each transmit queue so
/// that a full queue can be tested, `spare_bufs` the buffers `alloc` hands
/// out so that a dry pool can be.
pub struct MemIo {
    pub rx: Vec<VecDeque<MemBuf>>,
    pub tx: Vec<Vec<MemBuf>>,
    pub macs: Vec<[u8; 6]>,
    pub tx_capacity: usize,
    pub spare_bufs: usize,
}

impl MemIo {
    pub fn new(ports: usize) -> MemIo {
        MemIo {
            rx: (0..ports).map(|_| VecDeque::new()).collect(),
            tx: (0..ports).map(|_| Vec::new()).collect(),
            macs: (0..ports).map(|p| [0x02, 0, 0, 0, 0, p as u8]).collect(),
            tx_capacity: usize::MAX,
            spare_bufs: usize::MAX,
        }
    }

    /// Queues a frame for reception on `port`.
    pub fn push_rx(&mut self, port: usize, frame: &[u8]) {
        self.rx[port].push_back(MemBuf::from_frame(frame));
    }
}

impl PacketIo for MemIo {
    type Buf = MemBuf;

    fn num_ports(&self) -> usize {
        self.rx.len()
    }
    fn port_mac(&self, port: usize) -> [u8; 6] {
        self.macs[port]
    }
    fn rx_burst(&mut self, port: usize, bufs: &mut Vec<MemBuf>) {
        while bufs.len() < MAX_BURST {
            match self.rx[port].pop_front() {
                Some(b) => bufs.push(b),
                None => break,
            }
        }
    }
    fn tx_burst(&mut self, port: usize, bufs: &mut Vec<MemBuf>) {
        let room = self.tx_capacity.saturating_sub(self.tx[port].len());
        let n = room.min(bufs.len());
        self.tx[port].extend(bufs.drain(..n));
    }
    fn alloc(&mut self, _port: usize, len: usize) -> Option<MemBuf> {
        self.spare_bufs = self.spare_bufs.checked_sub(1)?;
        MemBuf::zeroed(len)
    }
}

/// Queues shared by their owner on one thread: a benchmark fills in-memory
/// queues between two polls of the worker holding the other handle, or two
/// workers take turns on the same ports. One borrow per call.
impl<T: PacketIo> PacketIo for std::rc::Rc<std::cell::RefCell<T>> {
    type Buf = T::Buf;

    fn num_ports(&self) -> usize {
        self.borrow().num_ports()
    }
    fn port_mac(&self, port: usize) -> [u8; 6] {
        self.borrow().port_mac(port)
    }
    fn rx_burst(&mut self, port: usize, bufs: &mut Vec<T::Buf>) {
        self.borrow_mut().rx_burst(port, bufs)
    }
    fn tx_burst(&mut self, port: usize, bufs: &mut Vec<T::Buf>) {
        self.borrow_mut().tx_burst(port, bufs)
    }
    fn alloc(&mut self, port: usize, len: usize) -> Option<T::Buf> {
        self.borrow_mut().alloc(port, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reframe_grows_the_front_and_cuts_the_tail_or_changes_nothing() {
        let mut b = MemBuf::from_frame(&[1, 2, 3, 4]);
        assert!(!b.reframe(MEM_HEADROOM + 1, 2));
        assert!(!b.reframe(2, 7));
        assert_eq!((b.data(), b.headroom()), (&[1, 2, 3, 4][..], MEM_HEADROOM));
        assert!(b.reframe(2, 5));
        assert_eq!(
            (b.data(), b.headroom()),
            (&[0, 0, 1, 2, 3][..], MEM_HEADROOM - 2)
        );
        assert!(b.reframe(1, 6));
        assert_eq!(b.data(), &[0, 0, 0, 1, 2, 3]);
    }

    #[test]
    fn membuf_prepend_and_trim() {
        let mut b = MemBuf::from_frame(&[1, 2, 3]);
        assert!(b.prepend(2));
        assert_eq!(b.data().len(), 5);
        b.data_mut()[0] = 9;
        assert_eq!(b.data(), &[9, 0, 1, 2, 3]);
        assert!(b.trim_front(2));
        assert_eq!(b.data(), &[1, 2, 3]);
        assert!(!b.trim_front(4));
        assert!(!b.prepend(MEM_HEADROOM + 10));
        assert!(!b.truncate(4));
        assert!(b.truncate(2));
        assert_eq!(b.data(), &[1, 2]);
        assert!(b.truncate(0));
        assert!(b.data().is_empty());
    }

    #[test]
    fn memio_tx_capacity_leaves_unsent() {
        let mut io = MemIo::new(1);
        io.tx_capacity = 1;
        let mut out = vec![MemBuf::from_frame(&[1]), MemBuf::from_frame(&[2])];
        io.tx_burst(0, &mut out);
        assert_eq!(io.tx[0].len(), 1);
        assert_eq!(out.len(), 1);
    }
}
