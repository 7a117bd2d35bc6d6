//! `userspace-proxy`: Kubernetes' userspace service proxy (`kube-proxy --proxy-mode=userspace`),
//! re-implemented to be fast, safe and easy to run on nodes that cannot use the iptables, IPVS
//! or nftables modes, and on hosts with no Kubernetes at all.
//!
//! # Data flow
//!
//! ```text
//!  config file ──► source::file ─ watch<Arc<DesiredState>> ─► proxier ─┬─► port_allocator
//!  (Services, Endpoints,           (publishes whole snapshots)   plan→apply ├─► rules::{iptables,bind}
//!   EndpointSlices)                                                        └─► listener::{tcp,udp} ─► balancer ─► backends
//! ```
//!
//! # Layout
//! - [`config`]: `KubeProxyConfiguration`, flags, validation; the multi-document file.
//! - [`model`]: what the cluster wants (plain data), and the conversion from Kubernetes objects.
//! - [`source`]: producers of desired-state snapshots.
//! - [`proxier`]: the only code that changes the node: plan, listeners, portals.
//! - [`listener`]: the data plane (TCP splice, UDP sessions).
//! - [`balancer`]: round robin with ClientIP affinity.
//! - [`admin`]: `/healthz`, `/livez`, `/metrics`, `/proxyMode`, `/configz`.
//! - [`metrics`]: Prometheus text rendering of the proxier's status.
//! - [`app`]: composition root and shutdown order.
//! - [`safety`]: the traffic rule the project's own load and test tools obey.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod balancer;
pub mod config;
pub mod listener;
pub mod metrics;
pub mod model;
pub mod proxier;
pub mod safety;
pub mod signal;
pub mod source;
