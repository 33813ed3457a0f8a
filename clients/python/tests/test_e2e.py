"""End to end: the package against a real pktdist (the release binary,
target/release/pktdist) running on DPDK virtual devices, as the Rust
end-to-end tests start it (--no-huge, no PCI, a net_ring port, the control
protocol on 127.0.0.1). And the example backend against the same pktdist.

Needs root (DPDK's EAL) and the built binary. Without them the tests are
skipped, unless PKTDIST_PY_REQUIRE_E2E=1 (as scripts/test.sh sets), which
makes that a failure.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request
from pathlib import Path
from typing import List, Optional, Tuple

import pktdist

from fakeserver import message, reply_body

REPO = Path(__file__).resolve().parents[3]
PKTDIST = Path(os.environ.get("PKTDIST_BIN", REPO / "target" / "release" / "pktdist"))
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "backend_server.py"
REQUIRE = os.environ.get("PKTDIST_PY_REQUIRE_E2E") == "1"
# How long to wait for anything that is meant to happen (pktdist starting, a
# notification): a slow machine only makes the tests wait, never fail.
PATIENCE = 30.0

KEYS = {name: os.urandom(32) for name in ("admin", "be1", "be2")}
WEB = "192.0.2.10:80"


def free_tcp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


LOCAL_PORT = free_tcp_port()


def config() -> str:
    keys = "".join(f'{n} = "{k.hex()}"\n' for n, k in KEYS.items())
    return f"""
[eal]
args = ["--no-huge", "-m", "256", "--no-pci", "--no-shconf", "--no-telemetry",
        "--file-prefix", "pktdist-py-e2e", "--log-level=*:warning"]

[cores]
control = 0
workers = [1]

[mempool]
mbufs = 8191
cache = 128

[flow]
capacity = 65536

[affinity]
capacity = 4096
auto_capacity = 1024

[control]
listen = "127.0.0.1:0"
allowed_networks = ["127.0.0.0/8"]
status_interval = "1s"

[control.keys]
{keys}
[[ports]]
name = "p0"
device = "net_ring0"
gateway_mac = "02:00:00:00:00:fe"

[[services]]
name = "web"
vip = "192.0.2.10"
port = 80
protocol = "tcp"
forwarding = "ipip"
ipip_source = "198.51.100.1"
max_affinity_duration = "10m"

[[services.backends]]
name = "be1"
address = "10.0.0.1"

[[services.backends]]
name = "be2"
address = "10.0.0.2"

# The example backend's service: its VIP is 127.0.0.1, where the example
# listens, so a request over loopback comes in "on the service".
[[services]]
name = "local"
vip = "127.0.0.1"
port = {LOCAL_PORT}
protocol = "tcp"
forwarding = "ipip"
ipip_source = "198.51.100.1"

[[services.backends]]
name = "be1"
address = "10.0.0.1"

[[affinities]]
service = "web"
client = "203.0.113.0/24"
backend = "be2"
"""


class Output:
    """Lines a child prints, collected by a thread."""

    def __init__(self, stream) -> None:  # type: ignore[no-untyped-def]
        self.lines: List[str] = []
        self.cv = threading.Condition()
        self.done = False
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            with self.cv:
                self.lines.append(line.rstrip("\n"))
                self.cv.notify_all()
        with self.cv:
            self.done = True
            self.cv.notify_all()

    def wait_for(self, text: str, timeout: float = PATIENCE) -> Optional[str]:
        """The first line containing `text`, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if self.done or left <= 0:
                    return None
                self.cv.wait(left)

    def text(self) -> str:
        with self.cv:
            return "\n".join(self.lines)


class Process:
    """A child process whose output is collected; stopped with SIGTERM (then
    SIGKILL) by :meth:`stop`."""

    def __init__(self, args: List[str]) -> None:
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out = Output(self.proc.stdout)
        self.err = Output(self.proc.stderr)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.thread.join(5)
        self.err.thread.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.proc.returncode

    def output(self) -> str:
        return f"--- stdout\n{self.out.text()}\n--- stderr\n{self.err.text()}"


