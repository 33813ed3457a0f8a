//! Health checks under load (issue 15): does probing a thousand backends
//! every second, a tenth of them timing out, slow the control protocol, and
//! does a worker ever wait on the checker?
//!
//! Two services of pktdist's configuration stand in for the fleet: `fleet`
//! (900 backends by default) checked at a loopback listener that takes
//! every connection, and `slow` (100) checked at a loopback listener whose
//! backlog is full, so their SYNs go unanswered and every check times out.
//! A third service, `web`, takes the protocol's requests. The same
//! configuration runs without and with the `health` keys, in alternating
//! rounds of one run:
//!
//! * **control**: the real `ControlThread` (and, with the keys, its checker
//!   thread, on the same core) answers a client that keeps `--window`
//!   signed affinity creates and extends in flight (as `dataplane-bench
//!   --scenario control`). Requests answered per second.
//! * **reader**: a stand-in worker on the other core reads what a worker
//!   reads of the control thread's tables, per burst of 32: the dataplane
//!   generation and 32 affinity lookups, while the control thread (and the
//!   checker) run. Bursts per second and the longest burst: a worker that
//!   waited on a lock the checker held would show it there. (The checker
//!   shares no memory with the workers at all: it holds no handle to their
//!   tables and shares no lock with them; see `src/health/mod.rs`.)
//!
//! No DPDK: plain threads pinned with `core_affinity`. Needs two cores.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use pktdist::config::Config;
use pktdist::control::thread::{ControlSetup, ControlThread};
use pktdist::datapath::worker::Shared;
use pktdist::protocol::auth::{unix_ms, Key};
use pktdist::protocol::message::{
    encode_request, AffinityKey, AffinityOp, Envelope, Header, Reply, Request, ReturnCode,
    ServiceAddr, MAX_DATAGRAM,
};
use pktdist::types::Family;
use serde_json::json;
use socket2::{Domain, Socket, Type};

/// Backends of `web`, which send the requests.
const SENDERS: usize = 8;

