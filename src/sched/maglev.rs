//! Weighted Maglev consistent hashing.

/// A Maglev lookup table over a service's backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevTable {}

impl MaglevTable {
    /// Builds the table. `backends` are (stable name, weight); index i of the
    /// slice is what `lookup` returns. `size` must be a prime.
    pub fn new(backends: &[(&str, u32)], size: usize) -> Result<MaglevTable, String> {
        let _ = (backends, size);
        unimplemented!("skeleton")
    }
    /// The backend index for a flow hash, or None when every weight is 0.
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        let _ = hash;
        unimplemented!("skeleton")
    }
}
