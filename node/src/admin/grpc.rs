//! The `Admin` gRPC service: every operator command, as Raft writes through the leader and
//! linearizable reads of the replicated state.

use portcullis_proto::admin::admin_server::Admin;
use portcullis_proto::admin::{
    self as pb, AddLearnerRequest, AppName, ClusterStatusReply, ClusterStatusRequest,
    CreateAppRequest, Empty, InitRequest, InstanceId, ListAppsReply, ListCertificatesReply,
    ListInstancesReply, ListInstancesRequest, MembershipReply, NodeIdRequest,
    PutCertificateRequest, RegisterInstanceRequest, WriteReply,
};
use portcullis_raft::state::{
    Certificate, Instance, Registration, RegistrationPolicy, Rewrap, RewrapTarget, TunnelPool,
};
use portcullis_raft::{ClusterError, Command, NodeInfo, Response};
use tonic::{Request, Status};

use super::convert::{app_pb, cert_pb, domain_pb, instance_pb};
use super::keys::stored_keys;
use super::AdminState;

pub(crate) struct AdminService {
    pub(super) state: AdminState,
}

fn status(e: ClusterError) -> Status {
    match e {
        ClusterError::Invalid(m) => Status::invalid_argument(m),
        ClusterError::Rejected(m) if m.contains("already exists") => Status::already_exists(m),
        ClusterError::Rejected(m) if m.contains("not found") => Status::not_found(m),
        ClusterError::Rejected(m) => Status::failed_precondition(m),
        ClusterError::UnknownNode(_) => Status::not_found(e.to_string()),
        ClusterError::NoLeader(_) | ClusterError::Forward { .. } | ClusterError::NotLeader(_) => {
            Status::unavailable(e.to_string())
        }
        ClusterError::Raft(m) => Status::internal(m),
    }
}

