//! A backend application for pktdist: a small HTTP/1.1 server that answers
//! with its own name and asks the distributor for an affinity for a client
//! once the client has made enough requests.
//!
//! It is the example server of the affinity feature (a Rust server calls one
//! client-library function to pin a client to itself, and receives the ended
//! notification) and the backend of the network-namespace test bed
//! (scripts/testbed.sh, docs/testbed.md).
//!
//! ```text
//! backend_server --name be1 --listen 10.99.100.1:80 --listen 10.99.100.1:8080 \
//!     --control 10.99.0.1:7400 --key 1111...11 \
//!     --affinity-after 1 --affinity-prefix 32 --affinity-duration 30s --decap
//! ```
//!
//! * `GET /bytes/N` answers N bytes of deterministic content (byte i is
//!   [`content_byte`]`(i)`), so a client can check a multi-segment transfer
//!   byte for byte; any other request gets the server's name. Every response
//!   carries an `X-Backend: NAME` header. Connections are kept alive.
//! * `--affinity-after N`: at a client network's N-th request (the client's
//!   address masked to `--affinity-prefix`), the server pins that network to
//!   itself on the service the request came in on (the connection's local
//!   address, i.e. the VIP and port) for `--affinity-duration`, and logs the
//!   reply code. Once per network and run: an affinity that ended (the log
//!   shows the AFFINITY_ENDED notice and its reason) is not requested again,
//!   so an operator's cancel sticks.
//! * `--decap`: where the kernel has no `ipip` driver, decapsulates pktdist's
//!   IP-in-IP packets in user space: a raw socket of protocol 4 receives each
//!   whole outer packet; the inner packet, if it is addressed to a local
//!   address, is handed back to the kernel through a raw `IPPROTO_RAW`
//!   socket (header included), which delivers it through loopback to the
//!   listening socket. Replies go straight to the client (direct server
//!   return).
//! * **Graceful shutdown**, the sequence any backend can copy: with
//!   `--control` and `--key` it declares itself UP when it starts
//!   (BACKEND_STATE), and on SIGTERM (or SIGINT) it declares DRAIN —
//!   pktdist sends it no new connections and refuses it new or extended
//!   affinities (DRAINING), while clients its affinities pin still reach
//!   it — keeps serving, answers each request with `Connection: close`
//!   (kept-alive connections end after their next request, or idle after
//!   a minute), waits until none of its
//!   connections is open (for `--drain-quiet`, at most `--drain-timeout`),
//!   then declares DOWN (its remaining affinities are skipped at once and
//!   end after the service's `affinity_grace`) and exits.

