//! `portcullis up` and `portcullis down`: a real multi-node cluster on one machine.
//!
//! `up` creates credentials, writes one config per node, starts each node as its own process
//! (no root; free high ports on 127.0.0.1), bootstraps Raft with every node as a voter, and
//! writes `cluster.json`. Without `--detach` it stays in the foreground and stops the nodes on
//! Ctrl-C; with it, the nodes keep running until `portcullis down`.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use portcullis_proto::admin::{ClusterStatusRequest, InitRequest, Member};

use crate::client::{connect_addr, ClusterFile, ClusterFileNode};
use crate::config::NodeConfig;
use crate::pki;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// How many gateway nodes to start.
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Regions, assigned to nodes in turn.
    #[arg(long, value_delimiter = ',', default_value = "us-east,eu-west,ap-south")]
    pub regions: Vec<String>,
    /// Where configs, keys, data and logs go.
    #[arg(long, default_value = ".portcullis")]
    pub state_dir: PathBuf,
    /// Base domain for the demo apps.
    #[arg(long, default_value = "portcullis.localhost")]
    pub base_domain: String,
    /// Return once the cluster is up and leave the nodes running.
    #[arg(long)]
    pub detach: bool,
}

/// Approximate coordinates for common region names, so geography works out of the box.
fn region_coords(name: &str) -> (f64, f64) {
    match name {
        "us-east" => (38.9, -77.4),
        "us-west" => (45.6, -121.2),
        "eu-west" => (53.3, -6.3),
        "eu-central" => (50.1, 8.7),
        "ap-south" => (19.1, 72.9),
        "ap-northeast" => (35.7, 139.7),
        "ap-southeast" => (1.35, 103.8),
        "sa-east" => (-23.5, -46.6),
        _ => (0.0, 0.0),
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    // Bound and released right before the node binds it; the window for a collision is tiny.
    let l = TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(l.local_addr()?)
}

struct Planned {
    id: u64,
    region: String,
    dir: PathBuf,
    rpc: SocketAddr,
    admin: SocketAddr,
    https: SocketAddr,
    http: SocketAddr,
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.nodes > 9 {
        bail!("--nodes {}: choose 1-9 for a local cluster", args.nodes);
    }
    if args.regions.is_empty() || args.regions.iter().any(|r| r.is_empty()) {
        bail!("--regions: give at least one non-empty region name");
    }
    let dir = std::path::absolute(&args.state_dir).context("state dir")?;
    if ClusterFile::path(&dir).exists() {
        if let Ok(cf) = ClusterFile::load(&dir) {
            if cf.nodes.iter().any(|n| alive(n.pid)) {
                bail!("{} already runs a cluster; stop it with `portcullis down --state-dir {}`", dir.display(), dir.display());
            }
        }
        // A stopped cluster's leftovers: start from scratch.
        std::fs::remove_dir_all(&dir).with_context(|| format!("clean {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let pki_dir = dir.join("pki");
    let ids: Vec<u64> = (1..=args.nodes).collect();
    pki::init(&pki_dir, &ids)?;

    let mut planned = Vec::new();
    for id in &ids {
        let region = args.regions[((id - 1) as usize) % args.regions.len()].clone();
        let node_dir = dir.join(format!("node-{id}"));
        std::fs::create_dir_all(&node_dir)?;
        planned.push(Planned {
            id: *id,
            region,
            dir: node_dir,
            rpc: free_port()?,
            admin: free_port()?,
            https: free_port()?,
            http: free_port()?,
        });
    }

    let exe = std::env::current_exe().context("locate the portcullis binary")?;
    let mut nodes = Vec::new();
    for p in &planned {
        let (lat, lon) = region_coords(&p.region);
        let mut cfg = NodeConfig { node_id: p.id, region: p.region.clone(), latitude: lat, longitude: lon, ..Default::default() };
        cfg.data_dir = "data".into();
        cfg.cluster.listen = p.rpc;
        cfg.cluster.ca_cert = "../pki/ca.pem".into();
        cfg.cluster.cert = format!("../pki/node-{}/cert.pem", p.id).into();
        cfg.cluster.key = format!("../pki/node-{}/key.pem", p.id).into();
        // Loopback round trips are tiny; these keep failover well under the 5 s target.
        cfg.cluster.heartbeat_ms = 100;
        cfg.cluster.election_timeout_min_ms = 500;
        cfg.cluster.election_timeout_max_ms = 1000;
        cfg.admin.listen = p.admin;
        cfg.admin.token_file = "../pki/admin.token".into();
        cfg.edge.https_listen = p.https;
        cfg.edge.http_listen = p.http;
        cfg.edge.base_domains = vec![args.base_domain.clone()];
        let config_path = p.dir.join("config.toml");
        std::fs::write(&config_path, toml::to_string_pretty(&cfg)?)?;
        let pid = spawn_node(&exe, &config_path, &p.dir.join("node.log"))?;
        nodes.push(ClusterFileNode {
            id: p.id,
            region: p.region.clone(),
            admin_addr: p.admin.to_string(),
            https_addr: p.https.to_string(),
            http_addr: p.http.to_string(),
            rpc_addr: p.rpc.to_string(),
            pid,
            config: config_path,
        });
    }
    let cf = ClusterFile {
        token_file: pki_dir.join("admin.token"),
        ca_cert: pki_dir.join("ca.pem"),
        base_domain: args.base_domain.clone(),
        nodes,
    };
    cf.save(&dir)?;

    if let Err(e) = form_cluster(&cf).await {
        stop_nodes(&cf).await;
        return Err(e.context(format!("the cluster did not form; node logs are in {}/node-*/node.log", dir.display())));
    }
    print_next_steps(&dir, &cf);

    if args.detach {
        return Ok(());
    }
    println!("\nrunning in the foreground; Ctrl-C stops every node");
    wait_for_signal().await;
    println!("stopping");
    stop_nodes(&cf).await;
    Ok(())
}

fn spawn_node(exe: &Path, config: &Path, log: &Path) -> anyhow::Result<u32> {
    let out = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone()?;
    let child = std::process::Command::new(exe)
        .arg("node")
        .arg("--config")
        .arg(config)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group: a Ctrl-C in the terminal reaches the launcher, which then
        // stops the nodes in order, instead of killing them all mid-write.
        .process_group(0)
        .spawn()
        .with_context(|| format!("start {}", exe.display()))?;
    Ok(child.id())
}

async fn form_cluster(cf: &ClusterFile) -> anyhow::Result<()> {
    let token = std::fs::read_to_string(&cf.token_file)?.trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut clients = Vec::new();
    for n in &cf.nodes {
        let c = loop {
            match connect_addr(&n.admin_addr, &token).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    if !alive(n.pid) {
                        bail!("node {} exited during start-up: {e:#}", n.id);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => bail!("node {} did not open its admin port: {e:#}", n.id),
            }
        };
        clients.push(c);
    }
    let members = cf
        .nodes
        .iter()
        .map(|n| Member {
            id: n.id,
            region: n.region.clone(),
            voter: true,
            rpc_addr: n.rpc_addr.clone(),
            admin_addr: n.admin_addr.clone(),
        })
        .collect();
    clients[0].init(InitRequest { members }).await.map_err(|s| anyhow::anyhow!("init: {}", s.message()))?;
    // Formed means every node knows the same leader and all members.
    for (n, c) in cf.nodes.iter().zip(clients.iter_mut()) {
        loop {
            let s = c.cluster_status(ClusterStatusRequest {}).await.map_err(|s| anyhow::anyhow!("status: {}", s.message()))?.into_inner();
            if s.leader_id != 0 && s.members.len() == cf.nodes.len() {
                break;
            }
            if Instant::now() > deadline {
                bail!("node {} sees no leader after 30s", n.id);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

fn print_next_steps(dir: &Path, cf: &ClusterFile) {
    let d = dir.display();
    println!("portcullis: {} nodes up; state in {d}", cf.nodes.len());
    for n in &cf.nodes {
        println!("  node {} ({:<9}) admin {}  https {}  http {}  pid {}", n.id, n.region, n.admin_addr, n.https_addr, n.http_addr, n.pid);
    }
    println!("\nnext:");
    println!("  portcullis --cluster {d} cluster status");
    println!("  portcullis --cluster {d} app create myapp --port 8080");
    println!("  portcullis --cluster {d} app list --json");
    println!("  portcullis down --state-dir {d}");
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the cluster");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Is `pid` a live portcullis process (and not a recycled pid)?
pub fn alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else { return false };
    if kill(Pid::from_raw(raw), None).is_err() {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => String::from_utf8_lossy(&cmd).contains("portcullis") && !zombie(pid),
        Err(_) => false,
    }
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

async fn stop_nodes(cf: &ClusterFile) {
    for n in &cf.nodes {
        if alive(n.pid) {
            if let Ok(raw) = i32::try_from(n.pid) {
                let _ = kill(Pid::from_raw(raw), Signal::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while cf.nodes.iter().any(|n| alive(n.pid)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in &cf.nodes {
        if alive(n.pid) {
            tracing::warn!(node = n.id, pid = n.pid, "did not stop on SIGTERM; killing");
            if let Ok(raw) = i32::try_from(n.pid) {
                let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
            }
        }
    }
}

pub async fn down(state_dir: &Path) -> anyhow::Result<()> {
    let cf = ClusterFile::load(state_dir)?;
    let running = cf.nodes.iter().filter(|n| alive(n.pid)).count();
    stop_nodes(&cf).await;
    println!("stopped {running} node(s) of {}", state_dir.display());
    Ok(())
}
