//! End to end with real TCP stacks: the network-namespace test bed
//! (scripts/testbed.sh), pktdist on its veth through DPDK's net_af_packet
//! (config/testbed.toml), the example backend server in three backend
//! namespaces and kernel TCP clients (examples/testbed_client.rs) in two
//! client namespaces.
//!
//! The scenarios share one test bed, so they run one after another inside a
//! single test; each starts its own pktdist and backend servers and stops
//! them (guards, also on failure), and the bed is taken down at the end.
//! The bed uses the namespace prefix `pdt`, so a test bed an operator
//! brought up by hand (`pd`) is left alone.
//!
//! Needs root (namespaces, raw sockets, DPDK). Elsewhere the test prints a
//! SKIP line and passes, except under scripts/test.sh or CI (`required`), where
//! it must run.
//! `TESTBED_SCENARIOS=name,name` runs only those scenarios (the names of
//! the functions below, e.g. `backend_server_drains_itself_on_sigterm`).
#![cfg(feature = "dpdk")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::testbed::{
    after_down, assert_all_ok, assert_trickle_ok, examples, finish_all, kernel_has_ipip, repo,
    required, run_client, skip_reason, start_backend, wait_until, Conn, Proc, Running, C1, C2, VIP,
};
use common::ADMIN_KEY;

const PREFIX: &str = "pdt";
const CONTROL: &str = "10.99.0.1:7400";
const BACKENDS: [(&str, &str, &str, u32); 3] = [
    ("be1", "10.99.10.1", "02:50:44:00:10:01", 100),
    ("be2", "10.99.10.2", "02:50:44:00:10:02", 200),
    ("be3", "10.99.10.3", "02:50:44:00:10:03", 300),
];
/// Pinned statically to be1 by config/testbed.toml (the restart scenario
/// uses it).
const PINNED: &str = "10.99.2.8";
/// The client behind the router r1, whose link to it has MTU 1400.
const BEHIND: &str = "10.98.3.1";
/// That link's MTU (scripts/testbed.sh MTU_NARROW).
const NARROW_MTU: u32 = 1400;

fn key_of(backend: &str) -> String {
    let digit = backend.trim_start_matches("be");
    digit.repeat(64)
}

fn ns(name: &str) -> String {
    format!("{PREFIX}-{name}")
}

/// The test bed: up on creation, down on drop.
struct Bed {
    logs: PathBuf,
    server: PathBuf,
    client: PathBuf,
    /// The kernel has no ipip driver: the backends decapsulate in user space.
    decap: bool,
}

impl Bed {
    fn script(arg: &str) -> std::process::Output {
        Command::new(repo().join("scripts/testbed.sh"))
            .arg(arg)
            .env("PD_TESTBED_PREFIX", PREFIX)
            .output()
            .expect("run scripts/testbed.sh")
    }

    /// The bed, its logs in a directory of the test's `name`.
    fn up(name: &str) -> Bed {
        let (server, client) = examples();
        let logs =
            std::env::temp_dir().join(format!("pktdist-testbed-{name}-{}", std::process::id()));
        fs::create_dir_all(&logs).expect("log directory");
        let out = Bed::script("up");
        let mut bed = Bed {
            logs,
            server,
            client,
            decap: true,
        };
        assert!(
            out.status.success(),
            "scripts/testbed.sh up failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        bed.decap = !kernel_has_ipip(&ns("be1"));
        bed
    }

    fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }

    /// Starts a process inside a namespace, output to `log`.
    fn spawn(&self, netns: &str, log: &str, program: &Path, args: &[String]) -> Proc {
        Proc::spawn(&ns(netns), log, self.log(log), program, args)
    }

    /// pktdist with config/testbed.toml, ready when its control plane answers.
    fn pktdist(&self, log: &str) -> Proc {
        self.pktdist_with(log, &repo().join("config/testbed.toml"), &[])
    }

    /// pktdist with `config` and `extra` arguments to `run`, ready when its
    /// control plane answers.
    fn pktdist_with(&self, log: &str, config: &Path, extra: &[&str]) -> Proc {
        let mut args = vec![
            "run".to_string(),
            "--config".into(),
            config.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut p = self.spawn("lb", log, Path::new(env!("CARGO_BIN_EXE_pktdist")), &args);
        p.await_ready("pktdist's control plane", Duration::from_secs(30), |_| {
            self.cli(&["backend", "list"]).0
        });
        p
    }

    /// A backend server in its namespace, on ports 80 and 8080, ready when
    /// it says so.
    fn backend(&self, name: &str, extra: &[&str]) -> Proc {
        let mut args: Vec<String> = vec![
            "--name".into(),
            name.into(),
            "--listen".into(),
            format!("{VIP}:80"),
            "--listen".into(),
            format!("{VIP}:8080"),
            "--control".into(),
            CONTROL.into(),
            "--key".into(),
            key_of(name),
        ];
        if self.decap {
            args.push("--decap".into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        start_backend(&self.server, &ns(name), name, self.log(name), &args)
    }

    /// The three backends, plain (no affinity rule).
    fn backends(&self) -> Vec<Proc> {
        BACKENDS.iter().map(|b| self.backend(b.0, &[])).collect()
    }

    /// `pktdist <args>` as admin inside the distributor's namespace:
    /// (success, stdout + stderr).
    fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns("lb")])
            .arg(env!("CARGO_BIN_EXE_pktdist"))
            .args(args)
            .args(["--server", CONTROL, "--key", ADMIN_KEY, "--timeout", "1s"])
            .output()
            .expect("run pktdist CLI");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.cli(args);
        assert!(ok, "pktdist {args:?} failed: {text}");
        text
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&self.cli_ok(&["stats"])).expect("stats JSON")
    }

    /// Lines of `pktdist affinity list` naming `client` and `owner`.
    fn has_affinity(&self, client: &str, owner: &str) -> bool {
        self.cli_ok(&["affinity", "list"]).lines().any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.get(1) == Some(&client) && cols.get(3) == Some(&owner)
        })
    }

    /// Runs the client in a client namespace to the end.
    fn run_client(&self, netns: &str, args: &[&str]) -> Vec<Conn> {
        run_client(&self.client, &ns(netns), args)
    }

    /// Starts the client in a client namespace, reading its output later.
    fn start_client(&self, netns: &str, args: &[&str]) -> Running {
        Running::start(&self.client, &ns(netns), args)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        after_down(&Bed::script("down"), &self.logs);
    }
}

/// Each held connection's second half (`second`) ran on the backend its
/// first half (`first`) did, and moved all its bytes.
fn assert_held_stayed(first: &[Conn], second: &[Conn]) {
    for c in second {
        let before = first
            .iter()
            .find(|f| f.src == c.src)
            .expect("same connection");
        assert_eq!(
            (before.phase.as_str(), c.phase.as_str()),
            ("first", "second")
        );
        assert_eq!(c.backend, before.backend, "a held connection moved");
        assert_eq!(c.bytes, 100_000);
    }
}

