#!/usr/bin/env bash
# Loads pktdist with pktgen-dpdk on this machine, over a shared-memory port:
# pktdist serves net_memif0 (perf/pktgen/pktdist-memif.toml), pktgen connects
# to it as the memif client and runs one of the Lua scripts here; then
# pktdist's summary is printed. Without pktgen installed it explains how to
# build it and exits 0 ("skipped").
#
#   perf/pktgen/run-memif.sh [syn-flood.lua|established-mix.lua|imix.lua]
#
# Environment:
#   DURATION=20          seconds of traffic
#   PKTGEN=path          the pktgen binary (default: pktgen on PATH)
#   PKTGEN_LCORES=2-3    pktgen's cores: the first runs its console, the
#                        second sends and receives (default 2-3 with 4 or more
#                        CPUs, else 0-1, shared with pktdist: slow but works)
#   PKTGEN_MEM=1024      MiB of memory for pktgen (no hugepages)
#   MEMIF_SOCKET=/run/pktdist/memif.sock
#   OUT_DIR=dir          where logs and summary.json go (default: a new /tmp dir)
#   PKTDIST=path         the pktdist binary (default: target/release/pktdist,
#                        built if missing)
#   PKTGEN_* settings of the Lua scripts pass through (see each script).
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=perf/pktgen

