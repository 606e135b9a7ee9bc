//! `portcullis-chaos`: build a cluster of real `portcullis` nodes in network namespaces, run a
//! concurrent register workload while injecting faults from a scenario file, and check the
//! history for linearizability, convergence and lost writes. See docs/chaos.md.

pub mod cluster;
pub mod link;
pub mod outage;
pub mod probe;
pub mod run;
pub mod samples;
pub mod scenario;
pub mod topology;
pub mod workload;
