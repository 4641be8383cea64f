//! One node, wired from its config: backend → pipeline → client server,
//! plus the admin endpoint. The single place where the parts meet.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, EmbeddedStore, MemcachedBackend, MemcachedOptions};
use crate::cluster::{Cluster, ClusterSettings, Handler};
use crate::config::{Config, Consistency};
use crate::consistency::eventual::{self, Backlog, Eventual, EventualSettings};
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
        let metrics = Arc::new(Metrics::new());
        let t = &config.timeouts;
        let backend: Arc<dyn Backend> = match &node.memcached {
            Some(addr) => Arc::new(MemcachedBackend::new(
                addr.clone(),
                MemcachedOptions {
                    pool_size: config.backend.pool_size,
                    connect_timeout: Duration::from_millis(t.backend_connect_timeout_ms),
                    request_timeout: Duration::from_millis(t.backend_request_timeout_ms),
                    pool_wait_timeout: Duration::from_millis(t.backend_pool_wait_ms),
                },
            )),
            None => Arc::new(EmbeddedStore::new(config.limits.embedded_memory_bytes)),
        };
        let client = TcpListener::bind(node.client)
            .await
            .with_context(|| format!("node {id}: binding client address {}", node.client))?;
        let admin = TcpListener::bind(node.admin)
            .await
            .with_context(|| format!("node {id}: binding admin address {}", node.admin))?;
        let (pipeline, cluster) = match config.nodes.len() {
            1 => (
                Arc::new(Local::new(backend.clone(), metrics.clone())) as Arc<dyn Pipeline>,
                None,
            ),
            _ => {
                let internal = TcpListener::bind(node.internal).await.with_context(|| {
                    format!("node {id}: binding internal address {}", node.internal)
                })?;
                let (pipeline, parts) =
                    cluster_pipeline(config, id, &backend, &metrics, &shutdown)?;
                (pipeline, Some((parts, internal)))
            }
        };
        let client_addr = client.local_addr()?;
        let admin_addr = admin.local_addr()?;
        tracing::info!(
            node = id,
            client = %client_addr,
            admin = %admin_addr,
            backend = backend.kind(),
            memcached = node.memcached.as_deref().unwrap_or("-"),
            consistency = config.cluster.consistency.as_str(),
            "node starting"
        );

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
                }
            })
        };
        let mut tasks = Vec::new();
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
fn cluster_pipeline(
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
            .map(|n| (n.id, n.internal))
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
        mode => anyhow::bail!(
            "cluster.consistency: {} is not implemented yet; eventual is",
            mode.as_str()
        ),
    }
}

/// Client requests served, summed over every command and outcome.
fn total_requests(metrics: &Metrics) -> u64 {
    use prometheus::core::Collector;
    metrics
        .requests
        .collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}
