#!/usr/bin/env python3
"""pktdist side by side with dpdk-testpmd, the bare-I/O reference.

Both run in turn on the same virtual devices, the same core and the same
frames: a `net_pcap` port replaying a capture file forever
(`infinite_rx=1`) into the forwarding core, which transmits to a `net_null`
port that discards (`no-rx=1`). `dpdk-testpmd --forward-mode=io` moves the
frames untouched; pktdist's worker (`dataplane-bench --scenario pcap-*`)
does its whole job on them. Each round runs both for each scenario, each
taking each place in the order in turn (this VM's speed drifts by +-30%
within minutes, so only runs seconds apart compare), the scenarios in
order in one round and in reverse in the next, and the report is the
median of the rounds' ratios.

    sudo perf/vs_testpmd.py                       # 5 rounds, 3 s per run
    sudo perf/vs_testpmd.py --rounds 9 --seconds 4 --scenario syn
    sudo perf/vs_testpmd.py --reference /tmp/bench-before   # and an older build
    sudo perf/vs_testpmd.py --hugepages           # DPDK memory on hugepages

With `--hugepages`, testpmd and pktdist take their DPDK memory (the
replayed file's mbufs among it) from hugepages reserved beforehand
(`scripts/hugepages.sh --pages N` of 2 MiB; this script says how many when
too few are free), as on a real NIC server; without it, from --no-huge
memory on small pages. pktdist's own tables take transparent huge pages
either way.

With `--reference`, a second dataplane-bench binary (an older build of
pktdist, with the pcap scenarios) runs in every round too, so a change is
measured against testpmd and against the build before it in the same
rounds. The three then rotate through the places in a round's order, so
give a multiple of three rounds: the later runs of a round tend to be
faster on this VM.

Scenarios (frames written by `dataplane-bench --write-pcap`, once, into
perf/out/pcap/):

* established: one ACK for each of 1,000,000 flows, shuffled; pktdist's
  flow table holds 2^21 flows.
* syn: 1,000,000 SYNs from random clients, every one a new connection.
* syn-affinity: the same SYNs with 1,000,000 affinities installed and the
  control thread applying 100,000 changes per second (on the main core,
  which testpmd leaves idle).
* syn-alternating: both SYN floods in one pktdist process, a worker with
  an empty affinity table and one with syn-affinity's table taking turns
  of 100 ms on the worker core (`dataplane-bench --scenario
  pcap-syn-alternating`). Its figure is the ratio of each loaded turn to
  its neighbouring empty turns, the median per round: the issue's "with
  1M affinities at least 0.85 of the SYN flood's rate", measured without
  the seconds between two runs in which this VM's pace moves. (Its rates
  are not the separate runs': each turn starts with the other's tables in
  the caches. The worker whose turn it is holds the queues and hands them
  over at the end of its turn.)

Writes perf/out/testpmd-<UTC time>.json (and a testpmd-latest.json link),
which perf/results.py reads for RESULTS.md. Needs root, two cores,
dpdk-testpmd (Debian: dpdk-dev) and about 3 GB of memory per run (the
replayed file lives in mbufs).
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "out")
BENCH = os.path.join(ROOT, "target", "release", "examples", "dataplane-bench")

# Mbufs beyond the file's frames (the queues' working set) and the memory
# sizing: the same as dataplane-bench's pcap scenarios (perf/pcap_run.rs).
# testpmd's pool of a million 2176-byte mbufs does not fit in -m 3584 on
# --no-huge memory; 4 KB per mbuf does.
WORKING_MBUFS = 32_768
BYTES_PER_MBUF = 4_000

FILES = {"established": "established", "syn": "syn", "syn-affinity": "syn", "syn-alternating": "syn"}
TARGETS = {"established": 0.45, "syn": 0.40}
# Issue 19's target for the SYN flood with affinities: this share of the
# SYN flood's rate in the same rounds.
TARGET_TO_SYN = 0.85


def eal_memory_mib(frames):
    return max(512, ((frames + WORKING_MBUFS) * BYTES_PER_MBUF >> 20) + 512)


def frames_in(path):
    return (os.path.getsize(path) - 24) // (16 + 60)


def ensure_pcap(bench, kind, flows):
    os.makedirs(os.path.join(OUT, "pcap"), exist_ok=True)
    path = os.path.join(OUT, "pcap", f"{kind}-{flows}.pcap")
    if not os.path.exists(path):
        print(f"vs_testpmd: writing {path}", file=sys.stderr)
        subprocess.run(
            [bench, "--write-pcap", kind, "--pcap", path, "--flows", str(flows)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return path


def eal_memory_args(hugepages):
    """The EAL's memory options, as dataplane-bench gives them: hugepages
    (nothing shared, no files left behind) or --no-huge memory."""
    return ["--in-memory"] if hugepages else ["--no-huge", "--no-shconf"]


def hugepages_free_mib():
    """Free hugepage memory of the default size, from /proc/meminfo."""
    info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    pages = int(info["HugePages_Free"].split()[0])
    size_kb = int(info["Hugepagesize"].split()[0])
    return pages * size_kb // 1024


def testpmd_command(pcap, cores, hugepages):
    frames = frames_in(pcap)
    return [
        "dpdk-testpmd",
        "-l",
        f"{cores[0]},{cores[1]}",
        *eal_memory_args(hugepages),
        "-m",
        str(eal_memory_mib(frames)),
        "--no-pci",
        "--no-telemetry",
        f"--vdev=net_pcap0,rx_pcap={pcap},infinite_rx=1",
        "--vdev=net_null0,no-rx=1",
        "--",
        "--forward-mode=io",
        "--auto-start",
        "--no-flush-rx",
        "--no-mlockall",
        f"--total-num-mbufs={frames + WORKING_MBUFS}",
        "--nb-cores=1",
        "--rxd=1024",
        "--txd=1024",
        "--burst=32",
        "--stats-period=1",
    ]


def run_testpmd(pcap, cores, warm_periods, periods, hugepages):
    """Forwarding rate of testpmd: the mean of port 0's Rx-pps over
    `periods` one-second stats periods, after `warm_periods`."""
    cmd = testpmd_command(pcap, cores, hugepages)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    port, rates, deadline = None, [], time.time() + 300
    try:
        for raw in p.stdout:
            line = raw.decode(errors="replace")
            m = re.search(r"NIC statistics for port (\d+)", line)
            if m:
                port = int(m.group(1))
                continue
            m = re.search(r"Rx-pps:\s+(\d+)", line)
            if m and port == 0:
                rates.append(int(m.group(1)))
                if len(rates) >= warm_periods + periods:
                    break
            if time.time() > deadline:
                break
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    measured = rates[warm_periods:warm_periods + periods]
    if len(measured) < periods:
        raise RuntimeError(f"testpmd gave {len(rates)} stats periods: {' '.join(cmd)}")
    return {
        "mpps": statistics.mean(measured) / 1e6,
        "periods_mpps": [r / 1e6 for r in measured],
        "command": " ".join(cmd),
    }


def run_pktdist(bench, scenario, pcap, seconds, extra):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    mem = eal_memory_mib(frames_in(pcap))
    cmd = [bench, "--scenario", f"pcap-{scenario}", "--pcap", pcap, "--seconds", str(seconds), "--mem", str(mem)]
    cmd += ["--json", path] + extra
    try:
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            sys.exit(f"vs_testpmd: {' '.join(cmd)} exited with {done.returncode}:\n{tail}")
        with open(path) as fh:
            d = json.load(fh)
    finally:
        os.unlink(path)
    s = d["scenarios"][0]
    return {
        "mpps": s["mpps_per_core"],
        "capacity_mpps": s["capacity_mpps"],
        "latency_ns": s["latency_ns"],
        "window_mpps": {k: v for k, v in s["window_mpps"].items() if k != "values"},
        "busy_share": s["worker"]["busy_share"],
        "on_cpu_share": s["worker"]["on_cpu_share"],
        "counters": s["worker"]["counters"],
        "extra": s["extra"],
        "setup": d.get("pcap_setup"),
        "command": " ".join(cmd),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="established,syn,syn-affinity")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=3, help="measured seconds per run")
    ap.add_argument("--flows", type=int, default=1_000_000, help="frames (flows) per capture file")
    ap.add_argument("--bench", default=BENCH)
    ap.add_argument("--reference", help="another dataplane-bench binary to run in every round")
    ap.add_argument("--json", help="output file (default perf/out/testpmd-<time>.json)")
    ap.add_argument(
        "--hugepages",
        action="store_true",
        help="every run's DPDK memory on hugepages, as on a real NIC server (reserve them first: "
        "scripts/hugepages.sh --pages N)",
    )
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    extra = argv[cut + 1:] + (["--hugepages"] if args.hugepages else [])
    scenarios = [s for s in args.scenario.split(",") if s]
    for s in scenarios:
        if s not in FILES:
            sys.exit(f"vs_testpmd: unknown scenario {s!r} (one of {', '.join(FILES)})")
    if not os.path.exists(args.bench):
        sys.exit(f"vs_testpmd: {args.bench} missing: cargo build --release --example dataplane-bench")
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        sys.exit("vs_testpmd: needs two cores")
    pcaps = {s: ensure_pcap(args.bench, FILES[s], args.flows) for s in scenarios}
    if args.hugepages:
        # One run at a time holds the file's mbufs and the queues' working set.
        need = max(eal_memory_mib(frames_in(p)) for p in pcaps.values())
        free = hugepages_free_mib()
        if free < need:
            sys.exit(
                f"vs_testpmd: --hugepages needs {need} MiB of free hugepages, {free} MiB are free "
                f"(scripts/hugepages.sh --pages {-(-need // 2) + 64})"
            )
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load = open("/proc/loadavg").read().split()[:3]
    results = {s: [] for s in scenarios}
    for r in range(args.rounds):
        # The scenarios in turn forwards and backwards: syn-affinity, judged
        # against syn, runs after it in one round and before it in the next.
        for s in scenarios if r % 2 == 0 else scenarios[::-1]:
            # Each binary takes each place in the order in turn (with
            # --reference, over every three rounds): the run later in a
            # round tends to be faster on this VM.
            order = ["testpmd", "pktdist"] + (["reference"] if args.reference else [])
            k = (r + scenarios.index(s)) % len(order)
            order = order[k:] + order[:k]
            got = {}
            for who in order:
                if who == "testpmd":
                    got[who] = run_testpmd(pcaps[s], cores, 2, args.seconds, args.hugepages)
                else:
                    bench = args.bench if who == "pktdist" else args.reference
                    got[who] = run_pktdist(bench, s, pcaps[s], args.seconds, extra)
            got["ratio"] = got["pktdist"]["mpps"] / got["testpmd"]["mpps"]
            got["capacity_ratio"] = got["pktdist"]["capacity_mpps"] / got["testpmd"]["mpps"]
            line = (
                f"round {r + 1} {s:<15} testpmd {got['testpmd']['mpps']:6.2f}  pktdist {got['pktdist']['mpps']:6.2f} "
                f"(cap {got['pktdist']['capacity_mpps']:5.2f}, p99 {got['pktdist']['latency_ns']['p99']:.0f} ns, "
                f"on-CPU {got['pktdist']['on_cpu_share'] * 100:.0f}%)  ratio {got['ratio']:.3f}"
            )
            if args.reference:
                got["reference_ratio"] = got["reference"]["mpps"] / got["testpmd"]["mpps"]
                line += f"  reference {got['reference']['mpps']:6.2f} ratio {got['reference_ratio']:.3f}"
            if s == "syn-alternating":
                for who in ["pktdist"] + (["reference"] if args.reference else []):
                    t = got[who]["extra"].get("turn_ratios", {})
                    line += f"  {who} turns {t.get('median', float('nan')):.3f} ({t.get('p10', float('nan')):.3f}-{t.get('p90', float('nan')):.3f})"
            results[s].append(got)
            print(line, flush=True)
    summary = {}
    for s in scenarios:
        rs = results[s]
        med = lambda xs: statistics.median(xs)
        summary[s] = {
            "testpmd_mpps": med([x["testpmd"]["mpps"] for x in rs]),
            "pktdist_mpps": med([x["pktdist"]["mpps"] for x in rs]),
            "pktdist_capacity_mpps": med([x["pktdist"]["capacity_mpps"] for x in rs]),
            "ratio": med([x["ratio"] for x in rs]),
            "ratios": [x["ratio"] for x in rs],
            "p99_ns": med([x["pktdist"]["latency_ns"]["p99"] for x in rs]),
            "p50_ns": med([x["pktdist"]["latency_ns"]["p50"] for x in rs]),
            "unknown_flow_share": med([x["pktdist"]["extra"].get("unknown_flow_share", 0) for x in rs]),
            "new_connection_share": med([x["pktdist"]["extra"].get("new_connection_share", 0) for x in rs]),
        }
        if args.reference:
            ref = [x["reference"] for x in rs]
            summary[s]["reference"] = {
                "mpps": med([x["mpps"] for x in ref]),
                "ratio": med([x["reference_ratio"] for x in rs]),
                "ratios": [x["reference_ratio"] for x in rs],
                "p99_ns": med([x["latency_ns"]["p99"] for x in ref]),
                "unknown_flow_share": med([x["extra"].get("unknown_flow_share", 0) for x in ref]),
                "pktdist_over_reference": med([x["pktdist"]["mpps"] / x["reference"]["mpps"] for x in rs]),
            }
        if s == "syn-affinity" and "syn" in results:
            # Against the SYN flood of the same round, which ran seconds
            # apart: the rate's ratio, and the time the affinities add per
            # SYN (ns per packet is 1000 / Mpps), which does not move with
            # the empty table's own speed as the ratio does.
            def to_syn(who, into):
                pairs = list(zip(results["syn"], rs))
                per_round = [b[who]["mpps"] / a[who]["mpps"] for a, b in pairs]
                into["ratio_to_syn"] = med(per_round)
                into["ratios_to_syn"] = per_round
                into["added_ns_per_syn"] = med([1000 / b[who]["mpps"] - 1000 / a[who]["mpps"] for a, b in pairs])
                into["syn_ns_per_packet"] = med([1000 / a[who]["mpps"] for a, _ in pairs])

            to_syn("pktdist", summary[s])
            if args.reference:
                to_syn("reference", summary[s]["reference"])
            summary[s]["affinity_hit_share"] = med([x["pktdist"]["extra"].get("affinity_hit_share", 0) for x in rs])
            summary[s]["control_changes_per_sec"] = med(
                [x["pktdist"]["extra"].get("control_changes_per_sec", 0) for x in rs]
            )
        if s == "syn-alternating":
            # Loaded turns over their neighbouring empty turns, in one
            # process: the median per round, then over the rounds.
            def turns(who, into):
                per_round = [x[who]["extra"]["turn_ratios"]["median"] for x in rs]
                into["turn_ratio"] = med(per_round)
                into["turn_ratios_per_round"] = per_round
                into["empty_mpps"] = med([x[who]["extra"]["empty_table"]["mpps"] for x in rs])
                into["overall_ratio_to_empty"] = med([x[who]["extra"]["ratio_to_empty"] for x in rs])

            turns("pktdist", summary[s])
            if args.reference:
                turns("reference", summary[s]["reference"])
    print()
    print(f"{'scenario':<15} {'testpmd Mpps':>12} {'pktdist Mpps':>12} {'ratio':>7} {'target':>7} {'p99 ns':>7}  per-round ratios")
    for s in scenarios:
        m = summary[s]
        t = TARGETS.get(s)
        print(
            f"{s:<15} {m['testpmd_mpps']:>12.2f} {m['pktdist_mpps']:>12.2f} {m['ratio']:>7.3f} "
            f"{('>= %.2f' % t) if t else '-':>7} {m['p99_ns']:>7.0f}  {' '.join('%.3f' % x for x in m['ratios'])}"
        )
    for s in scenarios:
        if s != "established" and summary[s]["new_connection_share"] < 0.99:
            print(
                f"warning: {s}: only {summary[s]['new_connection_share'] * 100:.1f}% of SYNs opened a new "
                "connection (a pass over the file was shorter than the SYN timeout: use more --flows)"
            )
    def per_round_text(per_round):
        met = sum(x >= TARGET_TO_SYN for x in per_round)
        return (
            f"per round {' '.join('%.3f' % x for x in per_round)}: "
            f"{met} of {len(per_round)} at or above {TARGET_TO_SYN}"
        )

    def to_syn_line(who, m):
        return (
            f"syn-affinity / syn ({who}, same rounds): {m['ratio_to_syn']:.3f} "
            f"({per_round_text(m['ratios_to_syn'])}); the affinities add {m['added_ns_per_syn']:.1f} ns "
            f"per SYN to the SYN flood's {m['syn_ns_per_packet']:.1f}"
        )

    def turns_line(who, m):
        return (
            f"syn-alternating ({who}): loaded turns / neighbouring empty turns {m['turn_ratio']:.3f} "
            f"({per_round_text(m['turn_ratios_per_round'])}); over all turns "
            f"{m['overall_ratio_to_empty']:.3f}; empty turns {m['empty_mpps']:.2f} Mpps"
        )

    if "syn-affinity" in summary and "ratio_to_syn" in summary["syn-affinity"]:
        print("\n" + to_syn_line("pktdist", summary["syn-affinity"]))
    if "syn-alternating" in summary:
        print("\n" + turns_line("pktdist", summary["syn-alternating"]))
    if args.reference:
        print(f"\nreference {args.reference}:")
        for s in scenarios:
            m = summary[s]["reference"]
            print(
                f"{s:<15} {m['mpps']:>6.2f} Mpps, ratio to testpmd {m['ratio']:.3f}, p99 {m['p99_ns']:.0f} ns, "
                f"unknown flows {m['unknown_flow_share'] * 100:.3f}%; pktdist / reference {m['pktdist_over_reference']:.3f}"
            )
        if "ratio_to_syn" in summary.get("syn-affinity", {}).get("reference", {}):
            print(to_syn_line("reference", summary["syn-affinity"]["reference"]))
        if "turn_ratio" in summary.get("syn-alternating", {}).get("reference", {}):
            print(turns_line("reference", summary["syn-alternating"]["reference"]))
    out = {
        "date": started,
        "load_before": load,
        "command": " ".join(sys.argv),
        "bench": args.bench,
        "reference": args.reference,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "flows": args.flows,
        "hugepages": args.hugepages,
        "cores": cores,
        "summary": summary,
        "runs": results,
    }
    os.makedirs(OUT, exist_ok=True)
    path = args.json or os.path.join(OUT, "testpmd-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + ".json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
        fh.write("\n")
    if not args.json:
        link = os.path.join(OUT, "testpmd-latest.json")
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(os.path.basename(path), link)
    print(f"\nvs_testpmd: wrote {path}")


if __name__ == "__main__":
    main()
