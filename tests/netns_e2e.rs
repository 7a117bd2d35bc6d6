//! End-to-end portals in network namespaces this test makes itself: real iptables (nft and
//! legacy) and real nftables portals, real REDIRECT/DNAT, the real binary.
//!
//! Topology per scenario (every address exists only inside these namespaces):
//!
//! ```text
//!   pod ns  10.244.0.2 (+ backends .11 .12 .13) ── veth ── 10.244.0.1  node ns  192.168.50.1 ── veth ── 192.168.50.2  outside ns
//!                                                          (proxy runs here; default route via outside)
//! ```
//!
//! `harness = false`: `main` runs the scenarios, or, when re-executed inside a namespace with
//! `UP_E2E_HELPER` set, acts as a backend or a client there. Without root (or without `ip` and
//! iptables) every scenario is skipped with a loud message.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_userspace-proxy");
/// The flavour name that selects `portalMode: nftables`.
const NFTABLES: &str = "nftables";
static COUNTER: AtomicUsize = AtomicUsize::new(0);

// === helpers run inside namespaces ===

/// Refuses to send anywhere but loopback unless this process runs in a test namespace.
fn guard_target(target: &SocketAddr) {
    if let Err(e) = userspace_proxy::safety::check_target(target) {
        eprintln!("{e}");
        std::process::exit(2);
    }
}

fn helper_backend() {
    let id = std::env::var("UP_ID").unwrap();
    let ip = std::env::var("UP_IP").unwrap();
    let lifetime = Duration::from_secs(
        std::env::var("UP_LIFETIME")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120),
    );
    let port: u16 = std::env::var("UP_TCP_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    let tcp = TcpListener::bind((ip.as_str(), port)).expect("backend tcp bind");
    let udp = UdpSocket::bind((ip.as_str(), 5353)).expect("backend udp bind");
    let uid = id.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let mut reply = format!("{uid}|").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = udp.send_to(&reply, from);
        }
    });
    std::thread::spawn(move || {
        for mut s in tcp.incoming().flatten() {
            let _ = s.write_all(format!("{id}\n").as_bytes());
        }
    });
    std::thread::sleep(lifetime); // bounded: the backend ends itself
}

/// One TCP exchange with each of `UP_TARGETS` (comma-separated, at most 2,000): prints
/// `SWEEP <ok> <failed>` and the first failures.
fn helper_sweep() {
    let targets: Vec<SocketAddr> = std::env::var("UP_TARGETS")
        .unwrap()
        .split(',')
        .take(2_000)
        .map(|t| t.parse().unwrap())
        .collect();
    let (mut ok, mut failed) = (0, Vec::new());
    for t in &targets {
        guard_target(t);
        match tcp_once(*t) {
            Ok(_) => ok += 1,
            Err(e) => failed.push(format!("{t}: {e}")),
        }
    }
    println!("SWEEP {ok} {}", failed.len());
    for f in failed.iter().take(5) {
        println!("ERR {f}");
    }
}

fn helper_client() {
    let proto = std::env::var("UP_PROTO").unwrap();
    if proto == "sweep" {
        return helper_sweep();
    }
    let target: SocketAddr = std::env::var("UP_TARGET").unwrap().parse().unwrap();
    if proto == "load" {
        return helper_load(target);
    }
    if proto == "http" {
        let path = std::env::var("UP_PATH").unwrap_or_else(|_| "/".into());
        let code = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            Ok(line.split_whitespace().nth(1).unwrap_or("?").to_string())
        })();
        match code {
            Ok(c) => println!("ID {c}"),
            Err(e) => println!("ERR {e}"),
        }
        return;
    }
    let count: usize = std::env::var("UP_COUNT").unwrap().parse().unwrap();
    // A fixed source port: every attempt is the same flow to conntrack.
    let from: Option<u16> = std::env::var("UP_SRC_PORT")
        .ok()
        .map(|p| p.parse().unwrap());
    guard_target(&target);
    for _ in 0..count.min(1000) {
        let r = if proto == "tcp" {
            match from {
                Some(port) => tcp_from(port, target),
                None => tcp_once(target),
            }
        } else {
            udp_once(target)
        };
        match r {
            Ok(id) => println!("ID {id}"),
            Err(e) => println!("ERR {e}"),
        }
    }
}

/// Steady TCP load for `UP_SECS` seconds (at most 20): one connection after another, each a
/// full exchange. Prints `STARTED` after the first success, then `LOAD <ok> <failed> <stalled>`
/// and the first few errors. A stalled connection took 900 ms or more: its SYN was dropped and
/// retransmitted (TCP's first retransmission is at 1 s), which is how a portal gap shows when
/// packets are dropped rather than refused.
fn helper_load(target: SocketAddr) {
    guard_target(&target);
    let secs = std::env::var("UP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4u64)
        .min(20);
    let end = Instant::now() + Duration::from_secs(secs);
    let (mut ok, mut failed, mut stalled, mut errors) = (0u64, 0u64, 0u64, Vec::new());
    while Instant::now() < end {
        let t = Instant::now();
        let r = tcp_once(target);
        if t.elapsed() >= Duration::from_millis(900) {
            stalled += 1;
        }
        match r {
            Ok(_) => {
                ok += 1;
                if ok == 1 {
                    println!("STARTED");
                    let _ = std::io::stdout().flush();
                }
            }
            Err(e) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(e);
                }
            }
        }
    }
    println!("LOAD {ok} {failed} {stalled}");
    for e in errors {
        println!("ERR {e}");
    }
}

fn tcp_once(target: SocketAddr) -> Result<String, String> {
    let s =
        TcpStream::connect_timeout(&target, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    read_id(s)
}

/// The backend's first line on a connected stream: its id.
fn read_id(s: TcpStream) -> Result<String, String> {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line.is_empty() {
        return Err("closed without data".into());
    }
    Ok(line.trim().to_string())
}

/// [`tcp_once`] from source port `port`.
fn tcp_from(port: u16, target: SocketAddr) -> Result<String, String> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| e.to_string())?;
    s.set_reuse_address(true).map_err(|e| e.to_string())?;
    s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
        .map_err(|e| format!("bind: {e}"))?;
    s.connect_timeout(&target.into(), Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    read_id(TcpStream::from(s))
}

