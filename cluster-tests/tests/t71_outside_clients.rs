//! The data plane against clients nobody here wrote (issue 3): Python's httpx over HTTP/1.1 and
//! HTTP/2, an RFC 6455 WebSocket client on the standard library, the same WebSocket over HTTP/2
//! extended CONNECT (RFC 8441) with the `h2` library, a slow-header client, and an
//! HTTP/2 rapid-reset burst with the `h2` library (cluster-tests/clients/edge_clients.py).
//! Attacks run against one node while curl keeps being served by the same node.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use portcullis_cluster_tests::harness::{phase, run, TestCluster};

const HOST: &str = "demo.portcullis.localhost";

/// A Python that can import httpx and h2: Debian's (python3-httpx, python3-h2) may sit behind
/// another `python3` earlier on PATH.
fn python() -> Option<PathBuf> {
    ["/usr/bin/python3", "python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| {
            Command::new(p)
                .args(["-c", "import httpx, h2"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

fn clients_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/edge_clients.py")
}

fn https_port(tc: &TestCluster, id: u64) -> String {
    let addr = &tc.node(id).https_addr;
    addr.rsplit_once(':').expect("port").1.to_string()
}

fn client(py: &Path, tc: &TestCluster, id: u64, args: &[&str]) -> serde_json::Value {
    let out = run(Command::new(py)
        .arg(clients_script())
        .args(args)
        .args(["--port", &https_port(tc, id), "--host", HOST, "--ca"])
        .arg(tc.path().join("pki/dev-ca.pem")));
    assert!(
        out.status.success(),
        "edge_clients.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("client prints JSON")
}

fn curl_ok(tc: &TestCluster, id: u64) -> bool {
    let port = https_port(tc, id);
    let out = run(Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "5",
            "--cacert",
        ])
        .arg(tc.path().join("pki/dev-ca.pem"))
        .arg("--resolve")
        .arg(format!("{HOST}:{port}:127.0.0.1"))
        .arg(format!("https://{HOST}:{port}/")));
    out.stdout == b"200"
}

/// Runs `attack` while curl requests the same node every 200 ms; returns the attack's result
/// and (served, failed) curl counts.
fn while_serving(
    tc: &TestCluster,
    id: u64,
    attack: impl FnOnce() -> serde_json::Value + Send,
) -> (serde_json::Value, u32, u32) {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let probe = s.spawn(|| {
            let (mut ok, mut bad) = (0, 0);
            while !done.load(Ordering::Relaxed) {
                if curl_ok(tc, id) {
                    ok += 1;
                } else {
                    bad += 1;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            (ok, bad)
        });
        let result = attack();
        done.store(true, Ordering::Relaxed);
        let (ok, bad) = probe.join().expect("probe thread");
        (result, ok, bad)
    })
}

/// Both WebSocket clients send two text frames; the demo app echoes each.
fn assert_two_text_echoes(id: u64, r: &serde_json::Value) {
    let echoes = r["echoes"].as_array().expect("echoes");
    assert_eq!(echoes.len(), 2, "node {id}: {r}");
    assert!(
        echoes
            .iter()
            .all(|e| e["echoed"] == true && e["opcode"] == 1),
        "node {id}: {r}"
    );
}

#[test]
fn outside_clients_and_abusive_ones() {
    let Some(py) = python() else {
        let root = run(Command::new("id").arg("-u")).stdout == b"0\n";
        assert!(
            !root,
            "as root (CI) python3-httpx and python3-h2 must be installed"
        );
        eprintln!("SKIPPED outside_clients_and_abusive_ones: no python3 with httpx and h2 (apt-get install -y python3-httpx python3-h2)");
        return;
    };
    let tc = TestCluster::up(3);

    phase("httpx over HTTP/1.1 and HTTP/2 through every node");
    for id in tc.ids() {
        for (flag, version) in [(None, "HTTP/1.1"), (Some("--http2"), "HTTP/2")] {
            let mut args = vec!["httpx"];
            args.extend(flag);
            let r = client(&py, &tc, id, &args);
            assert_eq!(r["status"], 200, "node {id} {version}: {r}");
            assert_eq!(r["http_version"], version, "node {id}: {r}");
            let body: serde_json::Value =
                serde_json::from_str(r["body"].as_str().expect("body")).expect("demo app JSON");
            assert_eq!(body["headers"]["x-forwarded-proto"], "https", "{body}");
        }
    }

    phase("WebSocket echo through every node");
    for id in tc.ids() {
        let r = client(&py, &tc, id, &["websocket", "--path", "/ws"]);
        assert_eq!(r["status"], 101, "node {id}: {r}");
        assert_eq!(r["accept_ok"], true, "node {id}: {r}");
        assert_two_text_echoes(id, &r);
    }

    phase("WebSocket over HTTP/2 extended CONNECT (RFC 8441) through every node");
    for id in tc.ids() {
        let r = client(&py, &tc, id, &["websocket-h2", "--path", "/ws"]);
        assert_eq!(r["enable_connect_protocol"], 1, "node {id}: {r}");
        assert_eq!(r["status"], 200, "node {id}: {r}");
        assert_eq!(r["accept_header"], false, "node {id}: {r}");
        assert_two_text_echoes(id, &r);
    }

    phase("a slow-header client is cut off at the header-read timeout; others are served");
    let (r, ok, bad) = while_serving(&tc, 1, || {
        client(
            &py,
            &tc,
            1,
            &["slowloris", "--interval", "0.5", "--give-up", "40"],
        )
    });
    println!("slowloris: {r}; meanwhile curl served {ok}, failed {bad}");
    let outcome = r["outcome"].as_str().expect("outcome");
    assert!(
        outcome == "closed" || outcome.contains(" 408"),
        "the gateway kept a slow-header client: {r}"
    );
    // edge.header_read_timeout_ms is 10 s by default.
    let secs = r["seconds"].as_f64().expect("seconds");
    assert!((9.0..25.0).contains(&secs), "cut off after {secs} s: {r}");
    assert!(ok >= 10 && bad == 0, "served {ok}, failed {bad} meanwhile");

    phase("an HTTP/2 rapid-reset burst ends in GOAWAY; others are served");
    let (r, ok, bad) = while_serving(&tc, 2, || {
        client(&py, &tc, 2, &["rapid-reset", "--streams", "5000"])
    });
    println!("rapid reset: {r}; meanwhile curl served {ok}, failed {bad}");
    let sent = r["streams_sent"].as_u64().expect("streams_sent");
    assert_eq!(
        r["goaway_error_code"], 11,
        "expected GOAWAY ENHANCE_YOUR_CALM after a reset burst: {r}"
    );
    assert!(
        sent < 5000,
        "the gateway took all {sent} reset streams: {r}"
    );
    assert!(ok >= 1 && bad == 0, "served {ok}, failed {bad} meanwhile");
    let r = client(&py, &tc, 2, &["httpx", "--http2"]);
    assert_eq!(
        r["status"], 200,
        "a new HTTP/2 connection after the burst: {r}"
    );
}
