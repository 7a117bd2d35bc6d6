#!/usr/bin/env bash
# make bench: userspace-proxy side by side with the direct path and the peers a user would pick
# instead (HAProxy tcp mode with splice, nginx stream, socat), in network namespaces made here.
#
#   client ns 10.10.1.2 ── veth ── 10.10.1.1  node ns (proxy, peers)  10.10.2.1 ── veth ── 10.10.2.2  server ns
#
# direct:          client -> 10.10.2.2 (forwarded by the node, no proxy)
# userspace-proxy: client -> ClusterIP 10.96.0.10 -> PREROUTING REDIRECT -> proxy -> server
# peers:           client -> 10.10.1.1:<peer port> -> peer -> server
# bind portal:     client -> 10.96.0.11 (on the node's lo) -> userspace-proxy -> server
# nginx-nat:       client -> 10.96.0.12 -> PREROUTING REDIRECT -> nginx -> server
#
# Every address exists only inside these namespaces. Every load is bounded in time and count.
# Output: bench/results/{raw.tsv,results.md,results.json,chart.svg}.
# Environment: REPS (default 3), SECS (iperf seconds, default 4), IDLE_CONNS (default 9900),
# RR_ROUNDS (interleaved request/response latency rounds, default 9), HALTPOLL_ROUNDS=0 (skip
# the second set of latency rounds, with guest halt polling at the kernel default), PIN_ROUNDS=0
# (skip the third, with every party on CPU 0),
# CONN_ROUNDS (interleaved connection-rate rounds, default 9), ONLY_CONN=1 (those rounds only),
# SCHED_ROUNDS (connection rounds under `perf sched record` per target, default 1; 0 skips them),
# ONLY_TARGETS (e.g. "direct userspace-proxy haproxy"), ONLY_CP=1 (control plane only),
# CP_SIZES (control-plane service counts, default "1000 10000"), ADD_REPS (one-more-service
# measurements per size, default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
SECS=${SECS:-4}
# A proxied connection takes 2 descriptors in the proxy, and this sandbox caps RLIMIT_NOFILE at
# 20,000 (without CAP_SYS_RESOURCE to raise it): 9,900 is as close to 10,000 as fits.
IDLE_CONNS=${IDLE_CONNS:-9900}
RR_ROUNDS=${RR_ROUNDS:-9}
ADD_REPS=${ADD_REPS:-3}
CONN_ROUNDS=${CONN_ROUNDS:-9}
SCHED_ROUNDS=${SCHED_ROUNDS:-1}
CP_SIZES=${CP_SIZES:-"1000 10000"}
[ -z "${ONLY_CONN:-}" ] || CP_SIZES=""

if [ "$(id -u)" != 0 ]; then echo "make bench needs root (network namespaces)" >&2; exit 1; fi
need=()
for t in ip:iproute2 iptables:iptables conntrack:conntrack iperf3:iperf3 haproxy:haproxy nginx:nginx socat:socat jq:jq bc:bc; do
  command -v "${t%%:*}" >/dev/null || need+=("${t##*:}")
done
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
[ "$SCHED_ROUNDS" = 0 ] || command -v perf >/dev/null || need+=(linux-perf)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Which code the figures belong to, recorded before the build: the report names it, so that a
# results.md read later says what it measured.
if BENCH_REV=$(git rev-parse --short HEAD 2>/dev/null); then
  git diff --quiet HEAD -- src examples bench/run.sh Cargo.toml Cargo.lock ||
    BENCH_REV="$BENCH_REV with uncommitted changes"
else
  BENCH_REV=unknown  # not a git checkout
fi
export BENCH_REV BENCH_STARTED=$(date -u '+%Y-%m-%d %H:%M UTC')

echo "== building (release)"
cargo build --release --quiet --bin userspace-proxy --example loadgen --example benchreport --example fakeapi --example schedprofile
BIN=$PWD/target/release/userspace-proxy
LG=$PWD/target/release/examples/loadgen
REPORT=$PWD/target/release/examples/benchreport
FAKEAPI=$PWD/target/release/examples/fakeapi
SCHEDPROF=$PWD/target/release/examples/schedprofile
OUT=$PWD/bench/results
mkdir -p "$OUT"
WORK=$(mktemp -d)
RAW=$OUT/raw.tsv
printf "target\tmetric\tvalue\trep\n" > "$RAW"

