//! The replicated state (`ClusterState`), the typed commands that change it, and `apply`.
//!
//! Two rules shape this module:
//! - `Command::validate` runs before a command is proposed, so malformed input never enters the
//!   log. `ClusterState::apply` checks again against the current state (an app may have been
//!   created by a concurrent write) and answers with `Response::Rejected` instead of failing.
//! - `apply` is deterministic and never panics: no clocks, no randomness, no hash-map iteration
//!   order, no arithmetic that can overflow. Anything time-like (registration time) travels inside
//!   the command, stamped by the proposer.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

mod acme;
mod legacy;
mod names;
mod nesting;
mod pool;
pub use acme::{
    AcmeAccount, AcmeChallenge, AcmeCommand, AcmeOrder, AcmeState, ChallengeKind, Http01Challenge,
    OrdererLease, MAX_ACME_CHALLENGES, MAX_LEASE_TTL_MS,
};
pub use legacy::{ClusterStateV1, InstanceV1, TunnelPoolV1};
pub use names::{port_form, Collision, Registration, RegistrationPolicy};
pub use nesting::MAX_BATCH_DEPTH;
pub use pool::{TunnelPool, GATEWAY_TUNNEL_V4, GATEWAY_TUNNEL_V6};

/// Most ports an app may declare; keeps entries small and routing tables bounded.
pub const MAX_APP_PORTS: usize = 64;
/// Longest PEM chain or encrypted key accepted in one certificate entry. Raft values stay well
/// under sled's comfortable 128 KiB.
pub const MAX_CERT_BYTES: usize = 64 * 1024;
/// Longest name accepted for regions and instance ids.
const MAX_NAME_LEN: usize = 63;

/// A gateway node as the data plane and CVMs see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct GatewayNode {
    pub id: u64,
    pub region: String,
    pub latitude: f64,
    pub longitude: f64,
    pub rpc_addr: String,
    /// Public addresses (HTTPS), as `host:port`.
    pub public_addrs: Vec<String>,
    /// WireGuard public key, base64 (empty until the node has one).
    pub wg_public_key: String,
    /// WireGuard endpoint, `host:port`.
    pub wg_endpoint: String,
    pub status: NodeStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum NodeStatus {
    #[default]
    Up,
    Draining,
    Down,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Region {
    pub name: String,
    pub latitude: f64,
    pub longitude: f64,
}

/// An application: a name routed as `<app>.<base>`, its ports (the first is the default), and
/// how its instances are balanced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct App {
    pub name: String,
    pub ports: Vec<u16>,
    /// Load-balancing policy, e.g. `round-robin`, `least-conn`, `hash:ip`, `geo+least-conn`.
    pub lb: String,
    /// Log index of the entry that created the app: distinguishes a re-created app from the old one.
    pub revision: u64,
}

/// A CVM instance registered with the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Instance {
    pub instance_id: String,
    pub app: String,
    pub region: String,
    pub wg_public_key: String,
    /// From the cluster's pool, IPv4 or IPv6. Registered with
    /// [`Command::RegisterInstanceV2`]; old log entries carry an [`InstanceV1`].
    pub tunnel_ip: Option<IpAddr>,
    /// Plain TCP backend address, for apps reached outside the tunnel (tests, local demo).
    pub backend_addr: Option<String>,
    /// Unix seconds, stamped by the proposer.
    pub registered_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Domain {
    pub name: String,
    pub app: String,
    pub port: u16,
    /// The token that must appear in `_portcullis-challenge.<name>` for a custom domain.
    pub token: String,
    pub verified: bool,
    pub passthrough: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Certificate {
    /// The primary name (also the key in the table).
    pub name: String,
    pub names: Vec<String>,
    pub chain_pem: String,
    /// The private key, encrypted with the cluster data key (or, for imported development
    /// certificates, marked by `key_encryption`).
    pub key: Vec<u8>,
    pub key_encryption: String,
    /// Unix seconds.
    pub not_after: u64,
    pub issuer: String,
}

/// Everything the cluster agrees on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ClusterState {
    pub nodes: BTreeMap<u64, GatewayNode>,
    pub regions: BTreeMap<String, Region>,
    pub apps: BTreeMap<String, App>,
    pub domains: BTreeMap<String, Domain>,
    pub certificates: BTreeMap<String, Certificate>,
    pub instances: BTreeMap<String, Instance>,
    pub tunnel_pool: TunnelPool,
    /// Per-key registers used by the chaos harness's linearizability workload.
    pub registers: BTreeMap<String, Register>,
    /// ACME account, challenge answers and orderer lease (issue 6). Appended last.
    pub acme: AcmeState,
    /// Load-balancing weights by instance id, for those not at the default of 1 (0 drains).
    /// A map beside `instances` rather than a field of `Instance`, so registration entries
    /// already in logs keep their encoding.
    pub instance_weights: BTreeMap<String, u32>,
}

