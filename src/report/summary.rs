//! What the control thread reports: the one-line status printed every few
//! seconds and the summary at the end of a run (also written as JSON), both
//! computed from the workers' counters and the current dataplane snapshot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

use crate::types::{BackendId, ServiceId};

use crate::datapath::counters::WorkerCounters;
use crate::datapath::latency::{new_histogram, Percentiles};
use crate::datapath::snapshot::Dataplane;
use crate::health::view::HealthSummary;
use crate::types::DropReason;
use crate::types::IcmpDrop;

/// Counters summed over workers at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub drops: [u64; DropReason::COUNT],
    pub syns: u64,
    pub new_connections: u64,
    pub affinity_hits: u64,
    pub affinity_misses: u64,
    pub auto_affinity_hits: u64,
    pub unknown_flows: u64,
    pub untracked_flows: u64,
    pub syns_untracked: u64,
    pub syn_guard_workers: u64,
    pub flows_active: u64,
    pub flows_ended: FlowsEnded,
    pub busy_ns: u64,
}

impl Totals {
    /// Sums the workers' counters.
    pub fn collect(workers: &[std::sync::Arc<WorkerCounters>]) -> Totals {
        let mut t = Totals::default();
        for w in workers {
            t.rx_packets += w.rx_packets.get();
            t.tx_packets += w.tx_packets.get();
            t.rx_bytes += w.rx_bytes.get();
            t.tx_bytes += w.tx_bytes.get();
            for (i, d) in w.drops.iter().enumerate() {
                t.drops[i] += d.get();
            }
            t.syns += w.syns.get();
            t.unknown_flows += w.unknown_flows.get();
            t.untracked_flows += w.flows_untracked.get();
            t.syns_untracked += w.syns_untracked.get();
            t.syn_guard_workers += w.syn_guard_engaged.get();
            t.flows_active += w.flows_active.get();
            t.flows_ended.expired += w.flows_expired.get();
            t.flows_ended.evicted += w.flows_evicted.get();
            t.flows_ended.closed += w.flows_closed.get();
            t.busy_ns += w.busy_ns.get();
            for s in w.services.iter() {
                t.new_connections += s.new_connections.get();
                t.affinity_hits += s.affinity_hits.get();
                t.affinity_misses += s.affinity_misses.get();
                t.auto_affinity_hits += s.auto_affinity_hits.get();
            }
        }
        t
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
}

/// One status line: rates since the previous sample and current gauges.
pub fn status_line(prev: &Totals, cur: &Totals, secs: f64, affinities: usize) -> String {
    let rate = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / secs.max(1e-9);
    format!(
        "rx {:.3} Mpps  tx {:.3} Mpps  drop {:.0}/s  new conn {:.0}/s  syn {:.0}/s  flows {}  affinities {}  aff hits {}",
        rate(prev.rx_packets, cur.rx_packets) / 1e6,
        rate(prev.tx_packets, cur.tx_packets) / 1e6,
        rate(prev.total_drops(), cur.total_drops()),
        rate(prev.new_connections, cur.new_connections),
        rate(prev.syns, cur.syns),
        cur.flows_active,
        affinities,
        cur.affinity_hits,
    )
}

/// One backend in the summary.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackendSummary {
    pub name: String,
    pub address: String,
    pub weight: u32,
    /// This backend's share of the service's total weight.
    pub weight_share: f64,
    pub connections: u64,
    /// This backend's share of the service's new connections.
    pub connection_share: f64,
    pub packets: u64,
    pub bytes: u64,
    pub active_connections: i64,
    /// Requested affinities it holds (those its quota counts). Absent in
    /// older servers' JSON.
    #[serde(default)]
    pub affinities: u64,
    /// Requested affinities it may hold: its service's
    /// `max_affinities_per_backend` or the default share.
    #[serde(default)]
    pub affinity_quota: u64,
    /// "up", "draining" or "down".
    #[serde(default)]
    pub state: String,
    /// Seconds since the backend entered `state` (0 where the figures
    /// come from the snapshot alone).
    #[serde(default)]
    pub state_for_secs: u64,
    /// Why its last health check failed, while it is failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_error: Option<String>,
}

/// One service in the summary.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServiceSummary {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    pub packets: u64,
    pub new_connections: u64,
    pub affinity_hits: u64,
    pub affinity_misses: u64,
    pub auto_affinity_hits: u64,
    /// Every backend that would take new connections fails its health
    /// checks, and they take them all the same (`all_unhealthy =
    /// "spread"`). Absent in older servers' JSON.
    #[serde(default)]
    pub all_unhealthy: bool,
    pub backends: Vec<BackendSummary>,
}

/// One port's device counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortSummary {
    pub name: String,
    pub ipackets: u64,
    pub opackets: u64,
    pub ibytes: u64,
    pub obytes: u64,
    /// Dropped by the device: receive queue full.
    pub imissed: u64,
    pub ierrors: u64,
    pub oerrors: u64,
    /// Receive failures for want of an mbuf.
    pub rx_nombuf: u64,
    /// The link was down at the last reading (the counters are the last
    /// ones read while it was up; see `report::portstats`). Absent in older
    /// servers' JSON.
    #[serde(default)]
    pub link_down: bool,
}

/// One worker's own counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct WorkerSummary {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub dropped: u64,
    pub passed: u64,
    pub active_flows: u64,
    /// Share of wall time spent in loop iterations that received packets.
    pub busy: f64,
    /// Time spent in loop iterations that received packets, since start.
    #[serde(default)]
    pub busy_seconds: f64,
}

