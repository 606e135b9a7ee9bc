//! HTTP/3: QUIC (quinn) on UDP at the HTTPS port number, HTTP/3 (h3) on top, and every request
//! handed to the same [`super::proxy::Proxy`] as HTTP/1.1 and HTTP/2.
//!
//! Per connection: node-wide and per-IP limits (shared with TCP) → QUIC handshake (TLS 1.3, ALPN
//! `h3`, the TCP listener's certificate resolver, so certificate updates apply here too) → the
//! SNI's route (`.internal` for trusted clients only; passthrough never) → requests, each on its
//! own task: headers → `Request<H3Body>` → proxy (Host/SNI check, limits, forwarded headers,
//! access log, metrics) → the response streamed back.
//!
//! Not served over QUIC: TLS passthrough routes (the gateway would have to terminate TLS that is
//! meant to end inside the CVM), CONNECT and WebSocket over HTTP/3 (RFC 9220), 0-RTT.

use std::any::Any;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use ::h3::error::Code;
use ::h3::server::{RequestResolver, RequestStream};
use arc_swap::ArcSwap;
use bytes::{Buf, Bytes};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use quinn::VarInt;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::grammar::Mode;
use super::limits::{ConnPermit, OpenGuard, CONN_DRAIN};
use super::proxy::{BoxError, ConnCtx};
use super::{Edge, Snapshot};
use crate::config::EdgeConfig;
use crate::metrics::{EdgeMetrics, ListenerLabels};

/// The `listener` label of the QUIC listener's connection metrics.
const LISTENER: &str = "http3";

/// HTTP/3 application error codes (RFC 9114 §8.1) used to close connections.
const H3_NO_ERROR: u32 = 0x100;
const H3_REQUEST_REJECTED: u32 = 0x10b;

/// Unidirectional streams a client may open: control and the two QPACK streams, plus room for
/// reserved (grease) stream types that clients send to keep servers tolerant.
const MAX_UNI_STREAMS: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum H3Error {
    #[error("quic tls configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("quic tls configuration: {0}")]
    Suite(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("local address of the quic socket: {0}")]
    LocalAddr(io::Error),
}

/// Why one request stream ended without a complete response.
#[derive(Debug, thiserror::Error)]
enum StreamFailure {
    #[error("client did not read the response for {0:?}")]
    SendStalled(Duration),
    #[error("backend sent no response bytes for {0:?}")]
    BackendStalled(Duration),
    #[error("send to client: {0}")]
    Send(#[from] ::h3::error::StreamError),
    #[error("backend body: {0}")]
    Backend(BoxError),
    /// The request's DATA disagreed with its `content-length` (RFC 9114 §4.1.2).
    #[error("request body does not match its content-length")]
    Malformed,
}

/// Binds the QUIC endpoint: `edge.http3_listen`, else the address of `https_listen` at the
/// port the TCP listener got (they differ only when the configured port is 0). The server
/// config is installed by [`spawn`], once the edge exists.
pub fn bind(cfg: &EdgeConfig, https_bound: SocketAddr) -> io::Result<quinn::Endpoint> {
    let addr = cfg
        .http3_listen
        .unwrap_or_else(|| SocketAddr::new(cfg.https_listen.ip(), https_bound.port()));
    let context = |e: io::Error| io::Error::new(e.kind(), format!("udp {addr} (edge.http3): {e}"));
    let socket = std::net::UdpSocket::bind(addr).map_err(context)?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(context)
}

/// The certificate resolver of the TCP listener, minus passthrough names: their TLS must end in
/// the CVM, so the gateway never shows its own certificate for them.
struct QuicResolver {
    inner: Arc<dyn ResolvesServerCert>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<EdgeMetrics>,
}

impl std::fmt::Debug for QuicResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicResolver")
            .field("inner", &self.inner)
            .finish()
    }
}

impl ResolvesServerCert for QuicResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = hello.server_name() {
            let name = name.to_ascii_lowercase();
            let passthrough = self
                .snapshot
                .load()
                .routes
                .resolve(&name)
                .is_ok_and(|r| r.mode == Mode::Passthrough);
            if passthrough {
                self.metrics.limit("http3_passthrough");
                tracing::debug!(sni = %name, "passthrough name refused over quic");
                return None;
            }
        }
        self.inner.resolve(hello)
    }
}

