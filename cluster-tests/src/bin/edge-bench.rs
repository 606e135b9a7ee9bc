//! Data-plane benchmark: Portcullis beside nginx and HAProxy (Debian packages), each terminating
//! TLS with the same certificate and proxying to the same backend over HTTP/1.1 keep-alive, plus
//! that backend served directly over TLS as the ceiling.
//!
//! ```text
//! apt-get install -y nginx haproxy wrk nghttp2-client    # once
//! cargo build --release -p portcullis-node -p portcullis-cluster-tests
//! target/release/edge-bench --portcullis target/release/portcullis --duration 10 --rounds 2
//! ```
//!
//! Every target is driven by the same client code (tokio + rustls + hyper), so they are measured
//! identically. Modes: `h1` (C keep-alive HTTP/1.1 connections, one request in flight on each),
//! `h2` (C HTTP/2 connections × S concurrent streams), `newconn` (C loops of: new TCP connection,
//! full TLS 1.3 handshake without resumption, one HTTP/1.1 request, close). Latency is measured
//! per request from the client (for `newconn`: connect → last body byte) into hdrhistogram;
//! throughput is requests completed inside the measured window over its length. Targets are
//! interleaved (every target once per round, in a rotated order) so drift on a shared machine
//! hits all of them alike.
//!
//! Modes `wrk` and `h2load` drive the same targets with those outside clients instead (the ones
//! the data-plane issue names), with the same connection and stream counts.
//!
//! The backend is this binary's hidden `backend` subcommand, a fixed 128-byte response from
//! hyper, rather than `portcullis demo-app`: the demo app echoes the forwarded headers as JSON,
//! so its response size and work would differ by proxy.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The backend's answer to every request. Fixed, so every target moves the same bytes.
const BODY: &[u8] = &[b'x'; 128];
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Send → full response. Generous: a 2-core machine under load can stall for a while, and a
/// stall should show up in p99.9, not as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Child processes (nginx, HAProxy, the backend, `portcullis up`) get this long to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The host every request names; the dev wildcard certificate covers it.
const APP: &str = "benchapp";

#[derive(Parser)]
#[command(about = "HTTPS data-plane benchmark: Portcullis vs nginx vs HAProxy")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Sub>,
    #[command(flatten)]
    args: Args,
}

#[derive(Subcommand)]
enum Sub {
    /// The fixed-response backend (started by the benchmark itself).
    #[command(hide = true)]
    Backend(BackendArgs),
}

#[derive(clap::Args)]
struct BackendArgs {
    /// Plain HTTP/1.1, for the proxies.
    #[arg(long)]
    listen: SocketAddr,
    /// TLS (ALPN h2 and http/1.1), the "direct" ceiling.
    #[arg(long)]
    tls_listen: SocketAddr,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
}

#[derive(clap::Args)]
struct Args {
    /// The portcullis binary (use a release build).
    #[arg(long, default_value = "target/release/portcullis")]
    portcullis: PathBuf,
    #[arg(long, default_value = "nginx")]
    nginx: PathBuf,
    #[arg(long, default_value = "haproxy")]
    haproxy: PathBuf,
    #[arg(long, default_value = "wrk")]
    wrk: PathBuf,
    #[arg(long, default_value = "h2load")]
    h2load: PathBuf,
    /// Threads of wrk and h2load (modes `wrk`, `h2load`). One leaves the most CPU to the
    /// target on a small machine; each tool spreads `--connections` over its threads.
    #[arg(long, default_value_t = 1)]
    tool_threads: usize,
    /// Measured seconds per target, mode and round.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Unmeasured seconds before each measurement (connections open, pools fill, caches warm).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Client connections (h1, h2) or concurrent connect loops (newconn).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Concurrent streams per HTTP/2 connection.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Times every target is measured in every mode; the results are merged.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    #[arg(long, value_delimiter = ',', default_value = "h1,h2,newconn")]
    modes: Vec<Mode>,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,portcullis,nginx,haproxy"
    )]
    targets: Vec<Kind>,
    /// nginx worker processes and HAProxy threads. Default: the number of cores, like nginx's
    /// `worker_processes auto` and Portcullis's tokio runtime.
    #[arg(long)]
    workers: Option<usize>,
    /// Portcullis's `edge.workers` (data-plane threads; 0 serves on the node's shared runtime).
    /// Default: the node's default, one per core.
    #[arg(long)]
    portcullis_workers: Option<usize>,
    /// Leave every proxy's threads to the kernel's placement. By default each pins one worker
    /// per core: nginx `worker_cpu_affinity auto`, HAProxy `cpu-map`, Portcullis
    /// `edge.pin_workers = true`.
    #[arg(long)]
    no_pin: bool,
    /// Keep every proxy's per-request access log on (Portcullis's default). Off by default for
    /// all three, so the comparison is of proxying alone.
    #[arg(long)]
    access_log: bool,
    /// Let nginx and HAProxy skip the headers Portcullis adds by default (HSTS and Alt-Svc on
    /// responses, X-Forwarded-Host and Forwarded on requests); without it they add the same
    /// ones, so every proxy does the same work.
    #[arg(long)]
    peers_minimal_headers: bool,
    /// Also write the markdown tables here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, ValueEnum)]
enum Mode {
    H1,
    H2,
    Newconn,
    /// HTTP/3 over QUIC, Portcullis only: Debian's nginx 1.22 has no `http_v3_module` and its
    /// HAProxy 2.6 is built without QUIC, so there is no same-run peer to compare against.
    H3,
    /// `h1` driven by wrk (C, OpenSSL) instead of this binary's client.
    Wrk,
    /// `h2` driven by h2load (nghttp2's, C, OpenSSL) instead of this binary's client.
    H2load,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::H1 => "h1 keep-alive",
            Mode::H2 => "h2",
            Mode::Newconn => "new TLS conn",
            Mode::H3 => "h3",
            Mode::Wrk => "h1 keep-alive (wrk)",
            Mode::H2load => "h2 (h2load)",
        }
    }

    /// Driven by an outside program rather than this binary's client.
    fn tool(self) -> Option<&'static str> {
        match self {
            Mode::Wrk => Some("wrk"),
            Mode::H2load => Some("h2load"),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, ValueEnum)]
