//! The manifests under deploy/ parse into k8s-openapi types with no field lost (a misspelt field
//! would be silently dropped by `kubectl apply`), and agree with each other and with the program:
//! the ConfigMap is a valid configuration that selects the Kubernetes source in a pod, the
//! probes hit the health server it configures, and RBAC grants exactly what the source reads.

use std::collections::BTreeSet;
use std::path::Path;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use userspace_proxy::app::{self, SourceKind};
use userspace_proxy::config::file::ConfigFile;

#[derive(Default)]
struct Manifests {
    daemonsets: Vec<DaemonSet>,
    config_maps: Vec<ConfigMap>,
    accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
}

/// Drops nulls and empty maps, which serialisation and YAML spell differently.
fn normalise(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| (k, normalise(v)))
                .filter(|(_, v)| !v.is_null() && *v != Value::Object(Default::default()))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(normalise).collect()),
        other => other,
    }
}

/// Parses `doc` as `T` and checks that serialising it back gives the same document: a field
/// k8s-openapi does not know (a typo, a wrong nesting) would be lost on the way.
fn strict<T: DeserializeOwned + Serialize>(file: &str, doc: &Value) -> T {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: {} does not parse: {e}", doc["kind"]));
    let back = normalise(serde_json::to_value(&typed).unwrap());
    if let Some(path) = first_difference(&normalise(doc.clone()), &back, String::new()) {
        panic!(
            "{file}: {} {}: field {path} is not a field of the type (misspelt or misplaced?)",
            doc["kind"], doc["metadata"]["name"]
        );
    }
    typed
}

/// The path of the first field of `want` that `got` lacks or spells differently.
fn first_difference(want: &Value, got: &Value, path: String) -> Option<String> {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => w.iter().find_map(|(k, v)| match g.get(k) {
            None => Some(format!("{path}.{k}")),
            Some(gv) => first_difference(v, gv, format!("{path}.{k}")),
        }),
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => w
            .iter()
            .zip(g)
            .enumerate()
            .find_map(|(i, (a, b))| first_difference(a, b, format!("{path}[{i}]"))),
        _ if want == got => None,
        _ => Some(path),
    }
}

fn load() -> Manifests {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut m = Manifests::default();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        files += 1;
        let name = path.display().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let yaml = serde_yaml::Value::deserialize(doc).unwrap();
            if yaml.is_null() {
                continue;
            }
            let doc: Value = serde_json::to_value(yaml).unwrap();
            match doc["kind"].as_str().unwrap_or_default() {
                "DaemonSet" => m.daemonsets.push(strict(&name, &doc)),
                "ConfigMap" => m.config_maps.push(strict(&name, &doc)),
                "ServiceAccount" => m.accounts.push(strict(&name, &doc)),
                "ClusterRole" => m.roles.push(strict(&name, &doc)),
                "ClusterRoleBinding" => m.bindings.push(strict(&name, &doc)),
                other => panic!("{name}: unexpected kind {other:?}"),
            }
        }
    }
    assert!(files >= 2, "deploy/ has its manifests");
    m
}

use serde::Deserialize;

#[test]
fn manifests_parse_and_agree_with_the_program() {
    let m = load();
    assert_eq!(m.daemonsets.len(), 1);
    let ds = &m.daemonsets[0];
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true), "the proxy programs the node");
    let sa = pod.service_account_name.as_deref().unwrap();
    assert!(m
        .accounts
        .iter()
        .any(|a| a.metadata.name.as_deref() == Some(sa)));
    let c = &pod.containers[0];
    let caps = c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .unwrap();
    assert!(caps
        .add
        .as_ref()
        .unwrap()
        .contains(&"NET_ADMIN".to_string()));
    let rollout = ds
        .spec
        .as_ref()
        .unwrap()
        .update_strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .as_ref()
        .unwrap();
    assert_eq!(
        rollout.max_surge,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1)),
        "the new pod overlaps the old one, so a rollout refuses no connection"
    );

    // The ConfigMap is a configuration the program accepts, and in a pod it selects the API.
    let cm_name = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find_map(|v| v.config_map.as_ref())
        .map(|c| c.name.clone())
        .unwrap();
    let cm = m
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(cm_name.as_str()))
        .expect("the DaemonSet's ConfigMap is in deploy/");
    let text = &cm.data.as_ref().unwrap()["config.yaml"];
    let file = ConfigFile::parse("deploy/daemonset.yaml:config.yaml", text).unwrap();
    let settings = file.settings().unwrap();
    assert_eq!(
        app::source_kind(&settings, &file, true),
        SourceKind::Kubernetes
    );
    let args = c.command.as_ref().unwrap().join(" ");
    assert!(
        args.contains("--config=/etc/userspace-proxy/config.yaml")
            && args.contains("--hostname-override=$(NODE_NAME)"),
        "{args}"
    );
    let mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "config")
        .unwrap();
    assert_eq!(mount.mount_path, "/etc/userspace-proxy");

    // The liveness probe asks the health server the configuration starts.
    let healthz = settings.healthz_bind_address.unwrap();
    let probe = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz"));
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(healthz.port() as i32)
    );

    // RBAC: read-only, exactly what the source reads, bound to the DaemonSet's account.
    assert_eq!(m.roles.len(), 1);
    let mut granted = BTreeSet::new();
    for rule in m.roles[0].rules.as_ref().unwrap() {
        for group in rule.api_groups.as_ref().unwrap() {
            for res in rule.resources.as_ref().unwrap() {
                for verb in &rule.verbs {
                    granted.insert(format!("{group}/{res}:{verb}"));
                }
            }
        }
    }
    let wanted: BTreeSet<String> = [
        "/services:list",
        "/services:watch",
        "/endpoints:list",
        "/endpoints:watch",
        "discovery.k8s.io/endpointslices:list",
        "discovery.k8s.io/endpointslices:watch",
        "/nodes:get",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(granted, wanted);
    let b = &m.bindings[0];
    assert_eq!(b.role_ref.name, m.roles[0].metadata.name.clone().unwrap());
    assert!(b
        .subjects
        .as_ref()
        .unwrap()
        .iter()
        .any(|s| s.kind == "ServiceAccount" && s.name == sa));
}

#[test]
fn dockerfile_builds_the_binary_and_ships_iptables() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    let msrv = env!("CARGO_PKG_RUST_VERSION");
    assert!(
        text.contains(&format!("FROM rust:{msrv}-")),
        "the build image matches rust-version {msrv}"
    );
    assert!(text.contains("cargo build --release --locked --bin userspace-proxy"));
    let install = text
        .lines()
        .find(|l| l.contains("apt-get install"))
        .unwrap();
    for pkg in ["iptables", "conntrack", "iproute2"] {
        assert!(install.contains(pkg), "runtime image lacks {pkg}");
    }
    let ds = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/daemonset.yaml"),
    )
    .unwrap();
    assert!(
        text.contains("/usr/local/bin/userspace-proxy")
            && ds.contains("/usr/local/bin/userspace-proxy"),
        "the DaemonSet runs the path the image installs"
    );
}
