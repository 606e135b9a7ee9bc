//! Keeps backend connections off the gateway's own listeners.
//!
//! A route names a backend by tunnel IP or by the operator's `backend_addr`. If such an
//! address, or a name it resolves to, is one of this node's listeners (admin API and
//! `/metrics`, cluster RPC, the public HTTPS and HTTP ports) or one of another cluster
//! member's (on this host: a local cluster, or a co-located member), a request from the
//! internet would be relayed into the control plane from inside the host's trust boundary. So
//! every connect is checked here, after name resolution and before the inner connector runs,
//! and such a target is refused as unreachable.
//!
//! "The same listener" means the same port and an address that reaches it: the listener's own
//! address, or, for a listener on a wildcard address, any loopback address, the wildcard
//! itself (connecting to `0.0.0.0` reaches the host) or an address of a local interface.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::upstream::{BoxedIo, Target, Upstream};

/// The listener addresses of the other cluster members, read at connect time (membership
/// changes while the node runs).
pub type PeerListeners = Arc<dyn Fn() -> Vec<SocketAddr> + Send + Sync>;

pub struct SelfGuard {
    inner: Arc<dyn Upstream>,
    own: Vec<SocketAddr>,
    peers: PeerListeners,
    /// Addresses of this host's interfaces, read once at start.
    local: Vec<IpAddr>,
}

impl SelfGuard {
    pub fn new(inner: Arc<dyn Upstream>, own: Vec<SocketAddr>, peers: PeerListeners) -> Self {
        SelfGuard {
            inner,
            own,
            peers,
            local: local_addresses(),
        }
    }

    /// Whether connecting to `addr` could reach one of `listeners`.
    fn reaches(&self, addr: SocketAddr, listeners: &[SocketAddr]) -> bool {
        let ip = addr.ip().to_canonical();
        let on_host =
            |ip: IpAddr| ip.is_loopback() || ip.is_unspecified() || self.local.contains(&ip);
        listeners.iter().any(|l| {
            let lip = l.ip().to_canonical();
            l.port() == addr.port()
                && (lip == ip
                    || (lip.is_unspecified() && on_host(ip))
                    || (ip.is_unspecified() && on_host(lip)))
        })
    }

    fn refused(&self, addr: SocketAddr) -> bool {
        self.reaches(addr, &self.own) || self.reaches(addr, &(self.peers)())
    }
}

#[async_trait::async_trait]
impl Upstream for SelfGuard {
    async fn connect(&self, target: &Target) -> io::Result<BoxedIo> {
        let addrs: Vec<SocketAddr> = match target.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, target.port)],
            Err(_) => tokio::net::lookup_host((target.host.as_str(), target.port))
                .await?
                .collect(),
        };
        // A name that resolves to a listener among other addresses is refused whole: which
        // address the inner connector would pick is not ours to guess.
        if let Some(bad) = addrs.iter().find(|a| self.refused(**a)) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("backend {target} is a gateway listener ({bad}); refused"),
            ));
        }
        // Connect to the addresses that were checked, in order, as a plain connect to the name
        // would, not to the name again (a second lookup could answer differently).
        let mut last = io::Error::new(
            io::ErrorKind::NotFound,
            format!("backend {target} resolves to no address"),
        );
        for a in addrs {
            let checked = Target {
                host: a.ip().to_string(),
                port: a.port(),
            };
            match self.inner.connect(&checked).await {
                Ok(io) => return Ok(io),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// This host's interface addresses; empty if they cannot be read (loopback and wildcard are
/// still covered).
fn local_addresses() -> Vec<IpAddr> {
    match nix::ifaddrs::getifaddrs() {
        Ok(list) => list
            .filter_map(|i| {
                let a = i.address?;
                a.as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list interface addresses; backend guard covers loopback only");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Refuse;

    #[async_trait::async_trait]
    impl Upstream for Refuse {
        async fn connect(&self, target: &Target) -> io::Result<BoxedIo> {
            Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                target.to_string(),
            ))
        }
    }

    fn guard() -> SelfGuard {
        let own = vec![
            "127.0.0.1:9080".parse().expect("addr"),
            "0.0.0.0:8443".parse().expect("addr"),
        ];
        let peers: PeerListeners = Arc::new(|| vec!["127.0.0.1:19080".parse().expect("addr")]);
        SelfGuard::new(Arc::new(Refuse), own, peers)
    }

    async fn kind(g: &SelfGuard, host: &str, port: u16) -> io::ErrorKind {
        let t = Target {
            host: host.into(),
            port,
        };
        match g.connect(&t).await {
            Ok(_) => panic!("Refuse never connects"),
            Err(e) => e.kind(),
        }
    }

    #[tokio::test]
    async fn listeners_of_this_node_and_its_peers_are_refused() {
        let g = guard();
        for (host, port) in [
            ("127.0.0.1", 9080),
            ("0.0.0.0", 9080),
            ("::ffff:127.0.0.1", 9080),
            ("127.0.0.1", 8443),
            ("127.0.0.7", 8443),
            ("::1", 8443),
            ("localhost", 8443),
            ("127.0.0.1", 19080),
        ] {
            assert_eq!(
                kind(&g, host, port).await,
                io::ErrorKind::PermissionDenied,
                "{host}:{port}"
            );
        }
    }

    #[tokio::test]
    async fn other_addresses_reach_the_inner_connector() {
        let g = guard();
        // A different port, another loopback address than a specific listener's, a CVM.
        for (host, port) in [
            ("127.0.0.1", 9081),
            ("127.0.0.2", 9080),
            ("100.64.0.5", 8443),
        ] {
            assert_eq!(
                kind(&g, host, port).await,
                io::ErrorKind::ConnectionRefused,
                "{host}:{port}"
            );
        }
    }
}
