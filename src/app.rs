//! Composition root: builds the source, the proxier and their tasks from a configuration, owns
//! the root cancellation token and the task tracker, and shuts everything down in order.
//!
//! Shutdown: cancel → the proxier stops accepting on every listener → established connections
//! drain for `shutdownGracePeriod` → whatever is left is cut → exit. Portals stay in place, as
//! kube-proxy leaves its rules; the next start flushes and re-installs them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::config::file::{ConfigFile, ParseCache};
use crate::config::{self, Overrides, PortalMode, Settings};
use crate::model::DesiredState;
use crate::proxier::rules::{self, bind::Bind, iptables::Iptables, nftables::Nftables, Backend};
use crate::proxier::{self, Options, Proxier, Status};
use crate::source::file::{self as file_source, FileSource};
use crate::source::kube::{self as kube_source, KubeSource};
use crate::source::SourceStats;

/// The configuration shipped inside the binary, used when no `--config` is given.
pub const EMBEDDED_CONFIG: &str = include_str!("../config.example.yaml");

/// Startup failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("invalid configuration")]
    Config(#[from] config::Error),
    /// The proxier could not start.
    #[error("cannot start the proxier")]
    Proxier(#[from] proxier::Error),
    /// An admin server could not bind and `bindAddressHardFail` is set.
    #[error("cannot serve on {addr} (bindAddressHardFail)")]
    Admin {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// The Kubernetes API client cannot be configured.
    #[error("cannot use the Kubernetes API")]
    Kube(#[from] kube_source::Error),
}

/// Where services and endpoints come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// The configuration file (or the embedded default).
    File,
    /// The Kubernetes API server.
    Kubernetes,
}

/// Chooses the source as kube-proxy would, with the file source for hosts without Kubernetes:
/// a kubeconfig or `--master` means the API server; so does running in a pod, unless the
/// configuration file itself lists services or endpoints.
pub fn source_kind(settings: &Settings, file: &ConfigFile, in_pod: bool) -> SourceKind {
    let file_has_objects =
        !(file.services.is_empty() && file.endpoints.is_empty() && file.slices.is_empty());
    if settings.kubeconfig.is_some() || settings.master.is_some() || (in_pod && !file_has_objects) {
        SourceKind::Kubernetes
    } else {
        SourceKind::File
    }
}

/// A configuration loaded and validated, ready to run.
#[derive(Debug)]
pub struct Loaded {
    /// The file (or `None` for the embedded default).
    pub path: Option<PathBuf>,
    /// Its text.
    pub text: String,
    /// Parsed file, with flags applied to its configuration.
    pub file: ConfigFile,
    /// Validated settings.
    pub settings: Settings,
    /// The flags, re-applied on every reload.
    pub overrides: Overrides,
    /// The desired state the file describes.
    pub state: DesiredState,
    /// Parsed documents, handed to the file source so its first reload re-parses only what
    /// changed.
    pub cache: ParseCache,
    /// Where services and endpoints come from.
    pub source: SourceKind,
}

/// Loads and validates everything before anything is bound or installed.
///
/// # Errors
/// The file cannot be read or is invalid in any document.
pub fn load(path: Option<PathBuf>, overrides: Overrides) -> Result<Loaded, config::Error> {
    let (origin, text) = match &path {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p).map_err(|source| config::Error::Read {
                path: p.display().to_string(),
                source,
            })?,
        ),
        None => (
            "<embedded default>".to_string(),
            EMBEDDED_CONFIG.to_string(),
        ),
    };
    let mut cache = ParseCache::default();
    let mut file = ConfigFile::parse_cached(&origin, &text, &mut cache)?;
    file.proxy.apply(&overrides)?;
    let mut settings = file.settings()?;
    if let Some(m) = &overrides.master {
        kube_source::parse_master(m).map_err(|_| config::Error::Flag {
            flag: "--master".into(),
            message: format!(
                "{m:?} is not an http:// or https:// URL (e.g. https://10.0.0.1:6443)"
            ),
        })?;
    }
    settings.master = overrides.master.clone();
    let source = source_kind(&settings, &file, kube_source::in_cluster());
    // Build the state now so object errors stop the start too (the file's objects only matter
    // when the file is the source).
    let state = match source {
        SourceKind::File => file_source::desired_from(&file, &settings, &mut cache)?,
        SourceKind::Kubernetes => DesiredState::default(),
    };
    Ok(Loaded {
        path,
        text,
        file,
        settings,
        overrides,
        state,
        cache,
        source,
    })
}

