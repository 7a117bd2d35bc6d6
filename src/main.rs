//! The `userspace-proxy` binary: kube-proxy's flags, logging, signals and exit codes. The
//! library does the work.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing::{error, info, warn};
use userspace_proxy::config::{self, Overrides, PortalMode};
use userspace_proxy::proxier::rules::iptables::ExtensionsMode;
use userspace_proxy::{app, signal};

/// The allocator, for the binary only (the library leaves the choice to whoever links it).
///
/// tokio allocates each task and each registered socket aligned to a cache line, and glibc's
/// `posix_memalign` searches its free lists for such a block. Measured with callgrind over
/// 16,500 proxied connections (connect, 100-byte exchange, close): with glibc, its three calls
/// per connection took 2,515 of the proxy's 15,166 instructions per connection; with mimalloc
/// the connection costs 12,356. Idle proxied connections: 1.63 KiB of RSS each, against 2.06
/// with glibc (8,000 held), and the RSS goes back down once they close (12.8 MiB, against
/// 24.3 MiB for glibc, which keeps its heap).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `EX_USAGE`: the configuration or the command line is wrong.
const EX_USAGE: u8 = 64;

/// Kubernetes' userspace service proxy, re-implemented.
#[derive(Debug, Parser)]
#[command(name = "userspace-proxy", version, about)]
struct Cli {
    /// Configuration file: a KubeProxyConfiguration, then Services, Endpoints and
    /// EndpointSlices. Without it the embedded example configuration is used.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
    /// Proxy mode; only `userspace` is implemented.
    #[arg(long, value_name = "MODE")]
    proxy_mode: Option<String>,
    /// IP address proxy ports listen on (0.0.0.0 for all).
    #[arg(long, value_name = "IP")]
    bind_address: Option<String>,
    /// Proxy port range: A-B, A or A+N; empty or 0 for kernel-chosen ports.
    #[arg(long, value_name = "RANGE")]
    proxy_port_range: Option<String>,
    /// Idle timeout of UDP client sessions (e.g. 250ms).
    #[arg(long, value_name = "DURATION")]
    udp_timeout: Option<String>,
    /// Path to a kubeconfig: serve the services of that cluster (overrides
    /// clientConnection.kubeconfig).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<String>,
    /// Address of the Kubernetes API server (overrides the kubeconfig's server).
    #[arg(long, value_name = "URL")]
    master: Option<String>,
    /// Node name to use instead of the hostname.
    #[arg(long, value_name = "NAME")]
    hostname_override: Option<String>,
    /// Longest time between syncs (e.g. 30s).
    #[arg(long, value_name = "DURATION")]
    iptables_sync_period: Option<String>,
    /// Shortest time between syncs (e.g. 1s).
    #[arg(long, value_name = "DURATION")]
    iptables_min_sync_period: Option<String>,
    /// How traffic reaches the proxy: iptables rules, nftables maps, bind (no netfilter), or none.
    #[arg(long, value_name = "MODE")]
    portal_mode: Option<PortalMode>,
    /// Rule shapes: auto, full (comment/addrtype/physdev/state), minimal (nat + REDIRECT only).
    #[arg(long, value_name = "MODE", value_parser = parse_extensions)]
    netfilter_extensions: Option<ExtensionsMode>,
    /// iptables command: iptables, iptables-legacy or iptables-nft.
    #[arg(long, value_name = "COMMAND")]
    iptables_command: Option<String>,
    /// Remove every rule, chain and address this program installs, then exit.
    #[arg(long)]
    cleanup: bool,
    /// Log verbosity, as kube-proxy's -v (0-1 info, 2-4 debug, 5+ trace).
    #[arg(short = 'v', long = "v", value_name = "N", default_value_t = 0)]
    verbosity: u8,
    /// Log format: text or json.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    log_format: String,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Show what a running proxy serves: one line per service port with its portals, proxy
    /// port, endpoints and live connections (from its metrics server's /debug/services).
    Status {
        /// The metrics server to ask; default: metricsBindAddress of --config.
        #[arg(long, value_name = "IP:PORT")]
        metrics_address: Option<std::net::SocketAddr>,
    },
}

fn parse_extensions(s: &str) -> Result<ExtensionsMode, String> {
    match s {
        "auto" => Ok(ExtensionsMode::Auto),
        "full" => Ok(ExtensionsMode::Full),
        "minimal" => Ok(ExtensionsMode::Minimal),
        o => Err(format!(
            "unknown value {o:?} (expected auto, full or minimal)"
        )),
    }
}

