//! The control thread as one type: [`ControlThread`] owns the protocol
//! server, the control plane (with the service registry and the affinity
//! manager), the configuration file for reload, the Prometheus endpoint and
//! the status line, and creates the tables the workers read ([`Shared`]).
//!
//! The process around it builds it from the configuration and a few handles
//! ([`ControlSetup`]), hands [`ControlThread::shared`] to the workers, runs
//! [`ControlThread::serve_until`] and asks for the [`ControlThread::summary`]
//! at the end. Each [`step`](ControlThread::step) expires affinities and
//! sends their AFFINITY_ENDED notices (every [`TICK`]), takes the health
//! checker's reports (a tick's changes in one snapshot), keeps the
//! state file current when `[affinity] state_file` is set, prints the
//! status line when due, and serves the requests waiting on the socket;
//! [`ControlThread::save_state`] writes the state file at shutdown.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::affinity::auto::AutoAffinityTable;
use crate::affinity::manager::AffinityManager;
use crate::affinity::table::AffinityTable;
use crate::cluster::StoreHandle;
use crate::config::Config;
use crate::control::counters::{control_summary, ServerCounters};
use crate::control::handler::{Call, ControlHandler, Response};
use crate::control::plane::{ControlPlane, HealthVerdict};
use crate::control::registry::ServiceRegistry;
use crate::control::reload::ConfigFile;
use crate::control::server::{ControlServer, ServerAuth, ServerConfig};
use crate::control::state_saver::StateSaver;
use crate::control::statics;
use crate::control::store_sync::StoreSync;
use crate::datapath::counters::WorkerCounters;
use crate::datapath::latency::Percentiles;
use crate::datapath::snapshot::DataplaneCell;
use crate::datapath::worker::Shared;
use crate::health::{HealthChange, HealthMonitor, HealthView};
use crate::protocol::auth::unix_ms;
use crate::protocol::message::{EndedNotice, Request, ReturnCode};
use crate::protocol::rate_limit::RateLimiter;
use crate::report::metrics::{self, MetricsServer};
use crate::report::summary::{status_line, PortSummary, Summary, Totals};

/// How often affinities are expired, their notices sent and the metrics
/// refreshed (when due).
pub const TICK: Duration = Duration::from_millis(100);
/// How long one step waits for a first datagram.
const POLL_WAIT: Duration = Duration::from_millis(20);
/// The shortest status-line period.
const MIN_STATUS_INTERVAL: Duration = Duration::from_millis(100);

/// A source of the ports' device counters.
pub type PortStatsSource = Box<dyn Fn() -> Vec<PortSummary> + Send>;

/// The ports' upkeep: the names of the ports forwarded traffic leaves by
/// whose link has failed (down past a hold-down after having been up).
pub type PortUpkeep = Box<dyn FnMut() -> Vec<String> + Send>;

/// What the process hands the control thread besides the configuration.
pub struct ControlSetup {
    /// The file reload re-reads (None: reload refuses).
    pub config_path: Option<PathBuf>,
    /// The workers' counters, one per worker.
    pub workers: Vec<Arc<WorkerCounters>>,
    /// The ports' device counters (None: no ports).
    pub port_stats: Option<PortStatsSource>,
    /// Upkeep of the ports, run first in every tick (a tenth of a second):
    /// the DPDK layer's link events and counter readings (None: nothing).
    pub port_upkeep: Option<PortUpkeep>,
    /// Where the status line goes every `[control] status_interval` (None:
    /// no status line).
    pub status: Option<Box<dyn Write + Send>>,
    /// A state file (`[affinity] state_file`) that cannot be used is moved
    /// aside and the instance starts without it, instead of refusing to
    /// start (`pktdist run --discard-bad-state`).
    pub discard_bad_state: bool,
    /// Cluster mode: the store thread's handle, exactly when the
    /// configuration has `[cluster]`.
    pub store: Option<StoreHandle>,
}

/// The control thread: everything that changes what the workers see, and
/// everything an instance says about itself.
pub struct ControlThread {
    server: ControlServer,
    plane: ControlPlane,
    file: ConfigFile,
    shared: Shared,
    port_stats: Option<PortStatsSource>,
    port_upkeep: Option<PortUpkeep>,
    /// The ports whose link failed, as the last upkeep said: the instance
    /// is not ready while there is one.
    ports_failed: Vec<String>,
    metrics: Option<MetricsServer>,
    status: Option<StatusLine>,
    /// The state file, when `[affinity] state_file` is set.
    state: Option<StateSaver>,
    next_tick: Instant,
    /// The health checks (a thread of their own while some backend is
    /// checked).
    health: HealthMonitor,
    /// Cluster mode: the shared affinity table.
    cluster: Option<StoreSync>,
    /// Called once, at the first tick that finds the instance ready.
    on_ready: Option<Box<dyn FnOnce() + Send>>,
    /// Asked to stop: never ready again (see [`ControlThread::linger`]).
    stopping: bool,
    /// Some tick found the instance ready (routers may have been told).
    was_ready: bool,
}

/// The status line's output and schedule.
struct StatusLine {
    out: Box<dyn Write + Send>,
    interval: Duration,
    last: Instant,
    prev: Totals,
}

impl ControlThread {
    /// Builds the registry, the first snapshot and the affinity tables from
    /// `cfg`, installs its static affinities, binds the control protocol's
    /// socket and starts the Prometheus endpoint if configured.
    pub fn new(cfg: &Config, setup: ControlSetup) -> Result<ControlThread, String> {
        let mut registry = ServiceRegistry::from_config(cfg).map_err(|e| e.to_string())?;
        let cell = Arc::new(DataplaneCell::new(
            registry.snapshot().map_err(|e| e.to_string())?,
        ));
        let (writer, reader) = AffinityTable::new(cfg.affinity.capacity);
        let shared = Shared {
            dataplane: Arc::clone(&cell),
            affinity: reader,
            auto_affinity: Arc::new(AutoAffinityTable::new(cfg.affinity.auto_capacity)),
            epoch: Instant::now(),
        };
        let server = ControlServer::bind(
            cfg.control.listen,
            ServerConfig {
                read_timeout: Some(POLL_WAIT),
                ..ServerConfig::from_config(cfg)?
            },
        )
        .map_err(|e| format!("control listen {}: {e}", cfg.control.listen))?;
        let mut plane = ControlPlane::new(
            registry,
            cell,
            AffinityManager::new(writer),
            setup.workers,
            shared.epoch,
        );
        statics::install(&mut plane, cfg).map_err(|e| e.to_string())?;
        let cluster = match (&cfg.cluster, setup.store) {
            (Some(c), Some(store)) => Some(StoreSync::new(store, &c.instance, &mut plane)),
            (None, None) => None,
            (Some(_), None) => return Err("[cluster] is set but no store thread runs".into()),
            (None, Some(_)) => return Err("a store thread runs without [cluster]".into()),
        };
        let state = match &cfg.affinity.state_file {
            Some(path) => Some(StateSaver::open(path, &mut plane, setup.discard_bad_state)?),
            None => None,
        };
        let metrics = match cfg.control.metrics_listen {
            Some(addr) => Some(
                MetricsServer::start(addr).map_err(|e| format!("metrics listen {addr}: {e}"))?,
            ),
            None => None,
        };
        let mut health = HealthMonitor::new();
        // Every backend starts up: a first target list changes nothing.
        health.update(cfg, plane.dataplane());
        let now = Instant::now();
        Ok(ControlThread {
            server,
            plane,
            file: ConfigFile::new(setup.config_path, cfg.clone()),
            shared,
            port_stats: setup.port_stats,
            port_upkeep: setup.port_upkeep,
            ports_failed: Vec::new(),
            metrics,
            status: setup.status.map(|out| StatusLine {
                out,
                interval: cfg.control.status_interval.0.max(MIN_STATUS_INTERVAL),
                last: now,
                prev: Totals::default(),
            }),
            state,
            next_tick: now + TICK,
            health,
            cluster,
            on_ready: None,
            stopping: false,
            was_ready: false,
        })
    }

