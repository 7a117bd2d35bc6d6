//! The UDP data plane's threads: one event loop per CPU, on plain `epoll`, not tokio.
//!
//! Why not the tokio workers that carry TCP: a UDP service socket has no accept to hand work
//! over with, so on tokio it is read by the one worker that registered it, and every request
//! of every client waits for that one thread to be woken. On these 2-vCPU guests, where waking
//! an idle vCPU is a halt exit and an inter-processor interrupt, that thread often sleeps on
//! the other vCPU than the client, and stays there: a 40-line tokio relay and ours measured
//! 52 to 60 µs p50 in the benchmark's order of rounds, nginx 30 to 35. Here every loop
//! registers every service socket with `EPOLLEXCLUSIVE`: the kernel wakes one loop per
//! datagram, one that is asleep in `epoll_wait` and so free, the way nginx's workers share a
//! UDP socket. A raw two-loop relay built that way measured 30 to 32 µs in four rounds out of
//! four, where one loop measured 22 to 52 (see the README's benchmark notes). tokio cannot ask
//! for `EPOLLEXCLUSIVE`, and a nested epoll would lose it: the kernel honours it only for a
//! thread waiting in `epoll_wait` on the very instance. Measured with these loops, same
//! protocol, four rounds: 33.8 to 34.4 µs, nginx 34.8 to 35.3.
//!
//! The price is paid under a flood: a request and its reply are often handled by different
//! loops, which then both run and sleep, where one thread used to stay busy with full batches
//! (99,000 to 128,000 datagrams/s delivered against 114,000 to 168,000 for the single worker,
//! nginx 88,000 to 92,000). A loop that found a socket busy and stepped aside from it for a
//! few milliseconds won the flood back but lost the latency (85 to 89 µs): in request/response
//! traffic the loop that is sending a reply also gets the next request's event queued, so
//! contention on the gate is the normal case, not a sign of load.
//!
//! What runs where:
//! - a service socket ([`super::udp::Port`]) is read by whichever loop the kernel wakes, one
//!   loop at a time ([`Gate`]), so each client's datagrams leave in the order they came;
//! - a session's backend socket is registered with the loop that opened the session, which
//!   alone reads it, expires it and closes it;
//! - commands (a port added or removed) arrive through a queue and an `eventfd`.
//!
//! The threads live as long as the process; each port's life is its listener's tokens, which a
//! task on the proxier's tracker watches ([`super::udp::start`]).

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::udp::{self, Port, Session};

/// Key of each loop's command `eventfd` in its epoll set; sockets get keys from 1 up.
const WAKE_KEY: u64 = 0;

/// Most events taken from one `epoll_wait`.
const EVENTS: usize = 64;

/// Most batches read from one socket before the loop turns to its other sockets: a flooding
/// client or backend must not hold the thread. The rest is read on the loop's next turn.
pub(crate) const BATCHES_PER_TURN: usize = 4;

/// Serialises the reading of one service socket among the loops the kernel wakes for it.
///
/// A loop that finds the gate taken marks it and goes on with its other work; the loop that
/// holds it sees the mark when it leaves and reads again, so no datagram waits for a wake-up
/// that has already been spent (the sockets are edge-triggered).
#[derive(Debug, Default)]
pub(crate) struct Gate(AtomicU8);

const OPEN: u8 = 0;
const HELD: u8 = 1;
const MARKED: u8 = 2;

impl Gate {
    /// Takes the gate, or marks it for its holder and returns false.
    pub(crate) fn enter(&self) -> bool {
        match self
            .0
            .compare_exchange(OPEN, HELD, Ordering::Acquire, Ordering::Relaxed)
        {
            Ok(_) => true,
            Err(_) => {
                // Held (or marked already): make sure the holder reads again. If it was
                // released in between, take it after all.
                if self.0.fetch_or(MARKED, Ordering::AcqRel) == OPEN {
                    self.0.store(HELD, Ordering::Release);
                    return true;
                }
                false
            }
        }
    }

    /// Releases the gate whether or not it was marked: for a holder that will read the socket
    /// again anyway, which honours any mark.
    pub(crate) fn release(&self) {
        self.0.store(OPEN, Ordering::Release);
    }

    /// Releases the gate; false if another loop marked it meanwhile, and the holder must read
    /// again (it still holds the gate then).
    pub(crate) fn leave(&self) -> bool {
        match self
            .0
            .compare_exchange(HELD, OPEN, Ordering::AcqRel, Ordering::Relaxed)
        {
            Ok(_) => true,
            Err(_) => {
                self.0.store(HELD, Ordering::Release);
                false
            }
        }
    }
}

/// What a loop is asked to do by the control plane.
enum Cmd {
    /// Read this service socket.
    Add(Arc<Port>),
    /// Stop reading it, close the sessions this loop opened for it, then answer.
    Remove(Arc<Port>, oneshot::Sender<()>),
}

/// The control plane's side of one loop.
struct Mailbox {
    epoll: Epoll,
    wake: EventFd,
    inbox: Mutex<Vec<Cmd>>,
}

/// The UDP loops.
pub(crate) struct Loops {
    loops: Vec<Arc<Mailbox>>,
}

