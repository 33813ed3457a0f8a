"""The control protocol's wire format, version 1 (docs/PROTOCOL.md).

Pure functions, no sockets: the client builds datagrams with the
``encode_*`` functions and reads what it receives with :func:`open_envelope`
and the ``decode_*`` functions. Decoding is a checked reader: a truncated
field, a leftover byte, an unknown flag, payload kind or port kind, a name or
text over its limit, or invalid UTF-8 raises :class:`Malformed`; nothing is
guessed. All integers are big-endian.

This module also turns the user's arguments (``"192.0.2.10:80"``,
``"198.51.100.0/24"``, ports, durations) into wire fields, with a clear
:class:`ValueError` or :class:`TypeError` for anything it cannot represent.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import math
import struct
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional, Tuple, Union

MAGIC = b"PD"
VERSION = 1
#: Largest datagram sent or accepted, in both directions.
MAX_DATAGRAM = 1400
#: Bytes before the name: magic 2, version 1, type 1, flags 1, request id 4,
#: timestamp 8, nonce 8, name length 1.
FIXED_HEADER_LEN = 26
TAG_LEN = 32
MIN_DATAGRAM = FIXED_HEADER_LEN + 1 + TAG_LEN
MAX_NAME_LEN = 64
MAX_TEXT_LEN = 512
MIN_KEY_LEN = 16
MAX_KEY_LEN = 128
#: Reply flag bit 0: more entries or bytes follow.
REPLY_FLAG_MORE = 0x01
#: Remaining seconds of a static affinity (from the configuration).
STATIC_REMAINING = 0xFFFFFFFF
U32_MAX = 0xFFFFFFFF
# Largest backend weight the distributor accepts (the wire field is a u32).
MAX_WEIGHT = 65535

PROTO_TCP = 6
PROTO_UDP = 17

PAYLOAD_NONE = 0
PAYLOAD_AFFINITIES = 1
PAYLOAD_BACKENDS = 2
PAYLOAD_STATS = 3

PORTS_ANY = 0
PORTS_ONE = 1
PORTS_RANGE = 2

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
#: Client ports as the API shows them: None = any port, an int = that one
#: port, a (low, high) tuple = that inclusive range.
Ports = Union[None, int, Tuple[int, int]]
#: Client ports as the API takes them: also ``"any"``, ``"443"`` or
#: ``"1000-1999"``, and a [low, high] list.
PortsArg = Union[None, int, str, Tuple[int, int], List[int]]
#: A client as the API takes it: ``"198.51.100.7"``, ``"198.51.100.0/24"``,
#: or an :mod:`ipaddress` address or network.
ClientArg = Union[str, IPAddress, IPNetwork]
#: A duration in seconds, or a timedelta.
DurationArg = Union[float, timedelta]
#: An address and port: ``"ip:port"``, ``"[v6]:port"`` or an (ip, port)
#: tuple, the ip a str or an :mod:`ipaddress` address.
SockaddrArg = Union[str, Tuple[Union[str, IPAddress], int]]
#: Raw bytes (a key, a request body).
BytesArg = Union[bytes, bytearray, memoryview]


class MsgType(enum.IntEnum):
    """Message types (PROTOCOL.md §4)."""

    AFFINITY_CREATE = 0x01
    AFFINITY_EXTEND = 0x02
    AFFINITY_CANCEL = 0x03
    AFFINITY_LIST = 0x04
    BACKEND_LIST = 0x05
    BACKEND_SET_WEIGHT = 0x06
    BACKEND_ADD = 0x07
    BACKEND_REMOVE = 0x08
    STATS = 0x09
    RELOAD = 0x0A
    BACKEND_STATE = 0x0B
    REPLY = 0x80
    AFFINITY_ENDED = 0x81


class ReturnCode(enum.IntEnum):
    """Return codes of a REPLY (PROTOCOL.md §6.5)."""

    OK = 0
    CONFLICT = 1
    NOT_FOUND = 2
    INVALID = 3
    NOT_AUTHORIZED = 4
    TABLE_FULL = 5
    INTERNAL = 6
    UNSUPPORTED = 7
    QUOTA_EXCEEDED = 8
    RATE_LIMITED = 9
    DRAINING = 10
    UNAVAILABLE = 11


class EndReason(enum.IntEnum):
    """Why an affinity ended (PROTOCOL.md §7)."""

    EXPIRED = 1
    CANCELLED = 2
    BACKEND_REMOVED = 3
    BACKEND_DOWN = 4


class Declared(enum.IntEnum):
    """A state a backend declares for itself, or the operator for any
    backend, in BACKEND_STATE (PROTOCOL.md §6.7)."""

    UP = 1
    DRAIN = 2
    DOWN = 3


#: A backend's state in a BACKEND_LIST entry, by wire value.
BACKEND_STATES = {1: "up", 2: "draining", 3: "down"}


def code_of(value: int) -> int:
    """`value` as a :class:`ReturnCode` if this client knows it, else the
    plain number (a code added by a later pktdist)."""
    try:
        return ReturnCode(value)
    except ValueError:
        return value


def code_name(value: int) -> str:
    try:
        return ReturnCode(value).name
    except ValueError:
        return f"CODE_{value}"


def reason_of(value: int) -> int:
    try:
        return EndReason(value)
    except ValueError:
        return value


def reason_name(value: int) -> str:
    try:
        return EndReason(value).name
    except ValueError:
        return f"REASON_{value}"


class Malformed(Exception):
    """A received datagram that does not decode; the text says where."""


# ---------------------------------------------------------------------------
# The user's arguments


def check_name(name: object, what: str) -> bytes:
    """A sender, owner or backend name: 1 to 64 bytes of UTF-8."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    b = name.encode("utf-8")
    if not 1 <= len(b) <= MAX_NAME_LEN:
        raise ValueError(f"{what} must be 1 to {MAX_NAME_LEN} bytes of UTF-8, got {len(b)}")
    return b


