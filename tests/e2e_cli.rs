//! The `pktdist` command line end to end: `check` on good and bad
//! configurations, and the `affinity` and `backend` subcommands against a
//! running instance (real DPDK, a `net_ring` port), checking what they print
//! and their exit codes.
#![cfg(feature = "dpdk")]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};

use common::{
    base_config, path_str, port_toml, serial, web_service, Pktdist, TempDir, ADMIN_KEY, PKTDIST,
};

fn config_text() -> String {
    [
        base_config(&["be1", "be2"]),
        port_toml("net_ring0"),
        web_service(
            "",
            &[
                ("be1", "10.0.0.1", Some(100)),
                ("be2", "10.0.0.2", Some(200)),
            ],
        ),
        "\n[[affinities]]\nservice = \"web\"\nclient = \"203.0.113.0/24\"\nbackend = \"be2\"\n"
            .into(),
    ]
    .concat()
}

fn pktdist(args: &[&str]) -> Output {
    Command::new(PKTDIST)
        .args(args)
        .output()
        .expect("run pktdist")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// 1-based line of the first line containing `pat`.
fn line_of(text: &str, pat: &str) -> usize {
    text.lines()
        .position(|l| l.contains(pat))
        .unwrap_or_else(|| panic!("{pat:?} not in the configuration"))
        + 1
}

/// `pktdist check` refuses `text` (a one-line edit of the good
/// configuration) naming the file, the line of `at`, the key and `why`.
fn check_refuses(dir: &TempDir, name: &str, text: &str, at: &str, key: &str, why: &str) {
    let path = dir.path(name);
    std::fs::write(&path, text).expect("write");
    let out = pktdist(&["check", "--config", path_str(&path)]);
    let err = text_of(&out);
    assert!(!out.status.success(), "{name}: accepted\n{err}");
    let want_at = format!("{}:{}:", path.display(), line_of(text, at));
    assert!(err.contains(&want_at), "{name}: no {want_at:?} in {err:?}");
    assert!(err.contains(key), "{name}: no key {key:?} in {err:?}");
    assert!(err.contains(why), "{name}: no {why:?} in {err:?}");
}

fn text_of(out: &Output) -> String {
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

#[test]
fn check_accepts_a_good_configuration_and_locates_errors() {
    let dir = TempDir::new("e2e-check");
    let good = config_text();
    let path = dir.path("good.toml");
    std::fs::write(&path, &good).expect("write");
    let out = pktdist(&["check", "--config", path_str(&path)]);
    assert!(out.status.success(), "{}", text_of(&out));
    let plan = text(&out.stdout);
    assert!(plan.contains("be1 10.0.0.1"), "{plan}");
    assert!(plan.contains("192.0.2.10"), "{plan}");
    assert!(
        plan.contains("backends may pin /16 or longer, at most 4096 affinities each"),
        "{plan}"
    );

    check_refuses(
        &dir,
        "twice.toml",
        &good.replace("workers = [1]", "workers = [1, 1]"),
        "workers = [1, 1]",
        "cores.workers[1]",
        "listed twice",
    );
    check_refuses(
        &dir,
        "weight.toml",
        &good.replace("weight = 100", "weight = 70000"),
        "weight = 70000",
        "services[0].backends[0].weight",
        "out of range",
    );
    check_refuses(
        &dir,
        "family.toml",
        &good.replace("address = \"10.0.0.2\"", "address = \"2001:db8::2\""),
        "2001:db8::2",
        "services[0].backends[1].address",
        "IPv6",
    );
    check_refuses(
        &dir,
        "min_prefix.toml",
        &good.replace(
            "ipip_source = \"198.51.100.1\"",
            "ipip_source = \"198.51.100.1\"\nmin_prefix = { ipv4 = 40 }",
        ),
        "min_prefix",
        "services[0].min_prefix.ipv4",
        "longer than an address",
    );
    check_refuses(
        &dir,
        "rate.toml",
        &good.replace(
            "status_interval = \"1s\"",
            "status_interval = \"1s\"\nmax_requests_per_second = 20000000",
        ),
        "max_requests_per_second",
        "control.max_requests_per_second",
        "out of range",
    );
    check_refuses(
        &dir,
        "unknown.toml",
        &good.replace("weight = 200", "weight = 200\ncolour = \"blue\""),
        "colour",
        "colour",
        "unknown",
    );

    let missing = dir.path("missing.toml");
    let out = pktdist(&["check", "--config", path_str(&missing)]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("missing.toml"),
        "{}",
        text_of(&out)
    );
}

/// Runs a control subcommand as `admin` against `server`.
fn admin(server: SocketAddr, args: &[&str]) -> Output {
    let server = server.to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend_from_slice(&["--server", &server, "--key", ADMIN_KEY, "--timeout", "2s"]);
    pktdist(&all)
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed:\n{}", text_of(&out));
    text(&out.stdout)
}

fn refused(out: Output, what: &str) -> String {
    assert!(
        !out.status.success(),
        "{what} succeeded:\n{}",
        text_of(&out)
    );
    text(&out.stderr)
}

/// The row of `table` whose cells include all of `cells`.
fn row<'a>(table: &'a str, cells: &[&str]) -> Option<&'a str> {
    table.lines().find(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        cells.iter().all(|c| words.contains(c))
    })
}

