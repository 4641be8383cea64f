//! The pusher: one task per peer that sends this node's replication log to
//! it. On every new connection it asks how far the peer has applied the
//! log, then sends the entries after that, or a full resync when the
//! peer's cursor is void or older than the backlog's window (or when the
//! peer asks for one). Beside the log it runs anti-entropy rounds: send
//! this replica's digest, and this replica's entries of the buckets where
//! the peer answers that its replica differs.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backlog::TooOld;
use super::digest::{self, BUCKETS, CHUNK, Digest};
use super::messages::{
    Ask, Cursor, Entry, Epoch, Msg, decode, encode, encode_entries, entry_bytes, frame_runs,
};
use super::{Eventual, Replica};
use crate::BoxFuture;
use crate::cluster::{PeerError, PeerLink};
use crate::time::unix_ms;

/// Entries read per key batch during a full resync.
const SNAPSHOT_CHUNK: usize = 256;

/// How long the peer has to say where it stands on a new connection.
const CURSOR_WAIT: Duration = Duration::from_secs(5);

/// Messages of the log sent on one connection and not yet acknowledged,
/// at most: the peer applies them one at a time, and its heartbeats from
/// this node are read after them, so a short queue keeps the heartbeat's
/// round trip short; while the window is full, new entries gather into
/// larger messages, which the peer applies in fewer store exchanges.
const IN_FLIGHT: usize = 4;

/// How old a write must be, when an anti-entropy round begins, for the
/// round to repair it: younger ones may still be on their way in a log.
const SETTLE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
enum PushError {
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("replica: {0}")]
    Replica(String),
}

