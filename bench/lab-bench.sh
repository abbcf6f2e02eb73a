#!/usr/bin/env bash
# lab-bench.sh - TCP (1 and 4 streams) and UDP throughput, CPU and RTT between two gateways of different
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
#               SB_BASE= (unset: no skybridge-base row), MODES="tcp1 tcp4 udp", ROWS= (unset: every row)
# Prereqs: apt-get install iperf3 wireguard-go jq; boringtun-cli is installed with cargo when missing
# (BORINGTUN=0 skips its row).
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
# RTT statistics of a ping's output: "mean/p50/p90" in ms.
rtt_stats() {
  grep -o 'time=[0-9.]*' "$1" | cut -d= -f2 | sort -n |
    awk '{ a[NR] = $1; s += $1 } END { if (NR) printf "%.2f/%.2f/%.2f", s / NR, a[int(NR * 0.5) + 1], a[int(NR * 0.9) + 1]; else print "-" }'
}
# CPU seconds of the data plane processes per Gbit/s-second carried (kernel data planes: not attributable).
cpu_per_gbit() {  # cpu_per_gbit NAME TICKS GBPS SECONDS
  case $1 in underlay|vxlan) echo - ; return ;; esac
  awk -v d="$2" -v hz="$(getconf CLK_TCK)" -v g="$3" -v t="$4" 'BEGIN{ if (d == 0 || g == 0) print "-"; else printf "%.2f", d/hz/(g*t) }'
}
record() {  # record MODE NAME GBPS RTT CPU
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$W/results.tsv"
  echo "$2 $1: $3 Gbit/s, cpu $5 s/Gbit, $4" >&2
}
server() {  # a one-shot iperf3 server on ali-gw writing its report to $W/server.json
  rm -f "$W/server.json"
  lab exec ali-gw -- iperf3 -s -1 -D -J --logfile "$W/server.json" >/dev/null
  sleep 0.3
}
# TCP: tcp NAME MODE DST, MODE tcp1 (one stream, with a ping beside it: the
# latency under load) or tcp4 (four streams); the Gbit/s received and the data
# planes' CPU-s per Gbit.
tcp() {
  local name=$1 mode=$2 dst=$3 g t0 t1 rtt=- args=()
  [ "$mode" = tcp4 ] && args=(-P 4)
  server
  if [ "$mode" = tcp1 ]; then
    lab exec hw-master -- ping -c $((T * 25)) -i 0.04 "$dst" >"$W/ping" 2>&1 &
  fi
  t0=$(ticks)
  lab exec hw-master -- iperf3 -c "$dst" -t "$T" -J "${args[@]}" >"$W/$name.$mode.json" || true
  t1=$(ticks)
  if [ "$mode" = tcp1 ]; then wait; rtt=$(rtt_stats "$W/ping"); fi
  g=$(gbps <"$W/$name.$mode.json" 2>/dev/null) || g=
  case $g in ''|null) echo "$name $mode: iperf3 failed: $(jq -r .error "$W/$name.$mode.json" 2>/dev/null)" >&2; g=0 ;; esac
  record "$mode" "$name" "$g" "$rtt" "$(cpu_per_gbit "$name" $((t1 - t0)) "$g" "$T")"
}
# UDP: udp NAME DST. Datagrams filling the tunnel MTU of 1440 (1412 bytes of
# payload), offered at rates rising by a factor 1.41 from 0.1 Gbit/s, T/2 s
# each, until one loses more than 10% (past what the tunnel carries) or its
# run fails (an overloaded tunnel also carries iperf3's control connection);
# the result is the most that arrived in one step, as the server counted it,
# with that step's loss. An unlimited rate measures mostly how a tunnel
# fails: its control connection breaks, and the receiver's drops decide the
# number.
udp() {
  local name=$1 dst=$2 s=$((T > 3 ? T / 2 : 2)) rate best=0 lost=- cpu=- t0 t1 g loss
  for rate in 0.1 0.14 0.2 0.28 0.4 0.56 0.8 1.1 1.6 2.2 3.2 4.5 6.4 9; do
    server
    t0=$(ticks)
    lab exec hw-master -- iperf3 -c "$dst" -u -b "${rate}G" -l 1412 -w 4M -t "$s" -J >"$W/$name.udp.json" 2>/dev/null || true
    t1=$(ticks)
    for _ in $(seq 25); do jq -e .end.sum_received <"$W/server.json" >/dev/null 2>&1 && break; sleep 0.2; done
    read -r g loss < <(jq -r '.end.sum_received | "\(.bits_per_second / 1e9) \(.lost_percent)"' <"$W/server.json" 2>/dev/null) || g=
    case $g in ''|null) echo "$name udp at ${rate}G: iperf3 failed" >&2; break ;; esac
    echo "$name udp at ${rate}G: $g Gbit/s arrived, $loss% lost" >&2
    if awk -v g="$g" -v b="$best" 'BEGIN{ exit !(g > b) }'; then
      best=$g lost=$(printf '%.1f%%' "$loss") cpu=$(cpu_per_gbit "$name" $((t1 - t0)) "$g" "$s")
    fi
    awk -v l="$loss" 'BEGIN{ exit !(l > 10) }' && break
  done
  record udp "$name" "$best" "lost $lost" "$cpu"
}
measure() {  # measure NAME DST: idle RTT, then every mode
  local idle
  idle=$(lab exec hw-master -- ping -q -c 50 -i 0.02 "$2" | awk -F'/' '/^rtt/{print $5}')
  printf '%s\t%s\n' "$1" "$idle" >>"$W/idle.tsv"
  for mode in ${MODES:-tcp1 tcp4 udp}; do
    case $mode in udp) udp "$1" "$2" ;; *) tcp "$1" "$mode" "$2" ;; esac
  done
}
up() { lab up "$@" --timeout 60 >/dev/null 2>&1 || { echo "lab up $* failed" >&2; lab check | tail -3 >&2; exit 1; }; }

