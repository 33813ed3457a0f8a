//! Huge-page-backed allocations for pktdist's own large tables: the
//! workers' flow tables and the affinity table, which live on the Rust
//! heap, not in DPDK's memory.
//!
//! Each packet reads a bucket at a random place in a table of tens of
//! MiB. On 4 KiB pages that is a TLB miss and a page walk per packet (under
//! a hypervisor a nested one), whether or not DPDK's own memory is on
//! hugepages. A [`HugeSlice`] of at least a huge page starts on a 2 MiB
//! boundary and fills whole huge pages, and its memory is advised for
//! transparent huge pages (`MADV_HUGEPAGE`) before its first write: every
//! page of it can be a 2 MiB page where
//! `/sys/kernel/mm/transparent_hugepage/enabled` is `always` or `madvise`.
//! (A plain allocation of a few MiB starts anywhere in a page, so its
//! first and last 2 MiB pieces, all of a 2 MiB table, stay on small
//! pages.) Where it is `never`, or the kernel has no huge page to give,
//! the tables stay on small pages: a hint, never an error.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::mem::{align_of, size_of};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Size of a transparent huge page on x86_64 and of the smallest region
/// worth advising.
const HUGE_PAGE: usize = 2 << 20;

/// A fixed-size slice whose memory, when it spans a huge page or more, is
/// aligned to and padded out to whole huge pages and advised for them. It
/// dereferences to `[T]` like a `Box<[T]>`.
pub struct HugeSlice<T> {
    ptr: NonNull<T>,
    len: usize,
    /// The allocation's layout; `None` when nothing was allocated (an
    /// empty slice, or zero-sized elements).
    layout: Option<Layout>,
}

// SAFETY: a HugeSlice owns its elements as a Box<[T]> does: sending or
// sharing it sends or shares them, nothing else.
unsafe impl<T: Send> Send for HugeSlice<T> {}
// SAFETY: as above; `&HugeSlice` gives only `&[T]`.
unsafe impl<T: Sync> Sync for HugeSlice<T> {}

impl<T> HugeSlice<T> {
    /// `n` elements, each made by `make`, in memory advised for huge pages
    /// before it is written (the first write faults it in, in huge pages
    /// if the kernel has them). Panics, as `Vec` does, when the size
    /// overflows; aborts when the allocator fails.
    pub fn with(n: usize, mut make: impl FnMut() -> T) -> HugeSlice<T> {
        let size = n
            .checked_mul(size_of::<T>())
            .expect("HugeSlice size overflows");
        let huge = size >= HUGE_PAGE;
        let (bytes, align) = if huge {
            let whole_pages = size.checked_next_multiple_of(HUGE_PAGE);
            (whole_pages, HUGE_PAGE.max(align_of::<T>()))
        } else {
            (Some(size), align_of::<T>())
        };
        let layout = (size > 0).then(|| {
            bytes
                .and_then(|b| Layout::from_size_align(b, align).ok())
                .expect("HugeSlice size overflows")
        });
        let ptr = match layout {
            // Nothing to allocate: an empty slice, or zero-sized elements
            // (written to a dangling, aligned pointer, as a Vec does).
            None => NonNull::dangling(),
            Some(layout) => {
                // SAFETY: the layout's size is not zero.
                let raw = unsafe { alloc(layout) };
                let Some(ptr) = NonNull::new(raw.cast::<T>()) else {
                    handle_alloc_error(layout)
                };
                if huge {
                    advise(raw as usize, layout.size());
                }
                ptr
            }
        };
        let mut s = HugeSlice {
            ptr,
            len: 0,
            layout,
        };
        // `len` counts the elements written, so a panic in `make` drops
        // those and frees the memory.
        while s.len < n {
            let v = make();
            // SAFETY: `s.len < n` and the allocation holds `n` elements of
            // `T`, suitably aligned (for zero-sized `T`, the dangling
            // pointer is); the place is not yet initialized.
            unsafe { s.ptr.as_ptr().add(s.len).write(v) };
            s.len += 1;
        }
        s
    }
}

impl<T> Deref for HugeSlice<T> {
    type Target = [T];

