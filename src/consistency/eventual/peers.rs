//! Eventual mode's state about each peer (how far each side has applied
//! the other's log, what it asked for) and its metrics.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::sync::{Notify, mpsc};

use super::messages::Cursor;
use crate::metrics::reg;

#[derive(Debug, Default)]
struct State {
    /// How far the peer has applied our log (from its acks).
    acked: Option<Cursor>,
    /// How far we have applied its log.
    applied_cursor: Option<Cursor>,
    /// Our store lost its data: no cursor of the peer's log is valid until
    /// a full resync from it completes, whatever entries arrive meanwhile.
    needs_snapshot: bool,
    /// When we last asked it for a full resync.
    asked: Option<Instant>,
    /// Entries of its log we applied.
    applied: u64,
    /// Keys a full resync or an anti-entropy repair from it changed here.
    repaired: u64,
}

/// One peer's slot: its state, and the signals for the pusher to it.
pub(super) struct Peer {
    state: Mutex<State>,
    /// The peer asked for a full resync.
    pub resync: Notify,
    /// The peer's answers to our digests, for the pusher.
    pub diffs_tx: mpsc::Sender<Vec<u16>>,
    pub diffs_rx: tokio::sync::Mutex<mpsc::Receiver<Vec<u16>>>,
}

pub(super) struct Peers(HashMap<u32, Peer>);

impl Peers {
    pub fn new(ids: &[u32]) -> Peers {
        Peers(
            ids.iter()
                .map(|&id| {
                    let (diffs_tx, diffs_rx) = mpsc::channel(1);
                    let peer = Peer {
                        state: Mutex::new(State::default()),
                        resync: Notify::new(),
                        diffs_tx,
                        diffs_rx: tokio::sync::Mutex::new(diffs_rx),
                    };
                    (id, peer)
                })
                .collect(),
        )
    }

    pub fn get(&self, id: u32) -> Option<&Peer> {
        self.0.get(&id)
    }

    fn with<R>(&self, id: u32, f: impl FnOnce(&mut State) -> R) -> Option<R> {
        let peer = self.0.get(&id)?;
        let mut s = peer.state.lock().unwrap_or_else(PoisonError::into_inner);
        Some(f(&mut s))
    }

    pub fn acked(&self, id: u32, cursor: Cursor) {
        self.with(id, |s| s.acked = Some(cursor));
    }

    /// Entries of our log (whose newest is `head`) the peer has not
    /// acknowledged.
    pub fn lag(&self, id: u32, head: u64) -> Option<u64> {
        self.with(id, |s| s.acked.map(|c| head.saturating_sub(c.seq)))
            .flatten()
    }

    pub fn applied_cursor(&self, id: u32) -> Option<Cursor> {
        self.with(id, |s| s.applied_cursor).flatten()
    }

    /// Entries `first..=cursor.seq` of the peer's log were applied. The
    /// cursor moves only when they follow on from it (same log, no gap)
    /// and no full resync is awaited. When they do not, nothing tells how
    /// far this replica has the peer's log any more: returns true when the
    /// peer should be asked for a full resync now (at most once every
    /// [`ASK_AGAIN`] while one is awaited).
    pub fn entries_applied(&self, id: u32, first: u64, cursor: Cursor, count: u64) -> bool {
        self.with(id, |s| {
            s.applied += count;
            let follows = s
                .applied_cursor
                .is_some_and(|c| c.incarnation == cursor.incarnation && first <= c.seq + 1);
            if follows && !s.needs_snapshot {
                s.applied_cursor = Some(cursor);
                return false;
            }
            s.needs_snapshot = true;
            s.applied_cursor = None;
            if s.asked.is_some_and(|t| t.elapsed() < ASK_AGAIN) {
                return false;
            }
            s.asked = Some(Instant::now());
            true
        })
        .unwrap_or(false)
    }

    /// A full resync from the peer is applied, up to `cursor`.
    pub fn snapshot_applied(&self, id: u32, cursor: Cursor) {
        self.with(id, |s| {
            s.applied_cursor = Some(cursor);
            s.needs_snapshot = false;
            s.asked = None;
        });
    }

    pub fn repaired(&self, id: u32, keys: u64) {
        self.with(id, |s| s.repaired += keys);
    }

