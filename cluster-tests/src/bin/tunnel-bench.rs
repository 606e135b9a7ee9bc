//! Throughput and request rate through the Portcullis tunnel (issue 4, "Measured"), beside the
//! same backend reached over wireguard-go ↔ wireguard-go and over a bare veth link.
//!
//! ```text
//! cargo build --release -p portcullis-node -p portcullis-cluster-tests
//! target/release/tunnel-bench --portcullis target/release/portcullis --rounds 3
//! ```
//!
//! Needs root (network namespaces, TUN) and wireguard-go; prints why and exits 0 otherwise. Not
//! part of any test run. Targets, all serving the same backend (this binary's hidden `backend`
//! subcommand: `GET /bulk/N` streams N bytes, anything else answers 128 bytes):
//!
//! * `gateway`: a one-node Portcullis cluster (`portcullis up`) whose app instance is a CVM
//!   running wireguard-go on a TUN device in its own namespace, configured by
//!   `portcullis cvm-agent --print-wg-config` (as in tests/t81). The client speaks HTTPS to the
//!   gateway, which proxies over its user-space WireGuard endpoint (boringtun + smoltcp) to the
//!   backend on the CVM's tunnel address, where kernel TCP answers.
//! * `wggo`: plain HTTP from namespace A to namespace B over wireguard-go ↔ wireguard-go (TUN,
//!   MTU 1420), whose UDP runs over a veth pair.
//! * `veth`: plain HTTP over that veth pair, no tunnel.
//!
//! Measures per target: `bulk` (one connection, one `GET` of `--bulk-mb` MiB, MB/s from request
//! to last byte) and `rps` (`--conns` keep-alive HTTP/1.1 connections, one request in flight on
//! each, for `--duration` s after a 1 s warm-up; latency per request into hdrhistogram). The load
//! generator is this binary's hidden `client` subcommand, run as a separate process (inside
//! namespace A for `wggo`/`veth`), so every target is driven by the same code. Targets take
//! turns within each round; medians over rounds are reported with the load average.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use portcullis_cluster_tests::cvm::{
    agent_config, issue_credential, register_once, start_wggo_cvm, wg_quick_address, AgentSpec,
    WgGoCvm,
};
use portcullis_cluster_tests::harness::TestCluster;
use portcullis_cluster_tests::wggo::{self, Proc, WgGoPair};
use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

const SMALL: &[u8] = &[b'x'; 128];
const CHUNK: usize = 256 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Everything a bulk transfer may take (256 MiB at a few MB/s on a loaded machine).
const BULK_TIMEOUT: Duration = Duration::from_secs(300);
const WARMUP: Duration = Duration::from_secs(1);
const APP: &str = "tbench";
const PORT: u16 = 8080;

#[derive(Parser)]
#[command(about = "Throughput and request rate: Portcullis tunnel vs wireguard-go vs veth")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Sub>,
    /// The release `portcullis` binary.
    #[arg(long, default_value = "target/release/portcullis")]
    portcullis: PathBuf,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Size of the bulk download, MiB.
    #[arg(long, default_value_t = 256)]
    bulk_mb: u64,
    /// Keep-alive connections of the request-rate test.
    #[arg(long, default_value_t = 16)]
    conns: usize,
    /// Measured seconds of the request-rate test (after a 1 s warm-up).
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Comma-separated subset of gateway,wggo,veth.
    #[arg(long, default_value = "gateway,wggo,veth")]
    targets: String,
}

#[derive(Subcommand)]
enum Sub {
    #[command(hide = true)]
    Backend {
        #[arg(long)]
        listen: SocketAddr,
    },
    #[command(hide = true)]
    Client(ClientArgs),
}

