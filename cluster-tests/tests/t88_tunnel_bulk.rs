//! Bulk transfers through a gateway's WireGuard tunnel (issue 23), end to end with outside
//! clients: curl downloads and uploads over HTTPS through a real gateway to the demo app's
//! checkable `/bytes` endpoint behind `cvm-agent` (our user-space stack on both ends) and, as
//! root, behind wireguard-go (kernel TCP in the CVM), with small requests running alongside.
//! Every byte is compared with the demo app's pattern (the downloads here, the uploads by the
//! demo app), no small request may fail, and the gateway's `stack_panics` counter must stay 0.
//!
//! CI runs 2 transfers of 64 MiB each way per CVM, alternating HTTP/2 and HTTP/1.1. The soak
//! the issue asks for, 20 transfers of 256 MiB each way per CVM:
//! `PORTCULLIS_TUNNEL_SOAK=1 cargo test --release -p portcullis-cluster-tests --test
//! t88_tunnel_bulk -- --nocapture` (result in docs/wireguard.md).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use portcullis_cluster_tests::cvm::{
    self, agent_config, issue_credential, register_once, spawn_logged, start_wggo_cvm, wait_served,
    wg_quick_address, AgentSpec, WithChildren,
};
use portcullis_cluster_tests::harness::{phase, portcullis_bin, show, TestCluster};
use portcullis_node::cli::demo::bulk as demo_bulk;
use portcullis_test_support::wggo;

/// One transfer's target: a host name on node 1's HTTPS edge.
struct Target {
    host: String,
}

/// Transfers each way per target and their size.
fn plan() -> (usize, u64) {
    if std::env::var("PORTCULLIS_TUNNEL_SOAK").as_deref() == Ok("1") {
        (20, 256 << 20)
    } else {
        (2, 64 << 20)
    }
}

/// curl for `https://<host><path>` on node 1, trusting the dev CA, failing on HTTP errors.
fn curl(tc: &TestCluster, host: &str, path: &str, http11: bool) -> Command {
    let https = &tc.node(1).https_addr;
    let port = https.rsplit_once(':').map(|(_, p)| p).expect("https port");
    let mut c = Command::new("curl");
    c.args(["-sS", "--fail", "-m", "900", "--cacert"])
        .arg(tc.path().join("pki/dev-ca.pem"))
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"));
    if http11 {
        c.arg("--http1.1");
    }
    c.arg(format!("https://{host}:{port}{path}"));
    c
}

/// `GET /bytes?n=len`, every byte checked against the pattern as it arrives.
fn download(tc: &TestCluster, host: &str, len: u64, http11: bool) -> Result<(), String> {
    let mut child = curl(tc, host, &format!("/bytes?n={len}"), http11)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn curl: {e}"))?;
    let mut out = child.stdout.take().expect("stdout");
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    let mut bad = None;
    loop {
        let n = out.read(&mut buf).map_err(|e| format!("read curl: {e}"))?;
        if n == 0 {
            break;
        }
        if bad.is_none() {
            bad = demo_bulk::first_mismatch(got, &buf[..n]);
        }
        got += n as u64;
    }
    let done = child.wait_with_output().map_err(|e| e.to_string())?;
    if !done.status.success() {
        return Err(format!(
            "download cut after {got} of {len} bytes: {}",
            String::from_utf8_lossy(&done.stderr).trim()
        ));
    }
    if let Some(at) = bad {
        return Err(format!("download corrupted at byte {at}"));
    }
    if got != len {
        return Err(format!("download ended at {got} of {len} bytes"));
    }
    Ok(())
}

/// `PUT /bytes` of `len` pattern bytes streamed from stdin; the demo app checks them.
fn upload(tc: &TestCluster, host: &str, len: u64, http11: bool) -> Result<(), String> {
    let mut child = curl(tc, host, "/bytes", http11)
        .args(["-T", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn curl: {e}"))?;
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0u64;
        while sent < len {
            let n = (len - sent).min(buf.len() as u64) as usize;
            demo_bulk::fill(sent, &mut buf[..n]);
            stdin.write_all(&buf[..n])?;
            sent += n as u64;
        }
        Ok(())
    });
    let done = child.wait_with_output().map_err(|e| e.to_string())?;
    let wrote = writer.join().expect("writer thread");
    let text = String::from_utf8_lossy(&done.stdout);
    if !done.status.success() {
        return Err(format!(
            "upload failed ({wrote:?}): {} {text}",
            String::from_utf8_lossy(&done.stderr).trim()
        ));
    }
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("answer {text:?}: {e}"))?;
    if v["bytes"].as_u64() != Some(len) || !v["mismatch_at"].is_null() {
        return Err(format!("upload arrived as {v}"));
    }
    Ok(())
}

