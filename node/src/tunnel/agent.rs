//! `portcullis cvm-agent --config FILE`: the CVM side of the WireGuard mesh.
//!
//! It registers with the cluster (CVM credential over mutual TLS on the cluster RPC port), runs
//! a portcullis-wg endpoint on the allocated tunnel address with every gateway as a peer, and
//! relays tunnel connections on each exposed port to `127.0.0.1:<port>`. It re-registers
//! periodically: that keeps the registration fresh and picks up gateways that joined or moved.
//! `--print-wg-config` registers once and prints a wg-quick configuration instead, for CVMs
//! that bring their own WireGuard.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use portcullis_proto::cluster::cvm_registry_client::CvmRegistryClient;
use portcullis_proto::cluster::{GatewayPeer, RegisterCvmReply, RegisterCvmRequest};
use portcullis_raft::tls::node_server_name;
use portcullis_wg::{Endpoint, EndpointConfig, PeerConfig, PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use super::key::load_or_create_key;

/// Per-call deadline for registration.
const RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to open a relayed connection to the local service.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// The agent's TOML configuration.
    #[arg(long)]
    pub config: PathBuf,
    /// Register once and print a wg-quick configuration instead of running the tunnel.
    #[arg(long)]
    pub print_wg_config: bool,
    /// Exit once none of these processes is alive (repeatable). `portcullis up` passes the node
    /// pids, so agents do not outlive a local cluster killed without `down`.
    #[arg(long = "exit-with")]
    pub exit_with: Vec<u32>,
}

/// One exposed port: `8080` relays tunnel port 8080 to `127.0.0.1:8080`; `"8080=127.0.0.1:9000"`
/// relays tunnel port 8080 to another local address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Expose {
    Port(u16),
    Map(String),
}

impl Expose {
    /// The tunnel port and where its connections go.
    pub fn resolve(&self) -> anyhow::Result<(u16, SocketAddr)> {
        match self {
            Expose::Port(0) => bail!("expose: ports must be 1-65535"),
            Expose::Port(p) => Ok((*p, SocketAddr::from((Ipv4Addr::LOCALHOST, *p)))),
            Expose::Map(s) => {
                let (port, to) = s
                    .split_once('=')
                    .with_context(|| format!("expose {s:?}: expected PORT or \"PORT=IP:PORT\""))?;
                let port: u16 = port
                    .trim()
                    .parse()
                    .ok()
                    .filter(|p| *p != 0)
                    .with_context(|| format!("expose {s:?}: tunnel port must be 1-65535"))?;
                let to: SocketAddr = to
                    .trim()
                    .parse()
                    .with_context(|| format!("expose {s:?}: target must be IP:PORT"))?;
                Ok((port, to))
            }
        }
    }
}

/// The agent's configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Cluster RPC addresses as `<node-id>@<host:port>`; the id is the name the node's
    /// certificate carries (`node-<id>.portcullis.cluster`). Tried in order. Required.
    pub cluster: Vec<String>,
    /// Cluster CA certificate (PEM). Required.
    pub ca_cert: PathBuf,
    /// CVM credential from `portcullis cvm credential` (certificate and key, PEM). Required.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub app: String,
    pub instance_id: String,
    pub region: String,
    /// Ports reachable through the tunnel: `8080` relays tunnel port 8080 to
    /// `127.0.0.1:8080`; `"8080=127.0.0.1:9000"` relays it to another local address.
    #[serde(default)]
    pub expose: Vec<Expose>,
    /// WireGuard private key file, created (0600) if missing. Default `wg.key` next to the config.
    #[serde(default = "default_wg_key")]
    pub wg_key: PathBuf,
    /// UDP address the tunnel binds. Default `0.0.0.0:0` (any port: the CVM dials out, and
    /// gateways learn its address from its packets).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Seconds between re-registrations. Default 30.
    #[serde(default = "default_reregister")]
    pub reregister_secs: u64,
    /// Persistent keepalive toward gateways, seconds (keeps NAT mappings open). Default 25.
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: u16,
    /// Inner MTU. Default 1420.
    #[serde(default = "default_mtu")]
    pub mtu: usize,
}

