//! The typed commands that change `ClusterState`, the answers they get, and what a command may
//! do: `Command::validate` (the command on its own) and `ClusterState::check_registration`
//! (against the current state, read-only).
//!
//! `Command` is stored in the log and `Response` travels back to forwarding nodes, both as
//! bincode, which is positional: new variants are appended, never inserted or reordered.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::acme::{AcmeCommand, OrdererLease};
use super::legacy::InstanceV1;
use super::model::{
    App, Certificate, ClusterState, Domain, GatewayNode, Instance, NodeStatus, Region, Register,
    MAX_INSTANCE_WEIGHT,
};
use super::names::Registration;
use super::nesting;
use super::pool::TunnelPool;
use super::validate::{
    field, is_dns_label, validate_app_name, validate_coords, validate_domain_name,
    validate_instance, validate_lb, validate_name, validate_ports, ValidationError, MAX_CERT_BYTES,
};
use super::waf::WafPolicy;

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
    ///
    /// [`MAX_BATCH_DEPTH`]: nesting::MAX_BATCH_DEPTH
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
    /// Sets (`Some`) or removes (`None`) the WAF policy of an app, or with `app: None` the
    /// cluster default for apps without one.
    SetWafPolicy {
        app: Option<String>,
        policy: Option<WafPolicy>,
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
            Command::SetWafPolicy { app, policy } => {
                if let Some(app) = app {
                    validate_app_name(app)?;
                }
                match policy {
                    Some(p) => p.validate(),
                    None => Ok(()),
                }
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
}
