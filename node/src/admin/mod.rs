//! The admin wing: one local listener carrying the gRPC admin API (bearer token) plus
//! `/healthz`, `/readyz` and `/metrics`, and `<cvm-id>.internal` for operators.
//!
//! What it owns:
//! - [`http`]: the router that puts everything on one port, the probes and `/metrics`, serving.
//! - [`auth`]: the admin bearer token check (constant time), for gRPC and `.internal` alike.
//! - [`internal`]: `<cvm-id>.internal` requests relayed to the data plane.
//! - [`grpc`]: the `Admin` gRPC service — every operator command, as Raft writes and
//!   linearizable reads; [`keys`]: the sealed private keys `KeyStatus` and `RewrapKeys` see.
//! - [`convert`]: replicated-state records to their protobuf messages.
//! - `waf.rs`: the WAF calls — policies, `waf test` against this node's engine, rule reload.
//!
//! What it may import: the raft crate, the proto crate, and the node's leaves (metrics,
//! secrets, collisions, acme's sealed-key decoding, edge's host splitting); the data plane only
//! through [`EdgeSlot`], filled in when the edge starts.
//!
//! An operator command travels: `portcullis …` (crate::cli) → gRPC on the admin port
//! ([`http::router`], [`auth`]) → [`grpc`] handler → `Cluster::write` (Raft, on the leader) →
//! the answer converted by [`convert`].

use std::sync::Arc;

use portcullis_raft::Cluster;

use crate::metrics::Metrics;

mod auth;
mod convert;
mod grpc;
pub mod http;
mod internal;
mod keys;
mod waf;

pub use convert::instance_pb;
pub use http::{router, serve};

/// Everything the admin handlers need.
#[derive(Clone)]
pub struct AdminState {
    pub cluster: Cluster,
    pub region: String,
    pub metrics: Arc<Metrics>,
    /// Set once the node is serving: joined Raft, certificates and geo database loaded.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// TEST ONLY (`[debug] unsafe_stale_reads`): `KvGet` skips the linearizable barrier.
    pub unsafe_stale_reads: bool,
    /// TXT lookups for `DomainVerify` (the same cache the data plane uses).
    pub dns: crate::edge::dns::TxtResolver,
    /// `edge.base_domains`: custom domains may not be claimed inside them.
    pub base_domains: Vec<String>,
    /// The data plane, once it runs: `<cvm-id>.internal` requests on this port go to it.
    pub edge: EdgeSlot,
    /// Seals imported private keys before they are proposed; `KeyStatus` and `RewrapKeys`.
    pub keyring: Arc<crate::secrets::Keyring>,
}

/// Filled in when the data plane starts (after the admin listener, which must answer first).
pub type EdgeSlot = Arc<std::sync::OnceLock<Arc<crate::edge::Edge>>>;
