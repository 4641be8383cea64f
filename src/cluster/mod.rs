//! The peers of a node: the internal port (framed binary protocol with an
//! authenticated handshake), one long-lived outbound link per peer that
//! pushes this node's replication log and heartbeats and runs periodic
//! anti-entropy (digest exchange, then repair of the buckets that differ),
//! an inbound handler per peer that applies what arrives, and the failure
//! detector that marks peers up / suspect / down.
//!
//! What a replicated write means is not decided here: entries are handed to
//! a [`Replica`] (implemented by `consistency`).
//!
//! May use: `protocol`, `config`, `metrics`.

pub mod backlog;
mod digest;
mod inbound;
mod link;
mod peers;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::BoxFuture;
pub use backlog::Backlog;
use peers::{ClusterMetrics, Peers};
pub use peers::{Liveness, PeerView};
pub use wire::{Entry, Op, Version};

/// The local replica, as the cluster sees it.
pub trait Replica: Send + Sync + 'static {
    /// Applies entries received from a peer; returns how many changed this
    /// replica (a newer version won).
    fn apply<'a>(&'a self, entries: Vec<Entry>) -> BoxFuture<'a, Result<usize, String>>;
    /// Every key the replica holds, for a full resync.
    fn keys(&self) -> BoxFuture<'_, Result<Vec<Bytes>, String>>;
    /// The current state of these keys; absent keys are left out.
    fn read<'a>(&'a self, keys: &'a [Bytes]) -> BoxFuture<'a, Result<Vec<Entry>, String>>;
    /// Names the backing store's lifetime: a change means it restarted and
    /// lost its data.
    fn store_instance(&self) -> BoxFuture<'_, Result<String, String>>;
}

/// What the cluster layer of a node needs to know.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub cluster_name: String,
    pub secret: String,
    pub node_id: u32,
    pub peers: Vec<(u32, SocketAddr)>,
    pub heartbeat_interval: Duration,
    pub suspect_after: Duration,
    pub down_after: Duration,
    pub connect_timeout: Duration,
    pub reconnect_max: Duration,
    /// Most entries in one frame.
    pub batch_max: usize,
    /// How often the backing store is checked for a restart.
    pub store_check_interval: Duration,
    /// How often each outbound link compares digests with its peer (±20%);
    /// `None` never does.
    pub anti_entropy_interval: Option<Duration>,
    /// How long a tombstone lives after its delete; anti-entropy leaves
    /// older ones out.
    pub tombstone_grace: Duration,
}

/// The cluster side of one node.
pub struct Cluster {
    settings: ClusterSettings,
    backlog: Arc<Backlog>,
    peers: Peers,
    metrics: ClusterMetrics,
    /// Requests served, reported in heartbeats.
    requests_total: Box<dyn Fn() -> u64 + Send + Sync>,
    /// `requests_total` as of the last metrics refresh: acks and heartbeats
    /// read this instead of summing the counters for every frame.
    requests_seen: std::sync::atomic::AtomicU64,
    /// Bumped when the local store lost its data: inbound links close so
    /// that every peer reconnects and sends a full resync.
    resync: watch::Sender<u64>,
    /// Held while listing the store's keys for a resync or anti-entropy:
    /// memcached runs one key listing (`lru_crawler`) at a time and answers
    /// `BUSY` to a second, so this node's links take turns.
    listing: tokio::sync::Mutex<()>,
}

impl Cluster {
    pub fn new(
        settings: ClusterSettings,
        backlog: Arc<Backlog>,
        registry: &prometheus::Registry,
        requests_total: Box<dyn Fn() -> u64 + Send + Sync>,
    ) -> prometheus::Result<Arc<Cluster>> {
        let metrics = ClusterMetrics::register(registry)?;
        let peers = Peers::new(&settings);
        Ok(Arc::new(Cluster {
            settings,
            backlog,
            peers,
            metrics,
            requests_total,
            requests_seen: std::sync::atomic::AtomicU64::new(0),
            resync: watch::Sender::new(0),
            listing: tokio::sync::Mutex::new(()),
        }))
    }

    /// Every key of the local replica, one listing at a time.
    async fn list_keys(&self, replica: &dyn Replica) -> Result<Vec<Bytes>, String> {
        let _turn = self.listing.lock().await;
        replica.keys().await
    }

