//! Sync pacing, after kube-proxy's `BoundedFrequencyRunner`: a token bucket that allows a burst
//! of two syncs, then at most one per `minSyncPeriod`. The periodic `syncPeriod` resync is
//! handled by the caller's timer. Pure: time is passed in, so it is tested without sleeping.

use std::time::{Duration, Instant};

/// Token bucket over sync runs.
#[derive(Debug, Clone)]
pub struct Pacer {
    min_interval: Duration,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl Pacer {
    /// A full bucket of `burst` tokens refilled at one per `min_interval`.
    pub fn new(min_interval: Duration, burst: u32, now: Instant) -> Self {
        Self {
            min_interval,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        if self.min_interval.is_zero() {
            self.tokens = self.burst;
        } else {
            let gained = now.saturating_duration_since(self.updated).as_secs_f64()
                / self.min_interval.as_secs_f64();
            self.tokens = (self.tokens + gained).min(self.burst);
        }
        self.updated = now;
    }

    /// The earliest instant a sync may run.
    pub fn next_allowed(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.tokens >= 1.0 {
            now
        } else {
            now + self.min_interval.mul_f64(1.0 - self.tokens)
        }
    }

    /// Records a sync run at `now`.
    pub fn take(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - 1.0).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_of_two_then_one_per_interval() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Duration::from_secs(1), 2, t0);
        assert_eq!(p.next_allowed(t0), t0);
        p.take(t0);
        assert_eq!(p.next_allowed(t0), t0);
        p.take(t0);
        let next = p.next_allowed(t0);
        assert_eq!(next, t0 + Duration::from_secs(1));
        p.take(next);
        assert_eq!(p.next_allowed(next), next + Duration::from_secs(1));
    }

    #[test]
    fn zero_interval_never_waits() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Duration::ZERO, 2, t0);
        for _ in 0..10 {
            assert_eq!(p.next_allowed(t0), t0);
            p.take(t0);
        }
    }
}