    /// The tables the workers read, and the clock origin they share.
    pub fn shared(&self) -> Shared {
        self.shared.clone()
    }

    /// The control protocol's address (the configured one may name port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.server.local_addr()
    }

    /// The Prometheus endpoint's address, if it runs.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|m| m.local_addr())
    }

    pub fn plane(&self) -> &ControlPlane {
        &self.plane
    }

    /// The configuration running now.
    pub fn config(&self) -> &Config {
        self.file.running()
    }

    /// What the health checks say of the backends.
    pub fn health(&self) -> &HealthView {
        self.health.view()
    }

    /// Stops the health checks (the last state stays in the statistics).
    pub fn stop_health_checks(&mut self) {
        self.health.stop();
    }

    /// The statistics of the run so far: the workers' counters, ports,
    /// affinities, automatic affinity and the control thread's own figures.
    pub fn summary(&self) -> Summary {
        let mut s = summary(
            &self.plane,
            self.server.counters(),
            self.server.latency(),
            self.server.rate_limiter(),
            self.port_stats.as_ref(),
            &self.shared.auto_affinity,
            &self.health,
            self.state.as_ref(),
        );
        s.extra.cluster = self.cluster.as_ref().map(|c| c.summary());
        s
    }

    /// Re-reads the configuration file and applies it, keys and allowed
    /// networks included; returns what was done. A bad file changes nothing.
    pub fn reload(&mut self) -> Result<String, String> {
        let reloaded = self.file.reload(&mut self.plane)?;
        self.install_auth(reloaded.auth);
        Ok(reloaded.message)
    }

    /// Gives the health checks the backends to check under the running
    /// configuration and the current services, and applies the changes of
    /// the backends checked no longer. Then tells the plane again which
    /// backends the checks hold down: a backend whose address or whose
    /// service's address changed has a new id, while the checks (which
    /// know backends by name) see no change to report. (A reload's plane
    /// already gave the new id the old one's verdict for its first
    /// snapshot; this makes it so whatever changed the ids.) All of it is
    /// one snapshot at most.
    fn update_health_targets(&mut self) {
        let stopped = self
            .health
            .update(self.file.running(), self.plane.dataplane());
        let mut verdicts = self.health_verdicts(&stopped);
        verdicts.extend(
            self.health
                .view()
                .down()
                .map(|(service, backend, error)| HealthVerdict {
                    service,
                    backend,
                    up: false,
                    error: error.map(String::from),
                }),
        );
        if let Err(e) = self.plane.set_backends_health(verdicts) {
            log::error!("health changes not applied: {e}");
        }
    }

    /// Takes the health checker's reports and applies its changes, all in
    /// one snapshot; then brings the down backends' reasons up to date.
    fn take_health_reports(&mut self) {
        if self.health.is_stale(self.plane.dataplane()) {
            self.update_health_targets();
        }
        let changes = self.health.drain();
        if !changes.is_empty() {
            let verdicts = self.health_verdicts(&changes);
            if let Err(e) = self.plane.set_backends_health(verdicts) {
                log::error!("health changes not applied: {e}");
            }
        }
        for (service, backend, error) in self.health.view().down() {
            self.plane.note_check_error(service, backend, error);
        }
    }

    /// The verdicts of health changes, each logged (one line per change:
    /// every change the control thread acts on, from the checks or from
    /// checks that stopped, passes here). A change of a backend removed
    /// since (its checks stopped as it went) is no longer the plane's:
    /// neither logged nor applied.
    fn health_verdicts<'a>(&self, changes: &'a [HealthChange]) -> Vec<HealthVerdict<'a>> {
        let mut verdicts = Vec::with_capacity(changes.len());
        for c in changes {
            if !self.plane.has_backend(&c.service, &c.backend) {
                log::debug!("health: {} (a backend removed since)", c.describe());
                continue;
            }
            if c.up {
                log::info!("{}", c.describe());
            } else {
                log::warn!("{}", c.describe());
            }
            verdicts.push(HealthVerdict {
                service: &c.service,
                backend: &c.backend,
                up: c.up,
                error: c.error.clone(),
            });
        }
        verdicts
    }

    /// Writes the state file (if configured) with the affinities as they
    /// are now: at shutdown, after the last request. Affinities due by now
    /// end first, and every notice still waiting is sent, so that what
    /// the file leaves out has been notified.
    pub fn save_state(&mut self) -> Result<(), String> {
        self.plane.expire();
        self.send_notices();
        self.stop_cluster();
        match &mut self.state {
            Some(s) => s.finish(&self.plane),
            None => Ok(()),
        }
    }

    /// Runs the ports' upkeep, expires affinities, frees the snapshots the
    /// workers have let go of, installs the static
    /// affinities a reload could not (see [`ConfigFile`]), applies the
    /// health checks' reports, hands the state file's writer what changed,
    /// refreshes the metrics when they are due, sets readiness (`/ready`,
    /// and [`ControlThread::on_ready`]'s call the first time) and sends the
    /// AFFINITY_ENDED notices of every affinity that ended since the last
    /// tick.
    pub fn tick(&mut self) {
        if let Some(upkeep) = &mut self.port_upkeep {
            let failed = upkeep();
            if failed != self.ports_failed {
                if failed.is_empty() {
                    log::info!("every port has its link again: ready as far as the ports go");
                } else {
                    log::warn!(
                        "not ready: no link on port(s) {} (their traffic is lost; routes to this instance should be withdrawn)",
                        failed.join(", ")
                    );
                }
                self.ports_failed = failed;
            }
        }
        self.plane.expire();
        self.plane.collect_snapshots();
        self.file.install_waiting_statics(&mut self.plane);
        self.take_health_reports();
        if let Some(s) = &mut self.state {
            s.tick(&self.plane, Instant::now());
        }
        if let Some(m) = &self.metrics {
            if m.wants_update() {
                m.publish(metrics::render(&self.summary()));
            }
        }
        // Serving, with every affinity it has (static, restored, and in
        // cluster mode the store's) installed.
        let ready = self.ready();
        if let Some(m) = &self.metrics {
            m.set_ready(ready);
        }
        if ready {
            self.was_ready = true;
            if let Some(f) = self.on_ready.take() {
                f();
            }
        }
        self.send_notices();
    }

    /// Calls `f` once, at the first tick that finds the instance ready
    /// ([`ControlThread::ready`]): for the service manager's READY=1, which
    /// in cluster mode must wait for the shared table as `/ready` does.
    pub fn on_ready(&mut self, f: impl FnOnce() + Send + 'static) {
        self.on_ready = Some(Box::new(f));
    }

    /// Whether the instance serves with its whole table: always alone; in
    /// cluster mode once a full load of the shared table is installed (and
    /// still while the store is unreachable: every instance withdrawing at
    /// once would take the service down). Never once asked to stop, nor
    /// while the link of a port forwarded traffic leaves by has failed
    /// (the ports' upkeep says which).
    pub fn ready(&self) -> bool {
        !self.stopping
            && self.ports_failed.is_empty()
            && self.cluster.as_ref().is_none_or(|c| c.ready())
    }

    /// Whether some tick found the instance ready: until then `/ready`
    /// said no, so no router was told to send here, and a stop need not
    /// linger for them to withdraw.
    pub fn was_ready(&self) -> bool {
        self.was_ready
    }

    /// Cluster mode: the control thread's side of the shared table, if set.
    pub fn store_sync(&self) -> Option<&StoreSync> {
        self.cluster.as_ref()
    }

    /// Cluster mode: applies what the store thread reported, sends the
    /// deferred replies it settled and the notices this instance won.
    fn cluster_turn(&mut self) {
        let Some(c) = &mut self.cluster else {
            return;
        };
        let wall = unix_ms(SystemTime::now());
        let out = c.turn(&mut self.plane, wall);
        for (ticket, resp) in out.replies {
            self.server.reply_later(ticket, resp, wall);
        }
        for (notify, notice) in out.notices {
            send_notice(&mut self.server, notify, &notice);
        }
    }

    /// At shutdown in cluster mode: the store's last outcomes are applied,
    /// the deletes of ended affinities in flight are waited for (up to
    /// `[cluster] timeout`: whose delete commits sends the notice, and the
    /// other instances stay silent once they see it), and every reply
    /// still waiting is answered UNAVAILABLE (the affinities stay in the
    /// store).
    fn stop_cluster(&mut self) {
        self.cluster_turn();
        let wait = self
            .file
            .running()
            .cluster
            .as_ref()
            .map_or(Duration::ZERO, |c| c.timeout.0);
        let deadline = Instant::now() + wait;
        while self.cluster.as_ref().is_some_and(StoreSync::ends_in_flight)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
            self.cluster_turn();
        }
        let Some(c) = &mut self.cluster else {
            return;
        };
        let wall = unix_ms(SystemTime::now());
        for (ticket, resp) in c.shutdown() {
            self.server.reply_later(ticket, resp, wall);
        }
    }

    /// Logs every affinity that ended since the last call and sends its
    /// AFFINITY_ENDED notice.
    fn send_notices(&mut self) {
        for (notify, notice) in self.plane.take_notices() {
            send_notice(&mut self.server, notify, &notice);
        }
    }

    /// One turn of the loop at `now`: a tick when one is due, the status
    /// line when it is due, then the requests waiting on the socket
    /// (waiting a little for a first one).
    pub fn step(&mut self, now: Instant) {
        if now >= self.next_tick {
            self.next_tick = now + TICK;
            self.tick();
        }
        self.print_status(now);
        self.cluster_turn();
        self.poll();
    }

    /// In cluster mode, the store thread ended ([`StoreSync::gone`]): the
    /// instance must stop.
    pub fn store_gone(&self) -> bool {
        self.cluster.as_ref().is_some_and(StoreSync::gone)
    }

    /// Runs steps until `stop` is set, `deadline` passes or the store
    /// thread is gone ([`ControlThread::store_gone`]); reloads whenever
    /// `reload` (SIGHUP's flag) is set.
    pub fn serve_until(
        &mut self,
        stop: &AtomicBool,
        reload: &AtomicBool,
        deadline: Option<Instant>,
    ) {
        loop {
            let now = Instant::now();
            if stop.load(Ordering::Relaxed)
                || deadline.is_some_and(|d| now >= d)
                || self.store_gone()
            {
                // Stopping: no longer ready, before anything stops.
                self.stopping = true;
                if let Some(m) = &self.metrics {
                    m.set_ready(false);
                }
                return;
            }
            if reload.swap(false, Ordering::Relaxed) {
                match self.reload() {
                    Ok(msg) => log::info!("SIGHUP: {msg}"),
                    Err(e) => {
                        log::error!("SIGHUP: reload refused, running configuration kept: {e}")
                    }
                }
            }
            self.step(now);
        }
    }

    /// After [`ControlThread::serve_until`] returned: goes on serving, not
    /// ready, until `until` (`[control] stop_delay` after the signal), so
    /// that the routers withdraw this instance (BGP behind `/ready`) while
    /// it still forwards what they send it. Requests are answered (a
    /// RELOAD request among them), affinities expire and notices go out as
    /// before; SIGHUP is not acted on.
    pub fn linger(&mut self, until: Instant) {
        loop {
            let now = Instant::now();
            if now >= until {
                return;
            }
            self.step(now);
        }
    }

    /// Serves the datagrams waiting on the socket; a reload among them
    /// changes the server's keys and networks once they are answered.
    fn poll(&mut self) {
        let mut dispatch = Dispatch {
            plane: &mut self.plane,
            file: &mut self.file,
            port_stats: self.port_stats.as_ref(),
            auto: &self.shared.auto_affinity,
            health: &self.health,
            state: self.state.as_ref(),
            cluster: self.cluster.as_mut(),
            auth: None,
        };
        self.server.poll(&mut dispatch, SystemTime::now());
        if let Some(auth) = dispatch.auth {
            self.install_auth(auth);
        }
    }

    /// After a reload: sends the notices of the affinities it ended (a
    /// removed backend's, signed with its key while the keyring still has
    /// it), then installs the new keys and allowed networks and updates
    /// the health checks.
    fn install_auth(&mut self, auth: ServerAuth) {
        self.send_notices();
        self.server.set_auth(auth);
        self.update_health_targets();
    }

    fn print_status(&mut self, now: Instant) {
        let Some(st) = &mut self.status else {
            return;
        };
        let elapsed = now.saturating_duration_since(st.last);
        if elapsed < st.interval {
            return;
        }
        let cur = Totals::collect(self.plane.workers());
        let line = status_line(
            &st.prev,
            &cur,
            elapsed.as_secs_f64(),
            self.plane.affinities().len(),
        );
        let _ = writeln!(st.out, "{line}");
        let _ = st.out.flush();
        st.prev = cur;
        st.last = now;
    }
}

