//! The control thread's end of the protocol: receives datagrams, refuses
//! everything not authentic and fresh (counting why), hands requests to a
//! [`ControlHandler`] and sends signed replies.
//!
//! The server knows nothing of services or affinities; the handler does. The
//! pipeline per datagram is: size, source network, header, version, sender
//! key, HMAC, timestamp and nonce, the sender's request rate, body, then
//! the handler. A refused datagram never reaches the handler, so it cannot
//! change any state.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime};

use crate::cluster::Ticket;
use crate::config::Config;
use crate::control::counters::ServerCounters;
use crate::control::handler::{Call, ControlHandler, Payload, Response};
use crate::protocol::auth::{
    unix_ms, Allowlist, Key, Keyring, NonceSource, ReplayError, ReplayGuard, TAG_LEN,
};
use crate::protocol::message::{
    encode_ended, encode_reply, DecodeError, EndedNotice, Envelope, Header, MsgType, Reply,
    ReplyPayload, Request, ReturnCode, Writer, ADMIN_NAME, FIXED_HEADER_LEN, MAX_DATAGRAM,
};
use crate::protocol::rate_limit::{RateLimiter, RateLimits};
use crate::types::MAX_NAME_LEN;

/// Clock skew accepted by a server built without a configuration (tests);
/// `[control] max_clock_skew` sets the running one.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(10);
/// (sender, nonce) pairs remembered at most: a bound on memory, not on
/// safety (a full [`ReplayGuard`] forgets its oldest pairs early and
/// refuses their senders' requests stamped at or before them).
pub const DEFAULT_REPLAY_CAPACITY: usize = 2_000_000;
/// How long the key of a name a reload removed still signs the notices of
/// its affinities that end afterwards (in cluster mode a removed backend's
/// end once the store's delete commits).
pub const RETIRED_KEY_TIME: Duration = Duration::from_secs(60);
/// Datagrams handled per [`ControlServer::poll`] call at most.
pub const DEFAULT_MAX_PER_POLL: usize = 256;
/// Longest a poll keeps handling datagrams once the first arrived: the
/// control loop's tick (expiry, notices) comes at least this often, however
/// costly the requests (a list of a large table) or however many wait.
pub const MAX_POLL_TIME: Duration = Duration::from_millis(50);
/// Statistics snapshots kept for clients fetching them in chunks, the
/// oldest expiring first.
const STATS_SNAPSHOTS: usize = 8;
/// Of them, at most this many per sender name: a sender's newer snapshot
/// replaces its oldest, so that one asking again and again expires only
/// its own, while two clients of one name (two `pktdist stats` with the
/// admin key) each keep theirs.
const STATS_PER_SENDER: usize = 2;
/// Replies parked for the shared store by default (cluster mode): beyond
/// it, changes are answered UNAVAILABLE at once.
pub const DEFAULT_MAX_PARKED: usize = 16_384;

/// Who may talk to the server: the allowed source networks, the senders'
/// keys, and how many requests a second each may make.
#[derive(Clone, Debug)]
pub struct ServerAuth {
    pub allowed: Allowlist,
    pub keyring: Keyring,
    pub rates: RateLimits,
}

impl ServerAuth {
    /// The `[control]` section's allowed networks and keys.
    pub fn from_config(cfg: &Config) -> Result<ServerAuth, String> {
        let mut keyring = Keyring::new();
        for (name, key) in &cfg.control.keys {
            let key = Key::new(&key.0).map_err(|e| format!("[control.keys] {name}: {e}"))?;
            keyring
                .insert(name, key)
                .map_err(|e| format!("[control.keys] {name}: {e}"))?;
        }
        Ok(ServerAuth {
            allowed: Allowlist::new(cfg.control.allowed_networks.clone()),
            keyring,
            rates: cfg.control.rate_limits(),
        })
    }
}

/// How the server authenticates and paces itself.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub auth: ServerAuth,
    pub max_clock_skew: Duration,
    pub replay_capacity: usize,
    /// How long [`ControlServer::poll`] waits for a first datagram; `None` =
    /// never wait (a non-blocking socket).
    pub read_timeout: Option<Duration>,
    pub max_per_poll: usize,
    /// Most replies parked at once ([`Payload::Deferred`]).
    pub max_parked: usize,
}

impl ServerConfig {
    pub fn new(allowed: Allowlist, keyring: Keyring) -> ServerConfig {
        ServerConfig {
            auth: ServerAuth {
                allowed,
                keyring,
                rates: RateLimits::default(),
            },
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            replay_capacity: DEFAULT_REPLAY_CAPACITY,
            read_timeout: Some(Duration::from_millis(50)),
            max_per_poll: DEFAULT_MAX_PER_POLL,
            max_parked: DEFAULT_MAX_PARKED,
        }
    }

    /// The `[control]` section's keys, allowed networks and clock skew.
    pub fn from_config(cfg: &Config) -> Result<ServerConfig, String> {
        let auth = ServerAuth::from_config(cfg)?;
        let rates = auth.rates;
        let mut config = ServerConfig::new(auth.allowed, auth.keyring);
        config.auth.rates = rates;
        config.max_clock_skew = cfg.control.max_clock_skew.0;
        Ok(config)
    }
}

/// What a deferred reply needs to be signed and sent later.
struct Parked {
    source: SocketAddr,
    sender: String,
    msg_type: u8,
    request_id: u32,
    nonce: u64,
}

struct StatsSnapshot {
    token: u32,
    /// The sender that asked for it ([`STATS_PER_SENDER`]).
    requester: String,
    json: String,
}

/// The UDP control endpoint.
pub struct ControlServer {
    socket: UdpSocket,
    allowed: Allowlist,
    keyring: Keyring,
    /// Keys a reload removed, with when: they sign notices only, for
    /// [`RETIRED_KEY_TIME`], and authenticate nothing.
    retired: HashMap<String, (Key, Instant)>,
    replay: ReplayGuard,
    /// Requests per second per authenticated sender.
    rates: RateLimiter,
    read_timeout: Option<Duration>,
    max_per_poll: usize,
    counters: ServerCounters,
    /// Time from a datagram's arrival to its reply being sent (ns).
    latency: hdrhistogram::Histogram<u64>,
    rx: Vec<u8>,
    tx: Vec<u8>,
    stats: VecDeque<StatsSnapshot>,
    next_token: u32,
    next_notice_id: u32,
    nonces: NonceSource,
    /// Clock of the datagram being processed (stamped on its reply).
    now_ms: u64,
    /// Replies the handler deferred, by ticket.
    parked: HashMap<Ticket, Parked>,
    max_parked: usize,
}

/// Where a datagram stopped in the pipeline.
enum Verdict {
    /// Refused without a reply.
    Drop,
    /// Answered: the reply is in `tx[..len]`.
    Reply(usize),
}

impl ControlServer {
    /// Binds `addr` (port 0 for an ephemeral one).
    pub fn bind(addr: SocketAddr, config: ServerConfig) -> io::Result<ControlServer> {
        ControlServer::from_socket(UdpSocket::bind(addr)?, config)
    }

