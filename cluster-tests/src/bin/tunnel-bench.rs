//! Throughput and request rate through the Portcullis tunnel (issue 4, "Measured"), beside the
//! same gateway without the tunnel and the same backend reached over wireguard-go ↔ wireguard-go
//! and over a bare veth link.
//!
//! ```text
//! cargo build --release -p portcullis-node -p portcullis-cluster-tests
//! target/release/tunnel-bench --portcullis target/release/portcullis --rounds 3
//! ```
//!
//! Needs root (network namespaces, TUN) and wireguard-go; prints why and exits 0 otherwise. Not
//! part of any test run. Targets, all serving the same backend (this binary's hidden `backend`
//! subcommand: `GET /bulk/N` streams N bytes, `POST /upload` reads and discards the body and
//! answers its length in decimal, anything else answers 128 bytes):
//!
//! * `gateway`: a one-node Portcullis cluster (`portcullis up`) whose app instance is a CVM
//!   running wireguard-go on a TUN device in its own namespace, configured by
//!   `portcullis cvm-agent --print-wg-config` (as in tests/t81). The client speaks HTTPS to the
//!   gateway, which proxies over its user-space WireGuard endpoint (boringtun + smoltcp) to the
//!   backend on the CVM's tunnel address, where kernel TCP answers.
//! * `gwtcp`: the same gateway and the same backend process, but through a second app whose
//!   instance has a plain `backend_addr` (`portcullis cvm register --backend`): the CVM
//!   namespace's address on a veth pair to the root namespace (10.213.0.1 ↔ .2). The gateway
//!   proxies over kernel TCP, no tunnel, so `gateway` − `gwtcp` is the tunnel's cost and `gwtcp`
//!   − `veth` roughly that of TLS and proxying.
//! * `wggo`: plain HTTP from namespace A to namespace B over wireguard-go ↔ wireguard-go (TUN,
//!   MTU 1420), whose UDP runs over a veth pair.
//! * `veth`: plain HTTP over that veth pair, no tunnel.
//!
//! Measures per target: `bulk` (one connection, one `GET` of `--bulk-mb` MiB, MB/s from request
//! to last byte), `upload` (one connection, one `POST` of `--upload-mb` MiB, MB/s from request to
//! the backend's answer, whose byte count the client checks) and `rps` (`--conns` keep-alive
//! HTTP/1.1 connections, one request in flight on each, for `--duration` s after a 1 s warm-up;
//! latency per request into hdrhistogram). The load generator is this binary's hidden `client`
//! subcommand, run as a separate process (inside namespace A for `wggo`/`veth`), so every target
//! is driven by the same code. Targets take turns within each round; medians over rounds are
//! reported with the load average. For `bulk` and `upload` it also records the machine's busy
//! CPU time per byte (every process on the path and the kernel; niced processes excluded) and,
//! for `gateway`, the mean size of the WireGuard datagrams the gateway received (download) or
//! sent (upload), from its `/metrics`: a full-MTU path carries ~1450-byte datagrams.

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
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use portcullis_cluster_tests::cvm::{
    agent_config, issue_credential, register_once, start_wggo_cvm, wg_quick_address, AgentSpec,
    WgGoCvm,
};
use portcullis_cluster_tests::edge_bench::stats::{latency_histogram, quantile_ms};
use portcullis_cluster_tests::harness::TestCluster;
use portcullis_test_support::wggo::{self, Proc, WgGoPair};
use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

const SMALL: &[u8] = &[b'x'; 128];
const CHUNK: usize = 256 * 1024;
/// Most bytes of a response body the client keeps (the upload's decimal byte count).
const HEAD_MAX: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Everything a bulk transfer may take (256 MiB at a few MB/s on a loaded machine).
const BULK_TIMEOUT: Duration = Duration::from_secs(300);
const WARMUP: Duration = Duration::from_secs(1);
const APP: &str = "tbench";
/// The app whose instance is reached over plain TCP (`backend_addr`), not the tunnel.
const APP_TCP: &str = "tbenchtcp";
const PORT: u16 = 8080;
/// The veth pair between the root namespace (the gateway) and the CVM's namespace: `.1` in the
/// root namespace, `.2` in the CVM's. Outside the tunnel pool (100.64.0.0/10), so the gateway
/// dials it directly.
const CVM_VETH: [u8; 3] = [10, 213, 0];

