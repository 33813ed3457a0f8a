//! A test-bed client: real kernel TCP connections to a pktdist service from
//! chosen source addresses, each request checked byte for byte, one JSON
//! line per request on stdout.
//!
//! Run it inside a client namespace of the test bed (docs/testbed.md):
//!
//! ```text
//! ip netns exec pd-c1 testbed_client --target 10.99.100.1:80 \
//!     --sources 10.99.1.1-10.99.1.8 --connections 100 --concurrency 8 --path /bytes/100000
//! ```
//!
//! Modes:
//! * default: `--connections` connections, the sources taken in turn, each
//!   making one request to `--path` (every `--large-every`-th to
//!   `/bytes/--large` instead) and closing; with `--until-released`, at
//!   least that many: new ones go on until a line arrives on standard input
//!   (or it closes);
//! * `--parallel`: from each source, `--connections` connections opened at
//!   the same time and all held open until every one has its answer;
//! * `--hold`: one connection per source: a first request (`GET /`), then
//!   the connection stays open until a line arrives on standard input (or
//!   it closes), then a second request (`--path`) on the same connection.
//!
//! Each line: `{"conn":N,"src":"10.99.1.1:40312","backend":"be2",
//! "status":200,"bytes":100000,"ok":true,"error":null,"phase":"first"}`.
//! A request is ok when the status is 200, the body has the announced
//! length and, for `/bytes/N`, exactly the server's deterministic content.
//! The exit code is 0 when every request was ok, 1 otherwise.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use clap::Parser;
use serde_json::json;
use socket2::{Domain, Socket, Type};

