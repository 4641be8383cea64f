//! One node, wired from its config: backend → pipeline → client server,
//! plus the admin endpoint. The single place where the parts meet.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, EmbeddedStore, MemcachedBackend, MemcachedOptions};
use crate::cluster::{Cluster, ClusterSettings, Handler};
use crate::config::{Config, Consistency, HostPort};
use crate::consistency::eventual::{self, Backlog, Eventual, EventualSettings};
use crate::consistency::raft::{self, RaftMode, RaftSettings};
use crate::consistency::{Local, Pipeline};
use crate::metrics::{self, Metrics};
use crate::server::{self, ServerSettings};

/// A running node. Dropping it does not stop it: cancel the token given to
/// [`Node::start`], then [`Node::wait`].
pub struct Node {
    pub id: u32,
    pub client_addr: std::net::SocketAddr,
    pub admin_addr: std::net::SocketAddr,
    tasks: Vec<JoinHandle<std::io::Result<()>>>,
}

impl Node {
    /// Binds the node's ports and starts serving. Bind errors are returned
    /// before anything runs.
    pub async fn start(
        config: &Config,
        id: u32,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Node> {
        let node = config.node(id)?.clone();
        let t = &config.timeouts;
        let metrics = Arc::new(Metrics::with_slowest(slowest_request(config)));
        let backend: Arc<dyn Backend> = match &node.memcached {
            Some(addr) => Arc::new(MemcachedBackend::new(
                addr.clone(),
                MemcachedOptions {
                    multiplexed_connections: config.backend.multiplexed_connections,
                    pool_size: config.backend.pool_size,
                    join_gets: config.backend.join_gets,
                    connect_timeout: Duration::from_millis(t.backend_connect_timeout_ms),
                    request_timeout: Duration::from_millis(t.backend_request_timeout_ms),
                    pool_wait_timeout: Duration::from_millis(t.backend_pool_wait_ms),
                },
            )),
            None => Arc::new(EmbeddedStore::new(config.limits.embedded_memory_bytes)),
        };
        // A host name is resolved here, once; the first of its addresses
        // that binds is used.
        let client = listen(&node.client)
            .await
            .with_context(|| format!("node {id}: binding client address {}", node.client))?;
        let admin = listen(&node.admin)
            .await
            .with_context(|| format!("node {id}: binding admin address {}", node.admin))?;
        let (pipeline, cluster) = match config.nodes.len() {
            1 => (
                Arc::new(Local::new(backend.clone(), metrics.clone())) as Arc<dyn Pipeline>,
                None,
            ),
            _ => {
                let internal = listen(&node.internal).await.with_context(|| {
                    format!("node {id}: binding internal address {}", node.internal)
                })?;
                let (pipeline, parts) =
                    cluster_pipeline(config, id, &backend, &metrics, &shutdown).await?;
                (pipeline, Some((parts, internal)))
            }
        };
        let client_addr = client.local_addr()?;
        let admin_addr = admin.local_addr()?;
        let settings = ServerSettings {
            node_id: id,
            limits: config.protocol_limits(),
            max_connections: config.limits.max_connections,
            max_pipeline_depth: config.limits.max_pipeline_depth,
            idle_timeout: t.idle_timeout(),
            write_stall_timeout: t.write_stall_timeout(),
            connection_reply_buffer_bytes: config.limits.connection_reply_buffer_bytes,
            node_reply_buffer_bytes: config.limits.node_reply_buffer_bytes,
            shutdown_grace: t.shutdown_grace(),
            consistency: config.cluster.consistency.as_str(),
            embedded_memory_bytes: config.limits.embedded_memory_bytes,
        };
        let refresh = {
            let (metrics, backend) = (metrics.clone(), backend.clone());
            Arc::new(move || {
                if let Some(p) = backend.pool_status() {
                    let g = &metrics.backend_pool;
                    g.with_label_values(&["max"]).set(p.max_size as i64);
                    g.with_label_values(&["open"]).set(p.size as i64);
                    g.with_label_values(&["idle"]).set(p.available as i64);
                    let joined = &metrics.backend_joined_gets;
                    joined.inc_by(p.joined_gets.saturating_sub(joined.get()));
                }
            })
        };
        let mut tasks = Vec::new();
        {
            let pipeline = Arc::downgrade(&pipeline);
            metrics.readiness.add_source(move || {
                pipeline
                    .upgrade()
                    .map(|p| p.readiness())
                    .unwrap_or_default()
            });
        }
        if let Some(addr) = &node.memcached {
            metrics
                .readiness
                .set("backend", Err(format!("memcached {addr} not probed yet")));
            tasks.push(tokio::spawn(probe_backend(
                backend.clone(),
                addr.clone(),
                metrics.clone(),
                shutdown.clone(),
            )));
        }
        if let Some((parts, internal)) = cluster {
            tasks.push(tokio::spawn(parts.cluster.run(
                internal,
                parts.handler,
                shutdown.clone(),
            )));
            tasks.push(tokio::spawn(parts.mode));
        }
        tasks.push(tokio::spawn(server::run(
            client,
            settings,
            pipeline,
            metrics.clone(),
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(metrics::serve_admin(
            admin, metrics, refresh, shutdown,
        )));
        // Every port is bound and every part is running.
        tracing::info!(
            node = id,
            client = %client_addr,
            admin = %admin_addr,
            backend = backend.kind(),
            memcached = node.memcached.as_deref().unwrap_or("-"),
            consistency = config.cluster.consistency.as_str(),
            "node ready"
        );
        Ok(Node {
            id,
            client_addr,
            admin_addr,
            tasks,
        })
    }

    /// Waits until every part of the node has stopped.
    pub async fn wait(self) -> anyhow::Result<()> {
        for task in self.tasks {
            task.await
                .context("node task panicked")?
                .with_context(|| format!("node {}", self.id))?;
        }
        tracing::info!(node = self.id, "node stopped");
        Ok(())
    }
}

/// Connections the kernel queues for `accept`, as memcached asks for
/// (`-b 1024`): a burst of clients connecting at once is taken in one go
/// instead of waiting on SYN retransmits.
const LISTEN_BACKLOG: u32 = 1024;

/// Binds `addr` (the first of its resolved addresses that binds) with
/// [`LISTEN_BACKLOG`].
async fn listen(addr: &HostPort) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr.target()).await? {
        let socket = if a.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // As std's and tokio's bind do: a restarted node can take its port
        // back while old connections linger in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the name resolves to no address",
        )
    }))
}

