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
//!
//! This file parses the arguments and runs the rounds; what it starts, drives and prints lives
//! in the library's `edge_bench` module.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use portcullis_cluster_tests::edge_bench::backend;
use portcullis_cluster_tests::edge_bench::load::{check, measure, Client, LoadOptions};
use portcullis_cluster_tests::edge_bench::peers::{workers, ProxyOptions};
use portcullis_cluster_tests::edge_bench::processes::shutdown_signal;
use portcullis_cluster_tests::edge_bench::report::{add_round, paired_table, table, Merged};
use portcullis_cluster_tests::edge_bench::setup::{setup, Plan};
use portcullis_cluster_tests::edge_bench::stats::quantile_ms;
use portcullis_cluster_tests::edge_bench::target::{Kind, Mode};
use portcullis_cluster_tests::edge_bench::tools::measure_tool;

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

impl Args {
    fn plan(&self) -> Plan {
        Plan {
            portcullis: self.portcullis.clone(),
            nginx: self.nginx.clone(),
            haproxy: self.haproxy.clone(),
            wrk: self.wrk.clone(),
            h2load: self.h2load.clone(),
            targets: self.targets.clone(),
            modes: self.modes.clone(),
            portcullis_workers: self.portcullis_workers,
            proxies: ProxyOptions {
                workers: workers(self.workers),
                pin: !self.no_pin,
                access_log: self.access_log,
                minimal_headers: self.peers_minimal_headers,
            },
        }
    }

    fn load(&self) -> LoadOptions {
        LoadOptions {
            warmup: self.warmup,
            duration: self.duration,
            connections: self.connections,
            streams: self.streams,
            tool_threads: self.tool_threads,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Some(Sub::Backend(b)) => {
            rt.block_on(backend::serve(b.listen, b.tls_listen, &b.cert, &b.key))
        }
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

async fn bench(a: Args) -> anyhow::Result<()> {
    if a.connections == 0 || a.streams == 0 || a.rounds == 0 || a.duration == 0 {
        bail!("--connections, --streams, --rounds and --duration must be at least 1");
    }
    let s = setup(&a.plan()).await?;
    let load = a.load();
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
                    measure_tool(&s.tools, t, mode, &load).await?
                } else {
                    measure(&client, t, mode, &load).await?
                };
                let rate = r.stats.hist.len() as f64 / r.secs;
                eprintln!(
                    "{} round {} {}: {rate:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors{}",
                    mode.label(),
                    round + 1,
                    t.kind.label(),
                    quantile_ms(&r.stats.hist, 0.5),
                    quantile_ms(&r.stats.hist, 0.99),
                    r.stats.errors,
                    r.stats
                        .first_error
                        .as_deref()
                        .map(|e| format!(" (first: {e})"))
                        .unwrap_or_default()
                );
                add_round(&mut results, mode, t.kind, r, rate)?;
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
        workers(a.workers),
        if a.no_pin { "unpinned" } else { "pinned, one per core" },
        if a.access_log { "on" } else { "off" }
    ));
    for v in &s.versions {
        out.push_str(&format!("- {v}\n"));
    }
    out.push('\n');
    out.push_str(&table(&results, &a.modes, &a.targets));
    out.push('\n');
    out.push_str(&paired_table(&results, &a.modes));
    println!("{out}");
    if let Some(path) = &a.out {
        std::fs::write(path, &out).with_context(|| format!("write {}", path.display()))?;
    }
    drop(s);
    Ok(())
}
