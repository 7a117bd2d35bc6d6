//! Configuration: kube-proxy's `KubeProxyConfiguration` (v1alpha1) plus this proxy's
//! extensions, the flags that override it, and the validated [`Settings`] the rest of the
//! program runs on.
//!
//! Parsing is strict (unknown fields are errors, as kube-proxy's strict decoding is), fields the
//! userspace mode never used are accepted and ignored, and every error names the file, the
//! document and the field. Validation is a separate pass so flags are checked exactly like the
//! file.

pub mod duration;
pub mod file;
mod patch;
pub mod port_range;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use duration::GoDuration;
pub use port_range::PortRange;

/// `apiVersion` of the configuration document.
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
/// `kind` of the configuration document.
pub const KIND: &str = "KubeProxyConfiguration";
/// The only proxy mode this program implements.
pub const MODE: &str = "userspace";

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("{path}: cannot read the file")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A document is not valid YAML, or not an object this program knows.
    #[error("{origin}: document {document}: {message}")]
    Document {
        /// The file (or `<embedded default>`).
        origin: String,
        /// 1-based document number.
        document: usize,
        /// What is wrong.
        message: String,
    },
    /// A command-line flag has a value that cannot be used.
    #[error("flag {flag}: {message}")]
    Flag {
        /// The flag, e.g. `--udp-timeout`.
        flag: String,
        /// What is wrong.
        message: String,
    },
    /// A field of an object has a value that cannot be used.
    #[error("{origin}: document {document} ({object}): field {field}: {message}")]
    Field {
        /// The file (or `<embedded default>`).
        origin: String,
        /// 1-based document number.
        document: usize,
        /// `KubeProxyConfiguration`, `Service default/web`.
        object: String,
        /// The field's path, e.g. `iptables.syncPeriod`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// Crate-wide result for configuration.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How traffic to service IPs reaches the proxy listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortalMode {
    /// netfilter REDIRECT/DNAT rules, as kube-proxy's userspace mode (the default).
    #[default]
    Iptables,
    /// The same redirections from an nftables table of our own, with the portals in maps: one
    /// lookup per packet and one element per change, whatever the number of services.
    Nftables,
    /// No netfilter at all: service IPs are added to a local interface and listeners bind to
    /// `ServiceIP:port` directly; NodePorts listen on the node's addresses.
    Bind,
    /// No portals: only the proxy ports listen (for tests, or behind rules you write yourself).
    None,
}

/// Which API the Kubernetes source reads endpoints from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum EndpointSource {
    /// `discovery.k8s.io/v1` EndpointSlices when the API server serves them, else `v1`
    /// Endpoints (older clusters), logged at start.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// Always EndpointSlices.
    EndpointSlice,
    /// Always `v1` Endpoints.
    Endpoints,
}

impl std::str::FromStr for PortalMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "iptables" => Ok(PortalMode::Iptables),
            "nftables" => Ok(PortalMode::Nftables),
            "bind" => Ok(PortalMode::Bind),
            "none" => Ok(PortalMode::None),
            o => Err(format!(
                "unknown portal mode {o:?} (expected iptables, nftables, bind or none)"
            )),
        }
    }
}

fn default_api_version() -> String {
    API_VERSION.into()
}
fn default_kind() -> String {
    KIND.into()
}
fn default_bind_address() -> String {
    "0.0.0.0".into()
}
fn default_udp_idle() -> GoDuration {
    GoDuration(Duration::from_millis(250))
}
fn default_config_sync() -> GoDuration {
    GoDuration(Duration::from_secs(15 * 60))
}
fn default_healthz() -> String {
    "0.0.0.0:10256".into()
}
fn default_metrics() -> String {
    "127.0.0.1:10249".into()
}
fn default_service_range() -> String {
    "10.96.0.0/12".into()
}
fn default_portal_interface() -> String {
    "lo".into()
}
fn default_iptables_command() -> String {
    "iptables".into()
}
fn default_udp_max_sessions() -> usize {
    16_384
}
/// The longest poll before a data-plane thread sleeps ([`crate::listener::poll`]).
pub const DEFAULT_POLL_BEFORE_SLEEP: Duration = Duration::from_micros(100);