/// 100 connections from c1's addresses, all completing, spread over at
/// least two backends (no affinity holds them); returns the spread.
fn assert_weights_apply(bed: &Bed, what: &str) -> BTreeMap<String, usize> {
    let conns = bed.run_client("c1", &["--sources", C1, "--connections", "100"]);
    assert_all_ok(what, &conns, 100);
    let spread = by_backend(&conns);
    assert!(
        spread.len() >= 2,
        "{what}: the weights apply again: {spread:?}"
    );
    spread
}

/// Each backend's share of `n` connections is its weight share to within
/// 5.5 standard deviations of the binomial spread: 0.059 for be1's 1/6,
/// 0.079 for be3's 1/2 at 1,200 connections. The clients' source ports are
/// the kernel's random choice, so the shares are random: a bound of 3.5
/// deviations fails about one run in a thousand, 5.5 about one in ten
/// million. Equal weights (be1 at 1/3) or swapped ones are still
/// far outside it.
fn assert_shares_follow_weights(counts: &BTreeMap<String, usize>, n: usize) {
    let total: u32 = BACKENDS.iter().map(|b| b.3).sum();
    for (name, _, _, weight) in BACKENDS {
        let share = *counts.get(name).unwrap_or(&0) as f64 / n as f64;
        let want = f64::from(weight) / f64::from(total);
        let bound = 5.5 * (want * (1.0 - want) / n as f64).sqrt();
        assert!(
            (share - want).abs() <= bound,
            "{name}: share {share:.3}, weight share {want:.3} ± {bound:.3} ({counts:?})"
        );
    }
}

fn by_backend(conns: &[Conn]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for c in conns {
        *m.entry(c.backend.clone().unwrap_or_default()).or_insert(0) += 1;
    }
    m
}

/// Connections from c1 one by one until one reaches `backend` (whose
/// affinity rule then fires for the c1 network).
fn reach(bed: &Bed, backend: &str) {
    for _ in 0..10 {
        let conns = bed.run_client("c1", &["--sources", C1, "--connections", "8"]);
        if conns.iter().any(|c| c.backend.as_deref() == Some(backend)) {
            return;
        }
    }
    panic!("80 connections from c1 and none reached {backend}");
}

/// config/testbed.toml agrees with the script and these tests: control
/// address, keys, backends' addresses, MACs and weights, the static pin.
/// Runs anywhere (no root).
#[test]
fn testbed_config_matches_the_bed() {
    let cfg = pktdist::config::Config::load(repo().join("config/testbed.toml"))
        .expect("config/testbed.toml loads");
    assert_eq!(cfg.control.listen.to_string(), CONTROL);
    let hex =
        |k: &pktdist::config::HexKey| k.0.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(hex(&cfg.control.keys["admin"]), ADMIN_KEY);
    assert!(cfg.ports[0].device.contains("iface=lb0"));
    let script = fs::read_to_string(repo().join("scripts/testbed.sh")).expect("testbed.sh");
    assert!(
        script.contains(&format!("MTU_WIRE={}", cfg.ports[0].mtu)),
        "lb0's mtu is the bed's wire MTU"
    );
    assert!(script.contains(&format!("MTU_NARROW={NARROW_MTU}")));
    assert!(script.contains(&format!("BEHIND_CLIENT={BEHIND}")));
    let web = &cfg.services[0];
    assert_eq!((web.name.as_str(), web.port), ("web", 80));
    assert_eq!(web.vip.to_string(), VIP);
    assert_eq!(
        web.ipip_source.map(|a| a.to_string()).as_deref(),
        Some("10.99.0.2")
    );
    assert_eq!(cfg.services[1].port, 8080);
    assert!(cfg.services[1].auto_affinity.is_some());
    for svc in &cfg.services {
        assert_eq!(svc.backends.len(), 3);
        for (b, (name, addr, mac, weight)) in svc.backends.iter().zip(BACKENDS) {
            assert_eq!(b.name, name);
            assert_eq!(b.address.to_string(), addr);
            let m = b.mac.expect("backend MAC").0;
            let m = m
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            assert_eq!(m, mac);
            if svc.name == "web" {
                assert_eq!(b.weight, weight);
            }
            assert_eq!(hex(&cfg.control.keys[name]), key_of(name));
        }
    }
    assert_eq!(cfg.affinities.len(), 1);
    assert_eq!(cfg.affinities[0].client.addr.to_string(), PINNED);
    assert_eq!(cfg.affinities[0].backend, "be1");
}

/// A scenario of the test bed: its name and what it runs.
type Scenario = (&'static str, fn(&Bed));
/// The tests that bring the bed up take this lock: one bed at a time in
/// this process (other processes: `flock /tmp/testbed.lock`).
fn bed_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn testbed_end_to_end() {
    if let Some(why) = skip_reason(&["ethtool"]) {
        assert!(!required(), "the test bed must run in CI, but: {why}");
        println!("SKIP testbed_end_to_end: {why}");
        return;
    }
    let _one_bed = bed_lock();
    let scenarios: [Scenario; 9] = [
        ("distribution_follows_weights", distribution_follows_weights),
        (
            "application_affinity_until_cancel_and_expiry",
            application_affinity_until_cancel_and_expiry,
        ),
        (
            "auto_affinity_keeps_parallel_connections_together",
            auto_affinity_keeps_parallel_connections_together,
        ),
        (
            "weight_zero_drains_without_breaking_open_connections",
            weight_zero_drains_without_breaking_open_connections,
        ),
        (
            "backend_server_drains_itself_on_sigterm",
            backend_server_drains_itself_on_sigterm,
        ),
        (
            "a_dead_backend_is_checked_out_and_back_in",
            a_dead_backend_is_checked_out_and_back_in,
        ),
        (
            "removing_a_backend_ends_its_affinities",
            removing_a_backend_ends_its_affinities,
        ),
        (
            "restart_mid_traffic_keeps_connections",
            restart_mid_traffic_keeps_connections,
        ),
        (
            "path_mtu_discovery_through_pktdist",
            path_mtu_discovery_through_pktdist,
        ),
    ];
    let only = std::env::var("TESTBED_SCENARIOS").unwrap_or_default();
    let only: Vec<&str> = only.split(',').filter(|n| !n.is_empty()).collect();
    for name in &only {
        assert!(
            scenarios.iter().any(|(n, _)| n == name),
            "TESTBED_SCENARIOS names no scenario {name:?}"
        );
    }
    let bed = Bed::up("end-to-end");
    println!(
        "test bed up (IP-in-IP decapsulated {})",
        if bed.decap {
            "in user space by backend_server --decap"
        } else {
            "by the kernel's tunl0"
        }
    );
    for (name, scenario) in scenarios {
        if only.is_empty() || only.contains(&name) {
            scenario(&bed);
        }
    }
}

/// 1200 connections from 15 client addresses spread over be1..be3 in
/// proportion to the weights 100/200/300 (see [`assert_shares_follow_weights`]).
/// Every connection completes byte-exact, one in ten with a 100 KB
/// (multi-segment) response, none reset or timed out.
fn distribution_follows_weights(bed: &Bed) {
    let _lb = bed.pktdist("lb-weights");
    let _be = bed.backends();
    let args = |src: &'static str| {
        [
            "--sources",
            src,
            "--connections",
            "600",
            "--concurrency",
            "8",
            "--path",
            "/bytes/1000",
            "--large-every",
            "10",
            "--large",
            "100000",
        ]
    };
    let conns = finish_all([
        bed.start_client("c1", &args(C1)),
        bed.start_client("c2", &args(C2)),
    ]);
    assert_all_ok("weights", &conns, 1200);
    let large = conns.iter().filter(|c| c.bytes == 100_000).count();
    assert_eq!(large, 120, "100 KB responses received whole");
    let counts = by_backend(&conns);
    assert_shares_follow_weights(&counts, conns.len());
    // pktdist counted at least the connections the clients saw per backend.
    let stats = bed.stats();
    let web = &stats["services"][0];
    assert_eq!(web["name"], "web");
    for b in web["backends"].as_array().expect("backends") {
        let name = b["name"].as_str().unwrap_or("");
        let seen = *counts.get(name).unwrap_or(&0) as u64;
        assert!(
            b["connections"].as_u64().unwrap_or(0) >= seen,
            "pktdist counted fewer connections for {name} than reached it: {b}"
        );
    }
    println!("weights: {counts:?} of {}", conns.len());
}

