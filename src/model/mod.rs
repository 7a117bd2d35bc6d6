//! What the cluster wants: plain data, no I/O and no Kubernetes API types.
//!
//! A [`DesiredState`] is a complete snapshot of every service port this node must proxy and the
//! endpoints behind each one. Sources (the YAML file, the Kubernetes API) build snapshots with the
//! conversion code in [`convert`]; the proxier is the only consumer and the only code that turns
//! a snapshot into sockets and rules.

pub mod cluster_ip;
pub mod convert;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Default ClientIP affinity timeout, `v1.DefaultClientIPServiceAffinitySeconds` (3 h).
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);

/// `namespace/name:port`, the key kube-proxy uses for a service port and the comment on its rules.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub name: String,
    /// Name of the port within the Service; empty for a single unnamed port.
    pub port: String,
}

impl ServicePortName {
    /// Builds a name from its three parts.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        port: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            port: port.into(),
        }
    }
}

impl fmt::Display for ServicePortName {
    /// `ns/name:port`, or `ns/name` when the port is unnamed, exactly as kube-proxy prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
        }
    }
}

/// Transport protocol of a service port. SCTP is not proxied (skipped with a warning).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP: one backend connection per client connection.
    Tcp,
    /// UDP: one backend session per client address, expired when idle.
    Udp,
}

impl Protocol {
    /// Lower-case name as iptables and nft spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Session affinity of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Affinity {
    /// Plain round robin.
    None,
    /// Pin each client IP to one endpoint until it has been idle for `timeout`.
    ClientIp {
        /// Idle time after which the pin is forgotten.
        timeout: Duration,
    },
}

/// Traffic policy for one direction of traffic (`internalTrafficPolicy` / `externalTrafficPolicy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TrafficPolicy {
    /// Any ready endpoint in the cluster.
    #[default]
    Cluster,
    /// Only endpoints on this node.
    Local,
}

/// One port of one Service, with every address it is reachable on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `namespace/name:port`.
    pub name: ServicePortName,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The virtual IP.
    pub cluster_ip: IpAddr,
    /// The service port (the port clients connect to on every portal IP).
    pub port: u16,
    /// `spec.ports[].nodePort`, if any.
    pub node_port: Option<u16>,
    /// `spec.externalIPs`, in the order given.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` (hostname-only entries are ignored, as upstream).
    pub load_balancer_ips: Vec<IpAddr>,
    /// Session affinity.
    pub affinity: Affinity,
    /// `spec.internalTrafficPolicy`.
    pub internal_policy: TrafficPolicy,
    /// `spec.externalTrafficPolicy`.
    pub external_policy: TrafficPolicy,
    /// `spec.healthCheckNodePort` of a `LoadBalancer` service with `externalTrafficPolicy:
    /// Local`: load balancers ask it whether this node has a local endpoint.
    pub health_check_node_port: Option<u16>,
}

impl ServicePort {
    /// Every `ip:port` a client may use to reach this service port through a portal rule, in
    /// kube-proxy's order: cluster IP, external IPs, load-balancer ingress IPs. NodePorts are not
    /// included: they match any local address.
    pub fn portal_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        std::iter::once(self.cluster_ip)
            .chain(self.external_ips.iter().copied())
            .chain(self.load_balancer_ips.iter().copied())
            .map(move |ip| SocketAddr::new(ip, self.port))
    }
}

#[cfg(test)]
impl ServicePort {
    /// A plain ClusterIP service port for tests: `namespace/name`, unnamed port, no NodePort,
    /// external or load-balancer IPs, no affinity, cluster-wide traffic policies.
    pub(crate) fn plain(
        namespace: &str,
        name: &str,
        protocol: Protocol,
        cluster_ip: &str,
        port: u16,
    ) -> Self {
        ServicePort {
            name: ServicePortName::new(namespace, name, ""),
            protocol,
            cluster_ip: cluster_ip.parse().expect("a test address"),
            port,
            node_port: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            affinity: Affinity::None,
            internal_policy: TrafficPolicy::Cluster,
            external_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
        }
    }
}

/// One backend address of a service port, with the conditions that decide whether it is used.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// Pod IP and target port.
    pub addr: SocketAddr,
    /// `conditions.ready` (nil means ready).
    pub ready: bool,
    /// `conditions.serving` (nil defers to ready).
    pub serving: bool,
    /// `conditions.terminating` (nil means false).
    pub terminating: bool,
    /// `nodeName`, used by the `Local` traffic policies.
    pub node_name: Option<String>,
}

impl Endpoint {
    /// A ready, serving, non-terminating endpoint: what `v1 Endpoints` addresses are.
    pub fn ready(addr: SocketAddr) -> Self {
        Self {
            addr,
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
        }
    }
}

/// Picks the endpoints traffic should go to, by kube-proxy's rules: the ready ones; if none is
/// ready, the ones that are still serving while terminating (KEP-1669), so that a rolling update
/// does not drop connections. The result is sorted and free of duplicates.
pub fn usable_endpoints<'a>(
    endpoints: impl IntoIterator<Item = &'a Endpoint> + Clone,
) -> Vec<SocketAddr> {
    let mut ready: Vec<SocketAddr> = endpoints
        .clone()
        .into_iter()
        .filter(|e| e.ready)
        .map(|e| e.addr)
        .collect();
    if ready.is_empty() {
        ready = endpoints
            .into_iter()
            .filter(|e| e.serving && e.terminating)
            .map(|e| e.addr)
            .collect();
    }
    ready.sort_unstable();
    ready.dedup();
    ready
}