/// Waits for the future in `slot`, or forever when there is none (for a
/// `select!` branch; the slot is emptied by the caller).
async fn in_slot<T>(slot: &mut Option<BoxFuture<'_, T>>) -> T {
    match slot {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

impl Eventual {
    /// Pushes this node's log to `peer` over each connection the cluster
    /// makes to it, until `shutdown`.
    pub(super) async fn push_to(self: Arc<Self>, peer: u32, shutdown: CancellationToken) {
        let Some(slot) = self.peers.get(peer) else {
            return;
        };
        let mut diffs = slot.diffs_rx.lock().await;
        loop {
            let link = tokio::select! {
                _ = shutdown.cancelled() => return,
                link = self.cluster.link(peer) => link,
            };
            let Some(link) = link else { return };
            // Over this connection until it ends: a failure of this
            // replica, or a peer slow to answer, is tried again on it.
            loop {
                let result = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = self.push(&link, &mut diffs) => r,
                };
                match result {
                    Ok(()) | Err(PushError::Peer(PeerError::Down(_))) => break,
                    // The backend logs its outages, once each.
                    Err(e) => tracing::debug!(peer, error = %e, "push interrupted; trying again"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = link.closed() => break,
                    _ = tokio::time::sleep(self.settings.heartbeat_interval) => {}
                }
            }
            // Wait for this connection to end before asking for the next.
            link.closed().await;
        }
    }

    /// Pushes over one connection until it ends.
    async fn push(
        &self,
        link: &PeerLink,
        diffs: &mut mpsc::Receiver<Vec<u16>>,
    ) -> Result<(), PushError> {
        let peer = link.peer();
        let backlog = &*self.backlog;
        let answer = tokio::time::timeout(CURSOR_WAIT, link.request(encode(&Ask::Cursor)))
            .await
            .map_err(|_| PeerError::Timeout(peer))??;
        let (cursor, epoch): (Option<Cursor>, Epoch) =
            decode(&answer).map_err(PushError::Replica)?;
        self.peers.wants_resync(peer, epoch);
        let resumable = |c: &Cursor| {
            c.incarnation == backlog.incarnation && backlog.read_after(c.seq, 0).is_ok()
        };
        let slot = self.peers.get(peer).ok_or(PeerError::Unknown(peer))?;
        // The last entry of each message in flight. A full resync counts as
        // one (its end is acked like a message), so a lost ack of it is
        // asked for too.
        let mut window: VecDeque<u64> = VecDeque::with_capacity(IN_FLIGHT);
        let mut sent = match cursor {
            // The peer's answer is also its ack: a pusher that restarted
            // with nothing left to send would otherwise keep counting the
            // lag of the last ack that reached it, for ever.
            Some(c) if resumable(&c) => {
                self.peers.acked(peer, c);
                c.seq
            }
            _ => {
                let seq = self.full_resync(link).await?;
                window.push_back(seq);
                seq
            }
        };
        let mut next_send = Instant::now();
        tracing::info!(peer, resume = ?cursor, from = sent, "pushing the log to peer");
        // Drop answers to digests of an earlier connection.
        while diffs.try_recv().is_ok() {}
        let mut ae = AntiEntropy::new(self.settings.anti_entropy_interval);
        let label = peer.to_string();
        loop {
            // Only cursors of this incarnation of the log are recorded.
            if let Some(acked) = self.peers.acked_cursor(peer) {
                while window.front().is_some_and(|&last| last <= acked.seq) {
                    window.pop_front();
                }
            }
            // A full message goes at once while the window has room. A
            // smaller one waits until nothing is in flight and the linger
            // since the last message has passed; the writes that come
            // meanwhile gather into it, so the peer applies many writes
            // per store exchange instead of a few.
            let full = backlog.head().saturating_sub(sent) >= self.settings.batch_max as u64;
            let lingering = !full && Instant::now() < next_send;
            let open = (window.is_empty() && !lingering) || (window.len() < IN_FLIGHT && full);
            match backlog.read_after(sent, if open { self.settings.batch_max } else { 0 }) {
                Ok(batch) if !batch.is_empty() => {
                    for run in frame_runs(batch, |(_, e)| entry_bytes(e)) {
                        sent = run.last().map_or(sent, |(seq, _)| *seq);
                        let entries: Vec<(u64, &Entry)> =
                            run.iter().map(|(seq, e)| (*seq, &**e)).collect();
                        let body = encode_entries(backlog.incarnation, &entries);
                        link.send(body).await?;
                        window.push_back(sent);
                        next_send = Instant::now() + self.settings.linger;
                    }
                    continue;
                }
                Ok(_) => {}
                Err(TooOld) => {
                    tracing::warn!(
                        peer,
                        sent,
                        "peer fell behind the replication backlog; sending a full resync"
                    );
                    ae.cancel();
                    window.clear();
                    sent = self.full_resync(link).await?;
                    window.push_back(sent);
                    continue;
                }
            }
            // The digest goes once every log entry written before it was
            // computed has been sent: the peer applies those before it
            // answers, so its replica includes all that the digest covers.
            // (Waiting for nothing left to send would wait for ever under
            // steady writes.)
            if ae.ready.as_ref().is_some_and(|(_, covers)| sent >= *covers)
                && let Some((d, _)) = ae.ready.take()
            {
                let msg = Msg::Digest {
                    buckets: d.into_buckets(),
                };
                link.send(encode(&msg)).await?;
                ae.awaiting = Some(Instant::now() + ae.answer_wait());
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next_send), if lingering && window.is_empty() => {}
                _ = backlog.beyond(sent), if open => {}
                _ = slot.ack.notified(), if !window.is_empty() => {}
                // An ack can be lost (the peer sends it only if its link
                // has room): ask, when none came for a while.
                _ = tokio::time::sleep(self.settings.heartbeat_interval), if !window.is_empty() => {
                    self.ask_cursor(link).await?;
                }
                _ = link.closed() => return Err(PeerError::Down(peer).into()),
                _ = slot.resync.notified() => {
                    ae.cancel();
                    window.clear();
                    sent = self.full_resync(link).await?;
                    window.push_back(sent);
                }
                _ = tokio::time::sleep_until(ae.next), if ae.idle() => {
                    ae.started_ms = unix_ms();
                    ae.computing = Some(Box::pin(async move {
                        let keys = self.list_keys().await?;
                        Digest::of(self, &keys, self.settings.tombstone_grace).await
                    }));
                }
                digest = in_slot(&mut ae.computing), if ae.computing.is_some() => {
                    ae.computing = None;
                    match digest {
                        Ok(d) => ae.ready = Some((d, backlog.head())),
                        Err(e) => {
                            tracing::warn!(peer, error = %e, "anti-entropy: cannot compute this replica's digest");
                            ae.schedule();
                        }
                    }
                }
                _ = sleep_until_some(ae.awaiting) => {
                    tracing::debug!(peer, "anti-entropy: no answer to the digest; starting over later");
                    ae.awaiting = None;
                    ae.schedule();
                }
                diff = diffs.recv() => {
                    let Some(buckets) = diff else { return Ok(()) };
                    if ae.awaiting.take().is_none() {
                        continue;
                    }
                    self.replication.antientropy_rounds.with_label_values(&[&label]).inc();
                    if !buckets.is_empty() {
                        match self.repair(link, &buckets, ae.settled_ms()).await {
                            Ok(entries) => {
                                let n = entries as u64;
                                self.peers.repair_sent(peer, n);
                                self.replication.repair_sent.with_label_values(&[&label]).inc_by(n);
                                tracing::debug!(
                                    peer,
                                    buckets = buckets.len(),
                                    entries,
                                    "anti-entropy: replicas differ; sent this replica's settled entries of those buckets"
                                );
                            }
                            Err(PushError::Replica(e)) => tracing::warn!(
                                peer,
                                error = %e,
                                "anti-entropy: cannot read this replica for a repair"
                            ),
                            Err(e) => return Err(e),
                        }
                    }
                    ae.schedule();
                }
            }
        }
    }

    /// Asks the peer how far it has applied this node's log; it answers
    /// once every message sent before is handled.
    async fn ask_cursor(&self, link: &PeerLink) -> Result<(), PushError> {
        let peer = link.peer();
        let answer = tokio::time::timeout(CURSOR_WAIT, link.request(encode(&Ask::Cursor)))
            .await
            .map_err(|_| PeerError::Timeout(peer))??;
        let (cursor, _): (Option<Cursor>, Epoch) = decode(&answer).map_err(PushError::Replica)?;
        if let Some(c) = cursor {
            self.peers.acked(peer, c);
        }
        Ok(())
    }

    /// Sends this replica's entries of `buckets` (where the peer's replica
    /// differs) as snapshot messages, which the peer applies
    /// last-writer-wins; its cursor does not move. Only entries written
    /// before `settled_ms` go: a younger one may still be on its way in a
    /// log (this node's or a third's), and a bucket it made differ is no
    /// sign of loss; if it was lost, a later round repairs it. Returns how
    /// many entries were sent. Entries newer on the peer come to us from
    /// its own pusher.
    async fn repair(
        &self,
        link: &PeerLink,
        buckets: &[u16],
        settled_ms: u64,
    ) -> Result<usize, PushError> {
        let mut wanted = vec![false; BUCKETS];
        for &b in buckets {
            if let Some(w) = wanted.get_mut(usize::from(b)) {
                *w = true;
            }
        }
        let keys: Vec<Bytes> = self
            .list_keys()
            .await
            .map_err(PushError::Replica)?
            .into_iter()
            .filter(|k| wanted[digest::bucket(k)])
            .collect();
        let grace = self.settings.tombstone_grace;
        let mut sent = 0;
        for chunk in keys.chunks(CHUNK) {
            let now = unix_ms();
            let entries: Vec<Entry> = self
                .read(chunk)
                .await
                .map_err(PushError::Replica)?
                .into_iter()
                .filter(|e| digest::compared(e, now, grace) && e.version.ts >> 16 < settled_ms)
                .collect();
            sent += entries.len();
            send_snapshot(link, entries).await?;
        }
        tracing::trace!(
            peer = link.peer(),
            keys = keys.len(),
            sent,
            "anti-entropy repair sent"
        );
        Ok(sent)
    }

    /// Sends this replica's whole state; returns the log position it covers.
    async fn full_resync(&self, link: &PeerLink) -> Result<u64, PushError> {
        let peer = link.peer();
        // Every entry up to `seq` is already applied to the store, so the
        // state read below includes it; later entries follow from the log.
        let seq = self.backlog.head();
        // The newest resync the peer asked for, as of now: the peer trusts
        // this resync only if it started after its request.
        let epoch = self.peers.wanted_epoch(peer);
        let keys = self.list_keys().await.map_err(PushError::Replica)?;
        tracing::info!(peer, keys = keys.len(), seq, "sending a full resync");
        for chunk in keys.chunks(SNAPSHOT_CHUNK) {
            let entries = self.read(chunk).await.map_err(PushError::Replica)?;
            send_snapshot(link, entries).await?;
        }
        let done = Msg::SnapshotDone {
            incarnation: self.backlog.incarnation,
            seq,
            epoch,
        };
        link.send(encode(&done)).await?;
        self.replication
            .full_resyncs_sent
            .with_label_values(&[&peer.to_string()])
            .inc();
        Ok(seq)
    }
}

/// Sends entries as `Snapshot` messages within the frame budget.
async fn send_snapshot(link: &PeerLink, entries: Vec<Entry>) -> Result<(), PeerError> {
    for entries in frame_runs(entries, entry_bytes) {
        link.send(encode(&Msg::Snapshot { entries })).await?;
    }
    Ok(())
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One link's anti-entropy rounds. A round: compute this replica's digest
/// beside the log push (entries keep flowing), send it once every log entry
/// written meanwhile is sent, wait for the peer's answer, send this
/// replica's settled entries of the buckets it names. Rounds start a
/// jittered interval after the previous one ended, never during a full
/// resync.
struct AntiEntropy<'a> {
    interval: Option<Duration>,
    next: Instant,
    /// When this round's digest began (unix ms).
    started_ms: u64,
    computing: Option<BoxFuture<'a, Result<Digest, String>>>,
    /// Computed, with the log's head then: sent once the log up to that
    /// head is.
    ready: Option<(Digest, u64)>,
    /// Sent; the peer's answer is awaited until then.
    awaiting: Option<Instant>,
}

impl AntiEntropy<'_> {
    fn new(interval: Option<Duration>) -> Self {
        let mut ae = AntiEntropy {
            interval,
            next: Instant::now(),
            started_ms: 0,
            computing: None,
            ready: None,
            awaiting: None,
        };
        ae.schedule();
        ae
    }

    /// The next round starts ±20% of the interval from now, so the links of
    /// a cluster do not all scan their stores at once.
    fn schedule(&mut self) {
        if let Some(i) = self.interval {
            self.next = Instant::now() + i.mul_f64(rand::random_range(0.8..=1.2));
        }
    }

    /// How long the peer has to answer a digest: it lists and reads its
    /// whole store first.
    fn answer_wait(&self) -> Duration {
        self.interval
            .map_or(Duration::ZERO, |i| i * 10)
            .max(Duration::from_secs(30))
    }

    /// Entries written before this moment are settled: a round repairs
    /// only those. It is a round's start less [`SETTLE`], or less the
    /// interval when that is shorter, so a repair comes at most an interval
    /// or two after the loss.
    fn settled_ms(&self) -> u64 {
        let settle = self.interval.map_or(SETTLE, |i| i.min(SETTLE));
        self.started_ms.saturating_sub(settle.as_millis() as u64)
    }

    fn idle(&self) -> bool {
        self.interval.is_some()
            && self.computing.is_none()
            && self.ready.is_none()
            && self.awaiting.is_none()
    }

    /// Drops a round in progress (its digest predates a full resync).
    fn cancel(&mut self) {
        let computing = self.computing.take().is_some();
        let ready = self.ready.take().is_some();
        if computing || ready {
            self.schedule();
        }
    }
}
