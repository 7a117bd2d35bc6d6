//! Turns `bench/results/raw.tsv` (target, metric, value, rep) into `results.md` (medians with
//! their spread, ratios to the direct path and to the best peer), `results.json` and
//! `chart.svg` (performance relative to direct, higher is better, for the headline metrics).

use std::collections::BTreeMap;
use std::fmt::Write as _;

const TARGETS: [&str; 7] = [
    "direct",
    "userspace-proxy",
    "haproxy",
    "nginx",
    "socat",
    "userspace-proxy-bind",
    "nginx-nat",
];
/// The same proxy with `portalMode: bind` (service IP on `lo`, no netfilter on the path): shown
/// beside the main column, so the price of the NAT portal is visible on its own.
const BIND: &str = "userspace-proxy-bind";
/// nginx behind a NAT portal like the main column's (a service IP REDIRECTed to it): the
/// like-for-like comparison for the main column. Not one of `PEERS`, which listen on the node's
/// address with no NAT on their path.
const NGINX_NAT: &str = "nginx-nat";
const PEERS: [&str; 3] = ["haproxy", "nginx", "socat"];

/// (metric, label, higher is better)
const METRICS: &[(&str, &str, bool)] = &[
    ("tcp_bulk_1_gbps", "TCP bulk, 1 stream (Gbit/s)", true),
    ("tcp_bulk_8_gbps", "TCP bulk, 8 streams (Gbit/s)", true),
    ("cpu_s_per_gb", "proxy CPU per GB, 1 stream (s)", false),
    ("rr_p50_us", "TCP req/resp p50 (µs)", false),
    ("rr_p99_us", "TCP req/resp p99 (µs)", false),
    ("crr_cps", "connect+exchange+close (conn/s)", true),
    ("crr_p99_us", "connect+exchange+close p99 (µs)", false),
    ("cpu_s_per_1k_conns", "proxy CPU per 1,000 conns (s)", false),
    (
        "crr_machine_us_per_conn",
        "machine CPU per connection, every process and the kernel (µs)",
        false,
    ),
    (
        "crr_user_us_per_conn",
        "proxy user CPU per connection (µs)",
        false,
    ),
    (
        "crr_sys_us_per_conn",
        "proxy system CPU per connection (µs)",
        false,
    ),
    ("udp_rr_p50_us", "UDP req/resp p50 (µs)", false),
    ("udp_rr_p99_us", "UDP req/resp p99 (µs)", false),
    (
        "rr_hp_p50_us",
        "TCP req/resp p50, guest halt polling on (µs)",
        false,
    ),
    (
        "rr_hp_p99_us",
        "TCP req/resp p99, guest halt polling on (µs)",
        false,
    ),
    (
        "udp_rr_hp_p50_us",
        "UDP req/resp p50, guest halt polling on (µs)",
        false,
    ),
    (
        "udp_rr_hp_p99_us",
        "UDP req/resp p99, guest halt polling on (µs)",
        false,
    ),
    (
        "rr_pin_p50_us",
        "TCP req/resp p50, all on one CPU (µs)",
        false,
    ),
    (
        "rr_pin_p99_us",
        "TCP req/resp p99, all on one CPU (µs)",
        false,
    ),
    (
        "udp_rr_pin_p50_us",
        "UDP req/resp p50, all on one CPU (µs)",
        false,
    ),
    (
        "udp_rr_pin_p99_us",
        "UDP req/resp p99, all on one CPU (µs)",
        false,
    ),
    ("udp_flood_pps", "UDP flood delivered (pkt/s)", true),
    ("udp_flood_loss", "UDP flood loss (fraction)", false),
    (
        "udp_paced_loss",
        "UDP loss at 100,000 pkt/s offered (fraction)",
        false,
    ),
    ("idle_kib_per_conn", "RSS per idle connection (KiB)", false),
];

/// The scheduler's profile of the connection rounds (bench/run.sh `sched_once`,
/// examples/schedprofile.rs): why a rate can fall short by more than the CPU per connection
/// does. Shown without ratios: none of these is a merit in itself. (metric, label)
const SCHEDULE: &[(&str, &str)] = &[
    (
        "crr_idle_share",
        "machine CPU time left idle, every connection-rate round (fraction)",
    ),
    (
        "sched_crr_cps",
        "connection rate of the profiled round (conn/s; tracing slows every party)",
    ),
    ("sched_idle_share", "CPU time idle (fraction)"),
    (
        "sched_idle_waiting_share",
        "CPU time idle while a task woken onto that CPU had not run yet (fraction)",
    ),
    (
        "sched_idle_wakes_per_conn",
        "wake-ups onto an idle CPU, per connection",
    ),
    (
        "sched_idle_wake_p50_us",
        "their wait until the task ran, p50 (µs)",
    ),
    ("sched_idle_wake_p90_us", "the same, p90 (µs)"),
    (
        "sched_proxy_share",
        "the proxy's threads' share of the CPU time (fraction)",
    ),
    (
        "sched_proxy_wakes_per_conn",
        "wake-ups of the proxy's threads, per connection",
    ),
    (
        "sched_proxy_wait_us",
        "a woken proxy thread's mean wait for a CPU (µs)",
    ),
];