/// be2's application pins the c1 network (10.99.1.0/24) to itself at the
/// network's first request: every new connection from it reaches be2 until
/// the operator cancels the affinity; then connections follow the weights
/// again. A second affinity with a short duration expires: be2 is notified
/// and the network is free again.
fn application_affinity_until_cancel_and_expiry(bed: &Bed) {
    let _lb = bed.pktdist("lb-affinity");
    let _be1 = bed.backend("be1", &[]);
    let _be3 = bed.backend("be3", &[]);
    let rule = [
        "--affinity-after",
        "1",
        "--affinity-prefix",
        "24",
        "--affinity-duration",
        "60s",
    ];
    let be2 = bed.backend("be2", &rule);
    reach(bed, "be2");
    wait_until(
        "be2's affinity for 10.99.1.0/24",
        Duration::from_secs(10),
        || bed.has_affinity("10.99.1.0/24", "be2"),
    );
    // The backend logs the answer after pktdist has made the affinity.
    wait_until("be2's log of the answer", Duration::from_secs(10), || {
        be2.text()
            .contains("affinity 10.99.1.0/24 on 10.99.100.1:80 for 60s: OK")
    });
    let pinned = bed.run_client(
        "c1",
        &[
            "--sources",
            C1,
            "--connections",
            "100",
            "--path",
            "/bytes/3000",
        ],
    );
    assert_all_ok("pinned", &pinned, 100);
    assert_eq!(by_backend(&pinned).keys().collect::<Vec<_>>(), ["be2"]);

    // The operator cancels it; be2 hears why.
    bed.cli_ok(&[
        "affinity",
        "cancel",
        "--service",
        &format!("{VIP}:80"),
        "--client",
        "10.99.1.0/24",
        "--owner",
        "be2",
    ]);
    wait_until("be2's CANCELLED notice", Duration::from_secs(10), || {
        be2.text()
            .contains("AFFINITY_ENDED 10.99.1.0/24 on 10.99.100.1:80/tcp owner be2: CANCELLED")
    });
    assert!(!bed.has_affinity("10.99.1.0/24", "be2"));
    assert_weights_apply(bed, "after cancel");
    be2.stop();

    // An affinity that expires: it holds while the 40 connections below
    // run (however slow the machine), then the operator's EXTEND gives it
    // two seconds; the notice goes where be2 asked when it made it.
    let timed = [
        "--affinity-after",
        "1",
        "--affinity-prefix",
        "24",
        "--affinity-duration",
        "10m",
    ];
    let be2 = bed.backend("be2", &timed);
    reach(bed, "be2");
    wait_until("be2's affinity", Duration::from_secs(10), || {
        bed.has_affinity("10.99.1.0/24", "be2")
    });
    let pinned = bed.run_client("c1", &["--sources", C1, "--connections", "40"]);
    assert_all_ok("pinned (timed)", &pinned, 40);
    assert_eq!(by_backend(&pinned).keys().collect::<Vec<_>>(), ["be2"]);
    bed.cli_ok(&[
        "affinity",
        "extend",
        "--service",
        &format!("{VIP}:80"),
        "--client",
        "10.99.1.0/24",
        "--owner",
        "be2",
        "--duration",
        "2s",
    ]);
    wait_until("be2's EXPIRED notice", Duration::from_secs(30), || {
        be2.text()
            .contains("AFFINITY_ENDED 10.99.1.0/24 on 10.99.100.1:80/tcp owner be2: EXPIRED")
    });
    assert!(!bed.has_affinity("10.99.1.0/24", "be2"));
    let free = assert_weights_apply(bed, "after expiry");
    println!(
        "affinity: 10.99.1.0/24 pinned to be2 (140 connections), cancelled, expired; then {free:?}"
    );
}

/// The l2 service on port 8080 has automatic affinity: 8 connections of
/// one client, all open at once, land on one backend, for each of 15
/// clients; different clients still use different backends.
fn auto_affinity_keeps_parallel_connections_together(bed: &Bed) {
    let _lb = bed.pktdist("lb-auto");
    let _be = bed.backends();
    let target = format!("{VIP}:8080");
    let args = |src: &'static str| {
        [
            "--target".to_string(),
            target.clone(),
            "--sources".into(),
            src.into(),
            "--connections".into(),
            "8".into(),
            "--parallel".into(),
        ]
    };
    let a1 = args(C1);
    let a2 = args(C2);
    let conns = finish_all([
        bed.start_client("c1", &a1.iter().map(String::as_str).collect::<Vec<_>>()),
        bed.start_client("c2", &a2.iter().map(String::as_str).collect::<Vec<_>>()),
    ]);
    assert_all_ok("parallel", &conns, 15 * 8);
    let mut per_client: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for c in &conns {
        per_client
            .entry(c.src_ip().to_string())
            .or_default()
            .insert(c.backend.clone().unwrap_or_default());
    }
    assert_eq!(per_client.len(), 15);
    for (client, backends) in &per_client {
        assert_eq!(
            backends.len(),
            1,
            "{client}'s parallel connections went to {backends:?}"
        );
    }
    let used: BTreeSet<&String> = per_client.values().flatten().collect();
    assert!(used.len() >= 2, "all clients on {used:?}");
    let stats = bed.stats();
    let app = &stats["services"][1];
    assert_eq!(app["name"], "app");
    assert!(
        app["auto_affinity_hits"].as_u64().unwrap_or(0) > 0,
        "no automatic-affinity hit counted: {app}"
    );
    println!(
        "auto-affinity: 15 clients x 8 parallel connections, each client on one backend, backends used {used:?}"
    );
}

