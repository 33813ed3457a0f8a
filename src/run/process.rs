//! `pktdist run`: starts EAL, the ports, one pinned worker per worker core,
//! the optional built-in traffic source and the control thread, and stops
//! them cleanly on SIGINT/SIGTERM or when the run's duration ends.
//!
//! This is where the distribution logic meets DPDK; it holds no `unsafe`
//! itself: everything DPDK goes through [`crate::dpdk`].

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::affinity::manager::AffinityManager;

use crate::affinity::table::AffinityTable;

use super::traffic_source::TrafficSource;
use super::trafficgen::{Target, TrafficGen, TrafficSpec};
use crate::affinity::auto::AutoAffinityTable;
use crate::config::Config;
use crate::control::plane::{auth_from_config, ControlPlane};
use crate::control::registry::ServiceRegistry;
use crate::control::server::{ControlServer, ServerConfig};
use crate::datapath::counters::WorkerCounters;
use crate::datapath::snapshot::DataplaneCell;
use crate::datapath::worker::{PortPlan, Shared, Worker, WorkerSetup};
use crate::dpdk::{
    spawn_worker, Eal, EventGuard, Mempool, Port, PortQueues, PortSetup, QueueDir, WorkerHandle,
    DEFAULT_DATA_ROOM, SOCKET_ANY,
};
use crate::report::metrics::{self, MetricsServer};
use crate::report::portstats::PortCounters;
use crate::report::summary::{status_line, PortSummary, Summary, Totals};

/// How `pktdist run` was asked to run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Stop after this long; None = until SIGINT/SIGTERM.
    pub duration: Option<Duration>,
    /// Print the status line every `[control] status_interval`.
    pub status: bool,
    /// The configuration file (re-read on SIGHUP).
    pub config_path: Option<PathBuf>,
}

/// Everything that stops the run.
struct StopFlags {
    /// Set by SIGINT/SIGTERM.
    signal: Arc<AtomicBool>,
    /// Set by SIGHUP: re-read the configuration.
    reload: Arc<AtomicBool>,
}

impl StopFlags {
    fn install() -> Result<StopFlags, String> {
        let signal = Arc::new(AtomicBool::new(false));
        let reload = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            // A second signal while stopping ends the process at once.
            signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(&signal))
                .and_then(|_| signal_hook::flag::register(sig, Arc::clone(&signal)))
                .map_err(|e| format!("cannot install signal handler: {e}"))?;
        }
        signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&reload))
            .map_err(|e| format!("cannot install SIGHUP handler: {e}"))?;
        Ok(StopFlags { signal, reload })
    }
}

/// The EAL arguments of a configuration: its `[eal] args`, plus the control
/// core as the only EAL lcore (workers are our own threads, pinned and
/// registered with EAL when they start) unless the file sets a core list.
pub fn eal_args(cfg: &Config) -> Vec<String> {
    let mut args = cfg.eal.args.clone();
    let has_cores = args
        .iter()
        .any(|a| a == "-l" || a == "-c" || a.starts_with("--lcores") || a.starts_with("-l"));
    if !has_cores {
        args.push("-l".into());
        args.push(cfg.cores.control.to_string());
    }
    args
}

