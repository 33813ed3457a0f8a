#!/usr/bin/env python3
"""Plots one dataplane-bench JSON (perf/out/latest.json by default) as PNGs.

    python3 perf/plot.py [FILE.json] [--out perf/img]

Writes, for the sections the JSON has:
  throughput.png        Mpps per worker core per scenario, baseline bar and
                        the targets (established 10, syn 5, syn with 1M
                        affinities >= 80% of syn, also in alternating turns)
  latency.png           per-packet latency p50/p90/p99/p99.9, log scale
  affinity_control.png  affinity lookup ns (empty / 1M / 1M with churn) and
                        the control-plane rate against its 100k/s target

Needs matplotlib (python3 -m pip install matplotlib); installs nothing.
"""

import argparse
import json
import os
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))

# Targets from issues 2 and 3 (perf/README.md, "Targets").
TARGET_MPPS = {"established": 10.0, "syn": 5.0}
TARGET_SYN_AFFINITY_RATIO = 0.80
TARGET_CONTROL_RPS = 100_000.0

PERCENTILES = [("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p99_9", "p99.9")]
BLUE, ORANGE, GREY, RED, GREEN = "#4C72B0", "#DD8452", "#9A9A9A", "#C44E52", "#55A868"
PCT_COLOURS = ["#9ecae1", "#4292c6", "#2171b5", "#08306b"]


def die(msg):
    print(f"plot.py: {msg}", file=sys.stderr)
    sys.exit(1)


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        die(f"cannot read {path}: {e.strerror} (run perf/run.sh first)")
    except json.JSONDecodeError as e:
        die(f"{path} is not valid JSON: {e}")


def footnote(fig, data):
    """Machine, date and command under the plot: a figure means nothing
    without them."""
    m = data.get("machine", {})
    ghz = m.get("tsc_hz", 0) / 1e9
    line1 = (
        f"{data.get('date', '?')} - {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
        f"TSC {ghz:.2f} GHz, kernel {m.get('kernel', '?')}; "
        f"{data.get('seconds_per_scenario', '?')} s per scenario; virtual devices, no hugepages"
    )
    cmd = "command: " + data.get("command", "?")
    text = line1 + "\n" + "\n".join(textwrap.wrap(cmd, 150))
    fig.text(0.01, 0.01, text, fontsize=7, color="#555555", va="bottom", ha="left")


