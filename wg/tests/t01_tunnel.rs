//! Two endpoints over 127.0.0.1: request/response, bulk transfer, failure modes of connect,
//! and peers removed and re-added at runtime.

mod common;

use std::time::Duration;

use anyhow::{ensure, Result};
use common::*;
use portcullis_wg::{EndpointConfig, PrivateKey, WgError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_round_trip_and_bulk_transfer() -> Result<()> {
    init_tracing();
    let gw = endpoint("10.99.0.1").await?;
    let cvm = endpoint("10.99.0.2").await?;
    gw.set_peers(vec![peer_of(&cvm)]).await?;
    cvm.set_peers(vec![peer_of(&gw)]).await?;
    spawn_http(cvm.listen(80).await?);
    spawn_echo(cvm.listen(7).await?);

    // Request/response, several in a row (each a new TCP connection through one session).
    for i in 0..5 {
        let resp = http_get(&gw, cvm.tunnel_ip(), 80, &format!("/item/{i}")).await?;
        ensure!(resp.starts_with("HTTP/1.1 200 OK"), "bad response {resp:?}");
        ensure!(
            resp.ends_with(&format!("you asked for GET /item/{i} HTTP/1.1")),
            "bad body {resp:?}"
        );
    }

    // 10 MiB through the echo service: write and read concurrently, compare checksums.
    const LEN: usize = 10 * 1024 * 1024;
    let data = pattern(LEN, 42);
    let sent_sum = fnv1a(FNV_INIT, &data);
    let stream = gw.connect(cvm.tunnel_ip(), 7).await?;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(100_000) {
            wr.write_all(chunk).await?;
        }
        wr.shutdown().await?;
        anyhow::Ok(wr)
    });
    let started = std::time::Instant::now();
    let mut got = 0usize;
    let mut sum = FNV_INIT;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), rd.read(&mut buf)).await??;
        if n == 0 {
            break;
        }
        sum = fnv1a(sum, &buf[..n]);
        got += n;
    }
    let _wr = writer.await??;
    ensure!(got == LEN, "echoed {got} bytes, sent {LEN}");
    ensure!(sum == sent_sum, "checksum mismatch after bulk transfer");
    eprintln!(
        "10 MiB echoed in {:?} ({:.1} MB/s each way)",
        started.elapsed(),
        LEN as f64 / started.elapsed().as_secs_f64() / 1e6
    );

    let g = gw.counters().snapshot();
    ensure!(g.handshakes_completed >= 1, "{g:?}");
    ensure!(
        g.spoofed_source == 0 && g.not_for_us == 0 && g.invalid_datagrams == 0,
        "{g:?}"
    );
    let stats = gw.peer_stats().await?;
    ensure!(
        stats.len() == 1 && stats[0].last_handshake.is_some(),
        "{stats:?}"
    );
    Ok(())
}

#[tokio::test]
async fn connect_failures_are_reported() -> Result<()> {
    init_tracing();
    let gw = endpoint("10.99.1.1").await?;
    let cvm = endpoint("10.99.1.2").await?;
    gw.set_peers(vec![peer_of(&cvm)]).await?;
    cvm.set_peers(vec![peer_of(&gw)]).await?;

    // Nobody listens on port 9: the CVM's stack answers RST.
    match gw.connect(cvm.tunnel_ip(), 9).await {
        Err(WgError::ConnectRefused(a)) => ensure!(a.port() == 9),
        other => anyhow::bail!("expected refused, got {other:?}"),
    }
    // No peer owns this address.
    match gw.connect(ip("10.99.1.77"), 80).await {
        Err(WgError::NoRoute(a)) => ensure!(a == ip("10.99.1.77")),
        other => anyhow::bail!("expected no route, got {other:?}"),
    }
    // A peer that exists in config but is not running: the handshake never completes.
    let ghost = PrivateKey::generate().public_key();
    let dead_udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    gw.set_peers(vec![
        peer_of(&cvm),
        portcullis_wg::PeerConfig::new(ghost, ip("10.99.1.3"))
            .with_endpoint(dead_udp.local_addr()?),
    ])
    .await?;
    let t = Duration::from_millis(700);
    match gw.connect_timeout(ip("10.99.1.3"), 80, t).await {
        Err(WgError::ConnectTimeout { timeout, .. }) => ensure!(timeout == t),
        other => anyhow::bail!("expected timeout, got {other:?}"),
    }
    ensure!(gw.counters().snapshot().connects_failed >= 2);
    // The real peer was not disturbed by the update.
    let mut s = gw.connect(cvm.tunnel_ip(), 9).await.err();
    ensure!(matches!(s.take(), Some(WgError::ConnectRefused(_))));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_removed_then_readded_keeps_working_and_others_undisturbed() -> Result<()> {
    init_tracing();
    let gw = endpoint("10.99.2.1").await?;
    let a = endpoint("10.99.2.2").await?;
    let b = endpoint("10.99.2.3").await?;
    gw.set_peers(vec![peer_of(&a), peer_of(&b)]).await?;
    a.set_peers(vec![peer_of(&gw)]).await?;
    b.set_peers(vec![peer_of(&gw)]).await?;
    spawn_echo(a.listen(7).await?);
    spawn_echo(b.listen(7).await?);

    let mut to_b = gw.connect(b.tunnel_ip(), 7).await?;
    echo_once(&mut to_b, b"before").await?;
    let mut to_a = gw.connect(a.tunnel_ip(), 7).await?;
    echo_once(&mut to_a, b"a before").await?;

    // Remove A: its open connection is reset, new ones have no route; B is untouched.
    let diff = gw.set_peers(vec![peer_of(&b)]).await?;
    ensure!(
        diff.removed == vec![a.public_key()] && diff.unchanged == 1,
        "{diff:?}"
    );
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(2), to_a.read(&mut buf)).await?;
    ensure!(
        matches!(r, Ok(0) | Err(_)),
        "removed peer's stream still open: {r:?}"
    );
    ensure!(matches!(
        gw.connect(a.tunnel_ip(), 7).await,
        Err(WgError::NoRoute(_))
    ));
    echo_once(&mut to_b, b"during").await?;

    // Re-add A: a fresh session (new handshake) and connections work again.
    let before = gw.counters().snapshot().handshakes_completed;
    let diff = gw.set_peers(vec![peer_of(&a), peer_of(&b)]).await?;
    ensure!(diff.added == vec![a.public_key()], "{diff:?}");
    let mut to_a = gw.connect(a.tunnel_ip(), 7).await?;
    echo_once(&mut to_a, b"a after").await?;
    ensure!(gw.counters().snapshot().handshakes_completed > before);
    echo_once(&mut to_b, b"after").await?;
    Ok(())
}

async fn echo_once(s: &mut portcullis_wg::TunnelStream, msg: &[u8]) -> Result<()> {
    s.write_all(msg).await?;
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await??;
    ensure!(got == msg, "echo mismatch");
    Ok(())
}

#[tokio::test]
async fn invalid_config_is_rejected_with_value() -> Result<()> {
    let mut cfg = EndpointConfig::new(PrivateKey::generate(), ip("10.99.3.1"));
    cfg.mtu = 100;
    let err = endpoint_with(cfg)
        .await
        .expect_err("mtu 100 must be refused");
    ensure!(err.to_string().contains("100"), "{err}");
    Ok(())
}