/// Runs the distributor until stopped; returns the summary.
pub fn run(cfg: &Config, opts: &RunOptions) -> Result<Summary, String> {
    let flags = StopFlags::install()?;
    let started = Instant::now();

    // Cores: check the plan against the machine before EAL narrows our view.
    let available: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    for &core in std::iter::once(&cfg.cores.control).chain(&cfg.cores.workers) {
        if !available.is_empty() && !available.contains(&core) {
            return Err(format!(
                "core {core} is not available to this process (available: {available:?})"
            ));
        }
    }

    // EAL starts its own threads (the interrupt thread, which runs the
    // drivers' event handlers, and others) on the CPUs this thread may use
    // outside EAL's core list: the worker cores, as the workers are
    // registered threads, not EAL lcores. Confined to the control core
    // first, this thread leaves EAL only the control core for them, so they
    // never preempt a worker.
    crate::dpdk::pin_current_thread(cfg.cores.control)
        .map_err(|e| format!("control core {}: {e}", cfg.cores.control))?;
    let eal = Eal::init(&eal_args(cfg)).map_err(|e| format!("EAL: {e}"))?;
    let pool = Mempool::new(
        "pktdist",
        cfg.mempool.mbufs,
        cfg.mempool.cache,
        DEFAULT_DATA_ROOM,
        SOCKET_ANY,
    )
    .map_err(|e| format!("mempool of {} mbufs: {e}", cfg.mempool.mbufs))?;

    let workers_n = cfg.cores.workers.len();
    let mut ports = Vec::with_capacity(cfg.ports.len());
    for p in &cfg.ports {
        let conf = PortSetup {
            queues: workers_n as u16,
            rx_desc: p.rx_descriptors,
            tx_desc: p.tx_descriptors,
            promiscuous: true,
            rss: true,
            // A memif port passes packets only while its peer is connected
            // and the event guard below has it open.
            guard_events: true,
        };
        let port = Port::open(&p.device, &conf, Arc::clone(&pool))
            .map_err(|e| format!("port {} ({}): {e}", p.name, p.device))?;
        let mac = port.mac();
        eprintln!(
            "pktdist: port {} = {} ({}), mac {}, {} queue(s){}{}",
            p.name,
            p.device,
            port.driver(),
            crate::config::MacAddr(mac),
            port.queues(),
            if port.rss() { ", RSS" } else { "" },
            if port.is_guarded() {
                ", polled while its link is up"
            } else {
                ""
            }
        );
        ports.push(Arc::new(port));
    }

    let plans: Vec<PortPlan> = cfg
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| PortPlan {
            forward_to: p
                .forward_to
                .as_deref()
                .and_then(|n| cfg.port_index(n))
                .unwrap_or(i),
            gateway_mac: p.gateway_mac.map(|m| m.0),
            unmatched_to: p.unmatched_to.as_deref().and_then(|n| cfg.port_index(n)),
        })
        .collect();

    // The traffic source transmits on the traffic port's queues (the
    // workers receive there) and drains the port the workers forward to.
    let traffic = match &cfg.traffic {
        None => None,
        Some(t) => {
            let port = cfg
                .port_index(&t.port)
                .ok_or_else(|| format!("[traffic] port {} is not configured", t.port))?;
            let sink = plans[port].forward_to;
            if sink == port {
                return Err(format!(
                    "[traffic] needs port {}'s forward_to set to another port: the source transmits on {} and the workers must forward elsewhere",
                    t.port, t.port
                ));
            }
            Some((port, sink))
        }
    };

    // Shared state.
    let mut registry = ServiceRegistry::from_config(cfg).map_err(|e| e.to_string())?;
    let dp = registry.snapshot().map_err(|e| e.to_string())?;
    let cell = Arc::new(DataplaneCell::new(dp));
    let (writer, reader) = AffinityTable::new(cfg.affinity.capacity);
    let manager = AffinityManager::new(writer);
    let auto = Arc::new(AutoAffinityTable::new(cfg.affinity.auto_capacity));
    let epoch = Instant::now();
    let shared = Shared {
        dataplane: Arc::clone(&cell),
        affinity: reader,
        auto_affinity: Arc::clone(&auto),
        epoch,
    };

    // Workers.
    let stop_workers = Arc::new(AtomicBool::new(false));
    let mut counters = Vec::with_capacity(workers_n);
    let mut handles: Vec<WorkerHandle<()>> = Vec::with_capacity(workers_n);
    for (w, &core) in cfg.cores.workers.iter().enumerate() {
        let mut queues = Vec::with_capacity(ports.len());
        for (i, port) in ports.iter().enumerate() {
            let dir = match traffic {
                Some((tp, _)) if tp == i => QueueDir::Rx,
                Some((_, sink)) if sink == i => QueueDir::Tx,
                _ => QueueDir::Both,
            };
            queues.push(port.queue_dir(w as u16, dir).map_err(|e| e.to_string())?);
        }
        let io = PortQueues::new(queues);
        let c = Arc::new(WorkerCounters::default());
        counters.push(Arc::clone(&c));
        let setup = WorkerSetup {
            id: w,
            ports: plans.clone(),
            flow_capacity: cfg.flow.capacity,
            flow_capacity_v6: cfg.flow.v6_capacity(),
            timeouts: cfg.flow_timeouts(),
        };
        let shared = shared.clone();
        let stop = Arc::clone(&stop_workers);
        let h = spawn_worker(core, &format!("pktdist-w{w}"), move || {
            let mut worker = Worker::new(io, setup, shared, c);
            worker.run(&stop);
        })
        .map_err(|e| format!("worker {w} on core {core}: {e}"))?;
        handles.push(h);
    }
    eprintln!(
        "pktdist: {} worker(s) on core(s) {:?}, control on core {}",
        workers_n, cfg.cores.workers, cfg.cores.control
    );

    // Traffic source.
    let stop_traffic = Arc::new(AtomicBool::new(false));
    let source = match (traffic, &cfg.traffic) {
        (Some((tp, sink)), Some(t)) => {
            let mut tx = Vec::new();
            let mut rx = Vec::new();
            for w in 0..workers_n as u16 {
                tx.push(
                    ports[tp]
                        .queue_dir(w, QueueDir::Tx)
                        .map_err(|e| e.to_string())?,
                );
                rx.push(
                    ports[sink]
                        .queue_dir(w, QueueDir::Rx)
                        .map_err(|e| e.to_string())?,
                );
            }
            let dp = cell.load();
            let targets: Vec<Target> = dp
                .services
                .iter()
                .map(|s| Target {
                    family: s.family,
                    vip: s.vip_bits,
                    port: s.port,
                    proto: s.proto,
                })
                .collect();
            let gen = TrafficGen::new(TrafficSpec {
                targets,
                clients: t.clients,
                concurrent_flows: t.concurrent_flows,
                packets_per_flow: t.packets_per_flow,
                packet_size: t.packet_size,
                ipv6_share: t.ipv6_share,
                src_mac: [0x02, 0, 0, 0, 0xee, 0x01],
                dst_mac: ports[tp].mac(),
                seed: 0x5eed,
            })?;
            let src = TrafficSource {
                gen,
                pool: Arc::clone(&pool),
                tx: PortQueues::new(tx),
                rx: PortQueues::new(rx),
                rate_pps: t.rate_pps,
            };
            let stop = Arc::clone(&stop_traffic);
            Some(
                spawn_worker(cfg.cores.control, "pktdist-traffic", move || src.run(&stop))
                    .map_err(|e| format!("traffic source: {e}"))?,
            )
        }
        _ => None,
    };

    // The control thread: this one.
    let (allowed, keyring) = auth_from_config(cfg)?;
    let mut server_cfg = ServerConfig::new(allowed, keyring);
    server_cfg.max_clock_skew = cfg.control.max_clock_skew.0;
    server_cfg.read_timeout = Some(Duration::from_millis(20));
    let mut server = ControlServer::bind(cfg.control.listen, server_cfg)
        .map_err(|e| format!("control listen {}: {e}", cfg.control.listen))?;
    // The bound address: `listen` may name port 0 (any free port).
    let control_addr = server.local_addr().unwrap_or(cfg.control.listen);
    eprintln!("pktdist: control protocol on udp {control_addr}");
    let mut plane = ControlPlane::new(
        registry,
        Arc::clone(&cell),
        manager,
        counters.clone(),
        epoch,
    );
    plane.set_auto_affinity(auto);
    let statics = plane.add_static_affinities(cfg);
    if !statics.is_empty() {
        return Err(statics.trim_start_matches("; ").to_string());
    }
    if let Some(path) = &opts.config_path {
        plane.set_config(path.clone(), cfg.clone());
    }
    // Guarded (memif) ports open once their peer is connected.
    let mut guard = EventGuard::new(&ports);
    guard.tick(|| {});
    let port_view = Arc::new(Mutex::new(PortView::new(
        cfg.ports
            .iter()
            .map(|p| p.name.clone())
            .zip(ports.iter().cloned()),
    )));
    let view = Arc::clone(&port_view);
    plane.set_port_stats(Box::new(move || {
        let mut v = view.lock().unwrap_or_else(|e| e.into_inner());
        v.refresh();
        v.summaries()
    }));
    let metrics = match cfg.control.metrics_listen {
        Some(addr) => {
            Some(MetricsServer::start(addr).map_err(|e| format!("metrics listen {addr}: {e}"))?)
        }
        None => None,
    };
    if let Some(m) = &metrics {
        eprintln!("pktdist: metrics on http://{}/metrics", m.local_addr());
    }

    let interval = cfg
        .control
        .status_interval
        .0
        .max(Duration::from_millis(100));
    let mut last_status = Instant::now();
    let mut prev = Totals::default();
    let mut last_tick = Instant::now();
    let deadline = opts.duration.map(|d| started + d);
    loop {
        server.poll(&mut plane, SystemTime::now());
        if last_tick.elapsed() >= Duration::from_millis(100) {
            last_tick = Instant::now();
            // The ports' counters are read before the drivers' events run
            // (a memif peer's leaving zeroes them), and again after, for the
            // links' new state.
            let view = || {
                port_view
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .refresh()
            };
            guard.tick(view);
            if let Some(e) = guard.take_error() {
                eprintln!("pktdist: memif ports stay closed: {e}");
            }
            view();
            plane.observe_server(server.counters(), server.latency());
            plane.tick();
            if let Some(m) = &metrics {
                if m.wants_update() {
                    m.publish(metrics::render(&plane.summary()));
                }
            }
            for (notify, notice) in plane.take_notices() {
                eprintln!(
                    "pktdist: affinity {} -> {} ended ({})",
                    notice.key.client,
                    notice.owner,
                    notice.reason.name()
                );
                if let Some(to) = notify {
                    if let Err(e) = server.send_ended(to, &notice.owner, &notice) {
                        eprintln!("pktdist: ended notification to {to}: {e}");
                    }
                }
            }
        }
        if flags.reload.swap(false, Ordering::Relaxed) {
            match plane.reload_from_file() {
                Ok(msg) => eprintln!("pktdist: SIGHUP: {msg}"),
                Err(e) => {
                    eprintln!("pktdist: SIGHUP: reload refused, running configuration kept: {e}")
                }
            }
        }
        if let Some((allowed, keyring)) = plane.take_pending_auth() {
            server.set_allowed(allowed);
            server.set_keyring(keyring);
        }
        if opts.status && last_status.elapsed() >= interval {
            let cur = Totals::collect(&counters);
            let secs = last_status.elapsed().as_secs_f64();
            println!(
                "{}",
                status_line(&prev, &cur, secs, plane.affinities().len())
            );
            let _ = std::io::stdout().flush();
            prev = cur;
            last_status = Instant::now();
        }
        if flags.signal.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }

    // Stop: the source first, so the workers drain what it sent.
    stop_traffic.store(true, Ordering::Relaxed);
    let report = source.map(|h| h.join().map_err(|_| "traffic source panicked".to_string()));
    std::thread::sleep(Duration::from_millis(50));
    stop_workers.store(true, Ordering::Relaxed);
    for (w, h) in handles.into_iter().enumerate() {
        h.join().map_err(|_| format!("worker {w} panicked"))?;
    }
    // The last reading of the ports, then the interrupt thread runs freely
    // again (closing a port may need it).
    port_view
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .refresh();
    guard.stop();
    plane.observe_server(server.counters(), server.latency());
    let mut summary = plane.summary();
    summary.seconds = started.elapsed().as_secs_f64();
    let dp = cell.load();
    if let Some(report) = report {
        let report = report?;
        summary
            .extra
            .insert("traffic source".into(), report.to_json(&dp));
    }
    // Ports stop and close as they drop (before the pool they fill from,
    // which they hold); EAL itself stays up until the process exits.
    drop(metrics);
    drop(ports);
    drop(eal);
    Ok(summary)
}