struct Args {
    rounds: usize,
    seconds: f64,
    window: usize,
    backends: usize,
    slow_share: f64,
    interval: String,
    timeout: String,
    kind: String,
    control_core: usize,
    other_core: usize,
    json: Option<String>,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut a = Args {
            rounds: 5,
            seconds: 5.0,
            window: 64,
            backends: 1000,
            slow_share: 0.1,
            interval: "1s".into(),
            timeout: "500ms".into(),
            kind: "tcp".into(),
            control_core: 0,
            other_core: 1,
            json: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            if flag == "--help" || flag == "-h" {
                println!(
                    "health-bench [--rounds 5] [--seconds 5] [--window 64] [--backends 1000] [--slow-share 0.1] \
                     [--interval 1s] [--timeout 500ms] [--kind tcp|http] [--control-core 0] [--other-core 1] [--json FILE]"
                );
                std::process::exit(0);
            }
            let v = it.next().ok_or(format!("{flag} needs a value"))?;
            let num = |v: &str| v.parse::<f64>().map_err(|e| format!("{flag} {v}: {e}"));
            match flag.as_str() {
                "--rounds" => a.rounds = num(&v)? as usize,
                "--seconds" => a.seconds = num(&v)?,
                "--window" => a.window = num(&v)? as usize,
                "--backends" => a.backends = num(&v)? as usize,
                "--slow-share" => a.slow_share = num(&v)?,
                "--interval" => a.interval = v,
                "--timeout" => a.timeout = v,
                "--kind" => a.kind = v,
                "--control-core" => a.control_core = num(&v)? as usize,
                "--other-core" => a.other_core = num(&v)? as usize,
                "--json" => a.json = Some(v),
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        if a.rounds == 0 || a.backends == 0 || a.window == 0 || a.seconds <= 0.0 {
            return Err("rounds, backends, window and seconds must be above 0".into());
        }
        if a.kind != "tcp" && a.kind != "http" {
            return Err(format!("--kind {}: tcp or http", a.kind));
        }
        Ok(a)
    }

    fn slow(&self) -> usize {
        ((self.backends as f64 * self.slow_share).round() as usize).min(self.backends)
    }
}

fn key_bytes(i: usize) -> [u8; 32] {
    [i as u8 + 1; 32]
}

/// The configuration: `web` (the senders), `fleet` checked at `good`,
/// `slow` checked at `full`; the `health` keys only `with_health`.
fn config(a: &Args, with_health: bool, good: u16, full: u16) -> String {
    let mut s = String::from(
        r#"
[eal]
args = ["--no-huge"]
[cores]
control = 0
workers = [1]
[[ports]]
name = "in"
device = "net_ring0"
gateway_mac = "02:00:00:00:00:fe"
[control]
listen = "127.0.0.1:0"
allowed_networks = ["127.0.0.0/8"]
[[services]]
name = "web"
vip = "192.0.2.10"
port = 80
protocol = "tcp"
forwarding = "ipip"
ipip_source = "198.51.100.1"
"#,
    );
    for i in 1..=SENDERS {
        s.push_str(&format!(
            "[[services.backends]]\nname = \"be{i}\"\naddress = \"10.200.0.{i}\"\n"
        ));
    }
    let slow = a.slow();
    for (name, vip, n, port) in [
        ("fleet", "192.0.2.11", a.backends - slow, good),
        ("slow", "192.0.2.12", slow, full),
    ] {
        if n == 0 {
            continue;
        }
        s.push_str(&format!(
            "[[services]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"ipip\"\nipip_source = \"198.51.100.1\"\n"
        ));
        if with_health {
            s.push_str(&format!(
                "health = {{ kind = \"{}\", port = {port}, interval = \"{}\", timeout = \"{}\", rise = 2, fall = 3 }}\n",
                a.kind, a.interval, a.timeout
            ));
        }
        for i in 0..n {
            // Addresses of the data path (never probed); checks go to the
            // loopback listener.
            s.push_str(&format!(
                "[[services.backends]]\nname = \"{name}{i}\"\naddress = \"10.{}.{}.{}\"\nhealth_address = \"127.0.0.1\"\n",
                201 + (vip.ends_with("12") as usize),
                i / 256,
                i % 256
            ));
        }
    }
    s.push_str("[control.keys]\n");
    for i in 0..SENDERS {
        let hex: String = key_bytes(i).iter().map(|b| format!("{b:02x}")).collect();
        s.push_str(&format!("be{} = \"{hex}\"\n", i + 1));
    }
    s
}

/// The backends' side of the checks: a listener that accepts every
/// connection (answering HTTP checks with 200), run by a thread.
struct GoodListener {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl GoodListener {
    fn start(core: usize, http: bool) -> Result<GoodListener, String> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| e.to_string())?;
        s.set_reuse_address(true).map_err(|e| e.to_string())?;
        s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .map_err(|e| e.to_string())?;
        s.listen(4096).map_err(|e| e.to_string())?;
        let listener: TcpListener = s.into();
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let _ = core_affinity::set_for_current(core_affinity::CoreId { id: core });
            let mut accepted = 0u64;
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        accepted += 1;
                        if http {
                            answer(s);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            accepted
        });
        Ok(GoodListener {
            port,
            stop,
            thread: Some(thread),
        })
    }

    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

/// Reads an HTTP request head and answers 200.
fn answer(mut s: TcpStream) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 1024];
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\n") && got.len() < 8192 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
}

/// A listener with a full backlog: SYNs to it go unanswered.
fn full_listener() -> Result<(Socket, TcpStream, u16), String> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| e.to_string())?;
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .map_err(|e| e.to_string())?;
    s.listen(0).map_err(|e| e.to_string())?;
    let addr = s
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or("no address")?;
    let filler =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    Ok((s, filler, addr.port()))
}

/// What one run with or without checks measured.
#[derive(Clone, Debug, Default)]
struct RunStats {
    replies: u64,
    ok: u64,
    seconds: f64,
    /// Health checks done during the run, failed, timed out.
    checks: u64,
    failed: u64,
    timeouts: u64,
    backends_down: usize,
    /// CPU time the checker thread used over the run, in seconds.
    checker_cpu_s: f64,
}

