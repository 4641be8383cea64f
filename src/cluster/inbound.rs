//! The internal port's acceptor: challenge every dialer, refuse those that
//! cannot prove the shared secret (logged and counted), then, per peer,
//! answer heartbeats at once and hand the mode's messages and requests to
//! the [`Handler`]: messages one at a time, in order, requests beside them. A message for another mode or
//! another version of this mode's messages is refused (logged once per
//! connection and counted); the connection stays up.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::wire::{
    Frame, PROTOCOL_VERSION, Wire, WireError, WireRx, WireTag, WireTx, hello_proof, nonce,
    proofs_match, welcome_proof,
};
use super::{Cluster, Handler};
use crate::BoxFuture;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Mode frames read ahead of the handler before reading stops...
const AHEAD: usize = 16;

/// ...or bytes of their bodies (a larger body waits for all of them).
const AHEAD_BYTES: usize = 16 * 1024 * 1024;

/// Frames written before a flush, so that a long run of answers does not
/// hold back what is queued behind it.
const WRITE_RUN: usize = 32;

pub(super) async fn serve(
    cluster: Arc<Cluster>,
    listener: TcpListener,
    handler: Arc<dyn Handler>,
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
        let (cluster, handler, shutdown) = (cluster.clone(), handler.clone(), shutdown.clone());
        tracker.spawn(
            async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    r = connection(&cluster, stream, &*handler) => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "peer connection ended");
                        }
                    }
                }
            }
            // At debug, as a client connection's span: an enabled span is
            // entered and left on every poll. The lines logged under it
            // name their peer themselves.
            .instrument(tracing::debug_span!("peer_in", %from)),
        );
    }
}

#[derive(Debug, thiserror::Error)]
enum InboundError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("refused: {0}")]
    Refused(&'static str),
    #[error("handler: {0}")]
    Handler(String),
}

/// A mode frame, waiting for the handler, with its share of the
/// read-ahead budget.
enum Work {
    Message(Bytes, OwnedSemaphorePermit),
    Request(u64, Bytes, OwnedSemaphorePermit),
}

async fn connection(
    cluster: &Cluster,
    stream: TcpStream,
    handler: &dyn Handler,
) -> Result<(), InboundError> {
    let mut wire = Wire::new(stream);
    let peer = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(cluster, &mut wire)).await {
        Ok(r) => r?,
        Err(_) => return Err(WireError::Timeout.into()),
    };
    cluster.peers.heard(peer);
    let (tx, rx) = wire.split();
    let (out, replies) = mpsc::channel(AHEAD);
    let (work, queue) = mpsc::channel(AHEAD);
    let budget = Arc::new(Semaphore::new(AHEAD_BYTES));
    // A peer has one inbound connection at a time: a new one ends the
    // old and waits until its handler has stopped, so messages from one
    // peer are handled in order across reconnects too.
    let (ended, turn) = cluster.inbound_turn(peer);
    let _turn = turn.lock().await;
    async {
        tokio::select! {
            _ = ended.cancelled() => Err(WireError::Closed.into()),
            r = read(cluster, peer, rx, &out, &work, &budget) => r,
            r = handle(handler, peer, cluster.settings.node_id, queue, &out) => r,
            r = write(tx, replies) => r,
        }
    }
    .instrument(tracing::debug_span!("from_peer", peer))
    .await
}

/// Reads the peer's frames: heartbeats are answered here, beside the
/// handler, so a busy handler does not make a live peer look dead unless it
/// falls [`AHEAD`] frames behind; mode frames queue for the handler.
async fn read(
    cluster: &Cluster,
    peer: u32,
    mut rx: WireRx,
    out: &mpsc::Sender<Frame>,
    work: &mpsc::Sender<Work>,
    budget: &Arc<Semaphore>,
) -> Result<(), InboundError> {
    let mut warned = false;
    let closed = || InboundError::Wire(WireError::Closed);
    loop {
        let frame = rx.recv().await?;
        cluster.peers.heard(peer);
        let (mode, job) = match frame {
            Frame::Heartbeat { sent_us, health } => {
                cluster.peers.health(peer, health);
                out.send(Frame::HeartbeatAck {
                    echo_us: sent_us,
                    health: cluster.health(),
                })
                .await
                .map_err(|_| closed())?;
                continue;
            }
            Frame::Message { mode, body } => {
                let permit = take(budget, body.len()).await?;
                (mode, Work::Message(body, permit))
            }
            Frame::Request { id, mode, body } => {
                let permit = take(budget, body.len()).await?;
                (mode, Work::Request(id, body, permit))
            }
            _ => {
                return Err(WireError::Handshake("unexpected frame after handshake".into()).into());
            }
        };
        if let Some(reason) = cluster.tag.mismatch(&mode) {
            refuse(cluster, peer, &mode, reason, &mut warned);
            if let Work::Request(id, ..) = job {
                let reason = format!(
                    "this node runs {} v{}, not {} v{}",
                    cluster.tag.name, cluster.tag.version, mode.name, mode.version
                );
                out.send(Frame::Rejected { id, reason })
                    .await
                    .map_err(|_| closed())?;
            }
            continue;
        }
        work.send(job).await.map_err(|_| closed())?;
    }
}

