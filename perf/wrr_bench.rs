//! Time per round-robin pick by pool size: the cost a new connection to a
//! `round_robin` service pays to choose its backend (perf/README.md,
//! "Round robin over large pools").
//!
//!     cargo run --release --example wrr-bench [-- PICKS]
//!
//! For each pool size, weights 1-92 in a fixed pattern, PICKS picks
//! (default 2,000,000) timed on one thread; the backend chosen is summed
//! so that the picks are not optimised away.

use pktdist::sched::wrr::{SmoothWrr, SCAN_MAX};
use std::time::Instant;

fn main() {
    let picks: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("PICKS: a number"))
        .unwrap_or(2_000_000);
    println!("scan up to {SCAN_MAX} backends, heaps above");
    for n in [3u32, 16, 64, 96, 97, 128, 256, 1024, 4096, 16384] {
        let weights: Vec<u32> = (0..n).map(|i| (i % 7) * 13 + (i % 3) + 1).collect();
        let mut s = SmoothWrr::new(&weights);
        let start = Instant::now();
        let mut sum = 0usize;
        for _ in 0..picks {
            sum = sum.wrapping_add(s.pick().unwrap_or(0));
        }
        let ns = start.elapsed().as_nanos() as f64 / picks as f64;
        println!("{n:6} backends  {ns:8.1} ns per pick  (sum {sum})");
    }
}