use std::collections::{HashMap, HashSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use pktdist::client::cli::parse_duration;
use pktdist::client::library::{set_backend_state, AffinitySpec, ControlClient};
use pktdist::net::mask_addr;
use pktdist::protocol::auth::parse_hex_key;
use pktdist::protocol::message::{AffinityKey, ReturnCode, ServiceAddr};
use pktdist::types::Declared;

/// Largest `GET /bytes/N` answered.
const MAX_BYTES: u64 = 64 << 20;
/// Longest request head (request line and headers) accepted.
const MAX_HEAD: usize = 16 << 10;
/// Client networks remembered for the affinity rule; beyond it the oldest
/// counts are forgotten, so a flood of sources cannot grow the server.
const MAX_TRACKED: usize = 65536;
/// Idle time after which a kept-alive connection is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Parser, Debug)]
#[command(about = "pktdist example backend: answers with its name, requests affinities")]
struct Args {
    /// This backend's name: the X-Backend header, the body of `GET /`, and
    /// the sender name (and key name) of its control requests.
    #[arg(long)]
    name: String,
    /// TCP address to serve (repeatable): the service VIP and port.
    #[arg(long, default_value = "10.99.100.1:80")]
    listen: Vec<SocketAddr>,
    /// pktdist's control address; without it no affinity is requested.
    #[arg(long)]
    control: Option<SocketAddr>,
    /// This backend's control key, in hex.
    #[arg(long)]
    key: Option<String>,
    /// Request an affinity at a client network's N-th request (0 = never).
    #[arg(long, default_value_t = 0)]
    affinity_after: u64,
    /// Prefix length of the client network pinned (32 = the client alone).
    #[arg(long, default_value_t = 32)]
    affinity_prefix: u8,
    /// How long the affinity lasts.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    affinity_duration: Duration,
    /// Decapsulate IP-in-IP in user space (needs root).
    #[arg(long)]
    decap: bool,
    /// On SIGTERM: exit once no connection was open for this long.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    drain_quiet: Duration,
    /// On SIGTERM: exit after this long even if connections are still
    /// open.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    drain_timeout: Duration,
}

/// Byte `i` of every `GET /bytes/N` body: depends on the position, so a
/// lost, repeated or reordered segment changes the content.
pub fn content_byte(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// Logs one line on stdout, prefixed with the server's name.
fn log(name: &str, msg: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{name}: {msg}");
    let _ = out.flush();
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("backend_server: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    let name: Arc<str> = Arc::from(args.name.as_str());
    if args.affinity_prefix > 32 {
        return Err("--affinity-prefix must be 0..=32 (IPv4)".into());
    }

    // The affinity thread owns the control client: requests and the ended
    // notifications share its socket.
    let affinity = if args.affinity_after > 0 {
        let control = args
            .control
            .ok_or("--affinity-after needs --control ADDR")?;
        let hex = args.key.as_deref().ok_or("--affinity-after needs --key")?;
        let key = parse_hex_key(hex).map_err(|e| format!("--key: {e}"))?;
        let client = ControlClient::new(control, &args.name, &key)
            .map_err(|e| format!("control client: {e}"))?;
        let (tx, rx) = mpsc::channel();
        let n = Arc::clone(&name);
        let (duration, prefix) = (args.affinity_duration, args.affinity_prefix);
        thread::Builder::new()
            .name("affinity".into())
            .spawn(move || affinity_thread(&n, client, rx, duration, prefix))
            .map_err(|e| format!("affinity thread: {e}"))?;
        Some(Rule {
            after: args.affinity_after,
            prefix: args.affinity_prefix,
            counts: Mutex::new(HashMap::new()),
            requests: tx,
        })
    } else {
        None
    };
    let rule = Arc::new(affinity);

    if args.decap {
        let local: Vec<IpAddr> = args.listen.iter().map(|a| a.ip()).collect();
        let decap = Decap::open(local).map_err(|e| format!("--decap raw sockets: {e}"))?;
        let n = Arc::clone(&name);
        thread::Builder::new()
            .name("decap".into())
            .spawn(move || decap.run(&n))
            .map_err(|e| format!("decap thread: {e}"))?;
    }

    let mut listeners = Vec::new();
    for addr in &args.listen {
        let l = TcpListener::bind(addr).map_err(|e| format!("listen {addr}: {e}"))?;
        listeners.push(l);
    }
    log(
        &name,
        &format!(
            "ready: listening on {:?}, decap {}, affinity after {} request(s) for /{} for {:?}",
            args.listen,
            if args.decap { "on" } else { "off" },
            args.affinity_after,
            args.affinity_prefix,
            args.affinity_duration
        ),
    );
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&term))
            .map_err(|e| format!("signal handler: {e}"))?;
    }
    let control = match (args.control, args.key.as_deref()) {
        (Some(addr), Some(hex)) => {
            Some((addr, parse_hex_key(hex).map_err(|e| format!("--key: {e}"))?))
        }
        _ => None,
    };
    let declare = |state: Declared| {
        if let Some((addr, key)) = &control {
            match set_backend_state(*addr, &name, key, state) {
                Ok(r) => log(
                    &name,
                    &format!("BACKEND_STATE {}: OK ({})", state.name(), r.message),
                ),
                Err(e) => log(&name, &format!("BACKEND_STATE {}: {e}", state.name())),
            }
        }
    };
    let conns = Arc::new(Connections::default());
    for l in listeners {
        let n = Arc::clone(&name);
        let rule = Arc::clone(&rule);
        let c = Arc::clone(&conns);
        thread::spawn(move || accept_loop(l, n, rule, c));
    }
    declare(Declared::Up);
    while !term.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(50));
    }

    // Graceful shutdown: drain, let the connections finish, leave.
    log(&name, "SIGTERM: draining");
    declare(Declared::Drain);
    conns.drain();
    let start = Instant::now();
    let mut quiet_since: Option<Instant> = None;
    loop {
        let open = conns.open();
        let now = Instant::now();
        if open == 0 {
            let q = *quiet_since.get_or_insert(now);
            if now.duration_since(q) >= args.drain_quiet {
                break;
            }
        } else {
            quiet_since = None;
        }
        if now.duration_since(start) >= args.drain_timeout {
            log(
                &name,
                &format!("drain timeout: {open} connection(s) still open"),
            );
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    declare(Declared::Down);
    log(
        &name,
        &format!(
            "drained in {:.1}s, {} connection(s) served during the drain; exiting",
            start.elapsed().as_secs_f64(),
            conns.served_draining()
        ),
    );
    Ok(())
}

/// The open connections, counted so that a drain can wait for them.
#[derive(Default)]
struct Connections {
    draining: AtomicBool,
    inner: Mutex<ConnCounts>,
}

#[derive(Default)]
struct ConnCounts {
    open: usize,
    served_draining: u64,
}

impl Connections {
    fn counts(&self) -> std::sync::MutexGuard<'_, ConnCounts> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open_one(&self) {
        let draining = self.is_draining();
        let mut c = self.counts();
        c.open += 1;
        if draining {
            c.served_draining += 1;
        }
    }

    fn close_one(&self) {
        let mut c = self.counts();
        c.open = c.open.saturating_sub(1);
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// From now on every response closes its connection (a kept-alive
    /// connection ends after its next request, or idle after
    /// [`IDLE_TIMEOUT`]).
    fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    fn open(&self) -> usize {
        self.counts().open
    }

    fn served_draining(&self) -> u64 {
        self.counts().served_draining
    }
}

fn accept_loop(
    listener: TcpListener,
    name: Arc<str>,
    rule: Arc<Option<Rule>>,
    conns: Arc<Connections>,
) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let n = Arc::clone(&name);
                let r = Arc::clone(&rule);
                let c = Arc::clone(&conns);
                let spawned = thread::Builder::new().spawn(move || {
                    c.open_one();
                    let result = serve(stream, &n, r.as_ref().as_ref(), &c);
                    c.close_one();
                    if let Err(e) = result {
                        if !matches!(
                            e.kind(),
                            io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe
                        ) {
                            log(&n, &format!("connection from {peer}: {e}"));
                        }
                    }
                });
                if let Err(e) = spawned {
                    log(&name, &format!("cannot serve {peer}: {e}"));
                }
            }
            Err(e) => {
                log(&name, &format!("accept: {e}"));
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// One parsed request head.
struct Head {
    path: String,
    close: bool,
}

/// Reads a request head; None at a clean end of the connection.
fn read_head(r: &mut BufReader<TcpStream>) -> io::Result<Option<Head>> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut line = String::new();
    let mut total = 0usize;
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    total += line.len();
    let mut parts = line.split_ascii_whitespace();
    let (method, path, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(path), Some(version)) = (method, path, version) else {
        return Err(bad("malformed request line"));
    };
    if method != "GET" && method != "HEAD" {
        return Err(bad("only GET and HEAD are served"));
    }
    let mut close = version == "HTTP/1.0";
    let path = path.to_string();
    loop {
        let mut h = String::new();
        let n = r.read_line(&mut h)?;
        total += n;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if total > MAX_HEAD {
            return Err(bad("request head too long"));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("connection") {
                let v = v.trim();
                close = v.eq_ignore_ascii_case("close");
            }
        }
    }
    Ok(Some(Head { path, close }))
}

