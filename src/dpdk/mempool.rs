//! Pools of packet buffers (`rte_mempool` of `rte_mbuf`).

use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use super::eal;
use super::sys;
use super::DpdkError;

/// Whether pool creation failed for want of memory on its socket: no room
/// there for the pool (ENOMEM), or no memory at all, a socket EAL found
/// none on (EINVAL).
fn no_room(errno: i32) -> bool {
    use std::io::{Error, ErrorKind};
    matches!(
        Error::from_raw_os_error(errno).kind(),
        ErrorKind::OutOfMemory | ErrorKind::InvalidInput
    )
}

/// `RTE_PKTMBUF_HEADROOM`: room left in front of received frames, used by
/// IP-in-IP encapsulation.
pub const HEADROOM: u16 = 128;
/// `RTE_MBUF_DEFAULT_BUF_SIZE`: headroom plus 2048 bytes of frame, enough for
/// a 1500-byte MTU plus encapsulation in one segment.
pub const DEFAULT_DATA_ROOM: u16 = 2048 + HEADROOM;
// The DPDK headers built against agree (a DPDK configured otherwise fails
// the build, not the encapsulation).
const _: () = assert!(sys::RTE_PKTMBUF_HEADROOM == HEADROOM as u32);
const _: () =
    assert!(sys::RTE_MBUF_DEFAULT_DATAROOM + sys::RTE_PKTMBUF_HEADROOM == DEFAULT_DATA_ROOM as u32);

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
    /// Mbufs per lcore cache (0: none).
    cache: u32,
    data_room: u16,
    /// The NUMA socket it was made on ([`sys::SOCKET_ANY`]: any).
    socket: i32,
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
        Self::create(&eal::control(), name, n_mbufs, cache, data_room, socket)
    }

    /// [`Mempool::new`] under the control lock.
    fn create(
        control: &MutexGuard<'static, ()>,
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
        eal::ensure_ready(control)?;
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
            cache,
            data_room,
            socket,
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

    /// The NUMA socket the pool's memory is on ([`sys::SOCKET_ANY`]: any).
    pub fn socket(&self) -> i32 {
        self.socket
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
        // Mbufs still out (in a caller's hands or in a device's queues)
        // would dangle. And with per-lcore caches the count is no proof
        // that none is: a put raises its cache's length before it writes
        // the mbuf in, so a thread's last free may be under way. Such pools
        // are leaked (they stay counted live), as they are at exit anyway.
        if self.cache > 0 || self.available() != self.size {
            return;
        }
        // SAFETY: no per-lcore cache, so every put goes to the ring, whose
        // count moves only once the entry is written: all mbufs are back
        // and no put is under way. This was the last handle (ports hold an
        // Arc), so nothing allocates from or frees into it any more.
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
            .field("socket", &self.socket)
            .finish()
    }
}

/// Pools made as ports ask for them, one per NUMA socket, all alike, so
/// that a NIC receives into memory on its own socket
/// ([`super::Port::open_on`]). A socket without room for one (no huge
/// pages reserved there) gets the pool of any socket instead, once: its
/// port's packets then cross between sockets, which its pool's
/// [`Mempool::socket`] tells.
pub struct SocketPools {
    name: String,
    n_mbufs: u32,
    cache: u32,
    data_room: u16,
    /// (socket asked for, the pool it got).
    made: Mutex<Vec<(i32, Arc<Mempool>)>>,
}

impl SocketPools {
    /// Pools named `name` (`name-s<socket>` on a socket; at most 15 bytes),
    /// each as [`Mempool::new`] makes them.
    pub fn new(name: &str, n_mbufs: u32, cache: u32, data_room: u16) -> SocketPools {
        SocketPools {
            name: name.to_string(),
            n_mbufs,
            cache,
            data_room,
            made: Mutex::new(Vec::new()),
        }
    }

    /// The pool for a device on NUMA `socket`, made on first asking: for
    /// a device whose socket is unknown ([`sys::SOCKET_ANY`], as for most
    /// virtual devices), the calling thread's socket's (in `pktdist run`,
    /// the control core's: where a pool of any socket would have been
    /// made); the pool of any socket when that socket has no room for one
    /// (or no memory at all). Other failures are errors.
    pub fn for_socket(&self, socket: i32) -> Result<Arc<Mempool>, DpdkError> {
        let control = eal::control();
        self.for_socket_locked(&control, socket)
    }

    /// [`SocketPools::for_socket`] under the control lock.
    pub(crate) fn for_socket_locked(
        &self,
        control: &MutexGuard<'static, ()>,
        socket: i32,
    ) -> Result<Arc<Mempool>, DpdkError> {
        let socket = match socket {
            // SAFETY: reads this thread's own EAL variable; SOCKET_ID_ANY
            // (as -1) on a thread EAL does not know.
            s if s < 0 => (unsafe { sys::rte_socket_id() }) as i32,
            s => s,
        }
        .max(sys::SOCKET_ANY);
        let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        let find = |made: &[(i32, Arc<Mempool>)], s| {
            made.iter()
                .find(|(asked, _)| *asked == s)
                .map(|(_, p)| Arc::clone(p))
        };
        if let Some(pool) = find(&made, socket) {
            return Ok(pool);
        }
        let make = |s: i32| {
            let name = match s {
                sys::SOCKET_ANY => self.name.clone(),
                s => format!("{}-s{s}", self.name),
            };
            Mempool::create(control, &name, self.n_mbufs, self.cache, self.data_room, s)
        };
        let pool = match make(socket) {
            Ok(pool) => pool,
            // No room on that socket (no huge pages reserved there): any
            // socket's pool. Any other failure (a name taken, no memzone
            // left) is the caller's to see, not to fall back from.
            Err(DpdkError::Call { errno, .. }) if socket != sys::SOCKET_ANY && no_room(errno) => {
                match find(&made, sys::SOCKET_ANY) {
                    Some(any) => any,
                    None => {
                        let any = make(sys::SOCKET_ANY)?;
                        made.push((sys::SOCKET_ANY, Arc::clone(&any)));
                        any
                    }
                }
            }
            Err(e) => return Err(e),
        };
        made.push((socket, Arc::clone(&pool)));
        Ok(pool)
    }

    /// The pools made so far, each once.
    pub fn pools(&self) -> Vec<Arc<Mempool>> {
        let made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        let mut pools: Vec<Arc<Mempool>> = Vec::new();
        for (_, p) in made.iter() {
            if !pools.iter().any(|q| Arc::ptr_eq(p, q)) {
                pools.push(Arc::clone(p));
            }
        }
        pools
    }
}
