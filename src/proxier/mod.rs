//! How the node is made to match what the cluster wants: the only code that changes node state.
//!
//! The proxier receives whole [`DesiredState`] snapshots on a `watch` channel (bursts coalesce
//! for free), paces syncs like kube-proxy (burst of 2, then one per `minSyncPeriod`, and at
//! least one per `syncPeriod`), and applies each sync in a fixed order:
//!
//! 1. plan (pure): which ports open, are replaced, updated or closed;
//! 2. bind new listeners (a socket is held before any rule points at it);
//! 3. update balancers and portal guards in place (live connections keep their backend);
//! 4. write all portals in one transaction (a sync that opens hundreds of ports has already
//!    written those open so far while it opened the rest: [`early_rules`]);
//! 5. close listeners no rule points at any more, release their ports, flush UDP conntrack.
//!
//! A failure on one service port (its NodePort is taken, no proxy port is free) is logged and
//! shown in the status for that port only; the next sync retries it.

pub mod early_rules;
pub mod health_ports;
pub mod pacing;
pub mod plan;
pub mod port_allocator;
pub mod rules;
pub mod stale_flows;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use socket2::Socket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::balancer::Balancer;
use crate::config::{PortRange, PortalMode, Settings};
use crate::listener::{self, Allowed, ExternalLocal, Shared, Stats};
use crate::model::{Affinity, DesiredState, Protocol, ServicePort, ServicePortName, TrafficPolicy};
use plan::{ListenKey, Plan};
use port_allocator::PortAllocator;
use rules::{Backend, NodeAddrs, Portal};

/// What the proxier needs from the configuration.
#[derive(Clone, Debug)]
pub struct Options {
    /// Address proxy ports listen on.
    pub bind_address: IpAddr,
    /// Proxy port range.
    pub port_range: PortRange,
    /// UDP idle timeout.
    pub udp_idle_timeout: Duration,
    /// Most UDP sessions per port.
    pub udp_max_sessions: usize,
    /// Longest time between syncs.
    pub sync_period: Duration,
    /// Shortest time between syncs after a burst of 2.
    pub min_sync_period: Duration,
    /// This node's name (for `Local` traffic policies).
    pub node_name: String,
    /// Portal mode.
    pub portal_mode: PortalMode,
}

impl Options {
    /// Options from validated settings.
    pub fn from_settings(s: &Settings) -> Self {
        Self {
            bind_address: s.bind_address,
            port_range: s.port_range.clone(),
            udp_idle_timeout: s.udp_idle_timeout,
            udp_max_sessions: s.udp_max_sessions,
            sync_period: s.sync_period,
            min_sync_period: s.min_sync_period,
            node_name: s.hostname.clone(),
            portal_mode: s.portal_mode,
        }
    }
}

/// One service port as it is on the node.
#[derive(Debug)]
struct Applied {
    key: ListenKey,
    spec: Arc<ServicePort>,
    proxy_port: u16,
    handles: Vec<listener::Handle>,
    shared: Arc<Shared>,
    /// A socket bound (not listening) on the NodePort, so nothing else on the node takes it.
    node_port_claim: Option<(u16, Socket)>,
}

/// The state of one service port, for `status` and tests.
#[derive(Clone, Debug)]
pub struct PortStatus {
    /// `namespace/name:port`.
    pub name: ServicePortName,
    /// Protocol.
    pub protocol: Protocol,
    /// `ip:port` portals.
    pub portals: Vec<SocketAddr>,
    /// NodePort, if any.
    pub node_port: Option<u16>,
    /// Where its listener(s) are bound.
    pub listen: Vec<SocketAddr>,
    /// Endpoints in rotation.
    pub endpoints: Vec<SocketAddr>,
    /// Live counters.
    pub stats: Option<Arc<Stats>>,
    /// Why it is not served, if it is not.
    pub error: Option<String>,
}

impl PortStatus {
    /// The proxy port clients are redirected to (the first listener's port).
    pub fn proxy_port(&self) -> Option<u16> {
        self.listen.first().map(|a| a.port())
    }
}

