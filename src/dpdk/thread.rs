//! Worker threads: pinned to one core each and, under DPDK, registered
//! with EAL so that they get an lcore id and mempool caches.

use std::sync::mpsc;
use std::thread::{self, JoinHandle, Thread};

use super::DpdkError;

/// A running worker; [`WorkerHandle::join`] returns what its function
/// returned.
#[derive(Debug)]
pub struct WorkerHandle<T> {
    // None only when set-up failed, in which case no handle is returned.
    inner: JoinHandle<Option<T>>,
    core: usize,
}

impl<T> WorkerHandle<T> {
    /// Waits for the worker to finish. `Err` carries its panic.
    pub fn join(self) -> thread::Result<T> {
        match self.inner.join()? {
            Some(v) => Ok(v),
            None => Err(Box::new("worker set-up failed")),
        }
    }

    /// Whether the worker's function has returned.
    pub fn is_finished(&self) -> bool {
        self.inner.is_finished()
    }

    /// The worker's thread (name, id, unpark).
    pub fn thread(&self) -> &Thread {
        self.inner.thread()
    }

    /// The core the worker is pinned to.
    pub fn core(&self) -> usize {
        self.core
    }
}

/// Spawns thread `name` pinned to CPU `core`, registered as a DPDK lcore
/// when EAL is up, running `f`. Returns once the thread is pinned and
/// registered; set-up failures are returned and `f` does not run then.
///
/// `core` must be one of the cores the process may use: under EAL those
/// read before init ([`super::Eal::cores`]), since EAL narrows the affinity
/// of the initialising thread and of threads it spawns later.
pub fn spawn_worker<F, T>(core: usize, name: &str, f: F) -> Result<WorkerHandle<T>, DpdkError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (ack_tx, ack_rx) = mpsc::sync_channel::<Result<(), DpdkError>>(1);
    let inner = thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let registration = match setup(core) {
                Ok(r) => r,
                Err(e) => {
                    let _ = ack_tx.send(Err(e));
                    return None;
                }
            };
            let _ = ack_tx.send(Ok(()));
            let v = f();
            drop(registration);
            Some(v)
        })
        .map_err(|e| DpdkError::InvalidArgument(format!("cannot spawn thread {name}: {e}")))?;
    match ack_rx.recv() {
        Ok(Ok(())) => Ok(WorkerHandle { inner, core }),
        Ok(Err(e)) => {
            let _ = inner.join();
            Err(e)
        }
        Err(_) => {
            let _ = inner.join();
            Err(DpdkError::InvalidArgument(format!(
                "worker thread {name} died during set-up"
            )))
        }
    }
}

/// Cores a `cpu_set_t` can name (glibc's `CPU_SETSIZE`).
const CPU_SETSIZE: usize = 1024;

/// Pins the calling thread to `core` (and only there).
pub fn pin_current_thread(core: usize) -> Result<(), DpdkError> {
    // core_affinity panics beyond the fixed-size CPU set; the kernel
    // judges the rest.
    if core >= CPU_SETSIZE || !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        return Err(DpdkError::InvalidArgument(format!(
            "cannot pin a thread to core {core}"
        )));
    }
    Ok(())
}

/// The CPUs the calling thread may run on (its affinity mask), in order;
/// empty when it cannot be read.
pub fn allowed_cpus() -> Vec<usize> {
    core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect()
}

/// Pins the calling thread and registers it; the returned guard
/// unregisters it when dropped (also when the worker panics).
fn setup(core: usize) -> Result<Registration, DpdkError> {
    pin_current_thread(core)?;
    Registration::register()
}

/// The calling thread's DPDK lcore id: `Some` on EAL's main thread and on
/// registered workers, `None` elsewhere (and without the `dpdk` feature).
pub fn lcore_id() -> Option<u32> {
    #[cfg(feature = "dpdk")]
    {
        super::sys::lcore_id()
    }
    #[cfg(not(feature = "dpdk"))]
    {
        None
    }
}

/// An EAL registration of the current thread, undone on drop.
struct Registration {
    #[cfg(feature = "dpdk")]
    registered: bool,
}

impl Registration {
    #[cfg(feature = "dpdk")]
    fn register() -> Result<Registration, DpdkError> {
        use super::{eal, sys};
        let control = eal::control();
        if eal::ensure_ready(&control).is_err() {
            // No EAL (a run on in-memory ports): pinning is all there is.
            return Ok(Registration { registered: false });
        }
        // SAFETY: EAL is initialised (checked under the control lock); the
        // call only touches EAL's lcore table and this thread's locals.
        let ret = unsafe { sys::rte_thread_register() };
        if ret < 0 {
            return Err(match DpdkError::last("rte_thread_register") {
                // EAL's lcore ids are all taken: its own threads (one per
                // core of `-l` or `--lcores`) and the registered workers.
                DpdkError::Call { errno: libc::ENOMEM, .. } => {
                    DpdkError::InvalidArgument(format!(
                        "no DPDK lcore id left for this worker: EAL has {} in all, one for each core of [eal] args' -l or --lcores and one for each worker",
                        sys::RTE_MAX_LCORE
                    ))
                }
                e => e,
            });
        }
        eal::retain();
        Ok(Registration { registered: true })
    }

    #[cfg(not(feature = "dpdk"))]
    fn register() -> Result<Registration, DpdkError> {
        Ok(Registration {})
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        #[cfg(feature = "dpdk")]
        if self.registered {
            // SAFETY: this thread was registered by `register` and EAL is
            // still up (the registration counts as live, so cleanup waits).
            unsafe { super::sys::rte_thread_unregister() };
            super::eal::release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_runs_pinned_and_returns_its_value() {
        let core = core_affinity::get_core_ids()
            .and_then(|c| c.first().map(|c| c.id))
            .unwrap_or(0);
        // The worker reports the CPUs its thread may run on: its core alone.
        let h = spawn_worker(core, "t-worker", || (6 * 7, allowed_cpus())).expect("spawn");
        assert_eq!(h.core(), core);
        assert_eq!(h.thread().name(), Some("t-worker"));
        assert_eq!(h.join().expect("join"), (42, vec![core]));
    }

    #[test]
    fn impossible_core_is_an_error_and_does_not_run() {
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r2 = ran.clone();
        let r = spawn_worker(1 << 20, "t-bad", move || {
            r2.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        assert!(matches!(r, Err(DpdkError::InvalidArgument(_))), "{r:?}");
        let r = spawn_worker(1000, "t-bad2", || ());
        assert!(matches!(r, Err(DpdkError::InvalidArgument(_))), "{r:?}");
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }
}
