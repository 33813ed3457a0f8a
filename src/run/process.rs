//! `pktdist run`: starts EAL, the ports, one pinned worker per worker core,
//! the optional built-in traffic source and the control thread, and stops
//! them cleanly on SIGINT/SIGTERM or when the run's duration ends.
//!
//! [`run`] is four steps: [`start`] (EAL, mempool, ports), [`spawn`]
//! (workers and traffic source, after the [`ControlThread`] that creates the
//! tables they read), serve (the control thread's loop on this thread) and
//! [`stop`] (in order, then the summary).
//!
//! This is where the distribution logic meets DPDK; it holds no `unsafe`
//! itself: everything DPDK goes through [`crate::dpdk`].

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::notify::Notifier;
use super::traffic_source::{TrafficReport, TrafficSource};
use super::trafficgen::{Target, TrafficGen, TrafficSpec};
use crate::config::{Config, Spread};
use crate::control::thread::{ControlSetup, ControlThread, PortStatsSource, PortUpkeep};
use crate::datapath::counters::WorkerCounters;
use crate::datapath::worker::{PortPlan, Shared, Worker, WorkerSetup};
use crate::dpdk::{
    spawn_worker, DpdkError, Eal, EventGuard, Mempool, Port, PortQueues, PortSetup, QueueDir,
    SocketPools, WorkerHandle, DEFAULT_DATA_ROOM, SOCKET_ANY,
};
use crate::report::portstats::{LinkWatch, PortCounters};
use crate::report::summary::{PortSummary, Summary};

/// How `pktdist run` was asked to run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Stop after this long; None = until SIGINT/SIGTERM.
    pub duration: Option<Duration>,
    /// Print the status line every `[control] status_interval`.
    pub status: bool,
    /// The configuration file (re-read on SIGHUP).
    pub config_path: Option<PathBuf>,
    /// Start without the affinities of a state file that cannot be used
    /// (`--discard-bad-state`) instead of refusing to start.
    pub discard_bad_state: bool,
}

/// The signals' flags.
struct StopFlags {
    /// Set by SIGINT/SIGTERM.
    signal: Arc<AtomicBool>,
    /// Set by SIGHUP: re-read the configuration.
    reload: Arc<AtomicBool>,
    /// Set, beside `signal`, when a worker died ([`WorkerWatch`]).
    worker_died: Arc<AtomicBool>,
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
        Ok(StopFlags {
            signal,
            reload,
            worker_died: Arc::new(AtomicBool::new(false)),
        })
    }
}

/// The EAL arguments of a configuration: its `[eal] args`, plus the control
/// core as the only EAL lcore (workers are our own threads, pinned and
/// registered with EAL when they start) unless the file sets a core list.
pub fn eal_args(cfg: &Config) -> Vec<String> {
    let mut args = cfg.eal.args.clone();
    // `-l 0-3`, `-l0-3`, `-c 0x3`, `-c0x3`, `--lcores ...`, `--lcores=...`.
    let has_cores = args
        .iter()
        .any(|a| a.starts_with("-l") || a.starts_with("-c") || a.starts_with("--lcores"));
    if !has_cores {
        args.push("-l".into());
        args.push(cfg.cores.control.to_string());
    }
    args
}

