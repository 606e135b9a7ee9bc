//! `portcullis demo-app`: a small HTTP service that `portcullis up` runs once per region as the
//! demo app's instances, and that tests use as a real backend process.
//!
//! Every request is answered with JSON naming the instance (name, region, instance id, the local
//! port it was reached on) and echoing what the proxy forwarded (method, path, headers, body
//! size). `Upgrade: websocket` requests become a WebSocket echo. The same listener speaks
//! HTTP/1.1 and h2c (prior knowledge), and with `--tls-cert/--tls-key` it terminates TLS itself
//! (the backend of a passthrough route). `/stream?chunks=N&ms=M` streams N chunks M ms apart;
//! `/bytes` serves and checks bulk data ([`bulk`]).

pub mod body;
pub mod bulk;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use futures::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use body::{full, Body};

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Address to listen on (repeatable).
    #[arg(long, required = true)]
    pub listen: Vec<SocketAddr>,
    /// The app name reported in responses.
    #[arg(long, default_value = "demo")]
    pub name: String,
    #[arg(long, default_value = "local")]
    pub region: String,
    /// The instance id reported in responses. Default: `<name>-<region>`.
    #[arg(long)]
    pub instance_id: Option<String>,
    /// Serve TLS with this certificate chain (PEM) instead of plain HTTP.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Exit once none of these processes is alive (repeatable). `up` passes the node pids, so
    /// demo apps do not outlive a cluster that was killed without `down`.
    #[arg(long = "exit-with")]
    pub exit_with: Vec<u32>,
}

#[derive(Serialize)]
struct Answer<'a> {
    app: &'a str,
    region: &'a str,
    instance_id: &'a str,
    port: u16,
    method: String,
    path: String,
    version: String,
    tls: bool,
    headers: BTreeMap<String, String>,
    body_bytes: usize,
}

struct Ident {
    name: String,
    region: String,
    instance_id: String,
}

fn query_u64(req: &Request<Incoming>, key: &str, default: u64) -> u64 {
    req.uri()
        .query()
        .and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        })
        .unwrap_or(default)
}

async fn handle(
    id: Arc<Ident>,
    local: SocketAddr,
    tls: bool,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let is_ws = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if is_ws {
        let Some(key) = req
            .headers()
            .get("sec-websocket-key")
            .map(|k| derive_accept_key(k.as_bytes()))
        else {
            return full(
                StatusCode::BAD_REQUEST,
                "missing sec-websocket-key\n",
                "text/plain",
            );
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let prefix = format!("{}: ", id.instance_id);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            while let Some(Ok(msg)) = ws.next().await {
                use tokio_tungstenite::tungstenite::Message;
                let reply = match msg {
                    Message::Text(t) => Message::text(format!("{prefix}{t}")),
                    Message::Binary(b) => Message::Binary(b),
                    Message::Ping(p) => Message::Pong(p),
                    Message::Close(_) => break,
                    _ => continue,
                };
                if ws.send(reply).await.is_err() {
                    break;
                }
            }
        });
        let mut r = Response::new(
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
        );
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(v) = HeaderValue::from_str(&key) {
            r.headers_mut().insert("sec-websocket-accept", v);
        }
        return r;
    }
    if req.uri().path() == "/bytes" {
        return match *req.method() {
            http::Method::POST | http::Method::PUT => bulk::verify(req.into_body()).await,
            _ => bulk::download(query_u64(&req, "n", 0)),
        };
    }
    if req.uri().path() == "/stream" {
        let chunks = query_u64(&req, "chunks", 10).min(100_000);
        let gap = Duration::from_millis(query_u64(&req, "ms", 100).min(60_000));
        let who = id.instance_id.clone();
        let stream = futures::stream::unfold(0u64, move |i| {
            let who = who.clone();
            async move {
                if i >= chunks {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(gap).await;
                }
                let frame = Frame::data(Bytes::from(format!("{who} chunk {i}\n")));
                Some((
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(frame),
                    i + 1,
                ))
            }
        });
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return r;
    }
    let (parts, body) = req.into_parts();
    let body_bytes = match body.collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => return full(StatusCode::BAD_REQUEST, "body read failed\n", "text/plain"),
    };
    let answer = Answer {
        app: &id.name,
        region: &id.region,
        instance_id: &id.instance_id,
        port: local.port(),
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        version: format!("{:?}", parts.version),
        tls,
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body_bytes,
    };
    match serde_json::to_vec_pretty(&answer) {
        Ok(mut j) => {
            j.push(b'\n');
            full(StatusCode::OK, j, "application/json")
        }
        Err(e) => full(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{e}\n"),
            "text/plain",
        ),
    }
}

fn tls_acceptor(args: &DemoArgs) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let chain =
        std::fs::read_to_string(cert).with_context(|| format!("read {}", cert.display()))?;
    let key_pem = std::fs::read(key).with_context(|| format!("read {}", key.display()))?;
    let ck = crate::tls::certified_key("demo", &chain, &key_pem)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            ck.cert.clone(),
            rustls_pemfile::private_key(&mut &key_pem[..])?.context("no private key")?,
        )?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg))))
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let id = Arc::new(Ident {
        instance_id: args
            .instance_id
            .clone()
            .unwrap_or_else(|| format!("{}-{}", args.name, args.region)),
        name: args.name.clone(),
        region: args.region.clone(),
    });
    let acceptor = tls_acceptor(&args)?;
    if !args.exit_with.is_empty() {
        let pids = args.exit_with.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if !pids.iter().any(|p| crate::procs::alive(*p)) {
                    eprintln!("demo-app: every watched process is gone; exiting");
                    std::process::exit(0);
                }
            }
        });
    }
    let mut tasks = tokio::task::JoinSet::new();
    for addr in &args.listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "demo-app {} ({}) listening on {local}{}",
            id.instance_id,
            id.region,
            if acceptor.is_some() { " (tls)" } else { "" }
        );
        let id = id.clone();
        let acceptor = acceptor.clone();
        tasks.spawn(async move {
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        eprintln!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let id = id.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let tls = acceptor.is_some();
                    let svc = service_fn(move |req| {
                        let id = id.clone();
                        async move { Ok::<_, Infallible>(handle(id, local, tls, req).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let _ = match acceptor {
                        Some(a) => match a.accept(stream).await {
                            Ok(s) => {
                                builder
                                    .serve_connection_with_upgrades(TokioIo::new(s), svc)
                                    .await
                            }
                            Err(_) => return,
                        },
                        None => {
                            builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                                .await
                        }
                    };
                });
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}