/// Weight 0 drains a backend: 300 new connections avoid it, while
/// connections already open on it complete (a 100 KB response after the
/// change, byte-exact).
fn weight_zero_drains_without_breaking_open_connections(bed: &Bed) {
    let _lb = bed.pktdist("lb-drain");
    let _be = bed.backends();
    let mut held = bed.start_client(
        "c1",
        &["--hold", "--sources", C1, "--path", "/bytes/100000"],
    );
    let first = held.held();
    assert_all_ok("held (first)", &first, 8);
    let counts = by_backend(&first);
    let (drained, _) = counts
        .iter()
        .max_by_key(|(_, n)| **n)
        .expect("a held connection");
    let drained = drained.clone();
    bed.cli_ok(&["backend", "set-weight", "web", &drained, "0"]);
    let list = bed.cli_ok(&["backend", "list", "--service", "web"]);
    assert!(
        list.lines()
            .any(|l| l.contains(&drained) && l.contains("draining")),
        "{list}"
    );
    let fresh = bed.run_client("c2", &["--sources", C2, "--connections", "300"]);
    assert_all_ok("while draining", &fresh, 300);
    assert!(
        !by_backend(&fresh).contains_key(&drained),
        "draining {drained} got new connections: {:?}",
        by_backend(&fresh)
    );
    let second = held.finish();
    assert_all_ok("held (second)", &second, 8);
    assert_held_stayed(&first, &second);
    bed.cli_ok(&["backend", "set-weight", "web", &drained, "300"]);
    println!(
        "drain: {drained} at weight 0, 300 new connections on {:?}, {} held on {drained} finished",
        by_backend(&fresh),
        counts[&drained]
    );
}

