//! portcullis-cluster-tests: multi-node tests against real `portcullis` processes, and the
//! drivers for benchmarks and chaos runs.
//!
//! Layout:
//! - [`harness`]: start a local cluster, run CLI commands, kill/restart nodes, wait for conditions.
//! - [`cvm`]: CVM-side helpers (agent configurations, registrations, wireguard-go CVMs) for the
//!   tunnel tests.
//! - [`backend`]: the HTTP/1.1 backend loop of the benchmark drivers.
//! - [`edge_bench`]: the parts of the `edge-bench` driver (processes, peer configurations, load
//!   loops, outside tools, tables); its binary only parses arguments and runs the rounds.
//! - [`chaos`]: the modules of the `portcullis-chaos` driver (docs/chaos.md), among them
//!   `chaos::wgl`, the per-key linearizability checker for recorded histories.
//! - `tests/tNN_*.rs`: the cluster tests, one topic per file.
//! - `src/bin/`: the drivers: `edge-bench`, `tunnel-bench`, `raft-bench` (benchmarks) and
//!   `portcullis-chaos`.
//!
//! wireguard-go in network namespaces and the checked bulk-transfer protocol come from the
//! portcullis-test-support crate (`test-support/`), shared with the wg crate's tests.

#![forbid(unsafe_code)]

pub mod backend;
pub mod chaos;
pub mod cvm;
pub mod edge_bench;
pub mod harness;
