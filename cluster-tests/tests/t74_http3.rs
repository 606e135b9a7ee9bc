//! HTTP/3 through a real 3-node cluster (`portcullis up`), driven by a client nobody here wrote:
//! Python's aioquic (`clients/h3_get.py`), plus curl for the `Alt-Svc` advertisement over
//! HTTP/1.1 and HTTP/2.
//!
//! Needs `python3 -c 'import aioquic'` (`.ci/run` installs it). Without it the test fails as
//! root (CI must have it) and prints a SKIP reason otherwise.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use portcullis_cluster_tests::harness::{phase, portcullis_bin, run, show, wait_for, TestCluster};

/// Stops the demo apps with the cluster (`portcullis down`) before the harness kills nodes.
struct Cluster {
    tc: TestCluster,
    base: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.tc.down();
    }
}

/// What one run of the aioquic client printed.
struct H3Run {
    code: Option<i32>,
    /// One JSON object per request, or one error object.
    lines: Vec<serde_json::Value>,
    stderr: String,
}

impl H3Run {
    fn only(&self) -> &serde_json::Value {
        assert_eq!(
            (self.code, self.lines.len()),
            (Some(0), 1),
            "h3 client: {:?}\n{}",
            self.lines,
            self.stderr
        );
        &self.lines[0]
    }
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/h3_get.py")
}

fn is_root() -> bool {
    run(Command::new("id").arg("-u")).stdout.trim_ascii() == b"0"
}

impl Cluster {
    fn port(&self, node: u64) -> String {
        let addr = &self.tc.node(node).https_addr;
        addr.rsplit_once(':')
            .map(|(_, p)| p)
            .expect("port")
            .to_string()
    }

    fn host(&self, label: &str) -> String {
        format!("{label}.{}", self.base)
    }

    fn h3(&self, node: u64, host: &str, extra: &[&str]) -> H3Run {
        let out = run(Command::new("python3")
            .arg(script())
            .args(["--port", &self.port(node), "--host", host, "--cacert"])
            .arg(self.tc.path().join("pki/dev-ca.pem"))
            .args(extra));
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not json ({e}): {l}")))
            .collect();
        H3Run {
            code: out.status.code(),
            lines,
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        }
    }

    /// The app's answer (the demo app echoes what it received) from a 200 response.
    fn answer(resp: &serde_json::Value) -> serde_json::Value {
        assert_eq!(resp["status"], 200, "{resp}");
        let body = resp["body"].as_str().expect("body");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not json ({e}): {body}"))
    }

    /// A certificate for `name` from the cluster's development CA.
    fn issue_cert(&self, cn: &str, name: &str) -> (PathBuf, PathBuf) {
        self.tc.issue_dev_cert(cn, &[name], "h3-live")
    }

    fn curl_headers(&self, node: u64, flag: &str) -> String {
        let host = self.host("demo");
        let port = self.port(node);
        let out = run(Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "15",
                flag,
                "-o",
                "/dev/null",
                "-D",
                "-",
            ])
            .arg("--cacert")
            .arg(self.tc.path().join("pki/dev-ca.pem"))
            .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
            .arg(format!("https://{host}:{port}/")));
        assert!(out.status.success(), "curl {flag}: {}", show(&out));
        String::from_utf8_lossy(&out.stdout).to_ascii_lowercase()
    }
}