    /// Our store lost its data: forget how far we applied every peer's log
    /// until each sends a full resync (the caller asks them now).
    pub fn forget_cursors(&self) {
        for peer in self.0.values() {
            let mut s = peer.state.lock().unwrap_or_else(PoisonError::into_inner);
            s.applied_cursor = None;
            s.needs_snapshot = true;
            s.asked = Some(Instant::now());
        }
    }

    /// (entries applied, keys repaired) from the peer.
    pub fn counts(&self, id: u32) -> (u64, u64) {
        self.with(id, |s| (s.applied, s.repaired))
            .unwrap_or_default()
    }
}

/// How long to wait for an asked-for full resync before asking again.
pub const ASK_AGAIN: Duration = Duration::from_secs(5);

/// Eventual mode's metrics, labelled by peer id (a closed set from the
/// config).
pub(super) struct EventualMetrics {
    pub peer_lag: IntGaugeVec,
    pub backlog_entries: IntGauge,
    pub backlog_bytes: IntGauge,
    pub applied: IntCounterVec,
    pub repaired: IntCounterVec,
    pub antientropy_rounds: IntCounterVec,
    pub full_resyncs_sent: IntCounterVec,
    pub store_restarts: IntCounter,
    pub replication_delay: Gauge,
}

impl EventualMetrics {
    pub fn register(r: &Registry) -> prometheus::Result<EventualMetrics> {
        let peer = &["peer"];
        let counter_vec = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            reg(r, IntCounterVec::new(Opts::new(name, help), peer)?)
        };
        Ok(EventualMetrics {
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
            backlog_bytes: reg(
                r,
                IntGauge::new(
                    "replication_backlog_bytes",
                    "Key and value bytes held in the replication backlog",
                )?,
            )?,
            applied: counter_vec(
                "replication_applied_total",
                "Log entries from the peer applied here",
            )?,
            repaired: counter_vec(
                "antientropy_repaired_keys_total",
                "Keys a full resync or an anti-entropy repair from the peer changed here",
            )?,
            antientropy_rounds: counter_vec(
                "antientropy_rounds_total",
                "Anti-entropy digest exchanges this node completed with the peer",
            )?,
            full_resyncs_sent: counter_vec(
                "full_resyncs_sent_total",
                "Full resyncs this node sent to the peer",
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

#[cfg(test)]
mod tests {
    use super::*;

    const C: fn(u64, u64) -> Cursor = |incarnation, seq| Cursor { incarnation, seq };

    #[test]
    fn the_cursor_moves_only_over_contiguous_entries_of_one_log() {
        let p = Peers::new(&[2]);
        assert!(p.entries_applied(2, 1, C(7, 3), 3), "no cursor yet: ask");
        assert!(!p.entries_applied(2, 4, C(7, 4), 1), "asked already");
        assert_eq!(p.applied_cursor(2), None);
        p.snapshot_applied(2, C(7, 10));
        assert!(!p.entries_applied(2, 11, C(7, 12), 2));
        assert_eq!(p.applied_cursor(2), Some(C(7, 12)));
        assert!(!p.entries_applied(2, 12, C(7, 13), 2), "an overlap is fine");
        assert_eq!(p.applied_cursor(2), Some(C(7, 13)));
        assert!(p.entries_applied(2, 20, C(7, 21), 2), "a gap: ask");
        assert_eq!(p.applied_cursor(2), None);
        p.snapshot_applied(2, C(7, 21));
        assert!(p.entries_applied(2, 22, C(8, 22), 1), "another log: ask");
        assert_eq!(p.counts(2), (11, 0));
    }

    #[test]
    fn after_a_store_restart_only_a_full_resync_sets_a_cursor() {
        let p = Peers::new(&[2, 3]);
        p.snapshot_applied(2, C(7, 10));
        p.forget_cursors();
        assert_eq!(p.applied_cursor(2), None);
        // Entries in flight when the store restarted still apply, but do
        // not make a cursor: the store no longer holds what came before.
        // The resync was asked for when the restart was found.
        assert!(!p.entries_applied(2, 11, C(7, 11), 1));
        assert_eq!(p.applied_cursor(2), None);
        p.snapshot_applied(2, C(7, 30));
        assert_eq!(p.applied_cursor(2), Some(C(7, 30)));
        assert!(!p.entries_applied(2, 31, C(7, 31), 1));
        assert_eq!(p.applied_cursor(2), Some(C(7, 31)));
        assert_eq!(p.applied_cursor(3), None);
    }
}
