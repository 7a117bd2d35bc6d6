//! The scheduler's profile of a connection-rate round, for `make bench`: reads the text of
//! `perf script -F cpu,time,event,trace` over a `perf sched record` taken during the round
//! (stdin) and prints, as one JSON object, where the CPUs' time went.
//!
//! ```text
//! schedprofile --cps N [--tids 1,2,3] [--comm NAME]
//! ```
//! `--cps` is the round's connection rate, to put counts per connection; the proxy's threads are
//! the listed thread ids and any thread named `--comm` (socat forks one per connection).
//!
//! Why it exists: the connection rate of a proxy here is bounded by more than its CPU per
//! connection. On these VMs a vCPU with nothing to run halts, and a task woken onto it waits for
//! the vCPU to come back (tens to hundreds of µs) while that CPU counts as idle. This profile
//! measures that time (`idle_waiting_share`), how often it happens (`idle_wakes_per_conn`), and
//! how long the proxy's own threads wait for a CPU once woken.
//!
//! Fields: `idle_share` (CPU time idle), `idle_waiting_share` (idle while a task woken onto that
//! CPU had not yet run), both fractions of all CPUs' time; `idle_wakes_per_conn`,
//! `idle_wake_p50_us`, `idle_wake_p90_us` (wake-ups onto an idle CPU and their wait until the
//! task ran); `proxy_share` (the proxy's threads' share of the CPUs' time), `proxy_wakes_per_conn`
//! and `proxy_wait_us` (the mean wait of a woken proxy thread until it ran).

use std::collections::{HashMap, HashSet};
use std::io::Read;

/// One scheduler event, as far as the profile needs it.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Switch {
        prev: u32,
        /// Whether `prev` stays runnable (preempted, not sleeping).
        prev_runnable: bool,
        next: u32,
    },
    /// A wake-up (`sched_waking`, `sched_wakeup_new`) of `pid` onto `cpu`.
    Wake {
        pid: u32,
        comm: String,
        cpu: usize,
    },
    Migrate {
        pid: u32,
        from: usize,
        to: usize,
    },
}

/// One line of `perf script -F cpu,time,event,trace`: the CPU it happened on, when (s), and the
/// event; `None` for events the profile ignores.
fn parse(line: &str) -> Option<(usize, f64, Event)> {
    let line = line.trim_start();
    let rest = line.strip_prefix('[')?;
    let (cpu, rest) = rest.split_once(']')?;
    let cpu = cpu.trim().parse().ok()?;
    let (time, rest) = rest.trim_start().split_once(':')?;
    let time = time.trim().parse().ok()?;
    let (event, fields) = rest.trim_start().strip_prefix("sched:")?.split_once(':')?;
    // Values are single tokens except comms, which may hold spaces; only the numeric fields and
    // the waking comm (our threads' names have none) are read.
    let field = |key: &str| {
        fields
            .split_whitespace()
            .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
    };
    let num = |key: &str| field(key)?.parse::<u32>().ok();
    let ev = match event {
        "sched_switch" => Event::Switch {
            prev: num("prev_pid")?,
            prev_runnable: field("prev_state")?.starts_with('R'),
            next: num("next_pid")?,
        },
        "sched_waking" | "sched_wakeup_new" => Event::Wake {
            pid: num("pid")?,
            comm: field("comm")?.to_string(),
            cpu: num("target_cpu")? as usize,
        },
        "sched_migrate_task" => Event::Migrate {
            pid: num("pid")?,
            from: num("orig_cpu")? as usize,
            to: num("dest_cpu")? as usize,
        },
        _ => return None,
    };
    Some((cpu, time, ev))
}

/// Which threads are the proxy's.
#[derive(Debug, Default)]
struct Proxy {
    tids: HashSet<u32>,
    comm: Option<String>,
    /// Threads recognised by name as they were seen.
    seen: HashSet<u32>,
}

impl Proxy {
    fn is(&self, pid: u32) -> bool {
        self.tids.contains(&pid) || self.seen.contains(&pid)
    }
}