#[derive(clap::Args, Clone)]
struct ClientArgs {
    #[arg(long)]
    connect: SocketAddr,
    /// Speak TLS with this SNI/Host (the gateway); plain HTTP with Host = the address otherwise.
    #[arg(long)]
    tls_host: Option<String>,
    #[arg(long)]
    ca: Option<PathBuf>,
    /// `bulk` or `rps`.
    #[arg(long)]
    mode: String,
    #[arg(long, default_value_t = 0)]
    bytes: u64,
    #[arg(long, default_value_t = 16)]
    conns: usize,
    #[arg(long, default_value_t = 5)]
    duration: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.cmd {
        Some(Sub::Backend { listen }) => rt.block_on(backend(listen)),
        Some(Sub::Client(a)) => {
            let out = rt.block_on(client(a))?;
            println!("{out}");
            Ok(())
        }
        None => {
            drop(rt);
            orchestrate(&cli)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backend.

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>, Infallible> {
    let bulk = req
        .uri()
        .path()
        .strip_prefix("/bulk/")
        .and_then(|n| n.parse::<u64>().ok());
    let resp = match bulk {
        Some(n) => {
            let chunk = Bytes::from(vec![b'b'; CHUNK]);
            let full = n / CHUNK as u64;
            let tail = (n % CHUNK as u64) as usize;
            let chunks = std::iter::repeat_n(chunk.clone(), full as usize)
                .chain((tail > 0).then(|| chunk.slice(..tail)));
            let body = StreamBody::new(
                futures::stream::iter(chunks).map(|b| Ok::<_, Infallible>(Frame::data(b))),
            );
            hyper::Response::builder()
                .header("content-length", n)
                .body(BodyExt::boxed(body))
        }
        None => hyper::Response::builder()
            .header("content-length", SMALL.len())
            .body(Full::new(Bytes::from_static(SMALL)).boxed()),
    };
    Ok(resp.unwrap_or_else(|_| hyper::Response::new(Full::new(Bytes::new()).boxed())))
}

async fn backend(listen: SocketAddr) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    loop {
        let Ok((s, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), hyper::service::service_fn(answer)),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Load generator.

type Sender = http1::SendRequest<Empty<Bytes>>;

async fn handshake<S>(s: S) -> anyhow::Result<Sender>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    Ok(send)
}

async fn open(a: &ClientArgs, tls: &Option<tokio_rustls::TlsConnector>) -> anyhow::Result<Sender> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(a.connect))
        .await
        .context("connect timed out")??;
    tcp.set_nodelay(true)?;
    match (tls, &a.tls_host) {
        (Some(c), Some(host)) => {
            let name = ServerName::try_from(host.clone())?;
            let s = tokio::time::timeout(CONNECT_TIMEOUT, c.connect(name, tcp))
                .await
                .context("TLS handshake timed out")??;
            handshake(s).await
        }
        _ => handshake(tcp).await,
    }
}

fn request(a: &ClientArgs, path: &str) -> anyhow::Result<hyper::Request<Empty<Bytes>>> {
    let host = a.tls_host.clone().unwrap_or_else(|| a.connect.to_string());
    Ok(hyper::Request::get(path)
        .header("host", host)
        .body(Empty::new())?)
}

/// One request; returns the body length.
async fn fetch(send: &mut Sender, req: hyper::Request<Empty<Bytes>>) -> anyhow::Result<u64> {
    send.ready().await?;
    let resp = send.send_request(req).await?;
    if !resp.status().is_success() {
        bail!("status {}", resp.status());
    }
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            n += d.len() as u64;
        }
    }
    Ok(n)
}

