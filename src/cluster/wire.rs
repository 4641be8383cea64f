//! The internal port's framed binary protocol: length-prefixed frames, each
//! one postcard-encoded [`Frame`], and the handshake proofs.
//!
//! A connection runs: the acceptor sends `Challenge`; the dialer answers
//! `Hello` with a proof of the shared secret over both nonces; the acceptor
//! checks it and answers `Welcome` with its own proof (or `Refused` and
//! closes). After that the dialer sends `Entries`, `Snapshot`,
//! `SnapshotDone` and `Heartbeat`; the acceptor answers `Ack`. For
//! anti-entropy the dialer sends `Digest`; the acceptor answers
//! `DigestDiff`, and the dialer sends its entries of those buckets as
//! `Snapshot` frames.

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// Bumped whenever a frame changes shape; peers of another version are refused.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest frame accepted. Senders keep batches of entries under
/// [`FRAME_BUDGET`]; a single entry is at most `item_size_max`, which the
/// config keeps under `MAX_CLUSTER_ITEM_BYTES`.
pub const MAX_FRAME_BYTES: usize = 2 * crate::config::MAX_CLUSTER_ITEM_BYTES;

/// Entries are packed into frames of about this many bytes at most.
pub const FRAME_BUDGET: usize = 4 * 1024 * 1024;

/// About how many bytes an entry takes in a frame.
pub fn entry_bytes(e: &Entry) -> usize {
    let data = match &e.op {
        Op::Put { data, .. } => data.len(),
        _ => 0,
    };
    e.key.len() + data + 32
}

/// Splits entries into runs that each fit a frame (a run holds at least one
/// entry).
pub fn frame_runs<T>(items: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    let mut bytes = 0;
    for item in items {
        let n = size(&item);
        if !run.is_empty() && bytes + n > FRAME_BUDGET {
            runs.push(std::mem::take(&mut run));
            bytes = 0;
        }
        bytes += n;
        run.push(item);
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

/// A write's version: a hybrid logical clock reading and the node that made
/// it. Versions are totally ordered; the node id breaks ties.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Version {
    /// Unix milliseconds << 16 | logical counter.
    pub ts: u64,
    pub node: u32,
}

/// What a replicated write leaves behind: the key's whole new state, so
/// applying it twice, or out of order under last-writer-wins, is harmless.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Put {
        flags: u32,
        /// Absolute unix milliseconds; 0 never expires.
        deadline_ms: u64,
        data: Bytes,
    },
    /// A tombstone: the key was deleted at `version`.
    Delete,
    /// `flush_all`: every write older than `version` is gone; `at_ms` is the
    /// absolute unix time it takes effect (0 = at once).
    Flush { at_ms: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub key: Bytes,
    pub version: Version,
    pub op: Op,
}

/// How far a receiver has applied a sender's log. `incarnation` names the
/// sender's process lifetime; a cursor from another incarnation is void.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub incarnation: u64,
    pub seq: u64,
}

/// What a node says about itself in heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Health {
    /// Client requests served since start.
    pub requests_total: u64,
    /// The newest sequence number in its replication log.
    pub log_head: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    Challenge {
        nonce: [u8; 32],
    },
    Hello {
        protocol: u32,
        cluster: String,
        node: u32,
        incarnation: u64,
        nonce: [u8; 32],
        proof: [u8; 32],
    },
    Welcome {
        node: u32,
        proof: [u8; 32],
        /// How far the acceptor has applied the dialer's log, if at all.
        cursor: Option<Cursor>,
    },
    Refused {
        reason: String,
    },
    /// Log entries with their sequence numbers, in order.
    Entries {
        entries: Vec<(u64, Entry)>,
    },
    /// Part of a full resync: the sender's current state, unordered.
    Snapshot {
        entries: Vec<Entry>,
    },
    /// The snapshot is complete; its state includes the log up to `seq`.
    SnapshotDone {
        seq: u64,
    },
    Heartbeat {
        sent_us: u64,
        health: Health,
    },
    Ack {
        cursor: Option<Cursor>,
        /// The `sent_us` of the heartbeat this answers, for round-trip time.
        echo_us: Option<u64>,
        health: Health,
    },
    /// Anti-entropy: the dialer's replica summarised (see `digest.rs`), one
    /// value per bucket. Sent after every log entry the dialer had then.
    Digest {
        buckets: Vec<u64>,
    },
    /// The acceptor's answer to `Digest`: the buckets where its replica
    /// differs.
    DigestDiff {
        buckets: Vec<u16>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Decode(#[from] postcard::Error),
    #[error("peer closed the connection")]
    Closed,
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("timed out")]
    Timeout,
}

/// One framed peer connection.
pub struct Wire {
    inner: Framed<TcpStream, LengthDelimitedCodec>,
}

impl Wire {
    pub fn new(stream: TcpStream) -> Wire {
        let _ = stream.set_nodelay(true);
        let codec = LengthDelimitedCodec::builder()
            .max_frame_length(MAX_FRAME_BYTES)
            .new_codec();
        Wire {
            inner: Framed::new(stream, codec),
        }
    }

    pub async fn send(&mut self, frame: &Frame) -> Result<(), WireError> {
        self.inner
            .send(Bytes::from(postcard::to_stdvec(frame)?))
            .await?;
        Ok(())
    }

