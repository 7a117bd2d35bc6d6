//! Portals: how traffic to service addresses reaches the listeners.
//!
//! Four backends, chosen by `portalMode`:
//! - [`iptables`]: kube-proxy's userspace chains and rule shapes, written in one atomic
//!   `iptables-restore --noflush` per sync that changes anything (the original ran one exec per
//!   rule: minutes for a thousand services);
//! - [`nftables`]: a table of our own whose maps hold the portals: one hash lookup per packet,
//!   one element per service change;
//! - [`bind`]: no netfilter at all; service IPs are added to a local interface and listeners bind
//!   them directly;
//! - none: listeners only.
//!
//! The proxier calls `sync` with the full set of portals after binding new listeners and before
//! closing old ones, so a rule never points at a closed port.

pub mod bind;
pub mod conntrack;
pub mod iptables;
pub mod nftables;

use std::net::IpAddr;

use crate::model::ServicePort;

/// Failure to program portals.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A helper program could not be run.
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A helper program failed.
    #[error("{program} failed (exit {code:?}): {stderr}")]
    Command {
        /// The program and its main arguments.
        program: String,
        /// Exit code.
        code: Option<i32>,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// Result of portal operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A service port and the proxy port its portals lead to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Portal {
    /// The service port.
    pub service: std::sync::Arc<ServicePort>,
    /// The listener's port.
    pub proxy_port: u16,
}

/// The node facts rules depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddrs {
    /// Address host-originated traffic is DNATed to when the bind address is a wildcard
    /// (kube-proxy's `ChooseHostInterface`).
    pub host_ip: Option<IpAddr>,
    /// Every local address (for port claiming and for NodePort rules without `addrtype`).
    pub local: Vec<IpAddr>,
}

impl NodeAddrs {
    /// Reads the node's addresses: all interface addresses, and as host IP the first global
    /// IPv4 address of the interface that holds the default route (falling back to any
    /// non-loopback IPv4 address).
    pub fn discover() -> Self {
        let ifaces = if_addrs::get_if_addrs().unwrap_or_default();
        let local: Vec<IpAddr> = ifaces.iter().map(|i| i.ip()).collect();
        let default_if = std::fs::read_to_string("/proc/net/route")
            .ok()
            .and_then(|t| {
                t.lines()
                    .skip(1)
                    .map(|l| l.split_whitespace().collect::<Vec<_>>())
                    .find(|f| f.len() > 2 && f[1] == "00000000")
                    .map(|f| f[0].to_string())
            });
        let v4 = |i: &&if_addrs::Interface| i.ip().is_ipv4() && !i.is_loopback();
        let host_ip = default_if
            .as_ref()
            .and_then(|name| ifaces.iter().filter(v4).find(|i| &i.name == name))
            .or_else(|| ifaces.iter().find(v4))
            .map(|i| i.ip());
        Self { host_ip, local }
    }
}

/// The portal backend in use.
#[derive(Debug)]
pub enum Backend {
    /// iptables rules.
    Iptables(iptables::Iptables),
    /// nftables maps.
    Nftables(nftables::Nftables),
    /// Service addresses on a local interface.
    Bind(bind::Bind),
    /// Nothing.
    None,
}

impl Backend {
    /// Prepares the node at start (chains and jumps, leftovers of a previous run flushed).
    ///
    /// # Errors
    /// The node cannot be programmed.
    pub fn init(&mut self) -> Result<()> {
        match self {
            Backend::Iptables(i) => i.init(),
            Backend::Nftables(n) => n.init(),
            Backend::Bind(b) => b.init(),
            Backend::None => Ok(()),
        }
    }

    /// Makes the node's portals exactly `portals`. Returns true when something was written.
    ///
    /// # Errors
    /// The write failed; the previous portals are then still in place (the write is atomic).
    pub fn sync(&mut self, portals: &[Portal], node: &NodeAddrs) -> Result<bool> {
        match self {
            Backend::Iptables(i) => i.sync(portals, node),
            Backend::Nftables(n) => n.sync(portals, node),
            Backend::Bind(b) => b.sync(portals),
            Backend::None => Ok(false),
        }
    }

    /// Periodic repair: re-checks what others may have removed (jump rules, addresses).
    ///
    /// # Errors
    /// The check or the repair failed.
    pub fn repair(&mut self) -> Result<()> {
        match self {
            Backend::Iptables(i) => i.repair(),
            Backend::Nftables(n) => n.repair(),
            Backend::Bind(b) => b.repair(),
            Backend::None => Ok(()),
        }
    }

    /// Clears UDP conntrack entries that point at a service address, so clients are not stuck
    /// on a path that changed. Errors are logged by the caller and never fatal.
    ///
    /// # Errors
    /// The `conntrack` tool failed.
    pub fn flush_udp_conntrack(&self, ip: IpAddr, port: u16) -> Result<()> {
        if self.nat() {
            conntrack::flush_udp(ip, port)
        } else {
            Ok(())
        }
    }

    /// Proxy ports a previous run's rules point at, by portal (`ip`, protocol, port), for the
    /// proxier to re-bind (NAT backends only; the others have nothing to adopt).
    pub fn take_adoptable(
        &mut self,
    ) -> std::collections::HashMap<(IpAddr, crate::model::Protocol, u16), u16> {
        match self {
            Backend::Iptables(i) => i.take_adoptable(),
            Backend::Nftables(n) => n.take_adoptable(),
            _ => Default::default(),
        }
    }

    /// Whether `SO_ORIGINAL_DST` identifies portal traffic (NAT backends only).
    pub fn guards_by_original_dst(&self) -> bool {
        self.nat()
    }

    /// Whether portals are NAT rules (iptables, nftables), and so leave conntrack state that
    /// may need clearing.
    pub fn nat(&self) -> bool {
        matches!(self, Backend::Iptables(_) | Backend::Nftables(_))
    }
}

/// Runs a program, feeding `stdin`, and returns its stdout.
///
/// # Errors
/// It cannot be started, or exits non-zero (with its stderr in the error).
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            program: program.into(),
            source,
        })?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes())
            .map_err(|source| Error::Spawn {
                program: program.into(),
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| Error::Spawn {
        program: program.into(),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            program: format!("{program} {}", args.join(" ")),
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
