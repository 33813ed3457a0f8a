//! The datapath: everything a worker core runs. A worker polls its receive
//! queues ([`worker`]), classifies each frame ([`classify`]), looks its
//! connection up in its own flow table ([`flow`]), routes a new connection
//! through the affinity tables and the service's scheduler, and sends the
//! packet to its backend ([`forward`]). Services and backends come from the
//! immutable [`snapshot`] the control thread publishes; what the worker did
//! goes into its own [`counters`] and [`latency`] histogram. Packets come and
//! go through the [`pktio`] trait, which DPDK's ports implement and tests
//! implement in memory. ICMP messages to a VIP, and packets too long for
//! the link once forwarded, take the [`icmp`] path. Past a rate of SYNs,
//! the [`syn_guard`] has a worker forward the SYNs of `stateless_syns`
//! services without flow entries.

pub mod classify;
pub mod counters;
pub mod flow;
pub mod forward;
pub mod icmp;
pub mod latency;
pub mod pktio;
pub mod snapshot;
pub mod syn_guard;
pub mod worker;