#[test]
fn affinity_and_backend_commands_against_a_running_instance() {
    let _serial = serial();
    let dir = TempDir::new("e2e-cli");
    let config = dir.path("pktdist.toml");
    std::fs::write(&config, config_text()).expect("write");
    let (run, server) = Pktdist::run(Path::new(&config));
    // Without a state file (and without [cluster]) it says so at start.
    assert!(
        run.stderr_text()
            .contains("requested affinities are kept in memory only"),
        "{}",
        run.stderr_text()
    );

    let target = ["--service", "192.0.2.10:80", "--client", "198.51.100.0/24"];
    let add = |owner: &str, duration: &str| {
        let mut a = vec!["affinity", "add"];
        a.extend_from_slice(&target);
        a.extend_from_slice(&["--owner", owner, "--duration", duration]);
        admin(server, &a)
    };

    // Only the static affinity at first.
    let list = ok(admin(server, &["affinity", "list"]), "affinity list");
    assert!(
        row(&list, &["203.0.113.0/24", "be2", "static"]).is_some(),
        "{list}"
    );
    assert!(list.contains("1 affinities"), "{list}");

    let out = ok(add("be1", "5m"), "affinity add");
    assert!(out.starts_with("OK"), "{out}");
    let list = ok(admin(server, &["affinity", "list"]), "affinity list");
    assert!(row(&list, &["198.51.100.0/24", "be1"]).is_some(), "{list}");
    assert!(list.contains("2 affinities"), "{list}");
    let only = ok(
        admin(server, &["affinity", "list", "--owner", "be1"]),
        "affinity list --owner",
    );
    assert!(only.contains("1 affinities"), "{only}");

    // Another owner for the same key: CONFLICT naming the owner, exit 1.
    let err = refused(add("be2", "5m"), "conflicting add");
    assert!(err.contains("CONFLICT") && err.contains("be1"), "{err}");

    // Beyond the service's maximum (default 1h): INVALID.
    let err = refused(add("be1", "2h"), "overlong add");
    assert!(err.contains("INVALID"), "{err}");

    let mut ext = vec!["affinity", "extend"];
    ext.extend_from_slice(&target);
    ext.extend_from_slice(&["--owner", "be1", "--duration", "10m"]);
    let out = ok(admin(server, &ext), "affinity extend");
    assert!(out.starts_with("OK"), "{out}");

    let mut cancel = vec!["affinity", "cancel"];
    cancel.extend_from_slice(&target);
    cancel.extend_from_slice(&["--owner", "be1"]);
    let out = ok(admin(server, &cancel), "affinity cancel");
    assert!(out.starts_with("OK"), "{out}");
    let err = refused(admin(server, &cancel), "second cancel");
    assert!(err.contains("NOT_FOUND"), "{err}");
    let list = ok(admin(server, &["affinity", "list"]), "affinity list");
    assert!(row(&list, &["198.51.100.0/24"]).is_none(), "{list}");

    // Backends: list, drain, refuse unknown names and non-admins.
    let list = ok(admin(server, &["backend", "list"]), "backend list");
    assert!(
        row(&list, &["web", "be1", "10.0.0.1", "100", "up"]).is_some(),
        "{list}"
    );
    assert!(
        row(&list, &["web", "be2", "10.0.0.2", "200", "up"]).is_some(),
        "{list}"
    );
    ok(
        admin(server, &["backend", "set-weight", "web", "be2", "0"]),
        "set-weight",
    );
    let list = ok(
        admin(server, &["backend", "list", "--service", "web"]),
        "backend list",
    );
    assert!(row(&list, &["be2", "0", "draining"]).is_some(), "{list}");
    let err = refused(
        admin(server, &["backend", "set-weight", "web", "nosuch", "5"]),
        "set-weight of an unknown backend",
    );
    assert!(err.contains("NOT_FOUND"), "{err}");
    let be1_key = common::backend_key_hex("be1");
    let out = pktdist(&[
        "backend",
        "set-weight",
        "web",
        "be1",
        "7",
        "--server",
        &server.to_string(),
        "--name",
        "be1",
        "--key",
        &be1_key,
    ]);
    let err = refused(out, "set-weight by a backend");
    assert!(err.contains("NOT_AUTHORIZED"), "{err}");

    // Drain and undrain: the operator's, then the backend's own state.
    ok(admin(server, &["backend", "drain", "web", "be1"]), "drain");
    let list = ok(admin(server, &["backend", "list"]), "backend list");
    assert!(
        row(&list, &["be1", "draining", "UP", "DRAIN"]).is_some(),
        "{list}"
    );
    ok(
        admin(server, &["backend", "undrain", "web", "be1"]),
        "undrain",
    );
    let as_be1 = |args: &[&str]| {
        let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        a.extend([
            "--server".to_string(),
            server.to_string(),
            "--name".to_string(),
            "be1".to_string(),
            "--key".to_string(),
            be1_key.clone(),
        ]);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        pktdist(&refs)
    };
    ok(
        as_be1(&["backend", "state", "web", "be1", "down"]),
        "state down by be1 itself",
    );
    let list = ok(admin(server, &["backend", "list"]), "backend list");
    assert!(
        row(&list, &["be1", "down", "DOWN", "UP"]).is_some(),
        "{list}"
    );
    let err = refused(
        as_be1(&["backend", "drain", "web", "be2"]),
        "drain of another backend by be1",
    );
    assert!(err.contains("NOT_AUTHORIZED"), "{err}");
    ok(
        as_be1(&["backend", "state", "web", "be1", "up"]),
        "state up by be1 itself",
    );
    let list = ok(admin(server, &["backend", "list"]), "backend list");
    assert!(row(&list, &["web", "be1", "100", "up"]).is_some(), "{list}");
    let err = refused(
        admin(server, &["backend", "state", "web", "be1", "sideways"]),
        "a state that is none",
    );
    assert!(err.contains("up, drain or down"), "{err}");

    // A wrong key gets no answer: a clear error and exit 1.
    let out = pktdist(&[
        "affinity",
        "list",
        "--server",
        &server.to_string(),
        "--key",
        &"ab".repeat(32),
        "--timeout",
        "200ms",
    ]);
    let err = refused(out, "wrong key");
    assert!(err.contains("no reply"), "{err}");

    let done = run.stop(std::time::Duration::from_secs(10));
    assert!(done.status.success(), "{}", done.stderr);
    assert!(done.stdout.contains("pktdist summary"), "{}", done.stdout);
}