# ROWS="skybridge boringtun" measures only those rows (for a quick comparison).
want() { [ -z "${ROWS:-}" ] || [[ " $ROWS " == *" $1 "* ]]; }
if want underlay || want skybridge; then
  up "$W/wg.yaml"
  want underlay && measure underlay 198.51.100.20   # ali-gw's elastic IP: the routers' NAT and the internet, no tunnel
  want skybridge && measure skybridge 172.26.32.235
  lab down >/dev/null
fi
# The agent passes its environment on to the data plane it starts.
if want skybridge-nogso; then
  SKYBRIDGE_DATAPLANE_UDP_GSO=0 up "$W/wg.yaml"
  measure skybridge-nogso 172.26.32.235
  lab down >/dev/null
fi
if want skybridge-nooff; then
  SKYBRIDGE_DATAPLANE_UDP_GSO=0 SKYBRIDGE_DATAPLANE_OFFLOAD=0 up "$W/wg.yaml"
  measure skybridge-nooff 172.26.32.235
  lab down >/dev/null
fi
if [ -n "$SB_BASE" ] && want skybridge-base; then
  "$SB_BASE" lab up "$W/wg.yaml" --timeout 60 >/dev/null 2>&1 || { echo "lab up with $SB_BASE failed" >&2; exit 1; }
  measure skybridge-base 172.26.32.235
  "$SB_BASE" lab down >/dev/null
fi
if want vxlan; then
  up "$W/vxlan.yaml"
  measure vxlan 172.26.32.235
  lab down >/dev/null
fi
if want wireguard-go; then
  up "$W/wg.yaml" --wireguard-impl hw-master=wireguard-go --wireguard-impl ali-gw=wireguard-go
  measure wireguard-go 172.26.32.235
  lab down >/dev/null
fi
if [ "${BORINGTUN:-1}" != 0 ] && want boringtun; then
  export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
  if ! command -v boringtun-cli >/dev/null; then
    echo "installing boringtun-cli with cargo (once; a few minutes)" >&2
    cargo install --locked --quiet boringtun-cli --version 0.7.1 >&2 || echo "cargo install boringtun-cli failed: no boringtun row" >&2
  fi
  if command -v boringtun-cli >/dev/null; then
    up "$W/wg.yaml" --wireguard-impl hw-master=boringtun --wireguard-impl ali-gw=boringtun
    measure boringtun 172.26.32.235
    lab down >/dev/null
  fi
fi

echo
echo "hw-master -> ali-gw, $T s per run, $(nproc) CPUs, $(uname -r)"
echo "tcp1: one TCP stream; tcp4: four; udp: 1412-byte datagrams (the tunnel MTU) offered at rising rates, the most"
echo "that arrived (and that step's loss)"
echo "x peer: ratio to the best userspace peer of the same mode (wireguard-go, boringtun); cpu: CPU-seconds of"
echo "the userspace data plane processes, both gateways, per gigabit carried; rtt: ping every 40 ms beside the single"
echo "stream, mean/median/90th percentile (idle mean)"
awk -F'\t' '
  FNR == NR { idle[$1] = $2; next }
  { n++; mode[n] = $1; name[n] = $2; g[n] = $3; rtt[n] = $4; cpu[n] = $5
    if ($2 == "underlay") base[$1] = $3
    if (($2 == "wireguard-go" || $2 == "boringtun") && $3 > best[$1]) best[$1] = $3 }
  END {
    for (i = 1; i <= n; i++) {
      if (mode[i] != last) { printf "\n%s\n", mode[i]; last = mode[i] }
      peer = best[mode[i]] > 0 ? sprintf("%5.2fx peer", g[i] / best[mode[i]]) : "   - x peer"
      pct = base[mode[i]] > 0 ? g[i] / base[mode[i]] * 100 : 0
      lat = mode[i] == "udp" ? rtt[i] : sprintf("rtt %s (%s) ms", rtt[i], idle[name[i]])
      printf "  %-16s %7.2f Gbit/s  %6.1f%% of underlay  %s   cpu %5s s/Gbit   %s\n", name[i], g[i], pct, peer, cpu[i], lat
    }
  }' "$W/idle.tsv" <(sort -s -t$'\t' -k1,1 "$W/results.tsv")
