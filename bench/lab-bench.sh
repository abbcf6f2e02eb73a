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
# each printed as a ratio to the underlay and to the best userspace peer measured in the same run.
# Usage (root): bench/lab-bench.sh            Env: T=10 (seconds per iperf3 run), SB=target/release/skybridge,
#               SB_BASE= (unset: no skybridge-base row), MODES="tcp1 tcp4 udp lat", ROWS= (unset: every row),
#               LAT_MBPS=150 (the rate of the lat mode's stream), ROUNDS=2 (passes over the rows, forward then
#               backward; the table has their mean)
# Prereqs: apt-get install iperf3 wireguard-go jq; boringtun-cli is installed with cargo when missing
# (BORINGTUN=0 skips its row).
# Only the lab's own namespaces (prefix sbt-bench-) are used; they are removed on exit.
# The output ends with a warning when a data plane or iperf3 from outside the row's lab was running.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${T:-10}
# lat: the latency each data plane adds at the same load, one stream capped
# below every peer's single-stream rate in the recorded runs (0.19 Gbit/s the least).
LAT_MBPS=${LAT_MBPS:-150}
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
# RTT statistics of a ping's output: "mean p50 p90" in ms.
rtt_stats() {
  grep -o 'time=[0-9.]*' "$1" | cut -d= -f2 | sort -n |
    awk '{ a[NR] = $1; s += $1 } END { if (NR) printf "%.2f %.2f %.2f", s / NR, a[int(NR * 0.5) + 1], a[int(NR * 0.9) + 1]; else print "- - -" }'
}
# CPU seconds of the data plane processes per Gbit/s-second carried (kernel data planes: not attributable).
cpu_per_gbit() {  # cpu_per_gbit NAME TICKS GBPS SECONDS
  case $1 in underlay|vxlan) echo - ; return ;; esac
  awk -v d="$2" -v hz="$(getconf CLK_TCK)" -v g="$3" -v t="$4" 'BEGIN{ if (d == 0 || g == 0) print "-"; else printf "%.2f", d/hz/(g*t) }'
}
record() {  # record MODE NAME GBPS CPU "MEAN P50 P90" LOST (RTTs in ms, "-" when not measured)
  local rtt
  read -r -a rtt <<<"$5"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${rtt[0]}" "${rtt[1]}" "${rtt[2]}" "$6" >>"$W/results.tsv"
  echo "$2 $1: $3 Gbit/s, cpu $4 s/Gbit, rtt $5 ms, lost $6%" >&2
}
server() {  # a one-shot iperf3 server on ali-gw writing its report to $W/server.json
  # A UDP step whose client gave up leaves its one-shot server waiting: the
  # next client would get "the server is busy". Stop it by its pid file.
  # Wait until it is gone: a new server cannot bind the port while the old
  # one holds it (it fails silently, being a daemon), and the next client
  # would reach the dying old one and be reset (seen once, 2026-12-04).
  local pid i
  pid=$(cat "$W/server.pid" 2>/dev/null) || pid=
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = iperf3 ]; then
    kill "$pid" 2>/dev/null || true
    for i in $(seq 50); do
      case $(ps -o stat= -p "$pid") in Z* | '') break ;; esac  # exited (a zombie holds no port)
      [ "$i" = 30 ] && kill -9 "$pid" 2>/dev/null
      sleep 0.1
    done
  fi
  rm -f "$W/server.json" "$W/server.pid"
  lab exec ali-gw -- iperf3 -s -1 -D -J --logfile "$W/server.json" --pidfile "$W/server.pid" >/dev/null
  sleep 0.3
}
# TCP: tcp NAME MODE DST, MODE tcp1 (one stream, with a ping beside it: the
# latency under load), tcp4 (four streams) or lat (one stream capped at
# LAT_MBPS, with a ping beside it: the latency at the same load for every
# row); the Gbit/s received and the data planes' CPU-s per Gbit.
tcp() {
  local name=$1 mode=$2 dst=$3 g t0 t1 rtt="- - -" args=()
  [ "$mode" = tcp4 ] && args=(-P 4)
  [ "$mode" = lat ] && args=(-b "${LAT_MBPS}M")
  server
  if [ "$mode" != tcp4 ]; then
    lab exec hw-master -- ping -c $((T * 25)) -i 0.04 "$dst" >"$W/ping" 2>&1 &
  fi
  t0=$(ticks)
  lab exec hw-master -- iperf3 -c "$dst" -t "$T" -J "${args[@]}" >"$W/$name.$mode.json" || true
  t1=$(ticks)
  if [ "$mode" != tcp4 ]; then wait; rtt=$(rtt_stats "$W/ping"); fi
  g=$(gbps <"$W/$name.$mode.json" 2>/dev/null) || g=
  case $g in ''|null) echo "$name $mode: iperf3 failed: $(jq -r .error "$W/$name.$mode.json" 2>/dev/null)" >&2; g=0 ;; esac
  # Segments the sender retransmitted: a tunnel that drops (a full receive
  # buffer in front of decryption) shows here before it shows in Gbit/s.
  echo "$name $mode: $(jq -r '.end.sum_sent.retransmits // "-"' "$W/$name.$mode.json" 2>/dev/null) TCP retransmits" >&2
  record "$mode" "$name" "$g" "$(cpu_per_gbit "$name" $((t1 - t0)) "$g" "$T")" "$rtt" -
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
      best=$g lost=$loss cpu=$(cpu_per_gbit "$name" $((t1 - t0)) "$g" "$s")
    fi
    awk -v l="$loss" 'BEGIN{ exit !(l > 10) }' && break
  done
  record udp "$name" "$best" "$cpu" "- - -" "$lost"
}
measure() {  # measure NAME DST: idle RTT, then every mode
  local idle
  idle=$(lab exec hw-master -- ping -q -c 50 -i 0.02 "$2" | awk -F'/' '/^rtt/{print $5}')
  printf '%s\t%s\n' "$1" "$idle" >>"$W/idle.tsv"
  for mode in ${MODES:-tcp1 tcp4 udp lat}; do
    case $mode in udp) udp "$1" "$2" ;; *) tcp "$1" "$mode" "$2" ;; esac
  done
}
up() { lab up "$@" --timeout 60 >/dev/null 2>&1 || { echo "lab up $* failed" >&2; lab check | tail -3 >&2; exit 1; }; }

