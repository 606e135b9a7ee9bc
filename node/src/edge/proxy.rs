//! HTTP proxying: one request from a client (HTTP/1.1 or HTTP/2, over TLS or on the plain
//! port for `.internal`) to a backend over pooled HTTP/1.1 or h2c connections.
//!
//! Per request: Host → route (must be the SNI's route on TLS connections, else 421) → backend
//! (round robin) → forwarded headers → the backend's response streamed back with HSTS. Every
//! failure is a [`ProxyError`], mapped to a status in one place.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::balance::{self, Balancer, NoCandidate};
use super::grammar::{GrammarError, Mode};
use super::h1client::H1Pool;
use super::limits::{Activity, ActivityClock, Cidrs};
use super::route::{Route, RouteError, RouteTable};
use super::upstream::{HyperConnector, Upstream};
use super::Snapshot;
use crate::metrics::{AppLabels, EdgeMetrics, ProtocolLabels, RequestLabels};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Who is at fault, for logs and for deciding whether another backend could help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request has no usable host: {0}")]
    BadHost(String),
    #[error("request target {0:?} is not origin-form (`/…`, or `*` for OPTIONS)")]
    BadTarget(String),
    #[error("no route for host {host:?}: {source}")]
    NoRoute { host: String, source: RouteError },
    #[error("malformed host {host:?}: {source}")]
    BadName { host: String, source: GrammarError },
    #[error("host {host:?} does not belong to the route of the TLS server name {sni:?}")]
    Misdirected { host: String, sni: String },
    #[error("{0:?} is only served to trusted networks")]
    Forbidden(String),
    #[error("app {0:?} has no instance to serve it")]
    NoBackend(String),
    #[error("app {0:?} has no healthy instance")]
    NoHealthyBackend(String),
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    #[error("request body: {0}")]
    ClientBody(BoxError),
    #[error("CONNECT is only served for WebSocket (extended CONNECT, `:protocol websocket`)")]
    ConnectNotSupported,
    #[error("backend {backend} refused the WebSocket handshake: {reason}")]
    WebSocketRefused { backend: String, reason: String },
    #[error("{host:?} is a TLS passthrough route; it cannot be reached over plain HTTP")]
    PassthroughOverHttp { host: String },
    #[error("backend {backend} did not answer within {timeout:?}")]
    Timeout { backend: String, timeout: Duration },
    #[error("cannot connect to backend {backend}: {source}")]
    Connect { backend: String, source: BoxError },
    #[error("backend {backend} failed: {source}")]
    Upstream { backend: String, source: BoxError },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    /// The one place that maps failures to statuses.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadHost(_) | ProxyError::BadTarget(_) | ProxyError::BadName { .. } => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::PassthroughOverHttp { .. } => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::NoBackend(_) | ProxyError::NoHealthyBackend(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectNotSupported => StatusCode::NOT_IMPLEMENTED,
            ProxyError::WebSocketRefused { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn fault(&self) -> Fault {
        match self {
            ProxyError::BadHost(_)
            | ProxyError::BadTarget(_)
            | ProxyError::NoRoute { .. }
            | ProxyError::BadName { .. }
            | ProxyError::Misdirected { .. }
            | ProxyError::Forbidden(_)
            | ProxyError::PassthroughOverHttp { .. }
            | ProxyError::BodyTooLarge(_)
            | ProxyError::ClientBody(_)
            | ProxyError::ConnectNotSupported => Fault::Client,
            ProxyError::NoBackend(_)
            | ProxyError::NoHealthyBackend(_)
            | ProxyError::Timeout { .. }
            | ProxyError::Connect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::WebSocketRefused { .. } => Fault::Upstream,
            ProxyError::Internal(_) => Fault::Internal,
        }
    }

    /// Could the same request go to another backend? Only when nothing reached the first one.
    pub fn retryable(&self) -> bool {
        matches!(self, ProxyError::Connect { .. })
    }
}

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

/// `X-Forwarded-For` and the start of `Forwarded` (`for=…;proto=…;host="`) for one client,
/// and the headers made from the authority its last request named: a keep-alive connection
/// names the same one every time, so they are built once, not per request.
pub struct ForwardedFor {
    xff: HeaderValue,
    forwarded_prefix: Vec<u8>,
    /// The authority, its `Host` / `X-Forwarded-Host` value and the whole `Forwarded`.
    last: std::sync::Mutex<Option<AuthorityHeaders>>,
}

#[derive(Clone)]
struct AuthorityHeaders {
    authority: Bytes,
    host: HeaderValue,
    forwarded: HeaderValue,
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");

impl ForwardedFor {
    fn new(client: std::net::IpAddr, scheme: &str) -> Self {
        let ip = client.to_string();
        let forwarded_prefix = format!(
            "for={};proto={scheme};host=\"",
            ip_for_forwarded(&SocketAddr::new(client, 0))
        )
        .into_bytes();
        ForwardedFor {
            // An address's text is always a valid header value.
            xff: HeaderValue::from_str(&ip).unwrap_or(HeaderValue::from_static("unknown")),
            forwarded_prefix,
            last: Default::default(),
        }
    }

