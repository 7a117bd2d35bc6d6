//! The data-plane threads: one event loop per CPU, each a current-thread tokio runtime on its
//! own thread, as nginx runs one worker process per CPU.
//!
//! Why not one multi-thread runtime: its workers share one epoll instance and steal each other's
//! tasks, so a connection's wake-ups alternate between threads, and each thread keeps its own
//! place on the CPUs. On a small VM where waking an idle vCPU costs about 25 µs, a request then
//! pays for whichever thread happens to hold the reactor. Here a socket is registered with one
//! worker and every wake-up for it runs on that worker's thread: the scheduler learns one thread
//! per connection, and a TCP request never crosses threads inside the proxy.
//!
//! These threads carry TCP only; UDP has loops of its own ([`super::udp_loops`]).
//!
//! How work is spread: each service port has one socket, given to the workers in turn, and a
//! port that turns busy is then accepted by every worker, each woken alone for a new
//! connection ([`super::exclusive`]). A TCP connection is served by the worker that accepted it
//! unless that worker already serves [`SLACK`] or more connections than the least loaded one;
//! then it is handed to that one (as HAProxy's threads pass accepted connections to the least
//! loaded thread). So a lone request/response connection never crosses threads, and one busy
//! port spreads over every core.
//!
//! Not one socket per worker in a `SO_REUSEPORT` group, which would spread a port in the
//! kernel: that multiplies the listening sockets by the CPU count, and 10,000 service ports on
//! 2 CPUs then need 20,000 descriptors, past the 20,000 `RLIMIT_NOFILE` these hosts allow
//! (measured: programming 10,000 ports went from 1 s to 190 s, waiting out `EMFILE`). Busy
//! ports shared between workers hold such extra descriptors too, within a budget.
//!
//! The threads live as long as the process; each listener's tasks stop with its tokens. Their
//! runtimes have no timer driver: the few timers their tasks need are on a thread of their own
//! ([`super::timers`], which says why).

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use nix::sys::epoll::Epoll;
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tracing::warn;

use super::exclusive;
use super::keepalive::Pending;
use super::poll;

/// How many more connections the accepting worker may serve than the least loaded one before
/// a new connection is handed over. A hand-off costs waking the other thread and moving the
/// socket between reactors (2 `epoll_ctl`): with a slack of 2, 4 concurrent short connections
/// on 2 CPUs were handed back and forth, and cost 0.062 s of CPU per 1,000 connections instead
/// of 0.056 (11,900 conn/s instead of 12,400). A worker that cannot keep up accumulates
/// connections, so a larger slack still spreads a saturated port.
pub(crate) const SLACK: usize = 8;

/// One data-plane runtime and the TCP connections it serves now.
#[derive(Debug)]
struct Worker {
    handle: Handle,
    /// What its polls before sleeping came to.
    polls: Arc<poll::Counts>,
    /// Its backend connections awaiting keepalive.
    keepalive: Pending,
    connections: AtomicUsize,
    /// Connections other workers accepted and handed to this one.
    taken: AtomicU64,
    /// Its runtime's epoll instance ([`super::exclusive`]), found at start when there is more
    /// than one worker; `None` if it could not be found.
    reactor: Option<Epoll>,
}

/// What the metrics show of one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerStatus {
    /// TCP connections it serves now.
    pub connections: usize,
    /// Connections handed to it by busier workers, since start.
    pub taken: u64,
    /// Polls before sleeping that caught work, since start ([`super::poll`]).
    pub polls_caught: u64,
    /// Polls that ran out their window and slept.
    pub polls_missed: u64,
}

/// The data-plane runtimes.
#[derive(Debug)]
pub(crate) struct Workers {
    workers: Vec<Worker>,
    next: AtomicUsize,
}