/// Largest instance weight (the same bound the balancer enforces).
pub const MAX_INSTANCE_WEIGHT: u32 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Register {
    pub value: String,
    /// Log index of the write that produced `value`.
    pub version: u64,
}

/// A typed change to the cluster state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    UpsertNode(GatewayNode),
    RemoveNode {
        id: u64,
    },
    SetNodeStatus {
        id: u64,
        status: NodeStatus,
    },
    UpsertRegion(Region),
    CreateApp {
        name: String,
        ports: Vec<u16>,
        lb: String,
    },
    DeleteApp {
        name: String,
    },
    /// A registration as written before IPv6 pools (IPv4-only shape). Still applied for log
    /// entries already on disk; new proposals use [`Command::RegisterInstanceV2`].
    RegisterInstance(InstanceV1),
    RemoveInstance {
        instance_id: String,
    },
    AddDomain(Domain),
    VerifyDomain {
        name: String,
    },
    RemoveDomain {
        name: String,
    },
    PutCertificate(Certificate),
    RemoveCertificate {
        name: String,
    },
    /// Compare-and-set on a register: `expect: None` writes unconditionally.
    CasRegister {
        key: String,
        expect: Option<String>,
        value: String,
    },
    /// Several commands in one entry, applied in order (each answered separately). Decoded
    /// at most [`MAX_BATCH_DEPTH`] deep (`state/nesting.rs`).
    Batch(#[serde(deserialize_with = "nesting::batch")] Vec<Command>),
    /// ACME orderer lease, account, challenges and fenced certificate writes. Appended last so
    /// existing log encodings keep their variant indices.
    Acme(AcmeCommand),
    /// Removes CVM registrations the proposer found stale. Each entry names the registration
    /// stamp it saw: an instance that re-registered since (a newer stamp) is kept, so a
    /// re-registration racing the expiry always wins.
    ExpireInstances(Vec<StaleInstance>),
    /// Marks a custom-domain claim verified, but only the claim whose token the DNS check saw:
    /// if the claim was removed and added again meanwhile (a new token), nothing changes.
    VerifyDomainClaim {
        name: String,
        token: String,
    },
    /// Sets an instance's load-balancing weight (1 is the default, 0 drains it).
    SetInstanceWeight {
        instance_id: String,
        weight: u32,
    },
    /// Replaces sealed private keys with the same keys sealed under another data key
    /// (`portcullis secrets rewrap`). Each entry names the stored value it replaces: a key that
    /// changed since the proposer read it (a renewal) is left alone, so a rewrap never undoes a
    /// newer write.
    RewrapKeys(Vec<Rewrap>),
    /// Registers (or renews) an instance; its tunnel address, IPv4 or IPv6, comes from the
    /// pool. Replaces [`Command::RegisterInstance`] for new proposals; appended so existing
    /// log entries keep their variant indices.
    RegisterInstanceV2(Instance),
    /// Replaces the CVM tunnel address pool with the range `base/prefix_len`. Refused while any
    /// instance holds a tunnel address: changing the range under live CVMs would strand them.
    SetTunnelPool {
        base: IpAddr,
        prefix_len: u8,
    },
    /// Registers (or renews) an instance held to the one namespace of routable names
    /// (`state/names.rs`): its id cannot be an app's name or route, a case twin, or (for CVM
    /// credentials) outside its app's prefix; a new key for an existing id and instances over
    /// the app's cap are refused. Replaces [`Command::RegisterInstanceV2`] for new proposals.
    RegisterInstanceV3(Registration),
    /// Creates an app, refused when its name or port routes are already instance ids
    /// (`state/names.rs`). Replaces [`Command::CreateApp`] for new proposals.
    CreateAppV2 {
        name: String,
        ports: Vec<u16>,
        lb: String,
    },
}

