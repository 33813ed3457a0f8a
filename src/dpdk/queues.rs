//! A worker's queues: the [`PacketIo`] the worker loop runs on under DPDK.

use std::sync::Arc;

use super::sys;
use super::{DpdkError, Mbuf, Port, PortQueue, QueueDir};
use crate::datapath::pktio::{PacketIo, MAX_BURST};

/// One worker's queue pair on each of its ports. Index `i` of the
/// [`PacketIo`] methods is the `i`-th queue given to [`PortQueues::new`].
///
/// Burst calls never allocate as long as the caller's `Vec` has capacity
/// for [`MAX_BURST`] packets; mbuf pointers go straight between the `Vec`'s
/// storage and the driver.
#[derive(Debug)]
pub struct PortQueues {
    queues: Vec<PortQueue>,
}

impl PortQueues {
    /// From queues claimed with [`Port::queue`].
    pub fn new(queues: Vec<PortQueue>) -> PortQueues {
        PortQueues { queues }
    }

    /// Claims queue pair `queue` on every port in `ports`, in that order:
    /// worker `w` of `n` typically calls this with `queue = w` on ports
    /// opened with `n` queues.
    pub fn claim(ports: &[Arc<Port>], queue: u16) -> Result<PortQueues, DpdkError> {
        let queues = ports
            .iter()
            .map(|p| p.queue(queue))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PortQueues { queues })
    }

    /// The queues, in [`PacketIo`] port order.
    pub fn queues(&self) -> &[PortQueue] {
        &self.queues
    }
}

impl PacketIo for PortQueues {
    type Buf = Mbuf;

    fn num_ports(&self) -> usize {
        self.queues.len()
    }

    fn port_mac(&self, port: usize) -> [u8; 6] {
        self.queues.get(port).map_or([0; 6], |q| q.mac)
    }

    #[inline]
    fn rx_burst(&mut self, port: usize, bufs: &mut Vec<Mbuf>) {
        let Some(q) = self.queues.get(port) else {
            return;
        };
        if q.dir & QueueDir::Rx as u8 == 0 {
            return;
        }
        let room = MAX_BURST.saturating_sub(bufs.len());
        if room == 0 {
            return;
        }
        bufs.reserve(room);
        if let Some(g) = &q.gate {
            if !g.enter(q.queue, false) {
                return;
            }
        }
        let len = bufs.len();
        // Mbuf is a transparent non-null `*mut rte_mbuf`: the spare
        // capacity is the pointer array DPDK fills.
        let dst = bufs
            .spare_capacity_mut()
            .as_mut_ptr()
            .cast::<*mut sys::rte_mbuf>();
        // SAFETY: this PortQueue holds the queue exclusively (claim flag)
        // and keeps the port open; dst has room for `room` pointers
        // (reserved above, room <= MAX_BURST fits u16).
        let n = unsafe { sys::pktdist_rx_burst(q.id, q.queue, dst, room as u16) };
        if let Some(g) = &q.gate {
            g.leave(q.queue, false);
        }
        let n = usize::from(n).min(room);
        // SAFETY: DPDK wrote n valid, non-null mbuf pointers, now owned by
        // us alone, into the first n spare slots.
        unsafe { bufs.set_len(len + n) };
    }

    #[inline]
    fn tx_burst(&mut self, port: usize, bufs: &mut Vec<Mbuf>) {
        let Some(q) = self.queues.get(port) else {
            return;
        };
        if q.dir & QueueDir::Tx as u8 == 0 {
            return;
        }
        let len = bufs.len();
        if len == 0 {
            return;
        }
        if let Some(g) = &q.gate {
            if !g.enter(q.queue, true) {
                return;
            }
        }
        let want = len.min(usize::from(u16::MAX)) as u16;
        let p = bufs.as_mut_ptr();
        // SAFETY: exclusive queue as in rx_burst; p points to `len` owned
        // mbufs laid out as `*mut rte_mbuf` (transparent), of which the
        // first `want` are offered.
        let sent = usize::from(unsafe { sys::pktdist_tx_burst(q.id, q.queue, p.cast(), want) });
        if let Some(g) = &q.gate {
            g.leave(q.queue, true);
        }
        let sent = sent.min(len);
        if sent == 0 {
            return;
        }
        // SAFETY: the first `sent` mbufs now belong to the driver: shift the
        // unsent tail over them bitwise (no drop runs on the sent ones) and
        // shorten the Vec, so each remaining mbuf is owned exactly once.
        unsafe {
            std::ptr::copy(p.add(sent), p, len - sent);
            bufs.set_len(len - sent);
        }
    }

    /// An mbuf from the pool of `port` (of its NUMA socket, in `pktdist
    /// run`: the memory its NIC reads the frame from), sized to `len`.
    fn alloc(&mut self, port: usize, len: usize) -> Option<Mbuf> {
        let pool = self.queues.get(port)?.port().pool();
        let mut m = Mbuf::alloc(pool)?;
        m.resize(len).then_some(m)
    }
}
