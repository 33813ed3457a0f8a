//! Active health checks: pktdist probes its backends itself and reports
//! each one that goes down or comes back up.
//!
//! Design. One thread of its own, `pktdist-health`, started by the control
//! thread (on the control core, whose affinity it inherits) when some
//! service has a `health` key; never a worker. It owns every probe and
//! shares no memory with anyone: the control thread sends it the list of
//! [`Target`]s over a channel (at start, after a reload, after a backend is
//! added or removed) and receives [`Report`]s over another, draining them in
//! its tick. So the workers never wait on it: nothing it touches is
//! touched by a worker (no table, no counter, no lock), and the control
//! protocol only pays for reading a channel.
//!
//! Probes are many at once and never block: each is a non-blocking TCP
//! socket (set up with `socket2`: SO_LINGER 0, so a probe closes with a
//! reset and leaves no TIME_WAIT behind on this host, as HAProxy's checks
//! do) driven by readiness events from `mio` (epoll on Linux): connect,
//! then for HTTP write one `GET` and read the status line. A binary heap
//! of deadlines gives the next probe start and the next timeout; the poll
//! waits until the earlier of the two, or an event, or the control thread's
//! wake-up. Each target's probes start at a fixed phase within its interval
//! (from a hash of its service and backend names), so a thousand backends
//! on a one-second interval make a probe a millisecond rather than a burst
//! of a thousand every second.
//!
//! Probes go through the host's kernel network stack, from whatever
//! interface its routing table picks for the backend's `health_address`
//! (default: its address): the management network, as keepalived's checks
//! for IPVS do, not the DPDK ports. A backend must answer its checks there.
//!
//! State. [`rise_fall::RiseFall`] holds each backend's state: up until
//! `fall` checks in a row fail, then down until `rise` in a row pass. A
//! backend starts up (see there why), so only changes are reported:
//! [`HealthChange`]. The control thread's [`monitor::HealthMonitor`] starts
//! and feeds the checker and keeps what it was told in [`view::HealthView`]
//! for the statistics and metrics.

pub mod checker;
pub mod http;
pub mod monitor;
pub mod probe;
pub mod rise_fall;
pub mod target;
pub mod view;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use crate::config::HealthKind;

pub use checker::HealthChecker;
pub use monitor::HealthMonitor;
pub use target::Target;
pub use view::HealthView;

/// A backend that went down or came back up, for the control thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthChange {
    /// The service's name.
    pub service: String,
    /// The backend's name within the service.
    pub backend: String,
    /// The new state: true up, false down.
    pub up: bool,
    /// Down: the error of the check that made it so. Up: None, or why the
    /// backend counts as up without passing checks (its checks stopped).
    pub error: Option<String>,
    /// Where the checks went.
    pub checked: SocketAddr,
    /// When the checker saw the change.
    pub at: SystemTime,
}

impl HealthChange {
    /// The log line of the change.
    pub fn describe(&self) -> String {
        match (&self.error, self.up) {
            (Some(why), true) => format!("backend {}/{} is up ({why})", self.service, self.backend),
            (None, true) => format!(
                "backend {}/{} is up (health checks to {} pass)",
                self.service, self.backend, self.checked
            ),
            (Some(e), false) => format!(
                "backend {}/{} is down (health check to {}: {e})",
                self.service, self.backend, self.checked
            ),
            (None, false) => format!(
                "backend {}/{} is down (health checks to {} fail)",
                self.service, self.backend, self.checked
            ),
        }
    }
}

/// One probe's result, for the statistics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeResult {
    pub service: String,
    pub backend: String,
    pub kind: HealthKind,
    /// From the probe's start to its result (a timeout: the timeout).
    pub elapsed: Duration,
    /// None: passed.
    pub error: Option<String>,
}

/// What the checker sends the control thread, each about the target of
/// the [`Target::id`] it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    /// A backend's state changed.
    Change(u64, HealthChange),
    /// A probe finished.
    Probe(u64, ProbeResult),
}
#[cfg(test)]
mod tests;
