//! Kubernetes objects (k8s-openapi types) to the model.
//!
//! Shared by every source, so the YAML file and the Kubernetes API give the same answer for the
//! same objects. The functions are pure: a source decides which objects exist, this module
//! decides what they mean, with kube-proxy's rules (`ShouldSkipService`, port-name matching,
//! ready/terminating fallback).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{
    Affinity, Endpoint, Protocol, ServicePort, ServicePortName, TrafficPolicy,
    DEFAULT_AFFINITY_TIMEOUT,
};

/// Label that ties an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// A field of an object that cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: field {field}: {message}")]
pub struct Error {
    /// `Service default/web`, `EndpointSlice default/web-abc`.
    pub object: String,
    /// Path of the field, e.g. `spec.ports[0].protocol`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// Why a Service produces no service ports at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// `clusterIP: None`: clients resolve the pods directly.
    Headless,
    /// `type: ExternalName`: a DNS alias, nothing to proxy.
    ExternalName,
    /// `clusterIP: ""` on an object from the API server (never allocated).
    NoClusterIp,
}

impl Skip {
    /// Human-readable reason for the logs.
    pub fn reason(self) -> &'static str {
        match self {
            Skip::Headless => "headless service (clusterIP: None)",
            Skip::ExternalName => "ExternalName service",
            Skip::NoClusterIp => "service has no cluster IP",
        }
    }
}

/// A port of a service that is deliberately not proxied, for a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedPort {
    /// The port that is skipped.
    pub name: ServicePortName,
    /// Why.
    pub reason: String,
}

/// `namespace/name` of an object's metadata, with `default` for a missing namespace.
pub fn namespaced_name(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    (
        meta.namespace
            .clone()
            .unwrap_or_else(|| "default".to_string()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Decides whether a Service is skipped entirely, as kube-proxy's `ShouldSkipService` does.
/// `allow_missing_ip` is true for the file source, which allocates a cluster IP when none is
/// given.
pub fn skip_service(svc: &Service, allow_missing_ip: bool) -> Option<Skip> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return Some(Skip::ExternalName);
    }
    match spec.cluster_ip.as_deref() {
        Some("None") => Some(Skip::Headless),
        None | Some("") if !allow_missing_ip => Some(Skip::NoClusterIp),
        _ => None,
    }
}

/// The cluster IP written in a Service, if any (`None`, `""` and absent give `Ok(None)`).
///
/// # Errors
/// The field holds something that is not an IP address.
pub fn explicit_cluster_ip(svc: &Service) -> Result<Option<IpAddr>, Error> {
    let raw = svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref());
    match raw {
        None | Some("") | Some("None") => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| err_svc(svc, "spec.clusterIP", format!("{s:?} is not an IP address"))),
    }
}

fn object_label(
    kind: &str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> String {
    let (ns, name) = namespaced_name(meta);
    format!("{kind} {ns}/{name}")
}

fn err_svc(svc: &Service, field: impl Into<String>, message: impl Into<String>) -> Error {
    Error {
        object: object_label("Service", &svc.metadata),
        field: field.into(),
        message: message.into(),
    }
}

fn parse_protocol(p: Option<&str>) -> Result<Option<Protocol>, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Some(Protocol::Tcp)),
        "UDP" => Ok(Some(Protocol::Udp)),
        "SCTP" => Ok(None),
        other => Err(format!(
            "unknown protocol {other:?} (expected TCP, UDP or SCTP)"
        )),
    }
}

fn parse_policy(raw: Option<&str>) -> Result<TrafficPolicy, String> {
    match raw {
        None | Some("Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(other) => Err(format!(
            "unknown traffic policy {other:?} (expected Cluster or Local)"
        )),
    }
}

fn parse_ips(
    svc: &Service,
    field: &str,
    raw: impl IntoIterator<Item = String>,
) -> Result<Vec<IpAddr>, Error> {
    raw.into_iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse().map_err(|_| {
                err_svc(
                    svc,
                    format!("{field}[{i}]"),
                    format!("{s:?} is not an IP address"),
                )
            })
        })
        .collect()
}

fn port_number(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|p| *p != 0)
}

