//! Test harness: real echo backends on 127.0.0.1:0, a proxy started in-process from a config
//! file, and polling helpers with deadlines (no sleep-and-hope).
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use userspace_proxy::app;
use userspace_proxy::config::Overrides;
use userspace_proxy::proxier::rules::Backend;
use userspace_proxy::proxier::{PortStatus, Status};

pub mod fake_api;

/// Polls `cond` every 20 ms until it is true or `within` passes; panics with `what` on timeout.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP backend: on each connection it writes `<id>\n`, then echoes until the client's EOF,
/// then writes `bye` and closes (so a test can see half-close propagate).
pub async fn tcp_backend(id: &str, cancel: CancellationToken) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let id = id.to_string();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = tokio::select! {
                _ = cancel.cancelled() => break,
                r = l.accept() => match r { Ok(x) => x, Err(_) => continue },
            };
            let id = id.clone();
            tokio::spawn(async move {
                if s.write_all(format!("{id}\n").as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.write_all(b"bye").await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A UDP backend: replies to each datagram with `<id>|` followed by the datagram.
pub async fn udp_backend(id: &str, cancel: CancellationToken) -> SocketAddr {
    let prefix = format!("{id}|").into_bytes();
    udp_backend_replying(
        cancel,
        move |datagram, _| vec![[&prefix, datagram].concat()],
    )
    .await
}

/// A UDP backend on loopback that answers each datagram with what `reply` makes of it and of its
/// source address (any number of datagrams, in order), until `cancel`.
pub async fn udp_backend_replying(
    cancel: CancellationToken,
    reply: impl Fn(&[u8], SocketAddr) -> Vec<Vec<u8>> + Send + 'static,
) -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, from) = tokio::select! {
                _ = cancel.cancelled() => break,
                r = s.recv_from(&mut buf) => match r { Ok(x) => x, Err(_) => continue },
            };
            for r in reply(&buf[..n], from) {
                let _ = s.send_to(&r, from).await;
            }
        }
    });
    addr
}

/// A port on loopback that refuses connections (bound, then closed).
pub async fn refusing_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// The proxy-settings document used by tests: listeners only, on loopback, fast syncs.
pub fn header(extra: &str) -> String {
    format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: userspace\nbindAddress: 127.0.0.1\nportalMode: none\nhealthzBindAddress: \"\"\nmetricsBindAddress: \"\"\nhostnameOverride: test-node\niptables: {{syncPeriod: 30s, minSyncPeriod: 0s}}\nshutdownGracePeriod: 1s\n{extra}"
    )
}

/// A Service document (TCP ports given as `name:port`, UDP as `name:port/UDP`).
pub fn service(name: &str, extra_spec: &str, ports: &[&str]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|p| {
            let (pn, rest) = p.split_once(':').unwrap();
            let (num, proto) = rest.split_once('/').unwrap_or((rest, "TCP"));
            format!("  - {{name: {pn}, port: {num}, protocol: {proto}}}\n")
        })
        .collect();
    format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{extra_spec}  ports:\n{}", ports.join(""))
}

/// A config with one service, `web`, whose TCP port `http` (80) goes to `backends`.
pub fn web_http(backends: &[SocketAddr]) -> String {
    format!(
        "{}{}{}",
        header(""),
        service("web", "", &["http:80"]),
        slice("web", "http", "TCP", backends)
    )
}

/// EndpointSlice documents for `service`: one slice per backend (loopback backends differ in
/// port, and a slice has one port per name), merged by the proxy as a cluster's slices are.
pub fn slice(service: &str, port_name: &str, protocol: &str, addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-{port_name}-{i}, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: {port_name}, port: {}, protocol: {protocol}}}]\nendpoints:\n- addresses: [\"{}\"]\n",
                a.port(),
                a.ip()
            )
        })
        .collect()
}

/// A running proxy with its config file.
pub struct Proxy {
    pub running: app::Running,
    pub path: PathBuf,
    pub hup: mpsc::Sender<()>,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// Writes `text` as the config file and starts a proxy on it (portal mode none).
    pub async fn start(text: &str) -> Proxy {
        Self::start_with(text, Overrides::default()).await
    }

    /// Starts a proxy on `text` with command-line `overrides` (e.g. `--master`).
    pub async fn start_with(text: &str, overrides: Overrides) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.yaml");
        std::fs::write(&path, text).unwrap();
        let loaded = app::load(Some(path.clone()), overrides).expect("config loads");
        let (hup, rx) = mpsc::channel(1);
        let running = app::start(loaded, Backend::None, rx)
            .await
            .expect("proxy starts");
        Proxy {
            running,
            path,
            hup,
            _dir: dir,
        }
    }

    /// Replaces the config file atomically (write + rename, as ConfigMap updates do).
    pub fn rewrite(&self, text: &str) {
        write_atomic(&self.path, text);
    }

    pub fn status(&self) -> Arc<Status> {
        self.running.status.borrow().clone()
    }

    /// Waits until `default/<name>:<port>` is listening and returns its address.
    pub async fn wait_port(&self, name: &str, port: &str) -> SocketAddr {
        let mut found = None;
        eventually(
            Duration::from_secs(5),
            &format!("listener for default/{name}:{port}"),
            || {
                let st = self.status();
                found = st
                    .port("default", name, port)
                    .and_then(|p| p.listen.first().copied());
                async move { found.is_some() }
            },
        )
        .await;
        found.unwrap()
    }

    pub fn port_status(&self, name: &str, port: &str) -> Option<PortStatus> {
        self.status().port("default", name, port).cloned()
    }

    pub async fn stop(self) {
        self.running.stop().await;
    }
}

pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Connects through the proxy and returns the id line the backend sent.
pub async fn tcp_hello(addr: SocketAddr) -> Option<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte)).await {
            Ok(Ok(1)) if byte[0] == b'\n' => break,
            Ok(Ok(1)) => line.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8(line).unwrap())
}

/// Sends `payload` from `sock` to `to` and returns the reply (`<id>|<payload>`), split.
pub async fn udp_roundtrip(
    sock: &UdpSocket,
    to: SocketAddr,
    payload: &[u8],
) -> Option<(String, Vec<u8>)> {
    sock.send_to(payload, to).await.ok()?;
    let mut buf = vec![0u8; 65_536];
    let (n, _) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    let bar = buf[..n].iter().position(|b| *b == b'|')?;
    Some((
        String::from_utf8_lossy(&buf[..bar]).into_owned(),
        buf[bar + 1..n].to_vec(),
    ))
}