fn default_wg_key() -> PathBuf {
    PathBuf::from("wg.key")
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
pub fn default_reregister() -> u64 {
    30
}
pub fn default_keepalive() -> u16 {
    25
}
pub fn default_mtu() -> usize {
    1420
}

impl AgentConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let mut cfg: AgentConfig =
            toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.ca_cert,
            &mut cfg.cert,
            &mut cfg.key,
            &mut cfg.wg_key,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.cluster.is_empty() {
            bail!("cluster: give at least one `<node-id>@<host:port>`");
        }
        for c in &self.cluster {
            parse_cluster_addr(c)?;
        }
        portcullis_raft::state::validate_app_name(&self.app).context("app")?;
        if self.instance_id.is_empty() || self.region.is_empty() {
            bail!("instance_id and region are required");
        }
        let mut ports = std::collections::BTreeSet::new();
        for e in &self.expose {
            let (port, _) = e.resolve()?;
            if !ports.insert(port) {
                bail!("expose: tunnel port {port} is listed twice");
            }
        }
        if self.reregister_secs == 0 {
            bail!("reregister_secs must be > 0");
        }
        Ok(())
    }
}

fn parse_cluster_addr(s: &str) -> anyhow::Result<(u64, String)> {
    let (id, addr) = s
        .split_once('@')
        .with_context(|| format!("cluster entry {s:?}: expected <node-id>@<host:port>"))?;
    let id: u64 = id
        .parse()
        .with_context(|| format!("cluster entry {s:?}: node id is not a number"))?;
    Ok((id, addr.to_string()))
}

/// The agent's TLS identity for the cluster port.
struct Credential {
    ca: String,
    identity: Identity,
}

impl Credential {
    fn load(cfg: &AgentConfig) -> anyhow::Result<Self> {
        let read =
            |p: &Path| std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()));
        Ok(Credential {
            ca: read(&cfg.ca_cert)?,
            identity: Identity::from_pem(read(&cfg.cert)?, read(&cfg.key)?),
        })
    }
}

/// Why a registration did not go through.
#[derive(Debug, thiserror::Error)]
enum RegisterError {
    /// The cluster answered and said no (credential, duplicate key, another app's instance
    /// id, attestation): every node would say the same, so retrying is pointless.
    #[error("registration refused: {0}")]
    Refused(String),
    /// The cluster asked this app to slow down (its registration rate or instance cap): asking
    /// another node at once would only spend that node's share too, so wait and retry.
    #[error("registration deferred: {0}")]
    Throttled(String),
    /// No node could be reached or none answered; worth retrying.
    #[error("{0:#}")]
    Unreachable(anyhow::Error),
}

async fn register_at(
    cred: &Credential,
    node_id: u64,
    addr: &str,
    req: RegisterCvmRequest,
) -> Result<RegisterCvmReply, RegisterError> {
    let unreachable = |e: anyhow::Error| RegisterError::Unreachable(e);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cred.ca))
        .identity(cred.identity.clone())
        .domain_name(node_server_name(node_id));
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| unreachable(e.into()))?
        .tls_config(tls)
        .map_err(|e| unreachable(e.into()))?
        .connect_timeout(RPC_TIMEOUT)
        .timeout(RPC_TIMEOUT)
        .connect()
        .await
        .with_context(|| format!("connect to node {node_id} at {addr}"))
        .map_err(unreachable)?;
    match CvmRegistryClient::new(channel).register(req).await {
        Ok(reply) => Ok(reply.into_inner()),
        Err(s) => {
            let text = format!("node {node_id} at {addr}: {:?}: {}", s.code(), s.message());
            match s.code() {
                tonic::Code::PermissionDenied
                | tonic::Code::AlreadyExists
                | tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition => Err(RegisterError::Refused(text)),
                tonic::Code::ResourceExhausted => Err(RegisterError::Throttled(text)),
                _ => Err(unreachable(anyhow::anyhow!(text))),
            }
        }
    }
}

