//! The rise/fall state machine of one backend: up until `fall` checks in a
//! row fail, then down until `rise` checks in a row pass.
//!
//! A backend starts **up**, as keepalived's and HAProxy's do by default:
//! after a start or a reload the scheduler keeps sending new connections to
//! the backends it was configured with while their first checks run,
//! rather than refusing every connection of the service until `rise`
//! checks have passed (a restart of pktdist must not black-hole a healthy
//! service for `rise x interval`). A backend that really is dead costs what
//! it cost before the restart: at most `fall x interval` of failed
//! connections, then it is down.

use std::time::Instant;

/// One backend's health state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RiseFall {
    up: bool,
    /// Checks passed in a row (while down: towards `rise`).
    passed: u32,
    /// Checks failed in a row (while up: towards `fall`).
    failed: u32,
    since: Instant,
}

impl RiseFall {
    /// A backend up (or down) since `now`.
    pub fn new(up: bool, now: Instant) -> RiseFall {
        RiseFall {
            up,
            passed: 0,
            failed: 0,
            since: now,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// When the current state began.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Counts one check's result at `now`; returns the new state when it
    /// changed (true: up).
    pub fn record(&mut self, passed: bool, rise: u32, fall: u32, now: Instant) -> Option<bool> {
        if passed {
            self.failed = 0;
            self.passed = self.passed.saturating_add(1);
            if !self.up && self.passed >= rise.max(1) {
                return Some(self.change(true, now));
            }
        } else {
            self.passed = 0;
            self.failed = self.failed.saturating_add(1);
            if self.up && self.failed >= fall.max(1) {
                return Some(self.change(false, now));
            }
        }
        None
    }

    /// Forgets the checks counted so far and keeps the state: the next
    /// checks (with new settings) decide from here.
    pub fn restart_counts(&mut self) {
        self.passed = 0;
        self.failed = 0;
    }

    fn change(&mut self, up: bool, now: Instant) -> bool {
        self.up = up;
        self.passed = 0;
        self.failed = 0;
        self.since = now;
        up
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Feeds `results` ('+' pass, '-' fail) one second apart; returns the
    /// changes as (check index, new state).
    fn run(
        rf: &mut RiseFall,
        t0: Instant,
        rise: u32,
        fall: u32,
        results: &str,
    ) -> Vec<(usize, bool)> {
        results
            .chars()
            .enumerate()
            .filter_map(|(i, c)| {
                let now = t0 + Duration::from_secs(i as u64 + 1);
                rf.record(c == '+', rise, fall, now).map(|s| (i, s))
            })
            .collect()
    }

    #[test]
    fn starts_up_goes_down_after_fall_and_up_after_rise() {
        let t0 = Instant::now();
        let mut rf = RiseFall::new(true, t0);
        assert!(rf.is_up());
        assert_eq!(rf.since(), t0);
        // Two failures of three: still up; the third takes it down.
        assert_eq!(run(&mut rf, t0, 2, 3, "--"), []);
        assert!(rf.is_up());
        let t = t0 + Duration::from_secs(10);
        assert_eq!(run(&mut rf, t, 2, 3, "-"), [(0, false)]);
        assert!(!rf.is_up());
        assert_eq!(rf.since(), t + Duration::from_secs(1));
        // More failures change nothing; one pass is not enough.
        assert_eq!(run(&mut rf, t, 2, 3, "---+"), []);
        assert_eq!(run(&mut rf, t, 2, 3, "+"), [(0, true)]);
        assert!(rf.is_up());
    }

    #[test]
    fn a_backend_started_down_needs_rise_passes() {
        let t0 = Instant::now();
        let mut rf = RiseFall::new(false, t0);
        assert!(!rf.is_up());
        assert_eq!(run(&mut rf, t0, 2, 3, "---+-+-"), []);
        assert_eq!(run(&mut rf, t0, 2, 3, "++"), [(1, true)]);
    }

    #[test]
    fn flapping_never_reaches_either_threshold() {
        let t0 = Instant::now();
        let mut rf = RiseFall::new(true, t0);
        // Up: failures never three in a row.
        assert_eq!(run(&mut rf, t0, 2, 3, "--+--+-+--+--+"), []);
        assert!(rf.is_up());
        assert_eq!(
            rf.since(),
            t0,
            "since is the state's start, not the last check"
        );
        // Down: passes never two in a row.
        assert_eq!(run(&mut rf, t0, 2, 3, "---"), [(2, false)]);
        assert_eq!(run(&mut rf, t0, 2, 3, "+-+-+-+--+-"), []);
        assert!(!rf.is_up());
        // A pattern that crosses both: every change reported once.
        let mut rf = RiseFall::new(true, t0);
        assert_eq!(
            run(&mut rf, t0, 2, 2, "--++--++"),
            [(1, false), (3, true), (5, false), (7, true)]
        );
    }

    #[test]
    fn thresholds_of_one_follow_every_check() {
        let t0 = Instant::now();
        let mut rf = RiseFall::new(true, t0);
        assert_eq!(
            run(&mut rf, t0, 1, 1, "-+-++-"),
            [(0, false), (1, true), (2, false), (3, true), (5, false)]
        );
    }

    #[test]
    fn restarting_the_counts_keeps_the_state() {
        let t0 = Instant::now();
        let mut rf = RiseFall::new(true, t0);
        assert_eq!(run(&mut rf, t0, 2, 3, "--"), []);
        rf.restart_counts();
        assert_eq!(run(&mut rf, t0, 2, 3, "--"), [], "the count starts again");
        assert_eq!(run(&mut rf, t0, 2, 3, "-"), [(0, false)]);
        assert_eq!(run(&mut rf, t0, 2, 3, "+"), []);
        rf.restart_counts();
        assert!(!rf.is_up());
        assert_eq!(run(&mut rf, t0, 2, 3, "++"), [(1, true)]);
    }
}
