//! The built-in traffic source: realistic TCP connections (SYN, data, FIN)
//! and UDP flows from many clients to the configured services, for the demo,
//! the benchmarks and tests. It only decides what the next packet is and
//! writes it into a buffer; who transmits it (a DPDK port, an in-memory
//! queue) is the caller's business.

use crate::config::TRAFFIC_SOURCE_PORTS as SOURCE_PORTS;
use crate::types::{tcp_flags, Family, FlowKey, PROTO_TCP};

/// The first source port; ports cycle from it to 65535.
const FIRST_PORT: u16 = (u16::MAX as u32 + 1 - SOURCE_PORTS) as u16;
use crate::wire::build::{write_frame, FrameSpec, L4};

/// Zero bytes the payloads are cut from.
static PAYLOAD: [u8; 9000] = [0; 9000];

/// Ethernet + IP + L4 header bytes of a generated frame (no VLAN, no options).
fn header_len(family: Family, proto: u8) -> usize {
    let ip = if family == Family::V4 { 20 } else { 40 };
    let l4 = if proto == PROTO_TCP { 20 } else { 8 };
    14 + ip + l4
}

/// A destination the source sends to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub family: Family,
    pub vip: u128,
    pub port: u16,
    pub proto: u8,
}

/// What the source sends.
#[derive(Clone, Debug)]
pub struct TrafficSpec {
    pub targets: Vec<Target>,
    /// Distinct client addresses per family.
    pub clients: u32,
    /// Connections open at once; each slot runs one connection after another.
    pub concurrent_flows: u32,
    /// Packets per connection, SYN and FIN included (at least 2).
    pub packets_per_flow: u32,
    /// Frame size in bytes (at least the headers; 64 by default).
    pub packet_size: u16,
    /// Share of connections from IPv6 clients, to IPv6 targets (0.0 to 1.0).
    pub ipv6_share: f64,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub seed: u64,
}

/// First client address of each family: the benchmarking ranges of RFC 2544
/// (198.18.0.0/15) and RFC 5180 (2001:2::/48).
pub const CLIENT_BASE_V4: u128 = 0xc612_0000;
pub const CLIENT_BASE_V6: u128 = 0x2001_0002_0000_0000_0000_0000_0000_0000;

#[derive(Clone, Copy, Debug)]
struct Conn {
    target: usize,
    client: u128,
    family: Family,
    sport: u16,
    sent: u32,
    seq: u32,
}

/// Counts of what the source produced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounts {
    pub packets: u64,
    pub connections: u64,
    pub syns: u64,
    pub fins: u64,
}

/// The generator: round robin over `concurrent_flows` connection slots.
pub struct TrafficGen {
    spec: TrafficSpec,
    conns: Vec<Conn>,
    next: usize,
    rng: u64,
    next_sport: u16,
    counts: TrafficCounts,
    v4_targets: Vec<usize>,
    v6_targets: Vec<usize>,
}

impl TrafficGen {
    /// A generator for `spec`. Fails when there is nothing to send to, or
    /// when the clients' source ports cannot give every open connection a
    /// flow of its own.
    pub fn new(spec: TrafficSpec) -> Result<TrafficGen, String> {
        if spec.targets.is_empty() {
            return Err("traffic: no service to send to".into());
        }
        if spec.clients == 0 || spec.concurrent_flows == 0 {
            return Err("traffic: clients and concurrent_flows must be at least 1".into());
        }
        let groups = client_groups(spec.concurrent_flows);
        if groups > spec.clients {
            return Err(format!(
                "traffic: {} concurrent flows need at least {groups} clients (each has {SOURCE_PORTS} source ports)",
                spec.concurrent_flows
            ));
        }
        let v4_targets: Vec<usize> = (0..spec.targets.len())
            .filter(|&i| spec.targets[i].family == Family::V4)
            .collect();
        let v6_targets: Vec<usize> = (0..spec.targets.len())
            .filter(|&i| spec.targets[i].family == Family::V6)
            .collect();
        let mut g = TrafficGen {
            rng: spec.seed | 1,
            conns: Vec::with_capacity(spec.concurrent_flows as usize),
            next: 0,
            next_sport: FIRST_PORT,
            counts: TrafficCounts::default(),
            v4_targets,
            v6_targets,
            spec,
        };
        for _ in 0..g.spec.concurrent_flows {
            let c = g.new_conn();
            g.conns.push(c);
        }
        Ok(g)
    }

    pub fn counts(&self) -> TrafficCounts {
        self.counts
    }

