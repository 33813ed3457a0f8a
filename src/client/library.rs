//! The client library: what the CLI and server applications use to talk to
//! a running distributor.
//!
//! Each request is signed with the client's key, sent, and retried on
//! timeout. A retry keeps the request id but gets a fresh nonce and
//! timestamp (the server refuses a repeated nonce as a replay), so it is a
//! new message for the same operation; the client accepts a reply to any of
//! its attempts, recognised by request id and by the request nonce the reply
//! echoes, and only if the reply's HMAC verifies under the client's key.
//!
//! An application that wants the AFFINITY_ENDED notifications uses one
//! [`ControlClient`] (one socket) for its requests and for
//! [`ControlClient::recv_ended`]: the notification goes to the address the
//! create request came from unless another was named. Notifications that
//! arrive while the client waits for a reply are queued, not lost.
//!
//! A refusal is an authentic reply with another code than OK; the one-call
//! helpers and [`ok`] turn it into [`ClientError::Refused`]. Two of them
//! come from the limits on half-trusted applications (PROTOCOL.md §5.1,
//! §6.8): [`ReturnCode::QuotaExceeded`] (the backend holds as many
//! affinities as its service allows: cancel one first) and
//! [`ReturnCode::RateLimited`] (too many requests a second from this name:
//! nothing was done; [`ClientError::is_rate_limited`] tells it apart, and
//! the application retries after a moment). In cluster mode
//! [`ReturnCode::Unavailable`] says the shared table (etcd) could not be
//! reached: nothing was accepted, or the outcome is unknown (list the
//! affinity); [`ClientError::is_unavailable`] tells it apart. The client
//! never retries them by itself.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime};

use crate::protocol::auth::{unix_ms, Key, NonceSource};
use crate::protocol::message::{
    encode_request, AffinityEntry, AffinityKey, AffinityOp, BackendEntry, BackendSpec, DecodeError,
    EncodeError, EndedNotice, Envelope, Header, MsgType, Reply, ReplyPayload, Request, ReturnCode,
    ServiceAddr, MAX_DATAGRAM,
};
use crate::types::Declared;

/// Default time to wait for a reply per attempt.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Default retries after the first attempt.
pub const DEFAULT_RETRIES: u32 = 2;
/// Largest statistics document the client accepts.
const MAX_STATS_LEN: u32 = 16 << 20;
/// How far an AFFINITY_ENDED's timestamp may be from this host's clock:
/// the distributor stamps it as it sends it. One outside is refused, so a
/// captured notification cannot be played back later.
pub const NOTICE_SKEW: Duration = Duration::from_secs(10);
/// Notification nonces remembered at most, to drop repeats within the
/// window (more than 3,000 notifications a second would start forgetting).
const SEEN_NOTICES: usize = 65_536;
/// Attempts after the first at most.
pub const MAX_RETRIES: u32 = 100;
/// Notifications queued while waiting for replies.
const MAX_QUEUED_NOTICES: usize = 4096;
/// Datagrams read at most, without waiting, once a wait's deadline has
/// passed: enough to take a reply or notice that has already arrived, and
/// a bound, so that a peer sending faster than they are read cannot hold
/// the call past its deadline. Those left stay in the socket for the next
/// call.
const LATE_READS: u32 = 64;
/// Most a request's timestamp runs ahead of the clock (ms): more than
/// one request a millisecond, or a clock stepped back, stamp each a
/// millisecond after the last, up to this; beyond, the clock's time again.
/// A timestamp never answered needs no protecting (pktdist refused it:
/// stale), and one it took was within its skew of its clock, so its floor
/// for this name rises past the clock's time only under the pressure
/// PROTOCOL.md §3.2 describes. Without the bound the stamps would drift
/// past pktdist's allowed skew and every later request would go unanswered.
pub const MAX_LEAD_MS: u64 = 1000;

/// Why a request did not produce a reply (or, for the list and one-call
/// helpers, an OK reply).
#[derive(Debug)]
pub enum ClientError {
    Io(io::Error),
    /// No authentic reply after every attempt. The usual causes: wrong key,
    /// clock skew beyond the server's limit, source network not allowed,
    /// or no server listening — the server answers none of these.
    Timeout {
        attempts: u32,
    },
    /// The request could not be encoded (a field out of range).
    Encode(EncodeError),
    /// The server answered with another code than OK.
    Refused {
        code: ReturnCode,
        message: String,
        owner: Option<String>,
        remaining_secs: u32,
    },
    /// An authentic reply that makes no sense for the request.
    Protocol(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "control socket: {e}"),
            ClientError::Timeout { attempts } => write!(
                f,
                "no reply after {attempts} attempts (is the server running, the key right, \
                 the clock in sync and this address allowed?)"
            ),
            ClientError::Encode(e) => write!(f, "cannot encode request: {e}"),
            ClientError::Refused {
                code,
                message,
                owner,
                ..
            } => {
                write!(f, "{code}")?;
                if let Some(o) = owner {
                    write!(f, " (owner {o})")?;
                }
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                Ok(())
            }
            ClientError::Protocol(m) => write!(f, "protocol error: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> ClientError {
        ClientError::Io(e)
    }
}

impl From<EncodeError> for ClientError {
    fn from(e: EncodeError) -> ClientError {
        ClientError::Encode(e)
    }
}

impl ClientError {
    /// The return code of a refusal, if the server answered.
    pub fn code(&self) -> Option<ReturnCode> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The server refused the request for its sender's request rate:
    /// nothing was done, and the same request may succeed a moment later.
    pub fn is_rate_limited(&self) -> bool {
        self.code() == Some(ReturnCode::RateLimited)
    }

    /// Cluster mode: the instance could not reach the shared table. Nothing
    /// was accepted, or (etcd did not answer in time) the outcome is
    /// unknown: list the affinity to find out.
    pub fn is_unavailable(&self) -> bool {
        self.code() == Some(ReturnCode::Unavailable)
    }

    fn refused(reply: Reply) -> ClientError {
        ClientError::Refused {
            code: reply.code,
            message: reply.message.into_owned(),
            owner: reply.owner,
            remaining_secs: reply.remaining_secs,
        }
    }
}

/// Ok for an OK reply, [`ClientError::Refused`] for any other code.
pub fn ok(reply: Reply) -> Result<Reply, ClientError> {
    if reply.code == ReturnCode::Ok {
        Ok(reply)
    } else {
        Err(ClientError::refused(reply))
    }
}

