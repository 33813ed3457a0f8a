//! Affinities: which backend owns which clients of a service.
//!
//! * [`table`] — the lock-free table every worker reads on every TCP SYN; one
//!   writer (the control thread), any number of readers.
//! * [`manager`] — the control thread's side: the authoritative records,
//!   create/extend/cancel with their return codes, and expiry through a timer
//!   wheel.
//! * [`limits`] — what one backend may pin on a service: the shortest
//!   prefix, its quota of affinities, overlaps with other backends'.
//! * [`overlap`] — which affinities overlap a key, for the overlap rule.
//! * [`auto`] — automatic affinity for parallel connections, read and written
//!   by all workers.
//! * `seqlock` — the version word both tables use so readers never see a
//!   half-written entry.

pub mod auto;
pub mod key;
pub mod limits;
pub mod manager;
pub mod overlap;
mod seqlock;
pub mod table;
mod wheel;

use core::fmt;

use crate::types::BackendId;
use table::TableFull;

/// Why an affinity request was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AffinityError {
    /// An equal key is owned by another backend.
    Conflict { owner: BackendId },
    /// No affinity with this key.
    NotFound,
    /// The table is at capacity (or the key's buckets are full).
    TableFull,
    /// The request itself is malformed.
    Invalid(&'static str),
}

impl fmt::Display for AffinityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AffinityError::Conflict { owner } => write!(f, "owned by backend {owner}"),
            AffinityError::NotFound => f.write_str("no such affinity"),
            AffinityError::TableFull => f.write_str("affinity table full"),
            AffinityError::Invalid(why) => write!(f, "invalid affinity: {why}"),
        }
    }
}

impl std::error::Error for AffinityError {}

impl From<TableFull> for AffinityError {
    fn from(_: TableFull) -> Self {
        AffinityError::TableFull
    }
}

/// Folds a 128-bit product: the mixing step of the table hashes.
#[inline(always)]
fn fold(a: u64, b: u64) -> u64 {
    let r = u128::from(a).wrapping_mul(u128::from(b));
    (r as u64) ^ ((r >> 64) as u64)
}

/// Hashes an address and a metadata word under a per-table seed. Three
/// multiplies: cheap enough for every SYN, and a random seed keeps bucket
/// placement unpredictable from outside.
#[inline(always)]
fn hash3(seed: u64, lo: u64, hi: u64, meta: u64) -> u64 {
    let h = fold(lo ^ seed, 0x9e37_79b9_7f4a_7c15);
    let h = fold(h ^ hi, 0xbf58_476d_1ce4_e5b9);
    fold(h ^ meta, 0x94d0_49bb_1331_11eb ^ seed)
}

/// A random seed per table, from the standard library's randomized hasher.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x5eed);
    h.finish() | 1
}
