//! The control protocol's wire format (version 1), specified in
//! docs/PROTOCOL.md.
//!
//! A message is one UDP datagram: a fixed header, a length-prefixed name,
//! a body that depends on the message type, and an HMAC-SHA256 tag over
//! everything before it. All integers are big-endian. Decoding is a checked
//! reader over the datagram (names borrow from it): every truncation, excess
//! byte, unknown enum value or inconsistent field is an error, never a panic.
//! Encoding writes into a caller's buffer.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::net::{family, mask_addr, max_prefix};
use crate::protocol::auth::{Key, TAG_LEN};
use crate::types::{
    BackendState, Declared, EndReason, Family, PortMatch, MAX_NAME_LEN, PROTO_TCP, PROTO_UDP,
};

/// First two bytes of every message.
pub const MAGIC: [u8; 2] = *b"PD";
/// The protocol version this module speaks.
pub const VERSION: u8 = 1;
/// Longest reply message text.
pub const MAX_TEXT_LEN: usize = 512;
/// Largest datagram sent or accepted (requests, replies and notifications):
/// fits an Ethernet MTU with IPv6 and tunnel headroom, so never fragmented.
pub const MAX_DATAGRAM: usize = 1400;
/// Bytes before the name: magic 2, version 1, type 1, flags 1, request id 4,
/// timestamp 8, nonce 8, name length 1.
pub const FIXED_HEADER_LEN: usize = 26;
/// Smallest possible message: fixed header, a 1-byte name, no body, the tag.
pub const MIN_DATAGRAM: usize = FIXED_HEADER_LEN + 1 + TAG_LEN;
/// The sender name of the operator (all rights).
pub const ADMIN_NAME: &str = "admin";

/// Reply flag: more list entries or stats bytes follow.
pub const REPLY_FLAG_MORE: u8 = 0x01;

/// Message types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MsgType {
    AffinityCreate = 1,
    AffinityExtend = 2,
    AffinityCancel = 3,
    AffinityList = 4,
    BackendList = 5,
    BackendSetWeight = 6,
    BackendAdd = 7,
    BackendRemove = 8,
    Stats = 9,
    /// Re-read the configuration file (admin only).
    Reload = 10,
    /// A backend declares its own state (UP, DRAIN, DOWN); the admin any
    /// backend's.
    BackendState = 11,
    Reply = 0x80,
    AffinityEnded = 0x81,
}

impl MsgType {
    pub const ALL: [MsgType; 13] = [
        MsgType::AffinityCreate,
        MsgType::AffinityExtend,
        MsgType::AffinityCancel,
        MsgType::AffinityList,
        MsgType::BackendList,
        MsgType::BackendSetWeight,
        MsgType::BackendAdd,
        MsgType::BackendRemove,
        MsgType::Stats,
        MsgType::Reload,
        MsgType::BackendState,
        MsgType::Reply,
        MsgType::AffinityEnded,
    ];

    pub fn from_u8(v: u8) -> Option<MsgType> {
        MsgType::ALL.iter().copied().find(|t| *t as u8 == v)
    }

    /// Sent by applications and operators to the distributor.
    pub fn is_request(self) -> bool {
        (self as u8) < 0x80
    }

    pub fn name(self) -> &'static str {
        match self {
            MsgType::AffinityCreate => "AFFINITY_CREATE",
            MsgType::AffinityExtend => "AFFINITY_EXTEND",
            MsgType::AffinityCancel => "AFFINITY_CANCEL",
            MsgType::AffinityList => "AFFINITY_LIST",
            MsgType::BackendList => "BACKEND_LIST",
            MsgType::BackendSetWeight => "BACKEND_SET_WEIGHT",
            MsgType::BackendAdd => "BACKEND_ADD",
            MsgType::BackendRemove => "BACKEND_REMOVE",
            MsgType::Stats => "STATS",
            MsgType::Reload => "RELOAD",
            MsgType::BackendState => "BACKEND_STATE",
            MsgType::Reply => "REPLY",
            MsgType::AffinityEnded => "AFFINITY_ENDED",
        }
    }
}

/// The outcome of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReturnCode {
    Ok = 0,
    /// An equal affinity key is owned by another backend (named in the reply).
    Conflict = 1,
    NotFound = 2,
    /// The request is well authenticated but its content is not acceptable.
    Invalid = 3,
    NotAuthorized = 4,
    TableFull = 5,
    /// The distributor failed to carry out a valid request.
    Internal = 6,
    /// A message type this distributor does not implement.
    Unsupported = 7,
    /// The owner holds as many affinities as its service allows one
    /// backend (the quota is named in the message).
    QuotaExceeded = 8,
    /// The sender made more requests per second than it may; retry later.
    RateLimited = 9,
    /// The backend is draining or down: it may not create or extend
    /// affinities.
    Draining = 10,
    /// Cluster mode: the shared table (etcd) cannot be reached, so nothing
    /// was accepted; or a change was sent and its outcome is unknown (the
    /// table, listed again, tells).
    Unavailable = 11,
    /// A code this build does not know, decoded from a newer distributor's
    /// reply (codes are added within version 1): a refusal, which the
    /// reply's message explains. Never sent: not in [`ReturnCode::ALL`].
    Unknown = 255,
}

impl ReturnCode {
    pub const ALL: [ReturnCode; 12] = [
        ReturnCode::Ok,
        ReturnCode::Conflict,
        ReturnCode::NotFound,
        ReturnCode::Invalid,
        ReturnCode::NotAuthorized,
        ReturnCode::TableFull,
        ReturnCode::Internal,
        ReturnCode::Unsupported,
        ReturnCode::QuotaExceeded,
        ReturnCode::RateLimited,
        ReturnCode::Draining,
        ReturnCode::Unavailable,
    ];

    pub fn from_u8(v: u8) -> Option<ReturnCode> {
        ReturnCode::ALL.get(usize::from(v)).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            ReturnCode::Ok => "OK",
            ReturnCode::Conflict => "CONFLICT",
            ReturnCode::NotFound => "NOT_FOUND",
            ReturnCode::Invalid => "INVALID",
            ReturnCode::NotAuthorized => "NOT_AUTHORIZED",
            ReturnCode::TableFull => "TABLE_FULL",
            ReturnCode::Internal => "INTERNAL",
            ReturnCode::Unsupported => "UNSUPPORTED",
            ReturnCode::QuotaExceeded => "QUOTA_EXCEEDED",
            ReturnCode::RateLimited => "RATE_LIMITED",
            ReturnCode::Draining => "DRAINING",
            ReturnCode::Unavailable => "UNAVAILABLE",
            ReturnCode::Unknown => "UNKNOWN",
        }
    }
}

impl fmt::Display for ReturnCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------
// Errors

