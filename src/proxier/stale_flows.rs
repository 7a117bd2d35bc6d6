//! Clearing the flows tracked before their portals existed ([`super::rules::conntrack`]), off
//! the sync loop.
//!
//! Why off the loop: each run of `conntrack` walks the whole table in the kernel, 60 to 150 ms
//! on a node that tracks tens of thousands of flows, and on the loop it delayed whatever change
//! came next. From the API a service's endpoints arrive just after the service: measured with
//! the clearing on the loop, one more service answered in 158 ms with 1,000 present (10 ms
//! without it), and 10,000 ports took 2.10 s to program instead of 1.68.
//!
//! One clearing runs at a time, on a blocking thread; addresses that arrive meanwhile wait and
//! go into the next run together, so a burst of changes costs a few walks, not one each. A
//! clearing starts [`DELAY`] after the rules that call for it: off the loop, the walk still took
//! CPU from the endpoint sync that follows a service from the API (one more service at 10,000
//! answered in 86.5 ms, against 64.6 before clearing existed), and a client stuck on a stale
//! entry retransmits its SYN 1 s after the first, so a quarter of a second costs it nothing.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::rules::conntrack::{self, Dialled};

/// Whether a failure to clear was logged as a warning: a node without the `conntrack` tool
/// would otherwise say it at every change.
static WARNED: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Default)]
struct State {
    pending: BTreeSet<Dialled>,
    running: bool,
}

/// How long a clearing waits after the rules that call for it.
pub const DELAY: std::time::Duration = std::time::Duration::from_millis(250);

/// What clears one batch: [`conntrack::forget_unnatted`], or a stand-in in tests.
type Forget = fn(&BTreeSet<Dialled>) -> super::rules::Result<Option<usize>>;

/// The clearer: hand it addresses whose rules are written.
#[derive(Debug)]
pub struct StaleFlows {
    state: Arc<Mutex<State>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    forget: Forget,
}

impl StaleFlows {
    /// Runs clearings on `tracker`; none starts after `cancel`.
    pub fn new(tracker: TaskTracker, cancel: CancellationToken) -> Self {
        Self {
            state: Arc::default(),
            tracker,
            cancel,
            forget: conntrack::forget_unnatted,
        }
    }

    /// Clears the flows to `dialled` that carry no NAT, soon; their rules must be in already.
    /// Needs a tokio runtime.
    pub fn clear(&self, dialled: BTreeSet<Dialled>) {
        if dialled.is_empty() {
            return;
        }
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.pending.extend(dialled);
            if st.running {
                return;
            }
            st.running = true;
        }
        let (state, cancel, forget) = (self.state.clone(), self.cancel.clone(), self.forget);
        self.tracker.spawn_blocking(move || {
            std::thread::sleep(DELAY);
            run(&state, &cancel, forget)
        });
    }

    /// Whether a clearing is running or waiting (for tests).
    #[cfg(test)]
    fn busy(&self) -> bool {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.running || !st.pending.is_empty()
    }
}

/// Clears batch after batch until nothing is pending (or `cancel`).
fn run<F>(state: &Mutex<State>, cancel: &CancellationToken, forget: F)
where
    F: Fn(&BTreeSet<Dialled>) -> super::rules::Result<Option<usize>>,
{
    loop {
        let batch = {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            if st.pending.is_empty() || cancel.is_cancelled() {
                st.running = false;
                return;
            }
            std::mem::take(&mut st.pending)
        };
        match forget(&batch) {
            Ok(stale) => {
                debug!(
                    addresses = batch.len(),
                    ?stale,
                    "cleared flows tracked before their portals"
                )
            }
            Err(e) if !WARNED.swap(true, Ordering::Relaxed) => {
                warn!(error = %e, "cannot clear flows tracked before their portals; a client that dialled a service before it was programmed may wait until its conntrack entry expires")
            }
            Err(e) => debug!(error = %e, "cannot clear flows tracked before their portals"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
    use std::net::Ipv4Addr;

    fn d(port: u16) -> Dialled {
        Dialled {
            protocol: Protocol::Tcp,
            ip: Ipv4Addr::new(10, 96, 0, 1),
            port,
        }
    }

    /// Addresses that arrive while a clearing runs go into the next one, together.
    #[test]
    fn what_arrives_during_a_run_goes_into_the_next_batch() {
        let state = Mutex::new(State {
            pending: [d(1)].into(),
            running: true,
        });
        let batches = Mutex::new(Vec::new());
        run(&state, &CancellationToken::new(), |batch| {
            let mut b = batches.lock().unwrap();
            if b.is_empty() {
                // Two more changes land while the first walk runs.
                let mut st = state.lock().unwrap();
                st.pending.extend([d(2), d(3)]);
            }
            b.push(batch.clone());
            Ok(None)
        });
        assert_eq!(
            *batches.lock().unwrap(),
            vec![BTreeSet::from([d(1)]), BTreeSet::from([d(2), d(3)])]
        );
        assert!(!state.lock().unwrap().running);
    }

    #[test]
    fn a_cancelled_clearer_stops_and_can_start_again() {
        let state = Mutex::new(State {
            pending: [d(1)].into(),
            running: true,
        });
        let cancel = CancellationToken::new();
        cancel.cancel();
        run(&state, &cancel, |_| panic!("ran after cancel"));
        let st = state.lock().unwrap();
        assert!(!st.running);
        assert_eq!(st.pending.len(), 1);
    }

    #[test]
    fn clear_spawns_one_run_and_finishes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let tracker = TaskTracker::new();
            // Not the real tool: this test runs in the machine's own namespace.
            let s = StaleFlows {
                forget: |batch| {
                    assert_eq!(*batch, BTreeSet::from([d(9)]));
                    Ok(Some(0))
                },
                ..StaleFlows::new(tracker.clone(), CancellationToken::new())
            };
            s.clear(BTreeSet::new());
            assert!(!s.busy(), "nothing to clear, nothing spawned");
            s.clear([d(9)].into());
            tracker.close();
            tracker.wait().await;
            assert!(!s.busy());
        });
    }
}
