//! Proxy port allocation.
//!
//! With no range the kernel picks an ephemeral port (bind to port 0). With a range, a port is
//! picked at a random offset and probed linearly, like the original's `rangeAllocator`, but a
//! port is only taken once its bind has succeeded: the original marked ports used before binding
//! and leaked them when the bind failed.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;

use rand::Rng;

use crate::config::PortRange;

/// Hands out proxy ports.
#[derive(Debug, Clone)]
pub struct PortAllocator {
    range: Option<RangeInclusive<u16>>,
    used: BTreeSet<u16>,
}

impl PortAllocator {
    /// An allocator for `range`.
    pub fn new(range: &PortRange) -> Self {
        Self {
            range: match range {
                PortRange::Ephemeral => None,
                PortRange::Range(r) => Some(r.clone()),
            },
            used: BTreeSet::new(),
        }
    }

    /// Candidate ports to try, in order: `[0]` for kernel-chosen, otherwise every free port of
    /// the range starting at a random offset. The caller binds each in turn and [`mark`]s the
    /// one that worked.
    ///
    /// [`mark`]: PortAllocator::mark
    pub fn candidates(&self) -> Vec<u16> {
        let Some(range) = &self.range else {
            return vec![0];
        };
        let (lo, hi) = (u32::from(*range.start()), u32::from(*range.end()));
        let size = hi - lo + 1;
        let start = rand::rng().random_range(0..size);
        (0..size)
            .map(|i| (lo + (start + i) % size) as u16)
            .filter(|p| !self.used.contains(p))
            .collect()
    }

    /// Records that `port` is bound (a no-op for kernel-chosen ports).
    pub fn mark(&mut self, port: u16) {
        if self.range.as_ref().is_some_and(|r| r.contains(&port)) {
            self.used.insert(port);
        }
    }

    /// Returns `port` to the pool.
    pub fn release(&mut self, port: u16) {
        self.used.remove(&port);
    }

    /// Ports in use from the range.
    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_asks_the_kernel() {
        let a = PortAllocator::new(&PortRange::Ephemeral);
        assert_eq!(a.candidates(), vec![0]);
    }

    #[test]
    fn range_candidates_cover_the_free_ports_once() {
        let mut a = PortAllocator::new(&PortRange::Range(20000..=20009));
        a.mark(20003);
        let c = a.candidates();
        assert_eq!(c.len(), 9);
        assert!(!c.contains(&20003));
        let set: BTreeSet<_> = c.iter().copied().collect();
        assert_eq!(set.len(), 9);
        assert!(set.iter().all(|p| (20000..=20009).contains(p)));
        a.release(20003);
        assert_eq!(a.candidates().len(), 10);
    }

    #[test]
    fn full_range_has_no_candidates() {
        let mut a = PortAllocator::new(&PortRange::Range(30000..=30001));
        a.mark(30000);
        a.mark(30001);
        assert!(a.candidates().is_empty());
        assert_eq!(a.in_use(), 2);
    }
}