/// How many workers: one per CPU this process may run on (its affinity mask and cgroup quota,
/// as `std::thread::available_parallelism` reads them).
fn count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Which worker serves a connection accepted by `home`, given each worker's connections: `home`
/// unless it serves `SLACK` or more than the least loaded (the first of equals), which then
/// does. Takes the loads as they are read, so a connection's placement allocates nothing.
pub(crate) fn place(home: usize, loads: impl IntoIterator<Item = usize>) -> usize {
    let mut at_home = None;
    let mut least: Option<(usize, usize)> = None;
    for (i, load) in loads.into_iter().enumerate() {
        if i == home {
            at_home = Some(load);
        }
        if least.is_none_or(|(_, min)| load < min) {
            least = Some((i, load));
        }
    }
    match (at_home, least) {
        (Some(h), Some((i, min))) if h >= min + SLACK => i,
        _ => home,
    }
}

/// A connection counted against its worker until dropped.
#[derive(Debug)]
pub(crate) struct Load {
    worker: &'static Worker,
}

impl Load {
    /// Switches keepalive on for a backend connection of this worker's once it has lasted
    /// ([`super::keepalive`]).
    pub(crate) fn keepalive_later(&self, backend: &Arc<TcpStream>) {
        self.worker.keepalive.add(backend, &self.worker.handle);
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.worker.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Worker `i`'s epoll instance, or `None` (logged): its ports are then accepted by it alone.
/// Found while the process has few descriptors, since finding it reads every one.
fn find_reactor(i: usize, handle: &Handle) -> Option<Epoll> {
    exclusive::reactor_of(handle)
        .inspect_err(|e| {
            warn!(worker = i, error = %e, "cannot reach the worker's epoll instance: each TCP port is accepted by one event loop");
        })
        .ok()
}

impl Workers {
    fn start(n: usize) -> Workers {
        let workers = (0..n.max(1))
            .map(|i| {
                // I/O only. No timer driver, which reads the clock on every park
                // ([`super::timers`]). tokio still layers its signal driver over the I/O
                // driver (the crate has the `signal` feature); on a park without a signal that
                // is one flag check, 0.9% of a request's instructions in callgrind.
                //
                // Each polls for a while before it sleeps ([`super::poll`]), unless it is the
                // only one: a process on one CPU must not hold it.
                let rt = poll::worker_runtime().expect("data-plane runtime");
                let handle = rt.handle().clone();
                let reactor = (n > 1).then(|| find_reactor(i, &handle)).flatten();
                let polls = Arc::new(poll::Counts::default());
                let counts = polls.clone();
                std::thread::Builder::new()
                    .name(format!("proxy-worker-{i}"))
                    .spawn(move || {
                        if n > 1 {
                            poll::run_worker(rt, counts);
                        } else {
                            rt.block_on(std::future::pending::<()>());
                        }
                    })
                    .expect("data-plane thread");
                Worker {
                    handle,
                    polls,
                    keepalive: Pending::default(),
                    connections: AtomicUsize::new(0),
                    taken: AtomicU64::new(0),
                    reactor,
                }
            })
            .collect();
        Workers {
            workers,
            next: AtomicUsize::new(0),
        }
    }

    /// The next worker in turn (its index and runtime), for a new listener.
    pub(crate) fn next(&self) -> (usize, &Handle) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        (i, &self.workers[i].handle)
    }

    /// How many workers there are.
    pub(crate) fn len(&self) -> usize {
        self.workers.len()
    }

    /// Worker `i`'s runtime.
    pub(crate) fn handle(&self, i: usize) -> &Handle {
        &self.workers[i].handle
    }

    /// Whether every worker's reactor was found, so that a port can be accepted by all of them
    /// ([`super::exclusive`]).
    pub(crate) fn can_share(&self) -> bool {
        self.workers.len() > 1 && self.workers.iter().all(|w| w.reactor.is_some())
    }

    /// Makes `fd`'s registration with worker `i`'s reactor exclusive ([`super::exclusive`]).
    pub(crate) fn make_exclusive(&self, i: usize, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        match &self.workers[i].reactor {
            Some(epoll) => exclusive::make_exclusive(epoll, fd),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "the worker's epoll instance is not known",
            )),
        }
    }

    /// Where a connection accepted by worker `home` is served ([`place`]): `None` for `home`
    /// itself, else the runtime to hand it to. It counts there until the [`Load`] is dropped.
    pub(crate) fn assign(&'static self, home: usize) -> (Option<&'static Handle>, Load) {
        let loads = self
            .workers
            .iter()
            .map(|w| w.connections.load(Ordering::Relaxed));
        let at = place(home, loads);
        let worker = &self.workers[at];
        worker.connections.fetch_add(1, Ordering::Relaxed);
        let elsewhere = (at != home).then(|| {
            worker.taken.fetch_add(1, Ordering::Relaxed);
            &worker.handle
        });
        (elsewhere, Load { worker })
    }

    fn status(&self) -> Vec<WorkerStatus> {
        self.workers
            .iter()
            .map(|w| {
                let (polls_caught, polls_missed) = w.polls.get();
                WorkerStatus {
                    connections: w.connections.load(Ordering::Relaxed),
                    taken: w.taken.load(Ordering::Relaxed),
                    polls_caught,
                    polls_missed,
                }
            })
            .collect()
    }
}