/// One private key re-sealed by [`Command::RewrapKeys`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rewrap {
    pub target: RewrapTarget,
    /// The stored value as the proposer saw it (certificate key bytes, account credentials).
    pub old: Vec<u8>,
    /// The same secret sealed under `scheme`.
    pub new: Vec<u8>,
    pub scheme: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RewrapTarget {
    Certificate(String),
    AcmeAccount,
}

/// At most this many keys per rewrap entry.
pub const MAX_REWRAP_BATCH: usize = 4096;

/// One registration an [`Command::ExpireInstances`] proposer considered stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleInstance {
    pub instance_id: String,
    pub registered_at: u64,
}

/// At most this many instances per expiry entry, so one entry stays small.
pub const MAX_EXPIRE_BATCH: usize = 1024;

/// The state machine's answer to one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub enum Response {
    /// Blank and membership entries, and commands with nothing to return.
    #[default]
    Ok,
    App(App),
    /// The answer to the old [`Command::RegisterInstance`], in the old shape, so a forwarding
    /// node of an older build can still decode it.
    Instance(InstanceV1),
    Register(Register),
    /// The command was valid on its own but not against the state it met (for example the app
    /// already exists). Nothing was changed.
    Rejected(String),
    Batch(#[serde(deserialize_with = "nesting::batch")] Vec<Response>),
    /// The orderer lease after an `AcmeCommand::AcquireLease`.
    Lease(OrdererLease),
    /// How many registrations an [`Command::ExpireInstances`] removed.
    Expired(u64),
    /// How many keys a [`Command::RewrapKeys`] replaced (the others had changed meanwhile).
    Rewrapped(u64),
    /// The instance as registered by [`Command::RegisterInstanceV2`], with its tunnel address.
    InstanceV2(Instance),
}

/// Why a command was refused before it was proposed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("invalid app name {0:?}: use 1-63 lowercase letters, digits and '-', not starting or ending with '-', and not ending in '-<digits>' (that reads as a port)")]
    AppName(String),
    #[error("invalid port list {0:?}: give 1-64 distinct ports in 1-65535")]
    Ports(Vec<u16>),
    #[error("invalid load-balancing policy {0:?}: expected round-robin, least-conn, hash:ip, hash:header=NAME, hash:cookie=NAME, geo or geo+METHOD")]
    Lb(String),
    #[error("invalid {field} {value:?}: {reason}")]
    Field {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("batch nests another batch")]
    NestedBatch,
}

fn field(field: &'static str, value: impl Into<String>, reason: &'static str) -> ValidationError {
    ValidationError::Field {
        field,
        value: value.into(),
        reason,
    }
}

/// A DNS label as used in `<app>.<base>`.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// App names share the first label with `<app>-<port>[s|g]`, so a name whose last `-` segment
/// looks like a port would be ambiguous.
pub fn validate_app_name(name: &str) -> Result<(), ValidationError> {
    if !is_dns_label(name) {
        return Err(ValidationError::AppName(name.to_string()));
    }
    if let Some((_, tail)) = name.rsplit_once('-') {
        let digits = tail.trim_end_matches(['s', 'g']);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ValidationError::AppName(name.to_string()));
        }
    }
    Ok(())
}

pub fn validate_ports(ports: &[u16]) -> Result<(), ValidationError> {
    let distinct: BTreeSet<u16> = ports.iter().copied().collect();
    if ports.is_empty()
        || ports.len() > MAX_APP_PORTS
        || distinct.len() != ports.len()
        || distinct.contains(&0)
    {
        return Err(ValidationError::Ports(ports.to_vec()));
    }
    Ok(())
}

