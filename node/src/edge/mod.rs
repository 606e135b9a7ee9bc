//! The data plane: the public HTTPS and HTTP listeners, and everything a request meets between
//! a client's first byte and a backend's last.
//!
//! What the wing owns: the listeners (TCP and QUIC), the routing [`Snapshot`] (routes,
//! certificates, balancer) rebuilt from the replicated state, connections and requests, backend
//! choice and health, backend connections, and custom domains with their DNS lookups.
//!
//! What it may import: the node's leaves — `config` (its settings), `metrics`, `secrets` (to
//! open sealed certificate keys) and `tls` (PEM parsing, the crypto provider) — and the
//! replicated state, read only (`portcullis_raft`'s store), and `portcullis_geo`. Nothing here
//! writes through Raft (the server announces the node's region). ACME plugs in through
//! [`acme_hook`] and the WireGuard tunnel as an [`upstream::Upstream`]; neither is imported,
//! nor is the server, the admin API or the CLI.
//!
//! The request path on the HTTPS port, file by file:
//! 1. `accept.rs`: accept (node-wide limit, accept backoff), the per-IP limit, one task per
//!    connection, on the data-plane [`worker`]s or the shared runtime. `Edge::spawn` starts it
//!    all.
//! 2. `preamble.rs`: a PROXY header if the peer is trusted ([`proxy_protocol`]), then the
//!    ClientHello ([`clienthello`]; size cap, deadline).
//! 3. `conn.rs`: the connection by its SNI — a TLS-ALPN-01 answer ([`acme_hook`]), or a route
//!    ([`route`], [`grammar`], [`custom_domain`] with [`dns`]) that is either relayed as it is
//!    (`passthrough.rs`: a backend from [`balance`], bytes both ways) or terminated (rustls,
//!    the certificate by SNI from [`tls`]).
//! 4. `serve.rs`: HTTP/1.1 or HTTP/2 on the connection (hyper), idle and age limits, drain.
//! 5. [`proxy`]: per request — route check, backend choice ([`balance`], [`xff`]), forwarded
//!    headers, forwarding over pooled connections ([`h1client`] with [`h1wire`], hyper's
//!    clients) through [`upstream`] and [`selfguard`], WebSocket upgrades, the error mapping.
//!
//! The plain HTTP port takes steps 1, 4 and [`redirect`] (308 to HTTPS, ACME HTTP-01), and
//! `.internal` names go to step 5 for trusted clients. [`h3`]: HTTP/3 over QUIC on the HTTPS
//! port number (UDP), into the same [`proxy`]. [`limits`]: connection limits, activity tracking
//! for idle timeouts, replayed prefixes.
//!
//! Pure files (no I/O, fuzzed: `node/fuzz` compiles them by path, so they stay where they are):
//! [`clienthello`], [`proxy_protocol`], [`grammar`], [`hostport`], [`h1wire`], [`xff`].
//!
//! Protections to come: WAF rules and request rate limits will live in `edge/protect/` and run
//! in `proxy/forward.rs` (`Proxy::forward`), once a request's route is known and before a
//! backend is chosen, so that they see the app and the effective client and refuse through
//! `ProxyError`. Connection-level limits stay in [`limits`].
//!
//! Routes and certificates live in one immutable [`Snapshot`] behind an `ArcSwap`, rebuilt when
//! the replicated state changes: requests never take a lock, and open connections keep going.

mod accept;
pub mod acme_hook;
pub mod balance;
pub mod clienthello;
mod conn;
pub mod custom_domain;
pub mod dns;
pub mod grammar;
pub mod h1client;
pub mod h1wire;
pub mod h3;
pub mod hostport;
pub mod limits;
mod passthrough;
mod preamble;
pub mod protect;
pub mod proxy;
pub mod proxy_protocol;
pub mod redirect;
pub mod route;
pub mod selfguard;
mod serve;
mod sharded;
pub mod tls;
pub mod upstream;
pub mod worker;
pub mod xff;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::HeaderValue;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use portcullis_raft::store::SharedState;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::EdgeConfig;
use crate::metrics::EdgeMetrics;
use acme_hook::AcmeResponder;
use limits::{Cidrs, ConnLimiter};
use proxy::{Proxy, ProxySettings};
use route::RouteTable;
use tls::CertTable;
use upstream::Upstream;

