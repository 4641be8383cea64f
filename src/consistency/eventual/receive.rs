//! The receiving side of eventual replication: what peers send this node
//! (their log entries, full resyncs, anti-entropy digests) applied to the
//! local replica, acknowledged over this node's own link back; and the
//! watch on the local store, which asks every peer for a full resync when
//! the store has restarted empty.

use std::sync::Arc;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::Eventual;
use super::digest::Digest;
use super::messages::{Ask, Cursor, Msg, decode, decode_msg, encode};
use crate::BoxFuture;
use crate::cluster::Handler;
use crate::time::unix_ms;

/// How long the store watch waits to ask one peer for a resync.
const ASK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl Handler for Eventual {
    fn on_message(&self, peer: u32, body: Bytes) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.receive(peer, decode_msg(&body)?).await })
    }

    fn on_request(&self, peer: u32, body: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            match decode::<Ask>(&body)? {
                Ask::Cursor => Ok(encode(&self.peers.cursor_answer(peer))),
            }
        })
    }
}

impl Eventual {
    async fn receive(&self, peer: u32, msg: Msg) -> Result<(), String> {
        let label = peer.to_string();
        match msg {
            Msg::Entries {
                incarnation,
                entries,
            } => {
                let (Some(&(first, _)), Some(&(last, _))) = (entries.first(), entries.last())
                else {
                    return Ok(());
                };
                let count = entries.len() as u64;
                let newest = entries.iter().map(|(_, e)| e.version.ts).max().unwrap_or(0);
                // An error leaves the cursor where it was: the connection
                // ends, and the peer resends from the cursor it asks for.
                self.apply(entries.into_iter().map(|(_, e)| e).collect())
                    .await?;
                let cursor = Cursor {
                    incarnation,
                    seq: last,
                };
                self.peers.entries_applied(peer, first, cursor, count);
                if let Some(epoch) = self.peers.resync_due(peer) {
                    tracing::info!(
                        peer,
                        first,
                        "this replica does not have all of the peer's log before these entries; \
                         asking it for a full resync"
                    );
                    if self.tell(peer, &Msg::ResyncMe { epoch }) {
                        self.peers.asked(peer);
                    }
                }
                self.replication
                    .applied
                    .with_label_values(&[&label])
                    .inc_by(count);
                self.replication.messages.with_label_values(&[&label]).inc();
                let age_ms = unix_ms().saturating_sub(newest >> 16);
                self.replication
                    .replication_delay
                    .set(age_ms as f64 / 1000.0);
                if let Some(cursor) = self.peers.applied_cursor(peer) {
                    self.tell(peer, &Msg::Ack { cursor });
                }
            }
            Msg::Snapshot { entries } => {
                let changed = self.apply(entries).await? as u64;
                self.peers.repaired(peer, changed);
                self.replication
                    .repaired
                    .with_label_values(&[&label])
                    .inc_by(changed);
            }
            Msg::SnapshotDone {
                incarnation,
                seq,
                epoch,
            } => {
                let cursor = Cursor { incarnation, seq };
                if self.peers.snapshot_applied(peer, cursor, epoch) {
                    tracing::info!(peer, seq, "full resync from peer applied");
                    self.tell(peer, &Msg::Ack { cursor });
                } else {
                    tracing::debug!(
                        peer,
                        epoch = ?epoch,
                        "a full resync begun before this node asked for one; still waiting"
                    );
                }
            }
            Msg::Ack { cursor } => self.peers.acked(peer, cursor),
            Msg::Digest { buckets } => {
                // Every message the peer sent before its digest is applied,
                // so this replica's digest, taken now, covers what the
                // peer's does. It is computed beside the apply loop, which
                // goes on meanwhile; a newer digest replaces one still
                // being answered.
                if let (Some(me), Some(slot)) = (self.me.upgrade(), self.peers.get(peer)) {
                    let task = tokio::spawn(async move { me.answer_digest(peer, buckets).await });
                    if let Some(old) = slot.replace_digest(task.abort_handle()) {
                        old.abort();
                    }
                }
            }
            Msg::DigestDiff { buckets } => {
                if let Some(p) = self.peers.get(peer)
                    && p.diffs_tx.try_send(buckets).is_err()
                {
                    tracing::debug!(peer, "ignoring a digest answer nobody asked for");
                }
            }
            Msg::ResyncMe { epoch } => {
                if self.peers.wants_resync(peer, epoch)
                    && let Some(p) = self.peers.get(peer)
                {
                    tracing::info!(peer, epoch = epoch.n, "peer asked for a full resync");
                    p.resync.notify_one();
                }
            }
        }
        Ok(())
    }

