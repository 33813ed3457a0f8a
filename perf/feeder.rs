//! The traffic feeder: keeps the worker's input ring full with prebuilt
//! 64-byte frames (60 bytes plus the FCS a NIC would add) and drains what
//! the worker forwarded.
//!
//! Per burst it allocates mbufs in bulk, copies a 60-byte template into each
//! and transmits; frames the full ring refuses are kept and offered again,
//! so nothing is lost at the source and a refused burst is the sign that the
//! worker, not the feeder, is the bottleneck.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use pktdist::datapath::pktio::{PacketBuf, PacketIo, MAX_BURST};
use pktdist::dpdk::{tsc, Mbuf, Mempool, PortQueues};
use pktdist::types::tcp_flags;
use pktdist::wire::build::FrameSpec;
use pktdist::wire::checksum;

/// Bytes of every frame (the Ethernet minimum without FCS).
pub const FRAME: usize = 60;

/// Offsets in an untagged IPv4/TCP frame.
const IP_CSUM: usize = 24;
const IP_SRC: usize = 26;
const TCP_SPORT: usize = 34;
const TCP_CSUM: usize = 50;

/// The run's phases, set by the main thread, read by every thread.
pub const WARMUP: u8 = 0;
pub const MEASURE: u8 = 1;
/// The feeder stops transmitting; the worker empties its input ring.
pub const DRAIN: u8 = 2;
/// The worker (and the control thread) stop.
pub const STOP: u8 = 3;
/// The feeder takes back what the worker left in the output ring and stops.
pub const STOP_FEEDER: u8 = 4;

/// A frame for `src:sport -> vip:80` with TCP `flags`.
pub fn tcp_frame(src: u32, sport: u16, vip: [u8; 4], flags: u8, dst_mac: [u8; 6]) -> Vec<u8> {
    let mut spec = FrameSpec::tcp_v4(src.to_be_bytes(), sport, vip, 80, flags);
    spec.dst_mac = dst_mac;
    spec.src_mac = [0x02, 0, 0, 0, 0xee, 0x01];
    let mut f = spec.build().expect("a plain TCP/IPv4 frame always builds");
    f.resize(FRAME, 0);
    f
}

/// xorshift64*: a fast, good-enough generator for addresses and shuffles.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() >> 32) * n) >> 32
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// Where the feeder's frames come from.
pub enum Source {
    /// `warm` frames once, then `frames` round and round (established
    /// flows: their SYNs, then ACKs over all of them).
    Templates {
        warm: Arc<Vec<u8>>,
        frames: Arc<Vec<u8>>,
        next: usize,
        warm_left: usize,
    },
    /// A SYN from a new random source (address under `base`/`mask`, random
    /// port) in every frame: every packet is a new connection.
    RandomSyn {
        template: [u8; FRAME],
        rng: Rng,
        base: u32,
        mask: u32,
    },
}

impl Source {
    /// Established flows: `warm` (SYNs) first, then `frames` (ACKs) cyclically.
    pub fn templates(warm: Arc<Vec<u8>>, frames: Arc<Vec<u8>>) -> Source {
        let warm_left = warm.len() / FRAME;
        Source::Templates {
            warm,
            frames,
            next: 0,
            warm_left,
        }
    }

    /// SYNs from random sources in `base/mask` to `vip:80`.
    pub fn random_syn(vip: [u8; 4], dst_mac: [u8; 6], base: u32, mask: u32, seed: u64) -> Source {
        let f = tcp_frame(base, 1024, vip, tcp_flags::SYN, dst_mac);
        let mut template = [0u8; FRAME];
        template.copy_from_slice(&f);
        Source::RandomSyn {
            template,
            rng: Rng::new(seed),
            base,
            mask,
        }
    }

    /// Frames of the warm-up set not sent yet.
    pub fn warm_left(&self) -> usize {
        match self {
            Source::Templates { warm_left, .. } => *warm_left,
            Source::RandomSyn { .. } => 0,
        }
    }

    /// Writes the next frame into `out`.
    #[inline]
    pub fn fill(&mut self, out: &mut [u8]) {
        match self {
            Source::Templates {
                warm,
                frames,
                next,
                warm_left,
            } => {
                if *warm_left > 0 {
                    let i = warm.len() / FRAME - *warm_left;
                    out.copy_from_slice(&warm[i * FRAME..(i + 1) * FRAME]);
                    *warm_left -= 1;
                    return;
                }
                out.copy_from_slice(&frames[*next * FRAME..(*next + 1) * FRAME]);
                *next += 1;
                if *next * FRAME >= frames.len() {
                    *next = 0;
                }
            }
            Source::RandomSyn {
                template,
                rng,
                base,
                mask,
            } => {
                out.copy_from_slice(template);
                let r = rng.next_u64();
                let src = *base | (r as u32 & *mask);
                let sport = ((r >> 32) as u16) | 1024;
                let old_src = *base;
                let old_sport = 1024u16;
                let ip_csum = u16::from_be_bytes([out[IP_CSUM], out[IP_CSUM + 1]]);
                let ip_csum = checksum::update32(ip_csum, old_src, src);
                let tcp_csum = u16::from_be_bytes([out[TCP_CSUM], out[TCP_CSUM + 1]]);
                let tcp_csum = checksum::update32(tcp_csum, old_src, src);
                let tcp_csum = checksum::update16(tcp_csum, old_sport, sport);
                out[IP_SRC..IP_SRC + 4].copy_from_slice(&src.to_be_bytes());
                out[TCP_SPORT..TCP_SPORT + 2].copy_from_slice(&sport.to_be_bytes());
                out[IP_CSUM..IP_CSUM + 2].copy_from_slice(&ip_csum.to_be_bytes());
                out[TCP_CSUM..TCP_CSUM + 2].copy_from_slice(&tcp_csum.to_be_bytes());
            }
        }
    }
}

