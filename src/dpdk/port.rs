//! Ethernet ports: probing by device string, configuration with one
//! receive and one transmit queue per worker, statistics.

use std::ffi::{CStr, CString};
use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::eal;
use super::guard::{Gate, GUARDED_DRIVERS};
use super::mempool::{SocketPools, HEADROOM};
use super::sys;
use super::{DpdkError, Mempool};

/// Longest Ethernet frame at the default 1500-byte MTU (`RTE_ETHER_MAX_LEN`).
const MAX_FRAME: u16 = 1518;

/// How to set up a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSetup {
    /// Receive and transmit queues, one pair per worker.
    pub queues: u16,
    /// Receive descriptors per queue (DPDK may round it to the device's limits).
    pub rx_desc: u16,
    /// Transmit descriptors per queue.
    pub tx_desc: u16,
    /// Receive frames for any destination MAC, not only the port's own,
    /// broadcast and multicast ones.
    pub promiscuous: bool,
    /// Spread flows over the queues with RSS on IP addresses and TCP/UDP
    /// ports, when there are several queues and the device can.
    pub rss: bool,
    /// For a driver in [`super::GUARDED_DRIVERS`] (memif): give the port a
    /// gate, closed at first, so that an [`super::EventGuard`] keeps the
    /// driver's event handlers and its burst functions apart. The port then
    /// passes packets only while that guard has it open.
    pub guard_events: bool,
    /// The link's MTU (the port's `mtu`): the device is configured with
    /// it, or with the most that the device and one receive buffer take
    /// (frames arrive in one segment), whichever is less.
    pub mtu: u16,
}

impl Default for PortSetup {
    fn default() -> PortSetup {
        PortSetup {
            queues: 1,
            rx_desc: 1024,
            tx_desc: 1024,
            promiscuous: true,
            rss: true,
            guard_events: false,
            mtu: 1500,
        }
    }
}

/// Counters of `rte_eth_stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    pub ipackets: u64,
    pub opackets: u64,
    pub ibytes: u64,
    pub obytes: u64,
    /// Received frames the device dropped because no descriptor was free
    /// (the workers are too slow).
    pub imissed: u64,
    pub ierrors: u64,
    pub oerrors: u64,
    /// Receive failures for want of an mbuf (the mempool is too small).
    pub rx_nombuf: u64,
}

/// Link state of `rte_eth_link`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkStatus {
    pub up: bool,
    /// Mbit/s; 0 when unknown.
    pub speed_mbps: u32,
    pub full_duplex: bool,
    pub autoneg: bool,
}

/// A configured DPDK port, started by [`Port::open`]. Workers reach its
/// queues through [`PortQueue`]s, which keep it alive; it is stopped,
/// closed (and detached, if `open` hot-plugged it) when the last one goes.
pub struct Port {
    id: u16,
    name: String,
    driver: String,
    mac: [u8; 6],
    socket: i32,
    rss: bool,
    /// The MTU the device was configured with.
    mtu: u16,
    started: bool,
    /// One flag per queue pair: taken by a live PortQueue.
    /// Per queue index, the directions claimed ([`QueueDir`] bits).
    claimed: Box<[AtomicU8]>,
    /// The device `open` hot-plugged, to detach on drop.
    hotplugged: Option<NonNull<sys::rte_device>>,
    /// Set once the port is closed (on a failed `open`), so drop does not
    /// repeat it.
    closed: bool,
    /// The receive queues allocate from this pool: it must outlive them.
    pool: Arc<Mempool>,
    /// See [`PortSetup::guard_events`].
    gate: Option<Arc<Gate>>,
}

// SAFETY: the control-path calls a Port makes (configure, start, stop,
// stats, close) may come from any thread and are serialised by the control
// lock or need &mut self; the rte_device pointer is only passed back to
// DPDK under that lock.
unsafe impl Send for Port {}
// SAFETY: &Port only reads plain fields or makes read-only queries
// (statistics, link status) that touch no queue state; on some drivers a
// statistics read racing the data path may return slightly stale or torn
// counters, which is acceptable for statistics and never unsafe. Queue
// access goes through PortQueue, whose claim flag gives one thread at a
// time each queue.
unsafe impl Sync for Port {}

