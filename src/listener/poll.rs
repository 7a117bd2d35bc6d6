//! Polling before sleeping: a data-plane thread that runs out of work keeps asking its epoll
//! instance for more, for a short adaptive window, before it sleeps in `epoll_wait`.
//!
//! Why: on a VM whose guest halt polling is off (`guest_halt_poll_ns=0`, as on the 2-vCPU hosts
//! this is measured on), a vCPU with nothing to run halts at once, and waking it again costs a
//! halt exit and an inter-processor interrupt, about 25 µs. A proxied request has four
//! wake-ups, and the proxy's two are pure overhead the direct path does not pay: a proxy thread
//! that is still polling when the reply arrives takes it without either. Measured outside the
//! bench (bind portal, 5,000 requests a round, halt polling off): TCP p50 48 to 62 µs polling,
//! against 116 to 166 without and nginx's 106 to 152; UDP 42 to 65 against 71 to 155 and
//! nginx's 87 to 123. HAProxy has the same idea as `busy-polling`, which never sleeps at all.
//!
//! Bounded, so an idle proxy stays idle: the window is what the kernel's haltpoll governor does
//! for a guest's idle loop, moved into the proxy's own threads. It grows (doubling, from
//! [`START`]) while sleeps end within the configured limit (a longer poll would have caught
//! them), shrinks (halving, then off) when a sleep outlasts the limit, and stays when a poll
//! catches its event. Traffic that pauses for longer than the limit thus turns polling off
//! after a few gaps, and an idle proxy polls for at most the window after the last packet.
//! Each polling step also offers the CPU to any other runnable thread (`sched_yield`), so a
//! poll only ever takes time that would otherwise be idle on that CPU.
//!
//! Never on one CPU: a poll there would hold the CPU the awaited client or server must run on.
//! Nor while the node's CPUs are crowded, other tasks waiting for one ([`super::pressure`]):
//! there is no idle time then for a poll to fill.
//! The limit is `pollBeforeSleep` ([`set_limit`]; `0s` turns polling off).

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// The first window once polling turns on.
pub(crate) const START: Duration = Duration::from_micros(10);

/// How often a polling thread re-reads the CPUs it may run on.
pub(crate) const CPU_CHECK: Duration = Duration::from_millis(100);

/// The configured limit in nanoseconds; 0 while unset or off.
static LIMIT_NS: AtomicU64 = AtomicU64::new(0);

/// Sets the longest window for every data-plane thread (`pollBeforeSleep`); zero turns polling
/// off. Threads read it at each adjustment, so it applies from their next sleep.
pub fn set_limit(limit: Duration) {
    let ns = u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX);
    LIMIT_NS.store(ns, Ordering::Relaxed);
}

/// The longest window now.
pub(crate) fn limit() -> Duration {
    Duration::from_nanos(LIMIT_NS.load(Ordering::Relaxed))
}

/// What one thread's polls came to, for the metrics: each poll either caught work that a sleep
/// would have waited for, or ran out its window and slept. Written by that thread alone.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    caught: AtomicU64,
    missed: AtomicU64,
}

impl Counts {
    fn bump(c: &AtomicU64) {
        // One writer: a plain load and store, no locked instruction.
        c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    pub(crate) fn caught(&self) {
        Self::bump(&self.caught);
    }

    pub(crate) fn missed(&self) {
        Self::bump(&self.missed);
    }

    /// (caught, missed) so far.
    pub(crate) fn get(&self) -> (u64, u64) {
        (
            self.caught.load(Ordering::Relaxed),
            self.missed.load(Ordering::Relaxed),
        )
    }
}

/// One thread's polling window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Window(Duration);

impl Window {
    /// How long to poll before the next sleep; zero for not at all.
    pub(crate) fn get(self) -> Duration {
        self.0
    }

    /// Adjusts after a stretch without work that a poll of the current window did not catch:
    /// `idle` is its whole length, poll and sleep together.
    pub(crate) fn missed(&mut self, idle: Duration, limit: Duration) {
        self.0 = if limit.is_zero() {
            Duration::ZERO
        } else if idle <= limit {
            (self.0 * 2).max(START.min(limit)).min(limit)
        } else if self.0 / 2 < START.min(limit) {
            Duration::ZERO
        } else {
            self.0 / 2
        };
    }
}

/// Counts the CPUs this thread may run on, re-read at most every [`CPU_CHECK`] (one system
/// call): a mask set from outside (`taskset -ap`) reaches running threads too.
#[derive(Debug)]
pub(crate) struct Cpus {
    count: Option<usize>,
    next_check: Instant,
}

impl Cpus {
    pub(crate) fn new() -> Cpus {
        Cpus {
            count: cpus_now(),
            next_check: Instant::now() + CPU_CHECK,
        }
    }

