//! The client-facing side of a node: the listener with its connection
//! limit and accept backoff, one task per connection, and shutdown with a
//! deadline.
//!
//! May use: `protocol`, `consistency`, `config`, `metrics`. Never `backend`
//! directly: every data command goes through the consistency pipeline.

mod connection;
mod stats;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::consistency::Pipeline;
use crate::metrics::Metrics;
use crate::protocol::Limits;

/// What the client side of a node needs to know.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub node_id: u32,
    pub limits: Limits,
    pub max_connections: usize,
    pub max_pipeline_depth: usize,
    pub idle_timeout: Option<Duration>,
    /// Close a client whose replies make no progress this long.
    pub write_stall_timeout: Option<Duration>,
    /// Unwritten reply bytes of one connection before it is written out
    /// and not read further.
    pub connection_reply_buffer_bytes: usize,
    /// Reply bytes in flight across the node (see `Shared::reply_bytes`).
    pub node_reply_buffer_bytes: usize,
    pub shutdown_grace: Duration,
    /// Reported by `stats`.
    pub consistency: &'static str,
    pub embedded_memory_bytes: usize,
}

/// State shared by every connection of one node.
pub(crate) struct Shared {
    pub settings: ServerSettings,
    pub pipeline: Arc<dyn Pipeline>,
    pub metrics: Arc<Metrics>,
    pub local_addr: SocketAddr,
    pub verbosity: AtomicU32,
    pub stats_baseline: stats::Baseline,
    /// Permits are bytes of replies in flight: a connection takes them
    /// before running requests (its estimate of their replies, trued up
    /// when they are known) and gives them back once the replies are
    /// written.
    pub reply_bytes: Semaphore,
}

/// What `version` answers: memcached's format, naming memdial. Clients read
/// the leading `major.minor.patch`, so it is the memcached release whose
/// protocol memdial speaks.
fn version() -> String {
    format!("1.6.18-memdial-{}", env!("CARGO_PKG_VERSION"))
}

/// Refused connections being answered at once; more are closed unanswered.
const MAX_REFUSING: usize = 32;

/// The memcached answer to one connection too many.
const TOO_MANY_CONNECTIONS: &[u8] = b"ERROR Too many open connections\r\n";

/// Serves clients on `listener` until `shutdown` is cancelled, then stops
/// accepting, lets connections finish the requests they hold for up to the
/// grace period, and returns.
pub async fn run(
    listener: TcpListener,
    settings: ServerSettings,
    pipeline: Arc<dyn Pipeline>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local_addr = listener.local_addr()?;
    let grace = settings.shutdown_grace;
    let limit = Arc::new(Semaphore::new(settings.max_connections));
    let reply_bytes = Semaphore::new(settings.node_reply_buffer_bytes);
    let shared = Arc::new(Shared {
        settings,
        pipeline,
        metrics,
        local_addr,
        verbosity: AtomicU32::new(0),
        stats_baseline: stats::Baseline::default(),
        reply_bytes,
    });
    watch_readiness(&shared.metrics, &limit, shared.settings.max_connections);
    let tracker = TaskTracker::new();
    let conn_ids = AtomicU64::new(1);
    tracing::info!(addr = %local_addr, "listening for clients");

    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut backoff = Duration::from_millis(1);
    // Failed accepts since the last success: logged when failing starts and
    // when it ends, not at every attempt.
    let mut failed_accepts = 0u64;
    // Refusing at the connection limit: logged once until one is served.
    let mut at_limit = false;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                if failed_accepts > 0 {
                    tracing::info!(failed_accepts, "accepting clients again");
                    failed_accepts = 0;
                    shared.metrics.readiness.set("listener", Ok(()));
                }
                backoff = Duration::from_millis(1);
                a
            }
            Err(e) => {
                let reason = format!("accept failing ({e})");
                shared.metrics.readiness.set("listener", Err(reason));
                // Out of descriptors and the like: connected clients and the
                // admin port go on; wait, then try again.
                if failed_accepts == 0 {
                    tracing::warn!(error = %e, "accept failing; backing off until it succeeds");
                }
                failed_accepts += 1;
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            shared.metrics.connections_rejected.inc();
            if !at_limit {
                tracing::warn!(%peer, "connection limit reached; refusing (logged again after one is served)");
                at_limit = true;
            }
            // Refusals in flight are bounded too (each holds a descriptor);
            // past that the connection is just closed.
            if let Ok(refusal) = refusing.clone().try_acquire_owned() {
                tracker.spawn(async move {
                    refuse(stream).await;
                    drop(refusal);
                });
            }
            continue;
        };
        at_limit = false;
        let conn_id = conn_ids.fetch_add(1, Ordering::Relaxed);
        // At debug: an enabled span is entered and left on every poll of
        // the connection, which cost about 5 % of the proxy's instructions
        // per request at depth 1. The connection's own info lines name
        // their peer and id themselves.
        let span = tracing::debug_span!("conn", %peer, conn_id);
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(
            async move {
                let _permit = permit;
                shared.metrics.connections_total.inc();
                shared.metrics.connections_current.inc();
                // Held here and run by reference: a `run(self)` future
                // would keep the connection twice.
                let mut connection = connection::Connection::new(stream, &shared, conn_id);
                match connection.run(&shutdown).await {
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        tracing::info!(
                            %peer,
                            conn_id,
                            stalled_ms = shared.settings.write_stall_timeout.map_or(0, |d| d.as_millis() as u64),
                            "client takes none of its replies; closed"
                        );
                    }
                    Err(e) => tracing::debug!(error = %e, "connection ended with an error"),
                    Ok(()) => {}
                }
                drop(connection);
                shared.metrics.connections_current.dec();
            }
            .instrument(span),
        );
    }
    drop(listener);
    let draining = "shutting down; not accepting connections".to_string();
    shared.metrics.readiness.set("listener", Err(draining));
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            open = tracker.len(),
            grace_ms = grace.as_millis() as u64,
            "shutdown grace period over; dropping connections"
        );
    }
    tracing::info!(addr = %local_addr, "client listener stopped");
    Ok(())
}

/// Makes the node unready while every connection slot is taken: the next
/// client would be refused.
fn watch_readiness(metrics: &Metrics, limit: &Arc<Semaphore>, max: usize) {
    let limit = Arc::downgrade(limit);
    metrics.readiness.add_source(move || {
        let full = limit.upgrade().is_some_and(|l| l.available_permits() == 0);
        crate::metrics::Verdict {
            reasons: full
                .then(|| format!("connections: all {max} in use; new ones are refused"))
                .into_iter()
                .collect(),
            notes: Vec::new(),
        }
    });
}

async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(TOO_MANY_CONNECTIONS).await?;
        stream.shutdown().await
    })
    .await;
}
