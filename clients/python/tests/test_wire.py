"""The wire format against docs/PROTOCOL.md: the worked example byte for
byte, every request body, and the decoders' refusals."""

from __future__ import annotations

import ipaddress
import re
import struct
import unittest
from datetime import timedelta
from pathlib import Path

import pktdist
from pktdist import _wire as w

from fakeserver import (
    affinities_payload,
    affinity_entry,
    key_fields,
    message,
    name_field,
    reply_body,
)

# PROTOCOL.md §9, copied here so that the test also runs from an installed
# package; when the repository is there, the document is checked to still say
# exactly this.
WORKED_EXAMPLE = bytes.fromhex(
    "5044 01 01 00 00000001 0000018bcfe56800 1122334455667788 04 77656231"
    " 04 c000020a 0050 06 04 c6336400 18 00 0000 0000 0000012c 00 00"
    " 7dc75ded5878a5a0fe8f6b8daea421df8238d54b2104c871ea5c26792061884f".replace(" ", "")
)
# PROTOCOL.md §9.1: web1 drains itself.
STATE_EXAMPLE = bytes.fromhex(
    "5044 01 0b 00 00000002 0000018bcfe56800 1122334455667788 04 77656231 00 00 02"
    " cf785593adb63cf3697c728d7938a476f297665c771954fae4a555589a5b83e9".replace(" ", "")
)
PROTOCOL_MD = Path(__file__).resolve().parents[3] / "docs" / "PROTOCOL.md"


def documented_example(heading: str = "## 9. Worked example") -> bytes:
    """The hex dump of a worked example (the first block under `heading`),
    as the document writes it."""
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    block = section[section.index("```\n") + 4 :]
    block = block[: block.index("```")]
    out = bytearray()
    for line in block.splitlines():
        # Each line: hex byte pairs, then two or more spaces and a comment.
        hexpart = re.split(r"\s{2,}", line.strip())[0]
        out += bytes.fromhex(hexpart)
    return bytes(out)


class WorkedExample(unittest.TestCase):
    def encode(self) -> bytes:
        svc = w.parse_service("192.0.2.10:80")
        body = w.affinity_body(
            svc, w.parse_client("198.51.100.0/24", svc), w.parse_ports(None), 300, None, None
        )
        return w.encode_message(
            pktdist.MsgType.AFFINITY_CREATE,
            1,
            1700000000000,
            0x1122334455667788,
            b"web1",
            body,
            bytes(range(32)),
        )

    def test_worked_example_byte_for_byte(self) -> None:
        self.assertEqual(self.encode().hex(" "), WORKED_EXAMPLE.hex(" "))

    @unittest.skipUnless(PROTOCOL_MD.exists(), "docs/PROTOCOL.md is not beside this checkout")
    def test_document_still_says_the_same(self) -> None:
        self.assertEqual(documented_example().hex(" "), WORKED_EXAMPLE.hex(" "))

    def test_backend_state_example_byte_for_byte(self) -> None:
        body = w.backend_state_body(None, None, pktdist.Declared.DRAIN)
        got = w.encode_message(
            pktdist.MsgType.BACKEND_STATE, 2, 1700000000000, 0x1122334455667788, b"web1", body, bytes(range(32))
        )
        self.assertEqual(got.hex(" "), STATE_EXAMPLE.hex(" "))

    @unittest.skipUnless(PROTOCOL_MD.exists(), "docs/PROTOCOL.md is not beside this checkout")
    def test_document_still_says_the_same_for_backend_state(self) -> None:
        self.assertEqual(documented_example("### 9.1 BACKEND_STATE").hex(" "), STATE_EXAMPLE.hex(" "))

    def test_the_client_sends_exactly_that(self) -> None:
        # Through the public API: same request with host bits in the client
        # and the duration as a float just under 300 s; only the header's
        # id, timestamp and nonce (and so the tag) differ.
        from fakeserver import FakeServer

        srv = FakeServer()
        got = []

        def script(s: FakeServer) -> None:
            req = s.recv()
            got.append(req)
            s.reply(req, remaining=300)

        srv.run(script)
        with pktdist.Client(srv.address, "web1", bytes(range(32))) as c:
            r = c.create("192.0.2.10:80", "198.51.100.77/24", 299.2)
        srv.join()
        srv.close()
        self.assertEqual(r.remaining, 300)
        raw = got[0].raw
        self.assertEqual(raw[:5], WORKED_EXAMPLE[:5])
        self.assertEqual(raw[25:-32], WORKED_EXAMPLE[25:-32])


