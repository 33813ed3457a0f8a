#!/usr/bin/env bash
# Checks the pktgen scripts without pktgen: Lua syntax (luac -p), a run of each
# Lua script against a stand-in for pktgen's Lua API (test/mock-run.lua) with
# default and overridden settings, and every line of syn-flood.pkt against the
# pktgen 22.x/23.x command grammar it uses. Needs a Lua 5.3 or 5.4
# interpreter (Debian: apt-get install lua5.3).
set -euo pipefail
cd "$(dirname "$0")"

lua=""
for l in lua5.4 lua5.3 lua; do
    if command -v "$l" >/dev/null 2>&1; then
        lua=$l
        break
    fi
done
if [ -z "$lua" ]; then
    echo "check: skipped: no Lua interpreter (apt-get install lua5.3)"
    exit 0
fi
luac=${lua/lua/luac}
command -v "$luac" >/dev/null 2>&1 || luac=""

fail=0
for f in common.lua syn-flood.lua established-mix.lua imix.lua; do
    if [ -n "$luac" ]; then
        if "$luac" -p "$f"; then echo "ok   $f: syntax ($luac -p)"; else fail=1; fi
    fi
done

run() {
    local script=$1 kind=$2
    shift 2
    if env "$@" "$lua" test/mock-run.lua "$script" "$kind" >/tmp/pktgen-check.$$ 2>&1; then
        echo "ok   $script ($kind) with ${*:-defaults}"
    else
        cat /tmp/pktgen-check.$$
        echo "FAIL $script ($kind) with ${*:-defaults}"
        fail=1
    fi
    rm -f /tmp/pktgen-check.$$
}

for pair in syn-flood.lua:syn established-mix.lua:established imix.lua:imix; do
    s=${pair%%:*}
    k=${pair##*:}
    run "$s" "$k" PKTGEN_DURATION=3
    run "$s" "$k" PKTGEN_DURATION=11 PKTGEN_QUIT=1 PKTGEN_VIP=10.0.0.1 PKTGEN_VIP_PORT=8080
done

# syn-flood.pkt: each command must match the grammar pktgen accepts.
grammar='^(stop|start) 0$
^(enable|disable) 0 range$
^set 0 (count|size|rate) [0-9]+$
^set 0 proto (tcp|udp)$
^range 0 (src|dst) mac (start|min|max|inc) ([0-9a-f]{2}:){5}[0-9a-f]{2}$
^range 0 (src|dst) ip (start|min|max|inc) [0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$
^range 0 (src|dst) port (start|min|max|inc) [0-9]+$
^range 0 size (start|min|max|inc) [0-9]+$
^range 0 proto (tcp|udp)$
^range 0 tcp flag (set|clr) (urg|ack|psh|rst|syn|fin|all)$
^clear 0 stats$
^sleep [0-9]+$
^page (main|range|stats)$'
n=0
while IFS= read -r line; do
    case "$line" in '' | '#'*) continue ;; esac
    n=$((n + 1))
    if ! grep -qE "$(paste -sd'|' <<<"$grammar")" <<<"$line"; then
        echo "FAIL syn-flood.pkt: not a known pktgen command: $line"
        fail=1
    fi
done <syn-flood.pkt
for want in 'range 0 tcp flag set syn' 'range 0 proto tcp' 'range 0 dst ip start 192.0.2.10' 'enable 0 range' 'start 0' 'stop 0'; do
    grep -qx "$want" syn-flood.pkt || {
        echo "FAIL syn-flood.pkt lacks: $want"
        fail=1
    }
done
echo "ok   syn-flood.pkt: $n commands in pktgen's grammar"

if [ "$fail" -ne 0 ]; then
    echo "check: FAILED"
    exit 1
fi
echo "check: all passed"
