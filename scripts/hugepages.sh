#!/usr/bin/env bash
# Reserves (or releases) hugepages for pktdist/DPDK and mounts hugetlbfs.
#
#   hugepages.sh [--dry-run] [--pages N] [--size 2M|1G] [--node N|all]
#   hugepages.sh status
#
# --pages N    pages to hold on each selected NUMA node (0 releases them)
# --size       page size: 2M (default) or 1G
# --node       a NUMA node number, or "all" (default): N pages on every node.
#              Without per-node sysfs (no NUMA), N is the system-wide count.
# --dry-run    print the commands, change nothing (works without root)
#
# Reservations made here last until reboot; docs/real-nic.md shows how to
# make them permanent (kernel command line, or sysctl for 2M pages).
set -euo pipefail

prog=$(basename "$0")
MM=/sys/kernel/mm/hugepages
NODES=/sys/devices/system/node
MOUNT_DIR=/dev/hugepages

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
}

die() {
    echo "$prog: error: $*" >&2
    exit 1
}

dry_run=0
pages=""
size=2M
node=all
cmd=reserve

while [ $# -gt 0 ]; do
    case "$1" in
        status) cmd=status ;;
        --dry-run | -n) dry_run=1 ;;
        --pages)
            [ $# -ge 2 ] || die "--pages needs a number"
            pages=$2
            shift
            ;;
        --pages=*) pages=${1#*=} ;;
        --size)
            [ $# -ge 2 ] || die "--size needs 2M or 1G"
            size=$2
            shift
            ;;
        --size=*) size=${1#*=} ;;
        --node)
            [ $# -ge 2 ] || die "--node needs a node number or 'all'"
            node=$2
            shift
            ;;
        --node=*) node=${1#*=} ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            die "unknown argument '$1'"
            ;;
    esac
    shift
done

case "$size" in
    2M | 2m | 2048k | 2048kB) size=2M kb=2048 ;;
    1G | 1g | 1048576k | 1048576kB) size=1G kb=1048576 ;;
    *) die "--size must be 2M or 1G, not '$size'" ;;
esac

# Value of a sysfs file, or "-" when it cannot be read.
val() {
    if [ -r "$1" ]; then cat "$1"; else echo "-"; fi
}

# hugetlbfs mount points, one "dir pagesize" per line. A mount without a
# pagesize option uses the default hugepage size.
hugetlbfs_mounts() {
    local def
    def=$(awk '/^Hugepagesize:/ {print $2}' /proc/meminfo 2>/dev/null || true)
    awk -v def="${def:-2048}" '$3 == "hugetlbfs" {
        ps = ""
        n = split($4, o, ",")
        for (i = 1; i <= n; i++) if (o[i] ~ /^pagesize=/) ps = substr(o[i], 10)
        if (ps == "") ps = (def / 1024) "M"
        if (ps == "1024M") ps = "1G"
        print $2, ps
    }' /proc/mounts
}

# The non-empty files on the hugetlbfs mounts for this page size, one a
# line with its size. Each holds its pages until it is removed, also after
# the process that made it is gone: DPDK keeps its map files (<file
# prefix>map_<n>), so a pktdist, testpmd or pktgen killed by SIGKILL (or by
# a service manager's stop timeout) leaves them behind.
hugetlbfs_files() {
    local dir ps
    while read -r dir ps; do
        [ -n "$dir" ] && [ "$ps" = "$size" ] || continue
        find "$dir" -xdev -type f -size +0c -printf '%p (%s bytes)\n' 2>/dev/null || true
    done < <(hugetlbfs_mounts)
}

# NUMA nodes that have hugepage counters for this page size.
numa_nodes() {
    local d
    for d in "$NODES"/node[0-9]*; do
        [ -d "$d/hugepages/hugepages-${kb}kB" ] && echo "${d##*/node}"
    done
    return 0
}

