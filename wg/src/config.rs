//! Endpoint and peer configuration.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::error::WgError;
use crate::key::{PrivateKey, PublicKey};

/// WireGuard adds 32 bytes to every inner packet (16-byte header + 16-byte tag) and pads the
/// plaintext to a multiple of 16.
pub(crate) const WG_DATA_OVERHEAD: usize = 32;

/// How one endpoint (a gateway node, or a CVM's agent) runs.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// This endpoint's private key. No default: load it from the 0600 key file.
    pub private_key: PrivateKey,
    /// This endpoint's own tunnel address (the CVM's allocated IP, or the gateway node's).
    /// Decrypted packets for any other destination are dropped: nothing is forwarded.
    pub tunnel_ip: IpAddr,
    /// A second own address of the other family, or `None` (the default). A gateway serves
    /// CVM pools of either family, so it answers on one IPv4 and one IPv6 address; a CVM has
    /// one address.
    pub secondary_ip: Option<IpAddr>,
    /// Inner MTU in bytes: the largest IP packet carried in one WireGuard message.
    /// Default 1420 (wg-quick's default: 1500 minus IPv6 + UDP + WireGuard overhead).
    pub mtu: usize,
    /// Receive and send buffer of each tunnel TCP connection, in bytes (each way). Default 256 KiB.
    pub tcp_buffer_bytes: usize,
    /// Default timeout of [`crate::Endpoint::connect`]. Default 5 s.
    pub connect_timeout: Duration,
    /// How often WireGuard timers run (handshake retries, rekeys, keepalives). Default 100 ms,
    /// the granularity boringtun's timers are written for.
    pub timer_interval: Duration,
    /// Most tunnel TCP connections open at once (connects + accepted). Default 16384.
    pub max_connections: usize,
    /// Listening sockets kept ready per listened port (SYNs that can be in flight at once).
    /// Default 8.
    pub listen_backlog: usize,
    /// Accepted connections queued per listener before new ones are reset. Default 128.
    pub accept_queue: usize,
}

impl EndpointConfig {
    /// A configuration with the defaults above.
    pub fn new(private_key: PrivateKey, tunnel_ip: IpAddr) -> Self {
        Self {
            private_key,
            tunnel_ip,
            secondary_ip: None,
            mtu: 1420,
            tcp_buffer_bytes: 256 * 1024,
            connect_timeout: Duration::from_secs(5),
            timer_interval: Duration::from_millis(100),
            max_connections: 16384,
            listen_backlog: 8,
            accept_queue: 128,
        }
    }