pub use accept::EdgeListeners;

/// Routes and certificates from one applied state.
pub struct Snapshot {
    pub routes: RouteTable,
    pub certs: CertTable,
    /// Per-app selectors and instance health, built with `routes`.
    pub balance: balance::Balance,
    /// Each app's WAF policy.
    pub waf: Arc<protect::waf::Policies>,
}

/// What one [`Edge::rebuild`] cost.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RebuildStats {
    /// The applied-state read lock was held this long.
    pub locked: Duration,
    pub total: Duration,
    /// The whole state was compiled (first build, snapshot install, journal overflow).
    pub full: bool,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("applied_index", &self.routes.applied_index)
            .field("certs", &self.certs.len())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("tls configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Balance(#[from] balance::BalanceError),
}

pub struct Edge {
    cfg: EdgeConfig,
    snapshot: Arc<ArcSwap<Snapshot>>,
    acceptor: TlsAcceptor,
    limiter: Arc<ConnLimiter>,
    proxy_from: Cidrs,
    trusted: Cidrs,
    metrics: Arc<EdgeMetrics>,
    proxy: Proxy,
    upstream: Arc<dyn Upstream>,
    http: auto::Builder<TokioExecutor>,
    acme: Arc<dyn AcmeResponder>,
    balancer: Arc<balance::Balancer>,
    /// The HTTPS port redirects point at: `edge.https_public_port`, else the bound port (known
    /// only once the listener is handed over, hence atomic).
    https_port: std::sync::atomic::AtomicU16,
    /// `Alt-Svc` for TLS responses, set once HTTP/3 listens.
    alt_svc: arc_swap::ArcSwapOption<HeaderValue>,
    /// Opens the sealed certificate keys of the replicated state.
    keyring: Arc<crate::secrets::Keyring>,
}

impl Edge {
    /// Builds the edge and its first snapshot from `shared`, with the bundled geo database
    /// and default health settings, serving only unsealed (plaintext) certificate keys.
    pub fn new(
        cfg: EdgeConfig,
        shared: &SharedState,
        upstream: Arc<dyn Upstream>,
        metrics: Arc<EdgeMetrics>,
        acme: Arc<dyn AcmeResponder>,
    ) -> Result<Arc<Edge>, EdgeError> {
        let balancer = balance::Balancer::new(
            &balance::GeoConfig::default(),
            balance::HealthConfig::default(),
            "local",
            0.0,
            0.0,
        )?;
        Self::with_balancer(
            cfg,
            shared,
            upstream,
            metrics,
            acme,
            Arc::new(balancer),
            Default::default(),
        )
    }

