//! A stand-in Kubernetes API server for `make bench`: the test suite's fake
//! (`tests/common/fake_api.rs`, which speaks the real list/watch protocol), preloaded with N
//! services of one TCP port each and an EndpointSlice per service.
//!
//! ```text
//! fakeapi --services N --backend IP:PORT [--secs S]
//! ```
//! Prints its URL (for `--master`) on the first line of stdout, then reads commands from stdin:
//! `add K` creates one more service (`bench/extraK`, cluster IP 10.100.0.K, port 9000; K is 1
//! if left out) with its slice and prints `added`. It listens on loopback only and exits after `--secs` (default 600) or
//! at the end of stdin.

#[allow(dead_code)]
#[path = "../tests/common/fake_api.rs"]
mod fake_api;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use fake_api::{FakeApi, Kind};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The address the bench's file generator gives service `i` (same scheme as bench/run.sh).
fn cluster_ip(i: usize) -> String {
    format!("10.96.{}.{}", i / 250 + 1, i % 250 + 1)
}

fn add_service(api: &FakeApi, name: &str, ip: &str, backend: SocketAddr) {
    api.apply(
        Kind::Service,
        fake_api::service(name, ip, &[("p", 9000)], json!({})),
    );
    api.apply(
        Kind::EndpointSlice,
        fake_api::slice(
            &format!("{name}-0"),
            name,
            "p",
            backend.port(),
            &[(&backend.ip().to_string(), true, false, "bench-cp")],
        ),
    );
}

// Two workers, so the Service and EndpointSlice lists a starting proxy asks for together are
// served together, as an API server serves them; on one thread the second waited for the first
// (about 0.1 s each at 10,000) and the bench counted the wait as the proxy's.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut m = HashMap::new();
    while let Some(k) = args.next() {
        m.insert(
            k.trim_start_matches("--").to_string(),
            args.next().unwrap_or_default(),
        );
    }
    let n: usize = m
        .get("services")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let backend: SocketAddr = m
        .get("backend")
        .and_then(|v| v.parse().ok())
        .expect("--backend IP:PORT");
    let secs: u64 = m
        .get("secs")
        .and_then(|v| v.parse().ok())
        .unwrap_or(600)
        .min(3600);
    let api = FakeApi::start(true).await;
    api.add_node("bench-cp");
    for i in 1..=n {
        add_service(&api, &format!("s{i}"), &cluster_ip(i), backend);
    }
    println!("{}", api.url());
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let deadline = tokio::time::sleep(Duration::from_secs(secs));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            line = lines.next_line() => match line {
                Ok(Some(l)) if l.trim_start().starts_with("add") => {
                    let k: u8 = l.trim()[3..].trim().parse().unwrap_or(1).max(1);
                    add_service(&api, &format!("extra{k}"), &format!("10.100.0.{k}"), backend);
                    println!("added");
                }
                Ok(Some(_)) => {}
                _ => break,
            },
        }
    }
}
