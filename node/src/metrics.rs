//! Every Prometheus metric the node exports, declared in one place.

use std::sync::Arc;

use portcullis_raft::metrics::RaftMetricsSink;
use portcullis_raft::types::RaftMetrics;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub struct Metrics {
    registry: Registry,
    pub raft: RaftMetricsSink,
    pub edge: Arc<EdgeMetrics>,
    pub acme: Arc<crate::acme::AcmeMetrics>,
    /// TXT lookups and the custom-domain check (`edge/dns.rs`).
    pub dns: Arc<crate::edge::dns::DnsMetrics>,
    /// The web application firewall (`edge/protect/waf`).
    pub waf: Arc<crate::edge::protect::waf::WafMetrics>,
    term: Gauge,
    leader: Gauge,
    is_leader: Gauge,
    last_applied: Gauge,
    last_log_index: Gauge,
    members: Gauge,
    /// The gateway's WireGuard counters, attached once the endpoint runs (issue 4).
    wg_counters: std::sync::OnceLock<Arc<portcullis_wg::Counters>>,
    wg_events: Family<WgEventLabels, Counter>,
    /// CVM registrations removed because they were not renewed (`wg.expire_after_secs`).
    pub cvm_expired: Counter,
    /// Instance ids that clash with an app route or another id in the applied state
    /// (`collisions.rs`).
    pub name_collisions: Gauge,
    /// Requests the admin listener answered (gRPC and HTTP).
    pub admin_requests: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WgEventLabels {
    pub event: &'static str,
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let raft = RaftMetricsSink::default();
        raft.register(&mut r);
        let edge = Arc::new(EdgeMetrics::register(&mut r));
        let acme = Arc::new(crate::acme::AcmeMetrics::register(&mut r));
        let dns = Arc::new(crate::edge::dns::DnsMetrics::register(&mut r));
        let waf = Arc::new(crate::edge::protect::waf::WafMetrics::register(&mut r));
        let wg_events = Family::<WgEventLabels, Counter>::default();
        r.register(
            "portcullis_wg_events",
            "WireGuard endpoint events by kind (drops by reason, traffic, handshakes; docs/wireguard.md)",
            wg_events.clone(),
        );
        let cvm_expired = Counter::default();
        r.register(
            "portcullis_cvm_expired",
            "CVM registrations this node expired as leader (not renewed within wg.expire_after_secs)",
            cvm_expired.clone(),
        );
        let name_collisions = Gauge::default();
        r.register(
            "portcullis_name_collisions",
            "Instance ids in the applied state that clash with an app route or another id (cluster status lists them)",
            name_collisions.clone(),
        );
        let admin_requests = Counter::default();
        r.register(
            "portcullis_admin_requests",
            "Requests the admin listener answered (gRPC, /healthz, /readyz, /metrics, .internal)",
            admin_requests.clone(),
        );
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        Metrics {
            raft,
            edge,
            acme,
            dns,
            waf,
            term: gauge(&mut r, "portcullis_raft_term", "Current Raft term"),
            leader: gauge(
                &mut r,
                "portcullis_raft_leader_id",
                "Id of the known leader (0: none)",
            ),
            is_leader: gauge(
                &mut r,
                "portcullis_raft_is_leader",
                "1 when this node leads",
            ),
            last_applied: gauge(
                &mut r,
                "portcullis_raft_last_applied",
                "Index of the last applied log entry",
            ),
            last_log_index: gauge(
                &mut r,
                "portcullis_raft_last_log_index",
                "Index of the last log entry",
            ),
            members: gauge(
                &mut r,
                "portcullis_raft_members",
                "Members (voters and learners) in the current config",
            ),
            wg_counters: std::sync::OnceLock::new(),
            wg_events,
            cvm_expired,
            name_collisions,
            admin_requests,
            registry: r,
        }
    }

    /// Exports this endpoint's counters from now on (first call wins).
    pub fn attach_wg(&self, counters: Arc<portcullis_wg::Counters>) {
        let _ = self.wg_counters.set(counters);
    }

    /// Copies the WireGuard counters into the exported ones (they only grow).
    fn sync_wg(&self) {
        let Some(c) = self.wg_counters.get() else {
            return;
        };
        let s = c.snapshot();
        for (event, value) in [
            ("rx_datagrams", s.rx_datagrams),
            ("rx_bytes", s.rx_bytes),
            ("tx_datagrams", s.tx_datagrams),
            ("tx_bytes", s.tx_bytes),
            ("oversized_datagrams", s.oversized_datagrams),
            ("invalid_datagrams", s.invalid_datagrams),
            ("unknown_peer_handshakes", s.unknown_peer_handshakes),
            ("unknown_session_index", s.unknown_session_index),
            ("decapsulate_errors", s.decapsulate_errors),
            ("cookie_replies_sent", s.cookie_replies_sent),
            ("spoofed_source", s.spoofed_source),
            ("not_for_us", s.not_for_us),
            ("malformed_inner", s.malformed_inner),
            ("inner_packets_in", s.inner_packets_in),
            ("inner_packets_out", s.inner_packets_out),
            ("no_route", s.no_route),
            ("no_endpoint", s.no_endpoint),
            ("socket_errors", s.socket_errors),
            ("handshakes_completed", s.handshakes_completed),
            ("connects_ok", s.connects_ok),
            ("connects_failed", s.connects_failed),
            ("accepted", s.accepted),
            ("accept_overflow", s.accept_overflow),
            ("stack_panics", s.stack_panics),
        ] {
            let counter = self.wg_events.get_or_create(&WgEventLabels { event });
            let current = counter.get();
            if value > current {
                counter.inc_by(value - current);
            }
        }
    }

    /// Refreshes the Raft gauges from openraft's metrics and renders the text format.
    pub fn render(&self, m: &RaftMetrics) -> Result<String, std::fmt::Error> {
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.term.set(as_i64(m.current_term));
        self.leader.set(as_i64(m.current_leader.unwrap_or(0)));
        self.is_leader
            .set(i64::from(m.current_leader == Some(m.id)));
        self.last_applied
            .set(as_i64(m.last_applied.map(|l| l.index).unwrap_or(0)));
        self.last_log_index
            .set(as_i64(m.last_log_index.unwrap_or(0)));
        self.members.set(as_i64(
            m.membership_config.membership().nodes().count() as u64
        ));
        self.sync_wg();
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The routed app, or `-` when the request matched no app.
    pub app: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabels {
    pub app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    pub instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    /// `http/1.1`, `h2` or `h3`.
    pub protocol: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The data plane's metrics (`portcullis_edge_*`). Labels are bounded: apps come from the
/// replicated state, never from client-supplied host names.
pub struct EdgeMetrics {
    pub requests: Family<RequestLabels, Counter>,
    /// The same requests by client protocol (a separate family so `requests` keeps its labels).
    pub requests_by_protocol: Family<ProtocolLabels, Counter>,
    /// Seconds from request received to response headers sent.
    pub request_duration: HistogramFamily<AppLabels>,
    pub open_connections: Family<ListenerLabels, Gauge>,
    pub connections: Family<ListenerLabels, Counter>,
    pub tls_handshake_failures: Family<ReasonLabels, Counter>,
    pub limit_rejections: Family<ReasonLabels, Counter>,
    pub passthrough_connections: Family<AppLabels, Counter>,
    pub route_table_rebuilds: Counter,
    pub route_table_apply_index: Gauge,
    /// 1 while this node considers the instance healthy, 0 while it is out of rotation.
    pub backend_healthy: Family<InstanceLabels, Gauge>,
    /// Health probes that failed, by instance.
    pub health_probe_failures: Family<InstanceLabels, Counter>,
}

impl EdgeMetrics {
    pub fn register(r: &mut Registry) -> Self {
        let m = EdgeMetrics {
            requests: Family::default(),
            requests_by_protocol: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            open_connections: Family::default(),
            connections: Family::default(),
            tls_handshake_failures: Family::default(),
            limit_rejections: Family::default(),
            passthrough_connections: Family::default(),
            route_table_rebuilds: Counter::default(),
            route_table_apply_index: Gauge::default(),
            backend_healthy: Family::default(),
            health_probe_failures: Family::default(),
        };
        let e = r.sub_registry_with_prefix("portcullis_edge");
        e.register(
            "requests",
            "Proxied HTTP requests by app and status",
            m.requests.clone(),
        );
        e.register(
            "requests_by_protocol",
            "Proxied HTTP requests by client protocol (http/1.1, h2, h3)",
            m.requests_by_protocol.clone(),
        );
        e.register(
            "request_duration_seconds",
            "Time to response headers, by app",
            m.request_duration.clone(),
        );
        e.register(
            "open_connections",
            "Open client connections by listener",
            m.open_connections.clone(),
        );
        e.register(
            "connections",
            "Accepted client connections by listener",
            m.connections.clone(),
        );
        e.register(
            "tls_handshake_failures",
            "Failed TLS handshakes by reason",
            m.tls_handshake_failures.clone(),
        );
        e.register(
            "limit_rejections",
            "Connections or requests refused by a limit, by reason",
            m.limit_rejections.clone(),
        );
        e.register(
            "passthrough_connections",
            "TLS passthrough connections by app",
            m.passthrough_connections.clone(),
        );
        e.register(
            "route_table_rebuilds",
            "Routing table and certificate rebuilds",
            m.route_table_rebuilds.clone(),
        );
        e.register(
            "route_table_applied_index",
            "Raft log index the routing table was built from",
            m.route_table_apply_index.clone(),
        );
        e.register(
            "backend_healthy",
            "1 while this node keeps the instance in rotation, 0 while it is ejected",
            m.backend_healthy.clone(),
        );
        e.register(
            "health_probe_failures",
            "Failed active health probes by instance",
            m.health_probe_failures.clone(),
        );
        m
    }

    pub fn limit(&self, reason: &'static str) {
        self.limit_rejections
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn handshake_failure(&self, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        Self::register(&mut Registry::default())
    }
}
