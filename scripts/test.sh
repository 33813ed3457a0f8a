#!/usr/bin/env bash
# Runs every test of pktdist, the real-DPDK ones included, after installing
# what a fresh Debian machine lacks. This is what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== build (release binary, used by the end-to-end tests)"
cargo build --release --bins --examples

echo "== tests"
# Unit tests run without EAL; tests/dpdk_*.rs start EAL with virtual devices
# (--no-huge --no-pci), which needs root.
cargo test --all-targets -- --test-threads=2

echo "== pktgen scripts (against a stand-in for pktgen; docs/pktgen.md)"
perf/pktgen/check.sh
