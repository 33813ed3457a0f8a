//! The crate's shared vocabulary: what every part of pktdist names the same
//! way — address families, the flow key and its hash, service and backend
//! ids with their limits, IP protocol numbers, TCP flags, the reasons a
//! packet is dropped, and the states of a backend.
//!
//! Addresses are `u128` (IPv4 in the low 32 bits) so that one key type and
//! one hash serve both families without branching on the hot path.

/// IP protocol numbers the distributor routes.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// ICMP for IPv4 (RFC 792).
pub const PROTO_ICMP: u8 = 1;
/// ICMPv6 (RFC 4443).
pub const PROTO_ICMPV6: u8 = 58;

/// TCP flag bits as they appear in byte 13 of the TCP header.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// Address family of a flow.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Family {
    V4,
    V6,
}

/// The 5-tuple of a flow in the client-to-service direction.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct FlowKey {
    pub src: u128,
    pub dst: u128,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: Family,
}

impl FlowKey {
    /// All zeros, IPv4: a placeholder for storage filled later.
    pub const ZERO: FlowKey = FlowKey {
        src: 0,
        dst: 0,
        sport: 0,
        dport: 0,
        proto: 0,
        family: Family::V4,
    };
}

/// Identity of a service, below [`MAX_SERVICES`]; stable across snapshots
/// for as long as the service stays configured (same name, VIP, port and
/// protocol), so per-service counters, affinities and automatic-affinity
/// pins keyed by it survive a reload that adds, removes or reorders others.
pub type ServiceId = u16;
/// Identity of a backend, unique across services; kept across snapshots
/// and reloads while its service, name and address stay the same.
pub type BackendId = u32;

/// Most services one instance serves.
pub const MAX_SERVICES: usize = 256;
/// Most backend ids one instance hands out (across all services).
pub const MAX_BACKENDS: usize = 4096;
/// Longest sender, owner, service or backend name.
pub const MAX_NAME_LEN: usize = 64;

