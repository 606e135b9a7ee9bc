//! The data plane: the public HTTPS and HTTP listeners.
//!
//! Request path on the HTTPS port (ARCHITECTURE.md §4):
//! accept (node-wide limit, accept backoff) → PROXY header if the peer is trusted → per-IP limit
//! → ClientHello (size cap, deadline) → route by SNI → either TLS passthrough (bytes relayed) or
//! TLS termination (rustls, certificate by SNI) → HTTP/1.1 or HTTP/2 (hyper) → [`proxy`].
//!
//! Layout:
//! - [`clienthello`]: SNI and ALPN from the raw ClientHello (pure, fuzzed).
//! - [`proxy_protocol`]: PROXY protocol v1/v2 (pure, fuzzed).
//! - [`grammar`]: what a host name asks for (pure, fuzzed, property-tested).
//! - [`route`]: the compiled routing table; [`hostport`]: `host:port` splitting and the connect
//!   target (pure, fuzzed).
//! - [`balance`]: backend choice (one geo `Selector` per app), instance health probes and
//!   passive ejection, client location; [`xff`]: the client a trusted proxy's
//!   `X-Forwarded-For` names (pure, fuzzed).
//! - [`custom_domain`]: custom domains: name rules, TXT proofs, the request-time routing check;
//!   [`dns`]: cached, deadline-bounded TXT lookups (hickory-resolver).
//! - [`tls`]: certificates from the replicated store; the rustls config (the PEM parsing and
//!   the crypto provider under them are the node's, in `crate::tls`).
//! - [`proxy`]: per-request forwarding, forwarded headers, WebSocket upgrades, error mapping.
//! - [`h1client`]: the pooled HTTP/1.1 client for bodiless requests, run in the request's task;
//!   [`h1wire`]: its wire format (pure, fuzzed).
//! - [`upstream`]: the `Upstream` connector trait and its TCP implementation;
//!   [`selfguard`]: keeps every backend connection off the gateway's own listeners.
//! - [`limits`]: connection limits, activity tracking for idle timeouts, replayed prefixes.
//! - [`redirect`]: the plain HTTP port (308, ACME HTTP-01);
//!   [`acme_hook`]: the hook through which ACME answers HTTP-01 and TLS-ALPN-01.
//! - [`h3`]: HTTP/3 over QUIC on the HTTPS port number (UDP), into the same [`proxy`].
//!
//! Routes and certificates live in one immutable [`Snapshot`] behind an `ArcSwap`, rebuilt when
//! the replicated state changes: requests never take a lock, and open connections keep going.

pub mod acme_hook;
pub mod balance;
pub mod clienthello;
pub mod custom_domain;
pub mod dns;
pub mod grammar;
pub mod h1client;
pub mod h1wire;
pub mod h3;
pub mod hostport;
pub mod limits;
pub mod proxy;
pub mod proxy_protocol;
pub mod redirect;
pub mod route;
pub mod selfguard;
mod sharded;
pub mod tls;
pub mod upstream;
pub mod worker;
pub mod xff;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Buf, BytesMut};
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use portcullis_raft::store::SharedState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::EdgeConfig;
use crate::metrics::{AppLabels, EdgeMetrics, ListenerLabels};
use acme_hook::AcmeResponder;
use clienthello::{parse_client_hello, ClientHello, HelloError};
use grammar::Mode;
use limits::{Activity, ActivityClock, Cidrs, ConnLimiter, ConnPermit, Rewind};
use proxy::{ConnCtx, Proxy, ProxySettings};
use proxy_protocol::{parse_proxy_header, ProxyError as PpError};
use route::{Route, RouteTable};
use tls::CertTable;
use upstream::{connect_with_timeout, Target, Upstream};

/// How long a connection that was asked to close may take to finish its in-flight requests.
const CONN_DRAIN: Duration = Duration::from_secs(10);

