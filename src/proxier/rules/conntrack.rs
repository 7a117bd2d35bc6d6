//! Conntrack entries the NAT portals must not leave behind, deleted with the `conntrack` tool.
//!
//! - UDP flows of a service port that closed or changed endpoints (kube-proxy's
//!   `ClearEntriesForIP`): they would keep reaching the old proxy port.
//! - Flows to a portal that were tracked *before* its rule existed: a client that dialled a
//!   service the node had not programmed yet. NAT is decided on a flow's first packet only, so
//!   such an entry carries no NAT, and every later packet of the same flow (a TCP SYN
//!   retransmitted from the same port, a UDP client on a fixed port) matches it and bypasses the
//!   new rule. Each packet refreshes the entry's timeout (120 s for `SYN_SENT`), so a client's
//!   whole connect (about 2 minutes of retries) can fail with the service up. Measured in a
//!   namespace: a connect from a port that had tried 1.5 s before the service existed still
//!   timed out after it answered everyone else. Only entries without NAT are deleted (the reply
//!   comes from the address and port that were dialled), so proxied flows are never touched.
//!
//! IPv4 only, as the NAT portals are.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use super::{run, Error, Result};
use crate::model::Protocol;

/// An address clients dial: a portal, or a NodePort on one of the node's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dialled {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The IP dialled.
    pub ip: Ipv4Addr,
    /// The port dialled.
    pub port: u16,
}

/// Up to this many addresses are cleared with one `conntrack -D` each; more with one listing,
/// then deletes only for the addresses it shows stale flows for (usually none). Each run of the
/// tool walks the whole table in the kernel whatever its filters: measured with 18,000 flows
/// tracked, 60 to 70 ms for one `-D` with filters and 80 to 100 ms for a full listing. So one
/// new address costs one walk, and a first sync of 10,000 ports costs one walk too.
const ONE_BY_ONE: usize = 1;

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// Runs `conntrack` with `args`; "0 flow entries" (exit 1) is success.
fn conntrack(args: &[&str]) -> Result<String> {
    match run("conntrack", args, None) {
        Ok(out) => Ok(out),
        Err(Error::Command { stderr, .. }) if stderr.contains("0 flow entries") => {
            Ok(String::new())
        }
        Err(e) => Err(e),
    }
}

/// Deletes UDP conntrack entries whose original destination is `ip:port`.
///
/// # Errors
/// `conntrack` is missing or fails ("0 flow entries" is success).
pub fn flush_udp(ip: IpAddr, port: u16) -> Result<()> {
    let ip_s = ip.to_string();
    let port_s = port.to_string();
    let mut args = vec![
        "-D",
        "-p",
        "udp",
        "--orig-dst",
        ip_s.as_str(),
        "--orig-port-dst",
        port_s.as_str(),
    ];
    if ip.is_ipv6() {
        args.extend_from_slice(&["-f", "ipv6"]);
    }
    conntrack(&args).map(|_| ())
}

/// Deletes the flows to `d` that carry no NAT.
fn delete_unnatted(d: &Dialled) -> Result<()> {
    let (ip, port) = (d.ip.to_string(), d.port.to_string());
    conntrack(&[
        "-D",
        "-p",
        proto_name(d.protocol),
        "--orig-dst",
        &ip,
        "--reply-src",
        &ip,
        "--orig-port-dst",
        &port,
        "--reply-port-src",
        &port,
    ])
    .map(|_| ())
}

/// Deletes the flows to any of `dialled` that were tracked without NAT (before their rules
/// existed); returns how many addresses had such flows, when a listing found them (`None` when
/// each address was cleared blindly).
///
/// # Errors
/// `conntrack` is missing or fails; the addresses after the failure are not cleared.
pub fn forget_unnatted(dialled: &BTreeSet<Dialled>) -> Result<Option<usize>> {
    if dialled.len() <= ONE_BY_ONE {
        for d in dialled {
            delete_unnatted(d)?;
        }
        return Ok(None);
    }
    let listing = conntrack(&["-L", "-f", "ipv4"])?;
    let stale = stale_in(&listing, dialled);
    for d in &stale {
        delete_unnatted(d)?;
    }
    Ok(Some(stale.len()))
}