impl RunStats {
    fn rate(&self) -> f64 {
        self.replies as f64 / self.seconds.max(1e-9)
    }
}

/// The control thread on `control_core` (its checker thread spawned
/// there), built from `cfg`, serving until `stop`; returns what its health
/// view saw.
fn serve(
    cfg: Config,
    core: usize,
    stop: Arc<AtomicBool>,
    ready: std::sync::mpsc::SyncSender<Result<(SocketAddr, Shared), String>>,
) -> JoinHandle<(u64, u64, u64, usize, f64)> {
    std::thread::spawn(move || {
        let _ = core_affinity::set_for_current(core_affinity::CoreId { id: core });
        let setup = ControlSetup {
            config_path: None,
            workers: Vec::new(),
            port_stats: None,
            port_upkeep: None,
            status: None,
            discard_bad_state: false,
            store: None,
        };
        let mut control = match ControlThread::new(&cfg, setup) {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(e));
                return (0, 0, 0, 0, 0.0);
            }
        };
        let addr = control.local_addr().expect("bound");
        let _ = ready.send(Ok((addr, control.shared())));
        control.serve_until(&stop, &AtomicBool::new(false), None);
        let checker_cpu_s = thread_cpu_seconds("pktdist-health");
        control.stop_health_checks();
        let h = control.health().summary(SystemTime::now());
        let checks = h.backends.iter().map(|b| b.checks).sum();
        let failed = h.backends.iter().map(|b| b.failed).sum();
        let timeouts = h
            .backends
            .iter()
            .filter(|b| {
                b.last_error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("timeout"))
            })
            .count() as u64;
        let down = h.backends.iter().filter(|b| b.state == "down").count();
        (checks, failed, timeouts, down, checker_cpu_s)
    })
}

/// CPU time (on CPU, from /proc's schedstat) of this process's thread
/// named `name`, in seconds; 0 when there is none.
fn thread_cpu_seconds(name: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    for task in dir.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            let ns: u64 = stat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            return ns as f64 / 1e9;
        }
    }
    0.0
}

/// One control-rate run.
fn control_run(a: &Args, cfg: Config) -> Result<RunStats, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let server = serve(cfg, a.control_core, Arc::clone(&stop), tx);
    let (addr, _) = rx.recv().map_err(|e| e.to_string())??;
    let (seconds, window, core) = (a.seconds, a.window, a.other_core);
    let client = std::thread::spawn(move || {
        let _ = core_affinity::set_for_current(core_affinity::CoreId { id: core });
        client_loop(addr, seconds, window)
    });
    let st = client.join().map_err(|_| "client panicked")?;
    stop.store(true, Ordering::Relaxed);
    let (checks, failed, timeouts, down, cpu) = server.join().map_err(|_| "server panicked")?;
    let mut st = st?;
    st.checks = checks;
    st.failed = failed;
    st.timeouts = timeouts;
    st.backends_down = down;
    st.checker_cpu_s = cpu;
    Ok(st)
}

