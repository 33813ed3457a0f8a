"""The client against a scripted server on 127.0.0.1: what it sends, which
replies and notifications it accepts, retries, pagination, threads."""

from __future__ import annotations

import ipaddress
import json
import math
import pickle
import select
import socket
import struct
import threading
import time
import typing
import unittest
from datetime import timedelta
from typing import Any, Callable, List, Optional, Set, Tuple, Union
from unittest import mock

import pktdist

from fakeserver import (
    ADMIN_KEY,
    WEB1_KEY,
    WEB2_KEY,
    FakeServer,
    Request,
    affinities_payload,
    affinity_entry,
    key_fields,
    message,
    name_field,
    reply_body,
)

# Short waits for replies that are meant never to come (the per-attempt
# timeout of an attempt that is to go unanswered); generous ones for anything
# that is meant to come (a slow machine only makes them wait). Where a test
# needs a retry, the server's script answers by request id, whichever
# attempt it gets, and sets the client's timeout to PATIENCE once it has the
# retry (not before: the unanswered attempt's wait may not have begun), so a
# loaded machine that runs the server's thread late costs time, not a
# failure.
SHORT = 0.5
PATIENCE = 10.0


class Base(unittest.TestCase):
    def setUp(self) -> None:
        self.srv = FakeServer()
        self.addCleanup(self.srv.close)

    def client(self, name: str = "web1", key: bytes = WEB1_KEY, **kw: object) -> pktdist.Client:
        """A client of the fake server; by default it waits PATIENCE for
        each reply and does not retry (the scripts answer each request
        once)."""
        kw.setdefault("timeout", PATIENCE)
        kw.setdefault("retries", 0)
        c = pktdist.Client(self.srv.address, name, key, **kw)  # type: ignore[arg-type]
        self.addCleanup(c.close)
        return c

    def settle(self, c: pktdist.Client, ignored: int) -> None:
        """Once the server's script has finished: reads what it sent after
        the client stopped reading (a client reads only while it waits)
        until `ignored` datagrams have been dropped, and checks that no
        more were."""
        deadline = time.monotonic() + PATIENCE
        while c.ignored < ignored and time.monotonic() < deadline:
            self.assertIsNone(c.recv_ended(timeout=0.05))
        self.assertIsNone(c.recv_ended(timeout=0))
        self.assertEqual(c.ignored, ignored)


class Requests(Base):
    def test_create_sends_the_documented_fields(self) -> None:
        seen: List[Request] = []

        def script(s: FakeServer) -> None:
            req = s.recv()
            seen.append(req)
            s.reply(req, remaining=600, text="pinned")

        self.srv.run(script)
        c = self.client()
        before = time.time_ns() // 1_000_000
        r = c.create("192.0.2.10:80", "198.51.100.7", 600, owner="web1", ports=(1000, 1999), notify="127.0.0.1:7501")
        after = time.time_ns() // 1_000_000
        self.srv.join()
        self.assertEqual((r.code, r.remaining, r.message, r.owner), (pktdist.ReturnCode.OK, 600, "pinned", None))
        req = seen[0]
        self.assertEqual((req.msg_type, req.name), (1, "web1"))
        self.assertTrue(before <= req.timestamp <= after)
        self.assertEqual(
            req.body,
            key_fields(client="198.51.100.7", prefix=32, kind=2, lo=1000, hi=1999)
            + struct.pack(">I", 600)
            + name_field("web1")
            + bytes([4, 127, 0, 0, 1])
            + struct.pack(">H", 7501),
        )

    def test_extend_and_cancel(self) -> None:
        seen: List[Request] = []

        def script(s: FakeServer) -> None:
            for remaining in (90, 0):
                req = s.recv()
                seen.append(req)
                s.reply(req, remaining=remaining)

        self.srv.run(script)
        c = self.client()
        self.assertEqual(c.extend("192.0.2.10:80", "198.51.100.0/24", 90).remaining, 90)
        self.assertEqual(c.cancel("192.0.2.10:80", "198.51.100.0/24", ports=443).code, 0)
        self.srv.join()
        self.assertEqual([r.msg_type for r in seen], [2, 3])
        self.assertEqual(seen[0].body, key_fields() + struct.pack(">I", 90) + b"\x00\x00")
        self.assertEqual(seen[1].body, key_fields(kind=1, lo=443, hi=443) + bytes(4) + b"\x00\x00")
        self.assertNotEqual(seen[0].request_id, seen[1].request_id)

    def test_refusals_raise_with_code_and_message(self) -> None:
        codes = [
            (1, pktdist.Conflict),
            (2, pktdist.NotFound),
            (3, pktdist.Invalid),
            (4, pktdist.NotAuthorized),
            (5, pktdist.TableFull),
            (6, pktdist.Internal),
            (7, pktdist.Unsupported),
            (8, pktdist.QuotaExceeded),
            (9, pktdist.RateLimited),
            (11, pktdist.Unavailable),
            (10, pktdist.Draining),
            (42, pktdist.Refused),
        ]

        def script(s: FakeServer) -> None:
            for code, _ in codes:
                req = s.recv()
                if code == 1:
                    s.reply(req, code, remaining=33, owner="web2", text="owned by another backend")
                else:
                    s.reply(req, code, text=f"reason {code}")

        self.srv.run(script)
        c = self.client()
        for code, cls in codes:
            with self.subTest(code=code):
                with self.assertRaises(cls) as cm:
                    c.create("192.0.2.10:80", "198.51.100.7", 60)
                e = cm.exception
                self.assertIsInstance(e, pktdist.Refused)
                self.assertIsInstance(e, pktdist.Error)
                self.assertEqual(e.code, code)
                if code == 1:
                    self.assertEqual((e.owner, e.remaining, e.code_name), ("web2", 33, "CONFLICT"))
                    self.assertEqual(str(e), "CONFLICT (owner web2, 33 s remaining): owned by another backend")
                else:
                    self.assertEqual(e.message, f"reason {code}")
                    self.assertIn(f"reason {code}", str(e))
        self.assertEqual(e.code_name, "CODE_42")
        self.srv.join()

    def test_a_static_affinity_reads_as_static_not_as_seconds(self) -> None:
        def script(s: FakeServer) -> None:
            req = s.recv()
            s.reply(req, remaining=pktdist.STATIC_REMAINING)
            req = s.recv()
            s.reply(req, 1, remaining=pktdist.STATIC_REMAINING, owner="web2", text="declared")
            req = s.recv()
            s.reply(req, 1, remaining=0xFFFFFFFE, owner="web2")

        self.srv.run(script)
        c = self.client()
        r = c.extend("192.0.2.10:80", "198.51.100.0/24", 90)
        self.assertEqual((r.remaining, r.static), (0xFFFFFFFF, True))
        with self.assertRaises(pktdist.Conflict) as cm:
            c.create("192.0.2.10:80", "198.51.100.7", 60)
        self.assertTrue(cm.exception.static)
        self.assertEqual(str(cm.exception), "CONFLICT (owner web2, static): declared")
        with self.assertRaises(pktdist.Conflict) as cm:
            c.create("192.0.2.10:80", "198.51.100.8", 60)
        self.assertFalse(cm.exception.static)
        self.assertEqual(str(cm.exception), "CONFLICT (owner web2, 4294967294 s remaining)")
        self.srv.join()
        self.assertFalse(pktdist.Reply(0, 600).static)

    def test_bad_arguments_fail_before_sending(self) -> None:
        c = self.client()
        with self.assertRaises(ValueError):
            c.create("192.0.2.10", "198.51.100.7", 60)
        with self.assertRaises(ValueError):
            c.create("192.0.2.10:80", "2001:db8::1", 60)
        with self.assertRaises(ValueError):
            c.create("192.0.2.10:80", "198.51.100.7", 0)
        with self.assertRaises(ValueError):
            c.extend("192.0.2.10:80", "198.51.100.7", -1)
        with self.assertRaises(ValueError):
            c.cancel("192.0.2.10:80", "198.51.100.7", owner="")
        with self.assertRaises(ValueError):
            c.create("192.0.2.10:80", "198.51.100.7", 5, notify="pktdist:9")
        with self.assertRaises(TypeError):
            c.set_weight("web", "be1", "10")  # type: ignore[arg-type]
        for weight in [-1, 65536]:
            with self.assertRaises(ValueError):
                c.set_weight("web", "be1", weight)
        self.srv.recv_nothing(SHORT)
        for bad in [
            lambda: pktdist.Client("127.0.0.1", "web1", WEB1_KEY),
            lambda: pktdist.Client("127.0.0.1:7400", "", WEB1_KEY),
            lambda: pktdist.Client("127.0.0.1:7400", "web1", b"short"),
            lambda: pktdist.Client("127.0.0.1:7400", "web1", WEB1_KEY, timeout=0),
            lambda: pktdist.Client("127.0.0.1:7400", "web1", WEB1_KEY, retries=-1),
            lambda: pktdist.Client("127.0.0.1:7400", "web1", WEB1_KEY, bind="[::1]:0"),
            lambda: pktdist.Client("no-such-host.invalid:7400", "web1", WEB1_KEY),
        ]:
            with self.assertRaises(ValueError):
                bad()
        with self.assertRaises(TypeError):
            pktdist.Client("127.0.0.1:7400", "web1", "00" * 32)  # type: ignore[arg-type]


    def test_a_raw_request_type_must_be_a_byte(self) -> None:
        seen: List[Request] = []

        def script(s: FakeServer) -> None:
            req = s.recv()
            seen.append(req)
            s.reply(req, text="reloaded")

        self.srv.run(script)
        c = self.client(timeout=PATIENCE, retries=0)
        next_id = c._next_id
        for bad in [256, -1, 0x1_0000_0001]:
            with self.subTest(msg_type=bad):
                with self.assertRaisesRegex(ValueError, "not a byte"):
                    c.request(bad, b"")
        # Nothing was sent, and no request id was used.
        rb = c.request(pktdist.MsgType.RELOAD, b"")
        self.srv.join()
        self.assertEqual(rb.reply.message, "reloaded")
        self.assertEqual((seen[0].msg_type, seen[0].request_id, seen[0].body), (0x0A, next_id, b""))


