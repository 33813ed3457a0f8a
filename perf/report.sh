#!/bin/sh
# Regenerates the benchmark report with one command: runs every scenario
# (perf/run.sh), draws the plots into perf/img/ (perf/plot.py) and rewrites
# the tables of perf/RESULTS.md between its results markers
# (perf/results.py).
#
#   perf/report.sh                   # all scenarios, 3 s each
#   perf/report.sh 5                 # 5 s each
#   perf/report.sh 5 --flows 500000  # further arguments go to the benchmark
#   perf/report.sh --from perf/out/bench-X.json   # no run: report that file
#
# Needs root (DPDK EAL), two CPU cores, and matplotlib
# (python3 -m pip install matplotlib). Run it on a quiet machine: the
# figures are only as good as the cores were idle.
set -eu
cd "$(dirname "$0")/.."

python3 -c 'import matplotlib' 2>/dev/null || {
    echo "report.sh: matplotlib is missing: python3 -m pip install matplotlib" >&2
    exit 1
}

if [ "${1:-}" = "--from" ]; then
    [ $# -ge 2 ] || { echo "report.sh: --from needs a JSON file" >&2; exit 2; }
    json=$2
else
    seconds=3
    case "${1:-}" in
    '' | -*) ;;
    *) seconds=$1; shift ;;
    esac
    if pgrep -x dataplane-bench >/dev/null 2>&1; then
        echo "report.sh: another dataplane-bench is running; wait for it (two at once spoil both)" >&2
        exit 1
    fi
    echo "report.sh: load before the run: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    perf/run.sh --seconds "$seconds" "$@"
    json=perf/out/latest.json
fi

python3 perf/plot.py "$json" --out perf/img
python3 perf/results.py "$json" --results perf/RESULTS.md
echo "report: perf/RESULTS.md, perf/img/*.png (from $json)"