/// The application drains itself: be3 pins the c1 network, holds
/// connections from it, and gets SIGTERM. It declares DRAIN: new
/// connections from c2 go to be1 and be2 only, while its pinned clients
/// still reach it (the affinity is honoured) and every connection
/// completes; it may neither create nor extend an affinity (DRAINING). Its
/// held connections finish their second request, byte-exact; then it
/// declares DOWN and exits by itself.
fn backend_server_drains_itself_on_sigterm(bed: &Bed) {
    let _lb = bed.pktdist("lb-sigterm");
    let _be1 = bed.backend("be1", &[]);
    let _be2 = bed.backend("be2", &[]);
    let mut be3 = bed.backend(
        "be3",
        &[
            "--affinity-after",
            "1",
            "--affinity-prefix",
            "24",
            "--affinity-duration",
            "60s",
        ],
    );
    reach(bed, "be3");
    wait_until("be3's affinity", Duration::from_secs(10), || {
        bed.has_affinity("10.99.1.0/24", "be3")
    });
    let mut held = bed.start_client(
        "c1",
        &["--hold", "--sources", C1, "--path", "/bytes/100000"],
    );
    let first = held.held();
    assert_all_ok("held on be3 (first)", &first, 8);
    assert_eq!(by_backend(&first).keys().collect::<Vec<_>>(), ["be3"]);

    let st = Command::new("kill")
        .args(["-TERM", &be3.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(st.success());
    wait_until("be3 to declare DRAIN", Duration::from_secs(10), || {
        be3.text().contains("BACKEND_STATE DRAIN: OK")
    });
    let list = bed.cli_ok(&["backend", "list", "--service", "web"]);
    assert!(
        list.lines()
            .any(|l| l.contains("be3") && l.contains("draining") && l.contains("DRAIN")),
        "{list}"
    );
    let fresh = bed.run_client("c2", &["--sources", C2, "--connections", "200"]);
    assert_all_ok("while be3 drains", &fresh, 200);
    assert!(
        !by_backend(&fresh).contains_key("be3"),
        "draining be3 got new scheduled connections: {:?}",
        by_backend(&fresh)
    );
    let pinned = bed.run_client("c1", &["--sources", C1, "--connections", "16"]);
    assert_all_ok("pinned to the draining be3", &pinned, 16);
    assert_eq!(by_backend(&pinned).keys().collect::<Vec<_>>(), ["be3"]);
    let service = format!("{VIP}:80");
    for (what, client) in [("add", "10.99.2.0/24"), ("extend", "10.99.1.0/24")] {
        let (ok, text) = bed.cli(&[
            "affinity",
            what,
            "--service",
            &service,
            "--client",
            client,
            "--owner",
            "be3",
            "--duration",
            "1m",
        ]);
        assert!(!ok && text.contains("DRAINING"), "affinity {what}: {text}");
    }
    assert!(
        be3.child.try_wait().ok().flatten().is_none(),
        "be3 left with connections open"
    );
    let second = held.finish();
    assert_all_ok("held on be3 (second)", &second, 8);
    assert_held_stayed(&first, &second);
    wait_until("be3 to exit", Duration::from_secs(30), || {
        be3.child.try_wait().ok().flatten().is_some()
    });
    let status = be3.child.wait().expect("be3's exit status");
    assert!(
        status.success(),
        "be3 exited with {status}:\n{}",
        be3.tail()
    );
    assert!(
        be3.text().contains("BACKEND_STATE DOWN: OK"),
        "{}",
        be3.tail()
    );
    let list = bed.cli_ok(&["backend", "list", "--service", "web"]);
    assert!(
        list.lines()
            .any(|l| l.contains("be3") && l.contains(" down ")),
        "{list}"
    );
    println!(
        "sigterm: be3 drained (200 new connections on {:?}, 16 pinned ones still on be3, create and extend DRAINING), 8 held connections finished, be3 exited",
        by_backend(&fresh)
    );
}

/// Port the backends answer health checks on, on their own addresses.
const HEALTH_PORT: u16 = 9000;

/// A failed backend, found by pktdist's own health checks. The web service
/// is checked over HTTP every 500 ms (down after 2 failures, up after 2
/// passes) with an `affinity_grace` of 4 s; an owner application (the
/// Python client in be3's namespace) pins the c1 network to be3. be3's
/// server is killed: once it is down (fall x interval), every new
/// connection succeeds and none reaches be3, the pinned clients included;
/// after the grace the owner receives AFFINITY_ENDED BACKEND_DOWN. be3
/// started again takes connections once it is up (rise x interval).
fn a_dead_backend_is_checked_out_and_back_in(bed: &Bed) {
    let config = bed.logs.join("testbed-health.toml");
    let text = fs::read_to_string(repo().join("config/testbed.toml")).expect("testbed.toml");
    let checked = text.replacen(
        "max_affinity_duration = \"10m\"",
        &format!(
            "max_affinity_duration = \"10m\"\naffinity_grace = \"4s\"\n\
             health = {{ kind = \"http\", port = {HEALTH_PORT}, path = \"/healthz\", \
             interval = \"500ms\", timeout = \"300ms\", rise = 2, fall = 2 }}"
        ),
        1,
    );
    assert_ne!(checked, text, "the web service got its health checks");
    fs::write(&config, checked).expect("write the configuration");
    let _lb = bed.pktdist_with("lb-health", &config, &[]);
    let checked_backend = |name: &str| {
        let addr = BACKENDS.iter().find(|b| b.0 == name).expect("backend").1;
        let listen = format!("{addr}:{HEALTH_PORT}");
        bed.backend(name, &["--listen", &listen])
    };
    let _be1 = checked_backend("be1");
    let _be2 = checked_backend("be2");
    let be3 = checked_backend("be3");
    let state_of = |name: &str| -> String {
        let list = bed.cli_ok(&["backend", "list", "--service", "web"]);
        list.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .and_then(|l| l.split_whitespace().nth(5))
            .unwrap_or("?")
            .to_string()
    };
    // The first checks may fail (pktdist starts before the servers): wait
    // until every backend's checks have passed for a second.
    wait_until(
        "the web backends' checks to pass",
        Duration::from_secs(20),
        || {
            let stats = bed.stats();
            let checked = stats["extra"]["health"]["backends"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            checked.len() == 3
                && checked.iter().all(|b| {
                    b["state"] == "up" && b["seconds_in_state"].as_f64().unwrap_or(0.0) >= 1.0
                })
        },
    );

    // The owner: be3's application, a process of its own in be3's namespace.
    let owner_script = bed.logs.join("owner.py");
    fs::write(
        &owner_script,
        format!(
            "import pktdist\n\
             c = pktdist.Client('{CONTROL}', 'be3', pktdist.key_from_hex('{}'))\n\
             r = c.create('{VIP}:80', '10.99.1.0/24', duration=600)\n\
             print('created', r.remaining, flush=True)\n\
             for e in c.iter_ended(timeout=120):\n\
             \x20   print('ENDED', e.client, e.owner, e.reason_name, flush=True)\n",
            key_of("be3")
        ),
    )
    .expect("write the owner");
    // `env` execs python3: the child is the owner itself.
    let owner = bed.spawn(
        "be3",
        "owner",
        Path::new("env"),
        &[
            format!("PYTHONPATH={}", repo().join("clients/python/src").display()),
            "python3".into(),
            owner_script.display().to_string(),
        ],
    );
    wait_until("the owner's affinity", Duration::from_secs(10), || {
        owner.text().contains("created 600")
    });
    let pinned = bed.run_client("c1", &["--sources", C1, "--connections", "16"]);
    assert_all_ok("pinned to be3", &pinned, 16);
    assert_eq!(by_backend(&pinned).keys().collect::<Vec<_>>(), ["be3"]);

    // be3's server dies.
    be3.stop();
    // Down after two failed probes (about a second); the deadline only
    // guards against a hang on a loaded machine.
    wait_until("be3 down", Duration::from_secs(20), || {
        state_of("be3") == "down"
    });
    let fresh = bed.run_client("c2", &["--sources", C2, "--connections", "200"]);
    assert_all_ok("after be3 died", &fresh, 200);
    assert!(
        !by_backend(&fresh).contains_key("be3"),
        "the dead be3 got new connections: {:?}",
        by_backend(&fresh)
    );
    let moved = bed.run_client("c1", &["--sources", C1, "--connections", "40"]);
    assert_all_ok("be3's pinned clients", &moved, 40);
    assert!(
        !by_backend(&moved).contains_key("be3"),
        "{:?}",
        by_backend(&moved)
    );
    assert_eq!(state_of("be3"), "down");
    let list = bed.cli_ok(&["backend", "list", "--service", "web"]);
    assert!(
        list.lines()
            .any(|l| l.contains("be3") && l.contains("failing") && l.contains("connect")),
        "{list}"
    );
    wait_until(
        "AFFINITY_ENDED BACKEND_DOWN",
        Duration::from_secs(30),
        || owner.text().contains("ENDED 10.99.1.0/24 be3 BACKEND_DOWN"),
    );
    assert!(!bed.has_affinity("10.99.1.0/24", "be3"));
    let stats = bed.stats();
    assert_eq!(stats["services"][0]["backends"][2]["state"], "down");

    // be3 comes back.
    let _be3 = checked_backend("be3");
    wait_until("be3 up", Duration::from_secs(20), || {
        state_of("be3") == "up"
    });
    reach(bed, "be3");
    let spread = assert_weights_apply(bed, "be3 back");
    println!(
        "health: be3 killed, 200 new and 40 pinned connections on {:?} and {:?}, BACKEND_DOWN after the grace, back: {spread:?}",
        by_backend(&fresh),
        by_backend(&moved)
    );
}

/// be3's application pins the c1 network; removing be3 ends the affinity
/// (be3 is told BACKEND_REMOVED) and c1's connections go elsewhere; adding
/// be3 back does not bring the affinity back.
fn removing_a_backend_ends_its_affinities(bed: &Bed) {
    let _lb = bed.pktdist("lb-remove");
    let _be1 = bed.backend("be1", &[]);
    let _be2 = bed.backend("be2", &[]);
    let be3 = bed.backend(
        "be3",
        &[
            "--affinity-after",
            "1",
            "--affinity-prefix",
            "24",
            "--affinity-duration",
            "60s",
        ],
    );
    reach(bed, "be3");
    wait_until("be3's affinity", Duration::from_secs(10), || {
        bed.has_affinity("10.99.1.0/24", "be3")
    });
    bed.cli_ok(&["backend", "remove", "web", "be3"]);
    wait_until(
        "be3's BACKEND_REMOVED notice",
        Duration::from_secs(10),
        || {
            be3.text().contains(
                "AFFINITY_ENDED 10.99.1.0/24 on 10.99.100.1:80/tcp owner be3: BACKEND_REMOVED",
            )
        },
    );
    let list = bed.cli_ok(&["affinity", "list"]);
    assert!(!list.contains("be3"), "{list}");
    let conns = bed.run_client("c1", &["--sources", C1, "--connections", "100"]);
    assert_all_ok("after removal", &conns, 100);
    assert!(
        !by_backend(&conns).contains_key("be3"),
        "{:?}",
        by_backend(&conns)
    );
    let (_, addr, mac, weight) = BACKENDS[2];
    bed.cli_ok(&[
        "backend",
        "add",
        "web",
        "be3",
        "--addr",
        addr,
        "--mac",
        mac,
        "--weight",
        &weight.to_string(),
    ]);
    // Re-added be3 must not revive its ended affinity.
    let conns = assert_weights_apply(bed, "after re-adding");
    println!("remove: be3's affinity ended with it; after re-adding {conns:?}");
}

/// pktdist is killed (SIGKILL: all state lost) and started again while
/// clients open connections and others hold theirs open. With the same
/// backends, Maglev maps every connection as before, so the prediction is
/// that no connection is lost: every held connection finishes on its
/// backend, byte-exact, and every connection of the trickle completes (SYNs
/// sent during the gap are retransmitted by the clients' kernels). The
/// statically pinned client 10.99.2.8 is pinned again at start: its held
/// connection survives and its new connections reach its owner be1.
fn restart_mid_traffic_keeps_connections(bed: &Bed) {
    let lb = bed.pktdist("lb-restart-1");
    let _be = bed.backends();
    let mut held1 = bed.start_client(
        "c1",
        &["--hold", "--sources", C1, "--path", "/bytes/100000"],
    );
    let mut held2 = bed.start_client(
        "c2",
        &[
            "--hold",
            "--sources",
            "10.99.2.1-10.99.2.3,10.99.2.8",
            "--path",
            "/bytes/100000",
        ],
    );
    let mut first = held1.held();
    first.extend(held2.held());
    assert_all_ok("held before restart", &first, 12);
    let pinned_first = first
        .iter()
        .find(|c| c.src_ip() == PINNED)
        .expect("pinned client's connection");
    assert_eq!(pinned_first.backend.as_deref(), Some("be1"));

    let trickle = bed.start_client(
        "c2",
        &[
            "--sources",
            C2,
            "--connections",
            "400",
            "--until-released",
            "--concurrency",
            "4",
            "--pause-ms",
            "20",
            "--path",
            "/bytes/20000",
            // The gap may outlast SYN retransmits at 1, 3 and 7 s on a slow
            // machine; the kernel's next one, at 15 s, is in time.
            "--timeout",
            "30",
        ],
    );
    let new_connections = || {
        bed.stats()["services"][0]["new_connections"]
            .as_u64()
            .unwrap_or(0)
    };
    wait_until(
        "traffic through the first pktdist",
        Duration::from_secs(20),
        || new_connections() >= 40,
    );
    lb.stop();
    let _lb = bed.pktdist("lb-restart-2");
    wait_until(
        "traffic through the second pktdist",
        Duration::from_secs(40),
        || new_connections() >= 40,
    );

    let conns = trickle.finish();
    assert_trickle_ok("trickle across the restart", &conns, 400);
    let second = finish_all([held1, held2]);
    assert_all_ok("held across the restart", &second, 12);
    assert_held_stayed(&first, &second);
    let stats = bed.stats();
    assert!(
        stats["unknown_flows"].as_u64().unwrap_or(0) > 0,
        "the new pktdist never saw an established flow it did not know: {stats}"
    );
    let pinned = bed.run_client("c2", &["--sources", PINNED, "--connections", "30"]);
    assert_all_ok("pinned after restart", &pinned, 30);
    assert_eq!(by_backend(&pinned).keys().collect::<Vec<_>>(), ["be1"]);
    println!(
        "restart: {} connections across a restart and 12 held ones all completed; {} unknown \
         flows routed without state",
        conns.len(),
        stats["unknown_flows"]
    );
}

/// Path-MTU discovery through pktdist, with real kernel TCP. The client c3
/// sits behind the router r1, whose link to it has MTU 1400 while c3's own
/// side says 1500 (so c3 offers an MSS of 1460): a backend's full-size
/// replies (1500 bytes, DF) do not fit that link. r1 sends "fragmentation
/// needed" (MTU 1400) to their source, the VIP, that is to pktdist, which
/// forwards it to the backend of the connection (by IP-in-IP on :80, by MAC
/// on :8080); the backend's kernel lowers its path MTU to c3 and the 10 MB
/// download completes. Were the error dropped, the backend would keep
/// sending 1500-byte segments into the narrow link and the download would
/// stall (the client's read timeout, 10 s, would end it). Before each
/// download the backends forget what they learned, so each one needs the
/// router's error again.
fn path_mtu_discovery_through_pktdist(bed: &Bed) {
    let _lb = bed.pktdist("lb-pmtu");
    let _be = bed.backends();
    let forwarded = || bed.stats()["icmp"]["forwarded"].as_u64().unwrap_or(0);
    let router_errors = || {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns("r1"), "cat", "/proc/net/snmp"])
            .output()
            .expect("router's /proc/net/snmp");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let rows: Vec<Vec<&str>> = text
            .lines()
            .filter(|l| l.starts_with("Icmp:"))
            .map(|l| l.split_whitespace().collect())
            .collect();
        let col = rows[0]
            .iter()
            .position(|h| *h == "OutDestUnreachs")
            .expect("OutDestUnreachs column");
        rows[1][col].parse::<u64>().expect("a count")
    };
    for port in [80, 8080] {
        for (b, _, _, _) in BACKENDS {
            let st = Command::new("ip")
                .args(["-n", &ns(b), "route", "flush", "cache"])
                .status()
                .expect("ip route flush cache");
            assert!(st.success());
        }
        let (icmp_before, router_before) = (forwarded(), router_errors());
        let target = format!("{VIP}:{port}");
        let conns = bed.run_client(
            "c3",
            &[
                "--target",
                &target,
                "--sources",
                BEHIND,
                "--connections",
                "1",
                "--path",
                "/bytes/10000000",
                "--timeout",
                "10",
            ],
        );
        assert_all_ok(
            &format!("10 MB from :{port} behind the narrow link"),
            &conns,
            1,
        );
        assert_eq!(conns[0].bytes, 10_000_000);
        assert!(
            router_errors() > router_before,
            ":{port}: the router sent no \"fragmentation needed\""
        );
        assert!(
            forwarded() > icmp_before,
            ":{port}: pktdist forwarded no ICMP error"
        );
        // The backend that served the download learned the path MTU.
        let backend = conns[0].backend.clone().expect("backend named");
        let route = Command::new("ip")
            .args(["-n", &ns(&backend), "route", "get", BEHIND])
            .output()
            .expect("ip route get");
        let route = String::from_utf8_lossy(&route.stdout).to_string();
        assert!(
            route.contains(&format!("mtu {NARROW_MTU}")),
            ":{port}: {backend} did not learn the path MTU: {route}"
        );
        println!(
            "path MTU: 10 MB from :{port} via {backend} behind a {NARROW_MTU}-byte link; pktdist forwarded {} ICMP error(s)",
            forwarded() - icmp_before
        );
    }
}

/// config/testbed.toml with two workers: lb0 opened with `qpairs=2` (two
/// sockets in one PACKET_FANOUT group: the kernel hashes each flow to one),
/// the workers on both CPUs (worker 0 beside the control thread, so
/// `share_cpus`, and idle workers sleep), and the metrics on ctl0.
fn two_workers_config() -> String {
    let text = fs::read_to_string(repo().join("config/testbed.toml")).expect("testbed.toml");
    let mut out = text.clone();
    for (from, to) in [
        (
            "device = \"net_af_packet0,iface=lb0\"",
            "device = \"net_af_packet0,iface=lb0,qpairs=2\"",
        ),
        (
            "workers = [1]\n",
            "workers = [0, 1]\nshare_cpus = true\nidle_sleep = \"50us\"\n",
        ),
        (
            "status_interval = \"2s\"\n",
            "status_interval = \"2s\"\nmetrics_listen = \"10.99.0.1:9400\"\n",
        ),
    ] {
        assert_eq!(out.matches(from).count(), 1, "{from:?} in testbed.toml");
        out = out.replace(from, to);
    }
    out
}

/// Packets each worker received so far (`pktdist stats`).
fn worker_rx(bed: &Bed) -> Vec<u64> {
    bed.stats()["workers_detail"]
        .as_array()
        .expect("workers_detail")
        .iter()
        .map(|w| w["rx_packets"].as_u64().expect("rx_packets"))
        .collect()
}

/// What each worker received between two readings of [`worker_rx`].
fn grew(before: &[u64], after: &[u64]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

/// `GET /metrics` inside the distributor's namespace.
fn metrics() -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns("lb"), "curl", "-sf", "--max-time", "5"])
        .arg("http://10.99.0.1:9400/metrics")
        .output()
        .expect("run curl");
    assert!(out.status.success(), "GET /metrics failed");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn sample(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no sample {name}")) as u64
}

