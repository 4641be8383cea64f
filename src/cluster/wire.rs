//! The internal port's framed binary protocol: length-prefixed frames, each
//! one postcard-encoded [`Frame`] followed by the mode's body if it has one,
//! and the handshake proofs.
//!
//! A connection runs: the acceptor sends `Challenge`; the dialer answers
//! `Hello` with a proof of the shared secret over both nonces; the acceptor
//! checks it and answers `Welcome` with its own proof (or `Refused` and
//! closes). After that the dialer sends `Heartbeat`s, which the acceptor
//! answers with `HeartbeatAck`, and the mode's messages: `Message` (one
//! way) and `Request` (answered by `Response`, or `Rejected` when the
//! acceptor cannot take it). A mode's bodies are opaque here: each frame
//! names the mode and its message version, and the receiver checks both.
//!
//! A body is not part of the postcard encoding: it follows the frame's
//! header raw, to the end of the frame. So the sender copies it once, into
//! the socket buffer, and the receiver takes it out of the read buffer
//! without a copy.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder, Framed, LengthDelimitedCodec};

/// Bumped whenever a frame changes shape; peers of another version are refused.
pub const PROTOCOL_VERSION: u32 = 4;

/// Largest frame accepted. A mode keeps its messages under this; the
/// config keeps `item_size_max` under `MAX_CLUSTER_ITEM_BYTES` so a single
/// value always fits.
pub const MAX_FRAME_BYTES: usize = 2 * crate::config::MAX_CLUSTER_ITEM_BYTES;

/// Which mode a message belongs to, and the version of that mode's
/// messages. The receiver takes a message only when both match its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeTag {
    pub name: &'static str,
    pub version: u32,
}

/// A [`ModeTag`] as it arrives from a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireTag {
    /// Borrowed when sent, owned when received.
    pub name: Cow<'static, str>,
    pub version: u32,
}

impl ModeTag {
    fn wire(&self) -> WireTag {
        WireTag {
            name: Cow::Borrowed(self.name),
            version: self.version,
        }
    }

    /// Why `theirs` is refused here, if it is: `mode` or `version`.
    pub fn mismatch(&self, theirs: &WireTag) -> Option<&'static str> {
        if theirs.name != self.name {
            Some("mode")
        } else if theirs.version != self.version {
            Some("version")
        } else {
            None
        }
    }
}

/// What a node says about itself in heartbeats and their acks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Health {
    /// Client requests served since start.
    pub requests_total: u64,
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
        nonce: [u8; 32],
        proof: [u8; 32],
    },
    Welcome {
        node: u32,
        proof: [u8; 32],
    },
    Refused {
        reason: String,
    },
    Heartbeat {
        sent_us: u64,
        health: Health,
    },
    HeartbeatAck {
        /// The `sent_us` of the heartbeat this answers, for round-trip time.
        echo_us: u64,
        health: Health,
    },
    /// A one-way message of a mode, delivered in the order sent.
    Message {
        mode: WireTag,
        #[serde(skip)]
        body: Bytes,
    },
    /// A mode's request; the acceptor answers `Response` or `Rejected`
    /// with the same id.
    Request {
        id: u64,
        mode: WireTag,
        #[serde(skip)]
        body: Bytes,
    },
    Response {
        id: u64,
        #[serde(skip)]
        body: Bytes,
    },
    /// The request could not be taken (unknown mode, other version, or the
    /// mode's handler failed); `reason` says which.
    Rejected {
        id: u64,
        reason: String,
    },
}

impl Frame {
    pub fn message(mode: ModeTag, body: Bytes) -> Frame {
        Frame::Message {
            mode: mode.wire(),
            body,
        }
    }

    pub fn request(id: u64, mode: ModeTag, body: Bytes) -> Frame {
        Frame::Request {
            id,
            mode: mode.wire(),
            body,
        }
    }

    /// The mode's body this frame carries after its header, if any.
    fn body_mut(&mut self) -> Option<&mut Bytes> {
        match self {
            Frame::Message { body, .. }
            | Frame::Request { body, .. }
            | Frame::Response { body, .. } => Some(body),
            _ => None,
        }
    }
}

/// Length-prefixed frames: a 4-byte big-endian length, then the frame's
/// postcard header, then its body (see the module comment).
struct FrameCodec {
    lengths: LengthDelimitedCodec,
}

impl FrameCodec {
    fn new() -> FrameCodec {
        FrameCodec {
            lengths: LengthDelimitedCodec::builder()
                .max_frame_length(MAX_FRAME_BYTES)
                .new_codec(),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, mut frame: Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        let body = frame.body_mut().map(std::mem::take).unwrap_or_default();
        let start = dst.len();
        dst.put_u32(0);
        let mut out = dst.writer();
        postcard::to_io(&frame, &mut out)?;
        let dst = out.into_inner();
        dst.extend_from_slice(&body);
        let len = dst.len() - start - 4;
        if len > MAX_FRAME_BYTES {
            dst.truncate(start);
            return Err(WireError::TooLarge(len));
        }
        // Fits: MAX_FRAME_BYTES is far below u32::MAX.
        dst[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let Some(mut bytes) = self.lengths.decode(src)? else {
            return Ok(None);
        };
        let (mut frame, rest) = postcard::take_from_bytes::<Frame>(&bytes)?;
        let header = bytes.len() - rest.len();
        match frame.body_mut() {
            Some(body) => *body = bytes.split_off(header).freeze(),
            None if header != bytes.len() => return Err(WireError::Trailing),
            None => {}
        }
        Ok(Some(frame))
    }
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
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("bytes after a frame that has no body")]
    Trailing,
}

/// One framed peer connection.
pub struct Wire {
    inner: FramedStream,
}

impl Wire {
    pub fn new(stream: TcpStream) -> Wire {
        let _ = stream.set_nodelay(true);
        Wire {
            inner: Framed::new(stream, FrameCodec::new()),
        }
    }