/// Mixes one 64-bit word into a running hash (a multiply-xorshift round, as in
/// wyhash/murmur finalisers): cheap, and stable across processes and machines,
/// which Maglev needs so that several instances pick the same backend.
#[inline]
fn mix(h: u64, v: u64) -> u64 {
    let m = (h ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    m ^ (m >> 29)
}

#[inline]
fn finish(h: u64) -> u64 {
    let h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    let h = (h ^ (h >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Multiplies two words into 128 bits and folds the halves together (the
/// mixing step of wyhash): one multiply instruction that spreads every input
/// bit over the whole result.
#[inline]
fn fold_mul(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    r as u64 ^ (r >> 64) as u64
}

/// Hash of a flow's 5-tuple, used by the flow table and the consistent hash.
/// An IPv4 tuple (addresses in the low 32 bits) is two words, folded by two
/// wide multiplies; an IPv6 one takes five mixing rounds and a finaliser:
/// the hash is on every packet's critical path to its flow-table prefetch.
/// Instances agree on it only when they compute the same function: see the
/// README's "Limits and notes" on mixed versions.
#[inline]
pub fn flow_hash(key: &FlowKey) -> u64 {
    let ports = (key.sport as u64) << 32 | (key.dport as u64) << 16 | key.proto as u64;
    if key.family == Family::V4 {
        let addrs = (key.src as u64) << 32 | (key.dst as u64 & 0xffff_ffff);
        let h = fold_mul(addrs ^ 0x243f_6a88_85a3_08d3, ports ^ 0x1319_8a2e_0370_7344);
        return fold_mul(h ^ 0xa409_3822_299f_31d0, 0x082e_fa98_ec4e_6c89);
    }
    let mut h = 0x243f_6a88_85a3_08d3u64;
    h = mix(h, key.src as u64);
    h = mix(h, (key.src >> 64) as u64);
    h = mix(h, key.dst as u64);
    h = mix(h, (key.dst >> 64) as u64);
    finish(mix(h, ports))
}

/// Hash of a connection's client address alone: the consistent hash's input
/// for a service with `hash = "client"`, so that every connection of one
/// client (any source port, any instance behind ECMP) meets on one backend.
/// The service (VIP, port) is left out: each service has its own Maglev
/// table. Stable across processes and machines, as [`flow_hash`] is.
#[inline]
pub fn client_hash(key: &FlowKey) -> u64 {
    let h = 0x1319_8a2e_0370_7344u64;
    let h = if key.family == Family::V4 {
        mix(h, key.src as u64 & 0xffff_ffff)
    } else {
        mix(mix(h, key.src as u64), (key.src >> 64) as u64)
    };
    finish(mix(h, key.family as u64))
}

/// Why a packet was dropped. Every drop on the data path is one of these.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum DropReason {
    /// Truncated or inconsistent headers.
    Malformed = 0,
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    NotIp,
    /// An IP fragment: L4 ports are not available.
    Fragment,
    /// IP but neither TCP nor UDP.
    UnsupportedL4,
    /// Not addressed to a configured service.
    NoService,
    /// The service has no backend that can take the packet.
    NoBackend,
    /// No next-hop MAC for the chosen backend.
    NoRoute,
    /// No headroom (or room) to build the output packet.
    NoRoom,
    /// The transmit queue was full.
    TxFull,
    /// An ICMP message to a VIP that pktdist neither forwards nor answers;
    /// [`IcmpDrop`] says why.
    Icmp,
    /// Longer than the port's `mtu` once encapsulated, and not answered:
    /// the per-source limit of "fragmentation needed" / "packet too big"
    /// answers was reached, or the packet is itself an ICMP message (which
    /// never gets an ICMP answer).
    TooBig,
    /// A new connection to a service whose backends are all down.
    AllBackendsDown,
}

impl DropReason {
    pub const COUNT: usize = 12;
    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::Malformed,
        DropReason::NotIp,
        DropReason::Fragment,
        DropReason::UnsupportedL4,
        DropReason::NoService,
        DropReason::NoBackend,
        DropReason::NoRoute,
        DropReason::NoRoom,
        DropReason::TxFull,
        DropReason::Icmp,
        DropReason::TooBig,
        DropReason::AllBackendsDown,
    ];

    /// Traffic that is simply not ours (as opposed to broken or refused):
    /// what a port's `unmatched_to` passes on instead of dropping.
    pub fn is_unmatched(self) -> bool {
        matches!(
            self,
            DropReason::NotIp
                | DropReason::Fragment
                | DropReason::UnsupportedL4
                | DropReason::NoService
        )
    }

    /// The label used in summaries and metrics.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NotIp => "not_ip",
            DropReason::Fragment => "fragment",
            DropReason::UnsupportedL4 => "unsupported_l4",
            DropReason::NoService => "no_service",
            DropReason::NoBackend => "no_backend",
            DropReason::NoRoute => "no_route",
            DropReason::NoRoom => "no_room",
            DropReason::TxFull => "tx_full",
            DropReason::Icmp => "icmp",
            DropReason::TooBig => "too_big",
            DropReason::AllBackendsDown => "all_backends_down",
        }
    }
}

/// Why an ICMP message addressed to a VIP was dropped (each is also one
/// [`DropReason::Icmp`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum IcmpDrop {
    /// Shorter than the 8-byte ICMP header.
    Malformed = 0,
    /// The ICMP checksum is wrong.
    BadChecksum,
    /// A type pktdist neither forwards nor answers (echo reply, redirect,
    /// parameter problem, router advertisement, ...).
    UnsupportedType,
    /// An error whose quote ends before the quoted packet's ports.
    ShortQuote,
    /// An error whose quote is not an IP header of the message's own
    /// family, or quotes a fragment but the first (a later one carries no
    /// ports to route by).
    BadQuote,
    /// An error about an ICMP message.
    AboutIcmp,
    /// An error about a packet whose source is not a VIP.
    QuoteNotVip,
    /// An error about a packet from a VIP, but from a port and protocol no
    /// service has.
    QuoteNoService,
    /// An echo request to a VIP that does not answer them.
    EchoOff,
    /// An echo request over the echo rate limit.
    EchoRateLimited,
    /// An echo request with IPv4 options or IPv6 extension headers (not
    /// answered: a reply would have to process them).
    EchoOptions,
    /// An echo request from an address that is no one host's (unspecified,
    /// loopback, multicast, broadcast): no answer goes there.
    EchoBadSource,
}

