#!/usr/bin/env bash
# apply-bench.sh - wall time of `skybridge apply` on a fresh 20-node lab with
# sshd (`lab up --ssh`), all nodes in parallel, against the time of its
# slowest node and against the same apply one node at a time (the sum).
# 5 sites x 4 nodes: one gateway with an elastic IP per site, three workers
# reached through it as jump host. Every apply starts from fresh nodes (the
# lab is rebuilt), so both runs install the agent binary everywhere.
# Usage (root): bench/apply-bench.sh     Env: SB=target/release/skybridge, N_SITES=5, PER_SITE=4
# Prereqs: apt-get install openssh-server openssh-client iproute2 nftables util-linux iputils-ping
# Only the lab's own namespaces (prefix sbt-abench-) are used; they are removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
SB=${SB:-target/release/skybridge}
N_SITES=${N_SITES:-5}
PER_SITE=${PER_SITE:-4}
[ -x "$SB" ] || cargo build --release --quiet -p skybridge-cli
SB=$(realpath "$SB")
export SKYBRIDGE_LAB_PREFIX=sbt-abench-
W=$(mktemp -d)
trap '"$SB" lab down >/dev/null 2>&1 || true; rm -rf "$W"' EXIT
{
  printf 'apiVersion: skybridge.dev/v1alpha1\nkind: Cluster\nmetadata:\n  name: bench\nspec:\n  network:\n    tunnelPool: 100.96.0.0/24\n  sites:\n'
  for s in $(seq 1 "$N_SITES"); do
    printf '    - name: s%d\n      provider: p%d\n      cidrs: [10.%d.0.0/24]\n      nodes:\n' "$s" "$s" "$s"
    printf '        - { name: s%d-gw, privateIP: 10.%d.0.10, publicIP: 192.0.2.%d, roles: [gateway] }\n' "$s" "$s" "$((10 + s))"
    for n in $(seq 2 "$PER_SITE"); do
      printf '        - { name: s%d-n%d, privateIP: 10.%d.0.%d, roles: [worker] }\n' "$s" "$n" "$s" "$((10 + n))"
    done
  done
} >"$W/bench.yaml"
nodes=$((N_SITES * PER_SITE))
run() {  # run PARALLEL -> prints apply's timing line
  "$SB" lab down >/dev/null 2>&1 || true
  rm -f "$W/bench.state.yaml"
  "$SB" lab up --ssh "$W/bench.yaml" >/dev/null
  local t0 t1 out
  t0=$(date +%s.%N)
  out=$("$SB" lab exec controller -- "$SB" apply "$W/bench.yaml" --yes --parallel "$1" 2>/dev/null) || { echo "$out" >&2; exit 1; }
  t1=$(date +%s.%N)
  echo "$out" | grep -q "0 failed" || { echo "$out" >&2; exit 1; }
  printf '%s\n' "$(echo "$out" | grep '^apply took') (outside: $(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }") s)"
}
echo "binary: $SB ($(du -m "$SB" | cut -f1) MB), $nodes nodes, $(nproc) CPUs"
echo "parallel $nodes: $(run "$nodes")"
echo "parallel 1:  $(run 1)"