/// Routes and certificates from one applied state.
pub struct Snapshot {
    pub routes: RouteTable,
    pub certs: CertTable,
    /// Per-app selectors and instance health, built with `routes`.
    pub balance: balance::Balance,
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

pub struct EdgeListeners {
    pub https: TcpListener,
    pub http: TcpListener,
    /// HTTP/3 (UDP); `None` when `edge.http3 = false`.
    pub quic: Option<quinn::Endpoint>,
}

impl EdgeListeners {
    pub async fn bind(cfg: &EdgeConfig) -> io::Result<Self> {
        let https = TcpListener::bind(cfg.https_listen).await?;
        let http = TcpListener::bind(cfg.http_listen).await?;
        let quic = match cfg.http3 {
            true => Some(h3::bind(cfg, https.local_addr()?)?),
            false => None,
        };
        Ok(EdgeListeners { https, http, quic })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("tls configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Balance(#[from] balance::BalanceError),
}

/// Why a connection ended before its ClientHello was read.
#[derive(Debug, thiserror::Error)]
enum PreambleError {
    #[error("connection closed before a complete client hello")]
    Eof,
    #[error("client hello larger than {0} bytes")]
    TooLarge(usize),
    #[error(transparent)]
    Hello(HelloError),
    #[error(transparent)]
    Proxy(PpError),
    #[error(transparent)]
    Limit(limits::LimitError),
    #[error("read: {0}")]
    Io(#[from] io::Error),
}

impl PreambleError {
    fn reason(&self) -> &'static str {
        match self {
            PreambleError::Eof => "eof_before_hello",
            PreambleError::TooLarge(_) => "client_hello_too_large",
            PreambleError::Hello(HelloError::NotHandshake(_)) => "not_tls",
            PreambleError::Hello(_) => "malformed_client_hello",
            PreambleError::Proxy(_) => "proxy_protocol",
            PreambleError::Limit(e) => e.reason(),
            PreambleError::Io(_) => "io",
        }
    }
}

/// What was read before TLS: the real client, the ClientHello, and every byte after any PROXY
/// header (to be replayed into rustls or relayed to a passthrough backend).
struct Preamble {
    client: SocketAddr,
    hello: ClientHello,
    buf: BytesMut,
}

/// Reads any PROXY header and the ClientHello. From a trusted PROXY sender (`proxy_allowed`),
/// `client_known` is called with the real client as soon as the header (or its absence) says
/// who that is, before any of the ClientHello is waited for: an `Err` (the per-IP limit) ends
/// the connection there.
async fn read_preamble<S: AsyncRead + Unpin>(
    stream: &mut S,
    peer: SocketAddr,
    proxy_allowed: bool,
    cap: usize,
    mut client_known: impl FnMut(SocketAddr) -> Result<(), limits::LimitError>,
) -> Result<Preamble, PreambleError> {
    let mut buf = BytesMut::with_capacity(4096);
    let mut client = peer;
    // Only trusted peers may send a PROXY header; from them it is optional (a TLS record can
    // never start with either signature, so the two cannot be confused).
    let mut proxy_pending = proxy_allowed;
    loop {
        if proxy_pending {
            match parse_proxy_header(&buf) {
                Ok(h) => {
                    client = h.source.unwrap_or(peer);
                    buf.advance(h.consumed);
                    proxy_pending = false;
                    client_known(client).map_err(PreambleError::Limit)?;
                }
                Err(PpError::NotProxy) => {
                    proxy_pending = false;
                    client_known(client).map_err(PreambleError::Limit)?;
                }
                Err(PpError::Incomplete) => {}
                Err(e) => return Err(PreambleError::Proxy(e)),
            }
        }
        if !proxy_pending {
            match parse_client_hello(&buf) {
                Ok(hello) => return Ok(Preamble { client, hello, buf }),
                Err(HelloError::Incomplete) => {}
                Err(e) => return Err(PreambleError::Hello(e)),
            }
        }
        if buf.len() >= cap {
            return Err(PreambleError::TooLarge(cap));
        }
        let room = cap - buf.len();
        buf.reserve(room.min(16 * 1024));
        let n = (&mut *stream).take(room as u64).read_buf(&mut buf).await?;
        if n == 0 {
            return Err(PreambleError::Eof);
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Listener {
    Https,
    Http,
}

impl Listener {
    fn name(self) -> &'static str {
        match self {
            Listener::Https => "https",
            Listener::Http => "http",
        }
    }
}

/// Decrements the open-connections gauge when the connection task ends.
struct OpenGuard(prometheus_client::metrics::gauge::Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
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
        let (mut routes, balance, (certs, errors), locked, full) = match delta {
            Delta::Everything => {
                let routes = RouteTable::build(state, bases, index);
                let weights = balance::weights_of(state);
                let certs = state.certificates.clone();
                drop(applied);
                let locked = locked_at.elapsed();
                let balance = self.balancer.compile(&routes, weights, regions);
                let certs = CertTable::build(&certs, Some(&prev.certs), &self.keyring);
                (routes, balance, certs, locked, true)
            }
            Delta::Keys(ch) => {
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
                (routes, balance, certs, locked, false)
            }
        };
        for e in errors {
            tracing::warn!(error = %e, "stored certificate not loaded (an earlier version, if any, keeps serving)");
        }
        routes.changes = Some(cursor);
        self.snapshot.store(Arc::new(Snapshot {
            routes,
            certs,
            balance,
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

    /// Starts the state watcher and both accept loops on `tracker`.
    pub fn spawn(
        self: &Arc<Self>,
        listeners: EdgeListeners,
        shared: SharedState,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) {
        if self.cfg.https_public_port.is_none() {
            if let Ok(a) = listeners.https.local_addr() {
                self.https_port.store(a.port(), Ordering::Relaxed);
            }
        }
        if let Some(endpoint) = listeners.quic {
            if let Err(e) = h3::spawn(self, endpoint, tracker, shutdown.clone()) {
                tracing::error!(error = %e, "http/3 not served");
            }
        }
        let edge = self.clone();
        let sd = shutdown.clone();
        tracker.spawn(
            async move { edge.watch(shared, sd).await }
                .instrument(tracing::info_span!("edge_watch")),
        );
        tracker.spawn(
            balance::probe_loop(
                self.snapshot.clone(),
                self.upstream.clone(),
                self.balancer.health.clone(),
                self.metrics.clone(),
                shutdown.clone(),
            )
            .instrument(tracing::info_span!("health_probes")),
        );
        let edge = self.clone();
        let sd = shutdown.clone();
        tracker.spawn(async move { edge.proxy.reap_idle(sd).await });
        if let Some(db) = self.balancer.reloading_db() {
            tracker.spawn(balance::geo_reload_loop(db, shutdown.clone()));
        }
        // Redirects and ACME HTTP-01 are little work: the plain port stays on the shared runtime.
        self.accept_on_shared(listeners.http, Listener::Http, tracker, &shutdown);
        let workers = self.cfg.worker_threads();
        if workers == 0 {
            return self.accept_on_shared(listeners.https, Listener::Https, tracker, &shutdown);
        }
        let std = match listeners.https.into_std() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "https listener could not be handed to the workers");
                return;
            }
        };
        let edge = self.clone();
        let sd = shutdown.clone();
        let serve = move |listener, conns, seat| {
            let edge = edge.clone();
            let sd = sd.clone();
            async move {
                edge.accept_loop(listener, Listener::Https, conns, sd, Some(seat))
                    .await
            }
        };
        let cpus = worker::cpus(workers, self.cfg.pin_workers);
        if let Some(c) = &cpus {
            tracing::info!(cpus = ?c, "data-plane workers pinned, one per CPU");
        }
        if let Err(e) = worker::spawn(workers, &std, tracker, cpus.as_deref(), serve) {
            // Whichever workers started keep serving; the shared runtime accepts beside them.
            tracing::error!(error = %e, workers, "not every data-plane worker started");
            match TcpListener::from_std(std) {
                Ok(https) => self.accept_on_shared(https, Listener::Https, tracker, &shutdown),
                Err(e) => tracing::error!(error = %e, "https listener lost"),
            }
        }
    }

    /// Runs an accept loop on the node's shared runtime.
    fn accept_on_shared(
        self: &Arc<Self>,
        listener: TcpListener,
        kind: Listener,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        let edge = self.clone();
        let t = tracker.clone();
        let sd = shutdown.clone();
        tracker.spawn(async move { edge.accept_loop(listener, kind, t, sd, None).await });
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

    /// Accepts and serves connections. On a data-plane worker (`seat`), connections are
    /// spread over the workers: some accepted here are served by another, and others arrive
    /// from them.
    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        kind: Listener,
        tracker: TaskTracker,
        shutdown: CancellationToken,
        mut seat: Option<worker::Seat>,
    ) {
        // Accept errors (EMFILE, ENOBUFS) mean the node is out of something; retrying at once
        // would spin. Back off exponentially, as mini-redis does, and reset on success.
        const MIN_BACKOFF: Duration = Duration::from_millis(5);
        let mut backoff = MIN_BACKOFF;
        let labels = ListenerLabels {
            listener: kind.name(),
        };
        enum Next {
            Accepted(io::Result<(TcpStream, SocketAddr)>),
            Handed((TcpStream, SocketAddr, worker::Load)),
        }
        async fn handed(seat: &mut Option<worker::Seat>) -> (TcpStream, SocketAddr, worker::Load) {
            match seat {
                Some(s) => s.handed().await,
                None => std::future::pending().await,
            }
        }
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = listener.accept() => Next::Accepted(r),
                h = handed(&mut seat) => Next::Handed(h),
            };
            let (stream, peer, load) = match next {
                Next::Handed((stream, peer, load)) => (stream, peer, Some(load)),
                Next::Accepted(Ok((stream, peer))) => {
                    backoff = MIN_BACKOFF;
                    match &seat {
                        None => (stream, peer, None),
                        Some(seat) => match seat.place(stream, peer) {
                            Some((stream, load)) => (stream, peer, Some(load)),
                            None => continue,
                        },
                    }
                }
                Next::Accepted(Err(e)) => {
                    tracing::warn!(error = %e, ?backoff, listener = kind.name(), "accept failed; backing off");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let mut permit = match self.limiter.acquire() {
                Ok(p) => p,
                Err(e) => {
                    self.metrics.limit(e.reason());
                    continue;
                }
            };
            // The per-IP slot is taken here, before a byte is read: silent connections count
            // from the start, so one address cannot hold more than its quota open by never
            // finishing a ClientHello (or a PROXY header). A trusted PROXY sender is a load
            // balancer carrying many clients; its connections are charged to the client its
            // header names, as soon as the header is read (`serve_tls`).
            let charged_later =
                matches!(kind, Listener::Https) && self.proxy_from.contains(peer.ip());
            if !charged_later {
                if let Err(e) = permit.charge(peer.ip().to_canonical()) {
                    self.metrics.limit(e.reason());
                    tracing::debug!(error = %e, peer = %peer, "connection refused at accept");
                    continue;
                }
            }
            self.metrics.connections.get_or_create(&labels).inc();
            let gauge = self.metrics.open_connections.get_or_create(&labels).clone();
            gauge.inc();
            let edge = self.clone();
            let sd = shutdown.clone();
            let span = tracing::debug_span!("conn", listener = kind.name(), peer = %peer);
            tracker.spawn(
                async move {
                    let _open = OpenGuard(gauge);
                    let _load = load;
                    let _ = stream.set_nodelay(true);
                    match kind {
                        Listener::Https => edge.serve_tls(stream, peer, permit, sd).await,
                        Listener::Http => edge.serve_plain(stream, peer, permit, sd).await,
                    }
                }
                .instrument(span),
            );
        }
    }

    async fn serve_tls(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        mut permit: ConnPermit,
        shutdown: CancellationToken,
    ) {
        let hello_timeout = Duration::from_millis(self.cfg.client_hello_timeout_ms);
        // Untrusted peers were charged at accept; a trusted PROXY sender's connection is
        // charged to the client it names, once its header is read (`accept_loop`).
        let proxy_allowed = self.proxy_from.contains(peer.ip());
        let pre = match tokio::time::timeout(
            hello_timeout,
            read_preamble(
                &mut stream,
                peer,
                proxy_allowed,
                self.cfg.max_client_hello_bytes,
                |client| permit.charge(client.ip().to_canonical()),
            ),
        )
        .await
        {
            Err(_) => {
                self.metrics.limit("client_hello_timeout");
                return;
            }
            Ok(Err(e)) => {
                match e {
                    PreambleError::TooLarge(_) | PreambleError::Limit(_) => {
                        self.metrics.limit(e.reason())
                    }
                    _ => self.metrics.handshake_failure(e.reason()),
                }
                tracing::debug!(error = %e, "no client hello");
                return;
            }
            Ok(Ok(p)) => p,
        };
        let trusted = self.trusted.contains(pre.client.ip());
        let snap = self.snapshot.load_full();
        let sni = pre.hello.server_name.clone();
        // RFC 8737: a CA validating TLS-ALPN-01 offers only `acme-tls/1`. A name with a pending
        // answer gets the challenge certificate (through the ACME hook, `acme_hook.rs`); any
        // other is refused below, except passthrough names, whose backends may run their own
        // ACME clients.
        let acme_tls = acme_hook::is_acme_tls(&pre.hello.alpn);
        if let Some((name, cfg)) = sni
            .as_deref()
            .filter(|_| acme_tls)
            .and_then(|n| Some((n, self.acme.tls_alpn01(n)?)))
        {
            let limit = Duration::from_millis(self.cfg.tls_handshake_timeout_ms);
            let io = Rewind::new(pre.buf.freeze(), stream);
            let answer = self.acme.answer_tls_alpn01(cfg, Box::new(io), name, limit);
            if let Err(e) = answer.await {
                tracing::debug!(error = %e, "acme-tls/1 answer failed");
            }
            return;
        }
        let route = match sni.as_deref() {
            Some(n) => self.proxy.resolve_host(&snap.routes, n).await.ok(),
            None => None,
        };
        if let Some(r) = &route {
            if r.internal && !trusted {
                self.metrics.limit("internal_untrusted");
                return;
            }
            if r.mode == Mode::Passthrough {
                let r = r.clone();
                return self.passthrough(stream, pre, r, snap).await;
            }
        }
        if acme_tls {
            self.metrics.handshake_failure("acme_tls_no_challenge");
            tracing::debug!(sni = ?sni, "acme-tls/1 without a pending challenge refused");
            return;
        }
        drop(snap);

        let io = Rewind::new(pre.buf.freeze(), stream);
        let handshake = Duration::from_millis(self.cfg.tls_handshake_timeout_ms);
        let tls = match tokio::time::timeout(handshake, self.acceptor.accept(io)).await {
            Err(_) => {
                self.metrics.handshake_failure("timeout");
                return;
            }
            Ok(Err(e)) => {
                self.metrics.handshake_failure(classify_tls_error(&e));
                tracing::debug!(error = %e, sni = ?sni, "tls handshake failed");
                return;
            }
            Ok(Ok(s)) => s,
        };
        let ctx = Arc::new(ConnCtx::new(pre.client, "https", sni, route, trusted));
        self.serve_http(tls, ctx, shutdown).await;
    }

    async fn passthrough(
        &self,
        stream: TcpStream,
        pre: Preamble,
        route: Route,
        snap: Arc<Snapshot>,
    ) {
        self.metrics
            .passthrough_connections
            .get_or_create(&AppLabels {
                app: route.app.to_string(),
            })
            .inc();
        let candidates =
            balance::candidates(&snap, &self.balancer, &route, pre.client.ip(), None, 3);
        drop(snap);
        let candidates = match candidates {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(app = %route.app, reason = ?e, "passthrough: no backend");
                return;
            }
        };
        let timeout = Duration::from_millis(self.cfg.backend_connect_timeout_ms);
        // Nothing has been sent yet, so a connect failure can always move on to the next
        // choice: the buffered ClientHello is replayed to whichever backend answers.
        let mut connected = None;
        for cand in candidates {
            let Some(target) = cand
                .backend
                .address(route.port, route.default_port)
                .and_then(|a| Target::parse(&a))
            else {
                continue;
            };
            match connect_with_timeout(self.upstream.as_ref(), &target, timeout).await {
                Ok(u) => {
                    if let Some(h) = &cand.health {
                        h.record_connect_success();
                    }
                    let guard = cand.load.as_ref().map(|l| l.acquire());
                    connected = Some((u, target, guard));
                    break;
                }
                Err(e) => {
                    if let Some(h) = &cand.health {
                        h.record_connect_failure(self.balancer.health.passive_fall);
                    }
                    tracing::warn!(error = %e, backend = %target, app = %route.app, "passthrough connect failed");
                }
            }
        }
        let Some((mut up, target, _load)) = connected else {
            return;
        };
        if let Err(e) = up.write_all(&pre.buf).await {
            tracing::debug!(error = %e, backend = %target, "passthrough write failed");
            return;
        }
        tracing::debug!(backend = %target, app = %route.app, client = %pre.client, "passthrough");
        proxy::relay(stream, up, Duration::from_millis(self.cfg.idle_timeout_ms)).await;
    }

    /// `<cvm-id>.internal` requests that arrived on the admin listener, whose bearer token the
    /// admin layer has checked: served as from a trusted network, to that one instance.
    pub async fn serve_internal<B>(
        &self,
        client: SocketAddr,
        req: http::Request<B>,
    ) -> http::Response<proxy::ProxyBody>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
        B::Error: Into<proxy::BoxError>,
    {
        let ctx = ConnCtx::new(client, "http", None, None, true);
        self.proxy.handle(&self.snapshot, &ctx, req).await
    }

    /// The plain HTTP port: redirects, ACME, and `.internal` for trusted clients.
    async fn serve_plain(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        _permit: ConnPermit,
        shutdown: CancellationToken,
    ) {
        // Charged to `peer` at accept.
        let ctx = Arc::new(ConnCtx::new(
            peer,
            "http",
            None,
            None,
            self.trusted.contains(peer.ip()),
        ));
        self.serve_http(stream, ctx, shutdown).await;
    }

    async fn handle_request(
        &self,
        ctx: &ConnCtx,
        req: http::Request<hyper::body::Incoming>,
    ) -> http::Response<proxy::ProxyBody> {
        if ctx.scheme == "https" {
            let mut resp = self.proxy.handle(&self.snapshot, ctx, req).await;
            if let Some(v) = h3::alt_svc(self) {
                resp.headers_mut().insert(http::header::ALT_SVC, v);
            }
            return resp;
        }
        let host = proxy::request_host(&req).ok().map(|(h, _)| h);
        let internal = host.as_deref().is_some_and(|h| h.ends_with(".internal"));
        if internal && !req.uri().path().starts_with(redirect::ACME_PREFIX) {
            // `.internal` is operators' debugging inside trusted networks; the proxy refuses
            // untrusted clients with 403.
            return self.proxy.handle(&self.snapshot, ctx, req).await;
        }
        let served = host.as_deref().is_some_and(|h| {
            let snap = self.snapshot.load();
            snap.routes.resolve(h).is_ok() || snap.certs.lookup(h).is_some()
        });
        redirect::respond(
            &req,
            host.as_deref(),
            served,
            self.https_port.load(Ordering::Relaxed),
            self.acme.as_ref(),
        )
    }

    /// Serves HTTP/1.1 and HTTP/2 on one connection until it closes, is idle, grows too old, or
    /// the node shuts down.
    async fn serve_http<I>(self: &Arc<Self>, io: I, ctx: Arc<ConnCtx>, shutdown: CancellationToken)
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let mut clock = ActivityClock::new();
        let io = TokioIo::new(Activity::new(io, clock.clone()));
        let edge = self.clone();
        let svc_ctx = ctx.clone();
        let svc = service_fn(move |req| {
            let edge = edge.clone();
            let ctx = svc_ctx.clone();
            async move { Ok::<_, Infallible>(edge.handle_request(&ctx, req).await) }
        });
        let conn = self.http.serve_connection_with_upgrades(io, svc);
        tokio::pin!(conn);
        let idle = Duration::from_millis(self.cfg.idle_timeout_ms);
        let age = tokio::time::sleep(Duration::from_secs(self.cfg.max_connection_age_secs));
        tokio::pin!(age);
        let mut tick = tokio::time::interval(
            (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
        );
        let mut closing: Option<Instant> = None;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = &mut age, if closing.is_none() => {
                    closing = Some(Instant::now());
                    conn.as_mut().graceful_shutdown();
                }
                _ = shutdown.cancelled(), if closing.is_none() => {
                    closing = Some(Instant::now());
                    conn.as_mut().graceful_shutdown();
                }
                _ = tick.tick() => match closing {
                    Some(since) if since.elapsed() > CONN_DRAIN => return,
                    Some(_) => {}
                    None => {
                        if ctx.inflight.load(Ordering::Acquire) == 0 && clock.idle_for() >= idle {
                            tracing::debug!(?idle, "idle connection closed");
                            closing = Some(Instant::now());
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                },
            }
        }
    }
}

fn classify_tls_error(e: &io::Error) -> &'static str {
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return "io";
    };
    match inner {
        rustls::Error::PeerIncompatible(_) => "peer_incompatible",
        rustls::Error::General(_) => "no_certificate",
        rustls::Error::AlertReceived(_) => "alert_received",
        _ => "other",
    }
}

#[cfg(test)]
pub(crate) mod rebuild_scale;
#[cfg(test)]
mod tests;
