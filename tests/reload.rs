//! Reloads of the config file: add, change, remove, and a broken file that must not disturb
//! what is serving.

mod common;

use std::time::Duration;

use common::*;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn add_change_and_remove_services_by_editing_the_file() {
    let cancel = CancellationToken::new();
    let a = tcp_backend("a", cancel.clone()).await;
    let b = tcp_backend("b", cancel.clone()).await;
    let base = web_http(&[a]);
    let proxy = Proxy::start(&base).await;
    let web = proxy.wait_port("web", "http").await;
    assert_eq!(tcp_hello(web).await.as_deref(), Some("a"));

    // Add a second service: it appears; the first keeps its proxy port.
    let two = format!(
        "{base}{}{}",
        service("api", "", &["grpc:9000"]),
        slice("api", "grpc", "TCP", &[b])
    );
    proxy.rewrite(&two);
    let api = proxy.wait_port("api", "grpc").await;
    assert_eq!(tcp_hello(api).await.as_deref(), Some("b"));
    assert_eq!(
        proxy.wait_port("web", "http").await,
        web,
        "an unrelated change keeps web's listener"
    );

    // A long-lived connection to web must survive the following changes to web.
    let mut held = TcpStream::connect(web).await.unwrap();

    // Change web's endpoints and its service port: same protocol, so the listener stays.
    let changed = format!(
        "{}{}{}{}{}",
        header(""),
        service("web", "", &["http:8080"]),
        slice("web", "http", "TCP", &[b]),
        service("api", "", &["grpc:9000"]),
        slice("api", "grpc", "TCP", &[b])
    );
    proxy.rewrite(&changed);
    eventually(
        Duration::from_secs(5),
        "web's new endpoint serves",
        || async move { tcp_hello(web).await.as_deref() == Some("b") },
    )
    .await;
    assert_eq!(
        proxy.wait_port("web", "http").await,
        web,
        "port change with the same protocol keeps the proxy port"
    );

    // Remove web: its listener closes, established connections finish on their own.
    let removed = format!(
        "{}{}{}",
        header(""),
        service("api", "", &["grpc:9000"]),
        slice("api", "grpc", "TCP", &[b])
    );
    proxy.rewrite(&removed);
    eventually(
        Duration::from_secs(5),
        "web's listener closed",
        || async move { TcpStream::connect(web).await.is_err() },
    )
    .await;
    assert!(proxy.port_status("web", "http").is_none());
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut id = [0u8; 2];
    held.read_exact(&mut id).await.unwrap();
    assert_eq!(&id, b"a\n");
    held.write_all(b"still here").await.unwrap();
    let mut echo = [0u8; 10];
    held.read_exact(&mut echo).await.unwrap();
    assert_eq!(
        &echo, b"still here",
        "established connection outlives its listener"
    );

    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn a_broken_reload_is_refused_and_the_last_good_state_serves() {
    let cancel = CancellationToken::new();
    let a = tcp_backend("a", cancel.clone()).await;
    let good = web_http(&[a]);
    let proxy = Proxy::start(&good).await;
    let web = proxy.wait_port("web", "http").await;

    let broken = format!("{}{}", header(""), service("web", "", &["http:notaport"]));
    proxy.rewrite(&broken);
    let source = proxy.running.source.clone();
    eventually(Duration::from_secs(5), "broken reload refused", || {
        let n = source.rejected();
        async move { n >= 1 }
    })
    .await;
    let err = source.last_error().unwrap();
    assert!(
        err.contains("proxy.yaml")
            && err.contains("document 2")
            && err.contains("Service default/web")
            && err.contains("spec.ports[0].port"),
        "{err}"
    );
    assert_eq!(
        tcp_hello(web).await.as_deref(),
        Some("a"),
        "the last good state keeps serving"
    );

    // SIGHUP path: a forced reload of a fixed file applies.
    let fixed = format!(
        "{}{}{}",
        header(""),
        service("web2", "", &["http:80"]),
        slice("web2", "http", "TCP", &[a])
    );
    std::fs::write(&proxy.path, &fixed).unwrap();
    proxy.hup.send(()).await.unwrap();
    let web2 = proxy.wait_port("web2", "http").await;
    assert_eq!(tcp_hello(web2).await.as_deref(), Some("a"));
    proxy.stop().await;
    cancel.cancel();
}
