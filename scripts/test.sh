#!/usr/bin/env bash
# Runs every test of pktdist, the real-DPDK ones included, after installing
# what a fresh Debian machine lacks. This is what CI runs (.ci/run).
# Runs as root: the test beds make network namespaces, and the DPDK tests
# start EAL.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    # Plain sudo would not do: its secure_path drops ~/.cargo/bin. -E keeps
    # HOME (rustup's toolchains); env sets the caller's PATH back.
    echo "test.sh: run it as root (network namespaces, DPDK): sudo -E env \"PATH=\$PATH\" ./scripts/test.sh" >&2
    exit 1
fi

./scripts/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== build (release binary, used by the end-to-end tests)"
cargo build --release --bins --examples

echo "== tests"
# Unit tests run without EAL; tests/dpdk_*.rs start EAL with virtual devices
# (--no-huge --no-pci), which needs root. The network-namespace test beds
# skip where they cannot run, but not here: a skip fails.
PKTDIST_REQUIRE_TESTBED=1 cargo test --all-targets -- --test-threads=2

echo "== Python client (clients/python)"
# Unit tests, pip install, and end to end against the release binary built
# above (root, DPDK virtual devices); a skipped end-to-end test fails here.
PKTDIST_PY_REQUIRE_E2E=1 python3 clients/python/tests/run.py
# The unit tests again on the oldest Python the package supports, 3.9, where
# the machine has it (the CI image's pyenv does).
py39=""
for p in python3.9 "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.9*/bin/python3; do
    if "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 9))' >/dev/null 2>&1; then
        py39=$p
        break
    fi
done
if [ -n "$py39" ]; then
    "$py39" clients/python/tests/run.py --unit --quiet
else
    echo "python3.9 not found: the unit tests ran on $(python3 --version) only"
fi

echo "== Debian package (scripts/test-package.sh)"
scripts/test-package.sh

echo "== pktgen scripts (against a stand-in for pktgen; docs/pktgen.md)"
perf/pktgen/check.sh

echo "== fuzz targets (scripts/fuzz.sh --check; README, Fuzzing)"
scripts/fuzz.sh --check