fn serve(
    stream: TcpStream,
    name: &str,
    rule: Option<&Rule>,
    conns: &Connections,
) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let peer = stream.peer_addr()?;
    let local = stream.local_addr()?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    while let Some(mut head) = read_head(&mut reader)? {
        // While draining, every response is the connection's last.
        head.close |= conns.is_draining();
        if let Some(rule) = rule {
            rule.count(local, peer.ip());
        }
        let len = head
            .path
            .strip_prefix("/bytes/")
            .map(|n| n.parse::<u64>().ok().filter(|n| *n <= MAX_BYTES));
        let conn = if head.close { "close" } else { "keep-alive" };
        match len {
            Some(None) => {
                let body = format!("bad length (0..={MAX_BYTES})\n");
                write!(
                    out,
                    "HTTP/1.1 400 Bad Request\r\nX-Backend: {name}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )?;
                return Ok(());
            }
            Some(Some(n)) => {
                write!(
                    out,
                    "HTTP/1.1 200 OK\r\nX-Backend: {name}\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\nConnection: {conn}\r\n\r\n"
                )?;
                let mut chunk = vec![0u8; 64 << 10];
                let mut sent = 0u64;
                while sent < n {
                    let k = (n - sent).min(chunk.len() as u64) as usize;
                    for (j, b) in chunk[..k].iter_mut().enumerate() {
                        *b = content_byte(sent + j as u64);
                    }
                    out.write_all(&chunk[..k])?;
                    sent += k as u64;
                }
            }
            None => {
                let body = format!("{name}\n");
                write!(
                    out,
                    "HTTP/1.1 200 OK\r\nX-Backend: {name}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n{body}",
                    body.len()
                )?;
            }
        }
        out.flush()?;
        if head.close {
            break;
        }
    }
    Ok(())
}

