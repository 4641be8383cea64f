//! The transport between the nodes of a cluster, and nothing of any mode:
//! the peer table, the internal port (framed binary protocol with an
//! authenticated handshake), one long-lived outbound link per peer with
//! reconnect and backoff, heartbeats and the failure detector that marks
//! peers up / suspect / down, and per-peer metrics.
//!
//! A consistency mode talks to its peers through it without this module
//! knowing its message types: it sends opaque bodies to a peer
//! ([`PeerLink::send`], in order), asks and awaits an answer with a
//! deadline ([`Cluster::request`], [`PeerLink::request`]), and receives
//! what peers send it through its [`Handler`]. Every body travels tagged
//! with the mode's [`ModeTag`]; a peer running another mode or another
//! version of its messages has them refused, logged and counted, and the
//! link stays up.
//!
//! May use: `config`, `metrics`.

mod inbound;
mod link;
mod peers;
pub mod wire;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::BoxFuture;
use crate::config::HostPort;
pub use link::PeerLink;
use peers::{ClusterMetrics, Peers};
pub use peers::{Liveness, PeerView};
pub use wire::ModeTag;

/// A consistency mode's side of the internal port: what it does with what
/// its peers send it. Messages from one peer are handled one at a time, in
/// the order the peer sent them. A request starts once every message the
/// peer sent before it has been handled, then runs beside other requests
/// and later messages, so its answer may overtake theirs.
pub trait Handler: Send + Sync + 'static {
    /// A one-way message from `peer`. An error ends that peer's
    /// connection; the peer reconnects (and a mode that needs to can start
    /// over from what it learns then).
    fn on_message(&self, peer: u32, body: Bytes) -> BoxFuture<'_, Result<(), String>>;

    /// A request from `peer`; the answer goes back to it. An error is
    /// answered as a rejection, and the connection stays up.
    fn on_request(&self, peer: u32, body: Bytes) -> BoxFuture<'_, Result<Bytes, String>>;
}

/// Why a message or request did not reach a peer's mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// No link to the peer, or it broke: what was sent may be lost.
    #[error("link to peer {0} is down")]
    Down(u32),
    /// The link's queue is full (only from a `try_` call).
    #[error("link to peer {0} is busy")]
    Busy(u32),
    #[error("peer {0} did not answer in time")]
    Timeout(u32),
    /// The peer's transport or mode refused the request.
    #[error("peer {peer} rejected the request: {reason}")]
    Rejected { peer: u32, reason: String },
    #[error("node {0} is not a peer")]
    Unknown(u32),
}

/// What the transport of a node needs to know.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub cluster_name: String,
    pub secret: String,
    pub node_id: u32,
    /// Each peer's internal address; a host name is resolved at every
    /// (re)connect.
    pub peers: Vec<(u32, HostPort)>,
    pub heartbeat_interval: Duration,
    pub suspect_after: Duration,
    pub down_after: Duration,
    pub connect_timeout: Duration,
    pub reconnect_max: Duration,
}

/// The transport side of one node.
pub struct Cluster {
    settings: ClusterSettings,
    /// The mode whose messages this node sends and takes.
    tag: ModeTag,
    peers: Peers,
    metrics: ClusterMetrics,
    /// The current outbound connection to each peer, if up.
    links: HashMap<u32, watch::Sender<Option<PeerLink>>>,
    /// Per peer: the end signal of its current inbound connection, and the
    /// turn that connection holds while it runs.
    inbound: HashMap<
        u32,
        (
            std::sync::Mutex<CancellationToken>,
            Arc<tokio::sync::Mutex<()>>,
        ),
    >,
    /// Requests served, reported in heartbeats.
    requests_total: Box<dyn Fn() -> u64 + Send + Sync>,
    /// `requests_total` as of the last metrics refresh: heartbeats read
    /// this instead of summing the counters for every frame.
    requests_seen: AtomicU64,
}

impl Cluster {
    pub fn new(
        settings: ClusterSettings,
        tag: ModeTag,
        registry: &prometheus::Registry,
        requests_total: Box<dyn Fn() -> u64 + Send + Sync>,
    ) -> prometheus::Result<Arc<Cluster>> {
        let metrics = ClusterMetrics::register(registry)?;
        let peers = Peers::new(&settings);
        let links = settings
            .peers
            .iter()
            .map(|(id, _)| (*id, watch::Sender::new(None)))
            .collect();
        let inbound = settings
            .peers
            .iter()
            .map(|&(id, _)| (id, Default::default()))
            .collect();
        Ok(Arc::new(Cluster {
            settings,
            tag,
            peers,
            metrics,
            links,
            inbound,
            requests_total,
            requests_seen: AtomicU64::new(0),
        }))
    }

    pub fn node_id(&self) -> u32 {
        self.settings.node_id
    }

    /// The ids of every peer, in the config's order.
    pub fn peer_ids(&self) -> Vec<u32> {
        self.settings.peers.iter().map(|(id, _)| *id).collect()
    }

    /// Every peer as the failure detector sees it now.
    pub fn view(&self) -> Vec<PeerView> {
        self.peers.view(&self.settings)
    }

    /// The link to `peer` if it is up now.
    pub fn try_link(&self, peer: u32) -> Option<PeerLink> {
        let link = self.links.get(&peer)?.borrow().clone()?;
        (!link.closed.is_cancelled()).then_some(link)
    }

