//! Two pktdist instances behind a router doing equal-cost multipath, with
//! real BGP and real kernel TCP: `scripts/testbed.sh up --instances 2`.
//! The router's BIRD learns the VIP from each instance's BIRD, which
//! announces it while that instance is ready (scripts/pktdist-bgp.sh), and
//! installs one route with both instances as next hops, hashed by L4 ports.
//!
//! In one run, each step on the bed the previous one left:
//! 1. new connections spread over both instances (each takes at least a
//!    fifth), all byte-exact;
//! 2. a service with `hash = "client"` keeps every connection of a client
//!    on one backend, whichever instance receives it;
//! 3. instance A stopped (SIGTERM) while 128 connections are held open and
//!    new ones trickle in: its route is withdrawn within 3 s, every new
//!    connection succeeds through B, and the held ones (scheduled, not
//!    pinned) finish a 100 KB transfer on their backend through B;
//! 4. A started again: announced within 3 s of being ready, it takes
//!    traffic again.
//!
//! Needs root and BIRD 2 (`bird`, `birdc`); elsewhere it prints a SKIP
//! line and passes, except under CI (`CI` set). The bed's namespace
//! prefix is `pdx`; run it under `flock /tmp/testbed.lock` on a shared
//! machine. Logs stay in `$TMPDIR/pktdist-testbed-ecmp-<pid>/` on failure.
#![cfg(feature = "dpdk")]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;

const PREFIX: &str = "pdx";
const VIP: &str = "10.99.100.1";
const ADMIN_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
/// Sources of the client namespaces (10.99.2.8 has a static affinity).
const C1: &str = "10.99.1.1-10.99.1.8";
const C2: &str = "10.99.2.1-10.99.2.7";
/// c2's network, pinned through the shared table.
const PINNED: &str = "10.99.2.0/24";
/// The instances' control addresses (scripts/testbed.sh lb_ctl_ip) and
/// next hops (lb_data_ip).
const CONTROL: [&str; 2] = ["10.99.0.1", "10.99.0.3"];
const NEXT_HOP: [&str; 2] = ["10.99.0.2", "10.99.0.4"];
/// The contract: a route follows its instance's readiness within this.
const ROUTE_FOLLOWS: Duration = Duration::from_secs(3);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ns(name: &str) -> String {
    format!("{PREFIX}-{name}")
}

/// Instance i's namespace (0 = A, 1 = B).
fn lb_ns(i: usize) -> String {
    if i == 0 {
        ns("lb")
    } else {
        ns(&format!("lb{}", i + 1))
    }
}

fn skip_reason() -> Option<String> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        == Some("0");
    if !root {
        return Some("not root (network namespaces, raw sockets and DPDK need it)".into());
    }
    for tool in ["ip", "ethtool", "bird", "birdc"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("{tool} missing (scripts/install-deps.sh)"));
        }
    }
    None
}