/// Past this a poll would cost more than the halt and wake-up it saves, and starve the host.
pub const MAX_POLL_BEFORE_SLEEP: Duration = Duration::from_millis(1);

fn default_poll_before_sleep() -> GoDuration {
    GoDuration(DEFAULT_POLL_BEFORE_SLEEP)
}

fn default_grace() -> GoDuration {
    GoDuration(Duration::from_secs(5))
}
fn default_oom() -> Option<i32> {
    Some(-999)
}

/// `iptables:` section. Only the two sync periods matter to the userspace mode.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IptablesSection {
    /// Longest time between two syncs (default 30s).
    #[serde(default = "IptablesSection::default_sync")]
    pub sync_period: GoDuration,
    /// Shortest time between two syncs, after a burst of 2 (default 1s).
    #[serde(default = "IptablesSection::default_min_sync")]
    pub min_sync_period: GoDuration,
    /// Ignored by the userspace mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masquerade_all: Option<bool>,
    /// Ignored by the userspace mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masquerade_bit: Option<i32>,
    /// Ignored by the userspace mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub localhost_nodeports: Option<bool>,
}

impl IptablesSection {
    fn default_sync() -> GoDuration {
        GoDuration(Duration::from_secs(30))
    }
    fn default_min_sync() -> GoDuration {
        GoDuration(Duration::from_secs(1))
    }
}

impl Default for IptablesSection {
    fn default() -> Self {
        Self {
            sync_period: Self::default_sync(),
            min_sync_period: Self::default_min_sync(),
            masquerade_all: None,
            masquerade_bit: None,
            localhost_nodeports: None,
        }
    }
}

/// `clientConnection:` section, used by the Kubernetes API source.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientConnection {
    /// Path of a kubeconfig; empty means in-cluster config or the file source.
    #[serde(default)]
    pub kubeconfig: String,
    /// Accepted for compatibility.
    #[serde(default)]
    pub accept_content_types: String,
    /// Accepted for compatibility.
    #[serde(default)]
    pub content_type: String,
    /// API client queries per second.
    #[serde(default)]
    pub qps: f32,
    /// API client burst.
    #[serde(default)]
    pub burst: i32,
}

