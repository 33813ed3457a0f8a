//! The TOML configuration and its validation.
//!
//! [`Config::load`] reads a file, [`Config::parse`] a string. Every table
//! refuses unknown keys. Every error, whether TOML syntax, a wrong type or a
//! failed validation rule, is a [`ConfigError`] naming the file, line, column
//! and key path, e.g.
//! `demo.toml:42:11: services[1].backends[0].address: 10.0.0.1 is IPv4 but the service vip is IPv6`.
//!
//! `config/demo.toml` documents every key.

mod cluster;
mod error;
mod health;
mod queues;
mod types;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::affinity::limits::{AffinityLimits, MinPrefix, OverlapPolicy};
use crate::datapath::flow::FlowTimeouts;
use crate::datapath::icmp::{EchoPolicy, IcmpSettings, DEFAULT_ECHO_RATE, DEFAULT_TOO_BIG_RATE};
use crate::net::IpNet;
use crate::protocol::message::ADMIN_NAME;
use crate::protocol::rate_limit::{
    RateLimits, DEFAULT_ADMIN_MAX_REQUESTS_PER_SECOND, DEFAULT_MAX_REQUESTS_PER_SECOND,
};
use crate::sched::maglev::{is_prime, MaglevTable, MAX_SIZE as MAX_MAGLEV_TABLE_SIZE};
use crate::types::{PortMatch, PROTO_TCP, PROTO_UDP};

pub use cluster::{ClusterConfig, StoreKind};
pub use error::{ConfigError, KeyPath, Seg};
pub use health::{
    AllUnhealthy, HealthConfig, HealthKind, StatusRanges, MAX_HEALTH_INTERVAL, MAX_RISE_FALL,
    MIN_HEALTH_INTERVAL,
};
pub use queues::Spread;
pub use types::{DurationStr, HexKey, MacAddr, MIN_KEY_BYTES};

/// Largest backend weight.
pub const MAX_WEIGHT: u32 = 65535;
/// Largest flow-table capacity per worker and address family.
pub const MAX_FLOW_CAPACITY: usize = crate::datapath::flow::MAX_CAPACITY;
/// Longest flow idle timeout: a day. The flow table keeps times in units of
/// about a millisecond that wrap after about 52 days, so a timeout must stay
/// well below that.
pub const MAX_FLOW_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Longest `affinity_grace` a service may have: a day.
pub const MAX_AFFINITY_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Longest `max_affinity_duration` a service may have: 365 days.
pub const MAX_AFFINITY_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest automatic-affinity `linger`: a day.
pub const MAX_LINGER: Duration = Duration::from_secs(24 * 3600);
/// Largest `[control] max_clock_skew`: ten minutes. The skew is the replay
/// window: a request stamped further from the distributor's clock is
/// refused, and nonces are remembered for that long.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(600);
/// Longest `[control] stop_delay`: five minutes (a service manager's stop
/// timeout must be longer).
pub const MAX_STOP_DELAY: Duration = Duration::from_secs(300);
/// A port's `mtu` when the file gives none (Ethernet's).
pub const DEFAULT_MTU: u16 = 1500;
/// Smallest and largest port `mtu`: IPv6 needs 1280 on every link, and 9216
/// is the largest jumbo frame switches commonly carry.
pub const MTU_RANGE: std::ops::RangeInclusive<u16> = 1280..=9216;
/// Smallest `mtu` of a port that forwards IPv6 in IPv6: IPv6's minimum
/// link MTU and the outer header.
pub const IPV6_IPIP_MIN_MTU: u16 = 1320;
/// Largest ICMP rate (per second) a configuration may set.
pub const MAX_ICMP_RATE: u32 = 1_000_000;
/// Largest `[control] max_requests_per_second` and
/// `admin_max_requests_per_second` (0 is no limit).
pub const MAX_REQUEST_RATE: u32 = 10_000_000;
/// Most workers: each registers with EAL, whose 128 lcore ids
/// (`RTE_MAX_LCORE` of Debian's build) include its main thread's, and
/// takes one queue pair on every port.
pub const MAX_WORKERS: usize = 127;

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub eal: EalConfig,
    pub cores: CoresConfig,
    #[serde(default)]
    pub mempool: MempoolConfig,
    #[serde(default)]
    pub ports: Vec<PortConfig>,
    #[serde(default)]
    pub flow: FlowConfig,
    #[serde(default)]
    pub affinity: AffinityConfig,
    #[serde(default)]
    pub control: ControlConfig,
    #[serde(default)]
    pub icmp: IcmpConfig,
    #[serde(default)]
    pub traffic: Option<TrafficConfig>,
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// Static affinities.
    #[serde(default)]
    pub affinities: Vec<StaticAffinityConfig>,
    /// Several instances sharing the requested affinities (None: alone).
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

/// DPDK EAL arguments (without the program name; the `--vdev` arguments for
/// virtual devices are derived from `[[ports]]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EalConfig {
    #[serde(default)]
    pub args: Vec<String>,
}

/// The CPU EAL puts its main thread on where `args` say so plainly: the
/// `--main-lcore`, else the lowest core of `-l` or `-c` (lcore n runs on
/// CPU n). None without such a list, with `--lcores` (whose mapping `run`
/// checks once EAL has applied it) or with one EAL will refuse itself.
fn eal_main_cpu(args: &[String]) -> Option<usize> {
    if args.iter().any(|a| a.starts_with("--lcores")) {
        return None;
    }
    if let Some(n) = eal_option(args, "--main-lcore") {
        return n.trim().parse().ok();
    }
    if let Some(list) = eal_option(args, "-l") {
        return list
            .split(',')
            .map(|r| {
                r.split_once('-')
                    .map_or(r, |(lo, _)| lo)
                    .trim()
                    .parse::<usize>()
            })
            .collect::<Result<Vec<_>, _>>()
            .ok()?
            .into_iter()
            .min();
    }
    let mask = eal_option(args, "-c")?.trim();
    let hex = mask
        .strip_prefix("0x")
        .or_else(|| mask.strip_prefix("0X"))
        .unwrap_or(mask);
    hex.chars().rev().enumerate().find_map(|(i, c)| {
        let d = c.to_digit(16)?;
        (d != 0).then(|| i * 4 + d.trailing_zeros() as usize)
    })
}

/// The value of an EAL option given as `NAME VALUE`, as `NAME=VALUE` (a
/// long option) or as `NAMEVALUE` (a short one).
fn eal_option<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        let rest = a.strip_prefix(name)?;
        if rest.is_empty() {
            args.get(i + 1).map(String::as_str)
        } else if name.starts_with("--") {
            rest.strip_prefix('=')
        } else {
            Some(rest)
        }
    })
}

/// Longest `[cores] idle_sleep`.
pub const MAX_IDLE_SLEEP: Duration = Duration::from_millis(10);

/// The core plan.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoresConfig {
    /// Core of the main/control thread (EAL main lcore).
    pub control: usize,
    /// One worker per entry, pinned to that core; each gets one RX and one
    /// TX queue on every port.
    pub workers: Vec<usize>,
    /// Let workers share a CPU with each other and with the control core
    /// (tests, small machines). Off: every worker has a core of its own.
    #[serde(default)]
    pub share_cpus: bool,
    /// A worker whose poll found every receive queue empty sleeps this long
    /// before polling again, leaving the CPU to whatever shares it. Off (the
    /// default): a worker polls without pause, as on a core of its own.
    #[serde(default)]
    pub idle_sleep: Option<DurationStr>,
}

