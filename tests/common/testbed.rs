//! What the network-namespace test-bed tests (tests/testbed.rs on one
//! instance, tests/testbed_ecmp.rs on two behind a router) share: whether
//! the bed can run here, the example binaries, processes started in a
//! namespace and stopped on drop, and the kernel TCP client
//! (examples/testbed_client.rs) with its JSON lines.
//!
//! Namespace names are passed whole (each test has its own prefix).

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

/// The services' address on both beds (scripts/testbed.sh).
pub const VIP: &str = "10.99.100.1";
/// The client sources of namespaces c1 and c2. 10.99.2.8 is left out:
/// config/testbed.toml (and so each ECMP instance's configuration, made
/// from it) pins it statically to be1.
pub const C1: &str = "10.99.1.1-10.99.1.8";
pub const C2: &str = "10.99.2.1-10.99.2.7";

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// True when a test bed must run rather than be skipped: under
/// scripts/test.sh (`PKTDIST_REQUIRE_TESTBED`, which CI runs) or in CI
/// (`CI` set).
pub fn required() -> bool {
    std::env::var_os("PKTDIST_REQUIRE_TESTBED").is_some() || std::env::var_os("CI").is_some()
}

/// Why a test bed cannot run here, if it cannot: it needs root, a working
/// `ip netns`, and the commands `tools`.
pub fn skip_reason(tools: &[&str]) -> Option<String> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next().map(str::to_string));
    if uid.as_deref() != Some("0") {
        return Some("not root (network namespaces, raw sockets and DPDK need it)".into());
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Some(format!(
                "`ip netns list` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => return Some(format!("`ip` not runnable: {e}")),
    }
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "{tool} missing (scripts/install-deps.sh installs it)"
            ));
        }
    }
    None
}

/// The newest modification time of `path`: the file's, or for a directory
/// its own and that of everything under it.
fn newest(path: &Path) -> Option<SystemTime> {
    let meta = fs::metadata(path).ok()?;
    let own = meta.modified().ok();
    if !meta.is_dir() {
        return own;
    }
    fs::read_dir(path)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| newest(&e.path()))
        .chain(own)
        .max()
}

