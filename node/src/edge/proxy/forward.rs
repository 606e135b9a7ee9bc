//! Forwarding one request: the route check (the SNI's route on TLS, trusted networks for
//! `.internal`), backend choice, the attempts over pooled HTTP/1.1 or h2c connections, and the
//! response streamed back with HSTS; request metrics and the access log.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::error::{BoxError, Fault, ProxyBody, ProxyError};
use super::headers::{narrow_cookie_domains, strip_hop_by_hop, ForwardedFor};
use super::upgrade::{
    self, is_upgrade_request, is_websocket_connect, websocket_handshake, Answered,
};
use crate::edge::balance::{self, Balancer, NoCandidate};
use crate::edge::grammar::{GrammarError, Mode};
use crate::edge::h1client::H1Pool;
use crate::edge::limits::Cidrs;
use crate::edge::protect::waf::gate::{self, REQUEST_ID};
use crate::edge::protect::waf::Waf;
use crate::edge::route::{Route, RouteError, RouteTable};
use crate::edge::upstream::{HyperConnector, Upstream};
use crate::edge::Snapshot;
use crate::metrics::{AppLabels, EdgeMetrics, ProtocolLabels, RequestLabels};

/// What a connection knows about itself, shared by its requests.
pub struct ConnCtx {
    /// The client, after any trusted PROXY header.
    pub client: SocketAddr,
    /// `https` on the TLS listener, `http` on the plain one.
    pub scheme: &'static str,
    /// The TLS server name and the route it resolved to (TLS connections only).
    pub sni: Option<String>,
    pub sni_route: Option<Route>,
    /// The client is in `edge.trusted_networks` (may use `.internal`).
    pub trusted: bool,
    /// Requests whose response head has not been sent yet; an idle connection has none.
    pub inflight: AtomicUsize,
    /// The forwarded headers' client part, formatted on the connection's first request:
    /// every request of a keep-alive connection names the same client.
    pub forwarded: std::sync::OnceLock<ForwardedFor>,
    /// The route the connection's last request was sent on, while the routing snapshot is
    /// the same one: a keep-alive connection names one host, and parsing and resolving it
    /// again was a few percent of the node's CPU per request.
    pub last_route: std::sync::Mutex<Option<LastRoute>>,
    /// The request metrics the connection last counted into: its requests mostly share app,
    /// status and protocol, and three label-map lookups (a SipHash and a lock each) per
    /// request are skipped.
    metrics: std::sync::Mutex<Option<RequestMetrics>>,
}

impl ConnCtx {
    pub fn new(
        client: SocketAddr,
        scheme: &'static str,
        sni: Option<String>,
        sni_route: Option<Route>,
        trusted: bool,
    ) -> Self {
        ConnCtx {
            client,
            scheme,
            sni,
            sni_route,
            trusted,
            inflight: AtomicUsize::new(0),
            forwarded: Default::default(),
            last_route: Default::default(),
            metrics: Default::default(),
        }
    }
}

/// One (app, status, protocol)'s series. prometheus-client's metrics are shared handles, and
/// the request families never remove a series, so a kept handle stays the exported one.
struct RequestMetrics {
    app: Arc<str>,
    status: u16,
    version: Version,
    requests: prometheus_client::metrics::counter::Counter,
    by_protocol: prometheus_client::metrics::counter::Counter,
    duration: prometheus_client::metrics::histogram::Histogram,
}

/// A route that passed every check for this connection (SNI match, trusted networks, not
/// passthrough), for the authority exactly as the client sent it.
pub struct LastRoute {
    authority: Bytes,
    /// Weak, so the snapshot is not kept alive, and its address not reused while this is held.
    snapshot: std::sync::Weak<Snapshot>,
    route: Route,
}

/// Proxy settings taken from `EdgeConfig`.
pub struct ProxySettings {
    pub request_timeout: Duration,
    pub max_body: u64,
    pub hsts: Option<HeaderValue>,
    pub access_log: bool,
    pub upgrade_idle_timeout: Duration,
}

