//! UDP datagrams in batches: everything a socket has queued is read at once, and runs of
//! datagrams for one destination leave in one `sendmsg` with UDP segmentation offload
//! (`UDP_SEGMENT`, Linux 4.18).
//!
//! Why: under a flood the proxy's cost is the kernel path each send takes (routing, netfilter,
//! conntrack, the veth hop), not its own code. A run sent with `UDP_SEGMENT` takes that path
//! once as one large packet and is cut back into the original datagrams at the last moment (the
//! device, or the receiving socket), so the receiver still sees every datagram whole and in
//! order. Nothing waits to fill a batch: a batch is what was already queued, so a lone
//! request/response datagram goes out at once, by a plain send.
//!
//! The kernel refuses a run whose segment size exceeds the path MTU (`EINVAL`) or whose device
//! cannot checksum it (`EIO`); nothing is sent then. The run is resent datagram by datagram and
//! the socket's largest segment size is lowered, so the refusal is paid once.

use std::cell::RefCell;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, sendmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
};

/// Largest UDP payload over IPv4 (65,535 minus IP and UDP headers), plus room to spare.
pub(crate) const MAX_DATAGRAM: usize = 65_536;

/// Most datagrams one batch holds. The kernel's limit on segments per send (`UDP_MAX_SEGMENTS`)
/// is 64 up to Linux 6.x; a larger batch would only be split again.
pub(crate) const MAX_BATCH: usize = 64;

/// Largest total payload of one segmented send: one IPv4 packet's worth.
const MAX_RUN_BYTES: usize = 65_507;

/// The largest segment size a fresh socket tries: a 1,500-byte MTU less the IPv4 and UDP
/// headers. Larger datagrams go one per send, as before; smaller paths lower it on refusal.
pub(crate) const INITIAL_MAX_SEGMENT: usize = 1_472;

/// Datagrams read from one socket by one `recvmmsg`, each in its own slot of one buffer.
///
/// Why one `recvmmsg` and not a `recv` per datagram until the socket would block: a lone
/// request then costs one receive instead of two (the second only to learn that nothing more
/// is queued: `recvmmsg` returns fewer datagrams than it had room for), and a flood 64
/// datagrams per system call instead of one. Each slot holds the largest datagram, so nothing is
/// ever truncated; the buffer is 4 MiB of address space, of which only the pages datagrams were
/// written to become resident.
pub(crate) struct Batch {
    buf: Vec<u8>,
    /// Message headers for IPv4 sockets, and for IPv6 sockets ([`Family`]).
    headers: [MultiHeaders<SockaddrStorage>; 2],
    /// Source (for a listener) and the datagram's bytes in `buf`.
    pub(crate) items: Vec<(SocketAddr, Range<usize>)>,
}

/// The address family of a socket a batch is read from.
///
/// Why the batch must know: `recvmmsg` takes each slot's address length as the room for the
/// source address and leaves the length written there, and nix's `MultiHeaders` never resets
/// it. After an IPv4 socket's read (16 bytes) a slot had room for 16 bytes only, and an IPv6
/// source read into it kept the last 8 bytes of the address before: `::1` came out as
/// `::ffff:127.0.0.1` once an IPv4 backend had been read on the same thread. Each family has
/// its headers, so a slot's length is always its family's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    pub(crate) fn of(addr: &SocketAddr) -> Family {
        if addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

thread_local! {
    /// One batch per UDP loop thread, shared by every socket that runs on it. It is only held
    /// between reading a socket and sending what was read.
    static BATCH: RefCell<Batch> = RefCell::new(Batch {
        buf: vec![0; MAX_BATCH * MAX_DATAGRAM],
        headers: [
            MultiHeaders::preallocate(MAX_BATCH, None),
            MultiHeaders::preallocate(MAX_BATCH, None),
        ],
        items: Vec::with_capacity(MAX_BATCH),
    });
}

impl Batch {
    /// Runs `f` with this thread's batch, emptied.
    pub(crate) fn with<R>(f: impl FnOnce(&mut Batch) -> R) -> R {
        BATCH.with(|cell| {
            let mut batch = cell.borrow_mut();
            batch.items.clear();
            f(&mut batch)
        })
    }

