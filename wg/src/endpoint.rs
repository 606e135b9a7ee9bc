//! [`Endpoint`]: the handle applications hold. Cheap to clone; the driver task stops when the
//! last clone is dropped.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};
use tracing::Instrument;

use crate::config::{EndpointConfig, PeerConfig};
use crate::driver::{Command, Driver};
use crate::error::WgError;
use crate::key::PublicKey;
use crate::metrics::Counters;
use crate::peers::{PeerDiff, PeerStats};
use crate::socket::DatagramSocket;
use crate::stream::{TunnelListener, TunnelStream};

/// Receive and send buffer requested for the endpoint's UDP socket.
const UDP_BUFFER_BYTES: usize = 4 << 20;

/// A user-space WireGuard endpoint with its own TCP/IP stack on one tunnel address.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

struct Inner {
    commands: mpsc::Sender<Command>,
    counters: Arc<Counters>,
    public_key: PublicKey,
    tunnel_ip: IpAddr,
    local_addr: SocketAddr,
    connect_timeout: Duration,
}

impl Endpoint {
    /// Starts an endpoint on `socket` (already bound by the caller) with no peers.
    /// Must be called inside a tokio runtime: it spawns the driver task.
    pub fn new<S: DatagramSocket>(config: EndpointConfig, socket: S) -> Result<Self, WgError> {
        config.validate()?;
        let local_addr = socket.local_addr().map_err(WgError::Socket)?;
        // One task reads every peer's datagrams; a peer's kernel TCP sends in bursts bigger than
        // the default 208 KiB buffer, and each overflow drop makes that sender back off. With
        // 4 MiB, kernel TCP behind wireguard-go → Endpoint went from ~60 to ~110 MB/s
        // (docs/benchmarks.md). Best effort: the kernel caps it at net.core.rmem_max.
        match socket.set_buffer_sizes(UDP_BUFFER_BYTES) {
            // Linux reports twice what it grants (bookkeeping overhead included).
            Ok(granted) if granted < UDP_BUFFER_BYTES => tracing::info!(
                granted,
                wanted = UDP_BUFFER_BYTES,
                "udp receive buffer capped; raise net.core.rmem_max for bulk throughput"
            ),
            Ok(granted) => tracing::debug!(granted, "udp receive buffer"),
            Err(e) => tracing::debug!(error = %e, "could not size the udp buffers"),
        }
        let (commands, command_rx) = mpsc::channel(64);
        let counters = Arc::new(Counters::default());
        let notify = Arc::new(Notify::new());
        let public_key = config.private_key.public_key();
        let tunnel_ip = config.tunnel_ip;
        let connect_timeout = config.connect_timeout;
        let span = tracing::info_span!("wg", %tunnel_ip, udp = %local_addr);
        let driver = Driver::new(config, socket, counters.clone(), notify);
        tokio::spawn(driver.run(command_rx).instrument(span));
        Ok(Self {
            inner: Arc::new(Inner {
                commands,
                counters,
                public_key,
                tunnel_ip,
                local_addr,
                connect_timeout,
            }),
        })
    }

    /// This endpoint's public key (what peers configure).
    pub fn public_key(&self) -> PublicKey {
        self.inner.public_key
    }

    /// This endpoint's tunnel address.
    pub fn tunnel_ip(&self) -> IpAddr {
        self.inner.tunnel_ip
    }

    /// The UDP address the endpoint receives on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Live counters (drops by reason, traffic, connections).
    pub fn counters(&self) -> &Arc<Counters> {
        &self.inner.counters
    }

    /// Replaces the peer set. Peers whose configuration is unchanged keep their sessions and
    /// connections; removed peers' connections are reset. An invalid list changes nothing.
    pub async fn set_peers(&self, peers: Vec<PeerConfig>) -> Result<PeerDiff, WgError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::SetPeers(peers, tx)).await?;
        rx.await.map_err(|_| WgError::Closed)?
    }

    /// Removes the peers `remove` names and adds or reconfigures those in `upsert`, leaving
    /// every other peer alone: [`Endpoint::set_peers`] for one change among many peers, at the
    /// cost of the change. An invalid change changes nothing.
    pub async fn update_peers(
        &self,
        upsert: Vec<PeerConfig>,
        remove: Vec<PublicKey>,
    ) -> Result<PeerDiff, WgError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::UpdatePeers {
            upsert,
            remove,
            reply: tx,
        })
        .await?;
        rx.await.map_err(|_| WgError::Closed)?
    }

    /// Opens a TCP connection to `ip:port` through the tunnel of the peer owning `ip`, with the
    /// configured connect timeout.
    pub async fn connect(&self, ip: IpAddr, port: u16) -> Result<TunnelStream, WgError> {
        self.connect_timeout(ip, port, self.inner.connect_timeout)
            .await
    }

    /// [`Endpoint::connect`] with an explicit timeout (covers the WireGuard handshake too).
    pub async fn connect_timeout(
        &self,
        ip: IpAddr,
        port: u16,
        timeout: Duration,
    ) -> Result<TunnelStream, WgError> {
        let addr = SocketAddr::new(ip, port);
        let (tx, rx) = oneshot::channel();
        self.send(Command::Connect {
            remote: addr,
            reply: tx,
        })
        .await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(WgError::Closed),
            // Dropping `rx` tells the driver to abandon the half-open socket.
            Err(_) => Err(WgError::ConnectTimeout { addr, timeout }),
        }
    }

    /// Accepts TCP connections to `port` on this endpoint's tunnel address.
    pub async fn listen(&self, port: u16) -> Result<TunnelListener, WgError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Listen { port, reply: tx }).await?;
        rx.await.map_err(|_| WgError::Closed)?
    }

    /// Per-peer state: endpoint, last handshake, bytes.
    pub async fn peer_stats(&self) -> Result<Vec<PeerStats>, WgError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Stats(tx)).await?;
        rx.await.map_err(|_| WgError::Closed)
    }

    async fn send(&self, cmd: Command) -> Result<(), WgError> {
        self.inner
            .commands
            .send(cmd)
            .await
            .map_err(|_| WgError::Closed)
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("public_key", &self.inner.public_key)
            .field("tunnel_ip", &self.inner.tunnel_ip)
            .field("udp", &self.inner.local_addr)
            .finish()
    }
}
