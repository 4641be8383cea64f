//! The outbound link to one peer: connect, prove the secret, then push this
//! node's replication log from the peer's cursor (or a full resync when the
//! cursor is void or out of the window), with heartbeats between, and run
//! anti-entropy rounds: send this replica's digest, and this replica's
//! entries of the buckets where the peer answers that its replica differs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;

use super::backlog::TooOld;
use super::digest::{self, BUCKETS, CHUNK, Digest};
use super::wire::{
    Cursor, Entry, Frame, PROTOCOL_VERSION, Wire, WireError, WireRx, WireTx, entry_bytes,
    frame_runs, hello_proof, nonce, proofs_match, welcome_proof,
};
use super::{Cluster, Replica};
use crate::BoxFuture;

/// Entries read per key batch during a full resync.
const SNAPSHOT_CHUNK: usize = 256;

#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("refused by the peer: {0}")]
    Refused(String),
    #[error("replica: {0}")]
    Replica(String),
}

pub(super) fn now_ms() -> u64 {
    now_us() / 1000
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn heartbeat(cluster: &Cluster) -> Frame {
    Frame::Heartbeat {
        sent_us: now_us(),
        health: cluster.health(),
    }
}

/// Waits for the future in `slot`, or forever when there is none (for a
/// `select!` branch; the slot is emptied by the caller).
pub(super) async fn in_slot<T>(slot: &mut Option<BoxFuture<'_, T>>) -> T {
    match slot {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Keeps a link to `peer` up until `shutdown`, reconnecting with backoff.
pub(super) async fn run(
    cluster: Arc<Cluster>,
    peer: u32,
    addr: SocketAddr,
    replica: Arc<dyn Replica>,
    shutdown: CancellationToken,
) {
    let min_backoff = Duration::from_millis(50);
    let mut backoff = min_backoff;
    let mut was_up = false;
    loop {
        let mut connected = false;
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = session(&cluster, peer, addr, &*replica, &mut connected) => r,
        };
        if let Err(e) = result {
            if connected || was_up {
                tracing::warn!(peer, %addr, error = %e, "link to peer lost; reconnecting");
            } else {
                tracing::debug!(peer, %addr, error = %e, "cannot reach peer");
            }
        }
        if connected {
            backoff = min_backoff;
        }
        was_up = connected;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(cluster.settings.reconnect_max);
    }
}

async fn session(
    cluster: &Cluster,
    peer: u32,
    addr: SocketAddr,
    replica: &dyn Replica,
    connected: &mut bool,
) -> Result<(), LinkError> {
    let s = &cluster.settings;
    let stream = tokio::time::timeout(s.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| LinkError::Wire(WireError::Timeout))?
        .map_err(LinkError::Connect)?;
    let mut wire = Wire::new(stream);
    let cursor = handshake(cluster, peer, &mut wire).await?;
    *connected = true;
    cluster.peers.heard(peer);
    tracing::info!(peer, %addr, resume = ?cursor, "link to peer up");
    let (tx, rx) = wire.split();
    // The peer's answers to our digests, from the reader to the pusher (one
    // round is outstanding at a time).
    let (diffs_tx, diffs_rx) = mpsc::channel(1);
    tokio::select! {
        r = read_acks(cluster, peer, rx, diffs_tx) => r,
        r = push(cluster, peer, tx, cursor, replica, diffs_rx) => r,
    }
}

/// Returns the peer's cursor of our log.
async fn handshake(
    cluster: &Cluster,
    peer: u32,
    wire: &mut Wire,
) -> Result<Option<Cursor>, LinkError> {
    let s = &cluster.settings;
    let wait = s.connect_timeout.max(Duration::from_secs(1));
    let Frame::Challenge { nonce: theirs } = recv_within(wire, wait).await? else {
        return Err(WireError::Handshake("expected a challenge".into()).into());
    };
    let mine = nonce();
    wire.send(&Frame::Hello {
        protocol: PROTOCOL_VERSION,
        cluster: s.cluster_name.clone(),
        node: s.node_id,
        incarnation: cluster.backlog.incarnation,
        nonce: mine,
        proof: hello_proof(
            &s.secret,
            &s.cluster_name,
            s.node_id,
            cluster.backlog.incarnation,
            &theirs,
            &mine,
        ),
    })
    .await?;
    match recv_within(wire, wait).await? {
        Frame::Welcome {
            node,
            proof,
            cursor,
        } => {
            let expected = welcome_proof(&s.secret, &s.cluster_name, peer, &mine);
            if node != peer || !proofs_match(&proof, &expected) {
                return Err(WireError::Handshake(format!(
                    "the node at this address did not prove it is peer {peer} of this cluster"
                ))
                .into());
            }
            Ok(cursor)
        }
        Frame::Refused { reason } => Err(LinkError::Refused(reason)),
        _ => Err(WireError::Handshake("expected welcome or refusal".into()).into()),
    }
}

async fn recv_within(wire: &mut Wire, wait: Duration) -> Result<Frame, WireError> {
    tokio::time::timeout(wait, wire.recv())
        .await
        .map_err(|_| WireError::Timeout)?
}

async fn read_acks(
    cluster: &Cluster,
    peer: u32,
    mut rx: WireRx,
    diffs: mpsc::Sender<Vec<u16>>,
) -> Result<(), LinkError> {
    loop {
        match rx.recv().await? {
            Frame::Ack {
                cursor,
                echo_us,
                health,
            } => {
                cluster.peers.acked(peer, cursor);
                cluster.peers.health(peer, health);
                if let Some(sent) = echo_us {
                    cluster
                        .peers
                        .rtt(peer, Duration::from_micros(now_us().saturating_sub(sent)));
                }
            }
            Frame::DigestDiff { buckets } => {
                cluster.peers.heard(peer);
                if diffs.try_send(buckets).is_err() {
                    tracing::debug!(peer, "ignoring a digest answer nobody asked for");
                }
            }
            _ => return Err(WireError::Handshake("unexpected frame from peer".into()).into()),
        }
    }
}

/// One link's anti-entropy rounds. A round: compute this replica's digest
/// beside the log push (entries and heartbeats keep flowing), send it once
/// every log entry written meanwhile is sent, wait for the peer's answer,
/// send this replica's entries of the buckets it names. Rounds start a
/// jittered interval after the previous one ended, never during a full
/// resync.
struct AntiEntropy<'a> {
    interval: Option<Duration>,
    next: Instant,
    computing: Option<BoxFuture<'a, Result<Digest, String>>>,
    /// Computed, to send once the log is flushed.
    ready: Option<Digest>,
    /// Sent; the peer's answer is awaited.
    awaiting: bool,
}

impl AntiEntropy<'_> {
    fn new(interval: Option<Duration>) -> Self {
        let mut ae = AntiEntropy {
            interval,
            next: Instant::now(),
            computing: None,
            ready: None,
            awaiting: false,
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

    fn idle(&self) -> bool {
        self.interval.is_some()
            && self.computing.is_none()
            && self.ready.is_none()
            && !self.awaiting
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

async fn push(
    cluster: &Cluster,
    peer: u32,
    mut tx: WireTx,
    cursor: Option<Cursor>,
    replica: &dyn Replica,
    mut diffs: mpsc::Receiver<Vec<u16>>,
) -> Result<(), LinkError> {
    let s = &cluster.settings;
    let backlog = &cluster.backlog;
    let mut head = backlog.subscribe();
    let resumable =
        |c: &Cursor| c.incarnation == backlog.incarnation && backlog.read_after(c.seq, 0).is_ok();
    let mut sent = match cursor {
        Some(c) if resumable(&c) => c.seq,
        _ => full_resync(cluster, peer, &mut tx, replica).await?,
    };
    let mut beat = tokio::time::interval(s.heartbeat_interval);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ae = AntiEntropy::new(s.anti_entropy_interval);
    let label = peer.to_string();
    loop {
        match backlog.read_after(sent, s.batch_max) {
            Ok(batch) if !batch.is_empty() => {
                for run in frame_runs(batch, |(_, e)| entry_bytes(e)) {
                    sent = run.last().map_or(sent, |(seq, _)| *seq);
                    let entries = run
                        .into_iter()
                        .map(|(seq, e)| (seq, (*e).clone()))
                        .collect();
                    tx.send(&Frame::Entries { entries }).await?;
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
                sent = full_resync(cluster, peer, &mut tx, replica).await?;
                continue;
            }
        }
        // Every log entry written while the digest was computed is sent
        // now, so the peer's replica includes all that the digest covers.
        if let Some(d) = ae.ready.take() {
            tx.send(&Frame::Digest {
                buckets: d.into_buckets(),
            })
            .await?;
            ae.awaiting = true;
        }
        tokio::select! {
            changed = head.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = beat.tick() => {
                tx.send(&heartbeat(cluster)).await?;
            }
            _ = tokio::time::sleep_until(ae.next), if ae.idle() => {
                ae.computing = Some(Box::pin(async move {
                    let keys = cluster.list_keys(replica).await?;
                    Digest::of(replica, &keys, s.tombstone_grace).await
                }));
            }
            digest = in_slot(&mut ae.computing), if ae.computing.is_some() => {
                ae.computing = None;
                match digest {
                    Ok(d) => ae.ready = Some(d),
                    Err(e) => {
                        tracing::warn!(peer, error = %e, "anti-entropy: cannot compute this replica's digest");
                        ae.schedule();
                    }
                }
            }
            diff = diffs.recv() => {
                let Some(buckets) = diff else { return Ok(()) };
                if !ae.awaiting {
                    continue;
                }
                ae.awaiting = false;
                cluster.metrics.antientropy_rounds.with_label_values(&[&label]).inc();
                if !buckets.is_empty() {
                    match repair(cluster, peer, &mut tx, replica, &buckets, &mut beat).await {
                        Ok(entries) => tracing::debug!(
                            peer,
                            buckets = buckets.len(),
                            entries,
                            "anti-entropy: replicas differ; sent this replica's entries of those buckets"
                        ),
                        Err(LinkError::Replica(e)) => tracing::warn!(
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

/// Sends this replica's entries of `buckets` (where the peer's replica
/// differs) as snapshot chunks, which the peer applies last-writer-wins; the
/// peer's cursor does not move. Returns how many entries were sent. Entries
/// newer on the peer are sent to us by the peer's own link.
async fn repair(
    cluster: &Cluster,
    peer: u32,
    tx: &mut WireTx,
    replica: &dyn Replica,
    buckets: &[u16],
    beat: &mut Interval,
) -> Result<usize, LinkError> {
    let mut wanted = vec![false; BUCKETS];
    for &b in buckets {
        if let Some(w) = wanted.get_mut(usize::from(b)) {
            *w = true;
        }
    }
    let keys: Vec<Bytes> = cluster
        .list_keys(replica)
        .await
        .map_err(LinkError::Replica)?
        .into_iter()
        .filter(|k| wanted[digest::bucket(k)])
        .collect();
    let grace = cluster.settings.tombstone_grace;
    let mut sent = 0;
    for chunk in keys.chunks(CHUNK) {
        let now = now_ms();
        let entries: Vec<Entry> = replica
            .read(chunk)
            .await
            .map_err(LinkError::Replica)?
            .into_iter()
            .filter(|e| digest::compared(e, now, grace))
            .collect();
        sent += entries.len();
        send_snapshot(tx, entries).await?;
        // A large repair must not silence the link.
        if beat.tick().now_or_never().is_some() {
            tx.send(&heartbeat(cluster)).await?;
        }
    }
    tracing::trace!(peer, keys = keys.len(), sent, "anti-entropy repair sent");
    Ok(sent)
}

/// Sends entries as `Snapshot` frames within the frame budget.
async fn send_snapshot(tx: &mut WireTx, entries: Vec<Entry>) -> Result<(), WireError> {
    for entries in frame_runs(entries, entry_bytes) {
        tx.send(&Frame::Snapshot { entries }).await?;
    }
    Ok(())
}

/// Sends this replica's whole state; returns the log position it covers.
async fn full_resync(
    cluster: &Cluster,
    peer: u32,
    tx: &mut WireTx,
    replica: &dyn Replica,
) -> Result<u64, LinkError> {
    // Every entry up to `seq` is already applied to the store, so the state
    // read below includes it; later entries follow from the log.
    let seq = cluster.backlog.head();
    let keys = cluster
        .list_keys(replica)
        .await
        .map_err(LinkError::Replica)?;
    tracing::info!(peer, keys = keys.len(), seq, "sending a full resync");
    for chunk in keys.chunks(SNAPSHOT_CHUNK) {
        let entries = replica.read(chunk).await.map_err(LinkError::Replica)?;
        send_snapshot(tx, entries).await?;
    }
    tx.send(&Frame::SnapshotDone { seq }).await?;
    cluster
        .metrics
        .full_resyncs_sent
        .with_label_values(&[&peer.to_string()])
        .inc();
    Ok(seq)
}