class RequestBodies(unittest.TestCase):
    def test_owner_ports_notify(self) -> None:
        svc = w.parse_service("192.0.2.10:80")
        body = w.affinity_body(
            svc,
            w.parse_client("198.51.100.9", svc),
            w.parse_ports((1000, 2000)),
            60,
            b"web2",
            w.parse_sockaddr("10.0.0.5:9000", "notify"),
        )
        want = (
            key_fields(client="198.51.100.9", prefix=32, kind=2, lo=1000, hi=2000)
            + struct.pack(">I", 60)
            + name_field("web2")
            + bytes([4, 10, 0, 0, 5])
            + struct.pack(">H", 9000)
        )
        self.assertEqual(body, want)

    def test_ipv6_and_udp(self) -> None:
        svc = w.parse_service("[2001:db8::10]:53/udp")
        self.assertEqual(str(svc), "[2001:db8::10]:53/udp")
        body = w.affinity_body(
            svc, w.parse_client("2001:db8:1:2::7/48", svc), w.parse_ports(5353), 0, None, None
        )
        want = (
            key_fields("2001:db8::10", 53, 17, "2001:db8:1::", 48, 1, 5353, 5353)
            + struct.pack(">I", 0)
            + b"\x00\x00"
        )
        self.assertEqual(body, want)

    def test_list_bodies(self) -> None:
        self.assertEqual(w.affinity_list_body(None, None, 0), b"\x00\x00" + bytes(6))
        svc = w.parse_service("192.0.2.10:80")
        self.assertEqual(
            w.affinity_list_body(svc, b"be1", 17, 5),
            b"\x01\x04\xc0\x00\x02\x0a\x00\x50\x06" + name_field("be1") + struct.pack(">IH", 17, 5),
        )
        self.assertEqual(w.backend_list_body(b"web", 3), name_field("web") + struct.pack(">IH", 3, 0))
        self.assertEqual(
            w.set_weight_body(b"web", b"be1", 0), name_field("web") + name_field("be1") + bytes(4)
        )
        self.assertEqual(w.stats_body(7, 1200), struct.pack(">II", 7, 1200))

    def test_oversize_message_refused(self) -> None:
        with self.assertRaisesRegex(ValueError, "above 1400"):
            w.encode_message(1, 1, 1, 1, b"x", bytes(1400), bytes(16))