impl IcmpDrop {
    pub const COUNT: usize = 12;
    pub const ALL: [IcmpDrop; Self::COUNT] = [
        IcmpDrop::Malformed,
        IcmpDrop::BadChecksum,
        IcmpDrop::UnsupportedType,
        IcmpDrop::ShortQuote,
        IcmpDrop::BadQuote,
        IcmpDrop::AboutIcmp,
        IcmpDrop::QuoteNotVip,
        IcmpDrop::QuoteNoService,
        IcmpDrop::EchoOff,
        IcmpDrop::EchoRateLimited,
        IcmpDrop::EchoOptions,
        IcmpDrop::EchoBadSource,
    ];

    /// The label used in summaries and metrics.
    pub fn name(self) -> &'static str {
        match self {
            IcmpDrop::Malformed => "malformed",
            IcmpDrop::BadChecksum => "bad_checksum",
            IcmpDrop::UnsupportedType => "unsupported_type",
            IcmpDrop::ShortQuote => "short_quote",
            IcmpDrop::BadQuote => "bad_quote",
            IcmpDrop::AboutIcmp => "about_icmp",
            IcmpDrop::QuoteNotVip => "quote_not_vip",
            IcmpDrop::QuoteNoService => "quote_no_service",
            IcmpDrop::EchoOff => "echo_off",
            IcmpDrop::EchoRateLimited => "echo_rate_limited",
            IcmpDrop::EchoOptions => "echo_options",
            IcmpDrop::EchoBadSource => "echo_bad_source",
        }
    }
}

/// What a backend is doing, as the workers and the operator see it.
///
/// Combined by the control plane from the backend's health, what the
/// application and the operator declared ([`Declared`]) and its weight:
/// down wins over draining, draining over up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum BackendState {
    /// Takes new connections.
    #[default]
    Up = 1,
    /// No new scheduled connections and no new or extended affinities; its
    /// connections, affinities and automatic pins are kept until they end.
    Draining = 2,
    /// No new connections at all: its affinities and automatic pins are
    /// skipped (their clients go to the scheduler); its flows keep it.
    Down = 3,
}

impl BackendState {
    pub fn from_u8(v: u8) -> Option<BackendState> {
        match v {
            1 => Some(BackendState::Up),
            2 => Some(BackendState::Draining),
            3 => Some(BackendState::Down),
            _ => None,
        }
    }

    /// The label used in listings, the summary and the log.
    pub fn name(self) -> &'static str {
        match self {
            BackendState::Up => "up",
            BackendState::Draining => "draining",
            BackendState::Down => "down",
        }
    }

    /// The state of a backend that `declared` and the operator's
    /// `admin` say, with its health (`healthy`: checks pass or are off)
    /// and its weight.
    pub fn combine(
        declared: Declared,
        admin: Declared,
        healthy: bool,
        weight: u32,
    ) -> BackendState {
        if !healthy || declared == Declared::Down || admin == Declared::Down {
            BackendState::Down
        } else if declared == Declared::Drain || admin == Declared::Drain || weight == 0 {
            BackendState::Draining
        } else {
            BackendState::Up
        }
    }
}

/// A state a backend's application (for itself) or the operator (for any
/// backend) declares in a BACKEND_STATE request; the discriminants are the
/// wire codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Declared {
    /// Ready for new connections (as far as the declarer is concerned).
    #[default]
    Up = 1,
    /// Take no new connections or affinities; finish what is there.
    Drain = 2,
    /// Out of service at once, as if its health checks failed.
    Down = 3,
}

impl Declared {
    pub fn from_u8(v: u8) -> Option<Declared> {
        match v {
            1 => Some(Declared::Up),
            2 => Some(Declared::Drain),
            3 => Some(Declared::Down),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Declared::Up => "UP",
            Declared::Drain => "DRAIN",
            Declared::Down => "DOWN",
        }
    }
}

/// Why an affinity ended: in the control thread's records, in the log and
/// in the AFFINITY_ENDED notification (the discriminants are the wire codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EndReason {
    Expired = 1,
    Cancelled = 2,
    BackendRemoved = 3,
    /// Its owner stayed down longer than the service's `affinity_grace`.
    BackendDown = 4,
    /// A reason this build does not know, decoded from a newer
    /// distributor's notification (reasons are added within version 1).
    /// Never sent.
    Unknown = 255,
}

