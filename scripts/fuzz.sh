#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo fuzz, libFuzzer) of what pktdist reads from
# outside: frames on its ports, control datagrams and requests, configuration
# files, state files and etcd records (fuzz/fuzz_targets; README, "Fuzzing").
#
#   scripts/fuzz.sh                    # every target, 60 s each
#   scripts/fuzz.sh frames 600         # one target, 10 minutes
#   scripts/fuzz.sh --check            # every target, a fixed number of runs
#                                      # from a fixed seed (what CI runs)
#
# A target that finds a panic or a broken assertion stops, writes the input
# to fuzz/artifacts/<target>/, prints `cargo fuzz run <target> <file>` to
# replay it, and this script exits non-zero. What each target learns stays
# in fuzz/corpus/<target>/ (not committed) for the next run. Runs on stable
# Rust without a sanitizer (`-s none`): what there is to find are panics,
# overflows (debug assertions are on) and the targets' own assertions. The
# targets build without the DPDK feature; the only `unsafe` they reach is
# the DPDK layer's mapping of the tables' memory (src/dpdk/pages.rs) and its
# prefetch hints.
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(frames control datagram stored config)
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install --locked --quiet cargo-fuzz
fi

# The configuration target starts from the project's own files.
seeds() {
    case $1 in
    config) echo config packaging ;;
    esac
}

# run TARGET CORPUS [libFuzzer options]
run() {
    local target=$1 corpus=$2
    shift 2
    mkdir -p "$corpus"
    # shellcheck disable=SC2046
    cargo fuzz run -s none "$target" "$corpus" $(seeds "$target") -- \
        -max_len=4096 -print_final_stats=1 "$@"
}

# Runs per target in --check: about 10 s each on a 2-core VM.
check_runs() {
    case $1 in
    frames | control) echo 20000 ;;
    config) echo 100000 ;;
    stored) echo 500000 ;;
    *) echo 2000000 ;;
    esac
}

case ${1:-} in
--check)
    (cd fuzz && cargo fmt --check)
    cargo fuzz build -s none
    # The run's temporary corpus and log go however the script ends.
    corpus=""
    log=""
    trap 'rm -rf "$corpus" "$log"' EXIT
    for t in "${targets[@]}"; do
        echo "== fuzz $t"
        # A fresh corpus, so that the run is the same on every machine: the
        # seed files and what a fixed number of runs from seed 1 find.
        corpus=$(mktemp -d)
        log=$(mktemp)
        if ! run "$t" "$corpus" -runs="$(check_runs "$t")" -seed=1 >"$log" 2>&1; then
            tail -n 80 "$log"
            exit 1
        fi
        grep -E '^(Done|stat::new_units_added)' "$log" || tail -n 5 "$log"
        rm -rf "$corpus" "$log"
        corpus=""
        log=""
    done
    ;;
"")
    for t in "${targets[@]}"; do
        echo "== fuzz $t"
        run "$t" "fuzz/corpus/$t" -max_total_time=60
    done
    ;;
*)
    run "$1" "fuzz/corpus/$1" -max_total_time="${2:-60}"
    ;;
esac