#[derive(Parser, Debug)]
#[command(about = "pktdist test-bed client: byte-checked HTTP requests from chosen sources")]
struct Args {
    /// The service: VIP and port.
    #[arg(long, default_value = "10.99.100.1:80")]
    target: SocketAddr,
    /// Source addresses: A, A-B (a range of IPv4 addresses), comma-separated.
    #[arg(long, default_value = "10.99.1.1")]
    sources: String,
    /// Connections in total (default mode) or per source (--parallel).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Connections at once in the default mode.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Request path.
    #[arg(long, default_value = "/")]
    path: String,
    /// Every N-th connection asks for /bytes/LARGE instead (0 = never).
    #[arg(long, default_value_t = 0)]
    large_every: usize,
    /// Size of the large responses.
    #[arg(long, default_value_t = 100_000)]
    large: u64,
    /// Open each source's connections together and hold them.
    #[arg(long, conflicts_with = "hold")]
    parallel: bool,
    /// One connection per source, held open until a line on stdin.
    #[arg(long)]
    hold: bool,
    /// Pause after each connection in the default mode (a steady trickle
    /// rather than a burst), in milliseconds.
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
    /// In the default mode, go on past --connections until a line on
    /// stdin: a trickle that lasts as long as the test needs it to,
    /// however slow the machine.
    #[arg(long, conflicts_with_all = ["hold", "parallel"])]
    until_released: bool,
    /// Seconds to wait for a connection, and for each read.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

/// Byte `i` of every `GET /bytes/N` body (the same function as the
/// backend server's).
fn content_byte(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

fn main() {
    let args = Args::parse();
    let sources = match parse_sources(&args.sources) {
        Ok(s) if !s.is_empty() => s,
        Ok(_) => fail("--sources names no address"),
        Err(e) => fail(&e),
    };
    let failures = Arc::new(AtomicUsize::new(0));
    if args.hold {
        hold(&args, &sources, &failures);
    } else if args.parallel {
        parallel(&args, &sources, &failures);
    } else {
        many(&args, &sources, &failures);
    }
    std::process::exit(i32::from(failures.load(Ordering::Relaxed) > 0));
}

fn fail(msg: &str) -> ! {
    eprintln!("testbed_client: {msg}");
    std::process::exit(2)
}

/// `10.99.1.1-10.99.1.8,10.99.2.3` -> the addresses, in order.
fn parse_sources(s: &str) -> Result<Vec<Ipv4Addr>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let parse = |a: &str| {
            a.trim()
                .parse::<Ipv4Addr>()
                .map_err(|_| format!("`{a}` is not an IPv4 address"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (u32::from(parse(a)?), u32::from(parse(b)?));
                if b < a || b - a >= 65536 {
                    return Err(format!("`{part}` is not a range of at most 65536"));
                }
                out.extend((a..=b).map(Ipv4Addr::from));
            }
            None => out.push(parse(part)?),
        }
    }
    Ok(out)
}

/// Prints one JSON line (whole, under a lock).
fn emit(v: serde_json::Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// What one request got.
struct Outcome {
    backend: Option<String>,
    status: u16,
    bytes: u64,
    error: Option<String>,
}

impl Outcome {
    /// The outcome of a connection that could not be opened from `src`.
    fn not_connected(src: impl std::fmt::Display, e: &std::io::Error) -> Outcome {
        Outcome {
            backend: None,
            status: 0,
            bytes: 0,
            error: Some(format!("connect from {src}: {}", err_text(e))),
        }
    }
}

fn report(conn: usize, src: Option<SocketAddr>, phase: &str, o: &Outcome, failures: &AtomicUsize) {
    if o.error.is_some() {
        failures.fetch_add(1, Ordering::Relaxed);
    }
    emit(json!({
        "conn": conn,
        "src": src.map(|s| s.to_string()),
        "phase": phase,
        "backend": o.backend,
        "status": o.status,
        "bytes": o.bytes,
        "ok": o.error.is_none(),
        "error": o.error,
    }));
}

fn connect(src: Ipv4Addr, target: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
    s.connect_timeout(&target.into(), timeout)?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn err_text(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionReset => format!("reset: {e}"),
        io::ErrorKind::ConnectionRefused => format!("refused: {e}"),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!("timeout: {e}"),
        _ => e.to_string(),
    }
}

/// Sends `GET path` on a kept-alive connection and reads and checks the
/// response.
fn request(r: &mut BufReader<TcpStream>, path: &str, close: bool) -> Outcome {
    let mut o = Outcome {
        backend: None,
        status: 0,
        bytes: 0,
        error: None,
    };
    if let Err(e) = exchange(r, path, close, &mut o) {
        o.error = Some(err_text(&e));
    }
    o
}

fn exchange(
    r: &mut BufReader<TcpStream>,
    path: &str,
    close: bool,
    o: &mut Outcome,
) -> io::Result<()> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let conn = if close { "close" } else { "keep-alive" };
    write!(
        r.get_mut(),
        "GET {path} HTTP/1.1\r\nHost: pktdist\r\nConnection: {conn}\r\n\r\n"
    )?;
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    o.status = line
        .split_ascii_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let mut len: Option<u64> = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("x-backend") {
                o.backend = Some(v.trim().to_string());
            } else if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().ok();
            }
        }
    }
    let len = len.ok_or_else(|| bad("no Content-Length".into()))?;
    let expect_bytes = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok());
    let mut buf = vec![0u8; 64 << 10];
    while o.bytes < len {
        let want = (len - o.bytes).min(buf.len() as u64) as usize;
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(bad(format!(
                "connection closed after {} of {len} body bytes",
                o.bytes
            )));
        }
        if expect_bytes.is_some() {
            if let Some(j) = (0..n).find(|&j| buf[j] != content_byte(o.bytes + j as u64)) {
                return Err(bad(format!("body differs at byte {}", o.bytes + j as u64)));
            }
        }
        o.bytes += n as u64;
    }
    if o.status != 200 {
        return Err(bad(format!("status {}", o.status)));
    }
    if let Some(n) = expect_bytes {
        if n != len {
            return Err(bad(format!("asked {n} bytes, announced {len}")));
        }
    }
    Ok(())
}

/// One connection, one request, closed.
fn one(args: &Args, src: Ipv4Addr, path: &str) -> (Option<SocketAddr>, Outcome) {
    let timeout = Duration::from_secs(args.timeout);
    match connect(src, args.target, timeout) {
        Ok(s) => {
            let local = s.local_addr().ok();
            let mut r = BufReader::new(s);
            (local, request(&mut r, path, true))
        }
        Err(e) => (None, Outcome::not_connected(src, &e)),
    }
}

