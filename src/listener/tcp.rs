//! TCP: accept loop and per-connection splice.
//!
//! Unlike the original, the accept loop never waits on a backend: each connection gets its own
//! task, which checks the portal, dials (escalating timeouts, next endpoint on failure, affinity
//! ignored on retry), then splices both directions until both are closed (`splice(2)`, zero
//! copy; see [`super::splice`]). Half-close is
//! propagated (`shutdown(Write)` on EOF), which the original dropped after its FD leaks; TCP
//! keepalive reaps peers that vanish without a FIN, which is what leaked there.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::timers;
use super::workers::{workers, Load};
use super::{is_resource_exhaustion, Shared, Stats, DIAL_TIMEOUTS};
use crate::balancer::Balancer;

/// Keepalive timing: the first probe after 15 s idle, like Go's default on the original's
/// sockets, then every 15 s; 4 lost probes end the connection.
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(15);

/// Longest pause of the accept loop when descriptors run out.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// A port that accepts this many connections within [`BUSY_WINDOW`] is busy: from then on every
/// worker accepts it, not only the one it was given to ([`super::exclusive`]).
pub(crate) const BUSY_ACCEPTS: u32 = 64;

/// See [`BUSY_ACCEPTS`].
pub(crate) const BUSY_WINDOW: Duration = Duration::from_secs(1);

/// Tells when a port's accept loop has become busy, from its accepts in windows of
/// [`BUSY_ACCEPTS`]: the clock is read twice a window, not on every accept.
#[derive(Debug, Default)]
pub(crate) struct Busy {
    count: u32,
    since: Option<Instant>,
}

impl Busy {
    /// Counts one accept; `now` reads the clock. True once a window's [`BUSY_ACCEPTS`] accepts
    /// took at most [`BUSY_WINDOW`].
    pub(crate) fn accepted(&mut self, now: impl Fn() -> Instant) -> bool {
        if self.count == 0 {
            self.since = Some(now());
        }
        self.count += 1;
        if self.count < BUSY_ACCEPTS {
            return false;
        }
        self.count = 0;
        self.since
            .take()
            .is_some_and(|s| now().saturating_duration_since(s) <= BUSY_WINDOW)
    }
}

/// What every accept loop of one TCP port shares.
#[derive(Debug, Clone)]
pub(crate) struct Port {
    pub(crate) shared: Arc<Shared>,
    pub(crate) tracker: TaskTracker,
    /// Cancelled when the port is removed: every accept loop of it ends, and with the last
    /// one its socket closes.
    pub(crate) accept: CancellationToken,
    pub(crate) kill: CancellationToken,
}

