//! Busy TCP ports accepted by every worker, with one wake-up per connection: each worker has
//! a descriptor of its own for the port's listening socket in its reactor, and every such
//! registration is `EPOLLEXCLUSIVE`, so a new connection wakes one worker that sleeps in
//! `epoll_wait` rather than all of them (what nginx's workers do).
//!
//! Why: a port accepted by one event loop queues its new connections on that loop while the
//! other CPUs' loops sleep. On these 2-vCPU guests, with halt polling off, that left 9.5 to
//! 10.9% of the machine idle in the bench's connection rounds (nginx: 3.6 to 6.2%), most of it a
//! halted vCPU coming back for a task woken onto it. Accepted by both loops this way, 7
//! alternating pairs of `ONLY_CONN=1` runs (9 rounds each against nginx; `UP_NOSHARE` switched
//! it off for the other run of each pair, a patch not kept): the median per-round ratio to
//! nginx's rate went from 0.915-0.933 to 0.941-0.976, higher in every pair, with the idle share
//! at nginx's (4.3 to 6.7%); proxy CPU per connection rose from 1.00-1.06 to 1.08-1.16 times
//! nginx's, since each loop now sleeps and wakes about once a connection, as nginx's workers
//! do. The same descriptor in both reactors without the flag (measured earlier) woke both loops
//! for every connection and cost more CPU than it filled.
//!
//! Only busy ports ([`super::tcp::BUSY_ACCEPTS`]): every shared port holds a descriptor more
//! per extra worker, against a budget ([`reserve`]), and a quiet port gains nothing.
//!
//! How: tokio registers every socket edge-triggered for reading, writing and hang-up, and has no
//! way to ask for `EPOLLEXCLUSIVE`, which the kernel only accepts when a registration is added.
//! So once tokio has registered a listener, the registration is deleted and added again,
//! exclusive, with the same key (`data`, which tokio's reactor reads back to find the socket's
//! waiters): the kernel lists each registration and its key in the epoll instance's
//! `/proc/self/fdinfo` entry, and a worker's epoll instance is reached through a duplicate of
//! its descriptor (`pidfd_getfd` on this very process), found once at start by the probe socket
//! it lists. An epoll instance nested in tokio's would not do: the kernel counts an exclusive
//! waiter as woken only when a thread sleeps in that very instance's `epoll_wait`. Where any of
//! this is refused (no `/proc`, a seccomp profile without `pidfd_getfd`), each port stays with
//! one worker, as before.
//!
//! What it costs, once per port that turns busy: the kernel writes an instance's fdinfo under
//! that instance's mutex, one line per registration, so reading it holds up the worker's own
//! `epoll_wait` and `epoll_ctl` meanwhile. Measured with a current-thread runtime holding 50,
//! 500 and 5,000 registrations: 0.08, 1.2 and 8 ms per read, and a port is shared with two
//! reads (its worker's instance and the other's, on 2 CPUs). The key cannot be had any other
//! way: tokio does not expose it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use nix::sys::resource::{getrlimit, Resource};
use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};
use tokio::runtime::Handle;

/// Descriptors that shared ports hold now, against [`budget`].
static SHARED: AtomicUsize = AtomicUsize::new(0);

/// How many descriptors shared ports may hold: a tenth of the process's limit. Every port
/// shared this way holds one more descriptor per extra worker, and all 10,000 ports of a large
/// node on 2 workers would need 20,000, past the limit these hosts allow (`RLIMIT_NOFILE`
/// 20,000; [`super::workers`] says what running out cost).
fn budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft as usize) / 10
    })
}

/// One descriptor of a shared port, counted against the budget until dropped.
#[derive(Debug)]
pub(crate) struct Reserved(());

impl Drop for Reserved {
    fn drop(&mut self) {
        SHARED.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Room for one more descriptor of a shared port, if the budget has it.
pub(crate) fn reserve() -> Option<Reserved> {
    SHARED
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < budget()).then_some(n + 1)
        })
        .ok()
        .map(|_| Reserved(()))
}

/// One registration in an epoll instance, as its fdinfo lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Registration {
    pub events: u32,
    pub data: u64,
}

/// The registration of descriptor `fd`, whose file has inode `ino`, in an epoll instance's
/// fdinfo text, if it has one. Each line reads
/// `tfd: <fd> events: <hex> data: <hex> pos:<n> ino:<hex> sdev:<hex>`. The inode is matched
/// too: a registration outlives its descriptor number while a duplicate holds the file open, so
/// a number alone may name a stale one.
pub(crate) fn registration(fdinfo: &str, fd: RawFd, ino: u64) -> Option<Registration> {
    fdinfo.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next()? != "tfd:" || words.next()?.parse::<RawFd>().ok()? != fd {
            return None;
        }
        if words.next()? != "events:" {
            return None;
        }
        let events = u32::from_str_radix(words.next()?, 16).ok()?;
        if words.next()? != "data:" {
            return None;
        }
        let data = u64::from_str_radix(words.next()?, 16).ok()?;
        let listed = words.find_map(|w| w.strip_prefix("ino:"))?;
        (u64::from_str_radix(listed, 16).ok()? == ino).then_some(Registration { events, data })
    })
}