fn many(args: &Args, sources: &[Ipv4Addr], failures: &Arc<AtomicUsize>) {
    let next = AtomicUsize::new(0);
    let released = Arc::new(AtomicBool::new(!args.until_released));
    if args.until_released {
        // Not scoped: the process ends without waiting for a line.
        let released = Arc::clone(&released);
        thread::spawn(move || {
            let mut line = String::new();
            let _ = io::stdin().lock().read_line(&mut line);
            released.store(true, Ordering::Relaxed);
        });
    }
    thread::scope(|s| {
        for _ in 0..args.concurrency.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= args.connections && released.load(Ordering::Relaxed) {
                    break;
                }
                let src = sources[i % sources.len()];
                let large = args.large_every > 0 && i % args.large_every == args.large_every - 1;
                let path = if large {
                    format!("/bytes/{}", args.large)
                } else {
                    args.path.clone()
                };
                let (local, o) = one(args, src, &path);
                report(i, local, "only", &o, failures);
                if args.pause_ms > 0 {
                    thread::sleep(Duration::from_millis(args.pause_ms));
                }
            });
        }
    });
}

fn parallel(args: &Args, sources: &[Ipv4Addr], failures: &Arc<AtomicUsize>) {
    let n = args.connections.max(1);
    let timeout = Duration::from_secs(args.timeout);
    // Every connection is open before any is closed: all of a source's
    // connections overlap in time.
    let opened = Barrier::new(n * sources.len());
    let answered = Barrier::new(n * sources.len());
    let conn_id = AtomicUsize::new(0);
    thread::scope(|s| {
        for &src in sources {
            for _ in 0..n {
                let (opened, answered, conn_id) = (&opened, &answered, &conn_id);
                s.spawn(move || {
                    let i = conn_id.fetch_add(1, Ordering::Relaxed);
                    let stream = connect(src, args.target, timeout);
                    opened.wait();
                    let (local, o) = match stream {
                        Ok(st) => {
                            let local = st.local_addr().ok();
                            let mut r = BufReader::new(st);
                            let o = request(&mut r, &args.path, false);
                            answered.wait();
                            (local, o)
                        }
                        Err(e) => {
                            answered.wait();
                            (None, Outcome::not_connected(src, &e))
                        }
                    };
                    report(i, local, "parallel", &o, failures);
                });
            }
        }
    });
}

fn hold(args: &Args, sources: &[Ipv4Addr], failures: &Arc<AtomicUsize>) {
    let timeout = Duration::from_secs(args.timeout);
    let mut held: Vec<(usize, Option<SocketAddr>, BufReader<TcpStream>)> = Vec::new();
    for (i, &src) in sources.iter().enumerate() {
        match connect(src, args.target, timeout) {
            Ok(s) => {
                let local = s.local_addr().ok();
                let mut r = BufReader::new(s);
                let o = request(&mut r, "/", false);
                let ok = o.error.is_none();
                report(i, local, "first", &o, failures);
                if ok {
                    held.push((i, local, r));
                }
            }
            Err(e) => {
                let o = Outcome {
                    backend: None,
                    status: 0,
                    bytes: 0,
                    error: Some(format!("connect from {src}: {}", err_text(&e))),
                };
                report(i, None, "first", &o, failures);
            }
        }
    }
    emit(json!({"held": held.len()}));
    // Wait for the go-ahead: a line, or the end of standard input.
    let mut line = String::new();
    let _ = io::stdin().lock().read_line(&mut line);
    let results = Mutex::new(Vec::new());
    thread::scope(|s| {
        for (i, local, mut r) in held {
            let results = &results;
            s.spawn(move || {
                let o = request(&mut r, &args.path, true);
                if let Ok(mut v) = results.lock() {
                    v.push((i, local, o));
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_default();
    for (i, local, o) in results {
        report(i, local, "second", &o, failures);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_lists_and_ranges() {
        let s = parse_sources("10.99.1.1-10.99.1.3, 10.99.2.8,").unwrap();
        let want: Vec<Ipv4Addr> = ["10.99.1.1", "10.99.1.2", "10.99.1.3", "10.99.2.8"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(s, want);
        // A range across an octet boundary.
        let s = parse_sources("10.99.1.255-10.99.2.0").unwrap();
        assert_eq!(s.len(), 2);
        assert!(parse_sources("10.99.1.3-10.99.1.1").is_err());
        assert!(parse_sources("10.0.0.0-10.2.0.0").is_err());
        assert!(parse_sources("example.org").is_err());
        assert!(parse_sources("").unwrap().is_empty());
    }

    #[test]
    fn content_matches_the_server() {
        // The same function as examples/backend_server.rs: spot values.
        assert_eq!(content_byte(0), 0);
        assert_eq!(content_byte(1), 0x9e);
        assert_eq!(content_byte(2), 0x3c);
    }
}