def throughput(plt, data, path):
    rows = data.get("scenarios") or []
    if not rows:
        return False
    names = [r["scenario"] for r in rows]
    by_name = {r["scenario"]: r for r in rows}
    # Target per scenario: (value, tick-label text).
    targets = {n: (t, f"target \u2265 {t:g}") for n, t in TARGET_MPPS.items() if n in by_name}
    if "syn-1m-affinities" in by_name and "syn" in by_name:
        t = TARGET_SYN_AFFINITY_RATIO * by_name["syn"]["mpps_per_core"]
        targets["syn-1m-affinities"] = (t, f"target \u2265 80% of syn = {t:.2f}")
    if "syn-alt-1m-affinities" in by_name and "syn-alt-empty" in by_name:
        t = TARGET_SYN_AFFINITY_RATIO * by_name["syn-alt-empty"]["mpps_per_core"]
        targets["syn-alt-1m-affinities"] = (t, f"target \u2265 80% of syn-alt-empty = {t:.2f}")
    # The baseline is feeder-limited and far above the rest: clip it so the
    # scenarios and their targets stay readable.
    others = [r["mpps_per_core"] for r in rows if r["scenario"] != "baseline"]
    others += [r["capacity_mpps"] for r in rows if r["scenario"] != "baseline"]
    others += [t for t, _ in targets.values()]
    top = max(others) * 1.45 if others else max(r["mpps_per_core"] for r in rows) * 1.2
    contended = [r["scenario"] for r in rows if r.get("bottleneck") == "cpu-contention"]
    if contended:
        top *= 1.15  # room for the warning box

    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    xs = list(range(len(rows)))
    for i, r in enumerate(rows):
        v = r["mpps_per_core"]
        base = r["scenario"] == "baseline"
        clipped = v > top
        h = min(v, top)
        ax.bar([i], [h], color=GREY if base else BLUE, width=0.6, zorder=2)
        label = f"{v:.2f} Mpps"
        ratio = r.get("ratio_to_baseline")
        if ratio is not None and not base:
            label += f"\n{ratio:.2f}x base"
        syn_ratio = r.get("extra", {}).get("ratio_to_syn")
        if syn_ratio is not None:
            label += f"\n{syn_ratio:.2f}x syn"
        turn_ratio = (r.get("extra", {}).get("turn_ratios") or {}).get("median")
        if turn_ratio is not None:
            label += f"\n{turn_ratio:.2f}x empty\n(turn median)"
        if clipped:
            label += "\n(bar clipped)"
        bottleneck = r.get("bottleneck")
        if bottleneck == "feeder":
            label += "\nfeeder-limited"
        elif bottleneck == "cpu-contention":
            label += "\nCPU contention"
        if clipped:
            # Break marks across the top of the clipped bar.
            for dy in (0.0, 0.025 * top):
                ax.plot([i - 0.33, i + 0.33], [top * 0.95 - dy, top * 0.97 - dy], color="white", linewidth=3, zorder=3)
        lines = label.count("\n") + 1
        if h >= top * (0.06 * lines + 0.1):
            ax.text(i, h - top * (0.08 if clipped else 0.015), label, ha="center", va="top", fontsize=8, color="white", fontweight="bold", zorder=4)
        else:
            # Above the bar, and above its target line if that is higher.
            y = max(h, targets.get(r["scenario"], (0, ""))[0])
            ax.annotate(label, (i, y), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8)
        cap = r.get("capacity_mpps")
        if cap is not None and cap <= top:
            ax.plot([i + 0.36], [cap], marker="<", color="black", markersize=6, zorder=4)
    for n, (t, _) in targets.items():
        i = names.index(n)
        ax.hlines(t, i - 0.42, i + 0.42, colors=RED, linestyles="--", linewidth=1.8, zorder=3)
    if contended:
        ax.text(
            0.01,
            0.98,
            "Other processes took the cores during " + ", ".join(contended) + ":\n"
            "their Mpps/core understates the worker; compare cap Mpps (\u25c0).",
            transform=ax.transAxes,
            ha="left",
            va="top",
            fontsize=8,
            color=RED,
            bbox={"facecolor": "white", "edgecolor": RED, "alpha": 0.9},
            zorder=5,
        )
    ax.set_ylim(0, top)
    ax.set_xticks(xs)
    ax.set_xticklabels([n + ("\n" + targets[n][1] if n in targets else "") for n in names])
    ax.set_ylabel("Mpps per worker core (64-byte packets)")
    ax.grid(axis="y", alpha=0.3, zorder=0)
    ax.set_title("Throughput per worker core: bare-forwarding baseline, pktdist scenarios, targets")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(color=GREY, label="baseline: rx -> tx of the same mbufs, no work"),
            Patch(color=BLUE, label="pktdist worker, Mpps/core measured"),
            Line2D([], [], marker="<", color="black", linestyle="", label="cap Mpps: 1 / trimmed mean ns per packet"),
            Line2D([], [], color=RED, linestyle="--", label="target for that scenario"),
        ],
        fontsize=8,
        loc="upper right",
    )
    fig.subplots_adjust(bottom=0.22, top=0.92, left=0.08, right=0.98)
    footnote(fig, data)
    fig.savefig(path)
    plt.close(fig)
    return True


