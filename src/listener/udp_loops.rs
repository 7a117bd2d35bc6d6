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
//! That sharing is for new clients. A client's first datagram opens its session on the loop
//! that read it, and the session gets a front ([`super::udp::open_front`]): a socket on the
//! service's address and port, connected to the client, that the kernel prefers for that
//! client's later datagrams. Only the session's loop watches the front and the backend socket,
//! so one thread carries the session both ways and no other loop is woken for it, as with
//! socat's process per client. Sharing one socket for everything cost a second thread per
//! request (the other loop read 0.67 to 0.80 datagrams per request, and the owner migrated
//! 0.41 to 0.54 times a request to read the reply). Measured, one run, each 5,000 UDP
//! requests, p50:
//!
//! | setting | with fronts | without | nginx |
//! |---|---|---|---|
//! | halt polling on, 3 rounds | 13.0 to 14.0 µs | 19.2 to 19.8 | 19.1 to 19.4 |
//! | halt polling off, 4 rounds | 27.4 to 31.3 µs | 33.6 to 36.7 | 36.1 to 39.2 |
//!
//! With fronts the owner migrated 0.20 to 0.42 times a request, and the other loop did not run.
//! A flood from one client is carried the same way, by one loop with full batches both ways:
//! 214,000 and 216,000 datagrams/s delivered in two runs, against 112,000 and 117,000 for the
//! loops before fronts, which had to hand a flooded service socket to the session's owner
//! (stepping aside) so as not to wake a second loop for each datagram; nginx 83,000 and
//! 84,000.
//!
//! The loops follow the CPUs the process may run on now, not only the ones it started with.
//! When its CPU affinity shrinks below the number of loops (`taskset`, a cpuset change by the
//! kubelet's CPU manager), the loops past that number park: they stop watching the service
//! sockets and only serve the sessions they own. Without that, two loops
//! sharing one CPU both stay in the socket's wait queue, and the kernel wakes the second one
//! for about half of the requests, because the first one is still on its way back to
//! `epoll_wait` after sending the last reply: an extra context switch per two requests.
//! Measured on one CPU, 5 rounds of 5,000 UDP requests, p50: 15.6 to 16.2 µs with both loops
//! watching, 14.2 to 14.8 µs with one (socat 14.8 to 15.5, nginx 16.0 to 16.5); with parking,
//! in another run of the same protocol, 12.4 to 14.1 µs against 12.7 to 14.4 for a proxy
//! started on that CPU (socat 13.3 to 14.9). A loop reads its affinity mask at most once every
//! [`poll::CPU_CHECK`], when it wakes anyway, so an idle proxy does nothing for it; parked loops
//! watch again as soon as the CPUs come back. (More loops than the process started with are
//! not started: they come with a restart.) A parked loop keeps its sessions' fronts: each of
//! those clients stays on one thread.
//!
//! What runs where:
//! - a service socket ([`super::udp::Port`]) is read by whichever loop the kernel wakes, one
//!   loop at a time ([`Gate`]), so each client's datagrams leave in the order they came;
//! - a session's backend socket and front are registered with the loop that opened the
//!   session, which alone reads them, expires the session and closes it;
//! - commands (a port added or removed, a socket to read now) arrive through a queue and an
//!   `eventfd`.
//!
//! The threads live as long as the process; each port's life is its listener's tokens, which a
//! task on the proxier's tracker watches ([`super::udp::start`]).

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::poll::{self, Cpus};
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
    /// Read this service socket now: a loop that parked left it with datagrams perhaps queued.
    Read(Arc<Port>),
    /// The number of CPUs the process may run on changed ([`Crew::cpus`]): park if this loop's
    /// index is not below it, watch the service sockets again if it is.
    Cpus,
}

/// What the other threads see of one loop: where to send it commands, and its counters.
struct Mailbox {
    epoll: Epoll,
    wake: EventFd,
    inbox: Mutex<Vec<Cmd>>,
    /// Sessions with a front it carries now.
    fronts: AtomicU64,
    /// Whether it is parked: the process may run on fewer CPUs than there are loops.
    parked: AtomicBool,
    /// What its polls before sleeping came to.
    polls: poll::Counts,
}

impl Mailbox {
    fn new() -> std::io::Result<Mailbox> {
        let mailbox = Mailbox {
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            wake: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
            inbox: Mutex::new(Vec::new()),
            fronts: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            polls: poll::Counts::default(),
        };
        mailbox.epoll.add(
            &mailbox.wake,
            EpollEvent::new(EpollFlags::EPOLLIN, WAKE_KEY),
        )?;
        Ok(mailbox)
    }

    fn post(&self, cmd: Cmd) {
        self.inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(cmd);
        // A full counter (2^64 - 2 wake-ups unread) cannot happen; the loop reads it on every
        // wake.
        self.wake.write(1).ok();
    }
}

/// What every loop shares: each one's mailbox, by index, and how many of them watch the
/// service sockets.
struct Crew {
    mailboxes: Vec<Arc<Mailbox>>,
    /// How many CPUs the process may run on, as a loop last read it, capped at the number of
    /// loops: loops with an index below it watch the service sockets, the others are parked.
    cpus: AtomicUsize,
}