fn init_logging(verbosity: u8, format: &str) -> Result<(), String> {
    let level = match verbosity {
        0 | 1 => "info",
        2..=4 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "warn,userspace_proxy={level},userspace_proxy_bin={level}"
        ))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        "text" => builder.init(),
        "json" => builder.json().init(),
        o => {
            return Err(format!(
                "--log-format: unknown format {o:?} (expected text or json)"
            ))
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(cli.verbosity, &cli.log_format) {
        eprintln!("error: {e}");
        return ExitCode::from(EX_USAGE);
    }
    let overrides = Overrides {
        proxy_mode: cli.proxy_mode.clone(),
        bind_address: cli.bind_address.clone(),
        port_range: cli.proxy_port_range.clone(),
        udp_timeout: cli.udp_timeout.clone(),
        hostname_override: cli.hostname_override.clone(),
        kubeconfig: cli.kubeconfig.clone(),
        master: cli.master.clone(),
        portal_mode: cli.portal_mode,
        sync_period: cli.iptables_sync_period.clone(),
        min_sync_period: cli.iptables_min_sync_period.clone(),
        netfilter_extensions: cli.netfilter_extensions,
        iptables_command: cli.iptables_command.clone(),
        ..Default::default()
    };
    let loaded = match app::load(cli.config.clone(), overrides) {
        Ok(l) => l,
        Err(e) => {
            error!("{}", error_chain(&e));
            return ExitCode::from(EX_USAGE);
        }
    };
    if cli.config.is_none()
        && loaded.source == app::SourceKind::File
        && !cli.cleanup
        && cli.command.is_none()
    {
        warn!("no --config given: serving the embedded example configuration");
    }
    if let Some(Command::Status { metrics_address }) = cli.command {
        let Some(addr) = metrics_address.or(loaded.settings.metrics_bind_address) else {
            error!("no metrics server configured (metricsBindAddress is empty); pass --metrics-address");
            return ExitCode::from(EX_USAGE);
        };
        return match userspace_proxy::admin::fetch(addr, "/debug/services") {
            Ok((200, body)) => {
                print!("{body}");
                ExitCode::SUCCESS
            }
            Ok((code, body)) => {
                error!(code, "the proxy answered {}", body.trim());
                ExitCode::FAILURE
            }
            Err(e) => {
                error!(%addr, error = %e, "cannot reach the proxy's metrics server");
                ExitCode::FAILURE
            }
        };
    }
    if cli.cleanup {
        return match app::cleanup(&loaded.settings) {
            Ok(()) => {
                info!("cleanup done");
                ExitCode::SUCCESS
            }
            Err(e) => {
                error!(
                    "encountered an error while tearing down rules: {}",
                    error_chain(&e)
                );
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(loaded))
}

async fn run(loaded: app::Loaded) -> ExitCode {
    let (soft, hard) = app::raise_nofile_limit();
    if soft < app::WANTED_NOFILE {
        warn!(nofile_soft = soft, nofile_hard = hard, wanted = app::WANTED_NOFILE, "open-file limit is below what kube-proxy asked for; running out is handled by backing off");
    } else {
        info!(nofile_soft = soft, nofile_hard = hard, "open-file limit");
    }
    if let Some(adj) = loaded.settings.oom_score_adj {
        if let Err(e) = std::fs::write("/proc/self/oom_score_adj", adj.to_string()) {
            warn!(error = %e, oom_score_adj = adj, "cannot set oom_score_adj");
        }
    }
    info!(
        version = env!("CARGO_PKG_VERSION"),
        mode = config::MODE,
        portal_mode = ?loaded.settings.portal_mode,
        bind_address = %loaded.settings.bind_address,
        node = %loaded.settings.hostname,
        source = ?loaded.source,
        "Using userspace Proxier"
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    if let Err(e) = signal::cancel_on_shutdown(shutdown.clone()) {
        eprintln!("error: cannot install signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    let hup = match signal::hangups(shutdown.clone()) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let backend = app::backend_for(&loaded.settings);
    let running = match app::start(loaded, backend, hup).await {
        Ok(r) => r,
        Err(e) => {
            error!("{}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    shutdown.cancelled().await;
    running.stop().await;
    ExitCode::SUCCESS
}

/// `outer: cause: cause`, each cause once.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        // Some libraries print their cause in their own message too: say it once.
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}
