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

    #[test]
    fn prefetch_accepts_any_reference() {
        let v = [1u64, 2, 3];
        prefetch(&v);
        prefetch(&v[2]);
        prefetch_ptr(std::ptr::null());
        prefetch_write_ptr(std::ptr::null());
        prefetch_write_ptr(v.as_ptr().cast());
        assert_eq!(v[2], 3);
    }
}
