//! The `pktdist affinity|backend|stats|reload|status` subcommands: talk to
//! a running instance through the client library (`status` asks its
//! metrics listener's `GET /ready`) and print the answers as tables.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::client::library::{deadline_after, AffinitySpec, ClientError, ControlClient};
use crate::config::{Config, DurationStr};
use crate::net::IpNet;
use crate::protocol::auth::parse_hex_key;
use crate::protocol::message::{
    AffinityEntry, AffinityKey, BackendEntry, Reply, Request, ReturnCode, ServiceAddr,
};
use crate::report::metrics::time_left;
use crate::report::statsview::{self, fmt_secs};
use crate::report::summary::Summary;
use crate::types::{Declared, PortMatch};
use crate::types::{PROTO_TCP, PROTO_UDP};

/// Default control address.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7400";

/// How to reach and authenticate to the running instance.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct ConnArgs {
    /// Control address of the running pktdist [default: the `listen` address
    /// of the --config file's control section, else 127.0.0.1:7400].
    #[arg(long)]
    pub server: Option<SocketAddr>,
    /// Name to send as: `admin`, or a backend name.
    #[arg(long, default_value = "admin")]
    pub name: String,
    /// The name's key, in hex.
    #[arg(long, conflicts_with = "key_file")]
    pub key: Option<String>,
    /// A file holding the name's key in hex.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// The running instance's configuration file: the control address and
    /// the key of --name are taken from it unless given.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Time to wait for each reply (two retries follow a timeout).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub timeout: Duration,
}

impl ConnArgs {
    fn config_file(&self) -> Result<Option<Config>, String> {
        self.config
            .as_ref()
            .map(|p| Config::load(p).map_err(|e| e.to_string()))
            .transpose()
    }

    /// The control address: --server, else the config's, else the default.
    #[cfg(test)]
    fn server_addr(&self) -> Result<SocketAddr, String> {
        self.server_addr_in(self.config_file()?.as_ref())
    }

    /// [`ConnArgs::server_addr`] with `--config` already read as `cfg`.
    fn server_addr_in(&self, cfg: Option<&Config>) -> Result<SocketAddr, String> {
        if let Some(s) = self.server {
            return Ok(s);
        }
        Ok(match cfg {
            Some(cfg) => cfg.control.listen,
            None => DEFAULT_SERVER.parse().map_err(|e| format!("{e}"))?,
        })
    }

    /// The key bytes from `--key`, `--key-file` or the config's keys.
    #[cfg(test)]
    fn key_bytes(&self) -> Result<Vec<u8>, String> {
        self.key_bytes_in(self.config_file()?.as_ref())
    }

    /// [`ConnArgs::key_bytes`] with `--config` already read as `cfg`.
    fn key_bytes_in(&self, cfg: Option<&Config>) -> Result<Vec<u8>, String> {
        match (&self.key, &self.key_file) {
            (Some(hex), _) => parse_hex_key(hex).map_err(|e| format!("--key: {e}")),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("--key-file {}: {e}", path.display()))?;
                parse_hex_key(&text).map_err(|e| format!("--key-file {}: {e}", path.display()))
            }
            (None, None) => match cfg {
                Some(cfg) => cfg
                    .control
                    .keys
                    .get(&self.name)
                    .map(|k| k.0.clone())
                    .ok_or_else(|| {
                        format!(
                            "the configuration has no key for {:?} in [control.keys]",
                            self.name
                        )
                    }),
                None => Err("give the key with --key HEX, --key-file PATH or --config FILE".into()),
            },
        }
    }

    /// A client connected as these arguments say (`--config` read once).
    pub fn client(&self) -> Result<ControlClient, String> {
        let cfg = self.config_file()?;
        let key = self.key_bytes_in(cfg.as_ref())?;
        let mut c = ControlClient::new(self.server_addr_in(cfg.as_ref())?, &self.name, &key)
            .map_err(|e| format!("control client: {e}"))?;
        c.set_timeout(self.timeout);
        Ok(c)
    }
}

