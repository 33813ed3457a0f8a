#!/usr/bin/env bash
# Binds NIC ports to a DPDK driver (vfio-pci) for pktdist, and gives them back.
# Wraps dpdk-devbind.py from Debian's `dpdk` package.
#
#   bind-nic.sh [--dry-run] bind PCI_ADDR... [--driver vfio-pci] [--noiommu]
#   bind-nic.sh [--dry-run] unbind PCI_ADDR... [--driver KERNEL_DRIVER]
#   bind-nic.sh status [PCI_ADDR...]
#
# bind     loads the driver, records each port's kernel driver in
#          /run/pktdist/bind-<pci>.orig (its interface and MAC in .iface)
#          and binds the port to --driver (default vfio-pci). A port whose
#          interface carries routes is refused: that is how you lose the SSH
#          session.
# unbind   binds each port back to its recorded kernel driver (or --driver).
# status   dpdk-devbind.py --status-dev net, plus IOMMU, NUMA node and the
#          recorded driver of the given ports.
# --dry-run   print what would run, change nothing (works without root).
# --noiommu   allow vfio-pci without an IOMMU (unsafe no-IOMMU mode).
#
# PCI addresses: 0000:3b:00.0 or 3b:00.0. Environment: DPDK_DEVBIND overrides
# the dpdk-devbind.py path; PKTDIST_RUN_DIR (default /run/pktdist) where the
# original drivers are recorded.
set -euo pipefail

prog=$(basename "$0")
RUN_DIR=${PKTDIST_RUN_DIR:-/run/pktdist}
PCI_SYS=/sys/bus/pci/devices

usage() {
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
}

die() {
    echo "$prog: error: $*" >&2
    exit 1
}

warn() {
    echo "$prog: warning: $*" >&2
}

dry_run=0
noiommu=0
driver=""
action=""
devices=()

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run | -n) dry_run=1 ;;
        --noiommu) noiommu=1 ;;
        --driver)
            [ $# -ge 2 ] || die "--driver needs a driver name"
            driver=$2
            shift
            ;;
        --driver=*) driver=${1#*=} ;;
        -h | --help)
            usage
            exit 0
            ;;
        bind | unbind | status)
            [ -z "$action" ] || die "one action at a time ('$action' and '$1')"
            action=$1
            ;;
        -*)
            usage >&2
            die "unknown option '$1'"
            ;;
        *) devices+=("$1") ;;
    esac
    shift
done

[ -n "$action" ] || {
    usage >&2
    die "give an action: bind, unbind or status"
}

# dpdk-devbind.py: explicit override, Debian's path, then PATH.
find_devbind() {
    if [ -n "${DPDK_DEVBIND:-}" ]; then
        [ -x "$DPDK_DEVBIND" ] || die "DPDK_DEVBIND=$DPDK_DEVBIND is not executable"
        echo "$DPDK_DEVBIND"
    elif [ -x /usr/bin/dpdk-devbind.py ]; then
        echo /usr/bin/dpdk-devbind.py
    elif command -v dpdk-devbind.py >/dev/null 2>&1; then
        command -v dpdk-devbind.py
    else
        die "dpdk-devbind.py not found: install Debian's dpdk package (apt-get install dpdk)"
    fi
}
DEVBIND=$(find_devbind)