/// Accepts until `accept` is cancelled. Resource exhaustion pauses with backoff instead of
/// spinning or crashing. On the worker the port was given to (`first`), a port that turns out
/// busy is then accepted by every worker ([`share`]).
pub(crate) async fn accept_loop(listener: TcpListener, home: usize, port: Port, first: bool) {
    Stats::add(&port.shared.stats.accept_loops, 1);
    let mut busy = first.then(Busy::default);
    let mut backoff = Duration::from_millis(5);
    loop {
        let res = tokio::select! {
            biased;
            _ = port.accept.cancelled() => break,
            r = listener.accept() => r,
        };
        match res {
            Ok((stream, peer)) => {
                super::poll::progress();
                backoff = Duration::from_millis(5);
                let (shared, kill) = (port.shared.clone(), port.kill.clone());
                match workers().assign(home) {
                    (None, load) => {
                        // Boxed: the connection's future is 864 bytes, and tokio moves a
                        // task's future several times while spawning it. Measured with
                        // callgrind: 12,356 instructions per connection unboxed, 11,388 boxed
                        // (memcpy 1,276 -> 257).
                        port.tracker
                            .spawn(Box::pin(serve(stream, peer, shared, kill, load)));
                    }
                    (Some(worker), load) => {
                        hand_over(stream, peer, shared, kill, load, &port.tracker, worker);
                    }
                }
                if busy.as_mut().is_some_and(|b| b.accepted(Instant::now)) {
                    share(&listener, home, &port);
                    busy = None;
                }
            }
            Err(e) if is_resource_exhaustion(&e) => {
                Stats::add(&port.shared.stats.accept_errors, 1);
                warn!(service = %port.shared.name, error = %e, pause_ms = backoff.as_millis() as u64, "accept failed: out of descriptors or memory; pausing");
                tokio::select! {
                    _ = port.accept.cancelled() => break,
                    _ = timers::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
            Err(e) => {
                // ECONNABORTED and friends: the client gave up before we accepted it.
                Stats::add(&port.shared.stats.accept_errors, 1);
                debug!(service = %port.shared.name, error = %e, "accept failed");
            }
        }
    }
    Stats::dec(&port.shared.stats.accept_loops);
    debug!(service = %port.shared.name, worker = home, "accept loop ended");
}

/// Has every worker accept a busy port: each other worker gets a descriptor of its own for the
/// same listening socket, in its own reactor, and every registration of the socket is made
/// exclusive, so that a new connection wakes one worker that sleeps rather than all
/// ([`super::exclusive`] says why and how). Each extra descriptor counts against a budget
/// ([`super::exclusive::reserve`]); without room, or if a registration cannot be changed, the
/// port stays with its worker.
fn share(listener: &TcpListener, home: usize, port: &Port) {
    let ws = workers();
    if !ws.can_share() {
        return;
    }
    if let Err(e) = ws.make_exclusive(home, listener.as_fd()) {
        warn!(service = %port.shared.name, error = %e, "cannot register a busy port exclusively: one event loop accepts it");
        return;
    }
    let mut joined = 0;
    for there in (0..ws.len()).filter(|&w| w != home) {
        let Some(reserved) = super::exclusive::reserve() else {
            debug!(service = %port.shared.name, "descriptor budget for shared ports used up");
            break;
        };
        let handle = ws.handle(there);
        let listener = listener
            .as_fd()
            .try_clone_to_owned()
            .map(std::net::TcpListener::from)
            .and_then(|l| {
                let _enter = handle.enter();
                TcpListener::from_std(l)
            });
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                warn!(service = %port.shared.name, error = %e, "cannot give a busy port to another event loop");
                break;
            }
        };
        if let Err(e) = ws.make_exclusive(there, listener.as_fd()) {
            warn!(service = %port.shared.name, worker = there, error = %e, "cannot register a busy port exclusively");
            continue;
        }
        let port = port.clone();
        port.tracker.clone().spawn_on(
            async move {
                let _reserved = reserved;
                accept_loop(listener, there, port, false).await;
            },
            handle,
        );
        joined += 1;
    }
    debug!(service = %port.shared.name, joined, "busy port: accepted by more event loops");
}

/// Serves an accepted connection on another, less loaded worker: the socket leaves this
/// worker's reactor and joins that one's.
fn hand_over(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    kill: CancellationToken,
    load: Load,
    tracker: &TaskTracker,
    worker: &tokio::runtime::Handle,
) {
    let std = match stream.into_std() {
        Ok(std) => std,
        Err(e) => {
            debug!(service = %shared.name, client.addr = %peer, error = %e, "could not hand over a connection");
            return;
        }
    };
    let serve_there = async move {
        match TcpStream::from_std(std) {
            Ok(stream) => serve(stream, peer, shared, kill, load).await,
            Err(e) => {
                debug!(service = %shared.name, client.addr = %peer, error = %e, "could not take over a connection")
            }
        }
    };
    // Boxed, as in `accept_loop`: moved as a pointer rather than as 864 bytes.
    tracker.spawn_on(Box::pin(serve_there), worker);
}

/// `peer` is the accepted connection's peer address: it has the socket's own family, so it says
/// which lookup applies without asking the kernel for the local address.
fn original_dst(stream: &TcpStream, peer: SocketAddr) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let addr = if peer.is_ipv4() {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::other("original destination is not an inet address"))
}

/// Sets the options every proxied TCP socket has: no Nagle delay (request/response traffic must
/// not wait on it) and keepalive. Set on a listening socket, they are inherited by every
/// connection it accepts, so the client side costs no system call per connection. The backend
/// side gets no-delay after each dial, and keepalive once the connection has lasted a second
/// ([`super::keepalive`]).
pub(crate) fn tune(sock: SockRef<'_>) {
    sock.set_tcp_nodelay(true).ok();
    keepalive(sock);
}

