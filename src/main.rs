//! The `memdial` binary: `serve` runs one node, `cluster` runs every node
//! of a config in one process, `cli` is an interactive client for a node,
//! `probe` a health check for containers.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use memdial::config::{Config, Consistency, HostPort};
use memdial::node;

mod cli;
mod probe;

/// jemalloc rather than glibc's allocator: it gives freed memory back to
/// the system (the buffers of closed connections), and costs less per
/// allocation on the request path (`docs/BENCHMARKS.md`). Its background
/// threads (the `background_threads` feature) purge freed pages on a
/// timer, so an idle node, which allocates almost nothing, gives them back
/// too; `.cargo/config.toml` sets how soon (`dirty_decay_ms`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "memdial",
    version,
    about = "A memcached proxy cluster with pluggable consistency"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node. Without --config: one node on 127.0.0.1:8000 with the
    /// embedded store.
    Serve(ServeArgs),
    /// Run every node of the config in this process (embedded stores unless
    /// --memcached).
    Cluster(ClusterArgs),
    /// Interactive client for a node's client (memcached protocol) port:
    /// memcached commands as typed, plus `show` (the cluster's table) and
    /// `help`.
    Cli(cli::CliArgs),
    /// Health check for containers: GET an admin URL; exit 0 on HTTP 200,
    /// 1 otherwise (another status, no answer within the timeout).
    Probe(probe::ProbeArgs),
    /// Print the writes in a stopped node's Raft log (linearizable and
    /// sequential modes), one per line: index, command, key, data.
    RaftLog(RaftLogArgs),
}

#[derive(clap::Args)]
struct RaftLogArgs {
    /// The node's log directory: `<data_dir>/node-<id>/log`.
    dir: PathBuf,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// proxy.yaml to read.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Which node of the config this is.
    #[arg(long, default_value_t = 1)]
    node: u32,
    /// Client address (`host:port`, the host an IP or a name), overriding
    /// the node's `client`.
    #[arg(long)]
    listen: Option<HostPort>,
    /// Admin (/metrics) address, overriding the node's `admin`.
    #[arg(long)]
    admin: Option<HostPort>,
    /// Peer (internal) address to listen on, overriding the node's `internal`.
    #[arg(long)]
    internal: Option<HostPort>,
    /// memcached `host:port` to use, or `embedded`; overrides the node's `memcached`.
    #[arg(long)]
    backend: Option<String>,
    /// Consistency mode, overriding `cluster.consistency`.
    #[arg(long, value_enum)]
    consistency: Option<Consistency>,
}

#[derive(clap::Args)]
struct ClusterArgs {
    /// proxy.yaml to read.
    #[arg(long, default_value = "proxy.yaml")]
    config: PathBuf,
    /// Use each node's configured memcached instead of the embedded store;
    /// one that is not running is started when `memcached` is on PATH.
    #[arg(long)]
    memcached: bool,
    /// Consistency mode, overriding `cluster.consistency`.
    #[arg(long, value_enum)]
    consistency: Option<Consistency>,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The message and its causes, without a backtrace: these are
            // operator errors (a bad config, a port in use), not bugs.
            eprintln!("memdial: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    // Logs go to stderr, with colours only when a person is watching.
    // openraft narrates every election and start-up at info and warn; the
    // node logs what an operator needs of that itself.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=error".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    // The client is synchronous and keeps the default signal handling
    // (Ctrl-C ends it), so it runs before the runtime and its handlers.
    let command = match cli.command {
        Command::Cli(args) => return cli::main(args),
        Command::Probe(args) => return probe::main(args),
        Command::RaftLog(args) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            for line in runtime.block_on(memdial::consistency::raft::log_lines(&args.dir))? {
                println!("{line}");
            }
            return Ok(());
        }
        other => other,
    };
    // The config is read first: it says how the runtime is built.
    let (config, start) = match command {
        Command::Serve(args) => {
            let node = args.node;
            (serve_config(args)?, Start::Serve(node))
        }
        Command::Cluster(args) => {
            let memcached = args.memcached;
            (cluster_config(&args)?, Start::Cluster { memcached })
        }
        Command::Cli(_) | Command::Probe(_) | Command::RaftLog(_) => return Ok(()),
    };
    let runtime = build_runtime(&config, &start).context("starting the tokio runtime")?;
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signals(shutdown.clone()));
        match start {
            Start::Serve(node) => serve(config, node, shutdown).await,
            Start::Cluster { memcached } => cluster(config, memcached, shutdown).await,
        }
    });
    // Connections still open past the grace period are dropped here.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    result
}

