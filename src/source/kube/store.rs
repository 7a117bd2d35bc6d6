//! The Kubernetes source's picture of the cluster: the objects its watches delivered, each
//! converted into the model once, when it arrives, and the [`DesiredState`] they add up to.
//!
//! Pure: no I/O, no clocks. The watch loop feeds it events; tests feed it objects.
//!
//! An object the conversion cannot understand (the API server validates objects, so this means
//! a newer API than ours or a bug) is refused with its object and field named, and the last
//! good version of that object keeps serving, as a bad file reload does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::convert::{self, Error};
use crate::model::{DesiredState, Endpoint, ServicePort};

/// `(namespace, name)` of an object.
pub type Key = (String, String);

/// Endpoints of one service, by port name.
type ByPort = BTreeMap<String, Arc<Vec<Endpoint>>>;

fn shared(m: BTreeMap<String, Vec<Endpoint>>) -> ByPort {
    m.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()
}

/// What one Service converts to, or why it is left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Converted {
    /// The service ports this node proxies.
    Ports(Vec<ServicePort>),
    /// Not proxied (headless, ExternalName, no address of this node's family); the reason is
    /// logged once when the object arrives.
    Skipped(String),
}

/// Everything the watches have delivered, converted, and the snapshot it adds up to, kept up to
/// date change by change (O(log n) per change; a snapshot is an O(1) clone).
#[derive(Debug, Default)]
pub struct Store {
    ipv6: bool,
    services: HashMap<Key, Vec<Arc<ServicePort>>>,
    /// Service → slice name → slice.
    slices: HashMap<Key, BTreeMap<String, EndpointSlice>>,
    /// `(namespace, slice name)` → the service it belongs to.
    slice_owner: HashMap<Key, Key>,
    /// Endpoints by service: merged slices, or converted `v1 Endpoints`.
    endpoints: HashMap<Key, ByPort>,
    /// The snapshot: every service port with its endpoints.
    state: DesiredState,
}

/// Converts a Service for a node of the given IP family: the cluster IP of that family (from
/// `spec.clusterIPs`, which lists both on a dual-stack service) and only the external and
/// load-balancer IPs of that family, as kube-proxy's per-family proxiers do.
///
/// # Errors
/// A field that cannot be understood, named by its path.
pub fn convert_service(svc: &Service, ipv6: bool) -> Result<Converted, Error> {
    if let Some(skip) = convert::skip_service(svc, false) {
        return Ok(Converted::Skipped(skip.reason().into()));
    }
    let primary = convert::explicit_cluster_ip(svc)?;
    let same_family = |ip: &IpAddr| ip.is_ipv6() == ipv6;
    let cluster_ip = match primary {
        Some(ip) if same_family(&ip) => ip,
        _ => {
            let secondary = svc
                .spec
                .as_ref()
                .and_then(|s| s.cluster_ips.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|s| s.parse::<IpAddr>().ok())
                .find(same_family);
            match secondary {
                Some(ip) => ip,
                None => {
                    return Ok(Converted::Skipped(format!(
                        "no IPv{} cluster IP (this node proxies IPv{} only)",
                        if ipv6 { 6 } else { 4 },
                        if ipv6 { 6 } else { 4 }
                    )))
                }
            }
        }
    };
    let (mut ports, _sctp) = convert::service_ports(svc, cluster_ip)?;
    for p in &mut ports {
        p.external_ips.retain(same_family);
        p.load_balancer_ips.retain(same_family);
    }
    Ok(Converted::Ports(ports))
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    convert::namespaced_name(meta)
}

impl Store {
    /// An empty store for a node that proxies IPv6 (`true`) or IPv4 services.
    pub fn new(ipv6: bool) -> Self {
        Self {
            ipv6,
            ..Self::default()
        }
    }

    /// Rewrites the snapshot's entries for one service: `before` are the ports it had.
    fn refresh(&mut self, key: &Key, before: &[Arc<ServicePort>]) {
        for p in before {
            self.state.services.remove(&p.name);
            self.state.endpoints.remove(&p.name);
        }
        let Some(ports) = self.services.get(key) else {
            return;
        };
        let eps = self.endpoints.get(key);
        for p in ports {
            self.state.services.insert(p.name.clone(), p.clone());
            if let Some(list) = eps
                .and_then(|m| m.get(&p.name.port))
                .filter(|l| !l.is_empty())
            {
                self.state.endpoints.insert(p.name.clone(), list.clone());
            }
        }
    }