/// How backend connections are opened and kept.
pub struct Pooling {
    pub connect_timeout: Duration,
    /// Idle connections close after this long.
    pub idle: Duration,
    /// Idle connections kept per backend address, per event loop.
    pub max_idle: usize,
    /// Data-plane worker threads (`super::worker`), each of which gets its own pools.
    pub workers: usize,
}

/// One event loop's backend connection pools.
struct Pools {
    /// Requests without a body to HTTP/1.1 backends: the bulk of the traffic (`h1client`).
    direct: H1Pool,
    /// Requests with a body, and upgrades.
    http1: Client<HyperConnector, ProxyBody>,
    h2c: Client<HyperConnector, ProxyBody>,
}

pub struct Proxy {
    /// Index 0 serves the node's shared runtime (HTTP/3, the admin listener); index `1 + i`
    /// serves data-plane worker `i` (`super::worker`). A pooled connection is driven by the
    /// event loop that opened it, so a worker that used another loop's pool would hand every
    /// request to another thread and back.
    pools: Box<[Pools]>,
    settings: ProxySettings,
    metrics: Arc<EdgeMetrics>,
    balancer: Arc<Balancer>,
    /// Senders whose `X-Forwarded-For` names the client (the PROXY protocol senders).
    xff_from: Cidrs,
    /// The DNS check for custom domains, set once by the node (`Edge::set_custom_domains`).
    /// Unset (unit tests), custom domains route on their verified claim alone.
    custom: std::sync::OnceLock<crate::edge::custom_domain::CustomDomains>,
    /// The WAF engine, set once by the node (`Edge::set_waf`). Unset (unit tests), apps with a
    /// WAF policy are forwarded uninspected.
    waf: std::sync::OnceLock<Arc<Waf>>,
}

/// What forwarding learnt about a request, for metrics, the access log and error responses.
#[derive(Default)]
struct Progress {
    app: Option<Arc<str>>,
    instance: Option<Arc<crate::edge::route::Backend>>,
    authority: Option<Bytes>,
    /// Set when the WAF inspected the request.
    request_id: Option<String>,
}

/// Backends one request may try: the first choice and, after connect failures of a request
/// that can be resent, the next ones.
const MAX_ATTEMPTS: usize = 3;

struct InflightGuard<'a>(&'a AtomicUsize);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The authority a request names, as sent: the URI's (HTTP/2 `:authority`, absolute-form) or
/// the Host header.
fn raw_authority<B>(req: &Request<B>) -> Option<&[u8]> {
    match req.uri().authority() {
        Some(a) => Some(a.as_str().as_bytes()),
        None => req.headers().get(header::HOST).map(|h| h.as_bytes()),
    }
}

/// The host a request asks for: the URI authority (HTTP/2 `:authority`, absolute-form) or the
/// Host header, lowercased, without port.
pub fn request_host<B>(req: &Request<B>) -> Result<(String, String), ProxyError> {
    let authority = match req.uri().authority() {
        Some(a) => a.clone(),
        None => {
            let h = req
                .headers()
                .get(header::HOST)
                .ok_or_else(|| ProxyError::BadHost("no Host header".into()))?;
            let s = h
                .to_str()
                .map_err(|_| ProxyError::BadHost("Host is not ASCII".into()))?;
            s.parse::<http::uri::Authority>()
                .map_err(|_| ProxyError::BadHost(format!("Host {s:?} is malformed")))?
        }
    };
    let host = crate::edge::grammar::normalize_host(authority.host())
        .map_err(|e| ProxyError::BadHost(e.to_string()))?;
    Ok((host, without_userinfo(authority.as_str()).to_string()))
}

/// An authority without any `user:pass@` in front: clients must not send one (RFC 9110 §4.2.4,
/// RFC 9113 §8.3.1), and a backend must not be handed someone's credentials in `Host`.
fn without_userinfo(authority: &str) -> &str {
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
}