/// Registers through the first cluster address that answers. `known` holds addresses learned
/// from earlier replies, tried after the configured ones.
async fn register(
    cfg: &AgentConfig,
    cred: &Credential,
    public_key: &PublicKey,
    known: &[(u64, String)],
) -> Result<RegisterCvmReply, RegisterError> {
    let mut targets: Vec<(u64, String)> = Vec::new();
    for c in &cfg.cluster {
        targets.push(parse_cluster_addr(c).map_err(RegisterError::Unreachable)?);
    }
    for k in known {
        if !targets.contains(k) {
            targets.push(k.clone());
        }
    }
    let req = RegisterCvmRequest {
        app: cfg.app.clone(),
        instance_id: cfg.instance_id.clone(),
        region: cfg.region.clone(),
        wg_public_key: public_key.to_base64(),
        attestation: Vec::new(),
    };
    let mut last = None;
    for (id, addr) in targets {
        match register_at(cred, id, &addr, req.clone()).await {
            Ok(r) => return Ok(r),
            Err(e @ (RegisterError::Refused(_) | RegisterError::Throttled(_))) => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "registration attempt failed");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        RegisterError::Unreachable(anyhow::anyhow!("no cluster address to register with"))
    }))
}

async fn gateway_peer_configs(gateways: &[GatewayPeer], keepalive: u16) -> Vec<PeerConfig> {
    let mut peers = Vec::new();
    for g in gateways {
        let (Ok(key), Ok(ip)) = (
            g.wg_public_key.parse::<PublicKey>(),
            g.tunnel_ip.parse::<IpAddr>(),
        ) else {
            tracing::warn!(
                node = g.node_id,
                "gateway with an invalid key or tunnel address; skipped"
            );
            continue;
        };
        let endpoint = match tokio::net::lookup_host(g.wg_endpoint.as_str()).await {
            Ok(mut addrs) => addrs.next(),
            Err(e) => {
                tracing::warn!(node = g.node_id, endpoint = %g.wg_endpoint, error = %e, "cannot resolve gateway endpoint");
                None
            }
        };
        let Some(endpoint) = endpoint else { continue };
        let mut p = PeerConfig::new(key, ip).with_endpoint(endpoint);
        if keepalive > 0 {
            p = p.with_keepalive(keepalive);
        }
        peers.push(p);
    }
    peers
}

/// Makes every gateway learn this CVM's UDP address now. Gateways have no endpoint for a CVM
/// (it may sit behind NAT) until the CVM sends an authenticated packet, and the persistent
/// keepalive fires only after its interval. A connect attempt to the gateway's tunnel address
/// queues a SYN, which makes the endpoint start a handshake; the gateway answers the SYN with a
/// reset (nothing listens there), so the attempt ends quickly and is otherwise harmless.
fn kick_gateways(endpoint: &Endpoint, peers: &[PeerConfig]) {
    for p in peers {
        let ep = endpoint.clone();
        let ip = p.tunnel_ip;
        tokio::spawn(async move {
            let _ = ep.connect_timeout(ip, 9, Duration::from_secs(5)).await;
        });
    }
}

/// One address as a host route: `/32` for IPv4, `/128` for IPv6.
fn host_cidr(ip: IpAddr) -> String {
    let len = if ip.is_ipv4() { 32 } else { 128 };
    format!("{ip}/{len}")
}

/// The wg-quick configuration equivalent to what the agent runs.
pub fn wg_quick_config(
    key: &PrivateKey,
    tunnel_ip: IpAddr,
    mtu: usize,
    gateways: &[GatewayPeer],
    keepalive: u16,
) -> String {
    let mut out = format!(
        "[Interface]\nPrivateKey = {}\nAddress = {}\nMTU = {mtu}\n",
        key.to_base64(),
        host_cidr(tunnel_ip)
    );
    for g in gateways {
        // Each gateway is allowed exactly its own address; an unparsable one (a cluster bug)
        // leaves the peer out rather than printing a config wg-quick would reject.
        let Ok(gw_ip) = g.tunnel_ip.parse::<IpAddr>() else {
            tracing::warn!(node = g.node_id, tunnel_ip = %g.tunnel_ip, "gateway with an invalid tunnel address; skipped");
            continue;
        };
        out.push_str(&format!(
            "\n# gateway node {} ({})\n[Peer]\nPublicKey = {}\nEndpoint = {}\nAllowedIPs = {}\n",
            g.node_id,
            g.region,
            g.wg_public_key,
            g.wg_endpoint,
            host_cidr(gw_ip)
        ));
        if keepalive > 0 {
            out.push_str(&format!("PersistentKeepalive = {keepalive}\n"));
        }
    }
    out
}

