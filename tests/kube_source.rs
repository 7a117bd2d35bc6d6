//! The Kubernetes API source against a fake API server that speaks the real list/watch
//! protocol (tests/common/fake_api.rs). Traffic goes through the proxy's real listeners over
//! loopback (portal mode none: clients dial the proxy port).

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::fake_api::{self, FakeApi, Kind};
use common::{eventually, header, tcp_backend, tcp_hello, Proxy};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use userspace_proxy::config::Overrides;

const WAIT: Duration = Duration::from_secs(10);

async fn start_proxy(api: &FakeApi, extra: &str) -> Proxy {
    Proxy::start_with(
        &header(extra),
        Overrides {
            master: Some(api.url()),
            ..Default::default()
        },
    )
    .await
}

/// The backend ids `n` fresh connections to `addr` reach.
async fn ids(addr: SocketAddr, n: usize) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        if let Some(id) = tcp_hello(addr).await {
            seen.insert(id);
        }
    }
    seen
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// `default/web`, one TCP port `http` on 10.96.0.10:80.
fn web_service(api: &FakeApi) {
    api.apply(
        Kind::Service,
        fake_api::service("web", "10.96.0.10", &[("http", 80)], json!({})),
    );
}

/// A `v1 Endpoints` object for `default/web` (port `http`) with one loopback backend on this node.
fn web_endpoints(api: &FakeApi, backend: SocketAddr) {
    api.apply(
        Kind::Endpoints,
        json!({"metadata": {"name": "web", "namespace": "default"},
               "subsets": [{"addresses": [{"ip": backend.ip().to_string(), "nodeName": "test-node"}],
                            "ports": [{"name": "http", "port": backend.port(), "protocol": "TCP"}]}]}),
    );
}

/// A slice `name` of `service` (port `http`) with one loopback backend and its conditions.
fn one_slice(
    api: &FakeApi,
    name: &str,
    service: &str,
    backend: SocketAddr,
    ready: bool,
    terminating: bool,
    node: &str,
) {
    api.apply(
        Kind::EndpointSlice,
        fake_api::slice(
            name,
            service,
            "http",
            backend.port(),
            &[(&backend.ip().to_string(), ready, terminating, node)],
        ),
    );
}

