//! Prometheus metrics, rendered in the text exposition format from the proxier's status
//! snapshot at scrape time. Names follow kube-proxy's where the meaning matches
//! (`kubeproxy_sync_proxy_rules_*`, `kubeproxy_network_programming_duration_seconds`); the
//! per-service-port families are this proxy's own (`userspace_proxy_*`).

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::listener::Stats;
use crate::proxier::Status;

/// kube-proxy's sync-duration buckets: exponential from 1 ms to about 16 s.
pub const SYNC_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192, 16.384,
];

/// A fixed-bucket histogram.
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds` (upper bounds, ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one value (seconds).
    pub fn observe(&mut self, v: f64) {
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            self.count, self.sum, self.count
        );
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new(SYNC_BUCKETS)
    }
}

fn secs(t: Option<SystemTime>) -> f64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders every metric family from a status snapshot.
pub fn render(st: &Status) -> String {
    let mut out = String::new();
    st.sync_duration.render(
        &mut out,
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "SyncProxyRules latency in seconds",
    );
    st.programming_duration.render(
        &mut out,
        "kubeproxy_network_programming_duration_seconds",
        "Time from a change being queued to it being applied, in seconds",
    );
    let scalar = |out: &mut String, name: &str, kind: &str, help: &str, v: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    scalar(
        &mut out,
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "gauge",
        "The last time proxy rules were successfully synced",
        secs(st.last_sync),
    );
    scalar(
        &mut out,
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "gauge",
        "The last time a sync of proxy rules was queued",
        secs(st.last_queued),
    );
    scalar(
        &mut out,
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
        "counter",
        "Cumulative proxy rules restore failures",
        st.rules_failures as f64,
    );
    scalar(
        &mut out,
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "counter",
        "Cumulative service port changes applied",
        st.service_changes as f64,
    );
    scalar(
        &mut out,
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "counter",
        "Cumulative endpoint set changes applied",
        st.endpoint_changes as f64,
    );
    scalar(
        &mut out,
        "userspace_proxy_service_ports",
        "gauge",
        "Service ports being proxied",
        st.ports.values().filter(|p| p.error.is_none()).count() as f64,
    );

    let pressure = crate::listener::pressure::status();
    scalar(
        &mut out,
        "userspace_proxy_cpu_crowded",
        "gauge",
        "1 while polling before sleeping is held off: tasks were waiting for a CPU for over 20% of the last 100 ms (/proc/pressure/cpu)",
        f64::from(u8::from(pressure.crowded)),
    );
    scalar(
        &mut out,
        "userspace_proxy_cpu_crowded_checks_total",
        "counter",
        "Checks of the CPU pressure (at most every 100 ms, while traffic flows) that found the CPUs crowded",
        pressure.crowded_checks as f64,
    );
    workers(&mut out, &crate::listener::worker_status());
    udp_loops(&mut out, &crate::listener::udp_loop_status());

    type Field = fn(&Stats) -> &std::sync::atomic::AtomicU64;
    let families: [(&str, &str, &str, Field); 11] = [
        (
            "userspace_proxy_connections_active",
            "gauge",
            "TCP connections being proxied",
            |s| &s.connections_active,
        ),
        (
            "userspace_proxy_connections_total",
            "counter",
            "TCP connections proxied",
            |s| &s.connections_total,
        ),
        (
            "userspace_proxy_bytes_to_backend_total",
            "counter",
            "Bytes from clients to backends",
            |s| &s.bytes_to_backend,
        ),
        (
            "userspace_proxy_bytes_to_client_total",
            "counter",
            "Bytes from backends to clients",
            |s| &s.bytes_to_client,
        ),
        (
            "userspace_proxy_backend_dial_failures_total",
            "counter",
            "Failed backend dials",
            |s| &s.dial_failures,
        ),
        (
            "userspace_proxy_no_endpoints_total",
            "counter",
            "Connections or sessions refused for lack of endpoints",
            |s| &s.no_endpoints,
        ),
        (
            "userspace_proxy_rejected_total",
            "counter",
            "Connections refused because they did not come through a portal",
            |s| &s.rejected,
        ),
        (
            "userspace_proxy_accept_errors_total",
            "counter",
            "Accept errors, including running out of descriptors",
            |s| &s.accept_errors,
        ),
        (
            "userspace_proxy_tcp_accept_loops",
            "gauge",
            "Event loops accepting a TCP port's connections (every loop once the port is busy)",
            |s| &s.accept_loops,
        ),
        (
            "userspace_proxy_udp_sessions_active",
            "gauge",
            "UDP client sessions open",
            |s| &s.udp_sessions_active,
        ),
        (
            "userspace_proxy_udp_datagrams_dropped_total",
            "counter",
            "UDP datagrams dropped",
            |s| &s.udp_dropped,
        ),
    ];
    for (name, kind, help, field) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in st.ports.values() {
            if let Some(stats) = &p.stats {
                let _ = writeln!(
                    out,
                    "{name}{{service=\"{}\",protocol=\"{}\"}} {}",
                    escape(&p.name.to_string()),
                    p.protocol,
                    Stats::get(field(stats))
                );
            }
        }
    }
    out
}

/// One metric family with a sample per event loop: its name, type, help text and how to read
/// it from one loop's status.
type PerLoop<T> = (&'static str, &'static str, &'static str, fn(&T) -> u64);

/// Renders `families`, each with one sample per entry of `status`, labelled `label="index"`.
fn per_loop<T>(out: &mut String, label: &str, status: &[T], families: &[PerLoop<T>]) {
    for (name, kind, help, field) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (i, s) in status.iter().enumerate() {
            let _ = writeln!(out, "{name}{{{label}=\"{i}\"}} {}", field(s));
        }
    }
}

/// The data-plane event loops: how the TCP load sits on them, and how often a busy one handed
/// a connection over (`src/listener/workers.rs`).
fn workers(out: &mut String, status: &[crate::listener::WorkerStatus]) {
    per_loop(
        out,
        "worker",
        status,
        &[
            (
                "userspace_proxy_worker_connections",
                "gauge",
                "TCP connections each data-plane event loop serves",
                |w| w.connections as u64,
            ),
            (
                "userspace_proxy_worker_connections_taken_total",
                "counter",
                "Connections a busier event loop handed to this one",
                |w| w.taken,
            ),
            (
                "userspace_proxy_worker_polls_caught_total",
                "counter",
                "Polls before sleeping in which a TCP event loop found work a sleep would have waited for",
                |w| w.polls_caught,
            ),
            (
                "userspace_proxy_worker_polls_missed_total",
                "counter",
                "Polls before sleeping that ran out their window before a TCP event loop slept",
                |w| w.polls_missed,
            ),
        ],
    );
}

/// The UDP loops (`src/listener/udp_loops.rs`): how many sessions with a front each carries,
/// and which are parked because the process may run on fewer CPUs than there are loops.
fn udp_loops(out: &mut String, status: &[crate::listener::UdpLoopStatus]) {
    per_loop(
        out,
        "loop",
        status,
        &[
            (
                "userspace_proxy_udp_loop_fronts",
                "gauge",
                "UDP sessions whose client a UDP event loop carries both ways, on a socket connected to the client",
                |l| l.fronts,
            ),
            (
                "userspace_proxy_udp_loop_parked",
                "gauge",
                "1 while a UDP event loop is parked: the process may run on fewer CPUs than there are loops",
                |l| u64::from(l.parked),
            ),
            (
                "userspace_proxy_udp_loop_polls_caught_total",
                "counter",
                "Polls before sleeping in which a UDP event loop found work a sleep would have waited for",
                |l| l.polls_caught,
            ),
            (
                "userspace_proxy_udp_loop_polls_missed_total",
                "counter",
                "Polls before sleeping that ran out their window before a UDP event loop slept",
                |l| l.polls_missed,
            ),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn workers_render_one_sample_each() {
        let mut out = String::new();
        let w = |connections, taken| crate::listener::WorkerStatus {
            connections,
            taken,
            polls_caught: taken * 10,
            polls_missed: taken * 100,
        };
        workers(&mut out, &[w(3, 0), w(1, 7)]);
        assert!(
            out.contains("userspace_proxy_worker_connections{worker=\"0\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("userspace_proxy_worker_connections{worker=\"1\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("userspace_proxy_worker_connections_taken_total{worker=\"1\"} 7\n"),
            "{out}"
        );
        assert!(
            out.contains("userspace_proxy_worker_polls_caught_total{worker=\"1\"} 70\n"),
            "{out}"
        );
        assert!(
            out.contains("userspace_proxy_worker_polls_missed_total{worker=\"1\"} 700\n"),
            "{out}"
        );
    }

    #[test]
    fn udp_loops_render_one_sample_each() {
        let mut out = String::new();
        let l = |fronts, parked| crate::listener::UdpLoopStatus {
            fronts,
            parked,
            polls_caught: fronts * 10,
            polls_missed: fronts * 100,
        };
        udp_loops(&mut out, &[l(4, false), l(0, true)]);
        assert!(
            out.contains("userspace_proxy_udp_loop_fronts{loop=\"0\"} 4\n"),
            "{out}"
        );
        assert!(
            out.contains("userspace_proxy_udp_loop_parked{loop=\"0\"} 0\n"),
            "{out}"
        );
        assert!(
            out.contains("userspace_proxy_udp_loop_parked{loop=\"1\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("userspace_proxy_udp_loop_polls_caught_total{loop=\"0\"} 40\n"),
            "{out}"
        );
        assert!(
            out.contains("userspace_proxy_udp_loop_polls_missed_total{loop=\"0\"} 400\n"),
            "{out}"
        );
    }

    #[test]
    fn empty_status_renders_every_family() {
        let out = render(&Status::default());
        for family in [
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "kubeproxy_network_programming_duration_seconds",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "userspace_proxy_connections_total",
            "userspace_proxy_udp_sessions_active",
            "userspace_proxy_worker_connections",
            "userspace_proxy_worker_connections_taken_total",
            "userspace_proxy_udp_loop_fronts",
            "userspace_proxy_udp_loop_parked",
            "userspace_proxy_cpu_crowded",
            "userspace_proxy_cpu_crowded_checks_total",
        ] {
            assert!(
                out.contains(&format!("# TYPE {family} ")),
                "missing {family}"
            );
        }
    }
}