/// The control thread's handler while the server polls: each request to
/// what answers it.
struct Dispatch<'a> {
    plane: &'a mut ControlPlane,
    file: &'a mut ConfigFile,
    port_stats: Option<&'a PortStatsSource>,
    auto: &'a AutoAffinityTable,
    health: &'a HealthMonitor,
    state: Option<&'a StateSaver>,
    cluster: Option<&'a mut StoreSync>,
    /// The keys and networks of a reload, for the server once its poll
    /// returns (the reply to the reload is signed with the keys it came
    /// with).
    auth: Option<ServerAuth>,
}

impl ControlHandler for Dispatch<'_> {
    fn handle(&mut self, call: &Call<'_>, request: &Request<'_>) -> Response {
        match request {
            Request::Reload if !call.is_admin => {
                Response::new(ReturnCode::NotAuthorized).with_message("reload needs the admin key")
            }
            Request::Reload => match self.file.reload(self.plane) {
                Ok(reloaded) => {
                    self.auth = Some(reloaded.auth);
                    Response::ok().with_message(reloaded.message)
                }
                Err(e) => Response::new(ReturnCode::Invalid)
                    .with_message(format!("reload refused, running configuration kept: {e}")),
            },
            Request::Stats { .. } => {
                let mut s = summary(
                    self.plane,
                    call.server,
                    call.server_latency,
                    call.server_rates,
                    self.port_stats,
                    self.auto,
                    self.health,
                    self.state,
                );
                s.extra.cluster = self.cluster.as_deref().map(StoreSync::summary);
                Response::stats(
                    serde_json::to_string(&s).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
                )
            }
            _ => {
                // What is due ends before the request is answered, not at
                // the next tick: a request about an affinity past its end
                // finds it ended.
                self.plane.expire();
                match &mut self.cluster {
                    Some(c) => c.request(self.plane, call, request, call.now_ms),
                    None => self.plane.handle(call.sender, call.is_admin, request),
                }
            }
        }
    }
}

