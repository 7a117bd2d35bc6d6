//! UDP: one session per client address, each with a connected socket to its backend.
//!
//! Replies leave from the service's own socket, so conntrack un-NATs them back to the portal
//! address the client sent to. A session ends after `udpIdleTimeout` without traffic in either
//! direction, on a backend error (the next datagram then opens a session to the next endpoint),
//! or when the service port is removed. Datagrams up to 65,507 bytes pass whole (the original
//! truncated at 4 KiB, kubernetes#47659); the receive buffer is one per listener and the reply
//! buffer one per worker thread, so an idle session costs a socket and a small struct only.
//!
//! The session table is bounded (`udpMaxSessions`): past it new clients' datagrams are dropped
//! and counted, instead of exhausting descriptors for every other service.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::{is_resource_exhaustion, Shared, Stats};

/// The runtime UDP listeners and their sessions run on: one dedicated thread with a
/// current-thread runtime. A datagram and its reply then never cross worker threads: the
/// thread blocks in epoll and runs the woken task itself, as an event-loop proxy does.
pub(crate) fn runtime() -> &'static tokio::runtime::Handle {
    static RT: std::sync::OnceLock<tokio::runtime::Handle> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("UDP runtime");
        let handle = rt.handle().clone();
        std::thread::Builder::new()
            .name("udp-proxy".into())
            .spawn(move || rt.block_on(std::future::pending::<()>()))
            .expect("UDP thread");
        handle
    })
}

/// Largest UDP payload over IPv4 (65,535 minus IP and UDP headers), plus room to spare.
const MAX_DATAGRAM: usize = 65_536;

thread_local! {
    /// Reply buffer, shared by every session that runs on this worker thread. Only used between
    /// a `try_recv` and the `try_send_to` that follows it, with no await in between.
    static REPLY_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
}

#[derive(Debug)]
struct Session {
    backend: UdpSocket,
    endpoint: SocketAddr,
    born: Instant,
    /// `Shared::generation` when the endpoint was last known to be current.
    generation: AtomicU64,
    /// Milliseconds after `born` of the last datagram either way.
    last_ms: AtomicU64,
}

impl Session {
    fn touch(&self) {
        self.last_ms
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn deadline(&self, idle: Duration) -> Instant {
        self.born + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
    }
}

type Table = Arc<Mutex<HashMap<SocketAddr, Arc<Session>>>>;

fn lock(table: &Table) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<Session>>> {
    table.lock().unwrap_or_else(|p| p.into_inner())
}

fn connect_backend(endpoint: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = if endpoint.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let std_sock = std::net::UdpSocket::bind(local)?;
    std_sock.connect(endpoint)?;
    std_sock.set_nonblocking(true)?;
    UdpSocket::from_std(std_sock)
}

/// Serves a UDP service port until `accept` is cancelled.
pub(crate) async fn serve(
    sock: Arc<UdpSocket>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    accept: CancellationToken,
    kill: CancellationToken,
) {
    let table: Table = Arc::new(Mutex::new(HashMap::new()));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut backoff = Duration::from_millis(5);
    loop {
        let (n, client) = tokio::select! {
            biased;
            _ = accept.cancelled() => break,
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) if is_resource_exhaustion(&e) => {
                    warn!(service = %shared.name, error = %e, "UDP receive failed: out of resources; pausing");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
                Err(e) => {
                    // ECONNREFUSED and the like from ICMP errors: not fatal for the listener
                    // (the original's loop exited here and the port stayed dead).
                    debug!(service = %shared.name, error = %e, "UDP receive error");
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(5);
        let Some(session) = session_for(&table, client, &sock, &shared, &tracker, &accept, &kill)
        else {
            continue;
        };
        match send_to_backend(&session.backend, &buf[..n]).await {
            Ok(sent) => Stats::add(&shared.stats.bytes_to_backend, sent as u64),
            Err(e) => {
                Stats::add(&shared.stats.udp_dropped, 1);
                debug!(service = %shared.name, client.addr = %client, backend.addr = %session.endpoint, error = %e, "datagram to backend dropped");
            }
        }
    }
    lock(&table).clear();
    debug!(service = %shared.name, "UDP listener closed");
}

/// Longest wait for a socket to become writable before a datagram is dropped.
const SEND_WAIT: Duration = Duration::from_millis(50);

/// Sends without waiting when the socket is known writable (the steady state). A socket tokio
/// has not seen writable yet (a new session), or a full send buffer, gets a short bounded wait.
async fn send_to_backend(backend: &UdpSocket, datagram: &[u8]) -> io::Result<usize> {
    match backend.try_send(datagram) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            tokio::time::timeout(SEND_WAIT, backend.send(datagram))
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::WouldBlock.into()))
        }
        other => other,
    }
}

