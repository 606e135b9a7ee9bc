//! The cluster-wide CVM tunnel address pool: one IPv4 or IPv6 range, allocated through Raft.
//!
//! Addresses are offsets in one range, with no per-node sub-ranges, so any cluster size shares
//! the whole space. Offsets freed by removed instances are reused lowest-first, which keeps
//! allocation deterministic. Offsets are `u64`: an IPv6 /64 has more addresses than any cluster
//! will ever register, so capacity is capped at `u64::MAX` instead of carrying `u128` around.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use super::validate::ValidationError;

/// The IPv4 range gateway tunnel addresses come from (`198.18.0.0 + node_id`, RFC 2544
/// benchmarking space). A CVM pool may not overlap it.
pub const GATEWAY_TUNNEL_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 15);
/// The IPv6 range gateway tunnel addresses come from when the pool is IPv6
/// (`fd70:6f72:7463::` + node_id, a fixed ULA /96). A CVM pool may not overlap it.
pub const GATEWAY_TUNNEL_V6: (Ipv6Addr, u8) =
    (Ipv6Addr::new(0xfd70, 0x6f72, 0x7463, 0, 0, 0, 0, 0), 96);

/// The CVM tunnel address pool. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelPool {
    /// The network address of the range (host bits zero).
    pub base: IpAddr,
    pub prefix_len: u8,
    /// Highest offset handed out so far (0: none yet; offset 0 is the network address).
    pub next_offset: u64,
    /// Offsets below `next_offset` returned by removed instances.
    pub free: BTreeSet<u64>,
}

impl Default for TunnelPool {
    fn default() -> Self {
        // 100.64.0.0/10 (RFC 6598 shared space): ~4M addresses, well clear of typical LANs.
        TunnelPool::new(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0)), 10)
    }
}

impl fmt::Display for TunnelPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix_len)
    }
}

/// Why a pool range was refused.
fn bad(value: impl Into<String>, reason: &'static str) -> ValidationError {
    ValidationError::Field {
        field: "tunnel pool",
        value: value.into(),
        reason,
    }
}

impl TunnelPool {
    /// An empty pool over `base/prefix_len`; call [`TunnelPool::validate_range`] first.
    pub fn new(base: IpAddr, prefix_len: u8) -> Self {
        TunnelPool {
            base,
            prefix_len,
            next_offset: 0,
            free: BTreeSet::new(),
        }
    }

    /// Parses `addr/prefix` and checks it with [`TunnelPool::validate_range`].
    pub fn parse_cidr(cidr: &str) -> Result<(IpAddr, u8), ValidationError> {
        let cidr = cidr.trim();
        let (addr, len) = cidr.split_once('/').ok_or_else(|| {
            bad(
                cidr,
                "expected ADDRESS/PREFIX, e.g. 100.64.0.0/10 or fd00:1::/64",
            )
        })?;
        let base: IpAddr = addr
            .parse()
            .map_err(|_| bad(cidr, "the address is not an IPv4 or IPv6 address"))?;
        let prefix_len: u8 = len
            .parse()
            .map_err(|_| bad(cidr, "the prefix length is not a number"))?;
        Self::validate_range(base, prefix_len)?;
        Ok((base, prefix_len))
    }

