//! portcullis-cluster-tests: multi-node tests against real `portcullis` processes, and the
//! drivers for benchmarks and chaos runs.
//!
//! Layout:
//! - [`backend`]: the HTTP/1.1 backend loop of the benchmark drivers.
//! - [`harness`]: start a local cluster, run CLI commands, kill/restart nodes, wait for conditions.
//! - [`cvm`]: CVM-side helpers (agent configurations, registrations) for the tunnel tests.
//! - [`chaos`]: the modules of the `portcullis-chaos` driver (docs/chaos.md), among them
//!   `chaos::wgl`, the per-key linearizability checker for recorded histories.
//! - [`edge_bench`]: the parts of the `edge-bench` driver (processes, peer configurations, load
//!   loops, outside tools, tables); its binary only parses arguments and runs the rounds.
//! - [`wggo`]: wireguard-go on TUN devices in network namespaces, and [`bulk`]: the checked
//!   bulk-transfer protocol of the tunnel soaks (both shared with the wg crate's tests).
//! - `tests/tNN_*.rs`: the cluster tests, one topic per file.
//! - `src/bin/`: benchmark drivers.

#![forbid(unsafe_code)]

pub mod backend;
#[path = "../../wg/tests/common/bulk.rs"]
#[allow(dead_code)]
pub mod bulk;
pub mod chaos;
pub mod cvm;
pub mod edge_bench;
pub mod harness;
#[path = "../../wg/tests/common/wggo.rs"]
#[allow(dead_code)]
pub mod wggo;