impl Port {
    /// Opens, configures and starts the port for `device`:
    ///
    /// * a port EAL already knows by that name (a PCI address given with
    ///   `-a`, e.g. `0000:01:00.0` or `01:00.0`, or a `--vdev`), or else
    /// * a device hot-plugged now with `rte_dev_probe`: a PCI address, or a
    ///   vdev string such as `net_ring0`, `net_pcap0,rx_pcap=in.pcap,tx_pcap=out.pcap`,
    ///   `net_memif0,role=server` or `net_af_packet0,iface=veth0`.
    ///
    /// Each of the `conf.queues` receive queues fills from `pool`, whose data
    /// room must hold a full 1518-byte frame after the headroom (no scatter).
    pub fn open(device: &str, conf: &PortSetup, pool: Arc<Mempool>) -> Result<Port, DpdkError> {
        Self::open_with(device, conf, |_, _| Ok(pool))
    }

    /// [`Port::open`] with its pool from `pools`: the pool of the device's
    /// NUMA socket, made there when the first port on that socket opens.
    pub fn open_on(device: &str, conf: &PortSetup, pools: &SocketPools) -> Result<Port, DpdkError> {
        Self::open_with(device, conf, |control, socket| {
            pools.for_socket_locked(control, socket)
        })
    }

    /// [`Port::open`] with the pool chosen, under the control lock, once
    /// the device is known: `pool_for` is given its NUMA socket.
    fn open_with(
        device: &str,
        conf: &PortSetup,
        pool_for: impl FnOnce(&MutexGuard<'static, ()>, i32) -> Result<Arc<Mempool>, DpdkError>,
    ) -> Result<Port, DpdkError> {
        if conf.queues == 0 || conf.rx_desc == 0 || conf.tx_desc == 0 {
            return Err(DpdkError::InvalidArgument(format!(
                "port {device}: queues and descriptor counts must be positive"
            )));
        }
        let name = port_name(device)?;
        let cname = CString::new(name.as_str()).map_err(|_| {
            DpdkError::InvalidArgument(format!("device {device:?} contains a NUL byte"))
        })?;
        let cdevice = CString::new(device).map_err(|_| {
            DpdkError::InvalidArgument(format!("device {device:?} contains a NUL byte"))
        })?;

        let control = eal::control();
        eal::ensure_ready(&control)?;
        let mut probed = false;
        // A device probed here is removed again when the open fails.
        let remove_probed = |probed: bool| {
            if probed {
                remove_probed_device(&cdevice);
            }
        };
        let id = match lookup(&cname) {
            Some(id) if owned().contains(&id) => {
                return Err(DpdkError::InvalidArgument(format!(
                    "port {device} is open already (one owner per port)"
                )))
            }
            Some(id) => id,
            None => {
                // SAFETY: EAL is ready (checked under the control lock, which
                // serialises hot-plug); the devargs string is valid and
                // copied by DPDK.
                let ret = unsafe { sys::rte_dev_probe(cdevice.as_ptr()) };
                if ret < 0 {
                    return Err(DpdkError::ret("rte_dev_probe", ret));
                }
                probed = true;
                match lookup(&cname) {
                    Some(id) => id,
                    None => {
                        remove_probed(probed);
                        return Err(DpdkError::NoSuchDevice(device.to_string()));
                    }
                }
            }
        };
        let info = match dev_info(id) {
            Ok(info) => info,
            Err(e) => {
                remove_probed(probed);
                return Err(e);
            }
        };
        // SAFETY: the port exists.
        let socket = unsafe { sys::rte_eth_dev_socket_id(id) };
        let pool = match pool_for(&control, socket) {
            Ok(pool) => pool,
            Err(e) => {
                remove_probed(probed);
                return Err(e);
            }
        };
        if let Err(e) = check_data_room(device, &pool) {
            remove_probed(probed);
            // The pool may go with the error, and frees itself under the
            // control lock.
            drop(control);
            return Err(e);
        }
        let driver = c_string(info.driver_name);
        let gate = (conf.guard_events && GUARDED_DRIVERS.contains(&driver.as_str()))
            .then(|| Arc::new(Gate::new(conf.queues)));
        let mut port = Port {
            id,
            name,
            driver,
            mac: [0; 6],
            socket,
            rss: false,
            mtu: 0,
            started: false,
            claimed: (0..conf.queues).map(|_| AtomicU8::new(0)).collect(),
            hotplugged: if probed {
                NonNull::new(info.device)
            } else {
                None
            },
            closed: false,
            pool,
            gate,
        };
        eal::retain();
        owned().push(id);
        match port.configure(&info, conf) {
            Ok(()) => {
                drop(control);
                Ok(port)
            }
            Err(e) => {
                port.close_locked();
                drop(control);
                Err(e)
            }
        }
    }

    /// Configure, set up queues, start; on error the caller closes.
    fn configure(
        &mut self,
        info: &sys::rte_eth_dev_info,
        conf: &PortSetup,
    ) -> Result<(), DpdkError> {
        let id = self.id;
        let q = conf.queues;
        if q > info.max_rx_queues || q > info.max_tx_queues {
            return Err(DpdkError::InvalidArgument(format!(
                "port {} ({}): {q} queues requested, device has {} rx and {} tx",
                self.name, self.driver, info.max_rx_queues, info.max_tx_queues
            )));
        }
        let mut eth_conf = sys::rte_eth_conf::default();
        // SAFETY: a plain-data constant from the shim.
        let rss_hf = unsafe { sys::pktdist_rss_hf_ip_tcp_udp() } & info.flow_type_rss_offloads;
        if conf.rss && q > 1 && rss_hf != 0 {
            eth_conf.rxmode.mq_mode = sys::rte_eth_rx_mq_mode::RTE_ETH_MQ_RX_RSS;
            eth_conf.rx_adv_conf.rss_conf.rss_hf = rss_hf;
            self.rss = true;
        }
        self.mtu = device_mtu(info, conf.mtu, self.pool.data_room() - HEADROOM);
        eth_conf.rxmode.mtu = u32::from(self.mtu);
        // SAFETY: the port exists; eth_conf is a valid, initialised struct
        // that DPDK copies.
        let ret = unsafe { sys::rte_eth_dev_configure(id, q, q, &eth_conf) };
        if ret < 0 {
            return Err(DpdkError::ret("rte_eth_dev_configure", ret));
        }
        let (mut rxd, mut txd) = (conf.rx_desc, conf.tx_desc);
        // SAFETY: the port is configured; both pointers are to live u16s.
        let ret = unsafe { sys::rte_eth_dev_adjust_nb_rx_tx_desc(id, &mut rxd, &mut txd) };
        if ret < 0 {
            return Err(DpdkError::ret("rte_eth_dev_adjust_nb_rx_tx_desc", ret));
        }
        for qi in 0..q {
            // SAFETY: the port is configured with q queues; NULL rx_conf
            // means the driver's defaults; the pool outlives the port
            // (held in self.pool).
            let ret = unsafe {
                sys::rte_eth_rx_queue_setup(
                    id,
                    qi,
                    rxd,
                    self.socket as u32,
                    std::ptr::null(),
                    self.pool.as_ptr(),
                )
            };
            if ret < 0 {
                return Err(DpdkError::ret("rte_eth_rx_queue_setup", ret));
            }
            // SAFETY: as above, NULL tx_conf for the driver's defaults.
            let ret = unsafe {
                sys::rte_eth_tx_queue_setup(id, qi, txd, self.socket as u32, std::ptr::null())
            };
            if ret < 0 {
                return Err(DpdkError::ret("rte_eth_tx_queue_setup", ret));
            }
        }
        let mut addr = MaybeUninit::<sys::rte_ether_addr>::zeroed();
        // SAFETY: the port exists; addr is writable.
        let ret = unsafe { sys::rte_eth_macaddr_get(id, addr.as_mut_ptr()) };
        if ret < 0 {
            return Err(DpdkError::ret("rte_eth_macaddr_get", ret));
        }
        // SAFETY: zero-initialised, and filled in on success.
        self.mac = unsafe { addr.assume_init() }.addr_bytes;
        self.start_locked()?;
        // Set either way: a driver may start promiscuous (af_packet on an
        // interface left so), and some virtual devices have no filter to
        // open or close (not an error).
        let (ret, op) = if conf.promiscuous {
            // SAFETY: the port exists.
            let ret = unsafe { sys::rte_eth_promiscuous_enable(id) };
            (ret, "rte_eth_promiscuous_enable")
        } else {
            // SAFETY: the port exists.
            let ret = unsafe { sys::rte_eth_promiscuous_disable(id) };
            (ret, "rte_eth_promiscuous_disable")
        };
        if ret < 0 && ret != -ENOTSUP {
            return Err(DpdkError::ret(op, ret));
        }
        Ok(())
    }

    fn start_locked(&mut self) -> Result<(), DpdkError> {
        // SAFETY: the port is configured with its queues set up.
        let ret = unsafe { sys::rte_eth_dev_start(self.id) };
        if ret < 0 {
            return Err(DpdkError::ret("rte_eth_dev_start", ret));
        }
        self.started = true;
        Ok(())
    }

    /// Restarts a stopped port. Needs exclusive access: no worker may poll it.
    pub fn start(&mut self) -> Result<(), DpdkError> {
        let _control = eal::control();
        if self.started {
            return Ok(());
        }
        self.start_locked()
    }

    /// Stops the port; received frames in its queues stay there until it
    /// is started again or closed. Needs exclusive access: `&mut` on a port
    /// shared with workers is only available once their [`PortQueue`]s are
    /// dropped (`Arc::get_mut`).
    pub fn stop(&mut self) -> Result<(), DpdkError> {
        let _control = eal::control();
        self.stop_locked()
    }

    fn stop_locked(&mut self) -> Result<(), DpdkError> {
        if !self.started {
            return Ok(());
        }
        // SAFETY: the port is started; &mut self means no queue is in use.
        let ret = unsafe { sys::rte_eth_dev_stop(self.id) };
        if ret < 0 {
            return Err(DpdkError::ret("rte_eth_dev_stop", ret));
        }
        self.started = false;
        Ok(())
    }

    /// Stop, close and detach, with the control lock held.
    fn close_locked(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        // DPDK does not close a started port: one that fails to stop is
        // left as it is (still owned, still counted live), and said so.
        if let Err(e) = self.stop_locked() {
            log::error!(
                "port {} ({}): not closed, it did not stop: {e}",
                self.name,
                self.driver
            );
            return;
        }
        // SAFETY: the port exists, is stopped and no queue is in use (we
        // are its only owner); after close the id is not used again by
        // this Port.
        unsafe { sys::rte_eth_dev_close(self.id) };
        if let Some(dev) = self.hotplugged.take() {
            // SAFETY: the device was probed by `open` and nothing else
            // references it now that its port is closed.
            unsafe { sys::rte_dev_remove(dev.as_ptr()) };
        }
        owned().retain(|&id| id != self.id);
        eal::release();
    }

    /// DPDK port id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// The device name (the device string up to its first comma).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver, e.g. `net_ring`, `net_ixgbe`.
    pub fn driver(&self) -> &str {
        &self.driver
    }

    /// The port's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Number of receive/transmit queue pairs.
    pub fn queues(&self) -> u16 {
        self.claimed.len() as u16
    }

    /// The MTU the device was configured with ([`PortSetup::mtu`]).
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Whether RSS spreads received flows over the queues. When false with
    /// several queues, every frame arrives on queue 0.
    pub fn rss(&self) -> bool {
        self.rss
    }

    /// NUMA socket of the device (-1 when unknown).
    pub fn socket(&self) -> i32 {
        self.socket
    }

    /// Whether the port is started.
    pub fn is_started(&self) -> bool {
        self.started
    }

    /// The pool the receive queues fill from.
    pub fn pool(&self) -> &Arc<Mempool> {
        &self.pool
    }

    /// Whether the port has a gate ([`PortSetup::guard_events`]).
    pub fn is_guarded(&self) -> bool {
        self.gate.is_some()
    }

    pub(crate) fn gate(&self) -> Option<&Arc<Gate>> {
        self.gate.as_ref()
    }

    /// The device's counters.
    pub fn stats(&self) -> Result<DeviceStats, DpdkError> {
        let mut s = MaybeUninit::<sys::rte_eth_stats>::zeroed();
        // SAFETY: the port is open (we are alive); s is writable.
        let ret = unsafe { sys::rte_eth_stats_get(self.id, s.as_mut_ptr()) };
        if ret < 0 {
            return Err(DpdkError::ret("rte_eth_stats_get", ret));
        }
        // SAFETY: zero-initialised plain integers, filled in on success.
        let s = unsafe { s.assume_init() };
        Ok(DeviceStats {
            ipackets: s.ipackets,
            opackets: s.opackets,
            ibytes: s.ibytes,
            obytes: s.obytes,
            imissed: s.imissed,
            ierrors: s.ierrors,
            oerrors: s.oerrors,
            rx_nombuf: s.rx_nombuf,
        })
    }

    /// Zeroes the device's counters (`&mut`: some drivers keep them in
    /// plain per-queue fields their data path writes).
    pub fn reset_stats(&mut self) -> Result<(), DpdkError> {
        // SAFETY: the port is open.
        let ret = unsafe { sys::rte_eth_stats_reset(self.id) };
        if ret < 0 {
            return Err(DpdkError::ret("rte_eth_stats_reset", ret));
        }
        Ok(())
    }

    /// The link state, without waiting for negotiation.
    pub fn link(&self) -> Result<LinkStatus, DpdkError> {
        let mut l = sys::rte_eth_link::default();
        // SAFETY: the port is open; l is writable.
        let ret = unsafe { sys::rte_eth_link_get_nowait(self.id, &mut l) };
        if ret < 0 {
            return Err(DpdkError::ret("rte_eth_link_get_nowait", ret));
        }
        Ok(LinkStatus {
            up: l.link_status() != 0,
            speed_mbps: if l.link_speed == u32::MAX {
                0
            } else {
                l.link_speed
            },
            full_duplex: l.link_duplex() != 0,
            autoneg: l.link_autoneg() != 0,
        })
    }

    /// Claims queue pair `queue` for one worker. Fails with
    /// [`DpdkError::QueueInUse`] while another [`PortQueue`] holds it.
    pub fn queue(self: &Arc<Self>, queue: u16) -> Result<PortQueue, DpdkError> {
        self.queue_dir(queue, QueueDir::Both)
    }

    /// Claims one direction (or both) of queue pair `queue`. Receive and
    /// transmit queues are independent in DPDK, so one thread may receive
    /// on a queue while another transmits on the queue of the same index
    /// (the built-in traffic source feeds a worker that way on `net_ring`).
    pub fn queue_dir(self: &Arc<Self>, queue: u16, dir: QueueDir) -> Result<PortQueue, DpdkError> {
        let flag = self.claimed.get(usize::from(queue)).ok_or_else(|| {
            DpdkError::InvalidArgument(format!(
                "port {} has {} queues, no queue {queue}",
                self.name,
                self.claimed.len()
            ))
        })?;
        let bits = dir as u8;
        let prev = flag.fetch_or(bits, Ordering::AcqRel);
        if prev & bits != 0 {
            // Give back only the bits this call set; the holder keeps its own.
            flag.fetch_and(!(bits & !prev), Ordering::AcqRel);
            return Err(DpdkError::QueueInUse {
                port: self.id,
                queue,
            });
        }
        Ok(PortQueue {
            id: self.id,
            queue,
            dir: bits,
            mac: self.mac,
            gate: self.gate.clone(),
            port: Arc::clone(self),
        })
    }
}

/// Which directions of a queue pair a [`PortQueue`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum QueueDir {
    Rx = 1,
    Tx = 2,
    Both = 3,
}

