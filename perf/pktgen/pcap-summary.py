#!/usr/bin/env python3
"""Says what a pcap file of Ethernet frames holds: frame sizes on the wire,
TCP flags, destinations, distinct flows (5-tuples), source ranges and bad
checksums, for the IPv4 packets in it (inside IP-in-IP too: pktdist's
forwarded frames). With --expect-* options it also checks the capture and
exits 1, naming what differs, unless all hold.

  perf/pktgen/pcap-summary.py capture.pcap
  perf/pktgen/pcap-summary.py --expect-flags S --expect-sizes 64 \\
      --expect-dst 192.0.2.10:80 --expect-min-flows 2 capture.pcap

Sizes count the 4-byte FCS (as pktgen's do): a 60-byte record is a 64-byte
frame. TCP flags are written as letters: F S R P A U E C (FIN SYN RST PSH
ACK URG ECE CWR), e.g. S for a SYN, AP for ACK+PSH.
"""

import argparse
import collections
import ipaddress
import json
import struct
import sys

FLAG_LETTERS = "FSRPAUEC"


def flags_text(f):
    return "".join(c for i, c in enumerate(FLAG_LETTERS) if f & (1 << i)) or "-"


def records(path):
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            raise SystemExit(f"{path}: not a pcap file (shorter than its header)")
        magic = head[:4]
        if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
            end = "<"
        elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
            end = ">"
        else:
            raise SystemExit(f"{path}: not a pcap file (magic {magic.hex()})")
        link = struct.unpack(end + "I", head[20:24])[0]
        if link != 1:
            raise SystemExit(f"{path}: link type {link}, not Ethernet")
        while True:
            h = f.read(16)
            if len(h) < 16:
                return
            incl = struct.unpack(end + "IIII", h)[2]
            data = f.read(incl)
            if len(data) < incl:
                return
            yield data


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def mac_text(b):
    return ":".join(f"{x:02x}" for x in b)


class Summary:
    def __init__(self):
        self.frames = 0
        self.sizes = collections.Counter()
        self.kinds = collections.Counter()
        self.flags = collections.Counter()
        self.dsts = collections.Counter()
        self.dst_macs = collections.Counter()
        self.flows = set()
        self.src_min = self.src_max = None
        self.sport_min = self.sport_max = None
        self.bad_ip_checksums = 0
        self.bad_tcp_checksums = 0
        self.encapsulated = 0

    def add(self, frame):
        self.frames += 1
        self.sizes[max(len(frame), 60) + 4] += 1
        if len(frame) < 14:
            self.kinds["runt"] += 1
            return
        self.dst_macs[mac_text(frame[:6])] += 1
        etype = struct.unpack("!H", frame[12:14])[0]
        if etype != 0x0800:
            self.kinds[f"ethertype 0x{etype:04x}"] += 1
            return
        self.ipv4(frame[14:], outer=True)

    def ipv4(self, p, outer):
        if len(p) < 20 or p[0] >> 4 != 4:
            self.kinds["bad IPv4"] += 1
            return
        ihl = (p[0] & 15) * 4
        total = struct.unpack("!H", p[2:4])[0]
        if ihl < 20 or len(p) < ihl or total < ihl or len(p) < total:
            self.kinds["bad IPv4"] += 1
            return
        if checksum(p[:ihl]) != 0:
            self.bad_ip_checksums += 1
        proto = p[9]
        src, dst = struct.unpack("!II", p[12:20])
        if proto == 4 and outer:
            self.encapsulated += 1
            self.ipv4(p[ihl:total], outer=False)
            return
        if proto != 6:
            self.kinds[f"IPv4 protocol {proto}"] += 1
            return
        t = p[ihl:total]
        if len(t) < 20:
            self.kinds["bad TCP"] += 1
            return
        sport, dport = struct.unpack("!HH", t[:4])
        pseudo = struct.pack("!IIBBH", src, dst, 0, 6, len(t))
        if checksum(pseudo + t) != 0:
            self.bad_tcp_checksums += 1
        self.kinds["TCP/IPv4"] += 1
        self.flags[flags_text(t[13])] += 1
        self.dsts[f"{ipaddress.IPv4Address(dst)}:{dport}"] += 1
        self.flows.add((src, dst, 6, sport, dport))
        self.src_min = src if self.src_min is None else min(self.src_min, src)
        self.src_max = src if self.src_max is None else max(self.src_max, src)
        self.sport_min = sport if self.sport_min is None else min(self.sport_min, sport)
        self.sport_max = sport if self.sport_max is None else max(self.sport_max, sport)

    def as_dict(self):
        ip = lambda n: None if n is None else str(ipaddress.IPv4Address(n))
        return {
            "frames": self.frames,
            "sizes": dict(sorted(self.sizes.items())),
            "kinds": dict(self.kinds),
            "tcp_flags": dict(self.flags.most_common()),
            "destinations": dict(self.dsts.most_common()),
            "dst_macs": dict(self.dst_macs.most_common()),
            "distinct_flows": len(self.flows),
            "sources": [ip(self.src_min), ip(self.src_max)],
            "source_ports": [self.sport_min, self.sport_max],
            "ip_in_ip": self.encapsulated,
            "bad_ip_checksums": self.bad_ip_checksums,
            "bad_tcp_checksums": self.bad_tcp_checksums,
        }