static WORKERS: OnceLock<Workers> = OnceLock::new();

/// The process's workers, started on first use.
pub(crate) fn workers() -> &'static Workers {
    WORKERS.get_or_init(|| Workers::start(count()))
}

/// Each worker's load, for the metrics; empty until a listener has started them (reading does
/// not start them).
pub fn status() -> Vec<WorkerStatus> {
    WORKERS.get().map(Workers::status).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name of the thread `h` runs its tasks on.
    fn thread_of(h: &Handle) -> String {
        let (tx, rx) = std::sync::mpsc::channel();
        h.spawn(async move {
            tx.send(std::thread::current().name().unwrap_or("").to_string())
                .ok();
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("worker ran the task")
    }

    #[test]
    fn listeners_go_round_the_workers() {
        let w = Workers::start(3);
        let turns: Vec<_> = (0..6).map(|_| thread_of(w.next().1)).collect();
        assert_eq!(
            turns,
            [
                "proxy-worker-0",
                "proxy-worker-1",
                "proxy-worker-2",
                "proxy-worker-0",
                "proxy-worker-1",
                "proxy-worker-2"
            ]
        );
    }

    #[test]
    fn there_is_always_a_worker() {
        let w = Workers::start(0);
        assert_eq!(thread_of(w.next().1), "proxy-worker-0");
        assert_eq!(thread_of(w.next().1), "proxy-worker-0");
    }

    #[test]
    fn a_connection_stays_home_unless_home_is_busier_by_the_slack() {
        assert_eq!(place(0, [0, 0]), 0);
        assert_eq!(place(1, [0, 0]), 1);
        assert_eq!(place(0, [SLACK - 1, 0]), 0);
        assert_eq!(place(0, [SLACK, 0]), 1);
        assert_eq!(place(0, [SLACK, 1]), 0);
        // To the least loaded, the first of equals.
        assert_eq!(place(2, [3, 1, SLACK + 1, 1]), 1);
        assert_eq!(place(0, [0usize; 0]), 0);
        assert_eq!(place(0, [7]), 0);
    }

    /// Connections accepted by one worker spread until the loads are within the slack, and a
    /// finished connection stops counting.
    #[test]
    fn assigned_connections_spread_and_are_released() {
        let w: &'static Workers = Box::leak(Box::new(Workers::start(2)));
        let n = 3 * SLACK;
        let held: Vec<(Option<&Handle>, Load)> = (0..n).map(|_| w.assign(0)).collect();
        let loads: Vec<usize> = w
            .workers
            .iter()
            .map(|x| x.connections.load(Ordering::Relaxed))
            .collect();
        assert_eq!(loads.iter().sum::<usize>(), n);
        assert!(loads[0].abs_diff(loads[1]) <= SLACK, "{loads:?}");
        let handed: Vec<String> = held.iter().filter_map(|(h, _)| h.map(thread_of)).collect();
        assert!(!handed.is_empty());
        let status = w.status();
        assert_eq!(status[0].taken, 0);
        assert_eq!(status[1].taken, handed.len() as u64);
        assert_eq!(status[1].connections, loads[1]);
        assert!(handed.iter().all(|t| t == "proxy-worker-1"), "{handed:?}");
        drop(held);
        assert!(w
            .workers
            .iter()
            .all(|x| x.connections.load(Ordering::Relaxed) == 0));
    }
}
