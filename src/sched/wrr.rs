//! Smooth weighted round robin (nginx's algorithm).

/// Per-worker smooth weighted round-robin state.
#[derive(Clone, Debug)]
pub struct SmoothWrr {}

impl SmoothWrr {
    /// `weights[i]` is backend i's weight; 0 means it gets nothing.
    pub fn new(weights: &[u32]) -> SmoothWrr {
        let _ = weights;
        unimplemented!("skeleton")
    }
    /// The next backend index, or None when every weight is 0.
    pub fn next(&mut self) -> Option<usize> {
        unimplemented!("skeleton")
    }
}
