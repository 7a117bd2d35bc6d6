//! Proxy port allocation.
//!
//! Ports are picked here, not by the kernel, even when no range is configured: `bind()` to port
//! 0 makes the kernel search its ephemeral range and re-check conflicts against every bound port,
//! which profiled as O(n²) (10,000 service ports took 2.5 s, mostly in `inet_bind_conflict`).
//! With no `portRange` the kernel's own ephemeral range (`ip_local_port_range`) is used, so the
//! semantics match kube-proxy's "kernel-chosen" ports. A rotating cursor from a random start
//! probes linearly; a port is taken only once its bind succeeded (the original marked ports used
//! before binding and leaked them when the bind failed).

use std::io;
use std::ops::RangeInclusive;

use rand::Rng;

use crate::config::PortRange;

/// The kernel's default ephemeral range, used when `/proc` cannot be read.
const DEFAULT_EPHEMERAL: RangeInclusive<u16> = 32768..=60999;

/// Hands out proxy ports.
#[derive(Debug, Clone)]
pub struct PortAllocator {
    range: RangeInclusive<u16>,
    /// Kernel-chosen semantics: fall back to port 0 if the whole range is busy.
    ephemeral: bool,
    used: Vec<bool>,
    in_use: usize,
    cursor: u32,
}

fn kernel_ephemeral_range() -> RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().filter_map(|p| p.parse::<u16>().ok());
            let (lo, hi) = (it.next()?, it.next()?);
            (lo > 0 && lo <= hi).then_some(lo..=hi)
        })
        .unwrap_or(DEFAULT_EPHEMERAL)
}

impl PortAllocator {
    /// An allocator for `range`.
    pub fn new(range: &PortRange) -> Self {
        let (range, ephemeral) = match range {
            PortRange::Ephemeral => (kernel_ephemeral_range(), true),
            PortRange::Range(r) => (r.clone(), false),
        };
        Self::with_range(range, ephemeral)
    }

    fn with_range(range: RangeInclusive<u16>, ephemeral: bool) -> Self {
        let size = u32::from(*range.end()) - u32::from(*range.start()) + 1;
        Self {
            cursor: rand::rng().random_range(0..size),
            range,
            ephemeral,
            used: vec![false; 65_536],
            in_use: 0,
        }
    }

    fn size(&self) -> u32 {
        u32::from(*self.range.end()) - u32::from(*self.range.start()) + 1
    }

    /// Binds a port with `bind`, trying free ports of the range from the cursor on. Ports
    /// another program holds (`AddrInUse`) are skipped; any other error is returned at once.
    /// In kernel-chosen mode, a fully busy range falls back to port 0.
    ///
    /// # Errors
    /// No port could be bound.
    pub fn allocate<T>(
        &mut self,
        mut bind: impl FnMut(u16) -> io::Result<T>,
    ) -> io::Result<(u16, T)> {
        let size = self.size();
        let start = u32::from(*self.range.start());
        for _ in 0..size {
            let port = (start + self.cursor % size) as u16;
            self.cursor = (self.cursor + 1) % size;
            if self.used[usize::from(port)] {
                continue;
            }
            match bind(port) {
                Ok(t) => {
                    self.mark(port);
                    return Ok((port, t));
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            }
        }
        if self.ephemeral {
            return bind(0).map(|t| (0, t));
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "no free port left in the proxy port range {}-{}",
                self.range.start(),
                self.range.end()
            ),
        ))
    }

    /// Records that `port` is bound.
    pub fn mark(&mut self, port: u16) {
        if port != 0 && !self.used[usize::from(port)] {
            self.used[usize::from(port)] = true;
            self.in_use += 1;
        }
    }

    /// Returns `port` to the pool.
    pub fn release(&mut self, port: u16) {
        if self.used[usize::from(port)] {
            self.used[usize::from(port)] = false;
            self.in_use -= 1;
        }
    }

    /// Ports this allocator has handed out and not released.
    pub fn in_use(&self) -> usize {
        self.in_use
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn hands_out_each_port_of_the_range_once() {
        let mut a = PortAllocator::new(&PortRange::Range(20000..=20009));
        let mut got = BTreeSet::new();
        for _ in 0..10 {
            let (p, ()) = a.allocate(|_| Ok(())).unwrap();
            assert!((20000..=20009).contains(&p));
            assert!(got.insert(p), "port {p} handed out twice");
        }
        assert_eq!(a.in_use(), 10);
        assert!(a.allocate(|_| Ok(())).is_err(), "range exhausted");
        a.release(20003);
        assert_eq!(a.allocate(|_| Ok(())).unwrap().0, 20003);
    }

    #[test]
    fn ports_held_by_others_are_skipped_not_leaked() {
        let mut a = PortAllocator::new(&PortRange::Range(30000..=30002));
        let (p, ()) = a
            .allocate(|p| {
                if p == 30002 {
                    Ok(())
                } else {
                    Err(io::ErrorKind::AddrInUse.into())
                }
            })
            .unwrap();
        assert_eq!(p, 30002);
        assert_eq!(a.in_use(), 1, "failed binds take nothing");
    }

    #[test]
    fn other_bind_errors_stop_at_once() {
        let mut a = PortAllocator::new(&PortRange::Range(30000..=30100));
        let mut tries = 0;
        let r: io::Result<(u16, ())> = a.allocate(|_| {
            tries += 1;
            Err(io::ErrorKind::PermissionDenied.into())
        });
        assert!(r.is_err());
        assert_eq!(tries, 1);
    }

    #[test]
    fn kernel_chosen_mode_uses_the_ephemeral_range_then_port_zero() {
        let mut a = PortAllocator::with_range(40000..=40001, true);
        let (p, ()) = a.allocate(|_| Ok(())).unwrap();
        assert!((40000..=40001).contains(&p));
        a.allocate(|_| Ok(())).unwrap();
        let (p, ()) = a
            .allocate(|p| {
                if p == 0 {
                    Ok(())
                } else {
                    Err(io::ErrorKind::AddrInUse.into())
                }
            })
            .unwrap();
        assert_eq!(p, 0, "falls back to the kernel when the range is full");
    }
}
