//! portcullis-test-support: test helpers shared by the wg crate's tests and benchmark
//! (`wg/tests`, `wg/benches/tunnel.rs`) and the cluster tests and benchmark drivers
//! (`cluster-tests`). Not published; nothing here runs in production.
//!
//! Layout:
//! - [`wggo`]: wireguard-go on TUN devices in network namespaces, driven through the `ip`, `wg`
//!   and `wireguard-go` programs, torn down on drop.
//! - [`bulk`]: the checked bulk-transfer protocol of the tunnel soaks (a server on an
//!   `Endpoint` or in Python on kernel TCP, and the gateway-side client).
//!
//! Imports: `portcullis_wg` (its key and endpoint types), tokio, anyhow, tempfile.

#![forbid(unsafe_code)]

pub mod bulk;
pub mod wggo;
