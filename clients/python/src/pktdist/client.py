"""The client: signed requests over UDP, with retries, and the AFFINITY_ENDED
notifications that arrive on the same socket.

Each request is signed with the client's key and sent; if no authentic reply
comes within the timeout it is sent again, ``retries`` more times. A retry
keeps the request id but gets a new nonce, timestamp and HMAC (pktdist
refuses a repeated nonce as a replay). A reply is accepted only if its HMAC
verifies under the client's key, it carries the client's name, its request
id is the request's, it answers the request's type, and the nonce it echoes
is one of the nonces sent for that request (PROTOCOL.md §3.3, §3.4).
Anything else that arrives is dropped and counted in :attr:`Client.ignored`.

A server given by a name is resolved once, when the client is made, to
every address it has. Requests go to the first; when an attempt gets no
reply in time, or cannot be sent there, the following attempts (of this
request and of later ones) go to the next address, round the list. An
authentic reply fixes the address its attempt went to for later requests,
so a name works when any of its addresses is pktdist's (``localhost``
resolving to ::1 first, pktdist on 127.0.0.1). Addresses of both families
share one IPv6 socket that also speaks IPv4 (where the system allows it;
else the IPv4 addresses alone are used), so notifications still come to
one socket.

Notifications go to the address the create request came from (unless it
named another), so an application keeps one :class:`Client` for its life
and receives them with :meth:`Client.recv_ended` or
:meth:`Client.iter_ended`. Those that arrive while a request waits for its
reply are queued, not lost. Only notifications signed with this client's own
name and key are accepted: a backend's client receives its own affinities'
notifications (an ``admin`` client cannot verify those of a backend's
affinities and drops them).

A client may be shared by threads: requests from several threads proceed
concurrently (each has its own request id), and one thread may wait for
notifications meanwhile. Whichever thread is waiting reads the socket and
hands each datagram to the thread it belongs to. Create the client after a
``fork()``, not before: two processes must not share its socket.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Set, Tuple, Union

from . import _wire as w
from ._wire import Affinity, Backend, Ended, MsgType, Reply, ReplyBody, ReturnCode
from .errors import Error, ProtocolError, Timeout, refused

__all__ = ["Client", "DEFAULT_TIMEOUT", "DEFAULT_RETRIES"]

#: Seconds to wait for a reply to each attempt.
DEFAULT_TIMEOUT = 1.0
#: Largest per-attempt timeout accepted, in seconds (one day); above, the
#: client refuses it (ValueError).
MAX_TIMEOUT = 86400.0
#: Attempts after the first.
DEFAULT_RETRIES = 2
#: Seconds an AFFINITY_ENDED's timestamp may be from this host's clock
#: (pktdist stamps it as it sends it): one outside is refused, so a captured
#: notification cannot be played back later.
NOTICE_SKEW = 10.0
#: Notification nonces remembered at most, to drop repeats within the window.
SEEN_NOTICES = 65536
#: Milliseconds a request's timestamp may run ahead of this host's clock.
#: Requests are stamped 1 ms after the previous one when the clock has not
#: moved on (PROTOCOL.md §3.2); where that would be more than this ahead of
#: the clock (a burst of over 1,000 requests a second, or a clock stepped
#: back), the clock's own time is used instead. A timestamp pktdist never
#: answered needs no protecting: a sender's floor only rises to timestamps
#: of pairs it forgot, which are at least its clock skew behind its clock.
#: Without this bound the stamps would drift past pktdist's allowed skew
#: and every later request would go unanswered.
MAX_LEAD_MS = 1000
#: Notifications queued while nobody receives them; beyond, the oldest go
#: (counted in :attr:`Client.dropped_notices`).
MAX_QUEUED_NOTICES = 4096
#: Largest statistics document accepted.
MAX_STATS_LEN = 16 << 20
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
#: Datagrams read at most by a wait whose deadline has passed.
MAX_POLL_READS = 64
#: Longest single wait on the socket or the condition, in seconds (one day):
#: a longer timeout waits in several (select() and Condition.wait() refuse
#: values beyond the platform's limits with OverflowError).
MAX_WAIT = 86400.0


class _Pending:
    """A request waiting for its reply: its type, and the nonce of each
    attempt sent so far with the index of the server address it went to."""

    __slots__ = ("msg_type", "nonces")

    def __init__(self, msg_type: int) -> None:
        self.msg_type = msg_type
        self.nonces: Dict[int, int] = {}


def _random_u64() -> int:
    return int.from_bytes(os.urandom(8), "big")


def _show(sockaddr: Tuple[Any, ...]) -> str:
    """A resolved address as ``"ip:port"`` (``"[v6]:port"``)."""
    return w.format_sockaddr(w.parse_ip(sockaddr[0].split("%")[0], "server"), sockaddr[1])


def _dual_stack_socket() -> Optional[socket.socket]:
    """An IPv6 socket on any address that also speaks IPv4 (through
    IPv4-mapped addresses), or None where the system has no such thing."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    except OSError:
        return None
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
    except (OSError, AttributeError):
        sock.close()
        return None
    return sock


