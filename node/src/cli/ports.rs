//! Loopback ports for local clusters (`up`) and the cluster tests.
//!
//! Ports come from outside the kernel's ephemeral range. A port inside it can be taken, while
//! its node is down, as the source port of some outgoing connection — including a dial to that
//! very port, which TCP completes as a self-connection — and the restarted node then cannot bind
//! it. Nothing the kernel hands out on its own lives outside the range.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};

use rand::Rng;

/// The lowest port we pick: below it live well-known services someone may start later.
const FLOOR: u16 = 10_000;

/// A bound loopback TCP listener on a port outside the ephemeral range. Keep it until the
/// process that will bind the port is about to start, so later picks cannot get the same port.
pub fn reserve_tcp() -> std::io::Result<TcpListener> {
    reserve(TcpListener::bind)
}

/// [`reserve_tcp`] for UDP.
pub fn reserve_udp() -> std::io::Result<UdpSocket> {
    reserve(UdpSocket::bind)
}

fn reserve<T>(bind: impl Fn(SocketAddr) -> std::io::Result<T>) -> std::io::Result<T> {
    let (lo, hi) = ephemeral_range();
    let mut rng = rand::thread_rng();
    for _ in 0..512 {
        let Some(port) = outside(lo, hi, rng.gen()) else {
            break;
        };
        if let Ok(s) = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))) {
            return Ok(s);
        }
    }
    // No room outside the range (or all of it taken): let the kernel choose.
    bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
}

/// Linux's `ip_local_port_range`; elsewhere the IANA dynamic range.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>());
            match (it.next(), it.next()) {
                (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Some((lo, hi)),
                _ => None,
            }
        })
        .unwrap_or((49_152, 65_535))
}

/// Maps `r` onto the ports in `[FLOOR, 65535]` outside `[lo, hi]`, or None if there are none.
fn outside(lo: u16, hi: u16, r: u32) -> Option<u16> {
    let below = u32::from(lo.saturating_sub(FLOOR));
    let above = u32::from(u16::MAX - hi.max(FLOOR - 1));
    let n = below + above;
    if n == 0 {
        return None;
    }
    let i = r % n;
    let port = if i < below {
        u32::from(FLOOR) + i
    } else {
        u32::from(hi.max(FLOOR - 1)) + 1 + (i - below)
    };
    u16::try_from(port).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_stay_outside_the_ephemeral_range() {
        for r in 0..100_000u32 {
            let p = outside(32_768, 60_999, r.wrapping_mul(2_654_435_761)).expect("room");
            assert!((FLOOR..32_768).contains(&p) || p >= 61_000, "{p}");
        }
        // Both ends of both windows are reachable.
        let n = (32_768 - 10_000) + (65_535 - 60_999);
        assert_eq!(outside(32_768, 60_999, 0), Some(FLOOR));
        assert_eq!(outside(32_768, 60_999, 32_768 - 10_000 - 1), Some(32_767));
        assert_eq!(outside(32_768, 60_999, 32_768 - 10_000), Some(61_000));
        assert_eq!(outside(32_768, 60_999, n - 1), Some(65_535));
    }

    #[test]
    fn a_range_covering_everything_leaves_nothing() {
        assert_eq!(outside(1_024, 65_535, 7), None);
        assert_eq!(outside(FLOOR, 65_535, 7), None);
    }

    #[test]
    fn reserved_ports_are_outside_this_machines_range() {
        let (lo, hi) = ephemeral_range();
        let l = reserve_tcp().expect("reserve tcp");
        let p = l.local_addr().expect("addr").port();
        if outside(lo, hi, 0).is_some() {
            assert!(!(lo..=hi).contains(&p), "{p} in {lo}-{hi}");
        }
        let u = reserve_udp().expect("reserve udp");
        assert!(u.local_addr().expect("addr").ip().is_loopback());
    }
}
