//! Pools of packet buffers (`rte_mempool` of `rte_mbuf`).

use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::Arc;

use super::eal;
use super::sys;
use super::DpdkError;

/// `RTE_PKTMBUF_HEADROOM`: room left in front of received frames, used by
/// IP-in-IP encapsulation.
pub const HEADROOM: u16 = 128;
/// `RTE_MBUF_DEFAULT_BUF_SIZE`: headroom plus 2048 bytes of frame, enough for
/// a 1500-byte MTU plus encapsulation in one segment.
pub const DEFAULT_DATA_ROOM: u16 = 2048 + HEADROOM;

/// A packet-buffer pool. Share it with `Arc`: ports keep the pool their
/// receive queues fill from alive.
///
/// Dropping the last handle frees the pool only when every mbuf is back in
/// it; otherwise the pool is leaked on purpose (mbufs still out would point
/// into freed memory) and [`super::Eal::cleanup`] is refused.
pub struct Mempool {
    raw: NonNull<sys::rte_mempool>,
    name: String,
    size: u32,
    data_room: u16,
}

// SAFETY: rte_pktmbuf_pool_create uses the platform's mbuf pool ops
// (ring_mp_mc unless --mbuf-pool-ops-name says otherwise), and mbuf pool ops
// must be multi-producer/multi-consumer because any lcore may free an mbuf
// (a transmit completion frees on whichever core transmitted): allocating
// and freeing from any thread is safe, and the handle itself is immutable.
unsafe impl Send for Mempool {}
// SAFETY: as above; every method takes &self and DPDK synchronises.
unsafe impl Sync for Mempool {}

impl Mempool {
    /// Creates a pool of `n_mbufs` mbufs (2^k - 1 is most memory-efficient)
    /// with a per-lcore cache of `cache` mbufs (0 to 512, at most
    /// n_mbufs / 1.5), `data_room` bytes of buffer each (headroom included;
    /// [`DEFAULT_DATA_ROOM`] normally) on NUMA `socket` ([`sys::SOCKET_ANY`]
    /// for any). `name` must be unique in the process and under 26 bytes.
    pub fn new(
        name: &str,
        n_mbufs: u32,
        cache: u32,
        data_room: u16,
        socket: i32,
    ) -> Result<Arc<Mempool>, DpdkError> {
        if data_room <= HEADROOM {
            return Err(DpdkError::InvalidArgument(format!(
                "mempool {name}: data room {data_room} leaves no room after the {HEADROOM}-byte headroom"
            )));
        }
        if n_mbufs == 0 {
            return Err(DpdkError::InvalidArgument(format!(
                "mempool {name}: no mbufs"
            )));
        }
        let cname = CString::new(name).map_err(|_| {
            DpdkError::InvalidArgument(format!("mempool name {name:?} contains a NUL byte"))
        })?;
        let control = eal::control();
        eal::ensure_ready(&control)?;
        // SAFETY: EAL is initialised (checked under the control lock, which
        // also keeps cleanup out); the name is a valid C string that DPDK
        // copies.
        let raw = unsafe {
            sys::rte_pktmbuf_pool_create(cname.as_ptr(), n_mbufs, cache, 0, data_room, socket)
        };
        let raw = NonNull::new(raw).ok_or_else(|| DpdkError::last("rte_pktmbuf_pool_create"))?;
        eal::retain();
        Ok(Arc::new(Mempool {
            raw,
            name: name.to_string(),
            size: n_mbufs,
            data_room,
        }))
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of mbufs the pool was created with.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Bytes of buffer per mbuf, headroom included.
    pub fn data_room(&self) -> u16 {
        self.data_room
    }

    /// Free mbufs, those in per-lcore caches included.
    pub fn available(&self) -> u32 {
        // SAFETY: the pool is alive (we hold it); the count only reads.
        unsafe { sys::rte_mempool_avail_count(self.raw.as_ptr()) }
    }

    /// Mbufs currently allocated.
    pub fn in_use(&self) -> u32 {
        // SAFETY: as in `available`.
        unsafe { sys::rte_mempool_in_use_count(self.raw.as_ptr()) }
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::rte_mempool {
        self.raw.as_ptr()
    }
}

impl Drop for Mempool {
    fn drop(&mut self) {
        let _control = eal::control();
        if self.available() != self.size {
            // Mbufs are still out (in a caller's hands or in a device's
            // queues): freeing would leave them dangling. Leak the pool; it
            // stays counted as live.
            return;
        }
        // SAFETY: every mbuf is back in the pool and this was the last
        // handle (ports hold an Arc), so nothing can allocate from or free
        // into it any more.
        unsafe { sys::rte_mempool_free(self.raw.as_ptr()) };
        eal::release();
    }
}

impl std::fmt::Debug for Mempool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mempool")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("data_room", &self.data_room)
            .finish()
    }
}