class Verification(Base):
    def test_forged_and_unrelated_replies_are_ignored(self) -> None:
        def script(s: FakeServer) -> None:
            req = s.recv()
            s.reply(req, key=WEB2_KEY)  # signed with another key
            s.reply(req, name="web2", key=WEB1_KEY)  # someone else's name
            s.reply(req, request_id=req.request_id ^ 1)  # another request
            s.reply(req, request_nonce=req.nonce ^ 1)  # not a nonce we sent
            s.reply(req, request_type=2)  # answers another type
            s.sock.sendto(b"PD\x01garbage", req.source)
            s.sock.sendto(bytes(1500), req.source)  # oversize
            forged = bytearray(s.reply(req, code=1, owner="mallory", send=False))
            forged[-1] ^= 1
            s.sock.sendto(bytes(forged), req.source)  # tampered tag
            s.reply(req, remaining=5)  # the genuine one, last

        self.srv.run(script)
        c = self.client(timeout=PATIENCE, retries=0)
        r = c.create("192.0.2.10:80", "198.51.100.7", 5)
        self.srv.join()
        self.assertEqual((r.code, r.remaining), (0, 5))
        self.assertEqual(c.ignored, 8)

    def test_only_forgeries_mean_timeout(self) -> None:
        def script(s: FakeServer) -> None:
            for _ in range(2):
                req = s.recv()
                s.reply(req, key=WEB2_KEY, code=1, owner="mallory")
                s.reply(req, request_nonce=req.nonce + 1)

        self.srv.run(script)
        c = self.client(timeout=SHORT, retries=1)
        with self.assertRaises(pktdist.Timeout) as cm:
            c.create("192.0.2.10:80", "198.51.100.7", 5)
        self.srv.join()
        self.assertEqual(cm.exception.attempts, 2)
        self.assertIn("no reply after 2 attempts", str(cm.exception))
        # Forgeries sent after the last attempt's deadline are read now.
        self.settle(c, 4)

    def test_a_replayed_reply_is_refused(self) -> None:
        old: List[bytes] = []

        def script(s: FakeServer) -> None:
            req = s.recv()
            old.append(s.reply(req, remaining=60))
            # The second request: an eavesdropper replays the first reply
            # (authentic, but to another request id and nonce) before the
            # real answer; and again to the third, with no real answer.
            req = s.recv()
            s.sock.sendto(old[0], req.source)
            s.reply(req, code=2, text="no such affinity")
            req = s.recv()
            s.sock.sendto(old[0], req.source)

        self.srv.run(script)
        c = self.client(timeout=PATIENCE, retries=0)
        self.assertEqual(c.create("192.0.2.10:80", "198.51.100.7", 60).remaining, 60)
        with self.assertRaises(pktdist.NotFound):
            c.cancel("192.0.2.10:80", "198.51.100.7")
        c.timeout = SHORT  # the last request is meant to go unanswered
        with self.assertRaises(pktdist.Timeout):
            c.create("192.0.2.10:80", "198.51.100.7", 60)
        self.srv.join()
        self.settle(c, 2)

    def test_a_duplicated_reply_is_used_once(self) -> None:
        def script(s: FakeServer) -> None:
            req = s.recv()
            d = s.reply(req, remaining=1)
            s.sock.sendto(d, req.source)
            req2 = s.recv()
            s.reply(req2, remaining=2)

        self.srv.run(script)
        c = self.client(timeout=PATIENCE, retries=0)
        self.assertEqual(c.create("192.0.2.10:80", "198.51.100.7", 1).remaining, 1)
        self.assertEqual(c.create("192.0.2.10:80", "198.51.100.7", 2).remaining, 2)
        self.srv.join()
        self.assertEqual(c.ignored, 1)

    def test_authentic_but_malformed_replies_are_ignored(self) -> None:
        bodies = [
            reply_body(1, 0)[:-1],  # truncated
            reply_body(1, 0) + b"\x00",  # trailing byte
            reply_body(1, 0, flags=0x80),  # unknown flag
            reply_body(1, 0, payload=b"\x09"),  # unknown payload kind
            reply_body(1, 0)[:15] + b"\x41" + b"a" * 65 + b"\x00\x00\x00",  # name too long
        ]

        def script(s: FakeServer) -> None:
            req = s.recv()
            for b in bodies:
                # Put the request's nonce in, so only the malformation is wrong.
                b = b[:1] + struct.pack(">Q", req.nonce) + b[9:]
                s.reply(req, body=b)

        self.srv.run(script)
        c = self.client(timeout=SHORT, retries=0)
        with self.assertRaises(pktdist.Timeout):
            c.create("192.0.2.10:80", "198.51.100.7", 5)
        self.srv.join()
        self.settle(c, len(bodies))


