//! The Kubernetes API source: watches of Services and EndpointSlices (or `v1 Endpoints` on API
//! servers that do not serve `discovery.k8s.io/v1`), folded into whole [`DesiredState`]
//! snapshots on the same channel the file source uses.
//!
//! kube-proxy's behaviour, kept:
//! - the label selectors `!service.kubernetes.io/service-proxy-name` and
//!   `!service.kubernetes.io/headless` (or `service-proxy-name=<ours>` when `serviceProxyName`
//!   is set, so this proxy can run beside another);
//! - nothing is published until both initial lists have arrived, so the proxier never programs
//!   a cluster with services but no endpoints yet.
//!
//! And what users asked of it:
//! - the API server going away disturbs nothing: the last state keeps serving, watches resume
//!   with backoff (800 ms doubling to 30 s, jittered), and a relist that finds what was already
//!   known publishes nothing, so listeners and rules are not touched;
//! - bursts are coalesced: every event already received is folded in before one snapshot is
//!   built, so a thousand endpoint changes cost one sync, not a thousand.

pub mod store;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Endpoints, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::SourceStats;
use crate::config::{EndpointSource, Settings};
use crate::model::{convert, DesiredState};
use store::Store;

/// Label a Service carries when another proxy implementation serves it.
pub const LABEL_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label the control plane puts on the endpoints of headless services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// Errors at the Kubernetes API boundary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig cannot be read or used.
    #[error("kubeconfig {path}")]
    Kubeconfig {
        /// Its path.
        path: String,
        /// Why.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// `--master` is not a URL.
    #[error("flag --master: {value:?} is not a URL (expected e.g. https://10.0.0.1:6443)")]
    Master {
        /// The value given.
        value: String,
    },
    /// Neither a kubeconfig nor `--master` was given, and this is not a pod.
    #[error("in-cluster configuration")]
    InCluster(#[source] kube::config::InClusterError),
    /// The client cannot be built (TLS material, proxy settings).
    #[error("cannot build the API client")]
    Client(#[source] kube::Error),
}

/// True when this process runs in a pod (the kubelet sets these for every container).
pub fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        && std::env::var_os("KUBERNETES_SERVICE_PORT").is_some()
}

/// Parses `--master`: a URL with a scheme and a host.
///
/// # Errors
/// Anything else, e.g. a bare `host:port`.
pub fn parse_master(value: &str) -> Result<http::Uri, Error> {
    value
        .parse::<http::Uri>()
        .ok()
        .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
        .ok_or_else(|| Error::Master {
            value: value.to_string(),
        })
}

/// Builds an API client as kube-proxy does: the kubeconfig if one is given (its server replaced
/// by `--master` if that is given too); `--master` alone (no credentials, as kube-proxy); else
/// the pod's service account.
///
/// # Errors
/// The kubeconfig is unreadable, `--master` is not a URL, or there is no configuration at all.
pub async fn client(settings: &Settings) -> Result<Client, Error> {
    let master = settings.master.as_deref().map(parse_master).transpose()?;
    let config = match (&settings.kubeconfig, master) {
        (Some(path), master) => {
            let shown = path.display().to_string();
            let kc =
                kube::config::Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                    path: shown.clone(),
                    source,
                })?;
            let mut c = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: shown,
                    source,
                })?;
            if let Some(m) = master {
                c.cluster_url = m;
            }
            c
        }
        (None, Some(m)) => kube::Config::new(m),
        (None, None) => kube::Config::incluster().map_err(Error::InCluster)?,
    };
    info!(server = %config.cluster_url, "Kubernetes API source");
    Client::try_from(config).map_err(Error::Client)
}

/// What the source needs from the configuration.
#[derive(Clone, Debug)]
pub struct Options {
    /// This node's name.
    pub node_name: String,
    /// Our `service-proxy-name`, if we serve only labelled services.
    pub service_proxy_name: Option<String>,
    /// EndpointSlices, Endpoints, or detect.
    pub endpoint_source: EndpointSource,
    /// Proxy IPv6 services (`true`) or IPv4 ones.
    pub ipv6: bool,
}

