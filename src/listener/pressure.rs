//! Whether the node's CPUs are crowded: runnable tasks waiting for a CPU, as the kernel's
//! pressure stall information counts them (`/proc/pressure/cpu`, the `some` line). Polling
//! before sleeping ([`super::poll`]) is held off while they are.
//!
//! Why: a poll is only meant to fill time a CPU would otherwise spend idle. When other tasks
//! are waiting for the CPUs, there is no idle time to fill, and `sched_yield` does not hand the
//! CPU over reliably (under EEVDF a thread that yields is often picked again at once: measured
//! here, a yield next to a thread spinning on the same CPU returned in 1 µs, as on an idle one).
//! The poll then takes CPU time from the very clients and servers whose traffic it waits for.
//! Measured on these 2 vCPUs, 14 interleaved rounds of 4 clients opening connections flat out
//! (bind portal, proxy CPU by `perf stat`): 5,071 conn/s at 139 µs of proxy CPU per connection
//! while polling, 5,534 at 129 with polling off, nginx 5,623 at 140. In those rounds some task
//! waited for a CPU 51 to 79% of the time; during request/response rounds through a polling
//! proxy, 1 to 3% (17% through one that does not poll, which wakes more often).
//!
//! The check runs at most every [`CHECK`], by whichever thread asks first once it is due; the
//! others read the last answer (one atomic load). Without pressure information (a kernel built
//! without it, or booted with `psi=0`) the CPUs never count as crowded, and polling is as
//! before.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::debug;

/// How often the pressure is read.
pub(crate) const CHECK: Duration = Duration::from_millis(100);

/// Share of a check's interval, in percent, during which some task waited for a CPU, above
/// which the CPUs count as crowded. Between the 1 to 17% of request/response traffic and the
/// 51 to 79% of a node whose CPUs are all taken (module docs).
pub(crate) const CROWDED_PERCENT: u64 = 20;

/// The total stall time of the `some` line, in microseconds, from the text of
/// `/proc/pressure/cpu`.
pub(crate) fn some_total_us(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

/// Whether some task waited for a CPU for more than [`CROWDED_PERCENT`] of the time between
/// two readings, each a stall total in microseconds and when it was read. A total that went
/// backwards (it cannot, short of a bug) or an empty interval says nothing, so not crowded.
pub(crate) fn crowded_between(before: (u64, Instant), after: (u64, Instant)) -> bool {
    let waited = after.0.saturating_sub(before.0);
    let elapsed = after.1.saturating_duration_since(before.1).as_micros() as u64;
    elapsed > 0 && waited * 100 > elapsed * CROWDED_PERCENT
}

/// The process's view of the pressure.
struct Monitor {
    /// `/proc/pressure/cpu`, open for the life of the process; `None` without pressure
    /// information.
    file: Option<File>,
    epoch: Instant,
    /// When the next check is due, in nanoseconds since `epoch`.
    next_check: AtomicU64,
    /// The last reading: stall total and when.
    last: Mutex<Option<(u64, Instant)>>,
    crowded: AtomicBool,
    /// Checks that found the CPUs crowded.
    crowded_checks: AtomicU64,
}

fn monitor() -> &'static Monitor {
    static MONITOR: OnceLock<Monitor> = OnceLock::new();
    MONITOR.get_or_init(|| {
        // Opening succeeds with `psi=0`; reading then fails, so a file is kept only if it reads.
        let file = File::open("/proc/pressure/cpu")
            .ok()
            .filter(|f| read_total(f).is_some());
        if file.is_none() {
            debug!("no CPU pressure information: polling before sleeping is never held off");
        }
        Monitor::new(file)
    })
}

/// The `some` stall total now, read afresh from the open pressure file.
fn read_total(file: &File) -> Option<u64> {
    let mut buf = [0u8; 256];
    let n = file.read_at(&mut buf, 0).ok()?;
    some_total_us(std::str::from_utf8(&buf[..n]).ok()?)
}

impl Monitor {
    fn new(file: Option<File>) -> Monitor {
        Monitor {
            file,
            epoch: Instant::now(),
            next_check: AtomicU64::new(0),
            last: Mutex::new(None),
            crowded: AtomicBool::new(false),
            crowded_checks: AtomicU64::new(0),
        }
    }

