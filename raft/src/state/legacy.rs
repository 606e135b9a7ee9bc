//! Shapes of stored data written by earlier builds, and their conversion to today's types.
//!
//! Raft log entries and snapshots outlive the binary that wrote them. When a stored type
//! changes shape, the old shape stays here, frozen, so old bytes still decode:
//! - `Command::RegisterInstance` carries an [`InstanceV1`] (IPv4-only tunnel address) in every
//!   log written before IPv6 pools; newer proposers use `Command::RegisterInstanceV2`.
//! - Snapshot format 1 (and header-less snapshots) hold a [`ClusterStateV1`]; format 2 a
//!   [`ClusterStateV2`] (no WAF policies); format 3 holds today's `ClusterState`.
//!
//! Never change a type in this file: that would change how existing bytes decode.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use super::acme::AcmeState;
use super::model::{
    App, Certificate, ClusterState, Domain, GatewayNode, Instance, Region, Register,
};
use super::pool::TunnelPool;

/// An instance as registered before IPv6 pools: the tunnel address is IPv4.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct InstanceV1 {
    pub instance_id: String,
    pub app: String,
    pub region: String,
    pub wg_public_key: String,
    pub tunnel_ip: Option<Ipv4Addr>,
    pub backend_addr: Option<String>,
    pub registered_at: u64,
}

impl From<InstanceV1> for Instance {
    fn from(i: InstanceV1) -> Self {
        Instance {
            instance_id: i.instance_id,
            app: i.app,
            region: i.region,
            wg_public_key: i.wg_public_key,
            tunnel_ip: i.tunnel_ip.map(IpAddr::V4),
            backend_addr: i.backend_addr,
            registered_at: i.registered_at,
        }
    }
}

impl InstanceV1 {
    /// The old shape of `i`, for answering a proposer that sent the old command. `None` when
    /// the address is IPv6, which the old shape cannot hold.
    pub fn from_current(i: &Instance) -> Option<InstanceV1> {
        let tunnel_ip = match i.tunnel_ip {
            None => None,
            Some(IpAddr::V4(a)) => Some(a),
            Some(IpAddr::V6(_)) => return None,
        };
        Some(InstanceV1 {
            instance_id: i.instance_id.clone(),
            app: i.app.clone(),
            region: i.region.clone(),
            wg_public_key: i.wg_public_key.clone(),
            tunnel_ip,
            backend_addr: i.backend_addr.clone(),
            registered_at: i.registered_at,
        })
    }
}

/// The IPv4-only pool of snapshot format 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelPoolV1 {
    pub base: Ipv4Addr,
    pub prefix_len: u8,
    pub next_offset: u32,
    pub free: BTreeSet<u32>,
}

impl From<TunnelPoolV1> for TunnelPool {
    fn from(p: TunnelPoolV1) -> Self {
        TunnelPool {
            base: IpAddr::V4(p.base),
            prefix_len: p.prefix_len,
            next_offset: u64::from(p.next_offset),
            free: p.free.into_iter().map(u64::from).collect(),
        }
    }
}

/// `ClusterState` as snapshot format 1 stored it: the same fields in the same order, with the
/// IPv4-only instance and pool types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStateV1 {
    pub nodes: BTreeMap<u64, GatewayNode>,
    pub regions: BTreeMap<String, Region>,
    pub apps: BTreeMap<String, App>,
    pub domains: BTreeMap<String, Domain>,
    pub certificates: BTreeMap<String, Certificate>,
    pub instances: BTreeMap<String, InstanceV1>,
    pub tunnel_pool: TunnelPoolV1,
    pub registers: BTreeMap<String, Register>,
    pub acme: AcmeState,
    pub instance_weights: BTreeMap<String, u32>,
}

impl From<ClusterStateV1> for ClusterState {
    fn from(s: ClusterStateV1) -> Self {
        ClusterState {
            nodes: s.nodes,
            regions: s.regions,
            apps: s.apps,
            domains: s.domains,
            certificates: s.certificates,
            instances: s
                .instances
                .into_iter()
                .map(|(k, v)| (k, Instance::from(v)))
                .collect(),
            tunnel_pool: s.tunnel_pool.into(),
            registers: s.registers,
            acme: s.acme,
            instance_weights: s.instance_weights,
            waf: Default::default(),
        }
    }
}

/// `ClusterState` as snapshot format 2 stored it: today's fields up to `instance_weights`, before
/// WAF policies existed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStateV2 {
    pub nodes: BTreeMap<u64, GatewayNode>,
    pub regions: BTreeMap<String, Region>,
    pub apps: BTreeMap<String, App>,
    pub domains: BTreeMap<String, Domain>,
    pub certificates: BTreeMap<String, Certificate>,
    pub instances: BTreeMap<String, Instance>,
    pub tunnel_pool: TunnelPool,
    pub registers: BTreeMap<String, Register>,
    pub acme: AcmeState,
    pub instance_weights: BTreeMap<String, u32>,
}

impl From<ClusterStateV2> for ClusterState {
    fn from(s: ClusterStateV2) -> Self {
        ClusterState {
            nodes: s.nodes,
            regions: s.regions,
            apps: s.apps,
            domains: s.domains,
            certificates: s.certificates,
            instances: s.instances,
            tunnel_pool: s.tunnel_pool,
            registers: s.registers,
            acme: s.acme,
            instance_weights: s.instance_weights,
            waf: Default::default(),
        }
    }
}
