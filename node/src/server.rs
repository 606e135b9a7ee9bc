//! Running one gateway node: open the store, start Raft, serve the cluster and admin ports, wait
//! for a signal, drain.
//!
//! Listeners are bound by the caller and passed in, so tests (and later a deterministic
//! simulation) can hand over their own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use openraft::SnapshotPolicy;
use portcullis_raft::network::Network;
use portcullis_raft::service::ClusterService;
use portcullis_raft::store;
use portcullis_raft::tls::TlsMaterial;
use portcullis_raft::{Cluster, Raft};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::admin::{self, AdminState};
use crate::config::NodeConfig;
use crate::edge::upstream::TcpUpstream;
use crate::edge::{Edge, EdgeListeners};
use crate::metrics::Metrics;

/// How long SIGTERM waits for in-flight work before the node exits anyway.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

pub struct Listeners {
    pub cluster: TcpListener,
    pub admin: TcpListener,
    /// The public HTTPS and HTTP listeners; `None` when `edge.enabled = false`.
    pub edge: Option<EdgeListeners>,
}

impl Listeners {
    pub async fn bind(cfg: &NodeConfig) -> anyhow::Result<Self> {
        let cluster = TcpListener::bind(cfg.cluster.listen)
            .await
            .with_context(|| format!("bind cluster.listen {}", cfg.cluster.listen))?;
        let admin = TcpListener::bind(cfg.admin.listen)
            .await
            .with_context(|| format!("bind admin.listen {}", cfg.admin.listen))?;
        let edge = if cfg.edge.enabled {
            Some(EdgeListeners::bind(&cfg.edge).await.with_context(|| {
                format!(
                    "bind edge.https_listen {} / edge.http_listen {}",
                    cfg.edge.https_listen, cfg.edge.http_listen
                )
            })?)
        } else {
            None
        };
        Ok(Listeners {
            cluster,
            admin,
            edge,
        })
    }
}

fn read_token(cfg: &NodeConfig) -> anyhow::Result<String> {
    read_token_file(&cfg.admin.token_file)
}

/// The admin token from `path`, which only its owner may read (as the data key file:
/// `crate::secrets`): whoever reads it can rewrite the cluster's routes and certificates.
fn read_token_file(path: &std::path::Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "admin.token_file {}: cannot read the admin token",
            path.display()
        )
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "admin.token_file {}: readable by group or others (mode {mode:o}); the admin token must be private to its owner: chmod 600 {}",
            path.display(),
            path.display()
        );
    }
    let token = std::fs::read_to_string(path).with_context(|| {
        format!(
            "admin.token_file {}: cannot read the admin token",
            path.display()
        )
    })?;
    let token = token.trim().to_string();
    if token.len() < 16 {
        anyhow::bail!(
            "admin.token_file {}: the token must be at least 16 characters; refusing to start without one",
            path.display()
        );
    }
    Ok(token)
}

