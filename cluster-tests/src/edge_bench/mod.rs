//! The parts of `edge-bench` (src/bin/edge-bench.rs; docs/benchmarks.md): Portcullis beside
//! nginx and HAProxy, each terminating TLS and proxying to the same backend, all driven by the
//! same client. The binary parses the arguments and runs the rounds; everything it starts,
//! drives and prints is here.
//!
//! Imports: std, the async and HTTP stack (tokio, hyper, rustls, quinn and h3), hdrhistogram,
//! nix (process groups), `portcullis_node` (loopback ports, the cluster file) and
//! [`crate::backend`]; nothing of the harness or the chaos driver. tunnel-bench and raft-bench
//! use [`stats`]' latency histogram too.
//!
//! Layout, in the order a run uses it:
//! - [`target`]: what is measured: targets, modes, the dev PKI, the shared constants.
//! - [`setup`]: starts the backend, a 1-node Portcullis cluster and the peers, finds the tools;
//!   stops everything on drop.
//! - [`processes`]: child processes (own process groups, stopped on drop), the cluster guard,
//!   short commands, loopback ports, a process tree's CPU time.
//! - [`peers`]: nginx's and HAProxy's configuration text.
//! - [`backend`]: the fixed-response backend (the binary's hidden `backend` subcommand).
//! - [`load`]: the client, the load loop of each mode, one measurement.
//! - [`tools`]: outside programs: finding them; wrk and h2load runs read into the same samples.
//! - [`stats`]: the samples of one measurement; the latency histogram and percentiles.
//! - [`report`]: the tables, per target and mode and paired by round.

pub mod backend;
pub mod load;
pub mod peers;
pub mod processes;
pub mod report;
pub mod setup;
pub mod stats;
pub mod target;
pub mod tools;
