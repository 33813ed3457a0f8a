#!/bin/sh
# Builds the benchmark in release mode and runs every scenario, saving the
# results as JSON (and the printed table as text) under perf/out/.
#
#   perf/run.sh                      # all scenarios, 3 s each
#   perf/run.sh --seconds 5          # extra arguments go to the benchmark
#   perf/run.sh --scenario syn,syn-affinity
#
# Needs root (DPDK EAL, even with --no-huge) and two CPU cores.
set -eu
cd "$(dirname "$0")/.."
cargo build --release --example dataplane-bench
mkdir -p perf/out
stamp=$(date -u +%Y%m%dT%H%M%SZ)
json="perf/out/bench-$stamp.json"
case " $* " in
*" --scenario"*) ;;
*) set -- --scenario all "$@" ;;
esac
./target/release/examples/dataplane-bench --json "$json" "$@" \
    | tee "perf/out/bench-$stamp.txt"
ln -sf "bench-$stamp.json" perf/out/latest.json
echo "results: $json"
