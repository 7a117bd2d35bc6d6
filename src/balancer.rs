//! Per-service-port load balancer: round robin with optional ClientIP affinity.
//!
//! kube-proxy's `LoadBalancerRR` semantics, without its global lock:
//! - the endpoint list is shuffled and the cursor reset only when the *set* of endpoints changes,
//!   so every node starts at a different point and an unchanged update keeps the rotation;
//! - a ClientIP pin is honoured while younger than the timeout, dropped when its endpoint goes
//!   away, and ignored (then replaced) on a dial retry;
//! - unlike the original, a change of the affinity timeout takes effect (kubernetes#35677's
//!   neighbourhood: the original never updated the TTL of an existing service).
//!
//! The connection path reads an `ArcSwap` snapshot and bumps an atomic cursor; the affinity map
//! sits behind a mutex that services without affinity never touch.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rand::seq::SliceRandom;

#[derive(Debug)]
struct Snapshot {
    /// Shuffled endpoint list.
    endpoints: Vec<SocketAddr>,
    /// `Some(timeout)` when ClientIP affinity is on.
    affinity: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
struct Pin {
    endpoint: SocketAddr,
    last_used: Instant,
}

/// Chooses a backend for each new connection or UDP session of one service port.
#[derive(Debug)]
pub struct Balancer {
    snapshot: ArcSwap<Snapshot>,
    cursor: AtomicUsize,
    pins: Mutex<HashMap<IpAddr, Pin>>,
}

impl Default for Balancer {
    fn default() -> Self {
        Self::new(Vec::new(), None)
    }
}

impl Balancer {
    /// A balancer over `endpoints` (shuffled here) with optional ClientIP affinity timeout.
    pub fn new(mut endpoints: Vec<SocketAddr>, affinity: Option<Duration>) -> Self {
        endpoints.shuffle(&mut rand::rng());
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot {
                endpoints,
                affinity,
            }),
            cursor: AtomicUsize::new(0),
            pins: Mutex::new(HashMap::new()),
        }
    }

    /// Picks a backend for a client. `retry` is true when an earlier pick for the same
    /// connection could not be dialled: the pin is then ignored and the next endpoint in the
    /// rotation taken (and pinned), as kube-proxy's `sessionAffinityReset` does.
    pub fn pick(&self, client: IpAddr, retry: bool) -> Option<SocketAddr> {
        let snap = self.snapshot.load();
        if snap.endpoints.is_empty() {
            return None;
        }
        let Some(timeout) = snap.affinity else {
            return Some(self.next(&snap.endpoints));
        };
        let now = Instant::now();
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        if !retry {
            if let Some(pin) = pins.get_mut(&client) {
                if now.duration_since(pin.last_used) < timeout {
                    pin.last_used = now;
                    return Some(pin.endpoint);
                }
            }
        }
        let endpoint = self.next(&snap.endpoints);
        pins.insert(
            client,
            Pin {
                endpoint,
                last_used: now,
            },
        );
        Some(endpoint)
    }

    fn next(&self, endpoints: &[SocketAddr]) -> SocketAddr {
        let i = self.cursor.fetch_add(1, Ordering::Relaxed);
        endpoints[i % endpoints.len()]
    }

    /// Replaces the endpoint set and affinity. Returns true when the set changed (and so was
    /// reshuffled). Pins to endpoints that are gone are dropped at once; turning affinity off
    /// forgets every pin.
    pub fn update(&self, endpoints: &[SocketAddr], affinity: Option<Duration>) -> bool {
        let current = self.snapshot.load();
        let mut sorted_new = endpoints.to_vec();
        sorted_new.sort_unstable();
        sorted_new.dedup();
        let mut sorted_old = current.endpoints.clone();
        sorted_old.sort_unstable();
        let set_changed = sorted_new != sorted_old;
        if !set_changed && current.affinity == affinity {
            return false;
        }
        let new_list = if set_changed {
            let mut l = sorted_new.clone();
            l.shuffle(&mut rand::rng());
            l
        } else {
            current.endpoints.clone()
        };
        self.snapshot.store(Arc::new(Snapshot {
            endpoints: new_list,
            affinity,
        }));
        if set_changed {
            self.cursor.store(0, Ordering::Relaxed);
        }
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        if affinity.is_none() {
            pins.clear();
        } else if set_changed {
            pins.retain(|_, p| sorted_new.binary_search(&p.endpoint).is_ok());
        }
        set_changed
    }

    /// Forgets pins idle for longer than the timeout (called at every sync, as upstream's
    /// `CleanupStaleStickySessions`), so the map cannot grow without bound.
    pub fn expire_pins(&self) {
        let Some(timeout) = self.snapshot.load().affinity else {
            return;
        };
        let now = Instant::now();
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        pins.retain(|_, p| now.duration_since(p.last_used) < timeout);
    }

    /// The current endpoint list (in rotation order).
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.snapshot.load().endpoints.clone()
    }

    /// Number of live ClientIP pins.
    pub fn pin_count(&self) -> usize {
        self.pins.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect()
    }
    fn client(i: u8) -> IpAddr {
        IpAddr::from([192, 168, 0, i])
    }

    #[test]
    fn round_robin_visits_every_endpoint_once_per_cycle() {
        let b = Balancer::new(addrs(3), None);
        let first: Vec<_> = (0..3).map(|_| b.pick(client(1), false).unwrap()).collect();
        let second: Vec<_> = (0..3).map(|_| b.pick(client(1), false).unwrap()).collect();
        assert_eq!(first.iter().collect::<HashSet<_>>().len(), 3);
        assert_eq!(first, second);
    }

    #[test]
    fn empty_balancer_picks_nothing() {
        assert_eq!(Balancer::default().pick(client(1), false), None);
    }

    #[test]
    fn unchanged_set_keeps_order_and_cursor() {
        let b = Balancer::new(addrs(3), None);
        let a = b.pick(client(1), false).unwrap();
        let order = b.endpoints();
        let mut reordered = addrs(3);
        reordered.reverse();
        assert!(!b.update(&reordered, None));
        assert_eq!(b.endpoints(), order);
        assert_ne!(b.pick(client(1), false).unwrap(), a, "cursor was not reset");
    }

    #[test]
    fn changed_set_resets_cursor() {
        let b = Balancer::new(addrs(3), None);
        b.pick(client(1), false);
        assert!(b.update(&addrs(4), None));
        let order = b.endpoints();
        assert_eq!(b.pick(client(1), false).unwrap(), order[0]);
    }

    #[test]
    fn affinity_pins_a_client_and_retry_moves_it() {
        let b = Balancer::new(addrs(3), Some(Duration::from_secs(60)));
        let pinned = b.pick(client(1), false).unwrap();
        for _ in 0..10 {
            assert_eq!(b.pick(client(1), false).unwrap(), pinned);
        }
        let other = b.pick(client(2), false).unwrap();
        assert_ne!(other, pinned, "a second client takes the next endpoint");
        let moved = b.pick(client(1), true).unwrap();
        assert_ne!(moved, pinned);
        assert_eq!(
            b.pick(client(1), false).unwrap(),
            moved,
            "the retry result is the new pin"
        );
    }

    #[test]
    fn pins_to_removed_endpoints_are_dropped() {
        let b = Balancer::new(addrs(2), Some(Duration::from_secs(60)));
        let pinned = b.pick(client(1), false).unwrap();
        let remaining: Vec<_> = addrs(2).into_iter().filter(|a| *a != pinned).collect();
        b.update(&remaining, Some(Duration::from_secs(60)));
        assert_eq!(b.pin_count(), 0);
        assert_eq!(b.pick(client(1), false).unwrap(), remaining[0]);
    }

    #[test]
    fn affinity_timeout_change_is_honoured() {
        let b = Balancer::new(addrs(3), Some(Duration::from_secs(3600)));
        let pinned = b.pick(client(1), false).unwrap();
        assert!(!b.update(&addrs(3), Some(Duration::ZERO)));
        // With a zero timeout every pin is already stale: the client moves on.
        assert_ne!(b.pick(client(1), false).unwrap(), pinned);
        b.expire_pins();
        assert_eq!(b.pin_count(), 0);
        b.update(&addrs(3), None);
        b.pick(client(1), false);
        assert_eq!(b.pin_count(), 0, "no pins without affinity");
    }
}
