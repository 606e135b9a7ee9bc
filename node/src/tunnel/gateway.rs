//! The gateway side of the WireGuard mesh (issue 4): the node's key pair, its tunnel address,
//! publishing both in the replicated state, keeping the portcullis-wg peer table equal to the
//! registered CVMs, and the endpoint that [`super::upstream::TunnelUpstream`] connects through.
//!
//! Gateway tunnel addresses are derived from node ids in [`crate::tunnel::addr`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use portcullis_raft::changes::{ChangeCursor, Delta};
use portcullis_raft::state::{GatewayNode, Instance, NodeStatus};
use portcullis_raft::store::SharedState;
use portcullis_raft::{Cluster, Command, Response};
use portcullis_wg::{Endpoint, EndpointConfig, PeerConfig, PublicKey};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::addr::{gateway_tunnel_ip, gateway_tunnel_ip6};
use super::key::load_or_create_key;
use crate::config::NodeConfig;

/// The smallest link MTU IPv6 allows (RFC 8200).
const IPV6_MIN_MTU: usize = 1280;

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

/// What makes an instance a peer, copied out of the state: its key (unparsed) and address.
fn peer_fields(i: &Instance) -> Option<(String, IpAddr)> {
    match (i.tunnel_ip, i.wg_public_key.is_empty()) {
        (Some(ip), false) => Some((i.wg_public_key.clone(), ip)),
        _ => None,
    }
}

/// The CVM peers of this gateway, kept equal to the registered instances from the state's
/// change journal: a change copies out only the touched instances under the state's read lock
/// (which blocks `apply`) and parses their keys outside it, instead of parsing 65,000 keys
/// under the lock on every entry.
#[derive(Default)]
struct PeerSync {
    cursor: Option<ChangeCursor>,
    /// By instance id: every instance with a valid key and a tunnel address.
    by_instance: BTreeMap<String, (PublicKey, IpAddr)>,
    /// How many entries hold each key and each address, and how many keys and addresses are
    /// held more than once: with none (the state keeps both unique), the peer list is every
    /// entry, without the cost of deduplicating 65,000 of them.
    keys: HashMap<PublicKey, u32>,
    ips: HashMap<IpAddr, u32>,
    duplicates: usize,
}

/// One instance's peer (key, address) before and after a change.
type PeerChange = (Option<(PublicKey, IpAddr)>, Option<(PublicKey, IpAddr)>);

/// What a [`PeerSync::refresh`] found.
#[derive(Debug, PartialEq)]
enum Refresh {
    /// No peer changed (renewals, other keys).
    Same,
    /// These instances' peers changed.
    Changed(Vec<PeerChange>),
    /// The whole state was read again (first read, snapshot install).
    Replaced,
}

#[cfg(test)]
impl Refresh {
    fn changed(&self) -> bool {
        *self != Refresh::Same
    }
}

/// The endpoint change for `changes` when no key or address is held twice before or after:
/// the peers to add or reconfigure, and the keys no instance holds any more.
fn peer_delta(changes: Vec<PeerChange>) -> (Vec<PeerConfig>, Vec<PublicKey>) {
    let upsert: HashMap<PublicKey, IpAddr> = changes.iter().filter_map(|(_, new)| *new).collect();
    let mut remove: Vec<PublicKey> = changes
        .iter()
        .filter_map(|(old, _)| old.map(|(key, _)| key))
        .filter(|key| !upsert.contains_key(key))
        .collect();
    remove.sort_by_key(|k| *k.as_bytes());
    remove.dedup();
    let upsert = upsert
        .into_iter()
        .map(|(key, ip)| PeerConfig::new(key, ip))
        .collect();
    (upsert, remove)
}