    /// Checks a range before it becomes the pool: a prefix that leaves at least two host
    /// addresses, the network address given (host bits zero), a unicast range, and no overlap
    /// with the gateway tunnel ranges (a CVM holding a gateway's address would break the
    /// source-address checks on both ends).
    pub fn validate_range(base: IpAddr, prefix_len: u8) -> Result<(), ValidationError> {
        let shown = format!("{base}/{prefix_len}");
        let bits = total_bits(base);
        if prefix_len > bits.saturating_sub(2) {
            return Err(bad(
                shown,
                "the prefix leaves fewer than 2 host addresses (IPv4 at most /30, IPv6 at most /126)",
            ));
        }
        if host_part(base, prefix_len) != 0 {
            return Err(bad(
                shown,
                "host bits are set: give the network address (e.g. fd00:1::/64, not fd00:1::5/64)",
            ));
        }
        let unicast = match base {
            IpAddr::V4(a) => {
                !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast())
                    // 240.0.0.0/4 (reserved) includes the broadcast address.
                    && a.octets()[0] < 240
            }
            IpAddr::V6(a) => {
                !(a.is_unspecified()
                    || a.is_loopback()
                    || a.is_multicast()
                    // Link-local (fe80::/10): scoped to one link, not routable through a tunnel.
                    || (a.segments()[0] & 0xffc0) == 0xfe80
                    // IPv4-mapped (::ffff:0:0/96): such addresses are IPv4 on the wire.
                    || a.to_ipv4_mapped().is_some())
            }
        };
        // A prefix this short also covers loopback, multicast or other reserved ranges.
        let short = prefix_len < if base.is_ipv4() { 4 } else { 8 };
        if !unicast || short {
            return Err(bad(
                shown,
                "not a unicast range for tunnel addresses (loopback, multicast, link-local, unspecified or too wide)",
            ));
        }
        let (gw, gw_len) = match base {
            IpAddr::V4(_) => (IpAddr::V4(GATEWAY_TUNNEL_V4.0), GATEWAY_TUNNEL_V4.1),
            IpAddr::V6(_) => (IpAddr::V6(GATEWAY_TUNNEL_V6.0), GATEWAY_TUNNEL_V6.1),
        };
        // Two prefix-aligned ranges overlap exactly when the shorter one contains the other's
        // network address.
        if contains(base, prefix_len, gw) || contains(gw, gw_len, base) {
            return Err(bad(
                shown,
                "overlaps the gateway tunnel addresses (198.18.0.0/15, fd70:6f72:7463::/96)",
            ));
        }
        Ok(())
    }

    fn host_bits(&self) -> u32 {
        u32::from(total_bits(self.base)).saturating_sub(u32::from(self.prefix_len))
    }

    /// How many addresses can be handed out: the range minus the network address and the last
    /// address (IPv4 broadcast; kept out for IPv6 too so both families follow one rule), capped
    /// at `u64::MAX`.
    pub fn capacity(&self) -> u64 {
        match self.host_bits() {
            h if h > 64 => u64::MAX,
            64 => u64::MAX - 1,
            h => (1u64 << h).saturating_sub(2),
        }
    }

    /// Whether `ip` lies in the pool's range (allocated or not).
    pub fn contains(&self, ip: IpAddr) -> bool {
        contains(self.base, self.prefix_len, ip)
    }

    /// How many addresses are handed out right now.
    pub fn allocated(&self) -> u64 {
        self.next_offset
            .saturating_sub(u64::try_from(self.free.len()).unwrap_or(u64::MAX))
    }

    /// The lowest free address, or `None` when the pool is exhausted.
    pub(crate) fn allocate(&mut self) -> Option<IpAddr> {
        let offset = match self.free.first().copied() {
            Some(o) => o,
            None => {
                let o = self.next_offset.checked_add(1)?;
                if o > self.capacity() {
                    return None;
                }
                o
            }
        };
        // Computed before the offset is taken, so a failure (impossible for a validated
        // range) leaves the pool unchanged.
        let ip = self.address(offset)?;
        if self.free.remove(&offset) {
            return Some(ip);
        }
        self.next_offset = offset;
        Some(ip)
    }

    /// Returns `ip` to the pool. Addresses outside the range (another family, or a range that
    /// was replaced) are ignored.
    pub(crate) fn release(&mut self, ip: IpAddr) {
        if let Some(offset) = self.offset_of(ip) {
            if offset > 0 && offset <= self.next_offset {
                self.free.insert(offset);
            }
        }
    }

    fn address(&self, offset: u64) -> Option<IpAddr> {
        match self.base {
            IpAddr::V4(b) => {
                let o = u32::try_from(offset).ok()?;
                Some(IpAddr::V4(Ipv4Addr::from(u32::from(b).checked_add(o)?)))
            }
            IpAddr::V6(b) => Some(IpAddr::V6(Ipv6Addr::from(
                u128::from(b).checked_add(u128::from(offset))?,
            ))),
        }
    }

    fn offset_of(&self, ip: IpAddr) -> Option<u64> {
        if !self.contains(ip) {
            return None;
        }
        match (self.base, ip) {
            (IpAddr::V4(b), IpAddr::V4(a)) => {
                Some(u64::from(u32::from(a).checked_sub(u32::from(b))?))
            }
            (IpAddr::V6(b), IpAddr::V6(a)) => {
                u64::try_from(u128::from(a).checked_sub(u128::from(b))?).ok()
            }
            _ => None,
        }
    }
}

fn total_bits(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// The host bits of `ip` under `prefix_len`, as a number.
fn host_part(ip: IpAddr, prefix_len: u8) -> u128 {
    let (value, bits) = match ip {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32u32),
        IpAddr::V6(a) => (u128::from(a), 128u32),
    };
    let host_bits = bits.saturating_sub(u32::from(prefix_len));
    if host_bits >= 128 {
        value
    } else {
        value & ((1u128 << host_bits) - 1)
    }
}