/// The example binaries, newer than their sources (release, then debug),
/// else built here.
fn examples() -> (PathBuf, PathBuf) {
    let target = repo().join("target");
    let find = |name: &str| -> Option<PathBuf> {
        let source = fs::metadata(repo().join(format!("examples/{name}.rs")))
            .and_then(|m| m.modified())
            .ok()?;
        ["release", "debug"]
            .iter()
            .map(|p| target.join(p).join("examples").join(name))
            .find(|p| {
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

/// Polls `cond` every 50 ms; panics with `what` after `limit`.
fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "gave up waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// The ECMP test bed: up on creation, down on drop.
struct Bed {
    logs: PathBuf,
    state: PathBuf,
    server: PathBuf,
    client: PathBuf,
    decap: bool,
}

impl Bed {
    fn script(&self, args: &[&str]) -> std::process::Output {
        Command::new(repo().join("scripts/testbed.sh"))
            .args(args)
            .env("PD_TESTBED_PREFIX", PREFIX)
            .env("PD_TESTBED_STATE", &self.state)
            .env("PKTDIST", env!("CARGO_BIN_EXE_pktdist"))
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/testbed.sh")
    }

    fn up() -> Bed {
        let (server, client) = examples();
        let logs =
            std::env::temp_dir().join(format!("pktdist-testbed-ecmp-{}", std::process::id()));
        fs::create_dir_all(&logs).expect("log directory");
        let mut bed = Bed {
            state: logs.join("bed"),
            logs,
            server,
            client,
            decap: true,
        };
        let out = bed.script(&["up", "--instances", "2", "--etcd"]);
        assert!(
            out.status.success(),
            "scripts/testbed.sh up --instances 2 --etcd failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        bed.decap = !Command::new("ip")
            .args(["-n", &ns("be1"), "link", "show", "tunl0"])
            .output()
            .is_ok_and(|o| o.status.success());
        bed
    }

    fn spawn(&self, netns: &str, log: &str, program: &Path, args: &[String]) -> Proc {
        let path = self.logs.join(format!("{log}.log"));
        let out = File::create(&path).expect("log file");
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
            name: log.to_string(),
            child,
            log: path,
        }
    }

    /// Instance i with the configuration the bed wrote for it, once ready
    /// (`pktdist status` exits 0).
    fn instance(&self, i: usize, log: &str) -> Proc {
        let config = self.state.join(format!("lb{}/pktdist.toml", i + 1));
        let args = vec![
            "run".to_string(),
            "--config".into(),
            config.display().to_string(),
        ];
        let mut p = self.spawn(
            &lb_ns(i),
            log,
            Path::new(env!("CARGO_BIN_EXE_pktdist")),
            &args,
        );
        wait_until(
            &format!("instance {i} ready"),
            Duration::from_secs(30),
            || {
                if let Ok(Some(st)) = p.child.try_wait() {
                    panic!("pktdist {i} exited ({st}):\n{}", p.tail());
                }
                self.ready(i)
            },
        );
        p
    }

    fn ready(&self, i: usize) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &lb_ns(i)])
            .arg(env!("CARGO_BIN_EXE_pktdist"))
            .args(["status", "--metrics", &format!("{}:9400", CONTROL[i])])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// The three backends, on :80 and :81.
    fn backends(&self) -> Vec<Proc> {
        (1..=3)
            .map(|n| {
                let name = format!("be{n}");
                let mut args: Vec<String> = vec![
                    "--name".into(),
                    name.clone(),
                    "--listen".into(),
                    format!("{VIP}:80"),
                    "--listen".into(),
                    format!("{VIP}:81"),
                    "--control".into(),
                    format!("{}:7400", CONTROL[0]),
                    "--key".into(),
                    n.to_string().repeat(64),
                ];
                if self.decap {
                    args.push("--decap".into());
                }
                let server = self.server.clone();
                let mut p = self.spawn(&ns(&name), &name, &server, &args);
                wait_until(
                    &format!("{name} to listen"),
                    Duration::from_secs(10),
                    || {
                        if let Ok(Some(st)) = p.child.try_wait() {
                            panic!("{name} exited ({st}):\n{}", p.tail());
                        }
                        p.text().contains("ready:")
                    },
                );
                p
            })
            .collect()
    }

    /// `pktdist affinity <args>` as the operator at instance i, on the
    /// VIP's port 80; its standard output.
    fn affinity(&self, i: usize, args: &[&str]) -> String {
        let server = format!("{}:7400", CONTROL[i]);
        let service = format!("{VIP}:80");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &lb_ns(i)])
            .arg(env!("CARGO_BIN_EXE_pktdist"))
            .arg("affinity")
            .arg(args[0])
            .args(["--server", &server, "--key", ADMIN_KEY]);
        if args[0] != "list" {
            cmd.args(["--service", &service]);
        }
        let out = cmd.args(&args[1..]).output().expect("run pktdist affinity");
        assert!(
            out.status.success(),
            "pktdist affinity {args:?} at instance {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `pktdist stats` of instance i.
    fn stats(&self, i: usize) -> serde_json::Value {
        let out = Command::new("ip")
            .args(["netns", "exec", &lb_ns(i)])
            .arg(env!("CARGO_BIN_EXE_pktdist"))
            .args(["stats", "--server", &format!("{}:7400", CONTROL[i])])
            .args(["--key", ADMIN_KEY, "--timeout", "500ms"])
            .output()
            .expect("run pktdist stats");
        assert!(
            out.status.success(),
            "stats of instance {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("stats JSON")
    }

    /// New connections instance i counted so far, on service `svc` (its
    /// index in the configuration) or on all of them.
    fn new_connections(&self, i: usize, svc: Option<usize>) -> u64 {
        let s = self.stats(i);
        match svc {
            Some(k) => s["services"][k]["new_connections"].as_u64(),
            None => s["new_connections"].as_u64(),
        }
        .unwrap_or(0)
    }

    /// The router's next hops for the VIP.
    fn next_hops(&self) -> BTreeSet<String> {
        let out = Command::new("ip")
            .args(["-n", &ns("r1"), "route", "show", VIP])
            .output()
            .expect("ip route show");
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        words
            .windows(2)
            .filter(|w| w[0] == "via")
            .map(|w| w[1].to_string())
            .collect()
    }

    /// Waits for the router's next hops to be `want`; returns how long.
    fn await_next_hops(&self, want: &[&str], limit: Duration) -> Duration {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let start = Instant::now();
        wait_until(&format!("the router's next hops {want:?}"), limit, || {
            self.next_hops() == want
        });
        start.elapsed()
    }

    fn run_client(&self, netns: &str, args: &[&str]) -> Vec<Conn> {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns(netns)])
            .arg(&self.client)
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

    fn start_client(&self, netns: &str, args: &[&str]) -> Running {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns(netns)])
            .arg(&self.client)
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

    /// The BGP glue's and the routers' logs, for a failure's report.
    fn bgp_logs(&self) -> String {
        let mut s = String::new();
        for f in ["lb1/bgp.log", "lb2/bgp.log", "r1/bird.log"] {
            let text = fs::read_to_string(self.state.join(f)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            s += &format!(
                "--- {f}:\n{}\n",
                lines[lines.len().saturating_sub(15)..].join("\n")
            );
        }
        s
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.bgp_logs());
            // The bed's own logs go with it: keep a copy.
            let _ = Command::new("cp")
                .args(["-a"])
                .arg(&self.state)
                .arg(self.logs.join("bed-kept"))
                .status();
        }
        let out = self.script(&["down"]);
        if !out.status.success() {
            eprintln!(
                "testbed down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if thread::panicking() {
            eprintln!("test-bed logs kept in {}", self.logs.display());
        } else {
            let _ = fs::remove_dir_all(&self.logs);
        }
    }
}

/// A process in a namespace, killed on drop.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn tail(&self) -> String {
        let t = self.text();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Asks for a clean stop (once: a second signal ends pktdist at once).
    fn sigterm(&self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
    }

    /// Waits for the end (a guard of 30 s).
    fn wait_exit(mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{} did not stop after SIGTERM:\n{}",
                self.name,
                self.tail()
            );
            thread::sleep(Duration::from_millis(50));
        }
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