/// Is the request target one a backend may be given as is? HTTP/2 and HTTP/3 `:path` must be
/// origin-form (`/…`), or `*` for OPTIONS (RFC 9113 §8.3.1, RFC 9114 §4.3.1): absolute-form,
/// an empty path or a bare `foo` would reach the backend as a request line the gateway never
/// routed. HTTP/1.1 absolute-form arrives as a path (hyper splits it), `http://host` alone as
/// none.
fn origin_form<B>(req: &Request<B>) -> bool {
    match req.uri().path_and_query().map(|p| p.as_str()) {
        Some(p) if p.starts_with('/') => true,
        Some("*") => req.method() == Method::OPTIONS,
        Some(_) => false,
        None => req.version() < Version::HTTP_2 && req.uri().scheme().is_some(),
    }
}

/// `http://<addr><path-and-query>`, from parts (the path is shared, not copied).
fn backend_uri(addr: &str, pq: &http::uri::PathAndQuery) -> Result<Uri, http::Error> {
    Uri::builder()
        .scheme(http::uri::Scheme::HTTP)
        .authority(addr)
        .path_and_query(pq.clone())
        .build()
}

/// The `protocol` label of `requests_by_protocol`.
fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_3 => "h3",
        Version::HTTP_2 => "h2",
        Version::HTTP_10 => "http/1.0",
        _ => "http/1.1",
    }
}

