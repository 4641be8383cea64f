//! What the Raft log carries and what the ordered modes send each other.
//!
//! A log entry's payload is a [`Command`]: the writes of the client
//! batches proposed together, with the proposer's clock reading, so every
//! replica decides every outcome (and every deadline) from the same inputs,
//! whenever it applies the entry. The reads of those batches (`get`, `mn`,
//! `me`, which change nothing) stay on the proposer, held under the
//! command's ticket: only the proposer answers them, at their place among
//! the writes, so they are never written to disk, sent or applied
//! elsewhere. Applying a command answers [`Applied`]: on the proposer one
//! reply per request of its batches, elsewhere one per write (nobody waits
//! for those).
//!
//! Between nodes, every message is a request ([`Rpc`], answered by
//! [`RpcReply`]): Raft's own three RPCs, a write forwarded to the leader,
//! and a follower's question for the leader's read index.

use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use super::TypeConfig;
use crate::cluster::ModeTag;
use crate::protocol::{Request, Response};

/// Tags the messages of each ordered mode: both speak the same messages,
/// but a cluster whose nodes disagree on the mode is misconfigured, so each
/// refuses the other's.
///
/// Version 2: the state machine decides meta commands (version 1 answered
/// them `SERVER_ERROR` and changed nothing) and stores marked records
/// (`MDr2`) version 1 cannot read. Version 3: a [`Command`] carries a
/// ticket and only writes; a forward carries a batch's requests. Versions
/// never share a cluster: during a rolling upgrade the upgraded nodes and
/// the others each refuse the other side, and the side holding a majority
/// goes on.
pub const LINEARIZABLE_TAG: ModeTag = ModeTag {
    name: "linearizable",
    version: 3,
};

pub const SEQUENTIAL_TAG: ModeTag = ModeTag {
    name: "sequential",
    version: 3,
};

/// A log entry's payload: client writes, in the order the clients sent
/// them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// The proposer's clock (unix ms) when it proposed: the time every
    /// replica applies the writes at, so an exptime becomes the same
    /// absolute deadline everywhere and a replay never extends a lifetime.
    pub now_ms: u64,
    /// Names the proposer's batches these writes came from, whose reads it
    /// holds back ([`super::state::Held`]); 0 when they had none.
    pub ticket: u64,
    /// The writes (every request but the reads held back), in order.
    pub writes: Vec<Request>,
}

/// Requests of a batch that also writes that stay on the proposer instead
/// of going into the log: they change nothing on any replica, and only the
/// proposer answers them. An `mg` is not one (it may win a recache token).
pub fn held_back(r: &Request) -> bool {
    match r {
        Request::Get { .. } | Request::MetaNoop => true,
        Request::Meta(m) => m.cmd == crate::protocol::MetaCmd::Debug,
        _ => false,
    }
}

/// What applying a [`Command`] answered, one reply per write. A membership
/// change or a blank entry answers none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub replies: Vec<Response>,
}

/// A request from one node to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum Rpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A client batch (writes, and reads among them), for the leader to
    /// propose.
    Forward(Vec<Request>),
    /// The leader's read index, after it has confirmed its leadership.
    ReadIndex,
    /// Has the answering node joined a cluster (its log is not empty)?
    Initialized,
}

/// The answer to an [`Rpc`], variant for variant.
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcReply {
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    Snapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    Forward(Forwarded),
    ReadIndex(Result<u64, String>),
    Initialized(bool),
}

/// How a forwarded write ended on the node it was sent to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Forwarded {
    /// Committed and applied there, at this log index.
    Applied { index: u64, applied: Applied },
    /// Not proposed: that node is not the leader (it names the one it
    /// knows, if any).
    NotLeader { leader: Option<u64> },
    /// Proposed, and then the outcome could not be learnt.
    Unknown(String),
}

/// The node a Raft membership names: its internal address, for the
/// metrics (the transport has its own peer table).
pub type Node = BasicNode;

pub fn encode<T: Serialize>(m: &T) -> bytes::Bytes {
    // Encoding plain data structures into a Vec cannot fail.
    bytes::Bytes::from(postcard::to_stdvec(m).unwrap_or_default())
}

pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, String> {
    postcard::from_bytes(body).map_err(|e| format!("undecodable raft message: {e}"))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::protocol::StoreOp;

    #[test]
    fn commands_and_replies_round_trip() {
        let cmd = Command {
            now_ms: 1_700_000_000_000,
            ticket: 7,
            writes: vec![Request::Store {
                op: StoreOp::Cas,
                key: Bytes::from_static(b"k"),
                flags: 7,
                exptime: -1,
                data: Bytes::from_static(b"v\r\n"),
                cas_unique: 9,
                noreply: false,
            }],
        };
        assert_eq!(decode::<Command>(&encode(&cmd)), Ok(cmd.clone()));
        let applied = Applied {
            replies: vec![Response::Stored, Response::Number(u64::MAX)],
        };
        assert_eq!(decode::<Applied>(&encode(&applied)), Ok(applied));
        match decode::<Rpc>(&encode(&Rpc::Forward(cmd.writes.clone()))) {
            Ok(Rpc::Forward(c)) => assert_eq!(c, cmd.writes),
            other => panic!("{other:?}"),
        }
        assert!(decode::<Rpc>(b"\xff\xff\xff").is_err());
    }
}
