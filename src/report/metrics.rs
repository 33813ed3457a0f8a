//! The Prometheus endpoint: `GET /metrics` in the text exposition format
//! (version 0.0.4), rendered from the same [`Summary`] that `pktdist stats`
//! and the end-of-run summary show; and `GET /ready`, the readiness signal
//! (200 while the instance serves with its whole affinity table, 503
//! while it starts or stops), for route announcement and `pktdist status`.
//!
//! The control thread renders the text about once a second; a small HTTP
//! thread serves the latest rendering, so a slow scraper never holds up the
//! control thread. Each connection is answered on a thread of its own,
//! within [`REQUEST_DEADLINE`] for its request head and [`ANSWER_DEADLINE`]
//! for the answer. Connections from this host (the route announcer's
//! readiness check) have [`MAX_LOCAL`] threads of their own; other hosts
//! share [`MAX_CONNECTIONS`], at most [`MAX_PER_PEER`] each. A connection
//! that finds no thread within [`SLOT_WAIT`] is answered 429, so clients
//! that trickle their requests or never read cannot make a readiness check
//! from this host wait.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::datapath::latency::Percentiles;
use crate::report::summary::Summary;
use crate::types::BackendState;

/// How often the control thread re-renders the metrics.
const RENDER_PERIOD: Duration = Duration::from_secs(1);
/// Largest request head read.
const MAX_REQUEST: usize = 8192;
/// How long `GET /ready` answers ready after the control thread last said
/// so: it says so every tick (100 ms), so a control thread stuck longer
/// (hung, or in a reload that long) reads as not ready and its route is
/// withdrawn, while one busy for a moment does not flap.
const READY_FOR: Duration = Duration::from_secs(5);
/// Connections from other hosts answered at once, each on its own thread.
const MAX_CONNECTIONS: usize = 8;
/// Of those, from any one address.
const MAX_PER_PEER: usize = 2;
/// Connections from this host answered at once, counted apart from the
/// others': a readiness check from this host never waits behind other
/// hosts' connections, however many they hold open.
const MAX_LOCAL: usize = 4;
/// How long an accepted connection may wait for a thread of its pool
/// before it is answered 429 (busy).
const SLOT_WAIT: Duration = Duration::from_secs(1);
/// Accepted connections waiting for a thread at most; more are answered
/// 429 at once.
const MAX_WAITING: usize = 64;
/// How old the rendered text may be before `GET /metrics` answers 503: the
/// control thread renders it every second, so older means it is stuck (as
/// for [`READY_FOR`]), and a scrape must not pass frozen figures off as
/// live ones.
const STALE_AFTER: Duration = READY_FOR;
/// How long a connection may take to send its request head before it is
/// closed.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// How long a connection may take to take its answer (`/metrics` of
/// thousands of backends runs to megabytes) before it is closed.
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);

struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl Family<'_> {
    fn new<'a>(out: &'a mut String, name: &'static str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out, name }
    }

    fn sample(&mut self, suffix: &str, labels: &[(&str, &str)], value: f64) {
        let _ = write!(self.out, "{}{suffix}", self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        if value.fract() == 0.0 && value.abs() < 9.0e15 {
            let _ = writeln!(self.out, " {}", value as i64);
        } else {
            let _ = writeln!(self.out, " {value}");
        }
    }

    fn value(&mut self, labels: &[(&str, &str)], value: f64) {
        self.sample("", labels, value);
    }

    /// A summary's quantiles, count and sum (from the mean), scaled to
    /// base units by `scale` (ns -> s: 1e-9).
    fn quantiles(&mut self, p: &Percentiles, scale: f64) {
        self.labelled_quantiles(&[], p, scale);
    }

    /// [`Family::quantiles`] of one series, with `labels` before the
    /// quantile.
    fn labelled_quantiles(&mut self, labels: &[(&str, &str)], p: &Percentiles, scale: f64) {
        let with = |q: &'static str| {
            let mut l = labels.to_vec();
            l.push(("quantile", q));
            l
        };
        // No observation: no quantile either (NaN, as Prometheus's own
        // clients export it), rather than a 0 that reads as fast.
        let of = |v: u64| {
            if p.count == 0 {
                f64::NAN
            } else {
                v as f64 * scale
            }
        };
        for (q, v) in p.quantiles() {
            self.sample("", &with(q), of(v));
        }
        self.sample("", &with("1"), of(p.max));
        self.sample("_sum", labels, p.mean * p.count as f64 * scale);
        self.sample("_count", labels, p.count as f64);
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the metrics for a summary.
pub fn render(s: &Summary) -> String {
    let mut o = String::with_capacity(8192);
    let totals: [(&'static str, &str, u64); 9] = [
        (
            "pktdist_received_packets_total",
            "Packets received by the workers.",
            s.rx_packets,
        ),
        (
            "pktdist_transmitted_packets_total",
            "Packets transmitted by the workers.",
            s.tx_packets,
        ),
        (
            "pktdist_received_bytes_total",
            "Bytes received by the workers.",
            s.rx_bytes,
        ),
        (
            "pktdist_transmitted_bytes_total",
            "Bytes transmitted by the workers.",
            s.tx_bytes,
        ),
        (
            "pktdist_tcp_syn_total",
            "TCP SYNs (without ACK) to a service, every one: also those repeated on a flow already open.",
            s.syns,
        ),
        (
            "pktdist_untracked_syns_total",
            "TCP SYNs routed without a flow entry while their worker's SYN flood guard was engaged (each also a new connection).",
            s.syns_untracked,
        ),
        (
            "pktdist_unknown_flow_packets_total",
            "TCP packets, not SYNs, of flows the connection table did not know: routed as a new connection would be, and tracked from then on.",
            s.unknown_flows,
        ),
        (
            "pktdist_untracked_flows_total",
            "Flow-table inserts refused because all service-address indices were held: those packets were routed without an entry.",
            s.untracked_flows,
        ),
        (
            "pktdist_new_connections_total",
            "New connections distributed.",
            s.new_connections,
        ),
    ];
    for (name, help, v) in totals {
        Family::new(&mut o, name, "counter", help).value(&[], v as f64);
    }
    let mut f = Family::new(
        &mut o,
        "pktdist_dropped_packets_total",
        "counter",
        "Packets dropped, by reason.",
    );
    for (reason, v) in &s.drops {
        f.value(&[("reason", reason)], *v as f64);
    }
    let icmp: [(&'static str, &str, u64); 5] = [
        (
            "pktdist_icmp_forwarded_total",
            "ICMP errors forwarded to the backend of the connection they quote.",
            s.icmp.forwarded,
        ),
        (
            "pktdist_icmp_echo_replies_total",
            "Echo requests to a VIP answered.",
            s.icmp.echo_answered,
        ),
        (
            "pktdist_icmp_too_big_sent_total",
            "ICMP fragmentation needed / packet too big sent for packets too long for their port once forwarded.",
            s.icmp.too_big_sent,
        ),
        (
            "pktdist_fragmented_packets_total",
            "IPv4 packets without DF forwarded in fragments.",
            s.icmp.fragmented,
        ),
        (
            "pktdist_fragments_sent_total",
            "Fragments those packets were sent as.",
            s.icmp.fragments,
        ),
    ];
    for (name, help, v) in icmp {
        Family::new(&mut o, name, "counter", help).value(&[], v as f64);
    }
    let mut f = Family::new(
        &mut o,
        "pktdist_icmp_dropped_total",
        "counter",
        "ICMP messages to a VIP dropped, by reason.",
    );
    for (reason, v) in &s.icmp.dropped {
        f.value(&[("reason", reason)], *v as f64);
    }
    Family::new(
        &mut o,
        "pktdist_active_flows",
        "gauge",
        "Connections in the workers' flow tables.",
    )
    .value(&[], s.active_flows as f64);
    Family::new(
        &mut o,
        "pktdist_syn_flood_guard_workers",
        "gauge",
        "Workers whose SYN flood guard is engaged: their SYNs take no flow entry.",
    )
    .value(&[], s.syn_guard_workers as f64);
    let mut f = Family::new(
        &mut o,
        "pktdist_flows_ended_total",
        "counter",
        "Flows that left the workers' flow tables, by reason: closed (a new SYN on the tuple of a flow closing after a FIN, or of a down backend's flow; its backend removed), evicted (a full bucket's least recently seen, for a new flow), expired (idle past its timeout).",
    );
    for (reason, v) in s.flows_ended.as_array() {
        f.value(&[("reason", reason)], v as f64);
    }
    Family::new(
        &mut o,
        "pktdist_affinities",
        "gauge",
        "Affinities installed (requested and static).",
    )
    .value(&[], s.affinities as f64);
    Family::new(
        &mut o,
        "pktdist_affinity_capacity",
        "gauge",
        "Affinities the table holds at most ([affinity] capacity).",
    )
    .value(&[], s.affinity_capacity as f64);
    Family::new(
        &mut o,
        "pktdist_auto_affinity_pins",
        "gauge",
        "Automatic-affinity pins held: a client on a service, with connections open or lingering.",
    )
    .value(&[], s.auto_affinity_pins as f64);
    Family::new(
        &mut o,
        "pktdist_auto_affinity_table_full_total",
        "counter",
        "New clients of automatic-affinity services left unpinned because the table had no room.",
    )
    .value(&[], s.auto_affinity_table_full as f64);

    type ServiceGet = fn(&crate::report::summary::ServiceSummary) -> u64;
    let per_service: [(&'static str, &str, ServiceGet); 5] = [
        (
            "pktdist_service_packets_total",
            "Packets forwarded, by service.",
            |x| x.packets,
        ),
        (
            "pktdist_service_connections_total",
            "New connections, by service.",
            |x| x.new_connections,
        ),
        (
            "pktdist_affinity_hits_total",
            "New connections routed by an affinity.",
            |x| x.affinity_hits,
        ),
        (
            "pktdist_affinity_misses_total",
            "New connections no affinity matched.",
            |x| x.affinity_misses,
        ),
        (
            "pktdist_auto_affinity_hits_total",
            "New connections routed by automatic affinity.",
            |x| x.auto_affinity_hits,
        ),
    ];
    for (name, help, get) in per_service {
        let mut f = Family::new(&mut o, name, "counter", help);
        for svc in &s.services {
            f.value(&[("service", &svc.name)], get(svc) as f64);
        }
    }

    let mut f = Family::new(
        &mut o,
        "pktdist_service_all_unhealthy",
        "gauge",
        "1 while every backend of a service that would take new connections fails its health checks and they take them all the same (all_unhealthy = \"spread\").",
    );
    for svc in &s.services {
        f.value(
            &[("service", &svc.name)],
            f64::from(u8::from(svc.all_unhealthy)),
        );
    }

    type Get = fn(&crate::report::summary::BackendSummary) -> f64;
    let per_backend: [(&'static str, &str, &str, Get); 7] = [
        (
            "pktdist_backend_packets_total",
            "counter",
            "Packets forwarded to a backend.",
            |b| b.packets as f64,
        ),
        (
            "pktdist_backend_bytes_total",
            "counter",
            "Bytes forwarded to a backend.",
            |b| b.bytes as f64,
        ),
        (
            "pktdist_backend_connections_total",
            "counter",
            "New connections sent to a backend.",
            |b| b.connections as f64,
        ),
        (
            "pktdist_backend_active_connections",
            "gauge",
            "Connections to a backend in the flow tables.",
            |b| b.active_connections as f64,
        ),
        (
            "pktdist_backend_weight",
            "gauge",
            "A backend's weight (0 = draining).",
            |b| b.weight as f64,
        ),
        (
            "pktdist_backend_affinities",
            "gauge",
            "Requested affinities a backend holds (those its quota counts).",
            |b| b.affinities as f64,
        ),
        (
            "pktdist_backend_affinity_quota",
            "gauge",
            "Requested affinities a backend may hold on its service.",
            |b| b.affinity_quota as f64,
        ),
    ];
    for (name, kind, help, get) in per_backend {
        let mut f = Family::new(&mut o, name, kind, help);
        for svc in &s.services {
            for b in &svc.backends {
                f.value(&[("service", &svc.name), ("backend", &b.name)], get(b));
            }
        }
    }
    {
        let mut f = Family::new(
            &mut o,
            "pktdist_backend_state",
            "gauge",
            "1 for the state a backend is in (up, draining, down), 0 for the others.",
        );
        for svc in &s.services {
            for b in &svc.backends {
                for state in [BackendState::Up, BackendState::Draining, BackendState::Down] {
                    let on = b.state == state.name();
                    f.value(
                        &[
                            ("service", &svc.name),
                            ("backend", &b.name),
                            ("state", state.name()),
                        ],
                        if on { 1.0 } else { 0.0 },
                    );
                }
            }
        }
    }

    type WorkerGet = fn(&crate::report::summary::WorkerSummary) -> f64;
    let per_worker: [(&'static str, &str, &str, WorkerGet); 6] = [
        (
            "pktdist_worker_received_packets_total",
            "counter",
            "Packets received, by worker.",
            |w| w.rx_packets as f64,
        ),
        (
            "pktdist_worker_transmitted_packets_total",
            "counter",
            "Packets transmitted, by worker.",
            |w| w.tx_packets as f64,
        ),
        (
            "pktdist_worker_dropped_packets_total",
            "counter",
            "Packets dropped, by worker.",
            |w| w.dropped as f64,
        ),
        (
            "pktdist_worker_active_flows",
            "gauge",
            "Flows in a worker's connection table.",
            |w| w.active_flows as f64,
        ),
        (
            "pktdist_worker_busy_ratio",
            "gauge",
            "Share of time a worker spent in loop iterations that received packets, since start (rate(pktdist_worker_busy_seconds_total) is the current share).",
            |w| w.busy,
        ),
        (
            "pktdist_worker_busy_seconds_total",
            "counter",
            "Time a worker spent in loop iterations that received packets.",
            |w| w.busy_seconds,
        ),
    ];
    for (name, kind, help, get) in per_worker {
        let mut f = Family::new(&mut o, name, kind, help);
        for (i, w) in s.workers_detail.iter().enumerate() {
            f.value(&[("worker", &i.to_string())], get(w));
        }
    }

    type PortGet = fn(&crate::report::summary::PortSummary) -> u64;
    let per_port: [(&'static str, &str, PortGet); 8] = [
        (
            "pktdist_port_received_packets_total",
            "Packets the device received.",
            |p| p.ipackets,
        ),
        (
            "pktdist_port_transmitted_packets_total",
            "Packets the device transmitted.",
            |p| p.opackets,
        ),
        (
            "pktdist_port_received_bytes_total",
            "Bytes the device received.",
            |p| p.ibytes,
        ),
        (
            "pktdist_port_transmitted_bytes_total",
            "Bytes the device transmitted.",
            |p| p.obytes,
        ),
        (
            "pktdist_port_missed_packets_total",
            "Packets the device dropped for a full receive queue.",
            |p| p.imissed,
        ),
        (
            "pktdist_port_receive_errors_total",
            "Receive errors of the device.",
            |p| p.ierrors,
        ),
        (
            "pktdist_port_transmit_errors_total",
            "Transmit errors of the device.",
            |p| p.oerrors,
        ),
        (
            "pktdist_port_no_mbuf_total",
            "Receive failures for want of a packet buffer.",
            |p| p.rx_nombuf,
        ),
    ];
    for (name, help, get) in per_port {
        let mut f = Family::new(&mut o, name, "counter", help);
        for p in &s.ports {
            f.value(&[("port", &p.name)], get(p) as f64);
        }
    }
    let mut f = Family::new(
        &mut o,
        "pktdist_port_link_up",
        "gauge",
        "1 while the port's link is up (a memif port: while its peer is connected).",
    );
    for p in &s.ports {
        f.value(&[("port", &p.name)], if p.link_down { 0.0 } else { 1.0 });
    }

    if let Some(control) = &s.extra.control {
        let mut f = Family::new(
            &mut o,
            "pktdist_control_refused_total",
            "counter",
            "Control datagrams refused, by reason.",
        );
        for (reason, v) in &control.refused {
            f.value(&[("reason", reason)], *v as f64);
        }
        let mut f = Family::new(
            &mut o,
            "pktdist_control_replies_total",
            "counter",
            "Requests the control plane handled, by the return code of the answer.",
        );
        for (code, v) in &control.by_code {
            f.value(&[("code", code)], *v as f64);
        }
        let mut f = Family::new(
            &mut o,
            "pktdist_affinity_limited_total",
            "counter",
            "Backends' affinity creates refused by their service's limits, by limit.",
        );
        for (limit, v) in &control.limited {
            f.value(&[("limit", limit)], *v as f64);
        }
        let mut f = Family::new(
            &mut o,
            "pktdist_control_rate_limited_total",
            "counter",
            "Requests answered RATE_LIMITED, by sender name.",
        );
        for (sender, v) in &control.rate_limited {
            f.value(&[("sender", sender)], *v as f64);
        }
        let mut f = Family::new(
            &mut o,
            "pktdist_affinity_ended_total",
            "counter",
            "Affinities ended, by reason.",
        );
        for (reason, v) in control.ended.as_array() {
            f.value(&[("reason", reason)], v as f64);
        }
        let mut f = Family::new(
            &mut o,
            "pktdist_state_file_writes_total",
            "counter",
            "Writes of the affinity state file, by result (ok, failed).",
        );
        f.value(&[("result", "ok")], control.state_file_writes as f64);
        f.value(
            &[("result", "failed")],
            control.state_file_write_failures as f64,
        );
    }

    health(&mut o, s);
    if let Some(c) = &s.extra.cluster {
        cluster(&mut o, c);
    }

    Family::new(
        &mut o,
        "pktdist_packet_processing_seconds",
        "summary",
        "Per-packet processing time in the workers, measured per loop iteration.",
    )
    .quantiles(&s.packet_latency_ns, 1e-9);
    Family::new(
        &mut o,
        "pktdist_control_request_seconds",
        "summary",
        "Time to handle one control datagram.",
    )
    .quantiles(&s.control_latency_ns, 1e-9);
    Family::new(
        &mut o,
        "pktdist_affinity_lifetime_seconds",
        "summary",
        "How long ended affinities lived.",
    )
    .quantiles(&s.affinity_lifetime_ms, 1e-3);
    o
}

/// The health-check families: every backend's state (1 unless its checks
/// took it down), the checked backends' state changes, and probe times.
fn health(o: &mut String, s: &Summary) {
    let h = s.extra.health.as_ref();
    let mut f = Family::new(
        o,
        "pktdist_backend_up",
        "gauge",
        "0 while the backend's health checks fail (their verdict: down, also while its service spreads over backends that all fail), else 1 (a drained or declared-down backend too).",
    );
    // A set, for thousands of backends.
    let down: HashSet<(&str, &str)> = h
        .map(|h| h.backends.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|b| b.state != "up")
        .map(|b| (b.service.as_str(), b.backend.as_str()))
        .collect();
    for svc in &s.services {
        for b in &svc.backends {
            let down = down.contains(&(svc.name.as_str(), b.name.as_str()));
            f.value(
                &[("service", &svc.name), ("backend", &b.name)],
                if down { 0.0 } else { 1.0 },
            );
        }
    }
    let mut f = Family::new(
        o,
        "pktdist_backend_state_changes_total",
        "counter",
        "Times a checked backend went down or came back up.",
    );
    for b in h.map(|h| h.backends.as_slice()).unwrap_or_default() {
        f.value(
            &[("service", &b.service), ("backend", &b.backend)],
            b.changes as f64,
        );
    }
    let mut f = Family::new(
        o,
        "pktdist_health_probe_seconds",
        "summary",
        "Time one health check took (a timed-out check: its timeout), by service and kind.",
    );
    for p in h.map(|h| h.probes.as_slice()).unwrap_or_default() {
        f.labelled_quantiles(
            &[("service", &p.service), ("kind", &p.kind)],
            &p.time_ns,
            1e-9,
        );
    }
    let Some(h) = h else {
        return;
    };
    Family::new(
        o,
        "pktdist_health_checker_up",
        "gauge",
        "1 while the health checker runs, 0 while it does not (it could not start or ended; backends keep their states until it is started again).",
    )
    .value(&[], if h.checker_down { 0.0 } else { 1.0 });
    Family::new(
        o,
        "pktdist_health_checker_restarts_total",
        "counter",
        "Times the health checker was started again after it could not start or ended.",
    )
    .value(&[], h.checker_restarts as f64);
}

/// Cluster mode's families (`[cluster]`).
fn cluster(o: &mut String, c: &crate::report::summary::ClusterSummary) {
    Family::new(
        o,
        "pktdist_cluster_store_up",
        "gauge",
        "1 while the shared affinity table (etcd) answers, 0 while it is unreachable.",
    )
    .value(&[], if c.store_up { 1.0 } else { 0.0 });
    let mut f = Family::new(
        o,
        "pktdist_cluster_changes_total",
        "counter",
        "Affinity changes sent to the shared table, by result (committed, conflict, retried, not_found, unavailable).",
    );
    for (result, v) in &c.changes {
        f.value(&[("result", result)], *v as f64);
    }
    Family::new(
        o,
        "pktdist_cluster_propagation_seconds",
        "summary",
        "From another instance's commit to this instance's install of the change.",
    )
    .quantiles(&c.propagation_ms, 1e-3);
    let mut f = Family::new(
        o,
        "pktdist_cluster_ends_total",
        "counter",
        "Ended affinities by who settled them: won (this instance's delete committed and it notified), lost (another instance did).",
    );
    f.value(&[("result", "won")], c.ends_won as f64);
    f.value(&[("result", "lost")], c.ends_lost as f64);
    Family::new(
        o,
        "pktdist_cluster_pending_ends",
        "gauge",
        "Ended affinities whose delete has not committed yet (their notice waits).",
    )
    .value(&[], c.pending_ends as f64);
    Family::new(
        o,
        "pktdist_cluster_loads_total",
        "counter",
        "Full loads of the shared table installed (at start and after each reconnection).",
    )
    .value(&[], c.loads as f64);
    let mut f = Family::new(
        o,
        "pktdist_cluster_not_installed_total",
        "counter",
        "Shared affinities this instance did not install, by reason: static (a static affinity of another backend holds the key here), table_full (the local table had no room).",
    );
    f.value(&[("reason", "static")], c.static_refused as f64);
    f.value(&[("reason", "table_full")], c.table_full as f64);
}

struct Shared {
    text: Mutex<String>,
    /// When the control thread last said it was ready (it says so every
    /// tick while it is): `GET /ready` answers 200 for [`READY_FOR`] after.
    ready_at: Mutex<Option<Instant>>,
    stop: AtomicBool,
    rendered: Mutex<Option<Instant>>,
}

impl Shared {
    fn is_ready(&self) -> bool {
        let at = *self.ready_at.lock().unwrap_or_else(|e| e.into_inner());
        at.is_some_and(|t| t.elapsed() < READY_FOR)
    }

    /// What `GET /metrics` answers: the latest rendering with readiness
    /// (known here, at the moment of the scrape) added; or why there is
    /// none to give, if it was never rendered or is older than
    /// [`STALE_AFTER`] (the scrape fails, so `up` reads 0).
    fn metrics(&self) -> Result<String, String> {
        let rendered = *self.rendered.lock().unwrap_or_else(|e| e.into_inner());
        match rendered.map(|t| t.elapsed()) {
            None => return Err("no metrics yet: pktdist is starting\n".into()),
            Some(age) if age > STALE_AFTER => {
                return Err(format!(
                    "metrics stale: last rendered {:.1} s ago (the control thread is stuck)\n",
                    age.as_secs_f64()
                ));
            }
            Some(_) => {}
        }
        let mut text = self.text.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Family::new(
            &mut text,
            "pktdist_ready",
            "gauge",
            "1 while GET /ready answers 200 (serving, with the whole affinity table and every port's link), 0 while starting or stopping, or a port forwarded traffic leaves by has lost its link.",
        )
        .value(&[], if self.is_ready() { 1.0 } else { 0.0 });
        Ok(text)
    }
}

/// The HTTP endpoint's thread.
pub struct MetricsServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens on `addr` and serves until dropped.
    pub fn start(addr: SocketAddr) -> io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            text: Mutex::new(String::new()),
            ready_at: Mutex::new(None),
            stop: AtomicBool::new(false),
            rendered: Mutex::new(None),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("pktdist-metrics".into())
            .spawn(move || serve(listener, s))?;
        Ok(MetricsServer {
            shared,
            addr,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the text is due to be rendered again.
    pub fn wants_update(&self) -> bool {
        let last = self
            .shared
            .rendered
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        last.is_none_or(|t| t.elapsed() >= RENDER_PERIOD)
    }

    /// Sets what `GET /ready` answers: 200 while ready, 503 otherwise
    /// (starting, stopping), and 503 too once [`READY_FOR`] has passed
    /// without a call saying ready.
    pub fn set_ready(&self, ready: bool) {
        *self
            .shared
            .ready_at
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = ready.then(Instant::now);
    }

    /// Replaces the text served.
    pub fn publish(&self, text: String) {
        *self.shared.text.lock().unwrap_or_else(|e| e.into_inner()) = text;
        *self
            .shared
            .rendered
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let pools = Arc::new(Mutex::new(Pools::default()));
    // Accepted connections waiting for a thread: (connection, peer, the
    // address it reached, when it was accepted).
    let mut waiting: VecDeque<(TcpStream, IpAddr, IpAddr, Instant)> = VecDeque::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let accepted = match listener.accept() {
            Ok((stream, peer)) => match stream.local_addr() {
                Ok(local) if waiting.len() < MAX_WAITING => {
                    waiting.push_back((stream, peer.ip(), local.ip(), Instant::now()));
                    true
                }
                _ => {
                    busy(stream);
                    true
                }
            },
            Err(_) => false,
        };
        for _ in 0..waiting.len() {
            let Some((stream, peer, local, since)) = waiting.pop_front() else {
                break;
            };
            match Slot::take(&pools, peer, local) {
                Some(slot) => {
                    let s = Arc::clone(&shared);
                    // If the thread cannot start, the closure is dropped
                    // with the connection (closed, unanswered) and the slot.
                    let _ = std::thread::Builder::new()
                        .name("pktdist-http".into())
                        .spawn(move || {
                            // A misbehaving client costs at most its
                            // deadlines; its slot is given back as soon as
                            // the connection is closed.
                            let _ = answer(stream, &s);
                            drop(slot);
                        });
                }
                None if since.elapsed() >= SLOT_WAIT => busy(stream),
                None => waiting.push_back((stream, peer, local, since)),
            }
        }
        if !accepted {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Answers a connection that waited [`SLOT_WAIT`] for a thread in vain
/// (or found too many waiting): 429 at once, without waiting for its
/// request. What it has sent is read first, without waiting for more, so
/// that closing it does not reset the connection and lose the answer.
fn busy(mut stream: TcpStream) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let mut head = [0u8; 1024];
    for _ in 0..MAX_REQUEST / head.len() {
        if !matches!(stream.read(&mut head), Ok(n) if n > 0) {
            break;
        }
    }
    let _ = stream.write(
        http_reply(
            "429 Too Many Requests",
            "text/plain; charset=utf-8",
            "busy: too many connections\n",
        )
        .as_bytes(),
    );
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// An HTTP/1.1 answer, the connection closed after it.
fn http_reply(status: &str, ctype: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The connections being answered: this host's, and other hosts' by
/// address.
#[derive(Default)]
struct Pools {
    local: usize,
    remote: usize,
    peers: HashMap<IpAddr, usize>,
}

/// One connection's place in [`Pools`], given back when dropped, however
/// its thread ends.
struct Slot {
    pools: Arc<Mutex<Pools>>,
    /// `None` for a connection from this host.
    peer: Option<IpAddr>,
}

impl Slot {
    /// A place for a connection from `peer` to `local` (this host's when
    /// they are the same address, which a connection to one of its own
    /// addresses has), if its pool has one left.
    fn take(pools: &Arc<Mutex<Pools>>, peer: IpAddr, local: IpAddr) -> Option<Slot> {
        let mut p = pools.lock().unwrap_or_else(|e| e.into_inner());
        let peer = (peer.to_canonical() != local.to_canonical()).then_some(peer);
        match peer {
            None if p.local < MAX_LOCAL => p.local += 1,
            Some(ip)
                if p.remote < MAX_CONNECTIONS
                    && p.peers.get(&ip).copied().unwrap_or(0) < MAX_PER_PEER =>
            {
                p.remote += 1;
                *p.peers.entry(ip).or_insert(0) += 1;
            }
            _ => return None,
        }
        Some(Slot {
            pools: Arc::clone(pools),
            peer,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut p = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        match self.peer {
            None => p.local -= 1,
            Some(ip) => {
                p.remote -= 1;
                if let Some(n) = p.peers.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        p.peers.remove(&ip);
                    }
                }
            }
        }
    }
}

/// The time left until `deadline` (a timeout error once it has passed),
/// for a socket timeout (the metrics server's answers, and `pktdist
/// status`'s request).
pub(crate) fn time_left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(io::ErrorKind::TimedOut.into())
    } else {
        Ok(left)
    }
}

fn answer(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
        stream.set_read_timeout(Some(time_left(deadline)?))?;
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => match shared.metrics() {
            Ok(text) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text),
            Err(why) => ("503 Service Unavailable", "text/plain; charset=utf-8", why),
        },
        ("GET", "/ready") if shared.is_ready() => {
            ("200 OK", "text/plain; charset=utf-8", "ready\n".to_string())
        }
        ("GET", "/ready") => (
            "503 Service Unavailable",
            "text/plain; charset=utf-8",
            "not ready\n".to_string(),
        ),
        ("GET", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "pktdist: metrics at /metrics, readiness at /ready\n".to_string(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_string(),
        ),
    };
    let reply = http_reply(status, ctype, &body);
    let deadline = Instant::now() + ANSWER_DEADLINE;
    let mut rest = reply.as_bytes();
    while !rest.is_empty() {
        stream.set_write_timeout(Some(time_left(deadline)?))?;
        match stream.write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::counters::WorkerCounters;
    use crate::types::DropReason;

    fn summary() -> Summary {
        let w = vec![Arc::new(WorkerCounters::default())];
        w[0].rx_packets.add(10);
        w[0].count_drop(DropReason::NoService);
        w[0].icmp_forwarded.add(2);
        w[0].icmp_drops[crate::types::IcmpDrop::ShortQuote as usize].inc();
        let mut s = Summary::collect(
            &w,
            &crate::datapath::snapshot::Dataplane::default(),
            1.0,
            0,
            &Default::default(),
        );
        s.packet_latency_ns = Percentiles {
            count: 4,
            p50: 100,
            p90: 200,
            p99: 300,
            p999: 400,
            max: 500,
            mean: 150.0,
        };
        s
    }

    #[test]
    fn limit_families_carry_their_labels() {
        let mut s = summary();
        s.extra.control = Some(crate::report::summary::ControlSummary {
            limited: [("quota".to_string(), 3)].into(),
            rate_limited: [("be1".to_string(), 7)].into(),
            ..Default::default()
        });
        let text = render(&s);
        assert!(text.contains("# TYPE pktdist_affinity_limited_total counter\n"));
        assert!(text.contains("pktdist_affinity_limited_total{limit=\"quota\"} 3\n"));
        assert!(text.contains("pktdist_control_rate_limited_total{sender=\"be1\"} 7\n"));
        assert!(text.contains("# TYPE pktdist_backend_affinity_quota gauge\n"));
    }

    #[test]
    fn renders_families_with_help_type_and_labels() {
        let text = render(&summary());
        assert!(text.contains(
            "# TYPE pktdist_received_packets_total counter\npktdist_received_packets_total 10\n"
        ));
        assert!(text.contains("pktdist_dropped_packets_total{reason=\"no_service\"} 1\n"));
        assert!(text.contains("pktdist_icmp_forwarded_total 2\n"));
        assert!(text.contains("pktdist_icmp_dropped_total{reason=\"short_quote\"} 1\n"));
        assert!(text.contains("pktdist_icmp_dropped_total{reason=\"about_icmp\"} 0\n"));
        assert!(text.contains("pktdist_packet_processing_seconds{quantile=\"0.99\"} 0.0000003"));
        assert!(text.contains("pktdist_packet_processing_seconds_count 4\n"));
        // Every sample line belongs to a family declared before it.
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let base = name.trim_end_matches("_sum").trim_end_matches("_count");
                assert!(declared.contains(name) || declared.contains(base), "{line}");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    /// `path`'s answer, asked from `from` (a loopback address other than
    /// the server's reads as another host).
    fn get_from(from: [u8; 4], addr: SocketAddr, path: &str) -> String {
        let mut s = connect_from(from, addr);
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    }

    fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from((from, 0)).into()).unwrap();
        s.connect(&addr.into()).unwrap();
        s.into()
    }

    const HERE: [u8; 4] = [127, 0, 0, 1];

    #[test]
    fn http_endpoint_serves_metrics_and_404() {
        let m = MetricsServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let get = |path: &str| get_from(HERE, m.local_addr(), path);
        let none = get("/metrics");
        assert!(
            none.starts_with("HTTP/1.1 503") && none.ends_with("starting\n"),
            "never rendered: {none}"
        );
        m.publish("pktdist_x 1\n".into());
        let ok = get("/metrics");
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"));
        assert!(
            ok.contains("\r\n\r\npktdist_x 1\n# HELP pktdist_ready ")
                && ok.ends_with("\npktdist_ready 0\n"),
            "{ok}"
        );
        assert!(get("/nope").starts_with("HTTP/1.1 404"));
        assert!(get("/ready").starts_with("HTTP/1.1 503"));
        m.set_ready(true);
        let ready = get("/ready");
        assert!(
            ready.starts_with("HTTP/1.1 200") && ready.ends_with("ready\n"),
            "{ready}"
        );
        assert!(get("/metrics").ends_with("\npktdist_ready 1\n"));
        m.set_ready(false);
        assert!(get("/ready").starts_with("HTTP/1.1 503"));
    }

    /// Ready holds only while the control thread keeps saying so, and the
    /// metrics only while it keeps rendering them: one that stops (hung)
    /// reads as not ready, and fails its scrapes, once [`READY_FOR`] has
    /// passed.
    #[test]
    fn readiness_and_metrics_lapse_without_the_control_threads_word() {
        let m = MetricsServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let get = |path: &str| get_from(HERE, m.local_addr(), path);
        m.set_ready(true);
        m.publish("pktdist_x 1\n".into());
        assert!(get("/ready").starts_with("HTTP/1.1 200"));
        assert!(get("/metrics").starts_with("HTTP/1.1 200"));
        std::thread::sleep(READY_FOR.max(STALE_AFTER) + Duration::from_millis(200));
        assert!(
            get("/ready").starts_with("HTTP/1.1 503"),
            "no word for longer than READY_FOR"
        );
        let stale = get("/metrics");
        assert!(
            stale.starts_with("HTTP/1.1 503") && stale.contains("metrics stale: last rendered"),
            "{stale}"
        );
        m.set_ready(true);
        m.publish("pktdist_x 2\n".into());
        assert!(get("/ready").starts_with("HTTP/1.1 200"));
        assert!(get("/metrics").contains("\npktdist_x 2\n"));
    }

    /// Clients that trickle their requests a byte at a time, each byte
    /// within any per-read timeout, do not keep their connections: the
    /// server closes each once the request's deadline has passed, and
    /// their places are given back.
    #[test]
    fn trickling_clients_are_cut_off() {
        let m = MetricsServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
        m.set_ready(true);
        let addr = m.local_addr();
        let done = Arc::new(AtomicBool::new(false));
        let tricklers: Vec<_> = (0..MAX_PER_PEER)
            .map(|_| {
                let done = Arc::clone(&done);
                let mut s = connect_from(peer(0), addr);
                std::thread::spawn(move || {
                    s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
                    // Until the server closes the connection, or the test
                    // is over (a server that never closes it fails below).
                    for &b in b"GET /metrics HTTP/1.1\r\nHost: x".iter().cycle() {
                        if done.load(Ordering::Relaxed) {
                            return false;
                        }
                        // Closed by the server: a write fails once it has
                        // reset the connection, a read sees the end.
                        if s.write_all(&[b]).is_err() {
                            return true;
                        }
                        let mut one = [0u8; 1];
                        match s.read(&mut one) {
                            Ok(0) => return true,
                            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                            _ => {}
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    unreachable!("cycle never ends")
                })
            })
            .collect();
        let watchdog = {
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(60));
                done.store(true, Ordering::Relaxed);
            })
        };
        for t in tricklers {
            assert!(
                t.join().unwrap(),
                "the server kept a trickling connection open"
            );
        }
        drop(watchdog);
        assert_places_come_back(addr);
    }

    /// Other hosts that hold every connection they may, each asking for
    /// large metrics and never reading them, neither hold up a readiness
    /// check from this host nor get more: one more from any of them, and
    /// one from a host beyond the pool, is answered 429 once it has waited
    /// its second.
    #[test]
    fn other_hosts_cannot_hold_up_a_readiness_check_from_this_one() {
        let m = MetricsServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
        m.set_ready(true);
        // Far more than the sockets' buffers take: an answer that cannot
        // be written before its deadline, while nobody reads it.
        m.publish("x".repeat(16 << 20));
        let addr = m.local_addr();
        let peers = MAX_CONNECTIONS.div_ceil(MAX_PER_PEER);
        assert_eq!(
            peers * MAX_PER_PEER,
            MAX_CONNECTIONS,
            "the pool is filled exactly"
        );
        let holders: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|i| {
                let mut s = connect_from(peer(i / MAX_PER_PEER), addr);
                write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                // The answer has begun: the connection holds its place.
                let mut first = [0u8; 12];
                s.read_exact(&mut first).unwrap();
                assert_eq!(&first, b"HTTP/1.1 200");
                s
            })
            .collect();
        let ready = get_from(HERE, addr, "/ready");
        assert!(
            ready.starts_with("HTTP/1.1 200") && ready.ends_with("ready\n"),
            "{ready}"
        );
        for from in [peer(0), peer(peers)] {
            let busy = get_from(from, addr, "/ready");
            assert!(
                busy.starts_with("HTTP/1.1 429") && busy.ends_with("too many connections\n"),
                "{from:?}: {busy}"
            );
        }
        drop(holders);
        assert_places_come_back(addr);
    }

    /// Another host's address: loopback addresses other than the server's.
    fn peer(i: usize) -> [u8; 4] {
        [127, 0, 0, 2 + i as u8]
    }

    /// Once the connections that held them are gone, every other host's
    /// place is free again: each address gets its answers.
    fn assert_places_come_back(addr: SocketAddr) {
        let peers = MAX_CONNECTIONS.div_ceil(MAX_PER_PEER);
        let hang = Instant::now() + Duration::from_secs(60);
        for i in 0..peers {
            // A place is given back once its thread has seen the
            // connection end: ask until it is.
            loop {
                let r = get_from(peer(i), addr, "/ready");
                if r.starts_with("HTTP/1.1 200") {
                    break;
                }
                assert!(
                    Instant::now() < hang,
                    "{:?} never got a place: {r}",
                    peer(i)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
