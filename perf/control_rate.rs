//! Control-plane rate: the real [`ControlThread`] (its server, plane and
//! affinity manager) on 127.0.0.1, answering a client thread that keeps a
//! window of signed affinity creates and extends in flight, each with a
//! fresh nonce and timestamp.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pktdist::config::Config;
use pktdist::control::thread::{ControlSetup, ControlThread};
use pktdist::dpdk::spawn_worker;
use pktdist::protocol::auth::{unix_ms, Key};
use pktdist::protocol::message::{
    encode_request, AffinityKey, AffinityOp, Envelope, Header, Reply, Request, ReturnCode,
    ServiceAddr, MAX_DATAGRAM,
};

use crate::feeder::Rng;

/// Backends of the benchmark service, which are also the request senders.
pub const BACKENDS: usize = 8;

/// The benchmark's configuration: one TCP service in ipip mode with
/// [`BACKENDS`] backends `be1`..`be8`.
pub fn config_toml() -> String {
    let mut s = String::from(
        r#"
[eal]
args = ["--no-huge"]
[cores]
control = 0
workers = [1]
[[ports]]
name = "in"
device = "net_ring0"
gateway_mac = "02:00:00:00:00:fe"
[control]
listen = "127.0.0.1:0"
allowed_networks = ["127.0.0.0/8"]
# The benchmark measures what the control thread answers, not the senders'
# rate limit: a limit far above the rate (its cost is still paid).
max_requests_per_second = 10000000
[[services]]
name = "web"
vip = "192.0.2.10"
port = 80
protocol = "tcp"
forwarding = "ipip"
ipip_source = "198.51.100.1"
"#,
    );
    for i in 1..=BACKENDS {
        s.push_str(&format!(
            "[[services.backends]]\nname = \"be{i}\"\naddress = \"10.200.0.{i}\"\nweight = {}\n",
            100 * (1 + i % 3)
        ));
    }
    s.push_str("[control.keys]\n");
    for i in 0..BACKENDS {
        let hex: String = key_bytes(i).iter().map(|b| format!("{b:02x}")).collect();
        s.push_str(&format!("be{} = \"{hex}\"\n", i + 1));
    }
    s
}

pub fn config() -> Result<Config, String> {
    Config::parse(&config_toml(), "bench.toml").map_err(|e| e.to_string())
}

/// Backend `be{i+1}`'s key.
fn key_bytes(i: usize) -> [u8; 32] {
    [i as u8 + 1; 32]
}

fn key_of(i: usize) -> Key {
    Key::new(&key_bytes(i)).expect("32-byte key")
}

/// What one control-rate run measured.
#[derive(Clone, Debug, Default)]
pub struct ControlStats {
    pub replies: u64,
    pub ok: u64,
    pub other_codes: u64,
    pub lost: u64,
    pub seconds: f64,
    pub creates: u64,
    pub extends: u64,
    pub window: usize,
    pub affinities_at_end: usize,
}

impl ControlStats {
    pub fn rate(&self) -> f64 {
        self.replies as f64 / self.seconds.max(1e-9)
    }
}

/// Runs the server on `server_core` and the client on `client_core` for
/// `seconds`, `window` requests in flight.
pub fn run(
    seconds: f64,
    window: usize,
    server_core: usize,
    client_core: usize,
) -> Result<ControlStats, String> {
    let cfg = config()?;
    let control = ControlThread::new(
        &cfg,
        ControlSetup {
            config_path: None,
            workers: Vec::new(),
            port_stats: None,
            port_upkeep: None,
            status: None,
            discard_bad_state: false,
            store: None,
        },
    )?;
    let addr = control.local_addr().map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));

    let flag = Arc::clone(&stop);
    let server_thread = spawn_worker(server_core, "bench-ctl-server", move || {
        let mut control = control;
        control.serve_until(&flag, &AtomicBool::new(false), None);
        control.plane().affinities().len()
    })
    .map_err(|e| format!("server thread: {e}"))?;

    let client = spawn_worker(client_core, "bench-ctl-client", move || {
        client_loop(addr, seconds, window)
    })
    .map_err(|e| format!("client thread: {e}"))?;
    let stats = client.join().map_err(|_| "client panicked".to_string())?;
    stop.store(true, Ordering::Relaxed);
    let left = server_thread
        .join()
        .map_err(|_| "server panicked".to_string())?;
    let mut stats = stats?;
    stats.affinities_at_end = left;
    Ok(stats)
}

fn client_loop(server: SocketAddr, seconds: f64, window: usize) -> Result<ControlStats, String> {
    let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let service = ServiceAddr {
        addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
        port: 80,
        proto: 6,
    };
    let keys: Vec<Key> = (0..BACKENDS).map(key_of).collect();
    let names: Vec<String> = (1..=BACKENDS).map(|i| format!("be{i}")).collect();
    let mut rng = Rng::new(unix_ms(SystemTime::now()) ^ 0x5eed);
    let mut nonce = rng.next_u64();
    // Clients created so far, by owner index, for the extends.
    let mut created: Vec<(u32, usize)> = Vec::new();
    let mut st = ControlStats {
        window,
        ..ControlStats::default()
    };
    let mut tx = vec![0u8; MAX_DATAGRAM];
    let mut rx = vec![0u8; MAX_DATAGRAM];
    let mut in_flight = 0usize;
    let mut seq = 0u64;
    let started = Instant::now();
    let mut last_reply = started;
    let deadline = started + Duration::from_secs_f64(seconds);
    loop {
        let sending = Instant::now() < deadline;
        while sending && in_flight < window {
            // Alternate: a create for a new client, an extend of an earlier one.
            let extend = seq % 2 == 1 && !created.is_empty();
            let (client, owner) = if extend {
                created[rng.below(created.len() as u64) as usize]
            } else {
                let c = 0xac10_0000 | (seq as u32 & 0x000f_ffff);
                let o = (seq as usize / 2) % BACKENDS;
                created.push((c, o));
                (c, o)
            };
            let key = AffinityKey::new(service, IpAddr::V4(Ipv4Addr::from(client)), 32)
                .map_err(|e| e.to_string())?;
            let op = AffinityOp {
                key,
                duration_secs: 60,
                owner: None,
                notify: None,
            };
            let req = if extend {
                st.extends += 1;
                Request::AffinityExtend(op)
            } else {
                st.creates += 1;
                Request::AffinityCreate(op)
            };
            nonce = nonce.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let header = Header {
                msg_type: 0,
                request_id: seq as u32,
                timestamp_ms: unix_ms(SystemTime::now()),
                nonce,
                name: &names[owner],
            };
            let n =
                encode_request(&mut tx, &header, &keys[owner], &req).map_err(|e| e.to_string())?;
            sock.send_to(&tx[..n], server).map_err(|e| e.to_string())?;
            in_flight += 1;
            seq += 1;
        }
        if in_flight == 0 {
            break;
        }
        match sock.recv_from(&mut rx) {
            Ok((n, _)) => {
                in_flight -= 1;
                st.replies += 1;
                last_reply = Instant::now();
                let code = Envelope::open(&rx[..n])
                    .ok()
                    .and_then(|e| Reply::decode_body(e.body).ok())
                    .map(|r| r.code);
                if code == Some(ReturnCode::Ok) {
                    st.ok += 1;
                } else {
                    st.other_codes += 1;
                }
            }
            Err(_) => {
                // A request or reply lost (socket buffer): give its slot back.
                st.lost += in_flight as u64;
                in_flight = 0;
                if !sending {
                    break;
                }
            }
        }
    }
    st.seconds = last_reply.duration_since(started).as_secs_f64();
    Ok(st)
}