/// An affinity to create, extend or cancel: its key, and optionally the
/// owner (only an admin may name another backend) and the notify address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AffinitySpec {
    pub key: AffinityKey,
    pub owner: Option<String>,
    pub notify: Option<SocketAddr>,
}

impl AffinitySpec {
    pub fn new(key: AffinityKey) -> AffinitySpec {
        AffinitySpec {
            key,
            owner: None,
            notify: None,
        }
    }

    fn op(&self, duration_secs: u32) -> AffinityOp<'_> {
        AffinityOp {
            key: self.key,
            duration_secs,
            owner: self.owner.as_deref(),
            notify: self.notify,
        }
    }
}

impl From<AffinityKey> for AffinitySpec {
    fn from(key: AffinityKey) -> AffinitySpec {
        AffinitySpec::new(key)
    }
}

/// Whole seconds, rounded up, at least 1, at most `u32::MAX`.
fn duration_secs(d: Duration) -> u32 {
    let s = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    u32::try_from(s.max(1)).unwrap_or(u32::MAX)
}

/// A signed-request client bound to one UDP socket.
pub struct ControlClient {
    socket: UdpSocket,
    server: SocketAddr,
    name: String,
    key: Key,
    timeout: Duration,
    retries: u32,
    next_id: u32,
    nonces: NonceSource,
    tx: Vec<u8>,
    rx: Vec<u8>,
    ended: VecDeque<EndedNotice>,
    /// The accepted notifications' (timestamp, nonce), oldest first, and
    /// their nonces, until their timestamps leave the window.
    seen_notices: VecDeque<(u64, u64)>,
    seen_nonces: HashSet<u64>,
    ignored: u64,
    /// The last request's timestamp: the next is never earlier, even when
    /// the clock steps back, since the server may refuse a sender's
    /// requests stamped at or before a floor its replay memory raised.
    last_timestamp_ms: u64,
}

impl ControlClient {
    /// A client on an ephemeral local port, speaking to `server` as `name`.
    pub fn new(server: SocketAddr, name: &str, key: &[u8]) -> io::Result<ControlClient> {
        let local = match server {
            SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
        };
        ControlClient::bind(local, server, name, key)
    }