/// A client still running.
struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Running {
    /// Reads lines up to `{"held":N}`: the first requests of `--hold`.
    fn held(&mut self) -> Vec<Conn> {
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

    fn finish(mut self) -> Vec<Conn> {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"go\n");
        }
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

/// One request as the client reported it.
#[derive(Debug, Deserialize, Clone)]
struct Conn {
    src: Option<String>,
    phase: String,
    backend: Option<String>,
    bytes: u64,
    ok: bool,
    error: Option<String>,
}

impl Conn {
    fn src_ip(&self) -> &str {
        self.src
            .as_deref()
            .and_then(|s| s.split(':').next())
            .unwrap_or("?")
    }
}

fn parse_conns(text: &str) -> Vec<Conn> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("\"held\""))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("client line {l:?}: {e}")))
        .collect()
}

fn assert_all_ok(what: &str, conns: &[Conn], expected: usize) {
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
    assert_eq!(conns.len(), expected, "{what}: requests reported");
}

/// New connections each instance took while `f` ran.
fn per_instance(bed: &Bed, svc: Option<usize>, f: impl FnOnce()) -> [u64; 2] {
    let before = [bed.new_connections(0, svc), bed.new_connections(1, svc)];
    f();
    [
        bed.new_connections(0, svc) - before[0],
        bed.new_connections(1, svc) - before[1],
    ]
}

/// Each instance took at least a fifth.
fn assert_both_take_a_fifth(what: &str, taken: [u64; 2]) {
    let total = taken[0] + taken[1];
    for (i, n) in taken.iter().enumerate() {
        assert!(
            n * 5 >= total,
            "{what}: instance {i} took {n} of {total} new connections ({taken:?})"
        );
    }
}