    /// Uses an already bound socket.
    pub fn from_socket(socket: UdpSocket, config: ServerConfig) -> io::Result<ControlServer> {
        // A reply must never hold the control thread up: a send that finds
        // the socket buffer full gives up quickly and is counted.
        socket.set_write_timeout(Some(Duration::from_millis(5)))?;
        match config.read_timeout {
            Some(t) if !t.is_zero() => {
                socket.set_nonblocking(false)?;
                socket.set_read_timeout(Some(t))?;
            }
            _ => socket.set_nonblocking(true)?,
        }
        let mut rates = RateLimiter::new(config.auth.rates, ADMIN_NAME);
        rates.set_senders(config.auth.keyring.names(), 0);
        Ok(ControlServer {
            socket,
            allowed: config.auth.allowed,
            keyring: config.auth.keyring,
            retired: HashMap::new(),
            replay: ReplayGuard::new(config.max_clock_skew, config.replay_capacity),
            rates,
            read_timeout: config.read_timeout.filter(|t| !t.is_zero()),
            max_per_poll: config.max_per_poll.max(1),
            counters: ServerCounters::default(),
            latency: crate::datapath::latency::new_histogram(),
            rx: vec![0; MAX_DATAGRAM + 1],
            tx: vec![0; MAX_DATAGRAM],
            stats: VecDeque::with_capacity(STATS_SNAPSHOTS),
            next_token: 1,
            next_notice_id: 1,
            nonces: NonceSource::new(),
            now_ms: 0,
            parked: HashMap::new(),
            max_parked: config.max_parked,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    pub fn counters(&self) -> &ServerCounters {
        &self.counters
    }

    /// Handling time of each datagram received (decode, authentication,
    /// handler, reply), in nanoseconds.
    pub fn latency(&self) -> &hdrhistogram::Histogram<u64> {
        &self.latency
    }

    /// The senders' request rates and how many of each were refused.
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.rates
    }

    /// Replaces the allowed networks, keys and request rates
    /// (configuration reload). Senders keep the tokens they hold, up to
    /// their new rate; the buckets of names without a key are dropped.
    pub fn set_auth(&mut self, auth: ServerAuth) {
        let now = Instant::now();
        self.retired.retain(|name, (_, at)| {
            auth.keyring.get(name).is_none() && now - *at < RETIRED_KEY_TIME
        });
        for name in self.keyring.names() {
            if auth.keyring.get(name).is_none() {
                if let Some(key) = self.keyring.get(name) {
                    self.retired.insert(name.to_string(), (key.clone(), now));
                }
            }
        }
        self.allowed = auth.allowed;
        self.keyring = auth.keyring;
        self.rates.set_limits(auth.rates, self.now_ms);
        self.rates.set_senders(self.keyring.names(), self.now_ms);
    }

    /// Handles the datagrams waiting on the socket, at most `max_per_poll` of
    /// them and for at most [`MAX_POLL_TIME`] after the first, waiting up
    /// to `read_timeout` for the first. Returns how many were received.
    /// `now` is the wall clock at the call; the time spent waiting is added
    /// to it.
    pub fn poll(&mut self, handler: &mut impl ControlHandler, now: SystemTime) -> usize {
        let started = Instant::now();
        let base_ms = unix_ms(now);
        let mut count = 0;
        let mut switched = false;
        let mut first: Option<Instant> = None;
        while count < self.max_per_poll && first.is_none_or(|t| t.elapsed() < MAX_POLL_TIME) {
            let (len, source) = match self.socket.recv_from(&mut self.rx) {
                Ok(r) => r,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    break
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    // ICMP-induced errors and the like: count and carry on
                    // at the next poll rather than spin here.
                    self.counters.recv_errors += 1;
                    break;
                }
            };
            count += 1;
            first.get_or_insert_with(Instant::now);
            if self.read_timeout.is_some() && !switched {
                // Drain the rest without waiting again.
                switched = self.socket.set_nonblocking(true).is_ok();
            }
            let now_ms = base_ms + u64::try_from(started.elapsed().as_millis()).unwrap_or(0);
            let rx = std::mem::take(&mut self.rx);
            let t0 = Instant::now();
            let verdict = self.process_inner(&rx[..len], source, handler, now_ms);
            self.rx = rx;
            if let Verdict::Reply(n) = verdict {
                self.send_tx(n, source, false);
            }
            let _ = self.latency.record((t0.elapsed().as_nanos() as u64).max(1));
        }
        if switched && self.socket.set_nonblocking(false).is_err() {
            self.counters.recv_errors += 1;
        }
        count
    }

    /// Runs one datagram through the pipeline without a socket; returns the
    /// reply to send, if any: what [`poll`](Self::poll) does per datagram.
    #[cfg(test)]
    pub(crate) fn process(
        &mut self,
        datagram: &[u8],
        source: SocketAddr,
        handler: &mut impl ControlHandler,
        now_ms: u64,
    ) -> Option<&[u8]> {
        match self.process_inner(datagram, source, handler, now_ms) {
            Verdict::Drop => None,
            Verdict::Reply(n) => Some(&self.tx[..n]),
        }
    }

    /// Sends a signed AFFINITY_ENDED to `notify`, signed with the key of
    /// `key_name` (the affinity's owner; a key a reload removed serves for
    /// [`RETIRED_KEY_TIME`]) and carrying that name.
    pub fn send_ended(
        &mut self,
        notify: SocketAddr,
        key_name: &str,
        ended: &EndedNotice,
    ) -> io::Result<()> {
        let retired = self
            .retired
            .get(key_name)
            .filter(|(_, at)| at.elapsed() < RETIRED_KEY_TIME)
            .map(|(k, _)| k);
        let key = self.keyring.get(key_name).or(retired).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no key for `{key_name}`"))
        })?;
        let header = Header {
            msg_type: MsgType::AffinityEnded as u8,
            request_id: self.next_notice_id,
            timestamp_ms: unix_ms(SystemTime::now()),
            nonce: self.nonces.next(),
            name: key_name,
        };
        self.next_notice_id = self.next_notice_id.wrapping_add(1);
        let n = encode_ended(&mut self.tx, &header, key, ended)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        if self.send_tx(n, notify, true) {
            Ok(())
        } else {
            Err(io::Error::other("sending the ended notification failed"))
        }
    }

    /// Replies parked, waiting for [`reply_later`](Self::reply_later).
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// The tickets of the replies parked, in no particular order.
    pub fn parked_tickets(&self) -> Vec<Ticket> {
        self.parked.keys().copied().collect()
    }

    /// Signs and sends the reply the handler deferred under `ticket`
    /// (stamped `now_ms`, Unix ms); false if no reply waits under it or its
    /// sender's key is gone (a reload removed it).
    pub fn reply_later(&mut self, ticket: Ticket, resp: Response, now_ms: u64) -> bool {
        let Some(p) = self.parked.remove(&ticket) else {
            return false;
        };
        self.now_ms = now_ms;
        self.counters.count_answer(resp.code);
        let header = Header {
            msg_type: p.msg_type,
            request_id: p.request_id,
            timestamp_ms: now_ms,
            nonce: p.nonce,
            name: &p.sender,
        };
        let reply = Reply {
            remaining_secs: resp.remaining_secs,
            owner: resp.owner,
            message: resp.message,
            ..Reply::new(p.msg_type, p.nonce, resp.code)
        };
        match self.reply(&header, reply) {
            Verdict::Reply(n) => self.send_tx(n, p.source, false),
            Verdict::Drop => false,
        }
    }

    fn send_tx(&mut self, n: usize, to: SocketAddr, notice: bool) -> bool {
        match self.socket.send_to(&self.tx[..n], to) {
            Ok(_) => {
                if notice {
                    self.counters.notices_sent += 1;
                } else {
                    self.counters.replies_sent += 1;
                }
                true
            }
            Err(_) => {
                self.counters.send_errors += 1;
                false
            }
        }
    }

    fn process_inner(
        &mut self,
        datagram: &[u8],
        source: SocketAddr,
        handler: &mut impl ControlHandler,
        now_ms: u64,
    ) -> Verdict {
        self.now_ms = now_ms;
        let refused = &mut self.counters.refused;
        self.counters.received += 1;
        if datagram.len() > MAX_DATAGRAM {
            refused.oversize += 1;
            return Verdict::Drop;
        }
        if !self.allowed.contains(source.ip()) {
            refused.foreign_source += 1;
            return Verdict::Drop;
        }
        let env = match Envelope::open(datagram) {
            Ok(env) => env,
            Err(DecodeError::BadVersion(_)) => {
                refused.bad_version += 1;
                return Verdict::Drop;
            }
            Err(_) => {
                refused.malformed += 1;
                return Verdict::Drop;
            }
        };
        let header = env.header;
        let ty = MsgType::from_u8(header.msg_type);
        if matches!(ty, Some(t) if !t.is_request()) {
            // Never answer a reply or a notification: no loops.
            refused.unexpected_type += 1;
            return Verdict::Drop;
        }
        let Some(key) = self.keyring.get(header.name) else {
            refused.unknown_sender += 1;
            return Verdict::Drop;
        };
        if !env.verify(key) {
            refused.bad_hmac += 1;
            return Verdict::Drop;
        }
        match self
            .replay
            .check(header.name, header.nonce, header.timestamp_ms, now_ms)
        {
            Ok(()) => {}
            Err(ReplayError::Stale) => {
                refused.stale_timestamp += 1;
                return Verdict::Drop;
            }
            Err(ReplayError::Replay) => {
                refused.replay += 1;
                return Verdict::Drop;
            }
            Err(ReplayError::Forgotten) => {
                refused.replay_forgotten += 1;
                return Verdict::Drop;
            }
        }
        // From here the sender is authenticated: every outcome is answered.
        let sender = header.name;
        let is_admin = sender == ADMIN_NAME;
        // Only an authentic, fresh request spends its sender's tokens: a
        // forged or replayed one cannot drain a real sender's bucket.
        if !self.rates.allow(sender, now_ms) {
            refused.rate_limited += 1;
            let limits = self.rates.limits();
            let rate = if is_admin {
                limits.admin
            } else {
                limits.per_sender
            };
            let reply = Reply {
                message: Cow::Owned(format!(
                    "more than {rate} requests per second from {sender}; nothing was done, \
                     retry later"
                )),
                ..Reply::new(header.msg_type, header.nonce, ReturnCode::RateLimited)
            };
            return self.reply(&header, reply);
        }
        let Some(ty) = ty else {
            refused.unsupported_type += 1;
            let reply = Reply {
                message: Cow::Borrowed("unknown message type"),
                ..Reply::new(header.msg_type, header.nonce, ReturnCode::Unsupported)
            };
            return self.reply(&header, reply);
        };
        let mut request = match Request::decode_body(ty, env.body) {
            Ok(r) => r,
            Err(e) => {
                refused.invalid_body += 1;
                let reply = Reply {
                    message: Cow::Owned(e.to_string()),
                    ..Reply::new(header.msg_type, header.nonce, ReturnCode::Invalid)
                };
                return self.reply(&header, reply);
            }
        };
        match &mut request {
            Request::AffinityCreate(op)
            | Request::AffinityExtend(op)
            | Request::AffinityCancel(op) => {
                if let Some(owner) = op.owner {
                    if !is_admin && owner != sender {
                        refused.owner_mismatch += 1;
                        let reply = Reply {
                            message: Cow::Borrowed(
                                "a backend may request affinities only for itself",
                            ),
                            ..Reply::new(header.msg_type, header.nonce, ReturnCode::NotAuthorized)
                        };
                        return self.reply(&header, reply);
                    }
                }
                // A backend always acts for itself; the operator names the
                // owner it acts for (or, to cancel, may name none).
                if !is_admin {
                    op.owner = Some(sender);
                }
                op.notify = Some(op.notify.unwrap_or(source));
            }
            Request::BackendState { backend, .. } => {
                if backend.is_some_and(|b| !is_admin && b != sender) {
                    refused.owner_mismatch += 1;
                    let reply = Reply {
                        message: Cow::Borrowed("a backend may declare only its own state"),
                        ..Reply::new(header.msg_type, header.nonce, ReturnCode::NotAuthorized)
                    };
                    return self.reply(&header, reply);
                }
                // A backend always speaks for itself.
                if !is_admin {
                    *backend = Some(sender);
                }
            }
            Request::AffinityList { limit, .. } => {
                *limit = fit_limit(*limit, header.name.len(), AFFINITY_ENTRY_TYPICAL);
            }
            Request::BackendList { limit, .. } => {
                *limit = fit_limit(*limit, header.name.len(), BACKEND_ENTRY_TYPICAL);
            }
            Request::Stats { token, offset } if *token != 0 || *offset != 0 => {
                let reply = self.stats_chunk(&header, *token, *offset);
                return self.reply(&header, reply);
            }
            _ => {}
        }
        self.counters.dispatched += 1;
        let call = Call {
            sender,
            is_admin,
            source,
            now_ms,
            server: &self.counters,
            server_latency: &self.latency,
            server_rates: &self.rates,
            may_defer: self.parked.len() < self.max_parked,
        };
        let response = handler.handle(&call, &request);
        if let Payload::Deferred(ticket) = response.payload {
            self.parked.insert(
                ticket,
                Parked {
                    source,
                    sender: sender.to_string(),
                    msg_type: header.msg_type,
                    request_id: header.request_id,
                    nonce: header.nonce,
                },
            );
            return Verdict::Drop;
        }
        self.counters.count_answer(response.code);
        let reply = self.reply_from(&header, &request, response);
        self.reply(&header, reply)
    }

    /// Turns a handler's response into the reply body: lists become pages,
    /// stats become a snapshot and its first chunk.
    fn reply_from(&mut self, header: &Header<'_>, request: &Request<'_>, resp: Response) -> Reply {
        let mut reply = Reply {
            remaining_secs: resp.remaining_secs,
            owner: resp.owner,
            message: resp.message,
            ..Reply::new(header.msg_type, header.nonce, resp.code)
        };
        let offset = match request {
            Request::AffinityList { offset, .. } | Request::BackendList { offset, .. } => *offset,
            _ => 0,
        };
        match resp.payload {
            Payload::None => {}
            Payload::Affinities { entries, more } => {
                reply.more = more;
                reply.payload = ReplyPayload::Affinities {
                    next_offset: offset,
                    entries,
                };
            }
            Payload::Backends { entries, more } => {
                reply.more = more;
                reply.payload = ReplyPayload::Backends {
                    next_offset: offset,
                    entries,
                };
            }
            // A deferred answer is parked before it gets here.
            Payload::Deferred(_) => {}
            Payload::Stats(json) => {
                let token = self.next_token;
                self.next_token = self.next_token.wrapping_add(1).max(1);
                let own = self.stats.iter().filter(|s| s.requester == header.name);
                if own.count() >= STATS_PER_SENDER {
                    // Its oldest: the first of its name in the queue.
                    if let Some(i) = self.stats.iter().position(|s| s.requester == header.name) {
                        self.stats.remove(i);
                    }
                }
                if self.stats.len() == STATS_SNAPSHOTS {
                    self.stats.pop_front();
                }
                self.stats.push_back(StatsSnapshot {
                    token,
                    requester: header.name.to_string(),
                    json,
                });
                return self.stats_chunk(header, token, 0);
            }
        }
        reply
    }

    /// A chunk of a stored statistics snapshot, sized to fit one datagram.
    fn stats_chunk(&mut self, header: &Header<'_>, token: u32, offset: u32) -> Reply {
        let base = Reply::new(header.msg_type, header.nonce, ReturnCode::Ok);
        let Some(snap) = self.stats.iter().find(|s| s.token == token) else {
            return Reply {
                code: ReturnCode::NotFound,
                message: Cow::Borrowed("statistics snapshot expired; start again at offset 0"),
                ..base
            };
        };
        let total = snap.json.len();
        let start = offset as usize;
        if start > total {
            return Reply {
                code: ReturnCode::Invalid,
                message: Cow::Borrowed("offset beyond the statistics document"),
                ..base
            };
        }
        // Room left after header, name, reply fields and tag.
        let room = MAX_DATAGRAM
            - TAG_LEN
            - FIXED_HEADER_LEN
            - header.name.len()
            - REPLY_FIXED_LEN
            - STATS_PAYLOAD_FIXED_LEN;
        let end = total.min(start + room);
        self.counters.stats_chunks += 1;
        Reply {
            more: end < total,
            payload: ReplyPayload::Stats {
                token,
                total_len: total as u32,
                offset,
                chunk: snap.json.as_bytes()[start..end].to_vec(),
            },
            ..base
        }
    }

    /// Encodes and signs `reply` into `tx`; a list that does not fit is cut
    /// to a page (with `more` set), anything else that does not fit becomes
    /// INTERNAL.
    fn reply(&mut self, header: &Header<'_>, mut reply: Reply) -> Verdict {
        let Some(key) = self.keyring.get(header.name) else {
            return Verdict::Drop;
        };
        let out = Header {
            msg_type: MsgType::Reply as u8,
            request_id: header.request_id,
            timestamp_ms: self.now_ms,
            nonce: self.nonces.next(),
            name: header.name,
        };
        fit_page(&mut reply, header.name.len());
        match encode_reply(&mut self.tx, &out, key, &reply) {
            Ok(n) => Verdict::Reply(n),
            Err(e) => {
                let fallback = Reply {
                    message: Cow::Owned(format!("reply could not be encoded: {e}")),
                    ..Reply::new(
                        reply.request_type,
                        reply.request_nonce,
                        ReturnCode::Internal,
                    )
                };
                match encode_reply(&mut self.tx, &out, key, &fallback) {
                    Ok(n) => Verdict::Reply(n),
                    Err(_) => Verdict::Drop,
                }
            }
        }
    }
}