def text(d):
    out = [f"frames {d['frames']}"]
    out.append("sizes  " + ", ".join(f"{k} x{v}" for k, v in d["sizes"].items()))
    out.append("kinds  " + ", ".join(f"{k} x{v}" for k, v in d["kinds"].items()))
    if d["ip_in_ip"]:
        out.append(f"IP-in-IP {d['ip_in_ip']} (inner packets counted below)")
    out.append("TCP flags " + ", ".join(f"{k} x{v}" for k, v in d["tcp_flags"].items()))
    dsts = list(d["destinations"].items())
    out.append("destinations " + ", ".join(f"{k} x{v}" for k, v in dsts[:5])
               + (f" (and {len(dsts) - 5} more)" if len(dsts) > 5 else ""))
    out.append("dst MACs " + ", ".join(f"{k} x{v}" for k, v in list(d["dst_macs"].items())[:5]))
    out.append(f"distinct flows (5-tuples) {d['distinct_flows']}")
    out.append(f"sources {d['sources'][0]}-{d['sources'][1]}, ports {d['source_ports'][0]}-{d['source_ports'][1]}")
    out.append(f"bad checksums: IPv4 {d['bad_ip_checksums']}, TCP {d['bad_tcp_checksums']}")
    return "\n".join(out)


def check(d, a):
    """The expectations that do not hold, as sentences."""
    bad = []
    frames = d["frames"]
    tcp = d["kinds"].get("TCP/IPv4", 0)
    if frames == 0:
        return ["the capture holds no frame"]
    if tcp != frames:
        bad.append(f"{frames - tcp} of {frames} frames are not TCP/IPv4: {d['kinds']}")
    if a.expect_flags is not None:
        # The letters in any order: AP and PA are both ACK+PSH.
        want = "".join(c for c in FLAG_LETTERS if c in a.expect_flags.upper()) or "-"
        other = {k: v for k, v in d["tcp_flags"].items() if k != want}
        if other:
            bad.append(f"TCP flags other than {a.expect_flags}: {other}")
    if a.expect_sizes is not None:
        want = {}
        for part in a.expect_sizes.split(","):
            size, _, weight = part.partition(":")
            want[int(size)] = int(weight or 1)
        other = {k: v for k, v in d["sizes"].items() if k not in want}
        if other:
            bad.append(f"frame sizes other than {sorted(want)}: {other}")
        total_w = sum(want.values())
        for size, w in want.items():
            got = d["sizes"].get(size, 0)
            # Whole sequences, but for the one the capture cut.
            if abs(got - frames * w / total_w) > w + 1:
                bad.append(f"{got} frames of {size} bytes, expected {w}/{total_w} of {frames}")
    if a.expect_dst is not None:
        other = {k: v for k, v in d["destinations"].items() if k != a.expect_dst}
        if other:
            bad.append(f"destinations other than {a.expect_dst}: {dict(list(other.items())[:5])}")
    if a.expect_dst_mac is not None:
        other = {k: v for k, v in d["dst_macs"].items() if k != a.expect_dst_mac.lower()}
        if other:
            bad.append(f"destination MACs other than {a.expect_dst_mac}: {other}")
    if a.expect_flows is not None and d["distinct_flows"] != a.expect_flows:
        bad.append(f"{d['distinct_flows']} distinct flows, expected {a.expect_flows}")
    if a.expect_min_flows is not None and d["distinct_flows"] < a.expect_min_flows:
        bad.append(f"{d['distinct_flows']} distinct flows, expected at least {a.expect_min_flows}")
    if a.expect_sources is not None:
        lo, _, hi = a.expect_sources.partition("-")
        lo, hi = int(ipaddress.IPv4Address(lo)), int(ipaddress.IPv4Address(hi or lo))
        s = d["sources"]
        if int(ipaddress.IPv4Address(s[0])) < lo or int(ipaddress.IPv4Address(s[1])) > hi:
            bad.append(f"sources {s[0]}-{s[1]} outside {a.expect_sources}")
    if a.expect_source_ports is not None:
        lo, _, hi = a.expect_source_ports.partition("-")
        lo, hi = int(lo), int(hi or lo)
        p = d["source_ports"]
        if p[0] < lo or p[1] > hi:
            bad.append(f"source ports {p[0]}-{p[1]} outside {a.expect_source_ports}")
    if d["bad_ip_checksums"] or d["bad_tcp_checksums"]:
        bad.append(f"bad checksums: IPv4 {d['bad_ip_checksums']}, TCP {d['bad_tcp_checksums']}")
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pcap")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--expect-flags", metavar="LETTERS", help="every TCP segment has exactly these flags (S, AP, A)")
    ap.add_argument("--expect-sizes", metavar="SIZE[:W],...", help="only these frame sizes, in these proportions (64:7,594:4,1518:1)")
    ap.add_argument("--expect-dst", metavar="ADDR:PORT", help="every packet goes to this address and port")
    ap.add_argument("--expect-dst-mac", metavar="MAC", help="every frame goes to this MAC")
    ap.add_argument("--expect-flows", type=int, metavar="N", help="exactly N distinct 5-tuples")
    ap.add_argument("--expect-min-flows", type=int, metavar="N", help="at least N distinct 5-tuples")
    ap.add_argument("--expect-sources", metavar="A-B", help="every source address within A-B")
    ap.add_argument("--expect-source-ports", metavar="A-B", help="every source port within A-B")
    a = ap.parse_args()

    s = Summary()
    for r in records(a.pcap):
        s.add(r)
    d = s.as_dict()
    print(json.dumps(d, indent=1) if a.json else text(d))
    bad = check(d, a)
    expecting = any(v is not None for k, v in vars(a).items() if k.startswith("expect_"))
    if expecting:
        for b in bad:
            print(f"MISMATCH {b}", file=sys.stderr)
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
