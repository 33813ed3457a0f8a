//! A real `pktdist` on a `net_memif` port with this test process on the
//! other end (its own EAL): the tests inject TCP SYNs and read back which
//! backend pktdist encapsulated each one to.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use pktdist::datapath::pktio::{PacketBuf, PacketIo, MAX_BURST};
use pktdist::dpdk::{
    Eal, Mbuf, Mempool, Port, PortQueues, PortSetup, DEFAULT_DATA_ROOM, SOCKET_ANY,
};
use pktdist::types::{tcp_flags, PROTO_TCP};
use pktdist::wire::build::FrameSpec;
use pktdist::wire::{ethernet, ipv4, tcp};

use super::{path_str, poll_until, port_toml, test_eal_args, unique, Pktdist, TEST_EAL_PREFIX};

/// How long to wait for a link or for forwarded frames.
const PATIENCE: Duration = Duration::from_secs(10);

/// The test process's own EAL: once per process, its own file prefix.
/// EAL pins the thread that starts it (and what that thread spawns later,
/// a `pktdist` child included) to its first core, so it starts on a thread
/// of its own that ends right after.
pub fn eal() -> &'static Eal {
    static EAL: OnceLock<Eal> = OnceLock::new();
    EAL.get_or_init(|| {
        std::thread::spawn(|| {
            Eal::init(&test_eal_args(TEST_EAL_PREFIX, "warning")).expect("test EAL init")
        })
        .join()
        .expect("EAL init thread")
    })
}

/// A running pktdist on a memif port, and this process on the other end.
pub struct MemifPeer {
    // Field order is drop order: pktdist first, then our port. Not the
    // other way round: a memif peer that disconnects while the other
    // side's worker polls crashes that side (DPDK 22.11's memif driver
    // unmaps the shared rings in its interrupt thread, under the polling
    // worker's feet), so the side that polls stops first.
    pub pktdist: Pktdist,
    io: PortQueues,
    port: Arc<Port>,
    pool: Arc<Mempool>,
    /// The instance's control protocol address.
    pub control: SocketAddr,
}

impl MemifPeer {
    /// Writes `config` (a configuration without `[[ports]]`) with a memif
    /// port on a socket in `dir` to `dir/<name>.toml`, starts pktdist on it
    /// and connects this process's end.
    pub fn start(dir: &Path, name: &str, config: &str) -> MemifPeer {
        eal();
        let sock = dir.join(format!("{name}.memif.sock"));
        let path = dir.join(format!("{name}.toml"));
        let toml = [
            config,
            &port_toml(&format!(
                "net_memif0,role=server,socket={},socket-abstract=no",
                sock.display()
            )),
        ]
        .concat();
        std::fs::write(&path, toml).expect("write config");
        let (pktdist, control) = Pktdist::run(&path);
        let pool =
            Mempool::new(&unique("e2e"), 4095, 0, DEFAULT_DATA_ROOM, SOCKET_ANY).expect("mempool");
        let device = format!(
            "{},role=client,socket={},socket-abstract=no",
            unique("net_memif_e2e"),
            path_str(&sock)
        );
        let port = Arc::new(
            Port::open(&device, &PortSetup::default(), Arc::clone(&pool))
                .unwrap_or_else(|e| panic!("memif client {device}: {e}")),
        );
        if poll_until(PATIENCE, || port.link().ok().filter(|l| l.up)).is_none() {
            panic!(
                "memif link to pktdist did not come up\n--- pktdist stderr\n{}",
                pktdist.stderr_text()
            );
        }
        let io = PortQueues::claim(std::slice::from_ref(&port), 0).expect("claim queue");
        MemifPeer {
            pktdist,
            io,
            port,
            pool,
            control,
        }
    }

