#!/usr/bin/env bash
# A test bed for pktdist on one machine: network namespaces joined by a bridge,
# real kernel TCP clients and backend servers, and pktdist attached to its own
# veth through DPDK's net_af_packet.
#
#   pd-c1, pd-c2      clients   10.99.1.1-10.99.1.8, 10.99.2.1-10.99.2.8
#   pd-r1             a router  10.99.20.1 on the bridge, 10.98.3.254 toward pd-c3
#                               on a link of MTU 1400 (a tunnel or PPPoE link)
#   pd-c3             a client  10.98.3.1 behind pd-r1 (its own side of the
#                               link says 1500, so it offers an MSS of 1460)
#   pd-lb             pktdist   lb0 (no address: DPDK owns it), MAC 02:50:44:00:00:02
#                               ctl0 10.99.0.1: the control plane (UDP 7400), a
#                               kernel interface the backends' applications reach
#   pd-be1..pd-be3    backends  10.99.10.1-10.99.10.3, VIP on loopback, ipip decap
#   pd-sw             the switch: bridge br0 joining everyone's veth
#
# Each backend decapsulates IP-in-IP with the kernel's tunl0 where the kernel
# has the ipip driver, else in user space (the backend server's --decap).
#
# Clients reach the VIP 10.99.100.1 through pktdist (a static neighbour entry
# stands in for the router that would point the VIP at it); backends answer the
# clients directly (direct server return). Everything stays inside these
# namespaces: nothing is routed off the machine.
#
# pd-c3's downloads cross pd-r1's narrow link: a backend's full-size reply
# (1500 bytes, DF) does not fit, pd-r1 sends "fragmentation needed" (MTU
# 1400) to the reply's source, the VIP, that is to pktdist, which forwards it
# to the backend that owns the connection: path-MTU discovery through the
# load balancer.
#
# With --instances N (N >= 2) the bed puts N pktdist hosts behind a router
# doing equal-cost multipath, as a real scale-out deployment does:
#
#   pd-lb, pd-lb2..   pktdist instance k: lb0 (DPDK, 10.99.0.2k, MAC
#                     02:50:44:00:00:2k, no kernel address), ctl0 10.99.0.(2k-1)
#                     (control plane, metrics and BGP); BIRD announcing the VIP
#                     with next hop 10.99.0.2k while pktdist is ready
#                     (scripts/pktdist-bgp.sh, config/bird/distributor.conf)
#   pd-r1             the router: BIRD learns the VIP over BGP from each
#                     instance and installs one multipath route
#                     (config/bird/router.conf), hashed by L4 ports
#                     (fib_multipath_hash_policy=1)
#   pd-c1, pd-c2      send the VIP to the router (their route's gateway)
#   pd-etcd           10.99.30.1, for the cluster mode's etcd server (started
#                     with --etcd only)
#
# Instance k's pktdist configuration is written to $STATE/lbk/pktdist.toml
# (config/testbed.toml with its own addresses, a metrics listener, shared
# CPUs and idle sleep, and with --etcd a [cluster] section naming the bed's
# etcd), its BIRD's to $STATE/lbk/bird.conf; the glue and the
# BIRDs start with the bed and log to $STATE. Start pktdist yourself:
#   ip netns exec pd-lb2 ./target/release/pktdist run --config $STATE/lb2/pktdist.toml
# $STATE is $PD_TESTBED_STATE (a new or empty directory, which up marks as
# the bed's: down removes nothing else), default /tmp/<prefix>-testbed; the glue runs
# $PKTDIST status (default ./target/release/pktdist).
#
# Usage: scripts/testbed.sh up [--instances N] [--etcd] | down | status
set -euo pipefail

