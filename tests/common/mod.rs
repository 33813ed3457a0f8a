//! Shared pieces of the end-to-end tests: temporary directories, pcap files,
//! configuration text, and the real `pktdist` binary as a child process that
//! is always stopped (SIGTERM, then SIGKILL) when its guard goes, also when
//! a test fails; a real etcd server for the cluster tests (`etcd`), a
//! memif peer (`memif`), and the network-namespace test bed's processes
//! and clients (`testbed`).
#![allow(dead_code)]

pub mod etcd;
#[cfg(feature = "dpdk")]
pub mod memif;
pub mod testbed;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The binary cargo built for this test run.
pub const PKTDIST: &str = env!("CARGO_BIN_EXE_pktdist");

/// The admin key of every test configuration.
pub const ADMIN_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// The key of a backend named `name` in the test configurations: 32 bytes
/// derived from the name, so tests and configurations agree without a table.
pub fn backend_key_hex(name: &str) -> String {
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7) ^ name.bytes().fold(i as u8, |a, c| a.wrapping_add(c));
    }
    hex(&k)
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// A name no other test of this process uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}{}", N.fetch_add(1, Ordering::Relaxed))
}

/// Tests that start `pktdist` take this lock: one busy-polling instance at
/// a time on a small machine. A failed test does not poison it for others.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A directory removed with everything in it when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "pktdist-{what}-{}-{}",
            std::process::id(),
            unique("")
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// EAL file prefix of the test processes' own EAL.
pub const TEST_EAL_PREFIX: &str = "pktdist-e2e-test";

/// The EAL arguments every test EAL starts with: no hugepages (256 MiB of
/// ordinary memory), no PCI, no shared configuration (so EALs never meet,
/// whatever their prefix) and no telemetry socket.
const NO_HARDWARE_EAL_ARGS: [&str; 6] = [
    "--no-huge",
    "-m",
    "256",
    "--no-pci",
    "--no-shconf",
    "--no-telemetry",
];

/// EAL arguments for a `pktdist` child: [`NO_HARDWARE_EAL_ARGS`] and a file
/// prefix apart from the test process's, as a TOML array for `[eal] args`.
/// The prefix is fixed: EAL leaves a directory per prefix under
/// /var/run/dpdk.
pub fn child_eal_args() -> String {
    let args: Vec<&str> = NO_HARDWARE_EAL_ARGS
        .into_iter()
        .chain(["--file-prefix", "pktdist-e2e", "--log-level=*:warning"])
        .collect();
    format!("{args:?}")
}

/// EAL arguments for this test process's own EAL (a memif peer, the DPDK
/// layer's tests): [`NO_HARDWARE_EAL_ARGS`] on core 0, under `file_prefix`,
/// logging `log_level` and worse (`error` keeps a peer's link chatter out
/// of the test output).
pub fn test_eal_args(file_prefix: &str, log_level: &str) -> Vec<String> {
    NO_HARDWARE_EAL_ARGS
        .into_iter()
        .map(str::to_string)
        .chain([
            "--file-prefix".to_string(),
            file_prefix.to_string(),
            "-l".to_string(),
            "0".to_string(),
            format!("--log-level=*:{log_level}"),
        ])
        .collect()
}

/// The parts of a configuration every test shares: EAL, cores (control 0,
/// one worker on 1), small tables, the control protocol on a free port of
/// 127.0.0.1 with the admin key and a key for each of `backends`.
pub fn base_config(backends: &[&str]) -> String {
    let mut keys = format!("admin = \"{ADMIN_KEY}\"\n");
    for b in backends {
        keys.push_str(&format!("{b} = \"{}\"\n", backend_key_hex(b)));
    }
    format!(
        r#"[eal]
args = {eal}

[cores]
control = 0
workers = [1]

[mempool]
mbufs = 8191
cache = 128

[flow]
capacity = 65536

[affinity]
capacity = 4096
auto_capacity = 1024

[control]
listen = "127.0.0.1:0"
allowed_networks = ["127.0.0.0/8"]
status_interval = "1s"

[control.keys]
{keys}
"#,
        eal = child_eal_args()
    )
}

/// The gateway MAC of the test configurations' port.
pub const GATEWAY: &str = "02:00:00:00:00:fe";

/// A `[[ports]]` table: port "p0" on `device`, next hop [`GATEWAY`].
pub fn port_toml(device: &str) -> String {
    format!("\n[[ports]]\nname = \"p0\"\ndevice = \"{device}\"\ngateway_mac = \"{GATEWAY}\"\n")
}

/// A `[[services]]` table forwarding by IPIP (from 198.51.100.1, or from
/// 2001:db8::1 for an IPv6 VIP) with `extra` more service keys (TOML
/// lines), then a `[[services.backends]]` table for each backend: (name,
/// address, weight; None keeps the default weight).
pub fn ipip_service(
    name: &str,
    vip: &str,
    port: u16,
    protocol: &str,
    extra: &str,
    backends: &[(&str, &str, Option<u32>)],
) -> String {
    let source = if vip.contains(':') {
        "2001:db8::1"
    } else {
        "198.51.100.1"
    };
    let mut t = format!(
        "\n[[services]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\n\
         protocol = \"{protocol}\"\nforwarding = \"ipip\"\nipip_source = \"{source}\"\n{extra}"
    );
    for (name, address, weight) in backends {
        t.push_str(&format!(
            "\n[[services.backends]]\nname = \"{name}\"\naddress = \"{address}\"\n"
        ));
        if let Some(w) = weight {
            t.push_str(&format!("weight = {w}\n"));
        }
    }
    t
}

