#!/bin/sh
# Builds a Debian package of skybridge from a built binary:
#
#   packaging/build-deb.sh [BINARY [OUT_DIR]]
#
# BINARY defaults to target/release/skybridge, OUT_DIR to target/debian. The
# package holds /usr/bin/skybridge, its manual pages, bash/zsh/fish
# completions, the agent's systemd unit (installed disabled: write
# /etc/skybridge/cluster.yaml, then `systemctl enable --now skybridge-agent`)
# and the copyright file. The pages, completions and unit are made by BINARY
# itself (`skybridge man`, `skybridge completions`, `skybridge agent unit`),
# so it must run on this machine. DEB_COMPRESSION (xz, gzip, zstd, none;
# default xz) is passed to dpkg-deb -Z. Prints the path of the .deb.
set -eu
umask 022

here=$(cd "$(dirname "$0")/.." && pwd)
binary=${1:-$here/target/release/skybridge}
out=${2:-$here/target/debian}
compression=${DEB_COMPRESSION:-xz}

die() { echo "build-deb: $*" >&2; exit 1; }
command -v dpkg-deb >/dev/null || die "needs dpkg-deb (apt-get install dpkg)"
[ -x "$binary" ] || die "$binary: no such executable; build it first (cargo build --release)"

# "skybridge 0.1.0 (commit abc, built 2026-01-01, x86_64-unknown-linux-gnu)"
about=$("$binary" version) || die "$binary does not run here: build the package on a machine of its architecture"
version=$(printf '%s\n' "$about" | sed -n 's/^skybridge \([0-9][^ ]*\) .*/\1/p')
target=$(printf '%s\n' "$about" | sed -n 's/.*, \([^,)]*\))$/\1/p')
[ -n "$version" ] && [ -n "$target" ] || die "cannot read the version and target from: $about"
case "$target" in
  x86_64-*) arch=amd64 ;;
  aarch64-*) arch=arm64 ;;
  armv7-*|arm-*) arch=armhf ;;
  i686-*|i586-*) arch=i386 ;;
  riscv64*) arch=riscv64 ;;
  powerpc64le-*) arch=ppc64el ;;
  s390x-*) arch=s390x ;;
  *) die "no Debian architecture known for target $target" ;;
esac

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
mkdir -p "$root/DEBIAN"

install -D -m 755 "$binary" "$root/usr/bin/skybridge"
"$binary" man "$root/usr/share/man/man1" >/dev/null
gzip -9n "$root"/usr/share/man/man1/*.1
install -d "$root/usr/share/bash-completion/completions" \
  "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d" \
  "$root/lib/systemd/system" "$root/usr/share/doc/skybridge"
"$binary" completions bash >"$root/usr/share/bash-completion/completions/skybridge"
"$binary" completions zsh >"$root/usr/share/zsh/vendor-completions/_skybridge"
"$binary" completions fish >"$root/usr/share/fish/vendor_completions.d/skybridge.fish"
"$binary" agent unit --binary /usr/bin/skybridge >"$root/lib/systemd/system/skybridge-agent.service"
cat >"$root/usr/share/doc/skybridge/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: skybridge
Source: https://example.invalid/skybridge

Files: *
Copyright: The Skybridge authors
License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
find "$root" -type f -exec chmod go-w {} +
chmod 644 "$root"/usr/share/man/man1/* "$root"/usr/share/*/*/skybridge* \
  "$root"/usr/share/zsh/vendor-completions/_skybridge "$root/lib/systemd/system/skybridge-agent.service" \
  "$root/usr/share/doc/skybridge/copyright"

# The unit is installed, never enabled or started: the node has no cluster
# file yet. Removing the package stops and disables the agent (the network
# stays as it is: `skybridge agent down` takes it down first, if wanted),
# but only when systemd runs the package's unit: a skybridge-agent.service
# in /etc/systemd/system (what `skybridge apply` installs) overrides it, and
# that agent keeps running.
cat >"$root/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
SCRIPT
cat >"$root/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
  fragment=$(systemctl show --property=FragmentPath --value skybridge-agent.service 2>/dev/null || true)
  case "$fragment" in
    /lib/systemd/system/skybridge-agent.service | /usr/lib/systemd/system/skybridge-agent.service)
      systemctl disable --now skybridge-agent.service >/dev/null 2>&1 || true ;;
  esac
fi
SCRIPT
cat >"$root/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
SCRIPT
chmod 755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

# A dynamically linked build needs a glibc with every symbol version it
# uses; a static one (README: "A binary for any node") needs none.
depends=
if ldd "$binary" 2>/dev/null | grep -q 'libc\.so'; then
  glibc=$(grep -ao 'GLIBC_2\.[0-9]*' "$binary" | sort -uV | tail -n 1 | sed 's/GLIBC_//')
  [ -n "$glibc" ] && depends="Depends: libc6 (>= $glibc)
"
fi
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<CONTROL
Package: skybridge
Version: $version
Architecture: $arch
Maintainer: Skybridge authors <skybridge@example.invalid>
Installed-Size: $size
Section: net
Priority: optional
${depends}Recommends: nftables, iproute2, openssh-client
Homepage: https://example.invalid/skybridge
Description: one Kubernetes cluster across VMs of several cloud providers
 Skybridge plans, renders, applies and keeps applied the tunnels between
 cloud providers' private networks (WireGuard, GRE or VXLAN), forwarding,
 NAT and routes, from one cluster file. This package holds the skybridge
 command, its node agent and the agent's systemd unit (disabled).
CONTROL

mkdir -p "$out"
deb=$out/skybridge_${version}_${arch}.deb
dpkg-deb -Z"$compression" --root-owner-group --build "$root" "$deb" >/dev/null
echo "$deb"
