#!/usr/bin/env python3
"""Writes a pcap file of TCP SYNs, one per distinct flow, for pktgen to
replay (`pktgen ... -- -s 0:FILE -f perf/pktgen/syn-flood-pcap.lua`).

Flow i comes from client address SRC + i // PORTS and source port
SPORT + i % PORTS, to VIP:VIP_PORT; the flows are written in a shuffled
order (fixed by --seed), so consecutive frames hit unrelated flow-table
buckets. Frames are 60 bytes (64 on the wire with the FCS) with correct IPv4
and TCP checksums.

  perf/pktgen/syn-pcap.py --flows 1000000 /tmp/syn.pcap
"""

import argparse
import ipaddress
import random
import struct
import sys


def mac(text):
    parts = text.split(":")
    if len(parts) != 6:
        raise argparse.ArgumentTypeError(f"not a MAC address: {text!r}")
    try:
        b = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a MAC address: {text!r}") from None
    return b


def ipv4(text):
    try:
        return int(ipaddress.IPv4Address(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def syn_frame(dst_mac, src_mac, src, dst, sport, dport, seq):
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 65535, 0, 0)
    pseudo = struct.pack("!IIBBH", src, dst, 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    frame = dst_mac + src_mac + b"\x08\x00" + ip + tcp
    return frame + b"\0" * (60 - len(frame))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", help="pcap file to write")
    ap.add_argument("--flows", type=int, default=1_000_000, help="distinct flows, one SYN each (default 1000000)")
    ap.add_argument("--vip", type=ipv4, default="192.0.2.10", help="destination address (default 192.0.2.10)")
    ap.add_argument("--vip-port", type=int, default=80, help="destination port (default 80)")
    ap.add_argument("--src", type=ipv4, default="198.18.0.1", help="first client address (default 198.18.0.1)")
    ap.add_argument("--sport", type=int, default=1024, help="first client port (default 1024)")
    ap.add_argument("--ports", type=int, default=64, help="client ports per address (default 64)")
    ap.add_argument("--dst-mac", type=mac, default="02:00:00:00:00:01", help="pktdist's port MAC, or the next hop's (default 02:00:00:00:00:01)")
    ap.add_argument("--src-mac", type=mac, default="02:00:00:00:00:02", help="the sender's MAC (default 02:00:00:00:00:02)")
    ap.add_argument("--seed", type=int, default=1, help="shuffle seed (default 1)")
    a = ap.parse_args()

    if a.flows < 1:
        ap.error("--flows must be at least 1")
    if not 1 <= a.ports <= 65536 - a.sport or not 0 <= a.sport <= 65535:
        ap.error("--sport and --ports must keep client ports within 0-65535")
    if not 0 <= a.vip_port <= 65535:
        ap.error("--vip-port must be 0-65535")
    addresses = (a.flows + a.ports - 1) // a.ports
    if a.src + addresses - 1 > 0xFFFFFFFF:
        ap.error(f"{a.flows} flows need {addresses} client addresses from --src: past 255.255.255.255")

    order = list(range(a.flows))
    random.Random(a.seed).shuffle(order)
    with open(a.output, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for n, i in enumerate(order):
            frame = syn_frame(a.dst_mac, a.src_mac, a.src + i // a.ports, a.vip,
                              a.sport + i % a.ports, a.vip_port, i)
            f.write(struct.pack("<IIII", n // 1_000_000, n % 1_000_000, len(frame), len(frame)))
            f.write(frame)
    last = ipaddress.IPv4Address(a.src + addresses - 1)
    print(f"syn-pcap: {a.output}: {a.flows} SYNs, one per flow, from "
          f"{ipaddress.IPv4Address(a.src)}-{last} ports {a.sport}-{a.sport + min(a.ports, a.flows) - 1} "
          f"to {ipaddress.IPv4Address(a.vip)}:{a.vip_port}, 64-byte frames", file=sys.stderr)


if __name__ == "__main__":
    main()
