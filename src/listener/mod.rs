//! Data plane: one listener per service port, owned by the proxier through a [`Handle`].
//!
//! A listener is a bound socket (TCP or UDP) plus the tasks that serve it. Its lifetime has two
//! tokens:
//! - `accept`, cancelled when the service port is removed: no new connections or sessions, while
//!   established TCP connections finish on their own (the original's behaviour, kept);
//! - `kill`, shared by every listener, cancelled when the program stops after its grace period.
//!
//! Every task is spawned on the proxier's [`TaskTracker`], so shutdown can wait for all of them,
//! and runs on a data-plane worker thread ([`workers`]), not on the control plane's runtime.
//! UDP datagrams are moved by the UDP loops ([`udp_loops`]); a UDP listener's task on the
//! tracker watches its tokens and ends once every loop has let go of the port.

mod exclusive;
mod gso;
mod keepalive;
pub mod poll;
pub mod pressure;
pub mod splice;
pub mod stats;
pub mod tcp;
mod timers;
pub mod udp;
mod udp_loops;
mod workers;

pub use udp_loops::{status as udp_loop_status, UdpLoopStatus};
pub use workers::{status as worker_status, WorkerStatus};

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use socket2::{Domain, Socket, Type};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::balancer::Balancer;
use crate::model::{Protocol, ServicePortName};
pub use stats::Stats;

/// Dial timeouts for successive attempts, from kube-proxy (`EndpointDialTimeouts`): short first
/// tries free descriptors fast when an endpoint is black-holed (kubernetes PR #15745).
pub const DIAL_TIMEOUTS: [Duration; 4] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// The original destinations a TCP listener accepts, when it is reached through portal rules.
///
/// A proxy port listens on the bind address, so without this check anyone who can reach a node
/// address could reach any service, ClusterIP-only ones included, by connecting to its proxy
/// port directly. Redirected connections carry their portal as `SO_ORIGINAL_DST`; direct ones
/// do not, and are refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowed {
    /// `ip:port` portals (cluster, external and load-balancer IPs).
    pub portals: HashSet<SocketAddr>,
    /// NodePort: any local address on this port.
    pub node_port: Option<u16>,
}

impl Allowed {
    /// True when a connection whose original destination was `dst` came through a portal.
    pub fn admits(&self, dst: SocketAddr) -> bool {
        self.portals.contains(&dst) || self.node_port == Some(dst.port())
    }
}

/// `externalTrafficPolicy: Local` for a TCP listener: connections that came in through a
/// NodePort, an external IP or a load-balancer IP go to this node's endpoints only.
///
/// One listener serves every portal of a service port, so the portal a connection used is told
/// by its original destination (`SO_ORIGINAL_DST`, or the local address in bind mode).
#[derive(Debug)]
pub struct ExternalLocal {
    /// The cluster IP portal: traffic to it is internal.
    pub cluster: SocketAddr,
    /// Every portal of the service.
    pub portals: Allowed,
    /// Balancer over this node's endpoints.
    pub balancer: Arc<Balancer>,
}

impl ExternalLocal {
    /// True when a connection to `dst` is external traffic.
    pub fn is_external(&self, dst: SocketAddr) -> bool {
        dst != self.cluster && self.portals.admits(dst)
    }
}

/// What a listener's tasks share with the proxier, which may update it in place.
#[derive(Debug)]
pub struct Shared {
    /// The service port served.
    pub name: ServicePortName,
    /// Backend choice.
    pub balancer: Arc<Balancer>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Portal check for TCP; `None` admits every connection.
    pub allowed: ArcSwapOption<Allowed>,
    /// Separate endpoints for external TCP traffic (`externalTrafficPolicy: Local`).
    pub external: ArcSwapOption<ExternalLocal>,
    /// UDP session idle timeout.
    pub udp_idle_timeout: Duration,
    /// Most UDP sessions at once.
    pub udp_max_sessions: usize,
    /// Bumped whenever the endpoint set changes, so UDP sessions can notice that their backend
    /// may be gone without checking on every datagram.
    pub generation: std::sync::atomic::AtomicU64,
}

/// The proxier's handle on a running listener.
#[derive(Debug)]
pub struct Handle {
    /// Where it listens (the proxy port).
    pub local_addr: SocketAddr,
    /// State shared with its tasks.
    pub shared: Arc<Shared>,
    accept: CancellationToken,
}

