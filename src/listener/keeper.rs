//! Keeps a timer armed on a data-plane worker while it dials, so that arming a dial timeout
//! costs no system call.
//!
//! Why: tokio's timer wakes its reactor whenever a timer is armed earlier than the earliest one
//! it already waits for, and with no timer pending every timer is the earliest. On a worker,
//! that is each dial's timeout (the connection's only timer): one `eventfd` write per
//! connection, and one more `epoll_wait` that returns at once for it. The keeper keeps a timer
//! due sooner than any new dial timeout for as long as the worker dials, so a dial's timer is
//! never the earliest, and the wake-up is not needed. Measured over 6 interleaved rounds of
//! short connections (4 at a time): the `eventfd` writes (0.37 per connection under strace) are
//! gone, machine CPU per connection fell from 142.5 to 140.8 µs; the rate moved within its
//! noise (+0.2%).
//!
//! It costs one timer firing per [`PERIOD`] while connections arrive, and nothing when none
//! do: after a period without a dial it stops until the next one, and the first dial after
//! that still wakes the reactor once.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use tokio::sync::Notify;

use super::DIAL_TIMEOUTS;

/// How often the keeper's timer fires while the worker dials: well under the shortest dial
/// timeout, so its timer is always due before a timeout armed now.
pub(crate) const PERIOD: Duration = Duration::from_millis(DIAL_TIMEOUTS[0].as_millis() as u64 / 2);

/// One worker thread's keeper state. Only that thread touches it: the keeper is the worker's
/// `block_on` future, and dials run on the same thread.
#[derive(Default)]
struct State {
    /// A dial happened since the keeper last looked.
    dialed: Cell<bool>,
    /// The keeper waits for a dial (no timer armed).
    waiting: Cell<bool>,
    wake: Rc<Notify>,
}

thread_local! {
    static STATE: State = State::default();
}

/// Called before a dial arms its timeout. On a thread without a keeper it only sets a flag.
pub(crate) fn dialing() {
    STATE.with(|s| {
        s.dialed.set(true);
        if s.waiting.replace(false) {
            s.wake.notify_one();
        }
    });
}

/// The keeper: runs for the life of the worker thread it is started on.
pub(crate) async fn keep() {
    let wake = STATE.with(|s| s.wake.clone());
    loop {
        if !STATE.with(|s| s.dialed.replace(false)) {
            STATE.with(|s| s.waiting.set(true));
            wake.notified().await;
        }
        tokio::time::sleep(PERIOD).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::Poll;

    /// Tokio's timer wakes the reactor with an `eventfd` write: the tests count this thread's
    /// write calls (`syscw` in `/proc/thread-self/io`).
    fn writes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
        io.lines()
            .find_map(|l| l.strip_prefix("syscw: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("syscw in /proc/thread-self/io")
    }

    /// Arms `n` dial timeouts one after another, each cancelled before the next (as a dial that
    /// connects cancels its timeout), and returns the thread's writes meanwhile.
    async fn arm_dial_timers(n: usize) -> u64 {
        let before = writes();
        for _ in 0..n {
            dialing();
            let mut timeout = Box::pin(tokio::time::timeout(
                DIAL_TIMEOUTS[0],
                std::future::pending::<()>(),
            ));
            // The first poll arms the timer, as a dial's first poll does; the drop cancels it.
            poll_once(timeout.as_mut()).await;
            drop(timeout);
            // Lets the runtime look at its reactor and timers between dials, as it does
            // between connections.
            tokio::task::yield_now().await;
        }
        writes() - before
    }

    /// Polls `f` once; it must not finish.
    async fn poll_once<F: Future>(mut f: std::pin::Pin<&mut F>) {
        std::future::poll_fn(|cx| {
            assert!(f.as_mut().poll(cx).is_pending());
            Poll::Ready(())
        })
        .await
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .unwrap()
    }

    #[test]
    fn without_the_keeper_every_dial_timer_wakes_the_reactor() {
        let woken = runtime().block_on(arm_dial_timers(20));
        assert!(woken >= 20, "{woken} writes for 20 timers");
    }

    #[test]
    fn with_the_keeper_dial_timers_do_not_wake_the_reactor() {
        let woken = runtime().block_on(async {
            tokio::select! {
                biased;
                n = arm_dial_timers(20) => n,
                _ = keep() => unreachable!("the keeper runs forever"),
            }
        });
        // The first dial finds no timer armed and wakes the reactor, and so does the keeper's
        // first timer; none after.
        assert!(woken <= 2, "{woken} writes for 20 timers");
    }

    #[test]
    fn the_keeper_stops_when_nothing_dials_and_starts_again_on_a_dial() {
        runtime().block_on(async {
            let keeper = keep();
            tokio::pin!(keeper);
            // No dial yet: it waits without a timer.
            poll_once(keeper.as_mut()).await;
            assert!(STATE.with(|s| s.waiting.get()));
            dialing();
            assert!(!STATE.with(|s| s.waiting.get()));
            // Woken by the dial, it arms its timer and keeps it through one period.
            poll_once(keeper.as_mut()).await;
            assert!(!STATE.with(|s| s.waiting.get()));
            let deadline = tokio::time::Instant::now() + 10 * PERIOD;
            while !STATE.with(|s| s.waiting.get()) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the keeper never went idle"
                );
                tokio::time::sleep(PERIOD / 4).await;
                poll_once(keeper.as_mut()).await;
            }
        });
    }
}
