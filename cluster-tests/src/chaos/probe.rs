//! The data-plane probe: the demo app behind every gateway, and HTTPS GETs through each gateway
//! every 100 ms while faults run, to measure error rate and the longest outage per gateway.
//! Every request's outcome is kept, so outage.rs can also cut the partition windows out of the
//! same results (the majority-side check).
//!
//! The demo app runs inside the CVM namespace (10.77.0.4), registered as a plain-TCP backend,
//! and the probe's HTTPS clients run on a thread inside the client namespace (10.77.0.3), so
//! every probe crosses the bridge: client -> gateway -> CVM. Node partitions (which only cut
//! node-to-node traffic) leave that path intact, and `portcullis-chaos cleanup` finds the demo
//! app with the namespace's other processes.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use portcullis_proto::admin::{CreateAppRequest, PutCertificateRequest, RegisterInstanceRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::cluster::Cluster;
use super::link::run_in_netns;
use super::samples::{window_stats, GatewayStats, ProbeSample};
use super::topology::{node_ip, CLIENT_NS, CVM_IP, CVM_NS, GATEWAY_HTTPS_PORT};

pub const BASE: &str = "chaos.portcullis.test";
pub const DEMO_IP: &str = CVM_IP;
pub const DEMO_PORT: u16 = 18080;
const INTERVAL: Duration = Duration::from_millis(100);
const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

/// The demo backend and the TLS client config trusting its certificate; kills the demo on drop.
pub struct DataPlane {
    client: Arc<rustls::ClientConfig>,
    demo: Option<Child>,
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        if let Some(mut c) = self.demo.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn make_cert() -> anyhow::Result<(String, String, String)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "portcullis-chaos test CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let mut leaf = CertificateParams::new(vec![format!("*.{BASE}"), BASE.to_string()])?;
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok((ca_pem, cert.pem(), key.serialize_pem()))
}

impl DataPlane {
    /// Imports a certificate, creates app `demo`, starts the demo backend and waits until every
    /// gateway serves `https://demo.<base>/`.
    pub async fn setup(cluster: &Cluster, bin: &Path, dir: &Path) -> anyhow::Result<DataPlane> {
        let (ca_pem, chain_pem, key_pem) = make_cert().context("make the demo certificate")?;
        let a = &cluster.nodes[0].admin;
        let mut c = a.raw();
        c.put_certificate(a.request(PutCertificateRequest {
            name: format!("*.{BASE}"),
            chain_pem,
            key_pem,
        }))
        .await
        .map_err(|s| anyhow::anyhow!("import certificate: {}", s.message()))?;
        c.create_app(a.request(CreateAppRequest {
            name: "demo".into(),
            ports: vec![8080],
            lb: "round-robin".into(),
        }))
        .await
        .map_err(|s| anyhow::anyhow!("create app demo: {}", s.message()))?;
        let log = std::fs::File::create(dir.join("demo-app.log"))?;
        let demo = Command::new("ip")
            .args(["netns", "exec", CVM_NS])
            .arg(bin)
            .args(["demo-app", "--listen", &format!("{DEMO_IP}:{DEMO_PORT}")])
            .args(["--name", "demo", "--region", &cluster.nodes[0].region])
            .args(["--instance-id", "demo-chaos"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("start demo-app")?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(cert?)?;
        }
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let dp = DataPlane {
            client: Arc::new(client),
            demo: Some(demo),
        };
        c.register_instance(a.request(RegisterInstanceRequest {
            instance_id: "demo-chaos".into(),
            app: "demo".into(),
            region: cluster.nodes[0].region.clone(),
            wg_public_key: String::new(),
            backend_addr: format!("{DEMO_IP}:{DEMO_PORT}"),
        }))
        .await
        .map_err(|s| anyhow::anyhow!("register demo instance: {}", s.message()))?;
        let ids = cluster.ids();
        let client = dp.client.clone();
        run_in_netns(CLIENT_NS, move || async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            for id in ids {
                loop {
                    match probe(&client, id).await {
                        Ok(200) => break,
                        r if Instant::now() > deadline => {
                            bail!("gateway {id} does not serve https://demo.{BASE}/: {r:?}")
                        }
                        _ => tokio::time::sleep(INTERVAL).await,
                    }
                }
            }
            Ok(())
        })
        .await??;
        Ok(dp)
    }

    /// Probes every gateway every 100 ms until `deadline` from the client namespace; returns
    /// stats per gateway (empty if the client-namespace thread could not start).
    pub async fn run(
        &self,
        ids: Vec<u64>,
        start: Instant,
        deadline: Instant,
    ) -> BTreeMap<u64, GatewayStats> {
        let client = self.client.clone();
        match run_in_netns(CLIENT_NS, move || probe_all(client, ids, start, deadline)).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("--- data-plane probe failed: {e:#}");
                BTreeMap::new()
            }
        }
    }
}

/// The probe loops, one task per gateway; runs on the client-namespace thread's runtime.
async fn probe_all(
    client: Arc<rustls::ClientConfig>,
    ids: Vec<u64>,
    start: Instant,
    deadline: Instant,
) -> BTreeMap<u64, GatewayStats> {
    let results: Arc<Mutex<BTreeMap<u64, GatewayStats>>> = Arc::default();
    let mut tasks = Vec::new();
    for id in ids {
        let client = client.clone();
        let results = results.clone();
        tasks.push(tokio::spawn(async move {
            let ms = |t: Instant| t.saturating_duration_since(start).as_millis() as u64;
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while Instant::now() < deadline {
                tick.tick().await;
                let ok = matches!(probe(&client, id).await, Ok(200));
                samples.push(ProbeSample {
                    at_ms: ms(Instant::now()),
                    ok,
                });
            }
            let until = ms(Instant::now());
            // The whole run is just the widest window: one definition of an outage for the
            // per-gateway figure and the partition windows.
            let whole = window_stats(&samples, until, 0, until);
            let st = GatewayStats {
                requests: whole.requests,
                errors: whole.errors,
                error_rate: whole.errors as f64 / whole.requests.max(1) as f64,
                longest_outage_ms: whole.longest_outage_ms,
                probed_until_ms: until,
                samples,
            };
            results
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, st);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let r = results.lock().unwrap_or_else(|p| p.into_inner()).clone();
    r
}

/// One HTTPS GET of `https://demo.<base>/` through gateway `id` on a fresh connection;
/// returns the status code.
async fn probe(client: &Arc<rustls::ClientConfig>, id: u64) -> anyhow::Result<u16> {
    let fut = async {
        let addr = format!("{}:{GATEWAY_HTTPS_PORT}", node_ip(id));
        let tcp = tokio::net::TcpStream::connect(&addr).await?;
        let host = format!("demo.{BASE}");
        let name = rustls::pki_types::ServerName::try_from(host.clone())?;
        let mut tls = tokio_rustls::TlsConnector::from(client.clone())
            .connect(name, tcp)
            .await?;
        tls.write_all(
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = [0u8; 64];
        let mut n = 0;
        // The status line is all we need: "HTTP/1.1 200 ...".
        while n < 12 {
            let r = tls.read(&mut buf[n..]).await?;
            if r == 0 {
                break;
            }
            n += r;
        }
        let line = String::from_utf8_lossy(&buf[..n]);
        let code = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .context("no HTTP status line")?;
        anyhow::Ok(code)
    };
    tokio::time::timeout(PROBE_TIMEOUT, fut)
        .await
        .context("probe timed out")?
}
