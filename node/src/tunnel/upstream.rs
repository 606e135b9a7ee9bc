//! The data plane's connector through the mesh: a tunnel-pool address goes through the gateway's
//! WireGuard endpoint, anything else over plain TCP.

use std::io;
use std::net::IpAddr;

use portcullis_raft::store::SharedState;
use portcullis_wg::{Endpoint, WgError};

use crate::edge::upstream::{BoxedIo, Target, TcpUpstream, Upstream};

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
