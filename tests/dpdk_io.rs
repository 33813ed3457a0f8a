//! The DPDK layer under a real EAL (no hugepages, no PCI): virtual ring and
//! pcap ports, mbufs, mempools and worker registration.
//!
//! EAL can start once per process, so it is shared through a `OnceLock`;
//! every test opens its own port and mempool under a unique name.
#![cfg(feature = "dpdk")]

mod common;

use std::sync::{Arc, OnceLock};

use common::{read_pcap, test_eal_args, unique, write_pcap, TempDir};

use pktdist::datapath::pktio::{PacketBuf, PacketIo, MAX_BURST};
use pktdist::dpdk::{
    lcore_id, spawn_worker, DpdkError, Eal, Mbuf, Mempool, Port, PortQueues, PortSetup, QueueDir,
    SocketPools, DEFAULT_DATA_ROOM, HEADROOM, SOCKET_ANY,
};

fn eal_args() -> Vec<String> {
    test_eal_args("pktdist-dpdk-io", "warning")
}

fn eal() -> &'static Eal {
    static EAL: OnceLock<Eal> = OnceLock::new();
    EAL.get_or_init(|| Eal::init(&eal_args()).expect("EAL init"))
}

fn pool(n: u32) -> Arc<Mempool> {
    eal();
    Mempool::new(&unique("tp"), n, 0, DEFAULT_DATA_ROOM, SOCKET_ANY).expect("mempool")
}

fn ring_port(queues: u16, pool: &Arc<Mempool>) -> Arc<Port> {
    let conf = PortSetup {
        queues,
        ..PortSetup::default()
    };
    Arc::new(Port::open(&unique("net_ring_t"), &conf, pool.clone()).expect("open net_ring"))
}

/// An Ethernet frame of `len` bytes whose content depends on `seed`.
fn frame(seed: u8, len: usize) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f
}

/// Receives from `io` port 0 until `want` packets arrived or the queue
/// stays empty for a while.
fn receive(io: &mut PortQueues, want: usize) -> Vec<Mbuf> {
    let mut got = Vec::new();
    let mut idle = 0;
    while got.len() < want && idle < 1000 {
        let mut burst = Vec::with_capacity(MAX_BURST);
        io.rx_burst(0, &mut burst);
        if burst.is_empty() {
            idle += 1;
            std::thread::yield_now();
        }
        got.extend(burst);
    }
    got
}

#[test]
fn ring_port_loops_frames_back_byte_exact() {
    let pool = pool(511);
    let port = ring_port(1, &pool);
    assert_eq!(port.driver(), "net_ring");
    let mut io = PortQueues::claim(std::slice::from_ref(&port), 0).expect("claim");
    assert_eq!(io.num_ports(), 1);
    assert_eq!(io.port_mac(0), port.mac());

    let lens = [60usize, 64, 1514, 100, 333, 1500];
    let frames: Vec<Vec<u8>> = (0..45)
        .map(|i| frame(i as u8, lens[i % lens.len()]))
        .collect();
    let mut out = Vec::with_capacity(frames.len());
    for f in &frames {
        out.push(Mbuf::from_frame(&pool, f).expect("from_frame"));
    }
    io.tx_burst(0, &mut out);
    assert!(out.is_empty(), "{} frames not sent", out.len());

    let got = receive(&mut io, frames.len());
    assert_eq!(got.len(), frames.len());
    for (m, f) in got.iter().zip(&frames) {
        assert_eq!(m.data(), &f[..]);
        assert_eq!(m.nb_segs(), 1);
        assert_eq!(m.pkt_len() as usize, f.len());
    }
    drop(got);
    assert_eq!(pool.available(), pool.size());
}

