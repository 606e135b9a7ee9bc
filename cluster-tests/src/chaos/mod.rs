//! `portcullis-chaos`: build a cluster of real `portcullis` nodes in network namespaces, run a
//! concurrent register workload while injecting faults from a scenario file, and check the
//! history for linearizability, convergence and lost writes. See docs/chaos.md.
//!
//! Layout:
//! - [`scenario`]: scenario files (cluster, clients, faults), checked before anything starts.
//! - [`topology`]: network namespaces, veth links, the bridge and nftables partitions.
//! - [`link`]: the user-space WAN between gateway namespaces (delay, jitter, loss).
//! - [`cluster`]: the node processes and admin API clients to reach them.
//! - [`workload`]: the concurrent register clients, recording the history.
//! - [`wgl`]: the per-key linearizability checker for that history.
//! - [`probe`], [`samples`], [`outage`]: the data-plane probe, its per-request results, and the
//!   majority-side check drawn from them.
//! - [`run`]: one run from start to report, tying the above together.

pub mod cluster;
pub mod link;
pub mod outage;
pub mod probe;
pub mod run;
pub mod samples;
pub mod scenario;
pub mod topology;
pub mod wgl;
pub mod workload;