PREFIX=${PD_TESTBED_PREFIX:-pd}
VIP=10.99.100.1
LB_IP=10.99.0.2
LB_MAC=02:50:44:00:00:02
CTL_IP=10.99.0.1   # pktdist's control address, on ctl0 beside the DPDK port
MTU_WIRE=1600   # room for the 20-byte outer header of IP-in-IP
MTU_NARROW=1400 # the router's link to the client behind it
ROUTER_IP=10.99.20.1
BEHIND_NET=10.98.3.0/24
BEHIND_GW=10.98.3.254
BEHIND_CLIENT=10.98.3.1
NS_SW=$PREFIX-sw
NS_LB=$PREFIX-lb
CLIENTS=(c1 c2)
BACKENDS=(be1 be2 be3)
REPO=$(cd "$(dirname "$0")/.." && pwd)
STATE_DEFAULT=/tmp/$PREFIX-testbed
STATE=${PD_TESTBED_STATE:-$STATE_DEFAULT}
# Written into $STATE by up: down removes only a directory that has it (or
# the default one, the bed's by its name), never one a caller named that
# holds other files.
STATE_MARKER=.pktdist-testbed
PKTDIST=${PKTDIST:-$REPO/target/release/pktdist}
INSTANCES=1
ETCD=no
ETCD_IP=10.99.30.1
BGP_AS_ROUTER=65000
BGP_AS_LB=65001

# Instance k's namespace, control (and BGP) address, data address and MAC.
lb_ns() { if [ "$1" -eq 1 ]; then echo "$NS_LB"; else echo "$NS_LB$1"; fi; }
lb_ctl_ip() { echo "10.99.0.$((2 * $1 - 1))"; }
lb_data_ip() { echo "10.99.0.$((2 * $1))"; }
lb_mac() { printf '02:50:44:00:00:%02x' $((2 * $1)); }

ns_exists() { ip netns list | awk '{print $1}' | grep -qx "$1"; }

backend_mac() { printf '02:50:44:00:10:%02x' "$1"; }

down() {
    for ns in $(ip netns list | awk '{print $1}' | grep "^$PREFIX-" || true); do
        # Kill anything still running inside (a crashed test's servers).
        for pid in $(ip netns pids "$ns" 2>/dev/null || true); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    if [ -e "$STATE/$STATE_MARKER" ] || [ "$STATE" = "$STATE_DEFAULT" ]; then
        rm -rf "$STATE"
    elif [ -e "$STATE" ]; then
        echo "testbed: left $STATE alone (not made by the bed: no $STATE_MARKER in it)" >&2
    fi
    # veth ends left in the root namespace by an interrupted 'up'.
    for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^$PREFIX-" || true); do
        ip link del "$l" 2>/dev/null || true
    done
}

# state_dir: makes $STATE, marked as the bed's, or takes it if it is the
# bed's already or empty; refuses a directory holding other files, which
# down would not remove.
state_dir() {
    if [ -d "$STATE" ] && [ ! -e "$STATE/$STATE_MARKER" ] && [ -n "$(ls -A "$STATE")" ]; then
        echo "testbed: $STATE (PD_TESTBED_STATE) holds files the bed did not make: name a new or empty directory" >&2
        exit 1
    fi
    mkdir -p "$STATE"
    : >"$STATE/$STATE_MARKER"
}

# attach NAME NS IFNAME: a veth pair with one end in NS (as IFNAME) and the
# other on the bridge.
attach() {
    local name=$1 ns=$2 ifname=$3
    ip link add "$PREFIX-$name" type veth peer name "$PREFIX-$name-p"
    ip link set "$PREFIX-$name" netns "$ns"
    ip -n "$ns" link set "$PREFIX-$name" name "$ifname"
    ip link set "$PREFIX-$name-p" netns "$NS_SW"
    ip -n "$NS_SW" link set "$PREFIX-$name-p" master br0 mtu $MTU_WIRE up
}

