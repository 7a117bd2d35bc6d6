//! Portal rules written while a large sync is still opening listeners.
//!
//! Why: a sync that opens 10,000 service ports spends about 0.4 s opening listeners and then
//! about 1 s in `iptables-restore`, most of it in the kernel; one after the other, the last
//! service answers only after both. Here the backend runs on a thread of its own while the
//! listeners open: each write covers every port opened so far, and after the first the
//! backends' incremental paths write only what the previous write did not have. The writes
//! overlap the opening (the restore's kernel work runs on the other core), and what is left
//! when the last listener is open is the ports opened during the last write.
//!
//! Every snapshot is a state the node may be in: the ports that were there before the sync plus
//! some of the new ones, each pointing at a listener that is already open. The proxier writes the
//! complete state after the whole sync as always, so a write that fails here only delays the
//! ports it carried.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::{Scope, ScopedJoinHandle};

use tracing::debug;

use super::rules::{Backend, NodeAddrs, Portal, Result};

/// Opens to wait for before the first write, and between two writes: fewer would spend more on
/// starting `iptables-restore` (and on its reading of the rules already there) than they save.
pub const BATCH: usize = 256;

/// What writes a snapshot of the portals: the backend, or a recorder in tests.
pub trait Writer: Send {
    /// Makes the node's portals `portals` (see [`Backend::sync`]).
    ///
    /// # Errors
    /// The write failed.
    fn write(&mut self, portals: &[Portal], node: &NodeAddrs) -> Result<bool>;
}

impl Writer for Backend {
    fn write(&mut self, portals: &[Portal], node: &NodeAddrs) -> Result<bool> {
        self.sync(portals, node)
    }
}

/// The writer thread, as seen from the loop that opens listeners.
pub struct EarlyRules<'scope> {
    send: mpsc::Sender<Vec<Portal>>,
    busy: Arc<AtomicBool>,
    opened: usize,
    handle: ScopedJoinHandle<'scope, usize>,
}

