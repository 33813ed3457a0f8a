//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI'16).
//!
//! Every backend has a permutation of the table's slots derived from two
//! stable hashes of its *name*: `offset` and `skip`. The table is filled in
//! turns; in each turn a backend claims the next slot of its permutation that
//! is still free. Weights decide how often a backend gets a turn: each round a
//! backend earns `weight` credits and takes one turn per `max_weight` credits
//! (the heaviest backend takes exactly one turn per round), so every
//! backend's share of the table matches its weight share to within a couple
//! of entries.
//!
//! Because permutations depend only on names and the table size, two
//! instances configured with the same backends build identical tables, and
//! removing a backend mostly reassigns only the slots it held.

/// Most backends one table can index (entries are `u16`).
pub const MAX_BACKENDS: usize = u16::MAX as usize;
/// Largest table size: 2^24 entries (32 MiB of 16-bit indices), above the
/// 100 × [`MAX_BACKENDS`] that the most backends need.
pub const MAX_SIZE: usize = 1 << 24;
const _: () = assert!(MAX_SIZE >= 100 * MAX_BACKENDS);

/// The smallest table size [`MaglevTable::default_size`] returns: the
/// customary Maglev size for small services.
pub const MIN_DEFAULT_SIZE: usize = 65537;

/// A Maglev lookup table over a service's backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    /// Backend index per slot; empty when every weight is 0.
    entries: Vec<u16>,
    /// Number of backends the table was built over (including weight 0).
    backends: usize,
}

