//! Keeping the state file current: [`StateSaver`] loads it at start and
//! writes the requested affinities back after they change (at most once per
//! [`SAVE_INTERVAL`]) and at shutdown.
//!
//! The control thread copies the records out (memory only) and a writer
//! thread of its own encodes and writes them (the slow part: the checksum,
//! write, fsync, rename, fsync the directory), so the control thread never
//! waits for the disk while it serves. At shutdown the last state is written before the
//! process ends.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::control::plane::{ControlPlane, Restored};
use crate::control::state_file::{self, LoadErrorKind, SavedState};

/// The shortest time between two writes of the file.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(1);

/// The wall clock in Unix milliseconds.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What [`StateSaver`] has done, for the summary and the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaverCounters {
    /// Writes that completed.
    pub saves: u64,
    /// Writes that failed (each logged).
    pub failures: u64,
}

/// A write handed to the writer thread: the plane's change count it holds,
/// and the state.
struct Job {
    changes: u64,
    state: SavedState,
}

/// The state file of a running instance and its writer thread.
pub struct StateSaver {
    path: PathBuf,
    jobs: Option<SyncSender<Job>>,
    results: Receiver<(u64, Result<(), String>)>,
    thread: Option<JoinHandle<()>>,
    /// The plane's change count the file holds.
    saved: u64,
    /// A write is with the writer thread.
    busy: bool,
    last: Option<Instant>,
    counters: SaverCounters,
}

impl StateSaver {
    /// Reads the state file at `path` into `plane` (nothing when there is
    /// none yet) and starts the writer. A file that cannot be used is an
    /// error naming it and what is wrong, unless `discard_bad` is set: then
    /// it is moved aside to `<path>.bad`, the plane starts without it, and
    /// that is logged.
    pub fn open(
        path: &Path,
        plane: &mut ControlPlane,
        discard_bad: bool,
    ) -> Result<StateSaver, String> {
        match state_file::load(path) {
            Ok(None) => log::info!(
                "state file {}: none yet, starting without saved affinities",
                path.display()
            ),
            Ok(Some(state)) => {
                let r: Restored = plane.restore(&state.affinities, wall_ms());
                log::info!(
                    "state file {}: {} affinit(ies) restored, {} expired while stopped, {} whose service or backend is gone, {} not installable",
                    path.display(),
                    r.installed,
                    r.expired,
                    r.gone,
                    r.refused
                );
            }
            Err(e) if discard_bad && matches!(e.kind, LoadErrorKind::Bad(_)) => {
                let aside = state_file::set_aside_path(path);
                let moved = std::fs::rename(path, &aside)
                    .map(|_| format!("moved to {}", aside.display()))
                    .unwrap_or_else(|m| format!("could not be moved aside: {m}"));
                log::error!(
                    "{e}; --discard-bad-state: STARTING WITHOUT SAVED AFFINITIES, their owners are not notified (the file was {moved})"
                );
            }
            Err(e) => {
                let hint = if matches!(e.kind, LoadErrorKind::Bad(_)) {
                    " (run with --discard-bad-state to start without it)"
                } else {
                    ""
                };
                return Err(format!("{e}{hint}"));
            }
        }
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(1);
        let (result_tx, results) = mpsc::channel();
        let target = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("pktdist-state".into())
            .spawn(move || {
                for job in job_rx {
                    let bytes = state_file::encode(&job.state);
                    let r = state_file::write_atomic(&target, &bytes).map_err(|e| e.to_string());
                    if result_tx.send((job.changes, r)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| format!("state file writer thread: {e}"))?;
        Ok(StateSaver {
            path: path.to_path_buf(),
            jobs: Some(jobs),
            results,
            thread: Some(thread),
            // Restored state that changed nothing (no file, or all kept) is
            // written at the first tick anyway: cheap, and proves the
            // directory writable early.
            saved: u64::MAX,
            busy: false,
            last: None,
            counters: SaverCounters::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn counters(&self) -> SaverCounters {
        self.counters
    }

    /// Collects finished writes, and hands the writer the plane's state if
    /// it changed since the file was written and the last write is at least
    /// [`SAVE_INTERVAL`] old. Call every tick.
    pub fn tick(&mut self, plane: &ControlPlane, now: Instant) {
        self.collect();
        let changes = plane.affinities().changes();
        if self.busy
            || changes == self.saved
            || self
                .last
                .is_some_and(|l| now.duration_since(l) < SAVE_INTERVAL)
        {
            return;
        }
        let Some(jobs) = &self.jobs else { return };
        let state = plane.saved_state(wall_ms());
        if jobs.send(Job { changes, state }).is_ok() {
            self.busy = true;
            self.last = Some(now);
        }
    }

    /// Writes the plane's state now and stops the writer: for shutdown.
    /// Waits for a write under way first, so the last one wins.
    pub fn finish(&mut self, plane: &ControlPlane) -> Result<(), String> {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.collect();
        let bytes = state_file::encode(&plane.saved_state(wall_ms()));
        let r = state_file::write_atomic(&self.path, &bytes)
            .map_err(|e| format!("state file {}: {e}", self.path.display()));
        match &r {
            Ok(()) => {
                self.counters.saves += 1;
                self.saved = plane.affinities().changes();
            }
            Err(_) => self.counters.failures += 1,
        }
        r
    }

    fn collect(&mut self) {
        loop {
            match self.results.try_recv() {
                Ok((changes, Ok(()))) => {
                    self.busy = false;
                    self.saved = changes;
                    self.counters.saves += 1;
                }
                Ok((_, Err(e))) => {
                    self.busy = false;
                    self.counters.failures += 1;
                    log::error!(
                        "state file {}: not saved: {e} (retrying)",
                        self.path.display()
                    );
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return,
            }
        }
    }
}

impl Drop for StateSaver {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