/// The service ports of a Service that is not skipped, given its cluster IP. SCTP ports are
/// returned separately so the caller can warn about them.
///
/// # Errors
/// A port, protocol, IP or policy field that cannot be understood, named by its path.
pub fn service_ports(
    svc: &Service,
    cluster_ip: IpAddr,
) -> Result<(Vec<ServicePort>, Vec<SkippedPort>), Error> {
    let (namespace, name) = namespaced_name(&svc.metadata);
    let Some(spec) = svc.spec.as_ref() else {
        return Ok((Vec::new(), Vec::new()));
    };
    let external_ips = parse_ips(
        svc,
        "spec.externalIPs",
        spec.external_ips.clone().unwrap_or_default(),
    )?;
    let lb_raw = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ing| ing.iter().filter_map(|i| i.ip.clone()).collect::<Vec<_>>())
        .unwrap_or_default();
    let load_balancer_ips = parse_ips(svc, "status.loadBalancer.ingress.ip", lb_raw)?;
    let affinity = match spec.session_affinity.as_deref() {
        None | Some("None") | Some("") => Affinity::None,
        Some("ClientIP") => {
            let secs = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            let timeout = match secs {
                None | Some(0) => DEFAULT_AFFINITY_TIMEOUT,
                Some(s) if s > 0 => Duration::from_secs(s as u64),
                Some(s) => {
                    return Err(err_svc(
                        svc,
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{s} must be greater than 0"),
                    ))
                }
            };
            Affinity::ClientIp { timeout }
        }
        Some(other) => {
            return Err(err_svc(
                svc,
                "spec.sessionAffinity",
                format!("unknown session affinity {other:?} (expected None or ClientIP)"),
            ))
        }
    };
    let internal_policy = parse_policy(spec.internal_traffic_policy.as_deref())
        .map_err(|m| err_svc(svc, "spec.internalTrafficPolicy", m))?;
    let external_policy = parse_policy(spec.external_traffic_policy.as_deref())
        .map_err(|m| err_svc(svc, "spec.externalTrafficPolicy", m))?;

    let health_check_node_port = match spec.health_check_node_port {
        Some(n) if external_policy == TrafficPolicy::Local && n != 0 => {
            Some(port_number(n).ok_or_else(|| {
                err_svc(
                    svc,
                    "spec.healthCheckNodePort",
                    format!("{n} is not a port number (1-65535)"),
                )
            })?)
        }
        _ => None,
    };

    let mut ports = Vec::new();
    let mut skipped = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let spn = ServicePortName::new(&namespace, &name, p.name.clone().unwrap_or_default());
        let protocol = parse_protocol(p.protocol.as_deref())
            .map_err(|m| err_svc(svc, format!("spec.ports[{i}].protocol"), m))?;
        let Some(protocol) = protocol else {
            skipped.push(SkippedPort {
                name: spn,
                reason: "SCTP is not supported by the userspace proxy".into(),
            });
            continue;
        };
        let port = port_number(p.port).ok_or_else(|| {
            err_svc(
                svc,
                format!("spec.ports[{i}].port"),
                format!("{} is not a port number (1-65535)", p.port),
            )
        })?;
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => Some(port_number(n).ok_or_else(|| {
                err_svc(
                    svc,
                    format!("spec.ports[{i}].nodePort"),
                    format!("{n} is not a port number (1-65535)"),
                )
            })?),
        };
        ports.push(ServicePort {
            name: spn,
            protocol,
            cluster_ip,
            port,
            node_port,
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            affinity,
            internal_policy,
            external_policy,
            health_check_node_port,
        });
    }
    Ok((ports, skipped))
}

