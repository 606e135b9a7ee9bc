//! CVM registration on the cluster RPC port (`CvmRegistry` in proto/cluster.proto).
//!
//! A CVM proves itself twice: with its TLS client certificate (a CVM credential from the
//! cluster CA naming its app, checked by the TLS layer and here), and with attestation evidence
//! checked by an [`Attestation`] hook. It then gets its tunnel address, allocated through Raft
//! (sticky per instance id), and every gateway's WireGuard key and endpoint.
//!
//! Every tenant is hostile to every other, so a credential acts only inside its own app's
//! names: a registration is proposed as `RegisterInstanceV3` with the tenant policy (the id
//! must be `<app>-…`, a registered id keeps its WireGuard key, the app's instance cap), checked
//! first against this node's applied state so a refusal is answered before anything is
//! written, and held to a per-app rate ([`super::quota`]). See docs/security.md.

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;

use portcullis_proto::cluster::cvm_registry_server::{CvmRegistry, CvmRegistryServer};
use portcullis_proto::cluster::{GatewayPeer, RegisterCvmReply, RegisterCvmRequest};
use portcullis_raft::state::{
    Instance, Registration, RegistrationPolicy, StaleInstance, MAX_EXPIRE_BATCH,
};
use portcullis_raft::store::SharedState;
use portcullis_raft::tls::{peer_role, PeerRole};
use portcullis_raft::{Cluster, ClusterError, Command, Response};
use portcullis_wg::PublicKey;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Status};

use super::addr::gateway_tunnel_ip_for;
use super::gateway::{gateway_peers, unix_now};
use super::quota::RegistrationQuota;

/// Largest registration message: a few names, a key, and attestation evidence (a TDX quote is
/// about 5 KiB). Anything larger is refused before it is decoded.
pub const MAX_REGISTRATION_BYTES: usize = 16 * 1024;

/// What a CVM claims when it registers, for the attestation hook.
#[derive(Debug)]
pub struct Claim<'a> {
    pub app: &'a str,
    pub instance_id: &'a str,
    pub wg_public_key: &'a PublicKey,
    /// Evidence as sent by the CVM (empty when it sends none).
    pub evidence: &'a [u8],
}

/// Where TDX / RA-TLS verification plugs in: it must bind the evidence to the claimed WireGuard
/// key (e.g. the key's hash in the quote's report data), so a stolen credential alone cannot
/// register a key the attested CVM does not hold.
pub trait Attestation: Send + Sync + 'static {
    /// `Err(reason)` refuses the registration.
    fn verify(&self, claim: &Claim<'_>) -> Result<(), String>;
}

/// Accepts every CVM that holds a valid credential. The only implementation today: the
/// credential is the whole proof until TDX verification lands.
#[derive(Debug, Default, Clone)]
pub struct NoAttestation;

impl Attestation for NoAttestation {
    fn verify(&self, _claim: &Claim<'_>) -> Result<(), String> {
        Ok(())
    }
}

pub struct Registry {
    cluster: Cluster,
    shared: SharedState,
    attestation: Arc<dyn Attestation>,
    /// A renewal whose stored stamp is younger than this is answered from the applied state
    /// without a Raft write; see [`refresh_after`].
    refresh_after_secs: u64,
    /// Most instances per app (`wg.max_instances_per_app`; 0: no limit).
    max_instances_per_app: u32,
    quota: RegistrationQuota,
}

/// The registry's settings from `[wg]`.
#[derive(Debug, Clone, Copy)]
pub struct RegistryLimits {
    pub expire_after_secs: u64,
    pub max_instances_per_app: u32,
    pub registration_rate_per_app: f64,
    pub registration_burst_per_app: u32,
}

impl RegistryLimits {
    pub fn from_config(wg: &crate::config::WgConfig) -> Self {
        RegistryLimits {
            expire_after_secs: wg.expire_after_secs,
            max_instances_per_app: wg.max_instances_per_app,
            registration_rate_per_app: wg.registration_rate_per_app,
            registration_burst_per_app: wg.registration_burst_per_app,
        }
    }
}

/// How old a registration's stamp may get before a renewal writes a new one.
///
/// Every agent renews every `reregister_secs` (30 s by default); written through Raft each
/// time, 65,000 CVMs would be over 2,000 writes a second, each rebuilding every node's routing
/// table. The stamp exists for expiry only, so it is refreshed once a quarter of the expiry
/// window has passed, and at least every 5 minutes (so a leader configured with a shorter
/// `wg.expire_after_secs` than this node still sees fresh stamps). 65,000 CVMs then cost at
/// most ~220 writes a second.
pub fn refresh_after(expire_after_secs: u64) -> u64 {
    const MAX_SECS: u64 = 300;
    match expire_after_secs {
        0 => MAX_SECS,
        e => (e / 4).min(MAX_SECS),
    }
}

