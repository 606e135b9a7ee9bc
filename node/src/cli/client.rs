//! Finding the cluster and talking to its admin API, for the CLI and the launcher.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use portcullis_proto::admin::admin_client::AdminClient;
use serde::{Deserialize, Serialize};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

/// `cluster.json`, written by `portcullis up`: how scripts find and stop the local nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterFile {
    pub token_file: PathBuf,
    pub ca_cert: PathBuf,
    #[serde(default)]
    pub base_domain: String,
    pub nodes: Vec<ClusterFileNode>,
    /// Demo-app processes started by `up` (one per region); `down` stops them too.
    #[serde(default)]
    pub demo_apps: Vec<DemoProcess>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoProcess {
    pub instance_id: String,
    pub region: String,
    pub addr: String,
    pub pid: u32,
    /// The `cvm-agent` that puts this demo app behind the WireGuard tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterFileNode {
    pub id: u64,
    pub region: String,
    pub admin_addr: String,
    pub https_addr: String,
    pub http_addr: String,
    pub rpc_addr: String,
    pub pid: u32,
    pub config: PathBuf,
}

impl ClusterFile {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("cluster.json")
    }

    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let p = Self::path(dir);
        let text = std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parse {}", p.display()))
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let p = Self::path(dir);
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &p).with_context(|| format!("write {}", p.display()))?;
        Ok(())
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Admin = AdminClient<InterceptedService<Channel, Bearer>>;

/// Where the CLI should send its calls.
#[derive(Debug, Clone)]
pub struct Target {
    pub admin: Option<String>,
    pub token_file: Option<PathBuf>,
    pub token: Option<String>,
    pub cluster: Option<PathBuf>,
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("read token file {}", path.display()))?
        .trim()
        .to_string())
}

pub async fn connect_addr(addr: &str, token: &str) -> anyhow::Result<Admin> {
    let value: MetadataValue<Ascii> = format!("Bearer {token}")
        .parse()
        .context("the admin token contains characters not allowed in a header")?;
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("bad admin address {addr:?}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("cannot reach the admin API at {addr}"))?;
    Ok(AdminClient::with_interceptor(channel, Bearer(value)))
}

impl Target {
    /// Connects to the explicit `--admin` address, or to the first answering node of `--cluster`,
    /// or to 127.0.0.1:9080.
    pub async fn connect(&self) -> anyhow::Result<Admin> {
        let (addrs, file_token) = match (&self.admin, &self.cluster) {
            (Some(a), _) => (vec![a.clone()], None),
            (None, Some(dir)) => {
                let cf = ClusterFile::load(dir)?;
                (
                    cf.nodes.iter().map(|n| n.admin_addr.clone()).collect(),
                    Some(cf.token_file),
                )
            }
            (None, None) => (vec!["127.0.0.1:9080".to_string()], None),
        };
        let token = match (&self.token, &self.token_file, file_token) {
            (Some(t), _, _) => t.clone(),
            (None, Some(f), _) => read_token(f)?,
            (None, None, Some(f)) => read_token(&f)?,
            (None, None, None) => {
                bail!("no admin token: pass --token-file, set PORTCULLIS_ADMIN_TOKEN, or use --cluster DIR")
            }
        };
        let mut last = None;
        for a in &addrs {
            match connect_addr(a, &token).await {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("the cluster file lists no nodes")))
    }
}