enum Kind {
    Direct,
    Portcullis,
    Nginx,
    Haproxy,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Direct => "backend direct (ceiling)",
            Kind::Portcullis => "portcullis",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Some(Sub::Backend(b)) => rt.block_on(backend(b)),
        None => rt.block_on(async {
            // Dropping `bench` on a signal drops its process guards, which stop every child.
            tokio::select! {
                r = bench(cli.args) => r,
                s = shutdown_signal() => {
                    bail!("{s}; stopped the child processes")
                }
            }
        }),
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return "interrupted";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
    }
}

// ---------------------------------------------------------------------------------------------
// The backend.

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

async fn backend(b: BackendArgs) -> anyhow::Result<()> {
    let tls = TlsAcceptor::from(Arc::new(server_config(&b.cert, &b.key)?));
    let plain = TcpListener::bind(b.listen)
        .await
        .with_context(|| format!("bind {}", b.listen))?;
    let secure = TcpListener::bind(b.tls_listen)
        .await
        .with_context(|| format!("bind {}", b.tls_listen))?;
    tokio::spawn(portcullis_cluster_tests::backend::serve_http1(
        plain, answer,
    ));
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

// ---------------------------------------------------------------------------------------------
// Child processes.

/// A child in its own process group (so a terminal's Ctrl-C reaches only us and we stop it in
/// order), stopped with SIGTERM then SIGKILL to the whole group on drop — nginx's workers are
/// the master's children and outlive a killed master otherwise.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> anyhow::Result<Proc> {
        let out =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// Waits until `addr` accepts connections; fails early, with the log, if the child exits.
    async fn wait_listening(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening on {addr}:\n{}",
                    self.name,
                    tail(&self.log)
                );
            }
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not listening on {addr} after {START_TIMEOUT:?}:\n{}",
                    self.name,
                    tail(&self.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let Ok(pid) = i32::try_from(self.child.id()) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return;
        };
        let group = Pid::from_raw(pid);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever is left of the group (workers that missed the master's signal).
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// `portcullis down` for the local cluster on drop.
struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin)
            .arg("down")
            .arg("--state-dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output();
    }
}

/// Runs a short command to completion (with a deadline); its output on failure.
async fn run_cmd(what: &str, cmd: Command, limit: Duration) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::from(cmd);
    // A command that overruns its deadline is killed, not left behind.
    cmd.kill_on_drop(true).stdin(Stdio::null());
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .with_context(|| format!("{what}: no answer within {limit:?}"))?
        .with_context(|| format!("{what}: start"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `name` as given if it contains a slash, else the first match on PATH or in the sbin
/// directories (Debian installs nginx and HAProxy there, off a non-root user's PATH).
fn find_bin(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.is_file().then(|| name.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn reserve() -> anyhow::Result<(std::net::TcpListener, SocketAddr)> {
    let l = portcullis_node::cli::ports::reserve_tcp().context("reserve a loopback port")?;
    let addr = l.local_addr()?;
    Ok((l, addr))
}

fn version_line(bin: &Path, arg: &str) -> String {
    Command::new(bin)
        .arg(arg)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Setup of the targets.

#[derive(Clone)]
struct Target {
    kind: Kind,
    addr: SocketAddr,
    /// The process whose CPU time, with its descendants' (nginx's workers), is the target's.
    pid: u32,
}

struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn nginx_conf(dir: &Path, listen: SocketAddr, backend: SocketAddr, pki: &Pki, a: &Args) -> String {
    let workers = workers(a);
    let affinity = if a.no_pin {
        ""
    } else {
        "worker_cpu_affinity auto;"
    };
    let d = dir.display();
    let access = if a.access_log {
        format!("access_log {d}/access.log;")
    } else {
        "access_log off;".into()
    };
    // Running as root (this machine), nginx would switch its workers to `nobody`, who cannot
    // enter the private temp directory; the user does not change what is measured.
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let user = if root { "user root;" } else { "" };
    let port = listen.port();
    let same = if a.peers_minimal_headers {
        String::new()
    } else {
        format!(
            r#"proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header Forwarded "for=$remote_addr;proto=https;host=\"$http_host\"";
            add_header Strict-Transport-Security "max-age=31536000" always;
            add_header Alt-Svc 'h3=":{port}"; ma=86400' always;"#
        )
    };
    format!(
        r#"{user}
worker_processes {workers};
{affinity}
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    {access}
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    # nginx closes a client connection after 1000 requests by default; Portcullis and HAProxy
    # do not, and the keep-alive modes measure proxying, not reconnecting.
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    upstream backend {{
        server {backend};
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 120s;
    }}
    server {{
        listen {listen} ssl http2;
        server_name {APP}.portcullis.localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            {same}
        }}
    }}
}}
"#,
        cert = pki.cert.display(),
        key = pki.key.display(),
    )
}

fn haproxy_conf(listen: SocketAddr, backend: SocketAddr, pem: &Path, a: &Args) -> String {
    let workers = workers(a);
    // Thread i on CPU i - 1, as Portcullis pins worker i to the i-th CPU it may use: the same
    // CPUs wherever the bench may use CPUs 0 to workers - 1, as on the machines it runs on.
    let affinity = if a.no_pin {
        String::new()
    } else {
        format!("cpu-map auto:1/1-{workers} 0-{}", workers.saturating_sub(1))
    };
    let (log_global, log_defaults) = if a.access_log {
        (
            "log stdout format raw local0",
            "log global\n    option httplog",
        )
    } else {
        ("", "")
    };
    let port = listen.port();
    let same = if a.peers_minimal_headers {
        String::new()
    } else {
        format!(
            r#"http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request set-header Forwarded "for=%[src];proto=https;host=\"%[req.hdr(host)]\""
    http-response set-header Strict-Transport-Security "max-age=31536000"
    http-response set-header Alt-Svc "h3=\":{port}\"; ma=86400""#
        )
    };
    format!(
        r#"global
    nbthread {workers}
    {affinity}
    maxconn 8000
    ssl-default-bind-options ssl-min-ver TLSv1.2
    {log_global}
defaults
    mode http
    {log_defaults}
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
    option http-keep-alive
    http-reuse always
frontend fe
    bind {listen} ssl crt {pem} alpn h2,http/1.1
    option forwardfor
    http-request set-header X-Forwarded-Proto https
    {same}
    default_backend be
backend be
    server b1 {backend}
"#,
        pem = pem.display(),
    )
}

fn workers(a: &Args) -> usize {
    a.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    })
}

