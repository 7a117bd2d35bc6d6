//! Load generator and echo server for `make bench`. Every run is bounded in count and time, and
//! refuses a non-loopback target unless it runs inside a namespace that holds only `lo` and the
//! benchmark's own veth links (names starting with `up`).
//!
//! ```text
//! loadgen serve  --tcp ADDR --udp ADDR --secs N     echo servers (TCP and UDP)
//! loadgen rr     --target ADDR --count N --size B [--connect-ms T]   TCP request/response on one connection
//! loadgen crr    --target ADDR --secs N --conc C    connect + 100-byte exchange + close
//! loadgen udp-rr --target ADDR --count N --size B   UDP request/response
//! loadgen udp-flood --target ADDR --secs N [--pps R] UDP echo flood: delivered packets/s, loss
//!                                                   (--pps paces the offered load; 0: flat out)
//! loadgen hold   --target ADDR --conns N --secs N   open N connections, print READY, hold them
//! loadgen probe  --target ADDR --within-ms N        retry a TCP exchange every few ms until it
//!                                                   works; print the ms from start to success
//! ```
//! Results are one JSON object per run on stdout.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn args() -> (String, HashMap<String, String>) {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().unwrap_or_default();
    let mut m = HashMap::new();
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_default();
        m.insert(k.trim_start_matches("--").to_string(), v);
    }
    (cmd, m)
}

fn get<T: std::str::FromStr>(m: &HashMap<String, String>, k: &str, default: T) -> T {
    m.get(k).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn guard(target: &SocketAddr) {
    if let Err(e) = userspace_proxy::safety::check_target(target) {
        eprintln!("loadgen: {e}");
        std::process::exit(2);
    }
}

/// Ends the run with one line naming what failed, rather than a panic: the bench keeps a
/// loadgen's stderr in its logs (a readiness probe's in `cp-*.probes.log`), where a backtrace
/// would bury the cause.
fn fail(what: &str, target: &SocketAddr, e: std::io::Error) -> ! {
    eprintln!("loadgen: {what} {target}: {e}");
    std::process::exit(1);
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn serve(m: &HashMap<String, String>) {
    let secs = get(m, "secs", 600u64);
    if let Some(tcp) = m.get("tcp") {
        let l = std::net::TcpListener::bind(tcp.as_str()).expect("tcp bind");
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || echo_tcp(s));
            }
        });
    }
    if let Some(udp) = m.get("udp") {
        let s = UdpSocket::bind(udp.as_str()).expect("udp bind");
        for _ in 0..2 {
            let s = s.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            });
        }
    }
    std::thread::sleep(Duration::from_secs(secs));
}

