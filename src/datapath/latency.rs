//! Latency histograms: per-packet processing time in each worker, control
//! request handling time, affinity lifetimes.
//!
//! A worker records into its own [`Histogram`] (no sharing on the hot path)
//! and, a few times a second, folds it into its [`SharedHistogram`] with a
//! `try_lock` that never waits: if the control thread is reading, the
//! worker keeps its values and tries again later.

use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Nanoseconds up to one minute, three significant digits.
const MAX_NS: u64 = 60_000_000_000;

/// A histogram of nanoseconds (or of any unit up to a minute's worth).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("static histogram bounds are valid")
}

/// A histogram one writer folds values into and readers copy.
#[derive(Debug)]
pub struct SharedHistogram {
    inner: Mutex<Histogram<u64>>,
}

impl Default for SharedHistogram {
    fn default() -> Self {
        SharedHistogram {
            inner: Mutex::new(new_histogram()),
        }
    }
}

impl SharedHistogram {
    /// Adds `local` into the shared histogram and clears it, unless a reader
    /// holds the lock (then nothing happens and false is returned).
    pub fn try_fold(&self, local: &mut Histogram<u64>) -> bool {
        match self.inner.try_lock() {
            Ok(mut h) => {
                // Same bounds on both sides: adding cannot fail.
                let _ = h.add(&*local);
                local.reset();
                true
            }
            Err(_) => false,
        }
    }

    /// Records one value (for writers off the hot path).
    pub fn record(&self, value: u64) {
        let mut h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = h.record(value.clamp(1, MAX_NS));
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> Histogram<u64> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The percentiles reported in summaries, stats and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }

    /// The quantiles as (label, value) pairs, for metrics.
    pub fn quantiles(&self) -> [(&'static str, u64); 4] {
        [
            ("0.5", self.p50),
            ("0.9", self.p90),
            ("0.99", self.p99),
            ("0.999", self.p999),
        ]
    }
}

/// Converts time-stamp-counter ticks to nanoseconds with one multiply.
#[derive(Clone, Copy, Debug)]
pub struct TscScale {
    /// Nanoseconds per tick in 32.32 fixed point.
    mult: u64,
}

impl TscScale {
    pub fn new(hz: u64) -> TscScale {
        let hz = hz.max(1);
        TscScale {
            mult: ((1_000_000_000u128 << 32) / hz as u128).min(u64::MAX as u128) as u64,
        }
    }

    #[inline(always)]
    pub fn ns(&self, ticks: u64) -> u64 {
        ((ticks as u128 * self.mult as u128) >> 32) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_moves_values_and_percentiles_read_them() {
        let shared = SharedHistogram::default();
        let mut local = new_histogram();
        for v in 1..=1000u64 {
            local.record(v).unwrap();
        }
        assert!(shared.try_fold(&mut local));
        assert!(local.is_empty());
        let p = Percentiles::of(&shared.snapshot());
        assert_eq!(p.count, 1000);
        assert!((495..=505).contains(&p.p50), "{p:?}");
        assert!((985..=1000).contains(&p.p99));
        assert_eq!(p.max, 1000);
    }

    #[test]
    fn fold_never_waits_for_a_reader() {
        let shared = SharedHistogram::default();
        let mut local = new_histogram();
        local.record(5).unwrap();
        let guard = shared.inner.lock().unwrap();
        assert!(!shared.try_fold(&mut local));
        drop(guard);
        assert_eq!(local.len(), 1, "kept for the next try");
        assert!(shared.try_fold(&mut local));
    }

    #[test]
    fn tsc_scale_converts() {
        let s = TscScale::new(2_000_000_000);
        assert_eq!(s.ns(2_000), 1_000);
        assert_eq!(TscScale::new(1_000_000_000).ns(12_345), 12_345);
    }
}
