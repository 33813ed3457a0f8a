#!/usr/bin/env python3
"""A backend application for pktdist, on Python's standard library alone.

A small HTTP/1.1 server (``http.server``) that answers with its own name and,
after a client's first request (``--affinity-after N``: its N-th), asks
pktdist to keep that client on this backend for a while: the affinity is
requested with :class:`pktdist.Client` on the service the request came in
on (the connection's local address: the VIP and port), and the
AFFINITY_ENDED notifications pktdist sends when it ends are logged. It does
what ``examples/backend_server.rs`` does, and can stand in for it on the
network-namespace test bed (scripts/testbed.sh, docs/testbed.md)::

    python3 clients/python/examples/backend_server.py --name be1 \\
        --listen 10.99.100.1:80 --listen 10.99.100.1:8080 \\
        --control 10.99.0.1:7400 --key 1111...11 \\
        --affinity-after 1 --affinity-prefix 32 --affinity-duration 30s --decap

* ``GET /bytes/N`` answers N bytes of deterministic content (byte i is
  :func:`content_byte` (i), the same as the Rust server's), so a client can
  check a multi-segment transfer byte for byte; any other path gets the
  server's name. Every response carries ``X-Backend: NAME``; connections are
  kept alive.
* ``--affinity-after N``: at a client network's N-th request (the client's
  address masked to ``--affinity-prefix``), the server pins that network to
  itself for ``--affinity-duration`` and logs the reply. Once per network
  and run: an affinity that ended is not requested again, so an operator's
  cancel sticks.
* ``--decap``: where the kernel has no ``ipip`` driver, decapsulates
  pktdist's IP-in-IP packets in user space (root): a raw socket of protocol 4
  receives each whole outer packet, and the inner packet, if it is addressed
  to a local address, goes back to the kernel through an ``IPPROTO_RAW``
  socket, which delivers it to the listening socket. Replies go straight to
  the client (direct server return).
* Graceful shutdown, as the Rust server's: with ``--control`` and a key it
  declares itself UP at start (BACKEND_STATE); on SIGTERM or SIGINT it
  declares DRAIN (no new connections or affinities from pktdist, its pinned
  clients still served), answers every request with ``Connection: close``,
  waits until none of its connections is open (``--drain-quiet``, at most
  ``--drain-timeout``), declares DOWN and exits.

Runs from a checkout without installing the package: if ``pktdist`` is not
importable, the package's source folder beside this file is used.
"""

from __future__ import annotations

import argparse
import ipaddress
import queue
import re
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

try:
    import pktdist
except ImportError:  # a checkout: clients/python/src beside this folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    import pktdist

#: Largest ``GET /bytes/N`` answered.
MAX_BYTES = 64 << 20
#: (service, client network) pairs counted for the affinity rule; beyond it
#: the counts start again, so a flood of sources cannot grow the server.
MAX_TRACKED = 65536
#: Idle time after which a kept-alive connection is closed.
IDLE_TIMEOUT = 60

_log_lock = threading.Lock()


def log(name: str, msg: str) -> None:
    """One line on stdout, prefixed with the server's name."""
    with _log_lock:
        print(f"{name}: {msg}", flush=True)