impl CoresConfig {
    /// The CPUs more than one thread of the plan is pinned to (the control
    /// thread counts as one), in order.
    pub fn shared_cpus(&self) -> Vec<usize> {
        let mut count: BTreeMap<usize, usize> = BTreeMap::new();
        for &c in std::iter::once(&self.control).chain(&self.workers) {
            *count.entry(c).or_insert(0) += 1;
        }
        count
            .into_iter()
            .filter(|&(_, n)| n > 1)
            .map(|(c, _)| c)
            .collect()
    }
}

/// The packet-buffer pool.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MempoolConfig {
    /// Number of mbufs (2^n - 1 is most memory-efficient).
    pub mbufs: u32,
    /// Per-core mbuf cache.
    pub cache: u32,
}

impl Default for MempoolConfig {
    fn default() -> MempoolConfig {
        MempoolConfig {
            mbufs: 16383,
            cache: 256,
        }
    }
}

fn default_descriptors() -> u16 {
    1024
}

fn default_mtu() -> u16 {
    DEFAULT_MTU
}

/// A DPDK port.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// Name other keys refer to.
    pub name: String,
    /// DPDK device: a PCI address ("0000:3b:00.0") or a vdev string
    /// ("net_ring0", "net_pcap0,rx_pcap=in.pcap,tx_pcap=out.pcap", ...).
    pub device: String,
    #[serde(default = "default_descriptors")]
    pub rx_descriptors: u16,
    #[serde(default = "default_descriptors")]
    pub tx_descriptors: u16,
    /// Next-hop MAC, on this port's link, for packets forwarded out of
    /// this port to `ipip` backends that have no MAC of their own.
    #[serde(default)]
    pub gateway_mac: Option<MacAddr>,
    /// Port that transmits packets forwarded from this one (default: this).
    #[serde(default)]
    pub forward_to: Option<String>,
    /// Port that receives non-service traffic arriving here (default: drop).
    #[serde(default)]
    pub unmatched_to: Option<String>,
    /// Longest IP packet the port's link carries: a packet forwarded out of
    /// this port that would be longer once encapsulated is answered with
    /// ICMP (DF set, or IPv6) or sent in fragments (IPv4 without DF).
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// Receive frames whatever their destination MAC (default: see
    /// [`PortConfig::promiscuous`]).
    #[serde(default)]
    pub promiscuous: Option<bool>,
}

impl PortConfig {
    /// Whether the port receives frames whatever their destination MAC:
    /// as configured, else off for a NIC (its own filter drops the frames
    /// for other hosts a switch floods, which several instances on one
    /// segment would otherwise each forward) and on for a virtual device
    /// (its frames may carry any MAC: a capture, a test bed's).
    pub fn promiscuous(&self) -> bool {
        self.promiscuous.unwrap_or(!self.is_pci())
    }

    /// True when the device is a PCI address rather than a virtual device.
    pub fn is_pci(&self) -> bool {
        let d = self.device.split(',').next().unwrap_or_default();
        d.contains(':')
            && d.contains('.')
            && d.bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
    }
}

/// The per-worker connection table.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowConfig {
    /// IPv4 flows per worker (rounded up to a multiple of 4).
    pub capacity: usize,
    /// IPv6 flows per worker (rounded up to a multiple of 4); absent: a
    /// quarter of `capacity` (see [`FlowConfig::v6_capacity`]).
    pub capacity_v6: Option<usize>,
    pub syn_timeout: DurationStr,
    pub established_timeout: DurationStr,
    pub fin_timeout: DurationStr,
    pub udp_timeout: DurationStr,
    /// SYNs per second on one worker past which its SYN flood guard
    /// engages and it forwards SYNs without flow entries (module
    /// `datapath::syn_guard`); 0: never.
    pub syn_flood_rate: u32,
}

impl Default for FlowConfig {
    fn default() -> FlowConfig {
        FlowConfig {
            capacity: 1 << 20,
            capacity_v6: None,
            syn_timeout: DurationStr::secs(10),
            established_timeout: DurationStr::secs(300),
            fin_timeout: DurationStr::secs(10),
            udp_timeout: DurationStr::secs(60),
            syn_flood_rate: crate::datapath::syn_guard::DEFAULT_RATE,
        }
    }
}

impl FlowConfig {
    /// IPv6 flows per worker: `capacity_v6`, or a quarter of `capacity`
    /// (IPv6 slots take twice the bytes, and IPv6 is the smaller share of
    /// traffic in most places).
    pub fn v6_capacity(&self) -> usize {
        self.capacity_v6.unwrap_or((self.capacity / 4).max(1))
    }
}

/// Affinity table sizes.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AffinityConfig {
    /// Most affinities (created and static) at once.
    pub capacity: usize,
    /// Most client pins held by automatic affinity at once.
    pub auto_capacity: usize,
    /// Where requested affinities are kept across restarts (None: they
    /// are not).
    pub state_file: Option<PathBuf>,
}

impl Default for AffinityConfig {
    fn default() -> AffinityConfig {
        AffinityConfig {
            capacity: 1 << 20,
            auto_capacity: 1 << 16,
            state_file: None,
        }
    }
}

/// What pktdist does with ICMP beyond forwarding errors (`[icmp]`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IcmpConfig {
    /// Answer echo requests to every VIP.
    pub echo: bool,
    /// Answer echo requests to these VIPs only (with `echo` false).
    pub echo_vips: Vec<IpAddr>,
    /// Echo replies per second per worker (bursts of as many).
    pub echo_rate: u32,
    /// "Fragmentation needed" / "packet too big" answers per second to one
    /// client address, per worker (bursts of as many); 0: never answer.
    pub too_big_rate: u32,
}

impl Default for IcmpConfig {
    fn default() -> IcmpConfig {
        IcmpConfig {
            echo: false,
            echo_vips: Vec::new(),
            echo_rate: DEFAULT_ECHO_RATE,
            too_big_rate: DEFAULT_TOO_BIG_RATE,
        }
    }
}

/// The control thread.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// UDP address of the affinity/control protocol.
    pub listen: SocketAddr,
    /// Source networks requests are accepted from.
    pub allowed_networks: Vec<IpNet>,
    /// Largest difference between a request's timestamp and our clock.
    pub max_clock_skew: DurationStr,
    /// HTTP address of the Prometheus endpoint (none: disabled).
    pub metrics_listen: Option<SocketAddr>,
    /// Period of the status line of `pktdist run`.
    pub status_interval: DurationStr,
    /// How long a stopping instance goes on forwarding, not ready, before
    /// its workers stop: time for the routers to withdraw it.
    pub stop_delay: DurationStr,
    /// Requests per second one backend name may make (0: no limit).
    pub max_requests_per_second: u32,
    /// Requests per second the operator (`admin`) may make (0: no limit).
    pub admin_max_requests_per_second: u32,
    /// HMAC keys: backend (application) name -> key; "admin" is the
    /// operator's key.
    pub keys: BTreeMap<String, HexKey>,
}

impl ControlConfig {
    /// The request rate limits of the protocol server.
    pub fn rate_limits(&self) -> RateLimits {
        RateLimits {
            per_sender: self.max_requests_per_second,
            admin: self.admin_max_requests_per_second,
        }
    }
}

impl Default for ControlConfig {
    fn default() -> ControlConfig {
        ControlConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            allowed_networks: vec![
                IpNet {
                    addr: IpAddr::from([127, 0, 0, 0]),
                    prefix: 8,
                },
                IpNet {
                    addr: IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
                    prefix: 128,
                },
            ],
            max_clock_skew: DurationStr::secs(30),
            metrics_listen: None,
            status_interval: DurationStr::secs(2),
            stop_delay: DurationStr::secs(0),
            max_requests_per_second: DEFAULT_MAX_REQUESTS_PER_SECOND,
            admin_max_requests_per_second: DEFAULT_ADMIN_MAX_REQUESTS_PER_SECOND,
            keys: BTreeMap::new(),
        }
    }
}