impl Drop for Port {
    fn drop(&mut self) {
        let _control = eal::control();
        self.close_locked();
    }
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("driver", &self.driver)
            .field("queues", &self.claimed.len())
            .field("rss", &self.rss)
            .finish()
    }
}

/// Exclusive use of one receive/transmit queue pair of a port by one
/// worker. Keeps the port open; frees the queue for another claim on drop.
pub struct PortQueue {
    pub(crate) id: u16,
    pub(crate) queue: u16,
    /// [`QueueDir`] bits held.
    pub(crate) dir: u8,
    pub(crate) mac: [u8; 6],
    /// The port's gate, if it has one.
    pub(crate) gate: Option<Arc<Gate>>,
    port: Arc<Port>,
}

impl PortQueue {
    /// The port.
    pub fn port(&self) -> &Arc<Port> {
        &self.port
    }

    /// The queue pair's index.
    pub fn queue(&self) -> u16 {
        self.queue
    }
}

impl Drop for PortQueue {
    fn drop(&mut self) {
        if let Some(f) = self.port.claimed.get(usize::from(self.queue)) {
            f.fetch_and(!self.dir, Ordering::AcqRel);
        }
    }
}

impl std::fmt::Debug for PortQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortQueue")
            .field("port", &self.id)
            .field("queue", &self.queue)
            .finish()
    }
}

