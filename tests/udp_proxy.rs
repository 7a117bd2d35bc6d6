//! UDP through real listeners over loopback: per-client sessions, idle expiry, large datagrams.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

async fn udp_proxy(
    extra: &str,
    n_backends: usize,
) -> (Proxy, std::net::SocketAddr, CancellationToken) {
    let cancel = CancellationToken::new();
    let mut backends = Vec::new();
    for i in 0..n_backends {
        backends.push(udp_backend(&format!("u{i}"), cancel.clone()).await);
    }
    let (proxy, addr) = udp_proxy_to(extra, &backends).await;
    (proxy, addr, cancel)
}

/// A proxy with one UDP service port (`dns/dns`) in front of these backends; returns its address.
async fn udp_proxy_to(
    extra: &str,
    backends: &[std::net::SocketAddr],
) -> (Proxy, std::net::SocketAddr) {
    let text = format!(
        "{}{}{}",
        header(extra),
        service("dns", "", &["dns:53/UDP"]),
        slice("dns", "dns", "UDP", backends)
    );
    let proxy = Proxy::start(&text).await;
    let addr = proxy.wait_port("dns", "dns").await;
    (proxy, addr)
}

#[tokio::test]
async fn each_client_gets_its_own_session_and_its_own_replies() {
    let (proxy, addr, cancel) = udp_proxy("udpIdleTimeout: 10s\n", 2).await;
    let c1 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let c2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (id1, p1) = udp_roundtrip(&c1, addr, b"from-one")
        .await
        .expect("reply to client 1");
    let (id2, p2) = udp_roundtrip(&c2, addr, b"from-two")
        .await
        .expect("reply to client 2");
    assert_eq!(p1, b"from-one");
    assert_eq!(p2, b"from-two");
    assert_ne!(
        id1, id2,
        "two clients, two sessions, round robin across the two backends"
    );
    // A session sticks to its backend.
    for _ in 0..5 {
        assert_eq!(udp_roundtrip(&c1, addr, b"again").await.unwrap().0, id1);
    }
    let stats = proxy.port_status("dns", "dns").unwrap().stats.unwrap();
    assert_eq!(stats.udp_sessions_active.load(Ordering::Relaxed), 2);
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn idle_sessions_expire() {
    let (proxy, addr, cancel) = udp_proxy("udpIdleTimeout: 300ms\n", 1).await;
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp_roundtrip(&c, addr, b"hello").await.expect("reply");
    let stats = proxy.port_status("dns", "dns").unwrap().stats.unwrap();
    assert_eq!(stats.udp_sessions_active.load(Ordering::Relaxed), 1);
    eventually(Duration::from_secs(5), "idle UDP session closed", || {
        let n = stats.udp_sessions_active.load(Ordering::Relaxed);
        async move { n == 0 }
    })
    .await;
    // A new datagram opens a new session and still gets through.
    assert_eq!(udp_roundtrip(&c, addr, b"back").await.unwrap().1, b"back");
    proxy.stop().await;
    cancel.cancel();
}

/// A session in use is never expired, however many idle timeouts its life spans: the idle timer
/// fires at the deadline it was set to, and must then follow the traffic, not end the session.
/// The backend answers with the address it was sent from, which is the session's own socket: a
/// session replaced mid-way would show a second address.
#[tokio::test]
async fn a_session_in_use_outlives_its_idle_timeout() {
    let cancel = CancellationToken::new();
    let backend_addr = udp_backend_replying(cancel.clone(), |_, from| {
        vec![format!("seen|{from}").into_bytes()]
    })
    .await;
    let (proxy, addr) = udp_proxy_to("udpIdleTimeout: 500ms\n", &[backend_addr]).await;
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut sources = std::collections::BTreeSet::new();
    // 15 exchanges 100 ms apart: 1.5 s, three idle timeouts.
    for _ in 0..15 {
        let (_, source) = udp_roundtrip(&c, addr, b"ping").await.expect("reply");
        sources.insert(String::from_utf8(source).unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        sources.len(),
        1,
        "the session was replaced while in use: {sources:?}"
    );
    let stats = proxy.port_status("dns", "dns").unwrap().stats.unwrap();
    assert_eq!(stats.udp_sessions_active.load(Ordering::Relaxed), 1);
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn a_60_kb_datagram_passes_intact() {
    let (proxy, addr, cancel) = udp_proxy("", 1).await;
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let payload: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    let (_, got) = udp_roundtrip(&c, addr, &payload)
        .await
        .expect("reply to a 60 KB datagram");
    assert_eq!(
        got.len(),
        payload.len(),
        "not truncated (the original cut at 4096 bytes)"
    );
    assert!(got == payload);
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn session_table_is_bounded() {
    let (proxy, addr, cancel) = udp_proxy("udpMaxSessions: 2\nudpIdleTimeout: 10s\n", 1).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    assert!(udp_roundtrip(&clients[0], addr, b"1").await.is_some());
    assert!(udp_roundtrip(&clients[1], addr, b"2").await.is_some());
    assert!(
        udp_roundtrip(&clients[2], addr, b"3").await.is_none(),
        "third client over the bound is dropped"
    );
    let stats = proxy.port_status("dns", "dns").unwrap().stats.unwrap();
    assert_eq!(stats.udp_sessions_active.load(Ordering::Relaxed), 2);
    assert!(stats.udp_dropped.load(Ordering::Relaxed) >= 1);
    proxy.stop().await;
    cancel.cancel();
}

/// Bursts from two clients at once, of mixed sizes (equal runs, shorter tails, datagrams above a
/// segment's size): the proxy reads them in batches and sends runs as one segmented send each way.
/// Every datagram must come back whole, to its own client, in the order it was sent.
#[tokio::test]
async fn bursts_arrive_whole_and_in_order() {
    let (proxy, addr, cancel) = udp_proxy("udpIdleTimeout: 10s\n", 1).await;
    let clients = [
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    ];
    let size = |seq: u32| match seq % 17 {
        5 => 50,
        11 => 3_000,
        13 => 1_472,
        _ => 200,
    };
    let payload = |client: u8, seq: u32| -> Vec<u8> {
        let mut p = vec![client; size(seq)];
        p[1..5].copy_from_slice(&seq.to_be_bytes());
        p
    };
    const BURST: u32 = 40;
    let mut buf = vec![0u8; 65_536];
    for round in 0..25u32 {
        let seqs = round * BURST..(round + 1) * BURST;
        for seq in seqs.clone() {
            for (c, sock) in clients.iter().enumerate() {
                sock.send_to(&payload(c as u8, seq), addr).await.unwrap();
            }
        }
        for (c, sock) in clients.iter().enumerate() {
            for seq in seqs.clone() {
                let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
                    .await
                    .unwrap_or_else(|_| panic!("client {c}: no reply for datagram {seq}"))
                    .unwrap();
                let body = &buf[..n];
                let bar = body.iter().position(|b| *b == b'|').unwrap();
                assert_eq!(
                    &body[bar + 1..],
                    payload(c as u8, seq).as_slice(),
                    "client {c}: reply {seq} is not datagram {seq}, whole"
                );
            }
        }
    }
    let stats = proxy.port_status("dns", "dns").unwrap().stats.unwrap();
    assert_eq!(stats.udp_dropped.load(Ordering::Relaxed), 0);
    proxy.stop().await;
    cancel.cancel();
}

/// A backend that answers one datagram with 200, more than one wake-up of the session relays
/// (64) but fewer than the default socket buffers hold: every reply arrives, in order, and
/// another client is served meanwhile. (Ending the session after one wake-up's share, instead
/// of waiting for the next, fails this test.)
#[tokio::test]
async fn a_backend_flood_is_relayed_in_order_without_starving_others() {
    const REPLIES: u32 = 200;
    let cancel = CancellationToken::new();
    let backend_addr = udp_backend_replying(cancel.clone(), |datagram, _| {
        if datagram == b"flood" {
            (0..REPLIES).map(|i| i.to_be_bytes().to_vec()).collect()
        } else {
            vec![datagram.to_vec()]
        }
    })
    .await;
    let (proxy, addr) = udp_proxy_to("udpIdleTimeout: 10s\n", &[backend_addr]).await;
    let flooded = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    flooded.send_to(b"flood", addr).await.unwrap();
    // Read the flood on its own thread while the other client is served.
    let reader = std::thread::spawn({
        let sock = flooded.into_std().unwrap();
        move || {
            sock.set_nonblocking(false).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while got.len() < REPLIES as usize {
                match sock.recv(&mut buf) {
                    Ok(4) => got.push(u32::from_be_bytes(buf[..4].try_into().unwrap())),
                    Ok(n) => panic!("a reply of {n} bytes"),
                    Err(_) => break, // a second without replies: the flood is over
                }
            }
            got
        }
    });
    other.send_to(b"ping", addr).await.unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), other.recv_from(&mut buf))
        .await
        .expect("the other client is answered during the flood")
        .unwrap();
    assert_eq!(&buf[..n], b"ping");
    let got = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    assert_eq!(
        got,
        (0..REPLIES).collect::<Vec<_>>(),
        "every reply, in order (relaying must go on past a wake-up's share)"
    );
    proxy.stop().await;
    cancel.cancel();
}

/// Removing a UDP service ends its sessions at once and closes its socket: every UDP loop lets
/// go of the port (the address can be bound again, which it cannot while any loop still holds
/// the socket).
#[tokio::test]
async fn removing_the_service_ends_its_sessions_and_frees_its_socket() {
    let cancel = CancellationToken::new();
    let backend = udp_backend("u0", cancel.clone()).await;
    let (proxy, addr) = udp_proxy_to("udpIdleTimeout: 10s\n", &[backend]).await;
    let clients: Vec<UdpSocket> = udp_clients(3).await;
    for c in &clients {
        assert!(udp_roundtrip(c, addr, b"hi").await.is_some());
    }
    let stats = proxy.port_status("dns", "dns").unwrap().stats.unwrap();
    assert_eq!(stats.udp_sessions_active.load(Ordering::Relaxed), 3);

    proxy.rewrite(&header("udpIdleTimeout: 10s\n"));
    eventually(Duration::from_secs(5), "the UDP sessions ended", || {
        let n = stats.udp_sessions_active.load(Ordering::Relaxed);
        async move { n == 0 }
    })
    .await;
    eventually(
        Duration::from_secs(5),
        "the service socket closed",
        || async move { std::net::UdpSocket::bind(addr).is_ok() },
    )
    .await;
    assert!(proxy.port_status("dns", "dns").is_none());
    proxy.stop().await;
    cancel.cancel();
}

async fn udp_clients(n: usize) -> Vec<UdpSocket> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    v
}
