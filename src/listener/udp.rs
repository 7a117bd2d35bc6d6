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
//!
//! The threads that run all this are the UDP loops ([`super::udp_loops`]): this module says
//! what happens to a datagram, that one when and on which thread.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::gso::{self, Batch, Fill, Sent};
use super::udp_loops::{self, Gate, Loop, BATCHES_PER_TURN};
use super::{is_resource_exhaustion, Shared, Stats};

/// One UDP service port: its socket, read by every UDP loop in turn, and its sessions.
#[derive(Debug)]
pub(crate) struct Port {
    pub(crate) sock: UdpSocket,
    pub(crate) shared: Arc<Shared>,
    table: Mutex<HashMap<SocketAddr, Arc<Session>>>,
    /// One loop reads the socket at a time, so each client's datagrams keep their order.
    gate: Gate,
    /// Set when the listener closes: datagrams still queued are not forwarded.
    closed: AtomicBool,
    /// How many loops watch the socket now; a loop may step aside only while another watches.
    pub(crate) watchers: AtomicUsize,
    /// 1 + the index of the loop that should read the socket while it is flooded: the one
    /// that owns the port's one session. 0: never flooded.
    reader: AtomicUsize,
    /// When a read last filled the batch, in milliseconds of [`clock_ms`].
    full_at: AtomicU64,
}

/// How long after the last full batch the socket still counts as flooded. A flood has gaps
/// (the reader catches up, reads a short batch, then falls behind again): those must not bring
/// the other loops back for each datagram. Twice the time a loop stays aside.
const FLOOD_MEMORY_MS: u64 = 20;

/// Milliseconds since the first call: a clock for flood bookkeeping.
fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Port {
    pub(crate) fn new(sock: UdpSocket, shared: Arc<Shared>) -> Port {
        Port {
            sock,
            shared,
            table: Mutex::new(HashMap::new()),
            gate: Gate::default(),
            closed: AtomicBool::new(false),
            watchers: AtomicUsize::new(0),
            reader: AtomicUsize::new(0),
            full_at: AtomicU64::new(0),
        }
    }

    /// Whether loop `index` should stop watching the socket for a while: yes while it is
    /// flooded for a session another loop owns.
    pub(crate) fn step_aside(&self, index: usize) -> bool {
        self.flooded_for().is_some_and(|r| r != index)
    }

    /// The loop that should read the socket while it is flooded; `None` when it is not.
    pub(crate) fn flooded_for(&self) -> Option<usize> {
        let reader = self.reader.load(Ordering::Relaxed).checked_sub(1)?;
        let since = clock_ms().saturating_sub(self.full_at.load(Ordering::Relaxed));
        (since <= FLOOD_MEMORY_MS).then_some(reader)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<Session>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One client's session: a socket connected to its backend, owned by the loop that opened it.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) backend: UdpSocket,
    /// The loop that opened it, which alone reads its replies.
    owner: usize,
    endpoint: SocketAddr,
    client: SocketAddr,
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
    pub(crate) fn deadline(&self, idle: Duration) -> Instant {
        self.born + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
    }
}

fn connect_backend(endpoint: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = if endpoint.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local)?;
    sock.connect(endpoint)?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// Serves a UDP service port on the UDP loops until `accept` or `kill` is cancelled; the
/// returned future is that watch, and ends once every loop has let go of the port and closed
/// its sessions.
///
/// # Errors
/// The UDP loops could not be started.
pub(crate) fn start(
    sock: UdpSocket,
    shared: Arc<Shared>,
    accept: CancellationToken,
    kill: CancellationToken,
) -> io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let loops = udp_loops::loops()?;
    let port = Arc::new(Port::new(sock, shared));
    loops.add(&port);
    Ok(async move {
        tokio::select! {
            _ = accept.cancelled() => {}
            _ = kill.cancelled() => {}
        }
        port.closed.store(true, Ordering::Relaxed);
        loops.remove(&port).await;
        port.table().clear();
        debug!(service = %port.shared.name, "UDP listener closed");
    })
}

/// What a loop's turn at a service socket came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    /// Read until the queue was empty (or the port is closed).
    Done,
    /// There may be more than this turn read.
    More,
    /// Another loop is reading it, and will read what woke this one.
    Taken,
}

