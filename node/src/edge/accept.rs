//! Accepting connections: the listeners, the node-wide and per-IP limits at accept, and one task
//! per connection, on the data-plane workers or the node's shared runtime. [`Edge::spawn`]
//! starts the accept loops and the edge's background tasks (state watcher, health probes, idle
//! backend connections, geo database reload).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use portcullis_raft::store::SharedState;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::limits::OpenGuard;
use super::{balance, h3, worker, Edge};
use crate::config::EdgeConfig;
use crate::metrics::ListenerLabels;

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

impl Edge {
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
}
