//! The traffic rule of this project's own tools (the benchmark's load generator, the end-to-end
//! test clients): they send only to loopback, or to addresses inside network namespaces their
//! harness created. A namespace counts as such when it holds only `lo` and links named with
//! the harness prefix [`TEST_LINK_PREFIX`]; anywhere else a non-loopback target is refused.

use std::net::SocketAddr;

/// Prefix of every veth link the test and benchmark harnesses create.
pub const TEST_LINK_PREFIX: &str = "up";

/// Links of the current network namespace that are neither `lo` nor a harness link.
pub fn foreign_links() -> Vec<String> {
    foreign_links_in(std::path::Path::new("/sys/class/net"))
}

/// [`foreign_links`] over a sysfs-like directory of link names.
fn foreign_links_in(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|l| l != "lo" && !l.starts_with(TEST_LINK_PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

/// Allows `target` if it is loopback, or if this process runs in a harness namespace.
///
/// # Errors
/// The target is not loopback and the namespace has links the harness did not create.
pub fn check_target(target: &SocketAddr) -> Result<(), String> {
    check_target_with(target, foreign_links())
}

fn check_target_with(target: &SocketAddr, foreign: Vec<String>) -> Result<(), String> {
    if target.ip().is_loopback() {
        return Ok(());
    }
    if foreign.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "refusing to send to {target}: not inside a test namespace (links {foreign:?})"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_always_allowed() {
        assert!(check_target(&"127.0.0.1:80".parse().unwrap()).is_ok());
        assert!(check_target(&"[::1]:80".parse().unwrap()).is_ok());
    }

    fn links(names: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for n in names {
            std::fs::create_dir(dir.path().join(n)).unwrap();
        }
        dir
    }

    #[test]
    fn a_host_namespace_refuses_other_targets() {
        let host = links(&["lo", "eth0", "upx1a"]);
        assert_eq!(foreign_links_in(host.path()), vec!["eth0".to_string()]);
        let err = check_target_with(
            &"10.96.0.10:80".parse().unwrap(),
            foreign_links_in(host.path()),
        )
        .unwrap_err();
        assert!(
            err.contains("10.96.0.10:80") && err.contains("eth0"),
            "{err}"
        );
    }

    #[test]
    fn a_harness_namespace_allows_its_own_addresses() {
        let ns = links(&["lo", "up1a", "up1c"]);
        assert!(foreign_links_in(ns.path()).is_empty());
        assert!(check_target_with(
            &"10.96.0.10:80".parse().unwrap(),
            foreign_links_in(ns.path())
        )
        .is_ok());
    }
}