/// The affinity rule: count requests per (service, client network) and ask
/// for an affinity at the N-th.
struct Rule {
    after: u64,
    prefix: u8,
    counts: Mutex<HashMap<(SocketAddr, IpAddr), u64>>,
    requests: Sender<(SocketAddr, IpAddr)>,
}

impl Rule {
    fn count(&self, service: SocketAddr, client: IpAddr) {
        let prefix = match client {
            IpAddr::V4(_) => self.prefix,
            IpAddr::V6(_) => 128,
        };
        let net = mask_addr(client, prefix);
        let mut counts = match self.counts.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if counts.len() >= MAX_TRACKED && !counts.contains_key(&(service, net)) {
            counts.clear();
        }
        let c = counts.entry((service, net)).or_insert(0);
        *c = c.saturating_add(1);
        if *c == self.after {
            let _ = self.requests.send((service, client));
        }
    }
}

/// Sends the affinity requests and logs the replies and the ended
/// notifications.
fn affinity_thread(
    name: &str,
    mut client: ControlClient,
    requests: Receiver<(SocketAddr, IpAddr)>,
    duration: Duration,
    prefix: u8,
) {
    let prefix_of = |c: IpAddr| match c {
        IpAddr::V4(_) => prefix,
        IpAddr::V6(_) => 128,
    };
    let mut pending: HashSet<(SocketAddr, IpAddr)> = HashSet::new();
    loop {
        loop {
            match requests.try_recv() {
                Ok(r) => {
                    pending.insert(r);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        for (service, client_addr) in pending.drain() {
            let prefix = prefix_of(client_addr);
            let key = match AffinityKey::new(ServiceAddr::tcp(service), client_addr, prefix) {
                Ok(k) => k,
                Err(e) => {
                    log(name, &format!("affinity for {client_addr}: {e}"));
                    continue;
                }
            };
            let what = format!(
                "affinity {}/{prefix} on {service} for {}s",
                key.client,
                duration.as_secs()
            );
            match client.create_affinity(&AffinitySpec::new(key), duration) {
                Ok(r) if r.code == ReturnCode::Ok => log(
                    name,
                    &format!("{what}: OK, {} s remaining", r.remaining_secs),
                ),
                Ok(r) => log(
                    name,
                    &format!(
                        "{what}: {}{}{}",
                        r.code,
                        r.owner
                            .as_deref()
                            .map(|o| format!(" (owner {o})"))
                            .unwrap_or_default(),
                        if r.message.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", r.message)
                        }
                    ),
                ),
                Err(e) => log(name, &format!("{what}: failed: {e}")),
            }
        }
        match client.recv_ended(Duration::from_millis(20)) {
            Ok(Some(n)) => log(
                name,
                &format!(
                    "AFFINITY_ENDED {}/{} on {} owner {}: {}",
                    n.key.client,
                    n.key.prefix_len,
                    n.key.service,
                    n.owner,
                    n.reason.name()
                ),
            ),
            Ok(None) => {}
            Err(e) => {
                log(name, &format!("control socket: {e}"));
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// User-space IP-in-IP decapsulation (IPv4 in IPv4).
struct Decap {
    rx: Socket,
    tx: Socket,
    /// Addresses known to be local (or not), from a bind test; bounded.
    local: HashMap<Ipv4Addr, bool>,
    decapsulated: u64,
    not_local: u64,
    malformed: u64,
    send_errors: u64,
}

/// Most inner destinations remembered by the locality cache.
const MAX_LOCAL_CACHE: usize = 1024;

impl Decap {
    fn open(listen: Vec<IpAddr>) -> io::Result<Decap> {
        // Protocol 4 = IP-in-IP: the socket receives each whole outer packet.
        let rx = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(4)))?;
        // IPPROTO_RAW (255): send-only, the caller writes the IP header.
        let tx = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))?;
        tx.set_header_included_v4(true)?;
        let mut local = HashMap::new();
        for a in listen {
            if let IpAddr::V4(v4) = a {
                if !v4.is_unspecified() {
                    local.insert(v4, true);
                }
            }
        }
        Ok(Decap {
            rx,
            tx,
            local,
            decapsulated: 0,
            not_local: 0,
            malformed: 0,
            send_errors: 0,
        })
    }

    /// Whether `a` is an address of this host: binding to it succeeds only
    /// then.
    fn is_local(&mut self, a: Ipv4Addr) -> bool {
        if let Some(&l) = self.local.get(&a) {
            return l;
        }
        let l = UdpSocket::bind(SocketAddrV4::new(a, 0)).is_ok();
        if self.local.len() >= MAX_LOCAL_CACHE {
            self.local.retain(|_, v| *v);
        }
        self.local.insert(a, l);
        l
    }

    fn run(mut self, name: &str) {
        log(name, "decap: receiving IP-in-IP on a raw socket");
        let mut buf = vec![0u8; 65536];
        let mut last_log = Instant::now();
        let mut logged = (0, 0, 0, 0);
        let _ = self.rx.set_read_timeout(Some(Duration::from_secs(1)));
        loop {
            match (&self.rx).read(&mut buf) {
                Ok(n) => self.packet(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    log(name, &format!("decap: receive: {e}"));
                    thread::sleep(Duration::from_millis(100));
                }
            }
            let now = (
                self.decapsulated,
                self.not_local,
                self.malformed,
                self.send_errors,
            );
            if now != logged && last_log.elapsed() >= Duration::from_secs(2) {
                log(
                    name,
                    &format!(
                        "decap: {} decapsulated, {} not for a local address, {} malformed, {} send errors",
                        now.0, now.1, now.2, now.3
                    ),
                );
                logged = now;
                last_log = Instant::now();
            }
        }
    }

    /// One outer packet: check both headers, forward the inner one.
    fn packet(&mut self, outer: &[u8]) {
        let Some(inner) = inner_packet(outer) else {
            self.malformed += 1;
            return;
        };
        let dst = Ipv4Addr::new(inner[16], inner[17], inner[18], inner[19]);
        if !self.is_local(dst) {
            self.not_local += 1;
            return;
        }
        let to = SockAddr::from(SocketAddrV4::new(dst, 0));
        match self.tx.send_to(inner, &to) {
            Ok(_) => self.decapsulated += 1,
            Err(_) => self.send_errors += 1,
        }
    }
}

/// The inner IPv4 packet of an IPv4-in-IPv4 packet, or None if either
/// header is not a well-formed, unfragmented IPv4 header.
fn inner_packet(outer: &[u8]) -> Option<&[u8]> {
    let outer = ipv4_packet(outer)?;
    if outer[9] != 4 {
        return None;
    }
    let ihl = usize::from(outer[0] & 0x0f) * 4;
    let inner = ipv4_packet(&outer[ihl..])?;
    Some(inner)
}

/// `buf` cut to the IPv4 packet it starts with, if the header is sound and
/// not a fragment.
fn ipv4_packet(buf: &[u8]) -> Option<&[u8]> {
    if buf.len() < 20 || buf[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(buf[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    let frag = u16::from_be_bytes([buf[6], buf[7]]);
    if ihl < 20 || total < ihl || total > buf.len() || frag & 0x3fff != 0 {
        return None;
    }
    Some(&buf[..total])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 header of `total` bytes with protocol `proto` to `dst`.
    fn header(total: u16, proto: u8, dst: [u8; 4]) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[8] = 64;
        h[9] = proto;
        h[12..16].copy_from_slice(&[10, 99, 0, 2]);
        h[16..20].copy_from_slice(&dst);
        h
    }

    /// Outer IPv4 (protocol 4) around an inner IPv4/TCP packet of 40 bytes,
    /// plus `trailer` bytes after the outer packet.
    fn ipip(trailer: usize) -> Vec<u8> {
        let mut inner = header(40, 6, [10, 99, 100, 1]);
        inner.extend_from_slice(&[0xab; 20]);
        let mut p = header(60, 4, [10, 99, 10, 1]);
        p.extend_from_slice(&inner);
        p.extend(std::iter::repeat(0).take(trailer));
        p
    }

    #[test]
    fn inner_packet_of_ipip() {
        let p = ipip(6);
        let inner = inner_packet(&p).expect("well formed");
        assert_eq!(inner.len(), 40);
        assert_eq!(&inner[16..20], &[10, 99, 100, 1]);
        assert_eq!(inner[9], 6);
    }

    #[test]
    fn malformed_outer_or_inner_is_refused() {
        let good = ipip(0);
        // Truncated anywhere.
        for n in 0..good.len() {
            assert!(inner_packet(&good[..n]).is_none(), "cut at {n}");
        }
        // Not IP-in-IP.
        let mut p = good.clone();
        p[9] = 17;
        assert!(inner_packet(&p).is_none());
        // Fragments (more-fragments flag, or an offset) of either header.
        for (at, v) in [(6, 0x20u8), (7, 1), (26, 0x20), (27, 1)] {
            let mut p = good.clone();
            p[at] = v;
            assert!(inner_packet(&p).is_none(), "fragment byte {at}");
        }
        // Header length below 20, inner version not 4, inner total too long.
        let mut p = good.clone();
        p[0] = 0x44;
        assert!(inner_packet(&p).is_none());
        let mut p = good.clone();
        p[20] = 0x65;
        assert!(inner_packet(&p).is_none());
        let mut p = good;
        p[23] = 41;
        assert!(inner_packet(&p).is_none());
    }

    #[test]
    fn content_depends_on_position() {
        let a: Vec<u8> = (0..4096).map(content_byte).collect();
        let b: Vec<u8> = (1..4097).map(content_byte).collect();
        assert_ne!(a, b, "a shifted body must differ");
        let distinct: HashSet<u8> = a.iter().copied().collect();
        assert!(distinct.len() > 200);
    }

    #[test]
    fn rule_fires_once_at_the_nth_request_of_a_network() {
        let (tx, rx) = mpsc::channel();
        let rule = Rule {
            after: 2,
            prefix: 24,
            counts: Mutex::new(HashMap::new()),
            requests: tx,
        };
        let svc: SocketAddr = "10.99.100.1:80".parse().unwrap();
        let other: SocketAddr = "10.99.100.1:8080".parse().unwrap();
        let a: IpAddr = "10.99.1.1".parse().unwrap();
        let b: IpAddr = "10.99.1.7".parse().unwrap();
        let c: IpAddr = "10.99.2.1".parse().unwrap();
        rule.count(svc, a);
        assert!(rx.try_recv().is_err(), "first request of 10.99.1.0/24");
        rule.count(svc, b);
        assert_eq!(
            rx.try_recv().ok(),
            Some((svc, b)),
            "second request of the /24"
        );
        rule.count(svc, a);
        rule.count(svc, b);
        assert!(rx.try_recv().is_err(), "only once per network");
        rule.count(other, a);
        rule.count(svc, c);
        assert!(
            rx.try_recv().is_err(),
            "other service, other network: first requests"
        );
        rule.count(other, b);
        assert_eq!(rx.try_recv().ok(), Some((other, b)));
    }
}