/// What the feeder did while the phase was [`MEASURE`].
#[derive(Clone, Copy, Debug, Default)]
pub struct FeederStats {
    /// Frames the input ring accepted.
    pub sent: u64,
    /// Transmit attempts, and those the full ring did not take whole.
    pub bursts: u64,
    pub bursts_full: u64,
    /// Bulk allocations the pool could not serve.
    pub no_mbuf: u64,
    /// Forwarded frames drained from the output port.
    pub drained: u64,
    pub cycles: u64,
    /// Share of the measurement the feeder thread was on a CPU.
    pub on_cpu: f64,
}

/// Nanoseconds the calling thread has run on a CPU (`/proc/thread-self/schedstat`).
pub fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Measures the share of wall time the calling thread spends on a CPU
/// between `start` and `stop`.
#[derive(Default)]
pub struct OnCpu {
    at: Option<(std::time::Instant, u64)>,
}

impl OnCpu {
    pub fn start(&mut self) {
        self.at = thread_cpu_ns().map(|ns| (std::time::Instant::now(), ns));
    }

    pub fn stop(&self) -> f64 {
        match (self.at, thread_cpu_ns()) {
            (Some((t0, c0)), Some(c1)) => {
                (c1.saturating_sub(c0)) as f64 / (t0.elapsed().as_nanos().max(1)) as f64
            }
            _ => f64::NAN,
        }
    }
}

impl FeederStats {
    /// Share of transmit attempts that found the input ring full.
    pub fn full_share(&self) -> f64 {
        self.bursts_full as f64 / (self.bursts.max(1)) as f64
    }
}

/// Progress the main thread watches during warm-up.
#[derive(Default)]
pub struct Progress {
    /// Frames accepted since the start (all phases).
    pub sent: AtomicU64,
    /// Set once the warm-up frames are all sent.
    pub warm_sent: AtomicBool,
}

/// The feeder's loop. `io` port 0 transmits into the worker's input, port 1
/// receives the worker's output.
pub fn run(
    mut io: PortQueues,
    pool: Arc<Mempool>,
    mut source: Source,
    phase: &AtomicU8,
    progress: &Progress,
) -> FeederStats {
    let mut st = FeederStats::default();
    let mut pending: Vec<Mbuf> = Vec::with_capacity(MAX_BURST);
    let mut drain: Vec<Mbuf> = Vec::with_capacity(MAX_BURST);
    let mut total_sent = 0u64;
    let mut start = 0u64;
    let mut measuring = false;
    let mut on_cpu = OnCpu::default();
    loop {
        let ph = phase.load(Ordering::Relaxed);
        if ph >= STOP_FEEDER {
            break;
        }
        if ph == MEASURE && !measuring {
            measuring = true;
            on_cpu.start();
            start = tsc();
        } else if ph != MEASURE && measuring {
            measuring = false;
            st.cycles = tsc().wrapping_sub(start);
            st.on_cpu = on_cpu.stop();
        }
        if ph <= MEASURE {
            if pending.is_empty() {
                if Mbuf::alloc_bulk(&pool, &mut pending, MAX_BURST) {
                    for m in pending.iter_mut() {
                        m.resize(FRAME);
                        source.fill(m.data_mut());
                    }
                } else if measuring {
                    st.no_mbuf += 1;
                }
            }
            if !pending.is_empty() {
                let before = pending.len();
                io.tx_burst(0, &mut pending);
                let sent = (before - pending.len()) as u64;
                total_sent += sent;
                if measuring {
                    st.sent += sent;
                    st.bursts += 1;
                    if !pending.is_empty() {
                        st.bursts_full += 1;
                    }
                }
                progress.sent.store(total_sent, Ordering::Relaxed);
                if source.warm_left() == 0 {
                    progress.warm_sent.store(true, Ordering::Relaxed);
                }
            }
        }
        io.rx_burst(1, &mut drain);
        if measuring {
            st.drained += drain.len() as u64;
        }
        drain.clear();
    }
    // The worker has stopped: take back whatever it left in the output ring.
    loop {
        io.rx_burst(1, &mut drain);
        if drain.is_empty() {
            break;
        }
        drain.clear();
    }
    st
}