#[test]
fn t74_http3_end_to_end() {
    let probe = run(Command::new("python3").args(["-c", "import aioquic"]));
    if !probe.status.success() {
        assert!(
            !is_root(),
            "aioquic is not importable, and as root it must be (.ci/run installs it): {}",
            show(&probe)
        );
        eprintln!(
            "SKIP t74_http3: python3 cannot import aioquic and we are not root to install it \
             (python3 -m pip install --break-system-packages aioquic)"
        );
        return;
    }

    phase("start a 3-node cluster with the demo app");
    let tc = TestCluster::up(3);
    let text = std::fs::read_to_string(tc.path().join("cluster.json")).expect("cluster.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let base = v["base_domain"].as_str().expect("base_domain").to_string();
    let c = Cluster { tc, base };
    let demo = c.host("demo");

    phase("GET over HTTP/3 through each node reaches the demo app");
    let mut instances = std::collections::BTreeSet::new();
    for node in c.tc.ids() {
        let r = c.h3(node, &demo, &["--path", "/hello?x=1", "--count", "3"]);
        assert_eq!(r.code, Some(0), "node {node}: {:?}\n{}", r.lines, r.stderr);
        assert_eq!(r.lines.len(), 3, "three requests on one connection");
        for resp in &r.lines {
            let a = Cluster::answer(resp);
            assert_eq!(a["app"], "demo");
            assert_eq!(a["method"], "GET");
            assert_eq!(a["path"], "/hello?x=1");
            let h = &a["headers"];
            assert_eq!(h["x-forwarded-proto"], "https", "{a}");
            assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{a}");
            assert!(
                h["forwarded"]
                    .as_str()
                    .is_some_and(|f| f.contains("proto=https")),
                "{a}"
            );
            // The stream's FIN came with the headers: the backend sees a request without a body.
            assert!(h.get("transfer-encoding").is_none(), "{a}");
            assert!(
                resp["headers"]["strict-transport-security"]
                    .as_str()
                    .is_some_and(|v| v.starts_with("max-age=")),
                "HSTS over HTTP/3: {resp}"
            );
            instances.insert(a["instance_id"].as_str().unwrap_or("").to_string());
        }
    }
    assert_eq!(
        instances.len(),
        3,
        "round robin over HTTP/3 reached every instance: {instances:?}"
    );

    phase("a 1 MiB POST body streams through to the backend");
    let r = c.h3(
        2,
        &demo,
        &[
            "--method",
            "POST",
            "--path",
            "/upload",
            "--body-bytes",
            "1048576",
            "--chunk-bytes",
            "16384",
        ],
    );
    let resp = r.only();
    let a = Cluster::answer(resp);
    assert_eq!(
        (a["method"].as_str(), a["body_bytes"].as_u64()),
        (Some("POST"), Some(1_048_576)),
        "{a}"
    );
    eprintln!("    1 MiB POST over HTTP/3: {} ms", resp["total_ms"]);

    phase("a streamed response arrives chunk by chunk, not buffered");
    let r = c.h3(3, &demo, &["--path", "/stream?chunks=5&ms=300"]);
    let resp = r.only();
    assert_eq!(resp["status"], 200, "{resp}");
    let body = resp["body"].as_str().unwrap_or("");
    assert_eq!(body.lines().count(), 5, "{body}");
    let first = resp["first_byte_ms"].as_f64().expect("first byte");
    let total = resp["total_ms"].as_f64().expect("total");
    assert!(
        total - first >= 900.0,
        "the first chunk came {first} ms in, the whole body at {total} ms: it was buffered"
    );

    phase("Alt-Svc on HTTP/1.1 and HTTP/2 responses, naming each node's port");
    for node in c.tc.ids() {
        let want = format!("alt-svc: h3=\":{}\"; ma=86400", c.port(node));
        for flag in ["--http1.1", "--http2"] {
            let headers = c.curl_headers(node, flag);
            assert!(
                headers.contains(&want),
                "node {node} {flag}: no {want:?} in\n{headers}"
            );
        }
    }

    phase("unknown hosts are refused");
    let r = c.h3(1, &c.host("nosuchapp"), &[]);
    let resp = r.only();
    assert_eq!(resp["status"], 404, "{resp}");
    let r = c.h3(1, "unknown.example", &[]);
    assert_eq!(
        (r.code, r.lines.first().map(|l| l["phase"].clone())),
        (Some(3), Some("handshake".into())),
        "a name without a certificate fails the QUIC handshake: {:?} {}",
        r.lines,
        r.stderr
    );

    phase("Host outside the SNI's route: 421 over HTTP/3 too");
    let other = c.host("other");
    let r = c.h3(1, &demo, &["--authority", &other]);
    let resp = r.only();
    assert_eq!(resp["status"], 421, "{resp}");

    phase("a TLS passthrough route is not served over QUIC");
    let apps: serde_json::Value = serde_json::from_slice(
        &run(Command::new(portcullis_bin())
            .arg("--cluster")
            .arg(c.tc.path())
            .args(["app", "list", "--json"]))
        .stdout,
    )
    .expect("app list json");
    let port = apps
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == "demo"))
        .and_then(|d| d["ports"][0].as_u64())
        .expect("demo port");
    let pt = c.host(&format!("demo-{port}s"));
    let r = c.h3(2, &pt, &[]);
    assert_eq!(
        r.code,
        Some(3),
        "passthrough over h3 must not complete a handshake with the gateway's certificate: {:?} {}",
        r.lines,
        r.stderr
    );
    let m2 = wait_for(
        "node 2 counts the refused passthrough handshake",
        Duration::from_secs(5),
        || {
            let m = c.tc.metrics(2);
            m.contains("portcullis_edge_limit_rejections_total{reason=\"http3_passthrough\"}")
                .then_some(m)
        },
    );

    phase("a certificate imported through Raft is served over QUIC by the next handshake");
    let (crt, key) = c.issue_cert("h3-live", &demo);
    c.tc.import_cert(&demo, &crt, &key);
    for node in c.tc.ids() {
        wait_for(
            &format!("node {node} shows the new certificate over HTTP/3"),
            Duration::from_secs(10),
            || {
                let r = c.h3(node, &demo, &[]);
                let resp = r.lines.first()?;
                (resp["status"] == 200 && resp["peer_subject"] == "CN=h3-live").then_some(())
            },
        );
    }

    phase("metrics and access log name HTTP/3");
    for needle in [
        "portcullis_edge_requests_by_protocol_total{protocol=\"h3\"}",
        "portcullis_edge_connections_total{listener=\"http3\"}",
        "portcullis_edge_open_connections{listener=\"http3\"}",
    ] {
        assert!(m2.contains(needle), "node 2 metrics lack {needle}:\n{m2}");
    }
    let log = c.tc.node_log(1);
    assert!(
        log.lines()
            .any(|l| l.contains("portcullis::access") && l.contains("HTTP/3.0")),
        "node 1 access log has no HTTP/3 request"
    );
}
