//! The control thread: everything that changes what the workers see, and the
//! only writer of the affinity table and the dataplane snapshot.
//!
//! * [`server`] — the protocol's receiving end: authentication, replay
//!   protection and signed replies, in front of a [`server::ControlHandler`].
//! * [`plane`] — the handler: affinity and backend requests, statistics and
//!   the AFFINITY_ENDED notices of affinities that end.
//! * [`registry`] — services and backends with their stable ids, from which
//!   each dataplane snapshot is built.

pub mod plane;
pub mod registry;
pub mod server;