/// Everything the benchmark started; dropping it stops all of it (children first, then the
/// cluster, then the directory).
struct Setup {
    procs: Vec<Proc>,
    _cluster: Option<Cluster>,
    targets: Vec<Target>,
    pki: Pki,
    tools: Tools,
    versions: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Proxies before the backend, so none of them logs a flood of backend errors.
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
    }
}

async fn setup(a: &Args) -> anyhow::Result<Setup> {
    let portcullis = std::path::absolute(&a.portcullis)?;
    let mut missing = Vec::new();
    if !portcullis.is_file() {
        missing.push(format!(
            "{} (cargo build --release -p portcullis-node -p portcullis-cluster-tests); it also \
             provides the certificate every target serves",
            portcullis.display()
        ));
    }
    let nginx = find_bin(&a.nginx);
    if a.targets.contains(&Kind::Nginx) && nginx.is_none() {
        missing.push(format!(
            "{} (apt-get install -y nginx, or leave it out with --targets)",
            a.nginx.display()
        ));
    }
    let haproxy = find_bin(&a.haproxy);
    if a.targets.contains(&Kind::Haproxy) && haproxy.is_none() {
        missing.push(format!(
            "{} (apt-get install -y haproxy, or leave it out with --targets)",
            a.haproxy.display()
        ));
    }
    let mut tool = |mode: Mode, bin: &Path| {
        let found = find_bin(bin);
        if a.modes.contains(&mode) && found.is_none() {
            missing.push(format!(
                "{} (apt-get install -y {}, or leave mode {} out with --modes)",
                bin.display(),
                mode.tool().unwrap_or_default(),
                mode.tool().unwrap_or_default(),
            ));
        }
        found.filter(|_| a.modes.contains(&mode))
    };
    let wrk = tool(Mode::Wrk, &a.wrk);
    let h2load = tool(Mode::H2load, &a.h2load);
    if !missing.is_empty() {
        bail!("missing:\n  {}", missing.join("\n  "));
    }

    let dir = tempfile::Builder::new().prefix("edge-bench-").tempdir()?;
    let mut versions = vec![version_line(&portcullis, "--version")];
    if let Some(w) = &wrk {
        versions.push(version_line(w, "-v"));
    }
    if let Some(h) = &h2load {
        versions.push(version_line(h, "--version"));
    }
    let wrk_script = dir.path().join("wrk.lua");
    std::fs::write(&wrk_script, WRK_SCRIPT)?;
    let tools = Tools {
        wrk,
        h2load,
        wrk_script,
        h2load_log: dir.path().join("h2load.log"),
    };
    let state = dir.path().join("portcullis");
    eprintln!(
        "starting a 1-node portcullis cluster in {}",
        state.display()
    );
    let mut up = Command::new(&portcullis);
    up.args(["up", "--nodes", "1", "--detach", "--state-dir"])
        .arg(&state);
    if let Some(n) = a.portcullis_workers {
        up.arg("--edge-workers").arg(n.to_string());
    }
    up.arg("--edge-pin-workers")
        .arg(if a.no_pin { "false" } else { "true" });
    if !a.access_log {
        // The node's default filter, with the per-request access log off.
        up.env(
            "RUST_LOG",
            "info,openraft=warn,sled=warn,h2=warn,tower=warn,portcullis::access=off",
        );
    }
    // The guard exists before `up` runs: a half-started cluster is stopped too.
    let cluster = Cluster {
        bin: portcullis.clone(),
        dir: state.clone(),
    };
    run_cmd("portcullis up", up, Duration::from_secs(120)).await?;
    let cf = portcullis_node::cli::client::ClusterFile::load(&state)?;
    let node = cf.nodes.first().context("cluster.json lists no node")?;
    let https: SocketAddr = node.https_addr.parse().context("node https address")?;
    let base = cf.base_domain.clone();
    if base != "portcullis.localhost" {
        bail!("unexpected base domain {base}");
    }
    let pki = Pki {
        ca: state.join("pki/dev-ca.pem"),
        cert: state.join("pki/dev-wildcard.pem"),
        key: state.join("pki/dev-wildcard.key"),
    };

    let mut procs = Vec::new();
    let (l1, plain) = reserve()?;
    let (l2, tls) = reserve()?;
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("backend")
        .arg("--listen")
        .arg(plain.to_string())
        .arg("--tls-listen")
        .arg(tls.to_string())
        .arg("--cert")
        .arg(&pki.cert)
        .arg("--key")
        .arg(&pki.key);
    drop((l1, l2));
    let mut p = Proc::spawn("backend", &mut cmd, dir.path().join("backend.log"))?;
    p.wait_listening(plain).await?;
    p.wait_listening(tls).await?;
    let backend_pid = p.child.id();
    procs.push(p);
    let mut targets = Vec::new();
    for &k in &a.targets {
        match k {
            Kind::Direct => targets.push(Target {
                kind: k,
                addr: tls,
                pid: backend_pid,
            }),
            Kind::Portcullis => {
                let cli = |args: &[&str]| {
                    let mut c = Command::new(&portcullis);
                    c.arg("--cluster").arg(&state).args(args);
                    c
                };
                let port = plain.port().to_string();
                run_cmd(
                    "portcullis app create",
                    cli(&["app", "create", APP, "--port", &port]),
                    Duration::from_secs(30),
                )
                .await?;
                run_cmd(
                    "portcullis cvm register",
                    cli(&[
                        "cvm",
                        "register",
                        "--instance-id",
                        "bench-1",
                        "--app",
                        APP,
                        "--region",
                        &node.region,
                        "--backend",
                        &plain.to_string(),
                    ]),
                    Duration::from_secs(30),
                )
                .await?;
                targets.push(Target {
                    kind: k,
                    addr: https,
                    pid: node.pid,
                });
            }
            Kind::Nginx => {
                let ndir = dir.path().join("nginx");
                std::fs::create_dir_all(&ndir)?;
                let (l, addr) = reserve()?;
                let conf = ndir.join("nginx.conf");
                std::fs::write(&conf, nginx_conf(&ndir, addr, plain, &pki, a))?;
                let bin = nginx.clone().context("nginx")?;
                versions.push(version_line(&bin, "-v"));
                let mut cmd = Command::new(&bin);
                cmd.arg("-p")
                    .arg(&ndir)
                    .arg("-e")
                    .arg(ndir.join("error.log"))
                    .arg("-c")
                    .arg(&conf)
                    .args(["-g", "daemon off;"]);
                drop(l);
                let mut p = Proc::spawn("nginx", &mut cmd, ndir.join("stderr.log"))?;
                p.wait_listening(addr).await?;
                let pid = p.child.id();
                procs.push(p);
                targets.push(Target { kind: k, addr, pid });
            }
            Kind::Haproxy => {
                let hdir = dir.path().join("haproxy");
                std::fs::create_dir_all(&hdir)?;
                // HAProxy wants the certificate and its key in one file.
                let pem = hdir.join("cert.pem");
                let mut both = std::fs::read(&pki.cert)?;
                both.extend(std::fs::read(&pki.key)?);
                std::fs::write(&pem, both)?;
                let (l, addr) = reserve()?;
                let conf = hdir.join("haproxy.cfg");
                std::fs::write(&conf, haproxy_conf(addr, plain, &pem, a))?;
                let bin = haproxy.clone().context("haproxy")?;
                versions.push(version_line(&bin, "-v"));
                let mut cmd = Command::new(&bin);
                cmd.arg("-f").arg(&conf).arg("-db");
                drop(l);
                let mut p = Proc::spawn("haproxy", &mut cmd, hdir.join("haproxy.log"))?;
                p.wait_listening(addr).await?;
                let pid = p.child.id();
                procs.push(p);
                targets.push(Target { kind: k, addr, pid });
            }
        }
    }
    Ok(Setup {
        procs,
        _cluster: Some(cluster),
        targets,
        pki,
        tools,
        versions,
        _dir: dir,
    })
}

