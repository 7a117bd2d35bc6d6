//! A fake Kubernetes API server that speaks the real HTTP list/watch protocol, enough for
//! kube-rs watchers: JSON lists carrying a `resourceVersion`, chunked watch streams of
//! ADDED/MODIFIED/DELETED/BOOKMARK events resumed from a resource version, 410 Gone (as an
//! ERROR event, as the real server sends it) for versions older than the last compaction, label
//! selectors, discovery of `discovery.k8s.io/v1`, and `GET` of a Node.
//!
//! It can be stopped (every connection cut, the port closed) and started again on the same
//! port, to test that losing the API server disturbs nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// A resource the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Endpoints,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Endpoints => "Endpoints",
        }
    }
    fn from_path(path: &str) -> Option<Kind> {
        match path {
            "/api/v1/services" => Some(Kind::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlice),
            "/api/v1/endpoints" => Some(Kind::Endpoints),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    kind_of_event: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct Data {
    rv: u64,
    /// Events older than this are compacted: watching from before it gets 410.
    compacted: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    log: Vec<Change>,
    slices_served: bool,
    nodes: Vec<String>,
    /// Requests seen, by path (without query), for assertions about what the client asked.
    requests: Vec<String>,
    /// Kinds whose list requests are held (not answered) until released.
    held: Vec<Kind>,
}

/// The fake server. Clone to share.
#[derive(Clone)]
pub struct FakeApi {
    data: Arc<Mutex<Data>>,
    events: broadcast::Sender<Change>,
    addr: SocketAddr,
    epoch: Arc<Mutex<CancellationToken>>,
}

fn labels_match(selector: &str, labels: &Value) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            let get = |k: &str| labels.get(k).and_then(Value::as_str).map(str::to_string);
            if let Some(k) = term.strip_prefix('!') {
                get(k).is_none()
            } else if let Some((k, v)) = term.split_once("!=") {
                get(k).as_deref() != Some(v)
            } else if let Some((k, v)) = term.split_once('=') {
                get(k.trim_end_matches('=')).as_deref() == Some(v)
            } else {
                get(term).is_some()
            }
        })
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

fn query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), decode(v))
        })
        .collect()
}