impl<'scope> EarlyRules<'scope> {
    /// Starts the writer on `scope`, writing with `writer` for `node`.
    pub fn start<'env, W: Writer>(
        scope: &'scope Scope<'scope, 'env>,
        writer: &'scope mut W,
        node: &'scope NodeAddrs,
    ) -> Self {
        let (send, recv) = mpsc::channel::<Vec<Portal>>();
        let busy = Arc::new(AtomicBool::new(false));
        let flag = busy.clone();
        let handle = scope.spawn(move || {
            let mut writes = 0;
            let mut failed = false;
            for portals in recv {
                // After a failure the backend rewrites everything at its next write; leave that
                // to the sync's own write, once every port is open.
                if !failed {
                    match writer.write(&portals, node) {
                        Ok(_) => writes += 1,
                        Err(e) => {
                            debug!(error = %e, portals = portals.len(), "early portal write failed; the sync writes them all at its end");
                            failed = true;
                        }
                    }
                }
                flag.store(false, Ordering::Release);
            }
            writes
        });
        Self {
            send,
            busy,
            opened: 0,
            handle,
        }
    }

    /// Counts one more open listener. When [`BATCH`] have opened since the last write was
    /// handed over and the writer is idle, hands it `snapshot()`: every portal open now.
    pub fn opened(&mut self, snapshot: impl FnOnce() -> Vec<Portal>) {
        self.opened += 1;
        if self.opened < BATCH || self.busy.load(Ordering::Acquire) {
            return;
        }
        self.busy.store(true, Ordering::Release);
        if self.send.send(snapshot()).is_ok() {
            self.opened = 0;
        } else {
            self.busy.store(false, Ordering::Release);
        }
    }

    /// Waits for the write in progress; returns how many writes succeeded.
    pub fn finish(self) -> usize {
        let Self { send, handle, .. } = self;
        drop(send);
        // A panic on the writer thread is the backend's bug: re-raise it here.
        handle
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServicePort};
    use std::time::{Duration, Instant};

    /// Writes only when the test lets it (one message on `gate` per write), then reports the
    /// snapshot's proxy ports on `done`; write number `fail_at` (from 0) fails instead.
    struct Recorder {
        gate: mpsc::Receiver<()>,
        done: mpsc::Sender<Result<Vec<u16>, ()>>,
        writes: usize,
        fail_at: Option<usize>,
    }

    impl Writer for Recorder {
        fn write(&mut self, portals: &[Portal], _: &NodeAddrs) -> Result<bool> {
            self.gate.recv().expect("the test lets each write through");
            let n = self.writes;
            self.writes += 1;
            if self.fail_at == Some(n) {
                let _ = self.done.send(Err(()));
                return Err(super::super::rules::Error::Command {
                    program: "test".into(),
                    code: Some(1),
                    stderr: "refused".into(),
                });
            }
            let _ = self
                .done
                .send(Ok(portals.iter().map(|p| p.proxy_port).collect()));
            Ok(true)
        }
    }

    fn portal(port: u16) -> Portal {
        Portal {
            service: Arc::new(ServicePort::plain(
                "default",
                &format!("s{port}"),
                Protocol::Tcp,
                "10.96.0.10",
                80,
            )),
            proxy_port: port,
        }
    }

    fn node() -> NodeAddrs {
        NodeAddrs {
            host_ip: None,
            local: vec![],
        }
    }

    /// Waits (bounded) until the writer has marked itself idle after a write.
    fn until_idle(early: &EarlyRules<'_>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while early.busy.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the writer never went idle");
            std::thread::yield_now();
        }
    }

    /// Runs `script` against a writer that fails at write `fail_at`; returns what `finish` said
    /// and how many writes the writer was asked for.
    fn with_writer(
        fail_at: Option<usize>,
        script: impl FnOnce(
            &mut EarlyRules<'_>,
            &mpsc::Sender<()>,
            &mpsc::Receiver<Result<Vec<u16>, ()>>,
        ),
    ) -> (usize, usize) {
        let (let_through, gate) = mpsc::channel();
        let (done, written) = mpsc::channel();
        let mut rec = Recorder {
            gate,
            done,
            writes: 0,
            fail_at,
        };
        let node = node();
        let ok = std::thread::scope(|s| {
            let mut early = EarlyRules::start(s, &mut rec, &node);
            script(&mut early, &let_through, &written);
            // Any write still queued may go through: finish waits for it.
            for _ in 0..4 {
                let _ = let_through.send(());
            }
            early.finish()
        });
        (ok, rec.writes)
    }

    #[test]
    fn a_write_carries_every_port_open_and_opens_wait_for_the_writer() {
        let writes = with_writer(None, |early, let_through, written| {
            let mut open = Vec::new();
            let mut open_one = |early: &mut EarlyRules<'_>, p: u16| {
                open.push(p);
                let snapshot = open.clone();
                early.opened(move || snapshot.into_iter().map(portal).collect());
            };
            // The first batch is handed over; while it is written, opens only count.
            for p in 1..=600 {
                open_one(early, p);
            }
            let_through.send(()).unwrap();
            let first = written.recv().unwrap().unwrap();
            assert_eq!(first, (1..=BATCH as u16).collect::<Vec<_>>());
            until_idle(early);
            // More than a batch opened meanwhile: the next open hands over everything.
            open_one(early, 601);
            let_through.send(()).unwrap();
            let second = written.recv().unwrap().unwrap();
            assert_eq!(second, (1..=601).collect::<Vec<_>>());
            until_idle(early);
            // Fewer than a batch since: nothing more.
            for p in 602..=700 {
                open_one(early, p);
            }
            assert!(written.try_recv().is_err());
        });
        assert_eq!(writes, (2, 2));
    }

    #[test]
    fn fewer_opens_than_a_batch_write_nothing_early() {
        let writes = with_writer(None, |early, _, written| {
            for _ in 1..BATCH {
                early.opened(|| panic!("no snapshot is taken below a batch"));
            }
            assert!(written.try_recv().is_err());
        });
        assert_eq!(writes, (0, 0));
    }

    #[test]
    fn after_a_failed_write_nothing_more_is_written_early() {
        let writes = with_writer(Some(0), |early, let_through, written| {
            let mut open = Vec::new();
            for p in 1..=BATCH as u16 {
                open.push(p);
                let snapshot = open.clone();
                early.opened(move || snapshot.into_iter().map(portal).collect());
            }
            let_through.send(()).unwrap();
            assert_eq!(written.recv().unwrap(), Err(()));
            until_idle(early);
            for p in BATCH as u16 + 1..=3 * BATCH as u16 {
                open.push(p);
                let snapshot = open.clone();
                early.opened(move || snapshot.into_iter().map(portal).collect());
            }
        });
        assert_eq!(
            writes,
            (0, 1),
            "the snapshot after the failure is not written"
        );
    }
}