// ---------------------------------------------------------------------------------------------
// The load generator: one implementation for every target.

struct Client {
    h1: TlsConnector,
    h2: TlsConnector,
    h3: quinn::ClientConfig,
    name: ServerName<'static>,
    host: String,
}

impl Client {
    fn new(ca: &Path) -> anyhow::Result<Client> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut &std::fs::read(ca)?[..]) {
            roots.add(c?)?;
        }
        let make = |alpn: &[u8]| -> anyhow::Result<TlsConnector> {
            let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
            cfg.alpn_protocols = vec![alpn.to_vec()];
            // Every new connection is a full handshake: that is what "new TLS connections/s"
            // measures, and it keeps the servers' differing ticket policies out of it.
            cfg.resumption = rustls::client::Resumption::disabled();
            Ok(TlsConnector::from(Arc::new(cfg)))
        };
        let host = format!("{APP}.portcullis.localhost");
        let mut quic = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        quic.alpn_protocols = vec![b"h3".to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(quic)?;
        Ok(Client {
            h1: make(b"http/1.1")?,
            h2: make(b"h2")?,
            h3: quinn::ClientConfig::new(Arc::new(quic)),
            name: ServerName::try_from(host.clone())?,
            host,
        })
    }

    async fn tls(&self, addr: SocketAddr, h2: bool) -> anyhow::Result<TlsStream<TcpStream>> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .context("connect timed out")?
            .context("connect")?;
        tcp.set_nodelay(true)?;
        let connector = if h2 { &self.h2 } else { &self.h1 };
        let tls =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(self.name.clone(), tcp))
                .await
                .context("TLS handshake timed out")?
                .context("TLS handshake")?;
        let want: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
        if tls.get_ref().1.alpn_protocol() != Some(want) {
            bail!(
                "ALPN: asked for {}, server chose {:?}",
                String::from_utf8_lossy(want),
                tls.get_ref().1.alpn_protocol().map(String::from_utf8_lossy)
            );
        }
        Ok(tls)
    }

    async fn h1_conn(&self, addr: SocketAddr) -> anyhow::Result<http1::SendRequest<Empty<Bytes>>> {
        let tls = self.tls(addr, false).await?;
        let (sender, conn) = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls)),
        )
        .await
        .context("HTTP/1.1 handshake timed out")??;
        tokio::spawn(conn);
        Ok(sender)
    }

    async fn h2_conn(&self, addr: SocketAddr) -> anyhow::Result<http2::SendRequest<Empty<Bytes>>> {
        let tls = self.tls(addr, true).await?;
        let (sender, conn) = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            http2::handshake::<_, _, Empty<Bytes>>(TokioExecutor::new(), TokioIo::new(tls)),
        )
        .await
        .context("HTTP/2 handshake timed out")??;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// One QUIC connection on its own UDP socket (as each TCP connection has its own port),
    /// with its h3 driver on a task.
    async fn h3_conn(&self, addr: SocketAddr) -> anyhow::Result<H3Sender> {
        let mut ep = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        ep.set_default_client_config(self.h3.clone());
        let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, ep.connect(addr, &self.host)?)
            .await
            .context("QUIC handshake timed out")??;
        let (mut driver, sender) = h3::client::new(h3_quinn::Connection::new(conn)).await?;
        tokio::spawn(async move {
            let _ep = ep;
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(sender)
    }

    fn request(&self, h2: bool) -> anyhow::Result<hyper::Request<Empty<Bytes>>> {
        let b = hyper::Request::builder();
        let b = if h2 {
            // HTTP/2 carries the authority in the URI (:authority).
            b.uri(format!("https://{}/", self.host))
        } else {
            b.uri("/").header(hyper::header::HOST, &self.host)
        };
        Ok(b.body(Empty::new())?)
    }
}

/// Checks a response and reads its body, all within the request deadline.
async fn finish(
    resp: impl std::future::Future<Output = hyper::Result<hyper::Response<hyper::body::Incoming>>>,
) -> anyhow::Result<()> {
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        let resp = resp.await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if status != hyper::StatusCode::OK || body.len() != BODY.len() {
            bail!("status {status}, {} body bytes", body.len());
        }
        Ok(())
    })
    .await
    .context("request timed out")?
}

type H3Sender = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// One HTTP/3 request: the same checks as [`finish`], within the request deadline.
async fn h3_get(c: &Client, s: &mut H3Sender) -> anyhow::Result<()> {
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut stream = s.send_request(c.request(true)?.map(|_| ())).await?;
        stream.finish().await?;
        let resp = stream.recv_response().await?;
        let mut len = 0;
        while let Some(chunk) = stream.recv_data().await? {
            len += bytes::Buf::remaining(&chunk);
        }
        if resp.status() != hyper::StatusCode::OK || len != BODY.len() {
            bail!("status {}, {len} body bytes", resp.status());
        }
        Ok(())
    })
    .await
    .context("request timed out")?
}

/// The measured window: requests started before `start` (warm-up) or finished after `end` are
/// not counted, and none are started after `end`.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