    pub async fn recv(&mut self) -> Result<Frame, WireError> {
        decode(self.inner.next().await)
    }

    /// Splits the connection so one task can write while another reads.
    pub fn split(self) -> (WireTx, WireRx) {
        let (tx, rx) = self.inner.split();
        (WireTx { inner: tx }, WireRx { inner: rx })
    }
}

fn decode(next: Option<std::io::Result<BytesMut>>) -> Result<Frame, WireError> {
    let bytes = next.ok_or(WireError::Closed)??;
    Ok(postcard::from_bytes(&bytes)?)
}

type FramedStream = Framed<TcpStream, LengthDelimitedCodec>;

/// The sending half of a [`Wire`].
pub struct WireTx {
    inner: futures_util::stream::SplitSink<FramedStream, Bytes>,
}

impl WireTx {
    pub async fn feed(&mut self, frame: &Frame) -> Result<(), WireError> {
        self.inner
            .feed(Bytes::from(postcard::to_stdvec(frame)?))
            .await?;
        Ok(())
    }

    pub async fn send(&mut self, frame: &Frame) -> Result<(), WireError> {
        self.feed(frame).await?;
        self.inner.flush().await?;
        Ok(())
    }
}

/// The receiving half of a [`Wire`].
pub struct WireRx {
    inner: futures_util::stream::SplitStream<FramedStream>,
}

impl WireRx {
    pub async fn recv(&mut self) -> Result<Frame, WireError> {
        decode(self.inner.next().await)
    }
}

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &str, parts: &[&[u8]]) -> [u8; 32] {
    let mut m =
        HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    for p in parts {
        m.update(&(p.len() as u64).to_be_bytes());
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The dialer's proof: the secret over the cluster, its identity, and both
/// nonces (the acceptor's makes a replayed `Hello` useless).
pub fn hello_proof(
    secret: &str,
    cluster: &str,
    node: u32,
    incarnation: u64,
    acceptor_nonce: &[u8; 32],
    dialer_nonce: &[u8; 32],
) -> [u8; 32] {
    mac(
        secret,
        &[
            b"memdial-hello-v1",
            cluster.as_bytes(),
            &node.to_be_bytes(),
            &incarnation.to_be_bytes(),
            acceptor_nonce,
            dialer_nonce,
        ],
    )
}

/// The acceptor's proof, over the dialer's nonce.
pub fn welcome_proof(secret: &str, cluster: &str, node: u32, dialer_nonce: &[u8; 32]) -> [u8; 32] {
    mac(
        secret,
        &[
            b"memdial-welcome-v1",
            cluster.as_bytes(),
            &node.to_be_bytes(),
            dialer_nonce,
        ],
    )
}

/// Compares proofs in constant time.
pub fn proofs_match(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn nonce() -> [u8; 32] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let f = Frame::Entries {
            entries: vec![(
                7,
                Entry {
                    key: Bytes::from_static(b"k"),
                    version: Version {
                        ts: 1 << 20,
                        node: 2,
                    },
                    op: Op::Put {
                        flags: 3,
                        deadline_ms: 0,
                        data: Bytes::from_static(b"v\r\n"),
                    },
                },
            )],
        };
        let bytes = postcard::to_stdvec(&f).unwrap();
        assert_eq!(postcard::from_bytes::<Frame>(&bytes).unwrap(), f);
        for f in [
            Frame::Digest {
                buckets: vec![u64::MAX; 1 << 16],
            },
            Frame::DigestDiff {
                buckets: vec![0, 255, u16::MAX],
            },
        ] {
            let bytes = postcard::to_stdvec(&f).unwrap();
            assert_eq!(postcard::from_bytes::<Frame>(&bytes).unwrap(), f);
        }
    }

    #[test]
    fn proofs_depend_on_every_input() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let p = hello_proof("s", "c", 1, 9, &a, &b);
        assert!(proofs_match(&p, &hello_proof("s", "c", 1, 9, &a, &b)));
        assert!(!proofs_match(&p, &hello_proof("t", "c", 1, 9, &a, &b)));
        assert!(!proofs_match(&p, &hello_proof("s", "d", 1, 9, &a, &b)));
        assert!(!proofs_match(&p, &hello_proof("s", "c", 2, 9, &a, &b)));
        assert!(!proofs_match(&p, &hello_proof("s", "c", 1, 9, &b, &b)));
        assert_ne!(
            welcome_proof("s", "c", 1, &a),
            welcome_proof("s", "c", 1, &b)
        );
    }

    #[test]
    fn frame_runs_stay_within_the_budget() {
        let runs = frame_runs(vec![FRAME_BUDGET / 2; 5], |n| *n);
        assert_eq!(runs.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 1]);
        let runs = frame_runs(vec![FRAME_BUDGET * 3, 1], |n| *n);
        assert_eq!(
            runs.len(),
            2,
            "an entry larger than the budget travels alone"
        );
        assert!(frame_runs(Vec::<usize>::new(), |n| *n).is_empty());
    }

    #[test]
    fn versions_order_by_clock_then_node() {
        let v = |ts, node| Version { ts, node };
        assert!(v(2, 1) > v(1, 9));
        assert!(v(1, 2) > v(1, 1));
    }
}
