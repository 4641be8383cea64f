//! The outbound link to one peer: connect, prove the secret, then carry
//! this node's heartbeats and its mode's messages and requests to the
//! peer, and bring back heartbeat acks and answers. A link that breaks is
//! dialled again with backoff; each connection is a new [`PeerLink`], so a
//! mode can tell that what it sent on the old one may be lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::wire::{
    Frame, PROTOCOL_VERSION, Wire, WireError, WireRx, WireTx, hello_proof, nonce, proofs_match,
    welcome_proof,
};
use super::{Cluster, ModeTag, PeerError};
use crate::config::HostPort;
use crate::outage::Outage;
use crate::time::unix_us;

/// Mode frames queued for one connection before senders wait.
const QUEUE: usize = 16;

/// Frames written before a flush and a look at the heartbeat timer.
const WRITE_RUN: usize = 16;

/// Answers awaited on one connection, by request id.
type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<Bytes, PeerError>>>>;

/// A mode's handle on one connection to a peer. Messages sent through one
/// handle arrive in order; once its connection ends every call fails with
/// [`PeerError::Down`], also for a connection that has been replaced since.
#[derive(Clone)]
pub struct PeerLink {
    peer: u32,
    tag: ModeTag,
    out: mpsc::Sender<Frame>,
    pending: Arc<Pending>,
    next_id: Arc<AtomicU64>,
    pub(super) closed: CancellationToken,
}

impl PeerLink {
    pub fn peer(&self) -> u32 {
        self.peer
    }

    /// Queues a one-way message, waiting while the connection's queue is
    /// full.
    pub async fn send(&self, body: Bytes) -> Result<(), PeerError> {
        if self.closed.is_cancelled() {
            return Err(PeerError::Down(self.peer));
        }
        self.out
            .send(Frame::message(self.tag, body))
            .await
            .map_err(|_| PeerError::Down(self.peer))
    }

    /// Queues a one-way message if the connection's queue has room now.
    pub fn try_send(&self, body: Bytes) -> Result<(), PeerError> {
        if self.closed.is_cancelled() {
            return Err(PeerError::Down(self.peer));
        }
        self.out
            .try_send(Frame::message(self.tag, body))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => PeerError::Busy(self.peer),
                mpsc::error::TrySendError::Closed(_) => PeerError::Down(self.peer),
            })
    }

    /// Sends a request and waits for its answer (no deadline of its own:
    /// wrap it in one, or use [`Cluster::request`]).
    pub async fn request(&self, body: Bytes) -> Result<Bytes, PeerError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        // Removes the entry however this call ends (answered, timed out by
        // the caller, or dropped).
        let _forget = Forget(&self.pending, id);
        if self.closed.is_cancelled() {
            return Err(PeerError::Down(self.peer));
        }
        self.out
            .send(Frame::request(id, self.tag, body))
            .await
            .map_err(|_| PeerError::Down(self.peer))?;
        tokio::select! {
            answer = rx => answer.unwrap_or(Err(PeerError::Down(self.peer))),
            _ = self.closed.cancelled() => Err(PeerError::Down(self.peer)),
        }
    }

    /// Resolves when this connection has ended.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }
}

struct Forget<'a>(&'a Pending, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(self.0).remove(&self.1);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("refused by the peer: {0}")]
    Refused(String),
}

/// A connection that lasted this long was a working link: the next
/// reconnect starts from the shortest backoff again. One that broke sooner
/// (a handshake that succeeds, then a peer that closes at once) keeps
/// backing off.
const STABLE: Duration = Duration::from_secs(1);

/// Keeps a link to `peer` up until `shutdown`, reconnecting with backoff.
/// Logs one line when the link goes down and one when it is back (a
/// summary every few seconds in between), not one per attempt.
pub(super) async fn run(
    cluster: Arc<Cluster>,
    peer: u32,
    addr: HostPort,
    shutdown: CancellationToken,
) {
    let min_backoff = Duration::from_millis(50);
    let mut backoff = min_backoff;
    let outage = Outage::new(format!("link to peer {peer} ({addr})"));
    let mut ever_up = false;
    loop {
        let mut up_at = None;
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = connection(&cluster, peer, &addr, &mut up_at, &outage, ever_up) => r,
        };
        if let Some(slot) = cluster.links.get(&peer) {
            slot.send_replace(None);
        }
        ever_up |= up_at.is_some();
        if let Err(e) = result {
            if ever_up {
                outage.failed(&e);
            } else {
                tracing::debug!(peer, %addr, error = %e, "cannot reach peer yet");
            }
        }
        if up_at.is_some_and(|t: Instant| t.elapsed() >= STABLE) {
            backoff = min_backoff;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(cluster.settings.reconnect_max);
    }
}

