//! The control plane: the affinity protocol over UDP, its authentication,
//! the server the control thread runs, the client library applications and
//! the CLI use, and the CLI commands themselves.
//!
//! * [`proto`] — the versioned binary wire format (docs/PROTOCOL.md).
//! * [`auth`] — source networks, HMAC keys, replay protection.
//! * [`server`] — [`server::ControlServer`] and the [`server::ControlHandler`]
//!   trait the control thread implements.
//! * [`client`] — [`client::ControlClient`] and one-call helpers.
//! * [`cli`] — `pktdist affinity|backend|stats` subcommands.

pub mod auth;
pub mod cli;
pub mod client;
pub mod metrics;
pub mod plane;
pub mod proto;
pub mod server;
pub mod statsview;

pub use auth::{Allowlist, IpNet, Key, Keyring};
pub use client::{ClientError, ControlClient};
pub use proto::{
    AffinityEntry, AffinityKey, AffinityOp, BackendEntry, EndReason, EndedNotice, PortMatch, Reply,
    ReturnCode, ServiceAddr,
};
pub use server::{ControlHandler, ControlServer, Payload, Response, ServerConfig};
