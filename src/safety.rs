//! The traffic rule of this project's own tools (the benchmark's load generator, the end-to-end
//! test clients): they send only to loopback, or to addresses inside network namespaces their
//! harness created. A namespace counts as such when it holds only `lo` and links named with
//! the harness prefix [`TEST_LINK_PREFIX`]; anywhere else a non-loopback target is refused.

use std::net::SocketAddr;

/// Prefix of every veth link the test and benchmark harnesses create.
pub const TEST_LINK_PREFIX: &str = "up";

/// Links of the current network namespace that are neither `lo` nor a harness link.
pub fn foreign_links() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
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
    if target.ip().is_loopback() {
        return Ok(());
    }
    let foreign = foreign_links();
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

    #[test]
    fn other_targets_need_a_harness_namespace() {
        let r = check_target(&"10.96.0.10:80".parse().unwrap());
        assert_eq!(r.is_ok(), foreign_links().is_empty(), "{r:?}");
    }
}
