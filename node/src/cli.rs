//! The command line: argument definitions and the operator commands that talk to the admin API.
//! The JSON shapes printed here are a contract (ARCHITECTURE.md §8); scripts and tests parse them.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use portcullis_proto::admin::{
    self as pb, AddLearnerRequest, AppName, ClusterStatusRequest, CreateAppRequest, Empty,
    InitRequest, InstanceId, ListInstancesRequest, NodeIdRequest, PutCertificateRequest,
    RegisterInstanceRequest,
};
use serde::Serialize;

use crate::client::Target;

#[derive(Parser, Debug)]
#[command(
    name = "portcullis",
    version,
    about = "HTTPS gateway cluster for Confidential VMs"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Admin API address of any node.
    #[arg(long, global = true, env = "PORTCULLIS_ADMIN")]
    pub admin: Option<String>,
    /// File holding the admin bearer token.
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// The admin token itself (prefer --token-file; visible in the process list otherwise).
    #[arg(
        long = "token",
        global = true,
        env = "PORTCULLIS_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// A directory written by `portcullis up` (reads its cluster.json).
    #[arg(long, global = true)]
    pub cluster: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Global {
    pub fn target(&self) -> Target {
        Target {
            admin: self.admin.clone(),
            token_file: self.token_file.clone(),
            token: self.token.clone(),
            cluster: self.cluster.clone(),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Launch a local multi-region cluster with demo apps.
    Up(crate::launcher::UpArgs),
    /// Stop a cluster started by `up`.
    Down {
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Run one gateway node.
    Node {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a node config and exit (0 valid, 64 invalid).
    CheckConfig { file: PathBuf },
    /// Cluster membership and status.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Applications.
    #[command(subcommand)]
    App(AppCmd),
    /// TLS certificates served by the data plane.
    #[command(subcommand)]
    Cert(CertCmd),
    /// Custom domains, proven by DNS TXT records (docs/custom-domains.md).
    #[command(subcommand)]
    Domain(DomainCmd),
    /// The cluster data key that seals private keys at rest (docs/keys-at-rest.md).
    #[command(subcommand)]
    Secrets(SecretsCmd),
    /// CVM instances (an app's backends).
    #[command(subcommand)]
    Cvm(CvmCmd),
    /// Run the built-in demo HTTP service (a backend for the demo app and for tests).
    DemoApp(crate::demo::DemoArgs),
    /// Run inside a CVM: register with the cluster and expose local ports over WireGuard.
    CvmAgent(crate::tunnel::agent::AgentArgs),
}

#[derive(Subcommand, Debug)]
pub enum CertCmd {
    /// Add or replace a certificate (PEM chain and PEM private key).
    Import {
        /// The name it is stored under, e.g. `*.apps.example.com`; the certificate must cover it.
        #[arg(long)]
        name: String,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    List,
    /// Ask the ACME orderer to replace a certificate now (it keeps serving until then).
    Renew {
        /// The certificate's name, as `cert list` shows it.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum SecretsCmd {
    /// Create a new data key (base64 of 32 random bytes).
    GenKey {
        /// Write it to this new file (mode 0600) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Which data key protects each stored private key, as the answering node sees it.
    Status,
    /// Re-seal every stored private key with the answering node's current data key. Run it
    /// after every node holds the new key (see docs/keys-at-rest.md).
    Rewrap,
}

#[derive(Subcommand, Debug)]
pub enum DomainCmd {
    /// Claim a custom domain for an app; prints the token to publish in DNS.
    Add {
        /// The domain, e.g. `api.mycompany.com` (outside the base domains).
        domain: String,
        #[arg(long)]
        app: String,
        /// The app port it routes to unless `_dstack-app-address` names another.
        #[arg(long)]
        port: u16,
        /// Relay TLS to the app (end-to-end TLS into the CVM) instead of terminating it here.
        #[arg(long)]
        passthrough: bool,
    },
    /// Check the TXT records (from the node that receives the call) and mark the domain verified.
    Verify {
        domain: String,
    },
    List,
    /// Stop routing a custom domain and forget its claim.
    Remove {
        domain: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum CvmCmd {
    /// Issue a CVM credential (a client certificate from the cluster CA for one app), used by
    /// `portcullis cvm-agent` to register. Works offline from the PKI directory.
    Credential {
        /// The PKI directory holding `ca.pem` and `ca.key`.
        #[arg(long)]
        pki: PathBuf,
        #[arg(long)]
        app: String,
        /// Where to write `ca.pem`, `cert.pem` and `key.pem` (0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Register (or re-register) an instance of an app.
    Register {
        /// Instance id; also routable as `<instance-id>.<base>`.
        #[arg(long)]
        instance_id: String,
        #[arg(long)]
        app: String,
        #[arg(long)]
        region: String,
        /// Plain TCP backend: `host` (every app port on that host) or `host:port` (where the
        /// app's default port is served).
        #[arg(long)]
        backend: Option<String>,
        /// WireGuard public key (base64).
        #[arg(long, default_value = "")]
        wg_public_key: String,
    },
    List {
        /// Only this app's instances.
        #[arg(long)]
        app: Option<String>,
    },
    Show {
        instance_id: String,
    },
    Remove {
        instance_id: String,
    },
    /// Set an instance's load-balancing weight: relative share of new requests (round robin,
    /// least-conn, hash); 0 drains it, 1 is the default.
    Weight {
        instance_id: String,
        weight: u32,
    },
    /// Show the CVM tunnel address pool (range, addresses held, capacity), or change it.
    Pool {
        #[command(subcommand)]
        action: Option<PoolCmd>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    /// Replace the pool with an IPv4 or IPv6 range, e.g. `fd00:1::/64`. Refused while any
    /// instance holds a tunnel address.
    Set { cidr: String },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Create the cluster CA, node certificates and admin token (with --pki), or bootstrap Raft
    /// on the node behind --admin with the given founding members.
    Init {
        /// Write a new cluster CA, certificates for --node-id, and an admin token here.
        #[arg(long)]
        pki: Option<PathBuf>,
        /// Node ids to issue certificates for (with --pki).
        #[arg(long = "node-id", value_delimiter = ',')]
        node_ids: Vec<u64>,
        /// Founding voter as ID=RPC_ADDR[@REGION] (repeatable).
        #[arg(long = "member")]
        members: Vec<String>,
    },
    /// Issue a certificate for a joining node from the cluster CA in --pki.
    IssueCert {
        #[arg(long)]
        pki: PathBuf,
        #[arg(long)]
        node_id: u64,
    },
    /// Show leader, term and members.
    Status,
    /// Add a node as a non-voting learner.
    AddLearner {
        id: u64,
        rpc_addr: String,
        #[arg(long, default_value = "")]
        region: String,
        #[arg(long, default_value = "")]
        admin_addr: String,
        /// Return before the learner has caught up.
        #[arg(long)]
        no_wait: bool,
    },
    /// Make a learner a voter.
    Promote { id: u64 },
    /// Remove a voter or learner.
    Remove { id: u64 },
    /// Hand leadership to another voter.
    TransferLeader { id: u64 },
}

#[derive(Subcommand, Debug)]
pub enum AppCmd {
    /// Create an app. The first --port is its default port.
    Create {
        name: String,
        #[arg(long = "port", required = true)]
        ports: Vec<u32>,
        /// round-robin | least-conn | hash:ip | hash:header=NAME | hash:cookie=NAME | geo[+METHOD]
        #[arg(long, default_value = "round-robin")]
        lb: String,
    },
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Serialize)]
struct MemberOut {
    id: u64,
    region: String,
    voter: bool,
    rpc_addr: String,
    admin_addr: String,
}

fn members_out(ms: &[pb::Member]) -> Vec<MemberOut> {
    ms.iter()
        .map(|m| MemberOut {
            id: m.id,
            region: m.region.clone(),
            voter: m.voter,
            rpc_addr: m.rpc_addr.clone(),
            admin_addr: m.admin_addr.clone(),
        })
        .collect()
}

#[derive(Serialize)]
struct StatusOut {
    node_id: u64,
    leader_id: Option<u64>,
    term: u64,
    last_applied: u64,
    last_log_index: u64,
    state: String,
    region: String,
    snapshot_index: u64,
    purged_index: u64,
    members: Vec<MemberOut>,
    name_collisions: Vec<String>,
}

#[derive(Serialize)]
struct InstanceOut {
    instance_id: String,
    app: String,
    region: String,
    tunnel_ip: String,
    wg_public_key: String,
    backend_addr: String,
    weight: u32,
}

fn instance_out(i: pb::Instance) -> InstanceOut {
    InstanceOut {
        instance_id: i.instance_id,
        app: i.app,
        region: i.region,
        tunnel_ip: i.tunnel_ip,
        wg_public_key: i.wg_public_key,
        backend_addr: i.backend_addr,
        weight: i.weight,
    }
}

#[derive(Serialize)]
struct CertOut {
    name: String,
    names: Vec<String>,
    not_after: u64,
    issuer: String,
    key_encryption: String,
}

fn cert_out(c: pb::CertificateInfo) -> CertOut {
    CertOut {
        name: c.name,
        names: c.names,
        not_after: c.not_after,
        issuer: c.issuer,
        key_encryption: c.key_encryption,
    }
}

#[derive(Serialize)]
struct AppOut {
    name: String,
    ports: Vec<u32>,
    lb: String,
    revision: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    instances: Option<Vec<InstanceOut>>,
}

fn app_out(a: pb::App, with_instances: bool) -> AppOut {
    AppOut {
        name: a.name,
        ports: a.ports,
        lb: a.lb,
        revision: a.revision,
        instances: with_instances.then(|| a.instances.into_iter().map(instance_out).collect()),
    }
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    use std::io::Write;
    let text = serde_json::to_string_pretty(v)?;
    match writeln!(std::io::stdout().lock(), "{text}") {
        // `portcullis … --json | head` closes the pipe early; that is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// Turns a gRPC status into an error message an operator can act on.
fn rpc<T>(r: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    match r {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => bail!("{} ({:?})", s.message(), s.code()),
    }
}

fn print_membership(g: &Global, r: pb::MembershipReply, what: &str) -> anyhow::Result<()> {
    if g.json {
        #[derive(Serialize)]
        struct Out {
            log_index: u64,
            leader_id: u64,
            members: Vec<MemberOut>,
        }
        return print_json(&Out {
            log_index: r.log_index,
            leader_id: r.leader_id,
            members: members_out(&r.members),
        });
    }
    println!("{what} (log index {}); leader {}", r.log_index, r.leader_id);
    for m in r.members {
        println!(
            "  {:>4}  {:<8} {:<12} {}",
            m.id,
            if m.voter { "voter" } else { "learner" },
            m.region,
            m.rpc_addr
        );
    }
    Ok(())
}

fn parse_member(s: &str) -> anyhow::Result<pb::Member> {
    let (id, rest) = s
        .split_once('=')
        .with_context(|| format!("member {s:?}: expected ID=RPC_ADDR[@REGION]"))?;
    let id: u64 = id
        .parse()
        .with_context(|| format!("member {s:?}: id {id:?} is not a number"))?;
    let (addr, region) = rest.split_once('@').unwrap_or((rest, ""));
    Ok(pb::Member {
        id,
        region: region.into(),
        voter: true,
        rpc_addr: addr.into(),
        admin_addr: String::new(),
    })
}

pub async fn cluster(g: &Global, cmd: ClusterCmd) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Init {
            pki: Some(dir),
            node_ids,
            ..
        } => {
            crate::pki::init(&dir, &node_ids)?;
            println!(
                "wrote cluster CA, admin token and {} node certificate(s) to {}",
                node_ids.len(),
                dir.display()
            );
            println!(
                "keep {} offline; nodes only need ca.pem and their own node-<id> files",
                dir.join("ca.key").display()
            );
            Ok(())
        }
        ClusterCmd::Init {
            pki: None, members, ..
        } => {
            let members = members
                .iter()
                .map(|m| parse_member(m))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut c = g.target().connect().await?;
            let r = rpc(c.init(InitRequest { members }).await)?;
            print_membership(g, r, "initialized")
        }
        ClusterCmd::IssueCert { pki, node_id } => {
            let dir = crate::pki::issue(&pki, node_id)?;
            println!("issued certificate for node {node_id} in {}", dir.display());
            Ok(())
        }
        ClusterCmd::Status => {
            let mut c = g.target().connect().await?;
            let s = rpc(c.cluster_status(ClusterStatusRequest {}).await)?;
            let out = StatusOut {
                node_id: s.node_id,
                leader_id: (s.leader_id != 0).then_some(s.leader_id),
                term: s.term,
                last_applied: s.last_applied,
                last_log_index: s.last_log_index,
                state: s.state,
                region: s.region,
                snapshot_index: s.snapshot_index,
                purged_index: s.purged_index,
                members: members_out(&s.members),
                name_collisions: s.name_collisions,
            };
            if g.json {
                return print_json(&out);
            }
            let leader = out
                .leader_id
                .map_or_else(|| "none known".to_string(), |l| l.to_string());
            println!(
                "node {} ({}, {}), term {}, leader {leader}",
                out.node_id, out.region, out.state, out.term
            );
            println!(
                "last applied {}, last log {}",
                out.last_applied, out.last_log_index
            );
            for m in out.members {
                println!(
                    "  {:>4}  {:<8} {:<12} {}",
                    m.id,
                    if m.voter { "voter" } else { "learner" },
                    m.region,
                    m.rpc_addr
                );
            }
            if !out.name_collisions.is_empty() {
                println!(
                    "name collisions ({}): the app route is served; remove the instances (portcullis cvm remove)",
                    out.name_collisions.len()
                );
                for c in &out.name_collisions {
                    println!("  {c}");
                }
            }
            Ok(())
        }
        ClusterCmd::AddLearner {
            id,
            rpc_addr,
            region,
            admin_addr,
            no_wait,
        } => {
            let mut c = g.target().connect().await?;
            let r = rpc(c
                .add_learner(AddLearnerRequest {
                    id,
                    rpc_addr,
                    region,
                    admin_addr,
                    blocking: !no_wait,
                })
                .await)?;
            print_membership(g, r, &format!("added learner {id}"))
        }
        ClusterCmd::Promote { id } => {
            let mut c = g.target().connect().await?;
            let r = rpc(c.promote(NodeIdRequest { id }).await)?;
            print_membership(g, r, &format!("promoted {id}"))
        }
        ClusterCmd::Remove { id } => {
            let mut c = g.target().connect().await?;
            let r = rpc(c.remove(NodeIdRequest { id }).await)?;
            print_membership(g, r, &format!("removed {id}"))
        }
        ClusterCmd::TransferLeader { id } => {
            let mut c = g.target().connect().await?;
            let r = rpc(c.transfer_leader(NodeIdRequest { id }).await)?;
            print_membership(g, r, &format!("leadership moved to {id}"))
        }
    }
}

pub async fn app(g: &Global, cmd: AppCmd) -> anyhow::Result<()> {
    let mut c = g.target().connect().await?;
    match cmd {
        AppCmd::Create { name, ports, lb } => {
            let a = rpc(c.create_app(CreateAppRequest { name, ports, lb }).await)?;
            if g.json {
                return print_json(&app_out(a, false));
            }
            println!(
                "created app {} (ports {:?}, lb {}, revision {})",
                a.name, a.ports, a.lb, a.revision
            );
        }
        AppCmd::List => {
            let r = rpc(c.list_apps(Empty {}).await)?;
            let apps: Vec<AppOut> = r.apps.into_iter().map(|a| app_out(a, false)).collect();
            if g.json {
                return print_json(&apps);
            }
            for a in apps {
                println!("{:<24} ports {:?}  lb {}", a.name, a.ports, a.lb);
            }
        }
        AppCmd::Show { name } => {
            let a = app_out(rpc(c.get_app(AppName { name }).await)?, true);
            if g.json {
                return print_json(&a);
            }
            println!(
                "{}: ports {:?}, lb {}, revision {}",
                a.name, a.ports, a.lb, a.revision
            );
            let instances = a.instances.unwrap_or_default();
            let ip_width = instances
                .iter()
                .map(|i| i.tunnel_ip.len())
                .fold(15, usize::max);
            for i in instances {
                println!(
                    "  {:<20} {:<10} {:<ip_width$} {}",
                    i.instance_id, i.region, i.tunnel_ip, i.backend_addr
                );
            }
        }
        AppCmd::Delete { name } => {
            let r = rpc(c.delete_app(AppName { name: name.clone() }).await)?;
            if g.json {
                return print_json(
                    &serde_json::json!({ "deleted": name, "log_index": r.log_index }),
                );
            }
            println!("deleted app {name}");
        }
    }
    Ok(())
}

pub async fn cert(g: &Global, cmd: CertCmd) -> anyhow::Result<()> {
    let mut c = g.target().connect().await?;
    match cmd {
        CertCmd::Import { name, cert, key } => {
            let chain_pem = std::fs::read_to_string(&cert)
                .with_context(|| format!("read {}", cert.display()))?;
            let key_pem =
                std::fs::read_to_string(&key).with_context(|| format!("read {}", key.display()))?;
            let info = cert_out(rpc(c
                .put_certificate(PutCertificateRequest {
                    name,
                    chain_pem,
                    key_pem,
                })
                .await)?);
            if g.json {
                return print_json(&info);
            }
            println!(
                "imported certificate {} (names {:?}, expires {})",
                info.name, info.names, info.not_after
            );
        }
        CertCmd::List => {
            let certs: Vec<CertOut> = rpc(c.list_certificates(Empty {}).await)?
                .certificates
                .into_iter()
                .map(cert_out)
                .collect();
            if g.json {
                return print_json(&certs);
            }
            for cert in certs {
                println!(
                    "{:<32} expires {}  names {:?}",
                    cert.name, cert.not_after, cert.names
                );
            }
        }
        CertCmd::Renew { name } => {
            let r = rpc(c
                .renew_certificate(portcullis_proto::admin::CertificateName { name: name.clone() })
                .await)?;
            if g.json {
                return print_json(&serde_json::json!({ "name": name, "log_index": r.log_index }));
            }
            println!("renewal of {name} requested; the ACME orderer replaces it at its next pass");
        }
    }
    Ok(())
}

pub async fn secrets(g: &Global, cmd: SecretsCmd) -> anyhow::Result<()> {
    if let SecretsCmd::GenKey { out } = &cmd {
        let key = zeroize::Zeroizing::new(crate::secrets::generate_key()?);
        match out {
            Some(path) => {
                if path.exists() {
                    bail!(
                        "{} exists; refusing to overwrite a data key",
                        path.display()
                    );
                }
                crate::pki::write_private(path, format!("{}\n", key.as_str()).as_bytes())?;
                eprintln!("wrote a new data key to {}", path.display());
            }
            None => println!("{}", key.as_str()),
        }
        return Ok(());
    }
    let mut c = g.target().connect().await?;
    match cmd {
        SecretsCmd::GenKey { .. } => {}
        SecretsCmd::Status => {
            let r = rpc(c.key_status(Empty {}).await)?;
            if g.json {
                let keys: Vec<_> = r
                    .keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({
                            "kind": k.kind,
                            "name": k.name,
                            "key_encryption": k.key_encryption,
                            "protection": k.protection,
                        })
                    })
                    .collect();
                return print_json(&serde_json::json!({
                    "current_key_id": r.current_key_id,
                    "previous_key_ids": r.previous_key_ids,
                    "keys": keys,
                }));
            }
            println!(
                "current data key {} (previous: {})",
                r.current_key_id,
                if r.previous_key_ids.is_empty() {
                    "none".to_string()
                } else {
                    r.previous_key_ids.join(", ")
                }
            );
            for k in &r.keys {
                println!(
                    "{:<13} {:<40} {:<32} {}",
                    k.kind, k.name, k.key_encryption, k.protection
                );
            }
        }
        SecretsCmd::Rewrap => {
            let r = rpc(c.rewrap_keys(Empty {}).await)?;
            if g.json {
                return print_json(&serde_json::json!({
                    "rewrapped": r.rewrapped,
                    "already_current": r.already_current,
                    "changed_meanwhile": r.changed_meanwhile,
                    "log_index": r.log_index,
                }));
            }
            println!(
                "re-sealed {} key(s); {} already current; {} changed meanwhile (run again to check)",
                r.rewrapped, r.already_current, r.changed_meanwhile
            );
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct DomainOut {
    name: String,
    app: String,
    port: u32,
    token: String,
    verified: bool,
    passthrough: bool,
}

fn domain_out(d: pb::Domain) -> DomainOut {
    DomainOut {
        name: d.name,
        app: d.app,
        port: d.port,
        token: d.token,
        verified: d.verified,
        passthrough: d.passthrough,
    }
}

pub async fn domain(g: &Global, cmd: DomainCmd) -> anyhow::Result<()> {
    let mut c = g.target().connect().await?;
    match cmd {
        DomainCmd::Add {
            domain,
            app,
            port,
            passthrough,
        } => {
            let d = domain_out(rpc(c
                .domain_add(pb::DomainAddRequest {
                    name: domain,
                    app,
                    port: u32::from(port),
                    passthrough,
                })
                .await)?);
            if g.json {
                return print_json(&d);
            }
            println!("claimed {} for app {} port {}", d.name, d.app, d.port);
            println!(
                "create these DNS records, then run `portcullis domain verify {}`:",
                d.name
            );
            println!(
                "  {} TXT \"{}\"",
                crate::edge::custom_domain::challenge_name(&d.name),
                d.token
            );
            println!(
                "  {} TXT \"{}:{}\"",
                crate::edge::custom_domain::app_address_name(&d.name),
                d.app,
                d.port
            );
            println!("  {} CNAME (or A/AAAA) pointing at the gateways", d.name);
        }
        DomainCmd::Verify { domain } => {
            let r = rpc(c.domain_verify(pb::DomainName { name: domain }).await)?;
            let d = r.domain.map(domain_out);
            if g.json {
                return print_json(&serde_json::json!({
                    "domain": d,
                    "routed_port": r.routed_port,
                    "log_index": r.log_index,
                }));
            }
            if let Some(d) = d {
                println!(
                    "verified {}: routes to app {} port {}",
                    d.name, d.app, r.routed_port
                );
            }
        }
        DomainCmd::List => {
            let list: Vec<DomainOut> = rpc(c.domain_list(Empty {}).await)?
                .domains
                .into_iter()
                .map(domain_out)
                .collect();
            if g.json {
                return print_json(&list);
            }
            for d in list {
                println!(
                    "{:<40} app {:<16} port {:<5} {:<10} {}{}",
                    d.name,
                    d.app,
                    d.port,
                    if d.verified { "verified" } else { "unverified" },
                    d.token,
                    if d.passthrough { " passthrough" } else { "" }
                );
            }
        }
        DomainCmd::Remove { domain } => {
            let r = rpc(c
                .domain_remove(pb::DomainName {
                    name: domain.clone(),
                })
                .await)?;
            if g.json {
                return print_json(
                    &serde_json::json!({ "removed": domain, "log_index": r.log_index }),
                );
            }
            println!("removed {domain}");
        }
    }
    Ok(())
}

pub async fn cvm(g: &Global, cmd: CvmCmd) -> anyhow::Result<()> {
    if let CvmCmd::Credential { pki, app, out } = &cmd {
        crate::tunnel::agent::issue_credential(pki, app, out)?;
        println!(
            "issued a CVM credential for app {app} in {} (cert.pem, key.pem, ca.pem)",
            out.display()
        );
        return Ok(());
    }
    let mut c = g.target().connect().await?;
    match cmd {
        // Handled above, before connecting: it needs no cluster.
        CvmCmd::Credential { .. } => {}
        CvmCmd::Register {
            instance_id,
            app,
            region,
            backend,
            wg_public_key,
        } => {
            let req = RegisterInstanceRequest {
                instance_id,
                app,
                region,
                wg_public_key,
                backend_addr: backend.unwrap_or_default(),
            };
            let i = instance_out(rpc(c.register_instance(req).await)?);
            if g.json {
                return print_json(&i);
            }
            println!(
                "registered {} (app {}, region {}, tunnel ip {})",
                i.instance_id, i.app, i.region, i.tunnel_ip
            );
        }
        CvmCmd::List { app } => {
            let r = rpc(c
                .list_instances(ListInstancesRequest {
                    app: app.unwrap_or_default(),
                })
                .await)?;
            let list: Vec<InstanceOut> = r.instances.into_iter().map(instance_out).collect();
            if g.json {
                return print_json(&list);
            }
            // IPv6 tunnel addresses are up to 39 characters; IPv4 lists keep their width.
            let ip_width = list.iter().map(|i| i.tunnel_ip.len()).fold(15, usize::max);
            for i in list {
                println!(
                    "{:<24} {:<16} {:<10} {:<ip_width$} {}",
                    i.instance_id, i.app, i.region, i.tunnel_ip, i.backend_addr
                );
            }
        }
        CvmCmd::Show { instance_id } => {
            let i = instance_out(rpc(c.get_instance(InstanceId { instance_id }).await)?);
            if g.json {
                return print_json(&i);
            }
            println!(
                "{}: app {}, region {}, tunnel ip {}, backend {}",
                i.instance_id, i.app, i.region, i.tunnel_ip, i.backend_addr
            );
        }
        CvmCmd::Remove { instance_id } => {
            let r = rpc(c
                .remove_instance(InstanceId {
                    instance_id: instance_id.clone(),
                })
                .await)?;
            if g.json {
                return print_json(
                    &serde_json::json!({ "removed": instance_id, "log_index": r.log_index }),
                );
            }
            println!("removed {instance_id}");
        }
        CvmCmd::Weight {
            instance_id,
            weight,
        } => {
            let r = rpc(c
                .set_instance_weight(pb::InstanceWeightRequest {
                    instance_id: instance_id.clone(),
                    weight,
                })
                .await)?;
            if g.json {
                return print_json(&serde_json::json!({
                    "instance_id": instance_id, "weight": weight, "log_index": r.log_index
                }));
            }
            println!("{instance_id}: weight {weight}");
        }
        CvmCmd::Pool { action } => {
            let r = match action {
                None => rpc(c.get_tunnel_pool(Empty {}).await)?,
                Some(PoolCmd::Set { cidr }) => {
                    rpc(c.set_tunnel_pool(pb::SetTunnelPoolRequest { cidr }).await)?
                }
            };
            if g.json {
                return print_json(&serde_json::json!({
                    "cidr": r.cidr, "allocated": r.allocated, "capacity": r.capacity,
                    "log_index": r.log_index
                }));
            }
            println!(
                "tunnel pool {}: {} allocated, capacity {}",
                r.cidr, r.allocated, r.capacity
            );
        }
    }
    Ok(())
}