/// The tonic service, ready to add next to the Raft service.
pub fn service(
    cluster: Cluster,
    shared: SharedState,
    attestation: Arc<dyn Attestation>,
    limits: RegistryLimits,
) -> CvmRegistryServer<Registry> {
    CvmRegistryServer::new(Registry {
        cluster,
        shared,
        attestation,
        refresh_after_secs: refresh_after(limits.expire_after_secs),
        max_instances_per_app: limits.max_instances_per_app,
        quota: RegistrationQuota::new(
            limits.registration_rate_per_app,
            limits.registration_burst_per_app,
        ),
    })
    .max_decoding_message_size(MAX_REGISTRATION_BYTES)
}

/// The gateway list as a CVM with an address of this family (`ipv6`) needs it: each gateway's
/// tunnel address is the one of the CVM's family.
pub fn gateway_list(shared: &SharedState, ipv6: bool) -> Vec<GatewayPeer> {
    gateway_peers(shared)
        .into_iter()
        .filter_map(|n| {
            Some(GatewayPeer {
                node_id: n.id,
                region: n.region,
                wg_public_key: n.wg_public_key,
                wg_endpoint: n.wg_endpoint,
                tunnel_ip: gateway_tunnel_ip_for(n.id, ipv6)?.to_string(),
                rpc_addr: n.rpc_addr,
            })
        })
        .collect()
}

fn rejected(m: String) -> Status {
    if m.contains("belongs to app")
        || m.contains("another WireGuard key")
        || m.contains("must start with its app's name")
        || m.contains("is inside app")
    {
        Status::permission_denied(m)
    } else if m.contains("its limit (wg.max_instances_per_app") {
        Status::resource_exhausted(m)
    } else if m.contains("already registered") {
        Status::already_exists(m)
    } else {
        Status::failed_precondition(m)
    }
}

impl Registry {
    /// The tunnel address of a renewal that would change nothing but a stamp that is still
    /// fresh (same app, region and key, registered through this registry, stamped less than
    /// `refresh_after_secs` ago), read from this node's applied state.
    fn fresh(&self, new: &Instance) -> Option<std::net::IpAddr> {
        let view = self.shared.read();
        let old = view.state.instances.get(&new.instance_id)?;
        let same = old.app == new.app
            && old.region == new.region
            && old.wg_public_key == new.wg_public_key
            && old.backend_addr.is_none();
        let age = new.registered_at.saturating_sub(old.registered_at);
        (same && age < self.refresh_after_secs)
            .then_some(old.tunnel_ip)
            .flatten()
    }
}

#[tonic::async_trait]
impl CvmRegistry for Registry {
    async fn register(
        &self,
        req: Request<RegisterCvmRequest>,
    ) -> Result<tonic::Response<RegisterCvmReply>, Status> {
        let role = req
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| peer_role(c.as_ref())))
            .unwrap_or(PeerRole::Unknown);
        let r = req.into_inner();
        match role {
            PeerRole::Cvm(app) if app == r.app => {}
            PeerRole::Cvm(app) => {
                return Err(Status::permission_denied(format!(
                    "this credential is for app {app:?}, not {:?}",
                    r.app
                )))
            }
            other => {
                return Err(Status::permission_denied(format!(
                    "registration needs a CVM credential (portcullis cvm credential); the client presented {other:?}"
                )))
            }
        }
        let key: PublicKey = r
            .wg_public_key
            .parse()
            .map_err(|e| Status::invalid_argument(format!("{e}")))?;
        let claim = Claim {
            app: &r.app,
            instance_id: &r.instance_id,
            wg_public_key: &key,
            evidence: &r.attestation,
        };
        self.attestation
            .verify(&claim)
            .map_err(|why| Status::permission_denied(format!("attestation refused: {why}")))?;
        let inst = Instance {
            instance_id: r.instance_id.clone(),
            app: r.app.clone(),
            region: r.region.clone(),
            // Canonical form, so uniqueness is checked on the key, not its spelling.
            wg_public_key: key.to_base64(),
            tunnel_ip: None,
            backend_addr: None,
            registered_at: unix_now(),
        };
        if let Some(ip) = self.fresh(&inst) {
            tracing::debug!(instance = %inst.instance_id, tunnel_ip = %ip, "cvm renewal: stamp still fresh");
            return Ok(tonic::Response::new(RegisterCvmReply {
                tunnel_ip: ip.to_string(),
                gateways: gateway_list(&self.shared, ip.is_ipv6()),
            }));
        }
        let registration = Registration {
            instance: inst,
            policy: RegistrationPolicy {
                require_app_prefix: true,
                allow_rekey: false,
                max_instances_per_app: self.max_instances_per_app,
            },
        };
        let cmd = Command::RegisterInstanceV3(registration);
        cmd.validate()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Command::RegisterInstanceV3(r) = &cmd {
            // Refused by the state as this node has applied it: answer without a write. The
            // leader checks again in `apply`, against the state at the entry's index.
            self.shared.read().state.check_registration(r).map_err(|m| {
                tracing::info!(app = %r.instance.app, instance = %r.instance.instance_id, reason = %m, "cvm registration refused");
                rejected(m)
            })?;
        }
        if let Err(wait) = self.quota.take(&r.app, std::time::Instant::now()) {
            return Err(Status::resource_exhausted(format!(
                "app {:?} is registering faster than wg.registration_rate_per_app allows on this node; retry in {} ms",
                r.app,
                wait.as_millis().max(1)
            )));
        }
        let response = match self.cluster.write(cmd).await {
            Ok((_, resp)) => resp,
            Err(ClusterError::Invalid(m)) => return Err(Status::invalid_argument(m)),
            Err(ClusterError::Rejected(m)) => return Err(rejected(m)),
            Err(e) => return Err(Status::unavailable(e.to_string())),
        };
        let inst = match response {
            Response::InstanceV2(i) => i,
            Response::Rejected(m) => return Err(rejected(m)),
            other => return Err(Status::internal(format!("unexpected answer {other:?}"))),
        };
        let Some(ip) = inst.tunnel_ip else {
            return Err(Status::internal("no tunnel address was allocated"));
        };
        tracing::info!(instance = %inst.instance_id, app = %inst.app, tunnel_ip = %ip, "cvm registered");
        Ok(tonic::Response::new(RegisterCvmReply {
            tunnel_ip: ip.to_string(),
            gateways: gateway_list(&self.shared, ip.is_ipv6()),
        }))
    }
}