/// Why a datagram could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The datagram ends before a field does.
    Truncated,
    /// Bytes left over after the last field of the body.
    TrailingBytes,
    BadMagic,
    /// A version this module does not speak.
    BadVersion(u8),
    /// A field holds a value the format does not allow; the text names it.
    Invalid(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("message truncated"),
            DecodeError::TrailingBytes => f.write_str("unexpected bytes after the body"),
            DecodeError::BadMagic => f.write_str("not a pktdist control message (bad magic)"),
            DecodeError::BadVersion(v) => {
                write!(f, "protocol version {v} not supported (this is {VERSION})")
            }
            DecodeError::Invalid(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Why a message could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The buffer (or [`MAX_DATAGRAM`]) is too small.
    NoRoom,
    /// A field cannot be represented; the text names it.
    Invalid(&'static str),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::NoRoom => f.write_str("message does not fit in one datagram"),
            EncodeError::Invalid(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for EncodeError {}

// ---------------------------------------------------------------------------
// Reader and writer

/// A checked big-endian reader over a byte slice.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A name: u8 length (0..=64) and UTF-8 bytes. Empty means absent.
    pub fn opt_name(&mut self) -> Result<Option<&'a str>, DecodeError> {
        let len = usize::from(self.u8()?);
        if len > MAX_NAME_LEN {
            return Err(DecodeError::Invalid("name longer than 64 bytes"));
        }
        let b = self.bytes(len)?;
        let s = std::str::from_utf8(b).map_err(|_| DecodeError::Invalid("name is not UTF-8"))?;
        Ok(if s.is_empty() { None } else { Some(s) })
    }

    /// A name that must be present.
    pub fn name(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        self.opt_name()?.ok_or(DecodeError::Invalid(what))
    }

    /// Text: u16 length (0..=512) and UTF-8 bytes.
    pub fn text(&mut self) -> Result<&'a str, DecodeError> {
        let len = usize::from(self.u16()?);
        if len > MAX_TEXT_LEN {
            return Err(DecodeError::Invalid("message text longer than 512 bytes"));
        }
        std::str::from_utf8(self.bytes(len)?)
            .map_err(|_| DecodeError::Invalid("message text is not UTF-8"))
    }

    /// An address: family byte (4 or 6, or 0 = absent) and 4 or 16 bytes.
    pub fn opt_ip(&mut self) -> Result<Option<IpAddr>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            4 => Ok(Some(IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)))),
            6 => Ok(Some(IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)))),
            _ => Err(DecodeError::Invalid("address family must be 0, 4 or 6")),
        }
    }

    pub fn ip(&mut self, what: &'static str) -> Result<IpAddr, DecodeError> {
        self.opt_ip()?.ok_or(DecodeError::Invalid(what))
    }

    /// An optional socket address: an optional address, then a port if present.
    pub fn opt_sockaddr(&mut self) -> Result<Option<SocketAddr>, DecodeError> {
        match self.opt_ip()? {
            None => Ok(None),
            Some(ip) => Ok(Some(SocketAddr::new(ip, self.u16()?))),
        }
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
}

/// A checked big-endian writer into a caller's buffer.
pub struct Writer<'b> {
    buf: &'b mut [u8],
    pos: usize,
}

impl<'b> Writer<'b> {
    pub fn new(buf: &'b mut [u8]) -> Writer<'b> {
        Writer { buf, pos: 0 }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Forgets everything written after `pos` (to undo a partial entry).
    pub fn truncate(&mut self, pos: usize) {
        self.pos = self.pos.min(pos);
    }

    pub fn bytes(&mut self, b: &[u8]) -> Result<(), EncodeError> {
        let end = self.pos.checked_add(b.len()).ok_or(EncodeError::NoRoom)?;
        self.buf
            .get_mut(self.pos..end)
            .ok_or(EncodeError::NoRoom)?
            .copy_from_slice(b);
        self.pos = end;
        Ok(())
    }

    pub fn u8(&mut self, v: u8) -> Result<(), EncodeError> {
        self.bytes(&[v])
    }

    pub fn u16(&mut self, v: u16) -> Result<(), EncodeError> {
        self.bytes(&v.to_be_bytes())
    }

    pub fn u32(&mut self, v: u32) -> Result<(), EncodeError> {
        self.bytes(&v.to_be_bytes())
    }

    pub fn u64(&mut self, v: u64) -> Result<(), EncodeError> {
        self.bytes(&v.to_be_bytes())
    }

    pub fn opt_name(&mut self, name: Option<&str>) -> Result<(), EncodeError> {
        let name = name.unwrap_or("");
        if name.len() > MAX_NAME_LEN {
            return Err(EncodeError::Invalid("name longer than 64 bytes"));
        }
        self.u8(name.len() as u8)?;
        self.bytes(name.as_bytes())
    }

    pub fn name(&mut self, name: &str, what: &'static str) -> Result<(), EncodeError> {
        if name.is_empty() {
            return Err(EncodeError::Invalid(what));
        }
        self.opt_name(Some(name))
    }

    /// Text, cut at a character boundary to [`MAX_TEXT_LEN`] bytes.
    pub fn text(&mut self, text: &str) -> Result<(), EncodeError> {
        let mut end = text.len().min(MAX_TEXT_LEN);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16)?;
        self.bytes(&text.as_bytes()[..end])
    }

    pub fn opt_ip(&mut self, ip: Option<IpAddr>) -> Result<(), EncodeError> {
        match ip {
            None => self.u8(0),
            Some(IpAddr::V4(a)) => {
                self.u8(4)?;
                self.bytes(&a.octets())
            }
            Some(IpAddr::V6(a)) => {
                self.u8(6)?;
                self.bytes(&a.octets())
            }
        }
    }

    pub fn ip(&mut self, ip: IpAddr) -> Result<(), EncodeError> {
        self.opt_ip(Some(ip))
    }

    pub fn opt_sockaddr(&mut self, sa: Option<SocketAddr>) -> Result<(), EncodeError> {
        match sa {
            None => self.u8(0),
            Some(sa) => {
                self.ip(sa.ip())?;
                self.u16(sa.port())
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Affinity keys

/// The service an affinity applies to: VIP, port and IP protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceAddr {
    pub addr: IpAddr,
    pub port: u16,
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
}

impl ServiceAddr {
    pub fn tcp(addr: SocketAddr) -> ServiceAddr {
        ServiceAddr {
            addr: addr.ip(),
            port: addr.port(),
            proto: PROTO_TCP,
        }
    }

    pub fn udp(addr: SocketAddr) -> ServiceAddr {
        ServiceAddr {
            addr: addr.ip(),
            port: addr.port(),
            proto: PROTO_UDP,
        }
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.ip(self.addr)?;
        w.u16(self.port)?;
        w.u8(self.proto)
    }

    fn decode(r: &mut Reader<'_>) -> Result<ServiceAddr, DecodeError> {
        let addr = r.ip("service address missing")?;
        let port = r.u16()?;
        let proto = r.u8()?;
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return Err(DecodeError::Invalid("protocol must be 6 (TCP) or 17 (UDP)"));
        }
        Ok(ServiceAddr { addr, port, proto })
    }
}

impl fmt::Display for ServiceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            PROTO_TCP => "tcp",
            PROTO_UDP => "udp",
            _ => "?",
        };
        write!(f, "{}/{proto}", SocketAddr::new(self.addr, self.port))
    }
}

impl PortMatch {
    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        let (kind, lo, hi) = match *self {
            PortMatch::Any => (0, 0, 0),
            PortMatch::One(p) => (1, p, p),
            PortMatch::Range(lo, hi) => {
                if lo > hi {
                    return Err(EncodeError::Invalid("port range low end above high end"));
                }
                (2, lo, hi)
            }
        };
        w.u8(kind)?;
        w.u16(lo)?;
        w.u16(hi)
    }

    fn decode(r: &mut Reader<'_>) -> Result<PortMatch, DecodeError> {
        let kind = r.u8()?;
        let lo = r.u16()?;
        let hi = r.u16()?;
        match kind {
            0 if lo == 0 && hi == 0 => Ok(PortMatch::Any),
            0 => Err(DecodeError::Invalid(
                "port kind ANY requires low = high = 0",
            )),
            1 if lo == hi => Ok(PortMatch::One(lo)),
            1 => Err(DecodeError::Invalid("port kind ONE requires low = high")),
            2 if lo <= hi => Ok(PortMatch::Range(lo, hi)),
            2 => Err(DecodeError::Invalid("port range low end above high end")),
            _ => Err(DecodeError::Invalid(
                "port kind must be 0 (any), 1 (one) or 2 (range)",
            )),
        }
    }
}

