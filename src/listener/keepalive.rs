//! Keepalive on backend connections, switched on once a connection has lasted [`AFTER`] rather
//! than right after its dial.
//!
//! Why: switching keepalive on is four system calls (`SO_KEEPALIVE`, `TCP_KEEPIDLE`,
//! `TCP_KEEPINTVL`, `TCP_KEEPCNT`), 4 of the 25 that a short proxied connection cost, and a
//! connection that ends within seconds never sends a probe. The client side costs none: it
//! inherits the options from its listener ([`super::tcp::tune`]).
//!
//! Set late, the probes still come when they would have: `TCP_KEEPIDLE` on an established
//! connection counts the silence since the last segment received, not since the option was set
//! (`tcp_sock_set_keepidle_locked`). So as long as it is set well within the idle time
//! ([`super::tcp::KEEPALIVE`], 15 s), a backend that vanishes is reaped exactly as if keepalive
//! had been set at the dial. Here it is set between one and two [`AFTER`]s after the dial.
//!
//! How: each worker keeps the backend connections it dialled in two generations. A sweep every
//! [`AFTER`] switches keepalive on for the older generation's connections that are still open,
//! and the newer generation becomes the older. A short connection costs a push of a weak
//! reference, and holds its small reference-count block (under 100 bytes) until the sweep after
//! next: under 2 MB at 10,000 connections a second. The sweep runs while there is something to
//! sweep and ends when both generations are empty, so an idle worker is not woken for it; the
//! next dial starts it again.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::runtime::Handle;

use super::timers;

/// How long a backend connection lasts, at least, before its keepalive is switched on.
pub(crate) const AFTER: Duration = Duration::from_secs(1);

/// One worker's backend connections awaiting keepalive.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    inner: Mutex<Generations>,
}

#[derive(Debug, Default)]
struct Generations {
    /// Dialled since the last sweep.
    newer: Vec<Weak<TcpStream>>,
    /// Dialled before the last sweep: at least [`AFTER`] old at the next one.
    older: Vec<Weak<TcpStream>>,
    /// A sweep task is running.
    sweeping: bool,
}

impl Pending {
    /// Switches keepalive on for `stream` after [`AFTER`], if it is still open then. Starts the
    /// sweep on `runtime` (the worker's, which serves `stream`) if it is not running.
    pub(crate) fn add(&'static self, stream: &Arc<TcpStream>, runtime: &Handle) {
        let mut g = self.lock();
        g.newer.push(Arc::downgrade(stream));
        if !g.sweeping {
            g.sweeping = true;
            // Not on a cancellation token: the sweep ends by itself, at most two sweeps after
            // the worker's last dial, and touches nothing but sockets that are still open.
            runtime.spawn(self.sweep());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        // Nothing here can panic with the lock held; a poisoned lock holds whole vectors.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn sweep(&'static self) {
        loop {
            timers::sleep(AFTER).await;
            let due = {
                let mut g = self.lock();
                let newer = std::mem::take(&mut g.newer);
                let due = std::mem::replace(&mut g.older, newer);
                if due.is_empty() && g.older.is_empty() {
                    // Decided under the lock that `add` takes, so a dial either sees the sweep
                    // stopped (and starts another) or is in a generation this one sweeps.
                    g.sweeping = false;
                    return;
                }
                due
            };
            for stream in due.iter().filter_map(Weak::upgrade) {
                super::tcp::keepalive(SockRef::from(&*stream));
            }
        }
    }

    #[cfg(test)]
    fn sweeping(&self) -> bool {
        self.lock().sweeping
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listener::tcp::KEEPALIVE;
    use std::time::Instant;

    /// A connected loopback pair: the side that dialled (as a tokio stream) and the accepted one.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dialled = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = l.accept().await.unwrap();
        (dialled, accepted)
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A connection that lasts gets keepalive with the timing the original's dialler set, not
    /// before [`AFTER`]; one that ended first is skipped; and the sweep stops once nothing is
    /// left, starting again with the next connection.
    #[test]
    fn lasting_connections_get_keepalive_and_the_sweep_stops_when_idle() {
        let pending: &'static Pending = Box::leak(Box::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        // The worker: a thread running the runtime, as the data plane's are.
        let handle = rt.handle().clone();
        std::thread::spawn(move || rt.block_on(std::future::pending::<()>()));

        let (lasting, short, _peer) = handle.block_on(async {
            let (lasting, peer) = pair().await;
            let (short, _b) = pair().await;
            let (lasting, short) = (Arc::new(lasting), Arc::new(short));
            let added = Instant::now();
            pending.add(&lasting, &Handle::current());
            pending.add(&short, &Handle::current());
            let early = SockRef::from(&*lasting).keepalive().unwrap();
            assert!(
                !early || added.elapsed() >= AFTER,
                "keepalive was switched on before {AFTER:?}"
            );
            (lasting, Arc::downgrade(&short), peer)
        });
        // The short connection ends now; the sweep must skip it.
        assert!(short.upgrade().is_none());
        let dialled = Instant::now();
        wait_for("keepalive on the lasting connection", || {
            SockRef::from(&*lasting).keepalive().unwrap()
        });
        assert!(dialled.elapsed() < 3 * AFTER);
        let s = SockRef::from(&*lasting);
        assert_eq!(s.tcp_keepalive_time().unwrap(), KEEPALIVE);
        assert_eq!(s.tcp_keepalive_interval().unwrap(), KEEPALIVE);
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 4);

        wait_for("the sweep to stop", || !pending.sweeping());
        let (again, _peer_again) = handle.block_on(async {
            let (again, peer) = pair().await;
            let again = Arc::new(again);
            pending.add(&again, &Handle::current());
            (again, peer)
        });
        assert!(pending.sweeping());
        wait_for(
            "keepalive on a connection dialled after the sweep stopped",
            || SockRef::from(&*again).keepalive().unwrap(),
        );
        drop(lasting);
    }
}
