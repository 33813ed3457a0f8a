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
//! 3. the shared table (etcd): an affinity made at A holds for the pinned
//!    client's connections through both;
//! 4. instance A stopped (SIGTERM) while 128 connections are held open and
//!    new ones trickle in: its route is withdrawn (the run prints how long
//!    it took), the trickle's connections go on through B and every one
//!    succeeds, and the held ones (scheduled, not pinned) finish a 100 KB
//!    transfer on their backend through B;
//! 5. A started again: it loads the shared table, is announced once ready,
//!    and takes traffic again;
//! 6. a backend stopped gracefully (SIGTERM: its application declares
//!    DRAIN at A, the instance it talks to) gets no new connection through
//!    either instance, every connection succeeds, and it exits once its
//!    own are done.
//!
//! Needs root, BIRD 2 (`bird`, `birdc`) and etcd; elsewhere it prints a
//! SKIP line and passes, except under scripts/test.sh or CI (`required`). The bed's namespace
//! prefix is `pdx`; run it under `flock /tmp/testbed.lock` on a shared
//! machine. Logs stay in `$TMPDIR/pktdist-testbed-ecmp-<pid>/` on failure.
#![cfg(feature = "dpdk")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::testbed::{
    after_down, assert_all_ok, assert_trickle_ok, examples, finish_all, kernel_has_ipip, repo,
    required, run_client, skip_reason, start_backend, wait_until, Conn, Proc, Running, C1, C2, VIP,
};
use common::ADMIN_KEY;