    fn rand(&mut self) -> u64 {
        // xorshift64*: cheap, deterministic for a seed.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn new_conn(&mut self) -> Conn {
        let want_v6 = (self.rand() >> 11) as f64 / (1u64 << 53) as f64 > 1.0 - self.spec.ipv6_share;
        let family = match (
            want_v6,
            self.v6_targets.is_empty(),
            self.v4_targets.is_empty(),
        ) {
            (true, false, _) | (false, false, true) => Family::V6,
            _ => Family::V4,
        };
        let r = self.rand();
        let pool = match family {
            Family::V4 => &self.v4_targets,
            Family::V6 => &self.v6_targets,
        };
        let target = pool[(r % pool.len() as u64) as usize];
        // The open connections are the last `concurrent_flows` made (each
        // slot's runs as long as the others'), and source ports cycle per
        // connection: two of them share a port when made k * SOURCE_PORTS
        // apart, 0 < k < groups. Each group of SOURCE_PORTS connections
        // draws its clients from its own residue class, so they differ.
        let groups = client_groups(self.spec.concurrent_flows);
        let n = if groups == 1 {
            self.rand() % u64::from(self.spec.clients)
        } else {
            let g = u64::from(groups);
            let class = self.counts.connections / u64::from(SOURCE_PORTS) % g;
            let in_class = (u64::from(self.spec.clients) - class).div_ceil(g);
            class + g * (self.rand() % in_class)
        } as u128;
        let client = match family {
            Family::V4 => CLIENT_BASE_V4 + n,
            Family::V6 => CLIENT_BASE_V6 + n,
        };
        self.next_sport = if self.next_sport == u16::MAX {
            FIRST_PORT
        } else {
            self.next_sport + 1
        };
        self.counts.connections += 1;
        Conn {
            target,
            client,
            family,
            sport: self.next_sport,
            sent: 0,
            seq: self.rand() as u32,
        }
    }

    /// Writes the next packet into `buf` and returns its length (0 if `buf`
    /// is too small for it).
    pub fn next_frame(&mut self, buf: &mut [u8]) -> usize {
        self.next_frame_keyed(buf).0
    }

    /// [`TrafficGen::next_frame`], with the flow the packet belongs to.
    pub fn next_frame_keyed(&mut self, buf: &mut [u8]) -> (usize, FlowKey) {
        let slot = self.next;
        self.next = if self.next + 1 == self.conns.len() {
            0
        } else {
            self.next + 1
        };
        let c = self.conns[slot];
        let t = self.spec.targets[c.target];
        let last = c.sent + 1 >= self.spec.packets_per_flow.max(2);
        let l4 = if t.proto == PROTO_TCP {
            let flags = if c.sent == 0 {
                self.counts.syns += 1;
                tcp_flags::SYN
            } else if last {
                self.counts.fins += 1;
                tcp_flags::FIN | tcp_flags::ACK
            } else {
                tcp_flags::ACK | tcp_flags::PSH
            };
            L4::Tcp {
                flags,
                seq: c.seq.wrapping_add(c.sent),
                ack: if c.sent == 0 { 0 } else { 1 },
                window: 65535,
            }
        } else {
            L4::Udp
        };
        // Frames shorter than 64 bytes are padded by the builder; larger
        // ones carry a payload (the FCS the NIC adds is not counted).
        let want = (self.spec.packet_size as usize).saturating_sub(4);
        let payload_len = want
            .saturating_sub(header_len(c.family, t.proto))
            .min(PAYLOAD.len());
        let spec = FrameSpec {
            src_mac: self.spec.src_mac,
            dst_mac: self.spec.dst_mac,
            vlan: None,
            family: c.family,
            src: c.client,
            dst: t.vip,
            sport: c.sport,
            dport: t.port,
            l4,
            payload: &PAYLOAD[..payload_len],
            ..FrameSpec::default()
        };
        let key = FlowKey {
            src: c.client,
            dst: t.vip,
            sport: c.sport,
            dport: t.port,
            proto: t.proto,
            family: c.family,
        };
        let Ok(n) = write_frame(buf, &spec) else {
            return (0, key);
        };
        self.counts.packets += 1;
        if last {
            self.conns[slot] = self.new_conn();
        } else {
            self.conns[slot].sent += 1;
        }
        (n, key)
    }
}

