//! `ClusterState::apply`: one validated command changes the model, or is answered with
//! `Response::Rejected` and changes nothing.
//!
//! Deterministic and never panics (the module's rules, in `mod.rs`). It checks every command
//! again (`command.rs`) before it changes anything, because a log entry may come from an older
//! or hostile proposer.

use std::net::IpAddr;

use super::command::{Command, Response, Rewrap, RewrapTarget};
use super::legacy::InstanceV1;
use super::model::{App, ClusterState, Domain, Instance, Register};
use super::names::Registration;
use super::pool::TunnelPool;

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
                self.waf.apps.remove(name);
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
            Command::SetWafPolicy { app, policy } => {
                // Checked again here: a policy must not outlive validation rules of an older
                // proposer, and an app deleted meanwhile must not get one.
                if let Some(Err(e)) = policy.as_ref().map(|p| p.validate()) {
                    return Response::Rejected(e.to_string());
                }
                match (app, policy) {
                    (None, p) => self.waf.default = p.clone(),
                    (Some(app), Some(p)) => {
                        if !self.apps.contains_key(app) {
                            return Response::Rejected(format!("app {app:?} not found"));
                        }
                        self.waf.apps.insert(app.clone(), p.clone());
                    }
                    (Some(app), None) => {
                        self.waf.apps.remove(app);
                    }
                }
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
}