const CHART: &[&str] = &[
    "tcp_bulk_1_gbps",
    "tcp_bulk_8_gbps",
    "rr_p50_us",
    "rr_p99_us",
    "crr_cps",
    "udp_rr_p50_us",
    "rr_hp_p50_us",
    "udp_rr_hp_p50_us",
    "rr_pin_p50_us",
    "udp_rr_pin_p50_us",
    "udp_flood_pps",
];

#[derive(Clone, Copy, Debug)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Stat {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    }
}

/// A median, with its spread when there is more than one sample.
fn cell(s: Stat) -> String {
    if s.n > 1 {
        format!("{} [{}–{}]", fmt(s.median), fmt(s.min), fmt(s.max))
    } else {
        fmt(s.median)
    }
}

fn fmt(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Performance relative to `base`, oriented so that > 1 is better.
fn relative(v: f64, base: f64, higher_better: bool) -> f64 {
    if higher_better {
        v / base
    } else {
        base / v
    }
}

/// Control-plane rows: raw key prefix and suffix around the service count, and the label.
const CONTROL_PLANE: &[(&str, &str, &str)] = &[
    ("program_api_", "_s", "time to program {n} service ports from the API (start → last one answers), s"),
    ("program_nft_", "_s", "time to program {n} service ports from the file, nftables portals (start → last one answers), s"),
    ("program_", "_s", "time to program {n} service ports from the file, iptables portals (start → last one answers), s"),
    ("rss_", "_mib", "RSS with {n} service ports, MiB"),
    ("crr_nft_at_", "_cps", "new connections per second through a service, with {n} present, nftables portals"),
    ("crr_at_", "_cps", "new connections per second through a service, with {n} present, iptables portals"),
    ("crr_nft_at_", "_errors", "connections that failed in that run, with {n} present, nftables portals"),
    ("crr_at_", "_errors", "connections that failed in that run, with {n} present, iptables portals"),
    ("add_one_api_at_", "_ms", "one more service answering, with {n} present (API create → first answer), ms"),
    ("add_one_nft_at_", "_ms", "one more service answering, with {n} present (file write + SIGHUP → first answer), nftables portals, ms"),
    ("add_one_at_", "_ms", "one more service answering, with {n} present (file write + SIGHUP → first answer), iptables portals, ms"),
];

fn control_plane_label(key: &str) -> String {
    CONTROL_PLANE
        .iter()
        .find_map(|(prefix, suffix, label)| {
            let n = key.strip_prefix(prefix)?.strip_suffix(suffix)?;
            n.parse::<u32>().ok()?;
            Some(label.replace("{n}", n))
        })
        .unwrap_or_else(|| key.to_string())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let raw = args.next().expect("raw.tsv path");
    let out = std::path::PathBuf::from(args.next().expect("output dir"));
    let text = std::fs::read_to_string(&raw).expect("read raw.tsv");
    let mut values: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    // Control-plane rows (userspace-proxy only), every sample kept: one-more-service is repeated.
    let mut extra: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 4 {
            continue;
        }
        let Ok(v) = f[2].trim().parse::<f64>() else {
            continue;
        };
        let control_plane = CONTROL_PLANE
            .iter()
            .any(|(prefix, suffix, _)| f[1].starts_with(prefix) && f[1].ends_with(suffix));
        if control_plane {
            extra.entry(f[1].to_string()).or_default().push(v);
        } else {
            values
                .entry((f[0].to_string(), f[1].to_string()))
                .or_default()
                .push(v);
        }
    }
    let stats: BTreeMap<(String, String), Stat> =
        values.into_iter().map(|(k, v)| (k, stat(v))).collect();
    let get = |t: &str, m: &str| stats.get(&(t.to_string(), m.to_string())).copied();

    let mut md = String::from("# Benchmark results\n\n");
    // Set by bench/run.sh; a report rebuilt by hand from a raw.tsv says it does not know.
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| "unknown".into());
    let _ = writeln!(
        md,
        "Code: {}. Started: {}.\n",
        env("BENCH_REV"),
        env("BENCH_STARTED")
    );
    let _ = writeln!(
        md,
        "Median of the repetitions, with min–max in brackets. Ratios: performance relative to direct (`×direct`) and to the best peer that supports the row (`×best peer`), oriented so that **> 1 is better** (for latency, CPU, loss and memory the ratio is inverted). Machine: {} cores; client, proxy and server share them.\n\nRows marked *guest halt polling on* repeat the request/response rounds with the guest kernel's halt polling at its default window (`guest_halt_poll_ns=200000`; these machines ship it at 0). With it off, every wake-up of an idle vCPU costs a halt exit and an inter-processor interrupt (about 25 µs here), so the plain latency rows count how many of a request's four wake-ups the scheduler happened to place on the other vCPU; with it on, they measure the proxies. Every target gets the same setting in the same run.\n\nRows marked *all on one CPU* repeat them (halt polling as shipped) with the client, the proxies and the server pinned to CPU 0: no wake-up crosses vCPUs, so the figure is the work on the request's path, without the scheduler's placement.\n\nThe column *bind portal* is userspace-proxy again with `portalMode: bind` (the service IP on `lo`, no netfilter on the path), beside the main column's NAT portal (PREROUTING REDIRECT), so the price of the NAT is visible on its own. The column *nginx, NAT portal* is the same nginx reached the way the main column is, through a service IP that PREROUTING REDIRECTs to it, and `×nginx NAT` compares the main column with it: like with like, since a peer put in front of a Kubernetes service needs such a rule too.\n\nThe rows *machine CPU per connection* and *proxy user / system CPU per connection* are the profile of the connection-rate row, from the same runs: what the whole machine (client, server, proxy and the kernel's network path, NAT included) spent per connection, from `/proc/stat`, and the proxy's own time, from its `/proc/<pid>/stat`.\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    md.push_str("| metric | direct | userspace-proxy | ×direct | ×best peer | haproxy | nginx | socat | bind portal | bind ×best peer | nginx, NAT portal | ×nginx NAT |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let mut json_rows = Vec::new();
    for (metric, label, higher) in METRICS {
        let cell = |t: &str| get(t, metric).map_or_else(|| "–".into(), cell);
        let direct = get("direct", metric);
        let best_peer = PEERS
            .iter()
            .filter_map(|p| get(p, metric).map(|s| (p, s.median)))
            .max_by(|a, b| {
                relative(a.1, 1.0, *higher)
                    .partial_cmp(&relative(b.1, 1.0, *higher))
                    .unwrap()
            });
        // The main column against one other target, oriented so that > 1 is better.
        let vs = |other: Option<Stat>| match (get("userspace-proxy", metric), other) {
            (Some(o), Some(d)) if o.median > 0.0 && d.median > 0.0 => {
                format!("{:.2}", relative(o.median, d.median, *higher))
            }
            _ => "–".into(),
        };
        let vs_direct = vs(direct);
        let vs_peer = |ours: Option<Stat>| match (ours, best_peer) {
            (Some(o), Some((p, v))) if o.median > 0.0 && v > 0.0 => {
                format!("{:.2} ({p})", relative(o.median, v, *higher))
            }
            _ => "–".into(),
        };
        let vs_nat = vs(get(NGINX_NAT, metric));
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {vs_direct} | {} | {} | {} | {} | {} | {} | {} | {vs_nat} |",
            cell("direct"),
            cell("userspace-proxy"),
            vs_peer(get("userspace-proxy", metric)),
            cell("haproxy"),
            cell("nginx"),
            cell("socat"),
            cell(BIND),
            vs_peer(get(BIND, metric)),
            cell(NGINX_NAT),
        );
        json_rows.push(json_row(metric, &TARGETS, &get));
    }
    let scheduled: Vec<&str> = TARGETS
        .iter()
        .copied()
        .filter(|t| SCHEDULE.iter().any(|(m, _)| get(t, m).is_some()))
        .collect();
    if !scheduled.is_empty() {
        md.push_str("\n## The connection rounds, as the scheduler saw them\n\nOn these VMs a vCPU with nothing to run halts, and a task woken onto it waits until the host runs that vCPU again, while the CPU counts as idle: so a connection rate can fall short of another by more than its CPU per connection does. The first row is from every connection-rate round (`/proc/stat`); the others from rounds of their own under `perf sched record` (2 s in the middle of a 4 s round), replayed by `examples/schedprofile.rs`.\n\n");
        let _ = writeln!(md, "| measure | {} |", scheduled.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(scheduled.len()));
        for (metric, label) in SCHEDULE {
            let cells: Vec<String> = scheduled
                .iter()
                .map(|t| get(t, metric).map_or_else(|| "–".into(), cell))
                .collect();
            let _ = writeln!(md, "| {label} | {} |", cells.join(" | "));
            json_rows.push(json_row(metric, &scheduled, &get));
        }
    }
    if !extra.is_empty() {
        md.push_str("\n## Control plane (userspace-proxy)\n\n| measure | value |\n|---|---|\n");
        for (k, v) in &extra {
            let label = control_plane_label(k);
            let _ = writeln!(md, "| {label} | {} |", cell(stat(v.clone())));
        }
        json_rows.push(format!(
            "\"control_plane\":{{{}}}",
            extra
                .iter()
                .map(|(k, v)| json_stat(k, stat(v.clone())))
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    std::fs::write(out.join("results.md"), md).expect("write results.md");
    std::fs::write(
        out.join("results.json"),
        format!("{{{}}}\n", json_rows.join(",")),
    )
    .expect("write results.json");
    std::fs::write(out.join("chart.svg"), chart(&get)).expect("write chart.svg");
}

/// `"name":{"median":…,"min":…,"max":…}`.
fn json_stat(name: &str, s: Stat) -> String {
    format!(
        "\"{name}\":{{\"median\":{},\"min\":{},\"max\":{}}}",
        s.median, s.min, s.max
    )
}

/// One metric's JSON entry: its stats for each of `targets` that has it.
fn json_row(metric: &str, targets: &[&str], get: &dyn Fn(&str, &str) -> Option<Stat>) -> String {
    let row: Vec<String> = targets
        .iter()
        .filter_map(|t| get(t, metric).map(|s| json_stat(t, s)))
        .collect();
    format!("\"{metric}\":{{{}}}", row.join(","))
}

fn chart(get: &dyn Fn(&str, &str) -> Option<Stat>) -> String {
    let series = [
        "userspace-proxy",
        BIND,
        "haproxy",
        "nginx",
        "socat",
        NGINX_NAT,
    ];
    let colors = [
        "#d9480f", "#f59f00", "#1c7ed6", "#2f9e44", "#868e96", "#8ce99a",
    ];
    let (w, h, left, top, bottom) = (960.0, 470.0, 130.0, 60.0, 130.0);
    let plot_h = h - top - bottom;
    let group_w = (w - left - 20.0) / CHART.len() as f64;
    let bar_w = group_w / (series.len() as f64 + 1.0);
    let mut rels: Vec<Vec<Option<f64>>> = Vec::new();
    let mut max: f64 = 1.0;
    for m in CHART {
        let higher = METRICS
            .iter()
            .find(|x| x.0 == *m)
            .map(|x| x.2)
            .unwrap_or(true);
        let d = get("direct", m).map(|s| s.median);
        let row: Vec<Option<f64>> = series
            .iter()
            .map(|t| match (get(t, m), d) {
                (Some(s), Some(d)) if s.median > 0.0 && d > 0.0 => {
                    Some(relative(s.median, d, higher))
                }
                _ => None,
            })
            .collect();
        for v in row.iter().flatten() {
            max = max.max(*v);
        }
        rels.push(row);
    }
    let max = (max * 10.0).ceil() / 10.0;
    let y = |v: f64| top + plot_h - v / max * plot_h;
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    let _ = writeln!(s, "<text x=\"{left}\" y=\"22\" font-size=\"15\">Performance relative to the direct path (1.0 = no proxy; higher is better)</text>");
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let _ = writeln!(s, "<line x1=\"{left}\" x2=\"{0}\" y1=\"{1:.1}\" y2=\"{1:.1}\" stroke=\"#ddd\"/><text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{v:.2}</text>", w - 20.0, y(v), left - 6.0, y(v) + 4.0);
    }
    let _ = writeln!(s, "<line x1=\"{left}\" x2=\"{}\" y1=\"{1:.1}\" y2=\"{1:.1}\" stroke=\"#000\" stroke-dasharray=\"4 3\"/>", w - 20.0, y(1.0));
    for (gi, (m, row)) in CHART.iter().zip(&rels).enumerate() {
        let gx = left + gi as f64 * group_w + bar_w / 2.0;
        for (si, v) in row.iter().enumerate() {
            if let Some(v) = v {
                let x = gx + si as f64 * bar_w;
                let _ = writeln!(s, "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{} {m}: {v:.2}</title></rect>", y(*v), bar_w - 2.0, top + plot_h - y(*v), colors[si], series[si]);
            }
        }
        let label = METRICS.iter().find(|x| x.0 == *m).map(|x| x.1).unwrap_or(m);
        let _ = writeln!(
            s,
            "<text transform=\"translate({:.1},{:.1}) rotate(-25)\" text-anchor=\"end\">{}</text>",
            gx + group_w / 2.0,
            top + plot_h + 16.0,
            label.replace('&', "&amp;")
        );
    }
    // Each legend entry as wide as its name (about 7 px a character at this font size).
    let mut x = left;
    for (si, name) in series.iter().enumerate() {
        let _ = writeln!(s, "<rect x=\"{x}\" y=\"32\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"42\">{name}</text>", colors[si], x + 16.0);
        x += 16.0 + 7.0 * name.len() as f64 + 20.0;
    }
    s.push_str("</svg>\n");
    s
}
