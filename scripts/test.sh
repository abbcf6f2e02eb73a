#!/usr/bin/env bash
# Runs every Skybridge test: formatting, lints, unit, snapshot, property, CLI
# and (as root) the tests that use real network namespaces and nftables.
# On Debian it first installs the system packages those tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use: real nftables/iproute2 in throwaway `sbt-`
# network namespaces; the real containerd (started by the join tests on a
# private config) and systemd-analyze (verifies the generated units); a real
# sshd per lab node for the apply tests; kmod, debootstrap and e2fsprogs for
# the VM lab (its kernel, qemu and busybox are fetched by `lab up --backend vm`
# itself with `apt-get download` into /var/cache/skybridge-lab, never installed).
# curl scrapes the agents' metrics in the lab, and promtool (from prometheus)
# checks what they serve. groff and man-db read the manual pages `skybridge man` writes.
# dpkg-dev's dpkg-shlibdeps tells cargo-deb which glibc the debug binary's .deb needs.
PACKAGES=(curl prometheus groff-base man-db dpkg-dev iproute2 nftables iptables wireguard-tools wireguard-go iperf3 iputils-ping util-linux procps tcpdump containerd systemd openssh-server openssh-client kmod debootstrap e2fsprogs)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "warning: missing packages ${missing[*]}; tests that need them will skip (run as root on Debian to install them)" >&2
  fi
fi

# The VM lab asks apt for package versions: make sure its lists exist.
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null && ! apt-cache show --no-all-versions linux-image-amd64 >/dev/null 2>&1; then
  apt-get update -qq
fi

# packaging/build-deb.sh builds the .deb with cargo-deb (tests/package.rs and
# the systemd VM test run it). A pinned version, built once into ~/.cargo/bin.
CARGO_DEB_VERSION=3.8.0
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
  echo "installing: cargo-deb $CARGO_DEB_VERSION"
  cargo install --quiet --locked cargo-deb --version "$CARGO_DEB_VERSION"
fi
# boringtun-cli: the third WireGuard implementation the userspace data plane
# must interoperate with (tests/lab.rs; wireguard-go comes from Debian,
# boringtun only from crates.io). Pinned, built once into ~/.cargo/bin.
BORINGTUN_CLI_VERSION=0.7.1
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
if [ "$(boringtun-cli --version 2>/dev/null)" != "boringtun $BORINGTUN_CLI_VERSION" ]; then
  echo "installing: boringtun-cli $BORINGTUN_CLI_VERSION"
  cargo install --quiet --locked boringtun-cli --version "$BORINGTUN_CLI_VERSION"
fi

# A test whose prerequisite is missing records itself here (the test kit,
# crates/skybridge-cli/tests/support/kit.rs); under CI (`CI` set) it fails
# instead. The list ends the output, so a skip never reads as a pass.
skipped=$(mktemp -t skybridge-skipped.XXXXXX)
log=$(mktemp -t skybridge-test-log.XXXXXX)
export SKYBRIDGE_SKIPPED_FILE="$skipped"
started=$SECONDS

summary() {
  local status=$?
  if [ -s "$log" ]; then
    # libtest ends every suite with "finished in N s"; cargo names the suite
    # on the line before its tests run.
    echo
    echo "wall time per test suite:"
    awk '
      /^ *Running / {
        bin = $NF; gsub(/[()]/, "", bin); sub(/.*\//, "", bin); sub(/-[0-9a-f]+$/, "", bin)
        suite = bin " (" ($2 == "unittests" ? $3 : $2) ")"
      }
      /^ *Doc-tests / { suite = "doc-tests " $2 }
      /^test result:/ {
        for (i = 1; i <= NF; i++) if ($i == "in") t = $(i + 1)
        sub(/s$/, "", t)
        printf "  %8.1f s  %s\n", t, suite
      }' "$log" | sort -rn
  fi
  echo "whole test command: $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"
  if [ -s "$skipped" ]; then
    echo
    echo "SKIPPED ($(wc -l <"$skipped") test(s); they did not run here):"
    sort "$skipped" | sed 's/^/  /'
  fi
  rm -f "$skipped" "$log"
  exit "$status"
}
trap summary EXIT

cargo fmt --all -- --check
# The binary first: with it, what the VM tests boot (Debian's kernel and qemu,
# the systemd image made by debootstrap: minutes, mostly waiting on the
# mirror) is fetched in the background while clippy and the static build run.
cargo build --locked --quiet -p skybridge-cli
fetch_log=$(mktemp -t skybridge-lab-fetch.XXXXXX)
fetch_pid=
if [ "$(id -u)" -eq 0 ] && [ -z "${SKYBRIDGE_SKIP_VM_TESTS:-}" ] && command -v debootstrap >/dev/null; then
  "${CARGO_TARGET_DIR:-target}/debug/skybridge" lab fetch --image systemd >"$fetch_log" 2>&1 &
  fetch_pid=$!
fi
cargo clippy --workspace --all-targets --locked -- -D warnings
# gotatun's device tests, in both modes of our patch to it (inline I/O,
# vendor/gotatun/PATCHES.md). It is not a workspace member: it builds with
# its own lock file, into a target directory of its own.
gotatun_tests() {
  local dir="${CARGO_TARGET_DIR:-$PWD/target}/gotatun"
  (cd vendor/gotatun && cargo test --locked --quiet --target-dir "$dir" \
    --no-default-features --features device,ring,tun --lib device::tests::)
}
echo "gotatun device tests, buffered I/O (as released):"
(unset GOTATUN_TEST_INLINE_IO; gotatun_tests)
echo "gotatun device tests, inline I/O (Skybridge's data plane):"
GOTATUN_TEST_INLINE_IO=1 gotatun_tests
# The static build README.md offers for nodes with an old glibc; tests/lab.rs
# runs a lab's agents from it. `--target` keeps the flag away from build
# scripts and proc macros (they stay shared with the normal build), and no
# debug info keeps it quick.
host=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS='-C target-feature=+crt-static' CARGO_PROFILE_DEV_DEBUG=0 \
  cargo build --locked --quiet -p skybridge-cli --target "$host"
export SKYBRIDGE_STATIC_BIN="${CARGO_TARGET_DIR:-$PWD/target}/$host/debug/skybridge"
# The tests must not share the CPU with debootstrap. A failed fetch is only
# reported here: the VM tests then fail on the same error, with their names.
if [ -n "$fetch_pid" ]; then
  fetch_started=$SECONDS
  if wait "$fetch_pid"; then
    echo "lab fetch: done (waited $((SECONDS - fetch_started)) s for it)"
  else
    echo "lab fetch failed:" >&2
    tail -20 "$fetch_log" >&2
  fi
fi
rm -f "$fetch_log"
# --no-fail-fast: one failing suite must not hide the others' results (or skips).
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