    /// Builds the edge and its first snapshot from `shared`.
    pub fn with_balancer(
        cfg: EdgeConfig,
        shared: &SharedState,
        upstream: Arc<dyn Upstream>,
        metrics: Arc<EdgeMetrics>,
        acme: Arc<dyn AcmeResponder>,
        balancer: Arc<balance::Balancer>,
        keyring: Arc<crate::secrets::Keyring>,
    ) -> Result<Arc<Edge>, EdgeError> {
        let empty = Snapshot {
            routes: RouteTable::build(&Default::default(), &cfg.base_domains, 0),
            certs: CertTable::default(),
            balance: balance::Balance::default(),
            waf: Default::default(),
        };
        let snapshot = Arc::new(ArcSwap::from_pointee(empty));
        let acceptor = TlsAcceptor::from(tls::server_config(snapshot.clone())?);
        let ms = Duration::from_millis;
        let hsts = (cfg.hsts_max_age_secs > 0)
            .then(|| HeaderValue::from_str(&format!("max-age={}", cfg.hsts_max_age_secs)).ok())
            .flatten();
        let proxy = Proxy::new(
            upstream.clone(),
            proxy::Pooling {
                connect_timeout: ms(cfg.backend_connect_timeout_ms),
                idle: ms(cfg.backend_pool_idle_timeout_ms),
                max_idle: cfg.backend_pool_max_idle,
                workers: cfg.worker_threads(),
            },
            ProxySettings {
                request_timeout: ms(cfg.request_timeout_ms),
                max_body: cfg.max_request_body_bytes,
                hsts,
                access_log: cfg.access_log,
                upgrade_idle_timeout: ms(cfg.idle_timeout_ms),
            },
            metrics.clone(),
            (balancer.clone(), Cidrs::parse(&cfg.proxy_protocol_from)),
        );
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(ms(cfg.header_read_timeout_ms))
            .max_headers(cfg.max_header_count)
            .max_buf_size(cfg.max_header_bytes.max(8192));
        http.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(cfg.h2_max_concurrent_streams)
            // WebSocket over HTTP/2 (RFC 8441 extended CONNECT).
            .enable_connect_protocol()
            .max_pending_accept_reset_streams(cfg.h2_max_pending_reset_streams)
            .max_local_error_reset_streams(cfg.h2_max_pending_reset_streams)
            .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(ms(cfg.idle_timeout_ms / 2))
            .keep_alive_timeout(ms(cfg.idle_timeout_ms / 4));
        let https_port = std::sync::atomic::AtomicU16::new(
            cfg.https_public_port.unwrap_or(cfg.https_listen.port()),
        );
        let edge = Arc::new(Edge {
            limiter: ConnLimiter::new(cfg.max_connections, cfg.max_connections_per_ip),
            proxy_from: Cidrs::parse(&cfg.proxy_protocol_from),
            trusted: Cidrs::parse(&cfg.trusted_networks),
            cfg,
            snapshot,
            acceptor,
            metrics,
            proxy,
            upstream,
            http,
            acme,
            balancer,
            https_port,
            alt_svc: Default::default(),
            keyring,
        });
        edge.rebuild(shared);
        Ok(edge)
    }

    /// Installs the WAF engine (set once, before `spawn`). Call [`Edge::prepare_waf`] next, off
    /// the event loops.
    pub fn set_waf(&self, waf: Arc<protect::waf::Waf>) {
        self.proxy.set_waf(waf);
    }

    /// Compiles the rule sets of the current snapshot's policies. Blocking.
    pub fn prepare_waf(&self) {
        if let Some(w) = self.proxy.waf() {
            w.prepare(self.snapshot.load().waf.in_use());
        }
    }

    /// The WAF engine, when installed.
    pub fn waf(&self) -> Option<&Arc<protect::waf::Waf>> {
        self.proxy.waf()
    }

    /// Custom domains route only while their `_dstack-app-address` TXT record names the
    /// claimed app (docs/custom-domains.md). Set once, before `spawn`.
    pub fn set_custom_domains(&self, c: custom_domain::CustomDomains) {
        self.proxy.set_custom_domains(c);
    }

    /// The current routes and certificates.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Compiles a new snapshot from the applied state and swaps it in.
    pub fn rebuild(&self, shared: &SharedState) {
        self.rebuild_timed(shared);
    }

