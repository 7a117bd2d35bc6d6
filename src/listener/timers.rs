//! The data plane's timers: a thread of their own, so that the TCP workers' runtimes have no
//! timer driver.
//!
//! Why: a current-thread runtime with a timer driver reads the clock and looks at its timer
//! wheel every time it parks, whether a timer is armed or not, and a worker parks twice per
//! proxied request. Measured with callgrind over 10,000 requests of 100 bytes on one
//! connection: without it the worker runs 4,389 instructions per request, against 5,258.
//!
//! The workers' only timers are a dial's timeout and the accept loop's pause when descriptors
//! run out; both are armed on this thread's driver instead ([`sleep`], [`dial_timeout`]). A timer
//! that fires wakes the worker's task from here, which is rare (a dial that times out).
//!
//! Arming a timer on another thread's driver wakes that thread whenever the new timer is due
//! earlier than any it already waits for, and with none pending every timer is the earliest:
//! that would be one wake-up of this thread per connection. So while dials happen, a keeper
//! here keeps a timer due sooner than any new dial timeout ([`PERIOD`]), and a dial's timer is
//! never the earliest. After a period without a dial the keeper stops, and the thread sleeps
//! until the next dial, which wakes it once. (The keeper first lived on each worker, for its own
//! timer driver: measured over 6 rounds of short connections, it took away 0.37 `eventfd`
//! writes per connection.)

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::time::Sleep;

use super::DIAL_TIMEOUTS;

/// How often the keeper's timer fires while connections are dialled: well under the shortest
/// dial timeout, so its timer is always due before a timeout armed now.
pub(crate) const PERIOD: Duration = Duration::from_millis(DIAL_TIMEOUTS[0].as_millis() as u64 / 2);

/// What the dials and the keeper share.
struct Keeper {
    /// A dial happened since the keeper last looked.
    dialed: AtomicBool,
    /// The keeper waits for a dial (no timer of its own armed).
    waiting: AtomicBool,
    wake: Notify,
}

static KEEPER: Keeper = Keeper {
    dialed: AtomicBool::new(false),
    waiting: AtomicBool::new(false),
    wake: Notify::const_new(),
};

/// The timer thread's runtime, started on first use.
fn handle() -> &'static Handle {
    static HANDLE: OnceLock<Handle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        // With an I/O driver, a wake-up of this thread is an `eventfd` write by the thread that
        // arms the timer, which the tests can count (a bare timer driver parks on a futex).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .expect("timer runtime");
        let handle = rt.handle().clone();
        std::thread::Builder::new()
            .name("proxy-timers".into())
            .spawn(move || rt.block_on(keep(&KEEPER)))
            .expect("timer thread");
        handle
    })
}

/// A sleep on the timer thread's driver, to be awaited anywhere.
pub(crate) fn sleep(d: Duration) -> Sleep {
    let _on_timers = handle().enter();
    tokio::time::sleep(d)
}

/// Runs a dial, `fut`, for at most `d`: `None` if the time ran out first. It keeps the keeper
/// going.
pub(crate) async fn dial_timeout<F: Future>(d: Duration, fut: F) -> Option<F::Output> {
    dialing(&KEEPER);
    let timer = sleep(d);
    tokio::select! {
        biased;
        out = fut => Some(out),
        _ = timer => None,
    }
}

/// Tells the keeper a dial is about to arm its timeout; wakes it if it was waiting for one.
fn dialing(k: &Keeper) {
    k.dialed.store(true, Ordering::SeqCst);
    if k.waiting.load(Ordering::SeqCst) && k.waiting.swap(false, Ordering::SeqCst) {
        k.wake.notify_one();
    }
}

