//! `portcullis_certificate_*` and `portcullis_acme_*` metrics. Certificate labels come from the
//! replicated certificate table (bounded by what operators configure), never from clients.

use portcullis_raft::state::ClusterState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

pub struct AcmeMetrics {
    /// Unix seconds at which each stored certificate expires. Alert on
    /// `portcullis_certificate_not_after_seconds - time() < 14 * 86400`.
    pub not_after: Family<CertLabels, Gauge>,
    /// Orders finished by this node, by result (`issued`, `failed`).
    pub orders: Family<ResultLabels, Counter>,
    /// 1 while this node holds the orderer lease.
    pub lease_held: Gauge,
    /// The fencing token of the lease this node last held.
    pub lease_fencing: Gauge,
}

impl AcmeMetrics {
    pub fn register(r: &mut Registry) -> Self {
        let m = AcmeMetrics {
            not_after: Family::default(),
            orders: Family::default(),
            lease_held: Gauge::default(),
            lease_fencing: Gauge::default(),
        };
        r.register(
            "portcullis_certificate_not_after_seconds",
            "Unix time at which each stored certificate expires",
            m.not_after.clone(),
        );
        r.register(
            "portcullis_acme_orders",
            "ACME orders finished by this node, by result",
            m.orders.clone(),
        );
        r.register(
            "portcullis_acme_lease_held",
            "1 while this node holds the ACME orderer lease",
            m.lease_held.clone(),
        );
        r.register(
            "portcullis_acme_lease_fencing_token",
            "Fencing token of the orderer lease this node last held",
            m.lease_fencing.clone(),
        );
        m
    }

    /// Mirrors the certificate table into the expiry gauges (removed certificates disappear).
    pub fn sync_certificates(&self, state: &ClusterState) {
        self.not_after.clear();
        for c in state.certificates.values() {
            self.not_after
                .get_or_create(&CertLabels {
                    name: c.name.clone(),
                })
                .set(i64::try_from(c.not_after).unwrap_or(i64::MAX));
        }
    }
}
