//! The Raft transport: tonic over mutual TLS, one lazily connected channel per peer.
//!
//! Every call is bounded by openraft's `RPCOption::hard_ttl`, so a peer that stops answering
//! turns into `RPCError::Timeout` instead of stalling replication. Remote Raft errors travel
//! back encoded as openraft's own types and are surfaced as `RemoteError` unchanged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use portcullis_proto::cluster::cluster_rpc_client::ClusterRpcClient;
use portcullis_proto::cluster::{RaftPayload, SnapshotChunk};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::metrics::RaftMetricsSink;
use crate::tls::{node_server_name, TlsMaterial};
use crate::types::{NodeId, NodeInfo, TypeConfig};

/// Largest gRPC message either side accepts. Snapshot chunks are cut well below this
/// (`snapshot_max_chunk_size`), and append batches are bounded by `max_payload_entries`.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Builds per-peer clients and caches their channels.
#[derive(Clone)]
pub struct Network {
    tls: Arc<TlsMaterial>,
    connect_timeout: Duration,
    channels: Arc<Mutex<HashMap<(NodeId, String), Channel>>>,
    metrics: RaftMetricsSink,
}

impl Network {
    pub fn new(tls: TlsMaterial, connect_timeout: Duration, metrics: RaftMetricsSink) -> Self {
        Network {
            tls: Arc::new(tls),
            connect_timeout,
            channels: Default::default(),
            metrics,
        }
    }

    /// A channel to node `target` at `addr`, verified to present `target`'s certificate.
    pub fn channel(&self, target: NodeId, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let key = (target, addr.to_string());
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(&key) {
            return Ok(c.clone());
        }
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.tls.ca_pem))
            .identity(Identity::from_pem(&self.tls.cert_pem, &self.tls.key_pem))
            .domain_name(node_server_name(target));
        let channel = Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls)?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        channels.insert(key, channel.clone());
        Ok(channel)
    }

    pub fn client(
        &self,
        target: NodeId,
        addr: &str,
    ) -> Result<ClusterRpcClient<Channel>, tonic::transport::Error> {
        Ok(ClusterRpcClient::new(self.channel(target, addr)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Connection {
        Connection {
            target,
            client: self
                .client(target, &node.rpc_addr)
                .map_err(|e| e.to_string()),
            metrics: self.metrics.clone(),
        }
    }
}

/// One peer, as openraft's replication and election tasks see it.
pub struct Connection {
    target: NodeId,
    client: Result<ClusterRpcClient<Channel>, String>,
    metrics: RaftMetricsSink,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, tonic::Status> {
    bincode::serialize(v).map_err(|e| tonic::Status::internal(format!("encode: {e}")))
}

pub(crate) fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, tonic::Status> {
    bincode::deserialize(b)
        .map_err(|e| tonic::Status::invalid_argument(format!("malformed payload: {e}")))
}

impl Connection {
    /// Runs one RPC under the deadline and maps transport failures onto openraft's error kinds.
    async fn call<Req, Resp, E>(
        &mut self,
        action: RPCTypes,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, NodeInfo, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let target = self.target;
        let client = match &self.client {
            Ok(c) => c.clone(),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&Msg(e.clone())))),
        };
        let bytes = encode(req).map_err(|s| RPCError::Network(NetworkError::new(&s)))?;
        let ttl = option.hard_ttl();
        let fut = async move {
            let mut client = client;
            let mut request = tonic::Request::new(RaftPayload { data: bytes });
            request.set_timeout(ttl);
            match action {
                RPCTypes::Vote => client.vote(request).await,
                RPCTypes::AppendEntries => client.append_entries(request).await,
                RPCTypes::InstallSnapshot => {
                    let RaftPayload { data } = request.into_inner();
                    let mut r = tonic::Request::new(SnapshotChunk { request: data });
                    r.set_timeout(ttl);
                    client.install_snapshot(r).await
                }
            }
        };
        let reply = match tokio::time::timeout(ttl, fut).await {
            Err(_) => {
                self.metrics.rpc_error(target, "timeout");
                return Err(RPCError::Timeout(Timeout {
                    action,
                    id: 0,
                    target,
                    timeout: ttl,
                }));
            }
            Ok(Err(status)) => {
                self.metrics.rpc_error(target, "transport");
                return Err(match status.code() {
                    tonic::Code::DeadlineExceeded => RPCError::Timeout(Timeout {
                        action,
                        id: 0,
                        target,
                        timeout: ttl,
                    }),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                        RPCError::Unreachable(Unreachable::new(&status))
                    }
                    _ => RPCError::Network(NetworkError::new(&status)),
                });
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let result: Result<Resp, E> = decode(&reply.data).map_err(|s| {
            self.metrics.rpc_error(target, "decode");
            RPCError::Network(NetworkError::new(&s))
        })?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.call(RPCTypes::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(RPCTypes::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.call(RPCTypes::Vote, &rpc, &option).await
    }
}
