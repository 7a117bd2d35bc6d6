//! TCP relay: small messages through a per-thread buffer, bulk data with `splice(2)`
//! (socket → pipe → socket, the bytes never enter userspace).
//!
//! Each direction starts by copying: a read and a write, the cheapest way to move a
//! request-sized message (splice costs a third call and pipe bookkeeping per message). The
//! first read that fills the buffer marks the direction as bulk, and it splices from then on,
//! as HAProxy's `splice-auto` does. The buffer belongs to the worker thread, not the
//! connection: it is used between a read and the write that follows, with no await between.
//!
//! Pipes come from a process-wide pool and are held only while data is moving: a direction
//! takes a pipe when its source is readable, and gives it back (empty) as soon as the source
//! would block. An idle proxied connection therefore holds no pipe and no buffer, only its two
//! sockets; this is what keeps memory per idle connection low and file descriptors at two per
//! connection. When no pipe can be had (out of descriptors), a chunk is copied through a small
//! userspace buffer instead, so the connection degrades instead of failing.
//!
//! Semantics match `tokio::io::copy_bidirectional`: each direction runs until EOF, then shuts
//! down the write side of its destination (half-close propagates); an error in either direction
//! ends both. One difference: the direction that ends last leaves its FIN to the close that
//! follows [`relay`], since by then both receive queues are empty and a close sends a FIN, not a
//! reset; that saves a system call on every connection.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::sys::socket::{recv, MsgFlags};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes asked of one splice call; also the pipe size requested.
const CHUNK: usize = 1 << 18;
/// Empty pipes kept for reuse.
const MAX_IDLE_PIPES: usize = 256;
/// Size of the copy buffer; a read that fills it switches the direction to splice.
const COPY_BUF: usize = 16 * 1024;

thread_local! {
    static COPY: RefCell<Box<[u8]>> = RefCell::new(vec![0; COPY_BUF].into_boxed_slice());
}

#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

#[derive(Debug, Default)]
struct Pool {
    idle: Mutex<Vec<Pipe>>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(Pool::default)
}

