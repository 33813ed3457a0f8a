//! The health-checker thread and its handle: [`HealthChecker::start`]
//! spawns `pktdist-health`, [`HealthChecker::set_targets`] changes what it
//! checks, [`HealthChecker::try_recv`] takes its reports, and
//! [`HealthChecker::stop`] (or dropping the handle) ends it.
//!
//! The thread's loop: take the control thread's commands, start the probes
//! that are due and fail those past their deadline (a heap of timers), then
//! wait in the poll until the next timer, a socket event or a wake-up from
//! the control thread.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use mio::{Events, Poll, Token, Waker};

use crate::health::probe::{Outcome, Probe, StartError};
use crate::health::rise_fall::RiseFall;
use crate::health::target::Target;
use crate::health::{HealthChange, ProbeResult, Report};

/// The waker's token; probes use their slot's index.
const WAKE: Token = Token(usize::MAX);
/// Events taken from the poll at once.
const EVENTS: usize = 1024;
/// How long a probe that could not start for want of a resource here (a
/// file descriptor, or a slot under [`in_flight_limit`]) waits to try again.
const RETRY: Duration = Duration::from_millis(5);

/// Most probes in flight at once: half the process's open-file limit left
/// after 64 for everything else (from /proc/self/limits), between 32 and
/// 16,384. Beyond it a probe waits for a slot rather than failing: a host
/// out of descriptors is not a backend that failed its check.
fn in_flight_limit() -> usize {
    in_flight_limit_of(std::fs::read_to_string("/proc/self/limits").ok().as_deref())
}

/// [`in_flight_limit`] for the text of `/proc/self/limits` (`None`: not
/// readable; a soft limit of 1024 assumed, "unlimited" as the most).
fn in_flight_limit_of(limits: Option<&str>) -> usize {
    let soft = limits
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .map(|v| v.parse::<usize>().unwrap_or(usize::MAX))
        })
        .unwrap_or(1024);
    (soft.saturating_sub(64) / 2).clamp(32, 16_384)
}

/// What the control thread tells the checker.
enum Command {
    /// Check these from now on; those of `down` that are new to the
    /// checker start down (a checker started again takes its state from
    /// the control thread's view).
    Targets {
        targets: Vec<Target>,
        down: Vec<(String, String)>,
    },
    Stop,
}

/// The handle of the health-checker thread.
pub struct HealthChecker {
    commands: Sender<Command>,
    reports: Receiver<Report>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl HealthChecker {
    /// Spawns the checker thread, checking `targets`: each starts up, but
    /// those named (service, backend) in `down`, which start down (a
    /// checker started again in place of one that stopped).
    pub fn start(targets: Vec<Target>, down: Vec<(String, String)>) -> io::Result<HealthChecker> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let (commands, command_rx) = mpsc::channel();
        let (report_tx, reports) = mpsc::channel();
        let _ = commands.send(Command::Targets { targets, down });
        let thread = std::thread::Builder::new()
            .name("pktdist-health".into())
            .spawn(move || Checker::new(poll, command_rx, report_tx).run())?;
        Ok(HealthChecker {
            commands,
            reports,
            waker,
            thread: Some(thread),
        })
    }

    /// Checks `targets` from now on. A target kept (same service and
    /// backend) keeps its state; if its settings changed, its checks count
    /// from here with the new ones.
    pub fn set_targets(&self, targets: Vec<Target>) {
        let down = Vec::new();
        if self
            .commands
            .send(Command::Targets { targets, down })
            .is_ok()
        {
            let _ = self.waker.wake();
        }
    }

    /// The next report, if one is waiting.
    pub fn try_recv(&self) -> Option<Report> {
        self.reports.try_recv().ok()
    }

    /// True when the thread ended without being told to (it panicked):
    /// its checks have stopped.
    pub fn has_ended(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| t.is_finished())
    }

    /// Ends the thread as if it had panicked: the handle stays, and
    /// [`HealthChecker::has_ended`] soon says so.
    #[cfg(test)]
    pub(super) fn end_unasked(&self) {
        let _ = self.commands.send(Command::Stop);
        let _ = self.waker.wake();
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.commands.send(Command::Stop);
            let _ = self.waker.wake();
            let _ = t.join();
        }
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One target and its state.
struct Checked {
    target: Target,
    state: RiseFall,
    /// When its next probe starts.
    next: Instant,
    /// Its probe in flight: the slot.
    in_flight: Option<usize>,
}

