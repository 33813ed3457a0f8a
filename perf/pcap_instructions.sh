#!/bin/sh
# Instructions per packet of the DPDK build's worker, counted by callgrind
# in dataplane-bench's pcap scenarios: the worker of perf/vs_testpmd.py,
# on its devices (net_pcap in, net_null out), as it is compiled there.
# perf/instructions.sh counts the worker over in-memory queues, another
# instance of the same generic code, which the compiler inlines
# differently: a function it calls out of line in one build and inlines
# in the other shows only here.
#
#   perf/pcap_instructions.sh
#   BENCH=/tmp/bench-before perf/pcap_instructions.sh    # another build
#
# Per scenario: "total" is the worker thread's whole loop; "rx" the pcap
# device's receive (it copies each frame into a new mbuf), "tx" the null
# device's transmit (it frees them), both testpmd's too; "worker" is the
# rest, pktdist's own, without the latency histogram's publication (time-
# driven, so inflated by valgrind's slowness). Small captures and a small
# flow table keep the time-driven expiry sweep small. The established
# count repeats to within about 1 instruction, the SYN count to within
# about 5 (the share of SYNs whose flow the sweep emptied before them
# varies) on an otherwise idle machine: beside other work valgrind runs
# slower, the clock-driven sweep empties more flows first and the SYN
# count moves by 30 (perf/README.md). Compare builds by a difference
# larger than that. Needs root, valgrind, two cores.
set -eu
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind not found" >&2; exit 1; }
if [ -z "${BENCH:-}" ]; then
    cargo build --release --example dataplane-bench
    BENCH=target/release/examples/dataplane-bench
fi
mkdir -p perf/out/pcap
result=perf/out/pcap-instructions.txt
: >"$result"
# scenario:frames:flow-capacity[:syn_flood_rate]. The SYN file is long
# enough that each of its SYNs finds its flow past the 20 ms SYN timeout
# (under valgrind a pass takes about 200 ms), as in perf/vs_testpmd.py: a
# new connection each. The SYN flood runs with the SYN flood guard's
# default (engaged: untracked SYNs) and, as syn-tracked, with it off.
# RUNS picks some: RUNS=established:1000:16384 perf/pcap_instructions.sh
for run in ${RUNS:-established:1000:16384 syn:100000:262144 syn:100000:262144:0}; do
    sc=${run%%:*}
    rest=${run#*:}
    frames=${rest%%:*}
    capacity=${rest#*:}
    name=$sc
    rate=
    case $capacity in *:*)
        rate="--syn-flood-rate ${capacity#*:}"
        capacity=${capacity%%:*}
        name=$sc-tracked ;;
    esac
    pcap=perf/out/pcap/$sc-$frames.pcap
    [ -f "$pcap" ] || "$BENCH" --write-pcap "$sc" --pcap "$pcap" --flows "$frames" >/dev/null
    out=perf/out/pcap-instructions-$name
    valgrind --tool=callgrind --callgrind-out-file="$out.cg" \
        --toggle-collect='*measure_loop*' \
        "$BENCH" --scenario "pcap-$sc" --pcap "$pcap" --seconds 2 --warmup 0.3 \
        --mem 1000 --flow-capacity "$capacity" $rate --json "$out.json" \
        >"$out.txt" 2>&1 || { cat "$out.txt" >&2; exit 1; }
    total=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$out.txt")
    packets=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["scenarios"][0]["extra"]["rx_packets_all"])' "$out.json")
    callgrind_annotate --inclusive=yes "$out.cg" 2>/dev/null | awk -v total="$total" \
        -v n="$packets" -v name="$name" '
        /-- Auto-annotated source/ { exit }
        function most(k, v) { gsub(",", "", v); if (v + 0 > m[k]) m[k] = v + 0 }
        /PortQueues as pktdist::datapath::pktio::PacketIo>::rx_burst/ { most("rx", $1) }
        /pktdist_tx_burst/ { most("tx", $1) }
        /SharedHistogram::try_fold/ { most("fold", $1) }
        END { printf "%-12s total %7.1f  rx %6.1f  tx %6.1f  worker %7.1f instructions per packet\n",
              name, total / n, m["rx"] / n, m["tx"] / n, (total - m["rx"] - m["tx"] - m["fold"]) / n }' >>"$result"
done
cat "$result"
