//! The data-plane threads: one event loop per CPU, each a current-thread tokio runtime on its
//! own thread, as nginx runs one worker process per CPU.
//!
//! Why not one multi-thread runtime: its workers share one epoll instance and steal each other's
//! tasks, so a connection's wake-ups alternate between threads, and each thread keeps its own
//! place on the CPUs. On a small VM where waking an idle vCPU costs about 25 µs, a request then
//! pays for whichever thread happens to hold the reactor. Here a socket is registered with one
//! worker and every wake-up for it runs on that worker's thread: the scheduler learns one thread
//! per connection, and a datagram or request never crosses threads inside the proxy.
//!
//! How work is spread: each service port has one socket, given to the workers in turn, and
//! the connections (or UDP sessions) it accepts are served by the same worker, with no hand-off.
//! Not one socket per worker in a `SO_REUSEPORT` group, which would spread one busy port over
//! every core: that multiplies the listening sockets by the CPU count, and 10,000 service ports
//! on 2 CPUs then need 20,000 descriptors, past the 20,000 `RLIMIT_NOFILE` these hosts allow
//! (measured: programming 10,000 ports went from 1 s to 190 s, waiting out `EMFILE`). A single
//! port is still served at 13.9 Gbit/s by one worker, since splice leaves the copying to the
//! kernel.
//!
//! The threads live as long as the process; each listener's tasks stop with its tokens.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::runtime::Handle;

/// The data-plane runtimes.
#[derive(Debug)]
pub(crate) struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

/// How many workers: one per CPU this process may run on (its affinity mask and cgroup quota,
/// as `std::thread::available_parallelism` reads them).
fn count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Workers {
    fn start(n: usize) -> Workers {
        let handles = (0..n.max(1))
            .map(|i| {
                // I/O and timers only: no signal or child-process driver, whose orphan reaping
                // would otherwise run on every park (seen in perf on the request path).
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                    .expect("data-plane runtime");
                let handle = rt.handle().clone();
                std::thread::Builder::new()
                    .name(format!("proxy-worker-{i}"))
                    .spawn(move || rt.block_on(std::future::pending::<()>()))
                    .expect("data-plane thread");
                handle
            })
            .collect();
        Workers {
            handles,
            next: AtomicUsize::new(0),
        }
    }

    /// The next worker in turn, for a listener that one worker serves.
    pub(crate) fn next(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.handles[i % self.handles.len()]
    }
}

/// The process's workers, started on first use.
pub(crate) fn workers() -> &'static Workers {
    static WORKERS: OnceLock<Workers> = OnceLock::new();
    WORKERS.get_or_init(|| Workers::start(count()))
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
        let turns: Vec<_> = (0..6).map(|_| thread_of(w.next())).collect();
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
        assert_eq!(thread_of(w.next()), "proxy-worker-0");
        assert_eq!(thread_of(w.next()), "proxy-worker-0");
    }
}