    /// For a new inbound connection from `peer`: ends the one before (its
    /// token is cancelled) and returns this one's end signal and the turn
    /// to hold while it runs. The caller takes the turn, so it starts once
    /// the old connection has stopped.
    fn inbound_turn(&self, peer: u32) -> (CancellationToken, Arc<tokio::sync::Mutex<()>>) {
        let Some((current, turn)) = self.inbound.get(&peer) else {
            // Handshakes admit only configured peers.
            return (CancellationToken::new(), Default::default());
        };
        let fresh = CancellationToken::new();
        let old = std::mem::replace(
            &mut *current
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            fresh.clone(),
        );
        old.cancel();
        (fresh, turn.clone())
    }

    /// Waits until the link to `peer` is up (`None` for an unknown peer).
    pub async fn link(&self, peer: u32) -> Option<PeerLink> {
        let mut rx = self.links.get(&peer)?.subscribe();
        // A link whose connection just ended may still be published for a
        // moment: wait for its successor instead.
        let live = |l: &Option<PeerLink>| l.as_ref().is_some_and(|l| !l.closed.is_cancelled());
        rx.wait_for(live).await.ok()?.clone()
    }

    /// Sends `body` to `peer`'s mode, if the link is up now.
    pub async fn send(&self, peer: u32, body: Bytes) -> Result<(), PeerError> {
        match self.try_link(peer) {
            Some(link) => link.send(body).await,
            None if self.links.contains_key(&peer) => Err(PeerError::Down(peer)),
            None => Err(PeerError::Unknown(peer)),
        }
    }

    /// Asks `peer`'s mode and waits for its answer, waiting for the link
    /// too if it is down, all within `deadline`.
    pub async fn request(
        &self,
        peer: u32,
        body: Bytes,
        deadline: Duration,
    ) -> Result<Bytes, PeerError> {
        if !self.links.contains_key(&peer) {
            return Err(PeerError::Unknown(peer));
        }
        tokio::time::timeout(deadline, async {
            let link = self.link(peer).await.ok_or(PeerError::Down(peer))?;
            link.request(body).await
        })
        .await
        .map_err(|_| PeerError::Timeout(peer))?
    }

    /// Serves the internal port and keeps a link to every peer until
    /// `shutdown`, handing what peers send to `handler`.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        handler: Arc<dyn Handler>,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let tracker = TaskTracker::new();
        for (id, addr) in &self.settings.peers {
            tracker.spawn(link::run(self.clone(), *id, addr.clone(), shutdown.clone()));
        }
        tracker.spawn(self.clone().refresh_metrics(shutdown.clone()));
        let accepted =
            inbound::serve(self.clone(), listener, handler, shutdown.clone(), &tracker).await;
        tracker.close();
        tracker.wait().await;
        accepted
    }

    /// Refreshes the gauges, and logs each peer's change of state (up,
    /// suspect, down) once, as the failure detector sees it.
    async fn refresh_metrics(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.heartbeat_interval);
        let mut seen: HashMap<u32, Liveness> = HashMap::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.requests_seen
                .store((self.requests_total)(), Ordering::Relaxed);
            for p in self.view() {
                let before = seen.insert(p.id, p.liveness);
                log_change(&p, before);
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
            }
        }
    }

    /// What this node says about itself in heartbeats and their acks.
    fn health(&self) -> wire::Health {
        wire::Health {
            requests_total: self.requests_seen.load(Ordering::Relaxed),
        }
    }

    /// `stats cluster` lines: this node, then every peer, with the mode's
    /// own lines for the node (`node_extra`) and for each peer
    /// (`peer_extra`).
    pub fn stats(
        &self,
        mode: &str,
        node_extra: Vec<(String, String)>,
        peer_extra: impl Fn(u32) -> Vec<(String, String)>,
    ) -> Vec<(String, String)> {
        let mut out = vec![
            ("node_id".to_string(), self.settings.node_id.to_string()),
            ("cluster".to_string(), self.settings.cluster_name.clone()),
            ("mode".to_string(), mode.to_string()),
        ];
        out.extend(node_extra);
        out.push((
            "requests_total".to_string(),
            (self.requests_total)().to_string(),
        ));
        out.push(("peers".to_string(), self.settings.peers.len().to_string()));
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
            line("request_rate", format!("{:.1}", p.request_rate));
            for (name, value) in peer_extra(p.id) {
                line(&name, value);
            }
        }
        out
    }
}

/// One line when a peer's state changes. A peer never heard from starts
/// down, quietly: only its first `up` is logged.
fn log_change(p: &PeerView, before: Option<Liveness>) {
    let silent_ms = p.last_heard.map(|d| d.as_millis() as u64);
    match (before.unwrap_or(Liveness::Down), p.liveness) {
        (b, now) if b == now => {}
        (_, Liveness::Up) => tracing::info!(peer = p.id, addr = %p.addr, "peer is up"),
        (_, Liveness::Suspect) => {
            tracing::warn!(peer = p.id, addr = %p.addr, silent_ms, "peer is suspect: not heard from")
        }
        (_, Liveness::Down) => {
            tracing::warn!(peer = p.id, addr = %p.addr, silent_ms, "peer is down: not heard from")
        }
    }
}

#[cfg(test)]
mod tests;
