//! The checker against real sockets on the loopback: HTTP servers that
//! answer well, with a wrong status, with garbage, never, or close at once;
//! a refused port; a listener whose backlog is full (its SYNs go
//! unanswered: a timeout). And the monitor following reloads.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use super::target::{CheckSpec, HttpCheck, Target};
use super::{HealthChange, HealthChecker, HealthMonitor, ProbeResult, Report};
use crate::config::{Config, HealthKind};

/// How a test server treats a connection.
#[derive(Clone, Copy, Debug)]
enum Behaviour {
    /// Reads the request, answers this status line.
    Answer(&'static str),
    /// Accepts and never answers (the connection held open).
    Silent,
    /// Accepts and closes at once.
    Close,
}

/// A server on 127.0.0.1 run by a thread until dropped.
struct Server {
    addr: SocketAddr,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(ip: &str, how: Behaviour) -> Server {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        Server::on(listener, how)
    }

    fn on(listener: TcpListener, how: Behaviour) -> Server {
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (Arc::clone(&stop), Arc::clone(&accepted));
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                match how {
                    Behaviour::Answer(line) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        let mut req = Vec::new();
                        let mut buf = [0u8; 512];
                        while !req.ends_with(b"\r\n\r\n") {
                            match s.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        let _ = s.write_all(line.as_bytes());
                    }
                    Behaviour::Silent => held.push(s),
                    Behaviour::Close => drop(s),
                }
            }
        });
        Server {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An address nothing listens on, kept so while this lives: a socket
/// bound to it, not listening. No other test's listener can take the port,
/// and no connection from that address picks it as its own port (which,
/// when a connect to a free local port chooses that very port, connects
/// the socket to itself and succeeds). A connect to it is refused.
struct Refused {
    addr: SocketAddr,
    held: Socket,
}

impl Refused {
    /// `ip`'s `port` (0: any free one) held, if it is free.
    fn hold(ip: &str, port: u16) -> Option<Refused> {
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let held = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        held.bind(&addr.into()).ok()?;
        let addr = held.local_addr().unwrap().as_socket().unwrap();
        Some(Refused { addr, held })
    }

    /// Listening on the address after all.
    fn listen(self) -> TcpListener {
        self.held.listen(128).unwrap();
        self.held.into()
    }
}

/// A port on 127.0.0.1 nobody listens on.
fn refused_port() -> Refused {
    Refused::hold("127.0.0.1", 0).unwrap()
}

/// A listener with a backlog of 0 that never accepts, its queue filled: the
/// kernel drops further SYNs, so a connect gets no answer. Returns it and
/// the connection that fills it (both kept for the test).
fn full_backlog() -> (Socket, TcpStream) {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let filler = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    (s, filler)
}

/// A target checked every 1.5 s with a timeout of 1 s: ample for a local
/// server's answer beside other tests on a loaded machine.
fn target(name: &str, addr: SocketAddr, kind: HealthKind) -> Target {
    Target {
        id: 0,
        service: "web".into(),
        backend: name.into(),
        addr,
        check: CheckSpec {
            kind,
            interval: Duration::from_millis(1500),
            timeout: Duration::from_secs(1),
            rise: 1,
            fall: 1,
            http: (kind == HealthKind::Http).then(|| HttpCheck {
                path: "/healthz".into(),
                host: "check.test".into(),
                expect: Default::default(),
            }),
        },
    }
}

/// Runs the checker on `targets` until every one has `probes` results;
/// returns them and the state changes, by backend.
fn check(
    targets: Vec<Target>,
    probes: usize,
) -> (
    BTreeMap<String, Vec<ProbeResult>>,
    BTreeMap<String, Vec<HealthChange>>,
) {
    let names: Vec<String> = targets.iter().map(|t| t.backend.clone()).collect();
    let mut checker = HealthChecker::start(targets, Vec::new()).unwrap();
    let mut results: BTreeMap<String, Vec<ProbeResult>> = BTreeMap::new();
    let mut changes: BTreeMap<String, Vec<HealthChange>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && !names
            .iter()
            .all(|n| results.get(n).is_some_and(|r| r.len() >= probes))
    {
        match checker.try_recv() {
            Some(Report::Probe(_, p)) => results.entry(p.backend.clone()).or_default().push(p),
            Some(Report::Change(_, c)) => changes.entry(c.backend.clone()).or_default().push(c),
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    checker.stop();
    while let Some(r) = checker.try_recv() {
        if let Report::Change(_, c) = r {
            changes.entry(c.backend.clone()).or_default().push(c);
        }
    }
    for n in &names {
        assert!(
            results.get(n).is_some_and(|r| r.len() >= probes),
            "{n}: no {probes} probes in time: {results:?}"
        );
    }
    (results, changes)
}

/// A target that never answers, checked every 300 ms with a timeout of
/// 150 ms: its timeout is what the test sees.
fn silent_target(name: &str, addr: SocketAddr, kind: HealthKind) -> Target {
    let mut t = target(name, addr, kind);
    t.check.interval = Duration::from_millis(300);
    t.check.timeout = Duration::from_millis(150);
    t
}

fn error_of(results: &BTreeMap<String, Vec<ProbeResult>>, name: &str) -> Option<String> {
    results[name][0].error.clone()
}

#[test]
fn http_probes_against_real_servers() {
    let good = Server::start(
        "127.0.0.1",
        Behaviour::Answer("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    );
    let wrong = Server::start(
        "127.0.0.1",
        Behaviour::Answer("HTTP/1.1 503 Unavailable\r\n\r\n"),
    );
    let garbage = Server::start("127.0.0.1", Behaviour::Answer("SSH-2.0-OpenSSH_9.2\r\n"));
    let silent = Server::start("127.0.0.1", Behaviour::Silent);
    let closes = Server::start("127.0.0.1", Behaviour::Close);
    let refused = refused_port();
    let refused = refused.addr;
    let (results, changes) = check(
        vec![
            target("good", good.addr, HealthKind::Http),
            target("wrong", wrong.addr, HealthKind::Http),
            target("garbage", garbage.addr, HealthKind::Http),
            silent_target("silent", silent.addr, HealthKind::Http),
            target("closes", closes.addr, HealthKind::Http),
            target("refused", refused, HealthKind::Http),
        ],
        2,
    );
    assert!(
        results["good"].iter().all(|p| p.error.is_none()),
        "{results:?}"
    );
    assert!(!changes.contains_key("good"), "good stays up");
    let e = |n| error_of(&results, n).unwrap_or_default();
    assert_eq!(e("wrong"), "status 503, expected 200-399");
    assert!(
        e("garbage").starts_with("not an HTTP response: \"SSH-2.0"),
        "{}",
        e("garbage")
    );
    assert_eq!(e("silent"), "timeout: no response within 150ms");
    assert!(
        e("closes") == "connection closed without a response"
            || e("closes").starts_with("reading the response: ")
            || e("closes").starts_with("sending the request: "),
        "{}",
        e("closes")
    );
    assert!(e("refused").starts_with("connect: "), "{}", e("refused"));
    assert!(
        e("refused").to_lowercase().contains("refused"),
        "{}",
        e("refused")
    );
    for n in ["wrong", "garbage", "silent", "closes", "refused"] {
        // fall = 1: down at the first failure, once.
        let c = &changes[n];
        assert_eq!(c.len(), 1, "{n}: {c:?}");
        assert!(!c[0].up);
        assert_eq!(c[0].error, error_of(&results, n));
    }
    assert!(results
        .values()
        .flatten()
        .all(|p| p.kind == HealthKind::Http));
}

#[test]
fn tcp_probes_up_refused_and_timeout() {
    let up = Server::start("127.0.0.1", Behaviour::Close);
    let held = refused_port();
    let refused = held.addr;
    let (full, _filler) = full_backlog();
    let full_addr = full.local_addr().unwrap().as_socket().unwrap();
    let (results, changes) = check(
        vec![
            target("up", up.addr, HealthKind::Tcp),
            target("refused", refused, HealthKind::Tcp),
            silent_target("timeout", full_addr, HealthKind::Tcp),
        ],
        2,
    );
    assert!(
        results["up"].iter().all(|p| p.error.is_none()),
        "{results:?}"
    );
    assert!(!changes.contains_key("up"));
    assert!(error_of(&results, "refused")
        .unwrap()
        .starts_with("connect: "));
    assert_eq!(
        error_of(&results, "timeout").unwrap(),
        "timeout: no connection within 150ms"
    );
    assert_eq!(results["timeout"][0].elapsed, Duration::from_millis(150));
    assert_eq!(changes["timeout"].len(), 1);
}

#[test]
fn a_backend_that_recovers_comes_back_after_rise_checks() {
    // Nothing listens at first: down after one failure (fall 1); then a
    // server on that port: up after two passes (rise 2).
    let mut refused = Some(refused_port());
    let addr = refused.as_ref().unwrap().addr;
    let mut t = target("flaps", addr, HealthKind::Tcp);
    t.check.rise = 2;
    let mut checker = HealthChecker::start(vec![t], Vec::new()).unwrap();
    let mut seen = Vec::new();
    let mut passes_before_up = 0;
    let mut server = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && seen.len() < 2 {
        match checker.try_recv() {
            Some(Report::Change(_, c)) => {
                if let Some(r) = refused.take().filter(|_| !c.up) {
                    server = Some(Server::on(r.listen(), Behaviour::Close));
                }
                seen.push(c.up);
            }
            Some(Report::Probe(_, p)) if p.error.is_none() && seen.len() == 1 => {
                passes_before_up += 1
            }
            Some(Report::Probe(..)) => {}
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    checker.stop();
    drop(server);
    assert_eq!(seen, [false, true]);
    assert_eq!(passes_before_up, 2, "the change follows the second pass");
}

/// A kept target whose settings change: the probe in flight under the
/// old ones (to the old address, with the old timeout) ends unreported,
/// so it cannot take the backend down under the new ones.
#[test]
fn a_probe_under_old_settings_does_not_count_after_they_change() {
    let silent = Server::start("127.0.0.1", Behaviour::Silent);
    let up = Server::start(
        "127.0.0.1",
        Behaviour::Answer("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    );
    // A name whose first check starts within 100 ms of the interval's start.
    let at = |addr, n: usize| {
        let mut t = target(&format!("x{n}"), addr, HealthKind::Http);
        t.check.interval = Duration::from_secs(3);
        t.check.timeout = Duration::from_secs(2);
        t
    };
    let n = (0..)
        .find(|&n| super::checker::phase(&at(silent.addr, n)) < Duration::from_millis(100))
        .unwrap();
    let mut checker = HealthChecker::start(vec![at(silent.addr, n)], Vec::new()).unwrap();
    // The first check waits on the silent server (its timeout, 2 s, ends
    // it after the new settings are in).
    let hang = Instant::now() + Duration::from_secs(60);
    while silent.accepted.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < hang, "the first check never connected");
        std::thread::sleep(Duration::from_millis(5));
    }
    checker.set_targets(vec![at(up.addr, n)]);
    let mut reports = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < deadline {
        match checker.try_recv() {
            Some(r) => reports.push(r),
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    checker.stop();
    let passes = reports
        .iter()
        .filter(|r| matches!(r, Report::Probe(_, p) if p.error.is_none()))
        .count();
    assert!(passes >= 1, "{reports:?}");
    assert!(
        reports
            .iter()
            .all(|r| matches!(r, Report::Probe(_, p) if p.error.is_none())),
        "only passes, no change: {reports:?}"
    );
}

/// The test configuration with a health check on web, its backends
/// checked at `a` and `b` on `port`.
fn health_config(health: &str, a: &str, b: &str, extra_backend: &str) -> String {
    crate::config::testing::with_services(&format!(
        r#"{}health = {health}
[[services.backends]]
name = "a"
address = "10.0.0.1"
health_address = "{a}"
[[services.backends]]
name = "b"
address = "10.0.0.2"
health_address = "{b}"
{extra_backend}"#,
        crate::config::testing::WEB
    ))
}

/// Drains `m` until `want` changes came (or the deadline passes).
fn changes_of(m: &mut HealthMonitor, want: usize) -> Vec<HealthChange> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < want && Instant::now() < deadline {
        out.extend(m.drain());
        std::thread::sleep(Duration::from_millis(5));
    }
    out
}

#[test]
fn reload_keeps_the_state_of_unchanged_checks_and_follows_added_and_removed_backends() {
    let (server, _refused) = up_at_127_0_0_2_refused_at_127_0_0_1();
    let port = server.addr.port();
    // a: nothing listens on 127.0.0.1 at that port (it is 127.0.0.2's).
    let health = format!(
        "{{ kind = \"tcp\", port = {port}, interval = \"200ms\", timeout = \"100ms\", rise = 1, fall = 1 }}"
    );
    let text = health_config(&health, "127.0.0.1", "127.0.0.2", "");
    let (mut plane, _) = crate::control::testing::plane(&text);
    let cfg = Config::parse(&text, "t.toml").unwrap();
    let mut m = HealthMonitor::new();
    assert!(m.update(&cfg, plane.dataplane()).is_empty());
    assert_eq!(m.targets().len(), 2);
    let c = changes_of(&mut m, 1);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!((c[0].backend.as_str(), c[0].up), ("a", false));

    // Reload: b removed, c added (checked where b was), a's check the
    // same: a stays down and is not reported again.
    let extra = "[[services.backends]]\nname = \"c\"\naddress = \"10.0.0.3\"\nhealth_address = \"127.0.0.2\"\n";
    let text2 = health_config(&health, "127.0.0.1", "127.0.0.2", extra)
        .replace("[[services.backends]]\nname = \"b\"\naddress = \"10.0.0.2\"\nhealth_address = \"127.0.0.2\"\n", "");
    let cfg2 = Config::parse(&text2, "t.toml").unwrap();
    plane.replace_services(&cfg2).unwrap();
    assert!(m.is_stale(plane.dataplane()));
    assert!(m.update(&cfg2, plane.dataplane()).is_empty());
    let names: Vec<&str> = m.targets().iter().map(|t| t.backend.as_str()).collect();
    assert_eq!(names, ["a", "c"]);
    // Several rounds of probes: no change (a stays down, c up).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut extra_changes = Vec::new();
    while Instant::now() < deadline {
        extra_changes.extend(m.drain());
        let s = m.view().summary(std::time::SystemTime::now());
        if s.backend("web", "c").is_some_and(|c| c.checks >= 3)
            && s.backend("web", "a").is_some_and(|a| a.checks >= 4)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(extra_changes.is_empty(), "{extra_changes:?}");
    let s = m.view().summary(std::time::SystemTime::now());
    assert_eq!(s.backend("web", "a").unwrap().state, "down");
    assert_eq!(s.backend("web", "a").unwrap().changes, 1);
    assert_eq!(s.backend("web", "c").unwrap().state, "up");
    assert!(s.backend("web", "c").unwrap().checks >= 3);
    assert!(s.backend("web", "b").is_none());

    // A changed check (another port, where 127.0.0.1 has nothing either)
    // keeps the state too; no health key: a counts as up again.
    let other = refused_port();
    let text3 = text2.replace(
        &format!("port = {port},"),
        &format!("port = {},", other.addr.port()),
    );
    let cfg3 = Config::parse(&text3, "t.toml").unwrap();
    assert!(m.update(&cfg3, plane.dataplane()).is_empty());
    assert!(!m.view().is_up("web", "a"));
    let text4 = text2.replace(&format!("health = {health}\n"), "");
    let cfg4 = Config::parse(&text4, "t.toml").unwrap();
    let back = m.update(&cfg4, plane.dataplane());
    assert_eq!(back.len(), 1, "{back:?}");
    assert!(back[0].up && back[0].backend == "a");
    assert!(
        back[0].describe().contains("checks stopped"),
        "{}",
        back[0].describe()
    );
    assert!(m.targets().is_empty());
    assert!(m.drain().is_empty(), "the checker is stopped");
}

/// A backend removed and added back between two drains is a new target:
/// the down report of its earlier checks, still in the channel, does not
/// apply to it (it would stay down while its checker, starting it up,
/// reports nothing until it fails and recovers).
#[test]
fn a_report_of_a_removed_backend_does_not_apply_to_it_added_back() {
    let (server, _refused) = up_at_127_0_0_2_refused_at_127_0_0_1();
    let health = format!(
        "{{ kind = \"tcp\", port = {}, interval = \"200ms\", timeout = \"100ms\", rise = 1, fall = 1 }}",
        server.addr.port()
    );
    let text = health_config(&health, "127.0.0.1", "127.0.0.2", "");
    let (mut plane, _) = crate::control::testing::plane(&text);
    let cfg = Config::parse(&text, "t.toml").unwrap();
    let mut m = HealthMonitor::new();
    assert!(m.update(&cfg, plane.dataplane()).is_empty());
    let first = m.targets()[0].id;
    // Ample for a's first check (refused at once, within the first 200 ms)
    // to be reported, and not drained.
    std::thread::sleep(Duration::from_secs(1));

    let a_block = "[[services.backends]]\nname = \"a\"\naddress = \"10.0.0.1\"\nhealth_address = \"127.0.0.1\"\n";
    assert!(text.contains(a_block));
    let without_a = Config::parse(&text.replace(a_block, ""), "t.toml").unwrap();
    plane.replace_services(&without_a).unwrap();
    assert!(m.update(&without_a, plane.dataplane()).is_empty());
    // Back, checked where b answers.
    let back = text.replace(a_block, &a_block.replace("127.0.0.1", "127.0.0.2"));
    let back = Config::parse(&back, "t.toml").unwrap();
    plane.replace_services(&back).unwrap();
    assert!(m.update(&back, plane.dataplane()).is_empty());
    let again = m.targets().iter().find(|t| t.backend == "a").unwrap().id;
    assert_ne!(again, first);

    let mut changes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        changes.extend(m.drain());
        let s = m.view().summary(std::time::SystemTime::now());
        if s.backend("web", "a").is_some_and(|a| a.checks >= 2) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(changes.is_empty(), "{changes:?}");
    let s = m.view().summary(std::time::SystemTime::now());
    assert_eq!(s.backend("web", "a").unwrap().state, "up");
    assert!(s.backend("web", "a").unwrap().checks >= 2);
    assert_eq!(
        s.backend("web", "a").unwrap().failed,
        0,
        "no old probe counted"
    );
}

/// The web service checked by TCP every 200 ms with rise and fall 1: `a`
/// at 127.0.0.1 and `b` at 127.0.0.2 on the port of a server `b` answers
/// on (nothing listens there on 127.0.0.1). Returns the server, the
/// configuration and its plane.
fn a_refused_b_up() -> (Server, Refused, Config, crate::control::plane::ControlPlane) {
    let (server, refused) = up_at_127_0_0_2_refused_at_127_0_0_1();
    let port = server.addr.port();
    let health = format!(
        "{{ kind = \"tcp\", port = {port}, interval = \"200ms\", timeout = \"100ms\", rise = 1, fall = 1 }}"
    );
    let text = health_config(&health, "127.0.0.1", "127.0.0.2", "");
    let (plane, _) = crate::control::testing::plane(&text);
    let cfg = Config::parse(&text, "t.toml").unwrap();
    (server, refused, cfg, plane)
}

/// A server on 127.0.0.2 that accepts and closes, and its port held on
/// 127.0.0.1 ([`Refused`]).
fn up_at_127_0_0_2_refused_at_127_0_0_1() -> (Server, Refused) {
    for _ in 0..100 {
        let server = Server::start("127.0.0.2", Behaviour::Close);
        if let Some(held) = Refused::hold("127.0.0.1", server.addr.port()) {
            return (server, held);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

#[test]
fn a_checker_that_ended_is_started_again_in_the_states_it_left() {
    let (_server, refused, cfg, plane) = a_refused_b_up();
    let mut m = HealthMonitor::new();
    assert!(m.update(&cfg, plane.dataplane()).is_empty());
    let c = changes_of(&mut m, 1);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!((c[0].backend.as_str(), c[0].up), ("a", false));

    // The thread ends unasked (after less than a minute's run): another
    // starts a second later; when that one ends too, two seconds later.
    let end = |m: &mut HealthMonitor| {
        m.checker().unwrap().end_unasked();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !m.checker().unwrap().has_ended() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(m.checker().unwrap().has_ended());
    };
    end(&mut m);
    let t0 = Instant::now();
    assert!(m.drain_at(t0).is_empty());
    assert!(m.checker().is_none());
    assert!(m.summary(std::time::SystemTime::now()).checker_down);
    assert!(m.drain_at(t0 + Duration::from_millis(900)).is_empty());
    assert!(m.checker().is_none());
    assert!(m.drain_at(t0 + Duration::from_secs(1)).is_empty());
    assert!(m.checker().is_some());
    end(&mut m);
    let t1 = Instant::now();
    assert!(m.drain_at(t1).is_empty());
    assert!(m.drain_at(t1 + Duration::from_millis(1900)).is_empty());
    assert!(m.checker().is_none());
    // Meanwhile a comes back: the checker started now takes a for down
    // and so reports it up (one that took it for up would never say so,
    // and a would stay down for good).
    let listener = refused.listen();
    assert!(m.drain_at(t1 + Duration::from_secs(2)).is_empty());
    assert!(m.checker().is_some_and(|c| !c.has_ended()));
    let s = m.summary(std::time::SystemTime::now());
    assert!(!s.checker_down);
    assert_eq!(s.checker_restarts, 2);
    assert_eq!(s.backend("web", "a").unwrap().state, "down");
    let c = changes_of(&mut m, 1);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!((c[0].backend.as_str(), c[0].up), ("a", true));
    // One that ends after a minute's run is started again at once, and
    // the wait starts over: the next end waits a second.
    end(&mut m);
    let t2 = t1 + Duration::from_secs(2) + Duration::from_secs(60);
    assert!(m.drain_at(t2).is_empty());
    assert!(m.checker().is_some_and(|c| !c.has_ended()));
    end(&mut m);
    assert!(m.drain_at(t2).is_empty());
    assert!(m.checker().is_none());
    assert!(m.drain_at(t2 + Duration::from_secs(1)).is_empty());
    assert!(m.checker().is_some());
    assert_eq!(m.summary(std::time::SystemTime::now()).checker_restarts, 4);
    drop(listener);
}

#[test]
fn a_checker_stopped_at_shutdown_is_not_down() {
    let (_server, _refused, cfg, plane) = a_refused_b_up();
    let mut m = HealthMonitor::new();
    assert!(m.update(&cfg, plane.dataplane()).is_empty());
    let c = changes_of(&mut m, 1);
    assert_eq!((c[0].backend.as_str(), c[0].up), ("a", false));
    m.stop();
    assert!(m.checker().is_none());
    let s = m.summary(std::time::SystemTime::now());
    assert!(!s.checker_down, "stopped on purpose, not down");
    assert_eq!(
        s.backend("web", "a").unwrap().state,
        "down",
        "the view stays"
    );
    // Nothing starts it again.
    assert!(m.update(&cfg, plane.dataplane()).is_empty());
    assert!(m
        .drain_at(Instant::now() + Duration::from_secs(120))
        .is_empty());
    assert!(m.checker().is_none());
}

#[test]
fn a_checker_that_cannot_start_is_tried_again_with_a_growing_wait() {
    let (_server, _refused, cfg, plane) = a_refused_b_up();
    let tries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = tries.clone();
    let mut m = HealthMonitor::with_start(Box::new(move |targets, down| {
        if counted.fetch_add(1, Ordering::SeqCst) < 2 {
            Err(std::io::Error::other("no thread for you"))
        } else {
            HealthChecker::start(targets, down)
        }
    }));
    let before = Instant::now();
    assert!(m.update(&cfg, plane.dataplane()).is_empty());
    let t0 = Instant::now();
    assert_eq!(tries.load(Ordering::SeqCst), 1);
    let s = m.summary(std::time::SystemTime::now());
    assert!(s.checker_down);
    assert_eq!(s.backends.len(), 2, "the backends are in the view");
    // The next try a second on, then two seconds after that one.
    assert!(m.drain_at(before + Duration::from_millis(900)).is_empty());
    assert_eq!(tries.load(Ordering::SeqCst), 1);
    let t1 = t0 + Duration::from_secs(1);
    assert!(m.drain_at(t1).is_empty());
    assert_eq!(tries.load(Ordering::SeqCst), 2);
    assert!(m.checker().is_none());
    assert!(m.drain_at(t1 + Duration::from_millis(1900)).is_empty());
    assert_eq!(tries.load(Ordering::SeqCst), 2);
    assert!(m.drain_at(t1 + Duration::from_secs(2)).is_empty());
    assert_eq!(tries.load(Ordering::SeqCst), 3);
    let s = m.summary(std::time::SystemTime::now());
    assert!(!s.checker_down);
    assert_eq!(s.checker_restarts, 1);
    // It checks: a goes down.
    let c = changes_of(&mut m, 1);
    assert_eq!((c[0].backend.as_str(), c[0].up), ("a", false));
    assert_eq!(tries.load(Ordering::SeqCst), 3);
}