/// The client's session, created (with its task) if it has none. The session is touched under
/// the table lock, so its task cannot expire it between this lookup and the send that follows.
fn session_for(
    table: &Table,
    client: SocketAddr,
    sock: &Arc<UdpSocket>,
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    accept: &CancellationToken,
    kill: &CancellationToken,
) -> Option<Arc<Session>> {
    let mut map = lock(table);
    let generation = shared.generation.load(Ordering::Relaxed);
    if let Some(s) = map.get(&client).cloned() {
        let current = s.generation.load(Ordering::Relaxed) == generation
            || shared.balancer.endpoints().contains(&s.endpoint);
        if current {
            s.generation.store(generation, Ordering::Relaxed);
            s.touch();
            return Some(s);
        }
        // Its backend was removed: start over on a live endpoint. The old session's task sees
        // it is no longer in the table and ends.
        map.remove(&client);
        debug!(service = %shared.name, client.addr = %client, backend.addr = %s.endpoint, "UDP session moved off a removed endpoint");
    }
    if map.len() >= shared.udp_max_sessions {
        Stats::add(&shared.stats.udp_dropped, 1);
        debug!(service = %shared.name, client.addr = %client, max = shared.udp_max_sessions, "UDP session table full; datagram dropped");
        return None;
    }
    let Some(endpoint) = shared.balancer.pick(client.ip(), false) else {
        Stats::add(&shared.stats.no_endpoints, 1);
        Stats::add(&shared.stats.udp_dropped, 1);
        return None;
    };
    let backend = match connect_backend(endpoint) {
        Ok(b) => b,
        Err(e) => {
            Stats::add(&shared.stats.dial_failures, 1);
            Stats::add(&shared.stats.udp_dropped, 1);
            debug!(service = %shared.name, backend.addr = %endpoint, error = %e, "UDP backend socket failed");
            return None;
        }
    };
    let session = Arc::new(Session {
        backend,
        endpoint,
        born: Instant::now(),
        generation: AtomicU64::new(generation),
        last_ms: AtomicU64::new(0),
    });
    map.insert(client, session.clone());
    Stats::add(&shared.stats.udp_sessions_active, 1);
    debug!(service = %shared.name, client.addr = %client, backend.addr = %endpoint, "UDP session opened");
    tracker.spawn(run_session(
        session.clone(),
        client,
        sock.clone(),
        table.clone(),
        shared.clone(),
        accept.clone(),
        kill.clone(),
    ));
    Some(session)
}

/// Relays replies to the client until the session is idle, fails, or the listener closes.
async fn run_session(
    session: Arc<Session>,
    client: SocketAddr,
    sock: Arc<UdpSocket>,
    table: Table,
    shared: Arc<Shared>,
    accept: CancellationToken,
    kill: CancellationToken,
) {
    let idle = shared.udp_idle_timeout;
    let reason = loop {
        let deadline = tokio::time::Instant::from_std(session.deadline(idle));
        tokio::select! {
            _ = accept.cancelled() => break "listener closed",
            _ = kill.cancelled() => break "shutdown",
            _ = tokio::time::sleep_until(deadline) => {
                let mut map = lock(&table);
                if !map.get(&client).is_some_and(|s| Arc::ptr_eq(s, &session)) {
                    break "replaced";
                }
                if Instant::now() >= session.deadline(idle) {
                    map.remove(&client);
                    break "idle";
                }
            }
            r = session.backend.readable() => {
                if let Err(e) = r {
                    break if e.kind() == io::ErrorKind::ConnectionRefused { "backend refused" } else { "backend error" };
                }
                let (result, blocked) = relay_replies(&session, client, &sock, &shared);
                if let Some(datagram) = blocked {
                    match tokio::time::timeout(SEND_WAIT, sock.send_to(&datagram, client)).await {
                        Ok(Ok(sent)) => Stats::add(&shared.stats.bytes_to_client, sent as u64),
                        _ => Stats::add(&shared.stats.udp_dropped, 1),
                    }
                }
                if let Err(why) = result {
                    break why;
                }
            }
        }
    };
    {
        let mut map = lock(&table);
        if map.get(&client).is_some_and(|s| Arc::ptr_eq(s, &session)) {
            map.remove(&client);
        }
    }
    Stats::dec(&shared.stats.udp_sessions_active);
    debug!(service = %shared.name, client.addr = %client, backend.addr = %session.endpoint, reason, "UDP session closed");
}

/// Relays queued replies without blocking. Returns the reason to end the session on a backend
/// error, and a reply the service socket could not take at once (sent by the caller with a
/// short wait; the rest stays queued in the kernel for the next wake-up).
type Relay = (Result<(), &'static str>, Option<Vec<u8>>);

fn relay_replies(
    session: &Session,
    client: SocketAddr,
    sock: &UdpSocket,
    shared: &Shared,
) -> Relay {
    REPLY_BUF.with(|cell| {
        let mut buf = cell.borrow_mut();
        loop {
            match session.backend.try_recv(&mut buf) {
                Ok(n) => {
                    session.touch();
                    match sock.try_send_to(&buf[..n], client) {
                        Ok(sent) => Stats::add(&shared.stats.bytes_to_client, sent as u64),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            return (Ok(()), Some(buf[..n].to_vec()))
                        }
                        Err(_) => Stats::add(&shared.stats.udp_dropped, 1),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (Ok(()), None),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    return (Err("backend refused"), None)
                }
                Err(_) => return (Err("backend error"), None),
            }
        }
    })
}