up() {
    local tool
    for tool in ip:iproute2 ethtool:ethtool sysctl:procps; do
        command -v "${tool%%:*}" >/dev/null || { echo "testbed: ${tool%%:*} is missing (apt-get install ${tool#*:})" >&2; exit 1; }
    done
    if [ "$ETCD" = yes ]; then
        command -v etcd >/dev/null || { echo "testbed: etcd is missing (apt-get install etcd-server)" >&2; exit 1; }
    fi
    if [ "$INSTANCES" -gt 1 ]; then
        for tool in bird birdc; do
            command -v $tool >/dev/null || { echo "testbed: $tool is missing (apt-get install bird2)" >&2; exit 1; }
        done
        # pktdist-bgp.sh runs pktdist (to read the metrics address) as it starts.
        [ -x "$PKTDIST" ] || { echo "testbed: $PKTDIST is not built: cargo build --release --features dpdk first" >&2; exit 1; }
    fi
    down
    # Only the ECMP bed keeps files (configurations, logs) in $STATE.
    [ "$INSTANCES" -eq 1 ] || state_dir
    command -v modprobe >/dev/null && modprobe ipip 2>/dev/null || true
    ip netns add "$NS_SW"
    ip -n "$NS_SW" link add br0 type bridge
    ip -n "$NS_SW" link set br0 mtu $MTU_WIRE up

    local k
    for k in $(seq 1 "$INSTANCES"); do
        local lns tag
        lns=$(lb_ns "$k")
        tag=lb; [ "$k" -eq 1 ] || tag=lb$k
        # The distributor's port: DPDK's af_packet PMD takes it over.
        ip netns add "$lns"
        attach $tag "$lns" lb0
        ip -n "$lns" link set lb0 address "$(lb_mac "$k")" mtu $MTU_WIRE up
        ip -n "$lns" link set lo up
        # The kernel must not answer or reset what pktdist handles.
        ip netns exec "$lns" sysctl -qw net.ipv6.conf.lb0.disable_ipv6=1
        # The control plane: DPDK owns lb0, so the control thread's UDP socket
        # needs a kernel interface of its own that the backends can reach.
        attach ${tag}ctl "$lns" ctl0
        ip -n "$lns" link set ctl0 up
        ip -n "$lns" addr add "$(lb_ctl_ip "$k")/16" dev ctl0
    done

    local i=0
    for c in "${CLIENTS[@]}"; do
        i=$((i + 1))
        local ns=$PREFIX-$c
        ip netns add "$ns"
        attach "$c" "$ns" eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 mtu 1500 up
        # A veth hands its peer a packet whose checksum the kernel left for
        # "the NIC" to fill in; DPDK's af_packet receives it so and forwards it
        # unfinished, and the backend's kernel drops it (TcpInCsumErrors).
        # Real NICs never deliver such packets: make the clients finish their
        # checksums in software.
        ip netns exec "$ns" ethtool -K eth0 tx off >/dev/null
        for h in $(seq 1 8); do ip -n "$ns" addr add "10.99.$i.$h/16" dev eth0; done
        if [ "$INSTANCES" -eq 1 ]; then
            ip -n "$ns" route add $VIP/32 via $LB_IP dev eth0
            ip -n "$ns" neigh replace $LB_IP lladdr $LB_MAC dev eth0 nud permanent
        else
            # The router spreads the VIP's flows over the instances. It is
            # on the same bridge: it must not redirect the clients past it.
            ip -n "$ns" route add $VIP/32 via $ROUTER_IP dev eth0
            ip netns exec "$ns" sysctl -qw net.ipv4.conf.all.accept_redirects=0 net.ipv4.conf.eth0.accept_redirects=0
        fi
    done

    # The router and the client behind its narrow link. The veth pair's two
    # ends have different MTUs: the router's side is the narrow link, the
    # client's side the client's own 1500-byte LAN.
    local rns=$PREFIX-r1 cns=$PREFIX-c3
    ip netns add "$rns"
    ip netns add "$cns"
    attach r1 "$rns" eth0
    ip -n "$rns" link set lo up
    ip -n "$rns" link set eth0 mtu $MTU_WIRE up
    ip -n "$rns" addr add $ROUTER_IP/16 dev eth0
    ip link add "$PREFIX-r1c3" type veth peer name "$PREFIX-c3r1"
    ip link set "$PREFIX-r1c3" netns "$rns"
    ip -n "$rns" link set "$PREFIX-r1c3" name eth1
    ip link set "$PREFIX-c3r1" netns "$cns"
    ip -n "$cns" link set "$PREFIX-c3r1" name eth0
    ip -n "$rns" link set eth1 mtu $MTU_NARROW up
    ip -n "$rns" addr add $BEHIND_GW/24 dev eth1
    ip netns exec "$rns" sysctl -qw net.ipv4.ip_forward=1
    for k in all default eth0 eth1; do
        ip netns exec "$rns" sysctl -qw "net.ipv4.conf.$k.rp_filter=0"
    done
    ip netns exec "$rns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
    if [ "$INSTANCES" -eq 1 ]; then
        ip -n "$rns" route add $VIP/32 via $LB_IP dev eth0
        ip -n "$rns" neigh replace $LB_IP lladdr $LB_MAC dev eth0 nud permanent
    else
        # pktdist answers no ARP: the next hops' MACs are static, as a
        # router's entries for a load balancer's data ports would be.
        for k in $(seq 1 "$INSTANCES"); do
            ip -n "$rns" neigh replace "$(lb_data_ip "$k")" lladdr "$(lb_mac "$k")" dev eth0 nud permanent
        done
        # ECMP hashed on the L4 ports too, so one client's connections
        # spread over the instances; no redirects to the clients beside it.
        ip netns exec "$rns" sysctl -qw net.ipv4.fib_multipath_hash_policy=1
        for k in all default eth0; do
            ip netns exec "$rns" sysctl -qw "net.ipv4.conf.$k.send_redirects=0"
        done
    fi
    ip -n "$cns" link set lo up
    ip -n "$cns" link set eth0 mtu 1500 up
    ip -n "$cns" addr add $BEHIND_CLIENT/24 dev eth0
    ip -n "$cns" route add default via $BEHIND_GW
    # As for the other clients: checksums finished in software (the router
    # forwards the client's packets to lb0 as they are).
    ip netns exec "$cns" ethtool -K eth0 tx off >/dev/null

    i=0
    for b in "${BACKENDS[@]}"; do
        i=$((i + 1))
        local ns=$PREFIX-$b
        ip netns add "$ns"
        attach "$b" "$ns" eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 address "$(backend_mac $i)" mtu $MTU_WIRE up
        ip -n "$ns" addr add "10.99.10.$i/16" dev eth0
        # The VIP on loopback, never announced (l2 mode delivers to it by MAC).
        ip -n "$ns" addr add $VIP/32 dev lo
        ip netns exec "$ns" sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
        # IP-in-IP: where the kernel has an ipip driver its fallback device
        # tunl0 decapsulates; otherwise (CONFIG_NET_IPIP off, as on the CI
        # machines) the backend server decapsulates in user space
        # (examples/backend_server.rs --decap).
        local tunl=""
        if ip -n "$ns" link add tunl0 type ipip 2>/dev/null || ip -n "$ns" link show tunl0 >/dev/null 2>&1; then
            ip -n "$ns" link set tunl0 up
            tunl=tunl0
        fi
        # Reverse-path filtering off: decapsulated packets arrive on tunl0
        # (or, with --decap, on lo) from the client's address, whose route
        # leaves by eth0, and an interface filters by the larger of "all"
        # and its own value. tunl0 exists from the namespace's creation on,
        # with the value the host's init namespace gave it (strict, 1, on
        # some distributions), before "default" is set here: name it too.
        for k in all default eth0 lo $tunl; do
            ip netns exec "$ns" sysctl -qw "net.ipv4.conf.$k.rp_filter=0"
        done
        # Replies to the client behind the router go through the router.
        ip -n "$ns" route add $BEHIND_NET via $ROUTER_IP
    done
    if [ "$INSTANCES" -eq 1 ]; then
        echo "testbed up: clients ${CLIENTS[*]} and c3 behind router r1 (link MTU $MTU_NARROW), backends ${BACKENDS[*]}, pktdist port lb0 in $NS_LB"
        return
    fi
    ecmp_up
    echo "testbed up: $INSTANCES pktdist instances ($(for k in $(seq 1 "$INSTANCES"); do printf '%s ' "$(lb_ns "$k")"; done)) behind router r1 (BGP, ECMP), clients ${CLIENTS[*]} and c3, backends ${BACKENDS[*]}; configurations in $STATE"
}

