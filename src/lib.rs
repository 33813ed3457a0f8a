//! pktdist: a DPDK-based L4 connection distributor with
//! server-application-initiated affinity.
//!
//! The folders are the architecture (the README's "How it works" walks
//! through them):
//!
//! * [`datapath`] — what a worker core runs: the poll loop, classification,
//!   the flow table, routing, forwarding, the dataplane snapshot, per-worker
//!   counters and the packet-I/O trait.
//! * [`affinity`] — the lock-free affinity table the workers read on every
//!   SYN and the control thread writes, its expiry, and automatic affinity.
//! * [`sched`] — weighted Maglev and smooth weighted round robin.
//! * [`control`] — the control thread as one type
//!   ([`control::thread::ControlThread`]), owning the protocol server, the
//!   affinity and backend requests, the service registry, reload, static
//!   affinities and expiry.
//! * [`cluster`] — the cluster mode's store thread: the requested
//!   affinities shared with other instances through etcd.
//! * [`health`] — active health checks: the checker thread (TCP and HTTP
//!   probes, the rise/fall state machine) and what the control thread keeps
//!   of its reports.
//! * [`protocol`] — the control protocol's messages and authentication,
//!   shared by the control thread and its clients.
//! * [`report`] — the summary, Prometheus metrics and the stats view.
//! * [`client`] — the client library applications use, and the CLI.
//! * [`command`] — the `pktdist` command line (its clap definition, man
//!   pages and shell completions).
//! * [`config`] — the TOML configuration and its validation.
//! * [`run`] — `pktdist run`: the process that starts EAL and the ports,
//!   spawns the workers, serves the control thread's loop and stops it all
//!   in order; and the built-in traffic source.
//! * [`dpdk`] — the only place with `unsafe`: bindings, EAL, mempools, ports.
//! * [`wire`] — zero-copy views of the wire formats and the Internet checksum.
//! * [`types`] and [`net`] — the shared vocabulary (families, flow keys, ids,
//!   limits, drop reasons) and address/network helpers.

#![deny(unsafe_code)]

pub mod affinity;
pub mod client;
pub mod cluster;
pub mod command;
pub mod config;
pub mod control;
pub mod datapath;
pub mod health;
pub mod net;
pub mod protocol;
pub mod report;
pub mod run;
pub mod sched;
pub mod types;
pub mod wire;

#[allow(unsafe_code)]
pub mod dpdk;
