//! Huge-page-backed allocations for pktdist's own large tables: the
//! workers' flow tables and the affinity table, which are the process's
//! own memory, not DPDK's.
//!
//! Each packet reads a bucket at a random place in a table of tens of
//! MiB. On 4 KiB pages that is a TLB miss and a page walk per packet (under
//! a hypervisor a nested one), whether or not DPDK's own memory is on
//! hugepages. A [`HugeSlice`] of at least a huge page gets a mapping of
//! its own (on Linux), starting on a 2 MiB boundary and filling whole huge
//! pages, advised for transparent huge pages (`MADV_HUGEPAGE`) before its
//! first write: every page of it can be a 2 MiB page where
//! `/sys/kernel/mm/transparent_hugepage/enabled` is `always` or `madvise`.
//! (The allocator's memory starts anywhere in a page, so a table's first
//! and last 2 MiB pieces, all of a 2 MiB table, would stay on small pages;
//! and it may hand out memory already faulted in on small ones.) Where it
//! is `never`, or the kernel has no huge page to give, the tables stay on
//! small pages: a hint, never an error.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::mem::{align_of, size_of};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Size of a transparent huge page on x86_64 and of the smallest region
/// worth advising.
const HUGE_PAGE: usize = 2 << 20;

/// A fixed-size slice whose memory, when it spans a huge page or more, is
/// its own mapping of whole huge pages, aligned to them and advised for
/// them. It dereferences to `[T]` like a `Box<[T]>`.
pub struct HugeSlice<T> {
    ptr: NonNull<T>,
    len: usize,
    memory: Memory,
}

/// Where a [`HugeSlice`]'s memory came from, to give it back there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Memory {
    /// Nothing was allocated: an empty slice, or zero-sized elements.
    None,
    /// The global allocator, with this layout.
    Heap(Layout),
    /// An anonymous mapping of this many bytes (whole huge pages).
    Mapped(usize),
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
    /// overflows; aborts when the memory cannot be had.
    pub fn with(n: usize, mut make: impl FnMut() -> T) -> HugeSlice<T> {
        const { assert!(align_of::<T>() <= HUGE_PAGE) };
        let size = n
            .checked_mul(size_of::<T>())
            .expect("HugeSlice size overflows");
        let (ptr, memory) = if size == 0 {
            // Written to a dangling, aligned pointer, as a Vec does.
            (NonNull::dangling(), Memory::None)
        } else if size >= HUGE_PAGE {
            let bytes = Some(Self::footprint(n))
                .filter(|&b| b <= isize::MAX as usize - HUGE_PAGE)
                .expect("HugeSlice size overflows");
            let (ptr, memory) = allocate_huge(bytes);
            (ptr.cast::<T>(), memory)
        } else {
            let layout =
                Layout::from_size_align(size, align_of::<T>()).expect("HugeSlice size overflows");
            (heap(layout).cast::<T>(), Memory::Heap(layout))
        };
        let mut s = HugeSlice {
            ptr,
            len: 0,
            memory,
        };
        // `len` counts the elements written, so a panic in `make` drops
        // those and frees the memory.
        while s.len < n {
            let v = make();
            // SAFETY: `s.len < n` and the memory holds `n` elements of `T`,
            // suitably aligned (for zero-sized `T`, the dangling pointer
            // is); the place is not yet initialized.
            unsafe { s.ptr.as_ptr().add(s.len).write(v) };
            s.len += 1;
        }
        s
    }

    /// Bytes a slice of `n` elements takes: whole huge pages from one
    /// spanning a huge page or more, else its elements' size (`usize::MAX`
    /// for a size that does not fit).
    pub fn footprint(n: usize) -> usize {
        let size = n.saturating_mul(size_of::<T>());
        if size >= HUGE_PAGE {
            size.checked_next_multiple_of(HUGE_PAGE)
                .unwrap_or(usize::MAX)
        } else {
            size
        }
    }

    /// `n` copies of `value`, as [`HugeSlice::with`].
    pub fn filled(n: usize, value: T) -> HugeSlice<T>
    where
        T: Clone,
    {
        HugeSlice::with(n, || value.clone())
    }
}

/// `bytes` (whole huge pages) of fresh memory in a mapping of its own,
/// aligned to a huge page and advised for huge pages.
#[cfg(target_os = "linux")]
fn allocate_huge(bytes: usize) -> (NonNull<u8>, Memory) {
    // Mapped a huge page longer, then trimmed to the aligned part.
    let span = bytes + HUGE_PAGE;
    // SAFETY: a new private anonymous mapping at an address the kernel
    // chooses: no memory of the process's is touched.
    let raw = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        handle_alloc_error(Layout::from_size_align(bytes, HUGE_PAGE).expect("huge-page layout"));
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let end = aligned + bytes;
    // SAFETY: both ranges are page-aligned pieces of the mapping just
    // made (its start, before the aligned part, and its end, after it),
    // which nothing else refers to.
    unsafe {
        if aligned > start {
            libc::munmap(raw, aligned - start);
        }
        if start + span > end {
            libc::munmap(end as *mut libc::c_void, start + span - end);
        }
    }
    advise(aligned, bytes);
    let ptr = NonNull::new(aligned as *mut u8).expect("a mapping is not at address 0");
    (ptr, Memory::Mapped(bytes))
}

/// `bytes` (whole huge pages) from the global allocator, aligned to a
/// huge page.
#[cfg(not(target_os = "linux"))]
fn allocate_huge(bytes: usize) -> (NonNull<u8>, Memory) {
    let layout = Layout::from_size_align(bytes, HUGE_PAGE).expect("huge-page layout");
    (heap(layout), Memory::Heap(layout))
}