/// FNV-1a over the name with a seeded basis, then a SplitMix64 finaliser:
/// stable across processes, machines and Rust versions.
fn name_hash(name: &str, seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for &b in name.as_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// True when `n` is prime (trial division; sizes are at most [`MAX_SIZE`],
/// so at most a couple of thousand divisions).
pub fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    if n % 2 == 0 {
        return n == 2;
    }
    let mut d = 3usize;
    while d.saturating_mul(d) <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

impl MaglevTable {
    /// The default table size for `n_backends`: the smallest prime
    /// `>= max(65537, 100 × n_backends)`. 65537 keeps lookups in a 128 KiB
    /// table for ordinary services; the 100× floor is the Maglev paper's
    /// rule that keeps shares even and disruption small for large ones.
    pub fn default_size(n_backends: usize) -> usize {
        let mut n = MIN_DEFAULT_SIZE.max(n_backends.saturating_mul(100));
        while !is_prime(n) {
            n += 1;
        }
        n
    }

    /// Builds the table. `backends` are (stable name, weight); index i of the
    /// slice is what `lookup` returns. `size` must be a prime and at least
    /// 100 × the number of backends with a weight above 0. Backends with
    /// weight 0 get no entries.
    pub fn new(backends: &[(&str, u32)], size: usize) -> Result<MaglevTable, String> {
        let order = Self::check(backends, size)?;
        let max_weight = backends.iter().map(|b| b.1 as u64).max().unwrap_or(0);
        if max_weight == 0 {
            return Ok(MaglevTable {
                entries: Vec::new(),
                backends: backends.len(),
            });
        }
        let m = size as u64;
        // Permutation state per backend: slot = (offset + j * skip) mod m,
        // kept incrementally as `next` (the current slot).
        let skips: Vec<u64> = backends
            .iter()
            .map(|b| name_hash(b.0, 2) % (m - 1) + 1)
            .collect();
        let mut next: Vec<u64> = backends.iter().map(|b| name_hash(b.0, 1) % m).collect();
        let mut credit = vec![0u64; backends.len()];
        const FREE: u16 = u16::MAX;
        // With MAX_BACKENDS = u16::MAX indices run 0..=65534, so FREE is
        // never a backend index.
        let mut entries = vec![FREE; size];
        let mut filled = 0usize;
        'rounds: loop {
            for &i in &order {
                let w = backends[i].1;
                if w == 0 {
                    continue;
                }
                credit[i] += w as u64;
                while credit[i] >= max_weight {
                    credit[i] -= max_weight;
                    // Claim the next free slot of i's permutation. The
                    // permutation visits every slot (m prime, 0 < skip < m)
                    // and the table is not full, so this terminates.
                    let mut c = next[i];
                    while entries[c as usize] != FREE {
                        c += skips[i];
                        if c >= m {
                            c -= m;
                        }
                    }
                    entries[c as usize] = i as u16;
                    c += skips[i];
                    if c >= m {
                        c -= m;
                    }
                    next[i] = c;
                    filled += 1;
                    if filled == size {
                        break 'rounds;
                    }
                }
            }
        }
        Ok(MaglevTable {
            entries,
            backends: backends.len(),
        })
    }

    /// Checks what [`MaglevTable::new`] needs of its arguments (without the
    /// build: configuration checks call it); returns the backends' indexes
    /// in name order.
    pub fn check(backends: &[(&str, u32)], size: usize) -> Result<Vec<usize>, String> {
        if backends.len() > MAX_BACKENDS {
            return Err(format!(
                "{} backends: a Maglev table indexes at most {MAX_BACKENDS}",
                backends.len()
            ));
        }
        if size > MAX_SIZE {
            return Err(format!(
                "Maglev table size {size} is above the largest, {MAX_SIZE}"
            ));
        }
        if !is_prime(size) {
            return Err(format!("Maglev table size {size} is not a prime"));
        }
        let active = backends.iter().filter(|b| b.1 > 0).count();
        if size < active.saturating_mul(100) {
            return Err(format!(
                "Maglev table size {size} is smaller than 100 x {active} backends with weight > 0 (at least {})",
                active * 100
            ));
        }
        // Turns are taken in name order, not list order, so the table depends
        // only on the (name, weight) set.
        let mut order: Vec<usize> = (0..backends.len()).collect();
        order.sort_by(|&a, &b| backends[a].0.cmp(backends[b].0));
        if let Some(w) = order
            .windows(2)
            .find(|w| backends[w[0]].0 == backends[w[1]].0)
        {
            return Err(format!("backend name {:?} appears twice", backends[w[0]].0));
        }
        Ok(order)
    }

    /// The backend index for a flow hash, or None when every weight is 0.
    ///
    /// The slot is `hash × size >> 64` (Lemire's multiply-shift range
    /// reduction) rather than a division: it uses the hash's high bits, which
    /// keeps it independent of the flow table's bucket index (low bits).
    #[inline]
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        let slot = ((hash as u128 * self.entries.len() as u128) >> 64) as usize;
        self.entries.get(slot).map(|&b| b as usize)
    }

    /// Table size (0 when every weight is 0).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the table has no entries (every weight is 0).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of slots per backend index.
    pub fn shares(&self) -> Vec<usize> {
        let mut s = vec![0usize; self.backends];
        for &e in &self.entries {
            s[e as usize] += 1;
        }
        s
    }

    /// The backend index of slot `i` (for comparing tables).
    pub fn entry(&self, i: usize) -> Option<usize> {
        self.entries.get(i).map(|&b| b as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("backend-{i}")).collect()
    }

    fn build(names: &[String], weights: &[u32], size: usize) -> MaglevTable {
        let b: Vec<(&str, u32)> = names
            .iter()
            .zip(weights)
            .map(|(n, &w)| (n.as_str(), w))
            .collect();
        MaglevTable::new(&b, size).expect("valid table")
    }

    #[test]
    fn shares_follow_weights_within_one_percent() {
        let mixes: [&[u32]; 6] = [
            &[100, 200, 300],
            &[1, 1, 1, 1, 1],
            &[100, 100, 0, 50],
            &[65535, 1000, 30000, 12345],
            &[7, 11, 13, 17, 19, 23, 29, 31, 37, 41],
            &[100; 64],
        ];
        for weights in mixes {
            let n = names(weights.len());
            let t = build(&n, weights, 65537);
            let shares = t.shares();
            let total_w: u64 = weights.iter().map(|&w| w as u64).sum();
            assert_eq!(shares.iter().sum::<usize>(), 65537);
            for (i, &w) in weights.iter().enumerate() {
                let ideal = 65537.0 * w as f64 / total_w as f64;
                let got = shares[i] as f64;
                // At most two entries off the ideal count, which is well
                // within 1% of each share for these mixes.
                assert!(
                    (got - ideal).abs() <= 2.0,
                    "{weights:?}: backend {i} has {got}, ideal {ideal}"
                );
                assert!(
                    (got - ideal).abs() <= 0.01 * ideal.max(1.0),
                    "{weights:?}: backend {i} has {got}, ideal {ideal}"
                );
            }
        }
    }

    #[test]
    fn deterministic_and_independent_of_list_order() {
        let n = names(7);
        let w = [100, 200, 300, 400, 0, 50, 100];
        let a = build(&n, &w, 65537);
        let b = build(&n, &w, 65537);
        assert_eq!(a, b);
        // Reverse the list: the same name must own the same slots.
        let rn: Vec<String> = n.iter().rev().cloned().collect();
        let rw: Vec<u32> = w.iter().rev().cloned().collect();
        let r = build(&rn, &rw, 65537);
        let mut same = 0;
        for i in 0..a.len() {
            let an = &n[a.entry(i).unwrap()];
            let rname = &rn[r.entry(i).unwrap()];
            if an == rname {
                same += 1;
            }
        }
        assert_eq!(same, a.len(), "every slot keeps its backend by name");
    }

    #[test]
    fn equal_weights_reordered_agree_exactly_on_shares() {
        let n = names(5);
        let a = build(&n, &[10; 5], 1009);
        let rn: Vec<String> = n.iter().rev().cloned().collect();
        let r = build(&rn, &[10; 5], 1009);
        let mut sa = a.shares();
        let mut sr = r.shares();
        sa.sort();
        sr.sort();
        assert_eq!(sa, sr);
    }

    /// Removing one of N equal-weight backends moves at most 1% of the
    /// *other* backends' slots, and at most 1.5 × 1/N of them, at the
    /// default size 65537.
    #[test]
    fn removing_one_backend_moves_few_entries() {
        for nb in [10usize, 20, 50] {
            let n = names(nb);
            let w = vec![100u32; nb];
            let full = build(&n, &w, 65537);
            let removed = nb / 2;
            let rest_names: Vec<String> = n
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != removed)
                .map(|(_, s)| s.clone())
                .collect();
            let rest = build(&rest_names, &w[1..], 65537);
            let mut survivors = 0usize;
            let mut moved = 0usize;
            for i in 0..full.len() {
                let before = &n[full.entry(i).unwrap()];
                let after = &rest_names[rest.entry(i).unwrap()];
                if full.entry(i) != Some(removed) {
                    survivors += 1;
                    if before != after {
                        moved += 1;
                    }
                }
            }
            let frac = moved as f64 / survivors as f64;
            eprintln!("maglev: N={nb}: {moved}/{survivors} surviving slots moved ({frac:.4}, 1/N = {:.4})", 1.0 / nb as f64);
            assert!(
                frac <= 0.01 && frac <= 1.5 / nb as f64,
                "N={nb}: {moved} of {survivors} surviving slots moved ({frac:.4})"
            );
        }
    }

    #[test]
    fn weight_zero_gets_nothing_and_all_zero_is_none() {
        let n = names(3);
        let t = build(&n, &[100, 0, 100], 1009);
        assert_eq!(t.shares()[1], 0);
        for h in (0..10_000u64).map(|x| x.wrapping_mul(0x9e37_79b9_7f4a_7c15)) {
            assert_ne!(t.lookup(h), Some(1));
        }
        let z = build(&n, &[0, 0, 0], 7);
        assert!(z.is_empty());
        assert_eq!(z.lookup(12345), None);
        assert_eq!(z.shares(), vec![0, 0, 0]);
        let e = MaglevTable::new(&[], 65537).unwrap();
        assert_eq!(e.lookup(1), None);
    }

    #[test]
    fn lookup_covers_every_slot_range() {
        let n = names(2);
        let t = build(&n, &[1, 1], 211);
        assert!(t.lookup(0).is_some());
        assert!(t.lookup(u64::MAX).is_some());
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(MaglevTable::new(&[("a", 1)], MAX_SIZE + 1)
            .unwrap_err()
            .contains("above the largest"));
        let b = [("a", 1), ("b", 1), ("c", 0)];
        let e = MaglevTable::new(&b, 65536).unwrap_err();
        assert!(e.contains("not a prime"), "{e}");
        // 2 weighted backends need >= 200 slots; 199 is prime but too small.
        let e = MaglevTable::new(&b, 199).unwrap_err();
        assert!(e.contains("100 x 2"), "{e}");
        assert!(MaglevTable::new(&b, 211).is_ok());
        assert!(MaglevTable::new(&b, 0).is_err());
        let e = MaglevTable::new(&[("a", 1), ("a", 2)], 211).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        assert!(MaglevTable::new(&b, 1).is_err());
    }

    #[test]
    fn default_size_rule() {
        assert_eq!(MaglevTable::default_size(0), 65537);
        assert_eq!(MaglevTable::default_size(3), 65537);
        let s = MaglevTable::default_size(1000);
        assert!(is_prime(s) && s >= 100_000);
        assert_eq!(s, 100_003);
        assert!(is_prime(2) && is_prime(65537) && !is_prime(65535) && !is_prime(1));
    }
}