class Retries(Base):
    def test_a_retry_has_the_same_id_and_a_new_nonce(self) -> None:
        seen: List[Request] = []

        def script(s: FakeServer) -> None:
            seen.append(s.recv())  # dropped: no answer
            seen.append(s.recv())
            c.timeout = PATIENCE  # should the answer be late, one more wait
            s.reply(seen[1], remaining=7)

        c = self.client(timeout=SHORT, retries=3)
        self.srv.run(script)
        self.assertEqual(c.create("192.0.2.10:80", "198.51.100.7", 7).remaining, 7)
        self.srv.join()
        first, second = seen
        self.assertEqual(first.request_id, second.request_id)
        self.assertNotEqual(first.nonce, second.nonce)
        self.assertLess(first.timestamp, second.timestamp)
        self.assertEqual(first.body, second.body)
        self.assertNotEqual(first.raw[-32:], second.raw[-32:])

    def test_timestamps_strictly_increase(self) -> None:
        # PROTOCOL.md §3.2: pktdist refuses a request stamped at or before
        # its sender's floor, so two requests (or a request and its retry)
        # must not share a millisecond, even when the clock has not moved.
        seen: List[Request] = []

        def script(s: FakeServer) -> None:
            seen.append(s.recv())  # dropped: the retry comes
            # Each request answered once, whichever attempt comes first (a
            # late answer means one more attempt, answered no more).
            answered: Set[int] = set()
            while len(answered) < 3:
                req = s.recv()
                seen.append(req)
                c.timeout = PATIENCE
                if req.request_id not in answered:
                    answered.add(req.request_id)
                    s.reply(req)

        c = self.client(timeout=SHORT, retries=3)
        self.srv.run(script)
        stopped_ms = 1_700_000_000_000
        with mock.patch("time.time_ns", return_value=stopped_ms * 1_000_000):
            for _ in range(3):
                c.cancel("192.0.2.10:80", "198.51.100.7")
        self.srv.join()
        stamps = [r.timestamp for r in seen]
        self.assertGreaterEqual(len(stamps), 4)
        self.assertEqual(len({r.request_id for r in seen}), 3)
        self.assertEqual(seen[0].request_id, seen[1].request_id)
        self.assertEqual(stamps[0], stopped_ms)
        for earlier, later in zip(stamps, stamps[1:]):
            self.assertLess(earlier, later, stamps)

    def test_a_clock_stepped_back_does_not_poison_later_requests(self) -> None:
        # A clock an hour ahead, then corrected: the next request carries
        # the clock's time, not a stamp an hour ahead (which pktdist would
        # drop as stale, for an hour). A smaller step back stays within the
        # lead: the stamps go on increasing.
        seen: List[Request] = []

        def script(s: FakeServer) -> None:
            for _ in range(4):
                req = s.recv()
                seen.append(req)
                s.reply(req)

        self.srv.run(script)
        c = self.client(timeout=PATIENCE, retries=0)
        t = 1_700_000_000_000
        clock = [t + 3_600_000, t, t - 500, t - 1_000]
        for ms in clock:
            with mock.patch("time.time_ns", return_value=ms * 1_000_000):
                c.cancel("192.0.2.10:80", "198.51.100.7")
        self.srv.join()
        self.assertEqual(pktdist.client.MAX_LEAD_MS, 1000)
        # t + 1: 501 ms ahead of the clock; t + 2: 1,002 ms ahead, too far.
        self.assertEqual([r.timestamp for r in seen], [t + 3_600_000, t, t + 1, t - 1_000])

    def test_a_burst_runs_at_most_the_lead_ahead_of_the_clock(self) -> None:
        # A burst of over 1,000 requests a second (a frozen clock): the
        # stamps increase 1 ms apart up to MAX_LEAD_MS ahead, then restart
        # from the clock rather than drift past pktdist's allowed skew.
        n = 1_500
        stamps: List[int] = []

        def script(s: FakeServer) -> None:
            for _ in range(n):
                req = s.recv()
                stamps.append(req.timestamp)
                s.reply(req)

        self.srv.run(script)
        c = self.client(timeout=PATIENCE, retries=0)
        t = 1_700_000_000_000
        with mock.patch("time.time_ns", return_value=t * 1_000_000):
            for _ in range(n):
                c.cancel("192.0.2.10:80", "198.51.100.7")
        self.srv.join()
        lead = pktdist.client.MAX_LEAD_MS
        self.assertEqual(lead, 1000)
        self.assertEqual(len(stamps), n)
        # (Plain comparisons: a diff of these lists takes difflib minutes.)
        self.assertLessEqual(max(stamps) - t, lead, "a stamp ran more than the lead ahead")
        self.assertTrue(stamps[: lead + 1] == list(range(t, t + lead + 1)), "not 1 ms apart up to the lead")
        self.assertTrue(stamps[lead + 1 :] == list(range(t, t + n - lead - 1)), "not restarted from the clock")

    def test_a_late_reply_to_the_first_attempt_is_accepted(self) -> None:
        def script(s: FakeServer) -> None:
            first = s.recv()
            s.recv()  # the retry
            c.timeout = PATIENCE  # should the answer be late, one more wait
            s.reply(first, remaining=3)

        c = self.client(timeout=SHORT, retries=2)
        self.srv.run(script)
        self.assertEqual(c.create("192.0.2.10:80", "198.51.100.7", 3).remaining, 3)
        self.srv.join()

    def test_nobody_listening_times_out(self) -> None:
        self.srv.close()
        c = self.client(timeout=SHORT / 2, retries=2)
        with self.assertRaises(pktdist.Timeout) as cm:
            c.list()
        self.assertEqual(cm.exception.attempts, 3)