    /// A client on a chosen local address (where the application wants its
    /// ended notifications).
    pub fn bind(
        local: SocketAddr,
        server: SocketAddr,
        name: &str,
        key: &[u8],
    ) -> io::Result<ControlClient> {
        let key = Key::new(key).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if name.is_empty() || name.len() > crate::types::MAX_NAME_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the sender name must be 1 to 64 bytes long",
            ));
        }
        let socket = UdpSocket::bind(local)?;
        let mut nonces = NonceSource::new();
        let next_id = nonces.next() as u32;
        Ok(ControlClient {
            socket,
            server,
            name: name.to_string(),
            key,
            timeout: DEFAULT_TIMEOUT,
            retries: DEFAULT_RETRIES,
            next_id,
            nonces,
            tx: vec![0; MAX_DATAGRAM],
            rx: vec![0; MAX_DATAGRAM + 1],
            ended: VecDeque::new(),
            seen_notices: VecDeque::new(),
            seen_nonces: HashSet::new(),
            ignored: 0,
            last_timestamp_ms: 0,
        })
    }

    /// Time to wait for a reply per attempt.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout.max(Duration::from_millis(1));
    }

    /// Attempts after the first (at most [`MAX_RETRIES`]).
    pub fn set_retries(&mut self, retries: u32) {
        self.retries = retries.min(MAX_RETRIES);
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Datagrams received and dropped: not authentic, not ours, duplicates.
    pub fn ignored(&self) -> u64 {
        self.ignored
    }

    /// Pins `spec.key` to the owner for `duration` (rounded up to seconds).
    pub fn create_affinity(
        &mut self,
        spec: &AffinitySpec,
        duration: Duration,
    ) -> Result<Reply, ClientError> {
        self.request(&Request::AffinityCreate(spec.op(duration_secs(duration))))
    }

    /// Gives an existing affinity a new duration from now.
    pub fn extend_affinity(
        &mut self,
        spec: &AffinitySpec,
        duration: Duration,
    ) -> Result<Reply, ClientError> {
        self.request(&Request::AffinityExtend(spec.op(duration_secs(duration))))
    }

    /// Removes an affinity at once.
    pub fn cancel_affinity(&mut self, spec: &AffinitySpec) -> Result<Reply, ClientError> {
        self.request(&Request::AffinityCancel(spec.op(0)))
    }

    /// Every affinity (optionally of one service and/or owner), all pages.
    pub fn list_affinities(
        &mut self,
        service: Option<ServiceAddr>,
        owner: Option<&str>,
    ) -> Result<Vec<AffinityEntry>, ClientError> {
        self.list_all(
            |offset| Request::AffinityList {
                service,
                owner,
                offset,
                limit: 0,
            },
            |payload| match payload {
                ReplyPayload::Affinities {
                    next_offset,
                    entries,
                } => Some((next_offset, entries)),
                _ => None,
            },
        )
    }

    /// Every backend (optionally of one service), all pages.
    pub fn backend_list(
        &mut self,
        service: Option<&str>,
    ) -> Result<Vec<BackendEntry>, ClientError> {
        self.list_all(
            |offset| Request::BackendList {
                service,
                offset,
                limit: 0,
            },
            |payload| match payload {
                ReplyPayload::Backends {
                    next_offset,
                    entries,
                } => Some((next_offset, entries)),
                _ => None,
            },
        )
    }

    /// Every page of a list: `page` is the request for one page from an
    /// offset, `entries` takes the next offset and the entries out of a
    /// reply (None: the wrong kind of reply). Stops with an error rather
    /// than loop when a page promises more but does not advance.
    fn list_all<'r, T>(
        &mut self,
        page: impl Fn(u32) -> Request<'r>,
        entries: impl Fn(ReplyPayload) -> Option<(u32, Vec<T>)>,
    ) -> Result<Vec<T>, ClientError> {
        let mut out = Vec::new();
        let mut offset = 0u32;
        loop {
            let reply = ok(self.request(&page(offset))?)?;
            let more = reply.more;
            let Some((next_offset, entries)) = entries(reply.payload) else {
                return Err(ClientError::Protocol("list reply without entries".into()));
            };
            let progressed = !entries.is_empty() && next_offset > offset;
            out.extend(entries);
            if !more {
                return Ok(out);
            }
            if !progressed {
                return Err(ClientError::Protocol(
                    "list pagination made no progress".into(),
                ));
            }
            offset = next_offset;
        }
    }

    /// Sets a backend's weight (0 = drain).
    pub fn set_weight(
        &mut self,
        service: &str,
        backend: &str,
        weight: u32,
    ) -> Result<Reply, ClientError> {
        self.request(&Request::BackendSetWeight {
            service,
            backend,
            weight,
        })
    }

    /// Adds a backend to a service.
    pub fn add_backend(&mut self, backend: &BackendEntry) -> Result<Reply, ClientError> {
        self.request(&Request::BackendAdd(BackendSpec {
            service: &backend.service,
            backend: &backend.backend,
            addr: backend.addr,
            mac: backend.mac,
            weight: backend.weight,
        }))
    }

    /// Declares a backend's state (BACKEND_STATE): UP, DRAIN or DOWN. With
    /// a backend's own name and key it declares its own (`backend` None or
    /// its own name); the admin names any backend. `service` None: every
    /// service the backend belongs to. The reply's message lists each
    /// backend concerned with its resulting state. In cluster mode it holds
    /// at every instance, answered once etcd has it (UNAVAILABLE while etcd
    /// cannot be reached).
    pub fn set_backend_state(
        &mut self,
        service: Option<&str>,
        backend: Option<&str>,
        state: Declared,
    ) -> Result<Reply, ClientError> {
        self.request(&Request::BackendState {
            service,
            backend,
            state,
        })
    }

    /// Removes a backend from a service (its affinities end).
    pub fn remove_backend(&mut self, service: &str, backend: &str) -> Result<Reply, ClientError> {
        self.request(&Request::BackendRemove { service, backend })
    }

    /// The statistics document (JSON), fetched in chunks from one snapshot.
    pub fn stats(&mut self) -> Result<String, ClientError> {
        // A snapshot can be pushed out by other clients' requests between
        // chunks; start again a few times before giving up.
        for _ in 0..3 {
            match self.stats_once()? {
                Some(doc) => return Ok(doc),
                None => continue,
            }
        }
        Err(ClientError::Protocol(
            "statistics snapshot kept expiring while being fetched".into(),
        ))
    }

    fn stats_once(&mut self) -> Result<Option<String>, ClientError> {
        let mut doc = Vec::new();
        let mut token = 0u32;
        loop {
            let reply = self.request(&Request::Stats {
                token,
                offset: doc.len() as u32,
            })?;
            if reply.code == ReturnCode::NotFound && token != 0 {
                return Ok(None);
            }
            let reply = ok(reply)?;
            let more = reply.more;
            let ReplyPayload::Stats {
                token: t,
                total_len,
                offset,
                chunk,
            } = reply.payload
            else {
                return Err(ClientError::Protocol("stats reply without a chunk".into()));
            };
            if total_len > MAX_STATS_LEN
                || offset as usize != doc.len()
                || (token != 0 && t != token)
                || (more && chunk.is_empty())
            {
                return Err(ClientError::Protocol("inconsistent stats chunk".into()));
            }
            token = t;
            doc.extend_from_slice(&chunk);
            if !more {
                if doc.len() != total_len as usize {
                    return Err(ClientError::Protocol("stats document incomplete".into()));
                }
                return String::from_utf8(doc)
                    .map(Some)
                    .map_err(|_| ClientError::Protocol("stats document is not UTF-8".into()));
            }
        }
    }

    /// Sends one request (with retries) and returns the server's authentic
    /// reply, whatever its code.
    pub fn request(&mut self, request: &Request<'_>) -> Result<Reply, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let attempts = self.retries.saturating_add(1);
        let mut sent: Vec<u64> = Vec::with_capacity(attempts as usize);
        for _ in 0..attempts {
            let nonce = self.nonces.next();
            let timestamp_ms = next_timestamp(unix_ms(SystemTime::now()), self.last_timestamp_ms);
            self.last_timestamp_ms = timestamp_ms;
            let header = Header {
                msg_type: request.msg_type() as u8,
                request_id: id,
                timestamp_ms,
                nonce,
                name: &self.name,
            };
            let n = encode_request(&mut self.tx, &header, &self.key, request)?;
            self.socket.send_to(&self.tx[..n], self.server)?;
            sent.push(nonce);
            let mut wait = Wait::new(self.timeout);
            while let Some((rid, reply)) = self.receive_until(&mut wait, false)? {
                if rid == id
                    && reply.request_type == request.msg_type() as u8
                    && sent.contains(&reply.request_nonce)
                {
                    return Ok(reply);
                }
                self.ignored += 1;
            }
        }
        Err(ClientError::Timeout { attempts })
    }

    /// Waits up to `timeout` for an AFFINITY_ENDED notification for this
    /// client's name. Replies to earlier requests that arrive late are
    /// dropped.
    pub fn recv_ended(&mut self, timeout: Duration) -> Result<Option<EndedNotice>, ClientError> {
        if let Some(n) = self.ended.pop_front() {
            return Ok(Some(n));
        }
        let mut wait = Wait::new(timeout);
        loop {
            match self.receive_until(&mut wait, true)? {
                None => return Ok(self.ended.pop_front()),
                Some(_) => self.ignored += 1,
            }
            if let Some(n) = self.ended.pop_front() {
                return Ok(Some(n));
            }
        }
    }

    /// Receives datagrams until an authentic reply arrives (returned with its
    /// request id) or `wait` ends (`None`). Notifications are queued;
    /// with `until_notice`, a queued one also ends the wait (`None`).
    fn receive_until(
        &mut self,
        wait: &mut Wait,
        until_notice: bool,
    ) -> Result<Option<(u32, Reply)>, ClientError> {
        loop {
            // Past the deadline, what has arrived is still read (without
            // waiting): a reply or notice already in the socket is taken.
            // But only [`LATE_READS`] datagrams over the whole wait, however
            // many calls it takes: a socket that never empties (a flood of
            // junk or of replayed replies) does not keep the caller from
            // returning.
            let left = wait.deadline.saturating_duration_since(Instant::now());
            let received = if left.is_zero() {
                if wait.late_reads == 0 {
                    return Ok(None);
                }
                wait.late_reads -= 1;
                self.socket.set_nonblocking(true)?;
                let r = self.socket.recv_from(&mut self.rx);
                self.socket.set_nonblocking(false)?;
                r
            } else {
                self.socket.set_read_timeout(Some(left))?;
                self.socket.recv_from(&mut self.rx)
            };
            let len = match received {
                Ok((len, _)) => len,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            match self.accept(len) {
                Ok(Some(r)) => return Ok(Some(r)),
                Ok(None) if until_notice && !self.ended.is_empty() => return Ok(None),
                Ok(None) => {}
                Err(_) => self.ignored += 1,
            }
        }
    }

    /// Authenticates one received datagram: a reply is returned, a
    /// notification queued, anything else refused.
    fn accept(&mut self, len: usize) -> Result<Option<(u32, Reply)>, DecodeError> {
        if len > MAX_DATAGRAM {
            return Err(DecodeError::Invalid("oversize datagram"));
        }
        let env = Envelope::open(&self.rx[..len])?;
        if env.header.name != self.name || !env.verify(&self.key) {
            return Err(DecodeError::Invalid("not signed for this client"));
        }
        match MsgType::from_u8(env.header.msg_type) {
            Some(MsgType::Reply) => {
                let reply = Reply::decode_body(env.body)?;
                Ok(Some((env.header.request_id, reply)))
            }
            Some(MsgType::AffinityEnded) => {
                let notice = EndedNotice::decode_body(env.body)?;
                let (stamp, nonce) = (env.header.timestamp_ms, env.header.nonce);
                let now = unix_ms(SystemTime::now());
                let skew = NOTICE_SKEW.as_millis() as u64;
                if stamp.abs_diff(now) > skew {
                    return Err(DecodeError::Invalid(
                        "notification outside the clock window",
                    ));
                }
                // Those whose timestamps left the window are refused by it.
                while let Some(&(t, n)) = self.seen_notices.front() {
                    if t.saturating_add(skew) >= now && self.seen_notices.len() < SEEN_NOTICES {
                        break;
                    }
                    self.seen_notices.pop_front();
                    self.seen_nonces.remove(&n);
                }
                if !self.seen_nonces.insert(nonce) {
                    return Err(DecodeError::Invalid("duplicate notification"));
                }
                self.seen_notices.push_back((stamp, nonce));
                if self.ended.len() == MAX_QUEUED_NOTICES {
                    self.ended.pop_front();
                }
                self.ended.push_back(notice);
                Ok(None)
            }
            _ => Err(DecodeError::Invalid("unexpected message type")),
        }
    }
}