/// A probe in flight.
struct InFlight {
    probe: Probe,
    /// Index into the targets.
    target: usize,
    started: Instant,
    serial: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    /// Start target's probe (if `epoch` is still the targets').
    Start { target: usize, epoch: u64 },
    /// The deadline of the probe in `slot` (if it is still `serial`).
    Deadline { slot: usize, serial: u64 },
}

/// The checker thread's state.
struct Checker {
    poll: Poll,
    commands: Receiver<Command>,
    reports: Sender<Report>,
    targets: Vec<Checked>,
    /// Counts target lists: Start timers of an older list are stale.
    epoch: u64,
    timers: BinaryHeap<Reverse<(Instant, TimerKind)>>,
    probes: Vec<Option<InFlight>>,
    free: Vec<usize>,
    serial: u64,
    /// Probes in flight now, and the most allowed.
    in_flight: usize,
    max_in_flight: usize,
    /// A local failure to start a probe was logged (once per run of them).
    local_error_logged: bool,
}

impl Checker {
    fn new(poll: Poll, commands: Receiver<Command>, reports: Sender<Report>) -> Checker {
        Checker {
            poll,
            commands,
            reports,
            targets: Vec::new(),
            epoch: 0,
            timers: BinaryHeap::new(),
            probes: Vec::new(),
            free: Vec::new(),
            serial: 0,
            in_flight: 0,
            max_in_flight: in_flight_limit(),
            local_error_logged: false,
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS);
        loop {
            let now = Instant::now();
            loop {
                match self.commands.try_recv() {
                    Ok(Command::Targets { targets, down }) => self.set_targets(targets, &down, now),
                    Ok(Command::Stop) | Err(TryRecvError::Disconnected) => return,
                    Err(TryRecvError::Empty) => break,
                }
            }
            self.fire(now);
            let wait = self
                .timers
                .peek()
                .map(|Reverse((at, _))| at.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, wait) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("health checks: poll: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            for ev in events.iter() {
                if ev.token() != WAKE {
                    self.ready(ev.token().0);
                }
            }
        }
    }

    /// Replaces the target list, keeping the state (and the schedule, when
    /// the check is unchanged) of the targets kept; new ones start up,
    /// unless named in `down`.
    fn set_targets(&mut self, targets: Vec<Target>, down: &[(String, String)], now: Instant) {
        self.epoch += 1;
        let mut old: HashMap<(String, String), (usize, Checked)> = self
            .targets
            .drain(..)
            .enumerate()
            .map(|(i, c)| ((c.target.service.clone(), c.target.backend.clone()), (i, c)))
            .collect();
        let mut moved = HashMap::new();
        for target in targets {
            let key = (target.service.clone(), target.backend.clone());
            let checked = match old.remove(&key) {
                Some((i, mut c)) => {
                    let changed = c.target != target;
                    if changed {
                        c.state.restart_counts();
                        c.next = now + phase(&target);
                        c.target = target;
                    }
                    moved.insert(i, (self.targets.len(), changed));
                    c
                }
                None => Checked {
                    next: now + phase(&target),
                    state: RiseFall::new(!down.contains(&key), now),
                    target,
                    in_flight: None,
                },
            };
            self.targets.push(checked);
        }
        // Probes of targets gone end unreported, and so do those of targets
        // whose settings changed (a probe to the old address or port, or
        // with the old timeout, is not a check of the new settings); the
        // others follow theirs.
        for slot in 0..self.probes.len() {
            let Some(p) = &mut self.probes[slot] else {
                continue;
            };
            match moved.get(&p.target) {
                Some(&(to, false)) => p.target = to,
                _ => self.drop_probe(slot),
            }
        }
        for c in &mut self.targets {
            if c.in_flight.is_some_and(|s| self.probes[s].is_none()) {
                c.in_flight = None;
            }
        }
        self.timers
            .retain(|Reverse((_, k))| matches!(k, TimerKind::Deadline { .. }));
        for (i, c) in self.targets.iter().enumerate() {
            self.timers.push(Reverse((
                c.next,
                TimerKind::Start {
                    target: i,
                    epoch: self.epoch,
                },
            )));
        }
    }

