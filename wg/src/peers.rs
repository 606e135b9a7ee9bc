//! The peer table: one boringtun `Tunn` per peer, indexed by key, by session index and by
//! tunnel address, and replaced by diffing so unchanged peers keep their sessions.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use boringtun::noise::Tunn;
use boringtun::x25519;

use crate::config::{is_unicast, PeerConfig};
use crate::error::WgError;
use crate::key::PublicKey;

/// boringtun puts the peer index in the upper 24 bits of every session index it hands out
/// (`index << 8`), so incoming responses and data name their peer without a key lookup.
const MAX_PEER_INDEX: u32 = (1 << 24) - 1;

pub(crate) struct Peer {
    pub config: PeerConfig,
    pub tunn: Tunn,
    pub index: u32,
    /// Where packets go: the configured endpoint, replaced by the source of the latest
    /// authenticated packet (WireGuard roaming).
    pub endpoint: Option<SocketAddr>,
}

/// What a `set_peers` call changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PeerDiff {
    /// Peers that were not there before.
    pub added: Vec<PublicKey>,
    /// Peers that are gone (their sessions are dropped).
    pub removed: Vec<PublicKey>,
    /// Peers whose tunnel address, endpoint or keepalive changed.
    pub updated: Vec<PublicKey>,
    /// Peers left exactly as they were (sessions untouched).
    pub unchanged: usize,
}

/// A peer's state, for `wg show`-like output.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStats {
    /// The peer's key.
    pub public_key: PublicKey,
    /// Its tunnel address.
    pub tunnel_ip: IpAddr,
    /// Current UDP endpoint (configured or learned).
    pub endpoint: Option<SocketAddr>,
    /// Time since the last completed handshake; `None` if never.
    pub last_handshake: Option<Duration>,
    /// Inner bytes sent to the peer.
    pub tx_bytes: usize,
    /// Inner bytes received from the peer.
    pub rx_bytes: usize,
    /// Round-trip time of the last handshake, in milliseconds.
    pub rtt_ms: Option<u32>,
}

pub(crate) struct PeerTable {
    own_key: PublicKey,
    own_ip: IpAddr,
    /// The endpoint's second address (other family), if any; no peer may hold it either.
    secondary_ip: Option<IpAddr>,
    static_private: x25519::StaticSecret,
    by_key: HashMap<PublicKey, Peer>,
    by_index: HashMap<u32, PublicKey>,
    by_ip: HashMap<IpAddr, PublicKey>,
    next_index: u32,
}

impl PeerTable {
    pub fn new(own_key: PublicKey, own_ip: IpAddr, static_private: x25519::StaticSecret) -> Self {
        Self {
            own_key,
            own_ip,
            secondary_ip: None,
            static_private,
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            by_ip: HashMap::new(),
            // Random start so a restarted endpoint does not reuse the session indexes its peers
            // still remember from before the restart.
            next_index: rand::random::<u32>() & MAX_PEER_INDEX,
        }
    }

    /// Also refuses peers that claim the endpoint's second address.
    pub fn with_secondary_ip(mut self, ip: Option<IpAddr>) -> Self {
        self.secondary_ip = ip;
        self
    }

    /// Replaces the peer set. Validates the whole list first, so a bad list changes nothing.
    pub fn set(&mut self, peers: Vec<PeerConfig>) -> Result<PeerDiff, WgError> {
        if peers.len() > MAX_PEER_INDEX as usize {
            return Err(WgError::TooManyPeers(peers.len()));
        }
        let mut keys = HashSet::with_capacity(peers.len());
        let mut ips: HashMap<IpAddr, PublicKey> = HashMap::with_capacity(peers.len());
        for p in &peers {
            self.check(p)?;
            unique(p, &mut keys, &mut ips)?;
        }

        let mut diff = PeerDiff::default();
        let gone: Vec<PublicKey> = self
            .by_key
            .keys()
            .filter(|k| !keys.contains(k))
            .copied()
            .collect();
        for key in gone {
            if let Some(peer) = self.by_key.remove(&key) {
                self.by_index.remove(&peer.index);
                self.by_ip.remove(&peer.config.tunnel_ip);
            }
            diff.removed.push(key);
        }
        // Addresses may move between peers within one update; rebuild the address index.
        self.by_ip.clear();
        for cfg in peers {
            self.by_ip.insert(cfg.tunnel_ip, cfg.public_key);
            self.put(cfg, &mut diff);
        }
        diff.unchanged = self.by_key.len() - diff.added.len() - diff.updated.len();
        Ok(diff)
    }

