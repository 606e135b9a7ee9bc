//! Every Prometheus metric the node exports, declared in one place.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use portcullis_raft::metrics::RaftMetricsSink;
use portcullis_raft::types::RaftMetrics;

pub struct Metrics {
    registry: Registry,
    pub raft: RaftMetricsSink,
    term: Gauge,
    leader: Gauge,
    is_leader: Gauge,
    last_applied: Gauge,
    last_log_index: Gauge,
    members: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let raft = RaftMetricsSink::default();
        raft.register(&mut r);
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        Metrics {
            raft,
            term: gauge(&mut r, "portcullis_raft_term", "Current Raft term"),
            leader: gauge(&mut r, "portcullis_raft_leader_id", "Id of the known leader (0: none)"),
            is_leader: gauge(&mut r, "portcullis_raft_is_leader", "1 when this node leads"),
            last_applied: gauge(&mut r, "portcullis_raft_last_applied", "Index of the last applied log entry"),
            last_log_index: gauge(&mut r, "portcullis_raft_last_log_index", "Index of the last log entry"),
            members: gauge(&mut r, "portcullis_raft_members", "Members (voters and learners) in the current config"),
            registry: r,
        }
    }

    /// Refreshes the Raft gauges from openraft's metrics and renders the text format.
    pub fn render(&self, m: &RaftMetrics) -> Result<String, std::fmt::Error> {
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.term.set(as_i64(m.current_term));
        self.leader.set(as_i64(m.current_leader.unwrap_or(0)));
        self.is_leader.set(i64::from(m.current_leader == Some(m.id)));
        self.last_applied.set(as_i64(m.last_applied.map(|l| l.index).unwrap_or(0)));
        self.last_log_index.set(as_i64(m.last_log_index.unwrap_or(0)));
        self.members.set(as_i64(m.membership_config.membership().nodes().count() as u64));
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