/// The ethdev name DPDK gives `device`: the devargs up to the first comma,
/// with a PCI address missing its domain completed (`01:00.0` becomes
/// `0000:01:00.0`).
fn port_name(device: &str) -> Result<String, DpdkError> {
    let name = device.split(',').next().unwrap_or("").trim();
    if name.is_empty() {
        return Err(DpdkError::InvalidArgument(format!(
            "empty device name in {device:?}"
        )));
    }
    // DPDK names a PCI device by its full address in lower case.
    if is_short_pci(name) {
        return Ok(format!("0000:{}", name.to_ascii_lowercase()));
    }
    if name.len() == 12 && name.as_bytes()[4] == b':' && is_short_pci(&name[5..]) {
        return Ok(name.to_ascii_lowercase());
    }
    Ok(name.to_string())
}

/// `BB:DD.F` in hex.
fn is_short_pci(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 7
        && b[2] == b':'
        && b[5] == b'.'
        && [0, 1, 3, 4, 6].iter().all(|&i| b[i].is_ascii_hexdigit())
}

/// The port ids a [`Port`] owns: one owner each, so that no two poll one
/// queue. Changed under the control lock.
static OWNED: Mutex<Vec<u16>> = Mutex::new(Vec::new());

fn owned() -> std::sync::MutexGuard<'static, Vec<u16>> {
    OWNED.lock().unwrap_or_else(|e| e.into_inner())
}