/// What the workers did with ICMP, and with packets too long for their
/// port once forwarded.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IcmpSummary {
    /// Errors forwarded to the backend of the connection they quote.
    pub forwarded: u64,
    /// Echo requests answered.
    pub echo_answered: u64,
    /// "Fragmentation needed" / "packet too big" sent to clients.
    pub too_big_sent: u64,
    /// ICMP messages to a VIP dropped, by reason (all of the `icmp` drops).
    pub dropped: BTreeMap<String, u64>,
    /// IPv4 packets forwarded in fragments, and the fragments sent.
    pub fragmented: u64,
    pub fragments: u64,
}

impl IcmpSummary {
    /// Sums the workers' counters.
    pub fn collect(workers: &[Arc<WorkerCounters>]) -> IcmpSummary {
        let sum = |f: fn(&WorkerCounters) -> u64| workers.iter().map(|w| f(w)).sum::<u64>();
        IcmpSummary {
            forwarded: sum(|w| w.icmp_forwarded.get()),
            echo_answered: sum(|w| w.icmp_echo_answered.get()),
            too_big_sent: sum(|w| w.icmp_too_big_sent.get()),
            dropped: IcmpDrop::ALL
                .iter()
                .map(|r| {
                    let n = workers
                        .iter()
                        .map(|w| w.icmp_drops[*r as usize].get())
                        .sum();
                    (r.name().to_string(), n)
                })
                .collect(),
            fragmented: sum(|w| w.fragmented.get()),
            fragments: sum(|w| w.fragments.get()),
        }
    }
}

/// The summary of a run: printed and written as JSON at its end, and the
/// statistics document `pktdist stats` fetches while it runs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub seconds: f64,
    pub workers: usize,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub drops: BTreeMap<String, u64>,
    pub syns: u64,
    pub new_connections: u64,
    pub unknown_flows: u64,
    /// Flow-table inserts refused (see `flow::Untracked`; expected to stay
    /// 0): packets routed without an entry. Absent in older servers' JSON.
    #[serde(default)]
    pub untracked_flows: u64,
    /// SYNs forwarded without a flow entry by the SYN flood guard
    /// (`datapath::syn_guard`), among `syns`. Absent in older servers' JSON.
    #[serde(default)]
    pub syns_untracked: u64,
    /// Workers whose SYN flood guard is engaged. Absent in older servers'
    /// JSON.
    #[serde(default)]
    pub syn_guard_workers: u64,
    pub affinity_hits: u64,
    pub affinity_misses: u64,
    pub auto_affinity_hits: u64,
    pub active_flows: u64,
    /// Flows that left the workers' tables, by why. Absent in older
    /// servers' JSON.
    #[serde(default)]
    pub flows_ended: FlowsEnded,
    pub affinities: usize,
    /// How many affinities the table holds at most (`[affinity] capacity`).
    /// Absent in older servers' JSON.
    #[serde(default)]
    pub affinity_capacity: usize,
    /// Clients pinned by automatic affinity, and new clients left unpinned
    /// because the table had no room (filled by the control thread).
    pub auto_affinity_pins: usize,
    pub auto_affinity_table_full: u64,
    /// Received packets per second over the run, all workers, in millions.
    pub mpps: f64,
    /// Received packets per second of time the workers spent on non-empty
    /// bursts, per worker, in millions: what one core sustains when busy.
    pub mpps_per_busy_core: f64,
    pub services: Vec<ServiceSummary>,
    pub workers_detail: Vec<WorkerSummary>,
    /// The ports' device counters (filled by the control thread); empty
    /// without ports.
    pub ports: Vec<PortSummary>,
    /// Per-packet processing time in the workers (ns), over all workers.
    pub packet_latency_ns: Percentiles,
    /// Control request handling time (ns), when a control thread ran.
    pub control_latency_ns: Percentiles,
    /// How long ended affinities lived (ms).
    pub affinity_lifetime_ms: Percentiles,
    /// What a running instance adds: the control thread's figures and the
    /// built-in traffic source's report.
    pub extra: RunExtra,
    /// ICMP forwarded, answered, sent and dropped; fragmentation. Absent
    /// in older servers' JSON.
    #[serde(default)]
    pub icmp: IcmpSummary,
}

/// The parts of a [`Summary`] only a running instance has.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RunExtra {
    /// Filled by the control thread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlSummary>,
    /// Filled when the built-in traffic source ran.
    #[serde(
        rename = "traffic source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub traffic_source: Option<TrafficSummary>,
    /// Filled while some backend is checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSummary>,
    /// Filled in cluster mode (`[cluster]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterSummary>,
}

/// Cluster mode: this instance's view of the shared affinity table.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ClusterSummary {
    /// `[cluster] instance`.
    pub instance: String,
    /// The store answers (a full load installed, not unreachable since).
    pub store_up: bool,
    /// When `store_up` last changed, Unix ms (0: never).
    pub since_unix_ms: u64,
    /// Why the store is unreachable (the last connection's error), while
    /// it is: at start too, before the first load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The newest store revision seen.
    pub revision: i64,
    /// A full load has been installed (the instance reports ready).
    pub loaded: bool,
    /// Full loads installed (the first, then one per reconnection).
    pub loads: u64,
    /// Changes sent to the store, by result: committed, conflict,
    /// retried, not_found, unavailable.
    pub changes: BTreeMap<String, u64>,
    /// Ended affinities whose delete committed here (this instance sent
    /// the notice).
    pub ends_won: u64,
    /// Ended affinities another instance settled first (no notice from
    /// here).
    pub ends_lost: u64,
    /// Ended affinities whose delete has not committed yet.
    pub pending_ends: u64,
    /// Store affinities a static affinity of another backend keeps out.
    pub static_refused: u64,
    /// Store affinities the local table had no room for.
    #[serde(default)]
    pub table_full: u64,
    /// Values under the prefix this build could not read.
    pub unreadable: u64,
    /// From another instance's commit to its install here (ms).
    pub propagation_ms: Percentiles,
}