/// Runs one call on a fresh client for the affinity `client/prefix_len` on
/// `service`; Ok only for an OK reply.
fn one_shot(
    server: SocketAddr,
    name: &str,
    key: &[u8],
    service: ServiceAddr,
    client: IpAddr,
    prefix_len: u8,
    f: impl FnOnce(&mut ControlClient, &AffinitySpec) -> Result<Reply, ClientError>,
) -> Result<Reply, ClientError> {
    let akey = AffinityKey::new(service, client, prefix_len)
        .map_err(|e| ClientError::Encode(EncodeError::Invalid(e)))?;
    let mut c = ControlClient::new(server, name, key)?;
    ok(f(&mut c, &AffinitySpec::new(akey))?)
}

/// One call for a server application: pin `client/prefix_len` on `service`
/// to the calling backend `name` for `duration`. Ok only for an OK reply
/// (a CONFLICT names the owner in [`ClientError::Refused`]). The ended
/// notification goes to this call's ephemeral socket, which is closed on
/// return; use a [`ControlClient`] to receive it.
pub fn request_affinity(
    server: SocketAddr,
    name: &str,
    key: &[u8],
    service: ServiceAddr,
    client: IpAddr,
    prefix_len: u8,
    duration: Duration,
) -> Result<Reply, ClientError> {
    one_shot(server, name, key, service, client, prefix_len, |c, spec| {
        c.create_affinity(spec, duration)
    })
}

/// One call: give the affinity a new duration.
pub fn extend_affinity(
    server: SocketAddr,
    name: &str,
    key: &[u8],
    service: ServiceAddr,
    client: IpAddr,
    prefix_len: u8,
    duration: Duration,
) -> Result<Reply, ClientError> {
    one_shot(server, name, key, service, client, prefix_len, |c, spec| {
        c.extend_affinity(spec, duration)
    })
}

/// One call: cancel the affinity.
pub fn cancel_affinity(
    server: SocketAddr,
    name: &str,
    key: &[u8],
    service: ServiceAddr,
    client: IpAddr,
    prefix_len: u8,
) -> Result<Reply, ClientError> {
    one_shot(server, name, key, service, client, prefix_len, |c, spec| {
        c.cancel_affinity(spec)
    })
}

/// One call for a server application: declare the calling backend
/// `name`'s own state on every service it belongs to — DRAIN before a
/// graceful shutdown (no new connections or affinities; what it has
/// finishes), UP when ready again, DOWN to leave at once. Ok only for an
/// OK reply.
pub fn set_backend_state(
    server: SocketAddr,
    name: &str,
    key: &[u8],
    state: Declared,
) -> Result<Reply, ClientError> {
    let mut c = ControlClient::new(server, name, key)?;
    ok(c.set_backend_state(None, None, state)?)
}

/// One wait for datagrams (a request's attempt, a [`ControlClient::recv_ended`]):
/// its deadline, and how many datagrams may still be read once it has
/// passed.
struct Wait {
    deadline: Instant,
    late_reads: u32,
}

impl Wait {
    fn new(timeout: Duration) -> Wait {
        Wait {
            deadline: deadline_after(timeout),
            late_reads: LATE_READS,
        }
    }
}

/// The instant `wait` from now; a wait too long to add (a caller's
/// `Duration::MAX`, say) waits about a century instead.
pub(crate) fn deadline_after(wait: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let now = Instant::now();
    now.checked_add(wait).unwrap_or_else(|| now + CENTURY)
}

