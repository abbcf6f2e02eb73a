#!/bin/sh
# Builds the Debian package of skybridge from a built binary, with cargo-deb:
#
#   packaging/build-deb.sh [BINARY [OUT_DIR]]
#
# BINARY defaults to target/release/skybridge, OUT_DIR to target/debian.
# What goes in the package is `[package.metadata.deb]` in
# crates/skybridge-cli/Cargo.toml: /usr/bin/skybridge, its manual pages,
# bash/zsh/fish completions, the agent's systemd unit (installed disabled:
# write /etc/skybridge/cluster.yaml, then `systemctl enable --now
# skybridge-agent`), the copyright file and the maintainer scripts in
# packaging/debian/. The pages, completions and unit are made by BINARY itself
# (`skybridge man`, `skybridge completions`, `skybridge agent unit`), so it
# must run on this machine; they and BINARY are staged in a temporary target
# folder, which `cargo deb --no-build` packages. The version and architecture
# are BINARY's. DEB_COMPRESSION: xz (the default), gzip, or none for the
# quickest cargo-deb offers (gzip -1: it always compresses). Prints the path
# of the .deb.
set -eu
umask 022

here=$(cd "$(dirname "$0")/.." && pwd)
binary=${1:-$here/target/release/skybridge}
out=${2:-$here/target/debian}
cargo=${CARGO:-cargo}

die() { echo "build-deb: $*" >&2; exit 1; }
[ -x "$binary" ] || die "$binary: no such executable; build it first (cargo build --release)"
case "${DEB_COMPRESSION:-xz}" in
  xz) compression="--compress-type xz" ;;
  # cargo-deb's own gzip is zopfli: minutes for the debug binary; gzip(1) is not.
  gzip) compression="--compress-type gzip --compress-system" ;;
  none) compression="--compress-type gzip --compress-system --fast" ;;
  *) die "DEB_COMPRESSION=${DEB_COMPRESSION}: cargo-deb writes xz, gzip or (quickest) none" ;;
esac
"$cargo" deb --version >/dev/null 2>&1 ||
  die "needs cargo-deb: cargo install cargo-deb --version 3.8.0 --locked (scripts/test.sh installs it)"
case "$binary" in /*) ;; *) binary=$PWD/$binary ;; esac

# "skybridge 0.1.0 (commit abc, built 2026-01-01, x86_64-unknown-linux-gnu)"
about=$("$binary" version) || die "$binary does not run here: build the package on a machine of its architecture"
version=$(printf '%s\n' "$about" | sed -n 's/^skybridge \([0-9][^ ]*\) .*/\1/p')
target=$(printf '%s\n' "$about" | sed -n 's/.*, \([^,)]*\))$/\1/p')
[ -n "$version" ] && [ -n "$target" ] || die "cannot read the version and target from: $about"

# A dynamically linked binary depends on the glibc it needs ($auto in
# Cargo.toml), which cargo-deb learns from dpkg-shlibdeps; without it the
# package would silently depend on nothing. A static one depends on nothing.
if ldd "$binary" 2>/dev/null | grep -q 'libc\.so'; then
  command -v dpkg-shlibdeps >/dev/null ||
    die "$binary is linked dynamically: needs dpkg-shlibdeps to say which glibc it needs (apt-get install dpkg-dev)"
  variant=
else
  variant="--variant static"
fi

# `target/release/` in the package's assets is this folder's $target/release.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
release=$stage/target/$target/release
mkdir -p "$release/deb/man"
ln -s "$binary" "$release/skybridge"
"$binary" man "$release/deb/man" >/dev/null
gzip -9n "$release"/deb/man/*.1
"$binary" completions bash >"$release/deb/skybridge.bash"
"$binary" completions zsh >"$release/deb/_skybridge"
"$binary" completions fish >"$release/deb/skybridge.fish"
"$binary" agent unit --binary /usr/bin/skybridge >"$release/deb/skybridge-agent.service"

# Written beside OUT_DIR's other files, then renamed: OUT_DIR never holds a
# partial .deb.
mkdir -p "$out"
part=$(mktemp -d "$out/.build-deb.XXXXXX")
trap 'rm -rf "$stage" "$part"' EXIT
# shellcheck disable=SC2086 # $variant and $compression are lists of options
built=$(CARGO_TARGET_DIR=$stage/target "$cargo" deb --no-build --locked \
  --manifest-path "$here/crates/skybridge-cli/Cargo.toml" $variant \
  --target "$target" --deb-version "$version" --no-strip --no-dbgsym \
  $compression --output "$part") || die "cargo deb failed (above)"
[ -f "$built" ] || die "cargo deb printed no .deb: $built"
deb=$out/${built##*/}
mv -f "$built" "$deb"
echo "$deb"
