#!/bin/sh
# Instructions per SYN through the worker, with an empty affinity table and
# with a million affinities (the dataplane benchmark's table), counted by
# callgrind: repeatable to the instruction whatever the machine is doing.
#
#   perf/instructions.sh                  # 100,000 SYNs per table
#   PACKETS=20000 perf/instructions.sh
#
# Needs valgrind (Debian: apt-get install valgrind). No root, no EAL.
set -eu
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind not found" >&2; exit 1; }
cargo build --release --example syn-instructions
mkdir -p perf/out
n=${PACKETS:-100000}
result=perf/out/syn-instructions.txt
: >"$result"
for table in empty loaded; do
    out="perf/out/syn-instructions-$table"
    valgrind --tool=callgrind --callgrind-out-file="$out.cg" \
        --toggle-collect='*measured*' \
        ./target/release/examples/syn-instructions --table "$table" --packets "$n" \
        >"$out.txt" 2>&1 || { cat "$out.txt" >&2; exit 1; }
    total=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$out.txt")
    echo "$table $total" |
        awk -v n="$n" '{printf "%-7s %8.1f instructions per SYN\n", $1, $2 / n}' >>"$result"
done
cat "$result"
awk '{v[NR] = $2} END {printf "loaded - empty: %.1f instructions per SYN\n", v[2] - v[1]}' "$result"