/// The control thread's figures. The fields are in the JSON's key order
/// (alphabetical).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ControlSummary {
    /// Replies sent.
    pub answered: u64,
    /// Requests the handler answered, by return code.
    pub by_code: BTreeMap<String, u64>,
    /// Affinities ended, by reason.
    pub ended: EndedSummary,
    /// Requests passed to the handler.
    pub handled: u64,
    /// AFFINITY_ENDED notifications sent.
    pub notifications: u64,
    /// Datagrams received, accepted or not.
    pub received: u64,
    /// Datagrams refused, by reason.
    pub refused: BTreeMap<String, u64>,
    /// Replies or notifications the socket refused.
    pub send_errors: u64,
    /// Dataplane snapshots published after the first.
    pub snapshots: u64,
    /// Backends' affinity creates refused by their service's limits, by
    /// limit (`min_prefix`, `quota`, `overlap`). Absent in older servers'
    /// JSON.
    #[serde(default)]
    pub limited: BTreeMap<String, u64>,
    /// Requests answered RATE_LIMITED, per sender name (every name with a
    /// key). Absent in older servers' JSON.
    #[serde(default)]
    pub rate_limited: BTreeMap<String, u64>,
    /// Writes of `[affinity] state_file` that completed.
    pub state_file_writes: u64,
    /// Writes of `[affinity] state_file` that failed (each logged).
    pub state_file_write_failures: u64,
}

impl ControlSummary {
    /// What the affinity limits and request rates refused, as one line
    /// (without its `limits:` label): `None` while they refused nothing.
    pub fn limits(&self) -> Option<String> {
        let limited: u64 = self.limited.values().sum();
        let rate_limited: u64 = self.rate_limited.values().sum();
        if limited == 0 && rate_limited == 0 {
            return None;
        }
        let list = |m: &BTreeMap<String, u64>| {
            m.iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut line = format!("{limited} affinity creates refused");
        if limited > 0 {
            line += &format!(" ({})", list(&self.limited));
        }
        line += &format!(", {rate_limited} requests rate limited");
        if rate_limited > 0 {
            line += &format!(" ({})", list(&self.rate_limited));
        }
        Some(line)
    }
}

/// Flows that left the workers' flow tables, by why (the fields in the
/// JSON's key order).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct FlowsEnded {
    /// Ended by a new SYN on the tuple of a flow closing after a FIN or of
    /// a down backend's flow, or because their backend was removed.
    pub closed: u64,
    /// Live flows a full bucket gave up for a new one (the least recently
    /// seen of their bucket): a table too small for its flows.
    pub evicted: u64,
    /// Idle past their state's timeout (a closed connection's included,
    /// after `fin_timeout`).
    pub expired: u64,
}

impl FlowsEnded {
    /// (reason, count) for every reason, in the JSON's key order.
    pub fn as_array(&self) -> [(&'static str, u64); 3] {
        [
            ("closed", self.closed),
            ("evicted", self.evicted),
            ("expired", self.expired),
        ]
    }
}

/// Affinities ended, by reason (the fields in the JSON's key order).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct EndedSummary {
    pub backend_down: u64,
    pub backend_removed: u64,
    pub cancelled: u64,
    pub expired: u64,
}

impl EndedSummary {
    /// (reason, count) for every reason, in the JSON's key order.
    pub fn as_array(&self) -> [(&'static str, u64); 4] {
        [
            ("backend_down", self.backend_down),
            ("backend_removed", self.backend_removed),
            ("cancelled", self.cancelled),
            ("expired", self.expired),
        ]
    }
}

/// What the built-in traffic source did (the fields in the JSON's key
/// order).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TrafficSummary {
    /// Bursts a full queue did not take whole (the workers were saturated).
    pub bursts_refused_by_full_queue: u64,
    /// Forwarded packets seen at the sink, by "service/backend" ("other"
    /// for destinations no backend has).
    pub delivered_to_backends: BTreeMap<String, u64>,
    pub no_mbuf: u64,
    /// Packets sent per second over the time the source generated them
    /// (its stop's drain, up to 2 s, not counted), in millions.
    pub offered_mpps: f64,
    pub sent: u64,
}

/// Where the per-service and per-backend figures of each id start. The
/// workers' counters per id are cumulative, and an id is given to a new
/// service or backend once every id was used; the newcomer's figures count
/// from the values its id had when it got it, so it does not report its
/// predecessor's totals. (A worker still on the previous snapshot for a
/// moment may count a few more packets of the predecessor into the id.)
#[derive(Clone, Debug, Default)]
pub struct CounterBase {
    services: HashMap<ServiceId, [u64; 5]>,
    backends: HashMap<BackendId, [u64; 3]>,
}

impl CounterBase {
    /// Notes the ids that `next` gives to a service or backend that `prev`
    /// did not have under that id: they start at their values now.
    pub fn update(&mut self, prev: &Dataplane, next: &Dataplane, workers: &[Arc<WorkerCounters>]) {
        for s in &next.services {
            if !next.keeps_service(prev, s.id) {
                self.services.insert(s.id, service_counts(workers, s.id));
            }
        }
        for b in next.backends.iter().flatten() {
            let kept = prev.backend(b.id).is_some_and(|p| {
                (p.name.as_str(), p.addr, p.service) == (b.name.as_str(), b.addr, b.service)
                    && next.keeps_service(prev, b.service)
            });
            if !kept {
                self.backends.insert(b.id, backend_counts(workers, b.id));
            }
        }
    }

