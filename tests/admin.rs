//! The health and metrics servers over real HTTP: health answers, metrics move with real
//! traffic, and a bind failure is fatal only with bindAddressHardFail.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use userspace_proxy::app;
use userspace_proxy::config::Overrides;
use userspace_proxy::proxier::rules::Backend;

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

fn with_admin(extra: &str, healthz: &str, metrics: &str) -> String {
    header(extra)
        .replace(
            "healthzBindAddress: \"\"",
            &format!("healthzBindAddress: \"{healthz}\""),
        )
        .replace(
            "metricsBindAddress: \"\"",
            &format!("metricsBindAddress: \"{metrics}\""),
        )
}

#[tokio::test]
async fn health_and_metrics_follow_real_traffic() {
    let cancel = CancellationToken::new();
    let a = tcp_backend("a", cancel.clone()).await;
    let text = format!(
        "{}{}{}",
        with_admin("", "127.0.0.1:0", "127.0.0.1:0"),
        service("web", "", &["http:80"]),
        slice("web", "http", "TCP", &[a])
    );
    let proxy = Proxy::start(&text).await;
    let web = proxy.wait_port("web", "http").await;
    let healthz = proxy.running.healthz_addr.expect("health server bound");
    let metrics = proxy.running.metrics_addr.expect("metrics server bound");

    for path in ["/healthz", "/livez"] {
        let (code, body) = get(healthz, path).await;
        assert_eq!(code, 200, "{path}: {body}");
        assert!(
            body.contains("\"lastUpdated\"") && body.contains("\"currentTime\""),
            "{body}"
        );
    }
    assert_eq!(get(healthz, "/nope").await.0, 404);

    for _ in 0..3 {
        assert_eq!(tcp_hello(web).await.as_deref(), Some("a"));
    }
    let series =
        "userspace_proxy_connections_total{service=\"default/web:http\",protocol=\"tcp\"} 3";
    eventually(
        Duration::from_secs(5),
        "connection counter reaches 3",
        || async move { get(metrics, "/metrics").await.1.contains(series) },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "bytes to client counted",
        || async move {
            let body = get(metrics, "/metrics").await.1;
            body.lines()
                .find(|l| {
                    l.starts_with(
                        "userspace_proxy_bytes_to_client_total{service=\"default/web:http\"",
                    )
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .is_some_and(|n| n >= 6)
        },
    )
    .await;
    let (_, body) = get(metrics, "/metrics").await;
    let syncs = body
        .lines()
        .find(|l| l.starts_with("kubeproxy_sync_proxy_rules_duration_seconds_count "))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap();
    assert!(syncs >= 1, "{body}");
    assert!(
        body.contains("kubeproxy_sync_proxy_rules_service_changes_total 1"),
        "one port opened"
    );

    assert_eq!(
        get(metrics, "/proxyMode").await,
        (200, "userspace".to_string())
    );
    let (code, configz) = get(metrics, "/configz").await;
    assert_eq!(code, 200);
    let json: serde_json::Value = serde_json::from_str(&configz).expect("configz is JSON");
    assert_eq!(json["mode"], "userspace");
    let (_, table) = get(metrics, "/debug/services").await;
    let line = table
        .lines()
        .find(|l| l.starts_with("default/web:http"))
        .expect("web listed");
    assert!(
        line.contains(&a.to_string()) && line.contains(&web.port().to_string()),
        "{table}"
    );

    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn a_taken_admin_port_is_fatal_only_with_hard_fail() {
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");

    std::fs::write(&path, with_admin("bindAddressHardFail: true\n", "", &taken)).unwrap();
    let loaded = app::load(Some(path.clone()), Overrides::default()).unwrap();
    let (_hup, rx) = tokio::sync::mpsc::channel(1);
    let err = app::start(loaded, Backend::None, rx)
        .await
        .expect_err("hard fail");
    let chain = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(chain.contains(&taken), "{chain}");

    std::fs::write(&path, with_admin("", "", &taken)).unwrap();
    let loaded = app::load(Some(path), Overrides::default()).unwrap();
    let (_hup, rx) = tokio::sync::mpsc::channel(1);
    let running = app::start(loaded, Backend::None, rx)
        .await
        .expect("soft failure keeps running");
    assert!(
        running.metrics_addr.is_none(),
        "not bound yet; retried in the background"
    );
    // Once the port is free, the retry (every 5 s) binds it.
    drop(squatter);
    let addr: SocketAddr = taken.parse().unwrap();
    eventually(
        Duration::from_secs(12),
        "metrics server bound on retry",
        || async move {
            match TcpStream::connect(addr).await {
                Ok(_) => get(addr, "/proxyMode").await == (200, "userspace".to_string()),
                Err(_) => false,
            }
        },
    )
    .await;
    running.stop().await;
}