    #[inline(always)]
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` holds `len` initialized elements (or is dangling
        // and well aligned for a length of zero or zero-sized `T`), owned
        // by `self` for the borrow's life.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> DerefMut for HugeSlice<T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Drop for HugeSlice<T> {
    fn drop(&mut self) {
        // SAFETY: the first `len` elements are initialized and dropped once
        // here; the memory was allocated with `layout` and is freed once.
        unsafe {
            core::ptr::drop_in_place(core::ptr::slice_from_raw_parts_mut(
                self.ptr.as_ptr(),
                self.len,
            ));
            if let Some(layout) = self.layout {
                dealloc(self.ptr.as_ptr().cast(), layout);
            }
        }
    }
}

impl<T: core::fmt::Debug> core::fmt::Debug for HugeSlice<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// A [`HugeSlice`] of `n` copies of `value`.
pub fn huge_page_slice<T: Clone>(n: usize, value: T) -> HugeSlice<T> {
    HugeSlice::with(n, || value.clone())
}

/// A [`HugeSlice`] with each element made by `make`.
pub fn huge_page_slice_with<T>(n: usize, make: impl FnMut() -> T) -> HugeSlice<T> {
    HugeSlice::with(n, make)
}

#[cfg(target_os = "linux")]
fn advise(addr: usize, len: usize) -> bool {
    // SAFETY: madvise(MADV_HUGEPAGE) changes only which page size the
    // kernel may back the range with; it neither reads nor writes the
    // memory, nor changes its contents or its validity. The range is
    // huge-page-aligned and is an allocation the caller holds exclusively.
    unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn advise(_addr: usize, _len: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn slices_hold_their_values() {
        let small = huge_page_slice(10, 7u32);
        assert_eq!(&small[..], &[7; 10]);
        let n = 3 * HUGE_PAGE / 8 + 1;
        let big = huge_page_slice(n, u64::MAX);
        assert_eq!(big.len(), n);
        assert!(big.iter().all(|&x| x == u64::MAX));
        let mut i = 0u32;
        let mut made = huge_page_slice_with(5, || {
            i += 1;
            i
        });
        assert_eq!(&made[..], &[1, 2, 3, 4, 5]);
        made[4] = 9;
        assert_eq!(made[4], 9);
        assert_eq!(huge_page_slice(0, 1u8).len(), 0);
        assert_eq!(huge_page_slice(3, ()).len(), 3);
    }

    #[test]
    fn a_slice_of_a_huge_page_or_more_fills_whole_aligned_huge_pages() {
        let n = HUGE_PAGE / 8 + 1;
        let big = huge_page_slice(n, 0u64);
        assert_eq!(big.as_ptr() as usize % HUGE_PAGE, 0);
        let layout = big.layout.expect("allocated");
        assert_eq!(layout.size(), 2 * HUGE_PAGE);
        // Smaller ones are ordinary allocations.
        let small = huge_page_slice(HUGE_PAGE / 16, 0u64);
        assert_eq!(small.layout.expect("allocated").align(), align_of::<u64>());
        assert!(huge_page_slice(0, 0u64).layout.is_none());
    }

    #[test]
    fn elements_are_dropped_once_also_when_making_them_panics() {
        let token = Rc::new(());
        let s = huge_page_slice(HUGE_PAGE / 8, Rc::clone(&token));
        assert_eq!(Rc::strong_count(&token), HUGE_PAGE / 8 + 1);
        drop(s);
        assert_eq!(Rc::strong_count(&token), 1);
        let mut made = 0;
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            huge_page_slice_with(10, || {
                made += 1;
                assert!(made <= 4, "the fifth element fails");
                Rc::clone(&token)
            })
        }));
        assert!(built.is_err());
        assert_eq!(Rc::strong_count(&token), 1, "the four made are dropped");
    }

    /// A size past what the address space holds, in elements or once
    /// padded to whole huge pages, panics before anything is allocated.
    #[test]
    fn impossible_sizes_panic_rather_than_allocate_less() {
        for n in [usize::MAX / 4, isize::MAX as usize / 8] {
            let made = std::panic::catch_unwind(|| huge_page_slice(n, 0u64).len());
            let payload = made.expect_err("no such allocation");
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied());
            assert_eq!(message, Some("HugeSlice size overflows"));
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_kernel_takes_the_advice_on_a_huge_slice() {
        // EINVAL only where the kernel has no transparent huge pages at
        // all (built without them); `never` in sysfs still accepts it.
        let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled");
        let s = huge_page_slice(2 * HUGE_PAGE, 0u8);
        let layout = s.layout.expect("allocated");
        assert_eq!(advise(s.as_ptr() as usize, layout.size()), thp.exists());
    }
}