class Lists(Base):
    def test_every_page_is_fetched(self) -> None:
        offsets: List[bytes] = []

        def script(s: FakeServer) -> None:
            for page in range(3):
                req = s.recv()
                offsets.append(req.body)
                entries = [affinity_entry(f"be{page}", 10 * page + i, client=f"10.0.{page}.{i}", prefix=32) for i in range(2)]
                s.reply(req, flags=1 if page < 2 else 0, payload=affinities_payload(2 * page + 2, entries))

        self.srv.run(script)
        c = self.client("admin", ADMIN_KEY)
        got = c.list(service="192.0.2.10:80", owner="be1")
        self.srv.join()
        self.assertEqual([a.client for a in got], [f"10.0.{p}.{i}/32" for p in range(3) for i in range(2)])
        svc = b"\x01" + key_fields()[:8]
        self.assertEqual(
            offsets,
            [svc + name_field("be1") + struct.pack(">IH", o, 0) for o in (0, 2, 4)],
        )

    def test_pagination_that_does_not_advance_is_an_error(self) -> None:
        def script(s: FakeServer) -> None:
            req = s.recv()
            s.reply(req, flags=1, payload=affinities_payload(0, [affinity_entry("be1", 1)]))

        self.srv.run(script)
        with self.assertRaisesRegex(pktdist.ProtocolError, "no progress"):
            self.client().list()
        self.srv.join()

    def test_a_list_reply_without_entries_is_an_error(self) -> None:
        def script(s: FakeServer) -> None:
            s.reply(s.recv())

        self.srv.run(script)
        with self.assertRaisesRegex(pktdist.ProtocolError, "without entries"):
            self.client().list()
        self.srv.join()

    def test_backends_set_weight_and_stats(self) -> None:
        doc = json.dumps({"affinities": 3, "pad": "é" * 700}).encode()

        def script(s: FakeServer) -> None:
            req = s.recv()
            assert req.msg_type == 5 and req.body == name_field("web") + bytes(6), req
            e = (
                name_field("web") + name_field("be1") + bytes([4, 10, 0, 0, 1, 0]) + struct.pack(">I", 3)
                + bytes([3]) + struct.pack(">I", 42) + bytes([2, 1, 2])
                + struct.pack(">H", 7) + b"refused"
            )
            s.reply(req, payload=b"\x02" + struct.pack(">IH", 1, 1) + e)
            req = s.recv()
            assert req.msg_type == 6 and req.body == name_field("web") + name_field("be1") + bytes(4), req
            s.reply(req, text="weight 0")
            # Stats in chunks of 500 bytes, cut inside characters.
            token, offset = 0, 0
            while True:
                req = s.recv()
                t, o = struct.unpack(">II", req.body)
                assert (t, o) == (token, offset), (t, o, token, offset)
                token, chunk = 5, doc[o : o + 500]
                more = o + len(chunk) < len(doc)
                s.reply(req, flags=int(more), payload=b"\x03" + struct.pack(">IIIH", token, len(doc), o, len(chunk)) + chunk)
                offset += len(chunk)
                if not more:
                    break

        self.srv.run(script)
        c = self.client("admin", ADMIN_KEY)
        self.assertEqual(
            c.backends("web"),
            [
                pktdist.Backend(
                    "web", "be1", "10.0.0.1", None, 3,
                    state="down", state_secs=42, app=pktdist.Declared.DRAIN,
                    admin=pktdist.Declared.UP, healthy=False, check_error="refused",
                )
            ],
        )
        self.assertEqual(c.set_weight("web", "be1", 0).message, "weight 0")
        self.assertEqual(c.stats(), json.loads(doc))
        self.srv.join()


class BackendState(Base):
    def test_a_backend_declares_its_state(self) -> None:
        def script(s: FakeServer) -> None:
            req = s.recv()
            assert req.msg_type == 0x0B and req.body == b"\x00\x00\x02", req
            s.reply(req, text="web/web1 draining")
            req = s.recv()
            assert req.body == name_field("web") + name_field("web2") + b"\x03", req
            s.reply(req, 4, text="a backend may declare only its own state")
            req = s.recv()
            assert req.body == b"\x00\x00\x01", req
            s.reply(req)

        self.srv.run(script)
        c = self.client()
        self.assertEqual(c.set_state("drain").message, "web/web1 draining")
        with self.assertRaises(pktdist.NotAuthorized):
            c.set_state("DOWN", service="web", backend="web2")
        c.set_state(pktdist.Declared.UP)
        for bad in ("sideways", 0, 4, True, None):
            with self.subTest(state=bad), self.assertRaises(ValueError):
                c.set_state(bad)  # type: ignore[arg-type]
        self.srv.join()