/// Descriptors kube-proxy's userspace mode asked for (`setRLimit(64*1000)`).
pub const WANTED_NOFILE: u64 = 64_000;

/// Raises the open-file limit as far as the system allows: first to at least
/// [`WANTED_NOFILE`] (soft and hard, which needs privilege), else the soft limit up to the hard
/// one. Never fatal, unlike the original: a proxy with fewer descriptors still serves, and
/// running out is handled by backing off. Returns the (soft, hard) limit in force.
pub fn raise_nofile_limit() -> (u64, u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return (0, 0);
    };
    let want = WANTED_NOFILE.max(soft);
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return (want, want);
    }
    if soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((soft, hard))
}

/// The portal backend the settings ask for.
pub fn backend_for(settings: &Settings) -> Backend {
    match settings.portal_mode {
        PortalMode::Iptables => Backend::Iptables(Iptables::new(
            &settings.iptables_command,
            settings.bind_address,
            settings.netfilter_extensions,
        )),
        PortalMode::Nftables => Backend::Nftables(Nftables::new(settings.bind_address)),
        PortalMode::Bind => Backend::Bind(Bind::new(&settings.portal_interface)),
        PortalMode::None => Backend::None,
    }
}

/// Removes everything any portal mode installs (`--cleanup`): iptables chains and jump rules
/// (for every iptables flavour present), our nftables table and labelled service addresses.
///
/// # Errors
/// Something exists but cannot be removed.
pub fn cleanup(settings: &Settings) -> Result<(), rules::Error> {
    let mut first = None;
    for cmd in ["iptables", "iptables-legacy", "iptables-nft"] {
        if rules::run(cmd, &["--version"], None).is_err() {
            continue;
        }
        if let Err(e) =
            Iptables::new(cmd, settings.bind_address, settings.netfilter_extensions).cleanup()
        {
            first.get_or_insert(e);
        }
    }
    if let Err(e) = Nftables::cleanup() {
        first.get_or_insert(e);
    }
    match Bind::cleanup(&settings.portal_interface) {
        Ok(n) if n > 0 => {
            info!(removed = n, interface = %settings.portal_interface, "removed service addresses")
        }
        Ok(_) => {}
        Err(e) => {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// A running proxy.
#[derive(Debug)]
pub struct Running {
    /// Proxier status snapshots.
    pub status: watch::Receiver<Arc<Status>>,
    /// Source counters.
    pub source: Arc<SourceStats>,
    /// Cancel to stop.
    pub cancel: CancellationToken,
    /// Where the health server listens (if it is enabled and bound).
    pub healthz_addr: Option<SocketAddr>,
    /// Where the metrics server listens (if it is enabled and bound).
    pub metrics_addr: Option<SocketAddr>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Waits until the proxy has stopped (after `cancel`).
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    /// Stops and waits.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.wait().await;
    }
}

/// Starts the proxy. `hup` delivers reload requests (SIGHUP in the binary). Portals are
/// initialised before this returns, so a setup error is returned, not logged.
///
/// # Errors
/// Portals cannot be initialised.
pub async fn start(
    loaded: Loaded,
    backend: Backend,
    hup: mpsc::Receiver<()>,
) -> Result<Running, Error> {
    // The API client first: a bad kubeconfig must stop the start before anything is installed.
    let client = match loaded.source {
        SourceKind::Kubernetes => Some(kube_source::client(&loaded.settings).await?),
        SourceKind::File => None,
    };
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let kill = CancellationToken::new();
    // Before any listener starts: the data-plane threads read it at each sleep.
    crate::listener::poll::set_limit(loaded.settings.poll_before_sleep);
    let opts = Options::from_settings(&loaded.settings);
    let grace = loaded.settings.shutdown_grace_period;
    let mut proxier = Proxier::new(opts, backend, tracker.clone(), kill.clone());
    proxier.init()?;
    let status = proxier.status();
    let admin_state = AdminState {
        status: proxier.status(),
        config_json: serde_json::to_string_pretty(&loaded.file.proxy).unwrap_or_default(),
        health_timeout: loaded.settings.sync_period * 2,
        queued: Default::default(),
    };
    let queued = admin_state.queued.clone();
    let hard_fail = loaded.settings.bind_address_hard_fail;
    let mut healthz_addr = None;
    if let Some(addr) = loaded.settings.healthz_bind_address {
        let st = admin_state.clone();
        healthz_addr = admin::start(
            "healthz",
            addr,
            hard_fail,
            move |p| st.route_healthz(p),
            &tracker,
            cancel.clone(),
        )
        .await
        .map_err(|source| Error::Admin { addr, source })?;
    }
    let mut metrics_addr = None;
    if let Some(addr) = loaded.settings.metrics_bind_address {
        let st = admin_state;
        metrics_addr = admin::start(
            "metrics",
            addr,
            hard_fail,
            move |p| st.route_metrics(p),
            &tracker,
            cancel.clone(),
        )
        .await
        .map_err(|source| Error::Admin { addr, source })?;
    }
    let (tx, rx) = watch::channel(None);
    let source_stats = match client {
        None => {
            let source = FileSource::new(
                loaded.path.clone(),
                &loaded.file,
                loaded.text,
                loaded.settings.clone(),
                loaded.overrides,
                loaded.cache,
            );
            let stats = source.stats();
            tracker.spawn(source.run(loaded.state, tx, hup, cancel.clone()));
            stats
        }
        Some(client) => {
            if loaded.path.is_some()
                && !(loaded.file.services.is_empty() && loaded.file.slices.is_empty())
            {
                warn!("the configuration file lists services, but the Kubernetes API is the source: they are ignored");
            }
            let source = KubeSource::new(
                client,
                kube_source::Options::from_settings(&loaded.settings),
            );
            let stats = source.stats();
            tracker.spawn(source.run(tx, cancel.clone()));
            stats
        }
    };
    let (mut changes, stop) = (rx.clone(), cancel.clone());
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                r = changes.changed() => {
                    if r.is_err() { break; }
                    *queued.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::SystemTime::now());
                }
            }
        }
    });
    let root = cancel.clone();
    let done = tokio::spawn(async move {
        let mut proxier = proxier.run(rx, root).await;
        proxier.stop_listening();
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(
                grace_ms = grace.as_millis() as u64,
                "connections still open after the grace period; closing them"
            );
        }
        kill.cancel();
        tracker.wait().await;
        info!("stopped");
    });
    Ok(Running {
        healthz_addr,
        metrics_addr,
        status,
        source: source_stats,
        cancel,
        done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (ConfigFile, Settings) {
        let f = ConfigFile::parse("t.yaml", text).unwrap();
        let s = f.settings().unwrap();
        (f, s)
    }

    #[test]
    fn the_source_is_chosen_as_kube_proxy_would() {
        let head = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nhostnameOverride: n\n";
        let with_services = format!("{head}---\napiVersion: v1\nkind: Service\nmetadata: {{name: a}}\nspec: {{ports: [{{port: 80}}]}}\n");
        let (bare, bare_settings) = file(head);
        let (svc, svc_settings) = file(&with_services);
        // No Kubernetes at all: the file, even if it lists nothing.
        assert_eq!(source_kind(&bare_settings, &bare, false), SourceKind::File);
        // In a pod: the API, unless the file lists services.
        assert_eq!(
            source_kind(&bare_settings, &bare, true),
            SourceKind::Kubernetes
        );
        assert_eq!(source_kind(&svc_settings, &svc, true), SourceKind::File);
        // A kubeconfig or --master always means the API.
        let mut s = svc_settings.clone();
        s.kubeconfig = Some("/etc/kubeconfig".into());
        assert_eq!(source_kind(&s, &svc, false), SourceKind::Kubernetes);
        let mut s = svc_settings;
        s.master = Some("https://10.0.0.1:6443".into());
        assert_eq!(source_kind(&s, &svc, false), SourceKind::Kubernetes);
    }

    #[test]
    fn master_must_be_a_url() {
        let e = load(
            None,
            Overrides {
                master: Some("10.0.0.1:6443".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("--master"), "{e}");
        let ok = load(
            None,
            Overrides {
                master: Some("https://10.0.0.1:6443".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(ok.source, SourceKind::Kubernetes);
    }
}
