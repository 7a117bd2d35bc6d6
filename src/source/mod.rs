//! Sources of desired state. Each publishes whole [`DesiredState`](crate::model::DesiredState)
//! snapshots on a `watch` channel, `None` until its first complete view, so the proxier never
//! programs a partial picture.

pub mod file;
pub mod kube;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Health of a source, for status and tests.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Snapshots published.
    pub published: AtomicU64,
    /// Updates refused (invalid input); the last good state keeps serving.
    pub rejected: AtomicU64,
    /// Text of the last refusal.
    pub last_error: Mutex<Option<String>>,
}

impl SourceStats {
    /// Snapshots published so far.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Updates refused so far.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// The last refusal's text.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
