//! Cluster IPs for services written in a file without one.
//!
//! The API server allocates cluster IPs at random and stores them; a file has no store, so the
//! address is derived from the service's `namespace/name` instead: a hash picks a starting
//! offset in the service range and the first free address from there is taken. The same file
//! therefore gives the same addresses on every start and every reload, and adding a service
//! never moves another one (unless two names hash to the same address, which the probe resolves
//! in name order, again deterministically).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

/// A cluster IP that cannot be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An explicit clusterIP lies outside the service range.
    #[error("Service {service}: field spec.clusterIP: {ip} is outside the service range {range}")]
    OutsideRange {
        /// `namespace/name`.
        service: String,
        /// The address written.
        ip: IpAddr,
        /// The range.
        range: IpNet,
    },
    /// Every address of the range is taken.
    #[error("Service {service}: field spec.clusterIP: no free address left in the service range {range}")]
    Exhausted {
        /// `namespace/name`.
        service: String,
        /// The range.
        range: IpNet,
    },
}

/// FNV-1a: tiny, stable across Rust releases and platforms (unlike `DefaultHasher`), which is
/// the whole point here.
fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn nth(range: &IpNet, offset: u128) -> IpAddr {
    match range {
        IpNet::V4(n) => IpAddr::V4((u32::from(n.network()) + offset as u32).into()),
        IpNet::V6(n) => IpAddr::V6((u128::from(n.network()) + offset).into()),
    }
}

/// Usable host offsets of a range: the network address and (IPv4) broadcast address are never
/// handed out, matching the API server's allocator.
fn usable(range: &IpNet) -> (u128, u128) {
    let bits = u32::from(range.max_prefix_len() - range.prefix_len());
    let size: u128 = if bits >= 128 {
        u128::MAX
    } else {
        1u128 << bits
    };
    match range {
        IpNet::V4(_) if size > 2 => (1, size - 2),
        IpNet::V6(_) if size > 1 => (1, size - 1),
        _ => (0, size),
    }
}

/// Gives every service a cluster IP. `services` maps `namespace/name` to the explicit address
/// written in the file, if any. Explicit addresses are checked against `range` and reserved
/// first; the rest are derived from their names.
///
/// # Errors
/// An explicit address outside the range, or a range with no free address left.
pub fn assign(
    range: &IpNet,
    services: &BTreeMap<String, Option<IpAddr>>,
) -> Result<BTreeMap<String, IpAddr>, Error> {
    let mut taken: BTreeSet<IpAddr> = BTreeSet::new();
    let mut out = BTreeMap::new();
    for (name, ip) in services {
        if let Some(ip) = ip {
            if !range.contains(ip) {
                return Err(Error::OutsideRange {
                    service: name.clone(),
                    ip: *ip,
                    range: *range,
                });
            }
            taken.insert(*ip);
            out.insert(name.clone(), *ip);
        }
    }
    let (first, count) = usable(range);
    for (name, ip) in services {
        if ip.is_some() {
            continue;
        }
        let start = u128::from(stable_hash(name)) % count;
        let found = (0..count.min(1 << 20))
            .map(|i| nth(range, first + (start + i) % count))
            .find(|candidate| !taken.contains(candidate));
        let Some(ip) = found else {
            return Err(Error::Exhausted {
                service: name.clone(),
                range: *range,
            });
        };
        taken.insert(ip);
        out.insert(name.clone(), ip);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services(items: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<IpAddr>> {
        items
            .iter()
            .map(|(n, ip)| (n.to_string(), ip.map(|s| s.parse().unwrap())))
            .collect()
    }

    #[test]
    fn derived_addresses_are_stable_and_in_range() {
        let range: IpNet = "10.96.0.0/12".parse().unwrap();
        let a = assign(
            &range,
            &services(&[("default/web", None), ("default/db", None)]),
        )
        .unwrap();
        let b = assign(
            &range,
            &services(&[("default/db", None), ("default/web", None), ("x/new", None)]),
        )
        .unwrap();
        assert_eq!(
            a["default/web"], b["default/web"],
            "adding a service does not move another"
        );
        assert_eq!(a["default/db"], b["default/db"]);
        assert!(a.values().all(|ip| range.contains(ip)));
        assert_ne!(a["default/web"], a["default/db"]);
    }

    #[test]
    fn explicit_outside_range_is_an_error() {
        let range: IpNet = "10.96.0.0/12".parse().unwrap();
        let e = assign(&range, &services(&[("default/web", Some("192.168.0.1"))])).unwrap_err();
        assert!(e.to_string().contains("default/web"), "{e}");
        assert!(e.to_string().contains("spec.clusterIP"), "{e}");
    }

    #[test]
    fn collisions_probe_to_the_next_free_address() {
        // A /30 has two usable addresses: network and broadcast are never given.
        let range: IpNet = "10.0.0.0/30".parse().unwrap();
        let got = assign(&range, &services(&[("a/a", None), ("b/b", None)])).unwrap();
        let set: BTreeSet<_> = got.values().copied().collect();
        let want: BTreeSet<IpAddr> =
            ["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()].into();
        assert_eq!(set, want);
        let full = assign(
            &range,
            &services(&[("a/a", None), ("b/b", None), ("c/c", None)]),
        );
        assert!(matches!(full, Err(Error::Exhausted { .. })));
    }

    #[test]
    fn explicit_addresses_are_reserved_before_derived_ones() {
        let range: IpNet = "10.0.0.0/30".parse().unwrap();
        let got = assign(
            &range,
            &services(&[("a/a", None), ("z/z", Some("10.0.0.1"))]),
        )
        .unwrap();
        assert_eq!(got["z/z"], "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(got["a/a"], "10.0.0.2".parse::<IpAddr>().unwrap());
    }
}