/// The policy grammar is owned by the `geo` crate, which also interprets it; one parser keeps
/// what the log accepts and what the data plane understands the same.
pub fn validate_lb(lb: &str) -> Result<(), ValidationError> {
    lb.parse::<portcullis_geo::LbPolicy>()
        .map(|_| ())
        .map_err(|_| ValidationError::Lb(lb.to_string()))
}

fn validate_name(f: &'static str, s: &str) -> Result<(), ValidationError> {
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(field(f, s, "must be 1-63 characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(field(
            f,
            s,
            "only letters, digits, '-', '_' and '.' are allowed",
        ));
    }
    Ok(())
}

fn validate_domain_name(s: &str) -> Result<(), ValidationError> {
    let ok = s.len() <= 253
        && s.contains('.')
        && s.split('.')
            .enumerate()
            .all(|(i, l)| (i == 0 && l == "*") || is_dns_label(l));
    if ok {
        Ok(())
    } else {
        Err(field("domain", s, "must be a lowercase DNS name"))
    }
}

fn validate_coords(lat: f64, lon: f64) -> Result<(), ValidationError> {
    if !(-90.0..=90.0).contains(&lat) {
        return Err(field(
            "latitude",
            lat.to_string(),
            "must be within -90..=90",
        ));
    }
    if !(-180.0..=180.0).contains(&lon) {
        return Err(field(
            "longitude",
            lon.to_string(),
            "must be within -180..=180",
        ));
    }
    Ok(())
}

/// The checks shared by both registration shapes.
fn validate_instance(id: &str, app: &str, region: &str, key: &str) -> Result<(), ValidationError> {
    validate_name("instance_id", id)?;
    validate_app_name(app)?;
    validate_name("region", region)?;
    if key.len() > 64 {
        return Err(field("wg_public_key", key, "must be a base64 32-byte key"));
    }
    Ok(())
}