/// What an affinity matches: a service, a client network and client ports.
/// The client address is kept with its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service: ServiceAddr,
    pub client: IpAddr,
    pub prefix_len: u8,
    pub ports: PortMatch,
}

impl AffinityKey {
    /// A key for `client/prefix_len` on `service`, any client port. Fails if
    /// the families differ or the prefix is too long.
    pub fn new(
        service: ServiceAddr,
        client: IpAddr,
        prefix_len: u8,
    ) -> Result<AffinityKey, &'static str> {
        let key = AffinityKey {
            service,
            client: mask_addr(client, prefix_len),
            prefix_len,
            ports: PortMatch::Any,
        };
        key.check()?;
        Ok(key)
    }

    /// The same key restricted to `ports`.
    pub fn with_ports(mut self, ports: PortMatch) -> AffinityKey {
        self.ports = ports;
        self
    }

    /// Address family of the service and client.
    pub fn family(&self) -> Family {
        match self.service.addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn check(&self) -> Result<(), &'static str> {
        if self.service.addr.is_ipv4() != self.client.is_ipv4() {
            return Err("client and service address families differ");
        }
        if self.prefix_len > max_prefix(family(self.client)) {
            return Err("client prefix length too long for the address family");
        }
        if self.service.proto != PROTO_TCP && self.service.proto != PROTO_UDP {
            return Err("protocol must be 6 (TCP) or 17 (UDP)");
        }
        if let PortMatch::Range(lo, hi) = self.ports {
            if lo > hi {
                return Err("port range low end above high end");
            }
        }
        Ok(())
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        self.check().map_err(EncodeError::Invalid)?;
        self.service.encode(w)?;
        w.ip(self.client)?;
        w.u8(self.prefix_len)?;
        self.ports.encode(w)
    }

    fn decode(r: &mut Reader<'_>) -> Result<AffinityKey, DecodeError> {
        let service = ServiceAddr::decode(r)?;
        let client = r.ip("client address missing")?;
        let prefix_len = r.u8()?;
        let ports = PortMatch::decode(r)?;
        let key = AffinityKey {
            service,
            client: mask_addr(client, prefix_len),
            prefix_len,
            ports,
        };
        key.check().map_err(DecodeError::Invalid)?;
        Ok(key)
    }
}

impl fmt::Display for AffinityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} client {}/{} ports {}",
            self.service, self.client, self.prefix_len, self.ports
        )
    }
}

// ---------------------------------------------------------------------------
// Requests

/// The body of AFFINITY_CREATE, AFFINITY_EXTEND and AFFINITY_CANCEL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityOp<'a> {
    pub key: AffinityKey,
    /// Seconds; at least 1 for create and extend, ignored (sent as 0) for cancel.
    pub duration_secs: u32,
    /// The backend that owns the affinity. On the wire it may be absent,
    /// meaning the sender; the server fills it in before its handler sees it.
    pub owner: Option<&'a str>,
    /// Where the ended notification goes. On the wire it may be absent,
    /// meaning the request's source address; the server fills it in.
    pub notify: Option<SocketAddr>,
}

impl<'a> AffinityOp<'a> {
    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        self.key.encode(w)?;
        w.u32(self.duration_secs)?;
        w.opt_name(self.owner)?;
        w.opt_sockaddr(self.notify)
    }

    fn decode(r: &mut Reader<'a>, needs_duration: bool) -> Result<AffinityOp<'a>, DecodeError> {
        let key = AffinityKey::decode(r)?;
        let duration_secs = r.u32()?;
        if needs_duration && duration_secs == 0 {
            return Err(DecodeError::Invalid("duration must be at least 1 second"));
        }
        let owner = r.opt_name()?;
        let notify = r.opt_sockaddr()?;
        Ok(AffinityOp {
            key,
            duration_secs,
            owner,
            notify,
        })
    }
}

/// The body of BACKEND_ADD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec<'a> {
    pub service: &'a str,
    pub backend: &'a str,
    pub addr: IpAddr,
    pub mac: Option<[u8; 6]>,
    pub weight: u32,
}

fn encode_mac(w: &mut Writer<'_>, mac: Option<[u8; 6]>) -> Result<(), EncodeError> {
    match mac {
        None => w.u8(0),
        Some(m) => {
            w.u8(1)?;
            w.bytes(&m)
        }
    }
}

fn decode_mac(r: &mut Reader<'_>) -> Result<Option<[u8; 6]>, DecodeError> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(r.array::<6>()?)),
        _ => Err(DecodeError::Invalid("MAC presence flag must be 0 or 1")),
    }
}