/// Which affinity: service, client network, client ports, owner.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct AffinityTarget {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Service VIP and port, e.g. 192.0.2.10:80 or `[2001:db8::10]:443`.
    #[arg(long)]
    pub service: SocketAddr,
    /// Service protocol: tcp or udp.
    #[arg(long, default_value = "tcp", value_parser = parse_proto)]
    pub proto: u8,
    /// Client address or network: 198.51.100.7 or 198.51.100.0/24.
    #[arg(long)]
    pub client: IpNet,
    /// Client ports: any, one port (1234) or a range (1000-1999).
    #[arg(long, default_value = "any", value_parser = parse_ports)]
    pub ports: PortMatch,
    /// Owning backend (admin only; a backend always owns its own).
    #[arg(long)]
    pub owner: Option<String>,
}

impl AffinityTarget {
    pub fn spec(&self) -> Result<AffinitySpec, String> {
        let service = ServiceAddr {
            addr: self.service.ip(),
            port: self.service.port(),
            proto: self.proto,
        };
        let key = AffinityKey::new(service, self.client.addr(), self.client.prefix_len())
            .map_err(str::to_string)?
            .with_ports(self.ports);
        Ok(AffinitySpec {
            key,
            owner: self.owner.clone(),
            notify: None,
        })
    }
}

/// An affinity with a duration (add, extend).
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct AffinityTimed {
    #[command(flatten)]
    pub target: AffinityTarget,
    /// How long: 90, 30s, 5m, 2h, 1d (at least 1s; a fraction of a second
    /// is rounded up).
    #[arg(long, value_parser = parse_affinity_duration)]
    pub duration: Duration,
}

/// A new affinity (add): its duration, and where its end is told.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct AffinityAdd {
    #[command(flatten)]
    pub timed: AffinityTimed,
    /// Where the ended notification goes (default: this command's socket).
    #[arg(long)]
    pub notify: Option<SocketAddr>,
}

/// `pktdist affinity ...`
#[derive(Subcommand, Clone, Debug, PartialEq, Eq)]
pub enum AffinityCmd {
    /// Pin a client (or network) on a service to a backend for a duration.
    Add(AffinityAdd),
    /// Give an existing affinity a new duration from now (its notify
    /// address stays).
    Extend(AffinityTimed),
    /// Remove an affinity now.
    Cancel(AffinityTarget),
    /// List affinities.
    List {
        #[command(flatten)]
        conn: ConnArgs,
        /// Only this service (VIP:PORT).
        #[arg(long)]
        service: Option<SocketAddr>,
        /// Protocol of --service.
        #[arg(long, default_value = "tcp", value_parser = parse_proto)]
        proto: u8,
        /// Only this owner.
        #[arg(long)]
        owner: Option<String>,
    },
}

use crate::config::MacAddr;

/// `pktdist backend ...`
#[derive(Subcommand, Clone, Debug, PartialEq, Eq)]
pub enum BackendCmd {
    /// List backends with their weights.
    List {
        #[command(flatten)]
        conn: ConnArgs,
        /// Only this service (by name).
        #[arg(long)]
        service: Option<String>,
    },
    /// Set a backend's weight; 0 drains it. At the instance asked only,
    /// also in cluster mode.
    SetWeight {
        #[command(flatten)]
        conn: ConnArgs,
        service: String,
        backend: String,
        weight: u32,
    },
    /// Add a backend to a service (at the instance asked only, also in
    /// cluster mode).
    Add {
        #[command(flatten)]
        conn: ConnArgs,
        service: String,
        backend: String,
        /// Backend address (same family as the service VIP).
        #[arg(long)]
        addr: IpAddr,
        /// Next-hop MAC (needed for l2 forwarding).
        #[arg(long)]
        mac: Option<MacAddr>,
        /// Weight (default 100, as a configured backend's).
        #[arg(long, default_value_t = 100)]
        weight: u32,
    },
    /// Remove a backend; its affinities end. At the instance asked only,
    /// also in cluster mode.
    Remove {
        #[command(flatten)]
        conn: ConnArgs,
        service: String,
        backend: String,
    },
    /// Drain a backend: no new connections or affinities, what it has
    /// finishes (BACKEND_STATE DRAIN; with the admin key, the operator's
    /// drain, which the application's UP does not undo). In cluster mode
    /// at every instance.
    Drain {
        #[command(flatten)]
        conn: ConnArgs,
        service: String,
        backend: String,
    },
    /// Undo `drain` (BACKEND_STATE UP). In cluster mode at every instance.
    Undrain {
        #[command(flatten)]
        conn: ConnArgs,
        service: String,
        backend: String,
    },
    /// Declare a backend's state: up, drain or down (down: no new
    /// connections at once, its affinities skipped). In cluster mode at
    /// every instance.
    State {
        #[command(flatten)]
        conn: ConnArgs,
        service: String,
        backend: String,
        #[arg(value_parser = parse_declared)]
        state: Declared,
    },
}