    pub fn node_id(&self) -> u32 {
        self.settings.node_id
    }

    pub fn backlog(&self) -> &Backlog {
        &self.backlog
    }

    /// Every peer as the failure detector sees it now.
    pub fn view(&self) -> Vec<PeerView> {
        self.peers.view(&self.settings, self.backlog.head())
    }

    /// Serves the internal port and keeps a link to every peer until
    /// `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        replica: Arc<dyn Replica>,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let tracker = TaskTracker::new();
        for &(id, addr) in &self.settings.peers {
            tracker.spawn(link::run(
                self.clone(),
                id,
                addr,
                replica.clone(),
                shutdown.clone(),
            ));
        }
        tracker.spawn(self.clone().watch_store(replica.clone(), shutdown.clone()));
        tracker.spawn(self.clone().refresh_metrics(shutdown.clone()));
        let accepted =
            inbound::serve(self.clone(), listener, replica, shutdown.clone(), &tracker).await;
        tracker.close();
        tracker.wait().await;
        accepted
    }

    /// Checks the backing store's identity; when it changed (restarted
    /// empty), forgets every peer cursor so the peers resync this replica.
    async fn watch_store(self: Arc<Self>, replica: Arc<dyn Replica>, shutdown: CancellationToken) {
        let mut known: Option<String> = None;
        let mut tick = tokio::time::interval(self.settings.store_check_interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Ok(now) = replica.store_instance().await else {
                continue;
            };
            match &known {
                Some(k) if *k != now => {
                    tracing::warn!(before = %k, now = %now, "backing store restarted; asking every peer for a full resync");
                    self.peers.forget_cursors();
                    self.resync.send_modify(|g| *g += 1);
                    self.metrics.store_restarts.inc();
                }
                _ => {}
            }
            known = Some(now);
        }
    }

    async fn refresh_metrics(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.heartbeat_interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.requests_seen.store(
                (self.requests_total)(),
                std::sync::atomic::Ordering::Relaxed,
            );
            self.metrics.backlog_entries.set(self.backlog.len() as i64);
            for p in self.view() {
                let id = p.id.to_string();
                self.metrics
                    .peer_up
                    .with_label_values(&[&id])
                    .set(i64::from(p.liveness == Liveness::Up));
                if let Some(rtt) = p.rtt {
                    self.metrics
                        .peer_rtt
                        .with_label_values(&[&id])
                        .set(rtt.as_secs_f64());
                }
                if let Some(lag) = p.lag {
                    self.metrics
                        .peer_lag
                        .with_label_values(&[&id])
                        .set(lag as i64);
                }
            }
        }
    }

    /// What this node says about itself in heartbeats and acks.
    fn health(&self) -> wire::Health {
        wire::Health {
            requests_total: self
                .requests_seen
                .load(std::sync::atomic::Ordering::Relaxed),
            log_head: self.backlog.head(),
        }
    }

    /// `stats cluster` lines: this node, then every peer.
    pub fn stats(&self, mode: &str) -> Vec<(String, String)> {
        let mut out = vec![
            ("node_id".to_string(), self.settings.node_id.to_string()),
            ("cluster".to_string(), self.settings.cluster_name.clone()),
            ("mode".to_string(), mode.to_string()),
            ("log_head".to_string(), self.backlog.head().to_string()),
            (
                "backlog_entries".to_string(),
                self.backlog.len().to_string(),
            ),
            (
                "requests_total".to_string(),
                (self.requests_total)().to_string(),
            ),
            ("peers".to_string(), self.settings.peers.len().to_string()),
        ];
        for p in self.view() {
            let mut line = |name: &str, value: String| {
                out.push((format!("peer:{}:{name}", p.id), value));
            };
            line("addr", p.addr.to_string());
            line("state", p.liveness.as_str().to_string());
            line(
                "last_heard_ms",
                p.last_heard
                    .map_or("-".into(), |d| d.as_millis().to_string()),
            );
            line(
                "rtt_us",
                p.rtt.map_or("-".into(), |d| d.as_micros().to_string()),
            );
            line("lag", p.lag.map_or("-".into(), |l| l.to_string()));
            line("request_rate", format!("{:.1}", p.request_rate));
            line("applied", p.applied.to_string());
            line("repaired", p.repaired.to_string());
        }
        out
    }
}