/// What runs beside the client server on a node with peers.
struct ClusterParts {
    /// The transport.
    cluster: Arc<Cluster>,
    /// The mode's side of the transport.
    handler: Arc<dyn Handler>,
    /// The mode's own tasks (replication, store watch), until shutdown.
    mode: crate::BoxFuture<'static, std::io::Result<()>>,
}

/// The pipeline of a node with peers, and the cluster parts it runs on.
/// A new consistency mode is chosen here: it implements
/// [`Pipeline`] for clients and [`Handler`] for what peers send it.
async fn cluster_pipeline(
    config: &Config,
    id: u32,
    backend: &Arc<dyn Backend>,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Arc<dyn Pipeline>, ClusterParts)> {
    let c = &config.cluster;
    let ms = Duration::from_millis;
    let settings = ClusterSettings {
        cluster_name: c.name.clone(),
        secret: c.secret.clone(),
        node_id: id,
        peers: config
            .nodes
            .iter()
            .filter(|n| n.id != id)
            .map(|n| (n.id, n.internal.clone()))
            .collect(),
        heartbeat_interval: ms(c.heartbeat_interval_ms),
        suspect_after: ms(c.suspect_after_ms),
        down_after: ms(c.down_after_ms),
        connect_timeout: ms(c.peer_connect_timeout_ms),
        reconnect_max: ms(c.reconnect_max_ms),
    };
    let requests = {
        let m = metrics.clone();
        Box::new(move || total_requests(&m))
    };
    match c.consistency {
        Consistency::Eventual => {
            let cluster = Cluster::new(
                settings,
                eventual::messages::TAG,
                &metrics.registry,
                requests,
            )
            .context("registering cluster metrics")?;
            let backlog = Arc::new(Backlog::new(
                rand::random(),
                c.replication_backlog,
                c.replication_backlog_bytes,
            ));
            let settings = EventualSettings {
                batch_max: c.replication_batch,
                linger: ms(c.replication_linger_ms),
                store_check_interval: ms(c.store_check_interval_ms),
                anti_entropy_interval: (c.anti_entropy_interval_ms > 0)
                    .then(|| ms(c.anti_entropy_interval_ms)),
                tombstone_grace: ms(c.tombstone_grace_ms),
                heartbeat_interval: ms(c.heartbeat_interval_ms),
            };
            let eventual = Eventual::new(
                backend.clone(),
                metrics.clone(),
                cluster.clone(),
                backlog,
                settings,
            )
            .context("registering eventual metrics")?;
            let parts = ClusterParts {
                cluster,
                handler: eventual.clone(),
                mode: Box::pin(eventual.clone().run(shutdown.clone())),
            };
            Ok((eventual, parts))
        }
        Consistency::Linearizable | Consistency::Sequential => {
            let sequential = c.consistency == Consistency::Sequential;
            let tag = if sequential {
                raft::command::SEQUENTIAL_TAG
            } else {
                raft::command::LINEARIZABLE_TAG
            };
            let cluster = Cluster::new(settings, tag, &metrics.registry, requests)
                .context("registering cluster metrics")?;
            let settings = RaftSettings {
                sequential,
                data_dir: config.data_dir(id)?,
                members: config
                    .nodes
                    .iter()
                    .map(|n| (n.id, n.internal.to_string()))
                    .collect(),
                cluster_name: c.name.clone(),
                heartbeat_interval: ms(c.raft_heartbeat_interval_ms),
                election_timeout_min: ms(c.election_timeout_min_ms),
                election_timeout_max: ms(c.election_timeout_max_ms),
                request_timeout: ms(c.request_timeout_ms),
                snapshot_after: c.snapshot_after_entries,
                keep_after_snapshot: c.log_kept_after_snapshot,
                store_check_interval: ms(c.store_check_interval_ms),
                expired_kept: ms(c.expired_kept_ms),
                item_size_max: config.limits.item_size_max,
            };
            backend.never_evict().await.with_context(|| {
                format!(
                    "node {id}: {} needs a store that never evicts",
                    c.consistency.as_str()
                )
            })?;
            let mode = RaftMode::start(
                backend.clone(),
                cluster.clone(),
                &metrics.registry,
                settings,
            )
            .await
            .with_context(|| format!("node {id}: starting {}", c.consistency.as_str()))?;
            let parts = ClusterParts {
                cluster,
                handler: mode.clone(),
                mode: Box::pin(mode.clone().run(shutdown.clone())),
            };
            Ok((mode, parts))
        }
    }
}

