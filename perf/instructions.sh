#!/bin/sh
# Instructions per SYN through the worker, with an empty affinity table and
# with a million affinities (the dataplane benchmark's table), both with the
# SYN flood guard engaged as a flood engages it (untracked SYNs), per SYN
# tracked (the guard off) in a full flow table, per SYN that
# finds its flow expired (the path of perf/vs_testpmd.py's SYN flood), and
# per packet of an established flow, counted by callgrind: repeatable to
# the instruction whatever the machine is doing.
#
#   perf/instructions.sh                  # 100,000 packets per run
#   PACKETS=20000 perf/instructions.sh
#
# "total" is everything the measured loop executes (the in-memory queues
# included); "worker" is the worker's poll alone, without the in-memory
# queues' receive and transmit calls (where DPDK's rx_burst and tx_burst
# would be). Needs valgrind (Debian: apt-get install valgrind). No root,
# no EAL.
set -eu
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind not found" >&2; exit 1; }
cargo build --release --example syn-instructions
mkdir -p perf/out
n=${PACKETS:-100000}
result=perf/out/syn-instructions.txt
: >"$result"
# kind:table[:syn_flood_rate]; the SYN flood runs with the guard's default
# (engaged: untracked SYNs) and, as syn-tracked, with it off.
for run in syn:empty syn:loaded syn:empty:0 syn-again:empty established:empty; do
    kind=${run%%:*}
    rest=${run#*:}
    table=${rest%%:*}
    name=$kind-$table
    rate=
    if [ "$rest" != "$table" ]; then
        rate="--syn-flood-rate ${rest#*:}"
        name=$kind-tracked-$table
    fi
    out="perf/out/syn-instructions-$name"
    valgrind --tool=callgrind --callgrind-out-file="$out.cg" \
        --toggle-collect='*measured*' \
        ./target/release/examples/syn-instructions --kind "$kind" --table "$table" \
        --packets "$n" $rate >"$out.txt" 2>&1 || { cat "$out.txt" >&2; exit 1; }
    total=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$out.txt")
    # Packets counted (the established run's flows are distinct clients).
    packets=$(sed -n 's/^\(syns\|acks\) \([0-9]*\)$/\2/p' "$out.txt")
    # Inclusive counts: the worker's poll, and the queue calls inside it.
    callgrind_annotate --inclusive=yes "$out.cg" 2>/dev/null | awk -v total="$total" \
        -v n="$packets" -v name="$name" '
        /-- Auto-annotated source/ { exit }
        # A function inlined from several files has a line per file; its
        # inclusive count is the largest.
        function most(k, v) { gsub(",", "", v); if (v + 0 > m[k]) m[k] = v + 0 }
        /syn_instructions::poll/ { most("poll", $1) }
        /MemIo as pktdist::datapath::pktio::PacketIo>::rx_burst/ { most("rx", $1) }
        /MemIo as pktdist::datapath::pktio::PacketIo>::tx_burst/ { most("tx", $1) }
        END { printf "%-17s total %7.1f  worker %7.1f instructions per packet\n",
              name, total / n, (m["poll"] - m["rx"] - m["tx"]) / n }' >>"$result"
done
cat "$result"
awk '{v[NR] = $3; w[NR] = $5}
    END {printf "syn, loaded - empty: total %.1f, worker %.1f instructions per SYN\n",
         v[2] - v[1], w[2] - w[1]}' "$result"