fn server_config(edge: &Edge) -> Result<quinn::ServerConfig, H3Error> {
    let cfg = &edge.cfg;
    let mut tls = edge.acceptor.config().as_ref().clone();
    tls.cert_resolver = Arc::new(QuicResolver {
        inner: tls.cert_resolver.clone(),
        snapshot: edge.snapshot.clone(),
        metrics: edge.metrics.clone(),
    });
    tls.alpn_protocols = vec![b"h3".to_vec()];
    // 0-RTT requests can be replayed by an attacker; nothing here checks that they are safe.
    tls.max_early_data_size = 0;
    // Own tickets and cache: a TCP session must not resume as a QUIC one or the reverse.
    tls.ticketer = rustls::crypto::ring::Ticketer::new()?;
    tls.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    let idle = Duration::from_millis(cfg.idle_timeout_ms);
    transport
        .max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok())
        .max_concurrent_bidi_streams(VarInt::from_u32(cfg.http3_max_concurrent_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS));
    server.transport_config(Arc::new(transport));
    server.max_incoming(cfg.max_connections);
    Ok(server)
}

/// The port HTTP/3 is reached at from outside, for `Alt-Svc`.
fn public_port(cfg: &EdgeConfig, bound: u16) -> u16 {
    match (cfg.http3_listen, cfg.https_public_port) {
        (None, Some(p)) => p,
        _ => bound,
    }
}

/// Installs the server config, turns on `Alt-Svc`, and starts the accept loop on `tracker`.
pub(super) fn spawn(
    edge: &Arc<Edge>,
    endpoint: quinn::Endpoint,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), H3Error> {
    let bound = endpoint.local_addr().map_err(H3Error::LocalAddr)?;
    endpoint.set_server_config(Some(server_config(edge)?));
    let port = public_port(&edge.cfg, bound.port());
    if let Ok(v) = HeaderValue::from_str(&format!("h3=\":{port}\"; ma=86400")) {
        edge.alt_svc.store(Some(Arc::new(v)));
    }
    tracing::info!(addr = %bound, "http/3 listening");
    let e = edge.clone();
    let t = tracker.clone();
    tracker.spawn(
        async move { accept_loop(e, endpoint, t, shutdown).await }
            .instrument(tracing::info_span!("http3_accept")),
    );
    Ok(())
}

async fn accept_loop(
    edge: Arc<Edge>,
    endpoint: quinn::Endpoint,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let labels = ListenerLabels { listener: LISTENER };
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let peer = incoming.remote_address();
        // A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; count and log them as
        // IPv4, like the TCP listener's peers.
        let ip = peer.ip().to_canonical();
        let mut permit = match edge.limiter.acquire() {
            Ok(p) => p,
            Err(e) => {
                edge.metrics.limit(e.reason());
                incoming.refuse();
                continue;
            }
        };
        // A QUIC Initial's source address can be forged. Before an address that already holds
        // half its quota takes another slot, the client must prove it receives packets there
        // (a Retry round trip), so a spoofer cannot use up a victim's per-IP quota.
        let crowded = edge.limiter.open_for(ip) >= edge.cfg.max_connections_per_ip / 2;
        if crowded && !incoming.remote_address_validated() && incoming.may_retry() {
            if let Err(e) = incoming.retry() {
                tracing::debug!(error = %e, "quic retry failed");
            }
            continue;
        }
        if let Err(e) = permit.charge(ip) {
            edge.metrics.limit(e.reason());
            incoming.refuse();
            continue;
        }
        edge.metrics.connections.get_or_create(&labels).inc();
        let gauge = edge.metrics.open_connections.get_or_create(&labels).clone();
        gauge.inc();
        let span = tracing::debug_span!("conn", listener = LISTENER, peer = %peer);
        let e = edge.clone();
        let sd = shutdown.clone();
        let client = SocketAddr::new(ip, peer.port());
        tracker.spawn(
            async move {
                let _open = OpenGuard(gauge);
                serve_connection(e, incoming, client, permit, sd).await
            }
            .instrument(span),
        );
    }
    // Connections drain on their own (GOAWAY, then close); keep the endpoint driving the
    // socket until their CONNECTION_CLOSE frames are out.
    endpoint.set_server_config(None);
    if tokio::time::timeout(CONN_DRAIN + Duration::from_secs(2), endpoint.wait_idle())
        .await
        .is_err()
    {
        tracing::debug!("quic endpoint not idle after the drain period");
    }
    endpoint.close(VarInt::from_u32(H3_NO_ERROR), b"shutdown");
}

