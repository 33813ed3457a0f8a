#!/usr/bin/env bash
# Installs what is missing, builds pktdist in release mode and runs it on the
# demo configuration: DPDK virtual devices, no hugepages, no NIC, and the
# built-in traffic source sending TCP connections from many clients.
#
# Its arguments go on to `pktdist run` (e.g. --duration 60, --quiet); it
# runs for $DEMO_SECONDS (default 12) unless they give --duration.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=(--duration "${DEMO_SECONDS:-12}")
for arg in "$@"; do
    case "$arg" in
        --duration|--duration=*) duration=() ;;
    esac
done

./scripts/install-deps.sh
cargo build --release --bin pktdist
exec ./target/release/pktdist run --config config/demo.toml "${duration[@]}" "$@"