impl Pool {
    fn get(&self) -> io::Result<Pipe> {
        if let Some(p) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(p);
        }
        let (read, write) =
            nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        // A bigger pipe means fewer wake-ups per megabyte; refusal (pipe-max-size) is harmless.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(CHUNK as i32));
        Ok(Pipe { read, write })
    }

    /// Takes back an *empty* pipe.
    fn put(&self, p: Pipe) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_PIPES {
            idle.push(p);
        }
    }
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// Moves everything `src` sends to `dst` until EOF, then shuts down `dst`'s write side unless
/// the other direction has already ended (`ended`, which the first to end sets).
/// Returns the bytes moved.
async fn pump(src: &TcpStream, dst: &TcpStream, ended: &AtomicBool) -> io::Result<u64> {
    let mut total = 0u64;
    let mut pipe: Option<Pipe> = None;
    let mut bulk = false;
    loop {
        if !bulk {
            match copy_chunk(src, dst).await? {
                0 => break,
                n => {
                    total += n as u64;
                    bulk = n == COPY_BUF;
                    continue;
                }
            }
        }
        let p = match pipe.take() {
            Some(p) => p,
            None => {
                src.readable().await?;
                match pool().get() {
                    Ok(p) => p,
                    Err(_) => match copy_chunk(src, dst).await? {
                        0 => break,
                        n => {
                            total += n as u64;
                            continue;
                        }
                    },
                }
            }
        };
        let filled = src.try_io(Interest::READABLE, || {
            splice(src, None, &p.write, None, CHUNK, flags()).map_err(io::Error::from)
        });
        let mut in_pipe = match filled {
            Ok(0) => {
                pool().put(p);
                break;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Nothing to read now: give the pipe back while we wait.
                pool().put(p);
                continue;
            }
            Err(e) => {
                pool().put(p);
                return Err(e);
            }
        };
        while in_pipe > 0 {
            dst.writable().await?;
            let drained = dst.try_io(Interest::WRITABLE, || {
                splice(&p.read, None, dst, None, in_pipe, flags()).map_err(io::Error::from)
            });
            match drained {
                Ok(n) => {
                    in_pipe -= n;
                    total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The pipe still holds data: drop it rather than pool it.
                Err(e) => return Err(e),
            }
        }
        pipe = Some(p); // empty again: try to refill without waiting
    }
    // Both pumps run in one task, so the flag is never contended.
    if !ended.swap(true, Ordering::Relaxed) {
        SockRef::from(dst).shutdown(std::net::Shutdown::Write).ok();
    }
    Ok(total)
}

/// One chunk through the thread's copy buffer (also the fallback when no pipe can be had).
/// Returns the bytes moved, 0 at EOF. What the destination does not take at once (its send
/// buffer is full) is kept in a buffer of this call until it does.
async fn copy_chunk(src: &TcpStream, dst: &TcpStream) -> io::Result<usize> {
    loop {
        let step = COPY.with(|buf| -> io::Result<Option<(usize, Vec<u8>)>> {
            let mut buf = buf.borrow_mut();
            let n = match read_once(src, &mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(Some((0, Vec::new())));
            }
            let written = match dst.try_write(&buf[..n]) {
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            Ok(Some((n, buf[written..n].to_vec())))
        })?;
        let Some((n, rest)) = step else {
            src.readable().await?;
            continue;
        };
        let mut off = 0;
        while off < rest.len() {
            dst.writable().await?;
            match dst.try_write(&rest[off..]) {
                Ok(w) => off += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        return Ok(n);
    }
}

/// Reads what `src` has, like `try_read`. A read that does not fill `buf` has emptied the
/// socket's receive queue, so the socket's readiness is cleared at once: the next wait goes
/// straight to the reactor instead of through one more `recv` that fails with `EAGAIN` (nginx
/// does the same). Nothing is missed: data that arrives later is a new readiness event, which
/// the clear does not erase (tokio matches it by tick), and a FIN that came with the data
/// leaves read-closed readiness, which a clear keeps.
fn read_once(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut short = None;
    let res = src.try_io(Interest::READABLE, || {
        let n = recv(src.as_raw_fd(), buf, MsgFlags::empty()).map_err(io::Error::from)?;
        if n > 0 && n < buf.len() {
            short = Some(n);
            // WouldBlock is how `try_io` is told to clear readiness.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (res, short) {
        (_, Some(n)) => Ok(n),
        (res, None) => res,
    }
}

/// Relays both directions until both have ended; returns bytes (client→backend,
/// backend→client). The caller closes both sockets next: that close sends the last FIN.
///
/// # Errors
/// An I/O error in either direction (the other is then abandoned).
pub async fn relay(client: &TcpStream, backend: &TcpStream) -> io::Result<(u64, u64)> {
    let ended = AtomicBool::new(false);
    tokio::try_join!(pump(client, backend, &ended), pump(backend, client, &ended))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Two connected loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// A short message and the FIN right behind it usually arrive in one readiness event; the
    /// short read clears readiness, and the end must still be seen (read-closed survives the
    /// clear). Repeated, since the two can also arrive as separate events.
    #[tokio::test]
    async fn a_short_message_and_its_fin_both_get_through() {
        for round in 0..50u32 {
            let (mut client, client_side) = pair().await;
            let (backend_side, mut backend) = pair().await;
            let relay = tokio::spawn(async move { relay(&client_side, &backend_side).await });
            let msg = format!("reply {round}");
            backend.write_all(msg.as_bytes()).await.unwrap();
            backend.shutdown().await.unwrap();
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
                .await
                .expect("the FIN reached the client")
                .unwrap();
            assert_eq!(got, msg.as_bytes());
            client.shutdown().await.unwrap();
            let (up, down) = tokio::time::timeout(Duration::from_secs(5), relay)
                .await
                .expect("the relay ended")
                .unwrap()
                .unwrap();
            assert_eq!((up, down), (0, msg.len() as u64));
            // The client's FIN reaches the backend through the close after the relay (the
            // direction that ended last does not shut down): an orderly end, not a reset.
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), backend.read_to_end(&mut rest))
                .await
                .expect("the backend saw the end")
                .expect("an orderly end");
            assert!(rest.is_empty());
        }
    }
}