PD: Optional[Process] = None
CONTROL = ""
TMP: Optional[tempfile.TemporaryDirectory] = None  # type: ignore[type-arg]


def setUpModule() -> None:
    global PD, CONTROL, TMP
    why = None
    if not PKTDIST.exists():
        why = f"{PKTDIST} is not built (cargo build --release --bins)"
    elif os.geteuid() != 0:
        why = "DPDK's EAL needs root"
    if why:
        if REQUIRE:
            raise RuntimeError(f"end-to-end tests required, but {why}")
        raise unittest.SkipTest(why)
    TMP = tempfile.TemporaryDirectory(prefix="pktdist-py-e2e-")
    path = Path(TMP.name) / "pktdist.toml"
    path.write_text(config())
    PD = Process([str(PKTDIST), "run", "--config", str(path), "--quiet"])
    mark = "control protocol on udp "
    line = PD.err.wait_for(mark, timeout=60)
    if line is None:
        out = PD.output()
        PD.stop()
        raise RuntimeError(f"pktdist did not start its control protocol\n{out}")
    CONTROL = line[line.index(mark) + len(mark) :].strip()


def tearDownModule() -> None:
    if PD is not None:
        rc = PD.stop()
        if rc != 0 or "pktdist summary" not in PD.out.text():
            raise RuntimeError(f"pktdist did not stop cleanly (exit {rc})\n{PD.output()}")
    if TMP is not None:
        TMP.cleanup()


def client(name: str, **kw: object) -> pktdist.Client:
    return pktdist.Client(CONTROL, name, KEYS[name], **kw)  # type: ignore[arg-type]


def declare_up(name: str) -> None:
    """Declares backend `name` up again (with a client of its own, closed)."""
    with client(name) as c:
        c.set_state("up")


def find(entries: List[pktdist.Affinity], client_net: str) -> Optional[pktdist.Affinity]:
    for a in entries:
        if a.client == client_net:
            return a
    return None