fn server_name(conn: &quinn::Connection) -> Option<String> {
    let data: Box<dyn Any> = conn.handshake_data()?;
    let data = data
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?;
    data.server_name.map(|s| s.to_ascii_lowercase())
}

async fn serve_connection(
    edge: Arc<Edge>,
    incoming: quinn::Incoming,
    client: SocketAddr,
    _permit: ConnPermit,
    shutdown: CancellationToken,
) {
    let cfg = &edge.cfg;
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            edge.metrics.handshake_failure("quic");
            tracing::debug!(error = %e, "quic accept failed");
            return;
        }
    };
    let handshake = Duration::from_millis(cfg.tls_handshake_timeout_ms);
    let conn = match tokio::time::timeout(handshake, connecting).await {
        Err(_) => {
            edge.metrics.handshake_failure("timeout");
            return;
        }
        Ok(Err(e)) => {
            edge.metrics.handshake_failure("quic");
            tracing::debug!(error = %e, "quic handshake failed");
            return;
        }
        Ok(Ok(c)) => c,
    };
    let sni = server_name(&conn);
    let trusted = edge.trusted.contains(client.ip());
    let snap = edge.snapshot.load_full();
    let route = match sni.as_deref() {
        Some(n) => edge.proxy.resolve_host(&snap.routes, n).await.ok(),
        None => None,
    };
    drop(snap);
    if let Some(r) = &route {
        let refusal: Option<(&'static str, &'static [u8])> = if r.internal && !trusted {
            Some((
                "internal_untrusted",
                b"internal names are served to trusted networks only",
            ))
        } else if r.mode == Mode::Passthrough {
            // The resolver refuses these; a custom domain whose DNS check is async lands here.
            Some((
                "http3_passthrough",
                b"TLS passthrough routes are not served over HTTP/3",
            ))
        } else {
            None
        };
        if let Some((reason, text)) = refusal {
            edge.metrics.limit(reason);
            conn.close(VarInt::from_u32(H3_REQUEST_REJECTED), text);
            return;
        }
    }
    let mut builder = ::h3::server::builder();
    builder.max_field_section_size(u64::try_from(cfg.max_header_bytes).unwrap_or(u64::MAX));
    let h3conn = tokio::time::timeout(
        handshake,
        builder.build::<_, Bytes>(h3_quinn::Connection::new(conn.clone())),
    )
    .await;
    let mut h3conn = match h3conn {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "http/3 setup failed");
            return;
        }
        Err(_) => {
            edge.metrics.handshake_failure("timeout");
            conn.close(VarInt::from_u32(H3_NO_ERROR), b"setup timeout");
            return;
        }
    };
    let ctx = Arc::new(ConnCtx::new(client, "https", sni, route, trusted));

    let streams = TaskTracker::new();
    let idle = Duration::from_millis(cfg.idle_timeout_ms);
    let age = tokio::time::sleep(Duration::from_secs(cfg.max_connection_age_secs));
    tokio::pin!(age);
    let mut tick =
        tokio::time::interval((idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    // quinn's idle timeout ends silent connections; this one ends connections that keep
    // pinging without asking for anything, like the TCP listener's idle check.
    let mut quiet_since: Option<Instant> = None;
    let mut closing: Option<Instant> = None;
    loop {
        let begin_close = tokio::select! {
            r = h3conn.accept() => match r {
                Ok(Some(resolver)) => {
                    quiet_since = None;
                    let e = edge.clone();
                    let c = ctx.clone();
                    streams.spawn(serve_request(e, c, resolver).in_current_span());
                    false
                }
                Ok(None) => break,
                Err(e) => {
                    if !e.is_h3_no_error() {
                        tracing::debug!(error = %e, "http/3 connection ended");
                    }
                    break;
                }
            },
            _ = shutdown.cancelled(), if closing.is_none() => true,
            _ = &mut age, if closing.is_none() => true,
            _ = streams.wait(), if closing.is_some() => break,
            _ = tick.tick() => match closing {
                Some(since) => {
                    if since.elapsed() > CONN_DRAIN {
                        break;
                    }
                    false
                }
                None if streams.is_empty() => {
                    let since = *quiet_since.get_or_insert_with(Instant::now);
                    since.elapsed() >= idle
                }
                None => {
                    quiet_since = None;
                    false
                }
            },
        };
        if begin_close {
            closing = Some(Instant::now());
            // GOAWAY: the client sends no new requests here; in-flight ones finish.
            streams.close();
            match tokio::time::timeout(Duration::from_secs(1), h3conn.shutdown(0)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "http/3 goaway failed"),
                Err(_) => tracing::debug!("http/3 goaway timed out"),
            }
        }
    }
    conn.close(VarInt::from_u32(H3_NO_ERROR), b"");
}