    /// Runs the timers due at `now`.
    fn fire(&mut self, now: Instant) {
        while let Some(&Reverse((at, kind))) = self.timers.peek() {
            if at > now {
                return;
            }
            self.timers.pop();
            match kind {
                TimerKind::Start { target, epoch } if epoch == self.epoch => {
                    self.start_probe(target, now)
                }
                TimerKind::Start { .. } => {}
                TimerKind::Deadline { slot, serial } => {
                    if let Some(p) = &self.probes[slot] {
                        if p.serial == serial {
                            let timeout = self.targets[p.target].target.check.timeout;
                            let why = p.probe.timeout_error(timeout);
                            self.finish(slot, Some(why), now);
                        }
                    }
                }
            }
        }
    }

    /// Tries target `t`'s probe again shortly (it could not start).
    fn retry_start(&mut self, t: usize, now: Instant) {
        self.timers.push(Reverse((
            now + RETRY,
            TimerKind::Start {
                target: t,
                epoch: self.epoch,
            },
        )));
    }

    /// Starts target `t`'s probe, due at its `next`, and schedules the
    /// next one an interval later. Without a slot or a descriptor for it,
    /// the probe tries again shortly and the schedule stays.
    fn start_probe(&mut self, t: usize, now: Instant) {
        if self.targets[t].in_flight.is_some() {
            // The previous probe, which started late (it waited for a
            // slot), is still out at this due start: this one is skipped.
            return self.schedule_next(t, now);
        }
        if self.in_flight >= self.max_in_flight {
            return self.retry_start(t, now);
        }
        let slot = self.free.pop().unwrap_or_else(|| {
            self.probes.push(None);
            self.probes.len() - 1
        });
        let target = &self.targets[t].target;
        match Probe::start(
            target.addr,
            target.check.http.as_ref(),
            self.poll.registry(),
            Token(slot),
        ) {
            Ok(probe) => {
                self.serial += 1;
                self.in_flight += 1;
                let deadline = now + target.check.timeout;
                self.probes[slot] = Some(InFlight {
                    probe,
                    target: t,
                    started: now,
                    serial: self.serial,
                });
                self.targets[t].in_flight = Some(slot);
                self.timers.push(Reverse((
                    deadline,
                    TimerKind::Deadline {
                        slot,
                        serial: self.serial,
                    },
                )));
                self.local_error_logged = false;
                self.schedule_next(t, now);
            }
            Err(StartError::Failed(why)) => {
                self.free.push(slot);
                self.conclude(t, Duration::ZERO, Some(why), now);
                self.schedule_next(t, now);
            }
            Err(StartError::Local(why)) => {
                self.free.push(slot);
                if !self.local_error_logged {
                    self.local_error_logged = true;
                    log::warn!(
                        "health checks: cannot start a probe ({why}); probes wait and try again"
                    );
                }
                self.retry_start(t, now);
            }
        }
    }

    /// Schedules target `t`'s next probe an interval after the one due at
    /// its `next` (skipping whole intervals already past, so it keeps its
    /// phase).
    fn schedule_next(&mut self, t: usize, now: Instant) {
        let interval = self.targets[t].target.check.interval;
        let due = self.targets[t].next;
        let mut next = due + interval;
        if next <= now {
            let behind = now.duration_since(due).as_nanos() / interval.as_nanos().max(1);
            next = due + interval * (behind as u32 + 1);
        }
        self.targets[t].next = next;
        self.timers.push(Reverse((
            next,
            TimerKind::Start {
                target: t,
                epoch: self.epoch,
            },
        )));
    }

