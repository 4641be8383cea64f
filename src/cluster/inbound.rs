//! The internal port's acceptor: challenge every dialer, refuse those that
//! cannot prove the shared secret (logged and counted), apply what the
//! accepted ones send, and answer their anti-entropy digests.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::digest::{BUCKETS, Digest};
use super::link::in_slot;
use super::wire::{
    Cursor, Frame, PROTOCOL_VERSION, Wire, WireError, hello_proof, nonce, proofs_match,
    welcome_proof,
};
use super::{Cluster, Replica};
use crate::BoxFuture;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) async fn serve(
    cluster: Arc<Cluster>,
    listener: TcpListener,
    replica: Arc<dyn Replica>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "listening for peers");
    loop {
        let (stream, from) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "internal accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (cluster, replica, shutdown) = (cluster.clone(), replica.clone(), shutdown.clone());
        tracker.spawn(
            async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    r = handle(&cluster, stream, &*replica) => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "peer connection ended");
                        }
                    }
                }
            }
            .instrument(tracing::info_span!("peer_in", %from)),
        );
    }
}

#[derive(Debug, thiserror::Error)]
enum InboundError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("refused: {0}")]
    Refused(&'static str),
    #[error("replica: {0}")]
    Replica(String),
    #[error("local store restarted; closing so the peer resyncs")]
    Resync,
}

async fn handle(
    cluster: &Cluster,
    stream: TcpStream,
    replica: &dyn Replica,
) -> Result<(), InboundError> {
    let mut wire = Wire::new(stream);
    let (peer, incarnation) =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(cluster, &mut wire)).await {
            Ok(r) => r?,
            Err(_) => return Err(WireError::Timeout.into()),
        };
    apply_loop(cluster, wire, replica, peer, incarnation)
        .instrument(tracing::info_span!("from_peer", peer))
        .await
}

/// Applies what an authenticated peer sends until it goes away.
async fn apply_loop(
    cluster: &Cluster,
    mut wire: Wire,
    replica: &dyn Replica,
    peer: u32,
    incarnation: u64,
) -> Result<(), InboundError> {
    let mut resync = cluster.resync.subscribe();
    resync.mark_unchanged();
    cluster.peers.heard(peer);
    let label = peer.to_string();
    // The answer to the peer's latest digest, computed while its frames
    // keep being applied and its heartbeats acknowledged.
    let mut digesting: Option<BoxFuture<'_, Vec<u16>>> = None;
    loop {
        let frame = tokio::select! {
            _ = resync.changed() => return Err(InboundError::Resync),
            diff = in_slot(&mut digesting), if digesting.is_some() => {
                digesting = None;
                wire.send(&Frame::DigestDiff { buckets: diff }).await?;
                continue;
            }
            f = wire.recv() => f?,
        };
        cluster.peers.heard(peer);
        match frame {
            Frame::Entries { entries } => {
                let Some(&(last, _)) = entries.last() else {
                    continue;
                };
                let count = entries.len() as u64;
                let newest = entries.iter().map(|(_, e)| e.version.ts).max().unwrap_or(0);
                replica
                    .apply(entries.into_iter().map(|(_, e)| e).collect())
                    .await
                    .map_err(InboundError::Replica)?;
                let cursor = Cursor {
                    incarnation,
                    seq: last,
                };
                cluster.peers.set_applied_cursor(peer, cursor, count);
                cluster
                    .metrics
                    .applied
                    .with_label_values(&[&label])
                    .inc_by(count);
                let age_ms = super::link::now_ms().saturating_sub(newest >> 16);
                cluster
                    .metrics
                    .replication_delay
                    .set(age_ms as f64 / 1000.0);
                wire.send(&Frame::Ack {
                    cursor: Some(cursor),
                    echo_us: None,
                    health: cluster.health(),
                })
                .await?;
            }
            Frame::Snapshot { entries } => {
                let changed = replica
                    .apply(entries)
                    .await
                    .map_err(InboundError::Replica)?;
                cluster.peers.repaired(peer, changed as u64);
                cluster
                    .metrics
                    .repaired
                    .with_label_values(&[&label])
                    .inc_by(changed as u64);
            }
            Frame::SnapshotDone { seq } => {
                let cursor = Cursor { incarnation, seq };
                cluster.peers.set_applied_cursor(peer, cursor, 0);
                tracing::info!(seq, "full resync from peer applied");
                wire.send(&Frame::Ack {
                    cursor: Some(cursor),
                    echo_us: None,
                    health: cluster.health(),
                })
                .await?;
            }
            Frame::Heartbeat {
                sent_us,
                health: theirs,
            } => {
                cluster.peers.health(peer, theirs);
                let cursor = cluster.peers.applied_cursor(peer);
                wire.send(&Frame::Ack {
                    cursor,
                    echo_us: Some(sent_us),
                    health: cluster.health(),
                })
                .await?;
            }
            Frame::Digest { buckets: theirs } => {
                if theirs.len() != BUCKETS {
                    return Err(WireError::Handshake("malformed digest".into()).into());
                }
                // Every frame the peer sent before its digest is applied, so
                // this replica's digest, taken now, covers what the peer's
                // does.
                let grace = cluster.settings.tombstone_grace;
                digesting = Some(Box::pin(async move {
                    let mine = match cluster.list_keys(replica).await {
                        Ok(keys) => Digest::of(replica, &keys, grace).await,
                        Err(e) => Err(e),
                    };
                    match mine {
                        Ok(mine) => mine.differing(&theirs).unwrap_or_default(),
                        Err(e) => {
                            tracing::warn!(
                                error = %e,
                                "anti-entropy: cannot compute this replica's digest; \
                                 answering that nothing differs"
                            );
                            Vec::new()
                        }
                    }
                }));
            }
            _ => {
                return Err(WireError::Handshake("unexpected frame after handshake".into()).into());
            }
        }
    }
}

/// Returns the authenticated peer and its incarnation.
async fn handshake(cluster: &Cluster, wire: &mut Wire) -> Result<(u32, u64), InboundError> {
    let s = &cluster.settings;
    let mine = nonce();
    wire.send(&Frame::Challenge { nonce: mine }).await?;
    let Frame::Hello {
        protocol,
        cluster: name,
        node,
        incarnation,
        nonce: theirs,
        proof,
    } = wire.recv().await?
    else {
        return Err(WireError::Handshake("expected hello".into()).into());
    };
    let refusal = if protocol != PROTOCOL_VERSION {
        Some(("protocol", "unsupported protocol version"))
    } else if name != s.cluster_name {
        Some(("cluster", "wrong cluster name"))
    } else if !cluster.peers.is_peer(node) {
        Some(("node", "not a peer of this node"))
    } else if !proofs_match(
        &proof,
        &hello_proof(
            &s.secret,
            &s.cluster_name,
            node,
            incarnation,
            &mine,
            &theirs,
        ),
    ) {
        Some(("secret", "wrong secret"))
    } else {
        None
    };
    if let Some((reason, text)) = refusal {
        cluster
            .metrics
            .handshakes_refused
            .with_label_values(&[reason])
            .inc();
        tracing::warn!(node, cluster = %name, reason = text, "refusing peer handshake");
        let _ = wire
            .send(&Frame::Refused {
                reason: text.into(),
            })
            .await;
        return Err(InboundError::Refused(text));
    }
    let cursor = cluster.peers.applied_cursor(node);
    wire.send(&Frame::Welcome {
        node: s.node_id,
        proof: welcome_proof(&s.secret, &s.cluster_name, s.node_id, &theirs),
        cursor,
    })
    .await?;
    Ok((node, incarnation))
}