impl Options {
    /// Options from validated settings.
    pub fn from_settings(s: &Settings) -> Self {
        Self {
            node_name: s.hostname.clone(),
            service_proxy_name: s.service_proxy_name.clone(),
            endpoint_source: s.endpoint_source,
            ipv6: s.bind_address.is_ipv6() && !s.bind_address.is_unspecified(),
        }
    }

    /// The label selector for every watch, kube-proxy's unless we have a proxy name of our own.
    pub fn label_selector(&self) -> String {
        match &self.service_proxy_name {
            Some(name) => format!("{LABEL_PROXY_NAME}={name},!{LABEL_HEADLESS}"),
            None => format!("!{LABEL_PROXY_NAME},!{LABEL_HEADLESS}"),
        }
    }
}

/// One event from one of the watches. (Moved once per event, straight into the store: boxing
/// the large variant would only add an allocation.)
#[allow(clippy::large_enum_variant)]
enum Change {
    Service(Result<Event<Service>, watcher::Error>),
    Slice(Result<Event<EndpointSlice>, watcher::Error>),
    Endpoints(Result<Event<Endpoints>, watcher::Error>),
}

/// The state of one watch: its initial list arrived, and the buffer of a list in progress.
struct ListState<K> {
    synced: bool,
    buffer: Option<Vec<K>>,
}

impl<K> Default for ListState<K> {
    fn default() -> Self {
        Self {
            synced: false,
            buffer: None,
        }
    }
}

/// Folds one watcher event into `state`. Returns the complete list when a list (initial or
/// relist) has just finished, and the object of an incremental event.
enum Step<K> {
    Nothing,
    Listed(Vec<K>),
    Applied(K),
    Deleted(K),
}

fn step<K>(state: &mut ListState<K>, ev: Event<K>) -> Step<K> {
    match ev {
        Event::Init => {
            state.buffer = Some(Vec::new());
            Step::Nothing
        }
        Event::InitApply(k) => {
            state.buffer.get_or_insert_with(Vec::new).push(k);
            Step::Nothing
        }
        Event::InitDone => {
            state.synced = true;
            Step::Listed(state.buffer.take().unwrap_or_default())
        }
        Event::Apply(k) => Step::Applied(k),
        Event::Delete(k) => Step::Deleted(k),
    }
}

/// Watches the API server and publishes snapshots.
pub struct KubeSource {
    client: Client,
    opts: Options,
    stats: Arc<SourceStats>,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    /// A source reading from `client`.
    pub fn new(client: Client, opts: Options) -> Self {
        Self {
            client,
            opts,
            stats: Arc::new(SourceStats::default()),
        }
    }

    /// Counters for status and tests.
    pub fn stats(&self) -> Arc<SourceStats> {
        self.stats.clone()
    }

