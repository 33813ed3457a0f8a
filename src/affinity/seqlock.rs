//! A sequence lock over one `AtomicU32`: readers take no lock (they wait
//! only while a writer is inside) and never act on a torn read, writers
//! bump the version around each change.
//!
//! The protected data must itself be atomics (read and written `Relaxed`) so
//! that a reader racing a writer is not a data race in Rust's memory model;
//! the version tells the reader whether what it read is one consistent state.
//! The fences follow Boehm, "Can seqlocks get along with programming language
//! memory models?" (MSPC 2012).

use core::sync::atomic::{fence, AtomicU32, Ordering};

/// The version word. Odd while a writer is inside.
#[derive(Default)]
pub(crate) struct SeqLock(AtomicU32);

impl SeqLock {
    /// Starts a read: the current even version (spins while a write is in
    /// progress, which lasts a few stores).
    #[inline]
    pub(crate) fn read_begin(&self) -> u32 {
        loop {
            let v = self.0.load(Ordering::Acquire);
            if v & 1 == 0 {
                return v;
            }
            core::hint::spin_loop();
        }
    }

    /// Ends a read: true if nothing was written since `read_begin` returned
    /// `v`, so every value read in between belongs to one state.
    #[inline]
    pub(crate) fn read_valid(&self, v: u32) -> bool {
        fence(Ordering::Acquire);
        self.0.load(Ordering::Relaxed) == v
    }

    /// Starts a write by the only writer of this lock. Returns the odd version
    /// to hand to [`SeqLock::write_end`].
    #[inline]
    pub(crate) fn write_begin(&self) -> u32 {
        let odd = self.0.load(Ordering::Relaxed).wrapping_add(1);
        self.0.store(odd, Ordering::Relaxed);
        // Orders the odd version before the data stores that follow.
        fence(Ordering::Release);
        odd
    }

    /// Ends a write: publishes the data stores with the next even version.
    #[inline]
    pub(crate) fn write_end(&self, odd: u32) {
        self.0.store(odd.wrapping_add(1), Ordering::Release);
    }

    /// Starts a write when several threads may write: the version doubles as
    /// a spin lock (even = free). The guard ends the write when dropped.
    #[inline]
    pub(crate) fn lock(&self) -> SeqGuard<'_> {
        loop {
            let v = self.0.load(Ordering::Relaxed);
            if v & 1 == 0
                && self
                    .0
                    .compare_exchange_weak(
                        v,
                        v.wrapping_add(1),
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    )
                    .is_ok()
            {
                fence(Ordering::Release);
                return SeqGuard {
                    lock: self,
                    odd: v.wrapping_add(1),
                };
            }
            core::hint::spin_loop();
        }
    }
}

/// A write in progress on a [`SeqLock`] taken with [`SeqLock::lock`].
pub(crate) struct SeqGuard<'a> {
    lock: &'a SeqLock,
    odd: u32,
}

impl Drop for SeqGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.lock.write_end(self.odd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::Arc;

    #[test]
    fn read_detects_write() {
        let l = SeqLock::default();
        let v = l.read_begin();
        assert!(l.read_valid(v));
        let odd = l.write_begin();
        assert_eq!(odd & 1, 1);
        assert!(!l.read_valid(v));
        l.write_end(odd);
        assert!(!l.read_valid(v));
        let v2 = l.read_begin();
        assert_eq!(v2, v + 2);
        {
            let _g = l.lock();
            assert!(!l.read_valid(v2));
        }
        assert_eq!(l.read_begin(), v2 + 2);
    }

    /// Two words written together are always read together.
    #[test]
    fn no_torn_pairs() {
        struct Pair {
            lock: SeqLock,
            a: AtomicU64,
            b: AtomicU64,
        }
        let p = Arc::new(Pair {
            lock: SeqLock::default(),
            a: AtomicU64::new(0),
            b: AtomicU64::new(!0),
        });
        // The writers write until the reader has read, while they wrote,
        // many pairs of many values.
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                let (p, stop) = (p.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let x = i * 2 + t;
                        let _g = p.lock.lock();
                        p.a.store(x, Ordering::Relaxed);
                        p.b.store(!x, Ordering::Relaxed);
                        i += 1;
                    }
                })
            })
            .collect();
        let (mut checked, mut values) = (0u64, std::collections::HashSet::new());
        while checked < 100_000 || values.len() < 1_000 {
            let v = p.lock.read_begin();
            let a = p.a.load(Ordering::Relaxed);
            let b = p.b.load(Ordering::Relaxed);
            if p.lock.read_valid(v) {
                assert_eq!(a, !b);
                checked += 1;
                values.insert(a);
            }
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
    }
}