/// docs/PROTOCOL.md §5: an affinity's key is normalized, so a range of one
/// port is that one port (listed back as ONE) and the full range is ANY;
/// either way the equal key is the same affinity. §6.5: a service the
/// distributor does not have is NOT_FOUND.
#[test]
fn port_ranges_are_listed_back_normalized_and_unknown_services_are_not_found() {
    let _serial = serial();
    let dir = TempDir::new("e2e-cli-ports");
    let config = dir.path("pktdist.toml");
    std::fs::write(&config, config_text()).expect("write");
    let (run, server) = Pktdist::run(Path::new(&config));

    let affinity = |verb: &str, client: &str, ports: &str, extra: &[&str]| {
        let mut a = vec![
            "affinity",
            verb,
            "--service",
            "192.0.2.10:80",
            "--client",
            client,
            "--ports",
            ports,
            "--owner",
            "be1",
        ];
        a.extend_from_slice(extra);
        admin(server, &a)
    };
    ok(
        affinity("add", "198.51.100.1", "1000-1000", &["--duration", "5m"]),
        "add 1000-1000",
    );
    ok(
        affinity("add", "198.51.100.2", "0-65535", &["--duration", "5m"]),
        "add 0-65535",
    );
    let list = ok(admin(server, &["affinity", "list"]), "affinity list");
    assert!(
        row(&list, &["198.51.100.1/32", "1000", "be1"]).is_some(),
        "{list}"
    );
    assert!(!list.contains("1000-1000"), "{list}");
    assert!(
        row(&list, &["198.51.100.2/32", "any", "be1"]).is_some(),
        "{list}"
    );
    assert!(!list.contains("0-65535"), "{list}");
    // The same keys written the other way: the same affinities.
    ok(
        affinity("cancel", "198.51.100.1", "1000", &[]),
        "cancel port 1000",
    );
    ok(affinity("cancel", "198.51.100.2", "any", &[]), "cancel any");
    let list = ok(admin(server, &["affinity", "list"]), "affinity list");
    assert!(row(&list, &["be1"]).is_none(), "{list}");

    let err = refused(
        admin(
            server,
            &[
                "affinity",
                "add",
                "--service",
                "192.0.2.99:80",
                "--client",
                "198.51.100.1",
                "--owner",
                "be1",
                "--duration",
                "5m",
            ],
        ),
        "add on an unknown service",
    );
    assert!(err.contains("NOT_FOUND"), "{err}");
    let err = refused(
        admin(server, &["affinity", "list", "--service", "192.0.2.99:80"]),
        "list of an unknown service",
    );
    assert!(err.contains("NOT_FOUND"), "{err}");

    let done = run.stop(std::time::Duration::from_secs(10));
    assert!(done.status.success(), "{}", done.stderr);
}