/// The first document of the configuration file: kube-proxy's fields with kube-proxy's defaults,
/// plus this proxy's extensions (marked "extension").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeProxyConfiguration {
    /// Must be `kubeproxy.config.k8s.io/v1alpha1`.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// Must be `KubeProxyConfiguration`.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// `userspace` (or empty, which means the same here).
    #[serde(default)]
    pub mode: String,
    /// IP the proxy ports listen on; `0.0.0.0` selects REDIRECT rules for pod traffic.
    #[serde(default = "default_bind_address")]
    pub bind_address: String,
    /// Proxy port range; empty means kernel-chosen.
    #[serde(default)]
    pub port_range: String,
    /// Idle time after which a UDP client session is closed.
    #[serde(default = "default_udp_idle")]
    pub udp_idle_timeout: GoDuration,
    /// Sync periods.
    #[serde(default)]
    pub iptables: IptablesSection,
    /// `/healthz` and `/livez` server address; empty disables it.
    #[serde(default = "default_healthz")]
    pub healthz_bind_address: String,
    /// `/metrics` server address; empty disables it.
    #[serde(default = "default_metrics")]
    pub metrics_bind_address: String,
    /// A bind failure of the health or metrics server is fatal.
    #[serde(default)]
    pub bind_address_hard_fail: bool,
    /// Accepted for compatibility.
    #[serde(default)]
    pub enable_profiling: bool,
    /// Kubernetes API client settings.
    #[serde(default)]
    pub client_connection: ClientConnection,
    /// Node name to use instead of the hostname.
    #[serde(default)]
    pub hostname_override: String,
    /// Informer resync period (Kubernetes source).
    #[serde(default = "default_config_sync")]
    pub config_sync_period: GoDuration,
    /// `oom_score_adj` applied at start.
    #[serde(default = "default_oom")]
    pub oom_score_adj: Option<i32>,
    /// Pod CIDR(s), comma separated; the service range must not overlap it.
    #[serde(default, rename = "clusterCIDR")]
    pub cluster_cidr: String,
    /// Ignored by the userspace mode (as upstream).
    #[serde(default)]
    pub node_port_addresses: Vec<String>,
    /// conntrack sysctl tuning: accepted and ignored (this proxy leaves sysctls to the node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<serde_yaml::Value>,
    /// Ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipvs: Option<serde_yaml::Value>,
    /// Ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nftables: Option<serde_yaml::Value>,
    /// Ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub winkernel: Option<serde_yaml::Value>,
    /// Ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_local_mode: Option<String>,
    /// Ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_local: Option<serde_yaml::Value>,
    /// Ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_gates: Option<BTreeMap<String, bool>>,
    /// Ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_hidden_metrics_for_version: Option<String>,
    /// Ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging: Option<serde_yaml::Value>,
    /// Extension: range cluster IPs are allocated from for file services that name none.
    #[serde(default = "default_service_range", rename = "serviceClusterIPRange")]
    pub service_cluster_ip_range: String,
    /// Extension: `iptables` (default), `bind` or `none`.
    #[serde(default)]
    pub portal_mode: PortalMode,
    /// Extension: interface service IPs are added to in `bind` portal mode.
    #[serde(default = "default_portal_interface")]
    pub portal_interface: String,
    /// Extension: `auto` (default), `full` or `minimal` netfilter rule shapes.
    #[serde(default)]
    pub netfilter_extensions: crate::proxier::rules::iptables::ExtensionsMode,
    /// Extension: iptables command (`iptables`, `iptables-legacy`, `iptables-nft`); its
    /// `-restore` sibling writes the rules.
    #[serde(default = "default_iptables_command")]
    pub iptables_command: String,
    /// Extension: most concurrent UDP client sessions per service port.
    #[serde(default = "default_udp_max_sessions")]
    pub udp_max_sessions: usize,
    /// Extension: how long established connections may drain on SIGTERM.
    #[serde(default = "default_grace")]
    pub shutdown_grace_period: GoDuration,
    /// Extension: how long a data-plane thread that ran out of work polls for more before it
    /// sleeps (an adaptive window up to this; `0s` never polls).
    #[serde(default = "default_poll_before_sleep")]
    pub poll_before_sleep: GoDuration,
    /// Extension: serve only Services labelled `service.kubernetes.io/service-proxy-name` with
    /// this value (empty: serve the unlabelled ones, as kube-proxy does), so this proxy can run
    /// beside another.
    #[serde(default)]
    pub service_proxy_name: String,
    /// Extension: `auto` (default), `EndpointSlice` or `Endpoints`.
    #[serde(default)]
    pub endpoint_source: EndpointSource,
}

impl Default for KubeProxyConfiguration {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("every field has a default")
    }
}

