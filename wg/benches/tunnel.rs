//! Tunnel throughput, measured side by side in one run:
//!
//! 1. Portcullis Endpoint ↔ Endpoint over 127.0.0.1 UDP (user-space WireGuard + smoltcp both ends);
//! 2. Portcullis Endpoint → wireguard-go (TUN + kernel TCP in a namespace) over 127.0.0.1 UDP;
//! 3. the reverse: kernel TCP behind wireguard-go → Portcullis Endpoint (how a gateway receives
//!    a CVM's response body);
//! 4. wireguard-go ↔ wireguard-go over TUN between two namespaces joined by a veth pair;
//! 5. the bare veth link between those namespaces (kernel TCP, no tunnel).
//!
//! Rows 2–5 need root (network namespaces, TUN); without it they are skipped with the reason.
//! Every row moves the same bytes with the same sender/receiver code: the source writes
//! `BENCH_MB` MiB (default 256) in 256 KiB writes, the sink counts them and answers with the count
//! after EOF, and the clock stops at that answer. Each row runs `BENCH_RUNS` times (default 3), rows
//! taking turns within each round; the median is reported. `BENCH_FILTER=text` runs only the rows
//! whose name contains `text`.
//!
//! Run: `CARGO_TARGET_DIR=... cargo bench -p portcullis-wg --bench tunnel`
//! (the binary re-executes itself as `sink`/`source` inside the namespaces).

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use portcullis_test_support::wggo::{self, Netns, Proc, WgGo, WgGoPair, WgGoSpec};
use portcullis_wg::{Endpoint, EndpointConfig, PeerConfig, PrivateKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const CHUNK: usize = 256 * 1024;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Runtime::new()?;
    match args.get(1).map(String::as_str) {
        Some("sink") => rt.block_on(sink(args.get(2).context("sink ADDR")?.parse()?)),
        Some("source") => {
            let addr: SocketAddr = args.get(2).context("source ADDR BYTES")?.parse()?;
            let bytes: u64 = args.get(3).context("source ADDR BYTES")?.parse()?;
            let secs = rt.block_on(async {
                let s = connect_retry(addr).await?;
                push(s, bytes).await
            })?;
            println!("{secs}");
            Ok(())
        }
        _ => rt.block_on(bench()),
    }
}

const ROWS: [&str; 5] = [
    "portcullis endpoint <-> endpoint (loopback UDP)",
    "portcullis endpoint -> wireguard-go (TUN, netns)",
    "wireguard-go (TUN, netns) -> portcullis endpoint",
    "wireguard-go <-> wireguard-go (TUN, 2 netns, veth)",
    "bare veth (kernel TCP, 2 netns)",
];

async fn bench() -> Result<()> {
    let mb: u64 = env_or("BENCH_MB", 256);
    let runs: usize = env_or("BENCH_RUNS", 3);
    // Substring of row names to run (all when unset), for iterating on one path.
    let filter = std::env::var("BENCH_FILTER").unwrap_or_default();
    let bytes = mb * 1024 * 1024;
    println!("tunnel throughput: {mb} MiB per run, median of {runs} runs, MB = 10^6 bytes");
    let skip = wggo::skip_reason();
    let wanted: Vec<usize> = (0..ROWS.len())
        .filter(|&i| ROWS[i].contains(filter.as_str()))
        .filter(|&i| i == 0 || skip.is_none())
        .collect();
    let net = if skip.is_none() && wanted.iter().any(|&i| i >= 3) {
        Some(TwoNs::new()?)
    } else {
        None
    };
    // Rows take turns within each round, so a burst of load from other processes on the machine
    // hits all of them alike rather than one row's every run.
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); ROWS.len()];
    for _ in 0..runs {
        for &i in &wanted {
            let r = match (i, &net) {
                (0, _) => endpoint_pair(bytes).await?,
                (1, _) => endpoint_to_wggo(bytes).await?,
                (2, _) => wggo_to_endpoint(bytes).await?,
                (3, Some(net)) => net.run(bytes, "10.202.0.2")?,
                (4, Some(net)) => net.run(bytes, "10.201.0.2")?,
                _ => continue,
            };
            results[i].push(r);
        }
    }

    println!();
    println!("| path | MB/s (median) | runs |");
    println!("|---|---|---|");
    for (i, name) in ROWS.iter().enumerate() {
        let v = &mut results[i];
        if !v.is_empty() {
            v.sort_by(|a, b| a.total_cmp(b));
            println!("| {name} | {:.0} | {v:.0?} |", v[v.len() / 2]);
        } else if let (Some(why), true) = (&skip, i > 0) {
            println!("| {name} | skipped: {why} | |");
        }
    }
    Ok(())
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes `bytes` then waits for the sink's count; returns MB/s.
async fn push<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, bytes: u64) -> Result<f64> {
    let buf = vec![0x5au8; CHUNK];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        s.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    let got = tokio::time::timeout(Duration::from_secs(120), s.read_u64()).await??;
    let secs = start.elapsed().as_secs_f64();
    if got != bytes {
        bail!("sink counted {got} bytes, sent {bytes}");
    }
    Ok(bytes as f64 / secs / 1e6)
}

/// Counts bytes to EOF, answers with the count.
async fn drain<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    s.write_u64(total).await?;
    s.shutdown().await?;
    Ok(())
}

async fn sink(addr: SocketAddr) -> Result<()> {
    let l = TcpListener::bind(addr).await?;
    loop {
        let (s, _) = l.accept().await?;
        tokio::spawn(drain(s));
    }
}

