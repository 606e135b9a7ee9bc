//! Metrics owned by the raft crate. The node registers them in its Prometheus registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerErrorLabels {
    pub peer: u64,
    pub kind: &'static str,
}

/// Cheap to clone; every clone feeds the same series.
#[derive(Clone)]
pub struct RaftMetricsSink {
    rpc_errors: Family<PeerErrorLabels, Counter>,
    commit_latency: Histogram,
}

impl Default for RaftMetricsSink {
    fn default() -> Self {
        RaftMetricsSink {
            rpc_errors: Family::default(),
            // 100 µs .. ~3.3 s
            commit_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        }
    }
}

impl RaftMetricsSink {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "portcullis_raft_rpc_errors",
            "Raft RPCs to peers that failed, by peer and kind",
            self.rpc_errors.clone(),
        );
        registry.register(
            "portcullis_raft_commit_latency_seconds",
            "Time from proposing a write to its commit and apply",
            self.commit_latency.clone(),
        );
    }

    pub fn rpc_error(&self, peer: u64, kind: &'static str) {
        self.rpc_errors
            .get_or_create(&PeerErrorLabels { peer, kind })
            .inc();
    }

    pub fn commit_latency(&self, seconds: f64) {
        self.commit_latency.observe(seconds);
    }
}
