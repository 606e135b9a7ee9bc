//! Bulk transfers through the tunnel, checksummed and under a deadline: the gateway → CVM
//! upload of tunnel-bench (the endpoint that calls `connect` writes a large body, the listening
//! side reads it), the download the other way, and both over a lossy path.
//!
//! `upload_to_kernel_tcp_behind_wireguard_go` is the reproduction of the upload stall seen with
//! smoltcp 0.13 (docs/wireguard.md "smoltcp version"): with `Interface::poll` in the driver it
//! stalled at the 120 s deadline in an optimized build (`cargo test --release`); a debug build
//! is too slow to overflow wireguard-go's UDP buffer and passed either way. The driver unit test
//! `a_stack_pass_emits_at_most_an_egress_batch` guards the cause in any build.

mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::*;
use portcullis_wg::Endpoint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes per transfer: `default_mib` MiB, or `PCWG_BULK_MB` MiB for a measurement.
fn bulk_len(default_mib: usize) -> usize {
    std::env::var("PCWG_BULK_MB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(default_mib)
        * 1024
        * 1024
}

/// Generous for a debug build on a shared 2-core machine; a stall waits forever.
const DEADLINE: Duration = Duration::from_secs(120);

async fn pair(a: &str, b: &str) -> Result<(Endpoint, Endpoint)> {
    let gw = endpoint(a).await?;
    let cvm = endpoint(b).await?;
    gw.set_peers(vec![peer_of(&cvm)]).await?;
    cvm.set_peers(vec![peer_of(&gw)]).await?;
    Ok((gw, cvm))
}

/// Writes `len` pattern bytes to `w` in 64 KiB pieces, then shuts it down; returns the sum.
async fn send_all<W: AsyncWriteExt + Unpin>(w: &mut W, len: usize, seed: u64) -> Result<u64> {
    let block = pattern(1024 * 1024, seed);
    let mut sum = FNV_INIT;
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len());
        for piece in block[..n].chunks(64 * 1024) {
            w.write_all(piece).await.context("write")?;
        }
        sum = fnv1a(sum, &block[..n]);
        left -= n;
    }
    w.shutdown().await.context("shutdown")?;
    Ok(sum)
}

/// Reads `r` to EOF; returns the byte count and the sum.
async fn recv_all<R: AsyncReadExt + Unpin>(r: &mut R) -> Result<(usize, u64)> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    let mut sum = FNV_INIT;
    loop {
        let n = r.read(&mut buf).await.context("read")?;
        if n == 0 {
            return Ok((got, sum));
        }
        sum = fnv1a(sum, &buf[..n]);
        got += n;
    }
}