class Client:
    """A client of pktdist's control protocol, speaking as `name`.

    Args:
        server: pktdist's control address, ``"host:port"`` (``"[v6]:port"``
            for an IPv6 address); the host may be a name, resolved once here
            to all its addresses: an attempt without a reply moves on to
            the next, and the one that answers is kept (see the module's
            documentation).
        name: the backend's name in pktdist's configuration (its key's
            name), or ``"admin"``.
        key: that name's key, 16 to 128 raw bytes
            (:func:`pktdist.key_from_hex` reads the hex form).
        timeout: seconds to wait for a reply to each attempt, above 0 and
            at most :data:`MAX_TIMEOUT` (one day).
        retries: attempts after the first when no reply comes.
        bind: local ``"host:port"`` for the socket, where notifications
            arrive; by default any address, a free port. It limits the
            server's addresses to those of its family.

    Raises ValueError or TypeError for a bad argument, :class:`pktdist.Error`
    if the socket cannot be set up.
    """

    def __init__(
        self,
        server: str,
        name: str,
        key: w.BytesArg,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        bind: Optional[str] = None,
    ) -> None:
        self._name = w.check_name(name, "name")
        self._key = w.check_key(key)
        self._timeout = DEFAULT_TIMEOUT
        self._retries = DEFAULT_RETRIES
        self.timeout = timeout
        self.retries = retries
        host, port = w.split_host_port(server, "server")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except socket.gaierror as e:
            raise ValueError(f"server {server!r}: cannot resolve {host!r}: {e}") from None
        # Each address once, in the resolver's order.
        resolved: List[Tuple[int, Tuple[Any, ...]]] = []
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr) not in resolved:
                resolved.append((family, sockaddr))
        if not resolved:
            raise ValueError(f"server {server!r}: {host!r} has no IPv4 or IPv6 address")
        families = {family for family, _ in resolved}
        sock: Optional[socket.socket] = None
        if bind is not None:
            bind_host, bind_port = w.split_host_port(bind, "bind")
            family = socket.AF_INET6 if w.parse_ip(bind_host, "bind").version == 6 else socket.AF_INET
            if family not in families:
                raise ValueError(f"bind {bind!r} and server {server!r} are of different families")
            local: Tuple[Any, ...] = (bind_host, bind_port)
        elif len(families) > 1:
            family, local = socket.AF_INET6, ("::", 0)
            sock = _dual_stack_socket()
            if sock is None:
                family, local = socket.AF_INET, ("0.0.0.0", 0)
        else:
            family = resolved[0][0]
            local = ("::" if family == socket.AF_INET6 else "0.0.0.0", 0)
        # Where the requests go (an IPv4 address IPv4-mapped on a dual-stack
        # socket), and each as the `server` property shows it.
        self._targets: List[Tuple[Any, ...]] = []
        self._shown: List[str] = []
        for fam, sockaddr in resolved:
            if fam == family:
                self._targets.append(sockaddr)
            elif sock is not None and fam == socket.AF_INET:
                self._targets.append(("::ffff:" + sockaddr[0], sockaddr[1], 0, 0))
            else:
                continue
            self._shown.append(_show(sockaddr))
        try:
            if sock is None:
                sock = socket.socket(family, socket.SOCK_DGRAM)
                try:
                    sock.bind(local)
                except OSError:
                    sock.close()
                    raise
            self._sock = sock
            try:
                # Closing the client writes to this pair to wake a thread
                # that waits on the socket.
                self._wake_r, self._wake_w = socket.socketpair()
            except OSError:
                self._sock.close()
                raise
        except OSError as e:
            raise Error(f"control socket on {local[0]}:{local[1]}: {e}") from e
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._sock, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)

        self._cv = threading.Condition()
        # Guarded by _cv:
        self._closed = False
        self._reading = False
        self._next_id = int.from_bytes(os.urandom(4), "big")
        self._last_ts = 0
        # The index in _targets that requests go to now.
        self._current = 0
        self._pending: Dict[int, _Pending] = {}
        self._replies: Dict[int, ReplyBody] = {}
        self._ended: Deque[Ended] = deque()
        self._seen: Deque[Tuple[int, int]] = deque()
        self._seen_set: Set[int] = set()
        self._ignored = 0
        self._dropped_notices = 0

    # -- properties --------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name.decode("utf-8")

    @property
    def server(self) -> str:
        """The control address requests go to now, ``"ip:port"``: of those
        the server's name resolved to, the one that answered last or, after
        an attempt without a reply, the next."""
        with self._cv:
            return self._shown[self._current]

    @property
    def local_address(self) -> str:
        """This client's socket address, ``"ip:port"``: where notifications
        arrive (pktdist sees the request's source address, e.g. 127.0.0.1
        where this shows 0.0.0.0)."""
        host, port = self._sock.getsockname()[:2]
        return w.format_sockaddr(w.parse_ip(host.split("%")[0], "local"), port)

    @property
    def timeout(self) -> float:
        """Seconds to wait for a reply to each attempt (above 0, at most
        MAX_TIMEOUT: one day)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"timeout must be seconds (int or float), not {type(value).__name__}")
        if not 0 < value <= MAX_TIMEOUT:
            raise ValueError(
                f"timeout must be above 0 and at most {MAX_TIMEOUT:.0f} seconds (one day), got {value}"
            )
        self._timeout = float(value)

    @property
    def retries(self) -> int:
        """Attempts after the first."""
        return self._retries

    @retries.setter
    def retries(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"retries must be an int, not {type(value).__name__}")
        if not 0 <= value <= 100:
            raise ValueError(f"retries must be 0 to 100, got {value}")
        self._retries = value

    @property
    def ignored(self) -> int:
        """Datagrams received and dropped: not authentic, not for this
        client, malformed, late or duplicate."""
        with self._cv:
            return self._ignored

    @property
    def dropped_notices(self) -> int:
        """Authentic notifications dropped unread: the oldest queued, when
        MAX_QUEUED_NOTICES (4,096) were waiting for recv_ended."""
        with self._cv:
            return self._dropped_notices

    @property
    def closed(self) -> bool:
        with self._cv:
            return self._closed

    def __repr__(self) -> str:
        return f"pktdist.Client(server={self.server!r}, name={self.name!r})"

    # -- affinities --------------------------------------------------------

    def create(
        self,
        service: str,
        client: w.ClientArg,
        duration: w.DurationArg,
        owner: Optional[str] = None,
        ports: w.PortsArg = None,
        notify: Optional[w.SockaddrArg] = None,
    ) -> Reply:
        """Pins `client` (an address or CIDR network, as a str or an
        :mod:`ipaddress` object) on `service` (``"vip:port"``, TCP) to the
        owner for `duration` seconds (int, float or timedelta; rounded up to
        whole seconds).

        `owner` defaults to this client's name; only ``admin`` may name
        another backend (and must name one). `ports` restricts it to client
        ports: an int, a (low, high) tuple or ``"low-high"``; None = any.
        `notify` (``"ip:port"`` or an (ip, port) tuple) is where
        AFFINITY_ENDED goes; by default this client's socket.

        Creating an affinity this owner already has renews it. Returns the
        OK reply (``reply.remaining`` = seconds granted); raises
        :class:`pktdist.Conflict` (with ``owner`` and ``remaining``) if
        another backend owns it, and :class:`pktdist.Refused` subclasses for
        the other codes.
        """
        return self._affinity_op(
            MsgType.AFFINITY_CREATE,
            service,
            client,
            w.duration_secs(duration),
            owner,
            ports,
            notify,
        )

    def extend(
        self,
        service: str,
        client: w.ClientArg,
        duration: w.DurationArg,
        owner: Optional[str] = None,
        ports: w.PortsArg = None,
    ) -> Reply:
        """Gives an existing affinity of the owner a new duration from now.
        Raises :class:`pktdist.NotFound` if there is none, and
        :class:`pktdist.Conflict` if another backend owns it."""
        return self._affinity_op(
            MsgType.AFFINITY_EXTEND,
            service,
            client,
            w.duration_secs(duration),
            owner,
            ports,
            None,
        )

    def cancel(
        self,
        service: str,
        client: w.ClientArg,
        owner: Optional[str] = None,
        ports: w.PortsArg = None,
    ) -> Reply:
        """Removes an affinity at once (its notify address gets an
        AFFINITY_ENDED with reason CANCELLED). Raises
        :class:`pktdist.NotFound` if there is none, also when a first
        attempt did it and only its reply was lost."""
        return self._affinity_op(MsgType.AFFINITY_CANCEL, service, client, 0, owner, ports, None)

    def _affinity_op(
        self,
        msg_type: int,
        service: str,
        client: w.ClientArg,
        duration: int,
        owner: Optional[str],
        ports: w.PortsArg,
        notify: Optional[w.SockaddrArg],
    ) -> Reply:
        svc = w.parse_service(service)
        body = w.affinity_body(
            svc,
            w.parse_client(client, svc),
            w.parse_ports(ports),
            duration,
            None if owner is None else w.check_name(owner, "owner"),
            None if notify is None else w.parse_sockaddr(notify, "notify"),
        )
        return self._ok(self._request(msg_type, body)).reply

    def list(self, service: Optional[str] = None, owner: Optional[str] = None) -> List[Affinity]:
        """Every affinity, or those of one service (``"vip:port"``) and/or
        one owner, fetched page by page. Static affinities from the
        configuration have ``remaining`` None."""
        svc = None if service is None else w.parse_service(service)
        own = None if owner is None else w.check_name(owner, "owner")
        out: List[Affinity] = []
        for page in self._pages(
            MsgType.AFFINITY_LIST,
            lambda offset: w.affinity_list_body(svc, own, offset),
            w.PAYLOAD_AFFINITIES,
        ):
            out.extend(page.affinities)
        return out

    # -- backends and statistics (weights: admin) ------------------------

    def backends(self, service: Optional[str] = None) -> List[Backend]:
        """Every backend, or those of one service (by its name in the
        configuration)."""
        svc = None if service is None else w.check_name(service, "service name")
        out: List[Backend] = []
        for page in self._pages(
            MsgType.BACKEND_LIST,
            lambda offset: w.backend_list_body(svc, offset),
            w.PAYLOAD_BACKENDS,
        ):
            out.extend(page.backends)
        return out

    def set_weight(self, service: str, backend: str, weight: int) -> Reply:
        """Sets a backend's weight (0 = drain: no new connections, open ones
        and requested affinities kept, static ones and automatic pins
        skipped). ``admin`` only."""
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise TypeError(f"weight must be an int, not {type(weight).__name__}")
        if not 0 <= weight <= w.MAX_WEIGHT:
            raise ValueError(f"weight {weight} is out of range (0 to {w.MAX_WEIGHT})")
        body = w.set_weight_body(
            w.check_name(service, "service name"), w.check_name(backend, "backend name"), weight
        )
        return self._ok(self._request(MsgType.BACKEND_SET_WEIGHT, body)).reply

    def set_state(
        self,
        state: Union[str, int],
        service: Optional[str] = None,
        backend: Optional[str] = None,
    ) -> Reply:
        """Declares a backend's state (BACKEND_STATE): ``"up"``, ``"drain"``
        or ``"down"`` (or a :class:`Declared`). A backend declares its own
        (`backend` None or its own name), ``admin`` any backend's; `service`
        None means every service the backend belongs to. DRAIN: no new
        connections or affinities (:class:`pktdist.Draining`), what it has
        finishes; DOWN: out at once, its affinities skipped and ended after
        the service's ``affinity_grace``; UP: ready again. The reply's
        message lists each backend concerned with its resulting state. In
        cluster mode it holds at every instance, answered once etcd has it
        (:class:`pktdist.Unavailable` while etcd cannot be reached)."""
        if isinstance(state, str):
            try:
                value = w.Declared[state.upper()]
            except KeyError:
                raise ValueError(f"state {state!r} is not up, drain or down") from None
        elif isinstance(state, int) and not isinstance(state, bool) and state in (1, 2, 3):
            value = w.Declared(state)
        else:
            raise ValueError(f"state {state!r} is not up, drain or down")
        svc = None if service is None else w.check_name(service, "service name")
        be = None if backend is None else w.check_name(backend, "backend name")
        body = w.backend_state_body(svc, be, int(value))
        return self._ok(self._request(MsgType.BACKEND_STATE, body)).reply

    def stats(self) -> Dict[str, Any]:
        """pktdist's statistics document (what ``pktdist stats`` prints),
        parsed from JSON; fetched in chunks from one snapshot."""
        # Other clients' requests can push the snapshot out between chunks:
        # start again a few times before giving up.
        for _ in range(3):
            doc = self._stats_once()
            if doc is not None:
                try:
                    value = json.loads(doc.decode("utf-8"))
                except ValueError as e:
                    raise ProtocolError(f"the statistics document is not JSON: {e}") from None
                if not isinstance(value, dict):
                    raise ProtocolError("the statistics document is not a JSON object")
                return value
        raise ProtocolError("the statistics snapshot kept expiring while being fetched")

    def _stats_once(self) -> Optional[bytes]:
        doc = bytearray()
        token = 0
        while True:
            rb = self._request(MsgType.STATS, w.stats_body(token, len(doc)))
            if rb.reply.code == ReturnCode.NOT_FOUND and token != 0:
                return None
            self._ok(rb)
            chunk = rb.stats
            if chunk is None:
                raise ProtocolError("a statistics reply without a chunk")
            if (
                chunk.total_len > MAX_STATS_LEN
                or chunk.offset != len(doc)
                or (token != 0 and chunk.token != token)
                or (rb.more and not chunk.chunk)
            ):
                raise ProtocolError("an inconsistent statistics chunk")
            token = chunk.token
            doc += chunk.chunk
            if not rb.more:
                if len(doc) != chunk.total_len:
                    raise ProtocolError("the statistics document is incomplete")
                return bytes(doc)

    # -- notifications -----------------------------------------------------

    def recv_ended(self, timeout: Optional[float] = None) -> Optional[Ended]:
        """The next AFFINITY_ENDED notification, waiting up to `timeout`
        seconds for one (None or infinity = as long as it takes); None if
        none came. Raises :class:`pktdist.Error` if the client is or gets
        closed."""
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
                raise TypeError(f"timeout must be seconds or None, not {type(timeout).__name__}")
            if not timeout >= 0:
                raise ValueError(f"timeout must be at least 0 seconds, got {timeout}")
            if timeout == float("inf"):
                timeout = None
        deadline = None if timeout is None else time.monotonic() + timeout
        # Another thread may take the notice that woke this one: wait again.
        while self._wait_for(lambda: bool(self._ended), deadline):
            with self._cv:
                if self._ended:
                    return self._ended.popleft()
        return None

    def iter_ended(self, timeout: Optional[float] = None) -> Iterator[Ended]:
        """Yields notifications as they arrive. Ends when `timeout` seconds
        pass without one (None or infinity = never) or when the client is
        closed."""
        while True:
            try:
                notice = self.recv_ended(timeout)
            except Error:
                if self.closed:
                    return
                raise
            if notice is None:
                return
            yield notice

    # -- life --------------------------------------------------------------

    def close(self) -> None:
        """Closes the socket; a thread waiting in :meth:`recv_ended` or for
        a reply gets :class:`pktdist.Error` (and :meth:`iter_ended` ends)."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
            # Let a reading thread see the wake-up before the sockets go.
            self._cv.wait_for(lambda: not self._reading, timeout=5.0)
            self._cv.notify_all()
        self._selector.close()
        for s in (self._sock, self._wake_r, self._wake_w):
            s.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ----------------------------------------------------------

    @staticmethod
    def _ok(rb: ReplyBody) -> ReplyBody:
        r = rb.reply
        if r.code != ReturnCode.OK:
            raise refused(r.code, r.code_name, r.message, r.owner, r.remaining)
        return rb

    def _pages(
        self, msg_type: int, page: Callable[[int], bytes], kind: int
    ) -> Iterator[ReplyBody]:
        """Every page of a list; stops with an error rather than loop when a
        page promises more but does not advance."""
        offset = 0
        while True:
            rb = self._ok(self._request(msg_type, page(offset)))
            if rb.payload_kind != kind:
                raise ProtocolError("a list reply without entries")
            yield rb
            if not rb.more:
                return
            count = len(rb.affinities) + len(rb.backends)
            if count == 0 or rb.next_offset <= offset:
                raise ProtocolError("list pagination made no progress")
            offset = rb.next_offset

    def request(self, msg_type: int, body: w.BytesArg) -> ReplyBody:
        """Sends one request of type `msg_type` with `body` (retrying as
        configured) and returns pktdist's authentic reply, whatever its code.
        The methods above are built on it; it is here for message types they
        do not cover. Raises ValueError for a type outside 0 to 255."""
        t = int(msg_type)
        if not 0 <= t <= 255:
            raise ValueError(f"message type {msg_type} is not a byte (0 to 255)")
        return self._request(t, bytes(body))

    def _request(self, msg_type: int, body: bytes) -> ReplyBody:
        with self._cv:
            if self._closed:
                raise Error("the client is closed")
            request_id = self._next_id
            self._next_id = (self._next_id + 1) & w.U32_MAX
            pending = _Pending(msg_type)
            self._pending[request_id] = pending
        attempts = self._retries + 1
        sent = 0
        # Addresses in a row that this request could not send to.
        unsendable = 0
        try:
            while sent < attempts:
                nonce = _random_u64()
                with self._cv:
                    ts = self._next_timestamp()
                    target = self._current
                    # Registered before sending, so that a fast reply finds it.
                    pending.nonces[nonce] = target
                datagram = w.encode_message(
                    msg_type, request_id, ts, nonce, self._name, body, self._key
                )
                try:
                    self._sock.sendto(datagram, self._targets[target])
                except OSError as e:
                    if self.closed:
                        raise Error("the client is closed") from None
                    unsendable += 1
                    if unsendable >= len(self._targets):
                        raise Error(f"control socket: sending to {self._shown[target]}: {e}") from e
                    # Not an attempt: the next address gets it at once.
                    self._move_on(target)
                    continue
                unsendable = 0
                sent += 1
                deadline = time.monotonic() + self._timeout
                if self._wait_for(lambda: request_id in self._replies, deadline):
                    with self._cv:
                        return self._replies.pop(request_id)
                self._move_on(target)
            raise Timeout(attempts)
        finally:
            with self._cv:
                self._pending.pop(request_id, None)
                self._replies.pop(request_id, None)

    def _next_timestamp(self) -> int:
        """The timestamp of the next message, in ms (called with the lock
        held): increasing per sender name, as pktdist refuses a request
        stamped at or before the sender's floor, which may be the previous
        request's timestamp (PROTOCOL.md §3.2), but never more than
        MAX_LEAD_MS ahead of the clock."""
        now_ms = time.time_ns() // 1_000_000
        ts = max(now_ms, self._last_ts + 1)
        if ts - now_ms > MAX_LEAD_MS:
            ts = now_ms
        self._last_ts = ts
        return ts

    def _move_on(self, target: int) -> None:
        """No reply (or no sending) from the server address `target`: the
        following attempts go to the next, unless another request has moved
        on from it already or a reply has fixed another meanwhile."""
        with self._cv:
            if self._current == target:
                self._current = (target + 1) % len(self._targets)

    # -- receiving ---------------------------------------------------------

    def _wait_for(self, ready: Callable[[], bool], deadline: Optional[float]) -> bool:
        """Waits until `ready()` (called with the lock held) or `deadline`
        (a time.monotonic() value; None = no limit). Meanwhile, if no other
        thread reads the socket, this one does, one datagram at a time,
        dispatching each to whoever waits for it. Once the deadline has
        passed, what is already in the socket is still read (so a timeout
        of 0 polls)."""
        final = False
        while True:
            with self._cv:
                while True:
                    if ready():
                        return True
                    if self._closed:
                        raise Error("the client is closed")
                    expired = deadline is not None and time.monotonic() >= deadline
                    if expired and final:
                        return False
                    if not self._reading:
                        self._reading = True
                        final = expired
                        break
                    if expired:
                        return False
                    self._cv.wait(None if deadline is None else min(MAX_WAIT, deadline - time.monotonic()))
            try:
                if final:
                    # What has arrived already, without waiting.
                    for _ in range(MAX_POLL_READS):
                        if not self._read_one(0.0):
                            break
                        with self._cv:
                            if ready():
                                break
                else:
                    left = None if deadline is None else min(MAX_WAIT, max(0.0, deadline - time.monotonic()))
                    self._read_one(left)
            finally:
                with self._cv:
                    self._reading = False
                    self._cv.notify_all()

    def _read_one(self, timeout: Optional[float]) -> bool:
        """Reads and dispatches at most one datagram, waiting up to
        `timeout` seconds for it; whether one was read. Only the thread
        holding the reader role calls this."""
        events = self._selector.select(timeout)
        if not events or any(key.fileobj is self._wake_r for key, _ in events):
            return False
        try:
            # Readable, and no other thread reads: this does not block
            # (MSG_DONTWAIT makes sure where the platform has it).
            data = self._sock.recv(65536, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            if self.closed:
                return False
            raise Error(f"control socket: {e}") from e
        self._accept(data)
        return True

    def _accept(self, data: bytes) -> None:
        """Authenticates one datagram: a reply goes to the request waiting
        for it, a notification to the queue; anything else is counted in
        `ignored`."""
        try:
            env = w.open_envelope(data)
            if env.name != self._name or not w.verify(self._key, env):
                raise w.Malformed("not signed for this client")
            if env.msg_type == MsgType.REPLY:
                rb = w.decode_reply(env.body)
                with self._cv:
                    pending = self._pending.get(env.request_id)
                    if (
                        pending is None
                        or rb.request_type != pending.msg_type
                        or rb.request_nonce not in pending.nonces
                        or env.request_id in self._replies
                    ):
                        raise w.Malformed("not a reply to a request in flight")
                    self._replies[env.request_id] = rb
                    # That address answers: later requests go there.
                    self._current = pending.nonces[rb.request_nonce]
            elif env.msg_type == MsgType.AFFINITY_ENDED:
                notice = w.decode_ended(env.body)
                now = int(time.time() * 1000)
                skew = int(NOTICE_SKEW * 1000)
                if abs(env.timestamp_ms - now) > skew:
                    raise w.Malformed("notification outside the clock window")
                with self._cv:
                    # Those whose timestamps left the window are refused by it.
                    while self._seen and (self._seen[0][0] + skew < now or len(self._seen) >= SEEN_NOTICES):
                        self._seen_set.discard(self._seen.popleft()[1])
                    if env.nonce in self._seen_set:
                        raise w.Malformed("duplicate notification")
                    self._seen.append((env.timestamp_ms, env.nonce))
                    self._seen_set.add(env.nonce)
                    self._ended.append(notice)
                    if len(self._ended) > MAX_QUEUED_NOTICES:
                        self._ended.popleft()
                        self._dropped_notices += 1
            else:
                raise w.Malformed("unexpected message type")
        except w.Malformed:
            with self._cv:
                self._ignored += 1
