//! The load generator, one implementation for every target (tokio + rustls + hyper, and quinn +
//! h3 for HTTP/3): the [`Client`], the loop of each mode (`h1`: keep-alive connections, one
//! request in flight on each; `h2` and `h3`: connections × concurrent streams; `newconn`: a new
//! TCP connection and full TLS handshake per request), the measurement of one target in one
//! mode, and the check that a target serves before it is measured.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::processes::tree_cpu;
use super::stats::{Run, Stats, Window};
use super::target::{
    Kind, Mode, Target, APP, BODY, CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, REQUEST_TIMEOUT,
    START_TIMEOUT,
};

/// How much load: the windows, and the connections and streams of every client (this binary's
/// and the outside tools).
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Unmeasured seconds before each measurement.
    pub warmup: u64,
    /// Measured seconds per target, mode and round.
    pub duration: u64,
    /// Client connections (h1, h2, h3) or concurrent connect loops (newconn).
    pub connections: usize,
    /// Concurrent streams per HTTP/2 or HTTP/3 connection.
    pub streams: usize,
    /// Threads of wrk and h2load.
    pub tool_threads: usize,
}

/// The TLS and QUIC client settings every connection of every target uses.
pub struct Client {
    h1: TlsConnector,
    h2: TlsConnector,
    h3: quinn::ClientConfig,
    name: ServerName<'static>,
    host: String,
}

impl Client {
    /// A client trusting the CA at `ca`, naming [`APP`]'s host.
    pub fn new(ca: &Path) -> anyhow::Result<Client> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut &std::fs::read(ca)?[..]) {
            roots.add(c?)?;
        }
        let make = |alpn: &[u8]| -> anyhow::Result<TlsConnector> {
            let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
            cfg.alpn_protocols = vec![alpn.to_vec()];
            // Every new connection is a full handshake: that is what "new TLS connections/s"
            // measures, and it keeps the servers' differing ticket policies out of it.
            cfg.resumption = rustls::client::Resumption::disabled();
            Ok(TlsConnector::from(Arc::new(cfg)))
        };
        let host = format!("{APP}.portcullis.localhost");
        let mut quic = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        quic.alpn_protocols = vec![b"h3".to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(quic)?;
        Ok(Client {
            h1: make(b"http/1.1")?,
            h2: make(b"h2")?,
            h3: quinn::ClientConfig::new(Arc::new(quic)),
            name: ServerName::try_from(host.clone())?,
            host,
        })
    }

    async fn tls(&self, addr: SocketAddr, h2: bool) -> anyhow::Result<TlsStream<TcpStream>> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .context("connect timed out")?
            .context("connect")?;
        tcp.set_nodelay(true)?;
        let connector = if h2 { &self.h2 } else { &self.h1 };
        let tls =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(self.name.clone(), tcp))
                .await
                .context("TLS handshake timed out")?
                .context("TLS handshake")?;
        let want: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
        if tls.get_ref().1.alpn_protocol() != Some(want) {
            bail!(
                "ALPN: asked for {}, server chose {:?}",
                String::from_utf8_lossy(want),
                tls.get_ref().1.alpn_protocol().map(String::from_utf8_lossy)
            );
        }
        Ok(tls)
    }

    async fn h1_conn(&self, addr: SocketAddr) -> anyhow::Result<http1::SendRequest<Empty<Bytes>>> {
        let tls = self.tls(addr, false).await?;
        let (sender, conn) = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls)),
        )
        .await
        .context("HTTP/1.1 handshake timed out")??;
        tokio::spawn(conn);
        Ok(sender)
    }

    async fn h2_conn(&self, addr: SocketAddr) -> anyhow::Result<http2::SendRequest<Empty<Bytes>>> {
        let tls = self.tls(addr, true).await?;
        let (sender, conn) = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            http2::handshake::<_, _, Empty<Bytes>>(TokioExecutor::new(), TokioIo::new(tls)),
        )
        .await
        .context("HTTP/2 handshake timed out")??;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// One QUIC connection on its own UDP socket (as each TCP connection has its own port),
    /// with its h3 driver on a task.
    async fn h3_conn(&self, addr: SocketAddr) -> anyhow::Result<H3Sender> {
        let mut ep = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        ep.set_default_client_config(self.h3.clone());
        let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, ep.connect(addr, &self.host)?)
            .await
            .context("QUIC handshake timed out")??;
        let (mut driver, sender) = h3::client::new(h3_quinn::Connection::new(conn)).await?;
        tokio::spawn(async move {
            let _ep = ep;
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(sender)
    }

    fn request(&self, h2: bool) -> anyhow::Result<hyper::Request<Empty<Bytes>>> {
        let b = hyper::Request::builder();
        let b = if h2 {
            // HTTP/2 carries the authority in the URI (:authority).
            b.uri(format!("https://{}/", self.host))
        } else {
            b.uri("/").header(hyper::header::HOST, &self.host)
        };
        Ok(b.body(Empty::new())?)
    }
}

