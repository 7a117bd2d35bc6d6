//! Zero-copy TCP relay with `splice(2)`: socket → pipe → socket, the bytes never enter
//! userspace.
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
//! ends both.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Mutex, OnceLock};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes asked of one splice call; also the pipe size requested.
const CHUNK: usize = 1 << 18;
/// Empty pipes kept for reuse.
const MAX_IDLE_PIPES: usize = 256;

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

/// Moves everything `src` sends to `dst` until EOF, then shuts down `dst`'s write side.
/// Returns the bytes moved.
async fn pump(src: &TcpStream, dst: &TcpStream) -> io::Result<u64> {
    let mut total = 0u64;
    let mut pipe: Option<Pipe> = None;
    loop {
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
    SockRef::from(dst).shutdown(std::net::Shutdown::Write).ok();
    Ok(total)
}

/// Fallback when no pipe can be had: one chunk through a userspace buffer. Returns 0 at EOF.
async fn copy_chunk(src: &TcpStream, dst: &TcpStream) -> io::Result<usize> {
    let mut buf = vec![0u8; 16 * 1024];
    let n = loop {
        match src.try_read(&mut buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => src.readable().await?,
            Err(e) => return Err(e),
        }
    };
    let mut off = 0;
    while off < n {
        dst.writable().await?;
        match dst.try_write(&buf[off..n]) {
            Ok(w) => off += w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Relays both directions until both have ended; returns bytes (client→backend,
/// backend→client).
///
/// # Errors
/// An I/O error in either direction (the other is then abandoned).
pub async fn relay(client: &TcpStream, backend: &TcpStream) -> io::Result<(u64, u64)> {
    tokio::try_join!(pump(client, backend), pump(backend, client))
}