fn lookup(name: &CStr) -> Option<u16> {
    let mut id = 0u16;
    // SAFETY: EAL is ready (callers hold the control lock after checking);
    // name is a valid C string; id is writable.
    let ret = unsafe { sys::rte_eth_dev_get_port_by_name(name.as_ptr(), &mut id) };
    (ret == 0).then_some(id)
}

/// The MTU to configure a device with: `want`, or less where the device
/// takes less (its `max_mtu`, its largest frame) or where a frame would not
/// fit one receive buffer of `room` bytes. A frame's overhead is DPDK's
/// for the device: what its largest frame adds to its largest MTU, else
/// an Ethernet header and FCS; in a receive buffer, at least that and two
/// VLAN tags (ixgbe receives into several buffers, which pktdist drops,
/// once a frame of the MTU with two tags would not fit one).
fn device_mtu(info: &sys::rte_eth_dev_info, want: u16, room: u16) -> u16 {
    const ETHER_OVERHEAD: u32 = 18;
    const TWO_VLAN_TAGS: u32 = 8;
    let max_mtu = u32::from(info.max_mtu);
    let overhead = if info.max_mtu != u16::MAX && info.max_rx_pktlen > max_mtu {
        info.max_rx_pktlen - max_mtu
    } else {
        ETHER_OVERHEAD
    };
    let mtu = u32::from(want)
        .min(max_mtu)
        .min(info.max_rx_pktlen.saturating_sub(overhead))
        .min(u32::from(room).saturating_sub(overhead.max(ETHER_OVERHEAD + TWO_VLAN_TAGS)))
        .max(u32::from(info.min_mtu));
    u16::try_from(mtu).unwrap_or(u16::MAX)
}

