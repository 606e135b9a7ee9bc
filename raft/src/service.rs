//! The server side of the cluster RPC port: Raft messages in, openraft's answers out, plus
//! leader-only requests forwarded by followers.
//!
//! How the port's services are mounted is part of their security: [`ClusterService::new`]
//! refuses any caller whose client certificate does not name a node in a tonic interceptor,
//! which runs before a byte of the message body is read or decoded (CVM credentials from the
//! same CA may only reach the CVM registry), and [`Capped`] bounds every request's message by
//! its method ([`max_request_bytes`]): Raft appends and snapshot chunks large, forwarded writes
//! moderate, votes, identity and CVM registration small.

use std::pin::Pin;
use std::task::{Context, Poll};

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use portcullis_proto::cluster::cluster_rpc_server::{ClusterRpc, ClusterRpcServer};
use portcullis_proto::cluster::{
    ForwardPayload, IdentityReply, IdentityRequest, RaftPayload, SnapshotChunk,
};
use tonic::body::Body;
use tonic::codegen::{http, Bytes, InterceptedService, Service};
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use crate::cluster::{Cluster, ForwardRequest};
use crate::network::{decode, encode, MAX_MESSAGE_BYTES};
use crate::tls::{peer_role, PeerRole};
use crate::types::{NodeId, TypeConfig};

pub struct ClusterService {
    cluster: Cluster,
}

/// Refuses callers without a node certificate before their message is read.
pub type NodeOnly = fn(Request<()>) -> Result<Request<()>, Status>;

/// The Raft service as the cluster port mounts it.
pub type GuardedClusterService =
    InterceptedService<Capped<ClusterRpcServer<ClusterService>>, NodeOnly>;

impl ClusterService {
    /// The service, guarded: node certificates only (checked before the body is decoded), and
    /// each method's message bounded by [`max_request_bytes`].
    pub fn new(cluster: Cluster) -> GuardedClusterService {
        let server = ClusterRpcServer::new(ClusterService { cluster })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        InterceptedService::new(Capped::new(server), node_only as NodeOnly)
    }
}

/// The interceptor of [`ClusterService::new`].
fn node_only(req: Request<()>) -> Result<Request<()>, Status> {
    require_node(&req)?;
    Ok(req)
}

/// Gives up on a message that outgrows its method's cap (plus the 5-byte gRPC frame header).
const GRPC_FRAME_HEADER: usize = 5;

/// Largest request message each cluster-port method takes, by its gRPC path:
/// - Raft `AppendEntries` and `InstallSnapshot`: [`MAX_MESSAGE_BYTES`] (append batches are
///   bounded by `max_payload_entries`, snapshot chunks by `snapshot_max_chunk_size`);
/// - `Forward` (a follower passing one write or membership change to the leader): 32 MiB, room
///   for the largest command the admin API proposes, a `RewrapKeys` chunk of 4096 keys, old and
///   new (about 27 MiB with RSA-4096 keys);
/// - `Vote`: 64 KiB; `Identity`: 1 KiB (an empty message);
/// - CVM `Register`: 16 KiB (names, a WireGuard key and attestation evidence; a TDX quote is
///   about 5 KiB);
/// - anything else (an unknown method, answered `UNIMPLEMENTED`): 1 KiB.
pub fn max_request_bytes(path: &str) -> usize {
    const KIB: usize = 1024;
    match path {
        "/portcullis.cluster.v1.ClusterRpc/AppendEntries"
        | "/portcullis.cluster.v1.ClusterRpc/InstallSnapshot" => MAX_MESSAGE_BYTES,
        "/portcullis.cluster.v1.ClusterRpc/Forward" => 32 * KIB * KIB,
        "/portcullis.cluster.v1.ClusterRpc/Vote" => 64 * KIB,
        "/portcullis.cluster.v1.CvmRegistry/Register" => 16 * KIB,
        _ => KIB,
    }
}

/// A cluster-port service whose request bodies are cut at their method's cap
/// ([`max_request_bytes`]): the handler's decoder sees `RESOURCE_EXHAUSTED` instead of the
/// rest of the message, so no more than the cap is ever buffered.
#[derive(Debug, Clone)]
pub struct Capped<S> {
    inner: S,
}