class Arguments(unittest.TestCase):
    def test_services(self) -> None:
        s = w.parse_service("192.0.2.10:80")
        self.assertEqual((str(s.addr), s.port, s.proto), ("192.0.2.10", 80, 6))
        self.assertEqual(w.parse_service("192.0.2.10:80/TCP").proto, 6)
        self.assertEqual(w.parse_service("[::1]:8080").addr, ipaddress.ip_address("::1"))
        for bad, why in [
            ("192.0.2.10", "host:port"),
            ("192.0.2.10:http", "port must be a number"),
            ("192.0.2.10:65536", "port must be a number"),
            ("web.example:80", "not an IP address"),
            ("2001:db8::1:80", r"\[addr\]:port"),
            ("[2001:db8::1]80", r"\[addr\]:port"),
            ("192.0.2.10:80/sctp", "/tcp or /udp"),
            (":80", "host:port"),
        ]:
            with self.subTest(bad=bad), self.assertRaisesRegex(ValueError, why):
                w.parse_service(bad)
        with self.assertRaises(TypeError):
            w.parse_service(("192.0.2.10", 80))

    def test_clients(self) -> None:
        svc = w.parse_service("192.0.2.10:80")
        self.assertEqual(str(w.parse_client("198.51.100.7", svc)), "198.51.100.7/32")
        self.assertEqual(str(w.parse_client("198.51.100.7/24", svc)), "198.51.100.0/24")
        self.assertEqual(
            str(w.parse_client(ipaddress.ip_address("10.1.2.3"), svc)), "10.1.2.3/32"
        )
        with self.assertRaisesRegex(ValueError, "different address families"):
            w.parse_client("2001:db8::1", svc)
        with self.assertRaisesRegex(ValueError, "not an address or a network"):
            w.parse_client("198.51.100.0/33", svc)
        with self.assertRaisesRegex(ValueError, "not an address or a network"):
            w.parse_client("client-7", svc)
        with self.assertRaises(TypeError):
            w.parse_client(3232235777, svc)

    def test_ports(self) -> None:
        self.assertEqual(w.parse_ports(None), (0, 0, 0))
        self.assertEqual(w.parse_ports("any"), (0, 0, 0))
        self.assertEqual(w.parse_ports(443), (1, 443, 443))
        self.assertEqual(w.parse_ports("443"), (1, 443, 443))
        self.assertEqual(w.parse_ports((1000, 1999)), (2, 1000, 1999))
        self.assertEqual(w.parse_ports("1000-1999"), (2, 1000, 1999))
        bad: object
        for bad in [(2000, 1000), "2000-1000"]:
            with self.assertRaisesRegex(ValueError, "low end is above"):
                w.parse_ports(bad)
        for bad in [70000, -1, "1000-", "x", (1, 2, 3)]:
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                w.parse_ports(bad)
        for bad in [True, 1.5, (1, "2")]:
            with self.subTest(bad=bad), self.assertRaises(TypeError):
                w.parse_ports(bad)
        self.assertEqual([w.ports_value(*w.parse_ports(p)) for p in (None, 7, (1, 2))], [None, 7, (1, 2)])

    def test_durations(self) -> None:
        self.assertEqual(w.duration_secs(300), 300)
        self.assertEqual(w.duration_secs(0.001), 1)
        self.assertEqual(w.duration_secs(1.001), 2)
        self.assertEqual(w.duration_secs(timedelta(minutes=5)), 300)
        self.assertEqual(w.duration_secs(2**32 - 1), 2**32 - 1)
        for bad in [0, -5, float("nan"), float("inf"), 2**32, timedelta(0)]:
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                w.duration_secs(bad)
        for bad in ["5m", None, True]:
            with self.subTest(bad=bad), self.assertRaises(TypeError):
                w.duration_secs(bad)

    def test_names_and_keys(self) -> None:
        self.assertEqual(w.check_name("be1", "name"), b"be1")
        with self.assertRaisesRegex(ValueError, "1 to 64 bytes"):
            w.check_name("", "name")
        with self.assertRaisesRegex(ValueError, "1 to 64 bytes"):
            w.check_name("é" * 33, "name")
        with self.assertRaises(TypeError):
            w.check_name(b"be1", "name")
        with self.assertRaisesRegex(ValueError, "16 to 128 bytes"):
            w.check_key(b"short")
        with self.assertRaisesRegex(ValueError, "16 to 128 bytes"):
            w.check_key(bytes(129))
        with self.assertRaisesRegex(TypeError, "key_from_hex"):
            w.check_key("00" * 32)
        self.assertEqual(pktdist.key_from_hex(" 0x" + "0aFF" * 8 + "\n"), b"\x0a\xff" * 8)
        for bad, why in [
            ("", "empty"),
            ("abc", "odd number"),
            ("zz" * 16, "non-hex character 'z' at position 1"),
            ("00" * 8, "16 to 128 bytes"),
        ]:
            with self.subTest(bad=bad), self.assertRaisesRegex(ValueError, why):
                pktdist.key_from_hex(bad)

    def test_notify_addresses(self) -> None:
        self.assertEqual(
            w.parse_sockaddr("10.0.0.5:9000", "notify"), (ipaddress.ip_address("10.0.0.5"), 9000)
        )
        self.assertEqual(
            w.parse_sockaddr(("::1", 7), "notify"), (ipaddress.ip_address("::1"), 7)
        )
        with self.assertRaisesRegex(ValueError, "not an IP address"):
            w.parse_sockaddr("localhost:9000", "notify")


def envelope(body: bytes, msg_type: int = 0x80, name: str = "web1") -> bytes:
    return message(msg_type, 9, 1, 2, name, body, bytes(32))