impl Command {
    /// Checks the command on its own. Called before proposing, and again inside `apply` so that
    /// an entry written by an older or hostile proposer cannot corrupt the state.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            Command::UpsertNode(n) => {
                validate_name("region", &n.region)?;
                validate_coords(n.latitude, n.longitude)
            }
            Command::RemoveNode { .. } | Command::SetNodeStatus { .. } => Ok(()),
            Command::UpsertRegion(r) => {
                validate_name("region", &r.name)?;
                validate_coords(r.latitude, r.longitude)
            }
            Command::CreateApp { name, ports, lb } => {
                validate_app_name(name)?;
                validate_ports(ports)?;
                validate_lb(lb)
            }
            Command::DeleteApp { name } => validate_app_name(name),
            Command::RegisterInstance(i) => {
                validate_instance(&i.instance_id, &i.app, &i.region, &i.wg_public_key)
            }
            Command::RegisterInstanceV2(i) => {
                validate_instance(&i.instance_id, &i.app, &i.region, &i.wg_public_key)
            }
            Command::RegisterInstanceV3(r) => {
                let i = &r.instance;
                validate_instance(&i.instance_id, &i.app, &i.region, &i.wg_public_key)?;
                if !is_dns_label(&i.instance_id) {
                    return Err(field(
                        "instance_id",
                        i.instance_id.clone(),
                        "must be a lowercase DNS label: letters a-z, digits and '-', not starting or ending with '-'",
                    ));
                }
                Ok(())
            }
            Command::CreateAppV2 { name, ports, lb } => {
                validate_app_name(name)?;
                validate_ports(ports)?;
                validate_lb(lb)
            }
            Command::SetTunnelPool { base, prefix_len } => {
                TunnelPool::validate_range(*base, *prefix_len)
            }
            Command::RemoveInstance { instance_id } => validate_name("instance_id", instance_id),
            Command::AddDomain(d) => {
                validate_domain_name(&d.name)?;
                validate_app_name(&d.app)?;
                if d.port == 0 {
                    return Err(field("port", "0", "must be 1-65535"));
                }
                Ok(())
            }
            Command::SetInstanceWeight {
                instance_id,
                weight,
            } => {
                validate_name("instance_id", instance_id)?;
                if *weight > MAX_INSTANCE_WEIGHT {
                    return Err(field("weight", weight.to_string(), "must be 0-10000"));
                }
                Ok(())
            }
            Command::VerifyDomainClaim { name, token } => {
                validate_domain_name(name)?;
                if token.is_empty() || token.len() > 128 {
                    return Err(field("token", token.clone(), "must be 1-128 bytes"));
                }
                Ok(())
            }
            Command::VerifyDomain { name } | Command::RemoveDomain { name } => {
                validate_domain_name(name)
            }
            Command::PutCertificate(c) => {
                validate_domain_name(&c.name)?;
                if c.chain_pem.len() > MAX_CERT_BYTES || c.key.len() > MAX_CERT_BYTES {
                    return Err(field(
                        "certificate",
                        c.name.clone(),
                        "chain or key larger than 64 KiB",
                    ));
                }
                Ok(())
            }
            Command::RemoveCertificate { name } => validate_domain_name(name),
            Command::CasRegister { key, value, .. } => {
                validate_name("key", key)?;
                if value.len() > 1024 {
                    return Err(field("value", value.clone(), "longer than 1024 bytes"));
                }
                Ok(())
            }
            Command::Batch(cmds) => {
                for c in cmds {
                    if matches!(c, Command::Batch(_)) {
                        return Err(ValidationError::NestedBatch);
                    }
                    c.validate()?;
                }
                Ok(())
            }
            Command::Acme(c) => c.validate(),
            Command::ExpireInstances(list) => {
                if list.len() > MAX_EXPIRE_BATCH {
                    return Err(field(
                        "instances",
                        list.len().to_string(),
                        "more than 1024 in one expiry",
                    ));
                }
                list.iter()
                    .try_for_each(|s| validate_name("instance_id", &s.instance_id))
            }
            Command::RewrapKeys(list) => {
                if list.len() > MAX_REWRAP_BATCH {
                    return Err(field(
                        "keys",
                        list.len().to_string(),
                        "more than 4096 in one rewrap",
                    ));
                }
                for r in list {
                    if let RewrapTarget::Certificate(name) = &r.target {
                        validate_domain_name(name)?;
                    }
                    if r.old.len() > MAX_CERT_BYTES
                        || r.new.is_empty()
                        || r.new.len() > MAX_CERT_BYTES
                    {
                        return Err(field("key", "(redacted)", "must be 1 byte to 64 KiB"));
                    }
                    if r.scheme.is_empty() || r.scheme.len() > 64 {
                        return Err(field(
                            "key_encryption",
                            r.scheme.clone(),
                            "must be 1-64 bytes",
                        ));
                    }
                }
                Ok(())
            }
        }
    }
}

