//! Health-check NodePorts: for a `LoadBalancer` service with `externalTrafficPolicy: Local`,
//! the API server allocates `spec.healthCheckNodePort`, and the cloud load balancer asks each
//! node on it whether to send traffic there. As kube-proxy does, every path answers 200 with
//! the count of this node's ready endpoints while there is one, and 503 when there is none, so
//! the load balancer only uses nodes that can serve locally.
//!
//! Owned by the proxier: these are listening sockets on the node, opened and closed by syncs.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin;

/// What one health-check port should report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// `namespace`, `name` of the service.
    pub service: (String, String),
    /// Ready endpoints of the service on this node.
    pub local_endpoints: usize,
}

#[derive(Debug)]
struct Server {
    service: (String, String),
    local: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The body and status kube-proxy's service health server answers with.
pub fn answer(service: &(String, String), local_endpoints: usize) -> admin::Response {
    let body = serde_json::json!({
        "service": {"namespace": service.0, "name": service.1},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": true,
    });
    let code = if local_endpoints > 0 { 200 } else { 503 };
    (code, "application/json", format!("{body}\n"))
}

/// The health-check servers, by port.
#[derive(Debug)]
pub struct HealthPorts {
    bind: IpAddr,
    servers: HashMap<u16, Server>,
    tracker: TaskTracker,
    parent: CancellationToken,
}

impl HealthPorts {
    /// Servers will listen on `bind` (the proxy's bind address), as tasks on `tracker`,
    /// stopped with `parent`.
    pub fn new(bind: IpAddr, tracker: TaskTracker, parent: CancellationToken) -> Self {
        Self {
            bind,
            servers: HashMap::new(),
            tracker,
            parent,
        }
    }

    /// Opens, updates and closes servers to match `wanted`. A port that cannot be bound is
    /// logged and tried again on the next sync.
    pub fn sync(&mut self, wanted: &BTreeMap<u16, Wanted>) {
        self.servers.retain(|port, s| {
            let keep = wanted.get(port).is_some_and(|w| w.service == s.service);
            if !keep {
                info!(port, service = %format!("{}/{}", s.service.0, s.service.1), "closed health-check node port");
            }
            keep
        });
        for (port, w) in wanted {
            if let Some(s) = self.servers.get(port) {
                s.local.store(w.local_endpoints, Ordering::Relaxed);
                continue;
            }
            let local = Arc::new(AtomicUsize::new(w.local_endpoints));
            let stop = self.parent.child_token();
            let addr = SocketAddr::new(self.bind, *port);
            let service = w.service.clone();
            let opened = crate::listener::bind_socket(crate::model::Protocol::Tcp, addr, false)
                .and_then(|s| {
                    s.listen(128)?;
                    let (svc, count) = (service.clone(), local.clone());
                    admin::serve(
                        s.into(),
                        move |_path| answer(&svc, count.load(Ordering::Relaxed)),
                        &self.tracker,
                        stop.clone(),
                    )
                });
            let name = format!("{}/{}", service.0, service.1);
            match opened {
                Ok(bound) => {
                    info!(port, service = %name, addr = %bound, "serving health-check node port");
                    self.servers.insert(
                        *port,
                        Server {
                            service,
                            local,
                            stop,
                        },
                    );
                }
                Err(e) => {
                    warn!(port, service = %name, error = %e, "cannot serve health-check node port; retrying at the next sync")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_like_kube_proxy() {
        let svc = ("shop".to_string(), "web".to_string());
        let (code, ty, body) = answer(&svc, 2);
        assert_eq!((code, ty), (200, "application/json"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["service"]["namespace"], "shop");
        assert_eq!(v["service"]["name"], "web");
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(answer(&svc, 0).0, 503);
    }
}
