//! `portcullis up` and `portcullis down`: a real multi-node cluster on one machine.
//!
//! `up` creates credentials, writes one config per node, starts each node as its own process
//! (no root; free high ports on 127.0.0.1), bootstraps Raft with every node as a voter, and
//! writes `cluster.json`. Without `--detach` it stays in the foreground and stops the nodes on
//! Ctrl-C (and exits by itself once `portcullis down` has stopped them); with it, the nodes keep
//! running until `portcullis down`.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use portcullis_proto::admin::{
    ClusterStatusRequest, CreateAppRequest, InitRequest, Member, PutCertificateRequest,
};

use super::client::{connect_addr, ClusterFile, ClusterFileNode, DemoProcess};
use super::spawn::spawn_logged;
use crate::config::NodeConfig;
use crate::pki;
use crate::procs::alive;

use super::args::UpArgs;

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

/// Picks a free loopback port and keeps it bound in `held`, so that later picks in the same
/// plan cannot be handed the same port. The caller drops `held` right before starting the
/// processes that bind them.
fn reserve_port(held: &mut Vec<TcpListener>) -> anyhow::Result<SocketAddr> {
    let l = super::ports::reserve_tcp().context("find a free port")?;
    let addr = l.local_addr()?;
    held.push(l);
    Ok(addr)
}

struct Planned {
    id: u64,
    region: String,
    dir: PathBuf,
    rpc: SocketAddr,
    admin: SocketAddr,
    https: SocketAddr,
    http: SocketAddr,
    /// WireGuard UDP port (each node its own; they all share the loopback address).
    wg: SocketAddr,
}

/// A port free for TCP and UDP alike: the HTTPS port also serves HTTP/3 (`edge.http3`).
fn reserve_https_port(
    held: &mut Vec<TcpListener>,
    held_udp: &mut Vec<std::net::UdpSocket>,
) -> anyhow::Result<SocketAddr> {
    for _ in 0..64 {
        let addr = reserve_port(held)?;
        if let Ok(u) = std::net::UdpSocket::bind(addr) {
            held_udp.push(u);
            return Ok(addr);
        }
    }
    bail!("no loopback port is free for both TCP and UDP")
}

