//! Errors of the user-space WireGuard endpoint.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::key::{KeyError, PublicKey};

/// Everything the endpoint can refuse or fail at. Messages carry the offending value.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    /// A key that does not decode.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The endpoint's own tunnel address is unusable.
    #[error("invalid tunnel address {0}: must be a unicast address")]
    InvalidTunnelIp(IpAddr),
    /// The MTU is out of range for the tunnel's address family.
    #[error("invalid tunnel MTU {mtu}: must be between {min} and {max} bytes")]
    InvalidMtu {
        /// The configured MTU.
        mtu: usize,
        /// Smallest accepted value (1280 for IPv6, 576 for IPv4).
        min: usize,
        /// Largest accepted value.
        max: usize,
    },
    /// A configuration value that must be positive is zero.
    #[error("invalid endpoint setting {name} = {value}: {reason}")]
    InvalidSetting {
        /// Setting name.
        name: &'static str,
        /// The rejected value, formatted.
        value: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// The same public key appears twice in one peer list.
    #[error("peer {0} appears more than once in the peer list")]
    DuplicatePeer(PublicKey),
    /// Two peers claim the same tunnel address.
    #[error("tunnel address {ip} is given to both peer {first} and peer {second}")]
    DuplicatePeerIp {
        /// The contested address.
        ip: IpAddr,
        /// One claimant.
        first: PublicKey,
        /// The other claimant.
        second: PublicKey,
    },
    /// A peer was configured with this endpoint's own key or address.
    #[error("peer {key} conflicts with this endpoint ({what})")]
    PeerIsSelf {
        /// The peer's key.
        key: PublicKey,
        /// "same public key" or "same tunnel address".
        what: &'static str,
    },
    /// A peer's tunnel address is not unicast.
    #[error("peer {key} has an invalid tunnel address {ip}")]
    InvalidPeerIp {
        /// The peer's key.
        key: PublicKey,
        /// The rejected address.
        ip: IpAddr,
    },
    /// Too many peers for the 24-bit session index space.
    #[error("too many peers: {0} (at most 16777215)")]
    TooManyPeers(usize),
    /// No peer owns the destination address, so there is nowhere to send.
    #[error("no peer has tunnel address {0}")]
    NoRoute(IpAddr),
    /// The destination is this endpoint itself.
    #[error("{0} is this endpoint's own tunnel address")]
    ConnectToSelf(IpAddr),
    /// Destination port 0.
    #[error("invalid tunnel port {0}")]
    InvalidPort(u16),
    /// The TCP handshake did not complete in time (no session, peer down, nothing listening and
    /// no RST coming back).
    #[error("connecting to {addr} over the tunnel timed out after {timeout:?}")]
    ConnectTimeout {
        /// Destination.
        addr: SocketAddr,
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// The peer answered the SYN with a RST.
    #[error("connection to {0} over the tunnel was refused")]
    ConnectRefused(SocketAddr),
    /// The connection table is full.
    #[error("too many tunnel connections ({0}); refusing a new one")]
    TooManyConnections(usize),
    /// Every local port toward this destination is in use.
    #[error("no free local port for a connection to {0}")]
    NoFreePort(SocketAddr),
    /// Someone is already listening on this tunnel port.
    #[error("tunnel port {0} already has a listener")]
    PortInUse(u16),
    /// The endpoint's driver task has stopped (all handles dropped or it panicked).
    #[error("the WireGuard endpoint has shut down")]
    Closed,
    /// The UDP socket could not be inspected.
    #[error("WireGuard UDP socket: {0}")]
    Socket(#[source] io::Error),
}