/// Switches keepalive on, with [`KEEPALIVE`] timing.
pub(crate) fn keepalive(sock: SockRef<'_>) {
    let ka = TcpKeepalive::new()
        .with_time(KEEPALIVE)
        .with_interval(KEEPALIVE)
        .with_retries(4);
    sock.set_tcp_keepalive(&ka).ok();
}

/// Dials a backend for a client: up to four attempts with escalating timeouts, each on the next
/// endpoint. Returns `None` (the client is then closed) when there are no endpoints or every
/// attempt failed.
async fn dial(
    shared: &Shared,
    balancer: &Balancer,
    peer: SocketAddr,
) -> Option<(TcpStream, SocketAddr)> {
    for (attempt, timeout) in DIAL_TIMEOUTS.iter().enumerate() {
        let Some(endpoint) = balancer.pick(peer.ip(), attempt > 0) else {
            Stats::add(&shared.stats.no_endpoints, 1);
            debug!(service = %shared.name, client.addr = %peer, "no endpoints; closing client connection");
            return None;
        };
        match timers::dial_timeout(*timeout, TcpStream::connect(endpoint)).await {
            Some(Ok(stream)) => return Some((stream, endpoint)),
            Some(Err(e)) => {
                Stats::add(&shared.stats.dial_failures, 1);
                debug!(service = %shared.name, backend.addr = %endpoint, attempt, error = %e, "dial failed");
            }
            None => {
                Stats::add(&shared.stats.dial_failures, 1);
                debug!(service = %shared.name, backend.addr = %endpoint, attempt, timeout_ms = timeout.as_millis() as u64, "dial timed out");
            }
        }
    }
    warn!(service = %shared.name, client.addr = %peer, "failed to connect to an endpoint after {} attempts", DIAL_TIMEOUTS.len());
    None
}

/// Serves one accepted connection; `load` counts it against the worker it runs on until it
/// ends.
async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    kill: CancellationToken,
    load: Load,
) {
    let allowed = shared.allowed.load_full();
    let external = shared.external.load_full();
    // The portal the client used: only looked up when something depends on it.
    let dst = if allowed.is_some() || external.is_some() {
        original_dst(&client, peer).ok()
    } else {
        None
    };
    if let Some(allowed) = allowed {
        if !dst.is_some_and(|d| allowed.admits(d)) {
            Stats::add(&shared.stats.rejected, 1);
            debug!(service = %shared.name, client.addr = %peer, original_dst = ?dst, "refused: connection did not come through a portal");
            return;
        }
    }
    let balancer = match &external {
        // In bind mode there is no NAT: the local address is the portal.
        Some(x)
            if dst
                .or_else(|| client.local_addr().ok())
                .is_some_and(|d| x.is_external(d)) =>
        {
            &x.balancer
        }
        _ => &shared.balancer,
    };
    let Some((backend, endpoint)) = dial(&shared, balancer, peer).await else {
        return;
    };
    // The client side inherited its options from the listener.
    SockRef::from(&backend).set_tcp_nodelay(true).ok();
    let backend = Arc::new(backend);
    load.keepalive_later(&backend);
    let stats = &shared.stats;
    Stats::add(&stats.connections_total, 1);
    Stats::add(&stats.connections_active, 1);
    let result = until_killed(&kill, super::splice::relay(&client, &backend)).await;
    Stats::dec(&stats.connections_active);
    match result {
        Some(Ok((up, down))) => {
            Stats::add(&stats.bytes_to_backend, up);
            Stats::add(&stats.bytes_to_client, down);
            debug!(service = %shared.name, client.addr = %peer, backend.addr = %endpoint, bytes.up = up, bytes.down = down, "connection closed");
        }
        Some(Err(e)) => {
            debug!(service = %shared.name, client.addr = %peer, backend.addr = %endpoint, error = %e, "connection ended with an error")
        }
        None => debug!(service = %shared.name, client.addr = %peer, "connection cut at shutdown"),
    }
}

