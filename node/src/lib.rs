//! portcullis-node: the `portcullis` binary — gateway node, operator CLI and local launcher.
//!
//! Layout:
//! - [`config`]: the node's TOML configuration and its validation (`config/error.rs`: its error
//!   type, a leaf).
//! - [`server`]: running one node (Raft, cluster RPC port, admin port, the data plane and its
//!   region announced through Raft, shutdown).
//! - [`admin`]: the admin gRPC API and `/healthz`, `/readyz`, `/metrics`.
//! - [`metrics`]: every metric the node exports.
//! - [`cli`]: argument definitions and the operator commands.
//! - [`client`]: finding the cluster (`--admin`, `--cluster`) and calling its admin API.
//! - [`launcher`]: `up` and `down`, a local multi-node cluster.
//! - [`ports`]: loopback ports for local clusters, outside the ephemeral range.
//! - [`procs`]: process checks by pid (is a node, demo app or agent still running).
//! - [`pki`]: the cluster CA, node certificates and the admin token on disk; the development CA.
//! - [`edge`]: the data plane — HTTPS/HTTP listeners, routing, TLS, proxying; custom domains
//!   (`edge/custom_domain.rs`) and their cached TXT lookups (`edge/dns.rs`).
//! - [`demo`]: `portcullis demo-app`, a small HTTP service used as a demo and test backend;
//!   [`demo_bytes`]: its checkable bulk downloads and uploads.
//! - [`tls`]: TLS helpers for the launcher, the demo app, the admin API and ACME (the crypto
//!   provider, PEM parsing, what a certificate covers); a leaf.
//! - [`secrets`]: the cluster data key that seals private keys in the replicated state.
//! - [`tunnel`]: the WireGuard mesh — the gateway side, CVM registration held to the tenant's
//!   own names, the CVM agent, the data plane's connector through the mesh.
//! - [`collisions`]: name clashes an older state still holds, reported.

#![forbid(unsafe_code)]

pub mod acme;
pub mod admin;
pub mod cli;
pub mod client;
pub mod collisions;
pub mod config;
pub mod demo;
pub mod demo_bytes;
pub mod edge;
pub mod launcher;
pub mod metrics;
pub mod pki;
pub mod ports;
pub mod procs;
pub mod secrets;
pub mod server;
pub mod tls;
pub mod tunnel;

/// Exit code for an invalid configuration (EX_USAGE from sysexits.h, as linkerd does).
pub const EXIT_CONFIG: i32 = 64;
