//! The client side: what a server application or an operator runs to talk to
//! a running instance over the control protocol.
//!
//! * [`library`] — [`library::ControlClient`]: requests with retries,
//!   nonces and reply verification, and the AFFINITY_ENDED notifications.
//! * [`cli`] — the `pktdist affinity|backend|stats|reload|status` subcommands.

pub mod cli;
pub mod library;
