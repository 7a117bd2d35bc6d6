#!/usr/bin/env bash
# make demo: userspace-proxy doing its job, in throwaway network namespaces.
#
#   demo-pod ns: three backends (pod-a/b/c) on 10.244.0.11-13, TCP :8080 and UDP :5353
#   demo-node ns: userspace-proxy with a ClusterIP TCP+UDP service, a NodePort service and a
#                 ClientIP-affinity service; requests go to the virtual IPs from the node and a pod
#
# Every address used here exists only inside these namespaces; everything is removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "make demo needs root (it creates network namespaces and iptables rules inside them)." >&2
  exit 1
fi
need=()
for t in ip:iproute2 iptables:iptables socat:socat; do
  command -v "${t%%:*}" >/dev/null || need+=("${t##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

echo "== building"
cargo build --release --quiet
BIN=$PWD/target/release/userspace-proxy

NODE=demo-node-$$ POD=demo-pod-$$
WORK=$(mktemp -d)
PROXY_PID=
cleanup() {
  [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null && wait "$PROXY_PID" 2>/dev/null || true
  ip netns pids "$POD" 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns del "$NODE" 2>/dev/null || true
  ip netns del "$POD" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== network: namespaces $NODE (node) and $POD (pods), joined by a veth pair"
ip netns add "$NODE"; ip netns add "$POD"
ip -n "$NODE" link set lo up; ip -n "$POD" link set lo up
ip link add updemo$$n netns "$NODE" type veth peer name updemo$$p netns "$POD"
ip -n "$NODE" addr add 10.244.0.1/24 dev updemo$$n
ip -n "$POD" addr add 10.244.0.2/24 dev updemo$$p
for i in 11 12 13; do ip -n "$POD" addr add 10.244.0.$i/24 dev updemo$$p; done
ip -n "$NODE" link set updemo$$n up; ip -n "$POD" link set updemo$$p up
ip -n "$NODE" route add default via 10.244.0.2   # a node has a default route; host IP = 10.244.0.1
ip -n "$POD" route add default via 10.244.0.1

echo "== backends: pod-a 10.244.0.11, pod-b 10.244.0.12, pod-c 10.244.0.13"
for i in 11 12 13; do
  name=pod-$(printf "\\x$(printf %x $((97 + i - 11)))")
  ip netns exec "$POD" socat TCP4-LISTEN:8080,bind=10.244.0.$i,fork,reuseaddr SYSTEM:"echo hello from $name" &
  ip netns exec "$POD" socat UDP4-RECVFROM:5353,bind=10.244.0.$i,fork SYSTEM:"echo udp reply from $name" &
done

cat > "$WORK/proxy.yaml" <<'EOF'
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: userspace
healthzBindAddress: ""
metricsBindAddress: ""
hostnameOverride: demo-node
udpIdleTimeout: 1s
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: v1
kind: Endpoints
metadata: {name: web, namespace: default}
subsets:
- addresses: [{ip: 10.244.0.11}, {ip: 10.244.0.12}, {ip: 10.244.0.13}]
  ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: nodeport, namespace: default}
spec:
  type: NodePort
  ports: [{name: http, port: 8000, nodePort: 30080}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: nodeport, namespace: default}
subsets:
- addresses: [{ip: 10.244.0.11}, {ip: 10.244.0.12}, {ip: 10.244.0.13}]
  ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  clusterIP: 10.96.0.30
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: sticky, namespace: default}
subsets:
- addresses: [{ip: 10.244.0.11}, {ip: 10.244.0.12}, {ip: 10.244.0.13}]
  ports: [{name: http, port: 8080}]
EOF

echo "== starting userspace-proxy in $NODE (log: $WORK/proxy.log)"
ip netns exec "$NODE" "$BIN" --config "$WORK/proxy.yaml" >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
for _ in $(seq 1 100); do
  if ip netns exec "$NODE" socat -T1 - TCP4:10.96.0.10:80,connect-timeout=1 </dev/null 2>/dev/null | grep -q hello; then break; fi
  sleep 0.1
done
grep -E "opened service port" "$WORK/proxy.log" | sed 's/\x1b\[[0-9;]*m//g' | sed 's/^/   /'

tcp() { ip netns exec "$1" socat -T2 - "TCP4:$2,connect-timeout=2" </dev/null 2>&1 | head -1; }
udp() { echo ping | ip netns exec "$1" socat -T1 - "UDP4:$2" 2>&1 | head -1; }

echo
echo "== 6 TCP requests to ClusterIP 10.96.0.10:80 from the node (OUTPUT -> DNAT -> proxy):"
for _ in 1 2 3 4 5 6; do echo "   $(tcp "$NODE" 10.96.0.10:80)"; done
echo "== 6 TCP requests to ClusterIP 10.96.0.10:80 from a pod (PREROUTING -> REDIRECT -> proxy):"
for _ in 1 2 3 4 5 6; do echo "   $(tcp "$POD" 10.96.0.10:80)"; done
echo "== 3 UDP requests to ClusterIP 10.96.0.10:53 from a pod:"
for _ in 1 2 3; do echo "   $(udp "$POD" 10.96.0.10:53)"; done
echo "== 3 TCP requests to the NodePort 10.244.0.1:30080 from a pod:"
for _ in 1 2 3; do echo "   $(tcp "$POD" 10.244.0.1:30080)"; done
echo "== 5 TCP requests to the ClientIP-affinity service 10.96.0.30:80 from a pod (all one backend):"
for _ in 1 2 3 4 5; do echo "   $(tcp "$POD" 10.96.0.30:80)"; done

echo
echo "== the nat rules, commented with the service names (iptables -t nat -S):"
ip netns exec "$NODE" iptables -t nat -S | grep -E "KUBE-(PORTALS|NODEPORT)" | sed 's/^/   /'

echo
echo "== stopping (SIGTERM) and tearing everything down"
kill -TERM "$PROXY_PID"; wait "$PROXY_PID" || true; PROXY_PID=
ip netns exec "$NODE" "$BIN" --config "$WORK/proxy.yaml" --cleanup 2>/dev/null
echo "   rules left after --cleanup: $(ip netns exec "$NODE" iptables-save 2>/dev/null | grep -c KUBE- || true)"
echo "done."