    pub async fn send(&mut self, frame: Frame) -> Result<(), WireError> {
        self.inner.send(frame).await
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

fn decode(next: Option<Result<Frame, WireError>>) -> Result<Frame, WireError> {
    next.ok_or(WireError::Closed)?
}

type FramedStream = Framed<TcpStream, FrameCodec>;

/// The sending half of a [`Wire`].
pub struct WireTx {
    inner: futures_util::stream::SplitSink<FramedStream, Frame>,
}

impl WireTx {
    /// Queues a frame without flushing.
    pub async fn feed(&mut self, frame: Frame) -> Result<(), WireError> {
        self.inner.feed(frame).await
    }

    pub async fn flush(&mut self) -> Result<(), WireError> {
        self.inner.flush().await
    }

    pub async fn send(&mut self, frame: Frame) -> Result<(), WireError> {
        self.feed(frame).await?;
        self.flush().await
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
    acceptor_nonce: &[u8; 32],
    dialer_nonce: &[u8; 32],
) -> [u8; 32] {
    mac(
        secret,
        &[
            b"memdial-hello-v2",
            cluster.as_bytes(),
            &node.to_be_bytes(),
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

    const TAG: ModeTag = ModeTag {
        name: "test",
        version: 1,
    };

    #[test]
    fn frames_round_trip() {
        for f in [
            Frame::message(TAG, Bytes::from_static(b"v\r\n")),
            Frame::request(7, TAG, Bytes::from(vec![0u8; 70_000])),
            Frame::Response {
                id: u64::MAX,
                body: Bytes::new(),
            },
            Frame::Heartbeat {
                sent_us: 5,
                health: Health { requests_total: 9 },
            },
        ] {
            let mut codec = FrameCodec::new();
            let mut buf = BytesMut::new();
            codec.encode(f.clone(), &mut buf).unwrap();
            codec.encode(f.clone(), &mut buf).unwrap();
            // Two frames back to back, and nothing before a frame is whole.
            let whole = buf.len() / 2;
            let mut part = buf.split_to(whole - 1);
            assert_eq!(codec.decode(&mut part).unwrap(), None);
            part.unsplit(buf.split_to(1));
            assert_eq!(codec.decode(&mut part).unwrap(), Some(f.clone()));
            assert_eq!(codec.decode(&mut buf).unwrap(), Some(f));
            assert!(part.is_empty() && buf.is_empty());
        }
    }

    #[test]
    fn a_body_follows_its_header_raw() {
        let mut buf = BytesMut::new();
        let body = Bytes::from_static(b"opaque body");
        FrameCodec::new()
            .encode(Frame::message(TAG, body.clone()), &mut buf)
            .unwrap();
        assert!(buf.ends_with(&body));
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len() - 4);
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut codec = FrameCodec::new();
        // A heartbeat has no body: bytes after it are an error.
        let mut buf = BytesMut::new();
        codec
            .encode(
                Frame::Heartbeat {
                    sent_us: 1,
                    health: Health::default(),
                },
                &mut buf,
            )
            .unwrap();
        buf.extend_from_slice(b"x");
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) + 1;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(codec.decode(&mut buf), Err(WireError::Trailing)));
        // An undecodable header.
        let mut buf = BytesMut::from(&[0, 0, 0, 1, 0xff][..]);
        assert!(matches!(codec.decode(&mut buf), Err(WireError::Decode(_))));
        // A body over the limit is refused before it is sent.
        let mut buf = BytesMut::new();
        let huge = Frame::message(TAG, Bytes::from(vec![0u8; MAX_FRAME_BYTES]));
        assert!(matches!(
            codec.encode(huge, &mut buf),
            Err(WireError::TooLarge(_))
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn a_tag_must_match_in_name_and_version() {
        assert_eq!(TAG.mismatch(&TAG.wire()), None);
        let other = |name: &'static str, version| WireTag {
            name: name.into(),
            version,
        };
        assert_eq!(TAG.mismatch(&other("raft", 1)), Some("mode"));
        assert_eq!(TAG.mismatch(&other("test", 2)), Some("version"));
    }

    #[test]
    fn proofs_depend_on_every_input() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let p = hello_proof("s", "c", 1, &a, &b);
        assert!(proofs_match(&p, &hello_proof("s", "c", 1, &a, &b)));
        assert!(!proofs_match(&p, &hello_proof("t", "c", 1, &a, &b)));
        assert!(!proofs_match(&p, &hello_proof("s", "d", 1, &a, &b)));
        assert!(!proofs_match(&p, &hello_proof("s", "c", 2, &a, &b)));
        assert!(!proofs_match(&p, &hello_proof("s", "c", 1, &b, &b)));
        assert_ne!(
            welcome_proof("s", "c", 1, &a),
            welcome_proof("s", "c", 1, &b)
        );
    }
}