/// Reads what the service socket has queued and forwards it, unless another loop is at it.
///
/// Also notes whether the socket is flooded by its one client: a full batch while the port has
/// a single session names the loop that should read the socket, the one that reads that
/// session's replies. One thread then carries the flood both ways with full batches, while the
/// other loops step aside (see [`Port::step_aside`]). With more sessions every loop keeps
/// reading: measured with 4 clients flooding at once, stepping aside for the client that led
/// the last full batch (even only when it sent 3/4 of it) delivered 22,000-42,000
/// datagrams/s, against 54,000-71,000 without.
pub(crate) fn read_port(port: &Arc<Port>, lp: &mut Loop) -> Turn {
    if port.closed.load(Ordering::Relaxed) {
        return Turn::Done;
    }
    if !port.gate.enter() {
        return Turn::Taken;
    }
    let shared = &port.shared;
    let mut batches = 0;
    loop {
        let (why, blocked) = Batch::with(|batch| {
            let why = batch.fill(&port.sock, None);
            let blocked = forward(batch, port, lp);
            if batch.items.len() == gso::MAX_BATCH {
                let table = port.table();
                if let (1, Some(session)) = (table.len(), table.values().next()) {
                    port.reader.store(session.owner + 1, Ordering::Relaxed);
                    port.full_at.store(clock_ms(), Ordering::Relaxed);
                }
            }
            (why, blocked)
        });
        // Datagrams a full backend socket could not take at once: sent in order, with a short
        // wait, after the batch buffer is free again.
        let deadline = Instant::now() + SEND_WAIT;
        for (session, datagrams) in blocked {
            send_blocked(
                &session.backend,
                &datagrams,
                None,
                deadline,
                shared,
                &shared.stats.bytes_to_backend,
            );
        }
        match why {
            Fill::Drained => {
                if port.gate.leave() {
                    return Turn::Done;
                }
                // Another loop was woken meanwhile: what woke it is read here.
                continue;
            }
            Fill::Failed(e) if is_resource_exhaustion(&e) => {
                // Waited out: the next datagram's wake-up reads again.
                warn!(service = %shared.name, error = %e, "UDP receive failed: out of resources");
                port.gate.release();
                return Turn::Done;
            }
            // ECONNREFUSED and the like from ICMP errors: reported once, then reading goes on
            // (the original's loop exited here and the port stayed dead).
            Fill::Failed(e) => debug!(service = %shared.name, error = %e, "UDP receive error"),
            Fill::Full => {}
        }
        batches += 1;
        if batches >= BATCHES_PER_TURN {
            // The loop comes back to it, and reading again honours a mark set meanwhile.
            port.gate.release();
            return Turn::More;
        }
    }
}

/// Datagrams left unsent because a socket was full, copied out of the batch buffer.
type Blocked = Vec<(Arc<Session>, Vec<Vec<u8>>)>;

/// Sends a batch read from the listener on to the backends: each client's datagrams, in the
/// order they came, in as few sends as the segmentation rules allow.
fn forward(batch: &Batch, port: &Arc<Port>, lp: &mut Loop) -> Blocked {
    let mut blocked = Blocked::new();
    // A stable sort keeps each client's datagrams in arrival order.
    let mut order: Vec<usize> = (0..batch.items.len()).collect();
    order.sort_by_key(|&i| batch.items[i].0);
    for group in order.chunk_by(|&a, &b| batch.items[a].0 == batch.items[b].0) {
        let client = batch.items[group[0]].0;
        let Some(session) = session_for(port, client, group.len() as u64, lp) else {
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
            &port.shared,
            &port.shared.stats.bytes_to_backend,
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

/// Longest a loop waits for full sockets to take one batch's blocked datagrams before the rest
/// are dropped. The loop serves nothing else meanwhile, so it is short, and it bounds the whole
/// batch, not each datagram.
const SEND_WAIT: Duration = Duration::from_millis(50);

/// Sends one datagram, waiting until `deadline` for room in the socket's buffer.
fn send_waiting(
    out: &UdpSocket,
    datagram: &[u8],
    dest: Option<SocketAddr>,
    deadline: Instant,
) -> io::Result<usize> {
    loop {
        let r = match dest {
            Some(to) => out.send_to(datagram, to),
            None => out.send(datagram),
        };
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(e);
                }
                let ms = (left.as_millis() as u16).max(1);
                let mut fds = [PollFd::new(out.as_fd(), PollFlags::POLLOUT)];
                match poll(&mut fds, PollTimeout::from(ms)) {
                    Ok(0) => return Err(e),
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(err) => return Err(err.into()),
                }
            }
            other => return other,
        }
    }
}

/// Sends what a full socket did not take at once, in order, each waiting until `deadline` at
/// most; what still finds no room is dropped and counted.
fn send_blocked(
    out: &UdpSocket,
    datagrams: &[Vec<u8>],
    dest: Option<SocketAddr>,
    deadline: Instant,
    shared: &Shared,
    bytes: &AtomicU64,
) {
    for d in datagrams {
        match send_waiting(out, d, dest, deadline) {
            Ok(sent) => Stats::add(bytes, sent as u64),
            Err(e) => {
                Stats::add(&shared.stats.udp_dropped, 1);
                debug!(service = %shared.name, dest = ?dest, error = %e, "datagram dropped: socket full");
            }
        }
    }
}

