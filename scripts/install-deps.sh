#!/usr/bin/env bash
# Installs what pktdist needs on a Debian machine and is not there yet:
# DPDK 22.11 (libraries, drivers, dpdk-devbind.py, dpdk-testpmd), pkg-config,
# libclang (bindgen), tshark (independent dissector for tests), iproute2 and
# ethtool (test bed), curl and python3, Prometheus' Python client (metrics
# test), lua5.3 (perf/pktgen/check.sh), a real Prometheus and promtool
# (prometheus), dpkg-dev, man-db and systemd (systemd-analyze) for the
# Debian package and its test, BIRD 2 (bird2: the ECMP test bed's BGP
# speakers), etcd (etcd-server, and etcd-client for
# etcdctl: the cluster mode's tests and benchmark start their own etcd),
# protobuf-compiler (protoc: the etcd-client crate compiles etcd's protocol
# files when pktdist builds, so it must be there before any cargo command),
# cargo-deb, and a Rust toolchain check. Safe to run again: it installs only
# what is missing.
set -euo pipefail

need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for p in libdpdk-dev dpdk dpdk-dev pkg-config libclang-dev tshark iproute2 ethtool curl python3 lua5.3 \
    prometheus dpkg-dev man-db systemd etcd-server etcd-client protobuf-compiler bird2; do
    have_pkg "$p" || need+=("$p")
done

if [ ${#need[@]} -gt 0 ]; then
    echo "install-deps: installing ${need[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    # tshark asks whether non-root users may capture; answer no.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | $SUDO debconf-set-selections
    # A mirror's passing error is retried rather than failing the build.
    $SUDO apt-get -o Acquire::Retries=3 update -q
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
# package for Debian's python3 (which has no pip), else pip.
if ! python3 -c "import prometheus_client" >/dev/null 2>&1; then
    echo "install-deps: installing prometheus-client (Python) for the metrics test"
    if [ "$(command -v python3)" = /usr/bin/python3 ]; then
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
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

# The Debian package is built with cargo-deb (scripts/build-deb.sh).
if ! cargo deb --version >/dev/null 2>&1; then
    echo "install-deps: installing cargo-deb"
    cargo install --locked --quiet cargo-deb
fi

ver=$(pkg-config --modversion libdpdk)
case "$ver" in
    2[2-9].*|[3-9][0-9].*) ;;
    *) echo "install-deps: libdpdk $ver is older than 22.11" >&2; exit 1 ;;
esac
echo "install-deps: DPDK $ver, $(cargo --version)"