/// Runs the node until `shutdown` fires, then drains.
pub async fn run(
    cfg: NodeConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let token = read_token(&cfg)?;
    // Paths in the config are already absolute (NodeConfig::load resolves them).
    let keyring = Arc::new(
        crate::secrets::Keyring::load(&cfg.secrets, std::path::Path::new(""))
            .context("cluster data key")?,
    );
    tracing::info!(
        key_id = keyring.current_id().unwrap_or_default(),
        previous = ?keyring.previous_ids(),
        "data key loaded"
    );
    let tls = TlsMaterial::load(&cfg.cluster.ca_cert, &cfg.cluster.cert, &cfg.cluster.key)?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("create data_dir {}", cfg.data_dir.display()))?;
    let (log_store, sm) = store::open(&cfg.data_dir.join("raft")).await?;
    let shared = sm.shared();

    let c = &cfg.cluster;
    let raft_config = openraft::Config {
        cluster_name: "portcullis".into(),
        heartbeat_interval: c.heartbeat_ms,
        election_timeout_min: c.election_timeout_min_ms,
        election_timeout_max: c.election_timeout_max_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(c.snapshot_every),
        max_in_snapshot_log_to_keep: c.keep_logs_after_snapshot,
        // Chunks stay far below the transport's message limit.
        snapshot_max_chunk_size: 4 * 1024 * 1024,
        ..Default::default()
    }
    .validate()
    .context("raft timing configuration")?;

    let metrics = Arc::new(Metrics::new());
    let network = Network::new(
        tls.clone(),
        Duration::from_millis(c.connect_timeout_ms),
        metrics.raft.clone(),
    );
    let raft = Raft::new(
        cfg.node_id,
        Arc::new(raft_config),
        network.clone(),
        log_store,
        sm,
    )
    .await
    .context("start raft")?;
    let cluster = Cluster::new(
        cfg.node_id,
        raft.clone(),
        shared.clone(),
        network,
        metrics.raft.clone(),
    );

    let tracker = TaskTracker::new();
    let ready = Arc::new(AtomicBool::new(false));

    // WireGuard to CVMs: instances with a tunnel address are reached through it, the others
    // (a `backend_addr`) over plain TCP.
    let upstream: Arc<dyn crate::edge::upstream::Upstream> = if cfg.wg.enabled {
        let endpoint =
            crate::tunnel::gateway::start(&cfg, &shared, &cluster, &tracker, shutdown.clone())
                .await?;
        metrics.attach_wg(endpoint.counters().clone());
        Arc::new(crate::tunnel::upstream::TunnelUpstream::new(
            endpoint,
            shared.clone(),
        ))
    } else {
        Arc::new(TcpUpstream)
    };
    // No route may reach this node's listeners, or another member's on this host.
    let upstream: Arc<dyn crate::edge::upstream::Upstream> = {
        let mut own = vec![
            listeners.cluster.local_addr()?,
            listeners.admin.local_addr()?,
        ];
        if let Some(e) = &listeners.edge {
            own.extend([e.https.local_addr()?, e.http.local_addr()?]);
        }
        let members = cluster.clone();
        let peers: crate::edge::selfguard::PeerListeners = Arc::new(move || {
            members
                .members()
                .iter()
                .flat_map(|m| [&m.node.rpc_addr, &m.node.admin_addr])
                .filter_map(|a| a.parse().ok())
                .collect()
        });
        Arc::new(crate::edge::selfguard::SelfGuard::new(upstream, own, peers))
    };
    // Registrations are cluster-wide, so expiry runs whether or not this node terminates tunnels.
    crate::tunnel::registry::spawn_expiry(
        Duration::from_secs(cfg.wg.expire_after_secs),
        cluster.clone(),
        shared.clone(),
        metrics.clone(),
        &tracker,
        shutdown.clone(),
    );

    // Cluster RPC: mutual TLS; a client without a certificate from the cluster CA is refused
    // during the handshake.
    let server_tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
        .client_ca_root(Certificate::from_pem(&tls.ca_pem));
    let cluster_addr = listeners.cluster.local_addr()?;
    // Raft replies are small and latency-bound: Nagle would hold them for the peer's delayed
    // ACK. tonic sets TCP_NODELAY only on listeners it binds itself, not on an incoming stream.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listeners.cluster),
        |conn| {
            conn.inspect(|tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "cluster rpc: TCP_NODELAY not set");
                }
            })
        },
    );
    let rpc = Server::builder()
        .tls_config(server_tls)
        .context("cluster TLS config")?
        .timeout(Duration::from_secs(30))
        .add_service(ClusterService::new(cluster.clone()))
        // CVM credentials reach only this service (the Raft one refuses them before reading a
        // byte of the message), and a registration is small: 16 KiB at most (`Capped`).
        .add_service(portcullis_raft::service::Capped::new(
            crate::tunnel::registry::service(
                cluster.clone(),
                shared.clone(),
                Arc::new(crate::tunnel::registry::NoAttestation),
                crate::tunnel::registry::RegistryLimits::from_config(&cfg.wg),
            ),
        ));
    let sd = shutdown.clone();
    tracker.spawn(async move {
        if let Err(e) = rpc
            .serve_with_incoming_shutdown(incoming, sd.cancelled())
            .await
        {
            tracing::error!(error = %e, "cluster rpc server failed");
        }
    });

    // One TXT cache per node, shared by the data plane and `domain verify`.
    let dns = crate::edge::dns::TxtResolver::from_config(&cfg.dns, metrics.dns.clone())
        .context("dns resolver")?;

    let admin_addr = listeners.admin.local_addr()?;
    let edge_slot = crate::admin::EdgeSlot::default();
    let state = AdminState {
        cluster: cluster.clone(),
        region: cfg.region.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
        unsafe_stale_reads: cfg.debug.unsafe_stale_reads,
        dns: dns.clone(),
        base_domains: cfg.edge.base_domains.clone(),
        edge: edge_slot.clone(),
        keyring: keyring.clone(),
    };
    let router = admin::router(state, token);
    let sd = shutdown.clone();
    let admin_listener = listeners.admin;
    tracker.spawn(async move {
        if let Err(e) = admin::serve(admin_listener, router, sd).await {
            tracing::error!(error = %e, "admin server failed");
        }
    });

    // The data plane serves from the local applied state; it starts with whatever this node
    // has applied and follows every change.
    if let Some(edge_listeners) = listeners.edge {
        let https = edge_listeners.https.local_addr()?;
        let http = edge_listeners.http.local_addr()?;
        let balancer = crate::edge::balance::Balancer::new(
            &cfg.geo,
            cfg.health.clone(),
            &cfg.region,
            cfg.latitude,
            cfg.longitude,
        )
        .context("geo database")?;
        let edge = Edge::with_balancer(
            cfg.edge.clone(),
            &shared,
            upstream.clone(),
            metrics.edge.clone(),
            Arc::new(crate::acme::ReplicatedResponder::new(shared.clone())),
            Arc::new(balancer),
            keyring.clone(),
        )
        .context("start the data plane")?;
        edge.set_custom_domains(crate::edge::custom_domain::CustomDomains::new(dns.clone()));
        edge.set_waf(start_waf(&cfg, metrics.waf.clone()));
        // Compiling the CRS takes a second or so per policy; requests of protected apps that
        // arrive meanwhile follow their fail mode.
        let e = edge.clone();
        tracker.spawn_blocking(move || e.prepare_waf());
        tracker.spawn(reload_waf_on_sighup(edge.clone(), shutdown.clone()));
        let _ = edge_slot.set(edge.clone());
        edge.spawn(edge_listeners, shared.clone(), &tracker, shutdown.clone());
        tracker.spawn(announce_region(
            cluster.clone(),
            shared.clone(),
            portcullis_raft::state::Region {
                name: cfg.region.clone(),
                latitude: cfg.latitude,
                longitude: cfg.longitude,
            },
            shutdown.clone(),
        ));
        tracing::info!(%https, %http, bases = ?cfg.edge.base_domains, "data plane listening");
    }

    // ACME: expiry metrics on every node; the orderer (if `[acme] enabled`) competes for the
    // lease and, while holding it, orders and renews certificates.
    crate::acme::orderer::spawn(
        cfg.acme.clone(),
        cfg.edge.base_domains.clone(),
        cluster.clone(),
        metrics.acme.clone(),
        keyring,
        &tracker,
        shutdown.clone(),
    );

    crate::collisions::spawn(cluster.clone(), metrics.clone(), &tracker, shutdown.clone());

    ready.store(true, Ordering::Release);
    tracing::info!(node_id = cfg.node_id, region = %cfg.region, cluster = %cluster_addr, admin = %admin_addr, "node started");

    // A fatal Raft error (for example the disk filled up mid-append) stops openraft's core for
    // good while the process would otherwise keep running, answering nothing useful. Exit instead,
    // so a supervisor restarts the node once the cause is fixed.
    let mut raft_metrics = raft.metrics();
    let fatal = tokio::select! {
        _ = shutdown.cancelled() => None,
        f = async {
            loop {
                if let Err(f) = &raft_metrics.borrow_and_update().running_state {
                    return f.to_string();
                }
                if raft_metrics.changed().await.is_err() {
                    return "raft metrics channel closed".to_string();
                }
            }
        } => Some(f),
    };
    if let Some(f) = &fatal {
        tracing::error!(error = %f, "raft stopped with a fatal error; shutting the node down");
        shutdown.cancel();
    }
    tracing::info!("draining");
    ready.store(false, Ordering::Release);
    tracker.close();
    if tokio::time::timeout(DRAIN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?DRAIN_GRACE, "drain grace period over; exiting with tasks still running");
    }
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    match fatal {
        Some(f) => anyhow::bail!("raft stopped: {f}"),
        None => Ok(()),
    }
}

