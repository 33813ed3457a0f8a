#!/usr/bin/env bash
# Checks the pktgen scripts here.
#
# Always (and all CI does): Lua syntax; each Lua script run against
# test/mock-run.lua, a stand-in for the Lua API and the command grammar of
# pktgen 24.07.1, 24.10.0 and 24.10.3, with default and overridden settings;
# every line of the .pkt files against their release's grammar (with known
# wrong lines that grammar must refuse); syn-pcap.py and pcap-summary.py on a
# generated file. These check the scripts' logic, not the traffic: the last
# line says so.
#
# With PKTGEN=/path/to/pktgen as well: runs each script that pktgen's release
# supports for real (no hugepages, a net_pcap port writing what pktgen sends
# to a file, 1% of line rate for 2 s) and checks the capture with
# pcap-summary.py: TCP flags, frame sizes, destinations, sources, distinct
# flows. Needs root (EAL) and two CPUs.
#
#   perf/pktgen/check.sh
#   PKTGEN=/usr/local/bin/pktgen perf/pktgen/check.sh
#
# Needs a Lua 5.3 or 5.4 interpreter (Debian: apt-get install lua5.3) and
# python3.
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
    echo "check: FAILED: no Lua interpreter (apt-get install lua5.3)"
    exit 1
fi
luac=${lua/lua/luac}
command -v "$luac" >/dev/null 2>&1 || luac=""