/// `up`, `drain` or `down` (any case).
pub fn parse_declared(s: &str) -> Result<Declared, String> {
    match s.to_ascii_lowercase().as_str() {
        "up" => Ok(Declared::Up),
        "drain" => Ok(Declared::Drain),
        "down" => Ok(Declared::Down),
        _ => Err(format!("{s:?}: the state is up, drain or down")),
    }
}

/// `pktdist stats`
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct StatsArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Refresh continuously.
    #[arg(long)]
    pub watch: bool,
    /// Refresh interval for --watch (at least 100ms).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
}

/// `pktdist status`
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct StatusArgs {
    /// The instance's metrics address [default: `metrics_listen` of the
    /// --config file's control section].
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// The running instance's configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Time the whole call may take: connecting, asking, reading the answer.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Asks a running instance whether it is ready (`GET /ready` on its
/// metrics listener) and prints the answer: `Ok(true)` ready, `Ok(false)`
/// answering but not ready (starting or stopping).
pub fn run_status(args: &StatusArgs) -> Result<bool, String> {
    let addr = match (args.metrics, &args.config) {
        (Some(a), _) => a,
        (None, Some(path)) => {
            let cfg = Config::load(path).map_err(|e| e.to_string())?;
            let a = cfg.control.metrics_listen.ok_or_else(|| {
                format!(
                    "{}: no [control] metrics_listen: readiness is served there",
                    path.display()
                )
            })?;
            if a.port() == 0 {
                return Err(format!(
                    "{}: metrics_listen has port 0 (any free port): give --metrics",
                    path.display()
                ));
            }
            a
        }
        (None, None) => return Err("give --config or --metrics".into()),
    };
    // A listener on every address is reached on loopback.
    let addr = match addr.ip() {
        IpAddr::V4(v) if v.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], addr.port())),
        IpAddr::V6(v) if v.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    };
    let status = http_status(addr, "/ready", args.timeout)
        .map_err(|e| format!("cannot ask {addr} for its readiness: {e}"))?;
    match status {
        200 => {
            println!("ready");
            Ok(true)
        }
        503 => {
            println!("not ready");
            Ok(false)
        }
        other => Err(format!("{addr} answered /ready with HTTP {other}")),
    }
}

/// The status code of `GET path` at `addr`, within `timeout` for the whole
/// exchange (connecting, sending, every read): an instance that answers a
/// byte at a time is not waited for read after read.
fn http_status(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<u16> {
    use std::io::{ErrorKind, Read as _};
    let deadline = deadline_after(timeout);
    let mut s = std::net::TcpStream::connect_timeout(&addr, time_left(deadline)?)?;
    // In one write (the loop only finishes a partial one): `write!` on the
    // stream would send the request in pieces, and a server that answers
    // once it has read the first piece and closes would leave the rest to
    // fail with a broken pipe.
    let request = format!("GET {path} HTTP/1.1\r\nHost: pktdist\r\nConnection: close\r\n\r\n");
    let mut unsent = request.as_bytes();
    while !unsent.is_empty() {
        s.set_write_timeout(Some(time_left(deadline)?))?;
        match s.write(unsent) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => unsent = &unsent[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(timed_out(e)),
        }
    }
    let mut head = vec![0u8; 4096];
    let mut len = 0;
    while len < head.len() {
        s.set_read_timeout(Some(time_left(deadline)?))?;
        match s.read(&mut head[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(timed_out(e)),
        }
    }
    let text = String::from_utf8_lossy(&head[..len]);
    text.lines()
        .next()
        .and_then(|l| {
            l.strip_prefix("HTTP/1.1 ")
                .or_else(|| l.strip_prefix("HTTP/1.0 "))
        })
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidData, "not an HTTP answer"))
}

