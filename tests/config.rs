//! The shipped example configuration loads, and the binary refuses bad input before binding
//! anything, with exit code 64 and a message naming file, document and field.

use std::process::Command;

use userspace_proxy::app;
use userspace_proxy::config::Overrides;
use userspace_proxy::model::ServicePortName;

#[test]
fn example_config_parses_and_describes_its_services() {
    let loaded = app::load(Some("config.example.yaml".into()), Overrides::default())
        .expect("config.example.yaml is valid");
    let (state, skipped) = loaded.file.desired_state(&loaded.settings).unwrap();
    let web = &state.services[&ServicePortName::new("default", "web", "http")];
    assert!(loaded.settings.service_cidr.contains(&web.cluster_ip));
    let api = &state.services[&ServicePortName::new("shop", "api", "")];
    assert_eq!(api.node_port, Some(30443));
    assert_eq!(
        state
            .backends(&ServicePortName::new("default", "web", "http"), "n")
            .len(),
        2,
        "not-ready endpoint unused while two are ready"
    );
    assert_eq!(skipped.len(), 1, "the headless service is skipped");
    assert_eq!(
        app::EMBEDDED_CONFIG,
        std::fs::read_to_string("config.example.yaml").unwrap()
    );
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_userspace-proxy"))
}

#[test]
fn bad_config_exits_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nudpIdleTimeout: 0s\n",
    )
    .unwrap();
    let out = bin().arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml") && err.contains("document 1") && err.contains("udpIdleTimeout"),
        "{err}"
    );
}

#[test]
fn other_proxy_modes_are_refused() {
    let out = bin()
        .args([
            "--config",
            "config.example.yaml",
            "--proxy-mode",
            "iptables",
        ])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("userspace"), "{err}");
}

#[test]
fn missing_file_is_named() {
    let out = bin()
        .args(["--config", "/nonexistent/proxy.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/proxy.yaml"));
}
