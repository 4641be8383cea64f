//! One node, wired from its config: backend → pipeline → client server,
//! plus the admin endpoint. The single place where the parts meet.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, EmbeddedStore, MemcachedBackend, MemcachedOptions};
use crate::config::Config;
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
        let pipeline: Arc<dyn Pipeline> = Arc::new(Local::new(backend.clone(), metrics.clone()));

        let client = TcpListener::bind(node.client)
            .await
            .with_context(|| format!("node {id}: binding client address {}", node.client))?;
        let admin = TcpListener::bind(node.admin)
            .await
            .with_context(|| format!("node {id}: binding admin address {}", node.admin))?;
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
        let tasks = vec![
            tokio::spawn(server::run(
                client,
                settings,
                pipeline,
                metrics.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(metrics::serve_admin(admin, metrics, refresh, shutdown)),
        ];
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
