//! Starts everything a run measures, and stops it again: the fixed-response backend (the
//! binary's hidden `backend` subcommand), a 1-node Portcullis cluster (`portcullis up`) with an
//! app routed to the backend, nginx and HAProxy with their configurations, and the outside load
//! tools' files. Dropping the [`Setup`] stops all of it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use super::peers::{haproxy_conf, nginx_conf, ProxyOptions};
use super::processes::{reserve, run_cmd, version_line, Cluster, Proc};
use super::target::{Kind, Mode, Pki, Target, APP};
use super::tools::{find_bin, Tools};

/// What to start: the programs, the targets and modes asked for, and how the proxies run.
pub struct Plan {
    /// The `portcullis` binary; its `up` also makes the certificate every target serves.
    pub portcullis: PathBuf,
    pub nginx: PathBuf,
    pub haproxy: PathBuf,
    pub wrk: PathBuf,
    pub h2load: PathBuf,
    pub targets: Vec<Kind>,
    pub modes: Vec<Mode>,
    /// Portcullis's `edge.workers` (`None`: the node's default).
    pub portcullis_workers: Option<usize>,
    pub proxies: ProxyOptions,
}

/// Everything the benchmark started; dropping it stops all of it (children first, then the
/// cluster, then the directory).
pub struct Setup {
    procs: Vec<Proc>,
    _cluster: Option<Cluster>,
    pub targets: Vec<Target>,
    pub pki: Pki,
    pub tools: Tools,
    /// The first line of every program's version output.
    pub versions: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Proxies before the backend, so none of them logs a flood of backend errors.
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
    }
}