/// One connection to the peer, from dialling until it breaks.
async fn connection(
    cluster: &Cluster,
    peer: u32,
    addr: &HostPort,
    up_at: &mut Option<Instant>,
    outage: &Outage,
    ever_up: bool,
) -> Result<(), LinkError> {
    let s = &cluster.settings;
    // A name is looked up again for every connection (within the connect
    // timeout), so a peer that comes back at a new address is found.
    let stream = tokio::time::timeout(s.connect_timeout, TcpStream::connect(addr.target()))
        .await
        .map_err(|_| LinkError::Wire(WireError::Timeout))?
        .map_err(LinkError::Connect)?;
    let resolved = stream
        .peer_addr()
        .map_or_else(|_| "-".to_string(), |a| a.to_string());
    let mut wire = Wire::new(stream);
    handshake(cluster, peer, &mut wire).await?;
    *up_at = Some(Instant::now());
    cluster.peers.heard(peer);
    if !ever_up {
        tracing::info!(peer, %addr, %resolved, "link to peer up");
    }
    let (tx, rx) = wire.split();
    let (out, queue) = mpsc::channel(QUEUE);
    let link = PeerLink {
        peer,
        tag: cluster.tag,
        out,
        pending: Arc::new(Mutex::new(HashMap::new())),
        next_id: Arc::new(AtomicU64::new(1)),
        closed: CancellationToken::new(),
    };
    // Cancelled however this connection ends, so its handles fail fast.
    let _closed = link.closed.clone().drop_guard();
    if let Some(slot) = cluster.links.get(&peer) {
        slot.send_replace(Some(link.clone()));
    }
    // The link is back only once a connection has held for a while: one
    // that a failing peer closes at once is still the same outage.
    let held = async {
        tokio::time::sleep(STABLE).await;
        outage.ok();
        std::future::pending::<Result<(), LinkError>>().await
    };
    tokio::select! {
        r = read(cluster, peer, rx, &link.pending) => r,
        r = write(cluster, tx, queue) => r,
        r = held => r,
    }
}

async fn handshake(cluster: &Cluster, peer: u32, wire: &mut Wire) -> Result<(), LinkError> {
    let s = &cluster.settings;
    let wait = s.connect_timeout.max(Duration::from_secs(1));
    let Frame::Challenge { nonce: theirs } = recv_within(wire, wait).await? else {
        return Err(WireError::Handshake("expected a challenge".into()).into());
    };
    let mine = nonce();
    wire.send(Frame::Hello {
        protocol: PROTOCOL_VERSION,
        cluster: s.cluster_name.clone(),
        node: s.node_id,
        nonce: mine,
        proof: hello_proof(&s.secret, &s.cluster_name, s.node_id, &theirs, &mine),
    })
    .await?;
    match recv_within(wire, wait).await? {
        Frame::Welcome { node, proof } => {
            let expected = welcome_proof(&s.secret, &s.cluster_name, peer, &mine);
            if node != peer || !proofs_match(&proof, &expected) {
                return Err(WireError::Handshake(format!(
                    "the node at this address did not prove it is peer {peer} of this cluster"
                ))
                .into());
            }
            Ok(())
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

/// Heartbeat acks and answers from the peer.
async fn read(
    cluster: &Cluster,
    peer: u32,
    mut rx: WireRx,
    pending: &Pending,
) -> Result<(), LinkError> {
    loop {
        let frame = rx.recv().await?;
        cluster.peers.heard(peer);
        let (id, answer) = match frame {
            Frame::HeartbeatAck { echo_us, health } => {
                cluster.peers.health(peer, health);
                let rtt = Duration::from_micros(unix_us().saturating_sub(echo_us));
                cluster.peers.rtt(peer, rtt);
                continue;
            }
            Frame::Response { id, body } => (id, Ok(body)),
            Frame::Rejected { id, reason } => (id, Err(PeerError::Rejected { peer, reason })),
            // The peer closes the connection, and says why.
            Frame::Refused { reason } => return Err(LinkError::Refused(reason)),
            _ => return Err(WireError::Handshake("unexpected frame from peer".into()).into()),
        };
        // An answer nobody waits for any more (timed out) is dropped.
        if let Some(waiter) = lock(pending).remove(&id) {
            let _ = waiter.send(answer);
        }
    }
}

/// Heartbeats on their interval, and the mode's frames as they are queued,
/// flushed once the queue is empty. A heartbeat waits at most for the frame
/// being written, never behind the queue.
async fn write(
    cluster: &Cluster,
    mut tx: WireTx,
    mut queue: mpsc::Receiver<Frame>,
) -> Result<(), LinkError> {
    let mut beat = tokio::time::interval(cluster.settings.heartbeat_interval);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = beat.tick() => {
                tx.send(Frame::Heartbeat {
                    sent_us: unix_us(),
                    health: cluster.health(),
                })
                .await?;
            }
            frame = queue.recv() => {
                let Some(frame) = frame else { return Ok(()) };
                tx.feed(frame).await?;
                // A bounded run, so that a heartbeat due meanwhile goes
                // out after it rather than after the whole queue.
                for _ in 1..WRITE_RUN {
                    let Ok(more) = queue.try_recv() else { break };
                    tx.feed(more).await?;
                }
                tx.flush().await?;
            }
        }
    }
}
