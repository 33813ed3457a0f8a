//! Page-size hints for pktdist's own large tables: the workers' flow
//! tables and the affinity table, which live on the Rust heap, not in
//! DPDK's memory.
//!
//! Each packet reads a bucket at a random place in a table of tens of
//! MiB. On 4 KiB pages that is a TLB miss and a page walk per packet (under
//! a hypervisor a nested one), whether or not DPDK's own memory is on
//! hugepages. Asking the kernel for transparent huge pages on the tables
//! (`MADV_HUGEPAGE`, before their first write) lets it back them with 2 MiB
//! pages where `/sys/kernel/mm/transparent_hugepage/enabled` is `always` or
//! `madvise`. Where it is `never`, or the kernel has no
//! huge page to give, the tables stay on small pages: a hint, never an
//! error.

use std::mem::MaybeUninit;

/// Size of a transparent huge page on x86_64 and of the smallest region
/// worth advising.
const HUGE_PAGE: usize = 2 << 20;
const PAGE: usize = 4096;

/// A boxed slice of `n` copies of `value`, whose memory was advised for
/// transparent huge pages (when it spans at least one) before it was
/// written: the first write faults it in, in huge pages if the kernel has
/// them.
pub fn huge_page_slice<T: Clone>(n: usize, value: T) -> Box<[T]> {
    huge_page_slice_with(n, || value.clone())
}

/// [`huge_page_slice`] with each element made by `make`.
pub fn huge_page_slice_with<T>(n: usize, make: impl FnMut() -> T) -> Box<[T]> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    advise_huge_pages(v.spare_capacity_mut());
    v.resize_with(n, make);
    v.into_boxed_slice()
}

/// Advises the whole pages inside `region` (not yet written) for
/// transparent huge pages. Returns whether the kernel took the advice; a
/// region smaller than a huge page is left alone (false).
fn advise_huge_pages<T>(region: &mut [MaybeUninit<T>]) -> bool {
    let start = region.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(region);
    // madvise takes page-aligned ranges: only the pages wholly inside.
    let first = start.next_multiple_of(PAGE);
    let last = end & !(PAGE - 1);
    if last <= first || last - first < HUGE_PAGE {
        return false;
    }
    advise(first, last - first)
}

#[cfg(target_os = "linux")]
fn advise(addr: usize, len: usize) -> bool {
    // SAFETY: madvise(MADV_HUGEPAGE) changes only which page size the
    // kernel may back the range with; it neither reads nor writes the
    // memory, nor changes its contents or its validity. The range is
    // page-aligned and lies inside an allocation the caller holds
    // exclusively (its whole pages only).
    unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn advise(_addr: usize, _len: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_hold_their_values_whatever_the_advice() {
        let small = huge_page_slice(10, 7u32);
        assert_eq!(&small[..], &[7; 10]);
        let n = 3 * HUGE_PAGE / 8;
        let big = huge_page_slice(n, u64::MAX);
        assert_eq!(big.len(), n);
        assert!(big.iter().all(|&x| x == u64::MAX));
        let mut i = 0u32;
        let made = huge_page_slice_with(5, || {
            i += 1;
            i
        });
        assert_eq!(&made[..], &[1, 2, 3, 4, 5]);
        assert_eq!(huge_page_slice(0, 1u8).len(), 0);
    }

    #[test]
    fn small_or_empty_regions_are_not_advised() {
        let mut v: Vec<u8> = Vec::with_capacity(HUGE_PAGE / 2);
        assert!(!advise_huge_pages(v.spare_capacity_mut()));
        let mut e: Vec<u8> = Vec::new();
        assert!(!advise_huge_pages(e.spare_capacity_mut()));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_kernel_takes_the_advice_on_a_large_region() {
        // EINVAL only where the kernel has no transparent huge pages at
        // all (built without them); `never` in sysfs still accepts it.
        let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled");
        let mut v: Vec<u8> = Vec::with_capacity(4 * HUGE_PAGE);
        assert_eq!(advise_huge_pages(v.spare_capacity_mut()), thp.exists());
    }
}
