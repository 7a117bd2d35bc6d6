//! Per-service-port counters, updated with relaxed atomics on the data path and read by the
//! status and metrics code.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one service port.
#[derive(Debug, Default)]
pub struct Stats {
    /// TCP connections being proxied now.
    pub connections_active: AtomicU64,
    /// TCP connections accepted and handed to a backend, ever.
    pub connections_total: AtomicU64,
    /// Bytes from clients to backends (TCP and UDP).
    pub bytes_to_backend: AtomicU64,
    /// Bytes from backends to clients (TCP and UDP).
    pub bytes_to_client: AtomicU64,
    /// Failed backend dials (each attempt).
    pub dial_failures: AtomicU64,
    /// Connections or datagrams dropped because the service had no endpoints.
    pub no_endpoints: AtomicU64,
    /// Connections refused because they did not come through a portal.
    pub rejected: AtomicU64,
    /// Accept errors (including running out of file descriptors).
    pub accept_errors: AtomicU64,
    /// Event loops accepting this TCP port's connections now: one, or every worker's once the
    /// port is busy (`src/listener/exclusive.rs`).
    pub accept_loops: AtomicU64,
    /// UDP sessions open now.
    pub udp_sessions_active: AtomicU64,
    /// UDP datagrams dropped (session table full, send buffer full, no endpoints).
    pub udp_dropped: AtomicU64,
}

impl Stats {
    /// Adds `n` to a counter.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts one from a gauge.
    #[inline]
    pub fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }

    /// Reads a counter.
    #[inline]
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
