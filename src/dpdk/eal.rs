//! The DPDK Environment Abstraction Layer: initialised once per process,
//! cleaned up only when nothing uses its memory any more.

use std::ffi::{c_char, CString};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::sys;
use super::DpdkError;

/// Lifecycle of the process's EAL.
enum State {
    Uninit,
    Ready(Eal),
    Failed(DpdkError),
    Cleaned,
}

static STATE: Mutex<State> = Mutex::new(State::Uninit);
/// True between a successful init and cleanup; read without the lock by
/// `tsc_hz` and `is_ready`.
static READY: AtomicBool = AtomicBool::new(false);
/// Mempools (freed or leaked), ports and registered threads alive. Cleanup
/// unmaps EAL memory, so it is refused while any exist.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Serialises the control path (init, cleanup, mempool and port set-up and
/// tear-down, thread registration): DPDK's hot-plug and configuration calls
/// are not meant to race, and cleanup must not overlap any of them.
static CONTROL: Mutex<()> = Mutex::new(());

/// Proof that EAL is running, plus what init learnt. Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Eal {
    args: Vec<String>,
    cores: Vec<usize>,
    main_lcore: Option<u32>,
}

impl Eal {
    /// Initialises EAL with `args` (EAL options only, without the program
    /// name, e.g. `["-l", "0", "--no-huge", "-m", "512"]`).
    ///
    /// Runs `rte_eal_init` once per process. A later call with the same
    /// arguments returns the same handle; with other arguments, after a
    /// failure or after cleanup it returns an error.
    ///
    /// EAL pins the calling thread to the first core of its list; the cores
    /// this process may use are read before that and kept in [`Eal::cores`].
    pub fn init(args: &[String]) -> Result<Eal, DpdkError> {
        let _control = control();
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        match &*state {
            State::Ready(eal) if eal.args == args => return Ok(eal.clone()),
            State::Ready(_) | State::Cleaned => return Err(DpdkError::AlreadyInitialized),
            State::Failed(e) => return Err(e.clone()),
            State::Uninit => {}
        }
        let cores = super::thread::allowed_cpus();
        let mut argv: Vec<*mut c_char> = Vec::with_capacity(args.len() + 2);
        for a in std::iter::once("pktdist").chain(args.iter().map(String::as_str)) {
            let c = CString::new(a).map_err(|_| {
                DpdkError::InvalidArgument(format!("EAL argument {a:?} contains a NUL byte"))
            })?;
            // EAL may keep pointers into argv after init: the strings live
            // as long as the process (a few bytes, once).
            argv.push(c.into_raw());
        }
        let argc = argv.len() as i32;
        argv.push(std::ptr::null_mut());
        // SAFETY: argv holds argc valid NUL-terminated strings followed by a
        // NULL, all leaked so they outlive EAL; the state lock guarantees
        // this is the process's only call.
        let ret = unsafe { sys::rte_eal_init(argc, argv.as_mut_ptr()) };
        // rte_eal_init permutes the argv array, not the strings; the array
        // itself may go.
        if ret < 0 {
            let e = DpdkError::last("rte_eal_init");
            *state = State::Failed(e.clone());
            return Err(e);
        }
        let eal = Eal {
            args: args.to_vec(),
            cores,
            main_lcore: sys::lcore_id(),
        };
        READY.store(true, Ordering::Release);
        *state = State::Ready(eal.clone());
        Ok(eal)
    }

    /// The EAL arguments init ran with.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// CPU cores the process was allowed to run on before EAL pinned the
    /// initialising thread: where workers may be placed.
    pub fn cores(&self) -> &[usize] {
        &self.cores
    }

    /// The lcore id EAL gave the thread that called init.
    pub fn main_lcore(&self) -> Option<u32> {
        self.main_lcore
    }

    /// Whether EAL is initialised and not cleaned up.
    pub fn is_ready() -> bool {
        READY.load(Ordering::Acquire)
    }

    /// `rte_eal_cleanup`: releases EAL's memory and threads. Refused with
    /// [`DpdkError::Busy`] while any [`super::Mempool`] (including one that
    /// was dropped with mbufs still out), [`super::Port`] or registered
    /// worker thread exists. EAL cannot be initialised again afterwards.
    pub fn cleanup(self) -> Result<(), DpdkError> {
        let _control = control();
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(*state, State::Ready(_)) {
            return Err(DpdkError::NotInitialized);
        }
        let live = LIVE.load(Ordering::Acquire);
        if live != 0 {
            return Err(DpdkError::Busy { live });
        }
        READY.store(false, Ordering::Release);
        *state = State::Cleaned;
        // SAFETY: EAL was initialised, nothing allocated from it is alive
        // (LIVE is 0) and the control lock keeps new users out; READY is
        // false so no later call reaches DPDK.
        let ret = unsafe { sys::rte_eal_cleanup() };
        if ret < 0 {
            return Err(DpdkError::ret("rte_eal_cleanup", ret));
        }
        Ok(())
    }
}

/// Takes the control-path lock.
pub(crate) fn control() -> MutexGuard<'static, ()> {
    CONTROL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Under the control lock: fails unless EAL is ready.
pub(crate) fn ensure_ready(_control: &MutexGuard<'static, ()>) -> Result<(), DpdkError> {
    if Eal::is_ready() {
        Ok(())
    } else {
        Err(DpdkError::NotInitialized)
    }
}

/// Counts one more user of EAL memory (call under the control lock after
/// `ensure_ready`).
pub(crate) fn retain() {
    LIVE.fetch_add(1, Ordering::AcqRel);
}

/// Counts one user fewer.
pub(crate) fn release() {
    LIVE.fetch_sub(1, Ordering::AcqRel);
}

/// DPDK's calibrated TSC frequency, when EAL is up.
pub(crate) fn tsc_hz() -> Option<u64> {
    if !Eal::is_ready() {
        return None;
    }
    // SAFETY: reads a value EAL computed during init; READY says init
    // completed (cleanup does not reset it either).
    let hz = unsafe { sys::rte_get_tsc_hz() };
    (hz != 0).then_some(hz)
}