# detached CMD...: runs CMD in the background in a session of its own, with
# no file descriptor but stdin, stdout and stderr: a lock the caller holds
# (flock /tmp/testbed.lock) is not held on by the bed's daemons.
detached() {
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            [ "$fd" -gt 2 ] && eval "exec $fd>&-"
        done
        exec setsid "$@"
    ) &
}

# instance_config K: config/testbed.toml for instance k: its control and
# outer source addresses, a metrics listener (readiness for the BGP glue),
# a stop delay (it forwards on while the router withdraws it),
# its own EAL file prefix, a worker that shares its CPU and sleeps when
# idle (N instances on a small machine), and a service on :81 whose
# Maglev hashes the client address only.
instance_config() {
    local k=$1 ctl data core
    ctl=$(lb_ctl_ip "$k")
    data=$(lb_data_ip "$k")
    core=$((k % 2))
    sed -e "s/^listen = \"$CTL_IP:7400\"/listen = \"$ctl:7400\"/" \
        -e "s/^status_interval = \"2s\"/&\nmetrics_listen = \"$ctl:9400\"\nstop_delay = \"2s\"/" \
        -e "s/^ipip_source = \"$LB_IP\"/ipip_source = \"$data\"/" \
        -e "s/^  \"--no-shconf\",/&\n  \"--file-prefix=$PREFIX-lb$k\",/" \
        -e "s/^workers = \[1\]/workers = [$core]\nshare_cpus = true\nidle_sleep = \"50us\"/" \
        "$REPO/config/testbed.toml"
    cat <<EOT

# The ECMP test bed's: a service whose Maglev hashes the client address
# only, so every connection of one client reaches one backend whichever
# instance the router sends it to.
[[services]]
name = "sticky"
vip = "$VIP"
port = 81
protocol = "tcp"
hash = "client"
forwarding = "l2"
EOT
    local i=0 b
    for b in "${BACKENDS[@]}"; do
        i=$((i + 1))
        printf '\n[[services.backends]]\nname = "%s"\naddress = "10.99.10.%d"\nmac = "%s"\n' "$b" $i "$(backend_mac $i)"
    done
    if [ "$ETCD" = yes ]; then
        # With --etcd the instances share their requested affinities
        # through the bed's etcd (docs/cluster.md).
        printf '\n[cluster]\nstore = "etcd"\nendpoints = ["http://%s:2379"]\nprefix = "/%s"\ninstance = "lb%d"\n' \
            "$ETCD_IP" "$PREFIX" "$k"
    fi
}