class Notifications(Base):
    def test_recv_ended_verifies_and_drops_duplicates(self) -> None:
        c = self.client()
        to = ("127.0.0.1", int(c.local_address.rsplit(":", 1)[1]))
        self.srv.ended(to, reason=1, nonce=5, key=WEB2_KEY)  # forged
        self.srv.ended(to, owner="web2", reason=1, nonce=6)  # another backend's
        self.srv.ended(to, reason=2, nonce=7, client="198.51.100.0", prefix=24)
        self.srv.ended(to, reason=2, nonce=7, client="198.51.100.0", prefix=24)  # duplicate
        self.srv.ended(to, reason=1, nonce=8, client="198.51.100.9", prefix=32, kind=1, lo=80, hi=80)
        first = c.recv_ended(timeout=PATIENCE)
        second = c.recv_ended(timeout=PATIENCE)
        self.assertEqual(
            first, pktdist.Ended("192.0.2.10:80", "198.51.100.0/24", None, "web1", pktdist.EndReason.CANCELLED)
        )
        assert second is not None
        self.assertEqual((second.client, second.ports, second.reason_name), ("198.51.100.9/32", 80, "EXPIRED"))
        self.assertIsNone(c.recv_ended(timeout=SHORT))
        self.assertEqual(c.ignored, 3)

    def test_a_stale_or_future_notice_is_refused(self) -> None:
        c = self.client()
        to = ("127.0.0.1", int(c.local_address.rsplit(":", 1)[1]))
        now = int(time.time() * 1000)
        self.srv.ended(to, nonce=5, timestamp=0)  # played back
        self.srv.ended(to, nonce=6, timestamp=now + 3_600_000)
        self.srv.ended(to, nonce=7, timestamp=now)
        got = c.recv_ended(timeout=PATIENCE)
        assert got is not None
        self.assertIsNone(c.recv_ended(timeout=SHORT))
        self.assertEqual(c.ignored, 2)

    def test_a_notice_arriving_during_a_request_is_kept(self) -> None:
        def script(s: FakeServer) -> None:
            req = s.recv()
            s.ended(req.source, reason=1, nonce=9)
            s.reply(req)

        self.srv.run(script)
        c = self.client()
        c.cancel("192.0.2.10:80", "198.51.100.0/24")
        self.srv.join()
        n = c.recv_ended(timeout=0)
        assert n is not None
        self.assertEqual(n.reason, pktdist.EndReason.EXPIRED)

    def test_notices_beyond_the_queue_bound_are_dropped_and_counted(self) -> None:
        # Five notices arrive while a request waits, the queue holds three
        # (4,096 really): the two oldest go, counted.
        def script(s: FakeServer) -> None:
            req = s.recv()
            for n in range(5):
                s.ended(req.source, nonce=10 + n, client=f"198.51.100.{n}", prefix=32)
            s.reply(req)

        self.srv.run(script)
        c = self.client()
        self.assertEqual(c.dropped_notices, 0)
        with mock.patch("pktdist.client.MAX_QUEUED_NOTICES", 3):
            c.cancel("192.0.2.10:80", "198.51.100.0/24")
        self.srv.join()
        self.assertEqual(c.dropped_notices, 2)
        got = []
        while True:
            n = c.recv_ended(timeout=0)
            if n is None:
                break
            got.append(n.client)
        self.assertEqual(got, [f"198.51.100.{n}/32" for n in (2, 3, 4)])
        self.assertEqual(c.ignored, 0)

    def test_a_zero_timeout_polls_what_has_arrived(self) -> None:
        c = self.client()
        self.assertIsNone(c.recv_ended(timeout=0))
        to = ("127.0.0.1", int(c.local_address.rsplit(":", 1)[1]))
        self.srv.ended(to, nonce=1, reason=1, key=WEB2_KEY)  # forged
        select.select([c._sock], [], [], PATIENCE)  # until it has arrived
        self.assertIsNone(c.recv_ended(timeout=0))
        self.assertEqual(c.ignored, 1)
        self.srv.ended(to, nonce=2, reason=3)
        select.select([c._sock], [], [], PATIENCE)
        n = c.recv_ended(timeout=0)
        assert n is not None
        self.assertEqual(n.reason, pktdist.EndReason.BACKEND_REMOVED)

    def test_a_notice_another_thread_took_does_not_end_the_wait(self) -> None:
        # Between the wake-up and the take, another thread takes the notice
        # (played here by the wrapper): the wait goes on (None = for ever).
        c = self.client()
        to = ("127.0.0.1", int(c.local_address.rsplit(":", 1)[1]))
        real = c._wait_for
        stolen: List[pktdist.Ended] = []

        def racing(ready: Callable[[], bool], deadline: Optional[float]) -> bool:
            ok = real(ready, deadline)
            if ok and not stolen:
                with c._cv:
                    stolen.append(c._ended.popleft())
            return ok

        c._wait_for = racing  # type: ignore[method-assign]
        self.srv.ended(to, nonce=1, reason=1)
        later = threading.Timer(SHORT, lambda: self.srv.ended(to, nonce=2, reason=2))
        later.start()
        got = c.recv_ended()
        later.join()
        assert got is not None
        self.assertEqual((stolen[0].reason, got.reason), (1, 2))

    def test_iter_ended_stops_after_a_quiet_timeout(self) -> None:
        c = self.client()
        to = ("127.0.0.1", int(c.local_address.rsplit(":", 1)[1]))
        for n in range(3):
            self.srv.ended(to, nonce=100 + n, reason=1 + n)
        self.assertEqual([e.reason for e in c.iter_ended(timeout=SHORT * 2)], [1, 2, 3])

    def test_close_wakes_a_waiting_thread(self) -> None:
        c = self.client()
        out: List[object] = []
        t = threading.Thread(target=lambda: out.extend(c.iter_ended()))
        t.start()
        t2_err: List[BaseException] = []

        def waiter() -> None:
            try:
                c.recv_ended()
            except pktdist.Error as e:
                t2_err.append(e)

        t2 = threading.Thread(target=waiter)
        t2.start()
        time.sleep(SHORT)  # let both threads block (not a timing assertion)
        c.close()
        t.join(PATIENCE)
        t2.join(PATIENCE)
        self.assertFalse(t.is_alive() or t2.is_alive(), "close() did not wake the waiting threads")
        self.assertEqual(out, [])
        self.assertEqual(len(t2_err), 1)
        self.assertIn("closed", str(t2_err[0]))
        with self.assertRaisesRegex(pktdist.Error, "closed"):
            c.create("192.0.2.10:80", "198.51.100.7", 5)
        c.close()  # twice is fine

    def test_bad_timeouts(self) -> None:
        c = self.client()
        with self.assertRaises(ValueError):
            c.recv_ended(timeout=-1)
        with self.assertRaises(ValueError):
            c.recv_ended(timeout=float("nan"))
        with self.assertRaises(TypeError):
            c.recv_ended(timeout="1")  # type: ignore[arg-type]

    def test_huge_and_infinite_timeouts_wait_until_closed(self) -> None:
        # Beyond select()'s and Condition.wait()'s limits: no OverflowError;
        # each waits (two threads: one reads the socket, one waits on the
        # condition) until the client is closed.
        for timeout in [1e7, 1e10, math.inf]:
            with self.subTest(timeout=timeout):
                c = self.client()
                errors: List[BaseException] = []

                def wait() -> None:
                    try:
                        c.recv_ended(timeout=timeout)
                    except BaseException as e:  # noqa: BLE001
                        errors.append(e)

                ts = [threading.Thread(target=wait) for _ in range(2)]
                for t in ts:
                    t.start()
                time.sleep(0.2)  # let both block (not a timing assertion)
                c.close()
                for t in ts:
                    t.join(PATIENCE)
                self.assertEqual([type(e) for e in errors], [pktdist.Error, pktdist.Error], errors)
                self.assertIn("closed", str(errors[0]))

    def test_an_infinite_timeout_means_no_timeout(self) -> None:
        c = self.client()
        to = ("127.0.0.1", int(c.local_address.rsplit(":", 1)[1]))
        self.srv.ended(to, nonce=1, reason=2)
        threading.Timer(SHORT, c.close).start()
        self.assertEqual([e.reason for e in c.iter_ended(timeout=math.inf)], [2])

    def test_a_long_wait_is_made_of_capped_waits(self) -> None:
        # Waits of at most MAX_WAIT each (50 ms here), one after the other,
        # until the notice comes.
        c = self.client()
        to = ("127.0.0.1", int(c.local_address.rsplit(":", 1)[1]))
        later = threading.Timer(SHORT, lambda: self.srv.ended(to, nonce=1, reason=3))
        with mock.patch("pktdist.client.MAX_WAIT", 0.05), mock.patch.object(
            c._selector, "select", wraps=c._selector.select
        ) as select_:
            later.start()
            got = c.recv_ended(timeout=1e7)
        later.join()
        assert got is not None
        self.assertEqual(got.reason, pktdist.EndReason.BACKEND_REMOVED)
        self.assertGreater(select_.call_count, 1)
        self.assertTrue(all(call.args[0] <= 0.05 for call in select_.call_args_list), select_.call_args_list)

    def test_the_per_attempt_timeout_is_at_most_a_day(self) -> None:
        for bad in [86400.5, 1e10, math.inf, math.nan]:
            with self.subTest(timeout=bad):
                with self.assertRaises(ValueError):
                    pktdist.Client(self.srv.address, "web1", WEB1_KEY, timeout=bad)
        c = self.client(timeout=86400)
        self.assertEqual(c.timeout, pktdist.client.MAX_TIMEOUT)
        with self.assertRaises(ValueError):
            c.timeout = 1e10
        self.assertEqual(c.timeout, 86400.0)