impl ClusterState {
    /// Applies one command at log index `index`. Never panics; a command that does not fit the
    /// current state changes nothing and is answered with `Response::Rejected`.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Response {
        if let Err(e) = cmd.validate() {
            return Response::Rejected(e.to_string());
        }
        match cmd {
            Command::UpsertNode(n) => {
                self.nodes.insert(n.id, n.clone());
                Response::Ok
            }
            Command::RemoveNode { id } => match self.nodes.remove(id) {
                Some(_) => Response::Ok,
                None => Response::Rejected(format!("node {id} not found")),
            },
            Command::SetNodeStatus { id, status } => match self.nodes.get_mut(id) {
                Some(n) => {
                    n.status = *status;
                    Response::Ok
                }
                None => Response::Rejected(format!("node {id} not found")),
            },
            Command::UpsertRegion(r) => {
                self.regions.insert(r.name.clone(), r.clone());
                Response::Ok
            }
            Command::CreateApp { name, ports, lb } => self.create_app(index, name, ports, lb),
            Command::CreateAppV2 { name, ports, lb } => {
                if self.apps.contains_key(name) {
                    return Response::Rejected(format!("app {name:?} already exists"));
                }
                if let Err(why) = self.check_new_app_name(name, ports) {
                    return Response::Rejected(why);
                }
                self.create_app(index, name, ports, lb)
            }
            Command::DeleteApp { name } => {
                if self.apps.remove(name).is_none() {
                    return Response::Rejected(format!("app {name:?} not found"));
                }
                // An app's instances and domains go with it; their tunnel IPs return to the pool.
                let gone: Vec<String> = self
                    .instances
                    .values()
                    .filter(|i| &i.app == name)
                    .map(|i| i.instance_id.clone())
                    .collect();
                for id in gone {
                    self.remove_instance(&id);
                }
                self.domains.retain(|_, d| &d.app != name);
                Response::Ok
            }
            Command::RegisterInstance(old) => {
                // Old-shape entries only ever met IPv4 pools. A proposer of an older build
                // cannot take an IPv6 address; refuse before changing anything.
                if self.tunnel_pool.base.is_ipv6() {
                    return Response::Rejected(format!(
                        "the tunnel pool is IPv6 ({}); this registration came from an older build that only knows IPv4 addresses: upgrade it",
                        self.tunnel_pool
                    ));
                }
                match self.register_instance(&Instance::from(old.clone())) {
                    Ok(inst) => match InstanceV1::from_current(&inst) {
                        Some(v1) => Response::Instance(v1),
                        // Unreachable with the check above (an IPv4 pool holds only IPv4
                        // addresses: it changes only while none are held); answered, not
                        // panicked, because apply never panics.
                        None => Response::Rejected(format!(
                            "instance {:?} has IPv6 address {:?}, which an older build cannot hold",
                            inst.instance_id, inst.tunnel_ip
                        )),
                    },
                    Err(why) => Response::Rejected(why),
                }
            }
            Command::RegisterInstanceV2(new) => match self.register_instance(new) {
                Ok(inst) => Response::InstanceV2(inst),
                Err(why) => Response::Rejected(why),
            },
            Command::RegisterInstanceV3(r) => match self.register_checked(r) {
                Ok(inst) => Response::InstanceV2(inst),
                Err(why) => Response::Rejected(why),
            },
            Command::SetTunnelPool { base, prefix_len } => self.set_tunnel_pool(*base, *prefix_len),
            Command::RemoveInstance { instance_id } => {
                if self.remove_instance(instance_id) {
                    Response::Ok
                } else {
                    Response::Rejected(format!("instance {instance_id:?} not found"))
                }
            }
            Command::AddDomain(d) => {
                if self.domains.contains_key(&d.name) {
                    return Response::Rejected(format!("domain {:?} already exists", d.name));
                }
                if !self.apps.contains_key(&d.app) {
                    return Response::Rejected(format!("app {:?} not found", d.app));
                }
                self.domains.insert(
                    d.name.clone(),
                    Domain {
                        verified: false,
                        ..d.clone()
                    },
                );
                Response::Ok
            }
            Command::SetInstanceWeight {
                instance_id,
                weight,
            } => {
                if !self.instances.contains_key(instance_id) {
                    return Response::Rejected(format!("instance {instance_id:?} not found"));
                }
                if *weight == 1 {
                    self.instance_weights.remove(instance_id);
                } else {
                    self.instance_weights.insert(instance_id.clone(), *weight);
                }
                Response::Ok
            }
            Command::VerifyDomainClaim { name, token } => match self.domains.get_mut(name) {
                Some(d) if &d.token == token => {
                    d.verified = true;
                    Response::Ok
                }
                Some(_) => Response::Rejected(format!(
                    "domain {name:?} was claimed again since the check; run verify again"
                )),
                None => Response::Rejected(format!("domain {name:?} not found")),
            },
            Command::VerifyDomain { name } => match self.domains.get_mut(name) {
                Some(d) => {
                    d.verified = true;
                    Response::Ok
                }
                None => Response::Rejected(format!("domain {name:?} not found")),
            },
            Command::RemoveDomain { name } => match self.domains.remove(name) {
                Some(_) => Response::Ok,
                None => Response::Rejected(format!("domain {name:?} not found")),
            },
            Command::PutCertificate(c) => {
                self.certificates.insert(c.name.clone(), c.clone());
                Response::Ok
            }
            Command::RemoveCertificate { name } => match self.certificates.remove(name) {
                Some(_) => Response::Ok,
                None => Response::Rejected(format!("certificate {name:?} not found")),
            },
            Command::CasRegister { key, expect, value } => {
                let current = self.registers.get(key);
                if let Some(expected) = expect {
                    if current.map(|r| &r.value) != Some(expected) {
                        return Response::Rejected(format!(
                            "cas failed on {key:?}: expected {expected:?}, found {:?}",
                            current.map(|r| r.value.as_str())
                        ));
                    }
                }
                let reg = Register {
                    value: value.clone(),
                    version: index,
                };
                self.registers.insert(key.clone(), reg.clone());
                Response::Register(reg)
            }
            Command::Batch(cmds) => {
                Response::Batch(cmds.iter().map(|c| self.apply(index, c)).collect())
            }
            Command::Acme(c) => self.apply_acme(c),
            Command::ExpireInstances(list) => {
                let mut expired = 0u64;
                for stale in list {
                    let same = self.instances.get(&stale.instance_id).is_some_and(|i| {
                        i.registered_at == stale.registered_at && !i.wg_public_key.is_empty()
                    });
                    if same && self.remove_instance(&stale.instance_id) {
                        expired += 1;
                    }
                }
                Response::Expired(expired)
            }
            Command::RewrapKeys(list) => Response::Rewrapped(self.rewrap(list)),
        }
    }

    fn rewrap(&mut self, list: &[Rewrap]) -> u64 {
        let mut replaced = 0;
        for r in list {
            match &r.target {
                RewrapTarget::Certificate(name) => {
                    if let Some(c) = self.certificates.get_mut(name).filter(|c| c.key == r.old) {
                        c.key = r.new.clone();
                        c.key_encryption = r.scheme.clone();
                        replaced += 1;
                    }
                }
                RewrapTarget::AcmeAccount => {
                    let account = self.acme.account.as_mut();
                    // Credentials are text: a sealed value travels as base64.
                    let new = String::from_utf8(r.new.clone()).ok();
                    if let (Some(a), Some(new)) = (account, new) {
                        if a.credentials.as_bytes() == r.old.as_slice() {
                            a.credentials = new;
                            a.encryption = r.scheme.clone();
                            replaced += 1;
                        }
                    }
                }
            }
        }
        replaced
    }

    fn set_tunnel_pool(&mut self, base: IpAddr, prefix_len: u8) -> Response {
        if self.tunnel_pool.base == base && self.tunnel_pool.prefix_len == prefix_len {
            // Setting the current range again changes nothing, so it is harmless even with
            // instances registered (a retried CLI call).
            return Response::Ok;
        }
        let holders: Vec<&str> = self
            .instances
            .values()
            .filter(|i| i.tunnel_ip.is_some())
            .map(|i| i.instance_id.as_str())
            .collect();
        if let Some(first) = holders.first() {
            return Response::Rejected(format!(
                "cannot change the tunnel pool from {} to {base}/{prefix_len}: {} instance(s) hold tunnel addresses (e.g. {first:?}); changing the range under live CVMs would strand them, so remove them first (portcullis cvm remove)",
                self.tunnel_pool,
                holders.len()
            ));
        }
        self.tunnel_pool = TunnelPool::new(base, prefix_len);
        Response::Ok
    }

    fn create_app(&mut self, index: u64, name: &str, ports: &[u16], lb: &str) -> Response {
        if self.apps.contains_key(name) {
            return Response::Rejected(format!("app {name:?} already exists"));
        }
        let app = App {
            name: name.to_string(),
            ports: ports.to_vec(),
            lb: lb.to_string(),
            revision: index,
        };
        self.apps.insert(name.to_string(), app.clone());
        Response::App(app)
    }

    /// [`Command::RegisterInstanceV3`]: the namespace, key and cap rules, then the
    /// registration itself.
    fn register_checked(&mut self, r: &Registration) -> Result<Instance, String> {
        self.check_registration(r)?;
        self.register_instance(&r.instance)
    }

    /// Why `r` would be refused by the current state, if it would: the app exists, the id is
    /// not another app's, a re-registration keeps its key (unless the policy allows a new
    /// one), and a new id fits the namespace (`state/names.rs`) and the app's cap. Read-only,
    /// so a proposer can answer a refusal before it writes anything; `apply` checks again.
    pub fn check_registration(&self, r: &Registration) -> Result<(), String> {
        let new = &r.instance;
        let id = new.instance_id.as_str();
        if !self.apps.contains_key(&new.app) {
            return Err(format!("app {:?} not found", new.app));
        }
        match self.instances.get(id) {
            Some(old) if old.app != new.app => {
                Err(format!("instance {id:?} belongs to app {:?}", old.app))
            }
            Some(old) if old.wg_public_key != new.wg_public_key && !r.policy.allow_rekey => {
                Err(format!(
                    "instance {id:?} is registered with another WireGuard key; a new key needs the operator to remove it first (portcullis cvm remove {id})"
                ))
            }
            Some(_) => Ok(()),
            None => {
                self.check_new_instance_id(id, &new.app, &r.policy)?;
                let cap = r.policy.max_instances_per_app;
                if cap > 0 {
                    let held = self.instances_of(&new.app).count();
                    if held >= cap as usize {
                        return Err(format!(
                            "app {:?} already has {held} instances, its limit (wg.max_instances_per_app = {cap})",
                            new.app
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    /// Registers or renews `new`; the instance as stored (with its address) or why not.
    fn register_instance(&mut self, new: &Instance) -> Result<Instance, String> {
        if !self.apps.contains_key(&new.app) {
            return Err(format!("app {:?} not found", new.app));
        }
        if let Some(existing) = self.instances.get(&new.instance_id) {
            if existing.app != new.app {
                return Err(format!(
                    "instance {:?} belongs to app {:?}",
                    new.instance_id, existing.app
                ));
            }
        }
        // Keys are unique, so an instance renewing with the key it already holds cannot clash:
        // renewals (the bulk of registrations) skip the scan over every instance.
        let renewal = self
            .instances
            .get(&new.instance_id)
            .is_some_and(|i| i.wg_public_key == new.wg_public_key);
        if !new.wg_public_key.is_empty() && !renewal {
            let clash = self
                .instances
                .values()
                .any(|i| i.wg_public_key == new.wg_public_key && i.instance_id != new.instance_id);
            if clash {
                return Err("wireguard public key already registered by another instance".into());
            }
        }
        // Sticky: a re-registering instance keeps its address.
        let tunnel_ip = match self
            .instances
            .get(&new.instance_id)
            .and_then(|i| i.tunnel_ip)
        {
            Some(ip) => ip,
            None => match self.tunnel_pool.allocate() {
                Some(ip) => ip,
                None => {
                    return Err(format!(
                        "tunnel address pool {} exhausted ({} addresses)",
                        self.tunnel_pool,
                        self.tunnel_pool.capacity()
                    ))
                }
            },
        };
        let inst = Instance {
            tunnel_ip: Some(tunnel_ip),
            ..new.clone()
        };
        self.instances
            .insert(inst.instance_id.clone(), inst.clone());
        Ok(inst)
    }

    fn remove_instance(&mut self, id: &str) -> bool {
        match self.instances.remove(id) {
            Some(inst) => {
                self.instance_weights.remove(id);
                if let Some(ip) = inst.tunnel_ip {
                    self.tunnel_pool.release(ip);
                }
                true
            }
            None => false,
        }
    }

    /// Instances of one app, in a stable order.
    pub fn instances_of<'a>(&'a self, app: &'a str) -> impl Iterator<Item = &'a Instance> + 'a {
        self.instances.values().filter(move |i| i.app == app)
    }
}

#[cfg(test)]
pub(crate) mod tests;
