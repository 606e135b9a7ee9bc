//! The CLI wing: everything `portcullis` does besides running a node.
//!
//! What it owns:
//! - [`args`]: the command line's shape (clap types) — every command, subcommand and flag.
//! - The operator commands, one file per group, each a thin client of the admin API:
//!   [`cluster`], [`app`], [`cert`], [`domain`], [`cvm`], [`secrets`], [`waf`]; [`output`]: what they
//!   print (`--json`, a contract, or a table) and gRPC failures as operator messages.
//! - [`client`]: finding the cluster (`--admin`, `--cluster`) and connecting to its admin API.
//! - [`launcher`]: `up` and `down`, a local multi-node cluster with demo apps;
//!   [`ports`]: loopback ports for it, outside the ephemeral range; [`spawn`]: starting its
//!   processes with their output in log files.
//! - [`demo`]: `portcullis demo-app`, the demo and test backend; [`demo_agent`]: the
//!   cvm-agents `up` starts in front of it.
//!
//! What it may import: the proto crate (admin API client), [`crate::config`] and
//! [`crate::pki`] (the launcher writes configurations and certificates), the tunnel wing's
//! agent arguments, `portcullis_raft`'s WAF policy type (`waf` edits it as JSON), and the leaves ([`crate::tls`]-style helpers, [`crate::procs`]). Nothing
//! below `main.rs` imports this wing except tests and the benchmark drivers.

pub mod app;
pub mod args;
pub mod cert;
pub mod client;
pub mod cluster;
pub mod cvm;
pub mod demo;
pub mod demo_agent;
pub mod domain;
pub mod launcher;
pub mod output;
pub mod ports;
pub mod secrets;
pub mod spawn;
pub mod waf;

pub use args::{Cli, Cmd, Global};