/// Checks a response and reads its body, all within the request deadline.
async fn finish(
    resp: impl std::future::Future<Output = hyper::Result<hyper::Response<hyper::body::Incoming>>>,
) -> anyhow::Result<()> {
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        let resp = resp.await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if status != hyper::StatusCode::OK || body.len() != BODY.len() {
            bail!("status {status}, {} body bytes", body.len());
        }
        Ok(())
    })
    .await
    .context("request timed out")?
}

type H3Sender = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// One HTTP/3 request: the same checks as [`finish`], within the request deadline.
async fn h3_get(c: &Client, s: &mut H3Sender) -> anyhow::Result<()> {
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut stream = s.send_request(c.request(true)?.map(|_| ())).await?;
        stream.finish().await?;
        let resp = stream.recv_response().await?;
        let mut len = 0;
        while let Some(chunk) = stream.recv_data().await? {
            len += bytes::Buf::remaining(&chunk);
        }
        if resp.status() != hyper::StatusCode::OK || len != BODY.len() {
            bail!("status {}, {len} body bytes", resp.status());
        }
        Ok(())
    })
    .await
    .context("request timed out")?
}

/// After a failed request: a short pause, so a target that refuses everything is not hammered
/// in a tight loop (and the errors stay countable).
async fn backoff() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

async fn h1_loop(c: Arc<Client>, addr: SocketAddr, w: Window) -> Stats {
    let mut st = Stats::new();
    let mut conn: Option<http1::SendRequest<Empty<Bytes>>> = None;
    while Instant::now() < w.end {
        let t0 = Instant::now();
        let r = async {
            // A server may close a keep-alive connection between requests; reconnecting is
            // part of this request's latency, not an error.
            let ready = match conn.as_mut() {
                Some(s) => tokio::time::timeout(REQUEST_TIMEOUT, s.ready())
                    .await
                    .is_ok_and(|r| r.is_ok()),
                None => false,
            };
            if !ready {
                conn = Some(c.h1_conn(addr).await?);
            }
            let s = conn.as_mut().context("no connection")?;
            let req = c.request(false)?;
            finish(s.send_request(req)).await
        }
        .await;
        st.done(w, t0, &r);
        if r.is_err() {
            conn = None;
            backoff().await;
        }
    }
    st
}

async fn h2_loop(c: Arc<Client>, addr: SocketAddr, streams: usize, w: Window) -> Stats {
    let mut st = Stats::new();
    while Instant::now() < w.end {
        let t0 = Instant::now();
        let sender = match c.h2_conn(addr).await {
            Ok(s) => s,
            Err(e) => {
                st.done(w, t0, &Err(e));
                backoff().await;
                continue;
            }
        };
        // `streams` requests in flight on this connection until the window closes or the
        // connection fails, then reconnect.
        let tasks: Vec<_> = (0..streams)
            .map(|_| {
                let mut s = sender.clone();
                let c = c.clone();
                async move {
                    let mut st = Stats::new();
                    while Instant::now() < w.end {
                        let t0 = Instant::now();
                        let r = async {
                            tokio::time::timeout(REQUEST_TIMEOUT, s.ready())
                                .await
                                .context("stream slot timed out")??;
                            finish(s.send_request(c.request(true)?)).await
                        }
                        .await;
                        st.done(w, t0, &r);
                        if r.is_err() {
                            if s.is_closed() {
                                break;
                            }
                            backoff().await;
                        }
                    }
                    st
                }
            })
            .collect();
        drop(sender);
        for s in futures::future::join_all(tasks).await {
            let _ = st.merge(s);
        }
    }
    st
}