CL=upb-cl-$$ ND=upb-node-$$ SV=upb-srv-$$ CP=upb-cp-$$
HALTPOLL=/sys/module/haltpoll/parameters/guest_halt_poll_ns
HALTPOLL_WAS=$(cat "$HALTPOLL" 2>/dev/null || true)
cleanup() {
  if [ -n "$HALTPOLL_WAS" ] && [ "$(cat "$HALTPOLL")" != "$HALTPOLL_WAS" ]; then echo "$HALTPOLL_WAS" > "$HALTPOLL"; fi
  for ns in $CL $ND $SV $CP; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  [ -n "${KEEP_WORK:-}" ] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

for ns in $CL $ND $SV $CP; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add upbc0 netns "$CL" type veth peer name upbn0 netns "$ND"
ip link add upbn1 netns "$ND" type veth peer name upbs0 netns "$SV"
ip -n "$CL" addr add 10.10.1.2/24 dev upbc0; ip -n "$ND" addr add 10.10.1.1/24 dev upbn0
ip -n "$ND" addr add 10.10.2.1/24 dev upbn1; ip -n "$SV" addr add 10.10.2.2/24 dev upbs0
for x in "$CL upbc0" "$ND upbn0" "$ND upbn1" "$SV upbs0"; do set -- $x; ip -n "$1" link set "$2" up; done
ip -n "$CL" route add default via 10.10.1.1
ip -n "$SV" route add default via 10.10.2.1
ip netns exec "$ND" sysctl -qw net.ipv4.ip_forward=1
# The connection-rate rows open tens of thousands of connections: without reuse of TIME_WAIT
# ports, connect() searches ever longer for a free port and the rows measured that search
# (p99 10 ms, 5,000 conn/s where 12,700 go through with reuse). Per namespace, for every target.
for ns in $CL $ND $SV $CP; do ip netns exec "$ns" sysctl -qw net.ipv4.tcp_tw_reuse=1; done

inns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# --- servers ---
inns "$SV" iperf3 -s -D -p 5201 >/dev/null
inns "$SV" bash -c "ulimit -n $(ulimit -Hn); exec $LG serve --tcp 10.10.2.2:9000 --udp 10.10.2.2:9001 --secs 3600" &
# The server runs a thread per TCP connection. After the memory rows close their ~10,000
# connections, those threads take a second or more of CPU to exit, and a row started meanwhile
# measures their exit: the first connection of the control-plane rows waited 290 to 390 ms for
# its echo, and programming 1,000 ports took 0.49 to 0.91 s instead of 0.19 to 0.21. Rows after a
# teardown wait until only the server's few standing threads remain (bounded: 60 s).
SERVE_STANDING_THREADS=8   # main, TCP accept, 2 UDP, and slack for a proxy's open connections
# Threads of the echo server (found by name: `$!` above is the subshell that ran `inns`).
serve_threads() {
  local p
  for p in $(ip netns pids "$SV"); do
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = loadgen ] && awk '/^Threads:/ {print $2}' "/proc/$p/status"
  done | awk '{n += $1} END {print n + 0}'
}
server_settled() {
  local n t0=$EPOCHREALTIME
  for _ in $(seq 1 1200); do
    n=$(serve_threads)
    if [ "$n" -le "$SERVE_STANDING_THREADS" ]; then
      echo "   server settled at $n threads in $(echo "$EPOCHREALTIME - $t0" | bc) s"
      return
    fi
    sleep 0.05
  done
  echo "   (the server still runs $n threads after 60 s; going on)" >&2
}

# --- the proxy and the peers, all in the node namespace ---
cat > "$WORK/proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: userspace
healthzBindAddress: ""
metricsBindAddress: ""
hostnameOverride: bench-node
udpIdleTimeout: 5s
udpMaxSessions: 65536
---
apiVersion: v1
kind: Service
metadata: {name: bench, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: iperf, port: 5201}
  - {name: echo, port: 9000}
  - {name: echo-udp, port: 9001, protocol: UDP}
---
apiVersion: v1
kind: Endpoints
metadata: {name: bench, namespace: default}
subsets:
- addresses: [{ip: 10.10.2.2}]
  ports: [{name: iperf, port: 5201}, {name: echo, port: 9000}, {name: echo-udp, port: 9001, protocol: UDP}]
EOF
inns "$ND" bash -c "ulimit -n $(ulimit -Hn); exec $BIN --config $WORK/proxy.yaml" 2>"$WORK/proxy.log" &

