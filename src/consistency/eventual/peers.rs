//! Eventual mode's state about each peer (how far each side has applied
//! the other's log, what it asked for) and its metrics.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::sync::{Notify, mpsc};
use tokio::task::AbortHandle;

use super::messages::{Cursor, Epoch};
use crate::metrics::reg;

#[derive(Debug, Default)]
struct State {
    /// How far the peer has applied our log (from its acks).
    acked: Option<Cursor>,
    /// How far we have applied its log.
    applied_cursor: Option<Cursor>,
    /// No cursor of the peer's log is valid until a full resync from it
    /// with at least `epoch` completes (our store lost its data, or its
    /// entries did not follow on), whatever entries arrive meanwhile.
    needs_snapshot: bool,
    /// How many full resyncs we asked the peer for.
    epoch: u64,
    /// When we last asked it for one, if the request went out.
    asked: Option<Instant>,
    /// The newest full resync the peer asked us for.
    wanted: Epoch,
    /// Entries of its log we applied.
    applied: u64,
    /// Keys a full resync or an anti-entropy repair from it changed here.
    repaired: u64,
    /// Entries we sent it in anti-entropy repairs.
    repair_sent: u64,
}

/// One peer's slot: its state, and the signals for the pusher to it.
pub(super) struct Peer {
    state: Mutex<State>,
    /// The peer asked for a full resync.
    pub resync: Notify,
    /// The peer acknowledged more of our log.
    pub ack: Notify,
    /// The peer's answers to our digests, for the pusher.
    pub diffs_tx: mpsc::Sender<Vec<u16>>,
    pub diffs_rx: tokio::sync::Mutex<mpsc::Receiver<Vec<u16>>>,
    /// The task answering the peer's latest digest.
    digest: Mutex<Option<AbortHandle>>,
}

impl Peer {
    /// Records the task answering the peer's newest digest; returns the
    /// one it replaces.
    pub fn replace_digest(&self, task: AbortHandle) -> Option<AbortHandle> {
        let mut slot = self.digest.lock().unwrap_or_else(PoisonError::into_inner);
        slot.replace(task)
    }
}

pub(super) struct Peers {
    peers: HashMap<u32, Peer>,
    /// This node's log incarnation, which names its resync requests.
    me: u64,
}

impl Peers {
    pub fn new(ids: &[u32], me: u64) -> Peers {
        let peers = ids
            .iter()
            .map(|&id| {
                let (diffs_tx, diffs_rx) = mpsc::channel(1);
                let peer = Peer {
                    state: Mutex::new(State::default()),
                    resync: Notify::new(),
                    ack: Notify::new(),
                    diffs_tx,
                    diffs_rx: tokio::sync::Mutex::new(diffs_rx),
                    digest: Mutex::new(None),
                };
                (id, peer)
            })
            .collect();
        Peers { peers, me }
    }

    pub fn get(&self, id: u32) -> Option<&Peer> {
        self.peers.get(&id)
    }

    fn with<R>(&self, id: u32, f: impl FnOnce(&mut State) -> R) -> Option<R> {
        let peer = self.peers.get(&id)?;
        let mut s = peer.state.lock().unwrap_or_else(PoisonError::into_inner);
        Some(f(&mut s))
    }

    /// The peer has applied our log up to `cursor`. A cursor of another
    /// incarnation of the log (an ack in flight when this process started)
    /// says nothing of this one and is ignored.
    pub fn acked(&self, id: u32, cursor: Cursor) {
        if cursor.incarnation != self.me {
            return;
        }
        self.with(id, |s| s.acked = Some(cursor));
        if let Some(p) = self.peers.get(&id) {
            p.ack.notify_one();
        }
    }