/// A slice per backend (loopback backends differ in port; a slice has one port per name).
fn slices_for(api: &FakeApi, service: &str, port_name: &str, backends: &[(SocketAddr, &str)]) {
    for (i, (addr, node)) in backends.iter().enumerate() {
        api.apply(
            Kind::EndpointSlice,
            fake_api::slice(
                &format!("{service}-{i}"),
                service,
                port_name,
                addr.port(),
                &[(&addr.ip().to_string(), true, false, node)],
            ),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_gate_then_services_added_changed_removed() {
    let cancel = CancellationToken::new();
    let a = tcp_backend("a", cancel.clone()).await;
    let b = tcp_backend("b", cancel.clone()).await;
    let c = tcp_backend("c", cancel.clone()).await;
    let api = FakeApi::start(true).await;
    api.add_node("test-node");
    web_service(&api);
    slices_for(&api, "web", "http", &[(a, "test-node"), (b, "test-node")]);
    // Neither the headless-labelled nor another proxy's service is ours.
    let mut other = fake_api::service("other", "10.96.0.11", &[("http", 80)], json!({}));
    other["metadata"]["labels"] =
        json!({"service.kubernetes.io/service-proxy-name": "someone-else"});
    api.apply(Kind::Service, other);
    let mut headless = fake_api::service("h", "None", &[("http", 80)], json!({}));
    headless["metadata"]["labels"] = json!({"service.kubernetes.io/headless": ""});
    api.apply(Kind::Service, headless);

    // The gate: services are listed, slices are not yet, so nothing is programmed.
    api.hold(Kind::EndpointSlice);
    let proxy = start_proxy(&api, "").await;
    eventually(WAIT, "the services list was served", || {
        let seen = api.requests().iter().any(|p| p == "/api/v1/services");
        async move { seen }
    })
    .await;
    eventually(WAIT, "the slices list was asked for", || {
        let seen = api
            .requests()
            .iter()
            .any(|p| p == "/apis/discovery.k8s.io/v1/endpointslices");
        async move { seen }
    })
    .await;
    assert_eq!(proxy.running.source.published(), 0);
    assert!(
        proxy.status().ports.is_empty(),
        "no ports before both lists"
    );
    api.release(Kind::EndpointSlice);

    let web = proxy.wait_port("web", "http").await;
    assert_eq!(ids(web, 6).await, set(&["a", "b"]));
    let st = proxy.status();
    assert_eq!(
        st.ports.len(),
        1,
        "only web: {:?}",
        st.ports.keys().collect::<Vec<_>>()
    );

    // Added: a second service.
    api.apply(
        Kind::Service,
        fake_api::service("api", "10.96.0.12", &[("grpc", 9000)], json!({})),
    );
    slices_for(&api, "api", "grpc", &[(c, "test-node")]);
    let api_port = proxy.wait_port("api", "grpc").await;
    // Its slice may arrive in a later snapshot than the service itself.
    eventually(WAIT, "api served by c", || async move {
        ids(api_port, 2).await == set(&["c"])
    })
    .await;

    // Changed: web's endpoints move to c only (slice 0 now names c, slice 1 is deleted).
    one_slice(&api, "web-0", "web", c, true, false, "test-node");
    api.delete(Kind::EndpointSlice, "default", "web-1");
    eventually(WAIT, "web served by c only", || async move {
        ids(web, 4).await == set(&["c"])
    })
    .await;
    // The listener was kept through the endpoint change.
    assert_eq!(proxy.wait_port("web", "http").await, web);

    // Removed.
    api.delete(Kind::Service, "default", "api");
    eventually(WAIT, "api's listener closed", || {
        let gone = proxy.port_status("api", "grpc").is_none();
        async move { gone }
    })
    .await;
    eventually(
        WAIT,
        "api's proxy port refuses connections",
        || async move { TcpStream::connect(api_port).await.is_err() },
    )
    .await;
    assert_eq!(proxy.running.source.rejected(), 0);
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_fallback_and_internal_traffic_policy() {
    let cancel = CancellationToken::new();
    let a = tcp_backend("a", cancel.clone()).await;
    let b = tcp_backend("b", cancel.clone()).await;
    let api = FakeApi::start(true).await;
    web_service(&api);
    // a is terminating but still serving; b is ready: only b gets traffic.
    one_slice(&api, "web-0", "web", a, false, true, "test-node");
    one_slice(&api, "web-1", "web", b, true, false, "test-node");
    let proxy = start_proxy(&api, "").await;
    let web = proxy.wait_port("web", "http").await;
    assert_eq!(ids(web, 4).await, set(&["b"]));
    // b goes away: a, terminating but serving, takes the traffic rather than dropping it.
    api.delete(Kind::EndpointSlice, "default", "web-1");
    eventually(
        WAIT,
        "terminating a serves when nothing is ready",
        || async move { ids(web, 3).await == set(&["a"]) },
    )
    .await;

    // internalTrafficPolicy: Local: only this node's endpoints (a on test-node, b elsewhere).
    api.apply(
        Kind::Service,
        fake_api::service(
            "local",
            "10.96.0.20",
            &[("http", 80)],
            json!({"internalTrafficPolicy": "Local"}),
        ),
    );
    one_slice(&api, "local-0", "local", a, true, false, "test-node");
    one_slice(&api, "local-1", "local", b, true, false, "other-node");
    let local = proxy.wait_port("local", "http").await;
    eventually(WAIT, "local service has its endpoints", || {
        let n = proxy
            .port_status("local", "http")
            .map_or(0, |p| p.endpoints.len());
        async move { n == 1 }
    })
    .await;
    assert_eq!(ids(local, 6).await, set(&["a"]));
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_node_port_reports_local_endpoints() {
    let cancel = CancellationToken::new();
    let a = tcp_backend("a", cancel.clone()).await;
    let hc = common::refusing_addr().await.port();
    let api = FakeApi::start(true).await;
    let lb = json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                    "healthCheckNodePort": hc});
    api.apply(
        Kind::Service,
        fake_api::service("lb", "10.96.0.50", &[("http", 80)], lb),
    );
    one_slice(&api, "lb-0", "lb", a, true, false, "test-node");
    let proxy = start_proxy(&api, "").await;
    let at: SocketAddr = format!("127.0.0.1:{hc}").parse().unwrap();
    let get = move || async move {
        tokio::task::spawn_blocking(move || userspace_proxy::admin::fetch(at, "/"))
            .await
            .unwrap()
            .ok()
    };
    eventually(WAIT, "health-check node port answers 200", || async move {
        get().await.is_some_and(|(code, _)| code == 200)
    })
    .await;
    let (_, body) = get().await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["localEndpoints"], 1, "{body}");
    assert_eq!(v["service"]["name"], "lb");
    // The only endpoint moves to another node: this node must be taken out of the LB.
    one_slice(&api, "lb-0", "lb", a, true, false, "other-node");
    eventually(WAIT, "health-check node port answers 503", || async move {
        get().await.is_some_and(|(code, _)| code == 503)
    })
    .await;
    // The service goes: so does its health-check port.
    api.delete(Kind::Service, "default", "lb");
    eventually(WAIT, "health-check node port closed", || async move {
        get().await.is_none()
    })
    .await;
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeconfig_from_the_configuration_file_selects_the_api_server() {
    let cancel = CancellationToken::new();
    let a = tcp_backend("a", cancel.clone()).await;
    let api = FakeApi::start(true).await;
    web_service(&api);
    slices_for(&api, "web", "http", &[(a, "test-node")]);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\ncurrent-context: c\n",
            api.url()
        ),
    )
    .unwrap();
    let proxy = Proxy::start_with(
        &header(&format!(
            "clientConnection: {{kubeconfig: \"{}\"}}\n",
            kubeconfig.display()
        )),
        Overrides::default(),
    )
    .await;
    let web = proxy.wait_port("web", "http").await;
    assert_eq!(ids(web, 2).await, set(&["a"]));
    proxy.stop().await;

    // A kubeconfig that does not exist stops the start, naming the file.
    let missing = dir.path().join("nope");
    let loaded = userspace_proxy::app::load(
        None,
        Overrides {
            kubeconfig: Some(missing.display().to_string()),
            ..Default::default()
        },
    )
    .unwrap();
    let (_hup, rx) = tokio::sync::mpsc::channel(1);
    let err =
        userspace_proxy::app::start(loaded, userspace_proxy::proxier::rules::Backend::None, rx)
            .await
            .unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains(&missing.display().to_string()), "{chain}");
    cancel.cancel();
}

