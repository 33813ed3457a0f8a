#!/usr/bin/env bash
# Announces a pktdist host's VIPs over BGP while pktdist is ready: runs BIRD
# with config/bird/distributor.conf (or the host's copy of it) and polls
# `pktdist status --metrics ADDR:PORT` (GET /ready on the metrics listener)
# every INTERVAL:
#
#   exit 0 (ready)                      -> birdc enable vips  (announced)
#   exit 3 (not ready), 1 (unreachable),
#   or no answer within the timeout     -> birdc disable vips (withdrawn)
#
# With the default 0.5 s interval and timeout a stopped or not-ready
# pktdist is withdrawn within about 1 s (one whose control thread hangs
# stops reading as ready 5 s after its last tick), and announced again
# within about 0.5 s of being ready. A birdc that fails is retried at the
# next poll.
#
# BIRD is this script's child: when the script stops (SIGTERM, SIGINT or an
# error) it shuts BIRD down, which closes the BGP session, so the router
# drops the routes at once; if BIRD dies the script exits non-zero (a
# supervisor restarts both). Nothing is announced before the first "ready":
# the first poll sets the protocol either way, whatever the BIRD
# configuration starts it as.
#
# --config reads pktdist's configuration once, at start (`pktdist check`
# resolves its [control] metrics_listen), and the polls use that address:
# a file saved with an error later, which a running pktdist ignores until a
# reload, does not withdraw the VIPs. A configuration that does not check
# at start stops the script (exit 1). metrics_listen takes effect only when
# pktdist restarts, and so here: restart the script with pktdist after
# changing it. --metrics gives the address directly and reads no file.
#
# The directory of --socket is made if missing (/run is empty after a
# reboot, and /run/bird is made only by Debian's bird.service).
#
# Usage: scripts/pktdist-bgp.sh --bird-config FILE --socket PATH
#            (--metrics ADDR:PORT | --config PKTDIST.toml)
#            [--pktdist BIN] [--interval SECONDS] [--timeout DURATION]
set -euo pipefail

BIRD_CONF=
SOCKET=
METRICS=
PKTDIST_CONF=
PKTDIST=${PKTDIST:-pktdist}
INTERVAL=0.5
TIMEOUT=500ms

usage() {
    sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --bird-config) BIRD_CONF=$2; shift 2 ;;
        --socket) SOCKET=$2; shift 2 ;;
        --metrics) METRICS=$2; PKTDIST_CONF=; shift 2 ;;
        --config) PKTDIST_CONF=$2; METRICS=; shift 2 ;;
        --pktdist) PKTDIST=$2; shift 2 ;;
        --interval) INTERVAL=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        -h|--help) usage ;;
        *) echo "pktdist-bgp: unknown argument $1" >&2; usage ;;
    esac
done
[ -n "$BIRD_CONF" ] && [ -n "$SOCKET" ] && [ -n "$METRICS$PKTDIST_CONF" ] || usage
for tool in bird birdc; do
    command -v $tool >/dev/null || { echo "pktdist-bgp: $tool is missing (apt-get install bird2)" >&2; exit 1; }
done
command -v "$PKTDIST" >/dev/null || { echo "pktdist-bgp: $PKTDIST not found (give --pktdist)" >&2; exit 1; }
bird -p -c "$BIRD_CONF" || { echo "pktdist-bgp: $BIRD_CONF does not parse" >&2; exit 1; }