/// Small requests to every target until `stop`, each with its own curl; returns how many
/// succeeded and counts the others in `failures`.
fn small_requests(
    tc: &TestCluster,
    targets: &[Target],
    stop: &AtomicBool,
    failures: &AtomicU64,
) -> u64 {
    let mut ok = 0;
    while !stop.load(Ordering::Relaxed) {
        for t in targets {
            match cvm::curl_https_timeout(tc, 1, &t.host, "/", 60) {
                Some((200, _)) => ok += 1,
                other => {
                    eprintln!("small request to {} failed: {other:?}", t.host);
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    ok
}

/// Creates app `app` on `port`, a CVM credential for it, and an agent configuration for its
/// instance `<app>-1`; returns the configuration's path.
fn app_with_agent(tc: &TestCluster, app: &str, port: u16) -> std::path::PathBuf {
    let out = tc.cli(&["app", "create", app, "--port", &port.to_string()]);
    assert!(out.status.success(), "{}", show(&out));
    let cred = format!("cvm-{app}");
    issue_credential(tc, app, &cred);
    let instance = format!("{app}-1");
    agent_config(
        tc,
        &AgentSpec {
            cred: &cred,
            app,
            instance: &instance,
            wg_key: &format!("{instance}.wg.key"),
            expose: &[port],
            reregister_secs: 30,
        },
    )
}

fn stack_panics(tc: &TestCluster) -> Option<u64> {
    tc.metrics(1)
        .lines()
        .find(|l| l.starts_with("portcullis_wg_events_total{event=\"stack_panics\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn bulk_transfers_through_the_tunnel_arrive_whole() {
    let (rounds, len) = plan();
    let body_limit = (len + (1 << 20)).to_string();
    let mut t = WithChildren::new(TestCluster::up_with(
        1,
        &["--edge-max-request-body-bytes", &body_limit],
    ));
    let dir = t.tc.path().to_path_buf();
    let mut targets = Vec::new();

    phase("a demo app behind cvm-agent");
    let (app, port) = cvm::spawn_demo_app(&dir.join("bulk-1.log"), "bulk", "bulk-1", &[]);
    t.children.push(app);
    let cfg = app_with_agent(&t.tc, "bulk", port);
    let agent_log = dir.join("agent-bulk-1.log");
    t.children.push(spawn_logged(
        &["cvm-agent", "--config", cfg.to_str().expect("utf8")],
        &agent_log,
    ));
    wait_served(&t.tc, 1, "bulk.portcullis.localhost", "/");
    targets.push(Target {
        host: "bulk.portcullis.localhost".into(),
    });

    // Field order is drop order: the demo app in the namespace, then wireguard-go and it.
    let mut wggo_side = None;
    match wggo::skip_reason() {
        Some(why) => eprintln!("wireguard-go CVM leg SKIPPED: {why}"),
        None => {
            phase("a demo app behind wireguard-go");
            let cfg = app_with_agent(&t.tc, "bulkgo", 8080);
            let conf = register_once(&cfg).expect("registration");
            let (_, tunnel_ip) = wg_quick_address(&conf);
            let sfx = wggo::suffix();
            let cvm = start_wggo_cvm(&t.tc, &conf, format!("pcbk-{sfx}"), format!("pcbk{sfx}"))
                .expect("wireguard-go CVM");
            // The demo app listens on the CVM's tunnel address, inside its namespace.
            let log = std::fs::File::create(dir.join("bulkgo-1.log")).expect("log");
            let child = Command::new("ip")
                .args(["netns", "exec", &cvm.ns.name])
                .arg(portcullis_bin())
                .args(["demo-app", "--listen", &format!("{tunnel_ip}:8080")])
                .args(["--name", "bulkgo", "--instance-id", "bulkgo-1"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup"))
                .stderr(log)
                .spawn()
                .expect("demo app in the CVM namespace");
            t.children.push(child);
            wait_served(&t.tc, 1, "bulkgo.portcullis.localhost", "/");
            targets.push(Target {
                host: "bulkgo.portcullis.localhost".into(),
            });
            wggo_side = Some(cvm);
        }
    }

    phase(&format!(
        "{rounds} transfers of {} MiB each way per CVM, small requests alongside",
        len >> 20
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut moved = 0u64;
    let small_ok = std::thread::scope(|s| {
        let small = s.spawn(|| small_requests(&t.tc, &targets, &stop, &failures));
        let mut errors = Vec::new();
        for round in 0..rounds {
            let http11 = round % 2 == 1;
            for target in &targets {
                let t0 = Instant::now();
                if let Err(e) = download(&t.tc, &target.host, len, http11) {
                    errors.push(format!("round {round} {}: {e}", target.host));
                }
                let t1 = Instant::now();
                if let Err(e) = upload(&t.tc, &target.host, len, http11) {
                    errors.push(format!("round {round} {}: {e}", target.host));
                }
                moved += 2 * len;
                println!(
                    "round {round} {} ({}): down {:.1} MB/s, up {:.1} MB/s",
                    target.host,
                    if http11 { "h1" } else { "h2" },
                    len as f64 / (t1 - t0).as_secs_f64() / 1e6,
                    len as f64 / t1.elapsed().as_secs_f64() / 1e6,
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
        let ok = small.join().expect("small requests");
        assert!(errors.is_empty(), "cut or corrupted transfers: {errors:#?}");
        ok
    });
    println!(
        "{} MiB moved in {:.0} s; {small_ok} small requests",
        moved >> 20,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(failures.load(Ordering::Relaxed), 0, "failed small requests");
    assert!(small_ok > 0, "no small request completed");
    assert_eq!(stack_panics(&t.tc), Some(0), "gateway stack_panics");
    let agent = std::fs::read_to_string(&agent_log).unwrap_or_default();
    assert!(
        !agent.contains("panicked"),
        "the CVM side's stack panicked:\n{agent}"
    );
    drop(wggo_side);
}
