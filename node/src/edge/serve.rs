//! HTTP/1.1 and HTTP/2 on one connection (TLS, or the plain port) until it closes, idles, grows
//! too old or the node shuts down; each request goes to the proxy, or on the plain port to the
//! redirect and ACME HTTP-01 answers. Also the admin listener's `.internal` requests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::limits::{Activity, ActivityClock, ConnPermit, CONN_DRAIN};
use super::proxy::{self, ConnCtx};
use super::{h3, redirect, Edge};

impl Edge {
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
    pub(super) async fn serve_plain(
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
    pub(super) async fn serve_http<I>(
        self: &Arc<Self>,
        io: I,
        ctx: Arc<ConnCtx>,
        shutdown: CancellationToken,
    ) where
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
