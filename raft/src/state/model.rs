//! The data model: `ClusterState`, everything the cluster agrees on, and the records it holds.
//!
//! Types only, plus read-only queries. What may change them is in `command.rs`; how they change,
//! in `apply.rs`. It imports only the parts of the state that keep files of their own, `pool.rs`
//! (`TunnelPool`), `acme.rs` (`AcmeState`) and `waf.rs` (`WafState`); never the commands or `apply`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::acme::AcmeState;
use super::pool::TunnelPool;
use super::waf::WafState;

/// A gateway node as the data plane and CVMs see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct GatewayNode {
    pub id: u64,
    pub region: String,
    pub latitude: f64,
    pub longitude: f64,
    pub rpc_addr: String,
    /// Public addresses (HTTPS), as `host:port`.
    pub public_addrs: Vec<String>,
    /// WireGuard public key, base64 (empty until the node has one).
    pub wg_public_key: String,
    /// WireGuard endpoint, `host:port`.
    pub wg_endpoint: String,
    pub status: NodeStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum NodeStatus {
    #[default]
    Up,
    Draining,
    Down,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Region {
    pub name: String,
    pub latitude: f64,
    pub longitude: f64,
}

/// An application: a name routed as `<app>.<base>`, its ports (the first is the default), and
/// how its instances are balanced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct App {
    pub name: String,
    pub ports: Vec<u16>,
    /// Load-balancing policy, e.g. `round-robin`, `least-conn`, `hash:ip`, `geo+least-conn`.
    pub lb: String,
    /// Log index of the entry that created the app: distinguishes a re-created app from the old one.
    pub revision: u64,
}

/// A CVM instance registered with the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Instance {
    pub instance_id: String,
    pub app: String,
    pub region: String,
    pub wg_public_key: String,
    /// From the cluster's pool, IPv4 or IPv6. Registered with
    /// [`Command::RegisterInstanceV2`]; old log entries carry an [`InstanceV1`].
    ///
    /// [`Command::RegisterInstanceV2`]: super::Command::RegisterInstanceV2
    /// [`InstanceV1`]: super::InstanceV1
    pub tunnel_ip: Option<IpAddr>,
    /// Plain TCP backend address, for apps reached outside the tunnel (tests, local demo).
    pub backend_addr: Option<String>,
    /// Unix seconds, stamped by the proposer.
    pub registered_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Domain {
    pub name: String,
    pub app: String,
    pub port: u16,
    /// The token that must appear in `_portcullis-challenge.<name>` for a custom domain.
    pub token: String,
    pub verified: bool,
    pub passthrough: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Certificate {
    /// The primary name (also the key in the table).
    pub name: String,
    pub names: Vec<String>,
    pub chain_pem: String,
    /// The private key, encrypted with the cluster data key (or, for imported development
    /// certificates, marked by `key_encryption`).
    pub key: Vec<u8>,
    pub key_encryption: String,
    /// Unix seconds.
    pub not_after: u64,
    pub issuer: String,
}

/// Everything the cluster agrees on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ClusterState {
    pub nodes: BTreeMap<u64, GatewayNode>,
    pub regions: BTreeMap<String, Region>,
    pub apps: BTreeMap<String, App>,
    pub domains: BTreeMap<String, Domain>,
    pub certificates: BTreeMap<String, Certificate>,
    pub instances: BTreeMap<String, Instance>,
    pub tunnel_pool: TunnelPool,
    /// Per-key registers used by the chaos harness's linearizability workload.
    pub registers: BTreeMap<String, Register>,
    /// ACME account, challenge answers and orderer lease (issue 6). Appended last.
    pub acme: AcmeState,
    /// Load-balancing weights by instance id, for those not at the default of 1 (0 drains).
    /// A map beside `instances` rather than a field of `Instance`, so registration entries
    /// already in logs keep their encoding.
    pub instance_weights: BTreeMap<String, u32>,
    /// WAF policies: per app and the cluster default (snapshot format 3).
    pub waf: WafState,
}

/// Largest instance weight (the same bound the balancer enforces).
pub const MAX_INSTANCE_WEIGHT: u32 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Register {
    pub value: String,
    /// Log index of the write that produced `value`.
    pub version: u64,
}

impl ClusterState {
    /// Instances of one app, in a stable order.
    pub fn instances_of<'a>(&'a self, app: &'a str) -> impl Iterator<Item = &'a Instance> + 'a {
        self.instances.values().filter(move |i| i.app == app)
    }
}