/// Expires CVM registrations that were not renewed within `expire_after` (`wg.expire_after_secs`).
///
/// Every node runs this; only the leader acts, so one node decides. After becoming leader it
/// waits a grace period first: while the cluster had no leader nobody could renew, and the
/// agents need one re-registration interval to catch up before their stamps mean anything.
pub fn spawn_expiry(
    expire_after: Duration,
    cluster: Cluster,
    shared: SharedState,
    metrics: Arc<crate::metrics::Metrics>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) {
    if expire_after.is_zero() {
        return;
    }
    let tick = (expire_after / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let grace = expire_after.min(EXPIRY_GRACE);
    tracker.spawn(async move {
        let mut leader_since: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            if cluster.metrics().state != ServerState::Leader {
                leader_since = None;
                continue;
            }
            let since = *leader_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() < grace {
                continue;
            }
            let stale = stale_instances(&shared, unix_now(), expire_after.as_secs());
            if stale.is_empty() {
                continue;
            }
            let ids: Vec<String> = stale.iter().map(|s| s.instance_id.clone()).collect();
            match cluster.write(Command::ExpireInstances(stale)).await {
                Ok((_, Response::Expired(n))) => {
                    metrics.cvm_expired.inc_by(n);
                    tracing::info!(expired = n, instances = ?ids, "expired CVM registrations that were not renewed");
                }
                Ok((_, other)) => tracing::warn!(?other, "expiry refused"),
                // Lost leadership or quorum mid-write: the next leader will look again.
                Err(e) => tracing::debug!(error = %e, "expiry write failed; will retry"),
            }
        }
    });
}

/// Longest wait after becoming leader before expiring anything.
const EXPIRY_GRACE: Duration = Duration::from_secs(300);

/// Registrations through the CVM registry (they carry a WireGuard key) whose last renewal is
/// `expire_after_secs` or more before `now`, oldest first, at most one entry's worth.
fn stale_instances(shared: &SharedState, now: u64, expire_after_secs: u64) -> Vec<StaleInstance> {
    let view = shared.read();
    let mut stale: Vec<StaleInstance> = view
        .state
        .instances
        .values()
        .filter(|i| !i.wg_public_key.is_empty())
        .filter(|i| now.saturating_sub(i.registered_at) >= expire_after_secs)
        .map(|i| StaleInstance {
            instance_id: i.instance_id.clone(),
            registered_at: i.registered_at,
        })
        .collect();
    stale.sort_by_key(|s| s.registered_at);
    stale.truncate(MAX_EXPIRE_BATCH);
    stale
}

#[cfg(test)]
mod tests {
    use super::refresh_after;

    #[test]
    fn renewal_stamps_refresh_well_inside_the_expiry_window() {
        // Short windows (tests) write every renewal; long ones a quarter in, capped at 5 min.
        assert_eq!(refresh_after(3), 0);
        assert_eq!(refresh_after(60), 15);
        assert_eq!(refresh_after(86_400), 300);
        // Never expiring still refreshes the stamp now and then.
        assert_eq!(refresh_after(0), 300);
    }
}