/// Waits for `len` bytes (at most the whole budget) of read-ahead room.
async fn take(budget: &Arc<Semaphore>, len: usize) -> Result<OwnedSemaphorePermit, InboundError> {
    let n = u32::try_from(len.min(AHEAD_BYTES)).unwrap_or(u32::MAX);
    budget
        .clone()
        .acquire_many_owned(n)
        .await
        .map_err(|_| InboundError::Wire(WireError::Closed))
}

fn refuse(cluster: &Cluster, peer: u32, theirs: &WireTag, reason: &'static str, warned: &mut bool) {
    cluster
        .metrics
        .messages_refused
        .with_label_values(&[reason])
        .inc();
    if !*warned {
        *warned = true;
        tracing::warn!(
            peer,
            theirs = %format!("{} v{}", theirs.name, theirs.version),
            ours = %format!("{} v{}", cluster.tag.name, cluster.tag.version),
            "refusing the peer's messages: it runs another consistency mode or message version \
             (counted in memdial_peer_messages_refused_total)"
        );
    }
}

/// Requests from one peer that run at once; more wait in the queue.
const CONCURRENT_REQUESTS: usize = 256;

/// Hands mode frames to the handler: messages one at a time, in order;
/// requests as they come, each running beside the others and beside the
/// messages that follow it (a Raft peer's forwarded writes wait for a
/// commit, and must not wait for each other). A request starts only once
/// every message before it has been handled.
async fn handle(
    handler: &dyn Handler,
    peer: u32,
    me: u32,
    mut queue: mpsc::Receiver<Work>,
    out: &mpsc::Sender<Frame>,
) -> Result<(), InboundError> {
    let mut requests = FuturesUnordered::new();
    let mut message: Option<BoxFuture<'_, Result<(), String>>> = None;
    let mut open = true;
    while open || !requests.is_empty() || message.is_some() {
        tokio::select! {
            Some(reply) = requests.next(), if !requests.is_empty() => {
                if out.send(reply).await.is_err() {
                    break;
                }
            }
            done = async { message.as_mut().expect("guarded").await }, if message.is_some() => {
                message = None;
                if let Err(e) = done {
                    // The writer sends this, then closes the connection; the
                    // peer logs the reason.
                    let reason = format!("node {me} could not take the message: {e}");
                    let _ = out.send(Frame::Refused { reason }).await;
                    return std::future::pending().await;
                }
            }
            job = queue.recv(), if open && message.is_none() && requests.len() < CONCURRENT_REQUESTS => {
                match job {
                    None => open = false,
                    Some(Work::Message(body, permit)) => {
                        message = Some(Box::pin(async move {
                            let _permit = permit;
                            handler.on_message(peer, body).await
                        }));
                    }
                    Some(Work::Request(id, body, permit)) => requests.push(async move {
                        let _permit = permit;
                        match handler.on_request(peer, body).await {
                            Ok(body) => Frame::Response { id, body },
                            Err(reason) => Frame::Rejected { id, reason },
                        }
                    }),
                }
            }
        }
    }
    Ok(())
}

/// Writes answers in order; a `Refused` is the last frame: the connection
/// closes after it.
async fn write(mut tx: WireTx, mut replies: mpsc::Receiver<Frame>) -> Result<(), InboundError> {
    while let Some(first) = replies.recv().await {
        let mut next = Some(first);
        let mut written = 0;
        while let Some(frame) = next.take() {
            if let Frame::Refused { reason } = &frame {
                let reason = reason.clone();
                tx.send(frame).await?;
                return Err(InboundError::Handler(reason));
            }
            tx.feed(frame).await?;
            written += 1;
            if written < WRITE_RUN {
                next = replies.try_recv().ok();
            }
        }
        tx.flush().await?;
    }
    Ok(())
}

/// Returns the authenticated peer.
async fn handshake(cluster: &Cluster, wire: &mut Wire) -> Result<u32, InboundError> {
    let s = &cluster.settings;
    let mine = nonce();
    wire.send(Frame::Challenge { nonce: mine }).await?;
    let Frame::Hello {
        protocol,
        cluster: name,
        node,
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
        &hello_proof(&s.secret, &s.cluster_name, node, &mine, &theirs),
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
            .send(Frame::Refused {
                reason: text.into(),
            })
            .await;
        return Err(InboundError::Refused(text));
    }
    wire.send(Frame::Welcome {
        node: s.node_id,
        proof: welcome_proof(&s.secret, &s.cluster_name, s.node_id, &theirs),
    })
    .await?;
    Ok(node)
}