/// The largest `[traffic] packet_size`: a frame (without its 4-byte FCS)
/// is written into one buffer, whose data room is 2,048 bytes.
pub const MAX_TRAFFIC_PACKET: u16 = 2048 + 4;

/// The most `[traffic] concurrent_flows`: the source keeps each flow's
/// state (32 bytes) in memory.
pub const MAX_TRAFFIC_FLOWS: u32 = 1 << 24;
/// Source ports each client of the traffic source cycles through (1024 to
/// 65535): `concurrent_flows` needs a client for every this many.
pub const TRAFFIC_SOURCE_PORTS: u32 = 64_512;

/// The built-in traffic source.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficConfig {
    /// Port whose RX queues the source feeds.
    pub port: String,
    #[serde(default = "TrafficConfig::default_clients")]
    pub clients: u32,
    #[serde(default = "TrafficConfig::default_concurrent")]
    pub concurrent_flows: u32,
    #[serde(default = "TrafficConfig::default_ppf")]
    pub packets_per_flow: u32,
    /// Bytes per frame, its FCS included: 64 to [`MAX_TRAFFIC_PACKET`].
    #[serde(default = "TrafficConfig::default_size")]
    pub packet_size: u16,
    /// Packets per second in total; 0 = as fast as possible.
    #[serde(default)]
    pub rate_pps: u64,
    /// Fraction of flows sent over IPv6 (to IPv6 services).
    #[serde(default)]
    pub ipv6_share: f64,
}

impl TrafficConfig {
    fn default_clients() -> u32 {
        4096
    }
    fn default_concurrent() -> u32 {
        16384
    }
    fn default_ppf() -> u32 {
        8
    }
    fn default_size() -> u16 {
        64
    }
}

/// L4 protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// Scheduler of new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    #[default]
    Maglev,
    RoundRobin,
}

/// What a service's consistent hash reads: `"connection"` (the 5-tuple, the
/// default) or `"client"` (the client's address alone, so all of a client's
/// connections meet on one backend on every instance).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashInput {
    #[default]
    Connection,
    Client,
}

/// Forwarding mode (both are direct server return).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    Ipip,
    L2,
}

/// Automatic affinity for parallel connections.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoAffinityConfig {
    /// How long the pin outlives the client's last connection.
    #[serde(default)]
    pub linger: DurationStr,
}

fn default_max_affinity() -> DurationStr {
    DurationStr::secs(3600)
}

fn default_affinity_grace() -> DurationStr {
    DurationStr::secs(30)
}

/// A service.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default)]
    pub scheduler: Scheduler,
    /// What Maglev hashes: the connection or the client address.
    #[serde(default)]
    pub hash: HashInput,
    pub forwarding: Forwarding,
    /// Outer source address for `ipip` (same family as the VIP).
    #[serde(default)]
    pub ipip_source: Option<IpAddr>,
    /// Maglev table size (a prime >= 100 x backends); default
    /// [`MaglevTable::default_size`].
    #[serde(default)]
    pub maglev_table_size: Option<usize>,
    #[serde(default = "default_max_affinity")]
    pub max_affinity_duration: DurationStr,
    /// How long a backend may stay down before its requested affinities
    /// end with BACKEND_DOWN.
    #[serde(default = "default_affinity_grace")]
    pub affinity_grace: DurationStr,
    /// Present: automatic affinity is on.
    #[serde(default)]
    pub auto_affinity: Option<AutoAffinityConfig>,
    /// Shortest prefix a backend may pin, per family.
    #[serde(default)]
    pub min_prefix: MinPrefix,
    /// Requested affinities one backend may hold; default twice an even
    /// share of `[affinity] capacity` among the service's backends.
    #[serde(default)]
    pub max_affinities_per_backend: Option<u32>,
    /// Whether a backend may pin clients another backend's affinity covers.
    #[serde(default)]
    pub affinity_overlap: OverlapPolicy,
    /// Present: the backends are checked actively.
    #[serde(default)]
    pub health: Option<HealthConfig>,
    /// While the checks hold every backend down: spread new connections
    /// over them (default) or drop them.
    #[serde(default)]
    pub all_unhealthy: AllUnhealthy,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
}

impl ServiceConfig {
    /// What one backend may pin on this service.
    pub fn affinity_limits(&self) -> AffinityLimits {
        AffinityLimits {
            min_prefix: self.min_prefix,
            max_per_backend: self.max_affinities_per_backend,
            overlap: self.affinity_overlap,
        }
    }

    /// The Maglev table size: configured, or the default for the backends.
    pub fn maglev_size(&self) -> usize {
        self.maglev_table_size
            .unwrap_or_else(|| MaglevTable::default_size(self.backends.len()))
    }
}

fn default_weight() -> u32 {
    100
}

/// A backend of a service.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub name: String,
    pub address: IpAddr,
    /// Required for `l2`; for `ipip` the next hop (else the port's
    /// gateway_mac).
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// 0..=65535; 0 = draining.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Where the service's health checks reach this backend through the
    /// host's own network stack (default: `address`).
    #[serde(default)]
    pub health_address: Option<IpAddr>,
}

impl BackendConfig {
    /// The address health checks go to.
    pub fn health_address(&self) -> IpAddr {
        self.health_address.unwrap_or(self.address)
    }
}

/// A static affinity from the configuration (never expires).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticAffinityConfig {
    /// Service name.
    pub service: String,
    /// Client network.
    pub client: IpNet,
    #[serde(default)]
    pub client_port: PortMatch,
    /// Backend name within the service.
    pub backend: String,
}

/// A validation failure before it is located in the text.
struct Invalid(KeyPath, String);

type Check = Result<(), Invalid>;

/// A MAC a frame can be sent to: not all zeros, not group (multicast or
/// broadcast).
fn unicast_mac(m: MacAddr) -> Result<(), String> {
    if crate::net::is_unicast_mac(m.0) {
        Ok(())
    } else if m.0 == [0; 6] {
        Err(format!("{m} is not a station's address"))
    } else {
        Err(format!("{m} is a group (multicast or broadcast) address"))
    }
}

/// An address of one host: not unspecified, multicast or broadcast.
fn host_address(a: &IpAddr) -> Result<(), String> {
    if crate::net::is_host_address(a) {
        Ok(())
    } else {
        Err(format!("{a} is not the address of one host"))
    }
}

fn fail(path: KeyPath, msg: impl Into<String>) -> Check {
    Err(Invalid(path, msg.into()))
}

/// Why no backend is named [`ADMIN_NAME`].
pub const ADMIN_RESERVED: &str =
    "\"admin\" is the operator's name in the control protocol: no backend may have it";

/// Why a `what` name is longer than the control protocol and the cluster
/// store carry ([`crate::types::MAX_NAME_LEN`] bytes), if it is.
fn too_long(what: &str, name: &str) -> Option<String> {
    (name.len() > crate::types::MAX_NAME_LEN).then(|| {
        format!(
            "{what} name of {} bytes: names are at most {} bytes",
            name.len(),
            crate::types::MAX_NAME_LEN
        )
    })
}

