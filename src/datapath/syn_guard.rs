//! The SYN flood guard: past a rate of SYNs, a worker stops giving new
//! connections flow entries until the rate falls again.
//!
//! A SYN flood (spoofed clients that never finish a handshake) would
//! otherwise fill the worker's flow table with half-open connections,
//! evicting the established flows the table is there to keep, and make
//! every SYN pay a table lookup and insert. The guard counts the worker's
//! SYNs to services (repeats included: it reads no table to tell them
//! apart) in windows of [`WINDOW_NS`]. It is engaged for a whole window when
//! the window before counted more than the limit, and for the rest of a
//! window once that window's count passes it: so during a flood it stays
//! engaged, and the window after the flood's last one releases it.
//!
//! While it is engaged, a SYN of a service the consistent hash schedules
//! without automatic affinity is forwarded without reading or writing the
//! flow table: its backend is chosen as an unknown flow's later packet chooses
//! it (the affinity table, then the consistent hash), so the client's
//! ACK, routed as an unknown flow's packet, follows it and is tracked from
//! then on. (Round robin's choice cannot be found again, and only tracked
//! connections hold automatic-affinity pins: those services' SYNs are
//! always tracked, see `Service::stateless_syns`.) The worker does this in
//! [`super::worker`]; this module only counts and decides.

/// The default limit, in SYNs per second per worker (`[flow]
/// syn_flood_rate`): above what one worker core's share of a busy
/// service's legitimate connections reaches, far below a flood's.
pub const DEFAULT_RATE: u32 = 100_000;

/// The guard's window: long enough to count a rate, short enough to let
/// go soon after a flood ends.
pub const WINDOW_NS: u64 = 100_000_000;

/// One worker's guard.
#[derive(Debug)]
pub struct SynGuard {
    /// Most SYNs a window takes before the guard engages ([`u32::MAX`]:
    /// never, the guard is off).
    limit: u32,
    /// The current window's end (ns on the worker's clock).
    end: u64,
    /// SYNs counted in the current window.
    count: u32,
    /// Engaged for the whole current window (the last one was a flood's).
    engaged: bool,
}

impl SynGuard {
    /// A guard that engages past `rate` SYNs per second on one worker
    /// (rounded up to a whole number per window); 0 turns it off.
    pub fn new(rate: u32) -> SynGuard {
        let limit = if rate == 0 {
            u32::MAX
        } else {
            let per_window = (u64::from(rate) * WINDOW_NS).div_ceil(1_000_000_000);
            u32::try_from(per_window).unwrap_or(u32::MAX - 1)
        };
        SynGuard {
            limit,
            end: 0,
            count: 0,
            engaged: false,
        }
    }

    /// Moves to the window that holds `now`, once per poll: the guard stays
    /// engaged for that window when the window just over counted more SYNs
    /// than the limit (a window that went by without a poll counted none).
    #[inline(always)]
    pub fn tick(&mut self, now: u64) {
        if now >= self.end {
            self.engaged = self.count > self.limit && now < self.end + WINDOW_NS;
            self.count = 0;
            self.end = now + WINDOW_NS;
        }
    }

    /// Counts one SYN to a service; true when the guard is engaged for it.
    #[inline(always)]
    pub fn count_syn(&mut self) -> bool {
        self.count = self.count.saturating_add(1);
        self.engaged || self.count > self.limit
    }

    /// True while the guard is engaged (for the gauge).
    pub fn engaged(&self) -> bool {
        self.engaged || self.count > self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Counts `n` SYNs, answering how many the guard let through tracked.
    fn syns(g: &mut SynGuard, n: u32) -> u32 {
        (0..n).filter(|_| !g.count_syn()).count() as u32
    }

    #[test]
    fn a_rate_is_counted_per_window() {
        // 1,000 per second: 100 per 100 ms window.
        let mut g = SynGuard::new(1000);
        g.tick(0);
        assert_eq!(syns(&mut g, 100), 100);
        assert!(!g.engaged());
        // The 101st engages it for the rest of the window.
        assert_eq!(syns(&mut g, 50), 0);
        assert!(g.engaged());
        // The next window follows a flood's: engaged from its first SYN.
        g.tick(100 * MS);
        assert!(g.engaged());
        assert_eq!(syns(&mut g, 10), 0);
        // It counted 10: the window after that lets go.
        g.tick(200 * MS);
        assert!(!g.engaged());
        assert_eq!(syns(&mut g, 100), 100);
    }

    #[test]
    fn a_flood_keeps_it_engaged_and_a_quiet_spell_releases_it() {
        let mut g = SynGuard::new(10_000);
        let mut t = 0;
        g.tick(t);
        let mut tracked = 0;
        // Ten windows of 5,000 SYNs each (50,000 per second).
        for _ in 0..10 {
            tracked += syns(&mut g, 5_000);
            t += WINDOW_NS;
            g.tick(t);
        }
        // Only the first window's first 1,000 were tracked.
        assert_eq!(tracked, 1_000);
        assert!(g.engaged());
        // A poll long after the flood (no SYN in between) finds it
        // released, whatever the last window counted.
        g.tick(t + 5 * WINDOW_NS);
        assert!(!g.engaged());
        // Polls without SYNs release it too.
        let mut g = SynGuard::new(10_000);
        g.tick(0);
        syns(&mut g, 5_000);
        g.tick(WINDOW_NS);
        assert!(g.engaged());
        g.tick(2 * WINDOW_NS);
        assert!(!g.engaged());
    }

    #[test]
    fn ticks_inside_a_window_change_nothing() {
        let mut g = SynGuard::new(1000);
        g.tick(0);
        syns(&mut g, 60);
        g.tick(50 * MS);
        assert_eq!(syns(&mut g, 60), 40);
    }

    #[test]
    fn zero_turns_it_off_and_small_rates_round_up() {
        let mut g = SynGuard::new(0);
        g.tick(0);
        assert_eq!(syns(&mut g, 1_000_000), 1_000_000);
        assert!(!g.engaged());
        g.tick(WINDOW_NS);
        assert!(!g.engaged());
        // 1 per second is 1 per window, not 0.
        let mut g = SynGuard::new(1);
        g.tick(0);
        assert_eq!(syns(&mut g, 2), 1);
        // The largest rate is a limit, not "off".
        let mut g = SynGuard::new(u32::MAX);
        g.tick(0);
        assert!(!g.count_syn());
    }
}