/// Per-worker counters add up to the totals, in `pktdist stats` and in
/// `/metrics` (each read at one instant; a stray frame on lb0 between the
/// reads of one document can make them differ, so they are read again
/// until they agree).
fn counters_add_up(bed: &Bed) {
    wait_until(
        "stats: per-worker counters sum to the totals",
        Duration::from_secs(20),
        || {
            let s = bed.stats();
            let detail = s["workers_detail"].as_array().expect("workers_detail");
            let sum = |k: &str| {
                detail
                    .iter()
                    .map(|w| w[k].as_u64().unwrap_or(0))
                    .sum::<u64>()
            };
            detail.len() == 2
                && sum("rx_packets") == s["rx_packets"].as_u64().unwrap_or(0)
                && sum("tx_packets") == s["tx_packets"].as_u64().unwrap_or(0)
        },
    );
    wait_until(
        "/metrics: per-worker counters sum to the totals",
        Duration::from_secs(20),
        || {
            let m = metrics();
            let w = |family: &str, i: u32| sample(&m, &format!("{family}{{worker=\"{i}\"}}"));
            w("pktdist_worker_received_packets_total", 0)
                + w("pktdist_worker_received_packets_total", 1)
                == sample(&m, "pktdist_received_packets_total")
                && w("pktdist_worker_transmitted_packets_total", 0)
                    + w("pktdist_worker_transmitted_packets_total", 1)
                    == sample(&m, "pktdist_transmitted_packets_total")
                && w("pktdist_worker_received_packets_total", 0) > 0
                && w("pktdist_worker_received_packets_total", 1) > 0
        },
    );
}