class Threads(Base):
    def test_concurrent_requests_and_a_notification_listener(self) -> None:
        threads, per_thread = 6, 15
        total = threads * per_thread

        def script(s: FakeServer) -> None:
            # Answers in batches, in reverse order, with a notification in
            # between: each thread must still get its own reply.
            done = 0
            while done < total:
                batch = [s.recv() for _ in range(min(threads, total - done))]
                for req in reversed(batch):
                    duration = struct.unpack(">I", req.body[19:23])[0]
                    s.reply(req, remaining=duration)
                    s.ended(req.source, nonce=1000 + done, reason=1)
                    done += 1

        self.srv.run(script)
        c = self.client(timeout=PATIENCE, retries=0)
        results: List[tuple] = []
        errors: List[BaseException] = []
        notices: List[pktdist.Ended] = []

        def worker(k: int) -> None:
            try:
                for i in range(per_thread):
                    d = 1000 * (k + 1) + i
                    results.append((d, c.create("192.0.2.10:80", f"198.51.100.{k}", d).remaining))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        def listener() -> None:
            for n in c.iter_ended(timeout=PATIENCE):
                notices.append(n)
                if len(notices) == total:
                    return

        lt = threading.Thread(target=listener)
        lt.start()
        ws = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        for t in ws:
            t.start()
        for t in ws:
            t.join(60)
        lt.join(60)
        self.srv.join()
        self.assertEqual(errors, [])
        self.assertEqual(len(results), total)
        for asked, got in results:
            self.assertEqual(asked, got)
        self.assertEqual(len(notices), total)
        self.assertEqual(c.ignored, 0)


class Sockets(Base):
    def test_bind_and_addresses(self) -> None:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        c = self.client(bind=f"127.0.0.1:{port}")
        self.assertEqual(c.local_address, f"127.0.0.1:{port}")
        self.assertEqual(c.server, self.srv.address)
        self.assertEqual(c.name, "web1")
        self.assertIn("web1", repr(c))

    def test_a_message_for_the_server_is_not_a_reply(self) -> None:
        # A request-typed message signed with our key arriving at the client
        # (e.g. reflected back) is neither a reply nor a notification.
        c = self.client()
        to = ("127.0.0.1", int(c.local_address.rsplit(":", 1)[1]))
        self.srv.sock.sendto(message(1, 1, 1, 1, "web1", key_fields() + bytes(6), WEB1_KEY), to)
        self.assertIsNone(c.recv_ended(timeout=SHORT))
        self.assertEqual(c.ignored, 1)