/// How many connections open at once share each source port: the client
/// classes [`TrafficGen`] draws from.
fn client_groups(concurrent_flows: u32) -> u32 {
    concurrent_flows.div_ceil(SOURCE_PORTS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::classify::parse;
    use crate::types::PROTO_UDP;

    fn spec(targets: Vec<Target>) -> TrafficSpec {
        TrafficSpec {
            targets,
            clients: 100,
            concurrent_flows: 10,
            packets_per_flow: 4,
            packet_size: 64,
            ipv6_share: 0.0,
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            seed: 7,
        }
    }

    const WEB: Target = Target {
        family: Family::V4,
        vip: 0x0a00_0001,
        port: 80,
        proto: PROTO_TCP,
    };

    #[test]
    fn connections_are_syn_data_fin_and_parse() {
        let mut g = TrafficGen::new(spec(vec![WEB])).unwrap();
        let mut buf = [0u8; 2048];
        let mut per_flow: std::collections::HashMap<(u128, u16), Vec<u8>> = Default::default();
        for _ in 0..400 {
            let (n, key) = g.next_frame_keyed(&mut buf);
            assert_eq!(n, 60, "64-byte frames without FCS");
            let p = parse(&buf[..n]).expect("generated frames parse");
            assert_eq!(p.key, key, "the key given is the frame's flow");
            assert_eq!((p.key.dst, p.key.dport), (WEB.vip, WEB.port));
            assert!(p.key.src >= CLIENT_BASE_V4 && p.key.src < CLIENT_BASE_V4 + 100);
            per_flow
                .entry((p.key.src, p.key.sport))
                .or_default()
                .push(p.tcp_flags);
        }
        let c = g.counts();
        assert_eq!(c.packets, 400);
        assert_eq!(c.syns, 100);
        assert_eq!(c.fins, 100);
        // Every complete connection is SYN, two data segments, FIN.
        let complete = per_flow.values().filter(|f| f.len() == 4).count();
        assert!(complete >= 90);
        for flags in per_flow.values().filter(|f| f.len() == 4) {
            assert_eq!(flags[0], tcp_flags::SYN);
            assert_eq!(flags[3] & tcp_flags::FIN, tcp_flags::FIN);
        }
    }

    #[test]
    fn sizes_families_and_udp() {
        let v6 = Target {
            family: Family::V6,
            vip: 0x2001_0db8 << 96 | 1,
            port: 53,
            proto: PROTO_UDP,
        };
        let mut s = spec(vec![WEB, v6]);
        s.packet_size = 512;
        s.ipv6_share = 0.5;
        let mut g = TrafficGen::new(s).unwrap();
        let mut buf = [0u8; 2048];
        let (mut v4, mut v6n) = (0, 0);
        for _ in 0..200 {
            let n = g.next_frame(&mut buf);
            assert_eq!(n, 508);
            let p = parse(&buf[..n]).unwrap();
            match p.key.family {
                Family::V4 => v4 += 1,
                Family::V6 => {
                    assert_eq!(p.key.proto, PROTO_UDP);
                    assert!(p.key.src >= CLIENT_BASE_V6);
                    v6n += 1
                }
            }
        }
        assert!(v4 > 40 && v6n > 40, "both families: {v4} v4, {v6n} v6");
    }

    /// More open connections than source ports, from few clients: no two
    /// open at once are one flow.
    #[test]
    fn open_connections_are_distinct_flows() {
        let mut s = spec(vec![WEB]);
        s.clients = 3;
        s.concurrent_flows = 2 * SOURCE_PORTS + 1000;
        s.packets_per_flow = 3;
        let mut g = TrafficGen::new(s.clone()).unwrap();
        let mut buf = [0u8; 128];
        let mut open = std::collections::HashSet::new();
        let mut clients = std::collections::HashSet::new();
        for _ in 0..4 * s.concurrent_flows {
            let (n, key) = g.next_frame_keyed(&mut buf);
            assert!(n > 0);
            let flags = parse(&buf[..n]).unwrap().tcp_flags;
            if flags == tcp_flags::SYN {
                assert!(open.insert(key), "{key:?} opened while open");
                clients.insert(key.src);
            } else if flags & tcp_flags::FIN != 0 {
                assert!(open.remove(&key), "{key:?} closed while not open");
            } else {
                assert!(open.contains(&key), "{key:?} sent while not open");
            }
        }
        assert_eq!(open.len(), s.concurrent_flows as usize);
        assert_eq!(clients.len(), 3, "every client used");
        s.clients = 2;
        let e = TrafficGen::new(s).err().expect("two clients are too few");
        assert!(e.contains("need at least 3 clients"), "{e}");
    }

    #[test]
    fn refuses_nothing_to_send_to() {
        assert!(TrafficGen::new(spec(vec![])).is_err());
    }
}