async fn connect_retry(addr: SocketAddr) -> Result<TcpStream> {
    for _ in 0..100 {
        if let Ok(s) = TcpStream::connect(addr).await {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("could not connect to {addr}")
}

async fn new_endpoint(tunnel_ip: &str) -> Result<Endpoint> {
    let cfg = EndpointConfig::new(PrivateKey::generate(), tunnel_ip.parse()?);
    Ok(Endpoint::new(cfg, UdpSocket::bind("127.0.0.1:0").await?)?)
}

async fn endpoint_pair(bytes: u64) -> Result<f64> {
    let a = new_endpoint("10.200.0.1").await?;
    let b = new_endpoint("10.200.0.2").await?;
    a.set_peers(vec![
        PeerConfig::new(b.public_key(), b.tunnel_ip()).with_endpoint(b.local_addr())
    ])
    .await?;
    b.set_peers(vec![
        PeerConfig::new(a.public_key(), a.tunnel_ip()).with_endpoint(a.local_addr())
    ])
    .await?;
    let mut l = b.listen(5001).await?;
    let server = tokio::spawn(async move {
        if let Some(s) = l.accept().await {
            let _ = drain(s).await;
        }
    });
    let s = a.connect(b.tunnel_ip(), 5001).await?;
    let r = push(s, bytes).await;
    server.abort();
    r
}

/// A Portcullis Endpoint (10.203.0.1, loopback UDP) peered with wireguard-go whose TUN device
/// (10.203.0.2) and kernel TCP live in a namespace; wireguard-go's UDP socket stays in the root
/// namespace so both ends talk over 127.0.0.1.
struct EpWgGo {
    ep: Endpoint,
    // Drop order: the wireguard-go process, then the namespace.
    _wg: WgGo,
    ns: Netns,
}

impl EpWgGo {
    async fn new() -> Result<Self> {
        let sfx = wggo::suffix();
        let ns = Netns::new(format!("pcwg-bench-e-{sfx}"))?;
        let ifname = format!("pcbe{sfx}");
        let wg = WgGo::start(WgGoSpec {
            ifname: &ifname,
            cidr: "10.203.0.2/24",
            ns: &ns.name,
            udp_in_ns: false,
            mtu: 1420,
        })?;
        let ep = new_endpoint("10.203.0.1").await?;
        wg.add_peer(&ep.public_key(), "10.203.0.1/32", Some(ep.local_addr()))?;
        ep.set_peers(vec![
            PeerConfig::new(wg.public_key, wg.tunnel_ip).with_endpoint(wg.udp_addr_loopback())
        ])
        .await?;
        Ok(Self { ep, _wg: wg, ns })
    }
}

/// The Endpoint sends (a gateway forwarding a request body to a CVM).
async fn endpoint_to_wggo(bytes: u64) -> Result<f64> {
    let net = EpWgGo::new().await?;
    let _sink = self_in_ns(&net.ns.name, &["sink", "10.203.0.2:5001"])?;
    let ip: IpAddr = "10.203.0.2".parse()?;
    let mut last = None;
    for _ in 0..50 {
        match net.ep.connect(ip, 5001).await {
            Ok(s) => return push(s, bytes).await,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("sink behind wireguard-go unreachable: {last:?}")
}

/// Kernel TCP behind wireguard-go sends, the Endpoint receives (a CVM's response body arriving
/// at a gateway: the production bulk direction).
async fn wggo_to_endpoint(bytes: u64) -> Result<f64> {
    let net = EpWgGo::new().await?;
    let mut l = net.ep.listen(5001).await?;
    let server = tokio::spawn(async move {
        while let Some(s) = l.accept().await {
            tokio::spawn(drain(s));
        }
    });
    let ns = net.ns.name.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(std::env::current_exe()?)
            .args(["source", "10.203.0.1:5001", &bytes.to_string()])
            .output()
    })
    .await??;
    server.abort();
    if !out.status.success() {
        bail!("source failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

fn self_in_ns(ns: &str, args: &[&str]) -> Result<Proc> {
    let exe = std::env::current_exe()?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args(args)
        .stdout(Stdio::null())
        .spawn()?;
    Ok(Proc(child))
}

/// Two namespaces joined by veth (10.201.0.1 ↔ 10.201.0.2), each with a wireguard-go interface
/// (10.202.0.1 ↔ 10.202.0.2) whose UDP runs over the veth; a sink in B on both addresses.
struct TwoNs {
    a: String,
    // Drop order: processes, then interfaces and namespaces.
    _sink: Proc,
    _pair: WgGoPair,
}

impl TwoNs {
    fn new() -> Result<Self> {
        let pair = WgGoPair::new("wg", [10, 201, 0], [10, 202, 0])?;
        let sink = self_in_ns(&pair.ns_b.name, &["sink", "0.0.0.0:5001"])?;
        Ok(Self {
            a: pair.ns_a.name.clone(),
            _sink: sink,
            _pair: pair,
        })
    }

    /// Runs the source in namespace A against `dst_ip:5001`; returns MB/s.
    fn run(&self, bytes: u64, dst_ip: &str) -> Result<f64> {
        let exe = std::env::current_exe()?;
        let out = Command::new("ip")
            .args(["netns", "exec", &self.a])
            .arg(exe)
            .args(["source", &format!("{dst_ip}:5001"), &bytes.to_string()])
            .output()?;
        if !out.status.success() {
            bail!("source failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    }
}