    /// Checks every field and the ones that depend on each other.
    pub fn validate(&self) -> Result<(), WgError> {
        if !is_unicast(self.tunnel_ip) {
            return Err(WgError::InvalidTunnelIp(self.tunnel_ip));
        }
        if let Some(ip) = self.secondary_ip {
            // One address per family: smoltcp picks the source by the destination's family.
            if !is_unicast(ip) || ip.is_ipv6() == self.tunnel_ip.is_ipv6() {
                return Err(WgError::InvalidTunnelIp(ip));
            }
        }
        // IPv6 requires links of at least 1280 bytes (RFC 8200); IPv4 hosts must take 576.
        let v6 = self.tunnel_ip.is_ipv6() || self.secondary_ip.is_some_and(|ip| ip.is_ipv6());
        let min = if v6 { 1280 } else { 576 };
        let max = 65535 - WG_DATA_OVERHEAD - 16 - 8 - 40;
        if self.mtu < min || self.mtu > max {
            return Err(WgError::InvalidMtu {
                mtu: self.mtu,
                min,
                max,
            });
        }
        let positive = |name, value: String, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(WgError::InvalidSetting {
                    name,
                    value,
                    reason: "must be greater than zero",
                })
            }
        };
        positive(
            "tcp_buffer_bytes",
            self.tcp_buffer_bytes.to_string(),
            self.tcp_buffer_bytes >= self.mtu,
        )
        .map_err(|_| WgError::InvalidSetting {
            name: "tcp_buffer_bytes",
            value: self.tcp_buffer_bytes.to_string(),
            reason: "must be at least the MTU",
        })?;
        positive(
            "connect_timeout",
            format!("{:?}", self.connect_timeout),
            !self.connect_timeout.is_zero(),
        )?;
        positive(
            "timer_interval",
            format!("{:?}", self.timer_interval),
            !self.timer_interval.is_zero() && self.timer_interval <= Duration::from_secs(1),
        )
        .map_err(|_| WgError::InvalidSetting {
            name: "timer_interval",
            value: format!("{:?}", self.timer_interval),
            reason: "must be between 1 ns and 1 s (WireGuard timers need sub-second ticks)",
        })?;
        positive(
            "max_connections",
            self.max_connections.to_string(),
            self.max_connections > 0,
        )?;
        positive(
            "listen_backlog",
            self.listen_backlog.to_string(),
            self.listen_backlog > 0,
        )?;
        positive(
            "accept_queue",
            self.accept_queue.to_string(),
            self.accept_queue > 0,
        )?;
        Ok(())
    }

    /// Largest UDP payload accepted: a full-MTU inner packet, padding and WireGuard overhead.
    /// Anything bigger is dropped unparsed.
    pub(crate) fn max_datagram(&self) -> usize {
        self.mtu.div_ceil(16) * 16 + WG_DATA_OVERHEAD
    }
}

/// One peer of an endpoint: on a gateway, a CVM; on a CVM, a gateway node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's public key; its identity.
    pub public_key: PublicKey,
    /// The one inner source address this peer may use (its allocated tunnel IP, AllowedIPs /32).
    pub tunnel_ip: IpAddr,
    /// Where to send to the peer. `None` for peers behind NAT (CVMs): the endpoint learns the
    /// address from the peer's first authenticated packet and follows it when it roams.
    pub endpoint: Option<SocketAddr>,
    /// Persistent keepalive in seconds (keeps NAT mappings open). `None`: off. CVM agents behind
    /// NAT should use 25.
    pub persistent_keepalive: Option<u16>,
}

impl PeerConfig {
    /// A peer without a known endpoint and without keepalive.
    pub fn new(public_key: PublicKey, tunnel_ip: IpAddr) -> Self {
        Self {
            public_key,
            tunnel_ip,
            endpoint: None,
            persistent_keepalive: None,
        }
    }

    /// Sets the UDP endpoint.
    pub fn with_endpoint(mut self, endpoint: SocketAddr) -> Self {
        self.endpoint = Some(endpoint);
        self
    }

    /// Sets the persistent keepalive, in seconds.
    pub fn with_keepalive(mut self, seconds: u16) -> Self {
        self.persistent_keepalive = Some(seconds);
        self
    }
}

pub(crate) fn is_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() || v4.is_loopback())
        }
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast() || v6.is_loopback()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let c = EndpointConfig::new(PrivateKey::generate(), "10.1.0.1".parse().expect("ip"));
        c.validate().expect("defaults are valid");
        assert_eq!(c.max_datagram(), 1424 + 32);
    }

    #[test]
    fn rejects_bad_values_naming_them() {
        let mut c = EndpointConfig::new(PrivateKey::generate(), "fd00::1".parse().expect("ip"));
        c.mtu = 1000;
        let e = c.validate().expect_err("v6 needs 1280");
        assert!(e.to_string().contains("1000"), "{e}");
        c.mtu = 1420;
        c.tunnel_ip = "0.0.0.0".parse().expect("ip");
        let e = c.validate().expect_err("unspecified");
        assert!(e.to_string().contains("0.0.0.0"), "{e}");
        c.tunnel_ip = "10.0.0.1".parse().expect("ip");
        c.listen_backlog = 0;
        let e = c.validate().expect_err("zero backlog");
        assert!(e.to_string().contains("listen_backlog = 0"), "{e}");
    }
}