#[test]
fn prepend_and_trim_on_real_mbufs() {
    let pool = pool(63);
    let f = frame(7, 98);
    let mut m = Mbuf::from_frame(&pool, &f).expect("from_frame");
    assert_eq!(m.headroom(), usize::from(HEADROOM));
    assert_eq!(m.data(), &f[..]);

    assert!(m.prepend(20));
    assert_eq!(m.data().len(), 118);
    assert_eq!(m.pkt_len(), 118);
    assert_eq!(m.headroom(), usize::from(HEADROOM) - 20);
    assert_eq!(&m.data()[20..], &f[..]);
    m.data_mut()[..20].fill(0xee);
    assert!(m.data()[..20].iter().all(|&b| b == 0xee));

    assert!(m.trim_front(34));
    assert_eq!(m.data(), &f[14..]);
    assert!(m.prepend(14));
    m.data_mut()[..14].copy_from_slice(&f[..14]);
    assert_eq!(m.data(), &f[..]);

    // Refusals change nothing.
    assert!(!m.prepend(m.headroom() + 1));
    assert!(!m.trim_front(f.len() + 1));
    assert!(!m.truncate(f.len() + 1));
    assert_eq!(m.data(), &f[..]);
    assert!(m.truncate(60));
    assert_eq!(m.data(), &f[..60]);
    assert_eq!(m.pkt_len(), 60);
    assert!(m.prepend(m.headroom()));
    assert_eq!(m.headroom(), 0);
    assert!(m.trim_front(m.data().len()));
    assert!(m.data().is_empty());

    // Grow the front and cut the tail in one step, or refuse unchanged.
    let mut r = Mbuf::from_frame(&pool, &f).expect("from_frame");
    assert!(!r.reframe(r.headroom() + 1, 20));
    assert!(!r.reframe(20, f.len() + 21));
    assert_eq!((r.data(), r.headroom()), (&f[..], usize::from(HEADROOM)));
    assert!(r.reframe(20, 80));
    assert_eq!(
        (r.data().len(), r.pkt_len(), r.headroom()),
        (80, 80, usize::from(HEADROOM) - 20)
    );
    assert_eq!(&r.data()[20..], &f[..60]);
    assert!(r.reframe(14, 94));
    assert_eq!((r.data().len(), r.pkt_len()), (94, 94));
    assert_eq!(&r.data()[34..], &f[..60]);

    // Resize within the buffer only.
    let mut e = Mbuf::alloc(&pool).expect("alloc");
    assert!(e.data().is_empty());
    let room = e.tailroom();
    assert_eq!(room, usize::from(DEFAULT_DATA_ROOM - HEADROOM));
    assert!(!e.resize(room + 1));
    assert!(e.resize(room));
    assert_eq!(e.data().len(), room);
    assert!(e.resize(10));
    assert_eq!(e.tailroom(), room - 10);
    e.prefetch();

    let big = vec![0u8; room + 1];
    assert_eq!(
        Mbuf::from_frame(&pool, &big).unwrap_err(),
        DpdkError::FrameTooLong {
            len: room + 1,
            room
        }
    );
    drop((m, e, r));
    assert_eq!(pool.available(), pool.size());
}

#[test]
fn pool_exhaustion_and_bulk_alloc_are_all_or_nothing() {
    let pool = pool(31);
    let mut v = Vec::new();
    assert!(Mbuf::alloc_bulk(&pool, &mut v, 20));
    assert_eq!(v.len(), 20);
    assert!(!Mbuf::alloc_bulk(&pool, &mut v, 12));
    assert_eq!(v.len(), 20);
    assert!(Mbuf::alloc_bulk(&pool, &mut v, 11));
    assert_eq!(pool.available(), 0);
    assert!(Mbuf::alloc(&pool).is_none());
    assert_eq!(
        Mbuf::from_frame(&pool, &[1]).unwrap_err(),
        DpdkError::PoolEmpty
    );
    v.truncate(5);
    assert_eq!(pool.available(), 26);
    assert_eq!(pool.in_use(), 5);
    drop(v);
    assert_eq!(pool.available(), 31);
}

#[test]
fn full_tx_ring_leaves_unsent_mbufs_which_free_on_drop() {
    let pool = pool(2047);
    let initial = pool.available();
    assert_eq!(initial, 2047);
    let port = ring_port(1, &pool);
    let mut io = PortQueues::claim(std::slice::from_ref(&port), 0).expect("claim");

    let total = 1500;
    let mut out = Vec::with_capacity(total);
    for i in 0..total {
        out.push(Mbuf::from_frame(&pool, &frame(i as u8, 64)).expect("from_frame"));
    }
    io.tx_burst(0, &mut out);
    let unsent = out.len();
    let sent = total - unsent;
    assert!(unsent > 0, "the ring took all {total} frames");
    assert!(sent > 0, "the ring took nothing");
    // The unsent ones are the tail, in order.
    assert_eq!(out[0].data(), &frame(sent as u8, 64)[..]);
    // A second try on a still-full ring sends nothing and keeps them all.
    io.tx_burst(0, &mut out);
    assert_eq!(out.len(), unsent);
    assert_eq!(pool.available(), initial - total as u32);

    drop(out);
    assert_eq!(pool.available(), initial - sent as u32);
    let stats = port.stats().expect("stats");
    assert_eq!(stats.opackets, sent as u64);

    let back = receive(&mut io, sent);
    assert_eq!(back.len(), sent);
    assert_eq!(back[0].data(), &frame(0, 64)[..]);
    drop(back);
    assert_eq!(pool.available(), initial);
}