struct Stats {
    hist: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds"),
            errors: 0,
            first_error: None,
        }
    }

    fn done(&mut self, w: Window, t0: Instant, r: &anyhow::Result<()>) {
        let now = Instant::now();
        if t0 < w.start || now > w.end {
            return;
        }
        match r {
            Ok(()) => self.hist.saturating_record((now - t0).as_micros() as u64),
            Err(e) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(format!("{e:#}"));
                }
            }
        }
    }

    fn merge(&mut self, o: Stats) -> anyhow::Result<()> {
        self.hist.add(&o.hist)?;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        Ok(())
    }
}

/// After a failed request: a short pause, so a target that refuses everything is not hammered
/// in a tight loop (and the errors stay countable).
async fn backoff() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

async fn h1_loop(c: Arc<Client>, addr: SocketAddr, w: Window) -> Stats {
    let mut st = Stats::new();
    let mut conn: Option<http1::SendRequest<Empty<Bytes>>> = None;
    while Instant::now() < w.end {
        let t0 = Instant::now();
        let r = async {
            // A server may close a keep-alive connection between requests; reconnecting is
            // part of this request's latency, not an error.
            let ready = match conn.as_mut() {
                Some(s) => tokio::time::timeout(REQUEST_TIMEOUT, s.ready())
                    .await
                    .is_ok_and(|r| r.is_ok()),
                None => false,
            };
            if !ready {
                conn = Some(c.h1_conn(addr).await?);
            }
            let s = conn.as_mut().context("no connection")?;
            let req = c.request(false)?;
            finish(s.send_request(req)).await
        }
        .await;
        st.done(w, t0, &r);
        if r.is_err() {
            conn = None;
            backoff().await;
        }
    }
    st
}

async fn h2_loop(c: Arc<Client>, addr: SocketAddr, streams: usize, w: Window) -> Stats {
    let mut st = Stats::new();
    while Instant::now() < w.end {
        let t0 = Instant::now();
        let sender = match c.h2_conn(addr).await {
            Ok(s) => s,
            Err(e) => {
                st.done(w, t0, &Err(e));
                backoff().await;
                continue;
            }
        };
        // `streams` requests in flight on this connection until the window closes or the
        // connection fails, then reconnect.
        let tasks: Vec<_> = (0..streams)
            .map(|_| {
                let mut s = sender.clone();
                let c = c.clone();
                async move {
                    let mut st = Stats::new();
                    while Instant::now() < w.end {
                        let t0 = Instant::now();
                        let r = async {
                            tokio::time::timeout(REQUEST_TIMEOUT, s.ready())
                                .await
                                .context("stream slot timed out")??;
                            finish(s.send_request(c.request(true)?)).await
                        }
                        .await;
                        st.done(w, t0, &r);
                        if r.is_err() {
                            if s.is_closed() {
                                break;
                            }
                            backoff().await;
                        }
                    }
                    st
                }
            })
            .collect();
        drop(sender);
        for s in futures::future::join_all(tasks).await {
            let _ = st.merge(s);
        }
    }
    st
}

async fn h3_loop(c: Arc<Client>, addr: SocketAddr, streams: usize, w: Window) -> Stats {
    let mut st = Stats::new();
    while Instant::now() < w.end {
        let t0 = Instant::now();
        let sender = match c.h3_conn(addr).await {
            Ok(s) => s,
            Err(e) => {
                st.done(w, t0, &Err(e));
                backoff().await;
                continue;
            }
        };
        // As with HTTP/2: `streams` requests in flight on this connection until the window
        // closes or the connection fails, then reconnect.
        let tasks: Vec<_> = (0..streams)
            .map(|_| {
                let mut s = sender.clone();
                let c = c.clone();
                async move {
                    let mut st = Stats::new();
                    let mut failed = 0;
                    while Instant::now() < w.end {
                        let t0 = Instant::now();
                        let r = h3_get(&c, &mut s).await;
                        st.done(w, t0, &r);
                        if r.is_err() {
                            failed += 1;
                            if failed > 3 {
                                break;
                            }
                            backoff().await;
                        } else {
                            failed = 0;
                        }
                    }
                    st
                }
            })
            .collect();
        drop(sender);
        for s in futures::future::join_all(tasks).await {
            let _ = st.merge(s);
        }
    }
    st
}

async fn newconn_loop(c: Arc<Client>, addr: SocketAddr, w: Window) -> Stats {
    let mut st = Stats::new();
    while Instant::now() < w.end {
        let t0 = Instant::now();
        let r = async {
            let mut s = c.h1_conn(addr).await?;
            finish(s.send_request(c.request(false)?)).await
            // Dropping the sender closes the connection.
        }
        .await;
        st.done(w, t0, &r);
        if r.is_err() {
            backoff().await;
        }
    }
    st
}

struct Run {
    stats: Stats,
    secs: f64,
    /// CPU seconds the target (with its child processes) used in the measured window.
    cpu: Option<f64>,
}

/// User + system CPU seconds of `root` and its descendants, from /proc (Linux only).
fn tree_cpu(root: u32) -> Option<f64> {
    let mut procs = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the parenthesized command name: state, ppid, …; utime and stime are fields
        // 14 and 15 of the whole line (11 and 12 after the name).
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        if let (Some(ppid), Some(u), Some(s)) = (num(1), num(11), num(12)) {
            procs.push((pid, ppid as u32, u + s));
        }
    }
    let mut tree = vec![root];
    let mut ticks = 0;
    while let Some(p) = tree.pop() {
        for &(pid, ppid, t) in &procs {
            if pid == p {
                ticks += t;
            }
            if ppid == p {
                tree.push(pid);
            }
        }
    }
    // /proc counts in USER_HZ, which the kernel fixes at 100 for user space on every
    // architecture (sysconf(_SC_CLK_TCK)).
    Some(ticks as f64 / 100.0)
}