tmp=$(mktemp -d /tmp/pktgen-check.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
fail=0
ok() { echo "ok   $*"; }
bad() {
    echo "FAIL $*"
    fail=1
}

# --------------------------------------------------------------- syntax
for f in common.lua syn-flood.lua established-mix.lua imix.lua syn-flood-pcap.lua test/mock-run.lua; do
    if [ -n "$luac" ]; then
        if "$luac" -p "$f"; then ok "$f: syntax ($luac -p)"; else bad "$f: syntax"; fi
    fi
done
for f in syn-pcap.py pcap-summary.py; do
    if python3 -m py_compile "$f" 2>"$tmp/py.err"; then ok "$f: syntax"; else
        cat "$tmp/py.err"
        bad "$f: syntax"
    fi
done
rm -rf __pycache__

# ------------------------------------------------- Lua scripts, stand-in
mock() {
    local script=$1 kind=$2 version=$3
    shift 3
    if env "$@" "$lua" test/mock-run.lua "$script" "$kind" "$version" >"$tmp/mock.out" 2>&1; then
        ok "$script ($kind) against the $version stand-in with ${*:-defaults}"
    else
        cat "$tmp/mock.out"
        bad "$script ($kind) against the $version stand-in with ${*:-defaults}"
    fi
}
for version in 24.07.1 24.10.0 24.10.3; do
    for pair in syn-flood.lua:syn established-mix.lua:established imix.lua:imix syn-flood-pcap.lua:pcap; do
        s=${pair%%:*}
        k=${pair##*:}
        mock "$s" "$k" "$version" PKTGEN_DURATION=3
        mock "$s" "$k" "$version" PKTGEN_DURATION=11 PKTGEN_QUIT=1 PKTGEN_VIP=10.0.0.1 PKTGEN_VIP_PORT=8080
    done
    mock syn-flood-pcap.lua pcap-missing "$version" PKTGEN_DURATION=3 PKTGEN_QUIT=1
done

# --------------------------------------------------- .pkt files, grammar
# The commands the .pkt files may use, per release (from pktgen's
# app/cli-functions.c); one extended regular expression per line.
common_grammar='^(stop|start) 0$
^(enable|disable) 0 range$
^set 0 (count|size|rate) [0-9]+$
^set 0 proto (tcp|udp)$
^range 0 (src|dst) mac (start|min|max|inc) ([0-9a-f]{2}:){5}[0-9a-f]{2}$
^range 0 (src|dst) ip (start|min|max|inc) [0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$
^range 0 (src|dst) port (start|min|max|inc) [0-9]+$
^range 0 size (start|min|max|inc) [0-9]+$
^range 0 proto (tcp|udp)$
^clear 0 stats$
^sleep [0-9]+$
^page (main|range|stats)$
^quit$'
flags_2407='^range 0 tcp flag (set|clr) (urg|ack|psh|rst|syn|fin|all)$'
flags_2410_3='^range 0 tcp flags? (cwr|ece|urg|ack|psh|rst|syn|fin|clr)(,(cwr|ece|urg|ack|psh|rst|syn|fin|clr))*$'
accepts() { # grammar line
    grep -qE "$(paste -sd'|' <<<"$1")" <<<"$2"
}
# The stand-in must refuse what the real release refuses.
for pair in "$flags_2407|range 0 tcp flags syn" "$flags_2410_3|range 0 tcp flag set syn" \
    "$flags_2410_3|range 0 tcp flag clr all"; do
    g=${pair%|*}
    line=${pair##*|}
    if accepts "$common_grammar"$'\n'"$g" "$line"; then
        bad "the .pkt grammar check accepts a line its release refuses: $line"
    fi
done
pkt_check() {
    local file=$1 flags=$2 want=$3 n=0 line
    while IFS= read -r line; do
        case "$line" in '' | '#'*) continue ;; esac
        n=$((n + 1))
        accepts "$common_grammar"$'\n'"$flags" "$line" || bad "$file: not in its release's grammar: $line"
    done <"$file"
    for w in "$want" 'range 0 proto tcp' 'range 0 dst ip start 192.0.2.10' 'range 0 size start 64' \
        'enable 0 range' 'start 0' 'stop 0' 'quit'; do
        grep -qx "$w" "$file" || bad "$file lacks: $w"
    done
    # The file ends by itself: the traffic stops, then pktgen quits.
    [ "$(grep -v '^#' "$file" | grep -v '^$' | tail -3 | paste -sd' ')" = "$(grep -E '^sleep [0-9]+$' "$file") stop 0 quit" ] ||
        bad "$file does not end with sleep, stop 0, quit"
    ok "$file: $n commands in its release's grammar"
}
pkt_check syn-flood.pkt "$flags_2407" 'range 0 tcp flag set syn'
grep -qx 'range 0 tcp flag clr all' syn-flood.pkt || bad "syn-flood.pkt does not clear pktgen's default ACK"
[ "$(grep -c '^range 0 tcp flag set' syn-flood.pkt)" -eq 1 ] || bad "syn-flood.pkt sets a flag besides SYN"
pkt_check syn-flood-24.10.3.pkt "$flags_2410_3" 'range 0 tcp flags syn'
[ "$(grep -c '^range 0 tcp flag' syn-flood-24.10.3.pkt)" -eq 1 ] || bad "syn-flood-24.10.3.pkt sets flags twice"
# The two differ in their comments and flag lines only.
if diff <(grep -v -e '^#' -e '^range 0 tcp flag' syn-flood.pkt) \
    <(grep -v -e '^#' -e '^range 0 tcp flag' syn-flood-24.10.3.pkt) >"$tmp/pkt.diff"; then
    ok "syn-flood.pkt and syn-flood-24.10.3.pkt differ only in their TCP flag lines"
else
    cat "$tmp/pkt.diff"
    bad "syn-flood.pkt and syn-flood-24.10.3.pkt differ beyond their TCP flag lines"
fi

# ------------------------------------------------- the Python tools
if python3 syn-pcap.py --flows 1000 --ports 10 "$tmp/syn.pcap" 2>/dev/null &&
    python3 pcap-summary.py --expect-flows 1000 --expect-flags S --expect-sizes 64 \
        --expect-dst 192.0.2.10:80 --expect-sources 198.18.0.1-198.18.0.100 \
        --expect-source-ports 1024-1033 "$tmp/syn.pcap" >/dev/null; then
    ok "syn-pcap.py writes 1000 distinct 64-byte SYNs that pcap-summary.py counts"
else
    bad "syn-pcap.py / pcap-summary.py on 1000 SYNs"
fi
if python3 pcap-summary.py --expect-flows 999 "$tmp/syn.pcap" >/dev/null 2>&1 ||
    python3 pcap-summary.py --expect-flags AP "$tmp/syn.pcap" >/dev/null 2>&1; then
    bad "pcap-summary.py accepts a wrong expectation"
else
    ok "pcap-summary.py refuses wrong flow counts and flags"
fi

# ------------------------------------------------- the real pktgen
if [ -z "${PKTGEN:-}" ]; then
    if [ "$fail" -ne 0 ]; then
        echo "check: FAILED"
        exit 1
    fi
    echo "check: passed, syntax and logic only (against a stand-in): no pktgen ran, so the traffic"
    echo "check: itself is not checked; PKTGEN=/path/to/pktgen perf/pktgen/check.sh does that"
    exit 0
fi

[ -x "$PKTGEN" ] || {
    echo "check: FAILED: PKTGEN=$PKTGEN is not an executable"
    exit 1
}
version=$(grep -aoE 'Pktgen [0-9]+\.[0-9]+\.[0-9]+' "$PKTGEN" | head -1 | cut -d' ' -f2 || true)
[ -n "$version" ] || {
    echo "check: FAILED: cannot tell the release of $PKTGEN (no 'Pktgen N.N.N' in it)"
    exit 1
}
IFS=. read -r vmaj vmin vpat <<<"$version"
vnum=$((vmaj * 10000 + vmin * 100 + vpat))
echo "check: running pktgen $version ($PKTGEN)"

# Runs pktgen with a net_pcap port that writes what it sends to $tmp/$name.pcap.
real() {
    local name=$1 file=$2
    shift 2
    rm -f "$tmp/$name.pcap" "$tmp/$name.result" "$tmp/$name.log"
    local cmd=("$PKTGEN" -l 0-1 -n 1 --no-huge -m 512 --no-pci --no-telemetry
        --file-prefix "pktgen-check-$$" "--vdev=net_pcap0,tx_pcap=$tmp/$name.pcap"
        -- -P -m 1.0 "$@" -f "$file")
    local rc=0
    PKTGEN_QUIT=1 PKTGEN_DURATION=2 PKTGEN_RATE=1 PKTGEN_RESULT="$tmp/$name.result" \
        timeout --kill-after=5 60 script -qefc "$(printf '%q ' "${cmd[@]}")" "$tmp/$name.log" \
        </dev/null >/dev/null || rc=$?
    sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' "$tmp/$name.log" | tr '\r' '\n' >"$tmp/$name.txt"
    return "$rc"
}
# Checks a capture; prints the summary's main lines.
capture() {
    local name=$1 what=$2
    shift 2
    if python3 pcap-summary.py "$@" "$tmp/$name.pcap" >"$tmp/$name.sum" 2>&1; then
        ok "$what: $(grep -E '^(frames|TCP flags|distinct)' "$tmp/$name.sum" | paste -sd';')"
    else
        cat "$tmp/$name.sum"
        bad "$what"
    fi
}
ran_ok() {
    local name=$1 rc=$2
    if [ "$rc" -ne 0 ]; then
        tail -20 "$tmp/$name.txt"
        bad "$name: pktgen ended with status $rc"
        return 1
    fi
    if [ -e "$tmp/$name.result" ] && [ "$(cat "$tmp/$name.result")" != ok ]; then
        bad "$name: $(cat "$tmp/$name.result")"
        return 1
    fi
    if grep -aq -e 'Invalid line' -e 'command error' "$tmp/$name.txt"; then
        grep -a -e 'Invalid line' -e 'command error' "$tmp/$name.txt"
        bad "$name: pktgen refused commands"
        return 1
    fi
    return 0
}

if [ "$vnum" -ge 241000 ] && [ "$vnum" -lt 241003 ]; then
    for s in syn-flood established-mix; do
        rc=0
        real "$s" "$s.lua" || rc=$?
        if [ "$rc" -eq 0 ] && grep -q 'cannot set TCP flags in range mode' "$tmp/$s.result" &&
            python3 pcap-summary.py --json "$tmp/$s.pcap" >"$tmp/$s.sum" &&
            grep -q '"frames": 0,' "$tmp/$s.sum"; then
            ok "$s.lua refuses pktgen $version and sends nothing"
        else
            bad "$s.lua on pktgen $version: $(cat "$tmp/$s.result" 2>/dev/null)"
        fi
    done
    echo "note pktgen $version: no .pkt file applies (range-mode TCP flags cannot be set)"
else
    rc=0
    real syn-flood syn-flood.lua || rc=$?
    ran_ok syn-flood "$rc" && capture syn-flood "syn-flood.lua" --expect-flags S --expect-sizes 64 \
        --expect-dst 192.0.2.10:80 --expect-dst-mac 02:00:00:00:00:01 \
        --expect-sources 198.18.0.1-198.18.255.254 --expect-source-ports 1024-65535 --expect-min-flows 2
    rc=0
    real established established-mix.lua || rc=$?
    ran_ok established "$rc" && capture established "established-mix.lua" --expect-flags AP \
        --expect-sizes 256 --expect-dst 192.0.2.10:80 --expect-sources 10.99.0.1-10.99.3.232 \
        --expect-source-ports 40000-40063 --expect-min-flows 2
    if [ "$vnum" -lt 241000 ]; then pkt=syn-flood.pkt; else pkt=syn-flood-24.10.3.pkt; fi
    sed -e 's/^sleep [0-9]*$/sleep 2/' -e 's/^set 0 rate [0-9]*$/set 0 rate 1/' "$pkt" >"$tmp/$pkt"
    rc=0
    real pkt "$tmp/$pkt" || rc=$?
    ran_ok pkt "$rc" && capture pkt "$pkt (ends by itself)" --expect-flags S --expect-sizes 64 \
        --expect-dst 192.0.2.10:80 --expect-min-flows 2
fi
rc=0
real imix imix.lua || rc=$?
ran_ok imix "$rc" && capture imix "imix.lua" --expect-flags A --expect-sizes 64:7,594:4,1518:1 \
    --expect-dst 192.0.2.10:80 --expect-flows 12 --expect-sources 10.98.0.1-10.98.0.12
if [ "$vnum" -ge 241000 ]; then
    python3 syn-pcap.py --flows 5000 "$tmp/syn5k.pcap" 2>/dev/null
    rc=0
    real pcap syn-flood-pcap.lua -s "0:$tmp/syn5k.pcap" || rc=$?
    ran_ok pcap "$rc" && capture pcap "syn-flood-pcap.lua replaying 5000 flows" --expect-flags S \
        --expect-sizes 64 --expect-dst 192.0.2.10:80 --expect-flows 5000
else
    echo "note pktgen $version cannot replay a pcap on a virtual device (it creates the pcap's"
    echo "note mbuf pool on NUMA socket 65535; fixed in 24.10.0): syn-flood-pcap.lua not run here"
fi

if [ "$fail" -ne 0 ]; then
    echo "check: FAILED"
    exit 1
fi
echo "check: passed, against the stand-in and the real pktgen $version (captured traffic checked)"