/// A socket timeout (`WouldBlock` on Unix) as the timeout it is.
fn timed_out(e: std::io::Error) -> std::io::Error {
    match e.kind() {
        std::io::ErrorKind::WouldBlock => std::io::ErrorKind::TimedOut.into(),
        _ => e,
    }
}

/// `30s`, `5m`, `2h`, `1d`, `250ms`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| format!("`{s}` is too long"));
    }
    s.parse::<DurationStr>().map(|d| d.0)
}

/// [`parse_duration`] of an affinity's duration: longer than 0 (the
/// protocol's INVALID otherwise; the client rounds a fraction of a second
/// up).
pub fn parse_affinity_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("an affinity lasts longer than 0".into()),
        d => Ok(d),
    }
}

/// `tcp`, `udp`, `6` or `17`.
pub fn parse_proto(s: &str) -> Result<u8, String> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" | "6" => Ok(PROTO_TCP),
        "udp" | "17" => Ok(PROTO_UDP),
        _ => Err(format!("`{s}` is not a protocol (tcp or udp)")),
    }
}

/// `any`, `PORT` or `LO-HI`.
pub fn parse_ports(s: &str) -> Result<PortMatch, String> {
    s.parse()
}

fn err(e: ClientError) -> String {
    e.to_string()
}

/// One line for a reply; Err (for a non-zero exit) unless the code is OK.
pub fn render_reply(what: &str, reply: &Reply) -> Result<String, String> {
    let mut line = format!("{}: {what}", reply.code);
    if let Some(owner) = &reply.owner {
        let _ = write!(line, ", owned by {owner}");
    }
    match reply.remaining_secs {
        0 => {}
        // A static affinity, from the configuration.
        u32::MAX => line.push_str(", static"),
        n => {
            let _ = write!(line, ", {n} s remaining");
        }
    }
    if !reply.message.is_empty() {
        let _ = write!(line, " ({})", reply.message);
    }
    if reply.code == ReturnCode::Ok {
        Ok(line)
    } else {
        Err(line)
    }
}

/// Aligned columns under a header row.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            let _ = write!(l, "{:<w$}", c, w = widths.get(i).copied().unwrap_or(0));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn fmt_mac(m: [u8; 6]) -> String {
    MacAddr(m).to_string()
}

/// The affinity list as a table.
pub fn render_affinities(entries: &[AffinityEntry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.key.service.to_string(),
                format!("{}/{}", e.key.client, e.key.prefix_len),
                e.key.ports.to_string(),
                e.owner.clone(),
                if e.remaining_secs == u32::MAX {
                    "static".into()
                } else {
                    format!("{}s", e.remaining_secs)
                },
                e.notify.map_or_else(|| "-".into(), |n| n.to_string()),
            ]
        })
        .collect();
    let mut out = render_table(
        &["SERVICE", "CLIENT", "PORTS", "OWNER", "REMAINING", "NOTIFY"],
        &rows,
    );
    let _ = writeln!(out, "{} affinities", entries.len());
    out
}

