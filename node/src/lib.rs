//! portcullis-node: the `portcullis` binary — gateway node, operator CLI and local launcher.
//!
//! Layout — four wings (module folders, each with a front-door doc) over a few leaves:
//! - [`edge`]: the data plane — HTTPS/HTTP listeners, routing, TLS, proxying; custom domains
//!   (`edge/custom_domain.rs`) and their cached TXT lookups (`edge/dns.rs`).
//! - [`tunnel`]: the WireGuard mesh — the gateway side, CVM registration held to the tenant's
//!   own names, the CVM agent, the data plane's connector through the mesh.
//! - [`admin`]: the admin listener — gRPC API, `/healthz`, `/readyz`, `/metrics`, `.internal`.
//! - [`cli`]: the command line, the operator commands, `up`/`down` and the demo app.
//! - [`server`]: running one node (Raft, cluster RPC port, admin port, the wings, the region
//!   announced through Raft, shutdown).
//! - [`acme`]: certificates from ACME (HTTP-01, TLS-ALPN-01, DNS-01) and their renewal.
//! - [`config`]: the node's TOML configuration and its validation (`config/error.rs`: its error
//!   type, a leaf).
//! - [`metrics`]: every metric the node exports.
//! - [`pki`]: the cluster CA, node certificates and the admin token on disk; the development CA.
//! - [`secrets`]: the cluster data key that seals private keys in the replicated state.
//! - [`collisions`]: name clashes an older state still holds, reported.
//! - [`procs`]: process checks by pid (is a node, demo app or agent still running), a leaf
//!   shared by the CLI wing and the CVM agent's `--exit-with`.
//! - [`tls`]: TLS helpers for the launcher, the demo app, the admin API and ACME (the crypto
//!   provider, PEM parsing, what a certificate covers); a leaf.

#![forbid(unsafe_code)]

pub mod acme;
pub mod admin;
pub mod cli;
pub mod collisions;
pub mod config;
pub mod edge;
pub mod metrics;
pub mod pki;
pub mod procs;
pub mod secrets;
pub mod server;
pub mod tls;
pub mod tunnel;

/// Exit code for an invalid configuration (EX_USAGE from sysexits.h, as linkerd does).
pub const EXIT_CONFIG: i32 = 64;
