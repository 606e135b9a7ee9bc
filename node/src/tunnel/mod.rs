//! The tunnel wing: the WireGuard mesh between every gateway and every CVM.
//!
//! What it owns:
//! - [`gateway`]: the node's key pair and tunnel address published through Raft, and the
//!   portcullis-wg peer table kept equal to the registered CVMs.
//! - [`upstream`]: the data plane's connector — tunnel-pool targets through the mesh, never
//!   falling back to the plain network.
//! - [`registry`]: CVM registration on the cluster RPC port, held to the tenant's own names;
//!   [`quota`]: its per-app registration rate.
//! - [`agent`]: `portcullis cvm-agent`, the CVM side.
//! - Leaves: [`addr`] (gateway tunnel addresses from node ids, which the configuration also
//!   checks) and [`key`] (the WireGuard key file).
//!
//! What it may import: the raft crate (state, commands), portcullis-wg, [`crate::config`], and
//! the edge's [`crate::edge::upstream`] trait it implements. Nothing in the edge imports this
//! wing; the server hands the connector to the edge as a trait object.
//!
//! A CVM registration travels: agent ([`agent`]) → cluster RPC port → [`registry`] (credential,
//! tenant policy, quota) → Raft `RegisterInstanceV3` → every node's [`gateway`] peer sync.

pub mod addr;
pub mod agent;
pub mod gateway;
pub mod key;
pub mod quota;
pub mod registry;
pub mod upstream;