/// A decoded request body. Names borrow from the datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    AffinityCreate(AffinityOp<'a>),
    AffinityExtend(AffinityOp<'a>),
    AffinityCancel(AffinityOp<'a>),
    /// One page of affinities, optionally only one service's or one owner's,
    /// starting at entry `offset`; `limit` = most entries wanted (0 = as many
    /// as fit; the server lowers it to what fits in a reply).
    AffinityList {
        service: Option<ServiceAddr>,
        owner: Option<&'a str>,
        offset: u32,
        limit: u16,
    },
    /// One page of backends, optionally of one service (by name).
    BackendList {
        service: Option<&'a str>,
        offset: u32,
        limit: u16,
    },
    BackendSetWeight {
        service: &'a str,
        backend: &'a str,
        weight: u32,
    },
    BackendAdd(BackendSpec<'a>),
    BackendRemove {
        service: &'a str,
        backend: &'a str,
    },
    /// Statistics as JSON text, in chunks: the first request has token 0 and
    /// offset 0; later ones repeat the token of the first reply.
    Stats {
        token: u32,
        offset: u32,
    },
    /// Re-read the configuration file the instance was started with and
    /// apply its services, backends, keys and allowed networks.
    Reload,
    /// A backend's declared state. `service` absent: every service with a
    /// backend of that name. `backend` absent on the wire means the
    /// sender; the server fills it in (and refuses a backend naming
    /// another).
    BackendState {
        service: Option<&'a str>,
        backend: Option<&'a str>,
        state: Declared,
    },
}

impl<'a> Request<'a> {
    pub fn msg_type(&self) -> MsgType {
        match self {
            Request::AffinityCreate(_) => MsgType::AffinityCreate,
            Request::AffinityExtend(_) => MsgType::AffinityExtend,
            Request::AffinityCancel(_) => MsgType::AffinityCancel,
            Request::AffinityList { .. } => MsgType::AffinityList,
            Request::BackendList { .. } => MsgType::BackendList,
            Request::BackendSetWeight { .. } => MsgType::BackendSetWeight,
            Request::BackendAdd(_) => MsgType::BackendAdd,
            Request::BackendRemove { .. } => MsgType::BackendRemove,
            Request::Stats { .. } => MsgType::Stats,
            Request::Reload => MsgType::Reload,
            Request::BackendState { .. } => MsgType::BackendState,
        }
    }

    pub fn encode_body(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        match self {
            Request::AffinityCreate(op) | Request::AffinityExtend(op) => {
                if op.duration_secs == 0 {
                    return Err(EncodeError::Invalid("duration must be at least 1 second"));
                }
                op.encode(w)
            }
            Request::AffinityCancel(op) => op.encode(w),
            Request::AffinityList {
                service,
                owner,
                offset,
                limit,
            } => {
                match service {
                    None => w.u8(0)?,
                    Some(s) => {
                        w.u8(1)?;
                        s.encode(w)?;
                    }
                }
                w.opt_name(*owner)?;
                w.u32(*offset)?;
                w.u16(*limit)
            }
            Request::BackendList {
                service,
                offset,
                limit,
            } => {
                w.opt_name(*service)?;
                w.u32(*offset)?;
                w.u16(*limit)
            }
            Request::BackendSetWeight {
                service,
                backend,
                weight,
            } => {
                w.name(service, "service name missing")?;
                w.name(backend, "backend name missing")?;
                w.u32(*weight)
            }
            Request::BackendAdd(b) => {
                w.name(b.service, "service name missing")?;
                w.name(b.backend, "backend name missing")?;
                w.ip(b.addr)?;
                encode_mac(w, b.mac)?;
                w.u32(b.weight)
            }
            Request::BackendRemove { service, backend } => {
                w.name(service, "service name missing")?;
                w.name(backend, "backend name missing")
            }
            Request::Reload => Ok(()),
            Request::BackendState {
                service,
                backend,
                state,
            } => {
                w.opt_name(*service)?;
                w.opt_name(*backend)?;
                w.u8(*state as u8)
            }
            Request::Stats { token, offset } => {
                w.u32(*token)?;
                w.u32(*offset)
            }
        }
    }

    /// Decodes the body of a request of type `ty`.
    pub fn decode_body(ty: MsgType, body: &'a [u8]) -> Result<Request<'a>, DecodeError> {
        let mut r = Reader::new(body);
        let req = match ty {
            MsgType::AffinityCreate => Request::AffinityCreate(AffinityOp::decode(&mut r, true)?),
            MsgType::AffinityExtend => Request::AffinityExtend(AffinityOp::decode(&mut r, true)?),
            MsgType::AffinityCancel => Request::AffinityCancel(AffinityOp::decode(&mut r, false)?),
            MsgType::AffinityList => {
                let service = match r.u8()? {
                    0 => None,
                    1 => Some(ServiceAddr::decode(&mut r)?),
                    _ => return Err(DecodeError::Invalid("service filter flag must be 0 or 1")),
                };
                Request::AffinityList {
                    service,
                    owner: r.opt_name()?,
                    offset: r.u32()?,
                    limit: r.u16()?,
                }
            }
            MsgType::BackendList => Request::BackendList {
                service: r.opt_name()?,
                offset: r.u32()?,
                limit: r.u16()?,
            },
            MsgType::BackendSetWeight => Request::BackendSetWeight {
                service: r.name("service name missing")?,
                backend: r.name("backend name missing")?,
                weight: r.u32()?,
            },
            MsgType::BackendAdd => Request::BackendAdd(BackendSpec {
                service: r.name("service name missing")?,
                backend: r.name("backend name missing")?,
                addr: r.ip("backend address missing")?,
                mac: decode_mac(&mut r)?,
                weight: r.u32()?,
            }),
            MsgType::BackendRemove => Request::BackendRemove {
                service: r.name("service name missing")?,
                backend: r.name("backend name missing")?,
            },
            MsgType::Stats => Request::Stats {
                token: r.u32()?,
                offset: r.u32()?,
            },
            MsgType::Reload => Request::Reload,
            MsgType::BackendState => Request::BackendState {
                service: r.opt_name()?,
                backend: r.opt_name()?,
                state: Declared::from_u8(r.u8()?)
                    .ok_or(DecodeError::Invalid("backend state must be 1, 2 or 3"))?,
            },
            MsgType::Reply | MsgType::AffinityEnded => {
                return Err(DecodeError::Invalid("not a request type"))
            }
        };
        r.finish()?;
        Ok(req)
    }
}

// ---------------------------------------------------------------------------
// Replies

/// One affinity as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AffinityEntry {
    pub key: AffinityKey,
    pub owner: String,
    /// Seconds until it expires (0 = due now; static affinities: u32::MAX).
    pub remaining_secs: u32,
    pub notify: Option<SocketAddr>,
}

impl AffinityEntry {
    pub fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        self.key.encode(w)?;
        w.name(&self.owner, "affinity owner missing")?;
        w.u32(self.remaining_secs)?;
        w.opt_sockaddr(self.notify)
    }

    fn decode(r: &mut Reader<'_>) -> Result<AffinityEntry, DecodeError> {
        Ok(AffinityEntry {
            key: AffinityKey::decode(r)?,
            owner: r.name("affinity owner missing")?.to_string(),
            remaining_secs: r.u32()?,
            notify: r.opt_sockaddr()?,
        })
    }
}

/// One backend as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendEntry {
    pub service: String,
    pub backend: String,
    pub addr: IpAddr,
    pub mac: Option<[u8; 6]>,
    /// 0 = draining.
    pub weight: u32,
    /// Up, draining or down.
    pub state: BackendState,
    /// Seconds since it entered `state`.
    pub state_secs: u32,
    /// What its application declared for itself.
    pub app: Declared,
    /// What the operator declared for it.
    pub admin: Declared,
    /// Its health checks' verdict; `None`: none reported (checks off).
    pub healthy: Option<bool>,
    /// Why its last check failed, while failing.
    pub check_error: Option<String>,
}

impl BackendEntry {
    /// A backend as described for BACKEND_ADD: up, nothing declared, no
    /// health reported.
    pub fn new(
        service: &str,
        backend: &str,
        addr: IpAddr,
        mac: Option<[u8; 6]>,
        weight: u32,
    ) -> BackendEntry {
        BackendEntry {
            service: service.to_string(),
            backend: backend.to_string(),
            addr,
            mac,
            weight,
            state: BackendState::Up,
            state_secs: 0,
            app: Declared::Up,
            admin: Declared::Up,
            healthy: None,
            check_error: None,
        }
    }

    pub fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.name(&self.service, "service name missing")?;
        w.name(&self.backend, "backend name missing")?;
        w.ip(self.addr)?;
        encode_mac(w, self.mac)?;
        w.u32(self.weight)?;
        w.u8(self.state as u8)?;
        w.u32(self.state_secs)?;
        w.u8(self.app as u8)?;
        w.u8(self.admin as u8)?;
        w.u8(match self.healthy {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        })?;
        w.text(self.check_error.as_deref().unwrap_or(""))
    }

    fn decode(r: &mut Reader<'_>) -> Result<BackendEntry, DecodeError> {
        let declared =
            |v: u8| Declared::from_u8(v).ok_or(DecodeError::Invalid("unknown declared state"));
        Ok(BackendEntry {
            service: r.name("service name missing")?.to_string(),
            backend: r.name("backend name missing")?.to_string(),
            addr: r.ip("backend address missing")?,
            mac: decode_mac(r)?,
            weight: r.u32()?,
            state: BackendState::from_u8(r.u8()?)
                .ok_or(DecodeError::Invalid("unknown backend state"))?,
            state_secs: r.u32()?,
            app: declared(r.u8()?)?,
            admin: declared(r.u8()?)?,
            healthy: match r.u8()? {
                0 => None,
                1 => Some(true),
                2 => Some(false),
                _ => return Err(DecodeError::Invalid("health must be 0, 1 or 2")),
            },
            check_error: Some(r.text()?)
                .filter(|t| !t.is_empty())
                .map(str::to_string),
        })
    }
}

