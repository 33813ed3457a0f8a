//! `pktdist run`: the process around the threads. Its main thread starts EAL
//! and the ports, builds the control thread
//! ([`crate::control::thread::ControlThread`]), spawns the workers, serves the
//! control thread's loop, and stops everything in order (`process`),
//! telling systemd where it stands (`notify`) and logging one line per event
//! (`logging`), having checked that its tables fit in the memory the
//! machine has (`memory`) and that its cores take pinned threads
//! (`cores`); the
//! optional built-in traffic source runs on a thread of its own
//! (`traffic_source`), writing frames that [`trafficgen`] generates onto
//! the worker queues [`rss`] picks for their flows.
//!
//! This is where the distribution logic meets DPDK; it holds no `unsafe`
//! itself: everything DPDK goes through [`crate::dpdk`].

pub mod cores;
pub mod logging;
pub mod memory;
pub mod notify;
pub mod rss;
pub mod trafficgen;

#[cfg(feature = "dpdk")]
mod process;
#[cfg(feature = "dpdk")]
mod traffic_source;

#[cfg(feature = "dpdk")]
pub use process::{eal_args, run, RunOptions};
