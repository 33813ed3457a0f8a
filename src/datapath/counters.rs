//! Counters: why packets were dropped, and what each worker did.
//!
//! Every worker owns one [`WorkerCounters`] and is its only writer: a counter
//! update is a relaxed load and store of the worker's own cache lines, never a
//! locked read-modify-write and never a write to memory another core writes.
//! The control thread reads them (relaxed) and sums over workers.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::datapath::latency::SharedHistogram;
use crate::types::{BackendId, DropReason, IcmpDrop, ServiceId, MAX_BACKENDS, MAX_SERVICES};

const _: () = assert!(MAX_SERVICES.is_power_of_two() && MAX_BACKENDS.is_power_of_two());

/// A counter with a single writer.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning worker may call this: it is a plain load and
    /// store, not an atomic read-modify-write.
    #[inline(always)]
    pub fn add(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(n), Ordering::Relaxed);
    }
    #[inline(always)]
    pub fn inc(&self) {
        self.add(1)
    }
    /// Subtracts `n` (gauges such as active connections).
    #[inline(always)]
    pub fn sub(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_sub(n), Ordering::Relaxed);
    }
    /// Sets the value (gauges such as table occupancy).
    #[inline(always)]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Per-backend counters of one worker.
#[derive(Default, Debug)]
pub struct BackendCounters {
    pub packets: Counter,
    pub bytes: Counter,
    /// New connections sent to this backend.
    pub connections: Counter,
    /// Connections in this worker's flow table (a gauge; wraps if read
    /// mid-update, so readers sum as i64).
    pub active: Counter,
}

/// Per-service counters of one worker.
#[derive(Default, Debug)]
pub struct ServiceCounters {
    pub packets: Counter,
    pub new_connections: Counter,
    pub affinity_hits: Counter,
    pub affinity_misses: Counter,
    pub auto_affinity_hits: Counter,
}

/// Everything one worker counts. Aligned so two workers never share a line.
#[repr(align(128))]
#[derive(Debug)]
pub struct WorkerCounters {
    pub rx_packets: Counter,
    pub rx_bytes: Counter,
    pub tx_packets: Counter,
    pub tx_bytes: Counter,
    /// Packets not for a service passed unchanged to an `unmatched_to` port.
    pub passed: Counter,
    /// Poll iterations and the ones that received something.
    pub polls: Counter,
    pub busy_polls: Counter,
    pub drops: [Counter; DropReason::COUNT],
    /// TCP SYN packets (without ACK) for a service, every one: those that
    /// open a connection and those repeated on a flow already open. The
    /// connections opened are `ServiceCounters::new_connections`.
    pub syns: Counter,
    /// SYNs forwarded without a flow entry while the SYN flood guard was
    /// engaged (module `syn_guard`), among `syns`.
    pub syns_untracked: Counter,
    /// 1 while the worker's SYN flood guard is engaged, else 0 (a gauge).
    pub syn_guard_engaged: Counter,
    /// TCP packets other than a SYN of a flow the table did not know (after
    /// a restart, an eviction, or an RSS change): the flow is picked anew
    /// and tracked from then on; a reset is routed without an entry.
    pub unknown_flows: Counter,
    /// Flows whose backend vanished (or is down, for a SYN on them) and
    /// were rerouted.
    pub rerouted: Counter,
    pub flows_active: Counter,
    pub flows_evicted: Counter,
    pub flows_expired: Counter,
    pub flows_closed: Counter,
    /// Flow-table inserts refused (see `flow::Untracked`): packets routed
    /// without an entry.
    pub flows_untracked: Counter,
    /// ICMP errors forwarded to the backend of the connection they quote.
    pub icmp_forwarded: Counter,
    /// Echo requests to a VIP answered.
    pub icmp_echo_answered: Counter,
    /// "Fragmentation needed" / "packet too big" sent for packets too long
    /// for their port once forwarded.
    pub icmp_too_big_sent: Counter,
    /// ICMP messages to a VIP dropped, by reason (each also one
    /// `drops[DropReason::Icmp]`).
    pub icmp_drops: [Counter; IcmpDrop::COUNT],
    /// IPv4 packets forwarded in fragments, and the fragments they made.
    pub fragmented: Counter,
    pub fragments: Counter,
    /// Nanoseconds spent in loop iterations that received packets.
    pub busy_ns: Counter,
    /// Per-packet processing time (ns): each such iteration's, from the TSC, over its packets.
    pub latency: SharedHistogram,
    /// By service id, [`MAX_SERVICES`] of them.
    pub services: Box<[ServiceCounters; MAX_SERVICES]>,
    /// By backend id, [`MAX_BACKENDS`] of them.
    pub backends: Box<[BackendCounters; MAX_BACKENDS]>,
}