    /// Removes the peers `remove` names, then adds or reconfigures those in `upsert`; every
    /// other peer is left alone. The same result as [`PeerTable::set`] with the whole new list,
    /// at the cost of the changed peers only (a gateway with 65,000 CVM peers must not walk
    /// them all, on the packet path's task, because one registered). Validated first: an
    /// invalid change changes nothing. A key may not be both removed and upserted.
    pub fn update(
        &mut self,
        upsert: Vec<PeerConfig>,
        remove: Vec<PublicKey>,
    ) -> Result<PeerDiff, WgError> {
        let removed: HashSet<PublicKey> = remove
            .iter()
            .copied()
            .filter(|k| self.by_key.contains_key(k))
            .collect();
        let mut keys = HashSet::with_capacity(upsert.len());
        let mut ips: HashMap<IpAddr, PublicKey> = HashMap::with_capacity(upsert.len());
        let mut added = 0usize;
        for p in &upsert {
            self.check(p)?;
            if remove.contains(&p.public_key) {
                return Err(WgError::DuplicatePeer(p.public_key));
            }
            unique(p, &mut keys, &mut ips)?;
            added += usize::from(!self.by_key.contains_key(&p.public_key));
        }
        for p in &upsert {
            // The address may belong to a peer that stays and is not reconfigured here.
            if let Some(&owner) = self.by_ip.get(&p.tunnel_ip) {
                if owner != p.public_key && !removed.contains(&owner) && !keys.contains(&owner) {
                    return Err(WgError::DuplicatePeerIp {
                        ip: p.tunnel_ip,
                        first: owner,
                        second: p.public_key,
                    });
                }
            }
        }
        if self.by_key.len() - removed.len() + added > MAX_PEER_INDEX as usize {
            return Err(WgError::TooManyPeers(
                self.by_key.len() - removed.len() + added,
            ));
        }

        let mut diff = PeerDiff::default();
        for key in remove {
            if let Some(peer) = self.by_key.remove(&key) {
                self.by_index.remove(&peer.index);
                if self.by_ip.get(&peer.config.tunnel_ip) == Some(&key) {
                    self.by_ip.remove(&peer.config.tunnel_ip);
                }
                diff.removed.push(key);
            }
        }
        // Free the old addresses of reconfigured peers first: two peers may swap addresses.
        for p in &upsert {
            if let Some(peer) = self.by_key.get(&p.public_key) {
                let old = peer.config.tunnel_ip;
                if old != p.tunnel_ip && self.by_ip.get(&old) == Some(&p.public_key) {
                    self.by_ip.remove(&old);
                }
            }
        }
        for cfg in upsert {
            self.by_ip.insert(cfg.tunnel_ip, cfg.public_key);
            self.put(cfg, &mut diff);
        }
        diff.unchanged = self.by_key.len() - diff.added.len() - diff.updated.len();
        Ok(diff)
    }

    /// The checks of one peer on its own.
    fn check(&self, p: &PeerConfig) -> Result<(), WgError> {
        if p.public_key == self.own_key {
            return Err(WgError::PeerIsSelf {
                key: p.public_key,
                what: "same public key",
            });
        }
        if p.tunnel_ip == self.own_ip || Some(p.tunnel_ip) == self.secondary_ip {
            return Err(WgError::PeerIsSelf {
                key: p.public_key,
                what: "same tunnel address",
            });
        }
        if !is_unicast(p.tunnel_ip) {
            return Err(WgError::InvalidPeerIp {
                key: p.public_key,
                ip: p.tunnel_ip,
            });
        }
        Ok(())
    }

    /// Adds `cfg` or reconfigures the peer with its key (the address index is the caller's).
    fn put(&mut self, cfg: PeerConfig, diff: &mut PeerDiff) {
        let key = cfg.public_key;
        match self.by_key.get_mut(&key) {
            Some(peer) if peer.config == cfg => {}
            Some(peer) => {
                if peer.config.persistent_keepalive != cfg.persistent_keepalive {
                    // boringtun fixes keepalive at construction; a new Tunn means one new
                    // handshake for this peer only.
                    peer.tunn = new_tunn(&self.static_private, &cfg, peer.index);
                }
                if cfg.endpoint.is_some() && cfg.endpoint != peer.config.endpoint {
                    peer.endpoint = cfg.endpoint;
                }
                peer.config = cfg;
                diff.updated.push(key);
            }
            None => {
                let index = self.alloc_index();
                let peer = Peer {
                    tunn: new_tunn(&self.static_private, &cfg, index),
                    endpoint: cfg.endpoint,
                    index,
                    config: cfg,
                };
                self.by_index.insert(index, key);
                self.by_key.insert(key, peer);
                diff.added.push(key);
            }
        }
    }