class Affinities(unittest.TestCase):
    def setUp(self) -> None:
        self.be1 = client("be1")
        self.be2 = client("be2")
        self.admin = client("admin")
        for c in (self.be1, self.be2, self.admin):
            self.addCleanup(c.close)

    def test_create_list_conflict_extend_cancel(self) -> None:
        net = "198.51.100.0/24"
        r = self.be1.create(WEB, "198.51.100.77/24", 60)
        self.assertEqual((r.code, r.remaining), (pktdist.ReturnCode.OK, 60))

        mine = self.be1.list(service=WEB, owner="be1")
        a = find(mine, net)
        assert a is not None, mine
        self.assertEqual((a.service, a.ports, a.owner, a.protocol), (WEB, None, "be1", "tcp"))
        assert a.remaining is not None
        self.assertTrue(0 < a.remaining <= 60, a)
        port = self.be1.local_address.rsplit(":", 1)[1]
        self.assertEqual(a.notify, f"127.0.0.1:{port}")
        everything = self.admin.list()
        static = find(everything, "203.0.113.0/24")
        assert static is not None, everything
        self.assertEqual((static.owner, static.remaining, static.static), ("be2", None, True))
        # A backend sees only its own affinities, whatever owner it names.
        self.assertIsNone(find(self.be2.list(), net))
        self.assertIsNone(find(self.admin.list(owner="be2"), net))
        self.assertIsNotNone(find(self.admin.list(owner="be1"), net))

        # Another backend asks for the same key: CONFLICT naming the owner.
        with self.assertRaises(pktdist.Conflict) as cm:
            self.be2.create(WEB, net, 30)
        self.assertEqual((cm.exception.code, cm.exception.owner), (pktdist.ReturnCode.CONFLICT, "be1"))
        self.assertTrue(0 < cm.exception.remaining <= 60)
        self.assertIn("owner be1", str(cm.exception))
        with self.assertRaises(pktdist.Conflict):
            self.be2.extend(WEB, net, 30)
        with self.assertRaises(pktdist.Conflict):
            self.be2.cancel(WEB, net)

        r = self.be1.extend(WEB, net, 300)
        self.assertTrue(60 < r.remaining <= 300, r)
        a = find(self.be1.list(service=WEB), net)
        assert a is not None and a.remaining is not None
        self.assertTrue(60 < a.remaining <= 300, a)

        self.assertEqual(self.be1.cancel(WEB, net).code, pktdist.ReturnCode.OK)
        ended = self.be1.recv_ended(timeout=PATIENCE)
        self.assertEqual(
            ended, pktdist.Ended(WEB, net, None, "be1", pktdist.EndReason.CANCELLED, "tcp")
        )
        self.assertIsNone(find(self.admin.list(service=WEB), net))
        with self.assertRaises(pktdist.NotFound):
            self.be1.cancel(WEB, net)
        with self.assertRaises(pktdist.NotFound):
            self.be1.extend(WEB, net, 10)

    def test_expiry_sends_its_notification(self) -> None:
        r = self.be2.create(WEB, "198.51.100.200", 1, ports=8443)
        self.assertEqual(r.remaining, 1)
        ended = self.be2.recv_ended(timeout=PATIENCE)
        self.assertEqual(
            ended,
            pktdist.Ended(WEB, "198.51.100.200/32", 8443, "be2", pktdist.EndReason.EXPIRED, "tcp"),
        )
        self.assertIsNone(find(self.admin.list(), "198.51.100.200/32"))

    def test_admin_acts_for_a_backend_and_the_notice_goes_to_it(self) -> None:
        # The admin pins for be2 and names be2's socket as notify address:
        # the notice, signed with be2's key, reaches be2's client.
        port = self.be2.local_address.rsplit(":", 1)[1]
        r = self.admin.create(WEB, "198.51.100.0/25", 30, owner="be2", ports=(1000, 1999), notify=f"127.0.0.1:{port}")
        self.assertEqual(r.remaining, 30)
        a = find(self.admin.list(owner="be2"), "198.51.100.0/25")
        assert a is not None
        self.assertEqual((a.ports, a.notify), ((1000, 1999), f"127.0.0.1:{port}"))
        self.admin.cancel(WEB, "198.51.100.0/25", ports=(1000, 1999))
        ended = self.be2.recv_ended(timeout=PATIENCE)
        assert ended is not None
        self.assertEqual((ended.client, ended.ports, ended.reason), ("198.51.100.0/25", (1000, 1999), pktdist.EndReason.CANCELLED))

    def test_limits_of_a_backend(self) -> None:
        # The service's shortest prefix (default /16) holds a backend...
        with self.assertRaises(pktdist.Invalid) as cm:
            self.be1.create(WEB, "10.0.0.0/8", 10)
        self.assertIn("min_prefix.ipv4 = 16", cm.exception.message)
        # ...not the operator, acting for it.
        self.admin.create(WEB, "10.0.0.0/8", 10, owner="be1")
        self.admin.cancel(WEB, "10.0.0.0/8")
        # Another backend's clients are not a backend's to pin.
        self.be1.create(WEB, "172.20.0.0/16", 30)
        try:
            with self.assertRaises(pktdist.Conflict) as conflict:
                self.be2.create(WEB, "172.20.5.5", 30)
            self.assertEqual(conflict.exception.owner, "be1")
            self.assertIn("affinity_overlap", conflict.exception.message)
        finally:
            self.be1.cancel(WEB, "172.20.0.0/16")

    def test_refusals(self) -> None:
        with self.assertRaises(pktdist.Invalid) as cm:
            self.be1.create(WEB, "198.51.100.5", 3600)  # above the service's 10m
        self.assertTrue(cm.exception.message, "INVALID says why")
        # No such service: NOT_FOUND (PROTOCOL.md §5), naming the service.
        with self.assertRaises(pktdist.NotFound) as cm2:
            self.be1.create("192.0.2.99:80", "198.51.100.5", 10)
        self.assertEqual(cm2.exception.code, pktdist.ReturnCode.NOT_FOUND)
        self.assertIn("192.0.2.99:80", cm2.exception.message)
        with self.assertRaises(pktdist.NotAuthorized):
            self.be1.create(WEB, "198.51.100.5", 10, owner="be2")
        with self.assertRaises(pktdist.NotAuthorized):
            self.be1.set_weight("web", "be1", 5)
        wrong = pktdist.Client(CONTROL, "be1", KEYS["be2"], timeout=0.2, retries=1)
        self.addCleanup(wrong.close)
        with self.assertRaises(pktdist.Timeout) as t:
            wrong.list()
        self.assertEqual(t.exception.attempts, 2)

    def test_backends_weights_and_stats(self) -> None:
        web = {b.name: b for b in self.admin.backends("web")}
        self.assertEqual(sorted(web), ["be1", "be2"])
        self.assertEqual(web["be1"].address, "10.0.0.1")
        before = web["be2"].weight
        self.admin.set_weight("web", "be2", 0)
        self.assertEqual({b.name: b.weight for b in self.admin.backends("web")}["be2"], 0)
        self.admin.set_weight("web", "be2", before)
        with self.assertRaises(pktdist.NotFound):
            self.admin.set_weight("web", "nosuch", 1)
        # The statistics document shows the service and the weight set back.
        stats = self.admin.stats()
        web_stats = [s for s in stats["services"] if s["name"] == "web"]
        self.assertEqual(len(web_stats), 1, stats["services"])
        weights = {b["name"]: b["weight"] for b in web_stats[0]["backends"]}
        self.assertEqual(weights["be2"], before, weights)
        self.assertEqual(sorted(weights), ["be1", "be2"])