/// The client's session, opened (and owned by `lp`) if it has none. The session is touched
/// under the table lock, so its loop cannot expire it between this lookup and the send that
/// follows.
fn session_for(
    port: &Arc<Port>,
    client: SocketAddr,
    datagrams: u64,
    lp: &mut Loop,
) -> Option<Arc<Session>> {
    let shared = &port.shared;
    let mut map = port.table();
    let generation = shared.generation.load(Ordering::Relaxed);
    if let Some(s) = map.get(&client).cloned() {
        let current = s.generation.load(Ordering::Relaxed) == generation
            || shared.balancer.endpoints().contains(&s.endpoint);
        if current {
            s.generation.store(generation, Ordering::Relaxed);
            s.touch();
            return Some(s);
        }
        // Its backend was removed: start over on a live endpoint. The old session's loop sees
        // that it is no longer in the table at its next check and closes it.
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
    let session = match connect_backend(endpoint) {
        Ok(backend) => Arc::new(Session {
            backend,
            owner: lp.index(),
            endpoint,
            client,
            born: Instant::now(),
            generation: AtomicU64::new(generation),
            last_ms: AtomicU64::new(0),
            to_backend: AtomicUsize::new(gso::INITIAL_MAX_SEGMENT),
            to_client: AtomicUsize::new(gso::INITIAL_MAX_SEGMENT),
        }),
        Err(e) => {
            Stats::add(&shared.stats.dial_failures, 1);
            Stats::add(&shared.stats.udp_dropped, datagrams);
            debug!(service = %shared.name, backend.addr = %endpoint, error = %e, "UDP backend socket failed");
            return None;
        }
    };
    if let Err(e) = lp.own(port, &session) {
        Stats::add(&shared.stats.udp_dropped, datagrams);
        warn!(service = %shared.name, error = %e, "UDP session cannot be watched; datagram dropped");
        return None;
    }
    map.insert(client, session.clone());
    Stats::add(&shared.stats.udp_sessions_active, 1);
    debug!(service = %shared.name, client.addr = %client, backend.addr = %endpoint, "UDP session opened");
    Some(session)
}

/// Why a session its loop checks should end now, if it should: it was replaced in the table
/// (its endpoint went away), or it has been idle past its timeout. An idle session leaves the
/// table here, under the lock that a datagram for it would take to touch it.
pub(crate) fn expired(port: &Port, session: &Arc<Session>, now: Instant) -> Option<&'static str> {
    let mut map = port.table();
    if !map
        .get(&session.client)
        .is_some_and(|s| Arc::ptr_eq(s, session))
    {
        return Some("replaced");
    }
    if now >= session.deadline(port.shared.udp_idle_timeout) {
        map.remove(&session.client);
        return Some("idle");
    }
    None
}

/// Takes a closed session out of the table (if it is still there) and counts it gone.
pub(crate) fn end_session(port: &Port, session: &Arc<Session>, reason: &'static str) {
    {
        let mut map = port.table();
        if map
            .get(&session.client)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            map.remove(&session.client);
        }
    }
    Stats::dec(&port.shared.stats.udp_sessions_active);
    debug!(service = %port.shared.name, client.addr = %session.client, backend.addr = %session.endpoint, reason, "UDP session closed");
}

/// Relays one batch of queued replies to the client. `Ok(true)`: there may be more, read on the
/// loop's next turn (a backend that floods must not keep the thread from every other socket);
/// `Err`: the session ends, with the reason.
pub(crate) fn relay_replies(port: &Port, session: &Session) -> Result<bool, &'static str> {
    let shared = &port.shared;
    let client = session.client;
    let (why, unsent) = Batch::with(|batch| {
        let why = batch.fill(&session.backend, Some(client));
        let mut unsent = Vec::new();
        if !batch.items.is_empty() {
            session.touch();
            let datagrams: Vec<&[u8]> = batch
                .items
                .iter()
                .map(|(_, r)| batch.bytes(r.clone()))
                .collect();
            unsent = send_all(
                &port.sock,
                &datagrams,
                Some(client),
                &session.to_client,
                shared,
                &shared.stats.bytes_to_client,
            );
        }
        (why, unsent)
    });
    send_blocked(
        &port.sock,
        &unsent,
        Some(client),
        Instant::now() + SEND_WAIT,
        shared,
        &shared.stats.bytes_to_client,
    );
    match why {
        Fill::Drained => Ok(false),
        Fill::Full => Ok(true),
        Fill::Failed(e) if e.kind() == io::ErrorKind::ConnectionRefused => Err("backend refused"),
        Fill::Failed(_) => Err("backend error"),
    }
}
