#!/usr/bin/env bash
# failover-bench.sh - how long traffic between two sites stops when a site's
# active gateway fails, with failover (examples/ha-lab.yaml: two candidates
# per site) and without it (the same cluster with one candidate per site:
# traffic stops until the gateway is healed), measured in the same run.
# For each kind of failure (stop | uplink | tunnel), N (5) times: ping from
# hw-node to ali-node every 10 ms, break hw-gw1 with `lab fail`, measure the
# longest gap between replies, heal, wait for the failback. Prints median and
# worst per kind, next to the no-failover gap.
# Usage (root): bench/failover-bench.sh     Env: N=5, HOLD=4 (seconds the
#   failure lasts without failover), SB=target/release/skybridge
# Prereqs: apt-get install iproute2 nftables iputils-ping util-linux
# Only the lab's own namespaces (prefix sbt-<pid>-fb-) are used; removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-5}
HOLD=${HOLD:-4}
SB=${SB:-target/release/skybridge}
[ -x "$SB" ] || cargo build --release --quiet
export SKYBRIDGE_LAB_PREFIX="sbt-$$-fb-"
W=$(mktemp -d)
trap '"$SB" lab down >/dev/null 2>&1 || true; rm -rf "$W"' EXIT
cp examples/ha-lab.yaml "$W/ha.yaml"
# Without failover: the second candidates become plain workers.
sed -E 's/(name: (hw|ali)-gw2, .*)roles: \[gateway\]/\1roles: [worker]/' examples/ha-lab.yaml >"$W/single.yaml"
grep -q 'hw-gw2.*roles: \[worker\]' "$W/single.yaml"
lab() { "$SB" lab "$@"; }
up() { lab up "$1" --timeout 90 >/dev/null 2>&1 || { echo "lab up $1 failed" >&2; lab check | tail -3 >&2; exit 1; }; }
# gap SECONDS ACTION...: the longest silence of a 10 ms ping while ACTION runs
# (a count, not -w: with a deadline ping exits on the first ICMP error).
gap() {
  local secs=$1; shift
  lab exec hw-node -- ping -D -n -i 0.01 -c $((secs * 100)) -W 1 172.26.32.20 >"$W/ping.txt" 2>&1 &
  local pid=$!
  sleep 1
  "$@"
  wait $pid || true
  awk -F'[][]' '/bytes from/{ if (prev) { d = $2 - prev; if (d > m) m = d } prev = $2 } END { printf "%.3f\n", m }' "$W/ping.txt"
}
fail_heal_later() { lab fail hw-gw1 --how "$KIND" >/dev/null; sleep "$HOLD"; lab heal hw-gw1 >/dev/null; }
fail_only() { lab fail hw-gw1 --how "$KIND" >/dev/null; }
stats() { sort -n | awk '{ v[NR] = $1 } END { printf "%.3f\t%.3f\n", (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2), v[NR] }'; }

: >"$W/results.tsv"
up "$W/ha.yaml"
sleep 3
for KIND in stop uplink tunnel; do
  : >"$W/$KIND.with"
  for i in $(seq "$N"); do
    g=$(gap 6 fail_only)
    echo "$g" >>"$W/$KIND.with"
    echo "with failover, $KIND #$i: $g s" >&2
    lab heal hw-gw1 >/dev/null
    sleep 8   # failback hold (5 s) and the probes settling
  done
done
lab down >/dev/null
up "$W/single.yaml"
sleep 3
for KIND in stop uplink tunnel; do
  : >"$W/$KIND.without"
  for i in $(seq "$N"); do
    g=$(gap $((HOLD + 5)) fail_heal_later)
    echo "$g" >>"$W/$KIND.without"
    echo "without failover, $KIND #$i: $g s" >&2
    sleep 3
  done
done

printf '\nGateway failure: longest traffic gap (ping every 10 ms), %s runs each, failure held %s s without failover\n' "$N" "$HOLD"
printf '%-8s %14s %14s %20s %20s\n' kind "median (s)" "worst (s)" "no-failover median" "no-failover worst"
for KIND in stop uplink tunnel; do
  read -r m w < <(stats <"$W/$KIND.with")
  read -r nm nw < <(stats <"$W/$KIND.without")
  printf '%-8s %14s %14s %20s %20s\n' "$KIND" "$m" "$w" "$nm" "$nw"
done
printf 'goal: median < 1 s, worst < 3 s\n'