const PREFIX: &str = "pdx";
/// c2's network, pinned through the shared table.
const PINNED: &str = "10.99.2.0/24";
/// The instances' control addresses (scripts/testbed.sh lb_ctl_ip) and
/// next hops (lb_data_ip).
const CONTROL: [&str; 2] = ["10.99.0.1", "10.99.0.3"];
const NEXT_HOP: [&str; 2] = ["10.99.0.2", "10.99.0.4"];

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
        bed.decap = !kernel_has_ipip(&ns("be1"));
        bed
    }

    /// Starts a process in namespace `netns` (whole), output to `log`.
    fn spawn(&self, netns: &str, log: &str, program: &Path, args: &[String]) -> Proc {
        let path = self.logs.join(format!("{log}.log"));
        Proc::spawn(netns, log, path, program, args)
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
        p.await_ready(
            &format!("instance {i} ready"),
            Duration::from_secs(30),
            |_| self.ready(i),
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
                    // Stopped, it stays draining a while before DOWN.
                    "--drain-quiet".into(),
                    "4s".into(),
                ];
                if self.decap {
                    args.push("--decap".into());
                }
                let log = self.logs.join(format!("{name}.log"));
                start_backend(&self.server, &ns(&name), &name, log, &args)
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

    /// `pktdist backend list` of the web service at instance i.
    fn backend_list(&self, i: usize) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &lb_ns(i)])
            .arg(env!("CARGO_BIN_EXE_pktdist"))
            .args(["backend", "list", "--service", "web"])
            .args(["--server", &format!("{}:7400", CONTROL[i])])
            .args(["--key", ADMIN_KEY])
            .output()
            .expect("run pktdist backend list");
        assert!(
            out.status.success(),
            "pktdist backend list at instance {i}: {}",
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
            .args(["--key", ADMIN_KEY, "--timeout", "2s"])
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
        run_client(&self.client, &ns(netns), args)
    }

    fn start_client(&self, netns: &str, args: &[&str]) -> Running {
        Running::start(&self.client, &ns(netns), args)
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
        after_down(&self.script(&["down"]), &self.logs);
    }
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
    if let Some(why) = skip_reason(&["ethtool", "bird", "birdc", "etcd"]) {
        assert!(!required(), "the ECMP test bed must run in CI, but: {why}");
        println!("SKIP testbed_ecmp_two_instances: {why}");
        return;
    }
    let started = Instant::now();
    let bed = Bed::up();
    let mut be = bed.backends();
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
        let conns = finish_all([
            bed.start_client("c1", &args(C1)),
            bed.start_client("c2", &args(C2)),
        ]);
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
        Duration::from_secs(20),
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
            "--until-released",
            "--concurrency",
            "4",
            "--pause-ms",
            "20",
            "--path",
            "/bytes/20000",
        ],
    );
    let before_trickle = [bed.new_connections(0, None), bed.new_connections(1, None)];
    wait_until("the trickle under way", Duration::from_secs(20), || {
        bed.new_connections(0, None) + bed.new_connections(1, None)
            >= before_trickle[0] + before_trickle[1] + 20
    });
    let stop = Instant::now();
    println!("SIGTERM to A at {}", utc_now());
    a.sigterm();
    // The wait bounds a hang, not a time: the run prints how long it took.
    let withdrawn = bed.await_next_hops(&NEXT_HOP[1..], Duration::from_secs(20));
    let at_withdrawal = bed.new_connections(1, None);
    let st = a.wait_exit(Duration::from_secs(30));
    let exited = stop.elapsed();
    assert!(st.success(), "instance A's exit after SIGTERM: {st}");
    // The trickle goes on until B has taken new connections since the
    // withdrawal.
    wait_until(
        "new connections through B after A's route was withdrawn",
        Duration::from_secs(20),
        || bed.new_connections(1, None) > at_withdrawal + 20,
    );
    let conns = trickle.finish();
    assert_trickle_ok("new connections across the switch", &conns, 200);
    let through_b = bed.new_connections(1, None) - at_withdrawal;
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
         {exited:?}); {} new connections ({through_b} through B after the withdrawal), 128 \
         held ({held_on_a} through A) \
         finished byte-exact on their backends; B picked up {moved} packets of flows it had \
         not seen",
        conns.len()
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
    let announced = bed.await_next_hops(&NEXT_HOP, Duration::from_secs(20));
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
    println!("ecmp, A back: announced {announced:?} after ready, per instance {taken:?}");

    // 6. be1 stops gracefully: on SIGTERM its application declares DRAIN
    // at A, the one instance it talks to. Through etcd B drains it too, so
    // no new connection through either instance reaches it, and it exits
    // (declaring DOWN) once its own connections are done.
    let be1 = be.remove(0);
    let be1_log = be1.log.clone();
    be1.sigterm();
    wait_until("be1 to declare DRAIN", Duration::from_secs(10), || {
        fs::read_to_string(&be1_log).is_ok_and(|t| t.contains("BACKEND_STATE DRAIN: OK"))
    });
    wait_until("B to list be1 draining", Duration::from_secs(20), || {
        bed.backend_list(1)
            .lines()
            .any(|l| l.contains("be1") && l.contains("draining") && l.contains("DRAIN"))
    });
    let mut conns = Vec::new();
    let taken = per_instance(&bed, None, || {
        conns = bed.run_client("c1", &["--sources", C1, "--connections", "200"]);
    });
    assert_all_ok("be1 stopping", &conns, 200);
    assert!(taken.iter().all(|&n| n > 0), "{taken:?}");
    let on_be1 = conns
        .iter()
        .filter(|c| c.backend.as_deref() == Some("be1"))
        .count();
    assert_eq!(on_be1, 0, "new connections reached the stopping be1");
    let st = be1.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "be1's exit after SIGTERM: {st}");
    let log = fs::read_to_string(&be1_log).unwrap_or_default();
    assert!(log.contains("BACKEND_STATE DOWN: OK"), "{log}");
    wait_until("B to list be1 down", Duration::from_secs(20), || {
        bed.backend_list(1)
            .lines()
            .any(|l| l.contains("be1") && l.contains("down"))
    });
    println!(
        "ecmp, be1 stopped at A: drained at B too, 200 new connections none on be1, per \
         instance {taken:?}; whole run {:?}",
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
            !required(),
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
