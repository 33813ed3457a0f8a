//! The core plan checked against the machine, by `pktdist run` before EAL
//! starts and by `pktdist check`: every core `[cores]` names must take a
//! pinned thread.

use crate::config::Config;

/// Why `pktdist run` would refuse the plan's cores here, if it would. The
/// kernel is asked (a scratch thread pins itself to each core in turn),
/// not the affinity this process started with: that leaves out the CPUs
/// `isolcpus` isolates, where a real server's workers belong, while the
/// online CPUs and the process's cpuset are what bound a pin.
pub fn refused(cfg: &Config) -> Option<String> {
    let cores: Vec<usize> = std::iter::once(cfg.cores.control)
        .chain(cfg.cores.workers.iter().copied())
        .collect();
    let refused = std::thread::spawn(move || {
        cores
            .into_iter()
            .find(|&core| crate::dpdk::pin_current_thread(core).is_err())
    })
    .join()
    .unwrap_or(Some(cfg.cores.control));
    refused.map(|core| {
        let started_on = crate::dpdk::allowed_cpus();
        format!(
            "core {core} cannot take a pinned thread: not online, or outside this process's cpuset (it started on CPUs {started_on:?})"
        )
    })
}