/// Counts one more (`up`) or one less holder of `k`; returns the change in keys held twice or
/// more.
fn count<K: std::hash::Hash + Eq>(m: &mut HashMap<K, u32>, k: K, up: bool) -> isize {
    if up {
        let n = m.entry(k).or_insert(0);
        *n += 1;
        isize::from(*n == 2)
    } else {
        match m.get_mut(&k) {
            Some(n) if *n > 1 => {
                *n -= 1;
                -isize::from(*n == 1)
            }
            Some(_) => {
                m.remove(&k);
                0
            }
            None => 0,
        }
    }
}

impl PeerSync {
    /// Catches up with the state.
    fn refresh(&mut self, shared: &SharedState) -> Refresh {
        let (applied, delta, cursor) = shared.read_changes(self.cursor);
        self.cursor = Some(cursor);
        let touched: Vec<(String, Option<(String, IpAddr)>)> = match &delta {
            Delta::Everything => applied
                .state
                .instances
                .values()
                .map(|i| (i.instance_id.clone(), peer_fields(i)))
                .collect(),
            Delta::Keys(ch) => ch
                .instances
                .iter()
                .map(|id| {
                    let fields = applied.state.instances.get(id).and_then(peer_fields);
                    (id.clone(), fields)
                })
                .collect(),
        };
        drop(applied);
        let mut changes = Vec::new();
        let replaced = delta == Delta::Everything;
        if replaced {
            self.by_instance.clear();
            self.keys.clear();
            self.ips.clear();
            self.duplicates = 0;
        }
        for (id, fields) in touched {
            let peer = fields.and_then(|(key, ip)| match key.parse::<PublicKey>() {
                Ok(key) => Some((key, ip)),
                Err(_) => {
                    tracing::warn!(instance = %id, "instance has an invalid WireGuard key; not a peer");
                    None
                }
            });
            let old = match peer {
                Some(p) => self.by_instance.insert(id, p),
                None => self.by_instance.remove(&id),
            };
            if old == peer {
                continue;
            }
            changes.push((old, peer));
            let mut dup = 0;
            for (p, up) in [(old, false), (peer, true)] {
                if let Some((key, ip)) = p {
                    dup += count(&mut self.keys, key, up) + count(&mut self.ips, ip, up);
                }
            }
            self.duplicates = self.duplicates.saturating_add_signed(dup);
        }
        match (replaced, changes.is_empty()) {
            (true, _) => Refresh::Replaced,
            (false, true) => Refresh::Same,
            (false, false) => Refresh::Changed(changes),
        }
    }

    /// The peer list for the endpoint, in instance-id order.
    fn peers(&self) -> Vec<PeerConfig> {
        if self.duplicates == 0 {
            return self
                .by_instance
                .values()
                .map(|(key, ip)| PeerConfig::new(*key, *ip))
                .collect();
        }
        let mut seen_keys = HashSet::with_capacity(self.by_instance.len());
        let mut seen_ips = HashSet::with_capacity(self.by_instance.len());
        let mut peers = Vec::with_capacity(self.by_instance.len());
        for (key, ip) in self.by_instance.values() {
            // The state keeps keys and addresses unique; a duplicate here would make set_peers
            // refuse the whole list, so skip it instead of losing every peer.
            if !seen_keys.insert(*key) || !seen_ips.insert(*ip) {
                continue;
            }
            peers.push(PeerConfig::new(*key, *ip));
        }
        peers
    }
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