/// Signed affinity creates for new clients alternating with extends of
/// the client created just before, `window` in flight.
fn client_loop(server: SocketAddr, seconds: f64, window: usize) -> Result<RunStats, String> {
    let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let service = ServiceAddr {
        addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
        port: 80,
        proto: 6,
    };
    let keys: Vec<Key> = (0..SENDERS)
        .map(|i| Key::new(&key_bytes(i)).expect("32-byte key"))
        .collect();
    let names: Vec<String> = (1..=SENDERS).map(|i| format!("be{i}")).collect();
    let mut nonce = unix_ms(SystemTime::now()).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let (mut tx, mut rx) = (vec![0u8; MAX_DATAGRAM], vec![0u8; MAX_DATAGRAM]);
    let mut st = RunStats::default();
    let (mut in_flight, mut seq) = (0usize, 0u64);
    let started = Instant::now();
    let mut last_reply = started;
    let deadline = started + Duration::from_secs_f64(seconds);
    loop {
        let sending = Instant::now() < deadline;
        while sending && in_flight < window {
            let extend = seq % 2 == 1;
            let client = 0xac10_0000 | ((seq / 2) as u32 & 0x000f_ffff);
            let owner = (seq as usize / 2) % SENDERS;
            let key = AffinityKey::new(service, IpAddr::V4(Ipv4Addr::from(client)), 32)
                .map_err(|e| e.to_string())?;
            let op = AffinityOp {
                key,
                duration_secs: 60,
                owner: None,
                notify: None,
            };
            let req = if extend {
                Request::AffinityExtend(op)
            } else {
                Request::AffinityCreate(op)
            };
            nonce = nonce.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let header = Header {
                msg_type: 0,
                request_id: seq as u32,
                timestamp_ms: unix_ms(SystemTime::now()),
                nonce,
                name: &names[owner],
            };
            let n =
                encode_request(&mut tx, &header, &keys[owner], &req).map_err(|e| e.to_string())?;
            sock.send_to(&tx[..n], server).map_err(|e| e.to_string())?;
            in_flight += 1;
            seq += 1;
        }
        if in_flight == 0 {
            break;
        }
        match sock.recv_from(&mut rx) {
            Ok((n, _)) => {
                in_flight -= 1;
                st.replies += 1;
                last_reply = Instant::now();
                let code = Envelope::open(&rx[..n])
                    .ok()
                    .and_then(|e| Reply::decode_body(e.body).ok())
                    .map(|r| r.code);
                st.ok += u64::from(code == Some(ReturnCode::Ok));
            }
            Err(_) => {
                in_flight = 0;
                if !sending {
                    break;
                }
            }
        }
    }
    st.seconds = last_reply.duration_since(started).as_secs_f64();
    Ok(st)
}

/// What the stand-in worker measured.
#[derive(Clone, Debug, Default)]
struct ReaderStats {
    bursts: u64,
    seconds: f64,
    longest_burst_ns: u64,
    /// Bursts longer than 100 us.
    slow_bursts: u64,
}