/// The wall clock as the glue logs it (UTC, HH:MM:SS.mmm).
fn utc_now() -> String {
    let out = Command::new("date")
        .args(["-u", "+%H:%M:%S.%3N"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn testbed_ecmp_two_instances() {
    if let Some(why) = skip_reason() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the ECMP test bed must run in CI, but: {why}"
        );
        println!("SKIP testbed_ecmp_two_instances: {why}");
        return;
    }
    let started = Instant::now();
    let bed = Bed::up();
    let _be = bed.backends();
    let a = bed.instance(0, "lb-a");
    let _b = bed.instance(1, "lb-b");
    let took = bed.await_next_hops(&NEXT_HOP, Duration::from_secs(20));
    println!("both instances announced {took:?} after the second was ready");

    // 1. New connections spread over both instances.
    let taken = per_instance(&bed, None, || {
        let args = |src: &'static str| {
            [
                "--sources",
                src,
                "--connections",
                "200",
                "--concurrency",
                "8",
                "--path",
                "/bytes/1000",
                "--large-every",
                "10",
            ]
        };
        let c1 = bed.start_client("c1", &args(C1));
        let c2 = bed.start_client("c2", &args(C2));
        let mut conns = c1.finish();
        conns.extend(c2.finish());
        assert_all_ok("spread", &conns, 400);
    });
    assert_both_take_a_fifth("spread", taken);
    println!("ecmp: 400 connections byte-exact, per instance {taken:?}");

    // 2. hash = "client" (the sticky service on :81, services[2]): each
    // client's connections, spread over both instances by the router's
    // L4 hash, all reach one backend.
    let mut conns = Vec::new();
    let taken = per_instance(&bed, Some(2), || {
        for (netns, src) in [("c1", C1), ("c2", C2)] {
            conns.extend(bed.run_client(
                netns,
                &[
                    "--target",
                    &format!("{VIP}:81"),
                    "--sources",
                    src,
                    "--connections",
                    "96",
                ],
            ));
        }
    });
    assert_all_ok("hash = client", &conns, 192);
    let mut per_client: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for c in &conns {
        per_client
            .entry(c.src_ip().to_string())
            .or_default()
            .insert(c.backend.clone().unwrap_or_default());
    }
    assert_eq!(per_client.len(), 15);
    for (client, backends) in &per_client {
        assert_eq!(backends.len(), 1, "{client} reached {backends:?}");
    }
    let used: BTreeSet<&String> = per_client.values().flatten().collect();
    assert!(used.len() >= 2, "15 clients all on {used:?}");
    assert!(taken.iter().all(|&n| n > 0), "{taken:?}");
    println!(
        "ecmp, hash = client: 15 clients, each on one backend ({used:?}), per instance {taken:?}"
    );

    // 3. The shared table (etcd): the operator pins c2's network to be3 at
    // A; all of c2's new connections reach be3, whichever instance the
    // router sends them to.
    bed.affinity(
        0,
        &[
            "add",
            "--client",
            PINNED,
            "--owner",
            "be3",
            "--duration",
            "10m",
        ],
    );
    wait_until(
        "B to list the affinity made at A",
        Duration::from_secs(5),
        || bed.affinity(1, &["list"]).contains("be3"),
    );
    let mut conns = Vec::new();
    let taken = per_instance(&bed, None, || {
        conns = bed.run_client("c2", &["--sources", C2, "--connections", "100"]);
    });
    assert_all_ok("pinned at A", &conns, 100);
    assert_both_take_a_fifth("pinned at A", taken);
    for c in &conns {
        assert_eq!(
            c.backend.as_deref(),
            Some("be3"),
            "a pinned client elsewhere: {c:?}"
        );
    }
    println!("ecmp, shared table: pinned at A, 100 connections all on be3, per instance {taken:?}");

    // 4. Stop A while 128 connections are held open (scheduled, not
    // pinned) and new ones trickle in.
    let sources = vec![C1; 16].join(",");
    let before_hold = [bed.new_connections(0, None), bed.new_connections(1, None)];
    let mut held = bed.start_client(
        "c1",
        &["--hold", "--sources", &sources, "--path", "/bytes/100000"],
    );
    let first = held.held();
    assert_all_ok("held", &first, 128);
    let held_on_a = bed.new_connections(0, None) - before_hold[0];
    let held_on_b = bed.new_connections(1, None) - before_hold[1];
    assert!(
        held_on_a > 0 && held_on_b > 0,
        "held connections per instance: {held_on_a}, {held_on_b}"
    );
    let unknown_before = bed.stats(1)["unknown_flows"].as_u64().unwrap_or(0);
    let trickle = bed.start_client(
        "c2",
        &[
            "--sources",
            C2,
            "--connections",
            "200",
            "--concurrency",
            "4",
            "--pause-ms",
            "20",
            "--path",
            "/bytes/20000",
        ],
    );
    thread::sleep(Duration::from_millis(500));
    let stop = Instant::now();
    println!("SIGTERM to A at {}", utc_now());
    a.sigterm();
    let withdrawn = bed.await_next_hops(&NEXT_HOP[1..], Duration::from_secs(10));
    assert!(
        withdrawn <= ROUTE_FOLLOWS,
        "A's route was withdrawn {withdrawn:?} after its SIGTERM\n{}",
        bed.bgp_logs()
    );
    let st = a.wait_exit();
    let exited = stop.elapsed();
    assert!(st.success(), "instance A's exit after SIGTERM: {st}");
    let conns = trickle.finish();
    assert_all_ok("new connections across the switch", &conns, 200);
    let second = held.finish();
    assert_all_ok("held across the switch", &second, 128);
    for c in &second {
        let f = first
            .iter()
            .find(|f| f.src == c.src)
            .expect("the same connection");
        assert_eq!(c.backend, f.backend, "a held connection moved: {c:?}");
        assert_eq!(c.bytes, 100_000);
    }
    let moved = bed.stats(1)["unknown_flows"].as_u64().unwrap_or(0) - unknown_before;
    assert!(
        moved > 0,
        "B saw no packet of a connection A had opened: nothing crossed the switch"
    );
    println!(
        "ecmp, A stopped: route withdrawn {withdrawn:?} after SIGTERM (A exited after \
         {exited:?}); 200 new connections through B, 128 held ({held_on_a} through A) \
         finished byte-exact on their backends; B picked up {moved} packets of flows it had \
         not seen"
    );
    let glue = fs::read_to_string(bed.state.join("lb1/bgp.log")).unwrap_or_default();
    println!(
        "A's BGP glue: {}",
        glue.lines().rev().take(2).collect::<Vec<_>>().join(" / ")
    );

    // 5. A again: it loads the shared table before it is ready, is
    // announced, and takes traffic; the pin still holds everywhere.
    let _a = bed.instance(0, "lb-a-again");
    assert!(
        bed.affinity(0, &["list"]).contains("be3"),
        "A restarted without the shared table"
    );
    let announced = bed.await_next_hops(&NEXT_HOP, Duration::from_secs(10));
    assert!(
        announced <= ROUTE_FOLLOWS,
        "A announced {announced:?} after it was ready\n{}",
        bed.bgp_logs()
    );
    let taken = per_instance(&bed, None, || {
        let conns = bed.run_client("c1", &["--sources", C1, "--connections", "200"]);
        assert_all_ok("after A's return", &conns, 200);
    });
    assert_both_take_a_fifth("after A's return", taken);
    let mut conns = Vec::new();
    let taken2 = per_instance(&bed, None, || {
        conns = bed.run_client("c2", &["--sources", C2, "--connections", "100"]);
    });
    assert_all_ok("pinned, A back", &conns, 100);
    assert!(taken2.iter().all(|&n| n > 0), "{taken2:?}");
    for c in &conns {
        assert_eq!(
            c.backend.as_deref(),
            Some("be3"),
            "after A's restart: {c:?}"
        );
    }
    println!(
        "ecmp, A back: announced {announced:?} after ready, per instance {taken:?}; whole run {:?}",
        started.elapsed()
    );
}