/// Logs an ended affinity and sends its AFFINITY_ENDED notice, if its
/// owner gave an address.
fn send_notice(server: &mut ControlServer, notify: Option<SocketAddr>, notice: &EndedNotice) {
    log::info!(
        "affinity {} -> {} ended ({})",
        notice.key.client,
        notice.owner,
        notice.reason.name()
    );
    if let Some(to) = notify {
        if let Err(e) = server.send_ended(to, &notice.owner, notice) {
            log::warn!("ended notification to {to}: {e}");
        }
    }
}

/// The summary from the plane's state and the server's figures.
#[allow(clippy::too_many_arguments)]
fn summary(
    plane: &ControlPlane,
    server: &ServerCounters,
    server_latency: &hdrhistogram::Histogram<u64>,
    rates: &RateLimiter,
    port_stats: Option<&PortStatsSource>,
    auto: &AutoAffinityTable,
    health: &HealthMonitor,
    state: Option<&StateSaver>,
) -> Summary {
    let mut s = plane.summary();
    if let Some(ports) = port_stats {
        s.ports = ports();
    }
    s.control_latency_ns = Percentiles::of(server_latency);
    s.auto_affinity_pins = auto.len_active(plane.now_ms());
    s.auto_affinity_table_full = auto.stats().table_full;
    let mut control = control_summary(server, rates, &plane.counters());
    if let Some(saver) = state {
        let c = saver.counters();
        control.state_file_writes = c.saves;
        control.state_file_write_failures = c.failures;
    }
    s.extra.control = Some(control);
    if !health.targets().is_empty() {
        s.extra.health = Some(health.summary(SystemTime::now()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::testing::{config_text, op, Peer, Received};
    use crate::protocol::message::{AffinityOp, Reply, ReplyPayload};
    use crate::types::{BackendState, EndReason};
    use std::io::Read as _;
    use std::net::TcpStream;
    use std::path::Path;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    const ADMIN_1: &[u8] = b"admin-key-one-0123456789";
    const ADMIN_2: &[u8] = b"admin-key-two-0123456789";
    const A_1: &[u8] = b"backend-a-key-one-012345";
    const A_2: &[u8] = b"backend-a-key-two-012345";
    const B_BACKEND: &str = "[[services.backends]]\nname = \"b\"\naddress = \"10.0.0.2\"\n";

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// The test configuration on free ports, with keys for the admin and
    /// backend a.
    fn config(admin: &[u8], a: &[u8]) -> String {
        format!(
            "{}\n[control.keys]\nadmin = \"{}\"\na = \"{}\"\n",
            config_text().replace(
                "listen = \"127.0.0.1:7400\"",
                "listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.2:0\"\nstatus_interval = \"1s\""
            ),
            hex(admin),
            hex(a)
        )
    }

    /// A configuration file that goes away with the test.
    struct File(PathBuf);

    impl File {
        fn new(name: &str, text: &str) -> File {
            let path = std::env::temp_dir()
                .join(format!("pktdist-thread-{name}-{}.toml", std::process::id()));
            std::fs::write(&path, text).unwrap();
            File(path)
        }

        fn write(&self, text: &str) {
            std::fs::write(&self.0, text).unwrap();
        }
    }

    impl Drop for File {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn control(path: &Path, status: Option<Box<dyn Write + Send>>) -> ControlThread {
        let cfg = Config::load(path).unwrap();
        ControlThread::new(
            &cfg,
            ControlSetup {
                config_path: Some(path.to_path_buf()),
                workers: vec![Arc::new(WorkerCounters::default())],
                port_stats: None,
                port_upkeep: None,
                status,
                discard_bad_state: false,
                store: None,
            },
        )
        .unwrap()
    }

    /// Sends `req` from `peer`, lets the control thread serve it and
    /// returns the reply, checked to be signed with `key`.
    fn ask(
        ctl: &mut ControlThread,
        peer: &mut Peer,
        key: &[u8],
        req: &Request<'_>,
    ) -> Option<Reply> {
        peer.send(ctl.local_addr().unwrap(), req);
        ctl.step(Instant::now());
        match peer.recv_signed(key)? {
            Received::Reply(r) => Some(r),
            other => panic!("not a reply: {other:?}"),
        }
    }

    fn create<'a>(client: &str) -> Request<'a> {
        let mut o = op(client, 24, None, 60);
        o.notify = None;
        Request::AffinityCreate(o)
    }

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut http = TcpStream::connect(addr).unwrap();
        http.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .unwrap();
        let mut text = String::new();
        http.read_to_string(&mut text).unwrap();
        text
    }

    /// Asked to stop, the instance is not ready (and stays so), yet it
    /// answers requests until [`ControlThread::linger`]'s end.
    #[test]
    fn a_stopping_instance_is_not_ready_and_still_answers_while_it_lingers() {
        let file = File::new("linger", &config(ADMIN_1, A_1));
        let mut ctl = control(&file.0, None);
        let metrics = ctl.metrics_addr().unwrap();
        assert!(!ctl.was_ready(), "no tick yet");
        ctl.tick();
        assert!(ctl.ready() && ctl.was_ready());
        assert!(get(metrics, "/ready").contains(" 200 "));

        let (stop, reload) = (AtomicBool::new(true), AtomicBool::new(false));
        ctl.serve_until(&stop, &reload, None);
        assert!(!ctl.ready());
        assert!(get(metrics, "/ready").contains(" 503 "));

        // A request sent before it lingers is answered by the lingering
        // loop, whose ticks do not make it ready again.
        let mut peer = Peer::new("a", A_1);
        peer.send(ctl.local_addr().unwrap(), &create("10.1.2.0"));
        let until = Instant::now() + Duration::from_millis(200);
        ctl.linger(until);
        assert!(Instant::now() >= until, "it lingers until the time given");
        match peer.recv_signed(A_1) {
            Some(Received::Reply(r)) => assert_eq!(r.code, ReturnCode::Ok, "{r:?}"),
            other => panic!("no reply while lingering: {other:?}"),
        }
        assert!(!ctl.ready());
        assert!(get(metrics, "/ready").contains(" 503 "));
    }

    /// While the ports' upkeep says a port's link has failed, the instance
    /// is not ready (its routes are withdrawn); once it is back, it is
    /// ready again.
    #[test]
    fn a_port_without_link_makes_the_instance_not_ready() {
        let file = File::new("link", &config(ADMIN_1, A_1));
        let cfg = Config::load(&file.0).unwrap();
        let failed = Arc::new(Mutex::new(Vec::<String>::new()));
        let f = Arc::clone(&failed);
        let mut ctl = ControlThread::new(
            &cfg,
            ControlSetup {
                config_path: Some(file.0.clone()),
                workers: vec![Arc::new(WorkerCounters::default())],
                port_stats: None,
                port_upkeep: Some(Box::new(move || f.lock().unwrap().clone())),
                status: None,
                discard_bad_state: false,
                store: None,
            },
        )
        .unwrap();
        let metrics = ctl.metrics_addr().unwrap();
        ctl.tick();
        assert!(ctl.ready());
        *failed.lock().unwrap() = vec!["p1".into()];
        ctl.tick();
        assert!(!ctl.ready());
        assert!(get(metrics, "/ready").contains(" 503 "));
        failed.lock().unwrap().clear();
        ctl.tick();
        assert!(ctl.ready());
        assert!(get(metrics, "/ready").contains(" 200 "));
    }

    const CLUSTER: &str =
        "\n[cluster]\nstore = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\ninstance = \"i1\"\n";

    /// A control thread of the configuration in `file` (with `[cluster]`),
    /// its store thread played by the test through the returned peer.
    fn cluster_thread(file: &File) -> (ControlThread, crate::cluster::StorePeer) {
        let cfg = Config::load(&file.0).unwrap();
        let (handle, store) = crate::cluster::StoreHandle::pair();
        let ctl = ControlThread::new(
            &cfg,
            ControlSetup {
                config_path: Some(file.0.clone()),
                workers: vec![Arc::new(WorkerCounters::default())],
                port_stats: None,
                port_upkeep: None,
                status: None,
                discard_bad_state: false,
                store: Some(handle),
            },
        )
        .unwrap();
        (ctl, store)
    }

    /// An affinity that ends as the instance stops: its delete goes to the
    /// store and its outcome is awaited, so the owner hears of it from
    /// here (the other instances, seeing the delete, stay silent).
    #[test]
    fn an_end_at_shutdown_is_deleted_and_notified_before_the_instance_stops() {
        use crate::cluster::StoreOp;
        let file = File::new(
            "cluster-stop",
            &format!("{}{CLUSTER}", config(ADMIN_1, A_1)),
        );
        let (mut ctl, mut store, a, key) = cluster_with_an_affinity_of_a(&file, 1);
        std::thread::sleep(Duration::from_millis(1100));

        // The store thread, still there while the instance stops, commits
        // the delete.
        let answering = std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < until {
                if let Ok(StoreOp::End { ticket, expect, .. }) = store.ops.try_recv() {
                    assert_eq!(expect, 4);
                    store.events.send(committed(ticket, 5)).unwrap();
                    return store;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            panic!("no delete");
        });
        ctl.save_state().unwrap();
        let _store = answering.join().unwrap();
        match a.recv_signed(A_1) {
            Some(Received::Ended(n)) => {
                assert_eq!((n.key, n.reason), (key, EndReason::Expired))
            }
            other => panic!("no notice: {other:?}"),
        }
        let c = ctl.summary().extra.cluster.unwrap();
        assert_eq!((c.ends_won, c.pending_ends), (1, 0));
    }

    /// Cluster mode: a removed backend's affinities end in the store once
    /// the delete commits, after the reload took its key away; the key
    /// still signs their notices.
    #[test]
    fn a_removed_backend_hears_of_its_affinities_in_cluster_mode_too() {
        use crate::cluster::StoreOp;
        let text = format!("{}{CLUSTER}", config(ADMIN_1, A_1));
        let file = File::new("cluster-removed", &text);
        let (mut ctl, mut store, a, key) = cluster_with_an_affinity_of_a(&file, 60);
        file.write(&without_backend_a(&text));
        ctl.reload().unwrap();
        ctl.step(Instant::now());
        let Ok(StoreOp::End { ticket, expect, .. }) = store.ops.try_recv() else {
            panic!("no delete")
        };
        assert_eq!(expect, 4);
        store.events.send(committed(ticket, 5)).unwrap();
        ctl.step(Instant::now());
        match a.recv_signed(A_1) {
            Some(Received::Ended(n)) => {
                assert_eq!((n.key, n.reason), (key, EndReason::BackendRemoved))
            }
            other => panic!("no notice: {other:?}"),
        }
    }

    /// A store's commit of the op `ticket` at `revision`.
    fn committed(
        ticket: crate::cluster::Ticket,
        revision: crate::cluster::Revision,
    ) -> crate::cluster::StoreEvent {
        crate::cluster::StoreEvent::Done {
            ticket,
            outcome: crate::cluster::Outcome::Committed { revision },
        }
    }

    /// A cluster instance of the configuration in `file`, its store loaded
    /// empty, where backend a holds an affinity on 198.18.0.0/24 for `secs`
    /// (committed at revision 4): the instance, its store, a's peer and the
    /// affinity's key.
    fn cluster_with_an_affinity_of_a(
        file: &File,
        secs: u32,
    ) -> (
        ControlThread,
        crate::cluster::StorePeer,
        Peer,
        crate::protocol::message::AffinityKey,
    ) {
        use crate::cluster::StoreOp;
        let (mut ctl, mut store) = loaded_cluster_thread(file);
        let mut a = Peer::new("a", A_1);
        let mut o = op("198.18.0.0", 24, None, secs);
        o.notify = None;
        a.send(ctl.local_addr().unwrap(), &Request::AffinityCreate(o));
        ctl.step(Instant::now());
        let Ok(StoreOp::Put { ticket, .. }) = store.ops.try_recv() else {
            panic!("no put")
        };
        store.events.send(committed(ticket, 4)).unwrap();
        ctl.step(Instant::now());
        assert!(matches!(a.recv_signed(A_1), Some(Received::Reply(_))));
        (ctl, store, a, o.key)
    }

    /// The store thread ends (as when it panics): the instance is no
    /// longer ready and its loop returns, for `pktdist run` to stop; the
    /// events it sent before are applied first.
    #[test]
    fn an_ended_store_thread_stops_the_instance() {
        use crate::cluster::StoreEvent;
        let file = File::new(
            "cluster-gone",
            &format!("{}{CLUSTER}", config(ADMIN_1, A_1)),
        );
        let (mut ctl, store) = loaded_cluster_thread(&file);
        assert!(ctl.ready() && !ctl.store_gone());
        store
            .events
            .send(StoreEvent::Unreachable {
                error: "its last word".into(),
            })
            .unwrap();
        drop(store);
        let (stop, reload) = (AtomicBool::new(false), AtomicBool::new(false));
        // Bounded, should it not notice.
        let deadline = Instant::now() + Duration::from_secs(30);
        ctl.serve_until(&stop, &reload, Some(deadline));
        assert!(Instant::now() < deadline, "it noticed");
        assert!(ctl.store_gone() && !ctl.ready());
        let c = ctl.summary().extra.cluster.unwrap();
        assert!(!c.store_up);
        assert_eq!(c.last_error.as_deref(), Some("the store thread ended"));
    }

    /// [`cluster_thread`] once its store loaded an empty table (revision 3).
    fn loaded_cluster_thread(file: &File) -> (ControlThread, crate::cluster::StorePeer) {
        let (mut ctl, store) = cluster_thread(file);
        let loaded = crate::cluster::StoreEvent::Loaded {
            revision: 3,
            affinities: vec![],
            declarations: Vec::new(),
            ended: Vec::new(),
        };
        store.events.send(loaded).unwrap();
        ctl.step(Instant::now());
        (ctl, store)
    }

    /// `text` (the test configuration) without backend a and its key.
    fn without_backend_a(text: &str) -> String {
        let out = text
            .replace(
                "[[services.backends]]\nname = \"a\"\naddress = \"10.0.0.1\"\n",
                "",
            )
            .replace(&format!("a = \"{}\"\n", hex(A_1)), "");
        assert!(!out.contains("name = \"a\""), "{out}");
        out
    }

    #[test]
    fn a_cluster_instance_is_ready_once_loaded_and_answers_changes_when_committed() {
        use crate::cluster::{Outcome, StoreEvent, StoreOp};
        let file = File::new("cluster", &format!("{}{CLUSTER}", config(ADMIN_1, A_1)));
        let (mut ctl, mut store) = cluster_thread(&file);
        let metrics = ctl.metrics_addr().unwrap();
        let announced = Arc::new(AtomicUsize::new(0));
        let a2 = Arc::clone(&announced);
        ctl.on_ready(move || {
            a2.fetch_add(1, Ordering::Relaxed);
        });
        ctl.tick();
        assert!(!ctl.ready() && !ctl.was_ready());
        assert!(get(metrics, "/ready").contains(" 503 "), "not loaded yet");
        assert_eq!(announced.load(Ordering::Relaxed), 0, "READY=1 waits too");
        let mut a = Peer::new("a", A_1);
        let r = ask(&mut ctl, &mut a, A_1, &create("198.18.0.0")).expect("answered");
        assert_eq!(r.code, ReturnCode::Unavailable);

        store
            .events
            .send(StoreEvent::Loaded {
                revision: 3,
                affinities: vec![],
                declarations: Vec::new(),
                ended: Vec::new(),
            })
            .unwrap();
        ctl.step(Instant::now());
        ctl.tick();
        assert!(ctl.ready() && ctl.was_ready());
        assert!(get(metrics, "/ready").contains(" 200 "));
        ctl.tick();
        assert_eq!(announced.load(Ordering::Relaxed), 1, "once");

        // A create: no reply until the store commits it.
        a.send(ctl.local_addr().unwrap(), &create("198.18.0.0"));
        ctl.step(Instant::now());
        let Ok(StoreOp::Put { ticket, expect, .. }) = store.ops.try_recv() else {
            panic!("no put")
        };
        assert_eq!(expect, 0);
        store
            .events
            .send(StoreEvent::Done {
                ticket,
                outcome: Outcome::Committed { revision: 4 },
            })
            .unwrap();
        ctl.step(Instant::now());
        match a.recv_signed(A_1) {
            Some(Received::Reply(r)) => {
                assert_eq!((r.code, r.remaining_secs), (ReturnCode::Ok, 60))
            }
            other => panic!("no reply: {other:?}"),
        }
        assert_eq!(ctl.plane().affinities().len(), 1);

        // The store goes away: still ready, changes UNAVAILABLE at once.
        store
            .events
            .send(StoreEvent::Unreachable {
                error: "connection refused".into(),
            })
            .unwrap();
        ctl.step(Instant::now());
        ctl.tick();
        assert!(ctl.ready());
        let r = ask(&mut ctl, &mut a, A_1, &create("198.18.1.0")).expect("answered");
        assert_eq!(r.code, ReturnCode::Unavailable);

        let s = ctl.summary();
        let c = s.extra.cluster.as_ref().expect("cluster in the summary");
        assert_eq!((c.instance.as_str(), c.store_up, c.loads), ("i1", false, 1));
        assert_eq!(c.changes["committed"], 1);
        let text = metrics::render(&s);
        for line in [
            "pktdist_cluster_store_up 0",
            "pktdist_cluster_changes_total{result=\"committed\"} 1",
            "pktdist_cluster_ends_total{result=\"won\"} 0",
            "pktdist_cluster_pending_ends 0",
            "pktdist_cluster_loads_total 1",
            "pktdist_cluster_not_installed_total{reason=\"table_full\"} 0",
            "pktdist_cluster_propagation_seconds_count 0",
            "pktdist_control_replies_total{code=\"UNAVAILABLE\"} 2",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(s.render().contains("cluster: instance i1, store down"));

        // A change in flight at shutdown is answered UNAVAILABLE.
        store
            .events
            .send(StoreEvent::Loaded {
                revision: 5,
                affinities: vec![],
                declarations: Vec::new(),
                ended: Vec::new(),
            })
            .unwrap();
        ctl.step(Instant::now());
        a.send(ctl.local_addr().unwrap(), &create("198.18.2.0"));
        ctl.step(Instant::now());
        assert!(store.ops.try_recv().is_ok());
        ctl.save_state().unwrap();
        match a.recv_signed(A_1) {
            Some(Received::Reply(r)) => assert_eq!(r.code, ReturnCode::Unavailable),
            other => panic!("no reply: {other:?}"),
        }

        // A reload may not change [cluster].
        file.write(&format!(
            "{}{}",
            config(ADMIN_1, A_1),
            CLUSTER.replace("i1", "i9")
        ));
        let e = ctl.reload().unwrap_err();
        assert!(e.contains("restart to change [cluster]"), "{e}");
    }

    #[test]
    fn a_reload_in_cluster_mode_gives_new_backends_the_declarations_of_the_cluster() {
        use crate::cluster::{DeclarationKey, StoreEvent, StoredDeclaration};
        use crate::types::{BackendState, Declared};
        let text = format!("{}{CLUSTER}", config(ADMIN_1, A_1));
        let file = File::new("cluster-reload", &text);
        let (mut ctl, store) = cluster_thread(&file);
        // The cluster has web/c draining (its operator said so at another
        // instance); this instance has no backend c yet.
        let drained = StoredDeclaration {
            key: DeclarationKey {
                service: "web".into(),
                backend: "c".into(),
                by_admin: true,
            },
            state: Declared::Drain,
            writer: "i2".into(),
            written_unix_ms: 1,
        };
        store
            .events
            .send(StoreEvent::Loaded {
                revision: 3,
                affinities: vec![],
                declarations: vec![(drained, 2)],
                ended: Vec::new(),
            })
            .unwrap();
        ctl.step(Instant::now());
        assert!(ctl.ready());
        let state = |ctl: &ControlThread, name: &str| {
            let dp = ctl.plane().dataplane();
            let web = dp.service_named("web").unwrap().id;
            (0..crate::types::MAX_BACKENDS as u32)
                .filter_map(|id| dp.backend(id))
                .find(|b| b.service == web && b.name == name)
                .map(|b| b.state)
        };
        assert_eq!(state(&ctl, "c"), None);
        file.write(&text.replace(
            "address = \"10.0.0.2\"\n",
            "address = \"10.0.0.2\"\n[[services.backends]]\nname = \"c\"\naddress = \"10.0.0.3\"\n",
        ));
        ctl.reload().unwrap();
        assert_eq!(state(&ctl, "c"), Some(BackendState::Draining));
        assert_eq!(state(&ctl, "a"), Some(BackendState::Up));
    }

    #[test]
    fn reload_from_the_file_applies_services_and_swaps_the_keys() {
        let file = File::new("reload", &config(ADMIN_1, A_1));
        let mut ctl = control(&file.0, None);
        let mut a = Peer::new("a", A_1);
        let r = ask(&mut ctl, &mut a, A_1, &create("198.18.0.0")).expect("answered");
        assert_eq!(r.code, ReturnCode::Ok);

        // a's key changes and b goes.
        file.write(&config(ADMIN_1, A_2).replace(B_BACKEND, ""));
        let msg = ctl.reload().unwrap();
        assert!(msg.contains("1 backend(s) removed"), "{msg}");
        let web = ctl.plane().dataplane().service_named("web").unwrap();
        assert_eq!(web.backends.len(), 1);

        // The old key is refused without an answer, the new one served.
        assert!(ask(&mut ctl, &mut a, A_1, &create("198.18.1.0")).is_none());
        let control = ctl.summary().extra.control.unwrap();
        assert_eq!(control.refused["bad_hmac"], 1);
        let mut a = a.with_key(A_2);
        let r = ask(&mut ctl, &mut a, A_2, &create("198.18.1.0")).expect("answered");
        assert_eq!(r.code, ReturnCode::Ok);
        assert_eq!(ctl.plane().affinities().len(), 2);

        // A file that does not load changes nothing.
        file.write("[cores]\n");
        assert!(ctl.reload().is_err());
        assert_eq!(ctl.config().control.keys["a"].0, A_2);
    }

    #[test]
    fn a_reload_request_is_answered_with_the_old_keys_then_swaps_them() {
        let file = File::new("request", &config(ADMIN_1, A_1));
        let mut ctl = control(&file.0, None);
        let mut a = Peer::new("a", A_1);
        let r = ask(&mut ctl, &mut a, A_1, &Request::Reload).expect("answered");
        assert_eq!(r.code, ReturnCode::NotAuthorized);

        file.write(&config(ADMIN_2, A_1));
        let mut admin = Peer::new("admin", ADMIN_1);
        let r = ask(&mut ctl, &mut admin, ADMIN_1, &Request::Reload).expect("answered");
        assert_eq!(r.code, ReturnCode::Ok);
        assert!(r.message.contains("reloaded"), "{}", r.message);

        let list = Request::BackendList {
            service: None,
            offset: 0,
            limit: 0,
        };
        assert!(ask(&mut ctl, &mut admin, ADMIN_1, &list).is_none());
        let mut admin = admin.with_key(ADMIN_2);
        let r = ask(&mut ctl, &mut admin, ADMIN_2, &list).expect("answered");
        assert_eq!(r.code, ReturnCode::Ok);

        // A refused reload is answered INVALID and keeps the keys.
        file.write("not toml");
        let r = ask(&mut ctl, &mut admin, ADMIN_2, &Request::Reload).expect("answered");
        assert_eq!(r.code, ReturnCode::Invalid);
        assert!(
            r.message.contains("running configuration kept"),
            "{}",
            r.message
        );
        assert!(ask(&mut ctl, &mut admin, ADMIN_2, &list).is_some());
    }

    #[test]
    fn ended_affinities_reach_their_owner_over_udp() {
        let file = File::new("notice", &config(ADMIN_1, A_1));
        let mut ctl = control(&file.0, None);
        let mut a = Peer::new("a", A_1);
        let created = create("198.18.0.0");
        let r = ask(&mut ctl, &mut a, A_1, &created).expect("answered");
        assert_eq!(r.code, ReturnCode::Ok);

        // The operator cancels it; the owner hears at the next tick, at the
        // address it asked from.
        let mut admin = Peer::new("admin", ADMIN_1);
        let Request::AffinityCreate(o) = created else {
            unreachable!()
        };
        let cancel = Request::AffinityCancel(AffinityOp {
            duration_secs: 0,
            owner: None,
            ..o
        });
        let r = ask(&mut ctl, &mut admin, ADMIN_1, &cancel).expect("answered");
        assert_eq!(r.code, ReturnCode::Ok);
        ctl.tick();
        match a.recv_signed(A_1) {
            Some(Received::Ended(n)) => {
                assert_eq!(n.owner, "a");
                assert_eq!(n.reason, EndReason::Cancelled);
                assert_eq!(n.key, o.key);
            }
            other => panic!("no notice: {other:?}"),
        }
        let control = ctl.summary().extra.control.unwrap();
        assert_eq!((control.notifications, control.ended.cancelled), (1, 1));
        assert!(ctl.plane().affinities().is_empty());
    }

    /// A request that comes after an affinity's end, before the tick that
    /// would expire it: it finds the affinity ended (its owner's EXTEND is
    /// NOT_FOUND), and the owner hears of the end.
    #[test]
    fn a_request_after_an_affinity_ends_finds_it_ended() {
        let file = File::new("past", &config(ADMIN_1, A_1));
        let mut ctl = control(&file.0, None);
        let mut a = Peer::new("a", A_1);
        let Request::AffinityCreate(o) = create("198.18.0.0") else {
            unreachable!()
        };
        let o = AffinityOp {
            duration_secs: 1,
            ..o
        };
        // Every step below is told it runs now, when no tick is due since
        // the create's step.
        let before = Instant::now();
        let r = ask(&mut ctl, &mut a, A_1, &Request::AffinityCreate(o)).expect("answered");
        assert_eq!(r.code, ReturnCode::Ok);
        std::thread::sleep(Duration::from_millis(1100));
        a.send(ctl.local_addr().unwrap(), &Request::AffinityExtend(o));
        ctl.step(before);
        match a.recv_signed(A_1) {
            Some(Received::Reply(r)) => assert_eq!(r.code, ReturnCode::NotFound),
            other => panic!("no reply: {other:?}"),
        }
        assert!(ctl.plane().affinities().is_empty());
        ctl.tick();
        match a.recv_signed(A_1) {
            Some(Received::Ended(n)) => assert_eq!(n.reason, EndReason::Expired),
            other => panic!("no notice: {other:?}"),
        }
    }

    /// A reload that removes a backend and its key together: the backend
    /// still hears that its affinities ended, signed with the key it had.
    #[test]
    fn a_removed_backend_hears_of_its_affinities_before_its_key_goes() {
        let text = config(ADMIN_1, A_1);
        let file = File::new("removed", &text);
        let mut ctl = control(&file.0, None);
        let mut a = Peer::new("a", A_1);
        let created = create("198.18.0.0");
        let r = ask(&mut ctl, &mut a, A_1, &created).expect("answered");
        assert_eq!(r.code, ReturnCode::Ok);
        file.write(&without_backend_a(&text));
        ctl.reload().unwrap();
        let Request::AffinityCreate(o) = created else {
            unreachable!()
        };
        match a.recv_signed(A_1) {
            Some(Received::Ended(n)) => {
                assert_eq!(n.owner, "a");
                assert_eq!((n.key, n.reason), (o.key, EndReason::BackendRemoved));
            }
            other => panic!("no notice: {other:?}"),
        }
        assert!(ctl.plane().affinities().is_empty());
        // And a's key is gone.
        let r = ask(&mut ctl, &mut a, A_1, &create("198.18.1.0"));
        assert!(r.is_none(), "{r:?}");
    }

    #[test]
    fn statistics_carry_the_servers_counters_and_metrics_are_published() {
        let file = File::new("stats", &config(ADMIN_1, A_1));
        let mut ctl = control(&file.0, None);
        // One datagram refused, then the statistics in chunks.
        let mut forger = Peer::new("a", A_2);
        assert!(ask(&mut ctl, &mut forger, A_2, &create("198.18.0.0")).is_none());
        let mut admin = Peer::new("admin", ADMIN_1);
        let (mut doc, mut token) = (Vec::new(), 0);
        loop {
            let req = Request::Stats {
                token,
                offset: doc.len() as u32,
            };
            let r = ask(&mut ctl, &mut admin, ADMIN_1, &req).expect("answered");
            let ReplyPayload::Stats {
                token: t, chunk, ..
            } = r.payload
            else {
                panic!("no statistics: {:?}", r.code)
            };
            token = t;
            doc.extend(chunk);
            if !r.more {
                break;
            }
        }
        let s: Summary = serde_json::from_slice(&doc).unwrap();
        let control = s.extra.control.unwrap();
        assert_eq!(control.received, 2, "the refused datagram and this request");
        assert_eq!(control.refused["bad_hmac"], 1);
        assert_eq!(control.handled, 1);
        assert_eq!(s.workers, 1);

        // The Prometheus endpoint serves what the tick published.
        ctl.tick();
        let mut http = TcpStream::connect(ctl.metrics_addr().unwrap()).unwrap();
        http.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        http.read_to_string(&mut text).unwrap();
        assert!(
            text.contains("pktdist_control_refused_total{reason=\"bad_hmac\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn health_changes_reach_the_statistics_and_the_metrics() {
        // b's checks reach a listener on 127.0.0.2; a's the same port on
        // 127.0.0.1, where nothing listens.
        let listener = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let text = config(ADMIN_1, A_1)
            .replace(
                "max_affinity_duration = \"10m\"",
                &format!(
                    "max_affinity_duration = \"10m\"\nhealth = {{ kind = \"tcp\", port = {port}, interval = \"200ms\", timeout = \"100ms\", rise = 1, fall = 2 }}"
                ),
            )
            .replace(
                "address = \"10.0.0.1\"",
                "address = \"10.0.0.1\"\nhealth_address = \"127.0.0.1\"",
            )
            .replace(
                "address = \"10.0.0.2\"",
                "address = \"10.0.0.2\"\nhealth_address = \"127.0.0.2\"",
            );
        let file = File::new("health", &text);
        let checked = text;
        let mut ctl = control(&file.0, None);
        assert!(ctl.health().is_up("web", "a"), "up until proven down");
        let deadline = Instant::now() + Duration::from_secs(30);
        while ctl.health().is_up("web", "a") && Instant::now() < deadline {
            ctl.tick();
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!ctl.health().is_up("web", "a"));
        assert!(ctl.health().is_up("web", "b"));
        let s = ctl.summary();
        let h = s.extra.health.as_ref().expect("health in the statistics");
        let a = h.backend("web", "a").unwrap();
        assert_eq!((a.state.as_str(), a.changes), ("down", 1));
        assert!(
            a.last_error
                .as_deref()
                .unwrap_or("")
                .starts_with("connect: "),
            "{a:?}"
        );
        assert!(a.failed >= 2);
        assert_eq!(h.backend("web", "b").unwrap().state, "up");
        assert!(h.backend("mail", "m1").is_none(), "mail has no checks");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["extra"]["health"]["backends"][0]["state"], "down");
        // The control plane took it out: down in the snapshot, with the
        // check's error, and in the summary's backends.
        let dp = ctl.plane().dataplane();
        let web = dp.service_named("web").unwrap();
        let a_id = dp.find_backend(web.id, "a").unwrap().id;
        assert_eq!(dp.backend(a_id).unwrap().state, BackendState::Down);
        assert!(web.maglev.shares()[0] == 0 && !web.all_down);
        assert!(ctl
            .plane()
            .backend_status(a_id)
            .unwrap()
            .check_error
            .is_some());
        let web_sum = s.services.iter().find(|x| x.name == "web").unwrap();
        assert_eq!(web_sum.backends[0].state, "down");
        assert_eq!(web_sum.backends[1].state, "up");

        let text = metrics::render(&s);
        for line in [
            "pktdist_backend_up{service=\"web\",backend=\"a\"} 0",
            "pktdist_backend_up{service=\"web\",backend=\"b\"} 1",
            "pktdist_backend_up{service=\"mail\",backend=\"m1\"} 1",
            "pktdist_backend_state_changes_total{service=\"web\",backend=\"a\"} 1",
            "pktdist_backend_state_changes_total{service=\"web\",backend=\"b\"} 0",
            "pktdist_health_probe_seconds_count{service=\"web\",kind=\"tcp\"} ",
            "pktdist_health_probe_seconds{service=\"web\",kind=\"tcp\",quantile=\"0.5\"} ",
            "pktdist_health_checker_up 1\n",
            "pktdist_health_checker_restarts_total 0\n",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }

        // a's address changes (its checks' does not): a new id to the
        // plane, still down, as the checks say.
        file.write(&checked.replace("address = \"10.0.0.1\"\n", "address = \"10.0.0.9\"\n"));
        ctl.reload().unwrap();
        let dp = ctl.plane().dataplane();
        let web = dp.service_named("web").unwrap();
        let a = dp.find_backend(web.id, "a").unwrap();
        assert_ne!(a.id, a_id, "a new id for a new address");
        assert_eq!(a.state, BackendState::Down);
        assert!(!ctl.health().is_up("web", "a"));

        // The health key goes: a counts as up again, the checker stops.
        file.write(&config(ADMIN_1, A_1));
        ctl.reload().unwrap();
        assert!(ctl.health().is_up("web", "a"));
        assert!(ctl.summary().extra.health.is_none());
        let dp = ctl.plane().dataplane();
        let web = dp.service_named("web").unwrap();
        assert_eq!(
            dp.find_backend(web.id, "a").unwrap().state,
            BackendState::Up
        );
        drop(listener);
    }

    /// A status-line sink the test can read.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serve_until_reloads_on_its_flag_and_prints_the_status_line() {
        let file = File::new("serve", &config(ADMIN_1, A_1));
        let out = Sink::default();
        let mut ctl = control(&file.0, Some(Box::new(out.clone())));
        let (stop, reload) = (AtomicBool::new(false), AtomicBool::new(true));
        // A deadline already past: nothing runs.
        ctl.serve_until(&stop, &reload, Some(Instant::now()));
        assert!(reload.load(Ordering::Relaxed));

        file.write(&config(ADMIN_1, A_1).replace(B_BACKEND, ""));
        std::thread::scope(|s| {
            s.spawn(|| ctl.serve_until(&stop, &reload, None));
            for _ in 0..1000 {
                if !reload.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert!(!reload.load(Ordering::Relaxed), "the flag was taken");
        let web = ctl.plane().dataplane().service_named("web").unwrap();
        assert_eq!(web.backends.len(), 1, "b is gone");

        // The status line, once its interval has passed.
        let now = Instant::now();
        ctl.step(now + Duration::from_secs(2));
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with("rx 0.000 Mpps"), "{text:?}");
        assert!(text.contains("affinities 0"), "{text:?}");
    }

    #[test]
    fn the_state_file_is_written_at_shutdown_after_the_last_notices() {
        let dir = std::env::temp_dir().join(format!("pktdist-thread-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let state = dir.join("affinities.state");
        let text = format!(
            "{}\n[affinity]\nstate_file = \"{}\"\n",
            config(ADMIN_1, A_1),
            state.display()
        );
        let file = File::new("state", &text);
        let mut ctl = control(&file.0, None);
        let mut a = Peer::new("a", A_1);
        let r = ask(&mut ctl, &mut a, A_1, &create("198.18.0.0")).expect("answered");
        assert_eq!(r.code, ReturnCode::Ok);
        let mut short = op("198.18.1.0", 24, None, 1);
        short.notify = None;
        let r = ask(&mut ctl, &mut a, A_1, &Request::AffinityCreate(short)).expect("answered");
        assert_eq!(r.code, ReturnCode::Ok);
        std::thread::sleep(Duration::from_millis(1100));

        // Stopping without another tick: the short one ends, is notified,
        // and the file keeps only the other.
        ctl.save_state().unwrap();
        match a.recv_signed(A_1) {
            Some(Received::Ended(n)) => {
                assert_eq!((n.key, n.reason), (short.key, EndReason::Expired))
            }
            other => panic!("no notice: {other:?}"),
        }
        let saved = crate::control::state_file::load(&state).unwrap().unwrap();
        assert_eq!(saved.affinities.len(), 1);
        assert_eq!(saved.affinities[0].owner, "a");
        drop(ctl);

        // The next control thread has it back.
        let ctl = control(&file.0, None);
        assert_eq!(ctl.plane().affinities().len(), 1);
        drop(ctl);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