type SendHalf = RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
type RecvHalf = RequestStream<h3_quinn::RecvStream, Bytes>;

async fn serve_request(
    edge: Arc<Edge>,
    ctx: Arc<ConnCtx>,
    resolver: RequestResolver<h3_quinn::Connection, Bytes>,
) {
    let cfg = &edge.cfg;
    let header_timeout = Duration::from_millis(cfg.header_read_timeout_ms);
    let (req, stream) = match tokio::time::timeout(header_timeout, resolver.resolve_request()).await
    {
        Err(_) => {
            edge.metrics.limit("header_read_timeout");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "http/3 request refused");
            return;
        }
        Ok(Ok(x)) => x,
    };
    let (mut send, recv) = stream.split();
    let total = Duration::from_secs(cfg.http3_request_total_timeout_secs);
    match tokio::time::timeout(total, exchange(&edge, &ctx, req, recv, &mut send)).await {
        Ok(Ok(())) => {}
        Ok(Err(StreamFailure::Malformed)) => {
            edge.metrics.limit("http3_content_length");
            tracing::debug!("http/3 request body does not match its content-length");
            // A stream error (RFC 9114 §4.1.2), whatever the backend had answered so far.
            send.stop_stream(Code::H3_MESSAGE_ERROR);
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "http/3 response cut short");
            // A reset, not a FIN: the client must not take a truncated body for a whole one.
            send.stop_stream(Code::H3_INTERNAL_ERROR);
        }
        Err(_) => {
            edge.metrics.limit("http3_request_timeout");
            tracing::debug!(?total, "http/3 request exceeded its total time");
            send.stop_stream(Code::H3_REQUEST_CANCELLED);
        }
    }
}

/// One request through the proxy and its response back to the client.
async fn exchange(
    edge: &Edge,
    ctx: &ConnCtx,
    req: Request<()>,
    recv: RecvHalf,
    send: &mut SendHalf,
) -> Result<(), StreamFailure> {
    let cfg = &edge.cfg;
    let idle = Duration::from_millis(cfg.idle_timeout_ms);
    let (mut parts, ()) = req.into_parts();
    parts.version = Version::HTTP_3;
    let refusal = if parts.headers.len() > cfg.max_header_count {
        edge.metrics.limit("header_count");
        Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
    } else if parts.method == Method::CONNECT {
        Some(StatusCode::NOT_IMPLEMENTED)
    } else {
        None
    };
    if let Some(status) = refusal {
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        send_timed(idle, send.send_response(resp)).await?;
        return send_timed(idle, send.finish()).await;
    }
    join_cookies(&mut parts.headers);
    let Ok(length) = declared_length(&parts.headers) else {
        return Err(StreamFailure::Malformed);
    };
    if let Some(n) = length {
        // One value for the backend, however the client spelled it (`5, 5`).
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    let mut body = H3Body::new(recv, length, idle);
    let malformed = body.malformed.clone();
    body.prime();
    if malformed.load(Ordering::Acquire) {
        // Seen before anything was sent: no backend hears of this request.
        return Err(StreamFailure::Malformed);
    }
    let resp = edge
        .proxy
        .handle(&edge.snapshot, ctx, Request::from_parts(parts, body))
        .await;
    // The body failed the backend request (hyper closes that connection; it is never pooled
    // again): the client gets a stream error, not the gateway's 502 for it.
    if malformed.load(Ordering::Acquire) {
        return Err(StreamFailure::Malformed);
    }

    let (mut parts, mut body) = resp.into_parts();
    // Connection-specific fields are malformed in HTTP/3 (RFC 9114 §4.2).
    for h in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        parts.headers.remove(h);
    }
    parts.version = Version::HTTP_3;
    send_timed(idle, send.send_response(Response::from_parts(parts, ()))).await?;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(StreamFailure::BackendStalled(idle)),
            Ok(None) => break,
            Ok(Some(Err(_))) if malformed.load(Ordering::Acquire) => {
                return Err(StreamFailure::Malformed)
            }
            Ok(Some(Err(e))) => return Err(StreamFailure::Backend(e)),
            Ok(Some(Ok(f))) => f,
        };
        match frame.into_data() {
            Ok(data) => {
                if !data.is_empty() {
                    send_timed(idle, send.send_data(data)).await?;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    send_timed(idle, send.send_trailers(trailers)).await?;
                    return Ok(());
                }
            }
        }
    }
    send_timed(idle, send.finish()).await
}

