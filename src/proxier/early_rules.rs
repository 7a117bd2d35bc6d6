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
    send: Option<mpsc::Sender<Vec<Portal>>>,
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
            send: Some(send),
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
        let Some(send) = &self.send else {
            return;
        };
        self.busy.store(true, Ordering::Release);
        if send.send(snapshot()).is_ok() {
            self.opened = 0;
        } else {
            self.busy.store(false, Ordering::Release);
        }
    }

    /// Waits for the write in progress; returns how many writes succeeded.
    pub fn finish(mut self) -> usize {
        drop(self.send.take());
        // A panic on the writer thread is the backend's bug: re-raise it here.
        self.handle
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Affinity, Protocol, ServicePort, ServicePortName, TrafficPolicy};
    use std::sync::Mutex;
    use std::time::Duration;

    /// Records each snapshot's proxy ports; each write takes `pause`, so opens pile up behind it.
    struct Recorder {
        writes: Arc<Mutex<Vec<Vec<u16>>>>,
        pause: Duration,
        fail_at: Option<usize>,
    }

    impl Writer for Recorder {
        fn write(&mut self, portals: &[Portal], _: &NodeAddrs) -> Result<bool> {
            std::thread::sleep(self.pause);
            let mut w = self.writes.lock().unwrap();
            if self.fail_at == Some(w.len()) {
                return Err(super::super::rules::Error::Command {
                    program: "test".into(),
                    code: Some(1),
                    stderr: "refused".into(),
                });
            }
            w.push(portals.iter().map(|p| p.proxy_port).collect());
            Ok(true)
        }
    }

    fn portal(port: u16) -> Portal {
        Portal {
            service: Arc::new(ServicePort {
                name: ServicePortName::new("default", format!("s{port}"), ""),
                protocol: Protocol::Tcp,
                cluster_ip: "10.96.0.10".parse().unwrap(),
                port: 80,
                node_port: None,
                external_ips: vec![],
                load_balancer_ips: vec![],
                affinity: Affinity::None,
                internal_policy: TrafficPolicy::Cluster,
                external_policy: TrafficPolicy::Cluster,
                health_check_node_port: None,
            }),
            proxy_port: port,
        }
    }

    fn node() -> NodeAddrs {
        NodeAddrs {
            host_ip: None,
            local: vec![],
        }
    }

    /// Opens `n` ports one by one (each taking `open`), as the proxier's loop does.
    fn run(
        n: u16,
        open: Duration,
        pause: Duration,
        fail_at: Option<usize>,
    ) -> (Vec<Vec<u16>>, usize) {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let mut rec = Recorder {
            writes: writes.clone(),
            pause,
            fail_at,
        };
        let node = node();
        let done = std::thread::scope(|s| {
            let mut early = EarlyRules::start(s, &mut rec, &node);
            let mut open_ports = Vec::new();
            for p in 1..=n {
                std::thread::sleep(open);
                open_ports.push(p);
                early.opened(|| open_ports.iter().copied().map(portal).collect());
            }
            early.finish()
        });
        let w = writes.lock().unwrap().clone();
        (w, done)
    }

    #[test]
    fn writes_overlap_the_opening_and_carry_every_port_opened_so_far() {
        // Writes slower than opens: each write covers what opened during the one before.
        let (writes, done) = run(
            2_000,
            Duration::from_micros(20),
            Duration::from_millis(10),
            None,
        );
        assert_eq!(done, writes.len());
        assert!(
            writes.len() >= 2,
            "more than one write overlapped the opening: {}",
            writes.len()
        );
        let mut last = 0;
        for w in &writes {
            // Every snapshot is the ports open at that moment: 1..=k, in order.
            assert_eq!(*w, (1..=w.len() as u16).collect::<Vec<_>>());
            assert!(
                w.len() >= last + BATCH,
                "a write waits for a batch of new ports"
            );
            last = w.len();
        }
        assert!(
            last < 2_000,
            "ports opened during the last write are left to the sync's own write"
        );
    }

    #[test]
    fn fewer_opens_than_a_batch_write_nothing_early() {
        let (writes, done) = run(BATCH as u16 - 1, Duration::ZERO, Duration::ZERO, None);
        assert!(writes.is_empty());
        assert_eq!(done, 0);
    }

    #[test]
    fn after_a_failed_write_nothing_more_is_written_early() {
        let (writes, done) = run(
            3_000,
            Duration::from_micros(20),
            Duration::from_millis(5),
            Some(1),
        );
        assert_eq!(
            writes.len(),
            1,
            "the write after the failure is not attempted"
        );
        assert_eq!(done, 1);
    }
}