fn text_response(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl Proxy {
    pub fn new(
        upstream: Arc<dyn Upstream>,
        pooling: Pooling,
        settings: ProxySettings,
        metrics: Arc<EdgeMetrics>,
        (balancer, xff_from): (Arc<Balancer>, Cidrs),
    ) -> Self {
        let connector = HyperConnector {
            upstream: upstream.clone(),
            timeout: pooling.connect_timeout,
        };
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_idle_timeout(pooling.idle)
            .pool_max_idle_per_host(pooling.max_idle)
            .pool_timer(TokioTimer::new());
        let pools = (0..=pooling.workers)
            .map(|_| Pools {
                direct: H1Pool::new(
                    upstream.clone(),
                    pooling.connect_timeout,
                    pooling.idle,
                    pooling.max_idle,
                    settings.upgrade_idle_timeout,
                ),
                http1: b.build(connector.clone()),
                h2c: b.clone().http2_only(true).build(connector.clone()),
            })
            .collect();
        Proxy {
            pools,
            settings,
            metrics,
            balancer,
            xff_from,
            custom: std::sync::OnceLock::new(),
            waf: std::sync::OnceLock::new(),
        }
    }

    /// Installs the WAF engine; later calls are ignored.
    pub fn set_waf(&self, w: Arc<Waf>) {
        let _ = self.waf.set(w);
    }

    pub fn waf(&self) -> Option<&Arc<Waf>> {
        self.waf.get()
    }

    /// Closes the direct client's backend connections that sat idle past the pool's idle
    /// timeout, every half of it, until shutdown. (hyper's pools reap their own.)
    pub async fn reap_idle(&self, shutdown: tokio_util::sync::CancellationToken) {
        let idle = self.pools[0].direct.idle_timeout();
        let mut tick = tokio::time::interval((idle / 2).max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for p in self.pools.iter() {
                p.direct.reap();
            }
        }
    }

    /// Installs the DNS check for custom domains; later calls are ignored.
    pub fn set_custom_domains(&self, c: crate::edge::custom_domain::CustomDomains) {
        let _ = self.custom.set(c);
    }

    /// Resolves a host name: the routing table, plus the `_dstack-app-address` check for
    /// custom domains (a cached lookup with a deadline).
    pub async fn resolve_host(&self, routes: &RouteTable, host: &str) -> Result<Route, RouteError> {
        match self.custom.get() {
            Some(c) => c.resolve(routes, host).await,
            None => routes.resolve(host),
        }
    }

    /// Serves one request; never fails (errors become responses). The body is hyper's
    /// `Incoming` for HTTP/1.1 and HTTP/2, or the HTTP/3 stream adapter (`h3.rs`).
    pub async fn handle<B>(
        &self,
        snapshot: &ArcSwap<Snapshot>,
        ctx: &ConnCtx,
        req: Request<B>,
    ) -> Response<ProxyBody>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let start = Instant::now();
        ctx.inflight.fetch_add(1, Ordering::AcqRel);
        let _inflight = InflightGuard(&ctx.inflight);
        let version = req.version();
        // What only the access log needs is copied only when it is on (in the configuration
        // and in the log filter): this is per request.
        let logged = (self.settings.access_log
            && tracing::enabled!(target: "portcullis::access", tracing::Level::INFO))
        .then(|| {
            (
                req.method().clone(),
                request_host(&req).map(|(h, _)| h).unwrap_or_default(),
                req.uri().path().to_string(),
            )
        });
        // Filled in as forwarding gets that far; `-` in metrics and logs until then.
        let mut progress = Progress::default();
        // Boxed: hyper moves the request future into a task per HTTP/2 stream, and the
        // forwarding state (~1.6 KiB) is most of it. Node CPU per h2 request fell ~5 % (three
        // alternating runs each, /proc/<pid>/stat); one allocation per h1 request is the cost.
        let result = Box::pin(self.forward(snapshot, ctx, req, &mut progress)).await;
        let Progress {
            app,
            instance,
            authority,
            request_id,
        } = progress;
        let app = app.as_deref().unwrap_or("-");
        let mut resp = match result {
            Ok(mut r) => {
                if let Some(a) = authority
                    .as_deref()
                    .and_then(|a| std::str::from_utf8(a).ok())
                {
                    narrow_cookie_domains(r.headers_mut(), a);
                }
                r
            }
            Err(e) => {
                let status = e.status();
                match e.fault() {
                    Fault::Client => {
                        tracing::debug!(error = %e, client = %ctx.client, "request refused")
                    }
                    Fault::Upstream => tracing::warn!(error = %e, app = %app, "backend failure"),
                    Fault::Internal => tracing::error!(error = %e, "proxy internal error"),
                }
                let mut r = text_response(status, format!("{}\n", e));
                if let Some(v) = request_id
                    .as_deref()
                    .and_then(|id| HeaderValue::from_str(id).ok())
                {
                    r.headers_mut().insert(REQUEST_ID, v);
                }
                r
            }
        };
        if ctx.scheme == "https" {
            if let Some(v) = &self.settings.hsts {
                resp.headers_mut()
                    .insert(header::STRICT_TRANSPORT_SECURITY, v.clone());
            }
        }
        let status = resp.status().as_u16();
        let elapsed = start.elapsed();
        self.count(ctx, app, status, version, elapsed);
        if let Some((method, host, path)) = logged {
            tracing::info!(
                target: "portcullis::access",
                client = %ctx.client.ip(),
                method = %method,
                host = %host,
                path = %path,
                proto = ?version,
                status,
                app = %app,
                instance = %instance.as_ref().map_or("-", |b| b.instance_id.as_str()),
                request_id = %request_id.as_deref().unwrap_or("-"),
                ms = elapsed.as_secs_f64() * 1000.0,
                "request"
            );
        }
        resp
    }

    /// Counts a finished request into its series, through the connection's cached handles
    /// when the series is the one its last request counted into.
    fn count(&self, ctx: &ConnCtx, app: &str, status: u16, version: Version, elapsed: Duration) {
        let mut cached = ctx.metrics.lock().unwrap_or_else(|p| p.into_inner());
        let m = match &mut *cached {
            Some(m) if m.status == status && m.version == version && &*m.app == app => m,
            slot => {
                let m = &self.metrics;
                let labels = RequestLabels {
                    app: app.to_string(),
                    status,
                };
                let requests = m.requests.get_or_create(&labels).clone();
                let by_protocol = m
                    .requests_by_protocol
                    .get_or_create(&ProtocolLabels {
                        protocol: protocol_name(version),
                    })
                    .clone();
                let duration = m
                    .request_duration
                    .get_or_create(&AppLabels { app: labels.app })
                    .clone();
                slot.insert(RequestMetrics {
                    app: app.into(),
                    status,
                    version,
                    requests,
                    by_protocol,
                    duration,
                })
            }
        };
        m.requests.inc();
        m.by_protocol.inc();
        m.duration.observe(elapsed.as_secs_f64());
    }

    async fn forward<B>(
        &self,
        snapshot: &ArcSwap<Snapshot>,
        ctx: &ConnCtx,
        req: Request<B>,
        progress: &mut Progress,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        // Plain CONNECT has no path and is answered 501 below.
        let plain_connect = req.method() == Method::CONNECT && !is_websocket_connect(&req);
        if !plain_connect && !origin_form(&req) {
            return Err(ProxyError::BadTarget(req.uri().to_string()));
        }
        // A full Arc, not a guard: the snapshot is held across awaits below.
        let snap = snapshot.load_full();
        let cached = raw_authority(&req).and_then(|raw| {
            let last = ctx.last_route.lock().unwrap_or_else(|p| p.into_inner());
            let l = last.as_ref()?;
            (l.authority == raw && std::ptr::eq(l.snapshot.as_ptr(), Arc::as_ptr(&snap)))
                .then(|| (l.route.clone(), l.authority.clone()))
        });
        let (route, authority) = match cached {
            Some((route, authority)) => (route, authority),
            None => self.route_request(&snap, ctx, &req).await?,
        };
        progress.authority = Some(authority.clone());
        let authority = std::str::from_utf8(&authority).unwrap_or_default();
        progress.app = Some(route.app.clone());
        let client_ip = balance::effective_client(ctx.client.ip(), req.headers(), |ip| {
            self.xff_from.contains(ip)
        });
        if let Some(len) = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        {
            if len > self.settings.max_body {
                return Err(ProxyError::BodyTooLarge(self.settings.max_body));
            }
        }
        let inspect = snap
            .waf
            .active(&route.app)
            .cloned()
            .and_then(|p| Some((self.waf.get()?, p)));
        let Some((waf, policy)) = inspect else {
            return self
                .send(snap, ctx, req, (&route, authority, client_ip), progress)
                .await;
        };
        let origin = gate::Origin {
            client: SocketAddr::new(client_ip, ctx.client.port()),
            app: &route.app,
            host: authority,
        };
        let (req, pending) =
            gate::inspect_request(waf, &policy, origin, req, self.settings.request_timeout)
                .await
                .inspect_err(|e| {
                    if let ProxyError::WafBlocked { request_id, .. }
                    | ProxyError::WafUnavailable { request_id } = e
                    {
                        progress.request_id = Some(request_id.clone());
                    }
                })?;
        progress.request_id = Some(pending.request_id.clone());
        let resp = self
            .send(snap, ctx, req, (&route, authority, client_ip), progress)
            .await?;
        pending.response(resp).await
    }

    /// Chooses a backend for a routed (and inspected) request and sends it, trying the next
    /// choice after connect failures of a request that can be resent.
    async fn send<B>(
        &self,
        snap: Arc<Snapshot>,
        ctx: &ConnCtx,
        mut req: Request<B>,
        (route, authority, client_ip): (&Route, &str, std::net::IpAddr),
        progress: &mut Progress,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let instance_out = &mut progress.instance;
        let candidates = balance::candidates(
            &snap,
            &self.balancer,
            route,
            client_ip,
            Some(req.headers()),
            MAX_ATTEMPTS,
        )
        .map_err(|e| match e {
            NoCandidate::NoInstances => ProxyError::NoBackend(route.app.to_string()),
            NoCandidate::NoneHealthy => ProxyError::NoHealthyBackend(route.app.to_string()),
        })?;
        drop(snap);

        let ws_connect = is_websocket_connect(&req);
        if req.method() == Method::CONNECT && !ws_connect {
            // A gateway in front of apps is not a forward proxy.
            return Err(ProxyError::ConnectNotSupported);
        }
        let upgrade = (ws_connect || is_upgrade_request(&req)) && route.mode == Mode::Http;
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        parts.version = if route.mode == Mode::H2c {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        strip_hop_by_hop(&mut parts.headers, upgrade);
        self.forwarded_headers(&mut parts.headers, ctx, client_ip, authority);
        // Extended CONNECT becomes the HTTP/1.1 handshake; the key is ours, so the backend's
        // answer can be checked before the client is told the tunnel is open.
        let ws_key = (ws_connect && upgrade).then(|| websocket_handshake(&mut parts));
        // A request with no body can be sent again as it is: after a connect failure nothing
        // reached the backend, so it is retried on the next choice (GET, HEAD and OPTIONS
        // normally have no body). A body is streamed once and cannot be replayed. A WebSocket's
        // bytes travel on the upgraded stream, never as a body.
        let resendable = ws_key.is_some() || hyper::body::Body::is_end_stream(&body);
        let mut body = Some(body);

        let pools = self
            .pools
            .get(crate::edge::worker::current())
            .unwrap_or(&self.pools[0]);
        let client = if route.mode == Mode::H2c {
            &pools.h2c
        } else {
            &pools.http1
        };
        // Bodiless requests to HTTP/1.1 backends skip hyper's client (`h1client`); a request
        // with a body, an upgrade or an h2c backend needs it.
        let direct = route.mode == Mode::Http && !upgrade && resendable;
        let timeout = self.settings.request_timeout;
        let mut attempt = candidates.into_iter().peekable();
        let (resp, load_guard) = loop {
            let Some(cand) = attempt.next() else {
                return Err(ProxyError::NoHealthyBackend(route.app.to_string()));
            };
            *instance_out = Some(cand.backend.clone());
            let Some(addr) = cand.backend.address(route.port, route.default_port) else {
                continue;
            };
            let guard = cand.load.as_ref().map(|l| l.acquire());
            let sent = if direct {
                let send = pools
                    .direct
                    .send(&addr, &parts.method, pq.as_str(), &parts.headers);
                match tokio::time::timeout(timeout, send).await {
                    Err(_) => Err(Failed::Timeout),
                    Ok(Ok(r)) => Ok(Sent::Direct(r)),
                    Ok(Err(e)) => Err(Failed::new(e.is_connect(), e)),
                }
            } else {
                let out_body = match (resendable, body.take()) {
                    (true, _) => http_body_util::Empty::new()
                        .map_err(|never| match never {})
                        .boxed(),
                    (false, Some(b)) => Limited::new(
                        b,
                        usize::try_from(self.settings.max_body).unwrap_or(usize::MAX),
                    )
                    .boxed(),
                    (false, None) => {
                        return Err(ProxyError::NoHealthyBackend(route.app.to_string()))
                    }
                };
                let mut out = Request::new(out_body);
                *out.method_mut() = parts.method.clone();
                *out.uri_mut() = backend_uri(&addr, &pq)
                    .map_err(|e| ProxyError::Internal(format!("backend uri for {addr}: {e}")))?;
                *out.version_mut() = parts.version;
                // Only a later attempt needs the headers again.
                *out.headers_mut() = if attempt.peek().is_some() {
                    parts.headers.clone()
                } else {
                    std::mem::take(&mut parts.headers)
                };
                match tokio::time::timeout(timeout, client.request(out)).await {
                    Err(_) => Err(Failed::Timeout),
                    Ok(Ok(r)) => Ok(Sent::Hyper(r)),
                    Ok(Err(e)) => Err(Failed::new(e.is_connect(), e)),
                }
            };
            match sent {
                Err(Failed::Timeout) => {
                    return Err(ProxyError::Timeout {
                        backend: addr.into_owned(),
                        timeout,
                    })
                }
                Err(Failed::Connect(e)) => {
                    if let Some(h) = &cand.health {
                        if h.record_connect_failure(self.balancer.health.passive_fall) {
                            tracing::warn!(instance = %cand.backend.instance_id, backend = %addr, "instance ejected after consecutive connect failures");
                        }
                    }
                    if resendable && attempt.peek().is_some() {
                        tracing::debug!(error = %e, backend = %addr, "connect failed; trying the next choice");
                        continue;
                    }
                    return Err(ProxyError::Connect {
                        backend: addr.into_owned(),
                        source: e,
                    });
                }
                Err(Failed::Other(e)) => {
                    // A body over the limit surfaces as a body error while sending, one or
                    // two causes down (hyper's error may sit in between).
                    let over_limit =
                        std::iter::successors(Some(&*e as &dyn std::error::Error), |s| s.source())
                            .any(|s| s.is::<http_body_util::LengthLimitError>());
                    if over_limit {
                        return Err(ProxyError::BodyTooLarge(self.settings.max_body));
                    }
                    // The client's own body failed while it was being sent (a malformed chunk,
                    // a reset stream): the client's fault, not the backend's.
                    let client_body =
                        std::iter::successors(Some(&*e as &dyn std::error::Error), |s| s.source())
                            .find_map(|s| s.downcast_ref::<hyper::Error>())
                            .is_some_and(hyper::Error::is_user);
                    if client_body {
                        return Err(ProxyError::ClientBody(e));
                    }
                    return Err(ProxyError::Upstream {
                        backend: addr.into_owned(),
                        source: e,
                    });
                }
                Ok(r) => {
                    if let Some(h) = &cand.health {
                        h.record_connect_success();
                    }
                    break (r, guard);
                }
            }
        };
        let resp = match resp {
            Sent::Direct(r) => return Ok(relay_response(r, load_guard)),
            Sent::Hyper(r) => r,
        };
        // An upgrade request's answer opens a tunnel, or is relayed as any other response.
        let Some(client_upgrade) = client_upgrade else {
            return Ok(relay_response(resp, load_guard));
        };
        let idle = self.settings.upgrade_idle_timeout;
        match upgrade::answer(
            resp,
            client_upgrade,
            ws_key.as_deref(),
            load_guard,
            idle,
            instance_out,
        )? {
            Answered::Done(r) => Ok(r),
            Answered::Relay(resp, load_guard) => Ok(relay_response(resp, load_guard)),
        }
    }

    /// Resolves the request's host to a route this connection may use, and remembers it for
    /// the connection's next request (unless it is a custom domain, whose DNS answer has its
    /// own TTL). Returns the route and the authority as sent.
    async fn route_request<B>(
        &self,
        snap: &Arc<Snapshot>,
        ctx: &ConnCtx,
        req: &Request<B>,
    ) -> Result<(Route, Bytes), ProxyError> {
        let (host, authority) = request_host(req)?;
        let resolved = self.resolve_host(&snap.routes, &host).await;
        if ctx.scheme == "https" {
            // On TLS, the connection's SNI chose the route (and the certificate). A Host that
            // belongs to another route — or to no route, unless it is the SNI name itself — is
            // misdirected (RFC 9110 §15.5.20), e.g. an HTTP/2 connection reused across names.
            let same = match (&resolved, &ctx.sni_route) {
                (Ok(r), Some(s)) => r.same_target(s),
                (Err(_), None) => ctx.sni.as_deref() == Some(host.as_str()),
                _ => false,
            };
            if !same {
                return Err(ProxyError::Misdirected {
                    host,
                    sni: ctx.sni.clone().unwrap_or_default(),
                });
            }
        }
        let route = resolved.map_err(|e| match e {
            RouteError::Grammar(
                g @ (GrammarError::BothSuffixes(_) | GrammarError::InvalidPort(_)),
            ) => ProxyError::BadName {
                host: host.clone(),
                source: g,
            },
            other => ProxyError::NoRoute {
                host: host.clone(),
                source: other,
            },
        })?;
        if route.internal && !ctx.trusted {
            return Err(ProxyError::Forbidden(host));
        }
        if route.mode == Mode::Passthrough {
            return Err(ProxyError::PassthroughOverHttp { host });
        }
        let authority = Bytes::from(authority);
        let custom = matches!(
            crate::edge::grammar::parse_host(&host, snap.routes.bases()),
            Ok(crate::edge::grammar::ParsedHost::Custom { .. })
        );
        if !custom && raw_authority(req) == Some(&authority[..]) {
            *ctx.last_route.lock().unwrap_or_else(|p| p.into_inner()) = Some(LastRoute {
                authority: authority.clone(),
                snapshot: Arc::downgrade(snap),
                route: route.clone(),
            });
        }
        Ok((route, authority))
    }

    fn forwarded_headers(
        &self,
        h: &mut HeaderMap,
        ctx: &ConnCtx,
        client: std::net::IpAddr,
        authority: &str,
    ) {
        // The client address comes from the TCP peer, a trusted PROXY header, or a trusted
        // sender's X-Forwarded-For (`client`). The connection's own client's headers are built
        // once per connection.
        let owned;
        let fwd = if client == ctx.client.ip() {
            ctx.forwarded
                .get_or_init(|| ForwardedFor::new(client, ctx.scheme))
        } else {
            owned = ForwardedFor::new(client, ctx.scheme);
            &owned
        };
        fwd.apply(h, ctx.scheme, authority);
    }
}

/// Why an attempt got no response head.
enum Failed {
    Timeout,
    /// No connection: nothing reached the backend, so another one may be tried.
    Connect(BoxError),
    Other(BoxError),
}

impl Failed {
    fn new(connect: bool, e: impl Into<BoxError>) -> Self {
        if connect {
            Failed::Connect(e.into())
        } else {
            Failed::Other(e.into())
        }
    }
}

/// What a backend answered, through whichever client sent the request.
enum Sent {
    Direct(Response<crate::edge::h1client::H1Body>),
    Hyper(Response<hyper::body::Incoming>),
}

/// A backend's response as the client gets it: hop-by-hop fields gone, the client's protocol
/// version, and the instance counted as loaded (least-conn, bounded load) until the body is
/// done.
fn relay_response<B>(
    resp: Response<B>,
    load_guard: Option<portcullis_geo::LoadGuard>,
) -> Response<ProxyBody>
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    parts.version = Version::HTTP_11;
    let body = body.map_frame(move |f| {
        let _held = &load_guard;
        f
    });
    Response::from_parts(parts, body.map_err(Into::into).boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_origin_form_targets_are_forwarded() {
        let h2 = |method: Method, pq: &str| {
            let uri = Uri::builder()
                .scheme("https")
                .authority("a.example")
                .path_and_query(pq)
                .build();
            // Some targets cannot even become a URI; those never reach the proxy.
            uri.ok().map(|uri| {
                let mut r = Request::new(());
                *r.method_mut() = method;
                *r.uri_mut() = uri;
                *r.version_mut() = Version::HTTP_2;
                origin_form(&r)
            })
        };
        assert_eq!(h2(Method::GET, "/"), Some(true));
        assert_eq!(h2(Method::GET, "/a/b?c=d"), Some(true));
        assert_eq!(h2(Method::OPTIONS, "*"), Some(true));
        for bad in ["*", "foo", "http://other.example/x", "https://a.example/"] {
            assert_ne!(h2(Method::GET, bad), Some(true), "{bad}");
        }
        // HTTP/1.1 absolute-form: hyper hands over the path; a bare authority has none.
        let h1 = |target: &str| {
            let mut r = Request::new(());
            *r.uri_mut() = target.parse().expect("uri");
            *r.version_mut() = Version::HTTP_11;
            origin_form(&r)
        };
        assert!(h1("/x"));
        assert!(h1("http://a.example/x"));
        assert!(h1("http://a.example"));
        assert!(!h1("a.example"));
        assert_eq!(
            ProxyError::BadTarget("foo".into()).status(),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn userinfo_never_reaches_the_forwarded_host() {
        let req = |host: &str| {
            Request::get("/")
                .header(header::HOST, host)
                .body(())
                .expect("req")
        };
        assert_eq!(
            request_host(&req("user:pass@App.example:8443")).expect("host"),
            ("app.example".to_string(), "App.example:8443".to_string())
        );
        assert_eq!(
            request_host(&req("a@b@app.example")).map(|(_, a)| a).ok(),
            Some("app.example".to_string())
        );
        // HTTP/2 and HTTP/3 carry it in :authority.
        let r = Request::get("https://u:p@app.example/x")
            .body(())
            .expect("req");
        assert_eq!(
            request_host(&r).expect("host"),
            ("app.example".to_string(), "app.example".to_string())
        );
        assert_eq!(without_userinfo("app.example:1"), "app.example:1");
    }
}
