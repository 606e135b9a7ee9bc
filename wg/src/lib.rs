//! `portcullis-wg`: user-space WireGuard for the gateway and for `portcullis cvm-agent`.
//!
//! An [`Endpoint`] runs WireGuard (boringtun's `noise::Tunn`, one per peer) over one UDP socket
//! the caller binds, and an in-process TCP/IP stack (smoltcp) on the endpoint's own tunnel
//! address. The gateway calls [`Endpoint::connect`] to open TCP streams to
//! `<cvm-tunnel-ip>:<port>`; a CVM agent calls [`Endpoint::listen`] and relays accepted streams
//! to local ports. No root, no TUN device, no kernel module.
//!
//! Isolation rules enforced on every decrypted packet (boringtun itself does not):
//! - the inner source address must be the sending peer's tunnel address (no spoofing);
//! - the inner destination must be this endpoint's address (nothing is forwarded between
//!   peers, so one CVM cannot reach another through a gateway);
//! - garbage, oversized datagrams and handshakes from unknown keys are dropped.
//!
//! Every drop is counted by reason in [`Counters`].
//!
//! Layout:
//! - [`endpoint`]: the [`Endpoint`] handle (commands to the driver task).
//! - `driver`: the single task that owns the socket, the peers and the stack.
//! - [`peers`]: the peer table and its diffing `set_peers`.
//! - `device`: the smoltcp virtual device (packet queues).
//! - `sockets`: the TCP sockets, each in its own smoltcp socket set (panic containment).
//! - `packet`: inner IP header parsing for the address rules.
//! - `stack_tests` (tests only): hand-made TCP segments and the stack's property test.
//! - [`stream`]: [`TunnelStream`] and [`TunnelListener`], the application side.
//! - [`socket`]: the [`DatagramSocket`] trait (injectable UDP).
//! - [`config`], [`key`], [`metrics`], [`error`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
mod device;
mod driver;
pub mod endpoint;
pub mod error;
pub mod key;
pub mod metrics;
mod packet;
pub mod peers;
pub mod socket;
mod sockets;
#[cfg(test)]
mod stack_tests;
pub mod stream;

pub use config::{EndpointConfig, PeerConfig};
pub use endpoint::Endpoint;
pub use error::WgError;
pub use key::{KeyError, PrivateKey, PublicKey};
pub use metrics::{Counters, CountersSnapshot};
pub use peers::{PeerDiff, PeerStats};
pub use socket::DatagramSocket;
pub use stream::{TunnelListener, TunnelStream};