/// Whether `pool`'s data room holds a full frame after the headroom (ports
/// run without scatter).
fn check_data_room(device: &str, pool: &Mempool) -> Result<(), DpdkError> {
    if pool.data_room() < HEADROOM + MAX_FRAME {
        return Err(DpdkError::InvalidArgument(format!(
            "port {device}: mempool {} has {} bytes per mbuf, less than {} \
             (headroom plus a full frame; ports run without scatter)",
            pool.name(),
            pool.data_room(),
            HEADROOM + MAX_FRAME
        )));
    }
    Ok(())
}

/// Removes the device `rte_dev_probe(devargs)` probed, by the bus and name
/// its devargs give. Called under the control lock (which serialises
/// hot-plug) before any port of ours uses the device.
fn remove_probed_device(devargs: &CStr) {
    // SAFETY: EAL is ready (the caller holds the control lock); the string
    // is valid and only read; the device is no port's of ours.
    let ret = unsafe { sys::pktdist_dev_remove_probed(devargs.as_ptr()) };
    if ret < 0 {
        log::warn!(
            "device {devargs:?} probed for a port that did not open stays probed: {}",
            DpdkError::ret("rte_eal_hotplug_remove", ret)
        );
    }
}

fn dev_info(id: u16) -> Result<sys::rte_eth_dev_info, DpdkError> {
    let mut info = sys::rte_eth_dev_info::default();
    // SAFETY: the port exists; info is writable.
    let ret = unsafe { sys::rte_eth_dev_info_get(id, &mut info) };
    if ret < 0 {
        return Err(DpdkError::ret("rte_eth_dev_info_get", ret));
    }
    Ok(info)
}