/// Command-line values that override the file, as kube-proxy's flags do.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--proxy-mode`.
    pub proxy_mode: Option<String>,
    /// `--bind-address`.
    pub bind_address: Option<String>,
    /// `--proxy-port-range`.
    pub port_range: Option<String>,
    /// `--udp-timeout`.
    pub udp_timeout: Option<String>,
    /// `--hostname-override`.
    pub hostname_override: Option<String>,
    /// `--master`: the API server's address, overriding the kubeconfig's.
    pub master: Option<String>,
    /// `--kubeconfig`.
    pub kubeconfig: Option<String>,
    /// `--healthz-bind-address`.
    pub healthz_bind_address: Option<String>,
    /// `--metrics-bind-address`.
    pub metrics_bind_address: Option<String>,
    /// `--portal-mode`.
    pub portal_mode: Option<PortalMode>,
    /// `--iptables-sync-period`.
    pub sync_period: Option<String>,
    /// `--iptables-min-sync-period`.
    pub min_sync_period: Option<String>,
    /// `--netfilter-extensions`.
    pub netfilter_extensions: Option<crate::proxier::rules::iptables::ExtensionsMode>,
    /// `--iptables-command`.
    pub iptables_command: Option<String>,
}

/// The validated settings the program runs on.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// IP the proxy ports listen on.
    pub bind_address: IpAddr,
    /// Where proxy ports come from.
    pub port_range: PortRange,
    /// UDP session idle timeout.
    pub udp_idle_timeout: Duration,
    /// Longest time between syncs.
    pub sync_period: Duration,
    /// Shortest time between syncs (after a burst of two).
    pub min_sync_period: Duration,
    /// Informer resync period.
    pub config_sync_period: Duration,
    /// Health server address.
    pub healthz_bind_address: Option<SocketAddr>,
    /// Metrics server address.
    pub metrics_bind_address: Option<SocketAddr>,
    /// Admin bind failures are fatal.
    pub bind_address_hard_fail: bool,
    /// kubeconfig path, if any.
    pub kubeconfig: Option<PathBuf>,
    /// `--master`: API server URL (overrides the kubeconfig's server).
    pub master: Option<String>,
    /// Serve only services with this `service.kubernetes.io/service-proxy-name`.
    pub service_proxy_name: Option<String>,
    /// Where endpoints come from in the Kubernetes source.
    pub endpoint_source: EndpointSource,
    /// This node's name.
    pub hostname: String,
    /// Range for file services' cluster IPs.
    pub service_cidr: IpNet,
    /// Pod CIDRs.
    pub cluster_cidrs: Vec<IpNet>,
    /// How traffic reaches listeners.
    pub portal_mode: PortalMode,
    /// Interface for `bind` portal mode.
    pub portal_interface: String,
    /// Rule shapes for the iptables backend.
    pub netfilter_extensions: crate::proxier::rules::iptables::ExtensionsMode,
    /// iptables command.
    pub iptables_command: String,
    /// Most UDP sessions per service port.
    pub udp_max_sessions: usize,
    /// Drain time on SIGTERM.
    pub shutdown_grace_period: Duration,
    /// Longest poll before a data-plane thread sleeps.
    pub poll_before_sleep: Duration,
    /// `oom_score_adj` to apply.
    pub oom_score_adj: Option<i32>,
}

impl KubeProxyConfiguration {
    /// Applies command-line overrides, parsing them as the file's fields would be parsed.
    ///
    /// # Errors
    /// A flag value that does not parse (named by the flag).
    pub fn apply(&mut self, o: &Overrides) -> Result<()> {
        let flag_err = |flag: &str, message: String| Error::Flag {
            flag: flag.into(),
            message,
        };
        if let Some(v) = &o.proxy_mode {
            self.mode = v.clone();
        }
        if let Some(v) = &o.bind_address {
            self.bind_address = v.clone();
        }
        if let Some(v) = &o.port_range {
            self.port_range = v.clone();
        }
        if let Some(v) = &o.udp_timeout {
            self.udp_idle_timeout =
                GoDuration(duration::parse(v).map_err(|m| flag_err("--udp-timeout", m))?);
        }
        if let Some(v) = &o.sync_period {
            self.iptables.sync_period =
                GoDuration(duration::parse(v).map_err(|m| flag_err("--iptables-sync-period", m))?);
        }
        if let Some(v) = &o.min_sync_period {
            self.iptables.min_sync_period = GoDuration(
                duration::parse(v).map_err(|m| flag_err("--iptables-min-sync-period", m))?,
            );
        }
        if let Some(v) = &o.hostname_override {
            self.hostname_override = v.clone();
        }
        if let Some(v) = &o.kubeconfig {
            self.client_connection.kubeconfig = v.clone();
        }
        if let Some(v) = &o.healthz_bind_address {
            self.healthz_bind_address = v.clone();
        }
        if let Some(v) = &o.metrics_bind_address {
            self.metrics_bind_address = v.clone();
        }
        if let Some(v) = o.portal_mode {
            self.portal_mode = v;
        }
        if let Some(v) = o.netfilter_extensions {
            self.netfilter_extensions = v;
        }
        if let Some(v) = &o.iptables_command {
            self.iptables_command = v.clone();
        }
        Ok(())
    }

