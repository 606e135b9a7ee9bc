//! Gateway tunnel addresses, derived from node ids. A leaf (it imports nothing of the crate), so
//! the configuration can check a node id without importing the tunnel.
//!
//! Every gateway has its *own* address, derived from its node id in
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

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use portcullis_raft::state::{GATEWAY_TUNNEL_V4, GATEWAY_TUNNEL_V6};

/// First address of the gateway range; node `id` gets `base + id`. The raft crate owns the
/// ranges because pool validation must keep CVM pools out of them.
const GATEWAY_BASE: Ipv4Addr = GATEWAY_TUNNEL_V4.0;
const GATEWAY_BASE6: Ipv6Addr = GATEWAY_TUNNEL_V6.0;

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
}
