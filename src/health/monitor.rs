//! The control thread's side of the health checks: [`HealthMonitor`] runs
//! the checker thread while some backend is checked, tells it what to check
//! when the configuration or the services change, and turns its reports
//! into the [`HealthView`] and the [`HealthChange`]s the control thread
//! applies.

use std::time::SystemTime;

use crate::config::Config;
use crate::datapath::snapshot::Dataplane;
use crate::health::target::{self, Target};
use crate::health::{HealthChange, HealthChecker, HealthView, Report};

/// Most reports taken in one [`HealthMonitor::drain`]: the checker sends
/// one per probe, so this is far above a tick's worth; the rest wait for
/// the next tick.
const MAX_REPORTS_PER_DRAIN: usize = 100_000;

/// The health checks as the control thread runs them.
#[derive(Default)]
pub struct HealthMonitor {
    /// Running while `targets` is not empty.
    checker: Option<HealthChecker>,
    targets: Vec<Target>,
    view: HealthView,
    /// The dataplane generation the targets were taken from.
    generation: Option<u64>,
}

impl HealthMonitor {
    pub fn new() -> HealthMonitor {
        HealthMonitor::default()
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
    pub fn update(&mut self, cfg: &Config, dp: &Dataplane) -> Result<Vec<HealthChange>, String> {
        self.generation = Some(dp.generation);
        let targets = target::targets(cfg, dp);
        if targets == self.targets {
            return Ok(Vec::new());
        }
        let stopped = self.view.set_targets(&targets, SystemTime::now());
        if targets.is_empty() {
            if let Some(mut c) = self.checker.take() {
                c.stop();
            }
        } else if let Some(c) = &self.checker {
            c.set_targets(targets.clone());
        } else {
            self.checker = Some(
                HealthChecker::start(targets.clone())
                    .map_err(|e| format!("cannot start the health checker: {e}"))?,
            );
        }
        self.targets = targets;
        Ok(stopped)
    }

    /// Takes the checker's reports: probe results go into the view, state
    /// changes of backends still checked into the view and the result.
    pub fn drain(&mut self) -> Vec<HealthChange> {
        let mut changes = Vec::new();
        let Some(checker) = &self.checker else {
            return changes;
        };
        for _ in 0..MAX_REPORTS_PER_DRAIN {
            match checker.try_recv() {
                Some(Report::Probe(p)) => self.view.record_probe(&p),
                Some(Report::Change(c)) => {
                    if self.view.apply(&c) {
                        changes.push(c);
                    }
                }
                None => break,
            }
        }
        changes
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
        if let Some(mut c) = self.checker.take() {
            c.stop();
        }
    }
}