/// Starts the backend, the cluster and the peers of `plan.targets`, and finds the tools of
/// `plan.modes`; fails with everything that is missing before starting anything.
pub async fn setup(plan: &Plan) -> anyhow::Result<Setup> {
    let portcullis = std::path::absolute(&plan.portcullis)?;
    let mut missing = Vec::new();
    if !portcullis.is_file() {
        missing.push(format!(
            "{} (cargo build --release -p portcullis-node -p portcullis-cluster-tests); it also \
             provides the certificate every target serves",
            portcullis.display()
        ));
    }
    let nginx = find_bin(&plan.nginx);
    if plan.targets.contains(&Kind::Nginx) && nginx.is_none() {
        missing.push(format!(
            "{} (apt-get install -y nginx, or leave it out with --targets)",
            plan.nginx.display()
        ));
    }
    let haproxy = find_bin(&plan.haproxy);
    if plan.targets.contains(&Kind::Haproxy) && haproxy.is_none() {
        missing.push(format!(
            "{} (apt-get install -y haproxy, or leave it out with --targets)",
            plan.haproxy.display()
        ));
    }
    let mut tool = |mode: Mode, bin: &Path| {
        let found = find_bin(bin);
        if plan.modes.contains(&mode) && found.is_none() {
            missing.push(format!(
                "{} (apt-get install -y {}, or leave mode {} out with --modes)",
                bin.display(),
                mode.tool().unwrap_or_default(),
                mode.tool().unwrap_or_default(),
            ));
        }
        found.filter(|_| plan.modes.contains(&mode))
    };
    let wrk = tool(Mode::Wrk, &plan.wrk);
    let h2load = tool(Mode::H2load, &plan.h2load);
    if !missing.is_empty() {
        bail!("missing:\n  {}", missing.join("\n  "));
    }

    let dir = tempfile::Builder::new().prefix("edge-bench-").tempdir()?;
    let mut versions = vec![version_line(&portcullis, "--version")];
    if let Some(w) = &wrk {
        versions.push(version_line(w, "-v"));
    }
    if let Some(h) = &h2load {
        versions.push(version_line(h, "--version"));
    }
    let tools = Tools::new(wrk, h2load, dir.path())?;
    let state = dir.path().join("portcullis");
    eprintln!(
        "starting a 1-node portcullis cluster in {}",
        state.display()
    );
    let mut up = Command::new(&portcullis);
    up.args(["up", "--nodes", "1", "--detach", "--state-dir"])
        .arg(&state);
    if let Some(n) = plan.portcullis_workers {
        up.arg("--edge-workers").arg(n.to_string());
    }
    up.arg("--edge-pin-workers")
        .arg(if plan.proxies.pin { "true" } else { "false" });
    if !plan.proxies.access_log {
        // The node's default filter, with the per-request access log off.
        up.env(
            "RUST_LOG",
            "info,openraft=warn,sled=warn,h2=warn,tower=warn,portcullis::access=off",
        );
    }
    // The guard exists before `up` runs: a half-started cluster is stopped too.
    let cluster = Cluster {
        bin: portcullis.clone(),
        dir: state.clone(),
    };
    run_cmd("portcullis up", up, Duration::from_secs(120)).await?;
    let cf = portcullis_node::cli::client::ClusterFile::load(&state)?;
    let node = cf.nodes.first().context("cluster.json lists no node")?;
    let https: SocketAddr = node.https_addr.parse().context("node https address")?;
    let base = cf.base_domain.clone();
    if base != "portcullis.localhost" {
        bail!("unexpected base domain {base}");
    }
    let pki = Pki {
        ca: state.join("pki/dev-ca.pem"),
        cert: state.join("pki/dev-wildcard.pem"),
        key: state.join("pki/dev-wildcard.key"),
    };

    let mut procs = Vec::new();
    let (l1, plain) = reserve()?;
    let (l2, tls) = reserve()?;
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("backend")
        .arg("--listen")
        .arg(plain.to_string())
        .arg("--tls-listen")
        .arg(tls.to_string())
        .arg("--cert")
        .arg(&pki.cert)
        .arg("--key")
        .arg(&pki.key);
    drop((l1, l2));
    let mut p = Proc::spawn("backend", &mut cmd, dir.path().join("backend.log"))?;
    p.wait_listening(plain).await?;
    p.wait_listening(tls).await?;
    let backend_pid = p.pid();
    procs.push(p);
    let mut targets = Vec::new();
    for &k in &plan.targets {
        match k {
            Kind::Direct => targets.push(Target {
                kind: k,
                addr: tls,
                pid: backend_pid,
            }),
            Kind::Portcullis => {
                let cli = |args: &[&str]| {
                    let mut c = Command::new(&portcullis);
                    c.arg("--cluster").arg(&state).args(args);
                    c
                };
                let port = plain.port().to_string();
                run_cmd(
                    "portcullis app create",
                    cli(&["app", "create", APP, "--port", &port]),
                    Duration::from_secs(30),
                )
                .await?;
                run_cmd(
                    "portcullis cvm register",
                    cli(&[
                        "cvm",
                        "register",
                        "--instance-id",
                        "bench-1",
                        "--app",
                        APP,
                        "--region",
                        &node.region,
                        "--backend",
                        &plain.to_string(),
                    ]),
                    Duration::from_secs(30),
                )
                .await?;
                targets.push(Target {
                    kind: k,
                    addr: https,
                    pid: node.pid,
                });
            }
            Kind::Nginx => {
                let ndir = dir.path().join("nginx");
                std::fs::create_dir_all(&ndir)?;
                let (l, addr) = reserve()?;
                let conf = ndir.join("nginx.conf");
                std::fs::write(&conf, nginx_conf(&ndir, addr, plain, &pki, &plan.proxies))?;
                let bin = nginx.clone().context("nginx")?;
                versions.push(version_line(&bin, "-v"));
                let mut cmd = Command::new(&bin);
                cmd.arg("-p")
                    .arg(&ndir)
                    .arg("-e")
                    .arg(ndir.join("error.log"))
                    .arg("-c")
                    .arg(&conf)
                    .args(["-g", "daemon off;"]);
                drop(l);
                let mut p = Proc::spawn("nginx", &mut cmd, ndir.join("stderr.log"))?;
                p.wait_listening(addr).await?;
                let pid = p.pid();
                procs.push(p);
                targets.push(Target { kind: k, addr, pid });
            }
            Kind::Haproxy => {
                let hdir = dir.path().join("haproxy");
                std::fs::create_dir_all(&hdir)?;
                // HAProxy wants the certificate and its key in one file.
                let pem = hdir.join("cert.pem");
                let mut both = std::fs::read(&pki.cert)?;
                both.extend(std::fs::read(&pki.key)?);
                std::fs::write(&pem, both)?;
                let (l, addr) = reserve()?;
                let conf = hdir.join("haproxy.cfg");
                std::fs::write(&conf, haproxy_conf(addr, plain, &pem, &plan.proxies))?;
                let bin = haproxy.clone().context("haproxy")?;
                versions.push(version_line(&bin, "-v"));
                let mut cmd = Command::new(&bin);
                cmd.arg("-f").arg(&conf).arg("-db");
                drop(l);
                let mut p = Proc::spawn("haproxy", &mut cmd, hdir.join("haproxy.log"))?;
                p.wait_listening(addr).await?;
                let pid = p.pid();
                procs.push(p);
                targets.push(Target { kind: k, addr, pid });
            }
        }
    }
    Ok(Setup {
        procs,
        _cluster: Some(cluster),
        targets,
        pki,
        tools,
        versions,
        _dir: dir,
    })
}
