#!/usr/bin/env bash
# lab-bench.sh - TCP throughput and RTT between two gateways of different
# sites of the lab (hw-master -> ali-gw of examples/lab.yaml), over:
#   underlay    the lab's internet path itself (public IP, routers' NAT), no tunnel: the baseline
#   skybridge   Skybridge's userspace WireGuard data plane (gotatun), TUN offloads and UDP GSO on
#   skybridge-nogso  the same with SKYBRIDGE_DATAPLANE_UDP_GSO=0 (TUN offloads only)
#   skybridge-nooff  the same with both off (SKYBRIDGE_DATAPLANE_OFFLOAD=0 too)
#   skybridge-base   the data plane of another skybridge binary (SB_BASE=path; e.g. an older build)
#   vxlan       kernel VXLAN
#   wireguard-go  wireguard-go on both gateways, configured by the agent
#   boringtun   boringtun-cli on both gateways (when boringtun-cli is installed)
# each printed as a ratio to the underlay measured in the same run.
# Usage (root): bench/lab-bench.sh            Env: T=10 (seconds per iperf3 run), SB=target/release/skybridge,
#               SB_BASE= (unset: no skybridge-base row)
# Prereqs: apt-get install iperf3 wireguard-go jq; optional: cargo install boringtun-cli
# Only the lab's own namespaces (prefix sbt-bench-) are used; they are removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${T:-10}
SB=${SB:-target/release/skybridge}
[ -x "$SB" ] || cargo build --release --quiet
export SKYBRIDGE_LAB_PREFIX=sbt-bench-
W=$(mktemp -d)
trap '"$SB" lab down >/dev/null 2>&1 || true; rm -rf "$W"' EXIT
# The first two sites of the example: one gateway each side is enough.
sed '/    - name: tencent/,$d' examples/lab.yaml >"$W/wg.yaml"
sed -e 's/transport: wireguard/transport: vxlan/' -e 's/listenPort: 51820/listenPort: 4789/' "$W/wg.yaml" >"$W/vxlan.yaml"
lab() { "$SB" lab "$@"; }
SB_BASE=${SB_BASE:-}
gbps() { jq -r '.end.sum_received.bits_per_second / 1e9'; }
ticks() {  # CPU ticks (utime+stime) of the userspace data planes on both gateways, iperf3 excluded
  local t=0 ns p
  for ns in ${SKYBRIDGE_LAB_PREFIX}hw-master ${SKYBRIDGE_LAB_PREFIX}ali-gw; do
    for p in $(ip netns pids "$ns"); do
      case "$(tr '\0' ' ' </proc/$p/cmdline 2>/dev/null)" in
        *wireguard-dataplane*|*wireguard-go*|*boringtun*) t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))) ;;
      esac
    done
  done
  echo $t
}
measure() {  # measure NAME DST
  lab exec ali-gw -- iperf3 -s -1 -D >/dev/null
  sleep 0.3
  local g rtt t0 t1 cpu
  t0=$(ticks)
  lab exec hw-master -- iperf3 -c "$2" -t "$T" -J >"$W/$1.json" || true
  t1=$(ticks)
  g=$(gbps <"$W/$1.json" 2>/dev/null) || { echo "$1: iperf3 failed: $(jq -r .error "$W/$1.json" 2>/dev/null)" >&2; g=0; }
  rtt=$(lab exec hw-master -- ping -q -c 50 -i 0.02 "$2" | awk -F'/' '/^rtt/{print $5}')
  # CPU seconds of the data plane processes per Gbit/s-second carried (kernel data planes: not attributable).
  case $1 in underlay|vxlan) t1=$t0 ;; esac
  cpu=$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v g="$g" -v t="$T" 'BEGIN{ if (d == 0) print "-"; else printf "%.2f", d/hz/(g*t) }')
  printf '%s\t%s\t%s\t%s\n' "$1" "$g" "$rtt" "$cpu" >>"$W/results.tsv"
  echo "$1: $g Gbit/s, rtt avg $rtt ms" >&2
}
up() { lab up "$@" --timeout 60 >/dev/null 2>&1 || { echo "lab up $* failed" >&2; lab check | tail -3 >&2; exit 1; }; }

up "$W/wg.yaml"
measure underlay 198.51.100.20        # ali-gw's elastic IP: the routers' NAT and the internet, no tunnel
measure skybridge 172.26.32.235
lab down >/dev/null
# The agent passes its environment on to the data plane it starts.
SKYBRIDGE_DATAPLANE_UDP_GSO=0 up "$W/wg.yaml"
measure skybridge-nogso 172.26.32.235
lab down >/dev/null
SKYBRIDGE_DATAPLANE_UDP_GSO=0 SKYBRIDGE_DATAPLANE_OFFLOAD=0 up "$W/wg.yaml"
measure skybridge-nooff 172.26.32.235
lab down >/dev/null
if [ -n "$SB_BASE" ]; then
  "$SB_BASE" lab up "$W/wg.yaml" --timeout 60 >/dev/null 2>&1 || { echo "lab up with $SB_BASE failed" >&2; exit 1; }
  measure skybridge-base 172.26.32.235
  "$SB_BASE" lab down >/dev/null
fi
up "$W/vxlan.yaml"
measure vxlan 172.26.32.235
lab down >/dev/null
up "$W/wg.yaml" --wireguard-impl hw-master=wireguard-go --wireguard-impl ali-gw=wireguard-go
measure wireguard-go 172.26.32.235
if command -v boringtun-cli >/dev/null; then
  lab down >/dev/null
  up "$W/wg.yaml" --wireguard-impl hw-master=boringtun --wireguard-impl ali-gw=boringtun
  measure boringtun 172.26.32.235
fi

echo
echo "TCP hw-master -> ali-gw, $T s per run, $(nproc) CPUs, $(uname -r)"
echo "(cpu: CPU-seconds of the userspace data plane processes, both gateways, per gigabit carried)"
awk -F'\t' 'NR==1{base=$2} {printf "%-16s %7.2f Gbit/s  %6.1f%% of underlay   rtt %s ms   cpu %s s/Gbit\n", $1, $2, $2/base*100, $3, $4}' "$W/results.tsv"