def check_key(key: object) -> bytes:
    """An HMAC key: 16 to 128 raw bytes."""
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"key must be bytes, not {type(key).__name__} "
            "(for a hex string use pktdist.key_from_hex)"
        )
    k = bytes(key)
    if not MIN_KEY_LEN <= len(k) <= MAX_KEY_LEN:
        raise ValueError(f"key must be {MIN_KEY_LEN} to {MAX_KEY_LEN} bytes, got {len(k)}")
    return k


def key_from_hex(text: str) -> bytes:
    """A key written in hex, as in pktdist's configuration and the CLI's
    ``--key``: surrounding whitespace and a ``0x`` prefix are allowed; 16 to
    128 bytes."""
    if not isinstance(text, str):
        raise TypeError(f"hex key must be a str, not {type(text).__name__}")
    s = text.strip()
    if s[:2] in ("0x", "0X"):
        s = s[2:]
    if not s:
        raise ValueError("the key is empty")
    if len(s) % 2:
        raise ValueError(f"the key has an odd number of hex digits ({len(s)})")
    for i, c in enumerate(s):
        if c not in "0123456789abcdefABCDEF":
            raise ValueError(f"the key has a non-hex character {c!r} at position {i + 1}")
    return check_key(bytes.fromhex(s))


def split_host_port(text: object, what: str) -> Tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` into (host, port)."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str like '192.0.2.10:80', not {type(text).__name__}")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"{what} {text!r}: write an IPv6 address as [addr]:port")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{what} {text!r}: expected host:port")
        if ":" in host:
            raise ValueError(f"{what} {text!r}: write an IPv6 address as [addr]:port")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{what} {text!r}: the port must be a number 0 to 65535")
    return host, int(port_text)


def parse_ip(text: str, what: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not an IP address") from None


@dataclass(frozen=True)
class Service:
    """A service on the wire: VIP, port, protocol (6 or 17)."""

    addr: IPAddress
    port: int
    proto: int

    def __str__(self) -> str:
        text = format_sockaddr(self.addr, self.port)
        return text if self.proto == PROTO_TCP else f"{text}/udp"

    @property
    def protocol(self) -> str:
        return "tcp" if self.proto == PROTO_TCP else "udp"


def parse_service(text: object) -> Service:
    """``"vip:port"`` (TCP), or with a ``/tcp`` or ``/udp`` suffix."""
    proto = PROTO_TCP
    if isinstance(text, str):
        base, slash, suffix = text.rpartition("/")
        if slash:
            if suffix.lower() == "tcp":
                proto = PROTO_TCP
            elif suffix.lower() == "udp":
                proto = PROTO_UDP
            else:
                raise ValueError(f"service {text!r}: the protocol suffix must be /tcp or /udp")
            text = base
    host, port = split_host_port(text, "service")
    return Service(parse_ip(host, "service"), port, proto)


def parse_client(client: object, service: Service) -> IPNetwork:
    """A client address (a /32 or /128) or CIDR network; host bits are
    cleared. Same address family as the service."""
    if isinstance(client, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        net = ipaddress.ip_network(client)
    elif isinstance(client, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        net = client
    elif isinstance(client, str):
        try:
            net = ipaddress.ip_network(client.strip(), strict=False)
        except ValueError:
            raise ValueError(
                f"client {client!r} is not an address or a network like 198.51.100.0/24"
            ) from None
    else:
        raise TypeError(
            f"client must be a str like '198.51.100.7' or '198.51.100.0/24', "
            f"not {type(client).__name__}"
        )
    if net.version != service.addr.version:
        raise ValueError(
            f"client {net} and service {service} are of different address families"
        )
    return net


def _port(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= 65535:
        raise ValueError(f"{what} {value} is not a port (0 to 65535)")
    return value


def parse_ports(ports: object) -> Tuple[int, int, int]:
    """Client ports as (kind, low, high): None or "any" = any port, an int
    or "N" = one port, a (low, high) tuple or "low-high" = a range."""
    if ports is None:
        return (PORTS_ANY, 0, 0)
    if isinstance(ports, str):
        s = ports.strip()
        if s.lower() == "any":
            return (PORTS_ANY, 0, 0)
        lo_text, dash, hi_text = s.partition("-")
        if not lo_text.strip().isdigit() or (dash and not hi_text.strip().isdigit()):
            raise ValueError(f"ports {ports!r}: expected 'any', a port or 'low-high'")
        if not dash:
            p = _port(int(lo_text), "port")
            return (PORTS_ONE, p, p)
        ports = (int(lo_text), int(hi_text))
    if isinstance(ports, (tuple, list)):
        if len(ports) != 2:
            raise ValueError(f"ports {ports!r}: a range is a (low, high) pair")
        lo = _port(ports[0], "low port")
        hi = _port(ports[1], "high port")
        if lo > hi:
            raise ValueError(f"ports {lo}-{hi}: the low end is above the high end")
        return (PORTS_RANGE, lo, hi)
    p = _port(ports, "ports")
    return (PORTS_ONE, p, p)


def ports_value(kind: int, lo: int, hi: int) -> Ports:
    """(kind, low, high) as the API shows it."""
    if kind == PORTS_ANY:
        return None
    if kind == PORTS_ONE:
        return lo
    return (lo, hi)


def duration_secs(duration: object, what: str = "duration") -> int:
    """Seconds (int, float or timedelta) rounded up to whole seconds: at
    least 1, at most 2**32 - 1."""
    if isinstance(duration, timedelta):
        seconds = duration.total_seconds()
    elif isinstance(duration, bool) or not isinstance(duration, (int, float)):
        raise TypeError(f"{what} must be seconds (int or float), not {type(duration).__name__}")
    else:
        seconds = duration
    if isinstance(seconds, float) and not math.isfinite(seconds):
        raise ValueError(f"{what} must be a finite number of seconds")
    if seconds <= 0:
        raise ValueError(f"{what} must be above 0 seconds, got {seconds}")
    whole = math.ceil(seconds)
    if whole > U32_MAX:
        raise ValueError(f"{what} {seconds} s is above the protocol's limit of {U32_MAX} s")
    return int(whole)


def parse_sockaddr(value: object, what: str) -> Tuple[IPAddress, int]:
    """An IP address and port: ``"host:port"``, ``"[v6]:port"`` or a
    (host, port) tuple, the host an IP address."""
    if isinstance(value, tuple) and len(value) == 2:
        host, port = value
        if not isinstance(host, str):
            host = str(host)
        return parse_ip(host, what), _port(port, f"{what} port")
    host, port = split_host_port(value, what)
    return parse_ip(host, what), port


def format_sockaddr(addr: IPAddress, port: int) -> str:
    if addr.version == 6:
        return f"[{addr}]:{port}"
    return f"{addr}:{port}"


# ---------------------------------------------------------------------------
# Encoding


def enc_name(name: Optional[bytes]) -> bytes:
    """``name``: u8 length and UTF-8; empty = absent."""
    b = name or b""
    return bytes([len(b)]) + b


def enc_addr(addr: Optional[IPAddress]) -> bytes:
    """``addr``: family 4 or 6 and the address bytes; family 0 = absent."""
    if addr is None:
        return b"\x00"
    return bytes([addr.version]) + addr.packed


def enc_sockaddr(sa: Optional[Tuple[IPAddress, int]]) -> bytes:
    if sa is None:
        return b"\x00"
    return enc_addr(sa[0]) + struct.pack(">H", sa[1])


def enc_service(s: Service) -> bytes:
    return enc_addr(s.addr) + struct.pack(">HB", s.port, s.proto)


def affinity_body(
    service: Service,
    client: IPNetwork,
    ports: Tuple[int, int, int],
    duration: int,
    owner: Optional[bytes],
    notify: Optional[Tuple[IPAddress, int]],
) -> bytes:
    """The body of AFFINITY_CREATE, _EXTEND and _CANCEL (PROTOCOL.md §5)."""
    return (
        enc_service(service)
        + enc_addr(client.network_address)
        + bytes([client.prefixlen])
        + struct.pack(">BHHI", ports[0], ports[1], ports[2], duration)
        + enc_name(owner)
        + enc_sockaddr(notify)
    )


def affinity_list_body(
    service: Optional[Service], owner: Optional[bytes], offset: int, limit: int = 0
) -> bytes:
    """The body of AFFINITY_LIST (PROTOCOL.md §6.1)."""
    head = b"\x00" if service is None else b"\x01" + enc_service(service)
    return head + enc_name(owner) + struct.pack(">IH", offset, limit)


def backend_list_body(service: Optional[bytes], offset: int, limit: int = 0) -> bytes:
    return enc_name(service) + struct.pack(">IH", offset, limit)


def set_weight_body(service: bytes, backend: bytes, weight: int) -> bytes:
    return enc_name(service) + enc_name(backend) + struct.pack(">I", weight)


def backend_state_body(service: Optional[bytes], backend: Optional[bytes], state: int) -> bytes:
    """The body of BACKEND_STATE (PROTOCOL.md §6.7): service (absent = every
    service with a backend of that name), backend (absent = the sender),
    state."""
    return enc_name(service) + enc_name(backend) + struct.pack(">B", state)


def stats_body(token: int, offset: int) -> bytes:
    return struct.pack(">II", token, offset)


def sign(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def encode_message(
    msg_type: int,
    request_id: int,
    timestamp_ms: int,
    nonce: int,
    name: bytes,
    body: bytes,
    key: bytes,
) -> bytes:
    """A whole datagram: header, name, body and the HMAC-SHA256 tag over
    everything before it (PROTOCOL.md §2)."""
    signed = (
        MAGIC
        + struct.pack(">BBBIQQ", VERSION, msg_type, 0, request_id, timestamp_ms, nonce)
        + enc_name(name)
        + body
    )
    datagram = signed + sign(key, signed)
    if len(datagram) > MAX_DATAGRAM:
        raise ValueError(f"the message would be {len(datagram)} bytes, above {MAX_DATAGRAM}")
    return datagram


# ---------------------------------------------------------------------------
# Decoding


class Reader:
    """A checked big-endian reader over one datagram's bytes."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise Malformed("message truncated")
        b = self.buf[self.pos : end]
        self.pos = end
        return b

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def opt_name(self) -> Optional[str]:
        n = self.u8()
        if n > MAX_NAME_LEN:
            raise Malformed("name longer than 64 bytes")
        try:
            s = self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("name is not UTF-8") from None
        return s or None

    def name(self, what: str) -> str:
        s = self.opt_name()
        if s is None:
            raise Malformed(what)
        return s

    def text(self) -> str:
        n = self.u16()
        if n > MAX_TEXT_LEN:
            raise Malformed("message text longer than 512 bytes")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("message text is not UTF-8") from None

    def opt_addr(self) -> Optional[IPAddress]:
        family = self.u8()
        if family == 0:
            return None
        if family == 4:
            return ipaddress.IPv4Address(self.take(4))
        if family == 6:
            return ipaddress.IPv6Address(self.take(16))
        raise Malformed("address family must be 0, 4 or 6")

    def addr(self, what: str) -> IPAddress:
        a = self.opt_addr()
        if a is None:
            raise Malformed(what)
        return a

    def opt_sockaddr(self) -> Optional[str]:
        a = self.opt_addr()
        if a is None:
            return None
        return format_sockaddr(a, self.u16())

    def mac(self) -> Optional[str]:
        flag = self.u8()
        if flag == 0:
            return None
        if flag == 1:
            return ":".join(f"{b:02x}" for b in self.take(6))
        raise Malformed("MAC presence flag must be 0 or 1")

    def finish(self) -> None:
        if self.pos != len(self.buf):
            raise Malformed("unexpected bytes after the body")


@dataclass(frozen=True)
class Envelope:
    """A received datagram split into its parts, not yet authenticated."""

    msg_type: int
    request_id: int
    timestamp_ms: int
    nonce: int
    name: bytes
    body: bytes
    signed: bytes
    tag: bytes


def open_envelope(datagram: bytes) -> Envelope:
    """Splits a datagram; checks size, magic, version, header flags and the
    name's length. The body is left for the type's decoder."""
    if len(datagram) > MAX_DATAGRAM:
        raise Malformed(f"datagram of {len(datagram)} bytes, above {MAX_DATAGRAM}")
    if len(datagram) < 3:
        raise Malformed("message truncated")
    if datagram[:2] != MAGIC:
        raise Malformed("not a pktdist control message (bad magic)")
    if datagram[2] != VERSION:
        raise Malformed(f"protocol version {datagram[2]} not supported (this is {VERSION})")
    if len(datagram) < MIN_DATAGRAM:
        raise Malformed("message truncated")
    signed, tag = datagram[:-TAG_LEN], datagram[-TAG_LEN:]
    r = Reader(signed)
    r.take(3)
    msg_type = r.u8()
    if r.u8() != 0:
        raise Malformed("header flags must be 0")
    request_id = r.u32()
    timestamp_ms = r.u64()
    nonce = r.u64()
    n = r.u8()
    if not 1 <= n <= MAX_NAME_LEN:
        raise Malformed("name length must be 1 to 64")
    name = r.take(n)
    return Envelope(msg_type, request_id, timestamp_ms, nonce, name, signed[r.pos :], signed, tag)


def verify(key: bytes, env: Envelope) -> bool:
    """Whether the tag is the HMAC of the signed bytes, compared in constant
    time."""
    return hmac.compare_digest(sign(key, env.signed), env.tag)


@dataclass(frozen=True)
class Key:
    """An affinity key as received: service, client network, ports."""

    service: Service
    client: IPNetwork
    ports: Tuple[int, int, int]


def read_key(r: Reader) -> Key:
    """The §5 key fields, checked as pktdist checks them."""
    addr = r.addr("service address missing")
    port = r.u16()
    proto = r.u8()
    if proto not in (PROTO_TCP, PROTO_UDP):
        raise Malformed("protocol must be 6 (TCP) or 17 (UDP)")
    client = r.addr("client address missing")
    prefix = r.u8()
    kind, lo, hi = r.u8(), r.u16(), r.u16()
    if addr.version != client.version:
        raise Malformed("client and service address families differ")
    if prefix > client.max_prefixlen:
        raise Malformed("client prefix length too long for the address family")
    if kind == PORTS_ANY:
        if lo or hi:
            raise Malformed("port kind ANY requires low = high = 0")
    elif kind == PORTS_ONE:
        if lo != hi:
            raise Malformed("port kind ONE requires low = high")
    elif kind == PORTS_RANGE:
        if lo > hi:
            raise Malformed("port range low end above high end")
    else:
        raise Malformed("port kind must be 0 (any), 1 (one) or 2 (range)")
    net = ipaddress.ip_network((client, prefix), strict=False)
    return Key(Service(addr, port, proto), net, (kind, lo, hi))


@dataclass(frozen=True)
class Affinity:
    """One affinity, as :meth:`pktdist.Client.list` returns it.

    Attributes:
        service: ``"vip:port"`` (a UDP service's ends in ``/udp``), as the
            client's methods take it.
        client: the client network, e.g. ``"198.51.100.0/24"`` (a single
            address is a /32 or /128).
        ports: None = any client port, an int = one port, a (low, high)
            tuple = an inclusive range.
        owner: the backend the clients are pinned to.
        remaining: seconds until it expires; None for a static affinity from
            the configuration (it never expires).
        notify: ``"host:port"`` where its AFFINITY_ENDED goes, or None.
        protocol: ``"tcp"`` or ``"udp"``.
    """

    service: str
    client: str
    ports: Ports
    owner: str
    remaining: Optional[int]
    notify: Optional[str]
    protocol: str = "tcp"

    @property
    def static(self) -> bool:
        """Declared in the configuration: never expires."""
        return self.remaining is None


@dataclass(frozen=True)
class Ended:
    """An AFFINITY_ENDED notification.

    Attributes:
        service, client, ports, protocol: the affinity's key, written as in
            :class:`Affinity`.
        owner: the backend that owned it.
        reason: an :class:`EndReason` (EXPIRED, CANCELLED, BACKEND_REMOVED,
            BACKEND_DOWN),
            or the plain number of a reason added by a later pktdist.
    """

    service: str
    client: str
    ports: Ports
    owner: str
    reason: int
    protocol: str = "tcp"

    @property
    def reason_name(self) -> str:
        return reason_name(self.reason)


@dataclass(frozen=True)
class Backend:
    """One backend of a service, as :meth:`pktdist.Client.backends` returns
    it.

    Attributes:
        state: "up", "draining" (weight 0, or DRAIN declared) or "down"
            (failing checks, or DOWN declared).
        state_secs: seconds since it entered `state`.
        app, admin: what the backend itself and the operator declared
            (:class:`Declared`).
        healthy: its health checks' verdict; None when none were reported.
        check_error: why its last check failed, while failing.
    """

    service: str
    name: str
    address: str
    mac: Optional[str]
    weight: int
    state: str = "up"
    state_secs: int = 0
    app: int = Declared.UP
    admin: int = Declared.UP
    healthy: Optional[bool] = None
    check_error: Optional[str] = None


@dataclass(frozen=True)
class Reply:
    """pktdist's answer to a request.

    Attributes:
        code: the return code (a :class:`ReturnCode`, or the plain number of
            a code added by a later pktdist).
        remaining: seconds left on the affinity concerned (OK to a create or
            extend; CONFLICT); for a static affinity from the configuration,
            which never expires, ``STATIC_REMAINING`` (0xFFFFFFFF, the
            wire's value), and :attr:`static` is true.
        owner: the current owner (CONFLICT), else None.
        message: human-readable detail, may be empty.
    """

    code: int
    remaining: int = 0
    owner: Optional[str] = None
    message: str = ""

    @property
    def code_name(self) -> str:
        return code_name(self.code)

    @property
    def static(self) -> bool:
        """The affinity concerned is static (declared in the configuration:
        it never expires)."""
        return self.remaining == STATIC_REMAINING


@dataclass(frozen=True)
class StatsChunk:
    token: int
    total_len: int
    offset: int
    chunk: bytes


@dataclass(frozen=True)
class ReplyBody:
    """A decoded REPLY body (PROTOCOL.md §6.4)."""

    request_type: int
    request_nonce: int
    reply: Reply
    more: bool
    payload_kind: int
    next_offset: int = 0
    affinities: Tuple[Affinity, ...] = ()
    backends: Tuple[Backend, ...] = ()
    stats: Optional[StatsChunk] = None


def decode_reply(body: bytes) -> ReplyBody:
    r = Reader(body)
    request_type = r.u8()
    request_nonce = r.u64()
    code = r.u8()
    flags = r.u8()
    if flags & ~REPLY_FLAG_MORE:
        raise Malformed("unknown reply flags")
    remaining = r.u32()
    owner = r.opt_name()
    message = r.text()
    kind = r.u8()
    next_offset = 0
    affinities: List[Affinity] = []
    backends: List[Backend] = []
    stats = None
    if kind == PAYLOAD_NONE:
        pass
    elif kind == PAYLOAD_AFFINITIES:
        next_offset = r.u32()
        for _ in range(r.u16()):
            key = read_key(r)
            entry_owner = r.name("affinity owner missing")
            left = r.u32()
            notify = r.opt_sockaddr()
            affinities.append(
                Affinity(
                    service=str(key.service),
                    client=str(key.client),
                    ports=ports_value(*key.ports),
                    owner=entry_owner,
                    remaining=None if left == STATIC_REMAINING else left,
                    notify=notify,
                    protocol=key.service.protocol,
                )
            )
    elif kind == PAYLOAD_BACKENDS:
        next_offset = r.u32()
        for _ in range(r.u16()):
            service = r.name("service name missing")
            backend = r.name("backend name missing")
            address = str(r.addr("backend address missing"))
            mac = r.mac()
            weight = r.u32()
            state = BACKEND_STATES.get(r.u8())
            if state is None:
                raise Malformed("unknown backend state")
            state_secs = r.u32()
            app, admin = r.u8(), r.u8()
            if app not in (1, 2, 3) or admin not in (1, 2, 3):
                raise Malformed("unknown declared state")
            health = r.u8()
            if health > 2:
                raise Malformed("health must be 0, 1 or 2")
            error = r.text()
            backends.append(
                Backend(
                    service,
                    backend,
                    address,
                    mac,
                    weight,
                    state=state,
                    state_secs=state_secs,
                    app=Declared(app),
                    admin=Declared(admin),
                    healthy=None if health == 0 else health == 1,
                    check_error=error or None,
                )
            )
    elif kind == PAYLOAD_STATS:
        token, total_len, offset = r.u32(), r.u32(), r.u32()
        chunk = r.take(r.u16())
        if offset + len(chunk) > total_len:
            raise Malformed("stats chunk beyond total length")
        stats = StatsChunk(token, total_len, offset, chunk)
    else:
        raise Malformed("unknown reply payload kind")
    r.finish()
    return ReplyBody(
        request_type=request_type,
        request_nonce=request_nonce,
        reply=Reply(code_of(code), remaining, owner, message),
        more=bool(flags & REPLY_FLAG_MORE),
        payload_kind=kind,
        next_offset=next_offset,
        affinities=tuple(affinities),
        backends=tuple(backends),
        stats=stats,
    )


def decode_ended(body: bytes) -> Ended:
    """An AFFINITY_ENDED body (PROTOCOL.md §7). An end reason this client
    does not know is kept as its number."""
    r = Reader(body)
    key = read_key(r)
    owner = r.name("affinity owner missing")
    reason = r.u8()
    if reason == 0:
        raise Malformed("end reason 0")
    r.finish()
    return Ended(
        service=str(key.service),
        client=str(key.client),
        ports=ports_value(*key.ports),
        owner=owner,
        reason=reason_of(reason),
        protocol=key.service.protocol,
    )
