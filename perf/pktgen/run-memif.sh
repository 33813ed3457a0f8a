#!/usr/bin/env bash
# Loads pktdist with pktgen-dpdk on this machine, over a shared-memory port:
# pktdist serves net_memif0 (perf/pktgen/pktdist-memif.toml), pktgen connects
# to it as the memif client and runs one of the scripts here; then pktdist's
# summary is printed. Without pktgen installed it explains how to get it and
# exits 0 ("skipped").
#
#   perf/pktgen/run-memif.sh [syn-flood.lua|established-mix.lua|imix.lua|
#                             syn-flood-pcap.lua|syn-flood.pkt|syn-flood-24.10.3.pkt]
#
# It exits non-zero, saying why, when pktgen refused a command, a script
# failed or pktgen crashed, when pktdist crashed or did not stop cleanly, or
# when either did not end in time.
#
# Environment:
#   DURATION=20          seconds of traffic (a .pkt file's `sleep` is set to it)
#   PKTGEN=path          the pktgen binary (default: pktgen on PATH)
#   PKTGEN_LCORES=2-3    pktgen's cores: the first runs its console, the
#                        second sends and receives (default 2-3 with 4 or more
#                        CPUs, else 0-1, shared with pktdist: slow but works)
#   PKTGEN_MEM=MiB       memory for pktgen (no hugepages; default 1024, more
#                        for a big pcap)
#   FLOWS=1000000        syn-flood-pcap.lua: distinct flows of the generated pcap
#   PCAP=file            syn-flood-pcap.lua: replay this file instead
#   MEMIF_SOCKET=/run/pktdist/memif.sock
#   OUT_DIR=dir          where logs, captures and summary.json go (default: a
#                        new /tmp dir)
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
docs/pktgen.md says which release to build against Debian's DPDK 22.11 and
how (pktgen 24.07.1, meson with four c_args aliases, Lua enabled). Then run
this script again, with pktgen on the PATH or PKTGEN=/path/to/pktgen.
EOF
    echo "run-memif: skipped (pktgen not found)"
    exit 0
fi
[ -x "$PKTGEN" ] || {
    echo "run-memif: PKTGEN=$PKTGEN is not an executable" >&2
    exit 1
}

# The release decides the TCP flag grammar and what works on a memif port.
version=$(grep -aoE 'Pktgen [0-9]+\.[0-9]+\.[0-9]+' "$PKTGEN" | head -1 | cut -d' ' -f2 || true)
[ -n "$version" ] || {
    echo "run-memif: cannot tell the release of $PKTGEN (no 'Pktgen N.N.N' in it)" >&2
    exit 1
}
IFS=. read -r vmaj vmin vpat <<<"$version"
vnum=$((vmaj * 10000 + vmin * 100 + vpat))
refuse() {
    echo "run-memif: $script with pktgen $version: $*" >&2
    exit 1
}
case "$(basename "$script")" in
    syn-flood.pkt)
        [ "$vnum" -lt 241000 ] || refuse "its TCP flag lines are for pktgen 24.07.1 and older; use syn-flood-24.10.3.pkt"
        ;;
    syn-flood-24.10.3.pkt)
        [ "$vnum" -ge 241003 ] || refuse "its TCP flag line is for pktgen 24.10.3 and newer; use syn-flood.pkt (24.10.0-24.10.2 cannot set range-mode TCP flags)"
        ;;
    syn-flood-pcap.lua)
        [ "$vnum" -ge 241000 ] || refuse "pktgen before 24.10.0 cannot replay a pcap on a memif port (it creates the pcap's mbuf pool on NUMA socket 65535); use 24.10.3"
        ;;
esac

DURATION=${DURATION:-20}
case "$DURATION" in '' | *[!0-9]*) echo "run-memif: DURATION must be whole seconds" >&2; exit 1 ;; esac
MEMIF_SOCKET=${MEMIF_SOCKET:-/run/pktdist/memif.sock}
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

# What pktgen runs: the script, or a copy of a .pkt file lasting DURATION.
extra=()
PKTGEN_MEM=${PKTGEN_MEM:-1024}
case "$script" in
    *.pkt)
        run_script=$OUT_DIR/$(basename "$script")
        sed "s/^sleep [0-9]*$/sleep $DURATION/" "$script" >"$run_script"
        ;;
    *) run_script=$script ;;
esac
if [ "$(basename "$script")" = syn-flood-pcap.lua ]; then
    if [ -z "${PCAP:-}" ]; then
        PCAP=$OUT_DIR/syn.pcap
        python3 "$HERE/syn-pcap.py" --flows "${FLOWS:-1000000}" "$PCAP"
    fi
    [ -r "$PCAP" ] || {
        echo "run-memif: no pcap file $PCAP" >&2
        exit 1
    }
    extra=(-s "0:$PCAP")
    # pktgen keeps every frame of the file in an mbuf (about 450 bytes each).
    frames=$((($(stat -c %s "$PCAP") - 24) / 76))
    need=$((512 + frames / 2000))
    [ "$PKTGEN_MEM" -ge "$need" ] || PKTGEN_MEM=$need
fi

mkdir -p "$(dirname "$MEMIF_SOCKET")"
# The memif server creates the socket; a stale one makes it fail. One that
# a process still listens on is not stale: a pktdist of an aborted run
# busy-polls a core and would skew this one.
if [ -e "$MEMIF_SOCKET" ]; then
    if [ -n "$(ss -Hxl src "$MEMIF_SOCKET" 2>/dev/null)" ]; then
        echo "run-memif: a process still listens on $MEMIF_SOCKET (an earlier run's pktdist?); stop it first:" >&2
        ss -Hxlp src "$MEMIF_SOCKET" >&2 || true
        exit 1
    fi
    echo "run-memif: removing stale $MEMIF_SOCKET"
    rm -f "$MEMIF_SOCKET"