/// Two workers on the test bed, each owning one of lb0's two queue pairs,
/// the kernel's packet fan-out spreading the clients' flows over them by
/// hash: real kernel TCP end to end through both workers, with every
/// per-worker path in play.
#[test]
fn testbed_two_workers() {
    if let Some(why) = skip_reason(&["ethtool"]) {
        assert!(!required(), "the test bed must run in CI, but: {why}");
        println!("SKIP testbed_two_workers: {why}");
        return;
    }
    let _one_bed = bed_lock();
    let bed = Bed::up("two-workers");
    let config = bed.logs.join("testbed-two-workers.toml");
    fs::write(&config, two_workers_config()).expect("write config");
    let summary = bed.logs.join("two-workers-summary.json");
    let summary_arg = summary.display().to_string();
    let lb = bed.pktdist_with("lb-two-workers", &config, &["--summary-json", &summary_arg]);
    let log = lb.text();
    assert!(
        log.contains("2 queue(s), flows spread by the kernel's packet fan-out"),
        "{log}"
    );
    assert!(log.contains("WARN  [cores] share_cpus"), "{log}");

    two_workers_spread_flows_byte_exact(&bed);
    two_workers_meet_on_one_backend_under_auto_affinity(&bed);
    two_workers_honour_requested_affinities(&bed);
    two_workers_hot_reload(&bed, &config);
    two_workers_clean_stop(&bed, lb, &summary);
}

/// 1200 connections (one in ten with a 100 KB response) from 15 client
/// addresses: each worker receives at least a quarter of the packets, every
/// connection completes byte-exact, the weights hold, and no packet reached
/// a worker that did not know its flow (a flow never changes worker).
fn two_workers_spread_flows_byte_exact(bed: &Bed) {
    let _be = bed.backends();
    let before = worker_rx(bed);
    let args = |src: &'static str| {
        [
            "--sources",
            src,
            "--connections",
            "600",
            "--concurrency",
            "8",
            "--path",
            "/bytes/1000",
            "--large-every",
            "10",
            "--large",
            "100000",
        ]
    };
    let conns = finish_all([
        bed.start_client("c1", &args(C1)),
        bed.start_client("c2", &args(C2)),
    ]);
    assert_all_ok("two workers", &conns, 1200);
    assert_eq!(conns.iter().filter(|c| c.bytes == 100_000).count(), 120);
    let per_worker = grew(&before, &worker_rx(bed));
    let total: u64 = per_worker.iter().sum();
    for (w, n) in per_worker.iter().enumerate() {
        assert!(
            n * 4 >= total,
            "worker {w} received {n} of {total} packets: less than a quarter ({per_worker:?})"
        );
    }
    let counts = by_backend(&conns);
    assert_shares_follow_weights(&counts, conns.len());
    let stats = bed.stats();
    assert_eq!(
        stats["unknown_flows"].as_u64(),
        Some(0),
        "a packet reached a worker that did not know its flow: {stats}"
    );
    counters_add_up(bed);
    println!(
        "two workers: 1200 connections byte-exact, packets per worker {per_worker:?}, {counts:?}"
    );
}

/// The app service (:8080, automatic affinity): each of 15 clients opens 8
/// connections at once from 8 source ports. The kernel hashes each
/// connection to a worker on its own (all 8 of a client on one worker has
/// a chance of 1 in 128), so most clients' connections are split over both
/// workers, and the shared pin table brings each client's connections to
/// one backend.
fn two_workers_meet_on_one_backend_under_auto_affinity(bed: &Bed) {
    let _be = bed.backends();
    let before = worker_rx(bed);
    let hits_before = bed.stats()["services"][1]["auto_affinity_hits"]
        .as_u64()
        .unwrap_or(0);
    let target = format!("{VIP}:8080");
    let args = |src: &'static str| {
        vec![
            "--target".to_string(),
            target.clone(),
            "--sources".into(),
            src.into(),
            "--connections".into(),
            "8".into(),
            "--parallel".into(),
        ]
    };
    let (a1, a2) = (args(C1), args(C2));
    let conns = finish_all([
        bed.start_client("c1", &a1.iter().map(String::as_str).collect::<Vec<_>>()),
        bed.start_client("c2", &a2.iter().map(String::as_str).collect::<Vec<_>>()),
    ]);
    assert_all_ok("parallel, two workers", &conns, 15 * 8);
    let mut per_client: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for c in &conns {
        per_client
            .entry(c.src_ip().to_string())
            .or_default()
            .insert(c.backend.clone().unwrap_or_default());
    }
    for (client, backends) in &per_client {
        assert_eq!(
            backends.len(),
            1,
            "{client}'s parallel connections went to {backends:?}"
        );
    }
    let per_worker = grew(&before, &worker_rx(bed));
    assert!(per_worker.iter().all(|&n| n > 0), "{per_worker:?}");
    let hits = bed.stats()["services"][1]["auto_affinity_hits"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        hits >= hits_before + 15 * 7,
        "auto-affinity hits {hits_before} -> {hits}"
    );
    let used: BTreeSet<&String> = per_client.values().flatten().collect();
    println!("two workers, auto-affinity: 15 clients x 8, each on one backend ({used:?}), packets per worker {per_worker:?}");
}

