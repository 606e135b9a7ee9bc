//! Helpers shared by the integration tests: endpoints on 127.0.0.1, an echo service, and a raw
//! WireGuard peer for crafting packets. wireguard-go in a network namespace and the checked
//! bulk-transfer protocol come from the portcullis-test-support crate (shared with the
//! cluster tests).
// Every test binary includes this module and uses a different part of it.
#![allow(dead_code)]

pub mod raw;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use portcullis_wg::{Endpoint, EndpointConfig, PeerConfig, PrivateKey, TunnelListener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// An endpoint on 127.0.0.1:0 with tunnel address `tunnel_ip`.
pub async fn endpoint(tunnel_ip: &str) -> Result<Endpoint> {
    let cfg = EndpointConfig::new(PrivateKey::generate(), ip(tunnel_ip));
    endpoint_with(cfg).await
}

pub async fn endpoint_with(cfg: EndpointConfig) -> Result<Endpoint> {
    let sock = UdpSocket::bind("127.0.0.1:0").await?;
    Ok(Endpoint::new(cfg, sock)?)
}

/// How `a` names `b` as a peer (with b's UDP address).
pub fn peer_of(b: &Endpoint) -> PeerConfig {
    PeerConfig::new(b.public_key(), b.tunnel_ip()).with_endpoint(b.local_addr())
}

/// Serves an echo protocol on every accepted stream: copies bytes back until EOF.
pub fn spawn_echo(mut listener: TunnelListener) {
    tokio::spawn(async move {
        while let Some(mut s) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
}

/// Serves a tiny HTTP/1.1-like request/response: reads one request head, answers with a body
/// that names the request line, closes.
pub fn spawn_http(mut listener: TunnelListener) {
    tokio::spawn(async move {
        while let Some(mut s) = listener.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&req)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let body = format!("you asked for {line}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
}

/// One HTTP-like request through the tunnel; returns the full response.
pub async fn http_get(ep: &Endpoint, to: IpAddr, port: u16, path: &str) -> Result<String> {
    let mut s = ep.connect(to, port).await.context("connect")?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: cvm\r\n\r\n").as_bytes())
        .await?;
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut resp))
        .await
        .context("response timed out")??;
    Ok(String::from_utf8(resp)?)
}

/// 64-bit FNV-1a, to compare bulk transfers without holding both copies.
pub fn fnv1a(mut h: u64, data: &[u8]) -> u64 {
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}
pub const FNV_INIT: u64 = 0xcbf29ce484222325;

/// Deterministic pseudo-random bytes (xorshift), so a transfer is not all zeros.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn wait_for<F: FnMut() -> bool>(
    what: &str,
    timeout: Duration,
    mut cond: F,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub fn sock(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}