impl<S> Capped<S> {
    pub fn new(inner: S) -> Self {
        Capped { inner }
    }
}

impl<S: NamedService> NamedService for Capped<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Capped<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let limit = max_request_bytes(req.uri().path());
        self.inner.call(req.map(|inner| {
            Body::new(CapBody {
                inner,
                left: limit + GRPC_FRAME_HEADER,
                limit,
            })
        }))
    }
}

/// A request body that fails once more than `limit` message bytes arrive.
struct CapBody {
    inner: Body,
    left: usize,
    limit: usize,
}

impl http_body::Body for CapBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let frame = match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(f)) => f,
            other => return Poll::Ready(other),
        };
        if let Some(d) = frame.data_ref() {
            if d.len() > this.left {
                this.left = 0;
                return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                    "request message larger than this method's {} bytes",
                    this.limit
                )))));
            }
            this.left -= d.len();
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_method_has_a_cap_that_fits_it() {
        let cap = |m: &str| max_request_bytes(&format!("/portcullis.cluster.v1.{m}"));
        assert_eq!(cap("ClusterRpc/AppendEntries"), MAX_MESSAGE_BYTES);
        assert_eq!(cap("ClusterRpc/InstallSnapshot"), MAX_MESSAGE_BYTES);
        assert!(cap("ClusterRpc/Forward") < MAX_MESSAGE_BYTES);
        assert!(cap("ClusterRpc/Forward") >= 27 * 1024 * 1024);
        assert_eq!(cap("ClusterRpc/Vote"), 64 * 1024);
        assert_eq!(cap("ClusterRpc/Identity"), 1024);
        assert_eq!(cap("CvmRegistry/Register"), 16 * 1024);
        assert_eq!(max_request_bytes("/other.Service/Method"), 1024);
    }

    /// What the inner service of [`Capped`] reads of the body.
    #[derive(Clone)]
    struct Drain;

    impl Service<http::Request<Body>> for Drain {
        type Response = Result<usize, Status>;
        type Error = std::convert::Infallible;
        type Future =
            Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<Body>) -> Self::Future {
            Box::pin(async move {
                let mut body = req.into_body();
                let mut n = 0;
                while let Some(f) =
                    std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut body), cx))
                        .await
                {
                    match f {
                        Ok(f) => n += f.data_ref().map_or(0, |d| d.len()),
                        Err(s) => return Ok(Err(s)),
                    }
                }
                Ok(Ok(n))
            })
        }
    }

    async fn send(path: &str, bytes: usize) -> Result<usize, Status> {
        let req = http::Request::builder()
            .uri(path)
            .body(Body::new(http_body_util_full(vec![0u8; bytes])))
            .expect("request");
        let mut svc = Capped::new(Drain);
        match svc.call(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }

    /// A one-frame body without pulling in http-body-util.
    fn http_body_util_full(
        data: Vec<u8>,
    ) -> impl http_body::Body<Data = Bytes, Error = Status> + Send + 'static {
        struct Once(Option<Bytes>);
        impl http_body::Body for Once {
            type Data = Bytes;
            type Error = Status;
            fn poll_frame(
                self: Pin<&mut Self>,
                _cx: &mut Context<'_>,
            ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
                Poll::Ready(
                    self.get_mut()
                        .0
                        .take()
                        .map(|b| Ok(http_body::Frame::data(b))),
                )
            }
        }
        Once(Some(Bytes::from(data)))
    }

    #[tokio::test]
    async fn a_message_over_its_methods_cap_is_refused_as_it_arrives() {
        let register = "/portcullis.cluster.v1.CvmRegistry/Register";
        assert_eq!(
            send(register, 16 * 1024 + 5).await.expect("at the cap"),
            16 * 1024 + 5
        );
        let e = send(register, 16 * 1024 + 6)
            .await
            .expect_err("over the cap");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        let append = "/portcullis.cluster.v1.ClusterRpc/AppendEntries";
        assert_eq!(
            send(append, 1024 * 1024).await.expect("large append"),
            1024 * 1024
        );
    }
}
