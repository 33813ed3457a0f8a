#!/usr/bin/env bash
# Installs what is missing, builds pktdist in release mode and runs it on the
# demo configuration: DPDK virtual devices, no hugepages, no NIC, and the
# built-in traffic source sending TCP connections from many clients.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cargo build --release --bin pktdist
exec ./target/release/pktdist run --config config/demo.toml --duration "${DEMO_SECONDS:-12}" "$@"