fi

pktdist_pid=""
idle_pid=""
pktgen_run=""
# shellcheck disable=SC2317 # called by the trap
cleanup() {
    [ -z "$idle_pid" ] || kill "$idle_pid" 2>/dev/null || true
    # pktgen runs under timeout(1): an ALRM makes it stop pktgen as on
    # expiry (TERM, then KILL after its --kill-after).
    [ -z "$pktgen_run" ] || kill -ALRM "$pktgen_run" 2>/dev/null || true
    if [ -n "$pktdist_pid" ] && kill -0 "$pktdist_pid" 2>/dev/null; then
        kill -TERM "$pktdist_pid" 2>/dev/null || true
        sleep 2
        kill -KILL "$pktdist_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

echo "run-memif: pktdist on $MEMIF_SOCKET, logs in $OUT_DIR"
"$PKTDIST" run --config "$config" --duration $((DURATION + 120)) \
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
# time limit; it runs at the lowest priority beside the busy-polling pktdist.
pktgen_cmd=(nice -n 19 "$PKTGEN" -l "$PKTGEN_LCORES" -n 1 --no-huge -m "$PKTGEN_MEM" --no-pci
    --no-telemetry --file-prefix pktgen-memif
    "--vdev=net_memif0,role=client,socket=$MEMIF_SOCKET,socket-abstract=no,mac=02:00:00:00:00:02"
    -- -P -m "$worker.0" "${extra[@]}" -f "$run_script")
echo "run-memif: pktgen $version: ${pktgen_cmd[*]}"
result=$OUT_DIR/result
rm -f "$result"
export PKTGEN_QUIT=1 PKTGEN_DURATION="$DURATION" PKTGEN_RESULT="$result"
export PKTGEN_DST_MAC=${PKTGEN_DST_MAC:-02:00:00:00:00:01}
export PKTGEN_SRC_MAC=${PKTGEN_SRC_MAC:-02:00:00:00:00:02}
# Its console reads stdin: keep that open (and silent) while it runs.
exec {idle_fd}< <(sleep $((DURATION + 300)))
idle_pid=$!
problems=()
timeout --kill-after=10 $((DURATION + 120)) \
    script -qefc "$(printf '%q ' "${pktgen_cmd[@]}")" "$OUT_DIR/pktgen.log" <&"$idle_fd" >/dev/null &
pktgen_run=$!
# A pktdist that dies leaves pktgen sending into nothing: stop it then (an
# ALRM makes timeout(1) stop its command as on expiry).
while kill -0 "$pktgen_run" 2>/dev/null; do
    if ! kill -0 "$pktdist_pid" 2>/dev/null; then
        problems+=("pktdist ended while pktgen was running; pktgen stopped")
        kill -ALRM "$pktgen_run" 2>/dev/null || true
        break
    fi
    sleep 0.5
done
rc=0
wait "$pktgen_run" || rc=$?
pktgen_run=""
kill "$idle_pid" 2>/dev/null || true
idle_pid=""
exec {idle_fd}<&-
# The log without the screen's escape sequences.
sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' "$OUT_DIR/pktgen.log" | tr '\r' '\n' >"$OUT_DIR/pktgen.txt"

if [ ${#problems[@]} -gt 0 ]; then
    :
elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    problems+=("pktgen did not end within $((DURATION + 120)) s and was stopped")
elif [ "$rc" -ne 0 ]; then
    problems+=("pktgen ended with status $rc")
fi
if grep -aq 'Segment Fault\|received signal\|EAL: Error' "$OUT_DIR/pktgen.txt"; then
    problems+=("pktgen crashed or failed to start: $(grep -a -m3 -e 'Segment Fault' -e 'received signal' -e 'EAL: Error' -e 'Cause:' "$OUT_DIR/pktgen.txt" | paste -sd' ')")
fi
if grep -aq -e 'Invalid line' -e 'command error' "$OUT_DIR/pktgen.txt"; then
    problems+=("pktgen refused commands: $(grep -a -e 'Invalid line' "$OUT_DIR/pktgen.txt" | sort -u | paste -sd' ')")
fi
case "$script" in
    *.lua)
        if [ ! -s "$result" ]; then
            problems+=("the script did not finish (no result in $result)")
        elif [ "$(cat "$result")" != ok ]; then
            problems+=("the script failed: $(cat "$result")")
        fi
        ;;
esac
# The script's own lines (plan, progress, errors, port statistics).
grep -aE '^(syn-flood|established-mix|imix|syn-flood-pcap):|opackets|ipackets|obytes|ibytes|errors' \
    "$OUT_DIR/pktgen.txt" || true

# Stop pktdist now that the load is over; it prints its summary on SIGTERM
# (SIGINT would not do: a background job of a script starts with it ignored).
prc=0
if kill -0 "$pktdist_pid" 2>/dev/null; then
    kill -TERM "$pktdist_pid" 2>/dev/null || true
fi
wait "$pktdist_pid" || prc=$?
pktdist_pid=""
if [ "$prc" -gt 128 ]; then
    problems+=("pktdist crashed (signal $((prc - 128))): see $OUT_DIR/pktdist.log")
elif [ "$prc" -ne 0 ]; then
    problems+=("pktdist ended with status $prc")
fi
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
else
    problems+=("pktdist wrote no summary")
fi
if [ ${#problems[@]} -gt 0 ]; then
    echo
    for p in "${problems[@]}"; do echo "run-memif: FAILED: $p" >&2; done
    exit 1
fi
echo "run-memif: done (pktgen $version, $(basename "$script"), $DURATION s; logs in $OUT_DIR)"