/// [`reserve_port`] for UDP.
fn reserve_udp_port(held: &mut Vec<std::net::UdpSocket>) -> anyhow::Result<SocketAddr> {
    let s = super::ports::reserve_udp().context("find a free udp port")?;
    let addr = s.local_addr()?;
    held.push(s);
    Ok(addr)
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
            if cf.nodes.iter().any(|n| alive(n.pid)) || cf.demo_apps.iter().any(|d| alive(d.pid)) {
                bail!(
                    "{} already runs a cluster; stop it with `portcullis down --state-dir {}`",
                    dir.display(),
                    dir.display()
                );
            }
        }
        // A stopped cluster's leftovers: start from scratch.
        std::fs::remove_dir_all(&dir).with_context(|| format!("clean {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let pki_dir = dir.join("pki");
    let ids: Vec<u64> = (1..=args.nodes).collect();
    pki::init(&pki_dir, &ids)?;

    let mut held = Vec::new();
    let mut held_udp = Vec::new();
    let mut planned = Vec::new();
    for id in &ids {
        let region = args.regions[((id - 1) as usize) % args.regions.len()].clone();
        let node_dir = dir.join(format!("node-{id}"));
        std::fs::create_dir_all(&node_dir)?;
        planned.push(Planned {
            id: *id,
            region,
            dir: node_dir,
            rpc: reserve_port(&mut held)?,
            admin: reserve_port(&mut held)?,
            https: reserve_https_port(&mut held, &mut held_udp)?,
            http: reserve_port(&mut held)?,
            wg: reserve_udp_port(&mut held_udp)?,
        });
    }
    drop(held);
    drop(held_udp);

    let exe = std::env::current_exe().context("locate the portcullis binary")?;
    let mut nodes = Vec::new();
    for p in &planned {
        let (lat, lon) = region_coords(&p.region);
        let mut cfg = NodeConfig {
            node_id: p.id,
            region: p.region.clone(),
            latitude: lat,
            longitude: lon,
            ..Default::default()
        };
        cfg.data_dir = "data".into();
        cfg.cluster.listen = p.rpc;
        cfg.cluster.ca_cert = "../pki/ca.pem".into();
        cfg.cluster.cert = format!("../pki/node-{}/cert.pem", p.id).into();
        cfg.cluster.key = format!("../pki/node-{}/key.pem", p.id).into();
        // Loopback round trips are tiny; these keep failover well under the 5 s target.
        cfg.cluster.heartbeat_ms = 100;
        cfg.cluster.election_timeout_min_ms = 500;
        cfg.cluster.election_timeout_max_ms = 1000;
        if let Some(n) = args.snapshot_every {
            cfg.cluster.snapshot_every = n;
            cfg.cluster.keep_logs_after_snapshot = 0;
        }
        if let Some(secs) = args.wg_expire_after {
            cfg.wg.expire_after_secs = secs;
        }
        if let Some(n) = args.wg_max_instances_per_app {
            cfg.wg.max_instances_per_app = n;
        }
        if let Some(r) = args.wg_registration_rate_per_app {
            cfg.wg.registration_rate_per_app = r;
        }
        if let Some(b) = args.wg_registration_burst_per_app {
            cfg.wg.registration_burst_per_app = b;
        }
        // Absolute: node configs live in their own directories.
        let abs = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        cfg.waf.crs_dir = args.waf_crs_dir.as_deref().map(abs);
        cfg.waf.extra_conf = args.waf_extra_conf.iter().map(|p| abs(p)).collect();
        cfg.waf.audit_all = args.waf_audit_all;
        if let Some(n) = args.edge_max_request_body_bytes {
            cfg.edge.max_request_body_bytes = n;
        }
        cfg.admin.listen = p.admin;
        cfg.admin.token_file = "../pki/admin.token".into();
        cfg.secrets.data_key_file = format!("../pki/{}", crate::pki::DATA_KEY_FILE).into();
        cfg.edge.https_listen = p.https;
        cfg.edge.http_listen = p.http;
        cfg.wg.listen = p.wg;
        cfg.edge.base_domains = vec![args.base_domain.clone()];
        cfg.edge.proxy_protocol_from = args.proxy_protocol_from.clone();
        cfg.edge.workers = args.edge_workers;
        cfg.edge.pin_workers = args.edge_pin_workers;
        cfg.dns.nameservers = args.dns_server.clone();
        // Probing loopback backends is nearly free; a short interval lets a stopped demo app
        // leave rotation within a couple of seconds.
        cfg.health.interval_ms = 500;
        cfg.health.timeout_ms = 400;
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
        demo_apps: Vec::new(),
    };
    cf.save(&dir)?;

    if let Err(e) = form_cluster(&cf).await {
        stop_nodes(&cf).await;
        return Err(e.context(format!(
            "the cluster did not form; node logs are in {}/node-*/node.log",
            dir.display()
        )));
    }
    let mut cf = cf;
    // A short expiry (tests) needs the demo agents to renew well within it.
    let renew = args.wg_expire_after.map(|secs| (secs / 3).max(1));
    if let Err(e) = setup_demo(&dir, &exe, &mut cf, renew).await {
        cf.save(&dir)?;
        stop_nodes(&cf).await;
        return Err(e.context(format!(
            "the demo app did not come up; logs are in {}",
            dir.display()
        )));
    }
    cf.save(&dir)?;
    print_next_steps(&dir, &cf);

    if args.detach {
        return Ok(());
    }
    println!("\nrunning in the foreground; Ctrl-C stops every node");
    tokio::select! {
        () = wait_for_signal() => println!("stopping"),
        // `portcullis down` from another terminal: nothing is left to wait for.
        () = every_node_gone(&cf) => println!("every node has stopped; exiting"),
    }
    stop_nodes(&cf).await;
    Ok(())
}

/// Returns once no node process of `cf` is alive (checked twice a second).
async fn every_node_gone(cf: &ClusterFile) {
    while cf.nodes.iter().any(|n| alive(n.pid)) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn spawn_node(exe: &Path, config: &Path, log: &Path) -> anyhow::Result<u32> {
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("node").arg("--config").arg(config);
    Ok(spawn_logged(&mut cmd, log, &exe.display().to_string())?.id())
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
    clients[0]
        .init(InitRequest { members })
        .await
        .map_err(|s| anyhow::anyhow!("init: {}", s.message()))?;
    // Formed means every node knows the same leader and all members.
    for (n, c) in cf.nodes.iter().zip(clients.iter_mut()) {
        loop {
            let s = c
                .cluster_status(ClusterStatusRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("status: {}", s.message()))?
                .into_inner();
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

/// The demo: a development CA and a wildcard certificate for the base domain (imported like any
/// certificate, through the admin API), app `demo`, and one demo-app process per region
/// registered as its instances. Returns once every node serves the demo over HTTPS.
/// `reregister_secs`: how often the demo agents renew (None: the agent default).
async fn setup_demo(
    dir: &Path,
    exe: &Path,
    cf: &mut ClusterFile,
    reregister_secs: Option<u64>,
) -> anyhow::Result<()> {
    let token = std::fs::read_to_string(&cf.token_file)?.trim().to_string();
    let mut admin = connect_addr(&cf.nodes[0].admin_addr, &token).await?;
    let pki_dir = dir.join("pki");
    let ca_path = crate::pki::init_dev_ca(&pki_dir)?;
    let base = cf.base_domain.clone();
    let wildcard = format!("*.{base}");
    let issued = crate::pki::issue_dev_cert(&pki_dir, &[wildcard.clone(), base.clone()])?;
    std::fs::write(pki_dir.join("dev-wildcard.pem"), &issued.cert_pem)?;
    crate::pki::write_private(&pki_dir.join("dev-wildcard.key"), issued.key_pem.as_bytes())?;
    let rpc_err =
        |what: &'static str| move |s: tonic::Status| anyhow::anyhow!("{what}: {}", s.message());
    admin
        .put_certificate(PutCertificateRequest {
            name: wildcard,
            chain_pem: issued.cert_pem,
            key_pem: issued.key_pem,
        })
        .await
        .map_err(rpc_err("import the development certificate"))?;
    admin
        .create_app(CreateAppRequest {
            name: "demo".into(),
            ports: vec![8080],
            lb: "round-robin".into(),
        })
        .await
        .map_err(rpc_err("create app demo"))?;

    super::cvm::issue_credential(&pki_dir, "demo", &dir.join("cvm-demo"))?;
    let mut regions: Vec<String> = Vec::new();
    for n in &cf.nodes {
        if !regions.contains(&n.region) {
            regions.push(n.region.clone());
        }
    }
    for region in regions {
        let instance_id = format!("demo-{region}");
        let log = dir.join(format!("{instance_id}.log"));
        let mut cmd = std::process::Command::new(exe);
        cmd.args([
            "demo-app",
            // The demo app picks its own port and logs it; no window for another process to
            // take a port chosen here.
            "--listen",
            "127.0.0.1:0",
            "--name",
            "demo",
            "--region",
            &region,
            "--instance-id",
            &instance_id,
        ]);
        for n in &cf.nodes {
            cmd.arg("--exit-with").arg(n.pid.to_string());
        }
        let pid = spawn_logged(&mut cmd, &log, &format!("demo-app for {region}"))?.id();
        let addr = wait_listening(&log, pid)
            .await
            .with_context(|| format!("demo-app {instance_id}; see {}", log.display()))?;
        // The demo takes the real path: a cvm-agent registers the instance over the cluster
        // port and relays tunnel port 8080 to the demo app.
        let (agent_pid, agent_log) = super::demo_agent::start_demo_agent(
            exe,
            dir,
            &cf.nodes,
            &instance_id,
            &region,
            (8080, addr),
            reregister_secs,
        )?;
        cf.demo_apps.push(DemoProcess {
            instance_id: instance_id.clone(),
            region: region.clone(),
            addr: addr.to_string(),
            pid,
            agent_pid: Some(agent_pid),
        });
        super::demo_agent::wait_tunnel_up(&agent_log, agent_pid)
            .await
            .with_context(|| format!("cvm-agent {instance_id}; see {}", agent_log.display()))?;
    }

    // "Up" means the printed curl line works on every node.
    let ca_pem = std::fs::read_to_string(&ca_path)?;
    let host = format!("demo.{base}");
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in &cf.nodes {
        let addr: SocketAddr = n.https_addr.parse().context("https address")?;
        loop {
            match probe_https(addr, &host, &ca_pem).await {
                Ok(200) => break,
                Ok(status) if Instant::now() > deadline => {
                    bail!("node {} answers {status} for https://{host}/", n.id)
                }
                Err(e) if Instant::now() > deadline => {
                    bail!("node {} does not serve https://{host}/: {e:#}", n.id)
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Ok(())
}

/// Waits for the demo app's "listening on ADDR" log line and returns ADDR.
async fn wait_listening(log: &Path, pid: u32) -> anyhow::Result<SocketAddr> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(addr) = text
            .lines()
            .find_map(|l| {
                l.split_once("listening on ")
                    .map(|(_, rest)| rest.split_whitespace().next().unwrap_or(""))
            })
            .and_then(|a| a.parse().ok())
        {
            return Ok(addr);
        }
        if Instant::now() > deadline || !alive(pid) {
            bail!("did not start listening: {}", text.trim());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One HTTPS GET through a node, verified against the development CA; returns the status.
pub async fn probe_https(addr: SocketAddr, host: &str, ca_pem: &str) -> anyhow::Result<u16> {
    use http_body_util::Empty;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await??;
    let name = rustls::pki_types::ServerName::try_from(host.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let req = http::Request::get("/")
        .header("host", host)
        .body(Empty::<bytes::Bytes>::new())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req)).await??;
    Ok(resp.status().as_u16())
}

fn print_next_steps(dir: &Path, cf: &ClusterFile) {
    let d = dir.display();
    println!("portcullis: {} nodes up; state in {d}", cf.nodes.len());
    for n in &cf.nodes {
        println!(
            "  node {} ({:<9}) admin {}  https {}  http {}  pid {}",
            n.id, n.region, n.admin_addr, n.https_addr, n.http_addr, n.pid
        );
    }
    if !cf.demo_apps.is_empty() {
        let host = format!("demo.{}", cf.base_domain);
        println!(
            "\ndemo app (instances {}):",
            cf.demo_apps
                .iter()
                .map(|d| d.instance_id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for n in &cf.nodes {
            let port = n
                .https_addr
                .rsplit_once(':')
                .map(|(_, p)| p)
                .unwrap_or("443");
            println!("  curl --cacert {d}/pki/dev-ca.pem --resolve {host}:{port}:127.0.0.1 https://{host}:{port}/");
        }
    }
    let exe = std::env::current_exe()
        .map(|e| command_name(&e))
        .unwrap_or_else(|_| "portcullis".into());
    println!("\nnext:");
    println!("  {exe} --cluster {d} cluster status");
    println!("  {exe} --cluster {d} app create myapp --port 8080");
    println!("  {exe} --cluster {d} app list --json");
    println!("  {exe} down --state-dir {d}");
}

/// How to type this binary in the shell `up` was started from: `portcullis` when that name on
/// the PATH is this binary, else its path (relative to the working directory when it is under
/// it, as `target/release/portcullis` after `cargo run --release -- up`).
fn command_name(exe: &Path) -> String {
    let exe = exe.canonicalize().unwrap_or_else(|_| exe.to_path_buf());
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|p| {
            p.join("portcullis")
                .canonicalize()
                .is_ok_and(|found| found == exe)
        })
    });
    if on_path {
        return "portcullis".into();
    }
    let relative = std::env::current_dir().ok().and_then(|cwd| {
        exe.strip_prefix(cwd.canonicalize().ok()?)
            .ok()
            .map(Path::to_path_buf)
    });
    match relative {
        // A bare file name would be looked up on the PATH: keep a slash in it.
        Some(r) if r.components().count() == 1 => format!("./{}", r.display()),
        Some(r) => r.display().to_string(),
        None => exe.display().to_string(),
    }
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

async fn stop_nodes(cf: &ClusterFile) {
    // Demo apps hold no state: they just stop.
    for d in &cf.demo_apps {
        for pid in std::iter::once(d.pid).chain(d.agent_pid) {
            if alive(pid) {
                if let Ok(raw) = i32::try_from(pid) {
                    let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
                }
            }
        }
    }
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
