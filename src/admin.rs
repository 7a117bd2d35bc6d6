//! Admin HTTP servers, as kube-proxy has them:
//!
//! - `healthzBindAddress` (default `0.0.0.0:10256`):
//!   - `GET /healthz`, `GET /livez` -- 200 while healthy, 503 when a queued change has not been
//!     applied within the health timeout (2 × `syncPeriod`); JSON body with `lastUpdated` and
//!     `currentTime`. The original userspace mode always answered 200.
//! - `metricsBindAddress` (default `127.0.0.1:10249`):
//!   - `GET /metrics` -- Prometheus text format ([`crate::metrics`]);
//!   - `GET /proxyMode` -- `userspace`;
//!   - `GET /configz` -- the effective configuration as JSON;
//!   - `GET /debug/services` -- one line per service port, for people;
//!   - `GET /healthz` -- `ok`.
//!
//! The HTTP is a deliberately small GET-only HTTP/1.1 responder (one request per connection):
//! these endpoints are scraped and probed, not browsed. A bind failure is logged and retried
//! every 5 s, or is fatal with `bindAddressHardFail`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::proxier::Status;

/// How long a failed bind waits before the next try.
pub const BIND_RETRY: Duration = Duration::from_secs(5);

/// kube-proxy's health rule: healthy when nothing is queued, when the last applied update is
/// not older than the last queued one, or when the queued one is younger than `timeout`.
pub fn healthy(
    now: SystemTime,
    last_queued: Option<SystemTime>,
    last_updated: Option<SystemTime>,
    timeout: Duration,
) -> bool {
    let Some(queued) = last_queued else {
        return true;
    };
    if last_updated.is_some_and(|u| u >= queued) {
        return true;
    }
    now.duration_since(queued)
        .map_or(true, |waited| waited < timeout)
}

/// A response: status code, content type, body.
pub type Response = (u16, &'static str, String);

/// Everything the admin endpoints read.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Proxier status snapshots.
    pub status: watch::Receiver<Arc<Status>>,
    /// The effective configuration, as JSON.
    pub config_json: String,
    /// Health timeout (2 × `syncPeriod`).
    pub health_timeout: Duration,
    /// When the source last delivered a change, stamped by a watcher that does not depend on
    /// the sync loop (as kube-proxy's event handlers call `QueuedUpdate`): a loop that is stuck
    /// cannot hide a queued change.
    pub queued: Arc<std::sync::Mutex<Option<SystemTime>>>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl AdminState {
    fn health(&self) -> Response {
        let st = self.status.borrow().clone();
        let now = SystemTime::now();
        let queued = *self.queued.lock().unwrap_or_else(|p| p.into_inner());
        let ok = healthy(
            now,
            queued.max(st.last_queued),
            st.up_to_date,
            self.health_timeout,
        );
        // As kube-proxy: when healthy, lastUpdated reads as now.
        let last = if ok { Some(now) } else { st.up_to_date };
        let body = format!(
            "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\"}}",
            last.map(rfc3339).unwrap_or_default(),
            rfc3339(now)
        );
        (if ok { 200 } else { 503 }, "application/json", body)
    }

    /// The health server's routes.
    pub fn route_healthz(&self, path: &str) -> Response {
        match path {
            "/healthz" | "/livez" => self.health(),
            _ => (404, "text/plain", "not found\n".into()),
        }
    }

    /// The metrics server's routes.
    pub fn route_metrics(&self, path: &str) -> Response {
        match path {
            "/metrics" => (
                200,
                "text/plain; version=0.0.4",
                crate::metrics::render(&self.status.borrow().clone()),
            ),
            "/proxyMode" => (200, "text/plain", crate::config::MODE.into()),
            "/configz" => (200, "application/json", self.config_json.clone()),
            "/healthz" => (200, "text/plain", "ok".into()),
            "/debug/services" => (
                200,
                "text/plain",
                services_table(&self.status.borrow().clone()),
            ),
            _ => (404, "text/plain", "not found\n".into()),
        }
    }
}

/// One line per service port: portals, proxy port, endpoints and live connections.
pub fn services_table(st: &Status) -> String {
    let mut out = format!(
        "{:<40} {:<5} {:<40} {:<8} {:<10} {:>6} {:>8}  {}\n",
        "SERVICE", "PROTO", "PORTALS", "NODEPORT", "PROXYPORT", "ACTIVE", "TOTAL", "ENDPOINTS"
    );
    for p in st.ports.values() {
        let portals: Vec<String> = p.portals.iter().map(|a| a.to_string()).collect();
        let eps: Vec<String> = p.endpoints.iter().map(|a| a.to_string()).collect();
        let (active, total) = p.stats.as_ref().map_or((0, 0), |s| {
            if p.protocol == crate::model::Protocol::Udp {
                (crate::listener::Stats::get(&s.udp_sessions_active), 0)
            } else {
                (
                    crate::listener::Stats::get(&s.connections_active),
                    crate::listener::Stats::get(&s.connections_total),
                )
            }
        });
        let _ = writeln!(
            out,
            "{:<40} {:<5} {:<40} {:<8} {:<10} {:>6} {:>8}  {}{}",
            p.name.to_string(),
            p.protocol.to_string(),
            portals.join(","),
            p.node_port
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
            p.proxy_port()
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
            active,
            total,
            if eps.is_empty() {
                "<none>".to_string()
            } else {
                eps.join(",")
            },
            p.error
                .as_ref()
                .map(|e| format!("  ERROR: {e}"))
                .unwrap_or_default()
        );
    }
    out
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        400 => "Bad Request",
        _ => "Service Unavailable",
    }
}