/// The "web" service of the test configurations, 192.0.2.10:80 over TCP
/// (see [`ipip_service`]).
pub fn web_service(extra: &str, backends: &[(&str, &str, Option<u32>)]) -> String {
    ipip_service("web", "192.0.2.10", 80, "tcp", extra, backends)
}

/// Lines a child printed, shared with the thread that reads them.
#[derive(Default)]
struct Lines {
    lines: Mutex<(Vec<String>, bool)>,
    changed: Condvar,
}

impl Lines {
    fn reader(self: &Arc<Self>, from: impl Read + Send + 'static) -> JoinHandle<()> {
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines() {
                let Ok(line) = line else { break };
                let mut g = me.lines.lock().unwrap_or_else(|e| e.into_inner());
                g.0.push(line);
                me.changed.notify_all();
            }
            let mut g = me.lines.lock().unwrap_or_else(|e| e.into_inner());
            g.1 = true;
            me.changed.notify_all();
        })
    }

    fn text(&self) -> String {
        let g = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        g.0.join("\n")
    }

    /// The first line containing `pat`, waiting up to `timeout`; None if the
    /// stream ended or time ran out first.
    fn wait_for(&self, pat: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(l) = g.0.iter().find(|l| l.contains(pat)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if g.1 || now >= deadline {
                return None;
            }
            g = self
                .changed
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// What a stopped `pktdist` left.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A running `pktdist` child. Dropping it stops it: SIGTERM, and SIGKILL if
/// it has not ended a few seconds later.
pub struct Pktdist {
    child: Option<Child>,
    stdout: Arc<Lines>,
    stderr: Arc<Lines>,
    readers: Vec<JoinHandle<()>>,
}

impl Pktdist {
    /// Starts `pktdist <args>`.
    pub fn spawn(args: &[&str]) -> Pktdist {
        Pktdist::spawn_with_env(args, &[])
    }

    /// Starts `pktdist <args>` with `env` added to its environment.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Pktdist {
        Pktdist::start(Command::new(PKTDIST).args(args), env)
    }

    /// Starts `pktdist <args>` on the CPUs `cpus` (`taskset -c`), as a
    /// process started where `isolcpus` took the others out of its mask.
    pub fn spawn_on_cpus(cpus: &str, args: &[&str]) -> Pktdist {
        Pktdist::start(
            Command::new("taskset")
                .args(["-c", cpus, PKTDIST])
                .args(args),
            &[],
        )
    }

    fn start(cmd: &mut Command, env: &[(&str, &str)]) -> Pktdist {
        let mut child = cmd
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {PKTDIST}: {e}"));
        let stdout = Arc::new(Lines::default());
        let stderr = Arc::new(Lines::default());
        let readers = vec![
            stdout.reader(child.stdout.take().expect("stdout")),
            stderr.reader(child.stderr.take().expect("stderr")),
        ];
        Pktdist {
            child: Some(child),
            stdout,
            stderr,
            readers,
        }
    }

    /// Starts `pktdist run --config <config> --quiet` and waits until its
    /// control protocol listens; returns the child and that address.
    pub fn run(config: &Path) -> (Pktdist, SocketAddr) {
        let p = Pktdist::spawn(&["run", "--config", path_str(config), "--quiet"]);
        let addr = p.control_addr(Duration::from_secs(30));
        (p, addr)
    }

    /// The control address the child reports once everything before the
    /// control loop (EAL, ports, workers) is up. Panics, with the child's
    /// output, if it exits or stays silent for `timeout`.
    pub fn control_addr(&self, timeout: Duration) -> SocketAddr {
        const MARK: &str = "control protocol on udp ";
        match self.stderr.wait_for(MARK, timeout) {
            Some(line) => {
                let at = line.find(MARK).expect("mark") + MARK.len();
                line[at..]
                    .trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("bad control address in {line:?}: {e}"))
            }
            None => panic!(
                "pktdist did not start its control protocol\n--- stderr\n{}\n--- stdout\n{}",
                self.stderr.text(),
                self.stdout.text()
            ),
        }
    }

    /// The metrics listener's address the child reports (`[control]
    /// metrics_listen`, port 0 resolved). Panics, with the child's output,
    /// if it does not report one within `timeout`.
    pub fn metrics_addr(&self, timeout: Duration) -> SocketAddr {
        const MARK: &str = "metrics on http://";
        let line = self.stderr.wait_for(MARK, timeout).unwrap_or_else(|| {
            panic!(
                "pktdist reported no metrics address\n{}",
                self.stderr.text()
            )
        });
        let at = line.find(MARK).expect("mark") + MARK.len();
        line[at..]
            .trim()
            .trim_end_matches("/metrics")
            .parse()
            .unwrap_or_else(|e| panic!("bad metrics address in {line:?}: {e}"))
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.text()
    }

    /// Waits up to `timeout` for a stderr line containing `pat`.
    pub fn wait_stderr(&self, pat: &str, timeout: Duration) -> Option<String> {
        self.stderr.wait_for(pat, timeout)
    }

    /// The exit status if the child has ended, without waiting.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends SIGTERM and waits for the end (SIGKILL after `timeout`).
    pub fn stop(self, timeout: Duration) -> Finished {
        self.terminate();
        self.wait(timeout)
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }

    /// Waits for the child to end by itself (SIGKILL after `timeout`).
    pub fn wait(mut self, timeout: Duration) -> Finished {
        let mut child = self.child.take().expect("child");
        let status = wait_or_kill(&mut child, timeout);
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Finished {
            status,
            stdout: self.stdout.text(),
            stderr: self.stderr.text(),
        }
    }
}