/// A port open already is not opened again: two owners would poll one
/// queue from two threads.
#[test]
fn a_port_has_one_owner() {
    let pool = pool(255);
    let port = ring_port(1, &pool);
    let again = Port::open(port.name(), &PortSetup::default(), pool.clone()).unwrap_err();
    assert!(
        matches!(&again, DpdkError::InvalidArgument(m) if m.contains("open already")),
        "{again}"
    );
    assert!(port.link().expect("link").up, "the first is untouched");
}

#[test]
fn port_stats_count_packets() {
    let pool = pool(255);
    let mut port = ring_port(1, &pool);
    let mut io = PortQueues::claim(std::slice::from_ref(&port), 0).expect("claim");
    let link = port.link().expect("link");
    assert!(link.up);

    let frames: Vec<Vec<u8>> = (0..10).map(|i| frame(i, 60 + usize::from(i))).collect();
    let mut out: Vec<Mbuf> = frames
        .iter()
        .map(|f| Mbuf::from_frame(&pool, f).expect("from_frame"))
        .collect();
    io.tx_burst(0, &mut out);
    assert!(out.is_empty());
    let got = receive(&mut io, 10);
    assert_eq!(got.len(), 10);

    let s = port.stats().expect("stats");
    assert_eq!(s.opackets, 10);
    assert_eq!(s.ipackets, 10);
    assert_eq!(s.oerrors, 0);
    assert_eq!(s.rx_nombuf, 0);

    drop(io);
    Arc::get_mut(&mut port)
        .expect("the port's one owner")
        .reset_stats()
        .expect("reset");
    let s = port.stats().expect("stats");
    assert_eq!((s.ipackets, s.opackets), (0, 0));
}

#[test]
fn queues_are_claimed_exclusively_and_loop_per_queue() {
    let pool = pool(255);
    let port = ring_port(2, &pool);
    assert_eq!(port.queues(), 2);
    // net_ring has no RSS: with two queues it stays off.
    assert!(!port.rss());

    let q0 = port.queue(0).expect("claim 0");
    assert_eq!(
        port.queue(0).unwrap_err(),
        DpdkError::QueueInUse {
            port: port.id(),
            queue: 0
        }
    );
    assert!(matches!(port.queue(2), Err(DpdkError::InvalidArgument(_))));
    let mut w1 = PortQueues::claim(std::slice::from_ref(&port), 1).expect("claim 1");
    let mut w0 = PortQueues::new(vec![q0]);

    let mut out = vec![Mbuf::from_frame(&pool, &frame(1, 64)).expect("from_frame")];
    w1.tx_burst(0, &mut out);
    assert!(out.is_empty());
    assert!(
        receive(&mut w0, 1).is_empty(),
        "queue 1's frame came to queue 0"
    );
    let got = receive(&mut w1, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data(), &frame(1, 64)[..]);

    // An out-of-range port index does nothing.
    let mut none = Vec::with_capacity(MAX_BURST);
    w1.rx_burst(5, &mut none);
    assert!(none.is_empty());
    let mut keep = vec![Mbuf::from_frame(&pool, &frame(2, 64)).expect("from_frame")];
    w1.tx_burst(5, &mut keep);
    assert_eq!(keep.len(), 1);
    assert_eq!(w1.port_mac(5), [0; 6]);

    drop(w0);
    let again = port.queue(0).expect("reclaim after drop");
    assert_eq!(again.queue(), 0);
}

