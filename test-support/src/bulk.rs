//! The bulk-transfer protocol of the tunnel soaks (wg/tests/t08_bulk_soak.rs and
//! t09_flow_control.rs, and the WAN loss test cluster-tests/tests/t92_tunnel_wan.rs): a CVM-side
//! server, in Rust on an `Endpoint` or in Python on kernel TCP, and the gateway-side client.
//! Each stream starts with one line: `down N` (the server sends N pattern bytes and closes),
//! `up` (it reads to EOF and answers `<bytes> <first mismatch or -1>`), or `ping` (`pong`).
//! Every byte depends on its offset, so a cut, a corruption or a segment at the wrong place
//! shows up.

use std::net::IpAddr;

use anyhow::{bail, ensure, Context, Result};
use portcullis_wg::{Endpoint, TunnelListener};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wggo::Proc;

/// The tunnel port the servers listen on.
pub const PORT: u16 = 9000;

/// The byte at stream offset `i`: period 2^24, so a segment delivered at the wrong offset
/// (anything but a multiple of 16 MiB away) differs. The Python server computes the same.
pub fn byte_at(i: u64) -> u8 {
    (i.wrapping_mul(131) + (i >> 8).wrapping_mul(7) + (i >> 16).wrapping_mul(13)) as u8
}

pub fn fill(offset: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = byte_at(offset + k as u64);
    }
}

/// The protocol served by an `Endpoint` CVM on `listener`.
pub fn spawn_server(mut listener: TunnelListener) {
    tokio::spawn(async move {
        while let Some(mut s) = listener.accept().await {
            tokio::spawn(async move {
                let _ = serve_one(&mut s).await;
            });
        }
    });
}

async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<()> {
    let line = read_line(s).await?;
    let mut words = line.split_whitespace();
    match words.next() {
        Some("down") => {
            let n: u64 = words.next().context("length")?.parse()?;
            send_pattern(s, n).await?;
        }
        Some("up") => {
            let (n, bad) = check_pattern(s).await?;
            let answer = format!("{n} {}\n", bad.map_or(-1, |b| b as i64));
            s.write_all(answer.as_bytes()).await?;
        }
        Some("ping") => s.write_all(b"pong\n").await?,
        other => bail!("unknown command {other:?}"),
    }
    s.shutdown().await?;
    Ok(())
}

/// Kernel TCP behind wireguard-go: the same protocol in Python (a thread per connection).
const SERVER_PY: &str = r#"
import socket, sys, threading
P = bytes(((i * 131) + (i >> 8) * 7 + (i >> 16) * 13) & 255 for i in range(1 << 24))
def line(c):
    b = b""
    while not b.endswith(b"\n"):
        k = c.recv(1)
        if not k:
            return b""
        b += k
    return b
def handle(c):
    try:
        w = line(c).split()
        if w[0] == b"down":
            left, off = int(w[1]), 0
            while left:
                k = min(left, len(P) - off, 1 << 20)
                c.sendall(P[off:off + k])
                left -= k
                off = (off + k) % len(P)
        elif w[0] == b"up":
            n, bad, buf = 0, -1, bytearray(1 << 20)
            while True:
                k = c.recv_into(buf)
                if k == 0:
                    break
                if bad < 0:
                    off = n % len(P)
                    want = (P[off:] + P[:off])[:k] if off + k > len(P) else P[off:off + k]
                    if buf[:k] != want:
                        bad = n + next(i for i in range(k) if buf[i] != want[i])
                n += k
            c.sendall(b"%d %d\n" % (n, bad))
        elif w[0] == b"ping":
            c.sendall(b"pong\n")
        c.shutdown(socket.SHUT_WR)
    finally:
        c.close()
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

async fn read_line<S: AsyncRead + Unpin>(s: &mut S) -> Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if s.read(&mut b).await? == 0 {
            bail!("closed before a line ended ({} bytes)", line.len());
        }
        line.push(b[0]);
        ensure!(line.len() < 256, "line too long");
    }
    Ok(String::from_utf8(line)?)
}

async fn send_pattern<W: AsyncWrite + Unpin>(w: &mut W, n: u64) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < n {
        let k = (n - sent).min(buf.len() as u64) as usize;
        fill(sent, &mut buf[..k]);
        w.write_all(&buf[..k]).await?;
        sent += k as u64;
    }
    Ok(())
}

/// Reads to EOF: the byte count and the first offset that is not the pattern.
async fn check_pattern<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u64, Option<u64>)> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    let mut bad = None;
    loop {
        let k = r.read(&mut buf).await?;
        if k == 0 {
            return Ok((n, bad));
        }
        if bad.is_none() {
            fill(n, &mut want[..k]);
            bad = buf[..k]
                .iter()
                .zip(&want[..k])
                .position(|(a, b)| a != b)
                .map(|i| n + i as u64);
        }
        n += k as u64;
    }
}

pub async fn download(gw: &Endpoint, to: IpAddr, len: u64) -> Result<()> {
    let mut s = gw.connect(to, PORT).await.context("connect")?;
    s.write_all(format!("down {len}\n").as_bytes()).await?;
    let (n, bad) = check_pattern(&mut s).await?;
    ensure!(n == len, "download cut at {n} of {len} bytes");
    ensure!(bad.is_none(), "download corrupted at byte {bad:?}");
    Ok(())
}

pub async fn upload(gw: &Endpoint, to: IpAddr, len: u64) -> Result<()> {
    let mut s = gw.connect(to, PORT).await.context("connect")?;
    s.write_all(b"up\n").await?;
    send_pattern(&mut s, len).await?;
    s.shutdown().await?;
    let answer = read_line(&mut s).await?;
    ensure!(
        answer.trim() == format!("{len} -1"),
        "upload arrived as {answer:?} (bytes, first mismatch)"
    );
    Ok(())
}

pub async fn ping(gw: &Endpoint, to: IpAddr) -> Result<()> {
    let mut s = gw.connect(to, PORT).await.context("connect")?;
    s.write_all(b"ping\n").await?;
    ensure!(read_line(&mut s).await? == "pong\n", "bad pong");
    Ok(())
}

/// The Python server in namespace `ns` on `ip`:[`PORT`] (kernel TCP behind wireguard-go).
pub fn python_server(ns: &str, ip: IpAddr) -> Result<Proc> {
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", SERVER_PY])
        .args([&ip.to_string(), &PORT.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("spawning the python server")?;
    Ok(Proc(child))
}