async fn h3_loop(c: Arc<Client>, addr: SocketAddr, streams: usize, w: Window) -> Stats {
    let mut st = Stats::new();
    while Instant::now() < w.end {
        let t0 = Instant::now();
        let sender = match c.h3_conn(addr).await {
            Ok(s) => s,
            Err(e) => {
                st.done(w, t0, &Err(e));
                backoff().await;
                continue;
            }
        };
        // As with HTTP/2: `streams` requests in flight on this connection until the window
        // closes or the connection fails, then reconnect.
        let tasks: Vec<_> = (0..streams)
            .map(|_| {
                let mut s = sender.clone();
                let c = c.clone();
                async move {
                    let mut st = Stats::new();
                    let mut failed = 0;
                    while Instant::now() < w.end {
                        let t0 = Instant::now();
                        let r = h3_get(&c, &mut s).await;
                        st.done(w, t0, &r);
                        if r.is_err() {
                            failed += 1;
                            if failed > 3 {
                                break;
                            }
                            backoff().await;
                        } else {
                            failed = 0;
                        }
                    }
                    st
                }
            })
            .collect();
        drop(sender);
        for s in futures::future::join_all(tasks).await {
            let _ = st.merge(s);
        }
    }
    st
}

async fn newconn_loop(c: Arc<Client>, addr: SocketAddr, w: Window) -> Stats {
    let mut st = Stats::new();
    while Instant::now() < w.end {
        let t0 = Instant::now();
        let r = async {
            let mut s = c.h1_conn(addr).await?;
            finish(s.send_request(c.request(false)?)).await
            // Dropping the sender closes the connection.
        }
        .await;
        st.done(w, t0, &r);
        if r.is_err() {
            backoff().await;
        }
    }
    st
}

/// Loads `t` in `mode` with this client, `o.connections` loops at once, for the warm-up and then
/// the measured window; also takes the target's CPU time over that window.
pub async fn measure(
    c: &Arc<Client>,
    t: &Target,
    mode: Mode,
    o: &LoadOptions,
) -> anyhow::Result<Run> {
    let start = Instant::now() + Duration::from_secs(o.warmup);
    let w = Window {
        start,
        end: start + Duration::from_secs(o.duration),
    };
    let mut tasks = Vec::new();
    for _ in 0..o.connections {
        let c = c.clone();
        let addr = t.addr;
        tasks.push(match mode {
            Mode::H1 => tokio::spawn(h1_loop(c, addr, w)),
            Mode::H2 => tokio::spawn(h2_loop(c, addr, o.streams, w)),
            Mode::Newconn => tokio::spawn(newconn_loop(c, addr, w)),
            Mode::H3 => tokio::spawn(h3_loop(c, addr, o.streams, w)),
            Mode::Wrk | Mode::H2load => bail!("{mode:?} is driven by an outside tool"),
        });
    }
    // The target's CPU time over exactly the measured window.
    let pid = t.pid;
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(w.start.into()).await;
        let before = tree_cpu(pid)?;
        tokio::time::sleep_until(w.end.into()).await;
        Some(tree_cpu(pid)? - before)
    });
    let mut stats = Stats::new();
    for t in tasks {
        stats.merge(t.await?)?;
    }
    Ok(Run {
        stats,
        secs: o.duration as f64,
        cpu: cpu.await?,
    })
}

/// One request per target and protocol before measuring, so a misrouted target fails loudly
/// instead of producing a column of errors.
pub async fn check(c: &Client, t: &Target) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let r = async {
            let mut s = c.h1_conn(t.addr).await?;
            finish(s.send_request(c.request(false)?)).await?;
            let mut s = c.h2_conn(t.addr).await?;
            finish(s.send_request(c.request(true)?)).await?;
            if t.kind == Kind::Portcullis {
                let mut s = c.h3_conn(t.addr).await?;
                h3_get(c, &mut s).await?;
            }
            anyhow::Ok(())
        }
        .await;
        match r {
            Ok(()) => return Ok(()),
            // Portcullis applies the new app and instance asynchronously, through Raft.
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{} does not serve the backend", t.kind.label())))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
