//! Schedulers: how a service picks a backend for a new connection.

pub mod maglev;
pub mod wrr;
