//! Replicated-state records as the admin API's protobuf messages.

use portcullis_proto::admin as pb;
use portcullis_raft::state::{App, Certificate, Instance};

pub(super) fn app_pb(a: &App, instances: Vec<pb::Instance>) -> pb::App {
    pb::App {
        name: a.name.clone(),
        ports: a.ports.iter().map(|p| u32::from(*p)).collect(),
        lb: a.lb.clone(),
        revision: a.revision,
        instances,
    }
}

/// An instance as the API shows it; `weights` is the state's weight table.
pub fn instance_pb(
    i: &Instance,
    weights: &std::collections::BTreeMap<String, u32>,
) -> pb::Instance {
    pb::Instance {
        weight: weights.get(&i.instance_id).copied().unwrap_or(1),
        instance_id: i.instance_id.clone(),
        app: i.app.clone(),
        region: i.region.clone(),
        tunnel_ip: i.tunnel_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        wg_public_key: i.wg_public_key.clone(),
        backend_addr: i.backend_addr.clone().unwrap_or_default(),
    }
}

pub(super) fn cert_pb(c: &Certificate) -> pb::CertificateInfo {
    pb::CertificateInfo {
        name: c.name.clone(),
        names: c.names.clone(),
        not_after: c.not_after,
        issuer: c.issuer.clone(),
        key_encryption: c.key_encryption.clone(),
    }
}

pub(super) fn domain_pb(d: &portcullis_raft::state::Domain) -> pb::Domain {
    pb::Domain {
        name: d.name.clone(),
        app: d.app.clone(),
        port: u32::from(d.port),
        token: d.token.clone(),
        verified: d.verified,
        passthrough: d.passthrough,
    }
}