/// The backend list as a table.
pub fn render_backends(entries: &[BackendEntry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|b| {
            vec![
                b.service.clone(),
                b.backend.clone(),
                b.addr.to_string(),
                b.mac.map_or_else(|| "-".into(), fmt_mac),
                b.weight.to_string(),
                b.state.name().into(),
                fmt_secs(u64::from(b.state_secs)),
                match b.healthy {
                    None => "-",
                    Some(true) => "passing",
                    Some(false) => "failing",
                }
                .into(),
                b.app.name().into(),
                b.admin.name().into(),
                b.check_error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    render_table(
        &[
            "SERVICE",
            "BACKEND",
            "ADDRESS",
            "MAC",
            "WEIGHT",
            "STATE",
            "FOR",
            "CHECKS",
            "APP",
            "ADMIN",
            "LAST CHECK ERROR",
        ],
        &rows,
    )
}

/// Runs `pktdist affinity ...`, printing the result.
pub fn run_affinity(cmd: &AffinityCmd) -> Result<(), String> {
    match cmd {
        AffinityCmd::Add(AffinityAdd { timed: a, notify }) => {
            let mut spec = a.target.spec()?;
            spec.notify = *notify;
            let reply = a.target.conn.client()?.create_affinity(&spec, a.duration);
            println!(
                "{}",
                render_reply(&format!("create {}", spec.key), &reply.map_err(err)?)?
            );
            Ok(())
        }
        AffinityCmd::Extend(a) => {
            let spec = a.target.spec()?;
            let reply = a.target.conn.client()?.extend_affinity(&spec, a.duration);
            println!(
                "{}",
                render_reply(&format!("extend {}", spec.key), &reply.map_err(err)?)?
            );
            Ok(())
        }
        AffinityCmd::Cancel(t) => {
            let spec = t.spec()?;
            let reply = t.conn.client()?.cancel_affinity(&spec).map_err(err)?;
            println!("{}", render_reply(&format!("cancel {}", spec.key), &reply)?);
            Ok(())
        }
        AffinityCmd::List {
            conn,
            service,
            proto,
            owner,
        } => {
            let service = service.map(|s| ServiceAddr {
                addr: s.ip(),
                port: s.port(),
                proto: *proto,
            });
            let entries = conn
                .client()?
                .list_affinities(service, owner.as_deref())
                .map_err(err)?;
            print!("{}", render_affinities(&entries));
            Ok(())
        }
    }
}

/// Runs `pktdist backend ...`, printing the result.
pub fn run_backend(cmd: &BackendCmd) -> Result<(), String> {
    match cmd {
        BackendCmd::List { conn, service } => {
            let entries = conn
                .client()?
                .backend_list(service.as_deref())
                .map_err(err)?;
            print!("{}", render_backends(&entries));
            Ok(())
        }
        BackendCmd::SetWeight {
            conn,
            service,
            backend,
            weight,
        } => {
            let reply = conn
                .client()?
                .set_weight(service, backend, *weight)
                .map_err(err)?;
            println!(
                "{}",
                render_reply(&format!("{service}/{backend} weight {weight}"), &reply)?
            );
            Ok(())
        }
        BackendCmd::Add {
            conn,
            service,
            backend,
            addr,
            mac,
            weight,
        } => {
            let entry = BackendEntry::new(service, backend, *addr, mac.map(|m| m.0), *weight);
            let reply = conn.client()?.add_backend(&entry).map_err(err)?;
            println!(
                "{}",
                render_reply(&format!("add {service}/{backend} at {addr}"), &reply)?
            );
            Ok(())
        }
        BackendCmd::Drain {
            conn,
            service,
            backend,
        }
        | BackendCmd::Undrain {
            conn,
            service,
            backend,
        }
        | BackendCmd::State {
            conn,
            service,
            backend,
            ..
        } => {
            let state = match cmd {
                BackendCmd::Drain { .. } => Declared::Drain,
                BackendCmd::State { state, .. } => *state,
                _ => Declared::Up,
            };
            let reply = conn
                .client()?
                .set_backend_state(Some(service), Some(backend), state)
                .map_err(err)?;
            println!(
                "{}",
                render_reply(&format!("{service}/{backend} {}", state.name()), &reply)?
            );
            Ok(())
        }
        BackendCmd::Remove {
            conn,
            service,
            backend,
        } => {
            let reply = conn
                .client()?
                .remove_backend(service, backend)
                .map_err(err)?;
            println!(
                "{}",
                render_reply(&format!("remove {service}/{backend}"), &reply)?
            );
            Ok(())
        }
    }
}

/// The statistics document (JSON) of the running instance.
pub fn fetch_stats(conn: &ConnArgs) -> Result<String, String> {
    conn.client()?.stats().map_err(err)
}

/// Runs `pktdist stats`: prints the statistics once, pretty-printed when
/// they are JSON, or with `--watch` the live view, fetched again every
/// `interval`.
pub fn run_stats(args: &StatsArgs) -> Result<(), String> {
    if !args.watch {
        let doc = fetch_stats(&args.conn)?;
        match serde_json::from_str::<serde_json::Value>(&doc) {
            Ok(v) => println!(
                "{}",
                serde_json::to_string_pretty(&v).unwrap_or_else(|_| doc.clone())
            ),
            Err(_) => println!("{doc}"),
        }
        return Ok(());
    }
    if args.interval < MIN_WATCH_INTERVAL {
        return Err(format!(
            "--interval {:?}: at least {MIN_WATCH_INTERVAL:?}",
            args.interval
        ));
    }
    let terminal = std::io::stdout().is_terminal();
    let mut client = args.conn.client()?;
    let server = client.server().to_string();
    let mut prev: Option<Summary> = None;
    let fetch = |client: &mut ControlClient| {
        client.stats().map_err(err).and_then(|doc| {
            serde_json::from_str::<Summary>(&doc)
                .map_err(|e| format!("statistics are not a summary: {e}"))
        })
    };
    // The first answer must come (a wrong key or address fails here).
    let mut fetched = Ok(fetch(&mut client)?);
    loop {
        // A later miss (the instance busy in a reload, restarting) is shown
        // and the view goes on; the last figures stay for the next frame's
        // rates.
        let frame = match &fetched {
            Ok(cur) => statsview::render(&server, prev.as_ref(), cur, terminal),
            Err(e) => format!("pktdist stats {server}: no statistics: {e}\n"),
        };
        let mut out = std::io::stdout().lock();
        if out
            .write_all(frame.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            // The reader went away (a closed pipe): stop quietly.
            return Ok(());
        }
        if let Ok(cur) = fetched {
            prev = Some(cur);
        }
        std::thread::sleep(args.interval);
        fetched = fetch(&mut client);
    }
}

/// The shortest refresh of `pktdist stats --watch`: each is a request the
/// control thread answers with a whole statistics document.
const MIN_WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// `pktdist reload`: the running instance re-reads its configuration file.
pub fn run_reload(conn: &ConnArgs) -> Result<(), String> {
    let mut client = conn.client()?;
    let reply = client.request(&Request::Reload).map_err(err)?;
    let text = render_reply("reload", &reply)?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: Top,
    }

    #[derive(Subcommand, Debug)]
    enum Top {
        #[command(subcommand)]
        Affinity(AffinityCmd),
        #[command(subcommand)]
        Backend(BackendCmd),
        Stats(StatsArgs),
    }

    fn parse(args: &[&str]) -> Result<Top, clap::Error> {
        Cli::try_parse_from(std::iter::once("pktdist").chain(args.iter().copied())).map(|c| c.cmd)
    }

    #[test]
    fn affinity_add_parses() {
        let Top::Affinity(AffinityCmd::Add(AffinityAdd { timed: a, .. })) = parse(&[
            "affinity",
            "add",
            "--service",
            "192.0.2.10:80",
            "--client",
            "198.51.100.77/24",
            "--ports",
            "1000-1999",
            "--duration",
            "5m",
            "--key",
            "00112233445566778899aabbccddeeff",
        ])
        .unwrap() else {
            panic!("wrong command")
        };
        assert_eq!(a.duration, Duration::from_secs(300));
        assert_eq!(
            a.target.conn.server_addr().unwrap(),
            DEFAULT_SERVER.parse().unwrap()
        );
        assert_eq!(a.target.conn.name, "admin");
        let spec = a.target.spec().unwrap();
        assert_eq!(spec.key.client, "198.51.100.0".parse::<IpAddr>().unwrap());
        assert_eq!(spec.key.prefix_len, 24);
        assert_eq!(spec.key.ports, PortMatch::Range(1000, 1999));
        assert_eq!(spec.key.service.proto, PROTO_TCP);
        assert_eq!(a.target.conn.key_bytes().unwrap().len(), 16);
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(parse(&["affinity", "add", "--service", "192.0.2.10:80"]).is_err());
        // EXTEND keeps the affinity's notify address: no --notify to ignore.
        let extend = |extra: &[&str]| {
            let mut args = vec![
                "affinity",
                "extend",
                "--service",
                "192.0.2.10:80",
                "--client",
                "203.0.113.0/24",
                "--owner",
                "be3",
                "--duration",
                "1h",
            ];
            args.extend_from_slice(extra);
            parse(&args)
        };
        assert!(extend(&[]).is_ok());
        assert!(extend(&["--notify", "10.0.0.3:7500"]).is_err());
        assert!(parse(&[
            "affinity",
            "cancel",
            "--service",
            "192.0.2.10:80",
            "--client",
            "10.0.0.0/40"
        ])
        .is_err());
        assert!(parse(&["backend", "set-weight", "web", "b1", "heavy"]).is_err());
        assert!(
            parse(&["backend", "add", "web", "b1", "--addr", "10.0.0.1", "--mac", "zz"]).is_err()
        );
        let Top::Affinity(AffinityCmd::Cancel(t)) = parse(&[
            "affinity",
            "cancel",
            "--service",
            "[2001:db8::1]:443",
            "--client",
            "10.0.0.1",
        ])
        .unwrap() else {
            panic!("wrong command")
        };
        assert!(t.spec().is_err(), "family mismatch");
        assert!(t.conn.key_bytes().unwrap_err().contains("--key"));
    }

    #[test]
    fn backend_and_stats_parse() {
        let Top::Backend(BackendCmd::Add { mac, weight, .. }) = parse(&[
            "backend",
            "add",
            "web",
            "b9",
            "--addr",
            "10.0.0.9",
            "--mac",
            "02:00:00:00:00:09",
            "--weight",
            "5",
        ])
        .unwrap() else {
            panic!("wrong command")
        };
        assert_eq!(mac, Some(MacAddr([2, 0, 0, 0, 0, 9])));
        assert_eq!(weight, 5);
        // Without --weight, a configured backend's default.
        let Top::Backend(BackendCmd::Add { weight, .. }) =
            parse(&["backend", "add", "web", "b9", "--addr", "10.0.0.9"]).unwrap()
        else {
            panic!("wrong command")
        };
        assert_eq!(weight, 100);
        let Top::Stats(s) = parse(&["stats", "--watch", "--server", "10.0.0.1:7000"]).unwrap()
        else {
            panic!("wrong command")
        };
        assert!(s.watch);
        assert_eq!(s.conn.server, Some("10.0.0.1:7000".parse().unwrap()));
        // A watch refreshed faster than 100ms is refused before it asks.
        let Top::Stats(s) = parse(&[
            "stats",
            "--watch",
            "--interval",
            "10ms",
            "--server",
            "127.0.0.1:9",
            "--key",
            "000102030405060708090a0b0c0d0e0f",
        ])
        .unwrap() else {
            panic!("wrong command")
        };
        let e = run_stats(&s).unwrap_err();
        assert!(e.contains("--interval 10ms: at least 100ms"), "{e}");
    }

    #[test]
    fn value_parsers() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("0").is_ok());
        assert!(parse_affinity_duration("0").is_err());
        assert!(parse_affinity_duration("0s").is_err());
        assert_eq!(
            parse_affinity_duration("250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert!(parse_duration("99999999999999999999d").is_err());
        assert_eq!(parse_ports("any").unwrap(), PortMatch::Any);
        assert_eq!(parse_ports("443").unwrap(), PortMatch::One(443));
        assert!(parse_ports("9-1").is_err());
        assert!(parse_ports("70000").is_err());
        assert_eq!(parse_proto("UDP").unwrap(), PROTO_UDP);
        assert!(parse_proto("sctp").is_err());
    }

    #[test]
    fn tables_render() {
        let t = render_table(&["A", "LONGER"], &[vec!["xxxx".into(), "y".into()]]);
        assert_eq!(t, "A     LONGER\nxxxx  y\n");
        let mut drained = BackendEntry::new(
            "web",
            "b1",
            "10.0.0.1".parse().unwrap(),
            Some([2, 0, 0, 0, 0, 1]),
            0,
        );
        drained.state = crate::types::BackendState::Draining;
        let b = render_backends(&[drained]);
        assert!(
            b.contains("02:00:00:00:00:01") && b.contains("draining"),
            "{b}"
        );
        assert_eq!(
            [
                fmt_secs(42),
                fmt_secs(303),
                fmt_secs(7800),
                fmt_secs(273_600)
            ],
            ["42s", "5m3s", "2h10m", "3d4h"]
        );
        let mut r = Reply::new(1, 0, ReturnCode::Conflict);
        r.owner = Some("web2".into());
        r.remaining_secs = 30;
        let e = render_reply("create", &r).unwrap_err();
        assert_eq!(e, "CONFLICT: create, owned by web2, 30 s remaining");
        r.remaining_secs = u32::MAX;
        let e = render_reply("create", &r).unwrap_err();
        assert_eq!(e, "CONFLICT: create, owned by web2, static");
        assert!(render_reply("x", &Reply::new(1, 0, ReturnCode::Ok)).is_ok());
        let mut r = Reply::new(1, 0, ReturnCode::Unavailable);
        r.message = "the shared affinity table (etcd) cannot be reached".into();
        assert_eq!(
            render_reply("create", &r).unwrap_err(),
            "UNAVAILABLE: create (the shared affinity table (etcd) cannot be reached)"
        );
    }

    /// An HTTP server answering one request with `status`.
    fn answer_once(status: &str) -> SocketAddr {
        use std::io::Read as _;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let status = status.to_string();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            // The whole request head, then the answer.
            let mut head = Vec::new();
            let mut buf = [0u8; 512];
            while !head.ends_with(b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
        });
        addr
    }

    /// `--timeout` bounds the whole status call: an instance that accepts
    /// and then answers a byte at a time, each well within the timeout,
    /// is given up on, not waited for read after read.
    #[test]
    fn status_gives_up_on_a_dribbled_answer_at_its_timeout() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            // Until the client hangs up: the answer never ends.
            let answer = b"HTTP/1.1 200 OK\r\n"
                .iter()
                .chain(std::iter::repeat(&b'x'));
            for b in answer {
                if s.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let timeout = Duration::from_millis(300);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(run_status(&StatusArgs {
                metrics: Some(addr),
                config: None,
                timeout,
            }));
        });
        // A generous bound: that it returns, not how soon.
        let got = rx
            .recv_timeout(timeout * 10)
            .expect("status still reading long after its timeout");
        let e = got.unwrap_err();
        assert!(e.contains("cannot ask") && e.contains("timed out"), "{e}");
    }

    #[test]
    fn status_reads_the_readiness_answer() {
        let args = |metrics| StatusArgs {
            metrics: Some(metrics),
            config: None,
            timeout: Duration::from_secs(2),
        };
        assert_eq!(run_status(&args(answer_once("200 OK"))), Ok(true));
        assert_eq!(
            run_status(&args(answer_once("503 Service Unavailable"))),
            Ok(false)
        );
        let e = run_status(&args(answer_once("404 Not Found"))).unwrap_err();
        assert!(e.contains("HTTP 404"), "{e}");
        // Nobody listening.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = run_status(&args(closed)).unwrap_err();
        assert!(e.contains("cannot ask"), "{e}");
        let none = StatusArgs {
            metrics: None,
            config: None,
            timeout: Duration::from_secs(1),
        };
        assert!(run_status(&none).is_err());
    }
}