/// Endpoints of a `v1 Endpoints` object, by port name. Ready `addresses` only, as the userspace
/// proxier did (`notReadyAddresses` are ignored).
///
/// # Errors
/// An address that is not an IP, or a port out of range.
pub fn endpoints_by_port(ep: &Endpoints) -> Result<BTreeMap<String, Vec<Endpoint>>, Error> {
    let object = object_label("Endpoints", &ep.metadata);
    let mut out: BTreeMap<String, Vec<Endpoint>> = BTreeMap::new();
    for (si, subset) in ep.subsets.iter().flatten().enumerate() {
        for (pi, port) in subset.ports.iter().flatten().enumerate() {
            let Some(number) = port_number(port.port) else {
                return Err(Error {
                    object,
                    field: format!("subsets[{si}].ports[{pi}].port"),
                    message: format!("{} is not a port number (1-65535)", port.port),
                });
            };
            let list = out
                .entry(port.name.clone().unwrap_or_default())
                .or_default();
            for (ai, addr) in subset.addresses.iter().flatten().enumerate() {
                if addr.ip.is_empty() {
                    continue;
                }
                let ip: IpAddr = addr.ip.parse().map_err(|_| Error {
                    object: object.clone(),
                    field: format!("subsets[{si}].addresses[{ai}].ip"),
                    message: format!("{:?} is not an IP address", addr.ip),
                })?;
                let mut e = Endpoint::ready(SocketAddr::new(ip, number));
                e.node_name = addr.node_name.clone();
                list.push(e);
            }
        }
    }
    Ok(out)
}

/// Endpoints of all the EndpointSlices of one service, merged, by port name. Duplicate
/// addresses across slices are kept once, preferring the copy that is ready.
///
/// # Errors
/// An address that is not an IP, or a port out of range.
pub fn merge_slices<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Result<BTreeMap<String, Vec<Endpoint>>, Error> {
    let mut merged: BTreeMap<String, BTreeMap<SocketAddr, Endpoint>> = BTreeMap::new();
    for slice in slices {
        let object = object_label("EndpointSlice", &slice.metadata);
        if slice.address_type == "FQDN" {
            continue; // FQDN slices are for ExternalName-like uses; kube-proxy ignores them too.
        }
        for (pi, port) in slice.ports.iter().flatten().enumerate() {
            let Some(number) = port.port.and_then(port_number) else {
                return Err(Error {
                    object,
                    field: format!("ports[{pi}].port"),
                    message: format!("{:?} is not a port number (1-65535)", port.port),
                });
            };
            let by_addr = merged
                .entry(port.name.clone().unwrap_or_default())
                .or_default();
            for (ei, ep) in slice.endpoints.iter().enumerate() {
                let cond = ep.conditions.as_ref();
                let ready = cond.and_then(|c| c.ready).unwrap_or(true);
                let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
                for (ai, a) in ep.addresses.iter().enumerate() {
                    let ip: IpAddr = a.parse().map_err(|_| Error {
                        object: object.clone(),
                        field: format!("endpoints[{ei}].addresses[{ai}]"),
                        message: format!("{a:?} is not an IP address"),
                    })?;
                    let addr = SocketAddr::new(ip, number);
                    let candidate = Endpoint {
                        addr,
                        ready,
                        serving,
                        terminating,
                        node_name: ep.node_name.clone(),
                    };
                    by_addr
                        .entry(addr)
                        .and_modify(|old| {
                            if candidate.ready && !old.ready {
                                *old = candidate.clone();
                            }
                        })
                        .or_insert(candidate);
                }
            }
        }
    }
    Ok(merged
        .into_iter()
        .map(|(k, v)| (k, v.into_values().collect()))
        .collect())
}

