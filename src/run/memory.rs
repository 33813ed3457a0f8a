//! The memory pktdist's own tables take (the workers' flow tables, the
//! affinity table, the automatic-affinity table), checked at start against
//! what the machine has free, so that a capacity the machine cannot hold is
//! a clear error before any of them or EAL is set up, not an allocation
//! failure or the kernel's OOM killer halfway through the start (what is
//! free: the machine's `MemAvailable`, or a memory cgroup's room where that
//! is less). Not counted: DPDK's memory (the mbuf pool, on hugepages or
//! `-m`), which is EAL's, and the services' Maglev tables (at most 32 MiB
//! each, built when the configuration is read).

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

    /// Refuses tables larger than what the process may still take
    /// ([`available`]), saying what each takes, which keys size them, and
    /// whether a memory cgroup's limit set the figure.
    pub fn check(&self, available: Available) -> Result<(), String> {
        if self.total() <= available.bytes {
            return Ok(());
        }
        Err(format!(
            "the tables need {} MiB but {} MiB of memory are available{}: flow tables {} MiB \
             × {} worker(s) ([flow] capacity, capacity_v6), affinity table {} MiB ([affinity] \
             capacity), automatic-affinity table {} MiB ([affinity] auto_capacity)",
            mib(self.total()),
            available.bytes >> 20,
            if available.cgroup {
                " (under the limit of the memory cgroup pktdist runs in)"
            } else {
                ""
            },
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

/// Memory this process may still take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Available {
    pub bytes: usize,
    /// A memory cgroup's limit set the figure (not the machine's
    /// `MemAvailable`).
    pub cgroup: bool,
}

/// The memory this process may still take: the kernel's `MemAvailable`
/// (`/proc/meminfo`), or less where a memory cgroup the process is in (or
/// one above it) is limited ([`cgroup_headroom`]); None if neither says.
pub fn available() -> Option<Available> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let machine = read("/proc/meminfo").and_then(|t| mem_available(&t));
    let cgroup = read("/proc/self/cgroup").and_then(|t| cgroup_headroom(&t, read));
    let (bytes, cgroup) = match (machine, cgroup) {
        (Some(m), Some(c)) => (m.min(c), c < m),
        (Some(m), None) => (m, false),
        (None, Some(c)) => (c, true),
        (None, None) => return None,
    };
    Some(Available { bytes, cgroup })
}

/// A memory cgroup version's files, under its hierarchy's mount point.
struct CgroupFiles {
    /// Where the hierarchy is usually mounted: the mount point used when
    /// `/proc/self/mountinfo` cannot be read.
    root: &'static str,
    limit: &'static str,
    usage: &'static str,
    /// The `stat` file and its key for the inactive file pages (page
    /// cache the kernel reclaims first, which `usage` counts).
    stat: &'static str,
    inactive: &'static str,
}

const CGROUP_V1: CgroupFiles = CgroupFiles {
    root: "/sys/fs/cgroup/memory",
    limit: "memory.limit_in_bytes",
    usage: "memory.usage_in_bytes",
    stat: "memory.stat",
    inactive: "total_inactive_file",
};

const CGROUP_V2: CgroupFiles = CgroupFiles {
    root: "/sys/fs/cgroup",
    limit: "memory.max",
    usage: "memory.current",
    stat: "memory.stat",
    inactive: "inactive_file",
};

/// v1 writes "no limit" as a page-rounded `i64::MAX`; anything this large
/// is no limit.
const V1_NO_LIMIT: u64 = 1 << 62;

/// The least room left under the memory limits of the cgroup the process
/// is in (`/proc/self/cgroup`, v1's memory controller or v2's unified
/// hierarchy) and of each cgroup above it that the hierarchy's mount
/// (`/proc/self/mountinfo`) shows: a limit less its working set (its
/// usage less its inactive file pages), as container runtimes reckon it.
/// None when no cgroup on the way is limited, or none can be read. `read`
/// gives a file's text.
fn cgroup_headroom(proc_cgroup: &str, read: impl Fn(&str) -> Option<String>) -> Option<usize> {
    // Under v1 (or a hybrid set-up) the memory controller has a line of
    // its own; else the unified line ("0::/path") is v2's.
    let v1 = proc_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then_some(path)
    });
    let (files, path) = match v1 {
        Some(path) => (&CGROUP_V1, path),
        None => (
            &CGROUP_V2,
            proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))?,
        ),
    };
    // A cgroup outside the process's cgroup namespace ("/../x") is out
    // of sight.
    if path.split('/').any(|c| c == "..") {
        return None;
    }
    // The hierarchy's mount point, and the process's cgroup below it: a
    // container without a cgroup namespace sees its own cgroup (say
    // /docker/<id>) mounted as the hierarchy's top, and nothing above.
    // Without a mountinfo, the usual mount point.
    let (base, path) = match read("/proc/self/mountinfo") {
        Some(text) => {
            let (m, below) = cgroup_mount(&text, v1.is_some(), path)?;
            (m.point, below)
        }
        None => (files.root.to_string(), path),
    };
    let base = base.trim_end_matches('/');
    let mut dir = path.trim_end_matches('/');
    let mut least: Option<u64> = None;
    loop {
        let at = |name: &str| read(&format!("{base}{dir}/{name}"));
        let limit = at(files.limit)
            .and_then(|t| t.trim().parse::<u64>().ok())
            .filter(|&l| l < V1_NO_LIMIT);
        if let Some(limit) = limit {
            let usage = at(files.usage)
                .and_then(|t| t.trim().parse::<u64>().ok())
                .unwrap_or(0);
            let inactive = at(files.stat)
                .and_then(|t| stat_value(&t, files.inactive))
                .unwrap_or(0);
            let room = limit.saturating_sub(usage.saturating_sub(inactive));
            least = Some(least.map_or(room, |l| l.min(room)));
        }
        match dir.rfind('/') {
            Some(i) => dir = &dir[..i],
            None => break,
        }
    }
    least.map(|l| usize::try_from(l).unwrap_or(usize::MAX))
}