impl Handle {
    /// Stops accepting: the socket closes, established TCP connections continue until they end
    /// (or until the program's kill token fires); UDP sessions end at once, as they share the
    /// socket.
    pub fn close(&self) {
        self.accept.cancel();
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.accept.cancel();
    }
}

/// Binds a socket for `protocol` on `addr` (port 0: kernel-chosen). `SO_REUSEADDR` lets a
/// restarted proxy rebind ports whose old connections linger in TIME_WAIT.
///
/// # Errors
/// The bind fails (address in use, not a local address, no permission).
/// `freebind` allows binding an address that is not (yet) on the node, for `bind` portal mode.
pub fn bind_socket(protocol: Protocol, addr: SocketAddr, freebind: bool) -> io::Result<Socket> {
    let ty = match protocol {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
    };
    let socket = Socket::new(Domain::for_address(addr), ty, None)?;
    socket.set_reuse_address(true)?;
    // A restarted proxy binds the same proxy ports while its predecessor still listens, so
    // that no connection is refused across the restart (only same-user sockets may join).
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    if freebind {
        if addr.is_ipv4() {
            socket.set_freebind_v4(true)?;
        } else {
            socket.set_freebind_v6(true)?;
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// How a listener's socket is bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bind {
    /// A proxy port of our own.
    Own,
    /// An address that need not be on the node yet (`bind` portal mode: `IP_FREEBIND`).
    Free,
    /// The proxy port a previous run's rules point at, whose listener may still be open in the
    /// process we replace: join its `SO_REUSEPORT` group and take its new connections
    /// ([`take_new_connections`]).
    Adopt,
}

/// Index of an adopting listener in its `SO_REUSEPORT` group: a predecessor has one socket per
/// proxy port, and the kernel appends a socket to the group when it starts listening.
const ADOPTER_INDEX: u32 = 1;

/// Makes the kernel hand every new connection (TCP) or datagram (UDP) for this socket's port to
/// the socket at `index` of its `SO_REUSEPORT` group, instead of spreading them over the group
/// by a hash of the client's address: a one-instruction classic BPF program, set for the whole
/// group. For TCP the socket must already listen (that is when it joins the group).
///
/// Why: the process being replaced then gets nothing new. Its accept loop empties its queue,
/// and by the time it closes its listener nothing is left to migrate to ours
/// (`tcp_migrate_req`), where a connection could be reset if the close races the handshake;
/// its UDP socket's queue is empty too, where datagrams would be lost at the close (there is no
/// migration for UDP). An index past the group's end (the predecessor has already gone, and
/// ours is the only socket) makes the kernel fall back to the hash, which then has one socket
/// to choose.
fn take_new_connections(socket: &Socket, index: u32) -> io::Result<()> {
    use nix::libc::{sock_filter, sock_fprog, BPF_K, BPF_RET};
    let mut program = [sock_filter {
        code: (BPF_RET | BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: index,
    }];
    let fprog = sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::AttachReusePortCbpf,
        &fprog,
    )
    .map_err(io::Error::from)
}

/// Takes an adopted proxy port's new traffic from the predecessor ([`take_new_connections`]).
/// Not fatal when refused: the kernel then spreads new traffic over both processes, and the
/// predecessor's TCP queue migrates to us when it closes.
fn take_over(socket: &Socket, shared: &Shared) {
    if let Err(e) = take_new_connections(socket, ADOPTER_INDEX) {
        warn!(service = %shared.name, error = %e, "cannot steer new traffic to the adopted proxy port");
    }
}

/// Starts a listener for `shared.name` on `addr`, with its tasks on `tracker`, run by the next
/// data-plane worker in turn ([`workers`]). `kill` is the program-wide hard-stop token.
///
/// # Errors
/// The socket cannot be bound.
pub fn spawn(
    protocol: Protocol,
    addr: SocketAddr,
    bind: Bind,
    shared: Arc<Shared>,
    tracker: &TaskTracker,
    parent: &CancellationToken,
    kill: &CancellationToken,
) -> io::Result<Handle> {
    let socket = bind_socket(protocol, addr, bind == Bind::Free)?;
    let accept = parent.child_token();
    let (home, worker) = workers::workers().next();
    // Register the socket with this worker's reactor, and run its tasks there.
    let _enter = worker.enter();
    let local_addr = match protocol {
        Protocol::Tcp => {
            // Accepted connections inherit these: set once here, not on each one.
            tcp::tune(socket2::SockRef::from(&socket));
            socket.listen(4096)?;
            if bind == Bind::Adopt {
                take_over(&socket, &shared);
            }
            let listener = tokio::net::TcpListener::from_std(socket.into())?;
            let local = listener.local_addr()?;
            let port = tcp::Port {
                shared: shared.clone(),
                tracker: tracker.clone(),
                accept: accept.clone(),
                kill: kill.clone(),
            };
            tracker.spawn_on(tcp::accept_loop(listener, home, port, true), worker);
            local
        }
        Protocol::Udp => {
            udp::roomy(&socket);
            if bind == Bind::Adopt {
                take_over(&socket, &shared);
            }
            // Served by the UDP loops ([`udp_loops`]); the task here only watches the tokens.
            let sock: std::net::UdpSocket = socket.into();
            let local = sock.local_addr()?;
            let watch = udp::start(sock, shared.clone(), accept.clone(), kill.clone())?;
            tracker.spawn_on(watch, worker);
            local
        }
    };
    Ok(Handle {
        local_addr,
        shared,
        accept,
    })
}

/// True for errors that mean "out of file descriptors or buffers": these are waited out, never
/// fatal (the original panicked, taking every service on the node down with it).
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    // EMFILE (24), ENFILE (23), ENOBUFS (105), ENOMEM (12).
    matches!(e.raw_os_error(), Some(24) | Some(23) | Some(105) | Some(12))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    /// Without steering, the kernel spreads `n` new flows over both sockets of the group, by a
    /// hash of the client's address: what each test's steered half is compared with.
    fn assert_spread((to_old, to_new): (usize, usize), n: usize) {
        assert_eq!(to_old + to_new, n);
        assert!(
            to_old > 0 && to_new > 0,
            "without steering the kernel spreads flows: old {to_old}, new {to_new}"
        );
    }

    /// Accepts what `listener` has queued; returns how many.
    fn drain(listener: &Socket) -> usize {
        std::iter::from_fn(|| listener.accept().ok()).count()
    }

    fn listening(addr: SocketAddr) -> Socket {
        let s = bind_socket(Protocol::Tcp, addr, false).unwrap();
        s.listen(64).unwrap();
        s
    }

    /// The restart hand-over: once the adopting listener takes new connections, the
    /// predecessor's queue gets none, so it has nothing to migrate when it closes; after it has
    /// gone, the adopter still gets every connection (an index past the group's end falls back
    /// to the hash). Without the program the kernel spreads them over both, which shows that
    /// the program, not chance, sent them all to one (32 connections all hashed to one socket:
    /// a chance of 2^-31).
    #[test]
    fn an_adopting_listener_takes_every_new_connection() {
        let old = listening("127.0.0.1:0".parse().unwrap());
        let addr = old.local_addr().unwrap().as_socket().unwrap();
        let new = listening(addr);
        let connect = |n: usize| -> Vec<TcpStream> {
            (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect()
        };

        let _spread = connect(32);
        assert_spread((drain(&old), drain(&new)), 32);

        take_new_connections(&new, ADOPTER_INDEX).unwrap();
        let _steered = connect(32);
        assert_eq!((drain(&old), drain(&new)), (0, 32));

        drop(old);
        let _alone = connect(8);
        assert_eq!(drain(&new), 8);
    }

    /// Reads what `socket` has queued; returns how many datagrams.
    fn received(socket: &Socket) -> usize {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
        std::iter::from_fn(|| socket.recv(&mut buf).ok()).count()
    }

    /// The same for a UDP port: after the take-over the predecessor's socket receives nothing,
    /// so nothing is left in its queue to lose when it closes.
    #[test]
    fn an_adopting_udp_socket_takes_every_new_datagram() {
        let old = bind_socket(Protocol::Udp, "127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = old.local_addr().unwrap().as_socket().unwrap();
        let new = bind_socket(Protocol::Udp, addr, false).unwrap();
        // Each from its own client port, so the hash has 32 different flows to spread.
        let send = |n: usize| {
            for _ in 0..n {
                let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                c.send_to(b"x", addr).unwrap();
            }
        };
        send(32);
        assert_spread((received(&old), received(&new)), 32);
        take_new_connections(&new, ADOPTER_INDEX).unwrap();
        send(32);
        assert_eq!((received(&old), received(&new)), (0, 32));
    }
}
