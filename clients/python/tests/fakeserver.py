"""A scripted stand-in for pktdist's control socket, for the unit tests.

It writes and reads datagrams with its own struct code, straight from
docs/PROTOCOL.md, not with the package's codec, so that the tests check the
package against the document rather than against itself.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

WEB1_KEY = bytes(range(32))
WEB2_KEY = bytes(range(100, 132))
ADMIN_KEY = bytes(range(200, 232))
KEYS = {"web1": WEB1_KEY, "web2": WEB2_KEY, "admin": ADMIN_KEY}

REPLY = 0x80
ENDED = 0x81


def name_field(s: str) -> bytes:
    b = s.encode()
    return bytes([len(b)]) + b


def addr_field(s: str) -> bytes:
    a = ipaddress.ip_address(s)
    return bytes([a.version]) + a.packed


def key_fields(
    service: str = "192.0.2.10",
    port: int = 80,
    proto: int = 6,
    client: str = "198.51.100.0",
    prefix: int = 24,
    kind: int = 0,
    lo: int = 0,
    hi: int = 0,
) -> bytes:
    """The §5 key fields."""
    return (
        addr_field(service)
        + struct.pack(">HB", port, proto)
        + addr_field(client)
        + bytes([prefix])
        + struct.pack(">BHH", kind, lo, hi)
    )


def message(
    msg_type: int, request_id: int, timestamp: int, nonce: int, name: str, body: bytes, key: bytes
) -> bytes:
    signed = b"PD" + struct.pack(">BBBIQQ", 1, msg_type, 0, request_id, timestamp, nonce)
    signed += name_field(name) + body
    return signed + hmac.new(key, signed, hashlib.sha256).digest()


def reply_body(
    request_type: int,
    request_nonce: int,
    code: int = 0,
    flags: int = 0,
    remaining: int = 0,
    owner: str = "",
    text: str = "",
    payload: bytes = b"\x00",
) -> bytes:
    t = text.encode()
    return (
        struct.pack(">BQBBI", request_type, request_nonce, code, flags, remaining)
        + name_field(owner)
        + struct.pack(">H", len(t))
        + t
        + payload
    )


def affinity_entry(
    owner: str, remaining: int, notify: Optional[Tuple[str, int]] = None, **key: object
) -> bytes:
    n = b"\x00" if notify is None else addr_field(notify[0]) + struct.pack(">H", notify[1])
    return key_fields(**key) + name_field(owner) + struct.pack(">I", remaining) + n  # type: ignore[arg-type]


def affinities_payload(next_offset: int, entries: List[bytes]) -> bytes:
    return bytes([1]) + struct.pack(">IH", next_offset, len(entries)) + b"".join(entries)


@dataclass
class Request:
    msg_type: int
    request_id: int
    timestamp: int
    nonce: int
    name: str
    body: bytes
    source: Tuple[str, int]
    raw: bytes


class FakeServer:
    """A UDP socket on 127.0.0.1 that a test script drives: receive a
    request (checked against the document), answer it, or send anything."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.errors: List[BaseException] = []
        self.thread: Optional[threading.Thread] = None

    def recv(self) -> Request:
        """The next request; checks its layout and HMAC."""
        raw, source = self.sock.recvfrom(65536)
        assert len(raw) <= 1400, len(raw)
        assert raw[:3] == b"PD\x01", raw[:3]
        msg_type, flags, request_id, ts, nonce, n = struct.unpack(">BBIQQB", raw[3:26])
        assert flags == 0
        name = raw[26 : 26 + n].decode()
        body = raw[26 + n : -32]
        expect = hmac.new(KEYS[name], raw[:-32], hashlib.sha256).digest()
        assert hmac.compare_digest(expect, raw[-32:]), "request HMAC does not verify"
        return Request(msg_type, request_id, ts, nonce, name, body, source, raw)

    def recv_nothing(self, wait: float) -> None:
        """Asserts no datagram arrives within `wait` seconds."""
        self.sock.settimeout(wait)
        try:
            raw, _ = self.sock.recvfrom(65536)
        except socket.timeout:
            return
        finally:
            self.sock.settimeout(10)
        raise AssertionError(f"unexpected datagram {raw!r}")

    def reply(
        self,
        req: Request,
        code: int = 0,
        *,
        remaining: int = 0,
        owner: str = "",
        text: str = "",
        flags: int = 0,
        payload: bytes = b"\x00",
        key: Optional[bytes] = None,
        name: Optional[str] = None,
        request_id: Optional[int] = None,
        request_type: Optional[int] = None,
        request_nonce: Optional[int] = None,
        nonce: int = 0x5EED,
        body: Optional[bytes] = None,
        send: bool = True,
    ) -> bytes:
        """Answers `req` (any field can be made wrong); returns the bytes
        (only builds them with send=False)."""
        if body is None:
            body = reply_body(
                req.msg_type if request_type is None else request_type,
                req.nonce if request_nonce is None else request_nonce,
                code,
                flags,
                remaining,
                owner,
                text,
                payload,
            )
        d = message(
            REPLY,
            req.request_id if request_id is None else request_id,
            req.timestamp,
            nonce,
            req.name if name is None else name,
            body,
            KEYS[req.name] if key is None else key,
        )
        if send:
            self.sock.sendto(d, req.source)
        return d

    def ended(
        self,
        to: Tuple[str, int],
        owner: str = "web1",
        reason: int = 1,
        nonce: int = 77,
        key: Optional[bytes] = None,
        timestamp: Optional[int] = None,
        **fields: object,
    ) -> bytes:
        body = key_fields(**fields) + name_field(owner) + bytes([reason])  # type: ignore[arg-type]
        stamp = int(time.time() * 1000) if timestamp is None else timestamp
        d = message(ENDED, 1, stamp, nonce, owner, body, KEYS[owner] if key is None else key)
        self.sock.sendto(d, to)
        return d

    def run(self, script: Callable[["FakeServer"], None]) -> "FakeServer":
        """Runs `script(self)` on a thread; :meth:`join` re-raises its
        failure in the test."""

        def body() -> None:
            try:
                script(self)
            except BaseException as e:  # noqa: BLE001 - reported by join()
                self.errors.append(e)

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()
        return self

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(30)
        assert not self.thread.is_alive(), "the fake server's script did not finish"
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        self.sock.close()
