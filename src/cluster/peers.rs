//! The peer table and the failure detector, plus the cluster's metrics.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus::{
    Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use super::ClusterSettings;
use super::wire::{Cursor, Health};
use crate::metrics::reg;

/// What the failure detector makes of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Heard from within `suspect_after`.
    Up,
    /// Silent for longer than `suspect_after`, not yet `down_after`.
    Suspect,
    /// Silent for `down_after` or more, or never heard from.
    Down,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Up => "up",
            Liveness::Suspect => "suspect",
            Liveness::Down => "down",
        }
    }
}

/// One peer, as shown by `stats cluster` and `show`.
#[derive(Debug, Clone)]
pub struct PeerView {
    pub id: u32,
    pub addr: SocketAddr,
    pub liveness: Liveness,
    /// Since we last heard from it.
    pub last_heard: Option<Duration>,
    pub rtt: Option<Duration>,
    /// Entries of our log it has not acknowledged.
    pub lag: Option<u64>,
    /// Its client requests per second, from its heartbeats.
    pub request_rate: f64,
    /// Entries of its log we applied.
    pub applied: u64,
    /// Keys a full resync or an anti-entropy repair from it changed here.
    pub repaired: u64,
}

#[derive(Default)]
struct Peer {
    last_heard: Option<Instant>,
    rtt: Option<Duration>,
    /// How far it has applied our log (from its acks).
    acked: Option<Cursor>,
    /// How far we have applied its log.
    applied_cursor: Option<Cursor>,
    health: Option<(Instant, Health)>,
    request_rate: f64,
    applied: u64,
    repaired: u64,
}

pub(super) struct Peers {
    addrs: HashMap<u32, SocketAddr>,
    table: Mutex<HashMap<u32, Peer>>,
}

impl Peers {
    pub fn new(settings: &ClusterSettings) -> Peers {
        Peers {
            addrs: settings.peers.iter().copied().collect(),
            table: Mutex::new(
                settings
                    .peers
                    .iter()
                    .map(|&(id, _)| (id, Peer::default()))
                    .collect(),
            ),
        }
    }

    pub fn is_peer(&self, id: u32) -> bool {
        self.addrs.contains_key(&id)
    }

    fn with<R>(&self, id: u32, f: impl FnOnce(&mut Peer) -> R) -> Option<R> {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        t.get_mut(&id).map(f)
    }

    pub fn heard(&self, id: u32) {
        self.with(id, |p| p.last_heard = Some(Instant::now()));
    }

    pub fn health(&self, id: u32, health: Health) {
        self.with(id, |p| {
            let now = Instant::now();
            if let Some((then, before)) = p.health {
                let secs = now.duration_since(then).as_secs_f64();
                if secs > 0.0 && health.requests_total >= before.requests_total {
                    let rate = (health.requests_total - before.requests_total) as f64 / secs;
                    // Smooth over a few heartbeats.
                    p.request_rate = 0.5 * p.request_rate + 0.5 * rate;
                }
            }
            p.health = Some((now, health));
            p.last_heard = Some(now);
        });
    }

    pub fn rtt(&self, id: u32, rtt: Duration) {
        self.with(id, |p| p.rtt = Some(rtt));
    }

    pub fn acked(&self, id: u32, cursor: Option<Cursor>) {
        self.with(id, |p| p.acked = cursor);
    }

    pub fn applied_cursor(&self, id: u32) -> Option<Cursor> {
        self.with(id, |p| p.applied_cursor).flatten()
    }

    pub fn set_applied_cursor(&self, id: u32, cursor: Cursor, entries: u64) {
        self.with(id, |p| {
            p.applied_cursor = Some(cursor);
            p.applied += entries;
        });
    }

    pub fn repaired(&self, id: u32, keys: u64) {
        self.with(id, |p| p.repaired += keys);
    }

    /// Forgets how far we applied every peer's log (our store lost it).
    pub fn forget_cursors(&self) {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        for p in t.values_mut() {
            p.applied_cursor = None;
        }
    }

    pub fn view(&self, settings: &ClusterSettings, our_head: u64) -> Vec<PeerView> {
        let t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<PeerView> = t
            .iter()
            .map(|(&id, p)| {
                let since = p.last_heard.map(|h| h.elapsed());
                let liveness = match since {
                    Some(d) if d < settings.suspect_after => Liveness::Up,
                    Some(d) if d < settings.down_after => Liveness::Suspect,
                    _ => Liveness::Down,
                };
                PeerView {
                    id,
                    addr: self.addrs[&id],
                    liveness,
                    last_heard: since,
                    rtt: p.rtt,
                    lag: p.acked.map(|c| our_head.saturating_sub(c.seq)),
                    request_rate: p.request_rate,
                    applied: p.applied,
                    repaired: p.repaired,
                }
            })
            .collect();
        out.sort_by_key(|p| p.id);
        out
    }
}

/// The cluster's metrics, labelled by peer id (a closed set from the config).
pub(super) struct ClusterMetrics {
    pub peer_up: IntGaugeVec,
    pub peer_rtt: GaugeVec,
    pub peer_lag: IntGaugeVec,
    pub backlog_entries: IntGauge,
    pub applied: IntCounterVec,
    pub repaired: IntCounterVec,
    pub antientropy_rounds: IntCounterVec,
    pub full_resyncs_sent: IntCounterVec,
    pub handshakes_refused: IntCounterVec,
    pub store_restarts: IntCounter,
    pub replication_delay: Gauge,
}

impl ClusterMetrics {
    pub fn register(r: &Registry) -> prometheus::Result<ClusterMetrics> {
        let peer = &["peer"];
        Ok(ClusterMetrics {
            peer_up: reg(
                r,
                IntGaugeVec::new(
                    Opts::new("peer_up", "1 if the failure detector has the peer up"),
                    peer,
                )?,
            )?,
            peer_rtt: reg(
                r,
                GaugeVec::new(
                    Opts::new(
                        "peer_heartbeat_rtt_seconds",
                        "Last heartbeat round trip to the peer",
                    ),
                    peer,
                )?,
            )?,
            peer_lag: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "peer_replication_lag_entries",
                        "Entries of this node's log the peer has not acknowledged",
                    ),
                    peer,
                )?,
            )?,
            backlog_entries: reg(
                r,
                IntGauge::new(
                    "replication_backlog_entries",
                    "Entries held in the replication backlog",
                )?,
            )?,
            applied: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "replication_applied_total",
                        "Log entries from the peer applied here",
                    ),
                    peer,
                )?,
            )?,
            repaired: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "antientropy_repaired_keys_total",
                        "Keys a full resync or an anti-entropy repair from the peer changed here",
                    ),
                    peer,
                )?,
            )?,
            antientropy_rounds: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "antientropy_rounds_total",
                        "Anti-entropy digest exchanges this node completed with the peer",
                    ),
                    peer,
                )?,
            )?,
            full_resyncs_sent: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "full_resyncs_sent_total",
                        "Full resyncs this node sent to the peer",
                    ),
                    peer,
                )?,
            )?,
            handshakes_refused: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "peer_handshakes_refused_total",
                        "Inbound peer handshakes refused, by reason",
                    ),
                    &["reason"],
                )?,
            )?,
            store_restarts: reg(
                r,
                IntCounter::new(
                    "backing_store_restarts_total",
                    "Times the backing store was found restarted",
                )?,
            )?,
            replication_delay: reg(
                r,
                Gauge::new(
                    "replication_delay_seconds",
                    "Age of the newest entry applied from a peer, when applied",
                )?,
            )?,
        })
    }
}