#[test]
fn rx_burst_fills_only_up_to_max_burst() {
    let pool = pool(255);
    let port = ring_port(1, &pool);
    let mut io = PortQueues::claim(std::slice::from_ref(&port), 0).expect("claim");
    let mut out: Vec<Mbuf> = (0..50)
        .map(|i| Mbuf::from_frame(&pool, &frame(i, 64)).expect("from_frame"))
        .collect();
    io.tx_burst(0, &mut out);
    assert!(out.is_empty());

    let mut bufs = Vec::with_capacity(MAX_BURST);
    bufs.push(Mbuf::from_frame(&pool, &frame(99, 64)).expect("from_frame"));
    io.rx_burst(0, &mut bufs);
    assert_eq!(bufs.len(), MAX_BURST);
    assert_eq!(bufs.capacity(), MAX_BURST, "rx_burst reallocated");
    assert_eq!(bufs[0].data(), &frame(99, 64)[..]);
    assert_eq!(bufs[1].data(), &frame(0, 64)[..]);
    io.rx_burst(0, &mut bufs);
    assert_eq!(bufs.len(), MAX_BURST);
    bufs.clear();
    let rest = receive(&mut io, 50 - (MAX_BURST - 1));
    assert_eq!(rest.len(), 50 - (MAX_BURST - 1));
}

#[test]
fn pcap_port_reads_and_writes_frames() {
    let dir = TempDir::new("dpdk-io");
    let input = dir.path("in.pcap");
    let output = dir.path("out.pcap");
    let frames: Vec<Vec<u8>> = (0..40)
        .map(|i| frame(i as u8, 60 + (i * 37) % 1455))
        .collect();
    write_pcap(&input, &frames);

    let pool = pool(511);
    let device = format!(
        "{},rx_pcap={},tx_pcap={}",
        unique("net_pcap_t"),
        input.display(),
        output.display()
    );
    let port =
        Arc::new(Port::open(&device, &PortSetup::default(), pool.clone()).expect("open net_pcap"));
    assert_eq!(port.driver(), "net_pcap");
    let mut io = PortQueues::claim(std::slice::from_ref(&port), 0).expect("claim");

    let mut got = receive(&mut io, frames.len());
    assert_eq!(got.len(), frames.len());
    for (m, f) in got.iter().zip(&frames) {
        assert_eq!(m.data(), &f[..]);
    }
    io.tx_burst(0, &mut got);
    assert!(got.is_empty());
    let s = port.stats().expect("stats");
    assert_eq!(s.ipackets, frames.len() as u64);
    assert_eq!(s.opackets, frames.len() as u64);
    let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
    assert_eq!(s.ibytes, bytes);
    assert_eq!(s.obytes, bytes);

    // Closing the port (last owner) flushes and closes the output file.
    drop(io);
    let port = Arc::try_unwrap(port).expect("sole owner");
    drop(port);
    assert_eq!(read_pcap(&output), frames);
    assert_eq!(pool.available(), pool.size());
}

#[test]
fn eal_init_is_once_and_cleanup_waits_for_users() {
    let eal = eal();
    assert_eq!(Eal::init(&eal_args()).expect("same args"), *eal);
    assert_eq!(
        Eal::init(&["--no-huge".to_string()]).unwrap_err(),
        DpdkError::AlreadyInitialized
    );
    assert!(Eal::is_ready());
    // This test's pool keeps EAL in use, whatever the other tests do.
    let _pool = pool(15);
    assert!(matches!(
        eal.clone().cleanup(),
        Err(DpdkError::Busy { live }) if live >= 1
    ));
    assert!(Eal::is_ready());
    assert!(!eal.cores().is_empty());
}