    /// Checks every field and produces [`Settings`]. `origin` and `document` name where the
    /// configuration came from, for the error text.
    ///
    /// # Errors
    /// The first field that cannot be used, named by its path.
    pub fn validate(&self, origin: &str, document: usize) -> Result<Settings> {
        let err = |field: &str, message: String| Error::Field {
            origin: origin.into(),
            document,
            object: KIND.into(),
            field: field.into(),
            message,
        };
        if self.api_version != API_VERSION {
            return Err(err(
                "apiVersion",
                format!(
                    "{:?} is not supported (expected {API_VERSION})",
                    self.api_version
                ),
            ));
        }
        if self.kind != KIND {
            return Err(err(
                "kind",
                format!("{:?} is not supported (expected {KIND})", self.kind),
            ));
        }
        if !(self.mode.is_empty() || self.mode == MODE) {
            return Err(err(
                "mode",
                format!(
                    "proxy mode {:?} is not supported: this program implements only \"{MODE}\"",
                    self.mode
                ),
            ));
        }
        let bind_address: IpAddr = self.bind_address.parse().map_err(|_| {
            err(
                "bindAddress",
                format!("{:?} is not an IP address", self.bind_address),
            )
        })?;
        if bind_address.is_loopback() && self.portal_mode != PortalMode::None {
            // kube-proxy's ErrProxyOnLocalhost: redirected traffic cannot reach a loopback-only
            // listener from other interfaces.
            return Err(err("bindAddress", "cannot proxy on localhost".into()));
        }
        let port_range = PortRange::parse(&self.port_range).map_err(|m| err("portRange", m))?;
        let udp_idle_timeout = self.udp_idle_timeout.0;
        if udp_idle_timeout.is_zero() {
            return Err(err("udpIdleTimeout", "must be greater than 0".into()));
        }
        let sync_period = self.iptables.sync_period.0;
        let min_sync_period = self.iptables.min_sync_period.0;
        if sync_period.is_zero() {
            return Err(err("iptables.syncPeriod", "must be greater than 0".into()));
        }
        if min_sync_period > sync_period {
            return Err(err(
                "iptables.minSyncPeriod",
                format!(
                    "{} must not be longer than iptables.syncPeriod ({})",
                    self.iptables.min_sync_period, self.iptables.sync_period
                ),
            ));
        }
        if self.config_sync_period.0.is_zero() {
            return Err(err("configSyncPeriod", "must be greater than 0".into()));
        }
        let addr = |field: &str, v: &str| -> Result<Option<SocketAddr>> {
            if v.is_empty() {
                return Ok(None);
            }
            v.parse()
                .map(Some)
                .map_err(|_| err(field, format!("{v:?} is not an IP:port address")))
        };
        let healthz_bind_address = addr("healthzBindAddress", &self.healthz_bind_address)?;
        let metrics_bind_address = addr("metricsBindAddress", &self.metrics_bind_address)?;
        let service_cidr: IpNet = self.service_cluster_ip_range.parse().map_err(|_| {
            err(
                "serviceClusterIPRange",
                format!("{:?} is not a CIDR", self.service_cluster_ip_range),
            )
        })?;
        let mut cluster_cidrs = Vec::new();
        for part in self
            .cluster_cidr
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let net: IpNet = part
                .parse()
                .map_err(|_| err("clusterCIDR", format!("{part:?} is not a CIDR")))?;
            if net.contains(&service_cidr.network()) || service_cidr.contains(&net.network()) {
                return Err(err(
                    "serviceClusterIPRange",
                    format!("{service_cidr} overlaps clusterCIDR {net}: service and pod addresses must be distinct"),
                ));
            }
            cluster_cidrs.push(net);
        }
        if self.udp_max_sessions == 0 {
            return Err(err("udpMaxSessions", "must be greater than 0".into()));
        }
        if self.poll_before_sleep.0 > MAX_POLL_BEFORE_SLEEP {
            return Err(err(
                "pollBeforeSleep",
                format!(
                    "{} is more than the most allowed, {}: a longer poll costs more CPU than the wake-up it saves (0s turns polling off)",
                    self.poll_before_sleep, GoDuration(MAX_POLL_BEFORE_SLEEP)
                ),
            ));
        }
        if !matches!(
            self.iptables_command.as_str(),
            "iptables" | "iptables-legacy" | "iptables-nft"
        ) {
            return Err(err(
                "iptablesCommand",
                format!(
                    "{:?} is not one of iptables, iptables-legacy, iptables-nft",
                    self.iptables_command
                ),
            ));
        }
        if self.portal_interface.is_empty() {
            return Err(err("portalInterface", "must not be empty".into()));
        }
        let hostname = if self.hostname_override.trim().is_empty() {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_lowercase())
                .unwrap_or_default()
        } else {
            self.hostname_override.trim().to_lowercase()
        };
        if hostname.is_empty() {
            return Err(err(
                "hostnameOverride",
                "the node name is empty and the hostname cannot be read".into(),
            ));
        }
        let kubeconfig = Some(self.client_connection.kubeconfig.trim())
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        let service_proxy_name = Some(self.service_proxy_name.trim())
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        if let Some(name) = &service_proxy_name {
            // A label value: at most 63 characters of [A-Za-z0-9._-], alphanumeric at both ends.
            let ok = name.len() <= 63
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                && name.starts_with(|c: char| c.is_ascii_alphanumeric())
                && name.ends_with(|c: char| c.is_ascii_alphanumeric());
            if !ok {
                return Err(err(
                    "serviceProxyName",
                    format!("{name:?} is not a valid label value (at most 63 characters of letters, digits, '.', '_' and '-', starting and ending with a letter or digit)"),
                ));
            }
        }
        Ok(Settings {
            bind_address,
            port_range,
            udp_idle_timeout,
            sync_period,
            min_sync_period,
            config_sync_period: self.config_sync_period.0,
            healthz_bind_address,
            metrics_bind_address,
            bind_address_hard_fail: self.bind_address_hard_fail,
            kubeconfig,
            master: None,
            service_proxy_name,
            endpoint_source: self.endpoint_source,
            hostname,
            service_cidr,
            cluster_cidrs,
            portal_mode: self.portal_mode,
            portal_interface: self.portal_interface.clone(),
            netfilter_extensions: self.netfilter_extensions,
            iptables_command: self.iptables_command.clone(),
            udp_max_sessions: self.udp_max_sessions,
            shutdown_grace_period: self.shutdown_grace_period.0,
            poll_before_sleep: self.poll_before_sleep.0,
            oom_score_adj: self.oom_score_adj,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> KubeProxyConfiguration {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_match_kube_proxy() {
        let s = KubeProxyConfiguration::default().validate("t", 1).unwrap();
        assert_eq!(s.bind_address, "0.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(s.udp_idle_timeout, Duration::from_millis(250));
        assert_eq!(s.sync_period, Duration::from_secs(30));
        assert_eq!(s.min_sync_period, Duration::from_secs(1));
        assert_eq!(s.config_sync_period, Duration::from_secs(900));
        assert_eq!(
            s.healthz_bind_address,
            Some("0.0.0.0:10256".parse().unwrap())
        );
        assert_eq!(
            s.metrics_bind_address,
            Some("127.0.0.1:10249".parse().unwrap())
        );
        assert_eq!(s.port_range, PortRange::Ephemeral);
        assert_eq!(s.service_cidr, "10.96.0.0/12".parse::<IpNet>().unwrap());
        assert_eq!(s.portal_mode, PortalMode::Iptables);
        assert_eq!(s.poll_before_sleep, Duration::from_micros(100));
    }

    #[test]
    fn polling_before_sleep_can_be_shortened_or_turned_off_but_not_made_long() {
        let s = cfg("pollBeforeSleep: 50us").validate("f.yaml", 1).unwrap();
        assert_eq!(s.poll_before_sleep, Duration::from_micros(50));
        let s = cfg("pollBeforeSleep: 0s").validate("f.yaml", 1).unwrap();
        assert_eq!(s.poll_before_sleep, Duration::ZERO);
        let s = cfg("pollBeforeSleep: 1ms").validate("f.yaml", 1).unwrap();
        assert_eq!(s.poll_before_sleep, MAX_POLL_BEFORE_SLEEP);
    }

    #[test]
    fn other_modes_are_refused_naming_userspace() {
        let e = cfg("mode: iptables")
            .validate("f.yaml", 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("f.yaml") && e.contains("field mode") && e.contains("userspace"),
            "{e}"
        );
    }

    #[test]
    fn each_invalid_field_is_named() {
        for (yaml, field) in [
            ("udpIdleTimeout: 0s", "udpIdleTimeout"),
            ("pollBeforeSleep: 1001us", "pollBeforeSleep"),
            ("bindAddress: 127.0.0.1", "bindAddress"),
            ("bindAddress: nope", "bindAddress"),
            ("portRange: 9-1", "portRange"),
            (
                "iptables: {syncPeriod: 1s, minSyncPeriod: 5s}",
                "iptables.minSyncPeriod",
            ),
            ("healthzBindAddress: 10256", "healthzBindAddress"),
            ("clusterCIDR: 10.96.0.0/16", "serviceClusterIPRange"),
            ("apiVersion: v1", "apiVersion"),
        ] {
            let e = cfg(yaml).validate("f.yaml", 1).unwrap_err().to_string();
            assert!(e.contains(&format!("field {field}:")), "{yaml}: {e}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_yaml::from_str::<KubeProxyConfiguration>("bindAdress: 0.0.0.0").is_err());
    }

    #[test]
    fn ignored_kube_proxy_fields_are_accepted() {
        let c = cfg("ipvs: {scheduler: rr}\nconntrack: {maxPerCore: 32768}\nfeatureGates: {Foo: true}\niptables: {masqueradeAll: true, masqueradeBit: 14}\nnodePortAddresses: []\nclusterCIDR: 10.244.0.0/16");
        c.validate("t", 1).unwrap();
    }

    #[test]
    fn flags_override_the_file() {
        let mut c = cfg("udpIdleTimeout: 1s\nmode: userspace");
        c.apply(&Overrides {
            udp_timeout: Some("2s".into()),
            proxy_mode: Some("ipvs".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.udp_idle_timeout.0, Duration::from_secs(2));
        assert!(c
            .validate("t", 1)
            .unwrap_err()
            .to_string()
            .contains("userspace"));
        let bad = c.apply(&Overrides {
            udp_timeout: Some("soon".into()),
            ..Default::default()
        });
        assert!(bad.unwrap_err().to_string().contains("--udp-timeout"));
    }
}