/// A request's timestamp at `now_ms` after one stamped `last_ms`:
/// increasing (PROTOCOL.md §3.2: a request stamped at or before the
/// server's floor for this name would be refused), but at most
/// [`MAX_LEAD_MS`] ahead of the clock.
fn next_timestamp(now_ms: u64, last_ms: u64) -> u64 {
    let next = now_ms.max(last_ms.saturating_add(1));
    if next - now_ms > MAX_LEAD_MS {
        now_ms
    } else {
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::control::counters::ServerCounters;
    use crate::control::handler::{Call, ControlHandler, Payload, Response};
    use crate::control::server::{ControlServer, ServerConfig};
    use crate::protocol::auth::Allowlist;
    use crate::protocol::message::{encode_reply, MsgType, Request};
    use crate::protocol::testing::{akey, keyring, ADMIN_KEY, WEB1_KEY, WEB2_KEY};
    use crate::types::EndReason;
    use crate::types::PortMatch;
    use std::borrow::Cow;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;

    #[test]
    fn timestamps_increase_but_never_run_far_ahead_of_the_clock() {
        let t = 1_700_000_000_000u64;
        assert_eq!(next_timestamp(t, 0), t);
        assert_eq!(next_timestamp(t, t), t + 1, "two in one millisecond");
        assert_eq!(next_timestamp(t, t - 5), t);
        // A burst on a frozen clock: a millisecond apart up to the lead,
        // then the clock's time again.
        let mut last = 0;
        let stamps: Vec<u64> = (0..1500)
            .map(|_| {
                last = next_timestamp(t, last);
                last
            })
            .collect();
        assert_eq!(stamps[1000], t + 1000);
        assert_eq!(stamps[1001], t);
        assert!(stamps.iter().all(|&s| s >= t && s - t <= MAX_LEAD_MS));
        // A clock an hour fast, then set right: the next request is
        // stamped by the clock, not an hour ahead of it.
        let ahead = next_timestamp(t + 3_600_000, t);
        assert_eq!(next_timestamp(t, ahead), t);
        assert_eq!(next_timestamp(t, u64::MAX), t);
    }
    /// A miniature affinity manager, enough to exercise the protocol.
    #[derive(Default)]
    struct Fake {
        table: Vec<(AffinityKey, String, SocketAddr, u32)>,
        pending: Vec<(SocketAddr, String, EndedNotice)>,
    }

    impl ControlHandler for Fake {
        fn handle(&mut self, call: &Call<'_>, request: &Request<'_>) -> Response {
            let (sender, is_admin) = (call.sender, call.is_admin);
            match request {
                Request::AffinityCreate(op) => {
                    let owner = op.owner.unwrap_or(sender);
                    if let Some(e) = self.table.iter().find(|e| e.0 == op.key) {
                        if e.1 != owner {
                            return Response::conflict(&e.1, e.3);
                        }
                    }
                    self.table.retain(|e| e.0 != op.key);
                    self.table.push((
                        op.key,
                        owner.to_string(),
                        op.notify.unwrap_or(call.source),
                        op.duration_secs,
                    ));
                    Response::ok().with_remaining(op.duration_secs)
                }
                Request::AffinityExtend(op) => {
                    match self.table.iter_mut().find(|e| e.0 == op.key) {
                        Some(e) if e.1 == op.owner.unwrap_or(sender) => {
                            e.3 = op.duration_secs;
                            Response::ok().with_remaining(e.3)
                        }
                        Some(e) => Response::conflict(&e.1, e.3),
                        None => Response::new(ReturnCode::NotFound),
                    }
                }
                Request::AffinityCancel(op) => {
                    let Some(i) = self.table.iter().position(|e| e.0 == op.key) else {
                        return Response::new(ReturnCode::NotFound);
                    };
                    let e = self.table.remove(i);
                    self.pending.push((
                        e.2,
                        e.1.clone(),
                        EndedNotice {
                            key: e.0,
                            owner: e.1,
                            reason: EndReason::Cancelled,
                        },
                    ));
                    Response::ok()
                }
                Request::AffinityList {
                    owner,
                    offset,
                    limit,
                    ..
                } => {
                    let all: Vec<AffinityEntry> = self
                        .table
                        .iter()
                        .filter(|e| owner.is_none_or(|o| o == e.1))
                        .map(|e| AffinityEntry {
                            key: e.0,
                            owner: e.1.clone(),
                            remaining_secs: e.3,
                            notify: Some(e.2),
                        })
                        .collect();
                    let start = (*offset as usize).min(all.len());
                    let end = all.len().min(start + usize::from(*limit));
                    Response::affinities(all[start..end].to_vec(), end < all.len())
                }
                Request::BackendList { .. } => Response::backends(
                    vec![BackendEntry::new(
                        "web",
                        "web1",
                        "10.0.0.1".parse().unwrap(),
                        None,
                        3,
                    )],
                    false,
                ),
                Request::BackendSetWeight { backend, .. }
                | Request::BackendRemove { backend, .. } => {
                    if !is_admin {
                        Response::new(ReturnCode::NotAuthorized)
                    } else if *backend == "web1" {
                        Response::ok()
                    } else {
                        Response::new(ReturnCode::NotFound).with_message("no such backend")
                    }
                }
                Request::BackendAdd(_) => Response::new(ReturnCode::TableFull),
                Request::BackendState {
                    service,
                    backend,
                    state,
                } => Response::ok().with_message(format!(
                    "{}/{} {}",
                    service.unwrap_or("*"),
                    backend.unwrap_or("?"),
                    state.name()
                )),
                Request::Stats { .. } => Response {
                    payload: Payload::Stats(format!(
                        "{{\"affinities\":{},\"pad\":\"{}\"}}",
                        self.table.len(),
                        "x".repeat(3000)
                    )),
                    ..Response::ok()
                },
                Request::Reload if is_admin => Response::ok().with_message("reloaded"),
                Request::Reload => Response::new(ReturnCode::NotAuthorized),
            }
        }
    }

    struct Running {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<ServerCounters>>,
    }

    impl Running {
        fn stop(mut self) -> ServerCounters {
            self.stop.store(true, Ordering::Relaxed);
            self.thread.take().unwrap().join().unwrap()
        }
    }

    fn spawn_server() -> Running {
        let config = ServerConfig {
            read_timeout: Some(Duration::from_millis(5)),
            ..ServerConfig::new(Allowlist::loopback(), keyring())
        };
        let mut server = ControlServer::bind("127.0.0.1:0".parse().unwrap(), config).unwrap();
        let addr = server.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut h = Fake::default();
            while !flag.load(Ordering::Relaxed) {
                server.poll(&mut h, SystemTime::now());
                for (to, name, notice) in h.pending.drain(..) {
                    server.send_ended(to, &name, &notice).unwrap();
                }
            }
            // What arrived before the stop, however late this thread ran,
            // is counted.
            server.poll(&mut h, SystemTime::now());
            *server.counters()
        });
        Running {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    #[test]
    fn client_and_server_over_udp() {
        let srv = spawn_server();
        let mut web1 = ControlClient::new(srv.addr, "web1", WEB1_KEY).unwrap();
        let mut web2 = ControlClient::new(srv.addr, "web2", WEB2_KEY).unwrap();
        let mut admin = ControlClient::new(srv.addr, "admin", ADMIN_KEY).unwrap();
        let spec = AffinitySpec::new(akey());

        let r = web1
            .create_affinity(&spec, Duration::from_secs(60))
            .unwrap();
        assert_eq!((r.code, r.remaining_secs), (ReturnCode::Ok, 60));
        let r = web2
            .create_affinity(&spec, Duration::from_millis(1500))
            .unwrap();
        assert_eq!(r.code, ReturnCode::Conflict);
        assert_eq!(r.owner.as_deref(), Some("web1"));
        assert_eq!(r.remaining_secs, 60);
        let r = web1
            .extend_affinity(&spec, Duration::from_secs(90))
            .unwrap();
        assert_eq!((r.code, r.remaining_secs), (ReturnCode::Ok, 90));
        // A backend may not own for another.
        let mut theirs = spec.clone();
        theirs.owner = Some("web1".into());
        let r = web2
            .create_affinity(&theirs, Duration::from_secs(5))
            .unwrap();
        assert_eq!(r.code, ReturnCode::NotAuthorized);

        // Enough affinities (admin acting for web2) to need several pages.
        for p in 0..40u16 {
            let mut s = AffinitySpec::new(akey().with_ports(PortMatch::One(p)));
            s.owner = Some("web2".into());
            s.notify = Some("127.0.0.1:9".parse().unwrap());
            let r = admin.create_affinity(&s, Duration::from_secs(30)).unwrap();
            assert_eq!(r.code, ReturnCode::Ok);
        }
        let all = admin.list_affinities(None, None).unwrap();
        assert_eq!(all.len(), 41);
        assert_eq!(all[0].owner, "web1");
        assert_eq!(
            all[0].notify,
            Some(web1.local_addr().unwrap())
                .map(|a| { SocketAddr::new("127.0.0.1".parse().unwrap(), a.port()) })
        );
        assert_eq!(admin.list_affinities(None, Some("web2")).unwrap().len(), 40);

        let backends = web1.backend_list(None).unwrap();
        assert_eq!(backends.len(), 1);
        assert_eq!(backends[0].weight, 3);
        assert_eq!(
            web1.set_weight("web", "web1", 0).unwrap().code,
            ReturnCode::NotAuthorized
        );
        assert_eq!(
            admin.set_weight("web", "web1", 0).unwrap().code,
            ReturnCode::Ok
        );
        let r = admin.remove_backend("web", "nope").unwrap();
        assert_eq!(r.code, ReturnCode::NotFound);
        assert_eq!(r.message, "no such backend");
        assert_eq!(
            admin.add_backend(&backends[0]).unwrap().code,
            ReturnCode::TableFull
        );
        let stats = admin.stats().unwrap();
        let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
        assert_eq!(v["affinities"], 41);

        // Cancel: the reply, then the notification, signed with web1's key.
        assert_eq!(web1.cancel_affinity(&spec).unwrap().code, ReturnCode::Ok);
        // A request made meanwhile queues the notification rather than losing it.
        assert_eq!(web1.backend_list(Some("web")).unwrap().len(), 1);
        let n = web1.recv_ended(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(n.key, akey());
        assert_eq!(n.owner, "web1");
        assert_eq!(n.reason, EndReason::Cancelled);
        assert_eq!(
            web1.cancel_affinity(&spec).unwrap().code,
            ReturnCode::NotFound
        );

        // The one-call helpers.
        let r = request_affinity(
            srv.addr,
            "web1",
            WEB1_KEY,
            akey().service,
            "198.51.100.9".parse().unwrap(),
            32,
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(r.remaining_secs, 10);
        let e = request_affinity(
            srv.addr,
            "web2",
            WEB2_KEY,
            akey().service,
            "198.51.100.9".parse().unwrap(),
            32,
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(
            matches!(e, ClientError::Refused { code: ReturnCode::Conflict, ref owner, .. } if owner.as_deref() == Some("web1"))
        );
        extend_affinity(
            srv.addr,
            "web1",
            WEB1_KEY,
            akey().service,
            "198.51.100.9".parse().unwrap(),
            32,
            Duration::from_secs(20),
        )
        .unwrap();
        cancel_affinity(
            srv.addr,
            "web1",
            WEB1_KEY,
            akey().service,
            "198.51.100.9".parse().unwrap(),
            32,
        )
        .unwrap();

        // A wrong key gets no answer at all.
        let mut bad = ControlClient::new(srv.addr, "web1", WEB2_KEY).unwrap();
        bad.set_timeout(Duration::from_millis(50));
        bad.set_retries(1);
        assert!(matches!(
            bad.create_affinity(&spec, Duration::from_secs(1)),
            Err(ClientError::Timeout { attempts: 2 })
        ));

        let counters = srv.stop();
        assert_eq!(counters.refused.bad_hmac, 2);
        assert_eq!(counters.notices_sent, 2);
        assert_eq!(counters.send_errors, 0);
    }

    /// A fake server that answers by a script, to test the client's checks.
    fn scripted(script: impl FnOnce(&UdpSocket) + Send + 'static) -> (SocketAddr, JoinHandle<()>) {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        (addr, std::thread::spawn(move || script(&sock)))
    }

    fn answer(
        sock: &UdpSocket,
        signer: &[u8],
        name: &str,
        tweak: impl FnOnce(&mut Header, &mut Reply),
    ) {
        let mut buf = [0u8; MAX_DATAGRAM];
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        let env = Envelope::open(&buf[..n]).unwrap();
        let mut h = Header {
            msg_type: MsgType::Reply as u8,
            request_id: env.header.request_id,
            timestamp_ms: env.header.timestamp_ms,
            nonce: 1,
            name,
        };
        let mut r = Reply::new(env.header.msg_type, env.header.nonce, ReturnCode::Ok);
        tweak(&mut h, &mut r);
        let mut out = [0u8; MAX_DATAGRAM];
        let len = encode_reply(&mut out, &h, &Key::new(signer).unwrap(), &r).unwrap();
        sock.send_to(&out[..len], from).unwrap();
    }

    #[test]
    fn backends_declare_their_own_state_the_admin_any() {
        let srv = spawn_server();
        // The one call: the server fills in the sender as the backend.
        let r = set_backend_state(srv.addr, "web1", WEB1_KEY, Declared::Drain).unwrap();
        assert_eq!(r.message, "*/web1 DRAIN");
        let mut web1 = ControlClient::new(srv.addr, "web1", WEB1_KEY).unwrap();
        let e = web1
            .set_backend_state(Some("web"), Some("web2"), Declared::Down)
            .unwrap();
        assert_eq!(e.code, ReturnCode::NotAuthorized, "{}", e.message);
        let mut admin = ControlClient::new(srv.addr, "admin", ADMIN_KEY).unwrap();
        let r = admin
            .set_backend_state(Some("web"), Some("web2"), Declared::Up)
            .unwrap();
        assert_eq!(
            (r.code, r.message.as_ref()),
            (ReturnCode::Ok, "web/web2 UP")
        );
        srv.stop();
    }

    #[test]
    fn client_ignores_forged_and_unrelated_replies() {
        let (addr, t) = scripted(|s| {
            answer(s, WEB2_KEY, "web1", |_, _| {}); // wrong key
            answer(s, WEB1_KEY, "web2", |_, _| {}); // someone else's
            answer(s, WEB1_KEY, "web1", |h, _| h.request_id ^= 1); // other request
            answer(s, WEB1_KEY, "web1", |_, r| r.request_nonce ^= 1); // other attempt
            answer(s, WEB1_KEY, "web1", |_, r| r.request_type ^= 1); // other type
        });
        let mut c = ControlClient::new(addr, "web1", WEB1_KEY).unwrap();
        c.set_timeout(Duration::from_millis(200));
        c.set_retries(4);
        let e = c.cancel_affinity(&AffinitySpec::new(akey())).unwrap_err();
        assert!(matches!(e, ClientError::Timeout { attempts: 5 }), "{e}");
        assert_eq!(c.ignored(), 5);
        t.join().unwrap();
    }

    /// A code a newer distributor added reaches the caller as a refusal
    /// (`Unknown`, with the server's message), not as a lost reply.
    #[test]
    fn client_takes_an_unknown_code_as_a_refusal() {
        let (addr, t) = scripted(|s| {
            answer(s, WEB1_KEY, "web1", |_, r| {
                r.code = ReturnCode::Unknown;
                r.message = Cow::Borrowed("newer");
            });
        });
        let mut c = ControlClient::new(addr, "web1", WEB1_KEY).unwrap();
        c.set_timeout(Duration::from_secs(5));
        let r = c.cancel_affinity(&AffinitySpec::new(akey())).unwrap();
        assert_eq!((r.code, r.message.as_ref()), (ReturnCode::Unknown, "newer"));
        assert_eq!(c.ignored(), 0);
        t.join().unwrap();
    }

    /// A timeout too long to add to the clock gives a deadline about a
    /// century away rather than a panic; others are added as they are.
    #[test]
    fn a_timeout_of_duration_max_is_a_distant_deadline() {
        let now = Instant::now();
        assert!(deadline_after(Duration::MAX) > now + Duration::from_secs(99 * 365 * 24 * 3600));
        let d = deadline_after(Duration::from_secs(5));
        assert!(d >= now + Duration::from_secs(5) && d < Instant::now() + Duration::from_secs(6));
    }

    /// Timestamps increase, even when the clock goes back (here by half a
    /// second, within [`MAX_LEAD_MS`]): the server may refuse a sender's
    /// requests stamped at or before a floor (§3.2).
    #[test]
    fn request_timestamps_increase() {
        let later = unix_ms(SystemTime::now()) + 500;
        let (addr, t) = scripted(move |s| {
            // Each after the last, the first after `later` (however slow
            // the machine: past the clock, the clock's time is later still).
            let mut last = later;
            for _ in 0..2 {
                answer(s, WEB1_KEY, "web1", |h, _| {
                    assert!(h.timestamp_ms > last, "{} after {last}", h.timestamp_ms);
                    last = h.timestamp_ms;
                });
            }
        });
        let mut c = ControlClient::new(addr, "web1", WEB1_KEY).unwrap();
        c.set_timeout(Duration::from_secs(5));
        c.last_timestamp_ms = later;
        for _ in 0..2 {
            assert_eq!(
                c.cancel_affinity(&AffinitySpec::new(akey())).unwrap().code,
                ReturnCode::Ok
            );
        }
        t.join().unwrap();
    }

    #[test]
    fn retry_uses_a_fresh_nonce_and_same_request_id() {
        let (addr, t) = scripted(|s| {
            let mut buf = [0u8; MAX_DATAGRAM];
            let (n, _) = s.recv_from(&mut buf).unwrap();
            let first = Envelope::open(&buf[..n]).unwrap().header;
            let (first_id, first_nonce) = (first.request_id, first.nonce);
            let mut seen = None;
            answer(s, WEB1_KEY, "web1", |h, r| {
                seen = Some((h.request_id, r.request_nonce));
                r.remaining_secs = 7;
            });
            let (id, nonce) = seen.unwrap();
            assert_eq!(id, first_id);
            assert_ne!(nonce, first_nonce);
        });
        let mut c = ControlClient::new(addr, "web1", WEB1_KEY).unwrap();
        c.set_timeout(Duration::from_millis(100));
        c.set_retries(5);
        let r = c
            .create_affinity(&AffinitySpec::new(akey()), Duration::from_secs(7))
            .unwrap();
        assert_eq!(r.remaining_secs, 7);
        t.join().unwrap();
    }

    #[test]
    fn durations_round_up_to_seconds() {
        assert_eq!(duration_secs(Duration::from_millis(1)), 1);
        assert_eq!(duration_secs(Duration::from_millis(1001)), 2);
        assert_eq!(duration_secs(Duration::ZERO), 1);
        assert_eq!(duration_secs(Duration::from_secs(u64::MAX)), u32::MAX);
        // "As long as allowed": the longest, not a wrap to one second.
        assert_eq!(duration_secs(Duration::MAX), u32::MAX);
        assert!(ControlClient::new("127.0.0.1:1".parse().unwrap(), "x", b"short").is_err());
        assert!(ControlClient::new("127.0.0.1:1".parse().unwrap(), "", WEB1_KEY).is_err());
        // Retries are bounded, as the Python client's.
        let mut c = ControlClient::new("127.0.0.1:1".parse().unwrap(), "x", WEB1_KEY).unwrap();
        c.set_retries(u32::MAX);
        assert_eq!(c.retries, MAX_RETRIES);
    }

    /// A notification is taken once, and only while its timestamp is near
    /// this host's clock: a repeat is dropped however many came between,
    /// and one stamped long ago (played back) or far ahead is refused.
    #[test]
    fn notifications_are_taken_once_and_only_when_fresh() {
        use crate::protocol::message::encode_ended;
        let mut web1 =
            ControlClient::new("127.0.0.1:1".parse().unwrap(), "web1", WEB1_KEY).unwrap();
        let to = SocketAddr::new(
            "127.0.0.1".parse().unwrap(),
            web1.local_addr().unwrap().port(),
        );
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let key = Key::new(WEB1_KEY).unwrap();
        let notice = EndedNotice {
            key: akey(),
            owner: "web1".into(),
            reason: EndReason::Expired,
        };
        let send = |stamp: u64, nonce: u64| {
            let header = Header {
                msg_type: MsgType::AffinityEnded as u8,
                request_id: 1,
                timestamp_ms: stamp,
                nonce,
                name: "web1",
            };
            let mut buf = vec![0; MAX_DATAGRAM];
            let n = encode_ended(&mut buf, &header, &key, &notice).unwrap();
            sock.send_to(&buf[..n], to).unwrap();
        };
        let wait = Duration::from_millis(300);
        let now = unix_ms(SystemTime::now());
        send(now, 7);
        assert_eq!(web1.recv_ended(wait).unwrap(), Some(notice.clone()));
        // 300 others (more than a fixed memory of 256 would hold), in
        // batches the socket's buffer takes.
        for batch in 0..6 {
            for i in 0..50 {
                send(now, 1000 + batch * 50 + i);
            }
            for _ in 0..50 {
                assert!(web1.recv_ended(wait).unwrap().is_some());
            }
        }
        send(now, 7);
        assert_eq!(web1.recv_ended(wait).unwrap(), None, "the repeat");
        send(0, 8);
        send(now + 3_600_000, 9);
        assert_eq!(web1.recv_ended(wait).unwrap(), None, "stale and future");
        assert_eq!(web1.ignored(), 3);
    }

    /// A server, web1's client of it, where web1's notices go, and one.
    fn notice_bed() -> (ControlServer, ControlClient, SocketAddr, EndedNotice) {
        let cfg = ServerConfig::new(Allowlist::new(Vec::new()), keyring());
        let server = ControlServer::bind("127.0.0.1:0".parse().unwrap(), cfg).unwrap();
        let web1 = ControlClient::new(server.local_addr().unwrap(), "web1", WEB1_KEY).unwrap();
        let to = SocketAddr::new(
            "127.0.0.1".parse().unwrap(),
            web1.local_addr().unwrap().port(),
        );
        let notice = EndedNotice {
            key: akey(),
            owner: "web1".into(),
            reason: EndReason::Expired,
        };
        (server, web1, to, notice)
    }

    #[test]
    fn recv_ended_returns_as_soon_as_a_notice_arrives() {
        let (mut server, mut web1, to, notice) = notice_bed();
        server.send_ended(to, "web1", &notice).unwrap();
        // The notice is in the socket, not yet queued: recv_ended must
        // return it without waiting out its timeout.
        let timeout = Duration::from_secs(30);
        let started = Instant::now();
        let got = web1.recv_ended(timeout).unwrap();
        assert!(started.elapsed() < timeout, "waited out the whole timeout");
        assert_eq!(got, Some(notice));
    }

    /// A zero timeout takes what has arrived, without waiting.
    #[test]
    fn recv_ended_without_a_wait_takes_a_notice_in_the_socket() {
        let (mut server, mut web1, to, notice) = notice_bed();
        assert_eq!(web1.recv_ended(Duration::ZERO).unwrap(), None);
        server.send_ended(to, "web1", &notice).unwrap();
        // On the loopback the datagram is in the socket once sent.
        assert_eq!(web1.recv_ended(Duration::ZERO).unwrap(), Some(notice));
        assert_eq!(web1.recv_ended(Duration::ZERO).unwrap(), None);
    }

    /// Past its deadline the client still reads what has arrived, but only
    /// a bounded number of datagrams, whether junk or authentic replies it
    /// is not waiting for (a replayed one, say): the rest stay in the
    /// socket for the next call.
    #[test]
    fn past_the_deadline_a_bounded_number_of_datagrams_are_read() {
        const SENT: u64 = 100;
        let mut web1 =
            ControlClient::new("127.0.0.1:1".parse().unwrap(), "web1", WEB1_KEY).unwrap();
        let to = SocketAddr::new(
            "127.0.0.1".parse().unwrap(),
            web1.local_addr().unwrap().port(),
        );
        let h = Header {
            msg_type: MsgType::Reply as u8,
            request_id: 1,
            timestamp_ms: 1,
            nonce: 1,
            name: "web1",
        };
        let r = Reply::new(MsgType::AffinityCancel as u8, 1, ReturnCode::Ok);
        let mut stale = [0u8; MAX_DATAGRAM];
        let len = encode_reply(&mut stale, &h, &Key::new(WEB1_KEY).unwrap(), &r).unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        // On the loopback each is in the socket once sent.
        for i in 0..SENT {
            let d: &[u8] = if i % 2 == 0 { b"junk" } else { &stale[..len] };
            peer.send_to(d, to).unwrap();
        }
        assert_eq!(web1.recv_ended(Duration::ZERO).unwrap(), None);
        let first = web1.ignored();
        assert!(first < SENT, "read {first} of {SENT}");
        assert_eq!(first, u64::from(LATE_READS));
        while web1.ignored() < SENT {
            let before = web1.ignored();
            assert_eq!(web1.recv_ended(Duration::ZERO).unwrap(), None);
            assert!(web1.ignored() > before, "the rest are read by later calls");
        }
        assert_eq!(web1.ignored(), SENT);
    }

    #[test]
    fn limit_refusals_are_refused_errors_with_their_code() {
        for code in [
            ReturnCode::QuotaExceeded,
            ReturnCode::RateLimited,
            ReturnCode::Unavailable,
        ] {
            let mut r = Reply::new(MsgType::AffinityCreate as u8, 1, code);
            r.message = std::borrow::Cow::Borrowed("why");
            let e = ok(r).unwrap_err();
            assert_eq!(e.code(), Some(code));
            assert_eq!(e.is_rate_limited(), code == ReturnCode::RateLimited);
            assert_eq!(e.is_unavailable(), code == ReturnCode::Unavailable);
            assert_eq!(e.to_string(), format!("{}: why", code.name()));
        }
        assert_eq!(ClientError::Timeout { attempts: 3 }.code(), None);
    }
}