#[test]
fn bad_devices_and_pools_are_clear_errors() {
    let pool = pool(255);
    let e = Port::open("net_nosuchdriver0", &PortSetup::default(), pool.clone()).unwrap_err();
    assert!(
        matches!(
            e,
            DpdkError::Call {
                op: "rte_dev_probe",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("rte_dev_probe"), "{e}");

    let conf = PortSetup {
        queues: 0,
        ..PortSetup::default()
    };
    assert!(matches!(
        Port::open("net_ring_x", &conf, pool.clone()),
        Err(DpdkError::InvalidArgument(_))
    ));
    let conf = PortSetup {
        queues: 1000,
        ..PortSetup::default()
    };
    assert!(matches!(
        Port::open(&unique("net_ring_t"), &conf, pool.clone()),
        Err(DpdkError::InvalidArgument(_))
    ));

    for (mbufs, room) in [(0, DEFAULT_DATA_ROOM), (63, HEADROOM)] {
        let pools = SocketPools::new(&unique("sp"), mbufs, 0, room);
        assert!(
            matches!(pools.for_socket(0), Err(DpdkError::InvalidArgument(_))),
            "{mbufs} mbufs of {room} bytes"
        );
    }
    // A socket's pool that cannot be made for another reason than room
    // (here its name is taken) is an error, not a fall back to any socket.
    let name = unique("sx");
    let _taken = Mempool::new(&format!("{name}-s0"), 63, 0, DEFAULT_DATA_ROOM, 0).expect("pool");
    let pools = SocketPools::new(&name, 63, 0, DEFAULT_DATA_ROOM);
    let err = pools.for_socket(0).unwrap_err();
    assert!(
        matches!(
            err,
            DpdkError::Call {
                op: "rte_pktmbuf_pool_create",
                ..
            }
        ),
        "{err}"
    );
    assert!(pools.pools().is_empty());
    let small = Mempool::new(&unique("tp"), 63, 0, 1024, SOCKET_ANY).expect("small pool");
    assert!(matches!(
        Port::open(&unique("net_ring_t"), &PortSetup::default(), small),
        Err(DpdkError::InvalidArgument(_))
    ));
    let name = unique("tp");
    let _a = Mempool::new(&name, 63, 0, DEFAULT_DATA_ROOM, SOCKET_ANY).expect("pool");
    let dup = Mempool::new(&name, 63, 0, DEFAULT_DATA_ROOM, SOCKET_ANY).unwrap_err();
    assert!(matches!(dup, DpdkError::Call { .. }), "{dup}");
}

/// A port opened on per-socket pools takes the pool of its device's NUMA
/// socket, made there when the first port on it opens (`net_ring`'s
/// `nodeaction`, with the ring named as the device, puts a ring device on
/// a socket); a socket without room for a pool gets the pool of any
/// socket, and a device whose socket is unknown the pool of the opening
/// thread's socket.
#[test]
fn ports_take_the_pool_of_their_numa_socket() {
    eal();
    let name = unique("sp");
    let pools = SocketPools::new(&name, 511, 0, DEFAULT_DATA_ROOM);
    let on_socket = || {
        let ring = unique("net_ring_n");
        let device = format!("{ring},nodeaction={ring}:0:CREATE");
        Port::open_on(&device, &PortSetup::default(), &pools).expect("open on socket 0")
    };
    let a = on_socket();
    assert_eq!(a.socket(), 0);
    assert_eq!(a.pool().socket(), 0);
    assert_eq!(a.pool().name(), format!("{name}-s0"));
    let b = on_socket();
    assert!(Arc::ptr_eq(a.pool(), b.pool()), "one pool per socket");

    // A socket without memory (none has 7 here) gets the pool of any
    // socket.
    let any = pools.for_socket(7).expect("fallback");
    assert_eq!(any.socket(), SOCKET_ANY);
    assert_eq!(any.name(), name);
    assert!(Arc::ptr_eq(&any, &pools.for_socket(7).expect("again")));

    // A device whose socket is unknown gets the pool of the opening
    // thread's socket: 0 on EAL's main thread, any on a thread EAL does
    // not know (the test harness's, unless this test runs alone).
    let unknown = pools.for_socket(SOCKET_ANY).expect("unknown");
    assert!(Arc::ptr_eq(&unknown, &any) || Arc::ptr_eq(&unknown, a.pool()));
    // net_null is on the socket of the thread that probes it, or unknown.
    let c = Port::open_on(&unique("net_null_t"), &PortSetup::default(), &pools).expect("open");
    assert!([0, SOCKET_ANY].contains(&c.socket()), "{}", c.socket());
    assert!(Arc::ptr_eq(
        c.pool(),
        &pools.for_socket(c.socket()).expect("pool")
    ));
    assert_eq!(pools.pools().len(), 2);

    // The pool works: a frame sent through the socket's port comes back.
    let a = Arc::new(a);
    let mut io = PortQueues::claim(std::slice::from_ref(&a), 0).expect("claim");
    let f = frame(7, 64);
    let mut out = vec![Mbuf::from_frame(a.pool(), &f).expect("from_frame")];
    io.tx_burst(0, &mut out);
    assert!(out.is_empty());
    let got = receive(&mut io, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data(), &f[..]);
}

/// A worker's new buffers (IPv4 fragments) come from the pool of the port
/// they leave on: on a NIC server, its NUMA socket's memory.
#[test]
fn a_new_buffer_comes_from_the_pool_of_its_port() {
    let (pa, pb) = (pool(63), pool(63));
    let ports = [ring_port(1, &pa), ring_port(1, &pb)];
    let mut io = PortQueues::claim(&ports, 0).expect("claim");
    let b = io.alloc(1, 300).expect("a buffer for port 1");
    assert_eq!(b.len(), 300);
    assert_eq!((pa.in_use(), pb.in_use()), (0, 1));
    let a = io.alloc(0, 1500).expect("a buffer for port 0");
    assert_eq!((pa.in_use(), pb.in_use()), (1, 1));
    // No such port, or a frame longer than the data room: none.
    assert!(io.alloc(2, 64).is_none());
    assert!(io.alloc(0, 1 << 16).is_none());
    assert_eq!((pa.in_use(), pb.in_use()), (1, 1));
    drop((a, b));
    assert_eq!((pa.in_use(), pb.in_use()), (0, 0));
}

#[test]
fn dropping_a_pool_with_mbufs_out_is_safe() {
    let pool = pool(15);
    let m = Mbuf::from_frame(&pool, &frame(3, 64)).expect("from_frame");
    drop(pool);
    // The pool was leaked, not freed: the mbuf is still usable.
    assert_eq!(m.data(), &frame(3, 64)[..]);
    drop(m);
}

#[test]
fn workers_are_registered_lcores_with_mempool_caches() {
    let eal = eal();
    let pool = Mempool::new(&unique("tp"), 511, 32, DEFAULT_DATA_ROOM, SOCKET_ANY).expect("pool");
    let core = eal.cores()[0];
    let p = pool.clone();
    let h = spawn_worker(core, "t-lcore", move || {
        let id = lcore_id();
        // With an lcore id the freed mbuf stays in this lcore's cache, which
        // still counts as available.
        let m = Mbuf::alloc(&p).expect("alloc");
        drop(m);
        (id, p.available())
    })
    .expect("spawn");
    let (id, avail) = h.join().expect("join");
    let id = id.expect("worker has an lcore id");
    assert_ne!(Some(id), eal.main_lcore());
    assert_eq!(avail, 511);
    assert_eq!(lcore_id(), None, "test threads are not lcores");
}

#[test]
fn ports_stop_start_and_reopen_after_drop() {
    let pool = pool(255);
    let name = unique("net_ring_t");
    let mut port = Arc::new(Port::open(&name, &PortSetup::default(), pool.clone()).expect("open"));
    {
        let q = port.queue(0).expect("claim");
        // A claimed queue shares the port: no exclusive access to stop it.
        assert!(Arc::get_mut(&mut port).is_none());
        drop(q);
    }
    let p = Arc::get_mut(&mut port).expect("sole owner");
    p.stop().expect("stop");
    assert!(!p.is_started());
    p.start().expect("start");
    assert!(p.is_started());

    let mut io = PortQueues::claim(std::slice::from_ref(&port), 0).expect("claim");
    let mut out = vec![Mbuf::from_frame(&pool, &frame(5, 80)).expect("from_frame")];
    io.tx_burst(0, &mut out);
    assert_eq!(receive(&mut io, 1).len(), 1);
    drop(io);
    drop(port);

    // Dropping closed and detached the hot-plugged device: the name is free.
    let again = Port::open(&name, &PortSetup::default(), pool.clone()).expect("reopen");
    assert_eq!(again.name(), name);
    drop(again);
    assert_eq!(pool.available(), pool.size());
}

#[test]
fn one_thread_receives_where_another_transmits() {
    let pool = pool(255);
    let port = ring_port(1, &pool);
    let rx = port.queue_dir(0, QueueDir::Rx).expect("rx half");
    let tx = port.queue_dir(0, QueueDir::Tx).expect("tx half");
    // Each half is held once; the pair can no longer be claimed whole.
    assert!(matches!(
        port.queue_dir(0, QueueDir::Rx),
        Err(DpdkError::QueueInUse { .. })
    ));
    assert!(matches!(port.queue(0), Err(DpdkError::QueueInUse { .. })));
    let mut sender = PortQueues::new(vec![tx]);
    let mut receiver = PortQueues::new(vec![rx]);

    // The receive half does not transmit, the transmit half does not receive.
    let mut keep = vec![Mbuf::from_frame(&pool, &frame(3, 64)).expect("from_frame")];
    receiver.tx_burst(0, &mut keep);
    assert_eq!(keep.len(), 1);
    sender.tx_burst(0, &mut keep);
    assert!(keep.is_empty());
    let mut none = Vec::with_capacity(MAX_BURST);
    sender.rx_burst(0, &mut none);
    assert!(none.is_empty());
    let got = receive(&mut receiver, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data(), &frame(3, 64)[..]);

    // Released halves can be claimed again, as a pair.
    drop((sender, receiver));
    assert!(port.queue(0).is_ok());
}