/// Memory of a layout (not of size zero) from the global allocator.
fn heap(layout: Layout) -> NonNull<u8> {
    debug_assert!(layout.size() > 0);
    // SAFETY: the layout's size is not zero.
    let raw = unsafe { alloc(layout) };
    NonNull::new(raw).unwrap_or_else(|| handle_alloc_error(layout))
}

/// Gives memory back where it came from.
///
/// # Safety
///
/// `ptr` and `memory` are a [`HugeSlice`]'s, whose elements are dropped
/// or were never made, and neither is used again.
unsafe fn release(ptr: NonNull<u8>, memory: Memory) {
    match memory {
        Memory::None => {}
        // SAFETY: allocated by the global allocator with this layout.
        Memory::Heap(layout) => unsafe { dealloc(ptr.as_ptr(), layout) },
        #[cfg(target_os = "linux")]
        // SAFETY: the mapping `allocate_huge` made, whole.
        Memory::Mapped(bytes) => unsafe {
            libc::munmap(ptr.as_ptr().cast(), bytes);
        },
        #[cfg(not(target_os = "linux"))]
        Memory::Mapped(_) => unreachable!("no mappings off Linux"),
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
        /// Gives the memory back when dropped: also while an element's
        /// drop unwinds.
        struct Release(NonNull<u8>, Memory);
        impl Drop for Release {
            fn drop(&mut self) {
                // SAFETY: the slice's memory, released once, after its
                // elements were dropped (below) or their drop panicked.
                unsafe { release(self.0, self.1) }
            }
        }
        let _release = Release(self.ptr.cast(), self.memory);
        // SAFETY: the first `len` elements are initialized and dropped
        // once, here.
        unsafe {
            core::ptr::drop_in_place(core::ptr::slice_from_raw_parts_mut(
                self.ptr.as_ptr(),
                self.len,
            ));
        }
    }
}

impl<T> core::fmt::Debug for HugeSlice<T> {
    /// Its length and memory, not its (megabytes of) elements.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HugeSlice")
            .field("len", &self.len)
            .field("memory", &self.memory)
            .finish()
    }
}

/// Asks for transparent huge pages on a range: a hint, whose refusal
/// (a kernel without them) leaves the range on small pages.
#[cfg(target_os = "linux")]
fn advise(addr: usize, len: usize) {
    // SAFETY: madvise(MADV_HUGEPAGE) changes only which page size the
    // kernel may back the range with; it neither reads nor writes the
    // memory, nor changes its contents or its validity. The range is
    // huge-page-aligned and is a mapping the caller holds exclusively.
    unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn slices_hold_their_values() {
        let small = HugeSlice::filled(10, 7u32);
        assert_eq!(&small[..], &[7; 10]);
        let n = 3 * HUGE_PAGE / 8 + 1;
        let big = HugeSlice::filled(n, u64::MAX);
        assert_eq!(big.len(), n);
        assert!(big.iter().all(|&x| x == u64::MAX));
        let mut i = 0u32;
        let mut made = HugeSlice::with(5, || {
            i += 1;
            i
        });
        assert_eq!(&made[..], &[1, 2, 3, 4, 5]);
        made[4] = 9;
        assert_eq!(made[4], 9);
        assert_eq!(HugeSlice::filled(0, 1u8).len(), 0);
        assert_eq!(HugeSlice::filled(3, ()).len(), 3);
    }

    #[test]
    fn a_slice_of_a_huge_page_or_more_fills_whole_aligned_huge_pages() {
        let n = HUGE_PAGE / 8 + 1;
        let big = HugeSlice::filled(n, 0u64);
        assert_eq!(big.as_ptr() as usize % HUGE_PAGE, 0);
        #[cfg(target_os = "linux")]
        assert_eq!(big.memory, Memory::Mapped(2 * HUGE_PAGE));
        // Smaller ones are ordinary allocations.
        let small = HugeSlice::filled(HUGE_PAGE / 16, 0u64);
        assert_eq!(
            small.memory,
            Memory::Heap(Layout::new::<[u64; HUGE_PAGE / 16]>())
        );
        assert_eq!(HugeSlice::filled(0, 0u64).memory, Memory::None);
        assert_eq!(HugeSlice::filled(7, ()).memory, Memory::None);
    }

    #[test]
    fn elements_are_dropped_once_also_when_making_them_panics() {
        let token = Rc::new(());
        let s = HugeSlice::filled(HUGE_PAGE / 8, Rc::clone(&token));
        assert_eq!(Rc::strong_count(&token), HUGE_PAGE / 8 + 1);
        drop(s);
        assert_eq!(Rc::strong_count(&token), 1);
        let mut made = 0;
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            HugeSlice::with(10, || {
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
            let made = std::panic::catch_unwind(|| HugeSlice::filled(n, 0u64).len());
            let payload = made.expect_err("no such allocation");
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied());
            assert_eq!(message, Some("HugeSlice size overflows"));
        }
    }

    /// The kernel lists a huge slice's mapping as advised (`hg` in its
    /// `VmFlags`) wherever it has transparent huge pages at all (`never`
    /// in sysfs still takes the advice).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_huge_slice_is_advised_for_huge_pages() {
        let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled");
        let s = HugeSlice::filled(2 * HUGE_PAGE, 0u8);
        let at = s.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = false;
        let mut flags = None;
        for line in smaps.lines() {
            let range = line.split_once(' ').map_or("", |(r, _)| r);
            if let Some((lo, hi)) = range.split_once('-') {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = lo <= at && at < hi;
                    continue;
                }
            }
            if inside {
                if let Some(f) = line.strip_prefix("VmFlags:") {
                    flags = Some(f.split_whitespace().any(|f| f == "hg"));
                }
            }
        }
        assert_eq!(
            flags,
            Some(thp.exists()),
            "the slice's mapping and its flags"
        );
    }
}
