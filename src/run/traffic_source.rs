//! The traffic source's thread: the built-in load for the demo and the
//! benchmarks. It writes connections from [`super::trafficgen`] into mbufs,
//! transmits each on the traffic port's queue (one per worker) that a NIC's
//! RSS would give its flow ([`super::rss`]), and drains what the workers
//! forwarded, counting it per backend.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::datapath::counters::WorkerCounters;
use crate::datapath::pktio::{PacketBuf, PacketIo, MAX_BURST};
use crate::datapath::snapshot::{Dataplane, ForwardMode};
use crate::dpdk::{Mbuf, Mempool, PortQueues, DEFAULT_DATA_ROOM, HEADROOM};
use crate::report::summary::TrafficSummary;
use crate::wire::{ethernet, ipv4, ipv6};

use super::trafficgen::TrafficGen;

// The largest frame the configuration lets the source write fits one
// buffer of the pool it allocates from.
const _: () = assert!(
    crate::config::MAX_TRAFFIC_PACKET as usize - 4
        <= DEFAULT_DATA_ROOM as usize - HEADROOM as usize
);

/// Bursts the sink drains from one queue per turn at most.
const SINK_BURSTS: usize = 32;
/// Frames in flight per queue at most: less than the 1024 slots of a
/// `net_ring` queue, the sink's.
const WINDOW: u64 = 960;
/// A full window with nothing back for this long has lost its frames.
const WRITE_OFF: Duration = Duration::from_millis(100);
/// When stopping, the sink drains until nothing arrived for this long...
const STOP_QUIET: Duration = Duration::from_millis(50);
/// ...or this long has passed (a worker that stopped forwarding).
const STOP_DRAIN_MAX: Duration = Duration::from_secs(2);

/// The built-in traffic source's thread: writes connections into mbufs,
/// transmits them to the workers, and drains (and counts, per backend) what
/// the workers forwarded.
pub(super) struct TrafficSource {
    pub(super) gen: TrafficGen,
    pub(super) pool: Arc<Mempool>,
    /// Port index w = worker w's receive queue.
    pub(super) tx: PortQueues,
    /// Port index w = worker w's transmit queue on the forwarding port.
    pub(super) rx: PortQueues,
    /// Worker w's counters: frames it dropped never come back.
    pub(super) workers: Vec<Arc<WorkerCounters>>,
    pub(super) rate_pps: u64,
}

/// What the traffic source did.
#[derive(Debug, Default)]
pub(super) struct TrafficReport {
    sent: u64,
    /// Bursts a full queue did not take whole (the workers were saturated).
    queue_full: u64,
    no_mbuf: u64,
    /// Forwarded packets seen at the sink, by outer destination (ipip) or
    /// destination MAC (l2).
    delivered: BTreeMap<Destination, u64>,
    /// Seconds it generated frames (its stop's drain not counted).
    seconds: f64,
}

impl TrafficReport {
    /// The report as the summary shows it, the sink's destinations named
    /// by the backends of `dp` that have them.
    pub(super) fn summary(&self, dp: &Dataplane) -> TrafficSummary {
        let mut by_backend: BTreeMap<String, u64> = BTreeMap::new();
        for (dst, n) in &self.delivered {
            let owner = dp.backends.iter().flatten().find(|b| {
                match dp.service(b.service).map(|s| s.mode) {
                    Some(ForwardMode::IpIp { .. }) => *dst == Destination::Ip(b.addr),
                    Some(ForwardMode::L2) => b.mac.is_some_and(|m| *dst == Destination::Mac(m)),
                    None => false,
                }
            });
            let name = owner.map_or_else(
                || "other".to_string(),
                |b| {
                    format!(
                        "{}/{}",
                        dp.service(b.service).map_or("?", |s| s.name.as_str()),
                        b.name
                    )
                },
            );
            *by_backend.entry(name).or_insert(0) += n;
        }
        TrafficSummary {
            bursts_refused_by_full_queue: self.queue_full,
            delivered_to_backends: by_backend,
            no_mbuf: self.no_mbuf,
            offered_mpps: self.sent as f64 / self.seconds.max(1e-9) / 1e6,
            sent: self.sent,
        }
    }
}

