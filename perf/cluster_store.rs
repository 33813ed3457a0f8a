//! The cluster store's rate and propagation (issue 16): two store threads
//! (src/cluster/etcd.rs) on one local etcd the benchmark starts itself.
//! Store A is handed `--changes` distinct affinity creates at `--rate` per
//! second (0: as fast as it answers), at most `--window` of them
//! outstanding at a time (the control thread's parked requests); store B
//! only watches. Run at the 10,000 changes/s for the propagation it
//! asks for, and with `--rate 0` for the most the store commits (there the
//! window's queue adds its wait to every figure).
//!
//! * **committed/s**: creates answered Committed at A / time from the first
//!   submit to the last answer.
//! * **commit latency**: submit at A → A's `Done` (the time a client's
//!   CREATE waits for its OK).
//! * **propagation**: the value's `written_unix_ms` (A's wall clock when it
//!   submitted) → B's `Changed` for it, read by a thread polling B the way
//!   the control thread polls its handle.
//!
//! `--batch` and `--in-flight` set the store's batching (several values,
//! comma-separated, run one after the other on the same etcd). etcd writes
//! to a temporary directory on the machine's disk (fsync included).

// The tests' launcher; the benchmark uses only part of it.
#[allow(dead_code)]
#[path = "../tests/common/etcd.rs"]
mod etcd;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use pktdist::cluster::etcd::{spawn_tuned, Tuning};
use pktdist::cluster::{Change, Outcome, StoreEvent, StoreHandle, StoreOp, StoredAffinity};
use pktdist::config::{ClusterConfig, DurationStr, StoreKind};
use pktdist::control::state_file::SavedAffinity;
use pktdist::protocol::message::ServiceAddr;
use pktdist::types::PortMatch;

struct Args {
    changes: u32,
    rates: Vec<usize>,
    window: usize,
    batches: Vec<usize>,
    in_flights: Vec<usize>,
}

fn list(v: &str) -> Result<Vec<usize>, String> {
    v.split(',')
        .map(|x| x.trim().parse().map_err(|_| format!("bad number {x:?}")))
        .collect()
}

impl Args {
    fn parse() -> Result<Args, String> {
        let d = Tuning::default();
        let mut a = Args {
            changes: 20_000,
            rates: vec![10_000],
            window: 4096,
            batches: vec![d.max_batch],
            in_flights: vec![d.max_in_flight],
        };
        let mut it = std::env::args().skip(1);
        while let Some(k) = it.next() {
            let mut v = || it.next().ok_or(format!("{k} needs a value"));
            match k.as_str() {
                "--changes" => a.changes = v()?.parse().map_err(|_| "bad --changes")?,
                "--rate" => a.rates = list(&v()?)?,
                "--window" => a.window = v()?.parse().map_err(|_| "bad --window")?,
                "--batch" => a.batches = list(&v()?)?,
                "--in-flight" => a.in_flights = list(&v()?)?,
                "--help" | "-h" => {
                    println!("cluster-store-bench [--changes N] [--rate N,..] [--window N] [--batch N,..] [--in-flight N,..]");
                    std::process::exit(0);
                }
                _ => return Err(format!("unknown argument {k:?} (--help)")),
            }
        }
        Ok(a)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn config(endpoint: &str, instance: &str) -> ClusterConfig {
    ClusterConfig {
        store: StoreKind::Etcd,
        endpoints: vec![endpoint.to_string()],
        prefix: "/bench".to_string(),
        instance: instance.to_string(),
        user: None,
        password_file: None,
        ca_file: None,
        cert_file: None,
        key_file: None,
        timeout: DurationStr(Duration::from_secs(5)),
    }
}

fn affinity(service: &str, i: u32) -> StoredAffinity {
    StoredAffinity {
        affinity: SavedAffinity {
            service: service.to_string(),
            service_addr: ServiceAddr {
                addr: Ipv4Addr::new(192, 0, 2, 10).into(),
                port: 80,
                proto: 6,
            },
            owner: format!("b{}", i % 8),
            client: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
            prefix_len: 32,
            ports: PortMatch::Any,
            expires_unix_ms: now_ms() + 3_600_000,
            created_unix_ms: now_ms(),
            notify: None,
        },
        writer: "a".to_string(),
        written_unix_ms: now_ms(),
    }
}

/// Waits for the store's first `Loaded`.
fn wait_loaded(h: &StoreHandle) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match h.try_event().map_err(|_| "the store thread is gone")? {
            Some(StoreEvent::Loaded { .. }) => return Ok(()),
            Some(StoreEvent::Unreachable { error }) => return Err(error),
            Some(_) => {}
            None if Instant::now() > deadline => return Err("no Loaded in 30 s".into()),
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000, 3).expect("histogram bounds")
}

struct Run {
    committed: u64,
    other: u64,
    secs: f64,
    commit_us: Histogram<u64>,
    propagation_ms: Histogram<u64>,
    propagated: u64,
}

fn one_run(
    endpoint: &str,
    a: &Args,
    rate: usize,
    tuning: Tuning,
    run: usize,
) -> Result<Run, String> {
    let sa = spawn_tuned(&config(endpoint, "a"), tuning)?;
    let sb = pktdist::cluster::etcd::spawn(&config(endpoint, "b"))?;
    wait_loaded(&sa)?;
    wait_loaded(&sb)?;
    let service = format!("run{run}");
    let n = a.changes as u64;

    // B's reader: every Changed of this run's service, its delay from the
    // writer's clock.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let service = service.clone();
        std::thread::spawn(move || {
            let mut h = hist();
            let mut seen = 0u64;
            while seen < n && !stop.load(Ordering::Relaxed) {
                // A thread gone delivers no more: what it saw is counted.
                let Ok(event) = sb.try_event() else { break };
                match event {
                    Some(StoreEvent::Changed {
                        change: Change::Put(v),
                        ..
                    }) if v.affinity.service == service => {
                        let _ = h.record(now_ms().saturating_sub(v.written_unix_ms).max(1));
                        seen += 1;
                    }
                    Some(_) => {}
                    None => std::thread::sleep(Duration::from_micros(200)),
                }
            }
            (h, seen)
        })
    };

