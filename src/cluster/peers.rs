//! The peer table and the failure detector, plus the cluster's metrics.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::ClusterSettings;
use super::wire::Health;
use crate::config::HostPort;
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
    /// As configured (a name is shown as the name).
    pub addr: HostPort,
    pub liveness: Liveness,
    /// Since we last heard from it.
    pub last_heard: Option<Duration>,
    pub rtt: Option<Duration>,
    /// Its client requests per second, from its heartbeats.
    pub request_rate: f64,
}

#[derive(Default)]
struct Peer {
    last_heard: Option<Instant>,
    rtt: Option<Duration>,
    health: Option<(Instant, Health)>,
    request_rate: f64,
}

pub(super) struct Peers {
    addrs: HashMap<u32, HostPort>,
    table: Mutex<HashMap<u32, Peer>>,
}

impl Peers {
    pub fn new(settings: &ClusterSettings) -> Peers {
        Peers {
            addrs: settings.peers.iter().cloned().collect(),
            table: Mutex::new(
                settings
                    .peers
                    .iter()
                    .map(|(id, _)| (*id, Peer::default()))
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

    pub fn view(&self, settings: &ClusterSettings) -> Vec<PeerView> {
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
                    addr: self.addrs[&id].clone(),
                    liveness,
                    last_heard: since,
                    rtt: p.rtt,
                    request_rate: p.request_rate,
                }
            })
            .collect();
        out.sort_by_key(|p| p.id);
        out
    }
}

/// The transport's metrics, labelled by peer id (a closed set from the
/// config) or by a closed set of reasons.
pub(super) struct ClusterMetrics {
    pub peer_up: IntGaugeVec,
    pub peer_rtt: GaugeVec,
    pub handshakes_refused: IntCounterVec,
    pub messages_refused: IntCounterVec,
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
            messages_refused: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "peer_messages_refused_total",
                        "Peer messages refused for naming another consistency mode (mode) or \
                         another version of this mode's messages (version)",
                    ),
                    &["reason"],
                )?,
            )?,
        })
    }
}
