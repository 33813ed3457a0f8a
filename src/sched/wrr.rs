//! Smooth weighted round robin (nginx's algorithm).
//!
//! Each pick adds every backend's weight to its running score, takes the
//! backend with the highest score and subtracts the total weight from it.
//! Over one cycle of `total` picks each backend is chosen exactly `weight`
//! times, and the picks are interleaved rather than bunched (weights 5, 1, 1
//! give a a b a c a a, not a a a a a b c).

/// Per-worker smooth weighted round-robin state.
#[derive(Clone, Debug)]
pub struct SmoothWrr {
    weights: Vec<i64>,
    current: Vec<i64>,
    total: i64,
}

impl SmoothWrr {
    /// `weights[i]` is backend i's weight; 0 means it gets nothing.
    pub fn new(weights: &[u32]) -> SmoothWrr {
        let weights: Vec<i64> = weights.iter().map(|&w| w as i64).collect();
        let total = weights.iter().sum();
        SmoothWrr {
            current: vec![0; weights.len()],
            weights,
            total,
        }
    }

    /// The next backend index, or None when every weight is 0.
    #[inline]
    pub fn pick(&mut self) -> Option<usize> {
        if self.total == 0 {
            return None;
        }
        let mut best = 0usize;
        let mut best_score = i64::MIN;
        for (i, (c, &w)) in self.current.iter_mut().zip(&self.weights).enumerate() {
            if w == 0 {
                continue;
            }
            *c += w;
            if *c > best_score {
                best_score = *c;
                best = i;
            }
        }
        self.current[best] -= self.total;
        Some(best)
    }

    /// The weights this state was built with.
    pub fn weights(&self) -> impl Iterator<Item = u32> + '_ {
        self.weights.iter().map(|&w| w as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_proportions_over_a_cycle() {
        for weights in [
            vec![100u32, 200, 300],
            vec![5, 1, 1],
            vec![1],
            vec![3, 0, 7, 2],
            vec![65535, 1, 2],
        ] {
            let total: u32 = weights.iter().sum();
            let mut s = SmoothWrr::new(&weights);
            for _cycle in 0..2 {
                let mut counts = vec![0u32; weights.len()];
                for _ in 0..total {
                    counts[s.pick().unwrap()] += 1;
                }
                assert_eq!(counts, weights);
            }
        }
    }

    #[test]
    fn picks_are_smooth() {
        for weights in [vec![5u32, 1, 1], vec![100, 200, 300], vec![7, 3, 0, 11, 2]] {
            let total: u32 = weights.iter().sum();
            let mut s = SmoothWrr::new(&weights);
            let mut counts = vec![0u32; weights.len()];
            for k in 1..=(2 * total) {
                counts[s.pick().unwrap()] += 1;
                for (i, &w) in weights.iter().enumerate() {
                    let bound = (w as u64 * k as u64).div_ceil(total as u64) + 1;
                    assert!(
                        counts[i] as u64 <= bound,
                        "{weights:?}: backend {i} picked {} times in {k} picks",
                        counts[i]
                    );
                }
            }
        }
    }

    #[test]
    fn nginx_sequence() {
        let mut s = SmoothWrr::new(&[5, 1, 1]);
        let seq: Vec<usize> = (0..7).map(|_| s.pick().unwrap()).collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn zero_weights() {
        assert_eq!(SmoothWrr::new(&[0, 0]).pick(), None);
        assert_eq!(SmoothWrr::new(&[]).pick(), None);
        let mut s = SmoothWrr::new(&[0, 4, 0]);
        for _ in 0..10 {
            assert_eq!(s.pick(), Some(1));
        }
    }
}