    let mut commit_us = hist();
    let mut sent_at: HashMap<u64, Instant> = HashMap::with_capacity(a.window);
    let (mut next, mut answered, mut committed, mut other) = (0u64, 0u64, 0u64, 0u64);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(600);
    while answered < n {
        // Paced: change i is due at start + i / rate.
        let due = if rate == 0 {
            n
        } else {
            ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(n)
        };
        while next < due && sent_at.len() < a.window {
            let value = affinity(&service, next as u32);
            sent_at.insert(next, Instant::now());
            if !sa.submit(StoreOp::Put {
                ticket: next,
                value,
                expect: 0,
            }) {
                return Err("store A's thread is gone".into());
            }
            next += 1;
        }
        match sa.try_event().map_err(|_| "store A's thread is gone")? {
            Some(StoreEvent::Done { ticket, outcome }) => {
                answered += 1;
                if let Some(t) = sent_at.remove(&ticket) {
                    let _ = commit_us.record(t.elapsed().as_micros().max(1) as u64);
                }
                match outcome {
                    Outcome::Committed { .. } => committed += 1,
                    o => {
                        if other < 3 {
                            eprintln!("cluster-store-bench: ticket {ticket}: {o:?}");
                        }
                        other += 1;
                    }
                }
            }
            Some(_) => {}
            None => {
                if Instant::now() > deadline {
                    return Err(format!("only {answered} of {n} answered in 600 s"));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    // Every committed create reaches B; give it a little while.
    let wait = Instant::now() + Duration::from_secs(30);
    while !reader.is_finished() && Instant::now() < wait {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let (propagation_ms, propagated) = reader.join().map_err(|_| "reader panicked")?;
    Ok(Run {
        committed,
        other,
        secs,
        commit_us,
        propagation_ms,
        propagated,
    })
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("cluster-store-bench: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<(), String> {
    let a = Args::parse()?;
    let etcd = etcd::Etcd::start_new();
    println!(
        "cluster-store-bench: etcd {} ({}), {} distinct creates per run, window {}",
        etcd.endpoint(),
        etcd.etcdctl(&["version"]).lines().next().unwrap_or(""),
        a.changes,
        a.window
    );
    println!(
        "{:>8} {:>6} {:>9} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11}",
        "offered",
        "batch",
        "in-flight",
        "committed/s",
        "commit50",
        "commit99",
        "prop50",
        "prop99",
        "propmax",
        "propagated"
    );
    let mut run = 0;
    for &rate in &a.rates {
        for &max_batch in &a.batches {
            for &max_in_flight in &a.in_flights {
                let tuning = Tuning {
                    max_batch,
                    max_in_flight,
                    ..Tuning::default()
                };
                let r = one_run(&etcd.endpoint(), &a, rate, tuning, run)?;
                run += 1;
                println!(
                "{:>8} {:>6} {:>9} {:>12.0} {:>7.1}ms {:>7.1}ms {:>7}ms {:>7}ms {:>7}ms {:>11}{}",
                if rate == 0 { "max".to_string() } else { rate.to_string() },
                max_batch,
                max_in_flight,
                r.committed as f64 / r.secs,
                r.commit_us.value_at_quantile(0.5) as f64 / 1000.0,
                r.commit_us.value_at_quantile(0.99) as f64 / 1000.0,
                r.propagation_ms.value_at_quantile(0.5),
                r.propagation_ms.value_at_quantile(0.99),
                r.propagation_ms.max(),
                r.propagated,
                if r.other > 0 {
                    format!("  ({} not committed)", r.other)
                } else {
                    String::new()
                }
            );
            }
        }
    }
    Ok(())
}