impl std::fmt::Debug for Loops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loops")
            .field("loops", &self.loops.len())
            .finish()
    }
}

impl Loops {
    fn start(n: usize) -> std::io::Result<Loops> {
        let mut loops = Vec::new();
        for i in 0..n.max(1) {
            let mailbox = Arc::new(Mailbox {
                epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
                wake: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
                inbox: Mutex::new(Vec::new()),
            });
            mailbox.epoll.add(
                &mailbox.wake,
                EpollEvent::new(EpollFlags::EPOLLIN, WAKE_KEY),
            )?;
            let m = mailbox.clone();
            std::thread::Builder::new()
                .name(format!("proxy-udp-{i}"))
                .spawn(move || Loop::new(i, m).run())?;
            loops.push(mailbox);
        }
        Ok(Loops { loops })
    }

    fn send(&self, mut cmd: impl FnMut() -> Cmd) {
        for m in &self.loops {
            m.inbox
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(cmd());
            // A full counter (2^64 - 2 wake-ups unread) cannot happen; the loop reads it on
            // every wake.
            m.wake.write(1).ok();
        }
    }

    /// Has every loop read `port`.
    pub(crate) fn add(&self, port: &Arc<Port>) {
        self.send(|| Cmd::Add(port.clone()));
    }

    /// Has every loop stop reading `port` and close its sessions; resolves when all have.
    pub(crate) async fn remove(&self, port: &Arc<Port>) {
        let mut acks = Vec::new();
        self.send(|| {
            let (tx, rx) = oneshot::channel();
            acks.push(rx);
            Cmd::Remove(port.clone(), tx)
        });
        for ack in acks {
            // A loop that has gone (it cannot, short of a panic) has nothing left to close.
            ack.await.ok();
        }
    }
}

static LOOPS: OnceLock<Loops> = OnceLock::new();

/// The process's UDP loops, one per CPU it may run on, started on first use.
///
/// # Errors
/// Starting failed (no epoll, eventfd or thread): UDP ports cannot be served; the next call
/// tries again.
pub(crate) fn loops() -> std::io::Result<&'static Loops> {
    if let Some(l) = LOOPS.get() {
        return Ok(l);
    }
    // One starter at a time: two listeners starting at once must not both start threads.
    static STARTING: Mutex<()> = Mutex::new(());
    let _one = STARTING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(l) = LOOPS.get() {
        return Ok(l);
    }
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = Loops::start(n)?;
    Ok(LOOPS.get_or_init(|| started))
}

/// What a key in a loop's epoll set stands for.
enum Entry {
    Port(Arc<Port>),
    Session(Arc<Port>, Arc<Session>),
}

/// One loop's own state, touched by its thread only.
pub(crate) struct Loop {
    index: usize,
    mailbox: Arc<Mailbox>,
    entries: HashMap<u64, Entry>,
    next_key: u64,
    /// Keys with more to read than one turn allowed.
    again: Vec<u64>,
    /// When the sessions this loop owns should next be checked for idleness.
    next_sweep: Option<Instant>,
}