/// A complete snapshot of what this node must proxy.
///
/// Persistent maps: a snapshot is cloned in O(1), a source patches its working copy in
/// O(log n) per change, and two snapshots that share history are compared in O(changes)
/// ([`imbl::OrdMap::diff`] skips shared subtrees). That is what keeps one change among 10,000
/// services cheap from the watch event to the sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Every service port, keyed by name.
    pub services: imbl::OrdMap<ServicePortName, Arc<ServicePort>>,
    /// Endpoints of each service port (absent or empty: no endpoints).
    pub endpoints: imbl::OrdMap<ServicePortName, Arc<Vec<Endpoint>>>,
}

impl DesiredState {
    /// The addresses traffic to `name` may go to from a client inside the cluster, after the
    /// ready/terminating fallback and `internalTrafficPolicy` (`node` is this node's name).
    pub fn backends(&self, name: &ServicePortName, node: &str) -> Vec<SocketAddr> {
        let Some(eps) = self.endpoints.get(name) else {
            return Vec::new();
        };
        let local_only = self
            .services
            .get(name)
            .is_some_and(|s| s.internal_policy == TrafficPolicy::Local);
        if local_only {
            usable_endpoints(eps.iter().filter(|e| e.node_name.as_deref() == Some(node)))
        } else {
            usable_endpoints(eps.iter())
        }
    }
}

impl DesiredState {
    /// The addresses traffic to `name` from outside the cluster (NodePort, external and
    /// load-balancer IPs) may go to, when that differs from [`DesiredState::backends`]: with
    /// `externalTrafficPolicy: Local`, only this node's endpoints (the client's source address
    /// is kept, and a node without a local endpoint refuses, so the load balancer moves on).
    /// `None` when external traffic is treated like internal traffic.
    pub fn external_backends(&self, name: &ServicePortName, node: &str) -> Option<Vec<SocketAddr>> {
        let svc = self.services.get(name)?;
        if svc.external_policy != TrafficPolicy::Local {
            return None;
        }
        let eps = self
            .endpoints
            .get(name)
            .map(|e| e.as_slice())
            .unwrap_or_default();
        Some(usable_endpoints(
            eps.iter().filter(|e| e.node_name.as_deref() == Some(node)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(addr: &str, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            ready,
            serving,
            terminating,
            node_name: None,
        }
    }

    #[test]
    fn service_port_name_display_matches_kube_proxy() {
        assert_eq!(
            ServicePortName::new("default", "web", "http").to_string(),
            "default/web:http"
        );
        assert_eq!(
            ServicePortName::new("default", "web", "").to_string(),
            "default/web"
        );
    }

    #[test]
    fn ready_endpoints_win_over_terminating() {
        let eps = [
            ep("10.0.0.1:80", true, true, false),
            ep("10.0.0.2:80", false, true, true),
            ep("10.0.0.1:80", true, true, false),
        ];
        assert_eq!(
            usable_endpoints(eps.iter()),
            vec!["10.0.0.1:80".parse().unwrap()]
        );
    }

    #[test]
    fn falls_back_to_serving_terminating_when_none_ready() {
        let eps = [
            ep("10.0.0.2:80", false, true, true),
            ep("10.0.0.3:80", false, false, true),
            ep("10.0.0.4:80", false, true, false),
        ];
        assert_eq!(
            usable_endpoints(eps.iter()),
            vec!["10.0.0.2:80".parse().unwrap()]
        );
    }

    #[test]
    fn internal_local_policy_keeps_only_this_nodes_endpoints() {
        let name = ServicePortName::new("ns", "svc", "");
        let mut state = DesiredState::default();
        state.services.insert(
            name.clone(),
            Arc::new(ServicePort {
                name: name.clone(),
                protocol: Protocol::Tcp,
                cluster_ip: "10.96.0.1".parse().unwrap(),
                port: 80,
                node_port: None,
                external_ips: vec![],
                load_balancer_ips: vec![],
                affinity: Affinity::None,
                internal_policy: TrafficPolicy::Local,
                external_policy: TrafficPolicy::Cluster,
                health_check_node_port: None,
            }),
        );
        let mut a = ep("10.0.0.1:80", true, true, false);
        a.node_name = Some("n1".into());
        let mut b = ep("10.0.0.2:80", true, true, false);
        b.node_name = Some("n2".into());
        state.endpoints.insert(name.clone(), Arc::new(vec![a, b]));
        assert_eq!(
            state.backends(&name, "n2"),
            vec!["10.0.0.2:80".parse().unwrap()]
        );
        assert!(state.backends(&name, "n3").is_empty());
        // External traffic follows its own policy: Cluster here, so no separate set.
        assert_eq!(state.external_backends(&name, "n2"), None);
        let svc = Arc::make_mut(state.services.get_mut(&name).unwrap());
        svc.internal_policy = TrafficPolicy::Cluster;
        svc.external_policy = TrafficPolicy::Local;
        assert_eq!(state.backends(&name, "n2").len(), 2);
        assert_eq!(
            state.external_backends(&name, "n1"),
            Some(vec!["10.0.0.1:80".parse().unwrap()])
        );
        assert_eq!(state.external_backends(&name, "n3"), Some(vec![]));
    }
}