impl Drop for Pktdist {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            wait_or_kill(&mut child, Duration::from_secs(5));
        }
    }
}

fn wait_or_kill(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                return child.wait().expect("wait for pktdist");
            }
        }
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes a little-endian, microsecond pcap file of Ethernet frames.
pub fn write_pcap(path: &Path, frames: &[Vec<u8>]) {
    let mut b = Vec::new();
    b.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&4u16.to_le_bytes());
    b.extend_from_slice(&0i32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&65535u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // LINKTYPE_ETHERNET
    for (i, f) in frames.iter().enumerate() {
        b.extend_from_slice(&(1_700_000_000u32 + (i / 1000) as u32).to_le_bytes());
        b.extend_from_slice(&((i % 1000) as u32 * 1000).to_le_bytes());
        b.extend_from_slice(&(f.len() as u32).to_le_bytes());
        b.extend_from_slice(&(f.len() as u32).to_le_bytes());
        b.extend_from_slice(f);
    }
    std::fs::write(path, b).expect("write pcap");
}

/// The records of a pcap file (either byte order, micro- or nanosecond).
pub fn read_pcap(path: &Path) -> Vec<Vec<u8>> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(b.len() >= 24, "pcap shorter than its global header");
    let le = match [b[0], b[1], b[2], b[3]] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        m => panic!("not a pcap file: magic {m:02x?}"),
    };
    let u32_at = |i: usize| {
        let w = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    assert_eq!(u32_at(20), 1, "link type is not Ethernet");
    let mut records = Vec::new();
    let mut at = 24;
    while at < b.len() {
        assert!(at + 16 <= b.len(), "truncated record header at {at}");
        let incl = u32_at(at + 8) as usize;
        assert_eq!(incl, u32_at(at + 12) as usize, "record cut short");
        assert!(at + 16 + incl <= b.len(), "truncated record at {at}");
        records.push(b[at + 16..at + 16 + incl].to_vec());
        at += 16 + incl;
    }
    records
}

/// One frame as tshark dissected it: field name -> values (a field
/// occurring several times, as in an ICMP error's quoted header, has one
/// value per occurrence).
pub type Dissected = std::collections::HashMap<&'static str, Vec<String>>;

/// Runs tshark over `pcap` with the IPv4 and UDP checksums validated and
/// the preferences and disabled protocols in `args` (say `["-o",
/// "tcp.check_checksum:TRUE"]`), one [`Dissected`] per frame holding
/// `fields`.
pub fn tshark(pcap: &Path, fields: &[&'static str], args: &[&str]) -> Vec<Dissected> {
    let mut cmd = Command::new("tshark");
    cmd.args(["-n", "-r", path_str(pcap)])
        .args(["-o", "ip.check_checksum:TRUE"])
        .args(["-o", "udp.check_checksum:TRUE"])
        .args(args)
        .args(["-T", "fields", "-E", "separator=|", "-E", "occurrence=a"])
        .args(["-E", "aggregator=,"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = cmd
        .output()
        .expect("tshark must be installed (Debian package tshark)");
    assert!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8")
        .lines()
        .map(|line| {
            let cols: Vec<&str> = line.split('|').collect();
            assert_eq!(cols.len(), fields.len(), "tshark line {line:?}");
            (fields.iter().zip(cols))
                .map(|(&k, v)| {
                    let vals = if v.is_empty() {
                        Vec::new()
                    } else {
                        v.split(',').map(str::to_string).collect()
                    };
                    (k, vals)
                })
                .collect()
        })
        .collect()
}

/// The values of field `name` in a dissected frame (none when absent).
pub fn field<'a>(d: &'a Dissected, name: &str) -> &'a [String] {
    d.get(name).map_or(&[], |v| v.as_slice())
}

/// GET `path` from `addr` over HTTP/1.1; the body of a 200 answer (chunked
/// or not), None for anything else.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut r = Vec::new();
    s.read_to_end(&mut r).ok()?;
    let r = String::from_utf8_lossy(&r).into_owned();
    let (head, body) = r.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    // Prometheus answers its API in chunks.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Some(dechunk(body));
    }
    Some(body.to_string())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