async fn handle<F>(mut stream: TcpStream, route: Arc<F>)
where
    F: Fn(&str) -> Response + Send + Sync + 'static,
{
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let request = String::from_utf8_lossy(&buf);
    let mut parts = request.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (code, ctype, body) = if read.is_err() || path.is_empty() {
        (400, "text/plain", "bad request\n".to_string())
    } else if method != "GET" && method != "HEAD" {
        (405, "text/plain", "only GET\n".to_string())
    } else {
        route(path)
    };
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: {ctype}\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(code),
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    if method != "HEAD" {
        let _ = stream.write_all(body.as_bytes()).await;
    }
    let _ = stream.shutdown().await;
}

async fn accept_loop<F>(
    listener: TcpListener,
    route: Arc<F>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) where
    F: Fn(&str) -> Response + Send + Sync + 'static,
{
    loop {
        let conn = tokio::select! {
            _ = cancel.cancelled() => break,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                tracker.spawn(handle(stream, route.clone()));
            }
            Err(e) => {
                debug!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves `route` on an already-bound `listener` until `cancel`; returns its address.
///
/// # Errors
/// The listener cannot be registered with the runtime.
pub fn serve<F>(
    listener: std::net::TcpListener,
    route: F,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr>
where
    F: Fn(&str) -> Response + Send + Sync + 'static,
{
    listener.set_nonblocking(true)?;
    let l = TcpListener::from_std(listener)?;
    let bound = l.local_addr()?;
    tracker.spawn(accept_loop(l, Arc::new(route), tracker.clone(), cancel));
    Ok(bound)
}

/// Starts an admin server on `addr`. The first bind is tried now: with `hard_fail` its error is
/// returned; otherwise it is logged and retried every [`BIND_RETRY`] in the background.
/// Returns the bound address when the first bind succeeded.
///
/// # Errors
/// The first bind failed and `hard_fail` is set.
pub async fn start<F>(
    name: &'static str,
    addr: SocketAddr,
    hard_fail: bool,
    route: F,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> std::io::Result<Option<SocketAddr>>
where
    F: Fn(&str) -> Response + Send + Sync + 'static,
{
    let route = Arc::new(route);
    match TcpListener::bind(addr).await {
        Ok(l) => {
            let bound = l.local_addr()?;
            info!(server = name, addr = %bound, "serving");
            tracker.spawn(accept_loop(l, route, tracker.clone(), cancel));
            Ok(Some(bound))
        }
        Err(e) if hard_fail => Err(e),
        Err(e) => {
            warn!(server = name, %addr, error = %e, "cannot bind; retrying every 5 s");
            let t = tracker.clone();
            tracker.spawn(async move {
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(BIND_RETRY) => {}
                    }
                    if let Ok(l) = TcpListener::bind(addr).await {
                        info!(server = name, %addr, "serving");
                        accept_loop(l, route, t, cancel).await;
                        return;
                    }
                }
            });
            Ok(None)
        }
    }
}

/// Fetches `path` from an admin server (blocking; for the `status` subcommand). A wildcard
/// address is reached through loopback.
///
/// # Errors
/// The server cannot be reached or answers something that is not HTTP.
pub fn fetch(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let target = if addr.ip().is_unspecified() {
        SocketAddr::new(
            if addr.is_ipv4() {
                [127, 0, 0, 1].into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            },
            addr.port(),
        )
    } else {
        addr
    };
    let mut s = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .ok_or_else(bad)?;
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_kube_proxy() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let timeout = Duration::from_secs(60);
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(
            healthy(at(0), None, None, timeout),
            "healthy while starting"
        );
        assert!(
            healthy(at(30), Some(at(0)), None, timeout),
            "first change still within the timeout"
        );
        assert!(
            !healthy(at(61), Some(at(0)), None, timeout),
            "first change stuck past the timeout"
        );
        assert!(
            healthy(at(100), Some(at(10)), Some(at(11)), timeout),
            "applied after queued"
        );
        assert!(
            !healthy(at(100), Some(at(20)), Some(at(11)), timeout),
            "queued 80 s ago, not applied: stuck"
        );
        assert!(
            healthy(at(100), Some(at(90)), Some(at(11)), timeout),
            "queued 10 s ago: still fine"
        );
    }
}
