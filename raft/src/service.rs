//! The server side of the cluster RPC port: Raft messages in, openraft's answers out, plus
//! leader-only requests forwarded by followers.

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use portcullis_proto::cluster::cluster_rpc_server::{ClusterRpc, ClusterRpcServer};
use portcullis_proto::cluster::{
    ForwardPayload, IdentityReply, IdentityRequest, RaftPayload, SnapshotChunk,
};
use tonic::{Request, Response, Status};

use crate::cluster::{Cluster, ForwardRequest};
use crate::network::{decode, encode, MAX_MESSAGE_BYTES};
use crate::tls::{peer_role, PeerRole};
use crate::types::{NodeId, TypeConfig};

pub struct ClusterService {
    cluster: Cluster,
}

impl ClusterService {
    pub fn new(cluster: Cluster) -> ClusterRpcServer<Self> {
        ClusterRpcServer::new(ClusterService { cluster })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// The cluster port also serves CVM registration, and CVM credentials come from the same CA:
/// every Raft RPC checks that the client certificate names a node, not a CVM.
fn require_node<T>(req: &Request<T>) -> Result<(), Status> {
    let role = req
        .peer_certs()
        .and_then(|certs| certs.first().map(|c| peer_role(c.as_ref())))
        .unwrap_or(PeerRole::Unknown);
    match role {
        PeerRole::Node(_) => Ok(()),
        other => Err(Status::permission_denied(format!(
            "cluster RPCs need a node certificate; the client presented {other:?}"
        ))),
    }
}

fn reply<T: serde::Serialize>(v: &T) -> Result<Response<RaftPayload>, Status> {
    Ok(Response::new(RaftPayload { data: encode(v)? }))
}

#[tonic::async_trait]
impl ClusterRpc for ClusterService {
    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        require_node(&req)?;
        let rpc: VoteRequest<NodeId> = decode(&req.into_inner().data)?;
        reply(&self.cluster.raft.vote(rpc).await)
    }

    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        require_node(&req)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(&req.into_inner().data)?;
        reply(&self.cluster.raft.append_entries(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<SnapshotChunk>,
    ) -> Result<Response<RaftPayload>, Status> {
        require_node(&req)?;
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(&req.into_inner().request)?;
        reply(&self.cluster.raft.install_snapshot(rpc).await)
    }

    async fn forward(
        &self,
        req: Request<ForwardPayload>,
    ) -> Result<Response<ForwardPayload>, Status> {
        require_node(&req)?;
        let fwd: ForwardRequest = decode(&req.into_inner().data)?;
        let result = self.cluster.execute(fwd).await;
        Ok(Response::new(ForwardPayload {
            data: encode(&result)?,
        }))
    }

    async fn identity(
        &self,
        _req: Request<IdentityRequest>,
    ) -> Result<Response<IdentityReply>, Status> {
        let last_applied = self
            .cluster
            .shared
            .read()
            .last_applied
            .map_or(0, |l| l.index);
        Ok(Response::new(IdentityReply {
            node_id: self.cluster.id,
            last_applied,
        }))
    }
}