/// The shipped BIRD configurations parse (`bird -p`), the router's with a
/// session from its template as scripts/testbed.sh adds them. Needs no
/// root; skipped where BIRD is not installed (outside CI).
#[test]
fn bird_configurations_parse() {
    let has_bird = Command::new("sh")
        .args(["-c", "command -v bird"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_bird {
        assert!(
            std::env::var_os("CI").is_none(),
            "BIRD must be installed in CI (scripts/install-deps.sh)"
        );
        println!("SKIP bird_configurations_parse: bird missing");
        return;
    }
    let dir = std::env::temp_dir().join(format!("pktdist-bird-parse-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("temporary directory");
    let router = fs::read_to_string(repo().join("config/bird/router.conf")).expect("router.conf");
    let with_peer = dir.join("router.conf");
    fs::write(
        &with_peer,
        format!("{router}\nprotocol bgp lb1 from distributor {{ neighbor 10.99.0.1 as 65001; }}\n"),
    )
    .expect("write");
    for conf in [repo().join("config/bird/distributor.conf"), with_peer] {
        let out = Command::new("bird")
            .arg("-p")
            .arg("-c")
            .arg(&conf)
            .output()
            .expect("run bird -p");
        assert!(
            out.status.success(),
            "{}: {}",
            conf.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = fs::remove_dir_all(&dir);
}