/// Runs the distributor until stopped; returns the summary.
pub fn run(cfg: &Config, opts: &RunOptions) -> Result<Summary, String> {
    let flags = StopFlags::install()?;
    let started = start(cfg)?;
    let keeper = PortKeeper::new(cfg, &started.ports);
    let workers: Vec<Arc<WorkerCounters>> = cfg
        .cores
        .workers
        .iter()
        .map(|_| Arc::new(WorkerCounters::default()))
        .collect();
    let mut control = ControlThread::new(
        cfg,
        ControlSetup {
            config_path: opts.config_path.clone(),
            workers: workers.clone(),
            port_stats: Some(keeper.stats()),
            port_upkeep: Some(keeper.upkeep()),
            status: opts
                .status
                .then(|| Box::new(std::io::stdout()) as Box<dyn Write + Send>),
            discard_bad_state: opts.discard_bad_state,
            // With `[cluster]`, the store thread (started after EAL, so it
            // runs on the control core like this thread).
            store: cfg
                .cluster
                .as_ref()
                .map(crate::cluster::etcd::spawn)
                .transpose()?,
        },
    )?;
    let threads = spawn(cfg, &started, &control.shared(), workers, &flags)?;
    // The run's time (its `--duration`, the summary's seconds and rates)
    // counts from here: EAL's and the ports' start, which can take seconds,
    // is not forwarding time.
    let began = Instant::now();

    // Serve: the control thread's loop runs on this thread.
    let addr = control.local_addr().unwrap_or(cfg.control.listen);
    log::info!("control protocol on udp {addr}");
    if let Some(addr) = control.metrics_addr() {
        log::info!("metrics on http://{addr}/metrics");
    }
    // READY=1 at the control thread's first tick that finds it ready: at
    // once alone, once the shared table is loaded in cluster mode.
    let status = format!(
        "forwarding on {} port(s) with {} worker(s); control on udp {addr}",
        cfg.ports.len(),
        cfg.cores.workers.len()
    );
    control.on_ready(move || Notifier::from_env().ready(&status));
    let mut notifier = Notifier::from_env();
    control.serve_until(
        &flags.signal,
        &flags.reload,
        // A duration too long to add to the clock has no end to wait for.
        opts.duration.and_then(|d| began.checked_add(d)),
    );
    notifier.stopping();
    // Asked to stop by a signal, or stopping as the cluster's store thread
    // ended: not ready from now on (BGP withdraws the VIPs behind
    // `/ready`), forwarding on for `[control] stop_delay` so that what the
    // routers send meanwhile still reaches its backends. Not after a
    // worker died: its queues would stay unread meanwhile; nor when it
    // never was ready: no router was sending here.
    let delay = control.config().control.stop_delay;
    let store_gone = control.store_gone();
    let signalled = flags.signal.load(Ordering::Relaxed) || store_gone;
    if signalled
        && control.was_ready()
        && !flags.worker_died.load(Ordering::Relaxed)
        && !delay.0.is_zero()
    {
        log::info!(
            "stopping: not ready, forwarding for {delay} more while the routers withdraw this instance"
        );
        control.linger(Instant::now() + delay.0);
    }
    log::info!("stopping");

    control.stop_health_checks();
    // The requested affinities as the last request left them, before
    // anything that could fail.
    if let Err(e) = control.save_state() {
        log::error!("{e}: the affinities of this run are not saved");
    }
    let summary = stop(threads, &control);
    keeper.stop();
    let mut summary = summary?;
    summary.set_seconds(began.elapsed().as_secs_f64());
    // The control thread goes first (its port-stats source holds the ports),
    // then the ports, which stop and close as they drop (before the pool
    // they fill from, which they hold); EAL itself stays up until the
    // process exits.
    drop(control);
    drop(keeper);
    drop(started);
    if store_gone {
        // For the supervisor to start it anew, which loads the shared
        // table again.
        return Err("the cluster's store thread ended".into());
    }
    Ok(summary)
}

/// What [`start`] brings up; its fields drop in order.
struct Started {
    ports: Vec<Arc<Port>>,
    /// The mbuf pools (the ports hold theirs too).
    _pools: Vec<Arc<Mempool>>,
    _eal: Eal,
}

