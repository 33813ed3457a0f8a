#!/usr/bin/env python3
"""Side-by-side comparison of two builds of the benchmark.

This VM's speed drifts by +-30% over minutes (other tenants on the host), so
one run of build A followed by one of build B says little. ab.py alternates
A, B, B, A, A, B, ... (each round in the order opposite to the last: the
later run of a round tends to be the faster) for a number of rounds, each a
short run of the same scenarios, and reports per scenario the median Mpps of each build and the
median of the per-round B/A ratios (each ratio pairs runs a few seconds
apart, so a slow phase of the machine affects both sides).

    cargo build --release --example dataplane-bench
    cp target/release/examples/dataplane-bench /tmp/bench-a
    # ... change the code, build again ...
    cp target/release/examples/dataplane-bench /tmp/bench-b
    sudo perf/ab.py /tmp/bench-a /tmp/bench-b --scenario established,syn-affinity --rounds 6

Arguments after `--` go to the benchmark, so the pcap scenarios of
perf/vs_testpmd.py compare too:

    sudo perf/ab.py /tmp/bench-a /tmp/bench-b --scenario pcap-established --seconds 3 --rounds 8 \
        -- --pcap perf/out/pcap/established-1000000.pcap --mem 4451

Besides each scenario's Mpps over the whole run it reports `<scenario> p90w`,
the 90th percentile of the run's 100 ms windows: the rate in the machine's
fast mode (the host's other tenants switch it between a fast and a slow mode
within seconds; see perf/README.md), and `<scenario> cap`, the benchmark's
cap Mpps (1000 / the mean per-packet time of the bursts up to the 99th
percentile): the worker's rate while it has its core, the figure to compare
when other processes take the cores and Mpps only says how often they did.

For `syn-affinity` it also reports the ratio of `syn-1m-affinities` to `syn`
within each run, and for `syn-alternating` the median turn ratio (the
figure the issue 3 target is judged on; the median of the benchmark's
`--alternating-runs`, 5 by default, each on a new table), per build. One
run per round keeps rounds short; the rounds then play the runs' part:

    sudo perf/ab.py /tmp/bench-a /tmp/bench-b --scenario syn-alternating --seconds 3 --rounds 8 -- --alternating-runs 1
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def run(binary, scenario, seconds, extra):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        cmd = [binary, "--scenario", scenario, "--seconds", str(seconds), "--json", path]
        subprocess.run(cmd + extra, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(path) as f:
            data = json.load(f)
    finally:
        os.unlink(path)
    out = {}
    for s in data.get("scenarios", []):
        turns = s.get("extra", {}).get("turn_ratios", {})
        ratio = turns.get("median_of_runs", turns.get("median"))
        if ratio is not None:
            out["alternating turn ratio"] = ratio
        if "mpps_per_core" in s and s["scenario"] != "baseline":
            out[s["scenario"]] = s["mpps_per_core"]
            w = s.get("window_mpps", {})
            if w.get("p90") is not None:
                out[s["scenario"] + " p90w"] = w["p90"]
            if s.get("capacity_mpps") is not None:
                out[s["scenario"] + " cap"] = s["capacity_mpps"]
            if w.get("values"):
                out.setdefault("_windows", {})[s["scenario"]] = w["values"]
    if "syn" in out and "syn-1m-affinities" in out:
        out["affinity/syn ratio"] = out["syn-1m-affinities"] / out["syn"]
        if "syn p90w" in out and "syn-1m-affinities p90w" in out:
            out["affinity/syn p90w"] = out["syn-1m-affinities p90w"] / out["syn p90w"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="benchmark binary A (the reference)")
    ap.add_argument("b", help="benchmark binary B (the change)")
    ap.add_argument("--scenario", default="established,syn-affinity")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=1.5)
    # Everything after "--" goes to the benchmark as it is (argparse would
    # refuse options there once the positionals are taken).
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    args.extra = argv[cut + 1 :]

    rows = {"A": [], "B": []}
    windows = {"A": {}, "B": {}}
    for r in range(args.rounds):
        order = (("A", args.a), ("B", args.b))
        for name, binary in order if r % 2 == 0 else order[::-1]:
            res = run(binary, args.scenario, args.seconds, args.extra)
            for scen, values in res.pop("_windows", {}).items():
                windows[name].setdefault(scen, []).extend(values)
            rows[name].append(res)
            line = "  ".join(f"{k} {v:.2f}" for k, v in res.items())
            print(f"round {r + 1} {name}: {line}", flush=True)

    keys = [k for k in rows["A"][0] if all(k in x for x in rows["A"] + rows["B"])]
    print()
    print(f"{'metric':<22} {'A median':>9} {'B median':>9} {'B/A per round (median)':>24}")
    for k in keys:
        a = [x[k] for x in rows["A"]]
        b = [x[k] for x in rows["B"]]
        ratios = [y / x for x, y in zip(a, b) if x > 0]
        ratio = f"{statistics.median(ratios):>24.3f}" if ratios else f"{'-':>24}"
        print(f"{k:<22} {statistics.median(a):>9.3f} {statistics.median(b):>9.3f} {ratio}")
    print()
    print("100 ms windows pooled over all rounds (Mpps): p50 / p90 / p99")
    for scen in windows["A"]:
        qs = []
        for name in ("A", "B"):
            v = sorted(windows[name].get(scen, []))
            if v:
                q = lambda p: v[min(len(v) - 1, int(round((len(v) - 1) * p)))]
                qs.append(f"{name} {q(0.5):.2f} / {q(0.9):.2f} / {q(0.99):.2f}")
        print(f"  {scen:<20} " + "   ".join(qs))
    print(f"\nA = {args.a}\nB = {args.b}\n{args.rounds} rounds, {args.seconds} s per scenario")


if __name__ == "__main__":
    sys.exit(main())