    /// Takes a reading: the stall total `total` at `now`.
    fn update(&self, total: u64, now: Instant) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let crowded = last.is_some_and(|before| crowded_between(before, (total, now)));
        *last = Some((total, now));
        if crowded {
            self.crowded_checks.fetch_add(1, Ordering::Relaxed);
        }
        if self.crowded.swap(crowded, Ordering::Relaxed) != crowded {
            debug!(
                crowded,
                "CPU pressure: polling before sleeping {}",
                if crowded { "held off" } else { "resumed" }
            );
        }
    }
}

/// Whether the CPUs are crowded now, as of the last check; checks first if one is due.
pub(crate) fn crowded(now: Instant) -> bool {
    let m = monitor();
    let Some(file) = &m.file else {
        return false;
    };
    let at = now.saturating_duration_since(m.epoch).as_nanos() as u64;
    let due = m.next_check.load(Ordering::Relaxed);
    if at >= due
        && m.next_check
            .compare_exchange(
                due,
                at + CHECK.as_nanos() as u64,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
    {
        if let Some(total) = read_total(file) {
            m.update(total, now);
        }
    }
    m.crowded.load(Ordering::Relaxed)
}

/// What the metrics show: whether polling is held off now, and how many checks found the CPUs
/// crowded since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PressureStatus {
    /// The last check found the CPUs crowded.
    pub crowded: bool,
    /// Checks that found them crowded, since start.
    pub crowded_checks: u64,
}

/// The monitor's status ([`PressureStatus`]).
pub fn status() -> PressureStatus {
    let m = monitor();
    PressureStatus {
        crowded: m.crowded.load(Ordering::Relaxed),
        crowded_checks: m.crowded_checks.load(Ordering::Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "some avg10=8.61 avg60=39.12 avg300=37.31 total=7518913451\n\
                          full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";

    #[test]
    fn the_some_total_is_read_and_the_full_line_ignored() {
        assert_eq!(some_total_us(SAMPLE), Some(7_518_913_451));
        assert_eq!(some_total_us("full avg10=0.00 total=5\n"), None);
        assert_eq!(some_total_us("some avg10=1.00 total=x\n"), None);
        assert_eq!(some_total_us(""), None);
    }

    #[test]
    fn crowded_above_the_threshold_share_of_the_interval() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(100);
        // 100 ms apart: the threshold is 20 ms of waiting.
        assert!(!crowded_between((1_000, t0), (1_000, t1)));
        assert!(!crowded_between((1_000, t0), (21_000, t1)));
        assert!(crowded_between((1_000, t0), (21_001, t1)));
        assert!(crowded_between((1_000, t0), (101_000, t1)));
        // A total that went backwards, or no time between the readings, says nothing.
        assert!(!crowded_between((50_000, t0), (1_000, t1)));
        assert!(!crowded_between((1_000, t0), (90_000, t0)));
    }

    /// Readings 100 ms apart: the first says nothing, a crowded interval sets it and counts,
    /// and the next quiet interval clears it.
    #[test]
    fn a_crowded_interval_holds_polling_off_until_a_quiet_one() {
        let m = Monitor::new(None);
        let t = |ms| m.epoch + Duration::from_millis(ms);
        m.update(0, t(0));
        assert!(!m.crowded.load(Ordering::Relaxed));
        m.update(60_000, t(100));
        assert!(m.crowded.load(Ordering::Relaxed));
        m.update(110_000, t(200));
        assert!(m.crowded.load(Ordering::Relaxed));
        assert_eq!(m.crowded_checks.load(Ordering::Relaxed), 2);
        m.update(115_000, t(300));
        assert!(!m.crowded.load(Ordering::Relaxed));
        assert_eq!(m.crowded_checks.load(Ordering::Relaxed), 2);
    }

    /// On a kernel with pressure information, CPUs that one thread more than CPUs spins on count
    /// as crowded within a few checks: the file is read afresh at each check.
    #[test]
    fn spinning_threads_crowd_the_cpus() {
        if monitor().file.is_none() {
            eprintln!("SKIPPED: no /proc/pressure/cpu on this kernel (or psi=0)");
            return;
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let spinners: Vec<_> = (0..cpus + 1)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    // Bounded: the test stops it, or 10 s pass.
                    let end = Instant::now() + Duration::from_secs(10);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = false;
        while Instant::now() < deadline {
            if crowded(Instant::now()) {
                seen = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        for s in spinners {
            s.join().unwrap();
        }
        assert!(
            seen,
            "{} spinning threads on {cpus} CPUs never counted as crowded",
            cpus + 1
        );
        assert!(status().crowded_checks > 0);
    }
}