    fn authority_headers(&self, authority: &str) -> Option<AuthorityHeaders> {
        // Held for a comparison and a few reference-count bumps, never across an await.
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = last
            .as_ref()
            .filter(|a| a.authority == authority.as_bytes())
        {
            return Some(a.clone());
        }
        let host = HeaderValue::from_str(authority).ok()?;
        let mut forwarded = Vec::with_capacity(self.forwarded_prefix.len() + authority.len() + 1);
        forwarded.extend_from_slice(&self.forwarded_prefix);
        forwarded.extend_from_slice(authority.as_bytes());
        forwarded.push(b'"');
        let forwarded = HeaderValue::from_maybe_shared(Bytes::from(forwarded)).ok()?;
        let a = AuthorityHeaders {
            authority: Bytes::copy_from_slice(authority.as_bytes()),
            host,
            forwarded,
        };
        *last = Some(a.clone());
        Some(a)
    }
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
    custom: std::sync::OnceLock<super::custom_domain::CustomDomains>,
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

/// Hop-by-hop headers (RFC 9110 §7.6.1) never cross the proxy.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most requests carry none of these: one pass over their few names is cheaper than a hash
    // lookup per hop-by-hop name.
    let present = headers
        .keys()
        .any(|k| k == header::UPGRADE || HOP_BY_HOP.contains(k));
    if !present {
        if keep_upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        return;
    }
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter(|s| !(keep_upgrade && s == "upgrade"))
        .filter_map(|s| HeaderName::from_bytes(s.as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP.iter() {
        headers.remove(h);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// A WebSocket opened with extended CONNECT (`:protocol websocket`): RFC 8441 over HTTP/2,
/// RFC 9220 over HTTP/3. Backends get the RFC 6455 HTTP/1.1 handshake instead, so an app
/// serves one kind of WebSocket whatever the client speaks.
fn is_websocket_connect<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2).
fn websocket_accept(key: &[u8]) -> String {
    use base64::Engine as _;
    let mut d = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    d.update(key);
    d.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(d.finish())
}

fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
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
    let host = super::grammar::normalize_host(authority.host())
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

/// Narrows `Set-Cookie` fields whose `Domain` is a suffix above `authority`'s host (a base
/// domain, or any parent of the app's own name): every other app under that name would get
/// the cookie. The attribute is removed, which makes the cookie host-only, for the app's own
/// host. A `Domain` equal to the host stays; one that is no suffix of it is left for the
/// browser to refuse.
pub(crate) fn narrow_cookie_domains(headers: &mut HeaderMap, authority: &str) {
    if !headers.contains_key(header::SET_COOKIE) {
        return;
    }
    let Ok(a) = authority.parse::<http::uri::Authority>() else {
        return;
    };
    let host = a.host().trim_end_matches('.').to_ascii_lowercase();
    let narrowed: Vec<Option<HeaderValue>> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| narrow_cookie(v.as_bytes(), &host))
        .collect();
    if narrowed.iter().all(Option::is_none) {
        return;
    }
    let old: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for (v, n) in old.into_iter().zip(narrowed) {
        headers.append(header::SET_COOKIE, n.unwrap_or(v));
    }
}

/// `cookie` without its `Domain` attributes that name a parent of `host`; `None` when it has
/// none.
fn narrow_cookie(cookie: &[u8], host: &str) -> Option<HeaderValue> {
    let mut out = Vec::with_capacity(cookie.len());
    let mut dropped = false;
    for (i, part) in cookie.split(|&b| b == b';').enumerate() {
        if i > 0 {
            let attr = part.trim_ascii_start();
            let (name, value) = match attr.iter().position(|&b| b == b'=') {
                Some(eq) => (&attr[..eq], &attr[eq + 1..]),
                None => (attr, &b""[..]),
            };
            if name.trim_ascii().eq_ignore_ascii_case(b"domain") {
                let value = value.trim_ascii();
                let value = value.strip_prefix(b".").unwrap_or(value);
                let value = value
                    .strip_suffix(b".")
                    .unwrap_or(value)
                    .to_ascii_lowercase();
                let above = host.len() > value.len()
                    && !value.is_empty()
                    && host.as_bytes().ends_with(&value)
                    && host.as_bytes()[host.len() - value.len() - 1] == b'.';
                if above {
                    dropped = true;
                    continue;
                }
            }
            out.push(b';');
        }
        out.extend_from_slice(part);
    }
    if !dropped {
        return None;
    }
    HeaderValue::from_bytes(&out).ok()
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

fn ip_for_forwarded(addr: &SocketAddr) -> String {
    match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
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
        }
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
    pub fn set_custom_domains(&self, c: super::custom_domain::CustomDomains) {
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
        let mut app: Option<Arc<str>> = None;
        let mut instance: Option<Arc<super::route::Backend>> = None;
        let mut authority: Option<Bytes> = None;
        // Boxed: hyper moves the request future into a task per HTTP/2 stream, and the
        // forwarding state (~1.6 KiB) is most of it. Node CPU per h2 request fell ~5 % (three
        // alternating runs each, /proc/<pid>/stat); one allocation per h1 request is the cost.
        let result = Box::pin(self.forward(
            snapshot,
            ctx,
            req,
            (&mut app, &mut instance),
            &mut authority,
        ))
        .await;
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
                text_response(status, format!("{}\n", e))
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
        mut req: Request<B>,
        (app_out, instance_out): (
            &mut Option<Arc<str>>,
            &mut Option<Arc<super::route::Backend>>,
        ),
        authority_out: &mut Option<Bytes>,
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
        *authority_out = Some(authority.clone());
        let authority = std::str::from_utf8(&authority).unwrap_or_default();
        *app_out = Some(route.app.clone());
        let client_ip = balance::effective_client(ctx.client.ip(), req.headers(), |ip| {
            self.xff_from.contains(ip)
        });
        let candidates = balance::candidates(
            &snap,
            &self.balancer,
            &route,
            client_ip,
            Some(req.headers()),
            MAX_ATTEMPTS,
        )
        .map_err(|e| match e {
            NoCandidate::NoInstances => ProxyError::NoBackend(route.app.to_string()),
            NoCandidate::NoneHealthy => ProxyError::NoHealthyBackend(route.app.to_string()),
        })?;
        drop(snap);

        if let Some(len) = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        {
            if len > self.settings.max_body {
                return Err(ProxyError::BodyTooLarge(self.settings.max_body));
            }
        }
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
        let ws_key = (ws_connect && upgrade).then(|| {
            use base64::Engine as _;
            let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
            parts.method = Method::GET;
            let h = &mut parts.headers;
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.entry(header::SEC_WEBSOCKET_VERSION)
                .or_insert(HeaderValue::from_static("13"));
            if let Ok(v) = HeaderValue::from_str(&key) {
                h.insert(header::SEC_WEBSOCKET_KEY, v);
            }
            key
        });
        // A request with no body can be sent again as it is: after a connect failure nothing
        // reached the backend, so it is retried on the next choice (GET, HEAD and OPTIONS
        // normally have no body). A body is streamed once and cannot be replayed. A WebSocket's
        // bytes travel on the upgraded stream, never as a body.
        let resendable = ws_key.is_some() || hyper::body::Body::is_end_stream(&body);
        let mut body = Some(body);

        let pools = self
            .pools
            .get(super::worker::current())
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
        let mut resp = match resp {
            Sent::Direct(r) => return Ok(relay_response(r, load_guard)),
            Sent::Hyper(r) => r,
        };

        if let Some(key) = &ws_key {
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                if resp.status().is_success() {
                    // A 2xx would tell an extended-CONNECT client that the tunnel is open.
                    return Err(ProxyError::WebSocketRefused {
                        backend: cand_id(instance_out),
                        reason: format!("answered {} instead of 101", resp.status()),
                    });
                }
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers, false);
                return Ok(Response::from_parts(
                    parts,
                    body.map_err(BoxError::from).boxed(),
                ));
            }
            let want = websocket_accept(key.as_bytes());
            if resp
                .headers()
                .get(header::SEC_WEBSOCKET_ACCEPT)
                .map(|v| v.as_bytes())
                != Some(want.as_bytes())
            {
                return Err(ProxyError::WebSocketRefused {
                    backend: cand_id(instance_out),
                    reason: "wrong or missing Sec-WebSocket-Accept".into(),
                });
            }
        }
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let backend_upgrade = hyper::upgrade::on(&mut resp);
                let idle = self.settings.upgrade_idle_timeout;
                // The instance stays loaded (least-conn) for as long as the tunnel is open.
                let held = load_guard;
                tokio::spawn(async move {
                    let _held = held;
                    let (c, b) = match tokio::try_join!(client_upgrade, backend_upgrade) {
                        Ok(pair) => pair,
                        Err(e) => {
                            tracing::debug!(error = %e, "upgrade failed");
                            return;
                        }
                    };
                    relay(TokioIo::new(c), TokioIo::new(b), idle).await;
                });
                let (mut parts, _) = resp.into_parts();
                if ws_key.is_some() {
                    // Extended CONNECT succeeds with 200 and no handshake headers (RFC 8441 §5).
                    strip_hop_by_hop(&mut parts.headers, false);
                    parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
                    parts.status = StatusCode::OK;
                } else {
                    strip_hop_by_hop(&mut parts.headers, true);
                }
                return Ok(Response::from_parts(
                    parts,
                    http_body_util::Empty::new()
                        .map_err(|never| match never {})
                        .boxed(),
                ));
            }
        }
        Ok(relay_response(resp, load_guard))
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
            super::grammar::parse_host(&host, snap.routes.bases()),
            Ok(super::grammar::ParsedHost::Custom { .. })
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
        // sender's X-Forwarded-For (`client`); whatever an untrusted client claims in these
        // headers is replaced, not appended to, so backends can trust them.
        let owned;
        let fwd = if client == ctx.client.ip() {
            ctx.forwarded
                .get_or_init(|| ForwardedFor::new(client, ctx.scheme))
        } else {
            owned = ForwardedFor::new(client, ctx.scheme);
            &owned
        };
        h.insert(X_FORWARDED_FOR, fwd.xff.clone());
        // The same client in the field nginx-style backends read; a client's own value would
        // be believed there.
        h.insert(X_REAL_IP, fwd.xff.clone());
        // The client's port claim: the gateway does not vouch for it (the scheme says whether
        // the client came over TLS), so it is dropped rather than passed on.
        h.remove(X_FORWARDED_PORT);
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(ctx.scheme));
        let Some(a) = fwd.authority_headers(authority) else {
            return;
        };
        h.insert(X_FORWARDED_HOST, a.host.clone());
        h.insert(FORWARDED, a.forwarded);
        h.insert(header::HOST, a.host);
    }
}