    /// [`Edge::rebuild`], reporting how long it held the state's read lock.
    ///
    /// The read lock blocks Raft `apply`, so under it only the keys that changed since the
    /// previous snapshot are copied out (the state machine journals them:
    /// `portcullis_raft::changes`). The next snapshot is compiled outside the lock from the
    /// previous one, rebuilding only the touched apps' entries and selectors and sharing the
    /// rest. The first rebuild, and one after a snapshot install or a journal overflow, copies
    /// the whole state instead.
    pub(crate) fn rebuild_timed(&self, shared: &SharedState) -> RebuildStats {
        use portcullis_raft::changes::Delta;
        let started = Instant::now();
        let prev = self.snapshot.load_full();
        let bases = &self.cfg.base_domains;
        let (applied, delta, cursor) = shared.read_changes(prev.routes.changes);
        let locked_at = Instant::now();
        let index = applied.last_applied.map(|l| l.index).unwrap_or(0);
        let state = &applied.state;
        let regions = self.balancer.regions(state);
        let (mut routes, balance, (certs, errors), locked, full, waf) = match delta {
            Delta::Everything => {
                let waf = Arc::new(protect::waf::Policies::from_state(&state.waf));
                let routes = RouteTable::build(state, bases, index);
                let weights = balance::weights_of(state);
                let certs = state.certificates.clone();
                drop(applied);
                let locked = locked_at.elapsed();
                let balance = self.balancer.compile(&routes, weights, regions);
                let certs = CertTable::build(&certs, Some(&prev.certs), &self.keyring);
                (routes, balance, certs, locked, true, waf)
            }
            Delta::Keys(ch) => {
                let waf = if ch.apps.is_empty() {
                    prev.waf.clone()
                } else {
                    Arc::new(prev.waf.update(&state.waf, ch.apps.iter()))
                };
                let update = route::RouteUpdate::collect(
                    state,
                    ch.instances.iter().cloned(),
                    ch.apps.iter().cloned(),
                    ch.domains.iter().cloned(),
                );
                let weights: Vec<(String, Option<u32>)> = ch
                    .instances
                    .iter()
                    .map(|id| (id.clone(), balance::weight_of(state, id)))
                    .collect();
                let certs: Vec<_> = ch
                    .certificates
                    .iter()
                    .map(|n| (n.clone(), state.certificates.get(n).cloned()))
                    .collect();
                drop(applied);
                let locked = locked_at.elapsed();
                let (routes, changed) = prev.routes.update(&update, index);
                let balance =
                    self.balancer
                        .update(&prev.balance, &routes, &changed, &weights, regions);
                let certs = prev.certs.update(&certs, &self.keyring);
                (routes, balance, certs, locked, false, waf)
            }
        };
        for e in errors {
            tracing::warn!(error = %e, "stored certificate not loaded (an earlier version, if any, keeps serving)");
        }
        routes.changes = Some(cursor);
        // A changed policy gets its rule set before the snapshot that carries it serves, so a
        // request never meets a policy whose rules are still compiling (which would send it
        // down the fail mode). Blocking, a few hundred milliseconds for a policy never seen
        // before; this runs on a blocking thread (`watch`).
        if !Arc::ptr_eq(&waf, &prev.waf) {
            if let Some(w) = self.proxy.waf() {
                w.prepare(waf.in_use());
            }
        }
        self.snapshot.store(Arc::new(Snapshot {
            routes,
            certs,
            balance,
            waf,
        }));
        self.metrics.route_table_rebuilds.inc();
        self.metrics
            .route_table_apply_index
            .set(i64::try_from(index).unwrap_or(i64::MAX));
        tracing::debug!(index, full, "routing table rebuilt");
        RebuildStats {
            locked,
            total: started.elapsed(),
            full,
        }
    }

    async fn watch(self: Arc<Self>, shared: SharedState, shutdown: CancellationToken) {
        // A rebuild costs O(what changed) (`rebuild_timed`), but a full one, and the changed
        // apps' selectors, still cost real CPU. Under a burst of writes (hundreds per second)
        // rebuilding after every entry would spend it on snapshots that are replaced a
        // millisecond later; at most one rebuild per interval lets the watch channel coalesce
        // a burst into one. Routes still change within this interval plus one rebuild, far
        // inside the 1 s promise.
        const MIN_REBUILD_INTERVAL: Duration = Duration::from_millis(25);
        let mut rx = shared.subscribe();
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
            let wait = MIN_REBUILD_INTERVAL.saturating_sub(last.elapsed());
            if !wait.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                // Whatever arrived meanwhile is in this rebuild.
                rx.borrow_and_update();
            }
            last = tokio::time::Instant::now();
            // Parsing certificates is CPU work; keep it off the async workers.
            let edge = self.clone();
            let s = shared.clone();
            match tokio::task::spawn_blocking(move || edge.rebuild_timed(&s)).await {
                // Incremental rebuilds take well under a millisecond of lock; a slow one (a full
                // rebuild of a large state) is worth a line in the log.
                Ok(st) if st.total > Duration::from_millis(100) => tracing::info!(
                    total_ms = st.total.as_millis() as u64,
                    lock_ms = st.locked.as_millis() as u64,
                    full = st.full,
                    "slow routing table rebuild"
                ),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "routing table rebuild panicked"),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod rebuild_scale;
#[cfg(test)]
mod tests;