/// Writes `ping`, expects the echo: the connection is alive end to end.
async fn echo(conn: &mut TcpStream, what: &str) {
    conn.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("echo timed out {what}"))
        .unwrap_or_else(|e| panic!("connection broke {what}: {e}"));
    assert_eq!(&buf, b"ping", "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_lost_and_restored_disturbs_nothing() {
    let cancel = CancellationToken::new();
    let a = tcp_backend("a", cancel.clone()).await;
    let b = tcp_backend("b", cancel.clone()).await;
    let api = FakeApi::start(true).await;
    web_service(&api);
    slices_for(&api, "web", "http", &[(a, "test-node")]);
    let proxy = start_proxy(&api, "").await;
    let web = proxy.wait_port("web", "http").await;
    let mut live = TcpStream::connect(web).await.unwrap();
    let mut id = [0u8; 2];
    live.read_exact(&mut id).await.unwrap();
    assert_eq!(&id, b"a\n");
    echo(&mut live, "before the API server went away").await;
    let before = proxy.status();
    let published = proxy.running.source.published();

    api.stop();
    // While the API server is gone: the live connection and new ones are served.
    echo(&mut live, "while the API server is gone").await;
    assert_eq!(ids(web, 3).await, set(&["a"]));

    // It comes back with its history compacted: the client must relist (410 Gone).
    api.compact();
    api.restart().await;
    let lists_before = api.requests().len();
    eventually(WAIT, "both watches relisted after 410 Gone", || {
        let reqs = api.requests();
        let relisted = |p: &str| {
            let after = &reqs[lists_before..];
            after.iter().any(|r| *r == format!("WATCH {p}")) && after.iter().any(|r| r == p)
        };
        let ok =
            relisted("/api/v1/services") && relisted("/apis/discovery.k8s.io/v1/endpointslices");
        async move { ok }
    })
    .await;
    // The relist found what was known: nothing published, no listener or endpoint change.
    let after = proxy.status();
    assert_eq!(proxy.running.source.published(), published);
    assert_eq!(after.service_changes, before.service_changes);
    assert_eq!(after.endpoint_changes, before.endpoint_changes);
    assert_eq!(proxy.wait_port("web", "http").await, web);
    echo(&mut live, "after the relist").await;

    // And changes flow again.
    slices_for(&api, "web", "http", &[(a, "test-node"), (b, "test-node")]);
    eventually(
        WAIT,
        "b added after the API server came back",
        || async move { ids(web, 6).await == set(&["a", "b"]) },
    )
    .await;
    echo(&mut live, "at the end").await;
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_fallback_on_a_cluster_without_endpoint_slices() {
    let cancel = CancellationToken::new();
    let a = tcp_backend("a", cancel.clone()).await;
    let api = FakeApi::start(false).await;
    web_service(&api);
    web_endpoints(&api, a);
    let proxy = start_proxy(&api, "").await;
    let web = proxy.wait_port("web", "http").await;
    assert_eq!(ids(web, 3).await, set(&["a"]));
    let reqs = api.requests();
    assert!(reqs.iter().any(|p| p == "/api/v1/endpoints"));
    assert!(!reqs
        .iter()
        .any(|p| p == "/apis/discovery.k8s.io/v1/endpointslices"));
    // Endpoints changes flow too.
    api.delete(Kind::Endpoints, "default", "web");
    eventually(WAIT, "no endpoints left", || {
        let n = proxy
            .port_status("web", "http")
            .map_or(1, |p| p.endpoints.len());
        async move { n == 0 }
    })
    .await;
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_changes_are_not_held_back_by_min_sync_period() {
    let cancel = CancellationToken::new();
    let a = tcp_backend("a", cancel.clone()).await;
    let b = tcp_backend("b", cancel.clone()).await;
    let api = FakeApi::start(true).await;
    web_service(&api);
    one_slice(&api, "web-0", "web", a, true, false, "test-node");
    // minSyncPeriod 20 s: after the burst of 2, a paced sync would wait that long.
    let text = header("").replace("minSyncPeriod: 0s", "minSyncPeriod: 20s");
    let proxy = Proxy::start_with(
        &text,
        Overrides {
            master: Some(api.url()),
            ..Default::default()
        },
    )
    .await;
    let web = proxy.wait_port("web", "http").await;
    for (round, (backend, id)) in [(b, "b"), (a, "a"), (b, "b"), (a, "a")]
        .into_iter()
        .enumerate()
    {
        one_slice(&api, "web-0", "web", backend, true, false, "test-node");
        eventually(
            Duration::from_secs(5),
            &format!("endpoint change {round} applied at once"),
            || async move { ids(web, 2).await == set(&[id]) },
        )
        .await;
    }
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_source_can_be_forced() {
    let cancel = CancellationToken::new();
    let a = tcp_backend("a", cancel.clone()).await;
    let api = FakeApi::start(true).await;
    web_service(&api);
    web_endpoints(&api, a);
    let proxy = start_proxy(&api, "endpointSource: Endpoints\n").await;
    let web = proxy.wait_port("web", "http").await;
    eventually(WAIT, "web served from v1 Endpoints", || async move {
        ids(web, 2).await == set(&["a"])
    })
    .await;
    let reqs = api.requests();
    assert!(
        !reqs.iter().any(|p| p.contains("discovery.k8s.io")),
        "forced: no discovery and no slice watch: {reqs:?}"
    );
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_own_service_proxy_name_serves_only_labelled_services() {
    let cancel = CancellationToken::new();
    let a = tcp_backend("a", cancel.clone()).await;
    let api = FakeApi::start(true).await;
    let mut ours = fake_api::service("ours", "10.96.0.10", &[("http", 80)], json!({}));
    ours["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "edge"});
    api.apply(Kind::Service, ours);
    api.apply(
        Kind::Service,
        fake_api::service("plain", "10.96.0.11", &[("http", 80)], json!({})),
    );
    // The EndpointSlice controller copies the service's labels onto its slices.
    let mut s = fake_api::slice(
        "ours-0",
        "ours",
        "http",
        a.port(),
        &[("127.0.0.1", true, false, "n")],
    );
    s["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = json!("edge");
    api.apply(Kind::EndpointSlice, s);
    let proxy = start_proxy(&api, "serviceProxyName: edge\n").await;
    let port = proxy.wait_port("ours", "http").await;
    assert_eq!(ids(port, 2).await, set(&["a"]));
    assert!(proxy.port_status("plain", "http").is_none());
    assert_eq!(proxy.status().ports.len(), 1);
    proxy.stop().await;
    cancel.cancel();
}
