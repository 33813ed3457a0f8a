//! pktdist: a DPDK-based L4 connection distributor with
//! server-application-initiated affinity.
//!
//! The modules map to the architecture in SPEC.md:
//!
//! * [`wire`] — zero-copy views of the wire formats (Ethernet, 802.1Q, IPv4,
//!   IPv6, TCP, UDP) and the Internet checksum.
//! * [`packet`] — classification of a received frame into a [`packet::ParsedPacket`].
//! * [`forward`] — the two direct-server-return output paths: IP-in-IP
//!   encapsulation and L2 MAC rewrite.
//! * [`sched`] — weighted Maglev and smooth weighted round robin.
//! * [`flow`] — the per-worker connection table.
//! * [`affinity`] — the lock-free affinity table, its expiry wheel and
//!   automatic affinity for parallel connections.
//! * [`dataplane`] — the immutable snapshot of services and backends the
//!   workers read, swapped in whole by the control thread.
//! * [`worker`] — the poll loop, generic over [`io::PacketIo`].
//! * [`control`] — the control thread: affinity protocol, authentication,
//!   backend changes, statistics and the client library.
//! * [`config`] — the TOML configuration and its validation.
//! * [`stats`] — per-worker counters and their aggregation.
//! * [`trafficgen`] — the built-in traffic source used by the demo and benchmarks.
//! * `dpdk` — the only place with `unsafe`: bindings, EAL, mempools, ports.

pub mod affinity;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod flow;
pub mod forward;
pub mod io;
pub mod latency;
pub mod net;
pub mod packet;
pub mod sched;
pub mod services;
pub mod stats;
pub mod summary;
pub mod trafficgen;
pub mod wire;
pub mod worker;

pub mod dpdk;
#[cfg(feature = "dpdk")]
pub mod runtime;