/// The ports' counters as the summary and the metrics show them, read by
/// the control thread every tick (see `report::portstats`), with the link
/// changes logged.
struct PortView {
    ports: Vec<(String, Arc<Port>, PortCounters)>,
}

impl PortView {
    fn new(ports: impl Iterator<Item = (String, Arc<Port>)>) -> PortView {
        PortView {
            ports: ports
                .map(|(name, port)| {
                    let mut c = PortCounters::new();
                    // Up until a reading says otherwise: a port that starts
                    // down (memif without a peer yet) is logged as such.
                    c.update(&PortSummary::default(), true);
                    (name, port, c)
                })
                .collect(),
        }
    }

    fn refresh(&mut self) {
        for (name, port, counters) in &mut self.ports {
            let Ok(s) = port.stats() else { continue };
            // The link after the counters: a driver that zeroes them when
            // its peer leaves (memif) reports the link down first.
            let up = port.link().is_ok_and(|l| l.up);
            if up != counters.link_up() {
                eprintln!(
                    "pktdist: port {name}: link {}",
                    if up { "up" } else { "down" }
                );
            }
            counters.update(&device_counters(&s), up);
        }
    }

    fn summaries(&self) -> Vec<PortSummary> {
        self.ports
            .iter()
            .map(|(name, _, c)| c.summary(name))
            .collect()
    }
}

/// A port's device counters, as read.
fn device_counters(s: &crate::dpdk::DeviceStats) -> PortSummary {
    PortSummary {
        name: String::new(),
        ipackets: s.ipackets,
        opackets: s.opackets,
        ibytes: s.ibytes,
        obytes: s.obytes,
        imissed: s.imissed,
        ierrors: s.ierrors,
        oerrors: s.oerrors,
        rx_nombuf: s.rx_nombuf,
        link_down: false,
    }
}
