//! TCP through real listeners over loopback: round robin, dial retry, no endpoints, half-close,
//! ClientIP affinity, many connections open at once on one port.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn round_robin_spreads_evenly_over_three_backends() {
    let cancel = CancellationToken::new();
    let a = tcp_backend("a", cancel.clone()).await;
    let b = tcp_backend("b", cancel.clone()).await;
    let c = tcp_backend("c", cancel.clone()).await;
    let text = web_http(&[a, b, c]);
    let proxy = Proxy::start(&text).await;
    let addr = proxy.wait_port("web", "http").await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..9 {
        let id = tcp_hello(addr).await.expect("connection through the proxy");
        *counts.entry(id).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(
        counts.values().all(|n| *n == 3),
        "round robin gives each backend 3 of 9: {counts:?}"
    );
    let stats = proxy.port_status("web", "http").unwrap().stats.unwrap();
    assert_eq!(stats.connections_total.load(Ordering::Relaxed), 9);
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn dial_retries_past_a_refusing_endpoint() {
    let cancel = CancellationToken::new();
    let live = tcp_backend("live", cancel.clone()).await;
    let dead = refusing_addr().await;
    let text = web_http(&[dead, live]);
    let proxy = Proxy::start(&text).await;
    let addr = proxy.wait_port("web", "http").await;
    for _ in 0..6 {
        assert_eq!(
            tcp_hello(addr).await.as_deref(),
            Some("live"),
            "every connection reaches the live backend"
        );
    }
    let stats = proxy.port_status("web", "http").unwrap().stats.unwrap();
    assert!(
        stats.dial_failures.load(Ordering::Relaxed) >= 1,
        "the refusing endpoint was tried and skipped"
    );
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn no_endpoints_closes_the_client_at_once() {
    let text = format!("{}{}", header(""), service("empty", "", &["http:80"]));
    let proxy = Proxy::start(&text).await;
    let addr = proxy.wait_port("empty", "http").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .expect("closed promptly, not left hanging")
        .unwrap_or(0);
    assert_eq!(n, 0, "no data, just a close");
    let stats = proxy.port_status("empty", "http").unwrap().stats.unwrap();
    assert_eq!(stats.no_endpoints.load(Ordering::Relaxed), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn half_close_reaches_the_backend_and_replies_still_flow() {
    let cancel = CancellationToken::new();
    let a = tcp_backend("a", cancel.clone()).await;
    let text = web_http(&[a]);
    let proxy = Proxy::start(&text).await;
    let addr = proxy.wait_port("web", "http").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let payload = vec![b'x'; 100_000];
    s.write_all(&payload).await.unwrap();
    // Close our write side only: the backend must see EOF, answer `bye`, and we must still
    // be able to read everything.
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("backend saw our EOF")
        .unwrap();
    let mut want = b"a\n".to_vec();
    want.extend_from_slice(&payload);
    want.extend_from_slice(b"bye");
    assert_eq!(got.len(), want.len());
    assert!(got == want, "echo plus bye after half-close");
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn client_ip_affinity_pins_to_one_backend() {
    let cancel = CancellationToken::new();
    let a = tcp_backend("a", cancel.clone()).await;
    let b = tcp_backend("b", cancel.clone()).await;
    let c = tcp_backend("c", cancel.clone()).await;
    let spec =
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n";
    let text = format!(
        "{}{}{}",
        header(""),
        service("sticky", spec, &["http:80"]),
        slice("sticky", "http", "TCP", &[a, b, c])
    );
    let proxy = Proxy::start(&text).await;
    let addr = proxy.wait_port("sticky", "http").await;
    let first = tcp_hello(addr).await.unwrap();
    for _ in 0..8 {
        assert_eq!(
            tcp_hello(addr).await.unwrap(),
            first,
            "same client IP, same backend"
        );
    }
    proxy.stop().await;
    cancel.cancel();
}

/// Enough connections open at once on one port that the accepting event loop hands some to the
/// others (on a machine with more than one CPU): every one of them still relays both ways, and
/// each gets its own replies.
#[tokio::test]
async fn many_connections_open_at_once_all_relay() {
    let cancel = CancellationToken::new();
    let echo = tcp_backend("e", cancel.clone()).await;
    let text = web_http(&[echo]);
    let proxy = Proxy::start(&text).await;
    let addr = proxy.wait_port("web", "http").await;
    let mut conns = Vec::new();
    for _ in 0..48 {
        let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        let mut hello = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut hello))
            .await
            .expect("greeting in time")
            .unwrap();
        assert_eq!(&hello, b"e\n");
        conns.push(s);
    }
    for round in 0..3u32 {
        for (i, s) in conns.iter_mut().enumerate() {
            let msg = format!("conn {i} round {round}");
            s.write_all(msg.as_bytes()).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
                .await
                .expect("echo in time")
                .unwrap();
            assert_eq!(back, msg.as_bytes());
        }
    }
    let stats = proxy.port_status("web", "http").unwrap().stats.unwrap();
    assert_eq!(stats.connections_total.load(Ordering::Relaxed), 48);
    assert_eq!(stats.connections_active.load(Ordering::Relaxed), 48);
    // With more than one event loop, the accepting one handed some over (it would otherwise
    // serve all 48 against none).
    let workers = userspace_proxy::listener::worker_status();
    if workers.len() > 1 {
        assert!(workers.iter().any(|w| w.taken > 0), "{workers:?}");
    } else {
        eprintln!("one CPU: no other event loop to hand connections to");
    }
    drop(conns);
    proxy.stop().await;
    cancel.cancel();
}

/// The kernel's timer on this network namespace's IPv4 TCP socket from `local` to `peer`, as
/// `/proc/net/tcp` shows it: its kind (2: the socket timer, which on an idle established
/// connection is keepalive's) and the seconds until it fires.
fn tcp_timer(local: std::net::SocketAddr, peer: std::net::SocketAddr) -> Option<(u8, f64)> {
    let hex = |a: std::net::SocketAddr| match a {
        // The address in the kernel's byte order (little-endian here), the port as a number.
        std::net::SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        std::net::SocketAddr::V6(_) => String::new(),
    };
    let (local, peer) = (hex(local), hex(peer));
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1) != Some(&local.as_str()) || f.get(2) != Some(&peer.as_str()) {
            return None;
        }
        let (kind, when) = f.get(5)?.split_once(':')?;
        // Clock ticks of USER_HZ, 100 a second.
        let ticks = u64::from_str_radix(when, 16).ok()?;
        Some((u8::from_str_radix(kind, 16).ok()?, ticks as f64 / 100.0))
    })
}

