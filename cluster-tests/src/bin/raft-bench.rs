//! Raft write benchmark: Portcullis `app create` commit latency and throughput on a local 3-node
//! cluster, beside etcd `put` on a local 3-member etcd cluster, in the same run on the same disk.
//!
//! ```text
//! cargo build --release -p portcullis-node -p portcullis-cluster-tests
//! target/release/raft-bench --portcullis target/release/portcullis --ops 2000
//! ```
//! Latency is measured per request from the client (send → acknowledged), recorded in
//! hdrhistogram; throughput is completed requests over wall time. Both systems get the same
//! client shape: one long-lived HTTP/2 channel to the leader, `concurrency` requests in flight.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use portcullis_cluster_tests::edge_bench::stats::latency_histogram;
use portcullis_cluster_tests::harness::{wait_for, TestCluster};
use portcullis_proto::admin::admin_client::AdminClient;
use portcullis_proto::admin::CreateAppRequest;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

mod etcd {
    tonic::include_proto!("etcdserverpb");
}

#[derive(Parser)]
struct Args {
    /// The portcullis binary (use a release build).
    #[arg(long, default_value = "target/release/portcullis")]
    portcullis: PathBuf,
    /// The etcd server binary.
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// Writes per concurrency level.
    #[arg(long, default_value_t = 2000)]
    ops: usize,
    /// Concurrency levels (requests in flight).
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    concurrency: Vec<usize>,
}

#[derive(Clone, Copy)]
struct Result {
    p50: u64,
    p99: u64,
    p999: u64,
    ops_per_sec: f64,
    errors: usize,
}

/// Runs `ops` calls of `f` with `concurrency` in flight; latencies in microseconds.
async fn drive<F, Fut>(ops: usize, concurrency: usize, f: F) -> anyhow::Result<Result>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let f = f.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = latency_histogram();
            let mut errors = 0;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= ops {
                    break;
                }
                let t = Instant::now();
                match f(i).await {
                    Ok(()) => h.saturating_record(t.elapsed().as_micros() as u64),
                    Err(_) => errors += 1,
                }
            }
            (h, errors)
        }));
    }
    let mut all = latency_histogram();
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await?;
        all.add(&h)?;
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(Result {
        p50: all.value_at_quantile(0.5),
        p99: all.value_at_quantile(0.99),
        p999: all.value_at_quantile(0.999),
        ops_per_sec: all.len() as f64 / elapsed,
        errors,
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(portcullis_node::cli::ports::reserve_tcp()?
        .local_addr()?
        .port())
}

struct Etcd {
    children: Vec<Child>,
    clients: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_etcd(bin: &PathBuf) -> anyhow::Result<Etcd> {
    let dir = tempfile::Builder::new().prefix("etcd-bench-").tempdir()?;
    let mut peers = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        peers.push(format!("http://127.0.0.1:{}", free_port()?));
        clients.push(format!("127.0.0.1:{}", free_port()?));
    }
    let initial: Vec<String> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| format!("m{i}={p}"))
        .collect();
    let mut children = Vec::new();
    for i in 0..3 {
        let log = std::fs::File::create(dir.path().join(format!("m{i}.log")))?;
        children.push(
            Command::new(bin)
                .arg(format!("--name=m{i}"))
                .arg(format!(
                    "--data-dir={}",
                    dir.path().join(format!("m{i}")).display()
                ))
                .arg(format!("--listen-client-urls=http://{}", clients[i]))
                .arg(format!("--advertise-client-urls=http://{}", clients[i]))
                .arg(format!("--listen-peer-urls={}", peers[i]))
                .arg(format!("--initial-advertise-peer-urls={}", peers[i]))
                .arg(format!("--initial-cluster={}", initial.join(",")))
                .arg("--initial-cluster-state=new")
                .arg("--initial-cluster-token=bench")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("start {}", bin.display()))?,
        );
    }
    Ok(Etcd {
        children,
        clients,
        _dir: dir,
    })
}

async fn channel(addr: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .timeout(Duration::from_secs(10))
        .connect()
        .await?)
}

