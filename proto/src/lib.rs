//! Protobuf definitions and generated tonic code for Portcullis.
//!
//! Layout:
//! - [`cluster`]: node-to-node RPC on the cluster port (Raft, forwarding of leader-only requests).
//! - [`admin`]: the operator API served on the admin listener.

#![allow(clippy::all, missing_docs)]

pub mod cluster {
    tonic::include_proto!("portcullis.cluster.v1");
}

pub mod admin {
    tonic::include_proto!("portcullis.admin.v1");
}
