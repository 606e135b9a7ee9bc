//! The command line's shape: every command, subcommand and flag (clap derive types). What the
//! commands do lives in the files beside this one.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::client::Target;

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
    Up(UpArgs),
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
    /// Web application firewall: per-app policy, testing a request, rule reloads (docs/waf.md).
    #[command(subcommand)]
    Waf(WafCmd),
    /// Run the built-in demo HTTP service (a backend for the demo app and for tests).
    DemoApp(super::demo::DemoArgs),
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

/// Whose policy: an app's, or the cluster default.
#[derive(clap::Args, Debug, Clone)]
pub struct WafTarget {
    /// The app.
    pub app: Option<String>,
    /// The cluster default, for apps without a policy of their own.
    #[arg(long, conflicts_with = "app")]
    pub default: bool,
}

/// Policy fields `waf set` changes; the rest keep their current values.
#[derive(clap::Args, Debug, Clone)]
pub struct WafPolicyArgs {
    /// off, detect (log and forward) or block (403).
    #[arg(long)]
    pub mode: Option<String>,
    /// CRS paranoia level, 1-4.
    #[arg(long)]
    pub paranoia: Option<u8>,
    /// Inbound anomaly score threshold (CRS default 5: one critical match).
    #[arg(long)]
    pub inbound_threshold: Option<u32>,
    /// Outbound (response) anomaly score threshold (CRS default 4).
    #[arg(long)]
    pub outbound_threshold: Option<u32>,
    /// Switch a rule off: RULE_ID, or RULE_ID:/path/prefix for requests under a path. Repeat.
    #[arg(long)]
    pub exclude: Vec<String>,
    /// Drop the current exclusions first.
    #[arg(long)]
    pub clear_exclusions: bool,
    /// Request body bytes inspected.
    #[arg(long)]
    pub body_limit: Option<u64>,
    /// A larger body: inspect (the first part) or refuse (413).
    #[arg(long)]
    pub over_limit: Option<String>,
    /// Inspect responses too (CRS 95x rules).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub response_inspection: Option<bool>,
    /// Evaluation budget per request, in milliseconds.
    #[arg(long)]
    pub budget_ms: Option<u32>,
    /// Past the budget: open (forward uninspected) or closed (503).
    #[arg(long)]
    pub on_budget: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum WafCmd {
    /// Change an app's policy (or the cluster default's): only the flags given.
    Set {
        #[command(flatten)]
        target: WafTarget,
        #[command(flatten)]
        policy: WafPolicyArgs,
    },
    /// Remove an app's own policy (it falls back to the cluster default).
    Unset {
        #[command(flatten)]
        target: WafTarget,
    },
    /// The policy that applies to an app, and where it comes from.
    Show {
        #[command(flatten)]
        target: WafTarget,
    },
    /// Run one raw HTTP/1.1 request through a node's engine under the app's policy.
    Test {
        app: String,
        /// File holding the request (request line, headers, empty line, body); `-` for stdin.
        #[arg(long)]
        request: PathBuf,
    },
    /// Reload the rule files: on every node of --cluster, or on the --admin node.
    Reload,
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

#[derive(Args, Debug)]
pub struct UpArgs {
    /// How many gateway nodes to start.
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Regions, assigned to nodes in turn.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "us-east,eu-west,ap-south"
    )]
    pub regions: Vec<String>,
    /// Where configs, keys, data and logs go.
    #[arg(long, default_value = ".portcullis")]
    pub state_dir: PathBuf,
    /// Base domain for the demo apps.
    #[arg(long, default_value = "portcullis.localhost")]
    pub base_domain: String,
    /// Take a snapshot every N entries and keep no log behind it (exercises snapshot transfer).
    #[arg(long, hide = true)]
    pub snapshot_every: Option<u64>,
    /// `wg.expire_after_secs` for every node (exercises registration expiry).
    #[arg(long, hide = true)]
    pub wg_expire_after: Option<u64>,
    /// `wg.max_instances_per_app` for every node (exercises the per-app cap).
    #[arg(long, hide = true)]
    pub wg_max_instances_per_app: Option<u32>,
    /// `wg.registration_rate_per_app` for every node (exercises the registration rate).
    #[arg(long, hide = true)]
    pub wg_registration_rate_per_app: Option<f64>,
    /// `wg.registration_burst_per_app` for every node.
    #[arg(long, hide = true)]
    pub wg_registration_burst_per_app: Option<u32>,
    /// An OWASP CRS release directory (`waf.crs_dir`) for every node; apps then turn the WAF on
    /// with `portcullis waf set APP --mode block` (docs/waf.md).
    #[arg(long)]
    pub waf_crs_dir: Option<PathBuf>,
    /// `waf.extra_conf` files for every node (the CRS regression corpus's test settings).
    #[arg(long, hide = true)]
    pub waf_extra_conf: Vec<PathBuf>,
    /// `waf.audit_all` for every node: an audit line for every inspected request.
    #[arg(long, hide = true)]
    pub waf_audit_all: bool,
    /// `edge.max_request_body_bytes` for every node (the tunnel soak uploads 256 MiB bodies).
    #[arg(long, hide = true)]
    pub edge_max_request_body_bytes: Option<u64>,
    /// `dns.nameservers` for every node (`ip:port`): custom-domain TXT lookups go to this
    /// server instead of the system resolver (tests run their own authoritative server).
    #[arg(long, hide = true, value_delimiter = ',')]
    pub dns_server: Vec<SocketAddr>,
    /// Return once the cluster is up and leave the nodes running.
    #[arg(long)]
    pub detach: bool,
    /// Accept PROXY protocol headers (and X-Forwarded-For) from these CIDRs, e.g. 127.0.0.1,
    /// so tests can present clients from anywhere in the world.
    #[arg(long, hide = true, value_delimiter = ',')]
    pub proxy_protocol_from: Vec<String>,
    /// `edge.workers` for every node (benchmarks compare worker threads with the shared
    /// runtime).
    #[arg(long, hide = true)]
    pub edge_workers: Option<usize>,
    /// `edge.pin_workers` for every node (benchmarks compare pinned with unpinned workers).
    #[arg(long, hide = true)]
    pub edge_pin_workers: Option<bool>,
}