    // Peer sync: one set_peers per state change that changes a peer (renewals do not).
    // set_peers diffs, so unchanged CVMs keep their sessions and connections.
    let ep = endpoint.clone();
    let sh = shared.clone();
    let sd = shutdown.clone();
    tracker.spawn(async move {
        let mut ticks = sh.subscribe();
        let mut sync = PeerSync::default();
        // The endpoint holds exactly `sync.peers()`. False until the first list is accepted,
        // and again after a refused change, so the whole list is sent (again).
        let mut in_sync = false;
        loop {
            let duplicates_before = sync.duplicates;
            match sync.refresh(&sh) {
                Refresh::Same => {}
                // One registration among 65,000: tell the endpoint that change only, instead of
                // making it diff the whole list on its packet-processing task.
                Refresh::Changed(changes)
                    if in_sync && duplicates_before == 0 && sync.duplicates == 0 =>
                {
                    let (upsert, remove) = peer_delta(changes);
                    match ep.update_peers(upsert, remove).await {
                        Ok(diff) => tracing::debug!(
                            added = diff.added.len(),
                            removed = diff.removed.len(),
                            updated = diff.updated.len(),
                            "wireguard peers updated"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "wireguard peer change refused; resending every peer");
                            in_sync = false;
                        }
                    }
                }
                Refresh::Changed(_) | Refresh::Replaced => in_sync = false,
            }
            if !in_sync {
                let peers = sync.peers();
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
                        in_sync = true;
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

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_wg::PrivateKey;

    /// The peer list computed from the whole state, as the sync loop did before it was
    /// incremental: the reference the incremental one must equal.
    fn full_peers(shared: &SharedState) -> Vec<PeerConfig> {
        let applied = shared.read();
        let mut seen_keys = HashSet::new();
        let mut seen_ips = HashSet::new();
        let mut peers = Vec::new();
        for inst in applied.state.instances.values() {
            let (Some(ip), false) = (inst.tunnel_ip, inst.wg_public_key.is_empty()) else {
                continue;
            };
            let Ok(key) = inst.wg_public_key.parse::<PublicKey>() else {
                continue;
            };
            if !seen_keys.insert(key) || !seen_ips.insert(ip) {
                continue;
            }
            peers.push(PeerConfig::new(key, ip));
        }
        peers
    }

    #[test]
    fn peer_sync_follows_registrations_renewals_and_removals() {
        use crate::edge::rebuild_scale::{big_state, instance, instance_id, wg_key};
        use portcullis_raft::state::StaleInstance;
        let shared = SharedState::detached(big_state(8));
        let mut sync = PeerSync::default();
        assert_eq!(sync.refresh(&shared), Refresh::Replaced);
        assert_eq!(sync.peers(), full_peers(&shared));
        assert_eq!(sync.refresh(&shared), Refresh::Same);

        let new = |k: usize, key: String| {
            Command::RegisterInstanceV2(Instance {
                instance_id: instance_id(2, k),
                wg_public_key: key,
                tunnel_ip: None,
                ..instance(2, 0)
            })
        };
        let steps: Vec<(Command, bool)> = vec![
            (new(7, wg_key(500)), true),
            // A renewal: same key and address, only the stamp changes.
            (
                Command::RegisterInstanceV2(Instance {
                    registered_at: 9_999,
                    tunnel_ip: None,
                    ..instance(3, 1)
                }),
                false,
            ),
            // Not a valid key: never a peer (the state does not check keys).
            (new(8, "not-a-key".into()), false),
            // Rotating a key replaces the peer.
            (new(7, wg_key(501)), true),
            (
                Command::RemoveInstance {
                    instance_id: instance_id(4, 0),
                },
                true,
            ),
            (
                Command::ExpireInstances(vec![StaleInstance {
                    instance_id: instance_id(5, 2),
                    registered_at: 1_000,
                }]),
                true,
            ),
            (
                Command::DeleteApp {
                    name: crate::edge::rebuild_scale::app_name(6),
                },
                true,
            ),
            // Touches no instance.
            (
                Command::CasRegister {
                    key: "k".into(),
                    expect: None,
                    value: "v".into(),
                },
                false,
            ),
        ];
        for (cmd, changes) in steps {
            let r = shared.apply_detached(&cmd);
            assert!(!matches!(r, Response::Rejected(_)), "{cmd:?}: {r:?}");
            assert_eq!(sync.refresh(&shared).changed(), changes, "{cmd:?}");
            assert_eq!(sync.peers(), full_peers(&shared), "{cmd:?}");
        }
        // A replaced state (snapshot install) is read in full.
        shared.replace_detached(big_state(3));
        assert_eq!(sync.refresh(&shared), Refresh::Replaced);
        assert_eq!(sync.peers(), full_peers(&shared));
        assert_eq!(sync.peers().len(), 12);

        // Duplicate keys or addresses (which `apply` never lets in, but a foreign state
        // could hold) are skipped the way the whole-state list skipped them.
        let mut s = big_state(3);
        let key_twin = Instance {
            instance_id: "aaa-key-twin".into(),
            ..instance(1, 1)
        };
        let ip_twin = Instance {
            instance_id: "zzz-ip-twin".into(),
            wg_public_key: wg_key(777),
            ..instance(2, 2)
        };
        for i in [key_twin, ip_twin] {
            s.instances.insert(i.instance_id.clone(), i);
        }
        shared.replace_detached(s);
        assert_eq!(sync.refresh(&shared), Refresh::Replaced);
        // The key twin also shares its address; the address twin only its address.
        assert_eq!(sync.duplicates, 3);
        assert_eq!(sync.peers(), full_peers(&shared));
        assert_eq!(sync.peers().len(), 12);
        for id in ["aaa-key-twin", "zzz-ip-twin"] {
            shared.apply_detached(&Command::RemoveInstance {
                instance_id: id.into(),
            });
            assert!(sync.refresh(&shared).changed());
            assert_eq!(sync.peers(), full_peers(&shared), "{id}");
        }
        assert_eq!(sync.duplicates, 0);
    }

    /// The endpoint, fed only incremental changes, holds the peers the whole-state list names,
    /// including across key rotations and a key moving between instances in one entry.
    #[tokio::test]
    async fn endpoint_updates_follow_the_state() {
        use crate::edge::rebuild_scale::{big_state, instance, instance_id, wg_key};
        let shared = SharedState::detached(big_state(6));
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let ecfg = EndpointConfig::new(PrivateKey::generate(), IpAddr::from([198, 18, 0, 1]));
        let ep = Endpoint::new(ecfg, socket).expect("endpoint");
        let mut sync = PeerSync::default();
        assert_eq!(sync.refresh(&shared), Refresh::Replaced);
        ep.set_peers(sync.peers()).await.expect("set");
        let held = |ep: Endpoint| async move {
            let mut v: Vec<(String, IpAddr)> = ep
                .peer_stats()
                .await
                .expect("stats")
                .into_iter()
                .map(|p| (p.public_key.to_base64(), p.tunnel_ip))
                .collect();
            v.sort();
            v
        };
        let want = |shared: &SharedState| {
            let mut v: Vec<(String, IpAddr)> = full_peers(shared)
                .into_iter()
                .map(|p| (p.public_key.to_base64(), p.tunnel_ip))
                .collect();
            v.sort();
            v
        };
        let reg = |id: String, key: String| {
            Command::RegisterInstanceV2(Instance {
                instance_id: id,
                wg_public_key: key,
                tunnel_ip: None,
                ..instance(1, 0)
            })
        };
        let steps = vec![
            reg(instance_id(1, 7), wg_key(900)),
            // Key rotation: the old key goes, the new one comes, the address stays.
            reg(instance_id(1, 7), wg_key(901)),
            // A key moves from a removed instance to a new one within one entry.
            Command::Batch(vec![
                Command::RemoveInstance {
                    instance_id: instance_id(1, 7),
                },
                reg(instance_id(1, 8), wg_key(901)),
            ]),
            Command::DeleteApp {
                name: crate::edge::rebuild_scale::app_name(3),
            },
        ];
        for cmd in steps {
            shared.apply_detached(&cmd);
            let Refresh::Changed(ch) = sync.refresh(&shared) else {
                panic!("{cmd:?}: a change")
            };
            assert_eq!(sync.duplicates, 0);
            let (up, rm) = peer_delta(ch);
            ep.update_peers(up, rm).await.expect("update");
            assert_eq!(held(ep.clone()).await, want(&shared), "{cmd:?}");
        }
    }

    /// The peer-table side of one state change at 65,536 instances. Run like the edge's
    /// `rebuild_scale` measurement (`--release -- --ignored --nocapture`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement: run with --release -- --ignored --nocapture"]
    async fn tunnel_peers_scale_65536_instances() {
        use crate::edge::rebuild_scale::{big_state, instance, instance_id, wg_key, APPS, PER_APP};
        use std::time::Instant;
        let shared = SharedState::detached(big_state(APPS));
        let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
        let t = Instant::now();
        let reference = full_peers(&shared);
        println!(
            "whole-state peer list (the loop's work per entry before; read lock held throughout): {}",
            ms(t.elapsed())
        );
        let mut sync = PeerSync::default();
        let t = Instant::now();
        assert_eq!(sync.refresh(&shared), Refresh::Replaced);
        println!("PeerSync first (full) refresh: {}", ms(t.elapsed()));
        let t = Instant::now();
        let peers = sync.peers();
        println!("peer list from the synced table: {}", ms(t.elapsed()));
        assert_eq!(peers, reference);
        assert_eq!(peers.len(), APPS * PER_APP);

        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let ecfg = EndpointConfig::new(PrivateKey::generate(), IpAddr::from([198, 18, 0, 1]));
        let ep = Endpoint::new(ecfg, socket).expect("endpoint");
        let t = Instant::now();
        ep.set_peers(peers.clone()).await.expect("set");
        println!("set_peers, first (65,536 added): {}", ms(t.elapsed()));

        let mut renew = Vec::new();
        let mut register = Vec::new();
        let mut remove = Vec::new();
        let mut full = Vec::new();
        for n in 0..11 {
            shared.apply_detached(&Command::RegisterInstanceV2(Instance {
                registered_at: 5_000,
                tunnel_ip: None,
                ..instance(n, 1)
            }));
            let t = Instant::now();
            assert_eq!(sync.refresh(&shared), Refresh::Same);
            renew.push(t.elapsed());
            shared.apply_detached(&Command::RegisterInstanceV2(Instance {
                instance_id: instance_id(n, PER_APP),
                wg_public_key: wg_key(20_000_000 + n),
                tunnel_ip: None,
                ..instance(n, 0)
            }));
            let t = Instant::now();
            let Refresh::Changed(ch) = sync.refresh(&shared) else {
                panic!("a new peer")
            };
            let (up, rm) = peer_delta(ch);
            let d = ep.update_peers(up, rm).await.expect("update");
            assert_eq!(d.added.len(), 1);
            register.push(t.elapsed());
            shared.apply_detached(&Command::RemoveInstance {
                instance_id: instance_id(100 + n, 2),
            });
            let t = Instant::now();
            let Refresh::Changed(ch) = sync.refresh(&shared) else {
                panic!("a removed peer")
            };
            let (up, rm) = peer_delta(ch);
            let d = ep.update_peers(up, rm).await.expect("update");
            assert_eq!(d.removed.len(), 1);
            remove.push(t.elapsed());
        }
        // The previous way, for comparison: the whole list, diffed by the endpoint. (Measured
        // apart: it keeps the endpoint's task busy long enough to delay the next command.)
        for _ in 0..11 {
            let t = Instant::now();
            ep.set_peers(sync.peers()).await.expect("set");
            full.push(t.elapsed());
        }
        for (name, v) in [
            ("renewal: refresh (no peer change)", &mut renew),
            ("registration: refresh + update_peers", &mut register),
            ("removal: refresh + update_peers", &mut remove),
            ("for comparison: whole list + set_peers", &mut full),
        ] {
            v.sort();
            println!("{name:<50} median of 11: {}", ms(v[5]));
        }
    }
}