fn c_string(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: a non-null driver name from DPDK is a static C string.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// ENOTSUP on Linux: DPDK returns -ENOTSUP for operations a driver lacks.
const ENOTSUP: i32 = 95;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names() {
        assert_eq!(port_name("net_ring0").unwrap(), "net_ring0");
        assert_eq!(
            port_name("net_pcap0,rx_pcap=a.pcap,tx_pcap=b.pcap").unwrap(),
            "net_pcap0"
        );
        assert_eq!(port_name("01:00.0").unwrap(), "0000:01:00.0");
        assert_eq!(port_name("0000:3b:00.1").unwrap(), "0000:3b:00.1");
        assert_eq!(port_name("3B:00.1").unwrap(), "0000:3b:00.1");
        assert_eq!(port_name("0000:3B:00.1,x=1").unwrap(), "0000:3b:00.1");
        assert!(port_name("").is_err());
        assert!(port_name(",iface=x").is_err());
        assert!(!is_short_pci("net_ri0"));
    }

    /// The device's MTU: the port's, within what the device and one
    /// 2,048-byte buffer take.
    #[test]
    fn device_mtus() {
        let info = |max_mtu: u16, max_rx_pktlen: u32| sys::rte_eth_dev_info {
            max_mtu,
            max_rx_pktlen,
            min_mtu: 68,
            ..Default::default()
        };
        // A NIC whose largest frame is 9728 bytes with an MTU of 9710.
        assert_eq!(device_mtu(&info(9710, 9728), 1500, 2048), 1500);
        assert_eq!(device_mtu(&info(9710, 9728), 1600, 2048), 1600);
        // At most a frame with two VLAN tags in one 2,048-byte buffer.
        assert_eq!(device_mtu(&info(9710, 9728), 9000, 2048), 2022);
        // A driver that gives only its largest frame (1518 bytes).
        assert_eq!(device_mtu(&info(u16::MAX, 1518), 1600, 2048), 1500);
        assert_eq!(device_mtu(&info(u16::MAX, 65535), 1600, 2048), 1600);
        // One that counts a VLAN tag in its overhead (22 bytes).
        assert_eq!(device_mtu(&info(1500, 1522), 1500, 2048), 1500);
        assert_eq!(device_mtu(&info(9000, 9022), 9000, 2048), 2022);
        // One that counts two (26 bytes: i40e).
        assert_eq!(device_mtu(&info(9702, 9728), 9000, 2048), 2022);
    }
}
