//! The YAML file source: services and endpoints from the configuration file, reloaded when the
//! file changes (polled every 500 ms, which also catches ConfigMap symlink swaps that inotify
//! misses) or on SIGHUP.
//!
//! A reload is fully parsed and validated before anything is published; an invalid file is
//! refused with an error naming the file, the document and the field, and the last good state
//! keeps serving. Changes to the `KubeProxyConfiguration` document itself take effect on
//! restart (kube-proxy exits on such a change; a host without a supervisor would rather not).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::SourceStats;
use crate::config::file::{ConfigFile, ParseCache};
use crate::config::{self, Overrides, Settings};
use crate::model::DesiredState;

/// How often the file is read to look for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Watches one configuration file.
#[derive(Debug)]
pub struct FileSource {
    path: Option<PathBuf>,
    settings: Settings,
    overrides: Overrides,
    running_config: config::KubeProxyConfiguration,
    last_text: Option<String>,
    cache: ParseCache,
    stats: Arc<SourceStats>,
}

/// Builds the desired state a parsed file describes and logs what it skips.
///
/// # Errors
/// The file's objects are invalid.
pub fn desired_from(
    file: &ConfigFile,
    settings: &Settings,
    cache: &mut ParseCache,
) -> config::Result<DesiredState> {
    let (state, skipped) = file.desired_state_cached(settings, cache)?;
    log_skipped(skipped);
    Ok(state)
}

fn log_skipped(skipped: Vec<crate::config::file::Skipped>) {
    for s in skipped {
        info!(object = %s.what, reason = %s.reason, "skipped");
    }
}

impl FileSource {
    /// A source for `path` (`None`: the embedded default, which never changes), starting from
    /// the already-validated `initial` file and the parse `cache` that produced it.
    pub fn new(
        path: Option<PathBuf>,
        initial: &ConfigFile,
        text: String,
        settings: Settings,
        overrides: Overrides,
        cache: ParseCache,
    ) -> Self {
        Self {
            path,
            settings,
            overrides,
            running_config: initial.proxy.clone(),
            last_text: Some(text),
            cache,
            stats: Arc::new(SourceStats::default()),
        }
    }

    /// Counters for status and tests.
    pub fn stats(&self) -> Arc<SourceStats> {
        self.stats.clone()
    }

    fn reject(&self, e: &config::Error) {
        error!(error = %e, "configuration reload refused; keeping the last good state");
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        *self
            .stats
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    /// Reads the file; returns a new state when its text changed and is valid.
    fn reload(&mut self, force: bool) -> Option<DesiredState> {
        let path = self.path.as_ref()?;
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(source) => {
                self.reject(&config::Error::Read {
                    path: path.display().to_string(),
                    source,
                });
                return None;
            }
        };
        // SIGHUP only skips the wait for the next poll: an unchanged file is not parsed again
        // (a change the poll already applied would otherwise be applied twice).
        if self.last_text.as_deref() == Some(text.as_str()) {
            if force {
                info!(path = %path.display(), "SIGHUP: configuration unchanged");
            }
            return None;
        }
        self.last_text = Some(text.clone());
        let origin = path.display().to_string();
        if let Some((state, skipped)) = self.cache.patch(&origin, &text, &self.settings) {
            log_skipped(skipped);
            info!(path = %origin, services = state.services.len(), "configuration reloaded (changed documents only)");
            return Some(state);
        }
        let parsed = ConfigFile::parse_cached(&origin, &text, &mut self.cache).and_then(|mut f| {
            f.proxy.apply(&self.overrides)?;
            f.settings()?;
            Ok(f)
        });
        let file = match parsed {
            Ok(f) => f,
            Err(e) => {
                self.reject(&e);
                return None;
            }
        };
        if file.proxy != self.running_config {
            warn!(path = %path.display(), "KubeProxyConfiguration changed: proxy settings take effect on restart; services and endpoints are applied now");
        }
        match desired_from(&file, &self.settings, &mut self.cache) {
            Ok(state) => {
                info!(path = %path.display(), services = state.services.len(), "configuration reloaded");
                Some(state)
            }
            Err(e) => {
                self.reject(&e);
                None
            }
        }
    }

    /// Publishes `initial`, then every valid change, until `cancel`. `hup` delivers SIGHUP.
    pub async fn run(
        mut self,
        initial: DesiredState,
        tx: watch::Sender<Option<Arc<DesiredState>>>,
        mut hup: mpsc::Receiver<()>,
        cancel: CancellationToken,
    ) {
        let publish = |state: DesiredState| {
            tx.send_replace(Some(Arc::new(state)));
            self.stats.published.fetch_add(1, Ordering::Relaxed);
        };
        publish(initial);
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut hup_open = true;
        loop {
            let force = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => false,
                r = hup.recv(), if hup_open => {
                    if r.is_none() { hup_open = false; continue; }
                    info!("SIGHUP: reloading configuration");
                    true
                }
            };
            if let Some(state) = self.reload(force) {
                tx.send_replace(Some(Arc::new(state)));
                self.stats.published.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