    /// A service id's packets, new connections, affinity hits and misses
    /// and auto-affinity hits since its service got it.
    fn service(&self, workers: &[Arc<WorkerCounters>], id: ServiceId) -> [u64; 5] {
        since(service_counts(workers, id), self.services.get(&id))
    }

    /// A backend id's connections, packets and bytes since its backend got
    /// it.
    fn backend(&self, workers: &[Arc<WorkerCounters>], id: BackendId) -> [u64; 3] {
        since(backend_counts(workers, id), self.backends.get(&id))
    }
}

fn since<const N: usize>(now: [u64; N], start: Option<&[u64; N]>) -> [u64; N] {
    match start {
        Some(s) => std::array::from_fn(|i| now[i].wrapping_sub(s[i])),
        None => now,
    }
}

/// `each` of every worker, summed.
fn summed<const N: usize>(
    workers: &[Arc<WorkerCounters>],
    each: impl Fn(&WorkerCounters) -> [u64; N],
) -> [u64; N] {
    workers.iter().fold([0; N], |mut v, w| {
        for (a, b) in v.iter_mut().zip(each(w)) {
            *a += b;
        }
        v
    })
}

/// A service id's cumulative counters, summed over the workers.
fn service_counts(workers: &[Arc<WorkerCounters>], id: ServiceId) -> [u64; 5] {
    summed(workers, |w| {
        let c = &w.services[id as usize];
        [
            c.packets.get(),
            c.new_connections.get(),
            c.affinity_hits.get(),
            c.affinity_misses.get(),
            c.auto_affinity_hits.get(),
        ]
    })
}

/// A backend id's cumulative counters (connections, packets, bytes),
/// summed over the workers.
fn backend_counts(workers: &[Arc<WorkerCounters>], id: BackendId) -> [u64; 3] {
    summed(workers, |w| {
        let c = &w.backends[id as usize];
        [c.connections.get(), c.packets.get(), c.bytes.get()]
    })
}

impl Summary {
    /// Builds the summary from the workers' counters, each service's and
    /// backend's figures counted from where `base` says its id started.
    pub fn collect(
        workers: &[std::sync::Arc<WorkerCounters>],
        dp: &Dataplane,
        seconds: f64,
        affinities: usize,
        base: &CounterBase,
    ) -> Summary {
        let t = Totals::collect(workers);
        let services = dp
            .services
            .iter()
            .map(|s| {
                let total_weight: u64 = s
                    .backends
                    .iter()
                    .filter_map(|&b| dp.backend(b))
                    .map(|b| b.weight as u64)
                    .sum();
                let counts: Vec<[u64; 3]> = s
                    .backends
                    .iter()
                    .map(|&b| base.backend(workers, b))
                    .collect();
                let total_conns: u64 = counts.iter().map(|c| c[0]).sum();
                let backends = s
                    .backends
                    .iter()
                    .zip(&counts)
                    .filter_map(|(&b, &[c, packets, bytes])| {
                        let be = dp.backend(b)?;
                        let active: i64 = workers
                            .iter()
                            .map(|w| w.backends[b as usize].active.get() as i64)
                            .sum();
                        Some(BackendSummary {
                            name: be.name.clone(),
                            address: be.addr.to_string(),
                            weight: be.weight,
                            weight_share: share(be.weight as u64, total_weight),
                            connections: c,
                            connection_share: share(c, total_conns),
                            packets,
                            bytes,
                            active_connections: active,
                            // The control plane's to fill in.
                            affinities: 0,
                            affinity_quota: 0,
                            state: be.state.name().to_string(),
                            state_for_secs: 0,
                            check_error: None,
                        })
                    })
                    .collect();
                let [packets, new_connections, affinity_hits, affinity_misses, auto_affinity_hits] =
                    base.service(workers, s.id);
                ServiceSummary {
                    name: s.name.clone(),
                    vip: s.vip.to_string(),
                    port: s.port,
                    protocol: if s.proto == crate::types::PROTO_TCP {
                        "tcp"
                    } else {
                        "udp"
                    }
                    .to_string(),
                    packets,
                    new_connections,
                    affinity_hits,
                    affinity_misses,
                    auto_affinity_hits,
                    all_unhealthy: s.all_unhealthy,
                    backends,
                }
            })
            .collect();
        let busy_s = t.busy_ns as f64 / 1e9;
        let mut packets = new_histogram();
        for w in workers {
            let _ = packets.add(w.latency.snapshot());
        }
        Summary {
            seconds,
            workers: workers.len(),
            rx_packets: t.rx_packets,
            tx_packets: t.tx_packets,
            rx_bytes: t.rx_bytes,
            tx_bytes: t.tx_bytes,
            drops: DropReason::ALL
                .iter()
                .map(|r| (r.name().to_string(), t.drops[*r as usize]))
                .collect(),
            syns: t.syns,
            new_connections: t.new_connections,
            unknown_flows: t.unknown_flows,
            untracked_flows: t.untracked_flows,
            syns_untracked: t.syns_untracked,
            syn_guard_workers: t.syn_guard_workers,
            affinity_hits: t.affinity_hits,
            affinity_misses: t.affinity_misses,
            auto_affinity_hits: t.auto_affinity_hits,
            active_flows: t.flows_active,
            flows_ended: t.flows_ended,
            affinities,
            affinity_capacity: 0,
            auto_affinity_pins: 0,
            auto_affinity_table_full: 0,
            mpps: if seconds > 0.0 {
                t.rx_packets as f64 / seconds / 1e6
            } else {
                0.0
            },
            mpps_per_busy_core: if busy_s > 0.0 {
                t.rx_packets as f64 / busy_s / 1e6
            } else {
                0.0
            },
            services,
            workers_detail: workers
                .iter()
                .map(|w| WorkerSummary {
                    rx_packets: w.rx_packets.get(),
                    tx_packets: w.tx_packets.get(),
                    dropped: w.total_drops(),
                    passed: w.passed.get(),
                    active_flows: w.flows_active.get(),
                    busy: if seconds > 0.0 {
                        w.busy_ns.get() as f64 / 1e9 / seconds
                    } else {
                        0.0
                    },
                    busy_seconds: w.busy_ns.get() as f64 / 1e9,
                })
                .collect(),
            ports: Vec::new(),
            packet_latency_ns: Percentiles::of(&packets),
            control_latency_ns: Percentiles::default(),
            affinity_lifetime_ms: Percentiles::default(),
            extra: RunExtra::default(),
            icmp: IcmpSummary::collect(workers),
        }
    }