/// A connection that lasts gets keepalive on the proxy's backend side too, with the client
/// side's timing, so a backend that vanishes without a FIN is reaped. It is switched on a second
/// or two after the dial (src/listener/keepalive.rs), not at once: a connection that ends
/// sooner never needs it, and the four system calls were a sixth of a short connection's.
#[tokio::test]
async fn a_lasting_connection_gets_keepalive_on_its_backend_side() {
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let text = web_http(&[backend_addr]);
    let proxy = Proxy::start(&text).await;
    let addr = proxy.wait_port("web", "http").await;
    let client = TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    let (_accepted, proxy_side) = tokio::time::timeout(Duration::from_secs(5), backend.accept())
        .await
        .expect("the proxy dialled the backend in time")
        .unwrap();
    assert!(
        tcp_timer(proxy_side, backend_addr).is_some(),
        "the proxy's backend socket is in /proc/net/tcp"
    );
    eventually(
        Duration::from_secs(10),
        "a keepalive timer on the proxy's backend socket",
        || {
            let timer = tcp_timer(proxy_side, backend_addr);
            async move { timer.is_some_and(|(kind, _)| kind == 2) }
        },
    )
    .await;
    let (_, left) = tcp_timer(proxy_side, backend_addr).unwrap();
    assert!(
        left > 0.0 && left <= 15.0,
        "the first probe is due within keepalive's 15 s of silence: {left} s"
    );
    drop(client);
    proxy.stop().await;
}

/// A port that takes more than 64 connections within a second is busy, and from then on every
/// event loop accepts it, each through a descriptor of its own for the listening socket. It
/// goes on serving, and removing it closes the socket in every loop.
#[tokio::test]
async fn a_busy_port_is_accepted_by_every_event_loop_and_closes_in_all() {
    let cancel = CancellationToken::new();
    let a = tcp_backend("a", cancel.clone()).await;
    let text = web_http(&[a]);
    let proxy = Proxy::start(&text).await;
    let addr = proxy.wait_port("web", "http").await;
    let stats = proxy.port_status("web", "http").unwrap().stats.unwrap();
    let loops = userspace_proxy::listener::worker_status().len() as u64;
    assert_eq!(stats.accept_loops.load(Ordering::Relaxed), 1);
    // Bursts of back-to-back connections until every loop accepts the port (bounded: 2,000).
    let mut served = 0;
    for _ in 0..20 {
        for _ in 0..100 {
            assert_eq!(tcp_hello(addr).await.as_deref(), Some("a"));
            served += 1;
        }
        if stats.accept_loops.load(Ordering::Relaxed) == loops {
            break;
        }
    }
    if loops > 1 {
        assert_eq!(
            stats.accept_loops.load(Ordering::Relaxed),
            loops,
            "every event loop accepts the port after {served} connections"
        );
    } else {
        eprintln!("one CPU: a busy port has no other event loop to go to");
    }
    let hellos = futures::future::join_all((0..64).map(|_| tcp_hello(addr))).await;
    assert!(
        hellos.iter().all(|h| h.as_deref() == Some("a")),
        "{hellos:?}"
    );
    assert_eq!(stats.connections_total.load(Ordering::Relaxed), served + 64);
    proxy.rewrite(&header(""));
    eventually(
        Duration::from_secs(5),
        "the port's socket closed in every event loop",
        || async move { TcpStream::connect(addr).await.is_err() },
    )
    .await;
    eventually(Duration::from_secs(5), "no accept loop left", || {
        let n = stats.accept_loops.load(Ordering::Relaxed);
        async move { n == 0 }
    })
    .await;
    proxy.stop().await;
    cancel.cancel();
}
