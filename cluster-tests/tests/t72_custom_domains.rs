//! Custom domains proven by DNS TXT records, end to end (docs/custom-domains.md).
//!
//! A real authoritative DNS server (Knot DNS, the Debian package `knot`) serves the zone
//! `example.test` on 127.0.0.1:<free port>; the test changes records mid-test with RFC 2136
//! updates (`knsupdate`). A 3-node cluster is started with `--dns-server` pointing at it.
//!
//! Proves: `domain add` returns a token; `domain verify` names the failing record before the
//! TXT records exist and succeeds after; curl reaches the app through every node; an
//! unverified domain does not route even with a `_dstack-app-address` record; a record naming
//! another app does not route; a changed record is picked up after its TTL; `domain remove`
//! stops routing; bad names get clear errors.
//!
//! Skips (with a printed reason) only when knot is missing and the test is not root; as root
//! (CI) a missing knot is a failure, because .ci/run installs it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use portcullis_cluster_tests::harness::{
    free_port, phase, portcullis_bin, run, show, wait_for, TestCluster,
};

const ZONE: &str = "example.test";
const DOMAIN: &str = "api.example.test";
const UNVERIFIED: &str = "shadow.example.test";
const PASSTHROUGH: &str = "tls.example.test";
/// TTL of every record the test publishes, seconds: small, so a change shows within a few.
const TTL: u64 = 2;