    /// The figures over `seconds` instead of the interval they were
    /// collected over (a run counts from its workers' start, the control
    /// plane's clock from before its own set-up): the rate and each
    /// worker's busy share follow.
    pub fn set_seconds(&mut self, seconds: f64) {
        let (rate, share) = if seconds > 0.0 {
            (
                self.rx_packets as f64 / seconds / 1e6,
                self.seconds / seconds,
            )
        } else {
            (0.0, 0.0)
        };
        self.mpps = rate;
        for w in &mut self.workers_detail {
            w.busy *= share;
        }
        self.seconds = seconds;
    }

    /// The summary as text for a terminal.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "pktdist summary: {:.1} s, {} worker(s)\n  packets  in {}  out {}  dropped {}   ({:.3} Mpps in; {:.2} Mpps per busy worker core)",
            self.seconds,
            self.workers,
            self.rx_packets,
            self.tx_packets,
            self.drops.values().sum::<u64>(),
            self.mpps,
            self.mpps_per_busy_core
        );
        let drops: Vec<String> = self
            .drops
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(
            o,
            "  drops    {}",
            if drops.is_empty() {
                "none".to_string()
            } else {
                drops.join(", ")
            }
        );
        let _ = writeln!(
            o,
            "  TCP SYNs {}{}  new connections {}  unknown flows routed statelessly {}  active flows {} (ended: {} expired, {} closed, {} evicted){}",
            self.syns,
            if self.syns_untracked > 0 || self.syn_guard_workers > 0 {
                format!(
                    " ({} untracked by the SYN flood guard, engaged on {} worker(s))",
                    self.syns_untracked, self.syn_guard_workers
                )
            } else {
                String::new()
            },
            self.new_connections,
            self.unknown_flows,
            self.active_flows,
            self.flows_ended.expired,
            self.flows_ended.closed,
            self.flows_ended.evicted,
            if self.untracked_flows > 0 {
                format!("  packets routed without a flow entry {}", self.untracked_flows)
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            o,
            "  affinity hits {}  misses {}  auto-affinity hits {}  affinities installed {}  auto-affinity pins {}{}",
            self.affinity_hits,
            self.affinity_misses,
            self.auto_affinity_hits,
            self.affinities,
            self.auto_affinity_pins,
            if self.auto_affinity_table_full > 0 {
                format!(" (table full {} times)", self.auto_affinity_table_full)
            } else {
                String::new()
            }
        );
        let i = &self.icmp;
        let icmp_dropped: Vec<String> = i
            .dropped
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(
            o,
            "  icmp     errors forwarded {}  echo answered {}  too-big sent {}  dropped {}{}",
            i.forwarded,
            i.echo_answered,
            i.too_big_sent,
            if icmp_dropped.is_empty() {
                "none".to_string()
            } else {
                icmp_dropped.join(", ")
            },
            if i.fragmented > 0 {
                format!(
                    "  fragmented {} packets into {} fragments",
                    i.fragmented, i.fragments
                )
            } else {
                String::new()
            }
        );
        for s in &self.services {
            let _ = writeln!(
                o,
                "  service {} {}:{}/{}: {} packets, {} new connections, {} affinity hits{}",
                s.name,
                s.vip,
                s.port,
                s.protocol,
                s.packets,
                s.new_connections,
                s.affinity_hits,
                if s.all_unhealthy {
                    " (every backend fails its health checks: all take new connections)"
                } else {
                    ""
                }
            );
            let _ = writeln!(
                o,
                "    {:<12} {:<16} {:>6} {:>7} {:>11} {:>7} {:>12}  state",
                "backend", "address", "weight", "w-share", "connections", "c-share", "packets"
            );
            for b in &s.backends {
                let _ = writeln!(
                    o,
                    "    {:<12} {:<16} {:>6} {:>6.1}% {:>11} {:>6.1}% {:>12}  {}",
                    b.name,
                    b.address,
                    b.weight,
                    b.weight_share * 100.0,
                    b.connections,
                    b.connection_share * 100.0,
                    b.packets,
                    b.state
                );
            }
        }
        let lat = |name: &str, p: &Percentiles, unit: &str, o: &mut String| {
            if p.count > 0 {
                let _ = writeln!(
                    o,
                    "  {name}: p50 {} p90 {} p99 {} p99.9 {} max {} {unit} ({} samples)",
                    p.p50, p.p90, p.p99, p.p999, p.max, p.count
                );
            }
        };
        lat("packet latency", &self.packet_latency_ns, "ns", &mut o);
        lat(
            "control request latency",
            &self.control_latency_ns,
            "ns",
            &mut o,
        );
        lat(
            "affinity lifetime",
            &self.affinity_lifetime_ms,
            "ms",
            &mut o,
        );
        for p in &self.ports {
            let _ = writeln!(
                o,
                "  port {}: rx {} tx {} missed {} errors {}/{} no-mbuf {}{}",
                p.name,
                p.ipackets,
                p.opackets,
                p.imissed,
                p.ierrors,
                p.oerrors,
                p.rx_nombuf,
                if p.link_down { "  (link down)" } else { "" }
            );
        }
        if let Some(c) = &self.extra.control {
            let _ = writeln!(
                o,
                "  control: {} datagrams received, {} replies sent, {} refused ({} without a reply, {} answered with an error), {} ended notifications sent; affinities ended: {} expired, {} cancelled, {} backend removed, {} backend down",
                c.received,
                c.answered,
                c.refused.values().sum::<u64>(),
                c.refused.iter().filter(|(k, _)| !ANSWERED_REFUSALS.contains(&k.as_str())).map(|(_, n)| n).sum::<u64>(),
                c.refused.iter().filter(|(k, _)| ANSWERED_REFUSALS.contains(&k.as_str())).map(|(_, n)| n).sum::<u64>(),
                c.notifications,
                c.ended.expired,
                c.ended.cancelled,
                c.ended.backend_removed,
                c.ended.backend_down,
            );
            if let Some(limits) = c.limits() {
                let _ = writeln!(o, "  limits: {limits}");
            }
        }
        if let Some(c) = &self.extra.cluster {
            let _ = writeln!(
                o,
                "  cluster: instance {}, store {}{}, revision {}, {} load(s); changes {}; ends {} won, {} lost, {} pending; propagation p50 {} ms, p99 {} ms",
                c.instance,
                if c.store_up { "up" } else { "down" },
                if c.loaded { "" } else { " (not loaded yet: not ready)" },
                c.revision,
                c.loads,
                c.changes
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                c.ends_won,
                c.ends_lost,
                c.pending_ends,
                c.propagation_ms.p50,
                c.propagation_ms.p99,
            );
        }
        if let Some(h) = &self.extra.health {
            let down: Vec<String> = h
                .backends
                .iter()
                .filter(|b| b.state != "up")
                .map(|b| format!("{}/{}", b.service, b.backend))
                .collect();
            let checks: u64 = h.backends.iter().map(|b| b.checks).sum();
            let failed: u64 = h.backends.iter().map(|b| b.failed).sum();
            let changes: u64 = h.backends.iter().map(|b| b.changes).sum();
            let _ = writeln!(
                o,
                "  health checks: {} backend(s) checked, {} down{}; {checks} checks, {failed} failed, {changes} state change(s)",
                h.backends.len(),
                down.len(),
                if down.is_empty() { String::new() } else { format!(" ({})", down.join(", ")) },
            );
        }
        if let Some(t) = &self.extra.traffic_source {
            let delivered: Vec<String> = t
                .delivered_to_backends
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(
                o,
                "  traffic source: sent {} ({:.3} Mpps); received back from the workers per backend: {}",
                t.sent,
                t.offered_mpps,
                delivered.join(", "),
            );
        }
        o
    }
}