#[derive(Parser)]
#[command(
    about = "Throughput and request rate: Portcullis gateway with and without its tunnel vs wireguard-go vs veth"
)]
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
    /// Size of the bulk upload, MiB. The gateway answers 413 to bodies over its
    /// `edge.max_request_body_bytes` (default 100 MiB), hence the largest size below that.
    #[arg(long, default_value_t = 96)]
    upload_mb: u64,
    /// Keep-alive connections of the request-rate test.
    #[arg(long, default_value_t = 16)]
    conns: usize,
    /// Measured seconds of the request-rate test (after a 1 s warm-up).
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Comma-separated subset of gateway,gwtcp,wggo,veth.
    #[arg(long, default_value = "gateway,gwtcp,wggo,veth")]
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
    /// `bulk` (download), `upload` or `rps`.
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

/// Request and response bodies on both sides.
type Body = BoxBody<Bytes, Infallible>;

/// `n` bytes in `CHUNK`-sized frames, generated as they are sent: the backend's downloads and
/// the client's uploads.
fn generated(n: u64) -> Body {
    let chunk = Bytes::from(vec![b'b'; CHUNK]);
    let full = n / CHUNK as u64;
    let tail = (n % CHUNK as u64) as usize;
    let chunks = std::iter::repeat_n(chunk.clone(), full as usize)
        .chain((tail > 0).then(|| chunk.slice(..tail)));
    BodyExt::boxed(StreamBody::new(
        futures::stream::iter(chunks).map(|b| Ok::<_, Infallible>(Frame::data(b))),
    ))
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// Reads a body to its end, counting the bytes and keeping the first `HEAD_MAX` of them.
async fn drain<B>(mut body: B) -> Result<(u64, Vec<u8>), B::Error>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let (mut n, mut head) = (0u64, Vec::new());
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            n += d.len() as u64;
            let keep = HEAD_MAX.saturating_sub(head.len()).min(d.len());
            head.extend_from_slice(&d[..keep]);
        }
    }
    Ok((n, head))
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Body>, Infallible> {
    let path = req.uri().path();
    let bulk = path
        .strip_prefix("/bulk/")
        .and_then(|n| n.parse::<u64>().ok());
    let resp = if req.method() == hyper::Method::POST && path == "/upload" {
        match drain(req.into_body()).await {
            Ok((n, _)) => hyper::Response::builder().body(full(n.to_string())),
            Err(e) => hyper::Response::builder()
                .status(hyper::StatusCode::BAD_REQUEST)
                .body(full(format!("reading the body: {e}"))),
        }
    } else if let Some(n) = bulk {
        hyper::Response::builder()
            .header("content-length", n)
            .body(generated(n))
    } else {
        hyper::Response::builder()
            .header("content-length", SMALL.len())
            .body(full(Bytes::from_static(SMALL)))
    };
    Ok(resp.unwrap_or_else(|_| hyper::Response::new(full(Bytes::new()))))
}

async fn backend(listen: SocketAddr) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    portcullis_cluster_tests::backend::serve_http1(l, answer).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Load generator.

type Sender = http1::SendRequest<Body>;

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

/// A `GET` of `path`, or with `upload: Some(n)` a `POST` of `n` generated bytes.
fn request(
    a: &ClientArgs,
    path: &str,
    upload: Option<u64>,
) -> anyhow::Result<hyper::Request<Body>> {
    let host = a.tls_host.clone().unwrap_or_else(|| a.connect.to_string());
    let b = hyper::Request::builder().uri(path).header("host", host);
    Ok(match upload {
        Some(n) => b
            .method(hyper::Method::POST)
            .header("content-length", n)
            .body(generated(n))?,
        None => b.body(Empty::new().boxed())?,
    })
}