/// The example binaries (backend_server, testbed_client). `cargo test
/// --all-targets` builds examples only as test harnesses, so look for plain
/// builds: this profile's, then release (scripts/test.sh builds `--release
/// --examples` first), then debug; one older than what it is built from
/// (its source, the library under `src/`, `Cargo.toml`, `build.rs`) does
/// not count, so that an old debug build does not win over a fresh
/// release one. Built here if none is found.
pub fn examples() -> (PathBuf, PathBuf) {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf();
    let target = profile_dir
        .parent()
        .expect("target directory")
        .to_path_buf();
    let dirs = [
        profile_dir.join("examples"),
        target.join("release/examples"),
        target.join("debug/examples"),
    ];
    let find = |name: &str| -> Option<PathBuf> {
        let source = [
            format!("examples/{name}.rs"),
            "src".into(),
            "Cargo.toml".into(),
            "build.rs".into(),
        ]
        .iter()
        .filter_map(|p| newest(&repo().join(p)))
        .max()?;
        dirs.iter().map(|d| d.join(name)).find(|p| {
            fs::metadata(p)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= source)
        })
    };
    if let (Some(s), Some(c)) = (find("backend_server"), find("testbed_client")) {
        return (s, c);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(repo())
        .args([
            "build",
            "--example",
            "backend_server",
            "--example",
            "testbed_client",
        ])
        .status()
        .expect("run cargo build --example");
    assert!(st.success(), "cargo build of the examples failed");
    let debug = target.join("debug/examples");
    (debug.join("backend_server"), debug.join("testbed_client"))
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after
/// `limit` (a guard against hangs, not a timing assertion).
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "gave up waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the kernel of namespace `netns` decapsulates IP-in-IP (it has
/// `tunl0`); if not, the backends do it in user space (`--decap`).
pub fn kernel_has_ipip(netns: &str) -> bool {
    Command::new("ip")
        .args(["-n", netns, "link", "show", "tunl0"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What a bed's guard does after `scripts/testbed.sh down` answered `out`:
/// says if it failed, and keeps the `logs` directory if the test failed
/// (removes it otherwise).
pub fn after_down(out: &Output, logs: &Path) {
    if !out.status.success() {
        eprintln!(
            "testbed down failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if thread::panicking() {
        eprintln!("test-bed logs kept in {}", logs.display());
    } else {
        let _ = fs::remove_dir_all(logs);
    }
}

/// A process in a namespace (`ip netns exec` execs it: the child is the
/// program itself), killed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program` inside namespace `netns`, its output to `log`;
    /// `name` names it in failures.
    pub fn spawn(netns: &str, name: &str, log: PathBuf, program: &Path, args: &[String]) -> Proc {
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn in namespace");
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// Waits until `ready` holds, at most `limit`; the process ending
    /// meanwhile fails the test with the tail of its log.
    pub fn await_ready(
        &mut self,
        what: &str,
        limit: Duration,
        mut ready: impl FnMut(&Proc) -> bool,
    ) {
        wait_until(what, limit, || {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("{} exited ({st}):\n{}", self.name, self.tail());
            }
            ready(self)
        });
    }

    pub fn text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn tail(&self) -> String {
        let t = self.text();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Kills it at once.
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks for a clean stop (once: a second signal ends pktdist at once).
    pub fn sigterm(&self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
    }

    /// Waits for the end after [`Proc::sigterm`]; not within `limit` fails
    /// the test (and the drop kills it).
    pub fn wait_exit(mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            assert!(
                start.elapsed() < limit,
                "{} did not stop within {limit:?} of SIGTERM:\n{}",
                self.name,
                self.tail()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits for the end: a clean stop.
    pub fn terminate(self, limit: Duration) -> ExitStatus {
        self.sigterm();
        self.wait_exit(limit)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "--- {} ({}):\n{}",
                self.name,
                self.log.display(),
                self.tail()
            );
        }
    }
}

/// The example backend server `server` in namespace `netns` with `args`,
/// output to `log`, once it says it is ready (it listens).
pub fn start_backend(
    server: &Path,
    netns: &str,
    name: &str,
    log: PathBuf,
    args: &[String],
) -> Proc {
    let mut p = Proc::spawn(netns, name, log, server, args);
    p.await_ready(&format!("{name} to listen"), Duration::from_secs(10), |p| {
        p.text().contains("ready:")
    });
    p
}

/// Runs the client `client` in namespace `netns` to the end: its requests.
pub fn run_client(client: &Path, netns: &str, args: &[&str]) -> Vec<Conn> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(client)
        .args(args)
        .output()
        .expect("run testbed_client");
    assert!(
        out.status.code() != Some(2),
        "testbed_client {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_conns(&String::from_utf8_lossy(&out.stdout))
}

/// A client still running: its stdin (the go-ahead of `--hold`) and its
/// JSON lines; killed on drop.
pub struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Running {
    /// Starts the client `client` in namespace `netns`, its output read
    /// later.
    pub fn start(client: &Path, netns: &str, args: &[&str]) -> Running {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(client)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn testbed_client");
        let stdout = BufReader::new(child.stdout.take().expect("client stdout"));
        let stdin = child.stdin.take();
        Running {
            child,
            stdin,
            stdout,
        }
    }

    /// Reads lines up to `{"held":N}`: the first requests of `--hold`.
    pub fn held(&mut self) -> Vec<Conn> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).expect("client output");
            assert!(n > 0, "client ended before holding: {text}");
            if line.contains("\"held\"") {
                return parse_conns(&text);
            }
            text.push_str(&line);
        }
    }

    /// Lets a `--hold` client make its second requests.
    pub fn release(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"go\n");
        }
    }

    /// Waits for the end and returns the remaining lines.
    pub fn finish(mut self) -> Vec<Conn> {
        self.release();
        let mut text = String::new();
        for line in (&mut self.stdout).lines() {
            text.push_str(&line.expect("client output"));
            text.push('\n');
        }
        let _ = self.child.wait();
        parse_conns(&text)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for each of `clients` (running side by side) to end: all their
/// requests.
pub fn finish_all(clients: impl IntoIterator<Item = Running>) -> Vec<Conn> {
    clients.into_iter().flat_map(Running::finish).collect()
}

/// One request as the client reported it.
#[derive(Debug, Deserialize, Clone)]
pub struct Conn {
    pub src: Option<String>,
    pub phase: String,
    pub backend: Option<String>,
    pub bytes: u64,
    pub ok: bool,
    pub error: Option<String>,
}

impl Conn {
    pub fn src_ip(&self) -> &str {
        self.src
            .as_deref()
            .and_then(|s| s.split(':').next())
            .unwrap_or("?")
    }
}

pub fn parse_conns(text: &str) -> Vec<Conn> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("\"held\""))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("client line {l:?}: {e}")))
        .collect()
}

/// Every request completed (no reset, no timeout, byte-exact), and
/// `expected` of them were reported.
pub fn assert_all_ok(what: &str, conns: &[Conn], expected: usize) {
    assert_none_failed(what, conns);
    assert_eq!(conns.len(), expected, "{what}: requests reported");
}

/// Every request of an `--until-released` trickle succeeded, and there
/// were at least `min`.
pub fn assert_trickle_ok(what: &str, conns: &[Conn], min: usize) {
    assert_none_failed(what, conns);
    assert!(
        conns.len() >= min,
        "{what}: {} requests reported, fewer than {min}",
        conns.len()
    );
}

fn assert_none_failed(what: &str, conns: &[Conn]) {
    let bad: Vec<String> = conns
        .iter()
        .filter(|c| !c.ok)
        .map(|c| {
            format!(
                "{} ({}) via {:?}: {}",
                c.src.as_deref().unwrap_or("?"),
                c.phase,
                c.backend,
                c.error.as_deref().unwrap_or("not ok")
            )
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} requests failed, e.g. {:?}",
        bad.len(),
        conns.len(),
        &bad[..bad.len().min(5)]
    );
}