async fn measure(c: &Arc<Client>, t: &Target, mode: Mode, a: &Args) -> anyhow::Result<Run> {
    let start = Instant::now() + Duration::from_secs(a.warmup);
    let w = Window {
        start,
        end: start + Duration::from_secs(a.duration),
    };
    let mut tasks = Vec::new();
    for _ in 0..a.connections {
        let c = c.clone();
        let addr = t.addr;
        tasks.push(match mode {
            Mode::H1 => tokio::spawn(h1_loop(c, addr, w)),
            Mode::H2 => tokio::spawn(h2_loop(c, addr, a.streams, w)),
            Mode::Newconn => tokio::spawn(newconn_loop(c, addr, w)),
            Mode::H3 => tokio::spawn(h3_loop(c, addr, a.streams, w)),
            Mode::Wrk | Mode::H2load => bail!("{mode:?} is driven by an outside tool"),
        });
    }
    // The target's CPU time over exactly the measured window.
    let pid = t.pid;
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(w.start.into()).await;
        let before = tree_cpu(pid)?;
        tokio::time::sleep_until(w.end.into()).await;
        Some(tree_cpu(pid)? - before)
    });
    let mut stats = Stats::new();
    for t in tasks {
        stats.merge(t.await?)?;
    }
    Ok(Run {
        stats,
        secs: a.duration as f64,
        cpu: cpu.await?,
    })
}

/// One request per target and protocol before measuring, so a misrouted target fails loudly
/// instead of producing a column of errors.
async fn check(c: &Client, t: &Target) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let r = async {
            let mut s = c.h1_conn(t.addr).await?;
            finish(s.send_request(c.request(false)?)).await?;
            let mut s = c.h2_conn(t.addr).await?;
            finish(s.send_request(c.request(true)?)).await?;
            if t.kind == Kind::Portcullis {
                let mut s = c.h3_conn(t.addr).await?;
                h3_get(c, &mut s).await?;
            }
            anyhow::Ok(())
        }
        .await;
        match r {
            Ok(()) => return Ok(()),
            // Portcullis applies the new app and instance asynchronously, through Raft.
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{} does not serve the backend", t.kind.label())))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Outside load generators: wrk (HTTP/1.1) and h2load (HTTP/2), the clients the data-plane issue
// names. C and single-threaded by default, they leave the target more of the machine than this
// binary's client does, so their figures are higher; both are reported.

struct Tools {
    wrk: Option<PathBuf>,
    h2load: Option<PathBuf>,
    wrk_script: PathBuf,
    h2load_log: PathBuf,
}

/// wrk resolves the URL's host itself and has no `--resolve`; the script points every thread
/// at the target's address while the URL keeps the name for SNI and Host. At the end it prints
/// wrk's whole latency distribution (each distinct µs value and its count), so rounds merge
/// into one hdrhistogram exactly as this binary's own samples do.
const WRK_SCRIPT: &str = r#"
function wrk.resolve(host, service)
  wrk.addrs = wrk.lookup(os.getenv("BENCH_IP"), os.getenv("BENCH_PORT"))
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    e.connect, e.read, e.write, e.timeout, e.status))
  for i = 1, #latency do
    local v, n = latency(i)
    if n > 0 then io.write(string.format("HIST %d %d\n", v, n)) end
  end
end
"#;

/// Runs `mode`'s tool against `t` for `secs` seconds and reads its samples.
async fn tool_run(
    tools: &Tools,
    t: &Target,
    mode: Mode,
    a: &Args,
    secs: u64,
) -> anyhow::Result<Stats> {
    let url = format!("https://{APP}.portcullis.localhost:{}/", t.addr.port());
    let threads = a.tool_threads.clamp(1, a.connections).to_string();
    let conns = a.connections.to_string();
    let mut cmd = match mode {
        Mode::Wrk => {
            let mut c = tokio::process::Command::new(tools.wrk.as_ref().context("wrk")?);
            c.args(["-t", &threads, "-c", &conns, "-d", &format!("{secs}s")])
                .args(["--timeout", &format!("{}s", REQUEST_TIMEOUT.as_secs())])
                .arg("-s")
                .arg(&tools.wrk_script)
                .arg(&url)
                .env("BENCH_IP", t.addr.ip().to_string())
                .env("BENCH_PORT", t.addr.port().to_string());
            c
        }
        Mode::H2load => {
            // h2load appends to its log.
            match std::fs::remove_file(&tools.h2load_log) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
            let mut c = tokio::process::Command::new(tools.h2load.as_ref().context("h2load")?);
            c.args(["-t", &threads, "-c", &conns, "-m", &a.streams.to_string()])
                .args(["-D", &secs.to_string()])
                .arg(format!("--connect-to={}", t.addr))
                .arg(format!("--log-file={}", tools.h2load_log.display()))
                .arg(&url);
            c
        }
        _ => bail!("{mode:?} is driven by this binary"),
    };
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let limit = Duration::from_secs(secs) + START_TIMEOUT;
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .with_context(|| format!("{} ran past {limit:?}", mode.label()))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}{}",
            mode.label(),
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    match mode {
        Mode::Wrk => wrk_stats(&stdout),
        _ => h2load_stats(&stdout, &std::fs::read_to_string(&tools.h2load_log)?),
    }
}

fn wrk_stats(stdout: &str) -> anyhow::Result<Stats> {
    let mut st = Stats::new();
    let mut result = None;
    for line in stdout.lines() {
        let mut f = line.split_whitespace();
        let tag = f.next();
        let nums: Vec<u64> = f
            .map(str::parse)
            .collect::<Result<_, _>>()
            .unwrap_or_default();
        match (tag, nums.as_slice()) {
            (Some("HIST"), &[v, n]) => st.hist.saturating_record_n(v.max(1), n),
            (Some("RESULT"), &[_, _, connect, read, write, timeout, status]) => {
                result = Some((connect + read + write + timeout, status))
            }
            _ => {}
        }
    }
    let Some((socket, status)) = result else {
        bail!("wrk printed no result (is the script running?): {stdout}");
    };
    // wrk counts a non-2xx/3xx answer as a completed request (its latency is in the
    // histogram) and separately as a status error; both kinds are errors here.
    st.errors = socket + status;
    if st.errors > 0 {
        st.first_error = Some(format!(
            "wrk: {socket} socket errors, {status} non-2xx/3xx answers"
        ));
    }
    Ok(st)
}

/// h2load's summary has no percentiles; its per-request log (start µs, status, µs to the end of
/// the response) has every sample.
fn h2load_stats(stdout: &str, log: &str) -> anyhow::Result<Stats> {
    let mut st = Stats::new();
    let mut other = 0u64;
    for line in log.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match (f.get(1), f.get(2).and_then(|v| v.parse::<u64>().ok())) {
            (Some(&"200"), Some(us)) => st.hist.saturating_record(us.max(1)),
            _ => other += 1,
        }
    }
    // "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
    let done = stdout
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(" done")))
        .and_then(|n| n.parse::<u64>().ok())
        .with_context(|| format!("h2load printed no request counts: {stdout}"))?;
    st.errors = done.saturating_sub(st.hist.len()).max(other);
    if st.errors > 0 {
        st.first_error = Some(format!(
            "h2load: {} of {done} requests did not end in a 200",
            st.errors
        ));
    }
    Ok(st)
}