impl EndReason {
    pub fn from_u8(v: u8) -> Option<EndReason> {
        match v {
            1 => Some(EndReason::Expired),
            2 => Some(EndReason::Cancelled),
            3 => Some(EndReason::BackendRemoved),
            4 => Some(EndReason::BackendDown),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EndReason::Expired => "EXPIRED",
            EndReason::Cancelled => "CANCELLED",
            EndReason::BackendRemoved => "BACKEND_REMOVED",
            EndReason::BackendDown => "BACKEND_DOWN",
            EndReason::Unknown => "UNKNOWN",
        }
    }
}

/// Which client ports an affinity covers: written "any", one port
/// ("1234") or an inclusive range ("1000-2000").
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub enum PortMatch {
    #[default]
    Any,
    One(u16),
    /// Inclusive range `lo..=hi`.
    Range(u16, u16),
}

impl PortMatch {
    /// The one spelling of these ports: a one-port range as the port, the
    /// whole range as any (a range whose low end is above its high end is
    /// left as it is, for the caller to refuse).
    #[inline]
    pub fn normalized(self) -> PortMatch {
        match self {
            PortMatch::Range(lo, hi) if lo == hi => PortMatch::One(lo),
            PortMatch::Range(0, u16::MAX) => PortMatch::Any,
            p => p,
        }
    }

    /// Whether `port` is covered.
    #[inline]
    pub fn contains(self, port: u16) -> bool {
        match self {
            PortMatch::Any => true,
            PortMatch::One(p) => p == port,
            PortMatch::Range(lo, hi) => lo <= port && port <= hi,
        }
    }
}

impl std::str::FromStr for PortMatch {
    type Err = String;
    fn from_str(s: &str) -> Result<PortMatch, String> {
        let bad = || {
            format!("bad client port {s:?}: expected \"any\", a port like 1234, or a range like \"1000-2000\"")
        };
        let port = |p: &str| p.trim().parse::<u16>().map_err(|_| bad());
        let t = s.trim();
        if t.eq_ignore_ascii_case("any") {
            return Ok(PortMatch::Any);
        }
        match t.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                if a > b {
                    return Err(format!("bad client port range {s:?}: {a} > {b}"));
                }
                Ok(PortMatch::Range(a, b))
            }
            None => Ok(PortMatch::One(port(t)?)),
        }
    }
}