/// The addresses of `dialled` that a `conntrack -L` listing shows flows to without NAT.
pub fn stale_in(listing: &str, dialled: &BTreeSet<Dialled>) -> BTreeSet<Dialled> {
    let mut found = BTreeSet::new();
    for line in listing.lines() {
        let Some(flow) = Flow::parse(line) else {
            continue;
        };
        if flow.reply_src != flow.orig_dst || flow.reply_sport != flow.orig_dport {
            continue; // NATed: a proxied flow
        }
        let d = Dialled {
            protocol: flow.protocol,
            ip: flow.orig_dst,
            port: flow.orig_dport,
        };
        if dialled.contains(&d) {
            found.insert(d);
        }
    }
    found
}

/// The parts of one listed flow that tell whether it was NATed.
#[derive(Debug, PartialEq, Eq)]
struct Flow {
    protocol: Protocol,
    orig_dst: Ipv4Addr,
    orig_dport: u16,
    reply_src: Ipv4Addr,
    reply_sport: u16,
}

impl Flow {
    /// One line of `conntrack -L`: the protocol name first, then the original tuple's
    /// `src= dst= sport= dport=` and the reply tuple's, in that order.
    fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_whitespace();
        let protocol = match words.next()? {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return None,
        };
        let (mut srcs, mut dsts, mut sports, mut dports) = (vec![], vec![], vec![], vec![]);
        for w in words {
            let Some((k, v)) = w.split_once('=') else {
                continue;
            };
            match k {
                "src" => srcs.push(v.parse::<Ipv4Addr>().ok()?),
                "dst" => dsts.push(v.parse::<Ipv4Addr>().ok()?),
                "sport" => sports.push(v.parse::<u16>().ok()?),
                "dport" => dports.push(v.parse::<u16>().ok()?),
                _ => {}
            }
        }
        if srcs.len() != 2 || dsts.len() != 2 || sports.len() != 2 || dports.len() != 2 {
            return None;
        }
        Some(Self {
            protocol,
            orig_dst: dsts[0],
            orig_dport: dports[0],
            reply_src: srcs[1],
            reply_sport: sports[1],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as `conntrack -L` printed them in a test namespace: a SYN sent before the
    /// service's rule existed (no NAT), a proxied flow (DNAT to the proxy port), a UDP flow
    /// without NAT to a NodePort, and one of another protocol.
    const LISTING: &str = "\
tcp      6 99 SYN_SENT src=10.10.3.1 dst=10.96.1.12 sport=40002 dport=9000 [UNREPLIED] src=10.96.1.12 dst=10.10.3.1 sport=9000 dport=40002 mark=0 use=1
tcp      6 102 TIME_WAIT src=10.10.3.1 dst=10.96.1.11 sport=40003 dport=9000 src=10.10.3.1 dst=10.10.3.1 sport=35577 dport=40003 [ASSURED] mark=0 use=1
udp      17 28 src=10.244.0.2 dst=192.168.50.1 sport=5353 dport=30053 [UNREPLIED] src=192.168.50.1 dst=10.244.0.2 sport=30053 dport=5353 mark=0 use=1
icmp     1 29 src=10.10.3.1 dst=10.10.3.2 type=8 code=0 id=7 src=10.10.3.2 dst=10.10.3.1 type=0 code=0 id=7 mark=0 use=1
";

    fn d(protocol: Protocol, ip: [u8; 4], port: u16) -> Dialled {
        Dialled {
            protocol,
            ip: Ipv4Addr::from(ip),
            port,
        }
    }

    #[test]
    fn only_flows_without_nat_to_the_given_addresses_are_stale() {
        let wanted: BTreeSet<Dialled> = [
            d(Protocol::Tcp, [10, 96, 1, 12], 9000),
            d(Protocol::Tcp, [10, 96, 1, 11], 9000),
            d(Protocol::Udp, [192, 168, 50, 1], 30053),
            d(Protocol::Udp, [10, 96, 1, 12], 9000),
        ]
        .into();
        let stale = stale_in(LISTING, &wanted);
        assert_eq!(
            stale,
            [
                d(Protocol::Tcp, [10, 96, 1, 12], 9000),
                d(Protocol::Udp, [192, 168, 50, 1], 30053)
            ]
            .into()
        );
        // Nothing asked for, nothing found.
        assert!(stale_in(LISTING, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn a_line_that_is_not_a_flow_is_skipped() {
        assert_eq!(Flow::parse(""), None);
        assert_eq!(
            Flow::parse("conntrack v1.4.7 (conntrack-tools): 4 flow entries have been shown."),
            None
        );
        assert_eq!(
            Flow::parse("tcp 6 99 SYN_SENT src=10.0.0.1 dst=10.0.0.2"),
            None
        );
    }
}