/// A tool's warm-up is a run of its own: wrk has no warm-up phase, and h2load's would leave its
/// CPU time inside the window this one measures.
async fn measure_tool(tools: &Tools, t: &Target, mode: Mode, a: &Args) -> anyhow::Result<Run> {
    if a.warmup > 0 {
        tool_run(tools, t, mode, a, a.warmup).await?;
    }
    let before = tree_cpu(t.pid);
    let stats = tool_run(tools, t, mode, a, a.duration).await?;
    let cpu = before.zip(tree_cpu(t.pid)).map(|(b, e)| e - b);
    Ok(Run {
        stats,
        secs: a.duration as f64,
        cpu,
    })
}

// ---------------------------------------------------------------------------------------------
// Report.

struct Merged {
    stats: Stats,
    secs: f64,
    per_round: Vec<Round>,
    /// The target's CPU seconds over all measured windows, when every round had them.
    cpu: Option<f64>,
}

/// One round of one target in one mode, kept apart for the paired comparison.
#[derive(Clone, Copy)]
struct Round {
    rate: f64,
    p99_ms: f64,
    cpu_us: Option<f64>,
}

impl Merged {
    fn rate(&self) -> f64 {
        self.stats.hist.len() as f64 / self.secs.max(f64::MIN_POSITIVE)
    }
    fn ms(&self, q: f64) -> f64 {
        self.stats.hist.value_at_quantile(q) as f64 / 1000.0
    }
    /// Target CPU microseconds per completed request.
    fn cpu_us(&self) -> Option<f64> {
        cpu_per_request(self.cpu, self.stats.hist.len())
    }
}

/// CPU µs per request from CPU seconds over `requests`; none without requests.
fn cpu_per_request(cpu_secs: Option<f64>, requests: u64) -> Option<f64> {
    cpu_secs
        .filter(|_| requests > 0)
        .map(|c| c * 1e6 / requests as f64)
}

fn ratio(x: f64, of: Option<f64>) -> String {
    match of {
        Some(b) if b > 0.0 => format!("{:.2}", x / b),
        _ => "–".into(),
    }
}

fn report(results: &BTreeMap<(Mode, Kind), Merged>, a: &Args) -> String {
    let mut s = String::new();
    s.push_str(
        "| mode | target | req/s | p50 ms | p99 ms | p99.9 ms | errors | req/s ÷ best proxy | \
         p50 ÷ best proxy | p99 ÷ best proxy | CPU µs/req | CPU ÷ best proxy | req/s per round |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for &mode in &a.modes {
        // "Best proxy" per metric: the better of nginx and HAProxy on that metric.
        let proxies: Vec<&Merged> = [Kind::Nginx, Kind::Haproxy]
            .iter()
            .filter_map(|k| results.get(&(mode, *k)))
            .collect();
        let best_rate = proxies.iter().map(|m| m.rate()).reduce(f64::max);
        let best_p50 = proxies.iter().map(|m| m.ms(0.5)).reduce(f64::min);
        let best_p99 = proxies.iter().map(|m| m.ms(0.99)).reduce(f64::min);
        let best_cpu = proxies.iter().filter_map(|m| m.cpu_us()).reduce(f64::min);
        for &kind in &a.targets {
            let Some(m) = results.get(&(mode, kind)) else {
                continue;
            };
            let rounds: Vec<String> = m
                .per_round
                .iter()
                .map(|r| format!("{:.0}", r.rate))
                .collect();
            let cpu = m.cpu_us();
            s.push_str(&format!(
                "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} |\n",
                mode.label(),
                kind.label(),
                m.rate(),
                m.ms(0.5),
                m.ms(0.99),
                m.ms(0.999),
                m.stats.errors,
                ratio(m.rate(), best_rate),
                ratio(m.ms(0.5), best_p50),
                ratio(m.ms(0.99), best_p99),
                cpu.map_or("–".into(), |c| format!("{c:.1}")),
                cpu.map_or("–".into(), |c| ratio(c, best_cpu)),
                rounds.join(", "),
            ));
        }
    }
    s
}

/// Portcullis against the better proxy *of the same round*, per metric: rounds run back to
/// back, so a slow spell of this shared machine weighs on both sides of each ratio. Returns
/// `median (min–max)` and how many rounds Portcullis was at least as good.
fn paired(
    results: &BTreeMap<(Mode, Kind), Merged>,
    mode: Mode,
    metric: impl Fn(&Round) -> Option<f64>,
    higher_is_better: bool,
) -> Option<(String, usize, usize)> {
    let ours = &results.get(&(mode, Kind::Portcullis))?.per_round;
    let proxies: Vec<&Vec<Round>> = [Kind::Nginx, Kind::Haproxy]
        .iter()
        .filter_map(|k| results.get(&(mode, *k)).map(|m| &m.per_round))
        .collect();
    let mut ratios: Vec<f64> = ours
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let best = proxies
                .iter()
                .filter_map(|p| p.get(i).and_then(&metric))
                .reduce(if higher_is_better { f64::max } else { f64::min })?;
            Some(metric(r)? / best)
        })
        .filter(|x| x.is_finite())
        .collect();
    if ratios.is_empty() {
        return None;
    }
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    let median = if n % 2 == 1 {
        ratios[n / 2]
    } else {
        (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0
    };
    let as_good = ratios
        .iter()
        .filter(|&&x| if higher_is_better { x >= 1.0 } else { x <= 1.0 })
        .count();
    Some((
        format!("{median:.2} ({:.2}–{:.2})", ratios[0], ratios[n - 1]),
        as_good,
        n,
    ))
}

fn report_paired(results: &BTreeMap<(Mode, Kind), Merged>, a: &Args) -> String {
    let mut s = String::from(
        "Paired by round: Portcullis ÷ the better of nginx and HAProxy in the same round, \
         median (min–max), and the rounds in which Portcullis was at least as good.\n\n\
         | mode | req/s ratio | rounds ≥ | p99 ratio | rounds ≤ | CPU µs/req ratio | rounds ≤ |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let cell = |x: Option<(String, usize, usize)>| match x {
        Some((r, good, n)) => (r, format!("{good}/{n}")),
        None => ("–".into(), "–".into()),
    };
    for &mode in &a.modes {
        // No proxy ran in this mode (HTTP/3): no row.
        let Some(rate) = paired(results, mode, |r| Some(r.rate), true) else {
            continue;
        };
        let (rate, rate_n) = cell(Some(rate));
        let (p99, p99_n) = cell(paired(results, mode, |r| Some(r.p99_ms), false));
        let (cpu, cpu_n) = cell(paired(results, mode, |r| r.cpu_us, false));
        s.push_str(&format!(
            "| {} | {rate} | {rate_n} | {p99} | {p99_n} | {cpu} | {cpu_n} |\n",
            mode.label()
        ));
    }
    s
}