/// The list or text a reply carries.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum ReplyPayload {
    #[default]
    None,
    /// A page of affinities; `next_offset` is where the next page starts
    /// (meaningful when the reply's `more` is set).
    Affinities {
        next_offset: u32,
        entries: Vec<AffinityEntry>,
    },
    Backends {
        next_offset: u32,
        entries: Vec<BackendEntry>,
    },
    /// A chunk of the statistics JSON: bytes `offset..offset+chunk.len()` of
    /// `total_len`, from the snapshot named by `token`.
    Stats {
        token: u32,
        total_len: u32,
        offset: u32,
        chunk: Vec<u8>,
    },
}

const PAYLOAD_NONE: u8 = 0;
const PAYLOAD_AFFINITIES: u8 = 1;
const PAYLOAD_BACKENDS: u8 = 2;
const PAYLOAD_STATS: u8 = 3;

/// A REPLY body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Type of the request answered (0 if it could not be told).
    pub request_type: u8,
    /// Nonce of the request answered: ties the reply to one attempt.
    pub request_nonce: u64,
    pub code: ReturnCode,
    /// More entries or bytes follow (paginated replies).
    pub more: bool,
    /// Seconds left on the affinity concerned (create, extend, conflict).
    pub remaining_secs: u32,
    /// Current owner of the affinity (for CONFLICT).
    pub owner: Option<String>,
    pub message: Cow<'static, str>,
    pub payload: ReplyPayload,
}

impl Reply {
    /// A reply with only a code.
    pub fn new(request_type: u8, request_nonce: u64, code: ReturnCode) -> Reply {
        Reply {
            request_type,
            request_nonce,
            code,
            more: false,
            remaining_secs: 0,
            owner: None,
            message: Cow::Borrowed(""),
            payload: ReplyPayload::None,
        }
    }

    pub fn encode_body(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u8(self.request_type)?;
        w.u64(self.request_nonce)?;
        w.u8(self.code as u8)?;
        w.u8(if self.more { REPLY_FLAG_MORE } else { 0 })?;
        w.u32(self.remaining_secs)?;
        w.opt_name(self.owner.as_deref())?;
        w.text(&self.message)?;
        match &self.payload {
            ReplyPayload::None => w.u8(PAYLOAD_NONE),
            ReplyPayload::Affinities {
                next_offset,
                entries,
            } => {
                w.u8(PAYLOAD_AFFINITIES)?;
                w.u32(*next_offset)?;
                w.u16(u16::try_from(entries.len()).map_err(|_| EncodeError::NoRoom)?)?;
                entries.iter().try_for_each(|e| e.encode(w))
            }
            ReplyPayload::Backends {
                next_offset,
                entries,
            } => {
                w.u8(PAYLOAD_BACKENDS)?;
                w.u32(*next_offset)?;
                w.u16(u16::try_from(entries.len()).map_err(|_| EncodeError::NoRoom)?)?;
                entries.iter().try_for_each(|e| e.encode(w))
            }
            ReplyPayload::Stats {
                token,
                total_len,
                offset,
                chunk,
            } => {
                w.u8(PAYLOAD_STATS)?;
                w.u32(*token)?;
                w.u32(*total_len)?;
                w.u32(*offset)?;
                w.u16(u16::try_from(chunk.len()).map_err(|_| EncodeError::NoRoom)?)?;
                w.bytes(chunk)
            }
        }
    }

    pub fn decode_body(body: &[u8]) -> Result<Reply, DecodeError> {
        let mut r = Reader::new(body);
        let request_type = r.u8()?;
        let request_nonce = r.u64()?;
        // A code added after this build is a refusal all the same.
        let code = ReturnCode::from_u8(r.u8()?).unwrap_or(ReturnCode::Unknown);
        let flags = r.u8()?;
        if flags & !REPLY_FLAG_MORE != 0 {
            return Err(DecodeError::Invalid("unknown reply flags"));
        }
        let remaining_secs = r.u32()?;
        let owner = r.opt_name()?.map(str::to_string);
        let message = Cow::Owned(r.text()?.to_string());
        let payload = match r.u8()? {
            PAYLOAD_NONE => ReplyPayload::None,
            PAYLOAD_AFFINITIES => {
                let next_offset = r.u32()?;
                let n = r.u16()?;
                let mut entries = Vec::with_capacity(usize::from(n).min(64));
                for _ in 0..n {
                    entries.push(AffinityEntry::decode(&mut r)?);
                }
                ReplyPayload::Affinities {
                    next_offset,
                    entries,
                }
            }
            PAYLOAD_BACKENDS => {
                let next_offset = r.u32()?;
                let n = r.u16()?;
                let mut entries = Vec::with_capacity(usize::from(n).min(64));
                for _ in 0..n {
                    entries.push(BackendEntry::decode(&mut r)?);
                }
                ReplyPayload::Backends {
                    next_offset,
                    entries,
                }
            }
            PAYLOAD_STATS => {
                let token = r.u32()?;
                let total_len = r.u32()?;
                let offset = r.u32()?;
                let n = r.u16()?;
                let chunk = r.bytes(usize::from(n))?.to_vec();
                if u64::from(offset) + chunk.len() as u64 > u64::from(total_len) {
                    return Err(DecodeError::Invalid("stats chunk beyond total length"));
                }
                ReplyPayload::Stats {
                    token,
                    total_len,
                    offset,
                    chunk,
                }
            }
            _ => return Err(DecodeError::Invalid("unknown reply payload kind")),
        };
        r.finish()?;
        Ok(Reply {
            request_type,
            request_nonce,
            code,
            more: flags & REPLY_FLAG_MORE != 0,
            remaining_secs,
            owner,
            message,
            payload,
        })
    }
}

// ---------------------------------------------------------------------------
// Ended notification

/// An AFFINITY_ENDED body: which affinity ended, whose it was, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndedNotice {
    pub key: AffinityKey,
    pub owner: String,
    pub reason: EndReason,
}

impl EndedNotice {
    pub fn encode_body(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        self.key.encode(w)?;
        w.name(&self.owner, "affinity owner missing")?;
        w.u8(self.reason as u8)
    }

    pub fn decode_body(body: &[u8]) -> Result<EndedNotice, DecodeError> {
        let mut r = Reader::new(body);
        let key = AffinityKey::decode(&mut r)?;
        let owner = r.name("affinity owner missing")?.to_string();
        // A reason added after this build: the affinity ended all the same.
        let reason = EndReason::from_u8(r.u8()?).unwrap_or(EndReason::Unknown);
        r.finish()?;
        Ok(EndedNotice { key, owner, reason })
    }
}

// ---------------------------------------------------------------------------
// Envelope

/// The header fields of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header<'a> {
    /// Raw message type (see [`MsgType`]); kept raw so that an authenticated
    /// sender of an unknown type can be told so.
    pub msg_type: u8,
    pub request_id: u32,
    /// Milliseconds since the UNIX epoch.
    pub timestamp_ms: u64,
    pub nonce: u64,
    /// The name whose key signs the message: the sender of a request, the
    /// requester a reply answers, the owner a notification concerns.
    pub name: &'a str,
}