# A data plane or iperf3 left over from an earlier lab (or another user's)
# takes CPU from every row measured while it runs: each row starts by looking
# for one, and the table ends with what it found.
# (An exited one-shot iperf3 server can linger as a zombie until it is reaped:
# it takes nothing and is not counted.)
strays() {
  local p
  for p in $(pgrep -f 'wireguard-dataplane|wireguard-go|boringtun|iperf3'); do
    case $(ps -o stat= -p "$p") in Z* | '') continue ;; esac
    printf 'before %s: %s\n' "$1" "$(ps -o pid=,args= -p "$p")" | tee -a "$W/strays" >&2
  done
}
# One row: its lab up, every mode measured, its lab down.
row() {
  strays "$1"
  case $1 in
    underlay) up "$W/wg.yaml"; measure underlay 198.51.100.20 ;;  # ali-gw's elastic IP: the routers' NAT and the internet, no tunnel
    skybridge) up "$W/wg.yaml"; measure skybridge 172.26.32.235 ;;
    # The agent passes its environment on to the data plane it starts.
    skybridge-nogso) SKYBRIDGE_DATAPLANE_UDP_GSO=0 up "$W/wg.yaml"; measure "$1" 172.26.32.235 ;;
    skybridge-nooff) SKYBRIDGE_DATAPLANE_UDP_GSO=0 SKYBRIDGE_DATAPLANE_OFFLOAD=0 up "$W/wg.yaml"; measure "$1" 172.26.32.235 ;;
    skybridge-base)
      "$SB_BASE" lab up "$W/wg.yaml" --timeout 60 >/dev/null 2>&1 || { echo "lab up with $SB_BASE failed" >&2; exit 1; }
      measure "$1" 172.26.32.235
      "$SB_BASE" lab down >/dev/null
      return ;;
    vxlan) up "$W/vxlan.yaml"; measure vxlan 172.26.32.235 ;;
    wireguard-go) up "$W/wg.yaml" --wireguard-impl hw-master=wireguard-go --wireguard-impl ali-gw=wireguard-go; measure "$1" 172.26.32.235 ;;
    boringtun) up "$W/wg.yaml" --wireguard-impl hw-master=boringtun --wireguard-impl ali-gw=boringtun; measure "$1" 172.26.32.235 ;;
  esac
  lab down >/dev/null
}

# ROWS="skybridge boringtun" measures only those rows (for a quick comparison).
want() { [ -z "${ROWS:-}" ] || [[ " $ROWS " == *" $1 "* ]]; }
rows=()
for r in underlay skybridge skybridge-nogso skybridge-nooff skybridge-base vxlan wireguard-go boringtun; do
  want "$r" || continue
  [ "$r" = skybridge-base ] && [ -z "$SB_BASE" ] && continue
  if [ "$r" = boringtun ]; then
    [ "${BORINGTUN:-1}" != 0 ] || continue
    export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
    if ! command -v boringtun-cli >/dev/null; then
      echo "installing boringtun-cli with cargo (once; a few minutes)" >&2
      cargo install --locked --quiet boringtun-cli --version 0.7.1 >&2 || echo "cargo install boringtun-cli failed: no boringtun row" >&2
    fi
    command -v boringtun-cli >/dev/null || continue
  fi
  rows+=("$r")