/// Writes this node's region and coordinates into the replicated state (`UpsertRegion`) unless
/// the state already defines that region, so every gateway can rank every region: a node knows
/// its own coordinates from its config; the others learn them here. Retries until the cluster
/// accepts the write (it may not have a leader yet at start-up).
async fn announce_region(
    cluster: Cluster,
    shared: store::SharedState,
    region: portcullis_raft::state::Region,
    shutdown: CancellationToken,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        if shared.read().state.regions.contains_key(&region.name) {
            return;
        }
        match cluster
            .write(portcullis_raft::Command::UpsertRegion(region.clone()))
            .await
        {
            Ok(_) => {
                tracing::info!(region = %region.name, lat = region.latitude, lon = region.longitude, "region announced");
                return;
            }
            Err(e) => tracing::debug!(error = %e, "region announcement not accepted yet; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The WAF engine from `[waf]`: the rules directory resolved, the library opened.
fn start_waf(
    cfg: &NodeConfig,
    metrics: Arc<crate::edge::protect::waf::WafMetrics>,
) -> Arc<crate::edge::protect::waf::Waf> {
    use crate::edge::protect::waf::{seclang::RuleFiles, Waf, WafSettings};
    let files = cfg.waf.crs_dir.as_ref().and_then(|dir| {
        RuleFiles::from_crs_dir(
            dir,
            cfg.waf.extra_conf.clone(),
            cfg.data_dir.join("waf-tmp"),
        )
        .map_err(|e| tracing::error!(error = %e, "WAF rules not found"))
        .ok()
    });
    if let Some(f) = &files {
        let _ = std::fs::create_dir_all(&f.tmp);
    }
    Waf::new(
        WafSettings {
            files,
            library: cfg.waf.library.clone(),
            audit_log: cfg.waf.audit_path(&cfg.data_dir),
            audit_all: cfg.waf.audit_all,
            max_concurrent: cfg.waf.concurrency(),
            node_id: cfg.node_id,
        },
        metrics,
    )
}

/// `SIGHUP` reloads the WAF rules (docs/waf.md); a rule set that fails to load keeps the old
/// one serving.
async fn reload_waf_on_sighup(edge: Arc<Edge>, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload WAF rules with `portcullis waf reload`");
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = hup.recv() => if r.is_none() { return },
        }
        let Some(waf) = edge.waf().cloned() else {
            continue;
        };
        match tokio::task::spawn_blocking(move || waf.reload()).await {
            Ok(Ok(n)) => tracing::info!(rule_sets = n, "SIGHUP: WAF rules reloaded"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "SIGHUP: WAF rules not reloaded; the previous rules keep serving")
            }
            Err(e) => tracing::error!(error = %e, "SIGHUP: WAF reload panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::read_token_file;

    #[test]
    fn an_admin_token_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.token");
        std::fs::write(&path, "0123456789abcdef0123\n").expect("write");
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let e = read_token_file(&path).expect_err("group/other-readable token");
            let msg = e.to_string();
            assert!(
                msg.contains(&path.display().to_string())
                    && msg.contains("chmod 600")
                    && msg.contains(&format!("{mode:o}")),
                "{msg}"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(
            read_token_file(&path).expect("private token"),
            "0123456789abcdef0123"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).expect("chmod");
        read_token_file(&path).expect("read-only for its owner is fine");
    }
}