fn installed(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn is_root() -> bool {
    run(Command::new("id").arg("-u")).stdout.starts_with(b"0\n")
}

/// knotd serving `example.test` on 127.0.0.1:`port`, accepting updates from 127.0.0.1.
struct Knot {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Knot {
    fn start(dir: &Path) -> Knot {
        let port = free_port();
        let dir = dir.join("knot");
        std::fs::create_dir_all(dir.join("db")).expect("knot dir");
        std::fs::write(
            dir.join(format!("{ZONE}.zone")),
            format!(
                "$ORIGIN {ZONE}.\n$TTL {TTL}\n\
                 @ SOA ns.{ZONE}. admin.{ZONE}. 1 60 60 3600 {TTL}\n\
                 @ NS ns.{ZONE}.\n\
                 ns A 127.0.0.1\n"
            ),
        )
        .expect("zone file");
        let d = dir.display();
        std::fs::write(
            dir.join("knot.conf"),
            format!(
                "server:\n  listen: 127.0.0.1@{port}\n  rundir: {d}\n  pidfile: {d}/knot.pid\n\
                 control:\n  listen: {d}/knot.sock\n\
                 database:\n  storage: {d}/db\n\
                 log:\n  - target: stderr\n    any: info\n\
                 acl:\n  - id: local_update\n    address: 127.0.0.1\n    action: update\n\
                 template:\n  - id: default\n    storage: {d}\n    file: \"%s.zone\"\n    zonefile-sync: -1\n\
                 zone:\n  - domain: {ZONE}\n    acl: local_update\n"
            ),
        )
        .expect("knot.conf");
        let log = std::fs::File::create(dir.join("knot.log")).expect("knot.log");
        let child = Command::new("knotd")
            .arg("-c")
            .arg(dir.join("knot.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start knotd");
        let knot = Knot { child, port, dir };
        let started = Instant::now();
        while !knot
            .dig(&format!("SOA {ZONE}."))
            .contains(&format!("ns.{ZONE}."))
        {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "knot does not answer for {ZONE} on port {port}; its log:\n{}",
                knot.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        knot
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("knot.log")).unwrap_or_default()
    }

    fn dig(&self, query: &str) -> String {
        let out = run(Command::new("kdig")
            .arg("@127.0.0.1")
            .args(["-p", &self.port.to_string(), "+short", "+timeout=2"])
            .args(query.split(' ')));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Replaces every TXT record at `name` with `values` (none: deletes them) in one update.
    fn set_txt(&self, name: &str, values: &[&str]) {
        let mut script = format!(
            "server 127.0.0.1 {}\nzone {ZONE}.\nupdate delete {name}. TXT\n",
            self.port
        );
        for v in values {
            script.push_str(&format!("update add {name}. {TTL} TXT \"{v}\"\n"));
        }
        script.push_str("send\nquit\n");
        let mut child = Command::new("knsupdate")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start knsupdate");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(script.as_bytes()).expect("write update");
        }
        let out = child.wait_with_output().expect("knsupdate");
        assert!(
            out.status.success(),
            "knsupdate {name} {values:?}: {}\nknot log:\n{}",
            show(&out),
            self.log()
        );
        // The server answers with the new records before the test relies on them.
        let want: Vec<String> = values.iter().map(|v| format!("\"{v}\"")).collect();
        wait_for(
            &format!("knot serves {name} TXT {values:?}"),
            Duration::from_secs(10),
            || {
                let mut got: Vec<String> = self
                    .dig(&format!("TXT {name}."))
                    .lines()
                    .map(str::to_string)
                    .collect();
                got.sort();
                let mut w = want.clone();
                w.sort();
                (got == w).then_some(())
            },
        );
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cluster, its extra backend and the DNS server; all stopped on drop (the cluster first).
struct Env {
    tc: TestCluster,
    backends: Vec<Child>,
    knot: Option<Knot>,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.tc.down();
        for c in &mut self.backends {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.knot.take();
    }
}

struct Curl {
    status: u16,
    body: String,
    stderr: String,
}

impl Env {
    fn knot(&self) -> &Knot {
        self.knot.as_ref().expect("knot")
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.tc.cli(args)
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "portcullis {args:?}: {}", show(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn cli_err(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "portcullis {args:?} should fail: {}",
            show(&out)
        );
        String::from_utf8_lossy(&out.stderr).to_string()
    }

    /// `curl https://<host>/` through `node`, with `--resolve host:port:127.0.0.1`.
    fn curl(&self, node: u64, host: &str) -> Curl {
        let addr = &self.tc.node(node).https_addr;
        let port = addr.rsplit_once(':').map(|(_, p)| p).expect("port");
        let out = run(Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "15",
                "-w",
                "\n%{http_code}",
                "--cacert",
            ])
            .arg(self.tc.path().join("pki/dev-ca.pem"))
            .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
            .arg(format!("https://{host}:{port}/")));
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        Curl {
            status: code.trim().parse().unwrap_or(0),
            body: body.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        }
    }

    /// The app and backend port that answered `host` through `node`, or the HTTP status.
    fn reached(&self, node: u64, host: &str) -> Result<(String, u64), u16> {
        let c = self.curl(node, host);
        if c.status != 200 {
            return Err(c.status);
        }
        let v: serde_json::Value = serde_json::from_str(&c.body)
            .unwrap_or_else(|e| panic!("not json ({e}): {} {}", c.body, c.stderr));
        Ok((
            v["app"].as_str().unwrap_or("").to_string(),
            v["port"].as_u64().unwrap_or(0),
        ))
    }

    /// Waits until every node answers `host` with `want` (app and port, or a status).
    fn wait_all(&self, host: &str, want: Result<(String, u64), u16>, timeout: Duration) {
        for node in self.tc.ids() {
            let mut last = Err(0);
            let started = Instant::now();
            while started.elapsed() < timeout {
                last = self.reached(node, host);
                if last == want {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            assert_eq!(
                last,
                want,
                "{host} through node {node} after {timeout:?}; node log tail:\n{}",
                tail(&self.tc.node_log(node))
            );
        }
    }

    /// A certificate for `name` from the cluster's development CA.
    fn issue_cert(&self, name: &str) -> (PathBuf, PathBuf) {
        self.tc.issue_dev_cert(name, &[name], name)
    }

    /// [`Env::issue_cert`], imported into the cluster for the data plane to serve.
    fn import_cert(&self, name: &str) {
        let (crt, key) = self.issue_cert(name);
        let (crt, key) = (path_str(&crt), path_str(&key));
        self.cli_ok(&[
            "cert", "import", "--name", name, "--cert", crt, "--key", key,
        ]);
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The sum of every sample of metric `name` (all label sets), or of the one whose labels
/// contain `label`.
fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']) && rest.contains(label))
        })
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[test]
fn t72_custom_domains_proven_by_dns() {
    for bin in ["knotd", "knsupdate", "kdig", "curl", "openssl"] {
        if !installed(bin) {
            if is_root() {
                panic!("{bin} is not installed; CI installs knot, knot-dnsutils, curl and openssl (.ci/run)");
            }
            eprintln!("SKIP t72: {bin} is not installed and this is not root (apt-get install knot knot-dnsutils)");
            return;
        }
    }
    let scratch = tempfile::Builder::new()
        .prefix("portcullis-t72-")
        .tempdir()
        .expect("tempdir");

    phase("start knot (authoritative for example.test) on a free port");
    let knot = Knot::start(scratch.path());
    let dns = format!("127.0.0.1:{}", knot.port);

    phase("start a 3-node cluster resolving TXT records through it");
    let tc = TestCluster::up_with(3, &["--dns-server", &dns]);
    let mut env = Env {
        tc,
        backends: Vec::new(),
        knot: Some(knot),
    };

    phase("app `web` with two ports, one backend serving both");
    let (p1, p2) = (free_port(), free_port());
    let child = Command::new(portcullis_bin())
        .args(["demo-app", "--name", "web", "--instance-id", "web-1"])
        .args(["--listen", &format!("127.0.0.1:{p1}")])
        .args(["--listen", &format!("127.0.0.1:{p2}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start demo-app");
    env.backends.push(child);
    for p in [p1, p2] {
        wait_for(&format!("backend on {p}"), Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", p)).ok()
        });
    }
    let (p1s, p2s) = (p1.to_string(), p2.to_string());
    env.cli_ok(&["app", "create", "web", "--port", &p1s, "--port", &p2s]);
    env.cli_ok(&[
        "cvm",
        "register",
        "--instance-id",
        "web-1",
        "--app",
        "web",
        "--region",
        "us-east",
        "--backend",
        "127.0.0.1",
    ]);
    let apps: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["app", "list", "--json"])).expect("json");
    let demo_port = apps
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == "demo"))
        .and_then(|d| d["ports"][0].as_u64())
        .expect("the demo app from `up`");
    env.import_cert(DOMAIN);
    env.import_cert(UNVERIFIED);

    phase("bad names are refused with a reason");
    for (name, why) in [
        ("not a name", "not a DNS name"),
        ("localhost", "two labels"),
        ("*.example.test", "wildcards"),
        ("x.portcullis.localhost", "inside the base domain"),
        ("cvm-1.internal", ".internal"),
    ] {
        let err = env.cli_err(&["domain", "add", name, "--app", "web", "--port", &p1s]);
        assert!(err.contains(why), "domain add {name:?}: {err}");
    }
    let err = env.cli_err(&[
        "domain",
        "add",
        "a.example.test",
        "--app",
        "nope",
        "--port",
        "1",
    ]);
    assert!(err.contains("app \"nope\" not found"), "{err}");
    let err = env.cli_err(&[
        "domain",
        "add",
        "a.example.test",
        "--app",
        "web",
        "--port",
        "9",
    ]);
    assert!(err.contains("does not declare port 9"), "{err}");

    phase("domain add (uppercase, trailing dot) returns a token");
    let added: serde_json::Value = serde_json::from_str(&env.cli_ok(&[
        "domain",
        "add",
        "API.Example.Test.",
        "--app",
        "web",
        "--port",
        &p1s,
        "--json",
    ]))
    .expect("json");
    assert_eq!(added["name"], DOMAIN, "{added}");
    assert_eq!(added["verified"], false);
    let token = added["token"].as_str().expect("token").to_string();
    assert!(token.len() >= 32, "token {token:?}");
    let err = env.cli_err(&["domain", "add", DOMAIN, "--app", "web", "--port", &p1s]);
    assert!(err.contains("already exists"), "{err}");

    phase("verify fails, naming each missing record, before the TXT records exist");
    let challenge = format!("_portcullis-challenge.{DOMAIN}");
    let address = format!("_dstack-app-address.{DOMAIN}");
    let err = env.cli_err(&["domain", "verify", DOMAIN]);
    assert!(
        err.contains(&challenge) && err.contains(&address) && err.contains("no such name"),
        "{err}"
    );
    phase("an unverified claim does not route");
    env.wait_all(DOMAIN, Err(404), Duration::from_secs(5));

    phase("token published, address names another app: verify says which check failed");
    env.knot().set_txt(&challenge, &[&token]);
    env.knot()
        .set_txt(&address, &[&format!("demo:{demo_port}")]);
    let err = env.cli_err(&["domain", "verify", DOMAIN]);
    assert!(
        !err.contains("ownership") && err.contains(&address) && err.contains("not app \"web\""),
        "{err}"
    );
    env.knot().set_txt(&challenge, &["someone-else"]);
    env.knot().set_txt(&address, &[&format!("web:{p1}")]);
    let err = env.cli_err(&["domain", "verify", DOMAIN]);
    assert!(
        err.contains("does not contain the claim's token") && !err.contains("routing"),
        "{err}"
    );

    phase("both records right: verify succeeds");
    env.knot().set_txt(&challenge, &[&token]);
    let out = env.cli_ok(&["domain", "verify", DOMAIN]);
    assert!(
        out.contains(&format!("routes to app web port {p1}")),
        "{out}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["domain", "list", "--json"])).expect("json");
    let entry = list
        .as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == DOMAIN))
        .unwrap_or_else(|| panic!("{DOMAIN} in {list}"));
    assert_eq!(entry["verified"], true, "{entry}");
    assert_eq!(entry["token"], token.as_str());

    phase("curl through each of the 3 nodes reaches web on the TXT record's port");
    env.wait_all(
        DOMAIN,
        Ok(("web".into(), p1.into())),
        Duration::from_secs(10),
    );

    phase("requests are answered from the TXT cache, not one lookup each (node 2 metrics)");
    let before = env.tc.metrics(2);
    let rounds = 10;
    for _ in 0..rounds {
        assert_eq!(env.reached(2, DOMAIN), Ok(("web".into(), p1.into())));
    }
    let after = env.tc.metrics(2);
    let delta =
        |name: &str, label: &str| metric(&after, name, label) - metric(&before, name, label);
    let consulted = delta("portcullis_dns_cache_requests_total", "");
    let lookups = delta("portcullis_dns_lookups_total", "");
    eprintln!("{rounds} requests: {consulted} cache consultations, {lookups} nameserver lookups");
    // Two consultations per request (SNI, then Host); a refresh-ahead may add a lookup or two.
    assert!(consulted >= f64::from(2 * rounds), "{consulted}");
    assert!(lookups <= 3.0, "{lookups} lookups for {rounds} requests");

    phase("the TXT record moves the domain to web's other port after its TTL");
    env.knot().set_txt(&address, &[&format!("web:{p2}")]);
    let changed = Instant::now();
    env.wait_all(
        DOMAIN,
        Ok(("web".into(), p2.into())),
        Duration::from_secs(15),
    );
    eprintln!(
        "record change picked up by every node within {:?} (TTL {TTL} s)",
        changed.elapsed()
    );

    phase("a record naming another app does not route (never to that app)");
    env.knot()
        .set_txt(&address, &[&format!("demo:{demo_port}")]);
    env.wait_all(DOMAIN, Err(404), Duration::from_secs(15));
    for node in env.tc.ids() {
        let r = env.reached(node, DOMAIN);
        assert_eq!(r, Err(404), "node {node}");
    }
    env.knot().set_txt(&address, &[&format!("web:{p1}")]);
    env.wait_all(
        DOMAIN,
        Ok(("web".into(), p1.into())),
        Duration::from_secs(15),
    );

    let unrouted = metric(
        &env.tc.metrics(1),
        "portcullis_custom_domain_unrouted_total",
        "other_app",
    );
    assert!(unrouted >= 1.0, "unrouted other_app on node 1: {unrouted}");

    phase("a passthrough custom domain relays TLS to the app's own certificate");
    let p3 = free_port();
    let (crt, key) = env.issue_cert(PASSTHROUGH);
    let child = Command::new(portcullis_bin())
        .args(["demo-app", "--name", "secure", "--instance-id", "secure-1"])
        .args(["--listen", &format!("127.0.0.1:{p3}")])
        .args(["--tls-cert", path_str(&crt), "--tls-key", path_str(&key)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start demo-app");
    env.backends.push(child);
    wait_for(
        &format!("tls backend on {p3}"),
        Duration::from_secs(10),
        || std::net::TcpStream::connect(("127.0.0.1", p3)).ok(),
    );
    let p3s = p3.to_string();
    env.cli_ok(&["app", "create", "secure", "--port", &p3s]);
    env.cli_ok(&[
        "cvm",
        "register",
        "--instance-id",
        "secure-1",
        "--app",
        "secure",
        "--region",
        "eu-west",
        "--backend",
        &format!("127.0.0.1:{p3}"),
    ]);
    let pt: serde_json::Value = serde_json::from_str(&env.cli_ok(&[
        "domain",
        "add",
        PASSTHROUGH,
        "--app",
        "secure",
        "--port",
        &p3s,
        "--passthrough",
        "--json",
    ]))
    .expect("json");
    assert_eq!(pt["passthrough"], true, "{pt}");
    let pt_token = pt["token"].as_str().expect("token").to_string();
    env.knot().set_txt(
        &format!("_portcullis-challenge.{PASSTHROUGH}"),
        &[&pt_token],
    );
    env.knot()
        .set_txt(&format!("_dstack-app-address.{PASSTHROUGH}"), &["secure"]);
    let out = env.cli_ok(&["domain", "verify", PASSTHROUGH]);
    assert!(out.contains(&format!("port {p3}")), "{out}");
    // No certificate for this name was imported: only the backend's own can answer.
    for node in env.tc.ids() {
        let c = env.curl(node, PASSTHROUGH);
        assert_eq!(c.status, 200, "node {node}: {} {}", c.body, c.stderr);
        let v: serde_json::Value = serde_json::from_str(&c.body).expect("json");
        assert_eq!(
            (v["app"].as_str(), v["tls"].as_bool()),
            (Some("secure"), Some(true)),
            "{v}"
        );
    }

    phase("a _dstack-app-address record alone (claim not verified) does not route");
    let shadow: serde_json::Value = serde_json::from_str(&env.cli_ok(&[
        "domain", "add", UNVERIFIED, "--app", "web", "--port", &p1s, "--json",
    ]))
    .expect("json");
    assert_eq!(shadow["verified"], false);
    env.knot().set_txt(
        &format!("_dstack-app-address.{UNVERIFIED}"),
        &[&format!("web:{p1}")],
    );
    env.wait_all(UNVERIFIED, Err(404), Duration::from_secs(5));

    phase("domain remove stops routing on every node");
    env.cli_ok(&["domain", "remove", DOMAIN]);
    env.wait_all(DOMAIN, Err(404), Duration::from_secs(10));
    let err = env.cli_err(&["domain", "verify", DOMAIN]);
    assert!(err.contains("not found"), "{err}");
    let list: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["domain", "list", "--json"])).expect("json");
    assert!(
        list.as_array()
            .is_some_and(|a| a.iter().all(|d| d["name"] != DOMAIN)),
        "{list}"
    );
    drop(env);
}