def _datagram_info(family: int, sockaddr: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """One getaddrinfo() entry."""
    return (family, socket.SOCK_DGRAM, socket.IPPROTO_UDP, "", sockaddr)


class Resolution(Base):
    """A server given by a name with several addresses: an attempt without a
    reply moves the client on to the next address, and the address that
    answered is kept."""

    def silent(self, family: int, host: str) -> socket.socket:
        """A socket that takes datagrams and never answers (the test skips
        where the family cannot be used)."""
        s = socket.socket(family, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        try:
            s.bind((host, 0))
        except OSError as e:
            self.skipTest(f"no {host} here: {e}")
        return s

    def resolving(self, *infos: Tuple[Any, ...]) -> pktdist.Client:
        """A client of "pktdist.test", which resolves to `infos`: its first
        attempt's timeout is short (it moves on from a silent address), and
        it retries twice (a late answer to the second attempt is still
        waited for, when the script has set the timeout to PATIENCE)."""
        port = int(self.srv.address.rsplit(":", 1)[1])
        with mock.patch("socket.getaddrinfo", return_value=list(infos)):
            c = pktdist.Client(f"pktdist.test:{port}", "web1", WEB1_KEY, timeout=SHORT, retries=2)
        self.addCleanup(c.close)
        return c

    def check_moves_on(self, silent: socket.socket, family: int) -> None:
        seen: List[Request] = []
        port = int(self.srv.address.rsplit(":", 1)[1])
        c = self.resolving(
            _datagram_info(family, silent.getsockname()),
            _datagram_info(socket.AF_INET, ("127.0.0.1", port)),
        )

        def script(s: FakeServer) -> None:
            # Each request answered once (a late answer means one more
            # attempt, to the silent address, and perhaps one more here).
            answered: Set[int] = set()
            while len(answered) < 2:
                req = s.recv()
                seen.append(req)
                c.timeout = PATIENCE
                if req.request_id not in answered:
                    answered.add(req.request_id)
                    s.reply(req, remaining=len(answered))

        self.srv.run(script)
        self.assertEqual(c.create("192.0.2.10:80", "198.51.100.7", 1).remaining, 1)
        # The first attempt went to the first address, the retry to the
        # second, which answered: the next request goes there at once.
        silent.settimeout(PATIENCE)
        to_silent = [silent.recv(65536)]
        self.assertEqual(c.server, self.srv.address)
        c.retries = 0
        self.assertEqual(c.create("192.0.2.10:80", "198.51.100.7", 2).remaining, 2)
        self.srv.join()
        silent.settimeout(0)
        while True:
            try:
                to_silent.append(silent.recv(65536))
            except OSError:
                break
        # Only attempts of the first request went there.
        self.assertEqual({d[5:9] for d in to_silent}, {struct.pack(">I", seen[0].request_id)})
        self.assertNotEqual(seen[0].request_id, seen[-1].request_id)
        # pktdist sees an IPv4 source, where notifications go.
        self.assertEqual({r.source[0] for r in seen}, {"127.0.0.1"})
        self.assertEqual(c.ignored, 0)

    def test_localhost_as_ipv6_first_reaches_a_server_on_ipv4(self) -> None:
        # /etc/hosts mapping localhost to ::1 first, pktdist on 127.0.0.1.
        self.check_moves_on(self.silent(socket.AF_INET6, "::1"), socket.AF_INET6)

    def test_a_silent_first_address_is_passed_over(self) -> None:
        self.check_moves_on(self.silent(socket.AF_INET, "127.0.0.1"), socket.AF_INET)

    def test_the_address_that_answered_late_is_kept(self) -> None:
        # The first address answers the first attempt only after the retry
        # went to the second: the reply fixes the first for later requests.
        first = FakeServer()
        self.addCleanup(first.close)
        retried = threading.Event()
        c = self.resolving(
            _datagram_info(socket.AF_INET, first.sock.getsockname()),
            _datagram_info(socket.AF_INET, self.srv.sock.getsockname()),
        )

        def late(s: FakeServer) -> None:
            req = s.recv()
            assert retried.wait(PATIENCE)
            # Should this answer be late, the next attempt (back here)
            # waits for it.
            c.timeout = PATIENCE
            s.reply(req, remaining=1)
            while True:
                nxt = s.recv()
                if nxt.request_id != req.request_id:
                    s.reply(nxt, remaining=2)
                    return

        def second(s: FakeServer) -> None:
            s.recv()
            retried.set()

        first.run(late)
        self.srv.run(second)
        self.assertEqual(c.create("192.0.2.10:80", "198.51.100.7", 1).remaining, 1)
        self.assertEqual(c.server, first.address)
        c.retries = 0
        self.assertEqual(c.create("192.0.2.10:80", "198.51.100.7", 2).remaining, 2)
        first.join()
        self.srv.join()

    def test_an_address_that_cannot_be_sent_to_is_passed_over(self) -> None:
        # Sending to the broadcast address without SO_BROADCAST fails at
        # once: not an attempt; the next address gets it.
        def script(s: FakeServer) -> None:
            s.reply(s.recv(), remaining=3)

        self.srv.run(script)
        c = self.resolving(
            _datagram_info(socket.AF_INET, ("255.255.255.255", 7400)),
            _datagram_info(socket.AF_INET, self.srv.sock.getsockname()),
        )
        c.retries, c.timeout = 0, PATIENCE
        self.assertEqual(c.create("192.0.2.10:80", "198.51.100.7", 3).remaining, 3)
        self.srv.join()
        # Where no address can be sent to, that is the error.
        lone = self.resolving(_datagram_info(socket.AF_INET, ("255.255.255.255", 7400)))
        with self.assertRaisesRegex(pktdist.Error, "sending to 255.255.255.255:7400"):
            lone.list()

    def test_bind_picks_the_addresses_of_its_family(self) -> None:
        def script(s: FakeServer) -> None:
            s.reply(s.recv(), remaining=4)

        self.srv.run(script)
        port = int(self.srv.address.rsplit(":", 1)[1])
        infos = [
            _datagram_info(socket.AF_INET6, ("::1", port, 0, 0)),
            _datagram_info(socket.AF_INET, ("127.0.0.1", port)),
        ]
        with mock.patch("socket.getaddrinfo", return_value=infos):
            c = pktdist.Client(f"pktdist.test:{port}", "web1", WEB1_KEY, bind="127.0.0.1:0", timeout=PATIENCE)
        self.addCleanup(c.close)
        self.assertEqual(c.server, self.srv.address)
        self.assertEqual(c.create("192.0.2.10:80", "198.51.100.7", 4).remaining, 4)
        self.srv.join()

    def test_without_a_dual_stack_socket_the_ipv4_addresses_are_used(self) -> None:
        def script(s: FakeServer) -> None:
            s.reply(s.recv(), remaining=5)

        self.srv.run(script)
        port = int(self.srv.address.rsplit(":", 1)[1])
        with mock.patch("pktdist.client._dual_stack_socket", return_value=None):
            c = self.resolving(
                _datagram_info(socket.AF_INET6, ("::1", port, 0, 0)),
                _datagram_info(socket.AF_INET, ("127.0.0.1", port)),
            )
        self.assertEqual(c.server, self.srv.address)
        c.retries, c.timeout = 0, PATIENCE
        self.assertEqual(c.create("192.0.2.10:80", "198.51.100.7", 5).remaining, 5)
        self.srv.join()


def _admits(hint: Any, value: object) -> bool:
    """Whether a type checker would take `value` for `hint` (the few forms
    the package's annotations use; an int is a float, as PEP 484 says)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return any(_admits(a, value) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        return isinstance(value, tuple) and len(value) == len(args) and all(map(_admits, args, value))
    if origin is list:
        return isinstance(value, list) and all(_admits(args[0], v) for v in value)
    return isinstance(value, hint)


class Annotations(unittest.TestCase):
    """The type hints (the package ships py.typed) take every argument form
    the README documents and the code accepts."""

    def test_documented_argument_forms_type_check(self) -> None:
        svc = "192.0.2.10:80"
        clients = ["198.51.100.7", "198.51.100.0/24", ipaddress.ip_address("198.51.100.7"), ipaddress.ip_network("198.51.100.0/24")]
        durations = [600, 1.5, timedelta(minutes=5)]
        ports = [None, 443, (1000, 1999), "1000-1999", "any", "443", [1000, 1999]]
        notify = ["127.0.0.1:7501", ("127.0.0.1", 7501), (ipaddress.ip_address("127.0.0.1"), 7501)]
        keys = [WEB1_KEY, bytearray(WEB1_KEY), memoryview(WEB1_KEY)]
        forms = {
            "client": clients,
            "duration": durations,
            "ports": ports,
            "notify": notify,
        }
        # Each form works at run time...
        service = pktdist._wire.parse_service(svc)
        for c in clients:
            pktdist._wire.parse_client(c, service)
        for d in durations:
            pktdist._wire.duration_secs(d)
        for p in ports:
            pktdist._wire.parse_ports(p)
        for n in notify:
            pktdist._wire.parse_sockaddr(n, "notify")
        for k in keys:
            pktdist._wire.check_key(k)
        # ...and its annotation takes it.
        for method, params in [
            (pktdist.Client.create, ["client", "duration", "ports", "notify"]),
            (pktdist.Client.extend, ["client", "duration", "ports"]),
            (pktdist.Client.cancel, ["client", "ports"]),
        ]:
            hints = typing.get_type_hints(method)
            for param in params:
                for value in forms[param]:
                    with self.subTest(method=method.__name__, param=param, value=value):
                        self.assertTrue(_admits(hints[param], value), hints[param])
        hints = typing.get_type_hints(pktdist.Client.__init__)
        for k in keys:
            self.assertTrue(_admits(hints["key"], k), hints["key"])
        hints = typing.get_type_hints(pktdist.Client.request)
        self.assertTrue(_admits(hints["body"], bytearray(b"x")), hints["body"])
        # The checker itself refuses what it should.
        self.assertFalse(_admits(typing.get_type_hints(pktdist.Client.create)["duration"], "600"))


class Pickling(unittest.TestCase):
    """Errors cross process boundaries (multiprocessing, a
    ProcessPoolExecutor's worker) as what they are."""

    def roundtrip(self, e: BaseException) -> BaseException:
        got = pickle.loads(pickle.dumps(e))
        self.assertIs(type(got), type(e))
        self.assertEqual((str(got), got.args), (str(e), e.args))
        return got

    def test_refusals_keep_their_type_attributes_and_text(self) -> None:
        e = self.roundtrip(pktdist.Conflict(pktdist.ReturnCode.CONFLICT, "CONFLICT", "m", "web2", 5))
        assert isinstance(e, pktdist.Conflict)
        self.assertEqual((e.code, e.code_name, e.message, e.owner, e.remaining), (1, "CONFLICT", "m", "web2", 5))
        self.assertIsInstance(e.code, pktdist.ReturnCode)
        self.assertEqual(str(e), "CONFLICT (owner web2, 5 s remaining): m")
        static = self.roundtrip(pktdist.Conflict(1, "CONFLICT", "", "web2", pktdist.STATIC_REMAINING))
        assert isinstance(static, pktdist.Conflict)
        self.assertTrue(static.static)
        for code in [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 42]:
            with self.subTest(code=code):
                e = pktdist.errors.refused(code, f"CODE_{code}", f"reason {code}", None, 0)
                got = self.roundtrip(e)
                assert isinstance(got, pktdist.Refused)
                self.assertEqual((got.code, got.message, got.owner, got.remaining), (code, f"reason {code}", None, 0))
        e = pktdist.NotFound(2, "NOT_FOUND")
        e.note = "kept"  # type: ignore[attr-defined]
        self.assertEqual(self.roundtrip(e).note, "kept")  # type: ignore[attr-defined]

    def test_other_errors(self) -> None:
        t = self.roundtrip(pktdist.Timeout(3))
        assert isinstance(t, pktdist.Timeout)
        self.assertEqual(t.attempts, 3)
        self.assertTrue(str(t).startswith("no reply after 3 attempts ("), str(t))
        self.roundtrip(pktdist.ProtocolError("list pagination made no progress"))
        self.roundtrip(pktdist.Error("the client is closed"))


class Exports(unittest.TestCase):
    def test_errors_star_import_has_every_exported_error(self) -> None:
        names: dict = {}
        exec("from pktdist.errors import *", names)
        errors = [
            n for n in pktdist.__all__
            if isinstance(getattr(pktdist, n), type) and issubclass(getattr(pktdist, n), BaseException)
        ]
        self.assertIn("Draining", errors)
        self.assertEqual([n for n in errors if names.get(n) is not getattr(pktdist, n)], [])


if __name__ == "__main__":
    unittest.main()
