//! Holding DPDK's interrupt thread still.
//!
//! EAL runs the drivers' event handlers (device interrupts, alarms, control
//! sockets such as memif's) on a thread of its own, `eal-intr-thread`. Some
//! handlers change, without any synchronisation, what the driver's receive
//! and transmit functions read on the workers: DPDK 22.11's memif
//! disconnect handler (`memif_disconnect`, run when the peer goes away)
//! clears the "connected" flag that each burst checks once at its start and
//! then unmaps the memory shared with the peer, while a worker that passed
//! the check a moment earlier is still copying packets out of it.
//!
//! This module parks the interrupt thread inside an alarm callback of ours,
//! where it runs no handler, and lets it go only when asked:
//!
//! * [`park`]: returns once the thread waits in our callback;
//! * [`window`]: lets it process what is pending (the handlers run to
//!   completion), then parks it again;
//! * [`release`]: lets it run freely.
//!
//! [`super::EventGuard`] uses these to run driver events only while no
//! worker is inside the burst functions of the ports they concern.

use std::ffi::c_void;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::sys;
use super::DpdkError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Not held: the thread handles events as they come.
    Free,
    /// Our alarm is set; the thread parks when it fires.
    Arming,
    /// The thread waits in our callback.
    Parked,
    /// Asked to leave the callback, handle what is pending and park again.
    Window,
    /// Asked to leave the callback for good.
    Releasing,
}

struct Hold {
    phase: Mutex<Phase>,
    changed: Condvar,
}

static HOLD: Hold = Hold {
    phase: Mutex::new(Phase::Free),
    changed: Condvar::new(),
};

/// How long after a window opens the alarm that ends it fires. EAL's alarm
/// handler calls every alarm already due before it returns to the event
/// loop: one due at once would park the thread again before it handled
/// anything. Events still pending then wait for the next window.
const WINDOW_US: u64 = 200;

fn lock() -> MutexGuard<'static, Phase> {
    HOLD.phase.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sets the alarm whose callback parks the interrupt thread.
fn arm(us: u64) -> Result<(), DpdkError> {
    // SAFETY: `hold` is a valid callback for the life of the process and
    // takes no argument; EAL copies the alarm entry. Fails (without effect)
    // when EAL is not initialised.
    let ret = unsafe { sys::rte_eal_alarm_set(us, Some(hold), std::ptr::null_mut()) };
    if ret < 0 {
        return Err(DpdkError::ret("rte_eal_alarm_set", ret));
    }
    Ok(())
}

/// The alarm callback, on the interrupt thread: parks until told otherwise.
extern "C" fn hold(_arg: *mut c_void) {
    let mut phase = lock();
    if *phase != Phase::Releasing {
        *phase = Phase::Parked;
        HOLD.changed.notify_all();
        while *phase == Phase::Parked {
            phase = HOLD.changed.wait(phase).unwrap_or_else(|e| e.into_inner());
        }
    }
    *phase = match *phase {
        Phase::Window => match arm(WINDOW_US) {
            Ok(()) => Phase::Arming,
            // Cannot come back: the thread runs freely from now on, which
            // `park` and `window` report.
            Err(_) => Phase::Free,
        },
        _ => Phase::Free,
    };
    HOLD.changed.notify_all();
}

/// Waits until the phase is no longer one of `passing`, at most until
/// `deadline`.
fn wait_past(
    mut phase: MutexGuard<'static, Phase>,
    passing: &[Phase],
    deadline: Instant,
) -> MutexGuard<'static, Phase> {
    while passing.contains(&*phase) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        phase = HOLD
            .changed
            .wait_timeout(phase, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    phase
}

/// Parks the interrupt thread: returns `Ok` once it waits in our callback,
/// so that no driver event handler runs until [`window`] or [`release`].
/// A handler running now finishes first; gives up after `timeout`.
pub fn park(timeout: Duration) -> Result<(), DpdkError> {
    let deadline = Instant::now() + timeout;
    let mut phase = lock();
    // A release under way ends first.
    phase = wait_past(phase, &[Phase::Releasing], deadline);
    if *phase == Phase::Free {
        arm(1)?;
        *phase = Phase::Arming;
    }
    phase = wait_past(phase, &[Phase::Arming, Phase::Window], deadline);
    match *phase {
        Phase::Parked => Ok(()),
        Phase::Free => Err(DpdkError::InvalidArgument(
            "the interrupt thread could not be held (alarm not set again)".into(),
        )),
        _ => Err(DpdkError::InvalidArgument(format!(
            "the interrupt thread did not come to a stop within {timeout:?}"
        ))),
    }
}

/// Lets the parked interrupt thread handle the events pending now and parks
/// it again. Returns true once it is parked again; false if it was not
/// parked, could not be held again, or is still busy after `timeout` (it
/// parks later; [`park`] waits for that).
pub fn window(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut phase = lock();
    if *phase != Phase::Parked {
        return false;
    }
    *phase = Phase::Window;
    HOLD.changed.notify_all();
    phase = wait_past(phase, &[Phase::Window, Phase::Arming], deadline);
    *phase == Phase::Parked
}

/// Lets the interrupt thread run freely again; returns once it has left our
/// callback (at most `timeout` later).
pub fn release(timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut phase = lock();
    phase = wait_past(phase, &[Phase::Window], deadline);
    if matches!(*phase, Phase::Parked | Phase::Arming) {
        *phase = Phase::Releasing;
        HOLD.changed.notify_all();
    }
    drop(wait_past(phase, &[Phase::Releasing], deadline));
}