show_status() {
    local d sz n
    echo "Hugepages (from $MM):"
    if [ ! -d "$MM" ]; then
        echo "  none: this kernel has no hugetlbfs support (CONFIG_HUGETLBFS)"
        return 0
    fi
    printf '  %-6s %8s %8s %8s %8s\n' size total free reserved surplus
    for d in "$MM"/hugepages-*kB; do
        [ -d "$d" ] || continue
        sz=${d##*/hugepages-}
        sz=${sz%kB}
        if [ "$sz" -ge 1048576 ]; then sz="$((sz / 1048576))G"; else sz="$((sz / 1024))M"; fi
        printf '  %-6s %8s %8s %8s %8s\n' "$sz" "$(val "$d/nr_hugepages")" \
            "$(val "$d/free_hugepages")" "$(val "$d/resv_hugepages")" "$(val "$d/surplus_hugepages")"
    done
    if compgen -G "$NODES/node[0-9]*/hugepages" >/dev/null; then
        echo "Per NUMA node:"
        printf '  %-6s %-6s %8s %8s\n' node size total free
        for n in "$NODES"/node[0-9]*; do
            for d in "$n"/hugepages/hugepages-*kB; do
                [ -d "$d" ] || continue
                sz=${d##*/hugepages-}
                sz=${sz%kB}
                if [ "$sz" -ge 1048576 ]; then sz="$((sz / 1048576))G"; else sz="$((sz / 1024))M"; fi
                printf '  %-6s %-6s %8s %8s\n' "${n##*/node}" "$sz" "$(val "$d/nr_hugepages")" "$(val "$d/free_hugepages")"
            done
        done
    fi
    echo "hugetlbfs mounts:"
    local mounts
    mounts=$(hugetlbfs_mounts)
    if [ -n "$mounts" ]; then
        echo "$mounts" | while read -r dir ps; do echo "  $dir (pagesize $ps)"; done
    else
        echo "  none (DPDK needs one per page size it uses)"
    fi
    local cmdline
    cmdline=$(tr ' ' '\n' </proc/cmdline 2>/dev/null | grep -E '^(default_hugepagesz|hugepagesz|hugepages)=' | tr '\n' ' ' || true)
    echo "Kernel command line: ${cmdline:-no hugepage parameters}"
    echo "sysctl vm.nr_hugepages: $(val /proc/sys/vm/nr_hugepages)"
}

if [ "$cmd" = status ]; then
    show_status
    exit 0
fi

[ -n "$pages" ] || {
    usage >&2
    die "give --pages N (or the 'status' subcommand)"
}
case "$pages" in
    '' | *[!0-9]*) die "--pages must be a non-negative integer, not '$pages'" ;;
esac
# At most nine digits after leading zeros: beyond, shell arithmetic could
# wrap (18446744073709551616 would read as 0, releasing every page).
digits=$(echo "$pages" | sed 's/^0*//')
[ ${#digits} -le 9 ] || die "--pages $pages is more pages than any machine has"
pages=$((10#$pages))

[ -d "$MM" ] || die "$MM is missing: this kernel has no hugetlbfs support"
[ -d "$MM/hugepages-${kb}kB" ] ||
    die "the kernel offers no $size pages ($MM/hugepages-${kb}kB is missing); for 1G the CPU needs the pdpe1gb flag"

mapfile -t all_nodes < <(numa_nodes)
targets=()  # sysfs files to write
labels=()
if [ "$node" = all ]; then
    if [ ${#all_nodes[@]} -gt 0 ]; then
        for n in "${all_nodes[@]}"; do
            targets+=("$NODES/node$n/hugepages/hugepages-${kb}kB/nr_hugepages")
            labels+=("node $n")
        done
    else
        targets+=("$MM/hugepages-${kb}kB/nr_hugepages")
        labels+=("system")
    fi
else
    case "$node" in
        '' | *[!0-9]*) die "--node must be a node number or 'all', not '$node'" ;;
    esac
    f="$NODES/node$node/hugepages/hugepages-${kb}kB/nr_hugepages"
    [ -e "$f" ] || die "NUMA node $node has no $size hugepage counters (nodes here: ${all_nodes[*]:-none})"
    targets+=("$f")
    labels+=("node $node")
fi

if [ "$dry_run" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
    die "must run as root to change hugepages (try: sudo $0 ... or --dry-run)"
fi

# Runs a command, or only prints it in dry-run mode.
run() {
    if [ "$dry_run" -eq 1 ]; then
        echo "[dry-run] $*"
    else
        echo "+ $*"
        "$@"
    fi
}

# Writes a value into a sysfs file (printed as the equivalent shell command).
write_sysfs() {
    local value=$1 file=$2
    if [ "$dry_run" -eq 1 ]; then
        echo "[dry-run] echo $value > $file"
        return 0
    fi
    echo "+ echo $value > $file"
    # The kernel may refuse part of the request without an error; the caller
    # reads the count back. A hard error (EINVAL, EBUSY) lands here, its
    # message caught in a variable (no file in /tmp to be raced for).
    local err
    if ! err=$( { echo "$value" >"$file"; } 2>&1); then
        die "the kernel refused '$value' for $file: ${err:-write failed}"
    fi
}

echo "$prog: $([ "$dry_run" -eq 1 ] && echo "would set" || echo "setting") $size hugepages to $pages on ${labels[*]}"
short=0
for i in "${!targets[@]}"; do
    f=${targets[$i]}
    before=$(val "$f")
    if [ "$before" = "$pages" ]; then
        echo "  ${labels[$i]}: already $pages"
        continue
    fi
    write_sysfs "$pages" "$f"
    if [ "$dry_run" -eq 1 ]; then
        echo "  ${labels[$i]}: $before -> $pages (if the kernel has the memory)"
    else
        got=$(val "$f")
        if [ "$got" != "$pages" ]; then
            echo "$prog: error: ${labels[$i]}: asked for $pages $size pages, the kernel gave $got (was $before)" >&2
            if [ "$got" != "-" ] && [ "$got" -lt "$pages" ]; then
                echo "  free memory is short or too fragmented for $size pages; reserve them at boot instead" >&2
                echo "  (kernel command line: hugepagesz=$size hugepages=$pages, see docs/real-nic.md)" >&2
            else
                echo "  pages still in use cannot be released until their users exit" >&2
                files=$(hugetlbfs_files)
                if [ -n "$files" ]; then
                    echo "  these files on hugetlbfs hold pages (a DPDK process killed without cleaning up leaves its *map_* files):" >&2
                    echo "$files" | sed 's/^/    /' >&2
                    echo "  remove those no process uses ('fuser -v FILE' prints nothing), then run this again (docs/real-nic.md, Undo)" >&2
                fi
            fi
            short=1
        else
            echo "  ${labels[$i]}: $before -> $got"
        fi
    fi
done

# Mount hugetlbfs for this page size when reserving and none is mounted.
if [ "$pages" -gt 0 ]; then
    have=""
    while read -r dir ps; do
        [ -n "$dir" ] || continue
        if [ "$ps" = "$size" ]; then
            have=$dir
            break
        fi
    done < <(hugetlbfs_mounts)
    if [ -n "$have" ]; then
        echo "hugetlbfs for $size pages is mounted at $have"
    else
        dir=$MOUNT_DIR
        # /dev/hugepages may already hold a mount for the other page size.
        if hugetlbfs_mounts | awk '{print $1}' | grep -qx "$dir"; then
            dir="$MOUNT_DIR-$size"
        fi
        [ -d "$dir" ] || run mkdir -p "$dir"
        run mount -t hugetlbfs -o "pagesize=$size" nodev "$dir"
    fi
fi

if [ "$dry_run" -eq 0 ]; then
    echo
    show_status
fi
if [ "$short" -ne 0 ]; then
    exit 2
fi