/// Reply body bytes besides owner, message and payload entries: request
/// type 1, nonce 8, code 1, flags 1, remaining 4, owner length 1, message
/// length 2, payload kind 1.
const REPLY_FIXED_LEN: usize = 19;
/// List payload header: next offset 4, count 2.
const LIST_PAYLOAD_FIXED_LEN: usize = 6;
/// Stats payload header: token 4, total 4, offset 4, chunk length 2.
const STATS_PAYLOAD_FIXED_LEN: usize = 14;
/// Typical encoded sizes, used to ask the handler for about one page.
const AFFINITY_ENTRY_TYPICAL: usize = 50;
const BACKEND_ENTRY_TYPICAL: usize = 52;

fn fit_limit(requested: u16, name_len: usize, typical: usize) -> u16 {
    let room = MAX_DATAGRAM
        - TAG_LEN
        - FIXED_HEADER_LEN
        - name_len.min(MAX_NAME_LEN)
        - REPLY_FIXED_LEN
        - LIST_PAYLOAD_FIXED_LEN;
    let fit = (room / typical).max(1) as u16;
    if requested == 0 {
        fit
    } else {
        requested.min(fit)
    }
}

/// Cuts a list reply to the entries that fit one datagram, fixing `more`
/// and `next_offset` (which arrives holding the request's offset).
fn fit_page(reply: &mut Reply, name_len: usize) {
    let room =
        (MAX_DATAGRAM - TAG_LEN - FIXED_HEADER_LEN - REPLY_FIXED_LEN - LIST_PAYLOAD_FIXED_LEN)
            .saturating_sub(name_len)
            .saturating_sub(reply.owner.as_ref().map_or(0, |o| o.len()))
            .saturating_sub(
                reply
                    .message
                    .len()
                    .min(crate::protocol::message::MAX_TEXT_LEN),
            );
    match &mut reply.payload {
        ReplyPayload::Affinities {
            next_offset,
            entries,
        } => cut_page(entries, next_offset, &mut reply.more, room, |e, w| {
            e.encode(w)
        }),
        ReplyPayload::Backends {
            next_offset,
            entries,
        } => cut_page(entries, next_offset, &mut reply.more, room, |e, w| {
            e.encode(w)
        }),
        _ => {}
    }
}