/// The service an EndpointSlice belongs to (`namespace`, `name`), from its label.
pub fn slice_service(slice: &EndpointSlice) -> Option<(String, String)> {
    let (ns, _) = namespaced_name(&slice.metadata);
    let svc = slice.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    Some((ns, svc.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn headless_and_external_name_are_skipped() {
        let h = svc("apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec: {clusterIP: None, ports: [{port: 80}]}");
        assert_eq!(skip_service(&h, true), Some(Skip::Headless));
        let e = svc("apiVersion: v1\nkind: Service\nmetadata: {name: e}\nspec: {type: ExternalName, externalName: x.example}");
        assert_eq!(skip_service(&e, true), Some(Skip::ExternalName));
        let n =
            svc("apiVersion: v1\nkind: Service\nmetadata: {name: n}\nspec: {ports: [{port: 80}]}");
        assert_eq!(skip_service(&n, true), None);
        assert_eq!(skip_service(&n, false), Some(Skip::NoClusterIp));
    }

    #[test]
    fn ports_carry_every_portal_and_affinity() {
        let s = svc(r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  externalIPs: [203.0.113.7]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports:
  - {name: http, port: 80, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP}
  - {name: s, port: 9, protocol: SCTP}
status:
  loadBalancer: {ingress: [{ip: 198.51.100.9}, {hostname: lb.example}]}
"#);
        let (ports, skipped) = service_ports(&s, "10.96.0.10".parse().unwrap()).unwrap();
        assert_eq!(ports.len(), 2);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].name.to_string(), "shop/web:s");
        let http = &ports[0];
        assert_eq!(http.name.to_string(), "shop/web:http");
        assert_eq!(http.node_port, Some(30080));
        assert_eq!(
            http.affinity,
            Affinity::ClientIp {
                timeout: Duration::from_secs(60)
            }
        );
        let portals: Vec<String> = http.portal_addrs().map(|a| a.to_string()).collect();
        assert_eq!(
            portals,
            ["10.96.0.10:80", "203.0.113.7:80", "198.51.100.9:80"]
        );
        assert_eq!(ports[1].protocol, Protocol::Udp);
    }

    #[test]
    fn health_check_node_port_only_with_local_external_policy() {
        let local = svc("apiVersion: v1\nkind: Service\nmetadata: {name: lb}\nspec: {type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32000, ports: [{port: 80}]}");
        let (ports, _) = service_ports(&local, "10.96.0.1".parse().unwrap()).unwrap();
        assert_eq!(ports[0].health_check_node_port, Some(32000));
        assert_eq!(ports[0].external_policy, TrafficPolicy::Local);
        let cluster = svc("apiVersion: v1\nkind: Service\nmetadata: {name: lb}\nspec: {type: LoadBalancer, healthCheckNodePort: 32000, ports: [{port: 80}]}");
        let (ports, _) = service_ports(&cluster, "10.96.0.1".parse().unwrap()).unwrap();
        assert_eq!(ports[0].health_check_node_port, None);
        let bad = svc("apiVersion: v1\nkind: Service\nmetadata: {name: lb}\nspec: {externalTrafficPolicy: Local, healthCheckNodePort: 70000, ports: [{port: 80}]}");
        let e = service_ports(&bad, "10.96.0.1".parse().unwrap()).unwrap_err();
        assert_eq!(e.field, "spec.healthCheckNodePort");
    }

    #[test]
    fn bad_protocol_names_the_field() {
        let s = svc("apiVersion: v1\nkind: Service\nmetadata: {name: w}\nspec: {ports: [{port: 80, protocol: QUIC}]}");
        let e = service_ports(&s, "10.96.0.1".parse().unwrap()).unwrap_err();
        assert_eq!(e.object, "Service default/w");
        assert_eq!(e.field, "spec.ports[0].protocol");
    }

    #[test]
    fn endpoints_use_ready_addresses_by_port_name() {
        let ep: Endpoints = serde_yaml::from_str(
            r#"
apiVersion: v1
kind: Endpoints
metadata: {name: web}
subsets:
- addresses: [{ip: 10.1.0.1}, {ip: 10.1.0.2}]
  notReadyAddresses: [{ip: 10.1.0.3}]
  ports: [{name: http, port: 8080}]
"#,
        )
        .unwrap();
        let m = endpoints_by_port(&ep).unwrap();
        let addrs: Vec<String> = m["http"].iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["10.1.0.1:8080", "10.1.0.2:8080"]);
    }

    #[test]
    fn slices_merge_and_dedupe() {
        let a: EndpointSlice = serde_yaml::from_str(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.1.0.1]
- addresses: [10.1.0.2]
  conditions: {ready: false, serving: true, terminating: true}
"#,
        )
        .unwrap();
        let b: EndpointSlice = serde_yaml::from_str(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.1.0.1]
  conditions: {ready: false}
- addresses: [10.1.0.3]
"#,
        )
        .unwrap();
        assert_eq!(slice_service(&a), Some(("default".into(), "web".into())));
        let m = merge_slices([&a, &b]).unwrap();
        let eps = &m["http"];
        assert_eq!(eps.len(), 3);
        let one = eps
            .iter()
            .find(|e| e.addr.to_string() == "10.1.0.1:8080")
            .unwrap();
        assert!(one.ready, "the ready copy of a duplicate wins");
        let usable: Vec<String> = crate::model::usable_endpoints(eps.iter())
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(usable, ["10.1.0.1:8080", "10.1.0.3:8080"]);
    }
}