    /// Sends a SYN for each (client, client port) to `service` and returns,
    /// for each, the backend pktdist encapsulated it to (outer IPv4
    /// destination). Panics if any does not come back.
    pub fn connect(&mut self, service: &str, tuples: &[(Ipv4Addr, u16)]) -> Vec<Ipv4Addr> {
        let svc: SocketAddr = service.parse().expect("service");
        let IpAddr::V4(vip) = svc.ip() else {
            panic!("IPv4 services only")
        };
        let mut to_send: Vec<Vec<u8>> = tuples
            .iter()
            .map(|&(c, sport)| {
                FrameSpec {
                    dst_mac: self.port.mac(),
                    ..FrameSpec::tcp_v4(c.octets(), sport, vip.octets(), svc.port(), tcp_flags::SYN)
                }
                .build()
                .expect("SYN frame")
            })
            .collect();
        to_send.reverse();
        let frames = to_send.clone();
        let mut got: HashMap<(Ipv4Addr, u16), Ipv4Addr> = HashMap::new();
        let deadline = Instant::now() + PATIENCE;
        // SYNs unanswered after a second are sent again, as TCP would: a
        // port whose worker is not polling yet (just started, or on a
        // loaded machine) drops the first ones.
        let mut resend = Instant::now() + Duration::from_secs(1);
        let mut pending: Vec<Mbuf> = Vec::with_capacity(MAX_BURST);
        let mut rx: Vec<Mbuf> = Vec::with_capacity(MAX_BURST);
        while got.len() < tuples.len() && Instant::now() < deadline {
            while pending.len() < MAX_BURST {
                let Some(f) = to_send.pop() else { break };
                pending.push(Mbuf::from_frame(&self.pool, &f).expect("mbuf"));
            }
            if !pending.is_empty() {
                self.io.tx_burst(0, &mut pending);
            }
            if to_send.is_empty() && pending.is_empty() && Instant::now() >= resend {
                resend = Instant::now() + Duration::from_secs(1);
                to_send = frames
                    .iter()
                    .zip(tuples.iter().rev())
                    .filter(|(_, t)| !got.contains_key(t))
                    .map(|(f, _)| f.clone())
                    .collect();
            }
            self.io.rx_burst(0, &mut rx);
            if rx.is_empty() {
                std::thread::sleep(Duration::from_micros(200));
            }
            for m in rx.drain(..) {
                if let Some((client, sport, backend)) = decap(m.data(), vip, svc.port()) {
                    got.insert((client, sport), backend);
                }
            }
        }
        let missing = tuples.iter().filter(|t| !got.contains_key(t)).count();
        if missing > 0 {
            panic!(
                "{missing} of {} SYNs to {service} did not come back from pktdist\n--- pktdist stderr\n{}",
                tuples.len(),
                self.pktdist.stderr_text()
            );
        }
        tuples.iter().map(|t| got[t]).collect()
    }

    /// Stops pktdist (SIGTERM), then this end; pktdist must end cleanly.
    /// Returns its stderr.
    pub fn finish(self) -> String {
        let MemifPeer {
            pktdist, io, port, ..
        } = self;
        let done = pktdist.stop(PATIENCE);
        drop(io);
        drop(port);
        assert!(
            done.status.success(),
            "pktdist did not stop cleanly: {}\n{}",
            done.status,
            done.stderr
        );
        assert!(done.stdout.contains("pktdist summary"), "{}", done.stdout);
        done.stderr
    }
}

/// Fresh SYN tuples: client ports never used before in this process.
pub struct Tuples(u16);

impl Default for Tuples {
    fn default() -> Tuples {
        Tuples(10000)
    }
}

impl Tuples {
    /// `per_client` connections from each of `clients`, interleaved (the
    /// connections of one client are in flight together).
    pub fn next(&mut self, clients: &[Ipv4Addr], per_client: usize) -> Vec<(Ipv4Addr, u16)> {
        let mut v = Vec::new();
        for _ in 0..per_client {
            for &c in clients {
                v.push((c, self.0));
                self.0 = self.0.checked_add(1).expect("ports left");
            }
        }
        v
    }
}

/// (inner client address, client port, outer destination) of an
/// IPv4-in-IPv4 frame pktdist forwarded for `vip:port`.
pub fn decap(frame: &[u8], vip: Ipv4Addr, port: u16) -> Option<(Ipv4Addr, u16, Ipv4Addr)> {
    let eth = ethernet::Frame::new_checked(frame).ok()?;
    if eth.ethertype() != ethernet::ETHERTYPE_IPV4 {
        return None;
    }
    let outer = ipv4::Packet::new_checked(&frame[ethernet::HEADER_LEN..]).ok()?;
    if outer.protocol() != ipv4::PROTO_IPIP || !outer.verify_checksum() {
        return None;
    }
    let inner = ipv4::Packet::new_checked(outer.payload()).ok()?;
    if inner.dst_addr() != vip.octets() || inner.protocol() != PROTO_TCP {
        return None;
    }
    let t = tcp::Packet::new_checked(inner.payload()).ok()?;
    if t.dst_port() != port {
        return None;
    }
    Some((
        Ipv4Addr::from(inner.src_addr()),
        t.src_port(),
        Ipv4Addr::from(outer.dst_addr()),
    ))
}

/// `n` hosts 1..=n of the /24 `net`.
pub fn hosts(net: [u8; 3], n: u8) -> Vec<Ipv4Addr> {
    (1..=n)
        .map(|h| Ipv4Addr::new(net[0], net[1], net[2], h))
        .collect()
}