    /// A socket event for the probe in `slot`.
    fn ready(&mut self, slot: usize) {
        let Some(Some(p)) = self.probes.get_mut(slot) else {
            return;
        };
        if let Some(outcome) = p.probe.advance() {
            self.finish(slot, outcome, Instant::now());
        }
    }

    /// Ends the probe in `slot` with `outcome` at `now`.
    fn finish(&mut self, slot: usize, outcome: Outcome, now: Instant) {
        let Some(p) = self.probes[slot].as_ref() else {
            return;
        };
        let (t, started) = (p.target, p.started);
        self.drop_probe(slot);
        self.targets[t].in_flight = None;
        let timeout = self.targets[t].target.check.timeout;
        let elapsed = now.saturating_duration_since(started).min(timeout);
        self.conclude(t, elapsed, outcome, now);
    }

    fn drop_probe(&mut self, slot: usize) {
        if let Some(mut p) = self.probes[slot].take() {
            p.probe.deregister(self.poll.registry());
            self.free.push(slot);
            self.in_flight -= 1;
        }
    }

    /// Counts target `t`'s check and reports it, and the change it makes.
    fn conclude(&mut self, t: usize, elapsed: Duration, error: Outcome, now: Instant) {
        let c = &mut self.targets[t];
        let check = &c.target.check;
        let changed = c.state.record(error.is_none(), check.rise, check.fall, now);
        let _ = self.reports.send(Report::Probe(
            c.target.id,
            ProbeResult {
                service: c.target.service.clone(),
                backend: c.target.backend.clone(),
                kind: check.kind,
                elapsed,
                error: error.clone(),
            },
        ));
        if let Some(up) = changed {
            let _ = self.reports.send(Report::Change(
                c.target.id,
                HealthChange {
                    service: c.target.service.clone(),
                    backend: c.target.backend.clone(),
                    up,
                    error: if up { None } else { error },
                    checked: c.target.addr,
                    at: SystemTime::now(),
                },
            ));
        }
    }
}

/// When a target's probes start within its interval: a fixed fraction
/// from its names, so the probes of many backends spread evenly.
pub(super) fn phase(t: &Target) -> Duration {
    let mut h = DefaultHasher::new();
    t.service.hash(&mut h);
    t.backend.hash(&mut h);
    let frac = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
    t.check.interval.mul_f64(frac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HealthKind;
    use crate::health::target::CheckSpec;

    #[test]
    fn phases_spread_a_thousand_targets_over_the_interval() {
        let interval = Duration::from_secs(1);
        let mut per_tenth = [0u32; 10];
        for i in 0..1000 {
            let t = Target {
                id: 0,
                service: "fleet".into(),
                backend: format!("be{i}"),
                addr: "127.0.0.1:80".parse().unwrap(),
                check: CheckSpec {
                    kind: HealthKind::Tcp,
                    interval,
                    timeout: Duration::from_millis(500),
                    rise: 2,
                    fall: 3,
                    http: None,
                },
            };
            let p = phase(&t);
            assert!(p < interval);
            assert_eq!(p, phase(&t), "a target keeps its phase");
            per_tenth[(p.as_millis() / 100) as usize] += 1;
        }
        // About 100 in each tenth of the interval, never a burst.
        assert!(
            per_tenth.iter().all(|&n| (60..=140).contains(&n)),
            "{per_tenth:?}"
        );
    }

    #[test]
    fn probes_in_flight_are_bounded_by_the_open_file_limit() {
        let limits = |soft: &str| {
            format!(
                "Limit                     Soft Limit           Hard Limit           Units     \n\
                 Max processes             95383                95383                processes \n\
                 Max open files            {soft:<20} 524288               files     \n"
            )
        };
        for (soft, want) in [
            ("1024", 480),
            ("100", 32),
            ("1048576", 16_384),
            ("unlimited", 16_384),
        ] {
            assert_eq!(in_flight_limit_of(Some(&limits(soft))), want, "{soft}");
        }
        assert_eq!(in_flight_limit_of(None), 480, "1024 assumed");
        assert_eq!(in_flight_limit_of(Some("")), 480, "1024 assumed");
    }
}