# The router's BIRD, each instance's BIRD and glue, and the etcd namespace.
ecmp_up() {
    mkdir -p "$STATE/r1"
    local rns=$PREFIX-r1 k
    {
        sed -e "s/^define ROUTER_ID = .*/define ROUTER_ID = $ROUTER_IP;/" \
            -e "s/^define LOCAL_AS = .*/define LOCAL_AS = $BGP_AS_ROUTER;/" \
            "$REPO/config/bird/router.conf"
        echo "log \"$STATE/r1/bird.log\" all;"
        for k in $(seq 1 "$INSTANCES"); do
            echo "protocol bgp lb$k from distributor { neighbor $(lb_ctl_ip "$k") as $BGP_AS_LB; }"
        done
    } >"$STATE/r1/bird.conf"
    detached ip netns exec "$rns" bird -f -c "$STATE/r1/bird.conf" -s "$STATE/r1/bird.ctl" -P "$STATE/r1/bird.pid" \
        </dev/null >"$STATE/r1/bird.out" 2>&1

    for k in $(seq 1 "$INSTANCES"); do
        local dir=$STATE/lb$k ctl
        ctl=$(lb_ctl_ip "$k")
        mkdir -p "$dir"
        instance_config "$k" >"$dir/pktdist.toml"
        sed -e "s/^define ROUTER_ID = .*/define ROUTER_ID = $ctl;/" \
            -e "s/^define LOCAL_ADDR = .*/define LOCAL_ADDR = $ctl;/" \
            -e "s/^define LOCAL_AS = .*/define LOCAL_AS = $BGP_AS_LB;/" \
            -e "s/^define PEER_ADDR = .*/define PEER_ADDR = $ROUTER_IP;/" \
            -e "s/^define PEER_AS = .*/define PEER_AS = $BGP_AS_ROUTER;/" \
            -e "s/^define NEXT_HOP = .*/define NEXT_HOP = $(lb_data_ip "$k");/" \
            "$REPO/config/bird/distributor.conf" >"$dir/bird.conf"
        # A 2 s timeout: a loaded test machine may answer one poll slower
        # than the default 500 ms, which would withdraw the VIPs mid-test.
        # A stopped or not-ready instance answers at once either way.
        detached ip netns exec "$(lb_ns "$k")" "$REPO/scripts/pktdist-bgp.sh" \
            --bird-config "$dir/bird.conf" --socket "$dir/bird.ctl" \
            --metrics "$ctl:9400" --timeout 2s --pktdist "$PKTDIST" \
            </dev/null >"$dir/bgp.log" 2>&1
    done

    # The cluster mode's etcd server gets a namespace of its own; it runs
    # only when asked (--etcd): a configuration with [cluster] endpoints =
    # ["http://10.99.30.1:2379"] uses it.
    local ens=$PREFIX-etcd
    ip netns add "$ens"
    attach etcd "$ens" eth0
    ip -n "$ens" link set lo up
    ip -n "$ens" link set eth0 up
    ip -n "$ens" addr add $ETCD_IP/16 dev eth0
    if [ "$ETCD" = yes ]; then
        mkdir -p "$STATE/etcd"
        detached ip netns exec "$ens" etcd --name "$PREFIX" --data-dir "$STATE/etcd/data" \
            --listen-client-urls "http://$ETCD_IP:2379" --advertise-client-urls "http://$ETCD_IP:2379" \
            --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
            --initial-cluster "$PREFIX=http://127.0.0.1:2380" \
            </dev/null >"$STATE/etcd/etcd.log" 2>&1
    fi
}