async fn respond(s: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

async fn chunk(s: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    let mut text = line.to_string();
    text.push('\n');
    s.write_all(format!("{:x}\r\n{text}\r\n", text.len()).as_bytes())
        .await?;
    s.flush().await
}

impl FakeApi {
    /// Starts on 127.0.0.1 with a free port. `slices_served: false` plays a cluster older than
    /// 1.21, which has no `discovery.k8s.io/v1`.
    pub async fn start(slices_served: bool) -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events, _) = broadcast::channel(4096);
        let api = FakeApi {
            data: Arc::new(Mutex::new(Data {
                slices_served,
                ..Default::default()
            })),
            events,
            addr,
            epoch: Arc::new(Mutex::new(CancellationToken::new())),
        };
        api.serve(listener);
        api
    }

    /// `http://127.0.0.1:PORT`, for `--master`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a Node object with this name.
    pub fn add_node(&self, name: &str) {
        self.data.lock().unwrap().nodes.push(name.to_string());
    }

    /// Holds list requests of `kind` unanswered until [`FakeApi::release`].
    pub fn hold(&self, kind: Kind) {
        self.data.lock().unwrap().held.push(kind);
    }

    /// Answers held list requests of `kind`.
    pub fn release(&self, kind: Kind) {
        self.data.lock().unwrap().held.retain(|k| *k != kind);
    }

    /// Paths requested so far (without query strings; watches as `WATCH <path>`).
    pub fn requests(&self) -> Vec<String> {
        self.data.lock().unwrap().requests.clone()
    }

    /// Cuts every connection and closes the port: the API server is gone.
    pub fn stop(&self) {
        self.epoch.lock().unwrap().cancel();
    }

    /// Serves again on the same port.
    pub async fn restart(&self) {
        *self.epoch.lock().unwrap() = CancellationToken::new();
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    /// Forgets history: a watch resumed from any version seen so far gets 410 Gone and must
    /// list again (what etcd compaction does to a client that was away too long).
    pub fn compact(&self) {
        let mut d = self.data.lock().unwrap();
        d.compacted = d.rv + 1;
        d.log.clear();
    }

    /// Creates or replaces an object (its `metadata.resourceVersion` is set here).
    pub fn apply(&self, kind: Kind, mut object: Value) {
        let mut d = self.data.lock().unwrap();
        d.rv += 1;
        let rv = d.rv;
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.name());
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["metadata"]["namespace"].is_null() {
            object["metadata"]["namespace"] = json!("default");
        }
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap()
            .to_string();
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let existed = d.objects.insert((kind, ns, name), object.clone()).is_some();
        let change = Change {
            rv,
            kind,
            kind_of_event: if existed { "MODIFIED" } else { "ADDED" },
            object,
        };
        d.log.push(change.clone());
        let _ = self.events.send(change);
    }

    /// Deletes an object.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut d = self.data.lock().unwrap();
        let Some(mut object) = d
            .objects
            .remove(&(kind, namespace.to_string(), name.to_string()))
        else {
            return;
        };
        d.rv += 1;
        let rv = d.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let change = Change {
            rv,
            kind,
            kind_of_event: "DELETED",
            object,
        };
        d.log.push(change.clone());
        let _ = self.events.send(change);
    }

    fn serve(&self, listener: TcpListener) {
        let epoch = self.epoch.lock().unwrap().clone();
        let api = self.clone();
        tokio::spawn(async move {
            loop {
                let (conn, _) = tokio::select! {
                    _ = epoch.cancelled() => break,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                let api = api.clone();
                let epoch = epoch.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = epoch.cancelled() => {}
                        _ = api.connection(conn) => {}
                    }
                });
            }
        });
    }

    async fn connection(&self, mut conn: TcpStream) -> std::io::Result<()> {
        let mut buf = Vec::new();
        loop {
            // Read one request head (GET only: no bodies).
            let end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut tmp = [0u8; 4096];
                let n = conn.read(&mut tmp).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&tmp[..n]);
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end);
            let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            let (path, q) = target.split_once('?').unwrap_or((&target, ""));
            let q = query(q);
            let watching = q.get("watch").map(String::as_str) == Some("true");
            self.data.lock().unwrap().requests.push(if watching {
                format!("WATCH {path}")
            } else {
                path.to_string()
            });
            if path == "/apis/discovery.k8s.io/v1" {
                if self.data.lock().unwrap().slices_served {
                    let body = json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "discovery.k8s.io/v1",
                        "resources": [{"name": "endpointslices", "singularName": "endpointslice", "namespaced": true,
                                       "kind": "EndpointSlice", "verbs": ["list", "watch", "get"]}]});
                    respond(&mut conn, 200, &body).await?;
                } else {
                    respond(
                        &mut conn,
                        404,
                        &status(
                            404,
                            "NotFound",
                            "the server could not find the requested resource",
                        ),
                    )
                    .await?;
                }
                continue;
            }
            if let Some(node) = path.strip_prefix("/api/v1/nodes/") {
                if self.data.lock().unwrap().nodes.iter().any(|n| n == node) {
                    let body = json!({"kind": "Node", "apiVersion": "v1", "metadata": {"name": node},
                        "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}});
                    respond(&mut conn, 200, &body).await?;
                } else {
                    respond(
                        &mut conn,
                        404,
                        &status(404, "NotFound", &format!("nodes \"{node}\" not found")),
                    )
                    .await?;
                }
                continue;
            }
            let Some(kind) = Kind::from_path(path) else {
                respond(&mut conn, 404, &status(404, "NotFound", "no such path")).await?;
                continue;
            };
            if kind == Kind::EndpointSlice && !self.data.lock().unwrap().slices_served {
                respond(&mut conn, 404, &status(404, "NotFound", "no such path")).await?;
                continue;
            }
            let selector = q.get("labelSelector").cloned().unwrap_or_default();
            if watching {
                let from: u64 = q
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
                return self.watch(conn, kind, &selector, from, bookmarks).await;
            }
            // A held list is answered once released (bounded: a test releases within seconds).
            for _ in 0..1500 {
                if !self.data.lock().unwrap().held.contains(&kind) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let (items, rv) = {
                let d = self.data.lock().unwrap();
                let items: Vec<Value> = d
                    .objects
                    .iter()
                    .filter(|((k, _, _), o)| {
                        *k == kind && labels_match(&selector, &o["metadata"]["labels"])
                    })
                    .map(|(_, o)| o.clone())
                    .collect();
                (items, d.rv)
            };
            let body = json!({"kind": format!("{}List", kind.name()), "apiVersion": kind.api_version(),
                              "metadata": {"resourceVersion": rv.to_string()}, "items": items});
            respond(&mut conn, 200, &body).await?;
        }
    }

    async fn watch(
        &self,
        mut conn: TcpStream,
        kind: Kind,
        selector: &str,
        from: u64,
        bookmarks: bool,
    ) -> std::io::Result<()> {
        let mut live = self.events.subscribe();
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await?;
        let (backlog, gone, mut last) = {
            let d = self.data.lock().unwrap();
            if from < d.compacted {
                (Vec::new(), true, d.rv)
            } else {
                let backlog: Vec<Change> = d
                    .log
                    .iter()
                    .filter(|c| c.rv > from && c.kind == kind)
                    .cloned()
                    .collect();
                (backlog, false, from)
            }
        };
        if gone {
            chunk(&mut conn, &json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {from} ({last})"))})).await?;
            conn.write_all(b"0\r\n\r\n").await?;
            return Ok(());
        }
        let send = |c: &Change| {
            let visible = labels_match(selector, &c.object["metadata"]["labels"]);
            visible.then(|| json!({"type": c.kind_of_event, "object": c.object}))
        };
        for c in &backlog {
            if let Some(ev) = send(c) {
                chunk(&mut conn, &ev).await?;
            }
            last = c.rv;
        }
        if bookmarks {
            let rv = self.data.lock().unwrap().rv.max(last);
            chunk(&mut conn, &json!({"type": "BOOKMARK", "object": {"kind": kind.name(), "apiVersion": kind.api_version(),
                                      "metadata": {"resourceVersion": rv.to_string()}}}))
                .await?;
        }
        loop {
            let c = match tokio::time::timeout(Duration::from_secs(60), live.recv()).await {
                Ok(Ok(c)) => c,
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                Ok(Err(_)) | Err(_) => break,
            };
            if c.kind != kind || c.rv <= last {
                continue;
            }
            last = c.rv;
            if let Some(ev) = send(&c) {
                chunk(&mut conn, &ev).await?;
            }
        }
        conn.write_all(b"0\r\n\r\n").await
    }
}

/// A Service object with the given TCP ports (`name:port`) and extra `spec` fields.
pub fn service(name: &str, cluster_ip: &str, ports: &[(&str, u16)], spec: Value) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    let mut s = json!({"metadata": {"name": name, "namespace": "default"},
                       "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "type": "ClusterIP", "ports": ports}});
    if let Value::Object(extra) = spec {
        for (k, v) in extra {
            s["spec"][k] = v;
        }
    }
    s
}

/// An EndpointSlice of `service` for port `port_name` (each backend: address, port, ready,
/// terminating, node).
pub fn slice(
    name: &str,
    service: &str,
    port_name: &str,
    port: u16,
    endpoints: &[(&str, bool, bool, &str)],
) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(ip, ready, terminating, node)| {
            json!({"addresses": [ip], "nodeName": node,
                   "conditions": {"ready": ready, "serving": *ready || *terminating, "terminating": terminating}})
        })
        .collect();
    json!({"metadata": {"name": name, "namespace": "default",
                        "labels": {"kubernetes.io/service-name": service,
                                   "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
           "addressType": "IPv4", "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
           "endpoints": eps})
}