/// The descriptor number and inode by which epoll instances list `fd`.
fn target(fd: BorrowedFd<'_>) -> io::Result<(RawFd, u64)> {
    Ok((fd.as_raw_fd(), nix::sys::stat::fstat(fd)?.st_ino))
}

fn fdinfo(fd: RawFd) -> io::Result<String> {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
}

/// The epoll instance of the runtime behind `handle`: a probe socket is registered with it,
/// and the instance listing the probe is the one.
pub(crate) fn reactor_of(handle: &Handle) -> io::Result<Epoll> {
    let (a, _b) = std::os::unix::net::UnixDatagram::pair()?;
    a.set_nonblocking(true)?;
    let probe = {
        let _enter = handle.enter();
        tokio::net::UnixDatagram::from_std(a)?
    };
    let (probe_fd, probe_ino) = target(probe.as_fd())?;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(entry) = entry else { continue };
        let Some(n) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        match std::fs::read_link(entry.path()) {
            Ok(link) if link.as_os_str() == "anon_inode:[eventpoll]" => {}
            _ => continue,
        }
        let Ok(info) = fdinfo(n) else { continue };
        if registration(&info, probe_fd, probe_ino).is_some() {
            let me = pidfd_open(getpid(), PidfdFlags::empty())?;
            let dup = pidfd_getfd(&me, n, PidfdGetfdFlags::empty())?;
            return Ok(Epoll(dup));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no epoll instance lists the probe socket",
    ))
}

/// `fd`'s registration in `epoll`, as the kernel lists it.
fn registered(epoll: &Epoll, fd: BorrowedFd<'_>) -> io::Result<Registration> {
    let (n, ino) = target(fd)?;
    registration(&fdinfo(epoll.0.as_raw_fd())?, n, ino).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "the listener is not registered with this reactor",
        )
    })
}

/// Replaces `fd`'s registration in `epoll` by an exclusive one with the same key. On failure
/// the registration is as it was.
pub(crate) fn make_exclusive(epoll: &Epoll, fd: BorrowedFd<'_>) -> io::Result<()> {
    let reg = registered(epoll, fd)?;
    epoll.delete(fd)?;
    let exclusive = EpollFlags::EPOLLIN | EpollFlags::EPOLLET | EpollFlags::EPOLLEXCLUSIVE;
    if let Err(e) = epoll.add(fd, EpollEvent::new(exclusive, reg.data)) {
        let before = EpollFlags::from_bits_truncate(reg.events as i32);
        epoll.add(fd, EpollEvent::new(before, reg.data))?;
        return Err(e.into());
    }
    Ok(())
}

/// Whether `fd` is registered in `epoll` exclusively.
#[cfg(test)]
pub(crate) fn is_exclusive(epoll: &Epoll, fd: BorrowedFd<'_>) -> bool {
    registered(epoll, fd).is_ok_and(|r| r.events & (EpollFlags::EPOLLEXCLUSIVE.bits() as u32) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_registration_from_fdinfo() {
        let info = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t1057\n\
                    tfd:        9 events: 8000201d data:     55d1e4c3a2b0  pos:0 ino:2a sdev:8\n\
                    tfd:       12 events:       19 data:                1  pos:0 ino:2b sdev:8\n";
        assert_eq!(
            registration(info, 9, 0x2a),
            Some(Registration {
                events: 0x8000_201d,
                data: 0x55d1_e4c3_a2b0
            })
        );
        assert_eq!(
            registration(info, 12, 0x2b),
            Some(Registration {
                events: 0x19,
                data: 1
            })
        );
        // The number of a descriptor whose file is another one: a stale registration.
        assert_eq!(registration(info, 9, 0x2b), None);
        assert_eq!(registration(info, 1, 0x2a), None);
        assert_eq!(
            registration("tfd: x events: 1 data: 2 pos:0 ino:1", 1, 1),
            None
        );
        assert_eq!(registration("tfd: 1 events: 1 data: 2", 1, 1), None);
    }

    #[test]
    fn a_listener_registered_by_tokio_becomes_exclusive_and_still_accepts() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let epoll = reactor_of(rt.handle()).expect("reactor");
        let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std.set_nonblocking(true).unwrap();
        let addr = std.local_addr().unwrap();
        let l = {
            let _e = rt.enter();
            tokio::net::TcpListener::from_std(std).unwrap()
        };
        assert!(!is_exclusive(&epoll, l.as_fd()));
        make_exclusive(&epoll, l.as_fd()).unwrap();
        assert!(is_exclusive(&epoll, l.as_fd()));
        let got = rt.block_on(async {
            let c = std::thread::spawn(move || std::net::TcpStream::connect(addr).map(|_| ()));
            let r = tokio::time::timeout(std::time::Duration::from_secs(10), l.accept()).await;
            c.join().unwrap().unwrap();
            r
        });
        assert!(matches!(got, Ok(Ok(_))), "{got:?}");
    }
}