    /// How far the peer last said it has applied our log.
    pub fn acked_cursor(&self, id: u32) -> Option<Cursor> {
        self.with(id, |s| s.acked).flatten()
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

    /// The answer to the peer's `Ask::Cursor`: our cursor of its log, and
    /// the epoch a full resync from it must carry.
    pub fn cursor_answer(&self, id: u32) -> (Option<Cursor>, Epoch) {
        self.with(id, |s| (s.applied_cursor, self.epoch(s.epoch)))
            .unwrap_or_default()
    }

    fn epoch(&self, n: u64) -> Epoch {
        Epoch {
            incarnation: self.me,
            n,
        }
    }

    /// Entries `first..=cursor.seq` of the peer's log were applied. The
    /// cursor moves only when they follow on from it (same log, no gap)
    /// and no full resync is awaited. When they do not, nothing tells how
    /// far this replica has the peer's log any more: a full resync is
    /// needed (see [`Peers::resync_due`]).
    pub fn entries_applied(&self, id: u32, first: u64, cursor: Cursor, count: u64) {
        self.with(id, |s| {
            s.applied += count;
            let follows = s.applied_cursor.is_some_and(|c| {
                c.incarnation == cursor.incarnation && first <= c.seq.saturating_add(1)
            });
            if follows && !s.needs_snapshot {
                s.applied_cursor = Some(cursor);
            } else if !s.needs_snapshot {
                Self::need_snapshot(s);
            }
        });
    }

    fn need_snapshot(s: &mut State) {
        s.applied_cursor = None;
        s.needs_snapshot = true;
        s.epoch += 1;
        s.asked = None;
    }

    /// A full resync from the peer is applied, up to `cursor`; it started
    /// when the peer had seen our requests up to `epoch`. While we wait for
    /// a resync, one begun before our latest request (or for an earlier
    /// life of this node) is ignored: it may predate what made us ask.
    /// Returns whether the resync counted.
    pub fn snapshot_applied(&self, id: u32, cursor: Cursor, epoch: Epoch) -> bool {
        self.with(id, |s| {
            let current = epoch.incarnation == self.me && epoch.n >= s.epoch;
            if s.needs_snapshot && !current {
                return false;
            }
            s.applied_cursor = Some(cursor);
            s.needs_snapshot = false;
            s.asked = None;
            true
        })
        .unwrap_or(false)
    }

    /// The request to send the peer for a full resync, when one is awaited
    /// and it was not asked for within [`ASK_AGAIN`].
    pub fn resync_due(&self, id: u32) -> Option<Epoch> {
        self.with(id, |s| {
            let recent = s.asked.is_some_and(|t| t.elapsed() < ASK_AGAIN);
            (s.needs_snapshot && !recent).then(|| self.epoch(s.epoch))
        })
        .flatten()
    }

    /// The request for a full resync went out.
    pub fn asked(&self, id: u32) {
        self.with(id, |s| s.asked = Some(Instant::now()));
    }

    /// The peer asked us for the full resync `epoch`; true when that is a
    /// new request (a later one, or one from a new life of the peer).
    pub fn wants_resync(&self, id: u32, epoch: Epoch) -> bool {
        self.with(id, |s| {
            let new = epoch.incarnation != s.wanted.incarnation || epoch.n > s.wanted.n;
            if new {
                s.wanted = epoch;
            }
            new
        })
        .unwrap_or(false)
    }

    /// The newest full resync the peer asked us for.
    pub fn wanted_epoch(&self, id: u32) -> Epoch {
        self.with(id, |s| s.wanted).unwrap_or_default()
    }

    pub fn repaired(&self, id: u32, keys: u64) {
        self.with(id, |s| s.repaired += keys);
    }

    pub fn repair_sent(&self, id: u32, entries: u64) {
        self.with(id, |s| s.repair_sent += entries);
    }

    /// Our store lost its data: forget how far we applied every peer's log
    /// until each sends a full resync (asked for by [`Peers::resync_due`]).
    pub fn forget_cursors(&self) {
        for peer in self.peers.values() {
            let mut s = peer.state.lock().unwrap_or_else(PoisonError::into_inner);
            Self::need_snapshot(&mut s);
        }
    }

    /// (entries applied, keys repaired) from the peer, and entries sent
    /// to it in repairs.
    pub fn counts(&self, id: u32) -> (u64, u64, u64) {
        self.with(id, |s| (s.applied, s.repaired, s.repair_sent))
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
    pub messages: IntCounterVec,
    pub repaired: IntCounterVec,
    pub antientropy_rounds: IntCounterVec,
    pub repair_sent: IntCounterVec,
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
            messages: counter_vec(
                "replication_messages_total",
                "Messages of the peer's log applied here (replication_applied_total over this is the entries per message)",
            )?,
            repaired: counter_vec(
                "antientropy_repaired_keys_total",
                "Keys a full resync or an anti-entropy repair from the peer changed here",
            )?,
            antientropy_rounds: counter_vec(
                "antientropy_rounds_total",
                "Anti-entropy digest exchanges this node completed with the peer",
            )?,
            repair_sent: counter_vec(
                "antientropy_sent_entries_total",
                "Entries this node sent the peer in anti-entropy repairs",
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
    /// This node's log incarnation in these tests.
    const ME: u64 = 77;
    const E: fn(u64) -> Epoch = |n| Epoch { incarnation: ME, n };

    #[test]
    fn the_cursor_moves_only_over_contiguous_entries_of_one_log() {
        let p = Peers::new(&[2], ME);
        p.entries_applied(2, 1, C(7, 3), 3);
        assert_eq!(p.applied_cursor(2), None, "no cursor yet");
        assert_eq!(p.resync_due(2), Some(E(1)), "so a full resync is asked for");
        p.asked(2);
        assert_eq!(p.resync_due(2), None, "asked already");
        p.entries_applied(2, 4, C(7, 4), 1);
        assert_eq!(p.resync_due(2), None, "still the same request");
        assert!(p.snapshot_applied(2, C(7, 10), E(1)));
        p.entries_applied(2, 11, C(7, 12), 2);
        assert_eq!(p.applied_cursor(2), Some(C(7, 12)));
        p.entries_applied(2, 12, C(7, 13), 2);
        assert_eq!(p.applied_cursor(2), Some(C(7, 13)), "an overlap is fine");
        assert_eq!(p.resync_due(2), None);
        p.entries_applied(2, 20, C(7, 21), 2);
        assert_eq!(p.applied_cursor(2), None, "a gap");
        assert_eq!(p.resync_due(2), Some(E(2)));
        assert!(p.snapshot_applied(2, C(7, 21), E(2)));
        p.entries_applied(2, 22, C(8, 22), 1);
        assert_eq!(p.resync_due(2), Some(E(3)), "another log");
        assert_eq!(p.counts(2), (11, 0, 0));
        assert_eq!(p.cursor_answer(2), (None, E(3)));
    }

    #[test]
    fn after_a_store_restart_only_a_resync_begun_after_the_request_counts() {
        let p = Peers::new(&[2, 3], ME);
        // Not waiting for anything: any full resync sets the cursor.
        assert!(p.snapshot_applied(2, C(7, 10), Epoch::default()));
        p.forget_cursors();
        assert_eq!(p.applied_cursor(2), None);
        assert_eq!(p.resync_due(2), Some(E(1)));
        assert_eq!(p.resync_due(3), Some(E(1)));
        // Entries in flight when the store restarted still apply, but do
        // not make a cursor: the store no longer holds what came before.
        p.entries_applied(2, 11, C(7, 11), 1);
        assert_eq!(p.applied_cursor(2), None);
        // A resync the peer began before it heard the request does not
        // count: it may have been read before the restart. Nor does one
        // for an earlier life of this node, whatever its count.
        assert!(!p.snapshot_applied(2, C(7, 20), E(0)));
        let earlier_life = Epoch {
            incarnation: ME + 1,
            n: 9,
        };
        assert!(!p.snapshot_applied(2, C(7, 20), earlier_life));
        assert_eq!(p.applied_cursor(2), None);
        assert!(p.snapshot_applied(2, C(7, 30), E(1)));
        assert_eq!(p.applied_cursor(2), Some(C(7, 30)));
        p.entries_applied(2, 31, C(7, 31), 1);
        assert_eq!(p.applied_cursor(2), Some(C(7, 31)));
        assert_eq!(p.applied_cursor(3), None);
    }

    #[test]
    fn the_pusher_side_keeps_the_newest_request_of_each_life() {
        let p = Peers::new(&[2], ME);
        let req = |incarnation, n| Epoch { incarnation, n };
        assert_eq!(p.wanted_epoch(2), Epoch::default());
        assert!(p.wants_resync(2, req(5, 2)));
        assert!(
            !p.wants_resync(2, req(5, 1)),
            "an older request changes nothing"
        );
        assert!(!p.wants_resync(2, req(5, 2)), "nor the same one again");
        assert_eq!(p.wanted_epoch(2), req(5, 2));
        // The peer restarted: its requests count from the start again.
        assert!(p.wants_resync(2, req(6, 1)));
        assert_eq!(p.wanted_epoch(2), req(6, 1));
    }
}