# The same proxy with the bind portal (service IP on lo, no netfilter on the path), for the
# column that shows what the NAT portal costs. A copy of the binary under another name, so that
# its CPU and memory are counted apart; it touches no netfilter rule, so the two coexist.
cp "$BIN" "$WORK/up-bind"
sed -e 's/^hostnameOverride: bench-node/hostnameOverride: bench-node\nportalMode: bind/' \
    -e 's/clusterIP: 10.96.0.10/clusterIP: 10.96.0.11/' "$WORK/proxy.yaml" > "$WORK/proxy-bind.yaml"
inns "$ND" bash -c "ulimit -n $(ulimit -Hn); exec $WORK/up-bind --config $WORK/proxy-bind.yaml" 2>"$WORK/proxy-bind.log" &

cat > "$WORK/haproxy.cfg" <<EOF
global
  maxconn 9900
  # HAProxy reserves descriptors for maxconn/4 splice pipes by default, over the 20,000 cap;
  # the bulk rows use at most 8 streams.
  maxpipes 64
defaults
  mode tcp
  option splice-auto
  timeout connect 5s
  timeout client 120s
  timeout server 120s
listen iperf
  bind 10.10.1.1:15201
  server s1 10.10.2.2:5201
listen echo
  bind 10.10.1.1:19000
  server s1 10.10.2.2:9000
EOF
inns "$ND" bash -c "ulimit -n $(ulimit -Hn); exec haproxy -f $WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &

cat > "$WORK/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes auto;
worker_rlimit_nofile 20000;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
daemon off;
events { worker_connections 19900; }
stream {
  server { listen 10.10.1.1:25201; proxy_pass 10.10.2.2:5201; }
  server { listen 10.10.1.1:29000; proxy_pass 10.10.2.2:9000; }
  server { listen 10.10.1.1:29001 udp; proxy_pass 10.10.2.2:9001; proxy_timeout 5s; }
}
EOF
inns "$ND" bash -c "ulimit -n $(ulimit -Hn); exec nginx -c $WORK/nginx.conf" >/dev/null 2>&1 &

# nginx once more, behind a NAT portal like the main column's: a service IP REDIRECTed to its
# listeners (a chain of the bench's own; the proxy never touches it). A user who puts a peer in
# front of a Kubernetes service needs such a rule too, so this is the like-for-like figure for
# the NAT portal, measured in the same run: what the portal costs any proxy.
inns "$ND" iptables -t nat -N BENCH-PEER-PORTAL
inns "$ND" iptables -t nat -A PREROUTING -j BENCH-PEER-PORTAL
for r in "tcp 5201 25201" "tcp 9000 29000" "udp 9001 29001"; do
  set -- $r
  inns "$ND" iptables -t nat -A BENCH-PEER-PORTAL -d 10.96.0.12/32 -p "$1" --dport "$2" -j REDIRECT --to-ports "$3"
done

inns "$ND" socat TCP4-LISTEN:35201,bind=10.10.1.1,fork,reuseaddr TCP4:10.10.2.2:5201 &
inns "$ND" socat TCP4-LISTEN:39000,bind=10.10.1.1,fork,reuseaddr TCP4:10.10.2.2:9000 &
inns "$ND" socat UDP4-LISTEN:39001,bind=10.10.1.1,fork,reuseaddr UDP4:10.10.2.2:9001 &

# target name, TCP bulk addr, TCP echo addr, UDP echo addr ("-" = not supported), process name
TARGETS=(
  "direct 10.10.2.2:5201 10.10.2.2:9000 10.10.2.2:9001 -"
  "userspace-proxy 10.96.0.10:5201 10.96.0.10:9000 10.96.0.10:9001 userspace-proxy"
  "haproxy 10.10.1.1:15201 10.10.1.1:19000 - haproxy"
  "nginx 10.10.1.1:25201 10.10.1.1:29000 10.10.1.1:29001 nginx"
  "socat 10.10.1.1:35201 10.10.1.1:39000 10.10.1.1:39001 socat"
  "userspace-proxy-bind 10.96.0.11:5201 10.96.0.11:9000 10.96.0.11:9001 up-bind"
  "nginx-nat 10.96.0.12:5201 10.96.0.12:9000 10.96.0.12:9001 nginx"
)