async fn client(a: ClientArgs) -> anyhow::Result<serde_json::Value> {
    let tls = match &a.ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut &std::fs::read(ca)?[..]) {
                roots.add(c?)?;
            }
            let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
        }
        None => None,
    };
    match a.mode.as_str() {
        "bulk" => {
            let mut send = open(&a, &tls).await?;
            let req = request(&a, &format!("/bulk/{}", a.bytes))?;
            let start = Instant::now();
            let n = tokio::time::timeout(BULK_TIMEOUT, fetch(&mut send, req))
                .await
                .context("bulk download timed out")??;
            let secs = start.elapsed().as_secs_f64();
            if n != a.bytes {
                bail!("got {n} bytes, wanted {}", a.bytes);
            }
            Ok(json!({ "mbps": n as f64 / secs / 1e6 }))
        }
        "rps" => {
            let start = Instant::now();
            let measure_from = start + WARMUP;
            let until = measure_from + Duration::from_secs(a.duration);
            let mut tasks = Vec::new();
            for _ in 0..a.conns {
                let a = a.clone();
                let tls = tls.clone();
                tasks.push(tokio::spawn(async move {
                    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
                    let mut errors = 0u64;
                    let mut send = open(&a, &tls).await?;
                    while Instant::now() < until {
                        let t = Instant::now();
                        let r = tokio::time::timeout(
                            REQUEST_TIMEOUT,
                            fetch(&mut send, request(&a, "/small")?),
                        )
                        .await;
                        match r {
                            Ok(Ok(_)) if t >= measure_from => {
                                h.record(t.elapsed().as_micros() as u64)?;
                            }
                            Ok(Ok(_)) => {}
                            _ => {
                                errors += 1;
                                send = open(&a, &tls).await?;
                            }
                        }
                    }
                    anyhow::Ok((h, errors))
                }));
            }
            let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut errors = 0;
            for t in tasks {
                let (h, e) = t.await??;
                all.add(&h)?;
                errors += e;
            }
            Ok(json!({
                "rps": all.len() as f64 / a.duration as f64,
                "p50_ms": all.value_at_quantile(0.5) as f64 / 1000.0,
                "p99_ms": all.value_at_quantile(0.99) as f64 / 1000.0,
                "errors": errors,
            }))
        }
        m => bail!("unknown mode {m}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Orchestration.

/// How the client reaches one target.
struct Target {
    name: &'static str,
    label: &'static str,
    /// Namespace the client runs in (`None`: the root namespace).
    ns: Option<String>,
    connect: SocketAddr,
    tls_host: Option<String>,
    ca: Option<PathBuf>,
}

impl Target {
    fn run_client(&self, extra: &[String]) -> anyhow::Result<serde_json::Value> {
        let exe = std::env::current_exe()?;
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.arg("client")
            .args(["--connect", &self.connect.to_string()])
            .args(extra);
        if let Some(h) = &self.tls_host {
            cmd.args(["--tls-host", h]);
        }
        if let Some(ca) = &self.ca {
            cmd.arg("--ca").arg(ca);
        }
        let out = cmd.stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!(
                "{} client failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits until a small bulk download succeeds (handshakes done, routes in place).
    fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let args: Vec<String> = ["--mode", "bulk", "--bytes", "1000"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        loop {
            match self.run_client(&args) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("{} never became ready", self.name)))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        }
    }
}

fn backend_in_ns(ns: &str, listen: SocketAddr) -> anyhow::Result<Proc> {
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(std::env::current_exe()?)
        .args(["backend", "--listen", &listen.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    Ok(Proc(child))
}

/// Namespaces A and B joined by veth (10.211.0.1 ↔ .2), each with wireguard-go
/// (10.212.0.1 ↔ .2) whose UDP runs over the veth; the backend in B on all addresses.
struct TwoNs {
    a: String,
    // Drop order: processes, interfaces, namespaces.
    _backend: Proc,
    _pair: WgGoPair,
}

impl TwoNs {
    fn new() -> anyhow::Result<Self> {
        let pair = WgGoPair::new("tb", [10, 211, 0], [10, 212, 0])?;
        let backend = backend_in_ns(&pair.ns_b.name, SocketAddr::from(([0, 0, 0, 0], PORT)))?;
        Ok(Self {
            a: pair.ns_a.name.clone(),
            _backend: backend,
            _pair: pair,
        })
    }
}

/// A one-node cluster and a CVM running wireguard-go with the backend on its tunnel address.
struct GatewayCvm {
    agent_cfg: PathBuf,
    tunnel_ip: IpAddr,
    ifname: String,
    // Drop order: backend, wireguard-go, namespace, cluster.
    _backend: Proc,
    _cvm: WgGoCvm,
    tc: TestCluster,
}

impl GatewayCvm {
    fn new() -> anyhow::Result<Self> {
        let tc = TestCluster::up(1);
        let out = tc.cli(&["app", "create", APP, "--port", &PORT.to_string()]);
        if !out.status.success() {
            bail!("app create: {}", String::from_utf8_lossy(&out.stderr));
        }
        issue_credential(&tc, APP, "cvm-tbench");
        let agent_cfg = agent_config(
            &tc,
            &AgentSpec {
                cred: "cvm-tbench",
                app: APP,
                instance: "tbench-1",
                wg_key: "tbench-1.wg.key",
                expose: &[PORT],
                reregister_secs: 30,
            },
        );
        let conf = register_once(&agent_cfg).map_err(|e| anyhow::anyhow!("register: {e}"))?;
        let (_, tunnel_ip) = wg_quick_address(&conf);
        let sfx = wggo::suffix();
        let cvm = start_wggo_cvm(
            &tc,
            &conf,
            format!("pctb-cvm-{sfx}"),
            format!("pctcvm{sfx}"),
        )?;
        let ifname = cvm.ifname.clone();
        let backend = backend_in_ns(&cvm.ns.name, SocketAddr::new(tunnel_ip, PORT))?;
        Ok(Self {
            agent_cfg,
            tunnel_ip,
            ifname,
            _backend: backend,
            _cvm: cvm,
            tc,
        })
    }

    fn target(&self) -> anyhow::Result<Target> {
        let https: SocketAddr = self.tc.node(1).https_addr.parse()?;
        Ok(Target {
            name: "gateway",
            label: "client →TLS→ portcullis gateway → tunnel (boringtun+smoltcp) → wireguard-go (TUN, kernel TCP)",
            ns: None,
            connect: SocketAddr::from(([127, 0, 0, 1], https.port())),
            tls_host: Some(format!("{APP}.portcullis.localhost")),
            ca: Some(self.tc.path().join("pki/dev-ca.pem")),
        })
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

fn orchestrate(cli: &Cli) -> anyhow::Result<()> {
    if let Some(why) = wggo::skip_reason() {
        println!("SKIPPED tunnel-bench: {why}");
        return Ok(());
    }
    // The harness starts clusters with this binary.
    std::env::set_var("PORTCULLIS_BIN", std::fs::canonicalize(&cli.portcullis)?);
    let want: Vec<&str> = cli.targets.split(',').map(str::trim).collect();

    let gw = if want.contains(&"gateway") {
        Some(GatewayCvm::new()?)
    } else {
        None
    };
    let two = if want.contains(&"wggo") || want.contains(&"veth") {
        Some(TwoNs::new()?)
    } else {
        None
    };
    let mut targets = Vec::new();
    if let Some(g) = &gw {
        println!("CVM tunnel address {}", g.tunnel_ip);
        targets.push(g.target()?);
    }
    if let Some(t) = &two {
        if want.contains(&"wggo") {
            targets.push(Target {
                name: "wggo",
                label: "client → wireguard-go ↔ wireguard-go (TUN, 2 netns over veth) → kernel TCP",
                ns: Some(t.a.clone()),
                connect: SocketAddr::from(([10, 212, 0, 2], PORT)),
                tls_host: None,
                ca: None,
            });
        }
        if want.contains(&"veth") {
            targets.push(Target {
                name: "veth",
                label: "client → bare veth (kernel TCP, 2 netns)",
                ns: Some(t.a.clone()),
                connect: SocketAddr::from(([10, 211, 0, 2], PORT)),
                tls_host: None,
                ca: None,
            });
        }
    }
    for t in &targets {
        t.wait_ready()?;
    }

    let load_before = loadavg();
    println!(
        "tunnel-bench: bulk {} MiB, rps {} conns × {} s, {} rounds; load average {load_before}",
        cli.bulk_mb, cli.conns, cli.duration, cli.rounds
    );
    let bulk_args: Vec<String> = vec![
        "--mode".into(),
        "bulk".into(),
        "--bytes".into(),
        (cli.bulk_mb * 1024 * 1024).to_string(),
    ];
    let rps_args: Vec<String> = vec![
        "--mode".into(),
        "rps".into(),
        "--conns".into(),
        cli.conns.to_string(),
        "--duration".into(),
        cli.duration.to_string(),
    ];
    let n = targets.len();
    let (mut bulk, mut rps, mut p50, mut p99) = (
        vec![vec![]; n],
        vec![vec![]; n],
        vec![vec![]; n],
        vec![vec![]; n],
    );
    for round in 0..cli.rounds {
        if let Some(g) = &gw {
            // Keeps the registration fresh however long the run takes.
            register_once(&g.agent_cfg).map_err(|e| anyhow::anyhow!("re-register: {e}"))?;
        }
        // Rotate the order so no target always runs first (or right after another's load).
        for k in 0..n {
            let i = (k + round) % n;
            let t = &targets[i];
            let b = t.run_client(&bulk_args)?;
            let r = t.run_client(&rps_args)?;
            let get = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            eprintln!(
                "round {round} {:8} bulk {:7.1} MB/s  rps {:8.0}  p50 {:.2} ms  p99 {:.2} ms  errors {}",
                t.name,
                get(&b, "mbps"),
                get(&r, "rps"),
                get(&r, "p50_ms"),
                get(&r, "p99_ms"),
                r["errors"]
            );
            bulk[i].push(get(&b, "mbps"));
            rps[i].push(get(&r, "rps"));
            p50[i].push(get(&r, "p50_ms"));
            p99[i].push(get(&r, "p99_ms"));
        }
    }
    println!();
    println!(
        "| path | bulk MB/s | req/s ({} conns) | p50 ms | p99 ms |",
        cli.conns
    );
    println!("|---|---|---|---|---|");
    for i in 0..n {
        let m = |v: &mut Vec<f64>| median(v).unwrap_or(f64::NAN);
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.2} |",
            targets[i].label,
            m(&mut bulk[i]),
            m(&mut rps[i]),
            m(&mut p50[i]),
            m(&mut p99[i])
        );
    }
    println!(
        "\nmedians of {} rounds; load average before {load_before}, after {}",
        cli.rounds,
        loadavg()
    );
    if let Some(g) = &gw {
        // Evidence that the gateway's traffic really crossed the CVM's wireguard-go.
        let t = wggo::run("wg", &["show", &g.ifname, "transfer"])?;
        println!("CVM wireguard-go transfer (peer, rx bytes, tx bytes): {t}");
    }
    Ok(())
}
