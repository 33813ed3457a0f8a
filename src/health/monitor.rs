//! The control thread's side of the health checks: [`HealthMonitor`] runs
//! the checker thread while some backend is checked, tells it what to check
//! when the configuration or the services change, and turns its reports
//! into the [`HealthView`] and the [`HealthChange`]s the control thread
//! applies.

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant, SystemTime};

use crate::config::Config;
use crate::datapath::snapshot::Dataplane;
use crate::health::target::{self, Target};
use crate::health::view::HealthSummary;
use crate::health::{HealthChange, HealthChecker, HealthView, Report};

/// Most reports taken in one [`HealthMonitor::drain`]: the checker sends
/// one per probe, so this is far above a tick's worth; the rest wait for
/// the next tick.
const MAX_REPORTS_PER_DRAIN: usize = 100_000;
/// The wait before starting the checker again after it could not start or
/// ended by itself; it doubles with each such start, up to
/// [`RESTART_MAX`], and is forgotten once a checker has run for
/// [`RESTART_RESET`] (whose end is then followed by a start at once).
const RESTART_FIRST: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(60);
const RESTART_RESET: Duration = Duration::from_secs(60);

/// Starts a checker on the targets, those named in the list starting down.
type Start = Box<dyn FnMut(Vec<Target>, Vec<(String, String)>) -> io::Result<HealthChecker> + Send>;

/// The health checks as the control thread runs them.
pub struct HealthMonitor {
    /// Running while `targets` is not empty, but while `restart_at` waits.
    checker: Option<HealthChecker>,
    /// When the running checker started.
    started: Instant,
    targets: Vec<Target>,
    view: HealthView,
    /// The dataplane generation the targets were taken from.
    generation: Option<u64>,
    /// The last [`Target::id`] given.
    last_id: u64,
    /// While the checker is to run but does not (it could not start, or
    /// its thread ended): when to start it again.
    restart_at: Option<Instant>,
    /// The wait before the next start after a failed start or an end.
    backoff: Duration,
    /// Checkers started in place of one that could not start or ended.
    restarts: u64,
    /// [`HealthMonitor::stop`] ended the checks on purpose (at shutdown):
    /// the checker is not down.
    stopped: bool,
    start: Start,
}

impl Default for HealthMonitor {
    fn default() -> HealthMonitor {
        HealthMonitor::with_start(Box::new(HealthChecker::start))
    }
}

impl HealthMonitor {
    pub fn new() -> HealthMonitor {
        HealthMonitor::default()
    }

    /// A monitor that starts its checkers with `start` (tests give one
    /// that fails).
    pub(super) fn with_start(start: Start) -> HealthMonitor {
        HealthMonitor {
            checker: None,
            targets: Vec::new(),
            view: HealthView::default(),
            generation: None,
            last_id: 0,
            started: Instant::now(),
            restart_at: None,
            backoff: RESTART_FIRST,
            restarts: 0,
            stopped: false,
            start,
        }
    }

    /// True when `dp` is not the snapshot the targets were taken from
    /// (backends were added, removed or changed since).
    pub fn is_stale(&self, dp: &Dataplane) -> bool {
        self.generation != Some(dp.generation)
    }

    /// Checks the backends `cfg` asks to check among those of `dp`:
    /// starts the checker when the first is checked, stops it when none is,
    /// and hands it the new list when that changed. Returns the backends
    /// that were down and are checked no longer (they count as up again).
    /// A checker that cannot start is logged and started again later
    /// (by [`HealthMonitor::drain`]).
    pub fn update(&mut self, cfg: &Config, dp: &Dataplane) -> Vec<HealthChange> {
        if self.stopped {
            return Vec::new();
        }
        self.generation = Some(dp.generation);
        let mut targets = target::targets(cfg, dp);
        let ids: HashMap<(&str, &str), u64> =
            self.targets.iter().map(|t| (t.key(), t.id)).collect();
        for t in &mut targets {
            t.id = match ids.get(&t.key()) {
                Some(&id) => id,
                None => {
                    self.last_id += 1;
                    self.last_id
                }
            };
        }
        if targets == self.targets {
            return Vec::new();
        }
        let stopped = self.view.set_targets(&targets, SystemTime::now());
        self.targets = targets;
        if self.targets.is_empty() {
            self.restart_at = None;
            self.backoff = RESTART_FIRST;
            if let Some(mut c) = self.checker.take() {
                c.stop();
            }
        } else if let Some(c) = &self.checker {
            c.set_targets(self.targets.clone());
        } else if self.restart_at.is_none() {
            self.start_checker(Instant::now());
        }
        stopped
    }