    /// The snapshot entries of `key` after its endpoints changed.
    fn refresh_endpoints(&mut self, key: &Key) {
        let ports = self.services.get(key).cloned().unwrap_or_default();
        self.refresh(key, &ports);
    }

    fn set_ports(&mut self, key: Key, ports: Option<Vec<Arc<ServicePort>>>) {
        let before = match ports {
            Some(p) => self.services.insert(key.clone(), p),
            None => self.services.remove(&key),
        };
        self.refresh(&key, &before.unwrap_or_default());
    }

    fn set_endpoints(&mut self, key: Key, eps: Option<ByPort>) {
        match eps {
            Some(e) => self.endpoints.insert(key.clone(), e),
            None => self.endpoints.remove(&key),
        };
        self.refresh_endpoints(&key);
    }

    /// A Service was added or changed. Returns why it is skipped, if it is.
    ///
    /// # Errors
    /// The Service cannot be understood; its previous version (if any) keeps serving.
    pub fn apply_service(&mut self, svc: &Service) -> Result<Option<String>, Error> {
        let key = key_of(&svc.metadata);
        match convert_service(svc, self.ipv6)? {
            Converted::Ports(ports) => {
                self.set_ports(key, Some(ports.into_iter().map(Arc::new).collect()));
                Ok(None)
            }
            Converted::Skipped(why) => {
                self.set_ports(key, None);
                Ok(Some(why))
            }
        }
    }

    /// A Service was deleted.
    pub fn delete_service(&mut self, svc: &Service) {
        self.set_ports(key_of(&svc.metadata), None);
    }

    /// A complete list of Services (initial list or relist) replaces what was known. Objects
    /// that cannot be understood keep their previous version and are returned. Services that
    /// did not change leave the snapshot untouched.
    pub fn replace_services(&mut self, list: &[Service]) -> Vec<Error> {
        let mut errors = Vec::new();
        let mut next: HashMap<Key, Vec<Arc<ServicePort>>> = HashMap::with_capacity(list.len());
        for svc in list {
            let key = key_of(&svc.metadata);
            match convert_service(svc, self.ipv6) {
                Ok(Converted::Ports(ports)) => {
                    next.insert(key, ports.into_iter().map(Arc::new).collect());
                }
                Ok(Converted::Skipped(_)) => {}
                Err(e) => {
                    if let Some(old) = self.services.get(&key) {
                        next.insert(key, old.clone());
                    }
                    errors.push(e);
                }
            }
        }
        let keys: HashSet<Key> = self.services.keys().chain(next.keys()).cloned().collect();
        for key in keys {
            let new = next.remove(&key);
            if self.services.get(&key) != new.as_ref() {
                self.set_ports(key, new);
            }
        }
        errors
    }

    /// An EndpointSlice was added or changed. A slice without the `kubernetes.io/service-name`
    /// label belongs to no service and is ignored.
    ///
    /// # Errors
    /// The slice cannot be understood; the service keeps its previous endpoints.
    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> Result<(), Error> {
        let (ns, slice_name) = key_of(&slice.metadata);
        let Some(service) = convert::slice_service(slice) else {
            return Ok(());
        };
        let mut group = self.slices.get(&service).cloned().unwrap_or_default();
        group.insert(slice_name.clone(), slice.clone());
        let merged = convert::merge_slices(group.values())?;
        // A slice that moved to another service (its label changed) leaves the old one.
        if let Some(old_owner) = self
            .slice_owner
            .insert((ns.clone(), slice_name.clone()), service.clone())
        {
            if old_owner != service {
                self.forget_slice(&old_owner, &slice_name);
            }
        }
        self.slices.insert(service.clone(), group);
        self.set_endpoints(service, Some(shared(merged)));
        Ok(())
    }

    fn forget_slice(&mut self, service: &Key, slice_name: &str) {
        let Some(group) = self.slices.get_mut(service) else {
            return;
        };
        group.remove(slice_name);
        if group.is_empty() {
            self.slices.remove(service);
            self.set_endpoints(service.clone(), None);
        } else if let Ok(merged) = convert::merge_slices(group.values()) {
            // The remaining slices were each accepted before, so they merge.
            self.set_endpoints(service.clone(), Some(shared(merged)));
        }
    }

    /// An EndpointSlice was deleted.
    pub fn delete_slice(&mut self, slice: &EndpointSlice) {
        let (ns, slice_name) = key_of(&slice.metadata);
        if let Some(owner) = self.slice_owner.remove(&(ns, slice_name.clone())) {
            self.forget_slice(&owner, &slice_name);
        }
    }

