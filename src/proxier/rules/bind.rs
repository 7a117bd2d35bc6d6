//! `bind` portal mode: no netfilter at all.
//!
//! Service IPs (cluster, external, load-balancer) are added as /32 (/128) addresses to a local
//! interface (`lo` by default) under a label we own, and listeners bind `ServiceIP:port`
//! directly (with `IP_FREEBIND`, so a listener can be bound before its address exists and the
//! usual order holds: listener first, then portal). Addresses that were already on the node are
//! never touched. Cleanup removes exactly the addresses carrying our label.

use std::collections::BTreeSet;
use std::net::IpAddr;

use tracing::{debug, info};

use super::{run, Portal, Result};

/// Label suffix of the addresses we add (`lo:kup`); IPv4 labels must start with the interface
/// name and be at most 15 characters.
const LABEL_SUFFIX: &str = "kup";

/// Address management for `bind` mode.
#[derive(Debug)]
pub struct Bind {
    interface: String,
    /// Addresses we added and still own.
    owned: BTreeSet<IpAddr>,
}

fn label(interface: &str) -> String {
    let mut l = format!("{interface}:{LABEL_SUFFIX}");
    l.truncate(15);
    l
}

fn prefix(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "32"
    } else {
        "128"
    }
}

/// Addresses carrying our label on `interface` (leftovers of a run, or ours now).
fn labelled(interface: &str) -> Vec<IpAddr> {
    let out = run("ip", &["-o", "addr", "show", "dev", interface], None).unwrap_or_default();
    let l = label(interface);
    out.lines()
        .filter(|line| {
            line.split_whitespace().last() == Some(l.as_str()) || line.contains(&format!(" {l}"))
        })
        .filter_map(|line| {
            let mut it = line.split_whitespace();
            it.find(|w| *w == "inet" || *w == "inet6")?;
            it.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

impl Bind {
    /// Manages addresses on `interface`.
    pub fn new(interface: &str) -> Self {
        Self {
            interface: interface.into(),
            owned: BTreeSet::new(),
        }
    }

    fn add(&self, ip: &IpAddr) -> Result<()> {
        let cidr = format!("{ip}/{}", prefix(ip));
        let l = label(&self.interface);
        let mut args = vec!["addr", "add", cidr.as_str(), "dev", self.interface.as_str()];
        if ip.is_ipv4() {
            args.extend_from_slice(&["label", l.as_str()]);
        } else {
            args.push("nodad");
        }
        run("ip", &args, None).map(|_| ())
    }

    fn del(&self, ip: &IpAddr) -> Result<()> {
        let cidr = format!("{ip}/{}", prefix(ip));
        run(
            "ip",
            &["addr", "del", cidr.as_str(), "dev", self.interface.as_str()],
            None,
        )
        .map(|_| ())
    }

    /// Removes addresses a previous run left behind.
    ///
    /// # Errors
    /// An address cannot be removed.
    pub fn init(&mut self) -> Result<()> {
        for ip in labelled(&self.interface) {
            self.del(&ip)?;
            debug!(%ip, "removed leftover service address");
        }
        self.owned.clear();
        info!(interface = %self.interface, "bind portals initialised");
        Ok(())
    }

    /// Makes the service addresses on the interface exactly those the portals need (keeping any
    /// that were there before us).
    ///
    /// # Errors
    /// An address cannot be added or removed.
    pub fn sync(&mut self, portals: &[Portal]) -> Result<bool> {
        let wanted: BTreeSet<IpAddr> = portals
            .iter()
            .flat_map(|p| p.service.portal_addrs().map(|a| a.ip()))
            .collect();
        let present: BTreeSet<IpAddr> = if_addrs::get_if_addrs()
            .unwrap_or_default()
            .into_iter()
            .map(|i| i.ip())
            .collect();
        let mut changed = false;
        for ip in wanted.iter().filter(|ip| !present.contains(ip)) {
            self.add(ip)?;
            self.owned.insert(*ip);
            changed = true;
        }
        let stale: Vec<IpAddr> = self
            .owned
            .iter()
            .filter(|ip| !wanted.contains(ip))
            .copied()
            .collect();
        for ip in stale {
            self.del(&ip)?;
            self.owned.remove(&ip);
            changed = true;
        }
        Ok(changed)
    }

    /// Re-adds owned addresses someone removed.
    ///
    /// # Errors
    /// An address cannot be added.
    pub fn repair(&mut self) -> Result<()> {
        let present: BTreeSet<IpAddr> = labelled(&self.interface).into_iter().collect();
        for ip in self.owned.iter().filter(|ip| !present.contains(ip)) {
            self.add(ip)?;
        }
        Ok(())
    }

    /// Removes every address carrying our label (`--cleanup`).
    ///
    /// # Errors
    /// An address cannot be removed.
    pub fn cleanup(interface: &str) -> Result<usize> {
        let b = Bind::new(interface);
        let all = labelled(interface);
        for ip in &all {
            b.del(ip)?;
        }
        Ok(all.len())
    }
}