    fn alloc_index(&mut self) -> u32 {
        // The caller bounds the peer count below the index space, so this terminates.
        loop {
            let i = self.next_index;
            self.next_index = (self.next_index + 1) & MAX_PEER_INDEX;
            if !self.by_index.contains_key(&i) {
                return i;
            }
        }
    }

    pub fn get_mut(&mut self, key: &PublicKey) -> Option<&mut Peer> {
        self.by_key.get_mut(key)
    }

    /// The peer owning a receiver index from an incoming message.
    pub fn by_session_index(&mut self, receiver_idx: u32) -> Option<&mut Peer> {
        let key = self.by_index.get(&(receiver_idx >> 8))?;
        self.by_key.get_mut(key)
    }

    pub fn by_ip(&mut self, ip: &IpAddr) -> Option<&mut Peer> {
        let key = self.by_ip.get(ip)?;
        self.by_key.get_mut(key)
    }

    pub fn has_ip(&self, ip: &IpAddr) -> bool {
        self.by_ip.contains_key(ip)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Peer> {
        self.by_key.values_mut()
    }

    pub fn stats(&self) -> Vec<PeerStats> {
        self.by_key
            .values()
            .map(|p| {
                let (last_handshake, tx_bytes, rx_bytes, _loss, rtt_ms) = p.tunn.stats();
                PeerStats {
                    public_key: p.config.public_key,
                    tunnel_ip: p.config.tunnel_ip,
                    endpoint: p.endpoint,
                    last_handshake,
                    tx_bytes,
                    rx_bytes,
                    rtt_ms,
                }
            })
            .collect()
    }
}

fn new_tunn(static_private: &x25519::StaticSecret, cfg: &PeerConfig, index: u32) -> Tunn {
    Tunn::new(
        static_private.clone(),
        cfg.public_key.to_x25519(),
        None,
        cfg.persistent_keepalive,
        index,
        // Each peer gets boringtun's own per-peer handshake limiter (reset by its timers); the
        // driver's endpoint-wide limiter screens every handshake before it gets here.
        None,
    )
}

/// Records `p`'s key and address, refusing a second peer with either in one update.
fn unique(
    p: &PeerConfig,
    keys: &mut HashSet<PublicKey>,
    ips: &mut HashMap<IpAddr, PublicKey>,
) -> Result<(), WgError> {
    if !keys.insert(p.public_key) {
        return Err(WgError::DuplicatePeer(p.public_key));
    }
    if let Some(first) = ips.insert(p.tunnel_ip, p.public_key) {
        return Err(WgError::DuplicatePeerIp {
            ip: p.tunnel_ip,
            first,
            second: p.public_key,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::PrivateKey;

    fn table() -> PeerTable {
        let sk = PrivateKey::generate();
        PeerTable::new(
            sk.public_key(),
            "10.0.0.1".parse().expect("ip"),
            sk.to_x25519(),
        )
    }

    fn peer(n: u8) -> PeerConfig {
        PeerConfig::new(
            PrivateKey::generate().public_key(),
            IpAddr::from([10, 0, 1, n]),
        )
    }

    #[test]
    fn diff_keeps_unchanged_and_reports_changes() {
        let mut t = table();
        let (a, b, c) = (peer(1), peer(2), peer(3));
        let d = t.set(vec![a.clone(), b.clone()]).expect("set");
        assert_eq!(d.added.len(), 2);
        let a_index = t.get_mut(&a.public_key).expect("a").index;

        let mut b2 = b.clone();
        b2.persistent_keepalive = Some(25);
        let d = t.set(vec![a.clone(), b2, c.clone()]).expect("set");
        assert_eq!(d.unchanged, 1);
        assert_eq!(d.updated, vec![b.public_key]);
        assert_eq!(d.added, vec![c.public_key]);
        // Unchanged peers keep their index, hence their sessions.
        assert_eq!(t.get_mut(&a.public_key).expect("a").index, a_index);

        let d = t.set(vec![c.clone()]).expect("set");
        assert_eq!(d.removed.len(), 2);
        assert!(t.by_ip(&a.tunnel_ip).is_none());
        assert!(t.by_session_index(a_index << 8).is_none());
        assert!(t.by_ip(&c.tunnel_ip).is_some());
    }

    #[test]
    fn rejects_bad_lists_without_changing_anything() {
        let mut t = table();
        let a = peer(1);
        t.set(vec![a.clone()]).expect("set");
        let mut clash = peer(2);
        clash.tunnel_ip = a.tunnel_ip;
        let e = t.set(vec![a.clone(), clash]).expect_err("duplicate ip");
        assert!(e.to_string().contains("10.0.1.1"), "{e}");
        let e = t
            .set(vec![a.clone(), a.clone()])
            .expect_err("duplicate key");
        assert!(e.to_string().contains(&a.public_key.to_base64()), "{e}");
        let mut own = peer(3);
        own.tunnel_ip = "10.0.0.1".parse().expect("ip");
        assert!(matches!(t.set(vec![own]), Err(WgError::PeerIsSelf { .. })));
        assert!(t.by_ip(&a.tunnel_ip).is_some());
    }

    /// `update` ends where `set` with the whole list ends, and refuses what `set` refuses.
    #[test]
    fn update_equals_set_of_the_whole_list() {
        let (a, b, c, d) = (peer(1), peer(2), peer(3), peer(4));
        let mut t = table();
        t.set(vec![a.clone(), b.clone(), c.clone()]).expect("set");
        let a_index = t.get_mut(&a.public_key).expect("a").index;
        // b goes, d comes, a and c swap addresses.
        let mut a2 = a.clone();
        a2.tunnel_ip = c.tunnel_ip;
        let mut c2 = c.clone();
        c2.tunnel_ip = a.tunnel_ip;
        let diff = t
            .update(vec![a2.clone(), c2.clone(), d.clone()], vec![b.public_key])
            .expect("update");
        assert_eq!(diff.removed, vec![b.public_key]);
        assert_eq!(diff.added, vec![d.public_key]);
        assert_eq!(diff.updated.len(), 2);
        assert_eq!(diff.unchanged, 0);
        let mut reference = table();
        reference
            .set(vec![a2.clone(), c2.clone(), d.clone()])
            .expect("set");
        for p in [&a2, &c2, &d] {
            assert_eq!(
                t.by_ip(&p.tunnel_ip).expect("owner").config.public_key,
                reference
                    .by_ip(&p.tunnel_ip)
                    .expect("owner")
                    .config
                    .public_key
            );
        }
        assert!(t.by_ip(&b.tunnel_ip).is_none());
        assert_eq!(t.by_key.len(), 3);
        assert_eq!(t.by_index.len(), 3);
        // A reconfigured peer keeps its index, hence its session.
        assert_eq!(t.get_mut(&a.public_key).expect("a").index, a_index);

        // Refused, and nothing changes: an address a staying peer holds, a key both removed
        // and added, a peer twice, our own address.
        let mut clash = peer(5);
        clash.tunnel_ip = d.tunnel_ip;
        assert!(matches!(
            t.update(vec![clash], vec![]),
            Err(WgError::DuplicatePeerIp { .. })
        ));
        assert!(t.update(vec![d.clone()], vec![d.public_key]).is_err());
        assert!(t.update(vec![d.clone(), d.clone()], vec![]).is_err());
        let mut own = peer(6);
        own.tunnel_ip = "10.0.0.1".parse().expect("ip");
        assert!(matches!(
            t.update(vec![own], vec![]),
            Err(WgError::PeerIsSelf { .. })
        ));
        assert_eq!(t.by_key.len(), 3);
        // An address freed by a removal in the same update can be taken.
        let mut e = peer(7);
        e.tunnel_ip = d.tunnel_ip;
        let diff = t
            .update(vec![e.clone()], vec![d.public_key])
            .expect("reuse");
        assert_eq!(
            (diff.added.len(), diff.removed.len(), diff.unchanged),
            (1, 1, 2)
        );
        assert_eq!(
            t.by_ip(&d.tunnel_ip).expect("owner").config.public_key,
            e.public_key
        );
    }

    #[test]
    fn address_can_move_between_peers() {
        let mut t = table();
        let (a, mut b) = (peer(1), peer(2));
        t.set(vec![a.clone(), b.clone()]).expect("set");
        b.tunnel_ip = IpAddr::from([10, 0, 1, 9]);
        let mut a2 = a.clone();
        a2.tunnel_ip = IpAddr::from([10, 0, 1, 2]);
        t.set(vec![a2.clone(), b.clone()]).expect("swap");
        let owner = t.by_ip(&a2.tunnel_ip).expect("owner").config.public_key;
        assert_eq!(owner, a.public_key);
    }
}