TCK=$(getconf CLK_TCK)
# The pids of every process named $1 in the node ns.
pids_of() {
  local pid
  for pid in $(ip netns pids "$ND"); do
    [ "$(cat /proc/$pid/comm 2>/dev/null)" != "$1" ] || echo "$pid"
  done
}
# User and system CPU ticks (including reaped children) of every process named $1 in the node
# ns, as "user sys".
cpu_split_of() {
  [ "$1" = - ] && { echo "0 0"; return; }
  local u=0 s=0 pid pu ps
  for pid in $(pids_of "$1"); do
    read -r pu ps < <(awk '{print $14+$16, $15+$17}' /proc/$pid/stat 2>/dev/null || echo "0 0")
    u=$((u + pu)); s=$((s + ps))
  done
  echo "$u $s"
}
# CPU seconds (user+sys, including reaped children) of every process named $1 in the node ns.
cpu_of() {
  local u s
  read -r u s < <(cpu_split_of "$1")
  echo "scale=3; ($u + $s) / $TCK" | bc
}
# Idle CPU ticks of the whole machine (idle and iowait).
machine_idle() { awk '/^cpu /{print $5+$6}' /proc/stat; }
# Busy CPU ticks of the whole machine (every CPU, every process, interrupts included).
machine_busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
# Resident memory in KiB of every process named $1 in the node ns.
rss_of() {
  local total=0 pid
  for pid in $(pids_of "$1"); do
    total=$((total + $(awk '/VmRSS/ {print $2}' /proc/$pid/status 2>/dev/null || echo 0)))
  done
  echo $total
}
rec() { printf "%s\t%s\t%s\t%s\n" "$1" "$2" "$3" "$4" >> "$RAW"; }
json() { sed -n "s/.*\"$2\":\([0-9.e+-]*\).*/\1/p" <<<"$1"; }

echo "== waiting for every target to answer"
for t in "${TARGETS[@]}"; do
  set -- $t
  for _ in $(seq 1 100); do
    if inns "$CL" "$LG" rr --target "$3" --count 10 >/dev/null 2>&1; then break; fi
    sleep 0.1
  done
done

if [ -z "${ONLY_CP:-}" ]; then
if [ -z "${ONLY_CONN:-}" ]; then
for rep in $(seq 1 "$REPS"); do
  for t in "${TARGETS[@]}"; do
    set -- $t
    name=$1 bulk=$2 udp=$4 proc=$5
    if [ -n "${ONLY_TARGETS:-}" ] && [[ " $ONLY_TARGETS " != *" $name "* ]]; then continue; fi
    echo "== rep $rep/$REPS: $name"
    for streams in 1 8; do
      c0=$(cpu_of "$proc")
      r=$(inns "$CL" iperf3 -c "${bulk%:*}" -p "${bulk#*:}" -P "$streams" -t "$SECS" -J 2>/dev/null || true)
      c1=$(cpu_of "$proc")
      bytes=$(jq -r '.end.sum_received.bytes // 0 | floor' <<<"$r" 2>/dev/null || echo 0)
      if [ "$bytes" -gt 0 ]; then
        rec "$name" "tcp_bulk_${streams}_gbps" "$(echo "scale=3; $bytes * 8 / $SECS / 1000000000" | bc)" "$rep"
        [ "$streams" = 1 ] && [ "$proc" != - ] && rec "$name" "cpu_s_per_gb" "$(echo "scale=3; ($c1 - $c0) * 1000000000 / $bytes" | bc)" "$rep"
      fi
    done
    if [ "$udp" != - ]; then
      r=$(inns "$CL" "$LG" udp-flood --target "$udp" --secs 3 --size 100)
      rec "$name" udp_flood_pps "$(json "$r" delivered_pps)" "$rep"; rec "$name" udp_flood_loss "$(json "$r" loss)" "$rep"
      # Loss at the same offered load for everyone: a flat-out flood gives the client more CPU
      # (and so more packets to lose) the less CPU the proxy takes.
      r=$(inns "$CL" "$LG" udp-flood --target "$udp" --secs 3 --size 100 --pps 100000)
      rec "$name" udp_paced_loss "$(json "$r" loss)" "$rep"
    fi
  done
done

fi  # ONLY_CONN

