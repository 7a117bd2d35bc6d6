//! Reconcile planning: what must open, close or be updated to go from what is applied to what
//! is desired. Pure, so the rules that users rely on are unit-tested here:
//! - a change to one service never touches another;
//! - a change that keeps a port's listener identity keeps its listener and proxy port (the
//!   original rebound on any change and broke UDP sessions);
//! - anything else about a port (portals, node port, affinity) is updated in place.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::model::{Protocol, ServicePort, ServicePortName};

/// What identifies a listener: while this stays equal the listener is kept.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenKey {
    /// The socket's protocol.
    pub protocol: Protocol,
    /// Addresses bound in `bind` portal mode (empty when a single proxy port is used, which
    /// any portal change can keep).
    pub binds: Vec<SocketAddr>,
}

/// The steps of one sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// New service ports: bind a listener.
    pub open: Vec<ServicePortName>,
    /// Ports whose listener identity changed: bind a new listener, then close the old one.
    pub replace: Vec<ServicePortName>,
    /// Ports whose spec changed but whose listener stays (portals, affinity, node port).
    pub update: Vec<ServicePortName>,
    /// Ports that are gone: remove their portals, then close their listener.
    pub close: Vec<ServicePortName>,
}

impl Plan {
    /// True when nothing about listeners or portals changes.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
            && self.replace.is_empty()
            && self.update.is_empty()
            && self.close.is_empty()
    }
}

/// Computes the plan. `applied` maps each open port to its listener key and spec; `desired`
/// maps each wanted port to the key it needs and its spec.
pub fn plan(
    applied: &BTreeMap<ServicePortName, (ListenKey, Arc<ServicePort>)>,
    desired: &BTreeMap<ServicePortName, (ListenKey, Arc<ServicePort>)>,
) -> Plan {
    let mut p = Plan::default();
    for (name, (key, spec)) in desired {
        match applied.get(name) {
            None => p.open.push(name.clone()),
            Some((old_key, _)) if old_key != key => p.replace.push(name.clone()),
            Some((_, old_spec)) if old_spec != spec => p.update.push(name.clone()),
            Some(_) => {}
        }
    }
    p.close = applied
        .keys()
        .filter(|n| !desired.contains_key(*n))
        .cloned()
        .collect();
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Affinity;
    use std::time::Duration;

    fn port(name: &str, protocol: Protocol, port: u16) -> ServicePort {
        ServicePort::plain("ns", name, protocol, "10.96.0.1", port)
    }

    fn entry(p: ServicePort) -> (ServicePortName, (ListenKey, Arc<ServicePort>)) {
        (
            p.name.clone(),
            (
                ListenKey {
                    protocol: p.protocol,
                    binds: vec![],
                },
                Arc::new(p),
            ),
        )
    }

    #[test]
    fn unchanged_state_plans_nothing() {
        let a: BTreeMap<_, _> = [entry(port("a", Protocol::Tcp, 80))].into();
        assert!(plan(&a, &a).is_empty());
    }

    #[test]
    fn opens_closes_and_leaves_others_alone() {
        let applied: BTreeMap<_, _> = [
            entry(port("a", Protocol::Tcp, 80)),
            entry(port("b", Protocol::Tcp, 80)),
        ]
        .into();
        let desired: BTreeMap<_, _> = [
            entry(port("b", Protocol::Tcp, 80)),
            entry(port("c", Protocol::Udp, 53)),
        ]
        .into();
        let p = plan(&applied, &desired);
        assert_eq!(p.open, vec![ServicePortName::new("ns", "c", "")]);
        assert_eq!(p.close, vec![ServicePortName::new("ns", "a", "")]);
        assert!(p.replace.is_empty() && p.update.is_empty());
    }

    #[test]
    fn portal_and_affinity_changes_keep_the_listener() {
        let applied: BTreeMap<_, _> = [entry(port("a", Protocol::Udp, 53))].into();
        let mut changed = port("a", Protocol::Udp, 5353);
        changed.external_ips = vec!["203.0.113.1".parse().unwrap()];
        changed.affinity = Affinity::ClientIp {
            timeout: Duration::from_secs(10),
        };
        let desired: BTreeMap<_, _> = [entry(changed)].into();
        let p = plan(&applied, &desired);
        assert_eq!(p.update, vec![ServicePortName::new("ns", "a", "")]);
        assert!(p.replace.is_empty() && p.open.is_empty() && p.close.is_empty());
    }

    #[test]
    fn protocol_change_replaces_the_listener() {
        let applied: BTreeMap<_, _> = [entry(port("a", Protocol::Tcp, 53))].into();
        let desired: BTreeMap<_, _> = [entry(port("a", Protocol::Udp, 53))].into();
        assert_eq!(
            plan(&applied, &desired).replace,
            vec![ServicePortName::new("ns", "a", "")]
        );
    }
}
