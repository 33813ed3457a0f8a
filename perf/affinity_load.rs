//! The affinity side of the benchmark: a table of a million affinities, the
//! control thread's churn on it, and the cost of one lookup.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pktdist::affinity::key::TableKey;

use pktdist::types::PortMatch;

use pktdist::affinity::manager::AffinityManager;

use pktdist::affinity::table::{AffinityReader, AffinityTable};
use pktdist::dpdk::{spawn_worker, tsc, tsc_hz};
use pktdist::types::Family;
use pktdist::types::{BackendId, ServiceId};

use crate::feeder::{Rng, MEASURE, STOP};

/// Clients of every benchmark flow live in this /8 (10.0.0.0/8).
pub const CLIENT_BASE: u32 = 0x0a00_0000;
pub const CLIENT_MASK: u32 = 0x00ff_ffff;

/// A table filled with `n` affinities on `service`: `n24` /24s and the rest
/// /32s, all in [`CLIENT_BASE`]/8, owned round-robin by `owners`.
pub struct Installed {
    pub manager: AffinityManager,
    pub reader: AffinityReader,
    /// The /32 keys, for the churn to remove from.
    pub slash32: Vec<TableKey>,
    pub n24: usize,
    /// Share of the client space the affinities cover.
    pub coverage: f64,
    pub build_secs: f64,
}

pub fn install(
    capacity: usize,
    n: usize,
    n24: usize,
    service: ServiceId,
    owners: &[BackendId],
    seed: u64,
) -> Result<Installed, String> {
    let started = Instant::now();
    let (writer, reader) = AffinityTable::new(capacity);
    let mut manager = AffinityManager::new(writer);
    let mut rng = Rng::new(seed);
    let mut slash24 = std::collections::HashSet::with_capacity(n24);
    let mut i = 0usize;
    while slash24.len() < n24.min(65536) {
        let net = (CLIENT_BASE | (rng.next_u64() as u32 & CLIENT_MASK)) & 0xffff_ff00;
        if slash24.insert(net) {
            let key = TableKey::new(service, Family::V4, net as u128, 24, PortMatch::Any)
                .map_err(|e| e.to_string())?;
            manager
                .create(key, owners[i % owners.len()], None, None, 0)
                .map_err(|e| format!("installing /24 affinity {i}: {e}"))?;
            i += 1;
        }
    }
    let mut slash32 = Vec::with_capacity(n.saturating_sub(n24));
    let mut covered32 = 0usize;
    while manager.len() < n {
        let addr = CLIENT_BASE | (rng.next_u64() as u32 & CLIENT_MASK);
        let key = TableKey::new(service, Family::V4, addr as u128, 32, PortMatch::Any)
            .map_err(|e| e.to_string())?;
        if manager.get(&key).is_some() {
            continue;
        }
        manager
            .create(key, owners[i % owners.len()], None, None, 0)
            .map_err(|e| format!("installing affinity {i}: {e}"))?;
        if !slash24.contains(&(addr & 0xffff_ff00)) {
            covered32 += 1;
        }
        slash32.push(key);
        i += 1;
    }
    let space = f64::from(CLIENT_MASK) + 1.0;
    let coverage = (slash24.len() as f64 * 256.0 + covered32 as f64) / space;
    Ok(Installed {
        manager,
        reader,
        slash32,
        n24: slash24.len(),
        coverage,
        build_secs: started.elapsed().as_secs_f64(),
    })
}

/// What the control thread applied while the phase was [`MEASURE`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ChurnStats {
    pub changes: u64,
    pub refused: u64,
    pub seconds: f64,
}

impl ChurnStats {
    pub fn rate(&self) -> f64 {
        self.changes as f64 / self.seconds.max(1e-9)
    }
}

