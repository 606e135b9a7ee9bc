//! The `portcullis` node processes of a chaos run, each inside its own network namespace, and
//! admin API clients to reach them from the harness.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use portcullis_proto::admin::admin_client::AdminClient;
use portcullis_proto::admin::{
    AddLearnerRequest, ClusterStatusReply, ClusterStatusRequest, InitRequest, Member, NodeIdRequest,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use super::scenario::Scenario;
use super::topology::{node_ip, node_ns, wan_ip, GATEWAY_HTTPS_PORT};

pub const RPC_PORT: u16 = 7000;
pub const ADMIN_PORT: u16 = 9080;

/// A gRPC admin client for one node, with the bearer token attached per request.
#[derive(Clone)]
pub struct Admin {
    client: AdminClient<Channel>,
    token: MetadataValue<Ascii>,
}

impl Admin {
    /// A lazily connecting client: the first call dials, and calls after a restart redial.
    pub fn new(addr: &str, token: &str) -> anyhow::Result<Admin> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .with_context(|| format!("bad admin address {addr}"))?
            .connect_timeout(Duration::from_millis(500))
            .connect_lazy();
        Ok(Admin {
            client: AdminClient::new(channel),
            token: format!("Bearer {token}")
                .parse()
                .context("admin token is not a valid header value")?,
        })
    }

    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert("authorization", self.token.clone());
        r
    }

    pub fn raw(&self) -> AdminClient<Channel> {
        self.client.clone()
    }

    /// Cluster status, or `None` if the node does not answer within `timeout`.
    pub async fn status(&self, timeout: Duration) -> Option<ClusterStatusReply> {
        let mut c = self.raw();
        let r = self.request(ClusterStatusRequest {});
        match tokio::time::timeout(timeout, c.cluster_status(r)).await {
            Ok(Ok(s)) => Some(s.into_inner()),
            _ => None,
        }
    }
}

/// One node process.
pub struct Node {
    pub id: u64,
    pub region: String,
    pub config: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    pub paused: bool,
    pub admin: Admin,
}

impl Node {
    pub fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    pub fn member(&self) -> Member {
        Member {
            id: self.id,
            region: self.region.clone(),
            voter: true,
            // Raft traffic crosses the emulated WAN (link.rs); admin stays on the LAN.
            rpc_addr: format!("{}:{RPC_PORT}", wan_ip(self.id)),
            admin_addr: format!("{}:{ADMIN_PORT}", node_ip(self.id)),
        }
    }
}

/// All node processes; killed on drop.
pub struct Cluster {
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub nodes: Vec<Node>,
    /// tmpfs data dirs mounted for this run, unmounted on drop.
    pub mounts: Vec<PathBuf>,
}

