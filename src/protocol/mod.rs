//! The control protocol between server applications (or operators) and the
//! control thread, as docs/PROTOCOL.md specifies it: both ends use it.
//!
//! * [`message`] — the versioned binary format: header, requests, replies,
//!   notifications, their encoding and decoding.
//! * [`auth`] — sender names, HMAC keys, source networks and replay
//!   protection.
//! * [`rate_limit`] — request rate limits per authenticated sender: a token
//!   bucket per name.

pub mod auth;
pub mod message;
pub mod rate_limit;
#[cfg(test)]
pub(crate) mod testing;