impl Crew {
    fn new(n: usize) -> std::io::Result<Arc<Crew>> {
        let mailboxes = (0..n.max(1))
            .map(|_| Mailbox::new().map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Arc::new(Crew {
            cpus: AtomicUsize::new(mailboxes.len()),
            mailboxes,
        }))
    }

    /// How many loops should watch the service sockets when the process may run on `cpus`
    /// CPUs: one per CPU, at least one, at most all.
    fn watching(&self, cpus: usize) -> usize {
        cpus.clamp(1, self.mailboxes.len())
    }
}

/// The UDP loops.
pub(crate) struct Loops {
    crew: Arc<Crew>,
}

impl std::fmt::Debug for Loops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loops")
            .field("loops", &self.crew.mailboxes.len())
            .finish()
    }
}

impl Loops {
    fn start(n: usize) -> std::io::Result<Loops> {
        let crew = Crew::new(n)?;
        for i in 0..crew.mailboxes.len() {
            let crew = crew.clone();
            std::thread::Builder::new()
                .name(format!("proxy-udp-{i}"))
                .spawn(move || Loop::new(i, crew).run())?;
        }
        Ok(Loops { crew })
    }

    fn send(&self, mut cmd: impl FnMut() -> Cmd) {
        for m in &self.crew.mailboxes {
            m.post(cmd());
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

/// What the metrics show of one UDP loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpLoopStatus {
    /// Sessions with a front it carries now (each such client's traffic, both ways).
    pub fronts: u64,
    /// Whether it is parked, the process having fewer CPUs than loops.
    pub parked: bool,
    /// Polls before sleeping that caught work, since start ([`super::poll`]).
    pub polls_caught: u64,
    /// Polls that ran out their window and slept.
    pub polls_missed: u64,
}

/// Each UDP loop's status, by loop; empty before any UDP port was served.
pub fn status() -> Vec<UdpLoopStatus> {
    LOOPS.get().map_or_else(Vec::new, |l| {
        l.crew
            .mailboxes
            .iter()
            .map(|m| {
                let (polls_caught, polls_missed) = m.polls.get();
                UdpLoopStatus {
                    fronts: m.fronts.load(Ordering::Relaxed),
                    parked: m.parked.load(Ordering::Relaxed),
                    polls_caught,
                    polls_missed,
                }
            })
            .collect()
    })
}

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
    /// A session's backend socket; `front`: the key of its front, if it has one.
    Session {
        port: Arc<Port>,
        session: Arc<Session>,
        front: Option<u64>,
    },
    /// A session's front, under the key of its backend socket's entry.
    Front(u64),
}

/// One loop's own state, touched by its thread only.
pub(crate) struct Loop {
    index: usize,
    mailbox: Arc<Mailbox>,
    /// Every loop's mailbox, this one's included: a loop that parks tells loop 0 to read the
    /// sockets it leaves.
    crew: Arc<Crew>,
    entries: HashMap<u64, Entry>,
    next_key: u64,
    /// Keys with more to read than one turn allowed.
    again: Vec<u64>,
    /// When the sessions this loop owns should next be checked for idleness.
    next_sweep: Option<Instant>,
    /// Whether it is parked ([`Crew::cpus`]); then `unwatched` holds every service socket's key.
    parked: bool,
    /// Service sockets this loop does not watch because it is parked.
    unwatched: Vec<u64>,
    /// How many CPUs the process may run on, re-read every [`poll::CPU_CHECK`] at most: when that
    /// changes, loops park or come back within that time of the next datagram.
    cpus: Cpus,
    /// How long it polls before it sleeps ([`poll`]).
    window: poll::Window,
    /// Whether the CPUs are crowded now, when it would poll ([`super::pressure::crowded`];
    /// tests give their own).
    crowded: fn(Instant) -> bool,
}

impl Loop {
    fn new(index: usize, crew: Arc<Crew>) -> Loop {
        Loop {
            index,
            mailbox: crew.mailboxes[index].clone(),
            crew,
            entries: HashMap::new(),
            next_key: WAKE_KEY + 1,
            again: Vec::new(),
            next_sweep: None,
            parked: false,
            unwatched: Vec::new(),
            cpus: Cpus::new(),
            window: poll::Window::default(),
            crowded: super::pressure::crowded,
        }
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::empty(); EVENTS];
        let mut idle_since = Instant::now();
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
            let n = self.wait(&mut events, timeout, idle_since);
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
            // One clock read for the three things that want it after a wake-up: the work is
            // done, so this is also when the loop ran out of it.
            let now = Instant::now();
            idle_since = now;
            if self.next_sweep.is_some_and(|at| now >= at) {
                self.sweep();
            }
            if let Some(cpus) = self.cpus.due(now) {
                self.check_cpus(cpus);
            }
        }
    }

    /// Waits for events. A sleep follows a poll of the window when one is open and more than one
    /// loop watches (more than one CPU): a poll that catches an event leaves the window as it is,
    /// a sleep adjusts it by how long the loop was without work since `idle_since`.
    fn wait(
        &mut self,
        events: &mut [EpollEvent],
        timeout: EpollTimeout,
        idle_since: Instant,
    ) -> usize {
        if timeout == EpollTimeout::ZERO {
            return self.epoll_wait(events, timeout);
        }
        let window = self.window.get();
        // `idle_since` is when the loop ran out of work, just now: the clock need not be read.
        if !window.is_zero()
            && self.crew.cpus.load(Ordering::Relaxed) > 1
            && !(self.crowded)(idle_since)
        {
            loop {
                let n = self.epoll_wait(events, EpollTimeout::ZERO);
                if n > 0 {
                    self.mailbox.polls.caught();
                    return n;
                }
                if idle_since.elapsed() >= window {
                    self.mailbox.polls.missed();
                    break;
                }
                poll::step_aside();
            }
        }
        let n = self.epoll_wait(events, timeout);
        self.window.missed(idle_since.elapsed(), poll::limit());
        n
    }

    fn epoll_wait(&self, events: &mut [EpollEvent], timeout: EpollTimeout) -> usize {
        match self.mailbox.epoll.wait(events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => {
                warn!(error = %e, "UDP loop: epoll_wait failed");
                std::thread::sleep(Duration::from_millis(10));
                0
            }
        }
    }

    /// Notes that the process may run on `cpus` CPUs; if that changes how many loops should
    /// watch the service sockets, tells every loop (this one too) to park or come back.
    fn check_cpus(&self, cpus: usize) {
        let watching = self.crew.watching(cpus);
        let was = self.crew.cpus.swap(watching, Ordering::AcqRel);
        if was != watching {
            debug!(
                cpus,
                loops = self.crew.mailboxes.len(),
                watching,
                was,
                "UDP loops follow the process's CPUs"
            );
            for m in &self.crew.mailboxes {
                m.post(Cmd::Cpus);
            }
        }
    }

    /// Parks this loop or brings it back, as [`Crew::cpus`] says now.
    fn follow_cpus(&mut self) {
        let park = self.index >= self.crew.cpus.load(Ordering::Acquire);
        if park == self.parked {
            return;
        }
        self.parked = park;
        if park {
            self.park();
        } else {
            for key in std::mem::take(&mut self.unwatched) {
                self.watch_again(key);
            }
        }
        // After the sockets: what the metrics (and tests) see is done.
        self.mailbox.parked.store(park, Ordering::Release);
    }

    /// Stops watching every service socket. Loop 0, which never parks, is told to read each
    /// one once: an event this loop had taken for a datagram still queued would otherwise wait
    /// for the next arrival. Its sessions' fronts it keeps: their clients' traffic stays on
    /// this loop, one thread per session still.
    fn park(&mut self) {
        let ports: Vec<(u64, Arc<Port>)> = self
            .entries
            .iter()
            .filter_map(|(k, e)| match e {
                Entry::Port(p) => Some((*k, p.clone())),
                _ => None,
            })
            .collect();
        for (key, port) in ports {
            self.mailbox.epoll.delete(port.sock.as_fd()).ok();
            self.unwatched.push(key);
            self.crew.mailboxes[0].post(Cmd::Read(port));
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
                Cmd::Cpus => self.follow_cpus(),
                Cmd::Read(port) => {
                    let key = self.entries.iter().find_map(|(k, e)| match e {
                        Entry::Port(p) if Arc::ptr_eq(p, &port) => Some(*k),
                        _ => None,
                    });
                    if let Some(key) = key {
                        self.serve(key);
                    }
                }
            }
        }
    }

    fn add_port(&mut self, port: Arc<Port>) {
        let key = self.key();
        if self.parked {
            // Loop 0, which never parks, watches it.
            self.entries.insert(key, Entry::Port(port));
            self.unwatched.push(key);
            return;
        }
        match self.watch(&port, key) {
            Ok(()) => {
                self.entries.insert(key, Entry::Port(port));
            }
            Err(e) => {
                warn!(service = %port.shared.name, error = %e, loop_index = self.index, "UDP loop cannot watch the service socket")
            }
        }
    }

    /// Registers a service socket with this loop's epoll set under `key`.
    fn watch(&self, port: &Port, key: u64) -> nix::Result<()> {
        let edge = EpollFlags::EPOLLIN | EpollFlags::EPOLLET;
        let epoll = &self.mailbox.epoll;
        match epoll.add(
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
        }
    }

    /// Watches again a service socket this loop stopped watching when it parked, unless it was
    /// removed meanwhile; a parked loop only notes it among those it leaves.
    fn watch_again(&mut self, key: u64) {
        let Some(Entry::Port(port)) = self.entries.get(&key) else {
            return;
        };
        if self.parked {
            self.unwatched.push(key);
        } else if let Err(e) = self.watch(port, key) {
            warn!(service = %port.shared.name, error = %e, loop_index = self.index, "UDP loop cannot watch the service socket again");
        }
    }

    fn remove_port(&mut self, port: &Arc<Port>) {
        let keys: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| match e {
                Entry::Port(p) | Entry::Session { port: p, .. } => Arc::ptr_eq(p, port),
                // Closed with their session.
                Entry::Front(_) => false,
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

    /// Registers a session this loop opened, and its front if it has one; it owns them from
    /// now on.
    pub(crate) fn own(&mut self, port: &Arc<Port>, session: &Arc<Session>) -> std::io::Result<()> {
        let key = self.key();
        let edge = EpollFlags::EPOLLIN | EpollFlags::EPOLLET;
        let epoll = &self.mailbox.epoll;
        epoll
            .add(session.backend.as_fd(), EpollEvent::new(edge, key))
            .map_err(std::io::Error::from)?;
        let front = match &session.front {
            Some(f) => {
                let front_key = key + 1;
                if let Err(e) = epoll.add(f.sock.as_fd(), EpollEvent::new(edge, front_key)) {
                    epoll.delete(session.backend.as_fd()).ok();
                    return Err(e.into());
                }
                self.next_key += 1;
                self.entries.insert(front_key, Entry::Front(key));
                self.mailbox.fronts.fetch_add(1, Ordering::Relaxed);
                Some(front_key)
            }
            None => None,
        };
        self.entries.insert(
            key,
            Entry::Session {
                port: port.clone(),
                session: session.clone(),
                front,
            },
        );
        let due = session.deadline(port.shared.udp_idle_timeout);
        self.next_sweep = Some(self.next_sweep.map_or(due, |at| at.min(due)));
        Ok(())
    }

    fn serve(&mut self, key: u64) {
        let more = match self.entries.get(&key) {
            None => return, // closed since the event was queued
            Some(Entry::Port(port)) => {
                let port = port.clone();
                udp::read_port(&port, self) == udp::Turn::More
            }
            Some(Entry::Session { port, session, .. }) => {
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
            Some(&Entry::Front(owner)) => {
                let Some(Entry::Session { port, session, .. }) = self.entries.get(&owner) else {
                    return;
                };
                let (port, session) = (port.clone(), session.clone());
                match udp::relay_requests(&port, &session, self) {
                    Ok(more) => more,
                    Err(why) => {
                        self.close(owner, why);
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
                if self.unwatched.contains(&key) {
                    self.unwatched.retain(|&k| k != key);
                } else {
                    self.mailbox.epoll.delete(port.sock.as_fd()).ok();
                }
            }
            Some(Entry::Session {
                port,
                session,
                front,
            }) => {
                self.mailbox.epoll.delete(session.backend.as_fd()).ok();
                if let (Some(k), Some(f)) = (front, &session.front) {
                    self.entries.remove(&k);
                    self.mailbox.epoll.delete(f.sock.as_fd()).ok();
                    self.mailbox.fronts.fetch_sub(1, Ordering::Relaxed);
                }
                udp::end_session(&port, &session, reason);
            }
            Some(Entry::Front(owner)) => self.close(owner, reason),
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
                Entry::Session { port, session, .. } => {
                    udp::expired(port, session, now).map(|why| (*k, why))
                }
                Entry::Port(_) | Entry::Front(_) => None,
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
                Entry::Session { port, session, .. } => {
                    let idle = port.shared.udp_idle_timeout;
                    Some(
                        session
                            .deadline(idle)
                            .max(now + (idle / 10).max(Duration::from_millis(1))),
                    )
                }
                Entry::Port(_) | Entry::Front(_) => None,
            })
            .min();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::Balancer;
    use crate::listener::{Shared, Stats};
    use crate::model::ServicePortName;
    use std::net::UdpSocket;

    fn port_to(backend: std::net::SocketAddr) -> Arc<Port> {
        port_on("127.0.0.1:0", backend)
    }

    /// A service port bound to `addr` (port 0: any), whose one endpoint is `backend`.
    fn port_on(addr: &str, backend: std::net::SocketAddr) -> Arc<Port> {
        let shared = Arc::new(Shared {
            name: ServicePortName {
                namespace: "default".into(),
                name: "flood".into(),
                port: "u".into(),
            },
            balancer: Arc::new(Balancer::new(vec![backend], None)),
            stats: Arc::new(Stats::default()),
            allowed: Default::default(),
            external: Default::default(),
            udp_idle_timeout: Duration::from_secs(30),
            udp_max_sessions: 256,
            generation: Default::default(),
        });
        // Bound and sized as the listeners do theirs (`SO_REUSEADDR`, which fronts need).
        let sock =
            crate::listener::bind_socket(crate::model::Protocol::Udp, addr.parse().unwrap(), false)
                .unwrap();
        udp::roomy(&sock);
        Arc::new(Port::new(sock.into(), shared))
    }

    /// A loopback socket whose receive buffer holds a few hundred small datagrams.
    fn roomy_socket() -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket2::SockRef::from(&s)
            .set_recv_buffer_size(4 << 20)
            .unwrap();
        s
    }

    /// Waits (bounded) until `sock` has a datagram queued.
    fn readable(sock: &UdpSocket) {
        let mut fds = [nix::poll::PollFd::new(
            sock.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5_000u16)).unwrap();
        assert_eq!(n, 1, "a datagram arrives within 5 s");
    }

    /// Two loops, not running, both watching one service port whose backend is `backend`.
    struct Pair {
        loops: [Loop; 2],
        crew: Arc<Crew>,
        port: Arc<Port>,
        backend: UdpSocket,
    }

    fn two_loops() -> Pair {
        let crew = Crew::new(2).unwrap();
        let mut loops = [Loop::new(0, crew.clone()), Loop::new(1, crew.clone())];
        let backend = roomy_socket();
        let port = port_to(backend.local_addr().unwrap());
        for lp in &mut loops {
            lp.add_port(port.clone());
        }
        Pair {
            loops,
            crew,
            port,
            backend,
        }
    }

    fn port_key(lp: &Loop) -> u64 {
        lp.entries
            .iter()
            .find_map(|(k, e)| matches!(e, Entry::Port(_)).then_some(*k))
            .expect("the loop watches the port")
    }

    /// Serves `key` on `lp` and whatever that leaves for the loop's next turn, as its thread
    /// would.
    fn serve_all(lp: &mut Loop, key: u64) {
        lp.serve(key);
        while let Some(k) = lp.again.pop() {
            lp.serve(k);
        }
    }

    fn front_keys(lp: &Loop) -> Vec<u64> {
        lp.entries
            .iter()
            .filter_map(|(k, e)| matches!(e, Entry::Front(_)).then_some(*k))
            .collect()
    }

    /// The key of `client`'s session's backend socket (an IPv4 client of an IPv6 socket is
    /// known by its mapped address).
    fn backend_key(lp: &Loop, client: std::net::SocketAddr) -> u64 {
        let plain = |a: std::net::SocketAddr| (a.ip().to_canonical(), a.port());
        lp.entries
            .iter()
            .find_map(|(k, e)| match e {
                Entry::Session { session, .. } if plain(session.client) == plain(client) => {
                    Some(*k)
                }
                _ => None,
            })
            .expect("the client has a session on this loop")
    }

    fn nothing_queued(sock: &UdpSocket) -> bool {
        let mut fds = [nix::poll::PollFd::new(
            sock.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap() == 0
    }

    fn active(port: &Port) -> u64 {
        port.shared
            .stats
            .udp_sessions_active
            .load(Ordering::Relaxed)
    }

    /// A client's first datagram opens its session on the loop that read it, with a front. The
    /// client's later datagrams then reach that loop alone, through the front: the service
    /// socket and the other loop see none of them. They arrive in order, replies come back from
    /// the service's address, and closing the port closes the front.
    /// A loop with its window open takes what is waiting at its first poll (counted as caught)
    /// and, when nothing comes, polls out its window, sleeps, and shrinks the window after that
    /// long idle stretch (counted as missed); a loop whose CPUs are crowded, or that may use
    /// one CPU, never polls.
    #[test]
    fn a_loop_polls_before_it_sleeps_unless_its_cpus_are_crowded_or_one() {
        poll::set_limit(Duration::from_millis(1));
        let Pair {
            loops: [mut lp, _other],
            crew,
            port,
            ..
        } = two_loops();
        // Other tests load the CPUs meanwhile: this loop is told when they count as crowded.
        lp.crowded = |_| false;
        let key = port_key(&lp);
        let service = port.sock.local_addr().unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut events = vec![EpollEvent::empty(); EVENTS];
        let open = |lp: &mut Loop| {
            for _ in 0..8 {
                lp.window.missed(Duration::from_micros(60), poll::limit());
            }
            assert_eq!(lp.window.get(), Duration::from_millis(1));
        };
        let five_s = EpollTimeout::from(5_000u16);

        open(&mut lp);
        client.send_to(b"ping", service).unwrap();
        readable(&port.sock);
        assert!(lp.wait(&mut events, five_s, Instant::now()) > 0);
        assert_eq!(lp.mailbox.polls.get(), (1, 0));
        serve_all(&mut lp, key);
        // The new session's sockets report once on registration (edge-triggered): take that.
        while lp.epoll_wait(&mut events, EpollTimeout::ZERO) > 0 {}

        let before = Instant::now();
        assert_eq!(lp.wait(&mut events, EpollTimeout::from(20u16), before), 0);
        assert!(before.elapsed() >= Duration::from_millis(20));
        assert_eq!(lp.mailbox.polls.get(), (1, 1));
        assert_eq!(lp.window.get(), Duration::from_micros(500));

        // Crowded CPUs: another client's datagram (the first one's now go to its session's
        // front) is waited for without a poll.
        lp.crowded = |_| true;
        open(&mut lp);
        let second = UdpSocket::bind("127.0.0.1:0").unwrap();
        second.send_to(b"ping", service).unwrap();
        readable(&port.sock);
        assert!(lp.wait(&mut events, five_s, Instant::now()) > 0);
        assert_eq!(lp.mailbox.polls.get(), (1, 1), "no poll on crowded CPUs");
        serve_all(&mut lp, key);
        while lp.epoll_wait(&mut events, EpollTimeout::ZERO) > 0 {}

        lp.crowded = |_| false;
        crew.cpus.store(1, Ordering::Relaxed);
        open(&mut lp);
        let third = UdpSocket::bind("127.0.0.1:0").unwrap();
        third.send_to(b"ping", service).unwrap();
        readable(&port.sock);
        assert!(lp.wait(&mut events, five_s, Instant::now()) > 0);
        assert_eq!(lp.mailbox.polls.get(), (1, 1), "no poll on one CPU");
    }

    #[test]
    fn a_front_carries_its_client_on_the_owner_alone() {
        let Pair {
            loops: [mut owner, mut other],
            port,
            backend,
            ..
        } = two_loops();
        let (k0, k1) = (port_key(&owner), port_key(&other));
        let service = port.sock.local_addr().unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let me = client.local_addr().unwrap();
        for s in [&client, &backend] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        client.send_to(b"hello", service).unwrap();
        readable(&port.sock);
        owner.serve(k0);
        assert_eq!(port.fronts.load(Ordering::Relaxed), 1);
        let [front] = front_keys(&owner)[..] else {
            panic!("one front on the owner")
        };
        assert!(front_keys(&other).is_empty());
        let mut buf = [0u8; 64];
        let (n, session_addr) = backend.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");

        backend.send_to(b"re", session_addr).unwrap();
        let bk = backend_key(&owner, me);
        assert!(reports(&owner, bk, 1000), "the reply wakes the owner");
        owner.serve(bk);
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"re"[..], service), "from the service");

        let count = crate::listener::gso::MAX_BATCH * 3 + 5;
        for i in 0..count {
            client.send_to(&(i as u32).to_be_bytes(), service).unwrap();
        }
        assert!(reports(&owner, front, 1000), "the front wakes the owner");
        assert!(!reports(&other, k1, 50), "not the other loop");
        assert!(nothing_queued(&port.sock), "nor the service socket");
        serve_all(&mut owner, front);
        for i in 0..count {
            let n = backend.recv(&mut buf).expect("every datagram arrives");
            assert_eq!(&buf[..n], (i as u32).to_be_bytes(), "in order");
        }

        other.remove_port(&port);
        owner.remove_port(&port);
        assert_eq!(port.fronts.load(Ordering::Relaxed), 0);
        assert_eq!(active(&port), 0);
        assert!(owner.entries.is_empty());
    }

    /// A front takes any client's datagrams between its bind and its connect; those reach the
    /// sessions of the clients that sent them (opened as needed), and the front's own session
    /// goes on.
    #[test]
    fn a_front_hands_other_clients_datagrams_to_their_sessions() {
        let Pair {
            loops: [mut owner, _other],
            port,
            backend,
            ..
        } = two_loops();
        let service = port.sock.local_addr().unwrap();
        // A front not connected yet, that any client can reach, for a client that never sends.
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        front.set_nonblocking(true).unwrap();
        let front_addr = front.local_addr().unwrap();
        let quiet: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
        let session = Session::open_for_test(&port, quiet, front, &mut owner);
        let [fk] = front_keys(&owner)[..] else {
            panic!("one front")
        };

        let stray = UdpSocket::bind("127.0.0.1:0").unwrap();
        let stray_addr = stray.local_addr().unwrap();
        stray
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        backend
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stray.send_to(b"stray", front_addr).unwrap();
        readable(&session.front.as_ref().unwrap().sock);
        serve_all(&mut owner, fk);
        let mut buf = [0u8; 64];
        let (n, session_addr) = backend.recv_from(&mut buf).expect("it reaches the backend");
        assert_eq!(&buf[..n], b"stray");
        assert_eq!(active(&port), 2, "in a session of its own");
        assert!(
            owner.entries.contains_key(&fk),
            "the front's session goes on"
        );

        // Its session has a front of its own, on the service's address.
        assert_eq!(port.fronts.load(Ordering::Relaxed), 2);
        backend.send_to(b"re", session_addr).unwrap();
        let bk = backend_key(&owner, stray_addr);
        assert!(reports(&owner, bk, 1000));
        owner.serve(bk);
        let (n, from) = stray.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"re"[..], service));
    }

    /// When a session's endpoint goes away, the client's next datagram through its front opens
    /// a session to a live endpoint (with a front of its own), and the old one closes.
    #[test]
    fn a_front_moves_its_client_off_a_removed_endpoint() {
        let Pair {
            loops: [mut owner, _other],
            port,
            backend: old,
            ..
        } = two_loops();
        let service = port.sock.local_addr().unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"one", service).unwrap();
        readable(&port.sock);
        let key = port_key(&owner);
        owner.serve(key);
        let [front] = front_keys(&owner)[..] else {
            panic!("one front")
        };
        old.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        let n = old.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"one");
        let new = roomy_socket();
        new.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        port.shared
            .balancer
            .update(&[new.local_addr().unwrap()], None);
        port.shared.generation.fetch_add(1, Ordering::Relaxed);

        client.send_to(b"two", service).unwrap();
        assert!(reports(&owner, front, 1000), "through the front");
        serve_all(&mut owner, front);
        let n = new.recv(&mut buf).expect("the live endpoint gets it");
        assert_eq!(&buf[..n], b"two");
        assert!(nothing_queued(&old), "not the removed one");
        assert!(
            !owner.entries.contains_key(&front),
            "the old session closed"
        );
        assert_eq!(active(&port), 1);
        assert_eq!(port.fronts.load(Ordering::Relaxed), 1, "the new session's");
    }

    /// A port bound to the IPv6 wildcard (a `bindAddress` of `::`) serves IPv4 and IPv6
    /// clients alike: each gets a front, its later datagrams come through it, and replies come
    /// from the address it sent to.
    #[test]
    fn fronts_on_a_dual_stack_port() {
        if UdpSocket::bind("[::1]:0").is_err() {
            eprintln!("SKIPPED: fronts_on_a_dual_stack_port needs IPv6 on loopback");
            return;
        }
        let crew = Crew::new(1).unwrap();
        let mut lp = Loop::new(0, crew);
        let backend = roomy_socket();
        backend
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let port = port_on("[::]:0", backend.local_addr().unwrap());
        lp.add_port(port.clone());
        let key = port_key(&lp);
        let service_port = port.sock.local_addr().unwrap().port();
        let mut buf = [0u8; 64];
        for (client_addr, service) in [
            ("127.0.0.1:0", format!("127.0.0.1:{service_port}")),
            ("[::1]:0", format!("[::1]:{service_port}")),
        ] {
            let service: std::net::SocketAddr = service.parse().unwrap();
            let client = UdpSocket::bind(client_addr).unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let fronts = front_keys(&lp).len();
            client.send_to(b"first", service).unwrap();
            readable(&port.sock);
            serve_all(&mut lp, key);
            let (n, session_addr) = backend.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"first");
            let new: Vec<u64> = front_keys(&lp);
            assert_eq!(new.len(), fronts + 1, "{client_addr}: a front");

            client.send_to(b"second", service).unwrap();
            let mut events = vec![EpollEvent::empty(); 8];
            let ready = lp
                .mailbox
                .epoll
                .wait(&mut events, EpollTimeout::from(1000u16))
                .unwrap();
            let keys: Vec<u64> = events[..ready].iter().map(|e| e.data()).collect();
            assert!(
                keys.iter().any(|k| new.contains(k)),
                "{client_addr}: through its front ({keys:?})"
            );
            assert!(nothing_queued(&port.sock), "{client_addr}: not the port");
            for k in keys {
                serve_all(&mut lp, k);
            }
            let n = backend.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"second");

            backend.send_to(b"re", session_addr).unwrap();
            let bk = backend_key(&lp, client.local_addr().unwrap());
            assert!(reports(&lp, bk, 1000));
            lp.serve(bk);
            let (n, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&b"re"[..], service), "{client_addr}");
        }
    }

    /// Past [`udp::FRONTS_PER_PORT`] sessions of one port, new sessions use the service socket
    /// both ways.
    #[test]
    fn fronts_per_port_are_bounded() {
        let Pair {
            loops: [mut owner, _other],
            port,
            backend: _backend,
            ..
        } = two_loops();
        let service = port.sock.local_addr().unwrap();
        let n = udp::FRONTS_PER_PORT + 3;
        let clients: Vec<UdpSocket> = (0..n)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for c in &clients {
            c.send_to(b"hi", service).unwrap();
        }
        readable(&port.sock);
        let key = port_key(&owner);
        serve_all(&mut owner, key);
        assert_eq!(active(&port), n as u64);
        assert_eq!(port.fronts.load(Ordering::Relaxed), udp::FRONTS_PER_PORT);
        assert_eq!(front_keys(&owner).len(), udp::FRONTS_PER_PORT);
    }

    /// Whether `lp`'s epoll set reports `key` within `ms` milliseconds (and reads its wake-up
    /// counter, if it is that which is reported).
    fn reports(lp: &Loop, key: u64, ms: u16) -> bool {
        let mut events = vec![EpollEvent::empty(); 8];
        let n = lp
            .mailbox
            .epoll
            .wait(&mut events, EpollTimeout::from(ms))
            .unwrap();
        events[..n].iter().any(|e| e.data() == key)
    }

    /// Whether `epoll` watches the port's socket: modifying a registration made with
    /// `EPOLLEXCLUSIVE` is refused with `EINVAL`, one that does not exist with `ENOENT`.
    fn watches(epoll: &Epoll, port: &Port) -> bool {
        let mut ev = EpollEvent::new(EpollFlags::EPOLLIN, 0);
        match epoll.modify(port.sock.as_fd(), &mut ev) {
            Err(nix::errno::Errno::ENOENT) => false,
            Err(nix::errno::Errno::EINVAL) => true,
            other => panic!("unexpected answer to the probe: {other:?}"),
        }
    }

    /// The process now runs on one CPU: loop 1 parks (stops watching the service socket, also
    /// one added while it is parked), loop 0 is told to read what loop 1 may have left and
    /// reads on alone; with two CPUs again, loop 1 watches both sockets again.
    #[test]
    fn loops_past_the_cpu_count_park_and_come_back() {
        let Pair {
            loops: [mut first, mut second],
            crew,
            port,
            backend,
        } = two_loops();
        let (k0, k1) = (port_key(&first), port_key(&second));

        first.check_cpus(1);
        assert_eq!(crew.cpus.load(Ordering::Relaxed), 1);
        first.commands();
        second.commands();
        assert!(!first.parked, "loop 0 never parks");
        assert!(second.parked);
        assert!(crew.mailboxes[1].parked.load(Ordering::Relaxed));
        assert!(watches(&first.mailbox.epoll, &port));
        assert!(
            !watches(&second.mailbox.epoll, &port),
            "parked: not watched"
        );
        let later = port_to(backend.local_addr().unwrap());
        first.add_port(later.clone());
        second.add_port(later.clone());
        assert!(watches(&first.mailbox.epoll, &later));
        assert!(
            !watches(&second.mailbox.epoll, &later),
            "added while parked: not watched"
        );

        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(port.sock.local_addr().unwrap()).unwrap();
        client.send(b"one cpu").unwrap();
        readable(&port.sock);
        assert!(reports(&first, k0, 1000), "loop 0 is woken for it");
        assert!(!reports(&second, k1, 50), "the parked loop is not");
        // What loop 1 told loop 0 when it parked: read the socket once.
        first.commands();
        let mut buf = [0u8; 64];
        backend
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = backend
            .recv(&mut buf)
            .expect("the datagram reaches the backend");
        assert_eq!(&buf[..n], b"one cpu");

        first.check_cpus(2);
        first.commands();
        second.commands();
        assert!(!second.parked);
        assert!(watches(&second.mailbox.epoll, &port));
        assert!(watches(&second.mailbox.epoll, &later));
        // Loop 0 is busy: the kernel wakes loop 1 for a new client's datagram (the first
        // client's come to its session's front now).
        let another = UdpSocket::bind("127.0.0.1:0").unwrap();
        another
            .send_to(b"two cpus", port.sock.local_addr().unwrap())
            .unwrap();
        assert!(reports(&second, k1, 1000), "loop 1 watches again");

        first.check_cpus(8);
        assert_eq!(crew.cpus.load(Ordering::Relaxed), 2, "at most every loop");
        second.remove_port(&later);
        first.remove_port(&later);
        assert!(!watches(&first.mailbox.epoll, &later));
        assert!(!watches(&second.mailbox.epoll, &later));
    }

    /// Running loops started on a thread allowed one CPU (as `taskset` or a cpuset leaves the
    /// process) read that mask themselves, and the second one parks while datagrams flow.
    #[test]
    fn running_loops_notice_they_were_given_one_cpu() {
        let cpus = poll::cpus_now().expect("the affinity mask");
        if cpus < 2 {
            eprintln!("SKIPPED: this test needs a process allowed two CPUs (has {cpus})");
            return;
        }
        let loops = std::thread::spawn(|| {
            let mut one = nix::sched::CpuSet::new();
            one.set(0).unwrap();
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).unwrap();
            assert_eq!(poll::cpus_now(), Some(1));
            // Threads inherit the mask of the thread that makes them.
            Loops::start(2).unwrap()
        })
        .join()
        .unwrap();
        let backend = roomy_socket();
        let port = port_to(backend.local_addr().unwrap());
        loops.add(&port);
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(port.sock.local_addr().unwrap()).unwrap();
        backend
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let parked = |l: &Loops| -> Vec<bool> {
            l.crew
                .mailboxes
                .iter()
                .map(|m| m.parked.load(Ordering::Relaxed))
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 64];
        let mut sent = 0u32;
        while parked(&loops) != [false, true] {
            assert!(Instant::now() < deadline, "loop 1 parked within 10 s");
            sent += 1;
            client.send(&sent.to_be_bytes()).unwrap();
            let n = backend
                .recv(&mut buf)
                .expect("each datagram reaches the backend");
            assert_eq!(&buf[..n], sent.to_be_bytes());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(loops.crew.cpus.load(Ordering::Relaxed), 1);
        // Parking is done before the flag is set: loop 1 no longer watches the socket.
        assert!(watches(&loops.crew.mailboxes[0].epoll, &port));
        assert!(!watches(&loops.crew.mailboxes[1].epoll, &port));
        // A new client's datagram comes through the service socket, which loop 0 reads alone.
        let another = UdpSocket::bind("127.0.0.1:0").unwrap();
        another
            .send_to(b"after", port.sock.local_addr().unwrap())
            .unwrap();
        let n = backend.recv(&mut buf).expect("loop 0 reads on alone");
        assert_eq!(&buf[..n], b"after");
    }

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