/// What `run` starts once the runtime is built.
enum Start {
    Serve(u32),
    Cluster { memcached: bool },
}

/// The runtime `runtime.worker_threads` asks for: 1 is a current-thread
/// runtime (every task on the thread that runs the node, so waking a task
/// never wakes another thread), more is tokio's work-stealing scheduler on
/// that many threads; 0 is one thread for a process that runs one node
/// (`serve`, or `cluster` of a one-node config) and one per core for a
/// process that runs several (see `docs/BENCHMARKS.md`, issue 9).
fn build_runtime(config: &Config, start: &Start) -> std::io::Result<tokio::runtime::Runtime> {
    if worker_threads(config, start) == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads(config, start))
            .enable_all()
            .build()
    }
}

/// The threads [`build_runtime`] runs `start` on.
fn worker_threads(config: &Config, start: &Start) -> usize {
    let one_node = matches!(start, Start::Serve(_)) || config.nodes.len() == 1;
    match config.runtime.worker_threads {
        0 if one_node => 1,
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// `serve`'s config: the file (or the default), with the command line's
/// overrides, validated.
fn serve_config(args: ServeArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    fit_connections_to_fds(&mut config, 1);
    if let Some(c) = args.consistency {
        config.cluster.consistency = c;
    }
    let index = config
        .nodes
        .iter()
        .position(|n| n.id == args.node)
        .with_context(|| format!("--node {}: no such node in the config", args.node))?;
    let node = &mut config.nodes[index];
    if let Some(addr) = args.listen {
        node.client = addr;
    }
    if let Some(addr) = args.admin {
        node.admin = addr;
    }
    if let Some(addr) = args.internal {
        node.internal = addr;
    }
    match args.backend.as_deref() {
        Some("embedded") => node.memcached = None,
        Some(addr) => node.memcached = Some(addr.to_string()),
        None => {}
    }
    config.validate()?;
    Ok(config)
}

async fn serve(config: Config, node: u32, shutdown: CancellationToken) -> anyhow::Result<()> {
    let node = node::Node::start(&config, node, shutdown.clone()).await?;
    node.wait().await
}

/// `cluster`'s config, with the command line's overrides.
fn cluster_config(args: &ClusterArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(&args.config)?;
    if let Some(c) = args.consistency {
        config.cluster.consistency = c;
    }
    let nodes = config.nodes.len() as u64;
    fit_connections_to_fds(&mut config, nodes);
    Ok(config)
}

async fn cluster(
    mut config: Config,
    memcached: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Held until the cluster stops; dropping them stops the memcached.
    let mut _started = Vec::new();
    if memcached {
        // The ordered modes need a memcached that never evicts (-M).
        let never_evict = config.cluster.consistency != Consistency::Eventual;
        for n in &config.nodes {
            if let Some(addr) = &n.memcached {
                _started.extend(ensure_memcached(addr, never_evict).await?);
            }
        }
    } else {
        for n in &mut config.nodes {
            n.memcached = None;
        }
    }
    let mut nodes = Vec::new();
    for id in config.nodes.iter().map(|n| n.id).collect::<Vec<_>>() {
        nodes.push(node::Node::start(&config, id, shutdown.clone()).await?);
    }
    let mut first_error = None;
    for n in nodes {
        if let Err(e) = n.wait().await {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Raises the soft limit on open files toward the hard limit (as memcached
/// does), saying what it did in one line, and returns the soft limit now
/// in force.
fn raise_fd_limit() -> Option<u64> {
    use rlimit::Resource;
    let (soft, hard) = match Resource::NOFILE.get() {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit");
            return None;
        }
    };
    // Linux refuses more than fs.nr_open (1048576 by default) even when the
    // hard limit is unlimited.
    let wanted = hard.min(1 << 20);
    match rlimit::increase_nofile_limit(wanted) {
        Ok(now) if now > soft => {
            tracing::info!(
                from = soft,
                to = now,
                hard,
                "raised the open-file soft limit"
            );
            Some(now)
        }
        Ok(now) => {
            tracing::info!(soft = now, hard, "open-file limit kept");
            Some(now)
        }
        Err(e) => {
            tracing::warn!(soft, hard, error = %e, "cannot raise the open-file soft limit");
            Some(soft)
        }
    }
}

/// Raises the open-file limit, and when `nodes` nodes' `max_connections`
/// (with what each node needs besides) cannot fit in it, warns and lowers
/// `max_connections` to what fits, so that a node at its limit refuses new
/// clients with memcached's error line instead of running out of
/// descriptors (which would leave clients unanswered and stop the admin
/// port).
fn fit_connections_to_fds(config: &mut Config, nodes: u64) {
    let Some(soft) = raise_fd_limit() else {
        return;
    };
    let wanted = config.limits.max_connections as u64;
    let reserved = config.fds_besides_clients();
    if nodes * (wanted + reserved) <= soft {
        return;
    }
    let fits = (soft / nodes.max(1)).saturating_sub(reserved).max(1);
    tracing::warn!(
        max_connections = wanted,
        open_file_limit = soft,
        reserved_per_node = reserved,
        serving_at_most = fits,
        "limits.max_connections does not fit in the open-file limit; raise the hard limit \
         (ulimit -Hn) or lower max_connections"
    );
    config.limits.max_connections = usize::try_from(fits).unwrap_or(usize::MAX);
}

/// Starts a memcached on `addr` unless one already answers there, with
/// `-M` if `never_evict`.
async fn ensure_memcached(
    addr: &str,
    never_evict: bool,
) -> anyhow::Result<Option<tokio::process::Child>> {
    use std::time::Duration;
    if tokio::net::TcpStream::connect(addr).await.is_ok() {
        tracing::info!(%addr, "using the memcached already running");
        return Ok(None);
    }
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("memcached address {addr} is not host:port"))?;
    let mut cmd = tokio::process::Command::new("memcached");
    cmd.args(["-l", host, "-p", port, "-U", "0", "-m", "64"])
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null());
    if never_evict {
        cmd.arg("-M");
    }
    if is_root() {
        cmd.args(["-u", "root"]);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting memcached for {addr} (is it on PATH?)"))?;
    for _ in 0..250 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            tracing::info!(%addr, "started memcached");
            return Ok(Some(child));
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("memcached for {addr} exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("memcached for {addr} did not start listening")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// SIGTERM or a first Ctrl-C: graceful shutdown. A second Ctrl-C: exit now.
async fn on_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down gracefully"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down gracefully (again to exit now)"),
    }
    shutdown.cancel();
    int.recv().await;
    tracing::warn!("second SIGINT: exiting now");
    std::process::exit(130);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 0 is one thread for a process of one node, `serve` of a cluster's
    /// node included; one per core for `cluster` of several; a number is
    /// taken as given.
    #[test]
    fn worker_threads_follow_the_nodes_a_process_runs() {
        let mut three = Config::default();
        let node = three.nodes[0].clone();
        three.nodes = vec![node.clone(), node.clone(), node];
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cluster = Start::Cluster { memcached: false };
        assert_eq!(worker_threads(&three, &Start::Serve(2)), 1);
        assert_eq!(worker_threads(&Config::default(), &cluster), 1);
        assert_eq!(worker_threads(&three, &cluster), cores);
        three.runtime.worker_threads = 3;
        assert_eq!(worker_threads(&three, &Start::Serve(2)), 3);
        assert_eq!(worker_threads(&three, &cluster), 3);
    }
}