fn report(what: &str, len: usize, took: Duration) {
    eprintln!(
        "{what}: {} MiB in {took:.2?} ({:.1} MB/s)",
        len / (1024 * 1024),
        len as f64 / took.as_secs_f64() / 1e6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_from_the_connecting_side() -> Result<()> {
    init_tracing();
    let (gw, cvm) = pair("10.99.7.1", "10.99.7.2").await?;
    let mut listener = cvm.listen(8080).await?;
    let len = bulk_len(64);
    let reader = tokio::spawn(async move {
        let mut s = listener.accept().await.context("listener closed")?;
        recv_all(&mut s).await
    });
    let started = Instant::now();
    let mut s = gw.connect(cvm.tunnel_ip(), 8080).await?;
    let transfer = async {
        let sent = send_all(&mut s, len, 7).await?;
        let got = reader.await??;
        anyhow::Ok((sent, got))
    };
    let (sent, (got, sum)) = tokio::time::timeout(DEADLINE, transfer)
        .await
        .with_context(|| {
            format!(
                "upload stalled: {DEADLINE:?} passed; gw {:?} cvm {:?}",
                gw.counters().snapshot(),
                cvm.counters().snapshot()
            )
        })??;
    let took = started.elapsed();
    ensure!(got == len, "received {got} bytes of {len}");
    ensure!(sum == sent, "checksum mismatch");
    report("upload (connecting side writes)", len, took);
    ensure!(gw.counters().snapshot().stack_panics == 0);
    ensure!(cvm.counters().snapshot().stack_panics == 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_to_the_connecting_side() -> Result<()> {
    init_tracing();
    let (gw, cvm) = pair("10.99.8.1", "10.99.8.2").await?;
    let mut listener = cvm.listen(8080).await?;
    let len = bulk_len(32);
    let writer = tokio::spawn(async move {
        let mut s = listener.accept().await.context("listener closed")?;
        let sum = send_all(&mut s, len, 8).await?;
        // Keep the stream until the reader has everything (dropping is graceful anyway).
        anyhow::Ok((sum, s))
    });
    let started = Instant::now();
    let mut s = gw.connect(cvm.tunnel_ip(), 8080).await?;
    let transfer = async {
        let got = recv_all(&mut s).await?;
        let (sent, _s) = writer.await??;
        anyhow::Ok((sent, got))
    };
    let (sent, (got, sum)) = tokio::time::timeout(DEADLINE, transfer)
        .await
        .with_context(|| {
            format!(
                "download stalled: {DEADLINE:?} passed; gw {:?} cvm {:?}",
                gw.counters().snapshot(),
                cvm.counters().snapshot()
            )
        })??;
    let took = started.elapsed();
    ensure!(got == len, "received {got} bytes of {len}");
    ensure!(sum == sent, "checksum mismatch");
    report("download (listening side writes)", len, took);
    ensure!(gw.counters().snapshot().stack_panics == 0);
    ensure!(cvm.counters().snapshot().stack_panics == 0);
    Ok(())
}

/// CRC-32 (IEEE), to compare with Python's `zlib.crc32` on the far side.
fn crc32(mut crc: u32, data: &[u8]) -> u32 {
    crc = !crc;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A TCP sink for one connection in `ns`: reads to EOF, answers "<bytes> <crc32>\n", exits.
const SINK_PY: &str = r#"
import socket, sys, zlib
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
c, _ = s.accept()
n, crc, buf = 0, 0, bytearray(1 << 20)
while True:
    k = c.recv_into(buf)
    if k == 0:
        break
    n += k
    crc = zlib.crc32(memoryview(buf)[:k], crc)
c.sendall(b"%d %d\n" % (n, crc))
c.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_to_kernel_tcp_behind_wireguard_go() -> Result<()> {
    kernel_upload("upload_to_kernel_tcp_behind_wireguard_go", None, "u", 78).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_to_kernel_tcp_behind_wireguard_go_recovers_losses() -> Result<()> {
    kernel_upload(
        "upload_to_kernel_tcp_behind_wireguard_go_recovers_losses",
        Some(200),
        "l",
        79,
    )
    .await
}

/// The gateway → CVM upload against kernel TCP (wireguard-go on a TUN device in a namespace,
/// a Python sink): the receiver whose ACK pattern (immediate duplicate ACKs, SACK) stalled
/// smoltcp 0.13. With `loss_every`, the gateway's socket drops one full-size datagram in that
/// many.
async fn kernel_upload(name: &str, loss_every: Option<u64>, tag: &str, net: u8) -> Result<()> {
    use portcullis_test_support::wggo::{self, Netns, Proc, WgGo, WgGoSpec};
    use portcullis_wg::PeerConfig;
    init_tracing();
    if let Some(why) = wggo::skip_reason() {
        eprintln!("SKIPPED {name}: {why}");
        return Ok(());
    }
    let sfx = wggo::suffix();
    let ns = Netns::new(format!("pcwg-{tag}-{sfx}"))?;
    let ifname = format!("pcw{tag}{sfx}");
    let wg = WgGo::start(WgGoSpec {
        ifname: &ifname,
        cidr: &format!("10.{net}.0.2/24"),
        ns: &ns.name,
        udp_in_ns: false,
        mtu: 1420,
    })?;
    let (gw, dropped) = lossy_endpoint(&format!("10.{net}.0.1"), loss_every.unwrap_or(0)).await?;
    wg.add_peer(
        &gw.public_key(),
        &format!("10.{net}.0.1/32"),
        Some(gw.local_addr()),
    )?;
    gw.set_peers(vec![
        PeerConfig::new(wg.public_key, wg.tunnel_ip).with_endpoint(wg.udp_addr_loopback())
    ])
    .await?;
    let _sink = Proc(
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, "python3", "-c", SINK_PY])
            .args([&wg.tunnel_ip.to_string(), "9000"])
            .spawn()
            .context("spawning the python sink")?,
    );

    // python needs a moment to bind; retry until it accepts.
    let mut s = None;
    for _ in 0..50 {
        if let Ok(c) = gw.connect(wg.tunnel_ip, 9000).await {
            s = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut s = s.context("the sink behind wireguard-go never accepted")?;
    let len = bulk_len(if loss_every.is_some() { 16 } else { 64 });
    let block = pattern(1024 * 1024, 9);
    // Summed before the clock starts: a bitwise CRC in a debug build is slow.
    let mut crc = 0u32;
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len());
        crc = crc32(crc, &block[..n]);
        left -= n;
    }
    let started = Instant::now();
    let transfer = async {
        let mut left = len;
        while left > 0 {
            let n = left.min(block.len());
            for piece in block[..n].chunks(64 * 1024) {
                s.write_all(piece).await.context("write")?;
            }
            left -= n;
        }
        s.shutdown().await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        anyhow::Ok(answer)
    };
    let answer = tokio::time::timeout(DEADLINE, transfer)
        .await
        .with_context(|| {
            format!(
                "upload to wireguard-go stalled: {DEADLINE:?} passed, {} datagrams dropped; gw {:?}",
                dropped.load(std::sync::atomic::Ordering::Relaxed),
                gw.counters().snapshot()
            )
        })??;
    let took = started.elapsed();
    ensure!(
        answer.trim() == format!("{len} {crc}"),
        "sink saw {answer:?}, sent {len} bytes with crc {crc}"
    );
    report(
        &format!(
            "upload to kernel TCP behind wireguard-go{}",
            loss_every
                .map(|n| format!(
                    ", losing 1 in {n} ({} dropped)",
                    dropped.load(std::sync::atomic::Ordering::Relaxed)
                ))
                .unwrap_or_default()
        ),
        len,
        took,
    );
    ensure!(gw.counters().snapshot().stack_panics == 0);
    Ok(())
}

/// A UDP socket that drops every `every`-th WireGuard data message it is asked to send
/// (handshakes pass), like a congested path: the sending TCP stack must recover the loss.
struct Lossy {
    inner: tokio::net::UdpSocket,
    every: u64,
    seen: std::sync::atomic::AtomicU64,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl portcullis_wg::DatagramSocket for Lossy {
    fn poll_recv_from(
        &self,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<std::net::SocketAddr>> {
        self.inner.poll_recv_from(cx, buf)
    }

    fn poll_send_to(
        &self,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
        target: std::net::SocketAddr,
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::sync::atomic::Ordering::Relaxed;
        // Type 4 is a data message; only full-size ones (bulk segments, not ACKs).
        if self.every > 0 && buf.first() == Some(&4) && buf.len() > 1000 {
            let n = self.seen.fetch_add(1, Relaxed) + 1;
            if n.is_multiple_of(self.every) {
                self.dropped.fetch_add(1, Relaxed);
                return std::task::Poll::Ready(Ok(buf.len()));
            }
        }
        self.inner.poll_send_to(cx, buf, target)
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }
}

/// An endpoint whose socket drops one full-size data message in `every` (0: none); returns it
/// and the count of dropped datagrams.
async fn lossy_endpoint(
    tunnel_ip: &str,
    every: u64,
) -> Result<(Endpoint, std::sync::Arc<std::sync::atomic::AtomicU64>)> {
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let ep = Endpoint::new(
        portcullis_wg::EndpointConfig::new(portcullis_wg::PrivateKey::generate(), ip(tunnel_ip)),
        Lossy {
            inner: sock,
            every,
            seen: std::sync::atomic::AtomicU64::new(0),
            dropped: dropped.clone(),
        },
    )?;
    Ok((ep, dropped))
}

/// The upload of `upload_from_the_connecting_side` over a path that loses one full-size
/// datagram in `every`, so the sender's loss recovery (fast retransmit, RTO) is exercised.
async fn lossy_upload(every: u64, tunnel: [&str; 2]) -> Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    init_tracing();
    let (gw, dropped) = lossy_endpoint(tunnel[0], every).await?;
    let cvm = endpoint(tunnel[1]).await?;
    gw.set_peers(vec![peer_of(&cvm)]).await?;
    cvm.set_peers(vec![peer_of(&gw)]).await?;
    let mut listener = cvm.listen(8080).await?;
    let len = bulk_len(16);
    let reader = tokio::spawn(async move {
        let mut s = listener.accept().await.context("listener closed")?;
        recv_all(&mut s).await
    });
    let started = Instant::now();
    let mut s = gw.connect(cvm.tunnel_ip(), 8080).await?;
    let transfer = async {
        let sent = send_all(&mut s, len, 11).await?;
        let got = reader.await??;
        anyhow::Ok((sent, got))
    };
    let (sent, (got, sum)) = tokio::time::timeout(DEADLINE, transfer)
        .await
        .with_context(|| {
            format!(
                "lossy upload stalled: {DEADLINE:?} passed, {} datagrams dropped; gw {:?} cvm {:?}",
                dropped.load(Relaxed),
                gw.counters().snapshot(),
                cvm.counters().snapshot()
            )
        })??;
    let took = started.elapsed();
    ensure!(got == len, "received {got} bytes of {len}");
    ensure!(sum == sent, "checksum mismatch");
    report(
        &format!(
            "upload losing 1 in {every} ({} dropped)",
            dropped.load(Relaxed)
        ),
        len,
        took,
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_from_the_connecting_side_recovers_losses() -> Result<()> {
    lossy_upload(200, ["10.99.9.1", "10.99.9.2"]).await
}
