//! portcullis-raft: the replicated control plane of a Portcullis cluster.
//!
//! One Raft group (openraft 0.9, storage v2) spans every region. It replicates the routes,
//! certificates and CVM peer table (`ClusterState`) that every gateway node serves from.
//!
//! Layout:
//! - [`state`]: `ClusterState`, the typed `Command`s that change it, validation, and `apply`;
//!   its front door (`state/mod.rs`) lists its files: `model.rs`, `command.rs`, `validate.rs`,
//!   `apply.rs`, and the parts with files of their own (`pool.rs`, `names.rs`, `acme.rs`,
//!   `legacy.rs`, `nesting.rs`).
//! - [`types`]: openraft type configuration (`TypeConfig`, `NodeInfo`).
//! - [`store`]: log store and state machine on sled, with real fsyncs and group commit.
//! - [`snapshot_format`]: the versioned header of snapshot bytes.
//! - [`network`]: the tonic client side of the transport (mutual TLS, deadlines).
//! - [`service`]: the tonic server side of the transport.
//! - [`changes`]: which keys each applied entry touched, for incremental derived views.
//! - `batch`: folds concurrent writes into one log entry on the leader.
//! - [`cluster`]: `Cluster`, the handle for writes, membership changes and forwarding to the leader.
//! - [`error`]: `ClusterError`, what those can fail with.
//! - [`tls`]: the cluster CA and node certificates.
//! - [`metrics`]: Prometheus metrics owned by this crate.

#![forbid(unsafe_code)]

mod batch;
pub mod changes;
pub mod cluster;
pub mod error;
pub mod metrics;
pub mod network;
pub mod service;
pub mod snapshot_format;
pub mod state;
pub mod store;
pub mod tls;
pub mod types;

pub use cluster::{Cluster, Member};
pub use error::ClusterError;
pub use state::{ClusterState, Command, Response};
pub use types::{NodeId, NodeInfo, Raft, TypeConfig};