/// Maps a state-machine answer to the gRPC result.
fn outcome(r: Response) -> Result<Response, Status> {
    match r {
        Response::Rejected(m) => Err(status(ClusterError::Rejected(m))),
        other => Ok(other),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AdminService {
    fn members_pb(&self) -> Vec<pb::Member> {
        self.state
            .cluster
            .members()
            .into_iter()
            .map(|m| pb::Member {
                id: m.id,
                region: m.node.region,
                voter: m.voter,
                rpc_addr: m.node.rpc_addr,
                admin_addr: m.node.admin_addr,
            })
            .collect()
    }

    /// The answer to a membership change (add-learner, promote, remove, transfer-leader): the
    /// change's log index and the membership as this node now sees it.
    fn membership_answer(
        &self,
        change: Result<u64, ClusterError>,
    ) -> Result<tonic::Response<MembershipReply>, Status> {
        let log_index = change.map_err(status)?;
        Ok(tonic::Response::new(self.membership_reply(log_index)))
    }

    fn membership_reply(&self, log_index: u64) -> MembershipReply {
        let leader_id = self.state.cluster.metrics().current_leader.unwrap_or(0);
        MembershipReply {
            log_index,
            members: self.members_pb(),
            leader_id,
        }
    }
}

impl AdminService {
    /// Proposes `cmd` through the leader: (log index, the state machine's answer), with a
    /// refusal or a failed write turned into the matching gRPC status.
    /// Reads after this see every write committed before it (see `Cluster::linearizable_barrier`).
    pub(super) async fn barrier(&self) -> Result<(), Status> {
        self.state
            .cluster
            .linearizable_barrier()
            .await
            .map_err(status)
    }

    pub(super) async fn commit(&self, cmd: Command) -> Result<(u64, Response), Status> {
        let (index, resp) = self.state.cluster.write(cmd).await.map_err(status)?;
        Ok((index, outcome(resp)?))
    }

    fn tunnel_pool_pb(&self, log_index: u64) -> pb::TunnelPoolReply {
        let applied = self.state.cluster.shared.read();
        let pool = &applied.state.tunnel_pool;
        pb::TunnelPoolReply {
            cidr: pool.to_string(),
            allocated: pool.allocated(),
            capacity: pool.capacity(),
            log_index,
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn cluster_status(
        &self,
        _req: Request<ClusterStatusRequest>,
    ) -> Result<tonic::Response<ClusterStatusReply>, Status> {
        let m = self.state.cluster.metrics();
        let members = self.members_pb();
        Ok(tonic::Response::new(ClusterStatusReply {
            node_id: m.id,
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            initialized: !members.is_empty(),
            members,
            state: format!("{:?}", m.state).to_lowercase(),
            region: self.state.region.clone(),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            name_collisions: self
                .state
                .cluster
                .shared
                .read()
                .state
                .name_collisions()
                .iter()
                .map(crate::collisions::describe)
                .collect(),
        }))
    }

    async fn init(
        &self,
        req: Request<InitRequest>,
    ) -> Result<tonic::Response<MembershipReply>, Status> {
        let req = req.into_inner();
        let mut members = std::collections::BTreeMap::new();
        for m in req.members {
            if m.id == 0 || m.rpc_addr.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "member {m:?} needs a non-zero id and an rpc_addr"
                )));
            }
            members.insert(
                m.id,
                NodeInfo {
                    rpc_addr: m.rpc_addr,
                    admin_addr: m.admin_addr,
                    region: m.region,
                },
            );
        }
        if members.is_empty() {
            let me = self.state.cluster.id;
            return Err(Status::invalid_argument(format!(
                "give at least one member (this node is {me}); use --member ID=RPC_ADDR[@REGION]"
            )));
        }
        if !members.contains_key(&self.state.cluster.id) {
            return Err(Status::invalid_argument(format!(
                "the members must include this node ({})",
                self.state.cluster.id
            )));
        }
        self.state
            .cluster
            .initialize(members)
            .await
            .map_err(|e| match e {
                ClusterError::Raft(m) if m.contains("NotAllowed") || m.contains("not allowed") => {
                    Status::failed_precondition(format!("cluster already initialized: {m}"))
                }
                other => status(other),
            })?;
        Ok(tonic::Response::new(self.membership_reply(0)))
    }

    async fn add_learner(
        &self,
        req: Request<AddLearnerRequest>,
    ) -> Result<tonic::Response<MembershipReply>, Status> {
        let r = req.into_inner();
        if r.id == 0 || r.rpc_addr.is_empty() {
            return Err(Status::invalid_argument(
                "add-learner needs a non-zero id and an rpc address",
            ));
        }
        let node = NodeInfo {
            rpc_addr: r.rpc_addr,
            admin_addr: r.admin_addr,
            region: r.region,
        };
        let change = self.state.cluster.add_learner(r.id, node, r.blocking).await;
        self.membership_answer(change)
    }

    async fn promote(
        &self,
        req: Request<NodeIdRequest>,
    ) -> Result<tonic::Response<MembershipReply>, Status> {
        let change = self.state.cluster.promote(req.into_inner().id).await;
        self.membership_answer(change)
    }

    async fn remove(
        &self,
        req: Request<NodeIdRequest>,
    ) -> Result<tonic::Response<MembershipReply>, Status> {
        let change = self.state.cluster.remove(req.into_inner().id).await;
        self.membership_answer(change)
    }

    async fn transfer_leader(
        &self,
        req: Request<NodeIdRequest>,
    ) -> Result<tonic::Response<MembershipReply>, Status> {
        let change = self
            .state
            .cluster
            .transfer_leader(req.into_inner().id)
            .await;
        self.membership_answer(change)
    }

    async fn create_app(
        &self,
        req: Request<CreateAppRequest>,
    ) -> Result<tonic::Response<pb::App>, Status> {
        let r = req.into_inner();
        let ports = r
            .ports
            .iter()
            .map(|p| {
                u16::try_from(*p).map_err(|_| {
                    Status::invalid_argument(format!("invalid port {p}: must be 1-65535"))
                })
            })
            .collect::<Result<Vec<u16>, Status>>()?;
        let lb = if r.lb.is_empty() {
            "round-robin".to_string()
        } else {
            r.lb
        };
        let cmd = Command::CreateAppV2 {
            name: r.name,
            ports,
            lb,
        };
        if let Command::CreateAppV2 { name, ports, .. } = &cmd {
            cmd.validate()
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            // A clash with an instance is answered from this node's state before anything is
            // written; `apply` checks again at the entry's index.
            self.state
                .cluster
                .shared
                .read()
                .state
                .check_new_app_name(name, ports)
                .map_err(Status::failed_precondition)?;
        }
        let (_, resp) = self.state.cluster.write(cmd).await.map_err(status)?;
        match outcome(resp)? {
            Response::App(a) => Ok(tonic::Response::new(app_pb(&a, Vec::new()))),
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    }

    async fn list_apps(
        &self,
        _req: Request<Empty>,
    ) -> Result<tonic::Response<ListAppsReply>, Status> {
        self.barrier().await?;
        let applied = self.state.cluster.shared.read();
        let apps = applied
            .state
            .apps
            .values()
            .map(|a| app_pb(a, Vec::new()))
            .collect();
        Ok(tonic::Response::new(ListAppsReply { apps }))
    }

    async fn get_app(&self, req: Request<AppName>) -> Result<tonic::Response<pb::App>, Status> {
        let name = req.into_inner().name;
        self.barrier().await?;
        let applied = self.state.cluster.shared.read();
        let Some(app) = applied.state.apps.get(&name) else {
            return Err(Status::not_found(format!("app {name:?} not found")));
        };
        let weights = &applied.state.instance_weights;
        let instances = applied
            .state
            .instances_of(&name)
            .map(|i| instance_pb(i, weights))
            .collect();
        Ok(tonic::Response::new(app_pb(app, instances)))
    }

    async fn kv_cas(
        &self,
        req: Request<pb::KvCasRequest>,
    ) -> Result<tonic::Response<pb::KvReply>, Status> {
        let r = req.into_inner();
        let cmd = Command::CasRegister {
            key: r.key,
            expect: r.expect,
            value: r.value,
        };
        let (_, resp) = self.state.cluster.write(cmd).await.map_err(status)?;
        match resp {
            Response::Register(reg) => Ok(tonic::Response::new(pb::KvReply {
                ok: true,
                found: true,
                value: reg.value,
                version: reg.version,
            })),
            // The compare failed: a definite no, the register is unchanged.
            Response::Rejected(m) if m.starts_with("cas failed") => {
                Ok(tonic::Response::new(pb::KvReply {
                    ok: false,
                    found: false,
                    value: String::new(),
                    version: 0,
                }))
            }
            other => outcome(other)
                .and_then(|o| Err(Status::internal(format!("unexpected answer {o:?}")))),
        }
    }

    async fn kv_get(
        &self,
        req: Request<pb::KvGetRequest>,
    ) -> Result<tonic::Response<pb::KvReply>, Status> {
        let key = req.into_inner().key;
        // The test-only switch exists so the chaos harness can prove it catches stale reads.
        if !self.state.unsafe_stale_reads {
            self.barrier().await?;
        }
        let applied = self.state.cluster.shared.read();
        let reply = match applied.state.registers.get(&key) {
            Some(r) => pb::KvReply {
                ok: true,
                found: true,
                value: r.value.clone(),
                version: r.version,
            },
            None => pb::KvReply {
                ok: true,
                found: false,
                value: String::new(),
                version: 0,
            },
        };
        Ok(tonic::Response::new(reply))
    }

    async fn delete_app(
        &self,
        req: Request<AppName>,
    ) -> Result<tonic::Response<WriteReply>, Status> {
        let name = req.into_inner().name;
        let (log_index, _) = self.commit(Command::DeleteApp { name }).await?;
        Ok(tonic::Response::new(WriteReply { log_index }))
    }

    async fn put_certificate(
        &self,
        req: Request<PutCertificateRequest>,
    ) -> Result<tonic::Response<pb::CertificateInfo>, Status> {
        let r = req.into_inner();
        let name = r.name.trim().to_ascii_lowercase();
        // Parse and check before proposing: a bad certificate never enters the log.
        let meta = crate::tls::inspect(&name, &r.chain_pem, r.key_pem.as_bytes())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let key_pem = zeroize::Zeroizing::new(r.key_pem);
        let (key, key_encryption) = self
            .state
            .keyring
            .seal(&crate::secrets::cert_aad(&name), key_pem.as_bytes())
            .map_err(|e| Status::internal(e.to_string()))?;
        let cert = Certificate {
            name,
            names: meta.names,
            chain_pem: r.chain_pem,
            key,
            key_encryption,
            not_after: meta.not_after,
            issuer: meta.issuer,
        };
        let info = cert_pb(&cert);
        self.commit(Command::PutCertificate(cert)).await?;
        Ok(tonic::Response::new(info))
    }

    async fn list_certificates(
        &self,
        _req: Request<Empty>,
    ) -> Result<tonic::Response<ListCertificatesReply>, Status> {
        self.barrier().await?;
        let applied = self.state.cluster.shared.read();
        let certificates = applied.state.certificates.values().map(cert_pb).collect();
        Ok(tonic::Response::new(ListCertificatesReply { certificates }))
    }

    async fn renew_certificate(
        &self,
        req: Request<pb::CertificateName>,
    ) -> Result<tonic::Response<WriteReply>, Status> {
        let name = req.into_inner().name.trim().to_ascii_lowercase();
        self.barrier().await?;
        if !self
            .state
            .cluster
            .shared
            .read()
            .state
            .certificates
            .contains_key(&name)
        {
            return Err(Status::not_found(format!("no certificate named {name:?}")));
        }
        let cmd = Command::Acme(portcullis_raft::state::AcmeCommand::RequestRenewal {
            name,
            requested_at: unix_now(),
        });
        let (log_index, resp) = self.state.cluster.write(cmd).await.map_err(status)?;
        outcome(resp)?;
        Ok(tonic::Response::new(WriteReply { log_index }))
    }

    async fn register_instance(
        &self,
        req: Request<RegisterInstanceRequest>,
    ) -> Result<tonic::Response<pb::Instance>, Status> {
        let r = req.into_inner();
        if !r.backend_addr.is_empty()
            && crate::edge::route::split_host_port(&r.backend_addr)
                .0
                .is_empty()
        {
            return Err(Status::invalid_argument(format!(
                "backend_addr {:?}: expected host or host:port",
                r.backend_addr
            )));
        }
        let inst = Instance {
            instance_id: r.instance_id,
            app: r.app,
            region: r.region,
            wg_public_key: r.wg_public_key,
            tunnel_ip: None,
            backend_addr: (!r.backend_addr.is_empty()).then_some(r.backend_addr),
            registered_at: unix_now(),
        };
        // Operators name any id that fits the namespace and may re-key an instance; the
        // per-app cap is for tenants' credentials only.
        let registration = Registration {
            instance: inst,
            policy: RegistrationPolicy {
                require_app_prefix: false,
                allow_rekey: true,
                max_instances_per_app: 0,
            },
        };
        let cmd = Command::RegisterInstanceV3(registration);
        cmd.validate()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Command::RegisterInstanceV3(r) = &cmd {
            self.state
                .cluster
                .shared
                .read()
                .state
                .check_registration(r)
                .map_err(|m| status(ClusterError::Rejected(m)))?;
        }
        let (_, resp) = self.state.cluster.write(cmd).await.map_err(status)?;
        match outcome(resp)? {
            Response::InstanceV2(i) => {
                let weights = self
                    .state
                    .cluster
                    .shared
                    .read()
                    .state
                    .instance_weights
                    .clone();
                Ok(tonic::Response::new(instance_pb(&i, &weights)))
            }
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    }

    async fn list_instances(
        &self,
        req: Request<ListInstancesRequest>,
    ) -> Result<tonic::Response<ListInstancesReply>, Status> {
        let app = req.into_inner().app;
        self.barrier().await?;
        let applied = self.state.cluster.shared.read();
        let instances = applied
            .state
            .instances
            .values()
            .filter(|i| app.is_empty() || i.app == app)
            .map(|i| instance_pb(i, &applied.state.instance_weights))
            .collect();
        Ok(tonic::Response::new(ListInstancesReply { instances }))
    }

    async fn get_instance(
        &self,
        req: Request<InstanceId>,
    ) -> Result<tonic::Response<pb::Instance>, Status> {
        let id = req.into_inner().instance_id;
        self.barrier().await?;
        let applied = self.state.cluster.shared.read();
        match applied.state.instances.get(&id) {
            Some(i) => Ok(tonic::Response::new(instance_pb(
                i,
                &applied.state.instance_weights,
            ))),
            None => Err(Status::not_found(format!("instance {id:?} not found"))),
        }
    }

    async fn get_tunnel_pool(
        &self,
        _req: Request<Empty>,
    ) -> Result<tonic::Response<pb::TunnelPoolReply>, Status> {
        self.barrier().await?;
        Ok(tonic::Response::new(self.tunnel_pool_pb(0)))
    }

    async fn set_tunnel_pool(
        &self,
        req: Request<pb::SetTunnelPoolRequest>,
    ) -> Result<tonic::Response<pb::TunnelPoolReply>, Status> {
        let (base, prefix_len) = TunnelPool::parse_cidr(&req.into_inner().cidr)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (log_index, _) = self
            .commit(Command::SetTunnelPool { base, prefix_len })
            .await?;
        // A follower forwarded the write: wait until it has applied it before reading.
        self.barrier().await?;
        Ok(tonic::Response::new(self.tunnel_pool_pb(log_index)))
    }

    async fn set_waf_policy(
        &self,
        req: Request<pb::WafPolicyRequest>,
    ) -> Result<tonic::Response<WriteReply>, Status> {
        Ok(tonic::Response::new(self.waf_set(req.into_inner()).await?))
    }

    async fn get_waf_policy(
        &self,
        req: Request<pb::WafPolicyQuery>,
    ) -> Result<tonic::Response<pb::WafPolicyReply>, Status> {
        Ok(tonic::Response::new(self.waf_get(req.into_inner()).await?))
    }

    async fn test_waf(
        &self,
        req: Request<pb::WafTestRequest>,
    ) -> Result<tonic::Response<pb::WafTestReply>, Status> {
        Ok(tonic::Response::new(self.waf_test(req.into_inner()).await?))
    }

    async fn reload_waf(
        &self,
        _req: Request<Empty>,
    ) -> Result<tonic::Response<pb::WafReloadReply>, Status> {
        Ok(tonic::Response::new(self.waf_reload().await?))
    }

    async fn set_instance_weight(
        &self,
        req: Request<pb::InstanceWeightRequest>,
    ) -> Result<tonic::Response<WriteReply>, Status> {
        let r = req.into_inner();
        let (log_index, _) = self
            .commit(Command::SetInstanceWeight {
                instance_id: r.instance_id,
                weight: r.weight,
            })
            .await?;
        Ok(tonic::Response::new(WriteReply { log_index }))
    }

    async fn key_status(
        &self,
        _req: Request<Empty>,
    ) -> Result<tonic::Response<pb::KeyStatusReply>, Status> {
        self.barrier().await?;
        let ring = &self.state.keyring;
        let keys = stored_keys(&self.state.cluster)
            .into_iter()
            .map(|k| pb::StoredKey {
                protection: format!("{:?}", ring.classify(&k.scheme)).to_lowercase(),
                kind: match k.target {
                    RewrapTarget::Certificate(_) => "certificate".into(),
                    RewrapTarget::AcmeAccount => "acme-account".into(),
                },
                name: k.name,
                key_encryption: k.scheme,
            })
            .collect();
        Ok(tonic::Response::new(pb::KeyStatusReply {
            current_key_id: ring.current_id().unwrap_or_default().to_string(),
            previous_key_ids: ring.previous_ids().into_iter().map(String::from).collect(),
            keys,
        }))
    }

    async fn rewrap_keys(
        &self,
        _req: Request<Empty>,
    ) -> Result<tonic::Response<pb::RewrapReply>, Status> {
        self.barrier().await?;
        let ring = &self.state.keyring;
        let mut reply = pb::RewrapReply::default();
        let mut list = Vec::new();
        for k in stored_keys(&self.state.cluster) {
            if ring.classify(&k.scheme) == crate::secrets::Protection::Current {
                reply.already_current += 1;
                continue;
            }
            let aad = match &k.target {
                RewrapTarget::Certificate(name) => crate::secrets::cert_aad(name),
                RewrapTarget::AcmeAccount => crate::secrets::account_aad(&k.name),
            };
            // A key this node cannot open stops the whole rewrap: re-sealing the others and
            // reporting success would leave the operator deleting a key that is still needed.
            let secret = ring.open(&k.scheme, &aad, &k.stored).map_err(|e| {
                Status::failed_precondition(format!("{} {}: {e}", k.kind(), k.name))
            })?;
            let (sealed, scheme) = ring
                .seal(&aad, &secret)
                .map_err(|e| Status::internal(e.to_string()))?;
            let new = match k.target {
                RewrapTarget::Certificate(_) => sealed,
                RewrapTarget::AcmeAccount => crate::acme::encode_sealed(&sealed).into_bytes(),
            };
            list.push(Rewrap {
                target: k.target,
                old: k.stored_raw,
                new,
                scheme,
            });
        }
        let wanted = list.len() as u64;
        for chunk in list.chunks(portcullis_raft::state::MAX_REWRAP_BATCH) {
            let (index, resp) = self.commit(Command::RewrapKeys(chunk.to_vec())).await?;
            reply.log_index = index;
            if let Response::Rewrapped(n) = resp {
                reply.rewrapped += n;
            }
        }
        reply.changed_meanwhile = wanted - reply.rewrapped;
        tracing::info!(
            rewrapped = reply.rewrapped,
            already_current = reply.already_current,
            changed_meanwhile = reply.changed_meanwhile,
            key_id = ring.current_id().unwrap_or_default(),
            "private keys re-sealed"
        );
        Ok(tonic::Response::new(reply))
    }

    async fn remove_instance(
        &self,
        req: Request<InstanceId>,
    ) -> Result<tonic::Response<WriteReply>, Status> {
        let instance_id = req.into_inner().instance_id;
        let (log_index, _) = self.commit(Command::RemoveInstance { instance_id }).await?;
        Ok(tonic::Response::new(WriteReply { log_index }))
    }

    async fn domain_add(
        &self,
        req: Request<pb::DomainAddRequest>,
    ) -> Result<tonic::Response<pb::Domain>, Status> {
        use crate::edge::custom_domain::normalize_domain;
        let r = req.into_inner();
        let name = normalize_domain(&r.name, &self.state.base_domains)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let port = u16::try_from(r.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                Status::invalid_argument(format!("invalid port {}: must be 1-65535", r.port))
            })?;
        // Checked here for a precise message; `apply` checks the app again.
        self.barrier().await?;
        {
            let applied = self.state.cluster.shared.read();
            let Some(app) = applied.state.apps.get(&r.app) else {
                return Err(Status::not_found(format!("app {:?} not found", r.app)));
            };
            if !app.ports.contains(&port) {
                return Err(Status::invalid_argument(format!(
                    "app {:?} does not declare port {port} (its ports: {:?})",
                    r.app, app.ports
                )));
            }
        }
        let domain = portcullis_raft::state::Domain {
            name,
            app: r.app,
            port,
            token: crate::edge::custom_domain::new_token(),
            verified: false,
            passthrough: r.passthrough,
        };
        let reply = domain_pb(&domain);
        self.commit(Command::AddDomain(domain)).await?;
        Ok(tonic::Response::new(reply))
    }

    async fn domain_verify(
        &self,
        req: Request<pb::DomainName>,
    ) -> Result<tonic::Response<pb::DomainVerifyReply>, Status> {
        let name = crate::edge::custom_domain::normalize_domain(&req.into_inner().name, &[])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.barrier().await?;
        // Copy what the checks need: the state lock must not be held across the lookups.
        let (claim, app_ports) = {
            let applied = self.state.cluster.shared.read();
            let Some(d) = applied.state.domains.get(&name) else {
                return Err(Status::not_found(format!(
                    "domain {name:?} not found; claim it with `portcullis domain add`"
                )));
            };
            let ports = applied
                .state
                .apps
                .get(&d.app)
                .map(|a| a.ports.clone())
                .unwrap_or_default();
            (d.clone(), ports)
        };
        let routed_port = crate::edge::custom_domain::verify(
            &self.state.dns,
            &crate::edge::custom_domain::Claim {
                domain: &claim.name,
                app: &claim.app,
                token: &claim.token,
                port: claim.port,
                app_ports: &app_ports,
            },
        )
        .await
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let (log_index, _) = self
            .commit(Command::VerifyDomainClaim {
                name,
                token: claim.token.clone(),
            })
            .await?;
        Ok(tonic::Response::new(pb::DomainVerifyReply {
            domain: Some(domain_pb(&portcullis_raft::state::Domain {
                verified: true,
                ..claim
            })),
            routed_port: u32::from(routed_port),
            log_index,
        }))
    }

    async fn domain_list(
        &self,
        _req: Request<Empty>,
    ) -> Result<tonic::Response<pb::DomainListReply>, Status> {
        self.barrier().await?;
        let applied = self.state.cluster.shared.read();
        let domains = applied.state.domains.values().map(domain_pb).collect();
        Ok(tonic::Response::new(pb::DomainListReply { domains }))
    }

    async fn domain_remove(
        &self,
        req: Request<pb::DomainName>,
    ) -> Result<tonic::Response<WriteReply>, Status> {
        // No base-domain check: a claim made before the bases changed must stay removable.
        let name = crate::edge::custom_domain::normalize_domain(&req.into_inner().name, &[])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (log_index, _) = self.commit(Command::RemoveDomain { name }).await?;
        Ok(tonic::Response::new(WriteReply { log_index }))
    }
}