    fn refuse(&self, e: &convert::Error) {
        error!(object = %e.object, field = %e.field, error = %e.message, "object refused; its last good version keeps serving");
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        *self
            .stats
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    /// Decides where endpoints come from: asks the API server whether it serves
    /// `discovery.k8s.io/v1` EndpointSlices, retrying (with backoff, until `cancel`) while it
    /// cannot be reached.
    async fn endpoint_api(&self, cancel: &CancellationToken) -> Option<EndpointSource> {
        if self.opts.endpoint_source != EndpointSource::Auto {
            return Some(self.opts.endpoint_source);
        }
        let mut delay = Duration::from_millis(500);
        loop {
            match self
                .client
                .list_api_group_resources("discovery.k8s.io/v1")
                .await
            {
                Ok(list) if list.resources.iter().any(|r| r.name == "endpointslices") => {
                    info!("reading endpoints from discovery.k8s.io/v1 EndpointSlices");
                    return Some(EndpointSource::EndpointSlice);
                }
                Ok(_) => {
                    warn!("the API server serves discovery.k8s.io/v1 without endpointslices; reading v1 Endpoints instead");
                    return Some(EndpointSource::Endpoints);
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    warn!("the API server does not serve discovery.k8s.io/v1 (Kubernetes older than 1.21); reading v1 Endpoints instead");
                    return Some(EndpointSource::Endpoints);
                }
                Err(e) => {
                    warn!(error = %e, retry_ms = delay.as_millis() as u64, "cannot ask the API server which endpoint API it serves; retrying");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    /// Logs whether this node exists, and warns when it does not: `Local` traffic policies
    /// select endpoints by node name, and a wrong name silently selects none.
    async fn check_node(&self) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let name = &self.opts.node_name;
        match tokio::time::timeout(Duration::from_secs(5), nodes.get_opt(name)).await {
            Ok(Ok(Some(node))) => {
                let addrs: Vec<String> = node
                    .status
                    .and_then(|s| s.addresses)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|a| a.address)
                    .collect();
                info!(node = %name, addresses = ?addrs, "node found");
            }
            Ok(Ok(None)) => {
                warn!(node = %name, "no Node object has this name: services with a Local traffic policy will find no local endpoints (set --hostname-override to the node's name)")
            }
            Ok(Err(e)) => debug!(node = %name, error = %e, "cannot read the Node object"),
            Err(_) => debug!(node = %name, "reading the Node object timed out"),
        }
    }

    fn watches(&self, endpoints: EndpointSource) -> impl Stream<Item = Change> + Send + Unpin {
        let config = watcher::Config::default().labels(&self.opts.label_selector());
        let services = watcher::watcher(Api::<Service>::all(self.client.clone()), config.clone())
            .default_backoff()
            .map(Change::Service);
        let endpoints = match endpoints {
            EndpointSource::Endpoints => {
                watcher::watcher(Api::<Endpoints>::all(self.client.clone()), config)
                    .default_backoff()
                    .map(Change::Endpoints)
                    .boxed()
            }
            _ => watcher::watcher(Api::<EndpointSlice>::all(self.client.clone()), config)
                .default_backoff()
                .map(Change::Slice)
                .boxed(),
        };
        futures::stream::select(services.boxed(), endpoints)
    }

    /// Watches until `cancel`, publishing a snapshot whenever what the cluster wants changes
    /// (`None` stays on the channel until both initial lists have arrived).
    pub async fn run(
        self,
        tx: watch::Sender<Option<Arc<DesiredState>>>,
        cancel: CancellationToken,
    ) {
        // Independent requests: one round trip to the API server before the lists, not two.
        let (api, ()) = tokio::join!(self.endpoint_api(&cancel), self.check_node());
        let Some(api) = api else {
            return;
        };
        let mut changes = self.watches(api);
        let mut store = Store::new(self.opts.ipv6);
        let mut services = ListState::<Service>::default();
        let mut slices = ListState::<EndpointSlice>::default();
        let mut legacy = ListState::<Endpoints>::default();
        let mut last: Option<Arc<DesiredState>> = None;
        let mut waiting_logged = false;
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => break,
                c = changes.next() => match c {
                    Some(c) => c,
                    None => break,
                },
            };
            let mut dirty = self.fold(first, &mut store, &mut services, &mut slices, &mut legacy);
            // Coalesce: fold in everything that has already arrived before building a snapshot.
            while let Some(Some(c)) = changes.next().now_or_never() {
                dirty |= self.fold(c, &mut store, &mut services, &mut slices, &mut legacy);
            }
            let endpoints_synced = match api {
                EndpointSource::Endpoints => legacy.synced,
                _ => slices.synced,
            };
            if !(services.synced && endpoints_synced) {
                if !waiting_logged {
                    debug!(
                        services = services.synced,
                        endpoints = endpoints_synced,
                        "waiting for both initial lists"
                    );
                    waiting_logged = true;
                }
                continue;
            }
            if !dirty && last.is_some() {
                continue;
            }
            let snapshot = store.snapshot();
            if last.as_deref() == Some(&snapshot) {
                debug!("watch events changed nothing this node proxies");
                continue;
            }
            if last.is_none() {
                info!(
                    service_ports = snapshot.services.len(),
                    "initial lists received"
                );
            }
            let snapshot = Arc::new(snapshot);
            last = Some(snapshot.clone());
            tx.send_replace(Some(snapshot));
            self.stats.published.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Folds one change into the store. Returns true when the store may have changed.
    fn fold(
        &self,
        change: Change,
        store: &mut Store,
        services: &mut ListState<Service>,
        slices: &mut ListState<EndpointSlice>,
        legacy: &mut ListState<Endpoints>,
    ) -> bool {
        match change {
            Change::Service(r) => self.fold_one(r, services, store),
            Change::Slice(r) => self.fold_one(r, slices, store),
            Change::Endpoints(r) => self.fold_one(r, legacy, store),
        }
    }

    fn fold_one<K: Watched>(
        &self,
        event: Result<Event<K>, watcher::Error>,
        state: &mut ListState<K>,
        store: &mut Store,
    ) -> bool {
        let ev = match event {
            Ok(ev) => ev,
            Err(e) => {
                warn!(kind = K::KIND, error = %e, "watch failed; the last known state keeps serving, retrying with backoff");
                return false;
            }
        };
        let result = match step(state, ev) {
            Step::Nothing => return false,
            Step::Listed(list) => {
                debug!(kind = K::KIND, objects = list.len(), "listed");
                for e in K::replace(store, list) {
                    self.refuse(&e);
                }
                return true;
            }
            Step::Applied(obj) => K::apply(store, &obj),
            Step::Deleted(obj) => {
                K::delete(store, &obj);
                Ok(())
            }
        };
        if let Err(e) = result {
            self.refuse(&e);
        }
        true
    }
}

/// A kind of object the source watches, and what each of its events does to the store.
trait Watched: Sized {
    const KIND: &'static str;
    fn replace(store: &mut Store, list: Vec<Self>) -> Vec<convert::Error>;
    fn apply(store: &mut Store, obj: &Self) -> Result<(), convert::Error>;
    fn delete(store: &mut Store, obj: &Self);
}

impl Watched for Service {
    const KIND: &'static str = "Service";
    fn replace(store: &mut Store, list: Vec<Self>) -> Vec<convert::Error> {
        store.replace_services(&list)
    }
    fn apply(store: &mut Store, obj: &Self) -> Result<(), convert::Error> {
        if let Some(why) = store.apply_service(obj)? {
            debug!(service = ?convert::namespaced_name(&obj.metadata), reason = %why, "skipped");
        }
        Ok(())
    }
    fn delete(store: &mut Store, obj: &Self) {
        store.delete_service(obj)
    }
}

impl Watched for EndpointSlice {
    const KIND: &'static str = "EndpointSlice";
    fn replace(store: &mut Store, list: Vec<Self>) -> Vec<convert::Error> {
        store.replace_slices(list)
    }
    fn apply(store: &mut Store, obj: &Self) -> Result<(), convert::Error> {
        store.apply_slice(obj)
    }
    fn delete(store: &mut Store, obj: &Self) {
        store.delete_slice(obj)
    }
}

impl Watched for Endpoints {
    const KIND: &'static str = "Endpoints";
    fn replace(store: &mut Store, list: Vec<Self>) -> Vec<convert::Error> {
        store.replace_endpoints(&list)
    }
    fn apply(store: &mut Store, obj: &Self) -> Result<(), convert::Error> {
        store.apply_endpoints(obj)
    }
    fn delete(store: &mut Store, obj: &Self) {
        store.delete_endpoints(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_kube_proxy_or_our_own_name() {
        let mut o = Options {
            node_name: "n".into(),
            service_proxy_name: None,
            endpoint_source: EndpointSource::Auto,
            ipv6: false,
        };
        assert_eq!(
            o.label_selector(),
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
        o.service_proxy_name = Some("edge".into());
        assert_eq!(
            o.label_selector(),
            "service.kubernetes.io/service-proxy-name=edge,!service.kubernetes.io/headless"
        );
    }

    #[test]
    fn a_list_is_published_only_when_done() {
        let mut st = ListState::<u32>::default();
        assert!(matches!(step(&mut st, Event::Init), Step::Nothing));
        assert!(matches!(step(&mut st, Event::InitApply(1)), Step::Nothing));
        assert!(matches!(step(&mut st, Event::InitApply(2)), Step::Nothing));
        assert!(!st.synced);
        match step(&mut st, Event::InitDone) {
            Step::Listed(l) => assert_eq!(l, [1, 2]),
            _ => panic!("expected the list"),
        }
        assert!(st.synced);
        // A relist after a 410 starts a fresh buffer; the synced flag stays up meanwhile.
        assert!(matches!(step(&mut st, Event::Init), Step::Nothing));
        assert!(st.synced);
        match step(&mut st, Event::InitDone) {
            Step::Listed(l) => assert!(l.is_empty()),
            _ => panic!("expected the list"),
        }
    }
}