impl std::fmt::Display for PortMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortMatch::Any => f.write_str("any"),
            PortMatch::One(p) => write!(f, "{p}"),
            PortMatch::Range(a, b) => write!(f, "{a}-{b}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_state_combines_down_over_draining_over_up() {
        use BackendState::{Down, Draining, Up};
        use Declared as D;
        let all = [D::Up, D::Drain, D::Down];
        // The rule as a ranking: each source says up (0), draining (1) or
        // down (2), and the worst wins.
        let rank = |d: Declared| match d {
            D::Up => 0,
            D::Drain => 1,
            D::Down => 2,
        };
        for app in all {
            for admin in all {
                for healthy in [true, false] {
                    for weight in [0, 1, 100] {
                        let got = BackendState::combine(app, admin, healthy, weight);
                        let worst = [
                            rank(app),
                            rank(admin),
                            if healthy { 0 } else { 2 },
                            if weight == 0 { 1 } else { 0 },
                        ]
                        .into_iter()
                        .max()
                        .unwrap_or(0);
                        let want = [Up, Draining, Down][worst];
                        assert_eq!(got, want, "{app:?} {admin:?} {healthy} {weight}");
                    }
                }
            }
        }
        // Only checks that pass (or none) and UP from both make a backend up.
        assert_eq!(BackendState::combine(D::Up, D::Up, true, 1), Up);
        assert_eq!(BackendState::combine(D::Up, D::Up, false, 1), Down);
        assert_eq!(BackendState::combine(D::Drain, D::Up, false, 1), Down);
        assert_eq!(BackendState::combine(D::Up, D::Up, true, 0), Draining);
        for s in [Up, Draining, Down] {
            assert_eq!(BackendState::from_u8(s as u8), Some(s));
        }
        for d in all {
            assert_eq!(Declared::from_u8(d as u8), Some(d));
        }
        assert_eq!(Declared::from_u8(0), None);
        assert_eq!(EndReason::from_u8(4), Some(EndReason::BackendDown));
    }

    #[test]
    fn flow_hash_is_stable_and_spreads() {
        let k = FlowKey {
            src: 0x0a00_0001,
            dst: 0x0a00_0002,
            sport: 1234,
            dport: 80,
            proto: PROTO_TCP,
            family: Family::V4,
        };
        assert_eq!(flow_hash(&k), flow_hash(&k.clone()));
        for other in [
            FlowKey { sport: 1235, ..k },
            FlowKey { dport: 81, ..k },
            FlowKey {
                src: 0x0a00_0003,
                ..k
            },
            FlowKey {
                dst: 0x0a00_0003,
                ..k
            },
            FlowKey {
                proto: PROTO_UDP,
                ..k
            },
            // The same 32 bits in the other field.
            FlowKey {
                src: k.dst,
                dst: k.src,
                ..k
            },
        ] {
            assert_ne!(flow_hash(&k), flow_hash(&other), "{other:?}");
        }
        let v6 = FlowKey {
            src: 1 << 100,
            family: Family::V6,
            ..k
        };
        assert_ne!(
            flow_hash(&v6),
            flow_hash(&FlowKey {
                src: 2 << 100,
                ..v6
            })
        );
        assert_ne!(flow_hash(&v6), flow_hash(&FlowKey { dst: 1 << 90, ..v6 }));
    }

    /// Sequential clients of one service spread evenly over both users of
    /// the hash: flow-table buckets (low 32 bits) and Maglev slots (high
    /// bits, by multiplication).
    #[test]
    fn flow_hash_spreads_sequential_clients() {
        const BINS: usize = 512;
        const KEYS: usize = 200_000;
        for family in [Family::V4, Family::V6] {
            let (mut low, mut high) = (vec![0u32; BINS], vec![0u32; BINS]);
            for i in 0..KEYS as u128 {
                let k = FlowKey {
                    src: 0x0a00_0000 + (i >> 4) + if family == Family::V6 { 1 << 120 } else { 0 },
                    dst: 0xc000_020a,
                    sport: 1024 + (i & 15) as u16,
                    dport: 80,
                    proto: PROTO_TCP,
                    family,
                };
                let h = flow_hash(&k);
                low[(((h & 0xffff_ffff) * BINS as u64) >> 32) as usize] += 1;
                high[((h as u128 * BINS as u128) >> 64) as usize] += 1;
            }
            let mean = (KEYS / BINS) as u32;
            for bins in [&low, &high] {
                let (min, max) = (bins.iter().min().unwrap(), bins.iter().max().unwrap());
                assert!(
                    *min > mean * 3 / 4 && *max < mean * 5 / 4,
                    "{family:?}: bins from {min} to {max}, mean {mean}"
                );
            }
        }
    }

    #[test]
    fn client_hash_reads_the_client_address_only() {
        let k = FlowKey {
            src: 0x0a00_0001,
            dst: 0x0a00_0002,
            sport: 1234,
            dport: 80,
            proto: PROTO_TCP,
            family: Family::V4,
        };
        let h = client_hash(&k);
        for same in [
            FlowKey { sport: 1235, ..k },
            FlowKey { dport: 443, ..k },
            FlowKey { dst: 7, ..k },
            FlowKey {
                proto: PROTO_UDP,
                ..k
            },
        ] {
            assert_eq!(client_hash(&same), h);
        }
        assert_ne!(
            client_hash(&FlowKey {
                src: 0x0a00_0003,
                ..k
            }),
            h
        );
        let v6 = FlowKey {
            src: 0x2001_0db8 << 96 | 1,
            family: Family::V6,
            ..k
        };
        assert_ne!(
            client_hash(&v6),
            client_hash(&FlowKey {
                src: v6.src ^ (1 << 100),
                ..v6
            })
        );
        // Sequential clients spread evenly over the high bits Maglev reads.
        const BINS: usize = 256;
        let mut bins = vec![0u32; BINS];
        for i in 0..100_000u128 {
            let h = client_hash(&FlowKey {
                src: 0x0a00_0000 + i,
                ..k
            });
            bins[((h as u128 * BINS as u128) >> 64) as usize] += 1;
        }
        let mean = 100_000 / BINS as u32;
        let (min, max) = (bins.iter().min().unwrap(), bins.iter().max().unwrap());
        assert!(
            *min > mean * 3 / 4 && *max < mean * 5 / 4,
            "{min}..{max}, mean {mean}"
        );
    }
}
