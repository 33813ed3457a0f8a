"""The example backend in place of the Rust one on the network-namespace
test bed (scripts/testbed.sh, docs/testbed.md): real kernel TCP clients
reach three Python backends through pktdist (DPDK's net_af_packet on a
veth); each backend pins a client after its first request; the client stays
on it; the operator cancels the pins and the backends log the notices.

The bed is built under its own namespace prefix, ``pdpy`` (an operator's
``pd`` bed and the Rust tests' ``pdt`` are left alone), and taken down
after. Needs root, iproute2 and ethtool, and target/release/pktdist; skipped
without them unless PKTDIST_PY_REQUIRE_E2E=1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import unittest
from pathlib import Path
from typing import Any, Dict, List

from test_e2e import EXAMPLE, PATIENCE, PKTDIST, REPO, REQUIRE, Process

PREFIX = "pdpy"
VIP = "10.99.100.1"
CONTROL = "10.99.0.1:7400"
ADMIN_KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
BACKENDS = ["be1", "be2", "be3"]
CLIENTS = [f"10.99.1.{i}" for i in range(1, 7)]
REQUESTS = 6

# Run inside the client namespace: N connections from each source address,
# one GET each, then with "bytes" a 200 KB transfer from the first address;
# prints one JSON object.
CLIENT_SCRIPT = r"""
import http.client, json, sys
sources, n, transfer = sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3] == "bytes"
out = {"backends": {}, "bytes": None}
for src in sources:
    seen = []
    for _ in range(n):
        c = http.client.HTTPConnection("%s", 80, timeout=10, source_address=(src, 0))
        c.request("GET", "/")
        r = c.getresponse()
        r.read()
        seen.append(r.getheader("X-Backend"))
        c.close()
    out["backends"][src] = seen
if transfer:
    c = http.client.HTTPConnection("%s", 80, timeout=10, source_address=(sources[0], 0))
    c.request("GET", "/bytes/200000")
    body = c.getresponse().read()
    ok = body == bytes(((i * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) >> 56 for i in range(200000))
    out["bytes"] = [len(body), ok]
print(json.dumps(out))
""" % (VIP, VIP)


def ns(name: str) -> str:
    return f"{PREFIX}-{name}"


def testbed(arg: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    return subprocess.run(
        [str(REPO / "scripts" / "testbed.sh"), arg],
        env=dict(os.environ, PD_TESTBED_PREFIX=PREFIX),
        capture_output=True,
        text=True,
        timeout=120,
    )


class TestBed(unittest.TestCase):
    def setUp(self) -> None:
        why = None
        if os.geteuid() != 0:
            why = "the test bed needs root"
        elif not PKTDIST.exists():
            why = f"{PKTDIST} is not built"
        elif not (shutil.which("ip") and shutil.which("ethtool")):
            why = "iproute2 and ethtool are needed"
        if why:
            if REQUIRE:
                self.fail(f"test bed test required, but {why}")
            self.skipTest(why)
        self.procs: List[Process] = []
        self.addCleanup(self.down)
        up = testbed("up")
        self.assertEqual(up.returncode, 0, up.stdout + up.stderr)

    def down(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        testbed("down")

    def spawn(self, netns: str, args: List[str]) -> Process:
        p = Process(["ip", "netns", "exec", ns(netns), *args])
        self.procs.append(p)
        return p

    def clients(self, n: int, transfer: bool) -> Dict[str, Any]:
        """Runs CLIENT_SCRIPT in the first client namespace."""
        r = subprocess.run(
            ["ip", "netns", "exec", ns("c1"), sys.executable, "-c", CLIENT_SCRIPT,
             ",".join(CLIENTS), str(n), "bytes" if transfer else "-"],
            capture_output=True, text=True, timeout=120,
        )
        self.assertEqual(r.returncode, 0, r.stderr + "\n" + "\n".join(p.output() for p in self.procs))
        result: Dict[str, Any] = json.loads(r.stdout)
        return result

    def test_python_backends_pin_their_clients(self) -> None:
        pd = self.spawn("lb", [str(PKTDIST), "run", "--config", str(REPO / "config" / "testbed.toml"), "--quiet"])
        self.assertIsNotNone(pd.err.wait_for("control protocol on udp", 60), pd.output())
        # The kernel decapsulates IP-in-IP where it has tunl0, else the
        # backend does (as tests/testbed.rs decides).
        tunl = subprocess.run(["ip", "-n", ns("be1"), "link", "show", "tunl0"], capture_output=True)
        decap = [] if tunl.returncode == 0 else ["--decap"]
        servers: Dict[str, Process] = {}
        for i, name in enumerate(BACKENDS, 1):
            servers[name] = self.spawn(name, [
                sys.executable, str(EXAMPLE), "--name", name,
                "--listen", f"{VIP}:80", "--listen", f"{VIP}:8080",
                "--control", CONTROL, "--key", str(i) * 64,
                "--affinity-after", "1", "--affinity-duration", "10m", *decap,
            ])
        for name, p in servers.items():
            self.assertIsNotNone(p.out.wait_for(f"{name}: ready:"), p.output())

        # Each client's first request: the backend that answers pins it.
        first = self.clients(1, transfer=False)
        owners: Dict[str, str] = {}
        for src, (owner,) in first["backends"].items():
            owners[src] = owner
            log = servers[owner].out
            line = log.wait_for(f"affinity {src}/32 on {VIP}:80 for 600s:")
            self.assertIsNotNone(line, log.text())
            self.assertIn(": OK", line or "")
        # From then on every connection of a client reaches that backend.
        then = self.clients(REQUESTS, transfer=True)
        self.assertEqual(then["bytes"], [200000, True], "the multi-segment transfer is not byte-exact")
        for src, seen in then["backends"].items():
            self.assertEqual(seen, [owners[src]] * REQUESTS, f"{src} pinned to {owners[src]}")
        # The operator cancels the pins, and each owner is told.
        for src, owner in owners.items():
            cancel = subprocess.run(
                ["ip", "netns", "exec", ns("lb"), str(PKTDIST), "affinity", "cancel",
                 "--service", f"{VIP}:80", "--client", f"{src}/32",
                 "--server", CONTROL, "--key", ADMIN_KEY],
                capture_output=True, text=True, timeout=60,
            )
            self.assertEqual(cancel.returncode, 0, cancel.stdout + cancel.stderr)
            log = servers[owner].out
            self.assertIsNotNone(
                log.wait_for(f"AFFINITY_ENDED {src}/32 on {VIP}:80/tcp owner {owner}: CANCELLED", PATIENCE),
                log.text(),
            )
        for name, p in servers.items():
            self.assertEqual(p.stop(), 0, p.output())


if __name__ == "__main__":
    unittest.main()