/// The refusals the control server answers (INVALID, UNSUPPORTED,
/// NOT_AUTHORIZED and RATE_LIMITED: the request was authentic); it sends
/// nothing back for the others (docs/PROTOCOL.md §3.5, §8).
const ANSWERED_REFUSALS: [&str; 4] = [
    "invalid_body",
    "unsupported_type",
    "owner_mismatch",
    "rate_limited",
];

fn share(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        part as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::snapshot::{Backend, ForwardMode, SchedulerKind, Service};
    use crate::sched::maglev::MaglevTable;
    use crate::types::{Family, PROTO_TCP};
    use std::sync::Arc;
    use std::time::Duration;

    fn dp() -> Dataplane {
        let backends: Vec<Backend> = (0..2)
            .map(|i| Backend {
                id: i,
                service: 0,
                name: format!("be{i}"),
                addr: std::net::Ipv4Addr::new(10, 0, 0, i as u8 + 1).into(),
                addr_bits: 0x0a00_0001 + i as u128,
                mac: None,
                weight: 100 * (i + 1),
                state: crate::types::BackendState::Up,
            })
            .collect();
        let svc = Service {
            id: 0,
            name: "web".into(),
            vip: std::net::Ipv4Addr::new(192, 0, 2, 1).into(),
            vip_bits: 0xc000_0201,
            family: Family::V4,
            port: 80,
            proto: PROTO_TCP,
            mode: ForwardMode::L2,
            scheduler: SchedulerKind::Maglev,
            hash: crate::datapath::snapshot::HashKind::Connection,
            backends: vec![0, 1],
            maglev: Arc::new(MaglevTable::new(&[("be0", 100), ("be1", 200)], 65537).unwrap()),
            auto_affinity: None,
            max_affinity: Duration::from_secs(60),
            limits: Default::default(),
            affinity_grace: Duration::from_secs(30),
            all_down: false,
            all_unhealthy: false,
        };
        Dataplane::new(1, vec![svc], backends)
    }

    /// A run's summary over its own seconds: the rate and the workers'
    /// busy shares follow the interval, not the one collected over.
    #[test]
    fn a_summary_over_other_seconds_recomputes_its_rates() {
        let w = vec![Arc::new(WorkerCounters::default())];
        w[0].rx_packets.add(12_000_000);
        w[0].busy_ns.add(6_000_000_000);
        let mut s = Summary::collect(&w, &dp(), 12.0, 0, &CounterBase::default());
        assert!((s.mpps - 1.0).abs() < 1e-9);
        assert!((s.workers_detail[0].busy - 0.5).abs() < 1e-9);
        s.set_seconds(10.0);
        assert_eq!(s.seconds, 10.0);
        assert!((s.mpps - 1.2).abs() < 1e-9, "{}", s.mpps);
        assert!((s.workers_detail[0].busy - 0.6).abs() < 1e-9);
        assert!(
            (s.mpps_per_busy_core - 2.0).abs() < 1e-9,
            "busy time is not an interval"
        );
    }

    /// A reused service id and a reused backend id report their new owner's
    /// figures only; kept ones carry on, and the totals stay cumulative.
    #[test]
    fn reused_ids_count_from_when_their_owner_got_them() {
        let w = vec![Arc::new(WorkerCounters::default())];
        let count = |svc: u64, conns: u64| {
            w[0].services[0].new_connections.add(svc);
            w[0].backends[1].connections.add(conns);
            w[0].backends[1].packets.add(10 * conns);
        };
        let first = dp();
        let mut base = CounterBase::default();
        count(30, 7);
        // The same services and backends again: nothing starts over.
        let again = dp();
        base.update(&first, &again, &w);
        count(3, 1);
        let s = Summary::collect(&w, &again, 1.0, 0, &base);
        assert_eq!(s.services[0].new_connections, 33);
        assert_eq!(
            (
                s.services[0].backends[1].connections,
                s.services[0].backends[1].packets
            ),
            (8, 80)
        );
        // Service id 0 and backend id 1 go to newcomers.
        let mut next = dp();
        next.services[0].name = "mail".into();
        let mut reused = next.backends[1].clone().unwrap();
        reused.name = "be9".into();
        let services = next.services.clone();
        let backends = vec![next.backends[0].clone().unwrap(), reused];
        let next = Dataplane::new(2, services, backends);
        w[0].backends[0].connections.add(5);
        base.update(&again, &next, &w);
        count(2, 4);
        let s = Summary::collect(&w, &next, 1.0, 0, &base);
        assert_eq!(s.services[0].name, "mail");
        assert_eq!(s.services[0].new_connections, 2);
        let be9 = &s.services[0].backends[1];
        assert_eq!(
            (be9.name.as_str(), be9.connections, be9.packets),
            ("be9", 4, 40)
        );
        // Backend 0 belongs to a new service now: it starts over too.
        assert_eq!(s.services[0].backends[0].connections, 0);
        // The totals are the workers' own, cumulative.
        assert_eq!(s.new_connections, 35);
    }

    #[test]
    fn summary_adds_up_over_workers() {
        let w: Vec<Arc<WorkerCounters>> = (0..2)
            .map(|_| Arc::new(WorkerCounters::default()))
            .collect();
        for (i, c) in w.iter().enumerate() {
            c.rx_packets.add(100);
            c.tx_packets.add(90);
            c.count_drop(DropReason::NoService);
            c.drops[DropReason::Malformed as usize].add(9);
            c.backends[0].connections.add(10 + i as u64);
            c.backends[1].connections.add(20);
            c.services[0].new_connections.add(30 + i as u64);
            c.busy_ns.add(1_000_000);
            c.flows_expired.add(3);
            c.flows_closed.add(2);
            c.flows_evicted.add(1 + i as u64);
        }
        let s = Summary::collect(&w, &dp(), 2.0, 3, &CounterBase::default());
        assert_eq!(s.rx_packets, 200);
        assert_eq!(s.tx_packets + s.drops.values().sum::<u64>(), s.rx_packets);
        assert_eq!(s.drops["no_service"], 2);
        let b = &s.services[0].backends;
        assert_eq!(b[0].connections, 21);
        assert!((b[1].weight_share - 2.0 / 3.0).abs() < 1e-9);
        assert!((b[0].connection_share - 21.0 / 61.0).abs() < 1e-9);
        assert!((s.mpps - 100.0 / 1e6).abs() < 1e-12);
        assert!((s.mpps_per_busy_core - 200.0 / 0.002 / 1e6).abs() < 1e-9);
        let text = s.render();
        assert!(text.contains("be1"), "{text}");
        assert!(text.contains("icmp     errors forwarded 0"), "{text}");
        assert!(
            text.contains("(ended: 6 expired, 4 closed, 3 evicted)"),
            "{text}"
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["services"][0]["backends"][1]["connections"], 40);
        assert_eq!(json["flows_ended"]["evicted"], 3);
        let metrics = crate::report::metrics::render(&s);
        assert!(
            metrics.contains("pktdist_flows_ended_total{reason=\"evicted\"} 3\n"),
            "{metrics}"
        );
    }

    /// The control thread's and the traffic source's parts: under `extra`,
    /// as `control` and `traffic source`, read back the same, and in words
    /// in the text.
    #[test]
    fn run_extras_keep_their_json_keys_and_words() {
        let w = vec![Arc::new(WorkerCounters::default())];
        let mut s = Summary::collect(&w, &dp(), 1.0, 0, &CounterBase::default());
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["extra"], serde_json::json!({}), "absent parts absent");
        assert!(!s.render().contains("control:"));
        s.extra.control = Some(ControlSummary {
            received: 7,
            answered: 5,
            refused: [("bad_hmac".to_string(), 2)].into(),
            by_code: [("OK".to_string(), 4), ("CONFLICT".to_string(), 1)].into(),
            notifications: 1,
            ended: EndedSummary {
                expired: 3,
                cancelled: 1,
                backend_down: 0,
                backend_removed: 0,
            },
            ..ControlSummary::default()
        });
        s.extra.traffic_source = Some(TrafficSummary {
            sent: 2_000_000,
            offered_mpps: 1.0,
            delivered_to_backends: [("web/be0".to_string(), 9)].into(),
            ..TrafficSummary::default()
        });
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["extra"]["control"]["refused"]["bad_hmac"], 2);
        assert_eq!(json["extra"]["control"]["by_code"]["CONFLICT"], 1);
        assert_eq!(json["extra"]["control"]["ended"]["expired"], 3);
        assert_eq!(json["extra"]["control"]["handled"], 0);
        assert_eq!(
            json["extra"]["traffic source"]["delivered_to_backends"]["web/be0"],
            9
        );
        let back: Summary = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
        let text = s.render();
        assert!(
            text.contains("  control: 7 datagrams received, 5 replies sent, 2 refused (2 without a reply, 0 answered with an error), 1 ended notifications sent; affinities ended: 3 expired, 1 cancelled, 0 backend removed, 0 backend down\n"),
            "{text}"
        );
        assert!(
            text.contains("  traffic source: sent 2000000 (1.000 Mpps); received back from the workers per backend: web/be0 9\n"),
            "{text}"
        );
        assert!(!text.contains("limits:"), "none refused: {text}");
        if let Some(c) = s.extra.control.as_mut() {
            c.limited = [("min_prefix".to_string(), 1), ("quota".to_string(), 2)].into();
            c.rate_limited = [("be1".to_string(), 5), ("be2".to_string(), 0)].into();
        }
        let text = s.render();
        assert!(
            text.contains("  limits: 3 affinity creates refused (min_prefix 1, quota 2), 5 requests rate limited (be1 5)\n"),
            "{text}"
        );
        let back: Summary = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    /// The control line says what its figures count: datagrams received,
    /// replies sent, and refusals split into unanswered and answered ones.
    #[test]
    fn control_line_names_what_it_counts() {
        let w = vec![Arc::new(WorkerCounters::default())];
        let mut s = Summary::collect(&w, &dp(), 1.0, 0, &CounterBase::default());
        s.extra.control = Some(ControlSummary {
            received: 20,
            answered: 12,
            notifications: 3,
            refused: [
                ("bad_hmac".to_string(), 4),
                ("replay".to_string(), 2),
                ("invalid_body".to_string(), 1),
                ("owner_mismatch".to_string(), 1),
                ("oversize".to_string(), 0),
            ]
            .into(),
            ended: EndedSummary {
                expired: 2,
                cancelled: 1,
                backend_down: 0,
                backend_removed: 0,
            },
            ..ControlSummary::default()
        });
        let text = s.render();
        assert!(
            text.contains(
                "  control: 20 datagrams received, 12 replies sent, 8 refused (6 without a reply, 2 answered with an error), 3 ended notifications sent; affinities ended: 2 expired, 1 cancelled, 0 backend removed, 0 backend down\n"
            ),
            "{text}"
        );
    }

    /// The answered refusals are reasons the server counts.
    #[test]
    fn answered_refusals_are_server_reasons() {
        let reasons = crate::control::counters::RefusalCounters::default().as_array();
        for r in ANSWERED_REFUSALS {
            assert!(reasons.iter().any(|(name, _)| *name == r), "{r}");
        }
    }

    #[test]
    fn icmp_figures_add_up_over_workers() {
        let w: Vec<Arc<WorkerCounters>> = (0..2)
            .map(|_| Arc::new(WorkerCounters::default()))
            .collect();
        for (i, c) in w.iter().enumerate() {
            c.icmp_forwarded.add(3 + i as u64);
            c.icmp_echo_answered.add(1);
            c.icmp_too_big_sent.add(2);
            c.icmp_drops[IcmpDrop::QuoteNotVip as usize].add(4);
            c.count_drop(DropReason::Icmp);
            c.fragmented.add(1);
            c.fragments.add(2);
        }
        let s = Summary::collect(&w, &dp(), 1.0, 0, &CounterBase::default());
        assert_eq!(
            (s.icmp.forwarded, s.icmp.echo_answered, s.icmp.too_big_sent),
            (7, 2, 4)
        );
        assert_eq!(s.icmp.dropped["quote_not_vip"], 8);
        assert_eq!(s.icmp.dropped["bad_checksum"], 0);
        assert_eq!(s.icmp.dropped.len(), IcmpDrop::COUNT);
        assert_eq!((s.icmp.fragmented, s.icmp.fragments), (2, 4));
        let text = s.render();
        assert!(
            text.contains("errors forwarded 7  echo answered 2  too-big sent 4  dropped quote_not_vip 8  fragmented 2 packets into 4 fragments"),
            "{text}"
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["icmp"]["dropped"]["quote_not_vip"], 8);
        assert_eq!(json["drops"]["icmp"], 2);
        // A summary without the section (an older server's) still reads.
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("icmp");
        let back: Summary = serde_json::from_value(old).unwrap();
        assert_eq!(back.icmp, IcmpSummary::default());
    }

    #[test]
    fn status_line_reports_rates() {
        let a = Totals::default();
        let b = Totals {
            rx_packets: 2_000_000,
            tx_packets: 1_000_000,
            ..Totals::default()
        };
        let line = status_line(&a, &b, 2.0, 5);
        assert!(line.starts_with("rx 1.000 Mpps  tx 0.500 Mpps"), "{line}");
        assert!(line.contains("affinities 5"));
    }
}