fn round_of(r: &Run, rate: f64) -> Round {
    Round {
        rate,
        p99_ms: r.stats.hist.value_at_quantile(0.99) as f64 / 1000.0,
        cpu_us: cpu_per_request(r.cpu, r.stats.hist.len()),
    }
}

async fn bench(a: Args) -> anyhow::Result<()> {
    if a.connections == 0 || a.streams == 0 || a.rounds == 0 || a.duration == 0 {
        bail!("--connections, --streams, --rounds and --duration must be at least 1");
    }
    let s = setup(&a).await?;
    let client = Arc::new(Client::new(&s.pki.ca)?);
    for t in &s.targets {
        check(&client, t).await?;
    }
    eprintln!(
        "targets ready: {}",
        s.targets
            .iter()
            .map(|t| format!("{} {}", t.kind.label(), t.addr))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut results: BTreeMap<(Mode, Kind), Merged> = BTreeMap::new();
    for &mode in &a.modes {
        for round in 0..a.rounds {
            // Rotate the order each round, so no target always runs first (or last).
            let n = s.targets.len();
            for i in 0..n {
                let t = &s.targets[(i + round) % n];
                if mode == Mode::H3 && t.kind != Kind::Portcullis {
                    continue;
                }
                let r = if mode.tool().is_some() {
                    measure_tool(&s.tools, t, mode, &a).await?
                } else {
                    measure(&client, t, mode, &a).await?
                };
                let rate = r.stats.hist.len() as f64 / r.secs;
                eprintln!(
                    "{} round {} {}: {rate:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors{}",
                    mode.label(),
                    round + 1,
                    t.kind.label(),
                    r.stats.hist.value_at_quantile(0.5) as f64 / 1000.0,
                    r.stats.hist.value_at_quantile(0.99) as f64 / 1000.0,
                    r.stats.errors,
                    r.stats
                        .first_error
                        .as_deref()
                        .map(|e| format!(" (first: {e})"))
                        .unwrap_or_default()
                );
                let this_round = round_of(&r, rate);
                match results.get_mut(&(mode, t.kind)) {
                    Some(m) => {
                        m.stats.merge(r.stats)?;
                        m.secs += r.secs;
                        m.per_round.push(this_round);
                        m.cpu = m.cpu.zip(r.cpu).map(|(x, y)| x + y);
                    }
                    None => {
                        results.insert(
                            (mode, t.kind),
                            Merged {
                                stats: r.stats,
                                secs: r.secs,
                                per_round: vec![this_round],
                                cpu: r.cpu,
                            },
                        );
                    }
                }
            }
        }
    }
    let mut out = String::new();
    out.push_str(&format!(
        "{} connections, {} streams per h2 connection, {} s measured after {} s warm-up, {} rounds, \
         {} workers ({}), access logs {}\n\n",
        a.connections,
        a.streams,
        a.duration,
        a.warmup,
        a.rounds,
        workers(&a),
        if a.no_pin { "unpinned" } else { "pinned, one per core" },
        if a.access_log { "on" } else { "off" }
    ));
    for v in &s.versions {
        out.push_str(&format!("- {v}\n"));
    }
    out.push('\n');
    out.push_str(&report(&results, &a));
    out.push('\n');
    out.push_str(&report_paired(&results, &a));
    println!("{out}");
    if let Some(path) = &a.out {
        std::fs::write(path, &out).with_context(|| format!("write {}", path.display()))?;
    }
    drop(s);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(rounds: &[(f64, f64, Option<f64>)]) -> Merged {
        Merged {
            stats: Stats::new(),
            secs: 1.0,
            per_round: rounds
                .iter()
                .map(|&(rate, p99_ms, cpu_us)| Round {
                    rate,
                    p99_ms,
                    cpu_us,
                })
                .collect(),
            cpu: None,
        }
    }

    /// Each round is compared with the better proxy of that same round, not with the merged
    /// totals: a slow round of Portcullis against a fast round of HAProxy is no comparison.
    #[test]
    fn paired_ratios_compare_each_round_with_the_better_proxy_of_that_round() {
        let mut r = BTreeMap::new();
        r.insert(
            (Mode::H2, Kind::Portcullis),
            merged(&[
                (100.0, 2.0, Some(10.0)),
                (50.0, 4.0, None),
                (90.0, 1.0, Some(9.0)),
            ]),
        );
        r.insert(
            (Mode::H2, Kind::Nginx),
            merged(&[
                (80.0, 1.0, Some(20.0)),
                (40.0, 8.0, None),
                (100.0, 2.0, Some(9.0)),
            ]),
        );
        r.insert(
            (Mode::H2, Kind::Haproxy),
            merged(&[
                (50.0, 4.0, Some(5.0)),
                (45.0, 5.0, None),
                (60.0, 3.0, Some(12.0)),
            ]),
        );
        // req/s: 100/80, 50/45, 90/100 — two rounds ahead.
        let (s, good, n) = paired(&r, Mode::H2, |x| Some(x.rate), true).expect("rate");
        assert_eq!((s.as_str(), good, n), ("1.11 (0.90–1.25)", 2, 3));
        // p99, lower is better: 2/1, 4/5, 1/2.
        let (s, good, n) = paired(&r, Mode::H2, |x| Some(x.p99_ms), false).expect("p99");
        assert_eq!((s.as_str(), good, n), ("0.80 (0.50–2.00)", 2, 3));
        // CPU: the round without figures is left out; 10/5, 9/9.
        let (s, good, n) = paired(&r, Mode::H2, |x| x.cpu_us, false).expect("cpu");
        assert_eq!((s.as_str(), good, n), ("1.50 (1.00–2.00)", 1, 2));
        // No proxy measured in a mode (HTTP/3): no row.
        assert!(paired(&r, Mode::H3, |x| Some(x.rate), true).is_none());
    }
}