impl Loop {
    fn new(index: usize, mailbox: Arc<Mailbox>) -> Loop {
        Loop {
            index,
            mailbox,
            entries: HashMap::new(),
            next_key: WAKE_KEY + 1,
            again: Vec::new(),
            next_sweep: None,
        }
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::empty(); EVENTS];
        loop {
            let timeout = if !self.again.is_empty() {
                EpollTimeout::ZERO
            } else {
                match self.next_sweep {
                    None => EpollTimeout::NONE,
                    Some(at) => {
                        let ms = at
                            .saturating_duration_since(Instant::now())
                            .as_millis()
                            .saturating_add(1)
                            .min(60_000) as u16;
                        EpollTimeout::from(ms)
                    }
                }
            };
            let n = match self.mailbox.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => {
                    warn!(error = %e, "UDP loop: epoll_wait failed");
                    std::thread::sleep(Duration::from_millis(10));
                    0
                }
            };
            let again = std::mem::take(&mut self.again);
            for ev in &events[..n] {
                match ev.data() {
                    WAKE_KEY => self.commands(),
                    key => self.serve(key),
                }
            }
            for key in again {
                self.serve(key);
            }
            if self.next_sweep.is_some_and(|at| Instant::now() >= at) {
                self.sweep();
            }
        }
    }

    fn commands(&mut self) {
        self.mailbox.wake.read().ok();
        let cmds =
            std::mem::take(&mut *self.mailbox.inbox.lock().unwrap_or_else(|p| p.into_inner()));
        for cmd in cmds {
            match cmd {
                Cmd::Add(port) => self.add_port(port),
                Cmd::Remove(port, ack) => {
                    self.remove_port(&port);
                    ack.send(()).ok();
                }
            }
        }
    }

    fn add_port(&mut self, port: Arc<Port>) {
        let key = self.key();
        let edge = EpollFlags::EPOLLIN | EpollFlags::EPOLLET;
        let epoll = &self.mailbox.epoll;
        let added = match epoll.add(
            port.sock.as_fd(),
            EpollEvent::new(edge | EpollFlags::EPOLLEXCLUSIVE, key),
        ) {
            // Kernels before 4.5: every loop then wakes for each datagram, and the gate still
            // lets one read.
            Err(nix::errno::Errno::EINVAL) => {
                debug!(service = %port.shared.name, "EPOLLEXCLUSIVE refused; watching without it");
                epoll.add(port.sock.as_fd(), EpollEvent::new(edge, key))
            }
            other => other,
        };
        match added {
            Ok(()) => {
                self.entries.insert(key, Entry::Port(port));
            }
            Err(e) => {
                warn!(service = %port.shared.name, error = %e, loop_index = self.index, "UDP loop cannot watch the service socket")
            }
        }
    }

    fn remove_port(&mut self, port: &Arc<Port>) {
        let keys: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| match e {
                Entry::Port(p) | Entry::Session(p, _) => Arc::ptr_eq(p, port),
            })
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            self.close(key, "listener closed");
        }
        self.update_sweep();
    }

    fn key(&mut self) -> u64 {
        let k = self.next_key;
        self.next_key += 1;
        k
    }

    /// Registers a session this loop opened; it owns it from now on.
    pub(crate) fn own(&mut self, port: &Arc<Port>, session: &Arc<Session>) -> std::io::Result<()> {
        let key = self.key();
        self.mailbox
            .epoll
            .add(
                session.backend.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, key),
            )
            .map_err(std::io::Error::from)?;
        self.entries
            .insert(key, Entry::Session(port.clone(), session.clone()));
        let due = session.deadline(port.shared.udp_idle_timeout);
        self.next_sweep = Some(self.next_sweep.map_or(due, |at| at.min(due)));
        Ok(())
    }

    fn serve(&mut self, key: u64) {
        let more = match self.entries.get(&key) {
            None => return, // closed since the event was queued
            Some(Entry::Port(port)) => {
                let port = port.clone();
                udp::read_port(&port, self)
            }
            Some(Entry::Session(port, session)) => {
                let (port, session) = (port.clone(), session.clone());
                match udp::relay_replies(&port, &session) {
                    Ok(more) => more,
                    Err(why) => {
                        // The next sweep, due or not, finds one session fewer.
                        self.close(key, why);
                        return;
                    }
                }
            }
        };
        if more {
            self.again.push(key);
        }
    }

    /// Closes what `key` stands for: a port's registration with this loop, or a session.
    fn close(&mut self, key: u64, reason: &'static str) {
        match self.entries.remove(&key) {
            Some(Entry::Port(port)) => {
                self.mailbox.epoll.delete(port.sock.as_fd()).ok();
            }
            Some(Entry::Session(port, session)) => {
                self.mailbox.epoll.delete(session.backend.as_fd()).ok();
                udp::end_session(&port, &session, reason);
            }
            None => {}
        }
    }

    /// Ends the sessions that have been idle too long, or were replaced; sets the next check
    /// to the earliest deadline left, but no sooner than a tenth of the idle timeout, so that
    /// many sessions with spread deadlines do not make the loop sweep continuously.
    fn sweep(&mut self) {
        let now = Instant::now();
        let done: Vec<(u64, &'static str)> = self
            .entries
            .iter()
            .filter_map(|(k, e)| match e {
                Entry::Session(port, s) => udp::expired(port, s, now).map(|why| (*k, why)),
                Entry::Port(_) => None,
            })
            .collect();
        for (key, why) in done {
            self.close(key, why);
        }
        self.update_sweep();
    }

    fn update_sweep(&mut self) {
        let now = Instant::now();
        self.next_sweep = self
            .entries
            .values()
            .filter_map(|e| match e {
                Entry::Session(port, s) => {
                    let idle = port.shared.udp_idle_timeout;
                    Some(
                        s.deadline(idle)
                            .max(now + (idle / 10).max(Duration::from_millis(1))),
                    )
                }
                Entry::Port(_) => None,
            })
            .min();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_admits_one_and_makes_it_read_again_when_marked() {
        let g = Gate::default();
        assert!(g.enter());
        // A second loop is refused and marks it.
        assert!(!g.enter());
        assert!(!g.enter());
        // The holder must read again, once, however many marks.
        assert!(!g.leave());
        assert!(g.leave());
        // Open again.
        assert!(g.enter());
        assert!(g.leave());
    }

    /// Many threads knock while one reads: every knock is either admitted or seen by the holder
    /// as a reason to read again, never lost (what the edge-triggered sockets need).
    #[test]
    fn no_knock_on_the_gate_is_lost() {
        let g = Arc::new(Gate::default());
        let knocks = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (g, knocks, reads) = (g.clone(), knocks.clone(), reads.clone());
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        // A datagram arrives (knock), then its loop tries the gate.
                        knocks.fetch_add(1, Ordering::SeqCst);
                        if g.enter() {
                            loop {
                                // Reading takes everything knocked so far.
                                reads.fetch_max(knocks.load(Ordering::SeqCst), Ordering::SeqCst);
                                if g.leave() {
                                    break;
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            reads.load(Ordering::SeqCst),
            knocks.load(Ordering::SeqCst),
            "the last knock was read"
        );
    }
}
