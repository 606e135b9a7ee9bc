//! The HTTPS data plane through a real 3-node cluster (`portcullis up`), with clients nobody
//! here wrote: curl (HTTP/1.1 and HTTP/2) and `openssl s_client`.
//!
//! Phases are logged; every wait polls a condition with a deadline instead of sleeping.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use portcullis_cluster_tests::harness::{
    free_port, phase, portcullis_bin, run, show, wait_for, DownOnDrop, TestCluster,
};

/// A cluster whose demo apps are stopped with it: `portcullis down` before the harness kills
/// the nodes, plus any backend processes the test started.
struct DataPlane {
    tc: TestCluster,
    base: String,
    backends: Vec<Child>,
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.tc.down();
        for c in &mut self.backends {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Curl {
    status: u16,
    version: String,
    body: String,
    stderr: String,
}

impl DataPlane {
    fn up() -> Self {
        let tc = TestCluster::up(3);
        let text = std::fs::read_to_string(tc.path().join("cluster.json")).expect("cluster.json");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let base = v["base_domain"].as_str().expect("base_domain").to_string();
        DataPlane {
            tc,
            base,
            backends: Vec::new(),
        }
    }

    fn ca(&self) -> PathBuf {
        self.tc.path().join("pki/dev-ca.pem")
    }

    fn port(addr: &str) -> &str {
        addr.rsplit_once(':').map(|(_, p)| p).expect("port")
    }

    fn https_port(&self, node: u64) -> String {
        Self::port(&self.tc.node(node).https_addr).to_string()
    }

    fn host(&self, label: &str) -> String {
        format!("{label}.{}", self.base)
    }

    /// curl to `https://<sni_host>:<port><path>` on `node`, with extra arguments.
    fn curl(&self, node: u64, sni_host: &str, path: &str, extra: &[&str]) -> Curl {
        let port = self.https_port(node);
        let out = run(Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "15",
                "-w",
                "\n%{http_code} %{http_version}",
                "--cacert",
            ])
            .arg(self.ca())
            .args(["--resolve", &format!("{sni_host}:{port}:127.0.0.1")])
            .args(extra)
            .arg(format!("https://{sni_host}:{port}{path}")));
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, tail) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        let mut it = tail.split(' ');
        let status = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        Curl {
            status,
            version: it.next().unwrap_or("").to_string(),
            body: body.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        }
    }

    fn json(&self, node: u64, host: &str, path: &str, extra: &[&str]) -> serde_json::Value {
        let c = self.curl(node, host, path, extra);
        assert_eq!(
            c.status, 200,
            "GET https://{host}{path} on node {node}: {} {}",
            c.body, c.stderr
        );
        serde_json::from_str(&c.body).unwrap_or_else(|e| panic!("not json ({e}): {}", c.body))
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.tc.cli(args);
        assert!(out.status.success(), "portcullis {args:?}: {}", show(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn spawn_backend(&mut self, args: &[&str]) {
        let child = Command::new(portcullis_bin())
            .arg("demo-app")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start demo-app");
        self.backends.push(child);
    }

    /// Subject of the certificate node `node` serves for `sni`, via openssl s_client.
    fn served_subject(&self, node: u64, sni: &str) -> String {
        let port = self.https_port(node);
        let script = format!(
            "echo | openssl s_client -connect 127.0.0.1:{port} -servername {sni} 2>/dev/null | openssl x509 -noout -subject"
        );
        String::from_utf8_lossy(&run(Command::new("sh").args(["-c", &script])).stdout)
            .trim()
            .to_string()
    }

    /// A certificate for `names` from the cluster's development CA.
    fn issue_cert(&self, cn: &str, names: &[String], stem: &str) -> (PathBuf, PathBuf) {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.tc.issue_dev_cert(cn, &names, stem)
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn t60_up_prints_a_curl_line_that_works() {
    let dir = tempfile::Builder::new()
        .prefix("portcullis-t60-")
        .tempdir()
        .expect("tempdir");
    phase("portcullis up");
    let out = run(Command::new(portcullis_bin())
        .args(["up", "--detach", "--state-dir"])
        .arg(dir.path()));
    let guard = DownOnDrop(dir.path().to_path_buf());
    assert!(out.status.success(), "up: {}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl "))
        .collect();
    assert_eq!(lines.len(), 3, "one curl line per node:\n{stdout}");
    for line in lines {
        phase(&format!("run as printed: {line}"));
        let out = run(Command::new("sh").args(["-c", &format!("{line} -sS -f")]));
        assert!(out.status.success(), "{line}: {}", show(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json answer");
        assert_eq!(v["app"], "demo");
        assert!(
            v["instance_id"]
                .as_str()
                .is_some_and(|i| i.starts_with("demo-")),
            "{v}"
        );
    }
    drop(guard);
}

#[test]
fn t61_https_routing_limits_and_live_updates() {
    phase("start a 3-node cluster with the demo app");
    let mut dp = DataPlane::up();
    let demo = dp.host("demo");

    phase("HTTP/1.1 and HTTP/2 on every node; round robin reaches every instance");
    let mut seen = std::collections::BTreeSet::new();
    for node in dp.tc.ids() {
        for (flag, want) in [("--http1.1", "1.1"), ("--http2", "2")] {
            let c = dp.curl(node, &demo, "/hello?x=1", &[flag, "-D", "/dev/stderr"]);
            assert_eq!(
                (c.status, c.version.as_str()),
                (200, want),
                "node {node} {flag}: {}",
                c.stderr
            );
            assert!(
                c.stderr
                    .to_ascii_lowercase()
                    .contains("strict-transport-security: max-age="),
                "HSTS missing: {}",
                c.stderr
            );
            let v: serde_json::Value = serde_json::from_str(&c.body).expect("json");
            assert_eq!(v["path"], "/hello?x=1");
            assert_eq!(v["headers"]["x-forwarded-proto"], "https");
            assert_eq!(v["headers"]["x-forwarded-for"], "127.0.0.1");
            assert!(
                v["headers"]["forwarded"]
                    .as_str()
                    .is_some_and(|f| f.contains("proto=https")),
                "{v}"
            );
            seen.insert(v["instance_id"].as_str().unwrap_or("").to_string());
        }
    }
    for _ in 0..3 {
        let v = dp.json(1, &demo, "/", &[]);
        seen.insert(v["instance_id"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(seen.len(), 3, "all three demo instances answered: {seen:?}");

    phase("cvm list --json");
    let list: serde_json::Value =
        serde_json::from_str(&dp.cli_ok(&["cvm", "list", "--json"])).expect("json");
    let list = list.as_array().expect("array");
    assert_eq!(list.len(), 3);
    for i in list {
        for f in ["instance_id", "app", "region", "tunnel_ip", "wg_public_key"] {
            assert!(i.get(f).is_some(), "cvm list entry lacks {f}: {i}");
        }
    }

    phase("TLS 1.0/1.1 refused, 1.2 and 1.3 accepted");
    let port = dp.https_port(2);
    for (flag, ok) in [
        ("-tls1", false),
        ("-tls1_1", false),
        ("-tls1_2", true),
        ("-tls1_3", true),
    ] {
        let script = format!(
            "echo | openssl s_client -connect 127.0.0.1:{port} -servername {demo} {flag} -cipher 'DEFAULT:@SECLEVEL=0' 2>&1"
        );
        let out = String::from_utf8_lossy(&run(Command::new("sh").args(["-c", &script])).stdout)
            .to_string();
        let negotiated = out.contains("Cipher is ") && !out.contains("Cipher is (NONE)");
        assert_eq!(negotiated, ok, "openssl {flag}:\n{out}");
        if !ok {
            // Refused by the server (an alert), not by the local OpenSSL policy.
            assert!(
                out.contains("alert"),
                "openssl {flag} should see a server alert:\n{out}"
            );
        }
    }

    phase("HTTP port: 308 to HTTPS, ACME path reserved");
    let http = dp.tc.node(1).http_addr.clone();
    let out = run(Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "-H",
        ])
        .arg(format!("Host: {demo}"))
        .arg(format!("http://{http}/a/b?c=d")));
    let got = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        got,
        format!("308 https://{demo}:{}/a/b?c=d", dp.https_port(1)),
        "{}",
        show(&out)
    );
    let out = run(Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
        .arg(format!("Host: {demo}"))
        .arg(format!("http://{http}/.well-known/acme-challenge/abc")));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");

    phase("routing grammar: <app>, <app>-<port>, <instance-id>, g (h2c), s (passthrough), errors");
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    dp.spawn_backend(&[
        "--listen",
        &format!("127.0.0.1:{p1}"),
        "--listen",
        &format!("127.0.0.1:{p2}"),
        "--name",
        "multi",
        "--region",
        "eu-west",
        "--instance-id",
        "multi-1",
    ]);
    let pt_host = dp.host(&format!("secure-{p3}s"));
    let (crt, key) = dp.issue_cert(
        "passthrough-backend",
        std::slice::from_ref(&pt_host),
        "backend",
    );
    dp.spawn_backend(&[
        "--listen",
        &format!("127.0.0.1:{p3}"),
        "--name",
        "secure",
        "--region",
        "us-east",
        "--tls-cert",
        path_str(&crt),
        "--tls-key",
        path_str(&key),
    ]);
    for p in [p1, p2, p3] {
        wait_for(&format!("backend on {p}"), Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", p)).ok()
        });
    }
    dp.cli_ok(&[
        "app",
        "create",
        "multi",
        "--port",
        &p1.to_string(),
        "--port",
        &p2.to_string(),
    ]);
    dp.cli_ok(&[
        "cvm",
        "register",
        "--instance-id",
        "multi-1",
        "--app",
        "multi",
        "--region",
        "eu-west",
        "--backend",
        "127.0.0.1",
    ]);
    dp.cli_ok(&["app", "create", "secure", "--port", &p3.to_string()]);
    dp.cli_ok(&[
        "cvm",
        "register",
        "--instance-id",
        "secure-1",
        "--app",
        "secure",
        "--region",
        "us-east",
        "--backend",
        "127.0.0.1",
    ]);
    let multi = dp.host("multi");
    wait_for("multi routed on node 3", Duration::from_secs(5), || {
        (dp.curl(3, &multi, "/", &[]).status == 200).then_some(())
    });
    assert_eq!(dp.json(3, &multi, "/", &[])["port"], p1, "default port");
    assert_eq!(
        dp.json(3, &dp.host(&format!("multi-{p2}")), "/", &[])["port"],
        p2,
        "<app>-<port>"
    );
    let v = dp.json(2, &dp.host("multi-1"), "/", &["--http2"]);
    assert_eq!(v["instance_id"], "multi-1", "<instance-id>");
    let v = dp.json(1, &dp.host(&format!("multi-{p2}g")), "/", &["--http1.1"]);
    assert_eq!(
        (v["port"].as_u64(), v["version"].as_str()),
        (Some(u64::from(p2)), Some("HTTP/2.0")),
        "g suffix speaks h2c to the backend"
    );
    assert_eq!(
        dp.curl(1, &dp.host("multi-9"), "/", &[]).status,
        404,
        "undeclared port"
    );
    assert_eq!(
        dp.curl(1, &dp.host(&format!("multi-{p2}sg")), "/", &[])
            .status,
        400,
        "both suffixes"
    );
    assert_eq!(dp.curl(1, &dp.host("nosuchapp"), "/", &[]).status, 404);
    let c = dp.curl(2, &pt_host, "/", &["-v"]);
    assert_eq!(c.status, 200, "passthrough: {}", c.stderr);
    assert!(
        c.stderr.contains("CN=passthrough-backend"),
        "the client verified the backend's own certificate:\n{}",
        c.stderr
    );
    let v: serde_json::Value = serde_json::from_str(&c.body).expect("json");
    assert_eq!(v["tls"], true, "TLS terminated by the backend");

    phase("Host outside the SNI's route: 421 (HTTP/1.1 and HTTP/2)");
    for flag in ["--http1.1", "--http2"] {
        let c = dp.curl(1, &demo, "/", &[flag, "-H", &format!("Host: {multi}")]);
        assert_eq!(c.status, 421, "{flag}: {}", c.body);
    }

    phase("header limits: oversized request headers refused, others still served");
    let big = format!("X-Big: {}", "a".repeat(70 * 1024));
    let c = dp.curl(1, &demo, "/", &["--http1.1", "-H", &big]);
    assert_eq!(c.status, 431, "oversized headers: {} {}", c.body, c.stderr);
    assert_eq!(dp.curl(1, &demo, "/", &[]).status, 200);

    phase("live updates: a streaming connection stays open across a certificate rotation and a route change");
    let port2 = dp.https_port(2);
    let stream = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "30", "--cacert"])
        .arg(dp.ca())
        .args(["--resolve", &format!("{demo}:{port2}:127.0.0.1")])
        .arg(format!("https://{demo}:{port2}/stream?chunks=30&ms=100"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start streaming curl");
    let before = dp.served_subject(1, &demo);
    assert!(
        before.contains(&format!("*.{}", dp.base)),
        "initial certificate: {before}"
    );
    let wildcard = format!("*.{}", dp.base);
    let (crt, key) = dp.issue_cert("rotated", &[wildcard.clone(), dp.base.clone()], "rotated");
    dp.cli_ok(&[
        "cert",
        "import",
        "--name",
        &wildcard,
        "--cert",
        path_str(&crt),
        "--key",
        path_str(&key),
    ]);
    let committed = Instant::now();
    for node in dp.tc.ids() {
        wait_for(
            &format!("node {node} serves the rotated certificate"),
            Duration::from_secs(5),
            || {
                dp.served_subject(node, &demo)
                    .contains("rotated")
                    .then_some(())
            },
        );
    }
    let took = committed.elapsed();
    eprintln!("rotated certificate served by every node {took:?} after the import returned");
    assert!(
        took < Duration::from_secs(1),
        "certificate rotation took {took:?} (limit 1 s)"
    );
    let certs: serde_json::Value =
        serde_json::from_str(&dp.cli_ok(&["cert", "list", "--json"])).expect("json");
    assert!(
        certs
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c["name"] == wildcard.as_str())),
        "{certs}"
    );

    dp.cli_ok(&["app", "create", "late", "--port", &p1.to_string()]);
    dp.cli_ok(&[
        "cvm",
        "register",
        "--instance-id",
        "late-1",
        "--app",
        "late",
        "--region",
        "ap-south",
        "--backend",
        "127.0.0.1",
    ]);
    let committed = Instant::now();
    let late = dp.host("late");
    for node in dp.tc.ids() {
        wait_for(
            &format!("node {node} routes {late}"),
            Duration::from_secs(5),
            || (dp.curl(node, &late, "/", &[]).status == 200).then_some(()),
        );
    }
    let took = committed.elapsed();
    eprintln!("new route served by every node {took:?} after the registration returned");
    assert!(took < Duration::from_secs(2), "route change took {took:?}");

    let out = stream.wait_with_output().expect("streaming curl");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the long-lived connection failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        body.lines().count(),
        30,
        "every chunk arrived over the same connection:\n{body}"
    );

    phase("<cvm-id>.internal: refused on the public HTTP port, served on the admin port with the token");
    let token = std::fs::read_to_string(&dp.tc.info.token_file).expect("token");
    let internal = |addr: &str, auth: Option<&str>| {
        let mut cmd = std::process::Command::new("curl");
        cmd.args([
            "-s",
            "-m",
            "10",
            "-w",
            "\n%{http_code}",
            "-H",
            "Host: demo-us-east.internal",
        ]);
        if let Some(t) = auth {
            cmd.args(["-H", &format!("Authorization: Bearer {}", t.trim())]);
        }
        let out = cmd
            .arg(format!("http://{addr}/who"))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse::<u16>().unwrap_or(0), body.to_string())
    };
    let (code, _) = internal(&dp.tc.node(1).http_addr, None);
    assert_eq!(
        code, 403,
        "untrusted client reached .internal on the HTTP port"
    );
    let (code, _) = internal(&dp.tc.node(1).admin_addr, None);
    assert_eq!(code, 401, ".internal on the admin port without the token");
    let (code, _) = internal(&dp.tc.node(1).admin_addr, Some("wrong-token-wrong-token"));
    assert_eq!(code, 401, ".internal on the admin port with a wrong token");
    for node in dp.tc.ids() {
        let (code, body) = internal(&dp.tc.node(node).admin_addr, Some(&token));
        assert_eq!(code, 200, "node {node}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("demo JSON");
        assert_eq!(
            v["instance_id"], "demo-us-east",
            "node {node}: only that instance"
        );
        assert!(
            v["headers"].get("authorization").is_none(),
            "the admin token leaked to the CVM: {body}"
        );
    }

    phase("metrics");
    let metrics = |node: u64| {
        let admin = dp.tc.node(node).admin_addr.clone();
        String::from_utf8_lossy(
            &run(Command::new("curl").args(["-sS", &format!("http://{admin}/metrics")])).stdout,
        )
        .to_string()
    };
    let m1 = metrics(1);
    for needle in [
        "portcullis_edge_requests_total{app=\"demo\",status=\"200\"}",
        "portcullis_edge_requests_total{app=\"-\",status=\"421\"}",
        "portcullis_edge_request_duration_seconds_bucket{le=",
        "portcullis_edge_open_connections{listener=\"https\"}",
        "portcullis_edge_connections_total{listener=\"https\"}",
    ] {
        assert!(m1.contains(needle), "node 1 metrics lack {needle}:\n{m1}");
    }
    // The TLS 1.0/1.1 attempts went to node 2.
    let m2 = metrics(2);
    assert!(
        m2.contains("portcullis_edge_tls_handshake_failures_total{reason="),
        "node 2 metrics:\n{m2}"
    );
}
