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
# Usage: scripts/testbed.sh up|down|status
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

ns_exists() { ip netns list | awk '{print $1}' | grep -qx "$1"; }

backend_mac() { printf '02:50:44:00:10:%02x' "$1"; }

down() {
    for ns in $(ip netns list | awk '{print $1}' | grep "^$PREFIX-" || true); do
        # Kill anything still running inside (a crashed test's servers).
        for pid in $(ip netns pids "$ns" 2>/dev/null || true); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    # veth ends left in the root namespace by an interrupted 'up'.
    for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^$PREFIX-" || true); do
        ip link del "$l" 2>/dev/null || true
    done
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
    for tool in ip ethtool; do
        command -v $tool >/dev/null || { echo "testbed: $tool is missing (apt-get install iproute2 ethtool)" >&2; exit 1; }
    done
    down
    command -v modprobe >/dev/null && modprobe ipip 2>/dev/null || true
    ip netns add "$NS_SW"
    ip -n "$NS_SW" link add br0 type bridge
    ip -n "$NS_SW" link set br0 mtu $MTU_WIRE up

    # The distributor's port: DPDK's af_packet PMD takes it over.
    ip netns add "$NS_LB"
    attach lb "$NS_LB" lb0
    ip -n "$NS_LB" link set lb0 address $LB_MAC mtu $MTU_WIRE up
    ip -n "$NS_LB" link set lo up
    # The kernel must not answer or reset what pktdist handles.
    ip netns exec "$NS_LB" sysctl -qw net.ipv6.conf.lb0.disable_ipv6=1
    # The control plane: DPDK owns lb0, so the control thread's UDP socket
    # needs a kernel interface of its own that the backends can reach.
    attach lbctl "$NS_LB" ctl0
    ip -n "$NS_LB" link set ctl0 up
    ip -n "$NS_LB" addr add $CTL_IP/16 dev ctl0

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
        ip -n "$ns" route add $VIP/32 via $LB_IP dev eth0
        ip -n "$ns" neigh replace $LB_IP lladdr $LB_MAC dev eth0 nud permanent
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
    ip -n "$rns" route add $VIP/32 via $LB_IP dev eth0
    ip -n "$rns" neigh replace $LB_IP lladdr $LB_MAC dev eth0 nud permanent
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
        if ip -n "$ns" link add tunl0 type ipip 2>/dev/null || ip -n "$ns" link show tunl0 >/dev/null 2>&1; then
            ip -n "$ns" link set tunl0 up
        fi
        for k in all default eth0 lo; do
            ip netns exec "$ns" sysctl -qw "net.ipv4.conf.$k.rp_filter=0"
        done
        # Replies to the client behind the router go through the router.
        ip -n "$ns" route add $BEHIND_NET via $ROUTER_IP
    done
    echo "testbed up: clients ${CLIENTS[*]} and c3 behind router r1 (link MTU $MTU_NARROW), backends ${BACKENDS[*]}, pktdist port lb0 in $NS_LB"
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
}

case "${1:-}" in
    up) up ;;
    down) down; echo "testbed down" ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