    /// Re-reads the count if a check is due: the count just read, else `None`.
    pub(crate) fn due(&mut self, now: Instant) -> Option<usize> {
        if now < self.next_check {
            return None;
        }
        self.next_check = now + CPU_CHECK;
        let n = cpus_now()?;
        self.count = Some(n);
        Some(n)
    }

    /// Whether this thread may run on more than one CPU, as of the last check.
    pub(crate) fn many(&mut self, now: Instant) -> bool {
        self.due(now);
        self.count.is_none_or(|n| n > 1)
    }
}

/// How many CPUs the calling thread may run on now: its affinity mask, which `taskset` and a
/// cpuset cgroup set. Not the cgroup's CPU quota, which the UDP loops and TCP workers count when
/// they start: a quota throttles, but still lets two threads run at once on two CPUs, and what
/// parking a UDP loop or not polling avoids is two threads taking turns on one.
pub(crate) fn cpus_now() -> Option<usize> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
    Some(
        (0..nix::sched::CpuSet::count())
            .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
            .count(),
    )
}

/// Offers the CPU to any other thread that is ready to run on it.
pub(crate) fn step_aside() {
    // Cannot fail on Linux.
    let _ = nix::sched::sched_yield();
}

// --- The TCP workers: tokio current-thread runtimes ---
//
// tokio has no poll-before-park, but a task that yields makes its runtime check the reactor
// without blocking (`park_yield`, an `epoll_wait` with a zero timeout) before running it again.
// So each worker has one such task, the poller: woken after each real sleep (the runtime's
// unpark hook) when the window is open, it yields until the window has passed with no
// connection making progress, then waits for the next wake-up. The park and unpark hooks time
// the sleeps and adjust the window.

/// A worker thread's polling state.
struct Worker {
    window: Window,
    cpus: Cpus,
    /// When the last stretch without work began, if a poll spent it: the sleep that follows
    /// continues that stretch.
    idle_since: Option<Instant>,
    /// When the thread went to sleep.
    parked_at: Option<Instant>,
    /// The poller, while it waits for the next wake-up.
    poller: Option<Waker>,
    counts: Arc<Counts>,
    /// Whether the CPUs are crowded now ([`super::pressure::crowded`]; tests give their own).
    crowded: fn(Instant) -> bool,
}

thread_local! {
    static PROGRESS: Cell<u64> = const { Cell::new(0) };
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// Notes that a connection or accept loop on this thread did something: a poll running now
/// starts its window again. One thread-local increment.
#[inline]
pub(crate) fn progress() {
    PROGRESS.with(|p| p.set(p.get().wrapping_add(1)));
}

/// Builds a worker runtime whose sleeps are timed for the window. With polling off
/// (`pollBeforeSleep: 0s`) the hooks cost two clock reads a sleep.
pub(crate) fn worker_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .on_thread_park(|| {
            with_worker(|w| w.parked_at = Some(Instant::now()));
        })
        .on_thread_unpark(unparked)
        .build()
}

/// Runs a runtime from [`worker_runtime`] on the calling thread, for the life of the process,
/// with its poller, which counts into `counts`; it does not poll while the CPUs are crowded
/// ([`super::pressure`]).
pub(crate) fn run_worker(rt: tokio::runtime::Runtime, counts: Arc<Counts>) {
    run_worker_with(rt, counts, super::pressure::crowded);
}

/// [`run_worker`], with `crowded` saying whether the CPUs are crowded.
fn run_worker_with(rt: tokio::runtime::Runtime, counts: Arc<Counts>, crowded: fn(Instant) -> bool) {
    WORKER.with(|w| {
        *w.borrow_mut() = Some(Worker {
            window: Window::default(),
            cpus: Cpus::new(),
            idle_since: None,
            parked_at: None,
            poller: None,
            counts,
            crowded,
        })
    });
    // A spawned task, not the `block_on` future: waking that one writes the runtime's eventfd,
    // a system call on every poll, where a task's wake-up is a push onto the local queue.
    rt.spawn(poller());
    rt.block_on(std::future::pending::<()>());
}

fn with_worker<R>(f: impl FnOnce(&mut Worker) -> R) -> Option<R> {
    WORKER.with(|w| w.borrow_mut().as_mut().map(f))
}