class Relay:
    """A man in the middle between a client and pktdist on 127.0.0.1: it
    forwards both ways and, before each genuine reply, sends the client a
    forged reply (signed with a key it guessed) and a replay of an earlier
    genuine reply."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.client: Optional[Tuple[str, int]] = None
        self.last_reply: Optional[bytes] = None
        self.forged = 0
        self.sock.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while self.running:
            try:
                data, src = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if src == self.upstream:
                if self.client is not None:
                    self.sock.sendto(data, self.client)
                self.last_reply = data
                continue
            self.client = src
            # The request's header, read as an eavesdropper can.
            msg_type, _, request_id, ts, nonce, n = struct.unpack(">BBIQQB", data[3:26])
            name = data[26 : 26 + n].decode()
            body = reply_body(msg_type, nonce, code=1, remaining=999, owner="mallory", text="forged")
            self.sock.sendto(message(0x80, request_id, ts, 1, name, body, os.urandom(32)), src)
            self.forged += 1
            if self.last_reply is not None:
                self.sock.sendto(self.last_reply, src)
                self.forged += 1
            self.sock.sendto(data, self.upstream)

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()


class Forgery(unittest.TestCase):
    def test_forged_and_replayed_replies_are_ignored(self) -> None:
        relay = Relay(CONTROL)
        self.addCleanup(relay.close)
        c = pktdist.Client(relay.address, "be1", KEYS["be1"], timeout=PATIENCE, retries=0)
        self.addCleanup(c.close)
        net = "198.51.100.128/26"
        r = c.create(WEB, net, 45)
        self.assertEqual((r.code, r.remaining, r.owner), (pktdist.ReturnCode.OK, 45, None))
        # The second request also gets a replay of the first reply.
        r = c.extend(WEB, net, 50)
        self.assertEqual(r.remaining, 50)
        c.cancel(WEB, net)
        self.assertEqual(relay.forged, 5)
        self.assertGreaterEqual(c.ignored, 5)

    def test_a_forged_notification_is_ignored(self) -> None:
        be1 = client("be1")
        self.addCleanup(be1.close)
        port = int(be1.local_address.rsplit(":", 1)[1])
        from fakeserver import key_fields, name_field

        # Stamped now, so that only its MAC is wrong (not the time window).
        now = int(time.time() * 1000)
        forged = message(0x81, 1, now, 42, "be1", key_fields() + name_field("be1") + b"\x01", os.urandom(32))
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(forged, ("127.0.0.1", port))
        s.close()
        be1.create(WEB, "198.51.100.240/30", 30)
        be1.cancel(WEB, "198.51.100.240/30")
        ended = be1.recv_ended(timeout=PATIENCE)
        assert ended is not None
        self.assertEqual((ended.client, ended.reason), ("198.51.100.240/30", pktdist.EndReason.CANCELLED))
        self.assertEqual(be1.ignored, 1)


class ExampleBackend(unittest.TestCase):
    """clients/python/examples/backend_server.py pins a client after its
    first request and logs the reply and the notification."""

    def test_pins_after_the_first_request_and_logs_the_end(self) -> None:
        ex = Process([
            sys.executable, str(EXAMPLE),
            "--name", "be1",
            "--listen", f"127.0.0.1:{LOCAL_PORT}",
            "--control", CONTROL,
            "--key", KEYS["be1"].hex(),
            "--affinity-after", "1",
            "--affinity-duration", "2s",
        ])
        # The example declares be1 UP at start and DOWN when it stops; the
        # other tests share this pktdist and need be1 up again, so the state
        # is set back after the example has stopped (cleanups run last
        # first), also when the test fails before its own stop.
        self.addCleanup(declare_up, "be1")
        self.addCleanup(ex.stop)
        self.assertIsNotNone(ex.out.wait_for("be1: ready:"), ex.output())
        service = f"127.0.0.1:{LOCAL_PORT}"
        with urllib.request.urlopen(f"http://{service}/", timeout=PATIENCE) as resp:
            self.assertEqual(resp.headers["X-Backend"], "be1")
            self.assertEqual(resp.read(), b"be1\n")
        with urllib.request.urlopen(f"http://{service}/bytes/70000", timeout=PATIENCE) as resp:
            body = resp.read()
        self.assertEqual(len(body), 70000)
        self.assertEqual(body[:4], bytes(((i * 0x9E3779B97F4A7C15) % 2**64) >> 56 for i in range(4)))

        line = ex.out.wait_for(f"affinity 127.0.0.1/32 on {service} for 2s:")
        self.assertIsNotNone(line, ex.output())
        self.assertIn("OK, 2 s remaining", line or "", ex.output())
        line = ex.out.wait_for(f"AFFINITY_ENDED 127.0.0.1/32 on {service}/tcp owner be1: EXPIRED")
        self.assertIsNotNone(line, ex.output())
        # Once per client network: the second request did not pin again.
        self.assertEqual(ex.out.text().count("affinity 127.0.0.1/32"), 1, ex.output())
        self.assertEqual(ex.stop(), 0, ex.output())
        self.assertIn("be1: stopped", ex.out.text())
        # It left as an operator would want: declared DOWN on the way out.
        with client("admin") as admin:
            listed = {(b.service, b.name): b for b in admin.backends()}
        self.assertEqual(listed[("local", "be1")].state, "down", listed)

    def test_bad_arguments_are_clear_errors(self) -> None:
        for args, why in [
            (["--name", "be1", "--affinity-after", "1"], "needs --control"),
            (["--name", "be1", "--affinity-after", "1", "--control", CONTROL], "--key or --key-file"),
            (["--name", "be1", "--affinity-after", "1", "--control", CONTROL, "--key", "xyz"], "odd number"),
            (["--name", "be1", "--listen", "nowhere"], "not an address"),
            (["--name", "be1", "--affinity-duration", "soon"], "not a duration"),
        ]:
            with self.subTest(args=args):
                r = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=PATIENCE)
                self.assertEqual(r.returncode, 2, r.stderr)
                self.assertIn(why, r.stderr)


if __name__ == "__main__":
    unittest.main()
