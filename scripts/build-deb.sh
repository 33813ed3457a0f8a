#!/usr/bin/env bash
# Builds the Debian package with cargo-deb: the release binary, its man
# pages and bash/zsh completions (generated from the command line's own
# definition), /etc/pktdist/pktdist.toml (a conffile) and the systemd unit.
# Prints the path of the .deb. Needs cargo-deb (`cargo install cargo-deb`;
# scripts/install-deps.sh installs it) and dpkg-dev.
#
#   scripts/build-deb.sh            build the binary, then the package
#   scripts/build-deb.sh --no-build package the binary already built
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: $0 [--no-build]" >&2; exit 2; }
build=1
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        -h | --help) echo "usage: $0 [--no-build]"; exit 0 ;;
        *) echo "build-deb: unknown argument '$arg'" >&2; usage ;;
    esac
done

if [ "$build" = 1 ]; then
    cargo build --release --bin pktdist
fi
bin=target/release/pktdist
[ -x "$bin" ] || { echo "build-deb: $bin missing (build it or drop --no-build)" >&2; exit 1; }

assets=target/assets
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
"$bin" generate man "$assets/man"
gzip -9n "$assets"/man/*.1
"$bin" generate completions bash >"$assets/completions/pktdist"
"$bin" generate completions zsh >"$assets/completions/_pktdist"

out=$(cargo deb --no-build --no-strip 2>&1) || { echo "$out" >&2; exit 1; }
echo "$out" | tail -n 1