/// A snapshot of what the proxier has applied.
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// Completed syncs.
    pub syncs: u64,
    /// When the last successful sync finished (portals written).
    pub last_sync: Option<SystemTime>,
    /// When the last successful sync finished with no newer change queued behind its snapshot:
    /// every change queued before this time is applied. Health compares the last queued change
    /// with this, not with `last_sync`: a sync that waited (for the xtables lock, say) on a
    /// snapshot taken before a change arrived has not applied that change.
    pub up_to_date: Option<SystemTime>,
    /// When the snapshot being applied arrived (kube-proxy's "queued update").
    pub last_queued: Option<SystemTime>,
    /// Duration of the last sync.
    pub last_sync_duration: Duration,
    /// Error of the last portal write, if it failed.
    pub rules_error: Option<String>,
    /// Portal writes that failed, ever.
    pub rules_failures: u64,
    /// Every service port, by name. (A persistent map: publishing a status does not copy
    /// every port.)
    pub ports: imbl::OrdMap<ServicePortName, PortStatus>,
    /// Sync durations.
    pub sync_duration: crate::metrics::Histogram,
    /// Time from a change being queued to the end of the sync that applied it.
    pub programming_duration: crate::metrics::Histogram,
    /// Service ports opened, replaced, updated or closed, ever.
    pub service_changes: u64,
    /// Endpoint set changes applied, ever.
    pub endpoint_changes: u64,
}

impl Status {
    /// The status of one port.
    pub fn port(&self, namespace: &str, name: &str, port: &str) -> Option<&PortStatus> {
        self.ports.get(&ServicePortName::new(namespace, name, port))
    }
}

/// Proxier failures that stop it from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The portal backend could not be prepared.
    #[error("failed to initialise portals")]
    Init(#[source] rules::Error),
}

/// The proxier: owns listeners, portals and the port allocator.
#[derive(Debug)]
pub struct Proxier {
    opts: Options,
    backend: Backend,
    allocator: PortAllocator,
    applied: BTreeMap<ServicePortName, Applied>,
    failures: BTreeMap<ServicePortName, String>,
    tracker: TaskTracker,
    listeners: CancellationToken,
    kill: CancellationToken,
    status: watch::Sender<Arc<Status>>,
    counters: Status,
    /// Health-check node ports of `externalTrafficPolicy: Local` load-balancer services.
    health_ports: health_ports::HealthPorts,
    /// The desired state of the last sync, to find what the next one changes.
    last: Option<DesiredState>,
    /// The next sync looks at every service port, not only the changed ones (periodic repair).
    full_next: bool,
    /// The node addresses the rules were last written for without error; `None` until then or
    /// after a failed write.
    rules_node: Option<NodeAddrs>,
    /// Status of every service port, kept up to date by syncs.
    ports: imbl::OrdMap<ServicePortName, PortStatus>,
    /// Proxy ports of a previous run, by portal, re-bound where possible.
    adopt: std::collections::HashMap<(IpAddr, Protocol, u16), u16>,
    /// Addresses given portals since rules were last written, whose flows tracked before
    /// then are to be cleared once they are ([`rules::conntrack`]).
    unnatted: std::collections::BTreeSet<rules::conntrack::Dialled>,
    /// Clears them, off the sync loop.
    stale_flows: stale_flows::StaleFlows,
}

fn listen_key(opts: &Options, spec: &ServicePort) -> ListenKey {
    let binds = if opts.portal_mode == PortalMode::Bind {
        bind_addrs(spec)
    } else {
        Vec::new()
    };
    ListenKey {
        protocol: spec.protocol,
        binds,
    }
}

/// Addresses a `bind`-mode service port listens on: every portal, and the NodePort on all
/// addresses.
fn bind_addrs(spec: &ServicePort) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = spec.portal_addrs().collect();
    if let Some(np) = spec.node_port {
        let any: IpAddr = if spec.cluster_ip.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        };
        v.push(SocketAddr::new(any, np));
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// The addresses clients dial for `spec` that `old` (the same port as it was) did not have:
/// its portals, and its NodePort on each of the node's IPv4 addresses. IPv4 only, as the NAT
/// portals are.
fn newly_dialled(
    spec: &ServicePort,
    old: Option<&ServicePort>,
    node: &NodeAddrs,
) -> Vec<rules::conntrack::Dialled> {
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    };
    let same_protocol = old.filter(|o| o.protocol == spec.protocol);
    let mut out: Vec<rules::conntrack::Dialled> = spec
        .portal_addrs()
        .filter(|a| same_protocol.is_none_or(|o| !o.portal_addrs().any(|b| b == *a)))
        .filter_map(|a| {
            Some(rules::conntrack::Dialled {
                protocol: spec.protocol,
                ip: v4(a.ip())?,
                port: a.port(),
            })
        })
        .collect();
    if let Some(np) = spec.node_port {
        if same_protocol.is_none_or(|o| o.node_port != Some(np)) {
            out.extend(node.local.iter().filter_map(|ip| v4(*ip)).map(|ip| {
                rules::conntrack::Dialled {
                    protocol: spec.protocol,
                    ip,
                    port: np,
                }
            }));
        }
    }
    out
}

fn affinity_timeout(a: Affinity) -> Option<Duration> {
    match a {
        Affinity::None => None,
        Affinity::ClientIp { timeout } => Some(timeout),
    }
}