    /// Starts the checker on the targets, each in the view's state; if it
    /// cannot start, schedules the next try.
    fn start_checker(&mut self, now: Instant) {
        let down = self
            .view
            .down()
            .map(|(service, backend, _)| (service.to_string(), backend.to_string()))
            .collect();
        match (self.start)(self.targets.clone(), down) {
            Ok(c) => {
                self.checker = Some(c);
                self.started = now;
                if self.restart_at.take().is_some() {
                    self.restarts += 1;
                    log::warn!("health checks: the checker runs again");
                }
            }
            Err(e) => {
                log::error!(
                    "health checks: cannot start the checker: {e}; trying again in {}s",
                    self.backoff.as_secs()
                );
                self.schedule_restart(now);
            }
        }
    }

    /// True while backends are to be checked and no checker runs (but
    /// after [`HealthMonitor::stop`]).
    pub fn checker_down(&self) -> bool {
        !self.stopped && !self.targets.is_empty() && self.checker.is_none()
    }

    /// The checks for the statistics, at `now`.
    pub fn summary(&self, now: SystemTime) -> HealthSummary {
        HealthSummary {
            checker_down: self.checker_down(),
            checker_restarts: self.restarts,
            ..self.view.summary(now)
        }
    }

    /// Takes the checker's reports: probe results go into the view, state
    /// changes of backends still checked into the view and the result.
    /// Then starts the checker again if it should run and does not (its
    /// thread ended unasked, and backends would have kept their last state
    /// for good; or it could not start): at once after a checker that ran
    /// [`RESTART_RESET`], else after a wait that doubles with each end or
    /// failed start. Backends keep their state meanwhile; the new checker
    /// starts each in it.
    pub fn drain(&mut self) -> Vec<HealthChange> {
        self.drain_at(Instant::now())
    }

    /// [`HealthMonitor::drain`] at `now`.
    pub(super) fn drain_at(&mut self, now: Instant) -> Vec<HealthChange> {
        // Asked before the reports are taken, so that none of an ended
        // thread's last reports is lost.
        let ended = self.checker.as_ref().is_some_and(HealthChecker::has_ended);
        let changes = self.take_reports();
        if ended {
            self.checker = None;
            if now.saturating_duration_since(self.started) >= RESTART_RESET {
                self.backoff = RESTART_FIRST;
                self.restart_at = Some(now);
                log::error!("health checks: the checker thread ended; starting it again");
            } else {
                log::error!(
                    "health checks: the checker thread ended; starting it again in {}s",
                    self.backoff.as_secs()
                );
                self.schedule_restart(now);
            }
        }
        if self.restart_at.is_some_and(|at| now >= at) {
            self.start_checker(now);
        }
        changes
    }

    /// The next start after the current wait, which then doubles.
    fn schedule_restart(&mut self, now: Instant) {
        self.restart_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(RESTART_MAX);
    }

    fn take_reports(&mut self) -> Vec<HealthChange> {
        let mut changes = Vec::new();
        let Some(checker) = &self.checker else {
            return changes;
        };
        for _ in 0..MAX_REPORTS_PER_DRAIN {
            match checker.try_recv() {
                Some(Report::Probe(target, p)) => self.view.record_probe(target, &p),
                Some(Report::Change(target, c)) => {
                    if self.view.apply(target, &c) {
                        changes.push(c);
                    }
                }
                None => break,
            }
        }
        changes
    }

    /// The checker thread, while it runs.
    #[cfg(test)]
    pub(super) fn checker(&self) -> Option<&HealthChecker> {
        self.checker.as_ref()
    }

    /// The backends checked now.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    pub fn view(&self) -> &HealthView {
        &self.view
    }

    /// Stops the checker thread (checks end; the view stays).
    pub fn stop(&mut self) {
        self.stopped = true;
        self.restart_at = None;
        if let Some(mut c) = self.checker.take() {
            c.stop();
        }
    }
}