/// One list page cut to the entries that encode within `room` bytes, setting
/// `more` if any were cut and advancing `next_offset` past those kept.
fn cut_page<T>(
    entries: &mut Vec<T>,
    next_offset: &mut u32,
    more: &mut bool,
    room: usize,
    enc: impl Fn(&T, &mut Writer<'_>) -> Result<(), crate::protocol::message::EncodeError>,
) {
    let fit = count_fitting(entries, room, enc);
    if fit < entries.len() {
        entries.truncate(fit);
        *more = true;
    }
    *next_offset = next_offset.saturating_add(entries.len() as u32);
}

/// How many leading entries encode within `room` bytes.
fn count_fitting<T>(
    entries: &[T],
    room: usize,
    enc: impl Fn(&T, &mut Writer<'_>) -> Result<(), crate::protocol::message::EncodeError>,
) -> usize {
    let mut scratch = [0u8; MAX_DATAGRAM];
    let mut w = Writer::new(&mut scratch[..room.min(MAX_DATAGRAM)]);
    let mut n = 0;
    for e in entries {
        if enc(e, &mut w).is_err() {
            break;
        }
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::auth::Key;
    use crate::protocol::message::{encode_request, AffinityEntry, AffinityOp, MIN_DATAGRAM};
    use crate::protocol::testing::{akey, keyring, ADMIN_KEY, NOW, WEB1_KEY, WEB2_KEY};
    use crate::types::PortMatch;
    use proptest::prelude::*;

    fn key_of(name: &str) -> Key {
        match name {
            "web1" => Key::new(WEB1_KEY).unwrap(),
            "web2" => Key::new(WEB2_KEY).unwrap(),
            _ => Key::new(ADMIN_KEY).unwrap(),
        }
    }

    fn server() -> ControlServer {
        server_with(ServerConfig {
            read_timeout: None,
            ..ServerConfig::new(Allowlist::parse(&["10.0.0.0/8", "::1"]).unwrap(), keyring())
        })
    }

    fn server_with(config: ServerConfig) -> ControlServer {
        ControlServer::bind("127.0.0.1:0".parse().unwrap(), config).unwrap()
    }

    /// Records every call; answers with `next` (or OK).
    #[derive(Default)]
    struct Recorder {
        pub calls: Vec<(String, bool, SocketAddr, String)>,
        pub next: Option<Response>,
    }

    impl ControlHandler for Recorder {
        fn handle(&mut self, call: &Call<'_>, request: &Request<'_>) -> Response {
            self.calls.push((
                call.sender.into(),
                call.is_admin,
                call.source,
                format!("{request:?}"),
            ));
            self.next.take().unwrap_or_else(Response::ok)
        }
    }

    fn src() -> SocketAddr {
        "10.1.2.3:5555".parse().unwrap()
    }

    fn create(owner: Option<&str>) -> Request<'_> {
        Request::AffinityCreate(AffinityOp {
            key: akey(),
            duration_secs: 60,
            owner,
            notify: None,
        })
    }

    fn datagram(name: &str, ts: u64, nonce: u64, req: &Request<'_>) -> Vec<u8> {
        let mut buf = [0u8; MAX_DATAGRAM];
        let h = Header {
            msg_type: 0,
            request_id: 77,
            timestamp_ms: ts,
            nonce,
            name,
        };
        let n = encode_request(&mut buf, &h, &key_of(name), req).unwrap();
        buf[..n].to_vec()
    }

    fn open_reply(bytes: &[u8], name: &str) -> (u32, Reply) {
        let env = Envelope::open(bytes).unwrap();
        assert_eq!(env.header.msg_type, MsgType::Reply as u8);
        assert_eq!(env.header.name, name);
        assert!(
            env.verify(&key_of(name)),
            "reply signed with the requester's key"
        );
        (env.header.request_id, Reply::decode_body(env.body).unwrap())
    }

    /// Defers every request it may (tickets 1, 2, ...), else answers
    /// UNAVAILABLE as a cluster instance does.
    #[derive(Default)]
    struct Deferring {
        next: Ticket,
    }

    impl ControlHandler for Deferring {
        fn handle(&mut self, call: &Call<'_>, _: &Request<'_>) -> Response {
            if !call.may_defer {
                return Response::unavailable("no room");
            }
            self.next += 1;
            Response::deferred(self.next)
        }
    }

    #[test]
    fn deferred_replies_are_parked_bounded_and_sent_later() {
        let mut s = server_with(ServerConfig {
            read_timeout: None,
            max_parked: 2,
            ..ServerConfig::new(Allowlist::parse(&["127.0.0.0/8"]).unwrap(), keyring())
        });
        let to = s.local_addr().unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let now = unix_ms(SystemTime::now());
        for nonce in 1..=3 {
            client
                .send_to(&datagram("web1", now, nonce, &create(None)), to)
                .unwrap();
        }
        let mut h = Deferring::default();
        let mut got = 0;
        while got < 3 {
            got += s.poll(&mut h, SystemTime::now());
        }
        assert_eq!(s.parked(), 2);
        // The third found no room: UNAVAILABLE at once.
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = client.recv(&mut buf).unwrap();
        let (_, r) = open_reply(&buf[..n], "web1");
        assert_eq!((r.code, r.request_nonce), (ReturnCode::Unavailable, 3));

        // Ticket 2's answer, signed for its sender, echoing its nonce.
        let answer = Response::conflict("web2", 30);
        assert!(s.reply_later(2, answer, unix_ms(SystemTime::now())));
        let n = client.recv(&mut buf).unwrap();
        let (id, r) = open_reply(&buf[..n], "web1");
        assert_eq!((id, r.code, r.request_nonce), (77, ReturnCode::Conflict, 2));
        assert_eq!((r.owner.as_deref(), r.remaining_secs), (Some("web2"), 30));
        assert!(!s.reply_later(2, Response::ok(), 0), "sent once");
        assert_eq!((s.parked(), s.parked_tickets()), (1, vec![1]));
        assert_eq!(s.counters().handler_codes[ReturnCode::Conflict as usize], 1);
    }

    #[test]
    fn authentic_request_reaches_handler_with_defaults_filled() {
        let mut s = server();
        let mut h = Recorder::default();
        let d = datagram("web1", NOW - 3000, 1, &create(None));
        let out = s.process(&d, src(), &mut h, NOW).unwrap().to_vec();
        let (id, reply) = open_reply(&out, "web1");
        assert_eq!(id, 77);
        assert_eq!(reply.code, ReturnCode::Ok);
        assert_eq!(reply.request_nonce, 1);
        assert_eq!(reply.request_type, MsgType::AffinityCreate as u8);
        assert_eq!(h.calls.len(), 1);
        let (sender, admin, source, req) = &h.calls[0];
        assert_eq!((sender.as_str(), *admin, *source), ("web1", false, src()));
        assert!(req.contains("owner: Some(\"web1\")"), "{req}");
        assert!(req.contains("notify: Some(10.1.2.3:5555)"), "{req}");
        // Admin may act for another backend.
        let d = datagram("admin", NOW, 2, &create(Some("web2")));
        assert!(s.process(&d, src(), &mut h, NOW).is_some());
        assert_eq!(h.calls.len(), 2);
        assert!(h.calls[1].1);
        assert!(h.calls[1].3.contains("owner: Some(\"web2\")"));
        assert_eq!(s.counters().dispatched, 2);
        assert_eq!(s.counters().refused.total(), 0);
    }

    #[test]
    fn every_return_code_travels() {
        let mut s = server();
        let mut h = Recorder::default();
        for (i, code) in ReturnCode::ALL.into_iter().enumerate() {
            let mut resp = Response::new(code)
                .with_message(format!("because {i}"))
                .with_remaining(i as u32);
            if code == ReturnCode::Conflict {
                resp = Response::conflict("web2", 42).with_message("taken");
            }
            h.next = Some(resp.clone());
            let d = datagram("web1", NOW, 100 + i as u64, &create(None));
            let out = s.process(&d, src(), &mut h, NOW).unwrap().to_vec();
            let (_, reply) = open_reply(&out, "web1");
            assert_eq!(reply.code, code);
            assert_eq!(reply.message, resp.message);
            assert_eq!(reply.remaining_secs, resp.remaining_secs);
            assert_eq!(reply.owner, resp.owner);
        }
        assert_eq!(h.calls.len(), ReturnCode::ALL.len());
        assert_eq!(
            s.counters().handler_codes,
            [1; ReturnCode::ALL.len()],
            "each answer counted under its code"
        );
    }

    fn rate_limited_server(per_sender: u32, admin: u32) -> ControlServer {
        let mut config = ServerConfig {
            read_timeout: None,
            ..ServerConfig::new(Allowlist::parse(&["10.0.0.0/8"]).unwrap(), keyring())
        };
        config.auth.rates = RateLimits { per_sender, admin };
        server_with(config)
    }

    /// The code of the reply to one fresh request from `name` at `now`.
    fn code_of(
        s: &mut ControlServer,
        h: &mut Recorder,
        name: &str,
        nonce: u64,
        now: u64,
    ) -> ReturnCode {
        let d = datagram(name, now, nonce, &create(None));
        let out = s.process(&d, src(), h, now).expect("answered").to_vec();
        open_reply(&out, name).1.code
    }

    #[test]
    fn a_sender_beyond_its_rate_is_answered_rate_limited_then_recovers() {
        let mut s = rate_limited_server(5, 8);
        let mut h = Recorder::default();
        let codes: Vec<ReturnCode> = (0..6)
            .map(|i| code_of(&mut s, &mut h, "web1", 1000 + i, NOW))
            .collect();
        assert_eq!(&codes[..5], &[ReturnCode::Ok; 5], "exactly the rate");
        assert_eq!(codes[5], ReturnCode::RateLimited, "one over");
        assert_eq!(h.calls.len(), 5, "a limited request reaches no handler");
        let d = datagram("web1", NOW, 1999, &create(None));
        let out = s.process(&d, src(), &mut h, NOW).unwrap().to_vec();
        let (_, reply) = open_reply(&out, "web1");
        assert!(
            reply.message.contains("more than 5 requests per second"),
            "{}",
            reply.message
        );
        assert_eq!(s.counters().refused.rate_limited, 2);
        // Another backend and the admin have buckets of their own.
        assert_eq!(code_of(&mut s, &mut h, "web2", 2000, NOW), ReturnCode::Ok);
        let admin: Vec<ReturnCode> = (0..9)
            .map(|i| code_of(&mut s, &mut h, "admin", 3000 + i, NOW))
            .collect();
        assert_eq!(&admin[..8], &[ReturnCode::Ok; 8], "the admin's own rate");
        assert_eq!(admin[8], ReturnCode::RateLimited);
        // A fifth of a second gives web1 one request back; a second, all.
        assert_eq!(
            code_of(&mut s, &mut h, "web1", 4000, NOW + 200),
            ReturnCode::Ok
        );
        assert_eq!(
            code_of(&mut s, &mut h, "web1", 4001, NOW + 200),
            ReturnCode::RateLimited
        );
        let later: Vec<ReturnCode> = (0..5)
            .map(|i| code_of(&mut s, &mut h, "web1", 5000 + i, NOW + 1200))
            .collect();
        assert_eq!(later, [ReturnCode::Ok; 5], "recovered");
    }

    #[test]
    fn forged_and_replayed_requests_spend_no_tokens() {
        let mut s = rate_limited_server(2, 2);
        let mut h = Recorder::default();
        let good = datagram("web1", NOW, 1, &create(None));
        assert!(s.process(&good, src(), &mut h, NOW).is_some());
        // Replays of it, and forgeries under web1's name, many times over.
        let mut forged = datagram("web1", NOW, 2, &create(None));
        let last = forged.len() - 1;
        forged[last] ^= 1;
        for _ in 0..50 {
            assert!(s.process(&good, src(), &mut h, NOW).is_none());
            assert!(s.process(&forged, src(), &mut h, NOW).is_none());
        }
        assert_eq!(s.counters().refused.rate_limited, 0);
        // web1 still has its second token.
        assert_eq!(code_of(&mut s, &mut h, "web1", 3, NOW), ReturnCode::Ok);
        assert_eq!(
            code_of(&mut s, &mut h, "web1", 4, NOW),
            ReturnCode::RateLimited
        );
    }

    /// One backend floods (100,000 requests within one second, far beyond
    /// its rate) while another sends its few: every one of the other's is
    /// answered by the handler, and the flood gets through only at its rate.
    #[test]
    fn a_flood_from_one_sender_leaves_the_others_answered() {
        let mut s = rate_limited_server(1000, 1000);
        let mut h = Recorder::default();
        let mut flood_ok = 0;
        let mut other_ok = 0;
        for i in 0..100_000u64 {
            let now = NOW + i / 100;
            if code_of(&mut s, &mut h, "web1", i, now) == ReturnCode::Ok {
                flood_ok += 1;
            }
            if i % 1000 == 0 {
                assert_eq!(code_of(&mut s, &mut h, "web2", i, now), ReturnCode::Ok);
                other_ok += 1;
            }
        }
        assert_eq!(other_ok, 100);
        // The first second's 1000 tokens, plus the refill over 1 s.
        assert!((1000..=2001).contains(&flood_ok), "{flood_ok}");
        assert_eq!(s.counters().refused.rate_limited, 100_000 - flood_ok);
        assert_eq!(h.calls.len() as u64, flood_ok + other_ok);
    }

    /// A reload's new rates apply at once; buckets of removed names go.
    #[test]
    fn new_rates_apply_on_set_auth() {
        let mut s = rate_limited_server(1, 1);
        let mut h = Recorder::default();
        assert_eq!(code_of(&mut s, &mut h, "web1", 1, NOW), ReturnCode::Ok);
        assert_eq!(
            code_of(&mut s, &mut h, "web1", 2, NOW),
            ReturnCode::RateLimited
        );
        s.set_auth(ServerAuth {
            allowed: Allowlist::parse(&["10.0.0.0/8"]).unwrap(),
            keyring: keyring(),
            rates: RateLimits {
                per_sender: 0,
                admin: 1,
            },
        });
        for i in 0..100 {
            assert_eq!(code_of(&mut s, &mut h, "web1", 10 + i, NOW), ReturnCode::Ok);
        }
    }

    /// Runs `d` through a fresh-state check: not dispatched, no reply, and
    /// exactly one refusal counted under `reason`.
    fn assert_refused_silently(s: &mut ControlServer, d: &[u8], from: SocketAddr, reason: &str) {
        let mut h = Recorder::default();
        let before = s.counters().refused;
        assert!(
            s.process(d, from, &mut h, NOW).is_none(),
            "{reason}: no reply"
        );
        assert!(h.calls.is_empty(), "{reason}: handler not called");
        let after = s.counters().refused;
        for ((name, a), (_, b)) in after.as_array().iter().zip(before.as_array()) {
            let want = if *name == reason { b + 1 } else { b };
            assert_eq!(*a, want, "counter {name} while refusing {reason}");
        }
    }

    #[test]
    fn forged_and_broken_datagrams_are_refused_and_counted() {
        let mut s = server();
        let good = datagram("web1", NOW, 9, &create(None));

        assert_refused_silently(&mut s, &vec![0u8; MAX_DATAGRAM + 1], src(), "oversize");
        assert_refused_silently(
            &mut s,
            &good,
            "192.168.1.1:5555".parse().unwrap(),
            "foreign_source",
        );
        assert_refused_silently(
            &mut s,
            &good,
            "[::2]:5555".parse().unwrap(),
            "foreign_source",
        );
        assert_refused_silently(&mut s, b"", src(), "malformed");
        assert_refused_silently(&mut s, b"hello world", src(), "malformed");
        assert_refused_silently(&mut s, &good[..MIN_DATAGRAM - 1], src(), "malformed");
        let mut v = good.clone();
        v[2] = 2;
        assert_refused_silently(&mut s, &v, src(), "bad_version");
        let mut v = good.clone();
        v[4] = 0x80;
        assert_refused_silently(&mut s, &v, src(), "malformed");
        let mut v = good.clone();
        let last = v.len() - 1;
        v[last] ^= 1;
        assert_refused_silently(&mut s, &v, src(), "bad_hmac");
        let mut v = good.clone();
        v[40] ^= 0x10;
        assert_refused_silently(&mut s, &v, src(), "bad_hmac");
        // Signed with another backend's key under web1's name.
        let mut forged = good.clone();
        let n = forged.len() - TAG_LEN;
        let tag = key_of("web2").sign(&forged[..n]);
        forged[n..].copy_from_slice(&tag);
        assert_refused_silently(&mut s, &forged, src(), "bad_hmac");
        let stranger = {
            let mut buf = [0u8; MAX_DATAGRAM];
            let h = Header {
                msg_type: 0,
                request_id: 1,
                timestamp_ms: NOW,
                nonce: 1,
                name: "mallory",
            };
            let n = encode_request(&mut buf, &h, &key_of("web1"), &create(None)).unwrap();
            buf[..n].to_vec()
        };
        assert_refused_silently(&mut s, &stranger, src(), "unknown_sender");
        let stale = datagram("web1", NOW - 10_001, 10, &create(None));
        assert_refused_silently(&mut s, &stale, src(), "stale_timestamp");
        let future = datagram("web1", NOW + 10_001, 11, &create(None));
        assert_refused_silently(&mut s, &future, src(), "stale_timestamp");
        // A reply sent to the server is never answered.
        let mut buf = [0u8; MAX_DATAGRAM];
        let h = Header {
            msg_type: 0,
            request_id: 1,
            timestamp_ms: NOW,
            nonce: 12,
            name: "web1",
        };
        let n = crate::protocol::message::encode_reply(
            &mut buf,
            &h,
            &key_of("web1"),
            &Reply::new(1, 1, ReturnCode::Ok),
        )
        .unwrap();
        assert_refused_silently(&mut s, &buf[..n], src(), "unexpected_type");

        // The good one passes once, then is a replay.
        let mut h = Recorder::default();
        assert!(s.process(&good, src(), &mut h, NOW).is_some());
        assert_eq!(h.calls.len(), 1);
        assert_refused_silently(&mut s, &good, src(), "replay");
        assert_eq!(s.counters().dispatched, 1);
    }

    #[test]
    fn authentic_but_unacceptable_requests_get_an_answer_not_the_handler() {
        let mut s = server();
        let mut h = Recorder::default();
        // Body that does not decode: duration 0 on create.
        let mut d = datagram("web1", NOW, 1, &create(None));
        let at = FIXED_HEADER_LEN + 4 + 19;
        d[at..at + 4].copy_from_slice(&[0; 4]);
        let n = d.len() - TAG_LEN;
        let tag = key_of("web1").sign(&d[..n]);
        d[n..].copy_from_slice(&tag);
        let out = s.process(&d, src(), &mut h, NOW).unwrap().to_vec();
        let (_, r) = open_reply(&out, "web1");
        assert_eq!(r.code, ReturnCode::Invalid);
        assert!(r.message.contains("duration"), "{}", r.message);
        // Unknown message type.
        let mut d = datagram("web1", NOW, 2, &create(None));
        d[3] = 0x42;
        let n = d.len() - TAG_LEN;
        let tag = key_of("web1").sign(&d[..n]);
        d[n..].copy_from_slice(&tag);
        let out = s.process(&d, src(), &mut h, NOW).unwrap().to_vec();
        assert_eq!(open_reply(&out, "web1").1.code, ReturnCode::Unsupported);
        // A backend naming another owner.
        let d = datagram("web1", NOW, 3, &create(Some("web2")));
        let out = s.process(&d, src(), &mut h, NOW).unwrap().to_vec();
        assert_eq!(open_reply(&out, "web1").1.code, ReturnCode::NotAuthorized);
        assert!(h.calls.is_empty());
        let r = s.counters().refused;
        assert_eq!(
            (r.invalid_body, r.unsupported_type, r.owner_mismatch),
            (1, 1, 1)
        );
    }

    #[test]
    fn full_replay_memory_forgets_the_oldest_never_the_fresh() {
        let mut s = server_with(ServerConfig {
            replay_capacity: 2,
            read_timeout: None,
            ..ServerConfig::new(Allowlist::loopback(), keyring())
        });
        let mut h = Recorder::default();
        let lo: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let first = datagram("web1", NOW - 10, 0, &create(None));
        assert!(s.process(&first, lo, &mut h, NOW).is_some());
        for n in 1..4 {
            let d = datagram("web1", NOW + n, n, &create(None));
            assert!(
                s.process(&d, lo, &mut h, NOW).is_some(),
                "fresh request {n}"
            );
        }
        // The first was forgotten to make room: replaying it is refused.
        assert_refused_silently(&mut s, &first, lo, "replay_forgotten");
        assert_eq!(h.calls.len(), 4);
    }

    #[test]
    fn long_lists_are_paginated() {
        let mut s = server();
        let mut h = Recorder::default();
        let entries: Vec<AffinityEntry> = (0..100u16)
            .map(|i| AffinityEntry {
                key: akey().with_ports(PortMatch::One(i)),
                owner: format!("backend-with-a-long-name-{i:03}"),
                remaining_secs: u32::from(i),
                notify: Some("[2001:db8::1]:4000".parse().unwrap()),
            })
            .collect();
        let mut got = Vec::new();
        let mut offset = 0u32;
        for page in 0..100 {
            let req = Request::AffinityList {
                service: None,
                owner: None,
                offset,
                limit: 0,
            };
            let d = datagram("admin", NOW, 1000 + page, &req);
            let start = offset as usize;
            h.next = Some(Response::affinities(entries[start..].to_vec(), false));
            let out = s.process(&d, src(), &mut h, NOW).unwrap().to_vec();
            assert!(out.len() <= MAX_DATAGRAM);
            let (_, r) = open_reply(&out, "admin");
            let ReplyPayload::Affinities {
                next_offset,
                entries: page_entries,
            } = r.payload
            else {
                panic!("no list payload")
            };
            assert!(!page_entries.is_empty());
            assert_eq!(next_offset as usize, start + page_entries.len());
            got.extend(page_entries);
            if !r.more {
                break;
            }
            offset = next_offset;
        }
        assert_eq!(got, entries);
        // The limit passed to the handler is what fits.
        assert!(h.calls[0].3.contains("limit: "));
        assert!(!h.calls[0].3.contains("limit: 0"));
    }

    #[test]
    fn stats_are_chunked_from_one_snapshot() {
        let mut s = server();
        let mut h = Recorder::default();
        let json = format!("{{\"x\":\"{}\"}}", "é".repeat(2500));
        h.next = Some(Response::stats(json.clone()));
        let mut doc = Vec::new();
        let mut token = 0;
        for i in 0..20 {
            let req = Request::Stats {
                token,
                offset: doc.len() as u32,
            };
            let d = datagram("admin", NOW, 50 + i, &req);
            let out = s.process(&d, src(), &mut h, NOW).unwrap().to_vec();
            let (_, r) = open_reply(&out, "admin");
            let ReplyPayload::Stats {
                token: t,
                total_len,
                offset,
                chunk,
            } = r.payload
            else {
                panic!("no stats payload")
            };
            assert_eq!(offset as usize, doc.len());
            assert_eq!(total_len as usize, json.len());
            token = t;
            doc.extend(chunk);
            if !r.more {
                break;
            }
        }
        assert_eq!(String::from_utf8(doc).unwrap(), json);
        assert_eq!(h.calls.len(), 1, "the handler built one snapshot");
        let d = datagram(
            "admin",
            NOW,
            99,
            &Request::Stats {
                token: 999,
                offset: 5,
            },
        );
        let out = s.process(&d, src(), &mut h, NOW).unwrap().to_vec();
        assert_eq!(open_reply(&out, "admin").1.code, ReturnCode::NotFound);
    }

    /// A sender asking for new snapshots again and again replaces only its
    /// own: the one another sender is fetching stays, and so does the
    /// one a second client of the same name fetches.
    #[test]
    fn a_sender_asking_again_expires_only_its_own_snapshot() {
        let mut s = server();
        let mut h = Recorder::default();
        let json = format!("{{\"x\":\"{}\"}}", "y".repeat(5000));
        let first = |s: &mut ControlServer, h: &mut Recorder, name, nonce| {
            h.next = Some(Response::stats(json.clone()));
            let req = Request::Stats {
                token: 0,
                offset: 0,
            };
            let out = s.process(&datagram(name, NOW, nonce, &req), src(), h, NOW);
            let (_, r) = open_reply(out.unwrap(), name);
            let ReplyPayload::Stats { token, chunk, .. } = r.payload else {
                panic!("no stats payload")
            };
            assert!(r.more);
            (token, chunk.len() as u32)
        };
        let (token, offset) = first(&mut s, &mut h, "admin", 1);
        for i in 0..4 * STATS_SNAPSHOTS as u64 {
            first(&mut s, &mut h, "web1", 100 + i);
        }
        assert_eq!(s.stats.len(), 1 + STATS_PER_SENDER);
        // A second admin client starts its own while the first fetches.
        let (token2, offset2) = first(&mut s, &mut h, "admin", 2);
        for (t, o, nonce) in [(token, offset, 3), (token2, offset2, 4)] {
            let req = Request::Stats {
                token: t,
                offset: o,
            };
            let out = s.process(&datagram("admin", NOW, nonce, &req), src(), &mut h, NOW);
            let (_, r) = open_reply(out.unwrap(), "admin");
            assert_eq!(r.code, ReturnCode::Ok, "{}", r.message);
        }
    }

    #[test]
    fn oversized_handler_answers_become_internal() {
        let mut s = server();
        let mut h = Recorder {
            next: Some(Response::conflict(&"x".repeat(100), 1)),
            ..Recorder::default()
        };
        let d = datagram("web1", NOW, 1, &create(None));
        let out = s.process(&d, src(), &mut h, NOW).unwrap().to_vec();
        let (_, r) = open_reply(&out, "web1");
        assert_eq!(r.code, ReturnCode::Internal);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_datagrams_never_reach_the_handler(
            bytes in proptest::collection::vec(any::<u8>(), 0..1500),
            prefix in any::<bool>(),
        ) {
            let mut s = server();
            let mut h = Recorder::default();
            let mut d = bytes;
            if prefix && d.len() >= 5 {
                // Make it get past the magic and version checks.
                d[..3].copy_from_slice(b"PD\x01");
                d[4] = 0;
            }
            let _ = s.process(&d, src(), &mut h, NOW);
            prop_assert!(h.calls.is_empty());
            prop_assert_eq!(s.counters().dispatched, 0);
            prop_assert_eq!(s.counters().refused.total(), 1);
        }

        #[test]
        fn mutated_datagrams_never_reach_the_handler(
            which in 0usize..13,
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in proptest::option::of(any::<usize>()),
            extra in proptest::collection::vec(any::<u8>(), 0..3),
        ) {
            let reqs = [
                create(None),
                create(Some("web1")),
                Request::AffinityExtend(AffinityOp { key: akey(), duration_secs: 5, owner: None, notify: Some("10.0.0.1:1".parse().unwrap()) }),
                Request::AffinityCancel(AffinityOp { key: akey().with_ports(PortMatch::Range(1, 9)), duration_secs: 0, owner: None, notify: None }),
                Request::AffinityList { service: Some(akey().service), owner: Some("web1"), offset: 0, limit: 0 },
                Request::BackendList { service: Some("web"), offset: 0, limit: 3 },
                Request::BackendSetWeight { service: "web", backend: "web1", weight: 0 },
                Request::BackendRemove { service: "web", backend: "web1" },
                Request::Stats { token: 0, offset: 0 },
                Request::BackendSetWeight { service: "w", backend: "b", weight: 1 },
                Request::BackendList { service: None, offset: 0, limit: 0 },
                Request::AffinityList { service: None, owner: None, offset: 0, limit: 0 },
                Request::Stats { token: 0, offset: 0 },
            ];
            let good = datagram("web1", NOW, 7, &reqs[which]);
            let mut d = good.clone();
            for (at, val) in edits {
                let i = at % d.len();
                d[i] = val;
            }
            if let Some(c) = cut {
                d.truncate(c % (d.len() + 1));
            }
            d.extend(extra);
            prop_assume!(d != good);
            let mut s = server();
            let mut h = Recorder::default();
            let _ = s.process(&d, src(), &mut h, NOW);
            prop_assert!(h.calls.is_empty());
            // The unmodified datagram is accepted by the same server.
            let _ = s.process(&good, src(), &mut h, NOW);
            prop_assert_eq!(h.calls.len(), 1);
        }
    }

    /// Control-plane rate without sockets: decode, verify, replay check,
    /// dispatch, encode and sign. Prints a rate; asserts no time.
    #[test]
    #[ignore = "benchmark: cargo test --release --no-default-features --lib control::server::tests::pipeline_rate -- --ignored --nocapture"]
    fn pipeline_rate() {
        // A rate limit far above the rate: its cost is measured, not its
        // refusals.
        let mut config = ServerConfig {
            read_timeout: None,
            ..ServerConfig::new(Allowlist::parse(&["10.0.0.0/8"]).unwrap(), keyring())
        };
        config.auth.rates.per_sender = crate::config::MAX_REQUEST_RATE;
        let mut s = server_with(config);
        let mut h = NullHandler;
        let n = 200_000u64;
        let datagrams: Vec<Vec<u8>> = (0..n)
            .map(|i| datagram("web1", NOW, i, &create(None)))
            .collect();
        let t = Instant::now();
        let mut replies = 0;
        for d in &datagrams {
            if s.process(d, src(), &mut h, NOW).is_some() {
                replies += 1;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(replies, n);
        println!("pipeline: {:.0} requests/s", n as f64 / secs);
    }

    /// Control-plane rate over real UDP on loopback: one thread keeps a
    /// window of requests in flight, the server thread answers them. Prints
    /// a rate; asserts no time.
    #[test]
    #[ignore = "benchmark: cargo test --release --no-default-features --lib control::server::tests::udp_rate -- --ignored --nocapture"]
    fn udp_rate() {
        let mut config = ServerConfig {
            read_timeout: Some(Duration::from_millis(5)),
            ..ServerConfig::new(Allowlist::loopback(), keyring())
        };
        config.auth.rates.per_sender = crate::config::MAX_REQUEST_RATE;
        let mut s = server_with(config);
        let addr = s.local_addr().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let t = std::thread::spawn(move || {
            let mut h = NullHandler;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                s.poll(&mut h, SystemTime::now());
            }
            *s.counters()
        });
        let n = 300_000u64;
        let now = unix_ms(SystemTime::now());
        let datagrams: Vec<Vec<u8>> = (0..n)
            .map(|i| datagram("web1", now, i, &create(None)))
            .collect();
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; MAX_DATAGRAM];
        let (mut sent, mut got, window) = (0usize, 0u64, 64usize);
        let started = Instant::now();
        while got < n {
            while sent < datagrams.len() && sent as u64 - got < window as u64 {
                sock.send_to(&datagrams[sent], addr).unwrap();
                sent += 1;
            }
            match sock.recv_from(&mut buf) {
                Ok(_) => got += 1,
                Err(_) => break, // a reply lost to a full buffer
            }
        }
        let secs = started.elapsed().as_secs_f64();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let c = t.join().unwrap();
        println!(
            "udp: {got} replies in {secs:.2} s = {:.0} requests/s (server: {} dispatched, {} refused)",
            got as f64 / secs,
            c.dispatched,
            c.refused.total()
        );
    }

    struct NullHandler;
    impl ControlHandler for NullHandler {
        fn handle(&mut self, _: &Call<'_>, _: &Request<'_>) -> Response {
            Response::ok().with_remaining(60)
        }
    }
}