impl Default for WorkerCounters {
    fn default() -> Self {
        WorkerCounters {
            rx_packets: Counter::default(),
            rx_bytes: Counter::default(),
            tx_packets: Counter::default(),
            tx_bytes: Counter::default(),
            passed: Counter::default(),
            polls: Counter::default(),
            busy_polls: Counter::default(),
            drops: Default::default(),
            syns: Counter::default(),
            syns_untracked: Counter::default(),
            syn_guard_engaged: Counter::default(),
            unknown_flows: Counter::default(),
            rerouted: Counter::default(),
            flows_active: Counter::default(),
            flows_evicted: Counter::default(),
            flows_expired: Counter::default(),
            flows_closed: Counter::default(),
            flows_untracked: Counter::default(),
            icmp_forwarded: Counter::default(),
            icmp_echo_answered: Counter::default(),
            icmp_too_big_sent: Counter::default(),
            icmp_drops: Default::default(),
            fragmented: Counter::default(),
            fragments: Counter::default(),
            busy_ns: Counter::default(),
            latency: SharedHistogram::default(),
            services: array_of(ServiceCounters::default),
            backends: array_of(BackendCounters::default),
        }
    }
}

/// A boxed array of `N` values made by `f`, built on the heap (the
/// backends' counters are too many for a stack).
fn array_of<T, const N: usize>(f: impl FnMut() -> T) -> Box<[T; N]> {
    let all: Box<[T]> = std::iter::repeat_with(f).take(N).collect();
    match all.try_into() {
        Ok(a) => a,
        Err(_) => unreachable!("took exactly {N}"),
    }
}

impl WorkerCounters {
    #[inline(always)]
    pub fn count_drop(&self, reason: DropReason) {
        self.drops[reason as usize].inc();
    }

    /// The counters of service `id`. Ids are below [`MAX_SERVICES`] (the
    /// registry hands out no other), a power of two: the index is masked
    /// rather than checked.
    #[inline(always)]
    pub fn service(&self, id: ServiceId) -> &ServiceCounters {
        debug_assert!(usize::from(id) < MAX_SERVICES);
        &self.services[usize::from(id) % MAX_SERVICES]
    }

    /// The counters of backend `id`, below [`MAX_BACKENDS`] (a power of
    /// two, masked as [`WorkerCounters::service`]).
    #[inline(always)]
    pub fn backend(&self, id: BackendId) -> &BackendCounters {
        debug_assert!((id as usize) < MAX_BACKENDS);
        &self.backends[id as usize % MAX_BACKENDS]
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().map(Counter::get).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_add_sub_set() {
        let c = Counter::default();
        c.add(5);
        c.inc();
        c.sub(2);
        assert_eq!(c.get(), 4);
        c.set(10);
        assert_eq!(c.get(), 10);
    }

    #[test]
    fn drop_reasons_are_indexed_in_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        let w = WorkerCounters::default();
        w.count_drop(DropReason::TxFull);
        w.count_drop(DropReason::NoService);
        assert_eq!(w.total_drops(), 2);
        assert_eq!(w.drops[DropReason::TxFull as usize].get(), 1);
        for (i, r) in IcmpDrop::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        assert_eq!(w.icmp_drops.len(), IcmpDrop::ALL.len());
    }
}