/// One request; returns the body length and its first `HEAD_MAX` bytes.
async fn fetch(send: &mut Sender, req: hyper::Request<Body>) -> anyhow::Result<(u64, Vec<u8>)> {
    send.ready().await?;
    let resp = send.send_request(req).await?;
    if !resp.status().is_success() {
        bail!("status {}", resp.status());
    }
    Ok(drain(resp.into_body()).await?)
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
        "bulk" | "upload" => {
            let upload = a.mode == "upload";
            let mut send = open(&a, &tls).await?;
            let req = if upload {
                request(&a, "/upload", Some(a.bytes))?
            } else {
                request(&a, &format!("/bulk/{}", a.bytes), None)?
            };
            let start = Instant::now();
            let (n, head) = tokio::time::timeout(BULK_TIMEOUT, fetch(&mut send, req))
                .await
                .with_context(|| format!("{} timed out", a.mode))??;
            let secs = start.elapsed().as_secs_f64();
            // What arrived at the far end: the response body, or the count the backend read.
            let arrived = if upload {
                std::str::from_utf8(&head)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .with_context(|| {
                        format!("upload answer {:?}", String::from_utf8_lossy(&head))
                    })?
            } else {
                n
            };
            if arrived != a.bytes {
                bail!("{}: {arrived} bytes arrived, wanted {}", a.mode, a.bytes);
            }
            Ok(json!({ "mbps": a.bytes as f64 / secs / 1e6 }))
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
                    let mut h = latency_histogram();
                    let mut errors = 0u64;
                    let mut send = open(&a, &tls).await?;
                    while Instant::now() < until {
                        let t = Instant::now();
                        let r = tokio::time::timeout(
                            REQUEST_TIMEOUT,
                            fetch(&mut send, request(&a, "/small", None)?),
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
            let mut all = latency_histogram();
            let mut errors = 0;
            for t in tasks {
                let (h, e) = t.await??;
                all.add(&h)?;
                errors += e;
            }
            Ok(json!({
                "rps": all.len() as f64 / a.duration as f64,
                "p50_ms": quantile_ms(&all, 0.5),
                "p99_ms": quantile_ms(&all, 0.99),
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

/// A veth pair from the root namespace (`CVM_VETH`.1) into namespace `ns` (`CVM_VETH`.2).
/// Deleting either end deletes both; the namespace's deletion would too.
struct Veth {
    root: String,
}

impl Veth {
    fn new(ns: &str, sfx: &str) -> anyhow::Result<Self> {
        let (root, inner) = (format!("pctbv{sfx}"), format!("pctbw{sfx}"));
        // A leftover from a crashed run with the same pid suffix would make `add` fail.
        let _ = wggo::run("ip", &["link", "del", &root]);
        wggo::run(
            "ip",
            &["link", "add", &root, "type", "veth", "peer", "name", &inner],
        )?;
        let veth = Self { root };
        wggo::run("ip", &["link", "set", &inner, "netns", ns])?;
        let [a, b, c] = CVM_VETH;
        wggo::run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{a}.{b}.{c}.1/24"),
                "dev",
                &veth.root,
            ],
        )?;
        wggo::run("ip", &["link", "set", &veth.root, "up"])?;
        wggo::ns_exec(
            ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("{a}.{b}.{c}.2/24"),
                "dev",
                &inner,
            ],
        )?;
        wggo::ns_exec(ns, &["ip", "link", "set", &inner, "up"])?;
        Ok(veth)
    }

    /// Bytes received and sent by the root namespace's end.
    fn counters(&self) -> String {
        let read = |what: &str| {
            std::fs::read_to_string(format!("/sys/class/net/{}/statistics/{what}", self.root))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|e| e.to_string())
        };
        format!("rx {} tx {}", read("rx_bytes"), read("tx_bytes"))
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = wggo::run("ip", &["link", "del", &self.root]);
    }
}

/// A one-node cluster and a CVM running wireguard-go, with the backend on all of the CVM
/// namespace's addresses: its tunnel address (app `APP`) and its end of a veth pair to the root
/// namespace (app `APP_TCP`, an instance with a plain `backend_addr`).
struct GatewayCvm {
    agent_cfg: PathBuf,
    tunnel_ip: IpAddr,
    ifname: String,
    // Drop order: backend, veth, wireguard-go, namespace, cluster.
    _backend: Proc,
    veth: Veth,
    _cvm: WgGoCvm,
    tc: TestCluster,
}

impl GatewayCvm {
    fn new() -> anyhow::Result<Self> {
        let tc = TestCluster::up(1);
        let cli = |args: &[&str]| {
            let out = tc.cli(args);
            if !out.status.success() {
                bail!(
                    "{}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(())
        };
        let port = PORT.to_string();
        cli(&["app", "create", APP, "--port", &port])?;
        cli(&["app", "create", APP_TCP, "--port", &port])?;
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
        let veth = Veth::new(&cvm.ns.name, &sfx)?;
        let [a, b, c] = CVM_VETH;
        cli(&[
            "cvm",
            "register",
            "--instance-id",
            "tbenchtcp-1",
            "--app",
            APP_TCP,
            "--region",
            "us-east",
            "--backend",
            &format!("{a}.{b}.{c}.2"),
        ])?;
        // One process behind both apps, so the two gateway rows differ only in the path.
        let backend = backend_in_ns(&cvm.ns.name, SocketAddr::from(([0, 0, 0, 0], PORT)))?;
        Ok(Self {
            agent_cfg,
            tunnel_ip,
            ifname,
            _backend: backend,
            veth,
            _cvm: cvm,
            tc,
        })
    }

    /// The client's view of app `app` on the gateway (HTTPS on the node's port, from the root
    /// namespace).
    fn target(&self, name: &'static str, label: &'static str, app: &str) -> anyhow::Result<Target> {
        let https: SocketAddr = self.tc.node(1).https_addr.parse()?;
        Ok(Target {
            name,
            label,
            ns: None,
            connect: SocketAddr::from(([127, 0, 0, 1], https.port())),
            tls_host: Some(format!("{app}.portcullis.localhost")),
            ca: Some(self.tc.path().join("pki/dev-ca.pem")),
        })
    }
}

/// Busy CPU time of the whole machine so far (user + system + irq + softirq jiffies, all CPUs;
/// niced processes left out, so a background job at nice 19 does not count).
fn busy_jiffies() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq
    [0, 2, 5, 6].iter().filter_map(|&i| f.get(i)).sum()
}

/// Jiffies per second in /proc/stat: USER_HZ, 100 on every Linux ABI this runs on (the crate
/// forbids the unsafe call to sysconf(_SC_CLK_TCK)).
const USER_HZ: f64 = 100.0;

/// A `portcullis_wg_events_total{event="<event>"}` value from a metrics text (0 if absent).
fn wg_event(metrics: &str, event: &str) -> f64 {
    let key = format!("portcullis_wg_events_total{{event=\"{event}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key)?.trim().parse().ok())
        .unwrap_or(0.0)
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

/// One column of the table.
struct Col {
    header: String,
    /// Which client run of a round it comes from (an index into the runs in `orchestrate`).
    run: usize,
    /// The field of that run's JSON answer.
    field: &'static str,
    decimals: usize,
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn orchestrate(cli: &Cli) -> anyhow::Result<()> {
    if let Some(why) = wggo::skip_reason() {
        println!("SKIPPED tunnel-bench: {why}");
        return Ok(());
    }
    // The harness starts clusters with this binary.
    std::env::set_var("PORTCULLIS_BIN", std::fs::canonicalize(&cli.portcullis)?);
    let want: Vec<&str> = cli.targets.split(',').map(str::trim).collect();

    let gw = if want.contains(&"gateway") || want.contains(&"gwtcp") {
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
        for (name, label, app) in [
            (
                "gateway",
                "client →TLS→ portcullis gateway → tunnel (boringtun+smoltcp) → wireguard-go (TUN, kernel TCP)",
                APP,
            ),
            (
                "gwtcp",
                "client →TLS→ portcullis gateway → plain TCP over veth (no tunnel) → kernel TCP in the CVM netns",
                APP_TCP,
            ),
        ] {
            if want.contains(&name) {
                targets.push(g.target(name, label, app)?);
            }
        }
    }
    if let Some(t) = &two {
        for (name, label, ip) in [
            (
                "wggo",
                "client → wireguard-go ↔ wireguard-go (TUN, 2 netns over veth) → kernel TCP",
                [10, 212, 0, 2],
            ),
            (
                "veth",
                "client → bare veth (kernel TCP, 2 netns)",
                [10, 211, 0, 2],
            ),
        ] {
            if want.contains(&name) {
                targets.push(Target {
                    name,
                    label,
                    ns: Some(t.a.clone()),
                    connect: SocketAddr::from((ip, PORT)),
                    tls_host: None,
                    ca: None,
                });
            }
        }
    }
    for t in &targets {
        t.wait_ready()?;
    }

    let load_before = loadavg();
    println!(
        "tunnel-bench: download {} MiB, upload {} MiB, rps {} conns × {} s, {} rounds; load average {load_before}",
        cli.bulk_mb, cli.upload_mb, cli.conns, cli.duration, cli.rounds
    );
    let mib = |n: u64| (n * 1024 * 1024).to_string();
    // The client runs of one target in one round, in order.
    let runs = [
        args(&["--mode", "bulk", "--bytes", &mib(cli.bulk_mb)]),
        args(&["--mode", "upload", "--bytes", &mib(cli.upload_mb)]),
        args(&[
            "--mode",
            "rps",
            "--conns",
            &cli.conns.to_string(),
            "--duration",
            &cli.duration.to_string(),
        ]),
    ];
    let col = |header: &str, run, field, decimals| Col {
        header: header.to_string(),
        run,
        field,
        decimals,
    };
    let cols = [
        col("download MB/s", 0, "mbps", 0),
        col("upload MB/s", 1, "mbps", 0),
        col(&format!("req/s ({} conns)", cli.conns), 2, "rps", 0),
        col("p50 ms", 2, "p50_ms", 2),
        col("p99 ms", 2, "p99_ms", 2),
        col("down CPU ns/B", 0, "cpu_ns_per_byte", 2),
        col("up CPU ns/B", 1, "cpu_ns_per_byte", 2),
        col("gw B/datagram down", 0, "bytes_per_datagram", 0),
        col("gw B/datagram up", 1, "bytes_per_datagram", 0),
    ];
    // samples[target][column]: one value per round.
    let mut samples = vec![vec![Vec::<f64>::new(); cols.len()]; targets.len()];
    for round in 0..cli.rounds {
        if let Some(g) = &gw {
            // Keeps the registration fresh however long the run takes.
            register_once(&g.agent_cfg).map_err(|e| anyhow::anyhow!("re-register: {e}"))?;
        }
        // Rotate the order so no target always runs first (or right after another's load).
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let t = &targets[i];
            let gw_metrics = || gw.as_ref().map(|g| g.tc.metrics(1)).unwrap_or_default();
            let answers = match runs
                .iter()
                .enumerate()
                .map(|(j, r)| {
                    // The metrics scrapes stay outside the CPU interval.
                    let m0 = gw_metrics();
                    let cpu0 = busy_jiffies();
                    let mut a = t.run_client(r)?;
                    let cpu1 = busy_jiffies();
                    let m1 = gw_metrics();
                    // Bulk runs: the machine's CPU for the whole path (client, gateway or
                    // wireguard-go, backend, kernel) per byte moved, and for the gateway the
                    // mean size of the datagrams that carried it.
                    let len = [cli.bulk_mb, cli.upload_mb].get(j).map(|m| m * 1024 * 1024);
                    if let Some(len) = len {
                        let ns = cpu1.saturating_sub(cpu0) as f64 * 1e9 / USER_HZ;
                        a["cpu_ns_per_byte"] = json!(ns / len as f64);
                        if t.name == "gateway" {
                            let dir = if j == 0 { "rx" } else { "tx" };
                            let d = |m: &str, what: &str| wg_event(m, &format!("{dir}_{what}"));
                            let (b, n) = (
                                d(&m1, "bytes") - d(&m0, "bytes"),
                                d(&m1, "datagrams") - d(&m0, "datagrams"),
                            );
                            if n > 0.0 {
                                a["bytes_per_datagram"] = json!(b / n);
                            }
                        }
                    }
                    Ok(a)
                })
                .collect::<anyhow::Result<Vec<_>>>()
            {
                Ok(a) => a,
                Err(e) => {
                    // The cluster's directory goes with it: show why the gateway gave up first.
                    if let Some(g) = &gw {
                        let log = g.tc.node_log(1);
                        let lines: Vec<&str> = log.lines().collect();
                        let tail = &lines[lines.len().saturating_sub(40)..];
                        eprintln!("gateway node log, last lines:\n{}", tail.join("\n"));
                    }
                    return Err(e);
                }
            };
            let mut line = format!("round {round} {:8}", t.name);
            for (c, col) in cols.iter().enumerate() {
                let v = answers[col.run][col.field].as_f64().unwrap_or(f64::NAN);
                line += &format!("  {} {v:.*}", col.header, col.decimals.max(1));
                samples[i][c].push(v);
            }
            eprintln!("{line}  errors {}", answers[2]["errors"]);
        }
    }
    println!();
    let headers: Vec<&str> = cols.iter().map(|c| c.header.as_str()).collect();
    println!("| path | {} |", headers.join(" | "));
    println!("|---|{}", "---|".repeat(cols.len()));
    for (t, per_col) in targets.iter().zip(&mut samples) {
        let cells: Vec<String> = cols
            .iter()
            .zip(per_col)
            .map(|(c, v)| format!("{:.*}", c.decimals, median(v).unwrap_or(f64::NAN)))
            .collect();
        println!("| {} | {} |", t.label, cells.join(" | "));
    }
    println!(
        "\nmedians of {} rounds; load average before {load_before}, after {}",
        cli.rounds,
        loadavg()
    );
    if let Some(g) = &gw {
        // Evidence that the gateway's traffic really crossed the CVM's wireguard-go, and that
        // the no-tunnel row's crossed the veth (wireguard-go's UDP runs on loopback, not there).
        let t = wggo::run("wg", &["show", &g.ifname, "transfer"])?;
        println!("CVM wireguard-go transfer (peer, rx bytes, tx bytes): {t}");
        println!("veth to the CVM netns, root end: {}", g.veth.counters());
    }
    Ok(())
}