fn echo_tcp(mut s: TcpStream) {
    s.set_nodelay(true).ok();
    let mut buf = vec![0u8; 65_536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn exchange(s: &mut TcpStream, msg: &[u8], buf: &mut [u8]) -> std::io::Result<()> {
    s.write_all(msg)?;
    let mut got = 0;
    while got < msg.len() {
        let n = s.read(&mut buf[got..msg.len()])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(())
}

fn rr(target: SocketAddr, m: &HashMap<String, String>) {
    let count = get(m, "count", 20_000usize).min(1_000_000);
    let size = get(m, "size", 100usize);
    let connect = Duration::from_millis(get(m, "connect-ms", 3000u64));
    let mut s = TcpStream::connect_timeout(&target, connect)
        .unwrap_or_else(|e| fail("connect to", &target, e));
    s.set_nodelay(true)
        .and_then(|()| s.set_read_timeout(Some(Duration::from_secs(3))))
        .unwrap_or_else(|e| fail("set options on the connection to", &target, e));
    let msg = vec![7u8; size];
    let mut buf = vec![0u8; size];
    for _ in 0..count / 10 {
        exchange(&mut s, &msg, &mut buf)
            .unwrap_or_else(|e| fail("warm-up exchange with", &target, e));
    }
    let mut lat = Vec::with_capacity(count);
    let start = Instant::now();
    for _ in 0..count {
        let t = Instant::now();
        exchange(&mut s, &msg, &mut buf).unwrap_or_else(|e| fail("exchange with", &target, e));
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    println!(
        "{{\"p50_us\":{:.1},\"p99_us\":{:.1},\"rps\":{:.0}}}",
        percentile(&lat, 0.5) as f64 / 1e3,
        percentile(&lat, 0.99) as f64 / 1e3,
        count as f64 / secs
    );
}

fn crr(target: SocketAddr, m: &HashMap<String, String>) {
    let secs = get(m, "secs", 5u64).min(120);
    let conc = get(m, "conc", 4usize).clamp(1, 256);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let handles: Vec<_> = (0..conc)
        .map(|_| {
            std::thread::spawn(move || {
                let msg = [9u8; 100];
                let mut buf = [0u8; 100];
                let (mut lat, mut errors) = (Vec::new(), 0u64);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let ok = TcpStream::connect_timeout(&target, Duration::from_secs(2)).and_then(
                        |mut s| {
                            s.set_nodelay(true)?;
                            s.set_read_timeout(Some(Duration::from_secs(2)))?;
                            exchange(&mut s, &msg, &mut buf)
                        },
                    );
                    match ok {
                        Ok(()) => lat.push(t.elapsed().as_nanos() as u64),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let (mut lat, mut errors) = (Vec::new(), 0);
    for h in handles {
        let (l, e) = h.join().unwrap();
        lat.extend(l);
        errors += e;
    }
    lat.sort_unstable();
    println!(
        "{{\"cps\":{:.0},\"p99_us\":{:.1},\"errors\":{errors}}}",
        lat.len() as f64 / secs as f64,
        percentile(&lat, 0.99) as f64 / 1e3
    );
}

/// A UDP socket connected to `target` whose receives time out after `timeout`.
fn udp_socket(target: &SocketAddr, timeout: Duration) -> UdpSocket {
    UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.set_read_timeout(Some(timeout))?;
            s.connect(target)?;
            Ok(s)
        })
        .unwrap_or_else(|e| fail("open a UDP socket to", target, e))
}

fn udp_rr(target: SocketAddr, m: &HashMap<String, String>) {
    let count = get(m, "count", 20_000usize).min(1_000_000);
    let size = get(m, "size", 100usize);
    let s = udp_socket(&target, Duration::from_millis(200));
    let msg = vec![5u8; size];
    let mut buf = vec![0u8; 65_536];
    let (mut lat, mut lost, mut silent) = (Vec::with_capacity(count), 0u64, 0u32);
    for i in 0..count + count / 10 {
        let t = Instant::now();
        // A send refused by an earlier ICMP error counts as a lost request, as a failed
        // receive does.
        match s.send(&msg).and_then(|_| s.recv(&mut buf)) {
            Ok(_) => {
                silent = 0;
                if i >= count / 10 {
                    lat.push(t.elapsed().as_nanos() as u64);
                }
            }
            Err(_) => {
                lost += 1;
                silent += 1;
                // A target that stopped answering ends the run after 2 s, not after a timeout
                // for every request left.
                if silent == 10 {
                    break;
                }
            }
        }
    }
    lat.sort_unstable();
    println!(
        "{{\"p50_us\":{:.1},\"p99_us\":{:.1},\"lost\":{lost}}}",
        percentile(&lat, 0.5) as f64 / 1e3,
        percentile(&lat, 0.99) as f64 / 1e3
    );
}

fn udp_flood(target: SocketAddr, m: &HashMap<String, String>) {
    let secs = get(m, "secs", 3u64).min(60);
    let size = get(m, "size", 100usize);
    let pps = get(m, "pps", 0u64);
    let s = udp_socket(&target, Duration::from_millis(100));
    let r = s
        .try_clone()
        .unwrap_or_else(|e| fail("clone the socket for", &target, e));
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (rc, st) = (received.clone(), stop.clone());
    let rx = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while !st.load(Ordering::Relaxed) {
            if r.recv(&mut buf).is_ok() {
                rc.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let msg = vec![3u8; size];
    let mut sent = 0u64;
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut offered = 0u64;
    while Instant::now() < end {
        for _ in 0..16 {
            offered += 1;
            if s.send(&msg).is_ok() {
                sent += 1;
            }
        }
        if pps > 0 {
            // Paced: wait until the schedule catches up with what was offered.
            let due = start + Duration::from_secs_f64(offered as f64 / pps as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300)); // let the last replies arrive
    stop.store(true, Ordering::Relaxed);
    rx.join().unwrap();
    let got = received.load(Ordering::Relaxed);
    println!(
        "{{\"sent_pps\":{:.0},\"delivered_pps\":{:.0},\"loss\":{:.4}}}",
        sent as f64 / secs as f64,
        got as f64 / secs as f64,
        1.0 - got as f64 / sent.max(1) as f64
    );
}

fn hold(target: SocketAddr, m: &HashMap<String, String>) {
    let conns = get(m, "conns", 1000usize).min(50_000);
    let secs = get(m, "secs", 30u64).min(600);
    let mut held = Vec::with_capacity(conns);
    let msg = [1u8; 100];
    let mut buf = [0u8; 100];
    let mut errors = 0;
    for _ in 0..conns {
        match TcpStream::connect_timeout(&target, Duration::from_secs(2)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            exchange(&mut s, &msg, &mut buf)?;
            Ok(s)
        }) {
            Ok(s) => held.push(s),
            Err(_) => errors += 1,
        }
    }
    println!("READY {} {errors}", held.len());
    std::io::stdout().flush().ok();
    // Hold until stdin closes or the time is up.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        let _ = std::io::stdin().read(&mut b);
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs(secs));
    drop(held);
}

/// Polls with 5 ms connect timeouts until one exchange succeeds. Started before the change it
/// measures, so the figure is an upper bound on the change's latency.
fn probe(target: SocketAddr, m: &HashMap<String, String>) {
    let within = Duration::from_millis(get(m, "within-ms", 5000u64).min(60_000));
    let start = Instant::now();
    println!("STARTED");
    std::io::stdout().flush().ok();
    let msg = [2u8; 100];
    let mut buf = [0u8; 100];
    while start.elapsed() < within {
        let ok = TcpStream::connect_timeout(&target, Duration::from_millis(5)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            exchange(&mut s, &msg, &mut buf)
        });
        if ok.is_ok() {
            println!("{{\"ms\":{:.1}}}", start.elapsed().as_secs_f64() * 1e3);
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("{{\"ms\":-1}}");
}

fn main() {
    let (cmd, m) = args();
    if cmd == "serve" {
        return serve(&m);
    }
    let target: SocketAddr = m
        .get("target")
        .expect("--target")
        .parse()
        .expect("target is ip:port");
    guard(&target);
    match cmd.as_str() {
        "rr" => rr(target, &m),
        "crr" => crr(target, &m),
        "udp-rr" => udp_rr(target, &m),
        "udp-flood" => udp_flood(target, &m),
        "hold" => hold(target, &m),
        "probe" => probe(target, &m),
        other => {
            eprintln!("loadgen: unknown command {other:?}");
            std::process::exit(2);
        }
    }
}