/// Wakes a task, noting that it was the kill token's future that did.
struct KillWake {
    woke: AtomicBool,
    task: AtomicWaker,
}

impl Wake for KillWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woke.store(true, Ordering::SeqCst);
        self.task.wake();
    }
}

/// `fut`'s output, or `None` if `kill` fires first.
///
/// Not `select!` on `kill.cancelled()`: that polls the token's future on every wake-up of the
/// connection's task, two mutex locks each time. Here the token's future has a waker of its
/// own, and is polled again only when that waker was woken. Measured with callgrind over 10,000
/// requests of 100 bytes on one connection: 3,961 instructions per request, against 4,389.
async fn until_killed<F: Future>(kill: &CancellationToken, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut killed = std::pin::pin!(kill.cancelled());
    let flag = Arc::new(KillWake {
        // Polled once at first, which registers its waker.
        woke: AtomicBool::new(true),
        task: AtomicWaker::new(),
    });
    let kill_waker = Waker::from(flag.clone());
    std::future::poll_fn(move |cx| {
        flag.task.register(cx.waker());
        if flag.woke.swap(false, Ordering::SeqCst)
            && killed
                .as_mut()
                .poll(&mut Context::from_waker(&kill_waker))
                .is_ready()
        {
            return Poll::Ready(None);
        }
        fut.as_mut().poll(cx).map(Some)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    /// What `serve` relies on: a connection accepted from a tuned listener has the listener's
    /// options without being tuned itself.
    #[test]
    fn accepted_connections_inherit_the_listeners_options() {
        let listener =
            crate::listener::bind_socket(Protocol::Tcp, "127.0.0.1:0".parse().unwrap(), false)
                .unwrap();
        tune(SockRef::from(&listener));
        listener.listen(16).unwrap();
        listener.set_nonblocking(false).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.tcp_nodelay().unwrap());
        assert!(accepted.keepalive().unwrap());
        assert_eq!(accepted.tcp_keepalive_time().unwrap(), KEEPALIVE);
        assert_eq!(accepted.tcp_keepalive_interval().unwrap(), KEEPALIVE);
        assert_eq!(accepted.tcp_keepalive_retries().unwrap(), 4);
    }

    #[test]
    fn a_port_is_busy_once_a_window_of_accepts_fits_in_the_busy_window() {
        let t0 = Instant::now();
        let at = |ms: u64| move || t0 + Duration::from_millis(ms);
        let mut b = Busy::default();
        // A slow window: 64 accepts over 2 s.
        for _ in 0..BUSY_ACCEPTS - 1 {
            assert!(!b.accepted(at(0)));
        }
        assert!(!b.accepted(at(2_000)));
        // The next window starts afresh and fits in the busy window.
        for _ in 0..BUSY_ACCEPTS - 1 {
            assert!(!b.accepted(at(2_100)));
        }
        assert!(b.accepted(at(2_100 + BUSY_WINDOW.as_millis() as u64)));
    }

    #[tokio::test]
    async fn until_killed_gives_the_output_when_not_killed() {
        let kill = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sender = tokio::spawn(async move {
            tokio::task::yield_now().await;
            tx.send(42).unwrap();
        });
        assert_eq!(until_killed(&kill, rx).await, Some(Ok(42)));
        sender.await.unwrap();
    }

    /// The kill comes from another thread while the future waits, after the future has been
    /// woken (and polled) several times for its own reasons.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn until_killed_ends_a_waiting_future_when_killed() {
        let kill = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(1);
        let waiting = async move {
            let mut seen = 0;
            while rx.recv().await.is_some() {
                seen += 1;
            }
            seen
        };
        let killer = {
            let kill = kill.clone();
            std::thread::spawn(move || {
                for i in 0..5 {
                    tx.blocking_send(i).unwrap();
                }
                kill.cancel();
                // The sender stays open: only the kill can end the wait.
                tx
            })
        };
        let out = tokio::time::timeout(Duration::from_secs(10), until_killed(&kill, waiting))
            .await
            .expect("the kill ended the wait");
        assert_eq!(out, None);
        drop(killer.join().unwrap());
    }
}
