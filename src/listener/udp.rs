//! UDP: one session per client address, each with a connected socket to its backend.
//!
//! Replies leave from the service's own address and port, so conntrack un-NATs them back to the
//! portal address the client sent to. A session also gets its own socket on that address and
//! port, connected to the client (its front, see [`open_front`]), up to [`FRONTS_PER_PORT`] per
//! service port: the kernel then delivers that client's datagrams to the front instead of the
//! shared service socket, and the loop that owns the session carries both directions. A session ends after `udpIdleTimeout` without traffic in either
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

use super::gso::{self, Batch, Family, Fill, Sent};
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
    /// The service socket's own address: where fronts bind.
    local: Option<SocketAddr>,
    /// Its address family (and its fronts').
    family: Family,
    /// Sessions of this port that have a front now.
    pub(crate) fronts: AtomicUsize,
}

impl Port {
    pub(crate) fn new(sock: UdpSocket, shared: Arc<Shared>) -> Port {
        let local = sock.local_addr().ok();
        Port {
            sock,
            shared,
            table: Mutex::new(HashMap::new()),
            gate: Gate::default(),
            closed: AtomicBool::new(false),
            local,
            family: local.as_ref().map_or(Family::V4, Family::of),
            fronts: AtomicUsize::new(0),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<Session>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One client's session: a socket connected to its backend, owned by the loop that opened it.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) backend: UdpSocket,
    /// A socket on the service's address and port connected to the client, which the kernel
    /// gives that client's datagrams to; `None` past [`FRONTS_PER_PORT`] or when it could not
    /// be opened: the client's datagrams then come through the service socket.
    pub(crate) front: Option<Front>,
    endpoint: SocketAddr,
    pub(crate) client: SocketAddr,
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
    fn new(
        backend: UdpSocket,
        front: Option<Front>,
        endpoint: SocketAddr,
        client: SocketAddr,
        generation: u64,
    ) -> Arc<Session> {
        Arc::new(Session {
            backend,
            front,
            endpoint,
            client,
            born: Instant::now(),
            generation: AtomicU64::new(generation),
            last_ms: AtomicU64::new(0),
            to_backend: AtomicUsize::new(gso::INITIAL_MAX_SEGMENT),
            to_client: AtomicUsize::new(gso::INITIAL_MAX_SEGMENT),
        })
    }

    /// A session of `port` for `client`, owned by `lp`, with `front` as given (a test's stand-in
    /// for a front that took other clients' datagrams before it was connected).
    #[cfg(test)]
    pub(crate) fn open_for_test(
        port: &Arc<Port>,
        client: SocketAddr,
        front: UdpSocket,
        lp: &mut Loop,
    ) -> Arc<Session> {
        let endpoint = port.shared.balancer.endpoints()[0];
        let generation = port.shared.generation.load(Ordering::Relaxed);
        let family = Family::of(&front.local_addr().unwrap());
        let session = Session::new(
            connect_backend(endpoint).unwrap(),
            Some(Front {
                sock: front,
                family,
            }),
            endpoint,
            client,
            generation,
        );
        port.fronts.fetch_add(1, Ordering::AcqRel);
        lp.own(port, &session).unwrap();
        port.table().insert(client, session.clone());
        Stats::add(&port.shared.stats.udp_sessions_active, 1);
        session
    }

    /// Whether the session's endpoint is still one of the service's: checked against the
    /// endpoint list only when it changed since the last check.
    fn current(&self, shared: &Shared, generation: u64) -> bool {
        let current = self.generation.load(Ordering::Relaxed) == generation
            || shared.balancer.endpoints().contains(&self.endpoint);
        if current {
            self.generation.store(generation, Ordering::Relaxed);
        }
        current
    }
    /// Where replies to the client leave from, and the address they need: the front, connected
    /// already, or the service socket.
    fn reply_path<'a>(&'a self, port: &'a Port) -> (&'a UdpSocket, Option<SocketAddr>) {
        match &self.front {
            Some(front) => (&front.sock, None),
            None => (&port.sock, Some(self.client)),
        }
    }
    fn touch(&self) {
        self.last_ms
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    pub(crate) fn deadline(&self, idle: Duration) -> Instant {
        self.born + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
    }
}

/// Buffer size asked for each UDP socket of the data plane, each way: the service socket, a
/// session's front and its backend socket. A loop that is kept off its CPU for a moment must
/// not have the kernel drop what queues meanwhile, and the default (`rmem_default`, 208 KiB
/// here) holds about 2 ms of a 100,000 datagram/s stream of small datagrams. The fronts and
/// backend sockets, which carry a session's traffic once it has one, first kept that default:
/// at 100,000 datagrams/s offered, the node's `RcvbufErrors` put 1,208 of the 1,470 datagrams
/// lost in a 3 s run at the proxy's sockets. The kernel caps the size at
/// `rmem_max`/`wmem_max`, and memory is only taken for what is queued.
const SOCKET_BUFFER: usize = 4 << 20;

/// Asks for [`SOCKET_BUFFER`] each way on a UDP socket of the data plane. Best effort: a
/// smaller buffer only means an earlier drop under a burst.
pub(crate) fn roomy(sock: &socket2::Socket) {
    sock.set_recv_buffer_size(SOCKET_BUFFER).ok();
    sock.set_send_buffer_size(SOCKET_BUFFER).ok();
}

fn connect_backend(endpoint: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let local: SocketAddr = if endpoint.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = Socket::new(
        Domain::for_address(local),
        Type::DGRAM.nonblocking().cloexec(),
        None,
    )?;
    roomy(&sock);
    sock.bind(&local.into())?;
    sock.connect(&endpoint.into())?;
    Ok(sock.into())
}

/// Most sessions of one service port that get a front ([`open_front`]); later sessions use the
/// service socket both ways, as every session did before fronts.
///
/// Why a bound: Linux before 6.13 finds the socket for an incoming datagram by scoring every
/// socket bound to its address and port in turn, so each front makes every datagram to the
/// port a little dearer. 64 keeps that walk short on such kernels; since 6.13 connected sockets
/// are also hashed by their four-tuple and found at once.
pub(crate) const FRONTS_PER_PORT: usize = 64;

/// A session's front ([`open_front`]) and its address family, which reading it needs.
#[derive(Debug)]
pub(crate) struct Front {
    pub(crate) sock: UdpSocket,
    family: Family,
}

/// Opens a session's front: a socket bound to the service socket's address and port
/// (`SO_REUSEADDR`; not `SO_REUSEPORT`, which would put it in the service socket's group and
/// have the kernel hash other clients' datagrams to it) and connected to the client.
///
/// Why: with one service socket shared by every loop, a request is read by whichever loop the
/// kernel finds free and its reply by the loop that owns the session, so a request/response
/// round wakes two threads and often moves the owner between CPUs. A connected socket scores
/// higher than the service socket in the kernel's lookup, so the client's next datagrams come
/// to the front, which only the owner watches: one thread then carries the session both ways,
/// as socat's per-client process does. Replies sent on it leave from the same address and port
/// as from the service socket, so conntrack un-NATs them the same.
///
/// Between its bind and its connect a front is unconnected, and the kernel would give it any
/// client's datagram that it scores as high as the service socket: the first socket found
/// wins a tie, and the newest is found first. So the front of an IPv4 port is an IPv6 socket
/// bound to the IPv4-mapped address: for IPv4 traffic the kernel scores an IPv6 socket below
/// an IPv4 one until it is connected, and above it after. (Measured: of datagrams sent in
/// that window, the service socket got every one.) An IPv6 port's front ties, and may take
/// other clients' datagrams in that window; [`relay_requests`] hands those on to their
/// sessions, perhaps after their next ones. Where the kernel has no IPv6 at all, an IPv4
/// port's front is an IPv4 socket, with that window too.
///
/// The client's own datagrams that reached the service socket before the connect are still
/// read from there, by the loop that opened the session, before it reads the front
/// ([`read_port`]), so they stay in order. Only past [`BATCHES_PER_TURN`] batches in one turn
/// (a flood of new clients) are some left to the next reader, which may send them on while
/// the front's first ones go.
pub(crate) fn open_front(local: SocketAddr, client: SocketAddr) -> io::Result<Front> {
    let mapped = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    };
    let (sock, family) = match local {
        SocketAddr::V4(_) => match bind_front(mapped(local)) {
            Ok(sock) => {
                sock.connect(mapped(client))?;
                (sock, Family::V6)
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::EAFNOSUPPORT) => {
                let sock = bind_front(local)?;
                sock.connect(client)?;
                (sock, Family::V4)
            }
            Err(e) => return Err(e),
        },
        SocketAddr::V6(_) => {
            let sock = bind_front(local)?;
            sock.connect(client)?;
            (sock, Family::V6)
        }
    };
    Ok(Front { sock, family })
}

/// A front bound but not yet connected ([`open_front`]).
fn bind_front(local: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(
        Domain::for_address(local),
        Type::DGRAM.nonblocking().cloexec(),
        None,
    )?;
    sock.set_reuse_address(true)?;
    if local.is_ipv6() {
        sock.set_only_v6(false)?;
    }
    roomy(&sock);
    sock.bind(&local.into())?;
    Ok(sock.into())
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
/// What comes here is mostly new clients' first datagrams: a client with a front sends to it.
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
        let fronts = port.fronts.load(Ordering::Relaxed);
        let (why, blocked) = Batch::with(|batch| {
            let why = batch.fill(&port.sock, port.family, None);
            (why, forward(batch, port, lp))
        });
        send_blocked_to_backends(blocked, shared);
        match why {
            // This batch opened a front: what its client sent before the front was connected
            // is here, and is read before this loop turns to the front (so in order), not
            // left to another loop to send on while this one reads the front.
            Fill::Drained if port.fronts.load(Ordering::Relaxed) > fronts => continue,
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

/// Sends what full backend sockets could not take at once: in order, with a short wait, after
/// the batch buffer is free again.
fn send_blocked_to_backends(blocked: Blocked, shared: &Shared) {
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
}

/// Relays one batch of what the client sent to a session's front on to its backend.
/// `Ok(true)`: there may be more, read on the loop's next turn; `Err`: the session ends, with
/// the reason.
///
/// The front is read by its owner alone, which also expires it, so the session is touched
/// without the table's lock. Datagrams from other clients (taken before the front was
/// connected), and the client's own once its endpoint is gone, go the way of the service
/// socket's ([`forward`]): to their sessions, opened or moved as needed.
pub(crate) fn relay_requests(
    port: &Arc<Port>,
    session: &Arc<Session>,
    lp: &mut Loop,
) -> Result<bool, &'static str> {
    let Some(front) = &session.front else {
        return Ok(false);
    };
    let shared = &port.shared;
    let (why, blocked, moved) = Batch::with(|batch| {
        let why = batch.fill(&front.sock, front.family, None);
        if batch.items.is_empty() {
            return (why, Blocked::new(), false);
        }
        if port.family == Family::V4 {
            // An IPv6 front's sources are IPv4-mapped; the port knows its clients as IPv4.
            batch.unmap();
        }
        let generation = shared.generation.load(Ordering::Relaxed);
        let own = batch.items.iter().all(|(from, _)| *from == session.client);
        if !own || !session.current(shared, generation) {
            return (why, forward(batch, port, lp), true);
        }
        session.touch();
        let unsent = send_all(
            &session.backend,
            &batch.datagrams(),
            None,
            &session.to_backend,
            shared,
            &shared.stats.bytes_to_backend,
        );
        let blocked = if unsent.is_empty() {
            Blocked::new()
        } else {
            vec![(session.clone(), unsent)]
        };
        (why, blocked, false)
    });
    send_blocked_to_backends(blocked, shared);
    if moved && !in_table(port, session) {
        // Its endpoint went away and the client has a new session now, with a front of its
        // own: this one is done.
        return Err("replaced");
    }
    match why {
        Fill::Drained => Ok(false),
        Fill::Full => Ok(true),
        // The client's port is closed (an ICMP error on the connected front): it has gone.
        Fill::Failed(e) if e.kind() == io::ErrorKind::ConnectionRefused => Err("client gone"),
        Fill::Failed(e) => {
            debug!(service = %shared.name, client.addr = %session.client, error = %e, "UDP front receive error");
            Ok(false)
        }
    }
}

fn in_table(port: &Port, session: &Arc<Session>) -> bool {
    port.table()
        .get(&session.client)
        .is_some_and(|s| Arc::ptr_eq(s, session))
}

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
        if s.current(shared, generation) {
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
        Ok(backend) => Session::new(
            backend,
            front_for(port, client),
            endpoint,
            client,
            generation,
        ),
        Err(e) => {
            Stats::add(&shared.stats.dial_failures, 1);
            Stats::add(&shared.stats.udp_dropped, datagrams);
            debug!(service = %shared.name, backend.addr = %endpoint, error = %e, "UDP backend socket failed");
            return None;
        }
    };
    if let Err(e) = lp.own(port, &session) {
        if session.front.is_some() {
            port.fronts.fetch_sub(1, Ordering::AcqRel);
        }
        Stats::add(&shared.stats.udp_dropped, datagrams);
        warn!(service = %shared.name, error = %e, "UDP session cannot be watched; datagram dropped");
        return None;
    }
    map.insert(client, session.clone());
    Stats::add(&shared.stats.udp_sessions_active, 1);
    debug!(service = %shared.name, client.addr = %client, backend.addr = %endpoint, "UDP session opened");
    Some(session)
}

/// A front for a new session of `port` ([`open_front`]), unless the port has its share.
fn front_for(port: &Port, client: SocketAddr) -> Option<Front> {
    let local = port.local?;
    port.fronts
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < FRONTS_PER_PORT).then_some(n + 1)
        })
        .ok()?;
    match open_front(local, client) {
        Ok(front) => Some(front),
        Err(e) => {
            port.fronts.fetch_sub(1, Ordering::AcqRel);
            debug!(service = %port.shared.name, client.addr = %client, error = %e, "UDP front not opened; the session uses the service socket");
            None
        }
    }
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
    if session.front.is_some() {
        port.fronts.fetch_sub(1, Ordering::AcqRel);
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
    let (out, dest) = session.reply_path(port);
    let (why, unsent) = Batch::with(|batch| {
        let why = batch.fill(
            &session.backend,
            Family::of(&session.endpoint),
            Some(client),
        );
        let mut unsent = Vec::new();
        if !batch.items.is_empty() {
            session.touch();
            unsent = send_all(
                out,
                &batch.datagrams(),
                dest,
                &session.to_client,
                shared,
                &shared.stats.bytes_to_client,
            );
        }
        (why, unsent)
    });
    send_blocked(
        out,
        &unsent,
        dest,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 port's front, bound and not yet connected, takes no other client's datagram:
    /// the kernel scores it, an IPv6 socket, below the IPv4 service socket until it is
    /// connected ([`open_front`]); once connected it takes its client's.
    #[test]
    fn an_unconnected_front_of_an_ipv4_port_takes_nothing() {
        let service: UdpSocket = crate::listener::bind_socket(
            crate::model::Protocol::Udp,
            "127.0.0.1:0".parse().unwrap(),
            false,
        )
        .unwrap()
        .into();
        let local = service.local_addr().unwrap();
        let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{}", local.port())
            .parse()
            .unwrap();
        let Ok(front) = bind_front(mapped) else {
            eprintln!("SKIPPED: an_unconnected_front_of_an_ipv4_port_takes_nothing needs IPv6");
            return;
        };
        front.set_nonblocking(true).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        service
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        for i in 0..20u8 {
            client.send_to(&[i], local).unwrap();
            let (n, _) = service
                .recv_from(&mut buf)
                .expect("the service socket gets it");
            assert_eq!(&buf[..n], [i]);
        }
        assert!(front.recv(&mut buf).is_err(), "the front took nothing");

        let connected = open_front(local, client.local_addr().unwrap()).unwrap();
        assert_eq!(connected.family, Family::V6);
        connected
            .sock
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.send_to(b"mine", local).unwrap();
        let n = connected
            .sock
            .recv(&mut buf)
            .expect("the front gets its client's");
        assert_eq!(&buf[..n], b"mine");
    }

    /// A session's front and backend socket get the service socket's buffers, not the
    /// default: the sockets that carry a session's traffic are the ones a burst fills.
    #[test]
    fn session_sockets_get_the_service_sockets_buffers() {
        let sysctl = |name: &str| -> usize {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        if sysctl("rmem_max") <= sysctl("rmem_default") {
            eprintln!(
                "SKIPPED: session_sockets_get_the_service_sockets_buffers: rmem_max is not above \
                 rmem_default here, so no socket can be given a larger buffer than the default"
            );
            return;
        }
        let service = crate::listener::bind_socket(
            crate::model::Protocol::Udp,
            "127.0.0.1:0".parse().unwrap(),
            false,
        )
        .unwrap();
        let default = service.recv_buffer_size().unwrap();
        roomy(&service);
        let want = service.recv_buffer_size().unwrap();
        assert!(want > default, "{want} > {default}");
        let local = service.local_addr().unwrap().as_socket().unwrap();

        let backend = connect_backend("127.0.0.1:9".parse().unwrap()).unwrap();
        let backend = socket2::SockRef::from(&backend);
        assert_eq!(backend.recv_buffer_size().unwrap(), want);
        assert_eq!(
            backend.send_buffer_size().unwrap(),
            service.send_buffer_size().unwrap()
        );
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let front = open_front(local, client.local_addr().unwrap()).unwrap();
        let front = socket2::SockRef::from(&front.sock);
        assert_eq!(front.recv_buffer_size().unwrap(), want);
        assert_eq!(
            front.send_buffer_size().unwrap(),
            service.send_buffer_size().unwrap()
        );
    }
}
