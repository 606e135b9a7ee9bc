//! Flow control through the tunnel (issue 23): a reader that stops holds its sender back after a
//! bounded number of bytes (the gateway never buffers a fast CVM's whole response for a slow
//! client), and a CVM that stops reading, or vanishes, with data queued toward it does not
//! stall another CVM's transfers on the same gateway endpoint.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::*;
use portcullis_test_support::bulk::{self, download, upload, PORT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What one direction of one connection may hold in flight, from the writing application to
/// the reading one: the writer's pending 64 KiB chunk, its channel (8 × 64 KiB), its socket's
/// send buffer (256 KiB), the reader's receive buffer (256 KiB) and its channel (8 × 64 KiB).
/// About 1.6 MiB; 2 MiB leaves room for a chunk in each hand.
const IN_FLIGHT_BOUND: u64 = 2 << 20;

/// Waits until `written` stops growing (unchanged over 300 ms), up to `within`.
async fn wait_stalled(written: &AtomicU64, within: Duration) -> Result<u64> {
    let deadline = tokio::time::Instant::now() + within;
    let mut last = written.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = written.load(Ordering::Relaxed);
        if now == last && now > 0 {
            return Ok(now);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the writer never stalled: {now} bytes written"
        );
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_holds_the_sender_back_within_a_bound() -> Result<()> {
    init_tracing();
    let gw = endpoint("10.90.0.1").await?;
    let cvm = endpoint("10.90.0.2").await?;
    gw.set_peers(vec![peer_of(&cvm)]).await?;
    cvm.set_peers(vec![peer_of(&gw)]).await?;
    let mut listener = cvm.listen(8080).await?;

    // The CVM writes as fast as it can (a fast backend's response) ...
    let written = Arc::new(AtomicU64::new(0));
    let total: u64 = 64 << 20;
    let writer = {
        let written = written.clone();
        tokio::spawn(async move {
            let mut s = listener.accept().await.context("listener closed")?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut sent = 0u64;
            while sent < total {
                bulk::fill(sent, &mut buf);
                s.write_all(&buf).await?;
                sent += buf.len() as u64;
                written.store(sent, Ordering::Relaxed);
            }
            s.shutdown().await?;
            anyhow::Ok(s)
        })
    };
    // ... and the gateway's side (a slow client's proxy) reads nothing for now.
    let mut s = gw.connect(cvm.tunnel_ip(), 8080).await?;
    let held = wait_stalled(&written, Duration::from_secs(30)).await?;
    eprintln!("a reader that stops: the writer got {held} bytes out, then waited");
    ensure!(
        held <= IN_FLIGHT_BOUND,
        "{held} bytes left the writer with nobody reading (bound {IN_FLIGHT_BOUND})"
    );

    // Reading resumes: everything arrives, in order.
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    let read_all = async {
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return anyhow::Ok(());
            }
            bulk::fill(got, &mut want[..n]);
            ensure!(buf[..n] == want[..n], "corrupted near byte {got}");
            got += n as u64;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read_all)
        .await
        .context("the transfer never resumed")??;
    ensure!(got == total, "{got} of {total} bytes");
    let _cvm_stream = writer.await??;
    ensure!(gw.counters().snapshot().stack_panics == 0);
    ensure!(cvm.counters().snapshot().stack_panics == 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_or_vanished_cvm_does_not_stall_another() -> Result<()> {
    init_tracing();
    let gw = endpoint("10.89.0.1").await?;
    let slow = endpoint("10.89.0.2").await?;
    let good = endpoint("10.89.0.3").await?;
    gw.set_peers(vec![peer_of(&slow), peer_of(&good)]).await?;
    slow.set_peers(vec![peer_of(&gw)]).await?;
    good.set_peers(vec![peer_of(&gw)]).await?;
    bulk::spawn_server(good.listen(PORT).await?);

    // The slow CVM accepts 8 connections and never reads them; the gateway fills each with
    // an upload until the windows close and its send buffers are full.
    let mut slow_listener = slow.listen(8080).await?;
    let accepted = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(s) = slow_listener.accept().await {
            held.push(s);
        }
        held
    });
    let pushed = Arc::new(AtomicU64::new(0));
    let mut stuck = Vec::new();
    for _ in 0..8 {
        let mut s = gw.connect(slow.tunnel_ip(), 8080).await?;
        let pushed = pushed.clone();
        stuck.push(tokio::spawn(async move {
            let buf = vec![7u8; 64 * 1024];
            while s.write_all(&buf).await.is_ok() {
                pushed.fetch_add(buf.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    let held = wait_stalled(&pushed, Duration::from_secs(30)).await?;
    eprintln!("8 connections to a CVM that does not read: {held} bytes queued, then held back");
    ensure!(
        held <= 8 * IN_FLIGHT_BOUND,
        "{held} bytes queued toward the stalled CVM"
    );

    // The other CVM's transfers go through meanwhile.
    let len: u64 = 16 << 20;
    let t = Duration::from_secs(120);
    tokio::time::timeout(t, download(&gw, good.tunnel_ip(), len))
        .await
        .context("download from the other CVM stalled")??;
    tokio::time::timeout(t, upload(&gw, good.tunnel_ip(), len))
        .await
        .context("upload to the other CVM stalled")??;

    // The slow CVM vanishes with data still queued toward it (its endpoint is dropped: no
    // more ACKs, only retransmissions from the gateway), and the other CVM still gets through.
    drop(slow);
    accepted.abort();
    tokio::time::timeout(t, download(&gw, good.tunnel_ip(), len))
        .await
        .context("download stalled after the other CVM vanished")??;
    tokio::time::timeout(t, upload(&gw, good.tunnel_ip(), len))
        .await
        .context("upload stalled after the other CVM vanished")??;
    for s in stuck {
        s.abort();
    }
    ensure!(gw.counters().snapshot().stack_panics == 0);
    ensure!(good.counters().snapshot().stack_panics == 0);
    Ok(())
}