# The metrics address, from the configuration once: `pktdist check` prints
# the resolved plan, whose control line says "metrics http://ADDR:PORT/metrics"
# (or "metrics off").
if [ -n "$PKTDIST_CONF" ]; then
    plan=$("$PKTDIST" check --config "$PKTDIST_CONF" 2>&1) || {
        echo "pktdist-bgp: $PKTDIST_CONF does not check (give --metrics ADDR:PORT):" >&2
        echo "$plan" >&2
        exit 1
    }
    METRICS=$(sed -n 's#^control: .*, metrics http://\([^/ ,]*\)/metrics, .*#\1#p' <<<"$plan")
    if [ -z "$METRICS" ]; then
        if grep -q '^control: .*, metrics off, ' <<<"$plan"; then
            echo "pktdist-bgp: $PKTDIST_CONF sets no [control] metrics_listen: readiness is served there" >&2
        else
            echo "pktdist-bgp: no metrics address in the plan of $PKTDIST_CONF (give --metrics ADDR:PORT)" >&2
        fi
        exit 1
    fi
    case "$METRICS" in
        *:0) echo "pktdist-bgp: $PKTDIST_CONF: metrics_listen has port 0 (any free port): give --metrics" >&2
             exit 1 ;;
    esac
fi

# An address pktdist cannot parse would read as "unreachable" at every poll:
# refuse it now (clap's usage error is exit 2; 0, 1 and 3 are answers).
rc=0
"$PKTDIST" status --metrics "$METRICS" --timeout "$TIMEOUT" >/dev/null 2>&1 || rc=$?
if [ $rc -eq 2 ]; then
    echo "pktdist-bgp: $PKTDIST status refuses --metrics $METRICS --timeout $TIMEOUT:" >&2
    "$PKTDIST" status --metrics "$METRICS" --timeout "$TIMEOUT" >&2 || true
    exit 1
fi

# /run/bird (or wherever the socket goes) may not exist yet: Debian's
# bird.service makes /run/bird, and this BIRD is not that service.
sock_dir=$(dirname "$SOCKET")
if [ ! -d "$sock_dir" ]; then
    mkdir -p -m 0750 "$sock_dir" || { echo "pktdist-bgp: cannot make $sock_dir for the BIRD socket" >&2; exit 1; }
fi

log() { echo "$(date -u +%H:%M:%S.%3N) pktdist-bgp: $*"; }

BIRD_PID=
stop() {
    local rc=$?
    trap - EXIT TERM INT
    if [ -n "$BIRD_PID" ] && kill -0 "$BIRD_PID" 2>/dev/null; then
        # `down` closes the BGP session with a Cease: the router withdraws now.
        birdc -s "$SOCKET" down >/dev/null 2>&1 || kill "$BIRD_PID" 2>/dev/null || true
        wait "$BIRD_PID" 2>/dev/null || true
    fi
    log "stopped"
    exit $rc
}
trap stop EXIT
trap 'exit 0' TERM INT

bird -f -c "$BIRD_CONF" -s "$SOCKET" &
BIRD_PID=$!
for _ in $(seq 50); do
    birdc -s "$SOCKET" show status >/dev/null 2>&1 && break
    kill -0 "$BIRD_PID" 2>/dev/null || { log "BIRD exited at start"; exit 1; }
    sleep 0.1
done
log "BIRD $BIRD_PID up on $SOCKET; polling pktdist at $METRICS; VIPs withdrawn until pktdist is ready"

# Neither, until the first poll has set it.
announced=unknown
while true; do
    if ! kill -0 "$BIRD_PID" 2>/dev/null; then
        log "BIRD exited"
        BIRD_PID=
        exit 1
    fi
    rc=0
    "$PKTDIST" status --metrics "$METRICS" --timeout "$TIMEOUT" >/dev/null 2>&1 || rc=$?
    if [ $rc -eq 0 ]; then want=yes; else want=no; fi
    if [ "$want" != "$announced" ]; then
        if [ "$want" = yes ]; then cmd=enable; else cmd=disable; fi
        if birdc -s "$SOCKET" $cmd vips >/dev/null 2>&1; then
            announced=$want
            case $rc in
                0) log "pktdist ready: VIPs announced" ;;
                3) log "pktdist not ready: VIPs withdrawn" ;;
                *) log "pktdist unreachable (status exit $rc): VIPs withdrawn" ;;
            esac
        else
            log "birdc $cmd vips failed; retrying"
        fi
    fi
    sleep "$INTERVAL"
done