/// The control thread: `rate` changes per second (a /32 removed, a new /32
/// created, alternately), paced in 1 ms steps, until the phase is [`STOP`].
/// Gives the installed table back with its statistics.
pub fn churn(
    mut inst: Installed,
    rate: u64,
    owners: Vec<BackendId>,
    service: ServiceId,
    phase: Arc<AtomicU8>,
    core: usize,
) -> Result<pktdist::dpdk::WorkerHandle<(Installed, ChurnStats)>, String> {
    spawn_worker(core, "bench-control", move || {
        let mut rng = Rng::new(0xc0417);
        let mut st = ChurnStats::default();
        let started = Instant::now();
        let mut done = 0u64;
        let mut measured_from: Option<(Instant, u64, u64)> = None;
        let mut refused = 0u64;
        loop {
            let ph = phase.load(Ordering::Relaxed);
            if ph >= STOP {
                break;
            }
            if ph == MEASURE && measured_from.is_none() {
                measured_from = Some((Instant::now(), done, refused));
            }
            if ph != MEASURE {
                if let Some((t0, d0, r0)) = measured_from {
                    if st.seconds == 0.0 {
                        st.seconds = t0.elapsed().as_secs_f64();
                        st.changes = done - d0;
                        st.refused = refused - r0;
                    }
                }
            }
            let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            // At most one second's worth at once after a stall.
            let mut budget = (due.saturating_sub(done)).min(rate.max(1));
            while budget > 0 {
                let now_ms = started.elapsed().as_millis() as u64;
                if done % 2 == 0 && !inst.slash32.is_empty() {
                    let i = rng.below(inst.slash32.len() as u64) as usize;
                    let key = inst.slash32.swap_remove(i);
                    if inst.manager.cancel(&key, None, now_ms).is_err() {
                        refused += 1;
                    }
                } else {
                    // A client no affinity names yet (a few tries), so that
                    // every create adds one and the table stays full.
                    let owner = owners[rng.below(owners.len() as u64) as usize];
                    let mut key = None;
                    for _ in 0..8 {
                        let addr = CLIENT_BASE | (rng.next_u64() as u32 & CLIENT_MASK);
                        if let Ok(k) =
                            TableKey::new(service, Family::V4, addr as u128, 32, PortMatch::Any)
                        {
                            if inst.manager.get(&k).is_none() {
                                key = Some(k);
                                break;
                            }
                        }
                    }
                    match key.map(|k| (k, inst.manager.create(k, owner, None, None, now_ms))) {
                        Some((k, Ok(_))) => inst.slash32.push(k),
                        _ => refused += 1,
                    }
                }
                done += 1;
                budget -= 1;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some((t0, d0, r0)) = measured_from {
            if st.seconds == 0.0 {
                st.seconds = t0.elapsed().as_secs_f64();
                st.changes = done - d0;
                st.refused = refused - r0;
            }
        }
        (inst, st)
    })
    .map_err(|e| format!("control thread: {e}"))
}

/// Cost of `AffinityReader::lookup` in a tight loop over random clients of
/// [`CLIENT_BASE`]/8 and random ports.
#[derive(Clone, Copy, Debug, Default)]
pub struct LookupStats {
    pub lookups: u64,
    pub hits: u64,
    pub ns_per_lookup: f64,
}

/// Runs lookups on `core` for `seconds`.
pub fn lookup_loop(
    reader: AffinityReader,
    service: ServiceId,
    seconds: f64,
    core: usize,
) -> Result<LookupStats, String> {
    let h = spawn_worker(core, "bench-lookup", move || {
        let mut rng = Rng::new(0x100c);
        let keys: Vec<(u32, u16)> = (0..1 << 20)
            .map(|_| {
                let r = rng.next_u64();
                (CLIENT_BASE | (r as u32 & CLIENT_MASK), (r >> 32) as u16)
            })
            .collect();
        let hz = tsc_hz() as f64;
        let budget = (seconds * hz) as u64;
        let start = tsc();
        let (mut lookups, mut hits) = (0u64, 0u64);
        'outer: loop {
            for chunk in keys.chunks(4096) {
                for &(addr, port) in chunk {
                    let r = reader.lookup(service, Family::V4, addr as u128, port);
                    hits += u64::from(std::hint::black_box(r).is_some());
                }
                lookups += chunk.len() as u64;
                if tsc().wrapping_sub(start) >= budget {
                    break 'outer;
                }
            }
        }
        let ns = tsc().wrapping_sub(start) as f64 * 1e9 / hz;
        LookupStats {
            lookups,
            hits,
            ns_per_lookup: ns / lookups.max(1) as f64,
        }
    })
    .map_err(|e| format!("lookup thread: {e}"))?;
    h.join().map_err(|_| "lookup thread panicked".to_string())
}