fn allowed_for(spec: &ServicePort) -> Allowed {
    Allowed {
        portals: spec.portal_addrs().collect(),
        node_port: spec.node_port,
    }
}

/// Installs, updates or removes the separate balancer for external TCP traffic
/// (`externalTrafficPolicy: Local`; `backends` is `None` otherwise). Returns true when its
/// endpoint set changed.
fn apply_external(shared: &Shared, spec: &ServicePort, backends: Option<Vec<SocketAddr>>) -> bool {
    let Some(backends) = backends.filter(|_| spec.protocol == Protocol::Tcp) else {
        return shared.external.swap(None).is_some();
    };
    let affinity = affinity_timeout(spec.affinity);
    let current = shared.external.load_full();
    let (balancer, changed) = match &current {
        Some(x) => (x.balancer.clone(), x.balancer.update(&backends, affinity)),
        None => (Arc::new(Balancer::new(backends, affinity)), true),
    };
    let cluster = SocketAddr::new(spec.cluster_ip, spec.port);
    let portals = allowed_for(spec);
    if current
        .as_ref()
        .is_none_or(|x| x.cluster != cluster || x.portals != portals)
    {
        shared.external.store(Some(Arc::new(ExternalLocal {
            cluster,
            portals,
            balancer,
        })));
    }
    changed
}

impl Proxier {
    /// A proxier with `backend` for portals. Tasks are spawned on `tracker`; `kill` ends every
    /// connection at once (after the drain period).
    pub fn new(
        opts: Options,
        backend: Backend,
        tracker: TaskTracker,
        kill: CancellationToken,
    ) -> Self {
        let (status, _) = watch::channel(Arc::new(Status::default()));
        let listeners = CancellationToken::new();
        let stale_flows = stale_flows::StaleFlows::new(tracker.clone(), listeners.clone());
        Self {
            stale_flows,
            allocator: PortAllocator::new(&opts.port_range),
            health_ports: health_ports::HealthPorts::new(
                opts.bind_address,
                tracker.clone(),
                listeners.clone(),
            ),
            opts,
            backend,
            applied: BTreeMap::new(),
            failures: BTreeMap::new(),
            tracker,
            listeners,
            kill,
            status,
            counters: Status::default(),
            adopt: Default::default(),
            last: None,
            full_next: false,
            rules_node: None,
            ports: Default::default(),
            unnatted: Default::default(),
        }
    }

    /// Status snapshots, updated after every sync.
    pub fn status(&self) -> watch::Receiver<Arc<Status>> {
        self.status.subscribe()
    }

