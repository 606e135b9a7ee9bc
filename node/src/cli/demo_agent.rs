//! For `portcullis up`: one cvm-agent per demo instance, so the demo app is reached through the
//! WireGuard mesh as a tenant's CVM would be.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use super::spawn::spawn_logged;
use crate::procs::alive;
use crate::tunnel::agent::{
    default_keepalive, default_mtu, default_reregister, AgentConfig, Expose,
};

/// For `portcullis up`: writes the agent configuration of one demo instance (tunnel port
/// `app_port` relayed to the demo app at `target`) and starts `portcullis cvm-agent` for it.
/// The credential for the `demo` app must already be in `<dir>/cvm-demo`. Returns the pid and
/// the log path.
pub fn start_demo_agent(
    exe: &Path,
    dir: &Path,
    nodes: &[super::client::ClusterFileNode],
    instance_id: &str,
    region: &str,
    (app_port, target): (u16, SocketAddr),
    reregister_secs: Option<u64>,
) -> anyhow::Result<(u32, PathBuf)> {
    let cfg = AgentConfig {
        cluster: nodes
            .iter()
            .map(|n| format!("{}@{}", n.id, n.rpc_addr))
            .collect(),
        ca_cert: "cvm-demo/ca.pem".into(),
        cert: "cvm-demo/cert.pem".into(),
        key: "cvm-demo/key.pem".into(),
        app: "demo".into(),
        instance_id: instance_id.into(),
        region: region.into(),
        expose: vec![Expose::Map(format!("{app_port}={target}"))],
        wg_key: format!("{instance_id}.wg.key").into(),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        reregister_secs: reregister_secs.unwrap_or_else(default_reregister),
        keepalive_secs: default_keepalive(),
        mtu: default_mtu(),
    };
    let config = dir.join(format!("{instance_id}.agent.toml"));
    std::fs::write(&config, toml::to_string_pretty(&cfg)?)
        .with_context(|| format!("write {}", config.display()))?;
    let log = dir.join(format!("{instance_id}.agent.log"));
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("cvm-agent").arg("--config").arg(&config);
    for n in nodes {
        cmd.arg("--exit-with").arg(n.pid.to_string());
    }
    let pid = spawn_logged(&mut cmd, &log, &format!("cvm-agent for {instance_id}"))?.id();
    Ok((pid, log))
}

/// Waits until the agent logging to `log` has registered and brought its tunnel up.
pub async fn wait_tunnel_up(log: &Path, pid: u32) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("tunnel up") {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline || !alive(pid) {
            bail!("cvm-agent did not bring its tunnel up: {}", text.trim());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