script=${1:-syn-flood.lua}
case "$script" in
    */*) ;;
    *) script=$HERE/$script ;;
esac
[ -r "$script" ] || {
    echo "run-memif: no such script: $script" >&2
    exit 1
}

PKTGEN=${PKTGEN:-$(command -v pktgen || true)}
if [ -z "$PKTGEN" ]; then
    cat <<'EOF'
run-memif: pktgen (pktgen-dpdk) is not installed; Debian does not package it.
Build it against the installed DPDK (pktgen-dpdk's own instructions, INSTALL.md
in its repository), with Lua enabled for the .lua scripts:

  apt-get install -y git meson ninja-build pkg-config libdpdk-dev \
      libnuma-dev libpcap-dev libbsd-dev liblua5.3-dev
  git clone https://github.com/pktgen/Pktgen-DPDK
  cd Pktgen-DPDK
  git tag -l                  # pick a release that builds with DPDK 22.11
  git checkout <tag>          # (the newest ones follow the newest DPDK)
  meson setup -Dbuildtype=release -Denable_lua=true builddir
  ninja -C builddir           # or: make buildlua  (tools/pktgen-build.sh)
  install -m 755 builddir/app/pktgen /usr/local/bin/pktgen

Then run this script again (or PKTGEN=/path/to/pktgen). docs/pktgen.md has more.
EOF
    echo "run-memif: skipped (pktgen not found)"
    exit 0
fi

DURATION=${DURATION:-20}
case "$DURATION" in '' | *[!0-9]*) echo "run-memif: DURATION must be whole seconds" >&2; exit 1 ;; esac
MEMIF_SOCKET=${MEMIF_SOCKET:-/run/pktdist/memif.sock}
PKTGEN_MEM=${PKTGEN_MEM:-1024}
if [ -z "${PKTGEN_LCORES:-}" ]; then
    if [ "$(nproc)" -ge 4 ]; then PKTGEN_LCORES=2-3; else PKTGEN_LCORES=0-1; fi
fi
case "$PKTGEN_LCORES" in
    *-*) worker=${PKTGEN_LCORES##*-} ;;
    *,*) worker=${PKTGEN_LCORES##*,} ;;
    *)
        echo "run-memif: PKTGEN_LCORES needs two cores, like 2-3" >&2
        exit 1
        ;;
esac
OUT_DIR=${OUT_DIR:-$(mktemp -d /tmp/pktdist-pktgen.XXXXXX)}
mkdir -p "$OUT_DIR"

PKTDIST=${PKTDIST:-target/release/pktdist}
if [ ! -x "$PKTDIST" ]; then
    echo "run-memif: building pktdist (release)"
    cargo build --release --bin pktdist
fi

config=$OUT_DIR/pktdist-memif.toml
sed "s|socket=/run/pktdist/memif.sock|socket=$MEMIF_SOCKET|" "$HERE/pktdist-memif.toml" >"$config"
"$PKTDIST" check --config "$config" >"$OUT_DIR/check.txt" || {
    cat "$OUT_DIR/check.txt" >&2
    echo "run-memif: pktdist check refused $config" >&2
    exit 1
}

mkdir -p "$(dirname "$MEMIF_SOCKET")"
# The memif server creates the socket; a stale one makes it fail.
if [ -e "$MEMIF_SOCKET" ]; then
    echo "run-memif: removing stale $MEMIF_SOCKET"
    rm -f "$MEMIF_SOCKET"
fi

pktdist_pid=""
# shellcheck disable=SC2317 # called by the trap
cleanup() {
    if [ -n "$pktdist_pid" ] && kill -0 "$pktdist_pid" 2>/dev/null; then
        kill -TERM "$pktdist_pid" 2>/dev/null || true
        sleep 2
        kill -KILL "$pktdist_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

echo "run-memif: pktdist on $MEMIF_SOCKET, logs in $OUT_DIR"
"$PKTDIST" run --config "$config" --duration $((DURATION + 60)) \
    --summary-json "$OUT_DIR/summary.json" >"$OUT_DIR/pktdist.log" 2>&1 &
pktdist_pid=$!

for _ in $(seq 1 60); do
    [ -S "$MEMIF_SOCKET" ] && break
    if ! kill -0 "$pktdist_pid" 2>/dev/null; then
        tail -20 "$OUT_DIR/pktdist.log" >&2
        echo "run-memif: pktdist exited before opening $MEMIF_SOCKET" >&2
        exit 1
    fi
    sleep 0.5
done
[ -S "$MEMIF_SOCKET" ] || {
    echo "run-memif: pktdist did not create $MEMIF_SOCKET in 30 s" >&2
    exit 1
}

# pktgen draws a VT100 screen: give it a pseudo-terminal (script(1)) and a
# time limit; the Lua script quits pktgen when PKTGEN_QUIT=1.
pktgen_cmd=("$PKTGEN" -l "$PKTGEN_LCORES" -n 1 --no-huge -m "$PKTGEN_MEM" --no-pci
    --no-telemetry --file-prefix pktgen-memif
    "--vdev=net_memif0,role=client,socket=$MEMIF_SOCKET,socket-abstract=no,mac=02:00:00:00:00:02"
    -- -P -m "$worker.0" -f "$script")
echo "run-memif: ${pktgen_cmd[*]}"
export PKTGEN_QUIT=1 PKTGEN_DURATION="$DURATION"
export PKTGEN_DST_MAC=${PKTGEN_DST_MAC:-02:00:00:00:00:01}
export PKTGEN_SRC_MAC=${PKTGEN_SRC_MAC:-02:00:00:00:00:02}
# Its console reads stdin: keep that open (and silent) while it runs.
exec {idle_fd}< <(sleep $((DURATION + 120)))
idle_pid=$!
rc=0
timeout --kill-after=10 $((DURATION + 90)) \
    script -qefc "$(printf '%q ' "${pktgen_cmd[@]}")" "$OUT_DIR/pktgen.log" <&"$idle_fd" >/dev/null || rc=$?
kill "$idle_pid" 2>/dev/null || true
exec {idle_fd}<&-
if [ "$rc" -ne 0 ]; then
    echo "run-memif: pktgen ended with status $rc (log: $OUT_DIR/pktgen.log)" >&2
fi
# The script's own lines (progress and port statistics), without the screen.
sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' "$OUT_DIR/pktgen.log" |
    grep -aE '^(syn-flood|established-mix|imix):|opackets|ipackets|obytes|ibytes|errors' || true

# Stop pktdist now that the load is over; it prints its summary on SIGTERM
# (SIGINT would not do: a background job of a script starts with it ignored).
kill -TERM "$pktdist_pid" 2>/dev/null || true
wait "$pktdist_pid" || true
pktdist_pid=""
echo
echo "=== pktdist summary ($OUT_DIR/pktdist.log) ==="
if grep -qi summary "$OUT_DIR/pktdist.log"; then
    sed -n '/[Ss]ummary/,$p' "$OUT_DIR/pktdist.log"
else
    tail -30 "$OUT_DIR/pktdist.log"
fi
if [ -s "$OUT_DIR/summary.json" ]; then
    echo "=== $OUT_DIR/summary.json ==="
    python3 -m json.tool "$OUT_DIR/summary.json" 2>/dev/null || cat "$OUT_DIR/summary.json"
fi
exit "$rc"