/// Where a cgroup hierarchy is mounted.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    point: String,
    /// The cgroup the mount shows at its mount point: `/` on a host, a
    /// container's own cgroup in a container without a cgroup namespace.
    root: String,
}

/// The mount of v1's memory controller (`v1`) or of the v2 hierarchy, in
/// a `/proc/self/mountinfo` text, that shows the cgroup `path` (of those
/// that do, the one whose root is nearest it), and the path below that
/// root. None when no mount shows it.
fn cgroup_mount<'p>(mountinfo: &str, v1: bool, path: &'p str) -> Option<(Mount, &'p str)> {
    mountinfo
        .lines()
        .filter_map(|l| hierarchy_mount(l, v1))
        .filter_map(|m| {
            let below = path.strip_prefix(m.root.trim_end_matches('/'))?;
            (below.is_empty() || below.starts_with('/')).then_some((m, below))
        })
        .min_by_key(|(_, below)| below.len())
}

/// The mount a mountinfo line describes, if it is of v1's memory
/// controller (`v1`) or of the v2 hierarchy.
fn hierarchy_mount(line: &str, v1: bool) -> Option<Mount> {
    // "id parent major:minor root point options [optional...] - fstype
    // source super-options"
    let (mount, fs) = line.split_once(" - ")?;
    let mut m = mount.split(' ').skip(3);
    let (root, point) = (m.next()?, m.next()?);
    let mut f = fs.split(' ');
    let (fstype, options) = (f.next()?, f.nth(1).unwrap_or(""));
    let ours = if v1 {
        fstype == "cgroup" && options.split(',').any(|o| o == "memory")
    } else {
        fstype == "cgroup2"
    };
    ours.then(|| Mount {
        point: unescape(point),
        root: unescape(root),
    })
}