fn cand_id(b: &Option<Arc<super::route::Backend>>) -> String {
    b.as_ref()
        .map_or_else(String::new, |b| b.instance_id.clone())
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
    Direct(Response<super::h1client::H1Body>),
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

/// Relays an upgraded (WebSocket) or passthrough connection until either side closes or no
/// byte moves for `idle`.
pub async fn relay<A, B>(a: A, b: B, idle: Duration)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut clock = ActivityClock::new();
    let mut a = Activity::new(a, clock.clone());
    let mut b = b;
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let tick = (idle / 4).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            r = &mut copy => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "relay ended");
                }
                return;
            }
            _ = tokio::time::sleep(tick) => {
                if clock.idle_for() >= idle {
                    tracing::debug!(?idle, "relay idle; closing");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_accept_matches_rfc_6455_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

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

    #[test]
    fn cookie_domains_above_the_app_are_narrowed_to_its_host() {
        let host = "shop.apps.example";
        let narrow = |c: &str| {
            narrow_cookie(c.as_bytes(), host).map(|v| v.to_str().expect("ascii").to_string())
        };
        // The base domain, a parent, with a leading dot, any case: the Domain goes.
        assert_eq!(
            narrow("sid=1; Path=/; Domain=apps.example; Secure").as_deref(),
            Some("sid=1; Path=/; Secure")
        );
        assert_eq!(narrow("a=b; domain=.APPS.example").as_deref(), Some("a=b"));
        assert_eq!(narrow("a=b;Domain=example").as_deref(), Some("a=b"));
        assert_eq!(
            narrow("a=b; Domain = apps.example. ").as_deref(),
            Some("a=b")
        );
        // The app's own host, no Domain, an unrelated or a deeper name: left as they are.
        for keep in [
            "a=b; Domain=shop.apps.example",
            "a=b; Domain=.Shop.Apps.Example",
            "a=b; Path=/",
            "a=b; Domain=other.example",
            "a=b; Domain=x.shop.apps.example",
            "a=b; Domain=hop.apps.example",
            "a=b; Domain=",
            "domain=apps.example",
        ] {
            assert_eq!(narrow(keep), None, "{keep}");
        }

        let mut h = HeaderMap::new();
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("a=1; Domain=apps.example"),
        );
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("b=2; HttpOnly"),
        );
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("c=3; Domain=shop.apps.example"),
        );
        narrow_cookie_domains(&mut h, "Shop.apps.example:8443");
        let all: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(
            all,
            ["a=1", "b=2; HttpOnly", "c=3; Domain=shop.apps.example"]
        );
    }

    #[test]
    fn only_websocket_is_an_extended_connect_we_serve() {
        let mut ws = Request::connect("https://a.example/chat")
            .body(())
            .expect("req");
        ws.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        assert!(is_websocket_connect(&ws));
        let mut wt = Request::connect("https://a.example/chat")
            .body(())
            .expect("req");
        wt.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("webtransport"));
        assert!(!is_websocket_connect(&wt));
        let plain = Request::connect("a.example:443").body(()).expect("req");
        assert!(!is_websocket_connect(&plain));
        assert_eq!(
            ProxyError::ConnectNotSupported.status(),
            StatusCode::NOT_IMPLEMENTED
        );
    }
}
