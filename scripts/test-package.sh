#!/usr/bin/env bash
# Tests the Debian package: builds it from the release binary already built
# (scripts/build-deb.sh --no-build), unpacks it into a scratch root with
# dpkg-deb -x, and checks what an operator gets: the files in their places,
# the conffile, the dependencies (the EAL plugins and NIC drivers too), the
# state directory, the installed binary checking the installed
# configuration, the man pages, the completions, and the systemd unit
# passing `systemd-analyze verify`. Run by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "test-package: $*" >&2; exit 1; }

deb=$(scripts/build-deb.sh --no-build)
[ -f "$deb" ] || fail "no package built ($deb)"
root=$(mktemp -d /tmp/pktdist-deb-XXXXXX)
trap 'rm -rf "$root"' EXIT
dpkg-deb -x "$deb" "$root/fs"
dpkg-deb -e "$deb" "$root/control"

for f in usr/bin/pktdist etc/pktdist/pktdist.toml lib/systemd/system/pktdist.service \
    usr/share/man/man1/pktdist.1.gz usr/share/man/man1/pktdist-run.1.gz \
    usr/share/man/man1/pktdist-affinity-add.1.gz usr/share/man/man1/pktdist-backend-list.1.gz \
    usr/share/bash-completion/completions/pktdist usr/share/zsh/vendor-completions/_pktdist \
    usr/share/doc/pktdist/README.md usr/share/doc/pktdist/PROTOCOL.md \
    usr/share/doc/pktdist/examples/demo.toml \
    usr/share/doc/pktdist/examples/prometheus/pktdist-rules.yml \
    usr/share/doc/pktdist/cluster.md usr/share/doc/pktdist/examples/bgp/pktdist-bgp.sh \
    usr/share/doc/pktdist/examples/bgp/distributor.conf; do
    # cargo-deb may put the unit under /usr/lib/systemd (merged /usr).
    if [ ! -e "$root/fs/$f" ] && [ ! -e "$root/fs/usr/$f" ]; then
        fail "$f missing from $deb"
    fi
done
unit=$root/fs/lib/systemd/system/pktdist.service
[ -e "$unit" ] || unit=$root/fs/usr/lib/systemd/system/pktdist.service

[ -x "$root/fs/usr/share/doc/pktdist/examples/bgp/pktdist-bgp.sh" ] \
    || fail "the BGP announcer example is not executable"
grep -qx /etc/pktdist/pktdist.toml "$root/control/conffiles" \
    || fail "/etc/pktdist/pktdist.toml is not a conffile"
# Depends: the libraries the binary links (dpkg-shlibdeps), and the EAL
# plugins it loads at run time that no ELF dependency names: the PCI and
# vdev buses and the ring mempool driver (the mbuf pool's default ops).
# Recommends: every NIC driver.
depends=$(dpkg-deb -f "$deb" Depends)
recommends=$(dpkg-deb -f "$deb" Recommends)
# The package names of a relationship field, one a line, without versions.
names() { tr ',' '\n' <<<"$1" | sed 's/^ *//; s/[ (].*//'; }
depend_names=$(names "$depends")
for p in librte-eal23 librte-ethdev23 librte-mbuf23 librte-mempool23 \
    librte-bus-pci23 librte-bus-vdev23 librte-mempool-ring23; do
    grep -qx "$p" <<<"$depend_names" || fail "Depends lacks $p: $depends"
done
grep -qx librte-meta-net <<<"$(names "$recommends")" \
    || fail "Recommends lacks librte-meta-net: $recommends"
# The service is installed, not enabled or started: the configuration needs
# editing first.
if grep -q "deb-systemd-invoke start\|systemctl.*enable" "$root/control/postinst"; then
    fail "postinst starts or enables the service"
fi
# An upgrade leaves a running pktdist alone (the operator restarts it);
# removing the package stops it.
if grep -q "deb-systemd-invoke.*restart" "$root/control/postinst"; then
    fail "postinst restarts a running service on upgrade"
fi
[ -f "$root/control/prerm" ] && grep -q "deb-systemd-invoke stop" "$root/control/prerm" \
    || fail "prerm does not stop the service when the package is removed"
