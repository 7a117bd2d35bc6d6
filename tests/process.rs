//! The real binary as a process: `status` lists a live connection; running out of file
//! descriptors (a low `ulimit -n`) neither crashes it nor stops it serving once descriptors
//! free up (the original panicked, taking every service down).

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use userspace_proxy::admin::fetch;

const BIN: &str = env!("CARGO_BIN_EXE_userspace-proxy");

/// A port that is free right now (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Running {
    child: Child,
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Running {
    fn start(text: &str, nofile: Option<u32>) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("proxy.yaml");
        let log = dir.path().join("proxy.log");
        std::fs::write(&config, text).unwrap();
        let limit = nofile
            .map(|n| format!("ulimit -n {n}; "))
            .unwrap_or_default();
        let child = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "{limit}exec {BIN} --config {} -v 2",
                config.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Running {
            child,
            _dir: dir,
            config,
            log,
        }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn stop(mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(proxy_port: u16, metrics_port: u16, backend: SocketAddr) -> String {
    let head = header(&format!("portRange: \"{proxy_port}\"\n")).replace(
        "metricsBindAddress: \"\"",
        &format!("metricsBindAddress: \"127.0.0.1:{metrics_port}\""),
    );
    format!(
        "{head}{}{}",
        service("web", "", &["http:80"]),
        slice("web", "http", "TCP", &[backend])
    )
}

#[tokio::test]
async fn status_lists_a_live_connection() {
    let cancel = CancellationToken::new();
    let backend = tcp_backend("a", cancel.clone()).await;
    let (pp, mp) = (free_port(), free_port());
    let proxy = Running::start(&config(pp, mp, backend), None);
    let addr: SocketAddr = ([127, 0, 0, 1], pp).into();
    eventually(Duration::from_secs(10), "proxy serving", || async move {
        tcp_hello(addr).await.is_some()
    })
    .await;
    let _held = TcpStream::connect(addr).await.unwrap();
    let cfg = proxy.config.clone();
    let mut table = String::new();
    eventually(
        Duration::from_secs(5),
        "status shows one active connection",
        || {
            let out = Command::new(BIN)
                .arg("status")
                .arg("--config")
                .arg(&cfg)
                .output()
                .unwrap();
            table = String::from_utf8_lossy(&out.stdout).into_owned();
            let line = table
                .lines()
                .find(|l| l.starts_with("default/web:http"))
                .map(str::to_string);
            async move { line.is_some_and(|l| l.split_whitespace().nth(5) == Some("1")) }
        },
    )
    .await;
    assert!(
        table.contains(&backend.to_string()) && table.contains(&pp.to_string()),
        "{table}"
    );
    assert!(proxy.stop().success());
    cancel.cancel();
}

#[tokio::test]
async fn running_out_of_descriptors_backs_off_and_recovers() {
    let cancel = CancellationToken::new();
    let backend = tcp_backend("a", cancel.clone()).await;
    let (pp, mp) = (free_port(), free_port());
    let mut proxy = Running::start(&config(pp, mp, backend), Some(64));
    let addr: SocketAddr = ([127, 0, 0, 1], pp).into();
    eventually(Duration::from_secs(10), "proxy serving", || async move {
        tcp_hello(addr).await.is_some()
    })
    .await;

    // Each proxied connection holds two descriptors: 80 clients exhaust 64.
    let mut waiting = Vec::new();
    for _ in 0..80 {
        if let Ok(s) = TcpStream::connect(addr).await {
            waiting.push(tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut s = s;
                let mut id = [0u8; 2];
                let ok = matches!(
                    tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut id)).await,
                    Ok(Ok(2))
                );
                (s, ok)
            }));
        }
    }
    let (mut held, mut served) = (Vec::new(), 0);
    for w in waiting {
        let (s, ok) = w.await.unwrap();
        served += usize::from(ok);
        held.push(s);
    }
    assert!(
        served < 80,
        "the limit was never reached ({served} served): the test did not exhaust descriptors"
    );
    assert!(
        proxy.alive(),
        "the proxy died when descriptors ran out:\n{}",
        std::fs::read_to_string(&proxy.log).unwrap_or_default()
    );

    drop(held);
    eventually(
        Duration::from_secs(10),
        "service resumes once descriptors are free",
        || async move { tcp_hello(addr).await.is_some() },
    )
    .await;
    let metrics: SocketAddr = ([127, 0, 0, 1], mp).into();
    let body = tokio::task::spawn_blocking(move || fetch(metrics, "/metrics"))
        .await
        .unwrap()
        .unwrap()
        .1;
    let errors: u64 = body
        .lines()
        .find(|l| l.starts_with("userspace_proxy_accept_errors_total{service=\"default/web:http\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!(errors > 0, "accept errors were not counted:\n{body}");
    let log = std::fs::read_to_string(&proxy.log).unwrap();
    assert!(
        log.contains("out of descriptors"),
        "no log line about running out:\n{log}"
    );
    assert!(proxy.stop().success());
    cancel.cancel();
}