/// Whether `ip` is inside `base/prefix_len` (false across families).
fn contains(base: IpAddr, prefix_len: u8, ip: IpAddr) -> bool {
    let (b, a, bits) = match (base, ip) {
        (IpAddr::V4(b), IpAddr::V4(a)) => {
            (u128::from(u32::from(b)), u128::from(u32::from(a)), 32u32)
        }
        (IpAddr::V6(b), IpAddr::V6(a)) => (u128::from(b), u128::from(a), 128u32),
        _ => return false,
    };
    let host_bits = bits.saturating_sub(u32::from(prefix_len));
    if host_bits >= 128 {
        return true;
    }
    (a >> host_bits) == (b >> host_bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cidr: &str) -> TunnelPool {
        let (base, len) = TunnelPool::parse_cidr(cidr).expect(cidr);
        TunnelPool::new(base, len)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn ipv6_allocation_is_lowest_first_and_release_reuses() {
        let mut p = pool("fd00:1::/64");
        assert_eq!(p.allocate(), Some(ip("fd00:1::1")));
        assert_eq!(p.allocate(), Some(ip("fd00:1::2")));
        assert_eq!(p.allocate(), Some(ip("fd00:1::3")));
        assert_eq!(p.allocated(), 3);
        p.release(ip("fd00:1::2"));
        p.release(ip("fd00:1::1"));
        // Outside the range, another family, never allocated: ignored.
        p.release(ip("fd00:2::1"));
        p.release(ip("100.64.0.1"));
        p.release(ip("fd00:1::99"));
        assert_eq!(p.allocated(), 1);
        assert_eq!(p.allocate(), Some(ip("fd00:1::1")));
        assert_eq!(p.allocate(), Some(ip("fd00:1::2")));
        assert_eq!(p.allocate(), Some(ip("fd00:1::4")));
        assert!(p.contains(ip("fd00:1::ffff:ffff:ffff:ffff")));
        assert!(!p.contains(ip("fd00:1:0:1::1")));
    }

    #[test]
    fn capacity_by_family_and_prefix() {
        assert_eq!(TunnelPool::default().capacity(), (1 << 22) - 2);
        assert_eq!(pool("10.0.0.0/30").capacity(), 2);
        assert_eq!(pool("10.0.0.0/16").capacity(), 65_534);
        assert_eq!(pool("fd00:1::/126").capacity(), 2);
        assert_eq!(pool("fd00:1::/112").capacity(), 65_534);
        assert_eq!(pool("fd00:1::/64").capacity(), u64::MAX - 1);
        assert_eq!(pool("fd00::/48").capacity(), u64::MAX);
    }

    #[test]
    fn small_pools_exhaust_and_refill() {
        let mut p = pool("fd00:9::/126");
        assert_eq!(p.allocate(), Some(ip("fd00:9::1")));
        assert_eq!(p.allocate(), Some(ip("fd00:9::2")));
        assert_eq!(p.allocate(), None, "the last address is never handed out");
        p.release(ip("fd00:9::1"));
        assert_eq!(p.allocate(), Some(ip("fd00:9::1")));
        let mut v4 = pool("10.1.2.0/30");
        assert_eq!(v4.allocate(), Some(ip("10.1.2.1")));
        assert_eq!(v4.allocate(), Some(ip("10.1.2.2")));
        assert_eq!(v4.allocate(), None);
    }

    #[test]
    fn huge_ipv6_pool_caps_at_u64() {
        let mut p = pool("fd00::/48");
        p.next_offset = u64::MAX - 1;
        assert_eq!(
            p.allocate(),
            Some(IpAddr::V6(Ipv6Addr::from(
                u128::from(ip_v6("fd00::")) + u128::from(u64::MAX)
            )))
        );
        assert_eq!(p.allocate(), None, "offsets are u64");
    }

    fn ip_v6(s: &str) -> Ipv6Addr {
        s.parse().expect("v6")
    }

    #[test]
    fn ranges_are_validated_with_reasons() {
        for ok in [
            "100.64.0.0/10",
            "10.0.0.0/8",
            "fd00:1::/64",
            "2001:db8::/32",
            "fd70:6f72:7464::/48",
        ] {
            assert!(TunnelPool::parse_cidr(ok).is_ok(), "{ok}");
        }
        let reason = |cidr: &str| match TunnelPool::parse_cidr(cidr) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{cidr} accepted"),
        };
        assert!(reason("fd00:1::").contains("ADDRESS/PREFIX"));
        assert!(reason("fd00:1::/x").contains("prefix length"));
        assert!(reason("nonsense/64").contains("not an IPv4 or IPv6"));
        assert!(reason("fd00:1::5/64").contains("host bits"));
        assert!(reason("10.0.0.0/31").contains("fewer than 2"));
        assert!(reason("fd00::/127").contains("fewer than 2"));
        assert!(reason("fd00::/200").contains("fewer than 2"));
        assert!(reason("198.18.0.0/16").contains("gateway"));
        assert!(reason("198.0.0.0/8").contains("gateway"));
        assert!(reason("fd70:6f72:7463::/64").contains("gateway"));
        assert!(reason("fd00::/8").contains("gateway"));
        assert!(reason("fe80::/64").contains("unicast"));
        assert!(reason("ff02::/64").contains("unicast"));
        assert!(reason("127.0.0.0/8").contains("unicast"));
        assert!(reason("224.0.0.0/4").contains("unicast"));
        assert!(reason("::/0").contains("unicast"));
        assert!(reason("::ffff:0:0/96").contains("unicast"));
    }
}