/// A datagram split into its parts, not yet authenticated.
#[derive(Clone, Copy, Debug)]
pub struct Envelope<'a> {
    pub header: Header<'a>,
    pub body: &'a [u8],
    /// Everything the tag covers.
    pub signed: &'a [u8],
    pub tag: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Splits a datagram. Checks magic, version, flags and the name; the body
    /// is left for the type's decoder (after authentication).
    pub fn open(datagram: &'a [u8]) -> Result<Envelope<'a>, DecodeError> {
        if datagram.len() < 3 {
            return Err(DecodeError::Truncated);
        }
        if datagram[..2] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        if datagram[2] != VERSION {
            return Err(DecodeError::BadVersion(datagram[2]));
        }
        if datagram.len() < MIN_DATAGRAM {
            return Err(DecodeError::Truncated);
        }
        let split = datagram.len() - TAG_LEN;
        let (signed, tag) = datagram.split_at(split);
        let mut r = Reader::new(signed);
        r.bytes(3)?;
        let msg_type = r.u8()?;
        if r.u8()? != 0 {
            return Err(DecodeError::Invalid("header flags must be 0"));
        }
        let request_id = r.u32()?;
        let timestamp_ms = r.u64()?;
        let nonce = r.u64()?;
        let name = r.name("sender name missing")?;
        let body = r.bytes(r.remaining())?;
        Ok(Envelope {
            header: Header {
                msg_type,
                request_id,
                timestamp_ms,
                nonce,
                name,
            },
            body,
            signed,
            tag,
        })
    }

    pub fn verify(&self, key: &Key) -> bool {
        key.verify(self.signed, self.tag)
    }
}