/// be2's application pins 10.99.1.0/24 to itself: 100 connections from 8
/// addresses, spread over both workers, all reach be2; after the cancel
/// the weights apply again on both.
fn two_workers_honour_requested_affinities(bed: &Bed) {
    let _be1 = bed.backend("be1", &[]);
    let _be3 = bed.backend("be3", &[]);
    let be2 = bed.backend(
        "be2",
        &[
            "--affinity-after",
            "1",
            "--affinity-prefix",
            "24",
            "--affinity-duration",
            "60s",
        ],
    );
    reach(bed, "be2");
    wait_until(
        "be2's affinity for 10.99.1.0/24",
        Duration::from_secs(10),
        || bed.has_affinity("10.99.1.0/24", "be2"),
    );
    let before = worker_rx(bed);
    let pinned = bed.run_client(
        "c1",
        &[
            "--sources",
            C1,
            "--connections",
            "100",
            "--path",
            "/bytes/3000",
        ],
    );
    assert_all_ok("pinned, two workers", &pinned, 100);
    assert_eq!(by_backend(&pinned).keys().collect::<Vec<_>>(), ["be2"]);
    let per_worker = grew(&before, &worker_rx(bed));
    assert!(
        per_worker.iter().all(|&n| n > 0),
        "the pinned connections did not use both workers: {per_worker:?}"
    );
    bed.cli_ok(&[
        "affinity",
        "cancel",
        "--service",
        &format!("{VIP}:80"),
        "--client",
        "10.99.1.0/24",
        "--owner",
        "be2",
    ]);
    wait_until("be2's CANCELLED notice", Duration::from_secs(10), || {
        be2.text().contains("CANCELLED")
    });
    let free = assert_weights_apply(bed, "after cancel, two workers");
    println!("two workers, requested affinity: 100 connections to be2 ({per_worker:?} packets per worker); then {free:?}");
}

/// A reload while both workers forward a trickle of connections and hold
/// others open: be1's weight changes at once on both workers, every
/// connection of the trickle completes and the held ones stay on their
/// backends.
fn two_workers_hot_reload(bed: &Bed, config: &Path) {
    let _be = bed.backends();
    let mut held = bed.start_client(
        "c1",
        &["--hold", "--sources", C1, "--path", "/bytes/100000"],
    );
    let first = held.held();
    assert_all_ok("held before reload", &first, 8);
    let trickle = bed.start_client(
        "c2",
        &[
            "--sources",
            C2,
            "--connections",
            "300",
            "--until-released",
            "--concurrency",
            "4",
            "--pause-ms",
            "20",
            "--path",
            "/bytes/20000",
        ],
    );
    let new_connections = || bed.stats()["new_connections"].as_u64().unwrap_or(0);
    let before = new_connections();
    wait_until("the trickle under way", Duration::from_secs(20), || {
        new_connections() >= before + 30
    });
    let text = fs::read_to_string(config).expect("config");
    let from =
        "name = \"be1\"\naddress = \"10.99.10.1\"\nmac = \"02:50:44:00:10:01\"\nweight = 100\n";
    assert_eq!(text.matches(from).count(), 1, "be1 of web in the config");
    fs::write(
        config,
        text.replace(from, &from.replace("weight = 100", "weight = 400")),
    )
    .expect("rewrite config");
    let rx_at_reload = worker_rx(bed);
    bed.cli_ok(&["reload"]);
    let list = bed.cli_ok(&["backend", "list", "--service", "web"]);
    assert!(
        list.lines().any(|l| l.contains("be1") && l.contains("400")),
        "be1's new weight: {list}"
    );
    let at_reload = new_connections();
    wait_until(
        "the trickle after the reload",
        Duration::from_secs(20),
        || new_connections() >= at_reload + 30,
    );
    let conns = trickle.finish();
    assert_trickle_ok("trickle across the reload", &conns, 300);
    let second = held.finish();
    assert_all_ok("held across the reload", &second, 8);
    assert_held_stayed(&first, &second);
    let per_worker = grew(&rx_at_reload, &worker_rx(bed));
    assert!(
        per_worker.iter().all(|&n| n > 0),
        "after the reload: {per_worker:?}"
    );
    counters_add_up(bed);
    println!(
        "two workers, reload: be1 at weight 400, {} connections and 8 held ones across it; \
         packets per worker after it {per_worker:?}",
        conns.len()
    );
}

/// SIGTERM while both workers forward: pktdist stops cleanly within the
/// limit, and its summary counts both workers, their counters adding up.
fn two_workers_clean_stop(bed: &Bed, lb: Proc, summary: &Path) {
    let _be = bed.backends();
    let trickle = bed.start_client(
        "c2",
        &[
            "--sources",
            C2,
            "--connections",
            "2000",
            "--concurrency",
            "8",
            "--pause-ms",
            "5",
            "--path",
            "/bytes/20000",
        ],
    );
    let before = worker_rx(bed);
    wait_until("both workers busy", Duration::from_secs(20), || {
        grew(&before, &worker_rx(bed)).iter().all(|&n| n > 100)
    });
    let status = lb.terminate(Duration::from_secs(30));
    drop(trickle);
    assert!(status.success(), "pktdist's exit after SIGTERM: {status}");
    let s: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(summary).expect("summary JSON"))
            .expect("summary parses");
    assert_eq!(s["workers"].as_u64(), Some(2));
    let detail = s["workers_detail"].as_array().expect("workers_detail");
    let sum = |k: &str| {
        detail
            .iter()
            .map(|w| w[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert_eq!(sum("rx_packets"), s["rx_packets"].as_u64().unwrap_or(0));
    assert_eq!(sum("tx_packets"), s["tx_packets"].as_u64().unwrap_or(0));
    assert!(detail
        .iter()
        .all(|w| w["rx_packets"].as_u64().unwrap_or(0) > 0));
    println!(
        "two workers, clean stop: {status}, packets per worker {:?}",
        detail
            .iter()
            .map(|w| w["rx_packets"].as_u64().unwrap_or(0))
            .collect::<Vec<_>>()
    );
}