/// After a sleep: adjusts the window by how long the stretch without work lasted, and sets the
/// poller going if the window is open.
fn unparked() {
    let now = Instant::now();
    let poller = with_worker(|w| {
        if let Some(parked) = w.parked_at.take() {
            let began = w.idle_since.take().unwrap_or(parked);
            w.window
                .missed(now.saturating_duration_since(began), limit());
        }
        if w.window.get().is_zero() || !w.cpus.many(now) || (w.crowded)(now) {
            return None;
        }
        w.poller.take()
    });
    if let Some(Some(waker)) = poller {
        waker.wake();
    }
}

/// The worker's poller: one task per worker runtime, for the runtime's life.
async fn poller() {
    loop {
        // Until [`unparked`] wakes it.
        let mut waiting = false;
        std::future::poll_fn(|cx| {
            if waiting {
                return Poll::Ready(());
            }
            waiting = true;
            with_worker(|w| w.poller = Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        let Some(window) = with_worker(|w| w.window.get()) else {
            return;
        };
        let mut seen = PROGRESS.with(Cell::get);
        let mut since = Instant::now();
        loop {
            tokio::task::yield_now().await;
            step_aside();
            let now = Instant::now();
            let p = PROGRESS.with(Cell::get);
            if p != seen {
                seen = p;
                since = now;
                with_worker(|w| w.counts.caught());
            } else if now.saturating_duration_since(since) >= window {
                with_worker(|w| {
                    w.idle_since = Some(since);
                    w.counts.missed();
                });
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::mpsc;

    const LIMIT: Duration = Duration::from_micros(100);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn short_sleeps_open_the_window_and_grow_it_to_the_limit() {
        let mut w = Window::default();
        assert_eq!(w.get(), Duration::ZERO);
        let mut seen = vec![];
        for _ in 0..6 {
            w.missed(us(60), LIMIT);
            seen.push(w.get());
        }
        assert_eq!(seen, [us(10), us(20), us(40), us(80), us(100), us(100)]);
    }

    #[test]
    fn long_sleeps_halve_it_and_then_turn_it_off() {
        let mut w = Window::default();
        for _ in 0..5 {
            w.missed(us(60), LIMIT);
        }
        let mut seen = vec![];
        for _ in 0..5 {
            w.missed(Duration::from_millis(5), LIMIT);
            seen.push(w.get());
        }
        assert_eq!(
            seen,
            [
                us(50),
                us(25),
                us(12) + Duration::from_nanos(500),
                Duration::ZERO,
                Duration::ZERO
            ]
        );
        // An idle thread whose window is off stays off.
        w.missed(Duration::from_secs(10), LIMIT);
        assert_eq!(w.get(), Duration::ZERO);
    }

    #[test]
    fn a_sleep_just_at_the_limit_still_counts_as_short() {
        let mut w = Window::default();
        w.missed(LIMIT, LIMIT);
        assert_eq!(w.get(), START);
        w.missed(LIMIT + Duration::from_nanos(1), LIMIT);
        assert_eq!(w.get(), Duration::ZERO);
    }

    #[test]
    fn a_limit_below_the_start_is_the_window() {
        let mut w = Window::default();
        w.missed(us(3), us(4));
        assert_eq!(w.get(), us(4));
        w.missed(us(3), us(4));
        assert_eq!(w.get(), us(4));
    }

    #[test]
    fn limit_zero_turns_polling_off_at_once() {
        let mut w = Window::default();
        for _ in 0..5 {
            w.missed(us(60), LIMIT);
        }
        w.missed(us(60), Duration::ZERO);
        assert_eq!(w.get(), Duration::ZERO);
    }

    /// A worker thread like the proxy's (optionally held to one CPU), its thread id and what
    /// its polls came to.
    fn worker(
        one_cpu: bool,
        crowded: fn(Instant) -> bool,
    ) -> (tokio::runtime::Handle, i32, Arc<Counts>) {
        let rt = worker_runtime().unwrap();
        let handle = rt.handle().clone();
        let counts = Arc::new(Counts::default());
        let theirs = counts.clone();
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("poll-test-worker".into())
            .spawn(move || {
                if one_cpu {
                    let mine =
                        nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
                    let first = (0..nix::sched::CpuSet::count())
                        .find(|&c| mine.is_set(c).unwrap())
                        .unwrap();
                    let mut set = nix::sched::CpuSet::new();
                    set.set(first).unwrap();
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
                }
                tx.send(nix::unistd::gettid().as_raw()).unwrap();
                run_worker_with(rt, theirs, crowded);
            })
            .unwrap();
        (handle, rx.recv().unwrap(), counts)
    }

    /// A field of the worker thread's `/proc` status.
    fn status_field(tid: i32, field: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        let line = text.lines().find(|l| l.starts_with(field)).unwrap();
        line[field.len() + 1..].trim().parse().unwrap()
    }

    /// The worker thread's user and system CPU time, in clock ticks.
    fn cpu_ticks(tid: i32) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after_comm.split(' ').collect();
        // Fields 14 and 15 of stat(5); `after_comm` starts at field 3.
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    /// Client -> relay on the worker -> echo server, all over loopback; returns the client's end.
    fn proxied_echo(worker: &tokio::runtime::Handle) -> std::net::TcpStream {
        let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut buf = [0u8; 100];
            while s.read_exact(&mut buf).is_ok() && s.write_all(&buf).is_ok() {}
        });
        let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let front_addr = front.local_addr().unwrap();
        front.set_nonblocking(true).unwrap();
        worker.spawn(async move {
            let front = tokio::net::TcpListener::from_std(front).unwrap();
            let (client, _) = front.accept().await.unwrap();
            let backend = tokio::net::TcpStream::connect(echo_addr).await.unwrap();
            let _ = crate::listener::splice::relay(&client, &backend).await;
        });
        let c = std::net::TcpStream::connect(front_addr).unwrap();
        c.set_nodelay(true).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c
    }

    /// How many times the worker slept per request over `n` requests.
    fn sleeps_per_request(c: &mut std::net::TcpStream, tid: i32, n: u32) -> f64 {
        let mut buf = [7u8; 100];
        for _ in 0..200 {
            c.write_all(&buf).unwrap();
            c.read_exact(&mut buf).unwrap();
        }
        let before = status_field(tid, "voluntary_ctxt_switches:");
        for _ in 0..n {
            c.write_all(&buf).unwrap();
            c.read_exact(&mut buf).unwrap();
        }
        (status_field(tid, "voluntary_ctxt_switches:") - before) as f64 / f64::from(n)
    }

    /// The poll catches replies and requests that a sleeping worker would have slept for
    /// (without it, two sleeps a request: for the reply and for the next request), and once the
    /// traffic stops the worker stops using the CPU.
    #[test]
    fn a_worker_polls_while_traffic_flows_and_stops_when_it_ends() {
        if cpus_now().unwrap_or(1) < 2 {
            eprintln!("SKIPPED: polling needs 2 CPUs; this process may use one");
            return;
        }
        set_limit(MAX_TEST_LIMIT);
        // CPUs never crowded: other tests load them meanwhile.
        let (rt, tid, counts) = worker(false, |_| false);
        let mut c = proxied_echo(&rt);
        let sleeps = sleeps_per_request(&mut c, tid, 3_000);
        assert!(sleeps < 1.0, "{sleeps} sleeps a request while polling");
        assert!(counts.get().0 > 0, "polls caught work: {:?}", counts.get());

        // Idle: within a bounded time, 300 ms pass with at most 2 ticks (20 ms) of CPU.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let t0 = cpu_ticks(tid);
            std::thread::sleep(Duration::from_millis(300));
            let used = cpu_ticks(tid) - t0;
            if used <= 2 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the idle worker still used {used} ticks in 300 ms"
            );
        }
    }

    /// A worker that may use one CPU only never polls: the CPU it would hold is the one the
    /// client or server it waits for needs. (Not told by its sleeps: on a CPU shared with other
    /// threads, a preempted worker often finds its reply waiting and does not sleep.)
    #[test]
    fn a_worker_on_one_cpu_never_polls() {
        assert_never_polls(true, |_| false);
    }

    /// Runs 3,000 requests through a worker made by [`worker`] and checks that no poll ran.
    fn assert_never_polls(one_cpu: bool, crowded: fn(Instant) -> bool) {
        set_limit(MAX_TEST_LIMIT);
        let (rt, tid, counts) = worker(one_cpu, crowded);
        let mut c = proxied_echo(&rt);
        sleeps_per_request(&mut c, tid, 3_000);
        assert_eq!(
            counts.get(),
            (0, 0),
            "neither caught nor missed: no poll ran"
        );
    }

    /// A worker whose CPUs are crowded never polls either, though it may use more than one: a
    /// poll would take time that the tasks waiting for a CPU want ([`super::super::pressure`]).
    #[test]
    fn a_worker_on_crowded_cpus_never_polls() {
        if cpus_now().unwrap_or(1) < 2 {
            eprintln!("SKIPPED: this process may use one CPU, where no worker polls anyway");
            return;
        }
        assert_never_polls(false, |_| true);
    }

    /// The longest window the config allows; tests use it so a loaded machine's slow replies
    /// still come within it.
    const MAX_TEST_LIMIT: Duration = Duration::from_millis(1);
}
