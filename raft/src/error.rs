//! `ClusterError`: what a write, a membership change or a forwarded request can fail with.
//!
//! A leaf of its own so that the write batcher (`batch.rs`) and the `Cluster` handle that owns
//! it can both name it without importing each other.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::state::ValidationError;
use crate::types::NodeId;

/// Errors an operator can act on; messages name the offending value.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
pub enum ClusterError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("not the leader and no leader is known (waited {0:?})")]
    NoLeader(Duration),
    #[error("forwarding to leader {leader} failed: {reason}")]
    Forward { leader: NodeId, reason: String },
    #[error("rejected: {0}")]
    Rejected(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("node {0} is not a member of the cluster")]
    UnknownNode(NodeId),
    #[error("not the leader; leader is {0:?}")]
    NotLeader(Option<NodeId>),
}

impl From<ValidationError> for ClusterError {
    fn from(e: ValidationError) -> Self {
        ClusterError::Invalid(e.to_string())
    }
}