def latency(plt, data, path):
    rows = data.get("scenarios") or []
    if not rows:
        return False
    names = [r["scenario"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    width = 0.2
    for k, (key, label) in enumerate(PERCENTILES):
        vals = [max(r["latency_ns"][key], 0.1) for r in rows]
        xs = [i + (k - 1.5) * width for i in range(len(rows))]
        bars = ax.bar(xs, vals, width=width, color=PCT_COLOURS[k], label=label, zorder=2)
        for b, v in zip(bars, vals):
            ax.annotate(
                f"{v:.0f}" if v >= 10 else f"{v:.1f}",
                (b.get_x() + b.get_width() / 2, v),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_yscale("log")
    hi = max(r["latency_ns"]["p99_9"] for r in rows)
    ax.set_ylim(1, hi * 4)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names)
    ax.set_xlabel("scenario")
    ax.set_ylabel("ns per packet (burst time / burst size), log scale")
    ax.grid(axis="y", which="both", alpha=0.25, zorder=0)
    ax.legend(title="percentile", fontsize=8, title_fontsize=8, loc="upper left", ncol=4)
    ax.set_title("Per-packet processing time percentiles (HDR histogram of every burst)")
    fig.subplots_adjust(bottom=0.2, top=0.92, left=0.09, right=0.98)
    footnote(fig, data)
    fig.savefig(path)
    plt.close(fig)
    return True


def affinity_control(plt, data, path):
    lookup = data.get("lookup")
    control = data.get("control")
    if not lookup and not control:
        return False
    panels = [p for p in (lookup, control) if p]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(9, 5), dpi=100, gridspec_kw={"width_ratios": [3, 2][: len(panels)]}
    )
    if len(panels) == 1:
        axes = [axes]
    ax_iter = iter(axes)
    if lookup:
        ax = next(ax_iter)
        n = lookup.get("affinities", 0)
        nk = f"{n / 1e6:.0f}M" if n >= 500_000 else f"{n:,}"
        churn = lookup.get("loaded_with_writer", {}).get("control_changes_per_sec", 0)
        labels = ["empty table", f"{nk} entries", f"{nk} entries,\n{churn / 1e3:.0f}k changes/s"]
        parts = [lookup.get("empty"), lookup.get("loaded"), lookup.get("loaded_with_writer")]
        pairs = [(lab, p["ns_per_lookup"]) for lab, p in zip(labels, parts) if p]
        bars = ax.bar(range(len(pairs)), [v for _, v in pairs], color=[GREY, BLUE, ORANGE][: len(pairs)], width=0.6, zorder=2)
        for b, (_, v) in zip(bars, pairs):
            ax.annotate(
                f"{v:.1f} ns",
                (b.get_x() + b.get_width() / 2, v),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(range(len(pairs)))
        ax.set_xticklabels([lab for lab, _ in pairs], fontsize=8.5)
        ax.set_ylim(0, max(v for _, v in pairs) * 1.2)
        ax.set_ylabel("ns per lookup (one core)")
        ax.set_title("Affinity lookup", fontsize=11)
        ax.grid(axis="y", alpha=0.3, zorder=0)
    if control:
        ax = next(ax_iter)
        rate = control["requests_per_sec"] / 1e3
        target = TARGET_CONTROL_RPS / 1e3
        colour = GREEN if rate >= target else RED
        b = ax.bar([0], [rate], color=colour, width=0.5, zorder=2)[0]
        ax.annotate(
            f"{rate:.0f}k/s",
            (b.get_x() + b.get_width() / 2, rate),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )
        ax.axhline(target, color=RED, linestyle="--", linewidth=1.6, zorder=3)
        ax.annotate(
            f"target {target:.0f}k/s",
            (0.98, target),
            xycoords=("axes fraction", "data"),
            xytext=(0, 2),
            textcoords="offset points",
            ha="right",
            va="bottom",
            fontsize=7.5,
            color=RED,
        )
        ax.set_xlim(-0.75, 0.75)
        ax.set_xticks([0])
        ax.set_xticklabels([f"signed requests,\n{control.get('window', '?')} in flight"], fontsize=8.5)
        ax.set_ylim(0, max(rate, target) * 1.25)
        ax.set_ylabel("thousand requests answered per second")
        ax.set_title("Control plane (UDP, one core)", fontsize=11)
        ax.grid(axis="y", alpha=0.3, zorder=0)
    fig.suptitle("Affinity table lookups and control-plane request rate")
    fig.subplots_adjust(bottom=0.22, top=0.86, left=0.08, right=0.98, wspace=0.35)
    footnote(fig, data)
    fig.savefig(path)
    plt.close(fig)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="?", default=os.path.join(HERE, "out", "latest.json"))
    ap.add_argument("--out", default=os.path.join(HERE, "img"), help="directory for the PNGs")
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        die("matplotlib is missing: install it with `python3 -m pip install matplotlib` " "(or `apt-get install python3-matplotlib`)")
    data = load(args.json)
    os.makedirs(args.out, exist_ok=True)
    plt.rcParams.update({"font.size": 9, "axes.titlesize": 11, "savefig.dpi": 100})
    wrote = []
    for name, fn in (
        ("throughput.png", throughput),
        ("latency.png", latency),
        ("affinity_control.png", affinity_control),
    ):
        path = os.path.join(args.out, name)
        if fn(plt, data, path):
            wrote.append(path)
        else:
            print(f"plot.py: {args.json} has no data for {name}, skipped", file=sys.stderr)
    if not wrote:
        die(f"{args.json} has no scenarios, lookup or control section")
    for p in wrote:
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