/// What the profile adds up while it replays the events.
#[derive(Debug, Default)]
struct Profile {
    start: Option<f64>,
    last: f64,
    /// What runs on each CPU (0: idle) and which woken tasks wait for it.
    running: Vec<u32>,
    waiting: Vec<HashSet<u32>>,
    /// Woken tasks not yet run: when, and whether their CPU was idle then.
    woken: HashMap<u32, (f64, bool)>,
    idle_s: f64,
    idle_waiting_s: f64,
    proxy_run_s: f64,
    idle_wake_us: Vec<f64>,
    proxy_wait_us: Vec<f64>,
    proxy: Proxy,
}

impl Profile {
    fn cpu(&mut self, cpu: usize) {
        if self.running.len() <= cpu {
            self.running.resize(cpu + 1, 0);
            self.waiting.resize_with(cpu + 1, HashSet::new);
        }
    }

    /// Charges the time since the last event to what each CPU was doing.
    fn advance(&mut self, t: f64) {
        let dt = match self.start {
            None => {
                self.start = Some(t);
                0.0
            }
            Some(_) => (t - self.last).max(0.0),
        };
        self.last = t;
        for (cpu, &pid) in self.running.iter().enumerate() {
            if pid == 0 {
                self.idle_s += dt;
                if !self.waiting[cpu].is_empty() {
                    self.idle_waiting_s += dt;
                }
            } else if self.proxy.is(pid) {
                self.proxy_run_s += dt;
            }
        }
    }

    fn event(&mut self, cpu: usize, t: f64, ev: Event) {
        self.cpu(cpu);
        self.advance(t);
        match ev {
            Event::Switch {
                prev,
                prev_runnable,
                next,
            } => {
                if prev != 0 && prev_runnable {
                    self.waiting[cpu].insert(prev);
                }
                self.running[cpu] = next;
                for w in &mut self.waiting {
                    w.remove(&next);
                }
                if let Some((woke, idle)) = self.woken.remove(&next) {
                    let us = (t - woke) * 1e6;
                    if idle {
                        self.idle_wake_us.push(us);
                    }
                    if self.proxy.is(next) {
                        self.proxy_wait_us.push(us);
                    }
                }
            }
            Event::Wake { pid, comm, cpu: to } => {
                self.cpu(to);
                if self.proxy.comm.as_deref() == Some(comm.as_str()) {
                    self.proxy.seen.insert(pid);
                }
                if pid != 0 && !self.running.contains(&pid) && !self.woken.contains_key(&pid) {
                    self.waiting[to].insert(pid);
                    self.woken.insert(pid, (t, self.running[to] == 0));
                }
            }
            Event::Migrate { pid, from, to } => {
                self.cpu(from.max(to));
                if self.waiting[from].remove(&pid) {
                    self.waiting[to].insert(pid);
                }
            }
        }
    }

    /// The profile as JSON, counts per connection at `cps` connections a second.
    fn json(&self, cps: f64) -> String {
        let span = self.last - self.start.unwrap_or(self.last);
        let cpu_s = span * self.running.len() as f64;
        let share = |s: f64| if cpu_s > 0.0 { s / cpu_s } else { 0.0 };
        let conns = cps * span;
        let per_conn = |n: usize| if conns > 0.0 { n as f64 / conns } else { 0.0 };
        let mean = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        format!(
            "{{\"span_s\":{span:.3},\"cpus\":{},\"idle_share\":{:.4},\"idle_waiting_share\":{:.4},\"idle_wakes_per_conn\":{:.3},\"idle_wake_p50_us\":{:.1},\"idle_wake_p90_us\":{:.1},\"proxy_share\":{:.4},\"proxy_wakes_per_conn\":{:.3},\"proxy_wait_us\":{:.1}}}",
            self.running.len(),
            share(self.idle_s),
            share(self.idle_waiting_s),
            per_conn(self.idle_wake_us.len()),
            percentile(&self.idle_wake_us, 0.5),
            percentile(&self.idle_wake_us, 0.9),
            share(self.proxy_run_s),
            per_conn(self.proxy_wait_us.len()),
            mean(&self.proxy_wait_us),
        )
    }
}

fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut cps, mut proxy) = (0.0, Proxy::default());
    while let Some(k) = args.next() {
        let v = args.next().unwrap_or_default();
        match k.as_str() {
            "--cps" => cps = v.parse().unwrap_or(0.0),
            "--tids" => proxy.tids = v.split(',').filter_map(|t| t.parse().ok()).collect(),
            "--comm" if !v.is_empty() => proxy.comm = Some(v),
            _ => {}
        }
    }
    let mut text = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut text) {
        eprintln!("schedprofile: reading perf script output from stdin: {e}");
        std::process::exit(1);
    }
    let mut p = Profile {
        proxy,
        ..Profile::default()
    };
    for (cpu, t, ev) in text.lines().filter_map(parse) {
        p.event(cpu, t, ev);
    }
    if p.start.is_none() {
        eprintln!("schedprofile: no scheduler events on stdin");
        std::process::exit(1);
    }
    println!("{}", p.json(cps));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_events_it_needs_and_skips_the_rest() {
        let switch = "[001]  8967.750449:       sched:sched_switch: prev_comm=perf prev_pid=25646 prev_prio=120 prev_state=R+ ==> next_comm=migration/0 next_pid=18 next_prio=0";
        assert_eq!(
            parse(switch),
            Some((
                1,
                8967.750449,
                Event::Switch {
                    prev: 25646,
                    prev_runnable: true,
                    next: 18
                }
            ))
        );
        let wake = "[000]  1.5:       sched:sched_waking: comm=proxy-worker-0 pid=7 prio=120 target_cpu=001";
        assert_eq!(
            parse(wake),
            Some((
                0,
                1.5,
                Event::Wake {
                    pid: 7,
                    comm: "proxy-worker-0".into(),
                    cpu: 1
                }
            ))
        );
        assert_eq!(
            parse("[000]  2.0: sched:sched_migrate_task: comm=perf pid=9 prio=120 orig_cpu=0 dest_cpu=1"),
            Some((0, 2.0, Event::Migrate { pid: 9, from: 0, to: 1 }))
        );
        assert_eq!(
            parse("[000]  2.0: sched:sched_stat_runtime: comm=perf pid=9 runtime=1 [ns]"),
            None
        );
        assert_eq!(parse("garbage"), None);
    }

    /// Two CPUs over 1 s: CPU 1 idles throughout, and for 0.2 s of it a task woken onto it has
    /// not yet run; the proxy (tid 7) runs on CPU 0 for 0.5 s after waiting 0.1 s.
    #[test]
    fn idle_time_with_a_woken_task_waiting_is_told_apart() {
        let mut p = Profile {
            proxy: Proxy {
                tids: [7].into(),
                ..Proxy::default()
            },
            ..Profile::default()
        };
        let sw = |prev, prev_runnable, next| Event::Switch {
            prev,
            prev_runnable,
            next,
        };
        let wake = |pid, cpu| Event::Wake {
            pid,
            comm: "x".into(),
            cpu,
        };
        p.event(0, 0.0, sw(0, false, 5));
        p.event(1, 0.0, sw(6, false, 0));
        p.event(0, 0.3, wake(7, 0));
        p.event(0, 0.4, sw(5, true, 7));
        p.event(1, 0.5, wake(8, 1));
        // 8 is pulled to CPU 0 before CPU 1 wakes: CPU 1 stays idle, with nothing waiting.
        p.event(
            0,
            0.7,
            Event::Migrate {
                pid: 8,
                from: 1,
                to: 0,
            },
        );
        p.event(0, 0.9, sw(7, false, 5));
        p.event(0, 1.0, sw(5, false, 8));
        let j = p.json(100.0);
        assert!(j.contains("\"idle_share\":0.5000"), "{j}");
        assert!(j.contains("\"idle_waiting_share\":0.1000"), "{j}");
        assert!(j.contains("\"proxy_share\":0.2500"), "{j}");
        assert!(j.contains("\"proxy_wakes_per_conn\":0.010"), "{j}");
        assert!(j.contains("\"proxy_wait_us\":100000.0"), "{j}");
        // 8 was woken onto an idle CPU and ran 0.5 s later.
        assert!(j.contains("\"idle_wake_p50_us\":500000.0"), "{j}");
    }
}