grep -q '"$1" = remove' <<<"$(grep -B1 "deb-systemd-invoke stop" "$root/control/prerm")" \
    || fail "prerm stops the service on upgrade too"

# The configuration keeps requested affinities in /var/lib/pktdist, which
# postinst makes and the unit's StateDirectory= keeps.
grep -qx 'state_file = "/var/lib/pktdist/affinities.state"' "$root/fs/etc/pktdist/pktdist.toml" \
    || fail "the configuration sets no state file in /var/lib/pktdist"
grep -q "install -d -m 0750 /var/lib/pktdist" "$root/control/postinst" \
    || fail "postinst does not make /var/lib/pktdist"
grep -qx "StateDirectory=pktdist" "$unit" || fail "the unit has no StateDirectory=pktdist"
# systemd must not kill pktdist during the longest [control] stop_delay the
# configuration accepts (MAX_STOP_DELAY) or the stop and state-file write
# after it.
max_delay=$(sed -n 's/^pub const MAX_STOP_DELAY: Duration = Duration::from_secs(\([0-9]*\));$/\1/p' src/config/mod.rs)
stop_timeout=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)$/\1/p' "$unit")
[ -n "$max_delay" ] || fail "no MAX_STOP_DELAY in seconds in src/config/mod.rs"
[ -n "$stop_timeout" ] && [ "$stop_timeout" -ge $((max_delay + 30)) ] \
    || fail "the unit's TimeoutStopSec (${stop_timeout:-none}) is not at least the longest stop_delay ($max_delay s) plus 30 s"

bin=$root/fs/usr/bin/pktdist
"$bin" --version | grep -q "^pktdist " || fail "pktdist --version"
# `check` on the installed configuration, its state directory made in the
# scratch root as postinst makes it on a system.
mkdir -p "$root/fs/var/lib/pktdist"
sed "s#/var/lib/pktdist#$root/fs/var/lib/pktdist#" "$root/fs/etc/pktdist/pktdist.toml" \
    >"$root/pktdist.toml"
"$bin" check --config "$root/pktdist.toml" >"$root/plan" \
    || fail "the installed binary refuses the installed configuration"
grep -q "services:" "$root/plan" || fail "check printed no plan"
grep -q "state file $root/fs/var/lib/pktdist/affinities.state" "$root/plan" \
    || fail "check names no state file in the state directory"

# Every page renders; `man pktdist` finds the installed one.
for page in "$root"/fs/usr/share/man/man1/*.1.gz; do
    man -l "$page" >/dev/null 2>"$root/man.err" || fail "man -l $page: $(cat "$root/man.err")"
    [ -s "$root/man.err" ] && fail "man -l $page warns: $(cat "$root/man.err")"
done
MANPATH=$root/fs/usr/share/man man -w pktdist | grep -q "$root" || fail "man pktdist"

# The bash completion registers itself and completes subcommands.
words=$(bash -c "source '$root/fs/usr/share/bash-completion/completions/pktdist'
    COMP_WORDS=(pktdist aff); COMP_CWORD=1; COMP_LINE='pktdist aff'; COMP_POINT=11
    _pktdist pktdist aff pktdist; echo \"\${COMPREPLY[@]}\"")
[ "$words" = "affinity" ] || fail "bash completion of 'pktdist aff' gave '$words'"
grep -q "^#compdef pktdist" "$root/fs/usr/share/zsh/vendor-completions/_pktdist" \
    || fail "zsh completion"

# systemd-analyze verify, with the unit's binary pointed into the scratch
# root and the man pages there (it checks Documentation= too). Any message
# is a failure: it warns about unknown keys without failing.
sed "s#/usr/bin/pktdist#$bin#g" "$unit" >"$root/pktdist.service"
out=$(MANPATH=$root/fs/usr/share/man systemd-analyze verify "$root/pktdist.service" 2>&1) \
    || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify: $out"

echo "test-package: $(basename "$deb"): $(dpkg-deb -c "$deb" | wc -l) entries, unit verified, check passes on the installed configuration"