/// A state file path pktdist can write: a file name in a directory that
/// exists, and not itself a directory.
fn state_file_ok(path: &Path) -> Result<(), String> {
    let shown = path.display();
    if path.file_name().is_none() {
        return Err(format!("{shown:?} names no file"));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!(
            "{shown:?}: its directory {} does not exist",
            dir.display()
        ));
    }
    if path.is_dir() {
        return Err(format!("{shown:?} is a directory"));
    }
    Ok(())
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: shown.clone(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, &shown)
    }

    /// Parses and validates configuration text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| error::from_toml(file, text, &e))?;
        cfg.validate()
            .map_err(|Invalid(path, msg)| error::at_path(file, text, &path, msg))?;
        Ok(cfg)
    }

    /// Validates a configuration put together in memory (a reload's: the
    /// file's services over the settings running until a restart), as
    /// [`Config::parse`] validates a file: the offending key and why.
    pub fn check(&self) -> Result<(), String> {
        self.validate()
            .map_err(|Invalid(path, msg)| format!("{path}: {msg}"))
    }

    /// The flow-table timeouts.
    pub fn flow_timeouts(&self) -> FlowTimeouts {
        FlowTimeouts {
            syn: self.flow.syn_timeout.0,
            established: self.flow.established_timeout.0,
            fin: self.flow.fin_timeout.0,
            udp: self.flow.udp_timeout.0,
        }
    }

    /// The workers' ICMP settings.
    pub fn icmp_settings(&self) -> IcmpSettings {
        let i = &self.icmp;
        let echo = if i.echo {
            EchoPolicy::All
        } else if i.echo_vips.is_empty() {
            EchoPolicy::Off
        } else {
            EchoPolicy::Only(
                i.echo_vips
                    .iter()
                    .map(|a| match a {
                        IpAddr::V4(v) => (crate::types::Family::V4, u32::from(*v) as u128),
                        IpAddr::V6(v) => (crate::types::Family::V6, u128::from(*v)),
                    })
                    .collect(),
            )
        };
        IcmpSettings {
            echo,
            echo_rate: i.echo_rate,
            too_big_rate: i.too_big_rate,
        }
    }

    /// Index of the port with this name.
    pub fn port_index(&self, name: &str) -> Option<usize> {
        self.ports.iter().position(|p| p.name == name)
    }

    /// Index of the port that transmits what port `i` forwards: its
    /// `forward_to`, else itself. The next hop (`gateway_mac`) and the
    /// link MTU of forwarded packets are that port's.
    pub fn forwarding_port(&self, i: usize) -> usize {
        self.ports[i]
            .forward_to
            .as_deref()
            .and_then(|n| self.port_index(n))
            .unwrap_or(i)
    }

    /// A port whose forwarded packets leave by a port without a
    /// `gateway_mac` (where `ipip` backends need MACs of their own).
    fn port_without_gateway(&self) -> Option<usize> {
        (0..self.ports.len()).find(|&i| self.ports[self.forwarding_port(i)].gateway_mac.is_none())
    }

    /// True when every port packets are forwarded out of has a
    /// `gateway_mac`: `ipip` backends need no MAC of their own.
    pub fn gateways_everywhere(&self) -> bool {
        self.port_without_gateway().is_none()
    }

    /// Buffers the ports' rings hold at most: the receive rings alone (a
    /// NIC fills every receive descriptor when it starts), and all rings
    /// with the per-thread caches (transmitted frames wait in a transmit
    /// ring until the driver frees them).
    pub fn ring_mbufs(&self) -> (u64, u64) {
        let queues = self.cores.workers.len() as u64;
        let rx: u64 = self
            .ports
            .iter()
            .map(|p| queues * u64::from(p.rx_descriptors))
            .sum();
        let tx: u64 = self
            .ports
            .iter()
            .map(|p| queues * u64::from(p.tx_descriptors))
            .sum();
        let caches = (queues + 1) * u64::from(self.mempool.cache);
        (rx, rx + tx + caches)
    }

    fn validate(&self) -> Check {
        let root = KeyPath::root();
        self.validate_cores(&root.key("cores"))?;
        self.validate_ports(&root.key("ports"))?;
        self.validate_sections(&root)?;
        self.validate_services(&root.key("services"))?;
        self.validate_next_hops(&root.key("ports"))?;
        self.validate_icmp(&root.key("icmp"))?;
        if let Some(c) = &self.cluster {
            if self.affinity.state_file.is_some() {
                return fail(
                    root.key("affinity").key("state_file"),
                    "state_file and [cluster] exclude each other: in cluster mode the store \
                     keeps the affinities",
                );
            }
            c.validate(&root.key("cluster"))?;
        }
        self.validate_affinities(&root.key("affinities"))
    }

    fn validate_cores(&self, p: &KeyPath) -> Check {
        let c = &self.cores;
        if c.workers.is_empty() {
            return fail(p.key("workers"), "at least one worker core is required");
        }
        if c.workers.len() > MAX_WORKERS {
            return fail(
                p.key("workers"),
                format!(
                    "{} workers: at most {MAX_WORKERS} (each takes a DPDK lcore id and a queue pair on every port)",
                    c.workers.len()
                ),
            );
        }
        if let Some(d) = c.idle_sleep {
            if d.0.is_zero() || d.0 > MAX_IDLE_SLEEP {
                return fail(
                    p.key("idle_sleep"),
                    format!(
                        "{d}: must be longer than 0 and at most {} (leave it out to poll without pause)",
                        DurationStr(MAX_IDLE_SLEEP)
                    ),
                );
            }
        }
        if c.share_cpus {
            return Ok(());
        }
        let mut seen = HashSet::new();
        for (i, &w) in c.workers.iter().enumerate() {
            if w == c.control {
                return fail(
                    p.key("workers").index(i),
                    format!(
                        "core {w} is also the control core (share_cpus = true allows it, for tests and small machines)"
                    ),
                );
            }
            if !seen.insert(w) {
                return fail(
                    p.key("workers").index(i),
                    format!(
                        "core {w} is listed twice (share_cpus = true allows it, for tests and small machines)"
                    ),
                );
            }
        }
        Ok(())
    }

    fn validate_ports(&self, p: &KeyPath) -> Check {
        if self.ports.is_empty() {
            return fail(p.clone(), "no [[ports]]: at least one port is required");
        }
        let mut names = HashSet::new();
        let mut devices = HashSet::new();
        for (i, port) in self.ports.iter().enumerate() {
            let pp = p.index(i);
            if port.name.is_empty() {
                return fail(pp.key("name"), "a port needs a name");
            }
            if !names.insert(port.name.as_str()) {
                return fail(
                    pp.key("name"),
                    format!("port {:?} is defined twice", port.name),
                );
            }
            if port.device.trim().is_empty() {
                return fail(pp.key("device"), "a port needs a DPDK device");
            }
            let dev = queues::device_name(&port.device);
            if !devices.insert(dev.clone()) {
                return fail(
                    pp.key("device"),
                    format!("device {dev:?} is used by two ports"),
                );
            }
            if let Err(e) = port.check_queues(self.cores.workers.len()) {
                return fail(pp.key("device"), e);
            }
            if let Some(m) = port.gateway_mac {
                if let Err(e) = unicast_mac(m) {
                    return fail(pp.key("gateway_mac"), e);
                }
            }
            if !MTU_RANGE.contains(&port.mtu) {
                return fail(
                    pp.key("mtu"),
                    format!(
                        "{} is out of range {}..={}",
                        port.mtu,
                        MTU_RANGE.start(),
                        MTU_RANGE.end()
                    ),
                );
            }
            for (k, n) in [
                ("rx_descriptors", port.rx_descriptors),
                ("tx_descriptors", port.tx_descriptors),
            ] {
                if !(64..=32768).contains(&n) || !n.is_power_of_two() {
                    return fail(
                        pp.key(k),
                        format!("{n} descriptors: must be a power of two in 64..=32768"),
                    );
                }
            }
        }
        for (i, port) in self.ports.iter().enumerate() {
            for (k, target) in [
                ("forward_to", &port.forward_to),
                ("unmatched_to", &port.unmatched_to),
            ] {
                if let Some(t) = target {
                    if self.port_index(t).is_none() {
                        return fail(p.index(i).key(k), format!("no port named {t:?}"));
                    }
                }
            }
            // Unmatched frames sent back out of the port they came in on
            // would echo the segment's broadcasts (and, on a promiscuous
            // port, other hosts' frames) onto it, and between two such
            // instances forever.
            if port.unmatched_to.as_deref() == Some(port.name.as_str()) {
                return fail(
                    p.index(i).key("unmatched_to"),
                    format!(
                        "{:?} is this port: unmatched frames go to another port",
                        port.name
                    ),
                );
            }
        }
        Ok(())
    }

    fn validate_sections(&self, root: &KeyPath) -> Check {
        if let Some(cpu) = eal_main_cpu(&self.eal.args).filter(|&c| c != self.cores.control) {
            return fail(
                root.key("eal").key("args"),
                format!(
                    "the core list puts EAL's main thread, pktdist's control thread, on CPU \
                     {cpu}, not on [cores] control = {}: leave the core list (-l, -c, \
                     --main-lcore) out, or start it with the control core",
                    self.cores.control
                ),
            );
        }
        // Workers free the mbufs other workers received (and EAL's
        // threads those of the ports' queues): the pool must take puts and
        // gets from several threads at once.
        let ops = eal_option(&self.eal.args, "--mbuf-pool-ops-name");
        if let Some(ops) = ops.filter(|o| ["ring_sp_sc", "ring_sp_mc", "ring_mp_sc"].contains(o)) {
            return fail(
                root.key("eal").key("args"),
                format!(
                    "--mbuf-pool-ops-name {ops}: the mbuf pool is used by several threads at once \
                     (workers free each other's mbufs); use a multi-producer, multi-consumer one \
                     (the default ring_mp_mc, ring_mt_rts, ring_mt_hts, stack)"
                ),
            );
        }
        let m = &self.mempool;
        if m.mbufs < 1024 {
            return fail(
                root.key("mempool").key("mbufs"),
                format!("{} mbufs: at least 1024 are needed", m.mbufs),
            );
        }
        if m.cache > 512 || m.cache >= m.mbufs {
            return fail(
                root.key("mempool").key("cache"),
                format!("cache {} must be at most 512 and below mbufs", m.cache),
            );
        }
        let (rx, _) = self.ring_mbufs();
        if u64::from(m.mbufs) <= rx {
            return fail(
                root.key("mempool").key("mbufs"),
                format!(
                    "{} mbufs cannot fill the receive rings: {} worker queue(s) per port and the \
                     ports' rx_descriptors take {rx} (a NIC fills every receive descriptor \
                     when it starts), and frames in flight need more: raise mbufs or lower \
                     rx_descriptors",
                    m.mbufs,
                    self.cores.workers.len()
                ),
            );
        }
        let f = &self.flow;
        let fp = root.key("flow");
        for (k, v) in [
            ("capacity", Some(f.capacity)),
            ("capacity_v6", f.capacity_v6),
        ] {
            if let Some(v) = v.filter(|&v| v == 0 || v > MAX_FLOW_CAPACITY) {
                return fail(
                    fp.key(k),
                    format!("{v} flows: must be in 1..={MAX_FLOW_CAPACITY}"),
                );
            }
        }
        for (k, d) in [
            ("syn_timeout", f.syn_timeout),
            ("established_timeout", f.established_timeout),
            ("fin_timeout", f.fin_timeout),
            ("udp_timeout", f.udp_timeout),
        ] {
            if d.0.is_zero() {
                return fail(fp.key(k), "a timeout must be longer than 0");
            }
            if d.0 > MAX_FLOW_TIMEOUT {
                return fail(
                    fp.key(k),
                    format!(
                        "{d}: a timeout must be at most {}",
                        DurationStr(MAX_FLOW_TIMEOUT)
                    ),
                );
            }
        }
        let a = &self.affinity;
        for (k, v, max) in [
            ("capacity", a.capacity, crate::affinity::table::MAX_CAPACITY),
            (
                "auto_capacity",
                a.auto_capacity,
                crate::affinity::auto::MAX_CAPACITY,
            ),
        ] {
            if v == 0 || v > max {
                return fail(
                    root.key("affinity").key(k),
                    format!("{v}: must be in 1..={max}"),
                );
            }
        }
        if let Some(path) = &a.state_file {
            if let Err(why) = state_file_ok(path) {
                return fail(root.key("affinity").key("state_file"), why);
            }
        }
        let c = &self.control;
        let cp = root.key("control");
        if c.status_interval.0.is_zero() {
            return fail(cp.key("status_interval"), "must be longer than 0");
        }
        if c.max_clock_skew.0.is_zero() {
            return fail(cp.key("max_clock_skew"), "must be longer than 0");
        }
        for (k, v, max) in [
            ("max_clock_skew", c.max_clock_skew, MAX_CLOCK_SKEW),
            ("stop_delay", c.stop_delay, MAX_STOP_DELAY),
        ] {
            if v.0 > max {
                return fail(
                    cp.key(k),
                    format!("{v}: must be at most {}", DurationStr(max)),
                );
            }
        }
        for (k, v) in [
            ("max_requests_per_second", c.max_requests_per_second),
            (
                "admin_max_requests_per_second",
                c.admin_max_requests_per_second,
            ),
        ] {
            if v > MAX_REQUEST_RATE {
                return fail(
                    cp.key(k),
                    format!("{v} is out of range 0..={MAX_REQUEST_RATE} (0: no limit)"),
                );
            }
        }
        // Port 0 asks for any free port: two of them do not collide.
        if c.listen.port() != 0 && c.metrics_listen == Some(c.listen) {
            return fail(cp.key("metrics_listen"), "is the same address as listen");
        }
        for name in c.keys.keys() {
            if name.is_empty() {
                return fail(cp.key("keys"), "a key needs a name");
            }
            if let Some(e) = too_long("key", name) {
                return fail(cp.key("keys"), e);
            }
        }
        if let Some(t) = &self.traffic {
            let tp = root.key("traffic");
            let Some(port) = self.port_index(&t.port) else {
                return fail(tp.key("port"), format!("no port named {:?}", t.port));
            };
            if self.forwarding_port(port) == port {
                return fail(
                    tp.key("port"),
                    format!(
                        "{}: its forward_to must name another port (the source transmits on {} and drains where the workers forward)",
                        t.port, t.port
                    ),
                );
            }
            for (k, v) in [
                ("clients", t.clients),
                ("concurrent_flows", t.concurrent_flows),
            ] {
                if v == 0 {
                    return fail(tp.key(k), "must be at least 1");
                }
            }
            if t.packets_per_flow < 2 {
                return fail(
                    tp.key("packets_per_flow"),
                    "must be at least 2 (a connection's SYN and FIN)",
                );
            }
            if t.concurrent_flows > MAX_TRAFFIC_FLOWS {
                return fail(
                    tp.key("concurrent_flows"),
                    format!(
                        "{}: at most {MAX_TRAFFIC_FLOWS} (the source keeps each flow in memory)",
                        t.concurrent_flows
                    ),
                );
            }
            let clients = t.concurrent_flows.div_ceil(TRAFFIC_SOURCE_PORTS);
            if clients > t.clients {
                return fail(
                    tp.key("concurrent_flows"),
                    format!(
                        "{} concurrent flows need at least {clients} clients (each has {TRAFFIC_SOURCE_PORTS} source ports, and no two open connections may be one flow)",
                        t.concurrent_flows
                    ),
                );
            }
            if !(64..=MAX_TRAFFIC_PACKET).contains(&t.packet_size) {
                return fail(
                    tp.key("packet_size"),
                    format!(
                        "{} bytes: must be in 64..={MAX_TRAFFIC_PACKET} (a frame fits one buffer)",
                        t.packet_size
                    ),
                );
            }
            if !(0.0..=1.0).contains(&t.ipv6_share) {
                return fail(
                    tp.key("ipv6_share"),
                    format!("{}: must be between 0.0 and 1.0", t.ipv6_share),
                );
            }
        }
        Ok(())
    }

    fn validate_services(&self, p: &KeyPath) -> Check {
        if self.services.is_empty() {
            return fail(
                p.clone(),
                "no [[services]]: at least one service is required",
            );
        }
        if self.services.len() > crate::types::MAX_SERVICES {
            return fail(
                p.clone(),
                format!("at most {} services", crate::types::MAX_SERVICES),
            );
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut vips: HashMap<(IpAddr, u16, Protocol), usize> = HashMap::new();
        let mut backends_total = 0usize;
        for (i, s) in self.services.iter().enumerate() {
            let sp = p.index(i);
            if s.name.is_empty() {
                return fail(sp.key("name"), "a service needs a name");
            }
            if let Some(e) = too_long("service", &s.name) {
                return fail(sp.key("name"), e);
            }
            if let Some(j) = names.insert(&s.name, i) {
                return fail(
                    sp.key("name"),
                    format!("service name {:?} is already used by services[{j}]", s.name),
                );
            }
            if let Some(j) = vips.insert((s.vip, s.port, s.protocol), i) {
                return fail(
                    sp.key("vip"),
                    format!(
                        "{} port {} {} is already served by services[{j}] ({:?})",
                        s.vip,
                        s.port,
                        s.protocol.name(),
                        self.services[j].name
                    ),
                );
            }
            if s.port == 0 {
                return fail(sp.key("port"), "port 0 is not a service port");
            }
            if let Err(e) = host_address(&s.vip) {
                return fail(sp.key("vip"), e);
            }
            if let Some(Err(e)) = s.ipip_source.as_ref().map(host_address) {
                return fail(sp.key("ipip_source"), e);
            }
            let fam = crate::net::family_name(&s.vip);
            match (s.forwarding, s.ipip_source) {
                (Forwarding::Ipip, None) => {
                    return fail(
                        sp.key("ipip_source"),
                        "forwarding = \"ipip\" needs ipip_source (the outer source address)",
                    )
                }
                (Forwarding::L2, Some(_)) => {
                    return fail(
                        sp.key("ipip_source"),
                        "ipip_source is for forwarding = \"ipip\" (l2 sends the client's packet \
                         as it came)",
                    )
                }
                (_, Some(src)) if src.is_ipv4() != s.vip.is_ipv4() => {
                    return fail(
                        sp.key("ipip_source"),
                        format!(
                            "{src} is {} but the service vip is {fam}",
                            crate::net::family_name(&src)
                        ),
                    )
                }
                _ => {}
            }
            if s.hash == HashInput::Client && s.scheduler != Scheduler::Maglev {
                return fail(
                    sp.key("hash"),
                    "hash = \"client\" needs scheduler = \"maglev\" (round robin reads no hash)",
                );
            }
            if let Some(size) = s.maglev_table_size {
                let need = 100 * s.backends.len();
                if size > MAX_MAGLEV_TABLE_SIZE {
                    return fail(
                        sp.key("maglev_table_size"),
                        format!("{size} is above the largest table, {MAX_MAGLEV_TABLE_SIZE}"),
                    );
                }
                if !is_prime(size) {
                    return fail(
                        sp.key("maglev_table_size"),
                        format!("{size} is not a prime"),
                    );
                }
                if size < need {
                    return fail(
                        sp.key("maglev_table_size"),
                        format!(
                            "{size} is below 100 x {} backends = {need}",
                            s.backends.len()
                        ),
                    );
                }
            }
            if s.max_affinity_duration.0.is_zero() {
                return fail(sp.key("max_affinity_duration"), "must be longer than 0");
            }
            if s.max_affinity_duration.0 > MAX_AFFINITY_DURATION {
                return fail(
                    sp.key("max_affinity_duration"),
                    format!("{}: must be at most 365d", s.max_affinity_duration),
                );
            }
            if let Some(a) = s.auto_affinity.filter(|a| a.linger.0 > MAX_LINGER) {
                return fail(
                    sp.key("auto_affinity").key("linger"),
                    format!("{}: the linger must be at most 1d", a.linger),
                );
            }
            for (k, v, max) in [
                ("ipv4", s.min_prefix.ipv4, 32),
                ("ipv6", s.min_prefix.ipv6, 128),
            ] {
                if v > max {
                    return fail(
                        sp.key("min_prefix").key(k),
                        format!("/{v} is longer than an address (0..={max})"),
                    );
                }
            }
            if s.max_affinities_per_backend == Some(0) {
                return fail(
                    sp.key("max_affinities_per_backend"),
                    "must be at least 1 (leave it out for the default share)",
                );
            }
            if s.affinity_grace.0 > MAX_AFFINITY_GRACE {
                return fail(
                    sp.key("affinity_grace"),
                    format!("{}: the grace must be at most 1d", s.affinity_grace),
                );
            }
            if let Some(h) = &s.health {
                h.validate(&sp.key("health"), s.protocol)?;
            }
            let mut bnames = HashSet::new();
            for (j, b) in s.backends.iter().enumerate() {
                let bp = sp.key("backends").index(j);
                if b.name.is_empty() {
                    return fail(bp.key("name"), "a backend needs a name");
                }
                if let Some(e) = too_long("backend", &b.name) {
                    return fail(bp.key("name"), e);
                }
                if b.name == ADMIN_NAME {
                    return fail(bp.key("name"), ADMIN_RESERVED);
                }
                if !bnames.insert(b.name.as_str()) {
                    return fail(
                        bp.key("name"),
                        format!("backend {:?} appears twice in service {:?}", b.name, s.name),
                    );
                }
                if b.address.is_ipv4() != s.vip.is_ipv4() {
                    return fail(
                        bp.key("address"),
                        format!(
                            "{} is {} but the service vip is {fam}",
                            b.address,
                            crate::net::family_name(&b.address)
                        ),
                    );
                }
                if b.weight > MAX_WEIGHT {
                    return fail(
                        bp.key("weight"),
                        format!("{} is out of range 0..={MAX_WEIGHT}", b.weight),
                    );
                }
                if let Err(e) = host_address(&b.address) {
                    return fail(bp.key("address"), e);
                }
                // 0.0.0.0 would check this host, a group address nothing.
                if let Some(Err(e)) = b.health_address.as_ref().map(host_address) {
                    return fail(bp.key("health_address"), e);
                }
                if s.forwarding == Forwarding::L2 && b.mac.is_none() {
                    return fail(bp.key("mac"), "forwarding = \"l2\" needs the backend's mac");
                }
                if let Some(Err(e)) = b.mac.map(unicast_mac) {
                    return fail(bp.key("mac"), e);
                }
            }
            backends_total += s.backends.len();
            // The table's rules, without its build: the control thread
            // builds the tables a reload changes, once.
            if let Err(e) = MaglevTable::check(
                &s.backends
                    .iter()
                    .map(|b| (b.name.as_str(), b.weight))
                    .collect::<Vec<_>>(),
                s.maglev_size(),
            ) {
                return fail(sp.key("backends"), e);
            }
        }
        if backends_total > crate::types::MAX_BACKENDS {
            return fail(
                p.clone(),
                format!(
                    "{backends_total} backends in all: at most {}",
                    crate::types::MAX_BACKENDS
                ),
            );
        }
        Ok(())
    }

    /// Every port's forwarded packets can reach every backend: an `ipip`
    /// backend without a MAC of its own needs a `gateway_mac` on each
    /// forwarding port (or its packets would all be dropped as
    /// `no_route`), and IPv6 in IPv6 needs room for a 1,280-byte packet
    /// plus its 40-byte outer header (a "packet too big" may not announce
    /// less than 1,280: RFC 8200, 8201).
    fn validate_next_hops(&self, p: &KeyPath) -> Check {
        let ipip = || {
            self.services
                .iter()
                .filter(|s| s.forwarding == Forwarding::Ipip)
        };
        let no_mac = ipip().find_map(|s| {
            let b = s.backends.iter().find(|b| b.mac.is_none())?;
            Some((s, b))
        });
        let v6 = ipip().find(|s| s.vip.is_ipv6());
        // Where port i's forwarded packets leave, for the messages.
        let out_of = |i: usize| {
            let o = self.forwarding_port(i);
            let via = if o == i {
                String::new()
            } else {
                format!(" (port {:?} forwards out of it)", self.ports[i].name)
            };
            (o, &self.ports[o], via)
        };
        if let (Some((s, b)), Some(i)) = (no_mac, self.port_without_gateway()) {
            let (o, out, via) = out_of(i);
            return fail(
                p.index(o).key("gateway_mac"),
                format!(
                    "port {:?}{via} has no gateway_mac, and backend {:?} of ipip service \
                     {:?} has no mac: give the port the next hop's MAC, or the backend its own",
                    out.name, b.name, s.name
                ),
            );
        }
        for i in 0..self.ports.len() {
            let (o, out, via) = out_of(i);
            let at = p.index(o);
            if let Some(s) = v6 {
                if out.mtu < IPV6_IPIP_MIN_MTU {
                    return fail(
                        at.key("mtu"),
                        format!(
                            "{}: port {:?}{via} carries IPv6 in IPv6 (service {:?}), which \
                             needs at least {IPV6_IPIP_MIN_MTU} (1280 and the outer header)",
                            out.mtu, out.name, s.name
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    fn validate_icmp(&self, p: &KeyPath) -> Check {
        let i = &self.icmp;
        if i.echo && !i.echo_vips.is_empty() {
            return fail(
                p.key("echo_vips"),
                "echo = true already answers every VIP: list VIPs here with echo = false",
            );
        }
        let mut seen = HashSet::new();
        for (n, vip) in i.echo_vips.iter().enumerate() {
            if !self.services.iter().any(|s| s.vip == *vip) {
                return fail(
                    p.key("echo_vips").index(n),
                    format!("{vip} is not the vip of any service"),
                );
            }
            if !seen.insert(vip) {
                return fail(
                    p.key("echo_vips").index(n),
                    format!("{vip} is listed twice"),
                );
            }
        }
        let echo_on = i.echo || !i.echo_vips.is_empty();
        if (echo_on && i.echo_rate == 0) || i.echo_rate > MAX_ICMP_RATE {
            return fail(
                p.key("echo_rate"),
                format!(
                    "{}: must be in 1..={MAX_ICMP_RATE} (turn echo off to answer none)",
                    i.echo_rate
                ),
            );
        }
        if i.too_big_rate > MAX_ICMP_RATE {
            return fail(
                p.key("too_big_rate"),
                format!("{}: must be in 0..={MAX_ICMP_RATE}", i.too_big_rate),
            );
        }
        Ok(())
    }

    fn validate_affinities(&self, p: &KeyPath) -> Check {
        if self.affinities.len() > self.affinity.capacity {
            return fail(
                p.clone(),
                format!(
                    "{} static affinities exceed affinity.capacity",
                    self.affinities.len()
                ),
            );
        }
        let mut seen: HashMap<(&str, IpNet, PortMatch), usize> = HashMap::new();
        for (i, a) in self.affinities.iter().enumerate() {
            let ap = p.index(i);
            let Some(s) = self.services.iter().find(|s| s.name == a.service) else {
                return fail(
                    ap.key("service"),
                    format!("no service named {:?}", a.service),
                );
            };
            if !s.backends.iter().any(|b| b.name == a.backend) {
                return fail(
                    ap.key("backend"),
                    format!("service {:?} has no backend named {:?}", s.name, a.backend),
                );
            }
            if a.client.addr.is_ipv4() != s.vip.is_ipv4() {
                return fail(
                    ap.key("client"),
                    format!(
                        "{} is {} but the service vip is {}",
                        a.client,
                        crate::net::family_name(&a.client.addr),
                        crate::net::family_name(&s.vip)
                    ),
                );
            }
            // Ports as the table keys them: "80-80" is 80, "0-65535" any.
            let ports = a.client_port.normalized();
            if let Some(j) = seen.insert((a.service.as_str(), a.client, ports), i) {
                return fail(
                    ap.key("client"),
                    format!("the same client and port are already pinned by affinities[{j}]"),
                );
            }
        }
        Ok(())
    }

    /// The resolved plan, as `pktdist check` prints it.
    pub fn plan(&self) -> String {
        let mut o = String::new();
        let nw = self.cores.workers.len();
        let _ = writeln!(o, "EAL arguments: {}", self.eal.args.join(" "));
        let shared = self.cores.shared_cpus();
        let _ = writeln!(
            o,
            "cores: control {}, workers {:?} ({nw} worker{}){}{}",
            self.cores.control,
            self.cores.workers,
            if nw == 1 { "" } else { "s" },
            if shared.is_empty() {
                String::new()
            } else {
                format!(", CPUs {shared:?} shared (share_cpus)")
            },
            match self.cores.idle_sleep {
                Some(d) => format!(", idle workers sleep {d}"),
                None => String::new(),
            }
        );
        let names: Vec<&str> = self.ports.iter().map(|p| p.name.as_str()).collect();
        for (w, core) in self.cores.workers.iter().enumerate() {
            let _ = writeln!(
                o,
                "  worker {w} on core {core}: rx + tx queue {w} of {}",
                names.join(", ")
            );
        }
        let (rx, all) = self.ring_mbufs();
        let _ = writeln!(
            o,
            "mempool: {} mbufs per NUMA socket with ports, cache {} (receive rings take {rx}; all rings and caches up to {all})",
            self.mempool.mbufs, self.mempool.cache
        );
        let _ = writeln!(o, "ports:");
        let fed = self.traffic.as_ref().map(|t| t.port.as_str());
        for (i, p) in self.ports.iter().enumerate() {
            let _ = writeln!(
                o,
                "  [{i}] {} device {} ({}{}): {nw} rx + {nw} tx queue{} (one per worker; {}), {} rx / {} tx descriptors, mtu {}, forwards on {}{}{}",
                p.name,
                p.device,
                if p.is_pci() { "PCI" } else { "virtual" },
                if p.promiscuous() { ", promiscuous" } else { "" },
                if nw == 1 { "" } else { "s" },
                p.spread(nw, fed == Some(p.name.as_str())).describe(),
                p.rx_descriptors,
                p.tx_descriptors,
                p.mtu,
                p.forward_to.as_deref().unwrap_or(&p.name),
                p.gateway_mac.map(|m| format!(", gateway {m}")).unwrap_or_default(),
                p.unmatched_to.as_deref().map(|t| format!(", non-service traffic to {t}")).unwrap_or_default(),
            );
        }
        let f = &self.flow;
        // As the table rounds them.
        let ways = |n: usize| {
            n.clamp(crate::datapath::flow::WAYS, MAX_FLOW_CAPACITY)
                .next_multiple_of(crate::datapath::flow::WAYS)
        };
        let _ = writeln!(
            o,
            "flow table: {} IPv4 + {} IPv6 flows per worker (x{nw}), timeouts syn {} established {} fin {} udp {}, SYN flood guard {}",
            ways(f.capacity),
            ways(f.v6_capacity()),
            f.syn_timeout,
            f.established_timeout,
            f.fin_timeout,
            f.udp_timeout,
            match f.syn_flood_rate {
                0 => "off".to_string(),
                r => format!("above {r} SYNs/s per worker"),
            }
        );
        let _ = writeln!(
            o,
            "affinity: capacity {}, automatic-affinity capacity {}, state file {}",
            self.affinity.capacity,
            self.affinity.auto_capacity,
            self.affinity
                .state_file
                .as_ref()
                .map_or_else(|| "none".to_string(), |p| p.display().to_string())
        );
        if let Some(cl) = &self.cluster {
            let _ = writeln!(
                o,
                "cluster: instance {}, affinities shared through etcd at {} under {}, {}, requests time out after {}",
                cl.instance,
                cl.endpoints.join(" "),
                cl.prefix,
                match (&cl.user, &cl.cert_file) {
                    (Some(u), _) => format!("as user {u}"),
                    (None, Some(_)) => "with a client certificate".to_string(),
                    (None, None) => "without authentication".to_string(),
                },
                cl.timeout
            );
        }
        let c = &self.control;
        let _ = writeln!(
            o,
            "control: listen udp {}, allowed {}, max clock skew {}, requests per second per sender {} (admin {}), metrics {}, status every {}, stop delay {}, keys for {}",
            c.listen,
            c.allowed_networks.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" "),
            c.max_clock_skew,
            fmt_rate(c.max_requests_per_second),
            fmt_rate(c.admin_max_requests_per_second),
            c.metrics_listen.map(|a| format!("http://{a}/metrics")).unwrap_or_else(|| "off".into()),
            c.status_interval,
            if c.stop_delay.0.is_zero() {
                "none".to_string()
            } else {
                c.stop_delay.to_string()
            },
            if c.keys.is_empty() { "nobody".to_string() } else { c.keys.keys().cloned().collect::<Vec<_>>().join(", ") }
        );
        let i = &self.icmp;
        let _ =
            writeln!(
            o,
            "icmp: errors forwarded to their connection's backend; echo {}{}; too-big answers {}",
            if i.echo {
                "answered for every VIP".to_string()
            } else if i.echo_vips.is_empty() {
                "not answered".to_string()
            } else {
                format!(
                    "answered for {}",
                    i.echo_vips.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" ")
                )
            },
            if i.echo || !i.echo_vips.is_empty() {
                format!(" (at most {}/s per worker)", i.echo_rate)
            } else {
                String::new()
            },
            if i.too_big_rate == 0 {
                "off (too-big packets with DF dropped)".to_string()
            } else {
                format!("at most {}/s per client per worker", i.too_big_rate)
            }
        );
        if let Some(t) = &self.traffic {
            let _ = writeln!(
                o,
                "traffic source: into {}, {} clients, {} concurrent flows, {} packets per flow, {} bytes, {}, {:.0}% IPv6",
                t.port,
                t.clients,
                t.concurrent_flows,
                t.packets_per_flow,
                t.packet_size,
                if t.rate_pps == 0 { "as fast as possible".to_string() } else { format!("{} pps", t.rate_pps) },
                t.ipv6_share * 100.0
            );
        }
        let _ = writeln!(o, "services:");
        for s in &self.services {
            let mode = match (s.forwarding, s.ipip_source) {
                (Forwarding::Ipip, Some(src)) => format!("ipip from {src}"),
                (Forwarding::Ipip, None) => "ipip".to_string(),
                (Forwarding::L2, _) => "l2".to_string(),
            };
            let sched = match (s.scheduler, s.hash) {
                (Scheduler::Maglev, HashInput::Connection) => {
                    format!("maglev (table {})", s.maglev_size())
                }
                (Scheduler::Maglev, HashInput::Client) => {
                    format!("maglev (table {}) on the client address", s.maglev_size())
                }
                (Scheduler::RoundRobin, _) => "round robin".to_string(),
            };
            let _ = writeln!(
                o,
                "  {} {} {}:{}  {sched}, {mode}, max affinity {}, affinity grace {}{}",
                s.name,
                s.protocol.name(),
                fmt_vip(s.vip),
                s.port,
                s.max_affinity_duration,
                s.affinity_grace,
                s.auto_affinity
                    .map(|a| format!(", auto affinity (linger {})", a.linger))
                    .unwrap_or_default()
            );
            let limits = s.affinity_limits();
            let quota = limits.quota(self.affinity.capacity, s.backends.len());
            let _ = writeln!(
                o,
                "    backends may pin /{} or longer, at most {quota} affinities each{}, overlaps {}",
                limits.min_prefix.of(if s.vip.is_ipv4() {
                    crate::types::Family::V4
                } else {
                    crate::types::Family::V6
                }),
                if limits.max_per_backend.is_none() {
                    " (twice an even share of the table)"
                } else {
                    ""
                },
                match limits.overlap {
                    OverlapPolicy::Refuse => "refused",
                    OverlapPolicy::Allow => "allowed",
                }
            );
            if let Some(h) = &s.health {
                let _ = writeln!(
                    o,
                    "    health: {}; all failing: {}",
                    health_plan(h, s.port),
                    match s.all_unhealthy {
                        AllUnhealthy::Spread => "new connections spread over them all",
                        AllUnhealthy::Drop => "new connections dropped",
                    }
                );
            }
            let total: u64 = s.backends.iter().map(|b| b.weight as u64).sum();
            for b in &s.backends {
                let share = if total == 0 {
                    0.0
                } else {
                    100.0 * b.weight as f64 / total as f64
                };
                let _ = writeln!(
                    o,
                    "    {} {}{}  weight {} ({share:.1}%){}{}",
                    b.name,
                    b.address,
                    b.mac.map(|m| format!(" mac {m}")).unwrap_or_default(),
                    b.weight,
                    if b.weight == 0 { " draining" } else { "" },
                    match (&s.health, b.health_address) {
                        (Some(_), Some(a)) => format!(", checked at {a}"),
                        (None, Some(a)) =>
                            format!(", health_address {a} unused (the service has no health key)"),
                        _ => String::new(),
                    }
                );
            }
            if s.backends.is_empty() {
                let _ = writeln!(o, "    (no backends)");
            }
        }
        if !self.affinities.is_empty() {
            let _ = writeln!(o, "static affinities:");
            for a in &self.affinities {
                let _ = writeln!(
                    o,
                    "  {}: client {} port {} -> {}",
                    a.service, a.client, a.client_port, a.backend
                );
            }
        }
        o
    }
}

/// A request rate for `check`'s plan.
fn fmt_rate(rate: u32) -> String {
    if rate == 0 {
        "unlimited".to_string()
    } else {
        rate.to_string()
    }
}

/// One line on a service's health check, for the plan.
fn health_plan(h: &HealthConfig, service_port: u16) -> String {
    let mut line = format!(
        "{} port {} every {} (timeout {}), down after {} failed, up after {} passed",
        h.kind.name(),
        h.port_for(service_port),
        h.interval,
        DurationStr(h.timeout()),
        h.fall,
        h.rise
    );
    if h.kind == HealthKind::Http {
        let _ = write!(
            line,
            ", GET {} expecting {}{}",
            h.http_path(),
            h.http_expect(),
            h.host
                .as_deref()
                .map(|host| format!(", Host {host}"))
                .unwrap_or_default()
        );
    }
    line
}

fn fmt_vip(a: IpAddr) -> String {
    match a {
        IpAddr::V4(v) => v.to_string(),
        IpAddr::V6(v) => format!("[{v}]"),
    }
}

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