impl Cluster {
    /// Writes the PKI and node configs into `dir` and starts every node in its namespace.
    pub fn start(dir: &Path, bin: &Path, sc: &Scenario) -> anyhow::Result<Cluster> {
        let pki = dir.join("pki");
        let ids: Vec<String> = (1..=sc.nodes).map(|i| i.to_string()).collect();
        let out = Command::new(bin)
            .args(["cluster", "init", "--pki"])
            .arg(&pki)
            .args(["--node-id", &ids.join(",")])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "portcullis cluster init --pki failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let token = std::fs::read_to_string(pki.join("admin.token"))
            .context("read admin.token")?
            .trim()
            .to_string();
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            bin: bin.to_path_buf(),
            nodes: Vec::new(),
            mounts: Vec::new(),
        };
        for id in 1..=sc.nodes {
            let region = sc.regions[((id - 1) as usize) % sc.regions.len()].clone();
            let ndir = dir.join(format!("node-{id}"));
            std::fs::create_dir_all(&ndir)?;
            let ip = node_ip(id);
            let wan = wan_ip(id);
            let t = &sc.timing;
            let config = format!(
                r#"# Written by portcullis-chaos.
node_id = {id}
region = "{region}"
data_dir = "data"

[cluster]
# The WAN address (a TUN device the harness forwards with delay/loss, see link.rs).
listen = "{wan}:{RPC_PORT}"
advertise = "{wan}:{RPC_PORT}"
ca_cert = "../pki/ca.pem"
cert = "../pki/node-{id}/cert.pem"
key = "../pki/node-{id}/key.pem"
heartbeat_ms = {hb}
election_timeout_min_ms = {emin}
election_timeout_max_ms = {emax}
connect_timeout_ms = 500

[admin]
listen = "{ip}:{ADMIN_PORT}"
token_file = "../pki/admin.token"

[secrets]
data_key_file = "../pki/data.key"

[edge]
https_listen = "{ip}:{GATEWAY_HTTPS_PORT}"
http_listen = "{ip}:8080"
base_domains = ["chaos.portcullis.test"]

[debug]
# TEST ONLY, from the scenario's [debug] section.
unsafe_stale_reads = {stale}
"#,
                hb = t.heartbeat_ms,
                emin = t.election_timeout_min_ms,
                emax = t.election_timeout_max_ms,
                stale = sc.debug.unsafe_stale_reads,
            );
            if sc.disk.tmpfs_mb > 0 {
                let data = ndir.join("data");
                std::fs::create_dir_all(&data)?;
                let data_s = data.display().to_string();
                super::topology::sh(&[
                    "mount",
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={}m", sc.disk.tmpfs_mb),
                    "tmpfs",
                    &data_s,
                ])?;
                cluster.mounts.push(data);
            }
            let config_path = ndir.join("config.toml");
            std::fs::write(&config_path, config)?;
            let admin = Admin::new(&format!("{ip}:{ADMIN_PORT}"), &token)?;
            cluster.nodes.push(Node {
                id,
                region,
                config: config_path,
                log: ndir.join("node.log"),
                child: None,
                paused: false,
                admin,
            });
        }
        for id in 1..=sc.nodes {
            cluster.spawn(id)?;
        }
        Ok(cluster)
    }

    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[(id - 1) as usize]
    }

    fn node_mut(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Starts node `id` (again) inside its namespace, appending to its log.
    pub fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        let bin = self.bin.clone();
        let n = self.node_mut(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .with_context(|| format!("open {}", n.log.display()))?;
        // `ip netns exec` execs the binary, so the child's pid is the node's pid and signals
        // reach the node itself.
        let child = Command::new("ip")
            .args(["netns", "exec", &node_ns(id)])
            .arg(&bin)
            .args(["node", "--config"])
            .arg(&n.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Own process group: Ctrl-C reaches the harness only, which then cleans up.
            .process_group(0)
            .spawn()
            .context("start node")?;
        n.child = Some(child);
        n.paused = false;
        Ok(())
    }

    /// SIGKILLs node `id` and reaps it.
    pub fn kill(&mut self, id: u64) {
        let n = self.node_mut(id);
        if let Some(mut c) = n.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        n.paused = false;
    }

    pub fn pause(&mut self, id: u64) -> anyhow::Result<()> {
        let n = self.node_mut(id);
        if let Some(pid) = n.pid() {
            kill(pid, Signal::SIGSTOP).context("SIGSTOP")?;
            n.paused = true;
        }
        Ok(())
    }

    pub fn resume(&mut self, id: u64) -> anyhow::Result<()> {
        let n = self.node_mut(id);
        if let Some(pid) = n.pid() {
            kill(pid, Signal::SIGCONT).context("SIGCONT")?;
        }
        n.paused = false;
        Ok(())
    }

    /// Whether node `id`'s process has exited on its own (a crash, not a fault we injected).
    pub fn exited(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        self.node_mut(id)
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits until every node's admin API answers, then bootstraps Raft with all nodes as
    /// voters and waits until every node knows the leader.
    pub async fn bootstrap(&mut self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        for id in self.ids() {
            while self
                .node(id)
                .admin
                .status(Duration::from_millis(500))
                .await
                .is_none()
            {
                if let Some(st) = self.exited(id) {
                    bail!(
                        "node {id} exited during start-up ({st}); see {}",
                        self.node(id).log.display()
                    );
                }
                if Instant::now() > deadline {
                    bail!(
                        "node {id} did not open its admin API; see {}",
                        self.node(id).log.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let members = self.nodes.iter().map(Node::member).collect();
        let a = &self.nodes[0].admin;
        a.raw()
            .init(a.request(InitRequest { members }))
            .await
            .map_err(|s| anyhow::anyhow!("init: {}", s.message()))?;
        let ids = self.ids();
        loop {
            if let Some(l) = self.agreed_leader(&ids).await {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!("the cluster did not elect a leader within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The leader all of `ids` agree on (with full membership known), if they agree.
    pub async fn agreed_leader(&self, ids: &[u64]) -> Option<u64> {
        let mut leader = None;
        for id in ids {
            let s = self
                .node(*id)
                .admin
                .status(Duration::from_millis(500))
                .await?;
            if s.leader_id == 0 || leader.is_some_and(|l| l != s.leader_id) {
                return None;
            }
            leader = Some(s.leader_id);
        }
        leader
    }

    /// The leader according to any answering node (the highest term wins).
    pub async fn current_leader(&self) -> Option<(u64, u64)> {
        let mut best: Option<(u64, u64)> = None;
        for n in &self.nodes {
            if n.paused || n.child.is_none() {
                continue;
            }
            if let Some(s) = n.admin.status(Duration::from_millis(300)).await {
                if s.leader_id != 0 && best.is_none_or(|(t, _)| s.term > t) {
                    best = Some((s.term, s.leader_id));
                }
            }
        }
        best.map(|(t, l)| (l, t))
    }

    /// Runs a membership call through any node that accepts it.
    pub async fn membership(&self, what: Membership, id: u64) -> anyhow::Result<()> {
        let mut last = String::new();
        for attempt in 0..40 {
            for n in self
                .nodes
                .iter()
                .filter(|n| n.id != id && !n.paused && n.child.is_some())
            {
                let mut c = n.admin.raw();
                let fut = async {
                    match what {
                        Membership::Remove => c
                            .remove(n.admin.request(NodeIdRequest { id }))
                            .await
                            .map(|_| ()),
                        Membership::Promote => c
                            .promote(n.admin.request(NodeIdRequest { id }))
                            .await
                            .map(|_| ()),
                        Membership::AddLearner => {
                            let m = self.node(id).member();
                            c.add_learner(n.admin.request(AddLearnerRequest {
                                id,
                                rpc_addr: m.rpc_addr,
                                region: m.region,
                                admin_addr: m.admin_addr,
                                blocking: true,
                            }))
                            .await
                            .map(|_| ())
                        }
                    }
                };
                match tokio::time::timeout(Duration::from_secs(10), fut).await {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(s)) => last = s.message().to_string(),
                    Err(_) => last = "timed out".into(),
                }
            }
            let _ = attempt;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!("{what:?} node {id} failed: {last}")
    }

    /// Stops every node (SIGCONT first, so a paused node can die).
    pub fn stop_all(&mut self) {
        for id in self.ids() {
            let _ = self.resume(id);
            self.kill(id);
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Membership {
    Remove,
    AddLearner,
    Promote,
}

impl Cluster {
    /// Fills node `id`'s data dir until the file system is full; returns the bytes written.
    pub fn fill_disk(&self, id: u64) -> anyhow::Result<u64> {
        use std::io::Write;
        let path = self.filler(id);
        let mut f =
            std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        let chunk = vec![0u8; 256 * 1024];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                // ENOSPC is the goal.
                Err(_) => break,
            }
        }
        let _ = f.sync_all();
        Ok(written)
    }

    pub fn free_disk(&self, id: u64) -> anyhow::Result<()> {
        std::fs::remove_file(self.filler(id)).context("remove the disk filler")
    }

    fn filler(&self, id: u64) -> PathBuf {
        self.dir
            .join(format!("node-{id}"))
            .join("data")
            .join("chaos-filler")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
        for m in &self.mounts {
            let _ = super::topology::sh(&["umount", "-l", &m.display().to_string()]);
        }
    }
}