/// A send that waits on the client's flow control, bounded so a client that stops reading
/// cannot hold the stream (and the backend connection behind it) forever.
async fn send_timed<F>(limit: Duration, f: F) -> Result<(), StreamFailure>
where
    F: std::future::Future<Output = Result<(), ::h3::error::StreamError>>,
{
    match tokio::time::timeout(limit, f).await {
        Err(_) => Err(StreamFailure::SendStalled(limit)),
        Ok(r) => Ok(r?),
    }
}

/// HTTP/3 (like HTTP/2) may split `Cookie` into several fields; HTTP/1.1 backends expect one
/// (RFC 9114 §4.2.1).
fn join_cookies(headers: &mut http::HeaderMap) {
    let values: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    if values.len() < 2 {
        return;
    }
    if let Ok(v) = HeaderValue::from_str(&values.join("; ")) {
        headers.insert(header::COOKIE, v);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Data,
    Trailers,
    Done,
}

/// The request body of an HTTP/3 stream as an `http_body::Body`, read as the backend takes it
/// (nothing is buffered beyond one QUIC read). A client that sends nothing for the idle timeout
/// fails the body, and with it the request; so does DATA that disagrees with the request's
/// `content-length` (more bytes than declared, or the stream ending short of them): the
/// backend must never take a short or long body for a complete one.
pub struct H3Body {
    recv: RecvHalf,
    state: BodyState,
    /// The request's `content-length`, if it declared one, and the DATA bytes seen so far.
    declared: Option<u64>,
    received: u64,
    /// The chunk that completed `declared`, held until the stream's end confirms it.
    held: Option<Bytes>,
    /// Set when the DATA disagreed with `declared`.
    malformed: Arc<AtomicBool>,
    /// A frame read by [`H3Body::prime`], handed out first.
    ready: Option<Result<Frame<Bytes>, BoxError>>,
    stall_limit: Duration,
    stall: Pin<Box<tokio::time::Sleep>>,
}

impl H3Body {
    fn new(recv: RecvHalf, length: Option<u64>, stall_limit: Duration) -> Self {
        H3Body {
            recv,
            // DATA is read even after `content-length: 0`: any byte of it is an error.
            state: BodyState::Data,
            declared: length,
            received: 0,
            held: None,
            malformed: Arc::new(AtomicBool::new(false)),
            ready: None,
            stall_limit,
            stall: Box::pin(tokio::time::sleep(stall_limit)),
        }
    }

    /// Looks, without waiting, at what already arrived. A GET usually comes with its stream's
    /// FIN in the same packet as its headers; knowing that the body is empty lets the proxy
    /// retry the request on another backend after a connect failure, as for HTTP/1.1 and 2.
    fn prime(&mut self) {
        let mut cx = Context::from_waker(Waker::noop());
        match self.poll_next(&mut cx) {
            Poll::Ready(Some(f)) => self.ready = Some(f),
            Poll::Ready(None) | Poll::Pending => {}
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let progress = match self.state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Data => match self.recv.poll_recv_data(cx) {
                    Poll::Ready(Ok(Some(mut buf))) => {
                        let data = buf.copy_to_bytes(buf.remaining());
                        if data.is_empty() {
                            continue;
                        }
                        self.received = self.received.saturating_add(data.len() as u64);
                        if let Some(e) = length_mismatch(self.declared, self.received, false) {
                            self.held = None;
                            Some(Some(Err(self.malformed(e))))
                        } else if self.declared == Some(self.received) {
                            // The last declared byte goes on only once the stream's end shows
                            // that nothing follows it (a client closes the stream after its
                            // request, RFC 9114 §4.1): otherwise the backend would already
                            // hold a complete request when the excess arrives.
                            self.held = Some(data);
                            let deadline = tokio::time::Instant::now() + self.stall_limit;
                            self.stall.as_mut().reset(deadline);
                            continue;
                        } else {
                            Some(Some(Ok(Frame::data(data))))
                        }
                    }
                    Poll::Ready(Ok(None)) => {
                        if let Some(e) = length_mismatch(self.declared, self.received, true) {
                            let e = self.malformed(e);
                            self.state = BodyState::Done;
                            return Poll::Ready(Some(Err(e)));
                        }
                        self.state = BodyState::Trailers;
                        match self.held.take() {
                            Some(last) => Some(Some(Ok(Frame::data(last)))),
                            None => continue,
                        }
                    }
                    Poll::Ready(Err(e)) => Some(Some(Err(BoxError::from(e)))),
                    Poll::Pending => None,
                },
                BodyState::Trailers => match self.recv.poll_recv_trailers(cx) {
                    Poll::Ready(Ok(Some(t))) => Some(Some(Ok(Frame::trailers(t)))),
                    Poll::Ready(Ok(None)) => Some(None),
                    Poll::Ready(Err(e)) => Some(Some(Err(BoxError::from(e)))),
                    Poll::Pending => None,
                },
            };
            return match progress {
                Some(item) => {
                    match &item {
                        Some(Ok(f)) if f.is_data() => {
                            let deadline = tokio::time::Instant::now() + self.stall_limit;
                            self.stall.as_mut().reset(deadline);
                        }
                        _ => self.state = BodyState::Done,
                    }
                    Poll::Ready(item)
                }
                None => {
                    if std::future::Future::poll(self.stall.as_mut(), cx).is_ready() {
                        self.state = BodyState::Done;
                        let msg = format!("request body stalled for {:?}", self.stall_limit);
                        return Poll::Ready(Some(Err(msg.into())));
                    }
                    Poll::Pending
                }
            };
        }
    }
}