fn udp_once(target: SocketAddr) -> Result<String, String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.send_to(b"ping", target).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf).map_err(|e| e.to_string())?;
    if from != target {
        return Err(format!("reply from {from}, not from {target}"));
    }
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let (id, rest) = text.split_once('|').ok_or("malformed reply")?;
    if rest != "ping" {
        return Err("payload changed".into());
    }
    Ok(id.to_string())
}

// === the test world ===

struct World {
    id: String,
    node: String,
    pod: String,
    out: String,
    children: Vec<Child>,
    dir: tempfile::TempDir,
    /// `iptables-nft`, `iptables-legacy` (the iptables backend with that command) or
    /// [`NFTABLES`] (the nftables backend).
    flavour: String,
}

fn run(cmd: &str, args: &[&str]) -> Result<Output, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out)
}

impl World {
    fn new(flavour: &str) -> Result<World, String> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:x}{n}", std::process::id() & 0xfff);
        let w = World {
            node: format!("up{id}-node"),
            pod: format!("up{id}-pod"),
            out: format!("up{id}-out"),
            id,
            children: Vec::new(),
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
            flavour: flavour.into(),
        };
        for ns in [&w.node, &w.pod, &w.out] {
            run("ip", &["netns", "add", ns])?;
            w.ip(ns, &["link", "set", "lo", "up"])?;
        }
        let (a, b, c, d) = (
            format!("up{}a", w.id),
            format!("up{}b", w.id),
            format!("up{}c", w.id),
            format!("up{}d", w.id),
        );
        run(
            "ip",
            &[
                "link", "add", &a, "netns", &w.node, "type", "veth", "peer", "name", &b, "netns",
                &w.pod,
            ],
        )?;
        run(
            "ip",
            &[
                "link", "add", &c, "netns", &w.node, "type", "veth", "peer", "name", &d, "netns",
                &w.out,
            ],
        )?;
        w.ip(&w.node, &["addr", "add", "10.244.0.1/24", "dev", &a])?;
        w.ip(&w.node, &["addr", "add", "192.168.50.1/24", "dev", &c])?;
        w.ip(&w.pod, &["addr", "add", "10.244.0.2/24", "dev", &b])?;
        for backend in ["10.244.0.11", "10.244.0.12", "10.244.0.13"] {
            w.ip(
                &w.pod,
                &["addr", "add", &format!("{backend}/24"), "dev", &b],
            )?;
        }
        w.ip(&w.out, &["addr", "add", "192.168.50.2/24", "dev", &d])?;
        for (ns, dev) in [(&w.node, &a), (&w.node, &c), (&w.pod, &b), (&w.out, &d)] {
            w.ip(ns, &["link", "set", dev, "up"])?;
        }
        w.ip(&w.node, &["route", "add", "default", "via", "192.168.50.2"])?;
        w.ip(&w.pod, &["route", "add", "default", "via", "10.244.0.1"])?;
        w.ip(
            &w.out,
            &["route", "add", "10.96.0.0/12", "via", "192.168.50.1"],
        )?;
        w.ip(
            &w.out,
            &["route", "add", "203.0.113.0/24", "via", "192.168.50.1"],
        )?;
        Ok(w)
    }

    fn ip(&self, ns: &str, args: &[&str]) -> Result<Output, String> {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// The kernel's counts of queued connections it moved (or failed to move) from a closed
    /// listener to another of its `SO_REUSEPORT` group, in the node's namespace.
    fn migrations(&self) -> String {
        self.exec(
            &self.node,
            &[
                "nstat",
                "-az",
                "TcpExtTCPMigrateReqSuccess",
                "TcpExtTCPMigrateReqFailure",
            ],
        )
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    Some(format!(
                        "{} {}",
                        f.next()?.strip_prefix("TcpExt")?,
                        f.next()?
                    ))
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
    }

    /// What a failed restart leaves to go on: the kernel's migration counts, and what each
    /// proxy logged about refusing, dialling or closing connections, and its warnings.
    fn restart_evidence(&self) -> String {
        let mut out = self.migrations();
        out.push('\n');
        for i in 0..self.children.len() {
            let log = std::fs::read_to_string(self.dir.path().join(format!("proxy{i}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| {
                    [
                        "WARN",
                        "ERROR",
                        "refused",
                        "dial",
                        "no endpoints",
                        "accept failed",
                    ]
                    .iter()
                    .any(|k| l.contains(k))
                })
                .take(20)
                .collect();
            out.push_str(&format!("proxy{i}:\n{}\n", lines.join("\n")));
        }
        out
    }

    fn exec(&self, ns: &str, args: &[&str]) -> Result<Output, String> {
        let mut all = vec!["netns", "exec", ns];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    fn spawn_in(
        &mut self,
        ns: &str,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<(), String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.children.push(cmd.spawn().map_err(|e| e.to_string())?);
        Ok(())
    }

    fn backends(&mut self) -> Result<(), String> {
        let exe = std::env::current_exe().unwrap();
        let exe = exe.to_str().unwrap().to_string();
        let pod = self.pod.clone();
        for (i, ip) in ["10.244.0.11", "10.244.0.12", "10.244.0.13"]
            .iter()
            .enumerate()
        {
            let id = format!("pod-{}", (b'a' + i as u8) as char);
            self.spawn_in(
                &pod,
                &exe,
                &[],
                &[
                    ("UP_E2E_HELPER", "backend"),
                    ("UP_ID", &id),
                    ("UP_IP", ip),
                    ("UP_LIFETIME", "120"),
                ],
            )?;
        }
        Ok(())
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("proxy.yaml")
    }

    fn write_config(&self, text: &str) {
        let tmp = self.dir.path().join("proxy.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.config_path()).unwrap();
    }

    /// Starts the proxy in the node namespace; returns its index in `children`.
    fn start_proxy(&mut self, extra: &[&str]) -> Result<usize, String> {
        let cfg = self.config_path();
        let log = std::fs::File::create(
            self.dir
                .path()
                .join(format!("proxy{}.log", self.children.len())),
        )
        .unwrap();
        let mut cmd = Command::new("ip");
        // A lock file of this world's own: scenarios never wait on (or hold) the host's.
        cmd.env("XTABLES_LOCKFILE", self.dir.path().join("xtables.lock"));
        cmd.args([
            "netns",
            "exec",
            &self.node,
            BIN,
            "--config",
            cfg.to_str().unwrap(),
            "-v",
            "4",
        ])
        .args(if self.nftables() {
            ["--portal-mode", "nftables"]
        } else {
            ["--iptables-command", self.flavour.as_str()]
        })
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        self.children.push(cmd.spawn().map_err(|e| e.to_string())?);
        Ok(self.children.len() - 1)
    }

    fn stop(&mut self, idx: usize) -> Result<(), String> {
        let pid = self.children[idx].id().to_string();
        // `ip netns exec` execs the program, so the pid is the proxy's own.
        run("kill", &["-TERM", &pid])?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.children[idx].try_wait().map_err(|e| e.to_string())? {
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!("proxy exited with {status}"))
                };
            }
            if Instant::now() > deadline {
                return Err("proxy did not stop within 10 s of SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn client(
        &self,
        ns: &str,
        proto: &str,
        target: &str,
        count: usize,
    ) -> Vec<Result<String, String>> {
        let count = count.to_string();
        let out = self
            .helper_client(
                ns,
                &[
                    ("UP_PROTO", proto),
                    ("UP_TARGET", target),
                    ("UP_COUNT", &count),
                ],
            )
            .expect("client runs");
        out.lines()
            .filter_map(|l| {
                if let Some(id) = l.strip_prefix("ID ") {
                    Some(Ok(id.to_string()))
                } else {
                    l.strip_prefix("ERR ").map(|e| Err(e.to_string()))
                }
            })
            .collect()
    }

    /// Runs this test binary as the client helper inside `ns` with `env`; its stdout.
    fn helper_client(&self, ns: &str, env: &[(&str, &str)]) -> std::io::Result<String> {
        let exe = std::env::current_exe().unwrap();
        Command::new("ip")
            .args(["netns", "exec", ns, exe.to_str().unwrap()])
            .env("UP_E2E_HELPER", "client")
            .envs(env.iter().copied())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// One TCP request from `ns` to `target`, from source port `port`.
    fn tcp_from(&self, ns: &str, port: u16, target: &str) -> Result<String, String> {
        let port = port.to_string();
        let env = [
            ("UP_PROTO", "tcp"),
            ("UP_TARGET", target),
            ("UP_COUNT", "1"),
            ("UP_SRC_PORT", port.as_str()),
        ];
        let out = self.helper_client(ns, &env).map_err(|e| e.to_string())?;
        let out = out.trim();
        match out.strip_prefix("ID ") {
            Some(id) => Ok(id.to_string()),
            None => Err(out.to_string()),
        }
    }

    /// One exchange with each of `targets` from `ns`: the helper's `SWEEP <ok> <failed>` line
    /// and its first errors.
    fn sweep(&self, ns: &str, targets: &[String]) -> String {
        let targets = targets.join(",");
        self.helper_client(ns, &[("UP_PROTO", "sweep"), ("UP_TARGETS", &targets)])
            .unwrap_or_else(|e| format!("cannot run the sweep: {e}"))
    }

    /// Polls until one request succeeds (the proxy is up and its rules are in), or fails.
    fn wait_serving(&self, ns: &str, proto: &str, target: &str) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = self.client(ns, proto, target, 1);
            if matches!(r.first(), Some(Ok(_))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{proto} {target} from {ns} never answered: {r:?}\n--- proxy log ---\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `nftables` flavour runs the nftables portal backend instead of an iptables one.
    fn nftables(&self) -> bool {
        self.flavour == NFTABLES
    }

    /// The node's portal rules as text: `iptables-save`, or our nftables table.
    fn save(&self) -> String {
        let save = format!("{}-save", self.flavour);
        let cmd: &[&str] = if self.nftables() {
            &["nft", "list", "table", "ip", "userspace-proxy"]
        } else {
            &[&save]
        };
        self.exec(&self.node, cmd)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    fn log(&self) -> String {
        let mut s = String::new();
        for i in 0..self.children.len() {
            if let Ok(t) = std::fs::read_to_string(self.dir.path().join(format!("proxy{i}.log"))) {
                let tail: Vec<&str> = t.lines().rev().take(30).collect();
                s.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
        s
    }

    /// The addresses on the node's `lo`, as `ip -o addr` prints them.
    fn lo_addrs(&self) -> Result<String, String> {
        let out = self.ip(&self.node, &["-o", "addr", "show", "dev", "lo"])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Every proxy log of this world, whole.
    fn full_log(&self) -> String {
        (0..self.children.len())
            .filter_map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("proxy{i}.log"))).ok()
            })
            .collect()
    }

    /// The proxy port of a service, read from its REDIRECT rule (or its portal element,
    /// `<addr> . tcp . 80 comment "<name>" : <port>`).
    fn proxy_port(&self, comment: &str) -> Option<u16> {
        let save = self.save();
        if self.nftables() {
            let tagged = format!("comment \"{comment}\" : ");
            let at = save.find(&tagged)? + tagged.len();
            let digits: String = save[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            return digits.parse().ok();
        }
        save.lines()
            .find(|l| l.contains(comment) && l.contains("--to-ports"))
            .and_then(|l| l.split("--to-ports ").nth(1)?.trim().parse().ok())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.node, &self.pod, &self.out] {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}

// === configuration ===

const HEAD: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: userspace
healthzBindAddress: \"\"
metricsBindAddress: \"\"
hostnameOverride: node-1
udpIdleTimeout: 1s
iptables: {syncPeriod: 30s, minSyncPeriod: 0s}
shutdownGracePeriod: 1s
";

fn services(with_api: bool) -> String {
    let mut s = String::from(
        "---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  externalIPs: [203.0.113.7]
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: v1
kind: Endpoints
metadata: {name: web, namespace: default}
subsets:
- addresses: [{ip: 10.244.0.11}, {ip: 10.244.0.12}, {ip: 10.244.0.13}]
  ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.30
  sessionAffinity: ClientIP
  ports:
  - {name: http, port: 80, nodePort: 30080}
---
apiVersion: v1
kind: Endpoints
metadata: {name: sticky, namespace: default}
subsets:
- addresses: [{ip: 10.244.0.11}, {ip: 10.244.0.12}, {ip: 10.244.0.13}]
  ports: [{name: http, port: 8080}]
",
    );
    if with_api {
        s.push_str(
            "---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 8000}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: api, namespace: default}
subsets:
- addresses: [{ip: 10.244.0.13}]
  ports: [{name: http, port: 8080}]
",
        );
    }
    s
}

// === scenarios ===

macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// Polls `cond` every 50 ms until it holds; fails with `what` once `within` has passed.
fn wait_for(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while !cond() {
        check!(Instant::now() < deadline, "{what} (waited {within:?})");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn ids(results: &[Result<String, String>]) -> Result<HashMap<String, usize>, String> {
    let mut m = HashMap::new();
    for r in results {
        match r {
            Ok(id) => *m.entry(id.clone()).or_default() += 1,
            Err(e) => return Err(format!("request failed: {e} (all: {results:?})")),
        }
    }
    Ok(m)
}

/// ClusterIP TCP+UDP from the node (OUTPUT) and from a pod (PREROUTING), NodePort and
/// externalIP from outside, affinity, the back door, reload removal, restart, cleanup.
fn full_lifecycle(ipt: &str) -> Result<(), String> {
    let (mut w, p) = serving(ipt)?;
    let pod = w.pod.clone();

    // The rules users expect, commented with the service name.
    let save = w.save();
    for want in [
        "-A KUBE-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m comment --comment \"default/web:http\" -m tcp --dport 80 -j REDIRECT",
        "-A KUBE-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m comment --comment \"default/web:http\" -m tcp --dport 80 -j DNAT --to-destination 192.168.50.1:",
        "-A KUBE-NODEPORT-CONTAINER -p tcp -m comment --comment \"default/sticky:http\" -m tcp --dport 30080 -j REDIRECT",
        "-A PREROUTING -m comment --comment \"handle ClusterIPs; NOTE: this must be before the NodePort rules\" -j KUBE-PORTALS-CONTAINER",
    ] {
        check!(save.contains(want), "missing rule {want:?} in\n{save}");
    }

    back_door_closed(&w)?;

    // UDP conntrack: entries for the portal exist after traffic, and an endpoint change of the
    // UDP port clears them, so clients do not keep a stale path.
    let udp_entries = |w: &World| {
        w.exec(
            &w.node,
            &["conntrack", "-L", "-p", "udp", "--orig-dst", "10.96.0.10"],
        )
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains("dport=53"))
                .count()
        })
        .unwrap_or(0)
    };
    ids(&w.client(&pod, "udp", "10.96.0.10:53", 2))?;
    check!(
        udp_entries(&w) > 0,
        "no UDP conntrack entries for the portal after traffic"
    );
    let two_backends = services(true).replacen(
        "- addresses: [{ip: 10.244.0.11}, {ip: 10.244.0.12}, {ip: 10.244.0.13}]\n  ports: [{name: http, port: 8080}, {name: dns",
        "- addresses: [{ip: 10.244.0.11}, {ip: 10.244.0.12}]\n  ports: [{name: http, port: 8080}, {name: dns",
        1,
    );
    check!(
        two_backends != services(true),
        "test config edit did not apply"
    );
    w.write_config(&format!("{HEAD}{two_backends}"));
    wait_for(
        Duration::from_secs(5),
        "UDP conntrack entries not cleared after an endpoint change",
        || udp_entries(&w) == 0,
    )?;
    let m = ids(&w.client(&pod, "udp", "10.96.0.10:53", 4))?;
    check!(
        !m.contains_key("pod-c"),
        "removed endpoint still answers: {m:?}"
    );

    remove_api(&w)?;

    // Restart: rules are flushed and re-installed, never duplicated.
    let before = w
        .save()
        .lines()
        .filter(|l| l.starts_with("-A KUBE-"))
        .count();
    w.stop(p)?;
    w.start_proxy(&[])?;
    w.wait_serving(&pod, "tcp", "10.96.0.10:80")?;
    let save = w.save();
    let after = save.lines().filter(|l| l.starts_with("-A KUBE-")).count();
    check!(
        before == after,
        "rule count changed across restart: {before} -> {after}\n{save}"
    );
    let jumps = save
        .lines()
        .filter(|l| l.starts_with("-A PREROUTING") && l.contains("KUBE-PORTALS-CONTAINER"))
        .count();
    check!(jumps == 1, "jump rule duplicated: {jumps}");

    cleanup_twice(&mut w)?;
    let save = w.save();
    check!(
        !save.contains("KUBE-"),
        "leftovers after --cleanup:\n{save}"
    );
    Ok(())
}

/// A world whose proxy serves `services(true)` through every path of [`service_paths`];
/// returns it with the proxy's index.
fn serving(flavour: &str) -> Result<(World, usize), String> {
    let mut w = World::new(flavour)?;
    w.backends()?;
    w.write_config(&format!("{HEAD}{}", services(true)));
    let p = w.start_proxy(&[])?;
    let pod = w.pod.clone();
    w.wait_serving(&pod, "tcp", "10.96.0.10:80")?;
    service_paths(&w)?;
    Ok((w, p))
}

/// The paths every NAT backend must serve for `services(true)`: ClusterIP TCP (round robin)
/// and UDP from a pod and from the node, NodePort from outside and from the node, externalIP
/// from outside, ClientIP affinity.
fn service_paths(w: &World) -> Result<(), String> {
    let (node, pod, out) = (&w.node, &w.pod, &w.out);
    // ClusterIP TCP from a pod and from the node: round robin over the three backends.
    for ns in [pod, node] {
        let m = ids(&w.client(ns, "tcp", "10.96.0.10:80", 9))?;
        check!(
            m.len() == 3 && m.values().all(|n| *n == 3),
            "TCP from {ns}: uneven spread {m:?}"
        );
    }
    // ClusterIP UDP from both: replies come back from the service address.
    for ns in [pod, node] {
        w.wait_serving(ns, "udp", "10.96.0.10:53")?;
        let m = ids(&w.client(ns, "udp", "10.96.0.10:53", 6))?;
        check!(!m.is_empty(), "UDP from {ns}: {m:?}");
    }
    // NodePort from outside and from the node itself; externalIP from outside.
    let m = ids(&w.client(out, "tcp", "192.168.50.1:30080", 5))?;
    check!(
        m.len() == 1,
        "NodePort with ClientIP affinity pins one backend: {m:?}"
    );
    ids(&w.client(node, "tcp", "192.168.50.1:30080", 2))?;
    let m = ids(&w.client(out, "tcp", "203.0.113.7:80", 6))?;
    check!(m.len() == 3, "externalIP from outside spreads: {m:?}");
    // Affinity on the ClusterIP from a pod.
    let m = ids(&w.client(pod, "tcp", "10.96.0.30:80", 6))?;
    check!(m.len() == 1, "ClientIP affinity: {m:?}");
    Ok(())
}

/// Straight at a proxy port from outside, TCP and UDP: must not reach a backend.
fn back_door_closed(w: &World) -> Result<(), String> {
    let out = &w.out;
    let pp = w
        .proxy_port("default/web:http")
        .ok_or("no proxy port for web:http")?;
    let r = w.client(out, "tcp", &format!("192.168.50.1:{pp}"), 1);
    check!(
        r.len() == 1 && r.iter().all(|r| r.is_err()),
        "direct TCP to proxy port {pp} reached a backend: {r:?}"
    );
    let upp = w
        .proxy_port("default/web:dns")
        .ok_or("no proxy port for web:dns")?;
    let r = w.client(out, "udp", &format!("192.168.50.1:{upp}"), 1);
    check!(
        r.len() == 1 && r.iter().all(|r| r.is_err()),
        "direct UDP to proxy port {upp} reached a backend: {r:?}"
    );
    Ok(())
}

/// Reload without `api`: its portals go, its port closes; the others keep serving.
fn remove_api(w: &World) -> Result<(), String> {
    let (node, pod) = (&w.node, &w.pod);
    let api_pp = w
        .proxy_port("default/api:http")
        .ok_or("no proxy port for api")?;
    w.write_config(&format!("{HEAD}{}", services(false)));
    wait_for(
        Duration::from_secs(5),
        "api rules still present after reload",
        || !w.save().contains("default/api:http"),
    )?;
    // While api existed, the guard chain silently dropped direct packets to its port; once its
    // guard rule is gone and its socket closed (rules go first, by design), the kernel refuses.
    wait_for(
        Duration::from_secs(5),
        "api's proxy port not closed (refused) after removal",
        || {
            let r = w.client(node, "tcp", &format!("127.0.0.1:{api_pp}"), 1);
            r.iter()
                .all(|r| r.as_ref().is_err_and(|e| e.contains("refused")))
        },
    )?;
    ids(&w.client(pod, "tcp", "10.96.0.10:80", 3))?;
    Ok(())
}

/// Stops the newest proxy and runs `--cleanup` twice (the second must tolerate absence).
fn cleanup_twice(w: &mut World) -> Result<(), String> {
    let idx = w.children.len() - 1;
    w.stop(idx)?;
    let cfg = w.config_path();
    let node = w.node.clone();
    w.exec(
        &node,
        &[BIN, "--config", cfg.to_str().unwrap(), "--cleanup"],
    )?;
    w.exec(
        &node,
        &[BIN, "--config", cfg.to_str().unwrap(), "--cleanup"],
    )
    .map_err(|e| format!("second cleanup must tolerate absence: {e}"))?;
    Ok(())
}

/// nftables portals: the same paths as the iptables backends, the portals as commented map
/// elements, a removal, a restart (same ports, no duplicates) and `--cleanup` (no table left).
fn nftables_portals(flavour: &str) -> Result<(), String> {
    let (mut w, p) = serving(flavour)?;
    let pod = w.pod.clone();
    let table = w.save();
    for want in [
        "10.96.0.10 . tcp . 80 comment \"default/web:http\" : ",
        "10.96.0.10 . udp . 53 comment \"default/web:dns\" : ",
        "203.0.113.7 . tcp . 80 comment \"default/web:http\" : ",
        "tcp . 30080 : ",
        "redirect to :ip daddr . meta l4proto . th dport map @portals",
        "fib daddr type local redirect to :meta l4proto . th dport map @nodeports",
        "dnat to 192.168.50.1:ip daddr . meta l4proto . th dport map @portals",
    ] {
        check!(table.contains(want), "missing {want:?} in\n{table}");
    }
    back_door_closed(&w)?;
    remove_api(&w)?;

    // Restart: the table is replaced, not doubled, and the proxy ports are adopted.
    let elements = |t: &str| t.matches(" comment \"").count();
    let (before, port) = (elements(&w.save()), w.proxy_port("default/web:http"));
    w.stop(p)?;
    w.start_proxy(&[])?;
    w.wait_serving(&pod, "tcp", "10.96.0.10:80")?;
    let after = elements(&w.save());
    check!(
        before == after && before > 0,
        "portal elements across restart: {before} -> {after}"
    );
    check!(
        w.proxy_port("default/web:http") == port,
        "the proxy port changed across the restart"
    );

    cleanup_twice(&mut w)?;
    let tables = w.exec(&w.node, &["nft", "list", "tables"])?;
    let tables = String::from_utf8_lossy(&tables.stdout).into_owned();
    check!(
        !tables.contains("userspace-proxy"),
        "table left after --cleanup:\n{tables}"
    );
    Ok(())
}

/// Minimal rule shapes: only nat, tcp/udp and REDIRECT/DNAT; ClusterIP, NodePort and
/// externalIP still work; the listener's own guard closes the back door.
fn minimal_shapes(ipt: &str) -> Result<(), String> {
    let mut w = World::new(ipt)?;
    w.backends()?;
    // Something else on the node already holds TCP port 30081: the service asking for it as a
    // NodePort fails alone; every other service works.
    let exe = std::env::current_exe()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let node_ns = w.node.clone();
    let squatter = [
        ("UP_E2E_HELPER", "backend"),
        ("UP_ID", "squatter"),
        ("UP_IP", "0.0.0.0"),
        ("UP_TCP_PORT", "30081"),
        ("UP_LIFETIME", "60"),
    ];
    w.spawn_in(&node_ns, &exe, &[], &squatter)?;
    w.wait_serving(&node_ns, "tcp", "127.0.0.1:30081")?;
    let taken = "---
apiVersion: v1
kind: Service
metadata: {name: taken, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.40
  ports: [{name: http, port: 80, nodePort: 30081}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: taken, namespace: default}
subsets:
- addresses: [{ip: 10.244.0.11}]
  ports: [{name: http, port: 8080}]
";
    w.write_config(&format!(
        "{HEAD}netfilterExtensions: minimal\n{}{taken}",
        services(false)
    ));
    w.start_proxy(&[])?;
    let (node, pod, out) = (w.node.clone(), w.pod.clone(), w.out.clone());
    w.wait_serving(&pod, "tcp", "10.96.0.10:80")?;
    ids(&w.client(&node, "tcp", "10.96.0.10:80", 3))?;
    ids(&w.client(&out, "tcp", "192.168.50.1:30080", 3))?;
    ids(&w.client(&out, "tcp", "203.0.113.7:80", 3))?;
    w.wait_serving(&pod, "udp", "10.96.0.10:53")?;
    let save = w.save();
    for ext in ["-m comment", "addrtype", "physdev", "--state", "conntrack"] {
        check!(!save.contains(ext), "minimal shapes use {ext}:\n{save}");
    }
    check!(
        save.contains(
            "-A KUBE-NODEPORT-CONTAINER -d 192.168.50.1/32 -p tcp -m tcp --dport 30080 -j REDIRECT"
        ),
        "per-address NodePort rule missing:\n{save}"
    );
    check!(
        !save.contains("10.96.0.40"),
        "the service whose NodePort is taken got rules:\n{save}"
    );
    check!(
        w.full_log()
            .contains("node port 30081/tcp is already in use"),
        "no error naming the taken NodePort:\n{}",
        w.log()
    );
    let pp = w
        .proxy_port("--dport 80 -j REDIRECT")
        .ok_or("no proxy port")?;
    let r = w.client(&out, "tcp", &format!("192.168.50.1:{pp}"), 2);
    check!(
        r.len() == 2 && r.iter().all(|r| r.as_ref().is_err_and(|e| e.contains("closed without data"))),
        "direct TCP to the proxy port must be accepted by the kernel and closed by the listener's guard: {r:?}"
    );
    Ok(())
}

/// Bind mode: zero nat rules; service IPs on `lo`; ClusterIP from node and pod; cleanup removes
/// the addresses.
fn bind_mode(ipt: &str) -> Result<(), String> {
    let mut w = World::new(ipt)?;
    w.backends()?;
    w.write_config(&format!("{HEAD}portalMode: bind\n{}", services(true)));
    let p = w.start_proxy(&[])?;
    let (node, pod, out) = (w.node.clone(), w.pod.clone(), w.out.clone());
    w.wait_serving(&pod, "tcp", "10.96.0.10:80")?;
    let m = ids(&w.client(&node, "tcp", "10.96.0.10:80", 6))?;
    check!(m.len() == 3, "bind-mode spread: {m:?}");
    w.wait_serving(&pod, "udp", "10.96.0.10:53")?;
    ids(&w.client(&out, "tcp", "192.168.50.1:30080", 2))?;
    let save = w.save();
    check!(
        !save.lines().any(|l| l.starts_with("-A ")),
        "bind mode installed rules:\n{save}"
    );
    let addrs = w.lo_addrs()?;
    check!(
        addrs.contains("10.96.0.10/32") && addrs.contains("10.96.0.20/32"),
        "service IPs not on lo:\n{addrs}"
    );
    // Reload removing api removes its address.
    w.write_config(&format!("{HEAD}portalMode: bind\n{}", services(false)));
    wait_for(
        Duration::from_secs(5),
        "api's address still on lo after reload",
        || w.lo_addrs().is_ok_and(|a| !a.contains("10.96.0.20/32")),
    )?;
    w.stop(p)?;
    let cfg = w.config_path();
    w.exec(
        &node,
        &[BIN, "--config", cfg.to_str().unwrap(), "--cleanup"],
    )?;
    let a = w.lo_addrs()?;
    check!(
        !a.contains("10.96."),
        "addresses left after --cleanup:\n{a}"
    );
    Ok(())
}

/// `externalTrafficPolicy: Local`: traffic from outside (NodePort, external IP) reaches only
/// this node's endpoints, while ClusterIP traffic from a pod still reaches every endpoint.
fn external_local(ipt: &str) -> Result<(), String> {
    let mut w = World::new(ipt)?;
    w.backends()?;
    w.write_config(&format!(
        "{HEAD}---
apiVersion: v1
kind: Service
metadata: {{name: local, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.40
  externalIPs: [203.0.113.8]
  externalTrafficPolicy: Local
  ports: [{{name: http, port: 80, nodePort: 30090}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: local-1, namespace: default, labels: {{kubernetes.io/service-name: local}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- {{addresses: [10.244.0.11], nodeName: node-1}}
- {{addresses: [10.244.0.12], nodeName: node-2}}
"
    ));
    let p = w.start_proxy(&[])?;
    let (pod, out) = (w.pod.clone(), w.out.clone());
    w.wait_serving(&pod, "tcp", "10.96.0.40:80")?;
    let m = ids(&w.client(&pod, "tcp", "10.96.0.40:80", 6))?;
    check!(
        m.len() == 2,
        "ClusterIP traffic must reach both endpoints: {m:?}"
    );
    for target in ["192.168.50.1:30090", "203.0.113.8:80"] {
        let m = ids(&w.client(&out, "tcp", target, 6))?;
        check!(
            m.len() == 1 && m.contains_key("pod-a"),
            "external traffic to {target} must stay on node-1's endpoint (pod-a): {m:?}"
        );
    }
    w.stop(p)?;
    Ok(())
}

/// A restart under steady load refuses no connection: the new process adopts the proxy ports
/// the old one's rules point at (SO_REUSEPORT) and takes every new connection from then on
/// (a reuseport BPF program; shown by freezing the old one), and whatever is still queued on
/// the old listeners migrates to the new ones when it closes them (tcp_migrate_req).
fn restart_under_load(ipt: &str) -> Result<(), String> {
    let mut w = World::new(ipt)?;
    w.backends()?;
    w.write_config(&format!("{HEAD}{}", services(false)));
    let old = w.start_proxy(&[])?;
    let pod = w.pod.clone();
    w.wait_serving(&pod, "tcp", "10.96.0.10:80")?;
    let port_before = w.proxy_port("default/web:http").ok_or("no proxy port")?;

    let exe = std::env::current_exe().unwrap();
    let mut load = Command::new("ip")
        .args(["netns", "exec", &pod, exe.to_str().unwrap()])
        .env("UP_E2E_HELPER", "client")
        .env("UP_PROTO", "load")
        .env("UP_TARGET", "10.96.0.10:80")
        .env("UP_SECS", "4")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(load.stdout.take().unwrap()).lines();
    check!(
        lines.next().and_then(|l| l.ok()).as_deref() == Some("STARTED"),
        "load never started"
    );

    let new = w.start_proxy(&[])?;
    let new_log = w.dir.path().join(format!("proxy{new}.log"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(&new_log).unwrap_or_default();
        if log.contains("sync complete") {
            check!(
                log.contains("adopting their proxy ports"),
                "the new proxy did not adopt:\n{log}"
            );
            break;
        }
        check!(
            Instant::now() < deadline,
            "the new proxy never synced:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // From here on the new process takes every new connection. Freeze the old one for longer
    // than a stall (900 ms): a connection the kernel still gave it would wait out the freeze
    // and count as stalled. It serves nothing in flight here: the load makes one short
    // connection at a time, and the new one has been taking them since it listened.
    let old_pid = w.children[old].id().to_string();
    run("kill", &["-STOP", &old_pid])?;
    std::thread::sleep(Duration::from_millis(1500));
    run("kill", &["-CONT", &old_pid])?;
    w.stop(old)?;
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let _ = load.wait();
    let summary = rest
        .iter()
        .find_map(|l| l.strip_prefix("LOAD "))
        .ok_or_else(|| format!("no load summary: {rest:?}"))?;
    let n: Vec<u64> = summary
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let (ok, failed, stalled) = (n[0], n[1], n[2]);
    check!(
        stalled == 0,
        "{stalled} connections stalled for 900 ms or more across the restart: a SYN retransmitted (a portal gap), or a connection the kernel gave the frozen old process"
    );
    check!(
        failed == 0,
        "{failed} of {} connections failed across the restart: {rest:?}\n{}",
        ok + failed,
        w.restart_evidence()
    );
    check!(
        ok > 20,
        "too little load to show anything: {ok} connections"
    );
    check!(
        w.proxy_port("default/web:http") == Some(port_before),
        "the proxy port changed across the restart"
    );
    w.wait_serving(&pod, "tcp", "10.96.0.10:80")?;
    println!(
        "    restart under load: {ok} connections, 0 failed ({})",
        w.migrations()
    );
    Ok(())
}

/// A client that dialled a service before the node programmed it reaches it once it is, from
/// the same source port too. Its first SYN was tracked without NAT, and conntrack matches every
/// later SYN of that flow to that entry (refreshing it), so without clearing such entries the
/// connect keeps failing for as long as the client retries.
fn flows_before_their_portal(ipt: &str) -> Result<(), String> {
    let mut w = World::new(ipt)?;
    w.backends()?;
    w.write_config(&format!("{HEAD}{}", services(false)));
    w.start_proxy(&[])?;
    // From the node itself (host-originated traffic, the OUTPUT portals): its SYN to a service
    // not yet programmed leaves by the default route, so conntrack keeps the flow. (A pod's SYN
    // is dropped here, unrouted, before conntrack keeps it; in a cluster whose nodes forward, it
    // would be kept the same way.)
    let node = w.node.clone();
    w.wait_serving(&node, "tcp", "10.96.0.10:80")?;
    let (port, target) = (41_001, "10.96.0.20:8000");
    let early = w.tcp_from(&node, port, target);
    check!(
        early.is_err(),
        "{target} answered before it was configured: {early:?}"
    );
    w.write_config(&format!("{HEAD}{}", services(true)));
    w.wait_serving(&node, "tcp", target)?;
    let mut last = Err(String::new());
    wait_for(
        Duration::from_secs(8),
        "the flow that tried before the portal existed to get through",
        || {
            last = w.tcp_from(&node, port, target);
            last.is_ok()
        },
    )
    .map_err(|e| {
        format!(
            "{e}: last {last:?}\n{}\n{}",
            w.exec(
                &w.node,
                &["conntrack", "-L", "-p", "tcp", "--orig-port-dst", "8000"]
            )
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default(),
            w.log()
        )
    })?;
    Ok(())
}

/// `line` without its ANSI colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Up to and including the sequence's final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Enough services at once that rules are written while listeners still open
/// (src/proxier/early_rules.rs): every one answers, each portal has its rules exactly once, and
/// the guard covers the run of their proxy ports with a few rules.
fn many_at_once(ipt: &str) -> Result<(), String> {
    const N: usize = 600;
    let mut w = World::new(ipt)?;
    w.backends()?;
    let addr = |i: usize| format!("10.96.{}.{}:80", 2 + i / 250, 1 + i % 250);
    let mut cfg = format!("{HEAD}{}", services(false));
    for i in 0..N {
        let _ = write!(
            cfg,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: many{i}, namespace: default}}\nspec: {{clusterIP: {}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: many{i}, namespace: default}}\nsubsets: [{{addresses: [{{ip: 10.244.0.12}}], ports: [{{port: 8080}}]}}]\n",
            addr(i).trim_end_matches(":80")
        );
    }
    w.write_config(&cfg);
    let proxy = w.start_proxy(&[])?;
    let node = w.node.clone();
    // many99 opens last: names sort as strings.
    w.wait_serving(&node, "tcp", &addr(99))?;
    let targets: Vec<String> = (0..N).map(addr).collect();
    let mut last = String::new();
    wait_for(Duration::from_secs(10), "every service to answer", || {
        last = w.sweep(&node, &targets);
        last.starts_with(&format!("SWEEP {N} 0"))
    })
    .map_err(|e| format!("{e}: {last}\n{}", w.log()))?;
    let log =
        std::fs::read_to_string(w.dir.path().join(format!("proxy{proxy}.log"))).unwrap_or_default();
    // The log is coloured: the field reads `writes=N` only once the escapes are gone (picking
    // digits out of the raw line read the escapes' digits too, so `writes=0` read as 200).
    let writes: usize = log
        .lines()
        .find(|l| l.contains("portals written while listeners opened"))
        .map(strip_ansi)
        .and_then(|l| {
            let n = l.split("writes=").nth(1)?;
            n.split_whitespace().next()?.parse().ok()
        })
        .ok_or_else(|| format!("no early write was logged\n{}", w.log()))?;
    check!(
        writes >= 1,
        "no write overlapped the opening of {N} listeners"
    );
    let save = w.save();
    if w.nftables() {
        let elements = save.matches("\"default/many").count();
        check!(
            elements >= N,
            "{elements} portal elements for {N} services:\n{save}"
        );
    } else {
        for chain in ["KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST"] {
            let rules = save
                .lines()
                .filter(|l| l.starts_with(&format!("-A {chain} ")) && l.contains("default/many"))
                .count();
            check!(rules == N, "{rules} rules in {chain} for {N} services");
        }
        let guard = save
            .lines()
            .filter(|l| l.starts_with("-A KUBE-USERSPACE-GUARD "))
            .count();
        // A run per write at most (each early write appends the run of the ports it added).
        check!(
            (1..=16).contains(&guard),
            "{guard} guard rules for {} proxy ports in sequence:\n{save}",
            N + 3
        );
    }
    Ok(())
}

/// /healthz turns 503 when a queued change cannot be applied within 2 x syncPeriod (here the
/// xtables lock is held, so iptables-restore waits), and 200 again once it is applied.
/// iptables-legacy only: it is the flavour that takes the xtables lock.
fn health_flips(ipt: &str) -> Result<(), String> {
    let mut w = World::new(ipt)?;
    w.backends()?;
    let head = HEAD
        .replace(
            "healthzBindAddress: \"\"",
            "healthzBindAddress: 127.0.0.1:10256",
        )
        .replace("syncPeriod: 30s", "syncPeriod: 1s");
    w.write_config(&format!("{head}{}", services(false)));
    w.start_proxy(&[])?;
    let (node, pod) = (w.node.clone(), w.pod.clone());
    w.wait_serving(&pod, "tcp", "10.96.0.10:80")?;
    let health = |w: &World| {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &w.node,
                std::env::current_exe().unwrap().to_str().unwrap(),
            ])
            .env("UP_E2E_HELPER", "client")
            .env("UP_PROTO", "http")
            .env("UP_TARGET", "127.0.0.1:10256")
            .env("UP_PATH", "/healthz")
            .env("UP_COUNT", "1")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        out.strip_prefix("ID ").unwrap_or(&out).to_string()
    };
    let poll = |w: &World, want: &str, within: u64| -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(within);
        loop {
            let got = health(w);
            if got == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "/healthz stayed {got:?}, wanted {want} within {within} s\n{}",
                    w.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    poll(&w, "200", 5)?;

    // Hold the proxy's xtables lock, then queue a change.
    let lock = w.dir.path().join("xtables.lock");
    // -o: only flock itself holds the lock, so killing it releases the lock.
    let mut holder = Command::new("flock")
        .arg("-o")
        .arg(&lock)
        .args(["-c", "echo locked; sleep 30"])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("flock: {e}"))?;
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    check!(
        line.trim() == "locked",
        "flock did not take the lock: {line:?}"
    );
    w.write_config(&format!("{head}{}", services(true)));
    let stuck = poll(&w, "503", 10);
    let _ = holder.kill();
    let _ = holder.wait();
    stuck?;
    poll(&w, "200", 15)?;
    let save = w.save();
    check!(
        save.contains("10.96.0.20/32"),
        "the queued change was not applied after the lock was released\n{save}\n{}",
        w.log()
    );
    let _ = node;
    Ok(())
}

fn skip_reason() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(String::from))
        });
    if uid.as_deref() != Some("0") {
        return Some("not running as root".into());
    }
    for tool in ["ip", "iptables"] {
        if Command::new(tool).arg("-V").output().is_err()
            && Command::new(tool).arg("--version").output().is_err()
        {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

fn main() {
    match std::env::var("UP_E2E_HELPER").as_deref() {
        Ok("backend") => return helper_backend(),
        Ok("client") => return helper_client(),
        _ => {}
    }
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if let Some(why) = skip_reason() {
        eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        eprintln!("!! netns_e2e SKIPPED: {why}. These tests need root (CI runs them).");
        eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
        println!("netns_e2e: 0 passed, 0 failed, 20 skipped");
        return;
    }
    let mut flavours = vec!["iptables-nft"];
    if Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        flavours.push(NFTABLES);
    } else {
        eprintln!("note: nft not installed; the nftables portal flavour is not run");
    }
    if Command::new("iptables-legacy")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        flavours.push("iptables-legacy");
    } else {
        eprintln!("note: iptables-legacy not installed; running the nft flavour only");
    }
    // Which flavours a scenario runs under: the iptables rule shapes, the bind mode and the
    // nftables table are each checked by their own scenario; the traffic scenarios by all.
    type Scenario = fn(&str) -> Result<(), String>;
    type RunsUnder = fn(&str) -> bool;
    let iptables_only: RunsUnder = |f| f != NFTABLES;
    let nftables_only: RunsUnder = |f| f == NFTABLES;
    let any: RunsUnder = |_| true;
    let scenarios: [(&str, Scenario, RunsUnder); 8] = [
        ("restart_under_load", restart_under_load, any),
        ("many_at_once", many_at_once, any),
        ("external_local", external_local, any),
        ("flows_before_their_portal", flows_before_their_portal, any),
        ("full_lifecycle", full_lifecycle, iptables_only),
        ("minimal_shapes", minimal_shapes, iptables_only),
        ("bind_mode", bind_mode, iptables_only),
        ("nftables_portals", nftables_portals, nftables_only),
    ];
    let (mut passed, mut failed) = (0, 0);
    for ipt in &flavours {
        for (name, f, runs_under) in scenarios {
            if !runs_under(ipt) {
                continue;
            }
            let full = format!("{name}[{ipt}]");
            if filter.as_ref().is_some_and(|f| !full.contains(f.as_str())) {
                continue;
            }
            let t = Instant::now();
            match f(ipt) {
                Ok(()) => {
                    passed += 1;
                    println!("test {full} ... ok ({:.1}s)", t.elapsed().as_secs_f64());
                }
                Err(e) => {
                    failed += 1;
                    println!(
                        "test {full} ... FAILED ({:.1}s)\n{e}\n",
                        t.elapsed().as_secs_f64()
                    );
                }
            }
        }
    }
    if flavours.contains(&"iptables-legacy")
        && filter
            .as_ref()
            .is_none_or(|f| "health_flips[iptables-legacy]".contains(f.as_str()))
    {
        let t = Instant::now();
        match health_flips("iptables-legacy") {
            Ok(()) => {
                passed += 1;
                println!(
                    "test health_flips[iptables-legacy] ... ok ({:.1}s)",
                    t.elapsed().as_secs_f64()
                );
            }
            Err(e) => {
                failed += 1;
                println!(
                    "test health_flips[iptables-legacy] ... FAILED ({:.1}s)\n{e}\n",
                    t.elapsed().as_secs_f64()
                );
            }
        }
    }
    println!("\nnetns_e2e: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    let _ = std::io::stdout().flush();
}