    /// Replaces the endpoints of every service with `next`, touching only those that changed.
    fn replace_all_endpoints(&mut self, mut next: HashMap<Key, ByPort>) {
        let keys: HashSet<Key> = self.endpoints.keys().chain(next.keys()).cloned().collect();
        for key in keys {
            let new = next.remove(&key);
            if self.endpoints.get(&key) != new.as_ref() {
                self.set_endpoints(key, new);
            }
        }
    }

    /// A complete list of EndpointSlices replaces what was known. A service whose slices
    /// cannot be understood keeps its previous endpoints; the errors are returned.
    /// Takes the list: the store keeps every slice (a later change to one of a service's slices
    /// merges it with the others), and copied each one when it borrowed the list; this function
    /// was 8 to 10% of the samples of a start with 10,000 services from the API.
    pub fn replace_slices(&mut self, list: Vec<EndpointSlice>) -> Vec<Error> {
        let mut groups: HashMap<Key, BTreeMap<String, EndpointSlice>> = HashMap::new();
        let mut owners = HashMap::new();
        for slice in list {
            let Some(service) = convert::slice_service(&slice) else {
                continue;
            };
            let (ns, slice_name) = key_of(&slice.metadata);
            owners.insert((ns, slice_name.clone()), service.clone());
            groups.entry(service).or_default().insert(slice_name, slice);
        }
        let mut errors = Vec::new();
        let mut endpoints = HashMap::with_capacity(groups.len());
        for (service, group) in &groups {
            match convert::merge_slices(group.values()) {
                Ok(m) => {
                    endpoints.insert(service.clone(), shared(m));
                }
                Err(e) => {
                    if let Some(old) = self.endpoints.get(service) {
                        endpoints.insert(service.clone(), old.clone());
                    }
                    errors.push(e);
                }
            }
        }
        self.slices = groups;
        self.slice_owner = owners;
        self.replace_all_endpoints(endpoints);
        errors
    }

    /// A `v1 Endpoints` object was added or changed.
    ///
    /// # Errors
    /// The object cannot be understood; the service keeps its previous endpoints.
    pub fn apply_endpoints(&mut self, ep: &Endpoints) -> Result<(), Error> {
        let by_port = convert::endpoints_by_port(ep)?;
        self.set_endpoints(key_of(&ep.metadata), Some(shared(by_port)));
        Ok(())
    }

    /// A `v1 Endpoints` object was deleted.
    pub fn delete_endpoints(&mut self, ep: &Endpoints) {
        self.set_endpoints(key_of(&ep.metadata), None);
    }

    /// A complete list of `v1 Endpoints` replaces what was known.
    pub fn replace_endpoints(&mut self, list: &[Endpoints]) -> Vec<Error> {
        let mut errors = Vec::new();
        let mut next = HashMap::with_capacity(list.len());
        for ep in list {
            let key = key_of(&ep.metadata);
            match convert::endpoints_by_port(ep) {
                Ok(m) => {
                    next.insert(key, shared(m));
                }
                Err(e) => {
                    if let Some(old) = self.endpoints.get(&key) {
                        next.insert(key, old.clone());
                    }
                    errors.push(e);
                }
            }
        }
        self.replace_all_endpoints(next);
        errors
    }

