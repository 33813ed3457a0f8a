#!/usr/bin/env bash
# Installs what pktdist needs on a Debian machine and is not there yet:
# DPDK 22.11 (libraries, drivers, dpdk-devbind.py, dpdk-testpmd), pkg-config,
# libclang (bindgen), tshark (independent dissector for tests), iproute2,
# ethtool and procps (sysctl, kill: the test bed), curl, python3 and
# python3-pip (the Python client's install test), g++ (libfuzzer-sys compiles
# libFuzzer's C++ for scripts/fuzz.sh), Prometheus' Python client (metrics
# test), lua5.3 (perf/pktgen/check.sh), a real Prometheus and promtool
# (prometheus), dpkg-dev, man-db and systemd (systemd-analyze) for the
# Debian package and its test, BIRD 2 (bird2: the ECMP test bed's BGP
# speakers), etcd (etcd-server, and etcd-client for
# etcdctl: the cluster mode's tests and benchmark start their own etcd),
# protobuf-compiler (protoc: the etcd-client crate compiles etcd's protocol
# files when pktdist builds, so it must be there before any cargo command),
# cargo-deb, rustup's rustfmt component (cargo fmt), and a Rust toolchain
# check. Safe to run again: it installs only what is missing.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# The package lists are fetched once per run, and only when something is
# to be installed (an image may ship without them: /var/lib/apt/lists
# cleaned). A mirror's passing error is retried rather than failing the build.
apt_updated=no
apt_update() {
    if [ "$apt_updated" = no ]; then
        $SUDO apt-get -o Acquire::Retries=3 update -q
        apt_updated=yes
    fi
}

need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for p in libdpdk-dev dpdk dpdk-dev pkg-config libclang-dev tshark iproute2 ethtool procps curl \
    python3 python3-pip g++ lua5.3 prometheus dpkg-dev man-db systemd etcd-server etcd-client \
    protobuf-compiler bird2; do
    have_pkg "$p" || need+=("$p")
done

if [ ${#need[@]} -gt 0 ]; then
    echo "install-deps: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # tshark asks whether non-root users may capture; answer no.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | $SUDO debconf-set-selections
    apt_update
    $SUDO apt-get -o Acquire::Retries=3 install -y -q --no-install-recommends "${need[@]}"
    # The tests and benchmarks start their own Prometheus, etcd and BIRD
    # (temporary directories, their own ports): the services these packages
    # start at installation are stopped and disabled, so that nothing
    # listens on a build host (Prometheus on every interface's :9090).
    if [ -d /run/systemd/system ]; then
        for pair in prometheus:prometheus etcd-server:etcd bird2:bird; do
            case " ${need[*]} " in
                *" ${pair%%:*} "*) $SUDO systemctl disable --now "${pair#*:}" >/dev/null 2>&1 || true ;;
            esac
        done
    fi
fi

# The tests check the metrics with Prometheus' own Python parser: Debian's
# package for Debian's python3 (whose pip does not install into the system:
# PEP 668), else pip.
if ! python3 -c "import prometheus_client" >/dev/null 2>&1; then
    echo "install-deps: installing prometheus-client (Python) for the metrics test"
    if [ "$(command -v python3)" = /usr/bin/python3 ]; then
        apt_update
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o Acquire::Retries=3 install -y -q \
            --no-install-recommends python3-prometheus-client
    else
        python3 -m pip install --quiet --disable-pip-version-check prometheus-client \
            || python3 -m pip install --quiet --break-system-packages prometheus-client
    fi
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo not found; install Rust (https://rustup.rs) first" >&2
    exit 1
fi

# cargo fmt (scripts/test.sh's first step) is rustup's rustfmt component,
# which rustup's "minimal" profile leaves out.
if ! cargo fmt --version >/dev/null 2>&1 && command -v rustup >/dev/null 2>&1; then
    echo "install-deps: adding rustup's rustfmt component"
    out=$(rustup component add rustfmt 2>&1) || { echo "$out" >&2; exit 1; }
fi

# The Debian package is built with cargo-deb (scripts/build-deb.sh).
if ! cargo deb --version >/dev/null 2>&1; then
    echo "install-deps: installing cargo-deb"
    cargo install --locked --quiet cargo-deb
fi

ver=$(pkg-config --modversion libdpdk)
case "$ver" in
    2[2-9].*|[3-9][0-9].*) ;;
    *) echo "install-deps: libdpdk $ver is too old: pktdist needs DPDK 22 or newer (it is built and tested against 22.11)" >&2; exit 1 ;;
esac
echo "install-deps: DPDK $ver, $(cargo --version)"