def content_byte(i: int) -> int:
    """Byte `i` of every ``GET /bytes/N`` body: depends on the position, so
    a lost, repeated or reordered segment changes the content."""
    return ((i * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) >> 56


def content(start: int, end: int) -> bytes:
    return bytes(((i * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) >> 56 for i in range(start, end))


def parse_duration(text: str) -> float:
    """``"30s"``, ``"5m"``, ``"1h"``, ``"1500ms"`` or plain seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 5m or 1h")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    seconds = float(m.group(1)) * scale
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the duration must be above 0")
    return seconds


def parse_listen(text: str) -> Tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address like 10.99.100.1:80") from None
    return host, int(port)


def service_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Rule:
    """The affinity rule: counts requests per (service, client network) and
    queues a pin request at the N-th."""

    def __init__(self, after: int, prefix: int, requests: "queue.Queue[Tuple[str, str]]") -> None:
        self.after = after
        self.prefix = prefix
        self.requests = requests
        self.counts: Dict[Tuple[str, str], int] = {}
        self.lock = threading.Lock()

    def count(self, service: str, client: str) -> None:
        addr = ipaddress.ip_address(client)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        # IPv6 clients are pinned alone, as the Rust example does.
        prefix = self.prefix if addr.version == 4 else 128
        net = str(ipaddress.ip_network((addr, prefix), strict=False))
        key = (service, net)
        with self.lock:
            if len(self.counts) >= MAX_TRACKED and key not in self.counts:
                self.counts.clear()
            n = self.counts.get(key, 0) + 1
            self.counts[key] = n
        if n == self.after:
            self.requests.put((service, net))


class Connections:
    """The open connections, counted so that a drain can wait for them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = 0
        self.draining = threading.Event()

    def opened(self) -> None:
        with self.lock:
            self.open += 1

    def closed(self) -> None:
        with self.lock:
            self.open = max(0, self.open - 1)

    def count(self) -> int:
        with self.lock:
            return self.open


class Handler(BaseHTTPRequestHandler):
    """Answers with the server's name, or N bytes of content."""

    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    backend_name = "backend"
    rule: Optional[Rule] = None
    connections = Connections()

    def setup(self) -> None:
        super().setup()
        self.connections.opened()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.connections.closed()

    def end_headers(self) -> None:
        # While draining, every response is its connection's last.
        if self.connections.draining.is_set() and not self.close_connection:
            self.send_header("Connection", "close")
            self.close_connection = True
        super().end_headers()

    def do_HEAD(self) -> None:
        self.answer(head=True)

    def do_GET(self) -> None:
        self.answer(head=False)

    def answer(self, head: bool) -> None:
        if self.rule is not None:
            local = self.connection.getsockname()
            self.rule.count(service_text(local[0], local[1]), self.client_address[0])
        length: Optional[int] = None
        if self.path.startswith("/bytes/"):
            n = self.path[len("/bytes/") :]
            if not n.isdigit() or int(n) > MAX_BYTES:
                body = f"bad length (0..={MAX_BYTES})\n".encode()
                self.send_response(400)
                self.send_header("X-Backend", self.backend_name)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.close_connection = True
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                return
            length = int(n)
        self.send_response(200)
        self.send_header("X-Backend", self.backend_name)
        if length is None:
            body = f"{self.backend_name}\n".encode()
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            return
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if not head:
            sent = 0
            while sent < length:
                k = min(length - sent, 64 << 10)
                self.wfile.write(content(sent, sent + k))
                sent += k

    def log_message(self, format: str, *args: object) -> None:
        # No line per request (the Rust server logs none either).
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Server6(Server):
    address_family = socket.AF_INET6


def affinity_thread(
    name: str,
    client: pktdist.Client,
    requests: "queue.Queue[Tuple[str, str]]",
    duration: float,
) -> None:
    """Sends the pin requests one by one and logs each reply."""
    while True:
        service, net = requests.get()
        what = f"affinity {net} on {service} for {pktdist_seconds(duration)}s"
        try:
            r = client.create(service, net, duration)
            log(name, f"{what}: OK, {r.remaining} s remaining")
        except pktdist.Refused as e:
            owner = f" (owner {e.owner})" if e.owner else ""
            detail = f": {e.message}" if e.message else ""
            log(name, f"{what}: {e.code_name}{owner}{detail}")
        except (pktdist.Error, ValueError) as e:
            if client.closed:
                return
            log(name, f"{what}: failed: {e}")


def pktdist_seconds(duration: float) -> int:
    """The whole seconds pktdist is asked for (the client rounds up)."""
    return max(1, int(-(-duration // 1)))


def ended_thread(name: str, client: pktdist.Client) -> None:
    """Logs every AFFINITY_ENDED notification until the client is closed."""
    while True:
        try:
            for n in client.iter_ended():
                service = n.service if n.protocol != "tcp" else f"{n.service}/tcp"
                log(name, f"AFFINITY_ENDED {n.client} on {service} owner {n.owner}: {n.reason_name}")
            return
        except pktdist.Error as e:
            log(name, f"control socket: {e}")
            time.sleep(0.1)


# ---------------------------------------------------------------------------
# User-space IP-in-IP decapsulation (IPv4 in IPv4)


def ipv4_packet(buf: bytes) -> Optional[bytes]:
    """`buf` cut to the IPv4 packet it starts with, if the header is sound
    and not a fragment."""
    if len(buf) < 20 or buf[0] >> 4 != 4:
        return None
    ihl = (buf[0] & 0x0F) * 4
    total = int.from_bytes(buf[2:4], "big")
    frag = int.from_bytes(buf[6:8], "big")
    if ihl < 20 or total < ihl or total > len(buf) or frag & 0x3FFF:
        return None
    return buf[:total]


def inner_packet(outer: bytes) -> Optional[bytes]:
    """The inner IPv4 packet of an IPv4-in-IPv4 packet, or None if either
    header is not a well-formed, unfragmented IPv4 header."""
    o = ipv4_packet(outer)
    if o is None or o[9] != 4:
        return None
    return ipv4_packet(o[(o[0] & 0x0F) * 4 :])


class Decap:
    """Receives IP-in-IP on a raw socket and hands the inner packets
    addressed to this host back to the kernel."""

    MAX_LOCAL_CACHE = 1024

    def __init__(self, listen: List[str]) -> None:
        # Protocol 4 = IP-in-IP: the socket receives each whole outer packet.
        self.rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
        # IPPROTO_RAW: send-only, the packet carries its own IP header.
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.local: Dict[str, bool] = {a: True for a in listen if a not in ("0.0.0.0", "")}
        self.decapsulated = self.not_local = self.malformed = self.send_errors = 0

    def is_local(self, addr: str) -> bool:
        """Whether `addr` is an address of this host: binding to it succeeds
        only then."""
        known = self.local.get(addr)
        if known is not None:
            return known
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind((addr, 0))
            local = True
        except OSError:
            local = False
        finally:
            probe.close()
        if len(self.local) >= self.MAX_LOCAL_CACHE:
            self.local = {a: v for a, v in self.local.items() if v}
        self.local[addr] = local
        return local

    def packet(self, outer: bytes) -> None:
        inner = inner_packet(outer)
        if inner is None:
            self.malformed += 1
            return
        dst = socket.inet_ntoa(inner[16:20])
        if not self.is_local(dst):
            self.not_local += 1
            return
        try:
            self.tx.sendto(inner, (dst, 0))
            self.decapsulated += 1
        except OSError:
            self.send_errors += 1

    def run(self, name: str) -> None:
        log(name, "decap: receiving IP-in-IP on a raw socket")
        self.rx.settimeout(1.0)
        logged = (0, 0, 0, 0)
        last_log = time.monotonic()
        while True:
            try:
                self.packet(self.rx.recv(65536))
            except socket.timeout:
                pass
            except OSError as e:
                log(name, f"decap: receive: {e}")
                time.sleep(0.1)
            now = (self.decapsulated, self.not_local, self.malformed, self.send_errors)
            if now != logged and time.monotonic() - last_log >= 2:
                log(
                    name,
                    f"decap: {now[0]} decapsulated, {now[1]} not for a local address, "
                    f"{now[2]} malformed, {now[3]} send errors",
                )
                logged, last_log = now, time.monotonic()


# ---------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description="pktdist example backend: answers with its name, requests affinities"
    )
    p.add_argument("--name", required=True, help="this backend's name (and its key's name in pktdist)")
    p.add_argument(
        "--listen",
        action="append",
        type=parse_listen,
        help="TCP address to serve, the service's VIP:port (repeatable; default 127.0.0.1:8080)",
    )
    p.add_argument("--control", help="pktdist's control address; without it no affinity is requested")
    p.add_argument("--key", help="this backend's control key, in hex")
    p.add_argument("--key-file", type=Path, help="a file holding the key in hex")
    p.add_argument("--affinity-after", type=int, default=0, metavar="N",
                   help="request an affinity at a client network's N-th request (0 = never)")
    p.add_argument("--affinity-prefix", type=int, default=32,
                   help="prefix length of the IPv4 client network pinned (32 = the client alone)")
    p.add_argument("--affinity-duration", type=parse_duration, default=30.0, metavar="DURATION",
                   help="how long the affinity lasts (30s, 5m, 1h; default 30s)")
    p.add_argument("--decap", action="store_true", help="decapsulate IP-in-IP in user space (root)")
    p.add_argument("--drain-quiet", type=parse_duration, default=1.0, metavar="DURATION",
                   help="on SIGTERM: exit once no connection was open for this long (default 1s)")
    p.add_argument("--drain-timeout", type=parse_duration, default=60.0, metavar="DURATION",
                   help="on SIGTERM: exit after this long even with connections open (default 60s)")
    args = p.parse_args(argv)
    name: str = args.name
    listen: List[Tuple[str, int]] = args.listen or [("127.0.0.1", 8080)]
    if not 0 <= args.affinity_prefix <= 32:
        p.error("--affinity-prefix must be 0 to 32 (IPv4)")
    if args.affinity_after < 0:
        p.error("--affinity-after must be 0 or more")

    client: Optional[pktdist.Client] = None
    rule: Optional[Rule] = None
    threads: List[threading.Thread] = []
    if args.key is not None and args.key_file is not None:
        p.error("give --key or --key-file, not both")
    if args.affinity_after > 0:
        if not args.control:
            p.error("--affinity-after needs --control ADDR")
        if args.key is None and args.key_file is None:
            p.error("--affinity-after needs --key or --key-file (one of them)")
    # The control client declares the state and requests the affinities.
    if args.control and (args.key is not None or args.key_file is not None):
        try:
            hex_key = args.key if args.key is not None else args.key_file.read_text()
            key = pktdist.key_from_hex(hex_key)
            client = pktdist.Client(args.control, name, key)
        except (OSError, ValueError, pktdist.Error) as e:
            p.error(f"control client: {e}")
    if args.affinity_after > 0:
        assert client is not None
        requests: "queue.Queue[Tuple[str, str]]" = queue.Queue()
        rule = Rule(args.affinity_after, args.affinity_prefix, requests)
        threads.append(threading.Thread(
            target=affinity_thread, args=(name, client, requests, args.affinity_duration),
            name="affinity", daemon=True))
        threads.append(threading.Thread(target=ended_thread, args=(name, client), name="ended", daemon=True))

    if args.decap:
        try:
            decap = Decap([h for h, _ in listen])
        except OSError as e:
            print(f"backend_server: --decap raw sockets: {e}", file=sys.stderr)
            return 1
        threads.append(threading.Thread(target=decap.run, args=(name,), name="decap", daemon=True))

    Handler.backend_name = name
    Handler.rule = rule
    servers = []
    for host, port in listen:
        cls = Server6 if ":" in host else Server
        try:
            servers.append(cls((host, port), Handler))
        except OSError as e:
            print(f"backend_server: listen {service_text(host, port)}: {e}", file=sys.stderr)
            return 1
    for t in threads:
        t.start()
    for s in servers:
        threading.Thread(target=s.serve_forever, name="http", daemon=True).start()
    log(
        name,
        f"ready: listening on {[service_text(h, p) for h, p in listen]}, "
        f"decap {'on' if args.decap else 'off'}, affinity after {args.affinity_after} "
        f"request(s) for /{args.affinity_prefix} for {pktdist_seconds(args.affinity_duration)}s",
    )

    def declare(state: str) -> None:
        if client is None:
            return
        try:
            r = client.set_state(state)
            log(name, f"BACKEND_STATE {state.upper()}: OK ({r.message})")
        except pktdist.Error as e:
            log(name, f"BACKEND_STATE {state.upper()}: {e}")

    declare("up")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()

    # Graceful shutdown: drain, let the connections finish, leave.
    log(name, "SIGTERM: draining")
    declare("drain")
    conns = Handler.connections
    conns.draining.set()
    start = time.monotonic()
    quiet_since: Optional[float] = None
    while True:
        now = time.monotonic()
        open_now = conns.count()
        if open_now == 0:
            quiet_since = now if quiet_since is None else quiet_since
            if now - quiet_since >= args.drain_quiet:
                break
        else:
            quiet_since = None
        if now - start >= args.drain_timeout:
            log(name, f"drain timeout: {open_now} connection(s) still open")
            break
        time.sleep(0.05)
    declare("down")
    log(name, f"drained in {time.monotonic() - start:.1f}s; exiting")
    for s in servers:
        s.shutdown()
        s.server_close()
    if client is not None:
        client.close()
    log(name, "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
