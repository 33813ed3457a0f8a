//! The control thread: everything that changes what the workers see, and the
//! only writer of the affinity table and the dataplane snapshot.
//!
//! * [`thread`] — [`thread::ControlThread`], the thread as one type: it owns
//!   everything below, runs the loop (requests, expiry, notices, status
//!   line, metrics) and assembles the summary.
//! * [`server`] — the protocol's receiving end: authentication, replay
//!   protection and signed replies, in front of a [`handler::ControlHandler`].
//! * [`handler`] — the interface between the server and what answers its
//!   requests: the handler trait, its [`handler::Response`].
//! * [`plane`] — affinity and backend requests, expiry, and the notices of
//!   affinities that end.
//! * [`reload`] — re-reading the configuration file and applying it.
//! * [`statics`] — the configuration's static affinities.
//! * [`store_sync`] — cluster mode (`[cluster]`): changes sent to the
//!   shared table with deferred replies, the table's watch applied to the
//!   local one, and which instance ends an affinity and notifies.
//! * [`backend_state`] — each backend's state (up, draining, down), what it
//!   is combined from, and the grace timer of backends that are down.
//! * [`state_file`] — the format of `[affinity] state_file`, which keeps
//!   requested affinities across a restart; [`state_saver`] loads it at
//!   start and keeps it current.
//! * [`registry`] — services and backends with their stable ids, from which
//!   each dataplane snapshot is built.
//! * [`counters`] — what the server and the plane count, and how the summary
//!   shows it.

pub mod backend_state;
pub mod counters;
pub mod handler;
pub mod plane;
pub mod registry;
pub mod reload;
pub mod server;
pub mod state_file;
pub mod state_saver;
pub mod statics;
pub mod store_sync;
pub mod thread;

#[cfg(test)]
pub(crate) mod testing;
