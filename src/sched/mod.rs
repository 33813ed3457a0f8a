//! Schedulers: how a service picks a backend for a new connection.

pub mod maglev;
pub mod wrr;

pub use maglev::MaglevTable;
pub use wrr::SmoothWrr;