/// Where the sink saw a forwarded frame go: the outer IP destination of
/// an encapsulated frame (the family apart: `::10.0.0.1` is not
/// 10.0.0.1), the destination MAC of any other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Destination {
    Ip(IpAddr),
    Mac([u8; 6]),
}

impl TrafficSource {
    pub(super) fn run(mut self, stop: &AtomicBool) -> TrafficReport {
        let started = Instant::now();
        let mut report = TrafficReport::default();
        let mut fresh: Vec<Mbuf> = Vec::with_capacity(MAX_BURST);
        let room = usize::from(DEFAULT_DATA_ROOM) - usize::from(HEADROOM);
        let queues = self.tx.num_ports();
        // Frames written but not yet taken by their queue, per queue.
        let mut pending: Vec<Vec<Mbuf>> = (0..queues)
            .map(|_| Vec::with_capacity(2 * MAX_BURST))
            .collect();
        let mut generated: u64 = 0;
        let mut window = Window::new(queues);
        while !stop.load(Ordering::Relaxed) {
            // A burst of new frames, each on the queue RSS gives its flow,
            // while no queue has a burst's worth waiting and every queue's
            // window has room for a burst: a flow's frames stay in order on
            // one queue, and neither a saturated worker nor a sink thread
            // that was descheduled makes a queue lose frames.
            let mut burst = MAX_BURST;
            if self.rate_pps > 0 {
                let allowed = (started.elapsed().as_secs_f64() * self.rate_pps as f64) as u64;
                burst = burst.min(allowed.saturating_sub(generated) as usize);
            }
            if burst > 0
                && pending.iter().all(|p| p.len() < MAX_BURST)
                && window.open(Instant::now(), &self.workers)
            {
                if Mbuf::alloc_bulk(&self.pool, &mut fresh, burst) {
                    for mut m in fresh.drain(..) {
                        // A frame that does not fit its buffer (never with
                        // a valid `packet_size`) is not sent: the buffer
                        // goes back to the pool as it drops.
                        if !m.resize(room) {
                            continue;
                        }
                        let (n, key) = self.gen.next_frame_keyed(m.data_mut());
                        if n == 0 {
                            continue;
                        }
                        m.resize(n.max(60));
                        pending[super::rss::queue_of(&key, queues)].push(m);
                        generated += 1;
                    }
                } else {
                    report.no_mbuf += 1;
                }
            }
            self.send_and_drain(&mut pending, &mut window, &mut report);
            if self.rate_pps > 0 {
                std::thread::yield_now();
            }
        }
        // Stopping: the frames still waiting go out, and the sink drains
        // until the workers have forwarded everything (nothing arrived for
        // STOP_QUIET), so that what was sent is counted back.
        let stopping = Instant::now();
        // The offered rate is over the time it generated: what the drain
        // sends below was generated before.
        report.seconds = stopping.duration_since(started).as_secs_f64();
        let mut heard = stopping;
        while stopping.elapsed() < STOP_DRAIN_MAX
            && (pending.iter().any(|p| !p.is_empty()) || heard.elapsed() < STOP_QUIET)
        {
            if self.send_and_drain(&mut pending, &mut window, &mut report) > 0 {
                heard = Instant::now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        report
    }

    /// One turn over the queues: transmits what waits in `pending`, and
    /// drains the sink, up to a queue's worth (net_ring: 1024) per queue so
    /// that it keeps up after the thread was descheduled. Returns the
    /// frames the sink received.
    fn send_and_drain(
        &mut self,
        pending: &mut [Vec<Mbuf>],
        window: &mut Window,
        report: &mut TrafficReport,
    ) -> usize {
        let mut received = 0;
        let mut bufs: Vec<Mbuf> = Vec::with_capacity(MAX_BURST);
        for (q, pending) in pending.iter_mut().enumerate() {
            if !pending.is_empty() {
                let offered = pending.len() as u64;
                self.tx.tx_burst(q, pending);
                let sent = offered - pending.len() as u64;
                report.sent += sent;
                window.sent(q, sent);
                if sent < offered {
                    report.queue_full += 1;
                }
            }
            for _ in 0..SINK_BURSTS {
                self.rx.rx_burst(q, &mut bufs);
                if bufs.is_empty() {
                    break;
                }
                received += bufs.len();
                window.returned(q, bufs.len() as u64);
                for m in bufs.drain(..) {
                    if let Some(dst) = outer_destination(m.data()) {
                        *report.delivered.entry(dst).or_insert(0) += 1;
                    }
                }
            }
        }
        received
    }
}

/// Frames in flight per queue: sent to a worker and not yet back at the
/// sink. Each worker forwards what it receives on queue q of the traffic
/// port out of queue q of the sink port, so the sink's queue q never holds
/// more than the window, whatever the scheduler does to the sink's thread.
struct Window {
    in_flight: Vec<u64>,
    /// Frames sent on each queue since the start.
    sent_total: Vec<u64>,
    /// When a frame last came back on each queue.
    last_return: Vec<Instant>,
    /// Each worker's drops when last counted.
    drops_seen: Vec<u64>,
}

impl Window {
    fn new(queues: usize) -> Window {
        Window {
            in_flight: vec![0; queues],
            sent_total: vec![0; queues],
            last_return: vec![Instant::now(); queues],
            drops_seen: vec![0; queues],
        }
    }

    /// Whether every queue has room for a burst more. A full queue's
    /// window first gives back the frames its worker dropped since the
    /// last count (`workers[q]`, when given); frames of a window still full
    /// that brought nothing back for [`WRITE_OFF`], once its worker has
    /// received every frame sent to it, went elsewhere (an ICMP answer, a
    /// port's `unmatched_to`) and are written off. Until then they wait in
    /// the worker's queue (a worker descheduled), and sending more would
    /// overfill the sink when it catches up.
    fn open(&mut self, now: Instant, workers: &[Arc<WorkerCounters>]) -> bool {
        let mut open = true;
        for q in 0..self.in_flight.len() {
            if self.in_flight[q] + MAX_BURST as u64 <= WINDOW {
                continue;
            }
            if let Some(w) = workers.get(q) {
                let drops = w.total_drops();
                let lost = drops.saturating_sub(self.drops_seen[q]);
                self.drops_seen[q] = drops;
                self.in_flight[q] = self.in_flight[q].saturating_sub(lost);
                if self.in_flight[q] + MAX_BURST as u64 <= WINDOW {
                    continue;
                }
            }
            let queued = workers
                .get(q)
                .is_some_and(|w| w.rx_packets.get() < self.sent_total[q]);
            if now.duration_since(self.last_return[q]) > WRITE_OFF && !queued {
                self.in_flight[q] = 0;
                self.last_return[q] = now;
            } else {
                open = false;
            }
        }
        open
    }

    fn sent(&mut self, queue: usize, n: u64) {
        self.in_flight[queue] += n;
        self.sent_total[queue] += n;
    }

    fn returned(&mut self, queue: usize, n: u64) {
        self.in_flight[queue] = self.in_flight[queue].saturating_sub(n);
        self.last_return[queue] = Instant::now();
    }
}

/// Where a forwarded frame goes (see [`Destination`]).
fn outer_destination(frame: &[u8]) -> Option<Destination> {
    let eth = ethernet::Frame::new_checked(frame).ok()?;
    let info = eth.l2_info().ok()?;
    let l3 = frame.get(info.header_len..)?;
    match info.ethertype {
        ethernet::ETHERTYPE_IPV4 => {
            let ip = ipv4::Packet::new_checked(l3).ok()?;
            if ip.protocol() == ipv4::PROTO_IPIP {
                return Some(Destination::Ip(Ipv4Addr::from(ip.dst_addr()).into()));
            }
        }
        ethernet::ETHERTYPE_IPV6 => {
            let ip = ipv6::Packet::new_checked(l3).ok()?;
            if ip.next_header() == ipv6::PROTO_IPV6 {
                return Some(Destination::Ip(Ipv6Addr::from(ip.dst_addr()).into()));
            }
        }
        _ => {}
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&frame[..6]);
    Some(Destination::Mac(mac))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An encapsulated frame to `dst` (the inner packet's bytes do not
    /// matter here).
    fn tunnelled(dst: IpAddr) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        match dst {
            IpAddr::V4(a) => {
                f[12..14].copy_from_slice(&ethernet::ETHERTYPE_IPV4.to_be_bytes());
                let mut h = [0u8; 40];
                h[0] = 0x45;
                h[2..4].copy_from_slice(&40u16.to_be_bytes());
                h[8] = 64;
                h[9] = ipv4::PROTO_IPIP;
                h[16..20].copy_from_slice(&a.octets());
                f.extend_from_slice(&h);
            }
            IpAddr::V6(a) => {
                f[12..14].copy_from_slice(&ethernet::ETHERTYPE_IPV6.to_be_bytes());
                let mut h = [0u8; 80];
                h[0] = 0x60;
                h[4..6].copy_from_slice(&40u16.to_be_bytes());
                h[6] = ipv6::PROTO_IPV6;
                h[7] = 64;
                h[24..40].copy_from_slice(&a.octets());
                f.extend_from_slice(&h);
            }
        }
        f
    }

    #[test]
    fn destinations_keep_their_family() {
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let compat: IpAddr = "::10.0.0.1".parse().unwrap();
        let d4 = outer_destination(&tunnelled(v4));
        let d6 = outer_destination(&tunnelled(compat));
        assert_eq!(d4, Some(Destination::Ip(v4)));
        assert_eq!(d6, Some(Destination::Ip(compat)));
        assert_ne!(d4, d6);
        let mut plain = tunnelled(v4);
        plain[23] = 6; // TCP, not IP-in-IP: an l2 frame, by its MAC
        plain[..6].copy_from_slice(&[2, 0, 0, 0, 1, 7]);
        assert_eq!(
            outer_destination(&plain),
            Some(Destination::Mac([2, 0, 0, 0, 1, 7]))
        );
    }

    #[test]
    fn window_closes_when_full_and_writes_off_lost_frames() {
        let mut w = Window::new(2);
        let t0 = w.last_return[0];
        assert!(w.open(t0, &[]));
        w.sent(1, WINDOW - MAX_BURST as u64);
        assert!(w.open(t0, &[]), "room for one burst more");
        w.sent(1, 1);
        assert!(!w.open(t0, &[]), "queue 1 full: no new burst for any queue");
        w.returned(1, 40);
        assert!(w.open(Instant::now(), &[]));
        // Full, and nothing back for longer than WRITE_OFF: the workers
        // dropped those frames; the window opens again.
        w.sent(0, WINDOW);
        let later = w.last_return[0] + WRITE_OFF + Duration::from_millis(1);
        assert!(!w.open(w.last_return[0], &[]));
        assert!(w.open(later, &[]));
        assert_eq!(w.in_flight[0], 0);
        w.returned(0, 5);
        assert_eq!(
            w.in_flight[0], 0,
            "returns beyond what is in flight are ignored"
        );
    }

    #[test]
    fn frames_still_in_a_worker_s_queue_are_not_written_off() {
        let workers = [Arc::new(WorkerCounters::default())];
        let mut w = Window::new(1);
        w.sent(0, WINDOW);
        // The worker has taken all but 10: descheduled, it has not lost
        // them, however long nothing comes back.
        workers[0].rx_packets.add(WINDOW - 10);
        let later = w.last_return[0] + 10 * WRITE_OFF;
        assert!(!w.open(later, &workers));
        assert_eq!(w.in_flight[0], WINDOW);
        // It has taken them all and still nothing came back: gone
        // elsewhere, written off.
        workers[0].rx_packets.add(10);
        assert!(w.open(later, &workers));
        assert_eq!(w.in_flight[0], 0);
    }
}