/// `pktdist status` asks a running instance's `GET /ready`: ready (exit 0)
/// once it serves; exit 1 when nothing answers.
#[test]
fn status_says_ready_once_serving() {
    let _one = serial();
    let dir = TempDir::new("e2e-status");
    let metrics = {
        // A port free now, for the instance to take.
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let path = dir.path("status.toml");
    std::fs::write(
        &path,
        config_text().replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:0\"\nmetrics_listen = \"{metrics}\""),
        ),
    )
    .expect("write");
    let (p, _control) = Pktdist::run(&path);
    let ready = common::poll_until(std::time::Duration::from_secs(10), || {
        let out = pktdist(&["status", "--config", path_str(&path)]);
        out.status.success().then_some(out)
    })
    .unwrap_or_else(|| panic!("never ready\n{}", p.stderr_text()));
    assert_eq!(text(&ready.stdout), "ready\n");
    let f = p.stop(std::time::Duration::from_secs(10));
    assert!(f.status.success(), "{}", f.stderr);
    let out = pktdist(&["status", "--metrics", &metrics.to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(
        text(&out.stderr).contains("cannot ask"),
        "{}",
        text_of(&out)
    );
}

/// Tables larger than the machine's free memory stop `pktdist run` at once
/// with what each takes and the keys that size them, before EAL or any
/// table is allocated.
#[test]
fn tables_beyond_the_machine_memory_are_refused_at_start() {
    let dir = TempDir::new("e2e-memory");
    let path = dir.path("huge.toml");
    // 2^30 affinities: some 68 GiB of table.
    let (text, need) = with_affinity_capacity(1 << 30);
    match pktdist::run::memory::available() {
        Some(free) if free.bytes < need => {}
        free => {
            // A machine that holds them would start: nothing to see here.
            eprintln!("skipped: {free:?} bytes available, the tables need {need}");
            return;
        }
    }
    std::fs::write(&path, text).expect("write");
    // Bounded, should the check let it start after all.
    let out = pktdist(&bounded_run(&path));
    refused_for_memory(&out);
}

/// The arguments of a `pktdist run` of `path` for two seconds at most.
fn bounded_run(path: &Path) -> [&str; 6] {
    [
        "run",
        "--config",
        path_str(path),
        "--quiet",
        "--duration",
        "2",
    ]
}

/// The test configuration with `[affinity] capacity` set to `capacity`,
/// and the bytes its tables need.
fn with_affinity_capacity(capacity: usize) -> (String, usize) {
    let text = config_text().replacen(
        "[affinity]\ncapacity = 4096\n",
        &format!("[affinity]\ncapacity = {capacity}\n"),
        1,
    );
    assert_ne!(text, config_text());
    let cfg = pktdist::config::Config::parse(&text, "t.toml").expect("valid");
    (text, pktdist::run::memory::TableMemory::of(&cfg).total())
}

/// Asserts that `pktdist run` stopped, before EAL, on the tables' memory,
/// naming the key that sizes the affinity table; returns its output.
fn refused_for_memory(out: &Output) -> String {
    let err = text_of(out);
    assert!(!out.status.success(), "started:\n{err}");
    assert!(out.status.code().is_some(), "killed, not refused:\n{err}");
    assert!(
        err.contains("the tables need") && err.contains("[affinity] capacity"),
        "{err}"
    );
    assert!(!err.contains("EAL"), "EAL started first:\n{err}");
    err
}

/// A memory cgroup made for a test, limited to `bytes`, removed on drop;
/// None where the machine has no memory controller this process may
/// write to (v1's, or v2's with `memory` in its root's subtree control).
struct MemoryCgroup {
    dir: std::path::PathBuf,
}

impl MemoryCgroup {
    fn new(name: &str, bytes: u64) -> Option<MemoryCgroup> {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let (dir, limit) = if v1.join("memory.limit_in_bytes").exists() {
            (v1.join(name), "memory.limit_in_bytes")
        } else {
            let root = Path::new("/sys/fs/cgroup");
            let control = std::fs::read_to_string(root.join("cgroup.subtree_control")).ok()?;
            if !control.split_whitespace().any(|c| c == "memory") {
                return None;
            }
            (root.join(name), "memory.max")
        };
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).ok()?;
        let cg = MemoryCgroup { dir };
        std::fs::write(cg.dir.join(limit), bytes.to_string()).ok()?;
        Some(cg)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// In a memory cgroup limited below what the tables need, on a machine
/// whose free memory holds them, `pktdist run` is refused as on a machine
/// too small: the cgroup's room is what counts, not the machine's (it
/// would be killed by the cgroup's OOM killer halfway through its start).
#[test]
fn tables_beyond_a_cgroup_memory_limit_are_refused_at_start() {
    let dir = TempDir::new("e2e-cgroup-memory");
    let path = dir.path("big.toml");
    let (text, need) = with_affinity_capacity(1 << 23);
    let limit: u64 = 256 << 20;
    assert!(need as u64 > 2 * limit, "{need}");
    let free = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            let l = t.lines().find(|l| l.starts_with("MemAvailable:"))?;
            l.split_whitespace().nth(1)?.parse::<usize>().ok()
        })
        .map(|kib| kib * 1024);
    if free.is_none_or(|f| f < 2 * need) {
        eprintln!("skipped: {free:?} bytes available, not twice the {need} the tables need");
        return;
    }
    let name = format!("pktdist-e2e-{}", std::process::id());
    let Some(cg) = MemoryCgroup::new(&name, limit) else {
        assert!(
            !common::testbed::required(),
            "no memory cgroup can be made here, and test beds are required"
        );
        eprintln!("skipped: no memory cgroup can be made here");
        return;
    };
    std::fs::write(&path, text).expect("write");
    // Bounded, should the check let it start after all.
    let procs = cg.dir.join("cgroup.procs");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {} || exit 97; exec \"$0\" \"$@\"",
            procs.display()
        ))
        .arg(PKTDIST)
        .args(bounded_run(&path))
        .output()
        .expect("run pktdist in the cgroup");
    if out.status.code() == Some(97) {
        assert!(
            !common::testbed::required(),
            "this process may not move a process into the cgroup, and test beds are required"
        );
        eprintln!("skipped: this process may not move a process into the cgroup");
        return;
    }
    let err = refused_for_memory(&out);
    let available: u64 = err
        .split(" MiB of memory are available")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no available figure in:\n{err}"));
    assert!(available <= limit >> 20, "{available} MiB:\n{err}");
    assert!(
        err.contains("(under the limit of the memory cgroup pktdist runs in)"),
        "{err}"
    );
}
