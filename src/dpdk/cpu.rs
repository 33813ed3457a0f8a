//! CPU helpers the whole data path uses, with or without DPDK: cache
//! prefetch and the time-stamp counter.

use std::sync::OnceLock;

/// Hints the CPU to load the cache line holding `*p` into all cache levels.
/// Table lookups call it a burst ahead so that the memory latency of one
/// packet overlaps the work on another. A no-op where not supported.
#[inline(always)]
pub fn prefetch<T>(p: &T) {
    prefetch_ptr((p as *const T).cast());
}

/// [`prefetch`] for a raw address. The address is never dereferenced, so any
/// value is allowed.
#[inline(always)]
pub(crate) fn prefetch_ptr(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it never faults, whatever the address,
    // and SSE (which provides it) is part of the x86_64 baseline.
    #[allow(unused_unsafe)]
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Hints the CPU to load the cache line at `p` in a state that allows
/// writing (PREFETCHW): for lines this core will modify that another core
/// wrote last, such as an mbuf the feeding core or the NIC driver filled.
/// A plain prefetch would fetch them shared, and the first store would then
/// wait for a second, ownership-acquiring transfer. The address is never
/// dereferenced, so any value is allowed.
#[inline(always)]
#[cfg_attr(not(feature = "dpdk"), allow(dead_code))]
pub(crate) fn prefetch_write_ptr(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHW is a hint: it never faults, whatever the address; it
    // reads only the register holding `p` and writes no register, flag or
    // memory. CPUs without it (Intel before Broadwell) execute it as a
    // no-op, not an invalid opcode.
    unsafe {
        std::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, preserves_flags, readonly));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Which of four words equal `key`: bit `2 * i` (and `2 * i + 1`) of the
/// result set for each `words[i] == key`, no bit otherwise. No branch: the
/// flow table's lookup compares a bucket's keys with it, where a search
/// stopping at the first match would leave its loop at a data-dependent
/// place the branch predictor mostly misses. With SSE2 (every x86_64) the
/// 32-byte block takes two compares and one mask.
#[inline(always)]
pub fn equal_words(words: &[u64; 4], key: u64) -> u32 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE2 is part of the x86_64 baseline; these intrinsics only
    // compute on registers (the words are read by safe indexing).
    #[allow(unused_unsafe)]
    unsafe {
        use std::arch::x86_64::{
            _mm_cmpeq_epi32, _mm_movemask_epi8, _mm_packs_epi16, _mm_packs_epi32, _mm_set1_epi64x,
            _mm_set_epi64x,
        };
        let k = _mm_set1_epi64x(key as i64);
        let pair =
            |i: usize| _mm_cmpeq_epi32(_mm_set_epi64x(words[i + 1] as i64, words[i] as i64), k);
        // One byte per 32-bit half (all ones where equal), in word order.
        let halves = _mm_packs_epi16(_mm_packs_epi32(pair(0), pair(2)), _mm_set1_epi64x(0));
        let m = _mm_movemask_epi8(halves) as u32;
        // Both halves of word i equal: bits 2i and 2i + 1.
        let both = m & m >> 1 & 0x5555;
        both | both << 1
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let mut m = 0;
        for (i, &w) in words.iter().enumerate() {
            m |= 3 * u32::from(w == key) << (2 * i);
        }
        m
    }
}

/// A cycle counter for cheap timestamps on the hot path: the TSC on
/// x86_64 (constant-rate on every CPU DPDK supports), nanoseconds since the
/// first call elsewhere. Convert with [`tsc_hz`].
#[inline(always)]
pub fn tsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC reads a register; it has no memory effects and is
        // available on every x86_64 CPU.
        #[allow(unused_unsafe)]
        unsafe {
            std::arch::x86_64::_rdtsc()
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        use std::time::Instant;
        static BASE: OnceLock<Instant> = OnceLock::new();
        BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// Ticks of [`tsc`] per second. Under an initialised EAL this is DPDK's
/// calibrated value; otherwise it is measured once (about 20 ms, on the
/// first call) against the monotonic clock.
pub fn tsc_hz() -> u64 {
    #[cfg(feature = "dpdk")]
    if let Some(hz) = super::eal::tsc_hz() {
        return hz;
    }
    static HZ: OnceLock<u64> = OnceLock::new();
    *HZ.get_or_init(measure_hz)
}

#[cfg(target_arch = "x86_64")]
fn measure_hz() -> u64 {
    use std::time::{Duration, Instant};
    let t0 = Instant::now();
    let c0 = tsc();
    std::thread::sleep(Duration::from_millis(20));
    let c1 = tsc();
    let ns = t0.elapsed().as_nanos().max(1);
    let hz = u128::from(c1.wrapping_sub(c0)) * 1_000_000_000 / ns;
    u64::try_from(hz).unwrap_or(u64::MAX).max(1)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_hz() -> u64 {
    1_000_000_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn equal_words_marks_every_equal_word_and_no_other() {
        let key = 0x0a00_0001_1f90_0003u64;
        // Words equal to the key but in one half, in every place, with the
        // key itself in none, one or several places.
        let near = [
            key ^ 1,
            key ^ 1 << 40,
            !key,
            0,
            u64::MAX,
            key.rotate_left(32),
        ];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..2000 {
            let mut words = [0u64; 4];
            let mut want = 0u32;
            for (i, w) in words.iter_mut().enumerate() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *w = if x % 3 == 0 {
                    key
                } else {
                    near[(x >> 8) as usize % near.len()]
                };
                if round % 7 == 0 {
                    *w = key;
                }
                if *w == key {
                    want |= 3 << (2 * i);
                }
            }
            assert_eq!(equal_words(&words, key), want, "{words:x?}");
        }
    }

    #[test]
    fn tsc_advances_and_hz_matches_the_clock_roughly() {
        let hz = tsc_hz();
        assert!(hz >= 1_000_000, "tsc_hz {hz} is implausibly low");
        let c0 = tsc();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        let cycles = tsc().wrapping_sub(c0);
        let ns = t0.elapsed().as_nanos() as f64;
        let ratio = cycles as f64 / (ns * hz as f64 / 1e9);
        // Loose: only catches a wrong unit (ms vs ns, kHz vs Hz).
        assert!(ratio > 0.2 && ratio < 5.0, "ratio {ratio}");
    }

    /// A hint is no access: any address, null included, is taken without a
    /// fault (the test is that it runs to its end).
    #[test]
    fn prefetch_accepts_any_reference() {
        let v = [1u64, 2, 3];
        prefetch(&v);
        prefetch(&v[2]);
        prefetch_ptr(std::ptr::null());
        prefetch_write_ptr(std::ptr::null());
        prefetch_write_ptr(v.as_ptr().cast());
    }
}