class Decoding(unittest.TestCase):
    def test_reply_with_affinities(self) -> None:
        entries = [
            affinity_entry("be1", 42, ("127.0.0.1", 5000)),
            affinity_entry("be2", 0xFFFFFFFF, None, client="203.0.113.0", prefix=24, kind=1, lo=7, hi=7),
            affinity_entry(
                "be3", 5, None, service="2001:db8::10", port=53, proto=17, client="2001:db8::", prefix=32,
                kind=2, lo=1, hi=9,
            ),
        ]
        body = reply_body(4, 99, flags=1, payload=affinities_payload(3, entries))
        rb = w.decode_reply(body)
        self.assertEqual((rb.request_type, rb.request_nonce, rb.more, rb.next_offset), (4, 99, True, 3))
        self.assertEqual(rb.reply.code, pktdist.ReturnCode.OK)
        a, b, c = rb.affinities
        self.assertEqual(
            a,
            pktdist.Affinity("192.0.2.10:80", "198.51.100.0/24", None, "be1", 42, "127.0.0.1:5000", "tcp"),
        )
        self.assertEqual((b.ports, b.remaining, b.static, b.notify), (7, None, True, None))
        self.assertFalse(a.static)
        self.assertEqual((c.service, c.client, c.ports, c.protocol), ("[2001:db8::10]:53/udp", "2001:db8::/32", (1, 9), "udp"))

    def test_reply_fields(self) -> None:
        rb = w.decode_reply(reply_body(1, 5, code=1, remaining=17, owner="be2", text="taken"))
        self.assertEqual(rb.reply, pktdist.Reply(pktdist.ReturnCode.CONFLICT, 17, "be2", "taken"))
        self.assertEqual(rb.reply.code_name, "CONFLICT")
        # A return code added by a later pktdist is kept as its number.
        rb = w.decode_reply(reply_body(1, 5, code=42))
        self.assertEqual((rb.reply.code, rb.reply.code_name), (42, "CODE_42"))

    def test_backends_and_stats_payloads(self) -> None:
        up = bytes([1]) + struct.pack(">I", 5) + bytes([1, 1, 0]) + struct.pack(">H", 0)
        draining = bytes([2]) + struct.pack(">I", 60) + bytes([1, 2, 1]) + struct.pack(">H", 0)
        entry = name_field("web") + name_field("be1") + bytes([4, 10, 0, 0, 1]) + b"\x01" + bytes([2, 0, 0, 0, 0, 9]) + struct.pack(">I", 100) + up
        entry2 = name_field("web") + name_field("be2") + bytes([4, 10, 0, 0, 2]) + b"\x00" + struct.pack(">I", 0) + draining
        rb = w.decode_reply(reply_body(5, 1, payload=b"\x02" + struct.pack(">IH", 0, 2) + entry + entry2))
        self.assertEqual(
            list(rb.backends),
            [
                pktdist.Backend("web", "be1", "10.0.0.1", "02:00:00:00:00:09", 100, state_secs=5),
                pktdist.Backend(
                    "web", "be2", "10.0.0.2", None, 0,
                    state="draining", state_secs=60, admin=pktdist.Declared.DRAIN, healthy=True,
                ),
            ],
        )
        rb = w.decode_reply(reply_body(9, 1, payload=b"\x03" + struct.pack(">IIIH", 3, 10, 4, 2) + b"{}"))
        assert rb.stats is not None
        self.assertEqual((rb.stats.token, rb.stats.total_len, rb.stats.offset, rb.stats.chunk), (3, 10, 4, b"{}"))

    def test_ended(self) -> None:
        e = w.decode_ended(key_fields(client="198.51.100.0", prefix=24) + name_field("be1") + b"\x02")
        self.assertEqual(e, pktdist.Ended("192.0.2.10:80", "198.51.100.0/24", None, "be1", 2, "tcp"))
        self.assertIs(e.reason, pktdist.EndReason.CANCELLED)
        self.assertEqual(e.reason_name, "CANCELLED")
        down = w.decode_ended(key_fields() + name_field("be1") + b"\x04")
        self.assertIs(down.reason, pktdist.EndReason.BACKEND_DOWN)
        self.assertEqual(down.reason_name, "BACKEND_DOWN")
        later = w.decode_ended(key_fields() + name_field("be1") + b"\x05")
        self.assertEqual((later.reason, later.reason_name), (5, "REASON_5"))

    def test_every_truncation_of_a_reply_is_refused(self) -> None:
        body = reply_body(
            4, 1, flags=1, owner="be1", text="hello",
            payload=affinities_payload(2, [affinity_entry("be1", 9, ("10.0.0.1", 9))]),
        )
        w.decode_reply(body)
        for n in range(len(body)):
            with self.subTest(cut=n), self.assertRaises(w.Malformed):
                w.decode_reply(body[:n])
        with self.assertRaisesRegex(w.Malformed, "unexpected bytes"):
            w.decode_reply(body + b"\x00")

    def test_malformed_replies_are_refused(self) -> None:
        one = lambda **k: affinities_payload(0, [affinity_entry("be1", 1, None, **k)])  # noqa: E731
        cases = {
            "unknown reply flags": reply_body(1, 1, flags=2),
            "unknown reply payload kind": reply_body(1, 1, payload=b"\x07"),
            "name longer than 64": reply_body(1, 1) [:15] + b"\x41" + b"a" * 65 + b"\x00\x00\x00",
            "message text longer than 512": reply_body(1, 1)[:16] + struct.pack(">H", 513) + b"a" * 513 + b"\x00",
            "message text is not UTF-8": reply_body(1, 1)[:16] + struct.pack(">H", 2) + b"\xff\xfe\x00",
            "port kind must be": reply_body(4, 1, payload=one(kind=3)),
            "ANY requires": reply_body(4, 1, payload=one(kind=0, lo=1, hi=1)),
            "ONE requires": reply_body(4, 1, payload=one(kind=1, lo=1, hi=2)),
            "range low end above": reply_body(4, 1, payload=one(kind=2, lo=3, hi=2)),
            "families differ": reply_body(4, 1, payload=one(client="2001:db8::")),
            "prefix length too long": reply_body(4, 1, payload=one(prefix=33)),
            "protocol must be": reply_body(4, 1, payload=one(proto=1)),
            "address family must be": reply_body(4, 1, payload=affinities_payload(0, [b"\x05" + bytes(20)])),
            "affinity owner missing": reply_body(4, 1, payload=affinities_payload(0, [key_fields() + b"\x00" + bytes(5)])),
            "MAC presence flag": reply_body(5, 1, payload=b"\x02" + struct.pack(">IH", 0, 1) + name_field("w") + name_field("b") + bytes([4, 1, 2, 3, 4, 2]) + bytes(10)),
            "beyond total length": reply_body(9, 1, payload=b"\x03" + struct.pack(">IIIH", 1, 3, 2, 2) + b"ab"),
        }
        for why, body in cases.items():
            with self.subTest(why=why), self.assertRaisesRegex(w.Malformed, why):
                w.decode_reply(body)
        with self.assertRaisesRegex(w.Malformed, "end reason 0"):
            w.decode_ended(key_fields() + name_field("be1") + b"\x00")
        with self.assertRaisesRegex(w.Malformed, "unexpected bytes"):
            w.decode_ended(key_fields() + name_field("be1") + b"\x01\x01")

    def test_envelopes(self) -> None:
        good = envelope(reply_body(1, 1))
        env = w.open_envelope(good)
        self.assertEqual((env.msg_type, env.request_id, env.timestamp_ms, env.nonce, env.name), (0x80, 9, 1, 2, b"web1"))
        self.assertTrue(w.verify(bytes(32), env))
        self.assertFalse(w.verify(bytes(31) + b"\x01", env))
        tampered = bytearray(good)
        tampered[40] ^= 1
        self.assertFalse(w.verify(bytes(32), w.open_envelope(bytes(tampered))))
        bad = {
            "bad magic": b"PX" + good[2:],
            "version 2": good[:2] + b"\x02" + good[3:],
            "header flags": good[:4] + b"\x01" + good[5:],
            "truncated": good[:58],
            "above 1400": good + bytes(1400),
            "name length": good[:25] + b"\x00" + good[26:],
        }
        for why, d in bad.items():
            with self.subTest(why=why), self.assertRaisesRegex(w.Malformed, why):
                w.open_envelope(d)


if __name__ == "__main__":
    unittest.main()