    /// Reads what `sock` has queued, up to [`MAX_BATCH`] datagrams, in one system call, and
    /// says whether that was all. `family`: the socket's. `peer`: the address to record for a
    /// connected socket (its datagrams all come from its peer); `None` records each datagram's
    /// source.
    pub(crate) fn fill(
        &mut self,
        sock: &impl AsRawFd,
        family: Family,
        peer: Option<SocketAddr>,
    ) -> Fill {
        self.items.clear();
        // On the stack: a read allocates nothing.
        let mut chunks = self.buf.chunks_mut(MAX_DATAGRAM);
        let mut slots: [[IoSliceMut<'_>; 1]; MAX_BATCH] =
            std::array::from_fn(|_| [IoSliceMut::new(chunks.next().expect("a slot per datagram"))]);
        let received = match recvmmsg(
            sock.as_raw_fd(),
            &mut self.headers[family as usize],
            slots.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(r) => r,
            Err(Errno::EAGAIN) => return Fill::Drained,
            Err(e) => return Fill::Failed(io::Error::from(e)),
        };
        for (i, msg) in received.enumerate() {
            let from = peer.or_else(|| msg.address.and_then(|a| to_std(&a)));
            // A source that is neither IPv4 nor IPv6 cannot come from a UDP socket.
            if let Some(from) = from {
                let start = i * MAX_DATAGRAM;
                self.items.push((from, start..start + msg.bytes));
            }
        }
        if self.items.len() < MAX_BATCH {
            Fill::Drained
        } else {
            Fill::Full
        }
    }

    /// Gives IPv4-mapped sources as the IPv4 addresses they stand for.
    pub(crate) fn unmap(&mut self) {
        for (from, _) in &mut self.items {
            if let SocketAddr::V6(v6) = from {
                if let Some(v4) = v6.ip().to_ipv4_mapped() {
                    *from = SocketAddr::new(v4.into(), v6.port());
                }
            }
        }
    }

    pub(crate) fn bytes(&self, range: Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    /// Every datagram read, in order.
    pub(crate) fn datagrams(&self) -> Vec<&[u8]> {
        self.items
            .iter()
            .map(|(_, r)| self.bytes(r.clone()))
            .collect()
    }
}

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

/// Why [`Batch::fill`] stopped.
#[derive(Debug)]
pub(crate) enum Fill {
    /// The socket had nothing more queued.
    Drained,
    /// The batch is full; the socket may hold more.
    Full,
    /// A receive failed.
    Failed(io::Error),
}

/// Splits datagrams of these sizes, in order, into runs that one segmented send can carry: every
/// datagram of a run has the first one's size (the segment size) except the last, which may be
/// shorter; at most `MAX_BATCH` datagrams and `MAX_RUN_BYTES` in all. A datagram larger than
/// `max_segment` makes a run of its own.
pub(crate) fn runs(sizes: &[usize], max_segment: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < sizes.len() {
        let segment = sizes[i];
        let mut end = i + 1;
        let mut total = segment;
        if segment <= max_segment && segment > 0 {
            while end < sizes.len()
                && end - i < MAX_BATCH
                && sizes[end] <= segment
                && sizes[end] > 0
                && total + sizes[end] <= MAX_RUN_BYTES
            {
                total += sizes[end];
                end += 1;
                if sizes[end - 1] < segment {
                    break; // a shorter datagram ends the run
                }
            }
        }
        out.push(i..end);
        i = end;
    }
    out
}

/// What became of one run.
#[derive(Debug)]
pub(crate) enum Sent {
    /// Every datagram left; this many bytes.
    All(usize),
    /// The socket's buffer is full: the first `n` datagrams left, the rest did not.
    Blocked { n: usize, bytes: usize },
    /// A send failed for another reason after `n` datagrams left.
    Failed {
        n: usize,
        bytes: usize,
        error: io::Error,
    },
}

/// Sends one run (as made by [`runs`]) to `dest`, or to the socket's peer if `None`. Calls the
/// socket directly: a socket that has never been polled is writable as far as the kernel is
/// concerned, whatever the runtime has seen of it.
pub(crate) fn send_run(
    sock: &impl AsRawFd,
    datagrams: &[&[u8]],
    dest: Option<SocketAddr>,
    max_segment: &AtomicUsize,
) -> Sent {
    let fd = sock.as_raw_fd();
    let addr = dest.map(SockaddrStorage::from);
    if datagrams.len() > 1 {
        let segment = datagrams[0].len();
        if segment <= max_segment.load(Ordering::Relaxed) {
            let iov: Vec<IoSlice<'_>> = datagrams.iter().map(|d| IoSlice::new(d)).collect();
            let seg = segment as u16;
            match sendmsg(
                fd,
                &iov,
                &[ControlMessage::UdpGsoSegments(&seg)],
                MsgFlags::MSG_DONTWAIT,
                addr.as_ref(),
            ) {
                Ok(n) => return Sent::All(n),
                Err(Errno::EAGAIN) => return Sent::Blocked { n: 0, bytes: 0 },
                // Nothing left. Too large for the path (EINVAL): never try this size again on
                // this socket. No checksum offload (EIO) or no UDP_SEGMENT at all: never again.
                Err(Errno::EINVAL) => {
                    max_segment.fetch_min(segment - 1, Ordering::Relaxed);
                }
                Err(Errno::EIO | Errno::ENOPROTOOPT | Errno::EOPNOTSUPP) => {
                    max_segment.store(0, Ordering::Relaxed);
                }
                Err(e) => {
                    return Sent::Failed {
                        n: 0,
                        bytes: 0,
                        error: io::Error::from(e),
                    }
                }
            }
        }
    }
    let mut bytes = 0;
    for (n, d) in datagrams.iter().enumerate() {
        match sendmsg(
            fd,
            &[IoSlice::new(d)],
            &[],
            MsgFlags::MSG_DONTWAIT,
            addr.as_ref(),
        ) {
            Ok(sent) => bytes += sent,
            Err(Errno::EAGAIN) => return Sent::Blocked { n, bytes },
            Err(e) => {
                return Sent::Failed {
                    n,
                    bytes,
                    error: io::Error::from(e),
                }
            }
        }
    }
    Sent::All(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    fn lens(sizes: &[usize], max: usize) -> Vec<Vec<usize>> {
        runs(sizes, max)
            .into_iter()
            .map(|r| sizes[r].to_vec())
            .collect()
    }

    #[test]
    fn runs_follow_the_kernel_rules() {
        // Equal sizes make one run; a shorter one ends it; a larger one starts a new run.
        assert_eq!(
            lens(&[100, 100, 100, 40, 100, 200, 200], 1472),
            vec![vec![100, 100, 100, 40], vec![100], vec![200, 200]]
        );
        // Above the largest segment: one datagram per run.
        assert_eq!(
            lens(&[2000, 2000, 100], 1472),
            vec![vec![2000], vec![2000], vec![100]]
        );
        // At most 64 per run.
        let many = vec![10; 150];
        assert_eq!(runs(&many, 1472), vec![0..64, 64..128, 128..150]);
        // At most one IPv4 packet's payload per run: 44 x 1472 = 64,768; a 45th would not fit.
        let big = vec![1472; 50];
        assert_eq!(runs(&big, 1472), vec![0..44, 44..50]);
        // Empty datagrams are legal and travel alone.
        assert_eq!(lens(&[0, 0, 5], 1472), vec![vec![0], vec![0], vec![5]]);
        assert!(runs(&[], 1472).is_empty());
    }

    #[test]
    fn runs_cover_every_datagram_in_order() {
        let sizes: Vec<usize> = (0..500)
            .map(|i| [100, 100, 100, 7, 1500, 0][i % 6])
            .collect();
        let r = runs(&sizes, 1472);
        let mut next = 0;
        for run in &r {
            assert_eq!(run.start, next);
            assert!(run.end > run.start);
            next = run.end;
        }
        assert_eq!(next, sizes.len());
    }

    /// Over loopback a segmented run arrives as separate datagrams, each whole and in order, and
    /// a refused segment size falls back to one send per datagram.
    #[test]
    fn a_run_arrives_as_its_datagrams() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let data: Vec<Vec<u8>> = (0..10u8)
            .map(|i| vec![i; if i == 9 { 30 } else { 300 }])
            .collect();
        let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        for max in [INITIAL_MAX_SEGMENT, 0] {
            let max_segment = AtomicUsize::new(max);
            let sent = send_run(&tx, &refs, Some(to), &max_segment);
            assert!(matches!(sent, Sent::All(2730)), "{sent:?}");
            // Segmentation was accepted, not refused and retried one by one.
            assert_eq!(max_segment.load(Ordering::Relaxed), max);
            let mut buf = [0u8; 2048];
            for d in &data {
                let (n, from) = rx.recv_from(&mut buf).unwrap();
                assert_eq!(from, tx.local_addr().unwrap());
                assert_eq!(&buf[..n], d.as_slice());
            }
        }
    }

    /// One read takes everything queued, in order, and says it was all; more than a batch's
    /// worth is read in batches; an empty socket is drained; large datagrams pass whole.
    #[test]
    fn fill_reads_what_is_queued_in_one_call() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let from = tx.local_addr().unwrap();
        Batch::with(|b| {
            assert!(matches!(b.fill(&rx, Family::V4, None), Fill::Drained));
            assert!(b.items.is_empty());
            for d in [&b"one"[..], b"two", b"three"] {
                tx.send_to(d, to).unwrap();
            }
            assert!(matches!(b.fill(&rx, Family::V4, None), Fill::Drained));
            let got: Vec<&[u8]> = b.items.iter().map(|(_, r)| b.bytes(r.clone())).collect();
            assert_eq!(got, [&b"one"[..], b"two", b"three"]);
            assert!(b.items.iter().all(|(a, _)| *a == from));
            for i in 0..MAX_BATCH + 6 {
                tx.send_to(&[i as u8; 10], to).unwrap();
            }
            assert!(matches!(b.fill(&rx, Family::V4, None), Fill::Full));
            assert_eq!(b.items.len(), MAX_BATCH);
            assert_eq!(
                b.bytes(b.items[MAX_BATCH - 1].1.clone())[0],
                (MAX_BATCH - 1) as u8
            );
            assert!(matches!(b.fill(&rx, Family::V4, None), Fill::Drained));
            assert_eq!(b.items.len(), 6);
            assert_eq!(b.bytes(b.items[0].1.clone())[0], MAX_BATCH as u8);
            let big = vec![7u8; 60_000];
            tx.send_to(&big, to).unwrap();
            let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
            assert!(matches!(b.fill(&rx, Family::V4, Some(peer)), Fill::Drained));
            assert_eq!(b.items.len(), 1);
            assert_eq!(
                b.items[0].0, peer,
                "a connected socket's datagrams are its peer's"
            );
            assert!(b.bytes(b.items[0].1.clone()) == big.as_slice());
        });
    }

    /// An ICMP error queued on a connected socket is reported by the read, not lost.
    #[test]
    fn fill_reports_a_refused_peer() {
        let gone = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dead = gone.local_addr().unwrap();
        drop(gone);
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.connect(dead).unwrap();
        s.set_nonblocking(true).unwrap();
        s.send(b"x").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let refused = loop {
            let why = Batch::with(|b| b.fill(&s, Family::V4, None));
            match why {
                Fill::Failed(e) => break e.kind() == io::ErrorKind::ConnectionRefused,
                _ if std::time::Instant::now() > deadline => break false,
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        assert!(refused, "ECONNREFUSED from the port-unreachable reply");
    }

    /// An IPv6 socket's sources come out whole after an IPv4 socket was read on the thread
    /// (see [`Family`]).
    #[test]
    fn fill_keeps_ipv6_sources_whole_after_an_ipv4_read() {
        let Ok(c6) = UdpSocket::bind("[::1]:0") else {
            eprintln!(
                "SKIPPED: fill_keeps_ipv6_sources_whole_after_an_ipv4_read needs IPv6 on loopback"
            );
            return;
        };
        let rx4 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx6 = UdpSocket::bind("[::]:0").unwrap();
        for s in [&rx4, &rx6] {
            s.set_nonblocking(true).unwrap();
        }
        let c4 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let p6 = rx6.local_addr().unwrap().port();
        let queued = |s: &UdpSocket| {
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(s),
                nix::poll::PollFlags::POLLIN,
            )];
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5_000u16)).unwrap() == 1
        };
        Batch::with(|b| {
            // A mapped IPv4 source into the IPv6 slots, then an IPv4 read.
            c4.send_to(b"4", ("127.0.0.1", p6)).unwrap();
            assert!(queued(&rx6));
            b.fill(&rx6, Family::V6, None);
            c4.send_to(b"4", rx4.local_addr().unwrap()).unwrap();
            assert!(queued(&rx4));
            b.fill(&rx4, Family::V4, None);
            assert_eq!(b.items[0].0, c4.local_addr().unwrap());
            c6.send_to(b"6", ("::1", p6)).unwrap();
            assert!(queued(&rx6));
            b.fill(&rx6, Family::V6, None);
            assert_eq!(b.items[0].0, c6.local_addr().unwrap());
        });
    }
}
