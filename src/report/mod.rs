//! Reporting: what an instance says about itself.
//!
//! * [`summary`] — the run's [`summary::Summary`] (text and JSON), assembled by
//!   the control thread from the workers' counters, and the status line.
//! * [`metrics`] — the Prometheus exposition and its HTTP listener.
//! * [`portstats`] — ports' device counters kept across a peer's
//!   disconnect and a device's counter reset.
//! * [`statsview`] — the `pktdist stats --watch` screen, drawn from summaries
//!   fetched over the control protocol.

pub mod metrics;
pub mod portstats;
pub mod statsview;
pub mod summary;