/// Checks the core plan against the machine, then starts EAL, the mempool
/// and the ports (one queue pair per worker on each).
fn start(cfg: &Config) -> Result<Started, String> {
    // Cores: each must take a pinned thread, checked before EAL starts.
    if let Some(e) = super::cores::refused(cfg) {
        return Err(e);
    }
    // The buffers: `check` refuses fewer than the receive rings take; all
    // rings and caches may take more than that.
    let (_, rings) = cfg.ring_mbufs();
    if u64::from(cfg.mempool.mbufs) < rings {
        log::warn!(
            "[mempool] mbufs = {}: the ports' rings and the threads' caches can hold up to {rings}; \
             under load receive may fail for want of a buffer (pktdist_port_no_mbuf_total)",
            cfg.mempool.mbufs
        );
    }
    // Memory: the tables are allocated (and written) at start; refuse
    // sizes the machine cannot hold before EAL or any of them.
    let tables = crate::run::memory::TableMemory::of(cfg);
    if let Some(available) = crate::run::memory::available() {
        tables.check(available)?;
    }
    log::info!("tables: {tables}");
    let shared = cfg.cores.shared_cpus();
    if !shared.is_empty() {
        log::warn!(
            "[cores] share_cpus: CPU(s) {shared:?} each run more than one of pktdist's threads; \
             they take turns, so workers there forward far less than on cores of their own and a worker \
             preempted inside a shared structure's critical section holds up the others for a time slice \
             (for tests and small machines, never for production){}",
            if cfg.cores.idle_sleep.is_none() {
                "; set [cores] idle_sleep so that idle workers leave the CPU to the others"
            } else {
                ""
            }
        );
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
    // EAL pinned this thread (pktdist's control thread) to its main
    // lcore's CPUs: a core list in [eal] args may have put it elsewhere,
    // onto a worker's core.
    let pinned = crate::dpdk::allowed_cpus();
    if pinned != [cfg.cores.control] {
        return Err(format!(
            "[eal] args put EAL's main thread, pktdist's control thread, on CPU(s) {pinned:?}, \
             not on [cores] control = {}: leave the core list (-l, -c, --lcores, --main-lcore) \
             out of [eal] args, or start it with the control core",
            cfg.cores.control
        ));
    }
    // One mbuf pool per NUMA socket with ports, made as its first port
    // opens: a NIC receives into memory on its own socket.
    let pools = SocketPools::new(
        "pktdist",
        cfg.mempool.mbufs,
        cfg.mempool.cache,
        DEFAULT_DATA_ROOM,
    );

    let mut ports = Vec::with_capacity(cfg.ports.len());
    let workers = cfg.cores.workers.len();
    let fed = cfg.traffic.as_ref().map(|t| t.port.as_str());
    let sink = fed
        .and_then(|t| cfg.port_index(t))
        .and_then(|i| cfg.ports[i].forward_to.as_deref());
    for p in &cfg.ports {
        let conf = PortSetup {
            queues: cfg.cores.workers.len() as u16,
            rx_desc: p.rx_descriptors,
            tx_desc: p.tx_descriptors,
            promiscuous: p.promiscuous(),
            rss: true,
            // A memif port passes packets only while its peer is connected
            // and the event guard below has it open.
            guard_events: true,
            mtu: p.mtu,
        };
        let port = Port::open_on(&p.device, &conf, &pools).map_err(|e| match e {
            DpdkError::Call {
                op: "rte_pktmbuf_pool_create",
                ..
            } => format!(
                "port {} ({}): its pool of {} mbufs: {e}",
                p.name, p.device, cfg.mempool.mbufs
            ),
            e => format!("port {} ({}): {e}", p.name, p.device),
        })?;
        let pool = port.pool();
        if port.socket() != SOCKET_ANY && pool.socket() != port.socket() {
            log::warn!(
                "port {}: the device is on NUMA socket {}, which has no room for a pool of {} mbufs: \
                 its mbufs come from pool {} (any socket), and its packets cross between sockets; \
                 reserve huge pages on socket {} (or lower [mempool] mbufs)",
                p.name,
                port.socket(),
                cfg.mempool.mbufs,
                pool.name(),
                port.socket()
            );
        }
        let mac = port.mac();
        let spread = match (port.rss(), p.spread(workers, fed == Some(p.name.as_str()))) {
            (_, Spread::OneQueue) => "",
            (true, _) => ", RSS on IP addresses and TCP/UDP ports",
            (false, Spread::KernelFanout) => ", flows spread by the kernel's packet fan-out",
            (false, Spread::Peer) => ", flows spread by the memif peer",
            (false, Spread::TrafficSource) => ", flows spread by the traffic source",
            // The traffic source's sink: the workers only transmit there.
            (false, _) if sink == Some(p.name.as_str()) => "",
            (false, Spread::Rss) => {
                log::warn!(
                    "port {}: {} has no RSS for IP, TCP and UDP: every frame it receives arrives on queue 0, and worker 0 alone handles that port's traffic",
                    p.name,
                    port.driver()
                );
                ", no RSS"
            }
            (false, Spread::Driver) => {
                log::warn!(
                    "port {}: {} has no RSS: the driver or the sender, not the flow, decides which worker's queue a frame arrives on (net_ring: the queue it was transmitted on), so a flow may change workers",
                    p.name,
                    port.driver()
                );
                ", no RSS"
            }
        };
        if port.mtu() < p.mtu && p.is_pci() {
            log::warn!(
                "port {}: the device takes an MTU of {} at most (one receive buffer holds 2,048 bytes): \
                 received frames longer than that are dropped, below the port's mtu of {}",
                p.name,
                port.mtu(),
                p.mtu
            );
        }
        log::info!(
            "port {} = {} ({}), mac {}{}, device mtu {}, {} queue(s){}{}; {}, mbufs from pool {}",
            p.name,
            p.device,
            port.driver(),
            crate::config::MacAddr(mac),
            if p.promiscuous() {
                " (promiscuous: any destination MAC)"
            } else {
                " (receives frames to this MAC and broadcast only)"
            },
            port.mtu(),
            port.queues(),
            spread,
            if port.is_guarded() {
                ", polled while its link is up"
            } else {
                ""
            },
            match port.socket() {
                SOCKET_ANY => "NUMA socket unknown".to_string(),
                s => format!("NUMA socket {s}"),
            },
            pool.name(),
        );
        ports.push(Arc::new(port));
    }
    Ok(Started {
        ports,
        _pools: pools.pools(),
        _eal: eal,
    })
}

/// The threads [`spawn`] started and the flags that stop them.
struct Threads {
    workers: Vec<WorkerHandle<()>>,
    stop_workers: Arc<AtomicBool>,
    source: Option<WorkerHandle<TrafficReport>>,
    stop_source: Arc<AtomicBool>,
}

impl Drop for Threads {
    /// Threads [`stop`] did not join, those of a start that failed part
    /// way (a later worker or the traffic source could not start), are
    /// stopped and joined here: dropped before the ports and pools they
    /// poll are closed, they never outlive them.
    fn drop(&mut self) {
        self.stop_source.store(true, Ordering::Relaxed);
        self.stop_workers.store(true, Ordering::Relaxed);
        if let Some(h) = self.source.take() {
            let _ = h.join();
        }
        if !self.workers.is_empty() {
            log::info!("stopping the {} worker(s) started", self.workers.len());
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Watches one worker thread: dropped when the thread ends, it stops the
/// whole process (as SIGTERM does) if the thread ended while it should
/// still forward, which only a panic does. A dead worker would otherwise
/// leave its receive queues unread, and the clients RSS sends there
/// black-holed, while the instance still said it was ready; stopping
/// withdraws it (`/ready`, and BGP behind it), and the panic, reported when
/// the worker is joined, makes `pktdist run` exit with an error for its
/// supervisor to restart it.
struct WorkerWatch {
    worker: usize,
    /// Set when the workers are asked to stop.
    stopping: Arc<AtomicBool>,
    /// The process's stop flag (SIGINT/SIGTERM's).
    stop_process: Arc<AtomicBool>,
    /// Tells the stop that a worker died (no stop delay then).
    died: Arc<AtomicBool>,
}

impl Drop for WorkerWatch {
    fn drop(&mut self) {
        if self.stopping.load(Ordering::Relaxed) {
            return;
        }
        log::error!(
            "worker {} ended while forwarding{}: stopping pktdist",
            self.worker,
            if std::thread::panicking() {
                " (it panicked)"
            } else {
                ""
            }
        );
        self.died.store(true, Ordering::Relaxed);
        self.stop_process.store(true, Ordering::Relaxed);
    }
}

/// Each port's plan: forwarded packets leave by its `forward_to` port, to
/// that port's next hop and within that port's link MTU.
fn port_plans(cfg: &Config) -> Vec<PortPlan> {
    (0..cfg.ports.len())
        .map(|i| {
            let out = cfg.forwarding_port(i);
            PortPlan {
                forward_to: out,
                gateway_mac: cfg.ports[out].gateway_mac.map(|m| m.0),
                unmatched_to: cfg.ports[i]
                    .unmatched_to
                    .as_deref()
                    .and_then(|n| cfg.port_index(n)),
                mtu: cfg.ports[out].mtu.into(),
            }
        })
        .collect()
}

/// Starts one pinned worker per worker core (each with its `counters`),
/// reading the tables of `shared`, and the traffic source if configured. A
/// worker that dies sets the stop flags ([`WorkerWatch`]).
fn spawn(
    cfg: &Config,
    started: &Started,
    shared: &Shared,
    counters: Vec<Arc<WorkerCounters>>,
    flags: &StopFlags,
) -> Result<Threads, String> {
    let plans = port_plans(cfg);
    let traffic = traffic_ports(cfg, &plans)?;
    let ports = &started.ports;

    // Each thread joins `threads` once started: an error further on drops
    // it, which stops and joins them.
    let mut threads = Threads {
        workers: Vec::with_capacity(counters.len()),
        stop_workers: Arc::new(AtomicBool::new(false)),
        source: None,
        stop_source: Arc::new(AtomicBool::new(false)),
    };
    let worker_counters = counters.clone();
    for (w, (&core, c)) in cfg.cores.workers.iter().zip(counters).enumerate() {
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
        let setup = WorkerSetup {
            id: w,
            ports: plans.clone(),
            flow_capacity: cfg.flow.capacity,
            flow_capacity_v6: cfg.flow.v6_capacity(),
            timeouts: cfg.flow_timeouts(),
            syn_flood_rate: cfg.flow.syn_flood_rate,
            icmp: cfg.icmp_settings(),
        };
        let shared = shared.clone();
        let stop = Arc::clone(&threads.stop_workers);
        let idle_sleep = cfg.cores.idle_sleep.map(|d| d.0);
        let (stopping, stop_process, died) = (
            Arc::clone(&threads.stop_workers),
            Arc::clone(&flags.signal),
            Arc::clone(&flags.worker_died),
        );
        let h = spawn_worker(core, &format!("pktdist-w{w}"), move || {
            // Watched from its start: a worker whose set-up failed (its
            // function never runs) is `spawn`'s error, not a death.
            let _watch = WorkerWatch {
                worker: w,
                stopping,
                stop_process,
                died,
            };
            let mut worker = Worker::new(io, setup, shared, c);
            worker.run(&stop, idle_sleep);
        })
        .map_err(|e| format!("worker {w} on core {core}: {e}"))?;
        threads.workers.push(h);
    }
    log::info!(
        "{} worker(s) on core(s) {:?}, control on core {}",
        threads.workers.len(),
        cfg.cores.workers,
        cfg.cores.control
    );

    if let (Some((tp, sink)), Some(t)) = (traffic, &cfg.traffic) {
        let mut tx = Vec::new();
        let mut rx = Vec::new();
        for w in 0..threads.workers.len() as u16 {
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
        let targets: Vec<Target> = shared
            .dataplane
            .load()
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
            pool: Arc::clone(ports[tp].pool()),
            tx: PortQueues::new(tx),
            rx: PortQueues::new(rx),
            workers: worker_counters,
            rate_pps: t.rate_pps,
        };
        let stop = Arc::clone(&threads.stop_source);
        threads.source = Some(
            spawn_worker(cfg.cores.control, "pktdist-traffic", move || src.run(&stop))
                .map_err(|e| format!("traffic source: {e}"))?,
        );
    }
    Ok(threads)
}

/// The traffic source's ports, (where it transmits, where it drains): it
/// transmits on the traffic port's queues (the workers receive there) and
/// drains the port the workers forward to.
fn traffic_ports(cfg: &Config, plans: &[PortPlan]) -> Result<Option<(usize, usize)>, String> {
    let Some(t) = &cfg.traffic else {
        return Ok(None);
    };
    let port = cfg
        .port_index(&t.port)
        .ok_or_else(|| format!("[traffic] port {} is not configured", t.port))?;
    // The configuration's check: the sink is another port.
    Ok(Some((port, plans[port].forward_to)))
}

/// Stops the traffic source first, so that the workers drain what it sent,
/// then the workers; returns the summary, with the source's report.
fn stop(mut threads: Threads, control: &ControlThread) -> Result<Summary, String> {
    threads.stop_source.store(true, Ordering::Relaxed);
    let report = threads
        .source
        .take()
        .map(|h| h.join().map_err(|_| "traffic source panicked".to_string()));
    std::thread::sleep(Duration::from_millis(50));
    threads.stop_workers.store(true, Ordering::Relaxed);
    // Every worker is joined (the ports' keeper, stopped next, must find
    // none polling), then the first that panicked is reported.
    let panicked: Vec<usize> = std::mem::take(&mut threads.workers)
        .into_iter()
        .enumerate()
        .filter_map(|(w, h)| h.join().is_err().then_some(w))
        .collect();
    if let Some(w) = panicked.first() {
        return Err(format!("worker {w} panicked"));
    }
    let mut summary = control.summary();
    if let Some(report) = report {
        summary.extra.traffic_source = Some(report?.summary(control.plane().dataplane()));
    }
    Ok(summary)
}

/// The ports as the control thread keeps them: their counters, read for
/// the summary and the metrics, and their upkeep every tick. A memif port's
/// link events (its peer leaving or coming) are handled by EAL's interrupt
/// thread only while every worker is kept off the port (`dpdk::EventGuard`),
/// and the counters are read just before, since a peer's leaving zeroes
/// them.
struct PortKeeper {
    view: Arc<Mutex<PortView>>,
    guard: Arc<Mutex<EventGuard>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PortKeeper {
    /// Guarded (memif) ports open once their peer is connected.
    fn new(cfg: &Config, ports: &[Arc<Port>]) -> PortKeeper {
        let ways_out = cfg
            .ports
            .iter()
            .map(|p| {
                cfg.ports
                    .iter()
                    .any(|q| q.forward_to.as_deref().unwrap_or(&q.name) == p.name)
            })
            .collect();
        let view = PortView::new(
            cfg.ports
                .iter()
                .map(|p| p.name.clone())
                .zip(ports.iter().cloned()),
            ways_out,
        );
        let mut guard = EventGuard::new(ports);
        guard.tick(|| {});
        PortKeeper {
            view: Arc::new(Mutex::new(view)),
            guard: Arc::new(Mutex::new(guard)),
        }
    }

    fn stats(&self) -> PortStatsSource {
        let view = Arc::clone(&self.view);
        Box::new(move || {
            let mut v = lock(&view);
            v.refresh();
            v.summaries()
        })
    }

    fn upkeep(&self) -> PortUpkeep {
        let (view, guard) = (Arc::clone(&self.view), Arc::clone(&self.guard));
        Box::new(move || {
            let refresh = || lock(&view).refresh();
            let mut g = lock(&guard);
            g.tick(refresh);
            if let Some(e) = g.take_error() {
                log::error!("memif ports stay closed: {e}");
            }
            drop(g);
            refresh();
            lock(&view).failed()
        })
    }

    /// The last reading, then EAL's interrupt thread runs freely again
    /// (closing a port may need it).
    fn stop(&self) {
        lock(&self.view).refresh();
        lock(&self.guard).stop();
    }
}

/// The ports' counters as the summary and the metrics show them, read by
/// the control thread every tick (see `report::portstats`), with the link
/// changes logged.
struct PortView {
    ports: Vec<(String, Arc<Port>, PortCounters)>,
    links: Vec<LinkWatch>,
    /// Per port, whether forwarded traffic leaves by it (some port's
    /// `forward_to`, by default itself): the ports readiness counts. A
    /// router sees its own side of a receiving port's link go down and
    /// stops sending there; the way out to the backends it cannot see.
    ways_out: Vec<bool>,
}

/// How long a change of a port's link must last to count for readiness:
/// down that long after having been up, the instance reads as not ready
/// (its routes withdrawn); up that long again, ready. Long enough to ride
/// over a flap, short against the seconds a router takes to notice.
const LINK_HOLD: Duration = Duration::from_secs(1);

impl PortView {
    fn new(ports: impl Iterator<Item = (String, Arc<Port>)>, ways_out: Vec<bool>) -> PortView {
        let ports: Vec<_> = ports
            .map(|(name, port)| {
                let mut c = PortCounters::new();
                // Up until a reading says otherwise: a port that starts
                // down (memif without a peer yet) is logged as such.
                c.update(&PortSummary::default(), true);
                (name, port, c)
            })
            .collect();
        PortView {
            links: vec![LinkWatch::default(); ports.len()],
            ports,
            ways_out,
        }
    }

    fn refresh(&mut self) {
        let now = Instant::now();
        for ((name, port, counters), link) in self.ports.iter_mut().zip(&mut self.links) {
            // The link on both sides of the counters: a driver that zeroes
            // them when its peer leaves (memif) reports the link down
            // first, and a reading is one of an up link only if the link
            // was up before and after it (zeros read while a peer left and
            // came back would otherwise pass for a counter reset, and the
            // driver's carried-on counts would be added twice).
            let before = port.link().is_ok_and(|l| l.up);
            let Ok(s) = port.stats() else { continue };
            let up = before && port.link().is_ok_and(|l| l.up);
            if up != counters.link_up() {
                if up {
                    log::info!("port {name}: link up");
                } else {
                    log::warn!("port {name}: link down");
                }
            }
            counters.update(&device_counters(&s), up);
            link.update(up, now, LINK_HOLD);
        }
    }

    /// The ports forwarded traffic leaves by whose link has failed
    /// ([`LinkWatch`], [`LINK_HOLD`]).
    fn failed(&self) -> Vec<String> {
        self.ports
            .iter()
            .zip(&self.links)
            .zip(&self.ways_out)
            .filter(|((_, link), &way_out)| way_out && link.failed())
            .map(|(((name, ..), _), _)| name.clone())
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A watch, its workers' stop flag, and the process's stop and
    /// worker-died flags.
    #[allow(clippy::type_complexity)]
    fn watch(
        w: usize,
    ) -> (
        WorkerWatch,
        Arc<AtomicBool>,
        Arc<AtomicBool>,
        Arc<AtomicBool>,
    ) {
        let flag = || Arc::new(AtomicBool::new(false));
        let (stopping, stop_process, died) = (flag(), flag(), flag());
        let watch = WorkerWatch {
            worker: w,
            stopping: Arc::clone(&stopping),
            stop_process: Arc::clone(&stop_process),
            died: Arc::clone(&died),
        };
        (watch, stopping, stop_process, died)
    }

    /// The control core becomes EAL's core list unless `[eal] args` has
    /// one, in any of EAL's spellings.
    #[test]
    fn eal_args_add_a_core_list_only_where_none_is_given() {
        let mut cfg = Config::parse(
            &crate::config::testing::with_services(crate::config::testing::WEB),
            "t.toml",
        )
        .unwrap();
        cfg.eal.args = vec!["--no-huge".into()];
        let args = eal_args(&cfg);
        assert_eq!(args[1..], ["-l".to_string(), cfg.cores.control.to_string()]);
        for given in [
            &["-l", "0-1"][..],
            &["-l0-1"],
            &["-c", "0x3"],
            &["-c0x3"],
            &["--lcores", "0@0"],
            &["--lcores=0@0"],
        ] {
            cfg.eal.args = given.iter().map(|s| s.to_string()).collect();
            assert_eq!(eal_args(&cfg), cfg.eal.args, "{given:?}");
        }
    }

    /// Forwarded packets take the next hop and MTU of the port they leave
    /// by, whichever port they came in on.
    #[test]
    fn plans_take_the_forwarding_ports_next_hop_and_mtu() {
        let text = crate::config::testing::with_services(&format!(
            "{}{}",
            r#"
[[ports]]
name = "down"
device = "net_ring1"
gateway_mac = "02:00:00:00:00:aa"
mtu = 1600
[[ports]]
name = "up"
device = "net_ring2"
forward_to = "down"
unmatched_to = "p0"
gateway_mac = "02:00:00:00:00:bb"
"#,
            crate::config::testing::WEB
        ));
        let text = text + "[[services.backends]]\nname = \"b\"\naddress = \"10.0.0.1\"\n";
        let cfg = Config::parse(&text, "t.toml").unwrap();
        let plans = port_plans(&cfg);
        let (p0, down, up) = (plans[0], plans[1], plans[2]);
        assert_eq!((p0.forward_to, p0.mtu), (0, 1500));
        assert_eq!(p0.gateway_mac, Some([2, 0, 0, 0, 0, 0xfe]));
        assert_eq!((down.forward_to, down.mtu), (1, 1600));
        assert_eq!(down.gateway_mac, Some([2, 0, 0, 0, 0, 0xaa]));
        // "up" forwards out of "down": down's gateway and MTU, not its own.
        assert_eq!((up.forward_to, up.mtu), (1, 1600));
        assert_eq!(up.gateway_mac, Some([2, 0, 0, 0, 0, 0xaa]));
        assert_eq!((up.unmatched_to, down.unmatched_to), (Some(0), None));
    }

    /// A worker that panics while forwarding stops the process; one that
    /// ends because it was asked to does not.
    #[test]
    fn a_dead_worker_stops_the_process() {
        let (w, _stopping, stop_process, died) = watch(3);
        let t = std::thread::spawn(move || {
            let _watch = w;
            panic!("a worker's bug");
        });
        assert!(t.join().is_err());
        assert!(stop_process.load(Ordering::Relaxed));
        // Which the stop tells from a signal: no stop delay then.
        assert!(died.load(Ordering::Relaxed));

        let (w, stopping, stop_process, died) = watch(1);
        stopping.store(true, Ordering::Relaxed);
        std::thread::spawn(move || drop(w)).join().unwrap();
        assert!(!stop_process.load(Ordering::Relaxed));
        assert!(!died.load(Ordering::Relaxed));
    }
}