/// Client requests served, summed over every command and outcome.
fn total_requests(metrics: &Metrics) -> u64 {
    metrics::Counts::of(&metrics.requests).total()
}

/// The longest a client request can take by the configured timeouts, for
/// the latency buckets: a backend call may wait for a pooled connection,
/// then connect, then run to its deadline, and a read-modify-write
/// (eventual mode's `incr`, `cas`, `append`, …) makes two calls.
fn slowest_request(config: &Config) -> Duration {
    let t = &config.timeouts;
    let call = t.backend_pool_wait_ms + t.backend_connect_timeout_ms + t.backend_request_timeout_ms;
    Duration::from_millis(2 * call)
}

/// How often a memcached backend is probed for readiness.
const BACKEND_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Probes the memcached backend (`stats` on a connection of its own,
/// outside the pool) every [`BACKEND_PROBE_INTERVAL`] until `shutdown`,
/// and sets the node's `backend` readiness condition from the outcome.
async fn probe_backend(
    backend: Arc<dyn Backend>,
    addr: String,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut tick = tokio::time::interval(BACKEND_PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_reachable = None;
    loop {
        let probed = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            probed = async {
                tick.tick().await;
                backend.instance().await
            } => probed,
        };
        let reachable = probed.is_ok();
        match &probed {
            Err(e) if was_reachable != Some(false) => {
                tracing::warn!(memcached = %addr, error = %e, "backend probe failed; not ready")
            }
            Ok(_) if was_reachable == Some(false) => {
                tracing::info!(memcached = %addr, "backend probe answered; ready again")
            }
            _ => {}
        }
        was_reachable = Some(reachable);
        metrics.readiness.set(
            "backend",
            probed
                .map(|_| ())
                .map_err(|e| format!("memcached {addr} unreachable ({e})")),
        );
    }
}