impl H3Body {
    fn malformed(&mut self, e: String) -> BoxError {
        self.malformed.store(true, Ordering::Release);
        e.into()
    }
}

/// The request's `content-length`: decimal digits only (no sign), repeated values equal.
fn declared_length(headers: &http::HeaderMap) -> Result<Option<u64>, ()> {
    let mut length = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.to_str().map_err(|_| ())?.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            let n = part.parse::<u64>().map_err(|_| ())?;
            if length.is_some_and(|l| l != n) {
                return Err(());
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// Why `received` DATA bytes (all of them, once `ended`) disagree with a declared
/// `content-length`; `None` while they agree so far.
fn length_mismatch(declared: Option<u64>, received: u64, ended: bool) -> Option<String> {
    let declared = declared?;
    if received > declared {
        Some(format!(
            "request body longer than its content-length ({received} > {declared} bytes)"
        ))
    } else if ended && received < declared {
        Some(format!(
            "request body ended at {received} of the {declared} bytes its content-length declared"
        ))
    } else {
        None
    }
}

impl Body for H3Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(f) = this.ready.take() {
            return Poll::Ready(Some(f));
        }
        this.poll_next(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_none() && self.state == BodyState::Done
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

/// `Alt-Svc` for HTTP/1.1 and HTTP/2 responses over TLS, once HTTP/3 listens.
pub(super) fn alt_svc(edge: &Edge) -> Option<HeaderValue> {
    edge.alt_svc.load().as_deref().cloned()
}

#[cfg(test)]
#[path = "h3_tests.rs"]
mod tests;
