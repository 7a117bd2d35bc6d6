//! UDP: one session per client address, each with a connected socket to its backend.
//!
//! Replies leave from the service's own socket, so conntrack un-NATs them back to the portal
//! address the client sent to. A session ends after `udpIdleTimeout` without traffic in either
//! direction, on a backend error (the next datagram then opens a session to the next endpoint),
//! or when the service port is removed. Datagrams up to 65,507 bytes pass whole (the original
//! truncated at 4 KiB, kubernetes#47659). Datagrams move in batches ([`super::gso`]): what a
//! socket has queued is read at once and sent on in runs, into one buffer per worker thread, so
//! an idle session costs a socket and a small struct only.
//!
//! The session table is bounded (`udpMaxSessions`): past it new clients' datagrams are dropped
//! and counted, instead of exhausting descriptors for every other service.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::gso::{self, Batch, Fill, Sent};
use super::{is_resource_exhaustion, Shared, Stats};

#[derive(Debug)]
struct Session {
    backend: UdpSocket,
    endpoint: SocketAddr,
    born: Instant,
    /// `Shared::generation` when the endpoint was last known to be current.
    generation: AtomicU64,
    /// Milliseconds after `born` of the last datagram either way.
    last_ms: AtomicU64,
    /// Largest segment size a segmented send may use, towards the backend and towards the client
    /// (each path has its own MTU).
    to_backend: AtomicUsize,
    to_client: AtomicUsize,
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
    let mut backoff = Duration::from_millis(5);
    // Made once: a cancellation future built per wake-up would join and leave the token's
    // waiter list (a lock each way) for every datagram.
    let closed = accept.cancelled();
    tokio::pin!(closed);
    loop {
        tokio::select! {
            biased;
            _ = &mut closed => break,
            r = sock.readable() => if let Err(e) = r {
                debug!(service = %shared.name, error = %e, "UDP listener not readable");
                tokio::time::sleep(backoff).await;
                continue;
            },
        }
        let (why, blocked) = Batch::with(|batch| {
            let why = batch.fill(|buf| sock.try_recv_from(buf));
            let blocked = forward(batch, &table, &sock, &shared, &tracker, &accept, &kill);
            (why, blocked)
        });
        match why {
            Fill::Failed(e) if is_resource_exhaustion(&e) => {
                warn!(service = %shared.name, error = %e, "UDP receive failed: out of resources; pausing");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            // ECONNREFUSED and the like from ICMP errors: not fatal for the listener (the
            // original's loop exited here and the port stayed dead).
            Fill::Failed(e) => debug!(service = %shared.name, error = %e, "UDP receive error"),
            Fill::Drained | Fill::Full => backoff = Duration::from_millis(5),
        }
        // Datagrams a full backend socket could not take at once: sent in order, each with a
        // short wait, after the batch buffer is free again.
        for (session, datagrams) in blocked {
            for d in datagrams {
                match send_to_backend(&session.backend, &d).await {
                    Ok(sent) => Stats::add(&shared.stats.bytes_to_backend, sent as u64),
                    Err(e) => {
                        Stats::add(&shared.stats.udp_dropped, 1);
                        debug!(service = %shared.name, backend.addr = %session.endpoint, error = %e, "datagram to backend dropped");
                    }
                }
            }
        }
    }
    lock(&table).clear();
    debug!(service = %shared.name, "UDP listener closed");
}

/// Datagrams left unsent because a socket was full, copied out of the batch buffer.
type Blocked = Vec<(Arc<Session>, Vec<Vec<u8>>)>;

/// Sends a batch read from the listener on to the backends: each client's datagrams, in the
/// order they came, in as few sends as the segmentation rules allow.
fn forward(
    batch: &Batch,
    table: &Table,
    sock: &Arc<UdpSocket>,
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    accept: &CancellationToken,
    kill: &CancellationToken,
) -> Blocked {
    let mut blocked = Blocked::new();
    // A stable sort keeps each client's datagrams in arrival order.
    let mut order: Vec<usize> = (0..batch.items.len()).collect();
    order.sort_by_key(|&i| batch.items[i].0);
    for group in order.chunk_by(|&a, &b| batch.items[a].0 == batch.items[b].0) {
        let client = batch.items[group[0]].0;
        let Some(session) = session_for(
            table,
            client,
            group.len() as u64,
            sock,
            shared,
            tracker,
            accept,
            kill,
        ) else {
            continue;
        };
        let datagrams: Vec<&[u8]> = group
            .iter()
            .map(|&i| batch.bytes(batch.items[i].1.clone()))
            .collect();
        let unsent = send_all(
            &session.backend,
            &datagrams,
            None,
            &session.to_backend,
            shared,
            &shared.stats.bytes_to_backend,
        );
        if !unsent.is_empty() {
            blocked.push((session, unsent));
        }
    }
    blocked
}

/// Sends datagrams for one destination in runs. A datagram the socket refuses (an ICMP error
/// reported on a connected socket, say) is dropped and counted; the rest still go. Returns copies
/// of what a full socket buffer did not take, in order.
fn send_all(
    out: &UdpSocket,
    datagrams: &[&[u8]],
    dest: Option<SocketAddr>,
    max_segment: &AtomicUsize,
    shared: &Shared,
    bytes: &AtomicU64,
) -> Vec<Vec<u8>> {
    let sizes: Vec<usize> = datagrams.iter().map(|d| d.len()).collect();
    let runs = gso::runs(&sizes, max_segment.load(Ordering::Relaxed));
    for (k, run) in runs.iter().enumerate() {
        let mut rest = &datagrams[run.clone()];
        while !rest.is_empty() {
            match gso::send_run(out, rest, dest, max_segment) {
                Sent::All(b) => {
                    Stats::add(bytes, b as u64);
                    break;
                }
                Sent::Blocked { n, bytes: b } => {
                    Stats::add(bytes, b as u64);
                    let later = runs[k + 1..].iter().flat_map(|r| &datagrams[r.clone()]);
                    return rest[n..].iter().chain(later).map(|d| d.to_vec()).collect();
                }
                Sent::Failed { n, bytes: b, error } => {
                    Stats::add(bytes, b as u64);
                    Stats::add(&shared.stats.udp_dropped, 1);
                    debug!(service = %shared.name, dest = ?dest, error = %error, "datagram dropped");
                    rest = &rest[n + 1..];
                }
            }
        }
    }
    Vec::new()
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
#[allow(clippy::too_many_arguments)]
fn session_for(
    table: &Table,
    client: SocketAddr,
    datagrams: u64,
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
        Stats::add(&shared.stats.udp_dropped, datagrams);
        debug!(service = %shared.name, client.addr = %client, max = shared.udp_max_sessions, "UDP session table full; datagram dropped");
        return None;
    }
    let Some(endpoint) = shared.balancer.pick(client.ip(), false) else {
        Stats::add(&shared.stats.no_endpoints, 1);
        Stats::add(&shared.stats.udp_dropped, datagrams);
        return None;
    };
    let backend = match connect_backend(endpoint) {
        Ok(b) => b,
        Err(e) => {
            Stats::add(&shared.stats.dial_failures, 1);
            Stats::add(&shared.stats.udp_dropped, datagrams);
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
        to_backend: AtomicUsize::new(gso::INITIAL_MAX_SEGMENT),
        to_client: AtomicUsize::new(gso::INITIAL_MAX_SEGMENT),
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
    // Set up once per session, not per datagram: the cancellation futures stay registered, and
    // the idle timer is lazy. Traffic only moves the session's deadline (an atomic store); the
    // timer fires at the deadline it was set to, and is then set to the current one if the
    // session was used meanwhile. A datagram costs no timer operation.
    let (closed, stopped) = (accept.cancelled(), kill.cancelled());
    let idle_timer = tokio::time::sleep_until(session.deadline(idle).into());
    tokio::pin!(closed, stopped, idle_timer);
    let reason = loop {
        tokio::select! {
            _ = &mut closed => break "listener closed",
            _ = &mut stopped => break "shutdown",
            _ = &mut idle_timer => {
                let mut map = lock(&table);
                if !map.get(&client).is_some_and(|s| Arc::ptr_eq(s, &session)) {
                    break "replaced";
                }
                let deadline = session.deadline(idle);
                if Instant::now() >= deadline {
                    map.remove(&client);
                    break "idle";
                }
                idle_timer.as_mut().reset(deadline.into());
            }
            r = session.backend.readable() => {
                if let Err(e) = r {
                    break if e.kind() == io::ErrorKind::ConnectionRefused { "backend refused" } else { "backend error" };
                }
                let (result, blocked) = relay_replies(&session, client, &sock, &shared);
                for datagram in blocked {
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

/// Relays one batch of queued replies without blocking. Returns the reason to end the session on
/// a backend error, and the replies the service socket could not take at once (sent by the
/// caller with a short wait).
///
/// One batch per wake-up: a backend that floods must not keep the thread from every other
/// session and the listener. What stays queued is not lost: the socket was not read until it
/// would block, so its readiness is still set and the session's next wait returns at once,
/// after the others on this thread had their turn.
type Relay = (Result<(), &'static str>, Vec<Vec<u8>>);

fn relay_replies(
    session: &Session,
    client: SocketAddr,
    sock: &UdpSocket,
    shared: &Shared,
) -> Relay {
    Batch::with(|batch| {
        let why = batch.fill(|buf| session.backend.try_recv(buf).map(|n| (n, client)));
        let mut unsent = Vec::new();
        if !batch.items.is_empty() {
            session.touch();
            let datagrams: Vec<&[u8]> = batch
                .items
                .iter()
                .map(|(_, r)| batch.bytes(r.clone()))
                .collect();
            unsent = send_all(
                sock,
                &datagrams,
                Some(client),
                &session.to_client,
                shared,
                &shared.stats.bytes_to_client,
            );
        }
        let result = match why {
            Fill::Drained | Fill::Full => Ok(()),
            Fill::Failed(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                Err("backend refused")
            }
            Fill::Failed(_) => Err("backend error"),
        };
        (result, unsent)
    })
}
