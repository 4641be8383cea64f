//! The outbound link to one peer: connect, prove the secret, then push this
//! node's replication log from the peer's cursor (or a full resync when the
//! cursor is void or out of the window), with heartbeats between.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::backlog::TooOld;
use super::wire::{
    Cursor, Frame, Health, PROTOCOL_VERSION, Wire, WireError, WireRx, WireTx, hello_proof, nonce,
    proofs_match, welcome_proof,
};
use super::{Cluster, Replica};

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

fn health(cluster: &Cluster) -> Health {
    Health {
        requests_total: (cluster.requests_total)(),
        log_head: cluster.backlog.head(),
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
    tokio::select! {
        r = read_acks(cluster, peer, rx) => r,
        r = push(cluster, peer, tx, cursor, replica) => r,
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

async fn read_acks(cluster: &Cluster, peer: u32, mut rx: WireRx) -> Result<(), LinkError> {
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
            _ => return Err(WireError::Handshake("unexpected frame from peer".into()).into()),
        }
    }
}

async fn push(
    cluster: &Cluster,
    peer: u32,
    mut tx: WireTx,
    cursor: Option<Cursor>,
    replica: &dyn Replica,
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
    loop {
        match backlog.read_after(sent, s.batch_max) {
            Ok(batch) if !batch.is_empty() => {
                sent = batch.last().map_or(sent, |(seq, _)| *seq);
                let entries = batch
                    .into_iter()
                    .map(|(seq, e)| (seq, (*e).clone()))
                    .collect();
                tx.send(&Frame::Entries { entries }).await?;
                continue;
            }
            Ok(_) => {}
            Err(TooOld) => {
                tracing::warn!(
                    peer,
                    sent,
                    "peer fell behind the replication backlog; sending a full resync"
                );
                sent = full_resync(cluster, peer, &mut tx, replica).await?;
                continue;
            }
        }
        tokio::select! {
            changed = head.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = beat.tick() => {
                tx.send(&Frame::Heartbeat { sent_us: now_us(), health: health(cluster) }).await?;
            }
        }
    }
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
    let keys = replica.keys().await.map_err(LinkError::Replica)?;
    tracing::info!(peer, keys = keys.len(), seq, "sending a full resync");
    for chunk in keys.chunks(SNAPSHOT_CHUNK) {
        let entries = replica.read(chunk).await.map_err(LinkError::Replica)?;
        if !entries.is_empty() {
            tx.send(&Frame::Snapshot { entries }).await?;
        }
    }
    tx.send(&Frame::SnapshotDone { seq }).await?;
    cluster
        .metrics
        .full_resyncs_sent
        .with_label_values(&[&peer.to_string()])
        .inc();
    Ok(seq)
}
