//! A port's device counters as pktdist reports them: kept across a peer's
//! disconnect and summed across a device's counter resets.
//!
//! Some drivers report zeros while their link is down and their own counts
//! again once it is up (memif: its statistics cover only the rings of the
//! current connection, and its queue counters carry on when the peer comes
//! back); a restarted device may start its counters from zero. Read
//! regularly with the link state, the counters reported here never go
//! back: a reading below the previous one is ignored while the link is down
//! (the driver is not counting) and, with the link up, taken as a reset
//! whose previous total is kept.

use std::time::{Duration, Instant};

use super::summary::PortSummary;

/// The counters of [`PortSummary`], in the order of [`fields`].
const N: usize = 8;

fn fields(p: &PortSummary) -> [u64; N] {
    [
        p.ipackets,
        p.opackets,
        p.ibytes,
        p.obytes,
        p.imissed,
        p.ierrors,
        p.oerrors,
        p.rx_nombuf,
    ]
}

/// One port's reported counters.
#[derive(Clone, Debug, Default)]
pub struct PortCounters {
    /// The last reading taken (per counter).
    last: [u64; N],
    /// What earlier counter resets took away (per counter).
    base: [u64; N],
    link_up: bool,
}

impl PortCounters {
    pub fn new() -> PortCounters {
        PortCounters::default()
    }

    /// Takes a reading of the device's counters (`raw`; its name and link
    /// field are ignored) and whether the link was up around it.
    pub fn update(&mut self, raw: &PortSummary, link_up: bool) {
        for ((now, last), base) in fields(raw)
            .into_iter()
            .zip(&mut self.last)
            .zip(&mut self.base)
        {
            if now >= *last {
                *last = now;
            } else if link_up {
                *base = base.wrapping_add(*last);
                *last = now;
            }
        }
        self.link_up = link_up;
    }

    /// Whether the link was up at the last reading.
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// The counters to report for port `name`.
    pub fn summary(&self, name: &str) -> PortSummary {
        let v: [u64; N] = std::array::from_fn(|i| self.base[i].wrapping_add(self.last[i]));
        PortSummary {
            name: name.to_string(),
            ipackets: v[0],
            opackets: v[1],
            ibytes: v[2],
            obytes: v[3],
            imissed: v[4],
            ierrors: v[5],
            oerrors: v[6],
            rx_nombuf: v[7],
            link_down: !self.link_up,
        }
    }
}

/// Whether a port's link has failed: down for longer than a hold-down
/// after having been up, and until it has been up again for as long (a
/// flapping link stays failed). A port that never came up (a memif port
/// waiting for its first peer, a NIC still negotiating) has not failed: it
/// never carried traffic that would now be lost.
#[derive(Clone, Debug, Default)]
pub struct LinkWatch {
    up_once: bool,
    failed: bool,
    /// Since when the link reads as it does now.
    since: Option<Instant>,
    up: bool,
}

impl LinkWatch {
    /// Takes a reading of the link at `now`; `hold` is how long a change
    /// must last to count.
    pub fn update(&mut self, up: bool, now: Instant, hold: Duration) {
        if up != self.up || self.since.is_none() {
            self.up = up;
            self.since = Some(now);
        }
        self.up_once |= up;
        let lasted = self
            .since
            .is_some_and(|t| now.saturating_duration_since(t) >= hold);
        if lasted {
            self.failed = !up && self.up_once;
        }
    }

    /// Whether the link has failed.
    pub fn failed(&self) -> bool {
        self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_fails_when_down_past_the_hold_down_after_being_up() {
        let hold = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut w = LinkWatch::default();
        let mut at = |ms: u64, up: bool| {
            w.update(up, t0 + Duration::from_millis(ms), hold);
            w.failed()
        };
        // Never up yet: waiting, not failed.
        assert!(!at(0, false));
        assert!(!at(5_000, false));
        assert!(!at(5_000, true));
        assert!(!at(6_000, false));
        assert!(!at(6_500, false), "within the hold-down");
        assert!(at(7_000, false));
        // Back up: failed until it has stayed up for the hold-down too.
        assert!(at(7_100, true));
        assert!(at(7_900, true), "a flap is not a recovery");
        assert!(at(7_950, false));
        assert!(at(8_500, true));
        assert!(at(9_400, true));
        assert!(!at(9_500, true));
        // A new loss starts a new hold-down.
        assert!(!at(10_000, false));
        assert!(!at(10_900, false));
        assert!(at(11_000, false));
    }

    fn reading(ipackets: u64, opackets: u64) -> PortSummary {
        PortSummary {
            ipackets,
            opackets,
            ibytes: ipackets * 64,
            ..PortSummary::default()
        }
    }

    #[test]
    fn zeros_while_the_link_is_down_keep_the_last_counts() {
        let mut c = PortCounters::new();
        c.update(&reading(100, 90), true);
        c.update(&reading(0, 0), false);
        let s = c.summary("memif");
        assert_eq!((s.ipackets, s.opackets, s.ibytes), (100, 90, 6400));
        assert!(s.link_down);
        // The peer is back and the driver's counters carry on.
        c.update(&reading(150, 140), true);
        let s = c.summary("memif");
        assert_eq!((s.ipackets, s.opackets), (150, 140));
        assert!(!s.link_down);
        assert_eq!(s.name, "memif");
    }

    #[test]
    fn a_reset_with_the_link_up_adds_to_the_total() {
        let mut c = PortCounters::new();
        c.update(&reading(100, 90), true);
        c.update(&reading(5, 3), true);
        assert_eq!(c.summary("p").ipackets, 105);
        assert_eq!(c.summary("p").opackets, 93);
        c.update(&reading(20, 30), true);
        assert_eq!(c.summary("p").ipackets, 120);
        assert_eq!(c.summary("p").opackets, 120);
        // A reset seen only after a disconnect counts once the link is up.
        c.update(&reading(0, 0), false);
        c.update(&reading(7, 1), true);
        assert_eq!(c.summary("p").ipackets, 127);
        assert_eq!(c.summary("p").opackets, 121);
    }

    #[test]
    fn counters_never_go_back() {
        let mut c = PortCounters::new();
        let mut last = 0;
        for (i, (v, up)) in [
            (10, true),
            (3, false),
            (12, true),
            (0, false),
            (0, true),
            (4, true),
        ]
        .into_iter()
        .enumerate()
        {
            c.update(&reading(v, 0), up);
            let now = c.summary("p").ipackets;
            assert!(now >= last, "reading {i} went back: {last} -> {now}");
            last = now;
        }
        assert_eq!(last, 16);
    }
}