/// Writes a whole message (header, body by `body`, tag under `key`) into
/// `buf`, at most [`MAX_DATAGRAM`] bytes; returns its length.
pub fn encode_message(
    buf: &mut [u8],
    msg_type: MsgType,
    header: &Header<'_>,
    key: &Key,
    body: impl FnOnce(&mut Writer<'_>) -> Result<(), EncodeError>,
) -> Result<usize, EncodeError> {
    let limit = buf.len().min(MAX_DATAGRAM);
    let buf = &mut buf[..limit];
    let body_end = {
        let mut w = Writer::new(&mut buf[..limit.saturating_sub(TAG_LEN)]);
        w.bytes(&MAGIC)?;
        w.u8(VERSION)?;
        w.u8(msg_type as u8)?;
        w.u8(0)?;
        w.u32(header.request_id)?;
        w.u64(header.timestamp_ms)?;
        w.u64(header.nonce)?;
        w.name(header.name, "sender name missing")?;
        body(&mut w)?;
        w.len()
    };
    let tag = key.sign(&buf[..body_end]);
    buf[body_end..body_end + TAG_LEN].copy_from_slice(&tag);
    Ok(body_end + TAG_LEN)
}

/// Encodes a request.
pub fn encode_request(
    buf: &mut [u8],
    header: &Header<'_>,
    key: &Key,
    request: &Request<'_>,
) -> Result<usize, EncodeError> {
    encode_message(buf, request.msg_type(), header, key, |w| {
        request.encode_body(w)
    })
}

/// Encodes a reply.
pub fn encode_reply(
    buf: &mut [u8],
    header: &Header<'_>,
    key: &Key,
    reply: &Reply,
) -> Result<usize, EncodeError> {
    encode_message(buf, MsgType::Reply, header, key, |w| reply.encode_body(w))
}

/// Encodes an ended notification.
pub fn encode_ended(
    buf: &mut [u8],
    header: &Header<'_>,
    key: &Key,
    notice: &EndedNotice,
) -> Result<usize, EncodeError> {
    encode_message(buf, MsgType::AffinityEnded, header, key, |w| {
        notice.encode_body(w)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::new(b"0123456789abcdef0123456789abcdef").unwrap()
    }

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn svc4() -> ServiceAddr {
        ServiceAddr::tcp("192.0.2.10:80".parse().unwrap())
    }

    fn svc6() -> ServiceAddr {
        ServiceAddr::udp("[2001:db8::10]:53".parse().unwrap())
    }

    fn hdr(name: &str) -> Header<'_> {
        Header {
            msg_type: 0,
            request_id: 0xdead_beef,
            timestamp_ms: 1_700_000_000_123,
            nonce: 0x0102_0304_0506_0708,
            name,
        }
    }

    fn requests() -> Vec<Request<'static>> {
        let k4 = AffinityKey::new(svc4(), v4("198.51.100.0"), 24)
            .unwrap()
            .with_ports(PortMatch::Range(1000, 2000));
        let k6 = AffinityKey::new(svc6(), v4("2001:db8:1::"), 48)
            .unwrap()
            .with_ports(PortMatch::One(5353));
        let op = AffinityOp {
            key: k4,
            duration_secs: 300,
            owner: Some("web1"),
            notify: Some("10.0.0.5:9000".parse().unwrap()),
        };
        let op6 = AffinityOp {
            key: k6,
            duration_secs: 1,
            owner: None,
            notify: None,
        };
        vec![
            Request::AffinityCreate(op),
            Request::AffinityCreate(op6),
            Request::AffinityExtend(op6),
            Request::AffinityCancel(AffinityOp {
                duration_secs: 0,
                ..op
            }),
            Request::AffinityList {
                service: Some(svc6()),
                owner: Some("web2"),
                offset: 17,
                limit: 5,
            },
            Request::AffinityList {
                service: None,
                owner: None,
                offset: 0,
                limit: 0,
            },
            Request::BackendList {
                service: Some("web"),
                offset: 3,
                limit: 0,
            },
            Request::BackendList {
                service: None,
                offset: 0,
                limit: 9,
            },
            Request::BackendSetWeight {
                service: "web",
                backend: "web1",
                weight: 0,
            },
            Request::BackendAdd(BackendSpec {
                service: "web",
                backend: "web9",
                addr: v4("10.0.0.9"),
                mac: Some([2, 0, 0, 0, 0, 9]),
                weight: 100,
            }),
            Request::BackendAdd(BackendSpec {
                service: "dns",
                backend: "dns1",
                addr: v4("2001:db8::53"),
                mac: None,
                weight: 1,
            }),
            Request::BackendRemove {
                service: "web",
                backend: "web9",
            },
            Request::Stats {
                token: 7,
                offset: 1200,
            },
            Request::BackendState {
                service: None,
                backend: None,
                state: Declared::Drain,
            },
            Request::BackendState {
                service: Some("web"),
                backend: Some("web2"),
                state: Declared::Down,
            },
        ]
    }

    #[test]
    fn every_request_roundtrips() {
        let k = key();
        let mut seen = std::collections::HashSet::new();
        for req in requests() {
            let mut buf = [0u8; MAX_DATAGRAM];
            let n = encode_request(&mut buf, &hdr("web1"), &k, &req).unwrap();
            let env = Envelope::open(&buf[..n]).unwrap();
            assert!(env.verify(&k));
            assert_eq!(env.header.name, "web1");
            assert_eq!(env.header.request_id, 0xdead_beef);
            assert_eq!(env.header.timestamp_ms, 1_700_000_000_123);
            assert_eq!(env.header.nonce, 0x0102_0304_0506_0708);
            let ty = MsgType::from_u8(env.header.msg_type).unwrap();
            assert_eq!(ty, req.msg_type());
            assert!(ty.is_request());
            assert_eq!(Request::decode_body(ty, env.body).unwrap(), req);
            seen.insert(ty);
        }
        assert_eq!(seen.len(), 10, "every request type covered");
    }

    /// The worked example of docs/PROTOCOL.md, computed independently (with
    /// Python's hmac module): an implementation in another language can check
    /// itself against the same bytes.
    #[test]
    fn documented_example_matches_byte_for_byte() {
        const EXAMPLE: &str = "5044010100000000010000018bcfe568001122334455667788047765623104c000020a\
                               00500604c63364001800000000000000012c00007dc75ded5878a5a0fe8f6b8daea421\
                               df8238d54b2104c871ea5c26792061884f";
        let key: Vec<u8> = (0u8..32).collect();
        let key = Key::new(&key).unwrap();
        let req = Request::AffinityCreate(AffinityOp {
            key: AffinityKey::new(svc4(), v4("198.51.100.0"), 24).unwrap(),
            duration_secs: 300,
            owner: None,
            notify: None,
        });
        let h = Header {
            msg_type: 0,
            request_id: 1,
            timestamp_ms: 1_700_000_000_000,
            nonce: 0x1122_3344_5566_7788,
            name: "web1",
        };
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = encode_request(&mut buf, &h, &key, &req).unwrap();
        let hex: String = buf[..n].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, EXAMPLE.replace(' ', ""));
        let env = Envelope::open(&buf[..n]).unwrap();
        assert!(env.verify(&key));
        assert_eq!(
            Request::decode_body(MsgType::AffinityCreate, env.body).unwrap(),
            req
        );
    }

    /// The replies of docs/PROTOCOL.md §6.5 to the worked example's request
    /// when a limit refuses it, byte for byte.
    #[test]
    fn documented_limit_replies() {
        let body = |code: ReturnCode, remaining: u32, owner: Option<&str>, msg: &str| {
            let mut r = Reply::new(MsgType::AffinityCreate as u8, 0x1122_3344_5566_7788, code);
            r.remaining_secs = remaining;
            r.owner = owner.map(str::to_string);
            r.message = Cow::Owned(msg.to_string());
            let mut buf = [0u8; MAX_DATAGRAM];
            let mut w = Writer::new(&mut buf);
            r.encode_body(&mut w).unwrap();
            let n = w.len();
            buf[..n].to_vec()
        };
        let expect = |fixed: &str, msg: &str| {
            let mut v: Vec<u8> = (0..fixed.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&fixed[i..i + 2], 16).unwrap())
                .collect();
            v.extend_from_slice(msg.as_bytes());
            v.push(0);
            v
        };
        let quota = "backend web1 holds 100 affinities on service web, its quota is 100 \
                     (max_affinities_per_backend); cancel one or let one end first";
        assert_eq!(
            body(ReturnCode::QuotaExceeded, 0, None, quota),
            expect("011122334455667788080000000000000080", quota)
        );
        let rate = "more than 20000 requests per second from web1; nothing was done, retry later";
        assert_eq!(
            body(ReturnCode::RateLimited, 0, None, rate),
            expect("01112233445566778809000000000000004c", rate)
        );
        let overlap = "overlaps 198.51.0.0/16 ports any of backend web2; service web refuses \
                       overlapping affinities (affinity_overlap = \"refuse\")";
        assert_eq!(
            body(ReturnCode::Conflict, 240, Some("web2"), overlap),
            expect("0111223344556677880100000000f00477656232007a", overlap)
        );
    }

    /// PROTOCOL.md's second worked example: web1 drains itself
    /// (BACKEND_STATE DRAIN, every service, the backend being the sender),
    /// its tag computed with Python's hmac module.
    #[test]
    fn documented_backend_state_example_matches_byte_for_byte() {
        const EXAMPLE: &str = "5044010b00000000020000018bcfe5680011223344556677880477656231000002\
                               cf785593adb63cf3697c728d7938a476f297665c771954fae4a555589a5b83e9";
        let key: Vec<u8> = (0u8..32).collect();
        let key = Key::new(&key).unwrap();
        let req = Request::BackendState {
            service: None,
            backend: None,
            state: Declared::Drain,
        };
        let h = Header {
            msg_type: 0,
            request_id: 2,
            timestamp_ms: 1_700_000_000_000,
            nonce: 0x1122_3344_5566_7788,
            name: "web1",
        };
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = encode_request(&mut buf, &h, &key, &req).unwrap();
        let hex: String = buf[..n].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, EXAMPLE.replace(' ', ""));
        let env = Envelope::open(&buf[..n]).unwrap();
        assert!(env.verify(&key));
        assert_eq!(
            Request::decode_body(MsgType::BackendState, env.body).unwrap(),
            req
        );
        // A state other than 1, 2 or 3 is refused.
        for bad in [0u8, 4, 0xff] {
            assert!(Request::decode_body(MsgType::BackendState, &[0, 0, bad]).is_err());
        }
    }

    #[test]
    fn header_layout_is_as_documented() {
        let mut buf = [0u8; MAX_DATAGRAM];
        let req = Request::Stats {
            token: 0,
            offset: 0,
        };
        let n = encode_request(&mut buf, &hdr("ab"), &key(), &req).unwrap();
        assert_eq!(&buf[..2], b"PD");
        assert_eq!(buf[2], 1);
        assert_eq!(buf[3], MsgType::Stats as u8);
        assert_eq!(buf[4], 0);
        assert_eq!(buf[5..9], [0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(buf[9..17], 1_700_000_000_123u64.to_be_bytes());
        assert_eq!(buf[17..25], [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(buf[25], 2);
        assert_eq!(&buf[26..28], b"ab");
        assert_eq!(n, 28 + 8 + TAG_LEN);
        assert_eq!(key().sign(&buf[..36]), buf[36..68]);
    }

    fn sample_replies() -> Vec<Reply> {
        let mut out = Vec::new();
        for code in ReturnCode::ALL {
            let mut r = Reply::new(MsgType::AffinityCreate as u8, 42, code);
            r.remaining_secs = 17;
            if code == ReturnCode::Conflict {
                r.owner = Some("web2".into());
            }
            r.message = Cow::Owned(format!("code {code}"));
            out.push(r);
        }
        let key = AffinityKey::new(svc4(), v4("198.51.100.7"), 32).unwrap();
        let mut r = Reply::new(MsgType::AffinityList as u8, 1, ReturnCode::Ok);
        r.more = true;
        r.payload = ReplyPayload::Affinities {
            next_offset: 2,
            entries: vec![
                AffinityEntry {
                    key,
                    owner: "web1".into(),
                    remaining_secs: 9,
                    notify: Some("[::1]:4000".parse().unwrap()),
                },
                AffinityEntry {
                    key: key.with_ports(PortMatch::One(80)),
                    owner: "web2".into(),
                    remaining_secs: u32::MAX,
                    notify: None,
                },
            ],
        };
        out.push(r);
        let mut r = Reply::new(MsgType::BackendList as u8, 2, ReturnCode::Ok);
        r.payload = ReplyPayload::Backends {
            next_offset: 1,
            entries: vec![
                BackendEntry::new("web", "web1", v4("10.0.0.1"), Some([2, 0, 0, 0, 0, 1]), 0),
                BackendEntry {
                    state: BackendState::Down,
                    state_secs: 42,
                    app: Declared::Drain,
                    admin: Declared::Down,
                    healthy: Some(false),
                    check_error: Some("connect: connection refused".into()),
                    ..BackendEntry::new("web", "web2", v4("10.0.0.2"), None, 7)
                },
            ],
        };
        out.push(r);
        let mut r = Reply::new(MsgType::Stats as u8, 3, ReturnCode::Ok);
        r.payload = ReplyPayload::Stats {
            token: 5,
            total_len: 100,
            offset: 90,
            chunk: b"0123456789".to_vec(),
        };
        out.push(r);
        out
    }

    #[test]
    fn every_reply_and_return_code_roundtrips() {
        let k = key();
        for reply in sample_replies() {
            let mut buf = [0u8; MAX_DATAGRAM];
            let n = encode_reply(&mut buf, &hdr("web1"), &k, &reply).unwrap();
            let env = Envelope::open(&buf[..n]).unwrap();
            assert!(env.verify(&k));
            assert_eq!(env.header.msg_type, MsgType::Reply as u8);
            assert_eq!(Reply::decode_body(env.body).unwrap(), reply);
        }
    }

    /// Codes are added within version 1: a reply with one this build does
    /// not know decodes as `Unknown`, a refusal, with its message intact.
    #[test]
    fn a_newer_return_code_decodes_as_unknown() {
        let mut r = Reply::new(MsgType::AffinityCreate as u8, 42, ReturnCode::Internal);
        r.message = Cow::Borrowed("a newer refusal");
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = encode_reply(&mut buf, &hdr("web1"), &key(), &r).unwrap();
        let env = Envelope::open(&buf[..n]).unwrap();
        // Request type (1) and nonce (8), then the code.
        assert_eq!(env.body[9], ReturnCode::Internal as u8);
        for raw in [ReturnCode::ALL.len() as u8, 200, 254, 255] {
            let mut body = env.body.to_vec();
            body[9] = raw;
            let got = Reply::decode_body(&body).unwrap();
            assert_eq!(got.code, ReturnCode::Unknown, "{raw}");
            assert_eq!(got.message, "a newer refusal");
        }
        assert_eq!(ReturnCode::from_u8(ReturnCode::ALL.len() as u8), None);
    }

    /// A notification with an end reason this build does not know still
    /// says which affinity ended (as `Unknown`), not nothing.
    #[test]
    fn a_newer_end_reason_decodes_as_unknown() {
        let notice = EndedNotice {
            key: AffinityKey::new(svc4(), v4("198.51.100.7"), 32).unwrap(),
            owner: "web1".into(),
            reason: EndReason::Expired,
        };
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = encode_ended(&mut buf, &hdr("web1"), &key(), &notice).unwrap();
        let env = Envelope::open(&buf[..n]).unwrap();
        // The reason is the body's last byte.
        let mut body = env.body.to_vec();
        assert_eq!(body.last(), Some(&(EndReason::Expired as u8)));
        *body.last_mut().unwrap() = 9;
        let got = EndedNotice::decode_body(&body).unwrap();
        assert_eq!((got.key, got.owner.as_str()), (notice.key, "web1"));
        assert_eq!(got.reason, EndReason::Unknown);
        assert_eq!(EndReason::from_u8(9), None);
    }

    #[test]
    fn ended_notice_roundtrips() {
        let k = key();
        for reason in [
            EndReason::Expired,
            EndReason::Cancelled,
            EndReason::BackendRemoved,
        ] {
            let notice = EndedNotice {
                key: AffinityKey::new(svc6(), v4("2001:db8::7"), 128).unwrap(),
                owner: "dns1".into(),
                reason,
            };
            let mut buf = [0u8; MAX_DATAGRAM];
            let n = encode_ended(&mut buf, &hdr("dns1"), &k, &notice).unwrap();
            let env = Envelope::open(&buf[..n]).unwrap();
            assert_eq!(env.header.msg_type, MsgType::AffinityEnded as u8);
            assert_eq!(EndedNotice::decode_body(env.body).unwrap(), notice);
        }
    }

    #[test]
    fn truncation_at_every_length_is_an_error() {
        let k = key();
        for req in requests() {
            let mut buf = [0u8; MAX_DATAGRAM];
            let n = encode_request(&mut buf, &hdr("web1"), &k, &req).unwrap();
            let env = Envelope::open(&buf[..n]).unwrap();
            let ty = req.msg_type();
            for cut in 0..env.body.len() {
                assert!(Request::decode_body(ty, &env.body[..cut]).is_err());
            }
            let mut longer = env.body.to_vec();
            longer.push(0);
            assert_eq!(
                Request::decode_body(ty, &longer),
                Err(DecodeError::TrailingBytes)
            );
            for cut in 0..MIN_DATAGRAM {
                assert!(Envelope::open(&buf[..cut]).is_err());
            }
        }
        for reply in sample_replies() {
            let mut buf = [0u8; MAX_DATAGRAM];
            let n = encode_reply(&mut buf, &hdr("x"), &k, &reply).unwrap();
            let env = Envelope::open(&buf[..n]).unwrap();
            for cut in 0..env.body.len() {
                assert!(Reply::decode_body(&env.body[..cut]).is_err());
            }
        }
    }

    #[test]
    fn bad_fields_are_refused() {
        let mut buf = [0u8; MAX_DATAGRAM];
        let req = requests()[0];
        let n = encode_request(&mut buf, &hdr("web1"), &key(), &req).unwrap();
        let body_at = FIXED_HEADER_LEN + 4;
        let check = |off: usize, val: u8| {
            let mut d = buf[..n].to_vec();
            d[off] = val;
            d
        };
        // magic, version, flags
        assert_eq!(
            Envelope::open(&check(0, b'X')).unwrap_err(),
            DecodeError::BadMagic
        );
        assert_eq!(
            Envelope::open(&check(2, 2)).unwrap_err(),
            DecodeError::BadVersion(2)
        );
        assert!(Envelope::open(&check(4, 1)).is_err());
        // name length 0 and beyond the datagram
        assert!(Envelope::open(&check(25, 0)).is_err());
        assert!(Envelope::open(&check(25, 200)).is_err());
        let body = |d: &[u8]| {
            let env = Envelope::open(d).unwrap();
            Request::decode_body(MsgType::AffinityCreate, env.body).map(|_| ())
        };
        // service family, protocol, client family mismatch, prefix, port kind
        assert!(body(&check(body_at, 5)).is_err());
        assert!(body(&check(body_at + 7, 1)).is_err());
        assert!(body(&check(body_at + 8, 6)).is_err());
        assert!(body(&check(body_at + 13, 33)).is_err());
        assert!(body(&check(body_at + 14, 3)).is_err());
        // duration 0 on create
        let mut d = buf[..n].to_vec();
        d[body_at + 19..body_at + 23].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(
            body(&d),
            Err(DecodeError::Invalid("duration must be at least 1 second"))
        );
        assert!(body(&buf[..n]).is_ok());
    }

    #[test]
    fn host_bits_are_cleared() {
        let k = AffinityKey::new(svc4(), v4("198.51.100.77"), 24).unwrap();
        assert_eq!(k.client, v4("198.51.100.0"));
        assert_eq!(k.family(), Family::V4);
        assert!(AffinityKey::new(svc4(), v4("2001:db8::1"), 24).is_err());
        assert!(AffinityKey::new(svc4(), v4("10.0.0.1"), 33).is_err());
    }

    #[test]
    fn oversize_encoding_is_refused() {
        let mut r = Reply::new(0, 0, ReturnCode::Ok);
        r.payload = ReplyPayload::Stats {
            token: 1,
            total_len: 5000,
            offset: 0,
            chunk: vec![b'x'; 2000],
        };
        let mut buf = [0u8; 4096];
        assert_eq!(
            encode_reply(&mut buf, &hdr("a"), &key(), &r),
            Err(EncodeError::NoRoom)
        );
        let mut small = [0u8; 40];
        assert_eq!(
            encode_request(
                &mut small,
                &hdr("a"),
                &key(),
                &Request::Stats {
                    token: 0,
                    offset: 0
                }
            ),
            Err(EncodeError::NoRoom)
        );
    }
}