# Canonical 0000:bb:dd.f form, lower case; empty when malformed.
normalize_pci() {
    local a
    a=$(echo "$1" | tr 'A-F' 'a-f')
    if [[ $a =~ ^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$ ]]; then
        echo "$a"
    elif [[ $a =~ ^[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$ ]]; then
        echo "0000:$a"
    fi
}

pcis=()
for d in "${devices[@]+"${devices[@]}"}"; do
    p=$(normalize_pci "$d")
    [ -n "$p" ] || die "'$d' is not a PCI address (want 0000:3b:00.0 or 3b:00.0)"
    pcis+=("$p")
done

current_driver() {
    local link=$PCI_SYS/$1/driver
    if [ -L "$link" ]; then basename "$(readlink -f "$link")"; else echo none; fi
}

# Kernel network interfaces of a port (none once a DPDK driver owns it).
# Found from /sys/class/net because some drivers hang the interface deeper
# than <pci>/net (virtio: <pci>/virtio0/net/eth0).
interfaces() {
    local n path
    for n in /sys/class/net/*; do
        [ -e "$n/device" ] || continue
        path=$(readlink -f "$n")
        case "$path" in */"$1"/*) basename "$n" ;; esac
    done
    return 0
}

# Prints text with each line prefixed.
indent() {
    local prefix=$1 line
    while IFS= read -r line; do printf '%s%s\n' "$prefix" "$line"; done <<<"$2"
}

# IPv4 routes through an interface, with dpdk-devbind.py's rule (169.254/16
# ignored), plus global IPv6 routes.
routes_via() {
    {
        ip -o route show dev "$1" 2>/dev/null | grep -v '^169\.254\.' || true
        ip -o -6 route show dev "$1" 2>/dev/null | grep -Ev '^(fe80|ff00|multicast)' || true
    } | sed '/^$/d'
}

is_dpdk_driver() {
    case "$1" in vfio-pci | uio_pci_generic | igb_uio) return 0 ;; *) return 1 ;; esac
}

iommu_groups_present() {
    [ -d /sys/kernel/iommu_groups ] && [ -n "$(ls -A /sys/kernel/iommu_groups 2>/dev/null)" ]
}

noiommu_enabled() {
    [ "$(cat /sys/module/vfio/parameters/enable_unsafe_noiommu_mode 2>/dev/null || echo N)" = Y ]
}

orig_file() {
    echo "$RUN_DIR/bind-$1.orig"
}

iface_file() {
    echo "$RUN_DIR/bind-$1.iface"
}

run() {
    if [ "$dry_run" -eq 1 ]; then
        echo "[dry-run] $*"
    else
        echo "+ $*"
        "$@"
    fi
}

# Runs dpdk-devbind.py; fails when it printed a warning or error, which it
# does with exit status 0 when it skips an active interface.
devbind() {
    if [ "$dry_run" -eq 1 ]; then
        echo "[dry-run] $DEVBIND $*"
        return 0
    fi
    echo "+ $DEVBIND $*"
    local out rc=0
    out=$("$DEVBIND" "$@" 2>&1) || rc=$?
    [ -z "$out" ] || indent "  dpdk-devbind: " "$out"
    if [ "$rc" -ne 0 ] || echo "$out" | grep -qE '^(Warning|Error)'; then
        return 1
    fi
    return 0
}

show_port() {
    local p=$1 drv grp numa ifs orig
    if [ ! -e "$PCI_SYS/$p" ]; then
        echo "  $p: no such PCI device on this machine"
        return 0
    fi
    drv=$(current_driver "$p")
    grp=-
    [ -L "$PCI_SYS/$p/iommu_group" ] && grp=$(basename "$(readlink -f "$PCI_SYS/$p/iommu_group")")
    numa=$(cat "$PCI_SYS/$p/numa_node" 2>/dev/null || echo "?")
    ifs=$(interfaces "$p" | paste -sd, -)
    orig=$(cat "$(orig_file "$p")" 2>/dev/null || echo "-")
    echo "  $p: driver=$drv numa_node=$numa iommu_group=$grp interfaces=${ifs:--} recorded_kernel_driver=$orig"
    if [ -r "$(iface_file "$p")" ]; then
        echo "    before binding: $(paste -sd, "$(iface_file "$p")") (interface MAC)"
    fi
}

iommu_summary() {
    if iommu_groups_present; then
        echo "IOMMU: on ($(find /sys/kernel/iommu_groups -mindepth 1 -maxdepth 1 | wc -l) groups)"
    elif noiommu_enabled; then
        echo "IOMMU: none; vfio unsafe no-IOMMU mode is ON (no DMA isolation)"
    else
        echo "IOMMU: none (no groups in /sys/kernel/iommu_groups): vfio-pci cannot be used as is"
    fi
}

explain_no_iommu() {
    cat >&2 <<EOF
$prog: error: no IOMMU groups (/sys/kernel/iommu_groups is empty), so vfio-pci has
  nothing to attach the port to. Either
  - turn the IOMMU on (recommended): enable VT-d (Intel) or AMD-Vi/IOMMU in the
    BIOS, add "intel_iommu=on iommu=pt" (Intel) or "amd_iommu=on iommu=pt" (AMD)
    to the kernel command line, reboot; or
  - accept vfio's unsafe no-IOMMU mode (no DMA isolation: the NIC can write any
    memory; taints the kernel; for labs and VMs without a vIOMMU). Re-run with
    --noiommu, which does:
        modprobe vfio enable_unsafe_noiommu_mode=1
        echo 1 > /sys/module/vfio/parameters/enable_unsafe_noiommu_mode
EOF
    exit 1
}

# Loads a kernel module unless it is loaded or built in.
load_module() {
    local mod=$1 sysname=${1//-/_}
    shift
    [ -d "/sys/module/$sysname" ] && return 0
    if ! command -v modprobe >/dev/null 2>&1 && [ "$dry_run" -eq 0 ]; then
        die "modprobe not found (apt-get install kmod) and module $mod is not loaded"
    fi
    run modprobe "$mod" "$@"
}

do_status() {
    "$DEVBIND" --status-dev net
    echo
    iommu_summary
    if [ ${#pcis[@]} -gt 0 ]; then
        echo "Ports:"
        for p in "${pcis[@]}"; do show_port "$p"; done
    fi
    local f p
    for f in "$RUN_DIR"/bind-*.orig; do
        [ -e "$f" ] || continue
        p=$(basename "$f" .orig)
        p=${p#bind-}
        echo "Recorded: $p was on $(cat "$f")$([ -r "$(iface_file "$p")" ] && echo " as $(paste -sd, "$(iface_file "$p")")")"
    done
}

# Refuses a port whose kernel interface carries routes (the same rule as
# dpdk-devbind.py, which would skip it with only a warning).
check_not_in_use() {
    local p=$1 ifc r state
    for ifc in $(interfaces "$p"); do
        r=$(routes_via "$ifc")
        if [ -n "$r" ]; then
            state=$(cat "/sys/class/net/$ifc/operstate" 2>/dev/null || echo unknown)
            {
                echo "$prog: error: $p is interface $ifc (state $state) and the routing table uses it:"
                indent "    " "$r"
                echo "  Moving it to DPDK would cut whatever goes through it (an SSH session, say)."
                echo "  If that is intended, take it out of use first:"
                echo "    ip addr flush dev $ifc && ip link set $ifc down"
            } >&2
            return 1
        fi
    done
    return 0
}

do_bind() {
    local target=${driver:-vfio-pci} p cur f ifc ifinfo failed=0
    [ ${#pcis[@]} -gt 0 ] || die "bind needs at least one PCI address"

    # Check every port before changing anything.
    for p in "${pcis[@]}"; do
        if [ ! -e "$PCI_SYS/$p" ]; then
            [ "$dry_run" -eq 1 ] || die "no PCI device $p on this machine (see: $prog status)"
            warn "no PCI device $p on this machine; showing what would run"
            continue
        fi
        check_not_in_use "$p" || exit 1
    done

    if [ "$dry_run" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
        die "must run as root to bind ports (try: sudo $0 ... or --dry-run)"
    fi

    if [ "$target" = vfio-pci ]; then
        if ! iommu_groups_present; then
            if [ "$noiommu" -eq 1 ]; then
                warn "no IOMMU: using vfio's unsafe no-IOMMU mode (no DMA isolation)"
                load_module vfio enable_unsafe_noiommu_mode=1
                if [ "$dry_run" -eq 1 ]; then
                    echo "[dry-run] echo 1 > /sys/module/vfio/parameters/enable_unsafe_noiommu_mode"
                else
                    echo "+ echo 1 > /sys/module/vfio/parameters/enable_unsafe_noiommu_mode"
                    echo 1 >/sys/module/vfio/parameters/enable_unsafe_noiommu_mode
                fi
            elif [ "$dry_run" -eq 1 ]; then
                warn "no IOMMU groups here: a real run would stop and explain (or use --noiommu)"
            else
                explain_no_iommu
            fi
        fi
        load_module vfio-pci
    else
        load_module "$target"
    fi

    run mkdir -p "$RUN_DIR"
    for p in "${pcis[@]}"; do
        cur=$(current_driver "$p")
        f=$(orig_file "$p")
        if [ "$cur" = "$target" ]; then
            echo "$p is already bound to $target"
            continue
        fi
        # Remember the kernel driver so that unbind can restore it, and the
        # interface name and MAC, which pktgen and the router need and which
        # vanish from the kernel's view once DPDK owns the port. A port moved
        # between DPDK drivers keeps its first record.
        if [ "$cur" != none ] && ! is_dpdk_driver "$cur"; then
            ifinfo=""
            for ifc in $(interfaces "$p"); do
                ifinfo="$ifinfo$ifc $(cat "/sys/class/net/$ifc/address" 2>/dev/null || echo '?')"$'\n'
            done
            if [ "$dry_run" -eq 1 ]; then
                echo "[dry-run] echo $cur > $f"
                [ -z "$ifinfo" ] || echo "[dry-run] record interface and MAC: ${ifinfo%$'\n'} > $(iface_file "$p")"
            else
                echo "+ echo $cur > $f"
                echo "$cur" >"$f"
                [ -z "$ifinfo" ] || printf '%s' "$ifinfo" >"$(iface_file "$p")"
            fi
        fi
        if ! devbind -b "$target" "$p"; then
            echo "$prog: error: dpdk-devbind.py did not bind $p to $target (its message is above)" >&2
            failed=1
            continue
        fi
        if [ "$dry_run" -eq 0 ]; then
            cur=$(current_driver "$p")
            if [ "$cur" != "$target" ]; then
                echo "$prog: error: $p is on driver '$cur' after binding, not $target" >&2
                failed=1
                continue
            fi
            show_port "$p"
            check_group "$p" "$target"
        fi
    done
    return "$failed"
}

# vfio hands out whole IOMMU groups: every other device in the port's group
# must be unbound or on vfio-pci too, or DPDK fails to open the group.
check_group() {
    local p=$1 target=$2 g other od
    [ "$target" = vfio-pci ] || return 0
    [ -d "$PCI_SYS/$p/iommu_group/devices" ] || return 0
    for g in "$PCI_SYS/$p/iommu_group/devices"/*; do
        other=$(basename "$g")
        [ "$other" = "$p" ] && continue
        od=$(current_driver "$other")
        case "$od" in
            none | vfio-pci | pcieport) ;;
            *) warn "$other shares IOMMU group with $p and is on $od: DPDK cannot open the group until it is bound to vfio-pci or unbound" ;;
        esac
    done
}

do_unbind() {
    local p cur target f ok failed=0
    [ ${#pcis[@]} -gt 0 ] || die "unbind needs at least one PCI address"
    if [ "$dry_run" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
        die "must run as root to unbind ports (try: sudo $0 ... or --dry-run)"
    fi
    for p in "${pcis[@]}"; do
        f=$(orig_file "$p")
        if [ -n "$driver" ]; then
            target=$driver
        elif [ -r "$f" ]; then
            target=$(cat "$f")
        else
            echo "$prog: error: no record of $p's kernel driver ($f); give it with --driver (e.g. ixgbe, i40e, ice, mlx5_core), or --driver none to leave it unbound" >&2
            failed=1
            continue
        fi
        if [ ! -e "$PCI_SYS/$p" ]; then
            if [ "$dry_run" -eq 0 ]; then
                echo "$prog: error: no PCI device $p on this machine" >&2
                failed=1
                continue
            fi
            warn "no PCI device $p on this machine; showing what would run"
        fi
        cur=$(current_driver "$p")
        ok=1
        if [ "$cur" = "$target" ]; then
            echo "$p is already on $target"
        elif [ "$target" = none ]; then
            devbind -u "$p" || ok=0
        else
            load_module "$target"
            devbind -b "$target" "$p" || ok=0
        fi
        if [ "$ok" -eq 1 ]; then
            [ ! -e "$f" ] || run rm -f "$f"
            [ ! -e "$(iface_file "$p")" ] || run rm -f "$(iface_file "$p")"
            [ "$dry_run" -eq 1 ] || show_port "$p"
        else
            echo "$prog: error: dpdk-devbind.py did not move $p to $target (its message is above)" >&2
            failed=1
        fi
    done
    return "$failed"
}

case "$action" in
    status) do_status ;;
    bind) do_bind ;;
    unbind) do_unbind ;;
esac