    /// Sends `msg` to `peer` if its link has room now. For acks and
    /// requests that are repeated or superseded later: waiting for room
    /// here could hold up the apply loop behind this node's own pushes.
    /// Returns whether it went.
    fn tell(&self, peer: u32, msg: &Msg) -> bool {
        self.cluster
            .try_link(peer)
            .is_some_and(|link| link.try_send(encode(msg)).is_ok())
    }

    async fn answer_digest(&self, peer: u32, theirs: Vec<u64>) {
        let mine = match self.list_keys().await {
            Ok(keys) => Digest::of(self, &keys, self.settings.tombstone_grace).await,
            Err(e) => Err(e),
        };
        let buckets = match mine.map(|m| m.differing(&theirs)) {
            Ok(Some(diff)) => diff,
            Ok(None) => {
                tracing::warn!(peer, "anti-entropy: malformed digest from peer");
                return;
            }
            Err(e) => {
                tracing::warn!(
                    peer,
                    error = %e,
                    "anti-entropy: cannot compute this replica's digest; answering that nothing differs"
                );
                Vec::new()
            }
        };
        if let Err(e) = self
            .cluster
            .send(peer, encode(&Msg::DigestDiff { buckets }))
            .await
        {
            tracing::debug!(peer, error = %e, "anti-entropy: answer not sent");
        }
    }

    /// Checks the backing store's identity; when it changed (restarted
    /// empty), forgets every peer's cursor, writes this node's own recent
    /// writes (the backlog) back into the store, and asks every peer for a
    /// full resync. On every check, asks again any peer whose resync is
    /// still awaited and was not asked for recently (a request can be lost
    /// with a connection).
    pub(super) async fn watch_store(self: Arc<Self>, shutdown: CancellationToken) {
        let mut known: Option<String> = None;
        let mut tick = tokio::time::interval(self.settings.store_check_interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Ok(now) = self.backend.instance().await {
                if known.as_ref().is_some_and(|k| *k != now) {
                    tracing::warn!(
                        before = known.as_deref().unwrap_or_default(),
                        now = %now,
                        "backing store restarted; asking every peer for a full resync"
                    );
                    self.peers.forget_cursors();
                    self.replication.store_restarts.inc();
                    self.restore_own_writes().await;
                }
                known = Some(now);
            }
            for peer in self.cluster.peer_ids() {
                let Some(epoch) = self.peers.resync_due(peer) else {
                    continue;
                };
                let ask = self.cluster.send(peer, encode(&Msg::ResyncMe { epoch }));
                match tokio::time::timeout(ASK_WAIT, ask).await {
                    Ok(Ok(())) => self.peers.asked(peer),
                    Ok(Err(e)) => tracing::debug!(peer, error = %e, "resync request not sent"),
                    Err(_) => tracing::debug!(peer, "resync request not sent: link busy"),
                }
            }
        }
    }

    /// Writes the backlog (this node's recent writes) into a store that
    /// lost its data: those not yet on a peer when the peer reads its
    /// store for the resync would otherwise come back only by
    /// anti-entropy. Last-writer-wins makes a write that is already there
    /// a no-op.
    async fn restore_own_writes(&self) {
        let entries = self.backlog.all().into_iter().map(|(_, e)| (*e).clone());
        let restored = match self.apply(entries.collect()).await {
            Ok(restored) => restored,
            Err(e) => {
                tracing::debug!(error = %e, "cannot restore this node's writes yet");
                return;
            }
        };
        tracing::info!(
            restored,
            "this node's recent writes written back to its store"
        );
    }
}
