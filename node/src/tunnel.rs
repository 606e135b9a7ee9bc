//! The gateway side of the WireGuard mesh (issue 4): the node's key pair, its tunnel address,
//! publishing both in the replicated state, keeping the portcullis-wg peer table equal to the
//! registered CVMs, and the [`TunnelUpstream`] the data plane connects through.
//!
//! Gateway tunnel addresses: every gateway has its *own* address, derived from its node id in
//! 198.18.0.0/15 (RFC 2544 benchmarking space, never routed on the internet), outside the CVM
//! pool (100.64.0.0/10). One shared gateway address would not work: a CVM peers with every
//! gateway, and WireGuard's cryptokey routing (portcullis-wg's too) picks the peer for an
//! outgoing packet by its destination address, so replies to a shared address could go to the
//! wrong gateway, and `set_peers` refuses two peers with one address. With per-node addresses
//! the source-address check holds on both ends: a gateway accepts from a CVM only that CVM's
//! allocated /32, a CVM accepts from a gateway only `gateway_tunnel_ip(id)`. Deriving the
//! address (instead of storing it) needs no change to the replicated `GatewayNode`.
//!
//! IPv6 pools: every gateway also owns `fd70:6f72:7463::` + node id (a fixed ULA /96,
//! [`gateway_tunnel_ip6`]) as its endpoint's second address, so it serves an IPv6 pool without a
//! restart when the operator switches the pool. CVMs are told the address of the pool's family.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use portcullis_raft::state::{GatewayNode, NodeStatus, GATEWAY_TUNNEL_V4, GATEWAY_TUNNEL_V6};
use portcullis_raft::store::SharedState;
use portcullis_raft::{Cluster, Command, Response};
use portcullis_wg::{Endpoint, EndpointConfig, PeerConfig, PrivateKey, PublicKey, WgError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::NodeConfig;
use crate::edge::upstream::{BoxedIo, Target, TcpUpstream, Upstream};

/// First address of the gateway range; node `id` gets `base + id`. The raft crate owns the
/// ranges because pool validation must keep CVM pools out of them.
const GATEWAY_BASE: Ipv4Addr = GATEWAY_TUNNEL_V4.0;
const GATEWAY_BASE6: Ipv6Addr = GATEWAY_TUNNEL_V6.0;
/// The smallest link MTU IPv6 allows (RFC 8200).
const IPV6_MIN_MTU: usize = 1280;

/// Largest node id with a gateway tunnel address (a /15 minus network and broadcast).
pub const MAX_GATEWAY_ID: u64 = (1 << 17) - 2;

/// Node `id`'s own tunnel address, or `None` for ids beyond [`MAX_GATEWAY_ID`] (or 0).
pub fn gateway_tunnel_ip(id: u64) -> Option<Ipv4Addr> {
    if id == 0 || id > MAX_GATEWAY_ID {
        return None;
    }
    let offset = u32::try_from(id).ok()?;
    Some(Ipv4Addr::from(u32::from(GATEWAY_BASE) + offset))
}

/// Node `id`'s own IPv6 tunnel address (used when the CVM pool is IPv6), for the same ids as
/// [`gateway_tunnel_ip`].
pub fn gateway_tunnel_ip6(id: u64) -> Option<Ipv6Addr> {
    gateway_tunnel_ip(id)?;
    Some(Ipv6Addr::from(u128::from(GATEWAY_BASE6) + u128::from(id)))
}

/// The gateway address CVMs of a pool of this family peer with.
pub fn gateway_tunnel_ip_for(id: u64, ipv6_pool: bool) -> Option<IpAddr> {
    if ipv6_pool {
        gateway_tunnel_ip6(id).map(IpAddr::V6)
    } else {
        gateway_tunnel_ip(id).map(IpAddr::V4)
    }
}

/// Loads the WireGuard private key from `path`, or creates one there (mode 0600) if the file
/// does not exist. A key file readable by group or others is refused, like wg(8) warns.
pub fn load_or_create_key(path: &Path) -> anyhow::Result<PrivateKey> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path)
                .with_context(|| format!("stat {}", path.display()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                anyhow::bail!(
                    "WireGuard key {} has mode {:o}; it must be 0600 (chmod 600 it)",
                    path.display(),
                    mode & 0o777
                );
            }
            text.trim()
                .parse::<PrivateKey>()
                .with_context(|| format!("WireGuard key {}", path.display()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = PrivateKey::generate();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("create WireGuard key {}", path.display()))?;
            f.write_all(format!("{}\n", key.to_base64()).as_bytes())
                .and_then(|_| f.sync_all())
                .with_context(|| format!("write WireGuard key {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("read WireGuard key {}", path.display())),
    }
}

/// The gateway peers a CVM should have: every node that published a WireGuard key.
pub fn gateway_peers(shared: &SharedState) -> Vec<GatewayNode> {
    let applied = shared.read();
    applied
        .state
        .nodes
        .values()
        .filter(|n| !n.wg_public_key.is_empty() && !n.wg_endpoint.is_empty())
        .cloned()
        .collect()
}

/// The peer list for a gateway's endpoint: every instance with a valid key and a tunnel IP.
fn cvm_peers(shared: &SharedState) -> Vec<PeerConfig> {
    let applied = shared.read();
    let mut seen_keys = HashSet::new();
    let mut seen_ips = HashSet::new();
    let mut peers = Vec::new();
    for inst in applied.state.instances.values() {
        let (Some(ip), false) = (inst.tunnel_ip, inst.wg_public_key.is_empty()) else {
            continue;
        };
        let Ok(key) = inst.wg_public_key.parse::<PublicKey>() else {
            tracing::warn!(instance = %inst.instance_id, "instance has an invalid WireGuard key; not a peer");
            continue;
        };
        // The state keeps keys and addresses unique; a duplicate here would make set_peers
        // refuse the whole list, so skip it instead of losing every peer.
        if !seen_keys.insert(key) || !seen_ips.insert(ip) {
            continue;
        }
        peers.push(PeerConfig::new(key, ip));
    }
    peers
}

/// Starts the gateway endpoint on `cfg.wg.listen`, keeps its peers in sync with the replicated
/// instances, and publishes the node's key and endpoint. Returns the endpoint for the data plane.
pub async fn start(
    cfg: &NodeConfig,
    shared: &SharedState,
    cluster: &Cluster,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<Endpoint> {
    let key = load_or_create_key(&cfg.data_dir.join("wg.key"))?;
    let own_ip = gateway_tunnel_ip(cfg.node_id)
        .context("node_id has no gateway tunnel address (validate() should have refused it)")?;
    let own_ip6 = gateway_tunnel_ip6(cfg.node_id)
        .context("node_id has no gateway tunnel address (validate() should have refused it)")?;
    let socket = tokio::net::UdpSocket::bind(cfg.wg.listen)
        .await
        .with_context(|| format!("bind wg.listen {} (udp)", cfg.wg.listen))?;
    let mut ecfg = EndpointConfig::new(key, IpAddr::V4(own_ip));
    // Both families always: the pool can switch between IPv4 and IPv6 at runtime. IPv6 needs
    // links of at least 1280 bytes (RFC 8200); an older config with a smaller wg.mtu keeps
    // working for IPv4 pools instead of failing to start.
    if cfg.wg.mtu >= IPV6_MIN_MTU {
        ecfg.secondary_ip = Some(IpAddr::V6(own_ip6));
    } else {
        tracing::warn!(
            mtu = cfg.wg.mtu,
            "wg.mtu is below 1280: this gateway has no IPv6 tunnel address and cannot reach CVMs of an IPv6 pool"
        );
    }
    ecfg.mtu = cfg.wg.mtu;
    let tunnel_ip6 = ecfg.secondary_ip;
    ecfg.connect_timeout = Duration::from_millis(cfg.edge.backend_connect_timeout_ms.max(1));
    let endpoint = Endpoint::new(ecfg, socket).context("start the WireGuard endpoint")?;
    tracing::info!(udp = %endpoint.local_addr(), tunnel_ip = %own_ip, tunnel_ip6 = ?tunnel_ip6, public_key = %endpoint.public_key(), "wireguard listening");

    // Peer sync: one set_peers per state change. set_peers diffs, so unchanged CVMs keep their
    // sessions and connections.
    let ep = endpoint.clone();
    let sh = shared.clone();
    let sd = shutdown.clone();
    tracker.spawn(async move {
        let mut ticks = sh.subscribe();
        let mut last: Option<Vec<PeerConfig>> = None;
        loop {
            let peers = cvm_peers(&sh);
            if last.as_ref() != Some(&peers) {
                match ep.set_peers(peers.clone()).await {
                    Ok(diff) => {
                        if !diff.added.is_empty()
                            || !diff.removed.is_empty()
                            || !diff.updated.is_empty()
                        {
                            tracing::info!(
                                added = diff.added.len(),
                                removed = diff.removed.len(),
                                updated = diff.updated.len(),
                                total = peers.len(),
                                "wireguard peers updated"
                            );
                        }
                        last = Some(peers);
                    }
                    Err(e) => tracing::warn!(error = %e, "wireguard peer update refused"),
                }
            }
            tokio::select! {
                _ = sd.cancelled() => return,
                r = ticks.changed() => if r.is_err() { return },
            }
        }
    });

    // Publish this node's key and endpoint until it sticks (there may be no leader yet).
    let me = GatewayNode {
        id: cfg.node_id,
        region: cfg.region.clone(),
        latitude: cfg.latitude,
        longitude: cfg.longitude,
        rpc_addr: cfg.advertise_addr(),
        public_addrs: Vec::new(),
        wg_public_key: endpoint.public_key().to_base64(),
        wg_endpoint: cfg.wg_advertise_addr(),
        status: NodeStatus::Up,
    };
    let sh = shared.clone();
    let cl = cluster.clone();
    tracker.spawn(async move {
        let mut delay = Duration::from_millis(200);
        loop {
            // Keep fields others may have set (status, public addresses); only fill in ours.
            let existing = sh.read().state.nodes.get(&me.id).cloned();
            let node = match existing {
                Some(n) if n.wg_public_key == me.wg_public_key && n.wg_endpoint == me.wg_endpoint => {
                    return;
                }
                Some(n) => GatewayNode {
                    wg_public_key: me.wg_public_key.clone(),
                    wg_endpoint: me.wg_endpoint.clone(),
                    ..n
                },
                None => me.clone(),
            };
            match cl.write(Command::UpsertNode(node)).await {
                Ok((index, Response::Ok)) => {
                    tracing::info!(index, endpoint = %me.wg_endpoint, "published wireguard key and endpoint");
                    return;
                }
                Ok((_, other)) => tracing::warn!(?other, "publishing the wireguard key was refused"),
                Err(e) => tracing::debug!(error = %e, "publishing the wireguard key; will retry"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    });
    Ok(endpoint)
}

/// Unix seconds now (for registration stamps).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The data plane's connector: targets inside the CVM tunnel pool go through the WireGuard
/// endpoint, everything else (instances with a `backend_addr`) over plain TCP. An address in the
/// pool never falls back to the plain network: it would leave the encrypted path.
pub struct TunnelUpstream {
    endpoint: Endpoint,
    tcp: TcpUpstream,
    shared: SharedState,
}

impl TunnelUpstream {
    pub fn new(endpoint: Endpoint, shared: SharedState) -> Self {
        TunnelUpstream {
            endpoint,
            tcp: TcpUpstream,
            shared,
        }
    }

    fn in_pool(&self, ip: IpAddr) -> bool {
        self.shared.read().state.tunnel_pool.contains(ip)
    }
}

fn io_error(e: WgError) -> io::Error {
    let kind = match &e {
        WgError::ConnectTimeout { .. } => io::ErrorKind::TimedOut,
        WgError::ConnectRefused(_) => io::ErrorKind::ConnectionRefused,
        WgError::NoRoute(_) => io::ErrorKind::HostUnreachable,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

#[async_trait::async_trait]
impl Upstream for TunnelUpstream {
    async fn connect(&self, target: &Target) -> io::Result<BoxedIo> {
        match target.host.parse::<IpAddr>() {
            Ok(ip) if self.in_pool(ip) => {
                let s = self
                    .endpoint
                    .connect(ip, target.port)
                    .await
                    .map_err(io_error)?;
                Ok(Box::new(s))
            }
            _ => self.tcp.connect(target).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_addresses_are_outside_the_cvm_pool_and_distinct() {
        let pool = ipnet::Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 10).expect("net");
        assert_eq!(gateway_tunnel_ip(1), Some(Ipv4Addr::new(198, 18, 0, 1)));
        assert_eq!(
            gateway_tunnel_ip(MAX_GATEWAY_ID),
            Some(Ipv4Addr::new(198, 19, 255, 254))
        );
        assert_eq!(gateway_tunnel_ip(0), None);
        assert_eq!(gateway_tunnel_ip(MAX_GATEWAY_ID + 1), None);
        for id in [1, 2, 300, MAX_GATEWAY_ID] {
            let ip = gateway_tunnel_ip(id).expect("ip");
            assert!(!pool.contains(&ip));
        }
    }

    #[test]
    fn ipv6_gateway_addresses_are_in_the_fixed_ula_and_distinct() {
        let gw = ipnet::Ipv6Net::new(GATEWAY_BASE6, GATEWAY_TUNNEL_V6.1).expect("net");
        assert_eq!(
            gateway_tunnel_ip6(1),
            Some("fd70:6f72:7463::1".parse().expect("ip"))
        );
        assert_eq!(
            gateway_tunnel_ip6(MAX_GATEWAY_ID),
            Some("fd70:6f72:7463::1:fffe".parse().expect("ip"))
        );
        assert_eq!(gateway_tunnel_ip6(0), None);
        assert_eq!(gateway_tunnel_ip6(MAX_GATEWAY_ID + 1), None);
        for id in [1, 2, 300, MAX_GATEWAY_ID] {
            assert!(gw.contains(&gateway_tunnel_ip6(id).expect("ip")));
        }
        assert_eq!(
            gateway_tunnel_ip_for(3, true),
            Some("fd70:6f72:7463::3".parse().expect("ip"))
        );
        assert_eq!(
            gateway_tunnel_ip_for(3, false),
            Some(IpAddr::from([198, 18, 0, 3]))
        );
        // Pool validation keeps every CVM pool out of the gateway range.
        let (base, len) = (IpAddr::V6(GATEWAY_BASE6), 64);
        assert!(portcullis_raft::state::TunnelPool::validate_range(base, len).is_err());
    }

    #[test]
    fn key_file_is_created_0600_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("wg.key");
        let a = load_or_create_key(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = load_or_create_key(&path).expect("load");
        assert_eq!(a.public_key(), b.public_key());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = load_or_create_key(&path).expect_err("0644 refused");
        assert!(e.to_string().contains("0600"), "{e}");
    }
}