/// A stand-in worker on `other_core` reading the control thread's tables
/// while it (and, with the keys, the checker) runs on `control_core`.
fn reader_run(a: &Args, cfg: Config) -> Result<ReaderStats, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let server = serve(cfg, a.control_core, Arc::clone(&stop), tx);
    let (_, shared) = rx.recv().map_err(|e| e.to_string())??;
    let (seconds, core) = (a.seconds, a.other_core);
    let reader = std::thread::spawn(move || {
        let _ = core_affinity::set_for_current(core_affinity::CoreId { id: core });
        let mut st = ReaderStats::default();
        let started = Instant::now();
        let deadline = started + Duration::from_secs_f64(seconds);
        let mut x = 0x1234_5678u32;
        let mut found = 0u64;
        let mut gen = 0u64;
        while Instant::now() < deadline {
            let t0 = Instant::now();
            gen = gen.wrapping_add(shared.dataplane.generation());
            for _ in 0..32 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                found += u64::from(
                    shared
                        .affinity
                        .lookup(0, Family::V4, u128::from(0xac10_0000 | (x & 0xfffff)), 1)
                        .is_some(),
                );
            }
            let ns = t0.elapsed().as_nanos() as u64;
            st.longest_burst_ns = st.longest_burst_ns.max(ns);
            st.slow_bursts += u64::from(ns > 100_000);
            st.bursts += 1;
        }
        st.seconds = started.elapsed().as_secs_f64();
        std::hint::black_box((found, gen));
        st
    });
    let st = reader.join().map_err(|_| "reader panicked")?;
    stop.store(true, Ordering::Relaxed);
    server.join().map_err(|_| "server panicked")?;
    Ok(st)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("health-bench: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<(), String> {
    let a = Args::parse()?;
    let mut good = GoodListener::start(a.other_core, a.kind == "http")?;
    let (_full, _filler, full_port) = full_listener()?;
    let without = Config::parse(&config(&a, false, good.port, full_port), "bench.toml")
        .map_err(|e| e.to_string())?;
    let with = Config::parse(&config(&a, true, good.port, full_port), "bench.toml")
        .map_err(|e| e.to_string())?;
    println!(
        "health-bench: {} backends ({} timing out) checked by {} every {} (timeout {}); {} rounds of {} s; control core {}, client/reader core {}",
        a.backends,
        a.slow(),
        a.kind,
        a.interval,
        a.timeout,
        a.rounds,
        a.seconds,
        a.control_core,
        a.other_core
    );
    let (mut rate_off, mut rate_on, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut rounds = Vec::new();
    for r in 0..a.rounds {
        // Alternate which goes first.
        let (off, on) = if r % 2 == 0 {
            let off = control_run(&a, without.clone())?;
            (off, control_run(&a, with.clone())?)
        } else {
            let on = control_run(&a, with.clone())?;
            (control_run(&a, without.clone())?, on)
        };
        let ratio = on.rate() / off.rate().max(1e-9);
        println!(
            "control round {r}: without {:>9.0} req/s   with {:>9.0} req/s   ratio {ratio:.3}   checks {:.0}/s (checker thread {:.1}% of a core), {} failed, {} backends timing out, {} down at the end",
            off.rate(),
            on.rate(),
            on.checks as f64 / on.seconds.max(1e-9),
            100.0 * on.checker_cpu_s / on.seconds.max(1e-9),
            on.failed,
            on.timeouts,
            on.backends_down
        );
        rounds.push(json!({
            "without_rps": off.rate(), "with_rps": on.rate(), "ratio": ratio,
            "checks": on.checks, "failed": on.failed, "timing_out": on.timeouts,
            "down": on.backends_down, "seconds": on.seconds,
            "checker_cpu_share": on.checker_cpu_s / on.seconds.max(1e-9),
            "ok_without": off.ok, "ok_with": on.ok,
        }));
        rate_off.push(off.rate());
        rate_on.push(on.rate());
        ratios.push(ratio);
    }
    let (mut reader_off, mut reader_on) = (Vec::new(), Vec::new());
    let mut reader_rounds = Vec::new();
    for r in 0..a.rounds {
        let off = reader_run(&a, without.clone())?;
        let on = reader_run(&a, with.clone())?;
        let rate = |s: &ReaderStats| s.bursts as f64 / s.seconds.max(1e-9);
        println!(
            "reader round {r}: without {:>10.0} bursts/s (longest {} ns, {} over 100 us)   with {:>10.0} bursts/s (longest {} ns, {} over 100 us)",
            rate(&off),
            off.longest_burst_ns,
            off.slow_bursts,
            rate(&on),
            on.longest_burst_ns,
            on.slow_bursts
        );
        reader_rounds.push(json!({
            "without_bursts_per_s": rate(&off), "with_bursts_per_s": rate(&on),
            "without_longest_ns": off.longest_burst_ns, "with_longest_ns": on.longest_burst_ns,
            "without_over_100us": off.slow_bursts, "with_over_100us": on.slow_bursts,
        }));
        reader_off.push(rate(&off));
        reader_on.push(rate(&on));
    }
    let accepted = good.stop();
    let summary = json!({
        "backends": a.backends, "timing_out": a.slow(), "kind": a.kind,
        "interval": a.interval, "timeout": a.timeout, "seconds": a.seconds,
        "window": a.window,
        "control": {
            "median_without_rps": median(rate_off.clone()),
            "median_with_rps": median(rate_on.clone()),
            "median_ratio": median(ratios.clone()),
            "rounds": rounds,
        },
        "reader": {
            "median_without_bursts_per_s": median(reader_off.clone()),
            "median_with_bursts_per_s": median(reader_on.clone()),
            "rounds": reader_rounds,
        },
        "connections_accepted_by_the_good_listener": accepted,
    });
    println!(
        "control: median without {:.0} req/s, with {:.0} req/s, median ratio {:.3} (target >= 0.90)",
        median(rate_off),
        median(rate_on),
        median(ratios)
    );
    println!(
        "reader: median without {:.0} bursts/s, with {:.0} bursts/s (ratio {:.3})",
        median(reader_off.clone()),
        median(reader_on.clone()),
        median(reader_on) / median(reader_off).max(1e-9)
    );
    if let Some(path) = &a.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&summary).unwrap_or_default(),
        )
        .map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(())
}
