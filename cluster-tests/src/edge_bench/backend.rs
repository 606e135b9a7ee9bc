//! The fixed-response backend every target proxies to (the binary's hidden `backend`
//! subcommand): [`BODY`] from hyper, rather than `portcullis demo-app`, which echoes the
//! forwarded headers as JSON, so its response size and work would differ by proxy.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::processes::shutdown_signal;
use super::target::{BODY, HANDSHAKE_TIMEOUT};

fn fixed_response() -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::new(Full::new(Bytes::from_static(BODY)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    r
}

async fn answer(
    _req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    Ok(fixed_response())
}

/// Serves [`BODY`] on `listen` (plain HTTP/1.1, for the proxies) and on `tls_listen` (TLS with
/// ALPN h2 and http/1.1, the "direct" ceiling) until Ctrl-C or SIGTERM.
pub async fn serve(
    listen: SocketAddr,
    tls_listen: SocketAddr,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<()> {
    let tls = TlsAcceptor::from(Arc::new(server_config(cert, key)?));
    let plain = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    let secure = TcpListener::bind(tls_listen)
        .await
        .with_context(|| format!("bind {tls_listen}"))?;
    tokio::spawn(crate::backend::serve_http1(plain, answer));
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = secure.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = s.set_nodelay(true);
            let tls = tls.clone();
            tokio::spawn(async move {
                let Ok(Ok(s)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(s)).await else {
                    return;
                };
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), hyper::service::service_fn(answer))
                    .await;
            });
        }
    });
    shutdown_signal().await;
    Ok(())
}

fn server_config(cert: &Path, key: &Path) -> anyhow::Result<rustls::ServerConfig> {
    let chain = rustls_pemfile::certs(&mut &std::fs::read(cert)?[..])
        .collect::<Result<Vec<CertificateDer<'static>>, _>>()?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &std::fs::read(key)?[..])?
        .context("no private key in the key file")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}
