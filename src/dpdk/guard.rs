//! Keeping driver event handlers and the data path apart, for the drivers
//! that need it.
//!
//! A port opened with [`super::PortSetup::guard_events`] whose driver is in
//! [`GUARDED_DRIVERS`] gets a [`Gate`]: its queues' receive and transmit
//! calls go to the driver only while the gate is open, and closing the gate
//! waits for the calls under way to return. The [`EventGuard`] of the
//! control thread opens a gate only while the port's link is up and
//! DPDK's interrupt thread is parked ([`super::intr`]), and lets the
//! interrupt thread handle the drivers' events (a peer connecting or
//! leaving) only while every gate is closed. Workers therefore never poll a
//! guarded port whose link is down, and never run its burst functions
//! concurrently with its event handlers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::intr;
use super::Port;

/// Drivers whose event handlers change what their burst functions read.
/// `net_memif`: the disconnect handler unmaps the memory shared with the
/// peer while a burst may still be reading it.
pub const GUARDED_DRIVERS: &[&str] = &["net_memif"];

/// How long the control thread waits for the interrupt thread to stop.
const INTR_TIMEOUT: Duration = Duration::from_secs(2);

/// One flag per queue and direction, each on its own cache line: set while
/// a thread is inside that queue's burst call.
#[repr(align(64))]
#[derive(Default)]
struct Busy(AtomicBool);

/// Whether a port's burst functions may be called now.
pub(crate) struct Gate {
    open: AtomicBool,
    busy: Box<[Busy]>,
}

impl Gate {
    /// A closed gate for a port with `queues` queue pairs.
    pub(crate) fn new(queues: u16) -> Gate {
        Gate {
            open: AtomicBool::new(false),
            busy: (0..usize::from(queues) * 2)
                .map(|_| Busy::default())
                .collect(),
        }
    }

    /// The busy flag of queue `queue`, receive (`tx` false) or transmit.
    fn slot(queue: u16, tx: bool) -> usize {
        usize::from(queue) * 2 + usize::from(tx)
    }

    /// Called before a burst on `queue`: true if the gate is open, and then
    /// the caller must call [`Gate::leave`] after the burst.
    #[inline]
    pub(crate) fn enter(&self, queue: u16, tx: bool) -> bool {
        let b = &self.busy[Gate::slot(queue, tx)].0;
        // Store then load, both sequentially consistent, against close's
        // store then load: either this load sees the gate closed, or
        // close's load sees this flag set and waits for leave.
        b.store(true, Ordering::SeqCst);
        if self.open.load(Ordering::SeqCst) {
            return true;
        }
        b.store(false, Ordering::Release);
        false
    }

    #[inline]
    pub(crate) fn leave(&self, queue: u16, tx: bool) {
        self.busy[Gate::slot(queue, tx)]
            .0
            .store(false, Ordering::Release);
    }

    /// Closes the gate and waits until no burst call is under way.
    fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
        for b in self.busy.iter() {
            while b.0.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
        }
    }

    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

/// The control thread's side of the gates: see the module documentation.
/// Call [`EventGuard::tick`] regularly (every 100 ms, say); a guarded port
/// passes no packet until the first tick that sees its link up.
pub struct EventGuard {
    ports: Vec<Arc<Port>>,
    parked: bool,
    /// The last error holding the interrupt thread, until reported.
    error: Option<String>,
}

impl EventGuard {
    /// Guards the ports of `ports` that have a gate (the others are left
    /// alone).
    pub fn new(ports: &[Arc<Port>]) -> EventGuard {
        EventGuard {
            ports: ports
                .iter()
                .filter(|p| p.gate().is_some())
                .cloned()
                .collect(),
            parked: false,
            error: None,
        }
    }

    /// Closes every gate, calls `before_events` (no worker is inside a
    /// guarded port's burst functions then, and no event has been handled
    /// since they last were: the moment to read the ports' counters, which
    /// memif zeroes when its peer leaves), lets the interrupt thread handle
    /// the events pending (a peer that connected or left), then opens the
    /// gates of the ports whose link is up, with the interrupt thread parked
    /// while any is open. With no link up the interrupt thread runs freely
    /// (a peer connects at its own pace) and every gate stays closed.
    pub fn tick(&mut self, before_events: impl FnOnce()) {
        if self.ports.is_empty() {
            before_events();
            return;
        }
        for p in &self.ports {
            if let Some(g) = p.gate() {
                g.close();
            }
        }
        before_events();
        if self.parked && !intr::window(INTR_TIMEOUT) {
            // Still busy in a handler, or could not be held again: the
            // gates stay closed until a later tick parks it.
            self.parked = false;
        }
        let up: Vec<bool> = self
            .ports
            .iter()
            .map(|p| p.link().is_ok_and(|l| l.up))
            .collect();
        if up.iter().any(|&u| u) {
            if !self.parked {
                match intr::park(INTR_TIMEOUT) {
                    Ok(()) => self.parked = true,
                    Err(e) => self.error = Some(e.to_string()),
                }
            }
            if self.parked {
                for (p, &u) in self.ports.iter().zip(&up) {
                    if u {
                        if let Some(g) = p.gate() {
                            g.open();
                        }
                    }
                }
            }
        } else {
            // Released even when not known to be parked: a park that timed
            // out leaves the thread to park later, at its alarm.
            intr::release(INTR_TIMEOUT);
            self.parked = false;
        }
    }

    /// An error of the last ticks (the interrupt thread could not be held,
    /// so guarded ports stay closed), once.
    pub fn take_error(&mut self) -> Option<String> {
        self.error.take()
    }

    /// Closes every gate and lets the interrupt thread run freely: for the
    /// end of a run, before the ports close (closing may need that thread).
    pub fn stop(&mut self) {
        for p in &self.ports {
            if let Some(g) = p.gate() {
                g.close();
            }
        }
        // As in `tick`: the thread may have parked after a park timed out.
        if !self.ports.is_empty() {
            intr::release(INTR_TIMEOUT);
        }
        self.parked = false;
    }
}

impl Drop for EventGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_starts_closed_and_admits_bursts_only_while_open() {
        let g = Gate::new(2);
        assert!(!g.enter(0, false));
        g.open();
        assert!(g.enter(0, false));
        assert!(g.enter(1, true));
        g.leave(0, false);
        g.leave(1, true);
        g.close();
        assert!(!g.enter(1, false));
    }

    #[test]
    fn closing_waits_for_the_burst_under_way() {
        let g = Arc::new(Gate::new(1));
        g.open();
        assert!(g.enter(0, true));
        let left = Arc::new(AtomicBool::new(false));
        let (g2, left2) = (Arc::clone(&g), Arc::clone(&left));
        let closer = std::thread::spawn(move || {
            g2.close();
            // close returned: the burst must have left before.
            left2.load(Ordering::SeqCst)
        });
        // The closer is inside close (the gate is shut) and must stay there
        // while the burst is under way.
        while g.open.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(20));
        assert!(!closer.is_finished(), "close returned during the burst");
        left.store(true, Ordering::SeqCst);
        g.leave(0, true);
        assert!(
            closer.join().unwrap(),
            "close returned while a burst was under way"
        );
        assert!(!g.enter(0, true));
    }
}