/// The keeper: runs for the life of the timer thread.
async fn keep(k: &Keeper) {
    loop {
        if !k.dialed.swap(false, Ordering::SeqCst) {
            k.waiting.store(true, Ordering::SeqCst);
            // A dial between the swap and the store did not see `waiting`: look once more.
            // (A dial that did see it leaves a permit, so the wait below cannot miss it.)
            if k.dialed.swap(false, Ordering::SeqCst) {
                k.waiting.store(false, Ordering::SeqCst);
            } else {
                k.wake.notified().await;
            }
        }
        tokio::time::sleep(PERIOD).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;

    /// Arming a timer that wakes the timer thread is an `eventfd` write by the arming thread:
    /// the tests count this thread's write calls (`syscw` in `/proc/thread-self/io`).
    fn writes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
        io.lines()
            .find_map(|l| l.strip_prefix("syscw: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("syscw in /proc/thread-self/io")
    }

    /// A timer runtime on a thread of its own, as [`handle`] starts, with its own keeper (or
    /// none): its handle and the thread's id.
    fn timer_thread(keeper: Option<&'static Keeper>) -> (Handle, i32) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .unwrap();
        let handle = rt.handle().clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // `/proc/thread-self` links to `<pid>/task/<tid>`.
            let me = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
            let tid = me.file_name().and_then(|t| t.to_str()?.parse().ok());
            tx.send(tid.expect("a thread id")).unwrap();
            rt.block_on(async move {
                match keeper {
                    Some(k) => keep(k).await,
                    None => std::future::pending().await,
                }
            })
        });
        (handle, rx.recv().unwrap())
    }

    /// How many times thread `tid` of this process has gone to sleep.
    fn sleeps(tid: i32) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).expect("task status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("voluntary_ctxt_switches in the task's status")
    }

    /// When the dial timers of [`arm_dial_timers`] are due.
    #[derive(Clone, Copy)]
    enum Due {
        /// A dial's first timeout from now, as in [`dial_timeout`].
        AsDialed,
        /// Each 1 ms before the one armed before it, so that each is the earliest the timer
        /// thread has. (Due as dialled, a timer may not be: on a loaded machine the timer
        /// thread, woken by one, can park again before that one is cancelled, and then waits
        /// for it; the next, due later, does not wake it. CI saw 2 writes for 20 timers.)
        EachEarliest,
    }

    /// Arms `n` dial timeouts on the timer thread `(timers, tid)` from this thread, one after
    /// another, each cancelled before the next (as a dial that connects cancels its timeout);
    /// returns this thread's writes meanwhile. With a keeper, the first dial wakes it, and the
    /// next ones wait until the timer thread has slept again: by then the keeper's timer is
    /// armed, as it is for the connections that follow the first.
    fn arm_dial_timers(timers: &(Handle, i32), keeper: Option<&Keeper>, due: Due, n: usize) -> u64 {
        let worker = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        worker.block_on(async {
            // The last of the dial timeouts, so that the earliest of `n` is still ahead.
            let base = tokio::time::Instant::now() + DIAL_TIMEOUTS[3];
            let before = writes();
            for i in 0..n {
                let slept = sleeps(timers.1);
                if let Some(k) = keeper {
                    dialing(k);
                }
                let mut timer = Box::pin({
                    let _on_timers = timers.0.enter();
                    match due {
                        Due::AsDialed => tokio::time::sleep(DIAL_TIMEOUTS[0]),
                        Due::EachEarliest => {
                            tokio::time::sleep_until(base - Duration::from_millis(i as u64))
                        }
                    }
                });
                // The first poll arms the timer, as a dial's first poll does; the drop cancels it.
                std::future::poll_fn(|cx| {
                    assert!(timer.as_mut().poll(cx).is_pending());
                    Poll::Ready(())
                })
                .await;
                drop(timer);
                if keeper.is_some() && i == 0 {
                    let deadline = std::time::Instant::now() + Duration::from_secs(5);
                    while sleeps(timers.1) == slept {
                        assert!(
                            std::time::Instant::now() < deadline,
                            "the timer thread never slept again after the first dial"
                        );
                        std::thread::yield_now();
                    }
                }
            }
            writes() - before
        })
    }

    #[test]
    fn without_the_keeper_every_earliest_timer_wakes_the_timer_thread() {
        // With no dial pending, a dial's timer is the earliest: this is what each dial would
        // cost, and what the count below sees.
        let woken = arm_dial_timers(&timer_thread(None), None, Due::EachEarliest, 20);
        assert!(woken >= 20, "{woken} writes for 20 timers");
    }

    #[test]
    fn with_the_keeper_dial_timers_do_not_wake_the_timer_thread() {
        static K: Keeper = Keeper {
            dialed: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
            wake: Notify::const_new(),
        };
        let woken = arm_dial_timers(&timer_thread(Some(&K)), Some(&K), Due::AsDialed, 20);
        // The first dial finds the keeper waiting and wakes it, and its timer is the earliest;
        // none after.
        assert!(woken <= 2, "{woken} writes for 20 timers");
    }

    #[test]
    fn the_keeper_stops_when_nothing_dials_and_starts_again_on_a_dial() {
        static K: Keeper = Keeper {
            dialed: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
            wake: Notify::const_new(),
        };
        let wait_for = |waiting: bool| {
            let deadline = std::time::Instant::now() + 20 * PERIOD;
            while K.waiting.load(Ordering::SeqCst) != waiting {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the keeper never got to waiting={waiting}"
                );
                std::thread::sleep(PERIOD / 10);
            }
        };
        let _timers = timer_thread(Some(&K));
        // No dial yet: it waits without a timer.
        wait_for(true);
        dialing(&K);
        assert!(!K.waiting.load(Ordering::SeqCst));
        // Woken by the dial, it keeps its timer through a period, then waits again.
        wait_for(true);
    }

    #[test]
    fn dial_timeout_gives_the_output_or_none_and_fires_from_the_timer_thread() {
        // A worker-like runtime without a timer driver of its own.
        let worker = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        worker.block_on(async {
            assert_eq!(
                dial_timeout(Duration::from_secs(5), async { 7 }).await,
                Some(7)
            );
            let pending = std::future::pending::<()>();
            assert_eq!(dial_timeout(Duration::from_millis(20), pending).await, None);
            sleep(Duration::from_millis(1)).await;
        });
    }
}