    /// Prepares portals (flushing a previous run's leftovers).
    ///
    /// # Errors
    /// The portal backend cannot be prepared.
    pub fn init(&mut self) -> Result<(), Error> {
        self.backend.init().map_err(Error::Init)?;
        self.adopt = self.backend.take_adoptable();
        if !self.adopt.is_empty() {
            info!(
                ports = self.adopt.len(),
                "found the portal rules of a previous run; adopting their proxy ports"
            );
            // Connections queued on the predecessor's listeners move to ours when it closes
            // them (Linux >= 5.14), instead of being reset.
            if let Err(e) = std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1") {
                warn!(error = %e, "cannot enable net.ipv4.tcp_migrate_req; connections queued on the previous process may be reset");
            }
        }
        Ok(())
    }

    fn claim_node_port(&self, spec: &ServicePort) -> Result<Option<(u16, Socket)>, String> {
        let Some(np) = spec.node_port else {
            return Ok(None);
        };
        if !matches!(
            self.opts.portal_mode,
            PortalMode::Iptables | PortalMode::Nftables
        ) {
            return Ok(None); // bind mode listens on the NodePort itself; none has no NodePorts
        }
        let any: IpAddr = if spec.cluster_ip.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        };
        // bind() without listen(): the port is ours, but a connection that races the rules is
        // refused instead of queueing on a socket nobody accepts (kubernetes PR #108496).
        listener::bind_socket(spec.protocol, SocketAddr::new(any, np), false)
            .map(|s| Some((np, s)))
            .map_err(|e| {
                format!(
                    "node port {np}/{} is already in use on this node: {e}",
                    spec.protocol
                )
            })
    }

    fn open(
        &mut self,
        spec: &Arc<ServicePort>,
        backends: Vec<SocketAddr>,
        guard: bool,
    ) -> Result<Applied, String> {
        let node_port_claim = self.claim_node_port(spec)?;
        if spec.protocol == Protocol::Udp && spec.external_policy == TrafficPolicy::Local {
            // A redirected datagram does not carry its original destination, so one UDP socket
            // cannot tell NodePort traffic from ClusterIP traffic.
            warn!(service = %spec.name, "externalTrafficPolicy: Local is honoured for TCP only; UDP external traffic uses every ready endpoint");
        }
        let shared = Arc::new(Shared {
            name: spec.name.clone(),
            balancer: Arc::new(Balancer::new(backends, affinity_timeout(spec.affinity))),
            stats: Arc::new(Stats::default()),
            allowed: ArcSwapOption::from_pointee(None),
            external: ArcSwapOption::from_pointee(None),
            udp_idle_timeout: self.opts.udp_idle_timeout,
            udp_max_sessions: self.opts.udp_max_sessions,
            generation: Default::default(),
        });
        if guard {
            shared.allowed.store(Some(Arc::new(allowed_for(spec))));
        }
        let key = listen_key(&self.opts, spec);
        let mut handles = Vec::new();
        let proxy_port;
        if self.opts.portal_mode == PortalMode::Bind {
            for addr in &key.binds {
                let h = listener::spawn(
                    spec.protocol,
                    *addr,
                    listener::Bind::Free,
                    shared.clone(),
                    &self.tracker,
                    &self.listeners,
                    &self.kill,
                )
                .map_err(|e| format!("cannot listen on {addr}/{}: {e}", spec.protocol))?;
                handles.push(h);
            }
            proxy_port = spec.port;
        } else {
            let previous = self
                .adopt
                .remove(&(spec.cluster_ip, spec.protocol, spec.port));
            let (bind, tracker, listeners, kill) = (
                self.opts.bind_address,
                &self.tracker,
                &self.listeners,
                &self.kill,
            );
            // The port a previous run's rules point at, if it can be bound (SO_REUSEPORT lets us
            // join a predecessor that is still draining).
            let adopted = previous.and_then(|port| {
                listener::spawn(spec.protocol, SocketAddr::new(bind, port), listener::Bind::Adopt, shared.clone(), tracker, listeners, kill)
                    .map_err(|e| debug!(service = %spec.name, port, error = %e, "cannot adopt the previous proxy port"))
                    .ok()
            });
            let (_, h) = if let Some(h) = adopted {
                debug!(service = %spec.name, port = h.local_addr.port(), "adopted the previous proxy port");
                (h.local_addr.port(), h)
            } else {
                self.allocator
                    .allocate(|port| {
                        listener::spawn(
                            spec.protocol,
                            SocketAddr::new(bind, port),
                            listener::Bind::Own,
                            shared.clone(),
                            tracker,
                            listeners,
                            kill,
                        )
                    })
                    .map_err(|e| format!("cannot listen on {bind}/{}: {e}", spec.protocol))?
            };
            proxy_port = h.local_addr.port();
            self.allocator.mark(proxy_port);
            handles.push(h);
        }
        Ok(Applied {
            key,
            spec: spec.clone(),
            proxy_port,
            handles,
            shared,
            node_port_claim,
        })
    }

    fn retire(&mut self, a: Applied) {
        for h in &a.handles {
            h.close();
        }
        self.allocator.release(a.proxy_port);
        if a.spec.protocol == Protocol::Udp {
            for portal in a.spec.portal_addrs() {
                if let Err(e) = self.backend.flush_udp_conntrack(portal.ip(), portal.port()) {
                    debug!(service = %a.spec.name, %portal, error = %e, "conntrack flush failed");
                }
            }
        }
        info!(service = %a.spec.name, protocol = %a.spec.protocol, proxy_port = a.proxy_port, "closed service port");
    }

    /// Serves a health-check node port for every applied service that has one, reporting the
    /// service's distinct ready endpoint addresses on this node.
    fn sync_health_ports(&mut self, desired: &DesiredState) {
        let mut wanted: BTreeMap<u16, health_ports::Wanted> = BTreeMap::new();
        let mut local: BTreeMap<u16, std::collections::BTreeSet<IpAddr>> = BTreeMap::new();
        for (name, a) in &self.applied {
            let Some(port) = a.spec.health_check_node_port else {
                continue;
            };
            wanted.entry(port).or_insert_with(|| health_ports::Wanted {
                service: (name.namespace.clone(), name.name.clone()),
                local_endpoints: 0,
            });
            let eps = desired
                .external_backends(name, &self.opts.node_name)
                .unwrap_or_default();
            local
                .entry(port)
                .or_default()
                .extend(eps.iter().map(|e| e.ip()));
        }
        for (port, w) in &mut wanted {
            w.local_endpoints = local.get(port).map_or(0, |s| s.len());
        }
        self.health_ports.sync(&wanted);
    }

    /// Every open service port with its proxy port.
    fn portals(&self) -> Vec<Portal> {
        self.applied
            .values()
            .map(|a| Portal {
                service: a.spec.clone(),
                proxy_port: a.proxy_port,
            })
            .collect()
    }

    /// Opens (or reopens) the listener of `name`; true when it is open.
    fn open_named(
        &mut self,
        name: &ServicePortName,
        spec: &Arc<ServicePort>,
        desired: &DesiredState,
        guard: bool,
        retired: &mut Vec<Applied>,
    ) -> bool {
        // The old listener of a replaced port goes first when it holds the NodePort claim the
        // new one needs; otherwise it lives until the rules point elsewhere.
        if let Some(old) = self.applied.remove(name) {
            retired.push(old);
        }
        if let Some(pos) = retired.iter().position(|r| r.spec.name == *name) {
            retired[pos].node_port_claim = None;
        }
        match self.open(spec, desired.backends(name, &self.opts.node_name), guard) {
            Ok(a) => {
                info!(service = %name, protocol = %spec.protocol, portals = ?spec.portal_addrs().collect::<Vec<_>>(), node_port = ?spec.node_port, proxy_port = a.proxy_port, "opened service port");
                self.failures.remove(name);
                self.applied.insert(name.clone(), a);
                true
            }
            Err(e) => {
                error!(service = %name, error = %e, "cannot open service port");
                self.failures.insert(name.clone(), e);
                false
            }
        }
    }

    /// Writes the rules for every open port.
    fn write_rules(&mut self, node: &NodeAddrs) {
        let portals = self.portals();
        match self.backend.sync(&portals, node) {
            Ok(written) => {
                if written {
                    debug!(portals = portals.len(), "portals written");
                }
                self.counters.rules_error = None;
                self.rules_node = Some(node.clone());
            }
            Err(e) => {
                error!(error = %e, "failed to write portals; will retry");
                self.counters.rules_error = Some(e.to_string());
                self.counters.rules_failures += 1;
                self.rules_node = None;
            }
        }
    }

    /// Applies one desired state now (no pacing). Returns the plan that was carried out.
    /// `newer_queued` tells whether a newer desired state has arrived since `desired` was taken.
    pub fn sync(&mut self, desired: &DesiredState, newer_queued: &dyn Fn() -> bool) -> Plan {
        let started = Instant::now();
        let node = NodeAddrs::discover();
        let full = std::mem::take(&mut self.full_next) || self.last.is_none();
        let changed = self.changed_since_last(desired, full);
        let want: BTreeMap<ServicePortName, (ListenKey, Arc<ServicePort>)> = changed
            .iter()
            .filter_map(|n| {
                let s = desired.services.get(n)?;
                Some((n.clone(), (listen_key(&self.opts, s), s.clone())))
            })
            .collect();
        let current: BTreeMap<ServicePortName, (ListenKey, Arc<ServicePort>)> = changed
            .iter()
            .filter_map(|n| {
                let a = self.applied.get(n)?;
                Some((n.clone(), (a.key.clone(), a.spec.clone())))
            })
            .collect();
        let plan = plan::plan(&current, &want);
        // NAT backends only: without NAT a flow's packets are routed one by one.
        if self.backend.nat() {
            for name in plan.open.iter().chain(&plan.replace).chain(&plan.update) {
                let old = self.applied.get(name).map(|a| &*a.spec);
                self.unnatted
                    .extend(newly_dialled(&want[name].1, old, &node));
            }
        }
        let mut retired = Vec::new();
        self.failures
            .retain(|n, _| desired.services.contains_key(n));

        let guard = self.backend.guards_by_original_dst();
        // New ports only: a replaced one leaves the applied set while it reopens, and a
        // snapshot taken then would delete its rules. A previous run's rules are rewritten
        // whole by the first write, so they must not be waiting for adoption either.
        if self.backend.nat() && self.adopt.is_empty() && plan.open.len() > early_rules::BATCH {
            let mut backend = std::mem::replace(&mut self.backend, Backend::None);
            let writes = std::thread::scope(|s| {
                let mut early = early_rules::EarlyRules::start(s, &mut backend, &node);
                for name in &plan.open {
                    if self.open_named(name, &want[name].1, desired, guard, &mut retired) {
                        early.opened(|| self.portals());
                    }
                }
                early.finish()
            });
            self.backend = backend;
            debug!(writes, "portals written while listeners opened");
        } else {
            for name in &plan.open {
                self.open_named(name, &want[name].1, desired, guard, &mut retired);
            }
        }
        for name in &plan.replace {
            self.open_named(name, &want[name].1, desired, guard, &mut retired);
        }
        for name in &plan.update {
            let spec = want[name].1.clone();
            let needs_claim = self
                .applied
                .get(name)
                .is_some_and(|a| a.spec.node_port != spec.node_port);
            let claim = if needs_claim {
                if let Some(a) = self.applied.get_mut(name) {
                    a.node_port_claim = None;
                }
                match self.claim_node_port(&spec) {
                    Ok(c) => c,
                    Err(e) => {
                        error!(service = %name, error = %e, "cannot update service port");
                        self.failures.insert(name.clone(), e);
                        if let Some(old) = self.applied.remove(name) {
                            retired.push(old);
                        }
                        continue;
                    }
                }
            } else {
                None
            };
            if let Some(a) = self.applied.get_mut(name) {
                if needs_claim {
                    a.node_port_claim = claim;
                }
                if guard {
                    a.shared.allowed.store(Some(Arc::new(allowed_for(&spec))));
                }
                info!(service = %name, portals = ?spec.portal_addrs().collect::<Vec<_>>(), node_port = ?spec.node_port, proxy_port = a.proxy_port, "updated service port in place");
                a.spec = spec;
            }
        }
        for name in &plan.close {
            if let Some(a) = self.applied.remove(name) {
                retired.push(a);
            }
        }

        let mut flush = Vec::new();
        for name in &changed {
            let Some(a) = self.applied.get(name) else {
                continue;
            };
            let backends = desired.backends(name, &self.opts.node_name);
            let external = desired.external_backends(name, &self.opts.node_name);
            let external_changed = apply_external(&a.shared, &a.spec, external);
            if a.shared
                .balancer
                .update(&backends, affinity_timeout(a.spec.affinity))
                || external_changed
            {
                a.shared.generation.fetch_add(1, Ordering::Relaxed);
                self.counters.endpoint_changes += 1;
                debug!(service = %name, endpoints = ?backends, "endpoints changed");
                if a.spec.protocol == Protocol::Udp {
                    flush.extend(a.spec.portal_addrs());
                }
            }
        }
        if full {
            for a in self.applied.values() {
                a.shared.balancer.expire_pins();
            }
        }

        self.sync_health_ports(desired);

        let t_listeners = started.elapsed();
        let t_rules = Instant::now();
        // Rules follow from the open ports and the node's addresses only. When neither changed
        // since they were last written (an endpoint change, say), rendering every portal only to
        // find nothing new would put O(services) work on the path of every endpoint change. Full
        // syncs still render and compare everything.
        let rules_current = !full && plan.is_empty() && self.rules_node.as_ref() == Some(&node);
        if !rules_current {
            self.write_rules(&node);
        }
        if self.counters.rules_error.is_none() {
            // Only once the rules are in: a flow tracked before that would bypass them.
            self.stale_flows.clear(std::mem::take(&mut self.unnatted));
            // The previous run's rules are gone now, so are its ports' claims; left in place,
            // they would also keep later large syncs from writing early.
            if !self.adopt.is_empty() {
                debug!(
                    unused = self.adopt.len(),
                    "proxy ports of the previous run no service took"
                );
                self.adopt.clear();
            }
        }
        let t_rules = t_rules.elapsed();
        for a in retired {
            self.retire(a);
        }
        for portal in flush {
            if let Err(e) = self.backend.flush_udp_conntrack(portal.ip(), portal.port()) {
                debug!(%portal, error = %e, "conntrack flush failed");
            }
        }
        self.counters.syncs += 1;
        let now = SystemTime::now();
        // Health counts a sync as done only when its rules were written, as kube-proxy does.
        if self.counters.rules_error.is_none() {
            self.counters.last_sync = Some(now);
            // `now` was read before looking: a change that arrives after the look was queued
            // after `now`, so health still sees it pending.
            if newer_queued() {
                debug!("a change arrived while this sync ran; the next one applies it");
            } else {
                self.counters.up_to_date = Some(now);
            }
        }
        self.counters.last_sync_duration = started.elapsed();
        self.counters
            .sync_duration
            .observe(started.elapsed().as_secs_f64());
        self.counters.service_changes +=
            (plan.open.len() + plan.replace.len() + plan.update.len() + plan.close.len()) as u64;
        if let Some(queued) = self
            .counters
            .last_queued
            .and_then(|q| now.duration_since(q).ok())
        {
            if !plan.is_empty() {
                self.counters
                    .programming_duration
                    .observe(queued.as_secs_f64());
            }
        }
        let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        debug!(
            listeners_ms = t_listeners.as_secs_f64() * 1e3,
            rules_ms = t_rules.as_secs_f64() * 1e3,
            "sync phases"
        );
        if plan.is_empty() {
            debug!(
                ports = self.applied.len(),
                elapsed_ms, "sync complete: no change"
            );
        } else {
            info!(
                ports = self.applied.len(),
                opened = plan.open.len(),
                replaced = plan.replace.len(),
                updated = plan.update.len(),
                closed = plan.close.len(),
                failed = self.failures.len(),
                elapsed_ms,
                "sync complete"
            );
        }
        self.publish(desired, &changed);
        self.last = Some(desired.clone());
        plan
    }

    /// The service ports whose spec or endpoints may differ between the last sync and
    /// `desired`, plus those that failed to open (retried every sync). With `full`, all of them.
    /// Snapshots from one source share structure, so this costs O(changes), not O(services).
    fn changed_since_last(
        &self,
        desired: &DesiredState,
        full: bool,
    ) -> std::collections::BTreeSet<ServicePortName> {
        let mut changed: std::collections::BTreeSet<ServicePortName> =
            self.failures.keys().cloned().collect();
        match &self.last {
            Some(last) if !full => {
                use imbl::ordmap::DiffItem;
                fn key<'a, K, V>(d: DiffItem<'a, 'a, K, V>) -> &'a K {
                    match d {
                        DiffItem::Add(k, _) | DiffItem::Remove(k, _) => k,
                        DiffItem::Update { new: (k, _), .. } => k,
                    }
                }
                changed.extend(last.services.diff(&desired.services).map(key).cloned());
                changed.extend(last.endpoints.diff(&desired.endpoints).map(key).cloned());
            }
            _ => {
                changed.extend(desired.services.keys().cloned());
                changed.extend(self.applied.keys().cloned());
            }
        }
        changed
    }

    /// True when `desired` differs from the last synced state in endpoints only (no service
    /// port added, removed or changed, and none waiting to be retried).
    fn only_endpoints_differ(&self, desired: &DesiredState) -> bool {
        self.failures.is_empty()
            && self
                .last
                .as_ref()
                .is_some_and(|last| last.services.diff(&desired.services).next().is_none())
    }

    /// Publishes status, rebuilding the entries of `changed` ports only.
    fn publish(
        &mut self,
        desired: &DesiredState,
        changed: &std::collections::BTreeSet<ServicePortName>,
    ) {
        for name in changed {
            let Some(spec) = desired.services.get(name) else {
                self.ports.remove(name);
                continue;
            };
            let a = self.applied.get(name);
            let ps = PortStatus {
                name: name.clone(),
                protocol: spec.protocol,
                portals: spec.portal_addrs().collect(),
                node_port: spec.node_port,
                listen: a
                    .map(|a| a.handles.iter().map(|h| h.local_addr).collect())
                    .unwrap_or_default(),
                endpoints: a.map(|a| a.shared.balancer.endpoints()).unwrap_or_default(),
                stats: a.map(|a| a.shared.stats.clone()),
                error: self.failures.get(name).cloned(),
            };
            self.ports.insert(name.clone(), ps);
        }
        let mut st = self.counters.clone();
        st.ports = self.ports.clone();
        self.status.send_replace(Arc::new(st));
    }

    /// Runs until `cancel`: waits for the first snapshot (no portals before the source is
    /// synced, as kube-proxy), then applies every change, paced.
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Option<Arc<DesiredState>>>,
        cancel: CancellationToken,
    ) -> Self {
        let mut pacer = pacing::Pacer::new(self.opts.min_sync_period, 2, Instant::now());
        let mut last_sync = Instant::now();
        let mut source_alive = true;
        loop {
            let periodic = tokio::time::Instant::from_std(last_sync + self.opts.sync_period);
            let mut repair = false;
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = desired.changed(), if source_alive => {
                    if r.is_err() {
                        warn!("desired-state source stopped; keeping the last state");
                        source_alive = false;
                        continue;
                    }
                    self.counters.last_queued = Some(SystemTime::now());
                    self.publish_queued();
                }
                _ = tokio::time::sleep_until(periodic) => repair = true,
            }
            // Endpoint changes go straight to the balancers, unpaced, as the original's endpoint
            // handler did: they write no rules, so there is nothing for minSyncPeriod to bound.
            let endpoints_only = !repair
                && desired
                    .borrow()
                    .as_deref()
                    .is_some_and(|new| self.only_endpoints_differ(new));
            if !endpoints_only {
                let now = Instant::now();
                let at = pacer.next_allowed(now);
                if at > now {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                    }
                }
                pacer.take(Instant::now());
                last_sync = Instant::now();
            }
            let snapshot = desired.borrow_and_update().clone();
            // Repair and sync run helper programs (iptables may wait up to 5 s for the xtables
            // lock): let the runtime move other tasks off this worker meanwhile.
            let mut work = || {
                if repair {
                    if let Err(e) = self.backend.repair() {
                        warn!(error = %e, "portal repair failed");
                    }
                    self.full_next = true;
                }
                if let Some(state) = &snapshot {
                    self.sync(state, &|| desired.has_changed().unwrap_or(false));
                }
            };
            if tokio::runtime::Handle::current().runtime_flavor()
                == tokio::runtime::RuntimeFlavor::MultiThread
            {
                tokio::task::block_in_place(work);
            } else {
                work();
            }
        }
        self
    }

    fn publish_queued(&self) {
        let mut st = (*self.status.borrow()).as_ref().clone();
        st.last_queued = self.counters.last_queued;
        self.status.send_replace(Arc::new(st));
    }

    /// Stops accepting on every listener. Portals are left in place, as kube-proxy leaves its
    /// rules: a restarted proxy flushes and re-installs them; `--cleanup` removes them.
    pub fn stop_listening(&mut self) {
        self.listeners.cancel();
        for (_, a) in std::mem::take(&mut self.applied) {
            for h in &a.handles {
                h.close();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxier() -> Proxier {
        let opts = Options {
            bind_address: IpAddr::from([127, 0, 0, 1]),
            port_range: PortRange::default(),
            udp_idle_timeout: Duration::from_secs(1),
            udp_max_sessions: 16,
            sync_period: Duration::from_secs(1),
            min_sync_period: Duration::ZERO,
            node_name: "node-1".into(),
            portal_mode: PortalMode::None,
        };
        Proxier::new(
            opts,
            Backend::None,
            TaskTracker::new(),
            CancellationToken::new(),
        )
    }

    /// With an IPv6 load-balancer IP, which the NAT portals skip.
    fn web() -> ServicePort {
        ServicePort {
            name: ServicePortName::new("default", "web", "http"),
            node_port: Some(30080),
            external_ips: vec!["203.0.113.7".parse().unwrap()],
            load_balancer_ips: vec!["fd00::9".parse().unwrap()],
            ..ServicePort::plain("default", "web", Protocol::Tcp, "10.96.0.10", 80)
        }
    }

    fn dialled(v: &[rules::conntrack::Dialled]) -> Vec<String> {
        v.iter()
            .map(|d| format!("{}/{}:{}", d.protocol, d.ip, d.port))
            .collect()
    }

    /// The addresses whose pre-portal flows a sync clears: every IPv4 portal and the NodePort
    /// on each node address for a new port; only what an update added; all of them again when
    /// the protocol changed (the old rules were for the other one).
    #[test]
    fn newly_dialled_addresses_are_the_portals_a_change_adds() {
        let node = NodeAddrs {
            host_ip: Some("192.168.1.10".parse().unwrap()),
            local: vec![
                "127.0.0.1".parse().unwrap(),
                "192.168.1.10".parse().unwrap(),
                "fe80::1".parse().unwrap(),
            ],
        };
        let spec = web();
        assert_eq!(
            dialled(&newly_dialled(&spec, None, &node)),
            [
                "tcp/10.96.0.10:80",
                "tcp/203.0.113.7:80",
                "tcp/127.0.0.1:30080",
                "tcp/192.168.1.10:30080"
            ]
        );
        assert!(newly_dialled(&spec, Some(&spec), &node).is_empty());
        let before = ServicePort {
            external_ips: vec![],
            node_port: None,
            ..web()
        };
        assert_eq!(
            dialled(&newly_dialled(&spec, Some(&before), &node)),
            [
                "tcp/203.0.113.7:80",
                "tcp/127.0.0.1:30080",
                "tcp/192.168.1.10:30080"
            ]
        );
        let udp = ServicePort {
            protocol: Protocol::Udp,
            ..web()
        };
        assert_eq!(newly_dialled(&spec, Some(&udp), &node).len(), 4);
    }

    /// A sync that ran on a snapshot older than a queued change (it waited for the xtables
    /// lock meanwhile, say) is a sync, but health must not count that change as applied. The
    /// netns suite's health_flips saw /healthz turn 200 with the change missing, 8 times in
    /// 40 on a loaded machine, before `up_to_date` existed.
    #[test]
    fn a_sync_with_a_newer_change_queued_is_not_up_to_date() {
        let mut p = proxier();
        let status = p.status();
        let state = DesiredState::default();
        p.sync(&state, &|| true);
        let st = status.borrow().clone();
        assert_eq!(st.syncs, 1);
        assert!(st.last_sync.is_some());
        assert_eq!(st.up_to_date, None);
        p.sync(&state, &|| false);
        let st = status.borrow().clone();
        assert!(st.up_to_date.is_some());
        assert_eq!(st.up_to_date, st.last_sync);
    }
}