status() {
    if ! ns_exists "$NS_SW"; then
        echo "testbed down"
        return 1
    fi
    for ns in $(ip netns list | awk '{print $1}' | grep "^$PREFIX-" | sort); do
        printf '%-8s' "$ns"
        ip -n "$ns" -br addr show 2>/dev/null | grep -v '^lo ' | awk '{printf " %s %s %s", $1, $2, $3}'
        echo
    done
    if [ -S "$STATE/r1/bird.ctl" ]; then
        echo "BGP sessions of the router (pd-r1):"
        birdc -s "$STATE/r1/bird.ctl" show protocols | sed 's/^/  /'
        echo "the router's route to the VIP (its next hops: the instances announcing it):"
        ip -n "$PREFIX-r1" route show $VIP | sed 's/^/  /'
    fi
}

if [ "$(realpath -m -- "$STATE")" = / ]; then
    echo "testbed: PD_TESTBED_STATE must not be /" >&2
    exit 2
fi

cmd=${1:-}
[ $# -gt 0 ] && shift
while [ $# -gt 0 ]; do
    case "$1" in
        --instances)
            INSTANCES=${2:-}
            [[ "$INSTANCES" =~ ^[1-9]$ ]] || { echo "testbed: --instances takes 1 to 9" >&2; exit 2; }
            shift 2 ;;
        --etcd) ETCD=yes; shift ;;
        *) echo "testbed: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ "$ETCD" = yes ] && [ "$INSTANCES" -lt 2 ]; then
    echo "testbed: --etcd shares affinities between instances: give --instances 2 or more" >&2
    exit 2
fi

case "$cmd" in
    up) up ;;
    down) down; echo "testbed down" ;;
    status) status ;;
    *) echo "usage: $0 up [--instances N] [--etcd] | down | status" >&2; exit 2 ;;
esac