/// Accepts tunnel connections on `port` and relays each to `to`.
async fn relay_port(
    endpoint: Endpoint,
    port: u16,
    to: SocketAddr,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut listener = endpoint
        .listen(port)
        .await
        .with_context(|| format!("listen on tunnel port {port}"))?;
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            s = listener.accept() => match s {
                Some(s) => s,
                None => return Ok(()),
            },
        };
        tokio::spawn(async move {
            let peer = stream.peer_addr();
            let local =
                tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, tokio::net::TcpStream::connect(to))
                    .await;
            let mut local = match local {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, port, error = %e, "local service refused the relayed connection");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, port, "local service did not accept in time");
                    return;
                }
            };
            let _ = local.set_nodelay(true);
            let mut stream = stream;
            if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut local).await {
                tracing::debug!(%peer, port, error = %e, "relay ended");
            }
        });
    }
}

/// Runs the agent until `shutdown` fires.
pub async fn run(args: AgentArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = AgentConfig::load(&args.config)?;
    if !args.exit_with.is_empty() {
        let pids = args.exit_with.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            while pids.iter().any(|p| crate::procs::alive(*p)) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            tracing::info!("every watched process is gone; exiting");
            stop.cancel();
        });
    }
    let key = load_or_create_key(&cfg.wg_key)?;
    let public_key = key.public_key();
    let cred = Credential::load(&cfg)?;

    if args.print_wg_config {
        let reply = register(&cfg, &cred, &public_key, &[]).await?;
        let ip: IpAddr = reply
            .tunnel_ip
            .parse()
            .context("the cluster answered an invalid tunnel address")?;
        print!(
            "{}",
            wg_quick_config(&key, ip, cfg.mtu, &reply.gateways, cfg.keepalive_secs)
        );
        return Ok(());
    }

    // The first registration must succeed before anything else makes sense; retry with backoff.
    let mut delay = Duration::from_millis(500);
    let reply = loop {
        match register(&cfg, &cred, &public_key, &[]).await {
            Ok(r) => break r,
            Err(e @ RegisterError::Refused(_)) => return Err(e.into()),
            Err(e) => tracing::warn!(error = %e, retry_in = ?delay, "registration failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    };
    let tunnel_ip: IpAddr = reply
        .tunnel_ip
        .parse()
        .context("the cluster answered an invalid tunnel address")?;

    let socket = tokio::net::UdpSocket::bind(cfg.listen)
        .await
        .with_context(|| format!("bind udp {}", cfg.listen))?;
    // IPv4 or IPv6, whatever the cluster's pool is: the endpoint listens on the exposed ports
    // of this one address.
    let mut ecfg = EndpointConfig::new(key, tunnel_ip);
    ecfg.mtu = cfg.mtu;
    let endpoint = Endpoint::new(ecfg, socket).context("start the WireGuard endpoint")?;
    let peers = gateway_peer_configs(&reply.gateways, cfg.keepalive_secs).await;
    let n = peers.len();
    endpoint.set_peers(peers.clone()).await?;
    kick_gateways(&endpoint, &peers);
    for e in &cfg.expose {
        let ep = endpoint.clone();
        let stop = shutdown.clone();
        let (port, to) = e.resolve()?;
        tokio::spawn(async move {
            if let Err(e) = relay_port(ep, port, to, stop).await {
                tracing::error!(port, error = %format!("{e:#}"), "cannot expose port");
            }
        });
    }
    tracing::info!(
        instance = %cfg.instance_id,
        app = %cfg.app,
        %tunnel_ip,
        gateways = n,
        udp = %endpoint.local_addr(),
        expose = ?cfg.expose,
        "cvm-agent registered; tunnel up"
    );

    let mut known: Vec<(u64, String)> = reply
        .gateways
        .iter()
        .map(|g| (g.node_id, g.rpc_addr.clone()))
        .collect();
    let every = Duration::from_secs(cfg.reregister_secs);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
        match register(&cfg, &cred, &public_key, &known).await {
            Ok(r) => {
                // Compared as addresses: IPv6 has several spellings of one address.
                if r.tunnel_ip.parse::<IpAddr>().ok() != Some(tunnel_ip) {
                    // Only happens if the instance was removed and registered afresh; the
                    // endpoint's address is fixed, so start over with the new one.
                    bail!(
                        "the cluster moved this instance from {tunnel_ip} to {}; restart the agent",
                        r.tunnel_ip
                    );
                }
                let peers = gateway_peer_configs(&r.gateways, cfg.keepalive_secs).await;
                match endpoint.set_peers(peers.clone()).await {
                    Ok(_) => kick_gateways(&endpoint, &peers),
                    Err(e) => tracing::warn!(error = %e, "gateway list refused"),
                }
                known = r
                    .gateways
                    .iter()
                    .map(|g| (g.node_id, g.rpc_addr.clone()))
                    .collect();
            }
            Err(e) => {
                tracing::warn!(error = %e, "re-registration failed; keeping the current tunnel")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_with_defaults_and_rejects_bad_entries() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "cluster = [\"1@127.0.0.1:7000\"]\nca_cert = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
             app = \"web\"\ninstance_id = \"web-1\"\nregion = \"us-east\"\nexpose = [8080, \"9090=127.0.0.1:1\"]\n",
        )
        .expect("write");
        let cfg = AgentConfig::load(&path).expect("valid");
        assert_eq!(cfg.wg_key, dir.path().join("wg.key"));
        assert_eq!(cfg.keepalive_secs, 25);
        assert_eq!(
            cfg.expose,
            vec![Expose::Port(8080), Expose::Map("9090=127.0.0.1:1".into())]
        );
        let mut bad = cfg.clone();
        bad.cluster = vec!["127.0.0.1:7000".into()];
        let e = bad.validate().expect_err("no node id");
        assert!(format!("{e:#}").contains("<node-id>@"), "{e:#}");
        let mut bad = cfg;
        bad.expose = vec![Expose::Port(0)];
        assert!(bad.validate().is_err());
        bad.expose = vec![Expose::Map("80=127.0.0.1:9000".into()), Expose::Port(80)];
        assert!(bad.validate().is_err(), "port 80 twice");
        bad.expose = vec![Expose::Map("80=localhost".into())];
        assert!(bad.validate().is_err());
        assert_eq!(
            Expose::Map("80 = 127.0.0.1:9000".into())
                .resolve()
                .expect("map"),
            (80, "127.0.0.1:9000".parse().expect("addr"))
        );
    }

    #[test]
    fn wg_quick_config_lists_every_gateway() {
        let key = PrivateKey::generate();
        let gw = |id: u64| GatewayPeer {
            node_id: id,
            region: "r".into(),
            wg_public_key: PrivateKey::generate().public_key().to_base64(),
            wg_endpoint: format!("gw{id}.example:51820"),
            tunnel_ip: format!("198.18.0.{id}"),
            rpc_addr: String::new(),
        };
        let text = wg_quick_config(
            &key,
            IpAddr::from([100, 64, 0, 9]),
            1420,
            &[gw(1), gw(2)],
            25,
        );
        assert!(text.contains("Address = 100.64.0.9/32"));
        assert_eq!(text.matches("[Peer]").count(), 2);
        assert!(text.contains("AllowedIPs = 198.18.0.2/32"));
        assert!(text.contains("Endpoint = gw1.example:51820"));
        assert_eq!(text.matches("PersistentKeepalive = 25").count(), 2);

        // An IPv6 pool: the CVM and every gateway are /128 host routes.
        let gw6 = |id: u64| GatewayPeer {
            tunnel_ip: format!("fd70:6f72:7463::{id}"),
            ..gw(id)
        };
        let text = wg_quick_config(
            &key,
            "fd00:1::9".parse().expect("ip"),
            1420,
            &[
                gw6(1),
                gw6(2),
                GatewayPeer {
                    tunnel_ip: "bogus".into(),
                    ..gw(3)
                },
            ],
            0,
        );
        assert!(text.contains("Address = fd00:1::9/128"), "{text}");
        assert!(
            text.contains("AllowedIPs = fd70:6f72:7463::1/128"),
            "{text}"
        );
        assert!(
            text.contains("AllowedIPs = fd70:6f72:7463::2/128"),
            "{text}"
        );
        assert_eq!(
            text.matches("[Peer]").count(),
            2,
            "the bogus gateway is left out"
        );
        assert!(!text.contains("/32"), "{text}");
    }
}