/// A mountinfo path with its octal escapes (`\040` for a space, and so
/// on for tab, newline and backslash) decoded.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match octal {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of `key` in a cgroup `memory.stat` text.
fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
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

    /// Reads files from a list of (path, text).
    fn files(list: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = list
            .iter()
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect();
        move |p: &str| map.get(p).cloned()
    }

    #[test]
    fn a_v2_cgroup_limit_leaves_its_limit_less_its_working_set() {
        let fs = files(&[
            (
                "/sys/fs/cgroup/system.slice/pktdist.service/memory.max",
                "1073741824\n",
            ),
            (
                "/sys/fs/cgroup/system.slice/pktdist.service/memory.current",
                "314572800\n",
            ),
            (
                "/sys/fs/cgroup/system.slice/pktdist.service/memory.stat",
                "anon 100\nfile 300\ninactive_file 104857600\nactive_file 5\n",
            ),
            ("/sys/fs/cgroup/system.slice/memory.max", "max\n"),
            (
                "/sys/fs/cgroup/system.slice/memory.current",
                "999999999999\n",
            ),
        ]);
        // 1 GiB less (300 MiB used, 100 MiB of it inactive page cache).
        assert_eq!(
            cgroup_headroom("0::/system.slice/pktdist.service\n", &fs),
            Some((1024 - 200) << 20)
        );
        // Not limited on the way up: no say.
        assert_eq!(cgroup_headroom("0::/system.slice\n", &fs), None);
        assert_eq!(cgroup_headroom("0::/elsewhere\n", &fs), None);
        assert_eq!(cgroup_headroom("", &fs), None);
    }

    #[test]
    fn the_tightest_v1_limit_on_the_way_up_counts() {
        let fs = files(&[
            (
                "/sys/fs/cgroup/memory/box/memory.limit_in_bytes",
                "2147483648\n",
            ),
            (
                "/sys/fs/cgroup/memory/box/memory.usage_in_bytes",
                "1610612736\n",
            ),
            (
                "/sys/fs/cgroup/memory/box/memory.stat",
                "cache 5\ntotal_inactive_file 0\n",
            ),
            (
                "/sys/fs/cgroup/memory/box/job/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
            (
                "/sys/fs/cgroup/memory/box/job/memory.usage_in_bytes",
                "1073741824\n",
            ),
            (
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
        ]);
        // job is unlimited; box, above it, has 512 MiB left. The v1 memory
        // line wins over the unified one of a hybrid set-up.
        let proc_cgroup = "4:memory:/box/job\n1:cpu,cpuacct:/\n0::/\n";
        assert_eq!(cgroup_headroom(proc_cgroup, &fs), Some(512 << 20));
        // Over its limit (a racing allocation): no room, not a wrap.
        let over = files(&[
            ("/sys/fs/cgroup/memory/box/memory.limit_in_bytes", "100\n"),
            ("/sys/fs/cgroup/memory/box/memory.usage_in_bytes", "200\n"),
        ]);
        assert_eq!(cgroup_headroom("4:memory:/box\n", &over), Some(0));
    }

    /// A host's mountinfo: the v2 hierarchy, a hybrid set-up's v1 memory
    /// controller, and other file systems.
    const MOUNTINFO: &str = "\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
25 22 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec shared:8 - cgroup2 cgroup2 rw,nsdelegate
31 25 0:28 / /sys/fs/cgroup/memory rw,nosuid shared:12 - cgroup cgroup rw,memory
32 25 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:13 - cgroup cgroup rw,cpu,cpuacct
";

    #[test]
    fn mountinfo_names_each_hierarchys_mount() {
        let at = |point: &str, root: &str| {
            vec![Mount {
                point: point.into(),
                root: root.into(),
            }]
        };
        let mounts = |text: &str, v1| -> Vec<Mount> {
            text.lines()
                .filter_map(|l| hierarchy_mount(l, v1))
                .collect()
        };
        assert_eq!(mounts(MOUNTINFO, false), at("/sys/fs/cgroup", "/"));
        assert_eq!(mounts(MOUNTINFO, true), at("/sys/fs/cgroup/memory", "/"));
        // Optional fields (none, or several) before the separator; octal
        // escapes in the paths.
        let odd = "40 22 0:50 /my\\040box /mnt/cg\\134v2 rw - cgroup2 none rw\n\
                   41 22 0:51 / /cg/mem rw shared:3 master:1 - cgroup cg rw,nosuid,memory\n";
        assert_eq!(mounts(odd, false), at("/mnt/cg\\v2", "/my box"));
        assert_eq!(mounts(odd, true), at("/cg/mem", "/"));
        assert_eq!(
            mounts("25 22 0:23 / /sys rw - sysfs sysfs rw\n", false),
            vec![]
        );
        assert_eq!(mounts("not a mountinfo line\n", true), vec![]);
        assert_eq!(unescape("a\\040b\\011c\\\\d\\9"), "a b\tc\\\\d\\9");
        // Of the mounts that show a cgroup, the nearest; none that shows it.
        let three = "50 22 0:60 /a/b /mnt/ab rw - cgroup2 none rw\n\
                     51 22 0:60 / /mnt/all rw - cgroup2 none rw\n\
                     52 22 0:60 /a /mnt/a rw - cgroup2 none rw\n";
        let (m, below) = cgroup_mount(three, false, "/a/b/c").unwrap();
        assert_eq!((m.point.as_str(), below), ("/mnt/ab", "/c"));
        let (m, below) = cgroup_mount(three, false, "/a/bc").unwrap();
        assert_eq!((m.point.as_str(), below), ("/mnt/a", "/bc"));
        let only_ab = "50 22 0:60 /a/b /mnt/ab rw - cgroup2 none rw\n";
        assert_eq!(cgroup_mount(only_ab, false, "/a/bc"), None);
    }

    /// A container without a cgroup namespace: /proc/self/cgroup names its
    /// cgroup from the host's top, but the hierarchy mounted in it starts at
    /// that cgroup.
    #[test]
    fn a_container_reads_its_own_cgroup_at_the_mount_point() {
        let mountinfo = "\
700 650 0:24 /docker/c0ffee /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory
701 650 0:25 /docker/c0ffee /sys/fs/cgroup/pids ro,nosuid - cgroup cgroup rw,pids
";
        let fs = files(&[
            ("/proc/self/mountinfo", mountinfo),
            (
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                "1073741824\n",
            ),
            ("/sys/fs/cgroup/memory/memory.usage_in_bytes", "536870912\n"),
            // What the host path would name: not mounted here.
            (
                "/sys/fs/cgroup/memory/docker/c0ffee/memory.limit_in_bytes",
                "1\n",
            ),
        ]);
        assert_eq!(
            cgroup_headroom("9:memory:/docker/c0ffee\n", &fs),
            Some(512 << 20)
        );
        // A cgroup no mount shows (moved after the mount), or outside the
        // cgroup namespace: out of sight, no say.
        assert_eq!(cgroup_headroom("9:memory:/docker/c0ffee2\n", &fs), None);
        assert_eq!(cgroup_headroom("9:memory:/../other\n", &fs), None);
    }

    #[test]
    fn a_hierarchy_mounted_elsewhere_is_read_there() {
        let fs = files(&[
            (
                "/proc/self/mountinfo",
                "30 22 0:26 / /run/cg\\0402 rw - cgroup2 cgroup2 rw\n",
            ),
            ("/run/cg 2/job/memory.max", "1073741824\n"),
            ("/run/cg 2/job/memory.current", "0\n"),
            ("/sys/fs/cgroup/job/memory.max", "1\n"),
        ]);
        assert_eq!(cgroup_headroom("0::/job\n", &fs), Some(1 << 30));
        // Without a mountinfo, the usual mount point.
        let fs = files(&[("/sys/fs/cgroup/job/memory.max", "4096\n")]);
        assert_eq!(cgroup_headroom("0::/job\n", &fs), Some(4096));
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
        let machine = |bytes| Available {
            bytes,
            cgroup: false,
        };
        assert_eq!(m.check(machine(m.total())), Ok(()));
        let e = m.check(machine(m.total() - 1)).unwrap_err();
        assert!(
            e.contains("[affinity] capacity") && e.contains("worker(s)"),
            "{e}"
        );
        assert!(!e.contains("cgroup"), "{e}");
        let e = m
            .check(Available {
                bytes: m.total() - 1,
                cgroup: true,
            })
            .unwrap_err();
        assert!(
            e.contains("are available (under the limit of the memory cgroup pktdist runs in): "),
            "{e}"
        );
        // The largest affinity table a configuration may ask for takes
        // tens of GiB.
        let big = format!("{base}[affinity]\ncapacity = 1073741824\n");
        let m = TableMemory::of(&Config::parse(&big, "t.toml").unwrap());
        assert!(m.affinity >> 30 >= 64, "{m}");
    }
}