# Request/response latency in short rounds that take turns between targets, each round starting
# at the next target: a disturbance of this shared VM then lands on every target alike instead of
# on one target's whole block, and the medians compare like with like. $1 is appended to each
# metric's name.
#
# Each round also takes the targets in another order (a stride through the list coprime with its
# length), so that no target always follows the same one. With the order only rotated, ours always
# came right after the direct path, and in the halt-polling rounds whatever runs after the direct
# path starts in a state where the scheduler moves its threads to the other CPU about once a
# request: measured by swapping the two copies of our proxy in the list, the one placed after
# direct ran 20.3-22.7 us UDP p50 and the other 17.7-18.0 (nginx 17.1-17.6); before the swap,
# 21.3-22.4 against 17.0-17.5.
gcd() { local a=$1 b=$2 t; while [ "$b" -ne 0 ]; do t=$((a % b)); a=$b; b=$t; done; echo "$a"; }
STRIDES=()
for k in $(seq 1 $((${#TARGETS[@]} - 1))); do
  [ "$(gcd "$k" ${#TARGETS[@]})" = 1 ] && STRIDES+=("$k")
done
# Calls `$3 round name echo_addr udp proc` for every target, in $1 rounds each taking the
# targets in another order; $2 names the rounds in the progress lines.
interleaved() {
  local rounds=$1 label=$2 each=$3 round i stride
  for round in $(seq 1 "$rounds"); do
    stride=${STRIDES[$(((round - 1) % ${#STRIDES[@]}))]}
    echo "== $label round $round/$rounds, stride $stride"
    for i in $(seq 0 $((${#TARGETS[@]} - 1))); do
      set -- ${TARGETS[$(((round + i * stride) % ${#TARGETS[@]}))]}
      if [ -n "${ONLY_TARGETS:-}" ] && [[ " $ONLY_TARGETS " != *" $1 "* ]]; then continue; fi
      "$each" "$round" "$1" "$3" "$4" "$5"
    done
  done
}

# One target's request/response latency; $sfx (from latency_rounds) is appended to each metric.
latency_once() {
  local round=$1 name=$2 echo_addr=$3 udp=$4 r
  r=$(inns "$CL" $CLIENT_PIN "$LG" rr --target "$echo_addr" --count 5000 --size 100)
  rec "$name" "rr${sfx}_p50_us" "$(json "$r" p50_us)" "$round"; rec "$name" "rr${sfx}_p99_us" "$(json "$r" p99_us)" "$round"
  if [ "$udp" != - ]; then
    r=$(inns "$CL" $CLIENT_PIN "$LG" udp-rr --target "$udp" --count 5000 --size 100)
    rec "$name" "udp_rr${sfx}_p50_us" "$(json "$r" p50_us)" "$round"; rec "$name" "udp_rr${sfx}_p99_us" "$(json "$r" p99_us)" "$round"
  fi
}
latency_rounds() {
  local sfx=$1
  interleaved "$RR_ROUNDS" "latency${sfx:+ ($sfx)}" latency_once
}

# The connection rate, in the same interleaved rounds as the latency (CONN_ROUNDS, 4 s each), for
# the same reason: run inside each target's block of repetitions, a busy spell of the host's
# neighbours fell on one target's whole row (in the run at ad99117 ours came out at 0.71 of
# nginx; 10 interleaved rounds outside the bench the same hour gave 0.94).
conn_once() {
  local round=$1 name=$2 echo_addr=$3 proc=$5 r cps u0 s0 u1 s1 m0 m1 i0 i1
  read -r u0 s0 < <(cpu_split_of "$proc"); m0=$(machine_busy); i0=$(machine_idle)
  r=$(inns "$CL" "$LG" crr --target "$echo_addr" --secs 4 --conc 4)
  read -r u1 s1 < <(cpu_split_of "$proc"); m1=$(machine_busy); i1=$(machine_idle)
  cps=$(json "$r" cps)
  # The share of the machine's CPU time left idle: what the rate lost beyond the CPU spent.
  rec "$name" crr_idle_share "$(echo "scale=4; ($i1 - $i0) / ($i1 - $i0 + $m1 - $m0)" | bc)" "$round"
  rec "$name" crr_cps "$cps" "$round"; rec "$name" crr_p99_us "$(json "$r" p99_us)" "$round"
  # The profile of a connection: what the whole machine spends on one (client, server, proxy
  # and the kernel's network path, NAT included), and the proxy's own user and system time, in
  # microseconds.
  rec "$name" crr_machine_us_per_conn "$(echo "scale=1; ($m1 - $m0) * 1000000 / $TCK / ($cps * 4)" | bc)" "$round"
  if [ "$proc" != - ]; then
    rec "$name" cpu_s_per_1k_conns "$(echo "scale=4; ($u1 - $u0 + $s1 - $s0) * 1000 / $TCK / ($cps * 4)" | bc)" "$round"
    rec "$name" crr_user_us_per_conn "$(echo "scale=2; ($u1 - $u0) * 1000000 / $TCK / ($cps * 4)" | bc)" "$round"
    rec "$name" crr_sys_us_per_conn "$(echo "scale=2; ($s1 - $s0) * 1000000 / $TCK / ($cps * 4)" | bc)" "$round"
  fi
}
interleaved "$CONN_ROUNDS" connection-rate conn_once

# The scheduler's profile of a connection round (examples/schedprofile.rs), in rounds of their
# own, since tracing slows every party: 2 s of `perf sched record` in the middle of a 4 s round.
# It says where the idle share above comes from: on these VMs a vCPU with nothing to run halts,
# and a task woken onto it waits until the host runs that vCPU again, while the CPU counts as
# idle. The proxy's threads are every thread of its processes (and, for socat, any thread so
# named: it forks per connection).
sched_once() {
  local round=$1 name=$2 echo_addr=$3 proc=$5 tids="" pid lg cps r k data=$WORK/sched.data
  if [ "$proc" != - ]; then
    for pid in $(pids_of "$proc"); do
      tids+="$(ls /proc/$pid/task | paste -sd, -),"
    done
  fi
  inns "$CL" "$LG" crr --target "$echo_addr" --secs 4 --conc 4 >"$WORK/sched.crr" &
  lg=$!
  sleep 1
  perf sched record -q -o "$data" -- sleep 2 >/dev/null 2>&1 || echo "   perf sched record failed for $name" >&2
  wait "$lg"
  cps=$(json "$(cat "$WORK/sched.crr")" cps)
  if r=$(perf script -F cpu,time,event,trace -i "$data" 2>/dev/null | "$SCHEDPROF" --cps "$cps" --tids "$tids" --comm "$proc"); then
    for k in idle_share idle_waiting_share idle_wakes_per_conn idle_wake_p50_us idle_wake_p90_us proxy_share proxy_wakes_per_conn proxy_wait_us; do
      [ "$proc" != - ] || [ "${k#proxy_}" = "$k" ] || continue   # the direct path has no proxy
      rec "$name" "sched_$k" "$(json "$r" "$k")" "$round"
    done
    rec "$name" sched_crr_cps "$cps" "$round"
  fi
  rm -f "$data" "$data.old"
}
[ "$SCHED_ROUNDS" = 0 ] || interleaved "$SCHED_ROUNDS" "connection-rate under perf sched" sched_once
[ -n "${ONLY_CONN:-}" ] || {
CLIENT_PIN=""
latency_rounds ""

# On a guest whose halt polling is off (guest_halt_poll_ns=0, as on these machines), every
# wake-up of an idle vCPU is a halt exit to the host plus an inter-processor interrupt, about
# 25 us: request/response latency then counts how many of a request's wake-ups cross vCPUs,
# which is set by where the scheduler happened to put client, proxy and server, not by the proxy.
# The same rounds again with the kernel's default poll window (200 us) measure the proxies
# themselves. Every target gets the same setting; the old value is restored (also on exit).
if [ -w "$HALTPOLL" ] && [ "${HALTPOLL_ROUNDS:-1}" != 0 ] && [ "$(cat "$HALTPOLL")" = 0 ]; then
  echo 200000 > "$HALTPOLL"
  latency_rounds _hp
  echo "$HALTPOLL_WAS" > "$HALTPOLL"
fi

# The same rounds once more with every party on CPU 0: client, proxies, peers and server. No
# wake-up then crosses vCPUs, whatever the halt-polling setting, so the rows measure the work
# on a request's path alone. Threads and processes made later (socat's children) inherit the
# mask; every mask is given back afterwards.
set_affinity() {
  local ns pid
  for ns in $ND $SV; do
    for pid in $(ip netns pids "$ns"); do taskset -apc "$1" "$pid" >/dev/null 2>&1 || true; done
  done
}
if [ "${PIN_ROUNDS:-1}" != 0 ]; then
  set_affinity 0
  CLIENT_PIN="taskset -c 0"
  latency_rounds _pin
  CLIENT_PIN=""
  set_affinity "0-$(($(nproc) - 1))"
fi

echo "== memory per idle proxied connection ($IDLE_CONNS connections)"
for t in "${TARGETS[@]}"; do
  set -- $t
  name=$1 echo_addr=$3 proc=$5
  case "$proc" in -|socat) continue ;; esac   # socat forks a process per connection
  [ "$name" = nginx-nat ] && continue   # the same nginx processes as the nginx row; NAT is in the kernel
  if [ -n "${ONLY_TARGETS:-}" ] && [[ " $ONLY_TARGETS " != *" $name "* ]]; then continue; fi
  m0=$(rss_of "$proc")
  coproc HOLD { inns "$CL" bash -c "ulimit -n $(ulimit -Hn); exec $LG hold --target $echo_addr --conns $IDLE_CONNS --secs 120"; }
  read -r ready held errors <&"${HOLD[0]}"
  m1=$(rss_of "$proc")
  rec "$name" idle_kib_per_conn "$(echo "scale=2; ($m1 - $m0) / $held" | bc)" 1
  echo "   $name: $held held ($errors errors), RSS $m0 -> $m1 KiB"
  exec {HOLD[1]}>&-
  wait "$HOLD_PID" 2>/dev/null || true
  server_settled
done

}  # ONLY_CONN
fi  # ONLY_CP

echo "== control plane: programming N service ports from the file"
server_settled
ip -n "$CP" link set lo up
ip link add upbp0 netns "$CP" type veth peer name upbp1 netns "$SV"
ip -n "$CP" addr add 10.10.3.1/24 dev upbp0; ip -n "$CP" link set upbp0 up
ip -n "$SV" addr add 10.10.3.2/24 dev upbp1; ip -n "$SV" link set upbp1 up
ip -n "$CP" route add default via 10.10.3.2
# The address of service s$1 of the generated files.
svc_addr() { echo "10.96.$(($1 / 250 + 1)).$(($1 % 250 + 1)):9000"; }
# The service of s1..s$1 the proxy opens last: it opens them in name order, where s9999 comes
# after s10000. Programming is timed to the moment this one and the highest-numbered one both
# answer: the proxy writes rules while it still opens listeners (src/proxier/early_rules.rs),
# so the first services answer long before the last.
last_opened() { seq 1 "$1" | LC_ALL=C sort | tail -1; }

# Starts the proxy in the control-plane namespace with the given arguments (its log to $2),
# waits until every service address in $1 (space-separated) answers, and prints how many
# seconds that took.
start_and_time() {
  local targets=$1 log=$2 t0 t1 t ok probes=${2%.log}.probes.log
  shift 2
  t0=$(date +%s.%N)
  echo "t0 $t0" >"$probes"
  inns "$CP" bash -c "ulimit -n $(ulimit -Hn); exec $BIN $*" >/dev/null 2>"$log" &
  for _ in $(seq 1 1200); do
    ok=1
    for t in $targets; do
      # Each attempt's start, target and outcome, to tell later where the time went; the clock
      # is bash's own, so the log adds no process to the loop it times.
      printf '%s %s ' "$EPOCHREALTIME" "$t" >>"$probes"
      inns "$CP" "$LG" rr --target "$t" --count 1 --connect-ms 50 >>"$probes" 2>&1 \
        && echo ok >>"$probes" || { echo failed >>"$probes"; ok=; break; }
    done
    [ -n "$ok" ] && break
    sleep 0.05
  done
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc
}

# The proxy's pid in the control-plane namespace (empty if it died).
proxy_pid() {
  local p
  for p in $(ip netns pids "$CP"); do
    if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = userspace-proxy ]; then echo "$p"; return; fi
  done
}

# The file source is timed with each NAT portal backend: iptables (the default, kube-proxy's
# chains) and nftables (portals as map elements); rows of the latter carry "_nft".
for n in $CP_SIZES; do
for portal in iptables nftables; do
  sfx=$([ "$portal" = nftables ] && echo _nft || true)
  gen() {  # $1 = number of services; each one TCP port, one endpoint (the server's echo)
    cat <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: userspace
healthzBindAddress: ""
metricsBindAddress: ""
hostnameOverride: bench-cp
serviceClusterIPRange: 10.96.0.0/12
portalMode: $portal
EOF
    for i in $(seq 1 "$1"); do
      printf -- "---\napiVersion: v1\nkind: Service\nmetadata: {name: s%d, namespace: bench}\nspec: {clusterIP: 10.96.%d.%d, ports: [{name: p, port: 9000}]}\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: s%d, namespace: bench}\nsubsets: [{addresses: [{ip: 10.10.2.2}], ports: [{name: p, port: 9000}]}]\n" "$i" $((i / 250 + 1)) $((i % 250 + 1)) "$i"
    done
  }
  gen "$n" > "$WORK/cp.yaml"
  last=$(svc_addr "$n")
  rec userspace-proxy "program${sfx}_${n}_s" "$(start_and_time "$(svc_addr "$(last_opened "$n")") $last" "$OUT/cp$sfx-$n.log" --config "$WORK/cp.yaml")" 1
  pid=$(proxy_pid)
  [ -n "$pid" ] || { echo "proxy with $n services died; see $OUT/cp$sfx-$n.log" >&2; exit 1; }
  [ -z "$sfx" ] && rec userspace-proxy "rss_${n}_mib" "$(echo "scale=1; $(awk '/VmRSS/ {print $2}' /proc/$pid/status) / 1024" | bc)" 1
  # What a node with N services costs each new connection: the portal lookups and the guard on
  # the proxy port (linear chains with iptables, maps with nftables).
  r=$(inns "$CP" "$LG" crr --target "$last" --secs 3 --conc 4)
  rec userspace-proxy "crr${sfx}_at_${n}_cps" "$(json "$r" cps)" 1
  # Each failure held one of the 4 clients for its 2 s timeout: the rate above is only honest
  # beside it.
  rec userspace-proxy "crr${sfx}_at_${n}_errors" "$(json "$r" errors)" 1
  # One more service, ADD_REPS times: time from the file write (plus SIGHUP, the immediate-reload
  # path; the file is otherwise polled every 500 ms) to its first answer.
  for k in $(seq 1 "$ADD_REPS"); do
    m=$((n + k))
    gen "$m" > "$WORK/cp.next"
    # The last port answers as soon as its rule is written; the sync that wrote it then publishes
    # status for every port. Let it finish: the measure is one more service in steady state.
    sleep 1
    new="10.96.$((m / 250 + 1)).$((m % 250 + 1)):9000"
    coproc PROBE { inns "$CP" "$LG" probe --target "$new" --within-ms 10000; }
    read -r _started <&"${PROBE[0]}"
    mv "$WORK/cp.next" "$WORK/cp.yaml"
    kill -HUP "$pid"
    read -r result <&"${PROBE[0]}"
    wait "$PROBE_PID" 2>/dev/null || true
    rec userspace-proxy "add_one${sfx}_at_${n}_ms" "$(json "$result" ms)" "$k"
  done
  kill "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  inns "$CP" "$BIN" --config "$WORK/cp.yaml" --cleanup 2>/dev/null || true
  echo "   $n services, $portal portals: $(grep -c . "$RAW") rows so far"
done
done

echo "== control plane: the same through the Kubernetes API source"
# A stand-in API server speaking the real list/watch protocol (examples/fakeapi.rs), on the
# proxy namespace's loopback, preloaded with N services and their EndpointSlices. The proxy
# lists, watches, and programs the same listeners and iptables rules as from the file.
for n in $CP_SIZES; do
  mkfifo "$WORK/api.in"
  inns "$CP" "$FAKEAPI" --services "$n" --backend 10.10.2.2:9000 --secs 300 <"$WORK/api.in" >"$WORK/api.out" &
  api_pid=$!
  exec 7>"$WORK/api.in"
  for _ in $(seq 1 600); do [ -s "$WORK/api.out" ] && break; sleep 0.05; done
  url=$(head -1 "$WORK/api.out")
  printf 'apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: userspace\nhealthzBindAddress: ""\nmetricsBindAddress: ""\nhostnameOverride: bench-cp\n' >"$WORK/cp-api.yaml"
  last=$(svc_addr "$n")
  rec userspace-proxy "program_api_${n}_s" "$(start_and_time "$(svc_addr "$(last_opened "$n")") $last" "$OUT/cp-api-$n.log" --config "$WORK/cp-api.yaml" --master "$url")" 1
  pid=$(proxy_pid)
  [ -n "$pid" ] || { echo "proxy with $n API services died; see $OUT/cp-api-$n.log" >&2; exit 1; }
  for k in $(seq 1 "$ADD_REPS"); do
    sleep 1   # steady state, as above
    coproc PROBE { inns "$CP" "$LG" probe --target "10.100.0.$k:9000" --within-ms 10000; }
    read -r _started <&"${PROBE[0]}"
    echo "add $k" >&7
    read -r result <&"${PROBE[0]}"
    wait "$PROBE_PID" 2>/dev/null || true
    rec userspace-proxy "add_one_api_at_${n}_ms" "$(json "$result" ms)" "$k"
  done
  kill "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  exec 7>&-
  wait "$api_pid" 2>/dev/null || true
  rm -f "$WORK/api.in" "$WORK/api.out"
  inns "$CP" "$BIN" --config "$WORK/cp-api.yaml" --cleanup 2>/dev/null || true
done

"$REPORT" "$RAW" "$OUT"
echo "== results: $OUT/results.md, $OUT/chart.svg"
cat "$OUT/results.md"