done
# The host's speed changes during a run (up to threefold within minutes on a
# shared machine), and rows measured late would pay for it: ROUNDS passes
# (default 2) go through the rows forward, then backward, and the table has
# the mean, so a steady drift weighs on every row alike; spread is how far the
# rounds were apart, a sign that the host changed phase under that row.
ROUNDS=${ROUNDS:-2}
for round in $(seq "$ROUNDS"); do
  order=("${rows[@]}")
  if [ $((round % 2)) = 0 ]; then
    order=()
    for ((i = ${#rows[@]} - 1; i >= 0; i--)); do order+=("${rows[i]}"); done
  fi
  for r in "${order[@]}"; do
    echo "round $round/$ROUNDS: $r" >&2
    row "$r"
  done
done

echo
echo "hw-master -> ali-gw, $T s per run, $ROUNDS round(s), $(nproc) CPUs, $(uname -r)"
echo "tcp1: one TCP stream; tcp4: four; udp: 1412-byte datagrams (the tunnel MTU) offered at rising rates, the most"
echo "that arrived (and that step's loss)"
echo "x peer: ratio to the best userspace peer of the same mode (wireguard-go, boringtun); cpu: CPU-seconds of"
echo "the userspace data plane processes, both gateways, per gigabit carried; rtt: ping every 40 ms beside the single"
echo "stream, mean/median/90th percentile (idle mean); lat: one stream capped at $LAT_MBPS Mbit/s with the same ping,"
echo "the latency each data plane adds at the same load; every figure the mean of the rounds, spread: half the"
echo "range of the rounds' Gbit/s"
awk -F'\t' '
  function avg(k, c) { return cnt[k, c] ? sum[k, c] / cnt[k, c] : "-" }
  function add(k, c, v) { if (v != "-" && v != "") { sum[k, c] += v; cnt[k, c]++ } }
  FNR == NR { add($1, "idle", $2); next }
  { k = $1 SUBSEP $2
    if (!(k in seen)) { seen[k] = 1; n++; mode[n] = $1; name[n] = $2; key[n] = k; lo[k] = $3; hi[k] = $3 }
    add(k, "g", $3); add(k, "cpu", $4); add(k, "mean", $5); add(k, "p50", $6); add(k, "p90", $7); add(k, "lost", $8)
    if ($3 < lo[k]) lo[k] = $3
    if ($3 > hi[k]) hi[k] = $3 }
  END {
    for (i = 1; i <= n; i++) {
      g[i] = avg(key[i], "g")
      if (name[i] == "underlay") base[mode[i]] = g[i]
      if ((name[i] == "wireguard-go" || name[i] == "boringtun") && g[i] > best[mode[i]]) best[mode[i]] = g[i]
    }
    for (i = 1; i <= n; i++) {
      k = key[i]
      if (mode[i] != last) { printf "\n%s\n", mode[i]; last = mode[i] }
      peer = best[mode[i]] > 0 ? sprintf("%5.2fx peer", g[i] / best[mode[i]]) : "   - x peer"
      pct = base[mode[i]] > 0 ? g[i] / base[mode[i]] * 100 : 0
      spread = g[i] > 0 ? sprintf("%3.0f%%", (hi[k] - lo[k]) / 2 / g[i] * 100) : "  -"
      cpu = avg(k, "cpu"); cpu = cpu == "-" ? "    -" : sprintf("%5.2f", cpu)
      idle = avg(name[i], "idle"); idle = idle == "-" ? "-" : sprintf("%.3f", idle)
      if (mode[i] == "udp") lat = cnt[k, "lost"] ? sprintf("lost %.1f%%", avg(k, "lost")) : "lost -"
      else if (mode[i] == "tcp4") lat = sprintf("rtt - (%s) ms", idle)
      else lat = cnt[k, "mean"] ? sprintf("rtt %.2f/%.2f/%.2f (%s) ms", avg(k, "mean"), avg(k, "p50"), avg(k, "p90"), idle) : sprintf("rtt - (%s) ms", idle)
      printf "  %-16s %7.2f Gbit/s  spread %s  %6.1f%% of underlay  %s   cpu %s s/Gbit   %s\n", name[i], g[i], spread, pct, peer, cpu, lat
    }
  }' "$W/idle.tsv" <(sort -s -t$'\t' -k1,1 "$W/results.tsv")
if [ -s "$W/strays" ]; then
  echo
  echo "WARNING: processes outside the row's lab ran during the run; the figures measured beside them are low:"
  cat "$W/strays"
fi