/// The etcd member that answers as leader: a put's header names the member that served it, and
/// etcdctl reports which member leads.
async fn etcd_leader(e: &Etcd) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "endpoint",
                "status",
                "-w",
                "json",
                "--endpoints",
                &e.clients.join(","),
            ])
            .output()?;
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            if let Some(arr) = v.as_array() {
                for s in arr {
                    let me = s["Status"]["header"]["member_id"].as_u64();
                    let leader = s["Status"]["leader"].as_u64();
                    if me.is_some() && me == leader {
                        let ep = s["Endpoint"].as_str().unwrap_or_default();
                        return Ok(ep.trim_start_matches("http://").to_string());
                    }
                }
            }
        }
        if Instant::now() > deadline {
            bail!("etcd elected no leader within 30s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn row(name: &str, c: usize, r: &Result) -> String {
    format!(
        "| {name} | {c} | {:.2} | {:.2} | {:.2} | {:.0} | {} |",
        r.p50 as f64 / 1000.0,
        r.p99 as f64 / 1000.0,
        r.p999 as f64 / 1000.0,
        r.ops_per_sec,
        r.errors
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = std::path::absolute(&args.portcullis)?;
    if !bin.exists() {
        bail!(
            "{} not found; build it with cargo build --release -p portcullis-node",
            bin.display()
        );
    }
    std::env::set_var("PORTCULLIS_BIN", &bin);

    eprintln!("starting a 3-node portcullis cluster");
    let cluster = tokio::task::spawn_blocking(|| TestCluster::up(3)).await?;
    let ids = cluster.ids();
    let leader = wait_for("a leader", Duration::from_secs(10), || {
        cluster.agreed_leader(&ids)
    });
    let token = std::fs::read_to_string(&cluster.info.token_file)?
        .trim()
        .to_string();
    let auth: MetadataValue<_> = format!("Bearer {token}").parse()?;
    let pc = channel(&cluster.node(leader).admin_addr).await?;

    eprintln!("starting a 3-member etcd cluster");
    let etcd = start_etcd(&args.etcd)?;
    let etcd_leader = etcd_leader(&etcd).await?;
    let ec = channel(&etcd_leader).await?;

    let value = "x".repeat(64);
    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    for (round, &c) in args.concurrency.iter().enumerate() {
        let pc = pc.clone();
        let auth = auth.clone();
        let p = drive(args.ops, c, move |i| {
            let mut client = AdminClient::new(pc.clone());
            let auth = auth.clone();
            async move {
                let mut req = tonic::Request::new(CreateAppRequest {
                    name: format!("bench{round}x{i}"),
                    ports: vec![8080],
                    lb: "round-robin".into(),
                });
                req.metadata_mut().insert("authorization", auth);
                client.create_app(req).await?;
                Ok(())
            }
        })
        .await?;
        let ec = ec.clone();
        let value = value.clone();
        let e = drive(args.ops, c, move |i| {
            let mut client = etcd::kv_client::KvClient::new(ec.clone());
            let value = value.clone();
            async move {
                client
                    .put(etcd::PutRequest {
                        key: format!("bench{round}x{i}").into_bytes(),
                        value: value.into_bytes(),
                    })
                    .await?;
                Ok(())
            }
        })
        .await?;
        rows.push(row("portcullis app create", c, &p));
        rows.push(row("etcd put", c, &e));
        ratios.push(format!(
            "| {c} | {:.2} | {:.2} | {:.2} |",
            p.p50 as f64 / e.p50.max(1) as f64,
            p.p99 as f64 / e.p99.max(1) as f64,
            p.ops_per_sec / e.ops_per_sec.max(1.0)
        ));
    }
    println!("| system | clients | p50 ms | p99 ms | p999 ms | writes/s | errors |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!();
    println!(
        "| clients | p50 portcullis/etcd | p99 portcullis/etcd | throughput portcullis/etcd |"
    );
    println!("|---|---|---|---|");
    for r in ratios {
        println!("{r}");
    }
    drop(etcd);
    drop(cluster);
    Ok(())
}
