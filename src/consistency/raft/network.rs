//! Raft's RPCs over the cluster transport: each one is a request on the
//! authenticated link to the peer, with openraft's deadline. A peer that
//! cannot be reached is `Unreachable` (openraft backs off); an answer that
//! carries the peer's own Raft error is a `RemoteError`.

use std::sync::Arc;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::TypeConfig;
use super::command::{Node, Rpc, RpcReply, decode, encode};
use crate::cluster::{Cluster, PeerError};

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<u64, Node, RaftError<u64, E>>>;

/// Makes a client per peer; they all share the node's transport.
pub struct Network {
    pub cluster: Arc<Cluster>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, _node: &Node) -> PeerClient {
        PeerClient {
            cluster: self.cluster.clone(),
            target,
        }
    }
}

pub struct PeerClient {
    cluster: Arc<Cluster>,
    target: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failed(String);

impl PeerClient {
    /// Sends `rpc` and returns the peer's answer, or why there is none.
    async fn call<E: std::error::Error>(
        &self,
        rpc: &Rpc,
        option: &RPCOption,
    ) -> Result<RpcReply, RPCError<u64, Node, E>> {
        let peer = u32::try_from(self.target)
            .map_err(|_| RPCError::Unreachable(Unreachable::new(&Failed("no such node".into()))))?;
        match self
            .cluster
            .request(peer, encode(rpc), option.hard_ttl())
            .await
        {
            Ok(body) => decode(&body).map_err(|e| RPCError::Network(NetworkError::new(&Failed(e)))),
            Err(e @ (PeerError::Down(_) | PeerError::Unknown(_))) => {
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    fn unexpected<E: std::error::Error>(reply: RpcReply) -> RPCError<u64, Node, E> {
        RPCError::Network(NetworkError::new(&Failed(format!(
            "unexpected answer {reply:?}"
        ))))
    }

    fn remote<E: std::error::Error>(&self, e: E) -> RPCError<u64, Node, E> {
        RPCError::RemoteError(RemoteError::new(self.target, e))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>> {
        match self.call(&Rpc::Append(rpc), &option).await? {
            RpcReply::Append(r) => r.map_err(|e| self.remote(e)),
            other => Err(Self::unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        match self.call(&Rpc::Snapshot(rpc), &option).await? {
            RpcReply::Snapshot(r) => r.map_err(|e| self.remote(e)),
            other => Err(Self::unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>> {
        match self.call(&Rpc::Vote(rpc), &option).await? {
            RpcReply::Vote(r) => r.map_err(|e| self.remote(e)),
            other => Err(Self::unexpected(other)),
        }
    }
}
