//! The memory pktdist's own tables take (the workers' flow tables, the
//! affinity table, the automatic-affinity table), checked at start against
//! what the machine has free, so that a capacity the machine cannot hold is
//! a clear error before any of them or EAL is set up, not an allocation
//! failure or the kernel's OOM killer halfway through the start. Not
//! counted: DPDK's memory (the mbuf pool, on hugepages or `-m`), which is
//! EAL's, and the services' Maglev tables (at most 32 MiB each, built when
//! the configuration is read).

use crate::affinity::auto::AutoAffinityTable;
use crate::affinity::table::AffinityTable;
use crate::config::Config;
use crate::datapath::flow::FlowTable;

/// Bytes of each of pktdist's tables under a configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableMemory {
    /// One worker's flow table.
    pub flow_table: usize,
    pub workers: usize,
    pub affinity: usize,
    pub auto_affinity: usize,
}

impl TableMemory {
    pub fn of(cfg: &Config) -> TableMemory {
        TableMemory {
            flow_table: FlowTable::memory(cfg.flow.capacity, cfg.flow.v6_capacity()),
            workers: cfg.cores.workers.len(),
            affinity: AffinityTable::memory(cfg.affinity.capacity),
            auto_affinity: AutoAffinityTable::memory(cfg.affinity.auto_capacity),
        }
    }

    pub fn total(&self) -> usize {
        self.flow_table
            .saturating_mul(self.workers)
            .saturating_add(self.affinity)
            .saturating_add(self.auto_affinity)
    }

    /// Refuses tables larger than `available` bytes (what the machine has
    /// free), saying what each takes and which keys size them.
    pub fn check(&self, available: usize) -> Result<(), String> {
        if self.total() <= available {
            return Ok(());
        }
        Err(format!(
            "the tables need {} MiB but {} MiB of memory are available: flow tables {} MiB \
             × {} worker(s) ([flow] capacity, capacity_v6), affinity table {} MiB ([affinity] \
             capacity), automatic-affinity table {} MiB ([affinity] auto_capacity)",
            mib(self.total()),
            available >> 20,
            mib(self.flow_table),
            self.workers,
            mib(self.affinity),
            mib(self.auto_affinity),
        ))
    }
}

impl std::fmt::Display for TableMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} MiB: flow tables {} MiB × {} worker(s), affinity table {} MiB, \
             automatic-affinity table {} MiB",
            mib(self.total()),
            mib(self.flow_table),
            self.workers,
            mib(self.affinity),
            mib(self.auto_affinity),
        )
    }
}

/// MiB, to the nearest.
fn mib(bytes: usize) -> usize {
    bytes.saturating_add(1 << 19) >> 20
}

/// The memory the kernel reckons available for new allocations
/// (`MemAvailable` of `/proc/meminfo`), if it says.
pub fn available() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    mem_available(&text)
}

fn mem_available(meminfo: &str) -> Option<usize> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line
        .trim_start_matches("MemAvailable:")
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_read() {
        let text = "MemTotal:       24598764 kB\nMemFree:        22000000 kB\nMemAvailable:   23000000 kB\n";
        assert_eq!(mem_available(text), Some(23_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots\n"), None);
        assert!(available().is_some(), "this machine's /proc/meminfo");
    }

    #[test]
    fn tables_beyond_the_available_memory_are_refused_by_name() {
        use crate::config::testing::{with_services, WEB};
        let base = with_services(&format!(
            "{WEB}[[services.backends]]\nname = \"b\"\naddress = \"10.0.0.1\"\n"
        ));
        let cfg = Config::parse(&base, "t.toml").unwrap();
        let m = TableMemory::of(&cfg);
        assert!(m.total() > 0);
        assert_eq!(m.check(m.total()), Ok(()));
        let e = m.check(m.total() - 1).unwrap_err();
        assert!(
            e.contains("[affinity] capacity") && e.contains("worker(s)"),
            "{e}"
        );
        // The largest affinity table a configuration may ask for takes
        // tens of GiB.
        let big = format!("{base}[affinity]\ncapacity = 1073741824\n");
        let m = TableMemory::of(&Config::parse(&big, "t.toml").unwrap());
        assert!(m.affinity >> 30 >= 64, "{m}");
    }
}