    /// The desired state everything known adds up to: every service port, with the endpoints
    /// whose port name matches. O(1): the persistent maps are shared, not copied.
    pub fn snapshot(&self) -> DesiredState {
        self.state.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServicePortName;

    fn svc(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn slice(name: &str, service: &str, addrs: &[&str], ready: bool) -> EndpointSlice {
        let eps: Vec<String> = addrs
            .iter()
            .map(|a| format!("{{addresses: [{a}], conditions: {{ready: {ready}}}}}"))
            .collect();
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: ns, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]",
            eps.join(", ")
        ))
        .unwrap()
    }

    fn web() -> Service {
        svc("metadata: {name: web, namespace: ns}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}")
    }

    fn addrs(state: &DesiredState) -> Vec<String> {
        let name = ServicePortName::new("ns", "web", "http");
        crate::model::usable_endpoints(
            state
                .endpoints
                .get(&name)
                .into_iter()
                .flat_map(|e| e.iter()),
        )
        .iter()
        .map(|a| a.to_string())
        .collect()
    }

    #[test]
    fn slices_of_one_service_merge_and_leave_one_by_one() {
        let mut store = Store::new(false);
        store.apply_service(&web()).unwrap();
        let a = slice("web-a", "web", &["10.1.0.1"], true);
        let b = slice("web-b", "web", &["10.1.0.2"], true);
        store.apply_slice(&a).unwrap();
        store.apply_slice(&b).unwrap();
        assert_eq!(addrs(&store.snapshot()), ["10.1.0.1:8080", "10.1.0.2:8080"]);
        store.delete_slice(&a);
        assert_eq!(addrs(&store.snapshot()), ["10.1.0.2:8080"]);
        store.delete_slice(&b);
        assert!(store.snapshot().endpoints.is_empty());
        assert_eq!(store.snapshot().services.len(), 1);
    }

    #[test]
    fn a_relist_with_the_same_objects_gives_the_same_snapshot() {
        let mut store = Store::new(false);
        let services = [web()];
        let slices = [slice("web-a", "web", &["10.1.0.1", "10.1.0.2"], true)];
        store.replace_services(&services);
        store.replace_slices(slices.to_vec());
        let before = store.snapshot();
        assert!(store.replace_services(&services).is_empty());
        assert!(store.replace_slices(slices.to_vec()).is_empty());
        assert_eq!(store.snapshot(), before);
        // A relist that misses a slice means it was deleted while the watch was down.
        store.replace_slices(Vec::new());
        assert!(store.snapshot().endpoints.is_empty());
    }

    #[test]
    fn a_bad_update_keeps_the_last_good_version() {
        let mut store = Store::new(false);
        store.apply_service(&web()).unwrap();
        let bad = svc("metadata: {name: web, namespace: ns}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, protocol: QUIC}]}");
        let e = store.apply_service(&bad).unwrap_err();
        assert_eq!(e.object, "Service ns/web");
        assert_eq!(e.field, "spec.ports[0].protocol");
        assert_eq!(store.snapshot().services.len(), 1);
        let errors = store.replace_services(&[bad]);
        assert_eq!(errors.len(), 1);
        assert_eq!(store.snapshot().services.len(), 1, "relist keeps it too");

        store
            .apply_slice(&slice("web-a", "web", &["10.1.0.1"], true))
            .unwrap();
        let broken = slice("web-a", "web", &["not-an-ip"], true);
        let e = store.apply_slice(&broken).unwrap_err();
        assert_eq!(e.field, "endpoints[0].addresses[0]");
        assert_eq!(addrs(&store.snapshot()), ["10.1.0.1:8080"]);
    }

    #[test]
    fn headless_external_name_and_other_family_are_skipped() {
        let mut store = Store::new(false);
        let headless =
            svc("metadata: {name: h, namespace: ns}\nspec: {clusterIP: None, ports: [{port: 80}]}");
        assert!(store.apply_service(&headless).unwrap().is_some());
        let v6 = svc("metadata: {name: six, namespace: ns}\nspec: {clusterIP: 'fd00::10', clusterIPs: ['fd00::10'], ports: [{port: 80}]}");
        assert!(store.apply_service(&v6).unwrap().is_some());
        // Dual-stack, IPv6 primary: the IPv4 address from clusterIPs is used.
        let dual = svc("metadata: {name: dual, namespace: ns}\nspec: {clusterIP: 'fd00::11', clusterIPs: ['fd00::11', 10.96.0.11], externalIPs: ['2001:db8::1', 192.0.2.1], ports: [{port: 80}]}");
        assert_eq!(store.apply_service(&dual).unwrap(), None);
        let state = store.snapshot();
        assert_eq!(state.services.len(), 1);
        let port = state.services.values().next().unwrap();
        assert_eq!(port.cluster_ip.to_string(), "10.96.0.11");
        assert_eq!(port.external_ips, ["192.0.2.1".parse::<IpAddr>().unwrap()]);
        // A service that becomes headless-like (type change) leaves.
        let external = svc("metadata: {name: dual, namespace: ns}\nspec: {type: ExternalName, externalName: x.example}");
        assert!(store.apply_service(&external).unwrap().is_some());
        assert!(store.snapshot().services.is_empty());
    }

    #[test]
    fn endpoints_objects_feed_the_same_snapshot() {
        let mut store = Store::new(false);
        store.apply_service(&web()).unwrap();
        let ep: Endpoints = serde_yaml::from_str(
            "metadata: {name: web, namespace: ns}\nsubsets: [{addresses: [{ip: 10.1.0.7}], ports: [{name: http, port: 8080}]}]",
        )
        .unwrap();
        store.apply_endpoints(&ep).unwrap();
        assert_eq!(addrs(&store.snapshot()), ["10.1.0.7:8080"]);
        store.delete_endpoints(&ep);
        assert!(store.snapshot().endpoints.is_empty());
    }
}
